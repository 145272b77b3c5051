"""
Browser pages on other origins calling the secure port (issue 14 item 8):
C{server.cors_origins}, the preflight, the CORS headers of every answer
(errors and streams included), the debug listener's shared rule, reloads,
and a real Chromium page on a second loopback origin.
"""

import json
import socket

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from clawdbot.http import cors
from clawdbot.config import ConfigError, parse_config, restart_needed
from clawdbot.ops.ratelimit import Decision
from tests.browser import run_in_browser
from tests.helpers import get_json, token
from tests.test_chat import HI, Backed
from tests.test_sso import XRW, Flow

APP = "https://app.example.com"
OTHER = "http://127.0.0.1:3000"
ORIGINS = f'server: {{cors_origins: ["{APP}", "{OTHER}"]}}'
CHAT = {"model": "qwen3:32b", "messages": HI}
# What the openai SDK (and the AI SDK's fetch) ask for in a preflight.
SDK_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-arch, x-stainless-lang, x-stainless-package-version, x-stainless-runtime, x-stainless-runtime-version, x-stainless-retry-count, x-stainless-timeout, openai-organization, openai-project"
# Vary: Origin may come without them (the answer depends on the Origin sent).
CORS_NAMES = ("access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers", "access-control-expose-headers", "access-control-max-age", "access-control-allow-credentials")
BASE = 'auth: {jwt: {secret: "s-0123456789abcdef0123456789abcdef", issuer: "https://i.example", audience: "a"}}\n'


def preflight(origin, method="POST", asked=SDK_HEADERS):
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if asked is not None:
        headers["Access-Control-Request-Headers"] = asked
    return headers


def raw_answer(url, head):
    """The status and headers (lower-case names) of the answer to C{head}, over a plain socket."""
    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers


class ConfigTests(SynchronousTestCase):
    def origins(self, *entries):
        return parse_config(BASE + "server: {cors_origins: %s}" % json.dumps(list(entries)), {}).server.cors_origins

    def refused(self, entries, index=0):
        with self.assertRaises(ConfigError) as caught:
            self.origins(*entries)
        self.assertEqual(caught.exception.path, f"server.cors_origins[{index}]", entries)
        return caught.exception.reason

    def test_default_is_empty(self):
        """No origin may call the secure port unless listed."""
        self.assertEqual(parse_config(BASE, {}).server.cors_origins, ())

    def test_normalised(self):
        """Scheme and host in lower case, a default port left out, IPv6 in its short form: as a browser sends Origin."""
        self.assertEqual(
            self.origins("HTTPS://App.Example.COM", "http://LOCALHOST:3000", "https://a.example:443", "http://b.example:80", "http://[0:0::1]:8080", "https://c.example:8443"),
            ("https://app.example.com", "http://localhost:3000", "https://a.example", "http://b.example", "http://[::1]:8080", "https://c.example:8443"),
        )

    def test_wildcards_and_non_origins_refused(self):
        """'*', wildcards, paths, a trailing slash, userinfo, other schemes and bad ports are config errors naming the entry."""
        cases = {
            "*": "'*' is not allowed",
            "https://*.example.com": "is not allowed",
            "null": "is not allowed",
            "https://app.example.com/": "must not end with a slash",
            "https://app.example.com/chat": "without a path",
            "https://app.example.com?x=1": "without a path, query or fragment",
            "https://user:pw@app.example.com": "must not contain credentials",
            "ftp://app.example.com": "must start with http:// or https://",
            "app.example.com": "must start with http:// or https://",
            "https://app.example.com:0": "port from 1 to 65535",
            "https://app.example.com:70000": "port from 1 to 65535",
            "https://app example.com": "must not contain spaces",
            "https://app.example.com\n": "control characters",
            "http://1.2.3": "neither a name nor an IP address",
            "https://0x7f000001": "four decimal numbers",
            "https://a..b": "scheme://host",
            "https://-a.example": "scheme://host",
            "https://bücher.example": "xn-- form",
        }
        for entry, reason in cases.items():
            self.assertIn(reason, self.refused(["https://ok.example", entry], index=1), entry)
        with self.assertRaises(ConfigError) as caught:
            parse_config(BASE + 'server: {cors_origins: "*"}', {})
        self.assertEqual(caught.exception.path, "server.cors_origins")

    def test_reloadable(self):
        """A change of the list needs no restart."""
        old, new = parse_config(BASE, {}), parse_config(BASE + ORIGINS, {})
        self.assertEqual(restart_needed(old, new), [])

    def test_exposed_names_cover_the_rate_limit_headers(self):
        """Every header a rate-limit decision can set is readable by a cross-origin page."""
        exposed = {name.strip().lower() for name in cors.EXPOSED.decode().split(",")}
        for kind in ("requests", "tokens"):
            names = {name.lower() for name in Decision(False, 5, 0, 3.0, 3.0, kind).headers()}
            self.assertLessEqual(names, exposed, kind)
        self.assertIn("x-request-id", exposed)


