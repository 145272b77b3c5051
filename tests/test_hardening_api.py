"""
Regression tests for the security review's findings on the model routes
(issue 13): the native pass-through keeps the gateway's rules (#5), streamed
replies are charged to the token budget however they end (#6), read-only
routes that ask Ollama spend the request budget (#8), and wrong JSON types
are a 400, never a 500 (#14).
"""

import base64
import io
import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from clawdbot.auth.identity import owner_key
from clawdbot.backend.options import go_duration, keep_alive_seconds
from testing.fake_ollama import FakeOllama
from tests import helpers
from tests.helpers import bearer, get_json, token, until

HI = [{"role": "user", "content": "hi"}]
WRITE = "chat:read chat:write"
ADMIN = "chat:read chat:write admin"


def png(size=(8, 8)):
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


SVG = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>').decode()


class Backed(helpers.Backed):
    timeout = 60

    async def native(self, name, body, scope=WRITE, sub="alice"):
        return await get_json(self.gw.url + "/ollama/api/" + name, method="POST", headers=bearer(token(sub=sub, scope=scope)), body=body)

    async def stream_then_leave(self, path, body, marker, count):
        """Post C{body} to C{path}, read until C{marker} was seen C{count} times, then close; wait until Ollama saw it."""
        host, port = self.gw.url.split("//")[1].split(":")
        raw = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token(scope=WRITE)}\r\nContent-Length: {len(raw)}\r\n\r\n"
        ).encode()

        class Quitter(Protocol):
            def __init__(self):
                self.data = b""
                self.enough = Deferred()

            def dataReceived(self, data):
                self.data += data
                if self.data.count(marker) >= count and not self.enough.called:
                    self.enough.callback(None)

        quitter = Quitter()
        await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), quitter)
        quitter.transport.write(head + raw)
        await quitter.enough
        gone = self.fake.next_disconnect()
        quitter.transport.loseConnection()
        await gone

    async def burst(self, calls, path="/api/chat"):
        """
        Make C{calls} (coroutines) at the same moment while Ollama holds
        every answer back; once each call is either answered by the gateway
        or waiting at Ollama, let Ollama answer.  Their results, in order.
        """
        self.fake.hold()
        before = len(self.fake.requests_to(path))
        running = [ensureDeferred(call) for call in calls]

        def settled():
            return sum(d.called for d in running) + len(self.fake.requests_to(path)) - before == len(running)

        await helpers.until(settled, what="every call answered or at Ollama")
        self.fake.behave()
        self.fake.release()
        return await gatherResults(running)

    async def chat(self, scope=WRITE, sub="alice", **body):
        payload = {"messages": HI}
        payload.update(body)
        return await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=bearer(token(sub=sub, scope=scope)), body=payload)


