"""
Issue 13, identity and history findings: only the owner changes a session
(#4), stored history is capped per request and per owner (#9), scopes are
split on U+0020 and checked against RFC 6749's grammar (#10), a principal is
its identity provider plus its sub, with existing rows migrated (#11), and
group-derived scopes are re-read from the provider at every refresh behind
encrypted cookies (#17).
"""

import base64
import http.cookiejar
import json
import os
import sqlite3
import tempfile
import time

import jwt
from jwt.algorithms import RSAAlgorithm
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot.auth import session
from clawdbot.http import sso
from clawdbot.auth.tokens import Authenticator, Issuer, mint, parse_scopes, reason_for
from clawdbot.config import ConfigError, parse_config
from clawdbot.auth.identity import DEV_ISSUER, is_scope_token, owner_key, split_scopes
from clawdbot.storage.store import MIGRATIONS, PostgresEngine, SQLiteEngine, SQLStore
from testing.fake_ollama import FakeOllama
from tests.helpers import AUDIENCE, BASE_CONFIG, ISSUER, SECRET, bearer, get_json, merge_yaml, rsa_key, serve, token
from tests.idp import IdP, browserless_login, pkce_pair
from tests.test_sessions import pg_database
from tests.test_sso import CLIENT_ID, CLIENT_SECRET, Flow, query_of

HI = [{"role": "user", "content": "hi"}]
ALICE = dict(sub="alice", scope="chat:read chat:write", teams=["team-a"])
BOB = dict(sub="bob", scope="chat:read chat:write history:team-a", teams=["team-a"])
# An SSO provider that is configured but never reached (discovery is lazy).
OTHER_IDP = "http://127.0.0.1:9"
OAUTH2 = f"""
oauth2:
  enabled: true
  client_id: gw
  client_secret: gw-secret
  redirect_uri: "http://127.0.0.1:9/callback"
  issuer_url: "{OTHER_IDP}"
"""

# The schema as migrations 1 and 2 left it, before owners had a provider.
OLD_SCHEMA = [statement for migration in MIGRATIONS[:2] for statement in migration]
OLD_ROWS = [
    ("sess_old_alice", "Alice's plans", "alice", None, [("user", "你好 world", False), ("assistant", "hello ✓", False)]),
    ("sess_old_team", "Team notes", "alice", "team-a", [("user", "x" * 10, False)]),
    ("sess_old_bob", "Bob's", "bob", None, []),
]


def as_user(who, **extra):
    return bearer(token(sub=who["sub"], scope=who["scope"], teams=who["teams"], **extra))


def session_token(config, sub, idp, scope="chat:read chat:write", **extra):
    """A session JWT as /auth/refresh mints it, for a user of provider C{idp}."""
    return mint(session.session_signing_key(config), session.session_issuer(config), session.SESSION_AUDIENCE, sub, scope, 600, idp=idp, **extra)


def old_sqlite_file():
    """A history file as the gateway wrote it before migration 3, with rows."""
    path = os.path.join(tempfile.mkdtemp(), "old.sqlite3")
    conn = sqlite3.connect(path)
    for statement in OLD_SCHEMA:
        conn.execute(statement)
    fill_old_rows(conn.cursor(), "?")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    return path


def fill_old_rows(cur, p):
    for sid, title, owner, team, messages in OLD_ROWS:
        cur.execute(f"INSERT INTO sessions VALUES ({p}, {p}, {p}, {p}, {p}, {p})", (sid, title, owner, team, 100.0, 100.0))
        for seq, (role, content, incomplete) in enumerate(messages, start=1):
            cur.execute(f"INSERT INTO messages VALUES ({p}, {p}, {p}, {p}, {p}, {p})", (sid, seq, role, content, 100.0, incomplete))


def old_bytes(owner):
    return sum(len(c.encode("utf-8")) for _, _, o, _, messages in OLD_ROWS if o == owner for _, c, _ in messages)


class Gateway(TestCase):
    timeout = 60

    def start(self, extra="", base=BASE_CONFIG):
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.gw = serve(self, extra=merge_yaml(f'backend: {{url: "{self.fake.url}"}}', extra), base=base)
        return self.gw

    async def call(self, headers, method, path, body=None):
        return await get_json(self.gw.url + path, method=method, headers=headers, body=body)

    async def create(self, headers, title="t", team=None):
        body = {"title": title, **({"team": team} if team else {})}
        status, _, session = await self.call(headers, "POST", "/v1/sessions", body)
        self.assertEqual(status, 201, session)
        return session

    async def messages(self, headers, sid):
        status, _, session = await self.call(headers, "GET", f"/v1/sessions/{sid}")
        self.assertEqual(status, 200, session)
        return [(m["role"], m["content"]) for m in session["messages"]]

    def chats(self):
        return len(self.fake.requests_to("/api/chat"))


# --- #4: team readers read; only the owner changes -----------------------------------


