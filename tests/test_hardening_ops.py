"""
Hardening of operations (issue 13): config loading that cannot be made to
hang or crash (#15), an in-memory limiter that a flood of keys cannot reset
(#18), and a /readyz that does not drive Ollama at the caller's pace (#8).
"""

import contextlib
import io
import json
import signal
import time

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot import cli
from clawdbot.ops import runtime as gateway_module
from clawdbot.config import ConfigError, dump_effective, effective, parse_config
from clawdbot.ops.ratelimit import WINDOW, MemoryLimiter
from clawdbot.http.tree import Readiness
from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, Process, clawdbot_argv, closed_port, get_json, merge_yaml, serve, until, write_config

SECRET = "s" * 32
BASE = f'auth: {{jwt: {{secret: "{SECRET}", issuer: "https://sso.example.com", audience: "chat"}}}}\n'

# Seven levels of nine: 9**7 (4.8 million) list items once the aliases are
# followed, from 400 bytes (the loader used to take seconds over it; a few
# levels more take minutes and gigabytes).  Under a key the schema knows, so
# a loader that follows aliases expands it before it can refuse anything.
BOMB = BASE + 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
for _i in range(1, 7):
    BOMB += f"l{_i}: &l{_i} [" + ", ".join([f"*l{_i - 1}"] * 9) + "]\n"
BOMB += "backend: {models: *l6}\n"


def run(coro):
    d = Deferred.fromCoroutine(coro)
    results = []
    d.addBoth(results.append)
    return results[0]


def config_error(text, environ=None):
    """The ConfigError parse_config raises for C{text} (any other exception fails the test)."""
    try:
        parse_config(text, environ or {})
    except ConfigError as e:
        return e
    raise AssertionError(f"no ConfigError for {text!r}")


def check_config(testcase, text, environ=None):
    """(exit code, stdout, stderr) of C{clawdbot check-config}, run in this process."""
    path = write_config(testcase, "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check-config", "--config", path], environ=environ or {})
    return code, out.getvalue(), err.getvalue()


# Texts that once escaped parse_config as something other than a ConfigError
# (RecursionError, ValueError, OverflowError...) or printed a traceback in
# check-config; each must be a ConfigError naming the path when there is one.
BROKEN = {
    "self-referencing alias": (BASE + "backend: {models: &a [*a]}\n", None),
    "merge key": (BASE + "base: &b {url: 'http://x:1'}\nbackend: {<<: *b}\n", None),
    "deep nesting": (BASE + "backend: {models: " + "[" * 5000 + "]" * 5000 + "}\n", None),
    "month 13": (BASE + "timeout: 2024-13-01\n", None),
    "huge integer": (BASE + "max_connections: " + "9" * 5000 + "\n", None),
    "NaN duration": (BASE + "timeout: .nan\n", "timeout"),
    "infinite duration": (BASE + "timeout: .inf\n", "timeout"),
    "NaN number": (BASE + "access_log: {sample_rate: .nan}\n", "access_log.sample_rate"),
    "overflowing size": (BASE + "limits: {max_body: " + "9" * 400 + "MB}\n", "limits.max_body"),
    "port not a number": (BASE + 'server: {listen: "tcp:port=abc"}\n', "server.listen"),
    "superscript port": (BASE + 'server: {listen: "tcp:\u00b2"}\n', "server.listen"),
    "lone surrogate value": (BASE + 'server: {public_url: "\\ud800"}\n', "server.public_url"),
    "lone surrogate key": (BASE + 'backend: {aliases: {"\\udc80": qwen}}\n', "backend.aliases"),
    "lone surrogate unknown key": (BASE + 'backend: {"\\udc80": 1}\n', "backend"),
    "number as key": (BASE + "backend: {aliases: {1: qwen}}\n", "backend.aliases"),
    "huge number as key": (BASE + "backend:\n  ? " + "9" * 5000 + "\n  : 1\n", None),
    "bad IPv6 redirect": (
        BASE
        + 'oauth2: {enabled: true, client_id: c, client_secret: s, redirect_uri: "http://[x/callback", issuer_url: "https://idp.example.com"}\n',
        "oauth2.redirect_uri",
    ),
    "redirect port not a number": (
        BASE
        + 'oauth2: {enabled: true, client_id: c, client_secret: s, redirect_uri: "http://h:x/callback", issuer_url: "https://idp.example.com"}\n',
        "oauth2.redirect_uri",
    ),
}


