// The composer: the text being written, images attached by the picker,
// paste or drop, the model picker, and the send and stop buttons.

import * as API from "./api.js";
import { clearContext, noteDraft, sendMessage, stopReply } from "./chat.js";
import { el, mobile } from "./dom.js";
import { t } from "./i18n.js";
import { addNotice, removeNotice, toast } from "./notify.js";
import { icon } from "./render.js";
import { can, flush, state, update, view } from "./store.js";

const MAX_IMAGE_MB = 10;
const MAX_IMAGES = 4;
const MAX_HEIGHT = 220; // px the composer grows to before it scrolls
// Raster images the gateway can re-encode (not SVG, which is a document).
const ACCEPTED_IMAGES = /^image\/(?:png|jpeg|gif|webp|bmp)$/;
const DATA_IMAGE = /^data:image\/[a-z0-9.+-]+;base64,/i;

let attachmentSeq = 0;

/** Focus the composer, once what is shown is up to date (it may just have appeared). */
export function focusComposer() {
  flush();
  el.composer.focus();
}

// The model picker: only models that can chat are offered; the choice is
// remembered in localStorage (a preference, nothing secret) and a list that
// failed to load is tried again every MODELS_RETRY ms, when the window gets
// the focus and after a reply came through, until it loads.
const MODEL_KEY = "clawdbot.model";
const MODELS_RETRY = 15000;
let modelsGen = 0; // the model list load whose answer counts
let modelsTimer = 0;

function rememberedModel() {
  try {
    return window.localStorage.getItem(MODEL_KEY);
  } catch {
    return null; // storage unavailable
  }
}

function rememberModel(id) {
  try {
    if (id) window.localStorage.setItem(MODEL_KEY, id);
    else window.localStorage.removeItem(MODEL_KEY);
  } catch {
    /* storage unavailable: the choice lasts for this page */
  }
}

/** The ids of the models that can chat: capabilities, when known, include "completion" (embedding models do not). */
function chatModels(body) {
  const ids = (Array.isArray(body && body.data) ? body.data : [])
    .filter((m) => m && !(Array.isArray(m.capabilities) && !m.capabilities.includes("completion")))
    .map((m) => m.id)
    .filter((id) => typeof id === "string" && id);
  return [...new Set(ids)];
}

export async function loadModels() {
  clearTimeout(modelsTimer);
  modelsTimer = 0;
  if (!can("chat:write")) return;
  const gen = ++modelsGen;
  if (!state.modelsFailed) update({ modelsLoading: true }); // a retry keeps "Default model" shown
  try {
    const body = await API.api("GET", "/v1/models");
    if (gen !== modelsGen) return;
    const models = chatModels(body);
    const saved = rememberedModel();
    const model = models.includes(state.model) ? state.model : models.includes(saved) ? saved : models[0] || null;
    update({ models, model, modelsFailed: false, modelsLoading: false });
    removeNotice("models");
  } catch (err) {
    if (gen !== modelsGen) return;
    update({ models: [], model: null, modelsFailed: true, modelsLoading: false });
    addNotice("models", "model.unavailable", err);
    modelsTimer = setTimeout(retryModels, MODELS_RETRY);
  }
}

/** Another try at the model list, if it failed and someone is signed in. */
function retryModels() {
  if (state.screen === "app" && state.modelsFailed) loadModels();
}

let lastStreaming = null;

/** A reply came through while the model list was missing: the backend is back, try the list again. */
function retryModelsAfterReply({ streaming }) {
  const ended = lastStreaming && !streaming ? lastStreaming : null;
  lastStreaming = streaming;
  const outcome = ended && ended.reply && ended.reply.outcome;
  if (outcome && outcome.error === undefined && state.modelsFailed) setTimeout(retryModels, 0);
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  if (!can("chat:write")) return;
  for (const file of Array.from(files || [])) {
    const name = file.name || t("image");
    if (!ACCEPTED_IMAGES.test(file.type)) {
      toast(t("attach.notimage", { name }), { error: true });
      continue;
    }
    if (file.size > MAX_IMAGE_MB * 1000 * 1000) {
      toast(t("attach.toolarge", { name, max: MAX_IMAGE_MB }), { error: true });
      continue;
    }
    if (state.attachments.length >= MAX_IMAGES) {
      toast(t("attach.toomany", { max: MAX_IMAGES }), { error: true });
      break;
    }
    let url;
    try {
      url = await readAsDataURL(file);
    } catch {
      toast(t("attach.readfailed", { name }), { error: true });
      continue;
    }
    if (!DATA_IMAGE.test(url)) {
      toast(t("attach.notimage", { name }), { error: true });
      continue;
    }
    update({ attachments: [...state.attachments, { id: ++attachmentSeq, name, url }] });
    noteDraft();
  }
  focusComposer();
}

