// The page's elements, found once by id (index.html has them all).

export const $ = (id) => document.getElementById(id);
export const el = {
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
  openKeys: $("open-keys"),
  keysDialog: $("keys-dialog"),
  keysClose: $("keys-close"),
  keySecretBox: $("key-secret-box"),
  keySecret: $("key-secret"),
  keyCopy: $("key-copy"),
  keyCopyLabel: $("key-copy-label"),
  keyCopyHint: $("key-copy-hint"),
  keyForm: $("key-form"),
  keyName: $("key-name"),
  keyScopes: $("key-scopes"),
  keyTeamField: $("key-team-field"),
  keyTeam: $("key-team"),
  keyExpiry: $("key-expiry"),
  keyFormError: $("key-form-error"),
  keyCreate: $("key-create"),
  keyList: $("key-list"),
  revokeDialog: $("revoke-dialog"),
  revokeBody: $("revoke-body"),
  revokeOk: $("revoke-ok"),
  revokeCancel: $("revoke-cancel"),
  quota: $("quota"),
  toast: $("toast"),
};

/** Phone width: the session list is a drawer. */
export const mobile = window.matchMedia("(max-width: 768px)");

/** parent's children are nodes, in order. */
export function sameChildren(parent, nodes) {
  const shown = parent.childNodes;
  return shown.length === nodes.length && nodes.every((node, i) => shown[i] === node);
}

/** Make parent's children nodes, moving only what is out of place (kept nodes keep focus, hover, selection). */
export function syncChildren(parent, nodes) {
  nodes.forEach((node, i) => {
    if (parent.childNodes[i] !== node) parent.insertBefore(node, parent.childNodes[i] || null);
  });
  while (parent.childNodes.length > nodes.length) parent.lastChild.remove();
}

// --- look and accessibility ---------------------------------------------------------

el.liveRegion = $("live-region");
el.scrollBottom = $("scroll-bottom");
el.themeToggle = $("theme-toggle");

let announceTimer = 0;

/**
 * Say text to a screen reader, through the page's polite live region (a
 * finished reply, an error; never each streamed token).  Emptied first, so
 * the same sentence twice is announced twice.
 */
export function announce(text) {
  const said = String(text ?? "").replace(/\s+/g, " ").trim();
  clearTimeout(announceTimer);
  el.liveRegion.textContent = "";
  if (!said) return;
  announceTimer = setTimeout(() => {
    el.liveRegion.textContent = said;
  }, 60);
}

// The colour theme: "system" (prefers-color-scheme), "light" or "dark",
// remembered in localStorage.  app.css keys the dark palette on
// <html data-theme>; highlight.js's two stylesheets, the color-scheme meta
// and the theme-color metas follow by their media and content.

const THEME_KEY = "clawdbot.theme";
const THEMES = ["system", "light", "dark"];
const SYSTEM_MEDIA = {
  "hljs-light": "not all and (prefers-color-scheme: dark)",
  "hljs-dark": "(prefers-color-scheme: dark)",
  "theme-color-light": "(prefers-color-scheme: light)",
  "theme-color-dark": "(prefers-color-scheme: dark)",
};

function storedTheme() {
  try {
    const saved = window.localStorage.getItem(THEME_KEY);
    return THEMES.includes(saved) ? saved : "system";
  } catch {
    return "system";
  }
}

/** Apply a theme; with remember, keep the choice for the next visit. */
function applyTheme(theme, { remember = false } = {}) {
  if (!THEMES.includes(theme)) theme = "system";
  const root = document.documentElement;
  if (theme === "system") delete root.dataset.theme;
  else root.dataset.theme = theme;
  for (const [id, media] of Object.entries(SYSTEM_MEDIA)) {
    const node = $(id);
    if (!node) continue;
    const light = id.endsWith("-light");
    node.media = theme === "system" ? media : (theme === "light") === light ? "all" : "not all";
  }
  const scheme = $("meta-color-scheme");
  if (scheme) scheme.content = theme === "system" ? "light dark" : theme;
  if (el.themeToggle) el.themeToggle.value = theme;
  if (remember) {
    try {
      if (theme === "system") window.localStorage.removeItem(THEME_KEY);
      else window.localStorage.setItem(THEME_KEY, theme);
    } catch {
      /* storage unavailable: the choice lasts for this page */
    }
  }
}

applyTheme(storedTheme()); // as early as this module runs: no flash of the other theme

// The "scroll to the bottom" button: shown while the conversation is
// scrolled up more than SCROLL_SHOW_AFTER pixels from its end.

const SCROLL_SHOW_AFTER = 200;

function paintScrollButton() {
  const c = el.conversation;
  const away = c.scrollHeight - c.scrollTop - c.clientHeight;
  const show = away > SCROLL_SHOW_AFTER && !el.app.hidden;
  if (el.scrollBottom.hidden === show) el.scrollBottom.hidden = !show;
}

/** Wire the theme select, the scroll button, and Esc (the Stop button's action). */
export function installLook() {
  el.themeToggle.value = storedTheme();
  el.themeToggle.addEventListener("change", () => applyTheme(el.themeToggle.value, { remember: true }));
  window.addEventListener("storage", (e) => {
    if (e.key === THEME_KEY) applyTheme(storedTheme());
  });

  el.conversation.addEventListener("scroll", paintScrollButton, { passive: true });
  const resized = new ResizeObserver(paintScrollButton);
  resized.observe(el.conversation);
  resized.observe(el.messages);
  el.scrollBottom.addEventListener("click", () => {
    el.conversation.scrollTo({ top: el.conversation.scrollHeight, behavior: "smooth" });
  });

  // Esc stops a streaming reply, unless a dialog (or anything else) handled it.
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || e.defaultPrevented || e.isComposing) return;
    if (document.querySelector("dialog[open]")) return;
    if (mobile.matches && el.app.classList.contains("sidebar-open")) return; // it closes the drawer
    if (!el.stop.hidden && !el.stop.disabled) el.stop.click();
  });
}
