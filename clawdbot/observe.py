"""
What the gateway tells its operator: one JSON access-log line per request
(a sampled share with bodies, secrets redacted) and Prometheus metrics.
"""

import json
import os
import random
import re
import sys
import time
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.logger import Logger

from clawdbot.web import KNOWN_METHODS

log = Logger(namespace="clawdbot.observe")

REDACTED = "[redacted]"
_SECRET_WORDS = r"pass(?:word)?|secret|token(?!s)|authorization|cookie|api[_-]?key|credential|code_verifier"
_SECRET_KEYS = re.compile(rf"({_SECRET_WORDS}|^code$)", re.IGNORECASE)
_DATA_URL = re.compile(r"data:([a-z]+/[a-z0-9.+-]+);base64,[A-Za-z0-9+/=\s]+", re.IGNORECASE)
# Token-shaped text wherever it is: an Authorization value, a JWT, a
# prefixed API key (sk-..., cb-...), or a long run of key characters that
# mixes letters and digits (checked in _token).
_TOKENS = re.compile(
    r"(?P<bearer>Bearer\s+)[A-Za-z0-9._~+/=-]+"
    r"|(?P<jwt>eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*)"
    r"|(?P<key>(?<![A-Za-z0-9])(?:sk|cb|pk|rk|ghp|gho|ghs|xox[abprs]|AKIA)[-_][A-Za-z0-9_-]{12,})"
    r"|(?P<long>(?<![A-Za-z0-9_+/=-])[A-Za-z0-9_+/=-]{32,})",
    re.IGNORECASE,
)
# A secret-named key and its value (JSON-ish "key": "value", key=value,
# key: value) in text that is not (or not valid) JSON: the value is dropped.
_SECRET_PAIRS = re.compile(
    rf"""((?:{_SECRET_WORDS})[A-Za-z0-9_.-]*["']?\s*[:=]\s*|\bcode=)"""
    rf"""((?:Bearer|Basic|Digest|Token)\s+[^\s&,;}}\]"']+|"(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s&,;}}\]]+)""",
    re.IGNORECASE,
)
BODY_LIMIT = 64 * 1024


def _token(match):
    if match.group("bearer"):
        return match.group("bearer") + REDACTED
    text = match.group("long")
    if text is not None and not (any(c.isdigit() for c in text) and any(c.isalpha() for c in text)):
        return text  # a long word, not a key
    return REDACTED


def redact_text(text):
    """C{text} with image data, secret-named values and token-shaped strings replaced."""
    text = _DATA_URL.sub(lambda m: f"[{m.group(1)} data]", text)
    text = _SECRET_PAIRS.sub(lambda m: m.group(1) + REDACTED, text)
    return _TOKENS.sub(_token, text)


def is_token_shaped(text):
    """C{text} holds something that looks like a credential (L{redact_text} would change it)."""
    return redact_text(text) != text