class NativeRulesTests(Backed):
    """#5: /ollama/api/* applies the gateway's rules, not Ollama's defaults."""

    async def test_unknown_fields_are_refused_by_name(self):
        """A field Ollama's endpoint does not document is a 400 naming it, and nothing reaches Ollama."""
        self.start()
        for name, body, field in (
            ("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "surprise": 1}, "surprise"),
            ("generate", {"model": "qwen3:32b", "prompt": "x", "stream": False, "messages": HI}, "messages"),
            ("embed", {"model": "nomic-embed-text", "input": "x", "prompt": "x"}, "prompt"),
            ("chat", {"model": "qwen3:32b", "messages": [{"role": "user", "content": "x", "extra": 1}], "stream": False}, "extra"),
        ):
            status, _, reply = await self.native(name, body)
            self.assertEqual(status, 400, (name, body))
            self.assertTrue(reply["error"].startswith("Invalid request"), reply)
            self.assertIn(field, reply["error"])
        self.assertEqual([r.path for r in self.fake.requests if r.path != "/api/version"], [])

    async def test_model_residency_needs_admin_or_stays_in_bounds(self):
        """keep_alive 0 (unload) and negative (pin) need admin; above backend.keep_alive is a 400 with the bound; within it is sent as seconds."""
        self.start("backend: {keep_alive: 10m}")
        for value in (0, -1, "0", "-1m", 0.0, "-0.5h", 0.5, "900ms"):
            status, _, reply = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "keep_alive": value})
            self.assertEqual((status, reply["error"].split(":")[0]), (403, "Insufficient scope"), value)
        for value in (3600, "2h", "11m", "601s"):
            status, _, reply = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "keep_alive": value})
            self.assertEqual(status, 400, value)
            self.assertIn("10m", reply["error"])
        for value in ("5 minutes", "5", "-1", [], {"s": 1}, True, "1e3s"):
            status, _, reply = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "keep_alive": value})
            self.assertEqual(status, 400, value)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        status, _, _ = await self.native("generate", {"model": "qwen3:32b", "prompt": "x", "stream": False, "keep_alive": "5m"})
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests_to("/api/generate")[-1].body["keep_alive"], 300.0)
        status, _, _ = await self.native("chat", {"model": "qwen3:32b", "messages": [], "keep_alive": 0}, scope=ADMIN)
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["keep_alive"], 0.0)

    async def test_resource_options_are_bounded_or_admin_only(self):
        """options.num_ctx above backend.max_num_ctx is a 400 naming the bound; load-time options need admin; unknown options are a 400."""
        self.start("backend: {max_num_ctx: 8192}")
        status, _, reply = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "options": {"num_ctx": 1048576}})
        self.assertEqual(status, 400)
        self.assertIn("8192", reply["error"])
        for option in ({"num_gpu": 99}, {"num_thread": 64}, {"use_mlock": True}, {"num_batch": 4096}, {"main_gpu": 1}):
            status, _, reply = await self.native("generate", {"model": "qwen3:32b", "prompt": "x", "stream": False, "options": option})
            self.assertEqual((status, reply["error"].split(":")[0]), (403, "Insufficient scope"), option)
        for option in ({"bogus": 1}, {"temperature": "hot"}, {"num_ctx": 2.5}, {"stop": "x"}, {"seed": 2**70}):
            status, _, reply = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "options": option})
            self.assertEqual(status, 400, option)
        self.assertEqual(self.fake.requests_to("/api/chat") + self.fake.requests_to("/api/generate"), [])
        status, _, _ = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "options": {"num_ctx": 8192, "temperature": 0.2}})
        self.assertEqual(status, 200)
        status, _, _ = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False, "options": {"num_ctx": 65536, "num_gpu": 10}}, scope=ADMIN)
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["options"], {"num_ctx": 65536, "num_gpu": 10})

    async def test_raw_and_template_need_admin(self):
        """/api/generate's raw and template replace the model's prompt template: admin only."""
        self.start()
        for extra in ({"raw": True}, {"template": "{{ .Prompt }}"}):
            status, _, reply = await self.native("generate", dict({"model": "qwen3:32b", "prompt": "x", "stream": False}, **extra))
            self.assertEqual((status, reply["error"].split(":")[0]), (403, "Insufficient scope"), extra)
        status, _, _ = await self.native("generate", {"model": "qwen3:32b", "prompt": "x", "stream": False, "raw": False})
        self.assertEqual(status, 200)
        status, _, _ = await self.native("generate", {"model": "qwen3:32b", "prompt": "x", "stream": False, "raw": True}, scope=ADMIN)
        self.assertEqual(status, 200)

    async def test_audit_fields_are_the_gateways(self):
        """Client-sent user_id and session_id never reach Ollama as sent: user_id is the caller, session_id is dropped."""
        self.start()
        for name, body in (
            ("chat", {"model": "qwen3:32b", "messages": HI, "stream": False}),
            ("generate", {"model": "qwen3:32b", "prompt": "x", "stream": False}),
            ("embed", {"model": "nomic-embed-text", "input": "x"}),
        ):
            status, _, _ = await self.native(name, dict(body, user_id="mallory", session_id="sess_forged"))
            self.assertEqual(status, 200, name)
            sent = self.fake.requests_to("/api/" + name)[-1].body
            self.assertNotEqual(sent["user_id"], "mallory")
            self.assertIn("alice", sent["user_id"])
            self.assertNotIn("session_id", sent)

    async def test_model_must_be_an_allowed_string(self):
        """A non-string model is a 400; a model outside backend.models is a 404 on every native route, show included."""
        self.start('backend: {models: ["qwen3:32b"]}')
        for model in ([1], {"a": 1}, 5, True):
            status, _, reply = await self.native("chat", {"model": model, "messages": HI, "stream": False})
            self.assertEqual(status, 400, model)
        for name, body in (
            ("chat", {"model": "llama3.2", "messages": HI, "stream": False}),
            ("generate", {"model": "llama3.2", "prompt": "x", "stream": False}),
            ("embed", {"model": "nomic-embed-text", "input": "x"}),
            ("show", {"model": "nomic-embed-text"}),
            ("show", {"name": "nomic-embed-text"}),
        ):
            status, _, reply = await self.native(name, body)
            self.assertEqual((status, reply["error"].split(":")[0]), (404, "Model not found"), (name, body))
        self.assertEqual([r.path for r in self.fake.requests if r.path != "/api/version"], [])

    async def test_tags_follow_the_allow_list(self):
        """/ollama/api/tags lists only what /v1/models lists."""
        self.start('backend: {models: ["qwen3:32b"]}')
        status, _, tags = await get_json(self.gw.url + "/ollama/api/tags", headers=bearer(token(scope=WRITE)))
        self.assertEqual(status, 200)
        self.assertEqual([m["name"] for m in tags["models"]], ["qwen3:32b"])
        status, _, models = await get_json(self.gw.url + "/v1/models", headers=bearer(token(scope=WRITE)))
        self.assertEqual([m["id"] for m in models["data"]], ["qwen3:32b"])

    async def test_images_go_through_the_image_pipeline(self):
        """Native images are validated and re-encoded like the OpenAI route's: an SVG is refused, a PNG reaches Ollama re-encoded."""
        self.start()
        for name, body in (
            ("chat", {"model": "qwen3:32b", "messages": [{"role": "user", "content": "x", "images": [SVG]}], "stream": False}),
            ("generate", {"model": "qwen3:32b", "prompt": "x", "images": [SVG], "stream": False}),
            ("generate", {"model": "qwen3:32b", "prompt": "x", "images": ["not base64!"], "stream": False}),
            ("generate", {"model": "qwen3:32b", "prompt": "x", "images": "abc", "stream": False}),
        ):
            status, _, reply = await self.native(name, body)
            self.assertEqual((status, reply["error"].split(":")[0]), (400, "Invalid request"), name)
        self.assertEqual(self.fake.requests_to("/api/chat") + self.fake.requests_to("/api/generate"), [])
        original = png()
        status, _, _ = await self.native("chat", {"model": "qwen3:32b", "messages": [{"role": "user", "content": "x", "images": [original]}], "stream": False})
        self.assertEqual(status, 200)
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"][0]["images"]
        self.assertEqual(len(sent), 1)
        self.assertNotEqual(sent[0], original)
        self.assertEqual(base64.b64decode(sent[0])[:2], b"\xff\xd8")  # re-encoded as JPEG (images.format)


