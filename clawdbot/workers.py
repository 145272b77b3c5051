"""
Threads for CPU-bound work the reactor must never do (decoding images,
parsing big JSON bodies): a pool that starts with its first job, the jobs in
flight, and a stop at gateway shutdown.
"""

from typing import Any, Protocol

from twisted.python.threadpool import ThreadPool

from clawdbot.errors import APIError


class Job(Protocol):
    """Work in flight on the pool, which L{Workers.stop} cancels."""

    def cancel(self) -> None: ...


def shutting_down() -> APIError:
    return APIError("SHUTTING_DOWN", details="the gateway is shutting down; retry the request", headers={"Retry-After": "1"})


class Workers:
    """
    A lazily started L{ThreadPool} and the jobs it runs.  A job is any
    object with C{cancel()}; subclasses add theirs to C{_jobs} while it runs.

    @ivar stopped: set by L{stop}; later work gets 503 SHUTTING_DOWN.
    """

    name = "clawdbot-workers"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stopped = False
        self._pool: ThreadPool | None = None
        self._jobs: set[Job] = set()

    def pool(self, size: int) -> ThreadPool:
        """The pool, started with at most C{size} threads (resized when that changed, as by a reload)."""
        if self.stopped:
            raise shutting_down()
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=size, name=self.name)
            self._pool.start()
        elif self._pool.max != size:
            self._pool.adjustPoolsize(0, size)
        return self._pool

    def stop(self) -> None:
        """
        At gateway shutdown: cancel every job (each stops at its next
        check), then end the threads, which waits for the work running right
        now, at most one job per thread.
        """
        self.stopped = True
        for job in list(self._jobs):
            job.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
