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

When the database cannot be used for a reason outside the gateway (down,
unreachable, restarting, locked by another process, a full disk, a file
that cannot be written), every operation raises L{StorageUnavailable}: a
503 C{STORAGE_UNAVAILABLE} with C{Retry-After}, never a 500.  A programming
error (bad SQL, a broken constraint) is left as it is.  The engines' rule
for repeating a transaction is in L{PostgresEngine}.
"""

import base64
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from clawdbot.auth.identity import configured_issuers, issuer_id, legacy_owner, owner_key, owner_sub
from clawdbot.errors import StorageUnavailable
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
    # 8: the background writers' batches already kept (L{applied_batch}).
    [
        "CREATE TABLE applied_batches (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX applied_batches_at ON applied_batches (at)",
    ],
]


# How long a kept batch's id is remembered: a batch retried later than
# this (a gateway that could not write for a week) would be kept twice.
BATCH_MEMORY = 7 * 86400.0


def new_batch_id(kind):
    """A fresh id for a batch of background writes (L{applied_batch})."""
    return f"{kind}-{secrets.token_hex(12)}"


def applied_batch(cur, placeholder, batch_id, now):
    """
    Record, in the transaction of C{cur}, that the batch C{batch_id} is
    kept; C{True} when it was already (the transaction must then change
    nothing else).

    The background writers (usage, audit events) retry a batch whose
    write failed, and a write that failed during its COMMIT may have been
    kept all the same (L{PostgresEngine}): retried with the same id, such a
    batch is skipped here instead of counted twice.  Ids older than
    L{BATCH_MEMORY} are dropped as batches are kept.
    """
    cur.execute(f"INSERT INTO applied_batches (id, at) VALUES ({placeholder}, {placeholder}) ON CONFLICT (id) DO NOTHING", (batch_id, now))
    if cur.rowcount == 0:
        return True
    cur.execute(f"DELETE FROM applied_batches WHERE at < {placeholder}", (now - BATCH_MEMORY,))
    return False


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

    # The last probe's transaction while it still runs (L{ping}).
    _probing = None

    async def ping(self, timeout=2.0):
        """
        A cheap probe for C{/readyz}: C{None} when the store runs a
        C{SELECT 1} transaction within C{timeout} seconds and accepts
        changes (L{_ThreadEngine.probe}: C{"read-only: writes are refused"}
        when not), else a short curated reason (never a DSN, an address or
        a library's message).
        While an earlier probe still waits on its thread no other starts
        (this one says the store is slow), so probes hold at most one of
        the engine's threads however long the database takes.
        """
        if self._probing is not None:
            return "no answer in time"

        def select(cur):
            return self.engine.probe(cur)

        answer = Deferred()
        timer = self.engine.reactor.callLater(timeout, lambda: answer.called or answer.callback("no answer in time"))

        def settle(result):
            self._probing = None
            if timer.active():
                timer.cancel()
            if not answer.called:
                answer.callback(self._probe_reason(result))

        self._probing = work = self.engine.run(select)
        work.addBoth(settle)
        return await answer

    @staticmethod
    def _probe_reason(result):
        """What a probe's result (L{ping}) says: C{None}, or why the store did not answer."""
        from twisted.python.failure import Failure

        if not isinstance(result, Failure):
            return result
        if result.check(StorageUnavailable) and getattr(result.value, "read_only", False):
            return READ_ONLY_PROBE
        if result.check(StorageUnavailable):
            return result.value.reason
        return f"the probe failed ({type(result.value).__name__})"


class StoreClosed(StorageUnavailable):
    """
    A query after the store was closed (the gateway is stopping): to a
    caller, the database cannot be used now (a 503), like an outage.
    """

    def __init__(self):
        super().__init__("closed (the gateway is stopping)")


class _ThreadEngine:
    """
    Runs transactions on a private thread pool.

    A transaction function, C{fn(cursor)}, may be run more than once (see
    L{PostgresEngine}): it acts only through its cursor, and what it
    computes from outside (ids, times) it takes from its closure, so a
    second run does exactly what the first would have.

    While transactions fail with L{StorageUnavailable} the engine is in an
    outage: one warning says so when it begins and one line when a
    transaction succeeds again, never a line per request; and waits (for a
    connection, for another process's lock) are short, so the requests
    queued behind the engine's few threads are answered at once rather
    than one long wait after another.

    A database that answers but refuses writes (a read-only PostgreSQL: a
    standby, C{default_transaction_read_only}; a SQLite file that cannot
    be written) is a state of its own, not an outage: one warning when a
    write is first refused, one line when a write succeeds again; reads,
    which go on working, end neither it nor say an outage ended.
    """

    placeholder = "?"

    # Why the store is failing (set and cleared on the engine's threads),
    # or None while it works.
    outage = None
    # Whether the log has said the outage began (the reactor's side).
    _announced = False
    # Why writes are refused (the read-only state, set on the engine's
    # threads when a write is refused, cleared when one succeeds), or None.
    refusing = None
    # Whether the log has said writes are refused (the reactor's side).
    _refusing_said = False

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
        # Called (on the reactor) as the engine closes: what is not written
        # by then is not (L{clawdbot.storage.usage.UsageBook} says so).
        self.before_close = []

    closed = False

    def run(self, fn):
        # Threads start with the first query, so a gateway that never
        # touches history (or fails to start) leaves none behind.
        if self.closed:
            return fail(StoreClosed())
        if not self.pool.started:
            self.pool.start()
        return self._watched(deferToThreadPool(self.reactor, self.pool, self._guarded, self._transaction, fn), True)

    def _guarded(self, transaction, fn, clears=True):
        """
        On an engine thread: C{transaction(fn)}, keeping L{outage} and
        L{refusing} current; returns C{(result, wrote)}, C{wrote} whether
        the transaction changed anything (L{_wrote}).
        """
        self._local.wrote = False
        try:
            result = transaction(fn)
        except StorageUnavailable as e:
            if getattr(e, "read_only", False):
                self.refusing = e.reason
            else:
                self.outage = e.reason
            raise
        if clears:
            self.outage = None
        wrote = bool(getattr(self._local, "wrote", False))
        if wrote:
            self.refusing = None
        return result, wrote

    def _wrote(self, cur):
        """
        Called by a transaction before its COMMIT while writes are refused
        (L{refusing}): whether it changed anything (only a write that
        succeeds ends the read-only state, never a read).
        """
        return True

    def _watched(self, d, clears):
        """C{d}, a transaction's C{(result, wrote)}, with the outage's and the read-only state's log lines said on the reactor."""

        def answered(done):
            result, wrote = done
            if clears and self._announced:
                self._announced = False
                log.info("History storage is back: transactions succeed again")
            if wrote and self._refusing_said:
                self._refusing_said = False
                log.info("History storage accepts changes again: a write succeeded")
            return result

        def failed(failure):
            if not failure.check(StorageUnavailable) or failure.check(StoreClosed):
                return failure
            if getattr(failure.value, "read_only", False):
                if not self._refusing_said:
                    self._refusing_said = True
                    log.warn("{reason}; writes answer 503 until it does", reason=failure.value.reason)
            elif not self._announced:
                self._announced = True
                log.warn(
                    "History storage unavailable ({reason}); answering 503 STORAGE_UNAVAILABLE until it is back",
                    reason=failure.value.reason,
                )
            return failure

        return d.addCallbacks(answered, failed)

    def probe(self, cur):
        """A readiness probe's work (L{SQLStore.ping}): C{None}, or why the store is not ready although it answers."""
        cur.execute("SELECT 1")
        cur.fetchone()
        return None

    def run_read(self, fn):
        """
        Run a long read (a search) where it holds up no other work: here,
        the same pool (PostgreSQL has a connection per thread).
        """
        return self.run(fn)

    def close(self):
        """
        Refuse new transactions and stop the threads, B{off the reactor}:
        Twisted's C{ThreadPool.stop} joins its threads, which would hold
        the reactor for as long as a transaction takes (a database that
        stopped answering).  Here a thread of its own stops the pools (and
        L{_closing}, the engine's own); a transaction still running ends
        within its engine's bound (L{PostgresEngine.TRANSACTION_TIME}), so
        that thread and the pools' ones end too, and the process exits
        normally.  Returns a Deferred that fires once they have.
        """
        self.closed = True
        for hook in self.before_close:
            try:
                hook()
            except Exception:
                log.failure("A storage user failed as the store closed")
        pools = [pool for pool in (self.pool, getattr(self, "read_pool", None)) if pool is not None and pool.started]
        done = Deferred()

        def stop():
            try:
                self._closing()
                for pool in pools:
                    pool.stop()
            except Exception:
                log.failure("Could not stop the storage threads")
            finally:
                try:
                    self.reactor.callFromThread(done.callback, None)
                except Exception:
                    # (The reactor is gone already: nobody waits.)
                    pass

        threading.Thread(target=stop, name="clawdbot-storage-stop").start()
        return done

    def _closing(self):
        """Called as the engine closes, on the closing thread, before its threads are stopped."""


# SQLite's result codes (the primary code, the low byte of the extended
# one) that mean the database cannot be used now, rather than a bug:
# (the reason logged, what the client is told, Retry-After seconds, whether
# the connection is opened afresh for the next transaction).
_SQLITE_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY: ("the database file is locked by another process", "the history database is busy; retry shortly", 2, False),
    sqlite3.SQLITE_LOCKED: ("the database file is locked", "the history database is busy; retry shortly", 2, False),
    sqlite3.SQLITE_FULL: ("the disk holding the database is full", None, 5, False),
    sqlite3.SQLITE_IOERR: ("an I/O error on the database file", None, 5, True),
    sqlite3.SQLITE_READONLY: ("the SQLite database file accepts no changes (it cannot be written)", None, 5, True),
    sqlite3.SQLITE_CANTOPEN: ("the database file cannot be opened", None, 5, True),
    sqlite3.SQLITE_PERM: ("the database file may not be accessed", None, 5, True),
    sqlite3.SQLITE_PROTOCOL: ("the database file's locks failed", None, 2, True),
    sqlite3.SQLITE_NOLFS: ("the database file is too large for its file system", None, 5, True),
    sqlite3.SQLITE_CORRUPT: ("the database file is damaged", None, 5, True),
    sqlite3.SQLITE_NOTADB: ("the database file is not a SQLite database", None, 5, True),
    sqlite3.SQLITE_NOMEM: ("SQLite ran out of memory", None, 5, True),
}


