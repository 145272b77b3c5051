"""
The one path from a handler to its answer: the base resource that checks
the method and the scope, has the caller authenticated and its budget
checked, runs the handler and renders what it returns; the one error
renderer (the JSON shape before anything is written, the stream's error
event after); streamed answers (L{StreamResponse}); and the JSON bodies,
read strictly (big ones on worker threads).
"""

import json
import threading
import time

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from clawdbot.backend.ollama import IStreamConsumer
from clawdbot.errors import APIError, error_body, internal_error, invalid, ollama_error_body
from clawdbot.http import cors
from clawdbot.strictjson import parse_json
from clawdbot.workers import Workers, shutting_down

log = Logger(namespace="clawdbot.web")

JSON_TYPE = b"application/json; charset=utf-8"

# Bodies up to this size are parsed on the reactor (a few milliseconds at
# worst, 32,000 numbers; a typical body far less); bigger ones on
# L{JSONParsers}.
INLINE_JSON = 64 * 1024

def write_json(request, status, payload, headers=None):
    """Finish C{request} with a JSON body, unless its client has gone."""
    if request.gone or request.finished:
        return
    if status == 204:
        request.setResponseCode(204)
        request.finish()
        return
    body = payload if isinstance(payload, bytes) else json_bytes(payload)
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"content-length", str(len(body)).encode())
    for name, value in (headers or {}).items():
        request.setHeader(name.encode() if isinstance(name, str) else name, value.encode() if isinstance(value, str) else value)
    request.write(body)
    request.finish()


def error_event(fmt, err):
    """
    The bytes that end a stream with C{err}: an SSE event in the §4 shape,
    or (C{"ndjson"}, only the native routes stream it) a line in Ollama's;
    a callable C{fmt} makes the event of an API of its own (Anthropic's,
    the Responses API's: L{clawdbot.http.agents}).
    """
    if callable(fmt):
        return fmt(err)
    if fmt == "ndjson":
        return ollama_error_body(err) + b"\n"
    return b"data: " + error_body(err) + b"\n\n"


def end_stream(request, err):
    """End a response whose headers are sent: an error event (or line), then the end."""
    if request.gone or request.finished:
        return
    request.error = err
    request.write(error_event(request.stream_format, err.traced(getattr(request, "trace_id", None))))
    if request.producer is not None:
        request.unregisterProducer()
    request.finish()


def answer_error(request, err, render=error_body):
    """
    The one way an error reaches a client, whatever the response's state:
    the whole JSON answer (in C{render}'s shape) while nothing is written,
    the stream's error event once it has started, nothing once it is over.
    """
    if request.gone or request.finished:
        return
    if request.startedWriting:
        end_stream(request, err)
    else:
        write_error(request, err, render)


SSE_HEADERS = {
    b"content-type": b"text/event-stream; charset=utf-8",
    b"cache-control": b"no-cache",
    b"x-accel-buffering": b"no",
}
NDJSON_HEADERS = {b"content-type": b"application/x-ndjson", b"cache-control": b"no-cache", b"x-accel-buffering": b"no"}


@implementer(IStreamConsumer)
class StreamResponse:
    """
    A streamed answer to C{request}, SSE or NDJSON, as L{Ollama.stream}
    writes it: headers once Ollama says 200, bytes as they come (time to
    first token and streams in flight counted on C{metrics}), the end, or
    the stream's error event.

    @param fmt: C{"sse"}, C{"ndjson"}, or a callable that makes the
        stream's error event (an SSE stream of another API: L{error_event}).
    """

    def __init__(self, request, fmt, metrics):
        self.request = request
        self.fmt = fmt
        self.metrics = metrics
        self.begun = False
        self.first = True

    @property
    def gone(self):
        return self.request.gone

    def responded(self, seconds):
        self.request.audit["upstream_latency"] = round(seconds, 6)

    def begin(self):
        request = self.request
        request.setResponseCode(200)
        for name, value in (NDJSON_HEADERS if self.fmt == "ndjson" else SSE_HEADERS).items():
            request.setHeader(name, value)
        request.stream_format = self.fmt
        self.metrics.active_streams.inc()
        self.begun = True

    def write(self, data):
        if self.request.gone:
            return
        if self.first:
            self.first = False
            self.metrics.first_token(self.request, time.perf_counter() - self.request.started)
        self.request.write(data)

    def registerProducer(self, producer, streaming):
        self.request.registerProducer(producer, streaming)

    def unregisterProducer(self):
        if not self.request.gone:
            self.request.unregisterProducer()

    def end(self, tail):
        if not self.request.gone:
            if tail:
                self.request.write(tail)
            self.request.finish()

    def fail(self, error):
        end_stream(self.request, error)

    def close(self):
        if self.begun:
            self.metrics.active_streams.dec()


