"""
The client side: HTTP calls to Ollama and to identity providers.
"""


import treq
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseFailed

from clawdbot.net import Discard, quiet_pool
from clawdbot.strictjson import loads_checked

log = Logger(namespace="clawdbot.backend")


class FetchError(Exception):
    """An outbound call failed; C{reason} is a short curated text."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


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
            body = await self._read(response)
        except (ConnectError, DNSLookupError, TimeoutError, ConnectingCancelledError, CancelledError, ResponseFailed) as e:
            raise FetchError(f"cannot reach {type(e).__name__}") from None
        if response.code != 200:
            raise FetchError(f"status {response.code}")
        try:
            return loads_checked(body)
        except ValueError:
            raise FetchError("not JSON") from None

    async def call(self, method, url, headers=None, form=None, json_body=None):
        """
        One request to an identity provider's API (token, user info):
        C{(status, parsed JSON body)}.  An error status is returned, not
        raised, so the caller can read the provider's error payload (its
        body is C{None} when it is not JSON).  Redirects are never followed.

        @param form: a dict sent as C{application/x-www-form-urlencoded}.
        @param json_body: a JSON-able value sent as C{application/json}.
        @raise FetchError: the network failed, the call timed out, the body
            is over the size cap, or a 2xx body is not JSON.
        """
        kwargs = {"headers": {"Accept": "application/json", **(headers or {})}}
        if form is not None:
            kwargs["data"] = form
        if json_body is not None:
            kwargs["json"] = json_body
        try:
            response = await self.client.request(method, url, allow_redirects=False, timeout=self.timeout, **kwargs)
            body = await self._read(response)
        except (ConnectError, DNSLookupError, TimeoutError, ConnectingCancelledError, CancelledError, ResponseFailed) as e:
            raise FetchError(f"cannot reach {type(e).__name__}") from None
        try:
            return response.code, loads_checked(body)
        except ValueError:
            if 200 <= response.code < 300:
                raise FetchError("not JSON") from None
            return response.code, None

    async def _read(self, response):
        """
        The whole body, refused early when its declared length is over the
        cap, and bounded in time: treq's C{timeout} stops at the headers.
        """
        declared = response.headers.getRawHeaders(b"content-length") or []
        if declared and declared[0].strip().isdigit() and int(declared[0]) > self.max_size:
            response.deliverBody(Discard())
            raise FetchError("document too large")
        reading = response.content()
        timer = self.reactor.callLater(self.timeout, reading.cancel)
        try:
            body = await reading
        finally:
            if timer.active():
                timer.cancel()
        if len(body) > self.max_size:
            raise FetchError("document too large")
        return body

    def close(self):
        return self.client._agent._pool.closeCachedConnections()
