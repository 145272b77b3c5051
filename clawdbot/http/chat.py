"""
The model routes: OpenAI's chat and legacy completions, models and
embeddings, and the authenticated pass-through of Ollama's native API.
"""

import json
import time

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from clawdbot.backend import translate
from clawdbot.backend.ollama import Share
from clawdbot.backend.translate import DONE, LineSplitter, StreamTranslator, UpstreamStreamError
from clawdbot.errors import APIError, invalid
from clawdbot.http.resource import APIResource, Node, NotFound, StreamResponse, read_json
from clawdbot.ops.observe import redact
from clawdbot.ops.tracing import MAX_CONTENT

log = Logger(namespace="clawdbot.chat")


def _encode(payload):
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _text(message):
    return message.get("content") or ""


def data_urls(images, fmt):
    """
    A turn's images (Ollama's base64 strings, re-encoded by the gateway in
    C{fmt}, C{images.format}) as the data URLs a session stores.
    """
    return tuple(f"data:image/{fmt};base64,{image}" for image in images or ())


def context_messages(context, image_turns):
    """
    A session's stored messages (L{clawdbot.storage.store.Message}) as
    Ollama's: the images of the last C{image_turns} user turns go to the
    model again (the base64 of their data URLs); older turns go as text only.
    """
    users = [i for i, message in enumerate(context) if message.role == "user"]
    recent = set(users[-image_turns:]) if image_turns else set()
    out = []
    for i, message in enumerate(context):
        entry = {"role": message.role, "content": message.content}
        if i in recent and message.images:
            entry["images"] = [url.partition(",")[2] for url in message.images]
        out.append(entry)
    return out


def stopped_early():
    return invalid("the reply was stopped (POST /v1/sessions/{id}/stop or a clear) before any of it could be kept; nothing was stored")


class Turn:
    """
    A session turn while it runs: C{POST /v1/sessions/{id}/stop} calls
    L{stop} (registered in C{History.stoppers}).

    @ivar detach: C{finish_on_disconnect}: the reply runs to its end and is
        kept whole when the client leaves.
    @ivar call: the model call, once it is under way (a Deferred).
    @ivar stopped: L{stop} ended the turn.
    @ivar settled: the reply is over and being kept: too late to stop it.
    """

    def __init__(self, detach=False):
        self.detach = detach
        self.call = None
        self.stopped = False
        self.settled = False

    def stop(self):
        """End the reply now: what was said is kept, marked incomplete (as when its client leaves)."""
        if self.stopped or self.settled:
            return
        self.stopped = True
        if self.call is not None:
            self.call.cancel()


@implementer(IPushProducer)
class _Detachable:
    """
    The backend connection as the producer of a stream that outlives its
    client: paused and resumed with the client while it listens; when the
    client leaves (twisted.web stops the producer) it is resumed instead of
    stopped, so the reply is read on to its end.
    """

    def __init__(self, producer):
        self.producer = producer
        self.paused = False
        self.detached = False

    def pauseProducing(self):
        if not self.detached and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def resumeProducing(self):
        if not self.detached and self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def stopProducing(self):
        if self.detached:
            return
        self.detached = True
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()


class DetachedStream(StreamResponse):
    """
    A session turn's stream with C{finish_on_disconnect}: the client paces
    the backend read while it listens (L{_Detachable}); once it has left,
    nothing more is written (L{StreamResponse} checks) and the reply is read
    to its end.
    """

    def registerProducer(self, producer, streaming):
        request = self.request
        if request.gone:
            return  # gone before Ollama answered: nobody to pace the read
        proxy = _Detachable(producer)
        request.registerProducer(proxy, streaming)
        # However the connection ends, a paused read goes on once it has.
        request.notifyFinish().addErrback(lambda _: proxy.stopProducing())


