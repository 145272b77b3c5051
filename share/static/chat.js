// Talking to the model: sending a turn and streaming the reply, stopping
// it, and clearing the chat's context.
//
// A turn's text and images stay the chat's draft (sessionStorage, see
// store.js) until the server has it (its POST answered 2xx); a send it never
// got keeps its message, with Retry.  A new chat is saved as a session only
// when its first message is sent, and deleted again if the server never got
// that message.  A session's reply is asked for with finish_on_disconnect:
// leaving the chat only stops reading it (the server finishes and stores
// it; a chat opened while its reply is still written is looked at again
// until it is done), and Stop asks the server to stop it.  Regenerate sends
// the last user turn again after truncating the session before it; editing
// a message forks the session before it and sends the new text there.

import * as API from "./api.js";
import { DATA_IMAGE, imagesOf, openSession, showSession, showStored, textOf } from "./conversation.js";
import { t } from "./i18n.js";
import { toast, toastError } from "./notify.js";
import { noteQuota } from "./quota.js";
import { Reply } from "./reply.js";
import { ask, createSession, mine, touchSession, updateSession } from "./sessions.js";
import { can, draftKey, readDraft, removeDraft, state, update, writeDraft } from "./store.js";

const enc = encodeURIComponent;

// --- drafts ---------------------------------------------------------------------

const DRAFT_SAVE = 300; // ms after the last keystroke
let draftTimer = 0;
let draftPending = null; // [key, {text, images}] waiting for draftTimer
let draftSeq = 0;

/** The composer changed (text or images): store the open chat's draft soon. */
export function noteDraft() {
  const key = draftKey(state.current && state.current.id);
  if (!key) return;
  draftPending = [key, { text: state.draft, images: state.attachments }];
  clearTimeout(draftTimer);
  draftTimer = setTimeout(saveDraftNow, DRAFT_SAVE);
}

/** Store the draft waiting for its timer now (before leaving a chat or the page). */
export function saveDraftNow() {
  clearTimeout(draftTimer);
  draftTimer = 0;
  if (draftPending) writeDraft(...draftPending);
  draftPending = null;
}

/** The state patch that puts the stored draft of chat id (null: the unsaved chat) in the composer. */
export function draftFor(id) {
  const d = readDraft(draftKey(id));
  return {
    draft: d ? d.text : "",
    attachments: d ? d.images.map((i) => ({ id: `draft-${++draftSeq}`, name: i.name, url: i.url })) : [],
  };
}

/** The server has the turn sent from the draft under key: forget it, unless the user wrote something new since. */
function releaseDraft(key, text) {
  if (!key) return;
  if (draftPending && draftPending[0] === key) return; // newer text waits for its timer
  const d = readDraft(key);
  if (!d || d.text === text) removeDraft(key);
}

// --- leaving, stopping ------------------------------------------------------------

const POLL = 1500; // ms between two looks at a chat whose reply the server is writing
let pollTimer = 0;

/**
 * Stop reading the reply, when the chat is left: a session's reply goes on
 * on the server (finish_on_disconnect) and is there when the chat is opened
 * again; a temporary chat's is cut off.
 */
export function stopStreaming() {
  saveDraftNow();
  clearTimeout(pollTimer);
  pollTimer = 0;
  if (state.streaming) {
    state.streaming.left = true;
    state.streaming.controller.abort();
  }
}

/** The Stop button: the server stops the reply (storing it incomplete) and the page stops reading. */
export async function stopReply() {
  const streaming = state.streaming;
  const session = streaming ? streaming.session : state.replying ? state.current : null;
  if (streaming) streaming.controller.abort();
  if (!session) return;
  try {
    await API.api("POST", `/v1/sessions/${enc(session.id)}/stop`);
  } catch {
    /* the reply may have ended meanwhile */
  }
  if (!streaming && state.current && state.current.id === session.id) watchReply(session.id, 0);
}

/**
 * The open session's reply is being written by the server (GET said
 * replying: true): look again every POLL ms until it is done, then show
 * what is stored.
 */
export function watchReply(id, delay = POLL) {
  const gen = state.openGen;
  clearTimeout(pollTimer);
  const look = async () => {
    pollTimer = 0;
    if (gen !== state.openGen) return;
    let full = null;
    try {
      full = await API.api("GET", `/v1/sessions/${enc(id)}`);
    } catch (err) {
      if (err instanceof API.ApiError && err.status === 404) {
        if (gen === state.openGen) openSession(id); // gone: openSession says so
        return;
      }
      full = null; // try again
    }
    if (gen !== state.openGen) return;
    if (!full || full.replying) {
      pollTimer = setTimeout(look, POLL);
      return;
    }
    updateSession(full);
    showStored(full.messages);
  };
  pollTimer = setTimeout(look, delay);
}

/** A temporary chat streaming its reply is lost when left: ask first.  Resolves to whether to go on. */
export async function mayLeave() {
  const s = state.streaming;
  if (!s || s.session || state.historyAvailable) return true;
  return ask("flow.leave.body", undefined, { titleKey: "flow.leave.title", okKey: "flow.leave.ok" });
}

