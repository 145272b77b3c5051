"""
Single sign-on (SPEC.md §5, issue 5): the Authorization Code flow with PKCE
against a real OpenID Connect provider (tests/idp.py), the WeCom, DingTalk
and Feishu presets against local fakes that answer with the payloads of
those platforms' documentation, and the small rules underneath (next URLs,
signed cookies, scope policy, CSRF, ID token validation, discovery).
"""

import http.cookiejar
import json
import time
import urllib.parse

import jwt
import treq
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from clawdbot.auth import session
from clawdbot.http import sso
from clawdbot.auth.tokens import KeySet
from clawdbot.auth.fetch import FetchError
from clawdbot.config import ConfigError, parse_config
from clawdbot.auth.providers import Cached, IDTokenError, OIDCProvider, ProviderError, parse_discovery, validate_id_token
from tests.helpers import SECRET, closed_port, jwk, rsa_key, merge_yaml, reserved_port, serve
from tests.idp import IdP, browserless_login, browserless_logout

CLIENT_ID = "clawdbot-gateway"
CLIENT_SECRET = "idp-client-secret-0123456789abcdef"
USERS = [
    {"sub": "alice", "email": "alice@example.test", "name": "Alice Example", "groups": ["admins", "users"]},
    {"sub": "bob", "email": "bob@example.test", "name": "Bob", "groups": []},
]
GROUP_SCOPES = '{admins: ["admin", "history:admins"], users: ["history:users"]}'
XRW = {"X-Requested-With": "XMLHttpRequest"}
EVIL_NEXTS = [
    "//evil.example/x",
    "/\\evil.example",
    "/\\/evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
    "/%2F%2Fevil.example",
    "/%5Cevil.example",
    "http:/evil.example",
    " /x",
    "x",
]


# --- helpers ------------------------------------------------------------------


class Reply:
    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body
        self.cookies = {}
        for raw in headers.getRawHeaders(b"set-cookie") or []:
            first, *attrs = raw.decode("latin-1").split("; ")
            name, _, value = first.partition("=")
            self.cookies[name] = (value, [a.lower() for a in attrs])

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0].decode("latin-1") if values else None

    def json(self):
        return json.loads(self.body)

    @property
    def text(self):
        return self.body.decode("utf-8")


async def call(method, url, headers=None, cookies=None, body=None):
    """One request, redirects not followed, cookies sent by hand."""
    hdrs = dict(headers or {})
    if cookies:
        hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    response = await treq.request(method, url, headers=hdrs, data=body, allow_redirects=False, persistent=False)
    return Reply(response.code, response.headers, await response.content())


def query_of(url):
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def path_and_query(url):
    parts = urllib.parse.urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def run(testcase, coro):
    """Run a coroutine that never waits on the reactor; its result."""
    return testcase.successResultOf(Deferred.fromCoroutine(coro))


def fails(testcase, coro, kind):
    return testcase.failureResultOf(Deferred.fromCoroutine(coro), kind).value


def assert_friendly_page(testcase, reply, status, title):
    """A friendly HTML page: fixed text, strict CSP, nothing internal."""
    testcase.assertEqual(reply.code, status)
    testcase.assertEqual(reply.header(b"content-type"), "text/html; charset=utf-8")
    testcase.assertIn("default-src 'none'", reply.header(b"content-security-policy"))
    testcase.assertEqual(reply.header(b"cache-control"), "no-store")
    testcase.assertIn(title, reply.text)
    for leak in ("Traceback", "Error:", "127.0.0.1", "localhost", "<script", "sso.example.com", "Exception"):
        testcase.assertNotIn(leak, reply.text)


def oauth2_config(extra="", **oauth2):
    """A parsed config with oauth2 enabled (OIDC against sso.example.com unless changed)."""
    base = {
        "enabled": True,
        "provider": "oidc",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uri": "https://chat.example.com/callback",
        "issuer_url": "https://sso.example.com",
    }
    base.update(oauth2)
    text = merge_yaml(
        f"""
auth:
  jwt: {{secret: "{SECRET}", issuer: "https://jwt.example.com", audience: "qwen-web-chat"}}
""",
        json.dumps({"oauth2": base}),
    )
    return parse_config(merge_yaml(text, extra) if extra else text, {})


# --- next URLs, cookies, policy -----------------------------------------------------


class NextTests(SynchronousTestCase):
    def test_relative_paths_accepted(self):
        """Same-origin relative paths pass unchanged, with query and fragment."""
        for value in ("/", "/x", "/chat/42?tab=a&b=1#top", "/a%20b", "/%E4%B8%AD"):
            self.assertEqual(session.safe_next(value), value)

    def test_open_redirects_refused(self):
        """Other hosts, schemes, backslash tricks and their encoded forms are refused."""
        for value in EVIL_NEXTS + ["", None, 42, "/x\r\nSet-Cookie: a=b", "/\t/evil", "/中文", "/auth/logout", "/auth", "/x" * 2000]:
            self.assertIsNone(session.safe_next(value), value)

    @given(st.text(max_size=60))
    def test_anything_accepted_stays_on_this_origin(self, value):
        """Whatever is accepted resolves, in a browser, to a path on the gateway's own origin."""
        accepted = session.safe_next(value)
        if accepted is not None:
            resolved = urllib.parse.urlsplit(urllib.parse.urljoin("https://chat.example.com/callback", accepted))
            self.assertEqual((resolved.scheme, resolved.netloc), ("https", "chat.example.com"))
            self.assertTrue(accepted.startswith("/") and not accepted.startswith("//"))
            self.assertNotIn("\\", urllib.parse.unquote(accepted))


class CookieTests(SynchronousTestCase):
    key = session.derive_key("s" * 40, "cookie")

    def test_round_trip(self):
        """A sealed payload comes back as it was, before its expiry."""
        value = session.seal(self.key, "login", {"s": "state", "exp": 1000})
        self.assertEqual(session.unseal(self.key, "login", value, 999), {"s": "state", "exp": 1000})

    def test_refusals(self):
        """Missing, altered, spliced, sealed elsewhere, for another purpose or expired: all refused."""
        value = session.seal(self.key, "login", {"s": "state", "exp": 1000})
        other = session.seal(self.key, "login", {"s": "other", "exp": 1000})
        flipped = value[:20] + ("A" if value[20] != "A" else "B") + value[21:]
        cases = {
            "missing": None,
            "not authentic": flipped,
            "malformed": "garbage.with.dots",
        }
        for reason, bad in cases.items():
            self.assertEqual(self.assertRaises(session.BadCookie, session.unseal, self.key, "login", bad, 999).reason, reason)
        # The nonce of one cookie with the ciphertext of another.
        self.assertRaises(session.BadCookie, session.unseal, self.key, "login", other[:16] + value[16:], 999)
        self.assertRaises(session.BadCookie, session.unseal, self.key, "login", value[:-4], 999)
        self.assertRaises(session.BadCookie, session.unseal, session.derive_key("t" * 40, "cookie"), "login", value, 999)
        self.assertRaises(session.BadCookie, session.unseal, self.key, "refresh", value, 999)
        self.assertEqual(self.assertRaises(session.BadCookie, session.unseal, self.key, "login", value, 1000).reason, "expired")

    def test_keys_are_separated(self):
        """The cookie key and the session JWT key differ, and both change with the secret."""
        config = oauth2_config()
        self.assertNotEqual(session.cookie_key(config).hex(), session.session_signing_key(config))
        other = oauth2_config(session_secret="another-session-secret-0123456789abcdef")
        self.assertNotEqual(session.cookie_key(config), session.cookie_key(other))
        self.assertNotIn(SECRET, session.session_signing_key(config))

    def test_cookie_header(self):
        """Cookies are HttpOnly with the given SameSite and Path, Secure only on https, and clearable."""
        self.assertEqual(
            session.cookie_header("a", "v", "/callback", 600, False, "Lax"),
            b"a=v; Path=/callback; Max-Age=600; HttpOnly; SameSite=Lax",
        )
        self.assertEqual(
            session.cookie_header("a", "", "/auth", 0, True, "Strict"),
            b"a=; Path=/auth; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; SameSite=Strict; Secure",
        )


