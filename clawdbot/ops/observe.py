"""
What the gateway tells its operator: one JSON access-log line per request
(a sampled share with bodies, secrets redacted) and Prometheus metrics.
"""

import functools
import json
import os
import random
import re
import sys
import time
from urllib.parse import parse_qsl, unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from twisted.logger import Logger

from clawdbot.strictjson import loads_checked
from clawdbot.net import KNOWN_METHODS
from clawdbot.units import rfc3339

log = Logger(namespace="clawdbot.observe")

REDACTED = "[redacted]"

# Secret-ish names, judged on the name split into lower-case words
# (camelCase, snake_case, kebab-case, dotted: "clientSecret", "x_api_key",
# "X-Auth-Token" are all words).  Three kinds:
# - parts that name a secret wherever they appear, glued to other words or
#   not ("mypassword", "xapikey", "refreshToken"); "tokens" and "tokenizer"
#   are counts and tools, not credentials;
_SECRET_PARTS = re.compile(
    r"pass(?:word|wd|phrase|code)|secret|credential|cookie|authori[sz]ation|bearer|signature|verifier|assertion"
    r"|token(?!s|iz)|(?:api|access|private|priv|secret|auth|session|signing|master|encryption|client)_?key|pin_?code"
)
# - short words that do only as a whole word ("auth" but not "author", "pin"
#   but not "pinned", "key" but not "monkey");
_SECRET_WORDS = frozenset({"pwd", "pass", "auth", "oauth", "sig", "otp", "totp", "pin", "jwt", "key", "keys", "hmac", "csrf", "xsrf"})
# - names that are a secret only as the whole name: "session" (a cookie's
#   value; "session_id" is an audit field and stays), "refresh" (a refresh
#   credential), and "code" where it is an OAuth authorization code (in
#   requests and query strings, not the error code of a response).
_SECRET_NAMES = frozenset({"session", "refresh"})
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")
_DATA_URL = re.compile(r"data:([a-z]+/[a-z0-9.+-]+);base64,[A-Za-z0-9+/=\s]+", re.IGNORECASE)
# Token-shaped text wherever it is: an Authorization value (the Bearer,
# Token, Basic or Digest scheme and its credentials, auth-params included;
# "bearer" in any case, the others capitalised or upper-case, so that prose
# such as "token is expired" stays readable), a JWT, a
# prefixed API key (sk-..., cb-...), or a long run of key characters that
# mixes letters and digits (checked in _token).
_TOKENS = re.compile(
    r"(?P<bearer>(?<![A-Za-z0-9])(?:Bearer|(?-i:Token|TOKEN|Basic|BASIC|Digest|DIGEST))\s+)"
    r"[A-Za-z0-9._~+/=-]+(?:\"[^\"]*\")?(?:[ \t]*,[ \t]*[A-Za-z0-9_-]+=(?:\"[^\"]*\"|[A-Za-z0-9._~+/=-]*))*"
    r"|(?P<jwt>eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*)"
    r"|(?P<key>(?<![A-Za-z0-9])(?:sk|cb|pk|rk|ghp|gho|ghs|xox[abprs]|AKIA)[-_][A-Za-z0-9_-]{12,})"
    r"|(?P<long>(?<![A-Za-z0-9_+/=-])[A-Za-z0-9_+/=-]{32,})",
    re.IGNORECASE,
)
# A name and its value (JSON-ish "name": "value", name=value, name: value)
# in text that is not (or not valid) JSON: the value is dropped when the
# name is secret (L{is_secret_name}).  A name starts where a run of name
# characters starts (linear time on any text).
_NAME = re.compile(r"""(?<![A-Za-z0-9_.-])([A-Za-z0-9_.-]+)["']?[ \t]*[:=][ \t]*""")
_VALUE = re.compile(r"""(?:Bearer|Basic|Digest|Token)\s+[^\s&,;}\]"']+|"(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s&,;}\]]+""", re.IGNORECASE)
BODY_LIMIT = 64 * 1024


