"""
The OpenAI API over the fake Ollama on real sockets: official clients,
streaming, backpressure, disconnects, the queue, timeouts and upstream
failures (SPEC.md §4, §8, §9).
"""

import json
import socket

import ollama
import openai
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testing.fake_ollama import FakeOllama, _pending_bytes
from tests.helpers import bearer, closed_port, get_json, merge_yaml, serve, token, when_queued

ALL = "chat:read chat:write admin"
HI = [{"role": "user", "content": "hi"}]


class Backed(TestCase):
    """A gateway in front of a fake Ollama."""

    timeout = 60

    def start(self, extra="", fake=None, **kw):
        self.fake = fake or FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.gw = serve(self, extra=merge_yaml(f'backend: {{url: "{self.fake.url}"}}', extra), **kw)
        self.auth = bearer(token(scope=ALL))
        return self.gw

    def sdk(self, scope=ALL, **kw):
        """An OpenAI client that opens a fresh connection per call (so none outlives the test)."""
        import httpx

        http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
        self.addCleanup(http.close)
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=token(scope=scope), max_retries=0, http_client=http, **kw)


def sse_events(raw):
    events = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            events.append(payload if payload == b"[DONE]" else json.loads(payload))
    return events


class OfficialClientTests(Backed):
    async def test_openai_sdk_chat(self):
        """The official openai SDK gets a chat.completion with usage from the fake's counts."""
        self.start()
        result = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(result.choices[0].message.content, self.fake.reply_text)
        self.assertEqual(result.choices[0].finish_reason, "stop")
        self.assertGreater(result.usage.completion_tokens, 0)
        sent = self.fake.requests_to("/api/chat")[-1]
        self.assertTrue(sent.body["user_id"].endswith("|alice"), sent.body["user_id"])
        self.assertNotIn("authorization", sent.headers)
        self.assertNotIn("cookie", sent.headers)

    async def test_openai_sdk_stream(self):
        """Streamed through the SDK, the text arrives whole, in order, with usage at the end when asked."""
        self.start()

        def run():
            chunks = list(
                self.sdk().chat.completions.create(
                    model="qwen3:32b", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
                )
            )
            return chunks

        chunks = await deferToThread(run)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, self.fake.reply_text)
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "stop")
        self.assertGreater(chunks[-1].usage.total_tokens, 0)

    async def test_openai_sdk_thinking(self):
        """Qwen3 thinking output arrives as reasoning_content, plain and streamed."""
        self.start()
        result = await deferToThread(
            lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=[{"role": "user", "content": "hi"}], reasoning_effort="high")
        )
        self.assertEqual(result.choices[0].message.model_extra["reasoning_content"], self.fake.thinking_text)
        self.assertIs(self.fake.requests_to("/api/chat")[-1].body["think"], True)

        def run():
            stream = self.sdk().chat.completions.create(model="qwen3:32b", messages=[{"role": "user", "content": "hi"}], reasoning_effort="high", stream=True)
            return [c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in stream if c.choices]

        self.assertEqual("".join(await deferToThread(run)), self.fake.thinking_text)

    async def test_openai_sdk_tools(self):
        """Tool calls come back with JSON-string arguments and finish_reason tool_calls, plain and streamed."""
        self.fake = FakeOllama(tool_calls=[{"function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}}])
        self.start(fake=self.fake)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
        messages = [{"role": "user", "content": "weather in Hangzhou?"}]
        result = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=messages, tools=tools))
        call = result.choices[0].message.tool_calls[0]
        self.assertEqual(result.choices[0].finish_reason, "tool_calls")
        self.assertEqual((call.function.name, json.loads(call.function.arguments)), ("get_weather", {"city": "Hangzhou"}))

        def run():
            stream = self.sdk().chat.completions.create(model="qwen3:32b", messages=messages, tools=tools, stream=True)
            return [c for c in stream if c.choices]

        chunks = await deferToThread(run)
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        self.assertEqual(json.loads(calls[0].function.arguments), {"city": "Hangzhou"})
        self.assertEqual(chunks[-1].choices[0].finish_reason, "tool_calls")

        # The tool result goes back as a tool message and the model answers.
        follow = messages + [result.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        answer = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=follow, tools=tools))
        self.assertEqual(answer.choices[0].finish_reason, "stop")
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["messages"][-1]["tool_name"], "get_weather")

    async def test_openai_sdk_models_and_embeddings(self):
        """Models come from /api/tags (allow-list applied); embeddings from /api/embed, float and base64."""
        self.start('backend: {models: ["qwen3:32b", "nomic-embed-text:latest"], aliases: {gpt-4o: "qwen3:32b"}}')
        models = await deferToThread(lambda: [m.id for m in self.sdk().models.list()])
        self.assertEqual(sorted(models), ["gpt-4o", "nomic-embed-text:latest", "qwen3:32b"])
        result = await deferToThread(lambda: self.sdk().embeddings.create(model="nomic-embed-text:latest", input=["a", "b"]))
        self.assertEqual(len(result.data), 2)
        self.assertEqual(len(result.data[0].embedding), 768)
        floats = await deferToThread(lambda: self.sdk().embeddings.create(model="nomic-embed-text:latest", input="a", encoding_format="float"))
        self.assertAlmostEqual(floats.data[0].embedding[0], result.data[0].embedding[0], places=5)

    async def test_ollama_client_native(self):
        """The ollama Python client works against /ollama with a bearer token; admin calls need admin."""
        self.start()

        def run(scope):
            client = ollama.Client(host=self.gw.url + "/ollama", headers=bearer(token(scope=scope)))
            try:
                return calls(client)
            finally:
                client._client.close()

        def calls(client):
            out = {"chat": client.chat(model="qwen3:32b", messages=[{"role": "user", "content": "hi"}])["message"]["content"]}
            out["stream"] = "".join(p["message"]["content"] for p in client.chat(model="qwen3:32b", messages=[{"role": "user", "content": "hi"}], stream=True))
            out["generate"] = client.generate(model="qwen3:32b", prompt="hi")["response"]
            out["list"] = [m.model for m in client.list().models]
            out["embed"] = len(client.embed(model="nomic-embed-text", input="x").embeddings)
            try:
                client.pull("qwen3:32b")
                out["pull"] = "ok"
            except ollama.ResponseError as e:
                out["pull"] = e.status_code
            return out

        out = await deferToThread(run, "chat:read chat:write")
        self.assertEqual(out["chat"], self.fake.reply_text)
        self.assertEqual(out["stream"], self.fake.reply_text)
        self.assertIn("qwen3:32b", out["list"])
        self.assertEqual(out["embed"], 1)
        self.assertEqual(out["pull"], 403)
        admin = await deferToThread(run, ALL)
        self.assertEqual(admin["pull"], "ok")

    async def test_native_paths_normalised(self):
        """Native paths are normalised before the allow-list: traversal and unknown names are 404."""
        self.start()
        for path, expected in (
            ("/ollama/api/./tags", 200),
            ("/ollama/api//tags", 200),
            ("/ollama/api/x/../tags", 200),
            ("/ollama/api/tags/../pull", 405),
            ("/ollama/api/chat%2F..%2Fblobs", 404),
            ("/ollama/api/pss", 404),
            ("/ollama/api/blobs/sha256:abc", 404),
            ("/ollama/api/../../api/tags", 404),
            ("/ollama/tags", 404),
        ):
            status, _, _ = await get_json(self.gw.url + path, headers=self.auth)
            self.assertEqual(status, expected, path)


