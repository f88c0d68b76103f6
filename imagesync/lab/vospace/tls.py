"""The lab VOSpace service's TLS material: a certificate authority of its own, which signs a
server certificate for 127.0.0.1 and a client certificate (the lab's user).

Imported only when a service is prepared with TLS (``service.make_tls``): ``cryptography``
is not needed otherwise. Keys are P-256; certificates are valid ten years from five minutes
ago (a clock a little behind the lab's must not find them not yet valid).
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imagesync.lab import procs

_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imagesync lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


class CertificateAuthority:
    """A new CA (its key lives only in this object) that issues the lab's certificates."""

    def __init__(self) -> None:
        self.not_before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self.not_after = self.not_before + dt.timedelta(days=3650)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = _name("imagesync lab VOSpace CA")
        self.certificate = (
            self._builder(self._name, self._key, ca=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), False)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self, subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool
    ) -> x509.CertificateBuilder:
        """A certificate builder for ``subject``'s ``key``, issued by this CA."""
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    def issue(self, cn: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate, private key) in PEM for ``cn``: a server's (for 127.0.0.1 and
        localhost) or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(_name(cn), key, ca=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if server:
            names = [
                x509.IPAddress(ipaddress.ip_address(procs.LOOPBACK)),
                x509.DNSName("localhost"),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem
