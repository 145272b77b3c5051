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
import math
from urllib.parse import quote

from clawdbot.auth.identity import owner_sub
from clawdbot.errors import APIError, invalid
from clawdbot.storage.history import may_use_team, not_found, quota_exceeded
from clawdbot.storage.store import Refused, decode_cursor
from clawdbot.http.resource import APIResource, JSONResponse, NotFound, query_arg, read_json

MAX_TITLE = 200
# The longest search text (GET /v1/sessions?q=).
MAX_QUERY = 200
# Seconds a search may run before it is stopped.
SEARCH_TIME = 3.0
# One search at a time per caller: the lock's name (no session id has a space).
SEARCH_LOCK = "search "
# Above any session's message count: a larger 'keep' is refused before the store sees it.
MAX_KEEP = 2**31 - 1


def _title(value):
    if not isinstance(value, str) or not value.strip():
        raise invalid("'title' must be a non-empty string")
    if len(value) > MAX_TITLE:
        raise invalid(f"'title' must be at most {MAX_TITLE} characters")
    return value.strip()


def _system_prompt(value, limits):
    """A session's system prompt: a string within C{history.max_message_chars}, or C{None} (blank clears it too)."""
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise invalid("'system_prompt' must be a string or null")
    if len(value) > limits.max_message_chars:
        raise invalid(f"'system_prompt' must be at most {limits.max_message_chars} characters")
    return value if value.strip() else None


