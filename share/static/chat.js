// Talking to the model: sending a turn and streaming the reply, stopping
// it, and clearing the chat's context.

import * as API from "./api.js";
import { appendError, openSession } from "./conversation.js";
import { t } from "./i18n.js";
import { toast, toastError } from "./notify.js";
import { noteQuota } from "./quota.js";
import { Reply } from "./reply.js";
import { createSession, touchSession } from "./sessions.js";
import { can, state, update } from "./store.js";

const enc = encodeURIComponent;

export function stopStreaming() {
  if (state.streaming) state.streaming.controller.abort();
}

/** Send what the composer holds (text and attached images). */
export async function sendMessage() {
  if (state.streaming || state.sending || !can("chat:write")) return;
  const text = state.draft.trim();
  const images = state.attachments;
  if (!text && !images.length) return;
  update({ sending: true });
  try {
    await send(text, images);
  } finally {
    update({ sending: false });
  }
}

/** The open session, saved first if the chat is new; null for a temporary chat. */
async function sessionToSendTo() {
  if (state.current || !state.historyAvailable) return state.current;
  const gen = state.openGen;
  try {
    const session = await createSession();
    if (gen !== state.openGen) return undefined; // the user moved on; the text stays in the composer
    update({ current: session, fresh: true });
    history.replaceState(null, "", `#s=${enc(session.id)}`);
    return session;
  } catch (err) {
    if (err instanceof API.ApiError && err.status === 404) {
      update({ historyAvailable: false, listStatus: "unavailable" });
      return null;
    }
    appendError("error.session.create", err);
    return undefined;
  }
}

async function send(text, images) {
  const session = await sessionToSendTo();
  if (session === undefined) return;

  const content = images.length
    ? [...(text ? [{ type: "text", text }] : []), ...images.map((img) => ({ type: "image_url", image_url: { url: img.url } }))]
    : text;
  const turn = { role: "user", content };
  // include_usage: the reply's token count, taken off what the quota headers say is left.
  const body = { stream: true, stream_options: { include_usage: true }, messages: session ? [turn] : [...state.transcript, turn] };
  if (state.model) body.model = state.model;
  if (session) body.session_id = session.id;

  const gen = state.openGen;
  const me = state.me;
  const firstTurn = !!session && state.fresh;
  const reply = new Reply(true);
  const controller = new AbortController();
  update({
    fresh: false,
    draft: "",
    attachments: [],
    messages: [...state.messages, { role: "user", content }, { role: "assistant", reply }],
    streaming: { controller, reply },
  });

  let outcome = {};
  let quota = null;
  let usage = null;
  try {
    const result = await API.streamChat(body, { signal: controller.signal, onDelta: (d) => reply.append(d), onQuota: (q) => (quota = q) });
    usage = result.usage;
    if (!result.done) outcome = { error: "closed" };
  } catch (err) {
    outcome = controller.signal.aborted ? { stopped: true } : { error: err };
  }
  reply.finish(outcome);
  if (quota && state.me === me) noteQuota(quota, usage); // the same user still signed in
  if (state.streaming && state.streaming.controller === controller) update({ streaming: null });

  if (!session) {
    if (gen !== state.openGen) return; // that temporary chat is gone
    const answer = reply.content && outcome.error === undefined ? [{ role: "assistant", content: reply.parts().content }] : [];
    update({ transcript: [...state.transcript, turn, ...answer] });
  } else if (outcome.error === undefined || outcome.error === "closed" || outcome.error instanceof API.StreamError) {
    touchSession(session, firstTurn ? text : null);
  }
}

export async function clearContext() {
  if (!can("chat:write")) return;
  stopStreaming();
  if (!state.current) {
    update({ transcript: [], messages: [] });
    toast(t("clear.done"));
    return;
  }
  const id = state.current.id;
  update({ clearing: true });
  try {
    await API.api("POST", "/v1/chat/completions", { session_id: id, messages: [] });
  } catch (err) {
    toastError("clear.failed", err);
    return;
  } finally {
    update({ clearing: false });
  }
  await openSession(id);
  toast(t("clear.done"));
}
