"""
The resource tree.  Each route is a thin L{APIResource} that declares the
scope each method needs; the work is done in the modules it calls.  The
routes get their collaborators at construction, from the L{Parts}
L{clawdbot.tap.makeService} builds once.
"""

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clawdbot.backend.ollama import backend_urls, display_url
from clawdbot.http import admin, agents, chat, history, keys, native, sso
from clawdbot.http.static import StaticFiles, static_dir
from clawdbot.http.resource import APIResource, JSONResponse, Node


@dataclass(frozen=True, eq=False)
class Parts:
    """
    Everything the routes work with, built once at start-up
    (L{clawdbot.tap.makeService}); each route takes what it needs when it is
    built, and nothing asks for anything per request.

    @ivar runtime: the config and its reloads, the requests in flight (L{clawdbot.ops.runtime.Runtime}).
    @ivar accounting: logs, metrics and budgets per request (L{clawdbot.ops.accounting.Accounting}).
    @ivar authentication: who a request is (L{clawdbot.auth.tokens.Authentication}).
    @ivar audit: the audit trail (L{clawdbot.ops.audit.AuditLog}).
    @ivar ollama: the model backend (L{clawdbot.backend.ollama.Ollama}).
    @ivar history: chat history and its rules (L{clawdbot.storage.history.History}).
    @ivar keys: the personal API keys (L{clawdbot.auth.keys.ApiKeys}).
    @ivar responses: the Responses API's stored responses (L{clawdbot.storage.responses.ResponseStore}).
    @ivar usage: usage accounting (L{clawdbot.ops.quotas.UsageBook}).
    @ivar batches: the periodic writes of usage and keys (L{clawdbot.ops.quotas.Batches}).
    @ivar images: the image workers (L{clawdbot.backend.images.ImageWorkers}).
    @ivar parsers: the JSON parsing workers (L{clawdbot.http.resource.JSONParsers}).
    @ivar fetcher: the identity providers' client (L{clawdbot.auth.fetch.HTTPFetcher}).
    @ivar metrics: the Prometheus metrics (L{clawdbot.ops.observe.Metrics}).
    @ivar readiness: the shared answer of C{/readyz} (L{Readiness}).
    @ivar reactor: the clock and reactor.
    @ivar tracing: OpenTelemetry traces (L{clawdbot.ops.tracing.Tracing}).
    """

    runtime: Any
    accounting: Any
    audit: Any
    authentication: Any
    ollama: Any
    history: Any
    keys: Any
    responses: Any
    usage: Any
    batches: Any
    images: Any
    parsers: Any
    fetcher: Any
    metrics: Any
    readiness: Any
    reactor: Any
    tracing: Any


class Health(APIResource):
    """C{GET /healthz}: the process is alive and its reactor turns."""

    scopes = {"GET": None}
    route_name = "healthz"

    async def handle_GET(self, request):
        return {"status": "ok"}


class Readiness:
    """
    The answer to "does Ollama answer?", shared by every C{/readyz} of one
    gateway (each listener has its own L{Ready}, all with one of these).

    C{/readyz} needs no credentials, so it must not drive the backend at the
    caller's pace: an answer (ready or not) is reused for L{TTL} seconds, a
    config reload asks again, and callers that arrive while a check is under
    way wait for that one check instead of starting their own.  At most one
    C{/api/version} per backend per TTL, however many calls arrive.

    @ivar clock: what decides when an answer is stale (the gateway's
        reactor; a test may set a L{twisted.internet.task.Clock}).
    """

    TTL = 1.0

    def __init__(self, runtime, ollama, metrics, ttl=TTL):
        self.runtime = runtime
        self.ollama = ollama
        self.metrics = metrics
        self.clock = runtime.reactor
        self.ttl = ttl
        self._answer = None  # (reason, when, config)
        self._waiters = None  # a list while a check is under way
        self.checks = 0

    async def reason(self):
        """C{None} when ready, else a short reason (L{clawdbot.backend.ollama.Ollama.check})."""
        if self._answer is not None:
            reason, when, config = self._answer
            age = self.clock.seconds() - when
            if config is self.runtime.config and 0 <= age < self.ttl:
                return reason
        waiter = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            # Not tied to any one request: a caller that goes away cancels
            # only its own wait, never the check the others wait for.
            Deferred.fromCoroutine(self._check())
        else:
            self._waiters.append(waiter)
        return await waiter

    async def _check(self):
        config = self.runtime.config
        self.checks += 1
        try:
            reason = await self.ollama.check()
            self._answer = (reason, self.clock.seconds(), config)
            self.metrics.backend_up.set(0 if reason else 1)
            failure = None
        except Exception:
            failure, reason = Failure(), None  # not cached: the next call asks again
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            if waiter.called:  # cancelled by a caller that went away
                continue
            if failure is None:
                waiter.callback(reason)
            else:
                waiter.errback(failure)


