"""
Personal API keys (L{clawdbot.auth.keys}) and usage (L{clawdbot.ops.quotas}):

    POST   /v1/keys             create a key for yourself; the key is in this answer only
    GET    /v1/keys             your live keys (never the key itself)
    DELETE /v1/keys/{id}        revoke one of yours, at once
    GET    /v1/admin/keys       every key (admin)
    DELETE /v1/admin/keys/{id}  revoke any key (admin)
    GET    /v1/usage            usage by day, user, team and model (JSON or CSV)

Keys are made and managed by a principal that signed in (a single sign-on
session, a bearer JWT, the debug listener's dev principal), never through a
key.  Someone else's key id is a 404, as is an id that is no key.
"""

import csv
import io

from twisted.logger import Logger

from clawdbot.auth.keys import is_key_id, owner_parts, server_key
from clawdbot.auth.identity import is_scope_token, issuer_id, owner_sub
from clawdbot.errors import APIError, invalid
from clawdbot.http.resource import APIResource, JSONResponse, Node, NotFound, query_arg, read_json, write_json
from clawdbot.units import day_start, local_date, parse_duration, rfc3339, window_bounds, zone_of

log = Logger(namespace="clawdbot.usage")

MAX_NAME = 100
NO_STORE = {"Cache-Control": "no-store"}
_CREATE_FIELDS = {"name", "scopes", "team", "expires_in"}
# The longest span one usage query may cover.
MAX_DAYS = 366


def key_view(record, now, admin=False):
    """A key as the API shows it (never its secret or its hash)."""
    if record.revoked_at is not None:
        status = "revoked"
    elif record.expires_at <= now:
        status = "expired"
    else:
        status = "active"
    view = {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "scopes": list(record.scopes),
        "team": record.team,
        "created_at": rfc3339(record.created_at),
        "expires_at": rfc3339(record.expires_at),
        "last_used_at": rfc3339(record.last_used_at) if record.last_used_at is not None else None,
        "status": status,
    }
    if admin:
        issuer, sub = owner_parts(record.owner)
        view["owner"] = sub
        view["owner_issuer"] = issuer
        view["revoked_at"] = rfc3339(record.revoked_at) if record.revoked_at is not None else None
    return view


def _signed_in(request):
    """Keys are managed by a principal that signed in on the secure listener, not through a key."""
    if request.site.debug:
        # The debug listener's dev principal needs no key there, and one
        # made for it must not carry its scopes to the secure listener.
        raise APIError("AUTH_INSUFFICIENT_SCOPE", details="the debug port makes no API keys; sign in on the secure port")
    if request.principal.key_id is not None:
        raise APIError("AUTH_INSUFFICIENT_SCOPE", details="API keys are managed after signing in, not with an API key")


def _keys_on(request):
    config = request.config
    if not config.auth.api_keys.enabled or server_key(config) is None:
        raise APIError("NOT_FOUND", details="API keys are turned off on this gateway (auth.api_keys)")


class KeysRoute(APIResource):
    """A key route, with the keys from the parts."""

    rate_limited = True
    # Whether its keys are anyone's (the operator's routes) or the caller's own.
    admin = False

    def __init__(self, parts):
        super().__init__(parts)
        self.parts = parts
        self.keys = parts.keys
        self.clock = parts.reactor

    def getChild(self, path, request):
        """C{.../{id}}: one key."""
        if not path:
            return NotFound()
        return KeyItem(self.parts, path.decode("utf-8", "replace"), self.admin)


