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
import logging
import threading
import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.logger import Logger

log = Logger(namespace="clawdbot.tracing")

# Seconds a span waits for its batch to fill before the batch goes anyway.
EXPORT_DELAY = 1.0
# Spans in one export, at most.
BATCH = 512
# Seconds one export may take (the collector's answer included).
EXPORT_TIMEOUT = 5.0
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
    seconds.

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
        self._thread = threading.Thread(target=self._run, name="clawdbot-traces", daemon=True)
        self._thread.start()

    def on_start(self, span, parent_context=None):
        pass

    def on_end(self, span):
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
            if batch:
                try:
                    result = self.exporter.export(batch)
                except Exception:
                    result = SpanExportResult.FAILURE
                if result is not SpanExportResult.SUCCESS:
                    self.failed(len(batch))

    def shutdown(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(SHUTDOWN_WAIT)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis=30000):
        return True


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
        self._provider = None
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
        old, self._provider, self.tracer = self._provider, None, None
        if tracing.enabled:
            exporter = OTLPSpanExporter(endpoint=tracing.endpoint, headers=dict(tracing.headers), timeout=EXPORT_TIMEOUT)
            provider = TracerProvider(
                sampler=ParentBased(TraceIdRatioBased(tracing.sample_rate)),
                resource=Resource.create({"service.name": tracing.service_name}),
                shutdown_on_exit=False,
            )
            provider.add_span_processor(Exporting(exporter, tracing.queue, self._dropped, self._failed))
            self._provider = provider
            self.tracer = provider.get_tracer("clawdbot")
        if old is not None:
            threading.Thread(target=old.shutdown, name="clawdbot-traces-stop", daemon=True).start()

    def stop(self):
        """Send what is queued (for at most a few seconds) and stop; call from a thread."""
        provider, self._provider, self.tracer = self._provider, None, None
        self._settings = None
        if provider is not None:
            provider.shutdown()

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
        for key in ("traceparent", "tracestate"):
            value = _header(request, key.encode("ascii"))
            if value is not None:
                carrier[key] = value
        context = _PROPAGATOR.extract(carrier) if carrier else None
        return self.tracer.start_span(name, context=context, kind=SERVER)

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