class StreamingTests(Backed):
    async def test_sse_shape_and_headers(self):
        """The stream is text/event-stream with no-cache and X-Accel-Buffering: no, one chunk per Ollama line, then [DONE]."""
        self.start()
        status, headers, raw = await get_json(
            self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-cache"])
        self.assertEqual(headers.getRawHeaders("x-accel-buffering"), ["no"])
        events = sse_events(raw)
        lines = self.fake.requests_to("/api/chat")[-1].lines_sent
        self.assertEqual(len(events), lines + 1)
        self.assertEqual(events[-1], b"[DONE]")

    async def test_chunks_written_at_once(self):
        """
        A paced stream's chunks go out as they are translated: the reactor
        watches the client's socket for room only for the first write (the
        headers), not once per chunk (issue 21, L{clawdbot.net.send_now}); the
        backend's requests go out the same way.
        """
        self.start()
        self.fake.behave(pace=0.01)
        watched = []
        add_writer = reactor.addWriter

        def counting(writer):
            watched.append((type(writer).__name__, writer.getHost().port, writer.getPeer().port, id(writer)))
            return add_writer(writer)

        self.patch(reactor, "addWriter", counting)
        status, _, raw = await get_json(
            self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        self.assertEqual(status, 200)
        lines = self.fake.requests_to("/api/chat")[-1].lines_sent
        self.assertGreater(lines, 5)
        self.assertEqual(len(sse_events(raw)), lines + 1)
        gateway = int(self.gw.url.rsplit(":", 1)[1])
        fake = int(self.fake.url.rsplit(":", 1)[1].rstrip("/"))
        to_client = [w for w in watched if w[:2] == ("Server", gateway)]
        to_backend = [w for w in watched if w[0] == "Client" and w[2] == fake]
        by_fake = [w for w in watched if w[:2] == ("Server", fake)]
        # The fake (twisted.web's way) waits a turn for each line: the count sees it.
        self.assertGreaterEqual(len(by_fake), lines)
        # The gateway: the headers, and the close of a Connection: close answer.
        self.assertLessEqual(len(to_client), 3)
        # Its backend connections: watched only while connecting, never for a request.
        self.assertEqual(len(to_backend), len({w[3] for w in to_backend}))

    async def test_backpressure(self):
        """A client that stops reading makes the gateway stop reading Ollama: the reply waits at the backend, not in the gateway."""
        big = " ".join(["x" * 20000] * 1500)  # about 30 MB of reply
        self.start("max_connections: 2", fake=FakeOllama(reply_text=big))
        host, port = self.gw.url.split("//")[1].split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token(scope=ALL)}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()

        class Slow(Protocol):
            def __init__(self):
                self.received = 0
                self.data = []
                self.done = Deferred()

            def connectionMade(self):
                self.transport.setTcpNoDelay(True)
                self.transport.write(head + body)
                self.transport.pauseProducing()

            def dataReceived(self, data):
                self.received += len(data)
                self.data.append(data)

            def connectionLost(self, reason):
                self.done.callback(None)

        client = Slow()
        await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), client)
        await deferLater(reactor, 1.5)
        exchange = self.fake.requests_to("/api/chat")[-1]
        transports = [p.transport for p in self.fake.factory.protocols]
        waiting_at_backend = sum(_pending_bytes(t) for t in transports)
        self.assertGreater(waiting_at_backend, 10_000_000, "the gateway absorbed the reply instead of pushing back")
        client.transport.resumeProducing()
        await client.done
        raw = b"".join(client.data)
        self.assertEqual(exchange.outcome, "completed")
        self.assertEqual(raw.count(b"data: "), exchange.lines_sent + 1)
        self.assertTrue(raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"))

    async def test_disconnect_cancels_backend_and_frees_slot(self):
        """
        A client that disconnects mid-stream closes the Ollama connection
        and frees its slot: the client's leaving does it, as no timeout of
        the gateway's is due before the test's own.
        """
        self.start("max_connections: 1\nbackend: {idle_timeout: 1h}\ntimeout: 1h")
        self.fake.behave(stall_after=3)
        host, port = self.gw.url.split("//")[1].split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()

        class Quitter(Protocol):
            got = Deferred()

            def connectionMade(self):
                self.transport.write(
                    (
                        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Authorization: Bearer {token(scope=ALL)}\r\nContent-Length: {len(body)}\r\n\r\n"
                    ).encode()
                    + body
                )

            def dataReceived(self, data):
                if b"data: " in data and not self.got.called:
                    self.got.callback(None)

        quitter = Quitter()
        await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), quitter)
        await quitter.got
        self.assertEqual(self.gw.parts.ollama.slots.active, 1)
        disconnected = self.fake.next_disconnect()
        quitter.transport.loseConnection()
        await disconnected
        self.assertEqual(self.gw.parts.ollama.slots.active, 0)
        self.fake.behave()
        status, _, body = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI})
        self.assertEqual(status, 200)


