"""
What an outside security review broke in the HTTP layer (issue 13, findings
1, 3, 7, 12, 13 and 16), pinned on real loopback sockets: the debug port's
loopback check, strict JSON bodies, every request answered, bounded metrics
labels, redaction by content, and a well-formed, timely request head.
"""

import json
import os
import re
import tempfile
import threading
from urllib.parse import quote

import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from clawdbot import strictjson
from clawdbot.http import site as web
from clawdbot.errors import APIError, error_body
from clawdbot.logs import JSONLineObserver
from clawdbot.ops.observe import log_line, redact, redact_body, redact_text
from clawdbot.strictjson import has_lone_surrogate, parse_json
from clawdbot.http.site import REASONS, reason_phrase
from clawdbot.http.resource import APIResource, JSONResponse, is_json_type
from clawdbot.net import is_loopback_host, loopback_authority, loopback_origin
from tests.helpers import Backed, bearer, get_json, token, when_queued
from tests.test_http import RawClient

HI = [{"role": "user", "content": "hi"}]

# Host values the debug port must refuse: names that merely start with
# 127. or localhost, short and hex forms of 127.0.0.1, trailing dots,
# userinfo, bad ports, addresses that are not loopback.
REFUSED_HOSTS = [
    "127.0.0.1.nip.io",
    "127.evil.com",
    "127.0.0.1.evil.com:18789",
    "localhost.evil.com",
    "localhost.",
    "127.0.0.1.",
    "0x7f.1",
    "0x7f000001",
    "127.1",
    "2130706433",
    "0177.0.0.1",
    "127.0.0.01",
    "user@localhost",
    "localhost:abc",
    "localhost:99999",
    "[::1].evil.com",
    "[::2]",
    "10.0.0.1",
    "0.0.0.0",
    "evil.example",
    "",
]
ACCEPTED_HOSTS = ["localhost", "LocalHost:18789", "127.0.0.1", "127.0.0.1:3000", "127.8.9.10:1", "[::1]", "[::1]:18789"]

REFUSED_ORIGINS = [
    "http://127.attacker.example",
    "http://127.0.0.1.nip.io",
    "http://localhost.evil.com",
    "https://localhost.evil.com:3000",
    "http://127.1",
    "http://0x7f.1",
    "http://localhost.",
    "http://localhost:3000/",
    "http://localhost:3000/app",
    "http://user@localhost:3000",
    "http://localhost:3000@evil.com",
    "ftp://localhost",
    "file://",
    "null",
    "localhost:3000",
    "http://evil.example",
]
ACCEPTED_ORIGINS = ["http://localhost:3000", "http://localhost", "https://127.0.0.1:5173", "http://[::1]:8080", "HTTP://LOCALHOST:3000"]


async def connect(url):
    host, port = url.split("//")[1].split(":")
    proto = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), proto)
    return proto


async def raw_request(url, head, body=b""):
    """
    Send C{head} (request line and header lines, without the blank line) and
    C{body}; (status, parsed JSON body or raw bytes) of the answer.
    """
    proto = await connect(url)
    proto.transport.write(head.encode("latin-1") + b"\r\n\r\n" + body)
    data = await proto.closed
    status_line, _, rest = data.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else None
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


async def trickle(url, first, byte=b"X"):
    """
    Send C{first}, then one more C{byte} every 0.2 s until the server closes;
    the bytes it sent, or C{None} when it had not closed after 30 s.
    """
    proto = await connect(url)
    proto.transport.write(first)
    sender = LoopingCall(proto.transport.write, byte)
    sender.start(0.2, now=False)
    gave_up = []

    def give_up():
        gave_up.append(True)
        proto.transport.abortConnection()

    started = reactor.seconds()
    guard = reactor.callLater(30, give_up)
    data = await proto.closed
    sender.stop()
    if guard.active():
        guard.cancel()
    print(f"closed after {reactor.seconds() - started:.2f}s")
    return None if gave_up else data


def assert_error(testcase, status, body, want_status, code):
    """The answer is SPEC.md's JSON error shape with this status and code."""
    testcase.assertEqual(status, want_status, body)
    testcase.assertEqual(set(body), {"error"}, body)
    testcase.assertEqual(body["error"]["code"], code, body)
    testcase.assertIsInstance(body["error"]["message"], str)


# --- finding 1: the debug port's loopback check ----------------------------------


class LoopbackRuleTests(SynchronousTestCase):
    def test_host_rule(self):
        """Only literal localhost or an address that parses as loopback IP, with an optional numeric port, is a loopback Host."""
        for host in REFUSED_HOSTS:
            self.assertFalse(loopback_authority(host), host)
        for host in ACCEPTED_HOSTS:
            self.assertTrue(loopback_authority(host), host)
        self.assertFalse(is_loopback_host("127.0.0.1.nip.io"))

    def test_origin_rule(self):
        """An Origin is local only as http(s):// plus a loopback host[:port], and nothing after it."""
        for origin in REFUSED_ORIGINS:
            self.assertFalse(loopback_origin(origin), origin)
        for origin in ACCEPTED_ORIGINS:
            self.assertTrue(loopback_origin(origin), origin)

    def test_json_media_type(self):
        """Only the media type application/json (any case, with parameters) counts as JSON."""
        for value in ("application/json", "Application/JSON", "application/json; charset=utf-8", "application/json;charset=UTF-8"):
            self.assertTrue(is_json_type(value), value)
        for value in ("text/plain;charset=json", "text/plain; application/json", "application/jsonp", "application/json-patch+json",
                      "application/x-json", "application/json, text/plain", "text/json", "", "multipart/form-data"):
            self.assertFalse(is_json_type(value), value)


class DebugPortTests(Backed):
    async def test_host_matrix(self):
        """The debug port answers 403 ORIGIN_REJECTED to every non-loopback Host and 200 to the loopback ones."""
        url = self.start().debug_url
        for host in REFUSED_HOSTS:
            status, body = await raw_request(url, f"GET /v1/me HTTP/1.1\r\nHost: {host}\r\nConnection: close")
            self.assertIn(status, (400, 403), host)
            self.assertEqual(body["error"]["code"], "INVALID_REQUEST" if status == 400 else "ORIGIN_REJECTED", host)
        for host in ACCEPTED_HOSTS:
            status, body = await raw_request(url, f"GET /v1/me HTTP/1.1\r\nHost: {host}\r\nConnection: close")
            self.assertEqual(status, 200, (host, body))

    async def test_origin_matrix_and_cors(self):
        """Cross-site origins are refused (and get no CORS header); loopback origins are answered and allowed by CORS."""
        url = self.start().debug_url
        for origin in REFUSED_ORIGINS:
            for method in ("GET", "OPTIONS"):
                status, headers, body = await get_json(url + "/v1/me", method=method, headers={"Origin": origin})
                self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"), (origin, method))
                self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"), origin)
        for origin in ACCEPTED_ORIGINS:
            status, headers, _ = await get_json(url + "/v1/me", headers={"Origin": origin})
            self.assertEqual(status, 200, origin)
            self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [origin])

    async def test_repeated_host_or_origin_refused(self):
        """A second Host (even a loopback one) is a 400; a second Origin is a 403 on the debug port."""
        url = self.start().debug_url
        for hosts in (("evil.example", "localhost"), ("localhost", "evil.example"), ("localhost", "localhost")):
            head = "GET /v1/me HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in hosts) + "Connection: close"
            status, body = await raw_request(url, head)
            assert_error(self, status, body, 400, "INVALID_REQUEST")
        for origins in (("http://evil.example", "http://localhost:3000"), ("http://localhost:3000", "http://localhost:3000")):
            head = "GET /v1/me HTTP/1.1\r\nHost: localhost\r\n" + "".join(f"Origin: {o}\r\n" for o in origins) + "Connection: close"
            status, body = await raw_request(url, head)
            assert_error(self, status, body, 403, "ORIGIN_REJECTED")

    async def test_simple_cross_site_post_cannot_write(self):
        """A body a browser may send cross-site without a preflight (text/plain;charset=json, forms) is a 400 and changes nothing."""
        gw = self.start()
        body = json.dumps({"title": "planted"}).encode()
        for ctype in ("text/plain;charset=json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": [ctype]} if ctype else {}
            response = await treq.request("POST", gw.debug_url + "/v1/sessions", headers=headers, data=body, persistent=False)
            answer = json.loads(await response.content())
            assert_error(self, response.code, answer, 400, "INVALID_REQUEST")
            self.assertIn("application/json", answer["error"]["details"])
        response = await treq.request("POST", gw.debug_url + "/ollama/api/create", headers={"Content-Type": ["text/plain;charset=json"]},
                                      data=json.dumps({"model": "qwen3:32b", "system": "planted"}).encode(), persistent=False)
        await response.content()
        self.assertEqual(response.code, 400)
        self.assertEqual(self.fake.requests_to("/api/create"), [])
        status, _, listing = await get_json(gw.debug_url + "/v1/sessions")
        self.assertEqual((status, listing["data"]), (200, []))


