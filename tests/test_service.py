"""
Service composition, listeners, reload and the real process: the listener
matrix on a memory reactor, and a few real-process checks for what only a
real process shows (the bound ports, the process name, SIGHUP).
"""

import os
import signal
import socket
import subprocess
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clawdbot.tap import ListenError, Options, makeService
from tests.helpers import BASE_CONFIG, reserved_port, ROOT, Process, clawdbot_argv, get_json, merge_yaml, serve, write_config, process_env

MATRIX_CONFIG = merge_yaml(BASE_CONFIG, 'server: {listen: "tcp:8080", debug_listen: "tcp:18789:interface=127.0.0.1"}')


class ListenerMatrixTests(SynchronousTestCase):
    def build(self, mode, no_debug, text=MATRIX_CONFIG):
        path = write_config(self, text)
        options = Options({})
        argv = ["--config", path, "--mode", mode]
        if no_debug:
            argv.append("--no-debug-port")
        options.parseOptions(argv)
        reactor = MemoryReactorClock()
        said, events = [], []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = makeService(options, reactor=reactor, say=said.append)
        service.startService()
        self.addCleanup(service.stopService)
        return reactor, said, events

    def test_matrix(self):
        """Dev mode opens the secure and the loopback debug port; the flag or production leaves only the secure one."""
        cases = {
            ("dev", False): [(8080, ""), (18789, "127.0.0.1")],
            ("dev", True): [(8080, "")],
            ("production", False): [(8080, "")],
            ("production", True): [(8080, "")],
        }
        for (mode, no_debug), expected in cases.items():
            reactor, said, _ = self.build(mode, no_debug)
            bound = [(port, interface) for port, _, _, interface in reactor.tcpServers]
            self.assertEqual(bound, expected, (mode, no_debug))
            self.assertEqual(said[0], "Gateway listening on http://localhost:8080")

    def test_production_logs_refusal(self):
        """Production mode logs that the debug port was refused."""
        _, _, events = self.build("production", False)
        self.assertTrue(any("Debug listener refused" in e.get("log_format", "") for e in events))

    def test_debug_listen_elsewhere_rejected(self):
        """A config pointing the debug port off loopback is a usage error at start."""
        path = write_config(self, merge_yaml(BASE_CONFIG, 'server: {debug_listen: "tcp:18789:interface=0.0.0.0"}'))
        options = Options({})
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertIn("server.debug_listen", str(error))

    def test_bind_failure_aborts_start(self):
        """A port that cannot be bound stops start-up with a clear error."""
        port = taken_port(self)
        from twisted.internet import reactor

        path = write_config(self, merge_yaml(BASE_CONFIG, f'server: {{listen: "tcp:{port}:interface=127.0.0.1"}}'))
        options = Options({})
        options.parseOptions(["--config", path, "--no-debug-port"])
        service = makeService(options, reactor=reactor, say=lambda line: None)
        error = self.assertRaises(ListenError, service.startService)
        self.assertIn(f"tcp:{port}", str(error))