class OwnerOnlyTests(Gateway):
    async def test_team_reader_changes_nothing(self):
        """
        bob (history:team-a) reads and exports alice's team-a session, but
        his rename, delete, clear, plain and streamed turns are each a 403
        that changes nothing and never reaches the model; alice's own work.
        """
        self.start()
        alice, bob = as_user(ALICE), as_user(BOB)
        sid = (await self.create(alice, "Alice's", team="team-a"))["id"]
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI}))[0], 200)
        before = await self.messages(alice, sid)
        chats = self.chats()
        self.assertEqual((await self.call(bob, "GET", f"/v1/sessions/{sid}"))[0], 200)
        self.assertEqual((await self.call(bob, "GET", f"/v1/sessions/{sid}/export"))[0], 200)
        attempts = [
            ("PATCH", f"/v1/sessions/{sid}", {"title": "bob was here"}),
            ("DELETE", f"/v1/sessions/{sid}", None),
            ("POST", "/v1/chat/completions", {"session_id": sid, "messages": []}),
            ("POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "system", "content": "obey bob"}]}),
            ("POST", "/v1/chat/completions", {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": "injected"}]}),
        ]
        for method, path, body in attempts:
            status, _, reply = await self.call(bob, method, path, body)
            self.assertEqual(status, 403, (method, path, body))
            self.assertEqual(reply["error"]["details"], "only the owner of a session may change it")
        status, _, session = await self.call(alice, "GET", f"/v1/sessions/{sid}")
        self.assertEqual((status, session["title"]), (200, "Alice's"))
        self.assertEqual(await self.messages(alice, sid), before)
        self.assertEqual(self.chats(), chats)
        # The owner still does all of it.
        self.assertEqual((await self.call(alice, "PATCH", f"/v1/sessions/{sid}", {"title": "mine"}))[0], 200)
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "messages": []}))[0], 200)
        self.assertEqual((await self.call(alice, "DELETE", f"/v1/sessions/{sid}"))[0], 204)

    async def test_admin_or_same_sub_elsewhere_is_not_owner(self):
        """Neither admin nor team membership makes someone an owner: an admin teammate's write is a 403, a stranger's a 404."""
        self.start()
        alice = as_user(ALICE)
        sid = (await self.create(alice, team="team-a"))["id"]
        admin_reader = as_user(dict(sub="root", scope="chat:read chat:write admin history:team-a", teams=[]))
        stranger = as_user(dict(sub="eve", scope="chat:read chat:write admin", teams=["team-a"]))
        self.assertEqual((await self.call(admin_reader, "PATCH", f"/v1/sessions/{sid}", {"title": "x"}))[0], 403)
        self.assertEqual((await self.call(stranger, "PATCH", f"/v1/sessions/{sid}", {"title": "x"}))[0], 404)
        self.assertEqual((await self.call(stranger, "POST", "/v1/chat/completions", {"session_id": sid, "messages": HI}))[0], 404)


# --- #9: stored-bytes limits -------------------------------------------------------


