"""
OpenTelemetry tracing (issue 22), against an OTLP/HTTP receiver started by
the test (L{testing.otlp_receiver}, decoding the protobuf with the
C{opentelemetry-proto} package) and the fake Ollama:

  - L{ReceiverTests}: the receiver itself, fed by the SDK's own
    C{OTLPSpanExporter}, and its outage modes;
  - L{SpanTests}: the spans a call makes, their links and attributes (the
    GenAI conventions, non-streamed and streamed), a client's
    C{traceparent}/C{tracestate} honoured and carried on to Ollama;
  - L{PrivacyTests}: content off by default and redacted when captured,
    canary secrets absent from every exported byte, the collector's headers;
  - L{TraceIdTests}: the trace id in access-log lines and error bodies,
    sampling (C{sample_rate: 0} and the client's sampled flag);
  - L{OutageTests}: a collector that refuses, hangs or answers 503 never
    fails a request; drops and failed exports counted; a reload moves
    export to a new endpoint;
  - L{GenAIMetricsTests}: the GenAI token and time-to-first-token metrics.

Spans are awaited (L{OTLPReceiver.wait_for}), never slept for; the export
delay is patched short (C{clawdbot.ops.tracing.EXPORT_DELAY}).
"""

import json
import re

import openai

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from clawdbot.ops import tracing
from testing.fake_ollama import DEFAULT_REPLY, FakeOllama, tokenize
from testing.otlp_receiver import OTLPReceiver, first, matching
from tests.helpers import SECRET, Backed, bearer, get_json, merge_yaml, stream_call, token, until, when_queued

MODEL = "qwen3:32b"
CHAT = "/v1/chat/completions"
CHAT_SPAN = "POST /v1/chat/completions"
HEX32 = re.compile(r"[0-9a-f]{32}")

# A client's trace context (the W3C Trace Context document's example ids).
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
CLIENT_STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"

# Content canaries: words that appear only in what the user sent and what
# the model answered.
USER_MARK = "zebraquokka7319"
USER_TEXT = f"Tell me how the {USER_MARK} migrates in spring"
REPLY_MARK = "marblegiraffe4242"
REPLY_TEXT = f"The {REPLY_MARK} walks north when the snow melts."

# Secret canaries: none may reach a span.
COLLECTOR_CANARY = "collector-canary-Zq8vX2mW"
KEY_CANARY = "sk-canary0123456789abcdefABCDEF"
PASSWORD_CANARY = "hunter2canaryPw77"
COOKIE_CANARY = "cookie-canary-Pz3k9QvA"


def traceparent(trace_id=CLIENT_TRACE, parent=CLIENT_PARENT, sampled=True):
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}"


def parse_traceparent(value):
    """(trace id, parent id, sampled) of a version 00 C{traceparent}; C{None} when C{value} is not one."""
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", value or "")
    return (match.group(1), match.group(2), bool(int(match.group(3), 16) & 1)) if match else None


def user(text=USER_TEXT):
    return [{"role": "user", "content": text}]


def prompt_tokens(text=USER_TEXT):
    """What the fake Ollama reports as C{prompt_eval_count} for one user message C{text}."""
    return FakeOllama._prompt_tokens(text) + 4 + 2


