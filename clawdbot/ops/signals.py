"""
Signal handlers as a service: installed when it starts, the previous
handlers put back when it stops (so a test, or an embedding program, gets
its own handlers back).
"""

import signal

from twisted.application import service


class SignalHandlers(service.Service):
    """
    @param handlers: C{{signum: f}}; each C{f()} runs in the signal handler,
        so it only schedules work (C{reactor.callFromThread}).
    """

    def __init__(self, handlers):
        self.handlers = handlers
        self._previous = {}

    def startService(self):
        super().startService()
        for signum, handler in self.handlers.items():
            self._previous[signum] = signal.signal(signum, lambda number, frame, handler=handler: handler())

    def stopService(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return super().stopService()
