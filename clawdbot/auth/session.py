"""
Sign-in sessions, pure: the session tokens' issuer, audience and keys, the
sealed cookies (AES-256-GCM, bound to their purpose), and the small rules
the sign-in routes apply (safe C{next}, scopes from groups, allowed e-mail
domains, allowed origins).  No I/O and no Twisted: the routes are in
L{clawdbot.http.sso}, the token check in L{clawdbot.auth.tokens}.

A leaf: it imports only other leaves.
"""

import base64
import hashlib
import hmac
import json
import re
import secrets
import urllib.parse
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clawdbot.auth.identity import is_scope_token
from clawdbot.net import origin_of

SESSION_AUDIENCE = "clawdbot-session"
LOGIN_COOKIE = "clawdbot_login"
REFRESH_COOKIE = "clawdbot_refresh"
REFRESH_PATH = "/auth"
LOGIN_TTL = 600
DEFAULT_CALLBACK = "/callback"
MAX_COOKIE = 3800
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


# --- pure rules ---------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ascii(code_verifier)))."""
    return _b64(hashlib.sha256(verifier.encode("ascii")).digest())


def gateway_origin(config: Any) -> str | None:
    """The gateway's public origin: C{server.public_url}, else C{redirect_uri}'s."""
    url = config.server.public_url or config.oauth2.redirect_uri
    return origin_of(url) if url else None


def session_issuer(config: Any) -> str:
    """The C{iss} of session JWTs: the gateway's public origin."""
    return gateway_origin(config) or "clawdbot"


def callback_path(config: Any) -> str:
    """The path the callback is served at: that of C{redirect_uri}."""
    if not config.oauth2.redirect_uri:
        return DEFAULT_CALLBACK
    return urllib.parse.urlsplit(config.oauth2.redirect_uri).path or DEFAULT_CALLBACK


def secure_cookies(config: Any) -> bool:
    """Cookies are C{Secure} when the public side is https."""
    url = config.server.public_url or config.oauth2.redirect_uri or ""
    return url.lower().startswith("https://")


def derive_key(secret: str, label: str) -> bytes:
    """A key for one purpose, derived from the configured secret."""
    return hmac.new(secret.encode("utf-8"), b"clawdbot/" + label.encode("ascii"), hashlib.sha256).digest()


def _base_secret(config: Any) -> str:
    return config.oauth2.session_secret or config.auth.jwt.secret


def session_signing_key(config: Any) -> str:
    """The HS256 secret of session JWTs (a hex string)."""
    return derive_key(_base_secret(config), "session-jwt").hex()


def cookie_key(config: Any) -> bytes:
    return derive_key(_base_secret(config), "cookie")


class BadCookie(Exception):
    """A sealed cookie is missing, altered, for another purpose or expired."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_NONCE = 12
_TAG = 16
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _aad(purpose: str) -> bytes:
    return b"clawdbot-cookie/" + purpose.encode("ascii")


def seal(key: bytes, purpose: str, payload: dict[str, Any]) -> str:
    """
    C{payload} (a dict with an C{exp}) encrypted and authenticated with
    AES-256-GCM under C{key}, bound to C{purpose}: base64url of
    C{nonce || ciphertext || tag}.  Nothing in it is readable without the key.
    """
    plain = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode("ascii")
    nonce = secrets.token_bytes(_NONCE)
    return _b64(nonce + AESGCM(key).encrypt(nonce, plain, _aad(purpose)))


def unseal(key: bytes, purpose: str, value: str | bytes | None, now: float) -> dict[str, Any]:
    """
    The payload of a cookie made by L{seal} with the same key and purpose,
    before its C{exp}.

    @raise BadCookie: otherwise.
    """
    if value is None:
        raise BadCookie("missing")
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise BadCookie("malformed") from None
    if len(value) > 4096 or not _B64URL.fullmatch(value):
        raise BadCookie("malformed")
    try:
        raw = _unb64(value)
    except ValueError:
        raise BadCookie("malformed") from None
    if len(raw) < _NONCE + _TAG:
        raise BadCookie("malformed")
    try:
        plain = AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:], _aad(purpose))
    except InvalidTag:
        raise BadCookie("not authentic") from None
    try:
        payload = json.loads(plain)
    except (ValueError, UnicodeDecodeError):
        raise BadCookie("malformed") from None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise BadCookie("malformed")
    if now >= exp:
        raise BadCookie("expired")
    return payload


def cookie_header(name: str, value: str, path: str, max_age: float, secure: bool, same_site: str) -> bytes:
    """One C{Set-Cookie} value: always HttpOnly, never a Domain."""
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={int(max_age)}"]
    if max_age <= 0:
        parts.append("Expires=Thu, 01 Jan 1970 00:00:00 GMT")
    parts += ["HttpOnly", f"SameSite={same_site}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("ascii")


def safe_next(value: object) -> str | None:
    """
    C{value} if it is a same-origin relative path (C{/...}), else C{None}.
    Refused: other schemes and hosts (C{https://x}, C{//x}, C{/\\x},
    C{javascript:}), encoded forms of those, control characters, spaces and
    non-ASCII (send them percent-encoded), and the C{/auth/} routes.
    """
    if not isinstance(value, str) or not value or len(value) > 2048:
        return None
    if value[0] != "/" or value.startswith("//") or "\\" in value:
        return None
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return None
    decoded = urllib.parse.unquote(value)
    if decoded.startswith("//") or "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    if parts.path == REFRESH_PATH or parts.path.startswith(REFRESH_PATH + "/"):
        return None
    return value


def scopes_for(groups: Iterable[str], oauth2: Any) -> frozenset[str]:
    """
    The local scopes of a user in C{groups}: server-side policy only (and
    only well-formed scope tokens, whatever the config holds).
    """
    scopes = set(oauth2.default_scopes)
    for group in groups:
        scopes.update(oauth2.group_scopes.get(group, ()))
    return frozenset(s for s in scopes if is_scope_token(s))


def email_allowed(email: str | None, email_verified: object, oauth2: Any) -> bool:
    """C{oauth2.allowed_email_domains} (when set) admits a verified address in one of them."""
    domains = oauth2.allowed_email_domains
    if not domains:
        return True
    if not email or not email_verified or email.count("@") != 1:
        return False
    domain = email.rsplit("@", 1)[1].lower()
    return domain in {d.lower() for d in domains}


def allowed_origins(config: Any, host: str | None = None, secure: bool = False) -> set[str]:
    """
    The origins that may call refresh and logout: the gateway's public
    origin, the redirect URI's, and, when no C{server.public_url} is set,
    the one the request's C{Host} names.
    """
    origins: set[str] = set()
    for url in (config.server.public_url, config.oauth2.redirect_uri):
        if url:
            origins.add(origin_of(url))
    if not config.server.public_url and host:
        origins.add(origin_of(("https://" if secure else "http://") + host))
    return origins


def provider_id(oauth2: Any) -> str:
    """Which provider a refresh cookie was issued for."""
    return f"{oauth2.provider}|{oauth2.issuer_url or ''}|{oauth2.client_id}"
