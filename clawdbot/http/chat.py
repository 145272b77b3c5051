"""
The model routes: OpenAI's chat and legacy completions, models and
embeddings, and the authenticated pass-through of Ollama's native API.
"""

import json
import posixpath
import time

from twisted.internet.defer import CancelledError

from clawdbot.backend import native
from clawdbot.backend import translate
from clawdbot.errors import APIError, invalid, ollama_error_body
from clawdbot.backend.ollama import upstream_error
from clawdbot.http.history import check_history_quota, load_owned
from clawdbot.strictjson import loads_checked
from clawdbot.backend.translate import DONE, LineSplitter, StreamTranslator, UpstreamStreamError, sse_error
from clawdbot.http.site import APIResource, JSONResponse, Node, NotFound, read_json

SSE_HEADERS = {
    b"content-type": b"text/event-stream; charset=utf-8",
    b"cache-control": b"no-cache",
    b"x-accel-buffering": b"no",
}
NDJSON_HEADERS = {b"content-type": b"application/x-ndjson", b"cache-control": b"no-cache", b"x-accel-buffering": b"no"}


def _encode(payload):
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


async def relay(gateway, request, config, path, body, payload, headers, on_data, on_end=None, on_error=None, on_sent=None):
    """
    Send C{body} to Ollama at C{path} and stream its reply to C{request}:
    each chunk goes through C{on_data(bytes) -> bytes} and is written as it
    comes, with the backend connection as the request's producer (a slow
    client slows the backend read; a gone client drops it).

    Errors before the first byte raise L{APIError} (the caller's JSON
    error); errors after it are written by C{on_error(APIError) -> bytes}
    and end the response.

    @param on_end: C{async () -> bytes}, what to write when the body ends;
        it raises an L{APIError} when the body ended too early.
    @param on_sent: called once the call has its backend slot and goes to
        Ollama (L{translate.Meter.mark_sent}).
    @return: C{True} when the reply completed.
    """
    backend = gateway.backend
    clock = gateway.reactor
    started = clock.seconds()
    deadline = started + config.timeout
    lease = await backend.acquire(config)
    if on_sent is not None:
        on_sent()
    try:
        response = await backend.send(config, b"POST", path, body, deadline, lease)
        request.audit["upstream_latency"] = round(clock.seconds() - started, 6)
        if response.code != 200:
            if on_sent is not None:
                on_sent(False)
            raw = await backend.collect(response, config, deadline, limit=1024 * 1024)
            raise upstream_error(response.code, raw, payload)
        request.setResponseCode(200)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.stream_format = "sse" if headers is SSE_HEADERS else "ndjson"
        metrics = gateway.metrics
        metrics.active_streams.inc()
        first = [True]

        def deliver(data):
            out = on_data(data)
            if out and not request.gone:
                if first[0]:
                    first[0] = False
                    metrics.ttft.observe(time.perf_counter() - request.started)
                request.write(out)

        reader = await backend.read(response, deliver, config, deadline)
        request.registerProducer(reader.transport, True)
        try:
            await reader.finished
        except APIError as err:
            ok, error = False, err
        else:
            ok, error = True, None
        finally:
            if not request.gone:
                request.unregisterProducer()
        if ok and on_end is not None:
            try:
                tail = await on_end()
            except APIError as err:
                ok, error = False, err
        if not ok:
            tail = on_error(error) if on_error else b""
        elif on_end is None:
            tail = b""
        if not request.gone:
            if tail:
                request.write(tail)
            request.finish()
        return ok
    finally:
        if request.stream_format is not None:
            gateway.metrics.active_streams.dec()
        backend.release(config, lease)


