"""
Chat history routes (SPEC.md §6) and the permission rules they share with
stateful completions.

Who sees a session: its owner, and anyone holding C{history:<team>} for the
session's team.  Who changes it (renames, deletes, clears, adds turns): its
owner only.  A session someone may not see does not exist for them: 404.  A
teammate who may read it but tries to change it gets a 403 (they know it
exists; a 404 would contradict the read) and nothing changes.  Reading needs
C{chat:read}; creating, renaming, deleting and talking need C{chat:write}.

The owner is a principal's identity provider plus its C{sub}
(L{clawdbot.auth.identity}); the API shows the C{sub}.

Stored history is capped per request (C{history.max_bytes_per_request}, 413)
and per owner (C{history.max_bytes_per_user}, 429 QUOTA_EXCEEDED): both are
checked before the model is called, on the UTF-8 size of the messages the
request would store.  The reply is stored whatever its size once the turn
was accepted (a turn is never stored without its reply), so a reply may
take an owner past the quota; the next turn is then refused.  Titles are
not counted (at most 200 characters each, and the sessions per user are
capped).
"""

import json

from twisted.internet.defer import DeferredLock

from clawdbot.errors import APIError, invalid
from clawdbot.storage.store import decode_cursor, is_session_id, message_bytes
from clawdbot.units import format_size
from clawdbot.http.site import APIResource, JSONResponse, NotFound, read_json

MAX_TITLE = 200
# A full history frees up only when its owner deletes or clears sessions:
# there is no time at which a retry would pass by itself.
QUOTA_RETRY_AFTER = 3600


def team_reader(principal, session):
    """May C{principal} read C{session} through C{history:<team>}?"""
    return session.team is not None and f"history:{session.team}" in principal.scopes


def may_use_team(principal, team):
    """A session may be created for a team the principal belongs to or reads."""
    return team in principal.teams or f"history:{team}" in principal.scopes


def not_found():
    return APIError("NOT_FOUND", details="no such session")


def _title(value):
    if not isinstance(value, str) or not value.strip():
        raise invalid("'title' must be a non-empty string")
    if len(value) > MAX_TITLE:
        raise invalid(f"'title' must be at most {MAX_TITLE} characters")
    return value.strip()


def not_owner():
    return APIError("AUTH_INSUFFICIENT_SCOPE", details="only the owner of a session may change it")


async def load_visible(gateway, principal, sid, with_messages=False):
    """The session C{sid} for reading: its owner's or a readable team's; else 404."""
    store = gateway.store
    session = await store.get_session(sid, with_messages=with_messages) if is_session_id(sid) else None
    if session is None:
        raise not_found()
    if session.owner in await store.owners_of(principal.issuer, principal.sub) or team_reader(principal, session):
        return session
    raise not_found()


async def load_owned(gateway, principal, sid):
    """
    The session C{sid} for changing: its owner's only.  A team reader gets
    a 403, anyone else a 404.
    """
    store = gateway.store
    session = await store.get_session(sid) if is_session_id(sid) else None
    if session is None:
        raise not_found()
    if session.owner in await store.owners_of(principal.issuer, principal.sub):
        return session
    if team_reader(principal, session):
        raise not_owner()
    raise not_found()


# Bytes held for a reply while its turn is in flight (replies are stored
# whatever their size once the turn was accepted).
REPLY_ALLOWANCE = 16 * 1024


class HistoryReservations:
    """
    Bytes of turns that passed the stored-history quota and are not stored
    yet, per owner.  Counting them in the check keeps turns that run at the
    same moment (on different sessions) from all passing a check made before
    any of them was stored.  Per process: gateways sharing one database can
    each let one turn past the quota at the same moment.
    """

    def __init__(self):
        self.pending = {}

    def hold(self, owner, size):
        """Count C{size} bytes for C{owner} until the returned C{release()} is called."""
        self.pending[owner] = self.pending.get(owner, 0) + size
        released = []

        def release():
            if not released:
                released.append(True)
                left = self.pending.get(owner, 0) - size
                if left > 0:
                    self.pending[owner] = left
                else:
                    self.pending.pop(owner, None)

        return release


async def check_history_quota(store, principal, limits, new, reservations):
    """
    Refuse a turn whose messages C{new} (C{[(role, content, incomplete)]})
    would pass the per-request cap (413) or the owner's stored-bytes quota
    (429 QUOTA_EXCEEDED with Retry-After); nothing is stored either way.

    @param reservations: the L{HistoryReservations} of turns in flight.
    @return: C{release()}, to call once the turn is stored (or not).
    """
    size = sum(message_bytes(content) for _, content, _ in new)
    if size > limits.max_bytes_per_request:
        raise APIError(
            "PAYLOAD_TOO_LARGE",
            details=f"the messages to store are larger than the limit of {format_size(limits.max_bytes_per_request)} per request",
        )
    used = await store.usage(await store.owners_of(principal.issuer, principal.sub))
    if used + reservations.pending.get(principal.key, 0) + size > limits.max_bytes_per_user:
        raise APIError(
            "QUOTA_EXCEEDED",
            details=f"your stored chat history has reached its limit of {format_size(limits.max_bytes_per_user)}; delete or clear sessions to go on",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER)},
        )
    # Held until the turn is stored: its messages and an allowance for the
    # reply, so that turns running at the same moment leave room for theirs.
    return reservations.hold(principal.key, size + REPLY_ALLOWANCE)


