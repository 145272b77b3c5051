"""
The resource tree.  Each route is a thin L{APIResource} that declares the
scope each method needs; the work is done in the modules it calls.
"""

from clawdbot import api, sessions, sso
from clawdbot.static import StaticFiles, static_dir
from clawdbot.web import APIResource, JSONResponse, Node


class Health(APIResource):
    """C{GET /healthz}: the process is alive and its reactor turns."""

    scopes = {"GET": None}
    route_name = "healthz"

    async def handle_GET(self, request):
        return {"status": "ok"}


class Ready(APIResource):
    """
    C{GET /readyz}: a config is loaded and Ollama answers.  503 with the
    reason otherwise, so a load balancer and a person both learn why.
    """

    scopes = {"GET": None}
    route_name = "readyz"

    async def handle_GET(self, request):
        checks = {"config": "ok"}
        reason = await self.gateway.backend.check()
        checks["backend"] = reason or "ok"
        checks["backends"] = self.gateway.backend.status(request.config)
        self.gateway.metrics.backend_up.set(0 if reason else 1)
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
