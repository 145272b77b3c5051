// The gateway's API, as the page uses it.
//
// The session JWT lives only in this module's memory (never in
// localStorage, sessionStorage or a cookie).  It comes from
// POST /auth/refresh, which reads the gateway's HttpOnly refresh cookie, and
// is renewed through the same call about a minute before it expires.

export class ApiError extends Error {
  constructor(status, error = {}) {
    super(error.message || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = error.code || null;
    this.type = error.type || null;
    this.details = error.details || null;
  }
}

/** The network failed (no HTTP answer at all). */
export class NetworkError extends Error {
  constructor(cause) {
    super("network error");
    this.name = "NetworkError";
    this.cause = cause;
  }
}

/** The server ended a stream with data: {"error": {...}}. */
export class StreamError extends ApiError {
  constructor(error) {
    super(0, error);
    this.name = "StreamError";
  }
}

const XRW = { "X-Requested-With": "XMLHttpRequest" };
const RENEW_BEFORE = 60; // seconds before expiry
const RETRY_RENEWAL = 15; // seconds between renewal attempts after a network failure

let token = null;
let expiresAt = 0; // ms since the epoch
let renewTimer = null;
let refreshing = null; // the refresh in flight, shared by concurrent callers
let authLost = () => {};

export const session = {
  /** "sso" with a token, "dev" on the debug port (no token), or null. */
  mode: null,
  get hasToken() {
    return token !== null;
  },
};

/** Called when the token can no longer be renewed (the user must sign in again). */
export function onAuthLost(fn) {
  authLost = fn;
}

async function errorFrom(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    /* not JSON */
  }
  const error = body && typeof body.error === "object" && body.error ? body.error : {};
  return new ApiError(resp.status, error);
}

async function rawFetch(url, init) {
  try {
    return await fetch(url, { credentials: "same-origin", cache: "no-store", ...init });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new NetworkError(e);
  }
}

function clearToken() {
  token = null;
  expiresAt = 0;
  if (renewTimer) clearTimeout(renewTimer);
  renewTimer = null;
}

function scheduleRenewal(expiresIn) {
  if (renewTimer) clearTimeout(renewTimer);
  // About a minute early; for very short tokens, halfway through.
  const delay = expiresIn > 2 * RENEW_BEFORE ? expiresIn - RENEW_BEFORE : Math.max(expiresIn / 2, 5);
  renewTimer = setTimeout(renew, delay * 1000);
}

async function renew() {
  renewTimer = null;
  try {
    await refresh();
  } catch (e) {
    if (e instanceof NetworkError || (e instanceof ApiError && e.status >= 500)) {
      // Keep trying while the current token is still good.
      if (Date.now() + RETRY_RENEWAL * 1000 < expiresAt) {
        renewTimer = setTimeout(renew, RETRY_RENEWAL * 1000);
        return;
      }
    }
    signedOut();
  }
}

function signedOut() {
  clearToken();
  session.mode = null;
  authLost();
}

/**
 * POST /auth/refresh: a fresh session JWT from the refresh cookie.
 * Resolves to true on success; throws ApiError (401 no/expired session,
 * 404 no sign-in on this listener) or NetworkError.
 */