def _temperature(value):
    """A session's temperature: a number from 0 to 2, or C{None}."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 2:
        raise invalid("'temperature' must be a number from 0 to 2 or null")
    value = float(value)
    if not math.isfinite(value):
        raise invalid("'temperature' must be a number from 0 to 2 or null")
    return value


def _settings(body, limits):
    """The per-chat settings C{body} names, checked."""
    out = {}
    if "system_prompt" in body:
        out["system_prompt"] = _system_prompt(body["system_prompt"], limits)
    if "temperature" in body:
        out["temperature"] = _temperature(body["temperature"])
    return out


def _keep(body):
    keep = body.get("keep")
    if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= MAX_KEEP:
        raise invalid("'keep' must be a number of messages, 0 or more")
    return keep


def _with_messages(session):
    out = session.as_dict()
    out["messages"] = [m.as_dict() for m in session.messages]
    return out


def room(history, principal, limits):
    """The stored bytes the caller may reach, less what turns in flight hold (as a turn's own check counts them)."""
    return limits.max_bytes_per_user - history.reservations.pending.get(principal.key, 0)


def too_many_sessions(limits):
    return invalid(f"you have reached the limit of {limits.max_sessions_per_user} sessions; delete some first")


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
        query = query_arg(request, "q", strict=False)
        if query is not None and not (1 <= len(query) <= MAX_QUERY and query.isprintable()):
            raise invalid(f"'q' must be 1 to {MAX_QUERY} printable characters")
        store = self.history.store
        owners = await store.owners_of(principal.issuer, principal.sub)
        if query is None:
            rows, next_cursor = await store.list_sessions(owners, principal.history_teams(), team=team, limit=limit, cursor=cursor)
            return {"data": [s.as_dict() for s in rows], "next_cursor": next_cursor}
        # A search reads every message its caller may see: it spends the
        # request budget, runs one at a time per caller, and stops at
        # SEARCH_TIME seconds.
        await self.accounting.check_rate(request)

        async def search():
            try:
                return await store.search_sessions(owners, principal.history_teams(), query, team=team, limit=limit, cursor=cursor, time_limit=SEARCH_TIME)
            except Refused:
                raise invalid(f"the search took longer than {SEARCH_TIME:g} seconds and was stopped; narrow it with a team filter") from None

        found, next_cursor = await self.history.one_at_a_time(SEARCH_LOCK + principal.key, search)
        for session, match in found:
            if match is not None and session.owner not in owners:
                # What a teammate's chat says, read through a search.
                self.parts.audit.record("history.read_other", request, obj=session.id, owner=owner_sub(session.owner), team=session.team, via="search")
        return {"data": [dict(s.as_dict(), match=match) for s, match in found], "next_cursor": next_cursor}

    async def handle_POST(self, request):
        principal = request.principal
        body = await read_json(request)
        limits = request.config.history
        for key in body:
            if key not in ("title", "team", "system_prompt", "temperature"):
                raise invalid(f"'{key}' is not a session field")
        title = _title(body.get("title", "New chat"))
        settings = _settings(body, limits)
        team = body.get("team")
        if team is not None:
            if not isinstance(team, str) or not team:
                raise invalid("'team' must be a team name")
            if not may_use_team(principal, team):
                raise APIError("AUTH_INSUFFICIENT_SCOPE", details=f"you are not a member of team {team}")
        store = self.history.store
        try:
            session = await store.create_session(
                principal.key,
                title,
                team,
                max_sessions=limits.max_sessions_per_user,
                max_bytes=room(self.history, principal, limits),
                owners=await store.owners_of(principal.issuer, principal.sub),
                **settings,
            )
        except Refused:
            raise quota_exceeded(limits) from None
        if session is None:
            raise too_many_sessions(limits)
        return JSONResponse(session.as_dict(), status=201)


class SessionItem(HistoryRoute):
    """C{GET|PATCH|DELETE /v1/sessions/{id}} and its children (export, truncate, fork, stop)."""

    scopes = {"GET": "chat:read", "PATCH": "chat:write", "DELETE": "chat:write"}
    route_name = "session"

    def __init__(self, parts, sid):
        super().__init__(parts)
        self.sid = sid

    def getChild(self, path, request):
        child = SESSION_CHILDREN.get(path)
        if child is not None:
            return child(self.parts, self.sid)
        return NotFound()

    async def handle_GET(self, request):
        session = await _read(self.parts, request, self.sid)
        out = _with_messages(session)
        # A turn of this session is in progress in this process.
        out["replying"] = self.history.busy(self.sid)
        return out

    async def handle_PATCH(self, request):
        body = await read_json(request)
        for key in body:
            if key not in ("title", "system_prompt", "temperature"):
                raise invalid(f"'{key}' cannot be changed")
        if not body:
            raise invalid("name at least one of 'title', 'system_prompt', 'temperature'")
        changes = _settings(body, request.config.history)
        if "title" in body:
            changes["title"] = _title(body["title"])
        principal = request.principal
        await self.history.owned(principal, self.sid)
        store = self.history.store
        limits = request.config.history
        try:
            await store.update(self.sid, max_bytes=room(self.history, principal, limits), owners=await store.owners_of(principal.issuer, principal.sub), **changes)
        except Refused:
            raise quota_exceeded(limits) from None
        session = await self.history.store.get_session(self.sid)
        if session is None:
            raise not_found()
        return session.as_dict()

    async def handle_DELETE(self, request):
        await self.history.owned(request.principal, self.sid)
        # A reply still being written for it stops (it would be stored nowhere).
        self.history.stop(self.sid)
        await self.history.store.delete(self.sid)
        self.parts.audit.record("history.deleted", request, obj=self.sid)
        return JSONResponse(b"", status=204)


class SessionChild(HistoryRoute):
    """A route under C{/v1/sessions/{id}/}."""

    def __init__(self, parts, sid):
        super().__init__(parts)
        self.sid = sid


class SessionTruncate(SessionChild):
    """
    C{POST /v1/sessions/{id}/truncate} C{{"keep": N}}: the owner keeps the
    first N messages; the rest are deleted and their bytes given back.
    Refused while a turn of the session runs here (it would store after
    the cut).
    """

    scopes = {"POST": "chat:write"}
    route_name = "session_truncate"

    async def handle_POST(self, request):
        body = await read_json(request)
        for key in body:
            if key != "keep":
                raise invalid(f"'{key}' is not a truncate field")
        keep = _keep(body)
        await self.history.owned(request.principal, self.sid)
        if self.history.busy(self.sid):
            raise invalid("a reply is still being written in this chat")

        async def truncate():
            # Under the session's lock: a turn that starts meanwhile waits.
            try:
                deleted = await self.history.store.truncate(self.sid, keep)
            except Refused:
                raise invalid("'keep' is more than the messages in this chat") from None
            if deleted is None:
                raise not_found()
            if deleted:
                self.parts.audit.record("history.deleted", request, obj=self.sid, kept=keep, messages=deleted)
            return await self.history.store.get_session(self.sid, with_messages=True)

        session = await self.history.one_at_a_time(self.sid, truncate)
        if session is None:
            raise not_found()
        return _with_messages(session)


class SessionFork(SessionChild):
    """
    C{POST /v1/sessions/{id}/fork} C{{"keep": N, "title": optional}}: a new
    session of the owner with copies of the first N messages and the
    source's team and settings; it counts toward the session limit and the
    stored-bytes quota.
    """

    scopes = {"POST": "chat:write"}
    route_name = "session_fork"

    async def handle_POST(self, request):
        body = await read_json(request)
        for key in body:
            if key not in ("keep", "title"):
                raise invalid(f"'{key}' is not a fork field")
        keep = _keep(body)
        title = body.get("title")
        if title is not None:
            title = _title(title)
        principal = request.principal
        limits = request.config.history
        source = await self.history.owned(principal, self.sid)
        store = self.history.store
        try:
            session = await store.fork(
                self.sid,
                principal.key,
                keep,
                title,
                # The copy stays in the team only for a member (as a create).
                team=source.team if source.team is not None and may_use_team(principal, source.team) else None,
                max_sessions=limits.max_sessions_per_user,
                max_bytes=room(self.history, principal, limits),
                owners=await store.owners_of(principal.issuer, principal.sub),
            )
        except Refused as e:
            if e.reason == "sessions":
                raise too_many_sessions(limits) from None
            if e.reason == "bytes":
                raise quota_exceeded(limits) from None
            raise invalid("'keep' is more than the messages in this chat") from None
        if session is None:
            raise not_found()
        session = await store.get_session(session.id, with_messages=True)
        if session is None:
            raise not_found()
        return JSONResponse(_with_messages(session), status=201)


class SessionStop(SessionChild):
    """C{POST /v1/sessions/{id}/stop}: the owner stops the reply being written in this process, if any (204 either way)."""

    scopes = {"POST": "chat:write"}
    route_name = "session_stop"

    async def handle_POST(self, request):
        await self.history.owned(request.principal, self.sid)
        self.history.stop(self.sid)
        return JSONResponse(b"", status=204)


class SessionExport(HistoryRoute):
    """C{GET /v1/sessions/{id}/export?format=json|markdown}."""

    scopes = {"GET": "chat:read"}
    route_name = "session_export"
    # It reads the whole chat, images included: it spends the request budget.
    rate_limited = True

    def __init__(self, parts, sid):
        super().__init__(parts)
        self.sid = sid

    async def handle_GET(self, request):
        fmt = query_arg(request, "format", strict=False) or "json"
        if fmt not in ("json", "markdown"):
            raise invalid("'format' must be json or markdown")
        session = await _read(self.parts, request, self.sid)
        data = _with_messages(session)
        name = _filename(session.title)
        if fmt == "json":
            body = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")
            ctype, ext = "application/json; charset=utf-8", "json"
        else:
            body = to_markdown(data).encode("utf-8")
            ctype, ext = "text/markdown; charset=utf-8", "md"
        # The ASCII name for every client, and the title itself (RFC 6266) for those that read it.
        disposition = f'attachment; filename="{name}.{ext}"; filename*=UTF-8\'\'{quote(_title_filename(session.title) + "." + ext, safe="")}'
        request.setHeader(b"content-disposition", disposition.encode("ascii"))
        request.setHeader(b"content-type", ctype.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()
        return None


def _title_filename(title):
    """The title as a file name in any script: no control characters, separators or quotes."""
    safe = "".join("-" if not c.isprintable() or c in '/\\"*:<>?|' else c for c in title).strip(" .-")
    return safe[:60].strip(" .") or "session"


def _filename(title):
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in title).strip("-")
    return safe[:60] or "session"


def to_markdown(data):
    lines = [f"# {data['title']}", "", f"- id: `{data['id']}`", f"- owner: {data['owner']}"]
    if data["team"]:
        lines.append(f"- team: {data['team']}")
    lines += [f"- created: {data['created_at']}", ""]
    if data.get("system_prompt"):
        lines += ["## system prompt", "", data["system_prompt"], ""]
    for m in data["messages"]:
        mark = " (incomplete)" if m["incomplete"] else ""
        lines += [f"## {m['role']}{mark} — {m['created_at']}", ""]
        content = m["content"]
        if isinstance(content, str):
            lines += [content, ""]
        else:
            text = "".join(part["text"] for part in content if part["type"] == "text")
            if text:
                lines += [text, ""]
            lines += ["[image]" for part in content if part["type"] == "image_url"] + [""]
    return "\n".join(lines)


SESSION_CHILDREN = {b"export": SessionExport, b"truncate": SessionTruncate, b"fork": SessionFork, b"stop": SessionStop}


def add_routes(v1, parts):
    v1.putChild(b"sessions", SessionList(parts))
