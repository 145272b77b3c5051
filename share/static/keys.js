// The "API keys" panel: the user's keys (GET /v1/keys, never a secret),
// creating one (POST /v1/keys) and revoking one (DELETE /v1/keys/{id}).
//
// A new key's secret is shown once, in the panel's read-only field, and
// nowhere else: not in the state, not in storage, not in an attribute.
// Closing the panel empties the field, and the page has no copy left.

import * as API from "./api.js";
import { el, mobile } from "./dom.js";
import { bindText, formatDate, t } from "./i18n.js";
import { bindError } from "./notify.js";
import { icon } from "./render.js";
import { closeSidebarOnMobile } from "./sessions.js";
import { initialState, state, update, view } from "./store.js";

const enc = encodeURIComponent;
const COPIED_FOR = 1800; // ms the Copy button says "Copied"

let listGen = 0; // the list load whose answer counts
let creating = false;
let copyTimer = null;

function setKeys(patch) {
  update({ keys: { ...state.keys, ...patch } });
}

async function loadKeys() {
  const gen = ++listGen;
  setKeys({ status: "loading", error: null });
  try {
    const body = await API.api("GET", "/v1/keys");
    if (gen !== listGen) return;
    const data = (Array.isArray(body && body.data) ? body.data : []).filter((k) => k && typeof k.id === "string");
    setKeys({ status: "ready", data, error: null });
  } catch (err) {
    if (gen !== listGen) return;
    // 404: API keys are turned off here (or this gateway has none).
    const off = err instanceof API.ApiError && err.status === 404;
    setKeys({ status: off ? "off" : "error", data: [], error: err });
  }
}

// --- the dialog ---------------------------------------------------------------------

function openKeys() {
  if (state.screen !== "app") return;
  closeSidebarOnMobile();
  forgetSecret();
  resetForm();
  setKeys({ revokeError: null });
  if (!el.keysDialog.open) el.keysDialog.showModal();
  if (!mobile.matches) el.keyName.focus(); // no keyboard popping up over the list on a phone
  loadKeys();
}

function closeKeys() {
  // Now, not in the close event (queued for later: the dialog is already hidden then).
  forgetSecret();
  if (el.revokeDialog.open) el.revokeDialog.close("cancel");
  if (el.keysDialog.open) el.keysDialog.close();
}

/** The secret shown once: gone from the field, and so from the page. */
function forgetSecret() {
  el.keySecret.value = "";
  el.keySecretBox.hidden = true;
  el.keyCopyHint.hidden = true;
  resetCopyLabel();
  const selection = window.getSelection && window.getSelection();
  if (selection) selection.removeAllRanges();
}

function showSecret(secret) {
  el.keySecret.value = secret;
  el.keySecretBox.hidden = false;
  el.keyCopyHint.hidden = true;
  resetCopyLabel();
  el.keySecretBox.scrollIntoView({ block: "nearest" });
  el.keyCopy.focus();
}

function resetCopyLabel() {
  clearTimeout(copyTimer);
  bindText(el.keyCopyLabel, "copy");
  el.keyCopy.classList.remove("copied");
  el.keyCopy.querySelector("use")?.setAttribute("href", "#i-copy");
}

/** Copy the secret; where the clipboard API is missing or refused, select it for the user to copy. */
async function copySecret() {
  const secret = el.keySecret.value;
  if (!secret) return;
  let ok = false;
  if (navigator.clipboard && navigator.clipboard.writeText) {
    try {
      await navigator.clipboard.writeText(secret);
      ok = true;
    } catch {
      ok = false;
    }
  }
  if (!ok) {
    el.keySecret.focus();
    el.keySecret.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
  }
  el.keyCopyHint.hidden = ok;
  if (!ok) return; // the key stays selected, with the hint to copy it
  bindText(el.keyCopyLabel, "copied");
  el.keyCopy.classList.add("copied");
  el.keyCopy.querySelector("use")?.setAttribute("href", "#i-check");
  clearTimeout(copyTimer);
  copyTimer = setTimeout(resetCopyLabel, COPIED_FOR);
}

// --- the form -----------------------------------------------------------------------

function option(value, key, text) {
  const opt = document.createElement("option");
  opt.value = value;
  if (key) bindText(opt, key);
  else opt.textContent = text;
  return opt;
}

