// What is left of the user's quota, from the last reply's headers
// (x-clawdbot-quota-remaining-tokens, -remaining-requests, -reset): a small
// line under the composer.  Shown only when a quota applies.

import { el } from "./dom.js";
import { getLanguage, t } from "./i18n.js";
import { state, update, view } from "./store.js";

const UNITS = [
  ["day", 86400],
  ["hour", 3600],
  ["minute", 60],
  ["second", 1],
];
const REPAINT = 30000; // ms: the "resets in" keeps roughly current

/**
 * A reply ended whose call's quota headers said quota (api.js quotaFrom);
 * usage is the reply's token counts if the server sent them.  The
 * remaining requests already count the call itself; the remaining tokens
 * do not (they are known only when it ends), so the reply's are taken off.
 */
export function noteQuota(quota, usage) {
  if (!quota) return;
  const spent = usage && Number.isFinite(usage.total_tokens) ? usage.total_tokens : 0;
  update({
    quota: {
      tokens: quota.tokens === null ? null : Math.max(0, quota.tokens - spent),
      requests: quota.requests,
      resetAt: quota.reset === null ? null : Date.now() + quota.reset * 1000,
    },
  });
}

/** seconds as people say it, in the UI language: "5 hr, 3 min", "5小时3分钟". */
export function humanDuration(seconds) {
  const lang = getLanguage();
  let rest = Math.max(1, Math.round(seconds));
  const parts = [];
  for (const [unit, size] of UNITS) {
    if (rest >= size || (unit === "second" && !parts.length)) {
      const n = Math.floor(rest / size);
      rest -= n * size;
      if (n) parts.push(new Intl.NumberFormat(lang, { style: "unit", unit, unitDisplay: "short" }).format(n));
    } else if (parts.length) {
      break; // "2 days, 4 hr", never "2 days, 0 hr, 3 min"
    }
    if (parts.length === 2) break;
  }
  try {
    return new Intl.ListFormat(lang, { style: "narrow", type: "unit" }).format(parts);
  } catch {
    return parts.join(" ");
  }
}

function paintQuota({ quota }) {
  const now = Date.now();
  if (!quota || (quota.resetAt !== null && quota.resetAt <= now)) {
    // Nothing known, or the window began again since: what was left is out of date.
    el.quota.hidden = true;
    el.quota.textContent = "";
    el.quota.removeAttribute("title");
    return;
  }
  const number = new Intl.NumberFormat(getLanguage());
  const parts = [];
  if (quota.tokens !== null) parts.push(t("quota.tokens", { n: number.format(quota.tokens) }));
  if (quota.requests !== null) parts.push(t("quota.requests", { n: number.format(quota.requests) }));
  if (quota.resetAt !== null) {
    parts.push(t("quota.reset", { when: humanDuration((quota.resetAt - now) / 1000) }));
    el.quota.title = new Intl.DateTimeFormat(getLanguage(), { dateStyle: "medium", timeStyle: "short" }).format(new Date(quota.resetAt));
  } else {
    el.quota.removeAttribute("title");
  }
  el.quota.textContent = parts.join(" · ");
  el.quota.hidden = false;
}

export function install() {
  view(paintQuota, (s) => [s.quota, s.lang]);
  // Repaint now and then while shown, for the "resets in"; nothing to do when hidden.
  setInterval(() => {
    if (state.quota && state.screen === "app") paintQuota(state);
  }, REPAINT);
}