class ContentTypeTests(Backed):
    async def test_json_body_needs_json_content_type_on_both_ports(self):
        """On both listeners a JSON route reads its body only under Content-Type application/json (parameters allowed)."""
        gw = self.start()
        auth = bearer(token())
        body = json.dumps({"title": "t"}).encode()
        for url, headers in ((gw.url, auth), (gw.debug_url, {})):
            for ctype in ("text/plain;charset=json", "application/jsonp", "application/json-patch+json", "text/json", None):
                hdrs = {k: [v] for k, v in headers.items()}
                if ctype:
                    hdrs["Content-Type"] = [ctype]
                response = await treq.request("POST", url + "/v1/sessions", headers=hdrs, data=body, persistent=False)
                assert_error(self, response.code, json.loads(await response.content()), 400, "INVALID_REQUEST")
            for ctype in ("application/json", "Application/JSON; charset=utf-8"):
                status, _, created = await get_json(url + "/v1/sessions", method="POST", headers=dict(headers, **{"Content-Type": ctype}), body=body)
                self.assertEqual(status, 201, (ctype, created))
            # Two Content-Type headers are not one exact media type.
            head = f"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close"
            for name, value in headers.items():
                head += f"\r\n{name}: {value}"
            status, answer = await raw_request(url, head, body)
            assert_error(self, status, answer, 400, "INVALID_REQUEST")


# --- finding 3: lone surrogates; every request ends with an answer ---------------


LONE = [
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"\\udfff": 1, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "a\\ud83db"}]}',
    b'{"messages": [{"role": "user", "content": "\\ude00\\ud83d"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\uD800\\u0041"}]}]}',
    b'{"input": ["ok", {"deep": ["\\udbff"]}], "model": "nomic-embed-text"}',
]


class SurrogateTests(Backed):
    async def test_lone_surrogates_are_400_on_every_json_route(self):
        """A lone UTF-16 surrogate escape, in a key or a value at any depth, is a 400 at parse time on every JSON route, and logged."""
        gw = self.start()
        auth = dict(bearer(token()), **{"Content-Type": "application/json"})
        _, _, session = await get_json(gw.url + "/v1/sessions", method="POST", headers=auth, body={"title": "x"})
        routes = [("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/sessions"), ("PATCH", f"/v1/sessions/{session['id']}")]
        before = len(self.access_lines())
        for method, path in routes:
            for body in LONE + [b'{"title": "\\ud800"}']:
                status, _, answer = await get_json(gw.url + path, method=method, headers=auth, body=body, timeout=20)
                assert_error(self, status, answer, 400, "INVALID_REQUEST")
                self.assertIn("surrogate", answer["error"]["details"])
        self.assertEqual(len(self.access_lines()) - before, len(routes) * (len(LONE) + 1))
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        status, _, stored = await get_json(gw.url + f"/v1/sessions/{session['id']}", headers=auth)
        self.assertEqual(stored["title"], "x")

    async def test_escaped_backslash_and_pairs_are_text(self):
        """An escaped backslash before 'ud800' and a proper surrogate pair are ordinary text, not refused."""
        gw = self.start()
        auth = bearer(token())
        for title in ("\\ud800", "😀 \U0001f600"):
            raw = json.dumps({"title": title}).encode()  # the pair is written as \\ud83d\\ude00
            status, _, created = await get_json(gw.url + "/v1/sessions", method="POST", headers=auth, body=raw)
            self.assertEqual((status, created["title"]), (201, title))

    async def test_surrogate_in_token_subject_answers(self):
        """A signed token whose sub is a lone surrogate gets an answer from /v1/me (401: its claims are not strict JSON), and an access-log line."""
        gw = self.start()
        status, _, body = await get_json(gw.url + "/v1/me", headers=bearer(token(sub="\ud800")), timeout=20)
        assert_error(self, status, body, 401, "AUTH_INVALID_TOKEN")
        self.assertEqual(self.access_lines()[-1]["path"], "/v1/me")

    async def test_failure_writing_the_answer_is_bare_500(self):
        """When writing a handler's answer itself fails, the request still ends: a bare 500, and the failure is logged."""

        class Broken(APIResource):
            scopes = {"GET": None}

            async def handle_GET(self, request):
                return JSONResponse({"ok": True}, headers={"X-Broken": 12})  # not a header value

        gw = self.start()
        gw.service.services[0].factory.resource.putChild(b"broken", Broken(gw.parts))
        status, _, body = await get_json(gw.url + "/broken", timeout=20)
        assert_error(self, status, body, 500, "INTERNAL_ERROR")
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.assertEqual(self.access_lines()[-1]["status"], 500)


class NeverFailWritingTests(SynchronousTestCase):
    def test_error_body_takes_any_string(self):
        """The one error renderer writes any details string, a lone surrogate too, as valid JSON."""
        body = error_body(APIError("INVALID_REQUEST", details="model '\ud800' x"))
        self.assertEqual(json.loads(body)["error"]["details"], "model '\ud800' x")

    def test_access_log_line_takes_any_string(self):
        """An access-log entry holding a lone surrogate is still one line of JSON that UTF-8 can carry."""
        line = log_line({"user": "\ud800", "path": "/v1/é"})
        line.encode("utf-8")
        self.assertEqual(json.loads(line), {"user": "\ud800", "path": "/v1/é"})

    def test_json_log_takes_any_string(self):
        """The JSON log observer writes an event with a lone surrogate field to a strict UTF-8 file."""
        path = os.path.join(tempfile.mkdtemp(), "log.json")
        with open(path, "w", encoding="utf-8") as f:
            observer = JSONLineObserver(f)
            observer({"log_level": LogLevel.info, "log_namespace": "t", "log_format": "who {who}", "who": "\ud800", "log_time": 0})
        with open(path, encoding="utf-8") as f:
            event = json.loads(f.read())
        self.assertEqual(event["who"], "\ud800")


# --- finding 13: NaN, Infinity and numbers beyond a double -------------------------


NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"2" + b"0" * 308, b"1" + b"0" * 400, b"-" + b"9" * 5000]


