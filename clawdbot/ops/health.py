"""
The backends' health checks: with several backends, each is asked every
C{backend.health_interval}, so one that is down is routed around before a
request finds out (and one that is back is used again).
"""

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger(namespace="clawdbot.tap")


def health_checks(ollama, metrics, interval, clock):
    """
    A L{TimerService} checking every backend each C{interval} seconds and
    setting C{clawdbot_backend_up}; a failed check never stops it.
    """

    def check():
        d = Deferred.fromCoroutine(ollama.check())
        d.addCallback(lambda reason: metrics.backend_up.set(0 if reason else 1))
        d.addErrback(lambda failure: log.failure("Backend health check failed", failure))
        return d

    timer = TimerService(interval, check)
    timer.clock = clock
    return timer
