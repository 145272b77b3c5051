"""
Ollama on another machine (issue 23, the backend's side): the fake Ollama
behind real TLS (Twisted's, with certificates of a private CA made by the
test), C{backend.tls} (a private CA, a server name, mutual TLS),
C{backend.headers} (a shared secret the gateway sends, and nothing of the
client's), the failures each a 502 whose log line says why, the secrets
never shown, and a reload that re-reads the files.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile

import httpx
import openai
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot.backend.ollama import BackendUnreachable
from clawdbot.config import BackendTLSConfig, ConfigError, parse_config
from testing.certs import Authority
from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, bearer, clawdbot_argv, get_json, merge_yaml, process_env, serve, stream_call, token, until, write_config

ALL = "chat:read chat:write admin"
HI = [{"role": "user", "content": "hi"}]
SHARED_SECRET = "s3cret-shared-with-the-ollama-proxy-0123456789"
OWN_SECRET = "an0ther-secret-for-one-backend-only-9876543210"
CERTIFICATE_REFUSED = "the model backend's TLS certificate was not accepted"


def server_tls(leaf, client_ca=None):
    """Twisted's server-side TLS with C{leaf}'s certificate; with C{client_ca}, a client certificate it signed is required."""
    private = PrivateCertificate.loadPEM(leaf.key_pem + leaf.cert_pem)
    verify = {}
    if client_ca is not None:
        verify = dict(verify=True, caCerts=[Certificate.loadPEM(client_ca.cert_pem).original], requireCertificate=True)
    return CertificateOptions(privateKey=private.privateKey.original, certificate=private.original, **verify)


class TLSBackend(TestCase):
    """A gateway in front of a fake Ollama that speaks HTTPS."""

    timeout = 60

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="clawdbot-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = Authority("Clawdbot Test CA")
        self.ca_file = self.ca.write(self.dir)
        self.auth = bearer(token(scope=ALL))
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def backend(self, leaf=None, client_ca=None):
        """A fake Ollama over TLS with C{leaf} (default: our CA's certificate for 127.0.0.1)."""
        fake = FakeOllama()
        fake.listen(reactor, tls=server_tls(leaf or self.ca.issue("ollama", hosts=("localhost", "127.0.0.1")), client_ca))
        self.addCleanup(fake.stop)
        return fake

    def start(self, fake, tls=None, extra="", environ=None):
        """A gateway whose backend is C{fake}, with C{backend.tls} C{tls} (a dict)."""
        self.fake = fake
        backend = {"url": fake.url}
        if tls is not None:
            backend["tls"] = tls
        self.gw = serve(self, extra=merge_yaml(json.dumps({"backend": backend}), extra), environ=environ)
        return self.gw

    def log_lines(self):
        return [formatEvent(e) for e in self.events]

    def tls_lines(self):
        return [line for line in self.log_lines() if "failed TLS" in line]

    async def chat(self, stream=False, headers=None):
        body = {"model": "qwen3:32b", "messages": HI}
        if stream:
            body["stream"] = True
        return await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=dict(self.auth, **(headers or {})), body=body)

    def sdk(self):
        http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
        self.addCleanup(http.close)
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=token(scope=ALL), max_retries=0, http_client=http)

    async def assert_refused(self, reason, details=CERTIFICATE_REFUSED):
        """A chat call is a 502 UPSTREAM_UNAVAILABLE with C{details}; one log line names the backend and C{reason}."""
        status, _, body = await self.chat()
        self.assertEqual(status, 502, body)
        self.assertEqual(body["error"]["code"], "UPSTREAM_UNAVAILABLE")
        self.assertEqual(body["error"]["details"], details)
        self.assertNotIn("OpenSSL", json.dumps(body))
        self.assertNotIn("127.0.0.1", json.dumps(body))
        lines = self.tls_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"Backend {self.fake.url} failed TLS: ", lines[0])
        self.assertIn(reason, lines[0])
        # (No request reached Ollama.)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        return lines[0]


class VerifiedTests(TLSBackend):
    async def test_verified_call(self):
        """Against a private CA: a call, a stream and the openai SDK all work, and no TLS failure is logged."""
        self.start(self.backend(), tls={"ca_file": self.ca_file})
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)
        self.assertTrue(body["choices"][0]["message"]["content"])
        streamed = stream_call(self.gw.url + "/v1/chat/completions", {"model": "qwen3:32b", "messages": HI, "stream": True}, self.auth)
        status, raw = await streamed.done
        self.assertEqual(status, 200)
        self.assertIn(b"data: [DONE]", raw)
        reply = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=HI))
        self.assertTrue(reply.choices[0].message.content)

        def stream():
            return [c for c in self.sdk().chat.completions.create(model="qwen3:32b", messages=HI, stream=True)]

        chunks = await deferToThread(stream)
        self.assertTrue("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 4)
        self.assertEqual(self.tls_lines(), [])

    async def test_server_name(self):
        """A certificate for another name than the URL's host is accepted when backend.tls.server_name is that name."""
        self.start(self.backend(self.ca.issue("ollama", hosts=("ollama.internal",))), tls={"ca_file": self.ca_file, "server_name": "ollama.internal"})
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)

    async def test_ca_bundle(self):
        """ca_file may be a bundle: the backend's CA among others."""
        other = Authority("Some Other CA")
        bundle = os.path.join(self.dir, "bundle.pem")
        with open(bundle, "wb") as f:
            f.write(other.cert_pem + self.ca.cert_pem)
        self.start(self.backend(), tls={"ca_file": bundle})
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)