class NonFiniteTests(Backed):
    async def test_non_finite_numbers_are_400_and_never_reach_ollama(self):
        """NaN, Infinity and numbers too large for a double are a 400 wherever they sit, and nothing reaches Ollama."""
        gw = self.start()
        auth = bearer(token())
        for number in NON_FINITE:
            for template in (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}', b'{"messages": [{"role": "user", "content": "hi"}], "metadata": {"x": [1, %s]}}'):
                status, _, body = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=auth, body=template % number)
                assert_error(self, status, body, 400, "INVALID_REQUEST")
            status, _, body = await get_json(gw.url + "/ollama/api/chat", method="POST", headers=auth, body=b'{"model": "qwen3:32b", "messages": [], "options": {"temperature": %s}}' % number)
            self.assertEqual(status, 400, body)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])

    def test_parse_json(self):
        """The strict parser refuses non-standard constants and non-finite numbers but keeps ordinary ones."""
        for number in NON_FINITE:
            with self.assertRaises(APIError):
                parse_json(b'{"a": %s}' % number)
        self.assertEqual(parse_json(b'{"a": [1e308, -2.5e-300, 12345678901234567890, "NaN"]}'), {"a": [1e308, -2.5e-300, 12345678901234567890, "NaN"]})
        self.assertEqual(parse_json(b'{"n": %s}' % (b"9" * 300))["n"], int("9" * 300))


# --- finding 7: bounded metrics labels ----------------------------------------------


KNOWN_LABEL_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


class MetricsCardinalityTests(Backed):
    def labels(self, text, name):
        return {m.group(1) for m in re.finditer(r'\b' + name + r'="([^"]*)"', text)}

    async def metrics(self):
        status, _, text = await get_json(self.gw.url + "/metrics", headers=bearer(token(scope="admin")))
        self.assertEqual(status, 200)
        return text.decode()

    async def flood(self, start, count):
        for i in range(start, start + count):
            response = await treq.request(f"M{i}X", self.gw.url + "/healthz", persistent=False)
            body = json.loads(await response.content())
            assert_error(self, response.code, body, 501, "NOT_IMPLEMENTED")
            status, _, _ = await get_json(self.gw.url + f"/made-up-{i}/path")
            self.assertEqual(status, 404)
        for method in ("PROPFIND", "TRACE"):
            response = await treq.request(method, self.gw.url + "/healthz", persistent=False)
            await response.content()
            self.assertEqual(response.code, 501, method)
        status, body = await raw_request(self.gw.url, "get /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close")
        assert_error(self, status, body, 501, "NOT_IMPLEMENTED")

    async def test_made_up_methods_and_paths_do_not_grow_metrics(self):
        """Made-up methods (501 NOT_IMPLEMENTED) and unknown paths fold into fixed label values; /metrics stops growing."""
        self.start()
        await self.metrics()  # /metrics's own series exist from here on
        await self.flood(0, 40)
        first = await self.metrics()
        await self.flood(1000, 40)
        second = await self.metrics()
        print(f"/metrics: {len(first)} bytes, {len(first.splitlines())} lines; then {len(second)} bytes, {len(second.splitlines())} lines")
        self.assertEqual(len(second.splitlines()), len(first.splitlines()))
        self.assertLessEqual(self.labels(second, "method"), KNOWN_LABEL_METHODS)
        self.assertLessEqual(self.labels(second, "route"), {"healthz", "metrics", "not_found", "other"})
        self.assertNotIn("made-up", second)
        self.assertIn('method="other"', second)


# --- finding 12: redaction by content ----------------------------------------------


class RedactionTests(Backed):
    async def test_secrets_never_reach_the_access_log(self):
        """Secrets in bodies of any declared type (or none, or broken JSON) and token-shaped path parts never reach the access log."""
        gw = self.start("access_log: {sample_rate: 1.0}")
        auth = bearer(token())
        secrets = {}

        def canary(name):
            secrets[name] = f"canary-{name}-0123456789"
            return secrets[name]

        chat = {"messages": HI}
        bodies = [
            (None, json.dumps(dict(chat, metadata={"api_key": canary("none")})).encode()),
            ("text/plain", json.dumps(dict(chat, metadata={"api_key": canary("text")})).encode()),
            ("text/plain;charset=json", json.dumps(dict(chat, metadata={"Password": canary("charset")})).encode()),
            ("application/json", b'{"metadata": {"api_key": "%s"},}' % canary("broken").encode()),
            ("application/json", b'{"client_secret": "%s", "x": NaN}' % canary("nan").encode()),
            ("application/x-www-form-urlencoded", b"api_key=%s&x=1" % canary("form").encode()),
            ("text/plain", b"Authorization: Bearer %s" % canary("bearer").encode()),
        ]
        for ctype, body in bodies:
            headers = {k: [v] for k, v in auth.items()}
            if ctype:
                headers["Content-Type"] = [ctype]
            response = await treq.request("POST", gw.url + "/v1/chat/completions", headers=headers, data=body, persistent=False)
            await response.content()
        jwt = token(sub="bob")
        for path in (f"/v1/sessions/{jwt}", f"/v1/sessions/{quote(jwt, safe='').replace('.', '%2E')}", f"/v1/me?{jwt}", "/v1/sessions/sk-Canary0123456789abcdefXYZ"):
            await get_json(gw.url + path, headers=auth)
        text = self.access_text()
        self.assertEqual(len(self.access_lines()), len(bodies) + 4)
        for name, secret in secrets.items():
            self.assertNotIn(secret, text, name)
        self.assertIn('"api_key": "[redacted]"', text)  # the bodies were logged, redacted
        for part in jwt.split("."):
            self.assertNotIn(part, text)
        self.assertNotIn("Canary0123456789", text)
        self.assertIn("/v1/sessions/[redacted]", text)

    def test_redact_body_by_content(self):
        """A body is redacted as JSON when it parses, whatever it is declared as; one that does not parse is described by size and type only."""
        self.assertEqual(redact_body(b'{"api_key": "k1"}', "text/plain"), {"api_key": "[redacted]"})
        self.assertEqual(redact_body(b'{"api_key": "k1"}', None), {"api_key": "[redacted]"})
        raw = b'{"token": "k2",} sk-abcdefghijklmnop1234 eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln'
        self.assertEqual(redact_body(raw, "application/json"), {"omitted": "body not logged: not JSON, a JSON stream or a form", "bytes": len(raw), "type": "application/json"})


# --- finding 16: Host on HTTP/1.1, and a deadline for the request head ------------


class RequestHeadTests(Backed):
    async def test_host_header_rules_on_every_port(self):
        """HTTP/1.1 without Host, with two, or with a malformed one is a JSON 400 on every listener; HTTP/1.0 may omit it."""
        gw = self.start()
        for url in (gw.url, gw.debug_url):
            for head in (
                "GET /healthz HTTP/1.1\r\nConnection: close",
                "GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\nConnection: close",
                "GET /healthz HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close",
                "GET /healthz HTTP/1.0\r\nHost: localhost\r\nHost: other",
                "GET /healthz HTTP/1.1\r\nHost: exa mple.com\r\nConnection: close",
                "GET /healthz HTTP/1.1\r\nHost: localhost/x\r\nConnection: close",
            ):
                status, body = await raw_request(url, head)
                assert_error(self, status, body, 400, "INVALID_REQUEST")
        status, body = await raw_request(gw.url, "GET /healthz HTTP/1.0")
        self.assertEqual((status, body), (200, {"status": "ok"}))
        # Without a Host the debug port cannot tell the request is local.
        status, body = await raw_request(gw.debug_url, "GET /healthz HTTP/1.0")
        assert_error(self, status, body, 403, "ORIGIN_REJECTED")
        status, body = await raw_request(gw.url, "GET /healthz HTTP/1.1\r\nHost: chat.example.com:443\r\nConnection: close")
        self.assertEqual(status, 200)

    async def test_trickled_head_is_cut_off(self):
        """A request head that keeps trickling in (each byte resetting the idle timer) is cut off at limits.header_timeout."""
        gw = self.start("limits: {header_timeout: 1s}")
        for url in (gw.url, gw.debug_url):
            data = await trickle(url, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            self.assertIsNotNone(data, "the server never closed the connection")
            self.assertEqual(data, b"")
            # A later request on a kept-alive connection has its own deadline.
            data = await trickle(url, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            self.assertIsNotNone(data, "the server never closed the kept-alive connection")
            self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:100])
        # A connection that sends nothing at all is closed too.
        proto = await connect(gw.url)
        guard = reactor.callLater(30, proto.transport.abortConnection)
        self.assertEqual(await proto.closed, b"")
        self.assertTrue(guard.active(), "the server never closed the silent connection")
        guard.cancel()
        # A prompt request is unaffected.
        self.assertEqual((await get_json(gw.url + "/healthz"))[0], 200)


