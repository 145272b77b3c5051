"""
A fake Ollama server that speaks Ollama's HTTP API on the wire.

Tests start it in-process on a loopback port with the real reactor::

    fake = FakeOllama()
    fake.listen(reactor)              # binds 127.0.0.1:0
    self.addCleanup(fake.stop)        # stop() returns a Deferred
    ... point the gateway at fake.url ...

and the benchmark runs it as its own process::

    python -m testing.fake_ollama --port 11434 --pace-ms 20 --tokens 64

What it answers follows Ollama's API document (docs/api.md in
ollama/ollama) and, where the document is silent, Ollama's own server code
(server/routes.go, api/types.go):

  - JSON is encoded the way Go's encoding/json does it: compact, fields in
    struct order, map keys sorted, C{<}, C{>} and C{&} escaped as C{\\u003c}
    etc., non-ASCII left as UTF-8, and zero-valued C{omitempty} fields left
    out (so a metric that happens to be 0 is absent, as in Ollama).
  - Streaming replies are NDJSON (C{Content-Type: application/x-ndjson}),
    one object per line, each line ending in C{\\n}, written as its own HTTP
    chunk; the last line has C{"done": true}, C{done_reason} and the
    nanosecond metrics.  Non-streaming replies (C{"stream": false}) are one
    JSON body (C{application/json; charset=utf-8}) built the way Ollama
    builds it: the final chunk with the text of every chunk joined.
  - Errors are C{{"error": "..."}} with the status Ollama uses.  An error in
    the middle of a stream is one more line C{{"error": "..."}}, after which
    the response ends normally.
  - C{created_at} is RFC 3339 in UTC with nanoseconds, trailing zeros
    trimmed (Go's C{time.RFC3339Nano}).

Replies are deterministic: the reply text (C{reply_text}) is split into
tokens (each word with the whitespace after it) and each token is one
NDJSON line.  Behaviours (slow first byte, pacing, stalls, errors and
dropped connections mid-stream, error statuses, answers held until the test
releases them) are switched on with L{FakeOllama.behave} and
L{FakeOllama.hold}.  Everything received is recorded in
L{FakeOllama.requests}; connections and client disconnects are tracked so a
test can assert that Ollama saw its connection closed.  Tests order events
by waiting on them (L{FakeOllama.next_request}, L{FakeOllama.when_requests},
L{FakeOllama.when_connections}, L{RecordedRequest.when_closed}, ...), never
by sleeping.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from twisted.internet import defer
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: What C{/api/version} answers unless told otherwise.
DEFAULT_VERSION = "0.12.6"

#: The assistant's reply unless told otherwise.
DEFAULT_REPLY = "Hello! This is a reply from the fake Ollama server."

#: The thinking a qwen3-style model shows when the request has C{think}.
DEFAULT_THINKING = "Okay, the user wants a reply. I will answer briefly and politely."

#: The models served unless told otherwise.
DEFAULT_MODELS = ("qwen3:32b", "nomic-embed-text:latest")

#: The endpoints a behaviour applies to when it names no paths.
INFERENCE_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")

#: Ollama's message for an error in the middle of a generation (the runner died).
DEFAULT_STREAM_ERROR = "an error was encountered while running the model: unexpected EOF"

#: Messages Ollama uses for some statuses, for L{Behaviour.status_error}.
STATUS_MESSAGES = {
    400: "bad request",
    404: "not found",
    499: "request canceled",
    500: "llama runner process has terminated: exit status 2",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
}

JSON_TYPE = b"application/json; charset=utf-8"  # gin's c.JSON
NDJSON_TYPE = b"application/x-ndjson"  # server/routes.go streamResponse
BARE_JSON_TYPE = b"application/json"  # streamResponse's error before any line
TEXT_TYPE = b"text/plain; charset=utf-8"

_METRIC_KEYS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)

_WORDS = (
    "the quick brown fox jumps over a lazy dog while curious cats watch "
    "from warm windows and busy bees hum along bright green meadows"
).split()

# ---------------------------------------------------------------------------
# Encoding the way Go does
# ---------------------------------------------------------------------------


def go_json(value: Any) -> bytes:
    """
    C{value} encoded as Go's C{json.Marshal} would encode it.

    Compact separators, non-ASCII kept as UTF-8, and the HTML-sensitive
    characters C{<}, C{>}, C{&} plus U+2028/U+2029 escaped.  Key order is
    the dict's order: build dicts in Go struct-field order, and sort the
    keys of anything Go holds in a map (see L{go_map}).

    Floats are written with Python's C{repr}, which matches Go for the
    values this module produces (magnitudes in [1e-4, 1) with at most six
    decimals); other floats may differ from Go in exponent notation.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return text.encode("utf-8", "replace")


