#!/usr/bin/env python3
"""
Clawdbot's benchmark: the fake Ollama directly vs the same fake through the
gateway, side by side in one run, printed as one markdown table; then
"several instances" (issue 21), the same load through one gateway and
through two gateway processes in front of one fake; then "tracing"
(issue 22), the same load with tracing off, on at sample rate 1.0 and on
at 0.01; then "two users, one GPU" (issue 16), each client's time to first token while a
greedy principal saturates a gateway with two backend slots, before (one
principal: arrival order) and after (two principals: fair share).

    .venv/bin/python bench/run.py              # or: make bench
    .venv/bin/python bench/run.py --full       # also 1,000 concurrent paced streams
    .venv/bin/python bench/run.py --fair-only  # only "two users, one GPU"
    .venv/bin/python bench/run.py --chunk-only # only the paced rows and the CPU per streamed chunk
    .venv/bin/python bench/run.py --instances-only  # only 1 gateway against 2
    .venv/bin/python bench/run.py --tracing-only    # only tracing off / 1.0 / 0.01

It starts, as separate processes on 127.0.0.1 only:

- the fake Ollama (C{python -m testing.fake_ollama --port 0 ...}): a fresh
  unpaced one for each unpaced measurement, and one paced instance
  (C{--pace-ms 20 --tokens 64}) for the paced scenarios and one for "two
  users";
- the real gateway (C{python -m clawdbot start --config TMP}) in production
  mode in front of a fake, with JWT auth on and the rate limit off (for
  "two users", a fresh one per variant with C{max_connections: 2});
- for "tracing", a trace collector (C{python bench/otlp_sink.py --port 0})
  that counts the spans it is sent, a fresh one for each row with tracing on;
- the load generators: wrk (Debian's C{wrk} package) for non-streaming
  throughput, and bench/loadgen.py (asyncio, raw HTTP/1.1 keep-alive,
  several processes) for streams and time to first token.

Everything it starts runs in its own session and is stopped at the end, on
errors and on Ctrl-C (and dies with this process even if it is killed).
Performance is measured and printed, never asserted.  See bench/README.md.
"""

import argparse
import atexit
import collections
import ctypes
import json
import os
import platform
import queue
import re
import resource
import secrets
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
LOADGEN = os.path.join(HERE, "loadgen.py")
WRK_SCRIPT = os.path.join(HERE, "wrk_post.lua")
MODEL = "qwen3:32b"
PROMPT = "Hello"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_INSTALL = "apt-get install -y wrk"


# "Two users, one GPU" (issue 16): (key, what it is, the interactive client's sub).
TWO_USERS = (
    ("before", "FIFO-equivalent: same principal", "greedy"),
    ("after", "fair share: two principals", "ann"),
)


# "Several instances" (issue 21): the non-streaming concurrency it measures.
INSTANCES_CONCURRENCY = 50


# "Tracing" (issue 22): the concurrency it measures, and each variant as
# (key, tracing.sample_rate or None for tracing off).
TRACING_CONCURRENCY = 10
TRACING_VARIANTS = (("off", None), ("1.0", 1.0), ("0.01", 0.01))
OTLP_SINK = os.path.join(HERE, "otlp_sink.py")


# What is being measured right now, to attribute the gateway's log lines.
PHASE = {"now": "start-up"}


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def say(*parts):
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not after fork
except (OSError, AttributeError):
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _child_setup():
    """In the child, before exec: die with the parent; enough descriptors."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Child:
    """
    A process this benchmark started, in its own session (so it and anything
    it forks can be stopped by its process group id), with its output read
    by threads so that it never blocks on a full pipe.
    """

    running = []

    def __init__(self, name, argv, env=None, stdin=False):
        self.name = name
        self.argv = argv
        self.lines = queue.Queue()
        self.out_tail = collections.deque(maxlen=40)
        self.err_tail = collections.deque(maxlen=40)
        self.err_count = 0
        self.err_messages = collections.Counter()  # (phase, message) -> count
        full_env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        try:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        except OSError as e:
            raise BenchError(f"cannot start {name} ({argv[0]}): {e}") from None
        self.pid = self.proc.pid
        Child.running.append(self)
        threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True).start()

    def _read(self, pipe, is_stdout):
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if is_stdout:
                self.lines.put(line)
                self.out_tail.append(line[:500])
            else:
                self.err_tail.append(line[:500])
                self.err_count += 1
                try:
                    entry = json.loads(line)
                    text = entry.get("message") or entry.get("error") or line
                    message = f"{entry.get('level', '?')}: {text}"
                except (ValueError, AttributeError):
                    message = line
                self.err_messages[(PHASE["now"], message[:200])] += 1
        if is_stdout:
            self.lines.put(None)

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, pattern, timeout):
        """The first stdout line matching C{pattern} (a regex), as a match."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name} did not print {pattern!r} within {timeout:g}s{self.tails()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise BenchError(f"{self.name} exited with status {self.proc.returncode}{self.tails()}")
            m = re.search(pattern, line)
            if m:
                return m

    def tails(self):
        text = ""
        if self.out_tail:
            text += "\n  stdout: " + "\n  stdout: ".join(list(self.out_tail)[-10:])
        if self.err_tail:
            text += "\n  stderr: " + "\n  stderr: ".join(list(self.err_tail)[-15:])
        return text

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} did not finish within {timeout:g}s") from None
        finally:
            if self.proc.returncode is not None and self in Child.running:
                Child.running.remove(self)

    def stop(self, grace=5.0):
        """SIGTERM to its process group, SIGKILL after C{grace} seconds."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=5)
        else:
            self._signal(signal.SIGKILL)  # whatever it may have left in its group
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if self in Child.running:
            Child.running.remove(self)

    def _signal(self, sig):
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @classmethod
    def stop_all(cls):
        for child in reversed(list(cls.running)):
            try:
                child.stop(grace=3.0)
            except Exception as e:  # keep stopping the others
                say(f"bench: could not stop {child.name} (pid {child.pid}): {e}")


def proc_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


class RSSSampler(threading.Thread):
    """Samples a process's VmRSS every 50 ms; the maximum per named phase."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks = {}
        self.phase = None
        self.stopping = threading.Event()

    def begin(self, phase):
        self.phase = phase
        self._sample()

    def _sample(self):
        rss = proc_rss_kb(self.pid)
        if rss is not None and self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        return rss

    def run(self):
        while not self.stopping.wait(0.05):
            if self._sample() is None:
                return

    def stop(self):
        self._sample()
        self.stopping.set()


# ---------------------------------------------------------------------------
# The fake Ollama and the gateway
# ---------------------------------------------------------------------------


def start_fake(name, *extra):
    child = Child(name, [PY, "-m", "testing.fake_ollama", "--host", "127.0.0.1", "--port", "0", *extra])
    url = child.expect(r"Fake Ollama listening on (http://\S+)", 60).group(1)
    child.url = url.rstrip("/")
    return child


def _dump_yaml(data):
    try:
        import yaml
    except ImportError:
        return json.dumps(data, indent=2)  # JSON is YAML
    return yaml.safe_dump(data, sort_keys=False)


# Keys beyond the essentials; one that the gateway in this checkout rejects
# is dropped (and said so) rather than failing the run.
OPTIONAL_KEYS = [("rate_limit",), ("metrics",), ("access_log",), ("storage",), ("limits", "max_queue"), ("limits",)]


def _drop(config, path):
    node = config
    for key in path[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return False
    return node.pop(path[-1], None) is not None


class Gateway:
    """
    The gateway in front of C{backend_url}.  The first one's config is
    validated with C{clawdbot check-config} and its token minted with
    C{clawdbot token}; later ones (C{like=} an earlier one) reuse both, with
    only the backend and the file names changed.  C{extra}: top-level
    sections added to this one's config only (as C{tracing}).
    """

    count = 0

    def __init__(self, backend_url, tmp, max_connections, notes, like=None, extra=None):
        Gateway.count += 1
        self.name = name = f"gateway-{Gateway.count}"
        self.tmp = tmp
        if like is None:
            alphabet = string.ascii_letters + string.digits
            secret = "".join(secrets.choice(alphabet) for _ in range(48))
            config = {
                "server": {"mode": "production", "listen": "tcp:0:interface=127.0.0.1"},
                "backend": {"url": backend_url},
                "auth": {
                    "jwt": {
                        "secret": secret,
                        "issuer": "https://bench.clawdbot.invalid",
                        "audience": "clawdbot-bench",
                        "algorithms": ["HS256"],
                    }
                },
                "max_connections": max_connections,
                "limits": {"max_queue": 10000},
                "rate_limit": {"requests_per_minute": 0},
                "log": {"level": "warn"},
                # Not in the way of the measurement: history in a throw-away
                # file, the access log (default sample rate) to a file rather
                # than this process's pipe, metrics on a loopback port.
                "storage": {"path": os.path.join(tmp, f"{name}.sqlite3")},
                "access_log": {"path": os.path.join(tmp, f"{name}-access.log")},
                "metrics": {"listen": "tcp:0:interface=127.0.0.1"},
            }
        else:
            config = json.loads(json.dumps(like.base))
            config["backend"]["url"] = backend_url
            config["max_connections"] = max_connections
            if "storage" in config:
                config["storage"]["path"] = os.path.join(tmp, f"{name}.sqlite3")
            if "access_log" in config:
                config["access_log"]["path"] = os.path.join(tmp, f"{name}-access.log")
        config.update(extra or {})
        self.config_path = os.path.join(tmp, f"{name}.yaml")
        if like is None:
            self._write_checked(config, notes)
        else:
            self._write(config)
        self.config = config
        # What a later gateway (C{like=} this one) copies: without C{extra}.
        self.base = {k: v for k, v in json.loads(json.dumps(config)).items() if k not in (extra or {})}
        self.child = Child(name, [PY, "-m", "clawdbot", "start", "--config", self.config_path])
        self.url = self.child.expect(r"Gateway listening on (http://\S+)", 60).group(1).rstrip("/")
        self.pid = self.child.pid
        self.sampler = RSSSampler(self.pid)
        self.sampler.start()
        self.token = self.mint("bench") if like is None else like.token

    def mint(self, sub):
        """A token for C{sub} from C{clawdbot token} (HS256, this config's secret)."""
        out = self._cli("token", "--sub", sub, "--scope", "chat:read chat:write", "--ttl", "6h")
        if out.returncode != 0 or not out.stdout.strip():
            raise BenchError(f"clawdbot token failed: {out.stderr.strip()}")
        return out.stdout.strip().splitlines()[-1]

    def _cli(self, *args):
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run(
            [PY, "-m", "clawdbot", *args, "--config", self.config_path],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, start_new_session=True,
        )

    def _write(self, config):
        with open(self.config_path, "w") as f:
            os.chmod(self.config_path, 0o600)
            f.write(_dump_yaml(config))

    def _write_checked(self, config, notes):
        for _ in range(len(OPTIONAL_KEYS) + 1):
            self._write(config)
            out = self._cli("check-config")
            if out.returncode == 0:
                return
            error = out.stderr.strip()
            for path in OPTIONAL_KEYS:
                if ".".join(path) in error and _drop(config, path):
                    note = f"config key {'.'.join(path)} left out: the gateway said {error.splitlines()[-1]!r}"
                    if note not in notes:
                        notes.append(note)
                    break
            else:
                raise BenchError(f"the gateway rejects the bench config: {error}")
        raise BenchError("the gateway rejects the bench config")

    def stop(self):
        self.sampler.stop()
        self.child.stop(grace=10.0)


# ---------------------------------------------------------------------------
# Targets and load generators
# ---------------------------------------------------------------------------


class Target:
    """Where requests go: C{direct} (the fake's /api/chat) or C{gateway}."""

    def __init__(self, kind, url, pid, token=None):
        self.kind = kind
        self.url = url
        self.pid = pid
        rest = url.split("://", 1)[1]
        host, port = rest.split("/", 1)[0].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.token = token
        if kind == "direct":
            self.path = "/api/chat"
            self.stream_mode = "ndjson"
        else:
            self.path = "/v1/chat/completions"
            self.stream_mode = "sse"

    def body(self, stream):
        # The same chat, in each API's words: one user message, default
        # options.  Ollama streams unless told not to; OpenAI the opposite.
        return json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": stream},
            separators=(",", ":"),
        )

    def auth(self):
        return f"Bearer {self.token}" if self.token else ""

    def raw_request(self, stream):
        body = self.body(stream).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\n"
            + (f"Authorization: {self.auth()}\r\n" if self.token else "")
            + f"Content-Length: {len(body)}\r\n\r\n"
        )
        return (head.encode() + body).decode("latin-1")


