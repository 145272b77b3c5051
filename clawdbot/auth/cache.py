"""
Fetching once for many: L{SingleFlight} runs one call at a time and lets
the callers that arrive meanwhile share its outcome; L{Cached} keeps a
fetched value for the TTL its fetch gives.  The identity providers'
documents and tokens (L{clawdbot.auth.providers}) and the JWT signing keys
(L{clawdbot.auth.tokens.KeySet}) are fetched through them, so a burst of
sign-ins or tokens makes one request to the provider.
"""

from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="clawdbot.providers")

T = TypeVar("T")


class Clock(Protocol):
    """What L{Cached} reads the time from (a reactor, or a test's clock)."""

    def seconds(self) -> float: ...


class SingleFlight(Generic[T]):
    """
    C{await flight()} runs C{fn()}, unless a run is under way: then it
    waits for that run and gets its result (or its failure).  The run
    belongs to no caller: one that goes away (its wait cancelled) leaves it
    and the others' answers intact.

    @param fn: C{async fn() -> value}.
    """

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self.fn = fn
        self._waiters: list[Deferred[T]] | None = None

    async def __call__(self) -> T:
        waiter: Deferred[T] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
        else:
            self._waiters = [waiter]
            Deferred.fromCoroutine(self._run())
        return await waiter

    async def _run(self) -> None:
        try:
            result = await self.fn()
        except Exception:
            failure = Failure()
            waiters, self._waiters = self._waiters or [], None
            for waiter in waiters:
                if not waiter.called:  # (cancelled by a caller that left)
                    waiter.errback(failure)
            return
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(result)


class Cached(Generic[T]):
    """
    One value fetched on demand and kept for the TTL its fetch returns;
    callers that arrive during a fetch share it.

    @param fetch: C{async fetch() -> (value, ttl)}.
    @param serve_stale: on a failed refresh, keep answering the old value.
    """

    def __init__(self, clock: Clock, fetch: Callable[[], Awaitable[tuple[T, float]]], serve_stale: bool = False) -> None:
        self.clock = clock
        self.fetch = fetch
        self.serve_stale = serve_stale
        self.value: T | None = None
        self.expires = 0.0
        self._flight = SingleFlight(self._refresh)

    def clear(self) -> None:
        self.value = None
        self.expires = 0.0

    async def get(self) -> T:
        if self.value is not None and self.clock.seconds() < self.expires:
            return self.value
        return await self._flight()

    async def _refresh(self) -> T:
        try:
            value, ttl = await self.fetch()
        except Exception as e:
            if self.serve_stale and self.value is not None:
                log.warn("Refresh failed, serving the cached copy: {error}", error=getattr(e, "reason", type(e).__name__))
                return self.value
            raise
        self.value, self.expires = value, self.clock.seconds() + ttl
        return value
