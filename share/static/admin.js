// The admin page: a shell filled from the operator's APIs (/v1/admin/...),
// signed in as the chat page is (api.js keeps the session token in memory).
// Everything is set with textContent or attributes, never as HTML.  The live
// view is read every 2 s, usage, people and the audit trail every 10 s.

import * as API from "./api.js";
import { LANGUAGES, applyI18n, detectLanguage, formatDate, getLanguage, onLanguageChange, setLanguage, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
const LIVE_EVERY = 2000;
const SLOW_EVERY = 10000;
const SVG = "http://www.w3.org/2000/svg";
const EVENTS = [
  "auth.sign_in", "auth.sign_in_refused", "auth.refresh_refused", "auth.sign_out", "key.created", "key.revoked",
  "config.reloaded", "config.reload_failed", "model.pulled", "model.pushed", "model.created", "model.copied",
  "model.deleted", "history.read_other", "history.deleted", "quota.exceeded",
];


function cell(text, attrs = {}) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  for (const [k, v] of Object.entries(attrs)) td.setAttribute(k, v);
  return td;
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows);
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(t("admin.none"));
    td.colSpan = $(id).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
  }
}

function row(cells, testid) {
  const tr = document.createElement("tr");
  if (testid) tr.dataset.testid = testid;
  tr.append(...cells);
  return tr;
}

function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return t("admin.seconds", { n: s });
  if (s < 3600) return t("admin.minutes", { n: Math.floor(s / 60) });
  if (s < 86400) return t("admin.hours", { n: Math.floor(s / 3600) });
  return t("admin.days", { n: Math.floor(s / 86400) });
}

function showMessage(key, vars) {
  const p = $("admin-message");
  p.textContent = t(key, vars);
  p.dataset.key = key;
  p.hidden = false;
}

// --- now -------------------------------------------------------------------------

async function refreshNow() {
  const now = await API.api("GET", "/v1/admin/status");
  $("now-streams").textContent = String(now.streams.total);
  $("now-queued").textContent = String(now.queue.waiting);
  $("now-uptime").textContent = duration(now.process.uptime_seconds);
  $("now-memory").textContent = bytes(now.process.rss_bytes);
  $("now-requests").textContent = String(now.process.requests_in_flight);
  const rows = [];
  for (const [model, n] of Object.entries(now.streams.by_model)) rows.push(row([cell(t("admin.model")), cell(model), cell(n), cell(""), cell("")], "now-model"));
  const users = new Set([...Object.keys(now.streams.by_user), ...Object.keys(now.queue.by_user)]);
  for (const user of [...users].sort()) {
    const q = now.queue.by_user[user] || { active: 0, waiting: 0 };
    rows.push(row([cell(t("admin.user")), cell(user), cell(now.streams.by_user[user] || 0), cell(q.active), cell(q.waiting)], "now-user"));
  }
  for (const [model, q] of Object.entries(now.queue.by_model)) rows.push(row([cell(t("admin.capped")), cell(model), cell(""), cell(q.active), cell(q.waiting)], "now-capped"));
  fillTable("now-table", rows);
  fillTable(
    "backends",
    now.backends.map((b) =>
      row([cell(b.backend), cell(b.url), cell(b.up ? t("admin.up") : t("admin.down", { s: b.down_for_seconds }), { "data-state": b.up ? "up" : "down" }), cell(b.active)], "backend"),
    ),
  );
  $("loaded").textContent = now.loaded_models
    ? now.loaded_models.map((m) => m.name).join(", ") || t("admin.none")
    : t("admin.loaded.unknown", { reason: now.loaded_models_error || "" });
  const reload = now.reload;
  const p = $("reload");
  if (!reload) {
    p.textContent = t("admin.reload.none");
    p.dataset.result = "";
  } else if (reload.result === "ok") {
    p.textContent = t("admin.reload.ok", { time: formatDate(reload.time), keys: reload.changed.join(", ") || t("admin.none") });
    p.dataset.result = "ok";
  } else {
    p.textContent = t("admin.reload.error", { time: formatDate(reload.time), error: reload.error });
    p.dataset.result = "error";
  }
}

// --- usage -----------------------------------------------------------------------

async function refreshUsage() {
  const usage = await API.api("GET", "/v1/admin/usage");
  const totals = new Map();
  for (const r of usage.data) {
    const key = `${r.user}\u0000${r.team || ""}\u0000${r.model}`;
    const sum = totals.get(key) || { user: r.user, team: r.team, model: r.model, requests: 0, tokens: 0 };
    sum.requests += r.requests;
    sum.tokens += r.prompt_tokens + r.completion_tokens;
    totals.set(key, sum);
  }
  const sums = [...totals.values()].sort((a, b) => b.tokens - a.tokens);
  fillTable("usage", sums.map((s) => row([cell(s.user), cell(s.team || "-"), cell(s.model), cell(s.requests), cell(s.tokens)], "usage-row")));
  drawChart(usage.data);
}

function drawChart(data) {
  const byDay = new Map();
  for (const r of data) byDay.set(r.date, (byDay.get(r.date) || 0) + r.prompt_tokens + r.completion_tokens);
  const days = [...byDay.keys()].sort();
  const svg = $("usage-chart");
  const width = 600;
  const height = 120;
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 20}`);
  const max = Math.max(1, ...byDay.values());
  const bar = days.length ? Math.min(40, width / days.length) : 0;
  const parts = [];
  days.forEach((day, i) => {
    const h = Math.max(1, (byDay.get(day) / max) * height);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", String(i * bar + 2));
    rect.setAttribute("y", String(height - h));
    rect.setAttribute("width", String(Math.max(1, bar - 4)));
    rect.setAttribute("height", String(h));
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${day}: ${byDay.get(day)}`;
    rect.append(title);
    parts.push(rect);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", String(i * bar + 2));
    label.setAttribute("y", String(height + 14));
    label.textContent = day.slice(8);
    parts.push(label);
  });
  svg.replaceChildren(...parts);
}

