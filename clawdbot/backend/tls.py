"""
TLS to an C{https://} backend: the client side of the handshake built from
C{backend.tls} (a private CA instead of the system's, a client certificate
for mutual TLS, the name the certificate must carry), and a failed
handshake told in plain words.

The certificate chain is verified by OpenSSL and the host name by
C{service_identity}, as L{twisted.internet.ssl.optionsForClientTLS} does;
the one difference is the verify callback, which also keeps I{why} a
certificate was refused (expired, an unknown CA, another host's), so the
log can say it.  There is no setting that turns verification off.
"""

from OpenSSL import SSL
from OpenSSL.crypto import FILETYPE_PEM
from OpenSSL.SSL import X509VerificationCodes as Codes
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet._idna import _idnaBytes
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, KeyPair, PrivateCertificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="clawdbot.ollama")

# What the client is told (curated: never OpenSSL's words).
CERTIFICATE_REFUSED = "the model backend's TLS certificate was not accepted"
CLIENT_REFUSED = "the model backend refused the gateway's TLS client authentication"
HANDSHAKE_FAILED = "the TLS handshake with the model backend failed"
HANDSHAKE_TIMED_OUT = "the TLS handshake with the model backend timed out"
SETUP_FAILED = "the gateway cannot set up TLS to the model backend"

UNKNOWN_CA = "its certificate is not signed by a trusted CA (unknown or untrusted CA; set backend.tls.ca_file to the CA that signed it)"

# OpenSSL's verification errors, in plain words (the log's reason).
_VERIFY_REASONS = {
    Codes.ERR_CERT_HAS_EXPIRED: "its certificate has expired",
    Codes.ERR_CERT_NOT_YET_VALID: "its certificate is not valid yet (check the clocks)",
    Codes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT: "its certificate is self-signed and not trusted (set backend.tls.ca_file to it)",
    Codes.ERR_SELF_SIGNED_CERT_IN_CHAIN: UNKNOWN_CA,
    Codes.ERR_UNABLE_TO_GET_ISSUER_CERT: UNKNOWN_CA,
    Codes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: UNKNOWN_CA,
    Codes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: UNKNOWN_CA,
    Codes.ERR_CERT_UNTRUSTED: UNKNOWN_CA,
    Codes.ERR_CERT_SIGNATURE_FAILURE: "its certificate's signature does not verify",
    Codes.ERR_CERT_REVOKED: "its certificate has been revoked",
    Codes.ERR_INVALID_PURPOSE: "its certificate is not one for a TLS server",
    Codes.ERR_INVALID_CA: "a CA certificate in its chain is not a valid CA",
    Codes.ERR_PATH_LENGTH_EXCEEDED: "its certificate chain is longer than its CA allows",
    Codes.ERR_CERT_CHAIN_TOO_LONG: "its certificate chain is too long",
}

# The backend's alerts (OpenSSL's reason text, in part) when it refused the gateway's side of mutual TLS.
_CLIENT_ALERTS = {
    "certificate required": "it requires a client certificate (mutual TLS) and none was sent: set backend.tls.client_cert and client_key",
    "unknown ca": "it refused the gateway's client certificate: not signed by a CA it trusts (mutual TLS handshake alert)",
    "bad certificate": "it refused the gateway's client certificate (mutual TLS handshake alert: bad certificate)",
    "certificate expired": "it refused the gateway's client certificate as expired (mutual TLS handshake alert)",
    "certificate revoked": "it refused the gateway's client certificate as revoked (mutual TLS handshake alert)",
    "unsupported certificate": "it refused the gateway's client certificate as unsupported (mutual TLS handshake alert)",
    "certificate unknown": "it refused the gateway's client certificate (mutual TLS handshake alert: certificate unknown)",
    "access denied": "it refused the gateway's client certificate (mutual TLS handshake alert: access denied)",
}


# service_identity's CertificateError (a certificate whose names cannot be
# used at all), by the start of its message, in plain words.
_NAME_REASONS = (
    # (No subjectAltName, or one with no DNS name and no IP address: only
    # an email address, a URI; service_identity says the same of both.)
    ("Certificate does not contain any", "its certificate has no DNS name or IP address in its subjectAltName (names in the CN alone are not accepted)"),
    ("Invalid DNS pattern", "its certificate has a DNS name that is not one (empty, or an IP address written as a DNS name: an address belongs in an IP address entry)"),
    ("Invalid IP address pattern", "its certificate has an IP address entry that is not an address"),
    ("Certificate's DNS-ID", "its certificate has a wildcard name that cannot be used (one * only, the whole left-most label, at least three labels: *.ollama.example)"),
)


def _name_reason(error):
    """Why a certificate's names cannot be checked (a L{CertificateError} of service_identity), in plain words."""
    text = str(error)
    for start, reason in _NAME_REASONS:
        if text.startswith(start):
            return reason
    return "its certificate's names cannot be read (a malformed subjectAltName)"


def tls_name(host):
    """C{host} (text) as TLS sends and checks it: lower case, no trailing dot."""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


