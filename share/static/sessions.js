// The session list on the left: the drawer on a phone, the team filter,
// loading pages, rename in place and delete with confirmation.

import * as API from "./api.js";
import { openSession, startNewChat } from "./conversation.js";
import { el, mobile, syncChildren } from "./dom.js";
import { bindText, formatDate, t } from "./i18n.js";
import { bindError, toast, toastError } from "./notify.js";
import { icon } from "./render.js";
import { can, state, update, view } from "./store.js";

const DEFAULT_TITLE = "New chat"; // what POST /v1/sessions is sent; shown translated
const PAGE_SIZE = 50;
const AUTO_TITLE_LENGTH = 48;
const enc = encodeURIComponent;

function setSidebarOpen(open) {
  update({ sidebarOpen: open });
}

export function closeSidebarOnMobile() {
  if (mobile.matches) setSidebarOpen(false);
}

/** Only a session's owner changes it; a teammate with history:<team> reads it. */
export function mine(s) {
  return !s || !s.owner || !state.me || s.owner === state.me.sub;
}

export function displayTitle(s) {
  const title = ((s && s.title) || "").trim();
  if (!title) return t("untitled");
  if (title === DEFAULT_TITLE) return t("newchat");
  return title;
}

export function sessionById(id) {
  return state.sessions.find((s) => s.id === id) || (state.current && state.current.id === id ? state.current : null);
}

/** Merge fields of a session from the server into the list and the open chat. */
export function updateSession(fresh) {
  const { messages, ...fields } = fresh;
  const merged = (s) => {
    if (!s || s.id !== fresh.id) return s;
    const next = { ...s, ...fields };
    return JSON.stringify(next) === JSON.stringify(s) ? s : next; // unchanged: no repaint
  };
  const sessions = state.sessions.map(merged);
  update({
    sessions: sessions.some((s, i) => s !== state.sessions[i]) ? sessions : state.sessions,
    current: merged(state.current),
  });
}

export async function loadSessions({ reset = false } = {}) {
  const gen = state.listGen + 1;
  update({ listGen: gen });
  if (reset) update({ sessions: [], nextCursor: null });
  if (!can("chat:read") && !state.filter) {
    update({ listStatus: "noaccess" });
    return;
  }
  update({ listStatus: "loading" });
  const params = new URLSearchParams();
  if (state.filter) params.set("team", state.filter);
  params.set("limit", String(PAGE_SIZE));
  if (!reset && state.nextCursor) params.set("cursor", state.nextCursor);
  try {
    const page = await API.api("GET", `/v1/sessions?${params}`);
    if (gen !== state.listGen) return;
    const seen = new Set(state.sessions.map((s) => s.id));
    const added = [];
    for (const s of Array.isArray(page && page.data) ? page.data : []) {
      if (s && s.id && !seen.has(s.id)) {
        added.push(s);
        seen.add(s.id);
      }
    }
    update({
      sessions: [...state.sessions, ...added],
      nextCursor: (page && page.next_cursor) || null,
      listStatus: "ready",
      historyAvailable: true,
    });
  } catch (e) {
    if (gen !== state.listGen) return;
    if (e instanceof API.ApiError && e.status === 404) update({ listStatus: "unavailable", historyAvailable: false });
    else if (e instanceof API.ApiError && e.status === 403) update({ listStatus: "noaccess" });
    else update({ listStatus: "error", listError: e });
  }
}

/** A new session, saved under the team filter's team; first in the list. */
export async function createSession() {
  const body = { title: DEFAULT_TITLE };
  if (state.filter) body.team = state.filter;
  const pending = state.pendingSettings; // the new chat's settings (settings.js); kept should this chat be unmade
  if (pending && pending.system_prompt != null) body.system_prompt = pending.system_prompt;
  if (pending && pending.temperature != null) body.temperature = pending.temperature;
  const s = await API.api("POST", "/v1/sessions", body);
  if (!s || !s.id) throw new API.ApiError(500, { message: "no session in the answer" });
  update({ sessions: [s, ...state.sessions.filter((x) => x.id !== s.id)], listStatus: "ready" });
  return s;
}

