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

from clawdbot.auth.identity import owner_sub
from clawdbot.errors import APIError, invalid
from clawdbot.storage.history import may_use_team, not_found
from clawdbot.storage.store import decode_cursor
from clawdbot.http.resource import APIResource, JSONResponse, NotFound, query_arg, read_json

MAX_TITLE = 200


def _title(value):
    if not isinstance(value, str) or not value.strip():
        raise invalid("'title' must be a non-empty string")
    if len(value) > MAX_TITLE:
        raise invalid(f"'title' must be at most {MAX_TITLE} characters")
    return value.strip()


async def _read(parts, request, sid):
    """A session with its messages for reading; a read of someone else's (a team reader's, an admin's) is audited."""
    session, own = await parts.history.readable(request.principal, sid, with_messages=True)
    if not own:
        parts.audit.record("history.read_other", request, obj=sid, owner=owner_sub(session.owner), team=session.team)
    return session


class HistoryRoute(APIResource):
    """A history route: the history rules, from the parts at construction (kept for the per-session children)."""

    def __init__(self, parts):
        super().__init__(parts)
        self.parts = parts
        self.history = parts.history


class SessionList(HistoryRoute):
    """C{GET|POST /v1/sessions}."""

    scopes = {"GET": "chat:read", "POST": "chat:write"}
    route_name = "sessions"

    def getChild(self, path, request):
        if not path:
            return NotFound()
        return SessionItem(self.parts, path.decode("utf-8", "replace"))

    async def handle_GET(self, request):
        principal = request.principal
        team = query_arg(request, "team", strict=False)
        if team is not None and not team.isprintable():
            raise invalid("'team' must be a team name")
        try:
            limit = int(query_arg(request, "limit", strict=False) or 50)
        except ValueError:
            raise invalid("'limit' must be an integer") from None
        if not 1 <= limit <= 200:
            raise invalid("'limit' must be between 1 and 200")
        cursor = query_arg(request, "cursor", strict=False)
        if cursor is not None:
            try:
                cursor = decode_cursor(cursor)
            except ValueError:
                raise invalid("'cursor' is not valid") from None
        store = self.history.store
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
        session = await self.history.store.create_session(principal.key, title, team, max_sessions=limits.max_sessions_per_user)
        if session is None:
            raise invalid(f"you have reached the limit of {limits.max_sessions_per_user} sessions; delete some first")
        return JSONResponse(session.as_dict(), status=201)


class SessionItem(HistoryRoute):
    """C{GET|PATCH|DELETE /v1/sessions/{id}} and C{.../export}."""

    scopes = {"GET": "chat:read", "PATCH": "chat:write", "DELETE": "chat:write"}
    route_name = "session"

    def __init__(self, parts, sid):
        super().__init__(parts)
        self.sid = sid

    def getChild(self, path, request):
        if path == b"export":
            return SessionExport(self.parts, self.sid)
        return NotFound()

    async def handle_GET(self, request):
        session = await _read(self.parts, request, self.sid)
        out = session.as_dict()
        out["messages"] = [m.as_dict() for m in session.messages]
        return out

    async def handle_PATCH(self, request):
        body = await read_json(request)
        for key in body:
            if key != "title":
                raise invalid(f"'{key}' cannot be changed")
        title = _title(body.get("title"))
        await self.history.owned(request.principal, self.sid)
        await self.history.store.rename(self.sid, title)
        session = await self.history.store.get_session(self.sid)
        if session is None:
            raise not_found()
        return session.as_dict()

    async def handle_DELETE(self, request):
        await self.history.owned(request.principal, self.sid)
        await self.history.store.delete(self.sid)
        self.parts.audit.record("history.deleted", request, obj=self.sid)
        return JSONResponse(b"", status=204)


class SessionExport(HistoryRoute):
    """C{GET /v1/sessions/{id}/export?format=json|markdown}."""

    scopes = {"GET": "chat:read"}
    route_name = "session_export"

    def __init__(self, parts, sid):
        super().__init__(parts)
        self.sid = sid

    async def handle_GET(self, request):
        fmt = query_arg(request, "format", strict=False) or "json"
        if fmt not in ("json", "markdown"):
            raise invalid("'format' must be json or markdown")
        session = await _read(self.parts, request, self.sid)
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


def add_routes(v1, parts):
    v1.putChild(b"sessions", SessionList(parts))