def _sqlite_unavailable(error):
    """The L{StorageUnavailable} a SQLite error means, and whether to reopen; C{(None, False)} for a bug."""
    code = getattr(error, "sqlite_errorcode", None)
    entry = _SQLITE_UNAVAILABLE.get(code & 0xFF) if isinstance(code, int) else None
    if entry is None:
        return None, False
    reason, details, retry_after, reopen = entry
    if details is None:
        error = StorageUnavailable(reason, retry_after=retry_after)
    else:
        error = StorageUnavailable(reason, details, retry_after)
    if code & 0xFF == sqlite3.SQLITE_READONLY:
        error.read_only = True
    return error, reopen


def unusable_path(path):
    """
    Why a SQLite database at C{path} could not be written (its directory
    cannot be made or written, where SQLite keeps its journal beside the
    file; the file, or its journal, is not a writable regular file), or
    C{None}.  Checked at start so a bad C{storage.path} stops the start
    with one line instead of failing every request later.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"its directory {directory} cannot be created ({e.strerror or type(e).__name__})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable (SQLite keeps its journal beside the file)"
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.lexists(name):
            if not os.path.isfile(name):
                return f"{name} is not a regular file"
            if not os.access(name, os.R_OK | os.W_OK):
                return f"{name} is not writable"
    return None


class SQLiteEngine(_ThreadEngine):
    """
    One SQLite file on one thread: WAL, foreign keys, and C{synchronous=FULL}
    so a commit that returned survives a crash.

    A write waits L{BUSY_TIMEOUT} seconds for another process's lock (in
    an outage, L{OUTAGE_BUSY_TIMEOUT}).  A transaction that fails is rolled
    back, a failed COMMIT too (SQLite's commit is all or nothing: nothing
    of it was kept), and the errors that mean the file cannot be used now
    (L{_SQLITE_UNAVAILABLE}: locked, disk full, I/O error, read-only,
    cannot be opened) raise L{StorageUnavailable}; it is never repeated,
    the next request tries again.
    """

    BUSY_TIMEOUT = 5.0
    OUTAGE_BUSY_TIMEOUT = 0.25

    def __init__(self, reactor, path, legacy_issuers=()):
        super().__init__(reactor, threads=1)
        self.path = path
        self.context = {"legacy_issuers": tuple(legacy_issuers)}
        # Long reads (searches) on a thread and connection of their own:
        # in WAL mode they read a snapshot while the writer goes on.  (An
        # in-memory database has one connection only.)
        self.read_pool = None
        if path != ":memory:":
            problem = unusable_path(path)
            if problem is not None:
                raise StorageUnavailable(problem)
            self.read_pool = ThreadPool(minthreads=1, maxthreads=1, name="clawdbot-storage-read")

    def run_read(self, fn):
        if self.read_pool is None:
            return self.run(fn)
        if self.closed:
            return fail(StoreClosed())
        if not self.read_pool.started:
            self.read_pool.start()
        # A read that works says nothing of the writer (another process's lock).
        return self._watched(deferToThreadPool(self.reactor, self.read_pool, self._guarded, self._read_transaction, fn, False), False)

    def _read_transaction(self, fn):
        def read(conn):
            cur = conn.cursor()
            cur.execute("BEGIN")
            try:
                return fn(cur)
            finally:
                self._rollback(conn)

        return self._mapped(read)

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=self.BUSY_TIMEOUT)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                # LOWER as PostgreSQL's: every letter, not only ASCII (searches).
                conn.create_function("lower", 1, _lower, deterministic=True)
                _migrate_sqlite(conn, self.context)
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            self._local.busy = self.BUSY_TIMEOUT
        # In an outage a locked file is answered at once.
        busy = self.OUTAGE_BUSY_TIMEOUT if self.outage else self.BUSY_TIMEOUT
        if self._local.busy != busy:
            conn.execute(f"PRAGMA busy_timeout = {int(busy * 1000)}")
            self._local.busy = busy
        return conn

    def _drop_connection(self):
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _rollback(self, conn):
        """End the transaction, if SQLite has not already; a connection that cannot is opened afresh next time."""
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._drop_connection()

    def _mapped(self, work):
        """C{work(connection)}, the errors that mean the file cannot be used now raised as L{StorageUnavailable}."""
        try:
            return work(self._connection())
        except sqlite3.Error as e:
            unavailable, reopen = _sqlite_unavailable(e)
            if unavailable is None:
                raise
            if reopen:
                self._drop_connection()
            raise unavailable from e

    def time_limit(self, cur, seconds):
        conn = cur.connection
        deadline = time.monotonic() + seconds
        # Asked every few thousand virtual-machine steps; nonzero interrupts.
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 5000)
        return lambda: conn.set_progress_handler(None, 0)

    def timed_out(self, error):
        return isinstance(error, sqlite3.OperationalError) and "interrupt" in str(error)

    def _transaction(self, fn):
        def write(conn):
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            try:
                result = fn(cur)
            except BaseException:
                self._rollback(conn)
                raise
            try:
                cur.execute("COMMIT")
            except BaseException:
                # Not committed (all or nothing): undone, and not reported as kept.
                self._rollback(conn)
                raise
            self._local.wrote = conn.total_changes != before
            return result

        return self._mapped(write)

    def probe(self, cur):
        """
        C{SELECT 1}, and whether the file can still be written (a file
        made read-only after the start): C{"read-only: writes are refused"}
        when not.
        """
        super().probe(cur)
        if self.path != ":memory:" and unusable_path(self.path) is not None:
            return READ_ONLY_PROBE
        return None

    def close(self):
        if self.pool.started:
            self.pool.callInThread(self._drop_connection)
        if self.read_pool is not None and self.read_pool.started:
            self.read_pool.callInThread(self._drop_connection)
        return super().close()


def _lower(value):
    return value.lower() if isinstance(value, str) else value


class _Repeat(Exception):
    """A transaction that may be run again (see L{PostgresEngine}); C{error} is why it failed."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class _Hung(BaseException):
    """
    A connection check the watchdog ended (L{PostgresEngine._check}): a
    C{BaseException}, so psycopg_pool's wait does not go on to check
    another connection (which would hang as long), but gives up at once.
    """