class AliasTests(SynchronousTestCase):
    def test_alias_bomb_refused_at_once(self):
        """A billion-laughs alias bomb is a ConfigError naming the first anchor's line and column, before any expansion."""
        started = time.perf_counter()
        error = config_error(BOMB)
        print(f"alias bomb refused in {time.perf_counter() - started:.4f}s")
        self.assertIn("aliases are not allowed", str(error))
        self.assertIn("line 2, column 5", str(error))

    def test_every_alias_form_refused(self):
        """Anchors and aliases anywhere (scalars, lists, mappings, merge keys, self-reference) are refused."""
        for text in (
            "a: &a [*a]\n",
            "x: &x 1\n",
            "backend: {url: &u 'http://h:1', model: *u}\n",
            "base: &b {}\nbackend: {<<: *b}\n",
            "backend: *nowhere\n",
        ):
            error = config_error(BASE + text)
            self.assertIn("aliases are not allowed", str(error), text)
            self.assertIsNone(error.path)
            self.assertIn("line 2", str(error))


class LoadFailureTests(SynchronousTestCase):
    def test_every_failure_is_a_config_error(self):
        """Each input that used to escape as another exception is a ConfigError, with its path where one exists."""
        for name, (text, path) in BROKEN.items():
            error = config_error(text)
            if path is not None:
                self.assertEqual(error.path, path, name)
            print(f"{name}: {error}")

    def test_check_config_fails_cleanly_for_each(self):
        """check-config exits 2 with 'config error in FILE: ...' and no traceback for each broken input."""
        for name, (text, path) in list(BROKEN.items()) + [("alias bomb", (BOMB, None))]:
            code, out, err = check_config(self, text)
            self.assertEqual(code, 2, name)
            self.assertEqual(out, "", name)
            self.assertIn("config error in ", err, name)
            self.assertNotIn("Traceback", err, name)
            if path is not None:
                self.assertIn(path, err, name)

    def test_environment_value_that_is_not_utf8(self):
        """An environment value holding undecodable bytes (a lone surrogate in Python) is a ConfigError naming where it was used."""
        error = config_error(BASE + 'server: {public_url: "${URL}"}\n', {"URL": "https://h\udcff"})
        self.assertEqual(error.path, "server.public_url")
        code, _, err = check_config(self, BASE + 'oauth2: {client_secret: "${S}"}\n', {"S": "x\udcff"})
        self.assertEqual(code, 2)
        self.assertIn("oauth2.client_secret", err)

    def test_oversized_file_refused(self):
        """A config file over 1 MiB (or an endless one) is refused before it is parsed."""
        code, _, err = check_config(self, BASE + "# " + "x" * (1024 * 1024) + "\n")
        self.assertEqual(code, 2)
        self.assertIn("larger than 1024 KiB", err)

    def test_alias_bomb_in_a_real_process(self):
        """clawdbot check-config on an alias bomb exits non-zero at once with a one-line message."""
        path = write_config(self, BOMB)
        proc = Process(clawdbot_argv("check-config", "--config", path))
        started = time.perf_counter()
        code = proc.proc.wait(60)
        print(f"check-config on the bomb took {time.perf_counter() - started:.2f}s")
        err = proc.stderr()
        proc.stop()
        self.assertEqual(code, 2)
        self.assertIn("YAML anchors and aliases are not allowed", err)
        self.assertNotIn("Traceback", err)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"\\?,# \n\t.0123456789\u00b2\ud800")), max_size=80))
    def test_arbitrary_text_only_config_errors(self, text):
        """Any text, YAML or not, either loads or raises ConfigError; never another exception."""
        try:
            parse_config(BASE + text, {})
        except ConfigError:
            pass

    values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=12)
        | st.sampled_from(["30s", "5m", "10MB", "tcp:0", "http://h:1", "${X}", "${X:-d}", "memory", "dev"]),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3),
        max_leaves=8,
    )
    section_names = st.sampled_from(
        ["server", "backend", "storage", "history", "access_log", "limits", "images", "oauth2", "rate_limit", "metrics", "log", "timeout", "x"]
    )
    keys = st.sampled_from(
        ["mode", "listen", "url", "urls", "model", "models", "aliases", "max_body", "per_team", "per_scope", "requests_per_minute", "sample_rate", "path", "dsn", "level"]
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(section_names, st.dictionaries(keys, values, max_size=3) | values, max_size=3), st.sampled_from([{}, {"X": "v"}, {"X": ""}]))
    def test_arbitrary_trees_load_or_fail_cleanly(self, tree, environ):
        """Arbitrary values under real keys either load (and check-config can print them) or raise ConfigError."""
        text = BASE + yaml.safe_dump(tree, allow_unicode=True)
        try:
            config = parse_config(text, environ)
        except ConfigError as e:
            str(e)
            return
        yaml.safe_load(dump_effective(config))


