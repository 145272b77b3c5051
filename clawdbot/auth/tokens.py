"""
Authentication (bearer JWTs) and authorization (scopes).

The rules, in the order they are applied to a token:

 1. Only an C{Authorization: Bearer} header carries a token; query strings
    and cookies do not.
 2. The token's C{iss} must name one of the configured issuers; that issuer's
    configuration, never the token's header, chooses the key and the allowed
    algorithms.  C{jwk}, C{jku}, C{x5u} and C{x5c} headers are ignored;
    C{kid} only selects among keys already trusted.
 3. The algorithm must be one the issuer allows, from {HS256, RS256}.
 4. PyJWT checks the signature, C{exp}, C{iss}, C{aud} (all required) and
    C{nbf}/C{iat} when present, with the configured leeway.  Claims of the
    wrong JSON type are refused before that.

Every refusal is an L{APIError} with a curated C{details}; the token itself
is never logged.
"""

import time
import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKError,
)
from twisted.logger import Logger

# A short HS256 secret is the config's to warn about, once, in its own words
# (dev mode; production refuses it): not PyJWT's, with a file path, on every use.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

from clawdbot.errors import APIError
from clawdbot.strictjson import parse_json
from clawdbot.auth import session
from clawdbot.auth.cache import SingleFlight
from clawdbot.auth.identity import DEV_ISSUER, Principal, is_scope_token, split_scopes
from clawdbot.auth.keys import KeyRefused, is_api_key

log = Logger(namespace="clawdbot.auth")

REALM = 'Bearer realm="clawdbot"'
_UNVERIFIED = jwt.api_jws.PyJWS()
SUPPORTED_ALGORITHMS = ("HS256", "RS256")
_CACHE_MAX = 10000
# Any refused API key, whatever the reason (unknown, revoked, expired, its
# owner's sign-in ended, keys off): no hint about which.
KEY_REFUSED = "the API key is not valid"


def parse_scopes(claims):
    """
    The scopes of a verified token: C{scope} (separated by U+0020, RFC 8693)
    or C{scp} (a list, or such a string).  Every token must be an RFC 6749
    scope-token, so C{"chat:read\\u00a0admin"} is refused, never read as
    C{admin}.

    @raise InvalidTokenError: when either claim has the wrong type or holds
        a malformed scope.
    """
    scopes = set()
    scope = claims.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise _WrongType("scope")
        scopes.update(_split("scope", scope))
    scp = claims.get("scp")
    if scp is not None:
        if isinstance(scp, str):
            scopes.update(_split("scp", scp))
        elif isinstance(scp, list) and all(isinstance(s, str) for s in scp):
            if not all(is_scope_token(s) for s in scp):
                raise _BadScope("scp")
            scopes.update(scp)
        else:
            raise _WrongType("scp")
    return frozenset(scopes)


def _split(claim, text):
    try:
        return split_scopes(text)
    except ValueError:
        raise _BadScope(claim) from None