def strings(value):
    """Every string inside an attribute value (lists and dicts walked)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)


def span_strings(spans):
    """Every string a span carries: name, attribute values, event names and their attribute values, status message."""
    for s in spans:
        yield s.name
        yield s.status_message
        yield from strings(s.attributes)
        for e in s.events:
            yield e.name
            yield from strings(e.attributes)


def metric(text, name, **labels):
    """The value of the first sample C{name} with (at least) C{labels} in a Prometheus text page, or C{None}."""
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if match is None or match.group(1) != name:
            continue
        got = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


def started_receiver(testcase):
    receiver = OTLPReceiver()
    receiver.listen(reactor)
    testcase.addCleanup(receiver.stop)
    return receiver


# --- the receiver itself ---------------------------------------------------------


class ReceiverTests(TestCase):
    """The receiver, fed by the OpenTelemetry SDK's own OTLP/HTTP exporter."""

    timeout = 30

    def sdk_spans(self):
        """Two finished SDK spans (a server span and its client child), with every kind of attribute value."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.trace import SpanKind, Status, StatusCode

        provider = TracerProvider(resource=Resource.create({"service.name": "probe", "deployment.environment": "test"}))
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("probe-scope")
        attrs = {"s": "text", "b": True, "i": 42, "f": 0.5, "strs": ["stop", "length"], "ints": [1, 2]}
        with tracer.start_as_current_span("outer", kind=SpanKind.SERVER, attributes=attrs):
            with tracer.start_as_current_span("inner", kind=SpanKind.CLIENT) as inner:
                inner.add_event("first_byte", {"n": 1})
                inner.set_status(Status(StatusCode.ERROR, "boom"))
        self.addCleanup(provider.shutdown)
        return memory.get_finished_spans()

    def exporter(self, receiver, **kwargs):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=receiver.endpoint, **kwargs)
        self.addCleanup(exporter.shutdown)
        return exporter

    async def export(self, exporter, spans):
        """Export on a thread (the exporter blocks; the receiver runs on this reactor): success or not."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        return (await deferToThread(exporter.export, spans)) == SpanExportResult.SUCCESS

    async def test_sdk_exporter_round_trip(self):
        """Spans the SDK exports (plain and gzip) come back whole: ids, links, kinds, attributes, events, status, resource, headers."""
        from opentelemetry.exporter.otlp.proto.http import Compression

        receiver = started_receiver(self)
        spans = self.sdk_spans()
        sent = {s.name: s for s in spans}
        for compression in (Compression.NoCompression, Compression.Gzip):
            exporter = self.exporter(receiver, headers={"x-collector-key": COLLECTOR_CANARY}, compression=compression, timeout=5)
            self.assertTrue(await self.export(exporter, spans), compression)
        self.assertEqual([e.status for e in receiver.exports], [200, 200])
        self.assertEqual([e.headers.get("content-encoding") for e in receiver.exports], [None, "gzip"])
        self.assertEqual(receiver.exports[0].body, receiver.exports[1].body)
        for export in receiver.exports:
            self.assertEqual(export.headers["content-type"], "application/x-protobuf")
            self.assertEqual(export.headers["x-collector-key"], COLLECTOR_CANARY)
            self.assertEqual(export.path, "/v1/traces")

        self.assertEqual(len(receiver.spans), 4)
        outer = first(receiver.spans, name="outer")
        inner = first(receiver.spans, name="inner")
        self.assertEqual(outer.trace_id, format(sent["outer"].context.trace_id, "032x"))
        self.assertEqual(outer.span_id, format(sent["outer"].context.span_id, "016x"))
        self.assertEqual(outer.parent_span_id, "")
        self.assertEqual((inner.trace_id, inner.parent_span_id), (outer.trace_id, outer.span_id))
        self.assertEqual((outer.kind, inner.kind), ("SERVER", "CLIENT"))
        self.assertEqual(outer.attributes, {"s": "text", "b": True, "i": 42, "f": 0.5, "strs": ["stop", "length"], "ints": [1, 2]})
        self.assertEqual([(e.name, e.attributes) for e in inner.events], [("first_byte", {"n": 1})])
        self.assertEqual((inner.status_code, inner.status_message, outer.status_code), ("ERROR", "boom", "UNSET"))
        self.assertEqual(outer.resource["service.name"], "probe")
        self.assertEqual(outer.resource["deployment.environment"], "test")
        self.assertEqual(outer.scope, "probe-scope")
        # Sent twice: the same ids twice.
        self.assertEqual([s.name for s in receiver.children(outer)], ["inner", "inner"])
        self.assertEqual(await receiver.wait_for(lambda spans: first(spans, name="inner")), inner)

    async def test_outage_modes(self):
        """status(503), hang and refuse each fail the SDK's export; accept brings the receiver back."""
        receiver = started_receiver(self)
        spans = self.sdk_spans()

        receiver.status(503)
        self.assertFalse(await self.export(self.exporter(receiver, timeout=0.5), spans))
        self.assertTrue(receiver.exports)
        self.assertEqual({e.status for e in receiver.exports}, {503})
        self.assertEqual(receiver.spans, [])

        receiver.hang()
        before = len(receiver.exports)
        self.assertFalse(await self.export(self.exporter(receiver, timeout=0.5), spans))
        self.assertGreater(len(receiver.exports), before)
        self.assertEqual({e.status for e in receiver.exports[before:]}, {None})
        self.assertEqual(receiver.spans, [])

        await receiver.refuse()
        before = len(receiver.exports)
        self.assertFalse(await self.export(self.exporter(receiver, timeout=0.5), spans))
        self.assertEqual(len(receiver.exports), before)

        receiver.accept()
        self.assertTrue(await self.export(self.exporter(receiver, timeout=5), spans))
        self.assertEqual(sorted(s.name for s in receiver.spans), ["inner", "outer"])

    async def test_unreadable_bodies(self):
        """A body that is not protobuf is a 400, another content type a 415; neither adds spans."""
        receiver = started_receiver(self)
        status, _, _ = await get_json(receiver.endpoint, method="POST", body=b"\xff\xff\xff", headers={"Content-Type": "application/x-protobuf"})
        self.assertEqual(status, 400)
        status, _, _ = await get_json(receiver.endpoint, method="POST", body={"resourceSpans": []})
        self.assertEqual(status, 415)
        self.assertEqual(receiver.spans, [])
        self.assertEqual([e.status for e in receiver.exports], [400, 415])


# --- the gateway ------------------------------------------------------------------


