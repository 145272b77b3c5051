"""
Chat history storage: one interface, two engines.

L{SQLStore} holds the logic and the SQL; L{SQLiteEngine} (the default: one
file, WAL, every commit synced) and L{PostgresEngine} (for several gateway
instances) run it on their own threads, so a slow disk or database never
stalls the reactor.  Every public method returns a Deferred-compatible
coroutine.

Owners are owner keys (L{clawdbot.auth.identity.owner_key}: identity provider
plus C{sub}).  Rows stored before that rule (migration 3) belong to
C{*|<sub>}: they stay reachable by that C{sub} of the identity providers the
gateway trusted when it migrated (recorded in C{legacy_issuers}, from the
config of the instance that ran the migration), never by one added later.

Each message records its size in bytes (UTF-8) and C{owner_usage} holds the
sum per owner, updated in the same transaction as the messages, so the
per-user quota is one indexed read.
"""

import base64
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace

from twisted.internet.defer import fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from clawdbot.auth.identity import configured_issuers, issuer_id, legacy_owner, owner_key, owner_sub
from clawdbot.units import rfc3339

log = Logger(namespace="clawdbot.storage")


@dataclass(frozen=True)
class Session:
    id: str
    title: str
    owner: str
    team: str = None
    created_at: float = 0.0
    updated_at: float = 0.0
    # Per-chat settings: the system prompt sent first on each turn, and the
    # temperature used when a request sets none (None: not set).
    system_prompt: str = None
    temperature: float = None
    messages: tuple = field(default=(), compare=False)

    def as_dict(self):
        return {
            "id": self.id,
            "title": self.title,
            "owner": owner_sub(self.owner),
            "team": self.team,
            "created_at": rfc3339(self.created_at, 6),
            "updated_at": rfc3339(self.updated_at, 6),
            "system_prompt": self.system_prompt,
            "temperature": self.temperature,
        }


# The columns a Session is made of, in its fields' order.
SESSION_COLUMNS = "id, title, owner, team, created_at, updated_at, system_prompt, temperature"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    created_at: float
    incomplete: bool = False
    # The images of the turn, as data URLs (data:image/<fmt>;base64,...).
    images: tuple = ()

    def as_dict(self):
        """C{content} is the text, or with images a list of parts as a client sends them."""
        content = self.content
        if self.images:
            content = [{"type": "text", "text": self.content}] if self.content else []
            content += [{"type": "image_url", "image_url": {"url": url}} for url in self.images]
        return {"role": self.role, "content": content, "created_at": rfc3339(self.created_at, 6), "incomplete": self.incomplete}


# "As the source" for fork()'s team (None is no team).
KEEP = object()


class Refused(Exception):
    """
    A change the store refused, nothing changed: C{reason} is C{"keep"}
    (more messages to keep than there are), C{"sessions"} (the owner's
    session limit), C{"bytes"} (the owner's stored-bytes limit) or
    C{"time"} (a search that ran past its time limit).
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason




def encode_cursor(session):
    return base64.urlsafe_b64encode(json.dumps([session.updated_at, session.id]).encode()).decode().rstrip("=")


def decode_cursor(cursor):
    """The (updated_at, id) a cursor points after; C{ValueError} if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        updated_at, sid = json.loads(raw)
    except Exception:
        raise ValueError("bad cursor") from None
    if not isinstance(updated_at, (int, float)) or isinstance(updated_at, bool) or not isinstance(sid, str):
        raise ValueError("bad cursor")
    return float(updated_at), sid


def new_id():
    return "sess_" + secrets.token_hex(12)