class Spread:
    """
    Several gateway instances of one config, measured as one: the load
    generator's connections go to them in turn (round-robin per connection).
    """

    def __init__(self, targets):
        self.targets = list(targets)
        n = len(self.targets)
        self.kind = f"{n} gateway" + ("s" if n > 1 else "")


def _create_key(url, token):
    """An API key for the token's user, from POST /v1/keys."""
    request = urllib.request.Request(
        url + "/v1/keys", method="POST", data=json.dumps({"name": "bench"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["key"]


def _usage_requests(url, token):
    """The model calls /v1/usage counted for the token's user."""
    request = urllib.request.Request(url + "/v1/usage", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return sum(row["requests"] for row in json.load(response)["data"])


def start_sink():
    """bench/otlp_sink.py on a free loopback port: the collector of the tracing scenario."""
    child = Child("otlp-sink", [PY, OTLP_SINK, "--host", "127.0.0.1", "--port", "0"])
    child.url = child.expect(r"OTLP sink listening on (http://\S+)", 60).group(1).rstrip("/")
    return child


def sink_counts(sink):
    """What the sink has taken: C{{"exports": N, "spans": N, "bad": N}}."""
    with urllib.request.urlopen(sink.url + "/count", timeout=30) as response:
        return json.load(response)


def metrics_url(gw, timeout=10.0):
    """The gateway's metrics URL, from its "Metrics listening on" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(gw.child.out_tail):
            m = re.search(r"Metrics listening on (http://\S+)", line)
            if m:
                return m.group(1).rstrip("/") + "/metrics"
        time.sleep(0.1)
    return None


def scrape(url):
    """
    From the gateway's /metrics: the chat completions served (any status),
    the spans dropped (queue full) and the exports that failed; C{None}
    for what it does not show.
    """
    out = {"requests": None, "dropped": None, "failed": None}
    if url is None:
        return out
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("clawdbot_requests_total{") and 'route="chat_completions"' in line:
            out["requests"] = (out["requests"] or 0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("clawdbot_trace_spans_dropped_total "):
            out["dropped"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("clawdbot_trace_exports_failed_total "):
            out["failed"] = float(line.rsplit(" ", 1)[1])
    return out


def _record_cost_us(n=100_000):
    """Microseconds one UsageBook.record takes (in this process, on the checkout's code)."""
    sys.path.insert(0, ROOT)
    from clawdbot.auth.identity import Principal
    from clawdbot.storage.usage import UsageBook

    class _Clock:
        def seconds(self):
            return time.time()

    book = UsageBook(None, _Clock())
    principal = Principal("bench", frozenset({"chat:write"}), teams=("t",), issuer="https://bench.clawdbot.invalid", key_id="key_0123456789abcdef")
    usage = {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28}
    started = time.perf_counter()
    for _ in range(n):
        book.record(principal, "qwen3:32b", usage, False, 0.001)
    return (time.perf_counter() - started) / n * 1e6


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def system_busy_seconds():
    """CPU seconds all CPUs spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


class CPUWatch:
    """
    CPU used (in cores) by the fake, the gateway and the whole machine over a
    window.  A party may be several processes (a tuple of pids, as several
    gateway instances): its CPU is their sum, and L{parts} has each one's.
    """

    def __init__(self, pids):
        self.pids = {k: v if isinstance(v, tuple) else (v,) for k, v in pids.items() if v}
        self.t0 = time.monotonic()
        self.c0 = {k: [proc_cpu_seconds(p) for p in ps] for k, ps in self.pids.items()}
        self.busy0 = system_busy_seconds()

    def cores(self):
        elapsed = max(1e-6, time.monotonic() - self.t0)
        out = {}
        self.seconds = {}  # CPU seconds each party used over the window
        self.parts = {}  # for a party of several processes, each one's cores
        for k, ps in self.pids.items():
            now = [proc_cpu_seconds(p) for p in ps]
            if None not in now and None not in self.c0[k]:
                used = [b - a for a, b in zip(self.c0[k], now)]
                self.seconds[k] = sum(used)
                out[k] = sum(used) / elapsed
                if len(used) > 1:
                    self.parts[k] = [u / elapsed for u in used]
        busy = system_busy_seconds()
        if busy is not None and self.busy0 is not None:
            out["machine"] = (busy - self.busy0) / elapsed
        return out


def cpu_per_chunk(result, who):
    """Microseconds of C{who}'s CPU (C{fake} or C{gateway}) per streamed chunk the clients received, or C{None}."""
    if not result or not result.get("chunks") or (result.get("cpu_s") or {}).get(who) is None:
        return None
    return result["cpu_s"][who] / result["chunks"] * 1e6


def _other_cpu(cpu):
    """What the rest of the machine used: the machine's busy time less ours."""
    if "machine" not in cpu:
        return None
    ours = sum(v for k, v in cpu.items() if k in ("fake", "gateway", "load generator"))
    return max(0.0, cpu["machine"] - ours)


def loadgen_spec(target, stream, **extra):
    """
    What a bench/loadgen.py worker is told to send to C{target} (see its
    C{main}), a L{Target} or a L{Spread} of them.
    """
    targets = getattr(target, "targets", None) or [target]
    first = targets[0]
    spec = {
        "host": first.host,
        "port": first.port,
        "mode": first.stream_mode if stream else "plain",
        "request": first.raw_request(stream),
        "connect_parallel": 64,
        **extra,
    }
    if len(targets) > 1:
        spec["targets"] = [{"host": t.host, "port": t.port, "request": t.raw_request(stream)} for t in targets]
    return spec


def run_loadgen(target, stream, connections, duration, grace, procs, cpu_pids, label, stagger=0.0):
    """
    Run bench/loadgen.py in C{procs} processes with C{connections} in all,
    for C{duration} seconds; returns the aggregate.  With C{stagger}, the
    connections' first requests are spread evenly over that many seconds.
    """
    procs = max(1, min(procs, connections))
    shares = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    spec = loadgen_spec(target, stream, stagger=stagger, total=connections)
    workers = []
    try:
        for i, share in enumerate(shares):
            w = Child(f"loadgen {label} #{i}", [PY, LOADGEN], stdin=True)
            workers.append(w)
            w.send(json.dumps(dict(spec, connections=share, index0=sum(shares[:i]))))
        for w in workers:
            w.expect(r"^ready$", 120)
        start = time.monotonic() + 0.05
        deadline = start + duration
        hard_stop = deadline + grace
        watch = CPUWatch(cpu_pids)
        for w in workers:
            w.send(f"go {start!r} {deadline!r} {hard_stop!r}")
        results = []
        for w in workers:
            m = w.expect(r"^result (.*)$", duration + grace + 60)
            results.append(json.loads(m.group(1)))
        cpu = watch.cores()
        for w in workers:
            w.wait(30)
    finally:
        for w in workers:
            w.stop(grace=2.0)
    errors = collections.Counter()
    latencies, ttfts = [], []
    completed, connected, last_end, client_cpu, rate, chunks = 0, 0, start, 0.0, 0.0, 0
    for r in results:
        # Each connection is a closed loop that starts nothing after the
        # deadline: its rate is what it completed over the time from its
        # first start to its last completion; the total is their sum.
        for done, first_start, its_last_end in r["per_connection"]:
            if its_last_end > first_start:
                rate += done / (its_last_end - first_start)
        errors.update(r["errors"])
        latencies += r["latency_us"]
        ttfts += r["ttft_us"]
        completed += r["completed"]
        connected += r["connected"]
        last_end = max(last_end, r["last_end"])
        client_cpu += r["cpu"]
        chunks += r.get("chunks", 0)
    cpu["load generator"] = client_cpu / max(last_end - start, 1e-6)
    return {
        "tool": "loadgen.py",
        "completed": completed,
        "connected": connected,
        "rate": rate,
        "p50": _ms(percentile(latencies, 50)),
        "p99": _ms(percentile(latencies, 99)),
        "ttft_p50": _ms(percentile(ttfts, 50)),
        "ttft_p99": _ms(percentile(ttfts, 99)),
        "errors": dict(errors),
        "cpu": cpu,
        "cpu_s": watch.seconds,
        "cpu_parts": watch.parts,
        "chunks": chunks,
    }


def summarise_two_users(label, raw):
    """
    Each client's TTFT (s) and streams from L{run_two_users}'s results, the
    greedy client's rate, and the slot turnover: the median length of the
    greedy streams from first content to end.
    """
    g, i = raw["greedy"], raw["interactive"]
    held = [(lat - ttft) / 1e6 for lat, ttft in zip(g["latency_us"], g["ttft_us"])]
    span = g["last_end"] - g["start"]

    def client(r, cut):
        errors = dict(r["errors"])
        if cut:
            errors.pop("aborted at hard stop", None)
        ttfts = [us / 1e6 for us in r["ttft_us"]]
        return {"streams": r["completed"], "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
                "errors": errors}

    greedy = client(g, cut=True)
    greedy["rate"] = g["completed"] / span if span > 0 else None
    return {"label": label, "turnover_s": statistics.median(held) if held else None,
            "greedy": greedy, "interactive": client(i, cut=False)}


def _s(seconds):
    return "-" if seconds is None else f"{seconds:.3f}"


def markdown_table(head, rows):
    """A markdown table, the first column left-aligned and the others right."""
    n = len(head)
    widths = [max(len(r[i]) for r in list(rows) + [head]) for i in range(n)]
    lines = ["| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(head)) + " |",
             "|" + "|".join("-" * (widths[i] + 2) if i == 0 else "-" * (widths[i] + 1) + ":" for i in range(n)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(n))
                     + " |")
    return "\n".join(lines)


def run_two_users(greedy, interactive, streams, think, ramp, duration, tail, label):
    """
    Two clients of one gateway, each a bench/loadgen.py worker: the greedy
    one keeps C{streams} streams going back to back from the start; the
    interactive one starts C{ramp} seconds later (the greedy streams are
    queued by then) and asks one stream at a time, C{think} seconds apart,
    starting none after C{duration} more seconds.  The greedy client keeps
    the backend saturated until the interactive one's last answer is in,
    and is then stopped; C{tail} bounds that wait.  Returns each worker's
    result.
    """
    specs = {
        "greedy": loadgen_spec(greedy, True, connections=streams),
        "interactive": loadgen_spec(interactive, True, connections=1, think=think),
    }
    workers = {}
    try:
        for who, spec in specs.items():
            workers[who] = Child(f"loadgen {label} {who}", [PY, LOADGEN], stdin=True)
            workers[who].send(json.dumps(spec))
        for w in workers.values():
            w.expect(r"^ready$", 120)
        start = time.monotonic() + 0.05
        deadline = start + ramp + duration
        hard_stop = deadline + tail
        workers["greedy"].send(f"go {start!r} {hard_stop!r} {hard_stop!r}")
        workers["interactive"].send(f"go {start + ramp!r} {deadline!r} {hard_stop!r}")
        results = {"interactive": _worker_result(workers["interactive"], hard_stop)}
        workers["greedy"].send("stop")
        results["greedy"] = _worker_result(workers["greedy"], hard_stop)
        for w in workers.values():
            w.wait(30)
    finally:
        for w in workers.values():
            w.stop(grace=2.0)
    return results


def _worker_result(worker, hard_stop):
    m = worker.expect(r"^result (.*)$", max(0.0, hard_stop - time.monotonic()) + 60)
    return json.loads(m.group(1))


def _ms(us):
    return None if us is None else us / 1000.0


def run_wrk(target, connections, duration, cpu_pids, label):
    env = {"BENCH_BODY": target.body(False), "BENCH_AUTH": target.auth()}
    argv = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, int(round(duration)))}s", "--timeout", "10s",
        "--latency", "-s", WRK_SCRIPT, target.url + target.path,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    watch = CPUWatch(cpu_pids)
    w = Child(f"wrk {label}", argv, env=env)
    try:
        m = w.expect(r"BENCH_RESULT (.*)$", duration + 60)
        cpu = watch.cores()
        w.wait(30)
    finally:
        w.stop(grace=2.0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    fields = dict(kv.split("=", 1) for kv in m.group(1).split())
    n = int(fields["requests"])
    seconds = int(fields["duration_us"]) / 1e6
    cpu["load generator"] = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / max(seconds, 1e-6)
    errors = {k: int(fields[k]) for k in ("connect", "read", "write", "status", "timeout") if int(fields[k])}
    return {
        "tool": "wrk",
        "completed": n,
        "rate": n / seconds if seconds else 0.0,
        "p50": int(fields["p50_us"]) / 1000.0,
        "p99": int(fields["p99_us"]) / 1000.0,
        "errors": {f"wrk {k}": v for k, v in errors.items()},
        "cpu": cpu,
    }


# ---------------------------------------------------------------------------
# py-spy
# ---------------------------------------------------------------------------


def find_py_spy():
    if os.environ.get("PY_SPY") and os.access(os.environ["PY_SPY"], os.X_OK):
        return os.environ["PY_SPY"]
    local = os.path.join(os.path.dirname(PY), "py-spy")
    return local if os.access(local, os.X_OK) else shutil.which("py-spy")


# The frames every busy sample of the reactor thread runs under: left out
# of the inclusive lists, which would otherwise start with them at ~100%.
_TRUNK = re.compile(
    r"^(_run_module_as_main|_run_code) \(<frozen runpy>\)$"
    r"|^<module> \(.*clawdbot/__main__\.py\)$"
    r"|^(main|run|_start) \(.*clawdbot/cli\.py\)$"
    r"|^ReactorBase\.(run|mainLoop) \("
    r"|^\w*Reactor\.do(Poll|Select|Iteration) \("
    r"|^(callWithLogger|callWithContext) \(.*twisted/python/log\.py\)$"
    r"|^\w*ContextTracker\.callWithContext \("
    r"|^_PollLikeMixin\._doReadOrWrite \("
)


def summarise_profile(raw_path, top=12):
    """
    From py-spy's collapsed stacks: the reactor thread's busy samples
    (threads of Twisted's pool waiting for work and the reactor waiting in
    epoll are left out), with self time per file and per function and
    inclusive time per function.
    """
    self_time = collections.Counter()
    inclusive = collections.Counter()
    by_file = collections.Counter()
    total = idle = other_threads = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            if "Thread._bootstrap" in stack:
                other_threads += n
                continue
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";") if fr.strip()]
            leaf = frames[-1]
            if leaf.startswith(("EPollReactor.doPoll ", "PollReactor.doPoll ", "SelectReactor.doSelect ")):
                idle += n
                continue
            self_time[leaf] += n
            m = re.search(r"\(([^()]*)\)$", leaf)
            by_file[_short_path(m.group(1)) if m else leaf] += n
            for fr in set(frames):
                if not _TRUNK.match(fr):
                    inclusive[fr] += n
    busy = total - idle - other_threads
    ours = [(fr, n) for fr, n in inclusive.most_common() if "clawdbot/" in fr]
    return {
        "total": total,
        "idle": idle,
        "busy": busy,
        "by_file": by_file.most_common(top),
        "self": self_time.most_common(top),
        "clawdbot": ours[:top],
        "inclusive": inclusive.most_common(top + 8),
    }


def _short_path(path):
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.replace(ROOT + "/", "")


def _short_frame(frame):
    m = re.match(r"^(.*) \((.*)\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({_short_path(m.group(2))})"


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.results = collections.OrderedDict()
        self.rss = collections.OrderedDict()
        self.notes = []
        self.profiles = []  # (what was measured, its result, the summary)
        self.first_gateway = None
        self.shared_gpu = collections.OrderedDict()
        self.shared_gpu_s = None
        self.keys_results = {}
        self.instances = collections.OrderedDict()  # "several instances": {key: {kind: result}}
        self.instances_s = None
        self.tracing = collections.OrderedDict()  # "tracing": {key: {variant: result}}
        self.tracing_s = None
        self.gateway_messages = collections.Counter()
        self.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
        self.wrk = None if args.no_wrk else shutil.which("wrk")
        if not self.wrk and not args.fair_only and not args.chunk_only and not args.instances_only:
            self.notes.append(
                "wrk not used" + (" (--no-wrk)" if args.no_wrk else f": not installed (`{WRK_INSTALL}` as root)")
                + "; non-streaming throughput measured with bench/loadgen.py instead"
            )

    def procs_for(self, connections):
        return 1 if connections == 1 else self.args.client_procs

    def measure(self, key, target, stream, connections, duration, grace, cpu_pids, warmup=None, stagger=0.0,
                wrk=True):
        """
        One measurement (after its warm-up) of C{target}; returns its result.
        Non-streaming goes through wrk when there is one, unless C{wrk} is
        false (as for a L{Spread}, which wrk cannot drive).
        """
        label = f"{key} {target.kind}"
        warmup = self.args.warmup if warmup is None else warmup
        use_wrk = self.wrk and wrk and not stream
        procs = self.procs_for(connections)
        say(f"bench: {label} (c={connections}, {duration:g}s after {warmup:g}s warm-up) ...")
        PHASE["now"] = label + " warm-up"
        if warmup > 0:
            if use_wrk:
                w = run_wrk(target, connections, warmup, cpu_pids, label + " warm-up")
            else:
                w = run_loadgen(target, stream, connections, warmup, grace, procs, cpu_pids, label + " warm-up", stagger)
            time.sleep(0.1)  # what the end of the run makes the gateway log is still the warm-up's
            if not w["completed"]:
                raise BenchError(f"{label}: not one request succeeded in the warm-up (errors: {w['errors']})")
            if w["errors"]:
                self.notes.append(f"{label} warm-up (not in the table): errors {w['errors']}")
        PHASE["now"] = label
        if use_wrk:
            r = run_wrk(target, connections, duration, cpu_pids, label)
        else:
            r = run_loadgen(target, stream, connections, duration, grace, procs, cpu_pids, label, stagger)
        r["connections"] = connections
        time.sleep(0.1)
        PHASE["now"] = f"just after {label}"
        extra = f", TTFT p50 {r['ttft_p50']:.2f} ms" if stream and r.get("ttft_p50") is not None else ""
        p50 = f"{r['p50']:.2f} ms" if r.get("p50") is not None else "-"
        say(f"bench:   {r['rate']:.1f}/s, p50 {p50}{extra}, errors {sum(r['errors'].values())}")
        return r

    def compare(self, key, setups, *args, into=None, **kwargs):
        """
        Measure each target C{--repeat} times, alternating between them, and
        keep for each the run with the median rate (a whole run, so that its
        numbers stay consistent with one another).

        @param setups: C{{kind: () -> (target, pids, done)}}: what to measure
            and, once measured, C{done()} to stop what was started for it.
        @param into: where the results go (C{{key: {kind: result}}}; the
            side-by-side table's by default).
        """
        runs = {kind: [] for kind in setups}
        for _ in range(self.args.repeat):
            for kind, setup in setups.items():
                target, pids, done = setup()
                try:
                    runs[kind].append(self.measure(key, target, *args, cpu_pids=pids, **kwargs))
                finally:
                    done()
        pair = (self.results if into is None else into).setdefault(key, {})
        for kind, rs in runs.items():
            ordered = sorted(rs, key=lambda r: r["rate"])
            pair[kind] = ordered[(len(ordered) - 1) // 2]
            if len(rs) > 1:
                pair[kind]["rates"] = [round(r["rate"], 1) for r in rs]

    # Processes for the unpaced scenarios are started afresh for each
    # measurement: the fake Ollama keeps a record of every request it
    # serves (it is the tests' fake), and a fake that has served tens of
    # thousands has long garbage-collection pauses, which would show up in
    # the p99 of whichever measurement came later.

    def fresh_direct(self, tokens=None):
        fake = start_fake("fake-ollama", "--tokens", str(tokens or self.args.tokens))
        return Target("direct", fake.url, fake.pid), {"fake": fake.pid}, fake.stop

    def fresh_gateway(self, tokens=None):
        fake = start_fake("fake-ollama", "--tokens", str(tokens or self.args.tokens))
        try:
            gw = self.start_gateway(fake.url)
        except BaseException:
            fake.stop()
            raise
        gw.sampler.begin("unpaced")

        def done():
            try:
                self.stop_gateway(gw)
                peak = gw.sampler.peaks.get("unpaced")
                key = "peak, unpaced scenarios"
                if peak is not None:
                    self.rss[key] = max(self.rss.get(key) or 0, peak)
            finally:
                fake.stop()

        return Target("gateway", gw.url, gw.pid, gw.token), {"fake": fake.pid, "gateway": gw.pid}, done

    def start_gateway(self, backend_url, extra=None):
        a = self.args
        gw = Gateway(backend_url, self.tmp, max(1000, a.full_streams, max(a.concurrency)), self.notes,
                     like=self.first_gateway, extra=extra)
        if self.first_gateway is None:
            self.first_gateway = gw
            time.sleep(1.0)
            self.rss["idle"] = proc_rss_kb(gw.pid)
        return gw

    def stop_gateway(self, gw):
        gw.stop()
        if gw.child.err_count:
            for (phase, message), n in gw.child.err_messages.items():
                self.gateway_messages[(phase, message)] += n

    def run(self):
        a = self.args
        if a.fair_only:
            self.two_users_scenario()
            return
        if a.keys_only:
            self.keys_scenario()
            return
        if a.instances_only:
            self.instances_scenario()
            return
        if a.tracing_only:
            self.tracing_scenario()
            return
        self.rss["idle"] = None
        if not a.chunk_only:
            self.rss["peak, unpaced scenarios"] = None
        unpaced = {"direct": self.fresh_direct, "gateway": self.fresh_gateway}
        # -- unpaced: non-streaming and streaming at each concurrency --------
        for c in [] if a.chunk_only else a.concurrency:
            self.compare(f"plain c={c}", unpaced, False, c, a.duration, 10.0)
        for c in [] if a.chunk_only else a.concurrency:
            self.compare(f"stream c={c}", unpaced, True, c, a.duration, 10.0)
        if not a.no_chunk_cost:
            # The burst figure for "CPU per streamed chunk": replies as long
            # as the paced ones, each arriving whole (all its lines in one read).
            burst = {"direct": lambda: self.fresh_direct(a.paced_tokens),
                     "gateway": lambda: self.fresh_gateway(a.paced_tokens)}
            self.compare("chunk burst", burst, True, a.chunk_burst_concurrency, a.duration, 10.0)
        if a.profile and not a.chunk_only:
            target, pids, done = self.fresh_gateway()
            try:
                self.run_profile(target, pids)
            finally:
                done()

        # -- paced: issue 10's 50 streams of 64 tokens 20 ms apart ----------
        # One fake and one gateway for both paced scenarios (at ~40 streams/s
        # the fake's records stay few).
        fake = start_fake("fake-ollama-paced", *self.paced_fake_args())
        gw = self.start_gateway(fake.url)
        paced = {
            "direct": lambda: (Target("direct", fake.url, fake.pid), {"fake": fake.pid}, lambda: None),
            "gateway": lambda: (Target("gateway", gw.url, gw.pid, gw.token), {"fake": fake.pid, "gateway": gw.pid}, lambda: None),
        }
        stream_s = (a.paced_tokens - 1) * a.pace_ms / 1000.0
        grace = max(30.0, 10 * stream_s)
        stagger = 0.0 if a.paced_burst else stream_s
        gw.sampler.begin("paced")
        self.compare("paced", paced, True, a.paced_streams, max(a.duration, 4 * stream_s), grace,
                     warmup=max(a.warmup, 2 * stream_s) if a.warmup else 0, stagger=stagger)
        self.rss[f"peak, paced {a.paced_streams}"] = gw.sampler.peaks.get("paced")
        if not a.no_chunk_cost:
            # "CPU per streamed chunk at a realistic pace" (issue 21): each
            # token in its own read, so the gateway's per-read work counts
            # once per token, as it does in front of a real model.
            gw.sampler.begin("chunk paced")
            self.compare("chunk paced", paced, True, a.chunk_streams, max(a.duration, 4 * stream_s), grace,
                         warmup=max(a.warmup, 2 * stream_s) if a.warmup else 0, stagger=stagger)
            self.rss[f"peak, paced {a.chunk_streams}"] = gw.sampler.peaks.get("chunk paced")
            if a.profile:
                target, pids, _ = paced["gateway"]()
                self.run_profile(target, pids, paced=True)
        if a.full and not a.chunk_only:
            gw.sampler.begin("full")
            self.compare("full", paced, True, a.full_streams, max(a.full_duration, 4 * stream_s),
                         max(60.0, grace), warmup=0, stagger=stagger)
            self.rss[f"peak, {a.full_streams} streams"] = gw.sampler.peaks.get("full")
        self.stop_gateway(gw)
        fake.stop()
        if not a.no_keys and not a.chunk_only:
            self.keys_scenario()
        if not a.no_instances and not a.chunk_only:
            self.instances_scenario()
        if not a.no_tracing and not a.chunk_only:
            self.tracing_scenario()
        if not a.no_fair and not a.chunk_only:
            self.two_users_scenario()

    def paced_fake_args(self):
        """
        The paced fake's options.  It writes each line as its own chunk in a
        write of its own, so the gateway reads one line per read as from
        Ollama; with C{--lockstep} all streams' lines come on one shared
        clock, as from a batched decoder (see bench/README.md).
        """
        a = self.args
        return ("--pace-ms", f"{a.pace_ms:g}", "--tokens", str(a.paced_tokens)) + (("--lockstep",) if a.lockstep else ())

    def keys_scenario(self):
        """
        Issue 17: non-streaming calls at concurrency 10 through one gateway
        with the JWT and with an API key of the same user (usage accounting
        on for both, as always), at least three rounds, median kept.  Each
        round has a fresh fake and gateway (the fake keeps every request it
        serves and slows down as they pile up) and alternates which goes
        first, so that neither kind always meets the fuller process; then
        what /v1/usage counted against what the load generators completed.
        """
        a = self.args
        runs = {"JWT": [], "API key": []}
        completed = counted = 0
        for round_ in range(max(3, a.repeat)):
            fake = start_fake("fake-ollama-keys", "--tokens", str(a.tokens))
            gw = self.start_gateway(fake.url)
            pids = {"fake": fake.pid, "gateway": gw.pid}
            try:
                key = _create_key(gw.url, gw.token)
                targets = [("JWT", Target("gateway", gw.url, gw.pid, gw.token)), ("API key", Target("gateway", gw.url, gw.pid, key))]
                if round_ % 2:
                    targets.reverse()
                for kind, target in targets:
                    r = self.measure(f"keys c=10 {kind}", target, False, 10, a.duration, 10.0, pids)
                    runs[kind].append(r)
                    completed += r.get("completed", 0)
                time.sleep(0.2)
                counted += _usage_requests(gw.url, gw.token)
            finally:
                self.stop_gateway(gw)
                fake.stop()
        for kind, rs in runs.items():
            ordered = sorted(rs, key=lambda r: r["rate"])
            self.keys_results[kind] = dict(ordered[(len(ordered) - 1) // 2], rates=[round(r["rate"], 1) for r in rs])
        self.keys_results["usage"] = counted
        self.keys_results["completed"] = completed
        self.keys_results["record_us"] = _record_cost_us()

    def keys_report(self):
        """The API key table: a list of lines."""
        r = self.keys_results
        if "JWT" not in r:
            return []
        jwt, key = r["JWT"], r["API key"]
        rows = []
        for kind, m in (("JWT", jwt), ("API key", key)):
            rows.append((kind, f"{m['rate']:.0f}", f"{m['p50']:.2f}" if m.get("p50") is not None else "-",
                         f"{m['p99']:.2f}" if m.get("p99") is not None else "-",
                         " / ".join(f"{x:g}" for x in m["rates"]), f"{m['rate'] / jwt['rate']:.3f}"))
        return [
            "",
            "### API keys and usage accounting (issue 17)",
            "",
            markdown_table(("credential, non-streaming c=10", "req/s", "p50 (ms)", "p99 (ms)", "runs (req/s)", "vs JWT"), rows),
            "",
            f"The same user's JWT and API key through one gateway, {len(jwt['rates'])} rounds (a fresh fake and gateway "
            "each, the first kind alternating), median kept; every call counted by the usage accounting in both. "
            f"/v1/usage counted {r.get('usage')} model calls; the load generators completed {r.get('completed')} "
            "outside the warm-ups (which /v1/usage counts too). Counting one call in memory costs "
            f"{r.get('record_us', 0):.1f} µs (UsageBook.record, measured in this process).",
        ]

    def gateways(self, backend_url, n):
        """
        C{n} gateway instances of one config in front of C{backend_url}, each
        its own process on its own port: a L{Spread} of all of them, and the
        gateways (stopped again if one does not start).
        """
        gws = []
        try:
            for _ in range(n):
                gws.append(self.start_gateway(backend_url))
        except BaseException:
            for gw in gws:
                self.stop_gateway(gw)
            raise
        return gws

    @staticmethod
    def spread(gws):
        """The setup of a measurement of C{gws} (see L{compare}), with nothing to stop."""
        target = Spread(Target("gateway", gw.url, gw.pid, gw.token) for gw in gws)
        return target, {"gateway": tuple(gw.pid for gw in gws)}, lambda: None

    def instances_scenario(self):
        """
        Issue 21's "several cores": the same load through one gateway and
        through C{--instances} gateways of the same config (each its own
        process and port) in front of one fake, the load generator's
        connections spread round-robin over them; bench/loadgen.py for both,
        non-streaming too, so that one and several are measured alike.
        Non-streaming at c=50 with a fresh fake and fresh gateways for each
        measurement (the fake slows down as its records pile up), then
        C{--chunk-streams} paced streams through one paced fake and one set
        of gateways (the single instance is the first of them).
        """
        a = self.args
        n = a.instances
        started = time.monotonic()
        multi = f"{n} gateways"

        def fresh(k):
            def setup():
                fake = start_fake("fake-ollama-instances", "--tokens", str(a.tokens))
                try:
                    gws = self.gateways(fake.url, k)
                except BaseException:
                    fake.stop()
                    raise
                target, pids, _ = self.spread(gws)

                def done():
                    try:
                        for gw in gws:
                            self.stop_gateway(gw)
                    finally:
                        fake.stop()

                return target, dict(pids, fake=fake.pid), done
            return setup

        c = INSTANCES_CONCURRENCY
        self.compare(f"instances plain c={c}", {"1 gateway": fresh(1), multi: fresh(n)}, False, c, a.duration, 10.0,
                     into=self.instances, wrk=False)
        stream_s = (a.paced_tokens - 1) * a.pace_ms / 1000.0
        fake = start_fake("fake-ollama-instances-paced", *self.paced_fake_args())
        try:
            gws = self.gateways(fake.url, n)
            try:
                def paced(k):
                    def setup():
                        target, pids, done = self.spread(gws[:k])
                        return target, dict(pids, fake=fake.pid), done
                    return setup

                self.compare("instances paced", {"1 gateway": paced(1), multi: paced(n)}, True, a.chunk_streams,
                             max(a.duration, 4 * stream_s), max(30.0, 10 * stream_s),
                             warmup=max(a.warmup, 2 * stream_s) if a.warmup else 0,
                             stagger=0.0 if a.paced_burst else stream_s, into=self.instances)
            finally:
                for gw in gws:
                    self.stop_gateway(gw)
        finally:
            fake.stop()
        self.instances_s = time.monotonic() - started

    def instances_report(self):
        """The "several instances" table and how to read it: a list of lines."""
        a = self.args
        if not self.instances:
            return []
        cores = lambda v: "-" if v is None else f"{v:.2f}"
        ms = lambda v: "-" if v is None else (f"{v:,.3f}" if v < 10 else f"{v:,.1f}")
        paced = f"paced {a.chunk_streams}×{a.paced_tokens} tok @{a.pace_ms:g} ms" + (" lockstep" if a.lockstep else "")
        rows = []
        for key, what, stream in ((f"instances plain c={INSTANCES_CONCURRENCY}",
                                   f"non-streaming c={INSTANCES_CONCURRENCY}", False),
                                  ("instances paced", paced, True)):
            pair = self.instances.get(key) or {}
            one = (pair.get("1 gateway") or {}).get("rate")
            for kind, r in pair.items():
                rate = r["rate"]
                errors = sum(r["errors"].values())
                cpu = r["cpu"]
                parts = (r.get("cpu_parts") or {}).get("gateway")
                gateway_cpu = cores(cpu.get("gateway")) + (
                    " (" + " + ".join(f"{x:.2f}" for x in parts) + ")" if parts else "")
                per_chunk = cpu_per_chunk(r, "gateway") if stream else None
                rows.append((
                    f"{what}, {kind}",
                    (f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}") + (f" ({errors} errors)" if errors else ""),
                    f"×{rate / one:.2f}" if one else "-",
                    ms(r.get("ttft_p50" if stream else "p50")), ms(r.get("ttft_p99" if stream else "p99")),
                    gateway_cpu, "-" if per_chunk is None else f"{per_chunk:,.1f}",
                    cores(cpu.get("fake")), cores(cpu.get("load generator")), cores(_other_cpu(cpu)),
                ))
                if r["errors"]:
                    self.notes.append(f"several instances, {what}, {kind}: errors {r['errors']}")
        head = ("several instances", "requests or streams/s", "vs 1 gateway", "latency or TTFT p50 (ms)",
                "p99 (ms)", "gateways' CPU (cores)", "gateway CPU per chunk (µs)", "fake (cores)",
                "client (cores)", "other processes (cores)")
        took = "" if self.instances_s is None else f" This part took {self.instances_s:.0f} s."
        return [
            "",
            f"### Several instances (issue 21): 1 gateway against {a.instances}",
            "",
            markdown_table(head, rows),
            "",
            f"The same load through one gateway and through {a.instances} gateway processes of the same config (each "
            "its own port, history file and access log) in front of one fake Ollama; bench/loadgen.py for both (also "
            "non-streaming), its connections spread round-robin over the gateways, so that one and several are "
            "measured alike. Non-streaming: a fresh fake and fresh gateways for each row; latency p50/p99. Paced: "
            f"{a.chunk_streams} streams of {a.paced_tokens} tokens {a.pace_ms:g} ms apart (the backend's ceiling "
            f"{a.chunk_streams / ((a.paced_tokens - 1) * a.pace_ms / 1000.0):.0f} streams/s), one fake and one set of "
            "gateways (the single gateway is the first of them); TTFT p50/p99, and the gateways' CPU per SSE event "
            "delivered. Gateways' CPU is their sum, each instance's in brackets. The fake (one Python process) and "
            f"the load generator share this machine's {os.cpu_count()} cores with the gateways, so with several "
            "instances the ceiling is the machine, not the gateway: fake + gateways + client + other processes "
            f"cannot exceed {os.cpu_count()}." + took,
        ]

    def tracing_scenario(self):
        """
        Issue 22's cost of tracing: the same load through a gateway with
        tracing off, on at C{sample_rate} 1.0 and on at 0.01, each with a
        fresh fake and gateway (and, when on, a fresh bench/otlp_sink.py as
        the collector, its own process), C{--repeat} rounds alternating the
        three, median kept: non-streaming at c=10 (wrk when there is one, as
        the side-by-side rows) and streaming at c=10 (bench/loadgen.py).
        After each measurement the gateway is given time to send its last
        batch; then the spans the sink took are set against the chat
        completions the gateway served (warm-up included in both), and the
        gateway's own counts of dropped spans and failed exports are read.
        """
        a = self.args
        started = time.monotonic()
        c = TRACING_CONCURRENCY
        for key, stream in ((f"tracing plain c={c}", False), (f"tracing stream c={c}", True)):
            runs = {kind: [] for kind, _ in TRACING_VARIANTS}
            for _ in range(a.repeat):
                for kind, rate in TRACING_VARIANTS:
                    runs[kind].append(self._traced_measure(f"{key} {kind}", stream, rate))
            pair = self.tracing.setdefault(key, {})
            for kind, rs in runs.items():
                ordered = sorted(rs, key=lambda r: r["rate"])
                pair[kind] = ordered[(len(ordered) - 1) // 2]
                if len(rs) > 1:
                    pair[kind]["rates"] = [round(r["rate"], 1) for r in rs]
        self.tracing_s = time.monotonic() - started

    def _traced_measure(self, label, stream, sample_rate):
        """One measurement of L{tracing_scenario}: its result, with what the sink and /metrics counted."""
        a = self.args
        fake = start_fake("fake-ollama-tracing", "--tokens", str(a.tokens))
        sink = gw = None
        try:
            extra = None
            if sample_rate is not None:
                sink = start_sink()
                extra = {"tracing": {"enabled": True, "endpoint": sink.url + "/v1/traces",
                                     "sample_rate": sample_rate, "service_name": "clawdbot-bench"}}
            gw = self.start_gateway(fake.url, extra=extra)
            pids = {"fake": fake.pid, "gateway": gw.pid}
            if sink is not None:
                pids["sink"] = sink.pid
            r = self.measure(label, Target("gateway", gw.url, gw.pid, gw.token), stream, TRACING_CONCURRENCY,
                             a.duration, 10.0, pids)
            r["sample_rate"] = sample_rate
            if sink is not None:
                # The last spans wait up to the export delay (1 s) for their
                # batch: read the sink once its count has stopped moving.
                time.sleep(1.0)
                counts = sink_counts(sink)
                for _ in range(20):
                    time.sleep(0.5)
                    now = sink_counts(sink)
                    if now == counts:
                        break
                    counts = now
                r["sink"] = counts
            r["metrics"] = scrape(metrics_url(gw))
            return r
        finally:
            try:
                if gw is not None:
                    self.stop_gateway(gw)
            finally:
                if sink is not None:
                    sink.stop()
                fake.stop()

    def tracing_report(self):
        """The "tracing" table and how to read it: a list of lines."""
        if not self.tracing:
            return []
        c = TRACING_CONCURRENCY
        cores = lambda v: "-" if v is None else f"{v:.2f}"
        ms = lambda v: "-" if v is None else (f"{v:,.3f}" if v < 10 else f"{v:,.1f}")
        labels = {"off": "off", "1.0": "on, sample_rate 1.0", "0.01": "on, sample_rate 0.01"}
        rows = []
        cost, cpu_cost = {}, {}
        for key, what, stream in ((f"tracing plain c={c}", f"non-streaming c={c}", False),
                                  (f"tracing stream c={c}", f"streaming c={c}", True)):
            pair = self.tracing.get(key) or {}
            off = (pair.get("off") or {}).get("rate")
            off_cpu = (pair.get("off") or {}).get("cpu", {}).get("gateway")
            off_per_request = off_cpu / off * 1e6 if off and off_cpu is not None else None
            for kind, r in pair.items():
                rate = r["rate"]
                errors = sum(r["errors"].values())
                cpu = r["cpu"]
                other = None
                if "machine" in cpu:
                    other = max(0.0, cpu["machine"] - sum(cpu.get(k) or 0.0 for k in ("fake", "gateway", "load generator", "sink")))
                per_request = cpu["gateway"] / rate * 1e6 if rate and cpu.get("gateway") is not None else None
                sink, metrics = r.get("sink"), r.get("metrics") or {}
                served = metrics.get("requests")
                spans = "-" if sink is None else f"{sink['spans']:,}"
                per = "-" if sink is None or not served else f"{sink['spans'] / served:.3f}"
                dropped = metrics.get("dropped")
                lost = "-" if sink is None or dropped is None else f"{dropped:.0f} / {metrics.get('failed') or 0:.0f}"
                if off and kind != "off":
                    cost[(what, kind)] = rate / off - 1
                    if off_per_request and per_request is not None:
                        cpu_cost[(what, kind)] = per_request / off_per_request - 1
                rows.append((
                    f"{what}, tracing {labels.get(kind, kind)}",
                    (f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}") + (f" ({errors} errors)" if errors else ""),
                    " / ".join(f"{x:.0f}" for x in r["rates"]) if r.get("rates") else "-",
                    f"×{rate / off:.3f}" if off else "-",
                    ms(r.get("ttft_p50" if stream else "p50")), ms(r.get("ttft_p99" if stream else "p99")),
                    cores(cpu.get("gateway")), "-" if per_request is None else f"{per_request:,.0f}",
                    spans, per, lost, cores(cpu.get("sink")), cores(other),
                ))
                if r["errors"]:
                    self.notes.append(f"tracing, {what}, {labels.get(kind, kind)}: errors {r['errors']}")
                if sink is not None and sink.get("bad"):
                    self.notes.append(f"tracing, {what}, {labels.get(kind, kind)}: the sink could not read {sink['bad']} exports")
        head = ("tracing", "requests or streams/s", "runs", "vs off", "latency or TTFT p50 (ms)", "p99 (ms)",
                "gateway CPU (cores)", "gateway CPU per request (µs)", "spans received", "spans per request",
                "spans dropped / exports failed", "sink (cores)", "other processes (cores)")
        if all(row[2] == "-" for row in rows):  # one round each: no runs to show
            head, rows = head[:2] + head[3:], [row[:2] + row[3:] for row in rows]
        pct = lambda v: f"{100 * v:+.1f}%".replace("-", "−")
        def change(what, kind):
            if (what, kind) not in cost:
                return "-"
            return pct(cost[(what, kind)]) + (f" (CPU per request {pct(cpu_cost[(what, kind)])})"
                                              if (what, kind) in cpu_cost else "")

        summary = "; ".join(
            f"{what}: {change(what, '1.0')} at 1.0, {change(what, '0.01')} at 0.01"
            for what in (f"non-streaming c={c}", f"streaming c={c}")
            if (what, "1.0") in cost or (what, "0.01") in cost
        )
        rounds = self.args.repeat
        took = "" if self.tracing_s is None else f" This part took {self.tracing_s:.0f} s."
        return [
            "",
            "### Tracing (issue 22): off, on at sample_rate 1.0 and at 0.01",
            "",
            markdown_table(head, rows),
            "",
            "The same load through a gateway with tracing off and on (OTLP over HTTP to bench/otlp_sink.py, a "
            "collector in its own process that answers 200 and counts the spans), at tracing.sample_rate 1.0 and "
            "0.01; a fresh fake, gateway and sink for each row"
            + (f", {rounds} rounds alternating the three, median kept" if rounds > 1 else "")
            + ". Non-streaming: " + ("wrk" if self.wrk else "bench/loadgen.py") + ", latency p50/p99; "
            "streaming: bench/loadgen.py, TTFT p50/p99. Gateway CPU per request: its cores ÷ the rate. Spans per "
            "request: the spans the sink received ÷ the chat completions the gateway served (warm-up included in "
            "both; at 1.0 a server span, \"authenticate\" and the backend call per request). Throughput against "
            f"tracing off (negative: slower; the goal is a cost under 10% at 0.01), and in brackets the gateway's "
            f"CPU per request against tracing off: {summary or '-'}. On a busy machine the rates follow the CPU the "
            "gateway gets; its CPU per request is the steadier measure of the cost." + took,
        ]

    def two_users_scenario(self):
        """
        Issue 16's "two users, one GPU": a greedy principal and an
        interactive one through a gateway with C{--fair-slots} backend slots
        in front of the paced fake; first with the interactive client under
        the greedy one's principal (its calls then queue in arrival order
        behind the greedy ones, as every call did before fair sharing), then
        as a principal of its own.  A fresh gateway for each, so that the
        scheduler starts without history; one fake for both.
        """
        a = self.args
        started = time.monotonic()
        turnover = (a.paced_tokens - 1) * a.pace_ms / 1000.0
        tail = (a.fair_greedy / a.fair_slots + 3) * turnover + 10.0  # an arrival-order wait, and more
        fake = start_fake("fake-ollama-two-users", "--pace-ms", f"{a.pace_ms:g}", "--tokens", str(a.paced_tokens))
        tokens = {}
        try:
            for key, label, sub in TWO_USERS:
                gw = Gateway(fake.url, self.tmp, a.fair_slots, self.notes, like=self.first_gateway)
                self.first_gateway = self.first_gateway or gw
                try:
                    for name in ("greedy", sub):
                        tokens[name] = tokens.get(name) or gw.mint(name)
                    PHASE["now"] = f"two users, {label}"
                    say(f"bench: two users, one GPU, {label}: {a.fair_greedy} greedy streams and one interactive "
                        f"client on {a.fair_slots} slots for {a.fair_duration:g}s ...")
                    raw = run_two_users(
                        Target("gateway", gw.url, gw.pid, tokens["greedy"]),
                        Target("gateway", gw.url, gw.pid, tokens[sub]),
                        a.fair_greedy, a.fair_think, 2 * turnover, a.fair_duration, tail, key,
                    )
                    self.shared_gpu[key] = summarise_two_users(label, raw)
                    i = self.shared_gpu[key]["interactive"]
                    say(f"bench:   interactive TTFT p50 {_s(i['ttft_p50'])} s, p99 {_s(i['ttft_p99'])} s "
                        f"over {i['streams']} streams")
                finally:
                    self.stop_gateway(gw)
        finally:
            fake.stop()
        self.shared_gpu_s = time.monotonic() - started

    def two_users_report(self):
        """The "two users, one GPU" table and how to read it: a list of lines."""
        a = self.args
        rows = []
        for key, r in self.shared_gpu.items():
            g, i, t = r["greedy"], r["interactive"], r["turnover_s"]
            in_turnovers = i["ttft_p99"] / t if i["ttft_p99"] is not None and t else None
            rows.append((
                f"{key}: {r['label']}", _s(g["ttft_p50"]), _s(g["ttft_p99"]), _s(i["ttft_p50"]), _s(i["ttft_p99"]),
                _s(t), "-" if in_turnovers is None else f"{in_turnovers:.2f}",
                "-" if g["rate"] is None else f"{g['rate']:.2f}", f"{g['streams']} / {i['streams']}",
            ))
            for who, c in (("greedy", g), ("interactive", i)):
                if c["errors"]:
                    self.notes.append(f"two users, {key}, {who} client: errors {c['errors']}")
        head = ("two users, one GPU", "greedy TTFT p50 (s)", "greedy TTFT p99 (s)", "interactive TTFT p50 (s)",
                "interactive TTFT p99 (s)", "slot turnover (s)", "interactive p99 (turnovers)",
                "greedy streams/s", "streams greedy / interactive")
        nominal = (a.paced_tokens - 1) * a.pace_ms / 1000.0
        took = "" if self.shared_gpu_s is None else f" This part took {self.shared_gpu_s:.0f} s."
        return [
            "",
            "### Two users, one GPU (issue 16)",
            "",
            markdown_table(head, rows),
            "",
            f"The gateway with max_connections: {a.fair_slots} in front of the fake paced at {a.pace_ms:g} ms × "
            f"{a.paced_tokens} tokens. A greedy client (sub greedy) keeps {a.fair_greedy} streams going back to back; "
            f"{2 * nominal:.1f} s after it started, an interactive client asks one stream at a time, "
            f"{a.fair_think:g} s after its last answer, for {a.fair_duration:g} s; the greedy streams saturate the "
            "slots until the interactive client's last answer is in (the greedy streams still open then are cut "
            "and not counted). TTFT: from the request to the first SSE event with content. Slot turnover: one "
            "stream's length, first content to end (median of the greedy streams; nominally "
            f"{nominal:.2f} s), so the backend's ceiling is {a.fair_slots / nominal:.2f} streams/s. "
            "before = FIFO-equivalent: the interactive client uses the greedy principal's token, so its calls "
            "queue in arrival order behind the greedy ones, as every call did before fair sharing; after = fair "
            "share: the interactive client is principal ann." + took,
        ]

    def gateway_notes(self):
        total = sum(self.gateway_messages.values())
        if total:
            self.notes.append(f"the gateways logged {total} lines at warn or above:")
            for (phase, message), n in self.gateway_messages.most_common(8):
                self.notes.append(f"  {n}× ({phase}): {message}")

    def run_profile(self, via, pids, paced=False):
        """
        py-spy on the gateway during an extra run: non-streaming at
        C{--profile-concurrency}, or (C{paced}) C{--chunk-streams} paced
        streams, each token in its own read.
        """
        py_spy = find_py_spy()
        if not py_spy:
            if not any("py-spy not found" in n for n in self.notes):
                self.notes.append("--profile: py-spy not found (pip install py-spy)")
            return
        a = self.args
        seconds = max(10, int(a.duration))  # enough samples to tell 1% from 2%
        if paced:
            c = a.chunk_streams
            stream_s = (a.paced_tokens - 1) * a.pace_ms / 1000.0
            what = f"{c} paced streams of {a.paced_tokens} tokens @{a.pace_ms:g} ms" + (" lockstep" if a.lockstep else "")
            run = dict(stream=True, grace=max(30.0, 10 * stream_s), stagger=stream_s)
            warmup = 2 * stream_s
        else:
            c = a.profile_concurrency
            what = f"non-streaming c={c}"
            run = dict(stream=False, grace=10.0, stagger=0.0)
            warmup = a.warmup
        raw = os.path.join(self.tmp, f"profile-{len(self.profiles)}.txt")
        if warmup:
            self.measure(f"{what} (before py-spy)", via, run["stream"], c, warmup, run["grace"], cpu_pids=pids,
                         warmup=0, stagger=run["stagger"])
        say(f"bench: profiling the gateway with py-spy for {seconds}s under {what} ...")
        # --nonblocking: py-spy reads the gateway's memory without pausing it,
        # so the profiled run goes at nearly full speed.
        spy = Child("py-spy", [py_spy, "record", "--pid", str(via.pid), "--duration", str(seconds), "--rate", "250",
                               "--nonblocking", "--format", "raw", "--output", raw])
        time.sleep(0.5)
        try:
            r = self.measure(f"{what} (under py-spy)", via, run["stream"], c, seconds, run["grace"], cpu_pids=pids,
                             warmup=0, stagger=run["stagger"])
            if r["errors"]:
                self.notes.append(f"the profiled run (not in the table): errors {r['errors']}")
            spy.wait(seconds + 60)
        finally:
            spy.stop()
        if not os.path.exists(raw):
            self.notes.append(f"--profile: py-spy wrote nothing{spy.tails()}")
            return
        if a.profile_out:
            shutil.copyfile(raw, a.profile_out + (".paced" if paced else ""))
        self.profiles.append((what, r, summarise_profile(raw)))

    # -- the table -----------------------------------------------------------

    def table(self):
        a = self.args
        rows = []

        def num(v, digits):
            return "-" if v is None else f"{v:,.{digits}f}"

        def cell(r, key, digits):
            if r is None:
                return "-"
            text = num(r.get(key), digits)
            errs = sum(r["errors"].values())
            return text + (f" ({errs} errors)" if errs else "")

        def add_latency(label, pair, key):
            d, g = pair.get("direct"), pair.get("gateway")
            dv, gv = (d or {}).get(key), (g or {}).get(key)
            digits = 3 if max(dv or 0, gv or 0) < 10 else 2
            added = f"{gv - dv:+,.{digits}f}" if dv is not None and gv is not None else "-"
            rows.append((label, cell(d, key, digits), cell(g, key, digits), added))

        def add_rate(label, pair):
            d, g = pair.get("direct"), pair.get("gateway")
            dv, gv = (d or {}).get("rate"), (g or {}).get("rate")
            digits = 1 if max(dv or 0, gv or 0) < 100 else 0
            ratio = f"×{gv / dv:.2f} of direct" if dv and gv is not None else "-"
            rows.append((label, cell(d, "rate", digits), cell(g, "rate", digits), ratio))

        levels = [] if a.chunk_only else a.concurrency
        for c in levels:
            pair = self.results.get(f"plain c={c}", {})
            add_rate(f"non-streaming c={c}: requests/s", pair)
            add_latency(f"non-streaming c={c}: latency p50 (ms)", pair, "p50")
            add_latency(f"non-streaming c={c}: latency p99 (ms)", pair, "p99")
        for c in levels:
            pair = self.results.get(f"stream c={c}", {})
            add_rate(f"streaming c={c}: streams/s", pair)
            add_latency(f"streaming c={c}: TTFT p50 (ms)", pair, "ttft_p50")
            add_latency(f"streaming c={c}: TTFT p99 (ms)", pair, "ttft_p99")
        paced = f"paced {a.paced_streams}×{a.paced_tokens} tok @{a.pace_ms:g} ms" + (" lockstep" if a.lockstep else "")
        pair = self.results.get("paced", {})
        add_rate(f"{paced}: streams/s", pair)
        add_latency(f"{paced}: TTFT p50 (ms)", pair, "ttft_p50")
        add_latency(f"{paced}: TTFT p99 (ms)", pair, "ttft_p99")
        if "chunk paced" in self.results or "chunk burst" in self.results:
            paced_chunk = self.results.get("chunk paced", {})
            burst_chunk = self.results.get("chunk burst", {})
            gp, gb = cpu_per_chunk(paced_chunk.get("gateway"), "gateway"), cpu_per_chunk(burst_chunk.get("gateway"), "gateway")
            dp, db = cpu_per_chunk(paced_chunk.get("direct"), "fake"), cpu_per_chunk(burst_chunk.get("direct"), "fake")
            us = lambda v: "-" if v is None else f"{v:,.1f}"
            rows.append((f"CPU per streamed chunk at a realistic pace, {a.chunk_streams}×{a.paced_tokens} tok @{a.pace_ms:g} ms" + (" lockstep" if a.lockstep else "") + " (µs)",
                         us(dp), us(gp), f"gateway ×{gp / gb:.1f} of burst" if gp and gb else ""))
            rows.append((f"CPU per streamed chunk in bursts, unpaced c={a.chunk_burst_concurrency}×{a.paced_tokens} tok (µs)",
                         us(db), us(gb), ""))
            chunk = f"paced {a.chunk_streams}×{a.paced_tokens} tok @{a.pace_ms:g} ms" + (" lockstep" if a.lockstep else "")
            if paced_chunk:
                add_rate(f"{chunk}: streams/s", paced_chunk)
                add_latency(f"{chunk}: TTFT p50 (ms)", paced_chunk, "ttft_p50")
                add_latency(f"{chunk}: TTFT p99 (ms)", paced_chunk, "ttft_p99")
        if a.full and not a.chunk_only:
            full = f"{a.full_streams} paced streams"
            pair = self.results.get("full", {})
            d, g = pair.get("direct"), pair.get("gateway")
            rows.append((f"{full}: connections open", *(str(x["connected"]) if x else "-" for x in (d, g)), ""))
            rows.append((f"{full}: errors", *(str(sum(x["errors"].values())) if x else "-" for x in (d, g)), ""))
            add_rate(f"{full}: streams/s", pair)
            add_latency(f"{full}: TTFT p50 (ms)", pair, "ttft_p50")
            add_latency(f"{full}: TTFT p99 (ms)", pair, "ttft_p99")
        for name, kb in self.rss.items():
            rows.append((f"gateway RSS {name} (MB)", "", "-" if kb is None else f"{kb / 1024:.1f}", ""))
        head = ("scenario", "direct", "gateway", "added (ms)")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        lines = [
            "| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(head)) + " |",
            "|" + "|".join("-" * (widths[i] + 2) if i == 0 else "-" * (widths[i] + 1) + ":" for i in range(4)) + "|",
        ]
        for r in rows:
            lines.append("| " + " | ".join(r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(4)) + " |")
        return "\n".join(lines)

    def cpu_table(self):
        rows = []
        for key, pair in self.results.items():
            for kind in ("direct", "gateway"):
                r = pair.get(kind)
                if not r:
                    continue
                cpu = dict(r["cpu"])
                cpu["other"] = _other_cpu(cpu)
                if kind == "direct":
                    cpu.pop("gateway", None)  # idle meanwhile
                rows.append((key, kind, r["tool"]) + tuple(
                    "-" if cpu.get(k) is None else f"{cpu[k]:.2f}" for k in ("fake", "gateway", "load generator", "other")))
        head = ("scenario", "target", "client", "fake", "gateway", "client", "other processes")
        n = len(head)
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(n)]
        out = ["| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(head)) + " |",
               "|" + "|".join("-" * (widths[i] + 2) if i < 3 else "-" * (widths[i] + 1) + ":" for i in range(n)) + "|"]
        for r in rows:
            out.append("| " + " | ".join(r[i].ljust(widths[i]) if i < 3 else r[i].rjust(widths[i]) for i in range(n)) + " |")
        return "\n".join(out)

    def busiest_other(self):
        worst = 0.0
        for pair in self.results.values():
            for r in pair.values():
                worst = max(worst, _other_cpu(r["cpu"]) or 0.0)
        return worst

    def side_by_side(self):
        """The direct vs gateway table, how to read it, and the CPU table: a list of lines."""
        a = self.args
        out = []
        out.append("")
        out.append(self.table())
        out.append("")
        spiky = [k for k, pair in self.results.items()
                 if k.startswith(("plain", "stream")) and (pair.get("direct") or {}).get("p99")
                 and pair["direct"]["p99"] > max(10.0, 4 * pair["direct"]["p50"])]
        if spiky:
            self.notes.append(
                "direct p99 well above its p50 (" + ", ".join(spiky) + "): the fake Ollama (the tests' fake) keeps a "
                "record of every request it serves, and its garbage collector's full passes over tens of thousands "
                "of them pause it for 10-100+ ms; the gateway rows go through the same fake and include such pauses "
                "too. Each unpaced measurement gets a fresh fake so they do not compound"
            )
        stream_s = (a.paced_tokens - 1) * a.pace_ms / 1000.0
        full = self.results.get("full", {}).get("direct")
        if full:
            self.notes.append(
                f"{a.full_streams} paced streams: the backend's ceiling would be {a.full_streams / stream_s:.0f} streams/s; "
                f"the fake delivered {full['rate']:.0f} directly, so there it (and this machine) is the limit, "
                "and the rows show the gateway holding the connections under overload"
            )
        if "chunk paced" in self.results or "chunk burst" in self.results:
            self.notes.append(
                "CPU per streamed chunk: the process's CPU time (utime + stime in /proc/PID/stat) over the whole "
                "measurement, stream set-up included, divided by the chunks its clients received (NDJSON lines "
                "direct, SSE events with a JSON object through the gateway; [DONE] not counted); the direct column "
                "is the fake's own cost per line. At a realistic pace the paced fake sends each line as its own "
                "chunk in a write of its own, so the gateway reads one line per read (as from Ollama); in bursts "
                "the fake sends a reply's lines together and one read carries many"
            )
        out.append(
            "direct = the fake Ollama's /api/chat; gateway = POST /v1/chat/completions through Clawdbot "
            "(production mode, JWT on, rate limit off) to the same fake. added = gateway − direct; "
            "for rates, gateway ÷ direct. Non-streaming rows: "
            + ("wrk (one thread, keep-alive)" if self.wrk else "bench/loadgen.py")
            + "; streaming rows: bench/loadgen.py. TTFT: to the first NDJSON line (direct) or the first SSE "
            f"event with content (gateway). Paced: one stream lasts ≥ {stream_s:.2f} s, so the backend's "
            f"ceiling is {a.paced_streams / stream_s:.1f} streams/s."
        )
        out.append("")
        out.append(
            f"CPU used during each measurement, in cores (this machine has {os.cpu_count()}); "
            "\"other processes\" is the machine's busy time less the fake's, the gateway's and the client's:"
        )
        out.append("")
        out.append(self.cpu_table())
        if self.busiest_other() > 0.25:
            self.notes.append(
                f"other processes used up to {self.busiest_other():.2f} cores during a measurement: the machine was "
                "not quiet, and the numbers (direct and gateway alike) are pessimistic; run again on a quiet machine "
                "or with --repeat 3"
            )
        return out

    def report(self, elapsed):
        a = self.args
        out = []
        wrk_version = ""
        if self.wrk:
            try:
                v = subprocess.run([self.wrk, "-v"], capture_output=True, text=True, timeout=10)
                wrk_version = (v.stdout + v.stderr).split("\n", 1)[0].split(" Copyright")[0]
            except (OSError, subprocess.TimeoutExpired):
                pass
        cpu_model = ""
        try:
            with open("/proc/cpuinfo") as f:
                cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
        except OSError:
            pass
        out.append(f"## Clawdbot benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}")
        out.append("")
        out.append(
            f"{os.cpu_count()} CPUs ({cpu_model or platform.machine()}), Python {platform.python_version()}"
            + ("" if a.fair_only else
               ("; " if a.instances_only else f", {wrk_version or 'no wrk'}; ") + f"{a.duration:g} s per measurement after {a.warmup:g} s warm-up; "
               f"unpaced replies of {a.tokens} tokens")
            + (f"; each measurement repeated {a.repeat}×, median kept" if a.repeat > 1 and not a.fair_only else "")
            + f"; load average at start {self.load_at_start}; run took {elapsed:.0f} s."
        )
        self.gateway_notes()
        if not a.fair_only and not a.keys_only and not a.instances_only and not a.tracing_only:
            out += self.side_by_side()
        if not a.no_keys and not a.fair_only:
            out += self.keys_report()
        out += self.instances_report()
        out += self.tracing_report()
        if not a.no_fair and not a.keys_only and not a.instances_only:
            out += self.two_users_report()
        errors = [(k, kind, r["errors"]) for k, pair in self.results.items() for kind, r in pair.items() if r["errors"]]
        if errors or self.notes:
            out.append("")
            out.append("Notes:")
            for k, kind, e in errors:
                out.append(f"- {k} {kind}: errors {e}")
            for n in self.notes:
                out.append(f"  - {n.strip()}" if n.startswith("  ") else f"- {n}")
        for what, r, prof in self.profiles:
            busy = max(prof["busy"], 1)
            out.append("")
            rate = (f"{r['rate']:.1f} streams/s" if r.get("chunks") else f"{r['rate']:.0f} req/s")
            per_chunk = cpu_per_chunk(r, "gateway")
            out.append(
                f"### Gateway profile (py-spy, {what}, {rate} while sampled"
                + (f", {per_chunk:.0f} µs of gateway CPU per chunk" if per_chunk else "") + ")"
            )
            out.append("")
            out.append(
                f"{prof['total']} samples; the reactor thread was busy in {busy} and waiting in epoll in "
                f"{prof['idle']}; shares below are of the busy samples."
            )
            sections = (
                ("Self time by file", prof["by_file"], str),
                ("Self time by function", prof["self"], _short_frame),
                ("Inclusive time, Clawdbot's own functions", prof["clawdbot"], _short_frame),
                ("Inclusive time, all functions (under the reactor's dispatch)", prof["inclusive"], _short_frame),
            )
            for title, items, show in sections:
                out.append("")
                out.append(title + (" (share of busy samples; µs per chunk: that share of the gateway's CPU per chunk)"
                                    if per_chunk else "") + ":")
                out.append("")
                for name, n in items:
                    cost = f"  {per_chunk * n / busy:6.1f} µs" if per_chunk else ""
                    out.append(f"    {100.0 * n / busy:5.1f}%{cost}  {show(name)}")
        return "\n".join(out)

    def as_json(self, elapsed):
        return {"args": vars(self.args), "elapsed_s": elapsed, "results": self.results,
                "rss_kb": self.rss, "two_users": self.shared_gpu, "two_users_s": self.shared_gpu_s, "keys": self.keys_results,
                "instances": self.instances, "instances_s": self.instances_s, "tracing": self.tracing,
                "tracing_s": self.tracing_s, "notes": self.notes}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark Clawdbot against the fake Ollama directly, side by side; prints one markdown table.",
    )
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each measurement (default 1; 0: none)")
    p.add_argument("--concurrency", default="1,10,50", help="comma-separated levels (default 1,10,50)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per unpaced reply (default 16)")
    p.add_argument("--paced-streams", type=int, default=50, help="concurrent paced streams (default 50)")
    p.add_argument("--paced-tokens", type=int, default=64, help="tokens per paced stream (default 64)")
    p.add_argument("--pace-ms", type=float, default=20.0, help="ms between paced tokens (default 20)")
    p.add_argument("--lockstep", action="store_true",
                   help="paced streams' tokens on one shared clock, as a batched decoder makes them (default: each stream its own phase)")
    p.add_argument("--paced-burst", action="store_true",
                   help="start the paced streams all at once (default: spread over one stream's length)")
    p.add_argument("--chunk-streams", type=int, default=200,
                   help="paced streams for the CPU per streamed chunk at a realistic pace (default 200)")
    p.add_argument("--chunk-burst-concurrency", type=int, default=10,
                   help="connections for the CPU per streamed chunk in bursts (default 10)")
    chunks = p.add_mutually_exclusive_group()
    chunks.add_argument("--no-chunk-cost", action="store_true", help="leave out the CPU per streamed chunk scenarios")
    chunks.add_argument("--chunk-only", action="store_true",
                        help="run only the paced scenario and the CPU per streamed chunk scenarios")
    p.add_argument("--full", action="store_true", help="also hold --full-streams concurrent paced streams open")
    p.add_argument("--full-streams", type=int, default=1000, help="streams for --full (default 1000)")
    p.add_argument("--full-duration", type=int, default=10, help="seconds for --full (default 10)")
    p.add_argument("--fair-slots", type=int, default=2, help="two users, one GPU: the gateway's max_connections (default 2)")
    p.add_argument("--fair-greedy", type=int, default=20, help="two users: the greedy client's streams (default 20)")
    p.add_argument("--fair-think", type=float, default=1.0,
                   help="two users: seconds the interactive client waits between answers (default 1)")
    p.add_argument("--fair-duration", type=float, default=12.0,
                   help="two users: seconds the interactive client asks for, in each variant (default 12)")
    two_users = p.add_mutually_exclusive_group()
    two_users.add_argument("--no-fair", action="store_true", help="leave out the two users, one GPU scenario")
    two_users.add_argument("--fair-only", action="store_true", help="run only the two users, one GPU scenario")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--no-keys", action="store_true", help="leave out the API key scenario")
    keys.add_argument("--keys-only", action="store_true", help="run only the API key scenario (JWT against API key, c=10)")
    p.add_argument("--instances", type=int, default=2, metavar="N",
                   help="several instances: gateways measured against one (default 2)")
    instances = p.add_mutually_exclusive_group()
    instances.add_argument("--no-instances", action="store_true", help="leave out the several instances scenario")
    instances.add_argument("--instances-only", action="store_true",
                           help="run only the several instances scenario (1 gateway against --instances)")
    tracing = p.add_mutually_exclusive_group()
    tracing.add_argument("--no-tracing", action="store_true", help="leave out the tracing scenario")
    tracing.add_argument("--tracing-only", action="store_true",
                         help="run only the tracing scenario (off, sample_rate 1.0 and 0.01, c=10)")
    p.add_argument("--repeat", type=int, default=1, help="measure each scenario N times, alternating, keep the median")
    p.add_argument("--client-procs", type=int, default=2, help="load generator processes above concurrency 1 (default 2)")
    p.add_argument("--no-wrk", action="store_true", help="use bench/loadgen.py for non-streaming too")
    p.add_argument("--profile", action="store_true", help="py-spy the gateway during an extra non-streaming run")
    p.add_argument("--profile-concurrency", type=int, default=10, help="concurrency of that run (default 10)")
    p.add_argument("--profile-out", metavar="FILE", help="keep py-spy's collapsed stacks in FILE")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error("--concurrency: comma-separated integers, e.g. 1,10,50")
    if not args.concurrency or min(args.concurrency) < 1 or args.duration < 1 or args.warmup < 0 or args.repeat < 1:
        p.error("concurrency levels and --duration must be at least 1, --warmup at least 0")
    if sum(map(bool, (args.chunk_only, args.fair_only, args.keys_only, args.instances_only, args.tracing_only))) > 1:
        p.error("--chunk-only, --fair-only, --keys-only, --instances-only and --tracing-only exclude one another")
    if args.chunk_only:
        args.no_keys = args.no_fair = args.no_instances = True
    if args.tracing_only:
        args.no_keys = args.no_fair = args.no_instances = True
    if args.instances < 2:
        p.error("--instances must be at least 2")
    if args.chunk_streams < 1 or args.chunk_burst_concurrency < 1:
        p.error("--chunk-streams and --chunk-burst-concurrency must be at least 1")
    if args.paced_tokens < 2 or args.pace_ms <= 0 or args.paced_streams < 1 or args.full_streams < 1:
        p.error("--paced-tokens must be at least 2, --pace-ms positive, stream counts at least 1")
    if args.fair_slots < 1 or args.fair_greedy < 1 or args.fair_think < 0 or args.fair_duration <= 0:
        p.error("--fair-slots and --fair-greedy must be at least 1, --fair-think at least 0, --fair-duration positive")
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(os.path.join(ROOT, "testing", "fake_ollama.py")):
        say("bench: run me from a Clawdbot checkout (testing/fake_ollama.py not found)")
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    atexit.register(Child.stop_all)
    tmp = tempfile.mkdtemp(prefix="clawdbot-bench-")
    started = time.monotonic()
    bench = Bench(args, tmp)
    status = 0
    try:
        if not bench.wrk and not args.no_wrk and not args.fair_only and not args.chunk_only and not args.instances_only:
            say(f"bench: wrk is not installed; install it with `{WRK_INSTALL}` (as root). Using bench/loadgen.py instead.")
        bench.run()
        elapsed = time.monotonic() - started
        print(bench.report(elapsed), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(bench.as_json(elapsed), f, indent=2, default=str)
    except BenchError as e:
        say(f"bench: {e}")
        status = 1
    except KeyboardInterrupt:
        say("bench: interrupted; stopping everything it started")
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Child.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return status


if __name__ == "__main__":
    sys.exit(main())
