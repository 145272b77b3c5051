"""
A lean HTTP/1.1 client for the model backend leg.

C{twisted.web.client.Agent} hands each piece of a response body through
five layers (the client protocol's state dispatcher, the response parser,
its line receiver, the chunked decoder and the response's own state
machine) before the reader sees it: about 18 µs of the gateway's 100 µs of
CPU for each streamed token (C{bench/run.py --chunk-only --profile}).
L{Connection} parses the status line, the headers and the body in one
protocol and gives each piece of body straight to the reader.

It does what the backend leg needs and no more: one request at a time on
a connection, a body already in memory, persistent connections
(L{Connections}, a pool per address), and bodies framed by
C{Content-Length}, by chunked transfer coding or by the connection's end.
It fails the way C{Agent} does (L{ResponseNeverReceived} when a connection
gives no byte back, L{ResponseFailed} after one, a body's end as
L{ResponseDone} or L{PotentialDataLoss}), so callers map its errors as they
did C{Agent}'s; timeouts are the caller's, by cancelling, but for the TLS
handshake's, which is part of connecting (L{HandshakeEndpoint}).
"""

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent
from zope.interface import implementer

from clawdbot.net import send_now

# The status line and headers of one response, at most (Ollama's are a few hundred bytes).
MAX_HEAD = 64 * 1024
# A chunk-size line (with extensions) or a trailer line, at most.
MAX_LINE = 4096
# Trailer lines after a chunked body, at most.
MAX_TRAILERS = 64
# Interim (1xx) responses before a response, at most.
MAX_INTERIM = 8
# Body bytes read before the reader is attached, beyond which reading pauses.
MAX_UNREAD = 1024 * 1024

_HEAD, _BODY, _IDLE, _CLOSED = "head", "body", "idle", "closed"
# How a body is framed.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = "length", "chunked", "until-close"
_HEX = b"0123456789abcdefABCDEF"
# Where a chunked body is: a size line, data, the CRLF after data, trailers.
_SIZE, _DATA, _DATA_END, _TRAILER = "size", "data", "data-end", "trailer"


class MalformedResponse(Exception):
    """The backend's response does not parse as HTTP/1.1."""


class HandshakeTimedOut(Exception):
    """
    The backend accepted the connection but its TLS handshake did not
    finish within the connect timeout (L{HandshakeEndpoint}).

    @ivar seconds: that timeout.
    """

    def __init__(self, seconds):
        super().__init__(seconds)
        self.seconds = seconds


class EndpointError(Exception):
    """
    The connection to a backend could not even be set up (its host name,
    or the TLS settings made for it, cannot be used): nothing was sent.
    """


class Response:
    """
    What the backend answered: C{code}, C{phrase}, C{version} (C{(1, 1)}),
    C{headers} (lower-case C{bytes} name -> list of C{bytes} values), and
    the body through L{deliverBody}, once.
    """

    def __init__(self, connection, version, code, phrase, headers):
        self._connection = connection
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers

    def deliverBody(self, protocol):
        """
        Give the body to C{protocol}: C{makeConnection} with a producer it
        may pause, resume or stop (stopping drops the connection), then
        C{dataReceived} for each piece and C{connectionLost} with
        L{ResponseDone}, L{PotentialDataLoss} (a body that ends with its
        connection), or another failure (the body was cut short).
        """
        self._connection.deliver(protocol, self)


class BodyProducer:
    """The transport a body's reader sees: its connection, until the body is over."""

    __slots__ = ("connection",)

    def __init__(self, connection):
        self.connection = connection

    def pauseProducing(self):
        if self.connection is not None:
            self.connection.transport.pauseProducing()

    def resumeProducing(self):
        if self.connection is not None:
            self.connection.transport.resumeProducing()

    def stopProducing(self):
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()


def _framing(code, method, headers):
    """How the body of a response to C{method} with C{code} and C{headers} ends: C{(kind, length)}."""
    if method == b"HEAD" or code in (204, 304):
        return _LENGTH, 0
    codings = headers.get(b"transfer-encoding")
    if codings:
        # The last coding decides; anything but chunked ends with the connection.
        last = b",".join(codings).split(b",")[-1].strip().lower()
        return (_CHUNKED, None) if last == b"chunked" else (_UNTIL_CLOSE, None)
    lengths = headers.get(b"content-length")
    if lengths:
        values = {v.strip() for v in b",".join(lengths).split(b",")}
        if len(values) != 1:
            raise MalformedResponse("conflicting Content-Length")
        value = values.pop()
        if not value.isdigit() or len(value) > 18:
            raise MalformedResponse("bad Content-Length")
        return _LENGTH, int(value)
    return _UNTIL_CLOSE, None


