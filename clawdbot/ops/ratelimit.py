"""
Per-principal request and token budgets, and per-address limits on the
sign-in endpoints.

Token buckets with an injected clock: a bucket of C{limit} that refills
C{limit} per minute.  A request takes one from the request bucket; a reply's
tokens (Ollama's C{prompt_eval_count + eval_count}) are taken from the token
bucket afterwards, which may go below zero and then refuses until it has
refilled.  The rule in force is read from the config of each request, so a
reload changes limits at once while the buckets keep their state.

L{MemoryLimiter} keeps the buckets in this process (one gateway);
L{RedisLimiter} keeps them in Redis, updated by one atomic script, so the
budgets hold across every gateway that shares it.
"""

import hashlib
import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from clawdbot.errors import APIError

if TYPE_CHECKING:
    from clawdbot.config import Config


class Clock(Protocol):
    """What the limiters read the time from (a reactor, or a test's clock)."""

    def seconds(self) -> float: ...


log = Logger(namespace="clawdbot.ratelimit")

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

    def headers(self, generic: bool = True) -> dict[str, str]:
        """
        The answer's rate-limit headers: C{x-ratelimit-limit}, C{-remaining}
        and C{-reset} (seconds), and OpenAI's names for the same
        (C{x-ratelimit-limit-requests}, C{-remaining-requests},
        C{-reset-requests} as C{"12s"}, or C{-tokens} for a token budget),
        which OpenAI clients read.

        @param generic: include the unsuffixed names (only one budget, the
            request budget, may own them).
        """
        if not self.limit:
            return {}
        out: dict[str, str] = {}
        remaining = str(max(0, self.remaining))
        reset = math.ceil(self.reset)
        if generic:
            out.update({"x-ratelimit-limit": str(self.limit), "x-ratelimit-remaining": remaining, "x-ratelimit-reset": str(reset)})
        if self.kind in ("requests", "tokens"):
            out.update(
                {
                    f"x-ratelimit-limit-{self.kind}": str(self.limit),
                    f"x-ratelimit-remaining-{self.kind}": remaining,
                    f"x-ratelimit-reset-{self.kind}": f"{reset}s",
                }
            )
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


UNLIMITED = Decision(True, 0, 0, 0.0)


def rule_for(principal: Any, config: "Config") -> Rule:
    """
    The budgets for C{principal}: a C{per_scope} or C{per_team} rule that
    matches replaces the top-level budget (a key it leaves unset keeps the
    top-level value); when several match, the most generous wins (0 means
    unlimited, the most generous of all).
    """
    limits = config.rate_limit
    matched = [limits.per_scope[s] for s in sorted(principal.rule_scopes) if s in limits.per_scope]
    matched += [limits.per_team[t] for t in principal.teams if t in limits.per_team]
    if not matched:
        return Rule(limits.requests_per_minute, limits.tokens_per_minute)

    def most(values: list[int]) -> int:
        return 0 if 0 in values else max(values)

    requests = most([limits.requests_per_minute if r.requests_per_minute is None else r.requests_per_minute for r in matched])
    tokens = most([limits.tokens_per_minute if r.tokens_per_minute is None else r.tokens_per_minute for r in matched])
    return Rule(requests, tokens)


def take_decision(limit: int, level: float, allowed: bool, cost: float, kind: str) -> Decision:
    """The answer to a take of C{cost} that left C{level} in the bucket."""
    rate = limit / WINDOW
    if allowed:
        return Decision(True, limit, int(level), (limit - level) / rate, kind=kind)
    return Decision(False, limit, int(max(0, level)), (limit - level) / rate, (cost - level) / rate, kind=kind)


def peek_decision(limit: int, level: float, kind: str) -> Decision:
    """The answer to a peek at a bucket holding C{level}: refused when empty or in debt."""
    rate = limit / WINDOW
    if level > 0:
        return Decision(True, limit, int(level), (limit - level) / rate, kind=kind)
    return Decision(False, limit, 0, (limit - level) / rate, (1 - level) / rate, kind=kind)


