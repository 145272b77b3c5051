"""
The fake Ollama server (testing/fake_ollama.py): its bytes on the wire, the
official C{ollama} Python client talking to it, the behaviours tests switch
on, and the benchmark's way of running it as a process.
"""

import json
import re
import sys

import ollama
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from testing.fake_ollama import (
    DEFAULT_REPLY,
    DEFAULT_THINKING,
    FakeOllama,
    go_json,
    rfc3339nano,
    tokenize,
    words,
)
from tests.helpers import ROOT, Process, process_env

RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
METRICS = [
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]
CHAT = {"model": "qwen3:32b", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The location"},
                "format": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "format"],
        },
    },
}


# ---------------------------------------------------------------------------
# A raw HTTP/1.1 client, to see the exact bytes
# ---------------------------------------------------------------------------


class RawClient(Protocol):
    """Sends one request and keeps every byte of the answer."""

    def __init__(self, request: bytes):
        self.request = request
        self.data = bytearray()
        self.closed = Deferred()
        self.waits = []

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data
        still = []
        for predicate, d in self.waits:
            if predicate(bytes(self.data)):
                d.callback(bytes(self.data))
            else:
                still.append((predicate, d))
        self.waits = still

    def connectionLost(self, reason):
        self.closed.callback(bytes(self.data))

    def wait_for(self, predicate):
        """A Deferred firing with the bytes so far once C{predicate(bytes)}."""
        d = Deferred()
        if predicate(bytes(self.data)):
            d.callback(bytes(self.data))
        else:
            self.waits.append((predicate, d))
        return d


