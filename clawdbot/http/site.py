"""
The HTTP layer's door: a request class that enforces the body limits while
the body arrives, a channel that puts deadlines on the request head and
body and answers malformed requests in the JSON error shape, the debug
listener's guard, and a site per listener.  What a route does with a
request is L{clawdbot.http.resource}.
"""

import io
import time
import uuid
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web import http, server

from clawdbot.auth.tokens import missing_token
from clawdbot.backend.messages import error_body as anthropic_error_body
from clawdbot.errors import APIError, error_body, internal_error, invalid, ollama_error_body
from clawdbot.http import cors
from clawdbot.http.resource import JSON_TYPE, error_event, last_resort, write_error, write_json
from clawdbot.net import KNOWN_METHODS, METHOD_ORDER, client_address, loopback_authority, loopback_origin, send_now, valid_host

log = Logger(namespace="clawdbot.web")

# The Server header of every answer (never twisted.web's, which names its version).
SERVER = b"clawdbot"
# The health probes, still answered while the gateway drains (the rest is
# refused with 503 SHUTTING_DOWN): /healthz 200, /readyz 503.
PROBES = (b"/healthz", b"/readyz")
# Seconds a refused body is drained before the connection closes.
LINGER = 2.0
# Seconds a connection the gateway closes on its own (a deadline, a refusal)
# has to go, its last bytes flushed and over TLS its close_notify answered,
# before it is dropped (GatewayChannel.close).
CLOSE_GRACE = 2.0
# On the secure listener a request without credentials may send at most
# this much body: the body is stored before the token is checked, so
# strangers get no more than this (no public route reads a body).
ANONYMOUS_BODY = 64 * 1024
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


