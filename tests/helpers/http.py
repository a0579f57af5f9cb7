"""Raw HTTP requests to an in-process node (http.client from a thread): exactly the headers
given, no redirects followed, no cookies kept."""

from __future__ import annotations

import http.client
import json

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


async def fetch(node: Served, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Answer:
    """One raw HTTP request (http.client, from a thread): exactly these headers, no redirects
    followed, no cookies kept."""
    return await trio.to_thread.run_sync(send, node, method, path, body, headers or {})


def send(node: Served, method: str, path: str, body: bytes | None, headers: dict) -> Answer:
    connection = http.client.HTTPConnection(*node.http, timeout=10)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def json_login_body(account: object, password: object) -> bytes:
    return json.dumps({"account": account, "password": password}).encode()


async def login_json(node: Served, account: str, password: str, headers: dict | None = None) -> Answer:
    body = json_login_body(account, password)
    return await fetch(node, "POST", "/login", body, {"Content-Type": "application/json", **(headers or {})})