def _text(message):
    return message.get("content") or ""


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
        try:
            lines = splitter.feed(data)
            meter.streamed += len(lines)
            out = b"".join(translator.line(line) for line in lines if not translator.done)
        except UpstreamStreamError as e:
            raise APIError("UPSTREAM_UNAVAILABLE", details=e.args[0]) from None
        if translator.final is not None and "usage" not in request.audit:
            # Before the response ends: the budget is charged when it does.
            _count(request, translator.final)
        return out

    def rest():
        tail = b""
        if not translator.done:
            tail = b"".join(on_data(line + b"\n") for line in splitter.rest())
        if not translator.done:
            raise APIError("UPSTREAM_UNAVAILABLE", details="the model backend ended the stream early")
        return tail

    return on_data, rest


def _count(request, reply):
    """Ollama's counts for a whole reply, for the log and the token budget."""
    request.audit["usage"] = translate.usage(reply)
    request.audit["tokens"] = request.audit["usage"]["total_tokens"]


class ChatCompletions(APIResource):
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
        ollama_body, opts = translate.chat_request(body, config, request.principal, session_id)
        request.audit["model"] = ollama_body["model"]
        if session_id is not None:
            request.audit["session"] = session_id
            # Only the owner adds turns to a session or clears it (checked
            # before any image is decoded for the turn).
            await load_owned(self.gateway, request.principal, session_id)
            if body.get("messages") == []:
                await self.gateway.store.clear(session_id)
                return {"object": "session.context_cleared", "session_id": session_id}
        # Images are decoded on the image workers, never here on the reactor.
        await self.gateway.images.process_messages(ollama_body["messages"], config.images)
        if session_id is None:
            return await self._complete(request, config, ollama_body, opts, None)
        limits = config.history
        for message in ollama_body["messages"]:
            if len(_text(message)) > limits.max_message_chars:
                raise invalid(f"a message is longer than the limit of {limits.max_message_chars} characters")

        async def turn():
            context = await self.gateway.store.context(session_id, limits.context_messages) if limits.context_messages else []
            new = [(m["role"], _text(m), False) for m in ollama_body["messages"]]
            if await self.gateway.store.count_messages(session_id) + len(new) + 1 > limits.max_messages_per_session:
                raise invalid(f"the session has reached the limit of {limits.max_messages_per_session} messages; start a new one")
            release = await check_history_quota(self.gateway.store, request.principal, limits, new, self.gateway.history_reservations)
            try:
                ollama_body["messages"] = [{"role": m.role, "content": m.content} for m in context] + ollama_body["messages"]
                return await self._complete(request, config, ollama_body, opts, new)
            finally:
                release()

        return await self.gateway.session_locks.run(session_id, turn)

    async def _store(self, request, new, reply, incomplete):
        sid = request.audit["session"]
        await self.gateway.store.append(sid, new + [("assistant", reply, incomplete)])

    async def _complete(self, request, config, ollama_body, opts, new):
        if opts["instruction"]:
            # For the model only: a session stores the turn as the user sent it.
            ollama_body["messages"] = translate.with_instruction(ollama_body["messages"], opts["instruction"])
        meter = await metered(self.gateway, request, ollama_body)
        if opts["required_tools"]:
            return await self._required(request, config, ollama_body, opts, new, meter)
        if opts["stream"]:
            return await self._stream(request, config, ollama_body, opts, new, meter)
        reply = await self.gateway.backend.call_json(config, b"POST", "/api/chat", ollama_body, sent=meter.mark_sent)
        return await self._result(request, reply, opts, new)

    async def _result(self, request, reply, opts, new):
        """A whole Ollama reply as a C{chat.completion}, counted (and stored for a session turn)."""
        result = translate.chat_response(reply, opts["model"], single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])
        _count(request, reply)
        if new is not None:
            await self._store(request, new, result["choices"][0]["message"].get("content") or "", False)
        return result

    async def _required(self, request, config, ollama_body, opts, new, meter):
        """
        C{tool_choice: "required"} with several tools: the model gets the
        tools, and when it answers without calling one it is asked once
        more, held by a schema to a call of one of them (L{translate.union_format}).
        Whether a call came is known only at the end, so Ollama's reply is
        taken whole; a streaming client gets it as one chunk.
        """
        body = dict(ollama_body, stream=False)
        backend = self.gateway.backend
        functions = opts["required_tools"]
        # One timeout for the request, both calls included.
        deadline = self.gateway.reactor.seconds() + config.timeout
        reply = translate.offered_calls_only(await backend.call_json(config, b"POST", "/api/chat", body, sent=meter.mark_sent, deadline=deadline), functions)
        _count(request, reply)
        if not reply["message"].get("tool_calls") and reply.get("done_reason") != "length":
            retry = {key: value for key, value in body.items() if key != "tools"}
            retry["format"] = translate.union_format(functions)
            retry["messages"] = translate.with_instruction(body["messages"], translate.union_instruction(functions))
            ceiling = config.backend.max_num_ctx
            await self.gateway.reserve_tokens(request, translate.Meter(retry, ceiling).prompt + translate.reply_reserve(retry, ceiling))
            second = await backend.call_json(config, b"POST", "/api/chat", retry, deadline=deadline)
            reply = translate.with_counts_of(second, reply)
            _count(request, reply)
            reply = translate.call_from_union(reply, functions)
        if not opts["stream"]:
            return await self._result(request, reply, opts, new)
        translator = StreamTranslator(opts["model"], opts["include_usage"], single_tool_call=opts["single_tool_call"])
        out = translator.line(_encode(reply))
        if new is not None:
            await self._store(request, new, "".join(translator.content), False)
        request.setResponseCode(200)
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        request.write(out)
        request.finish()
        return None

    async def _stream(self, request, config, ollama_body, opts, new, meter):
        translator = StreamTranslator(opts["model"], opts["include_usage"], hold_done=new is not None, single_tool_call=opts["single_tool_call"], forced_tool=opts["forced_tool"], offered=opts["offered"])
        on_data, rest = translated(request, meter, translator)

        async def on_end():
            tail = rest()
            if new is not None:
                # Acknowledge ([DONE]) only once the turn is stored.
                await self._store(request, new, "".join(translator.content), False)
                tail += DONE
            return tail

        stored = False
        try:
            ok = await relay(self.gateway, request, config, "/api/chat", _encode(ollama_body), ollama_body, SSE_HEADERS, on_data, on_end, sse_error, meter.mark_sent)
            stored = ok
        except CancelledError:
            # The client went away: keep what was said, marked incomplete.
            if new is not None and translator.sent_role:
                await self._store(request, new, "".join(translator.content), True)
                stored = True
            raise
        finally:
            if translator.final is not None:
                _count(request, translator.final)
        if not stored and new is not None and translator.sent_role:
            await self._store(request, new, "".join(translator.content), True)
        return None