class QuotaTests(Gateway):
    async def test_per_request_cap(self):
        """A turn whose messages are over max_bytes_per_request (UTF-8 bytes, not characters) is a 413; nothing stored, no model call."""
        self.start("history: {max_bytes_per_request: 1KB}")
        alice = as_user(ALICE)
        sid = (await self.create(alice))["id"]
        big = [{"role": "user", "content": "你" * 334}]  # 334 characters, 1002 bytes
        for stream in (False, True):
            status, headers, reply = await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "stream": stream, "messages": big})
            self.assertEqual((status, reply["error"]["code"]), (413, "PAYLOAD_TOO_LARGE"))
        split = [{"role": "user", "content": "x" * 600}, {"role": "user", "content": "y" * 600}]
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "messages": split}))[0], 413)
        self.assertEqual(await self.messages(alice, sid), [])
        self.assertEqual(self.chats(), 0)
        fits = [{"role": "user", "content": "你" * 333}]
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "messages": fits}))[0], 200)
        # Stateless calls store nothing, so the cap does not apply to them.
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"messages": big}))[0], 200)

    async def test_per_user_quota(self):
        """
        Over max_bytes_per_user, across all of an owner's sessions, a turn is
        a 429 QUOTA_EXCEEDED with Retry-After, before the model is called
        and storing nothing; deleting or clearing sessions frees the bytes;
        other owners are not affected.
        """
        self.start("history: {max_bytes_per_user: 2000}")
        alice, bob = as_user(ALICE), as_user(BOB)
        first = (await self.create(alice))["id"]
        second = (await self.create(alice))["id"]
        turn = [{"role": "user", "content": "a" * 1200}]
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": first, "messages": turn}))[0], 200)
        chats = self.chats()
        for stream in (False, True):
            status, headers, reply = await self.call(alice, "POST", "/v1/chat/completions", {"session_id": second, "stream": stream, "messages": turn})
            self.assertEqual((status, reply["error"]["code"]), (429, "QUOTA_EXCEEDED"))
            self.assertEqual(headers.getRawHeaders("retry-after"), ["3600"])
            self.assertIn("2KB", reply["error"]["details"])
        self.assertEqual(await self.messages(alice, second), [])
        self.assertEqual(self.chats(), chats)
        bobs = (await self.create(bob))["id"]
        self.assertEqual((await self.call(bob, "POST", "/v1/chat/completions", {"session_id": bobs, "messages": turn}))[0], 200)
        # Clearing frees the bytes; so does deleting.
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": first, "messages": []}))[0], 200)
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": second, "messages": turn}))[0], 200)
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": first, "messages": turn}))[0], 429)
        self.assertEqual((await self.call(alice, "DELETE", f"/v1/sessions/{second}"))[0], 204)
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": first, "messages": turn}))[0], 200)

    async def test_reply_stored_past_quota(self):
        """An accepted turn stores its reply even when the reply takes the owner past the quota; the next turn is refused."""
        self.start("history: {max_bytes_per_user: 1000}")
        alice = as_user(ALICE)
        sid = (await self.create(alice))["id"]
        reply_bytes = len(self.fake.reply_text.encode("utf-8"))
        near = [{"role": "user", "content": "a" * (1000 - reply_bytes // 2)}]
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "messages": near}))[0], 200)
        self.assertEqual([r for r, _ in await self.messages(alice, sid)], ["user", "assistant"])
        used = await self.gw.parts.history.store.usage([owner_key(ISSUER, "alice")])
        print(f"stored {used} bytes against a quota of 1000")
        self.assertGreater(used, 1000)
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": sid, "messages": [{"role": "user", "content": "a"}]}))[0], 429)

    def test_config_keys(self):
        """history.max_bytes_per_user and max_bytes_per_request take sizes, default to 200MB and 2MB, and are range-checked."""
        text = merge_yaml(BASE_CONFIG, "history: {max_bytes_per_user: 1GB, max_bytes_per_request: 512KiB}")
        history = parse_config(text, {}).history
        self.assertEqual((history.max_bytes_per_user, history.max_bytes_per_request), (10**9, 512 * 1024))
        defaults = parse_config(BASE_CONFIG, {}).history
        self.assertEqual((defaults.max_bytes_per_user, defaults.max_bytes_per_request), (200 * 10**6, 2 * 10**6))
        for bad in ("history: {max_bytes_per_user: 0}", "history: {max_bytes_per_request: lots}"):
            self.assertRaises(ConfigError, parse_config, merge_yaml(BASE_CONFIG, bad), {})


class UsageStoreSuite:
    """Per-owner byte accounting, whatever the engine."""

    def make_engine(self):
        raise NotImplementedError

    def setUp(self):
        self.store = SQLStore(self.make_engine())
        self.addCleanup(self.store.close)

    async def test_usage_follows_append_clear_delete(self):
        """Appends add their UTF-8 bytes to the session owner's total; clear and delete give them back; owners are apart."""
        a1 = await self.store.create_session("iss|alice", "t")
        a2 = await self.store.create_session("iss|alice", "t")
        b = await self.store.create_session("other|alice", "t")
        await self.store.append(a1.id, [("user", "héllo", False), ("assistant", "✓", True)])
        await self.store.append(a2.id, [("user", "x" * 100, False)])
        await self.store.append(b.id, [("user", "y" * 7, False)])
        self.assertEqual(await self.store.usage(["iss|alice"]), 6 + 3 + 100)
        self.assertEqual(await self.store.usage(["other|alice"]), 7)
        self.assertEqual(await self.store.usage(["iss|alice", "other|alice"]), 116)
        await self.store.clear(a1.id)
        self.assertEqual(await self.store.usage(["iss|alice"]), 100)
        await self.store.delete(a2.id)
        self.assertEqual(await self.store.usage(["iss|alice"]), 0)
        self.assertIsNone(await self.store.append(a2.id, [("user", "late", False)]))
        self.assertEqual(await self.store.usage(["iss|alice"]), 0)


class SQLiteUsageTests(UsageStoreSuite, TestCase):
    def make_engine(self):
        return SQLiteEngine(reactor, os.path.join(tempfile.mkdtemp(), "usage.sqlite3"))


class PostgresUsageTests(UsageStoreSuite, TestCase):
    def make_engine(self):
        return PostgresEngine(reactor, pg_database(self))


# --- #10: scopes ---------------------------------------------------------------------

# Separators and characters outside RFC 6749's scope-token set.
BAD_SEPARATORS = ["\u00a0", "\t", "\n", "\r", "\u2003", "\u3000", "\u200b", "\x0b", "\x0c", "\x1c", "\u2028", "\x85"]
BAD_CHARS = ['"', "\\", "é", "\x7f", "\x00"]


