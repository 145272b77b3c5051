"""
The backends' health checks: with several backends, each is asked every
C{backend.health_interval}, so one that is down is routed around before a
request finds out (and one that is back is used again).
"""

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from clawdbot.ops.observe import Metrics

log = Logger(namespace="clawdbot.tap")


class Backends(Protocol):
    """What the checks ask (L{clawdbot.backend.ollama.Ollama}, which this layer may not import)."""

    def check(self) -> Coroutine[Any, Any, str | None]:
        """C{None} when at least one backend answers, else a short reason."""


class HealthChecks(TimerService):
    """
    A L{TimerService} checking every backend each C{interval} seconds and
    setting C{clawdbot_backend_up}; a failed check never stops it, and
    stopping does not wait for a check under way (it is cancelled: a
    backend that never answers must not hold up the drain).
    """

    def __init__(self, ollama: Backends, metrics: "Metrics", interval: float) -> None:
        super().__init__(interval, self.check)
        self.ollama = ollama
        self.metrics = metrics
        self.running_check: Deferred[Any] | None = None

    def check(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred.fromCoroutine(self.ollama.check())
        d.addCallback(lambda reason: self.metrics.backend_up.set(0 if reason else 1))
        d.addErrback(self._failed)
        self.running_check = d
        return d

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            log.failure("Backend health check failed", failure)

    def stopService(self) -> Deferred[None] | None:
        if self.running_check is not None and not self.running_check.called:
            self.running_check.cancel()
        return super().stopService()


def health_checks(ollama: Backends, metrics: "Metrics", interval: float, clock: Any) -> HealthChecks:
    """L{HealthChecks} on C{clock} (the reactor)."""
    timer = HealthChecks(ollama, metrics, interval)
    timer.clock = clock
    return timer


class StartupCheck(Service):
    """
    Once, as the gateway starts: whether Ollama answers, said where the
    operator looks (with C{say}, beside the "listening on" lines), so a
    missing Ollama is known at once, not from the first user's 502.  A check
    still under way when the gateway stops is cancelled.
    """

    def __init__(self, ollama: Backends, addresses: str, say: Any) -> None:
        self.ollama = ollama
        self.addresses = addresses
        self.say = say
        self.check_running: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        d: Deferred[Any] = Deferred.fromCoroutine(self.ollama.check())
        d.addCallback(self._said)
        d.addErrback(lambda f: None if f.check(CancelledError) else log.failure("The start-up backend check failed", f))
        self.check_running = d

    def stopService(self) -> Deferred[None] | None:
        if self.check_running is not None and not self.check_running.called:
            self.check_running.cancel()
        return super().stopService()

    def _said(self, reason: str | None) -> None:
        if reason is None:
            self.say(f"Ollama at {self.addresses} answers")
        else:
            self.say(f"Ollama at {self.addresses} is not answering ({reason}); model calls fail until it does")


def startup_check(ollama: Backends, addresses: str, say: Any) -> StartupCheck:
    """L{StartupCheck} for the gateway's backends (C{addresses}, for the message)."""
    return StartupCheck(ollama, addresses, say)
