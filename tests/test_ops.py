"""
The operating files (SPEC.md §1, §9; issue 8): C{clawdbot.service} checked
by C{systemd-analyze} and its command line run for real, its template
C{clawdbot@.service} too (issue 21: two instances, one per core, on one
PostgreSQL and one Redis), and
C{etc/nginx/clawdbot.conf} checked by C{nginx -t} and then run: a real
nginx terminating TLS in front of a real gateway and a paced fake Ollama.

Every nginx here is a child process of the test on loopback ports, with its
config, certificate, pid file, logs and temp folders in a temporary folder;
it runs as a single process (C{master_process off}) so that killing its PID
at cleanup leaves nothing behind.  nginx and systemd-analyze come from
Debian's packages (tests/setup-deps.sh).
"""

import datetime
import http.client
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from testing.fake_ollama import FakeOllama, tokenize
from tests.helpers import BASE_CONFIG, ROOT, SECRET, Process, bearer, closed_port, get_json, merge_yaml, process_env, reserved_port, serve, token, until, write_config
from tests.test_scaling import REDIS_URL, redis_prefix
from tests.test_sessions import pg_database

UNIT = os.path.join(ROOT, "clawdbot.service")
TEMPLATE = os.path.join(ROOT, "clawdbot@.service")
NGINX_SITE = os.path.join(ROOT, "etc", "nginx", "clawdbot.conf")
CLAWDBOT_SCRIPT = os.path.join(os.path.dirname(sys.executable), "clawdbot")
SERVER_NAME = "chat.example.com"
HI = [{"role": "user", "content": "hi"}]


def tool(name):
    """The path of a command, looking in the sbin folders too (nginx lives in /usr/sbin)."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]))
    if path is None:
        raise AssertionError(f"{name} is not installed: run tests/setup-deps.sh")
    return path


def tempdir(testcase):
    path = tempfile.mkdtemp(prefix="clawdbot-ops-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


# ---------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------


def read_unit(text):
    """C{{section: {key: [values]}}} of a unit file (keys may repeat)."""
    sections, current = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_text():
    with open(UNIT) as f:
        return f.read()


def unit_for_this_machine(testcase, text=None, script=CLAWDBOT_SCRIPT):
    """
    A copy of the unit in a temporary folder, with ExecStart pointing at
    this venv's C{clawdbot} script (or C{script}) and EnvironmentFile at a
    temporary file; returns its path.
    """
    text = unit_text() if text is None else text
    folder = tempdir(testcase)
    env_file = os.path.join(folder, "clawdbot.env")
    with open(env_file, "w") as f:
        f.write(f"JWT_SECRET={SECRET}\nOAUTH_CLIENT_SECRET=not-a-real-secret\n")
    os.chmod(env_file, 0o600)
    copy, count = re.subn(r"^ExecStart=/usr/local/bin/clawdbot ", f"ExecStart={script} ", text, flags=re.M)
    testcase.assertEqual(count, 1, "the unit's ExecStart should start /usr/local/bin/clawdbot")
    copy, count = re.subn(r"^EnvironmentFile=/etc/clawdbot/clawdbot\.env$", f"EnvironmentFile={env_file}", copy, flags=re.M)
    testcase.assertEqual(count, 1, "the unit should read /etc/clawdbot/clawdbot.env")
    path = os.path.join(folder, "clawdbot.service")
    with open(path, "w") as f:
        f.write(copy)
    return path


def seconds(value):
    """A systemd time span such as C{45s}, C{1min 30s} or C{90}, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


