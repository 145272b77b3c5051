"""
Bearer JWT verification and scopes (SPEC.md §4-§5): each rule rejects what it
must and accepts what it must.
"""

import base64
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from clawdbot.auth.tokens import Authenticator, Issuer, KeySet, parse_scopes
from clawdbot.errors import APIError
from tests.helpers import AUDIENCE, jwk, rsa_key, ISSUER, SECRET, bearer, get_json, serve, token, write_config

NOW = int(time.time())


def b64(data):
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides):
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "chat:read", "iat": NOW, "exp": NOW + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def hs(payload, secret=SECRET, headers=None):
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def hs_raw(payload, secret=SECRET, header=None):
    """HS256 without PyJWT's checks, for claims it refuses to encode."""
    import hashlib
    import hmac

    signing = f"{b64(header or {'alg': 'HS256', 'typ': 'JWT'})}.{b64(payload)}"
    return f"{signing}.{b64(hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest())}"


def rs(payload, name="k1", headers=None):
    return jwt.encode(payload, rsa_key(name), algorithm="RS256", headers={"kid": name, **(headers or {})})


def sent_header(authorization=None, raw=None):
    """The Authorization values a request sends (C{None} when it sends none)."""
    if raw is not None:
        return raw
    return [authorization.encode("latin-1")] if authorization is not None else None


class Verifier(SynchronousTestCase):
    """Helpers to run the authenticator synchronously (HS256 and static keys need no I/O)."""

    def authenticator(self, algorithms=("HS256",), keys=None, leeway=30.0, clock=None):
        issuer = Issuer(ISSUER, AUDIENCE, algorithms, secret=SECRET, keys=keys)
        return Authenticator([issuer], clock or reactor, leeway=leeway)

    def principal(self, tok, **kw):
        auth = kw.pop("auth", None) or self.authenticator(**kw)
        return self.successResultOf(Deferred.fromCoroutine(auth.authenticate(sent_header("Bearer " + tok), "127.0.0.1", "test")))

    def rejection(self, tok, auth=None, header=None, **kw):
        auth = auth or self.authenticator(**kw)
        sent = sent_header(header if header is not None else "Bearer " + tok)
        failure = self.failureResultOf(Deferred.fromCoroutine(auth.authenticate(sent, "127.0.0.1", "test")), APIError)
        return failure.value