class Traced(Backed):
    """A gateway with tracing on, exporting to a receiver of its own."""

    timeout = 60

    def traced(self, tracing="", extra="", fake=None):
        """Start the fake Ollama, a receiver and a gateway exporting to it; C{tracing}: more of the section (YAML)."""
        from clawdbot.ops import tracing as module

        self.patch(module, "EXPORT_DELAY", 0.05)
        self.receiver = started_receiver(self)
        section = f'tracing: {{enabled: true, endpoint: "{self.receiver.endpoint}", headers: {{x-collector-key: "{COLLECTOR_CANARY}"}}}}'
        if tracing:
            section = merge_yaml(section, "tracing: {" + tracing + "}")
        return self.start(merge_yaml(section, extra), fake=fake)

    async def chat(self, auth=None, headers=None, messages=None, **body):
        """A non-streamed chat completion: (status, headers, body)."""
        payload = {"model": MODEL, "messages": messages or user()}
        payload.update(body)
        hdrs = dict(bearer(token()) if auth is None else auth, **(headers or {}))
        return await get_json(self.gw.url + CHAT, method="POST", headers=hdrs, body=payload)

    async def chat_ok(self, **kwargs):
        status, headers, body = await self.chat(**kwargs)
        self.assertEqual(status, 200, body)
        return headers, body

    async def stream(self, auth=None, headers=None, **body):
        """A streamed chat completion: (status, SSE bytes)."""
        payload = {"model": MODEL, "messages": user(), "stream": True}
        payload.update(body)
        return await stream_call(self.gw.url + CHAT, payload, dict(bearer(token()) if auth is None else auth, **(headers or {}))).done

    async def server_span(self, timeout=10, **attrs):
        """The (first) exported chat server span with C{attrs} (see L{first})."""
        return await self.receiver.wait_for(lambda spans: first(spans, name=CHAT_SPAN, kind="SERVER", **attrs), timeout)

    async def trace_with(self, server, *names, timeout=10):
        """Once the children called C{names} of the server span C{server} are in, all of them by name."""

        def ready(spans):
            children = {s.name: s for s in self.receiver.children(server)}
            return children if all(n in children for n in names) else None

        return await self.receiver.wait_for(ready, timeout, f"children {names} of {server.name}")

    async def metrics(self):
        status, _, text = await get_json(self.gw.url + "/metrics", headers=bearer(token(sub="ops", scope="admin")))
        self.assertEqual(status, 200)
        return text.decode()

    def log_line(self, request_id):
        lines = [line for line in self.access_lines() if line.get("request_id") == request_id]
        return lines[0] if lines else None


