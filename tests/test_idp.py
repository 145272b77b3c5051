"""
The test OpenID Connect provider (tests/idp/server.js, run by tests/idp.py):
what the gateway's OIDC tests rely on it to do.
"""

import http.cookiejar
import urllib.parse

import jwt
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

import tests.idp
from tests.idp import IdP, IdPNotInstalled, LoginFailed, browserless_login, browserless_logout, pkce_pair

CLIENT_ID = "clawdbot-gateway"
CLIENT_SECRET = "idp-test-secret-0123456789"
REDIRECT_URI = "http://127.0.0.1:9/oauth2/callback"
POST_LOGOUT_URI = "http://127.0.0.1:9/signed-out"

CLIENTS = [
    {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [REDIRECT_URI],
        "post_logout_redirect_uris": [POST_LOGOUT_URI],
    }
]
USERS = [
    {"sub": "alice", "email": "alice@example.test", "name": "Alice Example", "groups": ["admins", "users"]},
    {"sub": "bob", "email": "bob@example.test", "name": "Bob", "groups": [], "password": "hunter2"},
]


def query(url):
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


class IdPTestCase(TestCase):
    def setUp(self):
        self.idp = IdP().start(clients=CLIENTS, users=USERS)
        self.addCleanup(self.idp.stop)

    def login(self, username="alice", scope="openid email profile", nonce="n-0S6_WzA2Mj", cookies=None, **kw):
        """Log in through the IdP: (callback URL, code_verifier)."""
        verifier, challenge = pkce_pair()
        url = self.idp.authorize_url(CLIENT_ID, REDIRECT_URI, scope=scope, state="af0ifjsldkj", nonce=nonce, code_challenge=challenge)
        return browserless_login(url, username, cookies=cookies, **kw), verifier

    def exchange(self, callback, verifier):
        """Redeem the callback's code (client_secret_basic + code_verifier)."""
        return self.idp.token(
            CLIENT_ID,
            CLIENT_SECRET,
            grant_type="authorization_code",
            code=query(callback)["code"],
            redirect_uri=REDIRECT_URI,
            code_verifier=verifier,
        )

    def verify(self, id_token):
        """The ID token's claims, its RS256 signature checked against the JWKS."""
        kid = jwt.get_unverified_header(id_token)["kid"]
        keys = {k["kid"]: k for k in self.idp.jwks()["keys"]}
        self.assertIn(kid, keys)
        return jwt.decode(
            id_token,
            jwt.PyJWK(keys[kid]).key,
            algorithms=["RS256"],
            audience=CLIENT_ID,
            issuer=self.idp.issuer,
        )


class DiscoveryTests(IdPTestCase):
    def test_discovery(self):
        """
        Discovery is served at the loopback http issuer, names the endpoints
        under it, and advertises S256 as the only PKCE method, the code flow,
        RS256 ID tokens, client_secret_basic, and the groups scope and claim.
        """
        issuer = self.idp.issuer
        self.assertRegex(issuer, r"^http://127\.0\.0\.1:\d+$")
        doc = self.idp.discovery()
        self.assertEqual(doc["issuer"], issuer)
        self.assertEqual(doc["authorization_endpoint"], issuer + "/auth")
        self.assertEqual(doc["token_endpoint"], issuer + "/token")
        self.assertEqual(doc["userinfo_endpoint"], issuer + "/me")
        self.assertEqual(doc["jwks_uri"], issuer + "/jwks")
        self.assertEqual(doc["end_session_endpoint"], issuer + "/session/end")
        self.assertEqual(doc["code_challenge_methods_supported"], ["S256"])
        self.assertEqual(doc["response_types_supported"], ["code"])
        self.assertIn("refresh_token", doc["grant_types_supported"])
        self.assertEqual(doc["id_token_signing_alg_values_supported"], ["RS256"])
        self.assertIn("client_secret_basic", doc["token_endpoint_auth_methods_supported"])
        for scope in ("openid", "email", "profile", "groups"):
            self.assertIn(scope, doc["scopes_supported"])
        for claim in ("sub", "email", "email_verified", "name", "groups"):
            self.assertIn(claim, doc["claims_supported"])

    def test_missing_node_modules_is_an_error(self):
        """
        Without tests/idp/node_modules, starting the IdP raises an error that
        says how to install it (a test is never skipped for it).
        """
        self.patch(tests.idp, "IDP_DIR", self.mktemp())
        error = self.assertRaises(IdPNotInstalled, IdP().start, clients=CLIENTS, users=USERS)
        self.assertIn("npm ci", str(error))


