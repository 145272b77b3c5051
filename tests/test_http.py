"""
The HTTP layer on real loopback sockets: error shapes, 404/405/413/500,
health and readiness.
"""

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from clawdbot.http.resource import APIResource
from tests.helpers import bearer, closed_port, get_json, serve, token


def assert_error_shape(testcase, body, code):
    """The body is SPEC.md's error shape with the given code."""
    testcase.assertEqual(set(body), {"error"})
    error = body["error"]
    testcase.assertEqual(error["code"], code)
    testcase.assertIsInstance(error["message"], str)
    testcase.assertIsInstance(error["type"], str)
    testcase.assertLessEqual(set(error), {"message", "type", "code", "param", "details"})


class RawClient(Protocol):
    """Collects everything the server sends until it closes."""

    def __init__(self):
        self.data = b""
        self.closed = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(self.data)


async def raw_exchange(url, payload):
    host, port = url.split("//")[1].split(":")
    proto = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), proto)
    for chunk in payload if isinstance(payload, list) else [payload]:
        proto.transport.write(chunk)
    return await proto.closed


class ErrorShapeTests(TestCase):
    def setUp(self):
        self.gw = serve(self, extra="limits: {max_body: 2KB}")

    async def test_unknown_path_is_json_404_with_or_without_token(self):
        """Unknown paths are a JSON 404, with or without a token, and carry nosniff."""
        for headers in ({}, bearer(token())):
            for path in ("/nope", "/v1/nope", "/v1/me/extra", "/healthz/x", "/ollama/../etc/passwd"):
                status, hdrs, body = await get_json(self.gw.url + path, headers=headers)
                self.assertEqual(status, 404, path)
                assert_error_shape(self, body, "NOT_FOUND")
                self.assertEqual(hdrs.getRawHeaders("x-content-type-options"), ["nosniff"])
                self.assertTrue(hdrs.getRawHeaders("content-type")[0].startswith("application/json"))

    async def test_wrong_method_is_405_with_allow(self):
        """A known path with the wrong method is a JSON 405 naming the allowed methods."""
        status, hdrs, body = await get_json(self.gw.url + "/healthz", method="DELETE")
        self.assertEqual(status, 405)
        assert_error_shape(self, body, "METHOD_NOT_ALLOWED")
        self.assertEqual(hdrs.getRawHeaders("allow"), ["GET"])

    async def test_missing_token_is_401(self):
        """No credentials: 401 AUTH_MISSING_TOKEN with the Bearer challenge."""
        status, hdrs, body = await get_json(self.gw.url + "/v1/me")
        self.assertEqual(status, 401)
        assert_error_shape(self, body, "AUTH_MISSING_TOKEN")
        self.assertEqual(hdrs.getRawHeaders("www-authenticate"), ['Bearer realm="clawdbot"'])

    async def test_health(self):
        """/healthz answers 200 without credentials."""
        status, hdrs, body = await get_json(self.gw.url + "/healthz")
        self.assertEqual((status, body), (200, {"status": "ok"}))
        self.assertEqual(hdrs.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(hdrs.getRawHeaders("server"), ["clawdbot"])

    async def test_body_over_limit_by_content_length(self):
        """A declared body over max_body gets 413 before the body is sent, in the error shape."""
        request = (
            b"POST /v1/me HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
        )
        # The client sends the body anyway; the gateway drops it and closes.
        data = await raw_exchange(self.gw.url, [request, b"x" * 5000])
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertNotIn(b"100 Continue", data)
        self.assertIn(b"X-Content-Type-Options: nosniff", head)
        assert_error_shape(self, json.loads(body), "PAYLOAD_TOO_LARGE")

    async def test_chunked_body_over_limit(self):
        """A chunked body that grows past max_body is cut off with a 413."""
        chunk = b"x" * 1000
        parts = [b"POST /v1/me HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"]
        parts += [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 3
        data = await raw_exchange(self.gw.url, parts)
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data[:100])
        assert_error_shape(self, json.loads(data.partition(b"\r\n\r\n")[2]), "PAYLOAD_TOO_LARGE")

    async def test_body_under_limit_is_processed(self):
        """A body under the limit reaches the route (here: a 401 for no token, not a 413)."""
        status, _, body = await get_json(self.gw.url + "/v1/me", method="GET", body=b"{}")
        self.assertEqual(status, 401)

    async def test_unexpected_error_is_bare_500(self):
        """An unexpected exception becomes a 500 in the error shape with no internals; the traceback is only logged."""

        class Boom(APIResource):
            scopes = {"GET": None}

            async def handle_GET(self, request):
                raise RuntimeError("secret internal detail at 10.1.2.3:5432")

        root = self.gw.service.services[0].factory.resource
        root.putChild(b"boom", Boom(self.gw.parts))
        status, _, body = await get_json(self.gw.url + "/boom")
        self.assertEqual(status, 500)
        assert_error_shape(self, body, "INTERNAL_ERROR")
        self.assertNotIn("10.1.2.3", json.dumps(body))
        self.assertNotIn("RuntimeError", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReadinessTests(TestCase):
    async def test_not_ready_without_backend(self):
        """/readyz is 503 and says Ollama is unreachable when nothing listens at backend.url; the address shows only in the reason, and only in dev mode (tests/test_operations.py ReadyzAddressTests: never in production)."""
        port = closed_port(self)
        gw = serve(self, extra=f'backend: {{url: "http://127.0.0.1:{port}"}}')
        status, _, body = await get_json(gw.url + "/readyz")
        self.assertEqual(status, 503)
        self.assertEqual(body["status"], "not ready")
        self.assertEqual(body["reason"], f"Ollama at http://127.0.0.1:{port}: not reachable")
        self.assertNotIn(str(port), json.dumps(body["checks"]))

    async def test_ready_with_backend(self):
        """/readyz is 200 when Ollama answers /api/version."""

        class Version(Resource):
            isLeaf = True

            def render_GET(self, request):
                return b'{"version":"0.9.0"}'

        api = Resource()
        root = Resource()
        root.putChild(b"api", api)
        api.putChild(b"version", Version())
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gw = serve(self, extra=f'backend: {{url: "http://127.0.0.1:{port.getHost().port}"}}')
        status, _, body = await get_json(gw.url + "/readyz")
        self.assertEqual((status, body["status"]), (200, "ready"))


class DebugListenerTests(TestCase):
    async def test_debug_port_acts_as_dev_principal(self):
        """The debug listener needs no token and answers as the configured dev principal."""
        gw = serve(self, extra='auth: {dev_principal: {sub: devuser, scope: "chat:read history:team-a"}}')
        status, _, body = await get_json(gw.debug_url + "/v1/me")
        self.assertEqual(status, 200)
        self.assertEqual(body["sub"], "devuser")
        self.assertEqual(body["scopes"], ["chat:read", "history:team-a"])

    async def test_debug_cors_only_for_localhost_origins(self):
        """The debug listener allows http://localhost:* origins and no others."""
        gw = serve(self)
        _, hdrs, _ = await get_json(gw.debug_url + "/v1/me", headers={"Origin": "http://localhost:3000"})
        self.assertEqual(hdrs.getRawHeaders("access-control-allow-origin"), ["http://localhost:3000"])
        _, hdrs, _ = await get_json(gw.debug_url + "/v1/me", headers={"Origin": "http://evil.example"})
        self.assertIsNone(hdrs.getRawHeaders("access-control-allow-origin"))
        _, hdrs, _ = await get_json(gw.debug_url + "/v1/me", headers={"Origin": "http://localhost.evil.example"})
        self.assertIsNone(hdrs.getRawHeaders("access-control-allow-origin"))
        status, hdrs, _ = await get_json(gw.debug_url + "/v1/me", method="OPTIONS", headers={"Origin": "http://127.0.0.1:5173"})
        self.assertEqual(status, 204)
        self.assertEqual(hdrs.getRawHeaders("access-control-allow-origin"), ["http://127.0.0.1:5173"])

    async def test_secure_port_has_no_cors_and_ignores_forwarded_headers(self):
        """The secure port never trusts the peer address or X-Forwarded-* for authentication."""
        gw = serve(self)
        status, hdrs, _ = await get_json(
            gw.url + "/v1/me", headers={"Origin": "http://localhost:3000", "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}
        )
        self.assertEqual(status, 401)
        self.assertIsNone(hdrs.getRawHeaders("access-control-allow-origin"))