class Completions(APIResource):
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
        ollama_body, opts = translate.completion_request(await read_json(request), config, request.principal)
        request.audit["model"] = ollama_body["model"]
        meter = await metered(self.gateway, request, ollama_body)
        if opts["stream"]:
            return await self._stream(request, config, ollama_body, opts, meter)
        reply = await self.gateway.backend.call_json(config, b"POST", "/api/generate", ollama_body, sent=meter.mark_sent)
        _count(request, reply)
        return translate.completion_response(reply, opts["model"], opts["echo_prompt"])

    async def _stream(self, request, config, ollama_body, opts, meter):
        translator = translate.CompletionStreamTranslator(opts["model"], opts["include_usage"], opts["echo_prompt"])
        on_data, rest = translated(request, meter, translator)

        async def on_end():
            return rest()

        await relay(self.gateway, request, config, "/api/generate", _encode(ollama_body), ollama_body, SSE_HEADERS, on_data, on_end, sse_error, meter.mark_sent)
        return None


class Models(APIResource):
    """C{GET /v1/models}: Ollama's models, filtered by the config's allow-list."""

    scopes = {"GET": "chat:read"}
    route_name = "models"
    # Each call asks Ollama, so it spends the caller's request budget.
    rate_limited = True

    def getChild(self, path, request):
        if not path:
            return NotFound()
        return ModelItem(self.gateway)

    async def handle_GET(self, request):
        tags = await self.gateway.backend.call_json(request.config, b"GET", "/api/tags")
        return translate.models_response(tags, request.config)