class CodeFlowTests(IdPTestCase):
    async def test_code_flow_with_pkce(self):
        """
        The whole code flow without a browser, run off the reactor thread as
        the gateway's tests will: the callback carries code, state and iss;
        the code (client_secret_basic + code_verifier) gives an access token,
        a refresh token and an ID token whose RS256 signature verifies against
        the JWKS and that carries sub, email, email_verified, name, groups and
        the nonce.
        """
        callback, verifier = await deferToThread(self.login)
        self.assertTrue(callback.startswith(REDIRECT_URI + "?"), callback)
        params = query(callback)
        self.assertEqual(params["state"], "af0ifjsldkj")
        self.assertEqual(params["iss"], self.idp.issuer)
        self.assertIn("code", params)

        status, tokens = await deferToThread(self.exchange, callback, verifier)
        self.assertEqual(status, 200, tokens)
        self.assertEqual(tokens["token_type"], "Bearer")
        self.assertIn("access_token", tokens)
        self.assertIn("refresh_token", tokens)

        claims = self.verify(tokens["id_token"])
        self.assertEqual(claims["sub"], "alice")
        self.assertEqual(claims["email"], "alice@example.test")
        self.assertIs(claims["email_verified"], True)
        self.assertEqual(claims["name"], "Alice Example")
        self.assertEqual(claims["groups"], ["admins", "users"])
        self.assertEqual(claims["nonce"], "n-0S6_WzA2Mj")

    def test_userinfo_has_groups(self):
        """
        The access token reads the userinfo endpoint, which gives the same
        claims as the ID token, groups included.
        """
        import json
        import urllib.request

        callback, verifier = self.login()
        _, tokens = self.exchange(callback, verifier)
        req = urllib.request.Request(self.idp.userinfo_endpoint, headers={"Authorization": "Bearer " + tokens["access_token"]})
        with urllib.request.urlopen(req, timeout=10) as r:
            info = json.load(r)
        self.assertEqual(info["sub"], "alice")
        self.assertEqual(info["email"], "alice@example.test")
        self.assertEqual(info["groups"], ["admins", "users"])

    def test_scopes_choose_claims(self):
        """
        Claims follow the scopes: "openid" alone gives no profile claims; the
        "groups" scope alone gives groups; "email" without "profile" gives no
        name.
        """
        callback, verifier = self.login(scope="openid")
        claims = self.verify(self.exchange(callback, verifier)[1]["id_token"])
        for absent in ("email", "name", "groups"):
            self.assertNotIn(absent, claims)

        callback, verifier = self.login(scope="openid groups")
        claims = self.verify(self.exchange(callback, verifier)[1]["id_token"])
        self.assertEqual(claims["groups"], ["admins", "users"])
        self.assertNotIn("name", claims)

        callback, verifier = self.login(scope="openid email")
        claims = self.verify(self.exchange(callback, verifier)[1]["id_token"])
        self.assertEqual(claims["email"], "alice@example.test")
        self.assertNotIn("name", claims)

    def test_pkce_required(self):
        """
        PKCE is mandatory and S256 only: an authorization request without
        code_challenge, or with the plain method, comes back to the client as
        error=invalid_request; a code redeemed with the wrong code_verifier
        is invalid_grant.
        """
        url = self.idp.authorize_url(CLIENT_ID, REDIRECT_URI, state="xyz", nonce="n")
        callback = browserless_login(url, "alice")
        self.assertTrue(callback.startswith(REDIRECT_URI + "?"), callback)
        self.assertEqual(query(callback)["error"], "invalid_request")
        self.assertIn("PKCE", query(callback)["error_description"])
        self.assertEqual(query(callback)["state"], "xyz")
        self.assertNotIn("code", query(callback))

        url = self.idp.authorize_url(CLIENT_ID, REDIRECT_URI, state="xyz", code_challenge="a" * 43, code_challenge_method="plain")
        self.assertEqual(query(browserless_login(url, "alice"))["error"], "invalid_request")

        callback, _ = self.login()
        status, body = self.exchange(callback, pkce_pair()[0])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))

    def test_login_failures(self):
        """
        The login form refuses an unknown user and a wrong password (for a
        user that has one); the right password logs in.
        """
        self.assertRaises(LoginFailed, self.login, username="mallory")
        self.assertRaises(LoginFailed, self.login, username="bob", password="wrong")
        callback, _ = self.login(username="bob", password="hunter2")
        self.assertIn("code", query(callback))