/** A fresh form: no name, every scope of the user's checked, no team, 90 days. */
function resetForm() {
  el.keyName.value = "";
  const scopes = [...state.scopes].sort();
  el.keyScopes.replaceChildren(
    ...scopes.map((scope) => {
      const label = document.createElement("label");
      label.className = "check";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = scope;
      box.checked = true;
      box.dataset.testid = "key-scope";
      const name = document.createElement("span");
      name.textContent = scope;
      label.append(box, name);
      return label;
    }),
  );
  if (!scopes.length) {
    const none = document.createElement("p");
    none.className = "muted";
    el.keyScopes.append(bindText(none, "keys.scopes.none"));
  }
  const teams = Array.isArray(state.me && state.me.teams) ? state.me.teams.filter((x) => typeof x === "string" && x) : [];
  el.keyTeam.replaceChildren(option("", "keys.team.none"), ...teams.map((team) => option(team, null, team)));
  el.keyTeam.value = "";
  el.keyTeamField.hidden = !teams.length;
  el.keyExpiry.value = "90d";
  formError(null);
  setCreating(false);
}

function formError(key, err) {
  el.keyFormError.hidden = !key;
  if (!key) {
    el.keyFormError.textContent = "";
    el.keyFormError.classList.remove("i18n-error");
    delete el.keyFormError.dataset.i18n;
  } else if (err !== undefined) {
    delete el.keyFormError.dataset.i18n;
    bindError(el.keyFormError, key, err);
  } else {
    el.keyFormError.classList.remove("i18n-error");
    bindText(el.keyFormError, key);
  }
}

function setCreating(on) {
  creating = on;
  el.keyCreate.disabled = on;
  bindText(el.keyCreate, on ? "keys.creating" : "keys.create");
}

async function createKey(e) {
  e.preventDefault();
  if (creating) return;
  const name = el.keyName.value.trim();
  const scopes = [...el.keyScopes.querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value);
  if (!name) {
    formError("keys.name.missing");
    el.keyName.focus();
    return;
  }
  if (!scopes.length) {
    formError("keys.scopes.missing");
    return;
  }
  const body = { name, scopes, expires_in: el.keyExpiry.value };
  if (el.keyTeam.value) body.team = el.keyTeam.value;
  formError(null);
  forgetSecret();
  setCreating(true);
  const me = state.me;
  let secret = null;
  try {
    const made = await API.api("POST", "/v1/keys", body);
    secret = made && typeof made.key === "string" ? made.key : null;
  } catch (err) {
    if (el.keysDialog.open) formError("keys.create.failed", err);
    return;
  } finally {
    setCreating(false);
  }
  // Closed meanwhile, or someone else signed in: the key is listed, its secret is not shown.
  if (el.keysDialog.open && state.me === me && secret) {
    showSecret(secret);
    el.keyName.value = "";
  }
  secret = null;
  loadKeys();
}

// --- the list -----------------------------------------------------------------------

function statusLine(key, err) {
  const p = document.createElement("p");
  p.className = "keys-status";
  p.dataset.testid = "keys-status";
  if (err !== undefined) {
    p.classList.add("form-error");
    bindError(p, key, err);
  } else bindText(p, key);
  return p;
}

function keyItem(k) {
  const item = document.createElement("div");
  item.className = "key-item";
  item.dataset.testid = "key-item";
  item.dataset.keyId = k.id;

  const info = document.createElement("div");
  info.className = "key-info";
  const head = document.createElement("div");
  head.className = "key-head";
  const name = document.createElement("span");
  name.className = "key-item-name";
  name.dataset.testid = "key-item-name";
  name.textContent = String(k.name || "");
  const prefix = document.createElement("code");
  prefix.className = "key-prefix";
  prefix.dataset.testid = "key-prefix";
  prefix.textContent = `${k.prefix || ""}…`;
  head.append(name, prefix);

  const tags = document.createElement("div");
  tags.className = "key-tags";
  for (const scope of Array.isArray(k.scopes) ? k.scopes : []) {
    const b = document.createElement("span");
    b.className = "badge badge-plain";
    b.dataset.testid = "key-scope-badge";
    b.textContent = String(scope);
    tags.append(b);
  }
  if (k.team) {
    const b = document.createElement("span");
    b.className = "badge";
    b.dataset.testid = "key-team-badge";
    b.textContent = t("filter.team", { team: String(k.team) });
    tags.append(b);
  }

  const dates = document.createElement("div");
  dates.className = "key-dates muted";
  dates.dataset.testid = "key-dates";
  const when = [t("keys.created", { date: formatDate(k.created_at) }), t("keys.expires.on", { date: formatDate(k.expires_at) })];
  when.push(k.last_used_at ? t("keys.used", { date: formatDate(k.last_used_at) }) : t("keys.unused"));
  for (const text of when) {
    const span = document.createElement("span");
    span.textContent = text;
    dates.append(span);
  }
  info.append(head, tags, dates);

  const revoke = document.createElement("button");
  revoke.type = "button";
  revoke.className = "btn btn-ghost btn-small key-revoke";
  revoke.dataset.testid = "key-revoke";
  revoke.append(icon("trash"), bindText(document.createElement("span"), "keys.revoke"));
  revoke.addEventListener("click", () => revokeKey(k));
  item.append(info, revoke);
  return item;
}