function hasFiles(e) {
  return !!e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
}

// --- painting -----------------------------------------------------------------

/** The text, and the composer's height grown to fit it. */
function paintDraft({ draft }) {
  if (el.composer.value !== draft) el.composer.value = draft;
  el.composer.style.height = "auto";
  if (draft) el.composer.style.height = `${Math.min(el.composer.scrollHeight, MAX_HEIGHT)}px`;
}

function paintButtons({ streaming, sending, draft, attachments, current, messages, clearing, replying }) {
  const writing = !!streaming || replying; // a reply here, or one the server is still writing (Stop stops either)
  el.send.hidden = writing;
  el.stop.hidden = !writing;
  el.send.disabled = (sending && !streaming) || !(draft.trim() || attachments.length);
  el.clearContext.disabled = clearing || writing || (!current && messages.length === 0);
}

function paintAttachments({ attachments }) {
  const chips = attachments.map((a) => {
    const chip = document.createElement("div");
    chip.className = "chip";
    chip.dataset.testid = "attachment";
    chip.title = a.name;
    const img = document.createElement("img");
    img.src = a.url;
    img.alt = a.name;
    img.className = "chip-thumb";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.dataset.testid = "attachment-remove";
    remove.dataset.i18nAriaLabel = "attach.remove";
    remove.dataset.i18nTitle = "attach.remove";
    remove.setAttribute("aria-label", t("attach.remove"));
    remove.title = t("attach.remove");
    remove.append(icon("x"));
    remove.addEventListener("click", () => {
      update({ attachments: state.attachments.filter((x) => x.id !== a.id) });
      noteDraft();
    });
    chip.append(img, remove);
    return chip;
  });
  el.attachments.replaceChildren(...chips);
  el.attachments.hidden = chips.length === 0;
}

function paintModelPicker({ models, model, modelsLoading }) {
  const options = models.map((id) => {
    const opt = document.createElement("option");
    opt.value = id;
    opt.textContent = id;
    return opt;
  });
  if (!options.length) {
    const opt = document.createElement("option");
    opt.value = "";
    opt.textContent = t(modelsLoading ? "model.loading" : "model.default");
    options.push(opt);
  }
  el.modelPicker.replaceChildren(...options);
  el.modelPicker.value = model || "";
  el.modelPicker.disabled = models.length === 0;
}

function wireDrop() {
  let dragDepth = 0;
  el.composerBox.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth++;
    el.composerBox.classList.add("dragging");
  });
  el.composerBox.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  el.composerBox.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.composerBox.classList.remove("dragging");
  });
  el.composerBox.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    el.composerBox.classList.remove("dragging");
    addFiles(e.dataTransfer && e.dataTransfer.files);
  });
  // A file dropped anywhere else must not replace the page.
  window.addEventListener("dragover", (e) => hasFiles(e) && e.preventDefault());
  window.addEventListener("drop", (e) => hasFiles(e) && e.preventDefault());
}

export function install() {
  view(paintDraft, (s) => [s.draft]);
  view(paintButtons, (s) => [s.streaming, s.sending, s.draft, s.attachments, s.current, s.messages, s.clearing, s.replying]);
  view(paintAttachments, (s) => [s.attachments]);
  view(paintModelPicker, (s) => [s.models, s.model, s.modelsLoading, s.lang]);
  view(retryModelsAfterReply, (s) => [s.streaming]);
  // The app opens with the cursor in the composer (not on a phone: that would pop the keyboard up).
  view(
    ({ screen }) => {
      if (screen === "app" && !mobile.matches) el.composer.focus();
    },
    (s) => [s.screen],
  );

  el.modelPicker.addEventListener("change", () => {
    update({ model: el.modelPicker.value || null });
    rememberModel(el.modelPicker.value);
  });
  window.addEventListener("focus", retryModels);
  el.clearContext.addEventListener("click", clearContext);
  el.composer.addEventListener("input", () => {
    update({ draft: el.composer.value });
    noteDraft();
  });
  el.composer.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      sendMessage();
    }
  });
  el.composer.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []).filter((f) => /^image\//.test(f.type));
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  el.send.addEventListener("click", sendMessage);
  el.stop.addEventListener("click", stopReply);
  el.attach.addEventListener("click", () => el.fileInput.click());
  el.fileInput.addEventListener("change", () => {
    addFiles(el.fileInput.files);
    el.fileInput.value = "";
  });
  wireDrop();
}
