"""
Single sign-on (SPEC.md §5): the login routes on the secure listener (the
pure rules and the cookie crypto they use are L{clawdbot.auth.session}).

    GET  /auth/login?next=/path   302 to the provider; sets the login cookie
    GET  <redirect_uri path>      the callback; sets the refresh cookie, 302 to next
    POST /auth/refresh            {"access_token", "token_type": "Bearer", "expires_in"}
    POST /auth/logout             {"logout_url": ... or null}

State lives in the browser, encrypted, never on one instance: the login
cookie (HttpOnly, SameSite=Lax, Path=<callback path>, 10 minutes) binds
C{state}, C{nonce}, the PKCE C{code_verifier} and C{next}; the callback
clears it and records the state as used in the shared store, so a callback
URL works once.  The refresh cookie (HttpOnly, SameSite=Strict, Path=/auth,
Secure on https) carries the identity (sub, name, e-mail, the identity
provider), the provider tokens that re-check it (the identity's C{grant})
and a random id; logout revokes that id in the store until the cookie would
have expired.  Neither groups nor scopes are stored: every refresh reads the
user's groups from the provider again (L{clawdbot.auth.providers}) and maps them
through the current config (C{default_scopes} plus C{group_scopes}), so
nothing the browser sends can add a scope, and someone removed from a group
at the provider loses its scopes within one session TTL.  A provider that
cannot answer leaves the default scopes only; one that ends the sign-in
(a refused refresh token, a user who left the corp) ends it here too.

Cookies are sealed with AES-256-GCM (confidential and authenticated, bound
to their purpose) under a key derived from C{oauth2.session_secret} (else
C{auth.jwt.secret}); session JWTs are HS256 under another key derived from
the same secret, issued by the gateway's origin for the audience
C{clawdbot-session}, and verified by L{clawdbot.auth.tokens} like any other token.
Their C{idp} claim names the identity provider the user signed in through,
so that the principal is that provider's C{sub} (L{clawdbot.auth.identity}).

Browser navigations that fail (the callback, the login redirect) get a small
HTML page with a fixed message in English and Chinese and the request id,
never a provider's text, a stack trace or an address; the JSON calls
(refresh, logout) answer in the §4 error shape.
"""

import hashlib
import hmac
import html
import secrets

from twisted.logger import Logger

from clawdbot.auth.session import (
    BadCookie,
    LOGIN_COOKIE,
    LOGIN_TTL,
    MAX_COOKIE,
    NO_STORE,
    REFRESH_COOKIE,
    REFRESH_PATH,
    SESSION_AUDIENCE,
    allowed_origins,
    callback_path,
    cookie_header,
    cookie_key,
    email_allowed,
    pkce_challenge,
    provider_id,
    safe_next,
    scopes_for,
    seal,
    secure_cookies,
    session_issuer,
    session_signing_key,
    unseal,
)
from clawdbot.auth.identity import owner_key
from clawdbot.auth.tokens import mint
from clawdbot.errors import APIError
from clawdbot.auth.providers import ProviderError, SignInEnded, make_provider, word
from clawdbot.http.resource import APIResource, JSONResponse, Node, query_arg

log = Logger(namespace="clawdbot.sso")

# --- the friendly pages -------------------------------------------------------

# kind -> (status, title, English, Chinese)
PAGES = {
    "access_denied": (403, "Sign-in cancelled", "The sign-in was cancelled or refused at the identity provider.", "登录已取消，或被身份提供方拒绝。"),
    "provider_error": (502, "Sign-in failed", "The identity provider reported an error.", "身份提供方返回了错误。"),
    "state": (400, "Sign-in expired", "This sign-in has expired or was already used. Please sign in again.", "本次登录已过期或已被使用，请重新登录。"),
    "bad_request": (400, "Sign-in failed", "The sign-in request is not valid. Please sign in again.", "登录请求无效，请重新登录。"),
    "refused": (400, "Sign-in failed", "The identity provider did not accept this sign-in. Please sign in again.", "身份提供方未接受本次登录，请重新登录。"),
    "unreachable": (502, "Identity provider unavailable", "The identity provider cannot be reached right now. Please try again later.", "暂时无法连接身份提供方，请稍后再试。"),
    "invalid_response": (502, "Sign-in failed", "The identity provider's answer could not be used.", "无法使用身份提供方的响应。"),
    "id_token": (502, "Sign-in failed", "The identity provider's answer could not be verified.", "无法验证身份提供方的响应。"),
    "mixup": (400, "Sign-in failed", "The answer came from another identity provider.", "响应来自其他身份提供方。"),
    "not_member": (403, "Access denied", "This account may not use this service.", "此帐号无权使用本服务。"),
    "not_allowed": (403, "Access denied", "This account may not use this service.", "此帐号无权使用本服务。"),
}

PAGE_CSP = b"default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def page_html(kind, request_id):
    """The friendly page for C{kind}: fixed text, everything escaped."""
    status, title, english, chinese = PAGES.get(kind, PAGES["invalid_response"])
    e = html.escape
    body = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title></head>
<body>
<main>
<h1>{e(title)}</h1>
<p>{e(english)}</p>
<p lang="zh">{e(chinese)}</p>
<p><a href="/auth/login">Sign in again / 重新登录</a> &middot; <a href="/">Home / 首页</a></p>
<p><small>Reference / 参考编号: {e(request_id)}</small></p>
</main>
</body>
</html>
"""
    return status, body.encode("utf-8")


# --- the routes -----------------------------------------------------------------


class SSO:
    """
    What the routes share: the provider for the current config (rebuilt
    when the oauth2 section changes, so its discovery and key caches live
    as long as the config does).
    """

    def __init__(self, fetcher, clock):
        self.fetcher = fetcher
        self.clock = clock
        self._for = None
        self._provider = None

    def provider(self, config):
        key = (config.oauth2, config.auth.jwt.leeway)
        if self._provider is None or self._for != key:
            self._provider = make_provider(config.oauth2, self.fetcher, self.clock, leeway=config.auth.jwt.leeway)
            self._for = key
        return self._provider

    def now(self):
        return self.clock.seconds()

    def mint_session(self, config, session, groups, now):
        """A session JWT for the identity in a refresh cookie, in C{groups} now, under today's policy."""
        oauth2 = config.oauth2
        groups = list(groups)
        scopes = scopes_for(groups, oauth2)
        return mint(
            session_signing_key(config),
            session_issuer(config),
            SESSION_AUDIENCE,
            session["sub"],
            " ".join(sorted(scopes)),
            oauth2.session_ttl,
            now=now,
            name=session.get("name"),
            email=session.get("email"),
            teams=groups,
            sid=session.get("rid"),
            idp=session["idp"],
        )


def _set_cookie(request, value):
    request.cookies.append(value)


def _security_headers(request):
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"pragma", b"no-cache")
    request.setHeader(b"referrer-policy", b"no-referrer")


def _redirect(request, location):
    if request.gone or request.finished:
        return
    request.setResponseCode(302)
    _security_headers(request)
    request.setHeader(b"location", location.encode("ascii"))
    request.setHeader(b"content-length", b"0")
    request.finish()


def _page(request, kind):
    if request.gone or request.finished:
        return
    status, body = page_html(kind, request.request_id)
    request.setResponseCode(status)
    _security_headers(request)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"content-security-policy", PAGE_CSP)
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def _peer(request):
    return request.client_host()


class _AuthRoute(APIResource):
    """An SSO route: there only on the secure listener and while oauth2 is enabled."""

    ip_limited = True
    # The page's own, with cookies: no CORS headers, whatever server.cors_origins lists.
    cross_origin = False

    def __init__(self, parts, sso):
        super().__init__(parts)
        self.sso = sso
        self.store = parts.history.store
        self.keys = parts.keys
        self.audit = parts.audit

    def route(self, request):
        if request.site.debug or request.config is None or not request.config.oauth2.enabled:
            return None
        return self.scopes

    def refused(self, request, kind, reason):
        self.audit.record("auth.sign_in_refused", request, obj=kind, reason=reason)
        log.warn(
            "Sign-in refused ({kind}): {reason}",
            kind=kind,
            reason=reason,
            peer=_peer(request),
            security_event="sso_failure",
            request_id=request.request_id,
        )
        _page(request, kind)

    def clear(self, request, config, name, path):
        _set_cookie(request, cookie_header(name, "", path, 0, secure_cookies(config), "Lax" if name == LOGIN_COOKIE else "Strict"))


class Login(_AuthRoute):
    """C{GET /auth/login?next=/path}: off to the provider."""

    scopes = {"GET": None}

    async def handle_GET(self, request):
        config = request.config
        try:
            wanted = query_arg(request, "next")
        except (ValueError, UnicodeDecodeError):
            wanted = None
        target = safe_next(wanted) if wanted is not None else "/"
        if target is None:
            log.info("Ignored an unsafe next on login", peer=_peer(request), security_event="sso_unsafe_next", request_id=request.request_id)
            target = "/"
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        provider = self.sso.provider(config)
        try:
            location = await provider.authorize_url(config.oauth2.redirect_uri, state, nonce, pkce_challenge(verifier))
        except ProviderError as e:
            return self.refused(request, e.kind, e.reason)
        payload = {"s": state, "n": nonce, "v": verifier, "next": target, "exp": int(self.sso.now()) + LOGIN_TTL}
        value = seal(cookie_key(config), "login", payload)
        _set_cookie(request, cookie_header(LOGIN_COOKIE, value, callback_path(config), LOGIN_TTL, secure_cookies(config), "Lax"))
        _redirect(request, location)


class Callback(_AuthRoute):
    """C{GET <redirect_uri path>}: the provider's answer."""

    scopes = {"GET": None}
    PARAMS = ("code", "authCode", "state", "iss", "error")

    async def handle_GET(self, request):
        config = request.config
        oauth2 = config.oauth2
        now = self.sso.now()
        raw = request.getCookie(LOGIN_COOKIE.encode("ascii"))
        # The login cookie is for one callback, whatever happens next.
        self.clear(request, config, LOGIN_COOKIE, callback_path(config))
        try:
            params = {name: value for name in self.PARAMS if (value := query_arg(request, name)) is not None}
        except (ValueError, UnicodeDecodeError):
            return self.refused(request, "bad_request", "a callback parameter is repeated or not UTF-8")
        if "error" in params:
            kind = "access_denied" if params["error"] == "access_denied" else "provider_error"
            log.info("The provider answered the login with an error: {error}", error=word(params["error"]), request_id=request.request_id)
            self.audit.record("auth.sign_in_refused", request, obj=kind, reason=f"the provider answered {word(params['error'])}")
            return _page(request, kind)
        try:
            login = unseal(cookie_key(config), "login", raw, now)
        except BadCookie as e:
            return self.refused(request, "state", f"login cookie: {e.reason}")
        state = params.get("state")
        if not isinstance(login.get("s"), str) or state is None or not hmac.compare_digest(state.encode("utf-8"), login["s"].encode("utf-8")):
            return self.refused(request, "state", "state does not match the login cookie")
        marker = "login:" + hashlib.sha256(state.encode("utf-8")).hexdigest()
        store = self.store
        # Single use, atomically, across every instance sharing the store.
        if not await store.revoke(marker, float(login["exp"])):
            return self.refused(request, "state", "state already used (replayed callback)")
        provider = self.sso.provider(config)
        try:
            identity = await provider.identify(params, oauth2.redirect_uri, login["v"], login["n"])
        except ProviderError as e:
            return self.refused(request, e.kind, e.reason)
        if not email_allowed(identity.email, identity.email_verified, oauth2):
            return self.refused(request, "not_allowed", "e-mail address outside oauth2.allowed_email_domains")
        if not identity.issuer:
            return self.refused(request, "invalid_response", "the provider's identity names no issuer")
        value = self.refresh_cookie(config, identity, now)
        if value is None:
            return self.refused(request, "invalid_response", "the identity is too large for a cookie")
        _set_cookie(request, cookie_header(REFRESH_COOKIE, value, REFRESH_PATH, oauth2.refresh_ttl, secure_cookies(config), "Strict"))
        log.info("Signed in {sub} through {provider}", sub=identity.sub, provider=oauth2.provider, request_id=request.request_id, security_event="sso_login")
        self.audit.record("auth.sign_in", request, principal=(identity.issuer, identity.sub), obj=oauth2.provider)
        _redirect(request, safe_next(login.get("next")) or "/")

    def refresh_cookie(self, config, identity, now):
        payload = {
            "rid": secrets.token_urlsafe(18),
            "sub": identity.sub,
            "name": identity.name,
            "email": identity.email,
            "ev": identity.email_verified,
            "idp": identity.issuer,
            "grant": identity.grant,
            "prov": provider_id(config.oauth2),
            "iat": int(now),
            "exp": int(now + config.oauth2.refresh_ttl),
        }
        return seal_refresh(config, payload)