def detached(request, work):
    """
    What the handler awaits for a session turn with C{finish_on_disconnect}:
    C{work}'s result, but cancelling it (the client left) leaves C{work}
    running, unless the gateway is shutting down.
    """
    # The access-log line, metrics, budget and usage wait for the turn's
    # end, so a reply that runs on after a disconnect is charged its counts.
    hold = getattr(request, "hold_end", None)
    end = hold() if hold is not None else (lambda: None)

    def cancelled(_):
        if request.draining:
            work.cancel()

    out = Deferred(cancelled)
    request.runs_on = work

    def forward(result):
        end()
        if not out.called:
            (out.errback if isinstance(result, Failure) else out.callback)(result)
        elif isinstance(result, Failure) and not result.check(CancelledError, APIError):
            log.failure("A turn whose client had left failed", result, request_id=request.request_id)
        return None

    work.addBoth(forward)
    return out


def translated(request, meter, translator):
    """
    The relay's C{on_data} for a stream that C{translator} turns from
    Ollama's lines into SSE (counting lines on C{meter}, and Ollama's counts
    into the audit once the last line is in), and C{rest()}: the bytes of a
    last line that came without its newline, raising when the stream ended
    before Ollama said it was done.
    """
    splitter = LineSplitter()

    def on_data(data):
        if translator.done:
            return b""
        chunks = []
        try:
            for line in splitter.feed(data):
                if translator.done:
                    break
                chunks.append(translator.line(line))
                # Counted once relayed: Ollama's error line is no reply token.
                meter.streamed += 1
        except UpstreamStreamError as e:
            raise APIError("UPSTREAM_UNAVAILABLE", details=e.args[0]) from None
        if translator.final is not None and "usage" not in request.audit:
            # Before the response ends: the budget is charged when it does.
            _count(request, translator.final)
        return b"".join(chunks)

    def rest():
        tail = b""
        if not translator.done:
            tail = b"".join(on_data(line + b"\n") for line in splitter.rest())
        if not translator.done:
            raise APIError("UPSTREAM_UNAVAILABLE", details="the model backend ended the stream early")
        return tail

    return on_data, rest


def _count(request, reply):
    """Ollama's counts for a whole reply, for the log and the token budget (and its finish reason, for the trace)."""
    request.audit["usage"] = translate.usage(reply)
    request.audit["tokens"] = request.audit["usage"]["total_tokens"]
    if request.span is not None:
        message = reply.get("message")
        calls = isinstance(message, dict) and bool(message.get("tool_calls"))
        request.gen_ai["gen_ai.response.finish_reasons"] = [translate.finish_reason(reply.get("done_reason"), calls)]


def captured(content):
    """
    Content for a span (C{tracing.capture_content}): redacted as the access
    log redacts, as JSON; over L{MAX_CONTENT} characters, described by its
    size instead, as the access log does (a cut document could not be
    redacted, and redacting megabytes would hold up the reactor).
    """
    text = json.dumps(content, ensure_ascii=False)
    if len(text) > MAX_CONTENT:
        return f"[{len(text)} characters, not recorded]"
    return json.dumps(redact(content), ensure_ascii=False)


def trace_reply(request, tracing, text):
    """
    With C{tracing.capture_content}: the reply's text on the server span
    (see L{captured}); C{text} is the text, or C{() -> text}, asked only then.
    """
    if request.span is not None and tracing.capture_content:
        request.gen_ai["gen_ai.output.messages"] = captured([{"role": "assistant", "content": text() if callable(text) else text}])


def trace_call(request, tracing, operation, ollama_body):
    """
    What a traced request asks of the model, for its server span (GenAI
    conventions): the operation, the token cap and the temperature; the
    messages (or prompt) only with C{tracing.capture_content}, redacted as
    the access log redacts.
    """
    options = ollama_body.get("options") or {}
    request.gen_ai.update(
        {
            "gen_ai.system": "ollama",
            "gen_ai.operation.name": operation,
            "gen_ai.request.max_tokens": options.get("num_predict"),
            "gen_ai.request.temperature": options.get("temperature"),
        }
    )
    content = next((ollama_body[key] for key in ("messages", "prompt", "input") if key in ollama_body), None)
    if tracing.capture_content and content is not None:
        request.gen_ai["gen_ai.input.messages"] = captured(content)