@functools.lru_cache(maxsize=4096)
def _name_words(name):
    return tuple(w for w in _SEPARATORS.split(_CAMEL.sub("_", name).lower()) if w)


def is_secret_name(name, oauth_code=True):
    """
    C{name} (a JSON key, a form field, a query key) names a secret: see
    L{_SECRET_PARTS}, L{_SECRET_WORDS}, L{_SECRET_NAMES}.  With
    C{oauth_code}, a name that is just C{code} is one too.
    """
    words = _name_words(name)
    if not words:
        return False
    if _SECRET_PARTS.search("_".join(words)) or any(w in _SECRET_WORDS for w in words):
        return True
    whole = "".join(words)
    return whole in _SECRET_NAMES or (oauth_code and whole == "code")


def _token(match):
    if match.group("bearer"):
        return match.group("bearer") + REDACTED
    text = match.group("long")
    if text is not None and not (any(c.isdigit() for c in text) and any(c.isalpha() for c in text)):
        return text  # a long word, not a key
    return REDACTED


def redact_text(text, oauth_code=True):
    """C{text} with image data, secret-named values and token-shaped strings replaced."""
    text = _DATA_URL.sub(lambda m: f"[{m.group(1)} data]", text)
    text = _redact_pairs(text, oauth_code)
    return _TOKENS.sub(_token, text)


def _redact_pairs(text, oauth_code):
    """C{text} with the value after each secret name (C{name: value}, C{name=value}) replaced."""
    out, cursor = [], 0
    for match in _NAME.finditer(text):
        if match.start() < cursor or not is_secret_name(match.group(1), oauth_code):
            continue  # inside a value already dropped, or a harmless name
        value = _VALUE.match(text, match.end())
        if value is None:
            continue
        out += [text[cursor:match.end()], REDACTED]
        cursor = value.end()
    if not out:
        return text
    out.append(text[cursor:])
    return "".join(out)


def is_token_shaped(text):
    """C{text} holds something that looks like a credential (L{redact_text} would change it)."""
    return redact_text(text) != text


def redact(value, oauth_code=True):
    """
    A copy of a parsed JSON value with secrets and image data replaced.
    C{oauth_code}: a key named C{code} is an OAuth authorization code (in a
    request), not an error code (in a response).
    """
    if isinstance(value, dict):
        return {
            (redact_text(k, oauth_code) if isinstance(k, str) else k): (
                REDACTED if isinstance(k, str) and is_secret_name(k, oauth_code) else redact(v, oauth_code)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, oauth_code) for v in value]
    if isinstance(value, str):
        return redact_text(value, oauth_code)
    return value


def _media_type(ctype):
    return ctype.split(";", 1)[0].strip(" \t").lower() if ctype else None


# Lines of a stream that are not JSON but are logged as they are: SSE's end
# marker and the blank line that ends each event.  Any other line that does
# not parse keeps the whole body out of the log.
STREAM_MARKERS = frozenset({"", "data: [DONE]"})


def _omitted(raw, media):
    return {"omitted": "body not logged: not JSON, a JSON stream or a form", "bytes": len(raw), "type": media}


def redact_body(raw, ctype=None, response=False):
    """
    A loggable form of a body, only ever from a parsed form of it: JSON that
    parses, whatever its declared type (secret-named keys dropped, free
    values redacted); a stream (SSE C{data:} lines, NDJSON) whose every line
    parses as JSON or is one of L{STREAM_MARKERS}, each line redacted; the
    fields of a form (urlencoded or multipart, by its declared type) with
    secret-named values dropped.  Anything else (a body that does not parse,
    XML, text, bytes) is described by its size and type, never its text: a
    secret in a form no parser understood cannot be found.  C{response}: a
    response body, where C{"code"} is an error code, not a secret.
    """
    if not raw:
        return None
    if len(raw) > BODY_LIMIT:
        # A cut JSON document cannot be parsed, so its secret-named fields
        # could not be found: say how big it was instead.
        return {"omitted": "body larger than the sampling limit", "bytes_at_least": len(raw)}
    oauth_code = not response
    try:
        return redact(loads_checked(raw), oauth_code)
    except (ValueError, RecursionError):
        pass
    media = _media_type(ctype)
    if media == "application/x-www-form-urlencoded":
        fields = _form_fields(raw)
        if fields is not None:
            return {"form": _redact_fields(fields, oauth_code)}
    elif media == "multipart/form-data":
        fields = _multipart_fields(raw, ctype)
        if fields is not None:
            return {"form-data": _redact_fields(fields, oauth_code)}
    else:
        stream = _redact_stream(raw, oauth_code)
        if stream is not None:
            return stream
    return _omitted(raw, media)