async def raw_request(fake, method, path, body=None, close=True):
    """Connect to C{fake}, send one request; returns the connected RawClient."""
    payload = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{fake.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if close:
        head.append("Connection: close")
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", fake.port)
    return await connectProtocol(endpoint, RawClient(request))


def split_response(data: bytes):
    """(status line, {lower-cased header: value}, body bytes) of a raw answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, body


def dechunk(body: bytes):
    """(list of chunk payloads, whether the terminating chunk arrived)."""
    chunks = []
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            return chunks, True
        if len(rest) < size + 2:
            break
        chunks.append(rest[:size])
        body = rest[size + 2 :]
    return chunks, False


def lines_in(data: bytes) -> int:
    """How many complete NDJSON lines a raw chunked answer holds so far."""
    return split_response(data)[2].count(b"}\n")


def sleep(seconds):
    """A Deferred that fires after C{seconds} of real time."""
    return deferLater(reactor, seconds, lambda: None)


class FakeCase(TestCase):
    """A FakeOllama listening on loopback for each test."""

    timeout = 30

    def setUp(self):
        self.fake = self.make_fake()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)

    def make_fake(self):
        return FakeOllama()

    def client_call(self, fn):
        """Run C{fn(client)} with a fresh C{ollama.Client} in a thread."""

        def run():
            with ollama.Client(host=self.fake.url, timeout=10) as client:
                return fn(client)

        return deferToThread(run)

    async def client_error(self, fn):
        """The C{ollama.ResponseError} that C{fn(client)} raises."""
        try:
            await self.client_call(fn)
        except ollama.ResponseError as e:
            return e
        self.fail("no ollama.ResponseError raised")


# ---------------------------------------------------------------------------
# The bytes on the wire
# ---------------------------------------------------------------------------


class WireFormatTests(FakeCase):
    async def test_streamed_chat_bytes(self):
        """
        A streamed /api/chat is HTTP/1.1 chunked NDJSON with Ollama's
        content type and no Server header; every chunk is exactly one JSON
        object ending in \\n, fields in Ollama's order, one token each; the
        last has done, done_reason and every count and duration as a
        positive nanosecond integer; the connection ends with the
        terminating chunk.
        """
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT)
        data = await client.closed
        status, headers, body = split_response(data)
        self.assertEqual(status, "HTTP/1.1 200 OK")
        self.assertEqual(headers["content-type"], "application/x-ndjson")
        self.assertEqual(headers["transfer-encoding"], "chunked")
        self.assertNotIn("server", headers)
        self.assertNotIn("content-length", headers)
        chunks, complete = dechunk(body)
        self.assertTrue(complete)
        self.assertEqual(len(chunks), len(tokenize(DEFAULT_REPLY)) + 1)
        objects = []
        for chunk in chunks:
            self.assertTrue(chunk.endswith(b"\n"))
            self.assertEqual(chunk.count(b"\n"), 1)
            obj = json.loads(chunk)
            self.assertEqual(go_json(obj) + b"\n", chunk)  # compact, Go-encoded
            self.assertRegex(obj["created_at"], RFC3339_NANO)
            objects.append(obj)
        for obj in objects[:-1]:
            self.assertEqual(list(obj), ["model", "created_at", "message", "done"])
            self.assertEqual(obj["model"], "qwen3:32b")
            self.assertEqual(list(obj["message"]), ["role", "content"])
            self.assertEqual(obj["message"]["role"], "assistant")
            self.assertIs(obj["done"], False)
        self.assertEqual([o["message"]["content"] for o in objects[:-1]], tokenize(DEFAULT_REPLY))
        final = objects[-1]
        self.assertEqual(list(final), ["model", "created_at", "message", "done_reason", "done"] + METRICS)
        self.assertEqual(final["message"], {"role": "assistant", "content": ""})
        self.assertEqual(final["done_reason"], "stop")
        self.assertIs(final["done"], True)
        for key in METRICS:
            self.assertIsInstance(final[key], int)
            self.assertGreater(final[key], 0)
        self.assertEqual(final["eval_count"], len(tokenize(DEFAULT_REPLY)))
        self.assertGreaterEqual(
            final["total_duration"], final["load_duration"] + final["prompt_eval_duration"] + final["eval_duration"]
        )

    async def test_non_streamed_chat_is_one_json_body(self):
        """
        With "stream": false the answer is one compact JSON body without a
        trailing newline, Content-Type application/json; charset=utf-8 and
        a Content-Length: the final chunk with the whole text in it.
        """
        client = await raw_request(self.fake, "POST", "/api/chat", dict(CHAT, stream=False))
        status, headers, body = split_response(await client.closed)
        self.assertEqual(status, "HTTP/1.1 200 OK")
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(int(headers["content-length"]), len(body))
        self.assertFalse(body.endswith(b"\n"))
        obj = json.loads(body)
        self.assertEqual(go_json(obj), body)
        self.assertEqual(list(obj), ["model", "created_at", "message", "done_reason", "done"] + METRICS)
        self.assertEqual(obj["message"], {"role": "assistant", "content": DEFAULT_REPLY})

    async def test_streamed_generate_bytes(self):
        """
        /api/generate streams {"model","created_at","response","done"}
        lines; the last one has done_reason, the context token list and
        the metrics, in GenerateResponse's field order.
        """
        body = {"model": "qwen3:32b", "prompt": "Why is the sky blue?"}
        client = await raw_request(self.fake, "POST", "/api/generate", body)
        chunks, complete = dechunk(split_response(await client.closed)[2])
        self.assertTrue(complete)
        objects = [json.loads(c) for c in chunks]
        self.assertEqual(list(objects[0]), ["model", "created_at", "response", "done"])
        self.assertEqual("".join(o["response"] for o in objects), DEFAULT_REPLY)
        final = objects[-1]
        self.assertEqual(
            list(final), ["model", "created_at", "response", "done", "done_reason", "context"] + METRICS
        )
        self.assertEqual(final["response"], "")
        self.assertTrue(all(isinstance(t, int) for t in final["context"]))

    async def test_go_string_escaping(self):
        """
        Strings are encoded like Go's encoding/json: <, > and & as \\u003c,
        \\u003e and \\u0026, other non-ASCII text as raw UTF-8.
        """
        self.fake.reply_text = "a <b> & ü"
        client = await raw_request(self.fake, "POST", "/api/chat", dict(CHAT, stream=False))
        body = split_response(await client.closed)[2]
        self.assertIn(b'"content":"a \\u003cb\\u003e \\u0026 \xc3\xbc"', body)
        self.assertEqual(json.loads(body)["message"]["content"], "a <b> & ü")

    async def test_unknown_model_error_bytes(self):
        """An unknown model is a 404 whose body is exactly Ollama's error object."""
        client = await raw_request(self.fake, "POST", "/api/chat", {"model": "nope", "messages": []})
        status, headers, body = split_response(await client.closed)
        self.assertEqual(status, "HTTP/1.1 404 Not Found")
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(body, b"{\"error\":\"model 'nope' not found\"}")

    async def test_bad_requests(self):
        """
        A missing body, a body that is not JSON and a missing model are 400s
        with the messages Ollama (gin) uses.
        """
        cases = [
            (b"", b'{"error":"missing request body"}'),
            (b"{not json", b"{\"error\":\"invalid character 'n' looking for beginning of value\"}"),
            (b'{"model": "qwen3:32b"', b'{"error":"unexpected EOF"}'),
            (b'{"messages": []}', b'{"error":"model is required"}'),
            (
                b'{"model": 5}',
                b'{"error":"json: cannot unmarshal number into Go struct field ChatRequest.model of type string"}',
            ),
        ]
        for raw, expected in cases:
            client = await raw_request(self.fake, "POST", "/api/chat", raw)
            status, _, body = split_response(await client.closed)
            self.assertEqual((status, body), ("HTTP/1.1 400 Bad Request", expected), raw)

    async def test_unknown_route_and_method(self):
        """Unknown paths are gin's plain-text 404, wrong methods its 405."""
        client = await raw_request(self.fake, "GET", "/api/nothing")
        status, headers, body = split_response(await client.closed)
        self.assertEqual((status, body), ("HTTP/1.1 404 Not Found", b"404 page not found"))
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        client = await raw_request(self.fake, "GET", "/api/chat")
        status, _, body = split_response(await client.closed)
        self.assertEqual((status, body), ("HTTP/1.1 405 Method Not Allowed", b"405 method not allowed"))

    async def test_progress_bytes(self):
        """
        /api/pull streams {"status": ...} NDJSON lines; with "stream": false
        it answers the last status alone as application/json (Ollama's
        waitForStream); /api/delete answers 200 with an empty body.
        """
        client = await raw_request(self.fake, "POST", "/api/pull", {"model": "llama3.2"})
        _, headers, body = split_response(await client.closed)
        self.assertEqual(headers["content-type"], "application/x-ndjson")
        chunks, _ = dechunk(body)
        self.assertEqual(chunks[0], b'{"status":"pulling manifest"}\n')
        self.assertEqual(chunks[-1], b'{"status":"success"}\n')
        client = await raw_request(self.fake, "POST", "/api/pull", {"model": "llama3.2", "stream": False})
        _, headers, body = split_response(await client.closed)
        self.assertEqual((headers["content-type"], body), ("application/json", b'{"status":"success"}'))
        client = await raw_request(self.fake, "DELETE", "/api/delete", {"model": "llama3.2"})
        status, headers, body = split_response(await client.closed)
        self.assertEqual((status, headers["content-length"], body), ("HTTP/1.1 200 OK", "0", b""))
        self.assertNotIn("content-type", headers)

    async def test_root_and_version(self):
        """GET / says "Ollama is running"; /api/version is {"version": ...}."""
        client = await raw_request(self.fake, "GET", "/")
        self.assertEqual(split_response(await client.closed)[2], b"Ollama is running")
        self.fake.version = "0.9.9"
        client = await raw_request(self.fake, "GET", "/api/version")
        self.assertEqual(split_response(await client.closed)[2], b'{"version":"0.9.9"}')

    def test_rfc3339nano(self):
        """created_at is Go's RFC3339Nano in UTC: trailing zeros trimmed."""
        self.assertEqual(rfc3339nano(1_700_000_000_123_456_789), "2023-11-14T22:13:20.123456789Z")
        self.assertEqual(rfc3339nano(1_700_000_000_120_000_000), "2023-11-14T22:13:20.12Z")
        self.assertEqual(rfc3339nano(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z")


# ---------------------------------------------------------------------------
# The official client
# ---------------------------------------------------------------------------


class OfficialClientTests(FakeCase):
    async def test_chat(self):
        """ollama.Client.chat without streaming gets the reply and the metrics."""
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"]))
        self.assertEqual(r.message.role, "assistant")
        self.assertEqual(r.message.content, DEFAULT_REPLY)
        self.assertIsNone(r.message.thinking)
        self.assertEqual(r.done_reason, "stop")
        self.assertTrue(r.done)
        self.assertEqual(r.eval_count, len(tokenize(DEFAULT_REPLY)))
        self.assertGreater(r.total_duration, 0)
        self.assertIs(self.fake.requests[-1].body["stream"], False)
        self.assertTrue(self.fake.requests[-1].headers["user-agent"].startswith("ollama-python/"))

    async def test_chat_streamed(self):
        """ollama.Client.chat(stream=True) yields one token per chunk, then the done chunk."""
        self.fake.reply_text = words(12)
        parts = await self.client_call(
            lambda c: list(c.chat(model="qwen3:32b", messages=CHAT["messages"], stream=True))
        )
        self.assertEqual(len(parts), 13)
        self.assertEqual([p.message.content for p in parts[:-1]], tokenize(words(12)))
        self.assertTrue(parts[-1].done)
        self.assertEqual(parts[-1].done_reason, "stop")
        self.assertEqual(parts[-1].eval_count, 12)

    async def test_chat_think(self):
        """
        With think=True a qwen3 model streams thinking chunks
        (message.thinking, empty content) before the answer; without
        streaming both arrive in one message.
        """
        parts = await self.client_call(
            lambda c: list(c.chat(model="qwen3:32b", messages=CHAT["messages"], think=True, stream=True))
        )
        self.assertEqual("".join(p.message.thinking or "" for p in parts), DEFAULT_THINKING)
        self.assertEqual("".join(p.message.content for p in parts), DEFAULT_REPLY)
        first_content = next(i for i, p in enumerate(parts) if p.message.content)
        self.assertTrue(all(p.message.thinking for p in parts[:first_content]))
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"], think=True))
        self.assertEqual((r.message.thinking, r.message.content), (DEFAULT_THINKING, DEFAULT_REPLY))

    async def test_chat_think_unsupported(self):
        """think=True on a model without the thinking capability is Ollama's 400."""
        self.fake.add_model("llama3.2")
        e = await self.client_error(lambda c: c.chat(model="llama3.2", messages=CHAT["messages"], think=True))
        self.assertEqual((e.status_code, e.error), (400, '"llama3.2" does not support thinking'))

    async def test_chat_tools(self):
        """
        A request with tools gets a tool call for the first tool, arguments
        an object made from its schema (keys sorted as Go writes a map);
        once the conversation holds the tool's result the model answers in
        text.  A configured tool call replaces the automatic one.
        """
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=messages, tools=[WEATHER_TOOL]))
        self.assertEqual(r.message.content, "")
        (call,) = r.message.tool_calls
        self.assertEqual(call.function.name, "get_current_weather")
        self.assertEqual(dict(call.function.arguments), {"format": "celsius", "location": "example"})
        self.assertEqual(r.done_reason, "stop")

        parts = await self.client_call(
            lambda c: list(c.chat(model="qwen3:32b", messages=messages, tools=[WEATHER_TOOL], stream=True))
        )
        self.assertEqual(len(parts), 2)
        self.assertEqual(parts[0].message.tool_calls[0].function.name, "get_current_weather")
        self.assertTrue(parts[1].done)

        followup = messages + [
            {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "content": "18 degrees", "tool_name": "get_current_weather"},
        ]
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=followup, tools=[WEATHER_TOOL]))
        self.assertEqual(r.message.content, DEFAULT_REPLY)
        self.assertIsNone(r.message.tool_calls)

        self.fake.tool_calls = [{"name": "lookup", "arguments": {"q": "paris", "n": 3}}]
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=messages, tools=[WEATHER_TOOL]))
        self.assertEqual(r.message.tool_calls[0].function.name, "lookup")
        self.assertEqual(dict(r.message.tool_calls[0].function.arguments), {"n": 3, "q": "paris"})

    async def test_tool_call_bytes(self):
        """On the wire a tool call is {"function":{"name":...,"arguments":{...}}}, keys sorted."""
        client = await raw_request(
            self.fake, "POST", "/api/chat", dict(CHAT, stream=False, tools=[WEATHER_TOOL])
        )
        body = split_response(await client.closed)[2]
        self.assertIn(
            b'"message":{"role":"assistant","content":"","tool_calls":[{"function":'
            b'{"name":"get_current_weather","arguments":{"format":"celsius","location":"example"}}}]}',
            body,
        )

    async def test_num_predict(self):
        """options.num_predict stops after that many tokens with done_reason "length"."""
        parts = await self.client_call(
            lambda c: list(
                c.chat(model="qwen3:32b", messages=CHAT["messages"], options={"num_predict": 3}, stream=True)
            )
        )
        self.assertEqual([p.message.content for p in parts[:-1]], tokenize(DEFAULT_REPLY)[:3])
        self.assertEqual((parts[-1].done_reason, parts[-1].eval_count), ("length", 3))
        r = await self.client_call(
            lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"], options={"num_predict": 100})
        )
        self.assertEqual(r.done_reason, "stop")

    async def test_format(self):
        """
        format="json" or a JSON schema makes the content a JSON string; with
        a schema the object has its properties.
        """
        schema = {
            "type": "object",
            "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"}},
            "required": ["age", "available"],
        }
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"], format=schema))
        self.assertEqual(json.loads(r.message.content), {"age": 1, "available": True})
        r = await self.client_call(lambda c: c.generate(model="qwen3:32b", prompt="json please", format="json"))
        self.assertEqual(json.loads(r.response), {"answer": DEFAULT_REPLY})
        self.fake.json_reply = {"colour": "blue"}
        r = await self.client_call(lambda c: c.generate(model="qwen3:32b", prompt="json please", format="json"))
        self.assertEqual(json.loads(r.response), {"colour": "blue"})

    async def test_generate(self):
        """ollama.Client.generate, streamed and not, gets the reply in response."""
        r = await self.client_call(lambda c: c.generate(model="qwen3:32b", prompt="Why is the sky blue?"))
        self.assertEqual((r.response, r.done_reason, r.done), (DEFAULT_REPLY, "stop", True))
        self.assertTrue(r.context)
        parts = await self.client_call(
            lambda c: list(c.generate(model="qwen3:32b", prompt="Why?", stream=True, think=True))
        )
        self.assertEqual("".join(p.response for p in parts), DEFAULT_REPLY)
        self.assertEqual("".join(p.thinking or "" for p in parts), DEFAULT_THINKING)
        self.assertTrue(parts[-1].done)

    async def test_load_and_unload(self):
        """An empty prompt loads the model (done_reason "load"); keep_alive 0 unloads it."""
        r = await self.client_call(lambda c: c.generate(model="qwen3:32b"))
        self.assertEqual((r.done, r.done_reason, r.response), (True, "load", ""))
        ps = await self.client_call(lambda c: c.ps())
        self.assertEqual([m.model for m in ps.models], ["qwen3:32b"])
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=[], keep_alive=0))
        self.assertEqual(r.done_reason, "unload")
        ps = await self.client_call(lambda c: c.ps())
        self.assertEqual(list(ps.models), [])

    async def test_embed(self):
        """
        /api/embed answers one unit vector per input, the same vectors for
        the same text, for a string or a list, with the durations and
        prompt_eval_count.
        """
        one = await self.client_call(lambda c: c.embed(model="nomic-embed-text", input="hello"))
        self.assertEqual(one.model, "nomic-embed-text")
        self.assertEqual(len(one.embeddings), 1)
        self.assertEqual(len(one.embeddings[0]), 768)
        self.assertAlmostEqual(sum(v * v for v in one.embeddings[0]), 1.0, places=3)
        self.assertGreater(one.total_duration, 0)
        self.assertGreater(one.prompt_eval_count, 0)
        two = await self.client_call(lambda c: c.embed(model="nomic-embed-text", input=["hello", "world"]))
        self.assertEqual(len(two.embeddings), 2)
        self.assertEqual(list(two.embeddings[0]), list(one.embeddings[0]))
        self.assertNotEqual(list(two.embeddings[0]), list(two.embeddings[1]))
        short = await self.client_call(lambda c: c.embed(model="nomic-embed-text", input="hi", dimensions=64))
        self.assertEqual(len(short.embeddings[0]), 64)
        legacy = await self.client_call(lambda c: c.embeddings(model="nomic-embed-text", prompt="hello"))
        self.assertEqual(list(legacy.embedding), list(one.embeddings[0]))

    async def test_embed_bytes_are_go_floats(self):
        """Embedding floats are written as Go writes float32s: plain decimals, no exponent."""
        client = await raw_request(self.fake, "POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"})
        body = split_response(await client.closed)[2]
        self.assertTrue(body.startswith(b'{"model":"nomic-embed-text","embeddings":[['))
        self.assertNotIn(b"e-", body)
        self.assertRegex(body.decode(), r'\]\],"total_duration":\d+,"load_duration":\d+,"prompt_eval_count":\d+\}$')

    async def test_list_and_show(self):
        """/api/tags lists every model with its details; /api/show describes one."""
        listing = await self.client_call(lambda c: c.list())
        self.assertEqual([m.model for m in listing.models], ["qwen3:32b", "nomic-embed-text:latest"])
        qwen = listing.models[0]
        self.assertEqual(qwen.details.family, "qwen3")
        self.assertEqual(qwen.details.parameter_size, "32.8B")
        self.assertEqual(qwen.details.quantization_level, "Q4_K_M")
        self.assertEqual(len(qwen.digest), 64)
        self.assertGreater(qwen.size, 0)
        show = await self.client_call(lambda c: c.show("qwen3:32b"))
        self.assertEqual(show.details.family, "qwen3")
        self.assertEqual(show.capabilities, ["completion", "tools", "thinking"])
        self.assertEqual(show.modelinfo["qwen3.context_length"], 40960)
        self.assertIn("FROM", show.modelfile)

    async def test_tags_bytes(self):
        """A /api/tags entry has Ollama's fields in Ollama's order."""
        response = await treq.get(self.fake.url + "/api/tags", persistent=False)
        entry = json.loads(await response.content())["models"][0]
        self.assertEqual(list(entry), ["name", "model", "modified_at", "size", "digest", "details"])
        self.assertEqual(
            list(entry["details"]),
            ["parent_model", "format", "family", "families", "parameter_size", "quantization_level"],
        )
        self.assertEqual(entry["details"]["families"], ["qwen3"])
        self.assertRegex(entry["modified_at"], RFC3339_NANO)

    async def test_unknown_model(self):
        """Unknown models raise ollama.ResponseError with status 404, as from Ollama."""
        e = await self.client_error(lambda c: c.chat(model="nope:1b", messages=CHAT["messages"]))
        self.assertEqual((e.status_code, e.error), (404, "model 'nope:1b' not found"))
        e = await self.client_error(lambda c: list(c.chat(model="nope", messages=CHAT["messages"], stream=True)))
        self.assertEqual(e.status_code, 404)
        e = await self.client_error(lambda c: c.embed(model="nope", input="x"))
        self.assertEqual((e.status_code, e.error), (404, 'model "nope" not found, try pulling it first'))
        e = await self.client_error(lambda c: c.show("nope"))
        self.assertEqual(e.status_code, 404)

    async def test_embedding_model_cannot_chat(self):
        """Chatting with an embedding-only model is Ollama's 400 "does not support chat"."""
        e = await self.client_error(lambda c: c.chat(model="nomic-embed-text", messages=CHAT["messages"]))
        self.assertEqual((e.status_code, e.error), (400, '"nomic-embed-text" does not support chat'))

    async def test_admin_calls(self):
        """pull, copy, create, push and delete answer as Ollama does and change /api/tags."""
        progress = await self.client_call(lambda c: list(c.pull("llama3.2", stream=True)))
        self.assertEqual(progress[0].status, "pulling manifest")
        self.assertEqual(progress[-1].status, "success")
        self.assertTrue(any(p.total and p.completed == p.total for p in progress))
        done = await self.client_call(lambda c: c.pull("llama3.2"))
        self.assertEqual(done.status, "success")
        self.assertEqual((await self.client_call(lambda c: c.copy("llama3.2", "backup"))).status, "success")
        created = await self.client_call(lambda c: c.create(model="mario", from_="llama3.2", system="Be Mario."))
        self.assertEqual(created.status, "success")
        self.assertEqual((await self.client_call(lambda c: c.push("mario"))).status, "success")
        names = {m.model for m in (await self.client_call(lambda c: c.list())).models}
        self.assertTrue({"llama3.2:latest", "backup:latest", "mario:latest"} <= names)
        self.assertEqual((await self.client_call(lambda c: c.delete("backup"))).status, "success")
        e = await self.client_error(lambda c: c.delete("backup"))
        self.assertEqual((e.status_code, e.error), (404, "model 'backup' not found"))
        e = await self.client_error(lambda c: c.copy("nope", "other"))
        self.assertEqual((e.status_code, e.error), (404, 'model "nope" not found'))

    async def test_reply_hook(self):
        """reply_hook decides the reply per request; None falls back to the default."""
        self.fake.reply_hook = lambda path, body: (
            "echo: " + body["messages"][-1]["content"] if path == "/api/chat" else None
        )
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(r.message.content, "echo: hi")
        r = await self.client_call(lambda c: c.generate(model="qwen3:32b", prompt="hi"))
        self.assertEqual(r.response, DEFAULT_REPLY)


