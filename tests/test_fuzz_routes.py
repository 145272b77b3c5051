"""
Arbitrary JSON at every JSON route (issue 13, "Done when"): whatever the body
(any type, any unicode including lone surrogates, deep nesting, huge and
non-finite numbers, invalid UTF-8, valid bodies with one field replaced by
anything), every request ends with an answer, and that answer is never a 500.

The gateway and the fake Ollama run as real processes, so hypothesis drives
them with a blocking client and can shrink a failing body; a hang shows as
the client's timeout.
"""

import http.client
import json
import os
import sys
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import ISSUER, SECRET, AUDIENCE, Process, clawdbot_argv, closed_port, process_env, reserved_port, token

WRITE = token(sub="fuzz", scope="chat:read chat:write history:team-a", ttl=86400)
ADMIN = token(sub="root", scope="chat:read chat:write admin", ttl=86400)

# Text with every kind of character, lone surrogates included.
TEXT = st.one_of(
    st.text(st.characters(categories=["Cs", "Ll", "Lu", "Nd", "Zs", "Cc", "So", "Lo", "Po"]), max_size=12),
    st.sampled_from(["\ud800", "a\udfff", "\udbff", "qwen3:32b", "user", "assistant", "tool", "json", "function", "text", "image_url", "", "sess_x"]),
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 10**400, 2**63, 1e308]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=20)

HI = [{"role": "user", "content": "hi"}]
# A valid body per route: each example may replace, add or remove one field.
TEMPLATES = {
    ("POST", "/v1/chat/completions", WRITE): {"model": "qwen3:32b", "messages": HI, "stream": False},
    ("POST", "/v1/embeddings", WRITE): {"model": "nomic-embed-text", "input": "hello"},
    ("POST", "/v1/sessions", WRITE): {"title": "t", "team": "team-a"},
    ("PATCH", "/v1/sessions/{sid}", WRITE): {"title": "renamed", "system_prompt": "Be brief.", "temperature": 0.5},
    ("POST", "/v1/sessions/{sid}/truncate", WRITE): {"keep": 0},
    ("POST", "/v1/sessions/{sid}/fork", WRITE): {"keep": 0, "title": "fork"},
    ("POST", "/v1/sessions/{sid}/stop", WRITE): {},
    ("POST", "/ollama/api/chat", WRITE): {"model": "qwen3:32b", "messages": HI, "stream": False},
    ("POST", "/ollama/api/generate", WRITE): {"model": "qwen3:32b", "prompt": "hi", "stream": False},
    ("POST", "/ollama/api/embed", WRITE): {"model": "nomic-embed-text", "input": "hi"},
    ("POST", "/ollama/api/show", WRITE): {"model": "qwen3:32b"},
    ("POST", "/ollama/api/copy", ADMIN): {"source": "qwen3:32b", "destination": "fuzz-copy"},
    ("POST", "/ollama/api/pull", ADMIN): {"model": "fuzz-model", "stream": False},
    ("POST", "/ollama/api/push", ADMIN): {"model": "qwen3:32b", "stream": False},
    ("POST", "/ollama/api/create", ADMIN): {"model": "fuzz-new", "from": "qwen3:32b", "stream": False},
    ("DELETE", "/ollama/api/delete", ADMIN): {"model": "fuzz-copy"},
    ("POST", "/v1/keys", WRITE): {"name": "fuzz", "scopes": ["chat:write"], "expires_in": "30d"},
    ("POST", "/v1/responses", WRITE): {"model": "qwen3:32b", "input": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}], "store": True},
    ("POST", "/v1/messages", WRITE): {"model": "qwen3:32b", "max_tokens": 16, "system": [{"type": "text", "text": "s"}], "messages": HI, "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
    ("POST", "/v1/messages/count_tokens", WRITE): {"model": "qwen3:32b", "messages": HI},
    ("POST", "/auth/refresh", None): {},
    ("POST", "/auth/logout", None): {},
}
ROUTES = sorted(TEMPLATES)
# Nested paths the stateful fields reach into.
NESTED = ("messages", "tools", "response_format", "stream_options", "options", "images", "tool_choice", "input", "text", "reasoning", "system", "thinking", "previous_response_id")


@st.composite
def mutated(draw, template):
    """A route's valid body with one field replaced (or added, or removed), maybe one level down."""
    body = json.loads(json.dumps(template))
    key = draw(st.one_of(st.sampled_from(sorted(body) + list(NESTED)) if body else st.sampled_from(NESTED), TEXT))
    action = draw(st.sampled_from(["replace", "remove", "nested"]))
    if action == "remove":
        body.pop(key, None)
    elif action == "nested" and key == "messages":
        message = dict(HI[0])
        message[draw(st.sampled_from(["role", "content", "images", "tool_calls", "tool_call_id", "name"]) | TEXT)] = draw(JSON)
        body["messages"] = [message]
    else:
        body[key] = draw(JSON)
    return body


