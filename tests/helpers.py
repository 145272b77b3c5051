"""
Shared test helpers: a gateway on real loopback sockets, config files, and
real processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from clawdbot.tap import Options, makeService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "test-secret-0123456789-abcdefghijklmnop"
ISSUER = "https://sso.example.com"
AUDIENCE = "qwen-web-chat"

BASE_CONFIG = f"""
storage:
  path: ":memory:"
access_log:
  path: "{os.devnull}"
server:
  mode: dev
  drain_timeout: 2s
  listen: "tcp:0:interface=127.0.0.1"
  debug_listen: "tcp:0:interface=127.0.0.1"
auth:
  jwt:
    secret: "{SECRET}"
    issuer: "{ISSUER}"
    audience: "{AUDIENCE}"
    algorithms: ["HS256"]
"""


def closed_port(owner):
    """
    A loopback port where nothing listens, and nothing can, while the test
    runs: a socket is bound to it and never listens, so connections to it
    are refused (a backend that is down) and no one else can bind it.

    @param owner: the test case, or from C{setUpClass} its class; its
        cleanups close the socket.
    @return: the port number.
    """
    return _held_port(owner, reuse=False)


def reserved_port(owner):
    """
    A loopback port kept for a server the test configures with that port
    before starting it (a gateway whose own URL is in its config, nginx):
    a socket bound with C{SO_REUSEADDR} that never listens.  The system
    hands the port to nobody else (port 0 and outgoing connections skip
    it) and a plain C{bind} of it fails, but a listener that sets
    C{SO_REUSEADDR}, as Twisted and nginx do, binds and listens on it.
    Until the server listens, connections to it are refused.

    @param owner: the test case, or from C{setUpClass} its class; its
        cleanups close the socket.
    @return: the port number.
    """
    return _held_port(owner, reuse=True)


def _held_port(owner, reuse):
    sock = socket.socket()
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    (owner.addClassCleanup if isinstance(owner, type) else owner.addCleanup)(sock.close)
    return sock.getsockname()[1]


_RSA_KEYS = {}


def rsa_key(name="k1"):
    """A 2048-bit RSA private key, made once per name for the whole run."""
    if name not in _RSA_KEYS:
        from cryptography.hazmat.primitives.asymmetric import rsa

        _RSA_KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_KEYS[name]


def jwk(name):
    """The public JWK of L{rsa_key}(name), with its name as kid."""
    from jwt.algorithms import RSAAlgorithm

    entry = RSAAlgorithm.to_jwk(rsa_key(name).public_key(), as_dict=True)
    entry.update(kid=name, use="sig", alg="RS256")
    return entry


def write_config(testcase, text):
    """Write C{text} (dedented) to a temporary file; returns its path."""
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="clawdbot-test-")
    with os.fdopen(fd, "w") as f:
        f.write(textwrap.dedent(text))
    testcase.addCleanup(os.unlink, path)
    return path


def merge_yaml(base, extra):
    """C{base} YAML with the mappings of C{extra} merged in."""
    import yaml

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
        return a

    return yaml.safe_dump(merge(yaml.safe_load(base), yaml.safe_load(textwrap.dedent(extra)) or {}))


class Backed(TestCase):
    """
    A test case whose gateway runs in front of a fake Ollama (in this
    process, on loopback), with its access log in a file of its own.
    """

    timeout = 90

    def start(self, extra="", fake=None):
        from testing.fake_ollama import FakeOllama

        self.fake = fake or FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.logfile = os.path.join(tempfile.mkdtemp(), "access.log")
        base = merge_yaml(f'backend: {{url: "{self.fake.url}"}}', f'access_log: {{path: "{self.logfile}"}}')
        self.gw = serve(self, extra=merge_yaml(base, extra))
        return self.gw

    def access_text(self):
        with open(self.logfile, encoding="utf-8") as f:
            return f.read()

    def access_lines(self):
        return [json.loads(line) for line in self.access_text().splitlines() if line.strip()]


class Running:
    """A gateway started in this process on loopback ports."""

    def __init__(self, service, said):
        self.service = service
        self.parts = service.parts
        self.said = said
        urls = [line.split(" listening on ")[1].split()[0] for line in said if " listening on " in line]
        self.url = urls[0]
        self.debug_url = urls[1] if len(urls) > 1 else None


def serve(testcase, extra="", environ=None, no_debug=False, mode=None, base=BASE_CONFIG):
    """Start a gateway on the config C{base} merged with C{extra}."""
    path = write_config(testcase, merge_yaml(base, extra))
    options = Options(environ if environ is not None else {})
    argv = ["--config", path]
    if no_debug:
        argv.append("--no-debug-port")
    if mode:
        argv += ["--mode", mode]
    options.parseOptions(argv)
    said = []
    service = makeService(options, reactor=reactor, say=said.append)
    service.startService()
    testcase.addCleanup(service.stopService)
    running = Running(service, said)
    running.config_path = path
    return running


def token(sub="alice", scope="chat:read chat:write", ttl=3600, secret=SECRET, issuer=ISSUER, audience=AUDIENCE, **extra):
    from clawdbot.auth.tokens import mint

    return mint(secret, issuer, audience, sub, scope, ttl, **extra)


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


async def get_json(url, headers=None, method="GET", body=None, **kwargs):
    """(status, headers, parsed body) of one call."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    response = await treq.request(method, url, headers=hdrs, data=data, persistent=False, **kwargs)
    raw = await response.content()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return response.code, response.headers, parsed


