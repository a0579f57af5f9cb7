"""The cluster CA: CSRs read strictly (signature, size, key type), node certificates with the
right names, and real TLS handshakes with the standard library's ssl module trusting only the CA."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshmail.security import ca
from meshmail.security.ca import CertificateError


@pytest.fixture(scope="module")
def authority() -> ca.Authority:
    return ca.new_authority("test")


@pytest.fixture(scope="module")
def other_authority() -> ca.Authority:
    return ca.new_authority("other")


SHA256 = hashes.SHA256()


def csr_for(key, name: str = "node1", algorithm=SHA256) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm).public_bytes(
        serialization.Encoding.PEM
    )


def pem_to_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def der_to_pem(der: bytes) -> bytes:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n".encode()


# --- the authority ---------------------------------------------------------------------------


def test_new_authority(authority):
    cert = authority.cert
    assert cert.subject == cert.issuer
    assert "test" in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert isinstance(authority.key, ec.EllipticCurvePrivateKey) and authority.key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)
    assert "key" not in repr(authority).replace("public_key", "")  # the CA key is not in the repr


def test_fingerprint_is_sha256_of_der(authority):
    der = authority.cert.public_bytes(serialization.Encoding.DER)
    assert authority.fingerprint == hashlib.sha256(der).digest() == ca.fingerprint(authority.cert)
    assert ca.show_fingerprint(authority.fingerprint) == "sha256:" + hashlib.sha256(der).hexdigest()


def test_long_cluster_name_fits_common_name():
    authority = ca.new_authority("c" * 200)
    assert len(authority.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value) == 64


def test_pem_round_trips(authority):
    assert ca.load_cert(ca.cert_pem(authority.cert)) == authority.cert
    key = ca.load_key(ca.key_pem(authority.key))
    assert key.private_numbers() == authority.key.private_numbers()


@pytest.mark.parametrize("pem", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_load_cert_and_key_refuse_garbage(pem):
    with pytest.raises(CertificateError):
        ca.load_cert(pem)
    with pytest.raises(CertificateError):
        ca.load_key(pem)


def test_load_key_refuses_non_ecdsa():
    with pytest.raises(CertificateError, match="not an ECDSA key"):
        ca.load_key(ca.key_pem(ed25519.Ed25519PrivateKey.generate()))


# --- reading CSRs ----------------------------------------------------------------------------


def test_new_csr_read_back():
    key = ca.new_key()
    csr = ca.read_csr(ca.new_csr(key, "node1"))
    assert csr.public_key() == key.public_key()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1"
    # As text too (a join request carries it in JSON).
    assert ca.read_csr(ca.new_csr(key, "node1").decode()).public_key() == key.public_key()


def test_csr_with_broken_signature():
    der = bytearray(pem_to_der(ca.new_csr(ca.new_key(), "node1")))
    der[-1] ^= 0x01  # the last byte of the signature's s integer
    with pytest.raises(CertificateError, match="signature"):
        ca.read_csr(der_to_pem(bytes(der)))


def test_csr_with_changed_subject_fails_signature():
    der = pem_to_der(ca.new_csr(ca.new_key(), "node1"))
    assert der.count(b"node1") == 1
    with pytest.raises(CertificateError, match="signature"):
        ca.read_csr(der_to_pem(der.replace(b"node1", b"node2")))


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        "",
        b"garbage",
        "not a pem at all \u2603",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        None,
        123,
        ["-----BEGIN CERTIFICATE REQUEST-----"],
    ],
    ids=repr,
)
def test_garbage_csr(pem):
    with pytest.raises(CertificateError) as info:
        ca.read_csr(pem)
    assert "\n" not in str(info.value)


def test_certificate_is_not_a_csr(authority):
    with pytest.raises(CertificateError):
        ca.read_csr(ca.cert_pem(authority.cert))


def test_oversize_csr():
    pem = ca.new_csr(ca.new_key(), "node1")
    padded = pem + b"\n" * (ca.MAX_CSR - len(pem))
    assert ca.read_csr(padded)  # exactly MAX_CSR bytes is fine
    with pytest.raises(CertificateError, match=str(ca.MAX_CSR)):
        ca.read_csr(padded + b"\n")
    with pytest.raises(CertificateError):
        ca.read_csr("x" * (10 * ca.MAX_CSR))


@pytest.fixture(scope="module")
def rsa_1024():
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def rsa_2048():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rsa_1024_csr_refused(rsa_1024):
    with pytest.raises(CertificateError, match="RSA of 2048"):
        ca.read_csr(csr_for(rsa_1024))


def test_rsa_2048_csr_accepted(rsa_2048):
    assert ca.read_csr(csr_for(rsa_2048)).public_key().key_size == 2048


def test_ed25519_csr_accepted(authority):
    key = ed25519.Ed25519PrivateKey.generate()
    csr = ca.read_csr(csr_for(key, algorithm=None))
    assert isinstance(csr.public_key(), ed25519.Ed25519PublicKey)
    cert = ca.sign_node(authority, csr.public_key(), "edge", "slave", [])
    ca.verify_issued(authority, cert)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=lambda c: c.name)
def test_ecdsa_curves_accepted(curve):
    ca.read_csr(csr_for(ec.generate_private_key(curve)))


@pytest.mark.parametrize(
    "make_key, algorithm",
    [
        (lambda: ec.generate_private_key(ec.SECP521R1()), hashes.SHA256()),
        (lambda: ec.generate_private_key(ec.SECP256K1()), hashes.SHA256()),
        (lambda: ed448.Ed448PrivateKey.generate(), None),
        (lambda: dsa.generate_private_key(key_size=2048), hashes.SHA256()),
    ],
    ids=["p521", "secp256k1", "ed448", "dsa"],
)
def test_other_key_types_refused(make_key, algorithm):
    with pytest.raises(CertificateError, match="key must be"):
        ca.read_csr(csr_for(make_key(), algorithm=algorithm))


# --- signing and checking node certificates ---------------------------------------------------


def test_sign_node(authority):
    key = ca.new_key()
    csr = ca.read_csr(ca.new_csr(key, "m2"))
    hosts = ["10.0.0.2", "m2.example.org", "::1", "127.0.0.1", "localhost", "m2.example.org"]
    cert = ca.sign_node(authority, csr.public_key(), "m2", "master", hosts)
    ca.verify_issued(authority, cert)
    assert cert.public_key() == key.public_key()
    assert cert.issuer == authority.cert.subject
    assert ca.subject_role(cert) == ("m2", "master")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "m2.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.2"),
        ipaddress.ip_address("::1"),
    ]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not constraints.ca
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc <= authority.cert.not_valid_after_utc


def test_sign_node_without_hosts_has_localhost(authority):
    cert = ca.sign_node(authority, ca.new_key().public_key(), "s1", "slave", [])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.subject_role(cert) == ("s1", "slave")


def test_sign_node_refusals(authority):
    public_key = ca.new_key().public_key()
    with pytest.raises(CertificateError, match="role"):
        ca.sign_node(authority, public_key, "n", "admin", [])
    with pytest.raises(CertificateError, match="CA key"):
        ca.sign_node(ca.Authority(authority.cert), public_key, "n", "slave", [])


def test_subject_role_of_foreign_certificate(authority):
    assert ca.subject_role(authority.cert)[1] == ""
    bare = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.cert.subject)
        .public_key(ca.new_key().public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2030, 1, 1))
        .sign(authority.key, hashes.SHA256())
    )
    assert ca.subject_role(bare) == ("", "")


def test_verify_issued_refuses_other_authority(authority, other_authority):
    cert = ca.sign_node(other_authority, ca.new_key().public_key(), "m9", "master", [])
    with pytest.raises(CertificateError, match="not issued"):
        ca.verify_issued(authority, cert)
    with pytest.raises(CertificateError):
        ca.verify_issued(authority, other_authority.cert)
    ca.verify_issued(other_authority, cert)


def test_verify_issued_refuses_same_name_other_key(authority):
    """A CA that copies our CA's subject name but not its key is still refused."""
    impostor = ca.Authority(authority.cert, ca.new_key())
    cert = ca.sign_node(impostor, ca.new_key().public_key(), "m9", "master", [])
    with pytest.raises(CertificateError, match="not issued"):
        ca.verify_issued(authority, cert)