class SessionLocks:
    """
    One lock per session, so concurrent turns on a session run one after the
    other and the stored order is the order the model saw.
    """

    def __init__(self):
        self._locks = {}

    async def run(self, sid, fn):
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = DeferredLock()
        await lock.acquire()
        try:
            return await fn()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(sid, None)


class SessionList(APIResource):
    """C{GET|POST /v1/sessions}."""

    scopes = {"GET": "chat:read", "POST": "chat:write"}
    route_name = "sessions"

    def getChild(self, path, request):
        if not path:
            return NotFound()
        return SessionItem(self.gateway, path.decode("utf-8", "replace"))

    async def handle_GET(self, request):
        principal = request.principal
        args = request.args
        team = _arg(args, b"team")
        if team is not None and not team.isprintable():
            raise invalid("'team' must be a team name")
        try:
            limit = int(_arg(args, b"limit") or 50)
        except ValueError:
            raise invalid("'limit' must be an integer") from None
        if not 1 <= limit <= 200:
            raise invalid("'limit' must be between 1 and 200")
        cursor = _arg(args, b"cursor")
        if cursor is not None:
            try:
                cursor = decode_cursor(cursor)
            except ValueError:
                raise invalid("'cursor' is not valid") from None
        store = self.gateway.store
        owners = await store.owners_of(principal.issuer, principal.sub)
        rows, next_cursor = await store.list_sessions(owners, principal.history_teams(), team=team, limit=limit, cursor=cursor)
        return {"data": [s.as_dict() for s in rows], "next_cursor": next_cursor}

    async def handle_POST(self, request):
        principal = request.principal
        body = await read_json(request)
        for key in body:
            if key not in ("title", "team"):
                raise invalid(f"'{key}' is not a session field")
        title = _title(body.get("title", "New chat"))
        team = body.get("team")
        if team is not None:
            if not isinstance(team, str) or not team:
                raise invalid("'team' must be a team name")
            if not may_use_team(principal, team):
                raise APIError("AUTH_INSUFFICIENT_SCOPE", details=f"you are not a member of team {team}")
        limits = request.config.history
        session = await self.gateway.store.create_session(principal.key, title, team, max_sessions=limits.max_sessions_per_user)
        if session is None:
            raise invalid(f"you have reached the limit of {limits.max_sessions_per_user} sessions; delete some first")
        return JSONResponse(session.as_dict(), status=201)


def _arg(args, name):
    values = args.get(name)
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


class SessionItem(APIResource):
    """C{GET|PATCH|DELETE /v1/sessions/{id}} and C{.../export}."""

    scopes = {"GET": "chat:read", "PATCH": "chat:write", "DELETE": "chat:write"}
    route_name = "session"

    def __init__(self, gateway, sid):
        super().__init__(gateway)
        self.sid = sid

    def getChild(self, path, request):
        if path == b"export":
            return SessionExport(self.gateway, self.sid)
        return NotFound()

    async def handle_GET(self, request):
        session = await load_visible(self.gateway, request.principal, self.sid, with_messages=True)
        out = session.as_dict()
        out["messages"] = [m.as_dict() for m in session.messages]
        return out

    async def handle_PATCH(self, request):
        body = await read_json(request)
        for key in body:
            if key != "title":
                raise invalid(f"'{key}' cannot be changed")
        title = _title(body.get("title"))
        await load_owned(self.gateway, request.principal, self.sid)
        await self.gateway.store.rename(self.sid, title)
        session = await self.gateway.store.get_session(self.sid)
        if session is None:
            raise not_found()
        return session.as_dict()

    async def handle_DELETE(self, request):
        await load_owned(self.gateway, request.principal, self.sid)
        await self.gateway.store.delete(self.sid)
        return JSONResponse(b"", status=204)


class SessionExport(APIResource):
    """C{GET /v1/sessions/{id}/export?format=json|markdown}."""

    scopes = {"GET": "chat:read"}
    route_name = "session_export"

    def __init__(self, gateway, sid):
        super().__init__(gateway)
        self.sid = sid

    async def handle_GET(self, request):
        fmt = _arg(request.args, b"format") or "json"
        if fmt not in ("json", "markdown"):
            raise invalid("'format' must be json or markdown")
        session = await load_visible(self.gateway, request.principal, self.sid, with_messages=True)
        data = session.as_dict()
        data["messages"] = [m.as_dict() for m in session.messages]
        name = _filename(session.title)
        if fmt == "json":
            body = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")
            ctype, ext = "application/json; charset=utf-8", "json"
        else:
            body = to_markdown(data).encode("utf-8")
            ctype, ext = "text/markdown; charset=utf-8", "md"
        request.setHeader(b"content-disposition", f'attachment; filename="{name}.{ext}"'.encode("ascii"))
        request.setHeader(b"content-type", ctype.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()
        return None


def _filename(title):
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in title).strip("-")
    return safe[:60] or "session"


def to_markdown(data):
    lines = [f"# {data['title']}", "", f"- id: `{data['id']}`", f"- owner: {data['owner']}"]
    if data["team"]:
        lines.append(f"- team: {data['team']}")
    lines += [f"- created: {data['created_at']}", ""]
    for m in data["messages"]:
        mark = " (incomplete)" if m["incomplete"] else ""
        lines += [f"## {m['role']}{mark} — {m['created_at']}", "", m["content"], ""]
    return "\n".join(lines)


def add_routes(v1, gateway):
    v1.putChild(b"sessions", SessionList(gateway))