class Streamed:
    """
    A call whose answer is read as it arrives (see L{stream_call}).

    @ivar data: the body bytes received so far.
    @ivar done: a Deferred firing with (status, body bytes) once the whole
        answer is in.
    """

    def __init__(self):
        self.data = b""
        self.done = None
        self._waits = []

    def when_seen(self, marker, count=1):
        """A Deferred firing with the body so far once C{marker} arrived C{count} times."""
        d = Deferred()
        self._waits.append((marker, count, d))
        self._check()
        return d

    def _received(self, data):
        self.data += data
        self._check()

    def _check(self):
        waits, self._waits = self._waits, []
        for marker, count, d in waits:
            if self.data.count(marker) >= count:
                d.callback(self.data)
            else:
                self._waits.append((marker, count, d))

    def _ended(self, result):
        waits, self._waits = self._waits, []
        for marker, count, d in waits:
            d.errback(AssertionError(f"the answer ended before {marker!r} came {count} times: {self.data[-300:]!r}"))
        return result


def stream_call(url, body, headers):
    """POST C{body} (JSON) to C{url} and read the answer as it arrives; a L{Streamed}."""
    streamed = Streamed()

    def read(response):
        return treq.collect(response, streamed._received).addCallback(lambda _: (response.code, streamed.data))

    hdrs = dict(headers, **{"Content-Type": "application/json"})
    d = treq.post(url, json.dumps(body).encode(), headers=hdrs, persistent=False)
    streamed.done = d.addCallback(read).addBoth(streamed._ended)
    return streamed


def when_queued(testcase, parts):
    """A Deferred that fires once a call starts waiting in the backend's queue for a slot (C{parts}: the gateway's L{Parts})."""
    slots, queued = parts.ollama.slots, Deferred()
    acquire = slots.acquire

    def acquire_and_tell(*args, **kwargs):
        before = len(slots.waiting)
        d = Deferred.fromCoroutine(acquire(*args, **kwargs))
        if len(slots.waiting) > before and not queued.called:
            queued.callback(None)
        return d

    testcase.patch(slots, "acquire", acquire_and_tell)
    return queued


def when_done(testcase, parts, count=1):
    """
    A Deferred firing with the next C{count} requests the gateway (its
    L{Parts}) accounts for (access log and metrics written), once they all are.
    """
    done, d = [], Deferred()
    original = parts.accounting.done

    def request_done(request):
        original(request)
        done.append(request)
        if len(done) == count:
            d.callback(done)

    testcase.patch(parts.accounting, "done", request_done)
    return d


async def until(predicate, timeout=20.0, what="the condition"):
    """
    Wait until C{predicate()} is true, looking again after each short turn
    of the reactor; fail after C{timeout} seconds.  For states nothing
    announces (counts kept by running clients).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await deferLater(reactor, 0.01)


def process_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class Process:
    """A gateway (or any command) in a real child process."""

    def __init__(self, argv, env=None, cwd=ROOT):
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, env=env or process_env(), cwd=cwd, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL)

    def stdout(self):
        self.out.seek(0)
        return self.out.read()

    def stderr(self):
        self.err.seek(0)
        return self.err.read()

    def wait_for(self, text, timeout=20.0, stream="stdout"):
        """Block until C{text} shows in the output; returns that output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.stdout() if stream == "stdout" else self.stderr()
            if text in seen:
                return seen
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen; exit={self.proc.poll()}\nstdout:\n{self.stdout()}\nstderr:\n{self.stderr()}")

    def url(self, which="Gateway"):
        marker = f"{which} listening on "
        for line in self.stdout().splitlines():
            if marker in line:
                return line.split(marker)[1].split()[0]
        raise AssertionError("no listening line: " + self.stdout())

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        self.err.close()


def clawdbot_argv(*args):
    return [sys.executable, "-m", "clawdbot", *args]