/** The session got a message: to the top of the list, titled after its first message. */
export async function touchSession(session, firstText) {
  const listed = state.sessions.find((s) => s.id === session.id) || session;
  update({ sessions: [{ ...listed, updated_at: new Date().toISOString() }, ...state.sessions.filter((s) => s.id !== session.id)] });
  const title = firstText && firstText.replace(/\s+/g, " ").trim();
  if (title && (listed.title || "").trim() === DEFAULT_TITLE && can("chat:write")) {
    const short = title.length > AUTO_TITLE_LENGTH ? `${title.slice(0, AUTO_TITLE_LENGTH - 1)}…` : title;
    try {
      const updated = await API.api("PATCH", `/v1/sessions/${enc(session.id)}`, { title: short });
      updateSession(updated && typeof updated === "object" ? updated : { id: session.id, title: short });
    } catch {
      /* the chat keeps its default title */
    }
  }
}

// --- painting -----------------------------------------------------------------

function paintSidebar({ sidebarOpen }) {
  el.app.classList.toggle("sidebar-open", sidebarOpen);
  el.app.classList.toggle("sidebar-collapsed", !sidebarOpen);
  el.sidebarToggle.setAttribute("aria-expanded", String(sidebarOpen));
}

function paintTeamFilter({ teams, filter }) {
  const options = [];
  if (can("chat:read")) options.push({ value: "", label: t("filter.mine") });
  for (const team of teams) options.push({ value: team, label: t("filter.team", { team }) });
  el.teamFilter.replaceChildren(
    ...options.map((o) => {
      const opt = document.createElement("option");
      opt.value = o.value;
      opt.textContent = o.label;
      return opt;
    }),
  );
  el.teamFilter.value = filter;
  el.teamFilter.closest(".filter").hidden = options.length === 0;
}

function dateGroup(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "group.older";
  const now = new Date();
  const today = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  const day = 86400000;
  if (d.getTime() >= today) return "group.today";
  if (d.getTime() >= today - day) return "group.yesterday";
  if (d.getTime() >= today - 7 * day) return "group.week";
  return "group.older";
}

/** A session's team (when the list shows every team) and owner (when not the user), or null. */
export function sessionMeta(s) {
  const meta = [];
  if (s.team && !state.filter) meta.push(s.team);
  if (state.me && s.owner && s.owner !== state.me.sub) meta.push(t("owner.other", { owner: s.owner }));
  if (!meta.length) return null;
  const m = document.createElement("span");
  m.className = "session-meta";
  m.textContent = meta.join(" · ");
  return m;
}

/** A line of the list's state (loading, empty, an error). */
export function statusLine(key, err, testid = "sessions-status") {
  const p = document.createElement("p");
  p.className = "session-status";
  p.dataset.testid = testid;
  if (err !== undefined) bindError(p, key, err);
  else bindText(p, key);
  return p;
}

function smallButton(testid, key, onClick, extraClass = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `btn btn-ghost btn-small${extraClass}`;
  b.dataset.testid = testid;
  bindText(b, key);
  b.addEventListener("click", onClick);
  return b;
}

let listVersion = 0; // counts repaints of the list, for paintActive
const items = new Map(); // session id -> {look, node}: an item is kept while it looks the same
const headings = new Map(); // date group -> its heading

function itemFor(s) {
  const look = JSON.stringify([s.title, s.team, s.owner, formatDate(s.updated_at), state.filter, state.me && state.me.sub, can("chat:write"), state.lang]);
  const kept = items.get(s.id);
  if (kept && kept.look === look) return kept.node;
  const node = sessionItem(s);
  items.set(s.id, { look, node });
  return node;
}

function headingFor(group) {
  if (!headings.has(group)) {
    const h = document.createElement("h2");
    h.className = "session-group";
    h.id = `session-${group.replace(/\W/g, "-")}`;
    headings.set(group, bindText(h, group));
  }
  return headings.get(group);
}

const groupLists = new Map(); // date group -> the <ul> of its chats, named by its heading

function listFor(group) {
  if (!groupLists.has(group)) {
    const ul = document.createElement("ul");
    ul.className = "session-group-list";
    ul.setAttribute("aria-labelledby", headingFor(group).id);
    groupLists.set(group, ul);
  }
  return groupLists.get(group);
}