def redact(value):
    """A copy of a parsed JSON value with secrets and image data replaced."""
    if isinstance(value, dict):
        return {
            (redact_text(k) if isinstance(k, str) else k): (REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_body(raw, ctype=None):
    """
    A loggable form of a body, judged by its content, whatever its declared
    type: parsed and redacted JSON, else redacted, truncated text.
    """
    if not raw:
        return None
    if len(raw) > BODY_LIMIT:
        # A cut JSON document cannot be parsed, so its secret-named fields
        # could not be found: say how big it was instead.
        return {"omitted": "body larger than the sampling limit", "bytes_at_least": len(raw)}
    try:
        return redact(json.loads(raw))
    except (ValueError, RecursionError):
        pass
    text = raw.decode("utf-8", "replace")
    return "\n".join(_redact_line(line) for line in text.split("\n"))


def _redact_line(line):
    # A stream's lines (SSE "data: {...}", NDJSON) are JSON one by one.
    head, json_part = ("data: ", line[6:]) if line.startswith("data: {") else ("", line)
    if json_part.startswith("{"):
        try:
            return head + json.dumps(redact(json.loads(json_part)), ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
    return redact_text(line)


def safe_path(request):
    """
    The path without its query string (query keys are kept, values
    dropped), with any token-shaped segment or key replaced.
    """
    if request.path is None:
        return "-"
    segments = request.path.decode("utf-8", "replace").split("/")
    path = "/".join(REDACTED if is_token_shaped(unquote(s)) else s for s in segments)
    keys = sorted(k.decode("utf-8", "replace") for k in (request.args or ()))
    keys = [REDACTED if is_token_shaped(k) else k for k in keys]
    return path + ("?" + "&".join(f"{k}=…" for k in keys) if keys else "")


class AccessLog:
    """One JSON line per finished request, to stdout or a file (reopened on demand)."""

    def __init__(self, path="-", rand=random.random):
        self.path = path
        self.rand = rand
        self.stream = None
        self.open()

    def open(self):
        if self.path == "-":
            self.stream = sys.stdout
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.stream = open(self.path, "a", encoding="utf-8", buffering=1)

    def reopen(self):
        """After logrotate moved the file (SIGUSR1)."""
        if self.path != "-" and self.stream is not None:
            self.stream.close()
        self.open()

    def sampled(self, rate):
        return rate > 0 and self.rand() < rate

    def record(self, request, latency):
        audit = request.audit
        principal = request.principal
        status = request.code
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z",
            "request_id": request.request_id,
            "method": (request.method or b"-")[:32].decode("ascii", "replace"),
            "path": safe_path(request),
            "status": status,
            "latency_ms": round(latency * 1000, 3),
            "bytes": request.sentLength,
            "user": principal.sub if principal is not None else None,
            "session": audit.get("session"),
            "model": audit.get("model"),
            "tokens": audit.get("tokens"),
            "upstream_latency_ms": round(audit["upstream_latency"] * 1000, 3) if "upstream_latency" in audit else None,
            "peer": getattr(request.getClientAddress(), "host", None),
        }
        if request.gone:
            entry["client_gone"] = True
        if request.error is not None:
            details = request.error.details
            entry["error"] = {"code": request.error.code, "details": redact_text(details) if isinstance(details, str) else details}
        if request.sampled:
            entry["sampled"] = True
            entry["request_body"] = redact_body(request.body_sample, _header(request.requestHeaders, b"content-type"))
            entry["response_body"] = redact_body(b"".join(request.captured or []), _header(request.responseHeaders, b"content-type"))
        try:
            self.stream.write(log_line(entry))
        except Exception:
            log.failure("Could not write the access log")


def log_line(entry):
    """
    One JSON line; a string UTF-8 cannot carry (a lone surrogate) is written
    as a C{\\u} escape rather than losing the line.
    """
    line = json.dumps(entry, ensure_ascii=False, default=str) + "\n"
    if not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(entry, default=str) + "\n"
    return line


def _header(headers, name):
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self, gateway):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("clawdbot_requests_total", "Requests by route, method and status.", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "clawdbot_request_duration_seconds",
            "Time from request to response end, by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.ttft = Histogram(
            "clawdbot_time_to_first_token_seconds",
            "Time from request to the first streamed chunk sent.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.tokens = Counter("clawdbot_tokens_total", "Tokens reported by Ollama.", ["direction"], registry=r)
        self.active_streams = Gauge("clawdbot_active_streams", "Streamed replies in progress.", registry=r)
        self.rejections = Counter("clawdbot_rejections_total", "Requests refused, by error code.", ["code"], registry=r)
        self.reloads = Counter("clawdbot_config_reloads_total", "Config reloads by result.", ["result"], registry=r)
        self.ratelimit_backend_errors = Counter(
            "clawdbot_ratelimit_backend_errors_total", "Rate-limit checks the shared backend (Redis) could not answer.", registry=r
        )
        self.backend_up = Gauge("clawdbot_backend_up", "1 when the last contact with Ollama succeeded.", registry=r)
        queue = Gauge("clawdbot_queue_depth", "Requests waiting for a backend slot.", registry=r)
        queue.set_function(lambda: len(gateway.backend.slots.waiting))
        busy = Gauge("clawdbot_backend_active", "Backend calls in progress.", registry=r)
        busy.set_function(lambda: gateway.backend.slots.active)
        self.backend_up.set(1)

    def observe(self, request, latency):
        # Every label value comes from a fixed set, never from the client:
        # route names are the resources' own, a method outside the known ones is "other".
        route = request.route or "other"
        method = request.method.decode("ascii") if request.method in KNOWN_METHODS else "other"
        self.requests.labels(route, method, str(request.code)).inc()
        self.latency.labels(route).observe(latency)
        if request.error is not None and request.code >= 400 and request.code != 404:
            self.rejections.labels(request.error.code).inc()
        usage = request.audit.get("usage")
        if usage:
            self.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
            self.tokens.labels("completion").inc(usage.get("completion_tokens", 0))

    def render(self):
        return generate_latest(self.registry)
