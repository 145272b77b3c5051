// UI strings in English and Simplified Chinese.
//
// t(key, vars) looks a string up in the current language (falling back to
// English) and fills {name} placeholders from vars.  applyI18n(root) fills
// every element marked with data-i18n (text), data-i18n-title,
// data-i18n-placeholder and data-i18n-aria-label.  Strings are only ever
// set with textContent or as attribute values, never as HTML.

export const LANGUAGES = [
  { code: "en", label: "English" },
  { code: "zh-CN", label: "中文" },
];

const STRINGS = {
  en: {
    "boot.loading": "Loading…",
    "signin.title": "Welcome to Clawdbot",
    "signin.subtitle": "Sign in with your company account to start chatting.",
    "signin.button": "Sign in",
    "signin.expired": "Your session has ended. Please sign in again.",
    "signin.signedout": "You have signed out.",
    "signin.unreachable": "Can't reach the server. Check your connection and try again.",
    "signin.failed": "Signing in failed: {msg}",
    "signin.unconfigured": "Single sign-on doesn't seem to be set up on this server yet. Ask its administrator, or use the API with a bearer token.",
    "retry": "Retry",
    "signout": "Sign out",
    "devmode": "Dev mode",
    "devmode.title": "Connected to the debug port: no sign-in needed",
    "language": "Language",
    "sidebar.toggle": "Show or hide the chat list",
    "sidebar.close": "Hide the chat list",
    "newchat": "New chat",
    "sessions.label": "Chats",
    "filter.label": "Show",
    "filter.mine": "All chats",
    "filter.team": "Team: {team}",
    "sessions.empty": "No chats yet.",
    "sessions.empty.write": "No chats yet. Start one with “New chat”.",
    "sessions.loading": "Loading chats…",
    "sessions.more": "Load more",
    "sessions.unavailable": "Chat history isn't available on this server yet. Chats are not saved.",
    "sessions.noaccess": "Your account can't read chat history.",
    "sessions.error": "Couldn't load chats: {msg}",
    "group.today": "Today",
    "group.yesterday": "Yesterday",
    "group.week": "Previous 7 days",
    "group.older": "Older",
    "rename": "Rename",
    "rename.failed": "Couldn't rename the chat: {msg}",
    "delete": "Delete",
    "delete.title": "Delete chat?",
    "delete.body": "“{title}” will be deleted permanently.",
    "delete.failed": "Couldn't delete the chat: {msg}",
    "delete.done": "Chat deleted.",
    "cancel": "Cancel",
    "untitled": "Untitled",
    "team.badge": "{team}",
    "owner.other": "by {owner}",
    "model.label": "Model",
    "model.default": "Default model",
    "model.loading": "Loading models…",
    "model.unavailable": "Couldn't load the model list: {msg}. The server's default model will be used.",
    "clear": "Clear context",
    "clear.done": "Context cleared.",
    "clear.failed": "Couldn't clear the context: {msg}",
    "composer.placeholder": "Message Clawdbot…",
    "composer.readonly": "Your account has read-only access: you can read chats but not send messages.",
    "composer.teammate": "This chat belongs to {owner}: you can read it, and only they can continue it.",
    "temporary": "Temporary chat",
    "temporary.title": "Temporary chat (not saved)",
    "send": "Send",
    "stop": "Stop generating",
    "attach": "Attach images",
    "attach.remove": "Remove image",
    "attach.notimage": "“{name}” is not an image.",
    "attach.toolarge": "“{name}” is too large (at most {max} MB).",
    "attach.toomany": "At most {max} images per message.",
    "attach.readfailed": "Couldn't read “{name}”.",
    "attach.drop": "Drop images here",
    "empty.title": "How can I help you today?",
    "empty.hint": "Ask anything. Paste, drop or attach an image to talk about it.",
    "empty.readonly": "Pick a chat on the left to read it.",
    "disclaimer": "Answers come from a language model and may be wrong.",
    "thinking": "Thinking…",
    "thought": "Thought process",
    "copy": "Copy",
    "copied": "Copied",
    "copy.failed": "Copy failed",
    "incomplete": "Incomplete reply",
    "stopped": "Stopped",
    "image": "Image",
    "image.blocked": "[image not loaded: {alt}]",
    "image.count": "{n} image(s)",
    "error.title": "Something went wrong",
    "error.network": "The server could not be reached",
    "error.unavailable": "This isn't available on this server yet",
    "error.stream": "The reply was interrupted: {msg}",
    "error.closed": "The connection closed before the reply finished",
    "error.session": "This chat doesn't exist or you can't see it",
    "error.session.load": "Couldn't open the chat: {msg}",
    "error.session.create": "Couldn't start a new chat: {msg}",
    "error.scope": "Your account isn't allowed to do this",
    "error.rate": "Too many requests. Try again in a moment",
    "error.busy": "The gateway is busy. Try again in a moment",
    "error.upstream": "The model backend is unavailable",
    "error.timeout": "The model backend timed out",
    "error.model": "That model isn't available",
    "error.toolarge": "The message is too large",
    "error.auth": "Your session has expired. Please sign in again",
    "error.quota": "You have used up your quota",
    "you": "You",
    "close": "Close",
    "keys.open": "API keys",
    "keys.title": "API keys",
    "keys.intro": "Use a key as a Bearer token to call this gateway's API from your own scripts and tools. A key acts as you, with the scopes you give it.",
    "keys.new": "New key",
    "keys.name": "Name",
    "keys.name.placeholder": "e.g. laptop script",
    "keys.name.missing": "Give the key a name.",
    "keys.scopes": "Scopes",
    "keys.scopes.missing": "Pick at least one scope.",
    "keys.scopes.none": "Your account has no scopes to give a key.",
    "keys.team": "Team",
    "keys.team.none": "No team",
    "keys.expires": "Expires",
    "keys.expiry.30d": "In 30 days",
    "keys.expiry.90d": "In 90 days",
    "keys.expiry.365d": "In 1 year",
    "keys.create": "Create key",
    "keys.creating": "Creating…",
    "keys.create.failed": "Couldn't create the key: {msg}",
    "keys.secret.title": "Your new key",
    "keys.secret.note": "Copy it now and keep it somewhere safe. It will not be shown again.",
    "keys.copy.manual": "The key is selected: press Ctrl+C (⌘C) to copy it.",
    "keys.list": "Your keys",
    "keys.loading": "Loading keys…",
    "keys.empty": "You have no API keys yet.",
    "keys.error": "Couldn't load your keys: {msg}",
    "keys.off": "API keys are turned off on this server.",
    "keys.created": "Created {date}",
    "keys.expires.on": "Expires {date}",
    "keys.used": "Last used {date}",
    "keys.unused": "Never used",
    "keys.revoke": "Revoke",
    "keys.revoke.title": "Revoke key?",
    "keys.revoke.body": "“{name}” ({prefix}…) will stop working at once. Scripts that use it will be refused.",
    "keys.revoke.done": "Key revoked.",
    "keys.revoke.failed": "Couldn't revoke the key: {msg}",
    "quota.tokens": "Tokens left: {n}",
    "quota.requests": "Requests left: {n}",
    "quota.reset": "resets in {when}",
  },
  "zh-CN": {
    "boot.loading": "加载中…",
    "signin.title": "欢迎使用 Clawdbot",
    "signin.subtitle": "使用公司账号登录后即可开始对话。",
    "signin.button": "登录",
    "signin.expired": "登录已过期，请重新登录。",
    "signin.signedout": "你已退出登录。",
    "signin.unreachable": "无法连接服务器，请检查网络后重试。",
    "signin.failed": "登录失败：{msg}",
    "signin.unconfigured": "此服务器似乎尚未配置单点登录。请联系管理员，或通过 API 使用 Bearer 令牌访问。",
    "retry": "重试",
    "signout": "退出登录",
    "devmode": "开发模式",
    "devmode.title": "已连接调试端口：无需登录",
    "language": "语言",
    "sidebar.toggle": "显示或隐藏对话列表",
    "sidebar.close": "隐藏对话列表",
    "newchat": "新对话",
    "sessions.label": "对话",
    "filter.label": "显示",
    "filter.mine": "全部对话",
    "filter.team": "团队：{team}",
    "sessions.empty": "还没有对话。",
    "sessions.empty.write": "还没有对话。点击“新对话”开始吧。",
    "sessions.loading": "正在加载对话…",
    "sessions.more": "加载更多",
    "sessions.unavailable": "此服务器暂不提供聊天记录，对话不会被保存。",
    "sessions.noaccess": "你的账号无权查看聊天记录。",
    "sessions.error": "无法加载对话：{msg}",
    "group.today": "今天",
    "group.yesterday": "昨天",
    "group.week": "过去 7 天",
    "group.older": "更早",
    "rename": "重命名",
    "rename.failed": "无法重命名对话：{msg}",
    "delete": "删除",
    "delete.title": "删除对话？",
    "delete.body": "“{title}”将被永久删除。",
    "delete.failed": "无法删除对话：{msg}",
    "delete.done": "对话已删除。",
    "cancel": "取消",
    "untitled": "未命名",
    "team.badge": "{team}",
    "owner.other": "来自 {owner}",
    "model.label": "模型",
    "model.default": "默认模型",
    "model.loading": "正在加载模型…",
    "model.unavailable": "无法获取模型列表：{msg}。将使用服务器的默认模型。",
    "clear": "清除上下文",
    "clear.done": "上下文已清除。",
    "clear.failed": "无法清除上下文：{msg}",
    "composer.placeholder": "给 Clawdbot 发消息…",
    "composer.readonly": "你的账号为只读权限：可以查看对话，但不能发送消息。",
    "composer.teammate": "这个对话属于 {owner}：你可以查看，只有对方可以继续。",
    "temporary": "临时对话",
    "temporary.title": "临时对话（不保存）",
    "send": "发送",
    "stop": "停止生成",
    "attach": "添加图片",
    "attach.remove": "移除图片",
    "attach.notimage": "“{name}”不是图片。",
    "attach.toolarge": "“{name}”太大（最大 {max} MB）。",
    "attach.toomany": "每条消息最多 {max} 张图片。",
    "attach.readfailed": "无法读取“{name}”。",
    "attach.drop": "将图片拖放到这里",
    "empty.title": "今天有什么可以帮你？",
    "empty.hint": "尽管问。可以粘贴、拖入或添加图片一起讨论。",
    "empty.readonly": "在左侧选择一个对话进行查看。",
    "disclaimer": "回答由语言模型生成，可能有误。",
    "thinking": "思考中…",
    "thought": "思考过程",
    "copy": "复制",
    "copied": "已复制",
    "copy.failed": "复制失败",
    "incomplete": "回复不完整",
    "stopped": "已停止",
    "image": "图片",
    "image.blocked": "[未加载图片：{alt}]",
    "image.count": "{n} 张图片",
    "error.title": "出错了",
    "error.network": "无法连接服务器",
    "error.unavailable": "此服务器暂不支持该功能",
    "error.stream": "回复中断：{msg}",
    "error.closed": "回复尚未完成，连接就已关闭",
    "error.session": "此对话不存在，或你无权查看",
    "error.session.load": "无法打开对话：{msg}",
    "error.session.create": "无法新建对话：{msg}",
    "error.scope": "你的账号无权执行此操作",
    "error.rate": "请求过于频繁，请稍后再试",
    "error.busy": "网关繁忙，请稍后再试",
    "error.upstream": "模型服务不可用",
    "error.timeout": "模型服务响应超时",
    "error.model": "该模型不可用",
    "error.toolarge": "消息太大",
    "error.auth": "登录已过期，请重新登录",
    "error.quota": "你的额度已用完",
    "you": "你",
    "close": "关闭",
    "keys.open": "API 密钥",
    "keys.title": "API 密钥",
    "keys.intro": "在你自己的脚本和工具中，把密钥作为 Bearer 令牌调用本网关的 API。密钥以你的身份行事，只拥有你授予它的权限范围。",
    "keys.new": "新建密钥",
    "keys.name": "名称",
    "keys.name.placeholder": "例如：笔记本脚本",
    "keys.name.missing": "请为密钥命名。",
    "keys.scopes": "权限范围",
    "keys.scopes.missing": "请至少选择一个权限范围。",
    "keys.scopes.none": "你的账号没有可授予密钥的权限范围。",
    "keys.team": "团队",
    "keys.team.none": "不指定团队",
    "keys.expires": "有效期",
    "keys.expiry.30d": "30 天",
    "keys.expiry.90d": "90 天",
    "keys.expiry.365d": "1 年",
    "keys.create": "创建密钥",
    "keys.creating": "正在创建…",
    "keys.create.failed": "无法创建密钥：{msg}",
    "keys.secret.title": "你的新密钥",
    "keys.secret.note": "请立即复制并妥善保存。它不会再次显示。",
    "keys.copy.manual": "密钥已选中：按 Ctrl+C（⌘C）复制。",
    "keys.list": "你的密钥",
    "keys.loading": "正在加载密钥…",
    "keys.empty": "你还没有 API 密钥。",
    "keys.error": "无法加载密钥：{msg}",
    "keys.off": "此服务器已关闭 API 密钥功能。",
    "keys.created": "创建于 {date}",
    "keys.expires.on": "{date} 过期",
    "keys.used": "最近使用 {date}",
    "keys.unused": "从未使用",
    "keys.revoke": "吊销",
    "keys.revoke.title": "吊销密钥？",
    "keys.revoke.body": "“{name}”（{prefix}…）将立即失效，使用它的脚本会被拒绝。",
    "keys.revoke.done": "密钥已吊销。",
    "keys.revoke.failed": "无法吊销密钥：{msg}",
    "quota.tokens": "剩余 token：{n}",
    "quota.requests": "剩余请求：{n}",
    "quota.reset": "{when}后重置",
  },
};