# --- second round (issue 13, HTTP layer): what the re-test still broke -----------
#
# Big JSON bodies are parsed off the reactor; a trickled body is cut off with
# 408; strangers cannot make the gateway store a big body; every status has
# its reason phrase and everything twisted.web refuses by itself is answered
# in the JSON error shape; the access log redacts secret-ish names however
# they are spelled, form fields by name, and never logs opaque bodies.


class AnswerClient(Protocol):
    """Collects one answer: done when its head and Content-Length body are in, or when the server closes."""

    def __init__(self):
        self.data = b""
        self.answered = Deferred()

    def dataReceived(self, data):
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if sep and length and len(body) >= int(length.group(1)) and not self.answered.called:
            self.answered.callback(self.data)

    def connectionLost(self, reason):
        if not self.answered.called:
            self.answered.callback(self.data)


async def raw_answer(url, data, guard=20):
    """
    Send C{data} raw; (status, reason, {lower-case header: value}, body, bytes)
    of the answer, or C{None} when none came within C{guard} seconds.
    """
    host, port = url.split("//")[1].split(":")
    proto = AnswerClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), proto)
    proto.transport.write(data)
    timer = reactor.callLater(guard, proto.transport.abortConnection)
    received = await proto.answered
    if timer.active():
        timer.cancel()
    proto.transport.abortConnection()
    return split_answer(received) if received else None


def split_answer(received):
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2) if lines[0].startswith("HTTP/") else [None, None, None]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body
    status = int(parts[1]) if parts[1] else None
    return status, (parts[2] if len(parts) > 2 else None), headers, parsed, received


def assert_json_answer(testcase, answer, want_status, code, reason=None):
    """The answer is the JSON error shape with this status, code (and reason phrase), with nosniff."""
    testcase.assertIsNotNone(answer, "no answer: the server never closed the connection")
    status, phrase, headers, body, raw = answer
    testcase.assertIsInstance(body, dict, raw[:300])
    assert_error(testcase, status, body, want_status, code)
    testcase.assertEqual(headers.get("x-content-type-options"), "nosniff", raw[:300])
    testcase.assertTrue(headers.get("content-type", "").startswith("application/json"), raw[:300])
    if reason is not None:
        testcase.assertEqual(phrase, reason)


# --- 1: big bodies are parsed off the reactor ---------------------------------------


def chat_body(metadata):
    return json.dumps({"model": "qwen3:32b", "messages": HI, "metadata": metadata}, separators=(",", ":")).encode()


class BigBodyParseTests(Backed):
    async def post_big(self, body):
        headers = {"Content-Type": ["application/json"], "Authorization": [f"Bearer {token()}"]}
        response = await treq.post(self.gw.url + "/v1/chat/completions", data=body, headers=headers, persistent=False)
        return response.code, json.loads(await response.content())

    async def test_healthz_answers_while_a_big_body_is_parsed(self):
        """While a body over 64 KiB is being parsed, /healthz is answered (the parse waits for it), and before the big request's own answer."""
        from clawdbot.http import resource as web

        self.start()
        started = Deferred()
        healthz_done = threading.Event()
        seen = {}
        real = web.parse_json

        def parse_and_wait(raw):
            if len(raw) > web.INLINE_JSON:
                seen["on_reactor"] = threading.get_ident() == reactor_thread
                reactor.callFromThread(started.callback, None)
                # On the reactor thread this wait would hold /healthz back: it times out.
                seen["healthz_answered_during_parse"] = healthz_done.wait(10)
            return real(raw)

        reactor_thread = threading.get_ident()
        self.patch(web, "parse_json", parse_and_wait)
        order = []
        big = Deferred.fromCoroutine(self.post_big(chat_body([1.5] * 30000)))
        big.addCallback(lambda answer: order.append("big") or answer)
        await started
        status, _, body = await get_json(self.gw.url + "/healthz", timeout=20)
        order.append("healthz")
        healthz_done.set()
        self.assertEqual((status, body), (200, {"status": "ok"}))
        status, answer = await big
        self.assertEqual(status, 200, answer)
        self.assertEqual(seen, {"on_reactor": False, "healthz_answered_during_parse": True})
        self.assertEqual(order, ["healthz", "big"])

    async def test_reported_body_measured(self):
        """The reported 19.6 MB body (4.9M floats, one escape): /healthz keeps answering while it is parsed (and refused for its number of values); latencies printed."""
        from clawdbot.http import resource as web

        self.start()
        events = []
        real = web.parse_json

        def parse_and_tell(raw):
            reactor.callFromThread(events.append, "parse started")
            try:
                return real(raw)
            finally:
                reactor.callFromThread(events.append, "parse ended")

        self.patch(web, "parse_json", parse_and_tell)
        body = b'{"model":"qwen3:32b","messages":[{"role":"user","content":"hi"}],"metadata":[' + b"1e1," * 4_900_000 + b'"\\u00e9"]}'
        print(f"body: {len(body) / 1e6:.1f} MB")
        started = reactor.seconds()
        big = Deferred.fromCoroutine(self.post_big(body))
        done = []
        big.addBoth(lambda result: done.append(reactor.seconds()) or result)
        latencies, during = [], 0
        while not done:
            t0 = reactor.seconds()
            status, _, _ = await get_json(self.gw.url + "/healthz", timeout=30)
            self.assertEqual(status, 200)
            latencies.append(reactor.seconds() - t0)
            if events == ["parse started"]:
                during += 1
        status, answer = await big
        # Its 4.9 million values are past the cap on values per body.
        self.assertEqual(status, 400, answer)
        self.assertIn("values", answer["error"]["details"])
        latencies.sort()
        print(
            f"big request answered after {done[0] - started:.2f}s; {len(latencies)} /healthz calls meanwhile, "
            f"{during} of them answered while the body was being parsed; latency median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms"
        )
        self.assertEqual(events, ["parse started", "parse ended"])
        self.assertGreater(during, 0, "no /healthz answer while the body was being parsed")

    async def test_big_bodies_refused_the_same_way(self):
        """A big body is refused with the same 400s as a small one (surrogate, NaN, not an object, too many containers), off the reactor."""
        self.start()
        pad = b'"' + b"x" * 70000 + b'"'
        for body, words in (
            (b'{"pad": %s, "model": "\\ud800"}' % pad, "surrogate"),
            (b'{"pad": %s, "temperature": NaN}' % pad, "NaN"),
            (b'[%s]' % pad, "JSON object"),
            (b'{"pad": %s, "m": [%s]}' % (pad, b",".join([b"[]"] * 100_001)), "arrays and objects"),
            (b'{"pad": %s,}' % pad, "not valid JSON"),
        ):
            status, answer = await self.post_big(body)
            assert_error(self, status, answer, 400, "INVALID_REQUEST")
            self.assertIn(words, answer["error"]["details"])
        self.assertEqual(self.fake.requests_to("/api/chat"), [])


REFERENCE_PIECES = ["\\ud800", "\\uDBFF", "\\udc00", "\\uDFFF", "\\uD83D", "\\ude00", "\\uDe00", "\\\\", "\\\\ud800", "\\\\\\ud800", "\\u0041", "\\n", '\\"', "a", "ud800", "\\u00e9", "é", "\\/"]


