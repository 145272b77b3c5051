// Markdown that grows while it streams, rendered a block at a time.
//
// Rendering the whole text again on every frame costs its length each time,
// the square of it over a long reply.  Instead the text is cut where a
// top-level block has ended for good: before a line that starts in the
// first column, is not a list item and follows a blank line, at a block
// boundary of marked's own lexer (so never inside a fenced code block, an
// HTML block or a list).  What comes before such a cut is rendered once and
// its DOM kept; each frame re-renders only the tail after the last cut.
// Every piece goes through render.js (marked, then DOMPurify), and the pieces
// together are the DOM one render of the whole text gives.  Link reference
// definitions ("[x]: https://...") reach across blocks: a text with any is
// rendered whole once more when it is complete.

import { marked } from "./vendor/marked.esm.js";
import { renderMarkdown } from "./render.js";

const LIST_ITEM = /^(?:[*+-]|\d{1,9}[.)])(?:[ \t]|$)/;
const MAYBE_LIST_ITEM = /^(?:[*+-]|\d{1,9}[.)]?)$/; // an unfinished line that may still become one

/**
 * How much of text is finished: {cut}, the length of the part whose blocks
 * no text appended can change, and {links}, whether text defines link
 * references.
 */
function finished(text) {
  const tokens = marked.lexer(text);
  let pos = 0;
  let cut = 0;
  for (const token of tokens) {
    if (pos > 0 && startsAfresh(text, pos)) cut = pos;
    pos += token.raw.length;
  }
  return { cut, links: Object.keys(tokens.links || {}).length > 0 };
}

/** A block starting at pos cannot belong to what comes before it. */
function startsAfresh(text, pos) {
  if (text[pos - 1] !== "\n") return false;
  const before = text.lastIndexOf("\n", pos - 2);
  if (text.slice(before + 1, pos - 1).trim()) return false; // no blank line before it
  const end = text.indexOf("\n", pos);
  const line = end < 0 ? text.slice(pos) : text.slice(pos, end);
  if (!/^\S/.test(line) || LIST_ITEM.test(line)) return false; // indented, or more of a list
  return end >= 0 || !MAYBE_LIST_ITEM.test(line);
}

/**
 * Renders a growing Markdown text into an element.  The element holds
 * nothing else, but for nodes a caller appends after the text.
 */
export class MarkdownStream {
  constructor(el) {
    this.el = el;
    this.reset();
  }

  reset() {
    this.el.replaceChildren();
    this.done = ""; // the text whose blocks are rendered for good
    this.tail = null; // the text after it, as last rendered
    this.tailNodes = [];
    this.links = false; // a link reference definition was seen
  }

  /**
   * Show text: finished blocks are kept and only the tail is rendered
   * again.  With final (the text is complete) a text with link reference
   * definitions is rendered whole.  A text that does not continue the last
   * one is rendered afresh.
   */
  update(text, { final = false } = {}) {
    text = String(text ?? "");
    if (text.includes("\r")) text = text.replace(/\r\n?/g, "\n"); // as marked reads it
    if (!text.startsWith(this.done)) this.reset(); // not a continuation: start again
    let tail = text.slice(this.done.length);
    if (tail !== this.tail) {
      const { cut, links } = finished(tail);
      this.links = this.links || links;
      if (cut) {
        this.showTail(null);
        this.el.append(renderMarkdown(tail.slice(0, cut)));
        this.done += tail.slice(0, cut);
        tail = tail.slice(cut);
      }
      this.showTail(tail);
    }
    if (final && this.links && this.done) {
      // The pieces were rendered without each other's definitions.
      this.el.replaceChildren();
      this.done = "";
      this.tailNodes = [];
      this.showTail(text);
    }
  }

  showTail(tail) {
    for (const node of this.tailNodes) node.remove();
    const frag = tail ? renderMarkdown(tail) : null;
    this.tailNodes = frag ? [...frag.childNodes] : [];
    if (frag) this.el.append(frag);
    this.tail = tail;
  }
}
