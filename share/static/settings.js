// The open chat's own settings and its export, from the top bar.
//
// Settings: a system prompt and a temperature for this chat only.  A saved
// chat's are PATCHed at once (PATCH /v1/sessions/{id}); a chat not yet saved
// keeps them in state.pendingSettings, and createSession() (sessions.js)
// sends them with POST /v1/sessions.  Empty means none: the model's default.
//
// Export: GET /v1/sessions/{id}/export?format=markdown|json with the bearer
// token (so not a plain link), saved through a blob URL and an <a download>.

import * as API from "./api.js";
import { $ } from "./dom.js";
import { bindText, t } from "./i18n.js";
import { bindError, toast, toastError } from "./notify.js";
import { mine, updateSession } from "./sessions.js";
import { can, state, update, view } from "./store.js";

const enc = encodeURIComponent;

const ui = {
  settingsButton: $("chat-settings"),
  dialog: $("settings-dialog"),
  form: $("settings-form"),
  intro: $("settings-intro"),
  systemPrompt: $("settings-system-prompt"),
  temperature: $("settings-temperature"),
  error: $("settings-error"),
  save: $("settings-save"),
  cancel: $("settings-cancel"),
  exportButton: $("export-chat"),
  exportMenu: $("export-menu"),
};

// --- chat settings ----------------------------------------------------------------

let saving = false;
let editing = null; // what the dialog edits: {id} for a saved chat, {id: null} for a new one

/** The settings of the open chat, or the pending ones of a new chat. */
function currentSettings() {
  const source = state.current || state.pendingSettings || {};
  return {
    system_prompt: typeof source.system_prompt === "string" ? source.system_prompt : null,
    temperature: typeof source.temperature === "number" ? source.temperature : null,
  };
}

function openSettings() {
  if (ui.settingsButton.hidden) return;
  const { system_prompt: prompt, temperature } = currentSettings();
  editing = { id: state.current ? state.current.id : null, gen: state.openGen };
  ui.systemPrompt.value = prompt || "";
  ui.temperature.value = temperature === null ? "" : String(temperature);
  bindText(ui.intro, editing.id ? "settings.intro" : "settings.intro.new");
  formError(null);
  setSaving(false);
  if (!ui.dialog.open) ui.dialog.showModal();
  ui.systemPrompt.focus();
}

function formError(key, err) {
  ui.error.hidden = !key;
  if (!key) {
    ui.error.textContent = "";
    ui.error.classList.remove("i18n-error");
    delete ui.error.dataset.i18n;
  } else if (err !== undefined) {
    delete ui.error.dataset.i18n;
    bindError(ui.error, key, err);
  } else {
    ui.error.classList.remove("i18n-error");
    bindText(ui.error, key);
  }
}

function setSaving(on) {
  saving = on;
  ui.save.disabled = on;
  bindText(ui.save, on ? "settings.saving" : "settings.save");
}

/** What the form holds, or null (with the form saying why) when the temperature is not one. */
function readForm() {
  const prompt = ui.systemPrompt.value;
  const raw = ui.temperature.value.trim();
  let temperature = null;
  if (raw !== "" || ui.temperature.validity.badInput) {
    temperature = Number(raw);
    if (raw === "" || !Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
      formError("settings.temperature.invalid");
      ui.temperature.focus();
      return null;
    }
  }
  return { system_prompt: prompt.trim() ? prompt : null, temperature };
}

async function saveSettings(e) {
  e.preventDefault();
  if (saving || !editing) return;
  const settings = readForm();
  if (!settings) return;
  formError(null);
  const { id, gen } = editing;
  if (!id) {
    // A chat not yet saved: they go with it when it is (unless another chat was opened meanwhile).
    if (gen === state.openGen && !state.current) update({ pendingSettings: settings });
    ui.dialog.close();
    return;
  }
  setSaving(true);
  try {
    const updated = await API.api("PATCH", `/v1/sessions/${enc(id)}`, settings);
    updateSession(updated && typeof updated === "object" && updated.id ? updated : { id, ...settings });
  } catch (err) {
    if (ui.dialog.open) formError("settings.failed", err);
    else toastError("settings.failed", err);
    return;
  } finally {
    setSaving(false);
  }
  if (ui.dialog.open) ui.dialog.close();
  toast(t("settings.saved"));
}