class Ready(APIResource):
    """
    C{GET /readyz}: a config is loaded and Ollama answers.  503 with the
    reason otherwise, so a load balancer and a person both learn why.  The
    backend's answer is cached for about a second and shared by concurrent
    calls (L{Readiness}).
    """

    scopes = {"GET": None}
    route_name = "readyz"

    def __init__(self, parts):
        super().__init__(parts)
        self.readiness = parts.readiness
        self.ollama = parts.ollama

    async def handle_GET(self, request):
        checks = {"config": "ok"}
        reason = await self.readiness.reason()
        checks["backend"] = reason or "ok"
        checks["backends"] = self.ollama.status(request.config)
        if reason:
            where = "Ollama"
            if request.config.server.mode == "dev":
                # A newcomer's machine: say which address was tried (never in production, where /readyz is public).
                where = "Ollama at " + ", ".join(display_url(url) for url in backend_urls(request.config))
            return JSONResponse({"status": "not ready", "reason": f"{where}: {reason}", "checks": checks}, status=503)
        return {"status": "ready", "checks": checks}


class MetricsPage(APIResource):
    """C{GET /metrics}: Prometheus text; scope admin (or a separate loopback listener)."""

    scopes = {"GET": "admin"}
    route_name = "metrics"
    open_access = False

    def __init__(self, parts):
        super().__init__(parts)
        self.metrics = parts.metrics

    def route(self, request):
        return {"GET": None} if self.open_access else self.scopes

    async def handle_GET(self, request):
        body = self.metrics.render()
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()


def metrics_root(parts):
    """The tree of the separate metrics listener: /metrics, no authentication."""
    root = Node()
    page = MetricsPage(parts)
    page.open_access = True
    root.putChild(b"metrics", page)
    return root


class Me(APIResource):
    """C{GET /v1/me}: the caller's principal; any valid credential."""

    scopes = {"GET": ""}
    route_name = "me"

    async def handle_GET(self, request):
        return request.principal.as_dict()


def build_root(parts, debug):
    """
    The tree one listener serves.  The debug listener's tree has no OAuth2
    endpoints.
    """
    root = Node()
    pages = static_dir()
    root.putChild(b"", StaticFiles(pages, index="index.html"))
    root.putChild(b"static", StaticFiles(pages))
    # The admin page: a shell; its data comes from /v1/admin/... (scope admin).
    root.putChild(b"admin", StaticFiles(pages, index="admin.html"))
    root.putChild(b"healthz", Health(parts))
    root.putChild(b"readyz", Ready(parts))
    root.putChild(b"metrics", MetricsPage(parts))
    v1 = Node()
    root.putChild(b"v1", v1)
    v1.putChild(b"me", Me(parts))
    chat.add_routes(v1, parts)
    agents.add_routes(v1, parts)
    native.add_routes(root, parts)
    history.add_routes(v1, parts)
    keys.add_routes(v1, parts)
    admin.add_routes(v1.children[b"admin"], parts)
    if not debug:
        # Sign-in lives on the secure listener only, never the debug one.
        sso.add_routes(root, parts)
    return root