class ModelRoute(APIResource):
    """A route that calls the model, with what it needs for that, taken from the parts at construction."""

    def __init__(self, parts):
        super().__init__(parts)
        self.ollama = parts.ollama
        self.images = parts.images
        self.history = parts.history
        self.metrics = parts.metrics
        self.clock = parts.reactor
        self.tracing = parts.tracing

    async def stored(self, request, operation, work):
        """
        Await C{work} (a history store's call), as the span
        C{storage <operation>} of a traced request.
        """
        span = self.tracing.child(request.span, f"storage {operation}") if request.span is not None else None
        try:
            return await work
        except BaseException as e:
            self.tracing.failed(span, e.code if isinstance(e, APIError) else type(e).__name__)
            raise
        finally:
            self.tracing.end(span)

    def share(self, request):
        """
        The caller's claim on the backend's slots (L{Share}): its owner key,
        and the largest weight its scopes and teams have in
        C{limits.fair_share.weights}.  A call that had to wait says where it
        stood (C{x-clawdbot-queue-position}) once it is served, and every
        wait is measured, the ones that end in a 503 too.
        """
        principal = request.principal
        weights = request.config.limits.fair_share.weights
        named = [(weights[name], name) for name in (*principal.rule_scopes, *principal.teams) if name in weights]
        weight, cls = max(named) if named else (1.0, "default")
        observe = self.metrics.queue_wait.labels(cls).observe
        tracing = self.tracing

        def waited(seconds, position, served):
            observe(seconds)
            if served:
                request.setHeader(b"x-clawdbot-queue-position", str(position).encode())
            if request.span is not None:
                # The wait, as a span of its own that began when the call was queued.
                now = time.time_ns()
                span = tracing.child(request.span, "queue", start_time=now - int(seconds * 1e9))
                tracing.end(span, {"clawdbot.queue.wait_seconds": seconds, "clawdbot.queue.position": position, "clawdbot.queue.served": served}, end_time=now)

        return Share(principal.key, weight, cls, waited, request.span)


class ChatShape:
    """
    How a model route's replies look: OpenAI chat completions.  The other
    APIs' routes (L{clawdbot.http.agents}) bring shapes of their own with the
    same four methods, so one conversation path (L{Conversation}) serves
    them all.
    """

    def whole(self, reply, opts):
        """The answer for a whole Ollama reply."""
        return translate.chat_response(reply, opts["model"], single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])

    def translator(self, opts, hold):
        """The stream translator; with C{hold}, its last bytes wait for L{held}."""
        return StreamTranslator(opts["model"], opts["include_usage"], hold_done=hold, single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])

    def fmt(self, translator):
        """The stream's format for L{StreamResponse} (what its error event looks like)."""
        return "sse"

    def held(self, translator):
        """The last bytes of a stream whose reply was kept first."""
        return DONE


CHAT = ChatShape()


