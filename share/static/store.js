// The page's state, and the one render that follows its changes.
//
// Every module reads `state` and changes it only through update(patch),
// which schedules a render for the next animation frame: many changes in
// one task give one render.  (A streaming reply keeps its growing text in
// its Reply, which calls update() when the text changes: see reply.js.)  A view (registered with view()) names what it
// depends on; the render repaints only the views whose dependencies
// changed, compared with Object.is, so a change is made by replacing a
// value (a new array, a new session object), never by mutating it in place.

import { getLanguage } from "./i18n.js";

const LATE = 250; // ms: background tabs run no animation frames

/** The values a fresh page, or a signed-out one, starts from. */
export function initialState() {
  return {
    me: null,
    mode: null, // "sso" | "dev"
    scopes: new Set(),
    teams: [],
    models: [],
    modelsLoading: false,
    filter: "", // "" = my chats, else a team name
    sessions: [],
    nextCursor: null,
    listStatus: "idle", // idle | loading | ready | error | unavailable | noaccess
    listError: null,
    historyAvailable: true,
    renaming: null, // the id of the session being renamed in place
    current: null, // the open session; null for a chat not yet saved
    fresh: false, // the open session was just created for the first message being sent
    loading: false, // the open chat's messages are on their way
    messages: [], // what the conversation shows (see conversation.js)
    transcript: [], // a temporary chat's turns (sent whole when history is unavailable)
    streaming: null, // {controller, reply}
    draft: "",
    attachments: [], // [{id, name, url}]
    notices: [], // [{id, key, err}]
    toast: null, // {text, error}
    sidebarOpen: true,
    keys: { status: "idle", data: [], error: null }, // the API keys panel's list (never a key's secret)
    quota: null, // {tokens, requests, resetAt}: what the last reply's quota headers said is left
    // page features (search.js, settings.js, the model picker)
    modelsFailed: false, // the model list did not load: retried until it does
    search: { query: "", status: "idle", results: [], error: null }, // status: idle | waiting | loading | ready | error
    pendingSettings: null, // {system_prompt, temperature} for a chat not yet saved (sent with POST /v1/sessions)
    // page flow (chat.js)
    replying: false, // the open session's reply is being written by the server, not streamed here (polled)
  };
}

export const state = {
  screen: "boot", // boot | signin | app
  signin: null, // {key, err, retry}: the sign-in screen's message
  lang: getLanguage(),
  model: null, // the last choice, in memory only; kept across sign-ins
  listGen: 0, // the session list load whose answer counts
  openGen: 0, // the opening of a chat whose answers count
  sending: false, // a send (or a regenerate, an edit) is between the click and the end of its stream
  clearing: false, // "Clear context" waits for the server
  signingOut: false,
  ...initialState(),
};

const views = [];
let frame = 0;
let timer = 0;

/** Change state and schedule a render (update() alone just schedules one). */
export function update(patch) {
  if (patch) Object.assign(state, patch);
  if (frame) return;
  frame = requestAnimationFrame(flush);
  timer = setTimeout(flush, LATE);
}

/**
 * Register a view: paint(state) runs at the next render after deps(state)
 * (an array) changes.  Without deps it runs at every render, and must check
 * for itself whether it has anything to do.  Views paint in the order they
 * were registered.
 */
export function view(paint, deps = null) {
  views.push({ paint, deps, last: null });
  update();
}

/** Render now (for a caller that needs the DOM up to date, e.g. to focus). */
export function flush() {
  cancelAnimationFrame(frame);
  clearTimeout(timer);
  frame = timer = 0;
  for (const v of views) {
    const now = v.deps ? v.deps(state) : null;
    if (now && v.last && now.every((x, i) => Object.is(x, v.last[i]))) continue;
    try {
      v.paint(state);
      v.last = now;
    } catch (err) {
      reportError(err); // the other views still paint; this one retries next time
    }
  }
}

/** The principal holds scope. */
export const can = (scope) => state.scopes.has(scope);

// --- drafts ---------------------------------------------------------------------
//
// What the composer holds for each chat, kept in sessionStorage (this tab
// only) under clawdbot.draft.<user sub>.<session id or "new">, so that a
// reload, a failed send or an expired sign-in does not lose it: a JSON
// {text, images: [{name, url}]}.  A sign out removes the user's drafts.

const DRAFT_PREFIX = "clawdbot.draft.";
const RETURN_KEY = "clawdbot.return";

function storage() {
  try {
    return window.sessionStorage;
  } catch {
    return null; // storage unavailable: drafts last as long as the page
  }
}

/** The storage key of the draft of chat id (null: the unsaved chat) for the signed-in user, or null. */
export function draftKey(id) {
  const me = state.me;
  return me && me.sub ? `${DRAFT_PREFIX}${me.sub}.${id || "new"}` : null;
}

/** The draft stored under key: {text, images}, or null. */
export function readDraft(key) {
  const store = storage();
  if (!key || !store) return null;
  try {
    const d = JSON.parse(store.getItem(key) || "null");
    if (!d || typeof d.text !== "string") return null;
    const images = Array.isArray(d.images) ? d.images.filter((i) => i && typeof i.url === "string" && /^data:image\//.test(i.url)) : [];
    return { text: d.text, images };
  } catch {
    return null;
  }
}

/** Store {text, images} under key (an empty draft removes it); images are dropped if they do not fit. */
export function writeDraft(key, { text = "", images = [] } = {}) {
  const store = storage();
  if (!key || !store) return;
  if (!text.trim() && !images.length) {
    store.removeItem(key);
    return;
  }
  const kept = images.map((i) => ({ name: i.name || "", url: i.url }));
  try {
    store.setItem(key, JSON.stringify({ text, images: kept }));
  } catch {
    try {
      store.setItem(key, JSON.stringify({ text, images: [] })); // over the storage quota: the text at least
    } catch {
      /* nothing fits */
    }
  }
}

export function removeDraft(key) {
  const store = storage();
  if (key && store) store.removeItem(key);
}

/** Forget every draft of the user sub (and where to return to). */
export function clearDrafts(sub) {
  const store = storage();
  if (!store || !sub) return;
  const prefix = `${DRAFT_PREFIX}${sub}.`;
  for (const key of Object.keys(store)) if (key.startsWith(prefix)) store.removeItem(key);
  store.removeItem(RETURN_KEY);
}

/** Forget the drafts of every user but sub (someone else signed in on this tab). */
export function keepOnlyDraftsOf(sub) {
  const store = storage();
  if (!store || !sub) return;
  const own = `${DRAFT_PREFIX}${sub}.`;
  for (const key of Object.keys(store)) if (key.startsWith(DRAFT_PREFIX) && !key.startsWith(own)) store.removeItem(key);
}

/** Remember the chat to reopen after signing in again (id null: the unsaved chat). */
export function rememberReturn(sub, id) {
  const store = storage();
  if (store && sub) store.setItem(RETURN_KEY, JSON.stringify({ sub, id: id || null }));
}

/** The chat to reopen for sub ({id}), once; null if none. */
export function takeReturn(sub) {
  const store = storage();
  if (!store) return null;
  let back = null;
  try {
    back = JSON.parse(store.getItem(RETURN_KEY) || "null");
  } catch {
    back = null;
  }
  store.removeItem(RETURN_KEY);
  return back && back.sub === sub ? { id: typeof back.id === "string" ? back.id : null } : null;
}