class ModelItem(APIResource):
    """
    C{GET /v1/models/{id}}: one model of the list (C{client.models.retrieve}),
    else 404 MODEL_NOT_FOUND.  The id is the rest of the path, slashes
    included (C{hf.co/org/model:tag}).
    """

    isLeaf = True
    scopes = {"GET": "chat:read"}
    route_name = "model"
    rate_limited = True

    async def handle_GET(self, request):
        model = "/".join(p.decode("utf-8", "replace") for p in request.prepath[-1:] + request.postpath)
        tags = await self.gateway.backend.call_json(request.config, b"GET", "/api/tags")
        for entry in translate.models_response(tags, request.config)["data"]:
            if entry["id"] == model:
                return entry
        raise APIError("MODEL_NOT_FOUND", details=f"model '{model}' is not available")


class Embeddings(APIResource):
    """C{POST /v1/embeddings}: to Ollama's C{/api/embed}."""

    scopes = {"POST": "chat:write"}
    route_name = "embeddings"
    rate_limited = True

    async def handle_POST(self, request):
        config = request.config
        body, opts = translate.embeddings_request(await read_json(request), config)
        request.audit["model"] = body["model"]
        meter = await metered(self.gateway, request, body, reply=False)
        reply = await self.gateway.backend.call_json(config, b"POST", "/api/embed", body, sent=meter.mark_sent)
        tokens = reply.get("prompt_eval_count") or 0
        request.audit["usage"] = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
        request.audit["tokens"] = tokens
        return translate.embeddings_response(reply, opts["model"], opts["encoding_format"])


# Ollama's native API: name -> (method, scope, streams).
NATIVE = {
    "chat": ("POST", "chat:write", True),
    "generate": ("POST", "chat:write", True),
    "embed": ("POST", "chat:write", False),
    "show": ("POST", "chat:read", False),
    "tags": ("GET", "chat:read", False),
    "version": ("GET", "chat:read", False),
    "ps": ("GET", "chat:read", False),
    "embeddings": ("POST", "chat:write", False),
    "pull": ("POST", "admin", True),
    "push": ("POST", "admin", True),
    "create": ("POST", "admin", True),
    "copy": ("POST", "admin", False),
    "delete": ("DELETE", "admin", False),
}


def native_name(postpath):
    """
    The native API name a path asks for, after normalisation (C{.},
    C{..}, doubled and encoded slashes), or C{None}.
    """
    joined = "/".join(p.decode("utf-8", "replace") for p in postpath)
    if "\x00" in joined or "\\" in joined:
        return None
    normal = posixpath.normpath("/" + joined)
    name = normal.lstrip("/")
    return name if name in NATIVE else None


def _count_native(request, raw):
    """Token counts from one of Ollama's own answers (or its final stream line)."""
    try:
        reply = json.loads(raw)
    except (ValueError, RecursionError):
        return
    if isinstance(reply, dict) and reply.get("done", True) and ("eval_count" in reply or "prompt_eval_count" in reply):
        request.audit["usage"] = translate.usage(reply)
        request.audit["tokens"] = request.audit["usage"]["total_tokens"]


