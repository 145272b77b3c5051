// Clawdbot chat page.
//
// Plain ES modules, no build step.  Talks to the gateway's OpenAI-style API
// (see api.js); renders model output only through render.js (marked, then
// DOMPurify); every UI string comes from i18n.js.  Nothing here writes HTML
// from strings: the DOM is built with createElement/textContent.

import * as API from "./api.js";
import { LANGUAGES, applyI18n, bindText, detectLanguage, formatDate, getLanguage, onLanguageChange, setLanguage, t } from "./i18n.js";
import { copyCode, icon, renderInto } from "./render.js";

const DEFAULT_TITLE = "New chat"; // what POST /v1/sessions is sent; shown translated
const AUTO_TITLE_LENGTH = 48;
const MAX_IMAGE_MB = 10;
const MAX_IMAGES = 4;
const PAGE_SIZE = 50;
// Raster images the gateway can re-encode (not SVG, which is a document).
const ACCEPTED_IMAGES = /^image\/(?:png|jpeg|gif|webp|bmp)$/;

const $ = (id) => document.getElementById(id);
const el = {
  boot: $("boot"),
  signin: $("signin"),
  signinMessage: $("signin-message"),
  signinButton: $("signin-button"),
  signinRetry: $("signin-retry"),
  app: $("app"),
  sidebar: $("sidebar"),
  sidebarToggle: $("sidebar-toggle"),
  sidebarClose: $("sidebar-close"),
  backdrop: $("backdrop"),
  newSession: $("new-session"),
  teamFilter: $("team-filter"),
  sessionList: $("session-list"),
  userAvatar: $("user-avatar"),
  userName: $("user-name"),
  userDetail: $("user-detail"),
  devBadge: $("dev-badge"),
  signout: $("signout"),
  chatTitle: $("chat-title"),
  modelPicker: $("model-picker"),
  clearContext: $("clear-context"),
  notices: $("notices"),
  conversation: $("conversation"),
  messages: $("messages"),
  empty: $("empty"),
  composerBox: $("composer-box"),
  attachments: $("attachments"),
  attach: $("attach"),
  fileInput: $("file-input"),
  composer: $("composer"),
  send: $("send"),
  stop: $("stop"),
  readonlyNote: $("readonly-note"),
  confirmDialog: $("confirm-dialog"),
  confirmBody: $("confirm-body"),
  confirmOk: $("confirm-ok"),
  confirmCancel: $("confirm-cancel"),
  langSwitch: $("lang-switch"),
  toast: $("toast"),
};

const mobile = window.matchMedia("(max-width: 768px)");

const state = {
  me: null,
  mode: null, // "sso" | "dev"
  scopes: new Set(),
  models: [],
  model: null, // the last choice, in memory only
  filter: "", // "" = my chats, else a team name
  teams: [],
  sessions: [],
  nextCursor: null,
  listStatus: "idle", // idle | loading | ready | error | unavailable | noaccess
  listError: null,
  listGen: 0,
  historyAvailable: true,
  current: null, // the open session; null for a chat not yet saved
  fresh: false, // the open session was created here and has no messages yet
  openGen: 0,
  transcript: [], // a temporary chat's turns (sent whole when history is unavailable)
  streaming: null, // {controller, view}
  attachments: [], // [{id, name, url}]
  renaming: null,
  sending: false, // a send is between the click and its stream
  attachmentSeq: 0,
};

const can = (scope) => state.scopes.has(scope);
const enc = encodeURIComponent;

// --- errors, notices and toasts ---------------------------------------------

/** A sentence for err, in the current language. */
function errorMessage(err) {
  if (err instanceof API.NetworkError) return t("error.network");
  if (err === "closed") return t("error.closed");
  if (!(err instanceof API.ApiError)) return String((err && err.message) || err);
  const detail = err.details ? ` (${err.details})` : "";
  const known = {
    AUTH_MISSING_TOKEN: "error.auth",
    AUTH_INVALID_TOKEN: "error.auth",
    AUTH_INSUFFICIENT_SCOPE: "error.scope",
    RATE_LIMITED: "error.rate",
    GATEWAY_BUSY: "error.busy",
    UPSTREAM_UNAVAILABLE: "error.upstream",
    UPSTREAM_TIMEOUT: "error.timeout",
    MODEL_NOT_FOUND: "error.model",
    PAYLOAD_TOO_LARGE: "error.toolarge",
  }[err.code];
  if (known) return t(known) + detail;
  if (err.status === 404 && err.code === "NOT_FOUND" && !(err instanceof API.StreamError)) return t("error.unavailable");
  return (err.message || t("error.title")) + detail;
}

