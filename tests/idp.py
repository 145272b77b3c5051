"""
A real OpenID Connect provider for integration tests: oidc-provider (npm,
pinned in tests/idp/package.json) run by node as a child process on
127.0.0.1, over plain http.

    idp = IdP()
    idp.start(clients=[{"client_id": "gw", "client_secret": "...",
                        "redirect_uris": ["http://127.0.0.1:8080/callback"]}],
              users=[{"sub": "alice", "email": "alice@example.test",
                      "name": "Alice", "groups": ["admins"]}])
    testcase.addCleanup(idp.stop)
    idp.issuer            # "http://127.0.0.1:<port>"

    verifier, challenge = pkce_pair()
    url = idp.authorize_url("gw", "http://127.0.0.1:8080/callback",
                            state="s", nonce="n", code_challenge=challenge)
    callback = browserless_login(url, "alice")   # ...?code=...&state=s&iss=...

See tests/idp/server.js for the provider's behaviour and the config format.

Everything here is synchronous and uses the standard library only: from a
test running on the reactor, call it through C{deferToThread}.  The npm
modules are installed by the project's setup (C{cd tests/idp && npm ci
--no-audit --no-fund}); when they are missing, L{IdP.start} raises
L{IdPNotInstalled} rather than letting a test be skipped.
"""

import base64
import hashlib
import http.cookiejar
import json
import os
import secrets
import selectors
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

IDP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idp")
SERVER_JS = os.path.join(IDP_DIR, "server.js")
READY = "IdP listening on "

__all__ = [
    "IdP",
    "IdPError",
    "IdPNotInstalled",
    "LoginFailed",
    "browserless_login",
    "browserless_logout",
    "pkce_pair",
]


class IdPError(Exception):
    """The IdP could not be started, or answered a page with an error."""


class IdPNotInstalled(IdPError):
    """node or the IdP's npm modules are missing."""


class LoginFailed(IdPError):
    """The login form was answered with an error (unknown user, wrong password)."""