def _connection_failure(reason, details=None):
    """
    A L{StorageUnavailable} that says the database cannot be reached at all
    (no connection, a connection lost, no answer in time): it opens
    L{PostgresEngine}'s breaker, where an error of one transaction (a
    read-only server refusing a write, a full disk) does not.
    """
    error = StorageUnavailable(reason) if details is None else StorageUnavailable(reason, details)
    error.breaks = True
    return error


def _cut(conn):
    """
    End C{conn}'s socket under the thread waiting on it (C{shutdown}, both
    ways, of a duplicate of its descriptor: the descriptor stays the
    connection's to close), so what libpq waits for fails at once.
    """
    try:
        if conn.closed:
            return
        copy = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            copy.shutdown(socket.SHUT_RDWR)
        finally:
            copy.close()
    except Exception:
        # (Gone already: nothing is waiting on it.)
        pass


class _Guard:
    """
    One bounded wait on a connection (L{_Watchdog.guard}): armed from
    L{attach} (the connection known) until the block ends; C{cut} tells
    whether the watchdog ended it.
    """

    conn = None
    deadline = None
    cut = False

    def __init__(self, watchdog, seconds, conn=None):
        self.watchdog = watchdog
        self.seconds = seconds
        self._first = conn

    def __enter__(self):
        if self._first is not None:
            self.attach(self._first)
        return self

    def attach(self, conn):
        """Bound from now on the work on C{conn}: L{seconds} at most."""
        with self.watchdog.condition:
            self.conn = conn
            self.deadline = time.monotonic() + self.seconds
            self.watchdog.arm(self)

    def extend(self, seconds):
        """Allow this work C{seconds} from now, when that is later than its bound."""
        with self.watchdog.condition:
            if self.deadline is not None:
                self.deadline = max(self.deadline, time.monotonic() + seconds)
                self.watchdog.condition.notify()

    def __exit__(self, *exc):
        self.watchdog.disarm(self)
        return False