class HS256Tests(Verifier):
    def test_valid_token(self):
        """A well-formed HS256 token yields its principal and scopes."""
        p = self.principal(hs(claims(scope="chat:read history:team-a", name="Alice", email="a@example.com", teams=["team-a"])))
        self.assertEqual(p.sub, "alice")
        self.assertEqual(p.scopes, {"chat:read", "history:team-a"})
        self.assertEqual((p.name, p.email, p.teams), ("Alice", "a@example.com", ("team-a",)))

    def test_expired_token_reproduces_seed_body(self):
        """An expired token gives SPEC §4's example error body (the reason in message and details, param null)."""
        err = self.rejection(hs(claims(exp=NOW - 3600)))
        self.assertEqual(err.status, 401)
        body = err.as_dict()["error"]
        self.assertEqual(
            body,
            {
                "message": "Invalid or expired token: token is expired",
                "type": "authentication_error",
                "code": "AUTH_INVALID_TOKEN",
                "param": None,
                "details": "token is expired",
            },
        )
        self.assertIn('error="invalid_token"', err.headers["WWW-Authenticate"])

    def test_every_spelling_of_none(self):
        """alg none, in any case, with or without a signature, is refused."""
        for alg in ("none", "None", "NONE", "nOnE", "", "HS512", "RS512", "ES256", "PS256", "HS384", "EdDSA"):
            for signature in ("", "AAAA", b64(b"junk")):
                tok = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims())}.{signature}"
                self.assertEqual(self.rejection(tok).details, "algorithm not allowed", (alg, signature))

    def test_alg_missing_or_not_a_string(self):
        """A header without alg, or alg of the wrong type, is refused."""
        for header in ({"typ": "JWT"}, {"alg": None}, {"alg": ["HS256"]}, {"alg": 256}):
            tok = f"{b64(header)}.{b64(claims())}.{b64(b'sig')}"
            self.assertEqual(self.rejection(tok).code, "AUTH_INVALID_TOKEN")

    def test_algorithm_not_configured(self):
        """RS256 tokens are refused when only HS256 is configured, and the reverse."""
        self.assertEqual(self.rejection(rs(claims())).details, "algorithm not allowed")
        keys = KeySet(reactor, static_keys={"k1": rsa_key("k1").public_key()})
        self.assertEqual(self.rejection(hs(claims()), algorithms=("RS256",), keys=keys).details, "algorithm not allowed")

    def test_algorithm_confusion(self):
        """HS256 signed with the RS256 public key (as PEM) is refused, whatever is configured."""
        pem = rsa_key("k1").public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        header = b64({"alg": "HS256", "typ": "JWT"})
        body = b64(claims())
        import hashlib
        import hmac

        sig = b64(hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
        tok = f"{header}.{body}.{sig}"
        keys = KeySet(reactor, static_keys={"k1": rsa_key("k1").public_key()})
        self.assertEqual(self.rejection(tok, algorithms=("HS256", "RS256"), keys=keys).details, "signature does not match")
        self.assertEqual(self.rejection(tok, algorithms=("RS256",), keys=keys).details, "algorithm not allowed")

    def test_bad_signatures(self):
        """Tampered payloads, truncated, empty and foreign signatures are refused."""
        good = hs(claims())
        header, payload, sig = good.split(".")
        tampered = f"{header}.{b64(claims(scope='admin'))}.{sig}"
        cases = {
            "tampered": tampered,
            "truncated": f"{header}.{payload}.{sig[:-4]}",
            "empty": f"{header}.{payload}.",
            "other secret": hs(claims(), secret="another-secret-0123456789-abcdefghij"),
        }
        for name, tok in cases.items():
            err = self.rejection(tok)
            self.assertEqual(err.code, "AUTH_INVALID_TOKEN", name)
            self.assertIn(err.details, ("signature does not match", "token is malformed"), name)

    def test_required_claims(self):
        """exp, iss and aud are each required."""
        for claim in ("exp", "iss", "aud"):
            self.assertEqual(self.rejection(hs(claims(**{claim: DROP}))).details, f"claim '{claim}' is missing")

    def test_sub_required(self):
        """A token without a subject names no principal and is refused."""
        self.assertEqual(self.rejection(hs(claims(sub=DROP))).details, "claim 'sub' is missing")

    def test_wrong_values(self):
        """Wrong issuer and wrong audience are refused with their reasons."""
        self.assertEqual(self.rejection(hs(claims(iss="https://evil.example.com"))).details, "issuer does not match")
        self.assertEqual(self.rejection(hs(claims(aud="someone-else"))).details, "audience does not match")
        self.assertEqual(self.rejection(hs(claims(aud=["a", "b"]))).details, "audience does not match")
        self.principal(hs(claims(aud=["other", AUDIENCE])))

    def test_wrong_types(self):
        """Claims of the wrong JSON type are invalid, even when their value would pass."""
        cases = {
            "exp": str(NOW + 600),
            "nbf": str(NOW - 10),
            "iat": str(NOW),
            "iss": 12345,
            "aud": 7,
            "sub": 42,
            "scope": ["chat:read"],
            "scp": 5,
            "teams": "team-a",
        }
        for claim, value in cases.items():
            err = self.rejection(hs_raw(claims(**{claim: value})))
            self.assertEqual(err.details, f"claim '{claim}' has the wrong type", claim)
        self.assertEqual(self.rejection(hs_raw(claims(exp=True))).details, "claim 'exp' has the wrong type")

    def test_not_yet_valid_and_future_iat(self):
        """nbf in the future and iat in the future (beyond leeway) are refused."""
        self.assertEqual(self.rejection(hs(claims(nbf=NOW + 3600))).details, "token is not yet valid")
        self.assertEqual(self.rejection(hs(claims(iat=NOW + 3600))).details, "token is not yet valid")

    def test_leeway_edges(self):
        """Expiry within the leeway is accepted; beyond it refused (30s leeway, 10s margins)."""
        now = int(time.time())
        self.principal(hs(claims(exp=now - 20)), leeway=30)
        self.assertEqual(self.rejection(hs(claims(exp=now - 40)), leeway=30).details, "token is expired")
        self.principal(hs(claims(nbf=now + 20)), leeway=30)
        self.assertEqual(self.rejection(hs(claims(nbf=now + 40)), leeway=30).details, "token is not yet valid")
        self.assertEqual(self.rejection(hs(claims(exp=now - 5)), leeway=0).details, "token is expired")

    def test_scp_list(self):
        """Scopes also come from an scp list (or string)."""
        self.assertEqual(self.principal(hs(claims(scope=DROP, scp=["chat:write", "admin"]))).scopes, {"chat:write", "admin"})
        self.assertEqual(parse_scopes({"scp": "a b"}), {"a", "b"})

    def test_header_forms(self):
        """Missing, non-Bearer and duplicated Authorization headers are refused with their codes."""
        auth = self.authenticator()
        missing = self.failureResultOf(Deferred.fromCoroutine(auth.authenticate(sent_header())), APIError).value
        self.assertEqual((missing.code, missing.headers["WWW-Authenticate"]), ("AUTH_MISSING_TOKEN", 'Bearer realm="clawdbot"'))
        self.assertEqual(self.rejection(None, header="Basic YWxpY2U6cGFzcw==").code, "AUTH_MISSING_TOKEN")
        self.assertEqual(self.rejection(None, header="Bearer ").code, "AUTH_INVALID_TOKEN")
        self.principal(hs(claims()), auth=auth)
        dup = sent_header(raw=[b"Bearer " + hs(claims()).encode()] * 2)
        err = self.failureResultOf(Deferred.fromCoroutine(auth.authenticate(dup, "127.0.0.1", "test")), APIError).value
        self.assertEqual(err.code, "AUTH_INVALID_TOKEN")

    def test_cache_respects_expiry(self):
        """A cached verification does not outlive the token's exp plus leeway."""
        clock = Clock()
        clock.advance(time.time())
        auth = self.authenticator(clock=clock, leeway=0)
        tok = hs(claims(exp=int(clock.seconds()) + 5))
        self.principal(tok, auth=auth)
        self.principal(tok, auth=auth)
        clock.advance(10)
        # The cache no longer answers; PyJWT's own wall clock still sees it valid,
        # so the second verification is what decides, and it runs again.
        self.assertNotIn(tok, {k for k, (p, exp) in auth._cache.items() if clock.seconds() < exp})

    @given(st.text(max_size=300))
    @settings(max_examples=300, deadline=None)
    def test_garbage_tokens(self, text):
        """No random string is accepted, and none causes anything but a 401."""
        auth = self.authenticator()
        try:
            header = ("Bearer " + text).encode("latin-1")
        except UnicodeEncodeError:
            header = b"Bearer " + text.encode("utf-8")
        failure = self.failureResultOf(Deferred.fromCoroutine(auth.authenticate([header], "127.0.0.1", "test")))
        failure.trap(APIError)
        self.assertEqual(failure.value.status, 401)

    @given(
        st.dictionaries(st.sampled_from(["alg", "typ", "kid", "jwk", "jku", "x5u", "x5c", "crit"]), st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=3))),
        st.dictionaries(st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "iat", "scope", "scp"]), st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(), st.lists(st.text(max_size=5), max_size=3))),
        st.binary(max_size=40),
    )
    @settings(max_examples=300, deadline=None)
    def test_structured_garbage(self, header, payload, signature):
        """Structurally plausible tokens with random headers and claims never pass without the secret, and never 500."""
        tok = f"{b64(header)}.{b64(payload)}.{b64(signature)}"
        err = self.rejection(tok)
        self.assertEqual(err.status, 401)


