// Rendering untrusted model output.
//
// Markdown goes through marked, and the HTML marked makes goes through
// DOMPurify before it touches the page: nothing else turns text into HTML.
// Links keep only http:, https: and mailto: targets and open in a new tab
// without an opener or referrer; images keep only inline data: images (the
// page's CSP would refuse others anyway, and they could leak the
// conversation); code blocks are highlighted with highlight.js and get a
// Copy button.

import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.es.min.js";
import { t, bindText } from "./i18n.js";

marked.setOptions({ gfm: true, breaks: false, async: false });

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// Raw HTML in model output is shown as text, as chat products do.  (It
// would be sanitised below anyway, but even parsing it makes the browser
// report CSP violations for inline handlers and styles.)
marked.use({
  renderer: {
    html({ text }) {
      return escapeHtml(text);
    },
    // Task lists as characters: form controls are not allowed in output.
    checkbox({ checked }) {
      return checked ? "☑ " : "☐ ";
    },
  },
});

const LINK_SCHEMES = new Set(["http:", "https:", "mailto:"]);
const DATA_IMAGE = /^data:image\/(?:png|jpeg|gif|webp);base64,[a-z0-9+/=\s]+$/i;
const KEEP_CLASS = /^(?:language-[\w+#.-]{1,40}|hljs(?:-[\w-]{1,40})?)$/;
const AUTO_LANGUAGES = [
  "bash", "c", "cpp", "csharp", "css", "diff", "go", "java", "javascript", "json", "kotlin", "markdown",
  "php", "python", "ruby", "rust", "shell", "sql", "swift", "typescript", "xml", "yaml",
];

/** True for an absolute http(s) or mailto URL. */
export function isSafeLink(href) {
  // Browsers ignore ASCII whitespace and control characters in a scheme.
  const cleaned = String(href).replace(/[\u0000-\u0020\u007f-\u009f]/g, "");
  if (!/^(?:https?|mailto):/i.test(cleaned)) return false;
  try {
    return LINK_SCHEMES.has(new URL(cleaned).protocol);
  } catch {
    return false;
  }
}

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeType !== 1) return;
  if (node.hasAttribute("class")) {
    const kept = Array.from(node.classList).filter((c) => KEEP_CLASS.test(c));
    if (kept.length) node.setAttribute("class", kept.join(" "));
    else node.removeAttribute("class");
  }
  if (node.tagName === "A") {
    const href = node.getAttribute("href");
    if (href !== null && !isSafeLink(href)) node.removeAttribute("href");
    if (node.hasAttribute("href")) {
      node.setAttribute("rel", "noopener noreferrer");
      node.setAttribute("target", "_blank");
    } else {
      node.removeAttribute("target");
    }
  } else if (node.hasAttribute("target")) {
    node.removeAttribute("target");
  }
  if (node.tagName === "IMG") {
    const src = node.getAttribute("src") || "";
    if (!DATA_IMAGE.test(src)) {
      // Removed here, in DOMPurify's inert document, so nothing is fetched.
      node.removeAttribute("src");
      node.setAttribute("data-blocked", "");
    }
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  ALLOWED_URI_REGEXP: /^(?:(?:https?|mailto):)/i,
  FORBID_TAGS: [
    "style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame", "frameset",
    "object", "embed", "video", "audio", "source", "track", "picture", "link", "meta", "base", "dialog",
    "template", "slot", "svg", "math", "marquee",
  ],
  FORBID_ATTR: ["style", "id", "name", "srcset", "sizes", "formaction", "action", "background", "poster", "ping", "autofocus", "tabindex"],
  ALLOW_DATA_ATTR: false,
  SANITIZE_NAMED_PROPS: true,
  RETURN_DOM_FRAGMENT: true,
};

const PURIFY_HIGHLIGHT = {
  ALLOWED_TAGS: ["span"],
  ALLOWED_ATTR: ["class"],
  RETURN_DOM_FRAGMENT: true,
};

/** Sanitised DOM for Markdown text (a DocumentFragment). */
export function renderMarkdown(text) {
  const html = marked.parse(String(text ?? ""));
  const frag = DOMPurify.sanitize(html, PURIFY);
  for (const img of frag.querySelectorAll("img[data-blocked]")) {
    const span = document.createElement("span");
    span.className = "blocked-image";
    span.textContent = t("image.blocked", { alt: img.getAttribute("alt") || t("image") });
    img.replaceWith(span);
  }
  for (const img of frag.querySelectorAll("img")) img.setAttribute("loading", "lazy");
  for (const table of frag.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
  for (const pre of frag.querySelectorAll("pre")) decorateCode(pre);
  return frag;
}

function decorateCode(pre) {
  let code = pre.querySelector("code");
  if (!code) {
    code = document.createElement("code");
    code.textContent = pre.textContent;
    pre.replaceChildren(code);
  }
  const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
  const lang = match ? match[1].toLowerCase() : "";
  const source = code.textContent;
  let result = null;
  try {
    if (lang && hljs.getLanguage(lang)) result = hljs.highlight(source, { language: lang, ignoreIllegals: true });
    else if (!lang && source.length < 20000) result = hljs.highlightAuto(source, AUTO_LANGUAGES);
  } catch {
    result = null;
  }
  if (result) {
    // highlight.js escapes the source; its markup still goes through DOMPurify.
    code.replaceChildren(DOMPurify.sanitize(result.value, PURIFY_HIGHLIGHT));
    code.classList.add("hljs");
  }

  const block = document.createElement("div");
  block.className = "code-block";
  const head = document.createElement("div");
  head.className = "code-head";
  const label = document.createElement("span");
  label.className = "code-lang";
  label.textContent = lang || (result && result.language) || "text";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "code-copy";
  copy.dataset.testid = "code-copy";
  copy.append(icon("copy"));
  const copyLabel = document.createElement("span");
  bindText(copyLabel, "copy");
  copy.append(copyLabel);
  head.append(label, copy);
  pre.replaceWith(block);
  block.append(head, pre);
}

/** An <svg> icon from the page's sprite. */
export function icon(name, extraClass) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("class", extraClass ? `icon ${extraClass}` : "icon");
  svg.setAttribute("aria-hidden", "true");
  const use = document.createElementNS(NS, "use");
  use.setAttribute("href", `#i-${name}`);
  svg.append(use);
  return svg;
}

/** Copy the code of the block that holds button; shows "Copied" for a moment. */
export async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("pre code, pre");
  const label = button.querySelector("span");
  if (!code || !label) return;
  const text = code.textContent;
  let ok = false;
  if (navigator.clipboard && navigator.clipboard.writeText) {
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch {
      ok = false;
    }
  }
  if (!ok) ok = legacyCopy(text);
  bindText(label, ok ? "copied" : "copy.failed");
  button.classList.toggle("copied", ok);
  button.querySelector("use")?.setAttribute("href", ok ? "#i-check" : "#i-copy");
  clearTimeout(button._resetTimer);
  button._resetTimer = setTimeout(() => {
    bindText(label, "copy");
    button.classList.remove("copied");
    button.querySelector("use")?.setAttribute("href", "#i-copy");
  }, 1800);
}

/** Copying where the async clipboard API is missing (plain http) or refused. */
function legacyCopy(text) {
  const area = document.createElement("textarea");
  area.value = text;
  area.readOnly = true;
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}