class Conversation(ModelRoute):
    """
    A route that holds a conversation with the model through C{/api/chat}:
    one call (whole or streamed), or for C{tool_choice: "required"} with
    several tools a call and one retry (L{_required}); the reply shaped by
    the route's shape (L{ChatShape}) and, when asked, kept (a session's
    turn, a stored response) before the client hears the end.

    C{keep} is C{async keep(reply, incomplete)}: C{reply} is the whole
    answer, or the stream's translator.  C{turn} is a session's L{Turn}:
    whether its stream outlives its client, and whether it was stopped.
    """

    async def converse(self, request, config, ollama_body, opts, shape=CHAT, keep=None, turn=None):
        if opts["instruction"]:
            # For the model only: what is kept is the turn as the user sent it.
            ollama_body["messages"] = translate.with_instruction(ollama_body["messages"], opts["instruction"])
        meter = await metered(self.accounting, request, ollama_body)
        if request.span is not None:
            trace_call(request, self.tracing, "chat", ollama_body)
        if opts["required_tools"]:
            return await self._required(request, config, ollama_body, opts, shape, keep, meter)
        if opts["stream"]:
            return await self._stream(request, config, ollama_body, opts, shape, keep, meter, turn)
        reply = await self.ollama.call_json(config, b"POST", "/api/chat", ollama_body, sent=meter.mark_sent, share=self.share(request))
        return await self._whole(request, reply, opts, shape, keep)

    async def _whole(self, request, reply, opts, shape, keep):
        """A whole Ollama reply in the route's shape, counted (and kept)."""
        result = shape.whole(reply, opts)
        _count(request, reply)
        message = reply.get("message")
        trace_reply(request, self.tracing, message.get("content") if isinstance(message, dict) else None)
        if keep is not None:
            await keep(result, False)
        return result

    async def _required(self, request, config, ollama_body, opts, shape, keep, meter):
        """
        C{tool_choice: "required"} with several tools: the model gets the
        tools, and when it answers without calling one it is asked once
        more, held by a schema to a call of one of them (L{translate.union_format}).
        Whether a call came is known only at the end, so Ollama's reply is
        taken whole; a streaming client gets it at once.
        """
        body = dict(ollama_body, stream=False)
        backend = self.ollama
        functions = opts["required_tools"]
        # One timeout for the request, both calls included.
        deadline = self.clock.seconds() + config.timeout
        share = self.share(request)
        reply = translate.offered_calls_only(await backend.call_json(config, b"POST", "/api/chat", body, sent=meter.mark_sent, deadline=deadline, share=share), functions)
        _count(request, reply)
        if not reply["message"].get("tool_calls") and reply.get("done_reason") != "length":
            retry = {key: value for key, value in body.items() if key != "tools"}
            retry["format"] = translate.union_format(functions)
            retry["messages"] = translate.with_instruction(body["messages"], translate.union_instruction(functions))
            ceiling = config.backend.max_num_ctx
            await self.accounting.reserve_tokens(request, translate.Meter(retry, ceiling).prompt + translate.reply_reserve(retry, ceiling))
            second = await backend.call_json(config, b"POST", "/api/chat", retry, deadline=deadline, share=share)
            reply = translate.with_counts_of(second, reply)
            _count(request, reply)
            reply = translate.call_from_union(reply, functions)
        if not opts["stream"]:
            return await self._whole(request, reply, opts, shape, keep)
        translator = shape.translator(opts, False)
        out = translator.line(_encode(reply))
        if keep is not None:
            await keep(translator, False)
        response = StreamResponse(request, shape.fmt(translator), self.metrics)
        response.begin()
        try:
            response.write(out)
            response.end(b"")
        finally:
            response.close()
        return None

    async def _stream(self, request, config, ollama_body, opts, shape, keep, meter, turn=None):
        translator = shape.translator(opts, keep is not None)
        on_data, rest = translated(request, meter, translator)
        response = (DetachedStream if turn is not None and turn.detach else StreamResponse)(request, shape.fmt(translator), self.metrics)

        kept = False

        async def on_end():
            nonlocal kept
            tail = rest()
            if keep is not None:
                # The end is sent only once the reply is kept.  Kept once:
                # a cancel during this store (the client left) lets it
                # finish rather than storing the reply a second time.
                kept = True
                await keep(translator, False)
                tail += shape.held(translator)
            return tail

        try:
            ok = await self.ollama.stream(config, "/api/chat", ollama_body, response, on_data, on_end, meter.mark_sent, self.share(request))
            kept = kept or ok
        except CancelledError:
            # The client went away (or the turn was stopped): keep what
            # was said, marked incomplete.
            if keep is not None and translator.sent_role and not kept:
                await keep(translator, True)
                kept = True
            if turn is not None and turn.stopped and response.begun and not request.gone and not request.finished:
                # A client still listening to a stopped reply hears its end
                # (no finish_reason: the reply is not complete).
                request.write(shape.held(translator))
                request.finish()
            raise
        finally:
            if translator.final is not None:
                _count(request, translator.final)
            trace_reply(request, self.tracing, lambda: "".join(translator.content))
        if not kept and keep is not None and translator.sent_role:
            await keep(translator, True)
        return None