class Keys(KeysRoute):
    """C{GET|POST /v1/keys}."""

    scopes = {"GET": "", "POST": ""}
    route_name = "keys"

    async def handle_GET(self, request):
        _signed_in(request)
        _keys_on(request)
        now = self.clock.seconds()
        records = await self.keys.list(request.principal.key, live=True)
        return JSONResponse({"object": "list", "data": [key_view(r, now) for r in records]}, headers=NO_STORE)

    async def handle_POST(self, request):
        _signed_in(request)
        _keys_on(request)
        principal = request.principal
        config = request.config
        body = await read_json(request)
        unknown = sorted(set(body) - _CREATE_FIELDS)
        if unknown:
            # (The name is the client's own text: shown only when short and printable.)
            shown = f"'{unknown[0]}'" if len(unknown[0]) <= 40 and unknown[0].isprintable() else "a field"
            raise invalid(f"{shown} is not a field of a key (use name, scopes, team, expires_in)")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
            raise invalid(f"'name' must be a non-empty string of at most {MAX_NAME} printable characters")
        scopes = body.get("scopes")
        if scopes is None:
            scopes = sorted(principal.scopes)
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise invalid("'scopes' must be a non-empty list of scopes")
        for scope in scopes:
            if not is_scope_token(scope) or scope not in principal.scopes:
                raise invalid("'scopes' may hold only scopes you have yourself")
        team = body.get("team")
        if team is not None and (not isinstance(team, str) or team not in principal.teams):
            raise invalid("'team' must be one of your teams")
        keys_config = config.auth.api_keys
        ttl = keys_config.default_ttl
        if body.get("expires_in") is not None:
            ttl = _duration(body["expires_in"])
            if ttl > keys_config.max_ttl:
                raise invalid(f"'expires_in' must be at most {_days(keys_config.max_ttl)}")
        made = await self.keys.create(principal, name.strip(), set(scopes), team, ttl)
        if made is None:
            raise invalid(f"you hold the most keys allowed ({keys_config.max_per_user}); revoke one first")
        record, secret = made
        view = key_view(record, self.clock.seconds())
        del view["last_used_at"], view["status"]
        view["key"] = secret
        request.audit["key_id"] = record.id
        self.parts.audit.record("key.created", request, obj=record.id, name=record.name, scopes=sorted(record.scopes), team=record.team)
        return JSONResponse(view, status=201, headers=NO_STORE)


