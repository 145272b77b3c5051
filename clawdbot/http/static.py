"""
The chat page: C{GET /} and C{/static/...} from C{share/static/}.

Only files that exist, under the static folder, with a known type are
served: no directory listings, no guessed C{text/html}.  Every page response
carries a strict Content-Security-Policy (no inline script, no eval) and the
other security headers.
"""

import os
import sys

from twisted.web.resource import Resource

from clawdbot.errors import APIError, error_body
from clawdbot.http.resource import JSON_TYPE

TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".woff2": b"font/woff2",
    ".txt": b"text/plain; charset=utf-8",
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
DEBUG_CSP = CSP.replace("connect-src 'self'", "connect-src 'self' http://localhost:* http://127.0.0.1:*")

SECURITY_HEADERS = {
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-opener-policy": b"same-origin",
    b"permissions-policy": b"camera=(), microphone=(), geolocation=()",
}


def static_dir():
    """
    The folder with the page: C{share/static} beside the package in a
    checkout, else where the package installed it.
    """
    # clawdbot/http/static.py -> the checkout (or site-packages) holding the package.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for candidate in (os.path.join(here, "share", "static"), os.path.join(sys.prefix, "share", "clawdbot", "static")):
        if os.path.isdir(candidate):
            return candidate
    return os.path.join(here, "share", "static")


def _not_found(request):
    err = APIError("NOT_FOUND", details="no such route")
    request.setResponseCode(404)
    request.setHeader(b"content-type", JSON_TYPE)
    return error_body(err)


class StaticFiles(Resource):
    """Files under C{root}, by exact relative path."""

    isLeaf = True

    def __init__(self, root, index=None):
        super().__init__()
        self.root = os.path.realpath(root)
        self.index = index

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            err = APIError("METHOD_NOT_ALLOWED", details="use GET", headers={"Allow": "GET"})
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET")
            request.setHeader(b"content-type", JSON_TYPE)
            return error_body(err)
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if self.index is not None:
            if parts not in ([], [""]):
                return _not_found(request)
            parts = [self.index]
        if not parts or any(p in ("", ".", "..") or "/" in p or "\\" in p or "\x00" in p for p in parts):
            return _not_found(request)
        path = os.path.realpath(os.path.join(self.root, *parts))
        ctype = TYPES.get(os.path.splitext(path)[1].lower())
        if not path.startswith(self.root + os.sep) or ctype is None or not os.path.isfile(path):
            return _not_found(request)
        with open(path, "rb") as f:
            data = f.read()
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"content-security-policy", (DEBUG_CSP if request.site.debug else CSP).encode())
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"cache-control", b"no-cache" if self.index else b"public, max-age=300")
        return data
