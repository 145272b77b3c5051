// Searching chats: the field at the top of the session list.
//
// What is typed is sent, once typing pauses, as GET /v1/sessions?q=<text>
// (with the team filter's team when one is chosen): the server searches
// titles and message texts with the list's own permissions.  While there is
// a query its results take the list's place, each with the text around the
// match; clearing the field (or Escape) brings the list back.

import * as API from "./api.js";
import { openSession } from "./conversation.js";
import { $, el } from "./dom.js";
import { displayTitle, sessionMeta, statusLine } from "./sessions.js";
import { state, update, view } from "./store.js";

const DEBOUNCE = 250; // ms of quiet typing before a search goes out
const MAX_QUERY = 200; // characters the server accepts in q
const LIMIT = 50;

const input = $("session-search");
const results = $("search-results");

let timer = 0;
let gen = 0; // the search whose answer counts

function setSearch(patch) {
  update({ search: { ...state.search, ...patch } });
}

/** The field changed: search once typing pauses; an empty field is the list again. */
function onInput() {
  const query = input.value.trim().slice(0, MAX_QUERY);
  clearTimeout(timer);
  if (!query) {
    clearSearch({ keepField: true });
    return;
  }
  gen++; // an answer for what was typed before no longer counts
  setSearch({ query, status: state.search.status === "ready" ? "ready" : "waiting" });
  timer = setTimeout(() => runSearch(query), DEBOUNCE);
}

/** Back to the session list. */
function clearSearch({ keepField = false } = {}) {
  clearTimeout(timer);
  gen++;
  if (!keepField) input.value = "";
  update({ search: { query: "", status: "idle", results: [], error: null } });
}

async function runSearch(query) {
  const mine = ++gen;
  setSearch({ query, status: "loading", error: null });
  const params = new URLSearchParams({ q: query, limit: String(LIMIT) });
  if (state.filter) params.set("team", state.filter);
  try {
    const page = await API.api("GET", `/v1/sessions?${params}`);
    if (mine !== gen) return;
    const found = (Array.isArray(page && page.data) ? page.data : []).filter((s) => s && typeof s.id === "string");
    setSearch({ status: "ready", results: found, error: null });
  } catch (err) {
    if (mine !== gen) return;
    setSearch({ status: "error", results: [], error: err });
  }
}

// --- painting -----------------------------------------------------------------

/**
 * text lowercased, with where each of its characters came from: lowercasing
 * can change a length ("İ" becomes two characters), so a match found in the
 * lowercase text is marked on the original through start/end.
 */
function lowered(text) {
  let lower = "";
  const start = []; // start[j]: where in text the character that gave lower[j] begins
  const end = []; // end[j]: where it ends
  for (let i = 0; i < text.length; ) {
    const ch = String.fromCodePoint(text.codePointAt(i));
    const lc = ch.toLowerCase();
    for (let k = 0; k < lc.length; k++) {
      start.push(i);
      end.push(i + ch.length);
    }
    lower += lc;
    i += ch.length;
  }
  return { lower, start, end };
}

/** node holding text, each case-insensitive occurrence of query in a <mark>. */
function highlighted(node, text, query) {
  const { lower, start, end } = lowered(text);
  const q = lowered(query).lower; // folded as the text is, one character at a time
  let at = 0; // in lower
  let shown = 0; // in text
  for (;;) {
    const i = q ? lower.indexOf(q, at) : -1;
    if (i < 0) break;
    const from = start[i];
    const to = end[i + q.length - 1];
    if (from > shown) node.append(document.createTextNode(text.slice(shown, from)));
    const mark = document.createElement("mark");
    mark.textContent = text.slice(Math.max(from, shown), to);
    node.append(mark);
    shown = Math.max(shown, to);
    at = i + q.length;
  }
  if (shown < text.length) node.append(document.createTextNode(text.slice(shown)));
  return node;
}

function resultItem(s, query) {
  const item = document.createElement("div");
  item.className = "session-item search-result";
  item.dataset.testid = "search-result";
  item.dataset.sessionId = s.id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "session-open";
  const title = document.createElement("span");
  title.className = "session-title";
  title.dataset.testid = "search-result-title";
  highlighted(title, displayTitle(s), query);
  open.append(title);
  if (typeof s.match === "string" && s.match) {
    const match = document.createElement("span");
    match.className = "search-match";
    match.dataset.testid = "search-match";
    highlighted(match, s.match, query);
    open.append(match);
  }
  const meta = sessionMeta(s);
  if (meta) open.append(meta);
  open.addEventListener("click", () => openSession(s.id));
  item.append(open);
  return item;
}

function paintSearch({ search }) {
  const searching = !!search.query;
  results.hidden = !searching;
  el.sessionList.hidden = searching;
  if (!searching) {
    results.replaceChildren();
    return;
  }
  const nodes = search.results.map((s) => resultItem(s, search.query));
  if (search.status === "error") nodes.push(statusLine("search.failed", search.error, "search-status"));
  else if (search.status === "ready" && !nodes.length) nodes.push(statusLine("search.empty", undefined, "search-empty"));
  else if (!nodes.length) nodes.push(statusLine("search.loading", undefined, "search-status"));
  results.replaceChildren(...nodes);
  results.setAttribute("aria-busy", String(search.status === "loading" || search.status === "waiting"));
  paintActive(state);
}

function paintActive({ current }) {
  const id = current ? current.id : null;
  for (const item of results.querySelectorAll(".search-result")) {
    const active = item.dataset.sessionId === id;
    item.classList.toggle("active", active);
    const open = item.querySelector(".session-open");
    if (active) open.setAttribute("aria-current", "page");
    else open.removeAttribute("aria-current");
  }
}

export function install() {
  view(paintSearch, (s) => [s.search, s.lang, s.me]);
  view(paintActive, (s) => [s.current && s.current.id]);
  // The team filter changed: the same words, searched under it.
  let lastFilter = state.filter;
  view(
    ({ filter, search }) => {
      const changed = filter !== lastFilter;
      lastFilter = filter;
      if (changed && search.query) runSearch(search.query);
    },
    (s) => [s.filter],
  );
  // Signed out: the field forgets what was typed.
  view(
    ({ screen }) => {
      if (screen !== "app" && (state.search.query || input.value)) clearSearch();
    },
    (s) => [s.screen],
  );
  // No history here, or none this account may read: nothing to search.
  view(
    ({ listStatus }) => {
      input.closest(".search-box").hidden = listStatus === "unavailable" || listStatus === "noaccess";
    },
    (s) => [s.listStatus],
  );
  input.addEventListener("input", onInput);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && (input.value || state.search.query)) {
      e.preventDefault();
      e.stopPropagation(); // the drawer stays open on a phone
      clearSearch();
    } else if (e.key === "Enter" && !e.isComposing) {
      e.preventDefault();
      const query = input.value.trim().slice(0, MAX_QUERY);
      clearTimeout(timer);
      if (query) runSearch(query);
    }
  });
}
