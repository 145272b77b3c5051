"""
Chat history (SPEC.md §6): the storage suite on SQLite and PostgreSQL, the
permission matrix on every route, stateful completions against the fake
Ollama, clearing, export, and a kill -9 crash test.
"""

import json
import os
import secrets
import signal
import sqlite3
import tempfile
from urllib.parse import unquote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from clawdbot.storage.store import MIGRATIONS, PostgresEngine, SQLiteEngine, SQLStore, decode_cursor
from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, Process, bearer, clawdbot_argv, get_json, merge_yaml, serve, token, until, write_config

PG_ADMIN_DSN = os.environ.get("CLAWDBOT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
HI = [{"role": "user", "content": "hi"}]


def pg_database(testcase):
    """A fresh PostgreSQL database for one test; dropped afterwards.  Returns its DSN."""
    import psycopg

    name = "clawdbot_test_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")

    def drop():
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    testcase.addCleanup(drop)
    return PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


class StoreSuite:
    """The same behaviour, whatever the engine."""

    def make_store(self):
        raise NotImplementedError

    def setUp(self):
        self.now = [1000.0]
        self.store = SQLStore(self.make_store(), clock=lambda: self.now[0])
        self.addCleanup(self.store.close)

    def tick(self, seconds=1.0):
        self.now[0] += seconds

    async def test_create_get_rename_delete(self):
        """A session is created, read back, renamed (updated_at moves) and deleted."""
        s = await self.store.create_session("alice", "First", team="team-a")
        got = await self.store.get_session(s.id)
        self.assertEqual((got.title, got.owner, got.team, got.created_at), ("First", "alice", "team-a", 1000.0))
        self.tick()
        await self.store.rename(s.id, "Renamed")
        got = await self.store.get_session(s.id)
        self.assertEqual((got.title, got.updated_at), ("Renamed", 1001.0))
        await self.store.delete(s.id)
        self.assertIsNone(await self.store.get_session(s.id))

    async def test_messages_order_context_and_clear(self):
        """Messages keep their order; context returns the last N oldest first; clear empties the session."""
        s = await self.store.create_session("alice", "t")
        for i in range(5):
            self.assertTrue(await self.store.append(s.id, [("user", f"q{i}", False), ("assistant", f"a{i}", i == 4)]))
        full = await self.store.get_session(s.id, with_messages=True)
        self.assertEqual([m.content for m in full.messages], [x for i in range(5) for x in (f"q{i}", f"a{i}")])
        self.assertTrue(full.messages[-1].incomplete)
        self.assertFalse(full.messages[0].incomplete)
        context = await self.store.context(s.id, 3)
        self.assertEqual([m.content for m in context], ["a3", "q4", "a4"])
        await self.store.clear(s.id)
        self.assertEqual((await self.store.get_session(s.id, with_messages=True)).messages, ())

    async def test_limits(self):
        """Session and message limits refuse without storing anything."""
        for _ in range(2):
            self.assertIsNotNone(await self.store.create_session("bob", "x", max_sessions=2))
        self.assertIsNone(await self.store.create_session("bob", "x", max_sessions=2))
        s = await self.store.create_session("carol", "x")
        self.assertTrue(await self.store.append(s.id, [("user", "1", False)] * 3, max_messages=4))
        self.assertFalse(await self.store.append(s.id, [("user", "2", False)] * 2, max_messages=4))
        self.assertEqual(await self.store.count_messages(s.id), 3)

    async def test_listing_visibility_and_pagination(self):
        """Lists hold own and readable team sessions, newest first, paginated without gaps or repeats."""
        ids = []
        for i in range(7):
            self.tick()
            owner, team = [("alice", None), ("bob", "team-a"), ("carol", "team-b")][i % 3]
            ids.append((await self.store.create_session(owner, f"s{i}", team=team)).id)
        seen, cursor = [], None
        while True:
            rows, cursor = await self.store.list_sessions("alice", ["team-a"], limit=2, cursor=decode_cursor(cursor) if cursor else None)
            seen += [r.id for r in rows]
            if cursor is None:
                break
        expected = [ids[i] for i in range(7) if i % 3 in (0, 1)][::-1]
        self.assertEqual(seen, expected)
        rows, _ = await self.store.list_sessions("alice", ["team-a"], team="team-a")
        self.assertEqual([r.id for r in rows], [ids[i] for i in (4, 1)])
        rows, _ = await self.store.list_sessions("alice", ["team-a"], team="team-b")
        self.assertEqual(rows, [])

    async def test_revocations(self):
        """A revoked refresh credential stays revoked until it expires; expired entries are swept."""
        self.assertTrue(await self.store.revoke("r1", expires_at=2000.0))
        self.assertTrue(await self.store.is_revoked("r1"))
        self.assertFalse(await self.store.is_revoked("r2"))
        self.assertFalse(await self.store.revoke("r1", expires_at=2000.0))
        self.now[0] = 3000.0
        await self.store.revoke("r3", expires_at=4000.0)
        self.assertFalse(await self.store.is_revoked("r1"))

    async def test_unicode_and_large_content(self):
        """Text survives byte for byte, Chinese and emoji included."""
        s = await self.store.create_session("alice", "中文标题 🚀")
        text = "你好，世界 🌏\n" * 5000
        await self.store.append(s.id, [("user", text, False)])
        got = await self.store.get_session(s.id, with_messages=True)
        self.assertEqual((got.title, got.messages[0].content), ("中文标题 🚀", text))