def _redact_stream(raw, oauth_code):
    """
    C{raw} as a stream of JSON lines (NDJSON, or SSE C{data: } lines), each
    redacted, as text; C{None} unless every line parses or is a marker.
    """
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    out = []
    for line in lines:
        if line in STREAM_MARKERS:
            out.append(line)
            continue
        head, json_part = ("data: ", line[6:]) if line.startswith("data: ") else ("", line)
        try:
            value = loads_checked(json_part)
        except (ValueError, RecursionError):
            return None
        out.append(head + json.dumps(redact(value, oauth_code), ensure_ascii=False))
    return "\n".join(out)


def _redact_fields(fields, oauth_code):
    """C{[(name, value)]} form fields as C{{name: value}}, secret-named values dropped."""
    out = {}
    for name, value in fields:
        shown = REDACTED if is_secret_name(name, oauth_code) else (redact_text(value, oauth_code) if isinstance(value, str) else value)
        name = redact_text(name, oauth_code)
        if name in out:
            out[name] = (out[name] if isinstance(out[name], list) else [out[name]]) + [shown]
        else:
            out[name] = shown
    return out


def _form_fields(raw):
    try:
        return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=1000)
    except (UnicodeDecodeError, ValueError):
        return None


_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,200})"|([^\s;"]{1,200}))""", re.IGNORECASE)
_DISPOSITION_PARAM = re.compile(rb"""\b(name|filename)\*?=(?:"([^"]*)"|([^\s;]*))""", re.IGNORECASE)


def _multipart_fields(raw, ctype):
    """
    The fields of a C{multipart/form-data} body as C{[(name, value)]}: a
    text field's value as text, a file (or non-UTF-8 value) as a note of
    its name and size; C{None} when the body is not multipart.
    """
    match = _BOUNDARY.search(ctype or "")
    if match is None:
        return None
    boundary = (match.group(1) or match.group(2)).encode("latin-1", "replace")
    fields = []
    for part in raw.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, sep, value = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            return None
        if value.endswith(b"\r\n"):
            value = value[:-2]
        params = {}
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:"):
                params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _DISPOSITION_PARAM.finditer(line)}
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in params:
            fields.append((name, {"file": redact_text(params[b"filename"].decode("utf-8", "replace")), "bytes": len(value)}))
            continue
        try:
            fields.append((name, value.decode("utf-8")))
        except UnicodeDecodeError:
            fields.append((name, {"bytes": len(value)}))
    return fields if fields else None


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


# nginx's "client closed request": the client left before any byte of an
# answer was sent (while queued, or before the first chunk).
CLIENT_CLOSED = 499


def logged_status(request):
    """
    The status the access log and metrics record: the response's, or
    L{CLIENT_CLOSED} when the client left and nothing was written (a 200
    no one was sent is not a 200).  A request refused early has its answer
    out already, written straight to the connection.
    """
    if request.gone and not request.startedWriting and not request.refused:
        return CLIENT_CLOSED
    return request.code