class SecurePortTests(Backed):
    def assert_cors(self, headers, origin=APP):
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [origin])
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])
        exposed = headers.getRawHeaders("access-control-expose-headers")[0].lower()
        for name in ("x-request-id", "retry-after", "x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens"):
            self.assertIn(name, exposed)
        self.assertIsNone(headers.getRawHeaders("access-control-allow-credentials"))

    def assert_no_cors(self, headers):
        for name in CORS_NAMES:
            self.assertIsNone(headers.getRawHeaders(name), name)

    async def test_preflight_allowed(self):
        """An allowed origin's preflight is 204 without credentials: the route's methods, the asked headers, 10 minutes, no credentials."""
        gw = self.start(ORIGINS)
        status, headers, body = await get_json(gw.url + "/v1/chat/completions", method="OPTIONS", headers=preflight(APP))
        self.assertEqual((status, body), (204, None))
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [APP])
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])
        self.assertEqual(headers.getRawHeaders("access-control-allow-methods"), ["POST, OPTIONS"])
        self.assertEqual(headers.getRawHeaders("access-control-allow-headers"), [SDK_HEADERS])
        self.assertEqual(headers.getRawHeaders("access-control-max-age"), ["600"])
        self.assertIsNone(headers.getRawHeaders("access-control-allow-credentials"))
        # Each route grants its own methods; header names are echoed in lower case, once.
        for path, methods in (("/v1/models", "GET, OPTIONS"), ("/v1/sessions", "GET, POST, OPTIONS"), ("/v1/sessions/abc", "DELETE, GET, PATCH, OPTIONS")):
            status, headers, _ = await get_json(gw.url + path, method="OPTIONS", headers=preflight(OTHER, "GET", "Authorization, X-Custom, authorization"))
            self.assertEqual(status, 204, path)
            self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [OTHER])
            self.assertEqual(headers.getRawHeaders("access-control-allow-methods"), [methods], path)
            self.assertEqual(headers.getRawHeaders("access-control-allow-headers"), ["authorization, x-custom"])
        status, headers, _ = await get_json(gw.url + "/v1/models", method="OPTIONS", headers=preflight(APP, "GET", None))
        self.assertEqual(status, 204)
        self.assertIsNone(headers.getRawHeaders("access-control-allow-headers"))
        self.assertEqual(self.fake.requests_to("/api/chat"), [])

    async def test_preflight_refused(self):
        """A preflight from any origin not listed exactly is 403 ORIGIN_REJECTED with no CORS header; so is every preflight by default."""
        gw = self.start(ORIGINS)
        for origin in ("https://evil.example", APP + ".evil.example", "http://app.example.com", "https://APP.example.com", APP + ":8443", "null", APP + "/"):
            status, headers, body = await get_json(gw.url + "/v1/chat/completions", method="OPTIONS", headers=preflight(origin))
            self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"), origin)
            self.assert_no_cors(headers)
        status, headers, body = await get_json(gw.url + "/v1/chat/completions", method="OPTIONS", headers={"Access-Control-Request-Method": "POST"})
        self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"))
        # An OPTIONS that is no preflight stays a 405, and an unknown route a 404.
        status, headers, body = await get_json(gw.url + "/v1/chat/completions", method="OPTIONS", headers={"Origin": APP})
        self.assertEqual((status, body["error"]["code"]), (405, "METHOD_NOT_ALLOWED"))
        status, headers, body = await get_json(gw.url + "/v1/nope", method="OPTIONS", headers=preflight(APP))
        self.assertEqual((status, body["error"]["code"]), (404, "NOT_FOUND"))
        self.assert_cors(headers)

    async def test_preflight_without_any_origin_configured(self):
        """With the default empty list, no origin gets a preflight nor a CORS header."""
        gw = self.start()
        status, headers, body = await get_json(gw.url + "/v1/chat/completions", method="OPTIONS", headers=preflight(OTHER))
        self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"))
        self.assert_no_cors(headers)
        status, headers, _ = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=dict(self.auth, Origin=OTHER), body=CHAT)
        self.assertEqual(status, 200)
        self.assert_no_cors(headers)

    async def test_preflight_with_bad_header_names(self):
        """Access-Control-Request-Headers that is not a list of header names is a 400."""
        gw = self.start(ORIGINS)
        for asked in ("x-ok, bad header", "x-ok,,x-two", "a@b", "x-ok;"):
            status, _, body = await get_json(gw.url + "/v1/chat/completions", method="OPTIONS", headers=preflight(APP, asked=asked))
            self.assertEqual((status, body["error"]["code"]), (400, "INVALID_REQUEST"), asked)

    async def test_answers_carry_cors_headers(self):
        """200, 401, 403, 404, 405 and 400 answers to an allowed origin all carry the CORS headers; other origins' none."""
        gw = self.start(ORIGINS)
        status, headers, reply = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=dict(self.auth, Origin=APP), body=CHAT)
        self.assertEqual(status, 200, reply)
        self.assert_cors(headers)
        self.assertIsNotNone(headers.getRawHeaders("x-ratelimit-remaining-requests"))
        calls = [
            ("POST", "/v1/chat/completions", {}, CHAT, 401),
            ("POST", "/v1/chat/completions", {"Authorization": "Bearer " + token(scope="chat:read")}, CHAT, 403),
            ("GET", "/v1/nope", self.auth, None, 404),
            ("GET", "/v1/chat/completions", self.auth, None, 405),
            ("POST", "/v1/chat/completions", self.auth, {"messages": "no"}, 400),
            ("GET", "/healthz", {}, None, 200),
        ]
        for method, path, auth, body, want in calls:
            status, headers, reply = await get_json(gw.url + path, method=method, headers=dict(auth, Origin=OTHER), body=body)
            self.assertEqual(status, want, (path, reply))
            self.assert_cors(headers, OTHER)
            status, headers, _ = await get_json(gw.url + path, method=method, headers=dict(auth, Origin="https://evil.example"), body=body)
            self.assertEqual(status, want, path)
            self.assert_no_cors(headers)
            status, headers, _ = await get_json(gw.url + path, method=method, headers=auth, body=body)
            self.assert_no_cors(headers)

    async def test_rate_limited_answer(self):
        """A 429 to an allowed origin carries the CORS headers, and Retry-After is among the exposed ones."""
        gw = self.start(ORIGINS + "\nrate_limit: {requests_per_minute: 1}")
        status, _, _ = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin=APP))
        self.assertEqual(status, 200)
        status, headers, body = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin=APP))
        self.assertEqual((status, body["error"]["code"]), (429, "RATE_LIMITED"))
        self.assert_cors(headers)
        self.assertIsNotNone(headers.getRawHeaders("retry-after"))

    async def test_stream_carries_cors_headers(self):
        """A streamed (SSE) answer carries them too."""
        gw = self.start(ORIGINS)
        status, headers, raw = await get_json(gw.url + "/v1/chat/completions", method="POST", headers=dict(self.auth, Origin=APP), body=dict(CHAT, stream=True))
        self.assertEqual(status, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/event-stream"))
        self.assertIn(b"data: [DONE]", raw)
        self.assert_cors(headers)

    async def test_repeated_origin_is_not_allowed(self):
        """Two Origin headers, even both allowed, get no CORS header, and such a preflight is refused."""
        gw = self.start(ORIGINS)
        status, headers, _ = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin=[APP, APP]))
        self.assertEqual(status, 200)
        self.assert_no_cors(headers)
        status, headers, body = await get_json(gw.url + "/v1/models", method="OPTIONS", headers=dict(preflight(APP, "GET"), Origin=[APP, OTHER]))
        self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"))
        self.assert_no_cors(headers)

    async def test_early_refusals_carry_cors_headers(self):
        """A body refused while it arrives (413), and a request refused before routing (400), still tell an allowed page why."""
        gw = self.start(ORIGINS)
        status, headers = await deferToThread(
            raw_answer, gw.url, f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: {APP}\r\nContent-Type: application/json\r\nContent-Length: 900000000"
        )
        self.assertEqual(status, 413)
        self.assertEqual(headers["access-control-allow-origin"], [APP])
        self.assertIn("x-request-id", headers["access-control-expose-headers"][0].lower())
        status, headers = await deferToThread(raw_answer, gw.url, f"GET /v1/models HTTP/1.1\r\nHost: a b\r\nOrigin: {APP}\r\nConnection: close")
        self.assertEqual(status, 400)
        self.assertEqual(headers["access-control-allow-origin"], [APP])
        status, headers = await deferToThread(raw_answer, gw.url, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\nContent-Length: 900000000")
        self.assertEqual(status, 413)
        self.assertNotIn("access-control-allow-origin", headers)

    async def test_reload_changes_the_list(self):
        """SIGHUP's reload applies a new list to the next request, no restart needed."""
        gw = self.start(ORIGINS)
        _, headers, _ = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin=APP))
        self.assert_cors(headers)
        with open(gw.config_path) as f:
            text = f.read()
        self.assertIn(APP, text)
        with open(gw.config_path, "w") as f:
            f.write(text.replace(APP, "https://new.example.com"))
        self.assertTrue(gw.parts.runtime.reload())
        _, headers, _ = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin=APP))
        self.assert_no_cors(headers)
        status, _, _ = await get_json(gw.url + "/v1/models", method="OPTIONS", headers=preflight(APP, "GET"))
        self.assertEqual(status, 403)
        _, headers, _ = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin="https://new.example.com"))
        self.assert_cors(headers, "https://new.example.com")
        with open(gw.config_path, "w") as f:
            f.write(text.replace(APP, "https://new.example.com/"))
        self.assertFalse(gw.parts.runtime.reload())
        _, headers, _ = await get_json(gw.url + "/v1/models", headers=dict(self.auth, Origin="https://new.example.com"))
        self.assert_cors(headers, "https://new.example.com")


