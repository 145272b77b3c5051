"""
The Responses API's stored responses, in the history database (migration
5 of L{clawdbot.storage.store}).

A row holds the C{response} object as it was answered and the
conversation it ends (chat messages: the chain's earlier context, the
input and the reply), so a request naming it in C{previous_response_id}
continues from there.  Rows belong to one owner (an owner key) and are
found only by them; they expire after C{responses.retention}.
"""

import json


class ResponseStore:
    """Stored responses' SQL, on the history store's engine."""

    def __init__(self, engine, clock):
        self.engine = engine
        self.clock = clock
        self.p = engine.placeholder
        self._pruned = 0.0

    def _sql(self, text):
        return text.replace("?", self.p)

    async def put(self, rid, owner, response, context, retention):
        """Store C{response} and its C{context} (JSON text) for C{owner}, and drop expired rows once an hour."""
        now = self.clock.seconds()
        prune = now - self._pruned >= 3600
        if prune:
            self._pruned = now

        def put(cur):
            cur.execute(
                self._sql("INSERT INTO responses (id, owner, created_at, expires_at, response, context) VALUES (?, ?, ?, ?, ?, ?)"),
                (rid, owner, now, now + retention, response, context),
            )
            if prune:
                cur.execute(self._sql("DELETE FROM responses WHERE expires_at <= ?"), (now,))

        await self.engine.run(put)

    async def get(self, rid, owner, with_context=False):
        """
        The stored C{response} (a dict) of C{owner}, and its context (a list)
        when asked; C{None} when there is none (another owner's or expired).
        """
        now = self.clock.seconds()
        column = "response, context" if with_context else "response"

        def get(cur):
            cur.execute(self._sql(f"SELECT {column} FROM responses WHERE id = ? AND owner = ? AND expires_at > ?"), (rid, owner, now))
            return cur.fetchone()

        row = await self.engine.run(get)
        if row is None:
            return None
        response = json.loads(row[0])
        return (response, json.loads(row[1])) if with_context else response

    async def delete(self, rid, owner):
        """Delete C{owner}'s response C{rid}; whether there was one."""

        def delete(cur):
            cur.execute(self._sql("DELETE FROM responses WHERE id = ? AND owner = ?"), (rid, owner))
            return cur.rowcount > 0

        return await self.engine.run(delete)