class RSATests(Verifier):
    def keyset(self, names, fetches):
        async def fetch():
            fetches.append(1)
            return {"keys": [jwk(n) for n in names]}

        return KeySet(self.clock, fetch=fetch, min_refresh=30, ttl=3600)

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)

    def test_rs256_from_jwks(self):
        """RS256 tokens verify against keys from JWKS, selected by kid."""
        fetches = []
        keys = self.keyset(["k1", "k2"], fetches)
        auth = self.authenticator(algorithms=("RS256",), keys=keys, clock=self.clock)
        self.assertEqual(self.principal(rs(claims(), "k2"), auth=auth).sub, "alice")
        self.assertEqual(self.principal(rs(claims(sub="bob"), "k1"), auth=auth).sub, "bob")
        self.assertEqual(len(fetches), 1)

    def test_unknown_kid_refreshes_once(self):
        """An unknown kid triggers one JWKS refresh, then 401; a second one within the interval does not refetch."""
        fetches = []
        keys = self.keyset(["k1"], fetches)
        auth = self.authenticator(algorithms=("RS256",), keys=keys, clock=self.clock)
        self.principal(rs(claims(), "k1"), auth=auth)
        self.clock.advance(60)
        self.assertEqual(self.rejection(rs(claims(), "k3"), auth=auth).details, "signing key is unknown")
        self.assertEqual(len(fetches), 2)
        self.assertEqual(self.rejection(rs(claims(sub="x"), "k3"), auth=auth).details, "signing key is unknown")
        self.assertEqual(len(fetches), 2)

    def test_header_supplied_keys_ignored(self):
        """jwk, jku, x5u and x5c headers never supply the key: a token signed by an attacker's key is refused."""
        fetches = []
        keys = self.keyset(["k1"], fetches)
        auth = self.authenticator(algorithms=("RS256",), keys=keys, clock=self.clock)
        attacker = jwk("attacker")
        for extra in ({"jwk": attacker}, {"jku": "http://evil.example/jwks"}, {"x5u": "http://evil.example/cert"}, {"x5c": ["MIIB"]}):
            tok = jwt.encode(claims(), rsa_key("attacker"), algorithm="RS256", headers={"kid": "k1", **extra})
            self.assertEqual(self.rejection(tok, auth=auth).details, "signature does not match", extra)
        self.assertEqual(len(fetches), 1)

    def test_kid_of_wrong_type(self):
        """A kid that is not a string is refused."""
        keys = KeySet(self.clock, static_keys={None: rsa_key("k1").public_key()})
        good = jwt.encode(claims(), rsa_key("k1"), algorithm="RS256")
        _, payload, signature = good.split(".")
        tok = f"{b64({'alg': 'RS256', 'kid': 5})}.{payload}.{signature}"
        self.assertEqual(self.rejection(tok, algorithms=("RS256",), keys=keys).code, "AUTH_INVALID_TOKEN")

    def test_public_key_file(self):
        """RS256 keys from a PEM file verify tokens with or without a kid."""
        pem = rsa_key("k1").public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        path = write_config(self, pem.decode())
        keys = KeySet.from_pem_file(self.clock, path)
        auth = self.authenticator(algorithms=("RS256",), keys=keys)
        self.principal(jwt.encode(claims(), rsa_key("k1"), algorithm="RS256"), auth=auth)
        self.principal(rs(claims()), auth=auth)
        self.assertEqual(self.rejection(rs(claims(), "k2"), auth=auth).details, "signature does not match")


