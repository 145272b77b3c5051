"""
Command-line options and service composition for the gateway.

C{makeService} (with L{compose}) is the one place where the pieces are
put together; both C{twistd clawdbot} (through the plugin) and
C{clawdbot start} use it.
"""

import os
import signal

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from clawdbot.auth.fetch import HTTPFetcher
from clawdbot.auth.keys import ApiKeys
from clawdbot.auth.tokens import Authentication
from clawdbot.backend.images import ImageWorkers
from clawdbot.backend.ollama import Ollama, backend_urls, display_url
from clawdbot.config import ConfigError, load_config
from clawdbot.http.site import GatewaySite
from clawdbot.http.resource import JSONParsers
from clawdbot.http.tree import Parts, Readiness, build_root, metrics_root
from clawdbot.logs import set_level
from clawdbot.net import is_loopback, strport_interface
from clawdbot.ops.accounting import Accounting
from clawdbot.ops.health import health_checks, startup_check
from clawdbot.ops.observe import AccessLog, Metrics
from clawdbot.ops.ratelimit import build_limiter
from clawdbot.ops.runtime import Runtime
from clawdbot.ops.signals import SignalHandlers
from clawdbot.ops.tracing import Tracing
from clawdbot.ops.watchdog import watchdog_service
from clawdbot.server_tls import ReloadableCertificate, TLSConfigError, TLSServerEndpoint, is_tls, parse_tls
from clawdbot.ops.quotas import Batches, Quotas
from clawdbot.storage.history import History
from clawdbot.storage.keys import KeyStore
from clawdbot.storage.responses import ResponseStore
from clawdbot.storage.audit import AuditStore
from clawdbot.ops.audit import AuditLog
from clawdbot.storage.store import StorageUnavailable, open_store
from clawdbot.storage.usage import UsageBook, UsageStore

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


class ListenError(SystemExit):
    """
    A listener could not bind: start-up stops with one line and status 1.
    A C{SystemExit}, so that under C{twistd} too (where an exception would
    end in its traceback) the process ends with just this line.
    """

    def __init__(self, message):
        super().__init__(f"clawdbot: {message}")
        self.message = message

    def __str__(self):
        return self.message


class StorageError(ListenError):
    """
    The store the config names cannot be used at start (C{storage.path}
    whose directory cannot be made or written, a file that cannot be
    written): start-up stops with one line naming it and status 1, as for
    a listener.
    """


class Listener(service.Service):
    """
    Listen on one strports description.  Unlike a bare
    C{StreamServerEndpointService}, failing to bind aborts start-up, and a
    successful bind is announced with the real address (so C{tcp:0} works).
    An C{ssl:} description is the gateway's own (L{clawdbot.server_tls}):
    its certificate is reloaded by L{reload_certificate}.
    """

    def __init__(self, reactor, description, factory, announce=None):
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.announce = announce
        self.port = None
        # An ssl: listener's certificate (clawdbot.server_tls), which a reload re-reads.
        self.certificate = None

    def startService(self):
        super().startService()
        results = []
        self._endpoint().listen(self.factory).addBoth(results.append)
        if not results:
            raise ListenError(f"{self.description}: the listener did not start")
        if isinstance(results[0], Failure):
            raise ListenError(f"cannot listen on {self.description}: {results[0].getErrorMessage()}")
        self.port = results[0]
        if self.announce:
            self.announce(self.port.getHost())

    def _endpoint(self):
        if not is_tls(self.description):
            return serverFromString(self.reactor, self.description)
        # The config's validation read these files; this reads them again,
        # for the listener, and a file changed meanwhile stops start-up too.
        try:
            listen = parse_tls(self.description)
            self.certificate = ReloadableCertificate(listen)
        except TLSConfigError as e:
            raise ListenError(f"cannot listen on {self.description}: {e}") from None
        return TLSServerEndpoint(self.reactor, listen, self.certificate)

    def reload_certificate(self, old=None, new=None):
        """
        A reload hook: an C{ssl:} listener re-reads its key and certificate
        (a renewed certificate at the same paths), keeping the one in use
        when the new files cannot be used.
        """
        if self.certificate is not None:
            self.certificate.reload()

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
    scheme = "https" if is_tls(description) else "http"
    return f"{scheme}://{shown}:{address.port}"


def _say(line):
    print(line, flush=True)


