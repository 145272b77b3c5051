// The conversation on the right: its title, the messages of the open chat
// (state.messages), opening a chat and starting a new one.
//
// An item of state.messages is {role: "user", content}, {role: "error",
// key, err} or {role: "assistant", reply} (a Reply, which paints itself);
// a stored one has its index in the server's list (index), a send the
// server never got has an error with retry ({text, images, draft, user}),
// and {role: "pending"} stands for a reply the server is still writing.

import * as API from "./api.js";
import { busy, canRegenerate, draftFor, editAndResend, mayLeave, regenerate, retrySend, stopStreaming, watchReply } from "./chat.js";
import { focusComposer } from "./composer.js";
import { announce, el, mobile, sameChildren, syncChildren } from "./dom.js";
import { bindText, t } from "./i18n.js";
import { bindError, toast } from "./notify.js";
import { Reply } from "./reply.js";
import { copyCode, icon } from "./render.js";
import { closeSidebarOnMobile, displayTitle, mine, sessionById, updateSession } from "./sessions.js";
import { can, state, update, view } from "./store.js";

const enc = encodeURIComponent;
export const DATA_IMAGE = /^data:image\/[a-z0-9.+-]+;base64,/i;

/** An empty, unsaved chat. */
export function startNewChat({ focus = true } = {}) {
  stopStreaming();
  update({ openGen: state.openGen + 1, current: null, fresh: false, transcript: [], loading: false, messages: [], pendingSettings: null, replying: false, ...draftFor(null) });
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  if (focus && can("chat:write")) focusComposer();
}

/**
 * "New chat": an empty chat, saved on the server only when its first
 * message is sent (chat.js).  Leaving a temporary chat's reply asks first.
 */
async function onNewChat() {
  closeSidebarOnMobile();
  if (!state.current && !state.messages.length && !state.streaming) {
    focusComposer();
    return;
  }
  if (!(await mayLeave())) return;
  startNewChat();
}

/**
 * Make s the open chat, showing messages (as the server stores them, each
 * item numbered with its index in the server's list); the composer gets
 * the chat's stored draft unless keepDraft (the same chat shown again).
 */
export function showSession(s, messages, { keepDraft = false } = {}) {
  stopStreaming();
  update({
    openGen: state.openGen + 1,
    current: s,
    fresh: false,
    transcript: [],
    loading: false,
    replying: false,
    messages: messages.map(storedItem).filter(Boolean),
    ...(keepDraft ? {} : draftFor(s.id)),
  });
  history.replaceState(null, "", `#s=${enc(s.id)}`);
}

/** The open chat's messages again, as now stored (its reply the server was writing is done). */
export function showStored(messages) {
  if (state.current) showSession(state.current, Array.isArray(messages) ? messages : [], { keepDraft: true });
}

export async function openSession(id) {
  closeSidebarOnMobile();
  const known = sessionById(id) || { id, title: "" };
  showSession(known, []);
  if (!mobile.matches) focusComposer(); // on a phone that would pop the keyboard up
  const gen = state.openGen;
  update({ loading: true });
  try {
    const full = await API.api("GET", `/v1/sessions/${enc(id)}`);
    if (gen !== state.openGen) return;
    updateSession(full);
    showSession(state.current || known, Array.isArray(full.messages) ? full.messages : [], { keepDraft: true });
    if (full.replying) {
      // The server is still writing this chat's reply (it went on when the chat was left).
      update({ replying: true, messages: [...state.messages, { role: "pending" }] });
      watchReply(id);
    }
  } catch (err) {
    if (gen !== state.openGen) return;
    if (err instanceof API.ApiError && err.status === 404) {
      update({ sessions: state.sessions.filter((s) => s.id !== id) });
      startNewChat({ focus: false });
      toast(t("error.session"), { error: true });
    } else {
      update({ loading: false });
      appendError("error.session.load", err);
    }
  }
}

function appendError(key, err) {
  update({ messages: [...state.messages, { role: "error", key, err }] });
}

function storedItem(m, index) {
  if (!m || typeof m !== "object") return null;
  if (m.role === "user") return { role: "user", content: m.content, index };
  if (m.role !== "assistant") return null;
  const reply = new Reply(false);
  reply.set(textOf(m.content), typeof m.reasoning_content === "string" ? m.reasoning_content : "");
  reply.finish(m.incomplete ? { incomplete: true } : {});
  return { role: "assistant", reply, index };
}

/** The text parts of a message's content (a string or a list of parts). */
export function textOf(content) {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content
    .filter((p) => p && p.type === "text" && typeof p.text === "string")
    .map((p) => p.text)
    .join("\n");
}

