"""
C{/ollama/api/{name}}: Ollama's own API for Ollama clients, behind the
gateway's door (authentication, scopes, budgets) and its rules for what
may reach the shared model (L{clawdbot.backend.native}).
"""

import json
import posixpath

from clawdbot.backend import native, translate
from clawdbot.backend.translate import LineSplitter
from clawdbot.errors import APIError, ollama_error_body
from clawdbot.http.chat import ModelRoute, metered
from clawdbot.http.resource import JSONResponse, Node, StreamResponse, read_json
from clawdbot.strictjson import loads_checked


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


# The audit event of each model-management call.
MODEL_EVENTS = {"pull": "model.pulled", "push": "model.pushed", "create": "model.created", "copy": "model.copied", "delete": "model.deleted"}


class NativeAPI(ModelRoute):
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

    def __init__(self, parts):
        super().__init__(parts)
        self.parts_audit = parts.audit

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
        backend = self.ollama
        if name in ("tags", "ps"):
            raw = await backend.call(config, b"GET", path, share=self.share(request))
            if not config.backend.models and translate.usable_models(request.principal, config) is None:
                return JSONResponse(raw)
            try:
                tags = loads_checked(raw)
            except ValueError:
                raise APIError("UPSTREAM_UNAVAILABLE", details="the model backend sent a malformed reply") from None
            return native.filter_tags(tags, config, request.principal)
        if method == "GET":
            return JSONResponse(await backend.call(config, b"GET", path, share=self.share(request)))
        payload = await read_json(request)
        if name in native.FIELDS:
            payload, images = native.native_request(name, payload, config, request.principal)
            request.audit["model"] = payload["model"]
            if images:
                await self.images.process_base64_lists(images, config.images)
        counted = name in ("chat", "generate", "embed", "embeddings")
        meter = await metered(self.accounting, request, payload, reply=name in ("chat", "generate")) if counted else None
        sent = meter.mark_sent if counted else None
        wants_stream = streams and payload.get("stream", True) is not False
        if not wants_stream:
            # Ollama's own body, as Ollama sent it (some answers are empty).
            raw = await backend.call(config, method.encode(), path, payload, sent=sent, share=self.share(request))
            if counted:
                _count_native(request, raw)
            self._audit(request, name, payload)
            return JSONResponse(raw)

        splitter = LineSplitter()
        failed = []

        def on_data(data):
            # Pass the bytes through as they are; read the counts off the
            # final line so the token budget and the log see them (and count
            # lines meanwhile, for a client that leaves before the end).
            # Model management reports a failure as a line of its own.
            if counted or name in MODEL_EVENTS:
                for line in splitter.feed(data):
                    if not counted:
                        if b'"error"' in line and _is_error_line(line):
                            failed.append(line)
                    elif b'"done":true' in line:
                        _count_native(request, line)
                    else:
                        meter.streamed += 1
            return data

        if await self.ollama.stream(config, path, payload, StreamResponse(request, "ndjson", self.metrics), on_data, None, sent, self.share(request)) and not failed:
            self._audit(request, name, payload)
        return None

    def _audit(self, request, name, payload):
        """Model management (an admin's pull, push, create, copy or delete that Ollama took) goes in the audit trail."""
        event = MODEL_EVENTS.get(name)
        if event is None:
            return
        if name == "copy":
            obj = payload.get("destination")
            details = {"source": payload.get("source") if isinstance(payload.get("source"), str) else None}
        else:
            # (Ollama still takes the older "name" for the model.)
            obj, details = payload.get("model") or payload.get("name"), {}
        self.parts_audit.record(event, request, obj=obj if isinstance(obj, str) else None, **details)

    async def handle_GET(self, request):
        return await self._dispatch(request)

    async def handle_POST(self, request):
        return await self._dispatch(request)

    async def handle_DELETE(self, request):
        payload = await read_json(request)
        raw = await self.ollama.call(request.config, b"DELETE", "/api/delete", payload, share=self.share(request))
        self._audit(request, "delete", payload)
        return JSONResponse(raw)


def _is_error_line(line):
    try:
        value = loads_checked(line)
    except ValueError:
        return False
    return isinstance(value, dict) and "error" in value


def add_routes(root, parts):
    ollama = Node()
    root.putChild(b"ollama", ollama)
    ollama.putChild(b"api", NativeAPI(parts))
