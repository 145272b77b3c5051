"""
OpenTelemetry traces (C{tracing.*}): one server span per request, its
children (authentication, the wait for a backend slot, the backend call,
storage), the W3C trace context taken from the client and passed on to
Ollama, and the spans sent by OTLP over HTTP to a collector.

Sending never touches a request: an ended span goes into a bounded queue
(L{Exporting}) in constant time, and a thread of its own sends the queue
in batches.  When the collector is slow or down the queue fills and further
spans are dropped and counted (C{clawdbot_trace_spans_dropped_total});
the requests do not wait.

With C{tracing.enabled: false} (the default) nothing here runs: no
provider, no thread, no span objects.
"""

import collections
import hashlib
import logging
import os
import threading
import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, Status, StatusCode, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.logger import Logger

log = Logger(namespace="clawdbot.tracing")

# Seconds a span waits for its batch to fill before the batch goes anyway.
EXPORT_DELAY = 1.0
# Spans in one export, at most.
BATCH = 256
# Seconds one export may take (the collector's answer included).
EXPORT_TIMEOUT = 5.0
# Characters of one attribute value at most (captured content is cut by the
# route before, see MAX_CONTENT): a span stays small, so a batch does.
MAX_ATTRIBUTE = 64 * 1024
# Messages or a reply captured (tracing.capture_content) up to this many
# characters of JSON; a longer one is described by its size, as the access
# log does (a cut document could not be redacted).
MAX_CONTENT = 32 * 1024
# Characters of a value a client chose (a model's name, a session id, a
# path) in a span's name or attributes, at most: a span stays a few KB.
MAX_CLIENT_TEXT = 256


def short(text):
    """C{text} (a value a client chose) cut to L{MAX_CLIENT_TEXT} characters; C{None} stays C{None}."""
    if text is None or len(text) <= MAX_CLIENT_TEXT:
        return text
    return text[: MAX_CLIENT_TEXT - 1] + "…"


# A client's tracestate passed on only up to this (W3C's advice for a header
# of 32 entries); a longer one is left out.
MAX_TRACESTATE = 512
# Seconds the gateway's stop waits for the last spans to go out, at most.
SHUTDOWN_WAIT = 3.0
# Seconds between two log lines about failing exports.
FAILURE_LOG_INTERVAL = 60.0

SERVER, CLIENT, INTERNAL = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL

# The path template of each route (by the name metrics and logs use), for a
# server span's name and C{http.route}, as the HTTP conventions name them.
ROUTES = {
    "chat_completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "models": "/v1/models",
    "model": "/v1/models/{model}",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "response": "/v1/responses/{id}",
    "messages": "/v1/messages",
    "count_tokens": "/v1/messages/count_tokens",
    "sessions": "/v1/sessions",
    "session": "/v1/sessions/{id}",
    "session_truncate": "/v1/sessions/{id}/truncate",
    "session_fork": "/v1/sessions/{id}/fork",
    "session_stop": "/v1/sessions/{id}/stop",
    "session_export": "/v1/sessions/{id}/export",
    "keys": "/v1/keys",
    "key": "/v1/keys/{id}",
    "admin_keys": "/v1/admin/keys",
    "admin_key": "/v1/admin/keys/{id}",
    "usage": "/v1/usage",
    "admin_status": "/v1/admin/status",
    "admin_usage": "/v1/admin/usage",
    "admin_users": "/v1/admin/users",
    "admin_audit": "/v1/admin/audit",
    "ollama_native": "/ollama/api/{endpoint}",
    "healthz": "/healthz",
    "readyz": "/readyz",
    "metrics": "/metrics",
    "me": "/v1/me",
}

_PROPAGATOR = TraceContextTextMapPropagator()

# The exporter logs each failure (with the collector's answer) through the
# standard logging module; the gateway counts them and says so itself.
logging.getLogger("opentelemetry.exporter.otlp.proto.http").disabled = True
logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").disabled = True