class DebugPortTests(Backed):
    async def test_debug_port_shares_the_implementation(self):
        """The debug port's loopback rule gets the same preflight (route methods, asked headers) and answer headers."""
        gw = self.start()
        origin = "http://localhost:5173"
        status, headers, _ = await get_json(gw.debug_url + "/v1/sessions/abc", method="OPTIONS", headers=preflight(origin, "PATCH", "Content-Type, X-Stainless-OS"))
        self.assertEqual(status, 204)
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [origin])
        self.assertEqual(headers.getRawHeaders("access-control-allow-methods"), ["DELETE, GET, PATCH, OPTIONS"])
        self.assertEqual(headers.getRawHeaders("access-control-allow-headers"), ["content-type, x-stainless-os"])
        status, headers, _ = await get_json(gw.debug_url + "/v1/chat/completions", method="POST", headers={"Origin": origin}, body=CHAT)
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [origin])
        self.assertIn("x-request-id", headers.getRawHeaders("access-control-expose-headers")[0].lower())
        status, headers, body = await get_json(gw.debug_url + "/v1/models", method="OPTIONS", headers=preflight(APP, "GET"))
        self.assertEqual((status, body["error"]["code"]), (403, "ORIGIN_REJECTED"))
        self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))
        # The secure port's list does not open the debug port to other origins.
        gw = self.start(ORIGINS)
        status, headers, _ = await get_json(gw.debug_url + "/v1/models", headers={"Origin": APP})
        self.assertEqual(status, 403)
        self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))