class SpanTests(Traced):
    """The spans of a call, their links and attributes."""

    async def test_server_span_children_and_genai_attributes(self):
        """A chat completion: the server span, its authenticate and backend children, the GenAI attributes and the resource."""
        self.traced("service_name: gw-under-test")
        headers, body = await self.chat_ok(auth=bearer(token(teams=["red", "blue"])), max_tokens=50, temperature=0.25)
        request_id = headers.getRawHeaders("x-request-id")[0]
        server = await self.server_span(clawdbot__request_id=request_id)
        children = await self.trace_with(server, "authenticate", f"chat {MODEL}")

        self.assertEqual(server.parent_span_id, "")
        self.assertNotEqual(server.status_code, "ERROR")
        self.assertEqual(server.resource.get("service.name"), "gw-under-test")
        a = server.attributes
        self.assertEqual(a.get("http.request.method"), "POST")
        self.assertEqual(a.get("url.path"), CHAT)
        self.assertEqual(a.get("http.route"), CHAT)
        self.assertEqual(a.get("http.response.status_code"), 200)
        self.assertEqual(a.get("enduser.id"), "alice")
        await until(lambda: self.log_line(request_id) is not None, what="the access-log line")
        self.assertEqual(a.get("clawdbot.principal.issuer"), self.log_line(request_id)["idp"])
        self.assertEqual(a.get("clawdbot.teams"), ["red", "blue"])
        self.assertNotIn("error.type", a)

        # GenAI, with the fake's counts (and the gateway's own usage) as the truth.
        expected_in, expected_out = prompt_tokens(), len(tokenize(DEFAULT_REPLY))
        self.assertEqual((body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]), (expected_in, expected_out))
        self.assertEqual(a.get("gen_ai.operation.name"), "chat")
        self.assertEqual(a.get("gen_ai.system"), "ollama")
        self.assertEqual(a.get("gen_ai.request.model"), MODEL)
        self.assertEqual(a.get("gen_ai.response.model"), MODEL)
        self.assertEqual(a.get("gen_ai.usage.input_tokens"), expected_in)
        self.assertEqual(a.get("gen_ai.usage.output_tokens"), expected_out)
        self.assertEqual(a.get("gen_ai.request.max_tokens"), 50)
        self.assertEqual(a.get("gen_ai.request.temperature"), 0.25)
        self.assertEqual(a.get("gen_ai.response.finish_reasons"), ["stop"])

        auth = children["authenticate"]
        self.assertEqual((auth.kind, auth.trace_id), ("INTERNAL", server.trace_id))
        self.assertEqual(auth.attributes.get("clawdbot.auth.kind"), "jwt")

        backend = children[f"chat {MODEL}"]
        self.assertEqual((backend.kind, backend.trace_id), ("CLIENT", server.trace_id))
        self.assertEqual(backend.attributes.get("server.address"), "127.0.0.1")
        self.assertEqual(backend.attributes.get("server.port"), self.fake.port)
        self.assertEqual(backend.attributes.get("clawdbot.backend"), 0)
        self.assertEqual(backend.attributes.get("gen_ai.operation.name"), "chat")
        self.assertEqual(backend.attributes.get("gen_ai.request.model"), MODEL)
        self.assertIsNotNone(backend.event("first_byte"), backend.events)
        self.assertNotEqual(backend.status_code, "ERROR")
        # No wait for a slot, no queue span.
        self.assertNotIn("queue", children)
        # The call Ollama received carried the backend span's context (sampled;
        # the SDK may set W3C level 2's random-id flag beside it).
        sent = self.fake.requests_to("/api/chat")[-1]
        self.assertEqual(parse_traceparent(sent.headers.get("traceparent")), (server.trace_id, backend.span_id, True))

    async def test_streamed_genai_attributes(self):
        """A streamed chat cut by max_tokens: usage from Ollama's last line, the finish reason length, a temperature of 0 recorded."""
        self.traced()
        status, data = await self.stream(max_tokens=3, temperature=0)
        self.assertEqual(status, 200, data)
        self.assertIn(b"data: [DONE]", data)
        server = await self.server_span()
        children = await self.trace_with(server, f"chat {MODEL}")
        a = server.attributes
        self.assertEqual(a.get("gen_ai.operation.name"), "chat")
        self.assertEqual(a.get("gen_ai.request.model"), MODEL)
        self.assertEqual(a.get("gen_ai.response.model"), MODEL)
        self.assertEqual(a.get("gen_ai.usage.input_tokens"), prompt_tokens())
        self.assertEqual(a.get("gen_ai.usage.output_tokens"), 3)
        self.assertEqual(a.get("gen_ai.request.max_tokens"), 3)
        self.assertEqual(a.get("gen_ai.request.temperature"), 0.0)
        self.assertEqual(a.get("gen_ai.response.finish_reasons"), ["length"])
        self.assertEqual(a.get("http.response.status_code"), 200)
        self.assertIsNotNone(children[f"chat {MODEL}"].event("first_byte"))

    async def test_session_turn_storage_and_route_template(self):
        """A session turn has storage children and the session id; a session read is named by its route template."""
        self.traced()
        auth = bearer(token())
        status, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=auth, body={"title": "t"})
        self.assertEqual(status, 201, session)
        sid = session["id"]
        status, _, body = await get_json(self.gw.url + CHAT, method="POST", headers=auth, body={"session_id": sid, "messages": user()})
        self.assertEqual(status, 200, body)
        server = await self.server_span(clawdbot__session_id=sid)

        def stored(spans):
            found = [s for s in self.receiver.children(server) if s.name.startswith("storage ")]
            return found or None

        storage = await self.receiver.wait_for(stored, 15, "storage spans of the turn")
        self.assertTrue(all(s.kind == "INTERNAL" for s in storage), storage)
        self.assertIn(f"chat {MODEL}", [s.name for s in self.receiver.children(server)])

        status, _, _ = await get_json(f"{self.gw.url}/v1/sessions/{sid}", headers=auth)
        self.assertEqual(status, 200)
        read = await self.receiver.wait_for(lambda spans: first(spans, name="GET /v1/sessions/{id}", kind="SERVER"))
        self.assertEqual(read.attributes.get("http.route"), "/v1/sessions/{id}")
        self.assertEqual(read.attributes.get("url.path"), f"/v1/sessions/{sid}")

    async def test_queue_span_for_a_call_that_waited(self):
        """A call that waited for the one backend slot has a queue child with its wait and position; the first has none."""
        self.traced(extra="max_connections: 1")
        first_trace, second_trace = "1" * 32, "2" * 32
        self.fake.hold(times=1)
        a = ensureDeferred(self.chat(headers={"traceparent": traceparent(first_trace)}))
        await self.fake.next_request("/api/chat")
        queued = when_queued(self, self.gw.parts)
        b = ensureDeferred(self.chat(headers={"traceparent": traceparent(second_trace)}))
        await queued
        self.fake.release()
        self.assertEqual([(await a)[0], (await b)[0]], [200, 200])

        waited = await self.server_span(trace_id=second_trace)
        queue = (await self.trace_with(waited, "queue"))["queue"]
        self.assertEqual(queue.kind, "INTERNAL")
        wait = queue.attributes.get("clawdbot.queue.wait_seconds")
        self.assertIsInstance(wait, float)
        self.assertGreaterEqual(wait, 0.0)
        self.assertIsInstance(queue.attributes.get("clawdbot.queue.position"), int)
        direct = await self.server_span(trace_id=first_trace)
        await self.trace_with(direct, f"chat {MODEL}")
        self.assertNotIn("queue", [s.name for s in self.receiver.children(direct)])

    async def test_client_traceparent_honoured_and_propagated(self):
        """A client's traceparent and tracestate: the server span joins that trace, and Ollama gets the backend span as parent."""
        self.traced()
        await self.chat_ok(headers={"traceparent": traceparent(), "tracestate": CLIENT_STATE})
        server = await self.server_span(trace_id=CLIENT_TRACE)
        self.assertEqual(server.parent_span_id, CLIENT_PARENT)
        self.assertEqual(server.trace_state, CLIENT_STATE)
        backend = (await self.trace_with(server, f"chat {MODEL}"))[f"chat {MODEL}"]
        sent = self.fake.requests_to("/api/chat")[-1]
        self.assertEqual(sent.headers.get("traceparent"), f"00-{CLIENT_TRACE}-{backend.span_id}-01")
        self.assertEqual(sent.headers.get("tracestate"), CLIENT_STATE)

        # A malformed traceparent starts a new trace, and the call works.
        await self.chat_ok(headers={"traceparent": "00-" + "0" * 32 + "-" + CLIENT_PARENT + "-01"})
        fresh = await self.receiver.wait_for(lambda spans: [s for s in matching(spans, name=CHAT_SPAN) if s.trace_id != CLIENT_TRACE] or None)
        self.assertEqual(fresh[0].parent_span_id, "")
        self.assertRegex(fresh[0].trace_id, HEX32)
        self.assertNotEqual(fresh[0].trace_id, "0" * 32)
        self.assertNotIn("tracestate", self.fake.requests_to("/api/chat")[-1].headers)