def _text_field(value):
    """A client-chosen text for a log field, token-shaped parts redacted."""
    return redact_text(value) if isinstance(value, str) else value


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
        status = logged_status(request)
        entry = {
            "time": rfc3339(time.time()),
            "request_id": request.request_id,
            "method": (request.method or b"-")[:32].decode("ascii", "replace"),
            "path": safe_path(request),
            "status": status,
            "latency_ms": round(latency * 1000, 3),
            "bytes": request.sentLength,
            "user": principal.sub if principal is not None else None,
            "idp": principal.issuer if principal is not None else None,
            # Both come from the request: a credential pasted there is not logged.
            "session": _text_field(audit.get("session")),
            "model": _text_field(audit.get("model")),
            "tokens": audit.get("tokens"),
            "upstream_latency_ms": round(audit["upstream_latency"] * 1000, 3) if "upstream_latency" in audit else None,
            "peer": request.client_host(),
        }
        if request.trace_id is not None:
            entry["trace_id"] = request.trace_id  # (tracing.enabled: the request's trace, sampled or not)
        if principal is not None and principal.key_id is not None:
            entry["key_id"] = principal.key_id  # the API key's id, never the key
        if request.gone:
            entry["client_gone"] = True
        if request.error is not None:
            details = request.error.details
            entry["error"] = {"code": request.error.code, "details": redact_text(details) if isinstance(details, str) else details}
        if request.sampled:
            entry["sampled"] = True
            entry["request_body"] = redact_body(request.body_sample, _header(request.requestHeaders, b"content-type"))
            entry["response_body"] = redact_body(b"".join(request.captured or []), _header(request.responseHeaders, b"content-type"), response=True)
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


def model_label(config, model):
    """A model as a metric label: its name when C{backend.model_limits} names it (or an alias of it), else C{other}."""
    limits = config.backend.model_limits
    if model in limits or any(config.backend.aliases.get(name) == model for name in limits):
        return model
    return "other"


def named_model(config, model):
    """
    A model as a label of the GenAI metrics: its name when the config names
    it (C{backend.model}, C{backend.models}, C{backend.aliases},
    C{backend.model_limits}), else C{other}.  Ollama answers any spelling of
    a model it has (case, a registry prefix), so the name a call used is
    not bounded by the models served.
    """
    backend = config.backend
    if model == backend.model or model in backend.models or model in backend.aliases or model in backend.model_limits:
        return model
    return "other"


class _ModelSlots:
    """Calls in progress and waiting per model that C{backend.model_limits} caps (read when scraped)."""

    def __init__(self, model_slots):
        self.model_slots = model_slots

    def describe(self):
        return []

    def collect(self):
        active = GaugeMetricFamily("clawdbot_model_active", "Backend calls in progress, per capped model.", labels=["model"])
        queued = GaugeMetricFamily("clawdbot_model_queue_depth", "Calls waiting for a slot of their model, per capped model.", labels=["model"])
        for model, slots in sorted(self.model_slots.items()):
            active.add_metric([model], slots.active)
            queued.add_metric([model], len(slots.waiting))
        yield active
        yield queued


