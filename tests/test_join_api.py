"""The join endpoints of a real TLS master (made by init_cluster, run by node.serve in this
process, asked over real HTTPS): the CA it serves, refusals of junk, and nodes that may not
admit joins."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import attrs
import pytest
import trio
from helpers.cluster import HOST
from helpers.config import bound_to
from helpers.http import announce_oversize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmail.config import Config, load, loads
from meshmail.core.address import format_address
from meshmail.core.clock import wall_ms
from meshmail.core.nodes import DEFAULT_GOSSIP_PORT, DEFAULT_HTTP_PORT
from meshmail.node import serve
from meshmail.security import ca, files
from meshmail.security.bootstrap import init_cluster, placement

PASSWORD = "a long enough password"


def make_master(root: Path, name: str = "m1") -> Config:
    """A master made by init_cluster, its config bound to port 0 (placement takes 1..65535 only)."""
    where = placement(
        name=name, role="master", data_dir=str(root / name), bind=HOST, advertise=None,
        gossip_port=DEFAULT_GOSSIP_PORT, http_port=DEFAULT_HTTP_PORT,
    )  # fmt: skip
    init_cluster(where, "prod", "admin", PASSWORD, force=False, wall_ms=wall_ms)
    path = where.data_dir / files.CONFIG
    path.write_text(bound_to(path.read_text(), 0, 0))
    return load(str(path))


async def serve_master(nursery: trio.Nursery, config: Config) -> Config:
    """Start node.serve(config); returns the config with http.bind the address it bound."""
    bound = await nursery.start(serve, config)
    return attrs.evolve(config, http=attrs.evolve(config.http, bind=bound["http"]))


def https(
    config: Config, method: str, path: str, body: bytes | None = None, token: str | None = None, source: str = HOST
) -> tuple[int, bytes]:
    """(status, body bytes) of one request from loopback address `source`, verified against
    the node's CA."""
    context = ssl.create_default_context(cafile=config.tls.ca)
    context.check_hostname = False
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    host, port = config.http.bind
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
async def master(nursery, tmp_path) -> Config:
    with trio.fail_after(15):
        return await serve_master(nursery, make_master(tmp_path))


def oversize_join(config: Config, source: str) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=config.tls.ca)
    context.check_hostname = False
    return announce_oversize(config.http.bind, "POST", "/cluster/join", 80_000, context=context, source=source)


async def call(*args, **kwargs):
    return await trio.to_thread.run_sync(lambda: https(*args, **kwargs))


async def test_the_api_speaks_only_tls_and_serves_the_pinned_ca(master):
    status, pem = await call(master, "GET", "/cluster/ca")
    assert status == 200
    authority = ca.load_cert(pem)
    assert authority == ca.load_cert(Path(master.tls.ca).read_bytes())
    _, document = await call(master, "GET", "/status")
    assert json.loads(document)["cluster_id"] == ca.fingerprint(authority).hex()[:16]

    def plain() -> None:
        urllib.request.urlopen(f"http://{format_address(master.http.bind)}/status", timeout=5)

    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        await trio.to_thread.run_sync(plain)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "token_id": st.text(max_size=20) | st.just("0123456789abcdef"),
        "secret": st.text(max_size=50) | st.just("A" * 43 + "="),
        "role": st.sampled_from(["slave", "master", "root", ""]),
        "name": st.text(max_size=70),
        "nonce": st.text(max_size=40) | st.just("f" * 32),
        "hosts": JSON,
        "csr": st.text(max_size=200) | st.just("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"),
    },
)


def test_junk_join_requests_are_refused_never_500(tmp_path):
    """Random JSON and near-miss join requests: 400/403/409/429 only, nothing written. Each
    comes from its own loopback address, so that the per-address limit on refused joins
    does not stop them before they are parsed; then one address hits that limit."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            config = await serve_master(nursery, make_master(tmp_path))
            _, before = await call(config, "GET", "/status")
            seen: set[int] = set()
            sent: list[int] = []
            sources = (f"127.0.{i // 200}.{i % 200 + 2}" for i in itertools.count())

            @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
            @given(document=JSON | FIELDS)
            def one(document) -> None:
                data = json.dumps(document).encode()
                status, body = https(config, "POST", "/cluster/join", data, source=next(sources))
                assert status in (400, 403, 409), (status, body[:200])
                assert "error" in json.loads(body)
                seen.add(status)
                sent.append(status)

            await trio.to_thread.run_sync(one)
            for raw in (b"", b"{", b"\xff\xfe"):
                status, _ = await call(config, "POST", "/cluster/join", raw, source=next(sources))
                assert status == 400
            status, answer = await trio.to_thread.run_sync(oversize_join, config, next(sources))
            assert status == 413 and b"larger than 65536 bytes" in answer
            for _ in range(25):  # from one address: the limit (20 refusals per 5 minutes) holds
                status, _ = await call(config, "POST", "/cluster/join", b"{}")
                seen.add(status)
            _, after = await call(config, "GET", "/status")
            assert json.loads(after)["state"]["digest"] == json.loads(before)["state"]["digest"]
            counters = json.loads(after)["state"]["counters"]
            refusals = sum(count for name, count in counters.items() if name.startswith("join.refused."))
            # Every fuzzed request and the 4 raw ones were parsed and refused; 20 more from one address.
            assert refusals == len(sent) + 4 + 20 and counters.get("join.limited", 0) == 5
            assert 429 in seen  # the per-address limit on refused joins held
            nursery.cancel_scope.cancel()

    trio.run(main)


async def test_a_slave_admits_no_joins_and_mints_no_tokens(nursery, tmp_path):
    master = make_master(tmp_path)
    text = Path(master.path).read_text().replace('role = "master"', 'role = "slave"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("ca_key"))
    config = await serve_master(nursery, loads(text, master.path))
    token = files.read_api_token(Path(config.node.data_dir))
    status, body = await call(config, "POST", "/tokens", json.dumps({"role": "slave"}).encode(), token=token)
    assert status == 403 and "not a master" in json.loads(body)["error"]
    status, body = await call(config, "POST", "/cluster/join", b"{}")
    assert (status, json.loads(body)["reason"]) == (403, "not_master")


async def test_the_api_offers_http_1_1_only(master):
    """ALPN never picks h2 (hypercorn's HTTP/2 could be made to fail by a request body sent
    after an early answer; tests/test_status.py shows the node surviving even that)."""

    def negotiate() -> str | None:
        context = ssl.create_default_context(cafile=master.tls.ca)
        context.check_hostname = False
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(master.http.bind, timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.selected_alpn_protocol()

    assert await trio.to_thread.run_sync(negotiate) == "http/1.1"