# Ids are made by new_id; anything outside this alphabet (a NUL, a slash,
# text PostgreSQL cannot store) names no session and is never looked up.
_SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def is_session_id(value):
    """Whether C{value} could be a session id (anything else names no session)."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


def _record_legacy_issuers(cur, placeholder, context):
    """The providers that may claim rows stored before migration 3: those trusted now."""
    cur.execute("SELECT COUNT(*) FROM sessions")
    if cur.fetchone()[0] == 0:
        return
    for issuer in context.get("legacy_issuers", ()):
        cur.execute(f"INSERT INTO legacy_issuers (issuer) VALUES ({placeholder}) ON CONFLICT (issuer) DO NOTHING", (issuer_id(issuer),))


MIGRATIONS = [
    # 1: sessions and their messages.
    [
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            owner TEXT NOT NULL,
            team TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX sessions_owner ON sessions (owner, updated_at DESC, id DESC)",
        "CREATE INDEX sessions_team ON sessions (team, updated_at DESC, id DESC)",
        """CREATE TABLE messages (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            incomplete BOOLEAN NOT NULL DEFAULT FALSE,
            PRIMARY KEY (session_id, seq)
        )""",
    ],
    # 2: revoked refresh credentials (single sign-on logout).
    [
        """CREATE TABLE revocations (
            id TEXT PRIMARY KEY,
            expires_at DOUBLE PRECISION NOT NULL
        )""",
    ],
    # 3: owners are identity provider + sub; stored bytes per message and
    # per owner (the history quota).
    [
        "ALTER TABLE messages ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0",
        {
            "sqlite": "UPDATE messages SET bytes = LENGTH(CAST(content AS BLOB))",
            "postgresql": "UPDATE messages SET bytes = OCTET_LENGTH(content)",
        },
        # Who stored these is unknown: a sub, of some provider trusted then.
        "UPDATE sessions SET owner = '*|' || owner",
        "CREATE TABLE legacy_issuers (issuer TEXT PRIMARY KEY)",
        _record_legacy_issuers,
        """CREATE TABLE owner_usage (
            owner TEXT PRIMARY KEY,
            bytes BIGINT NOT NULL
        )""",
        """INSERT INTO owner_usage (owner, bytes)
            SELECT s.owner, SUM(m.bytes) FROM sessions s JOIN messages m ON m.session_id = s.id GROUP BY s.owner""",
    ],
    # 4: personal API keys (clawdbot.storage.keys), what each owner may do
    # now (their keys never exceed it), and usage per hour (clawdbot.storage.usage).
    [
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            scopes TEXT NOT NULL,
            team TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION
        )""",
        "CREATE INDEX api_keys_owner ON api_keys (owner, created_at DESC)",
        """CREATE TABLE owner_grants (
            owner TEXT PRIMARY KEY,
            scopes TEXT NOT NULL,
            teams TEXT NOT NULL,
            name TEXT,
            email TEXT,
            ended BOOLEAN NOT NULL DEFAULT FALSE,
            updated_at DOUBLE PRECISION NOT NULL,
            seen_at DOUBLE PRECISION NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE usage_hourly (
            hour BIGINT NOT NULL,
            issuer TEXT NOT NULL,
            sub TEXT NOT NULL,
            team TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            errors BIGINT NOT NULL,
            duration DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (hour, issuer, sub, team, key_id, model)
        )""",
        "CREATE INDEX usage_user ON usage_hourly (sub, issuer, hour)",
        "CREATE INDEX usage_team ON usage_hourly (team, hour)",
        "CREATE INDEX usage_key ON usage_hourly (key_id, hour)",
    ],
    # 5: the Responses API's stored responses (clawdbot.storage.responses).
    [
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            parent TEXT,
            depth INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            bytes BIGINT NOT NULL,
            chain_bytes BIGINT NOT NULL,
            response TEXT NOT NULL,
            turn TEXT NOT NULL
        )""",
        "CREATE INDEX responses_owner ON responses (owner, expires_at)",
        "CREATE INDEX responses_expiry ON responses (expires_at)",
    ],
    # 6: the audit trail (clawdbot.storage.audit).
    [
        {
            "sqlite": "CREATE TABLE audit_events (id INTEGER PRIMARY KEY AUTOINCREMENT, at DOUBLE PRECISION NOT NULL, event TEXT NOT NULL, entry TEXT NOT NULL)",
            "postgresql": "CREATE TABLE audit_events (id BIGSERIAL PRIMARY KEY, at DOUBLE PRECISION NOT NULL, event TEXT NOT NULL, entry TEXT NOT NULL)",
        },
        "CREATE INDEX audit_events_event ON audit_events (event, id)",
        "CREATE INDEX audit_events_at ON audit_events (at)",
    ],
    # 7: images kept with their message (a JSON list of data URLs, NULL for
    # none) and per-chat settings.
    [
        "ALTER TABLE messages ADD COLUMN images TEXT",
        "ALTER TABLE sessions ADD COLUMN system_prompt TEXT",
        "ALTER TABLE sessions ADD COLUMN temperature DOUBLE PRECISION",
    ],
]


def _statements(migration, dialect):
    """A migration's steps for one engine: SQL text, or C{step(cursor, placeholder, context)}."""
    for step in migration:
        if isinstance(step, dict):
            step = step[dialect]
        yield step