class StreamChargeTests(Backed):
    """#6: every stream is charged to the token budget."""

    async def test_streamed_completions_are_charged(self):
        """Streamed chat completions read to [DONE], with and without include_usage, spend the token budget."""
        for options in ({}, {"stream_options": {"include_usage": True}}):
            self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 20}", fake=FakeOllama(tokens=30))
            status, _, raw = await self.chat(stream=True, **options)
            self.assertEqual(status, 200)
            self.assertIn(b"data: [DONE]", raw)
            status, _, body = await self.chat(stream=True, **options)
            self.assertEqual((status, body["error"]["code"]), (429, "RATE_LIMITED"), options)
            self.assertGreater(self.access_lines()[0]["tokens"], 20)
            self.assertEqual((await self.chat(sub="bob", stream=True))[0], 200)

    async def test_client_that_leaves_is_charged_for_what_was_streamed(self):
        """A client that closes the stream before its final line is still charged (an estimate of what was streamed)."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 10}", fake=FakeOllama(tokens=40))
        self.fake.behave(stall_after=20)
        await self.stream_then_leave("/v1/chat/completions", {"messages": HI, "stream": True}, b"data: ", 20)
        self.fake.behave()
        status, _, reply = await self.chat(stream=True)
        self.assertEqual((status, reply["error"]["code"]), (429, "RATE_LIMITED"))
        line = self.access_lines()[0]
        self.assertTrue(line.get("client_gone"))
        self.assertGreaterEqual(line["tokens"], 20)

    async def test_native_stream_left_early_is_charged(self):
        """The native streamed chat is charged too when its client leaves before the final line."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 10}", fake=FakeOllama(tokens=40))
        self.fake.behave(stall_after=15)
        await self.stream_then_leave("/ollama/api/chat", {"model": "qwen3:32b", "messages": HI}, b'"done":false', 15)
        self.fake.behave()
        status, _, _ = await self.native("chat", {"model": "qwen3:32b", "messages": HI, "stream": False})
        self.assertEqual(status, 429)


