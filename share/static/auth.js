// Signing in and out: the boot and sign-in screens, the signed-in user, and
// what the page does when the session token can no longer be renewed (the
// token itself, and its renewal, live in api.js).

import * as API from "./api.js";
import { mayLeave, saveDraftNow, stopStreaming } from "./chat.js";
import { loadModels } from "./composer.js";
import { openSession, startNewChat } from "./conversation.js";
import { $, el, mobile } from "./dom.js";
import { bindText } from "./i18n.js";
import { bindError } from "./notify.js";
import { loadSessions } from "./sessions.js";
import { clearDrafts, initialState, keepOnlyDraftsOf, rememberReturn, state, takeReturn, update, view } from "./store.js";

export async function startSession() {
  update({ screen: "boot" });
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

function showSignin(key, err, { retry = false } = {}) {
  resetApp();
  update({ screen: "signin", signin: { key, err, retry } });
}

/** Forget everything the signed-in user saw. */
function resetApp() {
  stopStreaming();
  update({ ...initialState(), listGen: state.listGen + 1, openGen: state.openGen + 1 });
}

function enterApp(me, mode) {
  const scopes = new Set(Array.isArray(me.scopes) ? me.scopes : []);
  const teams = [...scopes]
    .filter((s) => s.startsWith("history:") && s.length > 8)
    .map((s) => s.slice(8))
    .sort();
  update({
    me,
    mode,
    scopes,
    teams,
    filter: scopes.has("chat:read") || !teams.length ? "" : teams[0],
    screen: "app",
    sidebarOpen: !mobile.matches,
  });
  const link = /^#s=(.+)$/.exec(location.hash); // a link to a chat (#s=<id>)
  // After an expired sign-in: the chat that was open (its draft comes back with it).
  const back = takeReturn(me.sub);
  keepOnlyDraftsOf(me.sub); // another user's drafts do not stay in this tab
  const wanted = link ? decodeURIComponent(link[1]) : back && back.id;
  startNewChat({ focus: false });
  loadModels();
  loadSessions({ reset: true }).then(() => {
    if (wanted && !state.current && state.historyAvailable) openSession(wanted);
  });
}

async function signOut() {
  if (!(await mayLeave())) return; // a temporary chat's reply would be cut
  stopStreaming();
  if (state.me) clearDrafts(state.me.sub); // signing out on purpose: nothing of the user stays in this tab
  update({ signingOut: true });
  let url = null;
  try {
    url = await API.logout();
  } catch {
    url = null;
  } finally {
    update({ signingOut: false });
  }
  if (url) window.location.assign(url);
  else showSignin("signin.signedout");
}

function paintScreen({ screen }) {
  el.boot.hidden = screen !== "boot";
  el.signin.hidden = screen !== "signin";
  el.app.hidden = screen !== "app";
  const slot = screen === "app" ? $("lang-slot-app") : screen === "signin" ? $("lang-slot-signin") : null;
  if (slot) slot.append(el.langSwitch);
}

function paintSignin({ signin }) {
  const { key, err, retry } = signin || {};
  el.signinMessage.hidden = !key;
  if (key && err !== undefined) bindError(el.signinMessage, key, err);
  else if (key) {
    el.signinMessage.classList.remove("i18n-error");
    bindText(el.signinMessage, key);
  }
  el.signinRetry.hidden = !retry;
  // No sign-in on this server: a Sign in button would lead nowhere.
  el.signinButton.hidden = key === "signin.unconfigured";
}

function paintUser({ me, mode, signingOut }) {
  const who = me || {};
  const name = who.name || who.email || who.sub || "";
  el.userName.textContent = name;
  el.userDetail.textContent = who.name && who.email ? who.email : who.name || who.email ? who.sub || "" : "";
  el.userAvatar.textContent = (name.trim()[0] || "?").toUpperCase();
  el.userName.title = who.sub || "";
  el.signout.hidden = mode !== "sso";
  el.signout.disabled = signingOut;
  el.devBadge.hidden = mode !== "dev";
}

export function install() {
  view(paintScreen, (s) => [s.screen]);
  view(paintSignin, (s) => [s.signin]);
  view(paintUser, (s) => [s.me, s.mode, s.signingOut]);
  el.signinButton.addEventListener("click", () => window.location.assign(API.loginUrl()));
  el.signinRetry.addEventListener("click", () => startSession());
  el.signout.addEventListener("click", signOut);
  API.onAuthLost(() => {
    // The drafts stay (sessionStorage), and the open chat is reopened after signing in again.
    saveDraftNow();
    if (state.me) rememberReturn(state.me.sub, state.current && state.current.id);
    showSignin("signin.expired");
  });
}