class Exporting(SpanProcessor):
    """
    Ended spans to a queue of at most C{size}; a thread sends them to
    C{exporter} in batches of L{BATCH}, at least every L{EXPORT_DELAY}
    seconds.  One for the gateway's life: a reload swaps its C{exporter}
    and C{size}, so spans that end after a reload (a long stream's) are
    sent, not lost with an old queue.  The thread starts with the first
    span (and again in a forked child: C{twistd} without C{-n} forks after
    the service is made).

    @param dropped: called (from the reactor thread) for each span the full
        queue refused.
    @param failed: called (from the exporting thread) with the spans of a
        batch the collector did not take.
    """

    def __init__(self, exporter, size, dropped, failed):
        self.exporter = exporter
        self.size = size
        self.dropped = dropped
        self.failed = failed
        self._queue = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = None
        self._pid = None

    def _start(self):
        self._pid = os.getpid()
        self._wake = threading.Condition()  # (a lock held in the parent at the fork is not ours)
        self._thread = threading.Thread(target=self._run, name="clawdbot-traces", daemon=True)
        self._thread.start()

    def on_start(self, span, parent_context=None):
        pass

    def on_end(self, span):
        if self._pid != os.getpid() and not self._stopping:
            self._start()
        with self._wake:
            if len(self._queue) >= self.size:
                full = True
            else:
                full = False
                self._queue.append(span)
                if len(self._queue) >= BATCH:
                    self._wake.notify()
        if full:
            self.dropped()

    def _run(self):
        while True:
            with self._wake:
                if len(self._queue) < BATCH and not self._stopping:
                    self._wake.wait(EXPORT_DELAY)
                if not self._queue and self._stopping:
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                exporter = self.exporter
            if batch:
                try:
                    result = exporter.export(batch)
                except Exception:
                    result = SpanExportResult.FAILURE
                if result is not SpanExportResult.SUCCESS:
                    self.failed(len(batch))

    def replace(self, exporter, size):
        """Send with C{exporter} from now on (the old one is shut down off this thread), keeping at most C{size}."""
        with self._wake:
            old, self.exporter, self.size = self.exporter, exporter, size
        threading.Thread(target=old.shutdown, name="clawdbot-traces-stop", daemon=True).start()

    def shutdown(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(SHUTDOWN_WAIT)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis=30000):
        return True


class KeyedRatio(Sampler):
    """
    Keeps C{rate} of traces, decided by a keyed hash of the trace id (the
    key a secret of this process): the same trace is kept or dropped whole,
    but a client that picks its trace id (in a C{traceparent}) cannot pick
    one that is kept, as it could against a plain ratio of the id's bits.
    """

    def __init__(self, rate):
        self.rate = rate
        self._bound = int(rate * 2**64)
        self._key = os.urandom(16)

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        digest = hashlib.blake2b(trace_id.to_bytes(16, "big"), key=self._key, digest_size=8).digest()
        if int.from_bytes(digest, "big") < self._bound:
            state = get_current_span(parent_context).get_span_context().trace_state if parent_context is not None else None
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)
        return SamplingResult(Decision.DROP)

    def get_description(self):
        return f"KeyedRatio{{{self.rate}}}"


def _settings(tracing):
    """What a change of which rebuilds the exporter."""
    return (tracing.enabled, tracing.endpoint, tracing.sample_rate, tracing.service_name, tuple(sorted(tracing.headers.items())), tracing.queue)


def _header(request, name):
    values = request.requestHeaders.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def trace_id(span):
    """A span's trace id as 32 lowercase hex digits."""
    return format(span.get_span_context().trace_id, "032x")