class ChatCompletions(Conversation):
    """
    C{POST /v1/chat/completions}: OpenAI chat, translated to Ollama's
    C{/api/chat}.  With C{session_id} the call is stateful: the session's
    stored context goes first, and the new turn and the reply are stored.
    """

    scopes = {"POST": "chat:write"}
    route_name = "chat_completions"
    rate_limited = True

    async def handle_POST(self, request):
        config = request.config
        body = await read_json(request)
        session_id = body.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            raise invalid("'session_id' must be a string")
        # The gateway's own field, not the model's.
        detach = body.pop("finish_on_disconnect", None)
        if detach is not None and not isinstance(detach, bool):
            raise invalid("'finish_on_disconnect' must be true or false")
        if detach and session_id is None:
            raise invalid("'finish_on_disconnect' needs a 'session_id': only a session's reply is kept")
        ollama_body, opts = translate.chat_request(body, config, request.principal, session_id)
        request.audit["model"] = ollama_body["model"]
        if session_id is not None:
            request.audit["session"] = session_id
            # Only the owner adds turns to a session or clears it (checked
            # before any image is decoded for the turn).
            session = await self.stored(request, "owned", self.history.owned(request.principal, session_id))
            if body.get("messages") == []:
                # A reply being written stops first, and the clear waits for
                # it to be stored, so nothing lands after the clear.
                self.history.stop(session_id)
                await self.history.one_at_a_time(session_id, lambda: self.history.store.clear(session_id))
                return {"object": "session.context_cleared", "session_id": session_id}
        # Images are decoded on the image workers, never here on the reactor.
        await self.images.process_messages(ollama_body["messages"], config.images)
        if session_id is None:
            return await self.converse(request, config, ollama_body, opts)
        limits = config.history
        for message in ollama_body["messages"]:
            if len(_text(message)) > limits.max_message_chars:
                raise invalid(f"a message is longer than the limit of {limits.max_message_chars} characters")
        current = Turn(detach=bool(detach))
        stopper = current.stop

        async def turn():
            # Stoppable from the moment the turn holds the session.
            self.history.stoppers[session_id] = stopper
            try:
                return await run_turn()
            finally:
                if self.history.stoppers.get(session_id) is stopper:
                    del self.history.stoppers[session_id]

        async def run_turn():
            context = await self.stored(request, "context", self.history.store.context(session_id, limits.context_messages)) if limits.context_messages else []
            new = []
            for m in ollama_body["messages"]:
                # The images as the gateway re-encoded them (images.format).
                images = data_urls(m.get("images"), config.images.format)
                new.append((m["role"], _text(m), False, images) if images else (m["role"], _text(m), False))
            if await self.stored(request, "count", self.history.store.count_messages(session_id)) + len(new) + 1 > limits.max_messages_per_session:
                raise invalid(f"the session has reached the limit of {limits.max_messages_per_session} messages; start a new one")
            release = await self.stored(request, "quota", self.history.check_quota(request.principal, limits, new))

            async def keep(reply, incomplete):
                current.settled = True
                if isinstance(reply, dict):
                    text = reply["choices"][0]["message"].get("content") or ""
                else:
                    text = "".join(reply.content)
                await self.stored(request, "append", self.history.store.append(session_id, new + [("assistant", text, incomplete)]))

            try:
                # The session's system prompt first (never stored), then
                # its stored context, then the new turn.
                system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
                ollama_body["messages"] = system + context_messages(context, limits.image_turns) + ollama_body["messages"]
                if session.temperature is not None and "temperature" not in ollama_body.get("options", {}):
                    ollama_body.setdefault("options", {})["temperature"] = session.temperature
                if current.stopped:
                    raise CancelledError()
                current.call = Deferred.fromCoroutine(self.converse(request, config, ollama_body, opts, keep=keep, turn=current))
                return await current.call
            finally:
                release()

        work = Deferred.fromCoroutine(self.history.one_at_a_time(session_id, turn))
        try:
            return await (detached(request, work) if current.detach else work)
        except CancelledError:
            if not current.stopped or request.gone:
                raise
            if request.finished:
                return None  # the stream was ended where it stopped
            raise stopped_early() from None