function paintSessionList(s) {
  if (s.renaming) return; // finishing the rename repaints the list
  const nodes = [];
  const groups = new Map(); // date group -> its items, in the order of the list
  for (const session of s.sessions) {
    const g = dateGroup(session.updated_at || session.created_at);
    if (!groups.has(g)) groups.set(g, []);
    groups.get(g).push(itemFor(session));
  }
  for (const [g, members] of groups) {
    syncChildren(listFor(g), members);
    nodes.push(headingFor(g), listFor(g));
  }
  const status = s.listStatus;
  if (status === "loading") nodes.push(statusLine("sessions.loading"));
  else if (status === "unavailable") nodes.push(statusLine("sessions.unavailable"));
  else if (status === "noaccess") nodes.push(statusLine("sessions.noaccess"));
  else if (status === "error") {
    nodes.push(statusLine("sessions.error", s.listError), smallButton("sessions-retry", "retry", () => loadSessions({ reset: true })));
  } else if (status === "ready" && !s.sessions.length) {
    nodes.push(statusLine(can("chat:write") ? "sessions.empty.write" : "sessions.empty"));
  }
  if (status === "ready" && s.nextCursor) nodes.push(smallButton("load-more", "sessions.more", () => loadSessions(), " load-more"));
  syncChildren(el.sessionList, nodes);
  const listed = new Set(s.sessions.map((x) => x.id));
  for (const id of items.keys()) if (!listed.has(id)) items.delete(id);
  listVersion++;
}

function sessionItem(s) {
  const item = document.createElement("li");
  item.className = "session-item";
  item.dataset.testid = "session-item";
  item.dataset.sessionId = s.id;

  const open = document.createElement("button");
  open.type = "button";
  open.className = "session-open";
  open.dataset.action = "open";
  if (s.updated_at) open.title = formatDate(s.updated_at);
  const title = document.createElement("span");
  title.className = "session-title";
  title.dataset.testid = "session-title";
  title.textContent = displayTitle(s);
  open.append(title);
  const meta = sessionMeta(s);
  if (meta) open.append(meta);
  item.append(open);

  if (can("chat:write") && mine(s)) {
    const actions = document.createElement("div");
    actions.className = "session-actions";
    for (const [action, name, key] of [
      ["rename", "pencil", "rename"],
      ["delete", "trash", "delete"],
    ]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "icon-btn icon-btn-small";
      b.dataset.action = action;
      b.dataset.testid = action;
      b.dataset.i18nTitle = key;
      b.dataset.i18nAriaLabel = key;
      b.title = t(key);
      b.setAttribute("aria-label", t(key));
      b.append(icon(name));
      actions.append(b);
    }
    item.append(actions);
  }
  return item;
}

/** Highlight the open chat in the list without rebuilding it (a rebuild would eat a double-click). */
function paintActive({ current }) {
  const id = current ? current.id : null;
  for (const item of el.sessionList.querySelectorAll(".session-item")) {
    const active = item.dataset.sessionId === id;
    item.classList.toggle("active", active);
    const open = item.querySelector(".session-open");
    if (active) open.setAttribute("aria-current", "page");
    else open.removeAttribute("aria-current");
  }
}

// --- acting on a session ------------------------------------------------------------

function onSessionListClick(e) {
  const button = e.target.closest("button[data-action]");
  const item = e.target.closest(".session-item");
  if (!button || !item) return;
  const s = sessionById(item.dataset.sessionId);
  if (!s) return;
  const action = button.dataset.action;
  if (action === "open") {
    if (state.current && state.current.id === s.id) closeSidebarOnMobile();
    else openSession(s.id);
  } else if (action === "rename") startRename(item, s);
  else if (action === "delete") confirmDelete(s);
}

function onSessionListDblClick(e) {
  if (!can("chat:write")) return;
  const title = e.target.closest(".session-title");
  const item = e.target.closest(".session-item");
  if (!title || !item) return;
  const s = sessionById(item.dataset.sessionId);
  if (s) startRename(item, s);
}

