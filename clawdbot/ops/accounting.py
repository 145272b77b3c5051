"""
What each request costs and leaves behind: its access-log line, its
metrics, and its budgets (requests and tokens per minute, sign-ins per
address), reserved before a call to the model and settled to Ollama's
counts when the request ends.
"""

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from clawdbot.errors import APIError
from clawdbot.net import KNOWN_METHODS
from clawdbot.ops.observe import logged_status, safe_path
from clawdbot.ops.ratelimit import rule_for
from clawdbot.ops.tracing import ROUTES, short, trace_id

if TYPE_CHECKING:
    from clawdbot.ops.observe import AccessLog, Metrics
    from clawdbot.ops.ratelimit import Decision, MemoryLimiter, RedisLimiter
    from clawdbot.ops.quotas import Quotas
    from clawdbot.ops.tracing import Tracing

log = Logger(namespace="clawdbot.gateway")


def rate_limited(decision: "Decision", what: str) -> APIError:
    return APIError(
        "RATE_LIMITED",
        details=f"the {what} budget of {decision.limit} per minute is spent; retry after {decision.headers().get('Retry-After', '1')}s",
        headers=decision.headers(),
    )


# Probes and scrapes, every few seconds: no trace (they would crowd out the requests).
UNTRACED = frozenset({b"/healthz", b"/readyz", b"/metrics"})


def span_method(request: Any) -> str:
    """A request's method as the HTTP conventions put it in a span: a known one, else C{_OTHER}."""
    return request.method.decode("ascii") if request.method in KNOWN_METHODS else "_OTHER"