// A reload or a closed tab: a session's reply goes on on the server, a temporary chat's would be lost.
window.addEventListener("beforeunload", (e) => {
  saveDraftNow();
  if (state.streaming && !state.streaming.session) {
    e.preventDefault();
    e.returnValue = "";
  }
});
window.addEventListener("pagehide", saveDraftNow);

// --- sending ------------------------------------------------------------------------

/** The images of a message's content that can be sent again ({url} with a data: URL). */
function resendable(content) {
  return imagesOf(content)
    .filter((url) => DATA_IMAGE.test(url))
    .map((url) => ({ url }));
}

/** A reply is being sent, streamed, or written by the server for the open chat. */
export const busy = () => !!(state.streaming || state.sending || state.replying);

/** Send what the composer holds (text and attached images). */
export async function sendMessage() {
  if (busy() || !can("chat:write")) return;
  const raw = state.draft;
  const text = raw.trim();
  const images = state.attachments;
  if (!text && !images.length) return;
  // Kept as the chat's draft until the server has the turn.
  const key = draftKey(state.current && state.current.id);
  clearTimeout(draftTimer);
  draftPending = null;
  writeDraft(key, { text: raw, images });
  update({ draft: "", attachments: [] });
  await sendTurn(text, images, { key, raw });
}

async function sendTurn(text, images, draft = {}) {
  update({ sending: true });
  try {
    await send(text, images, draft);
  } finally {
    update({ sending: false });
  }
}

/** The failed send of item (an error item with retry) again. */
export function retrySend(item) {
  if (busy() || !item.retry) return;
  const { text, images, draft, user } = item.retry;
  update({ messages: state.messages.filter((m) => m !== item && m !== user) });
  sendTurn(text, images, draft);
}

/** The open session, saved first if the chat is new: {session, created}; session null for a temporary chat. */
async function sessionToSendTo() {
  if (state.current || !state.historyAvailable) return { session: state.current, created: false };
  try {
    return { session: await createSession(), created: true };
  } catch (err) {
    if (err instanceof API.ApiError && err.status === 404) {
      update({ historyAvailable: false, listStatus: "unavailable" });
      return { session: null, created: false };
    }
    throw err;
  }
}

/** A session made for a first turn the server never got: gone again, from the server and the list. */
async function unmake(session) {
  update({ sessions: state.sessions.filter((s) => s.id !== session.id) });
  if (state.current && state.current.id === session.id) {
    update({ current: null, fresh: false });
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  }
  try {
    await API.api("DELETE", `/v1/sessions/${enc(session.id)}`);
  } catch {
    /* already gone, or the server is unreachable: the list shows it again at the next load */
  }
}

/** The index the next stored message gets in the server's list (the stored items are numbered). */
function nextIndex() {
  let next = 0;
  for (const m of state.messages) if (Number.isInteger(m.index)) next = Math.max(next, m.index + 1);
  return next;
}

function replaceItem(item, next) {
  const messages = state.messages.map((m) => (m === item ? next : m));
  if (messages.some((m, i) => m !== state.messages[i])) update({ messages });
}

async function send(text, images, draft) {
  const content = images.length
    ? [...(text ? [{ type: "text", text }] : []), ...images.map((img) => ({ type: "image_url", image_url: { url: img.url } }))]
    : text;
  const turn = { role: "user", content };
  const gen = state.openGen;
  const me = state.me;
  let user = { role: "user", content };
  const reply = new Reply(true);
  const answer = { role: "assistant", reply };
  update({ messages: [...state.messages, user, answer] });
  const failed = (key, err) => {
    if (gen !== state.openGen) return; // that chat is no longer shown
    const error = { role: "error", key, err, retry: { text, images, draft, user } };
    replaceItem(answer, error);
  };

  let made;
  try {
    made = await sessionToSendTo();
  } catch (err) {
    failed("error.session.create", err);
    return;
  }
  const { session, created } = made;
  if (created) {
    if (gen !== state.openGen || state.me !== me) {
      unmake(session); // the user moved on: the text stays in the draft
      return;
    }
    update({ current: session, fresh: true });
    history.replaceState(null, "", `#s=${enc(session.id)}`);
  }

  // include_usage: the reply's token count, taken off what the quota headers say is left.
  const body = { stream: true, stream_options: { include_usage: true }, messages: session ? [turn] : [...state.transcript, turn] };
  if (state.model) body.model = state.model;
  if (session) {
    body.session_id = session.id;
    body.finish_on_disconnect = true; // leaving the chat does not cut the reply off
  }

  const firstTurn = !!session && state.fresh;
  const controller = new AbortController();
  const streaming = { controller, reply, session, left: false };
  update({ fresh: false, streaming });

  let accepted = false;
  let outcome = {};
  let quota = null;
  let usage = null;
  const onStart = () => {
    accepted = true;
    releaseDraft(draft.key, draft.raw);
    if (session) {
      const index = nextIndex();
      answer.index = index + 1;
      const stored = { ...user, index };
      replaceItem(user, stored);
      user = stored;
    }
  };
  try {
    const result = await API.streamChat(body, { signal: controller.signal, onStart, onDelta: (d) => reply.append(d), onQuota: (q) => (quota = q) });
    usage = result.usage;
    if (!result.done) outcome = { error: "closed" };
  } catch (err) {
    outcome = controller.signal.aborted ? { stopped: true } : { error: err };
  }
  reply.finish(outcome);
  if (quota && state.me === me) noteQuota(quota, usage); // the same user still signed in
  if (state.streaming === streaming) update({ streaming: null });

  if (!accepted) {
    // The server does not have the turn: nothing of it is stored.  (Left
    // before the answer came, it may have it after all: the chat stays.)
    if (created && !streaming.left) unmake(session);
    if (streaming.left || gen !== state.openGen) return;
    if (outcome.stopped) {
      // Stopped before the server had it: back to the composer.
      update({ messages: state.messages.filter((m) => m !== user && m !== answer), draft: draft.raw || text, attachments: images });
      return;
    }
    failed(null, outcome.error);
    return;
  }
  if (!session) {
    if (gen !== state.openGen) return; // that temporary chat is gone
    const said = reply.content && outcome.error === undefined ? [{ role: "assistant", content: reply.parts().content }] : [];
    update({ transcript: [...state.transcript, turn, ...said] });
  } else if (streaming.left || outcome.stopped || outcome.error === undefined || outcome.error === "closed" || outcome.error instanceof API.StreamError) {
    touchSession(session, firstTurn ? text : null);
  }
}

