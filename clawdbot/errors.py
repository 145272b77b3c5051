"""
The one error shape.

Handlers raise L{APIError}; L{error_body} is the only place that turns one
into the JSON body clients see, which is compatible with OpenAI clients::

    {"error": {"message": ..., "type": ..., "code": ..., "details": ...}}

C{details} is always a short reason chosen by this project, never a library's
exception text or an internal address.
"""

import json
import re
from collections.abc import Mapping
from typing import Any

# code -> (HTTP status, OpenAI-style type, default message)
CODES = {
    "AUTH_MISSING_TOKEN": (401, "authentication_error", "Authentication required"),
    "AUTH_INVALID_TOKEN": (401, "authentication_error", "Invalid or expired token"),
    "AUTH_INSUFFICIENT_SCOPE": (403, "permission_error", "Insufficient scope"),
    "ORIGIN_REJECTED": (403, "permission_error", "Request origin not allowed"),
    "CSRF_REJECTED": (403, "permission_error", "Cross-site request refused"),
    "INVALID_REQUEST": (400, "invalid_request_error", "Invalid request"),
    "NOT_FOUND": (404, "not_found_error", "Not found"),
    "METHOD_NOT_ALLOWED": (405, "invalid_request_error", "Method not allowed"),
    "PAYLOAD_TOO_LARGE": (413, "invalid_request_error", "Request body too large"),
    "REQUEST_TIMEOUT": (408, "invalid_request_error", "Request timed out"),
    "HEADER_TOO_LARGE": (431, "invalid_request_error", "Request header fields too large"),
    "RATE_LIMITED": (429, "rate_limit_error", "Rate limit exceeded"),
    "GATEWAY_BUSY": (503, "server_error", "Gateway busy"),
    "MODEL_NOT_FOUND": (404, "invalid_request_error", "Model not found"),
    "UPSTREAM_UNAVAILABLE": (502, "upstream_error", "Model backend unavailable"),
    "UPSTREAM_TIMEOUT": (504, "upstream_error", "Model backend timed out"),
    "QUOTA_EXCEEDED": (429, "rate_limit_error", "Quota exceeded"),
    "MODEL_NOT_ALLOWED": (403, "permission_error", "Model not allowed"),
    "STORAGE_UNAVAILABLE": (503, "server_error", "History storage unavailable"),
    "NOT_IMPLEMENTED": (501, "invalid_request_error", "Method not implemented"),
    "INTERNAL_ERROR": (500, "server_error", "Internal server error"),
    "NOT_READY": (503, "server_error", "Not ready"),
    "SHUTTING_DOWN": (503, "server_error", "The gateway is shutting down"),
}


# Refusals a client's automatic retry cannot get past (a quota resets in
# hours; a method stays unknown): they say so in the header the OpenAI and
# Anthropic SDKs read before retrying a 429 or a 5xx.
NO_RETRY = frozenset({"QUOTA_EXCEEDED", "NOT_IMPLEMENTED"})


class APIError(Exception):
    """
    A request failed in a way the client should hear about.

    @ivar code: one of L{CODES}.
    @ivar status: the HTTP status.
    @ivar headers: extra response headers, as C{{name: value}}.
    """

    def __init__(
        self,
        code: str,
        details: str | None = None,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
        param: str | None = None,
    ) -> None:
        default_status, self.type, default_message = CODES[code]
        self.code = code
        self.status = status or default_status
        self.message = message or default_message
        self.details = details
        self.param = param if param is not None else param_of(details)
        self.headers = dict(headers or {})
        if code in NO_RETRY:
            self.headers.setdefault("x-should-retry", "false")
        super().__init__(f"{code}: {details or self.message}")

    # The trace of the request it answers (tracing.enabled), in the body: see L{traced}.
    trace_id: str | None = None

    def traced(self, trace_id: str | None) -> "APIError":
        """This error answering a request of trace C{trace_id}: a copy that says so (an error may be shared)."""
        if trace_id is None:
            return self
        copy = APIError(self.code, self.details, self.message, self.headers, self.status, self.param)
        copy.trace_id = trace_id
        return copy

    def as_dict(self) -> dict[str, dict[str, Any]]:
        # OpenAI SDKs show only `message`, so it carries the reason too.
        message = f"{self.message}: {self.details}" if self.details else self.message
        error: dict[str, Any] = {"message": message, "type": self.type, "code": self.code, "param": self.param}
        if self.details is not None:
            error["details"] = self.details
        if self.trace_id is not None:
            error["trace_id"] = self.trace_id
        return {"error": error}


# A curated reason names the request field it refuses first: 'model' ...,
# messages[2].content ..., 'options.num_ctx' ..., tools[0].function.name ...
_FIELD = re.compile(r"^(?:'([A-Za-z_][\w.\[\]]*)'|((?:messages|tools|input)\[\d+\][\w.\[\]]*))")


def param_of(details: object) -> str | None:
    """The request field a curated reason names at its start (OpenAI's C{param}), or C{None}."""
    if not isinstance(details, str):
        return None
    match = _FIELD.match(details)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).rstrip(".:")


def error_body(err: APIError) -> bytes:
    """The JSON bytes of C{err}'s body; any string (a lone surrogate too) can be written."""
    text = json.dumps(err.as_dict(), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(err.as_dict()).encode("ascii")


def ollama_error_body(err: APIError) -> bytes:
    """
    The JSON bytes of C{err} in Ollama's own shape, C{{"error": "<message>"}},
    for the native routes (Ollama clients read a string there).
    """
    message = err.as_dict()["error"]["message"]
    text = json.dumps({"error": message}, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps({"error": message}).encode("ascii")


class StorageUnavailable(APIError):
    """
    The history database (L{clawdbot.storage.store}: history, keys, usage,
    audit, stored responses) cannot answer now, for a reason outside the
    gateway: it is down, unreachable or restarting, no connection came
    within the pool's wait, the SQLite file is locked by another process
    past the busy timeout, its disk is full, or it cannot be opened or
    written.

    An L{APIError} (503 C{STORAGE_UNAVAILABLE} with C{Retry-After}), so
    every route answers it in the error shape, and a stream that has
    started ends with it as its error event, without a mapping of its own.
    A programming error (bad SQL, a broken constraint) is never one: it
    stays what it is (a 500 once it reaches a route).

    @ivar reason: what failed, for the operator's log: a curated phrase,
        never a DSN, a password or a library's message.
    """

    def __init__(self, reason: str, details: str = "the history database cannot be used right now; retry shortly", retry_after: int = 5) -> None:
        super().__init__("STORAGE_UNAVAILABLE", details=details, headers={"Retry-After": str(retry_after)})
        self.reason = reason


def internal_error() -> APIError:
    return APIError("INTERNAL_ERROR", details="the gateway hit an unexpected error; it has been logged")


def invalid(details: str) -> APIError:
    """A 400 INVALID_REQUEST with the given curated reason."""
    return APIError("INVALID_REQUEST", details=details)