def compose(config, reactor, environ=None, mode=None, agent_factory=None):
    """
    The gateway's parts, each built once and handed to whoever uses it:
    the composition root.  Reload hooks keep the parts that derive
    something from the config current.

    @param agent_factory: the Ollama client's (L{Ollama}); tests give one
        that answers in memory.
    @return: the L{Parts} the routes are built on.
    """
    fetcher = HTTPFetcher(reactor)
    # (The lambdas read the runtime and the metrics, made just below, when called.)
    tracing = Tracing(reactor, lambda: metrics)
    tracing.configure(config)
    ollama = Ollama(reactor, lambda: runtime.config, agent_factory, tracing)
    metrics = Metrics(ollama.slots, ollama.model_slots)
    runtime = Runtime(config, reactor, metrics, environ=environ, mode=mode)
    runtime.on_reload(lambda old, new: tracing.configure(new))
    limiter = build_limiter(config, reactor, on_error=metrics.ratelimit_backend_errors.inc)
    store = open_store(config, reactor)
    # Keys, usage and quotas live in the history database, on its threads.
    keys = ApiKeys(KeyStore(store.engine), reactor, lambda: runtime.config)
    usage_store = UsageStore(store.engine)
    usage = UsageBook(usage_store, reactor)
    quotas = Quotas(usage_store, reactor, metrics)
    usage.listeners.append(quotas.counted)
    audit = AuditLog(lambda: runtime.config, AuditStore(store.engine), clock=reactor.seconds)
    runtime.audit = audit
    runtime.on_reload(lambda old, new: audit.reopen() if old.audit_log.path != new.audit_log.path else None)
    authentication = Authentication(config, reactor, fetcher.fetch_json, keys)
    runtime.on_reload(authentication.rebuild)

    def limiter_policy(old, new):
        # The Redis outage policy applies at once; backend and url need a restart.
        limiter.on_backend_error = new.rate_limit.on_backend_error

    runtime.on_reload(limiter_policy)
    runtime.on_reload(lambda old, new: set_level(new.log.level))
    return Parts(
        runtime=runtime,
        accounting=Accounting(limiter, AccessLog(config.access_log.path), metrics, usage, quotas, audit, tracing),
        audit=audit,
        authentication=authentication,
        ollama=ollama,
        history=History(store),
        keys=keys,
        responses=ResponseStore(store.engine, reactor),
        usage=usage,
        batches=Batches(usage, quotas, keys, lambda: runtime.config, audit=audit),
        # Images and big JSON bodies are handled on these threads, never on the reactor.
        images=ImageWorkers(reactor),
        parsers=JSONParsers(reactor),
        fetcher=fetcher,
        metrics=metrics,
        readiness=Readiness(runtime, ollama, metrics, store=store, limiter=limiter),
        reactor=reactor,
        tracing=tracing,
    )


def reopen_logs(parts):
    """SIGUSR1: the access log and the audit log reopen their files (logrotate moved them)."""
    parts.accounting.access_log.reopen()
    parts.audit.reopen()


def stop(parts):
    """Write what is gathered (usage, keys' last use), then close what the parts hold (threads, connections, files)."""

    def close(_):
        parts.images.stop()
        parts.parsers.stop()
        parts.history.store.close()
        parts.accounting.limiter.close()
        # (The spans still queued are sent, for a few seconds at most, off the reactor.)
        return gatherResults([parts.ollama.close(), parts.fetcher.close(), deferToThread(parts.tracing.stop)])

    return parts.batches.run().addCallback(close)


class GatewayService(service.MultiService):
    """
    The listeners and the backend health checks as child services, the
    signal handlers (kept until the very end: a SIGHUP or SIGUSR1 during
    the drain must not end the process), and the gateway's own stop work:
    drain what is in flight, then close the parts.

    @param signals: a L{SignalHandlers}, or C{None} (not the real reactor).
    @param watchdog: the systemd watchdog's service
        (L{clawdbot.ops.watchdog.watchdog_service}), or C{None}: like the
        signals, it runs until the very end, the drain included, so that
        systemd kills a process only when its reactor stops turning.
    """

    def __init__(self, parts, signals=None, watchdog=None):
        super().__init__()
        self.parts = parts
        self.signals = signals
        self.watchdog = watchdog
        # The end of server.drain_delay while it runs (an IDelayedCall).
        self.delay_call = None

    def startService(self):
        super().startService()
        self.parts.keys.start()
        if self.signals is not None:
            self.signals.startService()
        if self.watchdog is not None:
            self.watchdog.startService()

    def stopService(self):
        """
        Refuse new requests (L{Runtime.begin_drain}) for
        C{server.drain_delay} seconds (default 0) with the listeners still
        open, so that a balancer polling C{/readyz} takes the instance out
        before its port closes; then stop accepting, drain what is in
        flight, close the parts, and give the signals back.
        """
        runtime = self.parts.runtime
        # (Once: a stop called again after a drain has no delay of its own.)
        delay = 0 if runtime.draining else runtime.config.server.drain_delay
        runtime.begin_drain()
        if delay > 0:
            log.info("Shutting down: refusing new requests for {delay}s before the listeners close", delay=delay)
            d = Deferred()
            self.delay_call = self.parts.reactor.callLater(delay, d.callback, None)
            d.addCallback(lambda _: service.MultiService.stopService(self))
        else:
            d = super().stopService()
        d.addCallback(lambda _: Deferred.fromCoroutine(runtime.drain(runtime.config.server.drain_timeout)))
        d.addCallback(lambda _: stop(self.parts))
        if self.signals is not None:
            d.addBoth(self._restore_signals)
        if self.watchdog is not None:
            d.addBoth(self._stop_watchdog)
        return d

    def _stop_watchdog(self, result):
        self.watchdog.stopService()
        return result

    def _restore_signals(self, result):
        self.signals.stopService()
        return result