def seal_refresh(config, payload):
    """
    The refresh cookie's value for C{payload}, or C{None} when even the
    smallest form is too large for a cookie.  Large provider tokens are
    dropped in turn: the access token first (a refresh then asks for a new
    one), then the whole grant (group scopes then lapse until the next
    sign-in: membership that cannot be re-checked is not granted).
    """
    key = cookie_key(config)
    value = seal(key, "refresh", payload)
    grant = payload.get("grant")
    if len(value) > MAX_COOKIE and isinstance(grant, dict) and grant.get("rt"):
        payload = dict(payload, grant={k: v for k, v in grant.items() if k not in ("at", "ax")})
        value = seal(key, "refresh", payload)
    if len(value) > MAX_COOKIE and payload.get("grant") is not None:
        log.warn("The provider's tokens are too large for the refresh cookie; group scopes will not be re-checked for {sub}", sub=payload.get("sub"))
        payload = dict(payload, grant=None)
        value = seal(key, "refresh", payload)
    return value if len(value) <= MAX_COOKIE else None


def check_csrf(request, config):
    """
    Refresh and logout are for the gateway's own page: they need
    C{X-Requested-With: XMLHttpRequest} (which a cross-site form cannot send
    and a cross-site fetch cannot send without a CORS preflight the gateway
    never grants) and, when the browser names an C{Origin}, the gateway's own.

    @raise APIError: CSRF_REJECTED (403).
    """
    xrw = request.getHeader(b"x-requested-with")
    if not xrw or xrw.decode("latin-1").strip().lower() != "xmlhttprequest":
        raise APIError("CSRF_REJECTED", details="the header X-Requested-With: XMLHttpRequest is required")
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if origins:
        host = request.getHeader(b"host")
        allowed = allowed_origins(config, host.decode("latin-1") if host else None, request.isSecure())
        if len(origins) != 1 or origins[0].decode("latin-1").strip().lower() not in allowed:
            raise APIError("CSRF_REJECTED", details="the request comes from another origin")
    site = request.getHeader(b"sec-fetch-site")
    if site and site.decode("latin-1").strip().lower() == "cross-site":
        raise APIError("CSRF_REJECTED", details="the request comes from another site")


class Refresh(_AuthRoute):
    """C{POST /auth/refresh}: a fresh session JWT from the refresh cookie."""

    scopes = {"POST": None}

    async def handle_POST(self, request):
        config = request.config
        check_csrf(request, config)
        now = self.sso.now()
        raw = request.getCookie(REFRESH_COOKIE.encode("ascii"))
        if raw is None:
            raise APIError("AUTH_MISSING_TOKEN", details="no sign-in session; sign in at /auth/login", headers=NO_STORE)
        reason = None
        session = None
        try:
            session = unseal(cookie_key(config), "refresh", raw, now)
        except BadCookie as e:
            reason = "the sign-in session has expired" if e.reason == "expired" else "the sign-in session is not valid"
        else:
            well_formed = all(isinstance(session.get(k), str) and session[k] for k in ("sub", "rid", "idp"))
            if session.get("prov") != provider_id(config.oauth2) or not well_formed:
                reason = "the sign-in session is not valid"
            elif await self.store.is_revoked("refresh:" + session["rid"]):
                reason = "the sign-in session was ended"
            elif not email_allowed(session.get("email"), session.get("ev", True), config.oauth2):
                reason = "the account is no longer allowed"
                await self.keys.owner_ended(owner_key(session["idp"], session["sub"]))
        if reason is None:
            groups, reason = await self.current_groups(request, config, session, now)
        if reason is not None:
            self.clear(request, config, REFRESH_COOKIE, REFRESH_PATH)
            log.info("Refused a refresh: {reason}", reason=reason, peer=_peer(request), security_event="sso_refresh_refused", request_id=request.request_id)
            known = session is not None and isinstance(session.get("sub"), str) and isinstance(session.get("idp"), str)
            self.audit.record("auth.refresh_refused", request, principal=(session["idp"], session["sub"]) if known else None, reason=reason)
            raise APIError("AUTH_INVALID_TOKEN", details=reason, headers=NO_STORE)
        token = self.sso.mint_session(config, session, groups, now)
        request.audit["user"] = session["sub"]
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": int(config.oauth2.session_ttl)}, headers=NO_STORE)

    async def current_groups(self, request, config, session, now):
        """
        C{(groups, None)}: the user's groups at the provider now (none when it
        cannot say), the cookie renewed when the provider renewed its
        tokens; or C{(None, reason)} when the provider ended the sign-in,
        which is then revoked here too.
        """
        provider = self.sso.provider(config)
        grant = session.get("grant")
        try:
            groups, renewed = await provider.recheck(session["sub"], grant)
        except SignInEnded as e:
            await self.store.revoke("refresh:" + session["rid"], float(session["exp"]))
            # Removed at the provider: the user's API keys end with the sign-in.
            await self.keys.owner_ended(owner_key(session["idp"], session["sub"]))
            log.info(
                "The provider ended the sign-in of {sub}: {reason}",
                sub=session["sub"],
                reason=e.reason,
                request_id=request.request_id,
                security_event="sso_ended_by_provider",
            )
            return None, "the identity provider ended the sign-in session"
        except ProviderError as e:
            log.warn(
                "Could not re-check the groups of {sub} ({reason}); default scopes only for now",
                sub=session["sub"],
                reason=e.reason,
                request_id=request.request_id,
            )
            return (), None
        if renewed != grant:
            value = seal_refresh(config, dict(session, grant=renewed))
            if value is not None:
                max_age = max(1, int(session["exp"] - now))
                _set_cookie(request, cookie_header(REFRESH_COOKIE, value, REFRESH_PATH, max_age, secure_cookies(config), "Strict"))
        return groups, None