def error_shape(path):
    """
    How errors look on C{path} before its route is known: Ollama's shape on
    the native routes, Anthropic's on the Messages API, else SPEC §4's.
    """
    # Routing reads percent-escapes (/v1/%6Dessages is /v1/messages), so this does too.
    path = unquote_to_bytes(path or b"")
    if path.startswith(b"/ollama/"):
        return ollama_error_body
    if path == b"/v1/messages" or path.startswith(b"/v1/messages/"):
        return anthropic_error_body
    return error_body


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
    # The gateway is shutting down while this request runs (streams end with
    # an error event at the drain's deadline).
    draining = False
    # Its head arrived once the drain had begun: refused with 503
    # SHUTTING_DOWN (Runtime.track decides it as the head arrives, so an
    # upload begun before the drain is served even if its body comes after).
    late = False
    config = None
    principal = None
    route = None
    error = None
    sampled = False
    captured = None
    handler = None
    # Work that goes on after the client left (a Deferred), for the drain to stop.
    runs_on = None
    # With tracing.enabled: the request's server span (recording or not) and its trace id.
    span = None
    trace_id = None
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
        # GenAI attributes the route adds to the server span (only while one records).
        self.gen_ai = {}
        self.body_size = 0
        self.notifyFinish().addCallbacks(self._done, self._lost)

    def _parts(self):
        """The site's L{clawdbot.http.tree.Parts} (C{None} on a plain twisted.web site)."""
        return getattr(self._site, "parts", None)

    _held = 0
    _due = False

    def hold_end(self):
        """
        Postpone what the request's end accounts for (its access-log line,
        metrics, token budget, usage, and its place among the requests a
        drain waits for) until the returned C{release()} is called: for work
        that runs on after its client left (a session turn with
        C{finish_on_disconnect}).
        """
        self._held += 1
        released = []

        def release():
            if released:
                return
            released.append(True)
            self._held -= 1
            if not self._held and self._due:
                self._due = False
                self._account()

        return release

    def _lost(self, reason):
        self.gone = True
        self._done(None)

    def _done(self, _):
        if self._held:
            self._due = True
            return
        self._account()

    def _account(self):
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
        """
        The request carries an C{Authorization: Bearer <token>} header, or
        on the Messages API Anthropic's C{x-api-key} (checked later, as usual).
        """
        values = self.requestHeaders.getRawHeaders(b"authorization") or []
        # The body is still arriving: twisted.web has not set the path yet.
        self._name_from_channel()
        if not values and error_shape(self.path) is anthropic_error_body:
            keys = self.requestHeaders.getRawHeaders(b"x-api-key") or []
            return len(keys) == 1 and bool(keys[0].strip())
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
        transport.write(early_response(err, self.request_id, error_shape(self.path), self.cors_headers()))
        log.info("Refused a request while its body arrived: {code}", code=err.code, details=err.details, request_id=self.request_id)
        if not linger:
            self.channel.close()
            return
        # The channel's callLater is its site's reactor's (HTTPFactory.buildProtocol).
        self._linger = self.channel.callLater(LINGER, self.channel.close)

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
            self.channel.close()

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
            write_error(self, err, error_shape(self.path))
            if channel is not None and channel.transport is not None:
                channel.close()
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
        parts = self._parts()
        if parts is not None and parts.runtime.draining:
            # The gateway is shutting down: the connection closes after this
            # answer (GatewayChannel.requestDone), and says so, so that a
            # proxy does not keep it for its next request.
            self.setHeader(b"connection", b"close")
        self.setHeader(b"server", SERVER)
        self.setHeader(b"x-content-type-options", b"nosniff")
        self.setHeader(b"x-request-id", self.request_id.encode())
        if self.trace_id is not None:
            self.setHeader(b"x-trace-id", self.trace_id.encode())
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
            self.write(error_event(self.stream_format, err.traced(self.trace_id)))

    _client = None

    def client_host(self):
        """
        The client's address, for per-address limits and logs (never for
        authentication): the peer, or behind a proxy in
        C{server.trusted_proxies} the address it forwards (L{client_address}).
        """
        if self._client is None:
            peer = getattr(self.getClientAddress(), "host", None)
            trusted = self.config.server.trusted_proxies if self.config is not None else ()
            headers = self.requestHeaders
            forwarded_for = headers.getRawHeaders(b"x-forwarded-for") or []
            self._client = client_address(peer, forwarded_for, headers.getRawHeaders(b"forwarded") or [], trusted) or "unknown"
        return self._client

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
        or a drain that began before its head arrived (except for the health
        probes, L{PROBES}).
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
        if self.late and not (self.method in (b"GET", b"HEAD") and self.path in PROBES):
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

    def write(self, data):
        # A response's body: sent at once when nothing is waiting (see send_now).
        send_now(self.transport, data)

    def writeSequence(self, iovec):
        send_now(self.transport, b"".join(iovec))

    def connectionMade(self):
        super().connectionMade()
        channels = getattr(self.site, "channels", None)
        if channels is not None:
            channels.add(self)
        self._start_timer("header_timeout", self._head_too_slow)

    def dataReceived(self, data):
        if self._header_timeout is None and self.line_mode and not self._answering and not self._answered_early:
            self._start_timer("header_timeout", self._head_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._stop_timer("header_timeout")
        # The request is in flight from its head on: a drain that begins
        # while its body arrives waits for it and serves it (Runtime.track).
        parts = getattr(self.site, "parts", None)
        if parts is not None and self.requests:
            parts.runtime.track(self.requests[-1])
        super().allHeadersReceived()
        if self.length != 0 and not self._answered_early:
            self._start_timer("body_timeout", self._body_too_slow)

    def allContentReceived(self):
        self._stop_timer("body_timeout")
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request):
        self._answering = False
        draining = self._draining()
        if draining:
            # No next request on this connection (GatewaySite.close_idle).
            self.persistent = False
        super().requestDone(request)
        if draining:
            self.close()

    def connectionLost(self, reason):
        self._stop_timer("header_timeout")
        self._stop_timer("body_timeout")
        self._stop_timer("close_grace")
        self._lost = True
        channels = getattr(self.site, "channels", None)
        if channels is not None:
            channels.discard(self)
        super().connectionLost(reason)

    def idle(self):
        """No request on this connection is being read or answered (a kept-alive connection between requests)."""
        return not self.requests and not self._answered_early

    def _draining(self):
        parts = getattr(self.site, "parts", None)
        return parts is not None and parts.runtime.draining

    _close_grace = None
    _lost = False

    def close(self):
        """
        Close the connection on the gateway's own initiative (a deadline
        passed, a request refused): what was written is flushed, then the
        connection ends.  One still open L{CLOSE_GRACE} seconds later is
        dropped, so that neither a client that stops reading nor, over TLS,
        one that never answers the close_notify holds it open.
        """
        if self.transport is None or self._lost:
            return
        if self._close_grace is None:
            self._close_grace = self.callLater(CLOSE_GRACE, self._drop)
        self.loseConnection()

    def _drop(self):
        self._close_grace = None
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def timeoutConnection(self):
        """
        twisted.web's idle timeout (the site's C{timeout}: no byte in that
        long, a kept-alive connection between requests included) closes like
        the gateway's own deadlines (L{close}), without twisted.web's log
        lines and its longer wait before the connection is dropped.
        """
        self.close()

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
            self.close()
            return
        if isinstance(request, GatewayRequest):
            request.refused = True
            request.code, request.error = err.status, err
            request._name_from_channel()
        request_id = request.request_id if isinstance(request, GatewayRequest) else None
        peer = getattr(self.transport.getPeer(), "host", None)
        log.info("Refused a malformed request: {code}", code=err.code, details=err.details, peer=peer, request_id=request_id)
        path = request.path if isinstance(request, GatewayRequest) else getattr(self, "_path", None)
        self.transport.write(early_response(err, request_id, error_shape(path.split(b"?", 1)[0] if isinstance(path, bytes) else None)))
        self.close()

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
        self.close()

    def _body_too_slow(self, seconds):
        """The body did not arrive whole in time: 408, and the connection closes."""
        self._body_timeout = None
        request = self.requests[-1] if self.requests else None
        if not isinstance(request, GatewayRequest) or request.refused:
            # Already answered (a refused body being drained): just close.
            self.close()
            return
        request._refuse(APIError("REQUEST_TIMEOUT", details=f"the request body did not arrive within {seconds:g}s"), linger=False)


