"""
The gateway's own TLS listener (issue 23): C{server.listen:
"ssl:PORT:privateKey=KEY:certKey=CERT"} with certificates from a private
test CA (L{testing.certs}), spoken to by the official openai SDK, Python's
C{ssl} module and C{http.client}; a renewed certificate picked up on a
real SIGHUP while a stream stays open; bad files refused at start and at
reload with a curated reason.
"""

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
import warnings

import httpx
import openai
import twisted.web.http
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot.config import ConfigError, load_config
from clawdbot.http import site
from clawdbot.net import send_now
from clawdbot.server_tls import ReloadableCertificate, parse_tls
from clawdbot.tap import ListenError, Options, makeService
from testing.certs import Authority
from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, ROOT, Backed, Process, clawdbot_argv, merge_yaml, process_env, token, until, write_config

MODEL = "qwen3:32b"
HI = [{"role": "user", "content": "hi"}]


def _replace(path, data, mode):
    """Write C{path} whole in one rename, as certbot swaps its files."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class Certificates:
    """
    A private CA and the gateway's key and certificate at fixed paths (as
    in certbot's C{live/} directory): a renewal writes new contents there.
    """

    def __init__(self, testcase):
        self.dir = tempfile.mkdtemp(prefix="clawdbot-tls-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = Authority("Clawdbot Test CA")
        self.ca_path = self.ca.write(self.dir)
        self.key_path = os.path.join(self.dir, "privkey.pem")
        self.cert_path = os.path.join(self.dir, "fullchain.pem")
        self.current = self.renew()

    def renew(self):
        """A new certificate and key for localhost and 127.0.0.1, written at the fixed paths."""
        issued = self.ca.issue("localhost", hosts=("localhost", "127.0.0.1"))
        _replace(self.key_path, issued.key_pem, 0o600)
        _replace(self.cert_path, issued.cert_pem, 0o644)
        self.current = issued
        return issued

    def listen(self, port=0):
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key_path}:certKey={self.cert_path}"

    def context(self):
        """A client context that trusts the test CA only (and checks the host name)."""
        return ssl.create_default_context(cafile=self.ca_path)


def address(url):
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname, parsed.port


def peer_fingerprint(url, context):
    """The SHA-256 fingerprint (hex) of the certificate a new TLS connection to C{url} gets (blocking)."""
    host, port = address(url)
    with socket.create_connection((host, port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def fingerprint(issued):
    return issued.fingerprint().hex()


def old_protocol_client(certs, maximum):
    """
    A client context that offers TLS 1.0 up to C{maximum}: the system's own
    minimum and security level are lowered, so that a refusal can only be
    the server's.
    """
    context = certs.context()
    with warnings.catch_warnings():
        # (Python deprecates naming TLS 1.0 and 1.1: offering them is the point here.)
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake(url, context, alpn=None):
    """C{(version, cipher, ALPN protocol)} of a TLS handshake with C{url} (blocking)."""
    host, port = address(url)
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection((host, port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            return tls.version(), tls.cipher()[0], tls.selected_alpn_protocol()


def stream_across(url, context, started, api_key):
    """
    A streamed chat call read line by line over one TLS connection (blocking):
    C{started()} once its first chunk is in.

    @return: C{(data lines, fingerprint of the certificate this connection got)}.
    """
    lines = []
    with httpx.Client(verify=context, timeout=60) as client:
        body = {"model": MODEL, "messages": HI, "stream": True}
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}) as response:
            assert response.status_code == 200, response.status_code
            peer = response.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 1:
                        reactor.callFromThread(started)
    return lines, hashlib.sha256(peer).hexdigest()


def assert_complete_stream(testcase, lines, text):
    testcase.assertEqual(lines[-1], "[DONE]")
    chunks = [json.loads(line) for line in lines[:-1]]
    testcase.assertEqual("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), text)
    testcase.assertEqual([c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1], "stop")


class InProcessTests(Backed):
    """A gateway in this process serving TLS itself, in front of the fake Ollama."""

    def start_tls(self, extra=""):
        self.certs = Certificates(self)
        gw = self.start(merge_yaml(f'server: {{listen: "{self.certs.listen()}"}}', extra))
        self.assertTrue(gw.url.startswith("https://127.0.0.1:"), gw.url)
        return gw

    async def test_openai_sdk_chat_and_stream(self):
        """The openai SDK trusting the test CA gets a chat completion and a whole stream over the gateway's TLS."""
        gw = self.start_tls()
        context = self.certs.context()

        def run():
            with httpx.Client(verify=context) as http:
                client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token(), max_retries=0, http_client=http)
                reply = client.chat.completions.create(model=MODEL, messages=HI)
                chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
            return reply, chunks

        reply, chunks = await deferToThread(run)
        self.assertEqual(reply.choices[0].message.content, self.fake.reply_text)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), self.fake.reply_text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

        def untrusted():
            # (httpx's own trust store: the test CA is not in it.)
            with httpx.Client() as http:
                client = openai.OpenAI(base_url=gw.url + "/v1", api_key=token(), max_retries=0, http_client=http)
                client.chat.completions.create(model=MODEL, messages=HI)

        failed = await deferToThread(untrusted).addCallbacks(lambda _: None, lambda f: [f])
        self.assertIsNotNone(failed, "a client that does not trust the test CA got an answer")
        failed[0].trap(openai.APIConnectionError)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 2)

    async def test_keep_alive(self):
        """HTTP/1.1 over the TLS listener keeps the connection: two requests, one after the other, on one TLS connection."""
        gw = self.start_tls()
        host, port = address(gw.url)
        context = self.certs.context()

        def run():
            connection = http.client.HTTPSConnection(host, port, context=context, timeout=10)
            try:
                answers, sockets = [], []
                for path, headers in (("/healthz", {}), ("/v1/models", {"Authorization": f"Bearer {token()}"})):
                    connection.request("GET", path, headers=headers)
                    sockets.append(connection.sock)
                    response = connection.getresponse()
                    answers.append((response.status, response.version, response.will_close, json.loads(response.read())))
                return answers, sockets
            finally:
                connection.close()

        answers, sockets = await deferToThread(run)
        self.assertEqual([(status, version, close) for status, version, close, _ in answers], [(200, 11, False), (200, 11, False)])
        self.assertEqual(answers[1][3]["object"], "list")
        # (http.client opens a new connection when the server closed the last one.)
        self.assertIs(sockets[0], sockets[1])

    async def test_protocols(self):
        """TLS 1.3 and 1.2 are accepted (ECDHE with an AEAD cipher), TLS 1.1 and 1.0 refused by the server; ALPN picks http/1.1, never h2, even with twisted.web's HTTP/2 available."""
        self.patch(twisted.web.http, "H2_ENABLED", True)
        gw = self.start_tls()
        certs = self.certs
        version, _, alpn = await deferToThread(handshake, gw.url, old_protocol_client(certs, ssl.TLSVersion.TLSv1_3), ["h2", "http/1.1"])
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(alpn, "http/1.1")
        version, cipher, _ = await deferToThread(handshake, gw.url, old_protocol_client(certs, ssl.TLSVersion.TLSv1_2))
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher)
        for maximum in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
            failed = await deferToThread(handshake, gw.url, old_protocol_client(certs, maximum)).addCallbacks(lambda _: None, lambda f: [f])
            self.assertIsNotNone(failed, f"a {maximum.name} handshake succeeded")
            failed[0].trap(ssl.SSLError)
            # The server's protocol_version alert, not a client that offered nothing.
            self.assertEqual(failed[0].value.reason, "TLSV1_ALERT_PROTOCOL_VERSION", failed[0].value)

    async def test_response_bytes_go_through_tls(self):
        """The channel's transport is the TLS layer, so send_now hands a response's bytes to it (never to the socket underneath)."""
        gw = self.start_tls()
        seen = []
        original = send_now

        def spy(transport, data):
            seen.append(transport)
            original(transport, data)

        self.patch(site, "send_now", spy)
        host, port = address(gw.url)
        context = self.certs.context()

        def run():
            connection = http.client.HTTPSConnection(host, port, context=context, timeout=10)
            try:
                connection.request("GET", "/healthz")
                return connection.getresponse().read()
            finally:
                connection.close()

        body = await deferToThread(run)
        self.assertEqual(json.loads(body), {"status": "ok"})
        self.assertTrue(seen)
        self.assertTrue(all(ISSLTransport.providedBy(t) and isinstance(t, TLSMemoryBIOProtocol) for t in seen), seen)

    async def test_reload_with_bad_files_keeps_the_certificate(self):
        """A reload whose key no longer matches the certificate fails like any bad reload, naming server.listen, and new connections keep the old certificate."""
        gw = self.start_tls()
        before = fingerprint(self.certs.current)
        other = self.certs.ca.issue("localhost")
        _replace(self.certs.key_path, other.key_pem, 0o600)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertFalse(gw.parts.runtime.reload())
        self.assertEqual(gw.parts.runtime.reloads, {"ok": 0, "error": 1})
        failed = [e for e in events if e.get("log_format", "").startswith("Config reload failed")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(
            failed[0]["error"], f"server.listen: the certificate in {self.certs.cert_path} does not match the private key in {self.certs.key_path}"
        )
        self.assertEqual(await deferToThread(peer_fingerprint, gw.url, self.certs.context()), before)
        # Repaired (the renewal finished): the next reload takes it.
        renewed = self.certs.renew()
        self.assertTrue(gw.parts.runtime.reload())
        self.assertEqual(await deferToThread(peer_fingerprint, gw.url, self.certs.context()), fingerprint(renewed))

    async def test_new_listen_description_takes_a_restart(self):
        """A reload naming other files in server.listen is logged as taking a restart; the listener keeps reading its own paths."""
        gw = self.start_tls()
        before = fingerprint(self.certs.current)
        elsewhere = self.certs.ca.issue("localhost")
        cert, key = elsewhere.write(self.certs.dir, "elsewhere")
        with open(gw.config_path) as f:
            text = f.read()
        with open(gw.config_path, "w") as f:
            f.write(text.replace(self.certs.key_path, key).replace(self.certs.cert_path, cert))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertTrue(gw.parts.runtime.reload())
        self.assertIn("server.listen", [e.get("key") for e in events if "takes effect after a restart" in e.get("log_format", "")])
        self.assertEqual(await deferToThread(peer_fingerprint, gw.url, self.certs.context()), before)

    async def test_files_broken_after_validation_keep_the_certificate(self):
        """Files that break between the config's check and the listener's read (a reload hook) keep the certificate in use, with one error line."""
        gw = self.start_tls()
        before = fingerprint(self.certs.current)
        listener = [s for s in gw.service if getattr(s, "certificate", None) is not None][0]
        with open(self.certs.cert_path, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        listener.reload_certificate()
        errors = [e for e in events if e.get("log_level") is not None and e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["reason"], f"a certificate in {self.certs.cert_path} cannot be parsed")
        self.assertNotIn("log_failure", errors[0])
        self.assertEqual(await deferToThread(peer_fingerprint, gw.url, self.certs.context()), before)

    async def test_closing_does_not_wait_for_the_close_notify(self):
        """
        A connection the gateway closes itself (its request head too slow, a
        kept-alive one idle past the site's timeout) is gone soon after,
        even when the client never answers TLS's close_notify; twisted.web's
        own timeout lines are not logged.
        """
        gw = self.start_tls("limits: {header_timeout: 1s}")
        listener = [s for s in gw.service if getattr(s, "certificate", None) is not None][0]
        # (twisted.web's idle timeout, 60 seconds in the gateway, shortened for the kept-alive case.)
        listener.factory.timeOut = 3
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        host, port = address(gw.url)
        partial = await deferToThread(stalled_client, host, port, self.certs.context(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(partial[0], "closed", partial)
        kept_alive = await deferToThread(stalled_client, host, port, self.certs.context(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(kept_alive[0], "closed", kept_alive)
        self.assertIn(b"HTTP/1.1 200 OK", kept_alive[1])
        lines = [e.get("log_format", "") for e in events]
        self.assertIn("Closed a connection whose request head took over {seconds}s", lines)
        self.assertFalse([line for line in lines if "timing out client" in line.lower()], lines)

    async def test_no_cbc_cipher_over_tls_1_2(self):
        """A TLS 1.2 client offering only CBC suites (ECDHE key exchange, SHA-1 or SHA-2 MACs) is refused: TLS 1.2 is AEAD only."""
        gw = self.start_tls()
        context = old_protocol_client(self.certs, ssl.TLSVersion.TLSv1_2)
        context.set_ciphers("ECDHE+AES:!AESGCM:!AESCCM:@SECLEVEL=0")
        self.assertTrue(context.get_ciphers())
        self.assertFalse([c["name"] for c in context.get_ciphers() if "GCM" in c["name"] and c["protocol"] == "TLSv1.2"])
        failed = await deferToThread(handshake, gw.url, context).addCallbacks(lambda result: result, lambda f: [f])
        self.assertIsInstance(failed, list, f"a CBC suite was accepted: {failed}")
        failed[0].trap(ssl.SSLError)
        self.assertEqual(failed[0].value.reason, "SSLV3_ALERT_HANDSHAKE_FAILURE", failed[0].value)


def stalled_client(host, port, context, sent, limit=30):
    """
    Over TLS, send C{sent} (and read its answer, when it is a whole
    request), then read the TCP connection underneath without ever
    answering a close_notify (blocking): C{("closed", answer)} once the
    server ends the connection, or C{("still open", answer)} after C{limit}
    seconds.
    """
    sock = socket.create_connection((host, port), timeout=limit)
    tls = context.wrap_socket(sock, server_hostname=host)
    tls.sendall(sent)
    answer = b""
    if sent.endswith(b"\r\n\r\n"):
        # A whole request: its answer (a small JSON body) is read first.
        while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):
            answer += tls.recv(65536)
    raw = socket.socket(fileno=os.dup(tls.fileno()))
    raw.settimeout(limit)
    try:
        while raw.recv(65536):
            pass
        return "closed", answer
    except ConnectionResetError:
        # (Dropped rather than closed: the client left the server's close_notify unread.)
        return "closed", answer
    except socket.timeout:
        return "still open", answer
    finally:
        raw.close()
        tls.close()


class RealProcessTests(TestCase):
    """The gateway in its own process (C{clawdbot start}, C{twistd}), a real SIGHUP."""

    timeout = 120

    def setUp(self):
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.certs = Certificates(self)

    def test_sighup_renewal_clawdbot_start(self):
        """C{clawdbot start}: see L{renewal}; its log lines are on standard error."""
        return Deferred.fromCoroutine(self.renewal(clawdbot_argv("start"), Process.stderr))

    def test_sighup_renewal_twistd(self):
        """C{twistd -n clawdbot}: see L{renewal}; its log lines are in twistd's log, on standard output."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return Deferred.fromCoroutine(self.renewal([twistd, "-n", "--pidfile=", "clawdbot"], Process.stdout))

    async def renewal(self, argv, log):
        """
        SIGHUP after a renewal: new connections get the new certificate while a
        stream opened before it completes on the old one; later, a reload with
        a mismatched key keeps the renewed certificate, with one error line.
        """
        path = write_config(self, merge_yaml(BASE_CONFIG, f'backend: {{url: "{self.fake.url}"}}\nserver: {{listen: "{self.certs.listen()}"}}'))
        proc = Process(argv + ["--config", path, "--no-debug-port"])
        self.addCleanup(proc.stop)
        await until(lambda: "Gateway listening on https://" in proc.stdout() or proc.proc.poll() is not None, what="the gateway to listen")
        self.assertIsNone(proc.proc.poll(), proc.stdout() + proc.stderr())
        url = proc.url()
        context = self.certs.context()
        first = fingerprint(self.certs.current)
        self.assertEqual(await deferToThread(peer_fingerprint, url, context), first)

        self.fake.hold(after=2, times=1)
        started = Deferred()
        streamed = deferToThread(stream_across, url, context, lambda: started.called or started.callback(None), token())
        # (A stream that fails before its first chunk ends the wait too, and is awaited for its error.)
        streamed.addBoth(lambda result: (started.called or started.callback(None), result)[1])
        await started
        if streamed.called:
            await streamed
        await until(lambda: self.fake.held, what="the stream to be held")

        renewed = self.certs.renew()
        proc.signal(signal.SIGHUP)
        await until(lambda: "TLS certificate of server.listen reloaded" in log(proc), what="the reload")
        self.assertEqual(await deferToThread(peer_fingerprint, url, context), fingerprint(renewed))
        self.assertNotEqual(fingerprint(renewed), first)

        self.fake.release()
        lines, stream_peer = await streamed
        assert_complete_stream(self, lines, self.fake.reply_text)
        self.assertEqual(stream_peer, first)

        _replace(self.certs.key_path, self.certs.ca.issue("localhost").key_pem, 0o600)
        proc.signal(signal.SIGHUP)
        await until(lambda: "Config reload failed" in log(proc), what="the failed reload")
        failed = [line for line in log(proc).splitlines() if "Config reload failed" in line]
        self.assertEqual(len(failed), 1)
        self.assertIn(f"server.listen: the certificate in {self.certs.cert_path} does not match the private key in {self.certs.key_path}", failed[0])
        self.assertNotIn("Traceback", proc.stdout() + proc.stderr())
        self.assertEqual(await deferToThread(peer_fingerprint, url, context), fingerprint(renewed))
        self.assertIsNone(proc.proc.poll())


class StartTests(SynchronousTestCase):
    """Files that cannot be used stop start-up: one line, no traceback."""

    def setUp(self):
        self.certs = Certificates(self)

    def config(self, listen, extra=""):
        return write_config(self, merge_yaml(BASE_CONFIG, f'server: {{listen: "{listen}"}}\n{extra}'))

    def test_bad_files_at_start(self):
        """clawdbot start on a key that is not the certificate's: one line naming server.listen and the files, exit status 2 (a config error)."""
        self.certs.renew()
        _replace(self.certs.key_path, self.certs.ca.issue("localhost").key_pem, 0o600)
        path = self.config(self.certs.listen())
        result = subprocess.run(clawdbot_argv("start", "--config", path, "--no-debug-port"), capture_output=True, text=True, timeout=60, env=process_env(), cwd=ROOT)
        self.assertEqual(result.returncode, 2, result.stderr[-500:])
        self.assertEqual(
            result.stderr,
            f"clawdbot: config error in {path}: server.listen: the certificate in {self.certs.cert_path} does not match the private key in {self.certs.key_path}\n",
        )
        self.assertEqual(result.stdout, "")

    def test_reasons(self):
        """Each way the files can be wrong has its own curated reason under server.listen."""
        certs = self.certs
        d = certs.dir
        garbage = os.path.join(d, "garbage.pem")
        with open(garbage, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        encrypted = os.path.join(d, "encrypted.key")
        from cryptography.hazmat.primitives import serialization

        with open(encrypted, "wb") as f:
            f.write(
                certs.current.key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"passphrase")
                )
            )
        missing = os.path.join(d, "missing.pem")
        cases = {
            f"ssl:0:privateKey={missing}:certKey={certs.cert_path}": f"the private key file {missing} does not exist",
            f"ssl:0:privateKey={certs.key_path}:certKey={missing}": f"the certificate file {missing} does not exist",
            f"ssl:0:privateKey={d}:certKey={certs.cert_path}": f"the private key file {d} is a directory",
            f"ssl:0:privateKey={certs.cert_path}:certKey={certs.cert_path}": f"{certs.cert_path} holds no PEM private key",
            f"ssl:0:privateKey={certs.key_path}:certKey={certs.key_path}": f"{certs.key_path} holds no PEM certificate",
            f"ssl:0:privateKey={certs.key_path}:certKey={garbage}": f"a certificate in {garbage} cannot be parsed",
            f"ssl:0:privateKey={encrypted}:certKey={certs.cert_path}": f"the private key in {encrypted} is encrypted; the gateway needs it unencrypted (readable by its user only)",
            f"ssl:0:privateKey={certs.key_path}:certKey={certs.cert_path}:extraCertChain={missing}": f"the certificate chain file {missing} does not exist",
            "ssl:0": "needs privateKey=PATH (and certKey=PATH unless the key file holds the certificate too)",
            f"ssl:0:privateKey={certs.key_path}:sslmethod=TLSv1_METHOD": "sslmethod= is not supported: the gateway offers TLS 1.2 (ECDHE with AES-GCM or ChaCha20 only) and TLS 1.3",
            f"ssl:0:{certs.key_path}": "name every option after the port (privateKey=KEY:certKey=CERT)",
        }
        for listen, reason in cases.items():
            error = self.assertRaises(ConfigError, load_config, self.config(listen), {})
            self.assertEqual((error.path, error.reason), ("server.listen", reason), listen)
        error = self.assertRaises(ConfigError, load_config, self.config("tcp:0:interface=127.0.0.1", f'metrics: {{listen: "{certs.listen()}"}}'), {})
        self.assertEqual(error.path, "metrics.listen")
        self.assertIn("TLS is offered on server.listen only", error.reason)

    def test_files_that_are_not_small_regular_files(self):
        """A file over 1 MiB, a device or a FIFO in server.listen is refused with a curated reason, without reading it whole or blocking on it."""
        certs = self.certs
        huge = os.path.join(certs.dir, "huge.pem")
        with open(huge, "wb") as f:
            f.write(certs.current.cert_pem + b"x" * (2 << 20))
        fifo = os.path.join(certs.dir, "key.fifo")
        os.mkfifo(fifo)
        cases = [
            (f"ssl:0:privateKey={certs.key_path}:certKey={huge}", f"the certificate file {huge} is larger than 1024 KiB"),
            (f"ssl:0:privateKey=/dev/zero:certKey={certs.cert_path}", "the private key file /dev/zero is not a regular file (a FIFO, a socket or a device)"),
            (f"ssl:0:privateKey={fifo}:certKey={certs.cert_path}", f"the private key file {fifo} is not a regular file (a FIFO, a socket or a device)"),
        ]
        for listen, reason in cases:
            error = self.assertRaises(ConfigError, load_config, self.config(listen), {})
            self.assertEqual((error.path, error.reason), ("server.listen", reason), listen)

    def test_key_and_certificate_in_one_file_and_a_chain(self):
        """privateKey alone may hold the key and the certificate; certificates after the first in certKey are its chain; an expired one is a warning."""
        certs = self.certs
        combined = certs.current.write_combined(certs.dir, "combined")
        self.assertEqual(load_config(self.config(f"ssl:0:interface=127.0.0.1:privateKey={combined}"), {}).warnings, ())
        chained = os.path.join(certs.dir, "chained.pem")
        with open(chained, "wb") as f:
            f.write(certs.current.cert_pem + certs.ca.cert_pem)
        listen = parse_tls(f"ssl:0:privateKey={certs.key_path}:certKey={chained}")
        loaded = ReloadableCertificate(listen).current
        self.assertEqual(len(loaded.options.extraCertChain), 1)
        old = certs.ca.issue("localhost", expired=True)
        cert, key = old.write(certs.dir, "old")
        warnings = load_config(self.config(f"ssl:0:privateKey={key}:certKey={cert}"), {}).warnings
        self.assertEqual(len(warnings), 1)
        self.assertTrue(warnings[0].startswith(f"server.listen: the certificate in {cert} expired on "), warnings)

    def test_files_gone_before_listening(self):
        """Files that vanish between the config's check and the listener stop start-up with one ListenError line (exit status 1)."""
        options = Options({})
        options.parseOptions(["--config", self.config(self.certs.listen()), "--no-debug-port"])
        os.unlink(self.certs.key_path)
        service = makeService(options, reactor=reactor, say=lambda line: None)
        error = self.assertRaises(ListenError, service.startService)
        self.assertEqual(str(error), f"cannot listen on {self.certs.listen()}: the private key file {self.certs.key_path} does not exist")
