"""
The in-memory tier (issue 15): the relay, the chat route and the native
route run against the fake Ollama's resource tree with no sockets and no
sleeps.

Both hops are in-memory connections (L{twisted.test.iosim}): the test's
raw HTTP client to the gateway's own L{GatewaySite}, and the Ollama
client's L{Agent} to a twisted.web site on the fake's resource.  One
L{Clock} is the reactor of everything (the gateway's parts, its site, the
fake, the pumps), so time moves only when a test advances it, and bytes
move only when it pumps (L{Wire}).  Nothing here touches the global reactor
or starts a thread (L{MemoryTests.setUp} checks both).
"""

import json
import threading

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

from clawdbot.backend import http1
from clawdbot.config import parse_config
from clawdbot.http.site import GatewaySite
from clawdbot.http.tree import build_root
from clawdbot.tap import compose
from testing.fake_ollama import DEFAULT_REPLY, FakeOllama, go_json, tokenize
from tests.helpers import BASE_CONFIG, merge_yaml, token

GATEWAY = IPv4Address("TCP", "127.0.0.1", 8080)
CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
OLLAMA = IPv4Address("TCP", "127.0.0.1", 11434)
TOKENS = tokenize(DEFAULT_REPLY)


class Recording(iosim.FakeTransport):
    """An in-memory transport that keeps a copy of everything written to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written = b""

    def write(self, data):
        if not self.disconnecting:
            self.written += data
        super().write(data)


class Wire:
    """
    In-memory connections on one clock: bytes move when L{pump} is called,
    time when L{advance} is.

    @ivar servers: the server side's transport of every connection made, in order.
    """

    def __init__(self, clock):
        self.clock = clock
        self.pumps = []
        self.servers = []

    def connect(self, factory, client, server_address, client_address):
        """Connect C{client} (a protocol) to a protocol of C{factory}; nothing moves until L{pump}."""
        server = factory.buildProtocol(client_address)
        server_transport = Recording(server, True, server_address, client_address)
        client_transport = Recording(client, False, client_address, server_address)
        self.servers.append(server_transport)
        self.pumps.append(iosim.connect(server, server_transport, client, client_transport, greet=False, clock=self.clock))

    def pump(self):
        """Move bytes (and disconnections) every way until nothing moves."""
        while any([p.flush() for p in self.pumps]):
            pass

    def advance(self, seconds):
        """Let C{seconds} pass on the clock, then L{pump}."""
        self.clock.advance(seconds)
        self.pump()


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """An endpoint whose connections go, over the L{Wire}, to a protocol of C{factory}."""

    def __init__(self, wire, factory):
        self.wire = wire
        self.factory = factory

    def connect(self, protocol_factory):
        client = protocol_factory.buildProtocol(OLLAMA)
        self.wire.connect(self.factory, client, OLLAMA, CLIENT)
        return succeed(client)


@implementer(IAgentEndpointFactory)
class MemoryEndpoints:
    """Every URI to one L{MemoryEndpoint}: the backend's host and port do not matter."""

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def endpointForURI(self, uri):
        return self.endpoint


def memory_agents(wire, factory):
    """
    An C{agent_factory} for L{clawdbot.backend.ollama.Ollama}: the
    production client (L{http1.Client}) with the gateway's connection pool,
    whose connections are in-memory ones to C{factory}.
    """

    def agent_factory(reactor, connect_timeout, pool):
        return http1.Client(MemoryEndpoints(MemoryEndpoint(wire, factory)), pool)

    return agent_factory


def dechunk(data):
    """
    The body in C{data} (chunked transfer coding) as far as whole chunks go,
    and whether its last chunk has come.
    """
    body = b""
    while True:
        size_line, found, rest = data.partition(b"\r\n")
        if not found:
            return body, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            return body, False
        body += rest[:size]
        data = rest[size + 2 :]


class Response:
    """
    What one HTTP/1.1 response in C{raw} says so far.

    @ivar status: the status code, or C{None} before the head is in.
    @ivar headers: lower-cased names to values.
    @ivar body: the body so far (dechunked, whole chunks only).
    @ivar ended: the whole body is in.
    """

    def __init__(self, raw):
        self.status, self.headers, self.body, self.ended = None, {}, b"", False
        head, found, rest = raw.partition(b"\r\n\r\n")
        if not found:
            return
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        if self.headers.get("transfer-encoding") == "chunked":
            self.body, self.ended = dechunk(rest)
        else:
            length = int(self.headers.get("content-length", "0"))
            self.body, self.ended = rest[:length], len(rest) >= length

    def json(self):
        return json.loads(self.body)

    def events(self):
        """The C{data:} payloads of the SSE events in full so far (C{[DONE]} as the string)."""
        out = []
        for event in self.body.split(b"\n\n")[:-1]:
            data = event.decode("utf-8").removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
        return out

    def deltas(self):
        """The content of each chunk's delta so far (C{None} where it has none)."""
        return [e["choices"][0]["delta"].get("content") for e in self.events() if e != "[DONE]" and "choices" in e]


