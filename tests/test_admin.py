"""
The operator's APIs (issue 19): /v1/admin/status, usage, users, audit; and
the audit trail: each event made by the action that should make it and by
nothing else, with no secret in it.
"""

import json
import os
import tempfile

from twisted.internet import reactor

from testing.fake_ollama import FakeOllama
from tests.helpers import bearer, closed_port, get_json, merge_yaml, serve, stream_call, token
from tests.test_chat import ALL, Backed

ADMIN = bearer(token(sub="root", scope=ALL))
ALICE = bearer(token(sub="alice", scope="chat:read chat:write"))
HI = {"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}]}
CANARY = "canary-secret-Zq8x7Wv3Rt"


class AuditBacked(Backed):
    def start(self, extra="", fake=None, **kw):
        self.audit_path = os.path.join(tempfile.mkdtemp(), "audit.log")
        return super().start(merge_yaml(f'audit_log: {{path: "{self.audit_path}"}}', extra), fake=fake, **kw)

    def events(self, name=None):
        with open(self.audit_path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        return [e for e in lines if name is None or e["event"] == name]

    def audit_text(self):
        with open(self.audit_path, encoding="utf-8") as f:
            return f.read()


class AdminAPITests(AuditBacked):
    async def test_admin_only(self):
        """Every admin API is 401 without credentials and 403 without the admin scope."""
        self.start()
        for path in ("status", "usage", "users", "audit", "keys"):
            status, _, _ = await get_json(self.gw.url + "/v1/admin/" + path)
            self.assertEqual(status, 401, path)
            status, _, body = await get_json(self.gw.url + "/v1/admin/" + path, headers=ALICE)
            self.assertEqual((status, body["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"), path)
            status, _, _ = await get_json(self.gw.url + "/v1/admin/" + path, headers=ADMIN)
            self.assertEqual(status, 200, path)

    async def test_status_shows_streams_backends_and_reloads(self):
        """A stream under way shows per model and user, and is gone once it ends; a backend that failed shows down; a failed reload shows its error, a good one the keys it changed."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        down = f"http://127.0.0.1:{closed_port(self)}"
        self.fake = fake
        self.audit_path = os.path.join(tempfile.mkdtemp(), "audit.log")
        self.gw = serve(self, merge_yaml(f'backend: {{urls: ["{fake.url}", "{down}"], models: ["qwen3:32b"]}}', f'audit_log: {{path: "{self.audit_path}"}}'))
        fake.hold(after=2, times=1)
        streamed = stream_call(self.gw.url + "/v1/chat/completions", dict(HI, stream=True), ALICE)
        await fake.when_requests(1, "/api/chat")
        await streamed.when_seen(b"data: ")
        status, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
        self.assertEqual(status, 200, now)
        self.assertEqual(now["streams"]["total"], 1)
        self.assertEqual(now["streams"]["by_model"], {"qwen3:32b": 1})
        self.assertEqual(now["streams"]["by_user"], {"alice": 1})
        self.assertEqual(now["queue"]["by_user"]["alice"]["active"], 1)
        self.assertIsInstance(now["process"]["rss_bytes"], int)
        fake.release()
        await streamed.done
        # Calls until one lands on the closed backend, which then shows down.
        for _ in range(4):
            await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=ALICE, body=HI)
        status, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
        self.assertEqual(now["streams"]["total"], 0)
        self.assertEqual([b["up"] for b in now["backends"]], [True, False])
        self.assertEqual(now["backends"][1]["url"], down)
        # A reload that fails, then one that works.
        with open(self.gw.config_path, encoding="utf-8") as f:
            good = f.read()
        with open(self.gw.config_path, "w", encoding="utf-8") as f:
            f.write(good + "\nlimits: {max_queue: -1}\n")
        self.gw.parts.runtime.reload()
        _, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
        self.assertEqual(now["reload"]["result"], "error")
        self.assertIn("limits.max_queue", now["reload"]["error"])
        with open(self.gw.config_path, "w", encoding="utf-8") as f:
            f.write(good + "\nlimits: {max_queue: 7}\nhistory: {context_messages: 5}\n")
        self.gw.parts.runtime.reload()
        _, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
        self.assertEqual((now["reload"]["result"], now["reload"]["changed"]), ("ok", ["history.context_messages", "limits.max_queue"]))
        self.assertEqual([e["event"] for e in self.events() if e["event"].startswith("config.")], ["config.reload_failed", "config.reloaded"])

    async def test_usage_users_and_quotas(self):
        """Everyone's usage by day, the people seen with their scopes and keys, and the quotas that apply to them with what is left."""
        self.start("quotas: {requests_per_day: 10}")
        for who in ("alice", "bob", "bob"):
            status, _, _ = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=bearer(token(sub=who, scope="chat:read chat:write")), body=HI)
            self.assertEqual(status, 200)
        status, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=bearer(token(sub="bob", scope="chat:read chat:write")), body={"name": "ci"})
        self.assertEqual(status, 201, made)
        _, _, usage = await get_json(self.gw.url + "/v1/admin/usage", headers=ADMIN)
        self.assertEqual(sorted((row["user"], row["requests"]) for row in usage["data"]), [("alice", 1), ("bob", 2)])
        await self.gw.parts.batches.run()
        _, _, users = await get_json(self.gw.url + "/v1/admin/users", headers=ADMIN)
        by_user = {u["user"]: u for u in users["data"]}
        self.assertEqual(by_user["bob"]["scopes"], ["chat:read", "chat:write"])
        self.assertEqual(by_user["bob"]["live_keys"], 1)
        self.assertEqual(by_user["bob"]["quotas"][0]["quota"], "requests_per_day")
        self.assertEqual((by_user["bob"]["quotas"][0]["used"], by_user["bob"]["quotas"][0]["left"]), (2, 8))
        _, _, one = await get_json(self.gw.url + "/v1/admin/users?user=alice", headers=ADMIN)
        self.assertEqual([u["user"] for u in one["data"]], ["alice"])


class AuditTests(AuditBacked):
    async def test_keys_history_quota_and_models(self):
        """Key creation and revocation, a teammate's read of a session, its deletion, a spent quota and model management each leave their event, and plain use leaves none."""
        self.start("quotas: {requests_per_day: 3}")
        alice = bearer(token(sub="alice", scope="chat:read chat:write", teams=["red"]))
        reader = bearer(token(sub="carol", scope="chat:read chat:write history:red"))
        _, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=alice, body={"title": "x", "team": "red"})
        await get_json(self.gw.url + f"/v1/sessions/{session['id']}", headers=alice)
        await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=alice, body=HI)
        self.assertEqual(self.events(), [])
        status, _, _ = await get_json(self.gw.url + f"/v1/sessions/{session['id']}", headers=reader)
        self.assertEqual(status, 200)
        await get_json(self.gw.url + f"/v1/sessions/{session['id']}/export", headers=reader)
        reads = self.events("history.read_other")
        self.assertEqual(len(reads), 2)
        self.assertEqual((reads[0]["principal"]["sub"], reads[0]["object"], reads[0]["details"]["owner"]), ("carol", session["id"], "alice"))
        self.assertEqual(reads[0]["client"], "127.0.0.1")
        self.assertTrue(reads[0]["request_id"])
        await get_json(self.gw.url + f"/v1/sessions/{session['id']}", method="DELETE", headers=alice)
        self.assertEqual([e["object"] for e in self.events("history.deleted")], [session["id"]])
        _, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=alice, body={"name": "laptop"})
        await get_json(self.gw.url + f"/v1/keys/{made['id']}", method="DELETE", headers=alice)
        self.assertEqual([e["object"] for e in self.events("key.created")], [made["id"]])
        self.assertEqual([e["object"] for e in self.events("key.revoked")], [made["id"]])
        self.assertNotIn(made["key"], self.audit_text())
        for _ in range(3):
            await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=alice, body=HI)
        self.assertEqual(len(self.events("quota.exceeded")), 1)
        admin = ADMIN
        for method, name, body, event in (
            ("POST", "pull", {"model": "new:1b", "stream": False}, "model.pulled"),
            ("POST", "copy", {"source": "qwen3:32b", "destination": "mine"}, "model.copied"),
            ("POST", "create", {"model": "made", "from": "qwen3:32b", "stream": False}, "model.created"),
            ("DELETE", "delete", {"model": "mine"}, "model.deleted"),
        ):
            status, _, reply = await get_json(self.gw.url + "/ollama/api/" + name, method=method, headers=admin, body=body)
            self.assertEqual(status, 200, (name, reply))
            self.assertEqual(len(self.events(event)), 1, event)
        self.assertEqual(self.events("model.copied")[0]["object"], "mine")
        # The same events from the database, newest first, filtered.
        _, _, stored = await get_json(self.gw.url + "/v1/admin/audit?event=key.created", headers=ADMIN)
        self.assertEqual([e["object"] for e in stored["data"]], [made["id"]])
        _, _, page = await get_json(self.gw.url + "/v1/admin/audit?limit=2", headers=ADMIN)
        self.assertEqual((len(page["data"]), page["has_more"], page["data"][0]["event"]), (2, True, "model.deleted"))
        _, _, older = await get_json(self.gw.url + f"/v1/admin/audit?limit=2&before={page['data'][-1]['id']}", headers=ADMIN)
        self.assertLess(older["data"][0]["id"], page["data"][-1]["id"])
        status, _, _ = await get_json(self.gw.url + "/v1/admin/audit?event=nope", headers=ADMIN)
        self.assertEqual(status, 400)

    async def test_no_secret_reaches_the_audit_log(self):
        """Canary secrets in the config (a failed reload, a good one) and in requests never appear in the audit log."""
        self.start(f'auth: {{api_keys: {{secret: "{CANARY}-0123456789abcdef0123456789"}}}}')
        with open(self.gw.config_path, encoding="utf-8") as f:
            good = f.read()
        with open(self.gw.config_path, "w", encoding="utf-8") as f:
            f.write(good.replace(CANARY, CANARY + "-changed") + f'\nstorage: {{dsn: "postgresql://u:{CANARY}@h/db"}}\nlimits: {{max_queue: "{CANARY}"}}\n')
        self.gw.parts.runtime.reload()
        with open(self.gw.config_path, "w", encoding="utf-8") as f:
            f.write(good.replace(CANARY, CANARY + "-changed"))
        self.gw.parts.runtime.reload()
        _, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=ALICE, body={"name": CANARY[:10]})
        await get_json(self.gw.url + f"/v1/keys/{made['id']}", method="DELETE", headers=bearer(made["key"]))
        await get_json(self.gw.url + f"/v1/keys/{made['id']}", method="DELETE", headers=ALICE)
        text = self.audit_text()
        self.assertEqual([e["event"] for e in self.events()], ["config.reload_failed", "config.reloaded", "key.created", "key.revoked"])
        self.assertEqual(self.events("config.reloaded")[0]["details"]["changed"], ["auth.api_keys.secret"])
        for secret in (CANARY, made["key"], token(sub="alice", scope="chat:read chat:write")):
            self.assertNotIn(secret, text)

    async def test_sign_in_refresh_and_sign_out(self):
        """Signing in (with the callback's request id), a refused sign-in, a refused refresh and signing out leave their events, with the user's issuer and sub."""
        from tests.test_sso import Flow

        audit_path = os.path.join(tempfile.mkdtemp(), "audit.log")
        self.audit_path = audit_path
        flow = Flow(self).start(extra=f'audit_log: {{path: "{audit_path}"}}')
        done, cookie = await flow.sign_in()
        signed = self.events("auth.sign_in")
        self.assertEqual(len(signed), 1)
        self.assertEqual((signed[0]["principal"]["sub"], signed[0]["principal"]["iss"]), ("alice", flow.idp.issuer))
        self.assertEqual(signed[0]["request_id"], done.header(b"x-request-id"))
        _, login_cookie, _ = await flow.begin()
        await flow.callback(flow.gw.url + "/callback?code=x&state=wrong", login_cookie)
        self.assertEqual([e["object"] for e in self.events("auth.sign_in_refused")], ["state"])
        await flow.logout(cookie)
        self.assertEqual([e["principal"]["sub"] for e in self.events("auth.sign_out")], ["alice"])
        refused = await flow.refresh(cookie)
        self.assertEqual(refused.code, 401)
        events = self.events("auth.refresh_refused")
        self.assertEqual((len(events), events[0]["principal"]["sub"], events[0]["details"]["reason"]), (1, "alice", "the sign-in session was ended"))
        self.assertNotIn(cookie, self.audit_text())

    async def test_reopened_on_sigusr1(self):
        """The audit log is reopened like the access log (logrotate moved it)."""
        self.start()
        moved = self.audit_path + ".1"
        await get_json(self.gw.url + "/v1/keys", method="POST", headers=ALICE, body={"name": "a"})
        os.rename(self.audit_path, moved)
        from clawdbot.tap import reopen_logs

        reopen_logs(self.gw.parts)
        await get_json(self.gw.url + "/v1/keys", method="POST", headers=ALICE, body={"name": "b"})
        self.assertEqual([e["details"]["name"] for e in self.events()], ["b"])


