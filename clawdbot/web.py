"""
The HTTP layer: a request class that enforces the body limit while the body
arrives, a site per listener, and the base resource that runs handlers,
checks method and scope, and renders every error in one place.
"""

import io
import json
import time
import uuid

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from clawdbot.errors import APIError, error_body, internal_error, invalid

log = Logger(namespace="clawdbot.web")

JSON_TYPE = b"application/json; charset=utf-8"
# Seconds a refused body is drained before the connection closes.
LINGER = 2.0
_REASONS = {413: b"Payload Too Large"}


class GatewayRequest(server.Request):
    """
    A request that refuses a body over the configured limit before it is
    read whole, carries a request id, a snapshot of the config it started
    under, and knows when its client has gone.

    @ivar refused: set once a 413 has been written; nothing else happens for
        this request.
    @ivar gone: the client disconnected before the response finished.
    """

    defaultContentType = None
    refused = False
    gone = False
    draining = False
    config = None
    principal = None
    route = None
    error = None
    sampled = False
    captured = None
    handler = None
    stream_format = None

    def __init__(self, *args, **kwargs):
        # The API takes JSON only: skip twisted.web's form parsing (costly
        # content-type parsing on every POST).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)
        self.request_id = uuid.uuid4().hex
        self.started = time.perf_counter()
        self._site = getattr(self.channel, "site", None)
        # What the access log records beyond the HTTP basics: model,
        # session, tokens, upstream latency.
        self.audit = {}
        self.body_size = 0
        self.notifyFinish().addCallbacks(self._done, self._lost)

    def _gateway(self):
        return getattr(self._site, "gateway", None)

    def _lost(self, reason):
        self.gone = True
        self._done(None)

    def _done(self, _):
        gateway = self._gateway()
        if gateway is not None:
            gateway.request_done(self)

    captured_size = 0
    body_sample = b""

    def write(self, data):
        if self.captured is not None and data and self.captured_size < 65536:
            self.captured.append(data)
            self.captured_size += len(data)
        super().write(data)

    def body_copy(self, limit=65537):
        """The start of the request body (one byte past the log's limit, to tell it was cut)."""
        try:
            position = self.content.tell()
            self.content.seek(0)
            data = self.content.read(limit)
            self.content.seek(position)
        except (AttributeError, ValueError):
            return b""  # no body, or already released with the connection
        return data

    def _limit(self):
        gateway = self._gateway()
        if gateway is None:
            return None
        return gateway.config.limits.max_body

    def gotLength(self, length):
        limit = self._limit()
        if length is not None and limit is not None and length > limit:
            self.content = io.BytesIO()  # stays empty: the body is dropped
            self._refuse(limit)
            # The body is never stored, so don't ask the client for it.
            self.requestHeaders.removeHeader(b"expect")
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.body_size += len(data)
        limit = self._limit()
        if limit is not None and self.body_size > limit:
            self._refuse(limit)
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)

    def _refuse(self, limit):
        """
        Answer 413 straight onto the connection: the request is still
        arriving, so the normal response machinery cannot be used.  The rest
        of the body is read and dropped for a moment before the connection
        closes (closing on unread data would reset it, and a proxy in front
        would report a 502 instead of this 413).
        """
        self.refused = True
        err = APIError("PAYLOAD_TOO_LARGE", details=f"the body is larger than the limit of {limit} bytes")
        self.code, self.error = 413, err
        body = error_body(err)
        head = [
            b"HTTP/1.1 413 Payload Too Large",
            b"Content-Type: " + JSON_TYPE,
            b"Content-Length: " + str(len(body)).encode(),
            b"X-Content-Type-Options: nosniff",
            b"X-Request-Id: " + self.request_id.encode(),
            b"Connection: close",
        ]
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        log.info("Refused a request body over the {limit} byte limit", limit=limit, request_id=self.request_id)
        clock = getattr(self._site, "reactor", None)
        if clock is None:
            from twisted.internet import reactor as clock
        self._linger = clock.callLater(LINGER, transport.loseConnection)

    def _close_refused(self):
        """The refused body has arrived (and been dropped): close now."""
        linger = getattr(self, "_linger", None)
        if linger is not None and linger.active():
            linger.cancel()
        if self.channel is not None:
            self.channel.transport.loseConnection()

    def process(self):
        if self.refused:
            self._close_refused()
            return
        gateway = self._gateway()
        if gateway is not None:
            self.config = gateway.config
            gateway.request_started(self)
        super().process()

    def render(self, resource):
        self.setHeader(b"server", b"clawdbot")
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"x-request-id", self.request_id.encode())
        if self.site.debug and not _local_request(self):
            write_error(self, APIError("ORIGIN_REJECTED", details="the debug port only answers pages and tools on this machine"))
            return
        if self.draining:
            self.setHeader(b"connection", b"close")
            write_error(self, APIError("SHUTTING_DOWN", details="the gateway is restarting; retry shortly", headers={"Retry-After": "1"}))
            return
        super().render(resource)