class Client(Protocol):
    """A raw HTTP/1.1 client: what it sent is bytes, what it received is L{response}."""

    received = b""
    lost = False

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True

    @property
    def response(self):
        return Response(self.received)

    def leave(self):
        """Close the connection, as a client that goes away does."""
        self.transport.loseConnection()


def chat(stream, **extra):
    return dict({"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}], "stream": stream}, **extra)


class MemoryTests(SynchronousTestCase):
    """The gateway in front of the fake, in memory, on one L{Clock}."""

    def setUp(self):
        self._untouched()
        self.clock = Clock()
        self.wire = Wire(self.clock)
        self.fake = FakeOllama(clock=self.clock)
        self.backend_site = Site(self.fake.resource, reactor=self.clock)

    def _untouched(self):
        """Check, at the end, that the test left no call on the global reactor and no thread."""
        calls, threads = set(global_reactor.getDelayedCalls()), set(threading.enumerate())

        def check():
            self.assertEqual(set(global_reactor.getDelayedCalls()) - calls, set())
            self.assertEqual(set(threading.enumerate()) - threads, set())

        self.addCleanup(check)

    def gateway(self, extra=""):
        """The gateway's parts on C{BASE_CONFIG} with C{extra}, and its secure listener's site."""
        text = merge_yaml(merge_yaml(BASE_CONFIG, 'backend: {url: "http://ollama.test:11434"}'), extra)
        self.parts = compose(parse_config(text, {}), self.clock, agent_factory=memory_agents(self.wire, self.backend_site))
        self.site = GatewaySite(build_root(self.parts, debug=False), self.parts, debug=False, reactor=self.clock)

    def post(self, path, body, scope="chat:read chat:write"):
        """Send one POST on a new connection to the gateway; returns the L{Client}, everything pumped."""
        client = Client()
        self.wire.connect(self.site, client, GATEWAY, CLIENT)
        data = json.dumps(body).encode()
        head = [
            b"POST " + path.encode() + b" HTTP/1.1",
            b"Host: localhost:8080",
            b"Authorization: Bearer " + token(scope=scope).encode(),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(data),
        ]
        client.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + data)
        self.wire.pump()
        return client

    def upstream(self):
        """The one request the fake received."""
        [record] = self.fake.requests
        return record

    def assertFreed(self):
        """Nothing is left in flight: no backend slot, no request."""
        self.assertEqual(self.parts.ollama.slots.active, 0)
        self.assertEqual(self.parts.runtime.inflight, set())

    def assertErrorEvent(self, response, code):
        """The stream has ended with C{code}'s error event (and no C{[DONE]})."""
        self.assertTrue(response.ended)
        last = response.events()[-1]
        self.assertEqual(last["error"]["code"], code)
        self.assertNotIn("[DONE]", response.events())

    def test_completion(self):
        """A chat completion that is not streamed: Ollama's whole reply, translated."""
        self.gateway()
        response = self.post("/v1/chat/completions", chat(False)).response
        self.assertEqual(response.status, 200)
        self.assertTrue(response.ended)
        body = response.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["choices"][0]["message"], {"role": "assistant", "content": DEFAULT_REPLY})
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        record = self.upstream()
        self.assertEqual((record.path, record.body["stream"], record.outcome), ("/api/chat", False, "completed"))
        self.assertFreed()

    def test_stream_is_paced_by_the_backend(self):
        """
        Each SSE chunk reaches the client as soon as the fake sends its
        line, and not before: at every step the client has one chunk per
        line sent, nothing waits for more of the reply.
        """
        self.gateway()
        self.fake.behave(pace=1.0)
        client = self.post("/v1/chat/completions", chat(True))
        record = self.upstream()
        for sent in range(1, len(TOKENS) + 1):
            response = client.response
            self.assertEqual(record.lines_sent, sent)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.headers["content-type"], "text/event-stream; charset=utf-8")
            self.assertEqual(response.deltas(), TOKENS[:sent])
            self.assertFalse(response.ended)
            self.wire.advance(0.5)
            self.assertEqual(client.response.deltas(), TOKENS[:sent])
            self.wire.advance(0.5)
        response = client.response
        self.assertTrue(response.ended)
        self.assertEqual(response.events()[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(response.events()[-1], "[DONE]")
        self.assertEqual(record.outcome, "completed")
        self.assertFreed()

    def test_client_leaving_closes_the_backend_request(self):
        """A client that leaves mid-stream: the fake sees its request closed, the slot is free, nothing more is generated."""
        self.gateway()
        self.fake.behave(pace=1.0)
        client = self.post("/v1/chat/completions", chat(True))
        self.wire.advance(1.0)
        self.assertEqual(client.response.deltas(), TOKENS[:2])
        self.assertEqual(self.parts.ollama.slots.active, 1)
        client.leave()
        self.wire.pump()
        [disconnect] = self.fake.disconnects
        self.assertEqual((disconnect.path, disconnect.lines_sent), ("/api/chat", 2))
        self.assertTrue(self.upstream().closed_by_client)
        self.assertFreed()
        self.wire.advance(10.0)
        self.assertEqual(self.upstream().lines_sent, 2)

    def test_backend_error_mid_stream(self):
        """Ollama's error line mid-stream ends the SSE stream with the error event, after what came before it."""
        self.gateway()
        self.fake.behave(fail_mid_stream=3)
        response = self.post("/v1/chat/completions", chat(True)).response
        self.assertEqual(response.status, 200)
        self.assertEqual(response.deltas(), TOKENS[:3])
        self.assertErrorEvent(response, "UPSTREAM_UNAVAILABLE")
        self.assertEqual(self.upstream().outcome, "error_line")
        self.assertFreed()

    def test_native_stream_passes_ndjson_through(self):
        """C{/ollama/api/chat} streams Ollama's NDJSON lines byte for byte, each as it is sent."""
        self.gateway()
        self.fake.behave(pace=1.0)
        client = self.post("/ollama/api/chat", chat(True))
        record = self.upstream()
        for sent in range(1, len(TOKENS) + 2):
            self.assertEqual(record.lines_sent, sent)
            self.assertEqual(client.response.body.count(b"\n"), sent)
            self.wire.advance(1.0)
        response = client.response
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/x-ndjson")
        self.assertTrue(response.ended)
        self.assertEqual(response.body, Response(self.wire.servers[1].written).body)
        lines = [json.loads(line) for line in response.body.splitlines()]
        self.assertEqual(response.body, b"".join(go_json(line) + b"\n" for line in lines))
        self.assertEqual("".join(line["message"]["content"] for line in lines), DEFAULT_REPLY)
        self.assertTrue(lines[-1]["done"])
        self.assertFreed()

    def test_timeout_before_the_answer(self):
        """An answer that does not start within C{timeout}: 504 UPSTREAM_TIMEOUT when the clock gets there, and the fake sees its request closed."""
        self.gateway("timeout: 5s")
        self.fake.hold(0)
        client = self.post("/v1/chat/completions", chat(False))
        self.wire.advance(4.0)
        self.assertIsNone(client.response.status)
        self.assertEqual(self.parts.ollama.slots.active, 1)
        self.wire.advance(1.0)
        response = client.response
        self.assertEqual(response.status, 504)
        self.assertEqual(response.json()["error"]["code"], "UPSTREAM_TIMEOUT")
        self.assertTrue(self.upstream().closed_by_client)
        self.assertFreed()

    def test_timeout_mid_stream(self):
        """A stream still running at C{timeout} ends with the timeout's error event, and the fake sees its request closed."""
        self.gateway("timeout: 3.5s")
        self.fake.behave(pace=1.0)
        client = self.post("/v1/chat/completions", chat(True))
        for _ in range(3):
            self.wire.advance(1.0)
        self.assertEqual(client.response.deltas(), TOKENS[:4])
        self.assertFalse(client.response.ended)
        self.wire.advance(0.5)
        self.assertErrorEvent(client.response, "UPSTREAM_TIMEOUT")
        self.assertEqual(self.fake.disconnects[0].lines_sent, 4)
        self.assertFreed()

    def test_stalled_stream(self):
        """A stream whose backend stops sending ends with the timeout's error event once C{backend.idle_timeout} passes."""
        self.gateway("backend: {idle_timeout: 2s}")
        self.fake.behave(stall_after=2)
        client = self.post("/v1/chat/completions", chat(True))
        self.assertEqual(client.response.deltas(), TOKENS[:2])
        self.wire.advance(1.9)
        self.assertFalse(client.response.ended)
        self.wire.advance(0.1)
        self.assertErrorEvent(client.response, "UPSTREAM_TIMEOUT")
        self.assertTrue(self.upstream().closed_by_client)
        self.assertFreed()