class JWKS(Resource):
    isLeaf = True

    def __init__(self, names):
        super().__init__()
        self.names = names
        self.hits = 0

    def render_GET(self, request):
        self.hits += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": [jwk(n) for n in self.names]}).encode()


class JWKSRotationTests(TestCase):
    async def test_rotation_over_http(self):
        """A key rotation at the JWKS URL is picked up on the first token with the new kid."""
        jwks = JWKS(["k1"])
        port = reactor.listenTCP(0, Site(jwks), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/jwks"
        gw = serve(self, extra=f'auth: {{jwt: {{algorithms: ["RS256", "HS256"], jwks_url: "{url}"}}}}')
        status, _, body = await get_json(gw.url + "/v1/me", headers=bearer(rs(claims(), "k1")))
        self.assertEqual((status, body["sub"]), (200, "alice"))
        jwks.names = ["k1", "k2"]
        status, _, body = await get_json(gw.url + "/v1/me", headers=bearer(rs(claims(sub="bob"), "k2")))
        self.assertEqual((status, body["sub"]), (200, "bob"))
        self.assertEqual(jwks.hits, 2)
        status, _, body = await get_json(gw.url + "/v1/me", headers=bearer(hs(claims(sub="carol"))))
        self.assertEqual((status, body["sub"]), (200, "carol"))

    async def test_unreachable_jwks_is_401_not_500(self):
        """When the JWKS URL cannot be reached, RS256 tokens get a 401 and the gateway stays up."""
        gw = serve(self, extra='auth: {jwt: {algorithms: ["RS256"], jwks_url: "http://127.0.0.1:9/jwks"}}')
        status, _, body = await get_json(gw.url + "/v1/me", headers=bearer(rs(claims(), "k1")))
        self.assertEqual(status, 401)
        self.assertEqual(body["error"]["details"], "signing key is unknown")
        self.assertNotIn("127.0.0.1", json.dumps(body))


class TokenCommandTests(SynchronousTestCase):
    def test_minted_token_is_accepted(self):
        """`clawdbot token` mints an HS256 token the gateway's own verifier accepts, with the given ttl."""
        import subprocess
        import sys

        from tests.helpers import BASE_CONFIG, ROOT, process_env

        path = write_config(self, BASE_CONFIG)
        result = subprocess.run(
            [sys.executable, "-m", "clawdbot", "token", "--config", path, "--sub", "alice", "--scope", "chat:read history:team-a", "--ttl", "15m", "--team", "team-a"],
            capture_output=True,
            text=True,
            env=process_env(),
            cwd=ROOT,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        tok = result.stdout.strip()
        decoded = jwt.decode(tok, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
        self.assertEqual(decoded["scope"], "chat:read history:team-a")
        self.assertEqual(decoded["teams"], ["team-a"])
        self.assertAlmostEqual(decoded["exp"] - decoded["iat"], 900)
        verifier = Verifier()
        self.assertEqual(verifier.principal(tok).teams, ("team-a",))


class ScopeTests(TestCase):
    async def test_me_needs_any_valid_token(self):
        """/v1/me answers for any valid token, whatever its scopes."""
        gw = serve(self)
        for scope in ("", "chat:read", "admin"):
            status, _, body = await get_json(gw.url + "/v1/me", headers=bearer(token(scope=scope)))
            self.assertEqual(status, 200)
            self.assertEqual(body["scopes"], sorted(scope.split()))

    async def test_failure_logged_without_token(self):
        """A refused token is logged as a security event with reason and peer, never the token."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gw = serve(self)
        bad = token(ttl=-3600)
        status, _, _ = await get_json(gw.url + "/v1/me?access_token=" + bad, headers=bearer(bad))
        self.assertEqual(status, 401)
        rejected = [e for e in events if e.get("security_event") == "auth_failure"]
        self.assertEqual(len(rejected), 1)
        self.assertEqual((rejected[0]["reason"], rejected[0]["peer"]), ("token is expired", "127.0.0.1"))
        from clawdbot.logs import event_as_dict

        for event in events:
            self.assertNotIn(bad.split(".")[2], json.dumps(event_as_dict(event), default=str))
