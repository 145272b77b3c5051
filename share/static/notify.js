// Errors in words, notices above the conversation, and toasts.

import * as API from "./api.js";
import { el } from "./dom.js";
import { bindText, t } from "./i18n.js";
import { icon } from "./render.js";
import { state, update, view } from "./store.js";

const ERROR_KEYS = {
  AUTH_MISSING_TOKEN: "error.auth",
  AUTH_INVALID_TOKEN: "error.auth",
  AUTH_INSUFFICIENT_SCOPE: "error.scope",
  RATE_LIMITED: "error.rate",
  GATEWAY_BUSY: "error.busy",
  UPSTREAM_UNAVAILABLE: "error.upstream",
  UPSTREAM_TIMEOUT: "error.timeout",
  MODEL_NOT_FOUND: "error.model",
  PAYLOAD_TOO_LARGE: "error.toolarge",
  QUOTA_EXCEEDED: "error.quota",
};

/** A sentence for err, in the current language. */
function errorMessage(err) {
  if (err instanceof API.NetworkError) return t("error.network");
  if (err === "closed") return t("error.closed");
  if (!(err instanceof API.ApiError)) return String((err && err.message) || err);
  const detail = err.details ? ` (${err.details})` : "";
  const known = ERROR_KEYS[err.code];
  if (known) return t(known) + detail;
  if (err.status === 404 && err.code === "NOT_FOUND" && !(err instanceof API.StreamError)) return t("error.unavailable");
  return (err.message || t("error.title")) + detail;
}

/** key's own sentence for err's code (e.g. "model.unavailable.UPSTREAM_UNAVAILABLE"), if it has one. */
function keyFor(key, err) {
  const own = key && err instanceof API.ApiError ? `${key}.${err.code}` : "";
  return own && t(own) !== own ? own : key;
}

/** Fill node with an error sentence (wrapped in the string key, if any); kept translated. */
export function bindError(node, key, err) {
  node.classList.add("i18n-error");
  node._error = { key, err };
  node.textContent = key ? t(keyFor(key, err), { msg: errorMessage(err) }) : errorMessage(err);
  return node;
}

function retranslateErrors() {
  for (const node of document.querySelectorAll(".i18n-error")) {
    const { key, err } = node._error || {};
    if (err !== undefined) node.textContent = key ? t(keyFor(key, err), { msg: errorMessage(err) }) : errorMessage(err);
  }
}

let toastTimer = null;

export function toast(text, { error = false } = {}) {
  const shown = { text, error };
  update({ toast: shown });
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    if (state.toast === shown) update({ toast: null });
  }, error ? 6000 : 2500);
}

export function toastError(key, err) {
  toast(t(key, { msg: errorMessage(err) }), { error: true });
}

/** A notice (key, with err's sentence if given) that stays until dismissed or removed. */
export function addNotice(id, key, err) {
  update({ notices: [...state.notices.filter((n) => n.id !== id), { id, key, err }] });
}

export function removeNotice(id) {
  if (state.notices.some((n) => n.id === id)) update({ notices: state.notices.filter((n) => n.id !== id) });
}

function noticeNode({ id, key, err }) {
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
  close.addEventListener("click", () => removeNotice(id));
  notice.append(icon("alert", "notice-icon"), text, close);
  return notice;
}

export function install() {
  view((s) => el.notices.replaceChildren(...s.notices.map(noticeNode)), (s) => [s.notices]);
  view(
    (s) => {
      el.toast.hidden = !s.toast;
      if (!s.toast) return;
      el.toast.textContent = s.toast.text;
      el.toast.classList.toggle("toast-error", s.toast.error);
    },
    (s) => [s.toast],
  );
  view(retranslateErrors, (s) => [s.lang]);
}
