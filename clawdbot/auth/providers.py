"""
Identity providers for single sign-on: what the gateway says to each one and
how their answers become one L{Identity}.

 - L{OIDCProvider}: OpenID Connect (OIDC Core, Discovery) with the
   Authorization Code flow and PKCE S256.  Discovery is fetched lazily from
   C{issuer_url}, cached, and its C{issuer} must be the configured one; the
   JWKS is cached and refetched once on an unknown C{kid} (key rotation); the
   ID token is checked by L{validate_id_token}; userinfo is read and must
   name the same C{sub}.
 - L{WeComProvider}, L{DingTalkProvider}, L{FeishuProvider}: the documented
   OAuth-like logins of WeCom (企业微信), DingTalk (钉钉) and Feishu (飞书),
   which are not OIDC.  Their endpoints are in L{PRESET_ENDPOINTS} and each
   can be overridden by C{oauth2.endpoints}.

Every failure is a L{ProviderError} whose C{kind} picks the page the user
sees and whose C{reason} is a short curated text for the log: never a token,
a secret, a URL with credentials in its query, or a provider's free text.

Groups: OIDC takes them from the C{oauth2.groups_claim} claim; the presets
use department ids (as strings), read best-effort: a failure there is
logged and leaves the user with the default scopes only.

Groups are read again at every C{/auth/refresh} (L{_Provider.recheck}), so
removing someone from a group at the provider takes effect within one
session TTL: OIDC reads userinfo with the sign-in's access token, and once
that has expired uses the refresh token (a new access token and ID token);
Feishu does the same with its user tokens; WeCom and DingTalk read the user
through the app's own token.  The provider tokens this needs travel in the
encrypted refresh cookie as the identity's C{grant}.  A provider that
refuses the refresh token (or says the user left the corp) ends the sign-in
session (L{SignInEnded}); one that cannot answer leaves the user with the
default scopes until it can.

Every identity names its provider (L{Identity.issuer}, see
L{clawdbot.auth.identity}): the ID token's C{iss} for OIDC, the platform and app
id for the presets.
"""

import base64
import hmac
import re
import urllib.parse
from dataclasses import dataclass, field

import jwt
from jwt.exceptions import InvalidSignatureError, InvalidTokenError
from twisted.logger import Logger

from clawdbot.auth.cache import Cached
from clawdbot.auth.presets import OIDC_DEFAULT_SCOPES, PRESET_ENDPOINTS, PRESET_SCOPES
from clawdbot.auth.tokens import KeySet, UnknownKey, check_claim_types, reason_for
from clawdbot.auth.fetch import FetchError
from clawdbot.net import is_loopback
from clawdbot.auth.identity import preset_issuer

log = Logger(namespace="clawdbot.providers")

# The platforms' documented endpoints; C{oauth2.endpoints} may override each.
MAX_GROUPS = 200
DISCOVERY_TTL = 3600.0


class ProviderError(Exception):
    """
    A login cannot be completed.

    @ivar kind: what the user is told (see L{clawdbot.http.sso.PAGES}):
        C{unreachable}, C{refused}, C{invalid_response}, C{id_token},
        C{mixup}, C{not_member}.
    @ivar reason: a short curated text for the log.
    """

    def __init__(self, kind, reason):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class SignInEnded(ProviderError):
    """
    The provider says the sign-in is over: it refused the refresh token,
    or the user is no longer in the organisation.
    """

    def __init__(self, reason):
        super().__init__("refused", reason)


class IDTokenError(Exception):
    """An ID token is not valid; C{reason} is curated."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """
    Who the provider says signed in.

    @ivar issuer: the identity provider (L{clawdbot.auth.identity}).
    @ivar grant: what L{_Provider.recheck} needs later (provider tokens), a
        small JSON-able dict, or C{None}.
    """

    sub: str
    name: str = None
    email: str = None
    email_verified: bool = True
    groups: tuple = field(default=())
    issuer: str = None
    grant: dict = field(default=None, compare=False, hash=False)


# --- small helpers ----------------------------------------------------------


def word(value, limit=40):
    """A provider's error code, safe to log: letters, digits and C{_.-} only."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else "?"
    return re.sub(r"[^A-Za-z0-9_.-]", "", text)[:limit] or "?"