def makeService(options, reactor=None, say=_say, agent_factory=None):
    """
    Compose the gateway's service (listeners, signals, health checks) from parsed L{Options}.

    @param reactor: the reactor; C{None} means the real one, and also names
        the process C{clawdbot} and installs the signal handlers.
    """
    real = reactor is None
    if real:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
        _set_process_title()
    config = options.loaded
    for warning in config.warnings:
        log.warn("Config warning: {warning}", warning=warning)
    set_level(config.log.level)
    try:
        parts = compose(config, reactor, environ=options.environ, mode=options["mode"], agent_factory=agent_factory)
    except StorageUnavailable as e:
        raise StorageError(f"storage.path {config.storage.path}: {e.reason}") from None
    runtime = parts.runtime
    signals = None
    if real:
        signals = SignalHandlers(
            {
                signal.SIGHUP: runtime.request_reload,
                signal.SIGUSR1: lambda: reactor.callFromThread(reopen_logs, parts),
            }
        )
    # Under systemd with WatchdogSec= (clawdbot.service): WATCHDOG=1 from the
    # reactor, so that a stuck process is killed and restarted.
    watchdog = watchdog_service(options.environ) if real else None
    top = GatewayService(parts, signals, watchdog)
    if len(backend_urls(config)) > 1:
        # With several backends, each is checked every backend.health_interval.
        health_checks(parts.ollama, parts.metrics, config.backend.health_interval, reactor).setServiceParent(top)

    site = GatewaySite(build_root(parts, debug=False), parts, debug=False, timeout=60, reactor=reactor)
    listen = config.server.listen
    secure = Listener(reactor, listen, site, lambda addr: say(f"Gateway listening on {_url(listen, addr)}"))
    secure.setServiceParent(top)
    # A renewed certificate at the same paths is used from the reload on
    # (changing server.listen itself still takes a restart).
    runtime.on_reload(secure.reload_certificate)

    if config.metrics.listen:
        metrics_site = GatewaySite(metrics_root(parts), parts, debug=False, timeout=60, reactor=reactor)
        metrics_listen = config.metrics.listen
        Listener(reactor, metrics_listen, metrics_site, lambda addr: say(f"Metrics listening on {_url(metrics_listen, addr)}")).setServiceParent(top)

    if config.server.mode == "production":
        log.info("Debug listener refused: production mode never opens it")
    elif options["no-debug-port"]:
        log.info("Debug listener disabled by --no-debug-port")
    else:
        debug_site = GatewaySite(build_root(parts, debug=True), parts, debug=True, timeout=60, reactor=reactor)
        debug = config.server.debug_listen
        Listener(
            reactor,
            debug,
            debug_site,
            lambda addr: say(f"Debug port listening on {_url(debug, addr)} (dev mode, no authentication): open it in a browser to chat"),
        ).setServiceParent(top)
    # Usage, quota totals and keys' last use are written every
    # usage.flush_interval (started last: a listener that cannot bind stops
    # the start-up before any of it runs).
    TimerService(config.usage.flush_interval, parts.batches.run).setServiceParent(top)
    # Once the ports are open: whether Ollama answers, said beside them.
    addresses = ", ".join(display_url(url) for url in backend_urls(config))
    startup_check(parts.ollama, addresses, say).setServiceParent(top)
    return top


def _set_process_title():
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle("clawdbot")