def prompt_bytes(prompt):
    """What a session's system prompt counts in its owner's stored bytes."""
    return len(prompt.encode("utf-8", "surrogatepass")) if prompt else 0


def message_bytes(content, images=()):
    """What a message costs against the quota: the UTF-8 size of its text and of its images' data URLs."""
    return len(content.encode("utf-8", "surrogatepass")) + sum(len(url.encode("utf-8", "surrogatepass")) for url in images)


def _images_column(images):
    return json.dumps(list(images)) if images else None


def _images_of(column):
    return tuple(json.loads(column)) if column else ()


def _like_pattern(text):
    """A LIKE pattern (escape character C{\\}) matching C{text} anywhere (the query lowercases it, as the text)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# Characters of message text shown around a search match.
MATCH_CHARS = 160


def match_excerpt(content, query):
    """Up to L{MATCH_CHARS} characters of C{content} around the first case-insensitive C{query}."""
    found = re.search(re.escape(query), content, re.IGNORECASE)
    at, length = (found.start(), found.end() - found.start()) if found else (0, 0)
    start = max(0, min(at - (MATCH_CHARS - length) // 2, len(content) - MATCH_CHARS)) if length < MATCH_CHARS else at
    return content[start : start + MATCH_CHARS]


class SQLStore:
    """
    The history operations, in SQL that SQLite and PostgreSQL both run.
    C{engine.run(fn)} calls C{fn(cursor)} in a transaction on the engine's
    thread and returns a Deferred of its result.
    """

    def __init__(self, engine, clock=time.time):
        self.engine = engine
        self.clock = clock
        self.p = engine.placeholder
        self._legacy_issuers = None

    def _sql(self, text):
        return text.replace("?", self.p)

    async def owners_of(self, issuer, sub):
        """
        The owner keys the principal C{sub} of C{issuer} owns: its own, and
        C{*|sub} when C{issuer} was trusted when old rows were migrated.
        """
        if self._legacy_issuers is None:

            def read(cur):
                cur.execute("SELECT issuer FROM legacy_issuers")
                return frozenset(row[0] for row in cur.fetchall())

            self._legacy_issuers = await self.engine.run(read)
        owners = [owner_key(issuer, sub)]
        if issuer is not None and issuer_id(issuer) in self._legacy_issuers:
            owners.append(legacy_owner(sub))
        return owners

    async def usage(self, owners):
        """The bytes stored for C{owners} (a list of owner keys)."""
        owners = [owners] if isinstance(owners, str) else list(owners)

        def read(cur):
            cur.execute(self._sql("SELECT COALESCE(SUM(bytes), 0) FROM owner_usage WHERE owner IN (%s)" % ", ".join("?" * len(owners))), owners)
            return int(cur.fetchone()[0])

        return await self.engine.run(read)

    def _charge(self, cur, owner, delta):
        if delta:
            cur.execute(
                self._sql("INSERT INTO owner_usage (owner, bytes) VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET bytes = owner_usage.bytes + excluded.bytes"),
                (owner, delta),
            )

    def _used(self, cur, owners):
        cur.execute(self._sql("SELECT COALESCE(SUM(bytes), 0) FROM owner_usage WHERE owner IN (%s)" % ", ".join("?" * len(owners))), owners)
        return int(cur.fetchone()[0])

    def _charge_prompt(self, cur, owner, old, new, max_bytes=None, owners=None):
        """
        Charge a session's system prompt changing from C{old} to C{new} to
        its owner (a prompt is stored history too); L{Refused} C{"bytes"}
        when that would take C{owners} (default C{[owner]}) past
        C{max_bytes}.
        """
        delta = prompt_bytes(new) - prompt_bytes(old)
        if delta > 0 and max_bytes is not None and self._used(cur, owners or [owner]) + delta > max_bytes:
            raise Refused("bytes")
        self._charge(cur, owner, delta)

    def _locked(self, cur, sid):
        """
        The session, its owner's lock held to the end of the transaction
        (L{_ThreadEngine.lock_owner}), so what changes the owner's bytes (a
        turn's store, a clear, a delete, a new prompt) runs one at a time;
        C{None} when it is gone.
        """
        session = self._session(cur, sid)
        if session is None:
            return None
        self.engine.lock_owner(cur, session.owner)
        return self._session(cur, sid)  # as it is now that the lock is held

    def _drop_messages(self, cur, session):
        """Delete a (locked) session's messages and give their bytes back to its owner."""
        cur.execute(self._sql("DELETE FROM messages WHERE session_id = ? RETURNING bytes"), (session.id,))
        self._charge(cur, session.owner, -sum(b for (b,) in cur.fetchall()))

    async def create_session(self, owner, title, team=None, max_sessions=None, system_prompt=None, temperature=None, max_bytes=None, owners=None):
        """
        A new session; C{None} past C{max_sessions}.  Its system prompt is
        charged to C{owner} (L{Refused} C{"bytes"} past C{max_bytes}).
        """
        now = self.clock()
        session = Session(new_id(), title, owner, team, now, now, system_prompt, temperature)

        def create(cur):
            if max_sessions is not None and not self._room_for_session(cur, owner, max_sessions):
                return None
            self._charge_prompt(cur, owner, None, system_prompt, max_bytes, owners)
            self._insert_session(cur, session)
            return session

        return await self.engine.run(create)

    def _room_for_session(self, cur, owner, max_sessions):
        # Concurrent creates for one owner count one after another.
        self.engine.lock_owner(cur, owner)
        cur.execute(self._sql("SELECT COUNT(*) FROM sessions WHERE owner = ?"), (owner,))
        return cur.fetchone()[0] < max_sessions

    def _insert_session(self, cur, session):
        cur.execute(
            self._sql(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
            (session.id, session.title, session.owner, session.team, session.created_at, session.updated_at, session.system_prompt, session.temperature),
        )

    def _session(self, cur, sid):
        cur.execute(self._sql(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?"), (sid,))
        row = cur.fetchone()
        return None if row is None else Session(*row)

    async def get_session(self, sid, with_messages=False):
        def get(cur):
            session = self._session(cur, sid)
            if session is None or not with_messages:
                return session
            return replace(session, messages=tuple(self._messages(cur, sid)))

        return await self.engine.run(get)

    _MESSAGE_COLUMNS = "role, content, created_at, incomplete, images"

    def _messages(self, cur, sid, last=None):
        if last is None:
            cur.execute(self._sql(f"SELECT {self._MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq"), (sid,))
            rows = cur.fetchall()
        else:
            cur.execute(
                self._sql(f"SELECT {self._MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?"),
                (sid, last),
            )
            rows = cur.fetchall()[::-1]
        return [Message(role, content, created, bool(incomplete), _images_of(images)) for role, content, created, incomplete, images in rows]

    async def context(self, sid, last):
        """The last C{last} messages of a session, oldest first."""
        return await self.engine.run(lambda cur: self._messages(cur, sid, last))

    def _listing(self, owners, teams, team, cursor, extra=(), extra_params=()):
        """The WHERE clause (and its parameters) of the sessions a list shows."""
        owners = [owners] if isinstance(owners, str) else list(owners)
        mine = "owner IN (%s)" % ", ".join("?" * len(owners))
        clauses, params = [], []
        if team is not None:
            if team in teams:
                clauses.append("team = ?")
                params.append(team)
            else:
                clauses.append(f"({mine} AND team = ?)")
                params += owners + [team]
        else:
            visible = [mine]
            params += owners
            if teams:
                visible.append("team IN (%s)" % ", ".join("?" * len(teams)))
                params += list(teams)
            clauses.append("(" + " OR ".join(visible) + ")")
        if cursor is not None:
            updated_at, sid = cursor
            clauses.append("(updated_at < ? OR (updated_at = ? AND id < ?))")
            params += [updated_at, updated_at, sid]
        clauses += extra
        params += extra_params
        return " AND ".join(clauses), params

    async def list_sessions(self, owners, teams, team=None, limit=50, cursor=None):
        """
        Sessions the owner of C{owners} (an owner key, or a list of them) may
        see: their own plus those of C{teams}, newest first; C{team} narrows
        to one team.

        @return: C{(sessions, next_cursor)}.
        """
        where, params = self._listing(owners, teams, team, cursor)
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY updated_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)

        def select(cur):
            cur.execute(self._sql(sql), params)
            return [Session(*row) for row in cur.fetchall()]

        rows = await self.engine.run(select)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (encode_cursor(rows[-1]) if more and rows else None)

    async def search_sessions(self, owners, teams, query, team=None, limit=50, cursor=None, time_limit=None):
        """
        L{list_sessions} narrowed to the sessions whose title or any
        message's text contains C{query}, in any case (C{%} and C{_} are
        literal).  A search reads every message it may see, so it can be
        given C{time_limit} seconds (L{Refused} C{"time"} past it).

        @return: C{([(session, match)], next_cursor)}, C{match} the excerpt
            of the first matching message's text (L{match_excerpt}), or
            C{None} when only the title matched.
        """
        pattern = _like_pattern(query)
        # Both sides folded by the database's own LOWER, so the exact text
        # is always found, whatever that engine's case rules.
        found = (
            "(LOWER(title) LIKE LOWER(?) ESCAPE '\\' OR EXISTS "
            "(SELECT 1 FROM messages m WHERE m.session_id = sessions.id AND LOWER(m.content) LIKE LOWER(?) ESCAPE '\\'))"
        )
        where, params = self._listing(owners, teams, team, cursor, [found], [pattern, pattern])
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {where} ORDER BY updated_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)

        def select(cur):
            deadline = None if time_limit is None else time.monotonic() + time_limit
            undo = self.engine.time_limit(cur, time_limit) if time_limit is not None else (lambda: None)
            try:
                cur.execute(self._sql(sql), params)
                rows = [Session(*row) for row in cur.fetchall()]
                out = []
                for session in rows[:limit]:
                    # The limit is for the whole search, not each statement.
                    if deadline is not None and time.monotonic() > deadline:
                        raise Refused("time")
                    cur.execute(
                        self._sql("SELECT content FROM messages WHERE session_id = ? AND LOWER(content) LIKE LOWER(?) ESCAPE '\\' ORDER BY seq LIMIT 1"),
                        (session.id, pattern),
                    )
                    row = cur.fetchone()
                    out.append((session, None if row is None else match_excerpt(row[0], query)))
            except Exception as e:
                if self.engine.timed_out(e):
                    raise Refused("time") from None
                raise
            finally:
                undo()
            return out, len(rows) > limit

        rows, more = await self.engine.run_read(select)
        return rows, (encode_cursor(rows[-1][0]) if more and rows else None)

    # The session fields that update() changes.
    SETTINGS = ("title", "system_prompt", "temperature")

    async def update(self, sid, max_bytes=None, owners=None, **changes):
        """
        Set some of L{SETTINGS} (C{None} clears the settings other than the
        title); C{updated_at} moves.  A new system prompt is charged to the
        session's owner (L{Refused} C{"bytes"} past C{max_bytes}).
        """
        for name in changes:
            if name not in self.SETTINGS:
                raise ValueError(name)
        now = self.clock()
        names = list(changes)

        def update(cur):
            if "system_prompt" in changes:
                session = self._locked(cur, sid)
                if session is None:
                    return
                self._charge_prompt(cur, session.owner, session.system_prompt, changes["system_prompt"], max_bytes, owners)
            sets = ", ".join(f"{name} = ?" for name in names + ["updated_at"])
            cur.execute(self._sql(f"UPDATE sessions SET {sets} WHERE id = ?"), [changes[n] for n in names] + [now, sid])

        await self.engine.run(update)

    async def rename(self, sid, title):
        await self.update(sid, title=title)

    async def delete(self, sid):
        def delete(cur):
            session = self._locked(cur, sid)
            if session is None:
                return
            self._drop_messages(cur, session)
            self._charge_prompt(cur, session.owner, session.system_prompt, None)
            cur.execute(self._sql("DELETE FROM sessions WHERE id = ?"), (sid,))

        await self.engine.run(delete)

    async def clear(self, sid):
        now = self.clock()

        def clear(cur):
            session = self._locked(cur, sid)
            if session is None:
                return
            self._drop_messages(cur, session)
            cur.execute(self._sql("UPDATE sessions SET updated_at = ? WHERE id = ?"), (now, sid))

        await self.engine.run(clear)

    def _first_seq_after(self, cur, sid, keep):
        """The seq of the message after the first C{keep} (C{None}: there are at most C{keep})."""
        cur.execute(self._sql("SELECT seq FROM messages WHERE session_id = ? ORDER BY seq LIMIT 1 OFFSET ?"), (sid, keep))
        row = cur.fetchone()
        return None if row is None else row[0]

    def _count(self, cur, sid):
        cur.execute(self._sql("SELECT COUNT(*) FROM messages WHERE session_id = ?"), (sid,))
        return cur.fetchone()[0]

    async def truncate(self, sid, keep):
        """
        Keep the first C{keep} messages of a session and delete the rest,
        their bytes given back to its owner, in one transaction.

        @return: how many messages were deleted; C{None} when the session is
            gone.
        @raise Refused: C{"keep"} when it has fewer than C{keep} messages.
        """
        now = self.clock()

        def truncate(cur):
            session = self._locked(cur, sid)
            if session is None:
                return None
            if self._count(cur, sid) < keep:
                raise Refused("keep")
            first = self._first_seq_after(cur, sid, keep)
            if first is None:
                return 0
            cur.execute(self._sql("DELETE FROM messages WHERE session_id = ? AND seq >= ? RETURNING bytes"), (sid, first))
            freed = [b for (b,) in cur.fetchall()]
            self._charge(cur, session.owner, -sum(freed))
            cur.execute(self._sql("UPDATE sessions SET updated_at = ? WHERE id = ?"), (now, sid))
            return len(freed)

        return await self.engine.run(truncate)

    async def fork(self, sid, owner, keep, title=None, max_sessions=None, max_bytes=None, owners=None, team=KEEP):
        """
        A new session of C{owner} with copies of the first C{keep} messages
        of C{sid} (images included), its settings, C{team} (default: the
        source's), titled C{title} or as the source; their bytes (and the
        system prompt's) are charged to C{owner}.

        @param max_bytes: refuse when the bytes stored for C{owners} (default
            C{[owner]}) plus the copies would pass it.
        @return: the new L{Session} (without messages); C{None} when C{sid}
            is gone.
        @raise Refused: C{"keep"}, C{"sessions"} (C{max_sessions}) or
            C{"bytes"} (C{max_bytes}); nothing is stored.
        """
        now = self.clock()
        owners = [owner] if owners is None else list(owners)

        def fork(cur):
            source = self._session(cur, sid)
            if source is None:
                return None
            if self._count(cur, sid) < keep:
                raise Refused("keep")
            if max_sessions is not None and not self._room_for_session(cur, owner, max_sessions):
                raise Refused("sessions")
            self.engine.lock_owner(cur, owner)
            first = self._first_seq_after(cur, sid, keep)
            bound = "" if first is None else " AND seq < ?"
            bound_params = () if first is None else (first,)
            cur.execute(self._sql("SELECT COALESCE(SUM(bytes), 0) FROM messages WHERE session_id = ?" + bound), (sid,) + bound_params)
            # The copies and the system prompt.
            size = int(cur.fetchone()[0]) + prompt_bytes(source.system_prompt)
            if max_bytes is not None and size and self._used(cur, owners) + size > max_bytes:
                raise Refused("bytes")
            session = Session(new_id(), source.title if title is None else title, owner, source.team if team is KEEP else team, now, now, source.system_prompt, source.temperature)
            self._insert_session(cur, session)
            cur.execute(
                self._sql(
                    "INSERT INTO messages (session_id, seq, role, content, created_at, incomplete, bytes, images)"
                    " SELECT ?, seq, role, content, created_at, incomplete, bytes, images FROM messages WHERE session_id = ?" + bound
                ),
                (session.id, sid) + bound_params,
            )
            self._charge(cur, owner, size)
            return session

        return await self.engine.run(fork)

    async def append(self, sid, messages, max_messages=None):
        """
        Append C{[(role, content, incomplete)]} or C{[(role, content,
        incomplete, images)]} (C{images} data URLs) to a session in one
        transaction, charging their bytes to the session's owner.

        @return: C{False} when it would pass C{max_messages} (nothing
            stored), C{None} when the session is gone.
        """
        now = self.clock()

        def append(cur):
            session = self._locked(cur, sid)
            if session is None:
                return None
            cur.execute(self._sql("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM messages WHERE session_id = ?"), (sid,))
            last, count = cur.fetchone()
            if max_messages is not None and count + len(messages) > max_messages:
                return False
            total = 0
            for i, (role, content, incomplete, *rest) in enumerate(messages, start=1):
                images = tuple(rest[0]) if rest and rest[0] else ()
                size = message_bytes(content, images)
                total += size
                cur.execute(
                    self._sql("INSERT INTO messages (session_id, seq, role, content, created_at, incomplete, bytes, images) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                    (sid, last + i, role, content, now, bool(incomplete), size, _images_column(images)),
                )
            self._charge(cur, session.owner, total)
            cur.execute(self._sql("UPDATE sessions SET updated_at = ? WHERE id = ?"), (now, sid))
            return True

        return await self.engine.run(append)

    async def count_messages(self, sid):
        def count(cur):
            cur.execute(self._sql("SELECT COUNT(*) FROM messages WHERE session_id = ?"), (sid,))
            return cur.fetchone()[0]

        return await self.engine.run(count)

    # --- revoked refresh credentials ---------------------------------------

    async def revoke(self, rid, expires_at):
        """
        Record C{rid} as used or revoked until C{expires_at}.

        @return: C{True} when this call recorded it, C{False} when it was
            already there (atomic: of concurrent calls, across instances
            sharing the database, exactly one gets C{True}).
        """

        def revoke(cur):
            cur.execute(self._sql("DELETE FROM revocations WHERE expires_at < ?"), (self.clock(),))
            cur.execute(self._sql("INSERT INTO revocations (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING"), (rid, expires_at))
            return cur.rowcount == 1

        return await self.engine.run(revoke)

    async def is_revoked(self, rid):
        def check(cur):
            cur.execute(self._sql("SELECT 1 FROM revocations WHERE id = ?"), (rid,))
            return cur.fetchone() is not None

        return await self.engine.run(check)

    def close(self):
        return self.engine.close()


class StoreClosed(Exception):
    """A query after the store was closed (the gateway is stopping)."""


class _ThreadEngine:
    """Runs transactions on a private thread pool."""

    placeholder = "?"

    def lock_owner(self, cur, owner):
        """Serialise this transaction with others for C{owner} (SQLite: BEGIN IMMEDIATE already does)."""

    def notify(self, cur, channel, payload):
        """
        Announce C{payload} on C{channel} to the other instances when this
        transaction commits (PostgreSQL); one SQLite file has one instance.
        """

    def listen(self, channel, on_notify, on_connect):
        """
        Call C{on_notify(payload)} for what other instances announce on
        C{channel}, and C{on_connect()} each time the listening starts (what
        was missed meanwhile is unknown).  Both are called on another
        thread.  Nothing with SQLite.
        """

    def time_limit(self, cur, seconds):
        """
        Stop this transaction's statements once C{seconds} have passed: the
        statement running then raises what L{timed_out} recognises.
        Returns C{undo()}, to call when the transaction is over.
        """
        return lambda: None

    def timed_out(self, error):
        """Whether C{error} is a statement stopped by L{time_limit}."""
        return False

    def __init__(self, reactor, threads):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="clawdbot-storage")
        self._local = threading.local()

    closed = False

    def run(self, fn):
        # Threads start with the first query, so a gateway that never
        # touches history (or fails to start) leaves none behind.
        if self.closed:
            return fail(StoreClosed())
        if not self.pool.started:
            self.pool.start()
        return deferToThreadPool(self.reactor, self.pool, self._transaction, fn)

    def run_read(self, fn):
        """
        Run a long read (a search) where it holds up no other work: here,
        the same pool (PostgreSQL has a connection per thread).
        """
        return self.run(fn)

    def close(self):
        self.closed = True
        if self.pool.started:
            self.pool.stop()


class SQLiteEngine(_ThreadEngine):
    """
    One SQLite file on one thread: WAL, foreign keys, and C{synchronous=FULL}
    so a commit that returned survives a crash.
    """

    def __init__(self, reactor, path, legacy_issuers=()):
        super().__init__(reactor, threads=1)
        self.path = path
        self.context = {"legacy_issuers": tuple(legacy_issuers)}
        # Long reads (searches) on a thread and connection of their own:
        # in WAL mode they read a snapshot while the writer goes on.  (An
        # in-memory database has one connection only.)
        self.read_pool = None
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.read_pool = ThreadPool(minthreads=1, maxthreads=1, name="clawdbot-storage-read")

    def run_read(self, fn):
        if self.read_pool is None:
            return self.run(fn)
        if self.closed:
            return fail(StoreClosed())
        if not self.read_pool.started:
            self.read_pool.start()
        return deferToThreadPool(self.reactor, self.read_pool, self._read_transaction, fn)

    def _read_transaction(self, fn):
        cur = self._connection().cursor()
        cur.execute("BEGIN")
        try:
            return fn(cur)
        finally:
            cur.execute("ROLLBACK")

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # LOWER as PostgreSQL's: every letter, not only ASCII (searches).
            conn.create_function("lower", 1, _lower, deterministic=True)
            _migrate_sqlite(conn, self.context)
            self._local.conn = conn
        return conn

    def time_limit(self, cur, seconds):
        conn = cur.connection
        deadline = time.monotonic() + seconds
        # Asked every few thousand virtual-machine steps; nonzero interrupts.
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 5000)
        return lambda: conn.set_progress_handler(None, 0)

    def timed_out(self, error):
        return isinstance(error, sqlite3.OperationalError) and "interrupt" in str(error)

    def _transaction(self, fn):
        cur = self._connection().cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            result = fn(cur)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")
        return result

    def close(self):
        def shut():
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        if self.pool.started:
            self.pool.callInThread(shut)
        if self.read_pool is not None and self.read_pool.started:
            self.read_pool.callInThread(shut)
            self.read_pool.stop()
        super().close()


