"""
Dependencies that fall over (issue 24): a private PostgreSQL and a private
Redis, each killed with SIGKILL under traffic and started again, and a
SQLite file that is locked, full, or cannot be written.

The gateway answers 503 C{STORAGE_UNAVAILABLE} with C{Retry-After} while its
database cannot answer (a stream that has started ends with that error
event), never a 500 and never a hang; it is back within 2 s of the database
accepting connections; and a turn it acknowledged (a 200 whose stream ended
with C{[DONE]}) is in the history afterwards.  Redis outages follow
C{rate_limit.on_backend_error}.

The servers are real: PostgreSQL from C{/usr/lib/postgresql/*/bin} (run as
the C{postgres} user, as C{initdb} refuses root), C{redis-server}, and for
the full disk a small tmpfs.  A missing tool fails the test.
"""

import glob
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time

import psycopg
import redis
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.portforward import ProxyClient, ProxyClientFactory, ProxyFactory, ProxyServer

from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, Backed, Process, bearer, clawdbot_argv, merge_yaml, reserved_port, stream_call, token, write_config

# No request may take longer than this, outage or not (the pool's wait
# and SQLite's busy timeout are a few seconds).
BOUND = 30.0
# The gateway is back this soon after its dependency accepts connections.
RECOVERY = 2.0


def tool(name, where=None):
    """The path of a command (in C{where} when given); a missing one fails the test."""
    found = shutil.which(name, path=where) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise AssertionError(f"{name} is not installed (tests/setup-deps.sh installs it)")
    return found


