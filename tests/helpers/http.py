"""Raw HTTP requests to an in-process node (http.client from a thread): exactly the headers
given, no redirects followed, no cookies kept."""

from __future__ import annotations

import http.client
import json
import socket

import attrs
import trio

from .served import Served


@attrs.frozen
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


async def fetch(
    node: Served, method: str, path: str, body: bytes | None = None, headers: dict | None = None, source: str = ""
) -> Answer:
    """One raw HTTP request (http.client, from a thread): exactly these headers, no redirects
    followed, no cookies kept; from loopback address `source` when given."""
    return await trio.to_thread.run_sync(send, node, method, path, body, headers or {}, source)


def send(node: Served, method: str, path: str, body: bytes | None, headers: dict, source: str = "") -> Answer:
    connection = http.client.HTTPConnection(*node.http, timeout=10, source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def json_login_body(account: object, password: object) -> bytes:
    return json.dumps({"account": account, "password": password}).encode()


async def login_json(
    node: Served, account: str, password: str, headers: dict | None = None, source: str = ""
) -> Answer:
    body = json_login_body(account, password)
    headers = {"Content-Type": "application/json", **(headers or {})}
    return await fetch(node, "POST", "/login", body, headers, source)


def announce_oversize(
    address: tuple[str, int], method: str, path: str, size: int, headers: dict | None = None, **tls
) -> tuple[int, bytes]:
    """(status, body) of a request announcing a body of `size` bytes, of which only the first
    200 are sent: the answer must come without the server reading it all (a client that sent
    the whole body might see the connection closed under it before it read the answer).
    `tls`: ssl context= and source= (a loopback address to send from)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {size}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    context, source = tls.get("context"), tls.get("source", "127.0.0.1")
    with socket.create_connection(tuple(address), timeout=10, source_address=(source, 0)) as raw:
        stream = context.wrap_socket(raw) if context is not None else raw
        with stream:
            stream.sendall(head + b"[]" * 100)
            response = http.client.HTTPResponse(stream)
            response.begin()
            return response.status, response.read()
