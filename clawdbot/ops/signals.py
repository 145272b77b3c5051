"""
Signal handlers as a service: installed when it starts, the previous
handlers put back when it stops (so a test, or an embedding program, gets
its own handlers back).
"""

import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application import service

if TYPE_CHECKING:
    from types import FrameType
    from typing import TypeAlias

    # What C{signal.signal} takes and gives back: a function, C{SIG_DFL}, C{SIG_IGN} or C{None}.
    Disposition: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


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