def pg_bin():
    """The newest PostgreSQL server's bin folder."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    if not found:
        raise AssertionError("no PostgreSQL server in /usr/lib/postgresql/*/bin (tests/setup-deps.sh installs it)")
    return found[-1]


def as_postgres():
    """The argv prefix that runs a command as the C{postgres} user, in place (no child left between)."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise AssertionError("there is no postgres user (the PostgreSQL server package makes it)") from None
    return [tool("setpriv"), "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


class PrivatePostgres:
    """
    A PostgreSQL cluster of the test's own, in a temporary folder, on a
    port kept for it; L{kill} is SIGKILL of the postmaster (its backends
    see it gone: "terminating connection due to unexpected postmaster
    exit"), L{start} brings it back on the same files and port.
    """

    def __init__(self, testcase):
        self.bin = pg_bin()
        self.prefix = as_postgres()
        self.dir = tempfile.mkdtemp(prefix="clawdbot-pg-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        entry = pwd.getpwnam("postgres")
        os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.port = reserved_port(testcase)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.proc = None
        subprocess.run(
            self.prefix + [os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        testcase.addCleanup(self.stop)

    def start(self, timeout=60.0):
        """Start the server (again); returns once it accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            log = open(os.path.join(self.dir, "server.log"), "ab")
            self.proc = subprocess.Popen(
                self.prefix
                + [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.dir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            log.close()
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.accepts():
                    return
                time.sleep(0.05)
            if self.proc.poll() is None or time.monotonic() >= deadline:
                raise AssertionError("the private PostgreSQL did not start: " + self.log()[-2000:])
            # Exited at once: the killed server's backends still hold its
            # shared memory for a moment; try again.
            time.sleep(0.2)

    def accepts(self):
        try:
            with psycopg.connect(self.dsn, connect_timeout=1) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def log(self):
        with open(os.path.join(self.dir, "server.log"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self):
        """SIGKILL of the postmaster alone, as a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def pids(self):
        """The postmaster and its children (its backends and workers: they start sessions of their own, so not a process group)."""
        found = [self.proc.pid]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    found.append(int(entry))
        return found

    def hang(self, testcase):
        """SIGSTOP of every process of the server: the kernel still accepts and acknowledges, nothing answers."""
        testcase.addCleanup(self.resume)
        for pid in self.pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self):
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self):
        if self.proc is not None:
            # The postmaster and whatever backends are left, at once.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


class PrivateRedis:
    """A C{redis-server} of the test's own (nothing saved), on a port kept for it."""

    def __init__(self, testcase):
        self.binary = tool("redis-server")
        self.port = reserved_port(testcase)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        testcase.addCleanup(self.stop)

    def start(self, timeout=30.0):
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.accepts():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("the private Redis did not start")
            time.sleep(0.05)

    def accepts(self):
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return client.ping()
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- calls, each bounded and recorded ------------------------------------------


class Answer:
    """One call's outcome: status, parsed error (or body), the headers, the stream's bytes."""

    def __init__(self, what, status, headers, raw, seconds):
        self.what = what
        self.status = status
        self.headers = headers
        self.raw = raw
        self.seconds = seconds
        try:
            self.body = json.loads(raw) if raw and not raw.startswith(b"data:") else None
        except ValueError:
            self.body = None

    @property
    def code(self):
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"].get("code")
        return None

    def events(self):
        """The stream's JSON events (C{[DONE]} left out)."""
        out = []
        for block in self.raw.split(b"\n\n"):
            if block.startswith(b"data: ") and block != b"data: [DONE]":
                out.append(json.loads(block[len(b"data: ") :]))
        return out

    @property
    def stream_error(self):
        """The code of the stream's error event, or C{None}."""
        for event in self.events():
            if isinstance(event.get("error"), dict):
                return event["error"].get("code")
        return None

    @property
    def complete(self):
        """A 200 stream that ended with C{[DONE]} and no error event: an acknowledged turn."""
        return self.status == 200 and self.raw.endswith(b"data: [DONE]\n\n") and self.stream_error is None

    def __repr__(self):
        return f"<{self.what}: {self.status} {self.code or self.stream_error} {self.raw[:160]!r} in {self.seconds:.2f}s>"


async def call(what, method, url, headers, body=None):
    """A bounded call; a call still unanswered after L{BOUND} seconds fails the test."""
    hdrs = dict(headers)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    started = time.monotonic()
    d = treq.request(method, url, headers=hdrs, data=data, persistent=False)
    d.addCallback(lambda response: treq.content(response).addCallback(lambda raw: (response, raw)))
    d.addTimeout(BOUND, reactor)
    try:
        response, raw = await d
    except Exception as e:
        raise AssertionError(f"{what}: no answer within {BOUND} s ({type(e).__name__})") from None
    return Answer(what, response.code, response.headers, raw, time.monotonic() - started)


def turn_body(sid, text, stream=True):
    return {"model": "qwen3:32b", "session_id": sid, "stream": stream, "messages": [{"role": "user", "content": text}]}


class OutageCase(Backed):
    """A gateway in front of a fake Ollama, with the checks every outage test makes."""

    timeout = 240

    def setUp(self):
        self.answers = []

    def auth(self, sub="alice"):
        return bearer(token(sub=sub, scope="chat:read chat:write"))

    async def call(self, what, method, path, headers, body=None):
        answer = await call(what, method, self.gw.url + path, headers, body)
        self.answers.append(answer)
        return answer

    async def new_session(self, headers, title="outage"):
        made = await self.call("create", "POST", "/v1/sessions", headers, {"title": title})
        self.assertEqual(made.status, 201, made)
        return made.body["id"]

    def storage_log(self):
        """The store's log lines from now on (a list that fills as they come)."""
        said = []

        def observe(event):
            if event.get("log_namespace") == "clawdbot.storage":
                said.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return said

    def assert_unavailable(self, answer, code="STORAGE_UNAVAILABLE"):
        """A 503 in the error shape with C{Retry-After}."""
        self.assertEqual((answer.status, answer.code), (503, code), answer)
        error = answer.body["error"]
        self.assertEqual(error["type"], "server_error")
        self.assertTrue(error["message"] and error["details"], answer)
        self.assertNotIn("Traceback", answer.raw.decode("utf-8", "replace"))
        retry = answer.headers.getRawHeaders(b"retry-after")
        self.assertTrue(retry and retry[0].isdigit(), answer)

    def assert_no_500(self):
        for answer in self.answers:
            self.assertTrue(answer.status < 500 or answer.status == 503, answer)
            self.assertNotEqual(answer.stream_error, "INTERNAL_ERROR", answer)
            self.assertNotEqual(answer.code, "INTERNAL_ERROR", answer)
            self.assertLess(answer.seconds, BOUND, answer)

    async def traffic(self, headers, sessions, key, stop, tag):
        """
        One client's loop until C{stop} is set: a streamed turn, a whole
        turn, its session read back, the keys listed, the models through
        an API key; every answer recorded (the test checks them all).
        """
        n = 0
        while not stop:
            for sid in sessions:
                n += 1
                await self.call(f"{tag} stream {n}", "POST", "/v1/chat/completions", headers, turn_body(sid, f"{tag}-s{n}"))
                await self.call(f"{tag} whole {n}", "POST", "/v1/chat/completions", headers, turn_body(sid, f"{tag}-w{n}", stream=False))
                await self.call(f"{tag} read {n}", "GET", f"/v1/sessions/{sid}", headers)
                await self.call(f"{tag} keys {n}", "GET", "/v1/keys", headers)
                await self.call(f"{tag} by key {n}", "GET", "/v1/models", bearer(key))
                await deferLater(reactor, 0.02)

    async def acknowledged_turns_kept(self, headers, sessions, tag):
        """Every turn of the client C{tag} answered 200 (a stream that ended with [DONE]) is in its sessions' history."""
        stored = ""
        for sid in sessions:
            got = await call("history", "GET", f"{self.gw.url}/v1/sessions/{sid}", headers)
            self.assertEqual(got.status, 200, got)
            stored += json.dumps([m["content"] for m in got.body["messages"]])
        acked = 0
        for answer in self.answers:
            if not answer.what.startswith(tag + " "):
                continue
            if (" stream " in answer.what and answer.complete) or (" whole " in answer.what and answer.status == 200):
                tag, kind, n = answer.what.split()
                marker = f"{tag}-{kind[0]}{n}"
                self.assertIn(json.dumps(marker), stored, f"{answer} was acknowledged but is not in the history")
                acked += 1
        return acked


class PostgresOutageTests(OutageCase):
    """PostgreSQL killed with SIGKILL under traffic, and started again."""

    async def test_postgres_killed_under_traffic(self):
        """
        No 500 and no hang while PostgreSQL is down; a stream under way ends
        with a STORAGE_UNAVAILABLE event, other calls are 503
        STORAGE_UNAVAILABLE with Retry-After; the gateway is back within
        2 s of the database accepting connections, and every acknowledged
        turn is in the history.
        """
        pg = PrivatePostgres(self)
        await deferToThreadSafe(pg.start)
        said = self.storage_log()
        fake = FakeOllama()
        self.start(f'storage: {{backend: postgresql, dsn: "{pg.dsn}"}}\nusage: {{flush_interval: 1s}}\nrate_limit: {{requests_per_minute: 0}}', fake=fake)
        alice, bob = self.auth("alice"), self.auth("bob")
        made = await self.call("key", "POST", "/v1/keys", alice, {"name": "outage"})
        self.assertEqual(made.status, 201, made)
        key = made.body["key"]
        mine = [await self.new_session(alice), await self.new_session(alice)]
        theirs = [await self.new_session(bob)]

        # Traffic from two clients the whole time.
        stop = []
        loops = [Deferred.fromCoroutine(self.traffic(alice, mine, key, stop, "a")), Deferred.fromCoroutine(self.traffic(bob, theirs, key, stop, "b"))]
        await deferLater(reactor, 1.0)

        # A stream under way when the database goes: held after its first lines.
        held_sid = await self.new_session(alice)
        fake.behave(times=1, hold=2)
        held = stream_call(self.gw.url + "/v1/chat/completions", turn_body(held_sid, "held turn"), alice)
        await held.when_seen(b"data: ")
        await deferToThreadSafe(pg.kill)
        fake.release()
        status, raw = await held.done
        ended = Answer("held", status, None, raw, 0.0)
        self.assertEqual(status, 200)
        self.assertEqual(ended.stream_error, "STORAGE_UNAVAILABLE", ended)
        self.assertFalse(raw.endswith(b"data: [DONE]\n\n"))

        # During the outage, each kind of call: 503 STORAGE_UNAVAILABLE.
        sid = mine[0]
        for what, method, path, body in [
            ("outage read", "GET", f"/v1/sessions/{sid}", None),
            ("outage list", "GET", "/v1/sessions", None),
            ("outage turn", "POST", "/v1/chat/completions", turn_body(sid, "outage turn")),
            ("outage keys", "GET", "/v1/keys", None),
            ("outage usage", "GET", "/v1/usage", None),
        ]:
            self.assert_unavailable(await self.call(what, method, path, alice, body))
        # A key this instance has not seen yet cannot be looked up.
        unknown = await self.call("outage unknown key", "GET", "/v1/models", bearer("cb-" + "A" * 43))
        self.assert_unavailable(unknown)

        await deferToThreadSafe(pg.start)
        back = time.monotonic()
        # Back within RECOVERY seconds of accepting connections.
        while True:
            answer = await self.call("recovery read", "GET", f"/v1/sessions/{sid}", alice)
            if answer.status == 200:
                break
            self.assert_unavailable(answer)
            if time.monotonic() - back > RECOVERY:
                self.fail(f"not back {RECOVERY} s after PostgreSQL accepted connections: {answer}")
            await deferLater(reactor, 0.05)
        # (Measured, for the record: python -m pytest -s shows it.)
        codes = sorted({(a.status, a.code or a.stream_error) for a in self.answers}, key=str)
        print(f"PostgreSQL outage: back {time.monotonic() - back:.2f} s after the database accepted connections; "
              f"{len(self.answers)} calls, answers {codes}, slowest {max(a.seconds for a in self.answers):.2f} s")
        await deferLater(reactor, 1.0)
        stop.append(True)
        await gatherResults(loops)

        self.assert_no_500()
        self.assertTrue(any(a.code == "STORAGE_UNAVAILABLE" for a in self.answers if a.what[0] in "ab"), "the traffic never met the outage")
        # One warning for the outage and one line for its end, not one per
        # request (and the notification connection's one warning).
        heads = [text.split(" (")[0].split(":")[0] for text in said]
        self.assertEqual([h for h in heads if h.startswith("History")], ["History storage unavailable", "History storage is back"], said)
        self.assertLessEqual(heads.count("The notification connection to PostgreSQL failed"), 1, said)
        acked = await self.acknowledged_turns_kept(alice, mine, "a")
        acked += await self.acknowledged_turns_kept(bob, theirs, "b")
        self.assertGreater(acked, 0)
        # The held turn was not acknowledged: it is not reported as stored.
        history = await call("held history", "GET", f"{self.gw.url}/v1/sessions/{held_sid}", alice)
        self.assertEqual(history.status, 200, history)
        replies = [m for m in history.body["messages"] if m["role"] == "assistant" and not m["incomplete"]]
        self.assertEqual(replies, [], history)
        # Everything works again: a turn is kept.
        after = await self.call("after", "POST", "/v1/chat/completions", alice, turn_body(sid, "after the outage"))
        self.assertTrue(after.complete, after)


class ReadOnlyPostgresTests(OutageCase):
    """A PostgreSQL made read-only under a gateway (ALTER SYSTEM SET default_transaction_read_only), and writable again."""

    timeout = 120

    async def until(self, what, check, seconds=15.0):
        """Call C{check()} (a coroutine) until it answers true; fails after C{seconds}."""
        deadline = time.monotonic() + seconds
        while True:
            got = await check()
            if got:
                return got
            if time.monotonic() > deadline:
                self.fail(f"{what}: not within {seconds:g} s")
            await deferLater(reactor, 0.1)

    async def test_read_only_is_one_state(self):
        """
        Writes answer 503 STORAGE_UNAVAILABLE and reads 200 while the
        server is read-only; the log says so once when it starts and once
        when a write succeeds again (never an outage and its end per
        write); C{/readyz} (storage required) fails with "read-only: writes
        are refused", and is ready again once the server accepts changes.
        """
        pg = PrivatePostgres(self)
        await deferToThreadSafe(pg.start)

        def sql(*statements):
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute("SET default_transaction_read_only = off")
                for statement in statements:
                    conn.execute(statement)

        self.start(
            f'storage: {{backend: postgresql, dsn: "{pg.dsn}"}}\nserver: {{ready_requires: [backend, storage]}}\nrate_limit: {{requests_per_minute: 0}}'
        )
        alice = self.auth()
        sid = await self.new_session(alice)
        self.assertEqual((await self.call("ready before", "GET", "/readyz", {})).status, 200)
        said = self.storage_log()

        await deferToThreadSafe(sql, "ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()")

        async def refused():
            answer = await self.call("turn", "POST", "/v1/chat/completions", alice, turn_body(sid, "read-only turn", stream=False))
            return answer.status == 503

        await self.until("a write refused", refused)
        for n in range(4):
            self.assert_unavailable(await self.call(f"write {n}", "POST", "/v1/sessions", alice, {"title": "refused"}))
            self.assert_unavailable(await self.call(f"turn {n}", "POST", "/v1/chat/completions", alice, turn_body(sid, f"refused {n}", stream=False)))
            read = await self.call(f"read {n}", "GET", f"/v1/sessions/{sid}", alice)
            self.assertEqual(read.status, 200, read)

        async def not_ready():
            answer = await self.call("ready during", "GET", "/readyz", {})
            return answer if answer.status == 503 else None

        answer = await self.until("/readyz not ready", not_ready)
        self.assertEqual(answer.body["dependencies"]["storage"]["status"], "failing", answer)
        self.assertEqual(answer.body["dependencies"]["storage"]["reason"], "read-only: writes are refused", answer)
        self.assertIn("read-only: writes are refused", answer.body["reason"])

        await deferToThreadSafe(sql, "ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()")

        async def written():
            answer = await self.call("turn after", "POST", "/v1/chat/completions", alice, turn_body(sid, "writable turn", stream=False))
            return answer.status == 200

        await self.until("a write succeeds again", written)

        async def ready():
            return (await self.call("ready after", "GET", "/readyz", {})).status == 200

        await self.until("/readyz ready again", ready)
        self.assert_no_500()
        self.assertEqual(
            [text for text in said if not text.startswith("The notification connection")],
            [
                "PostgreSQL accepts no changes (read-only: a standby, or default_transaction_read_only); writes answer 503 until it does",
                "History storage accepts changes again: a write succeeded",
            ],
        )


def deferToThreadSafe(f, *args):
    """C{f(*args)} on a thread (it blocks: starting and killing servers)."""
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args)


class RedisOutageTests(OutageCase):
    """Redis killed with SIGKILL under traffic: rate_limit.on_backend_error decides, never a 500."""

    async def outage(self, policy):
        server = PrivateRedis(self)
        await deferToThreadSafe(server.start)
        self.start(f'rate_limit: {{backend: redis, url: "{server.url}", key_prefix: "outage:", on_backend_error: {policy}, requests_per_minute: 1000}}')
        alice = self.auth()
        sid = await self.new_session(alice)
        ok = await self.call("before", "POST", "/v1/chat/completions", alice, turn_body(sid, "before"))
        self.assertTrue(ok.complete, ok)
        await deferToThreadSafe(server.kill)
        during = []
        for n in range(6):
            during.append(await self.call(f"x stream {n}", "POST", "/v1/chat/completions", alice, turn_body(sid, f"x-s{n}")))
        await deferToThreadSafe(server.start)
        back = time.monotonic()
        while True:
            answer = await self.call("recovery", "POST", "/v1/chat/completions", alice, turn_body(sid, "recovery"))
            # Back: the call's bucket is in Redis again (it starts empty).
            if answer.complete and await deferToThreadSafe(self.buckets, server):
                break
            if time.monotonic() - back > RECOVERY:
                self.fail(f"not back {RECOVERY} s after Redis accepted connections: {answer}")
            await deferLater(reactor, 0.05)
        self.assert_no_500()
        return during

    @staticmethod
    def buckets(server):
        client = redis.Redis(port=server.port)
        try:
            return bool(client.keys("outage:*"))
        finally:
            client.close()

    async def test_closed_refuses_while_down(self):
        """on_backend_error: closed: 503 GATEWAY_BUSY with Retry-After while Redis is down, then back."""
        during = await self.outage("closed")
        for answer in during:
            self.assert_unavailable(answer, "GATEWAY_BUSY")

    async def test_open_lets_calls_through(self):
        """on_backend_error: open: the calls go through while Redis is down, and are kept."""
        during = await self.outage("open")
        for answer in during:
            self.assertTrue(answer.complete, answer)


class SQLiteOutageTests(OutageCase):
    """A SQLite file another process locks, or on a full disk."""

    timeout = 120

    def sqlite_gateway(self, path, fake=None):
        return self.start(f'storage: {{path: "{path}"}}', fake=fake)

    async def test_locked(self):
        """
        Another process holding the write lock: 503 STORAGE_UNAVAILABLE
        (a stream under way ends with that event, and its turn is not
        kept), then back at once when the lock goes.
        """
        path = os.path.join(tempfile.mkdtemp(), "history.sqlite3")
        fake = FakeOllama()
        self.sqlite_gateway(path, fake)
        alice = self.auth()
        sid = await self.new_session(alice)
        ok = await self.call("x stream 1", "POST", "/v1/chat/completions", alice, turn_body(sid, "x-s1"))
        self.assertTrue(ok.complete, ok)

        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        fake.behave(times=1, hold=2)
        held = stream_call(self.gw.url + "/v1/chat/completions", turn_body(sid, "held turn"), alice)
        await held.when_seen(b"data: ")
        other.execute("BEGIN EXCLUSIVE")
        fake.release()
        status, raw = await held.done
        self.assertEqual((status, Answer("held", status, None, raw, 0).stream_error), (200, "STORAGE_UNAVAILABLE"))

        self.assert_unavailable(await self.call("locked turn", "POST", "/v1/chat/completions", alice, turn_body(sid, "locked")))
        self.assert_unavailable(await self.call("locked read", "GET", f"/v1/sessions/{sid}", alice))
        self.assert_unavailable(await self.call("locked keys", "GET", "/v1/keys", alice))
        other.execute("ROLLBACK")

        after = await self.call("x stream 2", "POST", "/v1/chat/completions", alice, turn_body(sid, "x-s2"))
        self.assertTrue(after.complete, after)
        self.assert_no_500()
        got = await self.call("read", "GET", f"/v1/sessions/{sid}", alice)
        contents = [m["content"] for m in got.body["messages"] if m["role"] == "user"]
        self.assertEqual(contents, ["x-s1", "x-s2"])

    async def test_disk_full(self):
        """The disk under the SQLite file full: 503 STORAGE_UNAVAILABLE; room again, back at once."""
        mount, umount = tool("mount"), tool("umount")
        where = tempfile.mkdtemp(prefix="clawdbot-full-")
        subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", where], check=True, capture_output=True)
        self.addCleanup(lambda: subprocess.run([umount, "-l", where], check=False, capture_output=True))
        path = os.path.join(where, "history.sqlite3")
        self.sqlite_gateway(path)
        alice = self.auth()
        sid = await self.new_session(alice)
        filler = os.path.join(where, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass  # full
        big = "x" * 90_000
        full = await self.call("full turn", "POST", "/v1/chat/completions", alice, turn_body(sid, big, stream=False))
        self.assert_unavailable(full)
        os.unlink(filler)
        after = await self.call("x stream 1", "POST", "/v1/chat/completions", alice, turn_body(sid, "x-s1"))
        self.assertTrue(after.complete, after)
        self.assert_no_500()


class UnwritableStorageStartTests(OutageCase):
    """A storage.path the gateway cannot write stops the start with one line naming it."""

    timeout = 60

    def start_fails(self, path):
        config = write_config(self, merge_yaml(BASE_CONFIG, f'storage: {{path: "{path}"}}\nbackend: {{url: "http://127.0.0.1:9"}}'))
        process = Process(clawdbot_argv("start", "--config", config, "--no-debug-port"))
        self.addCleanup(process.stop)
        code = process.proc.wait(30)
        lines = process.stderr().strip().splitlines()
        self.assertEqual(code, 1, process.stderr())
        self.assertEqual(len(lines), 1, process.stderr())
        self.assertTrue(lines[0].startswith(f"clawdbot: storage.path {path}: "), lines)
        self.assertNotIn("Listening", process.stdout())
        return lines[0]

    def immutable(self, path):
        chattr = tool("chattr")
        subprocess.run([chattr, "+i", path], check=True, capture_output=True)
        self.addCleanup(lambda: subprocess.run([chattr, "-i", path], check=False, capture_output=True))

    def test_path_under_a_file(self):
        """A path whose folder cannot be made (a file is in the way)."""
        blocker = tempfile.NamedTemporaryFile(delete=False)
        self.addCleanup(os.unlink, blocker.name)
        line = self.start_fails(os.path.join(blocker.name, "db", "history.sqlite3"))
        self.assertIn("cannot be created", line)

    def test_read_only_directory(self):
        """A folder that cannot be written (even by root: immutable)."""
        folder = tempfile.mkdtemp()
        self.immutable(folder)
        self.assertIn("is not writable", self.start_fails(os.path.join(folder, "history.sqlite3")))

    def test_read_only_file(self):
        """A database file that cannot be written."""
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "history.sqlite3")
        sqlite3.connect(path).close()
        self.immutable(path)
        self.assertIn("is not writable", self.start_fails(path))

    async def test_file_made_read_only_is_not_ready(self):
        """A database file that can no longer be written after the start: the readiness probe says "read-only: writes are refused"."""
        from clawdbot.storage.store import SQLiteEngine, SQLStore

        path = os.path.join(tempfile.mkdtemp(), "history.sqlite3")
        engine = SQLiteEngine(reactor, path)
        self.addCleanup(engine.close)
        store = SQLStore(engine)
        self.assertIsNone(await store.ping())
        self.immutable(path)
        self.assertEqual(await store.ping(), "read-only: writes are refused")


class _CuttingClient(ProxyClient):
    """The proxy's side towards PostgreSQL: one whose client side has gone by the time it connects ends at once."""

    def connectionMade(self):
        if self.peer.gone:
            self.transport.abortConnection()
            return
        super().connectionMade()

    def dataReceived(self, data):
        if self.peer.cut_reply:
            self.transport.abortConnection()
            self.peer.transport.abortConnection()
            return
        super().dataReceived(data)


class _CuttingClientFactory(ProxyClientFactory):
    protocol = _CuttingClient


class _Cutting(ProxyServer):
    """Client to server; when its factory is armed, a COMMIT (a simple query) ends both connections instead of going on."""

    clientProtocolFactory = _CuttingClientFactory
    gone = False
    cut_reply = False

    def connectionMade(self):
        self.factory.live.append(self)
        super().connectionMade()

    def connectionLost(self, reason):
        self.gone = True
        super().connectionLost(reason)

    def dataReceived(self, data):
        factory = self.factory
        if factory.armed and factory.forward and b"Q" in data and b"COMMIT\x00" in data:
            # The COMMIT reaches the server (it is kept); its answer never comes back.
            factory.armed = False
            factory.cuts += 1
            self.cut_reply = True
            super().dataReceived(data)
            return
        if factory.armed and b"Q" in data and b"COMMIT\x00" in data:
            factory.armed = False
            factory.cuts += 1
            self.transport.abortConnection()
            if self.peer is not None:
                self.peer.transport.abortConnection()
            return
        super().dataReceived(data)


class CommitCutter(ProxyFactory):
    """A TCP proxy to PostgreSQL that can drop the connection at the next COMMIT."""

    protocol = _Cutting
    armed = False
    cuts = 0
    # Armed with forward set: the COMMIT goes through and its answer is lost
    # (kept, though the client cannot know).
    forward = False

    def __init__(self, host, port):
        super().__init__(host, port)
        self.live = []
        # (Not self.port: ProxyFactory's is the address it forwards to.)
        self.listening = None

    def listen(self):
        """Listen on a free loopback port: its number."""
        self.listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self.listening.getHost().port

    async def close(self):
        """Stop listening and drop every connection through the proxy (both sides), waiting until they are gone."""
        if self.listening is not None:
            await self.listening.stopListening()
        for _ in range(100):
            open_ = [p for p in self.live if not p.gone or (p.peer is not None and p.peer.transport.connected)]
            if not open_:
                return
            for proxy in open_:
                proxy.transport.abortConnection()
                if proxy.peer is not None:
                    proxy.peer.transport.abortConnection()
            await deferLater(reactor, 0.05)


class PostgresEngineTests(OutageCase):
    """The engine's rule for repeating a transaction, and its first use with the database down."""

    timeout = 120

    def engine(self, dsn):
        from clawdbot.storage.store import PostgresEngine

        engine = PostgresEngine(reactor, dsn)
        self.addCleanup(engine.close)
        return engine

    async def test_connection_lost_before_commit_is_repeated_once(self):
        """A transaction whose connection ends under it (the server ends the backend) runs once more on another, and only once."""
        from clawdbot.errors import StorageUnavailable
        from tests.test_sessions import pg_database

        engine = self.engine(pg_database(self))
        runs = []

        def once(cur):
            runs.append("once")
            if len(runs) == 1:
                cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            cur.execute("SELECT 41 + 1")
            return cur.fetchone()[0]

        self.assertEqual(await engine.run(once), 42)
        self.assertEqual(runs, ["once", "once"])

        def always(cur):
            runs.append("always")
            cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with self.assertRaises(StorageUnavailable) as caught:
            await engine.run(always)
        self.assertEqual(runs.count("always"), 2)
        self.assertEqual((caught.exception.status, caught.exception.code, caught.exception.headers["Retry-After"]), (503, "STORAGE_UNAVAILABLE", "5"))

    async def test_connection_lost_during_commit_is_not_repeated(self):
        """
        A connection that ends as the COMMIT goes (a proxy drops it there)
        leaves unknown whether it was kept: not run again, a 503 that says
        the change may not have been kept.
        """
        from clawdbot.errors import StorageUnavailable
        from tests.test_sessions import pg_database

        dsn = pg_database(self)
        cut = CommitCutter("127.0.0.1", 5432)
        port = cut.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(cut.close()))  # (after the engine's pool is closed)
        engine = self.engine(dsn.replace("127.0.0.1:5432", f"127.0.0.1:{port}"))
        await engine.run(lambda cur: cur.execute("SELECT 1"))  # the schema, through the proxy
        runs = []

        def write(cur):
            runs.append(1)
            cur.execute("INSERT INTO revocations (id, expires_at) VALUES ('cut', 1)")

        cut.armed = True
        with self.assertRaises(StorageUnavailable) as caught:
            await engine.run(write)
        self.assertEqual((len(runs), cut.cuts), (1, 1))
        self.assertIn("may not have been kept", caught.exception.details)

    async def test_bad_sql_is_not_unavailable(self):
        """An error in the SQL is raised as it is (a 500 at a route), run once."""
        from tests.test_sessions import pg_database

        engine = self.engine(pg_database(self))
        runs = []

        def bad(cur):
            runs.append(1)
            cur.execute("SELECT * FROM no_such_table")

        with self.assertRaises(psycopg.errors.UndefinedTable):
            await engine.run(bad)
        self.assertEqual(len(runs), 1)

    async def test_down_at_first_use(self):
        """With the database down at the first use: 503 STORAGE_UNAVAILABLE (not a closed pool); once it is up, the next transaction works."""
        from clawdbot.errors import StorageUnavailable

        pg = PrivatePostgres(self)
        engine = self.engine(pg.dsn)
        with self.assertRaises(StorageUnavailable):
            await engine.run(lambda cur: cur.execute("SELECT 1"))
        await deferToThreadSafe(pg.start)

        def select(cur):
            cur.execute("SELECT COUNT(*) FROM sessions")
            return cur.fetchone()[0]

        deadline = time.monotonic() + RECOVERY
        while True:
            try:
                self.assertEqual(await engine.run(select), 0)
                break
            except StorageUnavailable:
                if time.monotonic() > deadline:
                    raise
                await deferLater(reactor, 0.05)


