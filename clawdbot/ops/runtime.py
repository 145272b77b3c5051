"""
The runtime: the state that outlives any one config.

It holds the config new requests start under and swaps it in one
assignment on reload (SIGHUP), telling the parts that derive something from
it (L{Runtime.on_reload}); it knows the requests in flight, and drains them
at shutdown.  Requests take a snapshot of the config when they start
(L{clawdbot.http.site.GatewayRequest.process}), so a reload never changes a
request in flight.  Everything else (the backend, storage, authentication,
budgets, logs) is built once by L{clawdbot.tap.makeService} and handed to
whoever uses it.
"""

import os
import re

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from clawdbot.config import ConfigError, changed_keys, load_config, restart_needed
from clawdbot.ops.observe import redact_text
from clawdbot.errors import APIError

log = Logger(namespace="clawdbot.gateway")


_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def shown_error(error):
    """
    A reload's error as the admin page and the audit log show it: where and
    what, without the value the file held there (it may be a secret), and
    redacted as the access log is.
    """
    return redact_text(_QUOTED.sub("'…'", error))


class Runtime:
    """
    @ivar config: the config new requests start under.
    @ivar reloads: counts of reload results, C{{"ok": n, "error": n}}.
    @ivar inflight: the requests being answered.
    @ivar draining: shutting down: requests whose head arrives from now on
        are refused (L{track}).
    """

    def __init__(self, config, reactor, metrics, environ=None, mode=None):
        self.reactor = reactor
        self.metrics = metrics
        self.environ = os.environ if environ is None else environ
        self.mode = mode
        self.reloads = {"ok": 0, "error": 0}
        # The last reload's time, result ("ok" or "error"), error and changed keys, for the admin page.
        self.last_reload = None
        # Where reloads are audited (clawdbot.ops.audit.AuditLog), once composed.
        self.audit = None
        self.started = reactor.seconds()
        self._reload_pending = False
        self._reload_hooks = []
        self._drain_hooks = []
        self.config = config
        self.inflight = set()
        self.draining = False

    # --- requests in flight ----------------------------------------------------

    def track(self, request):
        """
        A request's head (request line and headers) has arrived: from now
        on it is in flight, and a drain waits for it.  Whether it is refused
        with 503 C{SHUTTING_DOWN} is decided here, once: a request whose
        head came before the drain began is served even if its body arrives
        after (C{request.late} stays false); one whose head came during the
        drain is refused.  Tracking a request again changes nothing.
        """
        if request in self.inflight:
            return
        self.inflight.add(request)
        if self.draining:
            request.draining = True
            request.late = True

    def untrack(self, request):
        """A request ended."""
        self.inflight.discard(request)
        if self.draining and not self.inflight and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    # --- shutdown ----------------------------------------------------------------

    _drained = None

    def begin_drain(self):
        """
        The first step of a shutdown: from now on new requests are refused
        with 503 C{SHUTTING_DOWN} (the health probes still answer, C{/readyz}
        with 503), while those in flight go on as before, and the hooks of
        L{on_drain} run (once).  L{drain} follows.
        """
        if self.draining:
            return
        self.draining = True
        for hook in self._drain_hooks:
            try:
                hook()
            except Exception:
                log.failure("A drain hook failed")

    def on_drain(self, hook):
        """
        Call C{hook()} when the drain begins (L{begin_drain}): each site
        closes its idle kept-alive connections there
        (L{clawdbot.http.site.GatewaySite.close_idle}).
        """
        self._drain_hooks.append(hook)

    async def drain(self, timeout):
        """
        Let requests in flight finish for up to C{timeout} seconds, then end
        what remains: streams get an error event, then close.
        """
        self.draining = True
        for request in list(self.inflight):
            request.draining = True
        if self.inflight:
            log.info("Draining {count} requests for up to {timeout}s", count=len(self.inflight), timeout=timeout)
            self._drained = Deferred()
            timer = self.reactor.callLater(timeout, lambda: self._drained.called or self._drained.callback(None))
            await self._drained
            if timer.active():
                timer.cancel()
        remaining = [r for r in self.inflight if not r.finished and not r.gone]
        if remaining:
            log.warn("Ending {count} requests still running at the drain deadline", count=len(remaining))
        err = APIError("SHUTTING_DOWN", details="the gateway is shutting down; retry the request")
        transports = []
        for request in remaining:
            request.interrupt(err)
            if request.channel is not None:
                transports.append(request.channel.transport)
            if request.handler is not None:
                request.handler.cancel()
        # Work that outlived its client (a reply finishing after a
        # disconnect) stops here too: what it said is kept, marked
        # incomplete, before the store closes.
        for request in [r for r in self.inflight if r.gone and r.runs_on is not None]:
            request.runs_on.cancel()
        # Let those last bytes reach their clients before the reactor stops
        # (which drops connections without flushing them).
        for transport in transports:
            transport.loseConnection()
        for _ in range(100):
            if not any(getattr(t, "connected", False) for t in transports):
                break
            await deferLater(self.reactor, 0.01)

    # --- reload ----------------------------------------------------------------

    def on_reload(self, hook):
        """Call C{hook(old, new)} after each config swap."""
        self._reload_hooks.append(hook)

    def request_reload(self):
        """
        Ask for a reload on the next reactor turn.  Safe to call from a
        signal handler; requests that arrive before it runs coalesce.
        """
        if self._reload_pending:
            return
        self._reload_pending = True
        self.reactor.callFromThread(self._reload_now)

    def _reload_now(self):
        # Runs from reactor.callFromThread: an exception escaping here would
        # only be an "Unhandled Error" traceback, so none does.
        self._reload_pending = False
        try:
            self.reload()
        except Exception:
            self._reload_failed(self.config.source, "unexpected error (see the traceback)", None, unexpected=True)

    def _reload_failed(self, path, error, config_path, unexpected=False):
        """Count, log and audit a failed reload; the running config stays."""
        self.reloads["error"] += 1
        shown = shown_error(error)
        self.last_reload = {"time": self.reactor.seconds(), "result": "error", "error": shown, "changed": []}
        if self.audit is not None:
            self.audit.record("config.reload_failed", obj=path, error=shown)
        try:
            self.metrics.reloads.labels("error").inc()
        except Exception:
            log.failure("Counting a failed reload failed")
        if unexpected:
            log.failure("Config reload failed, keeping the running config: {file}: {error}", file=path, error=error, config_path=config_path)
        else:
            log.error("Config reload failed, keeping the running config: {file}: {error}", file=path, error=error, config_path=config_path)
        return False

    def reload(self):
        """
        Re-read the config file and the environment, validate, and swap.  An
        invalid file keeps the running config.  Every failure, whatever
        raised it, is counted (C{reloads["error"]}, the reload metric) and
        logged with the file's path; nothing propagates.

        @return: C{True} when the new config was applied.
        """
        path = self.config.source
        try:
            new = load_config(path, self.environ, mode=self.mode)
            restart = restart_needed(self.config, new)
        except ConfigError as e:
            return self._reload_failed(path, str(e), e.path)
        except Exception:
            # load_config turns every failure into a ConfigError; this is a bug.
            return self._reload_failed(path, "unexpected error (see the traceback)", None, unexpected=True)
        old = self.config
        self.metrics.reloads.labels("ok").inc()
        for key in restart:
            log.warn("Config key {key} changed; it takes effect after a restart", key=key)
        self.config = new
        self.reloads["ok"] += 1
        for warning in new.warnings:
            log.warn("Config warning: {warning}", warning=warning)
        for hook in self._reload_hooks:
            try:
                hook(old, new)
            except Exception:
                log.failure("A reload hook failed")
        changed = changed_keys(old, new)
        self.last_reload = {"time": self.reactor.seconds(), "result": "ok", "error": None, "changed": changed}
        if self.audit is not None:
            self.audit.record("config.reloaded", obj=path, changed=changed)
        log.info("Config reloaded from {file}", file=path)
        return True