class EffectiveTests(SynchronousTestCase):
    RULES = BASE + (
        "rate_limit: {requests_per_minute: 60, per_team: {interns: {requests_per_minute: 5, tokens_per_minute: 100}},"
        " per_scope: {admin: {requests_per_minute: 0}}}\n"
    )

    def test_effective_renders_rules_in_mappings(self):
        """per_team / per_scope rules (dataclasses inside mappings) come out as plain mappings with every key."""
        tree = effective(parse_config(self.RULES, {}))
        self.assertEqual(tree["rate_limit"]["per_team"], {"interns": {"requests_per_minute": 5, "tokens_per_minute": 100}})
        self.assertEqual(tree["rate_limit"]["per_scope"], {"admin": {"requests_per_minute": 0, "tokens_per_minute": None}})

    def test_check_config_prints_rules(self):
        """check-config prints a config with per_team and per_scope rules (it used to crash with RepresenterError)."""
        code, out, err = check_config(self, self.RULES)
        self.assertEqual(code, 0, err)
        printed = yaml.safe_load(out)
        self.assertEqual(printed["rate_limit"]["per_team"]["interns"]["tokens_per_minute"], 100)
        self.assertEqual(printed["rate_limit"]["per_scope"]["admin"]["requests_per_minute"], 0)
        self.assertEqual(printed["auth"]["jwt"]["secret"], "********")

    def test_printed_config_loads_back(self):
        """What check-config prints for a config with rules is itself a valid config giving the same result."""
        config = parse_config(self.RULES, {})
        again = parse_config(dump_effective(config).replace("'********'", f'"{SECRET}"'), {})
        self.assertEqual(again.rate_limit, config.rate_limit)


