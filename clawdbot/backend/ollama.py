"""
The Ollama client: one connection pool, the concurrency cap with its fair
wait queue, per-call timeouts (connect, first byte, idle between chunks, and
the whole call), and bodies delivered chunk by chunk so a reply is never
buffered whole while it streams.
"""

import collections
import json
import urllib.parse
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import Attribute, Interface, implementer

from clawdbot.backend import http1
from clawdbot.backend.tls import HANDSHAKE_TIMED_OUT, SETUP_FAILED, ClientTLS, tls_failure
from clawdbot.config import BackendTLSConfig, BackendURLConfig, backend_url_list
from clawdbot.net import Discard
from clawdbot.errors import APIError
from clawdbot.strictjson import loads_checked

log = Logger(namespace="clawdbot.ollama")

MAX_REPLY = 64 * 1024 * 1024
# Idle backend connections kept per backend, at least (see L{Ollama.agent}).
POOL_MIN = 256


class IStreamConsumer(Interface):
    """Where L{Ollama.stream} writes a reply as it arrives: a client's response."""

    gone = Attribute("The client has left: nothing more is written.")

    def responded(seconds):
        """Ollama answered (its status line) after C{seconds}."""

    def begin():
        """Ollama said 200: start the response."""

    def write(data):
        """Write C{data} (bytes) to the client."""

    def registerProducer(producer, streaming):
        """Pace the client by C{producer} (Ollama's connection)."""

    def unregisterProducer():
        """Stop pacing by the producer."""

    def end(tail):
        """Write C{tail} (bytes, maybe empty) and end the response."""

    def fail(error):
        """End the response with C{error} (an L{APIError}) in the stream's own framing."""

    def close():
        """The exchange is over, however it ended (after L{end} or an exception)."""


# Characters of a model's name in a call's span, at most.
MAX_NAME = 256
# The GenAI operation of a call to Ollama, by path (its span's name and gen_ai.operation.name).
OPERATIONS = {"/api/chat": "chat", "/api/generate": "text_completion", "/api/embed": "embeddings", "/api/embeddings": "embeddings"}


def unavailable(details="the model backend is not reachable"):
    return APIError("UPSTREAM_UNAVAILABLE", details=details)


def timed_out(details):
    return APIError("UPSTREAM_TIMEOUT", details=details)


def busy(retry_after):
    return APIError("GATEWAY_BUSY", details="too many requests are waiting for the model; retry shortly", headers={"Retry-After": str(retry_after)})


def retry_after(queue_timeout):
    """A Retry-After hint: a tenth of the queue wait, at least a second."""
    return max(1, int(queue_timeout / 10))


@dataclass(frozen=True)
class Share:
    """
    Whose call it is, for the fair queue: the owner key, its weight
    (C{limits.fair_share.weights}), the class it is counted under in the
    metrics, and C{waited(seconds, position, served)}: told once a call
    that had to wait leaves the queue (C{position}: where it stood when it
    was queued, 1 = next; C{served}: it got its slot, else it timed out).
    """

    key: str
    weight: float = 1.0
    cls: str = "default"
    waited: Callable[[float, int, bool], None] | None = None
    # The caller's server span (tracing): the parent of the call's own span.
    span: Any = None


# Calls without a principal (health checks) share one key.
ANONYMOUS = Share("")


class _Waiter:
    __slots__ = ("share", "seq", "deferred", "since", "position")

    def __init__(self, share, seq, deferred, since):
        self.share = share
        self.seq = seq
        self.deferred = deferred
        self.since = since
        self.position = 0


# Idle principals whose use is still owed, at most (then those owing least are forgiven).
MAX_IDLE = 4096