function paintKeys({ keys }) {
  const nodes = [];
  if (keys.revokeError) nodes.push(statusLine("keys.revoke.failed", keys.revokeError));
  if (keys.status === "off") nodes.push(statusLine("keys.off"));
  else if (keys.status === "error") {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "btn btn-ghost btn-small";
    retry.dataset.testid = "keys-retry";
    bindText(retry, "retry");
    retry.addEventListener("click", loadKeys);
    nodes.push(statusLine("keys.error", keys.error), retry);
  } else if (keys.status === "loading" && !keys.data.length) nodes.push(statusLine("keys.loading"));
  else if (keys.status === "ready" && !keys.data.length) nodes.push(statusLine("keys.empty"));
  for (const k of keys.data) nodes.push(keyItem(k));
  el.keyList.replaceChildren(...nodes);
  el.keyList.setAttribute("aria-busy", String(keys.status === "loading"));
  el.keyForm.hidden = keys.status === "off";
}

let revokeResolve = null;

/** The revoke confirmation; resolves to whether it was confirmed. */
function askRevoke(k) {
  bindText(el.revokeBody, "keys.revoke.body", { name: String(k.name || ""), prefix: String(k.prefix || "") });
  return new Promise((resolve) => {
    revokeResolve = resolve;
    el.revokeDialog.returnValue = "";
    el.revokeDialog.showModal();
    el.revokeCancel.focus();
  });
}

function onRevokeClose() {
  const resolve = revokeResolve;
  revokeResolve = null;
  if (resolve) resolve(el.revokeDialog.returnValue === "confirm");
}

async function revokeKey(k) {
  if (!(await askRevoke(k))) return;
  setKeys({ revokeError: null });
  try {
    await API.api("DELETE", `/v1/keys/${enc(k.id)}`);
  } catch (err) {
    // 404: already gone (revoked elsewhere, or expired and swept).
    if (!(err instanceof API.ApiError && err.status === 404)) {
      setKeys({ revokeError: err });
      return;
    }
  }
  setKeys({ data: state.keys.data.filter((x) => x.id !== k.id) });
  loadKeys();
}

export function install() {
  view(paintKeys, (s) => [s.keys, s.lang]);
  // Signed out (or the session lost) with the panel open: close it, forgetting everything in it.
  view(
    (s) => {
      if (s.screen !== "app") {
        listGen++;
        closeKeys();
      }
    },
    (s) => [s.screen],
  );
  el.openKeys.addEventListener("click", openKeys);
  el.keysClose.addEventListener("click", closeKeys);
  // Escape cancels the dialog: the secret goes at once, before the dialog is hidden.
  el.keysDialog.addEventListener("cancel", forgetSecret);
  el.keysDialog.addEventListener("close", () => {
    forgetSecret();
    el.keyName.value = "";
    listGen++;
    update({ keys: initialState().keys });
  });
  el.keyForm.addEventListener("submit", createKey);
  el.keyCopy.addEventListener("click", copySecret);
  el.revokeOk.addEventListener("click", () => el.revokeDialog.close("confirm"));
  el.revokeCancel.addEventListener("click", () => el.revokeDialog.close("cancel"));
  el.revokeDialog.addEventListener("close", onRevokeClose);
  el.revokeDialog.addEventListener("click", (e) => {
    if (e.target === el.revokeDialog) el.revokeDialog.close("cancel");
  });
}