class Bucket:
    __slots__ = ("level", "stamp", "full_at", "seq")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp
        self.full_at: float | None = None  # when it is full again, as of its last change (BucketStore)
        self.seq = 0

    def refill(self, limit: int, now: float) -> None:
        # As BUCKET_SCRIPT: a clock that steps back refills nothing.
        rate = limit / WINDOW
        self.level = min(float(limit), self.level + max(0.0, now - self.stamp) * rate)
        self.stamp = max(now, self.stamp)


class BucketStore:
    """
    At most C{cap} buckets, for one kind of key (principals, or addresses).

    When a new key arrives and the store is full, one bucket goes.
    Forgetting a bucket that has refilled loses nothing (a new bucket starts
    full); forgetting any other forgives what it still owes.  So the store
    drops the bucket that is full again soonest: one that has already
    refilled if there is any (the one that refilled longest ago, so the
    least recently used of those), else the one closest to refilled, which
    forgives the least.  A bucket in debt, or spent by a flood, is forgotten
    only once every bucket in the store is still refilling, and then after
    every bucket that would refill sooner.  (Plain LRU would drop an idle
    user's empty bucket first, which is just what a flood of new keys
    wants.)

    The order is a heap of C{(full_at, seq, key)}; an entry whose C{seq} is
    no longer its bucket's is stale and skipped, and the heap is rebuilt
    when stale entries outnumber live ones, so each operation costs
    O(log n) amortised.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self.buckets: dict[Hashable, Bucket] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self.buckets)

    def __contains__(self, key: object) -> bool:
        return key in self.buckets

    def bucket(self, key: Hashable, limit: int, now: float) -> Bucket:
        """C{key}'s bucket, refilled to C{now}; a new, full one if there is none."""
        bucket = self.buckets.get(key)
        if bucket is None:
            while len(self.buckets) >= self.cap:
                self._evict()
            bucket = self.buckets[key] = Bucket(float(limit), now)
        else:
            bucket.refill(limit, now)
        return bucket

    def changed(self, key: Hashable, bucket: Bucket, limit: int) -> None:
        """Note when C{bucket} is full again, after a take or spend changed it."""
        full_at = bucket.stamp + max(0.0, limit - bucket.level) * WINDOW / limit
        if full_at == bucket.full_at:
            return
        self._seq += 1
        bucket.full_at, bucket.seq = full_at, self._seq
        heapq.heappush(self._heap, (full_at, self._seq, key))
        if len(self._heap) > 2 * len(self.buckets) + 64:
            self._heap = [(b.full_at, b.seq, k) for k, b in self.buckets.items() if b.full_at is not None]
            heapq.heapify(self._heap)

    def _evict(self) -> None:
        while self._heap:
            _, seq, key = heapq.heappop(self._heap)
            bucket = self.buckets.get(key)
            if bucket is not None and bucket.seq == seq:
                del self.buckets[key]
                return
        # Only buckets never changed (none in the heap): the oldest goes.
        del self.buckets[next(iter(self.buckets))]


