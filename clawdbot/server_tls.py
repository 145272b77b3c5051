"""
The secure listener over TLS without nginx: C{server.listen:
"ssl:8443:privateKey=KEY:certKey=CERT"}, read by the gateway itself.

Twisted's own C{ssl:} strports parser would load the files once, keep only
the first certificate of C{certKey} and report a bad file with a library
message; here the description is read into L{TLSListen}, the files are
checked with a curated reason for each way they can be wrong
(L{load_certificate}, also used by the config's validation), and the
listener's connections are made by a L{ReloadableCertificate}, whose
certificate a reload replaces: connections already open keep the
TLS session they have, new ones get the new certificate.

The protocols are Twisted's L{CertificateOptions} defaults, TLS 1.2 and
1.3 only, with no compression and the server's preference; the ciphers are
narrowed to L{CIPHERS}: over TLS 1.2, ECDHE with AES-GCM or ChaCha20-Poly1305
alone (no CBC suite; TLS 1.3 has only AEAD ones).  By ALPN only
C{http/1.1} is offered (L{clawdbot.http.site.GatewaySite.acceptableProtocols}),
so clients speak HTTP/1.1, with keep-alive.

A leaf: it imports nothing from the package but L{clawdbot.net}.
"""

import dataclasses
import datetime
import errno
import os
import re
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import defer
from twisted.internet._idna import _idnaBytes
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from clawdbot.net import is_decimal, strport_fields

log = Logger(namespace="clawdbot.tls")

# The listener's TLS 1.2 ciphers (OpenSSL's cipher-list syntax): ECDHE key
# exchange and an AEAD cipher only.  TLS 1.3's own suites are all AEAD.
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString("ECDHE+AESGCM:ECDHE+CHACHA20")
# A key, certificate or CA file is read up to this size (a PEM file is far smaller).
MAX_PEM_BYTES = 1024 * 1024


class FileRefused(ValueError):
    """A file that is no regular file, or too large: the message says which (L{read_small_file})."""