/** An input in place of the title; Enter or leaving it saves, Escape cancels. */
function startRename(item, s) {
  if (state.renaming) return;
  update({ renaming: s.id });
  const open = item.querySelector(".session-open");
  const input = document.createElement("input");
  input.type = "text";
  input.className = "rename-input";
  input.dataset.testid = "rename-input";
  input.maxLength = 200;
  input.value = (s.title || "").trim() === DEFAULT_TITLE ? t("newchat") : s.title || "";
  input.setAttribute("aria-label", t("rename"));
  open.hidden = true;
  item.classList.add("renaming");
  item.insertBefore(input, open);
  input.focus();
  input.select();

  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    const title = input.value.trim();
    input.remove();
    open.hidden = false;
    item.classList.remove("renaming");
    const now = sessionById(s.id) || s;
    update({ renaming: null });
    if (!save || !title || title === now.title || title === displayTitle(now)) return;
    updateSession({ id: s.id, title });
    try {
      const updated = await API.api("PATCH", `/v1/sessions/${enc(s.id)}`, { title });
      if (updated && typeof updated === "object") updateSession(updated);
    } catch (err) {
      updateSession({ id: s.id, title: now.title });
      toastError("rename.failed", err);
    }
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      finish(true);
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  input.addEventListener("click", (e) => e.stopPropagation());
}

let confirmResolve = null;

/**
 * The confirmation dialog with bodyKey (titled titleKey, its OK button
 * labelled okKey: deleting a chat unless told otherwise); resolves to
 * whether it was confirmed.
 */
export function ask(bodyKey, vars, { titleKey = "delete.title", okKey = "delete" } = {}) {
  bindText(el.confirmDialog.querySelector("h2"), titleKey);
  bindText(el.confirmOk, okKey);
  bindText(el.confirmBody, bodyKey, vars);
  return new Promise((resolve) => {
    confirmResolve = resolve;
    el.confirmDialog.returnValue = "";
    el.confirmDialog.showModal();
    el.confirmCancel.focus();
  });
}

function onConfirmClose() {
  const resolve = confirmResolve;
  confirmResolve = null;
  if (resolve) resolve(el.confirmDialog.returnValue === "confirm");
}

async function confirmDelete(s) {
  if (!(await ask("delete.body", { title: displayTitle(s) }))) return;
  try {
    await API.api("DELETE", `/v1/sessions/${enc(s.id)}`);
  } catch (err) {
    if (!(err instanceof API.ApiError && err.status === 404)) {
      toastError("delete.failed", err);
      return;
    }
  }
  update({ sessions: state.sessions.filter((x) => x.id !== s.id) });
  if (state.current && state.current.id === s.id) startNewChat({ focus: false });
  toast(t("delete.done"));
}

export function install() {
  view(paintSidebar, (s) => [s.sidebarOpen]);
  view(paintTeamFilter, (s) => [s.scopes, s.teams, s.filter, s.lang]);
  view(paintSessionList, (s) => [s.sessions, s.listStatus, s.listError, s.nextCursor, s.filter, s.me, s.scopes, s.renaming, s.lang]);
  view(paintActive, (s) => [s.current && s.current.id, listVersion]);

  el.sidebarToggle.addEventListener("click", () => setSidebarOpen(!state.sidebarOpen));
  el.sidebarClose.addEventListener("click", () => setSidebarOpen(false));
  el.backdrop.addEventListener("click", () => setSidebarOpen(false));
  mobile.addEventListener("change", () => setSidebarOpen(!mobile.matches));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && mobile.matches && state.sidebarOpen && !el.confirmDialog.open) setSidebarOpen(false);
  });
  el.teamFilter.addEventListener("change", () => {
    update({ filter: el.teamFilter.value });
    loadSessions({ reset: true });
  });
  el.sessionList.addEventListener("click", onSessionListClick);
  el.sessionList.addEventListener("dblclick", onSessionListDblClick);
  el.confirmOk.addEventListener("click", () => el.confirmDialog.close("confirm"));
  el.confirmCancel.addEventListener("click", () => el.confirmDialog.close("cancel"));
  el.confirmDialog.addEventListener("close", onConfirmClose);
  el.confirmDialog.addEventListener("click", (e) => {
    if (e.target === el.confirmDialog) el.confirmDialog.close("cancel");
  });
}