def _duration(value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise invalid("'expires_in' must be a duration such as \"90d\" or a number of seconds")
    try:
        seconds = parse_duration(value)
    except (ValueError, TypeError, OverflowError):
        raise invalid("'expires_in' must be a duration such as \"90d\" or a number of seconds") from None
    if not seconds >= 60:
        raise invalid("'expires_in' must be at least 60s")
    return seconds


def _days(seconds):
    return f"{int(seconds // 86400)}d" if seconds >= 86400 else f"{int(seconds)}s"


class KeyItem(KeysRoute):
    """
    C{DELETE /v1/keys/{id}}: revoke one of the caller's keys; with
    C{admin}, C{DELETE /v1/admin/keys/{id}}: revoke anyone's.  An id that
    is no such key (of the caller's) is a 404.
    """

    isLeaf = True

    def __init__(self, parts, key_id, admin=False):
        super().__init__(parts)
        self.key_id = key_id
        self.admin = admin
        self.scopes = {"DELETE": "admin" if admin else ""}
        self.route_name = "admin_key" if admin else "key"

    async def handle_DELETE(self, request):
        owner = None
        if not self.admin:
            _signed_in(request)
            _keys_on(request)
            owner = request.principal.key
        if request.postpath not in ([], [b""]) or not is_key_id(self.key_id):
            raise APIError("NOT_FOUND", details="no such key")
        record = await self.keys.revoke(self.key_id, owner=owner)
        if record is None:
            raise APIError("NOT_FOUND", details="no such key")
        request.audit["key_id"] = record.id
        if record.revoked_at is None:
            # (The key as it was: revoked now, not before.)
            self.parts.audit.record("key.revoked", request, obj=record.id, owner=owner_sub(record.owner), by_admin=self.admin)
        write_json(request, 204, None)
        return None


class AdminKeys(KeysRoute):
    """C{GET /v1/admin/keys} (C{?user=<sub>} narrows), and C{DELETE /v1/admin/keys/{id}}."""

    scopes = {"GET": "admin"}
    route_name = "admin_keys"
    admin = True

    async def handle_GET(self, request):
        now = self.clock.seconds()
        try:
            user = query_arg(request, "user")
        except (ValueError, UnicodeDecodeError):
            raise invalid("'user' may be given once, in UTF-8") from None
        if user is not None and (not user or not user.isprintable()):
            raise invalid("'user' must be a user's sub")
        records = await self.keys.list(None, limit=10000, sub=user)
        # (The query matches owners that end with "|<user>"; a sub may hold a "|".)
        views = [v for v in (key_view(r, now, admin=True) for r in records) if user is None or v["owner"] == user]
        return JSONResponse({"object": "list", "data": views}, headers=NO_STORE)


# --- usage ---------------------------------------------------------------------

CSV_COLUMNS = ("date", "user", "user_issuer", "team", "model", "requests", "prompt_tokens", "completion_tokens")


class Usage(APIResource):
    """
    C{GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD&user=<sub>&team=<team>&format=csv}:
    usage by day (in C{usage.timezone}), user, team and model.  Without
    C{user} and C{team}: the caller's own.  C{team} needs C{admin} or
    C{usage:<team>}; C{user} (someone else) needs C{admin}, or
    C{usage:<team>} together with C{team}.
    """

    scopes = {"GET": ""}
    route_name = "usage"
    rate_limited = True

    # Without user or team: everyone's (the operator's route), not the caller's own.
    everyone = False

    def __init__(self, parts):
        super().__init__(parts)
        self.usage = parts.usage
        self.batches = parts.batches
        self.clock = parts.reactor

    async def handle_GET(self, request):
        config = request.config
        principal = request.principal
        zone = zone_of(config.usage.timezone)
        try:
            args = {name: query_arg(request, name) for name in ("from", "to", "user", "team", "format")}
        except (ValueError, UnicodeDecodeError):
            raise invalid("each query parameter may be given once, in UTF-8") from None
        unknown = sorted(k.decode("latin-1") for k in request.args if k.decode("latin-1") not in args)
        if unknown:
            raise invalid("unknown query parameter; use from, to, user, team, format")
        fmt = args["format"] or "json"
        if fmt not in ("json", "csv"):
            raise invalid("'format' must be json or csv")
        now = self.clock.seconds()
        today = local_date(now, zone)
        first = local_date(window_bounds("month", now, zone)[0], zone)
        start_date, end_date = args["from"] or first, args["to"] or today
        try:
            if not ("1970" <= start_date[:4] <= "9998" and "1970" <= end_date[:4] <= "9998"):
                raise ValueError("year")
            start, end = day_start(start_date, zone), day_start(end_date, zone)
        except (ValueError, OverflowError, OSError):
            raise invalid("'from' and 'to' must be dates such as 2026-12-01, from 1970 to 9998") from None
        if end < start:
            raise invalid("'to' must not be before 'from'")
        days = []
        t = start
        while t <= end:
            if len(days) >= MAX_DAYS:
                raise invalid(f"a usage query covers at most {MAX_DAYS} days")
            following = window_bounds("day", t, zone)[1]
            days.append((local_date(t, zone), t, following))
            t = following
        user, team = args["user"], args["team"]
        for name, value in (("user", user), ("team", team)):
            if value is not None and (not value or len(value) > 512 or not value.isprintable()):
                raise invalid(f"'{name}' must be a {name} name")
        issuer = None
        admin = "admin" in principal.scopes
        if team is not None and not (admin or f"usage:{team}" in principal.scopes):
            raise _needs(f"usage:{team}")
        if user is None and team is None and not self.everyone:
            user, issuer = principal.sub, principal.issuer
        elif user is not None and team is None and not admin:
            if user != principal.sub:
                raise _needs("admin")
            issuer = principal.issuer
        # What this instance gathered is written first, so the answer has it.
        await self.batches.run()
        # A database that cannot answer is a 503 (StorageUnavailable).
        rows = await self.usage.store.by_day(days, issuer=_issuer(issuer), sub=user, team=team)
        data = [
            {
                "date": date,
                "user": sub,
                "user_issuer": iss,
                "team": t or None,
                "model": model,
                "requests": counts.requests,
                "prompt_tokens": counts.prompt_tokens,
                "completion_tokens": counts.completion_tokens,
            }
            for date, iss, sub, t, model, counts in rows
        ]
        if fmt == "csv":
            _write_csv(request, data, f"usage-{start_date}-{end_date}.csv")
            return None
        return {"object": "list", "from": start_date, "to": end_date, "timezone": config.usage.timezone, "data": data}


def _issuer(issuer):
    return issuer_id(issuer) if issuer is not None else None


def _needs(scope):
    return APIError(
        "AUTH_INSUFFICIENT_SCOPE",
        details=f"this call needs the scope admin or {scope}" if scope != "admin" else "this call needs the scope admin",
        headers={"WWW-Authenticate": f'Bearer realm="clawdbot", error="insufficient_scope", scope="{scope}"'},
    )


def _cell(value):
    """A CSV cell a spreadsheet shows as text: no formula from a name that starts with = + - @."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def _write_csv(request, rows, filename):
    out = io.StringIO()
    # Text cells are quoted: a ";" or "," in a name stays in its cell, whatever
    # separator the spreadsheet expects.
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([row[c] if isinstance(row[c], int) else _cell(row[c]) for c in CSV_COLUMNS])
    body = out.getvalue().encode("utf-8", "replace")
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"text/csv; charset=utf-8")
    request.setHeader(b"content-disposition", f'attachment; filename="{filename}"'.encode("ascii"))
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def add_routes(v1, parts):
    v1.putChild(b"keys", Keys(parts))
    v1.putChild(b"usage", Usage(parts))
    admin = Node()
    v1.putChild(b"admin", admin)
    admin.putChild(b"keys", AdminKeys(parts))
