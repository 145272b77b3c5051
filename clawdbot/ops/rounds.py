"""
Background work that runs one round at a time (the periodic writes of
usage, keys' last use and audit events).
"""

from twisted.internet.defer import Deferred


class OneRound:
    """
    Runs C{work} (a coroutine function) one round at a time: a call while a
    round is under way waits for that round's end instead of starting
    another.  What a call returns fires with C{None} when the round is over,
    whatever its outcome (the work reports its own failures), so the caller
    can wait for it, at shutdown before the store closes, say.
    """

    def __init__(self, work):
        self.work = work
        self.running = None
        self._waiters = []

    def __call__(self):
        waiter = Deferred()
        self._waiters.append(waiter)
        if self.running is None:
            self.running = Deferred.fromCoroutine(self.work())
            self.running.addBoth(self._over)
        return waiter

    def _over(self, _):
        self.running = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
