"""
Personal API keys and what their owners may do, in the history database
(migration 4 of L{clawdbot.storage.store}).

A key's row holds its HMAC (never the key), a short prefix to recognise it,
its owner (an owner key, L{clawdbot.auth.identity.owner_key}), name, scopes,
optional team, times, and C{revoked_at} once revoked (rows stay, so an
operator can see what a key was).  C{owner_grants} holds, per owner, the
scopes and teams of the owner's most recent sign-in or token, or C{ended}
once the identity provider ended their sign-in: a key never has more than
its owner has now (L{clawdbot.auth.keys}).

Changes that other instances must see at once (a revocation, a changed
grant) are announced on the database's notification channel
L{CHANNEL} (PostgreSQL's C{NOTIFY}; nothing with SQLite, one instance).
"""

import dataclasses
import json

from clawdbot.auth.identity import Grant, KeyRecord, owner_digest

CHANNEL = "clawdbot_keys"

_COLUMNS = "id, hash, prefix, owner, name, scopes, team, created_at, expires_at, last_used_at, revoked_at"


def _record(row):
    values = list(row)
    values[5] = tuple(s for s in values[5].split(" ") if s)
    return KeyRecord(*values)


class KeyStore:
    """The keys' and grants' SQL, on the history store's engine."""

    def __init__(self, engine):
        self.engine = engine
        self.p = engine.placeholder

    def _sql(self, text):
        return text.replace("?", self.p)

    def listen(self, on_notify, on_connect):
        """Hear other instances' announcements (L{clawdbot.storage.store._ThreadEngine.listen})."""
        self.engine.listen(CHANNEL, on_notify, on_connect)

    async def create(self, record, max_per_user, now):
        """
        Store C{record}, unless its owner already holds C{max_per_user} live
        keys (then C{False}); concurrent creates for one owner count one
        after another.
        """

        def create(cur):
            self.engine.lock_owner(cur, record.owner)
            cur.execute(
                self._sql("SELECT COUNT(*) FROM api_keys WHERE owner = ? AND revoked_at IS NULL AND expires_at > ?"),
                (record.owner, now),
            )
            if cur.fetchone()[0] >= max_per_user:
                return False
            cur.execute(
                self._sql(f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (
                    record.id,
                    record.hash,
                    record.prefix,
                    record.owner,
                    record.name,
                    " ".join(record.scopes),
                    record.team,
                    record.created_at,
                    record.expires_at,
                    None,
                    None,
                ),
            )
            return True

        return await self.engine.run(create)

    async def by_hash(self, digest):
        """The key whose HMAC is C{digest} (revoked or expired too), or C{None}."""

        def get(cur):
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM api_keys WHERE hash = ?"), (digest,))
            row = cur.fetchone()
            return None if row is None else _record(row)

        return await self.engine.run(get)

    async def get(self, key_id):
        def get(cur):
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?"), (key_id,))
            row = cur.fetchone()
            return None if row is None else _record(row)

        return await self.engine.run(get)

    async def list(self, owner=None, limit=1000, live_at=None, sub=None):
        """
        Keys newest first: C{owner}'s, or everyone's (C{None}); with
        C{live_at}, only those neither revoked nor expired then; with
        C{sub}, only those of that C{sub} (of any identity provider).
        """
        clauses, params = [], []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if sub is not None:
            clauses.append("owner LIKE ? ESCAPE '!'")
            params.append("%|" + sub.replace("!", "!!").replace("%", "!%").replace("_", "!_"))
        if live_at is not None:
            clauses.append("revoked_at IS NULL AND expires_at > ?")
            params.append(live_at)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = self._sql(f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY created_at DESC, id DESC LIMIT ?")

        def select(cur):
            cur.execute(sql, (*params, limit))
            return [_record(row) for row in cur.fetchall()]

        return await self.engine.run(select)

    async def revoke(self, key_id, now, owner=None):
        """
        Revoke C{key_id} (only if C{owner} owns it, when given) and announce
        it.  @return: the key as it was, or C{None} when there is no such key
        (of that owner).
        """

        def revoke(cur):
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?"), (key_id,))
            row = cur.fetchone()
            if row is None:
                return None
            record = _record(row)
            if owner is not None and record.owner != owner:
                return None
            if record.revoked_at is None:
                # Only a key still live: of two revocations at once, one revokes.
                cur.execute(self._sql("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"), (now, key_id))
                if cur.rowcount == 0:
                    record = dataclasses.replace(record, revoked_at=now)
            self.engine.notify(cur, CHANNEL, "key:" + record.hash)
            return record

        return await self.engine.run(revoke)

    async def touch(self, used):
        """Record last-used times, C{{key_id: when}}, in one transaction (batched by the caller)."""
        rows = sorted(used.items())

        def touch(cur):
            for key_id, when in rows:
                cur.execute(
                    self._sql("UPDATE api_keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)"),
                    (when, key_id, when),
                )

        if rows:
            await self.engine.run(touch)

    async def grants(self, limit, sub=None):
        """The owners' current L{Grant}s, the one seen last first (of one C{sub}, of any identity provider, when given)."""
        where, params = "", []
        if sub is not None:
            where = "WHERE owner LIKE ? ESCAPE '!'"
            params.append("%|" + sub.replace("!", "!!").replace("%", "!%").replace("_", "!_"))

        def read(cur):
            cur.execute(self._sql(f"SELECT owner, scopes, teams, name, email, ended, updated_at, seen_at FROM owner_grants {where} ORDER BY seen_at DESC, owner LIMIT ?"), (*params, limit))
            return [
                Grant(owner, frozenset(s for s in scopes.split(" ") if s), tuple(json.loads(teams)), name, email, bool(ended), updated, seen)
                for owner, scopes, teams, name, email, ended, updated, seen in cur.fetchall()
            ]

        rows = await self.engine.run(read)
        return [g for g in rows if sub is None or g.owner.endswith("|" + sub)]

    async def grant(self, owner):
        """C{owner}'s current L{Grant}, or C{None} when none was recorded."""

        def get(cur):
            cur.execute(self._sql("SELECT owner, scopes, teams, name, email, ended, updated_at, seen_at FROM owner_grants WHERE owner = ?"), (owner,))
            row = cur.fetchone()
            if row is None:
                return None
            owner_, scopes, teams, name, email, ended, updated, seen = row
            return Grant(owner_, frozenset(s for s in scopes.split(" ") if s), tuple(json.loads(teams)), name, email, bool(ended), updated, seen)

        return await self.engine.run(get)

    async def put_grants(self, grants):
        """Record each of C{grants} as its owner's current one (unless one seen later is stored), and announce the changes, in one transaction."""
        rows = sorted(grants, key=lambda g: g.owner)
        sql = self._sql(
            "INSERT INTO owner_grants (owner, scopes, teams, name, email, ended, updated_at, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET scopes = excluded.scopes, teams = excluded.teams, name = excluded.name, "
            "email = excluded.email, ended = excluded.ended, updated_at = excluded.updated_at "
            # A grant seen before the stored one (a batch written late, on
            # another instance) does not replace it: an ended sign-in stays ended.
            "WHERE owner_grants.updated_at <= excluded.updated_at"
        )

        # When the owner was last seen moves on whatever the evidence says.
        seen = self._sql("UPDATE owner_grants SET seen_at = ? WHERE owner = ? AND seen_at < ?")

        def put(cur):
            for grant in rows:
                cur.execute(
                    sql,
                    (grant.owner, " ".join(sorted(grant.scopes)), json.dumps(list(grant.teams)), grant.name, grant.email, grant.ended, grant.updated_at, grant.seen_at),
                )
                cur.execute(seen, (grant.seen_at, grant.owner, grant.seen_at))
                self.engine.notify(cur, CHANNEL, "owner:" + owner_digest(grant.owner))

        if rows:
            await self.engine.run(put)
