"""
Command-line options and service composition for the gateway.

C{makeService} is the one place where the pieces are put together; both
C{twistd clawdbot} (through the plugin) and C{clawdbot start} use it.
"""

import os
import signal

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from clawdbot.config import ConfigError, is_loopback, load_config, strport_interface

log = Logger(namespace="clawdbot.tap")


class Options(usage.Options):
    synopsis = "--config FILE [--mode dev|production] [--no-debug-port]"
    longdesc = "Clawdbot: an authenticating, OpenAI-compatible gateway in front of Ollama."
    optParameters = [
        ["config", "c", None, "Path to the YAML config file."],
        ["mode", None, None, "dev or production; overrides server.mode in the file."],
    ]
    optFlags = [["no-debug-port", None, "Never open the debug listener."]]

    def __init__(self, environ=None):
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if self["mode"] not in (None, "dev", "production"):
            raise usage.UsageError("--mode must be dev or production")
        try:
            self.loaded = load_config(self["config"], self.environ, mode=self["mode"])
        except ConfigError as e:
            raise usage.UsageError(f"config error in {self['config']}: {e}") from None


class ListenError(Exception):
    """A listener could not bind; start-up stops."""


class Listener(service.Service):
    """
    Listen on one strports description.  Unlike a bare
    C{StreamServerEndpointService}, failing to bind aborts start-up, and a
    successful bind is announced with the real address (so C{tcp:0} works).
    """

    def __init__(self, reactor, description, factory, announce=None):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.announce = announce
        self.port = None

    def startService(self):
        super().startService()
        results = []
        serverFromString(self.reactor, self.description).listen(self.factory).addBoth(results.append)
        if not results:
            raise ListenError(f"{self.description}: the listener did not start")
        if isinstance(results[0], Failure):
            raise ListenError(f"cannot listen on {self.description}: {results[0].getErrorMessage()}")
        self.port = results[0]
        if self.announce:
            self.announce(self.port.getHost())

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def _url(description, address):
    host = strport_interface(description)
    if host in (None, "", "0.0.0.0", "::") or is_loopback(host):
        shown = "localhost" if host in (None, "", "0.0.0.0", "::") else host
    else:
        shown = host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{address.port}"


def _say(line):
    print(line, flush=True)


class GatewayService(service.MultiService):
    """The listeners plus the gateway's own start and stop work."""

    def __init__(self, gateway, install_signals):
        super().__init__()
        self.gateway = gateway
        self.install_signals = install_signals

    def startService(self):
        super().startService()
        self._start_health_checks()
        if self.install_signals:
            reactor = self.gateway.reactor
            signal.signal(signal.SIGHUP, lambda signum, frame: self.gateway.request_reload())
            signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(self.gateway.access_log.reopen))

    _health = None

    def _start_health_checks(self):
        """With several backends, check each every backend.health_interval."""
        from twisted.internet.task import LoopingCall

        from clawdbot.backend.ollama import backend_urls

        config = self.gateway.config
        if len(backend_urls(config)) < 2:
            return
        self._health = LoopingCall(self._check_backends)
        self._health.clock = self.gateway.reactor
        self._health.start(config.backend.health_interval, now=False)

    def _check_backends(self):
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(self.gateway.backend.check())
        d.addCallback(lambda reason: self.gateway.metrics.backend_up.set(0 if reason else 1))
        # Never let a failure stop the loop.
        d.addErrback(lambda failure: log.failure("Backend health check failed", failure))
        return d

    def stopService(self):
        """Stop accepting, drain what is in flight, then close outbound connections."""
        from twisted.internet.defer import Deferred

        if self._health is not None and self._health.running:
            self._health.stop()
        d = super().stopService()
        d.addCallback(lambda _: Deferred.fromCoroutine(self.gateway.drain(self.gateway.config.server.drain_timeout)))
        d.addCallback(lambda _: self.gateway.stop())
        return d


def makeService(options, reactor=None, say=_say):
    """
    Compose the gateway's services from parsed L{Options}.

    @param reactor: the reactor; C{None} means the real one, and also names
        the process C{clawdbot} and installs the SIGHUP handler.
    """
    from clawdbot.ops.runtime import Gateway
    from clawdbot.http.tree import build_root
    from clawdbot.http.site import GatewaySite

    real = reactor is None
    if real:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
        _set_process_title()
    config = options.loaded
    for warning in config.warnings:
        log.warn("Config warning: {warning}", warning=warning)
    gateway = Gateway(config, reactor, environ=options.environ, mode=options["mode"])
    top = GatewayService(gateway, install_signals=real)

    site = GatewaySite(build_root(gateway, debug=False), gateway, debug=False, timeout=60, reactor=reactor)
    listen = config.server.listen
    Listener(reactor, listen, site, lambda addr: say(f"Gateway listening on {_url(listen, addr)}")).setServiceParent(top)

    if config.metrics.listen:
        from clawdbot.http.tree import metrics_root

        metrics_site = GatewaySite(metrics_root(gateway), gateway, debug=False, timeout=60, reactor=reactor)
        metrics_listen = config.metrics.listen
        Listener(reactor, metrics_listen, metrics_site, lambda addr: say(f"Metrics listening on {_url(metrics_listen, addr)}")).setServiceParent(top)

    if config.server.mode == "production":
        log.info("Debug listener refused: production mode never opens it")
    elif options["no-debug-port"]:
        log.info("Debug listener disabled by --no-debug-port")
    else:
        debug_site = GatewaySite(build_root(gateway, debug=True), gateway, debug=True, timeout=60, reactor=reactor)
        debug = config.server.debug_listen
        Listener(
            reactor,
            debug,
            debug_site,
            lambda addr: say(f"Debug port listening on {_url(debug, addr)} (dev mode, no authentication)"),
        ).setServiceParent(top)
    return top


def _set_process_title():
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle("clawdbot")