def reference_lone_surrogate(text):
    """The old, slow rule: re-encode the parsed value."""
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class StrictJSONTextTests(SynchronousTestCase):
    @settings(max_examples=3000, deadline=None)
    @given(st.lists(st.lists(st.sampled_from(REFERENCE_PIECES), max_size=8), min_size=1, max_size=4))
    def test_surrogate_check_reads_the_text(self, strings):
        """The text-level lone-surrogate check agrees with re-encoding the parsed value, escaped backslashes and case included."""
        text = "{" + ", ".join(f'"k{i}": "{"".join(pieces)}"' for i, pieces in enumerate(strings)) + "}"
        lone = reference_lone_surrogate(text)
        self.assertEqual(has_lone_surrogate(text), lone, text)
        if lone:
            with self.assertRaises(APIError):
                parse_json(text.encode())
        else:
            self.assertEqual(parse_json(text.encode()), json.loads(text))

    def test_surrogate_examples(self):
        """Pairs in any case are text; a lone half, a reversed pair or a half after an escaped backslash is refused."""
        for ok in ('"\\ud83d\\ude00"', '"\\uD83D\\uDE00"', '"\\\\ud800"', '"\\\\\\\\ud800"', '"x\\u00e9"', '"ud800"'):
            self.assertFalse(has_lone_surrogate(ok), ok)
        for bad in ('"\\ud800"', '"\\uDC00"', '"\\ude00\\ud83d"', '"\\ud83d\\\\ude00"', '"\\\\\\ud800"', '"\\ud83d\\ud83d\\ude00"', '"\\ud83dx\\ude00"'):
            self.assertTrue(has_lone_surrogate(bad), bad)

    @settings(max_examples=400, deadline=None)
    @given(st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5), children, max_size=4),
        max_leaves=30,
    ))
    def test_counting_scanner_parses_the_same(self, value):
        """Past the container cap's quick count (brackets inside strings too), the counting scanner gives the same value as the C one."""
        text = json.dumps({"pad": "[{" * 3, "v": value})
        containers = text.count("[") + text.count("{") - 6
        self.patch(strictjson, "MAX_CONTAINERS", containers + 3)  # the quick count is over the cap, the real one is not
        self.assertEqual(parse_json(text.encode()), json.loads(text))

    @settings(max_examples=500, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
            lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
            max_leaves=20,
        ),
        st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, -(10**19) + 1, 10**19, 10**25, -(10**25)]),
    )
    def test_other_parties_json_as_the_standard_parser(self, value, edge):
        """
        loads_checked (orjson first, issue 21) gives what the standard parser
        gives for standard JSON: integers at and beyond orjson's 64-bit range
        stay exact, never floats.
        """
        text = json.dumps({"v": value, "edge": edge, "list": [edge, -edge]}, ensure_ascii=False)
        self.assertEqual(strictjson.loads_checked(text.encode("utf-8", "surrogatepass")), json.loads(text))
        self.assertEqual(strictjson.loads_checked(text), json.loads(text))

    def test_exact_parser_refuses_what_orjson_refuses(self):
        """With twenty digits in a row (the exact parser's case) a reply is refused for what orjson refuses: non-finite numbers, lone surrogates."""
        digits = '"12345678901234567890"'
        for bad in ('{"a": 1e400, "d": %s}', '{"a": -1e400, "d": %s}', '{"a": "\\ud800", "d": %s}', '{"a": NaN, "d": %s}', '{"a": "\ud800", "d": %s}'):
            text = bad % digits
            for raw in (text, text.encode("utf-8", "surrogatepass")):
                with self.assertRaises(ValueError, msg=repr(raw)):
                    strictjson.loads_checked(raw)
            with self.assertRaises(ValueError, msg=repr(text)):
                strictjson.loads_checked(text.replace(digits, "1"))

    def test_container_cap(self):
        """More than MAX_CONTAINERS arrays and objects are refused; as many brackets inside strings are not."""
        many = b'{"m": [%s]}' % b",".join([b"[]"] * strictjson.MAX_CONTAINERS)
        with self.assertRaises(APIError) as caught:
            parse_json(many)
        self.assertIn("arrays and objects", caught.exception.details)
        brackets = b'{"text": "%s"}' % (b"[{" * strictjson.MAX_CONTAINERS)
        self.assertEqual(len(parse_json(brackets)["text"]), 2 * strictjson.MAX_CONTAINERS)


# --- 2: a trickled body is cut off; strangers cannot make the gateway store a big body


class BodyArrivalTests(Backed):
    async def test_trickled_body_is_408(self):
        """A body that keeps trickling in (each byte restarting the idle timer) gets a JSON 408 at limits.body_timeout, then the close."""
        gw = self.start("limits: {body_timeout: 1s}")
        auth = f"Authorization: Bearer {token()}\r\n"
        for url, head in (
            (gw.url, f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"),
            (gw.url, f"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n"),
            (gw.debug_url, "POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"),
        ):
            data = await trickle(url, head.encode(), b"x")
            answer = None if data is None else split_answer(data)
            assert_json_answer(self, answer, 408, "REQUEST_TIMEOUT", reason="Request Timeout")
            self.assertEqual(answer[2].get("connection"), "close")
        logged = [line for line in self.access_lines() if line["status"] == 408]
        self.assertEqual([line["path"] for line in logged], ["/v1/chat/completions", "/v1/sessions", "/v1/sessions"])
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        # A body that arrives in time is unaffected.
        status, _, _ = await get_json(gw.url + "/v1/sessions", method="POST", headers=bearer(token()), body={"title": "t"})
        self.assertEqual(status, 201)

    async def test_anonymous_big_body_refused_before_it_is_read(self):
        """On the secure port a body over 64 KiB without a Bearer token is a 401 at once, declared or chunked, on any path."""
        gw = self.start()
        for path in ("/v1/chat/completions", "/v1/sessions", "/auth/refresh", "/nope"):
            for auth in ("", "Authorization: Basic YWxpY2U6cHc=\r\n", "Authorization: Bearer\r\n"):
                head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: 70000\r\n\r\n"
                answer = await raw_answer(gw.url, head.encode())  # the body is never sent
                assert_json_answer(self, answer, 401, "AUTH_MISSING_TOKEN", reason="Unauthorized")
                self.assertEqual(answer[2].get("www-authenticate"), 'Bearer realm="clawdbot"')
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"x" * 40000
        answer = await raw_answer(gw.url, head + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2)
        assert_json_answer(self, answer, 401, "AUTH_MISSING_TOKEN")

    async def test_big_body_with_token_or_on_debug_port_is_read(self):
        """A big body with a Bearer token, or on the debug port, or a small one without a token, reaches the route as before."""
        gw = self.start()
        body = chat_body(["x" * 100] * 1000)
        self.assertGreater(len(body), 64 * 1024)
        status, _, answer = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=bearer(token()), body=body)
        self.assertEqual(status, 200, answer)
        status, _, answer = await get_json(gw.debug_url + "/v1/chat/completions", method="POST", body=body)
        self.assertEqual(status, 200, answer)
        status, headers, answer = await get_json(gw.url + "/v1/chat/completions", method="POST", body=chat_body([]))
        assert_error(self, status, answer, 401, "AUTH_MISSING_TOKEN")
        # An invalid token is checked after the body, as usual.
        status, _, answer = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=bearer("not-a-token"), body=body)
        assert_error(self, status, answer, 401, "AUTH_INVALID_TOKEN")


# --- 3: reason phrases; what twisted.web refuses itself gets the JSON shape -------