class LimitTests(Backed):
    async def test_queue_full_is_503(self):
        """With every slot busy and the wait queue full, a request gets 503 GATEWAY_BUSY with Retry-After; waiters run in order."""
        self.start("max_connections: 1\nlimits: {max_queue: 1, queue_timeout: 30s}")
        self.fake.hold(times=1)
        from twisted.internet.defer import ensureDeferred

        def call(text):
            body = {"messages": [{"role": "user", "content": text}]}
            return ensureDeferred(get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body=body))

        first = call("first")
        await self.fake.next_request("/api/chat")  # it holds the one slot
        queued = when_queued(self, self.gw.parts)
        second = call("second")
        await queued  # it fills the queue
        status, headers, error = await call("third")
        self.assertEqual(status, 503)
        self.assertEqual(error["error"]["code"], "GATEWAY_BUSY")
        self.assertTrue(headers.getRawHeaders("retry-after"))
        self.fake.release()
        self.assertEqual((await first)[0], 200)
        self.assertEqual((await second)[0], 200)
        self.assertEqual([r.body["messages"][-1]["content"] for r in self.fake.requests_to("/api/chat")], ["first", "second"])

    async def test_queue_wait_times_out(self):
        """A request that waits longer than queue_timeout for a slot gets 503."""
        self.start("max_connections: 1\nlimits: {max_queue: 5, queue_timeout: 300ms}")
        self.fake.behave(stall_after=1, times=1)
        from twisted.internet.defer import ensureDeferred

        stuck = ensureDeferred(
            get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI, "stream": True})
        )
        await self.fake.next_request("/api/chat")  # it holds the one slot
        status, _, error = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI})
        self.assertEqual((status, error["error"]["code"]), (503, "GATEWAY_BUSY"))
        stuck.cancel()
        stuck.addErrback(lambda failure: failure.trap(Exception))
        self.fake.behave()
        await self.fake.stop()