class ReadBudgetTests(Backed):
    """#8: read-only routes that ask Ollama spend the caller's request budget."""

    async def test_models_show_and_tags_spend_the_request_budget(self):
        """/v1/models, /ollama/api/tags and /ollama/api/show each take one request from the budget; past it, Ollama is not asked."""
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("GET", "/ollama/api/tags", None),
            ("POST", "/ollama/api/show", {"model": "qwen3:32b"}),
            ("GET", "/ollama/api/version", None),
        ):
            self.start("rate_limit: {requests_per_minute: 2}")
            # (The start-up check asks /api/version on its own: counted before.)
            await until(lambda: any("Ollama at" in line for line in self.gw.said), what="the start-up check")
            before = len(self.fake.requests)
            statuses, asked = [], []
            for _ in range(4):
                status, _, _ = await get_json(self.gw.url + path, method=method, headers=bearer(token(scope=WRITE)), body=body)
                statuses.append(status)
                asked.append(len(self.fake.requests))
            self.assertEqual(statuses, [200, 200, 429, 429], path)
            # Two answered calls reached Ollama (the model list also looks
            # at each model's capabilities); the refused ones asked nothing.
            upstream = {"/v1/models": "/api/tags"}.get(path, path.removeprefix("/ollama"))
            self.assertEqual(len([r for r in self.fake.requests[before:] if r.path == upstream]), 2, path)
            self.assertEqual(asked[3], asked[1], path)


class TypeTests(Backed):
    """#14: a value of the wrong JSON type is a 400 naming it, never a 500."""

    async def test_lists_where_strings_belong(self):
        """Lists, objects and huge numbers in scalar fields are refused with 400 and nothing reaches Ollama."""
        self.start()
        cases = [
            {"reasoning_effort": [1]},
            {"reasoning_effort": {"a": 1}},
            {"messages": [{"role": ["user"], "content": "x"}]},
            {"messages": [{"role": {"a": 1}, "content": "x"}]},
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": ["a"], "content": "x"},
                ]
            },
            {"max_tokens": 10**30},
            {"seed": -(10**40)},
            {"tools": [{"type": "function", "function": {"name": "f", "description": ["x"]}}]},
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            {"stream_options": {"include_usage": [1]}},
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": NaN}'}}]},
                ]
            },
        ]
        for extra in cases:
            status, _, reply = await self.chat(**extra)
            self.assertEqual(status, 400, extra)
            self.assertEqual(reply["error"]["code"], "INVALID_REQUEST")
        self.assertEqual(self.fake.requests_to("/api/chat"), [])


