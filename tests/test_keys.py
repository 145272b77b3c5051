"""
Personal API keys, usage accounting and quotas (issue 17).

  - L{KeyLifecycleTests}: keys across two gateway instances sharing one
    PostgreSQL database (revocations and changed grants heard through
    NOTIFY, usage and quotas added up), their scopes narrowed to the
    creator's, expiry, refusals that all look alike, and keys never
    written to the access log or error bodies.
  - L{OwnerGrantTests}: a key never does more than its owner may do now
    (a JWT with fewer scopes, written with the next batch), and an identity
    provider that ends the owner's sign-in ends the owner's keys at once.
  - L{UsageTests}: what C{GET /v1/usage} says (JSON and CSV) against what
    the fake Ollama reported, for whole, streamed, abandoned and failed
    calls, and who may read whose usage.
  - L{QuotaWindowTests}: L{clawdbot.ops.quotas.Quotas} on a test clock over
    a real SQLite usage store: each window (day, ISO week, month) for
    tokens and requests, per user, team, key and scope, and the allowance
    coming back when the window ends.
  - L{QuotaHTTPTests}: the 429 a refused call gets, the headers of one that
    passes, and shadow mode.

Everything runs on real components: gateways on loopback sockets in front
of the fake Ollama, PostgreSQL at 127.0.0.1:5432, the oidc-provider IdP.
"""

import csv
import datetime
import http.cookiejar
import io
import json
import os
import re
from urllib.parse import quote
import tempfile

import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from clawdbot.auth.identity import Principal, owner_digest, owner_key
from clawdbot.auth.keys import KEY_PREFIX, key_hash, server_key
from clawdbot.backend.translate import Meter
from clawdbot.config import parse_config
from clawdbot.errors import APIError
from clawdbot.ops.quotas import Batches, Quotas
from clawdbot.storage.store import SQLiteEngine
from clawdbot.storage.usage import UsageBook, UsageStore
from testing.fake_ollama import FakeOllama
from tests.helpers import AUDIENCE, BASE_CONFIG, ISSUER, SECRET, Backed, bearer, get_json, merge_yaml, serve, token, until, when_done
from tests.test_sessions import pg_database
from tests.test_sso import Flow

HI = [{"role": "user", "content": "hi"}]
WRITE = "chat:read chat:write"
REFUSED = "the API key is not valid"
KEY_SHAPE = re.compile(r"cb-[0-9A-Za-z]{43}")


# --- helpers ------------------------------------------------------------------


def jwt(sub="alice", scope=WRITE, teams=None, **claims):
    """The Authorization header of a JWT for C{sub} (with C{teams} when given)."""
    if teams is not None:
        claims["teams"] = list(teams)
    return bearer(token(sub=sub, scope=scope, **claims))


async def create_key(url, auth, **body):
    """C{POST /v1/keys}: (status, body)."""
    body.setdefault("name", "laptop")
    status, _, reply = await get_json(url + "/v1/keys", method="POST", headers=auth, body=body)
    return status, reply


async def made_key(testcase, url, auth, **body):
    """A key that was made (201): its body."""
    status, reply = await create_key(url, auth, **body)
    testcase.assertEqual(status, 201, reply)
    return reply


async def chat(url, auth, **body):
    """C{POST /v1/chat/completions}: (status, headers, body)."""
    payload = {"messages": HI}
    payload.update(body)
    return await get_json(url + "/v1/chat/completions", method="POST", headers=auth, body=payload)


async def me(url, auth):
    return await get_json(url + "/v1/me", headers=auth)


class Shifted:
    """The reactor's time moved C{offset} seconds on (a key's clock, to see it expire)."""

    def __init__(self, offset):
        self.offset = offset

    def seconds(self):
        return reactor.seconds() + self.offset


def assert_key_refused(testcase, reply):
    """A refused key: 401 AUTH_INVALID_TOKEN with the one fixed reason."""
    status, headers, body = reply
    testcase.assertEqual(status, 401, body)
    testcase.assertEqual(body["error"]["code"], "AUTH_INVALID_TOKEN")
    testcase.assertEqual(body["error"]["details"], REFUSED)
    testcase.assertIn('error="invalid_token"', headers.getRawHeaders("www-authenticate")[0])


# --- keys across two instances, scopes, refusals --------------------------------


