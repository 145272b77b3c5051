"""
The operator's JSON APIs behind the admin page (scope C{admin}): what is
happening now (L{Status}), usage of everyone (L{AdminUsage}), the people
seen and what applies to them (L{Users}), and the audit trail (L{Audit}).
The keys' routes (C{/v1/admin/keys}) live with the keys
(L{clawdbot.http.keys}).  The page, C{/admin}, is a shell that reads these.
"""

import collections
import os
import urllib.parse

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from clawdbot.auth.identity import Principal
from clawdbot.backend.ollama import display_url
from clawdbot.errors import APIError, invalid
from clawdbot.http.keys import NO_STORE, Usage
from clawdbot.http.resource import APIResource, JSONResponse, query_arg
from clawdbot.ops.audit import EVENTS
from clawdbot.units import rfc3339

log = Logger(namespace="clawdbot.admin")

MAX_USERS = 500
PS_TIMEOUT = 2.0
MAX_EVENTS = 1000


def _arg(request, name):
    """A query parameter, given once, in UTF-8 (else a 400)."""
    try:
        return query_arg(request, name)
    except (ValueError, UnicodeDecodeError):
        raise invalid(f"'{name}' may be given once, in UTF-8") from None


def _int_arg(request, name, default, low, high):
    value = _arg(request, name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and low <= int(value) <= high):
        raise invalid(f"'{name}' must be a whole number from {low} to {high}")
    return int(value)