class ReloadTests(TestCase):
    async def test_good_file_applied_bad_file_kept(self):
        """reload() applies a valid file, and keeps the running config when the file turns invalid."""
        gw = serve(self, extra="timeout: 120s")
        path = gw.config_path
        with open(path) as f:
            original = f.read()
        with open(path, "w") as f:
            f.write(original.replace("timeout: 120s", "timeout: 5s").replace("timeout: 120.0", "timeout: 5s"))
        self.assertTrue(gw.parts.runtime.reload())
        self.assertEqual(gw.parts.runtime.config.timeout, 5.0)

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        with open(path, "w") as f:
            f.write(original + "\nbogus_key: 1\n")
        self.assertFalse(gw.parts.runtime.reload())
        self.assertEqual(gw.parts.runtime.config.timeout, 5.0)
        failed = [e for e in events if e.get("log_format", "").startswith("Config reload failed")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["file"], path)
        self.assertIn("bogus_key: unknown key", failed[0]["error"])
        self.assertEqual(gw.parts.runtime.reloads, {"ok": 1, "error": 1})

    async def test_in_flight_request_keeps_its_config(self):
        """A request holds the config it started under after a reload swaps in a new one."""
        from clawdbot.http.resource import APIResource

        gw = serve(self)
        seen = {}
        from twisted.internet.defer import Deferred

        gate, started = Deferred(), Deferred()

        class Probe(APIResource):
            scopes = {"GET": None}

            async def handle_GET(self, request):
                before = request.config
                started.callback(None)
                await gate
                seen["same"] = request.config is before
                seen["timeout"] = request.config.timeout
                return {}

        gw.service.services[0].factory.resource.putChild(b"probe", Probe(gw.parts))
        from twisted.internet.defer import ensureDeferred

        pending = ensureDeferred(get_json(gw.url + "/probe"))
        await started
        with open(gw.config_path) as f:
            text = f.read()
        with open(gw.config_path, "w") as f:
            f.write(text + "\ntimeout: 7s\n")
        self.assertTrue(gw.parts.runtime.reload())
        self.assertEqual(gw.parts.runtime.config.timeout, 7.0)
        gate.callback(None)
        await pending
        self.assertEqual(seen, {"same": True, "timeout": 120.0})

    def test_signals_coalesce(self):
        """Several reload requests before the reactor turns run one reload."""
        from clawdbot.backend.ollama import Slots
        from clawdbot.config import load_config
        from clawdbot.ops.observe import Metrics
        from clawdbot.ops.runtime import Runtime

        class Reactor(MemoryReactorClock):
            def callFromThread(self, f, *args):
                self.queued.append((f, args))

        path = write_config(self, BASE_CONFIG)
        reactor = Reactor()
        reactor.queued = []
        gateway = Runtime(load_config(path, {}), reactor, Metrics(Slots(reactor)), environ={})
        gateway.request_reload()
        gateway.request_reload()
        gateway.request_reload()
        self.assertEqual(len(reactor.queued), 1)
        f, args = reactor.queued.pop()
        f(*args)
        self.assertEqual(gateway.reloads["ok"], 1)
        gateway.request_reload()
        self.assertEqual(len(reactor.queued), 1)


class LogLevelTests(TestCase):
    async def test_log_level_at_start_and_on_reload(self):
        """log.level filters from start-up on and a reload applies a new one; twistd's observer (--logger) filters at it too."""
        import io

        from twisted.logger import LogLevel, LogPublisher, Logger

        from clawdbot import logs

        self.addCleanup(logs.set_level, "info")
        gw = serve(self, extra="log: {level: warn}")
        stream = io.StringIO()
        publisher = LogPublisher(logs.FilteringLogObserver(logs.JSONLineObserver(stream), [logs._LEVEL]))
        log = Logger(namespace="clawdbot.test", observer=publisher)
        log.info("hidden at warn")
        log.warn("shown at warn")
        path = gw.config_path
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("level: warn", "level: debug"))
        self.assertTrue(gw.parts.runtime.reload())
        log.debug("shown at debug")
        self.assertEqual([line.split('"message": ')[1].split('"')[1] for line in stream.getvalue().splitlines()], ["shown at warn", "shown at debug"])
        self.assertIsInstance(logs.twistd_observer(), logs.FilteringLogObserver)
        self.assertEqual(logs._LEVEL.logLevelForNamespace("clawdbot"), LogLevel.debug)


