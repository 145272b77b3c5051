"""
Usage per hour in the history database (migration 4 of
L{clawdbot.storage.store}): one row per hour, user (identity provider and
C{sub}), team, API key, and model, with requests, prompt and completion
tokens, failed calls and time spent.  L{UsageBook} gathers the calls in
memory and adds them to the rows in batches, never once per request.  C{team} and C{key_id}
hold C{""} for none (a primary key column cannot be NULL).

A batch is added at most once: it carries an id recorded in the same
transaction (L{clawdbot.storage.store.applied_batch}), and a batch whose
write failed is retried as it was, with its id, so a write that was kept
although it seemed to fail (the connection lost during its COMMIT) is not
counted again.
"""

import time
from dataclasses import dataclass

from twisted.logger import Logger

from clawdbot.auth.identity import issuer_id
from clawdbot.storage.store import applied_batch, new_batch_id
from clawdbot.units import hour_of

log = Logger(namespace="clawdbot.usage")

_MAX_PENDING = 200_000


@dataclass
class Counts:
    """What a group of calls used."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    duration: float = 0.0

    def add(self, other):
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors
        self.duration += other.duration

    @property
    def tokens(self):
        return self.prompt_tokens + self.completion_tokens


class UsageStore:
    """The usage table's SQL, on the history store's engine."""

    def __init__(self, engine):
        self.engine = engine
        self.p = engine.placeholder

    def _sql(self, text):
        return text.replace("?", self.p)

    async def add(self, rows, batch=None):
        """
        Add C{{(hour, issuer, sub, team, key_id, model): Counts}} to the
        table, in one transaction; with a C{batch} id, nothing when that
        batch was added before (L{clawdbot.storage.store.applied_batch}).
        """
        items = sorted(rows.items(), key=lambda item: item[0])
        sql = self._sql(
            "INSERT INTO usage_hourly (hour, issuer, sub, team, key_id, model, requests, prompt_tokens, completion_tokens, errors, duration) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, issuer, sub, team, key_id, model) DO UPDATE SET "
            "requests = usage_hourly.requests + excluded.requests, "
            "prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, "
            "errors = usage_hourly.errors + excluded.errors, "
            "duration = usage_hourly.duration + excluded.duration"
        )

        now = time.time()

        def add(cur):
            if batch is not None and applied_batch(cur, self.p, batch, now):
                return
            for (hour, issuer, sub, team, key_id, model), c in items:
                cur.execute(sql, (hour, issuer, sub, team, key_id, model, c.requests, c.prompt_tokens, c.completion_tokens, c.errors, c.duration))

        if items:
            await self.engine.run(add)

    async def totals(self, subjects, starts):
        """
        What each subject used since each start: C{subjects} are
        C{("user", issuer, sub)}, C{("team", team)} or C{("key", key_id)};
        C{starts} a list of POSIX seconds (window starts, whole hours or not:
        an hour counts when it begins at or after the start).

        @return: C{{subject: [(requests, tokens) per start]}}.
        """
        starts = list(starts)
        first = min(starts)
        sums = ", ".join(
            f"COALESCE(SUM(CASE WHEN hour >= {self.p} THEN requests ELSE 0 END), 0), "
            f"COALESCE(SUM(CASE WHEN hour >= {self.p} THEN prompt_tokens + completion_tokens ELSE 0 END), 0)"
            for _ in starts
        )
        hour_starts = [_hour_ceiling(s) for s in starts]
        params_per = [v for s in hour_starts for v in (s, s)]

        def read(cur):
            out = {}
            for subject in subjects:
                kind = subject[0]
                if kind == "user":
                    where, args = "sub = ? AND issuer = ?", [subject[2], subject[1]]
                elif kind == "team":
                    where, args = "team = ?", [subject[1]]
                else:
                    where, args = "key_id = ?", [subject[1]]
                cur.execute(self._sql(f"SELECT {sums} FROM usage_hourly WHERE {where} AND hour >= ?"), params_per + args + [hour_of(first)])
                row = cur.fetchone()
                out[subject] = [(int(row[2 * i]), int(row[2 * i + 1])) for i in range(len(starts))]
            return out

        return await self.engine.run(read)

    async def by_day(self, days, issuer=None, sub=None, team=None):
        """
        Usage per day, user, team and model: C{days} is C{[(date, start,
        end)]} (POSIX seconds; an hour belongs to the day it begins in),
        narrowed to one user (C{issuer} and C{sub}; C{sub} alone: that
        C{sub} of every provider) and one team when given.

        @return: rows C{(date, issuer, sub, team, model, Counts)}, by date then user.
        """
        if not days:
            return []
        values = ", ".join(f"({self.p}, CAST({self.p} AS BIGINT), CAST({self.p} AS BIGINT))" for _ in days)
        params = [v for date, start, end in days for v in (date, _hour_ceiling(start), _hour_ceiling(end))]
        clauses = ["u.hour >= d.s", "u.hour < d.e"]
        if sub is not None:
            clauses.append(f"u.sub = {self.p}")
            params.append(sub)
        if issuer is not None:
            clauses.append(f"u.issuer = {self.p}")
            params.append(issuer)
        if team is not None:
            clauses.append(f"u.team = {self.p}")
            params.append(team)
        sql = (
            f"WITH d (day, s, e) AS (VALUES {values}) "
            "SELECT d.day, u.issuer, u.sub, u.team, u.model, SUM(u.requests), SUM(u.prompt_tokens), SUM(u.completion_tokens), SUM(u.errors), SUM(u.duration) "
            "FROM usage_hourly u JOIN d ON " + " AND ".join(clauses) + " GROUP BY d.day, u.issuer, u.sub, u.team, u.model "
            "ORDER BY d.day, u.sub, u.issuer, u.team, u.model"
        )

        def read(cur):
            cur.execute(sql, params)
            return [
                (day, iss, s, t, model, Counts(int(r), int(p), int(c), int(e), float(dur)))
                for day, iss, s, t, model, r, p, c, e, dur in cur.fetchall()
            ]

        return await self.engine.run(read)

    async def prune(self, before):
        """Delete the hours that began before C{before}."""

        def prune(cur):
            cur.execute(self._sql("DELETE FROM usage_hourly WHERE hour < ?"), (hour_of(before),))

        await self.engine.run(prune)


def _hour_ceiling(t):
    return -int(-t // 3600) * 3600


class UsageBook:
    """
    What the calls used, gathered per hour and written in batches.

    @param store: a L{clawdbot.storage.usage.UsageStore}.
    @param clock: POSIX time.
    """

    def __init__(self, store, clock):
        self.store = store
        self.clock = clock
        self.pending = {}
        # A batch whose write failed, (id, rows): retried as it is, first.
        self.unsent = None
        self.listeners = []
        # What is not written when the store closes is dropped: said once.
        engine = getattr(store, "engine", None)
        if engine is not None and hasattr(engine, "before_close"):
            engine.before_close.append(self._closing)
        # The first prune comes an hour after start: a gateway that starts
        # (or fails to) touches no database until a call is counted.
        self._pruned = clock.seconds()

    def record(self, principal, model, usage, failed, duration):
        """Count one call of C{principal} to C{model} (C{usage}: Ollama's counts or an estimate, or C{None})."""
        now = self.clock.seconds()
        team = principal.team
        key = (hour_of(now), issuer_id(principal.issuer or ""), principal.sub, team or "", principal.key_id or "", model or "")
        prompt = int(usage.get("prompt_tokens") or 0) if usage else 0
        completion = int(usage.get("completion_tokens") or 0) if usage else 0
        counts = self.pending.get(key)
        if counts is None:
            if len(self.pending) >= _MAX_PENDING:
                log.warn("Usage not written for too long; dropping a call's count")
                return
            counts = self.pending[key] = Counts()
        counts.requests += 1
        counts.prompt_tokens += prompt
        counts.completion_tokens += completion
        counts.errors += 1 if failed else 0
        counts.duration += duration
        for listener in self.listeners:
            listener(principal, team, now, 1, prompt + completion)

    async def flush(self, retention=None):
        """
        Write what was gathered since the last flush, as a batch of its own;
        on failure that batch is kept, as it is, and written first by the
        next flush (with its id: never twice).  Hours older than
        C{retention} seconds are deleted, once an hour.
        """
        if self.unsent is not None:
            batch, rows = self.unsent
            await self.store.add(rows, batch)
            self.unsent = None
        rows, self.pending = self.pending, {}
        if rows:
            batch = new_batch_id("usage")
            try:
                await self.store.add(rows, batch)
            except Exception:
                self.unsent = (batch, rows)
                raise
        now = self.clock.seconds()
        if retention and rows and now - self._pruned >= 3600:
            self._pruned = now
            await self.store.prune(now - retention)


    def calls_unwritten(self):
        """How many calls are counted here and not in the database yet."""
        batches = [self.pending] + ([self.unsent[1]] if self.unsent is not None else [])
        return sum(counts.requests for rows in batches for counts in rows.values())

    def _closing(self):
        """The store closes (the gateway stops): what is still here is lost; one warning says how much."""
        count = self.calls_unwritten()
        if count:
            log.warn("Usage of {count} call(s) was not written before the stop (history storage unavailable); dropped", count=count)
