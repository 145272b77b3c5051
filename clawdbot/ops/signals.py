"""
Signal handlers as a service: installed when it starts, the previous
handlers put back when it stops (so a test, or an embedding program, gets
its own handlers back).
"""

import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

if TYPE_CHECKING:
    from types import FrameType
    from typing import TypeAlias

    # What C{signal.signal} takes and gives back: a function, C{SIG_DFL}, C{SIG_IGN} or C{None}.
    Disposition: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

log = Logger(namespace="clawdbot.gateway")


class SignalHandlers(service.Service):
    """
    @param handlers: C{{signum: f}}; each C{f()} runs in the signal handler,
        so it only schedules work (C{reactor.callFromThread}).
    """

    def __init__(self, handlers: Mapping[int, Callable[[], object]]) -> None:
        self.handlers = handlers
        self._previous: dict[int, "Disposition"] = {}

    def startService(self) -> None:
        super().startService()
        for signum, handler in self.handlers.items():
            # (mypy cannot infer a lambda with a default argument.)
            self._previous[signum] = signal.signal(signum, lambda number, frame, handler=handler: handler())  # type: ignore[misc]

    def stopService(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return super().stopService()


def stop_signals(reactor: Any) -> dict[int, Callable[[], object]]:
    """
    SIGTERM and SIGINT as the reactor's own handlers treat them (stop the
    reactor: the shutdown and its drain run), except that a repeated one,
    while the shutdown is under way, is ignored with a log line instead of
    an "Unhandled Error" traceback ("Can't stop reactor that isn't
    running").  For L{SignalHandlers}, started once the reactor runs (it
    installs its own handlers as it starts).
    """

    def stop(name: str) -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            log.info("Received {signal} while shutting down already: ignored (the drain goes on; SIGKILL ends the process at once)", signal=name)
        else:
            log.info("Received {signal}, shutting down.", signal=name)

    return {
        signal.SIGTERM: lambda: reactor.callFromThread(stop, "SIGTERM"),
        signal.SIGINT: lambda: reactor.callFromThread(stop, "SIGINT"),
    }