const STORAGE_KEY = "clawdbot.lang";
let current = "en";
const listeners = new Set();

function stored() {
  try {
    return window.localStorage.getItem(STORAGE_KEY);
  } catch {
    return null;
  }
}

/** The language to start in: a saved choice, else navigator.language (zh* is Chinese). */
export function detectLanguage() {
  const saved = stored();
  if (saved && saved in STRINGS) return saved;
  const preferred = (navigator.languages && navigator.languages[0]) || navigator.language || "en";
  return /^zh\b/i.test(preferred) ? "zh-CN" : "en";
}

export function getLanguage() {
  return current;
}

/** Switch the UI language; remembered in localStorage (a preference, nothing secret). */
export function setLanguage(code, { remember = true } = {}) {
  if (!(code in STRINGS)) code = "en";
  current = code;
  document.documentElement.lang = code;
  if (remember) {
    try {
      window.localStorage.setItem(STORAGE_KEY, code);
    } catch {
      /* storage unavailable: the choice lasts for this page */
    }
  }
  applyI18n(document);
  for (const fn of listeners) fn(code);
}

export function onLanguageChange(fn) {
  listeners.add(fn);
}

export function t(key, vars) {
  let s = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  if (vars) s = s.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
  return s;
}

export function applyI18n(root) {
  for (const el of root.querySelectorAll("[data-i18n]")) {
    el.textContent = t(el.dataset.i18n, el.dataset.i18nVars ? JSON.parse(el.dataset.i18nVars) : undefined);
  }
  for (const [attr, data] of [
    ["title", "i18nTitle"],
    ["placeholder", "i18nPlaceholder"],
    ["aria-label", "i18nAriaLabel"],
  ]) {
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) el.setAttribute(attr, t(el.dataset[data]));
  }
}

/** Marks el to be (re)translated with key and fills it now. */
export function bindText(el, key, vars) {
  el.dataset.i18n = key;
  if (vars) el.dataset.i18nVars = JSON.stringify(vars);
  else delete el.dataset.i18nVars;
  el.textContent = t(key, vars);
  return el;
}

/** A date and time in the UI language, for tooltips. */
export function formatDate(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  return new Intl.DateTimeFormat(current, { dateStyle: "medium", timeStyle: "short" }).format(d);
}