class StatusLineTests(Backed):
    def test_every_status_has_its_reason(self):
        """Every status the gateway sends has its RFC 9110 / RFC 6585 reason phrase."""
        from clawdbot.errors import CODES

        for code, (status, _, _) in CODES.items():
            self.assertIn(status, REASONS, code)
        expected = {200: b"OK", 201: b"Created", 204: b"No Content", 302: b"Found", 408: b"Request Timeout", 413: b"Content Too Large",
                    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 501: b"Not Implemented", 503: b"Service Unavailable", 504: b"Gateway Timeout"}
        for status, phrase in expected.items():
            self.assertEqual(reason_phrase(status), phrase)
        self.assertNotIn(b"Unknown", reason_phrase(599))

    async def test_reason_phrases_on_the_wire(self):
        """429, 413, 501, 404 and 200 go out with their reason phrases, never 'Unknown Status'."""
        gw = self.start("rate_limit: {requests_per_minute: 1}\nlimits: {max_body: 2KB}")
        auth = bearer(token())
        seen = {}
        for _ in range(2):
            response = await treq.get(gw.url + "/v1/models", headers=auth, persistent=False)
            await response.content()
            seen[response.code] = response.phrase
        response = await treq.post(gw.url + "/v1/sessions", headers=auth, data=b"x" * 5000, persistent=False)
        await response.content()
        seen[response.code] = response.phrase
        for method, path in (("BREW", "/healthz"), ("GET", "/nope"), ("GET", "/healthz")):
            response = await treq.request(method, gw.url + path, persistent=False)
            await response.content()
            seen[response.code] = response.phrase
        self.assertEqual(seen, {200: b"OK", 429: b"Too Many Requests", 413: b"Content Too Large", 501: b"Not Implemented", 404: b"Not Found"})


MALFORMED = [
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Nul: a\x00b\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nno-colon-here\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Name: x\r\n\r\n",
    b"GET /healthz\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET /healthz HTTP/1.1 extra\r\nHost: localhost\r\n\r\n",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


class MalformedRequestTests(Backed):
    async def test_malformed_requests_get_json_400(self):
        """What twisted.web refuses by itself (NUL, bad header, HTTP/0.9, bad request line, bad length or chunk) is a JSON 400 with nosniff."""
        gw = self.start()
        for url in (gw.url, gw.debug_url):
            for data in MALFORMED:
                answer = await raw_answer(url, data)
                assert_json_answer(self, answer, 400, "INVALID_REQUEST", reason="Bad Request")
                self.assertEqual(answer[2].get("connection"), "close")
        status, _, _ = await get_json(gw.url + "/healthz")
        self.assertEqual(status, 200)

    async def test_oversized_heads_get_json_431(self):
        """A 20 KB Authorization header, a long request line, headers over 16 KB in all, or over 500 of them: a JSON 431."""
        gw = self.start()
        heads = [
            b"GET /v1/me HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + b"a" * 20000 + b"\r\n\r\n",
            b"GET /v1/me?" + b"q" * 20000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET /v1/me HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 2000) for i in range(10)) + b"\r\n",
            b"GET /v1/me HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(501)) + b"\r\n",
        ]
        for data in heads:
            answer = await raw_answer(gw.url, data)
            assert_json_answer(self, answer, 431, "HEADER_TOO_LARGE", reason="Request Header Fields Too Large")
        # Just under every limit is fine.
        ok = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer " + b"a" * 8000 + b"\r\n\r\n"
        answer = await raw_answer(gw.url, ok)
        self.assertEqual(answer[0], 200)


# --- 4: redaction of secret-ish names, forms and opaque bodies ----------------------


SECRET_NAMES = [
    "private_key", "privateKey", "access_key", "AWS_SECRET_ACCESS_KEY", "pwd", "PWD", "passwd", "Password", "userPassword",
    "auth", "Auth", "basic_auth", "bearer", "refresh", "refreshToken", "refresh_token", "session", "Session", "session_token",
    "sessionKey", "sig", "signature", "x-signature", "otp", "totp", "pin", "PIN", "api_key", "apiKey", "API-KEY", "x_api_key",
    "X-Api-Key", "xapikey", "clientSecret", "client_secret", "CLIENT_SECRET", "id_token", "X-Auth-Token", "cookie", "credentials",
    "code_verifier", "key", "hmac", "passphrase",
]
PLAIN_NAMES = ["session_id", "sessionId", "max_tokens", "prompt_tokens", "completion_tokens", "total_tokens", "author", "model",
               "messages", "content", "pinned", "keep_alive", "tokenizer", "monkey", "temperature", "role", "title"]


class RedactionVariantTests(Backed):
    def test_secret_names_in_every_spelling(self):
        """Secret-ish key names in any case, prefix or camelCase are redacted in logged bodies; session_id, token counts and others are not."""
        for name in SECRET_NAMES:
            self.assertEqual(redact({"metadata": {name: "canary-value"}}), {"metadata": {name: "[redacted]"}}, name)
            self.assertNotIn("canary-value", redact_text(f"{name}=canary-value&x=1"), name)
            self.assertNotIn("canary-value", redact_text(f'prefix "{name}": "canary-value"'), name)
        for name in PLAIN_NAMES:
            self.assertEqual(redact({name: "shown"}), {name: "shown"}, name)
            self.assertEqual(redact_text(f"{name}=shown"), f"{name}=shown", name)
        # An OAuth code is a secret in a request; an error code in a response is not.
        self.assertEqual(redact({"code": "oauth-code"}), {"code": "[redacted]"})
        error = b'{"error": {"message": "Rate limit exceeded", "type": "rate_limit_error", "code": "RATE_LIMITED"}}'
        self.assertEqual(redact_body(error, "application/json; charset=utf-8", response=True)["error"]["code"], "RATE_LIMITED")
        stream = redact_body(b'data: {"error": {"code": "UPSTREAM_TIMEOUT"}}\n\n', "text/event-stream", response=True)
        self.assertIn("UPSTREAM_TIMEOUT", stream)

    def test_forms_and_opaque_bodies(self):
        """Form fields are redacted by name (urlencoded and multipart); a body that is neither JSON nor text is logged by size and type only."""
        multipart = (
            b"--XyZ\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\ncanary-pw\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"clientSecret\"\r\n\r\ncanary-cs\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\nContent-Type: application/octet-stream\r\n\r\ncanary-file\r\n"
            b"--XyZ--\r\n"
        )
        logged = redact_body(multipart, 'multipart/form-data; boundary="XyZ"')
        self.assertEqual(logged, {"form-data": {"password": "[redacted]", "clientSecret": "[redacted]", "note": "hello", "file": {"file": "a.bin", "bytes": 11}}})
        logged = redact_body(b"user=al&PWD=canary-a&x_api_key=canary-b&otp=123456", "application/x-www-form-urlencoded")
        self.assertEqual(logged, {"form": {"user": "al", "PWD": "[redacted]", "x_api_key": "[redacted]", "otp": "[redacted]"}})
        for ctype in ("application/octet-stream", "image/png", "multipart/form-data", "application/xml", "multipart/form-data; boundary=nope"):
            logged = redact_body(b"password=canary-opaque\x00\x01", ctype)
            self.assertEqual(logged, {"omitted": "body not logged: not JSON, a JSON stream or a form", "bytes": 24, "type": ctype.split(";")[0]}, ctype)

    async def test_access_log_redacts_variants(self):
        """Sampled access-log lines never carry a secret-named value, a form secret or an opaque body; session_id and error codes stay visible."""
        gw = self.start("access_log: {sample_rate: 1.0}")
        auth = {"Authorization": [f"Bearer {token()}"]}
        canaries = {name: f"canary{i:03d}value" for i, name in enumerate(SECRET_NAMES)}
        body = json.dumps({"messages": HI, "session_id": "not-a-session", "metadata": canaries}).encode()
        bodies = [
            ("application/json", body),
            ("text/plain", body),
            ("multipart/form-data; boundary=b0", b'--b0\r\nContent-Disposition: form-data; name="password"\r\n\r\ncanary-multipart\r\n--b0--\r\n'),
            ("application/x-www-form-urlencoded", b"pwd=canary-form&signature=canary-sig"),
            ("application/octet-stream", b"opaque canary-opaque \x00" * 3),
        ]
        for ctype, data in bodies:
            response = await treq.post(gw.url + "/v1/chat/completions", headers=dict(auth, **{"Content-Type": [ctype]}), data=data, persistent=False)
            await response.content()
        text = self.access_text()
        for canary in list(canaries.values()) + ["canary-multipart", "canary-form", "canary-sig", "canary-opaque"]:
            self.assertNotIn(canary, text)
        lines = self.access_lines()
        self.assertEqual(lines[0]["request_body"]["session_id"], "not-a-session")
        self.assertEqual(lines[0]["session"], "not-a-session")
        self.assertEqual(lines[0]["response_body"]["error"]["code"], "NOT_FOUND")
        self.assertEqual(lines[4]["request_body"], {"omitted": "body not logged: not JSON, a JSON stream or a form", "bytes": 66, "type": "application/octet-stream"})
        self.assertEqual(lines[4]["response_body"]["error"]["code"], "INVALID_REQUEST")