class DurationTests(SynchronousTestCase):
    def test_go_durations(self):
        """keep_alive strings are read as Go's time.ParseDuration reads them; anything else is refused."""
        self.assertEqual(go_duration("5m"), 300)
        self.assertEqual(go_duration("1h30m"), 5400)
        self.assertEqual(go_duration("-1s"), -1)
        self.assertEqual(go_duration("0"), 0)
        self.assertAlmostEqual(go_duration("1.5h"), 5400)
        self.assertAlmostEqual(go_duration("300ms"), 0.3)
        for bad in ("", "5", "-", "m", "5 m", "5mm", "1e3s", "h5", "5m-1s", "+"):
            self.assertIsNone(go_duration(bad), bad)
        self.assertEqual(keep_alive_seconds(30), 30.0)
        self.assertEqual(keep_alive_seconds(-1), -1.0)


class ReservationTests(Backed):
    """Second review: budgets and quotas hold for calls made at the same moment, and for clients that leave early."""

    async def test_client_leaving_before_the_first_byte_is_charged_the_prompt(self):
        """A call that reached Ollama is charged its prompt even when the client leaves before any reply byte."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 30}")
        self.fake.hold()
        prompt = [{"role": "user", "content": "word " * 400}]
        d = ensureDeferred(self.chat(messages=prompt, stream=True))
        await self.fake.next_request("/api/chat")
        gone = self.fake.next_disconnect()
        d.cancel()
        await gone
        self.failureResultOf(d)
        self.fake.behave()
        status, _, reply = await self.chat()
        self.assertEqual((status, reply["error"]["code"]), (429, "RATE_LIMITED"))
        line = self.access_lines()[0]
        self.assertTrue(line.get("client_gone"))
        self.assertGreaterEqual(line["tokens"], 400)

    async def test_client_leaving_while_queued_is_not_charged(self):
        """A call that never reached Ollama (its client left while it waited for a slot) costs nothing: its reservation is given back."""
        self.start("max_connections: 1\nrate_limit: {requests_per_minute: 0, tokens_per_minute: 200}")
        self.fake.hold()
        first = ensureDeferred(self.chat(sub="bob"))
        await self.fake.next_request("/api/chat")
        waiting = helpers.when_queued(self, self.gw.parts)
        queued = ensureDeferred(self.chat(messages=[{"role": "user", "content": "word " * 150}]))
        await waiting
        done = helpers.when_done(self, self.gw.parts, 2)
        queued.cancel()
        self.failureResultOf(queued)
        first.cancel()
        self.failureResultOf(first)
        self.fake.behave()
        await done
        mine = [line for line in self.access_lines() if line["user"] == "alice"]
        self.assertEqual(mine[0]["tokens"], None)
        status, _, _ = await self.chat(messages=[{"role": "user", "content": "word " * 150}])
        self.assertEqual(status, 200)

    async def test_parallel_calls_cannot_all_pass_the_token_budget(self):
        """Calls made at the same moment each reserve their prompt first, so once the budget is spent the others are refused."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 30}")
        prompt = [{"role": "user", "content": "word " * 80}]
        results = await self.burst([self.chat(messages=prompt) for _ in range(6)])
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200, 429, 429, 429, 429, 429])
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)

    async def test_reservation_is_settled_to_the_real_count(self):
        """An overestimated reservation is given back once Ollama reports the real count."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 1000}", fake=FakeOllama(tokens=5))
        prompt = [{"role": "user", "content": "word " * 600}]
        status, _, reply = await self.chat(messages=prompt)
        self.assertEqual(status, 200)
        real = reply["usage"]["total_tokens"]
        self.assertLess(real, 750)
        left = await self.gw.parts.accounting.limiter.peek(owner_key(helpers.ISSUER, "alice"), 1000, "tokens")
        self.assertGreaterEqual(left.remaining, 1000 - real - 1)

    async def test_parallel_turns_cannot_all_pass_the_history_quota(self):
        """Turns on different sessions at the same moment count each other's bytes (and reply allowances), so the stored-history quota holds."""
        self.start("history: {max_bytes_per_user: 2KB, max_bytes_per_request: 1KB}")
        auth = bearer(token(scope=WRITE))
        sids = []
        for i in range(6):
            status, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=auth, body={"title": f"s{i}"})
            sids.append(session["id"])
        turn = [{"role": "user", "content": "x" * 900}]
        results = await self.burst([self.chat(messages=turn, session_id=sid) for sid in sids])
        statuses = sorted(status for status, _, _ in results)
        # Each turn in flight holds its bytes and an allowance for its reply,
        # so with room for two turns' messages but not their replies, one passes.
        self.assertEqual(statuses, [200, 429, 429, 429, 429, 429])
        self.assertEqual({body["error"]["code"] for status, _, body in results if status == 429}, {"QUOTA_EXCEEDED"})

    async def test_lone_surrogate_in_a_claim_is_401(self):
        """A signed token whose claims hold a lone UTF-16 surrogate is malformed: 401 everywhere, never a 500."""
        self.start()
        for claims in ({"sub": "\ud800"}, {"sub": "alice", "name": "a\udfff"}, {"sub": "alice", "teams": ["\udbff"]}):
            tok = token(scope=WRITE, **({"sub": claims.pop("sub")} | claims))
            for method, path, body in (("POST", "/v1/sessions", {"title": "t"}), ("GET", "/v1/sessions", None), ("POST", "/v1/chat/completions", {"messages": HI, "stream": True}), ("GET", "/v1/me", None)):
                status, _, reply = await get_json(self.gw.url + path, method=method, headers=bearer(tok), body=body)
                self.assertEqual((status, reply["error"]["code"]), (401, "AUTH_INVALID_TOKEN"), (claims, path))

    async def test_embeddings_and_audit_identity_in_the_access_log(self):
        """Embeddings log their token count, and every line names the caller's identity provider beside the sub."""
        self.start()
        status, _, _ = await get_json(self.gw.url + "/v1/embeddings", method="POST", headers=bearer(token(scope=WRITE)), body={"model": "nomic-embed-text", "input": "hello there"})
        self.assertEqual(status, 200)
        line = self.access_lines()[-1]
        self.assertGreater(line["tokens"], 0)
        self.assertEqual((line["user"], line["idp"]), ("alice", helpers.ISSUER))


