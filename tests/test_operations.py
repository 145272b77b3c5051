"""
Operating the gateway (SPEC.md §9): rate limits on a clock, the access log
and its sampling, secrets kept out of every log line, metrics, SIGTERM drain
and SIGHUP under load.
"""

import json
import math
import os
import re
import signal
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot.auth.identity import Principal
from clawdbot.config import parse_config
from clawdbot.logs import event_as_dict
from clawdbot.ops.observe import AccessLog, redact
from clawdbot.ops.ratelimit import MemoryLimiter, rule_for
from testing.fake_ollama import FakeOllama
from tests import helpers
from tests.helpers import BASE_CONFIG, Process, bearer, clawdbot_argv, get_json, merge_yaml, serve, stream_call, token, write_config

HI = [{"role": "user", "content": "hi"}]


def run(coro):
    d = Deferred.fromCoroutine(coro)
    results = []
    d.addBoth(results.append)
    return results[0]


class LimiterTests(SynchronousTestCase):
    def test_request_bucket_refills_on_the_clock(self):
        """A budget of 3 per minute allows 3 at once, then one more every 20 seconds, with honest headers."""
        clock = Clock()
        limiter = MemoryLimiter(clock)
        decisions = [run(limiter.take("alice", 3)) for _ in range(4)]
        self.assertEqual([d.allowed for d in decisions], [True, True, True, False])
        refused = decisions[-1]
        self.assertEqual(refused.headers()["Retry-After"], "20")
        self.assertEqual(refused.headers()["x-ratelimit-remaining"], "0")
        self.assertEqual(refused.headers()["x-ratelimit-limit"], "3")
        clock.advance(19)
        self.assertFalse(run(limiter.take("alice", 3)).allowed)
        clock.advance(1)
        self.assertTrue(run(limiter.take("alice", 3)).allowed)
        self.assertTrue(run(limiter.take("bob", 3)).allowed)
        clock.advance(60)
        self.assertEqual(run(limiter.take("alice", 3)).remaining, 2)

    def test_token_budget_goes_into_debt(self):
        """Tokens are spent after the reply; a budget in debt refuses until it has refilled."""
        clock = Clock()
        limiter = MemoryLimiter(clock)
        self.assertTrue(run(limiter.peek("alice", 600, "tokens")).allowed)
        run(limiter.spend("alice", 600, 900, "tokens"))
        refused = run(limiter.peek("alice", 600, "tokens"))
        self.assertFalse(refused.allowed)
        self.assertEqual(math.ceil(refused.retry_after), 31)
        clock.advance(31)
        self.assertTrue(run(limiter.peek("alice", 600, "tokens")).allowed)

    def test_zero_is_unlimited(self):
        """A budget of 0 is no limit and sends no headers."""
        limiter = MemoryLimiter(Clock())
        for _ in range(1000):
            decision = run(limiter.take("alice", 0))
            self.assertTrue(decision.allowed)
        self.assertEqual(decision.headers(), {})

    def test_rules_per_scope_and_team(self):
        """A matching per-scope or per-team rule replaces the default; the most generous match wins."""
        config = parse_config(
            merge_yaml(
                BASE_CONFIG,
                "rate_limit: {requests_per_minute: 60, tokens_per_minute: 1000, per_scope: {admin: {requests_per_minute: 0}}, per_team: {interns: {requests_per_minute: 5, tokens_per_minute: 100}, research: {requests_per_minute: 600}}}",
            ),
            {},
        )
        self.assertEqual(tuple(rule_for(Principal("a"), config).__dict__.values()), (60, 1000))
        self.assertEqual(rule_for(Principal("a", frozenset({"admin"})), config).requests_per_minute, 0)
        self.assertEqual(tuple(rule_for(Principal("a", teams=("interns",)), config).__dict__.values()), (5, 100))
        self.assertEqual(tuple(rule_for(Principal("a", teams=("interns", "research")), config).__dict__.values()), (600, 1000))


class Backed(helpers.Backed):
    timeout = 60

    async def chat(self, who="alice", scope="chat:read chat:write", **body):
        payload = {"messages": HI}
        payload.update(body)
        return await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=bearer(token(sub=who, scope=scope)), body=payload)