/** The image URLs of a message's content. */
export function imagesOf(content) {
  if (!Array.isArray(content)) return [];
  return content
    .filter((p) => p && p.type === "image_url")
    .map((p) => (typeof p.image_url === "string" ? p.image_url : p.image_url && p.image_url.url) || "");
}

// --- painting -----------------------------------------------------------------

function paintHeader({ screen, current, historyAvailable }) {
  if (screen !== "app") {
    document.title = "Clawdbot";
    return;
  }
  let title;
  if (current) title = displayTitle(current);
  else if (!historyAvailable) title = t("temporary.title");
  else title = t("newchat");
  el.chatTitle.textContent = title;
  document.title = `${title} · Clawdbot`;
}

/** What the user may do here: write, or only read (no chat:write, or a teammate's chat). */
function paintScopes({ current }) {
  const write = can("chat:write");
  const talk = write && mine(current);
  el.newSession.hidden = !write;
  el.composerBox.hidden = !talk;
  el.clearContext.hidden = !talk;
  el.modelPicker.hidden = !talk;
  el.readonlyNote.hidden = talk;
  if (!write) bindText(el.readonlyNote, "composer.readonly");
  else if (!talk) bindText(el.readonlyNote, "composer.teammate", { owner: current.owner });
  bindText(el.empty.querySelector("p"), write ? "empty.hint" : "empty.readonly");
}

function userNode(content) {
  const article = document.createElement("article");
  article.className = "msg msg-user";
  article.dataset.testid = "message-user";
  const bubble = document.createElement("div");
  bubble.className = "msg-bubble";
  const images = imagesOf(content);
  if (images.length) {
    const row = document.createElement("div");
    row.className = "msg-images";
    for (const url of images) {
      if (DATA_IMAGE.test(url)) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = t("image");
        img.className = "msg-image";
        row.append(img);
      } else {
        const chip = document.createElement("span");
        chip.className = "msg-image-placeholder";
        chip.append(icon("clip"));
        const label = document.createElement("span");
        bindText(label, "image");
        chip.append(label);
        row.append(chip);
      }
    }
    bubble.append(row);
  }
  const text = textOf(content);
  if (text) {
    const p = document.createElement("div");
    p.className = "msg-text";
    p.textContent = text;
    bubble.append(p);
  }
  article.append(bubble);
  return article;
}

function errorNode(key, err) {
  const article = document.createElement("article");
  article.className = "msg msg-assistant msg-failed";
  article.dataset.testid = "message-error";
  const box = document.createElement("div");
  box.className = "msg-error";
  box.setAttribute("role", "alert");
  box.append(icon("alert"));
  const span = document.createElement("span");
  bindError(span, key, err);
  box.append(span);
  article.append(box);
  announce(span.textContent);
  return article;
}

// --- page flow: retry, a reply still being written, regenerate, edit and resend ---

function flowButton(testid, key, { iconName = null, className = "btn btn-ghost btn-small" } = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.dataset.testid = testid;
  if (iconName) {
    b.append(icon(iconName));
    b.dataset.i18nTitle = key;
    b.dataset.i18nAriaLabel = key;
    b.title = t(key);
    b.setAttribute("aria-label", t(key));
  } else bindText(b, key);
  return b;
}

/** A send the server never got: its error, and Retry (the same text and images again). */
function addRetry(node, item) {
  const retry = flowButton("retry-send", "retry");
  retry.addEventListener("click", () => retrySend(item));
  node.querySelector(".msg-error").append(retry);
}

/** The reply the server is still writing (the chat was left, or the page reloaded, while it streamed). */
function pendingNode() {
  const article = document.createElement("article");
  article.className = "msg msg-assistant msg-pending";
  article.dataset.testid = "reply-pending";
  const body = document.createElement("div");
  body.className = "msg-body";
  const typing = document.createElement("span");
  typing.className = "typing";
  typing.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));
  const note = document.createElement("span");
  note.className = "msg-pending-note muted";
  bindText(note, "flow.pending");
  body.append(typing, note);
  article.append(body);
  return article;
}

/** The user's own stored message can be edited and sent again, as a new chat from there. */
function addEdit(node, item) {
  if (!Number.isInteger(item.index) || !state.current || !mine(state.current) || !can("chat:write")) return;
  const edit = flowButton("edit-message", "flow.edit", { iconName: "pencil", className: "icon-btn icon-btn-small msg-edit" });
  edit.addEventListener("click", () => startEdit(node, item));
  node.prepend(edit);
}