class SystemdUnitTests(TestCase):
    """clawdbot.service: valid for systemd, and saying what issue 8 asks."""

    timeout = 60

    def test_systemd_analyze_verify(self):
        """`systemd-analyze verify` accepts the unit (ExecStart swapped for this venv's script) with no warning about it."""
        path = unit_for_this_machine(self)
        result = subprocess.run([tool("systemd-analyze"), "verify", path], capture_output=True, text=True, timeout=60)
        about_unit = [line for line in (result.stdout + result.stderr).splitlines() if "clawdbot" in line]
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(about_unit, [], "systemd-analyze warned about the unit")

    def test_verify_notices_mistakes(self):
        """The verify step above is not vacuous: a missing binary fails it and a misspelt key is reported."""
        missing = unit_for_this_machine(self, script="/nonexistent/clawdbot")
        result = subprocess.run([tool("systemd-analyze"), "verify", missing], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        typo = unit_for_this_machine(self, unit_text().replace("\nRestart=on-failure", "\nRestrat=on-failure"))
        result = subprocess.run([tool("systemd-analyze"), "verify", typo], capture_output=True, text=True, timeout=60)
        self.assertIn("Restrat", result.stdout + result.stderr)

    def test_runs_the_gateway_in_the_foreground(self):
        """ExecStart is `clawdbot start` on /etc/clawdbot in production without the debug port, as a simple foreground process; reload is SIGHUP to it."""
        service = read_unit(unit_text())["Service"]
        self.assertEqual(
            service["ExecStart"],
            ["/usr/local/bin/clawdbot start --config /etc/clawdbot/clawdbot.yaml --mode production --no-debug-port"],
        )
        self.assertIn(service["Type"], (["simple"], ["exec"]))
        self.assertEqual(service["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(service["EnvironmentFile"], ["/etc/clawdbot/clawdbot.env"])
        self.assertEqual(service["Restart"], ["on-failure"])
        # A config error exits 2 (README): restarting would not fix it.
        self.assertEqual(service["RestartPreventExitStatus"], ["2"])
        self.assertNotIn("PIDFile", service)

    def test_stop_outlasts_the_drain(self):
        """SIGTERM goes to the main process and systemd waits longer than the gateway's default drain deadline before SIGKILL."""
        from clawdbot.config import load_config

        service = read_unit(unit_text())["Service"]
        self.assertEqual(service["KillSignal"], ["SIGTERM"])
        self.assertEqual(service["KillMode"], ["mixed"])
        server = load_config(os.path.join(ROOT, "etc", "clawdbot.yaml"), {}).server
        drain = server.drain_delay + server.drain_timeout
        self.assertEqual(drain, 30)
        self.assertGreaterEqual(seconds(service["TimeoutStopSec"][0]), drain + 10)

    def test_state_and_user(self):
        """A dynamic user whose only writable places are /var/lib/clawdbot (the working directory, for SQLite) and /var/log/clawdbot."""
        text = unit_text()
        service = read_unit(text)["Service"]
        self.assertEqual(service["DynamicUser"], ["yes"])
        self.assertEqual(service["StateDirectory"], ["clawdbot"])
        self.assertEqual(service["LogsDirectory"], ["clawdbot"])
        self.assertEqual(service["WorkingDirectory"], ["/var/lib/clawdbot"])
        self.assertIn("path: /var/lib/clawdbot/clawdbot.sqlite3", text)

    def test_sandboxing(self):
        """The sandboxing options are set, and `systemd-analyze security` rates the unit's exposure at 2.0 or less ("OK")."""
        service = read_unit(unit_text())["Service"]
        expected = {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "RestrictNamespaces": "yes",
            "LockPersonality": "yes",
            "SystemCallArchitectures": "native",
            "CapabilityBoundingSet": "",
            "UMask": "0077",
        }
        for key, value in expected.items():
            self.assertEqual(service.get(key), [value], key)
        # Not set on purpose: outbound TLS needs W+X memory (see the MDWE tests below).
        self.assertNotIn("MemoryDenyWriteExecute", service)

        path = unit_for_this_machine(self)
        result = subprocess.run(
            [tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", "--no-pager", path], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout[-2000:] + result.stderr)
        self.assertRegex(result.stdout, r"Overall exposure level for clawdbot\.service: [01]\.\d OK")


# ---------------------------------------------------------------------------
# The unit's command line, run for real
# ---------------------------------------------------------------------------

#: Execs argv[2:] after asking the kernel to SIGTERM it when the test process
#: (pid argv[1]) dies, even by SIGKILL, so that no nginx or gateway started
#: here outlives an aborted run.
TIED_TO_TEST = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit("the test process is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""


class WatchdogTests(SynchronousTestCase):
    """
    systemd's watchdog (clawdbot/ops/watchdog.py): both units ask for it, and
    the gateway sends C{WATCHDOG=1} (sd_notify(3)) to a real unix datagram
    socket bound here, only when the environment says the watchdog is this
    process's.
    """

    def socket(self, abstract=False):
        """A bound unix datagram socket: (the socket, its C{$NOTIFY_SOCKET} value)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = f"clawdbot-test-{os.getpid()}-{random.randrange(1 << 30)}"
            sock.bind("\0" + name)
            value = "@" + name
        else:
            value = os.path.join(tempdir(self), "notify")
            sock.bind(value)
        sock.settimeout(20)
        return sock, value

    def test_units_ask_for_it(self):
        """Both units set WatchdogSec=30s, let the main process notify, and restart a process the watchdog killed (on-failure)."""
        for text in (unit_text(), template_text()):
            service = read_unit(text)["Service"]
            self.assertEqual(service["NotifyAccess"], ["main"])
            self.assertEqual(seconds(service["WatchdogSec"][0]), 30)
            self.assertEqual(service["Restart"], ["on-failure"])

    def test_pings_from_the_reactor(self):
        """With WATCHDOG_USEC and a matching WATCHDOG_PID, WATCHDOG=1 at once and then every half period (path and abstract sockets)."""
        from clawdbot.ops.watchdog import watchdog_service

        for abstract in (False, True):
            sock, value = self.socket(abstract)
            clock = Clock()
            environ = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
            service = watchdog_service(environ, clock=clock)
            self.assertEqual(service.step, 1.0)
            service.startService()
            self.assertEqual(sock.recv(100), b"WATCHDOG=1")
            clock.advance(1.0)
            self.assertEqual(sock.recv(100), b"WATCHDOG=1")
            service.stopService()
            clock.advance(5.0)
            sock.setblocking(False)
            with self.assertRaises(BlockingIOError):
                sock.recv(100)

    def test_only_when_it_is_this_process(self):
        """No service without a socket, without or with a malformed WATCHDOG_USEC, or with another process's WATCHDOG_PID; WATCHDOG_PID unset applies to this process."""
        from clawdbot.ops.watchdog import watchdog_service

        _, value = self.socket()
        mine = str(os.getpid())
        for environ in (
            {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": mine},
            {"NOTIFY_SOCKET": value, "WATCHDOG_PID": mine},
            {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "soon", "WATCHDOG_PID": mine},
            {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "0", "WATCHDOG_PID": mine},
            {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)},
            {"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "2000000"},
        ):
            self.assertIsNone(watchdog_service(environ, clock=Clock()), environ)
        self.assertIsNotNone(watchdog_service({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"}, clock=Clock()))

    def test_a_failed_send_is_logged_not_raised(self):
        """A socket that is gone: the send fails quietly (one warning), the timer goes on."""
        from clawdbot.ops.watchdog import watchdog_service

        sock, value = self.socket()
        sock.close()
        os.unlink(value)
        clock = Clock()
        service = watchdog_service({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"}, clock=clock)
        service.startService()
        clock.advance(1.0)
        self.assertTrue(service.running)
        self.assertTrue(service.notifier._failing)
        service.stopService()

    def test_the_gateway_pings(self):
        """`clawdbot start` under a watchdog's environment (as systemd starts it, WATCHDOG_PID left out) sends WATCHDOG=1 repeatedly."""
        sock, value = self.socket()
        path = write_config(self, merge_yaml(BASE_CONFIG, 'server: {listen: "tcp:0:interface=127.0.0.1"}'))
        env = dict(process_env(), NOTIFY_SOCKET=value, WATCHDOG_USEC="1000000")
        gw = Process([CLAWDBOT_SCRIPT, "start", "--config", path, "--no-debug-port"], env=env)
        self.addCleanup(gw.stop)
        gw.wait_for("Gateway listening on", timeout=60)
        self.assertEqual([sock.recv(100) for _ in range(3)], [b"WATCHDOG=1"] * 3)


def tied_to_test(argv):
    """C{argv} run through L{TIED_TO_TEST}: the same process (exec), ended with the test process."""
    return [sys.executable, "-c", TIED_TO_TEST, str(os.getpid()), *argv]


#: Runs argv[1:] the way the unit would, as far as a test can: umask 0077 and,
#: when asked, the kernel's memory-deny-write-execute (PR_SET_MDWE, what
#: systemd's MemoryDenyWriteExecute= does with seccomp), kept across exec.
UNDER_UNIT = """
import ctypes, os, sys
os.umask(0o077)
if os.environ.pop("CLAWDBOT_TEST_MDWE", "") == "1":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:
        sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""

#: An HTTPS GET with Twisted (the gateway's own client stack: OIDC discovery,
#: JWKS, the OAuth2 code exchange), trusting one certificate.
HTTPS_PROBE = """
import ctypes, sys
from twisted.internet import defer, ssl, task
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody

mdwe, cert, url = sys.argv[1:4]
if mdwe == "1":
    assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0, "PR_SET_MDWE failed"

async def main(reactor):
    trust = ssl.Certificate.loadPEM(open(cert, "rb").read())
    d = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust)).request(b"GET", url.encode())
    d.addTimeout(10, reactor)
    try:
        response = await d
        print("status", response.code, (await readBody(response)).decode(), flush=True)
    except BaseException as e:
        print("failed", type(e).__name__, e, flush=True)

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def mdwe_available():
    """Whether this kernel has PR_SET_MDWE (Linux 6.3+), probed in a child process."""
    code = "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


class UnitCommandLineTests(TestCase):
    """The unit's own ExecStart, run the way systemd would run it (minus systemd)."""

    timeout = 60

    def start_like_the_unit(self, mdwe):
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        state = tempdir(self)  # plays /var/lib/clawdbot, the unit's WorkingDirectory
        config = write_config(
            self,
            f"""
            server: {{listen: "tcp:0:interface=127.0.0.1"}}
            backend: {{url: "{fake.url}"}}
            storage: {{backend: sqlite, path: clawdbot.sqlite3}}
            auth:
              jwt: {{secret: "${{JWT_SECRET}}", issuer: "https://sso.example.com", audience: "qwen-web-chat", algorithms: [HS256]}}
            """,
        )
        argv = read_unit(unit_text())["Service"]["ExecStart"][0].split()
        argv = [CLAWDBOT_SCRIPT if a == "/usr/local/bin/clawdbot" else config if a == "/etc/clawdbot/clawdbot.yaml" else a for a in argv]
        env = process_env(JWT_SECRET=SECRET, CLAWDBOT_TEST_MDWE="1" if mdwe else "0")
        proc = Process(tied_to_test([sys.executable, "-c", UNDER_UNIT, *argv]), env=env, cwd=state)
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        return proc, fake, state, proc.url()

    async def test_exec_start_reload_and_stop(self):
        """The unit's ExecStart runs: production, no debug port, SQLite in the working directory (mode 0600 under UMask=0077), SIGHUP reloads, SIGTERM exits 0."""
        proc, fake, state, url = self.start_like_the_unit(mdwe=False)
        self.assertIn("Debug listener refused", proc.stderr())
        auth = bearer(token(scope="chat:read chat:write"))
        status, _, session = await get_json(url + "/v1/sessions", method="POST", headers=auth, body={"title": "ops"})
        self.assertEqual(status, 201, session)
        status, _, reply = await get_json(url + "/v1/chat/completions", method="POST", headers=auth, body={"messages": HI})
        self.assertEqual((status, reply["choices"][0]["message"]["content"]), (200, fake.reply_text))
        db = os.path.join(state, "clawdbot.sqlite3")
        self.assertTrue(os.path.exists(db), os.listdir(state))
        self.assertEqual(os.stat(db).st_mode & 0o777, 0o600)

        proc.signal(signal.SIGHUP)  # ExecReload
        proc.wait_for("Config reloaded", stream="stderr")
        proc.signal(signal.SIGTERM)  # KillSignal
        code = await deferToThread(proc.proc.wait, 45)
        self.assertEqual(code, 0, proc.stderr()[-2000:])

    async def test_gateway_core_runs_under_memory_deny_write_execute(self):
        """With the kernel's W^X lock on (what MemoryDenyWriteExecute=yes enforces), the gateway serves HS256 calls to an http:// backend."""
        self.assertTrue(mdwe_available(), "this kernel has no PR_SET_MDWE (Linux 6.3+)")
        proc, fake, _, url = self.start_like_the_unit(mdwe=True)
        status, _, body = await get_json(url + "/healthz")
        self.assertEqual((status, body), (200, {"status": "ok"}))
        auth = bearer(token(scope="chat:read chat:write"))
        status, _, raw = await get_json(url + "/v1/chat/completions", method="POST", headers=auth, body={"messages": HI, "stream": True})
        self.assertEqual(status, 200)
        self.assertTrue(raw.endswith(b"data: [DONE]\n\n"), raw[-200:])
        self.assertIsNone(proc.proc.poll())


# ---------------------------------------------------------------------------
# clawdbot@.service: one gateway per core
# ---------------------------------------------------------------------------


def template_text():
    with open(TEMPLATE) as f:
        return f.read()


def template_for_this_machine(testcase, text=None, script=CLAWDBOT_SCRIPT):
    """
    L{unit_for_this_machine} for the template: a copy named
    C{clawdbot@.service} in a temporary folder; returns the path of the
    instance C{clawdbot@8081.service} beside it (a file that does not exist:
    systemd-analyze loads the template for it).
    """
    path = unit_for_this_machine(testcase, template_text() if text is None else text, script)
    folder = os.path.dirname(path)
    os.rename(path, os.path.join(folder, "clawdbot@.service"))
    return os.path.join(folder, "clawdbot@8081.service")


def instance_environment(service, instance):
    """The variables the unit's C{Environment=} lines set for C{instance} (C{%i} expanded)."""
    return dict(line.replace("%i", instance).split("=", 1) for line in service["Environment"])


def instance_port(testcase):
    """
    A four-digit loopback port that can name an instance: it and its
    metrics twin (the same digits with a 1 in front, 10000 more) are both
    free, and both are held as by L{reserved_port} until the test ends.
    """
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(2000, 10000)
        held = []
        try:
            for candidate in (port, int(f"1{port}")):
                sock = socket.socket()
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", candidate))
        except OSError:
            for sock in held:
                sock.close()
            continue
        for sock in held:
            testcase.addCleanup(sock.close)
        return port
    raise AssertionError("no free pair of ports N and 1N below 20000")


def several_cores_config():
    """The YAML of README's "Several cores on one machine", as the README shows it."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n### Several cores on one machine\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


class TemplateUnitTests(TestCase):
    """clawdbot@.service: clawdbot.service as a template, one gateway per port (issue 21)."""

    timeout = 60

    def test_systemd_analyze_verify_instance(self):
        """`systemd-analyze verify clawdbot@8081.service` accepts the template's instance with no warning, rates its exposure OK, and notices a misspelt key."""
        path = template_for_this_machine(self)
        result = subprocess.run([tool("systemd-analyze"), "verify", path], capture_output=True, text=True, timeout=60)
        about_unit = [line for line in (result.stdout + result.stderr).splitlines() if "clawdbot" in line]
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(about_unit, [], "systemd-analyze warned about the unit")
        result = subprocess.run(
            [tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", "--no-pager", path], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout[-2000:] + result.stderr)
        self.assertRegex(result.stdout, r"Overall exposure level for clawdbot@8081\.service: [01]\.\d OK")

        missing = template_for_this_machine(self, script="/nonexistent/clawdbot")
        result = subprocess.run([tool("systemd-analyze"), "verify", missing], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        typo = template_for_this_machine(self, template_text().replace("\nRestart=on-failure", "\nRestrat=on-failure"))
        result = subprocess.run([tool("systemd-analyze"), "verify", typo], capture_output=True, text=True, timeout=60)
        self.assertIn("Restrat", result.stdout + result.stderr)

    def test_same_unit_but_the_port_and_state(self):
        """
        The template is clawdbot.service (same command line, reload, stop,
        restart policy, limits, user and sandbox) except what its header
        names: the description, the ports from the instance name, and no
        state directory (so no working directory in it).
        """
        single, template = read_unit(unit_text()), read_unit(template_text())
        self.assertEqual(template["Install"], single["Install"])
        self.assertEqual(dict(template["Unit"], Description=None), dict(single["Unit"], Description=None))
        self.assertIn("%i", template["Unit"]["Description"][0])
        differ = {"Environment", "StateDirectory", "StateDirectoryMode", "WorkingDirectory"}
        self.assertEqual(
            {k: v for k, v in template["Service"].items() if k not in differ},
            {k: v for k, v in single["Service"].items() if k not in differ},
        )
        self.assertEqual(set(single["Service"]) - set(template["Service"]), {"StateDirectory", "StateDirectoryMode", "WorkingDirectory"})
        self.assertEqual(template["Service"]["LogsDirectory"], ["clawdbot"])
        self.assertEqual(template["Service"]["Environment"], single["Service"]["Environment"] + ["CLAWDBOT_PORT=%i", "CLAWDBOT_METRICS_PORT=1%i"])
        self.assertEqual(instance_environment(template["Service"], "8081"), {"PYTHONUNBUFFERED": "1", "CLAWDBOT_PORT": "8081", "CLAWDBOT_METRICS_PORT": "18081"})

    def test_readme_config_is_valid_for_an_instance(self):
        """README's several-cores config loads with an instance's environment: listeners on its own ports, PostgreSQL, Redis."""
        from clawdbot.config import load_config

        path = write_config(self, several_cores_config())
        environ = dict(
            instance_environment(read_unit(template_text())["Service"], "8081"),
            JWT_SECRET=SECRET,
            DATABASE_URL="postgresql://clawdbot@db.internal:5432/clawdbot",
            REDIS_URL="redis://127.0.0.1:6379/0",
        )
        config = load_config(path, environ)
        self.assertEqual(config.server.listen, "tcp:8081:interface=127.0.0.1")
        self.assertEqual(config.metrics.listen, "tcp:18081:interface=127.0.0.1")
        self.assertEqual((config.storage.backend, config.rate_limit.backend), ("postgresql", "redis"))
        # Without the unit's variables (clawdbot.service, `clawdbot start`), the defaults.
        config = load_config(path, {k: environ[k] for k in ("JWT_SECRET", "DATABASE_URL", "REDIS_URL")})
        self.assertEqual((config.server.listen, config.metrics.listen), ("tcp:8080:interface=127.0.0.1", "tcp:9464:interface=127.0.0.1"))

    async def test_two_instances_share_history_and_budgets(self):
        """
        Two instances' ExecStart, run with the environment the unit gives
        them (C{%i} = two free ports; the secrets clawdbot.env would hold)
        in its working directory (/), on README's several-cores config with
        this machine's PostgreSQL and Redis: each listens and serves
        metrics on its own ports, a session made through one is read
        through the other, and a budget spent on one is spent on both.
        """
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        # What a test machine changes: the backend, a Redis prefix of the
        # test's own, and a budget of one model call a minute (the test ends
        # long before it refills).
        extra = f"""
        backend: {{url: "{fake.url}"}}
        rate_limit: {{key_prefix: "{redis_prefix(self)}", requests_per_minute: 1}}
        """
        config = write_config(self, merge_yaml(several_cores_config(), extra))
        service = read_unit(template_text())["Service"]
        argv = service["ExecStart"][0].split()
        argv = [CLAWDBOT_SCRIPT if a == "/usr/local/bin/clawdbot" else config if a == "/etc/clawdbot/clawdbot.yaml" else a for a in argv]
        env_file = dict(JWT_SECRET=SECRET, DATABASE_URL=pg_database(self), REDIS_URL=REDIS_URL)
        instances = []
        for port in (instance_port(self), instance_port(self)):
            env = process_env(**instance_environment(service, str(port)), **env_file)
            proc = Process(tied_to_test([sys.executable, "-c", UNDER_UNIT, *argv]), env=env, cwd="/")
            self.addCleanup(proc.stop)
            instances.append((port, proc))
        urls = []
        for port, proc in instances:
            proc.wait_for("Gateway listening on")
            proc.wait_for("Metrics listening on")
            self.assertEqual(proc.url(), f"http://127.0.0.1:{port}")
            self.assertEqual(proc.url("Metrics"), f"http://127.0.0.1:1{port}")
            urls.append(proc.url())
        a, b = urls

        for port, proc in instances:
            status, _, body = await get_json(proc.url() + "/healthz")
            self.assertEqual((status, body), (200, {"status": "ok"}))
            status, _, text = await get_json(proc.url("Metrics") + "/metrics")
            self.assertEqual(status, 200)
            self.assertIn(b"clawdbot_requests_total", text)

        alice = bearer(token(sub="alice"))
        status, _, made = await get_json(a + "/v1/sessions", method="POST", headers=alice, body={"title": "Cores"})
        self.assertEqual(status, 201, made)
        status, _, seen = await get_json(f"{b}/v1/sessions/{made['id']}", headers=alice)
        self.assertEqual(status, 200, seen)
        self.assertEqual(seen["title"], "Cores")

        carol = bearer(token(sub="carol"))
        status, _, reply = await get_json(a + "/v1/chat/completions", method="POST", headers=carol, body={"messages": HI})
        self.assertEqual((status, reply["choices"][0]["message"]["content"]), (200, fake.reply_text))
        status, headers, refused = await get_json(b + "/v1/chat/completions", method="POST", headers=carol, body={"messages": HI})
        self.assertEqual(status, 429, refused)
        self.assertEqual(refused["error"]["code"], "RATE_LIMITED")
        self.assertTrue(headers.getRawHeaders("Retry-After"))
        # The other user's budget is untouched: the refusal is carol's spent budget, not the instance.
        status, _, _ = await get_json(b + "/v1/chat/completions", method="POST", headers=alice, body={"messages": HI})
        self.assertEqual(status, 200)


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------


def self_signed(folder):
    """A self-signed certificate for chat.example.com and 127.0.0.1; returns (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(folder, "fullchain.pem"), os.path.join(folder, "privkey.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def site_text():
    with open(NGINX_SITE) as f:
        return f.read()


def render_site(text, https_port, http_port, upstream_port, cert, key):
    """
    The example with only what must change on a test machine changed: the
    listen ports (IPv4 loopback; the IPv6 listens are dropped, as a test
    machine may have no IPv6), the upstream port and the certificate paths.
    Each substitution must hit exactly as often as the example is written.

    @param upstream_port: the gateway's port, or a list of ports: one
        C{server} line each, with the example's parameters (several
        instances, as README's "Several cores on one machine" lists them).
    """
    ports = upstream_port if isinstance(upstream_port, (list, tuple)) else [upstream_port]

    def servers(match):
        return "".join(f"{match.group(1)}server 127.0.0.1:{port}{match.group(2)};\n" for port in ports)

    subs = [
        (r"^(\s*)listen \[::\]:\d+[^;]*;\n", "", 2),
        (r"^(\s*)listen 443 ", rf"\g<1>listen 127.0.0.1:{https_port} ", 1),
        (r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{http_port};", 1),
        (r"^(\s*)server 127\.0\.0\.1:8080((?: [^;]*)?);\n", servers, 1),
        (r"^(\s*)ssl_certificate\s+\S+;", rf"\g<1>ssl_certificate {cert};", 1),
        (r"^(\s*)ssl_certificate_key\s+\S+;", rf"\g<1>ssl_certificate_key {key};", 1),
    ]
    for pattern, replacement, expected in subs:
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        if count != expected:
            raise AssertionError(f"{pattern!r} matched {count} times in {NGINX_SITE}, expected {expected}")
    return text


MAIN_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/clawdbot.conf;
}}
"""


class Nginx:
    """A real nginx, a child process of the test, serving the rendered example."""

    def __init__(self, testcase, upstream_port, tweak=None):
        self.prefix = tempdir(testcase)
        self.cert, self.key = self_signed(self.prefix)
        self.https_port, self.http_port = reserved_port(testcase), reserved_port(testcase)  # written into the site file
        site = render_site(site_text(), self.https_port, self.http_port, upstream_port, self.cert, self.key)
        if tweak:
            site = tweak(site)
        with open(os.path.join(self.prefix, "clawdbot.conf"), "w") as f:
            f.write(site)
        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(MAIN_CONF.format(prefix=self.prefix))
        # -e: the error log before the config is read, kept out of /var/log/nginx.
        self.base = [tool("nginx"), "-p", self.prefix + "/", "-c", self.conf, "-e", os.path.join(self.prefix, "error.log")]
        self.testcase = testcase
        self.proc = None

    def check(self):
        """`nginx -t`: (exit status, what it printed)."""
        result = subprocess.run(self.base + ["-t"], capture_output=True, text=True, timeout=30)
        return result.returncode, result.stdout + result.stderr

    def start(self):
        code, said = self.check()
        self.testcase.assertEqual(code, 0, said)
        # One process (no master/worker pair), in the foreground: its PID is all there is to kill.
        self.proc = subprocess.Popen(
            tied_to_test(self.base + ["-g", "daemon off; master_process off;"]), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.testcase.addCleanup(self.stop)
        deadline = time.monotonic() + 10
        for port in (self.https_port, self.http_port):
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"nginx did not listen on {port}: exit {self.proc.poll()}\n{self.error_log()}")
                time.sleep(0.05)
        return self

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        self.proc = None

    def error_log(self):
        try:
            with open(os.path.join(self.prefix, "error.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def tls_context(self):
        return ssl.create_default_context(cafile=self.cert)

    def https(self, method, path, body=None, headers=None, source=None):
        """
        One HTTPS call through nginx (blocking; run it in a thread): (status,
        headers, body bytes).  C{source}: the loopback address to call from
        (the whole of 127.0.0.0/8 is this machine), so calls can come from
        different clients.
        """
        source_address = (source, 0) if source else None
        conn = http.client.HTTPSConnection("127.0.0.1", self.https_port, context=self.tls_context(), timeout=30, source_address=source_address)
        try:
            hdrs = {"Host": SERVER_NAME, **(headers or {})}
            data = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def stream(self, path, body, headers, events, progress):
        """
        POST C{body} through nginx and read the reply line by line as it
        arrives (blocking; run it in a thread), appending C{(progress(), SSE
        data payload)} to C{events} as each event arrives: (status, headers).
        """
        conn = http.client.HTTPSConnection("127.0.0.1", self.https_port, context=self.tls_context(), timeout=30)
        try:
            hdrs = {"Host": SERVER_NAME, "Content-Type": "application/json", "Accept": "text/event-stream", **headers}
            conn.request("POST", path, body=json.dumps(body).encode(), headers=hdrs)
            response = conn.getresponse()
            while True:
                line = response.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    events.append((progress(), line[6:].rstrip(b"\r\n")))
            return response.status, dict(response.getheaders())
        finally:
            conn.close()


def contents(events):
    """The delta texts of SSE chat.completion.chunk payloads, the [DONE] marker left out."""
    out = []
    for _, payload in events:
        if payload == b"[DONE]":
            continue
        chunk = json.loads(payload)
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                out.append(text)
    return out


class NginxConfigTests(TestCase):
    """etc/nginx/clawdbot.conf as a file."""

    timeout = 60

    def test_nginx_t(self):
        """`nginx -t` accepts the example included in an http block, with only ports and certificate paths changed."""
        nginx = Nginx(self, upstream_port=8080)
        code, said = nginx.check()
        self.assertEqual(code, 0, said)
        self.assertIn("syntax is ok", said)
        self.assertIn("test is successful", said)

    def test_nginx_t_notices_mistakes(self):
        """The check above is not vacuous: a misspelt directive in the example makes `nginx -t` fail."""
        nginx = Nginx(self, upstream_port=8080, tweak=lambda text: text.replace("proxy_buffering off;", "proxy_bufering off;"))
        code, said = nginx.check()
        self.assertNotEqual(code, 0)
        self.assertIn("proxy_bufering", said)

    def test_directives(self):
        """The example holds only upstream/map/server blocks, keeps upstream connections alive (closing them before the gateway does), passes the client's identity headers, streams unbuffered and caps bodies at limits.max_body."""
        text = site_text()
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        top_level = re.findall(r"^(\w+)", code, flags=re.M)
        self.assertEqual(set(top_level), {"upstream", "map", "server"})
        from clawdbot.config import load_config

        max_body = load_config(os.path.join(ROOT, "etc", "clawdbot.yaml"), {}).limits.max_body
        self.assertEqual(re.findall(r"client_max_body_size (\d+);", code), [str(max_body)], "nginx's body limit should be limits.max_body in bytes")
        for directive in [
            r"upstream clawdbot \{\s*server 127\.0\.0\.1:8080 max_fails=0;\s*keepalive 32;\s*keepalive_timeout 50s;\s*\}",
            r"map \$request_uri \$clawdbot_error_shape \{",
            r"proxy_connect_timeout 1s;",
            r"listen 443 ssl http2;",
            r"listen 80;",
            r"return 301 https://\$host\$request_uri;",
            r"proxy_pass http://clawdbot;",
            r"proxy_http_version 1\.1;",
            r'proxy_set_header Connection "";',
            r"proxy_set_header Host \$host;",
            r"proxy_set_header X-Forwarded-For \$remote_addr;",
            r'proxy_set_header Forwarded "";',
            r"proxy_set_header X-Forwarded-Proto \$scheme;",
            r"proxy_buffering off;",
            r"proxy_cache off;",
            r"proxy_read_timeout 300s;",
            r"error_page 413 = @payload_too_large;",
            r"error_page 502 @no_gateway;",
            r"error_page 503 @proxy_busy;",
            r"error_page 504 @gateway_timeout;",
            r"proxy_next_upstream error timeout http_503;",
            r"proxy_next_upstream_tries 2;",
            r"proxy_next_upstream_timeout 10s;",
            r"proxy_intercept_errors off;",
            r"ssl_certificate\s+/\S+;",
            r"ssl_certificate_key\s+/\S+;",
        ]:
            self.assertRegex(code, directive)
        # A POST is never sent twice (README, "Rolling restarts").
        self.assertNotIn("non_idempotent", code)


class NginxProxyTests(TestCase):
    """
    A real nginx terminating TLS in front of a real gateway and a paced fake
    Ollama.  The fake's pace runs on a clock of its own that only the test
    moves, so whether events come one by one is a matter of order: how many
    lines the fake had sent when each event reached the client.
    """

    timeout = 60

    def start(self, pace=1.0, tweak=None):
        self.fake = FakeOllama(clock=Clock())
        self.fake.behave(pace=pace)
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.gw = serve(self, extra=merge_yaml(f'backend: {{url: "{self.fake.url}"}}', ""), no_debug=True)
        upstream_port = int(self.gw.url.rsplit(":", 1)[1])
        self.nginx = Nginx(self, upstream_port, tweak=tweak).start()
        self.auth = bearer(token(scope="chat:read chat:write"))
        return self.nginx

    def lines_sent(self):
        """How many lines of the reply the fake has sent (read from the client's thread too)."""
        chats = self.fake.requests_to("/api/chat")
        return chats[-1].lines_sent if chats else 0

    async def in_step(self, events):
        """
        Move the fake's clock one pace at a time, each time only once the
        client has an event for every line the fake has sent, until the
        reply is complete.  A proxy that holds an event back stalls this,
        and it fails.
        """
        while True:
            await until(lambda: 0 < self.lines_sent() <= len(events), what="an event for each line the fake sent (nginx holding events back?)")
            if self.fake.requests_to("/api/chat")[-1].outcome != "pending":
                return
            self.fake.clock.advance(1.0)

    async def stream_chat(self, drive=None):
        events = []
        body = {"model": "qwen3:32b", "messages": HI, "stream": True}
        reading = deferToThread(self.nginx.stream, "/v1/chat/completions", body, self.auth, events, self.lines_sent)
        await (drive or self.in_step)(events)
        status, headers = await reading
        self.assertEqual(status, 200, events)
        self.assertEqual(headers.get("Content-Type"), "text/event-stream; charset=utf-8")
        return events

    def assertIncremental(self, events):
        """Each event reached the client before the fake sent the next line, not in one burst at the end."""
        lines = self.lines_sent()
        self.assertEqual([sent for sent, _ in events], [*range(1, lines + 1), lines], "events held back: buffered")

    def assertWhole(self, events):
        """Every token once, in order, then [DONE]."""
        self.assertEqual(contents(events), tokenize(self.fake.reply_text))
        self.assertEqual(events[-1][1], b"[DONE]")
        self.assertEqual(sum(payload == b"[DONE]" for _, payload in events), 1)

    async def test_sign_in_budget_is_per_client_behind_nginx(self):
        """
        With nginx in server.trusted_proxies, the per-address sign-in budget
        is each client's (calls from 127.0.0.2 and 127.0.0.3 count apart),
        an X-Forwarded-For a client sends through nginx is replaced by nginx,
        and one sent straight to the gateway from an untrusted peer is not
        believed.
        """
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        extra = f'''
backend: {{url: "{self.fake.url}"}}
server: {{trusted_proxies: ["127.0.0.1/32"]}}
rate_limit: {{auth_per_ip_per_minute: 2}}
oauth2:
  enabled: true
  client_id: gw
  client_secret: s3cret
  redirect_uri: "http://127.0.0.1:1/callback"
  issuer_url: "http://127.0.0.1:{closed_port(self)}"
'''
        gw = serve(self, extra=extra, no_debug=True)
        nginx = Nginx(self, int(gw.url.rsplit(":", 1)[1])).start()
        refresh = {"X-Requested-With": "XMLHttpRequest"}

        def through_nginx(source, headers=refresh):
            return deferToThread(lambda: nginx.https("POST", "/auth/refresh", headers=headers, source=source)[0])

        first = [await through_nginx("127.0.0.2") for _ in range(3)]
        self.assertNotIn(429, first[:2])
        self.assertEqual(first[2], 429)
        self.assertNotEqual(await through_nginx("127.0.0.3"), 429)
        # A client naming the spent address: nginx sets X-Forwarded-For to the real one, and drops Forwarded.
        self.assertNotEqual(await through_nginx("127.0.0.4", dict(refresh, **{"X-Forwarded-For": "127.0.0.2"})), 429)
        self.assertNotEqual(await through_nginx("127.0.0.6", dict(refresh, **{"Forwarded": "for=127.0.0.2"})), 429)
        for _ in range(2):
            await through_nginx("127.0.0.7", dict(refresh, **{"Forwarded": "for=127.0.0.8"}))
        self.assertNotEqual(await through_nginx("127.0.0.8"), 429)  # nobody spent 127.0.0.8's budget

        def straight(source, forwarded):
            conn = http.client.HTTPConnection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]), timeout=30, source_address=(source, 0))
            try:
                conn.request("POST", "/auth/refresh", headers=dict(refresh, **{"X-Forwarded-For": forwarded}))
                return conn.getresponse().status
            finally:
                conn.close()

        # An untrusted peer's X-Forwarded-For is ignored: its budget is its own.
        self.assertNotEqual(await deferToThread(straight, "127.0.0.5", "127.0.0.2"), 429)

    async def test_sse_streams_through_nginx(self):
        """Over HTTPS through nginx the SSE chunks arrive as Ollama paces them (each before the next line is sent), each token once, in order, then [DONE]."""
        self.start()
        self.assertGreaterEqual(len(tokenize(self.fake.reply_text)), 8)
        events = await self.stream_chat()
        self.assertIncremental(events)
        self.assertWhole(events)
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].outcome, "completed")

    async def test_config_alone_keeps_streams_unbuffered(self):
        """The example's proxy_buffering off streams even when nginx ignores the gateway's X-Accel-Buffering header."""
        self.start(tweak=lambda text: text.replace("proxy_buffering off;", "proxy_buffering off;\n        proxy_ignore_headers X-Accel-Buffering;"))
        events = await self.stream_chat()
        self.assertIncremental(events)
        self.assertWhole(events)

    async def test_buffering_would_be_caught(self):
        """
        Control for the two tests above: with buffering on and the header
        ignored, nginx holds every event back until the fake has sent the
        whole reply (so stepping the fake as they do would stall).  Here the
        fake is stepped without waiting for the client, a turn of the
        reactor between two lines.
        """
        self.start(
            tweak=lambda text: text.replace("proxy_buffering off;", "proxy_buffering on;\n        proxy_ignore_headers X-Accel-Buffering;")
        )

        async def regardless(events):
            await until(lambda: self.lines_sent() > 0, what="the first line sent")
            while self.fake.requests_to("/api/chat")[-1].outcome == "pending":
                await deferLater(reactor, 0.01)
                self.fake.clock.advance(1.0)

        events = await self.stream_chat(drive=regardless)
        self.assertWhole(events)
        lines = self.lines_sent()
        self.assertEqual([sent for sent, _ in events], [lines] * len(events), "buffered nginx streamed anyway: the incremental check proves nothing")

    async def test_http2_stream(self):
        """Over HTTP/2 (ALPN h2, curl) the stream is incremental and whole too."""
        self.start()
        body = json.dumps({"messages": HI, "stream": True})
        argv = [
            tool("curl"), "-sS", "-N", "--http2", "--cacert", self.nginx.cert,
            "--resolve", f"{SERVER_NAME}:{self.nginx.https_port}:127.0.0.1",
            "-H", "Content-Type: application/json", "-H", f"Authorization: {self.auth['Authorization']}",
            "--data-binary", body, "-w", "\nhttp_version=%{http_version}\n",
            f"https://{SERVER_NAME}:{self.nginx.https_port}/v1/chat/completions",
        ]  # fmt: skip

        events = []

        def run():
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            tail = []
            try:
                for line in proc.stdout:
                    if line.startswith(b"data: "):
                        events.append((self.lines_sent(), line[6:].rstrip(b"\r\n")))
                    elif line.strip():
                        tail.append(line)
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
                err = proc.stderr.read()
                proc.stderr.close()
            return proc.returncode, b"".join(tail), err

        running = deferToThread(run)
        await self.in_step(events)
        code, tail, err = await running
        self.assertEqual(code, 0, err)
        self.assertIn(b"http_version=2", tail)
        self.assertIncremental(events)
        self.assertWhole(events)

    async def test_healthz_and_auth_through_nginx(self):
        """/healthz answers through nginx; Authorization reaches the gateway and its JSON 401 and headers come back unchanged."""
        nginx = self.start(pace=0)
        status, headers, body = await deferToThread(nginx.https, "GET", "/healthz")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertEqual(headers.get("X-Content-Type-Options"), "nosniff")
        self.assertIn("max-age=", headers.get("Strict-Transport-Security", ""))

        status, _, body = await deferToThread(nginx.https, "GET", "/v1/me", headers=self.auth)
        self.assertEqual((status, json.loads(body)["sub"]), (200, "alice"))
        status, headers, body = await deferToThread(nginx.https, "GET", "/v1/me")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "AUTH_MISSING_TOKEN"))
        self.assertEqual(headers.get("WWW-Authenticate"), 'Bearer realm="clawdbot"')

    async def test_keepalive_to_the_gateway(self):
        """Several calls through nginx reuse kept-alive upstream connections instead of opening one each."""
        nginx = self.start(pace=0)
        counts = []
        port = self.gw.url.rsplit(":", 1)[1]

        def connections():
            # The gateway's end of each established connection to it (ss is in iproute2, which nginx depends on).
            out = subprocess.run([tool("ss"), "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, timeout=10)
            return len(out.stdout.splitlines())

        for _ in range(5):
            status, _, _ = await deferToThread(nginx.https, "GET", "/healthz")
            self.assertEqual(status, 200)
            counts.append(await deferToThread(connections))
        self.assertGreaterEqual(min(counts), 1, "no kept-alive connection from nginx to the gateway")
        self.assertLessEqual(max(counts), 1, counts)

    async def test_http_redirects_to_https(self):
        """The port-80 server answers every path with a 301 to the same path and query on https://."""
        nginx = self.start(pace=0)

        def call():
            conn = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=10)
            try:
                conn.request("GET", "/v1/models?limit=2", headers={"Host": SERVER_NAME, "Authorization": self.auth["Authorization"]})
                response = conn.getresponse()
                response.read()
                return response.status, response.getheader("Location")
            finally:
                conn.close()

        status, location = await deferToThread(call)
        self.assertEqual((status, location), (301, f"https://{SERVER_NAME}/v1/models?limit=2"))
        # (The gateway's own start-up check asks /api/version; no call of the client's got through.)
        self.assertEqual([r for r in self.fake.requests if r.path != "/api/version"], [], "a plain-HTTP call reached the backend")

    async def test_body_limit_at_the_edge(self):
        """nginx's body limit is the gateway's 20MB to the byte: one byte more is refused by nginx in the gateway's JSON shape, exactly 20MB reaches the gateway."""
        nginx = self.start(pace=0)
        limit = 20 * 1000**2
        status, headers, body = await deferToThread(nginx.https, "POST", "/v1/chat/completions", b"x" * (limit + 1), self.auth)
        self.assertEqual(status, 413, body[:300])
        self.assertEqual(json.loads(body)["error"], {
            "message": f"Request body too large: the body is larger than the limit of {limit} bytes",
            "type": "invalid_request_error", "code": "PAYLOAD_TOO_LARGE", "param": None,
            "details": f"the body is larger than the limit of {limit} bytes",
        })  # fmt: skip
        self.assertEqual(headers.get("Content-Type"), "application/json")
        self.assertEqual(headers.get("X-Content-Type-Options"), "nosniff")
        self.assertNotIn("X-Request-Id", headers, "the gateway answered, not nginx")

        # Not JSON, so the gateway answers 400 after reading all of it: it got the whole body.
        status, headers, body = await deferToThread(nginx.https, "POST", "/v1/chat/completions", b"x" * limit, self.auth)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "INVALID_REQUEST"))
        self.assertIn("X-Request-Id", headers)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])

    async def test_outbound_tls_needs_write_execute_memory(self):
        """Why the unit leaves MemoryDenyWriteExecute off: Twisted's HTTPS client works, but fails under the kernel's W^X lock (cffi callbacks)."""
        self.assertTrue(mdwe_available(), "this kernel has no PR_SET_MDWE (Linux 6.3+)")
        nginx = self.start(pace=0)
        url = f"https://127.0.0.1:{nginx.https_port}/healthz"

        def probe(mdwe):
            result = subprocess.run(
                [sys.executable, "-c", HTTPS_PROBE, mdwe, nginx.cert, url], capture_output=True, text=True, timeout=40, env=process_env()
            )
            return result.stdout + result.stderr

        plain = await deferToThread(probe, "0")
        self.assertIn('status 200 {"status": "ok"}', plain)
        locked = await deferToThread(probe, "1")
        self.assertNotIn("status 200", locked)
        self.assertIn("Cannot allocate write+execute memory", locked)
