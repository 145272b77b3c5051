// Clawdbot chat page: the start.
//
// Plain ES modules, no build step:
//   store.js         the state and its one render (update() schedules it)
//   dom.js           the page's elements
//   auth.js          boot and sign-in screens, the user, signing out
//   sessions.js      the session list: filter, rename, delete, the drawer
//   conversation.js  the open chat: title, messages, opening and new chats
//   reply.js         one assistant message, painted as it streams
//   markdown-stream.js  incremental Markdown rendering of a growing text
//   composer.js      text, images, model picker, send and stop buttons
//   chat.js          sending a turn, streaming the reply, clearing context
//   notify.js        error sentences, notices and toasts
//   keys.js          the "API keys" panel: list, create (secret shown once), revoke
//   quota.js         what is left of the user's quota, under the composer
//   search.js        searching chats (titles and messages) from the session list
//   settings.js      the open chat's system prompt and temperature, and its export
// and api.js (the gateway's API), render.js (marked, then DOMPurify) and
// i18n.js (every UI string).  Model output becomes DOM only through
// render.js; everything else is built with createElement and textContent.

import * as auth from "./auth.js";
import * as conversation from "./conversation.js";
import * as composer from "./composer.js";
import * as keys from "./keys.js";
import { el, installLook } from "./dom.js";
import { LANGUAGES, detectLanguage, getLanguage, onLanguageChange, setLanguage } from "./i18n.js";
import * as notify from "./notify.js";
import * as quota from "./quota.js";
import * as search from "./search.js";
import * as sessions from "./sessions.js";
import * as settings from "./settings.js";
import { update, view } from "./store.js";

function paintLanguageSwitch() {
  el.langSwitch.value = getLanguage();
}

function main() {
  setLanguage(detectLanguage(), { remember: false });
  el.langSwitch.replaceChildren(
    ...LANGUAGES.map((l) => {
      const opt = document.createElement("option");
      opt.value = l.code;
      opt.textContent = l.label;
      return opt;
    }),
  );
  el.langSwitch.addEventListener("change", () => setLanguage(el.langSwitch.value));
  onLanguageChange((code) => update({ lang: code }));
  // The order of the views is the order they paint in.
  auth.install();
  view(paintLanguageSwitch, (s) => [s.lang]);
  notify.install();
  sessions.install();
  conversation.install();
  composer.install();
  quota.install();
  keys.install();
  installLook(); // theme, scroll-to-bottom button, Esc stops a reply
  search.install();
  settings.install();
  update({ lang: getLanguage() });
  auth.startSession();
}

main();
