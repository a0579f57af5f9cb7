"""Fixtures of the proxy's tests."""

from __future__ import annotations

import ssl

import pytest
from helpers import mailkit


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh certificate, and a client context that trusts it."""
    cert, key = mailkit.write_certificate(tmp_path_factory.mktemp("cert"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))
