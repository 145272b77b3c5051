"""
The audit trail in the history database (migration 6 of
L{clawdbot.storage.store}): each event's line as written to the audit log,
newest first for C{GET /v1/admin/audit}, pruned after
C{audit_log.retention}.
"""

import json
import time

from clawdbot.storage.store import applied_batch


class AuditStore:
    """The audit table's SQL, on the history store's engine."""

    def __init__(self, engine):
        self.engine = engine
        self.p = engine.placeholder

    def _sql(self, text):
        return text.replace("?", self.p)

    async def add_many(self, rows, prune_before=None, batch=None):
        """
        Keep C{[(at, event, entry)]} in their order, in one transaction; drop
        those before C{prune_before} too.  With a C{batch} id, nothing when
        that batch was kept before (L{clawdbot.storage.store.applied_batch}).
        """
        rows = list(rows)
        now = time.time()

        def add(cur):
            if batch is not None and applied_batch(cur, self.p, batch, now):
                return
            for at, event, entry in rows:
                cur.execute(self._sql("INSERT INTO audit_events (at, event, entry) VALUES (?, ?, ?)"), (at, event, entry))
            if prune_before is not None:
                cur.execute(self._sql("DELETE FROM audit_events WHERE at < ?"), (prune_before,))

        await self.engine.run(add)

    async def recent(self, limit, event=None, before=None):
        """
        The newest C{limit} events (of one C{event} name when given; older
        than the event id C{before} when given): C{(id, entry)} pairs, the
        entries parsed.
        """
        where, args = [], []
        if event is not None:
            where.append("event = ?")
            args.append(event)
        if before is not None:
            where.append("id < ?")
            args.append(before)
        clause = (" WHERE " + " AND ".join(where)) if where else ""

        def read(cur):
            cur.execute(self._sql(f"SELECT id, entry FROM audit_events{clause} ORDER BY id DESC LIMIT ?"), (*args, limit))
            return cur.fetchall()

        return [(int(rid), json.loads(entry)) for rid, entry in await self.engine.run(read)]