def parse_head(head):
    """
    C{(version, code, phrase, headers)} from a response's head (without
    its blank line).

    @raise MalformedResponse: when it is not an HTTP/1.x status line and headers.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise MalformedResponse("bad status line")
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise MalformedResponse("bad status code")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
            raise MalformedResponse("bad header line")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    version = (1, 1) if parts[0] == b"HTTP/1.1" else (1, 0)
    return version, int(code), parts[2] if len(parts) > 2 else b"", headers


@implementer(IHandshakeListener)
class Connection(Protocol):
    """
    One connection to the backend, sending one request at a time and
    parsing its response.  Made by L{Connections}; back in its pool after
    a response whose body was read to its end, if the connection may be
    kept.  Over TLS, L{HandshakeEndpoint} gives it out once its handshake
    is done (L{handshake}).
    """

    # The Deferred of handshake(), while the TLS handshake goes on.
    _handshake = None

    def __init__(self, pool, key):
        self.pool = pool
        self.key = key
        self.state = _IDLE
        self.closed = Deferred()
        self._aborted = False
        self._idle_timer = None
        self._method = None
        self._waiting = None  # the Deferred for the response
        self._received = False  # a byte of the response has come
        self._head = b""
        self._interim = 0  # interim (1xx) responses before this one
        self._trailers = 0
        self._response = None  # the response whose body this connection reads
        self._keep = False
        self._framing = None
        self._left = 0  # body bytes (or chunk bytes) still to come
        self._chunk = _SIZE
        self._line = b""  # a size or trailer line split across reads
        self._reader = None
        self._producer = None
        self._unread = []  # body pieces read before the reader came
        self._unread_size = 0
        self._ended = None  # how the body ended, when it did before the reader came

    def handshake(self):
        """
        A L{Deferred} that fires with this connection once its TLS handshake
        is done, or fails with L{ResponseNeverReceived} (the handshake's
        failure inside) when the connection ends first.
        """
        self._handshake = Deferred()
        return self._handshake

    def handshakeCompleted(self):
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            waiting.callback(self)

    # --- the request ---------------------------------------------------------

    def request(self, method, target, host, headers, body):
        """
        Send a request; the L{Deferred} fires with the L{Response} once its
        head is in.  Cancelling it drops the connection.

        @param headers: C{(name, value)} pairs of C{bytes}, besides C{Host}
            and C{Content-Length}.
        @param body: C{bytes} or C{None}.
        """
        self._cancel_idle()
        self.state = _HEAD
        self._method = method
        self._received = False
        self._head = b""
        self._interim = 0
        self._reader = None
        self._response = None
        self._unread = []
        self._unread_size = 0
        self._ended = None
        self._waiting = Deferred(self._cancel)
        out = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        for name, value in headers:
            out += (name, b": ", value, b"\r\n")
        if body is not None:
            out += (b"content-length: ", b"%d" % len(body), b"\r\n\r\n", body)
        else:
            out.append(b"\r\n")
        send_now(self.transport, b"".join(out))
        return self._waiting

    def _cancel(self, waiting):
        # (The Deferred fails with CancelledError; the connection's end tells nobody.)
        self._waiting = None
        self.abort()

    def abort(self):
        """Drop the connection now (the backend sees it close); it is never reused."""
        self._aborted = True
        self.pool.forget(self)
        if self.state != _CLOSED and self.transport is not None:
            self.transport.abortConnection()

    @property
    def reusable(self):
        """Idle, and neither closing nor closed."""
        transport = self.transport
        return self.state == _IDLE and not self._aborted and transport is not None and transport.connected and not transport.disconnecting

    # --- the response --------------------------------------------------------

    def dataReceived(self, data):
        if self.state == _BODY:
            self._body(data)
        elif self.state == _HEAD:
            self._received = True
            self._read_head(data)
        elif self.state == _IDLE:
            # Nothing was asked: a backend talking out of turn is not kept.
            self.abort()

    def _read_head(self, data):
        # (The search starts where the last read's could not have ended: a head trickled byte by byte costs linear time.)
        head = self._head + data
        end = head.find(b"\r\n\r\n", max(0, len(self._head) - 3))
        while True:
            if end < 0:
                if len(head) > MAX_HEAD:
                    self._malformed("the response head is too long")
                else:
                    self._head = head
                return
            if end > MAX_HEAD:
                return self._malformed("the response head is too long")
            self._head = b""
            if self._waiting is None:
                return  # cancelled: the connection is going
            try:
                version, code, phrase, headers = parse_head(head[:end])
                if 100 <= code < 200:
                    # An interim response (100 Continue): the real one follows.
                    self._interim += 1
                    if code == 101 or self._interim > MAX_INTERIM:
                        raise MalformedResponse("unexpected interim responses")
                    head = head[end + 4 :]
                    end = head.find(b"\r\n\r\n")
                    continue
                self._framing, length = _framing(code, self._method, headers)
            except MalformedResponse as e:
                return self._malformed(str(e))
            break
        connection = b",".join(headers.get(b"connection", ())).lower()
        # Kept for the next request only when both ends agree on where this body ends.
        self._keep = (
            version == (1, 1)
            and b"close" not in connection
            and (self._framing == _LENGTH and b"transfer-encoding" not in headers or self._framing == _CHUNKED and b"content-length" not in headers)
        )
        self._left = length or 0
        self._trailers = 0
        self._chunk = _SIZE
        self._line = b""
        self._producer = BodyProducer(self)
        self.state = _BODY
        waiting, self._waiting = self._waiting, None
        self._response = Response(self, version, code, phrase, headers)
        waiting.callback(self._response)
        rest = head[end + 4 :]
        if self.state == _BODY and self._framing == _LENGTH and self._left == 0:
            self._body_end(rest)
        elif self.state == _BODY and rest:
            self._body(rest)

    def _malformed(self, reason):
        """The response cannot be read: the request fails and the connection goes."""
        self._aborted = True
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.state = _CLOSED
            waiting.errback(ResponseFailed([Failure(MalformedResponse(reason))]))
        # (Mid-body, the connection's end tells the reader the body was cut.)
        if self.transport is not None:
            self.transport.abortConnection()

    def _give(self, piece):
        reader = self._reader
        if reader is not None:
            reader.dataReceived(piece)
        else:
            self._unread.append(piece)
            self._unread_size += len(piece)
            if self._unread_size > MAX_UNREAD:
                self.transport.pauseProducing()

    def _body(self, data):
        framing = self._framing
        if framing == _CHUNKED:
            self._chunked(data)
        elif framing == _LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                self._give(data)
            else:
                self._left = 0
                self._give(data[:left])
                if self.state == _BODY:
                    self._body_end(data[left:])
        else:
            self._give(data)

    def _chunked(self, data):
        if self._line:
            # A line split across reads (maybe between its CR and LF): read it whole.
            data, self._line = self._line + data, b""
        elif self._chunk == _SIZE:
            # One whole chunk, alone in its read: how a model's tokens arrive.
            end = data.find(b"\r\n", 0, 17)
            if end > 0 and not data[:end].strip(_HEX):
                stop = end + 2 + int(data[:end], 16)
                if stop > end + 2 and len(data) == stop + 2 and data.endswith(b"\r\n"):
                    return self._give(data[end + 2 : stop])
        position = 0
        size = len(data)
        while position < size and self.state == _BODY:
            step = self._chunk
            if step == _DATA:
                take = min(self._left, size - position)
                piece = data[position : position + take] if take != size else data
                position += take
                self._left -= take
                if not self._left:
                    self._chunk = _DATA_END
                self._give(piece)
                continue
            # A line: a chunk size, the CRLF after a chunk's data, or a trailer.
            end = data.find(b"\r\n", position)
            if end < 0:
                self._line = data[position:]
                if len(self._line) > MAX_LINE:
                    return self._malformed("a chunk line is too long")
                return
            line = data[position:end]
            position = end + 2
            if len(line) > MAX_LINE:
                return self._malformed("a chunk line is too long")
            if step == _DATA_END:
                if line:
                    return self._malformed("chunk data longer than its size")
                self._chunk = _SIZE
            elif step == _SIZE:
                digits = line.split(b";", 1)[0].strip(b" \t")
                # (int() alone would take a sign, "0x" or "_" too.)
                if not digits or len(digits) > 15 or digits.strip(_HEX):
                    return self._malformed("a bad chunk size")
                length = int(digits, 16)
                if length:
                    self._left = length
                    self._chunk = _DATA
                else:
                    self._chunk = _TRAILER
            elif not line:  # the blank line after the trailers: the body's end
                return self._body_end(data[position:])
            else:
                self._trailers += 1
                if self._trailers > MAX_TRAILERS:
                    return self._malformed("too many trailer lines")

    def _body_end(self, rest):
        """The body is complete; C{rest} is what came after it."""
        if rest:
            self._keep = False  # bytes nobody asked for: this connection is not reused
        self.state = _IDLE if self._keep else _CLOSED
        if self._reader is None:
            self._ended = Failure(ResponseDone())
            return
        self._finish(Failure(ResponseDone()))

    def _finish(self, reason):
        """Tell the reader the body is over, and keep or close the connection."""
        reader, self._reader = self._reader, None
        if self._producer is not None:
            self._producer.connection = None
            self._producer = None
        if self.state == _IDLE and not self._aborted:
            # Back in the pool first: the reader may ask its next request at once.
            self.transport.resumeProducing()  # (its reader may have paused it)
            self.pool.put(self)
        elif self.transport is not None and reason.check(ResponseDone):
            self.transport.loseConnection()
        if reader is not None:
            reader.connectionLost(reason)

    def deliver(self, protocol, response):
        """The body of C{response} goes to C{protocol} (see L{Response.deliverBody})."""
        if response is not self._response or self._reader is not None or self._producer is None:
            # (A response's connection may carry the next one's by now.)
            raise RuntimeError("a body is delivered once")
        self._reader = protocol
        protocol.makeConnection(self._producer)
        unread, self._unread = self._unread, []
        if self._unread_size > MAX_UNREAD and self.state == _BODY:
            self.transport.resumeProducing()
        self._unread_size = 0
        for piece in unread:
            if self._reader is not protocol:
                return
            protocol.dataReceived(piece)
        if self._ended is not None and self._reader is protocol:
            ended, self._ended = self._ended, None
            self._finish(ended)

    def connectionLost(self, reason=None):
        state, self.state = self.state, _CLOSED
        self._cancel_idle()
        self.pool.forget(self)
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(ResponseNeverReceived([reason if reason is not None else Failure(ConnectionDone())]))
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            failure = reason if reason is not None else Failure(ResponseFailed([]))
            waiting.errback((ResponseFailed if self._received else ResponseNeverReceived)([failure]))
        elif state == _BODY:
            if self._framing == _UNTIL_CLOSE and reason is not None and reason.check(ConnectionDone):
                ended = Failure(PotentialDataLoss())
            else:
                ended = Failure(ResponseFailed([reason]))
            if self._reader is None:
                self._ended = ended
            else:
                self._finish(ended)
        self.closed.callback(None)

    # --- in the pool -----------------------------------------------------------

    def idle(self, timeout, clock):
        self._cancel_idle()
        self._idle_timer = clock.callLater(timeout, self._idle_too_long)

    def _idle_too_long(self):
        # Out of the pool first: nothing may take a connection that is closing.
        self._idle_timer = None
        self.pool.forget(self)
        self.state = _CLOSED
        self.transport.loseConnection()

    def _cancel_idle(self):
        if self._idle_timer is not None:
            if self._idle_timer.active():
                self._idle_timer.cancel()
            self._idle_timer = None


@implementer(IStreamClientEndpoint)
class HandshakeEndpoint:
    """
    A TLS client endpoint (C{wrapClientTLS}'s) whose L{Connection} is made
    only once its TLS handshake is done: connecting takes the TCP
    connection and the handshake, both within C{timeout} seconds.  A
    backend that accepts the connection and never answers the handshake
    fails it with L{HandshakeTimedOut} (the connection dropped), as one
    that does not accept it fails with L{TimeoutError}.
    """

    def __init__(self, reactor, endpoint, timeout):
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout

    def connect(self, factory):
        made = []

        def finish(outcome):
            if timer.active():
                timer.cancel()
            if not result.called:
                (result.errback if isinstance(outcome, Failure) else result.callback)(outcome)
            elif not isinstance(outcome, Failure):
                outcome.abort()  # made after all, for nobody
            # (A failure after the result is the echo of a timeout or a cancellation.)

        def cancel(_):
            if timer.active():
                timer.cancel()
            result.errback(Failure(CancelledError()))
            stop()

        def stop():
            if made:
                made[0].abort()
            else:
                connecting.cancel()

        def expire():
            if made:
                finish(Failure(HandshakeTimedOut(self.timeout)))
            else:
                finish(Failure(TimeoutError(string="connecting timed out")))
            stop()

        def connected(connection):
            made.append(connection)
            return connection.handshake()

        result = Deferred(cancel)
        timer = self.reactor.callLater(self.timeout, expire)
        connecting = self.endpoint.connect(factory)
        connecting.addCallback(connected).addBoth(finish)
        return result


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool, key):
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr):
        return Connection(self.pool, self.key)


class Connections:
    """
    Persistent connections to the backends: per address, at most C{size}
    kept idle (the most recently used goes out first), each closed after
    C{timeout} seconds unused.
    """

    def __init__(self, reactor, size, timeout=120):
        self.reactor = reactor
        self.size = size
        self.timeout = timeout
        self._idle = {}  # key -> [Connection]
        # Closed for good (the gateway is stopping): no connection is kept after.
        self.closing = False
        # Identities (TLS settings a reload replaced) whose connections are no longer kept.
        self._retired = set()

    def get(self, key, endpoint):
        """A L{Deferred} L{Connection} to C{key}: an idle one, or a new one from C{endpoint}."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                return succeed(connection)
        return endpoint.connect(_ConnectionFactory(self, key))

    def put(self, connection):
        """A connection free for the next request, kept if there is room."""
        if self._retired and _identity(connection.key) in self._retired:
            connection.transport.loseConnection()
            return
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.size or self.closing:
            connection.transport.loseConnection()
            return
        idle.append(connection)
        connection.idle(self.timeout, self.reactor)

    def forget(self, connection):
        """A connection closed: it is no longer kept."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def retire(self, identity):
        """
        Close the idle connections made under C{identity} (see L{Client}),
        and keep none of it from now on: its TLS settings were replaced.
        """
        self._retired.add(identity)
        for key in [k for k in self._idle if _identity(k) == identity]:
            for connection in self._idle.pop(key):
                connection._cancel_idle()
                connection.state = _CLOSED
                connection.transport.loseConnection()

    def revive(self, identity):
        """Connections made under C{identity} are kept again (a reload brought its settings back)."""
        self._retired.discard(identity)

    def closeCachedConnections(self):
        """Close the idle connections, and keep none from now on; the L{Deferred} fires once they are closed."""
        self.closing = True
        closing = []
        for idle in self._idle.values():
            for connection in idle:
                closing.append(connection.closed)
                connection.transport.loseConnection()
        self._idle.clear()
        return DeferredList(closing)


def _identity(key):
    """The identity in a pool key (see L{Client}), or C{None}."""
    return key[3] if len(key) > 3 else None


@implementer(IAgent)
class Client:
    """
    An L{IAgent} on L{Connections}: C{request} as C{Agent}'s, for a body
    that is already in memory (a producer with C{data}, see
    L{clawdbot.backend.ollama.BytesProducer}).

    @param endpoints: an L{IAgentEndpointFactory}.
    @param identity: what tells this client's connections from another's
        to the same address (the fingerprint of its TLS settings), or
        C{None}: a connection is only ever reused by a client of the same
        identity.
    """

    def __init__(self, endpoints, pool, identity=None):
        self.endpoints = endpoints
        self.pool = pool
        self.identity = identity
        self._targets = {}

    def _target(self, uri):
        """C{(pool key, endpoint, request target, Host value)} for C{uri}, worked out once per URL."""
        target = self._targets.get(uri)
        if target is None:
            parsed = URI.fromBytes(uri)
            host = b"[" + parsed.host + b"]" if isIPv6Address(parsed.host.decode("ascii", "replace")) else parsed.host
            if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
                host = b"%b:%d" % (host, parsed.port)
            key = (parsed.scheme, parsed.host, parsed.port)
            if self.identity is not None:
                key += (self.identity,)
            if len(self._targets) >= 256:
                self._targets.clear()
            try:
                endpoint = self.endpoints.endpointForURI(parsed)
            except Exception as e:
                # (A host name or TLS settings the connection cannot be made
                # with: the caller says so in its own words.)
                raise EndpointError() from e
            target = self._targets[uri] = (key, endpoint, parsed.originForm, host)
        return target

    def request(self, method, uri, headers=None, bodyProducer=None):
        try:
            key, endpoint, target, host = self._target(uri)
            pairs = []
            if headers is not None:
                for name, values in headers.getAllRawHeaders():
                    for value in values:
                        if b"\r" in value or b"\n" in value:
                            raise ValueError("a header value with a line break")
                        pairs.append((name, value))
        except Exception:
            return fail()
        body = None if bodyProducer is None else bodyProducer.data
        d = self.pool.get(key, endpoint)
        d.addCallback(lambda connection: connection.request(method, target, host, pairs, body))
        return d

