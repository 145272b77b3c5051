"""
The gateway: the running state that outlives any one config.

It holds the current L{Config} and everything derived from it, swaps both in
one assignment on reload, and gives the HTTP layer authentication,
authorization and the backend.  Requests take a snapshot of the config when
they start (L{clawdbot.http.site.GatewayRequest.process}), so a reload never
changes a request in flight.
"""

import os
import time

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger

from clawdbot.auth.tokens import build_authenticator
from clawdbot.auth.fetch import HTTPFetcher
from clawdbot.config import ConfigError, load_config, restart_needed
from clawdbot.errors import APIError, error_body
from clawdbot.backend.images import ImageWorkers
from clawdbot.ops.observe import AccessLog, Metrics
from clawdbot.backend.ollama import Ollama
from clawdbot.ops.ratelimit import build_limiter, rule_for
from clawdbot.http.history import HistoryReservations, SessionLocks
from clawdbot.storage.store import open_store
from clawdbot.backend.translate import sse_error
from clawdbot.http.site import JSONParsers, loopback_origin

log = Logger(namespace="clawdbot.gateway")


def rate_limited(decision, what):
    return APIError(
        "RATE_LIMITED",
        details=f"the {what} budget of {decision.limit} per minute is spent; retry after {decision.headers().get('Retry-After', '1')}s",
        headers=decision.headers(),
    )


