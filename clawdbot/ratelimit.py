"""
Per-principal request and token budgets, and per-address limits on the
sign-in endpoints.

Token buckets with an injected clock: a bucket of C{limit} that refills
C{limit} per minute.  A request takes one from the request bucket; a reply's
tokens (Ollama's C{prompt_eval_count + eval_count}) are taken from the token
bucket afterwards, which may go below zero and then refuses until it has
refilled.  The rule in force is read from the config of each request, so a
reload changes limits at once while the buckets keep their state.
"""

import math
from dataclasses import dataclass

WINDOW = 60.0


@dataclass(frozen=True)
class Rule:
    requests_per_minute: int
    tokens_per_minute: int


@dataclass(frozen=True)
class Decision:
    """
    @ivar allowed: whether the request may go on.
    @ivar limit: the budget per minute that applied (0: none).
    @ivar remaining: what is left after this request.
    @ivar reset: seconds until the bucket is full again.
    @ivar retry_after: seconds until a refused request would pass.
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float = 0.0
    kind: str = "requests"

    def headers(self):
        if not self.limit:
            return {}
        out = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(0, self.remaining)),
            "x-ratelimit-reset": str(math.ceil(self.reset)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


UNLIMITED = Decision(True, 0, 0, 0.0)


def rule_for(principal, config):
    """
    The budgets for C{principal}: a C{per_scope} or C{per_team} rule that
    matches replaces the top-level budget (a key it leaves unset keeps the
    top-level value); when several match, the most generous wins (0 means
    unlimited, the most generous of all).
    """
    limits = config.rate_limit
    matched = [limits.per_scope[s] for s in sorted(principal.scopes) if s in limits.per_scope]
    matched += [limits.per_team[t] for t in principal.teams if t in limits.per_team]
    if not matched:
        return Rule(limits.requests_per_minute, limits.tokens_per_minute)

    def most(values):
        return 0 if 0 in values else max(values)

    requests = most([limits.requests_per_minute if r.requests_per_minute is None else r.requests_per_minute for r in matched])
    tokens = most([limits.tokens_per_minute if r.tokens_per_minute is None else r.tokens_per_minute for r in matched])
    return Rule(requests, tokens)


class Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level, stamp):
        self.level = level
        self.stamp = stamp

    def refill(self, limit, now):
        rate = limit / WINDOW
        self.level = min(float(limit), self.level + (now - self.stamp) * rate)
        self.stamp = now


class MemoryLimiter:
    """Buckets in this process (the single-box default)."""

    def __init__(self, clock, max_keys=100_000):
        self.clock = clock
        self.max_keys = max_keys
        self._buckets = {}

    def _bucket(self, key, limit, now):
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._sweep(now)
            bucket = self._buckets[key] = Bucket(float(limit), now)
        else:
            bucket.refill(limit, now)
        return bucket

    def _sweep(self, now):
        """Forget full buckets (they carry no state) to bound memory."""
        for key in [k for k, b in self._buckets.items() if now - b.stamp > WINDOW]:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()

    async def take(self, key, limit, cost=1.0, kind="requests"):
        """Take C{cost} from C{key}'s bucket if it has it."""
        if not limit:
            return UNLIMITED
        now = self.clock.seconds()
        bucket = self._bucket((kind, key), limit, now)
        rate = limit / WINDOW
        if bucket.level >= cost:
            bucket.level -= cost
            return Decision(True, limit, int(bucket.level), (limit - bucket.level) / rate, kind=kind)
        return Decision(False, limit, int(max(0, bucket.level)), (limit - bucket.level) / rate, (cost - bucket.level) / rate, kind=kind)

    async def peek(self, key, limit, kind):
        """Refuse when the bucket is empty (or in debt), without taking anything."""
        if not limit:
            return UNLIMITED
        now = self.clock.seconds()
        bucket = self._bucket((kind, key), limit, now)
        rate = limit / WINDOW
        if bucket.level > 0:
            return Decision(True, limit, int(bucket.level), (limit - bucket.level) / rate, kind=kind)
        return Decision(False, limit, 0, (limit - bucket.level) / rate, (1 - bucket.level) / rate, kind=kind)

    async def spend(self, key, limit, cost, kind):
        """Take C{cost} whatever the level (token budgets are known only afterwards)."""
        if not limit or cost <= 0:
            return
        now = self.clock.seconds()
        bucket = self._bucket((kind, key), limit, now)
        bucket.level -= cost
