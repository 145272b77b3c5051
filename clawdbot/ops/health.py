"""
The backends' health checks: with several backends, each is asked every
C{backend.health_interval}, so one that is down is routed around before a
request finds out (and one that is back is used again).
"""

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

if TYPE_CHECKING:
    from clawdbot.ops.observe import Metrics

log = Logger(namespace="clawdbot.tap")


class Backends(Protocol):
    """What the checks ask (L{clawdbot.backend.ollama.Ollama}, which this layer may not import)."""

    def check(self) -> Coroutine[Any, Any, str | None]:
        """C{None} when at least one backend answers, else a short reason."""


def health_checks(ollama: Backends, metrics: "Metrics", interval: float, clock: Any) -> TimerService:
    """
    A L{TimerService} checking every backend each C{interval} seconds and
    setting C{clawdbot_backend_up}; a failed check never stops it.

    @param clock: the reactor the timer runs on.
    """

    def check() -> Deferred[Any]:
        d = Deferred.fromCoroutine(ollama.check())
        d.addCallback(lambda reason: metrics.backend_up.set(0 if reason else 1))
        d.addErrback(lambda failure: log.failure("Backend health check failed", failure))
        return d

    timer = TimerService(interval, check)
    timer.clock = clock
    return timer