def go_map(value: Any) -> Any:
    """C{value} with the keys of every dict sorted, as Go encodes a map."""
    if isinstance(value, dict):
        return {k: go_map(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [go_map(v) for v in value]
    return value


def go_quote(text: str) -> str:
    """C{text} the way Go's C{%q} writes it (a double-quoted string)."""
    return json.dumps(text, ensure_ascii=False)


def rfc3339nano(ns: int) -> str:
    """A UTC instant, in nanoseconds since the epoch, in Go's RFC3339Nano."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if fraction:
        text += "." + f"{fraction:09d}".rstrip("0")
    return text + "Z"


def tokenize(text: str) -> list[str]:
    """
    C{text} as the fake model's tokens: each word with the whitespace that
    follows it (leading whitespace is a token of its own).  Joining the
    tokens gives C{text} back.
    """
    return re.findall(r"^\s+|\S+\s*", text)


def words(count: int) -> str:
    """A deterministic sentence of C{count} words (C{count} tokens)."""
    if count <= 0:
        return ""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(count)) + "."


def example_for_schema(schema: Any, root: Any = None) -> Any:
    """
    A deterministic value that fits the JSON schema C{schema}: the C{const}
    or first C{enum} value, the first branch of C{anyOf}/C{oneOf}, every
    branch of C{allOf} merged, local C{$ref}s followed, C{"example"} for
    strings, 1 for integers, 1.5 for numbers, C{true} for booleans, one
    item for arrays, and every property for objects.
    """
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return "example"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return example_for_schema(target, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")] or schema[key]
            return example_for_schema(branches[0], root)
    if isinstance(schema.get("allOf"), list):
        merged: dict = {}
        for branch in schema["allOf"]:
            value = example_for_schema(branch, root)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or (kind is None and "properties" in schema):
        return {name: example_for_schema(sub, root) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example_for_schema(schema.get("items") or {}, root)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "example")


def embedding(model: str, text: str, dims: int) -> list[float]:
    """
    A deterministic unit vector of C{dims} floats for C{text}.

    The same model and text always give the same vector.  Every component
    has six decimals and a magnitude in [1e-4, 1), so Python and Go write
    it the same way.
    """
    seed = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    rng = random.Random(seed)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    out = []
    for v in raw:
        v = round(v / norm, 6)
        if abs(v) < 1e-4:
            v = 1e-4 if v >= 0 else -1e-4
        out.append(min(max(v, -0.999999), 0.999999))
    return out


def parse_keep_alive(value: Any) -> Optional[float]:
    """
    C{keep_alive} (seconds, or a Go duration like C{"5m"}) in seconds;
    C{None} when absent or unreadable, negative meaning "forever".
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not match:
        return None
    number = float(match.group(1))
    return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

_KNOWN = {
    "qwen3:32b": dict(
        family="qwen3",
        parameter_size="32.8B",
        quantization_level="Q4_K_M",
        size=20201253588,
        capabilities=("completion", "tools", "thinking"),
        context_length=40960,
        embedding_length=5120,
    ),
    "nomic-embed-text:latest": dict(
        family="nomic-bert",
        parameter_size="137M",
        quantization_level="F16",
        size=274302450,
        capabilities=("embedding",),
        context_length=2048,
        embedding_length=768,
    ),
    "llama3.2:latest": dict(
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
        size=2019393189,
        capabilities=("completion", "tools"),
        context_length=131072,
        embedding_length=3072,
    ),
}


def canonical_name(name: str) -> str:
    """
    C{name} the way Ollama lists it: lower case, without the default
    C{registry.ollama.ai/library/} prefix, with C{:latest} when no tag.
    """
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


@dataclass
class ModelSpec:
    """One model the fake serves (an entry of C{/api/tags})."""

    name: str
    family: str = "llama"
    parameter_size: str = "7B"
    quantization_level: str = "Q4_K_M"
    size: int = 4_661_224_676
    capabilities: tuple[str, ...] = ("completion", "tools")
    context_length: int = 8192
    embedding_length: int = 4096
    digest: str = ""
    modified_at: str = "2025-06-01T09:30:00.123456789Z"

    def __post_init__(self):
        self.name = canonical_name(self.name)
        if not self.digest:
            self.digest = hashlib.sha256(self.name.encode()).hexdigest()

    @classmethod
    def named(cls, name: str, **overrides) -> "ModelSpec":
        """A spec for C{name}, from the known table when listed there."""
        known = dict(_KNOWN.get(canonical_name(name), {}))
        if not known:
            known["family"] = re.split(r"[:/\d.]", canonical_name(name).rsplit("/", 1)[-1])[0] or "llama"
        known.update(overrides)
        return cls(name=name, **known)

    @property
    def full_name(self) -> str:
        return "registry.ollama.ai/library/" + self.name

    def details(self, parent: bool = True) -> dict:
        """The C{details} object (api.ModelDetails)."""
        out = {"parent_model": ""} if parent else {}
        out.update(
            format="gguf",
            family=self.family,
            families=[self.family],
            parameter_size=self.parameter_size,
            quantization_level=self.quantization_level,
        )
        return out

    def listing(self) -> dict:
        """The C{/api/tags} entry (api.ListModelResponse)."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


# ---------------------------------------------------------------------------
# Replies, behaviours, records
# ---------------------------------------------------------------------------


@dataclass
class Reply:
    """
    What the model says to one request.

    @ivar content: the answer text (C{message.content} or C{response}).
    @ivar thinking: thinking text streamed before the answer, or C{None}.
    @ivar tool_calls: tool calls (each C{{"function": {"name", "arguments"}}}
        or the shorthand C{{"name", "arguments"}}), or C{None}.
    """

    content: str = ""
    thinking: Optional[str] = None
    tool_calls: Optional[list] = None


@dataclass
class Behaviour:
    """
    How the fake misbehaves for a request.  Line counts count NDJSON lines
    already sent (the final C{done} line included); a non-streaming reply
    counts one line per token generated, a plain JSON answer counts as one.

    @ivar delay_first_byte: seconds to wait before anything (status line,
        headers, first line) is sent.
    @ivar pace: seconds between two streamed lines; with C{"stream": false}
        the reply is held back as long as the stream would have taken.
    @ivar lockstep: with C{pace}, every stream's lines after the first fall
        on one shared clock, the multiples of C{pace} (the next one at least
        half a pace away), as a batched decoder makes one token for every
        running sequence per step; without it each stream keeps its own
        phase, C{pace} after its previous line.
    @ivar stall_after: after this many lines send nothing more, ever; the
        request stays open until the client disconnects (or
        L{FakeOllama.stop}).
    @ivar fail_mid_stream: after this many lines send the line
        C{{"error": fail_message}} and end the response cleanly, as Ollama
        does when the runner fails mid-generation.  At 0 lines (or without
        streaming) it is a 500 with C{{"error": fail_message}}, as Ollama.
    @ivar close_early: after this many lines (flushed) drop the TCP
        connection with C{abortConnection()}: no terminating chunk.
    @ivar status_error: answer this HTTP status with C{{"error": ...}}
        (C{error_message}, or Ollama's usual text for that status).
    @ivar hold: after this many lines send nothing more until the test
        calls L{FakeOllama.release}; at 0 not even the status line (and
        before C{delay_first_byte}).  A held request stays open, so it keeps
        its place (a backend slot, a reservation) in the gateway.
    @ivar paths: the paths this applies to; C{None} means the inference
        endpoints (L{INFERENCE_PATHS}); C{"*"} means every path.
    """

    delay_first_byte: float = 0.0
    pace: float = 0.0
    lockstep: bool = False
    stall_after: Optional[int] = None
    fail_mid_stream: Optional[int] = None
    fail_message: str = DEFAULT_STREAM_ERROR
    close_early: Optional[int] = None
    status_error: Optional[int] = None
    error_message: Optional[str] = None
    hold: Optional[int] = None
    paths: Union[None, str, tuple] = None

    def applies_to(self, path: str) -> bool:
        paths = self.paths
        if paths == "*" or (isinstance(paths, (tuple, list)) and "*" in paths):
            return True
        return path in (INFERENCE_PATHS if paths is None else tuple(paths))

    def status_message(self) -> str:
        if self.error_message is not None:
            return self.error_message
        return STATUS_MESSAGES.get(self.status_error, "internal server error")


@dataclass(eq=False)
class RecordedRequest:
    """
    One request the fake received.

    @ivar headers: lower-cased header names to values (repeats joined by
        C{", "}).
    @ivar body: the JSON body parsed, or C{None} (empty or not JSON).
    @ivar status: the status sent (C{None} until the status line went out).
    @ivar lines_sent: NDJSON lines written so far.
    @ivar held: C{True} while L{Behaviour.hold} keeps the answer back.
    @ivar outcome: C{"pending"}, then one of C{"completed"} (the whole
        answer was sent, whatever its status), C{"error_line"} (ended with a
        mid-stream error line), C{"client_disconnected"} (the client closed
        the connection before the answer was complete), C{"server_aborted"}
        (L{Behaviour.close_early} dropped it) or C{"server_stopped"}.
    """

    method: str
    path: str
    query: str
    headers: dict
    raw_body: bytes
    body: Any
    received_at: float
    behaviour: Behaviour = field(default_factory=Behaviour)
    status: Optional[int] = None
    lines_sent: int = 0
    outcome: str = "pending"
    closed_at: Optional[float] = None
    held: bool = False
    _released: bool = field(default=False, repr=False)
    _resume: Optional[Callable[[], None]] = field(default=None, repr=False)
    _waiters: list = field(default_factory=list, repr=False)

    @property
    def closed_by_client(self) -> bool:
        return self.outcome == "client_disconnected"

    def when_closed(self) -> defer.Deferred:
        """A Deferred that fires with L{outcome} once the request is over."""
        if self.closed_at is not None:
            return defer.succeed(self.outcome)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _close(self, outcome: str, at: float) -> None:
        if self.closed_at is not None:
            return
        self.held = False
        if self.outcome == "pending" or outcome != "completed":
            self.outcome = outcome
        self.closed_at = at
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.outcome)


@dataclass
class Disconnect:
    """A client closed its connection while a request was in flight."""

    at: float
    path: str
    lines_sent: int
    request: RecordedRequest


class _ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Body:
    """A complete, non-generated answer (Ollama's c.JSON)."""

    status: int
    payload: Any  # JSON value, raw bytes, or None for an empty body
    content_type: Optional[bytes] = JSON_TYPE


@dataclass
class _Lines:
    """
    A generated answer: the NDJSON lines of the stream, sent one by one
    when streaming, or collapsed into one body when C{stream} is false.
    """

    lines: list
    stream: bool
    collapse: Callable[[list], Any]
    body_type: bytes = JSON_TYPE  # Content-Type of the collapsed body


# ---------------------------------------------------------------------------
# Connection tracking
# ---------------------------------------------------------------------------


class _TrackingFactory(WrappingFactory):
    """Counts the fake's TCP connections as they open and close."""

    protocol = ProtocolWrapper

    def __init__(self, wrapped, fake: "FakeOllama"):
        super().__init__(wrapped)
        self.fake = fake

    def registerProtocol(self, p):
        super().registerProtocol(p)
        self.fake.connections_opened += 1
        self.fake._connections_changed()

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        self.fake.connection_closes.append(self.fake.clock.seconds())
        self.fake._connections_changed()


def _pending_bytes(transport) -> int:
    """Bytes written to C{transport} that the kernel has not taken yet."""
    seen = 0
    while transport is not None and seen < 5:
        if hasattr(transport, "dataBuffer"):
            pending = len(transport.dataBuffer) - getattr(transport, "offset", 0)
            pending += sum(map(len, getattr(transport, "_tempDataBuffer", [])))
            return pending
        transport = getattr(transport, "transport", None)
        seen += 1
    return 0


# ---------------------------------------------------------------------------
# One request/response exchange
# ---------------------------------------------------------------------------


class _Exchange:
    """
    Answers one HTTP request: applies the behaviour, writes lines on the
    clock, and notices how the request ended.
    """

    def __init__(self, fake: "FakeOllama", request, record: RecordedRequest):
        self.fake = fake
        self.clock = fake.clock
        self.request = request
        self.record = record
        self.behaviour = record.behaviour
        self.timer = None
        self.closed = False
        self.aborting = None  # the outcome to report once we drop the connection
        self.answer = None
        self.index = 0
        self.first_line_at = None
        request.notifyFinish().addBoth(self._finished)

    # -- scheduling ----------------------------------------------------

    def _later(self, delay: float, f, *args) -> None:
        if self.closed:
            return
        if delay > 0:
            self.timer = self.clock.callLater(delay, self._fire, f, args)
        else:
            f(*args)

    def _fire(self, f, args) -> None:
        self.timer = None
        if not self.closed:
            f(*args)

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    # -- the answer -----------------------------------------------------

    def start(self, produce: Callable[[RecordedRequest], Union[_Body, _Lines]]) -> None:
        if self.record.held:  # held from the moment it arrived (hold=0)
            self.record._resume = lambda: self.start(produce)
            return
        self._later(self.behaviour.delay_first_byte, self._begin, produce)

    def _holds(self, lines: int) -> bool:
        """Whether L{Behaviour.hold} stops the answer after C{lines} lines."""
        hold = self.behaviour.hold
        return hold is not None and lines >= hold and not self.record._released and not self.closed

    def _begin(self, produce) -> None:
        b = self.behaviour
        if b.status_error is not None:
            self._send_body(_Body(b.status_error, {"error": b.status_message()}))
            return
        try:
            self.answer = produce(self.record)
        except _ApiError as e:
            self.answer = _Body(e.status, {"error": e.message})
        self._step()

    def _step(self) -> None:
        b = self.behaviour
        while not self.closed:
            i = self.index
            if b.stall_after is not None and i >= b.stall_after:
                return  # nothing more, ever
            if self._holds(i):
                self.fake._hold(self.record, self._step)
                return
            if b.close_early is not None and i >= b.close_early:
                self._abort("server_aborted")
                return
            if b.fail_mid_stream is not None and i >= b.fail_mid_stream:
                self._fail()
                return
            answer = self.answer
            if isinstance(answer, _Body):
                self._send_body(answer)
                return
            line = answer.lines[i]
            self._stamp(line)
            if answer.stream:
                self._write_line(line)
            self.index += 1
            if self.index == len(answer.lines):
                if answer.stream:
                    self._finish("completed")
                else:
                    self._send_body(_Body(200, answer.collapse(answer.lines), answer.body_type))
                return
            if b.pace > 0:
                delay = b.pace
                if b.lockstep:
                    delay -= self.clock.seconds() % b.pace  # the next tick of the shared clock
                    if delay < b.pace / 2:
                        delay += b.pace
                self._later(delay, self._step)
                return

    def _stamp(self, line: dict) -> None:
        """Fill in C{created_at} and, on the final line, the metrics."""
        now = self.clock.seconds()
        if self.first_line_at is None:
            self.first_line_at = now
        if "created_at" in line:
            line["created_at"] = self.fake.now()
        if line.get("done") is True and "total_duration" in line:
            fake = self.fake
            load = int(fake.load_duration * 1e9)
            prompt = line.get("prompt_eval_count", 0) * fake.prompt_eval_ns_per_token
            generated = int((now - self.first_line_at) * 1e9)
            evaluation = max(generated, line.get("eval_count", 0) * fake.eval_ns_per_token)
            total = max(int((now - self.record.received_at) * 1e9), load + prompt + evaluation)
            line.update(
                total_duration=total,
                load_duration=load,
                prompt_eval_duration=prompt,
                eval_duration=evaluation,
            )
            for key in _METRIC_KEYS:  # Go's omitempty
                if key in line and not line[key]:
                    del line[key]

    # -- writing --------------------------------------------------------

    def _headers(self, status: int, content_type: Optional[bytes]) -> None:
        self.request.setResponseCode(status)
        if content_type:
            self.request.setHeader(b"content-type", content_type)
        self.record.status = status

    def _write_line(self, line: dict) -> None:
        if self.record.lines_sent == 0:
            self._headers(200, NDJSON_TYPE)
        self.request.write(go_json(line) + b"\n")
        self.record.lines_sent += 1

    def _send_body(self, body: _Body) -> None:
        payload = body.payload
        data = b"" if payload is None else payload if isinstance(payload, bytes) else go_json(payload)
        self._headers(body.status, body.content_type)
        self.request.setHeader(b"content-length", b"%d" % len(data))
        if data:
            self.request.write(data)
        self._finish("completed")

    def _fail(self) -> None:
        error = {"error": self.behaviour.fail_message}
        if self.record.lines_sent:
            self.request.write(go_json(error) + b"\n")
            self._finish("error_line")
        elif isinstance(self.answer, _Lines) and self.answer.stream:
            self._send_body(_Body(500, error, BARE_JSON_TYPE))
        else:
            self._send_body(_Body(500, error))

    def _finish(self, outcome: str) -> None:
        self.record.outcome = outcome
        self.request.finish()

    def _abort(self, outcome: str, waited: float = 0.0) -> None:
        """Drop the connection once what was written has left the process."""
        self.aborting = outcome
        transport = self.request.channel.transport if self.request.channel else None
        if transport is None:
            return
        if _pending_bytes(transport) and waited < 2.0:
            self.timer = self.clock.callLater(0.001, self._fire, self._abort, (outcome, waited + 0.001))
            return
        transport.abortConnection()

    def stop(self) -> None:
        """Used by L{FakeOllama.stop}: end this exchange now."""
        self.cancel_timer()
        if not self.closed:
            self.aborting = "server_stopped"
            if self.request.channel is not None and self.request.channel.transport is not None:
                self.request.channel.transport.abortConnection()

    def _finished(self, result) -> None:
        self.closed = True
        self.cancel_timer()
        self.fake._exchanges.discard(self)
        now = self.clock.seconds()
        if isinstance(result, Failure):
            if self.aborting:
                self.record._close(self.aborting, now)
            else:
                self.record._close("client_disconnected", now)
                self.fake._client_disconnected(self.record, now)
        else:
            self.record._close("completed", now)


# ---------------------------------------------------------------------------
# The Resource tree
# ---------------------------------------------------------------------------


class _Endpoint(Resource):
    """A leaf answering one path; C{handlers} maps method to handler."""

    isLeaf = True

    def __init__(self, fake: "FakeOllama", handlers: dict):
        super().__init__()
        self.fake = fake
        self.handlers = handlers

    def render(self, request):
        handler = self.handlers.get(request.method)
        if handler is None and request.method == b"HEAD":
            handler = self.handlers.get(b"GET")
        if request.postpath and request.postpath != [b""]:
            handler = self.fake._route_not_found
        elif handler is None:
            handler = self.fake._method_not_allowed
        return self.fake._serve(request, handler)


class _Blobs(_Endpoint):
    """C{/api/blobs/:digest}."""

    def render(self, request):
        handler = self.handlers.get(request.method)
        if len(request.postpath) != 1 or not request.postpath[0]:
            handler = self.fake._route_not_found
        elif handler is None:
            handler = self.fake._method_not_allowed
        return self.fake._serve(request, handler)


class _NotFound(Resource):
    """Any path Ollama has no route for: gin's plain-text 404."""

    isLeaf = True

    def __init__(self, fake: "FakeOllama"):
        super().__init__()
        self.fake = fake

    def render(self, request):
        return self.fake._serve(request, self.fake._route_not_found)


class _Directory(_NotFound):
    """A path segment with children; anything else is gin's 404."""

    isLeaf = False

    def getChild(self, path, request):
        return _NotFound(self.fake)


# ---------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------


class FakeOllama:
    """
    A fake Ollama server: a twisted.web Resource tree plus the state tests
    inspect.

    @param models: model names (or L{ModelSpec}s) to serve; default
        L{DEFAULT_MODELS}.
    @param reply_text: what the assistant answers (default L{DEFAULT_REPLY}).
    @param tokens: if given, the reply is L{words}C{(tokens)} instead.
    @param thinking_text: the thinking shown when a request asks to think.
    @param tool_calls: C{None} to call the first tool a request offers with
        arguments made from its schema; a list of calls to make instead;
        C{[]} never to call tools.
    @param json_reply: the object to answer with when the request has
        C{format}; C{None} to make one from the schema.
    @param version: what C{/api/version} answers.
    @param clock: the reactor/clock for timers and durations (default: the
        reactor given to L{listen}, else the global reactor).
    @param wall_ns: the wall clock in nanoseconds, for C{created_at}.
    @param think_by_default: think when a thinking model gets no C{think}
        field (what current Ollama does); off by default so plain requests
        get plain replies.

    @ivar reply_hook: C{None} or C{f(path, body) -> Reply | str | None},
        asked first for every chat/generate request; C{None} falls back to
        the settings above.
    @ivar behaviour: the standing L{Behaviour} (see L{behave}).
    @ivar requests: every L{RecordedRequest}, in arrival order.
    @ivar disconnects: a L{Disconnect} for every in-flight request whose
        client closed the connection.
    @ivar connections_opened: TCP connections accepted so far.
    @ivar connection_closes: clock times at which connections closed.
    """

    load_duration = 0.012345678  # seconds, reported as load_duration
    prompt_eval_ns_per_token = 200_000
    eval_ns_per_token = 1_000_000

    def __init__(
        self,
        models=None,
        *,
        reply_text: str = DEFAULT_REPLY,
        tokens: Optional[int] = None,
        thinking_text: str = DEFAULT_THINKING,
        tool_calls: Optional[list] = None,
        json_reply: Any = None,
        version: str = DEFAULT_VERSION,
        clock=None,
        wall_ns: Callable[[], int] = time.time_ns,
        think_by_default: bool = False,
    ):
        self.models: dict[str, ModelSpec] = {}
        for i, m in enumerate(DEFAULT_MODELS if models is None else models):
            spec = m if isinstance(m, ModelSpec) else ModelSpec.named(m)
            if not isinstance(m, ModelSpec):
                # Distinct times, newest first, so /api/tags has a stable order.
                spec.modified_at = rfc3339nano(1_748_770_200_123_456_789 - i * 3_600_000_000_000)
            self.models[spec.name] = spec
        self.reply_text = words(tokens) if tokens is not None else reply_text
        self.thinking_text = thinking_text
        self.tool_calls = tool_calls
        self.json_reply = json_reply
        self.version = version
        self.think_by_default = think_by_default
        self.reply_hook: Optional[Callable[[str, dict], Any]] = None
        self._clock = clock
        self.wall_ns = wall_ns

        self.behaviour = Behaviour()
        self._queued: list[list] = []  # [Behaviour, remaining uses]

        self.requests: list[RecordedRequest] = []
        self.disconnects: list[Disconnect] = []
        self.connections_opened = 0
        self.connection_closes: list[float] = []
        self.loaded: dict[str, float] = {}  # model name -> expiry (wall seconds)
        self.blobs: set[str] = set()

        self._request_waiters: list = []
        self._count_waiters: list = []  # (count, path, Deferred)
        self._held: list[RecordedRequest] = []
        self._disconnect_waiters: list = []
        self._connection_waiters: list = []
        self._exchanges: set[_Exchange] = set()
        self._port = None
        self._scheme = "http"

        self.resource = self._build_resource()
        self.site = Site(self.resource)
        self.site.displayTracebacks = False
        self.site.noisy = False
        self.factory = _TrackingFactory(self.site, self)
        self.factory.noisy = False

    # -- wiring ---------------------------------------------------------

    @property
    def clock(self):
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def now(self) -> str:
        """The current wall time, as C{created_at} writes it."""
        return rfc3339nano(self.wall_ns())

    def _build_resource(self) -> Resource:
        root = _Directory(self)
        api = _Directory(self)
        root.putChild(b"", _Endpoint(self, {b"GET": self._root}))
        root.putChild(b"api", api)
        routes = {
            b"version": {b"GET": self._version},
            b"tags": {b"GET": self._tags},
            b"ps": {b"GET": self._ps},
            b"show": {b"POST": self._show},
            b"chat": {b"POST": self._chat},
            b"generate": {b"POST": self._generate},
            b"embed": {b"POST": self._embed},
            b"embeddings": {b"POST": self._embeddings},
            b"pull": {b"POST": self._pull},
            b"push": {b"POST": self._push},
            b"create": {b"POST": self._create},
            b"copy": {b"POST": self._copy},
            b"delete": {b"DELETE": self._delete},
        }
        for name, handlers in routes.items():
            api.putChild(name, _Endpoint(self, handlers))
        api.putChild(b"blobs", _Blobs(self, {b"HEAD": self._head_blob, b"POST": self._create_blob}))
        return root

    def listen(self, reactor=None, port: int = 0, interface: str = "127.0.0.1", tls=None):
        """
        Listen on C{interface:port} (default a free loopback port); returns
        the listening port.  L{url} then gives the base URL.

        @param tls: a server context factory (e.g. Twisted's
            C{CertificateOptions}) to serve HTTPS with, instead of HTTP.
        """
        if reactor is None:
            from twisted.internet import reactor
        if self._clock is None:
            self._clock = reactor
        if tls is not None:
            self._port = reactor.listenSSL(port, self.factory, tls, interface=interface)
        else:
            self._port = reactor.listenTCP(port, self.factory, interface=interface)
        self._scheme = "https" if tls is not None else "http"
        return self._port

    @property
    def port(self) -> int:
        return self._port.getHost().port

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:PORT} (C{https://} when listening with TLS), with no trailing slash."""
        host = self._port.getHost()
        return f"{self._scheme}://{host.host}:{host.port}"

    def stop(self) -> defer.Deferred:
        """
        Stop listening, end every in-flight request (dropping its
        connection) and close every connection; the Deferred fires when all
        of that is done.
        """
        for exchange in list(self._exchanges):
            exchange.stop()
        waits = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
            self._port = None
        for wrapper in list(self.factory.protocols):
            if wrapper.transport is not None:
                wrapper.transport.abortConnection()
        waits.append(self.when_connections(0))
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- behaviours ------------------------------------------------------

    def behave(self, *, times: Optional[int] = None, paths=None, **settings) -> Behaviour:
        """
        Switch a L{Behaviour} on for the requests that follow.

        Without C{times} it becomes the standing behaviour, replacing the
        previous one, until the next C{behave(...)} (C{behave()} with no
        settings goes back to normal).  With C{times=n} it applies to the
        next C{n} matching requests only, ahead of the standing one.
        C{paths} picks the endpoints (default the inference ones, C{"*"}
        for all).  Returns the behaviour, which may be changed in place.
        """
        behaviour = Behaviour(paths=paths, **settings)
        if times is None:
            self.behaviour = behaviour
        elif times > 0:
            self._queued.append([behaviour, times])
        return behaviour

    def reset_behaviour(self) -> None:
        """Back to normal: no standing or queued behaviour."""
        self.behaviour = Behaviour()
        self._queued = []

    def hold(self, after: int = 0, *, times: Optional[int] = None, paths=None, **settings) -> Behaviour:
        """
        Hold the answers to the requests that follow until L{release}: after
        C{after} lines (0: before the status line).  C{times}, C{paths} and
        the other settings are those of L{behave}; the other settings apply
        once an answer is released.  Each request is held once.
        """
        return self.behave(times=times, paths=paths, hold=after, **settings)

    def release(self, count: Optional[int] = None) -> list[RecordedRequest]:
        """
        Let held answers go on, oldest first: all of them, or the first
        C{count}.  Requests whose client left meanwhile are skipped.

        @return: the requests released.
        """
        released = []
        while self._held and (count is None or len(released) < count):
            record = self._held.pop(0)
            if record.closed_at is not None:
                continue
            resume, record._resume = record._resume, None
            record.held, record._released = False, True
            released.append(record)
            if resume is not None:
                resume()
        return released

    @property
    def held(self) -> list[RecordedRequest]:
        """The requests whose answers L{hold} keeps back right now, oldest first."""
        return [r for r in self._held if r.closed_at is None]

    def _hold(self, record: RecordedRequest, resume: Optional[Callable[[], None]]) -> None:
        record.held, record._resume = True, resume
        self._held.append(record)

    def _behaviour_for(self, path: str) -> Behaviour:
        for entry in self._queued:
            behaviour, remaining = entry
            if behaviour.applies_to(path):
                if remaining <= 1:
                    self._queued.remove(entry)
                else:
                    entry[1] = remaining - 1
                return behaviour
        if self.behaviour.applies_to(path):
            return self.behaviour
        return Behaviour()

    # -- models ----------------------------------------------------------

    def add_model(self, model) -> ModelSpec:
        """Serve C{model} (a name or a L{ModelSpec}) from now on."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec.named(model, modified_at=self.now())
        self.models[spec.name] = spec
        return spec

    def find_model(self, name: Any) -> Optional[ModelSpec]:
        if not isinstance(name, str) or not name.strip():
            return None
        return self.models.get(canonical_name(name))

    # -- waiting and inspecting -------------------------------------------

    @property
    def open_connections(self) -> int:
        """TCP connections to the fake that are open right now."""
        return len(self.factory.protocols)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests for C{path}."""
        return [r for r in self.requests if r.path == path]

    def next_request(self, path: Optional[str] = None) -> defer.Deferred:
        """A Deferred firing with the next L{RecordedRequest} (for C{path})."""
        d = defer.Deferred()
        self._request_waiters.append((path, d))
        return d

    def when_requests(self, count: int, path: Optional[str] = None) -> defer.Deferred:
        """
        A Deferred firing once C{count} requests (for C{path}) have arrived
        in all, with the first C{count} of them.  It fires as each request
        is recorded, before any of its answer is sent.
        """
        seen = self.requests_to(path) if path is not None else self.requests
        if len(seen) >= count:
            return defer.succeed(seen[:count])
        d = defer.Deferred()
        self._count_waiters.append((count, path, d))
        return d

    def next_disconnect(self) -> defer.Deferred:
        """
        A Deferred firing with the next L{Disconnect}: a client closing its
        connection while one of its requests is still being answered.
        """
        d = defer.Deferred()
        self._disconnect_waiters.append(d)
        return d

    def when_connections(self, count: int) -> defer.Deferred:
        """A Deferred firing once exactly C{count} connections are open."""
        if self.open_connections == count:
            return defer.succeed(count)
        d = defer.Deferred()
        self._connection_waiters.append((count, d))
        return d

    def _connections_changed(self) -> None:
        now_open = self.open_connections
        keep = []
        for count, d in self._connection_waiters:
            if count == now_open:
                d.callback(count)
            else:
                keep.append((count, d))
        self._connection_waiters = keep

    def _client_disconnected(self, record: RecordedRequest, at: float) -> None:
        event = Disconnect(at=at, path=record.path, lines_sent=record.lines_sent, request=record)
        self.disconnects.append(event)
        waiters, self._disconnect_waiters = self._disconnect_waiters, []
        for d in waiters:
            d.callback(event)

    # -- serving ---------------------------------------------------------

    def _serve(self, request, handler) -> int:
        """Record C{request}, pick its behaviour and start answering it."""
        request.responseHeaders.removeHeader(b"server")  # Go sends none
        request.defaultContentType = None
        record = self._record(request)
        exchange = _Exchange(self, request, record)
        self._exchanges.add(exchange)
        exchange.start(handler)
        return NOT_DONE_YET

    def _record(self, request) -> RecordedRequest:
        path, _, query = request.uri.decode("latin-1").partition("?")
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = None
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
        record = RecordedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            query=query,
            headers=headers,
            raw_body=raw,
            body=body,
            received_at=self.clock.seconds(),
        )
        record.behaviour = self._behaviour_for(path)
        if record.behaviour.hold == 0:
            # Held before any waiter hears of it, so a release() from a
            # waiter finds it; the exchange resumes it once started.
            self._hold(record, None)
        self.requests.append(record)
        keep = []
        for wanted, d in self._request_waiters:
            if wanted is None or wanted == path:
                d.callback(record)
            else:
                keep.append((wanted, d))
        self._request_waiters = keep
        counted = []
        for count, wanted, d in self._count_waiters:
            seen = self.requests_to(wanted) if wanted is not None else self.requests
            if len(seen) >= count:
                d.callback(seen[:count])
            else:
                counted.append((count, wanted, d))
        self._count_waiters = counted
        return record

    # -- request bodies ----------------------------------------------------

    def _json_body(self, record: RecordedRequest, go_type: str) -> dict:
        """
        The body as gin's ShouldBindJSON sees it: 400 "missing request
        body" when empty, 400 with a Go-like message when not a JSON object.
        """
        raw = record.raw_body
        if not raw.strip():
            raise _ApiError(400, "missing request body")
        try:
            body = json.loads(raw)
        except ValueError as e:
            text = raw.decode("utf-8", "replace")
            pos = getattr(e, "pos", len(text))
            if pos >= len(text.rstrip()):
                raise _ApiError(400, "unexpected EOF")
            raise _ApiError(400, f"invalid character '{text[pos]}' looking for beginning of value")
        if not isinstance(body, dict):
            kind = {list: "array", str: "string", bool: "bool", type(None): "null"}.get(type(body), "number")
            raise _ApiError(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_type}")
        for key, want in (("model", str), ("stream", bool), ("messages", list), ("options", dict)):
            value = body.get(key)
            if value is not None and not isinstance(value, want):
                got = {list: "array", dict: "object", str: "string", bool: "bool"}.get(type(value), "number")
                gotype = {str: "string", bool: "bool", list: "[]api.Message", dict: "map[string]interface {}"}[want]
                message = f"json: cannot unmarshal {got} into Go struct field {go_type}.{key} of type {gotype}"
                raise _ApiError(400, message)
        return body

    def _model_for(self, body: dict) -> tuple[str, ModelSpec]:
        """
        The requested name and its spec, or Ollama's error.  Current Ollama
        (server/routes.go ChatHandler, GenerateHandler) answers an unknown
        model with 404 C{model 'x' not found}; older releases, and
        C{/api/embed} today, go through handleScheduleError and say
        C{model "x" not found, try pulling it first}.
        """
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _ApiError(400, "model is required")
        spec = self.find_model(name)
        if spec is None:
            raise _ApiError(404, f"model '{name}' not found")
        return name, spec

    def _touch(self, spec: ModelSpec, keep_alive: Any) -> None:
        seconds = parse_keep_alive(keep_alive)
        if seconds is None:
            seconds = 300.0
        if seconds == 0:
            self.loaded.pop(spec.name, None)
        elif seconds < 0:
            self.loaded[spec.name] = 253402300799.0  # far future
        else:
            self.loaded[spec.name] = self.wall_ns() / 1e9 + seconds

    # -- deciding what the model says --------------------------------------

    def _wants_thinking(self, body: dict, spec: ModelSpec) -> bool:
        think = body.get("think")
        if think is None:
            return self.think_by_default and "thinking" in spec.capabilities
        return bool(think)

    def _reply_for(self, path: str, body: dict, spec: ModelSpec) -> Reply:
        if self.reply_hook is not None:
            reply = self.reply_hook(path, body)
            if isinstance(reply, str):
                return Reply(content=reply)
            if reply is not None:
                return reply
        thinking = self.thinking_text if self._wants_thinking(body, spec) else None
        tools = body.get("tools") or []
        messages = body.get("messages") or []
        last_role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
        if tools and self.tool_calls != [] and last_role != "tool":
            calls = self.tool_calls if self.tool_calls is not None else [self._auto_tool_call(tools[0])]
            return Reply(content="", thinking=thinking, tool_calls=calls)
        fmt = body.get("format")
        if fmt:
            if self.json_reply is not None:
                obj = self.json_reply
            elif isinstance(fmt, dict):
                obj = example_for_schema(fmt)
            else:
                obj = {"answer": self.reply_text}
            return Reply(content=json.dumps(obj, ensure_ascii=False), thinking=thinking)
        return Reply(content=self.reply_text, thinking=thinking)

    @staticmethod
    def _auto_tool_call(tool: Any) -> dict:
        function = tool.get("function", {}) if isinstance(tool, dict) else {}
        arguments = example_for_schema(function.get("parameters") or {"type": "object"})
        return {"function": {"name": function.get("name", "tool"), "arguments": arguments}}

    @staticmethod
    def _wire_tool_call(call: dict) -> dict:
        """A tool call as Ollama writes it (api.ToolCall, arguments a Go map)."""
        call = copy.deepcopy(call)
        if "function" not in call:
            call = {"function": call}
        function = call["function"]
        function["arguments"] = go_map(function.get("arguments") or {})
        ordered = {k: function[k] for k in ("index", "name", "arguments") if k in function}
        ordered.update((k, v) for k, v in function.items() if k not in ordered)
        out = {"id": call["id"]} if "id" in call else {}
        out["function"] = ordered
        out.update((k, v) for k, v in call.items() if k not in out)
        return out

    def _script(self, path: str, body: dict, spec: ModelSpec):
        """
        (thinking tokens, content tokens, tool calls, done_reason,
        eval_count) for a request, with C{options.num_predict} applied.
        """
        reply = self._reply_for(path, body, spec)
        thinking = tokenize(reply.thinking) if reply.thinking else []
        content = tokenize(reply.content or "")
        calls = [self._wire_tool_call(c) for c in reply.tool_calls or []]
        reason = "stop"
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        limit = options.get("num_predict")
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 0:
            limit = int(limit)
            if limit < len(thinking) + len(content) + (1 if calls else 0):
                reason = "length"
                thinking = thinking[:limit]
                content = content[: max(0, limit - len(thinking))]
                calls = []
        call_tokens = sum(len(tokenize(go_json(c).decode())) for c in calls)
        return thinking, content, calls, reason, len(thinking) + len(content) + call_tokens

    @staticmethod
    def _prompt_tokens(*texts: Any) -> int:
        count = 0
        for text in texts:
            if isinstance(text, str):
                count += len(tokenize(text))
        return count

    @staticmethod
    def _metrics(prompt_eval_count: int, eval_count: int) -> dict:
        """Metric fields in api.Metrics order; durations filled when sent."""
        return {
            "total_duration": 0,
            "load_duration": 0,
            "prompt_eval_count": prompt_eval_count,
            "prompt_eval_duration": 0,
            "eval_count": eval_count,
            "eval_duration": 0,
        }

    # -- endpoints ---------------------------------------------------------

    def _route_not_found(self, record):
        return _Body(404, b"404 page not found", TEXT_TYPE)

    def _method_not_allowed(self, record):
        return _Body(405, b"405 method not allowed", TEXT_TYPE)

    def _root(self, record):
        return _Body(200, b"Ollama is running", TEXT_TYPE)

    def _version(self, record):
        return _Body(200, {"version": self.version})

    def _tags(self, record):
        models = sorted(self.models.values(), key=lambda m: m.modified_at, reverse=True)
        return _Body(200, {"models": [m.listing() for m in models]})

    def _ps(self, record):
        now = self.wall_ns() / 1e9
        running = []
        for name, expires in sorted(self.loaded.items(), key=lambda kv: -kv[1]):
            spec = self.models.get(name)
            if spec is None or expires <= now:
                continue
            running.append(
                {
                    "name": spec.name,
                    "model": spec.name,
                    "size": spec.size,
                    "digest": spec.digest,
                    "details": spec.details(),
                    "expires_at": rfc3339nano(int(expires * 1e9)),
                    "size_vram": spec.size,
                    "context_length": spec.context_length,
                }
            )
        return _Body(200, {"models": running})

    def _show(self, record):
        body = self._json_body(record, "ShowRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _ApiError(400, "model is required")
        spec = self.find_model(name)
        if spec is None:
            raise _ApiError(404, f"model '{name}' not found")
        arch = spec.family
        template = (
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n"
        )
        parameters = 'stop                           "<|im_start|>"\nstop                           "<|im_end|>"'
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {spec.name}\n\n"
            f"FROM /root/.ollama/models/blobs/sha256-{spec.digest}\n"
            f'TEMPLATE """{template}"""\n'
            'PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n'
        )
        model_info = go_map(
            {
                "general.architecture": arch,
                "general.file_type": 15,
                "general.parameter_count": int(
                    float(re.sub(r"[^\d.]", "", spec.parameter_size) or 1)
                    * (1e9 if spec.parameter_size.upper().endswith("B") else 1e6)
                ),
                "general.quantization_version": 2,
                f"{arch}.context_length": spec.context_length,
                f"{arch}.embedding_length": spec.embedding_length,
            }
        )
        return _Body(
            200,
            {
                "license": "Apache License\nVersion 2.0, January 2004",
                "modelfile": modelfile,
                "parameters": parameters,
                "template": template,
                "details": spec.details(),
                "model_info": model_info,
                "capabilities": list(spec.capabilities),
                "modified_at": spec.modified_at,
            },
        )

    def _chat(self, record):
        body = self._json_body(record, "ChatRequest")
        name, spec = self._model_for(body)
        keep_alive = body.get("keep_alive")
        messages = body.get("messages") or []
        if not messages and parse_keep_alive(keep_alive) == 0:
            self._touch(spec, 0)
            return _Body(200, self._chat_done(name, "unload"))
        if "completion" not in spec.capabilities:
            raise _ApiError(400, f"{go_quote(name)} does not support chat")
        if body.get("think") and "thinking" not in spec.capabilities:
            raise _ApiError(400, f"{go_quote(name)} does not support thinking")
        if body.get("tools") and "tools" not in spec.capabilities:
            raise _ApiError(400, f"{spec.full_name} does not support tools")
        self._touch(spec, keep_alive)
        if not messages:
            return _Body(200, self._chat_done(name, "load"))

        thinking, content, calls, reason, eval_count = self._script("/api/chat", body, spec)

        def chunk(message: dict) -> dict:
            return {"model": name, "created_at": None, "message": message, "done": False}

        lines = [chunk({"role": "assistant", "content": "", "thinking": t}) for t in thinking]
        lines += [chunk({"role": "assistant", "content": t}) for t in content]
        if calls:
            lines.append(chunk({"role": "assistant", "content": "", "tool_calls": calls}))
        prompt_count = self._prompt_tokens(*(m.get("content") for m in messages if isinstance(m, dict)))
        prompt_count += 4 * len(messages) + 2
        final = {
            "model": name,
            "created_at": None,
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
            **self._metrics(prompt_count, eval_count),
        }
        lines.append(final)

        def collapse(lines: list) -> dict:
            # server/routes.go ChatHandler: the last chunk, with the text of
            # every chunk joined and the tool calls gathered.
            out = dict(lines[-1])
            message = {"role": "assistant", "content": "".join(l["message"].get("content", "") for l in lines)}
            joined_thinking = "".join(l["message"].get("thinking", "") for l in lines)
            if joined_thinking:
                message["thinking"] = joined_thinking
            gathered = [c for l in lines for c in l["message"].get("tool_calls", [])]
            if gathered:
                message["tool_calls"] = gathered
            out["message"] = message
            return out

        return _Lines(lines, body.get("stream") is not False, collapse)

    def _chat_done(self, name: str, reason: str) -> dict:
        return {
            "model": name,
            "created_at": self.now(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
        }

    def _generate(self, record):
        body = self._json_body(record, "GenerateRequest")
        name, spec = self._model_for(body)
        keep_alive = body.get("keep_alive")
        prompt = body.get("prompt") or ""
        if not prompt and parse_keep_alive(keep_alive) == 0:
            self._touch(spec, 0)
            return _Body(200, self._generate_done(name, "unload"))
        if "completion" not in spec.capabilities:
            raise _ApiError(400, f"{go_quote(name)} does not support generate")
        if body.get("think") and "thinking" not in spec.capabilities:
            raise _ApiError(400, f"{go_quote(name)} does not support thinking")
        if body.get("suffix") and "insert" not in spec.capabilities:
            # The model's template has no suffix: no fill-in-the-middle.
            raise _ApiError(400, f"{spec.full_name} does not support insert")
        self._touch(spec, keep_alive)
        if not prompt:
            return _Body(200, self._generate_done(name, "load"))

        thinking, content, _calls, reason, eval_count = self._script("/api/generate", body, spec)
        prompt_count = self._prompt_tokens(prompt, body.get("system"), body.get("suffix")) + 6

        def chunk(response: str, thought: Optional[str] = None) -> dict:
            out = {"model": name, "created_at": None, "response": response}
            if thought:
                out["thinking"] = thought
            out["done"] = False
            return out

        lines = [chunk("", t) for t in thinking] + [chunk(t) for t in content]
        final = {"model": name, "created_at": None, "response": "", "done": True, "done_reason": reason}
        if not body.get("raw"):
            final["context"] = [zlib.crc32(t.encode()) % 151_643 for t in tokenize(prompt) + thinking + content]
        final.update(self._metrics(prompt_count, eval_count))
        lines.append(final)

        def collapse(lines: list) -> dict:
            # server/routes.go GenerateHandler: the last chunk with the text joined.
            last = lines[-1]
            out = {"model": last["model"], "created_at": last["created_at"]}
            out["response"] = "".join(l.get("response", "") for l in lines)
            joined_thinking = "".join(l.get("thinking", "") for l in lines)
            if joined_thinking:
                out["thinking"] = joined_thinking
            out.update((k, v) for k, v in last.items() if k not in out and k != "thinking")
            return out

        return _Lines(lines, body.get("stream") is not False, collapse)

    def _generate_done(self, name: str, reason: str) -> dict:
        return {"model": name, "created_at": self.now(), "response": "", "done": True, "done_reason": reason}

    def _embed(self, record):
        started = self.clock.seconds()
        body = self._json_body(record, "EmbedRequest")
        name = body.get("model") or ""
        spec = self.find_model(name)
        if not name:
            raise _ApiError(400, "model is required")
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            inputs = [raw_input] if raw_input else []
        elif isinstance(raw_input, list) and all(isinstance(v, str) for v in raw_input):
            inputs = raw_input
        elif raw_input is None:
            inputs = []
        else:
            raise _ApiError(400, "invalid input type")
        if spec is None:
            raise _ApiError(404, f"model {go_quote(name)} not found, try pulling it first")
        self._touch(spec, body.get("keep_alive"))
        if not inputs:
            return _Body(200, {"model": name, "embeddings": []})
        dims = spec.embedding_length
        wanted = body.get("dimensions")
        if isinstance(wanted, int) and not isinstance(wanted, bool) and 0 < wanted < dims:
            dims = wanted
        vectors = [embedding(spec.name, text, dims) for text in inputs]
        prompt_count = sum(len(tokenize(t)) + 2 for t in inputs)
        load = int(self.load_duration * 1e9)
        total = max(int((self.clock.seconds() - started) * 1e9), load + prompt_count * self.prompt_eval_ns_per_token)
        out = {"model": name, "embeddings": vectors, "total_duration": total, "load_duration": load}
        out["prompt_eval_count"] = prompt_count
        return _Body(200, out)

    def _embeddings(self, record):
        """The legacy C{/api/embeddings} (Ollama writes float64s here; we send the same 6-decimal values)."""
        body = self._json_body(record, "EmbeddingRequest")
        name = body.get("model") or ""
        if not name:
            raise _ApiError(400, "model is required")
        spec = self.find_model(name)
        if spec is None:
            raise _ApiError(404, f"model {go_quote(name)} not found, try pulling it first")
        prompt = body.get("prompt") or ""
        if not prompt:
            return _Body(200, {"embedding": []})
        return _Body(200, {"embedding": embedding(spec.name, prompt, spec.embedding_length)})

    @staticmethod
    def _progress(body: dict, statuses: list) -> _Lines:
        """
        A progress stream (pull/push/create).  Without streaming Ollama's
        waitForStream answers the last status, as C{application/json}.
        """
        return _Lines(statuses, body.get("stream") is not False, lambda lines: lines[-1], BARE_JSON_TYPE)

    def _pull(self, record):
        body = self._json_body(record, "PullRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _ApiError(400, "invalid model name")
        spec = self.find_model(name) or ModelSpec.named(name, modified_at=self.now())
        digest = "sha256:" + spec.digest
        short = spec.digest[:12]
        total = spec.size
        statuses = [
            {"status": "pulling manifest"},
            {"status": f"pulling {short}", "digest": digest, "total": total},
            {"status": f"pulling {short}", "digest": digest, "total": total, "completed": total // 2},
            {"status": f"pulling {short}", "digest": digest, "total": total, "completed": total},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        self.models[spec.name] = spec
        return self._progress(body, statuses)

    def _push(self, record):
        body = self._json_body(record, "PushRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _ApiError(400, "model is required")
        spec = self.find_model(name)
        if spec is None:
            raise _ApiError(500, "file does not exist")
        digest = "sha256:" + spec.digest
        statuses = [
            {"status": "retrieving manifest"},
            {"status": "starting upload", "digest": digest, "total": spec.size},
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
        return self._progress(body, statuses)

    def _create(self, record):
        body = self._json_body(record, "CreateRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _ApiError(400, "model is required")
        source = body.get("from") or body.get("from_")
        if not source and not body.get("files"):
            raise _ApiError(400, "neither 'from' or 'files' was specified")
        base = self.find_model(source) if source else None
        if base is not None:
            spec = dataclasses.replace(base, name=name, digest="", modified_at=self.now())
        else:
            spec = ModelSpec.named(name, modified_at=self.now())
        layer = "sha256:" + (base.digest if base else spec.digest)
        statuses = [
            {"status": "gathering model components"},
            {"status": f"using existing layer {layer}"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        self.models[spec.name] = spec
        return self._progress(body, statuses)

    def _copy(self, record):
        body = self._json_body(record, "CopyRequest")
        source, destination = body.get("source") or "", body.get("destination") or ""
        if not source:
            raise _ApiError(400, f"source {go_quote(source)} is invalid")
        if not destination:
            raise _ApiError(400, f"destination {go_quote(destination)} is invalid")
        spec = self.find_model(source)
        if spec is None:
            raise _ApiError(404, f"model {go_quote(source)} not found")
        copied = dataclasses.replace(spec, name=destination, modified_at=self.now())
        self.models[copied.name] = copied
        return _Body(200, None, None)

    def _delete(self, record):
        body = self._json_body(record, "DeleteRequest")
        name = body.get("model") or body.get("name") or ""
        if not name:
            raise _ApiError(400, f"name {go_quote(name)} is invalid")
        spec = self.find_model(name)
        if spec is None:
            raise _ApiError(404, f"model '{name}' not found")
        del self.models[spec.name]
        self.loaded.pop(spec.name, None)
        return _Body(200, None, None)

    def _head_blob(self, record):
        digest = record.path.rsplit("/", 1)[-1]
        if digest in self.blobs:
            return _Body(200, None, None)
        return _Body(404, {"error": f"blob {go_quote(digest)} not found"})

    def _create_blob(self, record):
        digest = record.path.rsplit("/", 1)[-1]
        self.blobs.add(digest)
        return _Body(201, None, None)


# ---------------------------------------------------------------------------
# Running it as a process
# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    """
    C{python -m testing.fake_ollama [--port N] [--pace-ms MS] [--tokens N] ...}

    Prints C{Fake Ollama listening on http://HOST:PORT} once bound (with
    C{--port 0} the port is picked by the system) and serves until killed.
    """
    parser = argparse.ArgumentParser(
        prog="python -m testing.fake_ollama",
        description="A fake Ollama server. Prints 'Fake Ollama listening on URL' once bound.",
    )
    parser.add_argument("--port", type=int, default=11434, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="milliseconds between streamed lines")
    parser.add_argument("--lockstep", action="store_true",
                        help="with --pace-ms: every stream's lines on one shared clock (a batched decoder's steps)")
    parser.add_argument("--first-byte-ms", type=float, default=0.0, help="milliseconds before the first byte")
    parser.add_argument("--tokens", type=int, default=None, help="reply with this many tokens")
    parser.add_argument("--reply", default=None, help="reply text (instead of --tokens)")
    parser.add_argument("--model", action="append", default=None, help="a model to serve (repeatable)")
    parser.add_argument("--version", dest="ollama_version", default=DEFAULT_VERSION, help="what /api/version says")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = FakeOllama(
        models=args.model,
        reply_text=args.reply if args.reply is not None else DEFAULT_REPLY,
        tokens=None if args.reply is not None else args.tokens,
        version=args.ollama_version,
        clock=reactor,
    )
    if args.pace_ms or args.first_byte_ms:
        fake.behave(pace=args.pace_ms / 1000.0, delay_first_byte=args.first_byte_ms / 1000.0, lockstep=args.lockstep)
    fake.listen(reactor, port=args.port, interface=args.host)
    print(f"Fake Ollama listening on {fake.url}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