# --- issue 13 follow-up: bodies logged only in a parsed form, the '*' target, ----
# --- no twisted.web Server header, 499 for clients that leave unanswered ---------


UNPARSED_BODIES = [
    ("application/json", b'{"password"\n:\n"canary-n1",}'),
    ("application/json", b'{"password": \n"canary-n2"'),
    ("application/json", b'{"password" \r: "canary-n3"'),
    ("application/json", b'{"p\\u0061ssword": "canary-n4",}'),
    ("application/json; charset=utf-8", b"{'password': 'canary-n5'}"),
    ("text/xml", b"<password>canary-x1</password>"),
    ("application/xml", b"<a><secret>canary-x2</secret></a>"),
    ("text/plain", b"my password is canary-t1"),
    ("text/event-stream", b'data: {"a": 1}\n\npassword: canary-t2\n\n'),
    ("application/x-ndjson", b'{"a": 1}\n{"pass" "canary-t3"}\n'),
    (None, b"password canary-t4"),
]


async def exchange(url, head, body=b""):
    """Send C{head} (lines, no blank line) and C{body}; (status, {lower-case name: [values]}, body bytes, raw bytes)."""
    proto = await connect(url)
    proto.transport.write(head.encode("latin-1") + b"\r\n\r\n" + body)
    data = await proto.closed
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower().decode(), []).append(value.strip().decode("latin-1"))
    return int(lines[0].split()[1]), headers, payload, data


class FollowUpTests(Backed):
    """The second outside attack on issue 13: secrets in unparsed bodies, the '*' target, Twisted's Server header, 499."""

    def test_unparsed_bodies_are_described_not_logged(self):
        """A body that does not parse as JSON, a JSON stream or a form is logged as size and type only, never as (redacted) text."""
        for ctype, raw in UNPARSED_BODIES:
            media = ctype.split(";")[0] if ctype else None
            self.assertEqual(redact_body(raw, ctype), {"omitted": "body not logged: not JSON, a JSON stream or a form", "bytes": len(raw), "type": media}, raw)
            self.assertEqual(redact_body(raw, ctype, response=True)["bytes"], len(raw))

    def test_streams_logged_line_by_line(self):
        """SSE and NDJSON whose lines each parse are logged redacted line by line; only exact markers pass unparsed, else the whole body is omitted."""
        sse = b'data: {"choices": [{"delta": {"content": "Bearer canary-s1"}}], "password": "canary-s2"}\n\ndata: [DONE]\n\n'
        logged = redact_body(sse, "text/event-stream", response=True)
        self.assertNotIn("canary", logged)
        self.assertEqual(logged.split("\n")[2:], ["data: [DONE]", "", ""])
        self.assertEqual(json.loads(logged.split("\n")[0][6:])["password"], "[redacted]")
        ndjson = b'{"message": {"content": "hi"}, "api_key": "canary-s3"}\n{"done": true}\n'
        self.assertEqual(redact_body(ndjson, "application/x-ndjson", response=True), '{"message": {"content": "hi"}, "api_key": "[redacted]"}\n{"done": true}\n')
        for marker in (b"data: [DONE] ", b"data:[DONE]", b"[DONE]", b": keep-alive canary-s4"):
            self.assertIn("omitted", redact_body(b'data: {"a": 1}\n\n' + marker + b"\n\n", "text/event-stream"), marker)

    def test_authorization_schemes_in_free_values(self):
        """Token, Basic and Digest credentials in a free string are redacted like Bearer ones (auth-params included); prose about tokens stays."""
        for text in ("Token canary-a1", "TOKEN canary-a1", "x Basic Y2FuYXJ5LWEy rest", "Digest username=\"u\", nonce=\"n\", response=\"canary-a3\"", "bearer canary-a4"):
            self.assertNotIn("canary", redact_text(text), text)
            self.assertNotIn("canary", json.dumps(redact_body(json.dumps({"x": text}).encode(), "application/json")), text)
        self.assertEqual(redact_body(b'{"x":"Token S"}', "application/json"), {"x": "Token [redacted]"})
        self.assertEqual(redact_text("token is expired"), "token is expired")

    async def test_access_log_never_carries_unparsed_bodies(self):
        """On a real socket, with every request sampled, no body that fails to parse reaches the access log, whatever its declared type."""
        gw = self.start("access_log: {sample_rate: 1.0}")
        bodies = UNPARSED_BODIES + [("application/json", b'{"x": "Token canary-j1", "y": "Basic canary-j2"}')]
        for ctype, data in bodies:
            headers = {"Authorization": [f"Bearer {token()}"]}
            if ctype:
                headers["Content-Type"] = [ctype]
            response = await treq.post(gw.url + "/v1/chat/completions", headers=headers, data=data, persistent=False)
            await response.content()
        text = self.access_text()
        self.assertNotIn("canary", text)
        lines = self.access_lines()
        self.assertEqual(len(lines), len(bodies))
        for line, (ctype, data) in zip(lines, UNPARSED_BODIES):
            self.assertEqual(line["request_body"]["bytes"], len(data), data)
            self.assertEqual(line["response_body"]["error"]["code"], "INVALID_REQUEST")
        self.assertEqual(lines[-1]["request_body"], {"x": "Token [redacted]", "y": "Basic [redacted]"})

    async def test_star_target(self):
        """'OPTIONS *' gets 204 with Allow; any other method on '*' a JSON 400; both with the gateway's headers, on both listeners."""
        gw = self.start()
        for url in (gw.url, gw.debug_url):
            status, headers, body, raw = await exchange(url, "OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close")
            self.assertEqual((status, body), (204, b""), raw)
            self.assertEqual(headers["allow"], ["GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"])
            self.assertEqual((headers["server"], headers["x-content-type-options"]), (["clawdbot"], ["nosniff"]), raw)
            for method in ("GET", "POST", "DELETE", "HEAD"):
                status, headers, body, raw = await exchange(url, f"{method} * HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close")
                self.assertEqual((status, headers["server"], headers["x-content-type-options"]), (400, ["clawdbot"], ["nosniff"]), raw)
                if method != "HEAD":
                    assert_error(self, status, json.loads(body), 400, "INVALID_REQUEST")
                    self.assertEqual(json.loads(body)["error"]["details"], "the request target '*' is not supported")

    async def test_no_twisted_server_header_anywhere(self):
        """Every answer (normal, 404, 501, malformed, refused while the body arrives, an error outside the handlers) says Server: clawdbot and nosniff, never TwistedWeb."""
        gw = self.start("limits: {max_body: 1KiB}")
        auth = f"Authorization: Bearer {token()}\r\n"
        cases = [
            ("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close", b"", 200),
            ("GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close", b"", 404),
            ("BREW / HTTP/1.1\r\nHost: localhost\r\nConnection: close", b"", 501),
            ("GET / HTTP/1.1\r\nHost: localhost\r\nbare-name-no-colon", b"", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close", b"", 400),
            (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: 2000", b"x" * 2000, 413),
        ]
        for head, body, want in cases:
            status, headers, _, raw = await exchange(gw.url, head, body)
            self.assertEqual(status, want, raw)
            self.assertEqual(headers.get("server"), ["clawdbot"], raw)
            self.assertEqual(headers.get("x-content-type-options"), ["nosniff"], raw)
            self.assertNotIn(b"twisted", raw.lower())

        def boom(site, request):
            raise RuntimeError("routing failed")

        self.patch(web.GatewaySite, "getResourceFor", boom)
        status, headers, body, raw = await exchange(gw.url, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close")
        assert_error(self, status, json.loads(body), 500, "INTERNAL_ERROR")
        self.assertEqual((headers["server"], headers["content-type"]), (["clawdbot"], ["application/json; charset=utf-8"]))
        self.assertNotIn(b"Processing Failed", raw)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def _next_done(self):
        """A Deferred that fires with the next request the gateway accounts for (access log and metrics written)."""
        accounting, d = self.gw.parts.accounting, Deferred()
        original = accounting.done

        def request_done(request):
            original(request)
            if not d.called:
                d.callback(request)

        self.patch(accounting, "done", request_done)
        return d

    def _status_count(self, status):
        metrics = self.gw.parts.metrics.render().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("clawdbot_requests_total{") and f'status="{status}"' in line)

    async def test_client_gone_before_first_byte_is_499(self):
        """A client that leaves before any byte of the answer is logged and counted as 499 (client closed request), not 200."""
        self.start("access_log: {sample_rate: 0}")
        self.fake.hold()
        body = json.dumps({"messages": HI, "stream": True}).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token()}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        proto = await connect(self.gw.url)
        proto.transport.write(head.encode() + b"\r\n\r\n" + body)
        await self.fake.next_request("/api/chat")
        done = self._next_done()
        proto.transport.loseConnection()
        await done
        self.fake.behave()
        line = self.access_lines()[-1]
        self.assertEqual((line["status"], line.get("client_gone")), (499, True), line)
        self.assertEqual(self._status_count(499), 1)
        self.assertEqual(self._status_count(200), 0)

    async def test_client_gone_while_queued_is_499(self):
        """A client that leaves while waiting for a backend slot is logged and counted as 499; one answered normally stays 200."""
        self.start("max_connections: 1\naccess_log: {sample_rate: 0}")
        self.fake.hold()
        queued = when_queued(self, self.gw.parts)
        body = json.dumps({"messages": HI}).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token()}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        first = await connect(self.gw.url)
        first.transport.write(head.encode() + b"\r\n\r\n" + body)
        await self.fake.next_request("/api/chat")
        second = await connect(self.gw.url)
        second.transport.write(head.encode() + b"\r\n\r\n" + body)
        await queued
        done = self._next_done()
        second.transport.loseConnection()
        await done
        line = self.access_lines()[-1]
        self.assertEqual((line["status"], line.get("client_gone")), (499, True), line)
        self.assertEqual(self._status_count(499), 1)
        done = self._next_done()
        first.transport.loseConnection()
        await done
        self.fake.behave()
        status, _, _ = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=bearer(token()), body={"messages": HI})
        self.assertEqual(status, 200)
        self.assertEqual(self._status_count(200), 1)