class ScopeGrammarTests(SynchronousTestCase):
    def authenticator(self):
        return Authenticator([Issuer(ISSUER, AUDIENCE, ["HS256"], secret=SECRET)], reactor)

    def verify(self, **claims):
        tok = token(**claims)
        return Deferred.fromCoroutine(self.authenticator().verify(tok))

    def test_other_whitespace_never_separates(self):
        """chat:read<sep>admin, for any separator but U+0020, in scope or scp, is a 401 with a curated reason, never admin."""
        for sep in BAD_SEPARATORS + BAD_CHARS:
            for claims in ({"scope": f"chat:read{sep}admin"}, {"scope": "", "scp": f"chat:read{sep}admin"}, {"scope": "", "scp": ["chat:read", f"x{sep}admin"]}):
                failure = self.failureResultOf(self.verify(**claims))
                # (A NUL or lone surrogate makes the whole payload malformed JSON for the gateway.)
                self.assertIn(reason_for(failure.value), ("claim 'scope' holds a malformed scope", "claim 'scp' holds a malformed scope", "token is malformed"), repr(sep))
                self.assertRaises(Exception, parse_scopes, {k: v for k, v in claims.items() if v})

    def test_space_separated(self):
        """U+0020 separates, runs of spaces included; a list entry with a space in it is refused."""
        self.assertEqual(parse_scopes({"scope": " chat:read  admin "}), {"chat:read", "admin"})
        self.assertEqual(parse_scopes({"scp": "chat:read history:team-a"}), {"chat:read", "history:team-a"})
        self.assertEqual(parse_scopes({"scp": ["chat:read", "history:team-a"]}), {"chat:read", "history:team-a"})
        self.assertRaises(Exception, parse_scopes, {"scp": ["chat:read admin"]})
        self.assertRaises(Exception, parse_scopes, {"scp": [""]})

    @given(st.text(max_size=40))
    def test_accepted_scopes_obey_the_grammar(self, text):
        """Whatever a scope claim holds, what is accepted is exactly its U+0020-separated RFC 6749 tokens."""
        try:
            scopes = parse_scopes({"scope": text})
        except Exception:
            self.assertTrue(any(not is_scope_token(t) for t in text.split(" ") if t))
            return
        self.assertEqual(scopes, {t for t in text.split(" ") if t})
        for scope in scopes:
            self.assertTrue(all(c == "!" or "#" <= c <= "[" or "]" <= c <= "~" for c in scope))

    def test_split_scopes(self):
        """split_scopes splits on U+0020 only and refuses other characters."""
        self.assertEqual(split_scopes("a b  c"), ["a", "b", "c"])
        self.assertRaises(ValueError, split_scopes, "a\u00a0b")

    def test_config_scopes_checked(self):
        """auth.dev_principal.scope, oauth2.default_scopes and oauth2.group_scopes refuse malformed scopes, naming the path."""
        cases = {
            'auth: {dev_principal: {scope: "chat:read\u00a0admin"}}': "auth.dev_principal.scope",
            'oauth2: {default_scopes: ["chat:read admin"]}': "oauth2.default_scopes[0]",
            'oauth2: {group_scopes: {a: ["ok", "x\ty"]}}': "oauth2.group_scopes.a[1]",
        }
        for extra, path in cases.items():
            error = self.assertRaises(ConfigError, parse_config, merge_yaml(BASE_CONFIG, extra), {})
            self.assertEqual(error.path, path)


class ScopeRouteTests(TestCase):
    async def test_me_refuses_smuggled_admin(self):
        """A token whose scope hides admin behind a no-break space is a 401 AUTH_INVALID_TOKEN on /v1/me and /metrics."""
        gw = serve(self)
        for sep in ("\u00a0", "\t", "\u3000"):
            headers = bearer(token(scope=f"chat:read{sep}admin"))
            status, _, body = await get_json(gw.url + "/v1/me", headers=headers)
            self.assertEqual((status, body["error"]["code"]), (401, "AUTH_INVALID_TOKEN"))
            self.assertEqual(body["error"]["details"], "claim 'scope' holds a malformed scope")
            self.assertEqual((await get_json(gw.url + "/metrics", headers=headers))[0], 401)


# --- #11: identity provider + sub --------------------------------------------------------


class OwnerKeyTests(SynchronousTestCase):
    def test_keys(self):
        """Owner keys tell providers apart, ignore a trailing slash, and cannot be forged through the provider part."""
        self.assertNotEqual(owner_key("https://a.example", "alice"), owner_key("https://b.example", "alice"))
        self.assertEqual(owner_key("https://a.example/", "alice"), owner_key("https://a.example", "alice"))
        self.assertNotEqual(owner_key("wecom:corpA", "zhangsan"), owner_key("wecom:corpB", "zhangsan"))
        # A "|" in a provider never shifts the boundary; "*" (old rows) is never produced.
        self.assertNotEqual(owner_key("a|b", "c"), owner_key("a", "b|c"))
        self.assertFalse(owner_key("*", "alice").startswith("*|"))