class _Watchdog:
    """
    The deadline of every wait on PostgreSQL, kept on the gateway's side.

    A server that stopped answering while the kernel still acknowledges
    (a process stopped or hung, swapping: no TCP timeout ever fires) leaves
    a thread waiting in libpq for good.  Each wait is a L{_Guard}; a thread
    of the watchdog's own, alive only while some guard is armed (so it keeps
    no process from exiting), shuts the socket of a guard past its deadline
    down (L{_cut}): the blocked call raises, and the engine answers
    L{StorageUnavailable} at once.  Once L{close}d, every guard is cut at
    once.
    """

    def __init__(self):
        self.condition = threading.Condition()
        self._armed = set()
        self._thread = None
        self._closed = False

    def guard(self, seconds, conn=None):
        """A L{_Guard} of C{seconds}, for a C{with} block; armed now when C{conn} is given."""
        return _Guard(self, seconds, conn)

    def arm(self, guard):
        # (Called with the condition held.)
        self._armed.add(guard)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="clawdbot-storage-watchdog")
            self._thread.start()
        else:
            self.condition.notify()

    def disarm(self, guard):
        with self.condition:
            self._armed.discard(guard)
            self.condition.notify()

    def close(self):
        """Cut whatever still waits (the engine is closing), and every guard armed from now on."""
        with self.condition:
            self._closed = True
            self.condition.notify()

    def _run(self):
        with self.condition:
            while self._armed:
                now = time.monotonic()
                wake = None
                for guard in list(self._armed):
                    if guard.cut:
                        continue
                    if self._closed or guard.deadline <= now:
                        guard.cut = True
                        _cut(guard.conn)
                    else:
                        wake = guard.deadline if wake is None else min(wake, guard.deadline)
                self.condition.wait(None if wake is None else wake - now)
            self._thread = None


