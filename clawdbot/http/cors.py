"""
Cross-origin calls from browser pages (the CORS protocol of the Fetch
standard): one implementation, which each listener gives its own rule of
which origins may call it (L{clawdbot.http.site.GatewayRequest.cors_rule}).

The debug listener allows any page on this machine; the secure listener
exactly the origins in C{server.cors_origins}, none by default and never
every origin.  A request that sends exactly one C{Origin} header, which the
rule allows, gets on every answer (errors and streams included)
C{Access-Control-Allow-Origin} naming that origin, C{Vary: Origin}, and
C{Access-Control-Expose-Headers} naming the headers SDKs read (L{EXPOSED}).
Any other request (no C{Origin}, a repeated one, one the rule refuses) gets
no CORS header beyond C{Vary: Origin}.

A preflight (C{OPTIONS} with C{Access-Control-Request-Method}) on a route
gets 204 with the route's methods, the request headers it asked for (each
checked to be a header name) and C{Access-Control-Max-Age}, without
authentication.

Never C{Access-Control-Allow-Credentials}: cross-origin callers send bearer
tokens, and without that header a browser neither sends cookies with a
preflighted call nor lets a page read an answer to a call that carried them.
"""

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from clawdbot.errors import invalid

if TYPE_CHECKING:
    from twisted.web.http import Request

Rule = Callable[[str], bool]

# The response headers a cross-origin page may read beyond the CORS-safelisted
# ones: the request id, the trace id (tracing.enabled), and the rate-limit headers of
# L{clawdbot.ops.ratelimit.Decision.headers}, generic and OpenAI's.
EXPOSED = b", ".join(
    [
        b"X-Request-Id",
        b"X-Trace-Id",
        b"Retry-After",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"x-ratelimit-limit-requests",
        b"x-ratelimit-remaining-requests",
        b"x-ratelimit-reset-requests",
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ]
)
# Seconds a browser may reuse a preflight's answer.
MAX_AGE = b"600"
# A header name (RFC 9110 section 5.1: a token).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def allowed_origin(request: "Request", rule: Rule) -> str | None:
    """
    The request's C{Origin} when it sends exactly one and C{rule(origin)}
    allows it, else C{None}.

    @param rule: a callable taking an origin (C{str}).
    """
    origins = request.requestHeaders.getRawHeaders(b"origin") or []
    if len(origins) != 1:
        return None
    origin = origins[0].decode("latin-1")
    return origin if rule(origin) else None


def answer_headers(request: "Request", rule: Rule) -> dict[bytes, bytes]:
    """
    The CORS headers of any answer to C{request}: none unless
    L{allowed_origin}, but C{Vary: Origin} whenever an C{Origin} was sent
    (the answer depends on it, for any cache on the way).
    """
    origin = allowed_origin(request, rule)
    if origin is None:
        return {b"vary": b"Origin"} if request.requestHeaders.hasHeader(b"origin") else {}
    return {
        b"access-control-allow-origin": origin.encode("latin-1"),
        b"vary": b"Origin",
        b"access-control-expose-headers": EXPOSED,
    }


def is_preflight(request: "Request") -> bool:
    """C{request} is a CORS preflight: C{OPTIONS} with C{Access-Control-Request-Method}."""
    return request.method == b"OPTIONS" and request.requestHeaders.hasHeader(b"access-control-request-method")


def preflight_headers(request: "Request", rule: Rule, methods: Iterable[str]) -> dict[bytes, bytes] | None:
    """
    What a preflight's 204 adds to L{answer_headers}, or C{None} when
    C{rule} does not allow the request's origin.

    @param methods: the route's methods (C{str}); C{OPTIONS} is added.
    @raise APIError: INVALID_REQUEST when C{Access-Control-Request-Headers}
        is not a list of header names.
    """
    if allowed_origin(request, rule) is None:
        return None
    headers = {
        b"access-control-allow-methods": ", ".join(sorted(set(methods) - {"OPTIONS"}) + ["OPTIONS"]).encode("ascii"),
        b"access-control-max-age": MAX_AGE,
    }
    asked = requested_headers(request)
    if asked:
        headers[b"access-control-allow-headers"] = b", ".join(asked)
    return headers


def requested_headers(request: "Request") -> list[bytes]:
    """
    The header names of C{Access-Control-Request-Headers}, in lower case,
    each once.  Echoing them grants whatever a browser SDK sends
    (C{Authorization}, C{Content-Type}, the openai SDK's C{x-stainless-*} and
    C{OpenAI-*}, any other client's own): they are only names, and none of
    them can carry a credential the gateway accepts other than the bearer
    token the caller holds anyway.

    @raise APIError: INVALID_REQUEST for a value that is not a
        comma-separated list of header names.
    """
    names: list[bytes] = []
    for value in request.requestHeaders.getRawHeaders(b"access-control-request-headers") or []:
        for name in value.split(b",") if value.strip(b" \t") else ():
            name = name.strip(b" \t").lower()
            if not _TOKEN.fullmatch(name):
                raise invalid("Access-Control-Request-Headers must be a comma-separated list of header names")
            if name not in names:
                names.append(name)
    return names