class NativeAPI(APIResource):
    """
    C{/ollama/api/{name}}: Ollama's own API for Ollama clients, behind the
    gateway's authentication and its rules (L{clawdbot.backend.native}): known
    fields only, allowed models only, images validated, audit fields set by
    the gateway, and what changes the shared GPU bounded or admin-only.
    Model management needs C{admin}; anything not in L{NATIVE} is a 404.
    Every call counts against the caller's request budget.
    """

    isLeaf = True
    route_name = "ollama_native"
    rate_limited = True
    # Ollama clients read a string in "error" (ollama-python's ResponseError).
    error_body = staticmethod(ollama_error_body)

    def route(self, request):
        name = native_name(request.postpath)
        if name is None:
            return None
        request.native = name
        method, scope, _ = NATIVE[name]
        return {method: scope}

    async def _dispatch(self, request):
        name = request.native
        method, _, streams = NATIVE[name]
        config = request.config
        path = "/api/" + name
        backend = self.gateway.backend
        if name in ("tags", "ps"):
            raw = await backend.call(config, b"GET", path)
            if not config.backend.models:
                return JSONResponse(raw)
            try:
                tags = loads_checked(raw)
            except ValueError:
                raise APIError("UPSTREAM_UNAVAILABLE", details="the model backend sent a malformed reply") from None
            return native.filter_tags(tags, config)
        if method == "GET":
            return JSONResponse(await backend.call(config, b"GET", path))
        payload = await read_json(request)
        if name in native.FIELDS:
            payload, images = native.native_request(name, payload, config, request.principal)
            request.audit["model"] = payload["model"]
            if images:
                await self.gateway.images.process_base64_lists(images, config.images)
        counted = name in ("chat", "generate", "embed", "embeddings")
        meter = await metered(self.gateway, request, payload, reply=name in ("chat", "generate")) if counted else None
        sent = meter.mark_sent if counted else None
        wants_stream = streams and payload.get("stream", True) is not False
        if not wants_stream:
            # Ollama's own body, as Ollama sent it (some answers are empty).
            raw = await backend.call(config, method.encode(), path, payload, sent=sent)
            if counted:
                _count_native(request, raw)
            return JSONResponse(raw)

        def on_error(err):
            return ollama_error_body(err) + b"\n"

        splitter = LineSplitter()

        def on_data(data):
            # Pass the bytes through as they are; read the counts off the
            # final line so the token budget and the log see them (and count
            # lines meanwhile, for a client that leaves before the end).
            if counted:
                for line in splitter.feed(data):
                    if b'"done":true' in line:
                        _count_native(request, line)
                    else:
                        meter.streamed += 1
            return data

        await relay(self.gateway, request, config, path, _encode(payload), payload, NDJSON_HEADERS, on_data, None, on_error, sent)
        return None

    async def handle_GET(self, request):
        return await self._dispatch(request)

    async def handle_POST(self, request):
        return await self._dispatch(request)

    async def handle_DELETE(self, request):
        return JSONResponse(await self.gateway.backend.call(request.config, b"DELETE", "/api/delete", await read_json(request)))


async def metered(gateway, request, body, reply=True):
    """
    A L{translate.Meter} for one call to the model, with its estimated
    prompt and reply (C{num_predict}, else a default; both at most
    C{backend.max_num_ctx}) reserved from the caller's token budget (429
    when the budget is spent); L{clawdbot.ops.runtime.Gateway.request_done}
    settles it to Ollama's counts.

    @param reply: whether the call produces a reply (embeddings do not).
    """
    ceiling = request.config.backend.max_num_ctx
    meter = request.audit["meter"] = translate.Meter(body, ceiling)
    await gateway.reserve_tokens(request, meter.prompt + (translate.reply_reserve(body, ceiling) if reply else 0))
    return meter




def add_routes(root, v1, gateway):
    v1.putChild(b"models", Models(gateway))
    v1.putChild(b"embeddings", Embeddings(gateway))
    v1.putChild(b"completions", Completions(gateway))
    chat = Node()
    v1.putChild(b"chat", chat)
    chat.putChild(b"completions", ChatCompletions(gateway))
    ollama = Node()
    root.putChild(b"ollama", ollama)
    ollama.putChild(b"api", NativeAPI(gateway))