def _str(value):
    return value if isinstance(value, str) and value else None


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_grant(tokens, now, refresh_token=None):
    """
    What a token endpoint answer leaves to re-check the user with: the
    access token and when it expires, and the refresh token (a new one when
    the provider rotated it, else the one that was used).
    """
    expires_in = tokens.get("expires_in")
    lifetime = expires_in if _number(expires_in) and expires_in > 0 else 60
    return {"at": tokens["access_token"], "ax": int(now + lifetime), "rt": _str(tokens.get("refresh_token")) or refresh_token}


def access_token_valid(grant, now, margin=30):
    """Does C{grant} hold an access token that is good for a while yet?"""
    return bool(_str(grant.get("at"))) and _number(grant.get("ax")) and grant["ax"] - margin > now


def with_query(url, params):
    """C{url} with C{params} (C{None} values left out) appended to its query."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return url + ("&" if "?" in url else "?") + query


def _groups(value):
    """A claim or a list of department ids as a tuple of strings."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    out = []
    for item in value[:MAX_GROUPS]:
        if isinstance(item, bool):
            continue
        if isinstance(item, (str, int)):
            text = str(item)
            if text and text not in out:
                out.append(text)
    return tuple(out)


def _check_endpoint(name, url, issuer_host=None):
    """A discovered endpoint must be https (plain http only on loopback)."""
    if not isinstance(url, str):
        raise ProviderError("invalid_response", f"discovery: {name} is not a URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ProviderError("invalid_response", f"discovery: {name} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ProviderError("invalid_response", f"discovery: {name} must use https")
    return url


def basic_auth(client_id, client_secret):
    """RFC 6749 §2.3.1: both parts form-encoded, then Basic."""
    raw = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")


# --- OpenID Connect -----------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str = None
    end_session_endpoint: str = None
    auth_method: str = "client_secret_basic"


def parse_discovery(document, issuer_url):
    """
    The parts of an OIDC discovery document the gateway uses.  Its
    C{issuer} must be the configured one (OIDC Discovery §4.3).

    @raise ProviderError: C{invalid_response} for anything else.
    """
    if not isinstance(document, dict):
        raise ProviderError("invalid_response", "discovery: not a JSON object")
    issuer = document.get("issuer")
    if not isinstance(issuer, str) or issuer not in (issuer_url, issuer_url.rstrip("/")):
        raise ProviderError("invalid_response", "discovery: issuer does not match oauth2.issuer_url")
    endpoints = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        endpoints[name] = _check_endpoint(name, document.get(name))
    for name in ("userinfo_endpoint", "end_session_endpoint"):
        if document.get(name) is not None:
            endpoints[name] = _check_endpoint(name, document.get(name))
    methods = document.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise ProviderError("invalid_response", "discovery: the provider does not offer PKCE S256")
    algs = document.get("id_token_signing_alg_values_supported")
    if isinstance(algs, list) and "RS256" not in algs:
        raise ProviderError("invalid_response", "discovery: the provider does not sign ID tokens with RS256")
    auth_methods = document.get("token_endpoint_auth_methods_supported")
    auth_method = "client_secret_basic"
    if isinstance(auth_methods, list) and "client_secret_basic" not in auth_methods and "client_secret_post" in auth_methods:
        auth_method = "client_secret_post"
    return Discovery(issuer=issuer, auth_method=auth_method, **endpoints)


async def validate_id_token(token, keys, issuer, client_id, nonce, leeway=30.0):
    """
    The claims of a valid ID token (OIDC Core §3.1.3.7): an RS256 signature
    by a key of the provider's JWKS (C{keys}, a L{KeySet}), C{iss} the
    discovered issuer, C{aud} containing C{client_id} (and C{azp} equal to it
    when present or when there are several audiences), C{exp} and C{iat}
    present and C{exp} not past, and C{nonce} the one sent.  For an ID
    token from a refresh (OIDC Core §12.2), C{nonce} is C{None}: there is no
    new one to compare.

    @raise IDTokenError: with a curated reason otherwise.
    """
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > 16384:
        raise IDTokenError("token is malformed")
    try:
        header = jwt.get_unverified_header(token)
    except InvalidTokenError:
        raise IDTokenError("token is malformed") from None
    if header.get("alg") != "RS256":
        raise IDTokenError("algorithm not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise IDTokenError("token is malformed")
    try:
        candidates = await keys.lookup(kid)
    except UnknownKey:
        raise IDTokenError("signing key is unknown") from None
    claims = None
    for key in candidates:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=client_id,
                issuer=issuer,
                leeway=leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
            break
        except InvalidSignatureError:
            continue
        except InvalidTokenError as e:
            raise IDTokenError(reason_for(e)) from None
    if claims is None:
        raise IDTokenError("signature does not match")
    try:
        check_claim_types(claims)
    except InvalidTokenError as e:
        raise IDTokenError(reason_for(e)) from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise IDTokenError("claim 'sub' is missing")
    audiences = [claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"]
    azp = claims.get("azp")
    if azp is None and len(audiences) > 1:
        raise IDTokenError("claim 'azp' is missing")
    if azp is not None and azp != client_id:
        raise IDTokenError("authorized party does not match")
    if nonce is not None:
        sent = claims.get("nonce")
        if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), nonce.encode()):
            raise IDTokenError("nonce does not match")
    return claims


def identity_from_claims(claims, groups_claim="groups", grant=None):
    """The L{Identity} in merged ID token and userinfo claims."""
    verified = claims.get("email_verified")
    return Identity(
        issuer=claims.get("iss"),
        grant=grant,
        sub=claims["sub"],
        name=_str(claims.get("name")) or _str(claims.get("preferred_username")),
        email=_str(claims.get("email")),
        # Missing means the provider does not say; only an explicit false
        # (or "false") marks the address unverified.
        email_verified=verified not in (False, "false"),
        groups=_groups(claims.get(groups_claim)),
    )


class _Provider:
    """What every provider shares: its config, HTTP client and clock."""

    name = None
    pkce = False

    def __init__(self, oauth2, http, clock, leeway=30.0):
        self.oauth2 = oauth2
        self.http = http
        self.clock = clock
        self.leeway = leeway

    async def _call(self, what, method, url, **kwargs):
        try:
            return await self.http.call(method, url, **kwargs)
        except FetchError as e:
            raise ProviderError("unreachable", f"{what}: {e.reason}") from None

    async def logout_url(self):
        """The provider's end-session URL, or C{None}."""
        return None

    async def recheck(self, sub, grant):
        """
        The groups of the user C{sub} now, and the grant to keep (the same,
        or renewed).

        @raise SignInEnded: the provider says the sign-in is over.
        @raise ProviderError: the groups cannot be known now.
        """
        raise ProviderError("invalid_response", "this provider cannot re-check groups")


class OIDCProvider(_Provider):
    name = "oidc"
    pkce = True

    def __init__(self, oauth2, http, clock, leeway=30.0, discovery_ttl=DISCOVERY_TTL):
        super().__init__(oauth2, http, clock, leeway)
        self.issuer_url = oauth2.issuer_url
        self.discovery_ttl = discovery_ttl
        self._discovery = Cached(clock, self._discover, serve_stale=True)
        self._keys = None
        self._jwks_uri = None

    async def _discover(self):
        url = self.issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        try:
            document = await self.http.fetch_json(url)
        except FetchError as e:
            raise ProviderError("unreachable", f"discovery: {e.reason}") from None
        return parse_discovery(document, self.issuer_url), self.discovery_ttl

    async def discovery(self):
        return await self._discovery.get()

    async def keys(self):
        """The provider's JWKS as a L{KeySet}, rebuilt if the jwks_uri moves."""
        document = await self.discovery()
        if self._keys is None or self._jwks_uri != document.jwks_uri:
            uri = document.jwks_uri
            self._keys = KeySet(self.clock, fetch=lambda: self.http.fetch_json(uri))
            self._jwks_uri = uri
        return self._keys

    async def authorize_url(self, redirect_uri, state, nonce, challenge):
        document = await self.discovery()
        return with_query(
            document.authorization_endpoint,
            {
                "response_type": "code",
                "client_id": self.oauth2.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(self.oauth2.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )

    async def identify(self, params, redirect_uri, verifier, nonce):
        document = await self.discovery()
        # RFC 9207: a provider that names itself must name the right one.
        if "iss" in params and params["iss"] != document.issuer:
            raise ProviderError("mixup", "the callback names another issuer")
        code = params.get("code")
        if not code:
            raise ProviderError("refused", "the callback has no code")
        tokens = await self._exchange(document, code, redirect_uri, verifier)
        try:
            claims = await validate_id_token(tokens["id_token"], await self.keys(), document.issuer, self.oauth2.client_id, nonce, self.leeway)
        except IDTokenError as e:
            raise ProviderError("id_token", f"ID token refused: {e.reason}") from None
        merged = dict(claims)
        if document.userinfo_endpoint:
            merged.update(await self._userinfo(document, tokens["access_token"], claims["sub"]))
            merged["sub"] = claims["sub"]
            merged["iss"] = claims["iss"]
        grant = make_grant(tokens, self.clock.seconds())
        return identity_from_claims(merged, self.oauth2.groups_claim, grant=grant)

    async def _token_call(self, document, form, refreshing=False):
        """
        One call to the token endpoint with the client's credentials; its
        answer (a Bearer C{access_token} at least).

        @raise SignInEnded: C{refreshing} and the refresh token is refused.
        """
        headers = {}
        form = dict(form)
        if document.auth_method == "client_secret_post":
            form.update(client_id=self.oauth2.client_id, client_secret=self.oauth2.client_secret)
        else:
            headers["Authorization"] = basic_auth(self.oauth2.client_id, self.oauth2.client_secret)
        status, body = await self._call("token endpoint", "POST", document.token_endpoint, headers=headers, form=form)
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            if refreshing and error == "invalid_grant":
                raise SignInEnded("the provider refused the refresh token")
            kind = "refused" if error in ("invalid_grant", "access_denied") or (400 <= status < 500 and error) else "invalid_response"
            raise ProviderError(kind, f"token endpoint answered {status} ({word(error)})")
        if not isinstance(body.get("token_type"), str) or body["token_type"].lower() != "bearer":
            raise ProviderError("invalid_response", "token endpoint: token_type is not Bearer")
        if not _str(body.get("access_token")):
            raise ProviderError("invalid_response", "token endpoint: no access_token")
        return body

    async def _exchange(self, document, code, redirect_uri, verifier):
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
        body = await self._token_call(document, form)
        if not _str(body.get("id_token")):
            raise ProviderError("invalid_response", "token endpoint: no id_token")
        return body

    async def recheck(self, sub, grant):
        """
        Userinfo with the sign-in's access token while it is valid (a
        provider that leaves the groups claim out of userinfo is asked
        through a refresh instead); after that, the refresh token gets a new
        access token and ID token, whose claims and userinfo give the groups.
        A provider that issues no refresh token (some do only for the
        C{offline_access} scope) leaves group scopes to lapse with its
        access token, until the next sign-in.
        """
        if not isinstance(grant, dict):
            raise ProviderError("invalid_response", "no provider tokens to re-check the groups with")
        document = await self.discovery()
        claim = self.oauth2.groups_claim
        refresh_token = _str(grant.get("rt"))
        if document.userinfo_endpoint and access_token_valid(grant, self.clock.seconds()):
            status, body = await self._call("userinfo", "GET", document.userinfo_endpoint, headers={"Authorization": "Bearer " + grant["at"]})
            if status == 200 and isinstance(body, dict):
                if body.get("sub") != sub:
                    raise SignInEnded("userinfo names another subject")
                if claim in body or not refresh_token:
                    return _groups(body.get(claim)), grant
            elif status != 401:
                raise ProviderError("invalid_response", f"userinfo answered {status}")
        if not refresh_token:
            raise ProviderError("invalid_response", "the access token has expired and there is no refresh token")
        tokens = await self._token_call(document, {"grant_type": "refresh_token", "refresh_token": refresh_token}, refreshing=True)
        grant = make_grant(tokens, self.clock.seconds(), refresh_token)
        merged = {}
        if _str(tokens.get("id_token")):
            try:
                claims = await validate_id_token(tokens["id_token"], await self.keys(), document.issuer, self.oauth2.client_id, None, self.leeway)
            except IDTokenError as e:
                raise ProviderError("id_token", f"refreshed ID token refused: {e.reason}") from None
            if claims["sub"] != sub:
                raise SignInEnded("the refreshed ID token names another subject")
            merged.update(claims)
        if document.userinfo_endpoint:
            merged.update(await self._userinfo(document, grant["at"], sub))
        return _groups(merged.get(claim)), grant

    async def _userinfo(self, document, access_token, sub):
        status, body = await self._call("userinfo", "GET", document.userinfo_endpoint, headers={"Authorization": "Bearer " + access_token})
        if status != 200 or not isinstance(body, dict):
            raise ProviderError("invalid_response", f"userinfo answered {status}")
        # OIDC Core §5.3.4: the userinfo sub must be the ID token's.
        if body.get("sub") != sub:
            raise ProviderError("id_token", "userinfo names another subject")
        return body

    async def logout_url(self, post_logout_redirect_uri=None):
        try:
            document = await self.discovery()
        except ProviderError:
            return None
        if not document.end_session_endpoint:
            return None
        return with_query(document.end_session_endpoint, {"client_id": self.oauth2.client_id, "post_logout_redirect_uri": post_logout_redirect_uri})


# --- the presets --------------------------------------------------------------


class _Preset(_Provider):
    def __init__(self, oauth2, http, clock, leeway=30.0):
        super().__init__(oauth2, http, clock, leeway)
        self.endpoints = {**PRESET_ENDPOINTS[self.name], **dict(oauth2.endpoints)}
        scopes = tuple(oauth2.scopes)
        self.scopes = PRESET_SCOPES[self.name] if scopes == OIDC_DEFAULT_SCOPES else scopes

    def url(self, name, path=""):
        return self.endpoints[name].rstrip("/") + path if path else self.endpoints[name]

    @property
    def issuer(self):
        """The identity provider of this preset's users: the platform and the app's id."""
        return preset_issuer(self.name, self.oauth2.client_id)

    async def logout_url(self, post_logout_redirect_uri=None):
        return None

    def _best_effort(self, what, e):
        log.warn(
            "Could not read the departments of a {provider} user ({what}): {reason}",
            provider=self.name,
            what=what,
            reason=getattr(e, "reason", type(e).__name__),
        )


class _ErrCode(Exception):
    """A WeCom / DingTalk legacy API answered a non-zero errcode."""

    def __init__(self, errcode):
        super().__init__(errcode)
        self.errcode = errcode
        self.reason = f"errcode {word(errcode)}"


class WeComProvider(_Preset):
    """
    WeCom (企业微信) for a self-built app: the Web login link (or, when
    C{endpoints.authorize} is the in-client OAuth URL
    C{https://open.weixin.qq.com/connect/oauth2/authorize}, that link), then
    the corp access token (C{gettoken}, cached), C{auth/getuserinfo} by code
    (members only: an C{openid} is a non-member), C{user/get} for the name
    and departments, and C{auth/getuserdetail} when a C{user_ticket} came
    (scope C{snsapi_privateinfo}) for the e-mail.

    C{client_id} is the CorpID, C{client_secret} the app's Secret and
    C{agent_id} its AgentId.
    """

    name = "wecom"
    # Access token invalid or expired: fetch a new one and retry once.
    STALE_TOKEN = (40014, 42001)

    def __init__(self, oauth2, http, clock, leeway=30.0):
        super().__init__(oauth2, http, clock, leeway)
        self._token = Cached(clock, self._fetch_token)

    async def authorize_url(self, redirect_uri, state, nonce, challenge):
        base = self.url("authorize")
        if urllib.parse.urlsplit(base).path.endswith("/connect/oauth2/authorize"):
            params = {
                "appid": self.oauth2.client_id,
                "redirect_uri": redirect_uri,
                "response_type": "code",
                "scope": " ".join(self.scopes) or "snsapi_base",
                "state": state,
                "agentid": self.oauth2.agent_id,
            }
            return with_query(base, params) + "#wechat_redirect"
        params = {"login_type": "CorpApp", "appid": self.oauth2.client_id, "agentid": self.oauth2.agent_id, "redirect_uri": redirect_uri, "state": state}
        return with_query(base, params)

    async def _fetch_token(self):
        url = with_query(self.url("api", "/cgi-bin/gettoken"), {"corpid": self.oauth2.client_id, "corpsecret": self.oauth2.client_secret})
        return app_token(*await self._call("gettoken", "GET", url))

    async def _api(self, what, method, path, query, json_body=None):
        """A C{qyapi} call with the corp token; a stale token is renewed once."""
        for attempt in (1, 2):
            token = await self._token.get()
            url = with_query(self.url("api", path), {"access_token": token, **query})
            status, body = await self._call(what, method, url, json_body=json_body)
            if status != 200 or not isinstance(body, dict):
                raise ProviderError("invalid_response", f"{what} answered {status}")
            errcode = body.get("errcode", 0)
            if errcode in self.STALE_TOKEN and attempt == 1:
                self._token.clear()
                continue
            if errcode != 0:
                raise _ErrCode(errcode)
            return body

    async def identify(self, params, redirect_uri, verifier, nonce):
        code = params.get("code")
        if not code:
            raise ProviderError("refused", "the callback has no code")
        try:
            info = await self._api("getuserinfo", "GET", "/cgi-bin/auth/getuserinfo", {"code": code})
        except _ErrCode as e:
            # 40029: invalid code (used, expired or never issued).
            kind = "refused" if e.errcode == 40029 else "invalid_response"
            raise ProviderError(kind, f"getuserinfo: {e.reason}") from None
        userid = _str(info.get("userid")) or _str(info.get("UserId"))
        if not userid:
            raise ProviderError("not_member", "getuserinfo: not a member of the corp (openid only)")
        name, email, departments = None, None, ()
        try:
            user = await self._api("user/get", "GET", "/cgi-bin/user/get", {"userid": userid})
            name = _str(user.get("name"))
            email = _str(user.get("email")) or _str(user.get("biz_mail"))
            departments = _groups(user.get("department"))
        except (ProviderError, _ErrCode) as e:
            self._best_effort("user/get", e)
        ticket = _str(info.get("user_ticket"))
        if ticket:
            try:
                detail = await self._api("getuserdetail", "POST", "/cgi-bin/auth/getuserdetail", {}, json_body={"user_ticket": ticket})
                email = _str(detail.get("email")) or _str(detail.get("biz_mail")) or email
            except (ProviderError, _ErrCode) as e:
                self._best_effort("getuserdetail", e)
        return Identity(sub=userid, name=name, email=email, groups=departments, issuer=self.issuer)

    # user/get: 60111 is "userid not found"; status 2 is disabled, 5 left.
    GONE = (60111,)
    GONE_STATUS = (2, 5)

    async def recheck(self, sub, grant):
        """The departments from C{user/get}, with the corp token; a user no longer in the corp ends the sign-in."""
        try:
            user = await self._api("user/get", "GET", "/cgi-bin/user/get", {"userid": sub})
        except _ErrCode as e:
            if e.errcode in self.GONE:
                raise SignInEnded(f"user/get: {e.reason} (no longer in the corp)") from None
            raise ProviderError("invalid_response", f"user/get: {e.reason}") from None
        if user.get("status") in self.GONE_STATUS:
            raise SignInEnded("user/get: the member is disabled or has left")
        return _groups(user.get("department")), grant


def _errcode(body):
    return f"errcode {word(body.get('errcode'))}" if isinstance(body, dict) else "not JSON"


def app_token(status, body):
    """
    The (token, seconds to cache it) of a WeCom or DingTalk C{gettoken}
    answer, which share a shape: C{errcode}, C{access_token}, C{expires_in}.
    """
    if status != 200 or not isinstance(body, dict) or body.get("errcode", 0) != 0 or not _str(body.get("access_token")):
        raise ProviderError("invalid_response", f"gettoken answered {status} ({_errcode(body)})")
    expires = body.get("expires_in")
    ttl = max(60.0, float(expires) - 300.0) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else 3600.0
    return body["access_token"], ttl


class DingTalkProvider(_Preset):
    """
    DingTalk (钉钉) for an internal app: C{login.dingtalk.com/oauth2/auth},
    the user access token (C{POST /v1.0/oauth2/userAccessToken}), the user
    (C{GET /v1.0/contact/users/me}, header C{x-acs-dingtalk-access-token});
    then, best-effort, the departments through the app's own token
    (C{oapi gettoken}, C{topapi/user/getbyunionid}, C{topapi/v2/user/get}).

    C{client_id} is the app's Client ID (AppKey), C{client_secret} its
    Client Secret.  C{sub} is the C{unionId}.
    """

    name = "dingtalk"

    def __init__(self, oauth2, http, clock, leeway=30.0):
        super().__init__(oauth2, http, clock, leeway)
        self._token = Cached(clock, self._fetch_app_token)

    async def authorize_url(self, redirect_uri, state, nonce, challenge):
        return with_query(
            self.url("authorize"),
            {
                "redirect_uri": redirect_uri,
                "response_type": "code",
                "client_id": self.oauth2.client_id,
                "scope": " ".join(self.scopes) or "openid",
                "state": state,
                "prompt": "consent",
            },
        )

    async def identify(self, params, redirect_uri, verifier, nonce):
        code = params.get("authCode") or params.get("code")
        if not code:
            raise ProviderError("refused", "the callback has no authCode")
        status, body = await self._call(
            "userAccessToken",
            "POST",
            self.url("token"),
            json_body={"clientId": self.oauth2.client_id, "clientSecret": self.oauth2.client_secret, "code": code, "grantType": "authorization_code"},
        )
        if status != 200 or not isinstance(body, dict) or not _str(body.get("accessToken")):
            code_name = body.get("code") if isinstance(body, dict) else None
            kind = "refused" if 400 <= status < 500 else "invalid_response"
            raise ProviderError(kind, f"userAccessToken answered {status} ({word(code_name)})")
        status, me = await self._call("users/me", "GET", self.url("userinfo"), headers={"x-acs-dingtalk-access-token": body["accessToken"]})
        if status != 200 or not isinstance(me, dict) or not _str(me.get("unionId")):
            code_name = me.get("code") if isinstance(me, dict) else None
            raise ProviderError("invalid_response", f"users/me answered {status} ({word(code_name)})")
        name, email, departments = _str(me.get("nick")), _str(me.get("email")), ()
        try:
            user = await self._corp_user(me["unionId"])
            name = _str(user.get("name")) or name
            email = email or _str(user.get("org_email")) or _str(user.get("email"))
            departments = _groups(user.get("dept_id_list"))
        except (ProviderError, _ErrCode) as e:
            self._best_effort("contact", e)
        return Identity(sub=me["unionId"], name=name, email=email, groups=departments, issuer=self.issuer)

    async def recheck(self, sub, grant):
        """The departments from the contact API, with the app's token (best-effort at sign-in, so here too)."""
        try:
            user = await self._corp_user(sub)
        except _ErrCode as e:
            raise ProviderError("invalid_response", f"contact: {e.reason}") from None
        return _groups(user.get("dept_id_list")), grant

    async def _fetch_app_token(self):
        url = with_query(self.url("oapi", "/gettoken"), {"appkey": self.oauth2.client_id, "appsecret": self.oauth2.client_secret})
        return app_token(*await self._call("gettoken", "GET", url))

    async def _oapi(self, what, path, payload):
        token = await self._token.get()
        status, body = await self._call(what, "POST", with_query(self.url("oapi", path), {"access_token": token}), json_body=payload)
        if status != 200 or not isinstance(body, dict):
            raise ProviderError("invalid_response", f"{what} answered {status}")
        if body.get("errcode", 0) != 0:
            if body.get("errcode") in (40014, 42001, 88):
                self._token.clear()
            raise _ErrCode(body.get("errcode"))
        result = body.get("result")
        if not isinstance(result, dict):
            raise ProviderError("invalid_response", f"{what}: no result")
        return result

    async def _corp_user(self, union_id):
        found = await self._oapi("getbyunionid", "/topapi/user/getbyunionid", {"unionid": union_id})
        userid = _str(found.get("userid"))
        if not userid:
            raise ProviderError("invalid_response", "getbyunionid: no userid")
        return await self._oapi("user/get", "/topapi/v2/user/get", {"userid": userid, "language": "zh_CN"})


class FeishuProvider(_Preset):
    """
    Feishu (飞书): the authorize page with PKCE S256, the v2 OAuth token
    endpoint (JSON body, C{client_secret} and C{code_verifier}), the
    C{authen/v1/user_info} of the user; then, best-effort, the user's
    departments (C{contact/v3/users/:open_id}, with the user's token: it
    needs the contact scopes in C{oauth2.scopes}).

    C{client_id} is the App ID, C{client_secret} the App Secret.  C{sub} is
    the C{union_id} (else the C{open_id}).
    """

    name = "feishu"
    pkce = True

    async def authorize_url(self, redirect_uri, state, nonce, challenge):
        return with_query(
            self.url("authorize"),
            {
                "client_id": self.oauth2.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(self.scopes) or None,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )

    async def identify(self, params, redirect_uri, verifier, nonce):
        code = params.get("code")
        if not code:
            raise ProviderError("refused", "the callback has no code")
        body = await self._token({"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier})
        token = body["access_token"]
        bearer = {"Authorization": "Bearer " + token}
        status, info = await self._call("user_info", "GET", self.url("userinfo"), headers=bearer)
        data = info.get("data") if isinstance(info, dict) and info.get("code") == 0 else None
        if status != 200 or not isinstance(data, dict) or not _str(data.get("open_id")):
            number = info.get("code") if isinstance(info, dict) else None
            raise ProviderError("invalid_response", f"user_info answered {status} ({word(number)})")
        departments = ()
        try:
            departments = await self._departments(data["open_id"], bearer)
        except ProviderError as e:
            self._best_effort("contact", e)
        return Identity(
            sub=_str(data.get("union_id")) or data["open_id"],
            name=_str(data.get("name")),
            email=_str(data.get("enterprise_email")) or _str(data.get("email")),
            groups=departments,
            issuer=self.issuer,
            grant={**make_grant(body, self.clock.seconds()), "oid": data["open_id"]},
        )

    async def _token(self, grant, refreshing=False):
        """
        The v2 token endpoint (JSON, the app's credentials): its answer.

        @raise SignInEnded: C{refreshing} and the refresh token is refused.
        """
        payload = {**grant, "client_id": self.oauth2.client_id, "client_secret": self.oauth2.client_secret}
        status, body = await self._call("oauth/token", "POST", self.url("token"), json_body=payload)
        if status != 200 or not isinstance(body, dict) or body.get("code", 0) != 0 or not _str(body.get("access_token")):
            error = body.get("error") if isinstance(body, dict) else None
            number = body.get("code") if isinstance(body, dict) else None
            if refreshing and error == "invalid_grant":
                raise SignInEnded(f"oauth/token refused the refresh token ({word(number)})")
            if number == 20010:
                # The user may not use the app (its availability settings).
                kind = "not_member"
            elif error in ("invalid_grant", "access_denied"):
                kind = "refused"
            else:
                kind = "invalid_response"
            raise ProviderError(kind, f"oauth/token answered {status} ({word(number)} {word(error)})")
        return body

    async def recheck(self, sub, grant):
        """The departments with the user's token, renewed by its refresh token once it expires."""
        if not isinstance(grant, dict) or not _str(grant.get("oid")):
            raise ProviderError("invalid_response", "no user token to re-check the departments with")
        if not access_token_valid(grant, self.clock.seconds()):
            refresh_token = _str(grant.get("rt"))
            if not refresh_token:
                raise ProviderError("invalid_response", "the user token has expired and there is no refresh token")
            body = await self._token({"grant_type": "refresh_token", "refresh_token": refresh_token}, refreshing=True)
            grant = {**make_grant(body, self.clock.seconds(), refresh_token), "oid": grant["oid"]}
        return await self._departments(grant["oid"], {"Authorization": "Bearer " + grant["at"]}), grant

    async def _departments(self, open_id, bearer):
        url = with_query(
            self.url("contact", "/" + urllib.parse.quote(open_id, safe="")),
            {"user_id_type": "open_id", "department_id_type": "open_department_id"},
        )
        status, body = await self._call("contact/v3/users", "GET", url, headers=bearer)
        user = body.get("data", {}).get("user") if isinstance(body, dict) and body.get("code") == 0 and isinstance(body.get("data"), dict) else None
        if status != 200 or not isinstance(user, dict):
            number = body.get("code") if isinstance(body, dict) else None
            raise ProviderError("invalid_response", f"contact/v3/users answered {status} ({word(number)})")
        return _groups(user.get("department_ids"))


PROVIDERS = {"oidc": OIDCProvider, "wecom": WeComProvider, "dingtalk": DingTalkProvider, "feishu": FeishuProvider}


def make_provider(oauth2, http, clock, leeway=30.0):
    """
    The provider for C{oauth2} (the config section).

    @param http: an object with C{fetch_json(url)} and C{call(method, url,
        headers=, form=, json_body=) -> (status, body)}, as
        L{clawdbot.auth.fetch.HTTPFetcher}.
    """
    return PROVIDERS[oauth2.provider](oauth2, http, clock, leeway)
