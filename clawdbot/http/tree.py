"""
The resource tree.  Each route is a thin L{APIResource} that declares the
scope each method needs; the work is done in the modules it calls.
"""

import weakref

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from clawdbot.http import chat as api
from clawdbot.http import history as sessions
from clawdbot.http import sso
from clawdbot.http.static import StaticFiles, static_dir
from clawdbot.http.site import APIResource, JSONResponse, Node


class Health(APIResource):
    """C{GET /healthz}: the process is alive and its reactor turns."""

    scopes = {"GET": None}
    route_name = "healthz"

    async def handle_GET(self, request):
        return {"status": "ok"}


class Readiness:
    """
    The answer to "does Ollama answer?", shared by every C{/readyz} of one
    gateway (each listener has its own L{Ready}).

    C{/readyz} needs no credentials, so it must not drive the backend at the
    caller's pace: an answer (ready or not) is reused for L{TTL} seconds, a
    config reload asks again, and callers that arrive while a check is under
    way wait for that one check instead of starting their own.  At most one
    C{/api/version} per backend per TTL, however many calls arrive.

    @ivar clock: what decides when an answer is stale (the gateway's
        reactor; a test may set a L{twisted.internet.task.Clock}).
    """

    TTL = 1.0
    _by_gateway = weakref.WeakKeyDictionary()

    def __init__(self, gateway, ttl=TTL):
        self.gateway = gateway
        self.clock = gateway.reactor
        self.ttl = ttl
        self._answer = None  # (reason, when, config)
        self._waiters = None  # a list while a check is under way
        self.checks = 0

    @classmethod
    def of(cls, gateway):
        """The one L{Readiness} of C{gateway}."""
        readiness = cls._by_gateway.get(gateway)
        if readiness is None:
            readiness = cls._by_gateway[gateway] = cls(gateway)
        return readiness

    async def reason(self):
        """C{None} when ready, else a short reason (L{clawdbot.backend.ollama.Ollama.check})."""
        if self._answer is not None:
            reason, when, config = self._answer
            age = self.clock.seconds() - when
            if config is self.gateway.config and 0 <= age < self.ttl:
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
        config = self.gateway.config
        self.checks += 1
        try:
            reason = await self.gateway.backend.check()
            self._answer = (reason, self.clock.seconds(), config)
            self.gateway.metrics.backend_up.set(0 if reason else 1)
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

    async def handle_GET(self, request):
        checks = {"config": "ok"}
        reason = await Readiness.of(self.gateway).reason()
        checks["backend"] = reason or "ok"
        checks["backends"] = self.gateway.backend.status(request.config)
        if reason:
            return JSONResponse({"status": "not ready", "reason": f"Ollama: {reason}", "checks": checks}, status=503)
        return {"status": "ready", "checks": checks}


class MetricsPage(APIResource):
    """C{GET /metrics}: Prometheus text; scope admin (or a separate loopback listener)."""

    scopes = {"GET": "admin"}
    route_name = "metrics"
    open_access = False

    def route(self, request):
        return {"GET": None} if self.open_access else self.scopes

    async def handle_GET(self, request):
        body = self.gateway.metrics.render()
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()


def metrics_root(gateway):
    """The tree of the separate metrics listener: /metrics, no authentication."""
    root = Node()
    page = MetricsPage(gateway)
    page.open_access = True
    root.putChild(b"metrics", page)
    return root


class Me(APIResource):
    """C{GET /v1/me}: the caller's principal; any valid credential."""

    scopes = {"GET": ""}
    route_name = "me"

    async def handle_GET(self, request):
        return request.principal.as_dict()


def build_root(gateway, debug):
    """
    The tree one listener serves.  The debug listener's tree has no OAuth2
    endpoints.
    """
    root = Node()
    pages = static_dir()
    root.putChild(b"", StaticFiles(pages, index="index.html"))
    root.putChild(b"static", StaticFiles(pages))
    root.putChild(b"healthz", Health(gateway))
    root.putChild(b"readyz", Ready(gateway))
    root.putChild(b"metrics", MetricsPage(gateway))
    v1 = Node()
    root.putChild(b"v1", v1)
    v1.putChild(b"me", Me(gateway))
    api.add_routes(root, v1, gateway)
    sessions.add_routes(v1, gateway)
    if not debug:
        # Sign-in lives on the secure listener only, never the debug one.
        sso.add_routes(root, gateway)
    return root