class Accounting:
    """
    Each method takes the gateway's request (L{clawdbot.http.site.GatewayRequest}),
    typed C{Any}: this layer may not import the HTTP one.

    @param limiter: the budgets' store (L{clawdbot.ops.ratelimit}).
    @param access_log: where each request's line goes (L{clawdbot.ops.observe.AccessLog}).
    @param metrics: the Prometheus metrics (L{clawdbot.ops.observe.Metrics}).
    @param usage: where model calls are counted (L{clawdbot.storage.usage.UsageBook}).
    @param quotas: the quotas over days, weeks and months (L{clawdbot.ops.quotas.Quotas}).
    @param tracing: OpenTelemetry traces (L{clawdbot.ops.tracing.Tracing}): a
        server span from L{started} to L{done}.
    """

    def __init__(
        self,
        limiter: "MemoryLimiter | RedisLimiter",
        access_log: "AccessLog",
        metrics: "Metrics",
        usage: Any = None,
        quotas: "Quotas | None" = None,
        audit: Any = None,
        tracing: "Tracing | None" = None,
    ) -> None:
        self.audit = audit
        self.tracing = tracing
        self.limiter = limiter
        self.access_log = access_log
        self.metrics = metrics
        self.usage = usage
        self.quotas = quotas

    def started(self, request: Any) -> None:
        """A request arrived whole: its server span begins; sample it for the access log (its body copied now)."""
        if self.tracing is not None and self.tracing.enabled and request.path not in UNTRACED:
            request.span = self.tracing.server_span(request, span_method(request))
            if request.span is not None:
                request.trace_id = trace_id(request.span)
        rate = request.config.access_log.sample_rate
        if self.access_log.sampled(rate):
            request.sampled = True
            request.captured = []
            # Copied now: twisted.web releases the body when the response ends.
            request.body_sample = request.body_copy()

    def done(self, request: Any) -> None:
        """Account for a finished (or abandoned) request: log, metrics, token budget."""
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
        if request.span is not None:
            self._end_span(request, usage)
        error = request.error
        if error is not None and error.code == "QUOTA_EXCEEDED" and self.audit is not None:
            # Every quota's refusal, wherever it came from (days and months, stored history, stored responses).
            self.audit.record("quota.exceeded", request, obj=getattr(request, "route", None), reason=error.details)
        self._settle_tokens(request, usage)
        held = request.audit.pop("quota_held", None)
        if held and self.quotas is not None:
            self.quotas.release(held)
        if meter is not None and self.usage is not None and request.principal is not None and (meter.sent or usage is not None):
            # A call that reached the model: it counts, however it ended.
            failed = request.error is not None or logged_status(request) >= 400
            self.usage.record(request.principal, request.audit.get("model"), usage, failed, latency)

    def _end_span(self, request: Any, usage: dict[str, Any] | None) -> None:
        """
        The server span's name ("{method} {route}", e.g. C{POST
        /v1/chat/completions}), its attributes (HTTP, who asked, the GenAI
        conventions), and its end.
        """
        span = request.span
        if span.is_recording():
            method = span_method(request)
            route = ROUTES.get(request.route)
            if route is not None:
                span.update_name(f"{method} {route}")
            principal = request.principal
            model = request.audit.get("model")
            session = request.audit.get("session")
            attributes = {
                "http.request.method": method,
                "url.path": short(safe_path(request)),
                "http.response.status_code": logged_status(request),
                "http.route": route,
                "clawdbot.route": request.route,
                "clawdbot.request_id": request.request_id,
                "enduser.id": principal.sub if principal is not None else None,
                "clawdbot.principal.issuer": principal.issuer if principal is not None else None,
                "clawdbot.teams": list(principal.teams) if principal is not None and principal.teams else None,
                "clawdbot.key_id": principal.key_id if principal is not None else None,
                "clawdbot.session_id": short(session) if isinstance(session, str) else None,
                "clawdbot.client_gone": True if request.gone else None,
                "gen_ai.request.model": short(model) if isinstance(model, str) else None,
            }
            if usage and isinstance(model, str):
                attributes["gen_ai.response.model"] = short(model)
                attributes["gen_ai.usage.input_tokens"] = usage.get("prompt_tokens")
                attributes["gen_ai.usage.output_tokens"] = usage.get("completion_tokens")
            attributes.update(request.gen_ai)
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
            error = request.error
            if error is not None:
                span.set_attribute("error.type", error.code)
            if logged_status(request) >= 500 and self.tracing is not None:
                # (As the HTTP conventions say: a server span fails on a 5xx, not on the client's 4xx.)
                self.tracing.failed(span, error.code if error is not None else "INTERNAL_ERROR")
        span.end()

    def _settle_tokens(self, request: Any, usage: dict[str, Any] | None) -> None:
        """Charge what a call cost, less what was reserved for it (a refund when it cost less)."""
        reserved = request.audit.pop("reserved", 0)
        spent = usage["total_tokens"] if usage else 0
        if (spent or reserved) and request.principal is not None and request.config is not None:
            rule = rule_for(request.principal, request.config)
            if rule.tokens_per_minute and spent != reserved:
                d = Deferred.fromCoroutine(self.limiter.spend(request.principal.key, rule.tokens_per_minute, spent - reserved, "tokens"))
                d.addErrback(lambda f: log.failure("Could not count tokens", f))

    async def reserve_tokens(self, request: Any, estimate: int) -> None:
        """
        Take a call's estimated prompt from the token budget before it goes
        to the model (added to what the request reserved before, when it
        makes a second call), in one atomic step that refuses once the budget is
        spent, so that calls made at the same moment cannot all pass a check
        made before any of them was charged.  L{done} settles the
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

    async def check_quota(self, request: Any, estimate: int = 0) -> None:
        """
        The quotas over days, weeks and months (L{clawdbot.ops.quotas.Quotas}),
        before a call to the model: 429 QUOTA_EXCEEDED when one is spent;
        what is left goes in the response's headers.  A call that passes is
        held against the allowances (one request, C{estimate} tokens) until
        it ends (L{done}), when its real use is counted instead.
        """
        if self.quotas is None:
            return
        held = request.audit.setdefault("quota_held", [])
        for name, value in (await self.quotas.check(request.principal, request.config, estimate, held)).items():
            request.setHeader(name, value)

    async def check_rate(self, request: Any) -> None:
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

    async def check_ip_rate(self, request: Any) -> None:
        """The per-address budget of the sign-in endpoints."""
        limit = request.config.rate_limit.auth_per_ip_per_minute
        host = request.client_host()
        decision = await self.limiter.take(host, limit, kind="auth-ip")
        if not decision.allowed:
            raise rate_limited(decision, "sign-in")