class IdentityTests(Gateway):
    async def test_bearer_and_sso_alice_are_apart(self):
        """
        alice of the operator's HS256 issuer and alice signed in through an
        SSO provider have their own sessions and their own request budgets;
        an idp claim in an operator token changes nothing.
        """
        gw = self.start(OAUTH2 + "rate_limit: {requests_per_minute: 3}")
        config = gw.parts.runtime.config
        bearer_alice = as_user(ALICE)
        sso_alice = bearer(session_token(config, "alice", OTHER_IDP, teams=["team-a"]))
        spoof = as_user(ALICE, idp=OTHER_IDP)
        mine = await self.create(bearer_alice, "bearer's")
        self.assertEqual(mine["owner"], "alice")
        self.assertEqual((await self.call(sso_alice, "GET", f"/v1/sessions/{mine['id']}"))[0], 404)
        _, _, listed = await self.call(sso_alice, "GET", "/v1/sessions")
        self.assertEqual(listed["data"], [])
        theirs = await self.create(sso_alice, "sso's")
        self.assertEqual((await self.call(spoof, "GET", f"/v1/sessions/{theirs['id']}"))[0], 404)
        self.assertEqual((await self.call(bearer_alice, "DELETE", f"/v1/sessions/{theirs['id']}"))[0], 404)
        # Budgets: the bearer's spent bucket is its own.
        for _ in range(3):
            self.assertEqual((await self.call(bearer_alice, "POST", "/v1/chat/completions", {"messages": HI}))[0], 200)
        self.assertEqual((await self.call(bearer_alice, "POST", "/v1/chat/completions", {"messages": HI}))[0], 429)
        self.assertEqual((await self.call(sso_alice, "POST", "/v1/chat/completions", {"messages": HI}))[0], 200)

    async def test_session_token_needs_idp(self):
        """A session JWT without an idp claim (as minted before) is a 401, not a principal of the gateway's own origin."""
        gw = self.start(OAUTH2)
        config = gw.parts.runtime.config
        bare = mint(session.session_signing_key(config), session.session_issuer(config), session.SESSION_AUDIENCE, "alice", "chat:read", 600)
        status, _, body = await self.call(bearer(bare), "GET", "/v1/me")
        self.assertEqual((status, body["error"]["details"]), (401, "claim 'idp' is missing"))
        for bad in ("", 42, ["x"]):
            tok = mint(session.session_signing_key(config), session.session_issuer(config), session.SESSION_AUDIENCE, "alice", "chat:read", 600, idp=bad)
            self.assertEqual((await self.call(bearer(tok), "GET", "/v1/me"))[0], 401, bad)
        self.assertEqual((await self.call(bearer(session_token(config, "alice", OTHER_IDP)), "GET", "/v1/me"))[0], 200)

    async def test_presets_corps_apart(self):
        """The same userid from WeCom corp A and corp B (their session JWTs' idp) are two owners."""
        gw = self.start(OAUTH2)
        config = gw.parts.runtime.config
        corp_a = bearer(session_token(config, "zhangsan", "wecom:ww-corp-a"))
        corp_b = bearer(session_token(config, "zhangsan", "wecom:ww-corp-b"))
        sid = (await self.create(corp_a))["id"]
        self.assertEqual((await self.call(corp_b, "GET", f"/v1/sessions/{sid}"))[0], 404)
        self.assertEqual((await self.call(corp_a, "GET", f"/v1/sessions/{sid}"))[0], 200)

    async def test_dev_principal_has_its_own_provider(self):
        """The debug listener's dev principal is of its own provider: a bearer token with sub=dev does not see its sessions."""
        gw = self.start()
        status, _, made = await get_json(gw.debug_url + "/v1/sessions", method="POST", body={"title": "dev's"})
        self.assertEqual(status, 201, made)
        self.assertEqual(made["owner"], "dev")
        other = bearer(token(sub="dev"))
        self.assertEqual((await self.call(other, "GET", f"/v1/sessions/{made['id']}"))[0], 404)
        self.assertEqual(gw.parts.authentication.current.dev.issuer, DEV_ISSUER)