class PrivacyTests(Traced):
    """What spans never carry, and what they carry when told to."""

    async def test_content_off_by_default(self):
        """Without capture_content neither the user's text nor the reply is in any exported byte."""
        self.traced(fake=FakeOllama(reply_text=REPLY_TEXT))
        _, body = await self.chat_ok()
        self.assertIn(REPLY_MARK, body["choices"][0]["message"]["content"])
        status, data = await self.stream()
        self.assertEqual(status, 200)
        self.assertIn(REPLY_MARK.encode(), data)
        await self.receiver.wait_for(lambda spans: len(matching(spans, name=CHAT_SPAN)) == 2 or None)
        await self.receiver.wait_for(lambda spans: len(matching(spans, name=f"chat {MODEL}")) == 2 or None)
        for raw in self.receiver.bodies:
            self.assertNotIn(USER_MARK.encode(), raw)
            self.assertNotIn(REPLY_MARK.encode(), raw)
        self.assertFalse([s for s in span_strings(self.receiver.spans) if USER_MARK in s or REPLY_MARK in s])

    async def test_content_captured_redacted(self):
        """With capture_content the user's text and the reply are in the spans, with secrets redacted as the access log does."""
        self.traced("capture_content: true", fake=FakeOllama(reply_text=REPLY_TEXT))
        text = f"{USER_TEXT}; my key is {KEY_CANARY} and password={PASSWORD_CANARY}"
        await self.chat_ok(messages=user(text))
        server = await self.server_span()
        await self.trace_with(server, f"chat {MODEL}")
        trace = self.receiver.trace(server.trace_id)
        said = [s for s in span_strings(trace) if USER_MARK in s]
        self.assertTrue(said, "the user's text is in no span")
        self.assertTrue(any("[redacted]" in s for s in said), said)
        self.assertTrue([s for s in span_strings(trace) if REPLY_MARK in s], "the reply is in no span")
        for raw in self.receiver.bodies:
            self.assertNotIn(KEY_CANARY.encode(), raw)
            self.assertNotIn(PASSWORD_CANARY.encode(), raw)

    async def test_canary_secrets_absent_and_collector_headers_sent(self):
        """No JWT, API key, cookie, password or config secret in any exported byte; the collector gets tracing.headers."""
        self.traced()
        jwt_token = token(teams=["red"])
        status, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=bearer(jwt_token), body={"name": "laptop"})
        self.assertEqual(status, 201, made)
        api_key = made["key"]
        extra = {"Cookie": f"session={COOKIE_CANARY}", "X-Api-Key": KEY_CANARY}
        await self.chat_ok(auth=bearer(jwt_token), headers=extra)
        await self.chat_ok(auth=bearer(api_key), headers={"traceparent": traceparent()})
        wrong = token(secret="another-secret-0123456789-abcdefghij")
        status, _, _ = await self.chat(auth=bearer(wrong), headers={"traceparent": traceparent("3" * 32)})
        self.assertEqual(status, 401)

        keyed = await self.server_span(trace_id=CLIENT_TRACE)
        auth = (await self.trace_with(keyed, "authenticate"))["authenticate"]
        self.assertEqual(auth.attributes.get("clawdbot.auth.kind"), "api_key")
        self.assertEqual(keyed.attributes.get("enduser.id"), "alice")
        await self.receiver.wait_for(lambda spans: first(spans, trace_id="3" * 32, kind="SERVER"))
        await self.receiver.wait_for(lambda spans: len(matching(spans, name=CHAT_SPAN)) == 3 or None)

        canaries = [
            jwt_token, jwt_token.split(".")[2], wrong, wrong.split(".")[2], api_key, api_key[3:], KEY_CANARY,
            COOKIE_CANARY, COLLECTOR_CANARY, SECRET,
        ]
        self.assertTrue(self.receiver.exports)
        for raw in self.receiver.bodies:
            for canary in canaries:
                self.assertNotIn(canary.encode(), raw, canary)
        for export in self.receiver.exports:
            self.assertEqual(export.headers.get("x-collector-key"), COLLECTOR_CANARY)
            self.assertEqual(export.headers.get("content-type"), "application/x-protobuf")
            self.assertNotIn(jwt_token, json.dumps(export.headers))
        # The collector's credential stays out of the access log too.
        self.assertNotIn(COLLECTOR_CANARY, self.access_text())