@pytest.mark.parametrize("days", [(-20, -10), (10, 20)], ids=["expired", "not yet valid"])
def test_verify_issued_refuses_outside_validity(authority, days):
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(authority.cert.subject)
        .public_key(ca.new_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .sign(authority.key, hashes.SHA256())
    )
    with pytest.raises(CertificateError, match="expired or not yet valid"):
        ca.verify_issued(authority, cert)


# --- real TLS with the standard library -------------------------------------------------------


def node_files(tmp_path, authority: ca.Authority, name: str, role: str, hosts: list[str]):
    key = ca.new_key()
    cert = ca.sign_node(authority, ca.read_csr(ca.new_csr(key, name)).public_key(), name, role, hosts)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    cert_path.write_bytes(ca.cert_pem(cert))
    key_path.write_bytes(ca.key_pem(key))
    return cert_path, key_path


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str | None = None):
    """A TLS handshake between two in-memory endpoints, then one message each way.
    Raises what the client (or server) raises."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname=server_hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, endpoint in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    endpoint.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    client.write(b"EHLO")
    server_in.write(client_out.read())
    assert server.read() == b"EHLO"
    server.write(b"250 ok")
    client_in.write(server_out.read())
    assert client.read() == b"250 ok"
    return client, server


def client_trusting(authority: ca.Authority, *, check_hostname: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.cert_pem(authority.cert).decode())
    return context


def server_with(cert_path, key_path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


def test_tls_client_trusting_ca_accepts_node(tmp_path, authority):
    server = server_with(*node_files(tmp_path, authority, "m1", "master", ["m1.example.org", "10.1.2.3"]))
    client, _ = handshake(server, client_trusting(authority))
    peer = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    assert ca.subject_role(peer) == ("m1", "master")
    ca.verify_issued(authority, peer)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "m1.example.org", "10.1.2.3"])
def test_tls_hostname_check_passes_for_sans(tmp_path, authority, hostname):
    server = server_with(*node_files(tmp_path, authority, "m1", "master", ["m1.example.org", "10.1.2.3"]))
    handshake(server, client_trusting(authority, check_hostname=True), server_hostname=hostname)


def test_tls_hostname_check_fails_for_other_name(tmp_path, authority):
    server = server_with(*node_files(tmp_path, authority, "m1", "master", ["m1.example.org"]))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client_trusting(authority, check_hostname=True), server_hostname="m2.example.org")


def test_tls_client_trusting_other_ca_refuses(tmp_path, authority, other_authority):
    server = server_with(*node_files(tmp_path, authority, "m1", "master", []))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client_trusting(other_authority))


def test_tls_mutual_node_certificates(tmp_path, authority, other_authority):
    """Node certificates work as client certificates too (EKU clientAuth) for a server that
    requires one from the CA, and one from another CA is refused."""
    server = server_with(*node_files(tmp_path, authority, "m1", "master", []))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cadata=ca.cert_pem(authority.cert).decode())
    client = client_trusting(authority)
    client.load_cert_chain(*node_files(tmp_path, authority, "s1", "slave", []))
    _, server_end = handshake(server, client)
    peer = x509.load_der_x509_certificate(server_end.getpeercert(binary_form=True))
    assert ca.subject_role(peer) == ("s1", "slave")

    stranger = client_trusting(authority)
    stranger.load_cert_chain(*node_files(tmp_path, other_authority, "x1", "slave", []))
    with pytest.raises(ssl.SSLError):
        handshake(server, stranger)