class PolicyTests(SynchronousTestCase):
    def test_scopes_from_config_only(self):
        """Scopes are the defaults plus the group rules; unknown groups add nothing."""
        oauth2 = oauth2_config(group_scopes={"team-a": ["history:team-a"], "ops": ["admin"]}).oauth2
        self.assertEqual(session.scopes_for(["team-a", "nobody", "admin"], oauth2), {"chat:read", "chat:write", "history:team-a"})
        self.assertEqual(session.scopes_for([], oauth2), {"chat:read", "chat:write"})

    def test_email_domains(self):
        """With a domain list, only verified addresses in those domains pass; without one, anyone."""
        oauth2 = oauth2_config(allowed_email_domains=["Example.com"]).oauth2
        self.assertTrue(session.email_allowed("a@example.COM", True, oauth2))
        self.assertFalse(session.email_allowed("a@example.com", False, oauth2))
        self.assertFalse(session.email_allowed("a@evil.example.com", True, oauth2))
        self.assertFalse(session.email_allowed("a@example.com@evil.test", True, oauth2))
        self.assertFalse(session.email_allowed(None, True, oauth2))
        self.assertTrue(session.email_allowed(None, False, oauth2_config().oauth2))

    def test_origins(self):
        """The gateway's origin comes from public_url, the redirect URI, or (without public_url) the Host."""
        config = oauth2_config()
        self.assertEqual(session.allowed_origins(config, "gw.internal:8080"), {"https://chat.example.com", "http://gw.internal:8080"})
        public = oauth2_config('server: {public_url: "https://Chat.Example.com:443"}')
        self.assertEqual(session.allowed_origins(public, "gw.internal:8080"), {"https://chat.example.com"})
        self.assertEqual(session.session_issuer(public), "https://chat.example.com")

    def test_pkce_challenge(self):
        """S256 as RFC 7636 appendix B computes it."""
        self.assertEqual(session.pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")

    def test_friendly_page_escapes(self):
        """The page has only fixed text and the escaped request id."""
        status, body = sso.page_html("access_denied", '<script>"x"</script>')
        self.assertEqual(status, 403)
        self.assertNotIn(b"<script>", body)
        self.assertIn(b"&lt;script&gt;", body)


# --- config ---------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    def error(self, extra="", environ=None, mode=None, **oauth2):
        try:
            oauth2_config(extra, **oauth2) if mode is None else parse_config(
                merge_yaml(
                    f'auth: {{jwt: {{secret: "{SECRET}", issuer: "https://jwt.example.com", audience: "a"}}}}',
                    json.dumps({"oauth2": {"enabled": True, "client_id": "c", "client_secret": "s", "issuer_url": "https://sso.example.com", **oauth2}}),
                ),
                {},
                mode=mode,
            )
        except ConfigError as e:
            return str(e)
        raise AssertionError("no ConfigError")

    def test_defaults(self):
        """The new keys default to a 10 minute session, a 12 hour refresh cookie and a derived secret."""
        oauth2 = oauth2_config().oauth2
        self.assertEqual((oauth2.session_ttl, oauth2.refresh_ttl, oauth2.session_secret), (600.0, 43200.0, None))
        self.assertEqual(oauth2.groups_claim, "groups")

    def test_rules_name_their_path(self):
        """Each SSO rule refuses a bad value and names the key."""
        self.assertIn("oauth2.agent_id", self.error(provider="wecom"))
        self.assertIn("oauth2.endpoints.nope", self.error(provider="feishu", endpoints={"nope": "https://x"}))
        self.assertIn("oauth2.endpoints.token", self.error(provider="dingtalk", endpoints={"token": "ftp://x"}))
        self.assertIn("oauth2.endpoints", self.error(endpoints={"token": "https://x"}))
        self.assertIn("oauth2.scopes", self.error(scopes=["profile"]))
        self.assertIn("oauth2.redirect_uri", self.error(redirect_uri="https://chat.example.com/v1/callback"))
        self.assertIn("oauth2.redirect_uri", self.error(redirect_uri="https://chat.example.com/auth/refresh"))
        self.assertIn("oauth2.redirect_uri", self.error(redirect_uri="https://chat.example.com/"))
        self.assertIn("oauth2.redirect_uri", self.error(redirect_uri="/callback"))
        self.assertIn("oauth2.allowed_email_domains[0]", self.error(allowed_email_domains=["@x.com"]))
        self.assertIn("auth.jwt.issuer", self.error(redirect_uri="https://jwt.example.com/callback"))
        self.assertEqual(oauth2_config(redirect_uri="https://chat.example.com/auth/callback").oauth2.redirect_uri, "https://chat.example.com/auth/callback")

    def test_production_rules(self):
        """Production mode wants an https redirect URI (except loopback) and a real session secret."""
        self.assertIn("https", self.error(mode="production", redirect_uri="http://chat.example.com/callback"))
        self.assertIn("oauth2.session_secret", self.error(mode="production", redirect_uri="https://chat.example.com/callback", session_secret="short"))

    def test_session_secret_needed_without_jwt_secret(self):
        """With no HS256 secret to derive from, oauth2.session_secret is required."""
        text = """
auth: {jwt: {enabled: false}}
oauth2: {enabled: true, client_id: c, client_secret: s, redirect_uri: "https://chat.example.com/callback", issuer_url: "https://sso.example.com"}
"""
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, {})
        self.assertEqual(caught.exception.path, "oauth2.session_secret")


# --- ID tokens and discovery --------------------------------------------------------------

ISS = "https://sso.example.com"
NONCE = "n-0S6_WzA2Mj"
DROP = object()


def id_token(signer="k1", kid="k1", alg="RS256", **overrides):
    now = int(time.time())
    claims = {"iss": ISS, "aud": CLIENT_ID, "sub": "alice", "nonce": NONCE, "iat": now, "exp": now + 300}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not DROP}
    key = SECRET if alg == "HS256" else rsa_key(signer)
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


class IDTokenTests(SynchronousTestCase):
    def setUp(self):
        self.fetches = 0

        async def fetch():
            self.fetches += 1
            return {"keys": [jwk("k1")]}

        self.keys = KeySet(Clock(), fetch=fetch)

    def validate(self, token, nonce=NONCE):
        return validate_id_token(token, self.keys, ISS, CLIENT_ID, nonce, leeway=30)

    def reason(self, token, nonce=NONCE):
        return fails(self, self.validate(token, nonce), IDTokenError).reason

    def test_valid(self):
        """A token signed by a JWKS key, for this client, with the nonce sent, is accepted."""
        self.assertEqual(run(self, self.validate(id_token()))["sub"], "alice")
        self.assertEqual(run(self, self.validate(id_token(aud=[CLIENT_ID, "other"], azp=CLIENT_ID)))["sub"], "alice")

    def test_bad_signature(self):
        """A token signed by another key under a trusted kid is refused."""
        self.assertEqual(self.reason(id_token(signer="k2", kid="k1")), "signature does not match")

    def test_unknown_kid(self):
        """A kid the JWKS does not have (even after one refetch) is refused."""
        self.assertEqual(self.reason(id_token(signer="k2", kid="k2")), "signing key is unknown")

    def test_wrong_issuer_audience_nonce(self):
        """iss, aud, azp and nonce must be exactly this provider's, this client's and this login's."""
        self.assertEqual(self.reason(id_token(iss="https://evil.example.com")), "issuer does not match")
        self.assertEqual(self.reason(id_token(aud="another-client")), "audience does not match")
        self.assertEqual(self.reason(id_token(aud=[CLIENT_ID, "other"])), "claim 'azp' is missing")
        self.assertEqual(self.reason(id_token(azp="other")), "authorized party does not match")
        self.assertEqual(self.reason(id_token(nonce="another")), "nonce does not match")
        self.assertEqual(self.reason(id_token(nonce=DROP)), "nonce does not match")
        self.assertEqual(self.reason(id_token(), nonce="another"), "nonce does not match")

    def test_expired_and_missing_claims(self):
        """An expired token, or one without exp, iat or sub, is refused."""
        now = int(time.time())
        self.assertEqual(self.reason(id_token(iat=now - 900, exp=now - 600)), "token is expired")
        self.assertEqual(self.reason(id_token(exp=DROP)), "claim 'exp' is missing")
        self.assertEqual(self.reason(id_token(iat=DROP)), "claim 'iat' is missing")
        self.assertEqual(self.reason(id_token(sub=DROP)), "claim 'sub' is missing")

    def test_other_algorithms(self):
        """Only RS256 is accepted: an HS256 token (even with a known secret) and garbage are refused."""
        self.assertEqual(self.reason(id_token(alg="HS256")), "algorithm not allowed")
        self.assertEqual(self.reason("not.a.token"), "token is malformed")
        self.assertEqual(self.reason(None), "token is malformed")