class MemoryLimiter:
    """
    Buckets in this process (the single-box default).

    Per-address buckets (a C{kind} ending in C{-ip}, such as C{auth-ip})
    and per-principal buckets live in two L{BucketStore}s with caps of
    their own, so a flood from many addresses can evict only other
    addresses' buckets, never a user's budget.
    """

    def __init__(self, clock: Clock, max_keys: int = 100_000, max_address_keys: int = 100_000) -> None:
        self.clock = clock
        self.principals = BucketStore(max_keys)
        self.addresses = BucketStore(max_address_keys)

    def _store(self, kind: str) -> BucketStore:
        return self.addresses if kind.endswith("-ip") else self.principals

    async def take(self, key: str, limit: int, cost: float = 1.0, kind: str = "requests") -> Decision:
        """Take C{cost} from C{key}'s bucket if it has it."""
        if not limit:
            return UNLIMITED
        now = self.clock.seconds()
        store = self._store(kind)
        bucket = store.bucket((kind, key), limit, now)
        allowed = bucket.level >= cost
        if allowed:
            bucket.level -= cost
        store.changed((kind, key), bucket, limit)
        return take_decision(limit, bucket.level, allowed, cost, kind)

    async def peek(self, key: str, limit: int, kind: str) -> Decision:
        """Refuse when the bucket is empty (or in debt), without taking anything."""
        if not limit:
            return UNLIMITED
        now = self.clock.seconds()
        store = self._store(kind)
        bucket = store.bucket((kind, key), limit, now)
        store.changed((kind, key), bucket, limit)
        return peek_decision(limit, bucket.level, kind)

    async def reserve(self, key: str, limit: int, cost: float, kind: str) -> Decision:
        """
        Take C{cost} if the bucket is not empty (or in debt), in one step:
        the token budget's reservation before a call, which may leave the
        bucket in debt but refuses once it is.
        """
        if not limit:
            return UNLIMITED
        now = self.clock.seconds()
        store = self._store(kind)
        bucket = store.bucket((kind, key), limit, now)
        decision = peek_decision(limit, bucket.level, kind)
        if decision.allowed:
            bucket.level -= cost
            decision = take_decision(limit, bucket.level, True, cost, kind)
        store.changed((kind, key), bucket, limit)
        return decision

    async def spend(self, key: str, limit: int, cost: float, kind: str) -> None:
        """
        Take C{cost} whatever the level (token budgets are known only
        afterwards); a negative C{cost} gives back what a reservation took
        too much, never past a full bucket.
        """
        if not limit or not cost:
            return
        now = self.clock.seconds()
        store = self._store(kind)
        bucket = store.bucket((kind, key), limit, now)
        bucket.level = min(float(limit), bucket.level - cost)
        store.changed((kind, key), bucket, limit)

    def close(self) -> None:
        """Nothing to release."""

    async def ping(self) -> str | None:
        """For C{/readyz}: the buckets are in this process, so always C{None} (it answers)."""
        return None


# --- Redis ----------------------------------------------------------------------

# One bucket, refilled, changed and written back in one atomic step: the same
# arithmetic as Bucket.refill and MemoryLimiter, on Redis's clock (TIME) so
# that gateways with skewed clocks agree.  A clock that steps back refills
# nothing.  The key lives until the bucket would be full again (at least two
# minutes), so a bucket in debt is not forgiven early.
#   KEYS[1]  the bucket, a hash {level, stamp}
#   ARGV     op ("take" | "peek" | "reserve" | "spend"), limit, cost, now ("" = Redis TIME)
#   returns  {allowed (0 | 1), level after, as text}
BUCKET_SCRIPT = """
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[4])
end
local rate = limit / 60
local level = limit
local stamp = now
local saved = redis.call('HMGET', KEYS[1], 'level', 'stamp')
if saved[1] and saved[2] then
  local last = tonumber(saved[2])
  level = math.min(limit, tonumber(saved[1]) + math.max(0, now - last) * rate)
  stamp = math.max(now, last)
end
local allowed = 1
if ARGV[1] == 'take' then
  if level >= cost then level = level - cost else allowed = 0 end
elseif ARGV[1] == 'reserve' then
  if level > 0 then level = level - cost else allowed = 0 end
elseif ARGV[1] == 'spend' then
  level = math.min(limit, level - cost)
end
redis.call('HSET', KEYS[1], 'level', string.format('%.17g', level), 'stamp', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.max(120000, math.ceil((limit - level) / rate * 1000) + 60000))
return {allowed, string.format('%.17g', level)}
"""
SCRIPT_SHA = hashlib.sha1(BUCKET_SCRIPT.encode()).hexdigest()


class LimiterUnavailable(APIError):
    """The shared limiter cannot answer and C{on_backend_error} is C{closed}."""

    def __init__(self) -> None:
        super().__init__("GATEWAY_BUSY", details="the rate limiter is unavailable; retry shortly", headers={"Retry-After": "1"})


