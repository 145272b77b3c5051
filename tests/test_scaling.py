"""
Several gateways behind one load balancer (issue 9): rate limits kept in
Redis by one atomic script, and two real gateway processes on one PostgreSQL
and one Redis behind a real nginx.

Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432) run on this machine
and in CI.  Every test uses its own Redis key prefix and its own database,
and removes them afterwards.
"""

import http.client
import http.cookiejar
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import redis
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot.config import ConfigError, effective, parse_config, restart_needed
from clawdbot.auth.identity import owner_key
from clawdbot.ops.ratelimit import BUCKET_SCRIPT, LimiterUnavailable, MemoryLimiter, RedisLimiter
from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, ISSUER, Process, bearer, clawdbot_argv, closed_port, get_json, merge_yaml, process_env, reserved_port, serve, token, until, write_config
from tests.idp import IdP, browserless_login
from tests.test_sessions import pg_database

REDIS_URL = "redis://127.0.0.1:6379/0"
HI = [{"role": "user", "content": "hi"}]


def redis_prefix(testcase):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"clawdbot-test:{secrets.token_hex(6)}:"

    def clean():
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    testcase.addCleanup(clean)
    return prefix


def tool(name):
    """The path of a command, looking in the sbin folders too (nginx lives in /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise AssertionError(f"{name} is not installed (tests/setup-deps.sh installs it)")
    return found


# --- the limiter on Redis ---------------------------------------------------------


class RedisLimiterTests(TestCase):
    timeout = 30

    def limiter(self, url=REDIS_URL, prefix=None, **kwargs):
        limiter = RedisLimiter(reactor, url, key_prefix=prefix or self.prefix, **kwargs)
        self.addCleanup(limiter.close)
        return limiter

    def setUp(self):
        self.prefix = redis_prefix(self)
        self.client = redis.Redis.from_url(REDIS_URL)
        self.addCleanup(self.client.close)

    async def test_same_decisions_as_memory(self):
        """
        Over a scripted run of takes (of 1 and of more), peeks, spends that
        put a budget in debt, reservations (refused once in debt), refunds
        (never past a full bucket), limits changed as by a reload, and the clock
        moving by fractions of a second to more than a minute, the Redis
        limiter gives exactly the decisions of the in-memory one on the same
        clock: same allowed, remaining, reset and retry_after.
        """
        clock = Clock()
        clock.advance(1_790_000_000.25)
        memory = MemoryLimiter(clock)
        shared = self.limiter(clock=clock)
        rng = random.Random(20240609)
        compared = refused = 0
        for step in range(400):
            op = rng.choice(("take", "take", "take", "take", "peek", "spend", "reserve", "refund", "advance"))
            key = rng.choice(("alice", "bob"))
            limit = rng.choice((3, 3, 3, 5, 60))
            if op == "advance":
                clock.advance(rng.choice((0.0, 0.1, 0.5, 1.3, 7.0, 20.0, 61.0)))
                continue
            if op == "take":
                cost = rng.choice((1.0, 1.0, 2.5))
                want = await memory.take(key, limit, cost)
                got = await shared.take(key, limit, cost)
            elif op == "peek":
                want = await memory.peek(key, limit * 10, "tokens")
                got = await shared.peek(key, limit * 10, "tokens")
            elif op == "reserve":
                cost = rng.choice((5, 40, 90))
                want = await memory.reserve(key, limit * 10, cost, "tokens")
                got = await shared.reserve(key, limit * 10, cost, "tokens")
            elif op == "refund":
                cost = -rng.choice((5, 40, 900))
                await memory.spend(key, limit * 10, cost, "tokens")
                await shared.spend(key, limit * 10, cost, "tokens")
                want = await memory.peek(key, limit * 10, "tokens")
                got = await shared.peek(key, limit * 10, "tokens")
            else:
                cost = rng.choice((5, 40, 90))
                await memory.spend(key, limit * 10, cost, "tokens")
                await shared.spend(key, limit * 10, cost, "tokens")
                want = await memory.peek(key, limit * 10, "tokens")
                got = await shared.peek(key, limit * 10, "tokens")
            self.assertEqual(got, want, f"step {step}: {op} {key} limit {limit}")
            compared += 1
            refused += not want.allowed
        # The run exercised both answers.
        self.assertGreater(compared, 250)
        self.assertGreater(refused, 30)

    async def test_server_clock_and_expiry(self):
        """
        Without a test clock the bucket runs on Redis's clock (TIME): the
        stored stamp is the server's time, a drained bucket refuses and then
        refills with it, and the key expires two minutes after a full refill
        is due (longer for a budget in debt, which is not forgiven early).
        """

        def server_time():
            seconds, micros = self.client.time()
            return seconds + micros / 1e6

        limiter = self.limiter()
        before = server_time()
        first = await limiter.take("alice", 600, cost=600)
        after = server_time()
        self.assertEqual((first.allowed, first.remaining), (True, 0))
        key = limiter.bucket_key("requests", "alice")
        stored = self.client.hgetall(key)
        self.assertTrue(before <= float(stored[b"stamp"]) <= after, (before, stored, after))
        self.assertTrue(60_000 < self.client.pttl(key) <= 120_000, self.client.pttl(key))
        # The whole budget again would take a minute to refill; one request, a tenth of a second.
        self.assertFalse((await limiter.take("alice", 600, cost=600)).allowed)
        while not (await limiter.take("alice", 600)).allowed:
            await deferLater(reactor, 0.05)

        await limiter.spend("alice", 60, 600, "tokens")
        debt = limiter.bucket_key("tokens", "alice")
        self.assertLess(float(self.client.hget(debt, "level")), -500)
        self.assertGreater(self.client.pttl(debt), 600_000)

    async def test_atomic_across_instances_and_threads(self):
        """
        Four hundred takes at once from two limiter instances (eight threads
        and connections between them), then threads calling the script
        directly: on a frozen clock exactly the budget is granted, each
        grant sees a different remaining count, and nothing more passes.
        A read-modify-write from Python would hand out the same token twice.
        """
        clock = Clock()
        clock.advance(1_790_000_000)
        # Atomicity, not timeouts, is under test: on a loaded machine a 0.25 s
        # command timeout let some takes through as a Redis outage ("open").
        patient = dict(clock=clock, timeout=10.0, connect_timeout=10.0, on_backend_error="closed")
        a, b = self.limiter(**patient), self.limiter(**patient)
        decisions = await gatherResults([Deferred.fromCoroutine((a if i % 2 else b).take("alice", 50)) for i in range(400)])
        granted = [d for d in decisions if d.allowed]
        self.assertEqual(len(granted), 50)
        self.assertEqual(sorted(d.remaining for d in granted), list(range(50)))

        args = ("take", "30.0", "1.0", repr(float(clock.seconds())))
        key = a.bucket_key("requests", "bob")

        def hammer(_):
            client = redis.Redis.from_url(REDIS_URL)
            try:
                return [int(client.eval(BUCKET_SCRIPT, 1, key, *args)[0]) for _ in range(20)]
            finally:
                client.close()

        with ThreadPoolExecutor(16) as pool:
            results = [r for batch in pool.map(hammer, range(16)) for r in batch]
        self.assertEqual((len(results), sum(results)), (320, 30))
        self.assertFalse((await a.take("bob", 30)).allowed)

    async def test_evalsha_falls_back_to_eval(self):
        """After SCRIPT FLUSH (a restarted Redis) the limiter still answers: EVALSHA fails, EVAL runs and caches it again."""
        limiter = self.limiter()
        self.assertEqual((await limiter.take("alice", 3)).remaining, 2)
        self.client.script_flush()
        self.assertEqual((await limiter.take("alice", 3)).remaining, 1)
        self.assertEqual((await limiter.take("alice", 3)).remaining, 0)

    async def test_refused_connection_open_and_closed(self):
        """
        Redis not listening: with C{open} every check lets the request
        through, with C{closed} takes and peeks raise 503 GATEWAY_BUSY
        (C{Retry-After: 1}) while spending never raises; each check is
        counted, and the log says Redis refused ("cannot connect").
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = closed_port(self)
        errors = []
        # Deadlines long enough that the refusal, never the deadline, decides (however slow the machine).
        open_ = self.limiter(f"redis://127.0.0.1:{port}/0", on_backend_error="open", on_error=lambda: errors.append("open"), timeout=5)
        self.assertTrue((await open_.take("alice", 3)).allowed)
        self.assertTrue((await open_.peek("alice", 3, "tokens")).allowed)
        await open_.spend("alice", 3, 10, "tokens")
        self.assertEqual(errors, ["open"] * 3)

        closed = self.limiter(f"redis://127.0.0.1:{port}/0", on_backend_error="closed", on_error=lambda: errors.append("closed"), timeout=5)
        for check in (closed.take("alice", 3), closed.peek("alice", 3, "tokens")):
            try:
                await check
            except LimiterUnavailable as e:
                self.assertEqual((e.status, e.code, e.headers), (503, "GATEWAY_BUSY", {"Retry-After": "1"}))
            else:
                self.fail("a closed limiter let a request through during an outage")
        await closed.spend("alice", 3, 10, "tokens")
        self.assertEqual(errors.count("closed"), 3)
        lines = [e for e in events if "Rate limiter backend unavailable" in e.get("log_format", "")]
        self.assertEqual([(e["policy"], e["reason"]) for e in lines], [("open", "cannot connect"), ("closed", "cannot connect")])
        # Unlimited budgets never ask Redis.
        self.assertTrue((await closed.take("alice", 0)).allowed)

    async def test_silent_server_then_recovery(self):
        """
        A Redis that accepts connections and never answers costs the first
        check one short timeout, after which the limiter hangs up on it (no
        thread is left waiting on a silent server); until C{RETRY_AFTER} has
        passed on the limiter's clock the checks that follow are decided
        without asking Redis (no new connection, even once Redis answers on
        that port), and the log gets one line for the lot.  Once the clock
        reaches C{RETRY_AFTER}, the next check is answered by Redis again.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        silent = SilentThenForwarding()
        listening = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        errors = []
        clock = Clock()
        limiter = RedisLimiter(SteppedSeconds(clock), f"redis://127.0.0.1:{port}/0", key_prefix=self.prefix, on_error=lambda: errors.append(1))
        self.addCleanup(limiter.close)
        # Cleanups run last first: the silent server hangs up (on the reactor's
        # next turn) on a check stuck on it before the limiter's threads are joined.
        self.addCleanup(lambda: silent.forward_to("127.0.0.1", 6379) or deferLater(reactor, 0.01))

        self.assertTrue((await limiter.take("alice", 3)).allowed)
        await until(lambda: silent.silent[0].transport.disconnected, what="the limiter hanging up on the silent server")
        for _ in range(20):
            self.assertTrue((await limiter.take("alice", 3)).allowed)
        self.assertEqual((len(errors), silent.connections), (21, 1))
        lines = [e for e in events if "Rate limiter backend unavailable" in e.get("log_format", "")]
        self.assertEqual([e["log_level"].name for e in lines], ["error"])
        self.assertIn(lines[0]["reason"], ("timed out", "no answer in time"))

        # Redis comes back on that port (a forwarder to the real one), and is
        # left alone until the clock reaches RETRY_AFTER.
        silent.forward_to("127.0.0.1", 6379)
        clock.advance(limiter.RETRY_AFTER / 2)
        early = await limiter.take("alice", 3)
        self.assertEqual((early.limit, len(errors), silent.connections), (0, 22, 1))
        clock.advance(limiter.RETRY_AFTER / 2)
        back = await limiter.take("alice", 3)
        self.assertEqual((back.allowed, back.limit, back.remaining), (True, 3, 2))
        self.assertEqual((len(errors), silent.connections), (22, 2))


class SteppedSeconds:
    """
    The reactor, but with C{seconds()} read from a test's L{Clock}: threads
    and timeouts run for real, while a limiter's retry window moves only
    when the test advances the clock.
    """

    def __init__(self, clock):
        self.seconds = clock.seconds

    def __getattr__(self, name):
        return getattr(reactor, name)


class SilentThenForwarding(Factory):
    """
    A server that accepts connections and never answers, until
    L{forward_to} drops those connections and forwards every new one to a
    real server: the same port throughout, never closed and bound again.
    """

    def __init__(self):
        self.silent = []
        self.forward = None
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        if self.forward is not None:
            return self.forward.buildProtocol(addr)
        protocol = Protocol()
        self.silent.append(protocol)
        return protocol

    def forward_to(self, host, port):
        self.forward = ProxyFactory(host, port)
        for protocol in self.silent:
            protocol.transport.abortConnection()


# --- config and wiring ---------------------------------------------------------------


def config_text(extra):
    return merge_yaml(BASE_CONFIG, extra)


class ConfigTests(SynchronousTestCase):
    def test_defaults(self):
        """By default the buckets stay in memory; Redis settings have documented defaults and outages fail open."""
        limits = parse_config(config_text(""), {}).rate_limit
        self.assertEqual(
            (limits.backend, limits.url, limits.key_prefix, limits.on_backend_error),
            ("memory", "redis://127.0.0.1:6379/0", "clawdbot:rl:", "open"),
        )

    def test_rules(self):
        """Wrong backend, policy or URL scheme, and an empty URL, are errors naming the path."""
        cases = {
            "rate_limit: {backend: memcached}": "rate_limit.backend",
            "rate_limit: {on_backend_error: maybe}": "rate_limit.on_backend_error",
            'rate_limit: {url: "http://127.0.0.1:6379"}': "rate_limit.url",
            'rate_limit: {url: ""}': "rate_limit.url",
        }
        for extra, path in cases.items():
            e = self.assertRaises(ConfigError, parse_config, config_text(extra), {})
            self.assertEqual(e.path, path, extra)
        parse_config(config_text('rate_limit: {backend: redis, url: "rediss://:pw@redis.internal:6380/2"}'), {})
        parse_config(config_text('rate_limit: {backend: redis, url: "unix:///run/redis/redis.sock?db=1"}'), {})

    def test_url_is_a_secret(self):
        """check-config masks a password in the Redis URL, and one from an empty variable is refused."""
        config = parse_config(config_text('rate_limit: {backend: redis, url: "redis://app:hunter2@10.0.0.5:6379/0"}'), {})
        self.assertEqual(effective(config)["rate_limit"]["url"], "redis://app:********@10.0.0.5:6379/0")
        config = parse_config(config_text('rate_limit: {url: "redis://127.0.0.1:6379/0?password=hunter2"}'), {})
        self.assertNotIn("hunter2", json.dumps(effective(config)))
        e = self.assertRaises(ConfigError, parse_config, config_text('rate_limit: {url: "${REDIS_URL}"}'), {"REDIS_URL": ""})
        self.assertEqual(e.path, "rate_limit.url")

    def test_restart_needed(self):
        """Backend, URL and key prefix need a restart; the outage policy and budgets do not."""
        old = parse_config(config_text(""), {})
        new = parse_config(
            config_text('rate_limit: {backend: redis, url: "redis://10.0.0.5/0", key_prefix: "x:", on_backend_error: closed, requests_per_minute: 5}'), {}
        )
        self.assertEqual([p for p in restart_needed(old, new) if p.startswith("rate_limit")], ["rate_limit.backend", "rate_limit.url", "rate_limit.key_prefix"])


class GatewayWiringTests(TestCase):
    timeout = 30

    def start(self, extra):
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        return serve(self, extra=merge_yaml(f'backend: {{url: "{fake.url}"}}', extra))

    async def chat(self, gw, who="alice"):
        return await get_json(gw.url + "/v1/chat/completions", method="POST", headers=bearer(token(sub=who)), body={"messages": HI})

    async def metric(self, gw, name):
        status, _, text = await get_json(gw.url + "/metrics", headers=bearer(token(sub="ops", scope="admin")))
        self.assertEqual(status, 200)
        for line in text.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    async def test_redis_backend_limits_requests(self):
        """rate_limit.backend: redis puts the gateway's buckets in Redis: the request budget holds, with its headers."""
        prefix = redis_prefix(self)
        gw = self.start(f'rate_limit: {{backend: redis, url: "{REDIS_URL}", key_prefix: "{prefix}", requests_per_minute: 2}}')
        self.assertIsInstance(gw.parts.accounting.limiter, RedisLimiter)
        replies = [await self.chat(gw) for _ in range(3)]
        self.assertEqual([r[0] for r in replies], [200, 200, 429])
        self.assertEqual(replies[1][1].getRawHeaders("x-ratelimit-remaining"), ["0"])
        self.assertEqual(replies[2][2]["error"]["code"], "RATE_LIMITED")
        client = redis.Redis.from_url(REDIS_URL)
        self.addCleanup(client.close)
        # Buckets are per principal: identity provider plus sub.
        self.assertTrue(client.exists(prefix + "requests:" + owner_key(ISSUER, "alice")))

    async def test_outage_policy_and_metric(self):
        """
        With Redis down, C{open} serves the request and counts
        C{clawdbot_ratelimit_backend_errors_total}; after a reload to
        C{closed} the same request is refused with 503 GATEWAY_BUSY and
        C{Retry-After}.
        """
        gw = self.start(f'rate_limit: {{backend: redis, url: "redis://127.0.0.1:{closed_port(self)}/0", requests_per_minute: 5}}')
        self.assertEqual(await self.metric(gw, "clawdbot_ratelimit_backend_errors_total"), 0.0)
        status, _, _ = await self.chat(gw)
        self.assertEqual(status, 200)
        self.assertEqual(await self.metric(gw, "clawdbot_ratelimit_backend_errors_total"), 1.0)

        with open(gw.config_path) as f:
            text = f.read()
        with open(gw.config_path, "w") as f:
            f.write(text.replace("requests_per_minute: 5", "requests_per_minute: 5\n  on_backend_error: closed"))
        self.assertTrue(gw.parts.runtime.reload())
        status, headers, body = await self.chat(gw)
        self.assertEqual((status, body["error"]["code"]), (503, "GATEWAY_BUSY"))
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(await self.metric(gw, "clawdbot_ratelimit_backend_errors_total"), 2.0)