def discovery_doc(issuer=ISS, **overrides):
    doc = {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/auth",
        "token_endpoint": issuer + "/token",
        "jwks_uri": issuer + "/jwks",
        "userinfo_endpoint": issuer + "/me",
        "end_session_endpoint": issuer + "/session/end",
        "code_challenge_methods_supported": ["S256"],
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not DROP}


class FakeHTTP:
    def __init__(self, documents):
        self.documents = documents
        self.fetched = []

    async def fetch_json(self, url):
        self.fetched.append(url)
        value = self.documents.get(url, FetchError("status 404"))
        if isinstance(value, Exception):
            raise value
        return value


class DiscoveryTests(SynchronousTestCase):
    url = ISS + "/.well-known/openid-configuration"

    def provider(self, documents):
        self.clock = Clock()
        self.http = FakeHTTP(documents)
        return OIDCProvider(oauth2_config().oauth2, self.http, self.clock, discovery_ttl=3600)

    def test_cached_then_refreshed(self):
        """Discovery is fetched once, reused until its TTL, then fetched again."""
        provider = self.provider({self.url: discovery_doc()})
        run(self, provider.discovery())
        run(self, provider.discovery())
        self.assertEqual(len(self.http.fetched), 1)
        self.clock.advance(3601)
        run(self, provider.discovery())
        self.assertEqual(len(self.http.fetched), 2)

    def test_stale_copy_served_when_refresh_fails(self):
        """Once fetched, a provider that goes away keeps its cached discovery."""
        provider = self.provider({self.url: discovery_doc()})
        run(self, provider.discovery())
        self.http.documents[self.url] = FetchError("cannot reach ConnectError")
        self.clock.advance(3601)
        self.assertEqual(run(self, provider.discovery()).token_endpoint, ISS + "/token")

    def test_unreachable_then_retried(self):
        """A failed first fetch is an 'unreachable' error and is retried on the next login."""
        provider = self.provider({})
        self.assertEqual(fails(self, provider.discovery(), ProviderError).kind, "unreachable")
        self.http.documents[self.url] = discovery_doc()
        self.assertEqual(run(self, provider.discovery()).issuer, ISS)

    def test_document_checks(self):
        """The document's issuer must be the configured one; endpoints https (http on loopback only); S256 offered."""
        self.assertEqual(parse_discovery(discovery_doc(), ISS + "/").issuer, ISS)
        bad = [
            discovery_doc(issuer="https://evil.example.com"),
            dict(discovery_doc(), issuer=ISS + "/other"),
            discovery_doc(token_endpoint="http://sso.example.com/token"),
            discovery_doc(jwks_uri=DROP),
            discovery_doc(code_challenge_methods_supported=["plain"]),
            discovery_doc(id_token_signing_alg_values_supported=["HS256"]),
            ["not", "a", "document"],
        ]
        for document in bad:
            self.assertRaises(ProviderError, parse_discovery, document, ISS)
        loopback = "http://127.0.0.1:5556"
        self.assertEqual(parse_discovery(discovery_doc(loopback), loopback).token_endpoint, loopback + "/token")
        post = discovery_doc(token_endpoint_auth_methods_supported=["client_secret_post"])
        self.assertEqual(parse_discovery(post, ISS).auth_method, "client_secret_post")

    def test_concurrent_callers_share_one_fetch(self):
        """Callers that arrive while a fetch runs wait for it instead of fetching again."""
        pending = Deferred()
        calls = []

        async def fetch():
            calls.append(1)
            return await pending, 60

        cached = Cached(Clock(), fetch)
        first = Deferred.fromCoroutine(cached.get())
        second = Deferred.fromCoroutine(cached.get())
        pending.callback("value")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second), len(calls)), ("value", "value", 1))


# --- the whole flow against a real OpenID Connect provider -------------------------------


class Flow:
    """Drives the gateway and the IdP like a browser that never follows a redirect by itself."""

    def __init__(self, testcase):
        self.t = testcase
        self.port = reserved_port(testcase)  # the gateway's own URL is in its config
        self.origin = f"http://127.0.0.1:{self.port}"
        self.redirect_uri = self.origin + "/callback"
        self.jar = http.cookiejar.CookieJar()

    def start(self, users=USERS, extra=""):
        client = {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [self.redirect_uri],
            "post_logout_redirect_uris": [self.origin + "/signed-out"],
        }
        self.idp = IdP().start(clients=[client], users=users)
        self.t.addCleanup(self.idp.stop)
        config = f"""
server: {{listen: "tcp:{self.port}:interface=127.0.0.1"}}
oauth2:
  enabled: true
  provider: oidc
  client_id: {CLIENT_ID}
  client_secret: {CLIENT_SECRET}
  redirect_uri: "{self.redirect_uri}"
  issuer_url: "{self.idp.issuer}"
  group_scopes: {GROUP_SCOPES}
  post_logout_redirect_uri: "{self.origin}/signed-out"
"""
        self.gw = serve(self.t, merge_yaml(config, extra) if extra else config)
        self.t.assertEqual(self.gw.url, self.origin)
        return self

    async def begin(self, query="next=/x"):
        """GET /auth/login: (reply, login cookie value, authorize URL)."""
        reply = await call("GET", f"{self.gw.url}/auth/login?{query}")
        self.t.assertEqual(reply.code, 302, reply.body)
        return reply, reply.cookies[session.LOGIN_COOKIE][0], reply.header(b"location")

    async def at_idp(self, authorize_url, user="alice"):
        """The IdP's redirect back to the callback (code, state, iss)."""
        return await deferToThread(browserless_login, authorize_url, user, cookies=self.jar)

    async def callback(self, callback_url, login_cookie):
        cookies = {session.LOGIN_COOKIE: login_cookie} if login_cookie else None
        return await call("GET", self.gw.url + path_and_query(callback_url), cookies=cookies)

    async def sign_in(self, user="alice", query="next=/x"):
        """The whole login; returns (callback reply, refresh cookie value)."""
        _, cookie, location = await self.begin(query)
        done = await self.callback(await self.at_idp(location, user), cookie)
        self.t.assertEqual(done.code, 302, done.body)
        return done, done.cookies[session.REFRESH_COOKIE][0]

    async def refresh(self, refresh_cookie, headers=XRW):
        return await call("POST", self.gw.url + "/auth/refresh", headers=headers, cookies={session.REFRESH_COOKIE: refresh_cookie} if refresh_cookie else None)

    async def logout(self, refresh_cookie, headers=XRW):
        return await call("POST", self.gw.url + "/auth/logout", headers=headers, cookies={session.REFRESH_COOKIE: refresh_cookie})

    async def me(self, access_token):
        return await call("GET", self.gw.url + "/v1/me", headers={"Authorization": "Bearer " + access_token})

    def config(self):
        return self.gw.parts.runtime.config