# ---------------------------------------------------------------------------
# Behaviours
# ---------------------------------------------------------------------------


class BehaviourTests(FakeCase):
    def clocked_fake(self, **kwargs):
        """A fake of this test's own whose timers run on a task clock (C{fake.clock}) that only the test advances."""
        fake = FakeOllama(clock=Clock(), **kwargs)
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        return fake

    async def answer_pending(self, fake, arrived):
        """
        The request C{arrived} (a L{FakeOllama.next_request}) fires with,
        one reactor turn later: the fake starts its answer in the turn the
        request arrives, so by then it waits on its clock (one timer).
        """
        record = await arrived
        await sleep(0)
        self.assertEqual(len(fake.clock.getDelayedCalls()), 1)
        return record

    async def test_delay_first_byte(self):
        """
        delay_first_byte holds back the status line and headers themselves:
        nothing is answered before the fake's clock reaches the delay, and
        the answer starts once it does.
        """
        fake = self.clocked_fake()
        fake.behave(delay_first_byte=1.0)
        arrived = fake.next_request("/api/chat")
        client = await raw_request(fake, "POST", "/api/chat", CHAT)
        record = await self.answer_pending(fake, arrived)
        fake.clock.advance(0.5)
        self.assertEqual((record.status, bytes(client.data)), (None, b""))
        fake.clock.advance(0.5)
        self.assertEqual(record.status, 200)
        await client.wait_for(lambda data: data.startswith(b"HTTP/1.1 200 OK\r\n"))
        await client.closed

    async def test_pace(self):
        """
        pace spaces streamed lines: each comes only once the fake's clock
        has moved on by the pace; without streaming the whole reply waits as
        long.  Both report that clock time as eval_duration.
        """
        fake = self.clocked_fake(tokens=5)
        fake.behave(pace=1.0)
        arrived = fake.next_request("/api/chat")
        client = await raw_request(fake, "POST", "/api/chat", CHAT)
        record = await self.answer_pending(fake, arrived)
        self.assertEqual(record.lines_sent, 1)
        for sent in range(1, 6):
            fake.clock.advance(0.5)
            self.assertEqual(record.lines_sent, sent)
            fake.clock.advance(0.5)
            self.assertEqual(record.lines_sent, sent + 1)
        chunks, complete = dechunk(split_response(await client.closed)[2])
        self.assertEqual((len(chunks), complete), (6, True))
        self.assertEqual(json.loads(chunks[-1])["eval_duration"], 5_000_000_000)

        arrived = fake.next_request("/api/chat")
        client = await raw_request(fake, "POST", "/api/chat", dict(CHAT, stream=False))
        record = await self.answer_pending(fake, arrived)
        fake.clock.pump([0.5] * 9)  # in steps: a line's timer starts from the clock time it fires at
        self.assertEqual((record.status, bytes(client.data)), (None, b""))
        fake.clock.advance(0.5)
        self.assertEqual(record.status, 200)
        reply = json.loads(split_response(await client.closed)[2])
        self.assertEqual((reply["message"]["content"], reply["eval_duration"]), (words(5), 5_000_000_000))

    async def test_stall_then_client_disconnects(self):
        """
        stall_after sends that many lines and then nothing; when the client
        closes the connection the fake records it as the connection closes,
        with no timer of its own (its clock never moves): next_disconnect()
        fires, the request's outcome is "client_disconnected", and no
        connection stays open.
        """
        fake = self.clocked_fake()
        fake.behave(stall_after=2)
        disconnected = fake.next_disconnect()
        client = await raw_request(fake, "POST", "/api/chat", CHAT, close=False)
        await client.wait_for(lambda data: lines_in(data) >= 2)
        record = fake.requests[-1]
        self.assertEqual((record.outcome, record.lines_sent, fake.open_connections), ("pending", 2, 1))
        client.transport.loseConnection()
        event = await disconnected
        self.assertEqual((event.path, event.lines_sent, event.request), ("/api/chat", 2, record))
        self.assertTrue(record.closed_by_client)
        self.assertEqual(await record.when_closed(), "client_disconnected")
        await fake.when_connections(0)
        self.assertEqual(fake.disconnects, [event])

    async def test_client_abort_with_official_client(self):
        """An ollama client that stops reading and closes mid-stream (held after three lines of fifty) shows up in disconnects."""
        self.fake.hold(after=3)
        self.fake.reply_text = words(50)
        disconnected = self.fake.next_disconnect()

        def read_three(c):
            stream = c.chat(model="qwen3:32b", messages=CHAT["messages"], stream=True)
            got = [next(stream) for _ in range(3)]
            stream.close()
            return got

        got = await self.client_call(read_three)
        self.assertEqual(len(got), 3)
        event = await disconnected
        self.assertEqual((event.lines_sent, event.request.outcome), (3, "client_disconnected"))

    async def test_fail_mid_stream(self):
        """
        fail_mid_stream sends N lines, then {"error": ...} as a line, then
        ends the chunked body properly; the official client raises
        ResponseError with that message.
        """
        self.fake.behave(fail_mid_stream=3, fail_message="boom")
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT)
        chunks, complete = dechunk(split_response(await client.closed)[2])
        self.assertTrue(complete)
        self.assertEqual(len(chunks), 4)
        self.assertEqual(chunks[-1], b'{"error":"boom"}\n')
        self.assertEqual(self.fake.requests[-1].outcome, "error_line")

        seen = []

        def consume(c):
            for part in c.chat(model="qwen3:32b", messages=CHAT["messages"], stream=True):
                seen.append(part)

        e = await self.client_error(consume)
        self.assertEqual(e.error, "boom")
        self.assertEqual(len(seen), 3)

    async def test_fail_before_first_line(self):
        """
        A failure before any line is a 500 with {"error": ...} and
        Content-Type application/json, as Ollama's streamResponse does;
        without streaming it is a 500 too.
        """
        self.fake.behave(fail_mid_stream=0)
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT)
        status, headers, body = split_response(await client.closed)
        self.assertEqual(status, "HTTP/1.1 500 Internal Server Error")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["error"], "an error was encountered while running the model: unexpected EOF")
        e = await self.client_error(lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"]))
        self.assertEqual(e.status_code, 500)

    async def test_close_early(self):
        """
        close_early sends N lines (they do arrive) and then drops the TCP
        connection: no terminating chunk.  The official client fails; the
        record says "server_aborted".
        """
        self.fake.behave(close_early=3)
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT)
        chunks, complete = dechunk(split_response(await client.closed)[2])
        self.assertFalse(complete)
        self.assertEqual(len(chunks), 3)
        self.assertEqual(await self.fake.requests[-1].when_closed(), "server_aborted")
        self.assertEqual(self.fake.disconnects, [])

        def consume(c):
            return list(c.chat(model="qwen3:32b", messages=CHAT["messages"], stream=True))

        try:
            await self.client_call(consume)
        except Exception as e:  # httpx's RemoteProtocolError: incomplete chunked read
            self.assertNotIsInstance(e, ollama.ResponseError)
        else:
            self.fail("a stream cut short did not fail")

    async def test_status_error(self):
        """status_error answers that status with {"error": ...}; the client raises ResponseError."""
        self.fake.behave(status_error=503)
        e = await self.client_error(lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"]))
        self.assertEqual(e.status_code, 503)
        self.assertEqual(e.error, "server busy, please try again.  maximum pending requests exceeded")
        self.fake.behave(status_error=500, error_message="out of memory")
        e = await self.client_error(lambda c: list(c.generate(model="qwen3:32b", prompt="x", stream=True)))
        self.assertEqual((e.status_code, e.error), (500, "out of memory"))

    async def test_times_and_paths(self):
        """
        behave(times=n) applies to the next n matching requests only; a
        behaviour applies to the inference endpoints unless paths says
        otherwise.
        """
        self.fake.behave(status_error=500, times=1)

        def list_then_chat(c):
            c.list()  # /api/tags is not an inference path: the one-shot is still there
            return c.chat(model="qwen3:32b", messages=CHAT["messages"])

        e = await self.client_error(list_then_chat)
        self.assertEqual(e.status_code, 500)
        r = await self.client_call(lambda c: c.chat(model="qwen3:32b", messages=CHAT["messages"]))
        self.assertEqual(r.message.content, DEFAULT_REPLY)
        self.fake.behave(status_error=502, paths=["/api/version"])
        response = await treq.get(self.fake.url + "/api/version", persistent=False)
        self.assertEqual(response.code, 502)
        await response.content()
        self.fake.behave()
        response = await treq.get(self.fake.url + "/api/version", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_stalled_non_streaming_reply(self):
        """
        A stalled non-streaming reply sends nothing at all, not even
        headers; L{FakeOllama.stop} ends it ("server_stopped").
        """
        self.fake.behave(stall_after=0, paths="*")
        arrived = self.fake.next_request("/api/version")
        client = await raw_request(self.fake, "GET", "/api/version")
        record = await arrived
        await sleep(0.1)
        self.assertEqual(bytes(client.data), b"")
        await self.fake.stop()
        self.assertEqual(await record.when_closed(), "server_stopped")
        await client.closed

    async def test_disconnect_before_first_byte(self):
        """
        A client that gives up while delay_first_byte holds the answer back
        is recorded as a disconnect with no lines sent, and the pending
        timer is cancelled.
        """
        fake = self.clocked_fake()
        fake.behave(delay_first_byte=30)
        arrived = fake.next_request("/api/chat")
        disconnected = fake.next_disconnect()
        client = await raw_request(fake, "POST", "/api/chat", CHAT, close=False)
        record = await self.answer_pending(fake, arrived)
        client.transport.loseConnection()
        event = await disconnected
        self.assertEqual((event.request, event.lines_sent, record.status), (record, 0, None))
        self.assertEqual((fake.clock.getDelayedCalls(), fake._exchanges), ([], set()))

    async def test_hold_until_released(self):
        """
        hold() keeps answers back, status line included, until release()
        lets them go, oldest first; when_requests(n) fires with the first n
        requests once they have arrived.
        """
        self.fake.reply_text = words(4)
        self.fake.hold(times=2)
        clients = [await raw_request(self.fake, "POST", "/api/chat", CHAT) for _ in range(2)]
        records = await self.fake.when_requests(2, "/api/chat")
        self.assertEqual(self.fake.held, records)
        self.assertEqual([(r.held, r.status, r.lines_sent) for r in records], [(True, None, 0)] * 2)
        self.assertEqual(self.fake.release(1), records[:1])
        chunks, complete = dechunk(split_response(await clients[0].closed)[2])
        self.assertEqual((len(chunks), complete), (5, True))
        self.assertEqual((self.fake.held, records[1].status), ([records[1]], None))
        self.assertEqual(self.fake.release(), records[1:])
        chunks, complete = dechunk(split_response(await clients[1].closed)[2])
        self.assertEqual((len(chunks), complete, self.fake.held), (5, True, []))
        self.assertEqual((await self.client_call(lambda c: c.chat(**CHAT))).message.content, words(4))

    async def test_hold_after_lines(self):
        """hold(after=n) sends n lines, then waits for release() to send the rest."""
        self.fake.reply_text = words(4)
        self.fake.hold(after=2)
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT)
        await client.wait_for(lambda data: lines_in(data) >= 2)
        record = self.fake.requests[-1]
        self.assertEqual((record.held, record.lines_sent, self.fake.held), (True, 2, [record]))
        self.fake.release()
        chunks, complete = dechunk(split_response(await client.closed)[2])
        self.assertEqual((len(chunks), complete, record.outcome), (5, True, "completed"))

    async def test_release_from_a_waiter_and_client_leaving_while_held(self):
        """
        A release() run as soon as a request is announced (before its answer
        has started) lets it go; a held request whose client leaves is a
        disconnect, and release() passes it over.
        """
        arrived = self.fake.next_request("/api/chat")
        arrived.addCallback(lambda record: self.fake.release())
        self.fake.hold(times=1)
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT)
        self.assertTrue(dechunk(split_response(await client.closed)[2])[1])

        self.fake.hold(times=1)
        disconnected = self.fake.next_disconnect()
        client = await raw_request(self.fake, "POST", "/api/chat", CHAT, close=False)
        (record,) = (await self.fake.when_requests(2, "/api/chat"))[1:]
        client.transport.loseConnection()
        event = await disconnected
        self.assertEqual((event.request, event.lines_sent, record.held), (record, 0, False))
        self.assertEqual((self.fake.held, self.fake.release()), ([], []))

    async def test_recording(self):
        """Every request is recorded with method, path, headers and parsed body."""
        response = await treq.post(
            self.fake.url + "/api/chat?x=1",
            json.dumps(dict(CHAT, stream=False)).encode(),
            headers={"Content-Type": "application/json", "X-Trace": "abc"},
            persistent=False,
        )
        await response.content()
        record = self.fake.requests[-1]
        self.assertEqual((record.method, record.path, record.query), ("POST", "/api/chat", "x=1"))
        self.assertEqual(record.headers["x-trace"], "abc")
        self.assertEqual(record.body["model"], "qwen3:32b")
        self.assertEqual((record.status, record.outcome), (200, "completed"))
        self.assertEqual(self.fake.requests_to("/api/chat"), [record])
        self.assertGreaterEqual(self.fake.connections_opened, 1)