// --- regenerate, edit and resend ------------------------------------------------------

/** The last user turn of the open chat and its place in state.messages, or null. */
function lastUserTurn() {
  for (let i = state.messages.length - 1; i >= 0; i--) if (state.messages[i].role === "user") return { item: state.messages[i], at: i };
  return null;
}

/** The last reply may be regenerated: the chat is the user's and nothing is being written. */
export function canRegenerate() {
  if (busy() || !can("chat:write")) return false;
  const last = lastUserTurn();
  if (!last || !state.messages.slice(last.at + 1).some((m) => m.role === "assistant")) return false;
  if (!state.current) return !state.historyAvailable;
  return mine(state.current) && Number.isInteger(last.item.index);
}

/** Regenerate: the last user turn is sent again, what followed it dropped (on the server too). */
export async function regenerate() {
  if (!canRegenerate()) return;
  const { item, at } = lastUserTurn();
  const text = textOf(item.content).trim();
  const images = resendable(item.content);
  if (!state.current) {
    const transcript = state.transcript;
    let cut = transcript.length - 1;
    while (cut >= 0 && transcript[cut].role !== "user") cut--;
    update({ transcript: transcript.slice(0, Math.max(cut, 0)), messages: state.messages.slice(0, at) });
    await sendTurn(text, images);
    return;
  }
  const gen = state.openGen;
  const id = state.current.id;
  update({ sending: true });
  try {
    await API.api("POST", `/v1/sessions/${enc(id)}/truncate`, { keep: item.index });
  } catch (err) {
    toastError("flow.regenerate.failed", err);
    return;
  } finally {
    update({ sending: false });
  }
  if (gen !== state.openGen) return;
  update({ messages: state.messages.slice(0, at) });
  await sendTurn(text, images);
}

/** Edit and resend: a copy of the chat up to item (a stored user message) gets text (and item's images) instead. */
export async function editAndResend(item, text) {
  const source = state.current;
  text = text.trim();
  if (busy() || !can("chat:write") || !source || !mine(source) || !Number.isInteger(item.index)) return false;
  const images = resendable(item.content);
  if (!text && !images.length) return false;
  update({ sending: true });
  let fork;
  try {
    fork = await API.api("POST", `/v1/sessions/${enc(source.id)}/fork`, { keep: item.index });
    if (!fork || !fork.id) throw new API.ApiError(500, { message: "no session in the answer" });
  } catch (err) {
    toastError("flow.edit.failed", err);
    return false;
  } finally {
    update({ sending: false });
  }
  const { messages, ...forked } = fork;
  update({ sessions: [forked, ...state.sessions.filter((s) => s.id !== forked.id)] });
  showSession(forked, Array.isArray(messages) ? messages : []);
  await sendTurn(text, images);
  return true;
}

export async function clearContext() {
  if (!can("chat:write")) return;
  const gen = state.openGen;
  if (!(await ask("clear.body", undefined, { titleKey: "clear.title", okKey: "clear.ok" }))) return;
  if (gen !== state.openGen) return; // another chat is open now
  stopStreaming();
  if (!state.current) {
    update({ transcript: [], messages: [] });
    toast(t("clear.done"));
    return;
  }
  const id = state.current.id;
  update({ clearing: true });
  try {
    await API.api("POST", "/v1/chat/completions", { session_id: id, messages: [] });
  } catch (err) {
    toastError("clear.failed", err);
    return;
  } finally {
    update({ clearing: false });
  }
  await openSession(id);
  toast(t("clear.done"));
}