class OIDCFlowTests(TestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def test_login_refresh_logout(self):
        """
        The whole flow against a real provider: /auth/login redirects with
        state, nonce and an S256 challenge kept in a Lax cookie on the
        callback path; the callback sets a Strict HttpOnly refresh cookie on
        /auth and redirects to next; /auth/refresh gives a session JWT that
        /v1/me accepts with the policy's scopes and the IdP groups as teams;
        a second refresh works; logout returns the provider's end-session
        URL, which signs the user out there, and the refresh cookie is
        refused afterwards.  No token, code or cookie reaches the log.
        """
        flow = Flow(self).start()
        reply, login_cookie, location = await flow.begin("next=/x%3Fy%3D1")
        self.assertTrue(location.startswith(flow.idp.issuer + "/auth?"))
        params = query_of(location)
        self.assertEqual(params["response_type"], "code")
        self.assertEqual(params["client_id"], CLIENT_ID)
        self.assertEqual(params["redirect_uri"], flow.redirect_uri)
        self.assertEqual(params["scope"], "openid profile email")
        self.assertEqual(params["code_challenge_method"], "S256")
        self.assertEqual(len(params["code_challenge"]), 43)
        self.assertGreaterEqual(len(params["state"]), 40)
        self.assertNotEqual(params["state"], params["nonce"])
        self.assertEqual(reply.cookies[session.LOGIN_COOKIE][1], ["path=/callback", "max-age=600", "httponly", "samesite=lax"])
        self.assertEqual(reply.header(b"cache-control"), "no-store")

        callback_url = await flow.at_idp(location)
        self.assertEqual(query_of(callback_url)["state"], params["state"])
        done = await flow.callback(callback_url, login_cookie)
        self.assertEqual(done.code, 302)
        self.assertEqual(done.header(b"location"), "/x?y=1")
        refresh_cookie, attrs = done.cookies[session.REFRESH_COOKIE]
        self.assertEqual(attrs, ["path=/auth", "max-age=43200", "httponly", "samesite=strict"])
        self.assertIn("max-age=0", done.cookies[session.LOGIN_COOKIE][1])

        first = await flow.refresh(refresh_cookie)
        self.assertEqual(first.code, 200, first.body)
        body = first.json()
        self.assertEqual((body["token_type"], body["expires_in"]), ("Bearer", 600))
        self.assertEqual(first.header(b"cache-control"), "no-store")
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        self.assertEqual((claims["iss"], claims["aud"], claims["exp"] - claims["iat"]), (flow.origin, "clawdbot-session", 600))
        me = await flow.me(body["access_token"])
        self.assertEqual(me.code, 200, me.body)
        self.assertEqual(
            me.json(),
            {
                "sub": "alice",
                "name": "Alice Example",
                "email": "alice@example.test",
                "scopes": ["admin", "chat:read", "chat:write", "history:admins", "history:users"],
                "teams": ["admins", "users"],
            },
        )

        second = await flow.refresh(refresh_cookie)
        self.assertEqual(second.code, 200)
        self.assertEqual((await flow.me(second.json()["access_token"])).code, 200)

        out = await flow.logout(refresh_cookie)
        self.assertEqual(out.code, 200, out.body)
        logout_url = out.json()["logout_url"]
        self.assertTrue(logout_url.startswith(flow.idp.issuer + "/session/end?"))
        self.assertEqual(query_of(logout_url), {"client_id": CLIENT_ID, "post_logout_redirect_uri": flow.origin + "/signed-out"})
        self.assertIn("max-age=0", out.cookies[session.REFRESH_COOKIE][1])
        left = await deferToThread(browserless_logout, logout_url, cookies=flow.jar)
        self.assertTrue(left.startswith(flow.origin + "/signed-out"))

        refused = await flow.refresh(refresh_cookie)
        self.assertEqual(refused.code, 401)
        self.assertEqual(refused.json()["error"]["code"], "AUTH_INVALID_TOKEN")
        self.assertEqual(refused.json()["error"]["details"], "the sign-in session was ended")

        logged = "\n".join(repr(e) for e in self.events)
        for secret in (refresh_cookie, login_cookie, body["access_token"], query_of(callback_url)["code"], CLIENT_SECRET):
            self.assertNotIn(secret, logged)

    async def test_state_refusals(self):
        """
        The callback needs the login cookie, the state it holds, and works
        once: a missing cookie, an altered state, a tampered cookie and a
        replay of a callback that already succeeded all get the friendly
        'expired' page and no session.
        """
        flow = Flow(self).start()
        _, cookie, location = await flow.begin()
        callback_url = await flow.at_idp(location)

        missing = await flow.callback(callback_url, None)
        assert_friendly_page(self, missing, 400, "Sign-in expired")
        self.assertNotIn(session.REFRESH_COOKIE, missing.cookies)

        wrong = callback_url.replace("state=", "state=x")
        assert_friendly_page(self, await flow.callback(wrong, cookie), 400, "Sign-in expired")
        tampered = cookie[:-6] + ("AA" if cookie[-6:-4] != "AA" else "BB") + cookie[-4:]
        assert_friendly_page(self, await flow.callback(callback_url, tampered), 400, "Sign-in expired")

        done = await flow.callback(callback_url, cookie)
        self.assertEqual(done.code, 302)
        again = await flow.callback(callback_url, cookie)
        assert_friendly_page(self, again, 400, "Sign-in expired")
        self.assertNotIn(session.REFRESH_COOKIE, again.cookies)

    async def test_code_replay_refused_by_provider(self):
        """A code already redeemed, brought back under a fresh login's state, is refused by the provider."""
        flow = Flow(self).start()
        _, cookie, location = await flow.begin()
        used = await flow.at_idp(location)
        self.assertEqual((await flow.callback(used, cookie)).code, 302)
        _, cookie2, location2 = await flow.begin()
        replay = flow.redirect_uri + "?" + urllib.parse.urlencode({"code": query_of(used)["code"], "state": query_of(location2)["state"], "iss": flow.idp.issuer})
        reply = await flow.callback(replay, cookie2)
        assert_friendly_page(self, reply, 400, "Sign-in failed")
        self.assertNotIn(session.REFRESH_COOKIE, reply.cookies)

    async def test_wrong_verifier_refused_by_provider(self):
        """A validly sealed login cookie with another code_verifier makes the provider refuse the code (PKCE)."""
        flow = Flow(self).start()
        _, cookie, location = await flow.begin()
        callback_url = await flow.at_idp(location)
        key = session.cookie_key(flow.config())
        payload = session.unseal(key, "login", cookie, time.time())
        payload["v"] = "another-verifier-" + "x" * 40
        reply = await flow.callback(callback_url, session.seal(key, "login", payload))
        assert_friendly_page(self, reply, 400, "Sign-in failed")
        self.assertNotIn(session.REFRESH_COOKIE, reply.cookies)

    async def test_open_redirect_through_next(self):
        """Unsafe next values are replaced by / before the provider is even asked, and the callback lands on /."""
        flow = Flow(self).start()
        key = session.cookie_key(flow.config())
        for value in EVIL_NEXTS:
            _, cookie, _ = await flow.begin("next=" + urllib.parse.quote(value, safe=""))
            self.assertEqual(session.unseal(key, "login", cookie, time.time())["next"], "/", value)
        done, _ = await flow.sign_in(query="next=" + urllib.parse.quote("//evil.example/x", safe=""))
        self.assertEqual(done.header(b"location"), "/")

    async def test_browser_scopes_ignored(self):
        """Scopes asked for in the login URL change neither what the provider is asked nor what is granted."""
        flow = Flow(self).start()
        _, cookie, location = await flow.begin("next=/&scope=admin+history:admins&scopes=admin&group=admins")
        self.assertEqual(query_of(location)["scope"], "openid profile email")
        callback_url = await flow.at_idp(location, "bob")
        done = await flow.callback(callback_url + "&scope=admin", cookie)
        self.assertEqual(done.code, 302)
        token = (await flow.refresh(done.cookies[session.REFRESH_COOKIE][0])).json()["access_token"]
        me = (await flow.me(token)).json()
        self.assertEqual((me["sub"], me["scopes"], me["teams"]), ("bob", ["chat:read", "chat:write"], []))

    async def test_provider_error_page(self):
        """?error=access_denied from the provider is a friendly 403 page: no stack trace, no address, no echo."""
        flow = Flow(self).start()
        _, cookie, location = await flow.begin()
        url = flow.redirect_uri + "?" + urllib.parse.urlencode(
            {"error": "access_denied", "error_description": "<script>alert(1)</script> at 10.0.0.1", "state": query_of(location)["state"]}
        )
        reply = await flow.callback(url, cookie)
        assert_friendly_page(self, reply, 403, "Sign-in cancelled")
        self.assertNotIn("10.0.0.1", reply.text)
        self.assertIn("登录已取消", reply.text)
        other = await flow.callback(flow.redirect_uri + "?error=server_error", None)
        assert_friendly_page(self, other, 502, "Sign-in failed")

    async def test_csrf_guard(self):
        """
        Refresh and logout without X-Requested-With, or from a foreign or
        null Origin, are 403 in the JSON error shape, leak nothing and
        change nothing; the gateway's own origin is accepted.
        """
        flow = Flow(self).start()
        _, refresh_cookie = await flow.sign_in()
        attempts = [
            {},
            {"X-Requested-With": "fetch"},
            dict(XRW, Origin="https://evil.example"),
            dict(XRW, Origin="null"),
            dict(XRW, Origin=flow.origin + ".evil.example"),
            dict(XRW, **{"Sec-Fetch-Site": "cross-site"}),
        ]
        for headers in attempts:
            for method in (flow.refresh, flow.logout):
                reply = await method(refresh_cookie, headers=headers)
                self.assertEqual(reply.code, 403, headers)
                error = reply.json()["error"]
                self.assertEqual((error["code"], error["type"]), ("CSRF_REJECTED", "permission_error"))
                for secret in (refresh_cookie, CLIENT_SECRET, SECRET):
                    self.assertNotIn(secret, reply.text)
                self.assertNotIn(session.REFRESH_COOKIE, reply.cookies)
        ok = await flow.refresh(refresh_cookie, headers=dict(XRW, Origin=flow.origin))
        self.assertEqual(ok.code, 200)

    async def test_refresh_without_or_with_bad_cookie(self):
        """No refresh cookie is a 401 AUTH_MISSING_TOKEN; a forged one a 401 AUTH_INVALID_TOKEN that clears it."""
        flow = Flow(self).start()
        missing = await flow.refresh(None)
        self.assertEqual((missing.code, missing.json()["error"]["code"]), (401, "AUTH_MISSING_TOKEN"))
        _, refresh_cookie = await flow.sign_in()
        forged = session.seal(session.derive_key("guessed-secret-0123456789abcdef0123", "cookie"), "refresh", {"rid": "r", "sub": "admin", "exp": time.time() + 60})
        for bad in (forged, refresh_cookie[:-3] + "AAA", "garbage"):
            reply = await flow.refresh(bad)
            self.assertEqual((reply.code, reply.json()["error"]["code"]), (401, "AUTH_INVALID_TOKEN"))
            self.assertIn("max-age=0", reply.cookies[session.REFRESH_COOKIE][1])
            self.assertNotIn(bad, reply.text)

    async def test_key_rotation(self):
        """After the provider rotates its signing key, the next login verifies against the refetched JWKS."""
        flow = Flow(self).start()
        await flow.sign_in()
        rotated = await deferToThread(flow.idp.rotate, True)
        self.assertEqual(rotated["kids"], [rotated["kid"]])
        _, refresh_cookie = await flow.sign_in()
        self.assertEqual((await flow.refresh(refresh_cookie)).code, 200)

    async def test_email_domain_restriction(self):
        """With allowed_email_domains set, a user of another domain gets the 'access denied' page and no session."""
        flow = Flow(self).start(extra="oauth2: {allowed_email_domains: [corp.example]}")
        _, cookie, location = await flow.begin()
        reply = await flow.callback(await flow.at_idp(location), cookie)
        assert_friendly_page(self, reply, 403, "Access denied")
        self.assertNotIn(session.REFRESH_COOKIE, reply.cookies)


class RouteTests(TestCase):
    async def test_not_on_the_debug_port_nor_when_disabled(self):
        """The debug listener never serves /auth/* or the callback; with oauth2 off they are 404 everywhere."""
        port = reserved_port(self)
        gw = serve(
            self,
            f"""
server: {{listen: "tcp:{port}:interface=127.0.0.1"}}
oauth2: {{enabled: true, client_id: c, client_secret: s, redirect_uri: "http://127.0.0.1:{port}/callback", issuer_url: "http://127.0.0.1:9"}}
""",
        )
        for path in ("/auth/login", "/auth/refresh", "/auth/logout", "/callback"):
            reply = await call("GET", gw.debug_url + path)
            self.assertEqual((reply.code, reply.json()["error"]["code"]), (404, "NOT_FOUND"), path)
        off = serve(self)
        for path in ("/auth/login", "/callback"):
            self.assertEqual((await call("GET", off.url + path)).code, 404)
        self.assertEqual((await call("POST", off.url + "/auth/refresh", headers=XRW)).code, 404)

    async def test_unreachable_provider(self):
        """When the provider cannot be reached, /auth/login is a friendly 502 page; the gateway still runs."""
        port = reserved_port(self)
        gw = serve(
            self,
            f"""
server: {{listen: "tcp:{port}:interface=127.0.0.1"}}
oauth2: {{enabled: true, client_id: c, client_secret: s, redirect_uri: "http://127.0.0.1:{port}/callback", issuer_url: "http://127.0.0.1:{closed_port(self)}"}}
""",
        )
        reply = await call("GET", gw.url + "/auth/login?next=/")
        assert_friendly_page(self, reply, 502, "Identity provider unavailable")
        self.assertEqual((await call("GET", gw.url + "/healthz")).code, 200)


# --- the presets, against fakes of their documented APIs ------------------------------------


class FakeAPI(Resource):
    """
    A platform's API on loopback: C{routes[(method, path)](query, headers,
    json_body) -> (status, payload)}; every call is recorded.
    """

    isLeaf = True

    def __init__(self, routes):
        super().__init__()
        self.routes = routes
        self.calls = []

    def render(self, request):
        method = request.method.decode()
        path = request.path.decode()
        query = {k.decode(): v[0].decode() for k, v in request.args.items()}
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # a form: its fields are in request.args
        self.calls.append((method, path, query, headers, body))
        handler = self.routes.get((method, path))
        status, payload = handler(query, headers, body) if handler else (404, {"errcode": 404, "errmsg": "请求的URI地址不存在"})
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    def paths(self):
        return [c[1] for c in self.calls]


def listen(testcase, resource):
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


class FetcherTests(TestCase):
    """The outbound client used for providers (clawdbot.auth.fetch.HTTPFetcher.call)."""

    def setUp(self):
        from clawdbot.auth.fetch import HTTPFetcher

        def redirect(query, headers, body):
            return 302, {"moved": True}

        def big(query, headers, body):
            return 200, {"blob": "x" * 5000}

        def form(query, headers, body):
            return 400, {"error": "invalid_grant", "seen": query}

        self.api = FakeAPI({("GET", "/moved"): redirect, ("GET", "/big"): big, ("POST", "/token"): form})
        self.base = listen(self, self.api)
        self.fetcher = HTTPFetcher(reactor, timeout=5, max_size=1000)
        self.addCleanup(self.fetcher.close)

    async def test_errors_returned_redirects_not_followed_size_capped(self):
        """
        An error status comes back with its JSON body for the caller to read;
        a redirect is returned, never followed; a body over the cap is
        refused; a form is sent url-encoded.
        """
        status, body = await self.fetcher.call("POST", self.base + "/token", form={"code": "c", "grant_type": "authorization_code"})
        self.assertEqual((status, body["error"], body["seen"]), (400, "invalid_grant", {"code": "c", "grant_type": "authorization_code"}))
        status, _ = await self.fetcher.call("GET", self.base + "/moved")
        self.assertEqual(status, 302)
        self.assertEqual(self.api.paths(), ["/token", "/moved"])
        with self.assertRaises(FetchError):
            await self.fetcher.call("GET", self.base + "/big")
        with self.assertRaises(FetchError):
            await self.fetcher.call("GET", f"http://127.0.0.1:{closed_port(self)}/closed")


class PresetFlow:
    """The gateway with a preset whose endpoints point at a local fake."""

    def __init__(self, testcase, provider, endpoints, extra=""):
        self.t = testcase
        config = {
            "oauth2": {
                "enabled": True,
                "provider": provider,
                "client_id": PRESET_IDS[provider],
                "client_secret": PRESET_SECRETS[provider],
                "redirect_uri": "http://127.0.0.1:9/callback",
                "endpoints": endpoints,
                "group_scopes": PRESET_GROUPS[provider],
            }
        }
        if provider == "wecom":
            config["oauth2"]["agent_id"] = "1000002"
        text = json.dumps(config)
        self.gw = serve(testcase, merge_yaml(text, extra) if extra else text)

    async def begin(self):
        reply = await call("GET", self.gw.url + "/auth/login?next=/chat")
        self.t.assertEqual(reply.code, 302, reply.body)
        return reply.cookies[session.LOGIN_COOKIE][0], reply.header(b"location")

    async def back(self, cookie, **params):
        """The platform's redirect to the callback with these parameters."""
        return await call("GET", self.gw.url + "/callback?" + urllib.parse.urlencode(params), cookies={session.LOGIN_COOKIE: cookie})

    async def me(self, done):
        token = await self.refresh(done.cookies[session.REFRESH_COOKIE][0])
        self.t.assertEqual(token.code, 200, token.body)
        return (await call("GET", self.gw.url + "/v1/me", headers={"Authorization": "Bearer " + token.json()["access_token"]})).json()

    async def refresh(self, cookie):
        return await call("POST", self.gw.url + "/auth/refresh", headers=XRW, cookies={session.REFRESH_COOKIE: cookie})

    async def claims(self, cookie):
        """The claims of the session JWT a refresh with C{cookie} gives."""
        reply = await self.refresh(cookie)
        self.t.assertEqual(reply.code, 200, reply.body)
        return jwt.decode(reply.json()["access_token"], options={"verify_signature": False})


PRESET_IDS = {"wecom": "ww1234567890abcdef", "dingtalk": "dingxxxxxxxxxxxx", "feishu": "cli_a5d611352af9d00b"}
PRESET_SECRETS = {"wecom": "wecom-app-secret-0123456789", "dingtalk": "dingtalk-app-secret-0123456789", "feishu": "feishu-app-secret-0123456789"}
PRESET_GROUPS = {
    "wecom": {"2": ["history:rd"]},
    "dingtalk": {"3": ["history:rd"]},
    "feishu": {"od-4e6ac4d14bcd5071a37a39de902c7141": ["history:rd"]},
}


class WeComTests(TestCase):
    """
    Payloads from the WeCom server API documentation:
      gettoken          https://developer.work.weixin.qq.com/document/path/91039
      auth/getuserinfo  https://developer.work.weixin.qq.com/document/path/98177 (Web login)
                        and .../path/96442 (its error example: 40029 invalid code)
      user/get          https://developer.work.weixin.qq.com/document/path/90196
      Web login link    https://developer.work.weixin.qq.com/document/path/98171
    """

    def setUp(self):
        self.tokens = 0

        def gettoken(query, headers, body):
            self.tokens += 1
            if (query.get("corpid"), query.get("corpsecret")) != (PRESET_IDS["wecom"], PRESET_SECRETS["wecom"]):
                return 200, {"errcode": 40001, "errmsg": "invalid credential"}
            return 200, {"errcode": 0, "errmsg": "ok", "access_token": "accesstoken000001", "expires_in": 7200}

        def getuserinfo(query, headers, body):
            if query.get("access_token") != "accesstoken000001":
                return 200, {"errcode": 40014, "errmsg": "invalid access_token"}
            if query.get("code") == "CODE-ZHANGSAN":
                return 200, {"errcode": 0, "errmsg": "ok", "userid": "zhangsan"}
            if query.get("code") == "CODE-OUTSIDER":
                return 200, {"errcode": 0, "errmsg": "ok", "openid": "OPENID", "external_userid": "EXTERNAL_USERID"}
            return 200, {"errcode": 40029, "errmsg": "invalid code"}

        self.departments = [1, 2]
        self.member = {"errcode": 0, "status": 1}

        def user_get(query, headers, body):
            if self.member["errcode"]:
                return 200, {"errcode": self.member["errcode"], "errmsg": "userid not found"}
            return 200, {
                "errcode": 0,
                "errmsg": "ok",
                "userid": query.get("userid"),
                "name": "张三",
                "department": list(self.departments),
                "order": [1, 2],
                "position": "后台工程师",
                "email": "zhangsan@gzdev.com",
                "biz_mail": "zhangsan@qyycs2.wecom.work",
                "main_department": 1,
                "status": self.member["status"],
            }

        self.api = FakeAPI(
            {("GET", "/cgi-bin/gettoken"): gettoken, ("GET", "/cgi-bin/auth/getuserinfo"): getuserinfo, ("GET", "/cgi-bin/user/get"): user_get}
        )
        base = listen(self, self.api)
        self.flow = PresetFlow(self, "wecom", {"authorize": base + "/wwlogin/sso/login", "api": base})
        self.base = base

    async def test_login_maps_to_principal(self):
        """
        The Web login link carries login_type=CorpApp, the CorpID, the
        AgentId and state; the code is read with the (cached) corp token;
        userid, name, e-mail and department ids become the principal.
        """
        cookie, location = await self.flow.begin()
        self.assertTrue(location.startswith(self.base + "/wwlogin/sso/login?"))
        params = query_of(location)
        self.assertEqual(
            {k: params[k] for k in ("login_type", "appid", "agentid", "redirect_uri")},
            {"login_type": "CorpApp", "appid": PRESET_IDS["wecom"], "agentid": "1000002", "redirect_uri": "http://127.0.0.1:9/callback"},
        )
        done = await self.flow.back(cookie, code="CODE-ZHANGSAN", state=params["state"])
        self.assertEqual((done.code, done.header(b"location")), (302, "/chat"))
        me = await self.flow.me(done)
        self.assertEqual(
            me,
            {"sub": "zhangsan", "name": "张三", "email": "zhangsan@gzdev.com", "scopes": ["chat:read", "chat:write", "history:rd"], "teams": ["1", "2"]},
        )
        cookie, location = await self.flow.begin()
        self.assertEqual((await self.flow.back(cookie, code="CODE-ZHANGSAN", state=query_of(location)["state"])).code, 302)
        self.assertEqual(self.tokens, 1)
        self.assertNotIn(PRESET_SECRETS["wecom"], json.dumps(me))

    async def test_refresh_rechecks_departments(self):
        """
        Each refresh reads the member's departments again (user/get with the
        corp token): a department removed at WeCom takes its scopes away; a
        member disabled, or gone (errcode 60111), ends the sign-in.  The
        session JWT names the corp as the identity provider.
        """
        cookie, location = await self.flow.begin()
        done = await self.flow.back(cookie, code="CODE-ZHANGSAN", state=query_of(location)["state"])
        refresh = done.cookies[session.REFRESH_COOKIE][0]
        claims = await self.flow.claims(refresh)
        self.assertEqual((claims["idp"], claims["teams"]), ("wecom:" + PRESET_IDS["wecom"], ["1", "2"]))
        self.assertIn("history:rd", claims["scope"].split())
        self.departments = [1]
        claims = await self.flow.claims(refresh)
        self.assertEqual((claims["teams"], claims["scope"]), (["1"], "chat:read chat:write"))
        for member in ({"errcode": 0, "status": 5}, {"errcode": 60111, "status": 1}):
            self.member = member
            cookie, location = await self.flow.begin()
            again = await self.flow.back(cookie, code="CODE-ZHANGSAN", state=query_of(location)["state"])
            ended = await self.flow.refresh(again.cookies[session.REFRESH_COOKIE][0])
            self.assertEqual((ended.code, ended.json()["error"]["details"]), (401, "the identity provider ended the sign-in session"), member)
        self.assertEqual((await self.flow.refresh(refresh)).json()["error"]["details"], "the identity provider ended the sign-in session")

    async def test_invalid_code_and_outsider(self):
        """errcode 40029 (invalid code) is the 'sign-in failed' page; a non-member (openid only) is 'access denied'."""
        cookie, location = await self.flow.begin()
        assert_friendly_page(self, await self.flow.back(cookie, code="USED", state=query_of(location)["state"]), 400, "Sign-in failed")
        cookie, location = await self.flow.begin()
        assert_friendly_page(self, await self.flow.back(cookie, code="CODE-OUTSIDER", state=query_of(location)["state"]), 403, "Access denied")


class DingTalkTests(TestCase):
    """
    Payloads from the DingTalk documentation:
      login           https://open.dingtalk.com/document/isvapp/tutorial-enabling-login-to-third-party-websites
      userAccessToken https://open.dingtalk.com/document/orgapp/obtain-user-token
                      (mirror: https://help.dingtalk.io/open/development/obtain-user-token)
      users/me        https://open.dingtalk.com/document/orgapp/dingtalk-retrieve-user-information
      gettoken        https://open.dingtalk.com/document/orgapp/obtain-orgapp-token
      getbyunionid    https://open.dingtalk.com/document/isvapp/query-a-user-by-the-union-id
      v2/user/get     https://open.dingtalk.com/document/orgapp/query-user-details
                      (mirror: https://help.dingtalk.io/open/development/query-user-details)
    Errors of the v1.0 APIs are HTTP 4xx with {"requestid", "code", "message"};
    those of the oapi are {"errcode", "errmsg"}.
    """

    def setUp(self):
        def user_token(query, headers, body):
            expected = {"clientId": PRESET_IDS["dingtalk"], "clientSecret": PRESET_SECRETS["dingtalk"], "grantType": "authorization_code"}
            if {k: body.get(k) for k in expected} != expected or body.get("code") != "AUTH-CODE-1":
                return 400, {"requestid": "6D8CAB83-7DE2-7E6E-8BBE-5F0C5F6F5E3B", "code": "invalidParameter.authCode.notFound", "message": "不合法的临时授权码"}
            return 200, {"accessToken": "abcd", "refreshToken": "abcd", "expireIn": 7200, "corpId": "corpxxxx"}

        def users_me(query, headers, body):
            if headers.get("x-acs-dingtalk-access-token") != "abcd":
                return 401, {"requestid": "x", "code": "InvalidAuthentication", "message": "不合法的access_token"}
            return 200, {
                "nick": "zhangsan",
                "avatarUrl": "https://xxx",
                "mobile": "150xxxx9144",
                "openId": "123",
                "unionId": "z21HjQliSzpw0Yxxxx",
                "email": "zhangsan@alibaba-inc.com",
                "stateCode": "86",
            }

        def gettoken(query, headers, body):
            return 200, {"errcode": 0, "access_token": "70c0ce2a8e3b3d6b907dc8c19c47a9b3", "errmsg": "ok", "expires_in": 7200}

        def by_union(query, headers, body):
            if body.get("unionid") != "z21HjQliSzpw0Yxxxx":
                return 200, {"errcode": 60121, "errmsg": "找不到该用户"}
            return 200, {"errcode": 0, "errmsg": "ok", "result": {"contact_type": 0, "userid": "zhangsan"}, "request_id": "4e7exhl6pm0t"}

        def user_get(query, headers, body):
            return 200, {
                "errcode": 0,
                "errmsg": "ok",
                "request_id": "4e7exhl6pm0t",
                "result": {"userid": body["userid"], "unionid": "z21HjQliSzpw0Yxxxx", "name": "张三", "dept_id_list": [2, 3, 4], "org_email": "test@xxx.com"},
            }

        self.api = FakeAPI(
            {
                ("POST", "/v1.0/oauth2/userAccessToken"): user_token,
                ("GET", "/v1.0/contact/users/me"): users_me,
                ("GET", "/gettoken"): gettoken,
                ("POST", "/topapi/user/getbyunionid"): by_union,
                ("POST", "/topapi/v2/user/get"): user_get,
            }
        )
        base = listen(self, self.api)
        self.base = base
        self.flow = PresetFlow(
            self,
            "dingtalk",
            {"authorize": base + "/oauth2/auth", "token": base + "/v1.0/oauth2/userAccessToken", "userinfo": base + "/v1.0/contact/users/me", "oapi": base},
        )

    async def test_login_maps_to_principal(self):
        """
        The authorize URL has client_id, scope 'openid corpid', prompt=consent
        and state; the authCode becomes a user token; unionId, the corp name,
        e-mail and dept_id_list become the principal.
        """
        cookie, location = await self.flow.begin()
        params = query_of(location)
        self.assertTrue(location.startswith(self.base + "/oauth2/auth?"))
        self.assertEqual(
            {k: params[k] for k in ("client_id", "response_type", "scope", "prompt")},
            {"client_id": PRESET_IDS["dingtalk"], "response_type": "code", "scope": "openid corpid", "prompt": "consent"},
        )
        done = await self.flow.back(cookie, authCode="AUTH-CODE-1", state=params["state"])
        self.assertEqual(done.code, 302, done.body)
        me = await self.flow.me(done)
        self.assertEqual(
            me,
            {
                "sub": "z21HjQliSzpw0Yxxxx",
                "name": "张三",
                "email": "zhangsan@alibaba-inc.com",
                "scopes": ["chat:read", "chat:write", "history:rd"],
                "teams": ["2", "3", "4"],
            },
        )

    async def test_error_payloads(self):
        """A refused authCode (HTTP 400 invalidParameter.authCode.notFound) is the 'sign-in failed' page."""
        cookie, location = await self.flow.begin()
        reply = await self.flow.back(cookie, authCode="STALE", state=query_of(location)["state"])
        assert_friendly_page(self, reply, 400, "Sign-in failed")
        self.assertNotIn("authCode", reply.text)

    async def test_departments_best_effort(self):
        """When the contact API refuses (errcode 60121), the user still signs in, with the default scopes only."""
        self.api.routes[("POST", "/topapi/user/getbyunionid")] = lambda q, h, b: (200, {"errcode": 60121, "errmsg": "找不到该用户"})
        cookie, location = await self.flow.begin()
        me = await self.flow.me(await self.flow.back(cookie, authCode="AUTH-CODE-1", state=query_of(location)["state"]))
        self.assertEqual((me["name"], me["scopes"], me["teams"]), ("zhangsan", ["chat:read", "chat:write"], []))


class FeishuTests(TestCase):
    """
    Payloads from the Feishu documentation:
      authorize   https://open.feishu.cn/document/common-capabilities/sso/api/obtain-oauth-code
      token (v2)  https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/authentication-management/access-token/get-user-access-token
      user_info   https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/reference/authen-v1/user_info/get
      contact     https://open.feishu.cn/document/uAjLw4CM/ukTMukTMukTM/reference/contact-v3/user/get
    """

    def setUp(self):
        self.challenges = {}

        self.refreshes = []
        self.feishu_departments = ["od-4e6ac4d14bcd5071a37a39de902c7141"]

        def token(query, headers, body):
            code = body.get("code")
            if body.get("grant_type") == "refresh_token" and body.get("client_secret") == PRESET_SECRETS["feishu"]:
                self.refreshes.append(body.get("refresh_token"))
                if body.get("refresh_token") != "eyJhbGciOiJFUzI1NiIs**********XXOYOZz1mfgIYHwM8ZJA":
                    return 400, {"code": 20037, "error": "invalid_grant", "error_description": "The refresh token passed has expired. Please generate a new one."}
                return 200, {
                    "code": 0,
                    "access_token": "renewed-user-access-token",
                    "expires_in": 7200,
                    "refresh_token": "renewed-refresh-token",
                    "refresh_token_expires_in": 604800,
                    "token_type": "Bearer",
                }
            if body.get("client_secret") != PRESET_SECRETS["feishu"] or body.get("grant_type") != "authorization_code":
                return 400, {"code": 20002, "error": "invalid_client", "error_description": "The client secret is invalid."}
            if code == "NO-ACCESS":
                return 400, {"code": 20010, "error": "invalid_grant", "error_description": "The user does not have permission to use this app."}
            if code not in self.challenges or session.pkce_challenge(body.get("code_verifier", "")) != self.challenges[code]:
                return 400, {"code": 20003, "error": "invalid_grant", "error_description": "The authorization code is not found. Please ensure you use the correct code."}
            return 200, {
                "code": 0,
                "access_token": "eyJhbGciOiJFUzI1NiIs**********X6wrZHYKDxJkWwhdkrYg",
                "expires_in": 7200,
                "refresh_token": "eyJhbGciOiJFUzI1NiIs**********XXOYOZz1mfgIYHwM8ZJA",
                "refresh_token_expires_in": 604800,
                "scope": "auth:user.id:read offline_access",
                "token_type": "Bearer",
            }

        def user_info(query, headers, body):
            if headers.get("authorization") != "Bearer eyJhbGciOiJFUzI1NiIs**********X6wrZHYKDxJkWwhdkrYg":
                return 400, {"code": 99991663, "msg": "Invalid access token for authorization. Please make a request with token attached."}
            return 200, {
                "code": 0,
                "msg": "success",
                "data": {
                    "name": "zhangsan",
                    "en_name": "zhangsan",
                    "avatar_url": "www.feishu.cn/avatar/icon",
                    "open_id": "ou-caecc734c2e3328a62489fe0648c4b98779515d3",
                    "union_id": "on-d89jhsdhjsajkda7828enjdj328ydhhw3u43yjhdj",
                    "email": "zhangsan@feishu.cn",
                    "enterprise_email": "demo@mail.com",
                    "user_id": "5d9bdxxx",
                    "mobile": "+86130002883xx",
                    "tenant_key": "736588c92lxf175d",
                    "employee_no": "111222333",
                },
            }

        def contact_user(query, headers, body):
            if headers.get("authorization") not in ("Bearer eyJhbGciOiJFUzI1NiIs**********X6wrZHYKDxJkWwhdkrYg", "Bearer renewed-user-access-token"):
                return 400, {"code": 99991663, "msg": "Invalid access token for authorization."}
            return 200, {
                "code": 0,
                "msg": "success",
                "data": {"user": {"open_id": "ou-caecc734c2e3328a62489fe0648c4b98779515d3", "name": "张三", "department_ids": list(self.feishu_departments)}},
            }

        self.api = FakeAPI(
            {
                ("POST", "/open-apis/authen/v2/oauth/token"): token,
                ("GET", "/open-apis/authen/v1/user_info"): user_info,
                ("GET", "/open-apis/contact/v3/users/ou-caecc734c2e3328a62489fe0648c4b98779515d3"): contact_user,
            }
        )
        base = listen(self, self.api)
        self.base = base
        self.flow = PresetFlow(
            self,
            "feishu",
            {
                "authorize": base + "/open-apis/authen/v1/authorize",
                "token": base + "/open-apis/authen/v2/oauth/token",
                "userinfo": base + "/open-apis/authen/v1/user_info",
                "contact": base + "/open-apis/contact/v3/users",
            },
        )

    async def test_login_maps_to_principal(self):
        """
        The authorize URL carries client_id, state and an S256 challenge; the
        token call sends the matching code_verifier and the app secret; the
        union_id, name, enterprise e-mail and department ids become the
        principal.
        """
        cookie, location = await self.flow.begin()
        params = query_of(location)
        self.assertTrue(location.startswith(self.base + "/open-apis/authen/v1/authorize?"))
        self.assertEqual((params["client_id"], params["code_challenge_method"]), (PRESET_IDS["feishu"], "S256"))
        self.assertNotIn("scope", params)
        self.challenges["CODE-1"] = params["code_challenge"]
        done = await self.flow.back(cookie, code="CODE-1", state=params["state"])
        self.assertEqual(done.code, 302, done.body)
        me = await self.flow.me(done)
        self.assertEqual(
            me,
            {
                "sub": "on-d89jhsdhjsajkda7828enjdj328ydhhw3u43yjhdj",
                "name": "zhangsan",
                "email": "demo@mail.com",
                "scopes": ["chat:read", "chat:write", "history:rd"],
                "teams": ["od-4e6ac4d14bcd5071a37a39de902c7141"],
            },
        )
        contact = [c for c in self.api.calls if c[1].startswith("/open-apis/contact/")][0]
        self.assertEqual(contact[2], {"user_id_type": "open_id", "department_id_type": "open_department_id"})

    async def test_error_payloads(self):
        """20003 invalid_grant (also a wrong PKCE verifier) is 'sign-in failed'; 20010 (no app access) is 'access denied'."""
        cookie, location = await self.flow.begin()
        self.challenges["CODE-2"] = "not-the-challenge"
        assert_friendly_page(self, await self.flow.back(cookie, code="CODE-2", state=query_of(location)["state"]), 400, "Sign-in failed")
        cookie, location = await self.flow.begin()
        assert_friendly_page(self, await self.flow.back(cookie, code="NO-ACCESS", state=query_of(location)["state"]), 403, "Access denied")

    async def test_refresh_renews_user_token(self):
        """
        Once the user's access token has expired, a refresh uses the v2
        refresh_token grant, re-reads the departments with the new token and
        renews the cookie; a refresh token Feishu refuses (20037) ends the
        sign-in.
        """
        cookie, location = await self.flow.begin()
        params = query_of(location)
        self.challenges["CODE-1"] = params["code_challenge"]
        done = await self.flow.back(cookie, code="CODE-1", state=params["state"])
        key = session.cookie_key(self.flow.gw.parts.runtime.config)
        payload = session.unseal(key, "refresh", done.cookies[session.REFRESH_COOKIE][0], time.time())
        self.assertEqual(payload["idp"], "feishu:" + PRESET_IDS["feishu"])
        payload["grant"]["ax"] = 0
        self.feishu_departments = []
        reply = await self.flow.refresh(session.seal(key, "refresh", payload))
        self.assertEqual(reply.code, 200, reply.body)
        claims = jwt.decode(reply.json()["access_token"], options={"verify_signature": False})
        self.assertEqual((claims["teams"], claims["scope"]), ([], "chat:read chat:write"))
        self.assertEqual(self.refreshes, ["eyJhbGciOiJFUzI1NiIs**********XXOYOZz1mfgIYHwM8ZJA"])
        renewed = session.unseal(key, "refresh", reply.cookies[session.REFRESH_COOKIE][0], time.time())
        self.assertEqual((renewed["grant"]["at"], renewed["grant"]["rt"]), ("renewed-user-access-token", "renewed-refresh-token"))
        renewed["grant"]["ax"] = 0
        ended = await self.flow.refresh(session.seal(key, "refresh", renewed))
        self.assertEqual((ended.code, ended.json()["error"]["details"]), (401, "the identity provider ended the sign-in session"))