class RefusedTests(TLSBackend):
    async def test_unknown_ca(self):
        """A certificate from a CA that ca_file does not hold: 502, the log says the CA is unknown."""
        other = Authority("Other CA")
        self.start(self.backend(other.issue("ollama")), tls={"ca_file": self.ca_file})
        await self.assert_refused("not signed by a trusted CA (unknown or untrusted CA")

    async def test_private_ca_without_ca_file(self):
        """Without ca_file the system's trust applies: a private CA's certificate is refused, never accepted unverified."""
        self.start(self.backend())
        await self.assert_refused("not signed by a trusted CA")

    async def test_wrong_host_name(self):
        """A certificate for another host name: 502, the log names the host name it was checked for."""
        self.start(self.backend(self.ca.issue("ollama", hosts=("ollama.internal",))), tls={"ca_file": self.ca_file})
        await self.assert_refused("its certificate is not for the host name 127.0.0.1")

    async def test_expired(self):
        """An expired certificate: 502, the log says it expired."""
        self.start(self.backend(self.ca.issue("ollama", expired=True)), tls={"ca_file": self.ca_file})
        await self.assert_refused("its certificate has expired")

    async def test_streamed_call_refused(self):
        """A stream asked of a backend whose certificate is refused is a whole 502 (nothing was streamed yet)."""
        self.start(self.backend(self.ca.issue("ollama", expired=True)), tls={"ca_file": self.ca_file})
        status, _, body = await self.chat(stream=True)
        self.assertEqual((status, body["error"]["code"], body["error"]["details"]), (502, "UPSTREAM_UNAVAILABLE", CERTIFICATE_REFUSED))

    async def test_sdk_sees_the_error(self):
        """The openai SDK gets the 502 as an APIStatusError with the error shape."""
        self.start(self.backend(self.ca.issue("ollama", expired=True)), tls={"ca_file": self.ca_file})
        error = None
        try:
            await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=HI))
        except openai.APIStatusError as e:
            error = e
        self.assertEqual((error.status_code, error.body["code"]), (502, "UPSTREAM_UNAVAILABLE"))

    async def test_failover_to_a_verified_backend(self):
        """With several backends, one whose certificate is refused is routed around: the call is answered by the other."""
        bad = self.backend(self.ca.issue("ollama", expired=True))
        good = self.backend()
        self.gw = serve(self, extra=json.dumps({"backend": {"urls": [bad.url, good.url], "tls": {"ca_file": self.ca_file}, "health_interval": "1h"}}))
        self.fake = bad
        for _ in range(3):
            status, _, body = await self.chat()
            self.assertEqual(status, 200, body)
        self.assertEqual(len(good.requests_to("/api/chat")), 3)
        lines = self.tls_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"Backend {bad.url} failed TLS: its certificate has expired; routing around it", lines[0])


class Silent(Protocol):
    """Accepts the connection and never says a word (a TLS handshake that hangs)."""

    def dataReceived(self, data):
        self.factory.received.append(data)


async def silent_server(testcase):
    """A TCP server on loopback that accepts and never answers: its C{https://} URL, and what it received."""
    factory = Factory.forProtocol(Silent)
    factory.received = []
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    testcase.addCleanup(port.stopListening)
    return f"https://127.0.0.1:{port.getHost().port}", factory.received


class HandshakeTimeoutTests(TLSBackend):
    """A backend that accepts the connection and never finishes the TLS handshake: bounded by backend.connect_timeout."""

    HANG = "the TLS handshake timed out (no answer within backend.connect_timeout, 0.5s"

    async def test_alone(self):
        """One such backend: 504 within the connect timeout with a curated detail; one log line says why; a health check marks it down."""
        url, received = await silent_server(self)
        timing = {"connect_timeout": "500ms", "first_byte_timeout": "20s", "health_interval": "1h"}
        self.gw = serve(self, extra=json.dumps({"backend": dict(timing, url=url, tls={"ca_file": self.ca_file})}))
        for stream in (False, True):
            status, _, body = await self.chat(stream=stream)
            self.assertEqual((status, body["error"]["code"], body["error"]["details"]), (504, "UPSTREAM_TIMEOUT", "the TLS handshake with the model backend timed out"))
        self.assertTrue(received, "no ClientHello reached the backend")
        lines = self.tls_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"Backend {url} failed TLS: {self.HANG}", lines[0])

        # (A health check after the down period: it too is bounded, and marks the backend down.)
        self.gw.parts.ollama.upstreams(self.gw.parts.runtime.config)[0].down_until = 0.0
        self.assertEqual(await self.gw.parts.ollama.check(), "not reachable (timed out)")
        self.assertEqual([b["up"] for b in self.gw.parts.ollama.status(self.gw.parts.runtime.config)], [False])

    async def test_routed_around(self):
        """Beside a good backend: every call is answered by the good one, and the hanging one is down on /readyz."""
        url, _ = await silent_server(self)
        good = self.backend()
        backend = {"urls": [url, good.url], "tls": {"ca_file": self.ca_file}, "connect_timeout": "500ms", "first_byte_timeout": "20s", "health_interval": "1h"}
        self.gw = serve(self, extra=json.dumps({"backend": backend}))
        for stream in (False, True, False):
            status, _, body = await self.chat(stream=stream)
            self.assertEqual(status, 200, body)
        self.assertEqual(len(good.requests_to("/api/chat")), 3)
        lines = self.tls_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"Backend {url} failed TLS: {self.HANG}", lines[0])
        self.assertIn("routing around it", lines[0])
        status, _, page = await get_json(self.gw.url + "/readyz")
        self.assertEqual([b["up"] for b in page["checks"]["backends"]], [False, True])

    async def test_health_check_that_times_out_marks_down(self):
        """A health check that gets no answer in time (a plain backend that never answers) marks its backend down, as an unreachable one."""
        silent = FakeOllama()
        silent.listen(reactor)
        self.addCleanup(silent.stop)
        silent.hold(paths=["/api/version"])
        self.gw = serve(self, extra=json.dumps({"backend": {"url": silent.url, "connect_timeout": "300ms", "health_interval": "1h"}}))
        ollama = self.gw.parts.ollama
        self.assertEqual(await ollama.check(), "not reachable (timed out)")
        self.assertEqual([b["up"] for b in ollama.status(self.gw.parts.runtime.config)], [False])
        silent.release()


