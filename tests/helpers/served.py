"""A node run by node.serve in the test's own trio loop, asked over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import attrs
import trio

from meshmail.config import Config
from meshmail.core.address import Address, format_address
from meshmail.node import serve
from meshmail.security import files

ENDPOINTS = '[endpoints]\nimap = "127.0.0.1:1143"\n[tags]\nrack = "r1"\n'


@attrs.frozen
class Served:
    """A node started by `start`: where it listens and its CLI's API token."""

    gossip: Address
    http: Address
    token: str


async def start(nursery: trio.Nursery, config: Config) -> Served:
    """Start node.serve(config) in the nursery; the node writes its API token at start."""
    with trio.fail_after(10):
        bound = await nursery.start(serve, config)
    token = files.read_api_token(Path(config.node.data_dir))
    assert token, "a node writes DATA_DIR/api-token when it starts"
    return Served(bound["gossip"], bound["http"], token)


#: request()'s default: the node's own API token.
NODE_TOKEN = object()


async def request(
    node: Served, method: str, path: str, body: bytes | None = None, *, token: object = NODE_TOKEN
) -> tuple[int, dict]:
    """One HTTP request from a thread (urllib), returning the status and the JSON answer.
    It carries the node's API token unless `token` says another one (None: no credentials)."""
    url = f"http://{format_address(node.http)}{path}"
    headers = {"Content-Type": "application/json"}
    bearer = node.token if token is NODE_TOKEN else token
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"

    def call() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await trio.to_thread.run_sync(call)
