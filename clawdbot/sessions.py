"""
Chat history routes (SPEC.md §6) and the permission rules they share with
stateful completions.

Who sees a session: its owner, and anyone holding C{history:<team>} for the
session's team.  A session someone may not see does not exist for them: 404,
never 403.  Reading needs C{chat:read}; creating, renaming, deleting and
talking need C{chat:write}.
"""

import json

from twisted.internet.defer import DeferredLock

from clawdbot.errors import APIError, invalid
from clawdbot.storage import decode_cursor
from clawdbot.web import APIResource, JSONResponse, NotFound, read_json

MAX_TITLE = 200


def visible(principal, session):
    """May C{principal} see (and, with chat:write, change) C{session}?"""
    if session is None:
        return False
    if session.owner == principal.sub:
        return True
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


async def load_visible(gateway, principal, sid, with_messages=False):
    session = await gateway.store.get_session(sid, with_messages=with_messages)
    if not visible(principal, session):
        raise not_found()
    return session


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
        rows, next_cursor = await self.gateway.store.list_sessions(principal.sub, principal.history_teams(), team=team, limit=limit, cursor=cursor)
        return {"data": [s.as_dict() for s in rows], "next_cursor": next_cursor}

    async def handle_POST(self, request):
        principal = request.principal
        body = read_json(request)
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
        session = await self.gateway.store.create_session(principal.sub, title, team, max_sessions=limits.max_sessions_per_user)
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
        body = read_json(request)
        for key in body:
            if key != "title":
                raise invalid(f"'{key}' cannot be changed")
        title = _title(body.get("title"))
        await load_visible(self.gateway, request.principal, self.sid)
        await self.gateway.store.rename(self.sid, title)
        session = await self.gateway.store.get_session(self.sid)
        if session is None:
            raise not_found()
        return session.as_dict()

    async def handle_DELETE(self, request):
        await load_visible(self.gateway, request.principal, self.sid)
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