def exits_within(proc, seconds):
    """Whether the child process C{proc} exits within C{seconds} (blocks: run on a thread)."""
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


class HungPostgresTests(OutageCase):
    """
    PostgreSQL hung rather than down (every process of it stopped: the
    kernel still accepts and acknowledges, nothing answers, no TCP timeout
    fires): requests answer 503 in a bounded time, and a SIGTERM stops the
    gateway.
    """

    async def test_hung_postgres_requests_and_stop(self):
        """
        With the database hung, concurrent calls of each kind answer 503
        STORAGE_UNAVAILABLE (the engine's watchdog ends the waits); a
        SIGTERM to the gateway, idle then, ends the process within its
        drain time and a few seconds (the writes at stop are bounded and no
        thread waiting on the database keeps it alive), and the usage it
        could not write is said in one warning with its count.
        """
        pg = PrivatePostgres(self)
        await deferToThreadSafe(pg.start)
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        config = write_config(
            self,
            merge_yaml(
                BASE_CONFIG,
                f'backend: {{url: "{fake.url}"}}\nstorage: {{backend: postgresql, dsn: "{pg.dsn}"}}\n'
                "usage: {flush_interval: 1s}\nrate_limit: {requests_per_minute: 0}\nserver: {drain_timeout: 2s}",
            ),
        )
        gateway = Process(clawdbot_argv("start", "--config", config, "--no-debug-port"))
        self.addCleanup(gateway.stop)
        await deferToThreadSafe(gateway.wait_for, "Gateway listening on", 60.0)
        url = gateway.url()
        alice = self.auth()
        made = await call("create", "POST", url + "/v1/sessions", alice, {"title": "hung"})
        self.assertEqual(made.status, 201, made)
        sid = made.body["id"]
        whole = await call("turn", "POST", url + "/v1/chat/completions", alice, turn_body(sid, "before", stream=False))
        self.assertEqual(whole.status, 200, whole)
        await deferLater(reactor, 1.5)  # (its usage written)

        pg.hang(self)
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(call(what, method, url + path, alice, body))
                for what, method, path, body in [
                    ("hung read", "GET", f"/v1/sessions/{sid}", None),
                    ("hung list", "GET", "/v1/sessions", None),
                    ("hung turn", "POST", "/v1/chat/completions", turn_body(sid, "during", stream=False)),
                    ("hung keys", "GET", "/v1/keys", None),
                    ("hung usage", "GET", "/v1/usage", None),
                ]
            ]
        )
        for answer in answers:
            self.assert_unavailable(answer)
        # A call that needs no history works, and its usage cannot be written.
        plain = await call("plain", "POST", url + "/v1/chat/completions", alice, {"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(plain.status, 200, plain)

        gateway.signal(signal.SIGTERM)
        # drain_timeout (2 s) and a few seconds: far less than this.
        exited = await deferToThreadSafe(exits_within, gateway.proc, 30.0)
        self.assertTrue(exited, "the gateway did not exit after SIGTERM with PostgreSQL hung:\n" + gateway.stdout()[-3000:])
        self.assertEqual(gateway.proc.returncode, 0, gateway.stderr()[-3000:])
        said = gateway.stdout() + gateway.stderr()
        self.assertNotIn("Traceback", said)
        dropped = [line for line in said.splitlines() if "was not written before the stop" in line]
        self.assertEqual(len(dropped), 1, said[-3000:])
        self.assertIn("Usage of 1 call(s)", dropped[0])


    async def test_transaction_past_its_bound_is_ended(self):
        """
        A transaction whose server stops answering under it (here a
        statement that sleeps past the engine's bound, lowered for the test)
        is ended by the engine's watchdog: 503 STORAGE_UNAVAILABLE, run once
        (not repeated), and the engine works again afterwards.
        """
        from clawdbot.errors import StorageUnavailable
        from clawdbot.storage.store import PostgresEngine
        from tests.test_sessions import pg_database

        engine = PostgresEngine(reactor, pg_database(self))
        self.addCleanup(engine.close)
        engine.TRANSACTION_TIME = 1.0
        await engine.run(lambda cur: cur.execute("SELECT 1"))
        runs = []

        def stuck(cur):
            runs.append(1)
            cur.execute("SELECT pg_sleep(60)")

        d = engine.run(stuck)
        d.addTimeout(BOUND, reactor)
        with self.assertRaises(StorageUnavailable) as caught:
            await d
        self.assertEqual(len(runs), 1)
        self.assertIn("did not answer", caught.exception.reason)

        def select(cur):
            cur.execute("SELECT 42")
            return cur.fetchone()[0]

        for _ in range(100):
            try:
                self.assertEqual(await engine.run(select), 42)
                break
            except StorageUnavailable:
                await deferLater(reactor, 0.1)
        else:
            self.fail("the engine did not work again")


class PostgresBreakerTests(OutageCase):
    """The engine in an outage: one transaction at a time tries the server, the others answer at once."""

    timeout = 120

    def engine(self, dsn):
        from clawdbot.storage.store import PostgresEngine

        engine = PostgresEngine(reactor, dsn)
        self.addCleanup(engine.close)
        return engine

    def closed_port(self):
        """A loopback port where connections are refused."""
        return reserved_port(self)

    async def test_burst_waits_for_no_other(self):
        """
        A burst of transactions with the database unreachable (at the first
        use, then again once the outage is known): each answers
        STORAGE_UNAVAILABLE, and only the few that try the server wait for
        the pool; none queues behind another's wait (a lock held while
        waiting made them answer one after another).
        """
        from clawdbot.errors import StorageUnavailable

        engine = self.engine(f"postgresql://postgres@127.0.0.1:{self.closed_port()}/postgres")
        pool = engine.connections
        waits = []
        getconn = pool.getconn

        def counted(*args, **kwargs):
            waits.append(1)
            return getconn(*args, **kwargs)

        pool.getconn = counted

        async def one():
            try:
                await engine.run(lambda cur: cur.execute("SELECT 1"))
            except StorageUnavailable as e:
                return e
            return None

        for burst in ("first use", "outage known"):
            del waits[:]
            results = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(30)])
            self.assertTrue(all(isinstance(r, StorageUnavailable) and r.status == 503 for r in results), (burst, results))
            self.assertLessEqual(len(waits), 3, f"{burst}: {len(waits)} of 30 transactions waited for the pool")

    async def test_read_only_server(self):
        """
        A server that refuses writes (SQLSTATE 25006, a standby after a
        failover or default_transaction_read_only; psycopg calls it an
        InternalError): 503 STORAGE_UNAVAILABLE saying so, run once; reads
        go on working (no breaker opened).  The read-only state is said
        once however many writes are refused, a read does not end it (nor
        says an outage ended), a write that succeeds does, once.
        """
        from clawdbot.errors import StorageUnavailable
        from tests.test_sessions import pg_database

        engine = self.engine(pg_database(self))
        said = self.storage_log()
        runs = []

        def write(cur):
            runs.append(1)
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute("INSERT INTO revocations (id, expires_at) VALUES ('ro', 1)")

        with self.assertRaises(StorageUnavailable) as caught:
            await engine.run(write)
        self.assertEqual((len(runs), caught.exception.status), (1, 503))
        self.assertIn("accepts no changes", caught.exception.details)
        self.assertIn("read-only", caught.exception.reason)

        def read(cur):
            cur.execute("SELECT COUNT(*) FROM revocations")
            return cur.fetchone()[0]

        self.assertEqual(await engine.run(read), 0)
        with self.assertRaises(StorageUnavailable):
            await engine.run(write)
        self.assertEqual(await engine.run(read), 0)
        self.assertEqual(said, ["PostgreSQL accepts no changes (read-only: a standby, or default_transaction_read_only); writes answer 503 until it does"])
        self.assertIsNotNone(engine.refusing)

        def real_write(cur):
            cur.execute("INSERT INTO revocations (id, expires_at) VALUES ('rw', 1)")

        await engine.run(real_write)
        self.assertEqual(await engine.run(read), 1)
        self.assertIsNone(engine.refusing)
        self.assertEqual(said[1:], ["History storage accepts changes again: a write succeeded"])

    def test_sqlstate_classes(self):
        """Errors are classified by SQLSTATE (class or code), not by psycopg's Python class."""
        from psycopg import errors

        from clawdbot.storage.store import _pg_unavailable

        for error, reason in [
            (errors.ReadOnlySqlTransaction, "accepts no changes"),
            (errors.DiskFull, "out of resources"),
            (errors.TooManyConnections, "out of resources"),
            (errors.AdminShutdown, "shutting down"),
            (errors.CannotConnectNow, "shutting down"),
            (errors.OperatorIntervention, "operator intervention"),
            (errors.IoError, "system error"),
            (errors.SystemError, "system error"),
            (errors.ConnectionFailure, "connection to PostgreSQL failed"),
        ]:
            unavailable = _pg_unavailable(error(), None)
            self.assertIsNotNone(unavailable, error)
            self.assertIn(reason, unavailable.reason, error)
            self.assertEqual(unavailable.status, 503)
        # A serialization failure is repeated first; twice, it is an outage.
        self.assertIn("twice", _pg_unavailable(errors.SerializationFailure(), None, again=True).reason)
        # A statement stopped by a time limit, and errors in the SQL, are not.
        for error in (errors.QueryCanceled, errors.UndefinedTable, errors.UniqueViolation):
            self.assertIsNone(_pg_unavailable(error(), None), error)

    async def test_refused_credentials_are_named(self):
        """A server that refuses the gateway's password: the outage's reason says so, never the password."""
        from clawdbot.errors import StorageUnavailable

        pg = PrivatePostgres(self)
        with open(os.path.join(pg.data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all bob 127.0.0.1/32 scram-sha-256\n")
        await deferToThreadSafe(pg.start)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE ROLE bob LOGIN PASSWORD 'right-one'")
        said = self.storage_log()
        engine = self.engine(f"postgresql://bob:wrong-secret-9@127.0.0.1:{pg.port}/postgres")
        with self.assertRaises(StorageUnavailable) as caught:
            await engine.run(lambda cur: cur.execute("SELECT 1"))
        self.assertEqual(caught.exception.reason, "PostgreSQL refused the gateway's credentials")
        self.assertIn("refused the gateway's credentials", " ".join(said))
        self.assertNotIn("wrong-secret", " ".join(said) + caught.exception.reason + caught.exception.details)

    async def test_ambiguous_commit_counts_once(self):
        """
        A usage batch and an audit batch whose COMMIT reaches the server
        (kept) but whose answer is lost: each write fails, is retried with
        its batch id, and is kept once (not counted twice).
        """
        from types import SimpleNamespace

        from clawdbot.auth.identity import Principal
        from clawdbot.errors import StorageUnavailable
        from clawdbot.ops.audit import AuditLog
        from clawdbot.storage.audit import AuditStore
        from clawdbot.storage.usage import UsageBook, UsageStore
        from tests.test_sessions import pg_database

        dsn = pg_database(self)
        cut = CommitCutter("127.0.0.1", 5432)
        cut.forward = True
        port = cut.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(cut.close()))
        engine = self.engine(dsn.replace("127.0.0.1:5432", f"127.0.0.1:{port}"))
        await engine.run(lambda cur: cur.execute("SELECT 1"))

        async def until_written(write):
            for _ in range(100):
                try:
                    return await write()
                except StorageUnavailable:
                    await deferLater(reactor, 0.1)
            self.fail("never written")

        book = UsageBook(UsageStore(engine), reactor)
        alice = Principal(sub="alice", issuer="https://sso.example.com")
        for _ in range(3):
            book.record(alice, "m", {"prompt_tokens": 10, "completion_tokens": 5}, False, 0.1)
        cut.armed = True
        with self.assertRaises(StorageUnavailable):
            await book.flush()
        self.assertEqual(cut.cuts, 1)
        await until_written(book.flush)

        def usage(cur):
            cur.execute("SELECT SUM(requests), SUM(prompt_tokens + completion_tokens) FROM usage_hourly")
            return tuple(int(v) for v in cur.fetchone())

        self.assertEqual(await until_written(lambda: engine.run(usage)), (3, 45))

        config = SimpleNamespace(audit_log=SimpleNamespace(path=None, store=True, retention=86400.0))
        audit = AuditLog(lambda: config, AuditStore(engine))
        cut.armed = True
        audit.record("key.created", principal=("https://sso.example.com", "alice"), obj="key_1")
        await audit.flush()
        self.assertEqual(cut.cuts, 2)
        for _ in range(100):
            if audit._unsent is None and not audit._unstored:
                break
            await deferLater(reactor, 0.1)
            await audit.flush()

        def events(cur):
            cur.execute("SELECT COUNT(*) FROM audit_events")
            return cur.fetchone()[0]

        self.assertEqual(await until_written(lambda: engine.run(events)), 1)

    async def test_usage_dropped_at_stop_is_said(self):
        """Usage still unwritten when the store closes (an outage at the stop): one warning with the count of calls."""
        from clawdbot.auth.identity import Principal
        from clawdbot.errors import StorageUnavailable
        from clawdbot.storage.usage import UsageBook, UsageStore

        said = []

        def observe(event):
            if event.get("log_namespace") == "clawdbot.usage":
                said.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        from clawdbot.storage.store import PostgresEngine

        engine = PostgresEngine(reactor, f"postgresql://postgres@127.0.0.1:{self.closed_port()}/postgres")
        book = UsageBook(UsageStore(engine), reactor)
        for _ in range(2):
            book.record(Principal(sub="alice", issuer="https://sso.example.com"), "m", None, False, 0.1)
        with self.assertRaises(StorageUnavailable):
            await book.flush()
        await maybeDeferred(engine.close)
        self.assertEqual(len(said), 1, said)
        self.assertIn("Usage of 2 call(s)", said[0])


class KeyCacheOutageTests(OutageCase):
    """An API key keeps working from the cache through an outage, whatever its owner tries meanwhile."""

    timeout = 60

    async def test_failed_key_create_keeps_cached_grant(self):
        """A POST /v1/keys that fails in an outage does not evict the owner's cached grant: their keys still work."""
        path = os.path.join(tempfile.mkdtemp(), "history.sqlite3")
        self.start(f'storage: {{path: "{path}"}}')
        alice = bearer(token(sub="alice", scope="chat:read chat:write"))
        made = await self.call("key", "POST", "/v1/keys", alice, {"name": "cached"})
        self.assertEqual(made.status, 201, made)
        key = bearer(made.body["key"])
        self.assertEqual((await self.call("by key", "GET", "/v1/models", key)).status, 200)
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN EXCLUSIVE")
        self.addCleanup(lambda: other.in_transaction and other.execute("ROLLBACK"))
        self.assertEqual((await self.call("by key, locked", "GET", "/v1/models", key)).status, 200)
        self.assert_unavailable(await self.call("create, locked", "POST", "/v1/keys", alice, {"name": "another"}))
        answer = await self.call("by key after the failed create", "GET", "/v1/models", key)
        self.assertEqual(answer.status, 200, answer)
        self.assert_no_500()