class PostgresBoundaryTests(Backed):
    """Second review: text PostgreSQL cannot store never reaches it, and per-owner limits hold under concurrency."""

    async def test_nul_is_refused_before_the_database(self):
        """A NUL character in a body, a path id or a query is a 400 or 404 at the door, never a 500 from PostgreSQL."""
        from tests.test_sessions import pg_database

        self.start(f'storage: {{backend: postgresql, dsn: "{pg_database(self)}"}}')
        auth = bearer(token(scope=WRITE))
        status, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=auth, body={"title": "ok"})
        self.assertEqual(status, 201)
        sid = session["id"]
        for method, path, body, want in (
            ("POST", "/v1/sessions", {"title": "a\u0000b"}, 400),
            ("PATCH", f"/v1/sessions/{sid}", {"title": "a\u0000b"}, 400),
            ("POST", "/v1/chat/completions", {"messages": HI, "session_id": "s\u0000"}, 400),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x\u0000y"}], "session_id": sid}, 400),
            ("GET", "/v1/sessions/a%00b", None, 404),
            ("DELETE", "/v1/sessions/a%00b", None, 404),
            ("GET", "/v1/sessions?team=a%00b", None, 400),
        ):
            status, _, reply = await get_json(self.gw.url + path, method=method, headers=auth, body=body)
            self.assertEqual(status, want, (method, path, body, reply))
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        status, _, reply = await get_json(self.gw.url + f"/v1/sessions/{sid}", headers=auth)
        self.assertEqual((status, reply["title"], reply["messages"]), (200, "ok", []))

    async def test_parallel_creates_respect_the_session_limit(self):
        """Forty sessions created at once for one owner on PostgreSQL: exactly max_sessions_per_user exist afterwards."""
        from tests.test_sessions import pg_database

        self.start(f'storage: {{backend: postgresql, dsn: "{pg_database(self)}"}}\nhistory: {{max_sessions_per_user: 3}}')
        auth = bearer(token(scope=WRITE))
        results = await gatherResults([ensureDeferred(get_json(self.gw.url + "/v1/sessions", method="POST", headers=auth, body={"title": f"s{i}"})) for i in range(40)])
        self.assertEqual(sum(1 for status, _, _ in results if status == 201), 3)
        status, _, listing = await get_json(self.gw.url + "/v1/sessions", headers=auth)
        self.assertEqual(len(listing["data"]), 3)


