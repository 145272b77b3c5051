"""
The Ollama client: one connection pool, per-call timeouts, and the
concurrency cap with its fair wait queue.
"""

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseFailed, readBody
from twisted.web.http_headers import Headers

from clawdbot.backend import quiet_pool

log = Logger(namespace="clawdbot.ollama")


class Ollama:
    """
    @param gateway: gives the current config (C{gateway.config}).
    """

    def __init__(self, reactor, gateway):
        self.reactor = reactor
        self.gateway = gateway
        self.pool = quiet_pool(reactor, 64)

    def agent(self, config):
        return Agent(self.reactor, pool=self.pool, connectTimeout=config.backend.connect_timeout)

    async def check(self):
        """
        C{None} when Ollama answers C{/api/version}, else a short reason.
        """
        config = self.gateway.config
        url = (config.backend.url.rstrip("/") + "/api/version").encode()
        d = self.agent(config).request(b"GET", url, Headers({b"user-agent": [b"clawdbot"]}))
        timer = self.reactor.callLater(config.backend.connect_timeout, d.cancel)
        try:
            response = await d
            await readBody(response)
        except (ConnectError, DNSLookupError) as e:
            return "not reachable (connection refused)" if "refused" in str(e).lower() else "not reachable"
        except (TimeoutError, ConnectingCancelledError, CancelledError):
            return "not reachable (timed out)"
        except ResponseFailed:
            return "not reachable (connection failed)"
        finally:
            if timer.active():
                timer.cancel()
        if response.code != 200:
            return f"answered status {response.code}"
        return None

    def close(self):
        return self.pool.closeCachedConnections()