class CookieRouteTests(TestCase):
    timeout = 90

    async def test_cross_origin_with_the_page_cookie_still_refused(self):
        """
        Refresh and logout from a listed origin with the page's refresh
        cookie are refused as before (CSRF_REJECTED) and carry no CORS
        header; their preflight gets none either; the page's own origin
        still refreshes.
        """
        flow = Flow(self)
        flow.start(extra=f'server: {{cors_origins: ["{APP}", "{flow.origin.replace("127.0.0.1", "localhost")}"]}}')
        _, cookie = await flow.sign_in()
        for origin in (APP, flow.origin.replace("127.0.0.1", "localhost")):
            for method in (flow.refresh, flow.logout):
                reply = await method(cookie, headers=dict(XRW, Origin=origin))
                self.assertEqual((reply.code, reply.json()["error"]["code"]), (403, "CSRF_REJECTED"), origin)
                self.assertIsNone(reply.header(b"access-control-allow-origin"))
            status, headers, body = await get_json(flow.gw.url + "/auth/refresh", method="OPTIONS", headers=preflight(origin, "POST", "x-requested-with"))
            self.assertEqual((status, body["error"]["code"]), (405, "METHOD_NOT_ALLOWED"))
            self.assertIsNone(headers.getRawHeaders("access-control-allow-origin"))
            self.assertIsNone(headers.getRawHeaders("access-control-allow-headers"))
        ok = await flow.refresh(cookie, headers=dict(XRW, Origin=flow.origin))
        self.assertEqual(ok.code, 200)
        self.assertIsNone(ok.header(b"access-control-allow-origin"))


