"""
The scope matrix: every route, with each scope set, answers 200-class, 401
or 403 exactly as its declared scope says (SPEC.md §4-§5).
"""

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from testing.fake_ollama import FakeOllama
from tests.helpers import bearer, get_json, merge_yaml, serve, token

HI = [{"role": "user", "content": "hi"}]

# (method, path, body, scope needed; "" = any valid token, None = public)
ROUTES = [
    ("GET", "/healthz", None, None),
    ("GET", "/readyz", None, None),
    ("GET", "/v1/me", None, ""),
    ("GET", "/v1/models", None, "chat:read"),
    ("POST", "/v1/chat/completions", {"messages": HI}, "chat:write"),
    ("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": "x"}, "chat:write"),
    ("GET", "/v1/sessions", None, "chat:read"),
    ("POST", "/v1/sessions", {"title": "x"}, "chat:write"),
    ("GET", "/ollama/api/tags", None, "chat:read"),
    ("GET", "/ollama/api/version", None, "chat:read"),
    ("POST", "/ollama/api/show", {"model": "qwen3:32b"}, "chat:read"),
    ("POST", "/ollama/api/chat", {"model": "qwen3:32b", "messages": HI, "stream": False}, "chat:write"),
    ("POST", "/ollama/api/generate", {"model": "qwen3:32b", "prompt": "hi", "stream": False}, "chat:write"),
    ("POST", "/ollama/api/embed", {"model": "nomic-embed-text", "input": "x"}, "chat:write"),
    ("POST", "/ollama/api/pull", {"model": "qwen3:32b", "stream": False}, "admin"),
    ("POST", "/ollama/api/copy", {"source": "qwen3:32b", "destination": "copy:1"}, "admin"),
    ("DELETE", "/ollama/api/delete", {"model": "copy:1"}, "admin"),
]

SCOPE_SETS = ["", "chat:read", "chat:write", "chat:read chat:write", "admin", "history:team-a", "chat:read chat:write admin"]


class ScopeMatrixTests(TestCase):
    timeout = 120

    async def test_matrix(self):
        """Each route with no token is 401, with a token lacking its scope 403, with its scope 2xx; admin implies nothing else."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        gw = serve(self, extra=merge_yaml(f'backend: {{url: "{fake.url}"}}', "rate_limit: {requests_per_minute: 0}"))
        for method, path, body, needed in ROUTES:
            status, headers, reply = await get_json(gw.url + path, method=method, body=body)
            self.assertEqual(status, 200 if needed is None else 401, (path, "no token"))
            for scopes in SCOPE_SETS:
                if path == "/ollama/api/delete":
                    fake.add_model("copy:1")
                status, headers, reply = await get_json(gw.url + path, method=method, body=body, headers=bearer(token(scope=scopes)))
                allowed = needed is None or needed == "" or needed in scopes.split()
                label = (method, path, scopes)
                if allowed:
                    self.assertIn(status, (200, 201), (label, reply))
                else:
                    self.assertEqual(status, 403, label)
                    # (The native routes answer in Ollama's shape, a string.)
                    error = reply["error"] if isinstance(reply["error"], str) else reply["error"]["message"]
                    self.assertTrue(path.startswith("/ollama/") or reply["error"]["code"] == "AUTH_INSUFFICIENT_SCOPE", reply)
                    self.assertTrue(error.startswith("Insufficient scope"), reply)
                    self.assertIn(needed, error)
                    self.assertEqual(headers.getRawHeaders("www-authenticate"), [f'Bearer realm="clawdbot", error="insufficient_scope", scope="{needed}"'])

    async def test_session_item_routes(self):
        """Session items: reading needs chat:read, changing needs chat:write (a missing scope is a 403 before any lookup)."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        gw = serve(self, extra=f'backend: {{url: "{fake.url}"}}')
        owner = bearer(token(scope="chat:read chat:write"))
        _, _, session = await get_json(gw.url + "/v1/sessions", method="POST", headers=owner, body={"title": "x"})
        sid = session["id"]
        cases = [
            ("GET", f"/v1/sessions/{sid}", None, "chat:read"),
            ("GET", f"/v1/sessions/{sid}/export", None, "chat:read"),
            ("PATCH", f"/v1/sessions/{sid}", {"title": "y"}, "chat:write"),
        ]
        for method, path, body, needed in cases:
            for scopes in SCOPE_SETS:
                status, _, _ = await get_json(gw.url + path, method=method, body=body, headers=bearer(token(scope=scopes)))
                self.assertEqual(status, 200 if needed in scopes.split() else 403, (method, path, scopes))
        status, _, _ = await get_json(gw.url + f"/v1/sessions/{sid}", method="DELETE", headers=bearer(token(scope="chat:read")))
        self.assertEqual(status, 403)
        status, _, _ = await get_json(gw.url + f"/v1/sessions/{sid}", method="DELETE", headers=owner)
        self.assertEqual(status, 204)