class AuditReviewTests(AuditBacked):
    """What an outside review of the admin APIs and the audit trail found, with variants."""

    async def test_query_parameters(self):
        """Huge or repeated query values are 400s, never 500s."""
        self.start()
        for path in ("/v1/admin/audit?limit=" + "9" * 5000, "/v1/admin/audit?before=" + "9" * 30, "/v1/admin/users?limit=" + "9" * 5000, "/v1/admin/audit?event=key.created&event=nope", "/v1/admin/users?user=a&user=b"):
            status, _, body = await get_json(self.gw.url + path, headers=ADMIN)
            self.assertEqual((status, body["error"]["code"]), (400, "INVALID_REQUEST"), path[:60])

    async def test_only_what_happened_is_audited(self):
        """Revoking a revoked key, and a model pull Ollama refuses mid-stream, leave no event; the older "name" field names the model; an object shaped like a token is redacted."""
        self.start()
        _, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=ALICE, body={"name": "k"})
        for headers in (ALICE, ALICE, ADMIN):
            path = f"/v1/keys/{made['id']}" if headers is ALICE else f"/v1/admin/keys/{made['id']}"
            status, _, _ = await get_json(self.gw.url + path, method="DELETE", headers=headers)
            self.assertEqual(status, 204)
        self.assertEqual(len(self.events("key.revoked")), 1)
        self.fake.behave(fail_mid_stream=1, paths=("/api/pull",), times=1)
        status, _, _ = await get_json(self.gw.url + "/ollama/api/pull", method="POST", headers=ADMIN, body={"model": "nosuch:1b"})
        self.assertEqual(status, 200)
        self.assertEqual(self.events("model.pulled"), [])
        await get_json(self.gw.url + "/ollama/api/pull", method="POST", headers=ADMIN, body={"name": "legacy:1b", "stream": False})
        self.assertEqual([e["object"] for e in self.events("model.pulled")], ["legacy:1b"])
        jwt_like = token(sub="x")
        await get_json(self.gw.url + "/ollama/api/copy", method="POST", headers=ADMIN, body={"source": "qwen3:32b", "destination": jwt_like})
        self.assertNotIn(jwt_like, self.audit_text())

    async def test_status_does_not_wait_for_a_slot(self):
        """With every backend slot taken, /v1/admin/status still answers at once (Ollama's /api/ps is asked outside the slots)."""
        self.start("max_connections: 1\nlimits: {queue_timeout: 120s}")
        self.fake.hold(after=2, times=1)
        streamed = stream_call(self.gw.url + "/v1/chat/completions", dict(HI, stream=True), ALICE)
        await streamed.when_seen(b"data: ")
        status, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
        self.assertEqual((status, now["queue"]["active"], now["loaded_models_error"], now["queue"]["by_model"]), (200, 1, None, {}))
        self.assertIsInstance(now["backends"][0]["loaded"], list)
        self.fake.release()
        await streamed.done

    async def test_reload_errors_do_not_show_values(self):
        """A failed reload's error, in the status and the audit trail, names where and what, never the value the file held."""
        self.start()
        with open(self.gw.config_path, encoding="utf-8") as f:
            good = f.read()
        for bad in (f'server: {{mode: "{CANARY}"}}', f"limits: {{max_queue: !!int {CANARY}}}", f'oauth2: {{client_secret: "{CANARY}", enabled: maybe}}'):
            with open(self.gw.config_path, "w", encoding="utf-8") as f:
                f.write(good + "\n" + bad + "\n")
            self.gw.parts.runtime.reload()
            _, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
            self.assertEqual(now["reload"]["result"], "error")
            self.assertNotIn(CANARY, json.dumps(now), bad)
        self.assertNotIn(CANARY, self.audit_text())
        self.assertEqual(len(self.events("config.reload_failed")), 3)

    async def test_an_unusable_audit_path_keeps_the_old_file(self):
        """A reload naming an audit file that cannot be opened keeps writing the old one, and the status says why."""
        self.start()
        with open(self.gw.config_path, encoding="utf-8") as f:
            config = f.read()
        with open(self.gw.config_path, "w", encoding="utf-8") as f:
            f.write(config.replace(self.audit_path, "/etc/hostname/audit.log"))
        self.assertTrue(self.gw.parts.runtime.reload())
        self.assertEqual([e["event"] for e in self.events()], ["config.reloaded"])
        _, _, now = await get_json(self.gw.url + "/v1/admin/status", headers=ADMIN)
        self.assertEqual((now["audit_log"]["path"], now["audit_log"]["writing"]), (self.audit_path, True))
        self.assertIn("/etc/hostname/audit.log", now["audit_log"]["error"])