class ReloadFailureTests(TestCase):
    timeout = 60

    def watch_log(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def error_count(self, gw):
        text = gw.parts.metrics.render().decode()
        for line in text.splitlines():
            if line.startswith('clawdbot_config_reloads_total{result="error"}'):
                return float(line.split()[-1])
        return 0.0

    def test_self_referencing_alias_is_a_counted_failed_reload(self):
        """A reload of a file with a self-referencing alias keeps the config, counts an error and logs it with the path."""
        gw = serve(self)
        before = gw.parts.runtime.config
        events = self.watch_log()
        with open(gw.config_path, "a") as f:
            f.write("x: &a [*a]\n")
        self.assertFalse(gw.parts.runtime.reload())
        self.assertIs(gw.parts.runtime.config, before)
        self.assertEqual(gw.parts.runtime.reloads["error"], 1)
        self.assertEqual(self.error_count(gw), 1.0)
        failed = [e for e in events if e.get("log_format", "").startswith("Config reload failed")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["file"], gw.config_path)
        self.assertIn("aliases are not allowed", failed[0]["error"])

    def test_any_exception_in_reload_is_counted(self):
        """Whatever raises inside a reload (here a bug in restart_needed), the failure is counted and logged, never raised."""
        gw = serve(self)
        events = self.watch_log()

        def broken(old, new):
            raise TypeError("a bug")

        self.patch(gateway_module, "restart_needed", broken)
        self.assertFalse(gw.parts.runtime.reload())
        self.assertEqual(gw.parts.runtime.reloads, {"ok": 0, "error": 1})
        self.assertEqual(self.error_count(gw), 1.0)
        failed = [e for e in events if e.get("log_format", "").startswith("Config reload failed")]
        self.assertEqual([e["file"] for e in failed], [gw.config_path])
        self.flushLoggedErrors(TypeError)

    def test_signal_path_never_raises(self):
        """The callFromThread target of SIGHUP swallows even an exception from reload itself, counting it."""
        gw = serve(self)
        calls = []

        class Recorder:
            def callFromThread(self, f, *args):
                calls.append((f, args))

        real = gw.parts.runtime.reactor
        gw.parts.runtime.reactor = Recorder()
        try:
            gw.parts.runtime.request_reload()
            gw.parts.runtime.request_reload()  # coalesced
        finally:
            gw.parts.runtime.reactor = real
        self.assertEqual(len(calls), 1)

        def boom():
            raise RuntimeError("a bug")

        self.patch(gw.parts.runtime, "reload", boom)
        f, args = calls[0]
        f(*args)
        self.assertEqual(gw.parts.runtime.reloads["error"], 1)
        self.assertFalse(gw.parts.runtime._reload_pending)
        self.flushLoggedErrors(RuntimeError)

    def test_sighup_with_self_referencing_alias(self):
        """A real SIGHUP reload of a self-referencing alias logs 'Config reload failed' with no traceback, and the gateway serves on."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        path = write_config(self, merge_yaml(BASE_CONFIG, f'backend: {{url: "{fake.url}"}}'))
        proc = Process(clawdbot_argv("start", "--config", path, "--no-debug-port"))
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        url = proc.url()
        with open(path, "a") as f:
            f.write("x: &a [*a]\n")
        proc.signal(signal.SIGHUP)
        err = proc.wait_for("Config reload failed", stream="stderr")
        self.assertIn(path, err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("Unhandled", err)
        return ensureDeferred(self._still_serving(url))

    async def _still_serving(self, url):
        status, _, _ = await get_json(url + "/healthz")
        self.assertEqual(status, 200)


# --- the in-memory limiter ---------------------------------------------------------


class LimiterEvictionTests(SynchronousTestCase):
    def test_address_flood_keeps_user_budgets(self):
        """A flood of sign-in addresses, far past the cap, leaves a user's spent request budget spent."""
        clock = Clock()
        limiter = MemoryLimiter(clock, max_keys=100, max_address_keys=100)
        for _ in range(3):
            self.assertTrue(run(limiter.take("alice", 3)).allowed)
        self.assertFalse(run(limiter.take("alice", 3)).allowed)
        for n in range(10_000):
            run(limiter.take(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 30, kind="auth-ip"))
        self.assertFalse(run(limiter.take("alice", 3)).allowed)
        self.assertLessEqual(len(limiter.addresses), 100)

    def test_address_flood_keeps_a_spent_address_spent(self):
        """A flood of new addresses cannot evict an address that has spent its sign-in budget (it refills last)."""
        clock = Clock()
        limiter = MemoryLimiter(clock, max_address_keys=100)
        for _ in range(30):
            run(limiter.take("198.51.100.7", 30, kind="auth-ip"))
        self.assertFalse(run(limiter.take("198.51.100.7", 30, kind="auth-ip")).allowed)
        for n in range(5_000):
            clock.advance(0.0001)  # 0.5s in all: the spent address refills a quarter of one request
            run(limiter.take(f"flood-{n}", 30, kind="auth-ip"))
        self.assertFalse(run(limiter.take("198.51.100.7", 30, kind="auth-ip")).allowed)

    def test_debt_outlives_a_flood_of_users(self):
        """A token bucket in debt survives more new principals than the cap while others refill sooner."""
        clock = Clock()
        limiter = MemoryLimiter(clock, max_keys=100)
        run(limiter.spend("alice", 600, 1800, "tokens"))
        for n in range(1_000):
            clock.advance(0.01)
            run(limiter.take(f"user{n}", 60))
        refused = run(limiter.peek("alice", 600, "tokens"))
        self.assertFalse(refused.allowed)
        self.assertLessEqual(len(limiter.principals), 100)

    def test_refilled_buckets_go_first(self):
        """At the cap, a bucket that has refilled is dropped before one still refilling, even if used less recently."""
        clock = Clock()
        limiter = MemoryLimiter(clock, max_keys=100)
        run(limiter.take("spent", 2))
        run(limiter.take("spent", 2))  # empty: full again 60s from now
        clock.advance(1)
        for n in range(99):
            run(limiter.take(f"idle{n}", 600))  # full again after 0.1s
        clock.advance(1)
        run(limiter.take("newcomer", 600))
        self.assertIn(("requests", "spent"), limiter.principals)
        self.assertEqual(len(limiter.principals), 100)
        self.assertFalse(run(limiter.take("spent", 2)).allowed)

    def test_no_bucket_is_cleared_wholesale(self):
        """At the cap, one bucket goes per new key: the others keep their state (the old limiter cleared them all)."""
        clock = Clock()
        limiter = MemoryLimiter(clock, max_keys=100)
        for n in range(100):
            run(limiter.take(f"user{n}", 1))
        run(limiter.take("newcomer", 1))
        # One bucket went (user0: of equals, the least recently changed);
        # every other user's spent budget is still spent.
        self.assertNotIn(("requests", "user0"), limiter.principals)
        refused = [not run(limiter.take(f"user{n}", 1)).allowed for n in range(1, 100)]
        self.assertEqual(refused, [True] * 99)

    LIMITS = {"requests": 3, "tokens": 10, "auth-ip": 2}

    ops = st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.5, 3.0, 20.0, 61.0]),
            st.sampled_from(["requests", "tokens", "auth-ip"]),
            st.integers(0, 5),
            st.sampled_from(["take", "peek", "spend"]),
            st.integers(1, 15),
        ),
        max_size=80,
    )

    @settings(max_examples=400, deadline=None)
    @given(ops, st.integers(1, 4))
    def test_capped_agrees_with_unbounded_until_state_must_be_lost(self, ops, cap):
        """
        A capped limiter decides exactly as an unbounded one until a new key
        arrives while every bucket of its store is still refilling (only then
        can forgetting one forgive anything); each store is judged on its
        own, so address keys never change principal decisions; the cap is
        never exceeded.
        """
        clock = Clock()
        capped = MemoryLimiter(clock, max_keys=cap, max_address_keys=cap)
        reference = MemoryLimiter(clock, max_keys=10**6, max_address_keys=10**6)
        lossy = {"principals": False, "addresses": False}
        for dt, kind, n, op, cost in ops:
            clock.advance(dt)
            now = clock.seconds()
            key = f"k{n}"
            name = "addresses" if kind == "auth-ip" else "principals"
            store, ref_store = getattr(capped, name), getattr(reference, name)
            if (kind, key) not in store and len(store) >= cap:
                still_refilling = [
                    k
                    for k, b in ref_store.buckets.items()
                    if k != (kind, key) and b.level + max(0.0, now - b.stamp) * self.LIMITS[k[0]] / WINDOW < self.LIMITS[k[0]]
                ]
                if len(still_refilling) >= cap:
                    lossy[name] = True
            limit = self.LIMITS[kind]
            if op == "take" or kind == "auth-ip":
                results = [run(x.take(key, limit, cost, kind)) for x in (capped, reference)]
            elif op == "peek":
                results = [run(x.peek(key, limit, kind)) for x in (capped, reference)]
            else:
                results = [run(x.spend(key, limit, cost, kind)) for x in (capped, reference)]
            if not lossy[name]:
                self.assertEqual(results[0], results[1], (kind, key, op))
            self.assertLessEqual(len(store), cap)