class Tracing:
    """
    The gateway's tracer, as the config says: L{configure} at start and on
    every reload (a changed C{tracing} section replaces the exporter; the
    old one sends what it holds and stops on a thread of its own).

    @param metrics: C{() -> Metrics} (L{clawdbot.ops.observe.Metrics}), for
        the dropped and failed counts.
    @param reactor: for logging from the exporting thread.
    """

    SERVER, CLIENT, INTERNAL = SERVER, CLIENT, INTERNAL

    def __init__(self, reactor, metrics):
        self.reactor = reactor
        self.metrics = metrics
        self.tracer = None
        self.capture_content = False
        self._exporting = None
        self._settings = None
        self._last_failure_log = 0.0

    @property
    def enabled(self):
        return self.tracer is not None

    def configure(self, config):
        tracing = config.tracing
        self.capture_content = tracing.enabled and tracing.capture_content
        settings = _settings(tracing)
        if settings == self._settings:
            return
        self._settings = settings
        self.tracer = None
        if not tracing.enabled:
            return
        exporter = OTLPSpanExporter(endpoint=tracing.endpoint, headers=dict(tracing.headers), timeout=EXPORT_TIMEOUT)
        if self._exporting is None:
            self._exporting = Exporting(exporter, tracing.queue, self._dropped, self._failed)
        else:
            self._exporting.replace(exporter, tracing.queue)
        # Sampled by the trace id alone (keyed), the client's sampled flag
        # set aside: spans begin before anyone is authenticated, and a flag
        # (or an id) anyone may send must not make the gateway record (and
        # send) every request.  A client's trace id and parent are kept.
        provider = TracerProvider(
            sampler=KeyedRatio(tracing.sample_rate),
            resource=Resource.create({"service.name": tracing.service_name}),
            shutdown_on_exit=False,
            span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE, max_attributes=64, max_events=16),
        )
        # (A provider replaced by a reload is dropped, not shut down: the
        # spans it made still end into the one queue.)
        provider.add_span_processor(self._exporting)
        self.tracer = provider.get_tracer("clawdbot")

    def stop(self):
        """Send what is queued (for at most a few seconds) and stop; call from a thread."""
        self.tracer, self._settings = None, None
        exporting, self._exporting = self._exporting, None
        if exporting is not None:
            exporting.shutdown()

    def _dropped(self):
        self.metrics().trace_spans_dropped.inc()

    def _failed(self, spans):
        self.metrics().trace_exports_failed.inc()
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL:
            self._last_failure_log = now
            self.reactor.callFromThread(log.warn, "Could not send {spans} spans to the trace collector (tracing.endpoint); counting failures in clawdbot_trace_exports_failed_total", spans=spans)

    # --- spans -------------------------------------------------------------------

    def server_span(self, request, name):
        """
        The server span of C{request}, its parent the client's
        C{traceparent} (and C{tracestate}) when they are valid; C{None} when
        tracing is off.
        """
        if self.tracer is None:
            return None
        carrier = {}
        parent = _header(request, b"traceparent")
        if parent is not None:
            carrier["traceparent"] = parent
            state = _header(request, b"tracestate")
            if state is not None and len(state) <= MAX_TRACESTATE:
                carrier["tracestate"] = state
        context = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(name, context=context, kind=SERVER)
        # (An SDK switched off from the environment, OTEL_SDK_DISABLED, makes spans with no ids.)
        return span if span.get_span_context().is_valid else None

    def child(self, parent, name, kind=INTERNAL, attributes=None, start_time=None):
        """
        A span under C{parent}; C{None} when C{parent} is C{None} or not
        recorded (a trace not sampled: its children would not be either,
        and making them costs a request several microseconds), so callers
        need not ask whether tracing is on.
        """
        if parent is None or self.tracer is None or not parent.is_recording():
            return None
        return self.tracer.start_span(name, context=set_span_in_context(parent), kind=kind, attributes=attributes, start_time=start_time)

    @staticmethod
    def headers(span):
        """The W3C trace context headers that make C{span} the parent of the next hop's spans."""
        carrier = {}
        _PROPAGATOR.inject(carrier, context=set_span_in_context(span))
        return carrier

    @staticmethod
    def failed(span, code):
        """Mark C{span} (maybe C{None}) as failed with the error code C{code}."""
        if span is not None and span.is_recording():
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, code))

    @staticmethod
    def end(span, attributes=None, end_time=None):
        """End C{span} (maybe C{None}), with C{attributes} set first (C{None} values left out)."""
        if span is None:
            return
        if attributes and span.is_recording():
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        span.end(end_time=end_time)