class SQLiteStoreTests(StoreSuite, TestCase):
    def make_store(self):
        path = os.path.join(tempfile.mkdtemp(), "history.sqlite3")
        self.path = path
        return SQLiteEngine(reactor, path)

    async def test_wal_and_schema_version(self):
        """The file is in WAL mode at the latest schema version."""
        await self.store.create_session("alice", "x")
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))


class PostgresStoreTests(StoreSuite, TestCase):
    def make_store(self):
        return PostgresEngine(reactor, pg_database(self))


# --- the HTTP API ---------------------------------------------------------------

OWNER = dict(sub="alice", scope="chat:read chat:write", teams=["team-a"])
TEAM_READER = dict(sub="bob", scope="chat:read chat:write history:team-a", teams=["team-a"])
TEAM_NO_SCOPE = dict(sub="carl", scope="chat:read chat:write", teams=["team-a"])
OTHER_TEAM = dict(sub="dora", scope="chat:read chat:write history:team-b", teams=["team-b"])
READ_ONLY_TEAM = dict(sub="erin", scope="chat:read history:team-a", teams=["team-a"])
NO_SCOPE = dict(sub="finn", scope="", teams=["team-a"])


def as_user(who):
    return bearer(token(sub=who["sub"], scope=who["scope"], teams=who["teams"]))


class Gateway(TestCase):
    timeout = 60

    def start(self, extra=""):
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.gw = serve(self, extra=merge_yaml(f'backend: {{url: "{self.fake.url}"}}', extra))
        return self.gw

    async def call(self, who, method, path, body=None):
        headers = as_user(who) if who is not None else {}
        return await get_json(self.gw.url + path, method=method, headers=headers, body=body)

    async def create(self, who, title="t", team=None):
        body = {"title": title}
        if team:
            body["team"] = team
        status, _, session = await self.call(who, "POST", "/v1/sessions", body)
        self.assertEqual(status, 201, session)
        return session