class RateLimitHTTPTests(Backed):
    async def test_requests_per_minute(self):
        """Past the request budget: 429 RATE_LIMITED with Retry-After and x-ratelimit headers; others are unaffected."""
        self.start("rate_limit: {requests_per_minute: 3}")
        statuses = []
        for _ in range(4):
            status, headers, body = await self.chat()
            statuses.append(status)
        self.assertEqual(statuses, [200, 200, 200, 429])
        self.assertEqual(body["error"]["code"], "RATE_LIMITED")
        self.assertTrue(int(headers.getRawHeaders("retry-after")[0]) >= 1)
        self.assertEqual(headers.getRawHeaders("x-ratelimit-limit"), ["3"])
        self.assertEqual(headers.getRawHeaders("x-ratelimit-remaining"), ["0"])
        self.assertEqual((await self.chat(who="bob"))[0], 200)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 4)

    async def test_tokens_per_minute_from_ollama_counts(self):
        """The token budget counts Ollama's prompt_eval_count + eval_count and refuses once spent."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 20}", fake=FakeOllama(tokens=30))
        status, _, reply = await self.chat()
        self.assertEqual(status, 200)
        self.assertGreater(reply["usage"]["total_tokens"], 20)
        status, headers, body = await self.chat()
        self.assertEqual((status, body["error"]["code"]), (429, "RATE_LIMITED"))
        self.assertIn("token budget", body["error"]["details"])

    async def test_sighup_changes_limit(self):
        """A reload changes the budget at once (the buckets keep their state)."""
        gw = self.start("rate_limit: {requests_per_minute: 1000}")
        for _ in range(3):
            self.assertEqual((await self.chat())[0], 200)
        with open(gw.config_path) as f:
            text = f.read()
        with open(gw.config_path, "w") as f:
            f.write(text.replace("requests_per_minute: 1000", "requests_per_minute: 2"))
        self.assertTrue(gw.parts.runtime.reload())
        # The bucket now holds at most the new budget: two more, then 429.
        self.assertEqual([(await self.chat())[0] for _ in range(3)], [200, 200, 429])


class AccessLogTests(Backed):
    async def test_one_line_per_request(self):
        """Each request gives one JSON line with the §9 fields; query values never appear."""
        self.start("access_log: {sample_rate: 0}")
        await self.chat(model="qwen3:32b")
        await get_json(self.gw.url + "/v1/me?access_token=abc123canary&x=1", headers=bearer(token()))
        await get_json(self.gw.url + "/nope")
        lines = self.access_lines()
        self.assertEqual(len(lines), 3)
        chat = lines[0]
        for field in ("time", "request_id", "method", "path", "status", "latency_ms", "bytes", "user", "session", "model", "tokens", "upstream_latency_ms"):
            self.assertIn(field, chat)
        self.assertEqual((chat["method"], chat["path"], chat["status"], chat["user"], chat["model"]), ("POST", "/v1/chat/completions", 200, "alice", "qwen3:32b"))
        self.assertGreater(chat["tokens"], 0)
        self.assertNotIn("request_body", chat)
        self.assertEqual(lines[1]["path"], "/v1/me?access_token=…&x=…")
        self.assertNotIn("abc123canary", json.dumps(lines))
        self.assertEqual(lines[2]["status"], 404)

    async def test_sampling_rate(self):
        """About sample_rate of the requests carry bodies (within five standard deviations over 1,500)."""
        self.start("access_log: {sample_rate: 0.2}")
        n = 1500
        for _ in range(n):
            await get_json(self.gw.url + "/healthz")
        sampled = sum(1 for line in self.access_lines() if line.get("sampled"))
        mean, sd = n * 0.2, math.sqrt(n * 0.2 * 0.8)
        self.assertLess(abs(sampled - mean), 5 * sd, sampled)

    async def test_5xx_logged_with_detail(self):
        """A backend failure is logged with its error code and curated details."""
        self.start("access_log: {sample_rate: 0}")
        self.fake.behave(status_error=500)
        await self.chat()
        line = self.access_lines()[-1]
        self.assertEqual((line["status"], line["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"))

    async def test_no_secret_or_token_in_any_log(self):
        """With every request sampled, no canary secret, token, cookie or image data reaches any log line."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        canary_secret = "canary-jwt-secret-0123456789-abcdefghijklmnop"
        gw = self.start(
            f"""
access_log: {{sample_rate: 1.0}}
auth: {{jwt: {{secret: "{canary_secret}"}}}}
"""
        )
        good = token(secret=canary_secret)
        expired = token(secret=canary_secret, ttl=-600)
        image = "data:image/png;base64," + "QUJD" * 50
        headers = dict(bearer(good), Cookie="clawdbot_refresh=canary-cookie-value")
        await get_json(gw.url + "/v1/chat/completions?access_token=canary-query-token", method="POST", headers=headers, body={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": image}}]}],
            "password": "canary-password",
        })
        await get_json(gw.url + "/v1/chat/completions", method="POST", headers=headers, body={"messages": HI, "stream": True})
        await get_json(gw.url + "/v1/me", headers=bearer(expired))
        await get_json(gw.url + "/v1/me", headers={"Authorization": "Bearer not.a.token-canary"})
        text = open(self.logfile).read() + "\n".join(json.dumps(event_as_dict(e), default=str) for e in events)
        self.assertIn('"sampled": true', text)
        # The bodies are there, redacted: the image and the password are not.
        self.assertIn('"request_body": {"messages"', text)
        self.assertIn("[image/png data]", text)
        self.assertIn('"password": "[redacted]"', text)
        for canary in (canary_secret, good, good.split(".")[2], expired.split(".")[2], "canary-cookie-value", "canary-query-token", "canary-password", "QUJDQUJD", "token-canary"):
            self.assertNotIn(canary, text, canary)

    def test_redact(self):
        """Redaction covers secret-named keys, bearer tokens and JWTs in text, and image data URLs."""
        value = redact({"client_secret": "x", "messages": [{"content": "Bearer abc.def.ghi and eyJhbGciOi.eyJzdWIiOi.sig"}], "img": "data:image/png;base64,AAAA"})
        self.assertEqual(value["client_secret"], "[redacted]")
        self.assertNotIn("abc.def.ghi", json.dumps(value))
        self.assertNotIn("eyJzdWIiOi", json.dumps(value))
        self.assertEqual(value["img"], "[image/png data]")

    def test_reopen(self):
        """reopen() lets logrotate move the file away; lines go to the new file."""
        path = os.path.join(tempfile.mkdtemp(), "a.log")
        log = AccessLog(path)
        log.stream.write("one\n")
        os.rename(path, path + ".1")
        log.reopen()
        log.stream.write("two\n")
        log.stream.flush()
        self.assertEqual(open(path).read(), "two\n")