class Completions(ModelRoute):
    """
    C{POST /v1/completions}: OpenAI's legacy text completions, translated
    to Ollama's C{/api/generate} (L{translate.completion_request}).  No
    sessions.
    """

    scopes = {"POST": "chat:write"}
    route_name = "completions"
    rate_limited = True

    async def handle_POST(self, request):
        config = request.config
        body = await read_json(request)
        ollama_body, opts = translate.completion_request(body, config, request.principal)
        request.audit["model"] = ollama_body["model"]
        meter = await metered(self.accounting, request, ollama_body)
        if request.span is not None:
            trace_call(request, self.tracing, "text_completion", ollama_body)
        if opts["stream"]:
            return await self._stream(request, config, ollama_body, opts, meter)
        reply = await self.ollama.call_json(config, b"POST", "/api/generate", ollama_body, sent=meter.mark_sent, share=self.share(request))
        _count(request, reply)
        return translate.completion_response(reply, opts["model"], opts["echo_prompt"])

    async def _stream(self, request, config, ollama_body, opts, meter):
        translator = translate.CompletionStreamTranslator(opts["model"], opts["include_usage"], opts["echo_prompt"])
        on_data, rest = translated(request, meter, translator)

        async def on_end():
            return rest()

        await self.ollama.stream(config, "/api/generate", ollama_body, StreamResponse(request, "sse", self.metrics), on_data, on_end, meter.mark_sent, self.share(request))
        return None


class Capabilities:
    """
    What each model can do: the C{capabilities} of Ollama's C{POST
    /api/show} (C{["completion", "tools"]}, C{["embedding"]}), asked through
    the backend client (its slots and timeouts, a few at a time) and kept
    per model name and digest (from C{/api/tags}), so a model replaced under
    the same name is asked again.  Concurrent lists share a look under way
    (a client that leaves does not cancel it for the others).  An answer
    without a capabilities list (an Ollama older than the field) is kept as
    unknown; a failed look is not asked again for C{RETRY_AFTER} seconds.
    Either way the model goes without the field.
    """

    # Models remembered at most (the oldest forgotten first).
    MAX = 1024
    # Looks at models under way at once, across the gateway.
    CONCURRENCY = 4
    # Seconds before a model whose look failed is asked again.
    RETRY_AFTER = 60.0

    def __init__(self, ollama, clock):
        self.ollama = ollama
        self.clock = clock
        self.known = {}  # (name, digest) -> tuple of capabilities, or None: unknown
        self.failed = {}  # (name, digest) -> when to ask again
        self.pending = {}  # (name, digest) -> the look under way (a Deferred)
        self.slots = DeferredSemaphore(self.CONCURRENCY)

    async def of(self, config, share, models):
        """
        The capabilities of C{models} (name -> its C{/api/tags} entry), by
        name; a model whose capabilities are unknown is left out.
        """
        found = {}
        missing = []
        now = self.clock.seconds()
        for name, tag in models.items():
            key = (name, tag.get("digest"))
            if key in self.known:
                if self.known[key] is not None:
                    found[name] = self.known[key]
            elif self.failed.get(key, 0) <= now:
                self.failed.pop(key, None)
                missing.append(key)
        if missing:
            shown = await gatherResults([self.slots.run(self._look, config, share, key) for key in missing], consumeErrors=True)
            for key, capabilities in zip(missing, shown):
                if capabilities is not None:
                    found[key[0]] = capabilities
        return found

    def _look(self, config, share, key):
        """The capabilities of one model: the look under way, or a new one."""
        look = self.pending.get(key)
        if look is None:
            look = self.pending[key] = Deferred.fromCoroutine(self._show(config, share, key))

            def over(result):
                self.pending.pop(key, None)
                return result

            look.addBoth(over)
        # Cancelling the waiter (its client left) leaves the look running.
        waiter = Deferred()

        def tell(result):
            if not waiter.called:
                waiter.callback(result)
            return result

        look.addCallback(tell)
        return waiter

    async def _show(self, config, share, key):
        try:
            # A look at the model, not a use of it: not behind its own slots.
            shown = await self.ollama.call_json(config, b"POST", "/api/show", {"model": key[0]}, share=share, model_slot=False)
        except Exception:
            self.failed[key] = self.clock.seconds() + self.RETRY_AFTER
            while len(self.failed) > self.MAX:
                del self.failed[next(iter(self.failed))]
            return None
        capabilities = shown.get("capabilities") if isinstance(shown, dict) else None
        if isinstance(capabilities, list) and all(isinstance(c, str) for c in capabilities):
            capabilities = tuple(capabilities)
        else:
            capabilities = None
        while len(self.known) >= self.MAX:
            del self.known[next(iter(self.known))]
        self.known[key] = capabilities
        return capabilities