def pkce_pair():
    """A fresh PKCE (code_verifier, S256 code_challenge) pair."""
    verifier = _b64url(secrets.token_bytes(32))
    return verifier, _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class IdP:
    """
    An oidc-provider child process.

    @ivar issuer: C{"http://127.0.0.1:<port>"} once started, else C{None}.
    @ivar config: the config dict that was written for the server.
    """

    def __init__(self, node=None):
        self.node = node
        self.issuer = None
        self.config = None
        self._proc = None
        self._stderr = None
        self._config_path = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, clients=(), users=(), jwks=None, port=0, timeout=20.0):
        """
        Write the config, start C{node tests/idp/server.js CONFIG PORT} and
        wait (up to C{timeout} seconds) for its C{IdP listening on} line.

        @param clients: client metadata dicts (C{client_id},
            C{client_secret}, C{redirect_uris}, optionally
            C{post_logout_redirect_uris}, C{token_endpoint_auth_method}
            (default C{client_secret_basic}), C{grant_types} (default
            authorization_code + refresh_token), ...).
        @param users: dicts with C{sub} (the login name), C{email},
            C{name}, C{groups}, optionally C{email_verified} (default true),
            C{preferred_username}, C{password} (when set, logins must give it).
        @param jwks: optional private JWKS (C{{"keys": [...]}}) to sign
            with, first key signs; by default one fresh RSA key.
        @param port: 0 for a free port.
        @return: C{self}.
        """
        if self._proc is not None:
            raise IdPError("IdP already started")
        node = self.node or shutil.which("node")
        if not node:
            raise IdPNotInstalled("node is not on PATH: the OIDC provider used by the tests needs Node.js (>= 18)")
        if not os.path.isdir(os.path.join(IDP_DIR, "node_modules", "oidc-provider")):
            raise IdPNotInstalled(
                f"{IDP_DIR}/node_modules is missing: install the test IdP's npm modules with "
                "`cd tests/idp && npm ci --no-audit --no-fund` (the project's test setup does this)"
            )

        self.config = {"clients": [dict(c) for c in clients], "users": [dict(u) for u in users]}
        if jwks is not None:
            self.config["jwks"] = jwks
        fd, self._config_path = tempfile.mkstemp(prefix="clawdbot-idp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)

        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._proc = subprocess.Popen(
            [node, SERVER_JS, self._config_path, str(port)],
            cwd=IDP_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            line = self._read_ready_line(timeout)
        except BaseException:
            log = self.log()
            self.stop()
            raise IdPError(f"the IdP did not start: {log.strip() or 'no output'}") from None
        self.issuer = line[len(READY):].strip()
        return self

    def _read_ready_line(self, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IdPError(f"no '{READY}' line within {timeout}s")
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise IdPError(f"the IdP exited with {self._proc.wait()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith(READY):
            raise IdPError(f"unexpected first line from the IdP: {line!r}")
        return line

    def stop(self):
        """Stop the process (SIGTERM, then SIGKILL after 5s) and remove the config."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()
        if self._config_path:
            try:
                os.unlink(self._config_path)
            except FileNotFoundError:
                pass
            self._config_path = None
        self.issuer = None

    def log(self):
        """What the IdP wrote to stderr so far (warnings, request errors)."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- endpoints -----------------------------------------------------------

    @property
    def discovery_url(self):
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def jwks_uri(self):
        return self.issuer + "/jwks"

    @property
    def authorization_endpoint(self):
        return self.issuer + "/auth"

    @property
    def token_endpoint(self):
        return self.issuer + "/token"

    @property
    def userinfo_endpoint(self):
        return self.issuer + "/me"

    @property
    def end_session_endpoint(self):
        return self.issuer + "/session/end"

    def discovery(self):
        """The parsed discovery document."""
        return _get_json(self.discovery_url)

    def jwks(self):
        """The published (public) JWKS."""
        return _get_json(self.jwks_uri)

    def rotate(self, drop_old=False):
        """
        Make a new RS256 key (new kid) the signing key.  The old keys stay in
        the JWKS unless C{drop_old}.  Returns C{{"kid": new, "kids": [all]}}.
        """
        url = self.issuer + "/__test__/rotate" + ("?drop_old=1" if drop_old else "")
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10) as r:
            return json.load(r)

    def change_user(self, sub, **claims):
        """
        Change a user's claims at the provider from now on (for example
        C{groups=[...]}), as an administrator would; C{deleted=True} removes
        the user.  Returns the provider's answer.
        """
        body = json.dumps({"sub": sub, **claims}).encode()
        req = urllib.request.Request(self.issuer + "/__test__/user", data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def authorize_url(
        self,
        client_id,
        redirect_uri,
        scope="openid email profile",
        state=None,
        nonce=None,
        code_challenge=None,
        code_challenge_method="S256",
        **extra,
    ):
        """An authorization request URL (response_type=code); C{None} values are left out."""
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": code_challenge_method if code_challenge else None,
            **extra,
        }
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return self.authorization_endpoint + "?" + query

    def token(self, client_id, client_secret, **form):
        """
        POST C{form} to the token endpoint with client_secret_basic
        authentication.  Returns (HTTP status, parsed JSON body).
        """
        basic = base64.b64encode(
            f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}".encode()
        ).decode()
        req = urllib.request.Request(
            self.token_endpoint,
            data=urllib.parse.urlencode(form).encode(),
            headers={"Authorization": "Basic " + basic, "Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, json.load(e)


def _get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


# -- a browser without a browser ----------------------------------------------


class _Forms(HTMLParser):
    """The forms of a page: [{"id", "action", "method", "fields": {name: value}, "buttons": [(name, value)]}]."""

    def __init__(self):
        super().__init__()
        self.forms = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append(
                {"id": a.get("id"), "action": a.get("action") or "", "method": (a.get("method") or "get").upper(), "fields": {}, "buttons": []}
            )
        elif self.forms and tag == "input" and a.get("name"):
            if (a.get("type") or "text").lower() == "submit":
                self.forms[-1]["buttons"].append((a["name"], a.get("value") or ""))
            else:
                self.forms[-1]["fields"][a["name"]] = a.get("value") or ""
        elif self.forms and tag == "button" and a.get("name"):
            self.forms[-1]["buttons"].append((a["name"], a.get("value") or ""))

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())


def _forms(html):
    parser = _Forms()
    parser.feed(html)
    return parser


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _same_endpoint(a, b):
    """Do URLs C{a} and C{b} name the same endpoint (scheme, host, port, path)?"""
    a, b = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)


def _origin(url):
    parts = urllib.parse.urlsplit(url)
    return (parts.scheme, parts.netloc)


class _Browser:
    """Cookies, no redirect following: each step is decided by the caller."""

    def __init__(self, cookies, timeout):
        self.cookies = cookies if cookies is not None else http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies), _NoRedirect())
        self.timeout = timeout

    def fetch(self, url, form=None):
        """(status, absolute Location or None, body text) of one request."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(url, data=data, method="POST" if form is not None else "GET")
        try:
            with self.opener.open(req, timeout=self.timeout) as r:
                return r.status, None, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            with e:
                body = e.read().decode("utf-8", "replace")
                location = e.headers.get("Location")
                return e.code, urllib.parse.urljoin(url, location) if location else None, body


def _page_error(url, status, body):
    text = " ".join(_forms(body).text)
    return IdPError(f"the IdP answered {status} at {url}: {text[:500]}")


def browserless_login(authorize_url, username=None, password=None, *, redirect_uri=None, cookies=None, timeout=10.0, max_steps=20):
    """
    Drive an authorization request to its callback the way a browser would,
    but stop before the client's callback: returns the redirect URL (to the
    C{redirect_uri}, with C{code}, C{state} and C{iss} -- or with C{error}
    and C{error_description} when the provider refused the request).

    Follows the IdP's redirects with a cookie jar, answers the login form
    with C{login=username} (and C{password} if given); consent is granted by
    the IdP itself.  Never requests anything outside the IdP's origin.

    @param redirect_uri: where to stop; by default the C{redirect_uri} of
        C{authorize_url}.
    @param cookies: an L{http.cookiejar.CookieJar} to keep the IdP session
        across calls (a second login is then silent, and
        L{browserless_logout} can end it); a fresh one by default.
    @raise LoginFailed: the login form was refused.
    @raise IdPError: the IdP showed an error page, or no callback came.
    """
    if redirect_uri is None:
        redirect_uri = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize_url).query)).get("redirect_uri")
    idp_origin = _origin(authorize_url)
    browser = _Browser(cookies, timeout)
    url, form, submitted = authorize_url, None, False
    for _ in range(max_steps):
        status, location, body = browser.fetch(url, form)
        if location:
            if (redirect_uri and _same_endpoint(location, redirect_uri)) or _origin(location) != idp_origin:
                return location
            url, form = location, None
            continue
        login = next((f for f in _forms(body).forms if "login" in f["fields"]), None)
        if login is None:
            raise _page_error(url, status, body)
        if submitted:
            raise LoginFailed(f"login as {username!r} refused: {' '.join(_forms(body).text)[:300]}")
        if username is None:
            raise LoginFailed("the IdP asks for a login and no username was given")
        form = dict(login["fields"], login=username)
        if password is not None:
            form["password"] = password
        url, submitted = urllib.parse.urljoin(url, login["action"]), True
    raise IdPError(f"no redirect to {redirect_uri} after {max_steps} steps")


def browserless_logout(end_session_url, *, cookies=None, timeout=10.0, max_steps=10):
    """
    RP-initiated logout: GET C{end_session_url} (the end_session_endpoint
    with C{id_token_hint}, C{post_logout_redirect_uri}, C{state}, ...),
    confirm "logout=yes" on the IdP's page, and return the redirect URL that
    leaves the IdP (the C{post_logout_redirect_uri}, with C{state}), or
    C{None} when the IdP ends on its own "signed out" page.

    @param cookies: the jar used with L{browserless_login}, holding the IdP
        session to end.
    """
    idp_origin = _origin(end_session_url)
    browser = _Browser(cookies, timeout)
    url, form, confirmed = end_session_url, None, False
    for _ in range(max_steps):
        status, location, body = browser.fetch(url, form)
        if location:
            if _origin(location) != idp_origin:
                return location
            url, form = location, None
            continue
        if status != 200:
            raise _page_error(url, status, body)
        page = _forms(body)
        confirm = next((f for f in page.forms if f["id"] == "op.logoutForm"), None)
        if confirm is None or confirmed:
            return None  # the IdP's own post-logout page
        form = dict(confirm["fields"])
        form.update(dict(confirm["buttons"]))  # logout=yes
        url, confirmed = urllib.parse.urljoin(url, confirm["action"]), True
    raise IdPError(f"logout did not finish after {max_steps} steps")