async function exportCsv() {
  const resp = await API.apiFetch("/v1/admin/usage?format=csv", { headers: { Accept: "text/csv" } });
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = "usage.csv";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// --- people and keys --------------------------------------------------------------

async function refreshPeople() {
  const [users, keys] = await Promise.all([API.api("GET", "/v1/admin/users"), API.api("GET", "/v1/admin/keys")]);
  fillTable(
    "people",
    users.data.map((u) =>
      row(
        [
          cell(u.name ? `${u.name} (${u.user})` : u.user),
          cell([...u.scopes, ...u.teams.map((team) => `team:${team}`)].join(" ")),
          cell(u.last_seen ? formatDate(u.last_seen) : "-"),
          cell(u.quotas.map((q) => `${q.quota}: ${q.left}/${q.limit}`).join(", ") || "-"),
        ],
        "person",
      ),
    ),
  );
  const rows = [];
  for (const k of keys.data || []) {
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.textContent = t("admin.revoke");
    revoke.dataset.testid = "revoke";
    revoke.disabled = k.status !== "active";
    revoke.addEventListener("click", async () => {
      if (!window.confirm(t("admin.revoke.confirm", { name: k.name }))) return;
      revoke.disabled = true;
      try {
        await API.api("DELETE", `/v1/admin/keys/${encodeURIComponent(k.id)}`);
      } catch (e) {
        showMessage("admin.failed", { msg: e.message });
      }
      attempt("people", refreshPeople);
      attempt("audit", refreshAudit);
    });
    const action = document.createElement("td");
    action.append(revoke);
    const tr = row([cell(`${k.name} (${k.prefix}…)`), cell(k.owner), cell(t(`admin.key.${k.status}`), { "data-status": k.status }), action], "key");
    tr.dataset.keyId = k.id;
    rows.push(tr);
  }
  fillTable("keys", rows);
}

// --- audit -----------------------------------------------------------------------

async function refreshAudit() {
  const event = $("audit-filter").value;
  const query = event ? `?limit=100&event=${encodeURIComponent(event)}` : "?limit=100";
  const audit = await API.api("GET", `/v1/admin/audit${query}`);
  fillTable(
    "audit",
    audit.data.map((e) =>
      row([cell(formatDate(e.time)), cell(e.event), cell(e.principal ? e.principal.sub : "-"), cell(e.object), cell(e.client)], "audit-row"),
    ),
  );
}

// --- the page ----------------------------------------------------------------------

// The panels whose last refresh failed: the "stale" notice stays while any does.
const stale = new Set();
let denied = false;

function refreshed(name, ok) {
  if (ok) stale.delete(name);
  else stale.add(name);
  if (denied) return;
  if (stale.size) showMessage("admin.stale");
  else if ($("admin-message").dataset.key === "admin.stale") $("admin-message").hidden = true;
}

/** Run fn now and every ms; a refusal (the admin scope lost) stops every panel. */
async function attempt(name, fn) {
  try {
    await fn();
    refreshed(name, true);
  } catch (e) {
    if (e instanceof API.ApiError && (e.status === 401 || e.status === 403)) {
      denied = true;
      showMessage("admin.denied");
      $("admin-main").hidden = true;
      return false;
    }
    // A bug of the page's own (not an answer it could not get) is worth a console line.
    if (!(e instanceof API.ApiError) && !(e instanceof API.NetworkError)) console.error(e);
    refreshed(name, false);
  }
  return !denied;
}

function every(ms, name, fn) {
  const run = async () => {
    if (await attempt(name, fn)) setTimeout(run, ms);
  };
  run();
}

async function main() {
  setLanguage(detectLanguage(), { remember: false });
  const lang = $("admin-lang");
  for (const { code, label } of LANGUAGES) {
    const option = document.createElement("option");
    option.value = code;
    option.textContent = label;
    lang.append(option);
  }
  lang.value = getLanguage();
  lang.addEventListener("change", () => setLanguage(lang.value));
  const filter = $("audit-filter");
  for (const name of EVENTS) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    filter.append(option);
  }
  filter.addEventListener("change", () => {
    if (!denied) attempt("audit", refreshAudit);
  });
  $("usage-csv").addEventListener("click", () => exportCsv().catch((e) => showMessage("admin.failed", { msg: e.message })));
  onLanguageChange(() => applyI18n(document));

  const result = await API.start();
  if (!result.mode) {
    if (result.reason === "signed-out") {
      showMessage("admin.signin");
      $("admin-signin").hidden = false;
    } else {
      showMessage("admin.failed", { msg: result.reason && result.reason.message ? result.reason.message : String(result.reason) });
    }
    return;
  }
  const me = result.me || {};
  $("admin-user").textContent = me.name || me.sub || "";
  if (!(me.scopes || []).includes("admin")) {
    showMessage("admin.denied");
    return;
  }
  $("admin-main").hidden = false;
  every(LIVE_EVERY, "now", refreshNow);
  every(SLOW_EVERY, "usage", refreshUsage);
  every(SLOW_EVERY, "people", refreshPeople);
  every(SLOW_EVERY, "audit", refreshAudit);
}

main();