_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def _host_is_local(value):
    host = value.strip().lower()
    if host.startswith("["):
        host = host.split("]")[0] + "]"
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in _LOCAL_HOSTS or host.startswith("127.")


def _local_request(request):
    """
    The debug listener acts as the dev principal without credentials, so
    only this machine may drive it: a C{Host} naming loopback (no DNS
    rebinding), and an C{Origin}, when a browser sends one, of a loopback
    page (no cross-site requests).
    """
    host = (request.getHeader(b"host") or "")
    host = host.decode("latin-1") if isinstance(host, bytes) else host
    if not _host_is_local(host):
        return False
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    origin = origin.decode("latin-1") if isinstance(origin, bytes) else origin
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and _host_is_local(rest)


class GatewaySite(server.Site):
    """
    One listener's site.  C{debug} marks the unauthenticated loopback debug
    listener, whose requests act as the configured dev principal.
    """

    requestFactory = GatewayRequest
    noisy = False

    def __init__(self, resource, gateway, debug=False, **kwargs):
        super().__init__(resource, **kwargs)
        self.gateway = gateway
        self.debug = debug

    def log(self, request):
        """Access logging is the gateway's own; twisted.web's is off."""


def write_json(request, status, payload, headers=None):
    """Finish C{request} with a JSON body, unless its client has gone."""
    if request.gone or request.finished:
        return
    if status == 204:
        request.setResponseCode(204)
        request.finish()
        return
    body = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"content-length", str(len(body)).encode())
    for name, value in (headers or {}).items():
        request.setHeader(name.encode() if isinstance(name, str) else name, value.encode() if isinstance(value, str) else value)
    request.write(body)
    request.finish()


def end_stream(request, err):
    """End a response whose headers are sent: an error event (or line), then the end."""
    if request.gone or request.finished:
        return
    request.error = err
    if request.stream_format == "ndjson":
        request.write(error_body(err) + b"\n")
    else:
        request.write(b"data: " + error_body(err) + b"\n\n")
    if request.producer is not None:
        request.unregisterProducer()
    request.finish()


def write_error(request, err):
    request.error = err
    write_json(request, err.status, error_body(err), err.headers)


def read_json(request, require_object=True):
    """
    The request body parsed as JSON.

    @raise APIError: INVALID_REQUEST with a curated reason.
    """
    ctype = (request.getHeader(b"content-type") or "")
    if isinstance(ctype, bytes):
        ctype = ctype.decode("latin-1")
    if ctype and "json" not in ctype.lower():
        raise invalid("the body must be JSON (Content-Type: application/json)")
    content = request.content
    if content is None:
        raise invalid("the body is missing")
    content.seek(0)
    raw = content.read()
    if not raw.strip():
        raise invalid("the body is empty; a JSON object is expected")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the body is not valid JSON") from None
    except RecursionError:
        raise invalid("the body is nested too deeply") from None
    if require_object and not isinstance(value, dict):
        raise invalid("the body must be a JSON object")
    return value