class Gateway:
    """
    @ivar config: the config new requests start under.
    @ivar reloads: counts of reload results, C{{"ok": n, "error": n}}.
    """

    def __init__(self, config, reactor, environ=None, mode=None):
        self.reactor = reactor
        self.environ = os.environ if environ is None else environ
        self.mode = mode
        self.reloads = {"ok": 0, "error": 0}
        self._reload_pending = False
        self._reload_hooks = []
        self.config = config
        self.fetcher = HTTPFetcher(reactor)
        self.backend = Ollama(reactor, self)
        self.store = open_store(config, reactor)
        self.session_locks = SessionLocks()
        self.history_reservations = HistoryReservations()
        # Images are decoded on these threads, never on the reactor.
        self.images = ImageWorkers(reactor)
        # Big JSON bodies are parsed on these threads, never on the reactor.
        self.parsers = JSONParsers(reactor)
        self.auth = build_authenticator(config, reactor, self.fetcher.fetch_json)
        self.limiter = build_limiter(config, reactor, on_error=lambda: self.metrics.ratelimit_backend_errors.inc())
        self.access_log = AccessLog(config.access_log.path)
        self.metrics = Metrics(self)
        self.inflight = set()
        self.draining = False
        self.on_reload(self._rebuild_auth)
        self.on_reload(self._limiter_policy)

    def _rebuild_auth(self, old, new):
        self.auth = build_authenticator(new, self.reactor, self.fetcher.fetch_json)

    def _limiter_policy(self, old, new):
        # The Redis outage policy applies at once; backend and url need a restart.
        self.limiter.on_backend_error = new.rate_limit.on_backend_error

    def stop(self):
        """Close outbound connections and stop the image workers at shutdown."""
        self.images.stop()
        self.parsers.stop()
        self.store.close()
        self.limiter.close()
        return gatherResults([self.backend.close(), self.fetcher.close()])

    # --- requests ----------------------------------------------------------------

    def request_started(self, request):
        self.inflight.add(request)
        if self.draining:
            request.draining = True
        rate = request.config.access_log.sample_rate
        if self.access_log.sampled(rate):
            request.sampled = True
            request.captured = []
            # Copied now: twisted.web releases the body when the response ends.
            request.body_sample = request.body_copy()

    def request_done(self, request):
        """Account for a finished (or abandoned) request: log, metrics, token budget."""
        self.inflight.discard(request)
        if request.path is None and not request.refused:
            return  # the connection closed before a request arrived whole
        latency = time.perf_counter() - request.started
        usage = request.audit.get("usage")
        meter = request.audit.pop("meter", None)
        if usage is None and meter is not None:
            # A call that ended (client gone, backend cut off) before
            # Ollama's counts: charge the meter's estimate.
            usage = meter.usage()
            if usage is not None:
                request.audit["usage"] = usage
                request.audit["tokens"] = usage["total_tokens"]
        self.access_log.record(request, latency)
        self.metrics.observe(request, latency)
        self._settle_tokens(request, usage)
        if self.draining and not self.inflight and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def _settle_tokens(self, request, usage):
        """Charge what a call cost, less what was reserved for it (a refund when it cost less)."""
        reserved = request.audit.pop("reserved", 0)
        spent = usage["total_tokens"] if usage else 0
        if (spent or reserved) and request.principal is not None and request.config is not None:
            rule = rule_for(request.principal, request.config)
            if rule.tokens_per_minute and spent != reserved:
                d = Deferred.fromCoroutine(self.limiter.spend(request.principal.key, rule.tokens_per_minute, spent - reserved, "tokens"))
                d.addErrback(lambda f: log.failure("Could not count tokens", f))

    async def reserve_tokens(self, request, estimate):
        """
        Take a call's estimated prompt from the token budget before it goes
        to the model (added to what the request reserved before, when it
        makes a second call), in one atomic step that refuses once the budget is
        spent, so that calls made at the same moment cannot all pass a check
        made before any of them was charged.  L{request_done} settles the
        difference with Ollama's counts.

        @raise APIError: 429 RATE_LIMITED when the budget is spent.
        """
        rule = rule_for(request.principal, request.config)
        if not rule.tokens_per_minute:
            return
        decision = await self.limiter.reserve(request.principal.key, rule.tokens_per_minute, estimate, "tokens")
        if not decision.allowed:
            raise rate_limited(decision, "token")
        if decision.limit:
            # (Not when an unreachable shared limiter let the call through.)
            request.audit["reserved"] = request.audit.get("reserved", 0) + estimate

    async def check_rate(self, request):
        """The principal's request and token budgets; 429 RATE_LIMITED when spent."""
        principal = request.principal
        rule = rule_for(principal, request.config)
        decision = await self.limiter.take(principal.key, rule.requests_per_minute)
        for name, value in decision.headers().items():
            if name != "Retry-After":
                request.setHeader(name, value)
        if not decision.allowed:
            raise rate_limited(decision, "request")
        if rule.tokens_per_minute:
            tokens = await self.limiter.peek(principal.key, rule.tokens_per_minute, "tokens")
            for name, value in tokens.headers(generic=False).items():
                if name != "Retry-After":
                    request.setHeader(name, value)
            if not tokens.allowed:
                raise rate_limited(tokens, "token")

    async def check_ip_rate(self, request):
        """The per-address budget of the sign-in endpoints."""
        limit = request.config.rate_limit.auth_per_ip_per_minute
        host = getattr(request.getClientAddress(), "host", "unknown")
        decision = await self.limiter.take(host, limit, kind="auth-ip")
        if not decision.allowed:
            raise rate_limited(decision, "sign-in")

    # --- shutdown ----------------------------------------------------------------

    _drained = None

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
            if request.startedWriting and request.stream_format == "sse":
                request.write(sse_error(err))
            elif request.startedWriting and request.stream_format == "ndjson":
                request.write(error_body(err) + b"\n")
            if request.channel is not None:
                transports.append(request.channel.transport)
            if request.handler is not None:
                request.handler.cancel()
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
        """Count and log a failed reload; the running config stays."""
        self.reloads["error"] += 1
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
        log.info("Config reloaded from {file}", file=path)
        return True

    # --- the HTTP layer's questions ----------------------------------------------

    def cors_rule(self, request, debug):
        """
        Which C{Origin}s may read a listener's answers (L{clawdbot.http.cors}):
        any page on this machine on the debug listener (the rule of its own
        check, L{loopback_origin}), and on the secure one exactly those in
        C{server.cors_origins} of the config the request started under.
        """
        if debug:
            return loopback_origin
        return (request.config or self.config).server.cors_origins.__contains__

    async def authenticate(self, request):
        """The request's principal; see L{clawdbot.auth.tokens}."""
        return await self.auth.authenticate(request)

    def authorize(self, request, principal, scope):
        self.auth.authorize(principal, scope)