class TraceIdTests(Traced):
    """The trace id beside the request id: access log, error bodies, X-Trace-Id; sampling."""

    async def test_access_log_and_error_bodies_carry_trace_id(self):
        """Every access-log line has the trace id; error bodies and X-Trace-Id too; failed spans say ERROR with error.type."""
        self.traced()
        headers, _ = await self.chat_ok(headers={"traceparent": traceparent()})
        ok_id = headers.getRawHeaders("x-request-id")[0]

        status, headers, body = await self.chat(auth={}, headers={"traceparent": traceparent("4" * 32)})
        self.assertEqual(status, 401, body)
        self.assertEqual(body["error"]["trace_id"], "4" * 32)
        self.assertEqual(headers.getRawHeaders("x-trace-id"), ["4" * 32])
        denied_id = headers.getRawHeaders("x-request-id")[0]

        self.fake.behave(status_error=500, times=1)
        status, headers, body = await self.chat()
        self.assertGreaterEqual(status, 500, body)
        failed_trace = body["error"]["trace_id"]
        self.assertRegex(failed_trace, HEX32)
        self.assertEqual(headers.getRawHeaders("x-trace-id"), [failed_trace])
        failed_id = headers.getRawHeaders("x-request-id")[0]

        await until(lambda: all(self.log_line(i) for i in (ok_id, denied_id, failed_id)), what="three access-log lines")
        lines = self.access_lines()
        self.assertTrue(all(HEX32.fullmatch(line.get("trace_id") or "") for line in lines), lines)
        self.assertEqual(self.log_line(ok_id)["trace_id"], CLIENT_TRACE)
        self.assertEqual(self.log_line(denied_id)["trace_id"], "4" * 32)
        self.assertEqual(self.log_line(failed_id)["trace_id"], failed_trace)

        denied = await self.server_span(trace_id="4" * 32)
        self.assertEqual(denied.attributes.get("error.type"), "AUTH_MISSING_TOKEN")
        self.assertEqual(denied.attributes.get("http.response.status_code"), 401)
        failed = await self.server_span(trace_id=failed_trace)
        self.assertEqual(failed.status_code, "ERROR")
        self.assertEqual(failed.attributes.get("error.type"), body["error"]["code"])
        backend = (await self.trace_with(failed, f"chat {MODEL}"))[f"chat {MODEL}"]
        self.assertEqual(backend.status_code, "ERROR")
        self.assertTrue(backend.attributes.get("error.type"), backend.attributes)
        # As the HTTP conventions say: a 4xx is the client's, so its server span's status stays unset (error.type says why).
        self.assertEqual(denied.status_code, "UNSET", denied.attributes)

    async def test_sample_rate_zero_is_not_overruled_by_a_client(self):
        """
        At sample_rate 0 nothing is recorded, a client's sampled traceparent
        included (anyone may send one, before any token is checked); the
        client's trace goes on all the same: its id is the request's, and
        Ollama is told it, marked not sampled.
        """
        self.traced("sample_rate: 0")
        headers, _ = await self.chat_ok(headers={"traceparent": traceparent()})
        self.assertEqual(headers.getRawHeaders("x-trace-id"), [CLIENT_TRACE])
        passed = parse_traceparent(self.fake.requests_to("/api/chat")[-1].headers.get("traceparent"))
        self.assertEqual((passed[0], passed[2]), (CLIENT_TRACE, False))
        request_id = headers.getRawHeaders("x-request-id")[0]
        # Anonymous calls with a sampled traceparent: refused, and not recorded either.
        for _ in range(5):
            status, _, _ = await get_json(self.gw.url + CHAT, method="POST", headers={"traceparent": traceparent()}, body={"messages": user()})
            self.assertEqual(status, 401)
        await until(lambda: self.log_line(request_id) is not None, what="the access-log line")
        self.assertEqual(self.log_line(request_id)["trace_id"], CLIENT_TRACE)
        await deferLater(reactor, 20 * tracing.EXPORT_DELAY + 0.3)  # several export turns
        self.assertEqual(self.receiver.spans, [])


