"""
An OTLP/HTTP trace receiver (a collector's traces endpoint) for tests and
the benchmark.

Tests start it in-process on a loopback port with the real reactor::

    receiver = OTLPReceiver()
    receiver.listen(reactor)          # binds 127.0.0.1:0
    self.addCleanup(receiver.stop)    # stop() returns a Deferred
    ... point the exporter at receiver.endpoint (receiver.url + "/v1/traces") ...
    span = await receiver.wait_for(lambda spans: first(spans, name="POST /v1/chat/completions"))

and the benchmark runs it as its own process::

    python -m testing.otlp_receiver --port 4318

What it does follows the OpenTelemetry protocol specification, "OTLP/HTTP":

  - C{POST /v1/traces} with C{Content-Type: application/x-protobuf}, the
    body an C{ExportTraceServiceRequest} (gzip- or deflate-compressed when
    C{Content-Encoding} says so), decoded with the C{opentelemetry-proto}
    package.
  - Full success is C{200} with an (empty) C{ExportTraceServiceResponse} as
    C{application/x-protobuf}; a body it cannot read is C{400}, another
    content type C{415}, another path C{404}, another method C{405}, each
    with a C{google.rpc.Status} body.
  - Every request is recorded as an L{Export} (headers, body, the status
    answered); the spans of the ones accepted (C{200}) are L{spans}, as plain
    Python objects (L{Span}, L{Event}): ids as lower-case hex, attribute
    values as Python values (arrays as lists, key-value lists as dicts).

To test an exporter against an outage it can misbehave: L{refuse} (stop
listening and drop its connections: connection refused), L{hang} (read the
request and never answer), L{status} (answer an error status such as 503);
L{accept} brings it back (answering what L{hang} held).
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

PROTOBUF = b"application/x-protobuf"
TRACES_PATH = b"/v1/traces"


@dataclass
class Event:
    """A span event: its name, attributes and time (ns since the epoch)."""

    name: str
    attributes: dict
    time_ns: int = 0


@dataclass
class Span:
    """
    One span as received.

    @ivar trace_id: 32 lower-case hex digits.
    @ivar span_id: 16 lower-case hex digits.
    @ivar parent_span_id: 16 lower-case hex digits, or C{""} for a root.
    @ivar kind: C{"INTERNAL"}, C{"SERVER"}, C{"CLIENT"}, C{"PRODUCER"},
        C{"CONSUMER"} or C{"UNSPECIFIED"}.
    @ivar attributes: names to Python values (C{str}, C{bool}, C{int},
        C{float}, C{bytes}, lists of those, dicts for key-value lists).
    @ivar status_code: C{"UNSET"}, C{"OK"} or C{"ERROR"}.
    @ivar resource: the resource's attributes (C{service.name}, ...).
    @ivar scope: the instrumentation scope's name.
    """

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    attributes: dict
    events: list
    status_code: str
    status_message: str
    resource: dict
    scope: str
    trace_state: str = ""
    flags: int = 0
    start_ns: int = 0
    end_ns: int = 0
    links: list = field(default_factory=list)

    def event(self, name):
        """The first event called C{name}, or C{None}."""
        return next((e for e in self.events if e.name == name), None)


@dataclass
class Export:
    """
    One request the receiver read.

    @ivar headers: lower-cased header names to values (repeats joined by
        C{", "}).
    @ivar raw: the body as received; L{body} is it decompressed.
    @ivar status: the status answered; C{None} while L{hang} holds it, or
        when the client left before it was answered.
    @ivar spans: the spans it carried (decoded whatever the answer was).
    """

    method: str
    path: str
    headers: dict
    raw: bytes
    body: bytes = b""
    status: Optional[int] = None
    spans: list = field(default_factory=list)
    error: Optional[str] = None

    @property
    def accepted(self) -> bool:
        return self.status == 200


def any_value(value) -> Any:
    """An OTLP C{AnyValue} as a Python value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def attributes(pairs) -> dict:
    """OTLP C{KeyValue}s as a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


def decode_spans(request) -> list:
    """The L{Span}s of an C{ExportTraceServiceRequest}."""
    from opentelemetry.proto.trace.v1 import trace_pb2

    kinds = trace_pb2.Span.SpanKind
    codes = trace_pb2.Status.StatusCode
    out = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=kinds.Name(s.kind).removeprefix("SPAN_KIND_"),
                        attributes=attributes(s.attributes),
                        events=[Event(e.name, attributes(e.attributes), e.time_unix_nano) for e in s.events],
                        status_code=codes.Name(s.status.code).removeprefix("STATUS_CODE_"),
                        status_message=s.status.message,
                        resource=resource,
                        scope=scope_spans.scope.name,
                        trace_state=s.trace_state,
                        flags=s.flags,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        links=[(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes)) for link in s.links],
                    )
                )
    return out


def first(spans, name=None, kind=None, trace_id=None, parent=None, **attrs):
    """
    The first span of C{spans} that has C{name}, C{kind}, C{trace_id}, the
    parent span id C{parent} and the attribute values C{attrs} (dots in
    attribute names written as C{__}: C{clawdbot__request_id=...}), each
    when given; C{None} if none has.
    """
    return next(iter(matching(spans, name, kind, trace_id, parent, **attrs)), None)


def matching(spans, name=None, kind=None, trace_id=None, parent=None, **attrs):
    """Every span of C{spans} that L{first} would accept, in order."""
    wanted = {k.replace("__", "."): v for k, v in attrs.items()}
    return [
        s
        for s in spans
        if (name is None or s.name == name)
        and (kind is None or s.kind == kind)
        and (trace_id is None or s.trace_id == trace_id)
        and (parent is None or s.parent_span_id == parent)
        and all(s.attributes.get(k) == v for k, v in wanted.items())
    ]


def _rpc_status(code, message) -> bytes:
    """A C{google.rpc.Status} body, the error body OTLP/HTTP asks for."""
    try:
        from google.rpc import status_pb2
    except ImportError:  # the exporter package brings it; plain text otherwise
        return message.encode()
    return status_pb2.Status(code=code, message=message).SerializeToString()


class _Traces(Resource):
    isLeaf = True

    def __init__(self, receiver: "OTLPReceiver"):
        super().__init__()
        self.receiver = receiver

    def render(self, request):
        return self.receiver._handle(request)


class OTLPReceiver:
    """
    An OTLP/HTTP receiver for traces: a twisted.web site plus what it
    received.

    @param keep: keep every L{Export} and L{Span} (C{False}: only count
        them, for a long benchmark run).
    @ivar exports: every L{Export} read, in arrival order.
    @ivar span_count: spans in accepted exports so far (kept or not).
    @ivar mode: C{"accept"}, C{"refuse"}, C{"hang"} or C{"status"}.
    """

    def __init__(self, keep: bool = True):
        self.keep = keep
        self.exports: list[Export] = []
        self.export_count = 0
        self.span_count = 0
        self.mode = "accept"
        self.error_status = 503
        self.retry_after: Optional[str] = None
        self._held: list = []  # (request, Export) that hang() keeps unanswered
        self._waiters: list = []  # (predicate, Deferred, timer)
        self._reactor = None
        self._port = None
        self._port_number = None
        self._interface = "127.0.0.1"
        self._holder: Optional[socket.socket] = None
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"traces", _Traces(self))
        self.site = Site(root)
        self.site.displayTracebacks = False
        self.site.noisy = False
        self.factory = WrappingFactory(self.site)
        self.factory.noisy = False

    # -- wiring ---------------------------------------------------------

    def listen(self, reactor=None, port: int = 0, interface: str = "127.0.0.1"):
        """
        Listen on C{interface:port} (default a free loopback port); returns
        the listening port.  L{url} then gives the base URL, L{endpoint}
        the traces URL.
        """
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._interface = interface
        self._port = reactor.listenTCP(port, self.factory, interface=interface)
        self._port_number = self._port.getHost().port
        return self._port

    @property
    def port(self) -> int:
        return self._port_number

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:PORT}, with no trailing slash (also while refusing)."""
        return f"http://{self._interface}:{self._port_number}"

    @property
    def endpoint(self) -> str:
        """The full traces URL, C{url + "/v1/traces"}: what an exporter is pointed at."""
        return self.url + TRACES_PATH.decode()

    def stop(self) -> defer.Deferred:
        """
        Stop listening, drop every connection (held requests included) and
        give up waiting; the Deferred fires once the port is closed.
        """
        waits = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
            self._port = None
        self._release_holder()
        self._held = []
        self._drop_connections()
        for _, d, timer in self._waiters:
            if timer.active():
                timer.cancel()
        self._waiters = []
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- behaviours -----------------------------------------------------

    def accept(self) -> None:
        """
        Behave again: listen again after L{refuse}, answer 200 to the
        requests L{hang} held (whose clients are still there) and to every
        one that follows.
        """
        self.mode = "accept"
        if self._port is None and self._reactor is not None:
            self._port = self._reactor.listenTCP(self._port_number, self.factory, interface=self._interface)
            self._release_holder()
        held, self._held = self._held, []
        for request, export in held:
            if not request._disconnected:
                self._answer_ok(request, export)
        self._check()

    def refuse(self) -> defer.Deferred:
        """
        Stop listening and drop open connections (an exporter's kept-alive
        one too), so that connecting is refused until L{accept}; the port
        stays reserved for this receiver meanwhile (bound, never listening).
        Fires once the port is closed.
        """
        self.mode = "refuse"
        port, self._port = self._port, None
        self._drop_connections()
        if port is None:
            return defer.succeed(None)

        def hold(_):
            # A socket bound with SO_REUSEADDR and never listening: the
            # system hands the port to no one else, connections to it are
            # refused, and accept() can listen on it again.
            holder = socket.socket()
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind((self._interface, self._port_number))
            self._holder = holder

        return defer.maybeDeferred(port.stopListening).addCallback(hold)

    def hang(self) -> None:
        """Read each request and never answer it (until L{accept} or the client leaves)."""
        self.mode = "hang"

    def status(self, code: int = 503, retry_after: Optional[str] = None) -> None:
        """Answer every request with C{code} (and a C{Retry-After} header when given)."""
        self.mode = "status"
        self.error_status = code
        self.retry_after = retry_after

    @property
    def held(self) -> list:
        """The L{Export}s that L{hang} holds unanswered and whose clients are still there."""
        return [export for request, export in self._held if not request._disconnected]

    # -- what was received ------------------------------------------------

    @property
    def spans(self) -> list:
        """Every L{Span} of the accepted exports so far, in arrival order."""
        return [s for e in self.exports if e.accepted for s in e.spans]

    @property
    def bodies(self) -> list:
        """The decompressed body of every export read (accepted or not)."""
        return [e.body for e in self.exports]

    def trace(self, trace_id: str) -> list:
        """The accepted spans of one trace."""
        return [s for s in self.spans if s.trace_id == trace_id]

    def children(self, span: Span) -> list:
        """The accepted spans whose parent is C{span}."""
        return [s for s in self.spans if s.trace_id == span.trace_id and s.parent_span_id == span.span_id]

    def wait_for(self, predicate: Callable[[list], Any], timeout: float = 10.0, what: Optional[str] = None) -> defer.Deferred:
        """
        A Deferred firing with C{predicate(spans)} once that is true
        (looked at now and after every export read), or failing with an
        C{AssertionError} after C{timeout} seconds.
        """
        return self._wait(lambda: predicate(self.spans), timeout, what or "the spans awaited")

    def when_exports(self, count: int, timeout: float = 10.0, accepted: bool = False) -> defer.Deferred:
        """A Deferred firing with L{exports} once C{count} were read (C{accepted}: answered 200)."""

        def enough():
            seen = [e for e in self.exports if e.accepted] if accepted else self.exports
            return seen if len(seen) >= count else None

        return self._wait(enough, timeout, f"{count} exports")

    def _wait(self, check, timeout, what) -> defer.Deferred:
        value = check()
        if value:
            return defer.succeed(value)
        d = defer.Deferred()
        entry = []

        def expire():
            self._waiters.remove(entry[0])
            found = [e.spans for e in self.exports]
            d.errback(
                AssertionError(
                    f"{what} did not arrive within {timeout} s; {len(self.exports)} exports, statuses "
                    f"{[e.status for e in self.exports]}, spans {[s.name for batch in found for s in batch]}"
                )
            )

        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        entry.append((check, d, reactor.callLater(timeout, expire)))
        self._waiters.append(entry[0])
        return d

    def _check(self) -> None:
        for entry in list(self._waiters):
            check, d, timer = entry
            value = check()
            if value:
                self._waiters.remove(entry)
                timer.cancel()
                d.callback(value)

    # -- serving ----------------------------------------------------------

    def _handle(self, request):
        # Waiters are told (_check) only once the answer is settled, so what
        # they see has its status.
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
        raw = request.content.read()
        export = Export(request.method.decode("latin-1"), request.path.decode("latin-1"), headers, raw)
        self.export_count += 1
        if self.keep:
            self.exports.append(export)
        problem = self._read(request, export)
        if problem is not None:
            status, message = problem
            export.error = message
            body = self._error(request, export, status, message)
            self._check()
            return body
        if self.mode == "hang":
            self._held.append((request, export))
            request.notifyFinish().addErrback(lambda _: None)
            self._check()
            return NOT_DONE_YET
        if self.mode == "status":
            if self.retry_after is not None:
                request.setHeader(b"retry-after", self.retry_after.encode())
            body = self._error(request, export, self.error_status, "the receiver is told to fail")
            self._check()
            return body
        body = self._ok(request, export)
        self._check()
        return body

    def _read(self, request, export):
        """Check and decode a request into C{export}; (status, message) when it cannot be read."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return 405, "only POST"
        ctype = export.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != PROTOBUF.decode():
            return 415, f"unsupported content type {ctype!r}"
        encoding = export.headers.get("content-encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                export.body = gzip.decompress(export.raw)
            elif encoding == "deflate":
                export.body = zlib.decompress(export.raw)
            elif encoding == "identity":
                export.body = export.raw
            else:
                return 415, f"unsupported content encoding {encoding!r}"
        except (OSError, EOFError, zlib.error) as e:
            return 400, f"the body does not decompress: {e}"
        message = ExportTraceServiceRequest()
        try:
            message.ParseFromString(export.body)
            export.spans = decode_spans(message)
        except Exception as e:  # protobuf's DecodeError, or a value it cannot name
            return 400, f"the body is not an ExportTraceServiceRequest: {e}"
        return None

    def _ok(self, request, export) -> bytes:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        export.status = 200
        self.span_count += len(export.spans)
        request.setResponseCode(200)
        request.setHeader(b"content-type", PROTOBUF)
        return ExportTraceServiceResponse().SerializeToString()

    def _answer_ok(self, request, export) -> None:
        request.write(self._ok(request, export))
        request.finish()

    def _error(self, request, export, status, message) -> bytes:
        export.status = status
        request.setResponseCode(status)
        request.setHeader(b"content-type", PROTOBUF)
        # google.rpc.Code: INVALID_ARGUMENT for what cannot be read, UNAVAILABLE otherwise.
        return _rpc_status(3 if status < 500 else 14, message)

    def _drop_connections(self) -> None:
        for wrapper in list(self.factory.protocols):
            if wrapper.transport is not None:
                wrapper.transport.abortConnection()

    def _release_holder(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None


def main(argv=None) -> int:
    """
    C{python -m testing.otlp_receiver [--port N] [--keep]}

    Prints C{OTLP receiver listening on http://HOST:PORT} once bound, serves
    until killed (SIGINT or SIGTERM), then prints one JSON line with what it
    received: C{{"exports": N, "spans": N}}.
    """
    parser = argparse.ArgumentParser(
        prog="python -m testing.otlp_receiver",
        description="An OTLP/HTTP trace receiver. Prints 'OTLP receiver listening on URL' once bound.",
    )
    parser.add_argument("--port", type=int, default=4318, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--keep", action="store_true", help="keep every span (memory grows); else count only")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    receiver = OTLPReceiver(keep=args.keep)
    receiver.listen(reactor, port=args.port, interface=args.host)
    print(f"OTLP receiver listening on {receiver.url}", flush=True)

    def summary():
        print(json.dumps({"exports": receiver.export_count, "spans": receiver.span_count}), flush=True)

    reactor.addSystemEventTrigger("before", "shutdown", summary)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