class SessionTests(IdPTestCase):
    def test_refresh_sso_and_logout(self):
        """
        The refresh token gives new tokens; with the same cookie jar a second
        authorization needs no login (SSO); RP-initiated logout with
        id_token_hint and post_logout_redirect_uri returns to that URI with
        the state, after which the refresh token is dead (invalid_grant) and
        the next authorization asks for a login again.
        """
        jar = http.cookiejar.CookieJar()
        callback, verifier = self.login(cookies=jar)
        _, tokens = self.exchange(callback, verifier)

        status, refreshed = self.idp.token(CLIENT_ID, CLIENT_SECRET, grant_type="refresh_token", refresh_token=tokens["refresh_token"])
        self.assertEqual(status, 200, refreshed)
        self.assertEqual(self.verify(refreshed["id_token"])["sub"], "alice")

        callback, _ = self.login(username=None, cookies=jar)
        self.assertIn("code", query(callback))

        logout = self.idp.end_session_endpoint + "?" + urllib.parse.urlencode(
            {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": POST_LOGOUT_URI, "state": "bye"}
        )
        self.assertEqual(browserless_logout(logout, cookies=jar), POST_LOGOUT_URI + "?state=bye")

        status, body = self.idp.token(CLIENT_ID, CLIENT_SECRET, grant_type="refresh_token", refresh_token=tokens["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.assertRaises(LoginFailed, self.login, username=None, cookies=jar)


class RotationTests(IdPTestCase):
    def test_rotation(self):
        """
        POST /__test__/rotate publishes a new key with a new kid and signs
        with it from then on, keeping the old key in the JWKS so tokens it
        signed still verify; drop_old=1 leaves only the newest key.
        """
        callback, verifier = self.login()
        old_token = self.exchange(callback, verifier)[1]["id_token"]
        old_kid = jwt.get_unverified_header(old_token)["kid"]
        self.assertEqual([k["kid"] for k in self.idp.jwks()["keys"]], [old_kid])

        rotated = self.idp.rotate()
        self.assertNotEqual(rotated["kid"], old_kid)
        self.assertEqual(rotated["kids"], [rotated["kid"], old_kid])
        keys = self.idp.jwks()["keys"]
        self.assertEqual({k["kid"] for k in keys}, {old_kid, rotated["kid"]})
        for key in keys:
            self.assertEqual((key["kty"], key["alg"], key["use"]), ("RSA", "RS256", "sig"))
            self.assertNotIn("d", key)

        callback, verifier = self.login()
        new_token = self.exchange(callback, verifier)[1]["id_token"]
        self.assertEqual(jwt.get_unverified_header(new_token)["kid"], rotated["kid"])
        self.assertEqual(self.verify(new_token)["sub"], "alice")
        self.assertEqual(self.verify(old_token)["sub"], "alice")

        newest = self.idp.rotate(drop_old=True)
        self.assertEqual([k["kid"] for k in self.idp.jwks()["keys"]], [newest["kid"]])