class TimeoutTests(Backed):
    async def test_first_byte_timeout(self):
        """No response headers within first_byte_timeout: 504 UPSTREAM_TIMEOUT."""
        self.start("backend: {first_byte_timeout: 300ms}")
        self.fake.hold()  # never answers
        status, _, body = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI})
        self.assertEqual((status, body["error"]["code"]), (504, "UPSTREAM_TIMEOUT"))
        self.assertEqual(self.gw.parts.ollama.slots.active, 0)

    async def test_idle_timeout_mid_stream(self):
        """A stream that stalls longer than idle_timeout ends with an SSE error event, not a silent close."""
        self.start("backend: {idle_timeout: 300ms}")
        self.fake.behave(stall_after=2)
        status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI, "stream": True})
        events = sse_events(raw)
        self.assertEqual(status, 200)
        self.assertEqual(events[-1]["error"]["code"], "UPSTREAM_TIMEOUT", raw)
        self.assertNotIn(b"[DONE]", raw)

    async def test_total_timeout_bounds_streams(self):
        """The overall timeout bounds the whole backend call, even while chunks keep coming."""
        self.start("timeout: 500ms\nbackend: {idle_timeout: 10s}")
        self.fake.behave(pace=0.1)
        status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI, "stream": True})
        self.assertEqual(sse_events(raw)[-1]["error"]["code"], "UPSTREAM_TIMEOUT")

    async def test_non_streaming_idle_timeout(self):
        """A non-streamed reply that takes too long is a 504."""
        self.start("timeout: 300ms")
        self.fake.behave(pace=0.2)
        status, _, body = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI})
        self.assertEqual((status, body["error"]["code"]), (504, "UPSTREAM_TIMEOUT"))

    async def test_connect_timeout(self):
        """A backend that never accepts the connection is a 504 after connect_timeout."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        self.addCleanup(lambda: [f.close() for f in fillers])
        gw = serve(self, extra=f'backend: {{url: "http://127.0.0.1:{port}", connect_timeout: 300ms, first_byte_timeout: 5s}}')
        status, _, body = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=bearer(token(scope=ALL)), body={"messages": HI})
        self.assertEqual(status, 504)
        self.assertEqual(body["error"]["code"], "UPSTREAM_TIMEOUT")


class UpstreamFailureTests(Backed):
    async def test_refused_is_502(self):
        """Ollama not listening: 502 UPSTREAM_UNAVAILABLE without the address in the body."""
        port = closed_port(self)
        gw = serve(self, extra=f'backend: {{url: "http://127.0.0.1:{port}"}}')
        for path, body in (("/v1/chat/completions", {"messages": []}), ("/v1/models", None)):
            status, _, error = await get_json(gw.url + path, method="POST" if body is not None else "GET", headers=bearer(token(scope=ALL)), body=body)
            self.assertEqual((status, error["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"))
            self.assertNotIn(str(port), json.dumps(error))

    async def test_5xx_is_502(self):
        """Ollama answering 500 is a 502 with a curated reason, not Ollama's text."""
        self.start()
        self.fake.behave(status_error=500, error_message="llama runner process has terminated: /usr/lib/ollama secret")
        status, _, error = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI})
        self.assertEqual((status, error["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"))
        self.assertNotIn("runner", json.dumps(error))

    async def test_unknown_model_is_404(self):
        """A model Ollama does not have is 404 MODEL_NOT_FOUND."""
        self.start()
        status, _, error = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"model": "nope:1b", "messages": []})
        self.assertEqual((status, error["error"]["code"]), (404, "MODEL_NOT_FOUND"))

    async def test_mid_stream_error_and_early_close(self):
        """An error line or a dropped connection mid-stream ends the SSE stream with an error event in the §4 shape."""
        self.start()
        for behaviour in ({"fail_mid_stream": 3}, {"close_early": 3}):
            self.fake.behave(times=1, **behaviour)
            status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI, "stream": True})
            events = sse_events(raw)
            self.assertEqual(status, 200)
            self.assertEqual(set(events[-1]), {"error"}, behaviour)
            self.assertEqual(events[-1]["error"]["code"], "UPSTREAM_UNAVAILABLE")
            self.assertEqual(len([e for e in events[:-1] if e != b"[DONE]"]), 3)
            self.assertNotIn(b"[DONE]", raw)