/** Fill node with an error sentence (wrapped in the string key, if any); kept translated. */
function bindError(node, key, err) {
  node.classList.add("i18n-error");
  node._error = { key, err };
  node.textContent = key ? t(key, { msg: errorMessage(err) }) : errorMessage(err);
  return node;
}

function retranslateErrors() {
  for (const node of document.querySelectorAll(".i18n-error")) {
    const { key, err } = node._error || {};
    if (err !== undefined) node.textContent = key ? t(key, { msg: errorMessage(err) }) : errorMessage(err);
  }
}

let toastTimer = null;
function toast(text, { error = false } = {}) {
  el.toast.textContent = text;
  el.toast.classList.toggle("toast-error", error);
  el.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.toast.hidden = true;
  }, error ? 6000 : 2500);
}

function toastError(key, err) {
  toast(t(key, { msg: errorMessage(err) }), { error: true });
}

function addNotice(id, key, err) {
  removeNotice(id);
  const notice = document.createElement("div");
  notice.className = "notice";
  notice.dataset.testid = "notice";
  notice.dataset.notice = id;
  const text = document.createElement("span");
  text.className = "notice-text";
  if (err !== undefined) bindError(text, key, err);
  else bindText(text, key);
  const close = document.createElement("button");
  close.type = "button";
  close.className = "icon-btn icon-btn-small";
  close.dataset.testid = "notice-dismiss";
  close.dataset.i18nAriaLabel = "cancel";
  close.setAttribute("aria-label", t("cancel"));
  close.append(icon("x"));
  close.addEventListener("click", () => notice.remove());
  notice.append(icon("alert", "notice-icon"), text, close);
  el.notices.append(notice);
}

function removeNotice(id) {
  for (const n of el.notices.querySelectorAll(`[data-notice="${id}"]`)) n.remove();
}

// --- views ------------------------------------------------------------------

function showView(name) {
  el.boot.hidden = name !== "boot";
  el.signin.hidden = name !== "signin";
  el.app.hidden = name !== "app";
  const slot = name === "app" ? $("lang-slot-app") : name === "signin" ? $("lang-slot-signin") : null;
  if (slot) slot.append(el.langSwitch);
}

function showSignin(key, err, { retry = false } = {}) {
  resetApp();
  el.signinMessage.hidden = !key;
  if (key && err !== undefined) bindError(el.signinMessage, key, err);
  else if (key) {
    el.signinMessage.classList.remove("i18n-error");
    bindText(el.signinMessage, key);
  }
  el.signinRetry.hidden = !retry;
  showView("signin");
}

function resetApp() {
  if (state.streaming) state.streaming.controller.abort();
  Object.assign(state, {
    me: null,
    mode: null,
    scopes: new Set(),
    models: [],
    sessions: [],
    nextCursor: null,
    listStatus: "idle",
    listError: null,
    historyAvailable: true,
    current: null,
    fresh: false,
    transcript: [],
    streaming: null,
    attachments: [],
    renaming: null,
  });
  state.listGen++;
  state.openGen++;
  el.sessionList.replaceChildren();
  el.messages.replaceChildren();
  el.notices.replaceChildren();
  el.composer.value = "";
  renderAttachments();
}

async function startSession() {
  showView("boot");
  const result = await API.start();
  if (result.mode) {
    enterApp(result.me || {}, result.mode);
  } else if (result.reason === "signed-out") {
    showSignin(null);
  } else if (result.reason === "no-sign-in") {
    showSignin("signin.unconfigured");
  } else if (result.reason instanceof API.NetworkError) {
    showSignin("signin.unreachable", undefined, { retry: true });
  } else {
    showSignin("signin.failed", result.reason, { retry: true });
  }
}

function enterApp(me, mode) {
  state.me = me;
  state.mode = mode;
  state.scopes = new Set(Array.isArray(me.scopes) ? me.scopes : []);
  state.teams = [...state.scopes]
    .filter((s) => s.startsWith("history:") && s.length > 8)
    .map((s) => s.slice(8))
    .sort();
  state.filter = can("chat:read") || !state.teams.length ? "" : state.teams[0];

  renderUser();
  el.signout.hidden = mode !== "sso";
  el.devBadge.hidden = mode !== "dev";
  applyScopes();
  renderTeamFilter();
  showView("app");
  setSidebarOpen(!mobile.matches);
  const wanted = /^#s=(.+)$/.exec(location.hash); // a link to a chat (#s=<id>)
  startNewChat({ focus: false });
  loadModels();
  loadSessions({ reset: true }).then(() => {
    if (wanted && !state.current && state.historyAvailable) openSession(decodeURIComponent(wanted[1]));
  });
}

