"""
Issue 20's session features: images kept with their message, per-chat
settings (system prompt, temperature), search, truncate, fork, stop and the
"replying" flag.  The storage part runs on SQLite and PostgreSQL (migration
7 included, from a database left at migration 6); the routes run in process
against both engines where storage is involved.
"""

import json
import os
import sqlite3
import tempfile
import threading
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from clawdbot.auth.identity import Principal
from clawdbot.config import HistoryConfig
from clawdbot.errors import APIError
from clawdbot.http import history as history_routes
from clawdbot.storage import store as store_module
from clawdbot.storage.history import History
from clawdbot.storage.store import MIGRATIONS, PostgresEngine, Refused, SQLiteEngine, SQLStore, decode_cursor, message_bytes
from tests.helpers import ISSUER, merge_yaml, stream_call, until
from tests.test_sessions import HI, OTHER_TEAM, OWNER, READ_ONLY_TEAM, TEAM_READER, Gateway, as_user, pg_database

PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
JPEG = "data:image/jpeg;base64,/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHSEaGw=="


class StoreFeatures:
    """The storage side, whatever the engine."""

    def make_engine(self):
        raise NotImplementedError

    def setUp(self):
        self.now = [1000.0]
        self.store = SQLStore(self.make_engine(), clock=lambda: self.now[0])
        self.addCleanup(self.store.close)

    def tick(self, seconds=1.0):
        self.now[0] += seconds

    async def test_images_stored_and_counted(self):
        """Images come back with their message, in order, and their data URLs count in the owner's bytes."""
        s = await self.store.create_session("alice", "pics")
        self.assertTrue(await self.store.append(s.id, [("user", "look", False, (PNG, JPEG)), ("assistant", "a cat", False)]))
        self.assertTrue(await self.store.append(s.id, [("user", "", False, [PNG]), ("assistant", "again", True, ())]))
        got = await self.store.get_session(s.id, with_messages=True)
        self.assertEqual([m.images for m in got.messages], [(PNG, JPEG), (), (PNG,), ()])
        self.assertEqual([m.images for m in await self.store.context(s.id, 2)], [(PNG,), ()])
        expected = sum(message_bytes(t) for t in ("look", "a cat", "", "again")) + 2 * len(PNG) + len(JPEG)
        self.assertEqual(await self.store.usage("alice"), expected)
        self.assertEqual(message_bytes("look", (PNG, JPEG)), 4 + len(PNG) + len(JPEG))
        # The API shape: parts with images, a plain string without.
        self.assertEqual(
            got.messages[0].as_dict()["content"],
            [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": PNG}}, {"type": "image_url", "image_url": {"url": JPEG}}],
        )
        self.assertEqual(got.messages[2].as_dict()["content"], [{"type": "image_url", "image_url": {"url": PNG}}])
        self.assertEqual(got.messages[1].as_dict()["content"], "a cat")

    async def test_settings(self):
        """System prompt and temperature are stored at creation, changed in any subset, cleared with None, read everywhere."""
        s = await self.store.create_session("alice", "t", system_prompt="Be brief.", temperature=0.3)
        self.assertEqual((s.system_prompt, s.temperature), ("Be brief.", 0.3))
        got = await self.store.get_session(s.id)
        self.assertEqual((got.system_prompt, got.temperature), ("Be brief.", 0.3))
        self.tick()
        await self.store.update(s.id, temperature=1.5)
        got = await self.store.get_session(s.id, with_messages=True)
        self.assertEqual((got.title, got.system_prompt, got.temperature, got.updated_at), ("t", "Be brief.", 1.5, 1001.0))
        await self.store.update(s.id, system_prompt=None, title="u")
        rows, _ = await self.store.list_sessions("alice", [])
        self.assertEqual((rows[0].title, rows[0].system_prompt, rows[0].temperature), ("u", None, 1.5))
        self.assertEqual(rows[0].as_dict()["temperature"], 1.5)
        plain = await self.store.create_session("alice", "plain")
        self.assertEqual((plain.system_prompt, plain.temperature), (None, None))
        with self.assertRaises(ValueError):
            await self.store.update(s.id, owner="bob")

    async def test_search(self):
        """Title or message text, any case, %, _ and \\ literal, with an excerpt of the first matching message."""
        a = await self.store.create_session("alice", "Trip to Kyoto")
        self.tick()
        b = await self.store.create_session("alice", "Maths")
        await self.store.append(b.id, [("user", "what is 50% of 8?", False), ("assistant", "x" * 300 + " The ANSWER is four " + "y" * 300, False)])
        self.tick()
        c = await self.store.create_session("alice", "snake_case and back\\slash")
        self.tick()
        other = await self.store.create_session("bob", "Kyoto too")
        team = await self.store.create_session("carol", "team kyoto", team="team-a")

        async def ids(query, **kw):
            rows, _ = await self.store.search_sessions("alice", kw.pop("teams", []), query, **kw)
            return [(s.id, match) for s, match in rows]

        self.assertEqual(await ids("KYOTO"), [(a.id, None)])
        self.assertEqual(await ids("kyoto", teams=["team-a"]), [(team.id, None), (a.id, None)])
        self.assertEqual(await ids("kyoto", teams=["team-a"], team="team-a"), [(team.id, None)])
        self.assertNotIn(other.id, [i for i, _ in await ids("kyoto")])
        self.assertEqual(await ids("50%"), [(b.id, "what is 50% of 8?")])
        self.assertEqual(await ids("5%8"), [])
        self.assertEqual(await ids("%"), [(b.id, "what is 50% of 8?")])
        self.assertEqual(await ids("e_c"), [(c.id, None)])
        self.assertEqual(await ids("_"), [(c.id, None)])
        self.assertEqual(await ids("k\\s"), [(c.id, None)])
        self.assertEqual(await ids("\\"), [(c.id, None)])
        [(sid, match)] = await ids("answer is")
        self.assertEqual(sid, b.id)
        self.assertEqual(len(match), 160)
        self.assertIn("The ANSWER is four", match)
        self.assertEqual(await ids("nothing like this"), [])
        # Not only ASCII folds.
        d = await self.store.create_session("alice", "Ünïcode ÉTÉ")
        self.assertEqual(await ids("été"), [(d.id, None)])
        # Paginated like the list.
        seen, cursor = [], None
        while True:
            rows, cursor = await self.store.search_sessions("alice", [], " ", limit=1, cursor=decode_cursor(cursor) if cursor else None)
            seen += [s.id for s, _ in rows]
            if cursor is None:
                break
        self.assertEqual(seen, [d.id, c.id, b.id, a.id])

    async def test_truncate(self):
        """Truncating keeps the first N messages, gives the rest's bytes back and refuses N past the count."""
        s = await self.store.create_session("alice", "t")
        await self.store.append(s.id, [("user", "q1", False, [PNG]), ("assistant", "a1", False), ("user", "q2", False, [JPEG]), ("assistant", "a2", False)])
        before = await self.store.usage("alice")
        self.tick()
        self.assertEqual(await self.store.truncate(s.id, 2), 2)
        got = await self.store.get_session(s.id, with_messages=True)
        self.assertEqual([(m.content, m.images) for m in got.messages], [("q1", (PNG,)), ("a1", ())])
        self.assertEqual(got.updated_at, 1001.0)
        self.assertEqual(await self.store.usage("alice"), before - message_bytes("q2", [JPEG]) - message_bytes("a2"))
        with self.assertRaises(Refused) as refused:
            await self.store.truncate(s.id, 3)
        self.assertEqual(refused.exception.reason, "keep")
        self.assertEqual(await self.store.truncate(s.id, 2), 0)
        # New messages go after what was kept.
        await self.store.append(s.id, [("user", "q3", False)])
        self.assertEqual(await self.store.truncate(s.id, 0), 3)
        self.assertEqual(await self.store.usage("alice"), 0)
        self.assertEqual((await self.store.get_session(s.id, with_messages=True)).messages, ())
        self.assertIsNone(await self.store.truncate("sess_gone", 0))

    async def test_fork(self):
        """A fork copies the first N messages (images too), the team and settings, and charges the new owner."""
        s = await self.store.create_session("alice", "Source", team="team-a", system_prompt="sp", temperature=0.7)
        await self.store.append(s.id, [("user", "q1", False, [PNG]), ("assistant", "a1", True), ("user", "q2", False)])
        used = await self.store.usage("alice")
        self.tick()
        f = await self.store.fork(s.id, "alice", 2)
        self.assertNotEqual(f.id, s.id)
        self.assertEqual((f.title, f.owner, f.team, f.system_prompt, f.temperature, f.created_at), ("Source", "alice", "team-a", "sp", 0.7, 1001.0))
        got = await self.store.get_session(f.id, with_messages=True)
        self.assertEqual([(m.role, m.content, m.incomplete, m.images) for m in got.messages], [("user", "q1", False, (PNG,)), ("assistant", "a1", True, ())])
        # The copies and the system prompt ("sp") are the new session's.
        self.assertEqual(await self.store.usage("alice"), used + message_bytes("q1", [PNG]) + message_bytes("a1") + 2)
        # The copy is independent of its source.
        await self.store.truncate(s.id, 0)
        self.assertEqual(len((await self.store.get_session(f.id, with_messages=True)).messages), 2)
        await self.store.append(f.id, [("user", "more", False)])
        self.assertEqual([m.content for m in (await self.store.get_session(f.id, with_messages=True)).messages], ["q1", "a1", "more"])
        whole = await self.store.fork(f.id, "alice", 3, title="Copy")
        self.assertEqual(whole.title, "Copy")
        self.assertEqual(len((await self.store.get_session(whole.id, with_messages=True)).messages), 3)
        empty = await self.store.fork(f.id, "alice", 0)
        self.assertEqual((await self.store.get_session(empty.id, with_messages=True)).messages, ())
        self.assertIsNone(await self.store.fork("sess_gone", "alice", 0))

    async def test_fork_limits(self):
        """A fork past the count, the session limit or the bytes limit stores nothing."""
        s = await self.store.create_session("alice", "t")
        await self.store.append(s.id, [("user", "x" * 100, False)])
        for keep, kw, reason in ((2, {}, "keep"), (1, {"max_sessions": 1}, "sessions"), (1, {"max_bytes": 199}, "bytes")):
            with self.assertRaises(Refused) as refused:
                await self.store.fork(s.id, "alice", keep, **kw)
            self.assertEqual(refused.exception.reason, reason)
        rows, _ = await self.store.list_sessions("alice", [])
        self.assertEqual(len(rows), 1)
        self.assertEqual(await self.store.usage("alice"), 100)
        self.assertIsNotNone(await self.store.fork(s.id, "alice", 1, max_sessions=2, max_bytes=200))
        self.assertEqual(await self.store.usage("alice"), 200)

    async def test_quota_counts_images(self):
        """The history quota check counts a turn's images: per request (413) and per owner (429)."""
        history = History(self.store)
        principal = Principal(sub="alice", issuer=ISSUER)
        s = await self.store.create_session(principal.key, "t")
        image_turn = [("user", "look", False, [PNG])]
        size = message_bytes("look", [PNG])
        with self.assertRaises(APIError) as refused:
            await history.check_quota(principal, HistoryConfig(max_bytes_per_request=size - 1), image_turn)
        self.assertEqual(refused.exception.code, "PAYLOAD_TOO_LARGE")
        # Without the image the same text passes; an empty image list counts nothing.
        (await history.check_quota(principal, HistoryConfig(max_bytes_per_request=size - 1), [("user", "look", False)]))()
        (await history.check_quota(principal, HistoryConfig(max_bytes_per_request=size + 1), image_turn + [("user", "x", False, ())]))()
        await self.store.append(s.id, image_turn)
        self.assertEqual(await self.store.usage(principal.key), size)
        with self.assertRaises(APIError) as refused:
            await history.check_quota(principal, HistoryConfig(max_bytes_per_user=2 * size - 1), image_turn)
        self.assertEqual(refused.exception.code, "QUOTA_EXCEEDED")
        self.assertEqual(history.reservations.pending, {})

    async def test_search_finds_the_exact_text_in_any_script(self):
        """Whatever an engine's case rules (final sigma, dotted I), the text as written is found: both sides are folded by the same LOWER."""
        s = await self.store.create_session("alice", "notes")
        await self.store.append(s.id, [("user", "ΟΔΟΣ in İstanbul, STRASSE", False)])
        for query in ("ΟΔΟΣ", "İstanbul", "STRASSE", "strasse"):
            rows, _ = await self.store.search_sessions("alice", [], query)
            self.assertEqual([x.id for x, _ in rows], [s.id], query)

    async def test_concurrent_prompt_changes_keep_the_bytes_right(self):
        """Prompt changes, appends and a delete racing each other leave the owner's bytes exact (each takes the owner's lock)."""
        s = await self.store.create_session("alice", "t")
        await gatherResults([ensureDeferred(self.store.update(s.id, system_prompt="p" * (100 + i))) for i in range(8)])
        got = await self.store.get_session(s.id)
        self.assertEqual(await self.store.usage("alice"), len(got.system_prompt))
        await self.store.update(s.id, system_prompt=None)
        self.assertEqual(await self.store.usage("alice"), 0)
        for _ in range(4):
            s = await self.store.create_session("alice", "t", system_prompt="q" * 50)
            await gatherResults(
                [ensureDeferred(self.store.append(s.id, [("user", "u" * 17, False)])) for _ in range(3)]
                + [ensureDeferred(self.store.delete(s.id))]
                + [ensureDeferred(self.store.update(s.id, system_prompt="r" * 300))]
            )
            self.assertIsNone(await self.store.get_session(s.id))
            self.assertEqual(await self.store.usage("alice"), 0)


class SQLiteStoreFeatures(StoreFeatures, TestCase):
    def make_engine(self):
        return SQLiteEngine(reactor, os.path.join(tempfile.mkdtemp(), "history.sqlite3"))

    async def test_search_reads_beside_the_writer(self):
        """A search runs on a reading thread of its own: while one is under way, other work (a list, a turn's store) goes on."""
        s = await self.store.create_session("alice", "notes")
        await self.store.append(s.id, [("user", "something to find", False)])
        engine = self.store.engine
        started, go = threading.Event(), threading.Event()
        run_read = engine.run_read

        def held(fn):
            def wait_then(cur):
                started.set()
                go.wait(30)
                return fn(cur)

            return run_read(wait_then)

        engine.run_read = held
        search = ensureDeferred(self.store.search_sessions("alice", [], "find"))
        await deferToThread(started.wait, 30)
        self.assertTrue(await self.store.append(s.id, [("assistant", "found", False)]))
        rows, _ = await self.store.list_sessions("alice", [])
        self.assertEqual([x.id for x in rows], [s.id])
        self.assertFalse(search.called)
        go.set()
        found, _ = await search
        self.assertEqual([x.id for x, _ in found], [s.id])


class PostgresStoreFeatures(StoreFeatures, TestCase):
    def make_engine(self):
        return PostgresEngine(reactor, pg_database(self))


# Rows as the gateway wrote them at migration 6.
OLD_SESSION = ("sess_old", "Old chat", "alice", "team-a", 100.0, 100.0)
OLD_MESSAGES = [("sess_old", 1, "user", "héllo", 100.0, False, 6), ("sess_old", 2, "assistant", "hi", 100.0, True, 2)]


def fill_old(cur, p):
    cur.execute(f"INSERT INTO sessions (id, title, owner, team, created_at, updated_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p})", OLD_SESSION)
    for row in OLD_MESSAGES:
        cur.execute(f"INSERT INTO messages (session_id, seq, role, content, created_at, incomplete, bytes) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})", row)
    cur.execute(f"INSERT INTO owner_usage (owner, bytes) VALUES ({p}, {p})", ("alice", 8))


class MigrationFrom6:
    """A database left at migration 6 migrates to 7 and keeps its rows."""

    def make_old(self):
        """A database at migration 6 with L{OLD_SESSION}; returns an engine on it."""
        raise NotImplementedError

    async def test_migrate(self):
        new = SQLStore(self.make_old())
        self.addCleanup(new.close)
        got = await new.get_session("sess_old", with_messages=True)
        self.assertEqual((got.title, got.team, got.system_prompt, got.temperature), ("Old chat", "team-a", None, None))
        self.assertEqual([(m.content, m.incomplete, m.images) for m in got.messages], [("héllo", False, ()), ("hi", True, ())])
        self.assertEqual(got.as_dict()["system_prompt"], None)
        self.assertEqual(await new.usage("alice"), 8)
        await new.append("sess_old", [("user", "pic", False, [PNG])])
        await new.update("sess_old", system_prompt="sp", temperature=2)
        got = await new.get_session("sess_old", with_messages=True)
        self.assertEqual((got.system_prompt, got.temperature, got.messages[-1].images), ("sp", 2.0, (PNG,)))
        self.assertEqual(await new.usage("alice"), 8 + message_bytes("pic", [PNG]) + len("sp"))
        self.assertEqual(await self.version(new), len(MIGRATIONS))


class SQLiteMigration(MigrationFrom6, TestCase):
    def make_old(self):
        self.path = os.path.join(tempfile.mkdtemp(), "old.sqlite3")
        conn = sqlite3.connect(self.path, isolation_level=None)
        patched = self.patch(store_module, "MIGRATIONS", MIGRATIONS[:6])
        store_module._migrate_sqlite(conn)
        patched.restore()
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], 6)
        conn.execute("BEGIN")
        fill_old(conn.cursor(), "?")
        conn.execute("COMMIT")
        conn.close()
        return SQLiteEngine(reactor, self.path)

    async def version(self, store):
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        return conn.execute("PRAGMA user_version").fetchone()[0]