class ClientAddressTests(SynchronousTestCase):
    """server.trusted_proxies: whose X-Forwarded-For / Forwarded is believed, and which hop is the client."""

    TRUSTED = ("127.0.0.1/32", "10.0.0.0/8")

    def test_only_a_trusted_peer_is_believed(self):
        from clawdbot.net import client_address

        self.assertEqual(client_address("127.0.0.1", [b"203.0.113.9"], [], self.TRUSTED), "203.0.113.9")
        self.assertEqual(client_address("198.51.100.1", [b"203.0.113.9"], [], self.TRUSTED), "198.51.100.1")
        self.assertEqual(client_address("127.0.0.1", [b"203.0.113.9"], [], ()), "127.0.0.1")
        self.assertEqual(client_address("127.0.0.1", [], [], self.TRUSTED), "127.0.0.1")

    def test_the_right_most_untrusted_hop(self):
        """A client's own X-Forwarded-For entries are left of what the proxies added: only the right-most untrusted hop counts."""
        from clawdbot.net import client_address

        self.assertEqual(client_address("127.0.0.1", [b"6.6.6.6, 203.0.113.9"], [], self.TRUSTED), "203.0.113.9")
        self.assertEqual(client_address("127.0.0.1", [b"6.6.6.6", b"203.0.113.9, 10.1.2.3"], [], self.TRUSTED), "203.0.113.9")
        self.assertEqual(client_address("127.0.0.1", [b"10.0.0.5"], [], self.TRUSTED), "10.0.0.5")

    def test_garbage_never_names_someone_else(self):
        """A hop that is not an address ends the walk at the last trusted proxy."""
        from clawdbot.net import client_address

        for header in (b"garbage", b"203.0.113.9, nonsense", b"unknown", b""):
            self.assertEqual(client_address("127.0.0.1", [header], [], self.TRUSTED), "127.0.0.1", header)

    def test_forwarded_header(self):
        """RFC 7239 Forwarded (quoted IPv6 with a port too) is read when the proxy sends no X-Forwarded-For; never instead of one (a client's own would pass a proxy that sets only X-Forwarded-For)."""
        from clawdbot.net import client_address

        forwarded = [b"for=192.0.2.60;proto=http;by=203.0.113.43", b'for="[2001:db8::1]:4711"']
        self.assertEqual(client_address("127.0.0.1", [], forwarded, self.TRUSTED), "2001:db8::1")
        self.assertEqual(client_address("127.0.0.1", [b"203.0.113.9"], [b"for=198.51.100.7"], self.TRUSTED), "203.0.113.9")
        self.assertEqual(client_address("127.0.0.1", [], [b"for=192.0.2.60:8080"], self.TRUSTED), "192.0.2.60")

    def test_zone_ids_and_mapped_addresses(self):
        """A zone id (free text after %) is no address; an IPv4-mapped peer is its IPv4 address, so 127.0.0.1/32 matches a dual-stack socket's view."""
        from clawdbot.net import client_address

        self.assertEqual(client_address("127.0.0.1", [], [b'for="[fe80::1%anything, at all]"'], self.TRUSTED), "127.0.0.1")
        self.assertEqual(client_address("127.0.0.1", [b"fe80::1%eth0"], [], self.TRUSTED), "127.0.0.1")
        self.assertEqual(client_address("::ffff:127.0.0.1", [b"203.0.113.9"], [], self.TRUSTED), "203.0.113.9")

    def test_config_entries(self):
        from clawdbot.config import ConfigError, parse_config
        from tests.helpers import BASE_CONFIG, merge_yaml

        config = parse_config(merge_yaml(BASE_CONFIG, 'server: {trusted_proxies: ["127.0.0.1", "10.1.2.3/8", "::1"]}'), {})
        self.assertEqual(config.server.trusted_proxies, ("127.0.0.1/32", "10.0.0.0/8", "::1/128"))
        everyone = parse_config(merge_yaml(BASE_CONFIG, 'server: {trusted_proxies: ["0.0.0.0/0"]}'), {})
        self.assertTrue([w for w in everyone.warnings if "trusts every client" in w])
        for bad in ("nginx", "10.0.0.0/33", "*"):
            with self.assertRaises(ConfigError) as caught:
                parse_config(merge_yaml(BASE_CONFIG, f'server: {{trusted_proxies: ["{bad}"]}}'), {})
            self.assertEqual(caught.exception.path, "server.trusted_proxies[0]")