// --- export -----------------------------------------------------------------------

function setMenuOpen(open) {
  ui.exportMenu.hidden = !open;
  ui.exportButton.setAttribute("aria-expanded", String(open));
  if (open) ui.exportMenu.querySelector("button")?.focus();
}

/** The file name the server gave (Content-Disposition), else one made from the format. */
function fileName(resp, format) {
  const header = resp.headers.get("content-disposition") || "";
  // The UTF-8 name (the title itself) when the server gave one, else the ASCII one.
  const utf8 = /filename\*=UTF-8''([^;]+)/i.exec(header);
  const ascii = /filename="([^"]+)"|filename=([^;]+)/i.exec(header);
  let name = "";
  try {
    name = utf8 ? decodeURIComponent(utf8[1].trim()) : "";
  } catch {
    name = "";
  }
  if (!name && ascii) name = (ascii[1] || ascii[2] || "").trim();
  name = name.replace(/[\\/\u0000-\u001f]/g, "-");
  return name || `chat.${format === "json" ? "json" : "md"}`;
}

async function exportChat(format) {
  setMenuOpen(false);
  const session = state.current;
  if (!session) return;
  try {
    const resp = await API.apiFetch(`/v1/sessions/${enc(session.id)}/export?format=${enc(format)}`, { headers: { Accept: "*/*" } });
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = fileName(resp, format);
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000); // once the download has its bytes
  } catch (err) {
    toastError("export.failed", err);
  }
}

// --- painting -----------------------------------------------------------------------

/** The buttons: settings where the user may talk (their own chat, or a new one); export for a saved chat. */
function paintButtons({ screen, current, historyAvailable }) {
  const talk = screen === "app" && can("chat:write") && mine(current);
  ui.settingsButton.hidden = !talk || (!current && !historyAvailable);
  ui.exportButton.hidden = screen !== "app" || !current;
  if (ui.exportButton.hidden) setMenuOpen(false);
  // The chat the dialog edits is gone (another one opened, signed out): close it.
  if (ui.dialog.open && editing && (screen !== "app" || editing.gen !== state.openGen)) ui.dialog.close();
}

/** A mark on the settings button when this chat has settings of its own. */
function paintMark({ current, pendingSettings }) {
  const source = current || pendingSettings || {};
  const prompt = typeof source.system_prompt === "string" ? source.system_prompt : null;
  const temperature = typeof source.temperature === "number" ? source.temperature : null;
  ui.settingsButton.classList.toggle("has-settings", prompt !== null || temperature !== null);
}

export function install() {
  view(paintButtons, (s) => [s.screen, s.current, s.historyAvailable, s.scopes, s.me, s.openGen]);
  view(paintMark, (s) => [s.current, s.pendingSettings]);

  ui.settingsButton.addEventListener("click", openSettings);
  ui.form.addEventListener("submit", saveSettings);
  ui.cancel.addEventListener("click", () => ui.dialog.close());
  ui.dialog.addEventListener("close", () => {
    editing = null;
    formError(null);
  });
  ui.dialog.addEventListener("click", (e) => {
    if (e.target === ui.dialog && !saving) ui.dialog.close();
  });

  ui.exportButton.addEventListener("click", (e) => {
    e.stopPropagation();
    setMenuOpen(ui.exportMenu.hidden);
  });
  ui.exportMenu.addEventListener("click", (e) => {
    const item = e.target.closest("button[data-format]");
    if (item) exportChat(item.dataset.format);
  });
  ui.exportMenu.addEventListener("keydown", (e) => {
    const items = [...ui.exportMenu.querySelectorAll("button")];
    const i = items.indexOf(document.activeElement);
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      items[(i + (e.key === "ArrowDown" ? 1 : items.length - 1)) % items.length].focus();
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      setMenuOpen(false);
      ui.exportButton.focus();
    }
  });
  document.addEventListener("click", (e) => {
    if (!ui.exportMenu.hidden && !e.target.closest(".export-wrap")) setMenuOpen(false);
  });
  // Tabbing out of the menu (or its button) closes it.
  ui.exportButton.closest(".export-wrap").addEventListener("focusout", (e) => {
    if (!ui.exportMenu.hidden && e.relatedTarget && !e.currentTarget.contains(e.relatedTarget)) setMenuOpen(false);
  });
}