class JSONResponse:
    """What a handler returns for a JSON answer other than a plain 200."""

    def __init__(self, payload, status=200, headers=None):
        self.payload = payload
        self.status = status
        self.headers = headers or {}


class NotFound(Resource):
    """A JSON 404 for any path and method."""

    isLeaf = True

    def render(self, request):
        err = APIError("NOT_FOUND", details="no such route")
        request.setResponseCode(err.status)
        request.setHeader(b"content-type", JSON_TYPE)
        return error_body(err)


class Node(Resource):
    """A path segment with children and nothing of its own: 404 elsewhere."""

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        return NotFound().render(request)


class APIResource(Resource):
    """
    The base of every API route.

    A subclass maps each HTTP method it answers to the scope that method
    needs in C{scopes} (C{None}: public; C{""}: any valid credential) and
    implements it as C{async def handle_METHOD(self, request)}.  The handler
    returns a JSON-able value (a 200), a L{JSONResponse}, or C{None} when it
    wrote the response itself (streams).  Any L{APIError} it raises becomes
    the JSON error; anything else is logged and becomes a bare 500.
    """

    scopes = {}
    # The route's name in metrics (else the class name).
    route_name = None
    # Subject to the per-principal request and token budgets.
    rate_limited = False
    # Subject to the per-address limit (the sign-in endpoints).
    ip_limited = False

    def __init__(self, gateway):
        super().__init__()
        self.gateway = gateway

    def getChild(self, path, request):
        return NotFound()

    def route(self, request):
        """The C{{method: scope}} this request may use, or C{None} for a 404."""
        return self.scopes

    def render(self, request):
        scopes = self.route(request)
        if scopes is None:
            return NotFound().render(request)
        method = request.method.decode("ascii", "replace")
        if method == "HEAD" and "GET" in scopes:
            method = "GET"
        if method == "OPTIONS" and request.site.debug:
            self.gateway.cors(request)
            request.setResponseCode(204)
            return b""
        if method not in scopes:
            allowed = ", ".join(sorted(scopes))
            err = APIError("METHOD_NOT_ALLOWED", details=f"use {allowed}", headers={"Allow": allowed})
            write_error(request, err)
            return server.NOT_DONE_YET
        if request.site.debug:
            self.gateway.cors(request)
        request.route = self.route_name or type(self).__name__
        d = request.handler = Deferred.fromCoroutine(self._run(request, method, scopes[method]))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    async def _run(self, request, method, needed):
        try:
            if needed is not None:
                request.principal = await self.gateway.authenticate(request)
                self.gateway.authorize(request, request.principal, needed)
                if self.rate_limited:
                    await self.gateway.check_rate(request)
            if self.ip_limited:
                await self.gateway.check_ip_rate(request)
            handler = getattr(self, "handle_" + method)
            result = await handler(request)
        except APIError as err:
            write_error(request, err)
        except CancelledError:
            if request.draining and not request.gone:
                # Shutting down: a stream already carries its error event.
                if request.startedWriting:
                    if not request.finished:
                        request.finish()
                else:
                    write_error(request, APIError("SHUTTING_DOWN", details="the gateway is restarting; retry shortly", headers={"Retry-After": "1"}))
            elif not request.gone:
                log.failure("Handler cancelled without a disconnect", request_id=request.request_id)
                write_error(request, internal_error())
        except Exception:
            log.failure("Unhandled error in {method} {path}", Failure(), method=method, path=request.path.decode("latin-1"), request_id=request.request_id)
            if request.startedWriting:
                end_stream(request, internal_error())
            else:
                write_error(request, internal_error())
        else:
            if result is None:
                return
            if isinstance(result, JSONResponse):
                write_json(request, result.status, result.payload, result.headers)
            else:
                write_json(request, 200, result)