# --- two gateway processes behind nginx -------------------------------------------------

CLIENT_ID = "clawdbot-gateway"
CLIENT_SECRET = "idp-client-secret-0123456789abcdef"
USERS = [{"sub": "alice", "email": "alice@example.test", "name": "Alice Example", "groups": ["users"]}]
XRW = {"X-Requested-With": "XMLHttpRequest"}
LIMIT = 6

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream clawdbot {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://clawdbot;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_next_upstream error timeout;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body) if self.body else None

    def header(self, name):
        return self.headers.get(name.lower())

    def cookie(self, name):
        for raw in self.headers.get("set-cookie-all", []):
            first = raw.split(";", 1)[0]
            key, _, value = first.partition("=")
            if key == name:
                return value
        return None


def call(base, method, path, body=None, headers=None, cookies=None, timeout=10):
    """One blocking HTTP call; redirects are not followed."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    if cookies:
        hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    try:
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        headers["set-cookie-all"] = response.headers.get_all("Set-Cookie") or []
        return Reply(response.status, headers, raw)
    finally:
        conn.close()


class Cluster:
    """
    Two gateway processes on one fresh PostgreSQL database and one Redis key
    prefix, a fake Ollama process, the real OIDC provider, and nginx
    round-robin in front; everything a child of the test, stopped at cleanup.
    """

    def __init__(self, testcase):
        self.t = testcase
        self.tmp = tempfile.mkdtemp(prefix="clawdbot-scaling-")
        testcase.addCleanup(shutil.rmtree, self.tmp, True)
        self.nginx_port = reserved_port(testcase)  # the origin is in the gateways' config
        self.origin = f"http://127.0.0.1:{self.nginx_port}"

    def start(self):
        t = self.t
        dsn = pg_database(t)
        prefix = redis_prefix(t)
        ollama = Process([sys.executable, "-m", "testing.fake_ollama", "--port", "0"], env=process_env())
        t.addCleanup(ollama.stop)
        self.idp = IdP().start(clients=[{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [self.origin + "/callback"]}], users=USERS)
        t.addCleanup(self.idp.stop)
        ollama.wait_for("Fake Ollama listening on")
        ollama_url = ollama.stdout().split("Fake Ollama listening on ")[1].split()[0]
        self.gateways = []
        for _ in range(2):
            extra = f"""
backend: {{url: "{ollama_url}"}}
storage: {{backend: postgresql, dsn: "{dsn}"}}
rate_limit:
  backend: redis
  url: "{REDIS_URL}"
  key_prefix: "{prefix}"
  requests_per_minute: {LIMIT}
  per_scope: {{bulk: {{requests_per_minute: 0}}}}
oauth2:
  enabled: true
  provider: oidc
  client_id: {CLIENT_ID}
  client_secret: {CLIENT_SECRET}
  redirect_uri: "{self.origin}/callback"
  issuer_url: "{self.idp.issuer}"
"""
            path = write_config(t, merge_yaml(BASE_CONFIG, extra))
            gateway = Process(clawdbot_argv("start", "--config", path, "--no-debug-port"), env=process_env())
            t.addCleanup(gateway.stop)
            self.gateways.append(gateway)
        for gateway in self.gateways:
            gateway.wait_for("Gateway listening on")
        self.urls = [gateway.url() for gateway in self.gateways]
        self.ports = [int(url.rsplit(":", 1)[1]) for url in self.urls]
        self.start_nginx()
        return self

    def start_nginx(self):
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(prefix=self.tmp, a=self.ports[0], b=self.ports[1], port=self.nginx_port))
        err = os.path.join(self.tmp, "error.log")
        nginx = subprocess.Popen([tool("nginx"), "-p", self.tmp + "/", "-c", conf, "-e", err], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            if nginx.poll() is None:
                nginx.kill()
            nginx.wait()

        self.t.addCleanup(stop)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.nginx_port)) == 0:
                    return
            if nginx.poll() is not None or time.monotonic() > deadline:
                with open(err) as f:
                    raise AssertionError(f"nginx did not start (exit {nginx.poll()}):\n{f.read()[-3000:]}")
            time.sleep(0.05)

    def upstream(self, reply):
        """Which gateway (0 or 1) nginx sent a request to."""
        return self.ports.index(int(reply.header("x-upstream").rsplit(":", 1)[1]))


class MultiInstanceTests(SynchronousTestCase):
    """
    The done-when list of issue 9, against real processes: what a user sees
    does not depend on which gateway answers.
    """

    def test_two_gateways_behind_nginx(self):
        """
        One cluster (two gateway processes, PostgreSQL, Redis, nginx, the
        OIDC provider, a fake Ollama), started once and checked in order:
        shared sessions, a shared budget, a login and logout across
        gateways, then a gateway killed under writes.
        """
        cluster = Cluster(self).start()
        self.check_sessions(cluster)
        self.check_rate_limit(cluster)
        self.check_login_and_logout(cluster)
        self.check_kill(cluster)

    def check_sessions(self, cluster):
        """A session created through one instance is read and renamed through the other (and nginx uses both)."""
        alice = bearer(token(sub="alice"))
        made = call(cluster.origin, "POST", "/v1/sessions", {"title": "Plans"}, alice)
        self.assertEqual(made.status, 201, made.body)
        sid = made.json()["id"]
        creator = cluster.upstream(made)
        other = cluster.urls[1 - creator]
        seen = call(other, "GET", f"/v1/sessions/{sid}", headers=alice)
        self.assertEqual((seen.status, seen.json()["title"]), (200, "Plans"))
        renamed = call(other, "PATCH", f"/v1/sessions/{sid}", {"title": "Plans, renamed"}, alice)
        self.assertEqual((renamed.status, renamed.json()["title"]), (200, "Plans, renamed"))
        back = call(cluster.urls[creator], "GET", f"/v1/sessions/{sid}", headers=alice)
        self.assertEqual((back.status, back.json()["title"]), (200, "Plans, renamed"))
        # Round-robin: consecutive reads through nginx reach both gateways, and both agree.
        reads = [call(cluster.origin, "GET", f"/v1/sessions/{sid}", headers=alice) for _ in range(4)]
        self.assertEqual({cluster.upstream(r) for r in reads}, {0, 1})
        self.assertEqual({r.json()["title"] for r in reads}, {"Plans, renamed"})

    def check_rate_limit(self, cluster):
        """
        One user's request budget holds across both gateways: of 24 model
        calls through nginx (four at a time) at most the budget passes
        (plus what refilled meanwhile), though both gateways answered.
        """
        carol = bearer(token(sub="carol"))
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: call(cluster.origin, "POST", "/v1/chat/completions", {"messages": HI}, carol), range(24)))
        refill = int((time.monotonic() - started) * LIMIT / 60)
        statuses = [r.status for r in replies]
        accepted = statuses.count(200)
        self.assertEqual(set(statuses), {200, 429}, statuses)
        self.assertTrue(LIMIT <= accepted <= LIMIT + refill, (accepted, refill))
        self.assertEqual({cluster.upstream(r) for r in replies}, {0, 1})
        self.assertEqual({r.json()["error"]["code"] for r in replies if r.status == 429}, {"RATE_LIMITED"})
        # Asked directly, both gateways agree the budget is spent.
        for url in cluster.urls:
            self.assertEqual(call(url, "POST", "/v1/chat/completions", {"messages": HI}, carol).status, 429)

    def check_login_and_logout(self, cluster):
        """
        A login started on one gateway completes on the other (the login
        state is a signed cookie, its single use recorded in PostgreSQL);
        the session works on both; a logout on one makes the other refuse
        the refresh cookie.
        """
        a, b = cluster.urls
        begin = call(a, "GET", "/auth/login?next=/")
        self.assertEqual(begin.status, 302, begin.body)
        login_cookie = begin.cookie("clawdbot_login")
        self.assertIsNotNone(login_cookie, begin.headers)
        callback = browserless_login(begin.header("location"), "alice", cookies=http.cookiejar.CookieJar())
        parts = urllib.parse.urlsplit(callback)
        self.assertEqual(f"{parts.scheme}://{parts.netloc}", cluster.origin)
        path = parts.path + "?" + parts.query
        done = call(b, "GET", path, cookies={"clawdbot_login": login_cookie})
        self.assertEqual(done.status, 302, done.body)
        refresh_cookie = done.cookie("clawdbot_refresh")
        self.assertTrue(refresh_cookie)
        # The same callback is refused on the first gateway: single use is shared.
        replay = call(a, "GET", path, cookies={"clawdbot_login": login_cookie})
        self.assertEqual(replay.status, 400)
        self.assertIsNone(replay.cookie("clawdbot_refresh"))

        for url in (a, b):
            fresh = call(url, "POST", "/auth/refresh", headers=XRW, cookies={"clawdbot_refresh": refresh_cookie})
            self.assertEqual(fresh.status, 200, fresh.body)
            for other in (a, b):
                me = call(other, "GET", "/v1/me", headers=bearer(fresh.json()["access_token"]))
                self.assertEqual((me.status, me.json()["sub"]), (200, "alice"))

        out = call(a, "POST", "/auth/logout", headers=XRW, cookies={"clawdbot_refresh": refresh_cookie})
        self.assertEqual(out.status, 200, out.body)
        refused = call(b, "POST", "/auth/refresh", headers=XRW, cookies={"clawdbot_refresh": refresh_cookie})
        self.assertEqual((refused.status, refused.json()["error"]["code"]), (401, "AUTH_INVALID_TOKEN"))
        self.assertEqual(refused.json()["error"]["details"], "the sign-in session was ended")

    def check_kill(self, cluster):
        """
        SIGKILL one gateway while four writers create sessions and talk in
        them through nginx: every write acknowledged before (or after) the
        kill, by either gateway, reads back whole through the survivor.
        """
        writer = bearer(token(sub="wendy", scope="chat:read chat:write bulk"))
        acked = []  # (session id, messages stored, gateway that acknowledged)
        lock = threading.Lock()
        stop = threading.Event()
        failures = []

        def write(n):
            for i in range(40):
                if stop.is_set():
                    return
                made = call(cluster.origin, "POST", "/v1/sessions", {"title": f"w{n}-{i}"}, writer)
                if made.status != 201:
                    failures.append(made.status)
                    continue
                sid = made.json()["id"]
                with lock:
                    acked.append((sid, f"w{n}-{i}", 0, cluster.upstream(made)))
                turn = call(cluster.origin, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI}, writer)
                if turn.status != 200:
                    failures.append(turn.status)
                    continue
                with lock:
                    acked.append((sid, f"w{n}-{i}", 2, cluster.upstream(turn)))

        def wait_until(predicate, timeout=10):
            """Look at C{acked} (under the lock) until C{predicate(acked)} holds or C{timeout} seconds passed."""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with lock:
                    if predicate(acked):
                        return
                time.sleep(0.01)

        victim = 0
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(write, n) for n in range(4)]
            wait_until(lambda acked: sum(1 for a in acked if a[3] == victim) >= 10)
            cluster.gateways[victim].proc.send_signal(signal.SIGKILL)
            cluster.gateways[victim].proc.wait()
            with lock:
                before = len(acked)
            wait_until(lambda acked: len(acked) >= before + 10)
            stop.set()
            for future in running:
                future.result()
        self.assertGreaterEqual(sum(1 for a in acked if a[3] == victim), 10)
        self.assertGreater(len(acked), before)  # nginx went on with the survivor
        # Only requests cut off by the kill may have failed (502 from nginx).
        self.assertLessEqual(len(failures), 4, failures)
        self.assertTrue(set(failures) <= {502}, failures)

        survivor = cluster.urls[1 - victim]
        expected = {}
        for sid, title, count, _ in acked:
            expected[sid] = (title, max(count, expected.get(sid, (None, 0))[1]))
        for sid, (title, count) in expected.items():
            got = call(survivor, "GET", f"/v1/sessions/{sid}", headers=writer)
            self.assertEqual(got.status, 200, (sid, got.body))
            body = got.json()
            self.assertEqual(body["title"], title)
            self.assertGreaterEqual(len(body["messages"]), count, sid)
            if count:
                self.assertEqual([m["role"] for m in body["messages"]], ["user", "assistant"])