class Logout(_AuthRoute):
    """C{POST /auth/logout}: end the session here, and say where to end it at the provider."""

    scopes = {"POST": None}

    async def handle_POST(self, request):
        config = request.config
        check_csrf(request, config)
        raw = request.getCookie(REFRESH_COOKIE.encode("ascii"))
        try:
            session = unseal(cookie_key(config), "refresh", raw, self.sso.now())
        except BadCookie:
            session = None
        if session is not None and isinstance(session.get("rid"), str):
            await self.store.revoke("refresh:" + session["rid"], float(session["exp"]))
            log.info("Signed out {sub}", sub=session.get("sub"), request_id=request.request_id, security_event="sso_logout")
            if isinstance(session.get("sub"), str) and isinstance(session.get("idp"), str):
                self.audit.record("auth.sign_out", request, principal=(session["idp"], session["sub"]))
        self.clear(request, config, REFRESH_COOKIE, REFRESH_PATH)
        url = await self.sso.provider(config).logout_url(config.oauth2.post_logout_redirect_uri)
        return JSONResponse({"logout_url": url}, headers=NO_STORE)


def _mount(root, path, resource):
    """Put C{resource} at C{path}, creating the L{Node}s on the way."""
    segments = [s.encode("ascii") for s in path.strip("/").split("/")]
    parent = root
    for segment in segments[:-1]:
        child = parent.children.get(segment)
        if child is None:
            child = Node()
            parent.putChild(segment, child)
        elif not isinstance(child, Node):
            log.error("The callback path {path} is taken by another route", path=path)
            return
        parent = child
    if segments[-1] in parent.children:
        log.error("The callback path {path} is taken by another route", path=path)
        return
    parent.putChild(segments[-1], resource)


def add_routes(root, parts):
    """
    The SSO routes of the secure listener.  The callback is mounted at the
    path of C{oauth2.redirect_uri} as the gateway starts; a reload that
    moves it is logged as needing a restart.
    """
    sso = SSO(parts.fetcher, parts.reactor)
    auth = root.children.get(b"auth")
    if auth is None:
        auth = Node()
        root.putChild(b"auth", auth)
    auth.putChild(b"login", Login(parts, sso))
    auth.putChild(b"refresh", Refresh(parts, sso))
    auth.putChild(b"logout", Logout(parts, sso))
    mounted = callback_path(parts.runtime.config)
    _mount(root, mounted, Callback(parts, sso))

    def moved(old, new):
        if callback_path(new) != mounted:
            log.warn("Config key oauth2.redirect_uri changed its path; the callback stays at {path} until a restart", path=mounted)

    parts.runtime.on_reload(moved)
    return sso