class PermissionMatrixTests(Gateway):
    async def test_matrix(self):
        """
        Every session route, for owner, team reader, team member without the
        history scope, other team, read-only and no scope: team readers read,
        only the owner changes (a team reader's change is a 403, anyone
        else who cannot see the session gets a 404).
        """
        self.start()
        private = await self.create(OWNER, "private")
        shared = await self.create(OWNER, "shared", team="team-a")

        def expect(session, who):
            """(read, write) statuses for a user on a session."""
            if who is NO_SCOPE:
                return 403, 403
            owns = who["sub"] == OWNER["sub"]
            sees = owns or (session["team"] and f"history:{session['team']}" in who["scope"].split())
            writes = "chat:write" in who["scope"].split()
            read = 200 if sees else 404
            if not writes:
                return read, 403
            return read, (200 if owns else 403 if sees else 404)

        for session in (private, shared):
            sid = session["id"]
            for who in (TEAM_READER, TEAM_NO_SCOPE, OTHER_TEAM, READ_ONLY_TEAM, NO_SCOPE, OWNER):
                read, write = expect(session, who)
                label = (session["title"], who["sub"])
                self.assertEqual((await self.call(who, "GET", f"/v1/sessions/{sid}"))[0], read, label)
                self.assertEqual((await self.call(who, "GET", f"/v1/sessions/{sid}/export"))[0], read, label)
                self.assertEqual((await self.call(who, "PATCH", f"/v1/sessions/{sid}", {"title": "x"}))[0], write, label)
                chat = await self.call(who, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI})
                self.assertEqual(chat[0], write, label)
                listed = await self.call(who, "GET", "/v1/sessions")
                if who is NO_SCOPE:
                    self.assertEqual(listed[0], 403)
                else:
                    self.assertEqual(sid in [s["id"] for s in listed[2]["data"]], read == 200, label)
            for who in (TEAM_NO_SCOPE, OTHER_TEAM, READ_ONLY_TEAM, NO_SCOPE):
                read, write = expect(session, who)
                self.assertEqual((await self.call(who, "DELETE", f"/v1/sessions/{sid}"))[0], 204 if write == 200 else write)
        # Nobody but the owner deletes: the team reader's attempt changes nothing.
        self.assertEqual((await self.call(TEAM_READER, "DELETE", f"/v1/sessions/{private['id']}"))[0], 404)
        self.assertEqual((await self.call(TEAM_READER, "DELETE", f"/v1/sessions/{shared['id']}"))[0], 403)
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{shared['id']}"))[0], 200)
        for session in (private, shared):
            self.assertEqual((await self.call(OWNER, "DELETE", f"/v1/sessions/{session['id']}"))[0], 204)
            self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{session['id']}"))[0], 404)
        self.assertEqual((await self.call(None, "GET", "/v1/sessions"))[0], 401)

    async def test_create_rules(self):
        """Creating needs chat:write, a team the user belongs to, a sane title; the shape is SPEC's."""
        self.start()
        session = await self.create(OWNER, "hello", team="team-a")
        self.assertEqual(set(session), {"id", "title", "owner", "team", "created_at", "updated_at", "system_prompt", "temperature"})
        self.assertTrue(session["created_at"].endswith("Z"))
        self.assertEqual((await self.call(OWNER, "POST", "/v1/sessions", {"title": "x", "team": "team-b"}))[0], 403)
        self.assertEqual((await self.call(READ_ONLY_TEAM, "POST", "/v1/sessions", {"title": "x"}))[0], 403)
        for bad in ({"title": ""}, {"title": 5}, {"title": "x" * 201}, {"owner": "bob"}, {"team": 3}):
            self.assertEqual((await self.call(OWNER, "POST", "/v1/sessions", bad))[0], 400, bad)

    async def test_session_limit(self):
        """The per-user session limit is a clear 400."""
        self.start("history: {max_sessions_per_user: 2}")
        await self.create(OWNER)
        await self.create(OWNER)
        status, _, body = await self.call(OWNER, "POST", "/v1/sessions", {"title": "x"})
        self.assertEqual(status, 400)
        self.assertIn("limit of 2 sessions", body["error"]["details"])


