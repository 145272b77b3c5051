"""
A new user's first ten minutes, from the README's own words (issue 20): a
fresh copy of the project as a clone holds it, the quick start's command
(C{make run}, which makes its own C{.venv}) with no Ollama on the example
config's address, the address it says to open in a browser, a page that
works and says the model backend is down; then the fake Ollama the README
offers, one message and its reply; then Ctrl+C.

Everything runs as real processes in the copy, as a user's shell would run
them; only the test's own tools (the browser driver, the HTTP client) come
from this checkout's .venv.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.browser import run_in_browser
from tests.helpers import ROOT, get_json
from tests.test_page_e2e import send

# make run installs the packages running needs (pip, from the network or its
# cache) before it starts anything.
INSTALL_TIMEOUT = 900.0


def fresh_copy(dest):
    """
    Copy what a clone of this checkout would hold into C{dest}: the tracked
    files and the untracked ones git does not ignore, as they are in the
    working tree (the work under test may not be committed yet).
    """
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise AssertionError(f"the walk-through copies the project as a clone holds it, with git ls-files in {ROOT}: {e}") from None
    copied = 0
    for name in sorted(set(os.fsdecode(n) for n in listed.split(b"\0") if n)):
        source = os.path.join(ROOT, name)
        if not os.path.lexists(source):  # deleted in the working tree, not yet in the index
            continue
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
        copied += 1
    return copied


def fenced_commands(readme):
    """(command, comment) of every line of the README's C{sh} blocks."""
    found = []
    for block in re.findall(r"^```sh\n(.*?)^```", readme, re.S | re.M):
        for line in block.splitlines():
            command, _, comment = line.partition("#")
            if command.strip():
                found.append((command.strip(), comment.strip()))
    return found


def readme_command(readme, says):
    """The one command whose comment in the README's C{sh} blocks says C{says}."""
    matches = [command for command, comment in fenced_commands(readme) if says in comment]
    if len(matches) != 1:
        raise AssertionError(f"the README should have one command whose comment says {says!r}; found {matches}")
    return matches[0]


def quoted(readme, pattern):
    """The README's text in backquotes matching C{pattern}, line breaks undone."""
    flat = " ".join(readme.split())
    found = re.findall(r"`(" + pattern + r")`", flat)
    if not found:
        raise AssertionError(f"the README no longer quotes {pattern!r}")
    return found[0]


def strport(description):
    """(interface, port) of a C{tcp:PORT[:interface=ADDR]} description."""
    parts = description.split(":")
    if parts[0] != "tcp" or not parts[1].isdigit():
        raise AssertionError(f"the walk-through knows tcp:PORT listeners only, not {description!r}")
    options = dict(p.split("=", 1) for p in parts[2:])
    return options.get("interface", ""), int(parts[1])


def must_be_free(interface, port, what):
    """Fail, naming the setting, when C{interface:port} cannot be listened on."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listeners do
        sock.bind((interface, port))
        sock.listen(1)
    except OSError as e:
        raise AssertionError(
            f"port {port} ({what} in etc/clawdbot.yaml) is taken on this machine ({e.strerror}): the walk-through "
            f"runs the example config as a new user would, so it needs that port free; stop what listens there"
        ) from None
    finally:
        sock.close()


def user_environment():
    """This environment as a user's shell would have it: no virtualenv of ours active, no make of ours around."""
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES"):
        env.pop(name, None)
    if sys.prefix != sys.base_prefix:  # the venv running these tests: its bin is not on a new user's PATH
        ours = os.path.join(sys.prefix, "bin")
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if os.path.abspath(p) != ours)
    return env


