"""The cluster CA and node certificates (X.509, ECDSA P-256, via cryptography).

`meshmail init` makes the CA; a master that admits a join signs the new node's CSR. A node
certificate names the node (CN) and its role (OU), so a joining server can insist that the
peer it sends its token to is a master of the pinned CA, not merely some member.
The CA is pinned by the SHA-256 of its DER certificate, as kubeadm and k3s do.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..core.errors import MeshmailError
from ..core.nodes import ROLES

CA_DAYS = 3650
NODE_DAYS = 1825
#: Largest CSR accepted in a join request (PEM text).
MAX_CSR = 16 * 1024


class CertificateError(MeshmailError, ValueError):
    """A CSR or certificate that cannot be used; str() says why in one line."""


@attrs.frozen
class Authority:
    """The cluster CA: its certificate, and its key on masters (None elsewhere)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None = attrs.field(default=None, repr=False)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert)


def fingerprint(cert: x509.Certificate) -> bytes:
    """The SHA-256 of a certificate's DER form: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def show_fingerprint(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_authority(cluster: str) -> Authority:
    """A fresh self-signed CA for the cluster named `cluster`."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshmail CA {cluster}"[:64])])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def new_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM certificate signing request for node `name`."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_node(authority: Authority, public_key, name: str, role: str, hosts: list[str]) -> x509.Certificate:
    """A certificate for node `name` with role `role`, valid for the IP addresses and DNS names
    in `hosts` (and localhost, for the node's own CLI)."""
    if authority.key is None:
        raise CertificateError("this node does not hold the cluster CA key (only masters sign)")
    if role not in ROLES:
        raise CertificateError(f"unknown role {role!r}")
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in hosts:
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            general = x509.DNSName(host)
        if general not in names:
            names.append(general)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=NODE_DAYS), authority.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.cert.public_key()), critical=False)
        .sign(authority.key, hashes.SHA256())
    )


def read_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """A CSR from a join request: bounded, parsed, self-signature checked, a key type we accept."""
    if isinstance(pem, str):
        pem = pem.encode("ascii", "replace")
    if not isinstance(pem, bytes) or len(pem) > MAX_CSR:
        raise CertificateError(f"the CSR must be PEM text of at most {MAX_CSR} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
        valid = csr.is_signature_valid
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError("the CSR is not a valid PEM certificate request") from None
    if not valid:
        raise CertificateError("the CSR's signature does not match its key")
    key = csr.public_key()
    acceptable = (
        isinstance(key, ec.EllipticCurvePublicKey)
        and key.curve.name in ("secp256r1", "secp384r1")
        or isinstance(key, ed25519.Ed25519PublicKey)
        or isinstance(key, rsa.RSAPublicKey)
        and key.key_size >= 2048
    )
    if not acceptable:
        raise CertificateError("the CSR's key must be ECDSA P-256/P-384, Ed25519 or RSA of 2048 bits or more")
    return csr


def subject_role(cert: x509.Certificate) -> tuple[str, str]:
    """(node name, role) of a node certificate; ("", "") when it names none."""

    def first(oid) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    return first(NameOID.COMMON_NAME), first(NameOID.ORGANIZATIONAL_UNIT_NAME)


def verify_issued(authority: Authority, cert: x509.Certificate) -> None:
    """Raise CertificateError unless `cert` was signed by the cluster CA and is in its validity."""
    try:
        cert.verify_directly_issued_by(authority.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError("the certificate was not issued by this cluster's CA") from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError("the certificate is expired or not yet valid")


# --- PEM ---------------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CertificateError("not a PEM certificate") from None


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise CertificateError("not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the key is not an ECDSA key")
    return key
