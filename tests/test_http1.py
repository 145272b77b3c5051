"""
The lean HTTP/1.1 client for the backend leg (issue 21,
L{clawdbot.backend.http1}): responses framed every way HTTP/1.1 allows,
read however the bytes are split, failures told the way C{Agent} tells
them, and connections reused only when both ends agree where a body ends.

The parsing tests drive one L{Connection} over a L{StringTransport}; the
pool tests use real TCP connections to a scripted server on loopback.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from clawdbot.backend import http1
from clawdbot.backend.ollama import BytesProducer
from clawdbot.net import send_now


class Pool:
    """A stand-in for L{http1.Connections}: records what it is given back."""

    def __init__(self):
        self.kept = []
        self.forgotten = []

    def put(self, connection):
        self.kept.append(connection)

    def forget(self, connection):
        self.forgotten.append(connection)


class Reader(Protocol):
    """A body's reader: what it got, and how the body ended."""

    def __init__(self):
        self.body = b""
        self.reason = None
        self.made = False

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.body += data

    def connectionLost(self, reason):
        self.reason = reason


def connection():
    pool = Pool()
    conn = http1.Connection(pool, ("http", b"backend", 11434))
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, pool


def ask(conn, method=b"POST", body=b'{"model":"m"}'):
    """Send a request; C{(responses, failures)} lists that fill as its Deferred fires."""
    responses, failures = [], []
    d = conn.request(method, b"/api/chat", b"backend:11434", [(b"user-agent", b"clawdbot")], body)
    d.addCallbacks(responses.append, failures.append)
    return d, responses, failures


def answered(raw, method=b"POST", body=b"{}"):
    """A connection whose request got C{raw} back in one read, its body read by a L{Reader}: C{(conn, transport, pool, response, reader)}."""
    conn, transport, pool = connection()
    _, responses, _ = ask(conn, method, body)
    conn.dataReceived(raw)
    reader = Reader()
    responses[0].deliverBody(reader)
    return conn, transport, pool, responses[0], reader


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'1b\r\n{"message":{"content":"a"}}\r\n'
    b"5;name=value\r\nhello\r\n"
    b"10\r\n0123456789abcdef\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)
CHUNKED_BODY = b'{"message":{"content":"a"}}hello0123456789abcdef'


class RequestTests(SynchronousTestCase):
    def test_request_bytes(self):
        """One write: request line, Host, the given headers, Content-Length and the body."""
        conn, transport, _ = connection()
        ask(conn)
        self.assertEqual(
            transport.value(),
            b'POST /api/chat HTTP/1.1\r\nhost: backend:11434\r\nuser-agent: clawdbot\r\ncontent-length: 13\r\n\r\n{"model":"m"}',
        )

    def test_no_body(self):
        conn, transport, _ = connection()
        ask(conn, b"GET", None)
        self.assertEqual(transport.value(), b"GET /api/chat HTTP/1.1\r\nhost: backend:11434\r\nuser-agent: clawdbot\r\n\r\n")

    def test_header_injection_refused(self):
        """A header value with a line break never reaches the wire as a header of its own."""
        conn, transport, pool = connection()
        pool.get = lambda key, endpoint: succeed(conn)
        client = http1.Client(Endpoints(1), pool)
        client.request(b"GET", b"http://backend:11434/api/tags", Headers({b"x-a": [b"1\r\nx-b: 2"]}))
        self.assertNotIn(b"\r\nx-b", transport.value())
        self.assertEqual(transport.value().count(b"\r\n"), 4)


class FramingTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=len(CHUNKED)), max_size=12))
    def test_chunked_split_anywhere(self, cuts):
        """However the reads split a chunked response, the reader gets its body exactly, and the connection is kept."""
        conn, _, pool = connection()
        _, responses, failures = ask(conn)
        reader = Reader()
        first = True
        edges = sorted({c for c in cuts} | {0, len(CHUNKED)})
        for start, end in zip(edges, edges[1:]):
            conn.dataReceived(CHUNKED[start:end])
            if responses and first:
                first = False
                responses[0].deliverBody(reader)
        self.assertEqual(failures, [])
        self.assertEqual(responses[0].code, 200)
        self.assertEqual(responses[0].headers[b"content-type"], [b"application/x-ndjson"])
        self.assertEqual(reader.body, CHUNKED_BODY)
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(pool.kept, [conn])

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    def test_one_chunk_per_read(self, pieces):
        """Chunks that each come alone in a read (a model's tokens), CRLFs in their data included, arrive exactly."""
        conn, _, pool, response, reader = answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            conn.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertIsNone(reader.reason)
        conn.dataReceived(b"0\r\n\r\n")
        self.assertEqual(reader.body, b"".join(pieces))
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(pool.kept, [conn])

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
    def test_content_length_split_anywhere(self, body, cuts):
        conn, _, pool = connection()
        _, responses, _ = ask(conn)
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        reader = Reader()
        edges = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for start, end in zip(edges, edges[1:]):
            conn.dataReceived(data[start:end])
        responses[0].deliverBody(reader)  # late: what came first is kept for it
        self.assertEqual(reader.body, body)
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(pool.kept, [conn])

    def test_body_ends_with_the_connection(self):
        """No length and no chunking: the body is what comes until the close, and the connection is not kept."""
        conn, _, pool = connection()
        _, responses, _ = ask(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome ")
        reader = Reader()
        responses[0].deliverBody(reader)
        conn.dataReceived(b"body")
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(reader.body, b"some body")
        self.assertTrue(reader.reason.check(PotentialDataLoss))
        self.assertEqual(pool.kept, [])

    def test_no_body(self):
        """HEAD, 204 and 304 have no body whatever their headers say."""
        for method, status in ((b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified")):
            conn, _, pool, _, reader = answered(b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n", method, None)
            self.assertEqual((reader.body, pool.kept), (b"", [conn]))
            self.assertTrue(reader.reason.check(ResponseDone))

    def test_interim_response_skipped(self):
        _, _, _, response, reader = answered(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
        self.assertEqual((response.code, response.phrase, reader.body), (404, b"Not Found", b"no"))

    def test_interim_flood_refused(self):
        """Interim responses in a row are read in a loop, at most MAX_INTERIM of them: a flood fails the request cleanly."""
        conn, transport, _ = connection()
        _, responses, failures = ask(conn)
        conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" * 5000 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(responses, [])
        failures[0].trap(ResponseFailed)
        self.assertTrue(transport.disconnected)

    def test_head_byte_by_byte(self):
        """A head trickled one byte per read is read whole (each read searches only what is new)."""
        conn, _, _ = connection()
        _, responses, _ = ask(conn)
        raw = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 3000 + b"\r\nContent-Length: 2\r\n\r\nok"
        for i in range(len(raw)):
            conn.dataReceived(raw[i : i + 1])
            if responses:
                break
        self.assertEqual((responses[0].code, responses[0].headers[b"x-pad"]), (200, [b"p" * 3000]))

    def test_not_kept(self):
        """A connection is reused only when both ends agree where the body ended."""
        heads = [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
        ]
        for raw in heads:
            _, transport, pool, _, reader = answered(raw)
            self.assertEqual(reader.body, b"ok", raw)
            self.assertTrue(reader.reason.check(ResponseDone), raw)
            self.assertEqual(pool.kept, [], raw)
            self.assertTrue(transport.disconnecting, raw)

    def test_malformed(self):
        """A head or chunk that does not parse fails the request (or the body) and drops the connection."""
        for raw in (
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"x-long: " + b"a" * http1.MAX_HEAD + b"\r\n\r\n",
        ):
            conn, transport, _ = connection()
            _, responses, failures = ask(conn)
            conn.dataReceived(raw)
            self.assertEqual(responses, [], raw)
            failures[0].trap(ResponseFailed)
            self.assertTrue(failures[0].value.reasons[0].check(http1.MalformedResponse), raw)
            self.assertTrue(transport.disconnected, raw)

    def test_trailers_bounded(self):
        conn, transport, pool, _, reader = answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"x-t: 1\r\n" * (http1.MAX_TRAILERS + 1))
        self.assertTrue(transport.disconnected)
        self.assertEqual(pool.kept, [])

    def test_an_old_response_cannot_take_the_next_body(self):
        """Once a connection carries the next response, the previous one's deliverBody is refused."""
        conn, _, pool, first, reader = answered(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        _, responses, _ = ask(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        self.assertRaises(RuntimeError, first.deliverBody, Reader())
        second = Reader()
        responses[0].deliverBody(second)
        self.assertEqual((reader.body, second.body), (b"a", b"b"))

    def test_malformed_chunk(self):
        for body in (b"zz\r\n", b"-1\r\n", b"0x2\r\nok\r\n", b"1_0\r\n", b"2\r\nokay\r\n", b"1" * (http1.MAX_LINE + 10)):
            conn, transport, pool, _, reader = answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.dataReceived(body)
            self.assertTrue(transport.disconnected, body)
            conn.connectionLost(Failure(ConnectionLost()))
            self.assertFalse(reader.reason.check(ResponseDone, PotentialDataLoss), body)
            self.assertEqual(pool.kept, [], body)


class FailureTests(SynchronousTestCase):
    def test_closed_before_any_byte(self):
        """As C{Agent}: no byte back is L{ResponseNeverReceived} (the backend may be tried again)."""
        conn, _, pool = connection()
        _, _, failures = ask(conn)
        conn.connectionLost(Failure(ConnectionDone()))
        failures[0].trap(ResponseNeverReceived)
        self.assertEqual(pool.forgotten, [conn])

    def test_closed_mid_head(self):
        conn, _, _ = connection()
        _, _, failures = ask(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-")
        conn.connectionLost(Failure(ConnectionDone()))
        failures[0].trap(ResponseFailed)

    def test_body_cut(self):
        """A body that ends before its length or its last chunk reaches the reader as a failure, read or not yet read."""
        for head, part in (
            (b"Content-Length: 10", b"short"),
            (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n"),
        ):
            for late in (False, True):
                conn, _, pool = connection()
                _, responses, _ = ask(conn)
                conn.dataReceived(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + part)
                reader = Reader()
                if not late:
                    responses[0].deliverBody(reader)
                conn.connectionLost(Failure(ConnectionDone()))
                if late:
                    responses[0].deliverBody(reader)
                self.assertIn(reader.body, (b"short", b"hello"))
                self.assertTrue(reader.reason.check(ResponseFailed), (head, late))
                self.assertEqual(pool.kept, [])

    def test_cancel_before_the_head(self):
        """Cancelling drops the connection; its end tells nobody twice."""
        conn, transport, pool = connection()
        d, _, failures = ask(conn)
        d.cancel()
        failures[0].trap(CancelledError)
        self.assertTrue(transport.disconnected)
        conn.connectionLost(Failure(ConnectionLost()))
        self.assertEqual((len(failures), pool.kept), (1, []))

    def test_reader_stops_the_body(self):
        """The reader's stopProducing drops the connection; it is never put back, and the reader hears the end."""
        conn, transport, pool, _, reader = answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        reader.transport.stopProducing()
        self.assertTrue(transport.disconnected)
        conn.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(reader.reason.check(ResponseFailed))
        self.assertEqual(pool.kept, [])
        reader.transport.pauseProducing()  # after the end: nothing happens
        reader.transport.stopProducing()

    def test_discarded_after_the_body_came(self):
        """A body nobody wants (its caller gave up) is dropped with its connection, even when it was already complete."""
        conn, transport, pool = connection()
        _, responses, _ = ask(conn)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        class Discard(Protocol):
            def connectionMade(self):
                self.transport.stopProducing()

        responses[0].deliverBody(Discard())
        self.assertEqual(pool.kept, [])
        self.assertTrue(transport.disconnected)

    def test_pause_and_resume(self):
        """The reader paces the connection, and a connection put back is never left paused."""
        conn, transport, pool, _, reader = answered(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        reader.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        conn.dataReceived(b"cd")
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(pool.kept, [conn])


@implementer(IAgentEndpointFactory)
class Endpoints:
    def __init__(self, port):
        self.port = port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)


class Scripted(Protocol):
    """A backend that answers each request (read up to its blank line, bodies unread) with the next scripted bytes."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            self.buffer = self.buffer[length[0] if length else 0 :]
            self.factory.heads.append(head)
            self.transport.write(self.factory.answers.pop(0))

    def connectionLost(self, reason):
        self.factory.lost.append(self)


class PoolTests(TestCase):
    def setUp(self):
        factory = Factory.forProtocol(Scripted)
        factory.connections, factory.heads, factory.answers, factory.lost = [], [], [], []
        self.factory = factory
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = http1.Connections(reactor, 2)
        self.client = http1.Client(Endpoints(self.port.getHost().port), self.pool)
        self.addCleanup(self.pool.closeCachedConnections)

    async def fetch(self, body=None):
        producer = None if body is None else BytesProducer(body)
        response = await self.client.request(b"POST" if body else b"GET", b"http://127.0.0.1:%d/api/x" % self.port.getHost().port, Headers({b"user-agent": [b"t"]}), producer)
        reader = Reader()
        done = Deferred()
        reader.connectionLost = lambda reason: (setattr(reader, "reason", reason), done.callback(None))
        response.deliverBody(reader)
        await done
        return response.code, reader.body

    async def test_kept_and_reused(self):
        """Requests one after another share one connection; closeCachedConnections closes it."""
        self.factory.answers += [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 2 + [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n!\r\n0\r\n\r\n"]
        self.assertEqual(await self.fetch(), (200, b"ok"))
        self.assertEqual(await self.fetch(b"{}"), (200, b"ok"))
        self.assertEqual(await self.fetch(), (200, b"!"))
        self.assertEqual(len(self.factory.connections), 1)
        self.assertTrue(self.factory.heads[0].startswith(b"GET /api/x HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % self.port.getHost().port))
        await self.pool.closeCachedConnections()
        self.assertEqual(self.pool._idle, {})

    async def test_closed_by_the_backend_while_idle(self):
        """A kept connection the backend closes leaves the pool; the next request opens a new one."""
        self.factory.answers += [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 2
        await self.fetch()
        lost = Deferred()
        self.factory.connections[0].connectionLost = lambda reason: lost.callback(None)
        self.factory.connections[0].transport.loseConnection()
        await lost
        await self.pool.closeCachedConnections()  # (waits for the client side's end)
        self.assertEqual(await self.fetch(), (200, b"ok"))
        self.assertEqual(len(self.factory.connections), 2)

    def test_idle_and_aborted_connections_never_handed_out(self):
        """A kept connection whose idle time ran out, or that was dropped, leaves the pool at once: the next request opens a new one."""
        clock = Clock()
        pool = http1.Connections(clock, 4, timeout=5)
        opened = []

        class Endpoint:
            def connect(self, factory):
                conn = factory.buildProtocol(None)
                conn.makeConnection(StringTransport())
                opened.append(conn)
                return succeed(conn)

        def done_one():
            d = pool.get("k", Endpoint())
            conn = self.successResultOf(d)
            _, responses, _ = ask(conn)
            conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            responses[0].deliverBody(Reader())
            return conn

        first = done_one()
        self.assertIs(done_one(), first)  # kept and reused
        clock.advance(5)
        self.assertTrue(first.transport.disconnecting)
        second = done_one()  # same turn as the idle timeout: not the closing one
        self.assertIsNot(second, first)
        second.abort()
        self.assertIsNot(done_one(), second)
        self.assertEqual(len(opened), 3)

    async def test_nothing_kept_once_closed(self):
        """After closeCachedConnections (the gateway stopping), a call that ends closes its connection instead of keeping it."""
        self.factory.answers += [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        await self.pool.closeCachedConnections()
        self.assertEqual(await self.fetch(), (200, b"ok"))
        self.assertEqual(self.pool._idle.get(("http", b"127.0.0.1", self.port.getHost().port), []), [])

    async def test_at_most_size_kept(self):
        """Three requests at once open three connections; two are kept afterwards."""
        self.factory.answers += [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n."] * 3
        results = await gatherResults([ensureDeferred(self.fetch()) for _ in range(3)])
        self.assertEqual(results, [(200, b".")] * 3)
        self.assertEqual(len(self.factory.connections), 3)
        self.assertEqual(sum(len(v) for v in self.pool._idle.values()), 2)


class Collect(Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)
        self.data = []

    def dataReceived(self, data):
        self.data.append(data)
        if sum(map(len, self.data)) >= self.factory.expected:
            self.factory.done.callback(b"".join(self.data))


class SendNowTests(TestCase):
    """L{send_now}: at once when the socket takes it, else the reactor's way, in order."""

    async def test_order_kept_when_the_socket_is_full(self):
        factory = Factory.forProtocol(Collect)
        factory.made, factory.done = Deferred(), Deferred()
        big, small = bytes(range(256)) * 32768, b"the end"  # 8 MB: more than the socket buffers hold
        factory.expected = len(big) + len(small) + 2
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(Protocol))
        self.addCleanup(client.transport.loseConnection)
        server = await factory.made
        server.transport.pauseProducing()  # the reader stops reading
        transport = client.transport
        send_now(transport, b"<<")
        self.assertEqual(transport._tempDataLen, 0)  # sent at once: nothing buffered
        send_now(transport, big)
        self.assertGreater(transport._tempDataLen, 0)  # what the socket did not take waits in order
        send_now(transport, small)  # behind it, not before it
        self.assertTrue(transport._tempDataBuffer[-1] == small)
        server.transport.resumeProducing()
        received = await factory.done
        self.assertEqual(received, b"<<" + big + small)

    def test_other_transports_buffer_as_usual(self):
        transport = StringTransport()
        send_now(transport, b"x")
        self.assertEqual(transport.value(), b"x")