class KeyLifecycleTests(Backed):
    """The life of a key, and the ways a key is refused."""

    timeout = 120

    def pair(self, extra=""):
        """
        Two gateways (A, B) on one fresh PostgreSQL database and one fake
        Ollama; A's access log is L{access_text}.
        """
        dsn = pg_database(self)
        storage = f'storage: {{backend: postgresql, dsn: "{dsn}"}}\n'
        a = self.start(storage + extra)
        b = serve(self, extra=merge_yaml(f'backend: {{url: "{self.fake.url}"}}', storage + extra))
        return a, b

    async def listening(self, *gateways):
        """Each gateway's notification connection to PostgreSQL is up."""
        for gw in gateways:
            engine = gw.parts.history.store.engine
            await until(engine._listening.is_set, what="the LISTEN connection")

    def cached(self, gw, key):
        """Whether C{gw} holds C{key}'s lookup in its cache."""
        keys = gw.parts.keys
        return key_hash(server_key(gw.parts.runtime.config), key) in keys._keys

    async def test_lifecycle_across_instances(self):
        """
        A key made on A (with a JWT) works on B; B lists it (never the key
        itself) and A's admin list shows its owner; revoked on B, the next
        request on A, which had the key in its cache, is 401, without
        waiting for the cache to expire (PostgreSQL NOTIFY).  The other way
        round too: a key B had cached, revoked on A, is refused by B.  The
        revoked key is gone from the lists; someone else's id is a 404.
        """
        a, b = self.pair()
        await self.listening(a, b)
        alice = jwt("alice", WRITE + " history:red", teams=["red"])
        made = await made_key(self, a.url, alice, name="ci", scopes=["chat:write"], team="red", expires_in="90d")
        key = made["key"]
        self.assertRegex(key, KEY_SHAPE)
        self.assertEqual(made["prefix"], key[:9])
        self.assertEqual((made["name"], made["scopes"], made["team"]), ("ci", ["chat:write"], "red"))
        self.assertTrue(re.fullmatch(r"key_[0-9a-f]{16}", made["id"]), made)
        created = datetime.datetime.fromisoformat(made["created_at"].replace("Z", "+00:00"))
        expires = datetime.datetime.fromisoformat(made["expires_at"].replace("Z", "+00:00"))
        self.assertEqual(round((expires - created).total_seconds()), 90 * 86400)

        # Used on A first, so that A has it cached, then on B.
        status, _, reply = await chat(a.url, bearer(key))
        self.assertEqual(status, 200, reply)
        self.assertTrue(self.cached(a, key))
        status, _, reply = await chat(b.url, bearer(key))
        self.assertEqual(status, 200, reply)
        status, _, who = await me(b.url, bearer(key))
        self.assertEqual((who["sub"], who["scopes"], who["teams"], who["key_id"]), ("alice", ["chat:write"], ["red"], made["id"]))

        status, _, listed = await get_json(b.url + "/v1/keys", headers=alice)
        self.assertEqual(status, 200)
        self.assertEqual([k["id"] for k in listed["data"]], [made["id"]])
        self.assertNotIn("key", listed["data"][0])
        self.assertNotIn(key, json.dumps(listed))
        status, _, everyone = await get_json(a.url + "/v1/admin/keys", headers=jwt("root", "admin"))
        self.assertEqual(status, 200)
        self.assertEqual([(k["id"], k["owner"], k["status"]) for k in everyone["data"]], [(made["id"], "alice", "active")])

        # Bob cannot revoke it: not his (404, as an id that is no key).
        bob = jwt("bob")
        for key_id in (made["id"], "key_0000000000000000", "nonsense"):
            status, _, reply = await get_json(f"{b.url}/v1/keys/{key_id}", method="DELETE", headers=bob)
            self.assertEqual((status, reply["error"]["code"]), (404, "NOT_FOUND"), key_id)
        self.assertEqual((await chat(a.url, bearer(key)))[0], 200)

        status, _, _ = await get_json(f"{b.url}/v1/keys/{made['id']}", method="DELETE", headers=alice)
        self.assertEqual(status, 204)
        await until(lambda: not self.cached(a, key), what="A hearing of the revocation")
        assert_key_refused(self, await chat(a.url, bearer(key)))
        assert_key_refused(self, await chat(b.url, bearer(key)))
        status, _, listed = await get_json(a.url + "/v1/keys", headers=alice)
        self.assertEqual(listed["data"], [])
        status, _, everyone = await get_json(b.url + "/v1/admin/keys", headers=jwt("root", "admin"))
        self.assertEqual([(k["status"], k["revoked_at"] is not None) for k in everyone["data"]], [("revoked", True)])
        # Revoking it again: still alice's key (204), nothing changes.
        status, _, _ = await get_json(f"{a.url}/v1/keys/{made['id']}", method="DELETE", headers=alice)
        self.assertEqual(status, 204)

        # The other way round: B has the key cached, A revokes it.
        second = await made_key(self, b.url, alice, name="other")
        self.assertEqual((await chat(b.url, bearer(second["key"])))[0], 200)
        self.assertTrue(self.cached(b, second["key"]))
        status, _, _ = await get_json(f"{a.url}/v1/keys/{second['id']}", method="DELETE", headers=alice)
        self.assertEqual(status, 204)
        await until(lambda: not self.cached(b, second["key"]), what="B hearing of the revocation")
        assert_key_refused(self, await chat(b.url, bearer(second["key"])))

        # An administrator revokes anyone's key, on either instance.
        third = await made_key(self, a.url, alice, name="third")
        self.assertEqual((await chat(a.url, bearer(third["key"])))[0], 200)
        status, _, reply = await get_json(f"{b.url}/v1/admin/keys/{third['id']}", method="DELETE", headers=jwt("bob"))
        self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"))
        status, _, _ = await get_json(f"{b.url}/v1/admin/keys/{third['id']}", method="DELETE", headers=jwt("root", "admin"))
        self.assertEqual(status, 204)
        await until(lambda: not self.cached(a, third["key"]), what="A hearing of the admin's revocation")
        assert_key_refused(self, await chat(a.url, bearer(third["key"])))

    async def test_owner_grant_change_reaches_the_other_instance(self):
        """
        A key's owner authenticates on B with a JWT that lost
        C{chat:write}; once B's batch ran, A, which had the owner's grant
        cached, refuses the key the model call (403) at once.
        """
        a, b = self.pair()
        await self.listening(a, b)
        made = await made_key(self, a.url, jwt("alice"), scopes=["chat:read", "chat:write"])
        key = bearer(made["key"])
        self.assertEqual((await chat(a.url, key))[0], 200)
        keys = a.parts.keys
        digest = owner_digest(owner_key(ISSUER, "alice"))
        self.assertIn(digest, keys._grants)
        self.assertEqual((await me(b.url, jwt("alice", "chat:read")))[0], 200)
        await b.parts.batches.run()
        await until(lambda: digest not in keys._grants, what="A hearing of the new grant")
        status, _, reply = await chat(a.url, key)
        self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), reply)
        status, _, who = await me(a.url, key)
        self.assertEqual(who["scopes"], ["chat:read"])

    async def test_owner_ended_is_not_undone_by_an_older_grant(self):
        """
        The owner's token was verified on B (its grant waiting for B's
        batch) just before the identity provider ended the sign-in through
        A: the owner's keys stop on both instances at once, and B's batch,
        which writes what it saw before the end, does not bring them back.
        """
        a, b = self.pair()
        await self.listening(a, b)
        made = await made_key(self, a.url, jwt("alice"))
        key = bearer(made["key"])
        self.assertEqual((await me(b.url, key))[0], 200)
        self.assertEqual((await me(b.url, jwt("alice", "chat:read chat:write history:x")))[0], 200)
        self.assertTrue(b.parts.keys._pending)
        await a.parts.keys.owner_ended(owner_key(ISSUER, "alice"))
        assert_key_refused(self, await me(a.url, key))
        digest = owner_digest(owner_key(ISSUER, "alice"))
        await until(lambda: digest not in b.parts.keys._grants, what="B hearing of the end")
        assert_key_refused(self, await me(b.url, key))
        await b.parts.batches.run()
        await a.parts.batches.run()
        assert_key_refused(self, await me(b.url, key))
        assert_key_refused(self, await me(a.url, key))

    async def test_usage_and_quota_across_instances(self):
        """
        On PostgreSQL, with C{requests_per_day: 3}: calls made on A and B
        add up in C{/v1/usage} once each instance's batch ran (B's own runs
        when it answers); B refuses the call past the quota from what it
        counted, and A refuses it too once both batches ran; a key's
        last use is written by the batch and listed on the other instance.
        """
        a, b = self.pair("quotas: {requests_per_day: 3}")
        alice = jwt("alice", teams=["red"])
        made = await made_key(self, a.url, alice)
        self.assertEqual((await chat(a.url, bearer(made["key"])))[0], 200)
        self.assertEqual((await chat(b.url, alice))[0], 200)
        await a.parts.batches.run()
        status, _, answer = await get_json(b.url + "/v1/usage", headers=alice)
        self.assertEqual(status, 200, answer)
        self.assertEqual([(r["user"], r["team"], r["requests"]) for r in answer["data"]], [("alice", "red", 2)])
        # The same call on each instance: twice what A's access log charged for its own.
        (on_a,) = [line["tokens"] for line in self.access_lines() if line["path"] == "/v1/chat/completions"]
        self.assertEqual(answer["data"][0]["prompt_tokens"] + answer["data"][0]["completion_tokens"], 2 * on_a)
        status, _, listed = await get_json(b.url + "/v1/keys", headers=alice)
        self.assertIsNotNone(listed["data"][0]["last_used_at"])

        status, headers, _ = await chat(b.url, alice)
        self.assertEqual((status, headers.getRawHeaders("x-clawdbot-quota-remaining-requests")), (200, ["0"]))
        status, _, reply = await chat(b.url, alice)
        self.assertEqual((status, reply["error"]["code"]), (429, "QUOTA_EXCEEDED"))
        await b.parts.batches.run()
        await a.parts.batches.run()
        status, _, reply = await chat(a.url, bearer(made["key"]))
        self.assertEqual((status, reply["error"]["code"]), (429, "QUOTA_EXCEEDED"))
        status, _, answer = await get_json(a.url + "/v1/usage", headers=alice)
        self.assertEqual([r["requests"] for r in answer["data"]], [3])

    async def test_scopes_team_and_management_rules(self):
        """
        A key holds at most its creator's scopes: a key with C{chat:read}
        only cannot call the model (403 AUTH_INSUFFICIENT_SCOPE) though it
        lists models; scopes beyond the creator's, a team not the creator's,
        a bad name, an unknown field, and a lifetime out of bounds are 400.
        A key cannot create, list or revoke keys (403).  Without C{scopes}
        a key gets all of the creator's.
        """
        self.start()
        alice = jwt("alice", WRITE, teams=["red"])
        reader = await made_key(self, self.gw.url, alice, scopes=["chat:read"])
        self.assertEqual(reader["scopes"], ["chat:read"])
        status, _, reply = await chat(self.gw.url, bearer(reader["key"]))
        self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), reply)
        self.assertNotIn(reader["key"], json.dumps(reply))
        status, _, models = await get_json(self.gw.url + "/v1/models", headers=bearer(reader["key"]))
        self.assertEqual(status, 200, models)

        refusals = [
            ({"scopes": ["chat:write", "admin"]}, "'scopes' may hold only scopes you have yourself"),
            ({"scopes": ["history:blue"]}, "'scopes' may hold only scopes you have yourself"),
            ({"scopes": []}, "'scopes' must be a non-empty list of scopes"),
            ({"scopes": "chat:read"}, "'scopes' must be a non-empty list of scopes"),
            ({"team": "blue"}, "'team' must be one of your teams"),
            ({"team": 7}, "'team' must be one of your teams"),
            ({"name": ""}, "'name' must be a non-empty string of at most 100 printable characters"),
            ({"name": "x" * 101}, "'name' must be a non-empty string of at most 100 printable characters"),
            ({"owner": "bob"}, "'owner' is not a field of a key (use name, scopes, team, expires_in)"),
            ({"expires_in": "59s"}, "'expires_in' must be at least 60s"),
            ({"expires_in": "366d"}, "'expires_in' must be at most 365d"),
            ({"expires_in": "soon"}, "'expires_in' must be a duration such as \"90d\" or a number of seconds"),
            ({"expires_in": True}, "'expires_in' must be a duration such as \"90d\" or a number of seconds"),
        ]
        for body, details in refusals:
            status, reply = await create_key(self.gw.url, alice, **body)
            self.assertEqual((status, reply["error"]["code"], reply["error"]["details"]), (400, "INVALID_REQUEST", details), body)

        every = await made_key(self, self.gw.url, alice, team="red")
        self.assertEqual((every["scopes"], every["team"]), (["chat:read", "chat:write"], "red"))
        as_key = bearer(every["key"])
        self.assertEqual((await chat(self.gw.url, as_key))[0], 200)
        for method, path, body in (("POST", "/v1/keys", {"name": "more"}), ("GET", "/v1/keys", None), ("DELETE", f"/v1/keys/{every['id']}", None)):
            status, _, reply = await get_json(self.gw.url + path, method=method, headers=as_key, body=body)
            self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), path)
            self.assertNotIn(every["key"], json.dumps(reply))
        # The key still works: it revoked nothing.
        self.assertEqual((await chat(self.gw.url, as_key))[0], 200)
        status, _, listed = await get_json(self.gw.url + "/v1/keys", headers=alice)
        self.assertEqual(sorted(k["id"] for k in listed["data"]), sorted([reader["id"], every["id"]]))

    async def test_max_keys_per_user(self):
        """C{auth.api_keys.max_per_user} live keys at most; a revoked one frees its place."""
        self.start("auth: {api_keys: {max_per_user: 2}}")
        alice = jwt("alice")
        first = await made_key(self, self.gw.url, alice)
        await made_key(self, self.gw.url, alice)
        status, reply = await create_key(self.gw.url, alice)
        self.assertEqual((status, reply["error"]["details"]), (400, "you hold the most keys allowed (2); revoke one first"))
        # Others are not concerned.
        await made_key(self, self.gw.url, jwt("bob"))
        status, _, _ = await get_json(f"{self.gw.url}/v1/keys/{first['id']}", method="DELETE", headers=alice)
        self.assertEqual(status, 204)
        await made_key(self, self.gw.url, alice)

    async def test_refusals_look_alike_and_keys_stay_secret(self):
        """
        A malformed key, a well-formed unknown one, a revoked one and an
        expired one (made with C{expires_in: 60s}, then the keys' clock
        moved past it) get the same 401 body; no key reaches the access
        log (every request sampled, bodies included) or the gateway's log.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start("access_log: {sample_rate: 1.0}")
        alice = jwt("alice")
        short = await made_key(self, self.gw.url, alice, name="short", expires_in="60s")
        revoked = await made_key(self, self.gw.url, alice, name="revoked")
        kept = await made_key(self, self.gw.url, alice, name="kept")
        for made in (short, revoked, kept):
            self.assertEqual((await chat(self.gw.url, bearer(made["key"])))[0], 200)
        status, _, _ = await get_json(f"{self.gw.url}/v1/keys/{revoked['id']}", method="DELETE", headers=alice)
        self.assertEqual(status, 204)
        self.patch(self.gw.parts.keys, "clock", Shifted(61))

        unknown = KEY_PREFIX + "A" * 43
        malformed = [KEY_PREFIX, KEY_PREFIX + "short", kept["key"] + "x", kept["key"][:-1] + "!", KEY_PREFIX + "é" * 43]
        bodies = []
        for key in [unknown, short["key"], revoked["key"], *malformed]:
            reply = await chat(self.gw.url, bearer(key))
            assert_key_refused(self, reply)
            bodies.append(json.dumps(reply[2], sort_keys=True))
            self.assertNotIn(key, bodies[-1])
        self.assertEqual(len(set(bodies)), 1, bodies)
        # The one still valid works.
        self.assertEqual((await chat(self.gw.url, bearer(kept["key"])))[0], 200)

        logged = self.access_text()
        self.assertIn('"request_body"', logged)  # bodies were sampled
        self.assertIn('"response_body"', logged)
        self.assertIn(kept["prefix"], logged)
        text = "\n".join(repr(e) for e in events)
        for made in (short, revoked, kept):
            self.assertNotIn(made["key"], logged)
            self.assertNotIn(made["key"][3:], logged)
            self.assertNotIn(made["key"], text)
        self.assertNotIn(unknown, logged)
        self.assertNotIn(unknown, text)

    async def test_keys_turned_off(self):
        """With C{auth.api_keys.enabled: false} the key routes are 404 and every key is refused alike."""
        self.start()
        made = await made_key(self, self.gw.url, jwt("alice"))
        with open(self.gw.config_path) as f:
            text = f.read()
        with open(self.gw.config_path, "w") as f:
            f.write(merge_yaml(text, "auth: {api_keys: {enabled: false}}"))
        self.assertTrue(self.gw.parts.runtime.reload())
        assert_key_refused(self, await chat(self.gw.url, bearer(made["key"])))
        status, reply = await create_key(self.gw.url, jwt("alice"))
        self.assertEqual((status, reply["error"]["code"]), (404, "NOT_FOUND"))


# --- what the owner may do now -------------------------------------------------


class OwnerGrantTests(Backed):
    """A key is bounded by what its owner may do now."""

    timeout = 120

    async def test_owner_losing_scopes(self):
        """
        A key with C{chat:write} and C{history:x} works while its owner has
        them; once the owner authenticates with a JWT that carries only
        C{chat:read} and the batch ran, the key keeps only C{chat:read}
        (403 on the model); when the owner gets the scopes back, so does
        the key.  Until the batch, the key is unchanged.
        """
        self.start()
        full = jwt("olive", "chat:read chat:write history:x")
        made = await made_key(self, self.gw.url, full, scopes=["chat:write", "history:x"])
        key = bearer(made["key"])
        self.assertEqual((await chat(self.gw.url, key))[0], 200)
        status, _, who = await me(self.gw.url, key)
        self.assertEqual(who["scopes"], ["chat:write", "history:x"])

        self.assertEqual((await me(self.gw.url, jwt("olive", "chat:read", jti="fewer")))[0], 200)
        self.assertEqual((await chat(self.gw.url, key))[0], 200)  # not written yet
        await self.gw.parts.batches.run()
        status, _, reply = await chat(self.gw.url, key)
        self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), reply)
        status, _, who = await me(self.gw.url, key)
        self.assertEqual(who["scopes"], [])

        self.assertEqual((await me(self.gw.url, jwt("olive", "chat:read chat:write history:x", jti="again")))[0], 200)
        await self.gw.parts.batches.run()
        self.assertEqual((await chat(self.gw.url, key))[0], 200)

    async def test_owner_leaving_a_team(self):
        """
        A team key's calls count for its team while its owner is in it; the
        key has its owner's teams (the rules that match teams still apply);
        once the owner's grant no longer has the team, the key counts for
        the owner's first team.
        """
        self.start()
        made = await made_key(self, self.gw.url, jwt("tom", teams=["red", "blue"]), team="blue")
        key = bearer(made["key"])
        who = (await me(self.gw.url, key))[2]
        self.assertEqual((who["teams"], who["key_team"]), (["red", "blue"], "blue"))
        self.assertEqual((await me(self.gw.url, jwt("tom", teams=["red"], jti="moved")))[0], 200)
        await self.gw.parts.batches.run()
        who = (await me(self.gw.url, key))[2]
        self.assertEqual((who["teams"], who["key_team"]), (["red"], None))

    async def test_provider_ending_the_sign_in_ends_the_keys(self):
        """
        Through single sign-on (the real OIDC provider): a key made with
        the session's token works; once the user is removed at the
        provider, the next refresh is refused, and at once every key of
        the user is 401, though its cached lookup had not expired; another
        user's key is untouched.
        """
        flow = Flow(self).start()
        _, cookie = await flow.sign_in("alice")
        refreshed = await flow.refresh(cookie)
        self.assertEqual(refreshed.code, 200, refreshed.body)
        session_auth = bearer(refreshed.json()["access_token"])
        made = await made_key(self, flow.gw.url, session_auth, scopes=["chat:read", "history:admins"])
        key = bearer(made["key"])
        status, _, who = await me(flow.gw.url, key)
        self.assertEqual((status, who["sub"], who["scopes"]), (200, "alice", ["chat:read", "history:admins"]))
        flow.jar = http.cookiejar.CookieJar()  # a browser of bob's own
        _, bob_cookie = await flow.sign_in("bob")
        bob = (await flow.refresh(bob_cookie)).json()["access_token"]
        bobs = await made_key(self, flow.gw.url, bearer(bob))

        await deferToThread(flow.idp.change_user, "alice", deleted=True)
        ended = await flow.refresh(cookie)
        self.assertEqual((ended.code, ended.json()["error"]["details"]), (401, "the identity provider ended the sign-in session"))
        assert_key_refused(self, await me(flow.gw.url, key))
        self.assertEqual((await me(flow.gw.url, bearer(bobs["key"])))[0], 200)


# --- usage -----------------------------------------------------------------------


class UsageTests(Backed):
    """C{GET /v1/usage} against what the model reported."""

    timeout = 120

    async def reported(self, body):
        """What the fake Ollama reports for C{body} (its counts are the same each time): (prompt, completion)."""
        response = await treq.post(self.fake.url + "/api/chat", json.dumps(dict(body, stream=False)).encode(), persistent=False)
        reply = json.loads(await response.content())
        return reply["prompt_eval_count"], reply["eval_count"]

    async def stream_then_leave(self, auth, count):
        """A streamed chat whose client hangs up after C{count} SSE events; returns once Ollama saw it leave."""
        host, port = self.gw.url.split("//")[1].split(":")
        raw = json.dumps({"messages": HI, "stream": True}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth['Authorization']}\r\nContent-Length: {len(raw)}\r\n\r\n"
        ).encode()

        class Quitter(Protocol):
            def __init__(self):
                self.data = b""
                self.enough = Deferred()

            def dataReceived(self, data):
                self.data += data
                if self.data.count(b"data: ") >= count and not self.enough.called:
                    self.enough.callback(None)

        quitter = Quitter()
        await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), quitter)
        quitter.transport.write(head + raw)
        await quitter.enough
        gone = self.fake.next_disconnect()
        quitter.transport.loseConnection()
        await gone

    async def usage(self, auth, query=""):
        return await get_json(self.gw.url + "/v1/usage" + query, headers=auth)

    async def test_totals_match_the_model(self):
        """
        Five users of team red call the model: a whole reply, a stream
        (with its usage chunk), a stream the client leaves after five
        events (charged the meter's estimate: the prompt estimate and the
        lines relayed), a stream the model fails in the middle of (the same
        estimate), and a call Ollama refuses with a 500 (nothing evaluated,
        not counted).  C{/v1/usage} says, per user, what Ollama reported
        for the first two and what the access log charged for the others;
        the CSV has the same rows.
        """
        self.start("", fake=FakeOllama(tokens=40))
        auth = {name: jwt(name, teams=["red"]) for name in ("u-plain", "u-stream", "u-gone", "u-fail", "u-500")}

        status, _, plain = await chat(self.gw.url, auth["u-plain"])
        self.assertEqual(status, 200)
        status, _, streamed = await chat(self.gw.url, auth["u-stream"], stream=True, stream_options={"include_usage": True})
        self.assertEqual(status, 200)
        chunks = [json.loads(line[6:]) for line in streamed.decode().splitlines() if line.startswith("data: {")]
        stream_usage = chunks[-1]["usage"]

        self.fake.behave(stall_after=5, times=1)
        finished = when_done(self, self.gw.parts)
        await self.stream_then_leave(auth["u-gone"], 5)
        await finished

        self.fake.behave(fail_mid_stream=6, times=1)
        status, _, failed = await chat(self.gw.url, auth["u-fail"], stream=True)
        self.assertEqual(status, 200)
        self.assertIn(b'"error"', failed)

        self.fake.behave(status_error=500, times=1)
        status, _, refused = await chat(self.gw.url, auth["u-500"])
        self.assertEqual(status, 502, refused)

        sent = [r.body for r in self.fake.requests_to("/api/chat")]
        self.assertEqual(len(sent), 5)
        want_plain = await self.reported(sent[0])
        want_stream = await self.reported(sent[1])
        self.assertEqual((plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"]), want_plain)
        self.assertEqual((stream_usage["prompt_tokens"], stream_usage["completion_tokens"]), want_stream)

        lines = {line["user"]: line for line in self.access_lines() if line["path"] == "/v1/chat/completions"}
        self.assertTrue(lines["u-gone"].get("client_gone"))
        for user, want in (("u-plain", want_plain), ("u-stream", want_stream)):
            self.assertEqual(lines[user]["tokens"], sum(want), user)

        status, _, answer = await self.usage(jwt("boss", "admin"), "?team=red")
        self.assertEqual(status, 200, answer)
        rows = {row["user"]: row for row in answer["data"]}
        self.assertEqual(sorted(rows), ["u-fail", "u-gone", "u-plain", "u-stream"])
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        for user, row in rows.items():
            self.assertEqual((row["date"], row["team"], row["model"], row["user_issuer"], row["requests"]), (today, "red", "qwen3:32b", ISSUER, 1), user)
            self.assertEqual(row["prompt_tokens"] + row["completion_tokens"], lines[user]["tokens"], user)
        self.assertEqual((rows["u-plain"]["prompt_tokens"], rows["u-plain"]["completion_tokens"]), want_plain)
        self.assertEqual((rows["u-stream"]["prompt_tokens"], rows["u-stream"]["completion_tokens"]), want_stream)
        # The estimates: the prompt as the meter estimated it, a token per line relayed.
        estimate = Meter(sent[2], self.gw.parts.runtime.config.backend.max_num_ctx).prompt
        self.assertEqual((rows["u-gone"]["prompt_tokens"], rows["u-gone"]["completion_tokens"]), (estimate, 5))
        self.assertEqual(rows["u-fail"]["prompt_tokens"], Meter(sent[3], self.gw.parts.runtime.config.backend.max_num_ctx).prompt)
        # Every line the model generated before failing is charged, and
        # nothing for Ollama's error line.
        self.assertGreaterEqual(rows["u-fail"]["completion_tokens"], self.fake.requests_to("/api/chat")[3].lines_sent)
        self.assertEqual(self.fake.requests_to("/api/chat")[3].lines_sent, 6)
        self.assertEqual(rows["u-fail"]["completion_tokens"], 6)

        status, headers, raw = await self.usage(jwt("boss", "admin"), f"?team=red&from={today}&to={today}&format=csv")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/csv; charset=utf-8"])
        self.assertIn(f'filename="usage-{today}-{today}.csv"', headers.getRawHeaders("content-disposition")[0])
        table = list(csv.DictReader(io.StringIO(raw.decode())))
        self.assertEqual(
            [(r["user"], int(r["requests"]), int(r["prompt_tokens"]), int(r["completion_tokens"]), r["team"]) for r in table],
            [(r["user"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["team"]) for r in answer["data"]],
        )

        # Each user sees their own without asking; the day before is empty.
        status, _, own = await self.usage(auth["u-plain"])
        self.assertEqual([(r["user"], r["requests"]) for r in own["data"]], [("u-plain", 1)])
        yesterday = (datetime.date.fromisoformat(today) - datetime.timedelta(days=1)).isoformat()
        status, _, before = await self.usage(auth["u-plain"], f"?from={yesterday}&to={yesterday}")
        self.assertEqual((status, before["data"]), (200, []))

    async def test_keys_count_for_their_owner_and_team(self):
        """A call made with a team key counts for its owner and that team, whichever team the owner named first."""
        self.start()
        alice = jwt("alice", teams=["red", "blue"])
        made = await made_key(self, self.gw.url, alice, team="blue")
        self.assertEqual((await chat(self.gw.url, bearer(made["key"])))[0], 200)
        self.assertEqual((await chat(self.gw.url, alice))[0], 200)
        status, _, answer = await self.usage(alice)
        self.assertEqual(status, 200, answer)
        self.assertEqual(sorted((r["user"], r["team"], r["requests"]) for r in answer["data"]), [("alice", "blue", 1), ("alice", "red", 1)])

    async def test_who_may_read_what(self):
        """
        C{team=} needs C{admin} or C{usage:<team>}; C{user=} someone else
        needs C{admin} (or C{usage:<team>} with that team); a key
        with the scope reads the team too; bad arguments are 400.
        """
        self.start()
        for name, team in (("alice", "red"), ("bob", "red"), ("carol", "blue")):
            self.assertEqual((await chat(self.gw.url, jwt(name, teams=[team])))[0], 200)
        alice = jwt("alice", teams=["red"])
        lead = jwt("lead", WRITE + " usage:red", teams=["red"])

        for auth, query in ((alice, "?team=red"), (alice, "?user=bob"), (lead, "?team=blue"), (lead, "?user=bob"), (lead, "?user=carol&team=blue")):
            status, headers, reply = await self.usage(auth, query)
            self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), query)
            self.assertIn("insufficient_scope", headers.getRawHeaders("www-authenticate")[0])

        status, _, reply = await self.usage(alice, "?user=alice")
        self.assertEqual([r["user"] for r in reply["data"]], ["alice"])
        status, _, reply = await self.usage(lead, "?team=red")
        self.assertEqual(sorted(r["user"] for r in reply["data"]), ["alice", "bob"])
        status, _, reply = await self.usage(lead, "?team=red&user=bob")
        self.assertEqual([r["user"] for r in reply["data"]], ["bob"])
        status, _, reply = await self.usage(jwt("root", "admin"), "?user=carol")
        self.assertEqual([(r["user"], r["team"]) for r in reply["data"]], [("carol", "blue")])
        made = await made_key(self, self.gw.url, lead, scopes=["usage:red"])
        status, _, reply = await self.usage(bearer(made["key"]), "?team=red")
        self.assertEqual((status, sorted(r["user"] for r in reply["data"])), (200, ["alice", "bob"]))

        for query in ("?from=2026-13-01", "?from=yesterday", "?from=2026-02-02&to=2026-02-01", "?from=2024-01-01&to=2026-01-01", "?format=xml", "?colour=red", "?team="):
            status, _, reply = await self.usage(alice, query)
            self.assertEqual((status, reply["error"]["code"]), (400, "INVALID_REQUEST"), query)


# --- quotas on a test clock -------------------------------------------------------

# Wednesday 14 January 2026, 12:00 UTC: the day ends in 12 h, the week
# (from Monday the 12th) on Monday the 19th, the month on 1 February.
NOON = datetime.datetime(2026, 1, 14, 12, 0, tzinfo=datetime.timezone.utc).timestamp()
HOUR = 3600
DAY = 86400


def at(*args):
    """POSIX seconds of a UTC date and time."""
    return datetime.datetime(*args, tzinfo=datetime.timezone.utc).timestamp()


def quota_config(quotas, usage=""):
    return parse_config(merge_yaml(BASE_CONFIG, f"quotas: {quotas}\n" + (f"usage: {usage}\n" if usage else "")), {})


class QuotaParts(TestCase):
    """L{Quotas} over a real usage store (SQLite in a temporary folder), on a test clock."""

    timeout = 60

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOON)
        folder = tempfile.mkdtemp()
        self.engine = SQLiteEngine(reactor, os.path.join(folder, "history.sqlite3"))
        self.addCleanup(self.engine.close)
        self.store = UsageStore(self.engine)
        self.quotas, self.book, self.batches = self.instance()

    def instance(self):
        """A gateway's quota parts on the shared store and clock: (quotas, usage book, batches)."""
        quotas = Quotas(self.store, self.clock)
        book = UsageBook(self.store, self.clock)
        book.listeners.append(quotas.counted)
        return quotas, book, Batches(book, quotas, None, lambda: self.config)

    async def call(self, principal, tokens=0, quotas=None, book=None):
        """One call as the gateway makes it: checked, then counted; the headers of the check."""
        headers = await (quotas or self.quotas).check(principal, self.config)
        (book or self.book).record(principal, "qwen3:32b", {"prompt_tokens": tokens // 2, "completion_tokens": tokens - tokens // 2}, False, 0.5)
        return headers

    async def refused(self, principal, quotas=None):
        """The error of a check that refuses."""
        try:
            await (quotas or self.quotas).check(principal, self.config)
        except APIError as e:
            self.assertEqual((e.status, e.code), (429, "QUOTA_EXCEEDED"))
            return e
        self.fail(f"{principal.sub}'s call was not refused")

    async def passes(self, principal):
        return await self.quotas.check(principal, self.config)

    def advance_to(self, when):
        self.clock.advance(when - self.clock.seconds())



class QuotaWindowTests(QuotaParts):
    """Each window of each kind of quota."""

    async def test_day_tokens(self):
        """
        C{tokens_per_day}: calls pass until the day's tokens are spent (the
        last one may go past), then 429 with Retry-After up to midnight and
        a message naming the quota; at midnight the allowance is back.
        Other users have their own.
        """
        self.config = quota_config("{tokens_per_day: 100}")
        alice, bob = Principal("alice", frozenset({"chat:write"}), issuer=ISSUER), Principal("bob", frozenset(), issuer=ISSUER)
        headers = await self.call(alice, 60)
        self.assertEqual(headers, {"x-clawdbot-quota-remaining-tokens": "100", "x-clawdbot-quota-reset": str(12 * HOUR)})
        headers = await self.call(alice, 60)
        self.assertEqual(headers["x-clawdbot-quota-remaining-tokens"], "40")
        self.clock.advance(HOUR)
        e = await self.refused(alice)
        self.assertEqual(e.headers["Retry-After"], str(11 * HOUR))
        self.assertEqual(e.details, "your daily quota of 100 tokens (tokens_per_day) is spent; it resets in 11h")
        self.assertEqual((await self.passes(bob))["x-clawdbot-quota-remaining-tokens"], "100")
        # Written and read back: still spent.
        await self.batches.run()
        await self.refused(alice)
        self.advance_to(at(2026, 1, 14, 23, 59, 59))
        e = await self.refused(alice)
        self.assertEqual(e.headers["Retry-After"], "1")
        self.advance_to(at(2026, 1, 15))
        self.assertEqual((await self.passes(alice))["x-clawdbot-quota-remaining-tokens"], "100")

    async def test_day_requests(self):
        """
        C{requests_per_day}: the remaining header counts the call being
        made; the call that would exceed the quota is refused; the next day
        it passes.
        """
        self.config = quota_config("{requests_per_day: 2}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        first = await self.call(alice)
        second = await self.call(alice)
        # What is left once the call is made: the second call takes the last request.
        self.assertEqual([first["x-clawdbot-quota-remaining-requests"], second["x-clawdbot-quota-remaining-requests"]], ["1", "0"])
        e = await self.refused(alice)
        self.assertIn("(requests_per_day)", e.details)
        self.clock.advance(12 * HOUR)
        await self.passes(alice)

    async def test_week_windows(self):
        """
        C{tokens_per_week} and C{requests_per_week}: spent on Wednesday, still
        spent on the next days, back on Monday (the ISO week); Retry-After is
        the time to Monday 00:00.
        """
        self.config = quota_config("{tokens_per_week: 500, requests_per_week: 3}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        await self.call(alice, 600)
        e = await self.refused(alice)
        self.assertEqual((e.headers["Retry-After"], "(tokens_per_week)" in e.details), (str(4 * DAY + 12 * HOUR), True))
        self.advance_to(at(2026, 1, 18, 23))  # Sunday
        await self.batches.run()
        await self.refused(alice)
        self.advance_to(at(2026, 1, 19))  # Monday
        for _ in range(3):
            await self.call(alice, 1)
        e = await self.refused(alice)
        self.assertTrue(e.details.startswith("your weekly quota of 3 requests (requests_per_week) is spent"), e.details)
        self.advance_to(at(2026, 1, 26))
        await self.passes(alice)

    async def test_month_windows(self):
        """C{tokens_per_month} and C{requests_per_month}: spent in the middle of January, still spent on the 31st, back on 1 February."""
        self.config = quota_config("{tokens_per_month: 1000, requests_per_month: 5}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        await self.call(alice, 1000)
        e = await self.refused(alice)
        self.assertEqual(e.headers["Retry-After"], str(int(at(2026, 2, 1) - NOON)))
        self.assertIn("monthly quota of 1000 tokens (tokens_per_month)", e.details)
        self.advance_to(at(2026, 1, 31, 23, 30))
        await self.batches.run()
        await self.refused(alice)
        self.advance_to(at(2026, 2, 1))
        for _ in range(5):
            await self.call(alice, 10)
        e = await self.refused(alice)
        self.assertIn("(requests_per_month)", e.details)
        self.advance_to(at(2026, 3, 1))
        await self.passes(alice)

    async def test_team_key_and_scope(self):
        """
        C{per_team} is shared by the team's members (their first team, or
        the team of their key); C{per_key} applies to each key alone, not to
        its owner's other calls; C{per_scope} replaces the user's own
        allowance for holders of the scope (the most generous match, field
        by field; 0 there lifts that limit).
        """
        self.config = quota_config(
            "{requests_per_day: 2, per_team: {red: {requests_per_day: 3}}, per_key: {requests_per_day: 1},"
            " per_scope: {bulk: {requests_per_day: 10}, vip: {requests_per_day: 0, tokens_per_day: 50}, trial: {requests_per_day: 4}}}"
        )
        alice = Principal("alice", frozenset(), teams=("red", "blue"), issuer=ISSUER)
        bob = Principal("bob", frozenset(), teams=("red",), issuer=ISSUER)
        carol = Principal("carol", frozenset(), teams=("blue", "red"), issuer=ISSUER)
        await self.call(alice)
        await self.call(bob)
        await self.call(bob)
        e = await self.refused(alice)
        self.assertTrue(e.details.startswith("team red's daily quota of 3 requests (requests_per_day) is spent"), e.details)
        await self.call(carol)  # counted for blue, which has no quota

        key = Principal("dave", frozenset(), issuer=ISSUER, key_id="key_00000000000000aa")
        other_key = Principal("dave", frozenset(), issuer=ISSUER, key_id="key_00000000000000bb")
        await self.call(key)
        e = await self.refused(key)
        self.assertIn("this API key's daily quota of 1 requests", e.details)
        await self.call(other_key)
        e = await self.refused(Principal("dave", frozenset(), issuer=ISSUER))
        self.assertIn("your daily quota of 2 requests", e.details)

        bulk = Principal("erin", frozenset({"bulk", "trial"}), issuer=ISSUER)
        for _ in range(10):
            await self.call(bulk)
        e = await self.refused(bulk)
        self.assertIn("your daily quota of 10 requests", e.details)
        vip = Principal("fay", frozenset({"vip"}), issuer=ISSUER)
        for _ in range(20):
            await self.call(vip)  # no request limit, and no tokens spent
        await self.call(vip, 50)
        e = await self.refused(vip)
        self.assertIn("your daily quota of 50 tokens", e.details)
        self.clock.advance(12 * HOUR)
        for principal in (alice, bob, key, bulk, vip):
            await self.passes(principal)

    async def test_other_instances_calls_count_after_a_flush(self):
        """
        Two gateways on one store: what one counted is written by its batch,
        and the other's next batch re-reads the totals, so its users'
        quota is spent there too.
        """
        self.config = quota_config("{requests_per_day: 3}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        quotas_b, book_b, batches_b = self.instance()
        await self.call(alice)
        await self.call(alice, quotas=quotas_b, book=book_b)
        await self.call(alice, quotas=quotas_b, book=book_b)
        await self.passes(alice)  # A knows only its own call
        await batches_b.run()
        await self.batches.run()
        await batches_b.run()
        await self.refused(alice)
        await self.refused(alice, quotas=quotas_b)

    async def test_time_zone(self):
        """With C{usage.timezone: Asia/Shanghai} (UTC+8) the day ends at 16:00 UTC."""
        self.config = quota_config("{requests_per_day: 1}", "{timezone: Asia/Shanghai}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        await self.call(alice)
        e = await self.refused(alice)
        self.assertEqual(e.headers["Retry-After"], str(4 * HOUR))
        self.advance_to(at(2026, 1, 14, 16))
        await self.passes(alice)


# --- quotas over HTTP ------------------------------------------------------------


class QuotaHTTPTests(Backed):
    """The quotas as a client meets them."""

    timeout = 60

    async def metric(self, text, **labels):
        for line in text.splitlines():
            if line.startswith("clawdbot_quota_refusals_total{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def metrics(self):
        status, _, text = await get_json(self.gw.url + "/metrics", headers=jwt("ops", "admin"))
        self.assertEqual(status, 200)
        return text.decode()

    async def test_refused_with_retry_after(self):
        """
        A model call past the quota is 429 QUOTA_EXCEEDED in the error
        shape with Retry-After (the seconds to midnight UTC, at most a
        day) and nothing reaches Ollama; calls that pass carry the
        remaining headers; other routes are not concerned; the refusal is
        counted.
        """
        self.start("quotas: {requests_per_day: 2, tokens_per_day: 100000}")
        alice = jwt("alice")
        remaining = []
        for _ in range(2):
            status, headers, _ = await chat(self.gw.url, alice)
            self.assertEqual(status, 200)
            remaining.append((headers.getRawHeaders("x-clawdbot-quota-remaining-requests"), headers.getRawHeaders("x-clawdbot-quota-remaining-tokens")))
            reset = int(headers.getRawHeaders("x-clawdbot-quota-reset")[0])
            self.assertTrue(0 < reset <= DAY, reset)
        self.assertEqual([r[0] for r in remaining], [["1"], ["0"]])
        self.assertEqual(remaining[0][1], ["100000"])
        self.assertLess(int(remaining[1][1][0]), 100000)
        before = len(self.fake.requests_to("/api/chat"))
        status, headers, reply = await chat(self.gw.url, alice, stream=True)
        self.assertEqual(status, 429)
        self.assertEqual(set(reply["error"]), {"message", "type", "code", "param", "details"})
        self.assertEqual((reply["error"]["code"], reply["error"]["type"]), ("QUOTA_EXCEEDED", "rate_limit_error"))
        self.assertRegex(reply["error"]["details"], r"^your daily quota of 2 requests \(requests_per_day\) is spent; it resets in \d+[hms]")
        retry = int(headers.getRawHeaders("retry-after")[0])
        self.assertTrue(0 < retry <= DAY, retry)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), before)
        self.assertEqual((await me(self.gw.url, alice))[0], 200)
        self.assertEqual((await chat(self.gw.url, jwt("bob")))[0], 200)
        self.assertEqual(await self.metric(await self.metrics(), quota="requests_per_day", subject="user", shadow="false"), 1.0)

    async def test_shadow_mode(self):
        """With C{shadow: true} the calls past the quota pass, and each is counted with shadow="true" and logged."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start("quotas: {requests_per_day: 1, shadow: true}")
        alice = jwt("alice")
        for _ in range(3):
            status, headers, _ = await chat(self.gw.url, alice)
            self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("x-clawdbot-quota-remaining-requests"), ["0"])
        text = await self.metrics()
        self.assertEqual(await self.metric(text, quota="requests_per_day", subject="user", shadow="true"), 2.0)
        self.assertEqual(await self.metric(text, shadow="false"), 0.0)
        logged = [e for e in events if "shadow mode" in e.get("log_format", "")]
        self.assertEqual([(e["quota"], e["subject"]) for e in logged], [("requests_per_day", "user")] * 2)


class FailingTotals:
    """A usage store whose totals cannot be read (the database is down)."""

    async def totals(self, subjects, starts):
        raise OSError("database is down")


class QuotaEdgeTests(QuotaParts):
    """What a check says when several quotas are spent, and when the database cannot answer."""

    async def test_several_spent_names_the_last_to_reset(self):
        """
        With the day's and the month's requests both spent, the refusal
        names the monthly quota and Retry-After is the month's reset (the
        call passes only once both are back); the reset header follows the
        allowance with the smaller share left.
        """
        self.config = quota_config("{requests_per_day: 1, requests_per_month: 1, tokens_per_day: 1000000}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        headers = await self.call(alice, 10)
        # One request was the whole daily and monthly allowance: the
        # request allowance binds (none left), and it comes back with the month.
        self.assertEqual(headers["x-clawdbot-quota-remaining-requests"], "0")
        e = await self.refused(alice)
        self.assertIn("(requests_per_month)", e.details)
        month_end = at(2026, 2, 1)
        self.assertEqual(e.headers["Retry-After"], str(int(month_end - self.clock.seconds())))
        self.assertEqual(headers["x-clawdbot-quota-reset"], str(int(month_end - self.clock.seconds())))

    async def test_database_down_follows_on_backend_error(self):
        """Totals that cannot be read let the call through with rate_limit.on_backend_error open (no headers), and are a 503 with closed."""
        quotas = Quotas(FailingTotals(), self.clock)
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        self.config = quota_config("{tokens_per_day: 100}")
        self.assertEqual(await quotas.check(alice, self.config), {})
        self.config = parse_config(merge_yaml(BASE_CONFIG, "quotas: {tokens_per_day: 100}\nrate_limit: {on_backend_error: closed}\n"), {})
        try:
            await quotas.check(alice, self.config)
        except APIError as e:
            self.assertEqual((e.status, e.code, e.headers.get("Retry-After")), (503, "STORAGE_UNAVAILABLE", "5"))
        else:
            self.fail("the check passed with on_backend_error closed")
        self.flushLoggedErrors(OSError)


class DebugPortKeysTests(Backed):
    """The debug listener's dev principal makes no API keys."""

    timeout = 60

    async def test_debug_port_refuses_key_management(self):
        """POST and GET /v1/keys on the debug port are a 403 that says where keys are made; nothing is stored."""
        self.start()
        for method, body in (("POST", {"name": "dev"}), ("GET", None)):
            status, _, reply = await get_json(self.gw.debug_url + "/v1/keys", method=method, body=body)
            self.assertEqual(status, 403, reply)
            self.assertEqual(reply["error"]["details"], "the debug port makes no API keys; sign in on the secure port")
        self.assertEqual(await self.gw.parts.keys.list(), [])


class QuotaHoldTests(QuotaParts):
    """Calls under way are held against the allowances, so a burst cannot pass on one remainder."""

    async def test_calls_under_way_count(self):
        """
        With one request a day left, of two calls checked at the same
        moment only the first passes; a call that ends without reaching the
        model gives its hold back; held tokens count until the call's real
        use replaces them.
        """
        self.config = quota_config("{requests_per_day: 1, tokens_per_day: 1000}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        first = []
        await self.quotas.check(alice, self.config, 600, first)
        e = await self.refused(alice)
        self.assertIn("(requests_per_day)", e.details)
        # The first call never reached the model: its hold is given back.
        self.quotas.release(first)
        second = []
        headers = await self.quotas.check(alice, self.config, 600, second)
        self.assertEqual(headers["x-clawdbot-quota-remaining-requests"], "0")
        # Its 600 estimated tokens are held: with another user's allowance
        # of its own, nothing else changes; a third check of alice's is refused.
        await self.refused(alice)
        self.quotas.release(second)
        self.book.record(alice, "qwen3:32b", {"prompt_tokens": 5, "completion_tokens": 5}, False, 0.1)
        e = await self.refused(alice)
        self.assertIn("(requests_per_day)", e.details)

    async def test_held_tokens_refuse(self):
        """Held token estimates count against a token allowance until released."""
        self.config = quota_config("{tokens_per_day: 1000}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        held = []
        await self.quotas.check(alice, self.config, 1000, held)
        e = await self.refused(alice)
        self.assertIn("(tokens_per_day)", e.details)
        self.quotas.release(held)
        await self.passes(alice)


class KeyReviewTests(Backed):
    """What an outside review of the keys found, kept fixed."""

    timeout = 60

    async def test_a_key_keeps_its_owners_restrictions(self):
        """
        A key may drop a permission, never a restriction: the rules that
        match the owner's teams and scopes (model access, quotas, budgets)
        apply to the owner's keys, whatever team or scopes the key was given.
        """
        self.start(
            'backend: {model_access: [{team: interns, models: ["qwen3:8b"]}, {scope: trial, models: ["qwen3:8b"]}]}\n'
            "quotas: {per_scope: {trial: {requests_per_day: 1}}}\n",
            fake=FakeOllama(models=("qwen3:32b", "qwen3:8b")),
        )
        ivan = jwt("ivan", teams=["interns", "research"])
        self.assertEqual((await chat(self.gw.url, ivan, model="qwen3:32b"))[0], 403)
        key = bearer((await made_key(self, self.gw.url, ivan, team="research"))["key"])
        status, _, reply = await chat(self.gw.url, key, model="qwen3:32b")
        self.assertEqual((status, reply["error"]["code"]), (403, "MODEL_NOT_ALLOWED"))
        self.assertEqual((await chat(self.gw.url, key, model="qwen3:8b"))[0], 200)

        tara = jwt("tara", scope="chat:read chat:write trial")
        key = bearer((await made_key(self, self.gw.url, tara, scopes=["chat:read", "chat:write"]))["key"])
        self.assertEqual((await chat(self.gw.url, key, model="qwen3:32b"))[0], 403)
        self.assertEqual((await chat(self.gw.url, key, model="qwen3:8b"))[0], 200)
        status, _, reply = await chat(self.gw.url, key, model="qwen3:8b")
        self.assertEqual((status, reply["error"]["code"]), (429, "QUOTA_EXCEEDED"))

    async def test_keys_of_an_owner_gone_idle_stop(self):
        """A key stops once its owner has not been seen for auth.api_keys.owner_idle (30 days by default), and works again when they are."""
        self.start()
        key = bearer((await made_key(self, self.gw.url, jwt("olga")))["key"])
        self.assertEqual((await chat(self.gw.url, key))[0], 200)
        keys = self.gw.parts.keys
        keys.clock = Shifted(31 * DAY)
        keys._forget_all()
        assert_key_refused(self, await chat(self.gw.url, key))
        keys.clock = reactor
        keys._forget_all()
        self.assertEqual((await chat(self.gw.url, key))[0], 200)

    async def test_a_token_without_iat_says_nothing_about_now(self):
        """A verified token that does not say when it was issued leaves its owner's recorded grant alone."""
        self.start()
        keys = self.gw.parts.keys
        keys.observe(Principal("nina", frozenset({"chat:write", "admin"}), issuer=ISSUER))
        self.assertEqual(keys._pending, {})
        keys.observe(Principal("nina", frozenset({"chat:write"}), issuer=ISSUER, issued_at=reactor.seconds()))
        self.assertEqual(list(keys._pending), [owner_key(ISSUER, "nina")])

    async def test_usage_dates_at_the_edges(self):
        """Dates a calendar cannot take to a day's end, or before 1970, are a 400, in any time zone."""
        self.start('usage: {timezone: "Asia/Shanghai"}')
        for start, end in (("9999-12-31", "9999-12-31"), ("0001-01-01", "0001-01-01"), ("1969-12-31", "1970-01-01"), ("2026-02-30", "2026-03-01")):
            status, _, reply = await get_json(self.gw.url + f"/v1/usage?from={start}&to={end}", headers=jwt("ann"))
            self.assertEqual((status, reply["error"]["code"]), (400, "INVALID_REQUEST"), (start, end))

    async def test_a_key_pasted_as_model_or_session_is_not_logged(self):
        """The access log's model and session fields come from the request: a key pasted there is redacted, on every line."""
        self.start("access_log: {sample_rate: 0.0}")
        key = (await made_key(self, self.gw.url, jwt("pat")))["key"]
        await chat(self.gw.url, jwt("pat"), model=key)
        await chat(self.gw.url, jwt("pat"), session_id=key)
        self.assertNotIn(key, self.access_text())
        self.assertNotIn(key[3:], self.access_text())


class SlowStore:
    """A key store whose lookups wait until released (a lookup under way while a revocation is heard)."""

    def __init__(self, record, grant):
        self.record, self.grant_ = record, grant
        self.waiting = []

    async def by_hash(self, digest):
        waiter = Deferred()
        self.waiting.append(waiter)
        await waiter
        return self.record

    async def grant(self, owner):
        return self.grant_


class CacheRaceTests(TestCase):
    """A lookup that was under way while a change was heard is not cached."""

    def test_lookup_under_way_during_a_revocation(self):
        from clawdbot.auth.identity import Grant, KeyRecord
        from clawdbot.auth.keys import ApiKeys, new_secret

        config = parse_config(BASE_CONFIG, {})
        secret = new_secret()
        digest = key_hash(server_key(config), secret)
        owner = owner_key(ISSUER, "rita")
        now = reactor.seconds()
        record = KeyRecord("key_0123456789abcdef", digest, secret[:9], owner, "k", ("chat:write",), None, now, now + DAY)
        store = SlowStore(record, Grant(owner, frozenset({"chat:write"}), (), updated_at=now, seen_at=now))
        keys = ApiKeys(store, reactor, lambda: config)
        results = []
        Deferred.fromCoroutine(keys.authenticate(secret)).addBoth(results.append)
        keys._heard("key:" + digest)  # another instance revoked it meanwhile
        store.waiting.pop().callback(None)
        self.assertEqual(results[0].sub, "rita")
        self.assertNotIn(digest, keys._keys)


class SlowTotals:
    """A usage store whose totals come when released, all zero (a cold cache meeting a burst)."""

    def __init__(self):
        self.waiting = []
        self.reads = 0

    async def totals(self, subjects, starts):
        self.reads += 1
        waiter = Deferred()
        self.waiting.append(waiter)
        await waiter
        return {subject: [(0, 0)] * len(starts) for subject in subjects}


class QuotaBurstTests(QuotaParts):
    """A burst that meets a subject nobody has asked about yet."""

    async def test_cold_burst_shares_one_read(self):
        """Ten calls checked while the first read of their totals is under way share it, and see each other's holds: two of two pass."""
        store = SlowTotals()
        quotas = Quotas(store, self.clock)
        self.config = quota_config("{requests_per_day: 2}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        outcomes = []
        for _ in range(10):
            d = Deferred.fromCoroutine(quotas.check(alice, self.config, 10, []))
            d.addCallbacks(lambda _: outcomes.append("passed"), lambda f: outcomes.append(f.value.code))
        self.assertEqual(store.reads, 1)
        store.waiting.pop().callback(None)
        self.assertEqual(sorted(outcomes), ["QUOTA_EXCEEDED"] * 8 + ["passed"] * 2)

    async def test_caller_gone_during_the_read(self):
        """A caller that goes away while the totals are read is cancelled (no call follows); the others still get the read."""
        store = SlowTotals()
        quotas = Quotas(store, self.clock)
        self.config = quota_config("{requests_per_day: 2}")
        alice = Principal("alice", frozenset(), issuer=ISSUER)
        gone = Deferred.fromCoroutine(quotas.check(alice, self.config, 10, []))
        stays = Deferred.fromCoroutine(quotas.check(alice, self.config, 10, []))
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        store.waiting.pop().callback(None)
        self.assertEqual(self.successResultOf(stays)["x-clawdbot-quota-remaining-requests"], "1")


class NoIatTests(Backed):
    """A token that does not say when it was issued cannot undo what is known."""

    timeout = 60

    async def test_key_made_with_a_token_without_iat_revives_nothing(self):
        """After the provider ended the owner's sign-in, making a key with an older token without iat leaves every key of theirs refused."""
        import jwt as pyjwt

        self.start()
        key = (await made_key(self, self.gw.url, jwt("uma", scope="chat:read chat:write admin")))["key"]
        await self.gw.parts.keys.owner_ended(owner_key(ISSUER, "uma"))
        self.gw.parts.keys._forget_all()
        assert_key_refused(self, await chat(self.gw.url, bearer(key)))
        now = int(reactor.seconds())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "uma", "scope": "chat:read chat:write admin", "exp": now + 600}
        old = bearer(pyjwt.encode(claims, SECRET, algorithm="HS256"))
        await made_key(self, self.gw.url, old)
        await self.gw.parts.batches.run()
        self.gw.parts.keys._forget_all()
        assert_key_refused(self, await chat(self.gw.url, bearer(key)))


class OwnerIdleShortTests(Backed):
    """An owner_idle shorter than a day still follows an owner who keeps showing credentials."""

    timeout = 60

    async def test_short_owner_idle(self):
        """With owner_idle 2h, an owner who shows a fresh token every hour keeps their keys; one who stops loses them."""
        self.start("auth: {api_keys: {owner_idle: 2h}}")
        key = bearer((await made_key(self, self.gw.url, jwt("ola")))["key"])
        keys = self.gw.parts.keys
        for hour in (1, 2, 3):
            keys.clock = Shifted(hour * HOUR)
            keys.observe(Principal("ola", frozenset(WRITE.split()), issuer=ISSUER, issued_at=reactor.seconds()))
            await self.gw.parts.batches.run()
            keys._forget_all()
            self.assertEqual((await chat(self.gw.url, key))[0], 200, hour)
        keys.clock = Shifted(6 * HOUR)
        keys._forget_all()
        assert_key_refused(self, await chat(self.gw.url, key))

    async def test_token_dated_ahead_does_not_undo_an_end(self):
        """A token dated ahead of the clock (within the leeway), shown just after the sign-in ended, leaves the keys ended."""
        self.start()
        key = bearer((await made_key(self, self.gw.url, jwt("ida")))["key"])
        ahead = jwt("ida", now=int(reactor.seconds()) + 25)
        await self.gw.parts.keys.owner_ended(owner_key(ISSUER, "ida"))
        self.assertEqual((await me(self.gw.url, ahead))[0], 200)
        await self.gw.parts.batches.run()
        self.gw.parts.keys._forget_all()
        assert_key_refused(self, await chat(self.gw.url, key))


class AdminListTests(Backed):
    """The operator's list of keys, narrowed to one user in the query."""

    timeout = 60

    async def test_admin_list_by_user(self):
        """?user=<sub> lists that user's keys only (a sub with LIKE's wildcards or a "|" matches only itself); a repeated user is a 400."""
        self.start()
        for sub in ("a_b", "axb", "x|a_b"):
            await made_key(self, self.gw.url, jwt(sub))
        admin = jwt("root", "admin")
        for sub in ("a_b", "axb", "x|a_b"):
            status, _, listed = await get_json(self.gw.url + "/v1/admin/keys?user=" + sub.replace("|", "%7C"), headers=admin)
            self.assertEqual(status, 200)
            self.assertEqual([k["owner"] for k in listed["data"]], [sub])
        status, _, everyone = await get_json(self.gw.url + "/v1/admin/keys", headers=admin)
        self.assertEqual(sorted(k["owner"] for k in everyone["data"]), ["a_b", "axb", "x|a_b"])
        status, _, reply = await get_json(self.gw.url + "/v1/admin/keys?user=a&user=b", headers=admin)
        self.assertEqual((status, reply["error"]["code"]), (400, "INVALID_REQUEST"))


class UsageCSVTests(Backed):
    """The CSV export as a spreadsheet reads it."""

    timeout = 60

    async def test_names_stay_text_in_their_cell(self):
        """A sub or team that starts like a formula, or holds a separator, is one quoted text cell, never a formula."""
        self.start()
        odd = "=cmd|' /C calc'!A0"
        team = "red;=1+1"
        self.assertEqual((await chat(self.gw.url, jwt(odd, teams=[team])))[0], 200)
        status, _, raw = await get_json(self.gw.url + "/v1/usage?format=csv&user=" + quote(odd), headers=jwt("boss", "admin"))
        self.assertEqual(status, 200)
        text = raw.decode()
        lines = text.splitlines()
        self.assertEqual(lines[0], '"date","user","user_issuer","team","model","requests","prompt_tokens","completion_tokens"')
        row = next(csv.reader(io.StringIO(lines[1])))
        self.assertEqual((row[1], row[3]), ("'" + odd, team))
        # Every text cell is quoted: a ";" separator cannot split the team's cell.
        self.assertIn('"red;=1+1"', lines[1])