def read_small_file(path: str, limit: int = MAX_PEM_BYTES) -> bytes:
    """
    The contents of the regular file at C{path}, at most C{limit} bytes,
    read without blocking: a FIFO or a device (C{/dev/zero}) is refused
    before a byte is read, as is a larger file; a reload reading it on the
    reactor can neither hang nor fill the memory.

    @raise OSError: when it cannot be opened (C{IsADirectoryError} for a directory).
    @raise FileRefused: when it is not a regular file or is larger than C{limit}.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise FileRefused("is not a regular file (a FIFO, a socket or a device)")
        parts, size = [], 0
        while size <= limit:
            data = os.read(fd, limit + 1 - size)
            if not data:
                break
            parts.append(data)
            size += len(data)
        if size > limit:
            raise FileRefused(f"is larger than {limit // 1024} KiB")
        return b"".join(parts)
    finally:
        os.close(fd)


def tls_host_name(text: str) -> str:
    """
    C{text}, a host name or an IP address, as a TLS client sends and checks
    it: lower case, without a trailing dot, and one Twisted's encoder (IDNA
    2008, as it encodes the name it sends and verifies) takes.

    @raise ValueError: with the reason it cannot be used.
    """
    name = text.lower()
    name = name[:-1] if name.endswith(".") else name
    if isIPAddress(name) or isIPv6Address(name):
        return name
    if not name or "_" in name:
        raise ValueError("is not a host name a certificate can be checked against (letters, digits and hyphens in each label; no underscore)")
    try:
        _idnaBytes(name)
    except (UnicodeError, ValueError):
        raise ValueError("is not a host name a certificate can be checked against (each label letters, digits and hyphens, or a valid international name)") from None
    return name


class TLSConfigError(ValueError):
    """
    An C{ssl:} description or its files cannot be used; the message is the
    curated reason (a path and what is wrong with it, never a library's text).
    """


@dataclasses.dataclass(frozen=True)
class TLSListen:
    """
    An C{ssl:} listen description, read.

    @ivar key_path: C{privateKey=}, the PEM private key (unencrypted).
    @ivar cert_path: C{certKey=}, the PEM certificate, optionally followed by
        its chain (a C{fullchain.pem}); the key file itself when not given.
    @ivar chain_path: C{extraCertChain=}, more chain certificates, or C{None}.
    """

    port: int
    interface: str
    backlog: int
    key_path: str
    cert_path: str
    chain_path: str | None


# The options an ssl: description may name; Twisted's others (sslmethod,
# dhParameters) are refused: the protocols are fixed at TLS 1.2 and up, and
# the ECDHE key exchange needs no Diffie-Hellman parameters.
_NAMES = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}


def is_tls(description: str) -> bool:
    """Whether a listen description is an C{ssl:} one."""
    return strport_fields(description)[0] == "ssl"


def parse_tls(description: str) -> TLSListen:
    """
    Read an C{ssl:PORT:privateKey=KEY[:certKey=CERT][:extraCertChain=CHAIN]
    [:interface=ADDR][:backlog=N]} description (colons in a path escaped as
    C{\\:}, as strports has them).

    @raise TLSConfigError: with what is wrong with it.
    """
    fields = strport_fields(description)
    if fields[0] != "ssl":
        raise TLSConfigError("is not an ssl: description")
    options: dict[str, str] = {}
    positional = []
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if not equals:
            positional.append(field)
            continue
        if name in ("sslmethod", "dhParameters"):
            raise TLSConfigError(f"{name}= is not supported: the gateway offers TLS 1.2 (ECDHE with AES-GCM or ChaCha20 only) and TLS 1.3")
        if name not in _NAMES:
            raise TLSConfigError(f"{name}= is not an option of an ssl: listener (privateKey, certKey, extraCertChain, interface, backlog)")
        if name in options:
            raise TLSConfigError(f"{name}= is given twice")
        options[name] = value
    if positional:
        if "port" in options or len(positional) > 1:
            raise TLSConfigError("name every option after the port (privateKey=KEY:certKey=CERT)")
        options["port"] = positional[0]
    port = options.get("port", "")
    if not is_decimal(port) or int(port) > 65535:
        raise TLSConfigError("has no valid port")
    backlog = options.get("backlog", "50")
    if not is_decimal(backlog) or not 1 <= int(backlog) <= 65535:
        raise TLSConfigError("backlog= must be a number from 1 to 65535")
    key_path = options.get("privateKey", "")
    if not key_path:
        raise TLSConfigError("needs privateKey=PATH (and certKey=PATH unless the key file holds the certificate too)")
    for name in ("certKey", "extraCertChain"):
        if name in options and not options[name]:
            raise TLSConfigError(f"{name}= is empty")
    return TLSListen(
        port=int(port),
        interface=options.get("interface", ""),
        backlog=int(backlog),
        key_path=key_path,
        cert_path=options.get("certKey", key_path),
        chain_path=options.get("extraCertChain"),
    )


# --- the files ---------------------------------------------------------------------

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")


def _read(path: str, what: str) -> bytes:
    try:
        return read_small_file(path)
    except FileRefused as e:
        raise TLSConfigError(f"the {what} file {path} {e}") from None
    except OSError as e:
        if e.errno == errno.ENOENT:
            why = "does not exist"
        elif e.errno in (errno.EACCES, errno.EPERM):
            why = "is not readable by this user (permission denied)"
        elif e.errno == errno.EISDIR:
            why = "is a directory"
        else:
            why = "cannot be read"
        raise TLSConfigError(f"the {what} file {path} {why}") from None


def _blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The PEM blocks of C{data}: C{(label, whole block)}, in order."""
    return [(m.group(1), m.group(0)) for m in _PEM.finditer(data)]


def _private_key(path: str) -> Any:
    blocks = _blocks(_read(path, "private key"))
    if any(label == b"ENCRYPTED PRIVATE KEY" for label, _ in blocks) or any(b"Proc-Type: 4,ENCRYPTED" in block for _, block in blocks):
        raise TLSConfigError(f"the private key in {path} is encrypted; the gateway needs it unencrypted (readable by its user only)")
    keys = [block for label, block in blocks if label in _KEY_LABELS]
    if not keys:
        raise TLSConfigError(f"{path} holds no PEM private key")
    if len(keys) > 1:
        raise TLSConfigError(f"{path} holds more than one private key")
    try:
        return serialization.load_pem_private_key(keys[0], password=None)
    except Exception:
        raise TLSConfigError(f"the private key in {path} cannot be parsed") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    blocks = [block for label, block in _blocks(_read(path, what)) if label == b"CERTIFICATE"]
    if not blocks:
        raise TLSConfigError(f"{path} holds no PEM certificate")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except Exception:
        raise TLSConfigError(f"a certificate in {path} cannot be parsed") from None


def _public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclasses.dataclass(frozen=True)
class LoadedCertificate:
    """
    A certificate with its key and chain, checked: what a listener serves.

    @ivar options: the L{CertificateOptions} connections are made with.
    @ivar fingerprint: the SHA-256 fingerprint of the leaf, as hex.
    """

    options: CertificateOptions
    fingerprint: str
    serial: int
    not_after: datetime.datetime
    cert_path: str

    def expired(self, now: datetime.datetime | None = None) -> bool:
        """Whether the leaf certificate is past its C{notAfter}."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return self.not_after < now


def load_certificate(listen: TLSListen) -> LoadedCertificate:
    """
    Read and check the files of an C{ssl:} listener: the key parses and is
    not encrypted, the certificate file starts with a certificate (any
    more are its chain, as in a C{fullchain.pem}), and that certificate is
    the key's.

    @raise TLSConfigError: with the file and what is wrong with it.
    """
    key = _private_key(listen.key_path)
    certificates = _certificates(listen.cert_path, "certificate")
    leaf, chain = certificates[0], certificates[1:]
    if listen.chain_path is not None:
        chain += _certificates(listen.chain_path, "certificate chain")
    if _public(leaf) != _public(key):
        raise TLSConfigError(f"the certificate in {listen.cert_path} does not match the private key in {listen.key_path}")
    try:
        # (cryptography's objects: pyOpenSSL, which CertificateOptions hands
        # them to, takes them, and has deprecated its own X509 and PKey.)
        options = CertificateOptions(privateKey=key, certificate=leaf, extraCertChain=chain, acceptableCiphers=CIPHERS)
        # Made now, so that whatever OpenSSL refuses (a key type or size
        # below its security level) is known before the certificate is used.
        options.getContext()
    except Exception:
        raise TLSConfigError(f"the certificate in {listen.cert_path} or its key cannot be used by OpenSSL") from None
    return LoadedCertificate(
        options=options,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
        cert_path=listen.cert_path,
    )


def check_tls(description: str) -> list[str]:
    """
    Check an C{ssl:} description and its files, as the config's validation
    does at start and at every reload.

    @return: warnings (an expired certificate).
    @raise TLSConfigError: with what is wrong.
    """
    loaded = load_certificate(parse_tls(description))
    if loaded.expired():
        return [f"the certificate in {loaded.cert_path} expired on {loaded.not_after:%Y-%m-%d %H:%M} UTC"]
    return []


# --- the listener ----------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableCertificate:
    """
    Makes each new server connection with the certificate in use, which
    L{reload} replaces; a connection keeps the context it was made with.

    @ivar current: the L{LoadedCertificate} new connections get.
    """

    def __init__(self, listen: TLSListen, name: str = "server.listen") -> None:
        self.listen = listen
        self.name = name
        self.current = load_certificate(listen)

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.current.options.serverConnectionForTLS(protocol)

    def reload(self) -> bool:
        """
        Read the files again.  A certificate that changed is used for new
        connections from now on; files that cannot be used keep the one in
        use, with one error line saying why.

        @return: whether the files could be used.
        """
        try:
            loaded = load_certificate(self.listen)
        except TLSConfigError as e:
            log.error("TLS certificate of {name} not reloaded, still serving the previous one: {reason}", name=self.name, reason=str(e))
            return False
        # (Replaced even when the leaf is the same: its chain may be new.)
        previous, self.current = self.current, loaded
        if loaded.fingerprint != previous.fingerprint:
            log.info(
                "TLS certificate of {name} reloaded from {file}: serial {serial:x}, valid until {not_after}",
                name=self.name,
                file=loaded.cert_path,
                serial=loaded.serial,
                not_after=f"{loaded.not_after:%Y-%m-%d %H:%M} UTC",
            )
        return True


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    A TCP listener whose connections speak TLS made by a
    L{ReloadableCertificate} (what Twisted's C{SSL4ServerEndpoint} does with
    a fixed context).
    """

    def __init__(self, reactor: Any, listen: TLSListen, certificate: ReloadableCertificate) -> None:
        self.reactor = reactor
        self.listen_on = listen
        self.certificate = certificate

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def start() -> Any:
            wrapped = TLSMemoryBIOFactory(self.certificate, False, factory)
            port = self.reactor.listenTCP(self.listen_on.port, wrapped, self.listen_on.backlog, self.listen_on.interface)
            port._type = "TLS"
            return port

        return defer.execute(start)