function startEdit(node, item) {
  if (node.classList.contains("editing")) return;
  const bubble = node.querySelector(".msg-bubble");
  const form = document.createElement("div");
  form.className = "msg-edit-form";
  const input = document.createElement("textarea");
  input.className = "msg-edit-input";
  input.dataset.testid = "edit-input";
  input.rows = 3;
  input.value = textOf(item.content);
  input.setAttribute("aria-label", t("flow.edit"));
  const actions = document.createElement("div");
  actions.className = "msg-edit-actions";
  const cancel = flowButton("edit-cancel", "flow.edit.cancel");
  const send = flowButton("edit-send", "flow.edit.send", { className: "btn btn-primary btn-small" });
  actions.append(cancel, send);
  send.disabled = busy(); // until the reply is done (paintEditButtons)
  form.append(input, actions);
  const done = () => {
    form.remove();
    bubble.hidden = false;
    node.classList.remove("editing");
    // Focus back on the Edit button (not lost to the page, where Esc stops a reply).
    const edit = node.querySelector("[data-testid=edit-message]");
    if (edit) edit.focus();
  };
  cancel.addEventListener("click", done);
  send.addEventListener("click", async () => {
    send.disabled = true;
    if (await editAndResend(item, input.value)) return; // another chat is open now
    send.disabled = false;
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      done();
    } else if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send.click();
    }
  });
  bubble.hidden = true;
  node.classList.add("editing");
  node.insertBefore(form, bubble);
  input.focus();
}

/** While a reply is written (here or on the server) a message cannot be edited and sent: its buttons wait. */
function paintEditButtons() {
  const waiting = busy();
  for (const b of el.messages.querySelectorAll("[data-testid=edit-message], [data-testid=edit-send]")) b.disabled = waiting;
}

let regenerateButton = null; // made at the first paint

/** Regenerate sits with the last reply's actions (next to Copy) while it may be used. */
function paintRegenerate() {
  if (!regenerateButton) {
    regenerateButton = document.createElement("button");
    regenerateButton.type = "button";
    regenerateButton.className = "msg-action msg-regenerate";
    regenerateButton.dataset.testid = "regenerate";
    regenerateButton.dataset.i18nTitle = "flow.regenerate";
    regenerateButton.dataset.i18nAriaLabel = "flow.regenerate";
    regenerateButton.append(icon("reset"), bindText(document.createElement("span"), "flow.regenerate.short"));
    regenerateButton.addEventListener("click", () => regenerate());
  }
  regenerateButton.title = t("flow.regenerate");
  regenerateButton.setAttribute("aria-label", t("flow.regenerate"));
  const last = state.messages[state.messages.length - 1];
  let home = null;
  if (last && last.reply && !last.reply.streaming && canRegenerate()) {
    const actions = last.reply.article.querySelector(".msg-actions");
    home = actions && !actions.hidden ? actions : last.reply.article.querySelector(".msg-body");
  }
  if (!home) regenerateButton.remove();
  else if (regenerateButton.parentNode !== home || home.lastChild !== regenerateButton) home.append(regenerateButton);
}

const nodes = new WeakMap(); // item -> its article

function nodeFor(item) {
  if (item.reply) return item.reply.article;
  let node = nodes.get(item);
  if (!node) {
    if (item.role === "pending") node = pendingNode();
    else if (item.role === "user") {
      node = userNode(item.content);
      addEdit(node, item);
    } else {
      node = errorNode(item.key, item.err);
      if (item.retry) addRetry(node, item);
    }
    nodes.set(item, node);
  }
  return node;
}

function nearBottom() {
  const c = el.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 120;
}

/**
 * The messages: new ones are added, gone ones removed, changed replies
 * repainted; the view stays at the bottom when a message comes or goes, or
 * when it was there before a reply grew.
 */
function paintMessages({ messages, loading }) {
  el.conversation.classList.toggle("loading", loading);
  const wanted = messages.map(nodeFor);
  const moved = !sameChildren(el.messages, wanted);
  const grown = messages.filter((m) => m.reply && m.reply.dirty);
  if (!moved && !grown.length) return;
  const stick = moved || nearBottom();
  syncChildren(el.messages, wanted);
  for (const m of grown) m.reply.paint();
  el.empty.hidden = wanted.length > 0;
  if (stick) el.conversation.scrollTop = el.conversation.scrollHeight;
}

export function install() {
  view(paintHeader, (s) => [s.screen, s.current, s.historyAvailable, s.lang]);
  view(paintScopes, (s) => [s.scopes, s.current, s.me]);
  view(paintMessages);
  view(paintRegenerate, (s) => [s.messages, s.streaming, s.sending, s.replying, s.current, s.scopes, s.lang]);
  view(paintEditButtons, (s) => [s.messages, s.streaming, s.sending, s.replying]);
  el.newSession.addEventListener("click", onNewChat);
  el.messages.addEventListener("click", (e) => {
    const copy = e.target.closest("button.code-copy");
    if (copy) copyCode(copy);
  });
}