def _rss_bytes():
    """The process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open_files():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class AdminRoute(APIResource):
    scopes = {"GET": "admin"}

    def __init__(self, parts):
        super().__init__(parts)
        self.parts = parts


class Status(AdminRoute):
    """
    C{GET /v1/admin/status}: now: the process, the requests and streams in
    flight (per route, model and user), the fair-share queue (per user and
    per capped model), each backend's health and the models it has loaded
    (Ollama's C{/api/ps}), and the last reload.
    """

    route_name = "admin_status"

    async def handle_GET(self, request):
        parts = self.parts
        config = request.config
        runtime = parts.runtime
        now = parts.reactor.seconds()
        routes, streams_by_model, streams_by_user = collections.Counter(), collections.Counter(), collections.Counter()
        streams = 0
        for other in list(runtime.inflight):
            if other is request:
                continue
            routes[getattr(other, "route", None) or "-"] += 1
            if other.stream_format is not None and not other.finished:
                streams += 1
                streams_by_model[str(other.audit.get("model") or "-")] += 1
                principal = other.principal
                streams_by_user[principal.sub if principal is not None else "-"] += 1
        slots = parts.ollama.slots
        queue_users = collections.defaultdict(lambda: {"active": 0, "waiting": 0})
        for key, held in slots.held.items():
            if held:
                queue_users[_sub_of(key)]["active"] += held
        for waiter in slots.waiting:
            queue_users[_sub_of(waiter.share.key)]["waiting"] += 1
        capped = {model: {"active": s.active, "waiting": len(s.waiting)} for model, s in parts.ollama.model_slots.items()}
        backends = []
        loaded, errors = [], []
        upstreams = parts.ollama.upstreams(config)
        # All backends are asked at once: the answer takes PS_TIMEOUT at most, however many hang.
        answers = await gatherResults([Deferred.fromCoroutine(self._loaded(config, u)) if u.down_until <= now else succeed((None, "down")) for u in upstreams])
        for i, (upstream, (names, error)) in enumerate(zip(upstreams, answers)):
            # Asking may have found it unreachable (and marked it down).
            up = upstream.down_until <= parts.reactor.seconds()
            backends.append(
                {
                    "backend": i,
                    "url": display_url(upstream.url),
                    "up": up,
                    "active": upstream.active,
                    "down_for_seconds": max(0, round(upstream.down_until - now, 1)),
                    "loaded": names,
                    "loaded_error": error,
                }
            )
            loaded += names or []
            if error and up:
                errors.append(f"backend {i}: {error}")
        audit = parts.audit
        reload = dict(runtime.last_reload) if runtime.last_reload else None
        if reload is not None:
            reload["time"] = rfc3339(reload["time"])
        return JSONResponse(
            {
                "time": rfc3339(now),
                "process": {
                    "pid": os.getpid(),
                    "started_at": rfc3339(runtime.started),
                    "uptime_seconds": round(now - runtime.started, 1),
                    "rss_bytes": _rss_bytes(),
                    "open_files": _open_files(),
                    "requests_in_flight": sum(routes.values()),
                },
                "requests": {"by_route": dict(routes)},
                "streams": {"total": streams, "by_model": dict(streams_by_model), "by_user": dict(streams_by_user)},
                "queue": {
                    "max_connections": config.max_connections,
                    "active": slots.active,
                    "waiting": len(slots.waiting),
                    "by_user": dict(queue_users),
                    "by_model": capped,
                },
                "backends": backends,
                "loaded_models": loaded if not errors or loaded else None,
                "loaded_models_error": "; ".join(errors) or None,
                "audit_log": {"path": audit.path, "writing": audit.stream is not None, "error": audit.error},
                "reload": reload,
                "reloads": dict(runtime.reloads),
            },
            headers=NO_STORE,
        )

    async def _loaded(self, config, upstream):
        """One backend's loaded models (name, size in memory, until when), or a reason; never more than L{PS_TIMEOUT}."""
        try:
            answer = await self.parts.ollama.loaded(config, upstream, PS_TIMEOUT)
        except APIError as e:
            return None, e.details or e.message
        models = answer.get("models") if isinstance(answer, dict) else None
        out = []
        for m in models if isinstance(models, list) else []:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                out.append({"name": m["name"], "size_vram": m.get("size_vram"), "expires_at": m.get("expires_at")})
        return out, None


def _sub_of(key):
    """The C{sub} of an owner key, for display."""
    return key.split("|", 1)[1] if isinstance(key, str) and "|" in key else str(key)


class AdminUsage(Usage):
    """C{GET /v1/admin/usage}: as C{/v1/usage}, with everyone's usage when no C{user} or C{team} narrows it."""

    scopes = {"GET": "admin"}
    route_name = "admin_usage"
    everyone = True


class Users(AdminRoute):
    """
    C{GET /v1/admin/users?limit=&user=}: the people seen lately (newest
    first), with the scopes and teams of their last sign-in or token, their
    live API keys, and each quota that applies to them with what is left.
    """

    route_name = "admin_users"

    async def handle_GET(self, request):
        limit = _int_arg(request, "limit", 100, 1, MAX_USERS)
        sub = _arg(request, "user")
        keys = self.parts.keys
        grants = await keys.store.grants(limit, sub=sub)
        now = self.parts.reactor.seconds()
        live = collections.Counter(record.owner for record in await keys.store.list(live_at=now, limit=100_000))
        quotas = self.parts.accounting.quotas
        data = []
        for grant in grants:
            issuer, _, user = grant.owner.partition("|")
            issuer = urllib.parse.unquote(issuer)
            principal = Principal(user, grant.scopes, grant.name, grant.email, grant.teams, issuer)
            standing = await quotas.standing(principal, request.config) if quotas is not None else []
            data.append(
                {
                    "user": user,
                    "issuer": issuer,
                    "name": grant.name,
                    "email": grant.email,
                    "scopes": sorted(grant.scopes),
                    "teams": list(grant.teams),
                    "signed_in": not grant.ended,
                    "last_seen": rfc3339(grant.seen_at) if grant.seen_at else None,
                    "live_keys": live.get(grant.owner, 0),
                    "quotas": standing,
                }
            )
        return JSONResponse({"object": "list", "data": data}, headers=NO_STORE)


class Audit(AdminRoute):
    """
    C{GET /v1/admin/audit?event=&limit=&before=}: the newest audit events
    (of one name; older than an event id, to page back), from the database
    (C{audit_log.store}).
    """

    route_name = "admin_audit"

    async def handle_GET(self, request):
        event = _arg(request, "event")
        if event is not None and event not in EVENTS:
            raise invalid("'event' must be one of " + ", ".join(EVENTS))
        limit = _int_arg(request, "limit", 100, 1, MAX_EVENTS)
        before = _int_arg(request, "before", None, 1, 2**62)
        if not request.config.audit_log.store:
            return JSONResponse({"object": "list", "stored": False, "data": [], "has_more": False}, headers=NO_STORE)
        # A database that cannot answer is a 503 (StorageUnavailable).
        rows = await self.parts.audit.store.recent(limit + 1, event=event, before=before)
        data = [dict(entry, id=rid) for rid, entry in rows[:limit]]
        return JSONResponse({"object": "list", "stored": True, "data": data, "has_more": len(rows) > limit}, headers=NO_STORE)


def add_routes(admin, parts):
    admin.putChild(b"status", Status(parts))
    admin.putChild(b"usage", AdminUsage(parts))
    admin.putChild(b"users", Users(parts))
    admin.putChild(b"audit", Audit(parts))