class MigrationTests(Gateway):
    async def test_old_rows_stay_with_their_owners(self):
        """
        A history file from before owners had a provider: after migration 3
        its sessions are reachable (listed, read, renamed, continued,
        counted against the quota) by the same sub of the providers trusted
        when it migrated, not by another sub, and not by that sub of a
        provider configured later.
        """
        path = old_sqlite_file()
        self.start(f'storage: {{path: "{path}"}}')
        alice, bob = as_user(ALICE), as_user(BOB)
        status, _, listed = await self.call(alice, "GET", "/v1/sessions")
        self.assertEqual(sorted(s["id"] for s in listed["data"]), ["sess_old_alice", "sess_old_team"])
        self.assertEqual({s["owner"] for s in listed["data"]}, {"alice"})
        self.assertEqual(await self.messages(alice, "sess_old_alice"), [("user", "你好 world"), ("assistant", "hello ✓")])
        self.assertEqual((await self.call(bob, "GET", "/v1/sessions/sess_old_alice"))[0], 404)
        self.assertEqual((await self.call(bob, "GET", "/v1/sessions/sess_old_team"))[0], 200)
        self.assertEqual((await self.call(bob, "PATCH", "/v1/sessions/sess_old_team", {"title": "x"}))[0], 403)
        self.assertEqual((await self.call(alice, "PATCH", "/v1/sessions/sess_old_alice", {"title": "renamed"}))[0], 200)
        self.assertEqual((await self.call(alice, "POST", "/v1/chat/completions", {"session_id": "sess_old_alice", "messages": HI}))[0], 200)
        store = self.gw.parts.history.store
        owners = await store.owners_of(ISSUER, "alice")
        self.assertEqual(await store.usage(owners), old_bytes("alice") + 2 + len(self.fake.reply_text.encode()))
        # The dev principal's provider was trusted too: the debug port's "dev" would see a "dev" row.
        self.assertIn("*|alice", owners)
        await self.gw.service.stopService()

        # Restarted with single sign-on added: its alice is someone else.
        gw = self.start(f'storage: {{path: "{path}"}}\n' + OAUTH2)
        sso_alice = bearer(session_token(gw.parts.runtime.config, "alice", OTHER_IDP))
        self.assertEqual((await self.call(sso_alice, "GET", "/v1/sessions"))[2]["data"], [])
        self.assertEqual((await self.call(sso_alice, "GET", "/v1/sessions/sess_old_alice"))[0], 404)
        self.assertEqual((await self.call(as_user(ALICE), "GET", "/v1/sessions/sess_old_alice"))[0], 200)

    async def test_sso_provider_at_migration_keeps_access(self):
        """When single sign-on was configured as the file migrated, its users keep reaching their old sessions too."""
        path = old_sqlite_file()
        gw = self.start(f'storage: {{path: "{path}"}}\n' + OAUTH2)
        sso_alice = bearer(session_token(gw.parts.runtime.config, "alice", OTHER_IDP + "/"))
        self.assertEqual((await self.call(sso_alice, "GET", "/v1/sessions/sess_old_alice"))[0], 200)
        other_idp = bearer(session_token(gw.parts.runtime.config, "alice", "https://elsewhere.example"))
        self.assertEqual((await self.call(other_idp, "GET", "/v1/sessions/sess_old_alice"))[0], 404)

    async def test_sqlite_schema(self):
        """Migration 3 on SQLite: owners marked old, message bytes filled in, usage summed, the providers of the day recorded."""
        path = old_sqlite_file()
        store = SQLStore(SQLiteEngine(reactor, path, legacy_issuers=(ISSUER + "/", DEV_ISSUER)))
        self.addCleanup(store.close)
        await self.check_migrated(store)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], len(MIGRATIONS))
        self.assertEqual(conn.execute("SELECT bytes FROM messages WHERE session_id = 'sess_old_alice' ORDER BY seq").fetchall(), [(12,), (9,)])

    async def test_postgres_schema(self):
        """Migration 3 on PostgreSQL, from a database at version 2 with rows."""
        import psycopg

        dsn = pg_database(self)
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.cursor() as cur:
                for statement in OLD_SCHEMA:
                    cur.execute(statement)
                fill_old_rows(cur, "%s")
                cur.execute("CREATE TABLE clawdbot_schema (version INTEGER NOT NULL)")
                cur.execute("INSERT INTO clawdbot_schema (version) VALUES (2)")
        store = SQLStore(PostgresEngine(reactor, dsn, legacy_issuers=(ISSUER, DEV_ISSUER)))
        self.addCleanup(store.close)
        await self.check_migrated(store)

    async def check_migrated(self, store):
        self.assertEqual(await store.owners_of(ISSUER, "alice"), [owner_key(ISSUER, "alice"), "*|alice"])
        self.assertEqual(await store.owners_of("https://new.example", "alice"), [owner_key("https://new.example", "alice")])
        self.assertEqual(await store.usage(["*|alice"]), old_bytes("alice"))
        self.assertEqual(await store.usage(["*|bob"]), 0)
        rows, _ = await store.list_sessions(await store.owners_of(ISSUER, "alice"), [])
        self.assertEqual(sorted(r.id for r in rows), ["sess_old_alice", "sess_old_team"])
        self.assertEqual({r.as_dict()["owner"] for r in rows}, {"alice"})
        rows, _ = await store.list_sessions([owner_key(ISSUER, "alice")], [])
        self.assertEqual(rows, [])