class Slots:
    """
    At most C{limit} concurrent backend calls; up to C{max_queue} more wait,
    each for at most C{timeout} seconds.  A free slot goes to the waiting
    call that starts earliest in virtual time (start-time fair queuing): a
    principal's next call starts where its previous one finished, each
    slot advancing it by 1/weight, and never before the virtual time now
    (the start of the call granted last).  So one user's many calls cannot
    keep another's single call waiting behind all of them; a principal with
    weight 2 gets twice the slots of one with weight 1 when both keep the
    backend busy; and nobody banks credit, by being idle or by holding a
    long call while others are served.  With C{per_user} set, a principal
    never holds more than that many slots (its further calls wait).  The
    limits are read at each call, so a reload changes them.

    @ivar active: calls holding a slot.
    @ivar waiting: calls waiting, in arrival order.
    """

    def __init__(self, clock):
        self.clock = clock
        self.active = 0
        self.waiting = []
        self.held = collections.Counter()  # key -> slots held
        self.finish = {}  # key -> virtual finish of its last call (while busy, or idle and still ahead)
        self.idle = set()  # keys with nothing held or waiting whose finish is still ahead of vtime
        self.vtime = 0.0
        self._seq = 0

    def _start(self, key):
        """Where a principal's next call starts in virtual time."""
        return max(self.finish.get(key, self.vtime), self.vtime)

    def _grant(self, waiter):
        share = waiter.share
        start = self._start(share.key)
        self.idle.discard(share.key)
        if start > self.vtime:
            self.vtime = start
            # Idle principals whose last call the clock has passed are forgotten.
            for key in [k for k in self.idle if self.finish.get(k, 0.0) <= start]:
                self.idle.discard(key)
                self.finish.pop(key, None)
        self.finish[share.key] = start + 1.0 / share.weight
        self.held[share.key] += 1
        self.active += 1

    def _may_take(self, share, per_user):
        return not per_user or self.held[share.key] < per_user

    async def acquire(self, limit, max_queue, timeout, share=ANONYMOUS, per_user=0):
        self._seq += 1
        waiter = _Waiter(share, self._seq, Deferred(lambda d: self._drop(waiter)), self.clock.seconds())
        if not self.waiting and self.active < limit and self._may_take(share, per_user):
            self._grant(waiter)
            return
        if len(self.waiting) >= max_queue:
            raise busy(retry_after(timeout))
        self.waiting.append(waiter)
        waiter.position = self._position(waiter)
        # (A reload may have raised a limit: free slots go out now, maybe to this call.)
        self._dispatch(limit, per_user)
        if waiter.deferred.called:
            return  # served at once: it did not wait

        def expire():
            if self._drop(waiter):
                self._told(waiter, False)
                waiter.deferred.errback(busy(retry_after(timeout)))

        timer = self.clock.callLater(timeout, expire)
        try:
            await waiter.deferred
        finally:
            if timer.active():
                timer.cancel()
        self._told(waiter, True)

    def _told(self, waiter, served):
        if waiter.share.waited is not None:
            waiter.share.waited(self.clock.seconds() - waiter.since, waiter.position, served)

    def _drop(self, waiter):
        if waiter in self.waiting:
            self.waiting.remove(waiter)
            self._forget(waiter.share.key)
            return True
        return False

    def _forget(self, key):
        """
        A principal with nothing held or waiting is idle: its place is
        forgotten (it comes back at the virtual time then), unless its last
        call finishes ahead of the clock: what it used is still owed, so a
        principal calling one at a time keeps its weight.
        """
        if not self.held[key] and not any(w.share.key == key for w in self.waiting):
            self.held.pop(key, None)
            if self.finish.get(key, 0.0) > self.vtime:
                self.idle.add(key)
                if len(self.idle) > MAX_IDLE:
                    # Bounded whatever the number of principals: those who owe least are forgiven first.
                    for forgiven in sorted(self.idle, key=lambda k: self.finish.get(k, 0.0))[: MAX_IDLE // 2]:
                        self.idle.discard(forgiven)
                        self.finish.pop(forgiven, None)
            else:
                self.finish.pop(key, None)
                self.idle.discard(key)

    def _virtual_starts(self):
        """Each waiting call's virtual start: its owner's next start, plus 1/weight for each of the owner's calls ahead of it."""
        ahead = collections.Counter()
        starts = {}
        for waiter in self.waiting:
            key = waiter.share.key
            starts[waiter] = (self._start(key) + ahead[key] / waiter.share.weight, waiter.seq)
            ahead[key] += 1
        return starts

    def _position(self, waiter):
        """Where a call stands in the queue (1 = next), by the order it will be served in."""
        starts = self._virtual_starts()
        mine = starts[waiter]
        return 1 + sum(1 for other, start in starts.items() if other is not waiter and start < mine)

    def _dispatch(self, limit, per_user):
        """Hand free slots to the waiting calls that start earliest (one over its owner's cap waits)."""
        while self.active < limit and self.waiting:
            eligible = [w for w in self.waiting if self._may_take(w.share, per_user)]
            if not eligible:
                return
            waiter = min(eligible, key=lambda w: (self._start(w.share.key), w.seq))
            self.waiting.remove(waiter)
            self._grant(waiter)
            waiter.deferred.callback(None)

    def release(self, limit, share=ANONYMOUS, per_user=0):
        """Free a slot and hand free slots to the calls that should be served next."""
        self.active -= 1
        self.held[share.key] -= 1
        self._forget(share.key)
        self._dispatch(limit, per_user)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory."""

    def __init__(self, data):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class BodyReader(Protocol):
    """
    Delivers a response body to C{on_data} as it arrives, with an idle timer
    reset on every chunk and the call's overall deadline.  C{finished} fires
    with C{None} at the end of the body, or fails with an L{APIError}.
    """

    def __init__(self, clock, on_data, idle, deadline):
        self.clock = clock
        self.on_data = on_data
        self.idle = idle
        self.deadline = deadline
        self.finished = Deferred(lambda d: self.abort())
        self._error = None
        self._idle_timer = None
        self._deadline_timer = None

    def connectionMade(self):
        self._idle_timer = self.clock.callLater(self.idle, self._timeout, "the model backend stopped sending")
        remaining = max(0.0, self.deadline - self.clock.seconds())
        self._deadline_timer = self.clock.callLater(remaining, self._timeout, "the model backend took longer than the configured timeout")

    def dataReceived(self, data):
        if self._error is not None:
            return
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.idle)
        try:
            self.on_data(data)
        except APIError as e:
            self._fail(e)
        except Exception:
            log.failure("Failed to relay a backend chunk")
            self._fail(unavailable("the gateway could not relay the reply"))

    def _timeout(self, details):
        self._fail(timed_out(details))

    def _fail(self, error):
        if self._error is None:
            self._error = error
            self.abort()

    def abort(self):
        """Drop the backend connection (Ollama sees it close)."""
        self._stop_timers()
        if self.transport is not None:
            self.transport.stopProducing()

    def _stop_timers(self):
        for timer in (self._idle_timer, self._deadline_timer):
            if timer is not None and timer.active():
                timer.cancel()

    def connectionLost(self, reason):
        self._stop_timers()
        if self.finished.called:
            return
        if self._error is not None:
            self.finished.errback(self._error)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(unavailable("the model backend closed the connection mid-reply"))


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    One endpoint per backend address, made once, instead of a new endpoint
    (and an IDNA encoding of the host) for every request.  Over https the
    TLS handshake is part of connecting (L{http1.HandshakeEndpoint}): it
    too must be over within the connect timeout.

    @param tls: the L{ClientTLS} of the backends these endpoints reach over
        https (one set of TLS settings: an agent, and its endpoints, serve
        one), or C{None} for the system's trust.
    """

    def __init__(self, reactor, connect_timeout, tls=None):
        self.reactor = reactor
        self.timeout = connect_timeout
        self.tls = tls
        self._cache = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
            if uri.scheme == b"https":
                tls = self.tls or ClientTLS(BackendTLSConfig())
                # (The host as the config checked it: ASCII, see clawdbot.config.)
                creator = tls.creator(uri.host.decode("ascii"))
                endpoint = http1.HandshakeEndpoint(self.reactor, wrapClientTLS(creator, endpoint), self.timeout)
            self._cache[key] = endpoint
        return endpoint


def _cancelled(error):
    """A request failure that is only the echo of our own cancellation."""
    reasons = getattr(error, "reasons", None) or ()
    return isinstance(error, (ResponseNeverReceived, ResponseFailed)) and any(r.check(CancelledError) for r in reasons)


def backend_urls(config):
    """The URL of each backend: C{backend.urls}, or C{backend.url} alone."""
    return backend_url_list(config)


@dataclass(frozen=True)
class Backend:
    """
    One backend's settings, as a call to it uses them: its URL, the
    headers sent with every call (C{backend.headers} with its own over
    them; L{bytes} pairs), and for an https one its L{ClientTLS} (its own
    C{tls}, else C{backend.tls}).
    """

    url: str
    headers: tuple = ()
    tls: Any = None


def backends(config):
    """The L{Backend} of each configured backend, by URL."""
    out = {}
    shared = config.backend.headers
    for entry in config.backend.urls or (config.backend.url,):
        own = entry if isinstance(entry, BackendURLConfig) else None
        url = own.url if own is not None else entry
        headers = dict(shared)
        if own is not None:
            # Per backend over the shared ones, whatever the case of their names.
            for name, value in own.headers.items():
                for old in [n for n in headers if n.lower() == name.lower()]:
                    del headers[old]
                headers[name] = value
        tls = None
        if url.lower().startswith("https:"):
            tls = ClientTLS(own.tls if own is not None and own.tls is not None else config.backend.tls)
        out[url] = Backend(url, tuple((n.encode("ascii"), v.encode("latin-1")) for n, v in headers.items()), tls)
    return out


def display_url(url):
    """A backend's URL for logs, messages and the admin page: no user, password or query."""
    scheme, sep, rest = url.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    host, slash, path = rest.partition("/")
    return scheme + sep + host.rpartition("@")[2] + slash + path if sep else url.rpartition("@")[2]


_display = display_url


class Upstream:
    """
    One Ollama server: calls in progress, when it may be tried again, and
    whether the log has said it is down (L{OllamaClient.mark_down}: once an
    outage, not once per C{backend.health_interval}).
    """

    def __init__(self, url):
        self.url = url
        self.active = 0
        self.picks = 0
        self.down_until = 0.0
        self.said_down = False


class Lease:
    """A backend slot, held for C{share}: counts as one call in progress on its backend until ended."""

    def __init__(self, upstream, share=None, model_slots=None):
        self.upstream = upstream
        self.share = share or ANONYMOUS
        # The model's own Slots, when backend.model_limits caps it.
        self.model_slots = model_slots
        upstream.active += 1

    def move(self, upstream):
        self.upstream.active -= 1
        self.upstream = upstream
        upstream.active += 1

    def end(self):
        if self.upstream is not None:
            self.upstream.active -= 1
            self.upstream = None


class BackendUnreachable(Exception):
    """
    No connection (or no response at all) from one backend: safe to try another.

    @ivar tls_reason: why the TLS handshake failed, in plain words, when that is what happened.
    """

    def __init__(self, error, tls_reason=None):
        super().__init__(error)
        self.error = error
        self.tls_reason = tls_reason


def payload_model(payload):
    """
    The model a backend call names: its payload's C{model} when that is a
    string, else C{None}.  Model management bodies (admin-only) pass as
    sent, so their C{model} may be anything JSON allows.
    """
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None


def model_cap(config, model):
    """
    C{backend.model_limits}' cap on calls to C{model} at once (an entry may
    name an alias of it), or C{None}.
    """
    if not model:
        return None
    limits = config.backend.model_limits
    entry = limits.get(model)
    if entry is None:
        entry = next((limit for name, limit in limits.items() if config.backend.aliases.get(name) == model), None)
    return entry.max_connections if entry is not None else None


def _endpoint_agent(reactor, connect_timeout, pool, tls=None):
    """
    The production client: L{http1.Client} on L{CachedEndpoints}, its
    connections in C{pool} under the identity of C{tls} (a L{ClientTLS},
    for https backends), so no connection made under other TLS settings
    is used by it.
    """
    return http1.Client(CachedEndpoints(reactor, connect_timeout, tls), pool, identity=tls.identity if tls is not None else None)


class Ollama:
    """
    @param current_config: C{() -> Config}, the config now (for the health
        checks, which no request starts).
    @param tracing: the gateway's L{clawdbot.ops.tracing.Tracing}, or C{None}.
    @param agent_factory: C{(reactor, connect_timeout, pool) -> IAgent},
        what makes the HTTP client for a connect timeout, its persistent
        connections kept in C{pool} (L{http1.Connections}); by default the
        lean L{http1.Client} on cached endpoints.  Tests give one that
        answers from a fake Ollama in memory.  For an https backend it is
        given a fourth argument, the backend's L{ClientTLS}.
    """

    def __init__(self, reactor, current_config, agent_factory=None, tracing=None):
        self.reactor = reactor
        self.current_config = current_config
        self.agent_factory = agent_factory or _endpoint_agent
        # OpenTelemetry (L{clawdbot.ops.tracing.Tracing}): a span for each call a traced request makes.
        self.tracing = tracing
        self.pool = http1.Connections(reactor, POOL_MIN)
        self.slots = Slots(reactor)
        # model -> its own Slots, for the models backend.model_limits caps.
        self.model_slots = {}
        self._agents = {}
        self._upstreams = {}
        # The config the backends' settings were worked out for, and them (L{backends}).
        self._settings = (None, {}, frozenset())

    def agent(self, config, tls=None):
        """The HTTP client for calls under C{config}, to an https backend with C{tls} (its L{ClientTLS})."""
        # Idle connections kept per backend: as many as calls may run at once
        # (the health checks' own besides), so that under full load every call
        # finds one and none waits a turn of the loop for a new connection.
        self.pool.size = max(POOL_MIN, config.max_connections + 2)
        timeout = config.backend.connect_timeout
        key = (timeout, tls)
        agent = self._agents.get(key)
        if agent is None:
            if tls is None:
                agent = self.agent_factory(self.reactor, timeout, self.pool)
            else:
                agent = self.agent_factory(self.reactor, timeout, self.pool, tls)
                if tls not in self._current_tls():
                    # A call still running under an older config's TLS
                    # settings: a client of its own, not kept, whose
                    # connections are never pooled (see backend).
                    self.pool.retire(tls.identity)
                    return agent
            self._agents[key] = agent
        return agent

    def _current_tls(self):
        """The L{ClientTLS} settings of the running config's backends."""
        self.backend(self.current_config(), None)
        return self._settings[2]

    def backend(self, config, url):
        """
        The L{Backend} at C{url} under C{config}.  The running config's
        settings are worked out once; when a reload changes the TLS
        settings, the clients and idle connections of the old ones go (a
        connection verified against an old CA is never used again).  A
        request still running under an older config works its settings
        out afresh (its calls use the TLS settings it started with, on
        connections of their own that are never pooled: L{agent}).
        """
        seen, settings, _ = self._settings
        if seen is not config:
            settings = backends(config)
            if config is self.current_config():
                current = {b.tls for b in settings.values() if b.tls is not None}
                for key in [k for k in self._agents if k[1] is not None and k[1] not in current]:
                    del self._agents[key]
                    self.pool.retire(key[1].identity)
                # Only the running config's identities are kept (a reload
                # back to earlier settings keeps them again).
                for tls in current:
                    self.pool.revive(tls.identity)
                self._settings = (config, settings, current)
        found = settings.get(url)
        return found if found is not None else Backend(url)

    # --- several backends ------------------------------------------------------

    def upstreams(self, config):
        """The configured backends, each with its live state."""
        out = []
        for url in backend_urls(config):
            upstream = self._upstreams.get(url)
            if upstream is None:
                upstream = self._upstreams[url] = Upstream(url)
            out.append(upstream)
        return out

    def choose(self, config, exclude=()):
        """The least busy healthy backend (any backend when none is healthy)."""
        now = self.reactor.seconds()
        candidates = [u for u in self.upstreams(config) if u.url not in exclude]
        healthy = [u for u in candidates if u.down_until <= now] or candidates
        best = min(healthy, key=lambda u: (u.active, u.picks))
        best.picks += 1
        return best

    def mark_down(self, upstream, config, tls_reason=None):
        """
        C{upstream} failed: avoided for C{backend.health_interval}, said in
        the log once an outage (with C{tls_reason}, why its TLS handshake
        failed, if that is what happened), however often calls and health
        checks find it down again, until L{mark_up}.  (The line names no
        status: a call gets 502 or, for a timeout, 504.)
        """
        if not upstream.said_down:
            upstream.said_down = True
            several = len(backend_urls(config)) > 1
            if tls_reason is not None:
                then = "routing around it to the others" if several else "model calls fail until it is fixed"
                log.warn("Backend {url} failed TLS: {reason}; {then}", url=_display(upstream.url), reason=tls_reason, then=then)
            elif several:
                log.warn("Backend {url} is down; routing around it to the others", url=_display(upstream.url))
            else:
                log.warn("Backend {url} is not answering; model calls fail until it does", url=_display(upstream.url))
        upstream.down_until = self.reactor.seconds() + config.backend.health_interval

    def mark_up(self, upstream):
        """C{upstream} answered: used again, and when the log said it was down, one line says it answers again."""
        upstream.down_until = 0.0
        if upstream.said_down:
            upstream.said_down = False
            log.info("Backend {url} answers again", url=_display(upstream.url))

    async def send(self, config, method, path, body=None, deadline=None, lease=None, span=None):
        """
        Send one request and wait for Ollama's response headers, within the
        first-byte timeout.  When the chosen backend cannot be reached (no
        byte has gone anywhere yet), the lease moves to the next backend.

        @param lease: the L{Lease} from L{acquire}; without one, the least
            busy backend is used for this request alone.
        @param span: the call's span (tracing), or C{None}: it says which
            backend answered, and is the parent Ollama is told of (for a
            trace not sampled, the caller's span: Ollama still learns the
            trace, marked not sampled).
        @return: the L{twisted.web.iweb.IResponse}.
        @raise APIError: UPSTREAM_UNAVAILABLE or UPSTREAM_TIMEOUT.
        """
        tried = set()
        while True:
            upstream = lease.upstream if lease is not None else self.choose(config)
            trace_headers = self._traced(span, config, upstream) if span is not None else None
            try:
                response = await self._send_one(config, upstream.url, method, path, body, deadline, trace_headers)
            except BackendUnreachable as e:
                self.mark_down(upstream, config, e.tls_reason)
                tried.add(upstream.url)
                others = [u for u in self.upstreams(config) if u.url not in tried]
                if lease is None or not others:
                    raise e.error from None
                lease.move(self.choose(config, tried))
                continue
            self.mark_up(upstream)
            return response

    def _traced(self, span, config, upstream):
        """The backend C{span} goes to, on C{span}; the W3C headers that make it Ollama's parent."""
        if span.is_recording():
            parts = urllib.parse.urlsplit(upstream.url)
            urls = backend_urls(config)
            span.set_attributes(
                {
                    "server.address": parts.hostname or "",
                    "server.port": parts.port or (443 if parts.scheme == "https" else 80),
                    "clawdbot.backend": urls.index(upstream.url) if upstream.url in urls else -1,
                }
            )
        return self.tracing.headers(span)

    async def _send_one(self, config, base, method, path, body, deadline, trace_headers=None):
        """
        One request to the backend at C{base}: every call to a backend
        (model calls, health checks, looks at its models) is made here.
        Its headers are the gateway's own and the backend's configured
        ones (C{backend.headers}); nothing of the client's request (its
        C{Authorization}, its cookies) is ever among them.
        """
        backend = self.backend(config, base)
        headers = Headers({b"user-agent": [b"clawdbot"]})
        for name, value in backend.headers:
            headers.setRawHeaders(name, [value])
        for name, value in (trace_headers or {}).items():
            headers.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
        producer = None
        if body is not None:
            headers.setRawHeaders(b"content-type", [b"application/json"])
            producer = BytesProducer(body)
        url = (base.rstrip("/") + path).encode("utf-8")
        d = self.agent(config, backend.tls).request(method, url, headers, producer)
        now = self.reactor.seconds()
        wait = config.backend.first_byte_timeout
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - now))
        fired = []
        timer = self.reactor.callLater(wait, lambda: (fired.append(True), d.cancel()))
        # Whether the caller gave up (its client left): known here, not
        # guessed from the error the aborted request ends with.
        given_up = []
        waiting = Deferred(lambda _: (given_up.append(True), d.cancel()))

        def forward(result):
            if not waiting.called:
                (waiting.errback if isinstance(result, Failure) else waiting.callback)(result)
            elif not isinstance(result, Failure):
                result.deliverBody(Discard())  # answered after all: nobody reads it
            # (A failure after the caller gave up is the echo of that.)

        d.addBoth(forward)
        try:
            return await waiting
        except Exception as e:
            if fired:
                raise timed_out("the model backend did not answer in time") from None
            if given_up or isinstance(e, (CancelledError, ConnectingCancelledError)) or _cancelled(e):
                # The caller was cancelled (its client went away): not the
                # backend's fault.
                raise CancelledError() from None
            if isinstance(e, http1.HandshakeTimedOut):
                # Connected, but the TLS handshake never finished: a backend
                # that does not answer TLS on this port (a plain HTTP server
                # waits for a request line the ClientHello never ends).
                reason = f"the TLS handshake timed out (no answer within backend.connect_timeout, {e.seconds:g}s: is it a TLS port, is the URL's scheme right?)"
                raise BackendUnreachable(timed_out(HANDSHAKE_TIMED_OUT), tls_reason=reason) from None
            if isinstance(e, http1.EndpointError):
                # (The config checks host names as TLS encodes them; this is the last resort.)
                reason = "the connection cannot be set up: its host name or backend.tls.server_name cannot be used for TLS"
                raise BackendUnreachable(unavailable(SETUP_FAILED), tls_reason=reason) from None
            if isinstance(e, TimeoutError):
                raise BackendUnreachable(timed_out("connecting to the model backend timed out")) from None
            if isinstance(e, (ConnectError, DNSLookupError, ResponseNeverReceived)):
                tls = tls_failure(e)
                if tls is not None:
                    # A failed TLS handshake (a certificate refused either
                    # way) counts as the backend being unreachable: nothing
                    # reached Ollama, so the call moves to the next backend,
                    # and this one is marked down (the log says why, once)
                    # until a health check or a later call finds it verified
                    # again.  It is never retried without verification.
                    details, reason = tls
                    raise BackendUnreachable(unavailable(details), tls_reason=reason) from None
                raise BackendUnreachable(unavailable()) from None
            if isinstance(e, ResponseFailed):
                raise unavailable("the model backend closed the connection") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def read(self, response, on_data, config, deadline):
        """Deliver C{response}'s body to C{on_data} chunk by chunk; see L{BodyReader}."""
        reader = BodyReader(self.reactor, on_data, config.backend.idle_timeout, deadline)
        response.deliverBody(reader)
        return reader

    async def collect(self, response, config, deadline, limit=MAX_REPLY):
        """The whole body of a (non-streamed) response."""
        parts = []
        size = [0]

        def on_data(data):
            size[0] += len(data)
            if size[0] > limit:
                raise unavailable("the model backend's reply is too large")
            parts.append(data)

        reader = await self.read(response, on_data, config, deadline)
        await reader.finished
        return b"".join(parts)

    async def call(self, config, method, path, payload=None, sent=None, deadline=None, share=ANONYMOUS, model_slot=True):
        """
        A complete exchange with a JSON request: the slot, the timeouts and
        the error mapping included.

        @param sent: called once the call has its slot and goes to Ollama,
            and with C{False} when Ollama refuses it (a status other than 200).
        @param deadline: when the call must be over (reactor seconds);
            C{timeout} from now by default.  Calls made for one request
            share the request's.
        @param share: whose call it is, for the fair queue (L{Slots}).
        @param model_slot: take the slot of the model the payload names when
            C{backend.model_limits} caps it; C{False} for a look at a model
            (C{/api/show}) that does not use it, so it never waits behind
            that model's replies.
        @return: the raw body of a 200 answer.
        """
        if deadline is None:
            deadline = self.reactor.seconds() + config.timeout
        lease = await self.acquire(config, share, payload_model(payload) if model_slot else None)
        if sent is not None:
            sent()
        span = self._call_span(share, method, path, payload)
        try:
            body = None if payload is None else json.dumps(payload).encode("utf-8")
            response = await self.send(config, method, path, body, deadline, lease, span or share.span)
            self._first_byte(span, response)
            raw = await self.collect(response, config, deadline)
            if response.code != 200:
                if sent is not None:
                    sent(False)
                raise upstream_error(response.code, raw, payload)
        except BaseException as e:
            self._call_failed(span, e)
            raise
        finally:
            self.release(config, lease)
            if span is not None:
                span.end()
        return raw

    async def stream(self, config, path, payload, consumer, transform, on_end=None, sent=None, share=ANONYMOUS):
        """
        Send C{payload} (a JSON body) to Ollama at C{path} and stream its
        reply into C{consumer} as it comes, each chunk through
        C{transform(bytes) -> bytes}, with the backend connection as the
        consumer's producer (a slow client slows the read from Ollama; a
        client that leaves drops it).

        Errors before the first byte raise L{APIError} (the caller answers
        them whole); after it they end the stream (C{consumer.fail}).

        @param consumer: the response being written (an L{IStreamConsumer}
            provider, see L{clawdbot.http.resource.StreamResponse}).
        @param on_end: C{async () -> bytes}, what to write when the body
            ends; it raises L{APIError} when the body ended too early.
        @param sent: called once the call has its slot and goes to Ollama,
            and with C{False} when Ollama refuses it.
        @return: C{True} when the reply completed.
        """
        clock = self.reactor
        started = clock.seconds()
        deadline = started + config.timeout
        lease = await self.acquire(config, share, payload_model(payload))
        if sent is not None:
            sent()
        span = self._call_span(share, b"POST", path, payload)
        try:
            response = await self.send(config, b"POST", path, json.dumps(payload, ensure_ascii=False).encode("utf-8"), deadline, lease, span or share.span)
            self._first_byte(span, response)
            consumer.responded(clock.seconds() - started)
            if response.code != 200:
                if sent is not None:
                    sent(False)
                raw = await self.collect(response, config, deadline, limit=1024 * 1024)
                raise upstream_error(response.code, raw, payload)
            consumer.begin()

            def deliver(data):
                out = transform(data)
                if out:
                    consumer.write(out)

            reader = await self.read(response, deliver, config, deadline)
            consumer.registerProducer(reader.transport, True)
            try:
                await reader.finished
            except APIError as err:
                ok, error = False, err
            else:
                ok, error = True, None
            finally:
                consumer.unregisterProducer()
            tail = b""
            if ok and on_end is not None:
                try:
                    tail = await on_end()
                except APIError as err:
                    ok, error = False, err
            if ok:
                consumer.end(tail)
            else:
                self._call_failed(span, error)
                consumer.fail(error)
            return ok
        except BaseException as e:
            self._call_failed(span, e)
            raise
        finally:
            consumer.close()
            self.release(config, lease)
            if span is not None:
                span.end()

    def _call_span(self, share, method, path, payload):
        """
        The span of one call to Ollama (kind CLIENT) under the caller's, or
        C{None} when the caller is not traced: named as the GenAI
        conventions name an inference call ("chat qwen3:32b"), else by its
        method and path.
        """
        if share.span is None or self.tracing is None or not share.span.is_recording():
            return None
        operation = OPERATIONS.get(path)
        model = payload_model(payload)
        if model is not None and len(model) > MAX_NAME:
            model = model[: MAX_NAME - 1] + "…"  # (a client's string: a span stays small)
        name = f"{operation} {model}" if operation and model else f"{method.decode('ascii')} {path}"
        attributes = {"gen_ai.system": "ollama", "gen_ai.operation.name": operation, "gen_ai.request.model": model} if operation else {}
        return self.tracing.child(share.span, name, self.tracing.CLIENT, {k: v for k, v in attributes.items() if v is not None})

    @staticmethod
    def _first_byte(span, response):
        if span is not None:
            span.add_event("first_byte", {"http.response.status_code": response.code})

    def _call_failed(self, span, error):
        if span is not None:
            code = error.code if isinstance(error, APIError) else "CANCELLED" if isinstance(error, CancelledError) else type(error).__name__
            self.tracing.failed(span, code)

    async def call_json(self, config, method, path, payload=None, sent=None, deadline=None, share=ANONYMOUS, model_slot=True):
        """L{call}, with the answer parsed as JSON."""
        raw = await self.call(config, method, path, payload, sent, deadline, share, model_slot)
        try:
            return loads_checked(raw)
        except ValueError:
            raise unavailable("the model backend sent a malformed reply") from None

    async def acquire(self, config, share=ANONYMOUS, model=None):
        """
        A slot under the concurrency cap (fairly shared, L{Slots}), on the
        least busy backend; for a model that C{backend.model_limits} caps,
        first one of that model's own slots.
        """
        limits = config.limits
        cap = model_cap(config, model)
        model_slots = None
        if cap:
            model_slots = self.model_slots.get(model)
            if model_slots is None:
                model_slots = self.model_slots[model] = Slots(self.reactor)
            await model_slots.acquire(cap, limits.max_queue, limits.queue_timeout, share, limits.per_user_concurrency)
        try:
            await self.slots.acquire(config.max_connections, limits.max_queue, limits.queue_timeout, share, limits.per_user_concurrency)
        except BaseException:
            if model_slots is not None:
                model_slots.release(cap, share, limits.per_user_concurrency)
            raise
        return Lease(self.choose(config), share, model_slots)

    def release(self, config, lease):
        lease.end()
        per_user = config.limits.per_user_concurrency
        self.slots.release(config.max_connections, lease.share, per_user)
        if lease.model_slots is not None:
            # (A reload that lifted the cap lets every waiter in.)
            model = next((m for m, s in self.model_slots.items() if s is lease.model_slots), None)
            lease.model_slots.release(model_cap(config, model) or config.max_connections, lease.share, per_user)

    async def check_one(self, config, upstream):
        """
        C{None} when this backend answers C{/api/version}, else a short
        reason: it has C{backend.connect_timeout} to connect (over https,
        the TLS handshake included, whose failure is logged with its
        reason) and as long again to answer.
        """
        deadline = self.reactor.seconds() + 2 * config.backend.connect_timeout
        try:
            response = await self._send_one(config, upstream.url, b"GET", "/api/version", None, deadline)
            await self.collect(response, config, deadline, limit=65536)
        except BackendUnreachable as e:
            self.mark_down(upstream, config, e.tls_reason)
            return "not reachable (timed out)" if e.error.code == "UPSTREAM_TIMEOUT" else "not reachable"
        except APIError as e:
            if e.code == "UPSTREAM_TIMEOUT":
                # No answer within the check's time (a connection or a TLS
                # handshake that hangs too): down, as if unreachable.
                self.mark_down(upstream, config)
                return "not reachable (timed out)"
            return "not reachable"
        if response.code != 200:
            return f"answered status {response.code}"
        self.mark_up(upstream)
        return None

    async def loaded(self, config, upstream, timeout):
        """
        What one backend has loaded (its C{/api/ps}, parsed), asked outside
        the slots: an operator's look must not wait behind the users' calls.

        @raise APIError: when it cannot say within C{timeout} seconds.
        """
        deadline = self.reactor.seconds() + timeout
        try:
            response = await self._send_one(config, upstream.url, b"GET", "/api/ps", None, deadline)
            body = await self.collect(response, config, deadline, limit=1 << 20)
        except BackendUnreachable as e:
            # Seen unreachable: marked down, as a health check would.
            self.mark_down(upstream, config, e.tls_reason)
            raise e.error from None
        if response.code != 200:
            raise APIError("UPSTREAM_UNAVAILABLE", details=f"answered status {response.code}")
        try:
            return loads_checked(body)
        except ValueError:
            raise APIError("UPSTREAM_UNAVAILABLE", details="the model backend sent a malformed reply") from None

    async def check(self):
        """
        C{None} when at least one backend answers, else a short reason.
        Every backend is checked, so this doubles as the health check.
        """
        config = self.current_config()
        reasons = []
        for upstream in self.upstreams(config):
            reasons.append(await self.check_one(config, upstream))
        if any(r is None for r in reasons):
            return None
        return reasons[0] if len(reasons) == 1 else f"no backend reachable ({reasons[0]})"

    def status(self, config):
        """Per-backend state for /readyz, without addresses."""
        now = self.reactor.seconds()
        return [{"backend": i, "up": u.down_until <= now, "active": u.active} for i, u in enumerate(self.upstreams(config))]

    def close(self):
        return self.pool.closeCachedConnections()


def ollama_error_text(raw):
    try:
        value = loads_checked(raw)
    except ValueError:
        return ""
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"]
    return ""


def upstream_error(status, raw, payload=None):
    """The L{APIError} for a non-200 answer from Ollama."""
    text = ollama_error_text(raw).lower()
    model = payload_model(payload)
    if status == 404 and ("not found" in text or model):
        return APIError("MODEL_NOT_FOUND", details=f"model '{model}' is not available" if model else "model is not available")
    if 400 <= status < 500:
        return APIError("INVALID_REQUEST", details=f"the model backend refused the request (status {status})")
    return unavailable(f"the model backend failed (status {status})")