class PostgresMigration(MigrationFrom6, TestCase):
    def make_old(self):
        import psycopg

        dsn = pg_database(self)
        with psycopg.connect(dsn) as conn:
            patched = self.patch(store_module, "MIGRATIONS", MIGRATIONS[:6])
            store_module._migrate_postgres(conn)
            patched.restore()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT version FROM clawdbot_schema")
                self.assertEqual(cur.fetchone()[0], 6)
                fill_old(cur, "%s")
        return PostgresEngine(reactor, dsn)

    async def version(self, store):
        def read(cur):
            cur.execute("SELECT version FROM clawdbot_schema")
            return cur.fetchone()[0]

        return await store.engine.run(read)


# --- the routes ------------------------------------------------------------------


class Routes:
    """The routes, on the engine L{storage} names."""

    def storage(self):
        raise NotImplementedError

    def start(self, extra=""):
        self.audit_path = os.path.join(tempfile.mkdtemp(), "audit.log")
        gw = super().start(merge_yaml(merge_yaml(self.storage(), f'audit_log: {{path: "{self.audit_path}"}}'), extra))
        self.history = gw.parts.history
        return gw

    def events(self, name):
        with open(self.audit_path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        return [e for e in lines if e["event"] == name]

    async def usage(self, who):
        store = self.history.store
        return await store.usage(await store.owners_of(ISSUER, who["sub"]))

    async def fill(self, sid, items):
        self.assertTrue(await self.history.store.append(sid, items))

    async def expect_400(self, who, method, path, body, words=None):
        status, _, answer = await self.call(who, method, path, body)
        self.assertEqual(status, 400, (path, body, answer))
        self.assertEqual(answer["error"]["code"], "INVALID_REQUEST")
        if words:
            self.assertIn(words, answer["error"]["details"])
        return answer

    async def test_settings(self):
        """system_prompt and temperature at creation and by PATCH (any subset, null clears), in every session object."""
        self.start("history: {max_message_chars: 50}")
        status, _, s = await self.call(OWNER, "POST", "/v1/sessions", {"title": "t", "system_prompt": "Be brief.", "temperature": 0.2})
        self.assertEqual((status, s["system_prompt"], s["temperature"]), (201, "Be brief.", 0.2))
        plain = await self.create(OWNER, "plain")
        self.assertEqual((plain["system_prompt"], plain["temperature"]), (None, None))
        sid = s["id"]
        status, _, got = await self.call(OWNER, "PATCH", f"/v1/sessions/{sid}", {"temperature": 2})
        self.assertEqual((status, got["title"], got["system_prompt"], got["temperature"]), (200, "t", "Be brief.", 2.0))
        status, _, got = await self.call(OWNER, "PATCH", f"/v1/sessions/{sid}", {"system_prompt": None, "title": "renamed"})
        self.assertEqual((got["title"], got["system_prompt"], got["temperature"]), ("renamed", None, 2.0))
        status, _, got = await self.call(OWNER, "PATCH", f"/v1/sessions/{sid}", {"system_prompt": "x" * 50, "temperature": None})
        self.assertEqual((got["system_prompt"], got["temperature"]), ("x" * 50, None))
        _, _, got = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        self.assertEqual((got["system_prompt"], got["temperature"]), ("x" * 50, None))
        _, _, listed = await self.call(OWNER, "GET", "/v1/sessions")
        self.assertEqual({s["id"]: s["system_prompt"] for s in listed["data"]}, {sid: "x" * 50, plain["id"]: None})
        _, _, exported = await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export")
        self.assertEqual(exported["system_prompt"], "x" * 50)
        for bad in (
            {"temperature": "1"},
            {"temperature": True},
            {"temperature": -0.1},
            {"temperature": 2.01},
            {"temperature": 10**400},
            {"temperature": [1]},
            {"system_prompt": 5},
            {"system_prompt": "x" * 51},
            {"system_prompt": ["a"]},
            {"system_prompt": "a\x00b"},
            {"title": None},
            {"owner": "bob"},
            {},
        ):
            await self.expect_400(OWNER, "PATCH", f"/v1/sessions/{sid}", bad)
            if bad and "title" not in bad:
                await self.expect_400(OWNER, "POST", "/v1/sessions", dict(bad, title="x"))
        _, _, got = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        self.assertEqual((got["title"], got["system_prompt"], got["temperature"]), ("renamed", "x" * 50, None))
        # Only the owner changes them.
        shared = await self.create(OWNER, "shared", team="team-a")
        self.assertEqual((await self.call(TEAM_READER, "PATCH", f"/v1/sessions/{shared['id']}", {"temperature": 1}))[0], 403)
        self.assertEqual((await self.call(TEAM_READER, "PATCH", f"/v1/sessions/{sid}", {"temperature": 1}))[0], 404)
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{shared['id']}"))[2]["temperature"], None)

    async def test_images_in_session(self):
        """Stored images come back as image_url parts (GET and JSON export) and as [image] lines in Markdown."""
        self.start()
        sid = (await self.create(OWNER, "pics"))["id"]
        await self.fill(sid, [("user", "what is this?", False, (PNG, JPEG)), ("assistant", "a cat", False), ("user", "", False, [PNG])])
        _, _, got = await self.call(OWNER, "GET", f"/v1/sessions/{sid}")
        self.assertEqual(
            [m["content"] for m in got["messages"]],
            [
                [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PNG}}, {"type": "image_url", "image_url": {"url": JPEG}}],
                "a cat",
                [{"type": "image_url", "image_url": {"url": PNG}}],
            ],
        )
        _, _, exported = await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export")
        self.assertEqual(exported["messages"], got["messages"])
        _, _, md = await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export?format=markdown")
        md = md.decode("utf-8")
        self.assertIn("what is this?\n\n[image]\n[image]\n", md)
        self.assertEqual(md.count("[image]"), 3)
        self.assertNotIn("base64", md)
        self.assertEqual(await self.usage(OWNER), message_bytes("what is this?", (PNG, JPEG)) + message_bytes("a cat") + len(PNG))

    async def test_search(self):
        """?q= finds title or message text in any case, % and _ literal, with the list's visibility, filter and pages."""
        self.start()
        trip = await self.create(OWNER, "Trip to Kyoto")
        maths = await self.create(OWNER, "Maths")
        await self.fill(maths["id"], [("user", "what is 50% of 8?", False), ("assistant", "FOUR, of course", False)])
        team = await self.create(TEAM_READER, "Kyoto team notes", team="team-a")
        hidden = await self.create(OTHER_TEAM, "Kyoto elsewhere")

        async def search(who, query, extra=""):
            status, _, body = await self.call(who, "GET", f"/v1/sessions?q={quote(query)}{extra}")
            self.assertEqual(status, 200, body)
            return [(s["id"], s["match"]) for s in body["data"]], body

        found, body = await search(OWNER, "kyoto")
        self.assertEqual(found, [(trip["id"], None)])
        self.assertEqual(set(body["data"][0]), {"id", "title", "owner", "team", "created_at", "updated_at", "system_prompt", "temperature", "match"})
        self.assertEqual((await search(TEAM_READER, "KYOTO"))[0], [(team["id"], None)])
        self.assertEqual((await search(READ_ONLY_TEAM, "kyoto"))[0], [(team["id"], None)])
        self.assertEqual((await search(OTHER_TEAM, "kyoto"))[0], [(hidden["id"], None)])
        self.assertEqual((await search(OWNER, "four"))[0], [(maths["id"], "FOUR, of course")])
        self.assertEqual((await search(OWNER, "0%"))[0], [(maths["id"], "what is 50% of 8?")])
        self.assertEqual((await search(OWNER, "5_%"))[0], [])
        self.assertEqual((await search(OWNER, "_"))[0], [])
        self.assertEqual((await search(OWNER, "zzz"))[0], [])
        # The list's options apply.
        self.assertEqual((await search(READ_ONLY_TEAM, "o", "&team=team-a"))[0], [(team["id"], None)])
        found, body = await search(OWNER, "t", "&limit=1")
        self.assertEqual(found, [(maths["id"], "what is 50% of 8?")])
        found, body = await search(OWNER, "t", f"&limit=1&cursor={body['next_cursor']}")
        self.assertEqual((found, body["next_cursor"]), ([(trip["id"], None)], None))
        for bad in ("", "x" * 201, "a\x01b", "\n"):
            await self.expect_400(OWNER, "GET", f"/v1/sessions?q={quote(bad)}", None, "'q'")
        self.assertEqual((await search(OWNER, "x" * 200))[0], [])

    async def test_truncate(self):
        """The owner keeps the first N messages; the rest's bytes go back; bad keeps and others are refused."""
        self.start()
        sid = (await self.create(OWNER, "t"))["id"]
        await self.fill(sid, [("user", "q1", False, [PNG]), ("assistant", "a1", False), ("user", "q2", False, [JPEG]), ("assistant", "a2", True)])
        used = await self.usage(OWNER)
        path = f"/v1/sessions/{sid}/truncate"
        for bad in ({}, {"keep": -1}, {"keep": "1"}, {"keep": True}, {"keep": 1.5}, {"keep": None}, {"keep": 10**30}, {"keep": 1, "x": 1}, {"keep": 5}):
            await self.expect_400(OWNER, "POST", path, bad)
        await self.expect_400(OWNER, "POST", path, [1])
        self.assertEqual(await self.usage(OWNER), used)
        status, _, got = await self.call(OWNER, "POST", path, {"keep": 2})
        self.assertEqual(status, 200, got)
        self.assertEqual((got["id"], got["title"]), (sid, "t"))
        self.assertEqual([m["role"] for m in got["messages"]], ["user", "assistant"])
        self.assertEqual(got["messages"][0]["content"][1], {"type": "image_url", "image_url": {"url": PNG}})
        self.assertEqual(await self.usage(OWNER), used - message_bytes("q2", [JPEG]) - message_bytes("a2"))
        [event] = self.events("history.deleted")
        self.assertEqual((event["object"], event["details"]), (sid, {"kept": 2, "messages": 2}))
        self.assertEqual(len((await self.call(OWNER, "GET", f"/v1/sessions/{sid}"))[2]["messages"]), 2)
        # Keeping everything changes nothing (and audits nothing).
        self.assertEqual((await self.call(OWNER, "POST", path, {"keep": 2}))[0], 200)
        self.assertEqual(len(self.events("history.deleted")), 1)
        # Only the owner.
        shared = (await self.create(OWNER, "shared", team="team-a"))["id"]
        await self.fill(shared, [("user", "q", False), ("assistant", "a", False)])
        self.assertEqual((await self.call(TEAM_READER, "POST", f"/v1/sessions/{shared}/truncate", {"keep": 0}))[0], 403)
        self.assertEqual((await self.call(READ_ONLY_TEAM, "POST", f"/v1/sessions/{shared}/truncate", {"keep": 0}))[0], 403)
        self.assertEqual((await self.call(TEAM_READER, "POST", path, {"keep": 0}))[0], 404)
        self.assertEqual((await self.call(OWNER, "POST", "/v1/sessions/sess_nope/truncate", {"keep": 0}))[0], 404)
        self.assertEqual(len((await self.call(OWNER, "GET", f"/v1/sessions/{shared}"))[2]["messages"]), 2)
        self.assertEqual((await self.call(OWNER, "POST", path, {"keep": 0}))[2]["messages"], [])
        self.assertEqual(await self.usage(OWNER), message_bytes("q") + message_bytes("a"))

    async def test_truncate_while_replying(self):
        """A truncate while a turn of the session runs is refused; once it ended, it goes through."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        await self.fill(sid, [("user", "q", False), ("assistant", "a", False)])
        gate = Deferred()
        turn = ensureDeferred(self.history.one_at_a_time(sid, lambda: gate))
        self.history.stoppers[sid] = lambda: None  # as a running turn registers itself
        await self.expect_400(OWNER, "POST", f"/v1/sessions/{sid}/truncate", {"keep": 0}, "a reply is still being written in this chat")
        del self.history.stoppers[sid]
        gate.callback(None)
        await turn
        self.assertEqual((await self.call(OWNER, "POST", f"/v1/sessions/{sid}/truncate", {"keep": 0}))[0], 200)

    async def test_fork(self):
        """A fork copies the first N messages, images, team and settings; counts toward the limits; owner only."""
        self.start("history: {max_sessions_per_user: 4}")
        status, _, source = await self.call(OWNER, "POST", "/v1/sessions", {"title": "Source", "team": "team-a", "system_prompt": "sp", "temperature": 1.25})
        sid = source["id"]
        await self.fill(sid, [("user", "q1", False, [PNG]), ("assistant", "a1", True), ("user", "q2", False)])
        used = await self.usage(OWNER)
        path = f"/v1/sessions/{sid}/fork"
        status, _, fork = await self.call(OWNER, "POST", path, {"keep": 2})
        self.assertEqual(status, 201, fork)
        self.assertNotEqual(fork["id"], sid)
        self.assertEqual(
            (fork["title"], fork["owner"], fork["team"], fork["system_prompt"], fork["temperature"]), ("Source", "alice", "team-a", "sp", 1.25)
        )
        self.assertEqual(
            [(m["role"], m["content"], m["incomplete"]) for m in fork["messages"]],
            [("user", [{"type": "text", "text": "q1"}, {"type": "image_url", "image_url": {"url": PNG}}], False), ("assistant", "a1", True)],
        )
        self.assertEqual(await self.usage(OWNER), used + message_bytes("q1", [PNG]) + message_bytes("a1") + len("sp"))
        _, _, again = await self.call(OWNER, "GET", f"/v1/sessions/{fork['id']}")
        self.assertEqual(again["messages"], fork["messages"])
        status, _, named = await self.call(OWNER, "POST", path, {"keep": 0, "title": "  Branch "})
        self.assertEqual((status, named["title"], named["messages"]), (201, "Branch", []))
        for bad in ({}, {"keep": -1}, {"keep": 4}, {"keep": "2"}, {"keep": False}, {"keep": 1, "title": ""}, {"keep": 1, "title": 3}, {"keep": 1, "team": "x"}):
            await self.expect_400(OWNER, "POST", path, bad)
        self.assertEqual((await self.call(TEAM_READER, "POST", path, {"keep": 1}))[0], 403)
        self.assertEqual((await self.call(OTHER_TEAM, "POST", path, {"keep": 1}))[0], 404)
        self.assertEqual((await self.call(OWNER, "POST", "/v1/sessions/sess_nope/fork", {"keep": 0}))[0], 404)
        # The fourth session is the last.
        self.assertEqual((await self.call(OWNER, "POST", path, {"keep": 3}))[0], 201)
        await self.expect_400(OWNER, "POST", path, {"keep": 0}, "limit of 4 sessions")
        _, _, listed = await self.call(OWNER, "GET", "/v1/sessions")
        self.assertEqual(len(listed["data"]), 4)

    async def test_fork_quota(self):
        """A fork that would pass the stored-bytes quota is a 429 that stores nothing."""
        self.start("history: {max_bytes_per_user: 150}")
        sid = (await self.create(OWNER))["id"]
        await self.fill(sid, [("user", "x" * 100, False)])
        status, headers, body = await self.call(OWNER, "POST", f"/v1/sessions/{sid}/fork", {"keep": 1})
        self.assertEqual((status, body["error"]["code"]), (429, "QUOTA_EXCEEDED"))
        self.assertEqual(headers.getRawHeaders("retry-after"), ["3600"])
        self.assertEqual(await self.usage(OWNER), 100)
        self.assertEqual(len((await self.call(OWNER, "GET", "/v1/sessions"))[2]["data"]), 1)
        # Nothing to copy costs nothing.
        self.assertEqual((await self.call(OWNER, "POST", f"/v1/sessions/{sid}/fork", {"keep": 0}))[0], 201)

    async def test_replying_and_stop(self):
        """GET says replying while a turn holds the session; stop calls the turn's stopper; owner only; 204 either way."""
        self.start()
        shared = (await self.create(OWNER, "shared", team="team-a"))["id"]
        self.assertIs((await self.call(OWNER, "GET", f"/v1/sessions/{shared}"))[2]["replying"], False)
        _, _, listed = await self.call(OWNER, "GET", "/v1/sessions")
        self.assertNotIn("replying", listed["data"][0])
        gate = Deferred()
        turn = ensureDeferred(self.history.one_at_a_time(shared, lambda: gate))
        stops = []
        self.history.stoppers[shared] = lambda: stops.append(True)
        self.assertIs((await self.call(OWNER, "GET", f"/v1/sessions/{shared}"))[2]["replying"], True)
        self.assertIs((await self.call(TEAM_READER, "GET", f"/v1/sessions/{shared}"))[2]["replying"], True)
        self.assertEqual((await self.call(TEAM_READER, "POST", f"/v1/sessions/{shared}/stop"))[0], 403)
        self.assertEqual((await self.call(READ_ONLY_TEAM, "POST", f"/v1/sessions/{shared}/stop"))[0], 403)
        self.assertEqual((await self.call(OTHER_TEAM, "POST", f"/v1/sessions/{shared}/stop"))[0], 404)
        self.assertEqual(stops, [])
        status, _, body = await self.call(OWNER, "POST", f"/v1/sessions/{shared}/stop")
        self.assertEqual((status, body, stops), (204, None, [True]))
        del self.history.stoppers[shared]
        gate.callback(None)
        await turn
        self.assertIs((await self.call(OWNER, "GET", f"/v1/sessions/{shared}"))[2]["replying"], False)
        self.assertEqual((await self.call(OWNER, "POST", f"/v1/sessions/{shared}/stop"))[0], 204)
        self.assertEqual(stops, [True])
        self.assertEqual((await self.call(OWNER, "POST", "/v1/sessions/sess_nope/stop"))[0], 404)
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{shared}/nothing"))[0], 404)

    async def test_scopes(self):
        """Truncate, fork and stop need chat:write even from the owner (403 before anything changes); search needs chat:read."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        await self.fill(sid, [("user", "q", False)])
        reader = dict(OWNER, scope="chat:read")
        for child, body in (("truncate", {"keep": 0}), ("fork", {"keep": 1}), ("stop", None)):
            status, _, answer = await self.call(reader, "POST", f"/v1/sessions/{sid}/{child}", body)
            self.assertEqual((status, answer["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), child)
            self.assertEqual((await self.call(reader, "GET", f"/v1/sessions/{sid}/{child}"))[0], 405, child)
        self.assertEqual(len((await self.call(OWNER, "GET", f"/v1/sessions/{sid}"))[2]["messages"]), 1)
        self.assertEqual(len((await self.call(OWNER, "GET", "/v1/sessions"))[2]["data"]), 1)
        self.assertEqual((await self.call(reader, "GET", "/v1/sessions?q=t"))[0], 200)
        self.assertEqual((await self.call(dict(OWNER, scope=""), "GET", "/v1/sessions?q=t"))[0], 403)

    async def test_stop_a_real_turn(self):
        """A streamed turn that stalls shows as replying; stop ends it and what was said is stored incomplete."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        self.fake.behave(stall_after=3, times=1)
        streamed = stream_call(self.gw.url + "/v1/chat/completions", {"session_id": sid, "stream": True, "messages": HI}, as_user(OWNER))
        await until(lambda: streamed.data.count(b"data: ") >= 2, what="two chunks")
        self.assertIs((await self.call(OWNER, "GET", f"/v1/sessions/{sid}"))[2]["replying"], True)
        await self.expect_400(OWNER, "POST", f"/v1/sessions/{sid}/truncate", {"keep": 0}, "a reply is still being written")
        self.assertEqual((await self.call(OWNER, "POST", f"/v1/sessions/{sid}/stop"))[0], 204)
        await streamed.done
        session = (await self.call(OWNER, "GET", f"/v1/sessions/{sid}"))[2]
        self.assertIs(session["replying"], False)
        self.assertEqual([(m["role"], m["incomplete"]) for m in session["messages"]], [("user", False), ("assistant", True)])
        self.assertTrue(self.fake.reply_text.startswith(session["messages"][1]["content"]))

    async def test_search_is_bounded(self):
        """
        A search spends the request budget, and one that runs past its time
        limit is stopped with a 400 that says so (the storage is free for
        the others at once).
        """
        self.patch(history_routes, "SEARCH_TIME", 0.001)
        self.start("rate_limit: {requests_per_minute: 3}")
        sid = (await self.create(OWNER, "big"))["id"]
        # About 10 MB to read: far past a millisecond on either engine.
        await self.fill(sid, [("user", f"{i} " + "a" * 2000, False) for i in range(5000)])
        answer = await self.expect_400(OWNER, "GET", "/v1/sessions?q=" + "a" * 199 + "b", None, "took longer than")
        self.assertNotIn("interrupt", json.dumps(answer).lower())
        self.assertNotIn("statement", json.dumps(answer).lower())
        # The store still answers, and the budget was spent by the searches only.
        self.assertEqual((await self.call(OWNER, "GET", "/v1/sessions"))[0], 200)
        await self.expect_400(OWNER, "GET", "/v1/sessions?q=zz" + "a" * 100, None, "took longer than")
        await self.expect_400(OWNER, "GET", "/v1/sessions?q=yy" + "a" * 100, None, "took longer than")
        status, _, answer = await self.call(OWNER, "GET", "/v1/sessions?q=x")
        self.assertEqual((status, answer["error"]["code"]), (429, "RATE_LIMITED"))

    async def test_search_snippets_of_others_are_audited(self):
        """A team reader whose search shows what a teammate's chat says leaves a history.read_other event; titles alone and own chats do not."""
        self.start()
        team = (await self.create(OWNER, "launch plans", team="team-a"))["id"]
        await self.fill(team, [("user", "the launch code is ZEBRA-42", False)])
        mine = (await self.create(TEAM_READER, "my notes"))["id"]
        await self.fill(mine, [("user", "ZEBRA crossing", False)])
        status, _, body = await self.call(TEAM_READER, "GET", "/v1/sessions?q=zebra")
        self.assertEqual(status, 200, body)
        self.assertEqual({s["id"] for s in body["data"]}, {team, mine})
        status, _, body = await self.call(TEAM_READER, "GET", "/v1/sessions?q=launch%20plans")
        self.assertEqual([(s["id"], s["match"]) for s in body["data"]], [(team, None)])
        events = self.events("history.read_other")
        self.assertEqual([(e["object"], e["details"]["via"], e["details"]["team"]) for e in events], [(team, "search", "team-a")])

    async def test_system_prompt_counts_in_the_quota(self):
        """A system prompt is stored history: it counts in the owner's bytes (create, change, fork, delete) and is refused past the quota."""
        self.start("history: {max_bytes_per_user: 1000}")
        prompt = "é" * 200  # 400 bytes
        status, _, s = await self.call(OWNER, "POST", "/v1/sessions", {"title": "t", "system_prompt": prompt})
        self.assertEqual(status, 201, s)
        self.assertEqual(await self.usage(OWNER), 400)
        status, _, body = await self.call(OWNER, "PATCH", f"/v1/sessions/{s['id']}", {"system_prompt": "x" * 1001})
        self.assertEqual((status, body["error"]["code"]), (429, "QUOTA_EXCEEDED"))
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{s['id']}"))[2]["system_prompt"], prompt)
        status, _, body = await self.call(OWNER, "POST", "/v1/sessions", {"system_prompt": "y" * 700})
        self.assertEqual((status, body["error"]["code"]), (429, "QUOTA_EXCEEDED"))
        self.assertEqual(len((await self.call(OWNER, "GET", "/v1/sessions"))[2]["data"]), 1)
        self.assertEqual((await self.call(OWNER, "PATCH", f"/v1/sessions/{s['id']}", {"system_prompt": "short"}))[0], 200)
        self.assertEqual(await self.usage(OWNER), 5)
        status, _, fork = await self.call(OWNER, "POST", f"/v1/sessions/{s['id']}/fork", {"keep": 0})
        self.assertEqual(status, 201, fork)
        self.assertEqual(await self.usage(OWNER), 10)
        self.assertEqual((await self.call(OWNER, "DELETE", f"/v1/sessions/{fork['id']}"))[0], 204)
        self.assertEqual((await self.call(OWNER, "PATCH", f"/v1/sessions/{s['id']}", {"system_prompt": None}))[0], 200)
        self.assertEqual(await self.usage(OWNER), 0)

    async def test_fork_of_a_team_chat_by_a_non_member(self):
        """A chat forked by an owner no longer in its team is private: a fork cannot plant a chat in a team (as a create cannot)."""
        self.start()
        sid = (await self.create(OWNER, "team chat", team="team-a"))["id"]
        status, _, kept = await self.call(OWNER, "POST", f"/v1/sessions/{sid}/fork", {"keep": 0})
        self.assertEqual((status, kept["team"]), (201, "team-a"))
        outsider = dict(OWNER, teams=[])
        status, _, body = await self.call(outsider, "POST", "/v1/sessions", {"team": "team-a"})
        self.assertEqual(status, 403, body)
        status, _, forked = await self.call(outsider, "POST", f"/v1/sessions/{sid}/fork", {"keep": 0, "title": "planted"})
        self.assertEqual((status, forked["team"]), (201, None))
        listed = (await self.call(TEAM_READER, "GET", "/v1/sessions?team=team-a"))[2]["data"]
        self.assertNotIn(forked["id"], [x["id"] for x in listed])

    async def test_clear_and_delete_stop_a_running_reply(self):
        """Clearing a chat while its reply streams stops the reply and nothing is stored after the clear; deleting one stops its reply too."""
        self.start()
        sid = (await self.create(OWNER))["id"]
        await self.fill(sid, [("user", "old", False), ("assistant", "old answer", False)])
        self.fake.behave(stall_after=3, times=1)
        streamed = stream_call(self.gw.url + "/v1/chat/completions", {"session_id": sid, "stream": True, "messages": HI}, as_user(OWNER))
        await until(lambda: streamed.data.count(b"data: ") >= 2, what="two chunks")
        status, _, body = await self.call(OWNER, "POST", "/v1/chat/completions", {"session_id": sid, "messages": []})
        self.assertEqual((status, body["object"]), (200, "session.context_cleared"))
        await streamed.done
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{sid}"))[2]["messages"], [])
        self.assertFalse(self.history.busy(sid))

        other = (await self.create(OWNER))["id"]
        self.fake.behave(stall_after=3, times=1)
        streamed = stream_call(self.gw.url + "/v1/chat/completions", {"session_id": other, "stream": True, "messages": HI}, as_user(OWNER))
        await until(lambda: streamed.data.count(b"data: ") >= 2, what="two chunks")
        self.assertEqual((await self.call(OWNER, "DELETE", f"/v1/sessions/{other}"))[0], 204)
        await streamed.done
        await until(lambda: not self.history.busy(other), what="the reply stopping")
        self.assertEqual((await self.call(OWNER, "GET", f"/v1/sessions/{other}"))[0], 404)

    async def test_export_spends_the_request_budget(self):
        """An export reads the whole chat: it spends a request of the budget, like a search."""
        self.start("rate_limit: {requests_per_minute: 2}")
        sid = (await self.create(OWNER))["id"]
        statuses = [(await self.call(OWNER, "GET", f"/v1/sessions/{sid}/export"))[0] for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 429])


class SQLiteRoutes(Routes, Gateway):
    def storage(self):
        return f'storage: {{path: "{os.path.join(tempfile.mkdtemp(), "history.sqlite3")}"}}'


class PostgresRoutes(Routes, Gateway):
    def storage(self):
        return f'storage: {{backend: postgresql, dsn: "{pg_database(self)}"}}'
