"""
The Responses API's stored responses, in the history database (migration
5 of L{clawdbot.storage.store}).

A row holds the C{response} object as it was answered and its turn of the
conversation (the call's new input and the reply, as chat messages), with
the response it continued (C{parent}) and its place in that chain
(C{depth}), so a request naming it in C{previous_response_id} gets the
whole conversation back by walking the parents, and each turn is stored
once.  C{chain_bytes} is the conversation's size up to this turn,
C{bytes} what the row takes.  Rows belong to one owner (an owner key) and
are found only by them; they expire after C{responses.retention}.
"""

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredResponse:
    """A row of C{responses}: C{response} and C{turn} are JSON text, C{bytes} what the row takes."""

    id: str
    owner: str
    parent: str | None
    depth: int
    bytes: int
    chain_bytes: int
    response: str
    turn: str


class BrokenChain(Exception):
    """An earlier response of the conversation was deleted or has expired."""


class ResponseStore:
    """Stored responses' SQL, on the history store's engine."""

    def __init__(self, engine, clock):
        self.engine = engine
        self.clock = clock
        self.p = engine.placeholder
        self._pruned = 0.0
        # Bytes the calls under way will store, per owner (this process's).
        self._pending = {}

    def _sql(self, text):
        return text.replace("?", self.p)

    async def put(self, record, retention):
        """
        Store a L{StoredResponse}, and drop expired rows (once an hour).
        """
        now = self.clock.seconds()
        prune = now - self._pruned >= 3600
        if prune:
            self._pruned = now

        def put(cur):
            cur.execute(
                self._sql(
                    "INSERT INTO responses (id, owner, parent, depth, created_at, expires_at, bytes, chain_bytes, response, turn) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (record.id, record.owner, record.parent, record.depth, now, now + retention, record.bytes, record.chain_bytes, record.response, record.turn),
            )
            if record.parent is not None:
                # A conversation lives as long as its newest response.
                cur.execute(
                    self._sql(
                        "UPDATE responses SET expires_at = ? WHERE owner = ? AND id IN ("
                        "WITH RECURSIVE chain (id, parent) AS ("
                        " SELECT id, parent FROM responses WHERE id = ?"
                        " UNION ALL SELECT r.id, r.parent FROM responses r JOIN chain c ON r.id = c.parent"
                        ") SELECT id FROM chain)"
                    ),
                    (now + retention, record.owner, record.parent),
                )
            if prune:
                cur.execute(self._sql("DELETE FROM responses WHERE expires_at <= ?"), (now,))

        await self.engine.run(put)

    async def reserve(self, owner, size, limit):
        """
        Hold C{size} bytes of C{owner}'s C{limit} for a call under way, so
        that concurrent calls cannot all pass on one remainder: a release
        function, or C{None} (and the bytes in use) when it does not fit.
        """
        used = await self.used(owner)
        # No wait between this check and the hold: one reactor turn.
        held = self._pending.get(owner, 0)
        if used + held + size > limit:
            return None, used + held

        def release():
            left = self._pending.get(owner, 0) - size
            if left > 0:
                self._pending[owner] = left
            else:
                self._pending.pop(owner, None)

        self._pending[owner] = held + size
        return release, used + held

    async def get(self, rid, owner):
        """The stored C{response} (a dict) of C{owner}, or C{None} (another owner's, expired, or none)."""
        return await self._read(rid, owner, "response")

    async def turn(self, rid, owner):
        """The turn (chat messages) C{owner}'s response C{rid} stored, or C{None}."""
        return await self._read(rid, owner, "turn")

    async def _read(self, rid, owner, column):
        now = self.clock.seconds()

        def read(cur):
            cur.execute(self._sql(f"SELECT {column} FROM responses WHERE id = ? AND owner = ? AND expires_at > ?"), (rid, owner, now))
            return cur.fetchone()

        row = await self.engine.run(read)
        return None if row is None else json.loads(row[0])

    async def chain(self, rid, owner):
        """
        The conversation C{owner}'s response C{rid} ends: C{(depth,
        chain_bytes, messages)}, the turns in order; C{None} when there is no
        such response of theirs.

        @raise BrokenChain: when an earlier response is gone.
        """
        now = self.clock.seconds()
        sql = self._sql(
            "WITH RECURSIVE chain (id, parent, depth, chain_bytes, turn) AS ("
            " SELECT id, parent, depth, chain_bytes, turn FROM responses WHERE id = ? AND owner = ? AND expires_at > ?"
            " UNION ALL"
            " SELECT r.id, r.parent, r.depth, r.chain_bytes, r.turn FROM responses r JOIN chain c ON r.id = c.parent"
            " WHERE r.owner = ? AND r.expires_at > ? AND r.depth = c.depth - 1"
            ") SELECT depth, chain_bytes, turn FROM chain"
        )

        def read(cur):
            cur.execute(sql, (rid, owner, now, owner, now))
            return cur.fetchall()

        rows = await self.engine.run(read)
        if not rows:
            return None
        rows.sort(key=lambda row: row[0])
        depth, chain_bytes = rows[-1][0], rows[-1][1]
        if len(rows) != depth + 1:
            raise BrokenChain()
        messages = []
        for row in rows:
            messages.extend(json.loads(row[2]))
        return depth, chain_bytes, messages

    async def used(self, owner):
        """The bytes C{owner}'s live stored responses take."""
        now = self.clock.seconds()

        def read(cur):
            cur.execute(self._sql("SELECT COALESCE(SUM(bytes), 0) FROM responses WHERE owner = ? AND expires_at > ?"), (owner, now))
            return int(cur.fetchone()[0])

        return await self.engine.run(read)

    async def delete(self, rid, owner):
        """Delete C{owner}'s response C{rid}; whether there was one."""
        now = self.clock.seconds()

        def delete(cur):
            cur.execute(self._sql("DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at > ?"), (rid, owner, now))
            return cur.rowcount > 0

        return await self.engine.run(delete)