class AuditRecheckTests(AuditBacked):
    """The re-check of the review's fixes."""

    async def test_two_revocations_at_once_on_postgresql(self):
        """Of two revocations of one key at the same moment, one revokes and is audited (PostgreSQL's isolation let both update)."""
        from twisted.internet.defer import Deferred, gatherResults

        from tests.test_sessions import pg_database

        self.start(f'storage: {{backend: postgresql, dsn: "{pg_database(self)}"}}')
        _, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=ALICE, body={"name": "k"})
        paths = [(f"/v1/keys/{made['id']}", ALICE), (f"/v1/admin/keys/{made['id']}", ADMIN)] * 3
        results = await gatherResults([Deferred.fromCoroutine(get_json(self.gw.url + path, method="DELETE", headers=headers)) for path, headers in paths])
        self.assertEqual({status for status, _, _ in results}, {204})
        self.assertEqual(len(self.events("key.revoked")), 1)

    async def test_unusable_paths_and_addresses(self):
        """A backend URL whose port or host cannot be read is refused by the config; an audit path with a NUL or naming a pipe leaves the old file writing."""
        from clawdbot.config import ConfigError, parse_config
        from tests.helpers import BASE_CONFIG

        for url in ("http://127.0.0.1:99999", "http://h:0x10", "http://u:pw@[::1"):
            with self.assertRaises(ConfigError, msg=url):
                parse_config(merge_yaml(BASE_CONFIG, f'backend: {{urls: ["{url}"]}}'), {})
        self.start()
        fifo = os.path.join(tempfile.mkdtemp(), "pipe")
        os.mkfifo(fifo)
        audit = self.gw.parts.audit
        for path in ("/tmp/x\0y.log", fifo):
            self.assertFalse(audit.open(path))
            self.assertEqual(audit.path, self.audit_path)
            self.assertIn("cannot open", audit.error)
        await get_json(self.gw.url + "/v1/keys", method="POST", headers=ALICE, body={"name": "still"})
        self.assertEqual([e["details"]["name"] for e in self.events("key.created")], ["still"])