def _quiet_pool_log():
    """
    psycopg's pool logs a warning for each failed reconnection attempt
    (several a second in an outage, on stderr): the engine says an outage
    once itself (L{_ThreadEngine}), so only the pool's errors are kept.
    """
    logging.getLogger("psycopg").setLevel(logging.ERROR)


# What libpq says when it could not connect, and the reason logged for
# it (its own words never are: they hold the server's address).
_CONNECT_REFUSALS = (
    (("password authentication failed", "authentication failed", "pg_hba.conf", "no password supplied", "password is required"), "PostgreSQL refused the gateway's credentials"),
    (("does not exist",), "the database or role in storage.dsn does not exist on the PostgreSQL server"),
    (("too many clients", "remaining connection slots"), "PostgreSQL has no connection slot left (max_connections)"),
    (("starting up", "shutting down", "in recovery mode", "not yet accepting connections"), "PostgreSQL is starting up or shutting down"),
    (("read-only", "read-write", "target_session_attrs"), "no PostgreSQL server in storage.dsn accepts writes (target_session_attrs)"),
    (("timeout expired",), "PostgreSQL did not answer a new connection in time"),
    (("connection refused", "could not connect", "could not translate host name", "no route to host", "network is unreachable"), "PostgreSQL cannot be reached"),
)


def _connect_refusal(error):
    """The curated reason a failed connection's error means, or C{None}."""
    text = str(error).lower()
    for needles, reason in _CONNECT_REFUSALS:
        if any(needle in text for needle in needles):
            return reason
    return None