class Page(Resource):
    """The page of an app on another origin: nothing but a document to run fetch from."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return b"<!doctype html><title>another app</title><p>an app on another origin</p>"

FETCH_CHAT = """
async ([base, token, stream]) => {
  try {
    const r = await fetch(base + "/v1/chat/completions", {
      method: "POST",
      headers: {Authorization: "Bearer " + token, "Content-Type": "application/json", "x-stainless-os": "Unknown", "x-stainless-retry-count": "0"},
      body: JSON.stringify({model: "qwen3:32b", messages: [{role: "user", content: "hi"}], stream}),
    });
    const text = await r.text();
    return {status: r.status, text, requestId: r.headers.get("x-request-id"), remaining: r.headers.get("x-ratelimit-remaining-requests")};
  } catch (e) {
    return {error: String(e)};
  }
}
"""


class BrowserTests(Backed):
    timeout = 180

    def page_site(self):
        """A static page on its own loopback port: a second origin."""
        port = reactor.listenTCP(0, Site(Page()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_page_on_another_origin(self):
        """
        Chromium on a listed origin reads the JSON answer and a stream of a
        POST with the openai SDK's headers (through the preflight), and the
        exposed headers; the same page on an origin not listed fails to
        fetch, and its POST never reaches the model.
        """
        page_port = self.page_site()
        allowed = f"http://127.0.0.1:{page_port}"
        gw = self.start(f'server: {{cors_origins: ["{allowed}"]}}')
        tok = token(scope="chat:read chat:write")

        def script(browser):
            results = {}
            for name, origin in (("allowed", allowed), ("refused", f"http://localhost:{page_port}")):
                page = browser.new_page()
                page.goto(origin + "/")
                results[name] = page.evaluate(FETCH_CHAT, [gw.url, tok, False])
                if name == "allowed":
                    results["stream"] = page.evaluate(FETCH_CHAT, [gw.url, tok, True])
            return results

        results = await run_in_browser(script)
        allowed_reply = results["allowed"]
        self.assertEqual(allowed_reply.get("status"), 200, allowed_reply)
        body = json.loads(allowed_reply["text"])
        self.assertEqual(body["choices"][0]["message"]["content"], self.fake.reply_text)
        self.assertRegex(allowed_reply["requestId"], "^[0-9a-f]{32}$")
        self.assertIsNotNone(allowed_reply["remaining"])
        self.assertEqual(results["stream"]["status"], 200, results["stream"])
        self.assertIn("data: [DONE]", results["stream"]["text"])
        self.assertIn("Failed to fetch", results["refused"].get("error", ""), results["refused"])
        # Two calls from the listed origin; the refused preflight kept the third from being sent.
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 2)