class StatefulTests(Gateway):
    async def test_context_round_trip(self):
        """The stored context goes first; the new turn and the reply are stored, plain and streamed."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        status, _, reply = await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "user", "content": "first"}]})
        self.assertEqual(status, 200)
        status, _, raw = await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": "second"}]})
        self.assertTrue(raw.endswith(b"data: [DONE]\n\n"))
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual([m["content"] for m in sent["messages"]], ["first", self.fake.reply_text, "second"])
        self.assertEqual(sent["session_id"], sid)
        _, _, session = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        self.assertEqual(
            [(m["role"], m["content"], m["incomplete"]) for m in session["messages"]],
            [("user", "first", False), ("assistant", self.fake.reply_text, False), ("user", "second", False), ("assistant", self.fake.reply_text, False)],
        )

    async def test_clear(self):
        """{"session_id", "messages": []} clears the context; the next turn starts fresh."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI})
        status, _, body = await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": []})
        self.assertEqual((status, body["session_id"]), (200, sid))
        _, _, session = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        self.assertEqual(session["messages"], [])
        await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "user", "content": "again"}]})
        self.assertEqual([m["content"] for m in self.fake.requests_to("/api/chat")[-1].body["messages"]], ["again"])

    async def test_backend_cut_off_is_incomplete(self):
        """A stream the backend cuts off is stored with the partial reply marked incomplete."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        self.fake.behave(close_early=3, times=1)
        await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "stream": True, "messages": HI})
        _, _, session = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        last = session["messages"][-1]
        self.assertEqual((last["role"], last["incomplete"]), ("assistant", True))
        self.assertTrue(self.fake.reply_text.startswith(last["content"]))
        self.assertGreater(len(last["content"]), 0)

    async def test_client_cut_off_is_incomplete(self):
        """A stream the client abandons is stored with what was said, marked incomplete."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        self.fake.behave(stall_after=3, times=1)
        host, port = self.gw.url.split("//")[1].split(":")
        body = json.dumps({"session_id": sid, "stream": True, "messages": HI}).encode()
        tok = token(sub="alice", scope="chat:read chat:write")

        class Quitter(Protocol):
            got = Deferred()

            def connectionMade(self):
                self.transport.write(
                    (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {tok}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                    + body
                )
                self.seen = b""

            def dataReceived(self, data):
                self.seen += data
                if self.seen.count(b"data: ") >= 2 and not self.got.called:
                    self.got.callback(None)

        quitter = Quitter()
        await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), quitter)
        await quitter.got
        gone = self.fake.next_disconnect()
        quitter.transport.loseConnection()
        await gone.addTimeout(2, reactor)
        for _ in range(50):
            _, _, session = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
            if session["messages"]:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual([m["role"] for m in session["messages"]], ["user", "assistant"])
        self.assertTrue(session["messages"][1]["incomplete"])

    async def test_concurrent_turns_serialised(self):
        """Concurrent turns on one session run one after the other: each sees the previous one's reply."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        self.fake.behave(pace=0.02)
        turns = [
            ensureDeferred(self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "user", "content": f"q{i}"}]}))
            for i in range(3)
        ]
        for d in turns:
            self.assertEqual((await d)[0], 200)
        sizes = [len(r.body["messages"]) for r in self.fake.requests_to("/api/chat")]
        self.assertEqual(sizes, [1, 3, 5])
        _, _, session = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        self.assertEqual([m["role"] for m in session["messages"]], ["user", "assistant"] * 3)

    async def test_message_limits(self):
        """Too-long messages and full sessions are clear 400s that store nothing."""
        self.start("history: {max_message_chars: 10, max_messages_per_session: 4}")
        sid = (await self.create(OWNER))["id"]
        status, _, body = await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "user", "content": "x" * 11}]})
        self.assertEqual(status, 400)
        self.assertIn("10 characters", body["error"]["details"])
        for _ in range(2):
            self.assertEqual((await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI}))[0], 200)
        status, _, body = await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI})
        self.assertEqual(status, 400)
        self.assertIn("4 messages", body["error"]["details"])

    async def test_export(self):
        """Export gives the session as JSON or Markdown, as an attachment."""
        self.start()
        sid = (await self.create(OWNER, "Trip plan"))["id"]
        await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "user", "content": "where?"}]})
        status, headers, data = await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export")
        self.assertEqual(status, 200)
        self.assertEqual([m["content"] for m in data["messages"]], ["where?", self.fake.reply_text])
        self.assertIn(b"attachment", headers.getRawHeaders(b"content-disposition")[0].encode() if isinstance(headers.getRawHeaders(b"content-disposition")[0], str) else headers.getRawHeaders(b"content-disposition")[0])
        status, headers, md = await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export?format=markdown")
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/markdown; charset=utf-8"])
        self.assertIn(b"# Trip plan", md)
        self.assertIn(b"## user", md)
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export?format=pdf"))[0], 400)

    async def test_export_file_name_in_any_script(self):
        """A title in any script names the download (RFC 6266 filename*), made safe; the ASCII name stays for older clients."""
        self.start()
        for title, ascii_name, utf8_name in (
            ("项目计划", "session.json", "项目计划.json"),
            ('a/b\\"c..\r\nX: ünï 💥', "a-b--c----X---n.json", "a-b--c..--X- ünï 💥.json"),
            ("..", "session.json", "session.json"),
        ):
            sid = (await self.create(OWNER, title))["id"]
            _, headers, _ = await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export")
            (disposition,) = headers.getRawHeaders("content-disposition")
            self.assertTrue(disposition.isascii(), disposition)
            self.assertIn(f'filename="{ascii_name}"', disposition)
            self.assertEqual(unquote(disposition.split("filename*=UTF-8''")[1]), utf8_name)


class CrashTests(TestCase):
    """kill -9 with streams and writes in flight loses nothing acknowledged."""

    timeout = 120

    async def test_kill_9(self):
        """Every write acknowledged before a kill -9 is there after a restart, and the database is consistent."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        db = os.path.join(tempfile.mkdtemp(), "crash.sqlite3")
        config = merge_yaml(
            BASE_CONFIG,
            f'storage: {{path: "{db}"}}\nbackend: {{url: "{fake.url}"}}\nmax_connections: 50\nlimits: {{max_queue: 500}}\nrate_limit: {{requests_per_minute: 0}}',
        )
        path = write_config(self, config)
        proc = Process(clawdbot_argv("start", "--config", path, "--no-debug-port"))
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        url = proc.url()
        auth = as_user(OWNER)
        fake.behave(pace=0.01)
        acknowledged = {}  # session id -> replies acknowledged
        created = []

        async def worker(n):
            status, _, session = await get_json(url + "/v1/sessions", method="POST", headers=auth, body={"title": f"w{n}"})
            if status != 201:
                return
            created.append(session["id"])
            acknowledged[session["id"]] = 0
            for i in range(100):
                stream = i % 2 == 0
                try:
                    status, _, raw = await get_json(
                        url + "/v1/chat/completions", method="POST", headers=auth, body={"session_id": session["id"], "stream": stream, "messages": HI}
                    )
                except Exception:
                    return
                done = status == 200 and (raw.endswith(b"data: [DONE]\n\n") if stream else isinstance(raw, dict))
                if not done:
                    return
                acknowledged[session["id"]] += 1

        workers = [ensureDeferred(worker(n)) for n in range(8)]
        await until(lambda: sum(acknowledged.values()) >= 16, what="16 replies acknowledged")  # and more in flight
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        for w in workers:
            await w
        self.assertGreater(sum(acknowledged.values()), 8)

        conn = sqlite3.connect(db)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        self.assertEqual(conn.execute("PRAGMA foreign_key_check").fetchall(), [])
        for sid, count in acknowledged.items():
            rows = conn.execute("SELECT role, incomplete FROM messages WHERE session_id = ? ORDER BY seq", (sid,)).fetchall()
            complete_pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
            self.assertGreaterEqual(len(complete_pairs), count, sid)
            self.assertEqual([r[0] for r in rows], ["user", "assistant"] * (len(rows) // 2), sid)
        conn.close()

        # The gateway starts again on the same file and serves what was stored.
        proc2 = Process(clawdbot_argv("start", "--config", path, "--no-debug-port"))
        self.addCleanup(proc2.stop)
        proc2.wait_for("Gateway listening on")
        status, _, listing = await get_json(proc2.url() + "/v1/sessions?limit=200", headers=auth)
        self.assertEqual(status, 200)
        self.assertEqual(sorted(s["id"] for s in listing["data"]), sorted(created))