class NamesTests(TLSBackend):
    """Certificates whose names service_identity cannot check at all, and TLS settings that cannot be set up."""

    async def assert_names_refused(self, leaf, reason, **tls):
        """A backend with C{leaf}: 502 with one curated log line saying C{reason}, and no traceback logged."""
        self.start(self.backend(leaf), tls=dict(tls, ca_file=self.ca_file))
        line = await self.assert_refused(reason)
        failures = [formatEvent(e) for e in self.events if "log_failure" in e]
        self.assertEqual(failures, [])
        return line

    async def test_certificate_without_subject_alt_name(self):
        """A certificate with its name in the CN alone (no subjectAltName) is refused in plain words."""
        await self.assert_names_refused(self.ca.issue("127.0.0.1", hosts=()), "its certificate has no DNS name or IP address in its subjectAltName (names in the CN alone are not accepted)")

    async def test_certificate_with_an_email_address_alone(self):
        """A certificate whose subjectAltName has an email address alone: refused, and not said to have no subjectAltName."""
        line = await self.assert_names_refused(self.ca.issue("127.0.0.1", hosts=("email:ops@corp.example",)), "its certificate has no DNS name or IP address in its subjectAltName")
        self.assertNotIn("has no subjectAltName", line)

    async def test_wildcard_over_one_label(self):
        """A wildcard certificate for *.internal (too few labels to be one) is refused in plain words."""
        leaf = self.ca.issue("ollama", hosts=("*.internal",))
        await self.assert_names_refused(leaf, "its certificate has a wildcard name that cannot be used", server_name="ollama.internal")

    async def test_settings_that_cannot_be_set_up(self):
        """TLS settings the connection cannot be made with (a name past the config's checks) are a curated 502 for the call, never a 500."""
        fake = self.backend()
        self.start(fake, tls={"ca_file": self.ca_file})
        config = self.gw.parts.runtime.config
        broken = dataclasses.replace(config, backend=dataclasses.replace(config.backend, tls=BackendTLSConfig(server_name="\u2603.example")))
        deadline = reactor.seconds() + 5
        try:
            await self.gw.parts.ollama._send_one(broken, fake.url, b"GET", "/api/version", None, deadline)
        except BackendUnreachable as e:
            caught = e
        else:
            self.fail("the call was made")
        self.assertEqual((caught.error.status, caught.error.details), (502, "the gateway cannot set up TLS to the model backend"))
        self.assertIn("cannot be used for TLS", caught.tls_reason)
        self.assertEqual(fake.requests, [])


class MutualTests(TLSBackend):
    def setUp(self):
        super().setUp()
        self.client_cert, self.client_key = self.ca.issue("clawdbot", hosts=(), client=True).write(self.dir, "client")

    async def test_with_the_client_certificate(self):
        """A backend that requires a client certificate answers the gateway that presents one."""
        self.start(self.backend(client_ca=self.ca), tls={"ca_file": self.ca_file, "client_cert": self.client_cert, "client_key": self.client_key})
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)
        status, _, body = await self.chat(stream=True)
        self.assertEqual(status, 200, body)

    async def test_combined_file(self):
        """client_cert and client_key may name the same file (the key and the certificate in one PEM)."""
        combined = self.ca.issue("clawdbot", hosts=(), client=True).write_combined(self.dir, "combined")
        self.start(self.backend(client_ca=self.ca), tls={"ca_file": self.ca_file, "client_cert": combined, "client_key": combined})
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)

    async def test_without_a_client_certificate(self):
        """Without one: 502, the log says the backend requires a client certificate."""
        self.start(self.backend(client_ca=self.ca), tls={"ca_file": self.ca_file})
        await self.assert_refused("it requires a client certificate (mutual TLS)", details="the model backend refused the gateway's TLS client authentication")

    async def test_client_certificate_of_another_ca(self):
        """A client certificate the backend does not trust: 502, the log says the backend refused it."""
        cert, key = Authority("Other CA").issue("clawdbot", hosts=(), client=True).write(self.dir, "stranger")
        self.start(self.backend(client_ca=self.ca), tls={"ca_file": self.ca_file, "client_cert": cert, "client_key": key})
        await self.assert_refused("it refused the gateway's client certificate", details="the model backend refused the gateway's TLS client authentication")