class MetricsTests(Backed):
    async def test_metrics_after_script(self):
        """After a scripted set of requests the counters, histograms and gauges say what happened."""
        gw = self.start("rate_limit: {requests_per_minute: 2}")
        await self.chat()
        await self.chat(stream=True)
        await self.chat()
        await get_json(gw.url + "/v1/me")
        await get_json(gw.url + "/v1/me", headers=bearer(token(ttl=-600)))
        self.assertTrue(gw.parts.runtime.reload())
        status, _, _ = await get_json(gw.url + "/metrics", headers=bearer(token(scope="chat:read")))
        self.assertEqual(status, 403)
        status, headers, text = await get_json(gw.url + "/metrics", headers=bearer(token(scope="admin")))
        self.assertEqual(status, 200)
        text = text.decode()
        self.metrics_text = text

        def value(name, **labels):
            want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+]+)"
            match = re.search(pattern, text)
            return float(match.group(1)) if match else None

        self.assertEqual(value("clawdbot_requests_total", route="chat_completions", method="POST", status="200"), 2.0, text)
        self.assertEqual(value("clawdbot_requests_total", route="chat_completions", method="POST", status="429"), 1.0)
        self.assertEqual(value("clawdbot_rejections_total", code="RATE_LIMITED"), 1.0)
        self.assertEqual(value("clawdbot_rejections_total", code="AUTH_MISSING_TOKEN"), 1.0)
        self.assertEqual(value("clawdbot_rejections_total", code="AUTH_INVALID_TOKEN"), 1.0)
        self.assertEqual(value("clawdbot_time_to_first_token_seconds_count"), 1.0)
        self.assertGreater(value("clawdbot_tokens_total", direction="completion"), 0)
        self.assertEqual(value("clawdbot_active_streams"), 0.0)
        self.assertEqual(value("clawdbot_queue_depth"), 0.0)
        self.assertEqual(value("clawdbot_request_duration_seconds_count", route="chat_completions"), 3.0)
        self.assertIsNotNone(value("clawdbot_backend_up"))
        self.assertEqual(value("clawdbot_config_reloads_total", result="ok"), 1.0)

    async def test_separate_metrics_listener(self):
        """metrics.listen opens a loopback listener serving /metrics without a token, and nothing else."""
        gw = self.start('metrics: {listen: "tcp:0:interface=127.0.0.1"}')
        url = [line for line in gw.said if line.startswith("Metrics")][0].split(" listening on ")[1]
        status, _, text = await get_json(url + "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"clawdbot_requests_total", text)
        self.assertEqual((await get_json(url + "/v1/me"))[0], 404)


class SignalTests(TestCase):
    """Real processes and real signals."""

    timeout = 120

    def start(self, extra, fake):
        config = merge_yaml(BASE_CONFIG, merge_yaml(f'backend: {{url: "{fake.url}"}}', extra))
        path = write_config(self, config)
        proc = Process(clawdbot_argv("start", "--config", path, "--no-debug-port"))
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        return proc, path

    async def draining_one_stream(self):
        """A gateway that got SIGTERM while one stream runs (its answer held): C{(fake, proc, stream)}."""
        fake = FakeOllama(tokens=15)
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        fake.hold(after=1)
        proc, _ = self.start("server: {drain_timeout: 20s}", fake)
        stream = stream_call(proc.url() + "/v1/chat/completions", {"messages": HI, "stream": True}, bearer(token()))
        await stream.when_seen(b"data: ")
        proc.signal(signal.SIGTERM)
        proc.wait_for("Draining 1 requests", stream="stderr")  # logged once the listeners are closed
        return fake, proc, stream

    async def test_sigterm_drains_stream(self):
        """SIGTERM stops accepting, lets a stream in flight finish, and exits 0."""
        fake, proc, stream = await self.draining_one_stream()
        refused = None
        try:
            await get_json(proc.url() + "/healthz")
        except Exception as e:
            refused = e
        self.assertIsNotNone(refused, "the gateway still accepted connections while draining")
        fake.release()
        status, raw = await stream.done
        self.assertTrue(raw.endswith(b"data: [DONE]\n\n"), raw[-200:])
        self.assertEqual(proc.proc.wait(10), 0)

    async def test_signals_during_the_drain_do_not_end_it(self):
        """A SIGHUP (systemctl reload) or SIGUSR1 (logrotate) arriving while a SIGTERM drain runs leaves the drain to finish: the stream completes and the process exits 0."""
        fake, proc, stream = await self.draining_one_stream()
        proc.signal(signal.SIGHUP)
        proc.signal(signal.SIGUSR1)
        proc.wait_for("Config reloaded", stream="stderr")
        fake.release()
        status, raw = await stream.done
        self.assertTrue(raw.endswith(b"data: [DONE]\n\n"), raw[-200:])
        self.assertEqual(proc.proc.wait(10), 0)

    async def test_sigterm_deadline_ends_stream_with_error(self):
        """A stream still running at the drain deadline ends with an SSE error event; the process exits 0."""
        fake = FakeOllama(tokens=200)
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        fake.hold(after=1)  # still running at the deadline
        proc, _ = self.start("server: {drain_timeout: 500ms}", fake)
        stream = stream_call(proc.url() + "/v1/chat/completions", {"messages": HI, "stream": True}, bearer(token()))
        await stream.when_seen(b"data: ")
        proc.signal(signal.SIGTERM)
        status, raw = await stream.done
        last = raw.strip().split(b"\n\n")[-1]
        self.assertEqual(json.loads(last[6:])["error"]["code"], "SHUTTING_DOWN")
        self.assertEqual(proc.proc.wait(10), 0)

    async def test_sighup_under_load(self):
        """SIGHUP lowering a limit under steady load drops no request: every answer is a 200 or a 429."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        proc, path = self.start("rate_limit: {requests_per_minute: 100000}", fake)
        url = proc.url()
        statuses = []
        stop = [False]

        async def client(n):
            auth = bearer(token(sub=f"user{n % 3}"))
            while not stop[0]:
                status, _, _ = await get_json(url + "/v1/chat/completions", method="POST", headers=auth, body={"messages": HI})
                statuses.append(status)

        clients = [ensureDeferred(client(n)) for n in range(6)]
        await helpers.until(lambda: len(statuses) >= 30, what="30 answers before the reload")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("requests_per_minute: 100000", "requests_per_minute: 5"))
        proc.signal(signal.SIGHUP)
        proc.wait_for("Config reloaded", stream="stderr")
        reloaded = len(statuses)
        await helpers.until(lambda: 429 in statuses[reloaded:] and len(statuses) - reloaded >= 30, what="30 answers, a 429 among them, after the reload")
        stop[0] = True
        for c in clients:
            await c
        self.assertEqual(set(statuses) - {200, 429}, set())
        self.assertIn(429, statuses)
        self.assertGreater(statuses.count(200), 20)


class AuthAddressLimitTests(TestCase):
    async def test_per_address_limit_on_sign_in(self):
        """/auth/* calls are limited per client address: past the budget, 429 with Retry-After."""
        gw = serve(
            self,
            extra="""
rate_limit: {auth_per_ip_per_minute: 2}
oauth2:
  enabled: true
  client_id: gw
  client_secret: s3cret
  redirect_uri: "http://127.0.0.1:1/callback"
  issuer_url: "http://127.0.0.1:9"
""",
        )
        statuses = []
        for _ in range(3):
            status, headers, _ = await get_json(gw.url + "/auth/refresh", method="POST", headers={"X-Requested-With": "XMLHttpRequest"})
            statuses.append(status)
        self.assertNotEqual(statuses[0], 429)
        self.assertEqual(statuses[2], 429)
        self.assertTrue(headers.getRawHeaders("retry-after"))


class ReviewRegressionTests(Backed):
    async def test_native_calls_count_tokens(self):
        """Ollama-native chat (plain and streamed) counts against the token budget like the OpenAI route."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 20}", fake=FakeOllama(tokens=30))
        auth = bearer(token(scope="chat:read chat:write"))
        status, _, _ = await get_json(self.gw.url + "/ollama/api/chat", method="POST", headers=auth, body={"model": "qwen3:32b", "messages": HI, "stream": False})
        self.assertEqual(status, 200)
        status, _, body = await get_json(self.gw.url + "/ollama/api/chat", method="POST", headers=auth, body={"model": "qwen3:32b", "messages": HI})
        self.assertEqual((status, body["error"].split(":")[0]), (429, "Rate limit exceeded"))
        other = bearer(token(sub="bob", scope="chat:read chat:write"))
        status, _, raw = await get_json(self.gw.url + "/ollama/api/chat", method="POST", headers=other, body={"model": "qwen3:32b", "messages": HI})
        self.assertEqual(status, 200)
        self.assertEqual((await get_json(self.gw.url + "/ollama/api/generate", method="POST", headers=other, body={"model": "qwen3:32b", "prompt": "x"}))[0], 429)
        self.assertGreater(self.access_lines()[-2]["tokens"], 20)

    async def test_model_management_with_any_model_value(self):
        """
        Model management bodies pass to Ollama as sent, so their C{model} may
        be any JSON value; with per-model capacity configured, none of them
        is a 500 (the capacity rule applies to a named model only).
        """
        self.start("backend: {model_limits: {qwen3:32b: {max_connections: 1}, fuzz-copy: {max_connections: 1}}}")
        admin = bearer(token(sub="root", scope="chat:read chat:write admin"))
        for value in ([None], {"a": 1}, 3, True, [], "fuzz-copy"):
            for method, name, body in (("DELETE", "delete", {"model": value}), ("POST", "pull", {"model": value, "stream": False}), ("POST", "show", {"model": value})):
                status, _, answer = await get_json(self.gw.url + "/ollama/api/" + name, method=method, headers=admin, body=body)
                self.assertNotEqual(status, 500, (name, value, answer))
                if status >= 400:
                    self.assertIsInstance(answer.get("error"), str, (name, value, answer))

    async def test_deep_nesting_is_400_and_401(self):
        """Absurdly nested JSON in a body or a token is a 400 or a 401, never a 500."""
        import base64

        self.start()
        auth = bearer(token(scope="chat:read chat:write"))
        status, _, body = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=auth, body=b"[" * 100000)
        self.assertEqual((status, body["error"]["code"]), (400, "INVALID_REQUEST"))
        head = base64.urlsafe_b64encode(b'{"alg":"HS256"}').rstrip(b"=").decode()
        payload = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).rstrip(b"=").decode()
        status, _, body = await get_json(self.gw.url + "/v1/me", headers={"Authorization": f"Bearer {head}.{payload}.x"})
        self.assertEqual((status, body["error"]["code"]), (401, "AUTH_INVALID_TOKEN"))

    async def test_debug_port_refuses_other_origins_and_hosts(self):
        """The unauthenticated debug port refuses cross-site requests and DNS-rebound hosts."""
        self.start()
        url = self.gw.debug_url
        status, _, body = await get_json(url + "/ollama/api/pull", method="POST", headers={"Origin": "https://evil.example"}, body={"model": "x"})
        # Refused before routing, in the native routes' own (Ollama's) shape.
        self.assertEqual(status, 403)
        self.assertIn("origin not allowed", body["error"])
        status, _, body = await get_json(url + "/v1/me", method="GET", headers={"Origin": "https://evil.example"})
        self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"))
        status, _, _ = await get_json(url + "/v1/me", headers={"Host": "evil.example:18789"})
        self.assertEqual(status, 403)
        status, _, _ = await get_json(url + "/v1/me", headers={"Origin": "http://localhost:3000"})
        self.assertEqual(status, 200)
        self.assertEqual((await get_json(url + "/v1/me"))[0], 200)

    async def test_unexpected_error_mid_stream_ends_with_event(self):
        """An unexpected failure after a stream started ends it with an SSE error event, not raw JSON or a silent close."""
        self.start()
        owner = bearer(token(scope="chat:read chat:write"))
        _, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=owner, body={"title": "x"})

        async def broken(*args, **kwargs):
            raise RuntimeError("disk full")

        self.gw.parts.history.store.append = broken
        status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=owner, body={"session_id": session["id"], "messages": HI, "stream": True})
        last = raw.strip().split(b"\n\n")[-1]
        self.assertTrue(last.startswith(b"data: "), raw[-200:])
        self.assertEqual(json.loads(last[6:])["error"]["code"], "INTERNAL_ERROR")
        self.assertNotIn(b"[DONE]", raw)
        self.assertGreaterEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_large_sampled_body_is_omitted(self):
        """A sampled body over the log's limit is described, not logged cut in half (secrets could not be found in it)."""
        self.start("access_log: {sample_rate: 1.0}")
        big = {"messages": [{"role": "user", "content": "x" * 70000}], "client_secret": "canary-big-secret"}
        await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=bearer(token()), body=big)
        line = self.access_lines()[-1]
        self.assertIn("omitted", line["request_body"])
        self.assertNotIn("canary-big-secret", json.dumps(self.access_lines()))


class StartupCheckTests(TestCase):
    """At start the gateway says whether Ollama answers, beside the "listening on" lines (issue 20, item 4)."""

    async def test_says_whether_ollama_answers(self):
        """With no Ollama at the address it says so at once, naming the address; with one, that it answers. A call to a lone backend that is down logs that calls get 502, not "routing around it"."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        down = f"http://127.0.0.1:{helpers.closed_port(self)}"
        gw = serve(self, f'backend: {{url: "{down}"}}')
        await helpers.until(lambda: any("Ollama at" in line for line in gw.said), what="the start-up check")
        said = [line for line in gw.said if "Ollama at" in line]
        self.assertEqual(said, [f"Ollama at {down} is not answering (not reachable); model calls fail until it does"])
        await get_json(gw.url + "/v1/chat/completions", method="POST", headers=bearer(token()), body={"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}]})
        texts = [e.get("log_format", "") for e in events]
        self.assertIn("Backend {url} is not answering; model calls fail until it does", texts)
        self.assertNotIn("Backend {url} is down; routing around it to the others", texts)
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        up = serve(self, f'backend: {{url: "{fake.url}"}}')
        await helpers.until(lambda: any("Ollama at" in line for line in up.said), what="the start-up check")
        self.assertEqual([line for line in up.said if "Ollama at" in line], [f"Ollama at {fake.url} answers"])


class ReadyzAddressTests(TestCase):
    async def test_dev_mode_names_the_address_tried(self):
        """In dev mode a not-ready /readyz names the Ollama address it tried; in production (where /readyz is public) it does not."""
        down = f"http://127.0.0.1:{helpers.closed_port(self)}"
        gw = serve(self, f'backend: {{url: "{down}"}}')
        status, _, body = await get_json(gw.url + "/readyz")
        self.assertEqual((status, body["reason"]), (503, f"Ollama at {down}: not reachable"))
        prod = serve(self, f'backend: {{url: "{down}"}}\nserver: {{mode: production}}\nauth: {{jwt: {{secret: "{"p" * 40}"}}}}', no_debug=True)
        status, _, body = await get_json(prod.url + "/readyz")
        self.assertEqual((status, body["reason"]), (503, "Ollama: not reachable"))