def principal_from_claims(claims, issuer=None):
    """
    The principal of verified C{claims}.

    @param issuer: its identity provider (by default the token's C{iss}).
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _WrongType("sub") if sub is not None else MissingRequiredClaimError("sub")
    teams = claims.get("teams", claims.get("groups", []))
    if not isinstance(teams, list) or not all(isinstance(t, str) for t in teams):
        raise _WrongType("teams")
    name, email = claims.get("name"), claims.get("email")
    for key, value in (("name", name), ("email", email)):
        if value is not None and not isinstance(value, str):
            raise _WrongType(key)
    issuer = claims.get("iss") if issuer is None else issuer
    iat = claims.get("iat")
    issued_at = float(iat) if _number(iat) else None
    return Principal(sub=sub, scopes=parse_scopes(claims), name=name, email=email, teams=tuple(teams), issuer=issuer, issued_at=issued_at)


def dev_principal(config):
    """
    The debug listener's principal, of its own identity provider.  Its
    scopes are split like a token's (the config refuses malformed ones).
    """
    dev = config.auth.dev_principal
    scopes = frozenset(t for t in dev.scope.split(" ") if is_scope_token(t))
    teams = tuple(dev.teams) or tuple(s[8:] for s in sorted(scopes) if s.startswith("history:"))
    return Principal(sub=dev.sub, scopes=scopes, name=dev.name, email=dev.email, teams=teams, issuer=DEV_ISSUER)


class _WrongType(InvalidTokenError):
    def __init__(self, claim):
        super().__init__(claim)
        self.claim = claim


class _BadScope(InvalidTokenError):
    """A scope claim holds something that is not an RFC 6749 scope-token."""

    def __init__(self, claim):
        super().__init__(claim)
        self.claim = claim


class UnknownKeyError(InvalidSignatureError):
    """The token names a key the issuer does not have, even after a refresh."""


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_claim_types(claims):
    """Refuse claims of the wrong JSON type before PyJWT reads them."""
    for claim in ("exp", "nbf", "iat"):
        if claim in claims and not _number(claims[claim]):
            raise _WrongType(claim)
    for claim in ("iss", "sub"):
        if claim in claims and not isinstance(claims[claim], str):
            raise _WrongType(claim)
    if "aud" in claims:
        aud = claims["aud"]
        if not (isinstance(aud, str) or (isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud))):
            raise _WrongType("aud")


# PyJWT's exceptions and what clients are told, most specific first.
_REASONS = (
    (ExpiredSignatureError, "token is expired"),
    (ImmatureSignatureError, "token is not yet valid"),
    (InvalidAudienceError, "audience does not match"),
    (InvalidIssuerError, "issuer does not match"),
    (InvalidIssuedAtError, "token was issued in the future"),
    (_WrongType, "claim '{claim}' has the wrong type"),
    (_BadScope, "claim '{claim}' holds a malformed scope"),
    (MissingRequiredClaimError, "claim '{claim}' is missing"),
    (UnknownKeyError, "signing key is unknown"),
    (InvalidSignatureError, "signature does not match"),
    (InvalidAlgorithmError, "algorithm not allowed"),
)


def reason_for(error):
    """The curated C{details} for a PyJWT exception."""
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason.format(claim=getattr(error, "claim", ""))
    return "token is malformed"


def invalid_token(details):
    return APIError(
        "AUTH_INVALID_TOKEN",
        details=details,
        headers={"WWW-Authenticate": f'{REALM}, error="invalid_token", error_description="{details}"'},
    )


def missing_token(details="a Bearer token is required"):
    return APIError("AUTH_MISSING_TOKEN", details=details, headers={"WWW-Authenticate": REALM})


def insufficient_scope(scope):
    return APIError(
        "AUTH_INSUFFICIENT_SCOPE",
        details=f"this call needs the scope {scope}",
        headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'},
    )


class Issuer:
    """
    One trusted issuer: its name, audience, allowed algorithms and keys.

    @ivar secret: the HS256 secret, or C{None}.
    @ivar keys: a L{KeySet} for RS256, or C{None}.
    @ivar identity_claim: for the gateway's own session tokens, the claim
        naming the identity provider the user signed in through (required);
        C{None}: the issuer itself is the identity provider.  Only an issuer
        configured so is believed about another provider.
    """

    def __init__(self, name, audience, algorithms, secret=None, keys=None, identity_claim=None):
        self.name = name
        self.audience = audience
        self.algorithms = tuple(a for a in algorithms if a in SUPPORTED_ALGORITHMS)
        self.secret = secret
        self.keys = keys
        self.identity_claim = identity_claim

    def identity_provider(self, claims):
        """The identity provider of a principal this issuer vouched for."""
        if self.identity_claim is None:
            return self.name
        value = claims.get(self.identity_claim)
        if value is None:
            raise MissingRequiredClaimError(self.identity_claim)
        if not isinstance(value, str) or not value:
            raise _WrongType(self.identity_claim)
        return value

    async def key_for(self, alg, kid):
        if alg == "HS256":
            return [self.secret.encode("utf-8")]
        if self.keys is None:
            raise InvalidAlgorithmError("no RS256 keys")
        return await self.keys.lookup(kid)


class UnknownKey(InvalidTokenError):
    pass


class KeySet:
    """
    RS256 public keys from a PEM file or a JWKS document, fetched lazily,
    cached for C{ttl} seconds, and refreshed at most once per
    C{min_refresh} seconds when a token names an unknown C{kid}.

    @param fetch: C{async fetch() -> dict}, the JWKS document.
    """

    def __init__(self, clock, fetch=None, static_keys=None, ttl=3600.0, min_refresh=30.0):
        self.clock = clock
        self.fetch = fetch
        self.ttl = ttl
        self.min_refresh = min_refresh
        self._keys = dict(static_keys or {})
        self._fetched_at = None
        self._unknown_refresh_at = None
        # Callers that arrive during a fetch wait for that one.
        self._try_refresh = SingleFlight(self._refresh)

    @classmethod
    def from_pem_file(cls, clock, path):
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
        return cls(clock, static_keys={None: key})

    async def _refresh(self):
        """Fetch the keys once; a failure is logged and the keys stay as they were."""
        try:
            self._keys = parse_jwks(await self.fetch())
            log.info("Loaded {count} signing keys", count=len(self._keys))
        except Exception as e:
            log.warn("Could not fetch the signing keys: {error}", error=type(e).__name__)
        finally:
            self._fetched_at = self.clock.seconds()

    async def lookup(self, kid):
        if self.fetch is None:
            return list(self._keys.values())
        now = self.clock.seconds()
        stale = self._fetched_at is None or now - self._fetched_at >= self.ttl
        if stale:
            await self._try_refresh()
        if kid is not None and kid not in self._keys and self._may_refresh():
            self._unknown_refresh_at = self.clock.seconds()
            await self._try_refresh()
        if kid is None:
            if not self._keys:
                raise UnknownKey("no keys")
            return list(self._keys.values())
        if kid not in self._keys:
            raise UnknownKey(kid)
        return [self._keys[kid]]

    def _may_refresh(self):
        """Refreshes for unknown kids happen at most once per C{min_refresh}."""
        last = self._unknown_refresh_at
        return last is None or self.clock.seconds() - last >= self.min_refresh


def parse_jwks(document):
    """The RSA signing keys of a JWKS document, by C{kid}."""
    keys = {}
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
            continue
        try:
            key = jwt.PyJWK(entry, algorithm="RS256").key
        except (PyJWKError, InvalidTokenError, ValueError, TypeError, KeyError):
            continue
        keys[entry.get("kid")] = key
    return keys


class Authenticator:
    """
    Verifies bearer tokens against the trusted issuers and caches each
    verified token's principal until it expires.
    """

    def __init__(self, issuers, clock, leeway=30.0, dev=None, keys=None):
        self.issuers = {i.name: i for i in issuers}
        self.clock = clock
        self.leeway = leeway
        self.dev = dev
        # The API keys (clawdbot.auth.keys.ApiKeys): a bearer credential
        # with their prefix is one; a verified JWT tells them what its owner
        # may do now.
        self.keys = keys
        self._cache = {}

    async def authenticate(self, header, peer=None, request_id=None):
        """
        The principal of a request's C{Authorization} header.

        @param header: its values as sent (C{[bytes]}; C{None} or empty when
            there is none).
        @param peer: the client's address, and C{request_id} the request's,
            for the security log line of a refused token.
        @raise APIError: 401 AUTH_MISSING_TOKEN or AUTH_INVALID_TOKEN.
        """
        if not header:
            raise missing_token()
        if len(header) > 1:
            raise self._reject(peer, request_id, "more than one Authorization header")
        scheme, _, token = header[0].decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer":
            raise missing_token()
        token = token.strip()
        if not token:
            raise self._reject(peer, request_id, "token is malformed")
        if is_api_key(token):
            if self.keys is None:
                raise self._reject(peer, request_id, KEY_REFUSED)
            try:
                return await self.keys.authenticate(token)
            except KeyRefused:
                raise self._reject(peer, request_id, KEY_REFUSED) from None
        cached = self._cache.get(token)
        if cached is not None:
            principal, expires = cached
            if self.clock.seconds() < expires + self.leeway:
                return principal
            del self._cache[token]
        try:
            principal, expires = await self.verify(token)
        except InvalidTokenError as e:
            raise self._reject(peer, request_id, reason_for(e)) from None
        except RecursionError:
            raise self._reject(peer, request_id, "token is malformed") from None
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (principal, expires)
        if self.keys is not None:
            self.keys.observe(principal)
        return principal

    def _reject(self, peer, request_id, reason):
        log.warn(
            "Rejected a bearer token: {reason}",
            reason=reason,
            peer=peer,
            security_event="auth_failure",
            request_id=request_id,
        )
        return invalid_token(reason)

    async def verify(self, token):
        """
        The principal and expiry of a valid C{token}.

        @raise InvalidTokenError: (or a subclass) when it is not valid.
        """
        if token.count(".") != 2 or len(token) > 16384:
            raise DecodeError("malformed")
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
            raise InvalidAlgorithmError("alg")
        try:
            # Strict JSON: a claim with a lone UTF-16 surrogate (no UTF-8
            # writer can store or log it), NaN or an out-of-range number
            # makes the token malformed.
            claims = parse_json(_UNVERIFIED.decode_complete(token, options={"verify_signature": False})["payload"])
        except (APIError, ValueError, RecursionError):
            raise DecodeError("payload") from None
        if not isinstance(claims, dict):
            raise DecodeError("payload")
        check_claim_types(claims)
        if "iss" not in claims:
            raise MissingRequiredClaimError("iss")
        issuer = self.issuers.get(claims["iss"])
        if issuer is None:
            raise InvalidIssuerError("untrusted issuer")
        if alg not in issuer.algorithms:
            raise InvalidAlgorithmError(alg)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise DecodeError("kid")
        try:
            keys = await issuer.key_for(alg, kid)
        except UnknownKey:
            raise UnknownKeyError() from None
        last = None
        for key in keys:
            try:
                verified = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=issuer.audience,
                    issuer=issuer.name,
                    leeway=self.leeway,
                    options={"require": ["exp", "iss", "aud"], "verify_iat": True},
                )
                break
            except InvalidSignatureError as e:
                last = e
        else:
            raise last or InvalidSignatureError("no key")
        return principal_from_claims(verified, issuer.identity_provider(verified)), verified["exp"]

    def authorize(self, principal, scope):
        if scope and scope not in principal.scopes:
            raise insufficient_scope(scope)


def mint(secret, issuer, audience, sub, scope, ttl, now=None, **extra):
    """A HS256 token, as C{clawdbot token} and the SSO login issue them."""
    now = int(time.time() if now is None else now)
    claims = {"iss": issuer, "aud": audience, "sub": sub, "scope": scope, "iat": now, "exp": now + int(ttl)}
    claims.update({k: v for k, v in extra.items() if v is not None})
    return jwt.encode(claims, secret, algorithm="HS256")


def build_authenticator(config, clock, fetch_json, api_keys=None):
    """
    The authenticator for C{config}.

    @param fetch_json: C{async fetch_json(url) -> object}, for JWKS and
        discovery documents.
    @param api_keys: the API keys (L{clawdbot.auth.keys.ApiKeys}), or C{None}.
    """
    issuers = []
    jwt_config = config.auth.jwt
    if jwt_config.enabled:
        keys = None
        if "RS256" in jwt_config.algorithms:
            if jwt_config.public_key_file:
                keys = KeySet.from_pem_file(clock, jwt_config.public_key_file)
            else:
                keys = KeySet(clock, fetch=_jwks_fetcher(jwt_config, config.oauth2, fetch_json))
        issuers.append(Issuer(jwt_config.issuer, jwt_config.audience, jwt_config.algorithms, secret=jwt_config.secret, keys=keys))
    if config.oauth2.enabled:
        # Session tokens minted after a single sign-on login (clawdbot.http.sso).
        issuers.append(
            Issuer(session.session_issuer(config), session.SESSION_AUDIENCE, ["HS256"], secret=session.session_signing_key(config), identity_claim="idp")
        )
    return Authenticator(issuers, clock, leeway=jwt_config.leeway, dev=dev_principal(config), keys=api_keys)


class Authentication:
    """
    Who a request is, by the current config: the L{Authenticator} built
    from it, built again when the config is reloaded (L{rebuild}, a reload
    hook), so a rotated secret or a new issuer applies to the next request.
    """

    def __init__(self, config, clock, fetch_json, keys=None):
        self.clock = clock
        self.fetch_json = fetch_json
        self.keys = keys
        self.current = build_authenticator(config, clock, fetch_json, keys)

    def rebuild(self, old, new):
        self.current = build_authenticator(new, self.clock, self.fetch_json, self.keys)

    async def authenticate(self, header, peer=None, request_id=None):
        """The principal of an C{Authorization} header (L{Authenticator.authenticate})."""
        return await self.current.authenticate(header, peer, request_id)

    def dev(self):
        """The configured dev principal, for the unauthenticated debug listener (dev mode only)."""
        return self.current.dev

    def authorize(self, principal, scope):
        """L{Authenticator.authorize}."""
        self.current.authorize(principal, scope)


def _jwks_fetcher(jwt_config, oauth2, fetch_json):
    async def fetch():
        url = jwt_config.jwks_url
        if not url:
            base = (oauth2.issuer_url or jwt_config.issuer).rstrip("/")
            document = await fetch_json(base + "/.well-known/openid-configuration")
            if not isinstance(document, dict) or document.get("issuer", "").rstrip("/") != base:
                raise ValueError("discovery issuer mismatch")
            url = document.get("jwks_uri")
            if not isinstance(url, str):
                raise ValueError("no jwks_uri")
        return await fetch_json(url)

    return fetch
