"""
Names on the network, checked: hosts, authorities and origins as browsers
and HTTP send them, loopback, Twisted strports descriptions, the quiet
connection pool the identity providers' client uses, and writing to a TCP
connection at once (L{send_now}).

A leaf: it imports nothing from the package, so the config, the HTTP layer
and the clients share one reading of each of these.
"""

import functools
import ipaddress
import re
import urllib.parse
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

# --- HTTP methods ----------------------------------------------------------------

METHOD_ORDER = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
KNOWN_METHODS = frozenset(METHOD_ORDER)


# --- hosts and authorities -------------------------------------------------------

# RFC 3986 section 3.2.2 and RFC 9110 section 7.2: host = IP-literal /
# IPv4address / reg-name, then an optional port.  Nothing else: no userinfo,
# no path, no whitespace.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]{0,5}))?")


def split_authority(value: str | bytes) -> tuple[str, int | None] | None:
    """
    C{(host, port)} of a C{Host} value or an origin's C{host[:port]}, the
    host lower-cased and the port an C{int} or C{None}; C{None} when
    C{value} is not one.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    match = _AUTHORITY.fullmatch(value)
    if match is None:
        return None
    host, port = match.groups()
    if port and int(port) > 65535:
        return None
    return host.lower(), (int(port) if port else None)


def valid_host(value: str | bytes) -> bool:
    """A C{Host} value a server may accept: empty (no authority) or C{host[:port]}."""
    return value in (b"", "") or split_authority(value) is not None


def is_loopback_host(host: str) -> bool:
    """
    The literal C{localhost}, or a host that parses as a loopback IP address
    (C{127.0.0.1}, C{[::1]}).  A name that merely starts with C{127.}, a
    short or hex form (C{127.1}, C{0x7f.1}), a trailing dot: all refused.
    """
    if host == "localhost":
        return True
    try:
        if host.startswith("[") and host.endswith("]"):
            address = ipaddress.IPv6Address(host[1:-1])
            mapped = address.ipv4_mapped
            return address.is_loopback or (mapped is not None and mapped.is_loopback)
        return ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        return False


def loopback_authority(value: str | bytes) -> bool:
    """C{value} is C{host[:port]} and its host is loopback (L{is_loopback_host})."""
    parsed = split_authority(value)
    return parsed is not None and is_loopback_host(parsed[0])


def loopback_origin(origin: str | bytes) -> bool:
    """
    An C{Origin} of a page on this machine: exactly C{http://} or
    C{https://} and a loopback C{host[:port]}; no path, no userinfo.
    """
    if isinstance(origin, bytes):
        origin = origin.decode("latin-1")
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme.lower() in ("http", "https") and loopback_authority(rest)


# --- origins ---------------------------------------------------------------------

def origin_of(url: str) -> str:
    """C{scheme://host[:port]} as a browser sends it in C{Origin}."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


# A host as a browser writes it in an origin: an IPv6 literal, or dot-separated
# labels of letters, digits, '-' and '_' (neither empty nor dashed at an end).
_ORIGIN_HOST = re.compile(r"\[[0-9a-f:.]+\]|(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# A last label a browser reads as a number, making the host an IPv4 address.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def web_origin(text: str) -> str:
    """
    C{text} as a browser writes an origin in C{Origin}: C{http://} or
    C{https://}, a host and an optional port; scheme and host in lower case,
    an IPv6 address in its short form, a default port left out.

    @raise ValueError: with the reason when C{text} is not one such origin.
    """
    if "*" in text or text == "null":
        raise ValueError(f"{text!r} is not allowed: list each origin that may call the gateway")
    if not re.fullmatch(r"[!-~]+", text):
        raise ValueError("must not contain spaces, control characters or non-ASCII characters (an international name in its xn-- form)")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError("must start with http:// or https://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if rest[len(authority) :] == "/":
        raise ValueError("must not end with a slash (an origin has no path: https://app.example.com)")
    if rest != authority:
        raise ValueError("must be an origin only, without a path, query or fragment (https://app.example.com)")
    if "@" in authority:
        raise ValueError("must not contain credentials (user@)")
    host, port = re.fullmatch(r"(.*?)(?::([0-9]{1,5}))?", authority.lower()).groups()  # type: ignore[union-attr]  # matches any text
    if not _ORIGIN_HOST.fullmatch(host) or (port is not None and not 0 < int(port) <= 65535):
        raise ValueError("must be scheme://host or scheme://host:port, with a host name or IP address and a port from 1 to 65535")
    try:
        if host.startswith("["):
            host = "[" + str(ipaddress.IPv6Address(host[1:-1])) + "]"
        elif _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            # A browser reads it as IPv4 (127.1, 0x7f000001 too) and sends
            # the dotted form: only that form can ever match.
            host = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ValueError("has a host that is neither a name nor an IP address (write IPv4 as four decimal numbers)") from None
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


# --- the client behind a proxy ---------------------------------------------------


def ip_network_text(text: str) -> str:
    """
    C{text} as an IP network (C{10.0.0.0/8}; a plain address is a /32 or
    /128), in its normal form.

    @raise ValueError: with the reason when it is not one.
    """
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError("must be an IP address or a CIDR network such as 10.0.0.0/8") from None


@functools.lru_cache(maxsize=64)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in trusted)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a proxy header writes it (C{1.2.3.4}, C{[::1]}, C{"[::1]:443"}, C{1.2.3.4:80}), or C{None}."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":")[0]
    if "%" in text:
        return None  # a zone id: local to the sender, and free text
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return address


def _forwarded_for(values: list[bytes]) -> list[str]:
    """The C{for=} of each element of C{Forwarded} headers (RFC 7239), in order; C{""} where one has none."""
    hops = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            found = ""
            for pair in element.split(";"):
                name, _, content = pair.strip().partition("=")
                if name.lower() == "for":
                    found = content
            hops.append(found)
    return hops


def client_address(peer: str | None, forwarded_for: list[bytes], forwarded: list[bytes], trusted: tuple[str, ...]) -> str | None:
    """
    The client's address for per-address limits and logs (never for
    authentication): the peer, unless the peer is one of the C{trusted}
    proxies; then the right-most hop of C{X-Forwarded-For} (or, when a proxy
    sends none, of C{Forwarded}) that is not a trusted proxy.  The proxy
    must set or clear both headers (the nginx example does), since a
    client's own would otherwise pass through.  A hop that is not an
    address ends the walk at the last trusted one, so a forged header can
    only make the client look like the proxy, never like someone else.

    @param trusted: C{server.trusted_proxies} (networks, normal form).
    """
    networks = _networks(trusted)
    address = _address(peer or "")
    if address is None or not any(address in n for n in networks):
        return peer
    if forwarded_for:
        hops = [hop for value in forwarded_for for hop in value.decode("latin-1").split(",")]
    else:
        hops = _forwarded_for(forwarded)
    client = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return client
        client = str(address)
        if not any(address in n for n in networks):
            return client
    return client


# --- strports and listen addresses -----------------------------------------------

_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def _strport_parts(description: str) -> list[str]:
    """Split a strports description on colons that are not escaped."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def strport_fields(description: str) -> list[str]:
    """
    The fields of a strports description, split on the colons that are not
    escaped, escapes removed: C{["ssl", "8443", "privateKey=/k.pem"]}.
    """
    return _strport_parts(description)


def strport_interface(description: str) -> str | None:
    """
    The C{interface=} of a Twisted strports description, or C{None} when it
    binds every address.
    """
    for part in _strport_parts(description)[1:]:
        if part.startswith("interface="):
            return part[len("interface=") :]
    return None


def strport_port(description: str) -> int | None:
    """The port number of a C{tcp:PORT:...} description, or C{None}."""
    parts = _strport_parts(description)
    if len(parts) > 1 and parts[0] in ("tcp", "tcp6", "ssl"):
        for part in parts[1:]:
            if is_decimal(part):
                return int(part)
            if part.startswith("port="):
                return int(part[5:]) if is_decimal(part[5:]) else None
    elif is_decimal(parts[0]):
        return int(parts[0])
    return None


def is_decimal(text: str) -> bool:
    # ASCII digits only: str.isdigit() is also true of "²", which int() refuses.
    return text.isascii() and text.isdigit() and len(text) <= 10


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- outbound connections --------------------------------------------------------

class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_pool(reactor: Any, size: int) -> HTTPConnectionPool:
    """A persistent connection pool that does not log every connection."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = size
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory
    return pool


# --- writing now ------------------------------------------------------------------

# The reactor's own TCP transports: what send_now may write to directly.
_TCP = (tcp.Server, tcp.Client)


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it at once when the transport is
    a plain TCP connection with nothing waiting in its buffer.

    A transport's C{write} only buffers: the reactor then watches the socket
    for room, sends in its next turn and stops watching, two C{epoll_ctl}
    calls and a turn of the loop for every write.  For a stream's chunks,
    one per token and each alone in its turn, that is about a tenth of the
    gateway's CPU per chunk (C{bench/run.py --chunk-only --profile}).  What
    the socket does not take (a slow reader), and anything written while
    bytes are still buffered, goes the reactor's way, in order, with its
    backpressure; so does every error, which the reactor then reports.
    A connection that is closing, aborted or switched to TLS
    (C{startTLS}) is left to its transport, and so is every connection of
    an C{ssl:} listener, whose transport is the TLS layer
    (L{clawdbot.server_tls}), not a plain TCP one.
    """
    if (
        type(transport) not in _TCP
        or transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
        or transport._writeDisconnected
        or transport.TLS
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        transport.write(data)  # (the reactor meets the error and closes the connection)
        return
    if sent < len(data):
        transport.write(data[sent:])


class Discard(Protocol):
    """Drops a body that will not be read, and closes its connection."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()