class HeaderTests(TLSBackend):
    async def test_headers_reach_the_backend_and_the_client_token_does_not(self):
        """
        backend.headers (from the environment) go with every backend call
        (chat, stream, embeddings, tags, the native API, health checks);
        the client's Authorization and cookies never do.
        """
        self.start(self.backend(), tls={"ca_file": self.ca_file}, extra='backend: {headers: {X-Ollama-Key: "${OLLAMA_KEY}", User-Agent: clawdbot-test}}', environ={"OLLAMA_KEY": SHARED_SECRET})
        cookie = {"Cookie": "clawdbot_session=user-cookie-value; other=x"}
        self.assertEqual((await self.chat(headers=cookie))[0], 200)
        self.assertEqual((await self.chat(stream=True, headers=cookie))[0], 200)
        url = self.gw.url
        status, _, _ = await get_json(url + "/v1/embeddings", method="POST", headers=dict(self.auth, **cookie), body={"model": "qwen3:32b", "input": "hi"})
        self.assertEqual(status, 200)
        status, _, _ = await get_json(url + "/v1/models", headers=dict(self.auth, **cookie))
        self.assertEqual(status, 200)
        status, _, _ = await get_json(url + "/ollama/api/show", method="POST", headers=dict(self.auth, **cookie), body={"model": "qwen3:32b"})
        self.assertEqual(status, 200)
        self.assertIsNone(await self.gw.parts.ollama.check())
        paths = {r.path for r in self.fake.requests}
        self.assertTrue({"/api/chat", "/api/embed", "/api/tags", "/api/show", "/api/version"} <= paths, paths)
        user_token = self.auth["Authorization"].split()[1]
        for record in self.fake.requests:
            self.assertEqual(record.headers.get("x-ollama-key"), SHARED_SECRET, record.path)
            self.assertEqual(record.headers.get("user-agent"), "clawdbot-test", record.path)
            self.assertNotIn("authorization", record.headers, record.path)
            self.assertNotIn("cookie", record.headers, record.path)
            self.assertNotIn(user_token, json.dumps(record.headers))

    async def test_per_backend_headers(self):
        """A backend written as {url, headers, tls} gets its own headers over backend.headers, with its own TLS settings."""
        one = self.backend()
        other_ca = Authority("Second CA")
        two = self.backend(other_ca.issue("ollama"))
        second_ca = other_ca.write(self.dir)
        backend = {
            "urls": [one.url, {"url": two.url, "headers": {"X-Ollama-Key": OWN_SECRET, "X-Extra": "two"}, "tls": {"ca_file": second_ca}}],
            "headers": {"x-ollama-key": SHARED_SECRET},
            "tls": {"ca_file": self.ca_file},
            "health_interval": "1h",
        }
        self.gw = serve(self, extra=json.dumps({"backend": backend}))
        self.fake = one
        for _ in range(4):
            self.assertEqual((await self.chat())[0], 200)
        self.assertIsNone(await self.gw.parts.ollama.check())
        self.assertTrue(one.requests_to("/api/chat") and two.requests_to("/api/chat"))
        for record in one.requests:
            self.assertEqual(record.headers.get("x-ollama-key"), SHARED_SECRET)
            self.assertNotIn("x-extra", record.headers)
        for record in two.requests:
            self.assertEqual(record.headers.get("x-ollama-key"), OWN_SECRET)
            self.assertEqual(record.headers.get("x-extra"), "two")

    async def test_secrets_never_shown(self):
        """The header values appear in no log line, no error body and not on the admin status page; check-config masks them."""
        bad = self.backend(self.ca.issue("ollama", expired=True))
        good = self.backend()
        backend = {
            "urls": [bad.url, {"url": good.url, "headers": {"X-Own": "${OWN}"}}],
            "headers": {"X-Ollama-Key": "${OLLAMA_KEY}"},
            "tls": {"ca_file": self.ca_file},
            "health_interval": "1h",
        }
        access_log = os.path.join(self.dir, "access.log")
        extra = merge_yaml(json.dumps({"backend": backend}), json.dumps({"access_log": {"path": access_log}, "log": {"level": "debug"}}))
        environ = {"OLLAMA_KEY": SHARED_SECRET, "OWN": OWN_SECRET}
        self.gw = serve(self, extra=extra, environ=environ)
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)
        status, _, status_page = await get_json(self.gw.url + "/v1/admin/status", headers=self.auth)
        self.assertEqual(status, 200)
        self.assertEqual([b["url"] for b in status_page["backends"]], [bad.url, good.url])
        status, _, body = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"model": 3})
        self.assertEqual(status, 400)
        self.assertTrue(self.gw.parts.runtime.reload())
        self.assertEqual(len(self.tls_lines()), 1)
        with open(access_log, encoding="utf-8") as f:
            seen = "\n".join(self.log_lines()) + json.dumps(status_page) + json.dumps(body) + f.read() + repr(self.events)
        for secret in (SHARED_SECRET, OWN_SECRET):
            self.assertNotIn(secret, seen)

        path = write_config(self, merge_yaml(BASE_CONFIG, extra))
        done = await deferToThread(subprocess.run, clawdbot_argv("check-config", "--config", path), env=process_env(**environ), capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        for secret in (SHARED_SECRET, OWN_SECRET):
            self.assertNotIn(secret, done.stdout + done.stderr)
        self.assertIn("X-Ollama-Key: '********'", done.stdout)
        self.assertIn("X-Own: '********'", done.stdout)
        self.assertIn(f"ca_file: {self.ca_file}", done.stdout)


class ReloadTests(TLSBackend):
    async def test_reload_reads_the_files_again(self):
        """
        A reload re-reads ca_file: a new CA is trusted at once, and a
        connection verified under the old trust is not used after a reload
        that withdraws it.
        """
        fake = self.backend()
        ca_file = os.path.join(self.dir, "trusted.pem")
        with open(ca_file, "wb") as f:
            f.write(Authority("Not The One").cert_pem)
        self.start(fake, tls={"ca_file": ca_file})
        await self.assert_refused("not signed by a trusted CA")

        with open(ca_file, "wb") as f:
            f.write(self.ca.cert_pem)
        self.assertTrue(self.gw.parts.runtime.reload())
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)
        # (The connection is kept for the next call; that call reuses it.)
        opened = fake.connections_opened
        status, _, body = await self.chat()
        self.assertEqual(status, 200, body)
        self.assertEqual(fake.connections_opened, opened)

        with open(ca_file, "wb") as f:
            f.write(Authority("Not The One Either").cert_pem)
        self.assertTrue(self.gw.parts.runtime.reload())
        status, _, body = await self.chat()
        self.assertEqual((status, body["error"]["details"]), (502, CERTIFICATE_REFUSED))
        self.assertEqual(len(fake.requests_to("/api/chat")), 2)
        # The idle connection of the old trust is closed.
        await until(lambda: fake.open_connections == 0, what="the old connection closing")

    async def test_down_is_said_once_an_outage(self):
        """
        A backend whose certificate is refused: one line however many calls
        and health checks find it down again (each after its down period),
        naming no status (a call may get 502 or 504); one line when it
        answers again.
        """
        fake = self.backend()
        ca_file = os.path.join(self.dir, "trusted.pem")
        with open(ca_file, "wb") as f:
            f.write(Authority("Not The One").cert_pem)
        self.start(fake, tls={"ca_file": ca_file})
        line = await self.assert_refused("not signed by a trusted CA")
        self.assertTrue(line.endswith("; model calls fail until it is fixed"), line)
        ollama = self.gw.parts.ollama
        for _ in range(3):
            # (The down period over, as after backend.health_interval.)
            for upstream in ollama.upstreams(self.gw.parts.runtime.config):
                upstream.down_until = 0.0
            self.assertEqual(await ollama.check(), "not reachable")
            status, _, body = await self.chat()
            self.assertEqual(status, 502, body)
        self.assertEqual(len(self.tls_lines()), 1, self.tls_lines())

        with open(ca_file, "wb") as f:
            f.write(self.ca.cert_pem)
        self.assertTrue(self.gw.parts.runtime.reload())
        for _ in range(2):
            status, _, body = await self.chat()
            self.assertEqual(status, 200, body)
        self.assertIsNone(await ollama.check())
        self.assertEqual([text for text in self.log_lines() if "answers again" in text], [f"Backend {fake.url} answers again"])
        self.assertEqual(len(self.tls_lines()), 1, self.tls_lines())

    async def test_call_under_the_older_config_is_not_pooled(self):
        """
        A call still running under the config before a reload that replaced
        its TLS settings uses them on a connection of its own: that
        connection is not kept afterwards, nor a client of the old settings.
        """
        fake = self.backend()
        ca_file = os.path.join(self.dir, "trusted.pem")
        shutil.copy(self.ca_file, ca_file)
        self.start(fake, tls={"ca_file": ca_file})
        self.assertEqual((await self.chat())[0], 200)
        old = self.gw.parts.runtime.config
        with open(ca_file, "wb") as f:
            f.write(Authority("Not The One").cert_pem)
        self.assertTrue(self.gw.parts.runtime.reload())
        ollama = self.gw.parts.ollama
        # (As a request that began before the reload calls.)
        deadline = reactor.seconds() + 10
        response = await ollama._send_one(old, fake.url, b"GET", "/api/version", None, deadline)
        await ollama.collect(response, old, deadline)
        self.assertEqual(response.code, 200)
        current = ollama.backend(self.gw.parts.runtime.config, fake.url).tls
        self.assertEqual([tls for _, tls in ollama._agents if tls is not None and tls != current], [])
        kept = [key for key, idle in ollama.pool._idle.items() if idle and key[3:] != (current.identity,)]
        self.assertEqual(kept, [])
        await until(lambda: fake.open_connections == 0, what="the old settings' connection closing")
        status, _, body = await self.chat()
        self.assertEqual((status, body["error"]["details"]), (502, CERTIFICATE_REFUSED))

    async def test_bad_file_on_reload_keeps_the_running_config(self):
        """A reload whose ca_file no longer parses fails, naming the key; the running trust stays."""
        fake = self.backend()
        ca_file = os.path.join(self.dir, "trusted.pem")
        shutil.copy(self.ca_file, ca_file)
        self.start(fake, tls={"ca_file": ca_file})
        with open(ca_file, "w") as f:
            f.write("not a certificate\n")
        self.assertFalse(self.gw.parts.runtime.reload())
        failed = [e for e in self.events if e.get("log_format", "").startswith("Config reload failed")]
        self.assertEqual(len(failed), 1)
        self.assertIn("backend.tls.ca_file: ", failed[0]["error"])
        self.assertEqual((await self.chat())[0], 200)


