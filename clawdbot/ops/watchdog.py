"""
The systemd watchdog: a gateway whose reactor is stuck is restarted.

A process that is stopped (SIGSTOP) or whose reactor never returns still
has its connections completed by the kernel, so nginx in front sees no
refusal and no connect timeout: each request sent its way waits for
C{proxy_read_timeout}.  With C{WatchdogSec=} in the unit (and
C{NotifyAccess=main}), systemd expects C{WATCHDOG=1} on C{$NOTIFY_SOCKET}
at least that often and kills and restarts (C{Restart=on-failure}) a
process that stops sending it.  The message is sent from a reactor timer,
so it stops exactly when the reactor stops running.

The protocol is sd_notify(3): one datagram, C{WATCHDOG=1}, to the
C{AF_UNIX} socket named by C{$NOTIFY_SOCKET} (a path, or with a leading
C{@} a name in the abstract namespace); C{$WATCHDOG_USEC} is the
watchdog's period in microseconds, for the process whose id is
C{$WATCHDOG_PID} (when set).
"""

import os
import socket

from twisted.application.internet import TimerService
from twisted.logger import Logger

log = Logger(namespace="clawdbot.gateway")


def notify_address(value):
    """
    The address to send to for a C{$NOTIFY_SOCKET} value: a path as it is,
    C{@name} as C{"\\0name"} (the abstract namespace), C{None} for anything
    else (unset, empty, or not a unix socket such as C{vsock:...}).
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ, pid):
    """
    Seconds between two C{WATCHDOG=1} messages (half the watchdog's period,
    as sd_watchdog_enabled(3) advises), or C{None} when systemd asks this
    process for none: no C{$NOTIFY_SOCKET}, no or a malformed
    C{$WATCHDOG_USEC}, or a C{$WATCHDOG_PID} that is another process's.
    """
    if notify_address(environ.get("NOTIFY_SOCKET")) is None:
        return None
    watched = environ.get("WATCHDOG_PID")
    if watched is not None and watched.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2e6


class Notifier:
    """
    Sends sd_notify messages to one C{$NOTIFY_SOCKET} address.  A send that
    fails (the socket gone, a full queue) is logged, once until one works
    again, and never raised: the reactor goes on, and systemd, missing the
    message, does what its watchdog is for.
    """

    def __init__(self, address):
        self.address = address
        self._failing = False

    def send(self, message):
        """Send C{message} (C{bytes}) as one datagram."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as e:
            if not self._failing:
                log.warn("Could not notify systemd's watchdog: {error}", error=e.strerror or type(e).__name__)
            self._failing = True
        else:
            self._failing = False

    def ping(self):
        """The watchdog's keep-alive, C{WATCHDOG=1}."""
        self.send(b"WATCHDOG=1")


def watchdog_service(environ, pid=None, clock=None):
    """
    A service that sends C{WATCHDOG=1} every half watchdog period from a
    reactor timer (a L{TimerService}, the first at once), or C{None} when
    systemd set no watchdog for this process (L{watchdog_interval}).

    @param pid: this process's id (C{os.getpid()} by default).
    @param clock: the reactor the timer runs on (the global one by default).
    """
    interval = watchdog_interval(environ, os.getpid() if pid is None else pid)
    if interval is None:
        return None
    notifier = Notifier(notify_address(environ["NOTIFY_SOCKET"]))
    timer = TimerService(interval, notifier.ping)
    if clock is not None:
        timer.clock = clock
    timer.notifier = notifier
    return timer
