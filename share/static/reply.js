// One assistant message: its thinking, its answer and how it ended.
//
// A reply is a component of the conversation view: it keeps its text and
// its own DOM, and repaints in the page's one render when it changed.
// While it streams, its Markdown is rendered incrementally (MarkdownStream).

import * as API from "./api.js";
import { announce } from "./dom.js";
import { bindText, t } from "./i18n.js";
import { MarkdownStream } from "./markdown-stream.js";
import { bindError } from "./notify.js";
import { copyFrom, icon, plainText } from "./render.js";
import { update } from "./store.js";

/** Splits a leading <think>…</think> block (some models put it in content). */
function splitThink(text) {
  const m = /^\s*<think>([\s\S]*?)(?:<\/think>\s*|$)([\s\S]*)$/.exec(text);
  if (!m) return { reasoning: "", content: text };
  return { reasoning: m[1], content: m[2] };
}

/** The "Copy" button of a reply: copies textOf() (the reply's Markdown) and says "Copied" for a moment. */
function copyReplyButton(textOf) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "msg-action";
  button.dataset.testid = "copy-reply";
  button.dataset.i18nTitle = "reply.copy";
  button.dataset.i18nAriaLabel = "reply.copy";
  button.title = t("reply.copy");
  button.setAttribute("aria-label", t("reply.copy"));
  const label = bindText(document.createElement("span"), "copy");
  button.append(icon("copy"), label);
  button.addEventListener("click", () => copyFrom(button, textOf()));
  return button;
}

export class Reply {
  constructor(streaming) {
    this.streaming = streaming;
    this.live = streaming; // a reply that streams here is announced when it ends (live-region)
    this.content = "";
    this.reasoning = "";
    this.outcome = null; // set by finish()
    this.shownOutcome = null;
    this.dirty = true; // changed since it was last painted
    this.userToggled = false;

    this.article = document.createElement("article");
    this.article.className = "msg msg-assistant";
    this.article.dataset.testid = "message-assistant";
    this.article.dataset.state = streaming ? "streaming" : "done";
    const avatar = document.createElement("div");
    avatar.className = "msg-avatar";
    avatar.append(icon("logo"));
    const body = document.createElement("div");
    body.className = "msg-body";

    this.thinking = document.createElement("details");
    this.thinking.className = "thinking";
    this.thinking.dataset.testid = "thinking";
    this.thinking.hidden = true;
    const summary = document.createElement("summary");
    this.summaryLabel = document.createElement("span");
    summary.append(icon("spark"), this.summaryLabel);
    summary.addEventListener("click", () => {
      this.userToggled = true;
    });
    const thinkingBody = document.createElement("div");
    thinkingBody.className = "thinking-body markdown";
    this.thinking.append(summary, thinkingBody);
    this.thoughts = new MarkdownStream(thinkingBody);

    const answer = document.createElement("div");
    answer.className = "markdown msg-content";
    answer.dataset.testid = "message-content";
    this.answer = new MarkdownStream(answer);

    this.typing = document.createElement("span");
    this.typing.className = "typing";
    this.typing.dataset.testid = "typing";
    this.typing.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));

    this.footer = document.createElement("div");
    this.footer.className = "msg-footer";
    this.footer.hidden = true;

    // What can be done with a finished reply: copy its Markdown (other actions join it here).
    this.actions = document.createElement("div");
    this.actions.className = "msg-actions";
    this.actions.dataset.testid = "reply-actions";
    this.actions.hidden = true;
    this.actions.append(copyReplyButton(() => this.parts().content));

    body.append(this.thinking, answer, this.footer, this.actions);
    this.article.append(avatar, body);
  }

  /** More of a streamed reply. */
  append({ content, reasoning }) {
    this.content += content || "";
    this.reasoning += reasoning || "";
    this.changed();
  }

  /** The whole text of a stored reply. */
  set(content, reasoning) {
    this.content = content || "";
    this.reasoning = reasoning || "";
    this.changed();
  }

  /** outcome: {} finished, {stopped}, {incomplete}, or {error}. */
  finish(outcome = {}) {
    this.streaming = false;
    this.outcome = outcome;
    this.changed();
  }

  changed() {
    this.dirty = true;
    update();
  }

  /** The answer and the reasoning, a leading <think> block moved from one to the other. */
  parts() {
    const split = splitThink(this.content);
    return { content: split.content, reasoning: this.reasoning + split.reasoning };
  }

  paint() {
    this.dirty = false;
    const { content, reasoning } = this.parts();
    const final = !this.streaming;
    if (reasoning.trim()) {
      this.thinking.hidden = false;
      const thinkingNow = this.streaming && !content.trim();
      bindText(this.summaryLabel, thinkingNow ? "thinking" : "thought");
      this.thinking.classList.toggle("active", thinkingNow);
      if (!this.userToggled) this.thinking.open = thinkingNow;
      this.thoughts.update(reasoning, { final });
    }
    this.answer.update(content, { final });
    if (this.streaming && !content && !reasoning.trim()) this.answer.el.append(this.typing);
    else this.typing.remove();
    this.article.classList.toggle("streaming", this.streaming);
    this.actions.hidden = this.streaming || !content.trim();
    if (this.outcome !== this.shownOutcome) this.paintOutcome(this.outcome);
  }

  paintOutcome(outcome) {
    this.shownOutcome = outcome;
    if (outcome.error !== undefined) {
      this.article.dataset.state = "error";
      const box = document.createElement("div");
      box.className = "msg-error";
      box.dataset.testid = "message-error";
      box.setAttribute("role", "alert");
      box.append(icon("alert"));
      const span = document.createElement("span");
      const err = outcome.error;
      bindError(span, err instanceof API.StreamError ? "error.stream" : null, err);
      box.append(span);
      this.footer.append(box);
    } else if (outcome.stopped || outcome.incomplete) {
      this.article.dataset.state = "incomplete";
      const badge = document.createElement("span");
      badge.className = "msg-status";
      badge.dataset.testid = "message-status";
      bindText(badge, outcome.stopped ? "stopped" : "incomplete");
      this.footer.append(badge);
    } else {
      this.article.dataset.state = "done";
    }
    this.footer.hidden = !this.footer.childElementCount;
    if (this.live) {
      const outcomeText = this.footer.querySelector("[data-testid=message-error] .i18n-error, [data-testid=message-status]");
      announce(`${plainText(this.answer.el)} ${outcomeText ? outcomeText.textContent : ""}`);
    }
  }
}