class OutageTests(Traced):
    """A collector down, stuck or failing costs spans, never requests; a reload moves export elsewhere."""

    async def counter(self, name):
        return metric(await self.metrics(), name) or 0.0

    async def calls_succeed(self, count):
        for i in range(count):
            _, body = await self.chat_ok()
            self.assertEqual(body["choices"][0]["message"]["content"], DEFAULT_REPLY)
            self.assertEqual(body["usage"]["completion_tokens"], len(tokenize(DEFAULT_REPLY)))

    async def recovered(self):
        """
        After accept(), a new call's spans reach the receiver.  The export
        worker may still be finishing a failed attempt and the queue may be
        full of the spans of the /metrics reads (a small queue drops them),
        so a few calls are made, each with its own trace, until one is in.
        """
        self.receiver.accept()
        for attempt in range(12):
            trace = format(0x6000 + attempt, "032x")
            await self.chat_ok(headers={"traceparent": traceparent(trace)})
            try:
                return await self.server_span(trace_id=trace, timeout=2)
            except AssertionError:
                continue
        self.fail(f"no span reached the collector once it was back; exports {[e.status for e in self.receiver.exports]}")

    async def test_hanging_collector_drops_and_fails_never_the_request(self):
        """A collector that never answers: every call succeeds, spans beyond the queue are dropped and counted, the export fails."""
        self.traced("queue: 4")
        dropped, failed = await self.counter("clawdbot_trace_spans_dropped_total"), await self.counter("clawdbot_trace_exports_failed_total")
        self.receiver.hang()
        await self.calls_succeed(1)
        await self.receiver.when_exports(1)  # the export worker is stuck on this one
        await self.calls_succeed(8)
        status, data = await self.stream()
        self.assertEqual((status, data.count(b"data: [DONE]")), (200, 1))
        # All of that while the export was (and is) still waiting for an answer.
        self.assertTrue(self.receiver.held)
        self.assertGreater(await self.counter("clawdbot_trace_spans_dropped_total"), dropped)
        # The stuck export gives up at the exporter's timeout and is counted.
        await self.until_counter_above("clawdbot_trace_exports_failed_total", failed)
        await self.recovered()

    async def test_refusing_collector(self):
        """A collector that refuses connections: calls succeed, the failed export is counted, export resumes once it is back."""
        self.traced()
        failed = await self.counter("clawdbot_trace_exports_failed_total")
        await self.receiver.refuse()
        await self.calls_succeed(3)
        await self.until_counter_above("clawdbot_trace_exports_failed_total", failed)
        self.assertEqual(self.receiver.spans, [])
        await self.recovered()

    async def test_failing_collector_503(self):
        """A collector answering 503: calls succeed, it was asked, the failed export is counted, export resumes once it is well."""
        self.traced()
        failed = await self.counter("clawdbot_trace_exports_failed_total")
        self.receiver.status(503)
        await self.calls_succeed(3)
        await self.receiver.when_exports(1)
        self.assertEqual({e.status for e in self.receiver.exports}, {503})
        await self.until_counter_above("clawdbot_trace_exports_failed_total", failed)
        await self.recovered()

    async def until_counter_above(self, name, value, timeout=20.0):
        from twisted.internet.task import deferLater

        seen = value
        for _ in range(int(timeout / 0.25)):
            seen = await self.counter(name)
            if seen > value:
                return seen
            await deferLater(reactor, 0.25)
        self.fail(f"{name} stayed at {seen} (was {value}) for {timeout} s")

    async def test_reload_moves_export_to_the_new_endpoint(self):
        """A reload that changes tracing.endpoint (and service_name) sends later spans to the new receiver only."""
        # Started first, so that it stops after the gateway (cleanups run last
        # first): the gateway's last flush finds it there.
        new = started_receiver(self)
        self.traced()
        await self.chat_ok(headers={"traceparent": traceparent("7" * 32)})
        await self.server_span(trace_id="7" * 32)
        old = self.receiver
        with open(self.gw.config_path) as f:
            text = f.read()
        with open(self.gw.config_path, "w") as f:
            f.write(merge_yaml(text, f'tracing: {{endpoint: "{new.endpoint}", service_name: moved}}'))
        self.assertTrue(self.gw.parts.runtime.reload())
        await self.chat_ok(headers={"traceparent": traceparent("8" * 32)})
        moved = await new.wait_for(lambda spans: first(spans, name=CHAT_SPAN, trace_id="8" * 32), 15)
        self.assertEqual(moved.resource.get("service.name"), "moved")
        self.assertEqual(new.exports[-1].headers.get("x-collector-key"), COLLECTOR_CANARY)
        self.assertEqual(old.trace("8" * 32), [])
        self.assertEqual(new.trace("7" * 32), [])


    async def test_reload_keeps_the_spans_of_calls_in_flight(self):
        """A stream running across a reload that changes the collector: its spans are sent (to the new one), not lost with the old queue."""
        new = started_receiver(self)
        self.traced()
        self.fake.behave(hold=2, times=1)
        call = ensureDeferred(self.stream(headers={"traceparent": traceparent("9" * 32)}))
        await until(lambda: self.fake.requests_to("/api/chat"), what="the held call at the backend")
        with open(self.gw.config_path) as f:
            text = f.read()
        with open(self.gw.config_path, "w") as f:
            f.write(merge_yaml(text, f'tracing: {{endpoint: "{new.endpoint}"}}'))
        self.assertTrue(self.gw.parts.runtime.reload())
        self.fake.release()
        status, _ = await call
        self.assertEqual(status, 200)
        server = await new.wait_for(lambda spans: first(spans, name=CHAT_SPAN, trace_id="9" * 32), 15)
        children = {c.name for c in new.children(server)} | {c.name for c in self.receiver.children(server)}
        self.assertIn(f"chat {MODEL}", children)


