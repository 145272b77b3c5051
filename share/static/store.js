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
    fresh: false, // the open session was created here and has no messages yet
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
  };
}

export const state = {
  screen: "boot", // boot | signin | app
  signin: null, // {key, err, retry}: the sign-in screen's message
  lang: getLanguage(),
  model: null, // the last choice, in memory only; kept across sign-ins
  listGen: 0, // the session list load whose answer counts
  openGen: 0, // the opening of a chat whose answers count
  sending: false, // a send is between the click and the end of its stream
  creating: false, // "New chat" waits for the server
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