class InjectedClockTests(TestCase):
    """The fake's timers and durations follow the clock it is given."""

    async def test_pace_on_a_task_clock(self):
        """
        With clock=task.Clock() lines are paced in that clock's time: the
        next line only comes when the test advances it, and eval_duration
        is exactly the clock time the stream took; wall_ns fixes
        created_at.
        """
        clock = Clock()
        fake = FakeOllama(clock=clock, wall_ns=lambda: 1_700_000_000_123_456_789, tokens=3)
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        fake.behave(pace=1.0)
        client = await raw_request(fake, "POST", "/api/chat", CHAT)
        await client.wait_for(lambda data: lines_in(data) == 1)
        await sleep(0.05)
        self.assertEqual(lines_in(bytes(client.data)), 1)
        for expected in (2, 3, 4):
            clock.advance(1.0)
            await client.wait_for(lambda data, n=expected: lines_in(data) == n)
        chunks, complete = dechunk(split_response(await client.closed)[2])
        self.assertTrue(complete)
        final = json.loads(chunks[-1])
        self.assertEqual(final["created_at"], "2023-11-14T22:13:20.123456789Z")
        self.assertEqual(final["eval_duration"], 3_000_000_000)
        self.assertEqual(final["eval_count"], 3)

    async def test_lockstep_pace(self):
        """
        With lockstep, streams that started at different times get their
        next lines together, on the multiples of the pace (the next one at
        least half a pace after the last): one started at 0.3 s gets its
        second line at 1.0 s, one started at 0.7 s at 2.0 s, with the first
        one's third.
        """
        clock = Clock()
        fake = FakeOllama(clock=clock, tokens=3)
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        fake.behave(pace=1.0, lockstep=True)
        clock.advance(0.3)
        early = await raw_request(fake, "POST", "/api/chat", CHAT)
        await early.wait_for(lambda data: lines_in(data) == 1)
        clock.advance(0.4)
        late = await raw_request(fake, "POST", "/api/chat", CHAT)
        await late.wait_for(lambda data: lines_in(data) == 1)
        clock.advance(0.3)  # 1.0
        await early.wait_for(lambda data: lines_in(data) == 2)
        await sleep(0.05)
        self.assertEqual(lines_in(bytes(late.data)), 1)
        clock.advance(0.9)  # 1.9
        await sleep(0.05)
        self.assertEqual((lines_in(bytes(early.data)), lines_in(bytes(late.data))), (2, 1))
        clock.advance(0.1)  # 2.0
        await early.wait_for(lambda data: lines_in(data) == 3)
        await late.wait_for(lambda data: lines_in(data) == 2)


# ---------------------------------------------------------------------------
# As a separate process (how the benchmark runs it)
# ---------------------------------------------------------------------------


class ProcessTests(TestCase):
    timeout = 60

    async def test_runs_as_a_process(self):
        """
        python -m testing.fake_ollama --port 0 --pace-ms 5 --tokens 8 prints
        "Fake Ollama listening on URL" and streams 8 paced tokens.
        """
        proc = Process(
            [sys.executable, "-m", "testing.fake_ollama", "--port", "0", "--pace-ms", "5", "--tokens", "8"],
            env=process_env(),
            cwd=ROOT,
        )
        self.addCleanup(proc.stop)
        proc.wait_for("Fake Ollama listening on http://127.0.0.1:")
        url = proc.url("Fake Ollama")
        response = await treq.get(url + "/api/version", persistent=False)
        self.assertEqual(json.loads(await response.content()), {"version": "0.12.6"})
        response = await treq.post(url + "/api/chat", json.dumps(CHAT).encode(), persistent=False)
        lines = (await response.content()).splitlines()
        self.assertEqual(len(lines), 9)
        self.assertEqual("".join(json.loads(l)["message"]["content"] for l in lines), words(8))
