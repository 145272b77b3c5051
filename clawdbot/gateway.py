"""
The gateway: the running state that outlives any one config.

It holds the current L{Config} and everything derived from it, swaps both in
one assignment on reload, and gives the HTTP layer authentication,
authorization and the backend.  Requests take a snapshot of the config when
they start (L{clawdbot.web.GatewayRequest.process}), so a reload never
changes a request in flight.
"""

import os

from twisted.logger import Logger

from clawdbot.auth import build_authenticator
from clawdbot.backend import HTTPFetcher
from clawdbot.config import ConfigError, load_config, restart_needed
from clawdbot.ollama import Ollama
from clawdbot.sessions import SessionLocks
from clawdbot.storage import open_store

log = Logger(namespace="clawdbot.gateway")


class Gateway:
    """
    @ivar config: the config new requests start under.
    @ivar reloads: counts of reload results, C{{"ok": n, "error": n}}.
    """

    def __init__(self, config, reactor, environ=None, mode=None):
        self.reactor = reactor
        self.environ = os.environ if environ is None else environ
        self.mode = mode
        self.reloads = {"ok": 0, "error": 0}
        self._reload_pending = False
        self._reload_hooks = []
        self.config = config
        self.fetcher = HTTPFetcher(reactor)
        self.backend = Ollama(reactor, self)
        self.store = open_store(config, reactor)
        self.session_locks = SessionLocks()
        self.auth = build_authenticator(config, reactor, self.fetcher.fetch_json)
        self.on_reload(self._rebuild_auth)

    def _rebuild_auth(self, old, new):
        self.auth = build_authenticator(new, self.reactor, self.fetcher.fetch_json)

    def stop(self):
        """Close outbound connections at shutdown."""
        from twisted.internet.defer import gatherResults

        self.store.close()
        return gatherResults([self.backend.close(), self.fetcher.close()])

    # --- reload ----------------------------------------------------------------

    def on_reload(self, hook):
        """Call C{hook(old, new)} after each config swap."""
        self._reload_hooks.append(hook)

    def request_reload(self):
        """
        Ask for a reload on the next reactor turn.  Safe to call from a
        signal handler; requests that arrive before it runs coalesce.
        """
        if self._reload_pending:
            return
        self._reload_pending = True
        self.reactor.callFromThread(self._reload_now)

    def _reload_now(self):
        self._reload_pending = False
        self.reload()

    def reload(self):
        """
        Re-read the config file and the environment, validate, and swap.  An
        invalid file keeps the running config.

        @return: C{True} when the new config was applied.
        """
        path = self.config.source
        try:
            new = load_config(path, self.environ, mode=self.mode)
        except ConfigError as e:
            self.reloads["error"] += 1
            log.error("Config reload failed, keeping the running config: {file}: {error}", file=path, error=str(e), config_path=e.path)
            return False
        old = self.config
        for key in restart_needed(old, new):
            log.warn("Config key {key} changed; it takes effect after a restart", key=key)
        self.config = new
        self.reloads["ok"] += 1
        for warning in new.warnings:
            log.warn("Config warning: {warning}", warning=warning)
        for hook in self._reload_hooks:
            try:
                hook(old, new)
            except Exception:
                log.failure("A reload hook failed")
        log.info("Config reloaded from {file}", file=path)
        return True

    # --- the HTTP layer's questions ----------------------------------------------

    def image_filter(self, config):
        """
        C{filter(raw_bytes) -> base64 text} for images in chat requests:
        validated, shrunk and re-encoded (L{clawdbot.images}).
        """
        return None

    def cors(self, request):
        """
        CORS for the debug listener: any C{http://localhost:*} (or loopback)
        origin may call it, so a front end on :3000 can.
        """
        origin = request.getHeader(b"origin")
        if origin and _is_local_origin(origin):
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"Origin")
            request.setHeader(b"access-control-allow-methods", b"GET, POST, PATCH, DELETE, OPTIONS")
            request.setHeader(b"access-control-allow-headers", b"Authorization, Content-Type, X-Requested-With")
            request.setHeader(b"access-control-max-age", b"600")

    async def authenticate(self, request):
        """The request's principal; see L{clawdbot.auth}."""
        return await self.auth.authenticate(request)

    def authorize(self, request, principal, scope):
        self.auth.authorize(principal, scope)


def _is_local_origin(origin):
    if isinstance(origin, bytes):
        origin = origin.decode("latin-1")
    for prefix in ("http://localhost", "http://127.0.0.1", "http://[::1]"):
        if origin == prefix or origin.startswith(prefix + ":"):
            rest = origin[len(prefix) + 1 :]
            return origin == prefix or rest.isdigit()
    return False