export function refresh() {
  if (!refreshing) {
    refreshing = (async () => {
      const resp = await rawFetch("/auth/refresh", { method: "POST", headers: { ...XRW, Accept: "application/json" } });
      if (!resp.ok) throw await errorFrom(resp);
      const body = await resp.json();
      if (!body || typeof body.access_token !== "string") throw new ApiError(resp.status, { message: "no access_token in the answer" });
      const expiresIn = Number(body.expires_in) > 0 ? Number(body.expires_in) : 300;
      token = body.access_token;
      expiresAt = Date.now() + expiresIn * 1000;
      session.mode = "sso";
      scheduleRenewal(expiresIn);
      return true;
    })().finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

/**
 * How the page signs in.  Returns {mode: "sso"|"dev", me} or
 * {mode: null, reason} where reason is "signed-out", "no-sign-in" (no
 * /auth/refresh here and the API wants a token) or an Error.
 */
export async function start() {
  clearToken();
  const denied = (e) => e instanceof ApiError && (e.status === 401 || e.status === 403);
  let signedIn = false;
  try {
    signedIn = await refresh();
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 404) return { mode: null, reason: denied(e) ? "signed-out" : e };
  }
  if (signedIn) {
    try {
      return { mode: "sso", me: await api("GET", "/v1/me") };
    } catch (e) {
      clearToken();
      session.mode = null;
      return { mode: null, reason: denied(e) ? "signed-out" : e };
    }
  }
  // No /auth here: the debug port (dev mode) serves the API without sign-in.
  try {
    const me = await api("GET", "/v1/me");
    session.mode = "dev";
    return { mode: "dev", me };
  } catch (e) {
    // Neither sign-in endpoints nor open access: sign-in is not set up here.
    return { mode: null, reason: denied(e) ? "no-sign-in" : e };
  }
}

export function loginUrl() {
  return "/auth/login?next=/";
}

/** POST /auth/logout; returns the provider's end-session URL or null. */
export async function logout() {
  let url = null;
  try {
    const resp = await rawFetch("/auth/logout", { method: "POST", headers: { ...XRW, Accept: "application/json", ...authHeader() } });
    if (resp.ok) {
      const body = await resp.json().catch(() => null);
      if (body && typeof body.logout_url === "string" && /^https?:\/\//i.test(body.logout_url)) url = body.logout_url;
    }
  } finally {
    clearToken();
    session.mode = null;
  }
  return url;
}

function authHeader() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/**
 * fetch() with the bearer token; a 401 while holding a token renews it once
 * and retries.  Returns the Response when it is OK, else throws ApiError.
 */
export async function apiFetch(path, init = {}) {
  const send = () => rawFetch(path, { ...init, headers: { ...(init.headers || {}), ...authHeader() } });
  let resp = await send();
  if (resp.status === 401 && session.mode === "sso") {
    try {
      await refresh();
    } catch (e) {
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) signedOut();
      throw await errorFrom(resp);
    }
    resp = await send();
    if (resp.status === 401) {
      const err = await errorFrom(resp);
      signedOut();
      throw err;
    }
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp;
}

/** A JSON API call; resolves to the parsed body (null for 204). */
export async function api(method, path, body, { signal } = {}) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await apiFetch(path, init);
  if (resp.status === 204) return null;
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/** A count from a quota header: a whole number, else null. */
function headerCount(headers, name) {
  const v = headers.get(name);
  return v !== null && /^\d+$/.test(v.trim()) ? Number(v) : null;
}

/**
 * What a model call's quota headers say is left: {tokens, requests, reset}
 * (null where a header is missing; requests with this call made, tokens
 * before its own; reset in seconds), or null when no quota applies.
 */
export function quotaFrom(headers) {
  const tokens = headerCount(headers, "x-clawdbot-quota-remaining-tokens");
  const requests = headerCount(headers, "x-clawdbot-quota-remaining-requests");
  if (tokens === null && requests === null) return null;
  return { tokens, requests, reset: headerCount(headers, "x-clawdbot-quota-reset") };
}

/**
 * POST /v1/chat/completions with stream: true, reading the SSE reply.
 * onDelta({content, reasoning}) gets each chunk's text; onQuota(quota)
 * gets what the quota headers said (see quotaFrom), once the answer
 * started, if a quota applies; onStart() is called once the server
 * answered 2xx (it has the turn).  Resolves to {done, usage}: done is true
 * after data: [DONE], false when the stream closed without it; usage is
 * the reply's token counts when the server sent them (ask with
 * stream_options.include_usage), else null.  Throws StreamError for a
 * data: {"error": ...} event.
 */
export async function streamChat(body, { signal, onDelta, onQuota = () => {}, onStart = () => {} }) {
  const resp = await apiFetch("/v1/chat/completions", {
    method: "POST",
    headers: { Accept: "text/event-stream", "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  onStart(); // the server answered 2xx: it has the turn
  const quota = quotaFrom(resp.headers);
  if (quota) onQuota(quota);
  const type = resp.headers.get("content-type") || "";
  if (!type.includes("text/event-stream")) {
    // A gateway that answered without streaming: take the whole message.
    const data = await resp.json();
    if (data && data.error) throw new StreamError(data.error);
    const msg = data && data.choices && data.choices[0] && data.choices[0].message;
    if (msg) onDelta({ content: msg.content || "", reasoning: msg.reasoning_content || "" });
    return { done: true, usage: usageOf(data) };
  }

  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let done = false;
  let usage = null;

  const dispatch = () => {
    if (!data.length) return;
    const payload = data.join("\n");
    data = [];
    if (payload === "[DONE]") {
      done = true;
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return; // not JSON: ignore, as the OpenAI clients do
    }
    if (chunk && chunk.error) throw new StreamError(typeof chunk.error === "object" ? chunk.error : { message: String(chunk.error) });
    usage = usageOf(chunk) || usage;
    const delta = chunk && chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (delta && (delta.content || delta.reasoning_content)) {
      onDelta({ content: delta.content || "", reasoning: delta.reasoning_content || "" });
    }
  };

  try {
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += value;
      let nl;
      while (!done && (nl = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") dispatch();
        else if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        // comments (":") and other fields are ignored
      }
    }
    if (!done) {
      if (buffer.startsWith("data:")) data.push(buffer.slice(buffer.startsWith("data: ") ? 6 : 5));
      dispatch();
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  return { done, usage };
}

/** {total_tokens} of a chunk or body that carries usage, else null. */
function usageOf(data) {
  const u = data && data.usage;
  if (!u || typeof u !== "object") return null;
  const total = Number.isFinite(u.total_tokens) ? u.total_tokens : (Number(u.prompt_tokens) || 0) + (Number(u.completion_tokens) || 0);
  return { total_tokens: total };
}