class SeveralBackendsTests(TestCase):
    """backend.urls: least-busy routing, failover before the first byte, health in /readyz."""

    timeout = 60

    def two(self):
        fakes = []
        for _ in range(2):
            fake = FakeOllama(tokens=3)
            fake.listen(reactor)
            self.addCleanup(fake.stop)
            fakes.append(fake)
        return fakes

    async def test_least_busy_routing(self):
        """A new call goes to the backend with the fewest calls in progress."""
        a, b = self.two()
        gw = serve(self, extra=f'backend: {{urls: ["{a.url}", "{b.url}"]}}')
        auth = bearer(token(scope=ALL))
        a.hold()
        b.hold()
        from twisted.internet.defer import DeferredList, ensureDeferred

        def next_arrival():
            """Fires when either backend gets its next call."""
            waits = [fake.when_requests(len(fake.requests_to("/api/chat")) + 1, "/api/chat") for fake in (a, b)]
            return DeferredList(waits, fireOnOneCallback=True)

        arrival = next_arrival()
        first = ensureDeferred(get_json(gw.url + "/v1/chat/completions", method="POST", headers=auth, body={"messages": HI, "stream": True}))
        await arrival
        arrival = next_arrival()
        second = ensureDeferred(get_json(gw.url + "/v1/chat/completions", method="POST", headers=auth, body={"messages": HI, "stream": True}))
        await arrival
        self.assertEqual((len(a.requests_to("/api/chat")), len(b.requests_to("/api/chat"))), (1, 1))
        self.assertEqual(sorted(u.active for u in gw.parts.ollama.upstreams(gw.parts.runtime.config)), [1, 1])
        a.release()
        b.release()
        for d in (first, second):
            self.assertEqual((await d)[0], 200)
        self.assertEqual(gw.parts.ollama.slots.active, 0)

    async def test_clients_leaving_do_not_mark_a_backend_down(self):
        """Clients that leave while their calls wait for Ollama's first byte leave every backend up (nothing is routed away from a healthy one)."""
        a, b = self.two()
        gw = serve(self, extra=f'backend: {{urls: ["{a.url}", "{b.url}"], health_interval: 1h}}')
        a.hold()
        b.hold()
        host, port = gw.url.split("//")[1].split(":")
        body = json.dumps({"messages": HI, "stream": True}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token(scope=ALL)}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        clients = []
        for n in range(6):
            client = await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), Protocol())
            client.transport.write(head + body)
            clients.append(client)
            await (a if n % 2 == 0 else b).when_requests(n // 2 + 1, "/api/chat")
        gone = [fake.next_disconnect() for fake in (a, b) for _ in range(3)]
        for client in clients:
            client.transport.abortConnection()
        for d in gone:
            await d
        self.assertEqual([u.down_until for u in gw.parts.ollama.upstreams(gw.parts.runtime.config)], [0.0, 0.0])

    async def test_failover_when_one_dies(self):
        """With one backend gone, every call still succeeds on the other; /readyz stays ready and shows which is down."""
        a, b = self.two()
        gw = serve(self, extra=f'backend: {{urls: ["{a.url}", "{b.url}"], health_interval: 30s}}')
        auth = bearer(token(scope=ALL))
        await a.stop()
        for stream in (False, True, False, False):
            status, _, body = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=auth, body={"messages": HI, "stream": stream})
            self.assertEqual(status, 200, body)
        self.assertEqual(len(b.requests_to("/api/chat")), 4)
        status, _, ready = await get_json(gw.url + "/readyz")
        self.assertEqual(status, 200)
        self.assertEqual([x["up"] for x in ready["checks"]["backends"]], [False, True])
        self.assertEqual(gw.parts.ollama.slots.active, 0)
        self.assertEqual([u.active for u in gw.parts.ollama.upstreams(gw.parts.runtime.config)], [0, 0])

    async def test_all_down_is_502(self):
        """With every backend gone the call is a 502 and /readyz is 503."""
        a, b = self.two()
        gw = serve(self, extra=f'backend: {{urls: ["{a.url}", "{b.url}"]}}')
        await a.stop()
        await b.stop()
        status, _, body = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=bearer(token(scope=ALL)), body={"messages": HI})
        self.assertEqual((status, body["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"))
        self.assertEqual((await get_json(gw.url + "/readyz"))[0], 503)