# --- #17: groups re-read at refresh, encrypted cookies -------------------------------


def cookie_bytes(value):
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def claims_of(access_token):
    return jwt.decode(access_token, options={"verify_signature": False})


class RefreshRecheckTests(TestCase):
    timeout = 60

    async def refreshed(self, flow, cookie):
        reply = await flow.refresh(cookie)
        self.assertEqual(reply.code, 200, reply.body)
        return claims_of(reply.json()["access_token"]), reply

    async def test_group_removal_takes_effect_at_next_refresh(self):
        """
        Removing alice from a group at the provider removes its scopes at her
        next refresh; deleting her there ends the sign-in (401, revoked);
        the tokens carry her provider as idp.
        """
        flow = Flow(self).start()
        _, cookie = await flow.sign_in()
        claims, _ = await self.refreshed(flow, cookie)
        self.assertEqual(claims["idp"], flow.idp.issuer)
        self.assertIn("admin", claims["scope"].split())
        self.assertEqual(claims["teams"], ["admins", "users"])
        await deferToThread(flow.idp.change_user, "alice", groups=["users"])
        claims, _ = await self.refreshed(flow, cookie)
        self.assertEqual(sorted(claims["scope"].split()), ["chat:read", "chat:write", "history:users"])
        self.assertEqual(claims["teams"], ["users"])
        await deferToThread(flow.idp.change_user, "alice", deleted=True)
        ended = await flow.refresh(cookie)
        self.assertEqual((ended.code, ended.json()["error"]["details"]), (401, "the identity provider ended the sign-in session"))
        self.assertIn("max-age=0", ended.cookies[session.REFRESH_COOKIE][1])
        again = await flow.refresh(cookie)
        self.assertEqual((again.code, again.json()["error"]["details"]), (401, "the sign-in session was ended"))

    async def test_expired_access_token_renewed_with_refresh_token(self):
        """Once the provider's access token has expired, refresh uses the refresh token, re-reads the groups and renews the cookie."""
        flow = Flow(self).start()
        _, cookie = await flow.sign_in()
        key = session.cookie_key(flow.config())
        payload = session.unseal(key, "refresh", cookie, time.time())
        self.assertTrue(payload["grant"]["rt"])
        payload["grant"]["ax"] = 0
        stale = session.seal(key, "refresh", payload)
        await deferToThread(flow.idp.change_user, "alice", groups=["admins"])
        claims, reply = await self.refreshed(flow, stale)
        self.assertEqual(claims["teams"], ["admins"])
        renewed, attrs = reply.cookies[session.REFRESH_COOKIE]
        self.assertIn("path=/auth", attrs)
        fresh = session.unseal(key, "refresh", renewed, time.time())
        self.assertGreater(fresh["grant"]["ax"], time.time())
        self.assertNotEqual(fresh["grant"]["at"], payload["grant"]["at"])
        self.assertEqual((fresh["rid"], fresh["exp"]), (payload["rid"], payload["exp"]))
        await deferToThread(flow.idp.change_user, "alice", groups=[])
        claims, _ = await self.refreshed(flow, renewed)
        self.assertEqual((claims["teams"], sorted(claims["scope"].split())), ([], ["chat:read", "chat:write"]))

    async def test_unreachable_provider_means_default_scopes(self):
        """When the provider cannot be asked at refresh, the session gets the default scopes only, never the old group scopes."""
        flow = Flow(self).start()
        _, cookie = await flow.sign_in()
        flow.idp.stop()
        claims, _ = await self.refreshed(flow, cookie)
        self.assertEqual((sorted(claims["scope"].split()), claims["teams"]), (["chat:read", "chat:write"], []))

    async def test_cookies_are_encrypted(self):
        """The login cookie hides state, nonce, verifier and next; the refresh cookie hides the identity and the provider tokens."""
        flow = Flow(self).start()
        _, login, location = await flow.begin("next=/secret-next-path")
        raw = cookie_bytes(login)
        params = query_of(location)
        for secret in (params["state"], params["nonce"], "secret-next-path"):
            self.assertNotIn(secret.encode(), raw)
            self.assertNotIn(secret, login)
        opened = session.unseal(session.cookie_key(flow.config()), "login", login, time.time())
        self.assertEqual((opened["s"], opened["n"], opened["next"]), (params["state"], params["nonce"], "/secret-next-path"))
        _, refresh = await flow.sign_in()
        opened = session.unseal(session.cookie_key(flow.config()), "refresh", refresh, time.time())
        for secret in ("alice@example.test", "Alice Example", opened["grant"]["at"], opened["grant"]["rt"]):
            self.assertNotIn(secret.encode(), cookie_bytes(refresh))
            self.assertNotIn(secret, refresh)


