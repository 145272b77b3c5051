"""
Certificates for the tests: a private certificate authority of the test's
own, and the server and client certificates it issues (EC P-256 keys,
SHA-256 signatures), so TLS is tested end to end with real verification:
a trusted chain, an unknown CA, a wrong host name, an expired certificate,
mutual TLS.
"""

import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host):
    if host.startswith("email:"):
        return x509.RFC822Name(host[len("email:") :])
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path, data, mode=0o600):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


class Issued:
    """A certificate and its key, issued by an L{Authority}."""

    def __init__(self, cert, key):
        self.cert = cert
        self.key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = _key_pem(key)

    @property
    def serial(self):
        return self.cert.serial_number

    def fingerprint(self):
        """The SHA-256 fingerprint of the certificate (bytes)."""
        return self.cert.fingerprint(hashes.SHA256())

    def write(self, directory, name):
        """C{<name>.crt} and C{<name>.key} in C{directory}: their paths."""
        return (
            _write(os.path.join(directory, name + ".crt"), self.cert_pem, 0o644),
            _write(os.path.join(directory, name + ".key"), self.key_pem),
        )

    def write_combined(self, directory, name):
        """C{<name>.pem} in C{directory}, the key then the certificate: its path."""
        return _write(os.path.join(directory, name + ".pem"), self.key_pem + self.cert_pem)


class Authority:
    """A private certificate authority, made afresh (a new key) for each instance."""

    def __init__(self, name="Clawdbot Test CA"):
        self.name = name
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory):
        """C{<slug>-ca.pem} (the CA's certificate) in C{directory}: its path."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "test"
        return _write(os.path.join(directory, slug + "-ca.pem"), self.cert_pem, 0o644)

    def issue(self, common_name, hosts=("localhost", "127.0.0.1"), client=False, days=30, expired=False):
        """
        A certificate for C{hosts} (DNS names and IP addresses, its
        subjectAltName; C{"email:..."} an email address), for a server or
        (C{client}) a client.

        @param expired: valid from ten days ago until yesterday.
        """
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            begin, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            begin, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(begin)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)