class Metrics:
    """
    The gateway's Prometheus metrics, in a registry of its own.

    @param slots: the backend's concurrency cap (L{clawdbot.backend.ollama.Slots}),
        whose queue and calls in progress are read when scraped.
    """

    def __init__(self, slots, model_slots=None):
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
        # Per model: the models backend.model_limits names (any other is "other"),
        # so clients cannot make label values.  Tokens per second is the rate of
        # clawdbot_model_tokens_total{direction="completion"}.
        self.model_tokens = Counter("clawdbot_model_tokens_total", "Tokens reported by Ollama, per capped model.", ["model", "direction"], registry=r)
        self.model_ttft = Histogram(
            "clawdbot_model_time_to_first_token_seconds",
            "Time from request to the first streamed chunk sent, per capped model.",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        # The OpenTelemetry GenAI metrics, by model (a name the config names,
        # see named_model): token counts per call, and time to the first
        # token (buckets as the conventions advise).
        self.gen_ai_tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per model call (OpenTelemetry GenAI), by model and token type (input, output).",
            ["model", "token_type"],
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
            registry=r,
        )
        self.gen_ai_ttft = Histogram(
            "gen_ai_server_time_to_first_token",
            "Seconds from the request to the first streamed token sent (OpenTelemetry GenAI), by model.",
            ["model"],
            buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
            registry=r,
        )
        self.trace_spans_dropped = Counter("clawdbot_trace_spans_dropped", "Spans dropped because the export queue was full (tracing.queue).", registry=r)
        self.trace_exports_failed = Counter("clawdbot_trace_exports_failed", "Span batches the trace collector did not take.", registry=r)
        self.active_streams = Gauge("clawdbot_active_streams", "Streamed replies in progress.", registry=r)
        self.rejections = Counter("clawdbot_rejections_total", "Requests refused, by error code.", ["code"], registry=r)
        self.reloads = Counter("clawdbot_config_reloads_total", "Config reloads by result.", ["result"], registry=r)
        self.ratelimit_backend_errors = Counter(
            "clawdbot_ratelimit_backend_errors_total", "Rate-limit checks the shared backend (Redis) could not answer.", registry=r
        )
        self.quota_refusals = Counter(
            "clawdbot_quota_refusals_total",
            "Calls a quota refused (shadow=\"true\": would have refused), by quota and subject (user, team, key).",
            ["quota", "subject", "shadow"],
            registry=r,
        )
        self.backend_up = Gauge("clawdbot_backend_up", "1 when the last contact with Ollama succeeded.", registry=r)
        self.dependency_up = Gauge(
            "clawdbot_dependency_up", "1 when /readyz's last check of the dependency (backend, storage, rate_limit) succeeded.", ["dependency"], registry=r
        )
        self.queue_wait = Histogram(
            "clawdbot_queue_wait_seconds",
            "Time calls waited for a backend slot, by fair-share class (limits.fair_share.weights, else default).",
            ["class"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        queue = Gauge("clawdbot_queue_depth", "Requests waiting for a backend slot.", registry=r)
        queue.set_function(lambda: len(slots.waiting))
        busy = Gauge("clawdbot_backend_active", "Backend calls in progress.", registry=r)
        busy.set_function(lambda: slots.active)
        if model_slots is not None:
            r.register(_ModelSlots(model_slots))
        self.backend_up.set(1)

    def observe(self, request, latency):
        # Every label value comes from a fixed set, never from the client:
        # route names are the resources' own, a method outside the known ones is "other".
        route = request.route or "other"
        method = request.method.decode("ascii") if request.method in KNOWN_METHODS else "other"
        self.requests.labels(route, method, str(logged_status(request))).inc()
        self.latency.labels(route).observe(latency)
        if request.error is not None and request.code >= 400 and request.code != 404:
            self.rejections.labels(request.error.code).inc()
        usage = request.audit.get("usage")
        if usage:
            self.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
            self.tokens.labels("completion").inc(usage.get("completion_tokens", 0))
            if "model" in request.audit and request.config is not None:
                model = model_label(request.config, request.audit["model"])
                self.model_tokens.labels(model, "prompt").inc(usage.get("prompt_tokens", 0))
                self.model_tokens.labels(model, "completion").inc(usage.get("completion_tokens", 0))
                named = named_model(request.config, request.audit["model"])
                self.gen_ai_tokens.labels(named, "input").observe(usage.get("prompt_tokens", 0))
                self.gen_ai_tokens.labels(named, "output").observe(usage.get("completion_tokens", 0))

    def first_token(self, request, seconds):
        """A streamed reply's first chunk went out C{seconds} after the request arrived."""
        self.ttft.observe(seconds)
        if "model" in request.audit and request.config is not None:
            self.model_ttft.labels(model_label(request.config, request.audit["model"])).observe(seconds)
            self.gen_ai_ttft.labels(named_model(request.config, request.audit["model"])).observe(seconds)

    def render(self):
        return generate_latest(self.registry)