class CertificateRejected(Exception):
    """
    The backend's certificate failed verification.

    @ivar reason: why, in plain words (for the log).
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class ClientTLS:
    """
    The TLS settings of one backend (a C{backend.tls} section, with its
    files already read: L{clawdbot.config.TLSMaterial}).

    @ivar identity: tells these settings from any others (a fingerprint of
        the trust, the client certificate and the server name): the
        endpoints and the pooled connections of one identity are never
        used under another, so a reload with new files starts afresh.
    """

    def __init__(self, tls):
        material = tls.material
        self.server_name = tls.server_name
        self._ca = material.ca if material is not None else ()
        self._chain = material.client_chain if material is not None else ()
        self._key = material.client_key if material is not None else None
        self.identity = material.fingerprint if material is not None else "system:" + (tls.server_name or "")
        self._trust = None
        self._client = None

    def __eq__(self, other):
        return isinstance(other, ClientTLS) and other.identity == self.identity

    def __hash__(self):
        return hash(self.identity)

    def creator(self, host):
        """
        The L{IOpenSSLClientConnectionCreator} for a connection to C{host}
        (text): verified against the private CA, or the system's trust;
        the name verified is C{server_name} when set, else C{host}.
        """
        if self._trust is None:
            certificates = [Certificate.loadPEM(pem) for pem in self._ca]
            self._trust = trustRootFromCertificates(certificates) if certificates else platformTrust()
            if self._key is not None:
                self._client = PrivateCertificate.fromCertificateAndKeyPair(Certificate.loadPEM(self._chain[0]), KeyPair.load(self._key, FILETYPE_PEM))
        extra = {"extraCertChain": [Certificate.loadPEM(pem).original for pem in self._chain[1:]]} if len(self._chain) > 1 else None
        name = tls_name(self.server_name or host)
        return NamedFailures(optionsForClientTLS(name, trustRoot=self._trust, clientCertificate=self._client, extraCertificateOptions=extra), name)


@implementer(IOpenSSLClientConnectionCreator)
class NamedFailures:
    """
    A client connection creator (L{optionsForClientTLS}'s) whose
    verification keeps its reason: the chain as OpenSSL verifies it, then
    the host name by C{service_identity}; the first failure ends the
    handshake with a L{CertificateRejected} saying why.
    """

    def __init__(self, creator, hostname):
        self.creator = creator
        self.hostname = hostname
        if isIPAddress(hostname) or isIPv6Address(hostname):
            self._identity = IPAddress_ID(hostname)
        else:
            # (service_identity takes an international name in its ASCII
            # form: encoded as Twisted encodes the name it sends.)
            self._identity = DNS_ID(_idnaBytes(hostname).decode("ascii"))

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self.creator.clientConnectionForTLS(tlsProtocol)
        protocol = [tlsProtocol]
        identity, hostname = self._identity, self.hostname

        def verify(conn, cert, code, depth, ok):
            try:
                if ok and depth == 0:
                    try:
                        verify_service_identity(extract_patterns(cert), [identity], [])
                    except VerificationError:
                        ok, reason = False, f"its certificate is not for the host name {hostname} (set backend.tls.server_name if it is for another name)"
                    except CertificateError as e:
                        # (Names service_identity will not match at all.)
                        ok, reason = False, _name_reason(e)
                elif not ok:
                    reason = _VERIFY_REASONS.get(code, f"its certificate was not accepted (OpenSSL verification error {code})")
                if not ok and protocol:
                    # (The first reason is the one the connection ends with.)
                    protocol.pop().failVerification(Failure(CertificateRejected(reason)))
                elif depth == 0:
                    protocol.clear()  # (verified: no reference to the protocol stays)
                return bool(ok)
            except BaseException:
                # (An exception in an OpenSSL callback would be lost: logged here, and the certificate refused.)
                log.failure("Verifying a backend's certificate failed")
                return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def _reasons(error):
    """The failures inside a request's failure (L{ResponseNeverReceived} and the like), and the error itself."""
    yield error
    for reason in getattr(error, "reasons", None) or ():
        yield reason.value if isinstance(reason, Failure) else reason


def tls_failure(error):
    """
    What a failed backend call says about TLS: C{(details, reason)}, the
    curated details for the client's 502 and the reason in plain words for
    the log, or C{None} when TLS is not what failed.
    """
    for value in _reasons(error):
        if isinstance(value, CertificateRejected):
            return CERTIFICATE_REFUSED, value.reason
        if isinstance(value, VerificationError):
            return CERTIFICATE_REFUSED, "its certificate is not for this host name"
        if isinstance(value, SSL.Error):
            return _ssl_error(value)
    return None


def _ssl_error(error):
    """C{(details, reason)} for an error OpenSSL raised during the handshake."""
    texts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else ():
        if isinstance(item, tuple) and item:
            texts.append(str(item[-1]).lower())
    text = "; ".join(texts)
    for alert, reason in _CLIENT_ALERTS.items():
        if alert in text and "alert" in text:
            return CLIENT_REFUSED, reason
    if "certificate verify failed" in text:
        return CERTIFICATE_REFUSED, "its certificate was not accepted"
    if "wrong version number" in text or "packet length too long" in text or "http request" in text or "record layer failure" in text:
        return HANDSHAKE_FAILED, "it does not speak TLS on this port (is the URL's scheme right?)"
    if "alert" in text:
        return HANDSHAKE_FAILED, f"it ended the TLS handshake with an alert ({text})"
    return HANDSHAKE_FAILED, f"the TLS handshake failed ({text or 'no reason given'})"
