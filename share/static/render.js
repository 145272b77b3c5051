// Rendering untrusted model output.
//
// Markdown goes through marked, and the HTML marked makes goes through
// DOMPurify before it touches the page: nothing else turns text into HTML.
// Links keep only http:, https: and mailto: targets and open in a new tab
// without an opener or referrer; images keep only inline data: images (the
// page's CSP would refuse others anyway, and they could leak the
// conversation); code blocks are highlighted with highlight.js and get a
// Copy button; tables scroll sideways in a wrapper.
//
// Maths ($$…$$ and \[…\] displayed, \(…\) and $…$ inline) is taken out by a
// marked extension before Markdown can eat its backslashes and underscores,
// and typeset by KaTeX as MathML (the browser lays it out: no KaTeX CSS,
// fonts or inline styles), which DOMPurify's MathML profile then checks like
// the rest.

import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.es.min.js";
import katex from "./vendor/katex.mjs";
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

// --- maths ------------------------------------------------------------------------

const MATH_OPTIONS = {
  output: "mathml",
  trust: false, // no \href, \url, \includegraphics, \htmlClass…: shown as unsupported commands
  // An unknown command is shown in red within the formula; a formula that
  // does not parse comes back as KaTeX's error span (see mathHtml).
  throwOnError: false,
  strict: "ignore",
  maxSize: 20, // em, for \rule and friends
  maxExpand: 500, // macro expansions: \def loops end here
};
const MAX_FORMULA = 5000; // characters; a longer "formula" is shown as its source

// Formulas already typeset: a streaming reply renders its unfinished block
// again at each update, and typesetting is the costly part.  The most
// recently used MAX_TYPESET are kept.
const typeset = new Map(); // ("d" | "i") + TeX -> MathML, "" when KaTeX could not typeset it
const MAX_TYPESET = 1000;

function typesetOnce(tex, display) {
  const key = (display ? "d" : "i") + tex;
  let mathml = typeset.get(key);
  if (mathml === undefined) {
    try {
      mathml = katex.renderToString(tex, { ...MATH_OPTIONS, displayMode: display });
    } catch {
      mathml = ""; // not a ParseError (those come back as the error span): shown as its source too
    }
    // KaTeX's error span carries an inline style the CSP refuses: shown as its source instead.
    if (mathml.startsWith('<span class="katex-error"')) mathml = "";
    if (typeset.size >= MAX_TYPESET) typeset.delete(typeset.keys().next().value);
  } else {
    typeset.delete(key); // to the most recent end
  }
  typeset.set(key, mathml);
  return mathml;
}

/** A formula typeset as MathML, or its source (raw, with delimiters) in code style. */
function mathHtml(tex, raw, display, block) {
  if (tex.trim() && tex.length <= MAX_FORMULA) {
    const mathml = typesetOnce(tex, display);
    if (mathml) {
      const tag = block ? "div" : "span";
      return `<${tag} class="math ${display ? "math-display" : "math-inline"}">${mathml}</${tag}>`;
    }
  }
  const code = `<code class="math-error" title="${escapeHtml(t("math.invalid"))}">${escapeHtml(raw)}</code>`;
  return block ? `<p>${code}</p>\n` : code;
}

