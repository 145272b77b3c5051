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