def encode(value):
    """JSON the way a hostile client may write it: NaN, Infinity and escaped lone surrogates included."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode("ascii")


RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[" * 5000, b'{"a":' * 3000, b"\xff\xfe{}", b'{"model": "\xc3\x28"}', b"NaN", b'{"a": 1e999}', b"null", b"[]", b'"x"']),
)


class FuzzRoutesTests(SynchronousTestCase):
    """Arbitrary bodies at every JSON route: an answer every time, never a 500."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="clawdbot-fuzz-")
        cls.port = reserved_port(cls)  # the gateway's own URL is in its config
        cls.fake = Process([sys.executable, "-m", "testing.fake_ollama", "--port", "0"], env=process_env())
        cls.fake.wait_for("listening on")
        fake_url = cls.fake.url("Fake Ollama")
        config = os.path.join(cls.tmp, "clawdbot.yaml")
        with open(config, "w") as f:
            f.write(
                f"""
server: {{mode: dev, listen: "tcp:{cls.port}:interface=127.0.0.1", debug_listen: "tcp:0:interface=127.0.0.1"}}
backend: {{url: "{fake_url}"}}
storage: {{path: "{cls.tmp}/history.sqlite3"}}
access_log: {{path: "{cls.tmp}/access.log", sample_rate: 1.0}}
log: {{path: "{cls.tmp}/gateway.log"}}
rate_limit: {{requests_per_minute: 0, auth_per_ip_per_minute: 0}}
auth:
  jwt: {{secret: "{SECRET}", issuer: "{ISSUER}", audience: "{AUDIENCE}", algorithms: ["HS256"]}}
oauth2:
  enabled: true
  client_id: gw
  client_secret: fuzz-secret-0123456789-abcdefghijkl
  redirect_uri: "http://127.0.0.1:{cls.port}/callback"
  issuer_url: "http://127.0.0.1:{closed_port(cls)}"
"""
            )
        cls.gateway = Process(clawdbot_argv("start", "--config", config), env=process_env())
        cls.gateway.wait_for("Gateway listening on")
        status, body = cls.send("POST", "/v1/sessions", encode({"title": "fuzz", "team": "team-a"}), WRITE)
        assert status == 201, (status, body)
        cls.sid = json.loads(body)["id"]

    @classmethod
    def tearDownClass(cls):
        cls.gateway.stop()
        cls.fake.stop()

    @classmethod
    def send(cls, method, path, body, credential, content_type="application/json"):
        """One exchange on a fresh connection; a hang raises the client's timeout."""
        conn = http.client.HTTPConnection("127.0.0.1", cls.port, timeout=20)
        try:
            headers = {"Content-Type": content_type, "X-Requested-With": "XMLHttpRequest"}
            if credential:
                headers["Authorization"] = "Bearer " + credential
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def check(self, route, body):
        method, path, credential = route
        status, raw = self.send(method, path.format(sid=self.sid), body, credential)
        self.assertNotEqual(status, 500, f"{method} {path} {body[:300]!r} -> {raw[:300]!r}")
        if status >= 400:
            error = json.loads(raw)["error"]
            # SPEC's shape names a code; Anthropic's (on /v1/messages) a type; Ollama's is a string.
            self.assertIsInstance((error.get("code") or error.get("type")) if isinstance(error, dict) else error, str)

    @settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(ROUTES), JSON)
    def test_any_json_value(self, route, value):
        """Any JSON value (not just objects) at any route is answered, never with a 500."""
        self.check(route, encode(value))

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def test_valid_bodies_with_one_field_wrong(self, data):
        """A valid body with one field replaced by anything (type confusion, surrogates, huge numbers) is answered, never with a 500."""
        route = data.draw(st.sampled_from(ROUTES))
        self.check(route, encode(data.draw(mutated(TEMPLATES[route]))))

    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(ROUTES), RAW)
    def test_raw_bytes(self, route, raw):
        """Bytes that are not JSON (or not UTF-8, or too deep) are answered, never with a 500."""
        self.check(route, raw)

    def test_z_gateway_still_healthy_and_logged(self):
        """After the fuzzing, the gateway answers /healthz and every access-log line is JSON."""
        status, raw = self.send("GET", "/healthz", None, None)
        self.assertEqual(status, 200)
        with open(os.path.join(self.tmp, "access.log")) as f:
            for line in f:
                json.loads(line)