class RedisLimiter:
    """
    Buckets in Redis, shared by every gateway that points at it.

    Each check is one EVALSHA of L{BUCKET_SCRIPT} (EVAL when the server does
    not know the script yet), run with redis-py's blocking client on a small
    thread pool of its own, so the reactor never waits on the network.

    When Redis cannot answer (refused, timed out, any error) the check is
    decided by C{on_backend_error}: C{"open"} lets the request through,
    C{"closed"} refuses it with L{LimiterUnavailable} (503 C{GATEWAY_BUSY},
    C{Retry-After: 1}).  Each such check calls C{on_error()} (the gateway
    counts it in a metric) and the log gets one line per C{LOG_EVERY}
    seconds at most.  After a failure, Redis is left alone for
    C{RETRY_AFTER} seconds and checks are decided at once, so an outage
    costs each request at most one short timeout, and most of them none.

    @param clock: a bucket clock (C{seconds()}) for tests; by default Redis's
        own clock decides, so instances with skewed clocks agree.
    """

    RETRY_AFTER = 1.0
    LOG_EVERY = 10.0

    def __init__(
        self,
        reactor: Any,
        url: str,
        key_prefix: str = "clawdbot:rl:",
        on_backend_error: str = "open",
        on_error: Callable[[], object] | None = None,
        clock: Clock | None = None,
        threads: int = 4,
        connect_timeout: float = 0.2,
        timeout: float = 0.25,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.reactor = reactor
        self.key_prefix = key_prefix
        self.on_backend_error = on_backend_error
        self.on_error = on_error
        self.clock = clock
        # No retries inside redis-py: its default retries ten times with backoff.
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=threads,
            health_check_interval=0,
        )
        self._no_script = redis.exceptions.NoScriptError
        # How long a check may wait for a thread and Redis together.
        self.deadline = connect_timeout + timeout + 0.25
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="clawdbot-ratelimit")
        self._down_until = 0.0
        self._last_log: float | None = None
        self._unlogged = 0

    # --- the limiter interface -----------------------------------------------

    async def take(self, key: str, limit: int, cost: float = 1.0, kind: str = "requests") -> Decision:
        """Take C{cost} from C{key}'s bucket if it has it."""
        if not limit:
            return UNLIMITED
        result = await self._run("take", kind, key, limit, cost)
        if result is None:
            return UNLIMITED
        allowed, level = result
        return take_decision(limit, level, allowed, cost, kind)

    async def peek(self, key: str, limit: int, kind: str) -> Decision:
        """Refuse when the bucket is empty (or in debt), without taking anything."""
        if not limit:
            return UNLIMITED
        result = await self._run("peek", kind, key, limit, 0)
        if result is None:
            return UNLIMITED
        return peek_decision(limit, result[1], kind)

    async def reserve(self, key: str, limit: int, cost: float, kind: str) -> Decision:
        """Take C{cost} unless the bucket is empty or in debt, atomically (see L{MemoryLimiter.reserve})."""
        if not limit:
            return UNLIMITED
        result = await self._run("reserve", kind, key, limit, cost)
        if result is None:
            return UNLIMITED
        allowed, level = result
        if allowed:
            return take_decision(limit, level, True, cost, kind)
        return peek_decision(limit, level, kind)

    async def spend(self, key: str, limit: int, cost: float, kind: str) -> None:
        """Take C{cost} whatever the level; a negative C{cost} is a refund up to a full bucket."""
        if not limit or not cost:
            return
        await self._run("spend", kind, key, limit, cost, refuse=False)

    async def ping(self) -> str | None:
        """
        For C{/readyz}: C{None} when Redis answers a PING within the
        check's deadline, else a short reason (L{_describe}: never the URL,
        which may hold a password).  It neither counts as an outage nor
        ends one: the checks themselves decide that.
        """
        if not self.pool.started:
            self.pool.start()
        d = deferToThreadPool(self.reactor, self.pool, self.client.ping)
        d.addTimeout(self.deadline, self.reactor)
        try:
            await d
        except Exception as e:
            return _describe(e)
        return None

    def close(self) -> None:
        """Stop the threads and drop the connections (at gateway stop)."""
        if self.pool.started:
            self.pool.stop()
        self.client.close()

    # --- the work ----------------------------------------------------------------

    def bucket_key(self, kind: str, key: str) -> str:
        return f"{self.key_prefix}{kind}:{key}"

    async def _run(self, op: str, kind: str, key: str, limit: int, cost: float, refuse: bool = True) -> tuple[bool, float] | None:
        """
        C{(allowed, level)} from the script, or C{None} when Redis could not
        answer and the policy lets the request through.
        """
        if self.reactor.seconds() < self._down_until:
            return self._unavailable(op, None, refuse)
        now = "" if self.clock is None else repr(float(self.clock.seconds()))
        args = (op, repr(float(limit)), repr(float(cost)), now)
        if not self.pool.started:
            self.pool.start()
        d = deferToThreadPool(self.reactor, self.pool, self._call, self.bucket_key(kind, key), args)
        d.addTimeout(self.deadline, self.reactor)
        try:
            allowed, level = await d
        except Exception as e:
            self._down_until = self.reactor.seconds() + self.RETRY_AFTER
            return self._unavailable(op, e, refuse)
        self._down_until = 0.0
        return bool(int(allowed)), float(level)

    def _call(self, key: str, args: tuple[str, ...]) -> Any:
        """On a pool thread: EVALSHA, or EVAL when Redis does not have the script (yet, or after a restart)."""
        try:
            return self.client.evalsha(SCRIPT_SHA, 1, key, *args)
        except self._no_script:
            return self.client.eval(BUCKET_SCRIPT, 1, key, *args)

    def _unavailable(self, op: str, error: Exception | None, refuse: bool) -> tuple[bool, float] | None:
        # What _run answers without Redis: None (the request passes), or it refuses.
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:
                log.failure("Counting a rate-limiter error failed")
        self._log(op, error)
        if refuse and self.on_backend_error == "closed":
            raise LimiterUnavailable()
        return None

    def _log(self, op: str, error: Exception | None) -> None:
        """One line per C{LOG_EVERY} seconds, saying how many checks it covers."""
        now = self.reactor.seconds()
        self._unlogged += 1
        if self._last_log is not None and now - self._last_log < self.LOG_EVERY:
            return
        self._last_log = now
        count, self._unlogged = self._unlogged, 0
        reason = "Redis is marked down after a recent failure" if error is None else _describe(error)
        log.error(
            "Rate limiter backend unavailable ({reason}); {count} check(s) decided by rate_limit.on_backend_error={policy}",
            reason=reason,
            count=count,
            policy=self.on_backend_error,
            op=op,
        )


def _describe(error: Exception) -> str:
    """A short reason without addresses or secrets (the URL may hold a password)."""
    from twisted.internet.defer import TimeoutError as DeferTimeout

    if isinstance(error, DeferTimeout):
        return "no answer in time"
    name = type(error).__name__
    if "Timeout" in name:
        return "timed out"
    if "Connection" in name:
        return "cannot connect"
    if "Authentication" in name or "NoPermission" in name:
        return "refused the credentials"
    if "ResponseError" in name:
        return "script error"
    return name


def build_limiter(config: "Config", reactor: Any, on_error: Callable[[], object] | None = None) -> "MemoryLimiter | RedisLimiter":
    """The limiter C{rate_limit.backend} names."""
    limits = config.rate_limit
    if limits.backend == "redis":
        return RedisLimiter(reactor, limits.url, key_prefix=limits.key_prefix, on_backend_error=limits.on_backend_error, on_error=on_error)
    return MemoryLimiter(reactor, max_keys=limits.max_buckets, max_address_keys=limits.max_address_buckets)
