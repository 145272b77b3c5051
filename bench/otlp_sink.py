#!/usr/bin/env python3
"""
A trace collector for the benchmark's tracing scenario: it answers C{200} to
every C{POST /v1/traces} (OTLP over HTTP, protobuf) and counts the exports
and the spans they carry, keeping none of them, so that its memory stays
flat however long the run.  C{GET /count} answers
C{{"exports": N, "spans": N, "bad": N}} (C{bad}: bodies it could not read,
answered C{400}).

    python bench/otlp_sink.py --port 0

prints C{OTLP sink listening on http://127.0.0.1:PORT} once bound and serves
until killed.  It is its own process (not the gateway's event loop, nor the
benchmark's), and does only what counting needs: the body is parsed by the
protobuf runtime's C implementation, the spans counted, nothing decoded
into Python objects (testing/otlp_receiver.py does that, for the tests).
"""

import argparse
import gzip
import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OK_BODY = ExportTraceServiceResponse().SerializeToString()


class Counts:
    """What the sink has taken so far (updated under a lock: one thread per connection)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.exports = 0
        self.spans = 0
        self.bad = 0

    def as_dict(self):
        with self.lock:
            return {"exports": self.exports, "spans": self.spans, "bad": self.bad}


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1: the exporter's keep-alive connection stays open between batches.
    protocol_version = "HTTP/1.1"
    counts = None  # set by main

    def log_message(self, *args):
        pass  # a line per export would be the sink's main cost

    def _answer(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path != "/count":
            return self._answer(404, b"not found\n", "text/plain")
        self._answer(200, json.dumps(self.counts.as_dict()).encode(), "application/json")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            spans = sum(len(scope.spans) for rs in message.resource_spans for scope in rs.scope_spans)
        except Exception:  # a body that is not an export: counted, and the exporter told
            with self.counts.lock:
                self.counts.bad += 1
            return self._answer(400, b"", "application/x-protobuf")
        with self.counts.lock:
            self.counts.exports += 1
            self.counts.spans += spans
        self._answer(200, OK_BODY, "application/x-protobuf")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/otlp_sink.py", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4318, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    args = parser.parse_args(argv)
    Handler.counts = Counts()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"OTLP sink listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
