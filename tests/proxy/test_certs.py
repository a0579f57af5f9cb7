"""The proxy's certificate: loaded at start, loaded again when its files change (a renewal),
a broken renewal logged and the old certificate kept until the files change again."""

from __future__ import annotations

import logging
import ssl

import pytest
import trio
import trio.testing
from helpers import mailkit

from meshmail.proxy.certs import CERT_POLL, ServerCertificate


async def served_der(context: ssl.SSLContext) -> bytes:
    """The certificate a TLS server with `context` presents, over an in-memory connection."""
    client_context = ssl.create_default_context()
    client_context.check_hostname, client_context.verify_mode = False, ssl.CERT_NONE
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, context, server_side=True)
    client = trio.SSLStream(right, client_context, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return client._ssl_object.getpeercert(binary_form=True)


def der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_a_pair_that_cannot_be_loaded_stops_the_start(tmp_path):
    cert, key = mailkit.write_certificate(tmp_path)
    other_cert, _ = mailkit.write_certificate(tmp_path / "other")
    with pytest.raises(ssl.SSLError):
        ServerCertificate(str(other_cert), str(key))  # a key of another certificate
    with pytest.raises(OSError):
        ServerCertificate(str(tmp_path / "missing.pem"), str(key))


async def test_changed_files_are_loaded_and_a_broken_renewal_keeps_the_old_one(tmp_path, caplog, autojump_clock):
    caplog.set_level(logging.INFO, "meshmail.proxy")
    cert, key = mailkit.write_certificate(tmp_path)
    certificate = ServerCertificate(str(cert), str(key))
    first = der(cert)
    assert await served_der(certificate.context) == first
    async with trio.open_nursery() as nursery:
        nursery.start_soon(certificate.watch)
        await trio.sleep(CERT_POLL * 2)
        assert await served_der(certificate.context) == first  # nothing changed, nothing reloaded
        assert "reloaded" not in caplog.text

        mailkit.write_certificate(tmp_path)  # renewed: both files replaced
        await trio.sleep(CERT_POLL * 1.5)
        second = der(cert)
        assert second != first and await served_der(certificate.context) == second
        assert "reloaded (the files changed)" in caplog.text

        cert.write_text("-----BEGIN CERTIFICATE-----\nhalf written")
        await trio.sleep(CERT_POLL * 1.5)
        assert await served_der(certificate.context) == second
        assert "not reloaded (the files changed)" in caplog.text and "previous one stays in use" in caplog.text

        mailkit.write_certificate(tmp_path)
        await trio.sleep(CERT_POLL * 1.5)
        assert await served_der(certificate.context) == der(cert)
        nursery.cancel_scope.cancel()