# --- /readyz -------------------------------------------------------------------------


class StubBackend:
    def __init__(self):
        self.pending = []

    def check(self):
        d = Deferred()
        self.pending.append(d)
        return d


class StubGateway:
    def __init__(self):
        self.reactor = Clock()
        self.config = object()
        self.backend = StubBackend()
        self.up = []

        class Gauge:
            def set(gauge, value):
                self.up.append(value)

        class Labelled:
            def labels(gauge, name):
                return type("Child", (), {"set": lambda child, value: None})()

        self.metrics = type("Metrics", (), {"backend_up": Gauge(), "dependency_up": Labelled()})()


class ReadinessUnitTests(SynchronousTestCase):
    def test_concurrent_checks_coalesce(self):
        """Ten callers while a check is under way share that one check and all get its answer."""
        gw = StubGateway()
        readiness = Readiness(gw, gw.backend, gw.metrics)
        waits = [Deferred.fromCoroutine(readiness.reason()) for _ in range(10)]
        self.assertEqual(len(gw.backend.pending), 1)
        gw.backend.pending[0].callback("not reachable")
        self.assertEqual([self.successResultOf(d) for d in waits], ["not reachable"] * 10)
        self.assertEqual(gw.up, [0])

    def test_answer_cached_for_the_ttl_then_asked_again(self):
        """An answer (ready or not) is reused for TTL seconds; after that, or after a reload, the backend is asked again."""
        gw = StubGateway()
        readiness = Readiness(gw, gw.backend, gw.metrics)
        first = Deferred.fromCoroutine(readiness.reason())
        gw.backend.pending[0].callback(None)
        self.assertIsNone(self.successResultOf(first))
        gw.reactor.advance(Readiness.TTL - 0.01)
        for _ in range(50):
            self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(readiness.reason())))
        self.assertEqual(len(gw.backend.pending), 1)
        gw.reactor.advance(0.01)
        again = Deferred.fromCoroutine(readiness.reason())
        self.assertEqual(len(gw.backend.pending), 2)
        gw.backend.pending[1].callback(None)
        self.successResultOf(again)
        gw.config = object()  # a reload
        Deferred.fromCoroutine(readiness.reason())
        self.assertEqual(len(gw.backend.pending), 3)

    def test_a_caller_leaving_does_not_cancel_the_check(self):
        """A caller that goes away (its wait cancelled) leaves the shared check and the other callers' answers intact."""
        gw = StubGateway()
        readiness = Readiness(gw, gw.backend, gw.metrics)
        leaving = Deferred.fromCoroutine(readiness.reason())
        staying = Deferred.fromCoroutine(readiness.reason())
        leaving.cancel()
        self.failureResultOf(leaving)
        gw.backend.pending[0].callback(None)
        self.assertIsNone(self.successResultOf(staying))

    def test_failure_is_shared_but_not_cached(self):
        """A check that raises fails its waiters once; the next call checks again."""
        gw = StubGateway()
        readiness = Readiness(gw, gw.backend, gw.metrics)
        waits = [Deferred.fromCoroutine(readiness.reason()) for _ in range(3)]
        gw.backend.pending[0].errback(RuntimeError("bug"))
        for d in waits:
            self.failureResultOf(d, RuntimeError)
        Deferred.fromCoroutine(readiness.reason())
        self.assertEqual(len(gw.backend.pending), 2)


