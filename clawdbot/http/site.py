"""
The HTTP layer: a request class that enforces the body limits while the body
arrives, a channel that puts deadlines on the request head and body and
answers malformed requests in the JSON error shape, a site per listener, the
threads that parse big JSON bodies, and the base resource that runs
handlers, checks method and scope, and renders every error in one place.
"""

import io
import json
import threading
import time
import uuid

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from clawdbot.http import cors
from clawdbot.auth.tokens import missing_token
from clawdbot.backend.ollama import IStreamConsumer
from clawdbot.errors import APIError, error_body, internal_error, invalid, ollama_error_body
from clawdbot.net import KNOWN_METHODS, METHOD_ORDER, loopback_authority, loopback_origin, valid_host
from clawdbot.strictjson import parse_json
from clawdbot.workers import Workers, shutting_down

log = Logger(namespace="clawdbot.web")

JSON_TYPE = b"application/json; charset=utf-8"
# The Server header of every answer (never twisted.web's, which names its version).
SERVER = b"clawdbot"
# Seconds a refused body is drained before the connection closes.
LINGER = 2.0
# On the secure listener a request without credentials may send at most
# this much body: the body is stored before the token is checked, so
# strangers get no more than this (no public route reads a body).
ANONYMOUS_BODY = 64 * 1024
# Bodies up to this size are parsed on the reactor (a few milliseconds at
# worst, 32,000 numbers; a typical body far less); bigger ones on
# L{JSONParsers}.
INLINE_JSON = 64 * 1024
# The reason phrase of every status the gateway sends (RFC 9110 section 15,
# RFC 6585 for 429 and 431): twisted.web's table lacks some ("429 Unknown
# Status") and has older wordings for others.
REASONS = {
    100: b"Continue",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    406: b"Not Acceptable",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    411: b"Length Required",
    412: b"Precondition Failed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    416: b"Range Not Satisfiable",
    417: b"Expectation Failed",
    422: b"Unprocessable Content",
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def reason_phrase(code):
    """The reason phrase of status C{code} (L{REASONS}, else twisted.web's, else a generic one by class)."""
    phrase = REASONS.get(code) or http.RESPONSES.get(code)
    if phrase is None:
        phrase = {1: b"Informational", 2: b"Success", 3: b"Redirection", 4: b"Client Error"}.get(code // 100, b"Server Error")
    return phrase


def early_response(err, request_id=None, render=error_body, headers=None):
    """
    The bytes of a whole response carrying C{err} in the JSON error shape
    (C{render}: Ollama's on the native routes), for the moments the normal
    response machinery cannot be used (the request is still arriving, or
    could not be parsed), always closing.

    @param headers: more headers (the CORS ones), beside C{err}'s.
    """
    body = render(err)
    head = [
        b"HTTP/1.1 %d %s" % (err.status, reason_phrase(err.status)),
        b"Content-Type: " + JSON_TYPE,
        b"Content-Length: " + str(len(body)).encode(),
        b"X-Content-Type-Options: nosniff",
        b"Server: " + SERVER,
    ]
    if request_id is not None:
        head.append(b"X-Request-Id: " + request_id.encode())
    for name, value in [*err.headers.items(), *(headers or {}).items()]:
        head.append(_header_bytes(name) + b": " + _header_bytes(value))
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _header_bytes(value):
    value = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
    return value.replace(b"\r", b" ").replace(b"\n", b" ")
# The methods the gateway knows; any other gets 501 before the resource tree
# is walked, and counts as one metrics label ("other").
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
    # The answer may carry CORS headers (not on the sign-in routes).
    cross_origin = True

    def __init__(self, *args, **kwargs):
        # The API takes JSON only: skip twisted.web's form parsing (costly
        # content-type parsing on every POST).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)
        # The reason phrase of the default 200 (setResponseCode gives every other).
        self.code_message = reason_phrase(self.code)
        self.request_id = uuid.uuid4().hex
        self.started = time.perf_counter()
        self._site = getattr(self.channel, "site", None)
        # What the access log records beyond the HTTP basics: model,
        # session, tokens, upstream latency.
        self.audit = {}
        self.body_size = 0
        self.notifyFinish().addCallbacks(self._done, self._lost)

    def _parts(self):
        """The site's L{clawdbot.http.tree.Parts} (C{None} on a plain twisted.web site)."""
        return getattr(self._site, "parts", None)

    def _lost(self, reason):
        self.gone = True
        self._done(None)

    def _done(self, _):
        parts = self._parts()
        if parts is not None:
            parts.accounting.done(self)
            parts.runtime.untrack(self)

    captured_size = 0
    body_sample = b""

    def write(self, data):
        if not self.startedWriting:
            # Whatever path wrote this answer (twisted.web's own included),
            # it carries the gateway's headers, not twisted.web's Server.
            self._common_headers()
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
        parts = self._parts()
        if parts is None:
            return None
        return parts.runtime.config.limits.max_body

    def setResponseCode(self, code, message=None):
        super().setResponseCode(code, message if message is not None else reason_phrase(code))

    def gotLength(self, length):
        err = None
        if length is not None:
            err = self._body_refusal(length)
        if err is not None:
            self.content = io.BytesIO()  # stays empty: the body is dropped
            self._refuse(err)
            # The body is never stored, so don't ask the client for it.
            self.requestHeaders.removeHeader(b"expect")
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.body_size += len(data)
        err = self._body_refusal(self.body_size)
        if err is not None:
            self._refuse(err)
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)

    def _body_refusal(self, size):
        """
        Why a body of (at least) C{size} bytes is refused before it is read,
        or C{None}: over C{limits.max_body} for anyone (413), or over
        L{ANONYMOUS_BODY} without credentials on the secure listener (401).
        """
        limit = self._limit()
        if limit is not None and size > limit:
            return APIError("PAYLOAD_TOO_LARGE", details=f"the body is larger than the limit of {limit} bytes")
        if size > ANONYMOUS_BODY and self._site is not None and not getattr(self._site, "debug", True) and not self._has_credentials():
            return missing_token(f"a request body over {ANONYMOUS_BODY} bytes needs a Bearer token")
        return None

    def _has_credentials(self):
        """The request carries an C{Authorization: Bearer <token>} header (checked later, as usual)."""
        values = self.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return False
        scheme, _, rest = values[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and bool(rest.strip())

    def _refuse(self, err, linger=True):
        """
        Answer C{err} straight onto the connection: the request is still
        arriving, so the normal response machinery cannot be used.  With
        C{linger}, the rest of the body is read and dropped for a moment
        before the connection closes (closing on unread data would reset it,
        and a proxy in front would report a 502 instead of this answer);
        without, the connection closes at once.
        """
        self.refused = True
        self.code, self.error = err.status, err
        self.code_message = reason_phrase(err.status)
        self._name_from_channel()
        transport = self.channel.transport
        native = (self.path or b"").startswith(b"/ollama/")
        transport.write(early_response(err, self.request_id, ollama_error_body if native else error_body, self.cors_headers()))
        log.info("Refused a request while its body arrived: {code}", code=err.code, details=err.details, request_id=self.request_id)
        if not linger:
            self.channel.loseConnection()
            return
        # The channel's callLater is its site's reactor's (HTTPFactory.buildProtocol).
        self._linger = self.channel.callLater(LINGER, transport.loseConnection)

    def _name_from_channel(self):
        """
        The method and path, for the access log, of a request refused before
        twisted.web filled them in (it does once the whole body is in).
        """
        if self.path is not None or self.channel is None:
            return
        command = getattr(self.channel, "_command", None)
        target = getattr(self.channel, "_path", None)
        if isinstance(command, bytes) and isinstance(target, bytes):
            self.method = command
            self.uri = target
            self.path = target.split(b"?", 1)[0]

    def _close_refused(self):
        """The refused body has arrived (and been dropped): close now."""
        self._stop_linger()
        if self.channel is not None:
            self.channel.transport.loseConnection()

    def _stop_linger(self):
        linger = getattr(self, "_linger", None)
        if linger is not None and linger.active():
            linger.cancel()

    def connectionLost(self, reason):
        self._stop_linger()
        super().connectionLost(reason)

    def process(self):
        if self.refused:
            self._close_refused()
            return
        parts = self._parts()
        if parts is not None:
            self.config = parts.runtime.config
            parts.runtime.track(self)
            parts.accounting.started(self)
        self.site = self.channel.site
        err = self._refusal()
        if err is None and self.path == b"*":
            if self.method == b"OPTIONS":
                self._options_star()
                return
            err = invalid("the request target '*' is not supported")
        if err is not None:
            # Refused before routing (a malformed Host, an unknown method,
            # a foreign origin, a drain): answer, then close the connection,
            # whose framing the client may have got wrong too.
            self.setHeader(b"date", http.datetimeToString())
            self.setHeader(b"connection", b"close")
            channel = self.channel
            write_error(self, err)
            if channel is not None and channel.transport is not None:
                channel.transport.loseConnection()
            return
        super().process()

    def _options_star(self):
        """
        C{OPTIONS *} (RFC 9110 section 9.3.7), a probe of the server as a
        whole: 204 with the methods the gateway knows in C{Allow}.
        """
        self.setHeader(b"date", http.datetimeToString())
        self.setHeader(b"allow", b", ".join(METHOD_ORDER))
        write_json(self, 204, None)

    def processingFailed(self, reason):
        """
        Something failed outside the API handlers (which answer their own
        errors): a JSON 500, never twisted.web's HTML page, the traceback only
        in the log.
        """
        log.failure("Unhandled error answering a request", reason, request_id=self.request_id)
        if not self.startedWriting and not self.gone and not self.finished:
            try:
                write_error(self, internal_error())
                return reason
            except Exception:
                log.failure("Could not write a 500", request_id=self.request_id)
        last_resort(self)
        return reason

    def _common_headers(self):
        self.setHeader(b"server", SERVER)
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"x-request-id", self.request_id.encode())
        for name, value in self.cors_headers().items():
            self.setHeader(name, value)

    def interrupt(self, err):
        """
        At shutdown: end a stream that is under way with C{err} as its last
        event (the handler, cancelled next, then ends the response); a
        request with nothing written yet is answered by its cancelled
        handler.
        """
        if self.startedWriting and self.stream_format is not None and not self.gone and not self.finished:
            self.error = err
            self.write(error_event(self.stream_format, err))

    def cors_rule(self):
        """
        Which C{Origin}s may read this listener's answers (L{clawdbot.http.cors}):
        any page on this machine on the debug listener (the rule of its own
        check, L{loopback_origin}), and on the secure one exactly those in
        C{server.cors_origins} of the config the request started under.
        """
        if getattr(self._site, "debug", True):
            return loopback_origin
        return (self.config or self._parts().runtime.config).server.cors_origins.__contains__

    def cors_headers(self):
        """The CORS headers of this request's answer (L{clawdbot.http.cors.answer_headers})."""
        if not self.cross_origin or self._parts() is None:
            return {}
        return cors.answer_headers(self, self.cors_rule())

    def _refusal(self):
        """
        What refuses this request before the resource tree is walked, or
        C{None}: a malformed C{Host} (RFC 9112 section 3.2), a method the
        gateway does not know, a debug-port request from off this machine,
        or a drain in progress.
        """
        hosts = self.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            return invalid("the request has more than one Host header")
        if not hosts and self.clientproto not in (b"HTTP/1.0", b"HTTP/0.9"):
            return invalid("an HTTP/1.1 request needs a Host header")
        if hosts and not valid_host(hosts[0]):
            return invalid("the Host header is not a host name or address with an optional port")
        if self.method not in KNOWN_METHODS:
            return APIError("NOT_IMPLEMENTED", details="the gateway does not implement this method")
        if self.site.debug and not _local_request(self):
            return APIError("ORIGIN_REJECTED", details="the debug port only answers pages and tools on this machine")
        if self.draining:
            return APIError("SHUTTING_DOWN", details="the gateway is restarting; retry shortly", headers={"Retry-After": "1"})
        return None


def _local_request(request):
    """
    The debug listener acts as the dev principal without credentials, so
    only this machine may drive it: exactly one C{Host}, naming loopback (no
    DNS rebinding), and at most one C{Origin}, of a loopback page when a
    browser sends one (no cross-site requests).
    """
    headers = request.requestHeaders
    hosts = headers.getRawHeaders(b"host") or []
    if len(hosts) != 1 or not loopback_authority(hosts[0]):
        return False
    origins = headers.getRawHeaders(b"origin")
    if origins is None:
        return True
    return len(origins) == 1 and loopback_origin(origins[0])


class GatewayChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel with deadlines and JSON answers to what twisted.web
    refuses by itself.

    The request head (request line and headers) must arrive whole within
    C{limits.header_timeout}: counted from the connection for its first
    request, and from the first byte of each later one.  The body must then
    arrive whole within C{limits.body_timeout} (else 408).  twisted.web's
    idle timeout restarts on every byte, so alone it lets a client trickle a
    head or a body forever.

    A head twisted.web cannot parse (a bad request line, HTTP/0.9, a NUL or
    a bare name in a header, a bad chunk) gets a JSON 400 INVALID_REQUEST,
    and one over its size limits (a line over C{MAX_LENGTH}, all lines over
    C{totalHeadersSize}, more than C{maxHeaders} headers) a JSON 431
    HEADER_TOO_LARGE, instead of twisted.web's bare 400 or a silent close.
    """

    # The armed deadlines (see _start_timer).
    _header_timeout = None
    _body_timeout = None
    # A request has arrived whole and is being answered; bytes that come
    # meanwhile are buffered, and their head's deadline starts once it is done.
    _answering = False
    # An early answer went out; the connection is closing.
    _answered_early = False

    def connectionMade(self):
        super().connectionMade()
        self._start_timer("header_timeout", self._head_too_slow)

    def dataReceived(self, data):
        if self._header_timeout is None and self.line_mode and not self._answering and not self._answered_early:
            self._start_timer("header_timeout", self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._stop_timer("header_timeout")
        super().allHeadersReceived()
        if self.length != 0 and not self._answered_early:
            self._start_timer("body_timeout", self._body_too_slow)

    def allContentReceived(self):
        self._stop_timer("body_timeout")
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request):
        self._answering = False
        super().requestDone(request)

    def connectionLost(self, reason):
        self._stop_timer("header_timeout")
        self._stop_timer("body_timeout")
        super().connectionLost(reason)

    # --- what twisted.web refuses by itself, in the JSON error shape ---------

    def lineReceived(self, line):
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._answer_early(APIError("HEADER_TOO_LARGE", details=f"the request line and headers are longer than {self.totalHeadersSize} bytes"))
            return
        super().lineReceived(line)

    def headerReceived(self, line):
        if self._receivedHeaderCount >= self.maxHeaders:
            self._answer_early(APIError("HEADER_TOO_LARGE", details=f"the request has more than {self.maxHeaders} header lines"))
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line):
        what = "header line" if self._receivedHeaderSize else "request line"
        self._answer_early(APIError("HEADER_TOO_LARGE", details=f"a {what} is longer than {self.MAX_LENGTH} bytes"))

    def _respondToBadRequestAndDisconnect(self):
        self._answer_early(invalid("the request is not well-formed HTTP/1.1"))

    def _answer_early(self, err):
        """
        Answer C{err} on the connection and close it: the request being
        read, if any, is marked refused so that it is logged and counted.
        """
        if self._answered_early:
            return
        self._answered_early = True
        self._stop_timer("header_timeout")
        self._stop_timer("body_timeout")
        request = self.requests[-1] if self.requests and not self._answering else None
        if isinstance(request, GatewayRequest) and request.refused:
            # Its answer is out already (a refused body being drained).
            self.loseConnection()
            return
        if isinstance(request, GatewayRequest):
            request.refused = True
            request.code, request.error = err.status, err
            request._name_from_channel()
        request_id = request.request_id if isinstance(request, GatewayRequest) else None
        peer = getattr(self.transport.getPeer(), "host", None)
        log.info("Refused a malformed request: {code}", code=err.code, details=err.details, peer=peer, request_id=request_id)
        self.transport.write(early_response(err, request_id))
        self.loseConnection()

    # --- deadlines ----------------------------------------------------------------

    def _limits(self):
        parts = getattr(self.site, "parts", None)
        return parts.runtime.config.limits if parts is not None else None

    def _start_timer(self, name, fire):
        """
        Arm the deadline C{limits.<name>} (header_timeout or body_timeout)
        as C{self._<name>}; C{fire(seconds)} runs when it passes.
        """
        limits = self._limits()
        seconds = getattr(limits, name) if limits is not None else None
        if seconds:
            setattr(self, "_" + name, self.callLater(seconds, lambda: fire(seconds)))

    def _stop_timer(self, name):
        timer = getattr(self, "_" + name)
        if timer is not None:
            if timer.active():
                timer.cancel()
            setattr(self, "_" + name, None)

    def _head_too_slow(self, seconds):
        self._header_timeout = None
        peer = getattr(self.transport.getPeer(), "host", None)
        log.info("Closed a connection whose request head took over {seconds}s", seconds=seconds, peer=peer)
        self.loseConnection()

    def _body_too_slow(self, seconds):
        """The body did not arrive whole in time: 408, and the connection closes."""
        self._body_timeout = None
        request = self.requests[-1] if self.requests else None
        if not isinstance(request, GatewayRequest) or request.refused:
            # Already answered (a refused body being drained): just close.
            self.loseConnection()
            return
        request._refuse(APIError("REQUEST_TIMEOUT", details=f"the request body did not arrive within {seconds:g}s"), linger=False)


class GatewaySite(server.Site):
    """
    One listener's site.  C{debug} marks the unauthenticated loopback debug
    listener, whose requests act as the configured dev principal.
    """

    requestFactory = GatewayRequest
    # HTTP/1.1 only (TLS, and so HTTP/2, ends at the proxy in front).
    protocol = GatewayChannel
    noisy = False

    def __init__(self, resource, parts, debug=False, **kwargs):
        super().__init__(resource, **kwargs)
        self.parts = parts
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
    or (C{"ndjson"}, only the native routes stream it) a line in Ollama's.
    """
    if fmt == "ndjson":
        return ollama_error_body(err) + b"\n"
    return b"data: " + error_body(err) + b"\n\n"


def end_stream(request, err):
    """End a response whose headers are sent: an error event (or line), then the end."""
    if request.gone or request.finished:
        return
    request.error = err
    request.write(error_event(request.stream_format, err))
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

    @param fmt: C{"sse"} or C{"ndjson"}.
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
            self.metrics.ttft.observe(time.perf_counter() - self.request.started)
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
    write_json(request, err.status, render(err), err.headers)


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
            request.setResponseCode(500)
            request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
            request.responseHeaders.setRawHeaders(b"content-length", [str(len(_BARE_500)).encode()])
            request.write(_BARE_500)
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


def query_arg(request, name):
    """
    The one value of the query parameter C{name} (C{str}), or C{None} when
    it is absent.

    @raise ValueError: when it is repeated or not UTF-8.
    """
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
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
    parts = request._parts() if isinstance(request, GatewayRequest) else None
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
    # Browser pages on other origins may call it (clawdbot.http.cors).
    cross_origin = True

    def __init__(self, parts):
        super().__init__()
        self.authentication = parts.authentication
        self.accounting = parts.accounting

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
                request.principal = await self.authentication.authenticate(request)
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