def write_error(request, err, render=error_body):
    """Finish C{request} with C{err}, rendered by C{render} (the §4 shape, or Ollama's on the native routes)."""
    request.error = err
    write_json(request, err.status, render(err.traced(getattr(request, "trace_id", None))), err.headers)


_BARE_500 = error_body(internal_error())


def last_resort(request):
    """
    End C{request} after writing its answer failed: a bare 500 when no byte
    is out yet, else just the end of the response (or of the connection).
    """
    if request.gone or request.finished:
        return
    request.error = internal_error()
    try:
        if not request.startedWriting:
            trace = getattr(request, "trace_id", None)
            body = _BARE_500 if trace is None else error_body(internal_error().traced(trace))
            request.setResponseCode(500)
            request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
            request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
            request.write(body)
        if request.producer is not None:
            request.unregisterProducer()
        request.finish()
    except Exception:
        log.failure("Could not end a failed response; closing its connection", request_id=request.request_id)
        if request.channel is not None:
            request.channel.transport.abortConnection()


def json_bytes(payload):
    """
    C{payload} as UTF-8 JSON.  A string no encoder can write as UTF-8 (a lone
    UTF-16 surrogate, say from a token claim) is written as a C{\\u} escape
    instead of failing the response.
    """
    text = json.dumps(payload, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(payload).encode("ascii")


def query_arg(request, name, strict=True):
    """
    The value of the query parameter C{name} (C{str}), or C{None} when it
    is absent.

    @param strict: refuse a repeated or non-UTF-8 value (the sign-in
        routes); else the first value, undecodable bytes replaced (the
        API's listing options, as they always were read).
    @raise ValueError: when C{strict} and the value is repeated or not UTF-8.
    """
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    if not strict:
        return values[0].decode("utf-8", "replace")
    if len(values) > 1:
        raise ValueError(name)
    return values[0].decode("utf-8")


def is_json_type(value):
    """
    C{value} (a Content-Type) names exactly C{application/json}, in any case,
    parameters such as C{charset=utf-8} allowed.  Not C{text/plain;charset=json}
    (which a browser sends cross-site without asking first), nor
    C{application/jsonp} or C{application/json-patch+json}.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.split(";", 1)[0].strip(" \t").lower() == "application/json"


class _ParseJob:
    """One body on its way through L{JSONParsers}."""

    def __init__(self):
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    def run(self, raw):
        """On a parser thread: the parsed value, or the L{APIError} refusing it."""
        if self._cancelled.is_set():
            # The client left (nobody hears this), or the gateway is stopping.
            raise shutting_down()
        return parse_json(raw)


class JSONParsers(Workers):
    """
    The threads that parse big JSON bodies, so the reactor never does.

    Parsing a 20 MB body takes the better part of a second or more; on a
    thread the reactor still runs between the interpreter's switches
    (L{clawdbot.strictjson} shapes the parse so they come often).  The pool
    starts with the first big body, has C{threads} threads, and L{stop} ends
    it at gateway shutdown; later big bodies get 503 SHUTTING_DOWN.
    """

    name = "clawdbot-json"

    def __init__(self, reactor, threads=2):
        super().__init__(reactor)
        self.threads = threads

    async def parse(self, raw):
        """L{parse_json} of C{raw} on a parser thread."""
        pool = self.pool(self.threads)
        job = _ParseJob()
        self._jobs.add(job)
        try:
            # Cancelling (the client left) drops the answer at once; a job
            # still queued is skipped, one running finishes unseen.
            return await deferToThreadPool(self.reactor, pool, job.run, raw)
        finally:
            job.cancel()
            self._jobs.discard(job)


async def read_json(request, require_object=True):
    """
    The request body parsed as JSON (L{clawdbot.strictjson.parse_json}); a
    body over L{INLINE_JSON} bytes is parsed on the gateway's
    L{JSONParsers}, off the reactor.  The Content-Type must be
    C{application/json} (L{is_json_type}), on every listener.

    @raise APIError: INVALID_REQUEST with a curated reason.
    """
    ctypes = request.requestHeaders.getRawHeaders(b"content-type") or []
    if len(ctypes) != 1 or not is_json_type(ctypes[0]):
        raise invalid("the body must be JSON sent with Content-Type: application/json")
    content = request.content
    if content is None:
        raise invalid("the body is missing")
    content.seek(0)
    raw = content.read()
    parts = request._parts() if hasattr(request, "_parts") else None
    parsers = parts.parsers if parts is not None else None
    if len(raw) > INLINE_JSON and parsers is not None:
        value = await parsers.parse(raw)
    else:
        value = parse_json(raw)
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
        request.route = "not_found"
        request.setResponseCode(err.status)
        request.setHeader(b"content-type", JSON_TYPE)
        return error_body(err.traced(getattr(request, "trace_id", None)))


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
    # Browser pages on other origins may call it (clawdbot.http.cors).
    cross_origin = True

    def __init__(self, parts):
        super().__init__()
        self.authentication = parts.authentication
        self.accounting = parts.accounting
        self.tracing = parts.tracing

    def getChild(self, path, request):
        return NotFound()

    def route(self, request):
        """The C{{method: scope}} this request may use, or C{None} for a 404."""
        return self.scopes

    # How this route's errors look: SPEC §4's shape (Ollama's on the native routes).
    error_body = staticmethod(error_body)

    def render(self, request):
        request.cross_origin = self.cross_origin
        scopes = self.route(request)
        if scopes is None:
            request.route = "not_found"
            write_error(request, APIError("NOT_FOUND", details="no such route"), self.error_body)
            return server.NOT_DONE_YET
        method = request.method.decode("ascii", "replace")
        if method == "HEAD" and "GET" in scopes:
            method = "GET"
        if method == "OPTIONS" and self.cross_origin and (request.site.debug or cors.is_preflight(request)):
            request.route = self.route_name or type(self).__name__
            self._preflight(request, scopes)
            return server.NOT_DONE_YET
        if method not in scopes:
            allowed = ", ".join(sorted(scopes))
            err = APIError("METHOD_NOT_ALLOWED", details=f"use {allowed}", headers={"Allow": allowed})
            write_error(request, err, self.error_body)
            return server.NOT_DONE_YET
        request.route = self.route_name or type(self).__name__
        d = request.handler = Deferred.fromCoroutine(self._run(request, method, scopes[method]))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    def _preflight(self, request, scopes):
        """
        Answer C{OPTIONS} (L{clawdbot.http.cors.preflight_headers}), before and
        without authentication: 204, granting the route's methods to an
        origin the listener allows.  On the secure listener a preflight from
        any other origin gets 403 ORIGIN_REJECTED; the debug listener answers
        every C{OPTIONS} 204 (it refuses foreign origins before routing).
        """
        try:
            headers = cors.preflight_headers(request, request.cors_rule(), scopes)
        except APIError as err:
            write_error(request, err, self.error_body)
            return
        if headers is None and not request.site.debug:
            write_error(request, APIError("ORIGIN_REJECTED", details="this origin may not call the gateway from a browser (server.cors_origins)"), self.error_body)
            return
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        write_json(request, 204, None)

    async def _principal(self, request):
        """Who the caller is: the dev principal on the debug listener, else its bearer token's."""
        if request.site.debug:
            return self.authentication.dev()
        span = self.tracing.child(request.span, "authenticate") if request.span is not None else None
        try:
            principal = await self.authentication.authenticate(request.requestHeaders.getRawHeaders(b"authorization"), request.client_host(), request.request_id)
        except APIError as e:
            self.tracing.failed(span, e.code)
            self.tracing.end(span)
            raise
        except BaseException:
            self.tracing.end(span)
            raise
        self.tracing.end(span, {"clawdbot.auth.kind": "api_key" if principal.key_id is not None else "jwt"})
        return principal

    async def _run(self, request, method, needed):
        """Run the handler; whatever happens, the request ends with an answer."""
        try:
            await self._answer(request, method, needed)
        except Exception:
            # Writing the answer (or the error) failed: a bare 500, or at
            # least the end of the response.
            log.failure("Could not write the answer to {method} {path}", Failure(), method=method, path=request.path.decode("latin-1"), request_id=request.request_id)
            last_resort(request)

    async def _answer(self, request, method, needed):
        try:
            if needed is not None:
                request.principal = await self._principal(request)
                self.authentication.authorize(request.principal, needed)
                if self.rate_limited:
                    await self.accounting.check_rate(request)
            if self.ip_limited:
                await self.accounting.check_ip_rate(request)
            handler = getattr(self, "handle_" + method)
            result = await handler(request)
        except APIError as err:
            answer_error(request, err, self.error_body)
        except CancelledError:
            if request.draining and not request.gone:
                # Shutting down: a stream already carries its error event.
                if request.startedWriting:
                    if not request.finished:
                        request.finish()
                else:
                    write_error(request, APIError("SHUTTING_DOWN", details="the gateway is restarting; retry shortly", headers={"Retry-After": "1"}), self.error_body)
            elif not request.gone:
                log.failure("Handler cancelled without a disconnect", request_id=request.request_id)
                write_error(request, internal_error(), self.error_body)
        except Exception:
            log.failure("Unhandled error in {method} {path}", Failure(), method=method, path=request.path.decode("latin-1"), request_id=request.request_id)
            answer_error(request, internal_error(), self.error_body)
        else:
            if result is None:
                return
            if isinstance(result, JSONResponse):
                write_json(request, result.status, result.payload, result.headers)
            else:
                write_json(request, 200, result)
