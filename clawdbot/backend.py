"""
The client side: HTTP calls to Ollama and to identity providers.
"""

import json

import treq
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, _HTTP11ClientFactory

log = Logger(namespace="clawdbot.backend")


class FetchError(Exception):
    """An outbound call failed; C{reason} is a short curated text."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_pool(reactor, size):
    """A persistent connection pool that does not log every connection."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = size
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory
    return pool


class HTTPFetcher:
    """
    JSON documents from identity providers (discovery, JWKS): short
    timeouts, no redirects, a size cap.
    """

    def __init__(self, reactor, timeout=10.0, max_size=1_000_000):
        self.reactor = reactor
        self.timeout = timeout
        self.max_size = max_size
        self.client = treq.client.HTTPClient(Agent(reactor, pool=quiet_pool(reactor, 4), connectTimeout=timeout))

    async def fetch_json(self, url, **kwargs):
        try:
            response = await self.client.get(url, allow_redirects=False, timeout=self.timeout, **kwargs)
            body = await response.content()
        except (ConnectError, DNSLookupError, TimeoutError, ConnectingCancelledError, CancelledError, ResponseFailed) as e:
            raise FetchError(f"cannot reach {type(e).__name__}") from None
        if response.code != 200:
            raise FetchError(f"status {response.code}")
        if len(body) > self.max_size:
            raise FetchError("document too large")
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError("not JSON") from None

    def close(self):
        return self.client._agent._pool.closeCachedConnections()