class SameOwnerAcrossLoginAndBearerTests(TestCase):
    timeout = 60

    async def test_sso_and_provider_token_are_one_owner(self):
        """
        alice signed in to the page through provider X and alice calling the
        API with tokens X issued (its ID token; an access token signed with
        X's key, RS256, checked against X's JWKS) are one owner: one history,
        each may change it.
        """
        flow = Flow(self)
        client = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [flow.redirect_uri]}
        users = [{"sub": "alice", "email": "alice@example.test", "name": "Alice", "groups": []}]
        private = json.loads(RSAAlgorithm.to_jwk(rsa_key("idp-x")))
        private.update(kid="idp-x", alg="RS256", use="sig")
        # The IdP first: the gateway's auth.jwt issuer is its issuer.
        idp = IdP().start(clients=[client], users=users, jwks={"keys": [private]})
        self.addCleanup(idp.stop)
        extra = f"""
auth:
  jwt: {{issuer: "{idp.issuer}", audience: "{CLIENT_ID}", algorithms: ["RS256"], jwks_url: "{idp.jwks_uri}"}}
"""
        gw = serve(
            self,
            merge_yaml(
                f"""
server: {{listen: "tcp:{flow.port}:interface=127.0.0.1"}}
oauth2:
  enabled: true
  client_id: {CLIENT_ID}
  client_secret: {CLIENT_SECRET}
  redirect_uri: "{flow.redirect_uri}"
  issuer_url: "{idp.issuer}"
""",
                extra,
            ),
        )
        flow.gw, flow.idp = gw, idp
        _, cookie = await flow.sign_in()
        reply = await flow.refresh(cookie)
        session_jwt = reply.json()["access_token"]

        verifier, challenge = pkce_pair()
        url = idp.authorize_url(CLIENT_ID, flow.redirect_uri, state="s", nonce="n", code_challenge=challenge)
        back = await deferToThread(browserless_login, url, "alice", cookies=http.cookiejar.CookieJar())
        status, tokens = await deferToThread(
            idp.token, CLIENT_ID, CLIENT_SECRET, grant_type="authorization_code", code=query_of(back)["code"], redirect_uri=flow.redirect_uri, code_verifier=verifier
        )
        self.assertEqual(status, 200, tokens)
        self.assertEqual(jwt.get_unverified_header(tokens["id_token"])["kid"], "idp-x")
        now = int(time.time())
        access = jwt.encode(
            {"iss": idp.issuer, "aud": CLIENT_ID, "sub": "alice", "scope": "chat:read chat:write", "iat": now, "exp": now + 600},
            rsa_key("idp-x"),
            algorithm="RS256",
            headers={"kid": "idp-x"},
        )

        made = await get_json(gw.url + "/v1/sessions", method="POST", headers=bearer(session_jwt), body={"title": "from the page"})
        self.assertEqual(made[0], 201, made)
        sid = made[2]["id"]
        status, _, me = await get_json(gw.url + "/v1/me", headers=bearer(tokens["id_token"]))
        self.assertEqual((status, me["sub"]), (200, "alice"))
        status, _, listed = await get_json(gw.url + "/v1/sessions", headers=bearer(access))
        self.assertEqual(status, 200, listed)
        self.assertEqual([s["id"] for s in listed["data"]], [sid])
        self.assertEqual((await get_json(gw.url + f"/v1/sessions/{sid}", method="PATCH", headers=bearer(access), body={"title": "from the API"}))[0], 200)
        status, _, seen = await get_json(gw.url + f"/v1/sessions/{sid}", headers=bearer(session_jwt))
        self.assertEqual((status, seen["title"]), (200, "from the API"))
        # Same provider, another sub: someone else.
        self.assertEqual((await get_json(gw.url + f"/v1/sessions/{sid}", headers=bearer(session_token(gw.parts.runtime.config, "bob", idp.issuer))))[0], 404)


# --- the refresh route's failure modes, unit level -------------------------------------


class RefreshCookieSizeTests(SynchronousTestCase):
    def test_large_provider_tokens_dropped_in_turn(self):
        """A grant too large for a cookie loses its access token first, then itself; the cookie always fits."""
        config = parse_config(merge_yaml(BASE_CONFIG, OAUTH2), {})
        payload = {"rid": "r", "sub": "alice", "idp": OTHER_IDP, "exp": time.time() + 60, "grant": {"at": "a" * 3000, "ax": 1, "rt": "r" * 500}}
        value = sso.seal_refresh(config, payload)
        opened = session.unseal(session.cookie_key(config), "refresh", value, time.time())
        self.assertEqual(opened["grant"], {"rt": "r" * 500})
        payload["grant"]["rt"] = "r" * 4000
        opened = session.unseal(session.cookie_key(config), "refresh", sso.seal_refresh(config, payload), time.time())
        self.assertIsNone(opened["grant"])
        self.assertIsNone(sso.seal_refresh(config, dict(payload, name="n" * 5000)))