class ConfigTests(SynchronousTestCase):
    """What backend.headers, backend.tls and backend.urls objects accept, and how they are refused."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="clawdbot-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = Authority("Clawdbot Test CA")
        self.ca_file = self.ca.write(self.dir)
        self.cert, self.key = self.ca.issue("clawdbot", hosts=(), client=True).write(self.dir, "client")

    def parse(self, backend, environ=None):
        return parse_config(merge_yaml(BASE_CONFIG, json.dumps({"backend": backend})), environ or {})

    def refused(self, backend, path, reason, environ=None):
        with self.assertRaises(ConfigError) as caught:
            self.parse(backend, environ)
        self.assertEqual(caught.exception.path, path)
        self.assertIn(reason, caught.exception.reason)
        return caught.exception

    def test_loads(self):
        """The keys load: files read, per-backend objects beside plain URLs, header values in place."""
        config = self.parse(
            {
                "urls": ["https://a.example", {"url": "https://b.example:8443", "headers": {"X-Key": "${K}"}, "tls": {"server_name": "ollama.internal"}}],
                "headers": {"X-Key": "shared"},
                "tls": {"ca_file": self.ca_file, "client_cert": self.cert, "client_key": self.key},
            },
            {"K": "own"},
        )
        self.assertEqual(config.backend.headers["X-Key"], "shared")
        self.assertEqual(config.backend.urls[0], "https://a.example")
        self.assertEqual(config.backend.urls[1].headers["X-Key"], "own")
        self.assertEqual(config.backend.tls.material.ca, (self.ca.cert_pem,))
        self.assertIsNotNone(config.backend.tls.material.client_key)
        self.assertEqual(config.backend.urls[1].tls.server_name, "ollama.internal")
        self.assertEqual(config.warnings, ())

    def test_files_change_the_fingerprint(self):
        """The same keys over other file contents make other TLS settings (what keys the endpoints and connections)."""
        first = self.parse({"url": "https://a.example", "tls": {"ca_file": self.ca_file}}).backend.tls.material.fingerprint
        self.assertEqual(self.parse({"url": "https://a.example", "tls": {"ca_file": self.ca_file}}).backend.tls.material.fingerprint, first)
        with open(self.ca_file, "wb") as f:
            f.write(Authority("New CA").cert_pem)
        self.assertNotEqual(self.parse({"url": "https://a.example", "tls": {"ca_file": self.ca_file}}).backend.tls.material.fingerprint, first)

    def test_missing_file(self):
        self.refused({"tls": {"ca_file": os.path.join(self.dir, "nope.pem")}}, "backend.tls.ca_file", "cannot read")

    def test_bad_pem(self):
        bad = os.path.join(self.dir, "bad.pem")
        with open(bad, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        error = self.refused({"tls": {"ca_file": bad}}, "backend.tls.ca_file", "is not a PEM certificate file")
        self.assertNotIn("asn1", str(error).lower())
        self.refused({"tls": {"client_cert": bad, "client_key": self.key}}, "backend.tls.client_cert", "is not a PEM certificate file")
        self.refused({"tls": {"client_cert": self.cert, "client_key": self.cert}}, "backend.tls.client_key", "is not a PEM private key")

    def test_cert_and_key_go_together(self):
        self.refused({"tls": {"client_cert": self.cert}}, "backend.tls.client_key", "is required with client_cert")
        self.refused({"tls": {"client_key": self.key}}, "backend.tls.client_cert", "is required with client_key")

    def test_key_of_another_certificate(self):
        _, other_key = self.ca.issue("other", hosts=(), client=True).write(self.dir, "other")
        self.refused({"tls": {"client_cert": self.cert, "client_key": other_key}}, "backend.tls.client_key", "is not the key of the certificate")

    def test_encrypted_key(self):
        from cryptography.hazmat.primitives import serialization

        leaf = self.ca.issue("clawdbot", hosts=(), client=True)
        cert, _ = leaf.write(self.dir, "locked")
        locked = os.path.join(self.dir, "locked.key")
        with open(locked, "wb") as f:
            f.write(leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
        self.refused({"tls": {"client_cert": cert, "client_key": locked}}, "backend.tls.client_key", "is encrypted")

    def test_server_name(self):
        self.refused({"tls": {"server_name": "a b"}}, "backend.tls.server_name", "is not a host name")
        self.refused({"tls": {"server_name": "https://a.example"}}, "backend.tls.server_name", "is not a host name")
        self.assertEqual(self.parse({"tls": {"server_name": "10.0.0.7"}}).backend.tls.server_name, "10.0.0.7")

    def test_per_backend_keys(self):
        self.refused({"urls": [{"headers": {"X": "y"}}]}, "backend.urls[0].url", "is required")
        self.refused({"urls": [3]}, "backend.urls[0]", "expected a string or a mapping")
        self.refused({"urls": [{"url": "http://a.example", "tls": {}}]}, "backend.urls[0].tls", "is for an https:// backend")
        self.refused({"urls": ["https://a.example", {"url": "https://a.example"}]}, "backend.urls[1].url", "names a backend listed already")
        self.refused({"urls": [{"url": "https://a.example", "tls": {"client_cert": self.cert}}]}, "backend.urls[0].tls.client_key", "is required")
        self.refused({"urls": [{"url": "https://a.example", "bogus": 1}]}, "backend.urls[0].bogus", "unknown key")

    def test_headers(self):
        """Names must be HTTP tokens, values what a header can carry; the headers the gateway writes itself are refused; a value never shows in an error."""
        self.refused({"headers": {"X Key": "v"}}, "backend.headers.X Key", "is not an HTTP header name")
        for value in ("line\r\nX-Injected: 1", " padded", "tab\x00"):
            error = self.refused({"headers": {"X-Key": value}}, "backend.headers.X-Key", "is not a value an HTTP header can carry")
            self.assertNotIn(value.strip(), str(error))
        for name in ("Host", "content-length", "Transfer-Encoding", "Connection", "Keep-Alive", "Upgrade", "TE", "Content-Type", "traceparent"):
            self.refused({"headers": {name: "v"}}, f"backend.headers.{name}", "is a header the gateway sets itself")
        self.refused({"urls": [{"url": "http://a.example", "headers": {"Host": "x"}}]}, "backend.urls[0].headers.Host", "is a header the gateway sets itself")
        self.refused({"headers": {"X-Key": "${EMPTY}"}}, "backend.headers.X-Key", "is set but empty", {"EMPTY": ""})
        self.refused({"urls": [{"url": "http://a.example", "headers": {"X-Key": "${EMPTY}"}}]}, "backend.urls[0].headers.X-Key", "is set but empty", {"EMPTY": ""})

    def test_host_names_tls_cannot_use(self):
        """
        server_name and the host of an https:// URL are checked as the TLS
        client encodes them (IDNA 2008): an underscore, a symbol, a bad
        A-label are refused; a name is kept in lower case without its
        trailing dot.  A plain http:// host may have an underscore (a
        docker-compose service name).
        """
        for name in ("_x.internal", "ollama_gpu", "\u2603.example", "xn--zz.example"):
            error = self.refused({"url": "https://a.example", "tls": {"server_name": name}}, "backend.tls.server_name", "is not a host name a certificate can be checked against")
            self.assertNotIn("IDNA", error.reason.upper().replace("IDNA 2008", ""))
        self.assertEqual(self.parse({"url": "https://a.example", "tls": {"server_name": "B\u00fccher.Example."}}).backend.tls.server_name, "b\u00fccher.example")
        self.assertEqual(self.parse({"urls": [{"url": "https://a.example", "tls": {"server_name": "Ollama.Internal."}}]}).backend.urls[0].tls.server_name, "ollama.internal")
        self.refused({"url": "https://ollama_gpu:11434"}, "backend.url", "the host of an https:// backend is not a host name a certificate can be checked against")
        self.refused({"urls": ["http://a.example", "https://b\u00fccher.example"]}, "backend.urls[1]", "write it in its ASCII form (xn--...)")
        self.refused({"urls": [{"url": "https://ollama_gpu"}]}, "backend.urls[0].url", "no underscore")
        self.assertEqual(self.parse({"url": "http://ollama_gpu:11434"}).backend.url, "http://ollama_gpu:11434")
        self.assertEqual(self.parse({"url": "https://xn--bcher-kva.example"}).backend.url, "https://xn--bcher-kva.example")

    def test_hosts_that_can_never_be_verified(self):
        """
        An IPv6 zone id (in server_name, or any backend URL: the gateway
        cannot connect with one either) and a name that only looks like an
        IPv4 address (1.2.3, 0x7f.1: no certificate can match it) are
        refused with a reason; full addresses and plain http:// hosts such
        as 127.1 (only looked up) are kept.
        """
        for name in ("fe80::1%eth0", "::1%lo"):
            self.refused({"url": "https://a.example", "tls": {"server_name": name}}, "backend.tls.server_name", "has an IPv6 zone id")
        for url in ("https://[fe80::1%eth0]:11434", "https://[fe80::1%25eth0]:11434", "http://[fe80::1%25eth0]:11434"):
            self.refused({"url": url}, "backend.url", "has an IPv6 zone id")
            self.refused({"urls": [{"url": url}]}, "backend.urls[0].url", "has an IPv6 zone id")
        for name in ("1.2.3", "0x7f.1", "10.0.0.1.5", "ollama.123"):
            self.refused({"url": "https://a.example", "tls": {"server_name": name}}, "backend.tls.server_name", "looks like an IPv4 address but is not one written in full")
        self.refused({"url": "https://127.1:11434"}, "backend.url", "the host of an https:// backend looks like an IPv4 address")
        self.refused({"urls": ["http://a.example", "https://0x7f.1"]}, "backend.urls[1]", "looks like an IPv4 address")
        self.assertEqual(self.parse({"url": "https://a.example", "tls": {"server_name": "127.0.0.1."}}).backend.tls.server_name, "127.0.0.1")
        self.assertEqual(self.parse({"url": "https://a.example", "tls": {"server_name": "fd00::2"}}).backend.tls.server_name, "fd00::2")
        self.assertEqual(self.parse({"url": "https://[fd00::2]:11434"}).backend.url, "https://[fd00::2]:11434")
        self.assertEqual(self.parse({"url": "https://gpu1.corp.example"}).backend.url, "https://gpu1.corp.example")
        self.assertEqual(self.parse({"url": "http://127.1:11434"}).backend.url, "http://127.1:11434")

    def test_header_values_are_capped(self):
        """A header value over 8 KiB is refused (backend.headers, a backend's own, tracing.headers), the value never in the error."""
        long = "k" * (8 * 1024 + 1)
        for backend, path in (({"headers": {"X-Key": long}}, "backend.headers.X-Key"), ({"urls": [{"url": "https://a.example", "headers": {"X-Key": long}}]}, "backend.urls[0].headers.X-Key")):
            error = self.refused(backend, path, "is longer than 8 KiB")
            self.assertNotIn(long[:100], str(error))
        with self.assertRaises(ConfigError) as caught:
            parse_config(merge_yaml(BASE_CONFIG, json.dumps({"tracing": {"headers": {"Authorization": long}}})), {})
        self.assertEqual(caught.exception.path, "tracing.headers.Authorization")
        self.assertNotIn(long[:100], str(caught.exception))
        self.assertEqual(len(self.parse({"headers": {"X-Key": long[1:]}}).backend.headers["X-Key"]), 8 * 1024)

    def test_headers_in_clear_text(self):
        """backend.headers sent to an http:// backend off this machine are a warning (never naming the values); loopback and https:// backends are not."""
        config = self.parse({"urls": ["http://127.0.0.1:11434", "http://10.0.0.7:11434", {"url": "http://ollama_gpu:11434"}, "https://a.example"], "headers": {"X-Key": SHARED_SECRET}})
        warned = [w for w in config.warnings if "clear text" in w]
        self.assertEqual([w.split(":")[0] for w in warned], ["backend.urls[1]", "backend.urls[2].url"])
        self.assertNotIn(SHARED_SECRET, "".join(config.warnings))
        config = self.parse({"urls": ["http://10.0.0.7:11434", {"url": "http://10.0.0.8:11434", "headers": {"X-Own": OWN_SECRET}}]})
        self.assertEqual([w.split(":")[0] for w in config.warnings if "clear text" in w], ["backend.urls[1].url"])
        self.assertEqual([w for w in self.parse({"url": "http://10.0.0.7:11434"}).warnings if "clear text" in w], [])

    def test_secrets_not_in_repr(self):
        """The header values (and every other secret) are left out of the config's repr."""
        config = self.parse({"urls": [{"url": "https://b.example", "headers": {"X-Own": OWN_SECRET}}], "headers": {"X-Key": SHARED_SECRET}})
        shown = repr(config)
        self.assertIn("https://b.example", shown)
        for secret in (SHARED_SECRET, OWN_SECRET):
            self.assertNotIn(secret, shown)

    def test_files_that_are_not_small_regular_files(self):
        """A FIFO or a device as ca_file is refused at once with a curated reason (check-config in its own process: never blocks on it)."""
        fifo = os.path.join(self.dir, "ca.fifo")
        os.mkfifo(fifo)
        for name in (fifo, "/dev/zero"):
            path = write_config(self, merge_yaml(BASE_CONFIG, json.dumps({"backend": {"url": "https://a.example", "tls": {"ca_file": name}}})))
            try:
                done = subprocess.run(clawdbot_argv("check-config", "--config", path), env=process_env(), capture_output=True, text=True, timeout=30)
            except subprocess.TimeoutExpired:
                self.fail(f"check-config blocked on {name}")
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn(f"backend.tls.ca_file: {name} is not a regular file (a FIFO, a socket or a device)", done.stderr)
            self.assertNotIn("Traceback", done.stderr)

    def test_tls_without_an_https_backend(self):
        """backend.tls with only http:// backends is a warning: it would not be used."""
        config = self.parse({"url": "http://127.0.0.1:11434", "tls": {"ca_file": self.ca_file}})
        self.assertIn("backend.tls is set but no backend is an https:// URL: it is not used", config.warnings)

    def test_printed_config_loads_back(self):
        """check-config's output for these keys is itself a config giving the same backends (the masked values put back)."""
        from clawdbot.config import dump_effective

        value = "masked-value-0123456789-abcdefghijklmnopq"
        config = self.parse({"urls": ["https://a.example", {"url": "https://b.example", "headers": {"X": value}}], "headers": {"Y": value}, "tls": {"ca_file": self.ca_file}})
        printed = dump_effective(config)
        self.assertNotIn(value, printed)
        again = parse_config(printed.replace("'********'", f'"{value}"'), {})
        self.assertEqual(again.backend, config.backend)