class ReadinessHTTPTests(TestCase):
    timeout = 60

    async def test_readyz_flood_makes_one_backend_call(self):
        """50 concurrent and 100 sequential unauthenticated /readyz calls reach Ollama once; after the TTL, once more."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        gw = serve(self, extra=f'backend: {{url: "{fake.url}"}}')
        clock = Clock()
        gw.parts.readiness.clock = clock
        # (The start-up check asks once on its own: counted before.)
        await until(lambda: any("Ollama at" in line for line in gw.said), what="the start-up check")
        before = len(fake.requests_to("/api/version"))
        results = await gatherResults([ensureDeferred(get_json(gw.url + "/readyz")) for _ in range(50)])
        for _ in range(100):
            results.append(await get_json(gw.url + "/readyz"))
        self.assertEqual({status for status, _, _ in results}, {200})
        self.assertEqual({body["status"] for _, _, body in results}, {"ready"})
        calls = len(fake.requests_to("/api/version")) - before
        print(f"150 /readyz -> {calls} /api/version")
        self.assertEqual(calls, 1)
        clock.advance(Readiness.TTL)
        status, _, body = await get_json(gw.url + "/readyz")
        self.assertEqual(status, 200)
        self.assertEqual(len(fake.requests_to("/api/version")) - before, 2)

    async def test_not_ready_answer_is_cached_too(self):
        """With Ollama down, repeated /readyz answer 503 with the reason from one check."""
        gw = serve(self, extra=f'backend: {{url: "http://127.0.0.1:{closed_port(self)}"}}')
        readiness = gw.parts.readiness
        readiness.clock = Clock()
        statuses = []
        for _ in range(20):
            status, _, body = await get_json(gw.url + "/readyz")
            statuses.append(status)
        self.assertEqual(set(statuses), {503})
        self.assertIn("Ollama", body["reason"])
        self.assertEqual(readiness.checks, 1)
        self.assertEqual(json.loads(json.dumps(body))["checks"]["backend"], body["reason"].split(": ", 1)[1])


class DuplicateKeyTests(SynchronousTestCase):
    def test_a_key_written_twice_is_refused(self):
        """A key written twice in one mapping is a config error naming it and its line, not a silent last-wins."""
        for text in ("auth:\n  jwt:\n    issuer: a\n    issuer: b\n", "server: {mode: dev, mode: production}\n", "backend: {}\nbackend: {}\n"):
            with self.assertRaises(ConfigError) as caught:
                parse_config(text, {})
            self.assertIn("appears twice", str(caught.exception))
            self.assertIn("line", str(caught.exception))


class RenovationReviewTests(SynchronousTestCase):
    """What a review of the composition root found, kept fixed."""

    def test_stopping_does_not_wait_for_a_health_check(self):
        """A backend check under way (one that never answers) is cancelled at stop, without a log line: the drain is not held up."""
        from clawdbot.ops.health import health_checks

        class Stuck:
            async def check(self):
                await Deferred()

        class Metrics:
            class backend_up:
                @staticmethod
                def set(value):
                    raise AssertionError("a cancelled check sets nothing")

        clock = Clock()
        timer = health_checks(Stuck(), Metrics, 5.0, clock)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        timer.startService()
        self.assertIsNotNone(timer.running_check)
        self.successResultOf(timer.stopService())
        self.assertEqual([e for e in logged if e.get("log_failure")], [])

    def test_timestamps_round_as_a_whole(self):
        """A fraction that rounds up carries into the seconds (never a stamp nearly a second early)."""
        from clawdbot.units import rfc3339

        self.assertEqual(rfc3339(1700000000.9996), "2023-11-14T22:13:21.000Z")
        self.assertEqual(rfc3339(1700000000.9994), "2023-11-14T22:13:20.999Z")
        self.assertEqual(rfc3339(1.25, 6), "1970-01-01T00:00:01.250000Z")
        self.assertEqual(rfc3339(59.9999996, 6), "1970-01-01T00:01:00.000000Z")

    def test_a_caller_leaving_a_shared_fetch_leaves_the_others(self):
        """SingleFlight: the caller that started a fetch going away cancels only its own wait; the fetch and the others' answers go on."""
        from clawdbot.auth.cache import SingleFlight

        pending = []

        async def fetch():
            d = Deferred()
            pending.append(d)
            return await d

        flight = SingleFlight(fetch)
        first = Deferred.fromCoroutine(flight())
        second = Deferred.fromCoroutine(flight())
        first.cancel()
        self.failureResultOf(first)
        self.assertEqual(len(pending), 1)
        pending[0].callback("keys")
        self.assertEqual(self.successResultOf(second), "keys")
        third = Deferred.fromCoroutine(flight())
        self.assertEqual(len(pending), 2)  # a new fetch once the last one ended
        pending[1].errback(RuntimeError("down"))
        self.failureResultOf(third, RuntimeError)