// Display maths alone on its lines: a block of its own.  Inside, a
// backslash pair (\\, \$) is taken whole, so "\\]" does not end \[…\].
const MATH_BLOCK = [
  /^ {0,3}\$\$((?:\\[\s\S]|[^\\$])+?)\$\$[ \t]*(?:\n+|$)/,
  /^ {0,3}\\\[((?:\\[^\]]|[^\\])+?)\\\][ \t]*(?:\n+|$)/,
];
// In a line: display first, then \(…\), then $…$.  A $ pair needs a
// non-space just inside each $ and no digit after the closing one, so
// "$5 and $10" stays text; its inside holds no backtick (code spans are
// never maths).
const MATH_INLINE = [
  [/^\$\$((?:\\[\s\S]|[^\\$])+?)\$\$/, true],
  [/^\\\[((?:\\[^\]]|[^\\])+?)\\\]/, true],
  [/^\\\(((?:\\[^)]|[^\\])+?)\\\)/, false],
  [/^\$(?![\s$])((?:\\[\s\S]|[^\\$`])+?)(?<!\s)\$(?!\d)/, false],
];
const MATH_BLOCK_START = /(?:^|\n)( {0,3}(?:\$\$|\\\[))/g;

marked.use({
  extensions: [
    {
      name: "mathBlock",
      level: "block",
      start(src) {
        // Only where a whole display block starts, so a paragraph is not cut at a stray "$$".
        MATH_BLOCK_START.lastIndex = 0;
        for (let m; (m = MATH_BLOCK_START.exec(src)); ) {
          const at = m.index + m[0].length - m[1].length;
          if (MATH_BLOCK.some((re) => re.test(src.slice(at)))) return at;
          MATH_BLOCK_START.lastIndex = at + 1;
        }
        return undefined;
      },
      tokenizer(src) {
        for (const re of MATH_BLOCK) {
          const m = re.exec(src);
          if (m) return { type: "mathBlock", raw: m[0], text: m[1], source: m[0].trim() };
        }
        return undefined;
      },
      renderer(token) {
        return mathHtml(token.text, token.source, true, true);
      },
    },
    {
      name: "mathInline",
      level: "inline",
      start(src) {
        const i = src.search(/\$|\\[([]/);
        return i < 0 ? undefined : i;
      },
      tokenizer(src) {
        for (const [re, display] of MATH_INLINE) {
          const m = re.exec(src);
          if (m && m[1].trim()) return { type: "mathInline", raw: m[0], text: m[1], display };
        }
        return undefined;
      },
      renderer(token) {
        return mathHtml(token.text, token.raw, token.display, false);
      },
    },
  ],
});

const LINK_SCHEMES = new Set(["http:", "https:", "mailto:"]);
const DATA_IMAGE = /^data:image\/(?:png|jpeg|gif|webp);base64,[a-z0-9+/=\s]+$/i;
const KEEP_CLASS = /^(?:language-[\w+#.-]{1,40}|hljs(?:-[\w-]{1,40})?|math|math-(?:inline|display|error)|katex)$/;
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
  } else {
    if (node.hasAttribute("target")) node.removeAttribute("target");
    // Links only on <a>: MathML's href and xlink:href go.
    node.removeAttribute("href");
    node.removeAttribute("xlink:href");
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

// HTML attributes Markdown gives (a list's first number, a table column's
// alignment, an image's text, a link's title): words and numbers, never URLs.
const HTML_TEXT_ATTRS = ["start", "reversed", "align", "colspan", "rowspan", "alt", "title"];

const MATHML_LAYOUT_ATTRS = [
  "accent", "accentunder", "align", "bevelled", "close", "columnalign", "columnlines", "columnspacing", "columnspan",
  "denomalign", "depth", "dir", "display", "displaystyle", "encoding", "fence", "frame", "height", "largeop", "length",
  "linethickness", "lquote", "lspace", "mathbackground", "mathcolor", "mathsize", "mathvariant", "maxsize", "minsize",
  "movablelimits", "notation", "numalign", "open", "rowalign", "rowlines", "rowspacing", "rowspan", "rspace", "rquote",
  "scriptlevel", "scriptminsize", "scriptsizemultiplier", "selection", "separator", "separators", "stretchy",
  "subscriptshift", "supscriptshift", "symmetric", "voffset", "width",
];

const PURIFY = {
  USE_PROFILES: { html: true, mathMl: true },
  // KaTeX's MathML: the formula, and its TeX source as an annotation (not shown).
  ADD_TAGS: ["semantics", "annotation"],
  // MathML's layout attributes hold words and lengths, never URLs: exempt from
  // ALLOWED_URI_REGEXP below, which DOMPurify otherwise applies to every
  // attribute value (and which would leave only http:, https: and mailto:).
  ADD_URI_SAFE_ATTR: [...MATHML_LAYOUT_ATTRS, ...HTML_TEXT_ATTRS],
  ALLOWED_URI_REGEXP: /^(?:(?:https?|mailto):)/i,
  FORBID_TAGS: [
    "style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame", "frameset",
    "object", "embed", "video", "audio", "source", "track", "picture", "link", "meta", "base", "dialog",
    "template", "slot", "svg", "marquee", "annotation-xml", "maction", "mglyph",
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

/** HTML (marked's, with KaTeX's MathML) as a sanitised DocumentFragment. */
export function sanitize(html) {
  return DOMPurify.sanitize(html, PURIFY);
}

/** Sanitised DOM for Markdown text (a DocumentFragment). */
export function renderMarkdown(text) {
  const html = marked.parse(String(text ?? ""));
  const frag = sanitize(html);
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

/** The text a person reads in rendered Markdown: no code-block labels, no TeX annotations. */
export function plainText(node) {
  const copy = node.cloneNode(true);
  for (const extra of copy.querySelectorAll(".code-head, annotation, .typing")) extra.remove();
  return copy.textContent;
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

const COPIED_FOR = 1800; // ms a copy button says "Copied"

/** Put text on the clipboard: the async clipboard API, else (plain http, or refused) a selected textarea. */
async function copyText(text) {
  if (navigator.clipboard && navigator.clipboard.writeText) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      /* refused: the fallback below */
    }
  }
  return legacyCopy(text);
}

/** Copy text for a copy button: its label says "Copied" (or that it failed) for a moment. */
export async function copyFrom(button, text) {
  const ok = await copyText(text);
  const label = button.querySelector("span");
  if (label) bindText(label, ok ? "copied" : "copy.failed");
  button.classList.toggle("copied", ok);
  button.querySelector("use")?.setAttribute("href", ok ? "#i-check" : "#i-copy");
  clearTimeout(button._resetTimer);
  button._resetTimer = setTimeout(() => {
    if (label) bindText(label, "copy");
    button.classList.remove("copied");
    button.querySelector("use")?.setAttribute("href", "#i-copy");
  }, COPIED_FOR);
}

/** Copy the code of the block that holds button. */
export async function copyCode(button) {
  const code = button.closest(".code-block")?.querySelector("pre code, pre");
  if (code) await copyFrom(button, code.textContent);
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