class Models(ModelRoute):
    """
    C{GET /v1/models}: Ollama's models, filtered by the config's allow-list,
    each with its capabilities (L{Capabilities}).
    """

    scopes = {"GET": "chat:read"}
    route_name = "models"
    # Each call asks Ollama, so it spends the caller's request budget.
    rate_limited = True

    def __init__(self, parts):
        super().__init__(parts)
        self.capabilities = Capabilities(parts.ollama, parts.reactor)
        self.item = ModelItem(parts, self.capabilities)

    def getChild(self, path, request):
        if not path:
            return NotFound()
        return self.item

    async def handle_GET(self, request):
        config = request.config
        share = self.share(request)
        tags = await self.ollama.call_json(config, b"GET", "/api/tags", share=share)
        listed = translate.listed_models(tags, config, request.principal)
        capabilities = await self.capabilities.of(config, share, listed)
        return translate.models_response(tags, config, request.principal, capabilities)


class ModelItem(ModelRoute):
    """
    C{GET /v1/models/{id}}: one model of the list (C{client.models.retrieve}),
    else 404 MODEL_NOT_FOUND.  The id is the rest of the path, slashes
    included (C{hf.co/org/model:tag}).
    """

    isLeaf = True
    scopes = {"GET": "chat:read"}
    route_name = "model"
    rate_limited = True

    def __init__(self, parts, capabilities):
        super().__init__(parts)
        self.capabilities = capabilities

    async def handle_GET(self, request):
        config = request.config
        share = self.share(request)
        model = "/".join(p.decode("utf-8", "replace") for p in request.prepath[-1:] + request.postpath)
        tags = await self.ollama.call_json(config, b"GET", "/api/tags", share=share)
        listed = translate.listed_models(tags, config, request.principal)
        # An alias stands for its target.
        target = model if model in listed else config.backend.aliases.get(model)
        capabilities = await self.capabilities.of(config, share, {target: listed[target]}) if target in listed else {}
        for entry in translate.models_response(tags, config, request.principal, capabilities)["data"]:
            if entry["id"] == model:
                return entry
        raise APIError("MODEL_NOT_FOUND", details=f"model '{model}' is not available")


class Embeddings(ModelRoute):
    """C{POST /v1/embeddings}: to Ollama's C{/api/embed}."""

    scopes = {"POST": "chat:write"}
    route_name = "embeddings"
    rate_limited = True

    async def handle_POST(self, request):
        config = request.config
        body, opts = translate.embeddings_request(await read_json(request), config, request.principal)
        request.audit["model"] = body["model"]
        meter = await metered(self.accounting, request, body, reply=False)
        if request.span is not None:
            trace_call(request, self.tracing, "embeddings", body)
        reply = await self.ollama.call_json(config, b"POST", "/api/embed", body, sent=meter.mark_sent, share=self.share(request))
        tokens = translate.count(reply, "prompt_eval_count")
        request.audit["usage"] = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
        request.audit["tokens"] = tokens
        return translate.embeddings_response(reply, opts["model"], opts["encoding_format"])


async def metered(accounting, request, body, reply=True):
    """
    A L{translate.Meter} for one call to the model, with its estimated
    prompt and reply (C{num_predict}, else a default; both at most
    C{backend.max_num_ctx}) reserved from the caller's token budget (429
    when the budget is spent); L{clawdbot.ops.accounting.Accounting.done}
    settles it to Ollama's counts.  The quotas over days, weeks and months
    are checked first (429 QUOTA_EXCEEDED).

    @param reply: whether the call produces a reply (embeddings do not).
    """
    ceiling = request.config.backend.max_num_ctx
    meter = request.audit["meter"] = translate.Meter(body, ceiling)
    estimate = meter.prompt + (translate.reply_reserve(body, ceiling) if reply else 0)
    await accounting.check_quota(request, estimate)
    await accounting.reserve_tokens(request, estimate)
    return meter




def add_routes(v1, parts):
    v1.putChild(b"models", Models(parts))
    v1.putChild(b"embeddings", Embeddings(parts))
    v1.putChild(b"completions", Completions(parts))
    chat = Node()
    v1.putChild(b"chat", chat)
    chat.putChild(b"completions", ChatCompletions(parts))