class Command:
    """
    A command typed in a terminal: its own process group (the terminal's
    foreground job), output kept in files, stopped with Ctrl+C (SIGINT to
    the whole group).
    """

    def __init__(self, testcase, argv, cwd, env):
        self.argv = argv
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as e:
            raise AssertionError(f"cannot run {shlex.join(argv)}: {e}") from None
        testcase.addCleanup(self.kill)

    def stdout(self):
        self.out.seek(0)
        return self.out.read()

    def stderr(self):
        self.err.seek(0)
        return self.err.read()

    def report(self):
        return f"{shlex.join(self.argv)}: exit status {self.proc.poll()}\nstdout:\n{self.stdout()}\nstderr:\n{self.stderr()[-6000:]}"

    def line_with(self, text):
        lines = [line for line in self.stdout().splitlines() if text in line]
        return lines[0] if lines else None

    def said(self, text):
        return self.line_with(text) is not None

    async def until(self, predicate, timeout, what):
        """Wait (turning the reactor) until C{predicate()}; fail with the output if the command ends first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"{shlex.join(self.argv)} ended before {what}\n{self.report()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {timeout} s\n{self.report()}")
            await deferLater(reactor, 0.1)

    def wait_line(self, text, timeout):
        """The first stdout line with C{text}, waiting in this (worker) thread."""
        deadline = time.monotonic() + timeout
        while self.line_with(text) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not printed\n{self.report()}")
            time.sleep(0.05)
        return self.line_with(text)

    def ctrl_c(self):
        """What Ctrl+C in the terminal does: SIGINT to every process of the foreground job."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def group_alive(self):
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    async def stopped(self, timeout):
        """Wait until the command and every process it started have ended; its exit status."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or self.group_alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"still running {timeout} s after Ctrl+C\n{self.report()}")
            await deferLater(reactor, 0.1)
        return self.proc.returncode

    def kill(self):
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.out.close()
        self.err.close()


class NewUserWalkthroughTests(TestCase):
    # make run installs its venv first: minutes on a slow network.
    timeout = INSTALL_TIMEOUT + 300

    async def test_first_ten_minutes_from_the_readme(self):
        """A fresh copy, the README's start command with no Ollama, the printed address in Chromium saying the backend is down, the README's fake Ollama, one reply, Ctrl+C."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        run_command = readme_command(readme, "start the gateway")
        self.assertEqual(run_command, "make run", "the README's quick start and this test disagree on the command that starts the gateway")
        fake_command = readme_command(readme, "a fake Ollama")
        self.assertEqual(fake_command, ".venv/bin/python -m testing.fake_ollama", "the README's quick start and this test disagree on how to start the fake Ollama")
        printed = [
            quoted(readme, r"Gateway listening on [^`]+"),
            quoted(readme, r"Debug port listening on [^`]+open it in a browser to chat"),
        ]
        not_answering = quoted(readme, r"Ollama at \S+ is not answering[^`]*")

        # A fresh clone: what git would hand over, without this checkout's .venv, var/ or artifacts/.
        clone = tempfile.mkdtemp(prefix="clawdbot-walkthrough-")
        self.addCleanup(shutil.rmtree, clone, ignore_errors=True)
        self.assertGreater(fresh_copy(clone), 0)
        for absent in (".venv", "var", "artifacts"):
            self.assertFalse(os.path.exists(os.path.join(clone, absent)), absent)

        # The example config's addresses must be free: nothing to listen on ours, no Ollama answering.
        with open(os.path.join(clone, "etc", "clawdbot.yaml"), encoding="utf-8") as f:
            example = yaml.safe_load(f)
        self.assertEqual(example["server"]["mode"], "dev")
        must_be_free(*strport(example["server"]["listen"]), "server.listen")
        must_be_free(*strport(example["server"]["debug_listen"]), "server.debug_listen")
        backend = urlsplit(example["backend"]["url"])
        must_be_free(backend.hostname, backend.port, "backend.url")

        env = user_environment()
        gateway = Command(self, shlex.split(run_command), clone, env)
        await gateway.until(lambda: gateway.said("Ollama at"), INSTALL_TIMEOUT, "the gateway's start-up lines")
        out = gateway.stdout()
        for line in printed:
            self.assertIn(line, out.splitlines())
        self.assertIn(not_answering, out.splitlines())
        self.assertTrue(os.path.isdir(os.path.join(clone, ".venv")))
        self.assertNotIn("Traceback", gateway.stderr())

        # The address to open is the one the gateway says to open in a browser.
        line = gateway.line_with("open it in a browser to chat")
        address = line.split(" listening on ", 1)[1].split()[0]
        interface, port = strport(example["server"]["debug_listen"])
        self.assertEqual(address, f"http://{interface}:{port}")

        # The README's curl lines, at the gateway's printed address, with Ollama missing.
        gateway_url = gateway.line_with("Gateway listening on ").split(" listening on ", 1)[1].split()[0]
        status, _, body = await get_json(gateway_url + "/healthz")
        self.assertEqual((status, body), (200, {"status": "ok"}))
        status, _, body = await get_json(gateway_url + "/readyz")
        self.assertEqual(status, 503, body)
        self.assertIn(example["backend"]["url"], str(body))

        fakes = []  # started from the browser script, once the page has been seen

        def start_fake():
            fakes.append(Command(self, shlex.split(fake_command), clone, env))
            return fakes[0].wait_line("Fake Ollama listening on", 60.0).split(" listening on ", 1)[1].strip()

        def script(browser, address):
            seen = {}
            page = browser.new_page()
            page.goto(address + "/")
            page.get_by_test_id("composer").wait_for(state="visible")
            page.locator("[data-testid=notice]").first.wait_for(state="visible")
            seen["signin_screen"] = page.get_by_test_id("signin-screen").is_visible()
            seen["down_notices"] = page.locator("[data-testid=notice]").all_inner_texts()
            page.screenshot_as("walkthrough-backend-down")
            seen["down_problems"] = page.problems(origin=address)
            chinese = browser.new_page(locale="zh-CN")
            chinese.goto(address + "/")
            chinese.locator("[data-testid=notice]").first.wait_for(state="visible")
            seen["down_notices_zh"] = chinese.locator("[data-testid=notice]").all_inner_texts()
            chinese.close()

            seen["fake_url"] = start_fake()
            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.wait_until("document.querySelectorAll('[data-testid=model-picker] option').length > 0", timeout=20)
            seen["up_notices"] = page.locator("[data-testid=notice]").all_inner_texts()
            try:
                seen["reply"] = send(page, "Hello! Is anyone there?").inner_text()
            except Exception as e:
                raise AssertionError(f"no reply; the conversation shows {page.get_by_test_id('messages').inner_text()!r}") from e
            page.screenshot_as("walkthrough-first-reply")
            seen["up_problems"] = page.problems(origin=address)
            return seen

        seen = await run_in_browser(script, address)
        self.assertFalse(seen["signin_screen"])
        down = " ".join(seen["down_notices"])
        self.assertIn("the model server is down or not answering", down, seen["down_notices"])
        self.assertIn("模型服务器已停止或没有响应", " ".join(seen["down_notices_zh"]), seen["down_notices_zh"])
        self.assertEqual(seen["down_problems"], [])
        self.assertEqual(seen["fake_url"], example["backend"]["url"])
        self.assertEqual(seen["up_notices"], [])
        self.assertIn("This is a reply from the fake Ollama server", seen["reply"])
        self.assertEqual(seen["up_problems"], [])
        status, _, body = await get_json(gateway_url + "/readyz")
        self.assertEqual(status, 200, body)

        # Ctrl+C in each terminal: the gateway and make stop, the ports are free again.
        gateway.ctrl_c()
        self.assertEqual(await gateway.stopped(60.0), -signal.SIGINT, gateway.report())  # make dies of the signal, as under a shell
        err = gateway.stderr()
        self.assertIn("Received SIGINT, shutting down.", err)
        self.assertIn("Main loop terminated.", err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("make: ***", err)  # make says so when the gateway exits with an error
        self.assertNotIn('"level": "error"', err)
        must_be_free(*strport(example["server"]["listen"]), "server.listen")
        must_be_free(*strport(example["server"]["debug_listen"]), "server.debug_listen")
        fakes[0].ctrl_c()
        self.assertEqual(await fakes[0].stopped(30.0), 0, fakes[0].report())
