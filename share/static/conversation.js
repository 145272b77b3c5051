// The conversation on the right: its title, the messages of the open chat
// (state.messages), opening a chat and starting a new one.
//
// An item of state.messages is {role: "user", content}, {role: "error",
// key, err} or {role: "assistant", reply} (a Reply, which paints itself).

import * as API from "./api.js";
import { stopStreaming } from "./chat.js";
import { focusComposer } from "./composer.js";
import { el, sameChildren, syncChildren } from "./dom.js";
import { bindText, t } from "./i18n.js";
import { bindError, toast, toastError } from "./notify.js";
import { Reply } from "./reply.js";
import { copyCode, icon } from "./render.js";
import { closeSidebarOnMobile, createSession, displayTitle, mine, sessionById, updateSession } from "./sessions.js";
import { can, state, update, view } from "./store.js";

const enc = encodeURIComponent;
const DATA_IMAGE = /^data:image\/[a-z0-9.+-]+;base64,/i;

/** An empty, unsaved chat. */
export function startNewChat({ focus = true } = {}) {
  stopStreaming();
  update({ openGen: state.openGen + 1, current: null, fresh: false, transcript: [], loading: false, messages: [] });
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  if (focus && can("chat:write")) focusComposer();
}

/** "New chat": a saved session when there is history, else a temporary chat. */
async function onNewChat() {
  closeSidebarOnMobile();
  if (state.current && state.fresh && !state.streaming) {
    focusComposer();
    return;
  }
  if (!state.historyAvailable) {
    startNewChat();
    return;
  }
  update({ creating: true });
  try {
    const s = await createSession();
    showSession(s, []);
    update({ fresh: true });
    focusComposer();
  } catch (err) {
    if (err instanceof API.ApiError && err.status === 404) {
      update({ historyAvailable: false, listStatus: "unavailable" });
      startNewChat();
    } else {
      toastError("error.session.create", err);
    }
  } finally {
    update({ creating: false });
  }
}

/** Make s the open chat, showing messages (as the server stores them). */
function showSession(s, messages) {
  stopStreaming();
  update({
    openGen: state.openGen + 1,
    current: s,
    fresh: false,
    transcript: [],
    loading: false,
    messages: messages.map(storedItem).filter(Boolean),
  });
  history.replaceState(null, "", `#s=${enc(s.id)}`);
}

export async function openSession(id) {
  closeSidebarOnMobile();
  const known = sessionById(id) || { id, title: "" };
  showSession(known, []);
  const gen = state.openGen;
  update({ loading: true });
  try {
    const full = await API.api("GET", `/v1/sessions/${enc(id)}`);
    if (gen !== state.openGen) return;
    updateSession(full);
    showSession(state.current || known, Array.isArray(full.messages) ? full.messages : []);
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

export function appendError(key, err) {
  update({ messages: [...state.messages, { role: "error", key, err }] });
}

function storedItem(m) {
  if (!m || typeof m !== "object") return null;
  if (m.role === "user") return { role: "user", content: m.content };
  if (m.role !== "assistant") return null;
  const reply = new Reply(false);
  reply.set(textOf(m.content), typeof m.reasoning_content === "string" ? m.reasoning_content : "");
  reply.finish(m.incomplete ? { incomplete: true } : {});
  return { role: "assistant", reply };
}

/** The text parts of a message's content (a string or a list of parts). */
function textOf(content) {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content
    .filter((p) => p && p.type === "text" && typeof p.text === "string")
    .map((p) => p.text)
    .join("\n");
}

function imagesOf(content) {
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
  return article;
}

const nodes = new WeakMap(); // item -> its article

function nodeFor(item) {
  if (item.reply) return item.reply.article;
  let node = nodes.get(item);
  if (!node) {
    node = item.role === "user" ? userNode(item.content) : errorNode(item.key, item.err);
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
  view(
    ({ creating }) => {
      el.newSession.disabled = creating;
    },
    (s) => [s.creating],
  );
  el.newSession.addEventListener("click", onNewChat);
  el.messages.addEventListener("click", (e) => {
    const copy = e.target.closest("button.code-copy");
    if (copy) copyCode(copy);
  });
}