class BudgetBoundsTests(Backed):
    """Second review: reservations cover the reply, estimates are bounded, refused calls cost nothing."""

    async def test_parallel_small_prompts_with_big_replies(self):
        """Calls with tiny prompts reserve their max_tokens too, so a burst cannot overrun the budget many times over."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 1000}")
        results = await self.burst([self.chat(max_tokens=100000) for _ in range(10)])
        self.assertEqual(sorted(status for status, _, _ in results), [200] + [429] * 9)
        results = await self.burst([self.chat(sub="bob", stream=True) for _ in range(10)])
        # Without max_tokens a default reply is reserved: 1000 tokens hold about four calls at once.
        self.assertLessEqual(sum(1 for status, _, _ in results if status == 200), 5)

    async def test_estimate_is_bounded_by_the_context(self):
        """A huge prompt cut off early is charged at most backend.max_num_ctx, not millions of tokens."""
        self.start("backend: {max_num_ctx: 4096}\nrate_limit: {requests_per_minute: 0, tokens_per_minute: 100000}")
        self.fake.behave(stall_after=3)
        await self.stream_then_leave("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200000}], "stream": True}, b"data: ", 3)
        line = self.access_lines()[0]
        self.assertLessEqual(line["tokens"], 4096 + 10)

    async def test_refused_by_ollama_costs_nothing(self):
        """A call Ollama refuses (a model it does not have) is not charged its estimate."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 300}")
        prompt = [{"role": "user", "content": "word " * 200}]
        for _ in range(3):
            status, _, reply = await self.chat(model="no-such-model:1b", messages=prompt)
            self.assertEqual(status, 404, reply)
        self.assertEqual((await self.chat(messages=prompt))[0], 200)


class BodyCapTests(Backed):
    """Second review: bodies whose work is unbounded are refused at the door."""

    async def test_too_many_messages_or_inputs(self):
        """More than 10,000 messages, or more than 2,048 embedding inputs, is a 400 on the OpenAI and native routes."""
        self.start()
        many = [{"role": "user", "content": "x"}] * 10001
        for path, body in (
            ("/v1/chat/completions", {"messages": many}),
            ("/ollama/api/chat", {"model": "qwen3:32b", "messages": many, "stream": False}),
            ("/v1/embeddings", {"model": "nomic-embed-text", "input": ["x"] * 2049}),
            ("/ollama/api/embed", {"model": "nomic-embed-text", "input": ["x"] * 2049}),
        ):
            status, _, reply = await get_json(self.gw.url + path, method="POST", headers=bearer(token(scope=WRITE)), body=body)
            self.assertEqual(status, 400, path)
        # (Only the gateway's own start-up check may have asked.)
        self.assertEqual([r.path for r in self.fake.requests if r.path != "/api/version"], [])