class PostgresEngine(_ThreadEngine):
    """
    PostgreSQL through psycopg's connection pool, on a few threads.

    Each connection is checked as it leaves the pool (psycopg_pool's
    C{check_connection}: an empty query), so one a database restart
    broke is replaced rather than handed out; a transaction waits
    L{WAIT} seconds for a connection (L{OUTAGE_WAIT} in an outage).  The
    pool's background reconnections give up after L{RECONNECT} seconds,
    and the next transaction asks for a new one at once, so a database
    that comes back is used within a second or two.

    B{Every wait on the server is bounded on the gateway's side} (a
    L{_Watchdog}): the check L{CHECK_TIME} seconds, a transaction (from
    the moment it has its connection to its COMMIT) L{TRANSACTION_TIME}
    seconds, or its statement time limit (L{time_limit}) plus
    L{TRANSACTION_TIME} when that is longer, the schema's migration at the
    first use L{MIGRATION_TIME}.  Past it the connection's
    socket is shut down and the caller gets L{StorageUnavailable}, so a
    server that stopped answering (a stopped process, a partition the
    kernel does not see: TCP keepalives, L{KEEPALIVES}, catch those only
    later) holds no request and no stop for longer.

    B{A breaker}: once the server cannot be reached (no connection within
    the wait, a connection lost twice, no answer in time), the engine knows
    an outage; then one transaction at a time tries the server (at most
    every L{HALF_OPEN} seconds) and the others answer L{StorageUnavailable}
    at once, rather than each waiting out the pool in turn.  The first
    transaction that works closes it.  An error of one transaction (a
    read-only server refusing a write, a full disk) opens nothing.

    The rule for repeating a transaction, which runs in a
    C{BEGIN ... COMMIT} of its own: when the connection fails (closed,
    broken, the server shutting down or crashing: "terminating connection
    due to unexpected postmaster exit", "server closed the connection
    unexpectedly") B{before COMMIT was sent}, nothing of it was kept, since
    the server rolls back a transaction whose connection ends, so the
    whole transaction function is run once more on another connection.
    The same for a serialization failure or a deadlock (SQLSTATE class
    40), which the server has rolled back.  When the connection fails
    B{during the COMMIT}, whether it was kept is unknown: it is not
    repeated (it could be kept twice) and the caller gets
    L{StorageUnavailable}, so nothing is reported as stored that may not
    be (the background writers, usage and audit, make their batches
    idempotent for that: L{applied_batch}).  A transaction the watchdog
    ended is not repeated either.  Any other operational error (the
    pool's wait ran out, a full disk, a refused connection), a second
    failure, or a failure at the first use (opening the pool, the
    migration) raises L{StorageUnavailable} at once, classified by
    SQLSTATE (L{_pg_unavailable}); the first use is tried again by the
    next transaction.  Errors in the SQL itself are raised as they are.
    """

    placeholder = "%s"

    WAIT = 5.0
    OUTAGE_WAIT = 1.5
    RECONNECT = 2.0
    # Seconds to connect, unless the DSN says.
    CONNECT_TIMEOUT = 5
    # The bound of a connection's check, and of a transaction (watchdog).
    CHECK_TIME = 2.0
    TRANSACTION_TIME = 15.0
    # The schema's migration at the first use may rewrite big tables.
    MIGRATION_TIME = 300.0
    # In an outage, one transaction tries the server at most this often.
    HALF_OPEN = 0.5
    # TCP keepalives and the unacknowledged-data limit, unless the DSN
    # says: a partition is noticed in about 15 s even without a watchdog.
    KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 2, "tcp_user_timeout": 15000}

    def lock_owner(self, cur, owner):
        """A transaction-scoped advisory lock on the owner: counts and inserts for one owner cannot interleave."""
        cur.execute("SELECT pg_advisory_xact_lock(724214, hashtext(%s))", (owner,))

    def __init__(self, reactor, dsn, size=4, legacy_issuers=()):
        super().__init__(reactor, threads=size)
        self.context = {"legacy_issuers": tuple(legacy_issuers)}
        import psycopg.conninfo
        import psycopg_pool

        _quiet_pool_log()
        self.dsn = dsn
        given = psycopg.conninfo.conninfo_to_dict(dsn)
        defaults = {"connect_timeout": self.CONNECT_TIMEOUT, **self.KEEPALIVES}
        self.connect_kwargs = {name: value for name, value in defaults.items() if name not in given}
        self.watchdog = _Watchdog()
        self.connections = psycopg_pool.ConnectionPool(
            dsn,
            kwargs=self.connect_kwargs,
            min_size=1,
            max_size=size,
            open=False,
            timeout=self.WAIT,
            check=self._check,
            reconnect_timeout=self.RECONNECT,
        )
        self._opened = False
        self._ready = False
        self._ready_lock = threading.Lock()
        self._listening = threading.Event()
        self._stop = threading.Event()
        # The breaker: why the server cannot be reached (None: it can),
        # when a try last failed, whether a try is under way.
        self._breaker = threading.Lock()
        self._down = None
        self._down_at = 0.0
        self._trying = False

    def _check(self, conn):
        """psycopg_pool's check of a connection leaving the pool, bounded by L{CHECK_TIME}."""
        import psycopg_pool

        with self.watchdog.guard(self.CHECK_TIME, conn) as guard:
            try:
                psycopg_pool.ConnectionPool.check_connection(conn)
            except Exception:
                if guard.cut:
                    raise _Hung() from None
                raise

    def notify(self, cur, channel, payload):
        cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def listen(self, channel, on_notify, on_connect):
        """
        A thread holding one connection that LISTENs, reconnecting with a
        growing pause (two seconds at most); one warning when the
        connection is lost, not one per attempt.
        """
        import psycopg

        def run():
            pause = 0.5
            said = False
            while not self._stop.is_set():
                try:
                    with psycopg.connect(self.dsn, autocommit=True, **self.connect_kwargs) as conn:
                        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
                        on_connect()
                        self._listening.set()
                        pause, said = 0.5, False
                        while not self._stop.is_set():
                            for note in conn.notifies(timeout=0.5):
                                on_notify(note.payload)
                except Exception as e:
                    if not said and not self._stop.is_set():
                        said = True
                        log.warn("The notification connection to PostgreSQL failed ({error}); reconnecting", error=type(e).__name__)
                finally:
                    self._listening.clear()
                self._stop.wait(pause)
                pause = min(pause * 2, 2.0)

        thread = threading.Thread(target=run, name="clawdbot-notify", daemon=True)
        thread.start()

    def time_limit(self, cur, seconds):
        cur.execute(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")
        # The watchdog leaves the server its own limit first.
        guard = getattr(self._local, "guard", None)
        if guard is not None:
            guard.extend(seconds + self.TRANSACTION_TIME)
        return lambda: None

    def timed_out(self, error):
        import psycopg

        return isinstance(error, psycopg.errors.QueryCanceled)

    def _wrote(self, cur):
        # A transaction that changed anything has a transaction id.
        cur.execute("SELECT txid_current_if_assigned() IS NOT NULL")
        return bool(cur.fetchone()[0])

    def probe(self, cur):
        """
        Whether this server accepts changes (C{SHOW transaction_read_only}:
        a standby, C{default_transaction_read_only}): C{"read-only: writes
        are refused"} when not.
        """
        cur.execute("SHOW transaction_read_only")
        return READ_ONLY_PROBE if cur.fetchone()[0] == "on" else None

    def _wait(self):
        return self.OUTAGE_WAIT if self.outage or self._down else self.WAIT

    # --- the breaker --------------------------------------------------------

    def _admit(self):
        """
        Whether this transaction is the one that tries the server in an
        outage (C{False}: there is none); L{StorageUnavailable} at once
        while another tries, or a try failed less than L{HALF_OPEN}
        seconds ago.
        """
        if self._down is None:
            return False  # (no outage: no lock taken, the common case)
        with self._breaker:
            if self._down is None:
                return False
            if self._trying or time.monotonic() - self._down_at < self.HALF_OPEN:
                raise StorageUnavailable(self._down)
            self._trying = True
            return True

    def _settle(self, trying, down=None, reached=False):
        """After a transaction: the breaker opened (C{down}, a reason), closed (C{reached}), or as it was."""
        if not trying and down is None and (not reached or self._down is None):
            return  # (nothing changes: no lock taken)
        with self._breaker:
            if trying:
                self._trying = False
            if down is not None:
                self._down = down
                self._down_at = time.monotonic()
            elif reached:
                self._down = None

    def _no_connection(self):
        """
        Why the pool's wait ran out: when no outage is known yet (once an
        outage), one connection tried here, whose refusal says why, never
        in libpq's words.
        """
        import psycopg

        reason = "no connection to PostgreSQL within the pool's wait"
        if self._down is None:
            try:
                psycopg.connect(self.dsn, **{**self.connect_kwargs, "connect_timeout": 2}).close()
            except psycopg.Error as e:
                reason = _connect_refusal(e) or reason
            else:
                # The server answers: the pool's connections are all busy,
                # which is no outage (the breaker stays as it is).
                return StorageUnavailable("every connection to PostgreSQL was busy for the pool's wait")
        return _connection_failure(reason)

    def _hung(self):
        if self.closed:
            return StoreClosed()
        return _connection_failure(f"PostgreSQL did not answer within {self.CHECK_TIME:g} s (a connection check)")

    # --- transactions -------------------------------------------------------

    def _prepare(self, trying):
        """At the first use: L{_migrate}, by one thread at a time."""
        if self._ready:
            return
        # (Bounded: the one preparing waits the pool's wait at most; those
        # behind it then find the breaker open and answer at once.)
        if not self._ready_lock.acquire(timeout=self._wait() + self.TRANSACTION_TIME):
            raise StorageUnavailable("the schema is still being brought up to date")
        try:
            if self._ready:
                return
            if self.closed:
                raise StoreClosed()
            if self._down is not None and not trying:
                raise _connection_failure(self._down)
            try:
                self._migrate()
            except StorageUnavailable as e:
                # (The breaker opens before the lock goes: those waiting for
                # it answer at once rather than wait in turn.)
                if getattr(e, "breaks", False):
                    self._settle(False, down=e.reason)
                raise
            self._ready = True
        finally:
            self._ready_lock.release()

    def _migrate(self):
        """Open the pool (it connects in the background) and bring the schema up to date: L{StorageUnavailable} when it cannot."""
        import psycopg

        if not self._opened:
            # Not waiting here: a pool whose wait at open runs out is
            # closed for good, while this one keeps connecting.
            self.connections.open(wait=False)
            self._opened = True
        try:
            with self._waiting_on_pool(), self.watchdog.guard(self.MIGRATION_TIME) as guard:
                with self.connections.connection(timeout=self._wait()) as conn:
                    guard.attach(conn)
                    _migrate_postgres(conn, self.context)
        except psycopg.Error as e:
            if guard.cut:
                raise _connection_failure(f"PostgreSQL did not finish the schema's migration within {self.MIGRATION_TIME:g} s") from e
            unavailable = _pg_unavailable(e, None)
            if unavailable is None:
                raise
            raise unavailable from e

    @contextlib.contextmanager
    def _waiting_on_pool(self):
        """
        What a wait on the pool (or a guarded wait on the database) ends
        with, as the store's own errors: no connection within the pool's
        wait, a wait the watchdog cut, a pool closed at shutdown.
        """
        import psycopg_pool

        try:
            yield
        except psycopg_pool.PoolTimeout as e:
            raise self._no_connection() from e
        except _Hung:
            raise self._hung() from None
        except psycopg_pool.PoolClosed:
            raise StoreClosed() from None

    def _transaction(self, fn):
        if self.closed:
            raise StoreClosed()
        trying = self._admit()
        try:
            result = self._repeating(fn, trying)
        except StoreClosed:
            self._settle(trying)
            raise
        except StorageUnavailable as e:
            self._settle(trying, down=e.reason if getattr(e, "breaks", False) else None, reached=not getattr(e, "breaks", False))
            raise
        except BaseException:
            # (The server answered: an error in the SQL, or of the caller.)
            self._settle(trying, reached=True)
            raise
        self._settle(trying, reached=True)
        return result

    def _repeating(self, fn, trying):
        self._prepare(trying)
        try:
            return self._attempt(fn)
        except _Repeat:
            pass
        try:
            return self._attempt(fn)
        except _Repeat as again:
            raise _pg_unavailable(again.error, None, again=True) from again.error

    def _attempt(self, fn):
        """One run of C{fn} in a transaction; L{_Repeat} when it may be run again."""
        import psycopg

        conn = None
        committing = False
        guard = self.watchdog.guard(self.TRANSACTION_TIME)
        self._local.guard = guard
        try:
            with self._waiting_on_pool(), guard:
                with self.connections.connection(timeout=self._wait()) as conn:
                    guard.attach(conn)
                    with conn.transaction():
                        with conn.cursor() as cur:
                            result = fn(cur)
                            if self.refusing is not None:
                                self._local.wrote = self._wrote(cur)
                        # What fails from here on fails in the COMMIT.
                        committing = True
            return result
        except psycopg.Error as e:
            lost = conn is not None and (conn.broken or conn.closed)
            if committing and (lost or guard.cut or isinstance(e, psycopg.OperationalError)):
                raise _connection_failure(
                    "the connection to PostgreSQL failed during a COMMIT",
                    "the history database stopped answering while a change was being saved: it may not have been kept; check, then retry",
                ) from e
            if guard.cut:
                if self.closed:
                    raise StoreClosed() from None
                raise _connection_failure(f"PostgreSQL did not answer within {self.TRANSACTION_TIME:g} s") from e
            if lost or _pg_repeatable(e):
                raise _Repeat(e) from e
            unavailable = _pg_unavailable(e, conn)
            if unavailable is None:
                raise
            raise unavailable from e
        finally:
            self._local.guard = None

    def _closing(self):
        # Whatever still waits on the server is cut; the pool is closed
        # here too (its close joins its own threads).
        self._stop.set()
        self.watchdog.close()
        if self._opened:
            # (Its threads are daemons, waiting for them is not needed.)
            self.connections.close(timeout=1.0)

    def close(self):
        self._stop.set()
        return super().close()


def _pg_repeatable(error):
    """Whether the server failed C{error}'s transaction as a whole (the connection going, SQLSTATE 08, 57P01-57P03, 40)."""
    state = getattr(error, "sqlstate", None) or ""
    return state.startswith(("08", "40")) or state in ("57P01", "57P02", "57P03")


# The reason of a PostgreSQL that refuses writes (SQLSTATE 25006): the
# engine's read-only state (L{_ThreadEngine}), not an outage.
# What the readiness probe says of a store that refuses writes.
READ_ONLY_PROBE = "read-only: writes are refused"
PG_READ_ONLY = "PostgreSQL accepts no changes (read-only: a standby, or default_transaction_read_only)"
# What the client is told then.
READ_ONLY_DETAILS = "the history database accepts no changes right now; retry shortly"

# SQLSTATEs (a class by its two first characters, or one code) that mean
# the server cannot do the work now, for a reason outside the gateway,
# whatever Python class psycopg gives them (a read-only transaction is an
# InternalError): the reason logged, whether the breaker opens (the server
# cannot be reached at all), and what the client is told (None: the usual).
_PG_UNAVAILABLE = {
    "08": ("the connection to PostgreSQL failed", True, None),
    "25006": (PG_READ_ONLY, False, READ_ONLY_DETAILS),
    "40": ("PostgreSQL failed the transaction twice (serialization or deadlock)", False, None),
    "53": ("PostgreSQL is out of resources (disk, memory or connections)", False, None),
    "57P": ("PostgreSQL is shutting down or restarting", True, None),
    "57": ("PostgreSQL stopped the work (operator intervention)", False, None),
    "58": ("PostgreSQL hit a system error (I/O)", False, None),
}


def _pg_unavailable(error, conn, again=False):
    """The L{StorageUnavailable} a psycopg error means, by its SQLSTATE, or C{None} for an error in the SQL (a bug)."""
    import psycopg

    lost = conn is not None and (conn.broken or conn.closed)
    state = getattr(error, "sqlstate", None) or ""
    entry = None
    # (57014 is a statement stopped by a time limit: the caller's to handle.)
    if state and state != "57014":
        entry = _PG_UNAVAILABLE.get(state) or _PG_UNAVAILABLE.get(state[:3]) or _PG_UNAVAILABLE.get(state[:2])
    if entry is None:
        if not (lost or again or (isinstance(error, psycopg.OperationalError) and state != "57014")):
            return None
        entry = ("the connection to PostgreSQL failed", True, None)
    reason, breaks, details = entry
    if again and reason.startswith("the connection"):
        reason += " twice"
    error = StorageUnavailable(reason) if details is None else StorageUnavailable(reason, details)
    if breaks:
        error.breaks = True
    if reason == PG_READ_ONLY:
        error.read_only = True
    return error


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