class GatewaySite(server.Site):
    """
    One listener's site.  C{debug} marks the unauthenticated loopback debug
    listener, whose requests act as the configured dev principal.
    """

    requestFactory = GatewayRequest
    # HTTP/1.1 only, whether TLS ends at a proxy in front or at an ssl:
    # listener (clawdbot.server_tls; see acceptableProtocols).
    protocol = GatewayChannel
    noisy = False

    def __init__(self, resource, parts, debug=False, **kwargs):
        super().__init__(resource, **kwargs)
        self.parts = parts
        self.debug = debug
        # The open connections (GatewayChannel adds and removes itself).
        self.channels = set()
        if parts is not None:
            parts.runtime.on_drain(self.close_idle)

    def close_idle(self):
        """
        The drain begins: close every kept-alive connection that is between
        requests now (each busy one closes once its answer is out,
        GatewayChannel.requestDone), so that a proxy sends no new request on
        one to meet a 503 C{SHUTTING_DOWN} it would not send elsewhere (a
        POST), and finds the port refused instead once the listener closes.
        Each closes with L{GatewayChannel.close} (over TLS its close_notify,
        and a drop after a grace).
        """
        for channel in list(self.channels):
            if channel.idle():
                channel.close()

    def acceptableProtocols(self):
        """
        What an C{ssl:} listener offers by ALPN: C{http/1.1} alone, never
        C{h2} (twisted.web's would add it once the C{h2} package is
        installed, and its HTTP/2 connection is not L{GatewayChannel}).
        """
        return [b"http/1.1"]

    def log(self, request):
        """Access logging is the gateway's own; twisted.web's is off."""