function renderUser() {
  const me = state.me || {};
  const name = me.name || me.email || me.sub || "";
  el.userName.textContent = name;
  el.userDetail.textContent = me.name && me.email ? me.email : me.name || me.email ? me.sub || "" : "";
  el.userAvatar.textContent = (name.trim()[0] || "?").toUpperCase();
  el.userName.title = me.sub || "";
}

/** Only a session's owner changes it; a teammate with history:<team> reads it. */
function mine(s) {
  return !s || !s.owner || !state.me || s.owner === state.me.sub;
}

function applyScopes() {
  const write = can("chat:write");
  const talk = write && mine(state.current);
  el.newSession.hidden = !write;
  el.composerBox.hidden = !talk;
  el.clearContext.hidden = !talk;
  el.modelPicker.hidden = !talk;
  el.readonlyNote.hidden = talk;
  if (!write) bindText(el.readonlyNote, "composer.readonly");
  else if (!talk) bindText(el.readonlyNote, "composer.teammate", { owner: state.current.owner });
  bindText(el.empty.querySelector("p"), write ? "empty.hint" : "empty.readonly");
}

// --- sidebar ----------------------------------------------------------------

function setSidebarOpen(open) {
  el.app.classList.toggle("sidebar-open", open);
  el.app.classList.toggle("sidebar-collapsed", !open);
  el.sidebarToggle.setAttribute("aria-expanded", String(open));
}

function closeSidebarOnMobile() {
  if (mobile.matches) setSidebarOpen(false);
}

function renderTeamFilter() {
  const options = [];
  if (can("chat:read")) options.push({ value: "", label: t("filter.mine") });
  for (const team of state.teams) options.push({ value: team, label: t("filter.team", { team }) });
  el.teamFilter.replaceChildren(
    ...options.map((o) => {
      const opt = document.createElement("option");
      opt.value = o.value;
      opt.textContent = o.label;
      return opt;
    }),
  );
  el.teamFilter.value = state.filter;
  el.teamFilter.closest(".filter").hidden = options.length === 0;
}

async function loadSessions({ reset = false } = {}) {
  const gen = ++state.listGen;
  if (reset) {
    state.sessions = [];
    state.nextCursor = null;
  }
  if (!can("chat:read") && !state.filter) {
    state.listStatus = "noaccess";
    renderSessionList();
    return;
  }
  state.listStatus = "loading";
  renderSessionList();
  const params = new URLSearchParams();
  if (state.filter) params.set("team", state.filter);
  params.set("limit", String(PAGE_SIZE));
  if (!reset && state.nextCursor) params.set("cursor", state.nextCursor);
  try {
    const page = await API.api("GET", `/v1/sessions?${params}`);
    if (gen !== state.listGen) return;
    const seen = new Set(state.sessions.map((s) => s.id));
    for (const s of Array.isArray(page && page.data) ? page.data : []) {
      if (s && s.id && !seen.has(s.id)) {
        state.sessions.push(s);
        seen.add(s.id);
      }
    }
    state.nextCursor = (page && page.next_cursor) || null;
    state.listStatus = "ready";
    state.historyAvailable = true;
  } catch (e) {
    if (gen !== state.listGen) return;
    if (e instanceof API.ApiError && e.status === 404) {
      state.listStatus = "unavailable";
      state.historyAvailable = false;
    } else if (e instanceof API.ApiError && e.status === 403) {
      state.listStatus = "noaccess";
    } else {
      state.listStatus = "error";
      state.listError = e;
    }
  }
  renderSessionList();
  renderHeader();
}