class NamingTests(Traced):
    """What clients choose cannot shape the spans or the metrics beyond bounds."""

    async def test_unknown_method_and_probes(self):
        """An unknown method's span is named _OTHER; /healthz, /readyz and /metrics make no spans; a 404 body has the trace id."""
        self.traced()
        for method in ("FOO0", "X" * 32):
            status, headers, _ = await get_json(self.gw.url + CHAT, method=method, headers={"traceparent": traceparent("a" * 32)})
            self.assertEqual(status, 501)
        for path in ("/healthz", "/readyz"):
            status, headers, _ = await get_json(self.gw.url + path)
            self.assertIsNone(headers.getRawHeaders("x-trace-id"))
        status, headers, body = await get_json(self.gw.url + "/v1/nothing-here", headers=bearer(token()))
        self.assertEqual(status, 404)
        self.assertEqual(body["error"]["trace_id"], headers.getRawHeaders("x-trace-id")[0])
        await self.receiver.wait_for(lambda spans: len([s for s in spans if s.trace_id == "a" * 32]) >= 2 or None, 10)
        names = {s.name for s in self.receiver.spans}
        self.assertIn("_OTHER", names)
        self.assertFalse([n for n in names if "FOO" in n or "XXXX" in n or "healthz" in n or "readyz" in n], names)

    async def test_big_content_described_by_its_size(self):
        """Captured content over MAX_CONTENT characters is described by its size, not recorded (nor redacted at length)."""
        self.traced("capture_content: true")
        big = "long words " * (tracing.MAX_CONTENT // 5)
        await self.chat_ok(headers={"traceparent": traceparent("b" * 32)}, messages=user(big))
        server = await self.server_span(trace_id="b" * 32)
        self.assertRegex(server.attributes["gen_ai.input.messages"], r"^\[\d+ characters, not recorded\]$")
        self.assertNotIn("long words long words", json.dumps(server.attributes))

    async def test_chosen_trace_ids_do_not_force_sampling(self):
        """At 0.01, trace ids a client picked to pass a plain ratio of the id's bits (low bits zero) are kept no more than others."""
        self.traced("sample_rate: 0.01")
        for i in range(30):
            chosen = format(i + 1, "016x") + "0" * 16
            status, _, _ = await get_json(self.gw.url + CHAT, method="POST", headers={"traceparent": traceparent(chosen, sampled=False)}, body={"messages": user()})
            self.assertEqual(status, 401)
        await deferLater(reactor, 20 * tracing.EXPORT_DELAY + 0.3)
        self.assertLessEqual(len({s.trace_id for s in self.receiver.spans}), 3)

    async def test_client_strings_cut_in_spans(self):
        """A model name or session id of thousands of characters is cut to MAX_CLIENT_TEXT in span names and attributes."""
        self.traced("sample_rate: 1.0")
        status, _, _ = await self.chat(headers={"traceparent": traceparent("c" * 32)}, model="m" * 5000)
        self.assertIn(status, (400, 404))
        status, _, _ = await self.chat(headers={"traceparent": traceparent("d" * 32)}, session_id="s" * 5000)
        self.assertIn(status, (400, 404))
        await self.receiver.wait_for(lambda spans: len({x.trace_id for x in spans if x.kind == "SERVER"} & {"c" * 32, "d" * 32}) == 2 or None, 10)
        for span in self.receiver.spans:
            self.assertLessEqual(len(span.name), 300, span.name[:80])
            for value in span.attributes.values():
                if isinstance(value, str):
                    self.assertLessEqual(len(value), 300, value[:80])

    async def test_official_sdk_with_tracing_on(self):
        """The openai SDK, with its defaults, against a traced gateway: answers as usual, its raw headers carry the trace id, an error's body has it too."""
        self.traced()

        def run():
            with openai.OpenAI(base_url=self.gw.url + "/v1", api_key=token(), max_retries=0) as client:
                raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(), extra_headers={"traceparent": traceparent("e" * 32)})
                parsed = raw.parse()
                try:
                    client.chat.completions.create(model=MODEL, messages=user(), temperature=9)
                except openai.BadRequestError as e:
                    return raw, parsed, e
            return raw, parsed, None

        raw, parsed, error = await deferToThread(run)
        self.assertEqual(parsed.choices[0].message.content, DEFAULT_REPLY)
        self.assertEqual(raw.headers.get("x-trace-id"), "e" * 32)
        self.assertIsNotNone(error)
        body = error.body.get("error", error.body)  # (the SDK keeps the error object, or the whole body)
        self.assertRegex(body["trace_id"], HEX32)
        self.assertEqual(error.response.headers.get("x-trace-id"), body["trace_id"])

    async def test_metric_labels_only_named_models(self):
        """A model spelled otherwise (Ollama answers any case) is counted under 'other', never as a label of its own."""
        self.traced()
        await self.chat_ok(headers={}, model=MODEL.upper())
        await self.chat_ok()
        text = await self.metrics()
        self.assertIsNone(metric(text, "gen_ai_client_token_usage_count", model=MODEL.upper(), token_type="input"), text)
        self.assertEqual(metric(text, "gen_ai_client_token_usage_count", model="other", token_type="input"), 1.0, text)


class GenAIMetricsTests(Backed):
    """The GenAI metrics, beside the others, with tracing off (they are always on)."""

    timeout = 60

    async def test_token_usage_and_time_to_first_token(self):
        """gen_ai_client_token_usage (input, output) and gen_ai_server_time_to_first_token per model after two calls."""
        gw = self.start(f"backend: {{model_limits: {{{MODEL}: {{max_connections: 4}}}}}}")
        auth = bearer(token())
        status, _, body = await get_json(gw.url + CHAT, method="POST", headers=auth, body={"model": MODEL, "messages": user()})
        self.assertEqual(status, 200, body)
        status, data = await stream_call(gw.url + CHAT, {"model": MODEL, "messages": user(), "stream": True}, auth).done
        self.assertEqual(status, 200, data)
        status, _, text = await get_json(gw.url + "/metrics", headers=bearer(token(sub="ops", scope="admin")))
        self.assertEqual(status, 200)
        text = text.decode()
        out = len(tokenize(DEFAULT_REPLY))
        for token_type, each in (("input", prompt_tokens()), ("output", out)):
            self.assertEqual(metric(text, "gen_ai_client_token_usage_count", model=MODEL, token_type=token_type), 2.0, text)
            self.assertEqual(metric(text, "gen_ai_client_token_usage_sum", model=MODEL, token_type=token_type), 2.0 * each, text)
        ttft = metric(text, "gen_ai_server_time_to_first_token_count", model=MODEL)
        self.assertIsNotNone(ttft, text)
        self.assertGreaterEqual(ttft, 1.0)
        self.assertGreater(metric(text, "gen_ai_server_time_to_first_token_sum", model=MODEL), 0.0)