def _lower(value):
    return value.lower() if isinstance(value, str) else value


class PostgresEngine(_ThreadEngine):
    """PostgreSQL through psycopg's connection pool, on a few threads."""

    placeholder = "%s"

    def lock_owner(self, cur, owner):
        """A transaction-scoped advisory lock on the owner: counts and inserts for one owner cannot interleave."""
        cur.execute("SELECT pg_advisory_xact_lock(724214, hashtext(%s))", (owner,))

    def __init__(self, reactor, dsn, size=4, legacy_issuers=()):
        super().__init__(reactor, threads=size)
        self.context = {"legacy_issuers": tuple(legacy_issuers)}
        import psycopg_pool

        self.dsn = dsn
        self.connections = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=size, open=False, timeout=10)
        self._ready = False
        self._ready_lock = threading.Lock()
        self._listening = threading.Event()
        self._stop = threading.Event()

    def notify(self, cur, channel, payload):
        cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def listen(self, channel, on_notify, on_connect):
        """A thread holding one connection that LISTENs, reconnecting with a growing pause."""
        import psycopg

        def run():
            pause = 0.5
            while not self._stop.is_set():
                try:
                    with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
                        on_connect()
                        self._listening.set()
                        pause = 0.5
                        while not self._stop.is_set():
                            for note in conn.notifies(timeout=0.5):
                                on_notify(note.payload)
                except Exception as e:
                    log.warn("The notification connection to PostgreSQL failed ({error}); reconnecting", error=type(e).__name__)
                finally:
                    self._listening.clear()
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)

        thread = threading.Thread(target=run, name="clawdbot-notify", daemon=True)
        thread.start()

    def time_limit(self, cur, seconds):
        cur.execute(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")
        return lambda: None

    def timed_out(self, error):
        import psycopg

        return isinstance(error, psycopg.errors.QueryCanceled)

    def _transaction(self, fn):
        with self._ready_lock:
            if not self._ready:
                self.connections.open(wait=True, timeout=10)
                with self.connections.connection() as conn:
                    _migrate_postgres(conn, self.context)
                self._ready = True
        with self.connections.connection() as conn:
            with conn.transaction():
                with conn.cursor() as cur:
                    return fn(cur)

    def close(self):
        self._stop.set()
        super().close()
        if self._ready:
            self.connections.close()


def _migrate_sqlite(conn, context=None):
    """Bring a SQLite schema up to date, one migration per transaction."""
    for number, migration in enumerate(MIGRATIONS, start=1):
        conn.execute("BEGIN IMMEDIATE")
        # Read the version under the write lock: another process may have
        # migrated meanwhile.
        if conn.execute("PRAGMA user_version").fetchone()[0] >= number:
            conn.execute("COMMIT")
            continue
        try:
            cur = conn.cursor()
            for step in _statements(migration, "sqlite"):
                if callable(step):
                    step(cur, "?", context or {})
                else:
                    cur.execute(step)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def _migrate_postgres(conn, context=None):
    """Bring a PostgreSQL schema up to date in one transaction, under an advisory lock."""
    with conn.transaction():
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(724213)")
            cur.execute("CREATE TABLE IF NOT EXISTS clawdbot_schema (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM clawdbot_schema")
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO clawdbot_schema (version) VALUES (0)")
            version = row[0] if row else 0
            for number, migration in enumerate(MIGRATIONS, start=1):
                if number > version:
                    for step in _statements(migration, "postgresql"):
                        if callable(step):
                            step(cur, "%s", context or {})
                        else:
                            cur.execute(step)
                    cur.execute("UPDATE clawdbot_schema SET version = %s", (number,))


def open_store(config, reactor):
    """The store the config names."""
    storage = config.storage
    # Should this instance run migration 3, the providers it trusts may
    # claim the rows stored before owners had a provider.
    legacy = configured_issuers(config)
    if storage.backend == "postgresql":
        return SQLStore(PostgresEngine(reactor, storage.dsn, legacy_issuers=legacy))
    return SQLStore(SQLiteEngine(reactor, storage.path, legacy_issuers=legacy))
