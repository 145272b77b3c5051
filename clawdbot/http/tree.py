"""
The resource tree.  Each route is a thin L{APIResource} that declares the
scope each method needs; the work is done in the modules it calls.  The
routes get their collaborators at construction, from the L{Parts}
L{clawdbot.tap.makeService} builds once.
"""

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from clawdbot.backend.ollama import backend_urls, display_url
from clawdbot.http import admin, agents, chat, history, keys, native, sso
from clawdbot.http.static import StaticFiles, static_dir
from clawdbot.http.resource import APIResource, JSONResponse, Node

log = Logger(namespace="clawdbot.web")


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
    The answers to "does each dependency answer?", shared by every
    C{/readyz} of one gateway (each listener has its own L{Ready}, all with
    one of these): C{backend} (Ollama, L{clawdbot.backend.ollama.Ollama.check}),
    C{storage} (the history store, L{clawdbot.storage.store.SQLStore.ping})
    and C{rate_limit} (the limiter's store, L{clawdbot.ops.ratelimit.RedisLimiter.ping};
    in memory it always answers).

    C{/readyz} needs no credentials, so it must not drive a dependency at
    the caller's pace: each dependency's answer (ready or not) is reused
    for L{TTL} seconds, a config reload asks again, and callers that arrive
    while a check is under way wait for that one check instead of starting
    their own.  At most one probe per dependency per TTL, however many
    calls arrive.  Each answer also sets C{clawdbot_dependency_up}.

    @ivar clock: what decides when an answer is stale (the gateway's
        reactor; a test may set a L{twisted.internet.task.Clock}).
    @ivar probes: each dependency's name and its probe, a coroutine
        function answering C{None} (it answers) or a short curated reason.
    @ivar counts: how many probes each dependency had.
    """

    TTL = 1.0
    # The dependencies, in the order /readyz lists them.
    NAMES = ("backend", "storage", "rate_limit")

    def __init__(self, runtime, ollama, metrics, store=None, limiter=None, ttl=TTL):
        self.runtime = runtime
        self.ollama = ollama
        self.metrics = metrics
        self.clock = runtime.reactor
        self.ttl = ttl
        self.probes = {"backend": ollama.check}
        if store is not None:
            self.probes["storage"] = store.ping
        if limiter is not None:
            self.probes["rate_limit"] = limiter.ping
        self.counts = dict.fromkeys(self.probes, 0)
        self._answers = {}  # name: (reason, when, config)
        self._waiters = {}  # name: a list while its check is under way

    @property
    def checks(self):
        """How many times Ollama was asked."""
        return self.counts["backend"]

    async def reason(self, name="backend"):
        """C{None} when dependency C{name} answers, else a short reason (see L{probes})."""
        answer = self._answers.get(name)
        if answer is not None:
            reason, when, config = answer
            age = self.clock.seconds() - when
            if config is self.runtime.config and 0 <= age < self.ttl:
                return reason
        waiter = Deferred()
        if name not in self._waiters:
            self._waiters[name] = [waiter]
            # Not tied to any one request: a caller that goes away cancels
            # only its own wait, never the check the others wait for.
            Deferred.fromCoroutine(self._check(name))
        else:
            self._waiters[name].append(waiter)
        return await waiter

    async def report(self):
        """
        C{{name: None or reason}} for every dependency, checked at once.  A
        check that fails by itself (a bug) reads as failing, logged.
        """

        async def one(name):
            try:
                return await self.reason(name)
            except Exception:
                log.failure("The readiness check of {dependency} failed", dependency=name)
                return "the check failed"

        names = [name for name in self.NAMES if name in self.probes]
        reasons = await gatherResults([Deferred.fromCoroutine(one(name)) for name in names])
        return dict(zip(names, reasons))

    async def _check(self, name):
        config = self.runtime.config
        self.counts[name] += 1
        try:
            reason = await self.probes[name]()
            self._answers[name] = (reason, self.clock.seconds(), config)
            if name == "backend":
                self.metrics.backend_up.set(0 if reason else 1)
            self.metrics.dependency_up.labels(name).set(0 if reason else 1)
            failure = None
        except Exception:
            failure, reason = Failure(), None  # not cached: the next call asks again
        waiters = self._waiters.pop(name)
        for waiter in waiters:
            if waiter.called:  # cancelled by a caller that went away
                continue
            if failure is None:
                waiter.callback(reason)
            else:
                waiter.errback(failure)


class Ready(APIResource):
    """
    C{GET /readyz}: a config is loaded and the dependencies that
    C{server.ready_requires} names (by default Ollama) answer.  503 with
    the reason otherwise, so a load balancer and a person both learn why;
    every dependency's state is in the body, required or not.  Answers are
    cached for about a second and shared by concurrent calls
    (L{Readiness}).  While the gateway drains (after SIGTERM) the answer is
    503 C{shutting down} whatever the dependencies say, in the same body
    (C{checks} and C{dependencies} as always).
    """

    scopes = {"GET": None}
    route_name = "readyz"
    # How each dependency is named in a reason.
    SHOWN = {"storage": "history storage", "rate_limit": "rate-limit store"}

    def __init__(self, parts):
        super().__init__(parts)
        self.readiness = parts.readiness
        self.ollama = parts.ollama
        self.runtime = parts.runtime

    async def handle_GET(self, request):
        config = request.config
        required = config.server.ready_requires
        # One body in every state (a drain included): each dependency as
        # last asked (L{Readiness} asks at most once a TTL).
        reasons = await self.readiness.report()
        checks = {"config": "ok"}
        dependencies = {}
        for name, reason in reasons.items():
            checks[name] = reason or "ok"
            dependencies[name] = {"status": "failing" if reason else "ok", "required": name in required}
            if reason:
                dependencies[name]["reason"] = reason
        checks["backends"] = self.ollama.status(config)
        if self.runtime.draining:
            return JSONResponse({"status": "not ready", "reason": "shutting down", "checks": checks, "dependencies": dependencies}, status=503)
        failing = [name for name, reason in reasons.items() if reason and name in required]
        if failing:
            why = "; ".join(f"{self._where(name, config)}: {reasons[name]}" for name in failing)
            return JSONResponse({"status": "not ready", "reason": why, "checks": checks, "dependencies": dependencies}, status=503)
        return {"status": "ready", "checks": checks, "dependencies": dependencies}

    def _where(self, name, config):
        """What a reason names: Ollama (in dev mode with the addresses tried), the history storage, the rate-limit store."""
        if name != "backend":
            return self.SHOWN[name]
        if config.server.mode == "dev":
            # A newcomer's machine: say which address was tried (never in production, where /readyz is public).
            return "Ollama at " + ", ".join(display_url(url) for url in backend_urls(config))
        return "Ollama"


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