class RealProcessTests(TestCase):
    """A real gateway process: the ports it binds, its name, and SIGHUP."""

    timeout = 60

    def start(self, extra="", *args, env=None):
        path = write_config(self, merge_yaml(BASE_CONFIG, extra))
        proc = Process(clawdbot_argv("start", "--config", path, *args), env=env)
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        return proc, path

    async def test_production_leaves_debug_port_closed(self):
        """In production mode nothing listens on the debug port, whatever the file says."""
        debug = reserved_port(self)  # free for the gateway to take, were it to open the listener
        proc, _ = self.start(f'server: {{debug_listen: "tcp:{debug}:interface=127.0.0.1"}}', "--mode", "production")
        status, _, _ = await get_json(proc.url() + "/healthz")
        self.assertEqual(status, 200)
        with socket.socket() as sock:
            self.assertNotEqual(sock.connect_ex(("127.0.0.1", debug)), 0)
        self.assertIn("Debug listener refused", proc.stderr())

    async def test_sighup_reload_in_real_process(self):
        """kill -HUP to the process named clawdbot applies a good file and keeps the config on a bad one."""
        proc, path = self.start('auth: {dev_principal: {sub: before}}')
        debug = proc.url("Debug port")
        pids = subprocess.run(["pidof", "clawdbot"], capture_output=True, text=True).stdout.split()
        self.assertIn(str(proc.proc.pid), pids)

        status, _, body = await get_json(debug + "/v1/me")
        self.assertEqual(body["sub"], "before")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("sub: before", "sub: after"))
        proc.signal(signal.SIGHUP)
        proc.wait_for("Config reloaded", stream="stderr")
        status, _, body = await get_json(debug + "/v1/me")
        self.assertEqual(body["sub"], "after")

        with open(path, "w") as f:
            f.write(text.replace("sub: before", "sub: broken") + "\nmax_connections: -3\n")
        proc.signal(signal.SIGHUP)
        log = proc.wait_for("Config reload failed", stream="stderr")
        self.assertIn("max_connections", log)
        self.assertIn(path, log)
        status, _, body = await get_json(debug + "/v1/me")
        self.assertEqual(body["sub"], "after")
        self.assertIsNone(proc.proc.poll())

    async def test_twistd_plugin(self):
        """twistd -n clawdbot --config F runs the same gateway through the plugin."""
        path = write_config(self, merge_yaml(BASE_CONFIG, ""))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        proc = Process([twistd, "-n", "--pidfile=", "clawdbot", "--config", path, "--no-debug-port"])
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        status, _, body = await get_json(proc.url() + "/healthz")
        self.assertEqual((status, body), (200, {"status": "ok"}))

    def test_console_script_on_example_config(self):
        """The installed `clawdbot` script starts on etc/clawdbot.yaml with an empty environment."""
        script = os.path.join(os.path.dirname(sys.executable), "clawdbot")
        self.assertTrue(os.path.exists(script), "the package is not installed in this environment")
        text = open(os.path.join(ROOT, "etc", "clawdbot.yaml")).read()
        text = text.replace('"tcp:8080"', '"tcp:0:interface=127.0.0.1"').replace("tcp:18789:", "tcp:0:")
        path = write_config(self, text)
        env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
        proc = Process([script, "start", "--config", path], env=env)
        self.addCleanup(proc.stop)
        proc.wait_for("Gateway listening on")
        host, _, port = proc.url().rpartition(":")
        self.assertEqual(host, "http://127.0.0.1")
        port = int(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            reply = sock.recv(4096)
        self.assertIn(b"200 OK", reply)


def taken_port(testcase):
    """A loopback port something else listens on for the test's length."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    testcase.addCleanup(sock.close)
    return sock.getsockname()[1]


class TwistdPortTakenTests(SynchronousTestCase):
    def test_one_line_not_a_traceback(self):
        """twistd -n clawdbot on a port that is taken ends with one line naming the port and status 1, as clawdbot start does: no traceback."""
        port = taken_port(self)
        path = write_config(self, merge_yaml(BASE_CONFIG, f'server: {{listen: "tcp:{port}:interface=127.0.0.1"}}'))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        for argv in ([twistd, "-n", "--pidfile=", "clawdbot", "--config", path, "--no-debug-port"], [os.path.join(os.path.dirname(sys.executable), "clawdbot"), "start", "--config", path, "--no-debug-port"]):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=process_env(), cwd=ROOT)
            self.assertEqual(result.returncode, 1, result.stderr[-500:])
            self.assertNotIn("Traceback", result.stderr + result.stdout)
            # (twistd sends standard error to its log, on standard output with -n.)
            self.assertIn(f"clawdbot: cannot listen on tcp:{port}", result.stderr + result.stdout)