function displayTitle(s) {
  const title = ((s && s.title) || "").trim();
  if (!title) return t("untitled");
  if (title === DEFAULT_TITLE) return t("newchat");
  return title;
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

function statusLine(key, err) {
  const p = document.createElement("p");
  p.className = "session-status";
  p.dataset.testid = "sessions-status";
  if (err !== undefined) bindError(p, key, err);
  else bindText(p, key);
  return p;
}

function renderSessionList() {
  if (state.renaming) return; // finishing the rename renders the list
  const nodes = [];
  let group = null;
  for (const s of state.sessions) {
    const g = dateGroup(s.updated_at || s.created_at);
    if (g !== group) {
      group = g;
      const h = document.createElement("h2");
      h.className = "session-group";
      bindText(h, g);
      nodes.push(h);
    }
    nodes.push(sessionItem(s));
  }
  const status = state.listStatus;
  if (status === "loading") {
    nodes.push(statusLine("sessions.loading"));
  } else if (status === "unavailable") {
    nodes.push(statusLine("sessions.unavailable"));
  } else if (status === "noaccess") {
    nodes.push(statusLine("sessions.noaccess"));
  } else if (status === "error") {
    nodes.push(statusLine("sessions.error", state.listError));
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "btn btn-ghost btn-small";
    retry.dataset.testid = "sessions-retry";
    bindText(retry, "retry");
    retry.addEventListener("click", () => loadSessions({ reset: true }));
    nodes.push(retry);
  } else if (status === "ready" && !state.sessions.length) {
    nodes.push(statusLine(can("chat:write") ? "sessions.empty.write" : "sessions.empty"));
  }
  if (status === "ready" && state.nextCursor) {
    const more = document.createElement("button");
    more.type = "button";
    more.className = "btn btn-ghost btn-small load-more";
    more.dataset.testid = "load-more";
    bindText(more, "sessions.more");
    more.addEventListener("click", () => loadSessions());
    nodes.push(more);
  }
  el.sessionList.replaceChildren(...nodes);
}

function sessionItem(s) {
  const item = document.createElement("div");
  item.className = "session-item";
  item.dataset.testid = "session-item";
  item.dataset.sessionId = s.id;
  const active = state.current && state.current.id === s.id;
  if (active) item.classList.add("active");

  const open = document.createElement("button");
  open.type = "button";
  open.className = "session-open";
  open.dataset.action = "open";
  if (active) open.setAttribute("aria-current", "page");
  if (s.updated_at) open.title = formatDate(s.updated_at);
  const title = document.createElement("span");
  title.className = "session-title";
  title.dataset.testid = "session-title";
  title.textContent = displayTitle(s);
  open.append(title);
  const meta = [];
  if (s.team && !state.filter) meta.push(s.team);
  if (state.me && s.owner && s.owner !== state.me.sub) meta.push(t("owner.other", { owner: s.owner }));
  if (meta.length) {
    const m = document.createElement("span");
    m.className = "session-meta";
    m.textContent = meta.join(" · ");
    open.append(m);
  }
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
function markActive() {
  const id = state.current ? state.current.id : null;
  let found = !id;
  for (const item of el.sessionList.querySelectorAll(".session-item")) {
    const active = item.dataset.sessionId === id;
    found = found || active;
    item.classList.toggle("active", active);
    const open = item.querySelector(".session-open");
    if (active) open.setAttribute("aria-current", "page");
    else open.removeAttribute("aria-current");
  }
  if (!found) renderSessionList();
}

function sessionById(id) {
  return state.sessions.find((s) => s.id === id) || (state.current && state.current.id === id ? state.current : null);
}

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
  }
  else if (action === "rename") startRename(item, s);
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

function startRename(item, s) {
  if (state.renaming) return;
  state.renaming = s.id;
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
    state.renaming = null;
    if (save && title && title !== s.title && title !== displayTitle(s)) {
      const before = s.title;
      s.title = title;
      renderSessionList();
      renderHeader();
      try {
        const updated = await API.api("PATCH", `/v1/sessions/${enc(s.id)}`, { title });
        if (updated && typeof updated === "object") updateSession(updated);
      } catch (err) {
        s.title = before;
        toastError("rename.failed", err);
      }
    }
    renderSessionList();
    renderHeader();
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

/** Merge a session object from the server into the list and the open chat. */
function updateSession(fresh) {
  const listed = state.sessions.find((s) => s.id === fresh.id);
  if (listed) Object.assign(listed, withoutMessages(fresh));
  if (state.current && state.current.id === fresh.id) Object.assign(state.current, withoutMessages(fresh));
}

function withoutMessages(s) {
  const { messages, ...rest } = s;
  return rest;
}

let confirmResolve = null;
function ask(bodyKey, vars) {
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
  state.sessions = state.sessions.filter((x) => x.id !== s.id);
  if (state.current && state.current.id === s.id) startNewChat({ focus: false });
  renderSessionList();
  toast(t("delete.done"));
}

// --- models -----------------------------------------------------------------

async function loadModels() {
  if (!can("chat:write")) return;
  renderModelPicker(true);
  removeNotice("models");
  try {
    const body = await API.api("GET", "/v1/models");
    const ids = (Array.isArray(body && body.data) ? body.data : []).map((m) => m && m.id).filter((id) => typeof id === "string" && id);
    state.models = [...new Set(ids)];
    if (!state.models.includes(state.model)) state.model = state.models[0] || null;
  } catch (err) {
    state.models = [];
    state.model = null;
    addNotice("models", "model.unavailable", err);
  }
  renderModelPicker(false);
}

function renderModelPicker(loading) {
  const options = state.models.map((id) => {
    const opt = document.createElement("option");
    opt.value = id;
    opt.textContent = id;
    return opt;
  });
  if (!options.length) {
    const opt = document.createElement("option");
    opt.value = "";
    opt.textContent = t(loading ? "model.loading" : "model.default");
    options.push(opt);
  }
  el.modelPicker.replaceChildren(...options);
  el.modelPicker.value = state.model || "";
  el.modelPicker.disabled = state.models.length === 0;
}

// --- the conversation ---------------------------------------------------------

function renderHeader() {
  let title;
  if (state.current) title = displayTitle(state.current);
  else if (!state.historyAvailable) title = t("temporary.title");
  else title = t("newchat");
  el.chatTitle.textContent = title;
  document.title = `${title} · Clawdbot`;
  applyScopes();
  updateComposerState();
}

function updateEmpty() {
  el.empty.hidden = el.messages.childElementCount > 0;
}

function nearBottom() {
  const c = el.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 120;
}

function scrollToBottom() {
  el.conversation.scrollTop = el.conversation.scrollHeight;
}

function startNewChat({ focus = true } = {}) {
  stopStreaming();
  state.openGen++;
  state.current = null;
  state.fresh = false;
  state.transcript = [];
  el.conversation.classList.remove("loading");
  el.messages.replaceChildren();
  updateEmpty();
  renderHeader();
  renderSessionList();
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  if (focus && can("chat:write")) el.composer.focus();
}

async function createSession() {
  const body = { title: DEFAULT_TITLE };
  if (state.filter) body.team = state.filter;
  const s = await API.api("POST", "/v1/sessions", body);
  if (!s || !s.id) throw new API.ApiError(500, { message: "no session in the answer" });
  state.sessions = [s, ...state.sessions.filter((x) => x.id !== s.id)];
  if (state.listStatus !== "ready") state.listStatus = "ready";
  return s;
}

async function onNewChat() {
  closeSidebarOnMobile();
  if (state.current && state.fresh && !state.streaming) {
    el.composer.focus();
    return;
  }
  if (!state.historyAvailable) {
    startNewChat();
    return;
  }
  el.newSession.disabled = true;
  try {
    const s = await createSession();
    showSession(s, []);
    state.fresh = true;
    el.composer.focus();
  } catch (err) {
    if (err instanceof API.ApiError && err.status === 404) {
      state.historyAvailable = false;
      state.listStatus = "unavailable";
      startNewChat();
    } else {
      toastError("error.session.create", err);
    }
  } finally {
    el.newSession.disabled = false;
  }
}

/** Make s the open chat and show messages. */
function showSession(s, messages) {
  stopStreaming();
  state.openGen++;
  state.current = s;
  state.fresh = false;
  state.transcript = [];
  el.conversation.classList.remove("loading");
  el.messages.replaceChildren();
  for (const m of messages) appendStored(m);
  updateEmpty();
  renderHeader();
  markActive();
  history.replaceState(null, "", `#s=${enc(s.id)}`);
  requestAnimationFrame(scrollToBottom);
}

async function openSession(id) {
  closeSidebarOnMobile();
  const known = sessionById(id) || { id, title: "" };
  showSession(known, []);
  const gen = state.openGen;
  el.conversation.classList.add("loading");
  try {
    const full = await API.api("GET", `/v1/sessions/${enc(id)}`);
    if (gen !== state.openGen) return;
    updateSession(full);
    showSession(state.current || known, Array.isArray(full.messages) ? full.messages : []);
  } catch (err) {
    if (gen !== state.openGen) return;
    if (err instanceof API.ApiError && err.status === 404) {
      state.sessions = state.sessions.filter((s) => s.id !== id);
      startNewChat({ focus: false });
      toast(t("error.session"), { error: true });
    } else {
      el.conversation.classList.remove("loading");
      appendError("error.session.load", err);
    }
  }
}

function appendStored(m) {
  if (!m || typeof m !== "object") return;
  if (m.role === "user") appendUser(m.content);
  else if (m.role === "assistant") {
    const view = new AssistantView(false);
    view.set(textOf(m.content), typeof m.reasoning_content === "string" ? m.reasoning_content : "");
    view.finish(m.incomplete ? { incomplete: true } : {});
  }
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

function appendUser(content) {
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
      if (/^data:image\/[a-z0-9.+-]+;base64,/i.test(url)) {
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
  el.messages.append(article);
  updateEmpty();
  return article;
}

function appendError(key, err) {
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
  el.messages.append(article);
  updateEmpty();
  scrollToBottom();
}

/** Splits a leading <think>…</think> block (some models put it in content). */
function splitThink(text) {
  const m = /^\s*<think>([\s\S]*?)(?:<\/think>\s*|$)([\s\S]*)$/.exec(text);
  if (!m) return { reasoning: "", content: text };
  return { reasoning: m[1], content: m[2] };
}

/** One assistant message, rendered progressively while it streams. */
class AssistantView {
  constructor(streaming) {
    this.streaming = streaming;
    this.content = "";
    this.reasoning = "";
    this.pending = false;
    this.userToggled = false;
    this.started = Date.now();

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
    this.thinkingBody = document.createElement("div");
    this.thinkingBody.className = "thinking-body markdown";
    this.thinking.append(summary, this.thinkingBody);

    this.body = document.createElement("div");
    this.body.className = "markdown msg-content";
    this.body.dataset.testid = "message-content";

    this.footer = document.createElement("div");
    this.footer.className = "msg-footer";
    this.footer.hidden = true;

    body.append(this.thinking, this.body, this.footer);
    this.article.append(avatar, body);
    el.messages.append(this.article);
    updateEmpty();
    this.render();
  }

  append({ content, reasoning }) {
    this.content += content || "";
    this.reasoning += reasoning || "";
    this.schedule();
  }

  set(content, reasoning) {
    this.content = content || "";
    this.reasoning = reasoning || "";
    this.render();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    const run = () => {
      if (!this.pending) return;
      this.pending = false;
      this.render();
    };
    requestAnimationFrame(run);
    setTimeout(run, 250); // background tabs do not run animation frames
  }

  parts() {
    const split = splitThink(this.content);
    return { content: split.content, reasoning: this.reasoning + split.reasoning };
  }

  render() {
    this.pending = false;
    const stick = nearBottom();
    const { content, reasoning } = this.parts();
    if (reasoning.trim()) {
      this.thinking.hidden = false;
      const thinkingNow = this.streaming && !content.trim();
      bindText(this.summaryLabel, thinkingNow ? "thinking" : "thought");
      this.thinking.classList.toggle("active", thinkingNow);
      if (!this.userToggled) this.thinking.open = thinkingNow;
      renderInto(this.thinkingBody, reasoning);
    }
    if (content) renderInto(this.body, content);
    else this.body.replaceChildren();
    if (this.streaming && !content && !reasoning.trim()) {
      const dots = document.createElement("span");
      dots.className = "typing";
      dots.dataset.testid = "typing";
      dots.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));
      this.body.append(dots);
    }
    this.article.classList.toggle("streaming", this.streaming);
    if (stick) scrollToBottom();
  }

  /** outcome: {} finished, {stopped}, {incomplete}, or {error}. */
  finish(outcome = {}) {
    this.streaming = false;
    this.render();
    this.footer.replaceChildren();
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
    if (!this.content && !this.reasoning && outcome.error === undefined && !outcome.stopped && !outcome.incomplete) {
      this.body.replaceChildren();
    }
  }
}

function stopStreaming() {
  if (state.streaming) state.streaming.controller.abort();
}

async function sendMessage() {
  if (state.streaming || state.sending || !can("chat:write")) return;
  const text = el.composer.value.trim();
  const images = state.attachments.slice();
  if (!text && !images.length) return;
  state.sending = true;
  try {
    await send(text, images);
  } finally {
    state.sending = false;
  }
}

async function send(text, images) {
  let session = state.current;
  if (!session && state.historyAvailable) {
    el.send.disabled = true;
    const gen = state.openGen;
    try {
      session = await createSession();
      renderSessionList();
      if (gen !== state.openGen) {
        updateComposerState(); // the user moved on; the text stays in the composer
        return;
      }
      state.current = session;
      state.fresh = true;
      history.replaceState(null, "", `#s=${enc(session.id)}`);
      renderSessionList();
      renderHeader();
    } catch (err) {
      if (err instanceof API.ApiError && err.status === 404) {
        state.historyAvailable = false;
        state.listStatus = "unavailable";
        renderSessionList();
        renderHeader();
      } else {
        appendError("error.session.create", err);
        updateComposerState();
        return;
      }
    }
  }

  const content = images.length
    ? [...(text ? [{ type: "text", text }] : []), ...images.map((img) => ({ type: "image_url", image_url: { url: img.url } }))]
    : text;
  const turn = { role: "user", content };
  const body = { stream: true, messages: session ? [turn] : [...state.transcript, turn] };
  if (state.model) body.model = state.model;
  if (session) body.session_id = session.id;

  const gen = state.openGen;
  const firstTurn = !!session && state.fresh;
  state.fresh = false;
  el.composer.value = "";
  autosize();
  state.attachments = [];
  renderAttachments();
  appendUser(content);
  scrollToBottom();

  const view = new AssistantView(true);
  const controller = new AbortController();
  state.streaming = { controller, view };
  updateComposerState();

  let outcome = {};
  try {
    const result = await API.streamChat(body, { signal: controller.signal, onDelta: (d) => view.append(d) });
    if (!result.done) outcome = { error: "closed" };
  } catch (err) {
    outcome = controller.signal.aborted ? { stopped: true } : { error: err };
  }
  view.finish(outcome);
  if (state.streaming && state.streaming.controller === controller) state.streaming = null;
  updateComposerState();

  if (!session) {
    if (gen !== state.openGen) return; // that temporary chat is gone
    state.transcript.push(turn);
    if (view.content && outcome.error === undefined) state.transcript.push({ role: "assistant", content: view.parts().content });
  } else if (outcome.error === undefined || outcome.error === "closed" || outcome.error instanceof API.StreamError) {
    touchSession(session, firstTurn ? text : null);
  }
}

/** The session got a message: to the top of the list, titled after its first message. */
async function touchSession(session, firstText) {
  const listed = state.sessions.find((s) => s.id === session.id) || session;
  listed.updated_at = new Date().toISOString();
  state.sessions = [listed, ...state.sessions.filter((s) => s.id !== session.id)];
  renderSessionList();
  const title = firstText && firstText.replace(/\s+/g, " ").trim();
  if (title && (listed.title || "").trim() === DEFAULT_TITLE && can("chat:write")) {
    const short = title.length > AUTO_TITLE_LENGTH ? `${title.slice(0, AUTO_TITLE_LENGTH - 1)}…` : title;
    try {
      const updated = await API.api("PATCH", `/v1/sessions/${enc(session.id)}`, { title: short });
      updateSession(updated && typeof updated === "object" ? updated : { id: session.id, title: short });
      renderSessionList();
      renderHeader();
    } catch {
      /* the chat keeps its default title */
    }
  }
}

async function clearContext() {
  if (!can("chat:write")) return;
  stopStreaming();
  if (!state.current) {
    state.transcript = [];
    el.messages.replaceChildren();
    updateEmpty();
    updateComposerState();
    toast(t("clear.done"));
    return;
  }
  const id = state.current.id;
  el.clearContext.disabled = true;
  try {
    await API.api("POST", "/v1/chat/completions", { session_id: id, messages: [] });
  } catch (err) {
    toastError("clear.failed", err);
    updateComposerState();
    return;
  }
  await openSession(id);
  toast(t("clear.done"));
}

// --- the composer ---------------------------------------------------------------

function updateComposerState() {
  const streaming = !!state.streaming;
  el.send.hidden = streaming;
  el.stop.hidden = !streaming;
  el.send.disabled = !(el.composer.value.trim() || state.attachments.length);
  el.clearContext.disabled = streaming || (!state.current && el.messages.childElementCount === 0);
}

function autosize() {
  el.composer.style.height = "auto";
  el.composer.style.height = `${Math.min(el.composer.scrollHeight, 220)}px`;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  if (!can("chat:write")) return;
  for (const file of Array.from(files || [])) {
    const name = file.name || t("image");
    if (!ACCEPTED_IMAGES.test(file.type)) {
      toast(t("attach.notimage", { name }), { error: true });
      continue;
    }
    if (file.size > MAX_IMAGE_MB * 1000 * 1000) {
      toast(t("attach.toolarge", { name, max: MAX_IMAGE_MB }), { error: true });
      continue;
    }
    if (state.attachments.length >= MAX_IMAGES) {
      toast(t("attach.toomany", { max: MAX_IMAGES }), { error: true });
      break;
    }
    let url;
    try {
      url = await readAsDataURL(file);
    } catch {
      toast(t("attach.readfailed", { name }), { error: true });
      continue;
    }
    if (!/^data:image\/[a-z0-9.+-]+;base64,/i.test(url)) {
      toast(t("attach.notimage", { name }), { error: true });
      continue;
    }
    state.attachments.push({ id: ++state.attachmentSeq, name, url });
  }
  renderAttachments();
  updateComposerState();
  el.composer.focus();
}

function renderAttachments() {
  const chips = state.attachments.map((a) => {
    const chip = document.createElement("div");
    chip.className = "chip";
    chip.dataset.testid = "attachment";
    chip.title = a.name;
    const img = document.createElement("img");
    img.src = a.url;
    img.alt = a.name;
    img.className = "chip-thumb";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.dataset.testid = "attachment-remove";
    remove.dataset.i18nAriaLabel = "attach.remove";
    remove.dataset.i18nTitle = "attach.remove";
    remove.setAttribute("aria-label", t("attach.remove"));
    remove.title = t("attach.remove");
    remove.append(icon("x"));
    remove.addEventListener("click", () => {
      state.attachments = state.attachments.filter((x) => x.id !== a.id);
      renderAttachments();
      updateComposerState();
    });
    chip.append(img, remove);
    return chip;
  });
  el.attachments.replaceChildren(...chips);
  el.attachments.hidden = chips.length === 0;
}

function hasFiles(e) {
  return !!e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
}

// --- wiring -----------------------------------------------------------------

function renderLanguageSwitch() {
  el.langSwitch.replaceChildren(
    ...LANGUAGES.map((l) => {
      const opt = document.createElement("option");
      opt.value = l.code;
      opt.textContent = l.label;
      return opt;
    }),
  );
  el.langSwitch.value = getLanguage();
}

function rerender() {
  el.langSwitch.value = getLanguage();
  retranslateErrors();
  if (el.app.hidden) return;
  renderTeamFilter();
  renderSessionList();
  renderModelPicker(false);
  renderHeader();
}

function wire() {
  el.signinButton.addEventListener("click", () => window.location.assign(API.loginUrl()));
  el.signinRetry.addEventListener("click", () => startSession());
  el.signout.addEventListener("click", async () => {
    stopStreaming();
    el.signout.disabled = true;
    let url = null;
    try {
      url = await API.logout();
    } catch {
      url = null;
    } finally {
      el.signout.disabled = false;
    }
    if (url) window.location.assign(url);
    else showSignin("signin.signedout");
  });
  el.langSwitch.addEventListener("change", () => setLanguage(el.langSwitch.value));
  onLanguageChange(rerender);

  el.sidebarToggle.addEventListener("click", () => setSidebarOpen(!el.app.classList.contains("sidebar-open")));
  el.sidebarClose.addEventListener("click", () => setSidebarOpen(false));
  el.backdrop.addEventListener("click", () => setSidebarOpen(false));
  mobile.addEventListener("change", () => setSidebarOpen(!mobile.matches));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && mobile.matches && el.app.classList.contains("sidebar-open") && !el.confirmDialog.open) {
      setSidebarOpen(false);
    }
  });

  el.newSession.addEventListener("click", onNewChat);
  el.teamFilter.addEventListener("change", () => {
    state.filter = el.teamFilter.value;
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

  el.modelPicker.addEventListener("change", () => {
    state.model = el.modelPicker.value || null;
  });
  el.clearContext.addEventListener("click", clearContext);

  el.composer.addEventListener("input", () => {
    autosize();
    updateComposerState();
  });
  el.composer.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      sendMessage();
    }
  });
  el.composer.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []).filter((f) => /^image\//.test(f.type));
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  el.send.addEventListener("click", sendMessage);
  el.stop.addEventListener("click", stopStreaming);
  el.attach.addEventListener("click", () => el.fileInput.click());
  el.fileInput.addEventListener("change", () => {
    addFiles(el.fileInput.files);
    el.fileInput.value = "";
  });

  let dragDepth = 0;
  el.composerBox.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth++;
    el.composerBox.classList.add("dragging");
  });
  el.composerBox.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  el.composerBox.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.composerBox.classList.remove("dragging");
  });
  el.composerBox.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    el.composerBox.classList.remove("dragging");
    addFiles(e.dataTransfer && e.dataTransfer.files);
  });
  // A file dropped anywhere else must not replace the page.
  window.addEventListener("dragover", (e) => hasFiles(e) && e.preventDefault());
  window.addEventListener("drop", (e) => hasFiles(e) && e.preventDefault());

  el.messages.addEventListener("click", (e) => {
    const copy = e.target.closest("button.code-copy");
    if (copy) copyCode(copy);
  });

  API.onAuthLost(() => showSignin("signin.expired"));
}

function main() {
  setLanguage(detectLanguage(), { remember: false });
  renderLanguageSwitch();
  wire();
  applyI18n(document);
  startSession();
}

main();
