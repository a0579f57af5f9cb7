"""Talking to a running node's HTTP API with urllib: which node (Target), one JSON request,
and one line for each way that fails (nothing listening, HTTP to an HTTPS node, an
untrusted certificate, an error answer), saying what to pass instead.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import attrs

from ..core.address import format_address
from ..security.files import CA_CERT
from . import TOKEN_ENV, CommandError
from .local import load_config

HTTP_TIMEOUT = 10.0
NO_NODE_HINT = "point at one with --data-dir DIR, or --url URL --token TOKEN"
#: What OpenSSL says when the server answers a TLS hello in plain text.
PLAIN_HTTP = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
TRUST_HINT = f"pass --ca with the cluster CA ({CA_CERT} in a node's data dir)"


@attrs.frozen
class Target:
    """A running node to talk to: base URL, API token, and CA file for https."""

    url: str
    token: str | None = attrs.field(default=None, repr=False)
    ca: str | None = None


def target(args: argparse.Namespace) -> Target:
    """The node `args` point at: --url (with --token or $MESHMAIL_TOKEN, and --ca), else the
    local node of --config, --data-dir or the default data dir, with its API token."""
    if args.url:
        return Target(_checked_url(args.url), args.token or os.environ.get(TOKEN_ENV), args.ca)
    return local_target(load_config(args, NO_NODE_HINT), args.token)


def local_target(config, token: str | None = None) -> Target:
    """The node of `config` as seen from this host, with the API token of its data dir."""
    from ..security import files

    if token is None:
        try:
            token = files.read_api_token(Path(config.node.data_dir))
        except files.FilesError as exc:
            raise CommandError(str(exc)) from None
    return Target(node_url(config), token, config.tls.ca if config.tls else None)


def node_url(config) -> str:
    """The base URL at which a client on this host reaches the node of `config`."""
    host, port = config.http.bind
    if port == 0:
        raise CommandError(f"{config.path}: http.bind has port 0, so the port is not known; use --url")
    try:
        if ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ":" in host else "127.0.0.1"
    except ValueError:
        pass  # a host name: use it as it is
    scheme = "https" if config.tls is not None else "http"
    return f"{scheme}://{format_address((host, port))}"


def _checked_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--url needs http:// or https:// (e.g. https://{url}), not {url!r}")
    return url.rstrip("/")


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    """request() to the node `args` point at."""
    return request(target(args), method, path, body)


def request(target: Target, method: str, path: str, body: dict | None = None) -> Any:
    """Send one request to the node and return its decoded JSON answer; raises CommandError."""
    url = target.url + path
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    context = _tls_context(target) if url.startswith("https:") else None
    try:
        message = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(message, timeout=HTTP_TIMEOUT, context=context) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code == 401:
            hint = f" (give an API token: --data-dir of the node, --token or ${TOKEN_ENV})"
        raise CommandError(f"node at {target.url} answered {exc.code}: {_error_text(exc)}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(_unreachable(target, getattr(exc, "reason", exc))) from None
    except (ValueError, http.client.InvalidURL) as exc:
        raise CommandError(f"bad URL {url!r}: {exc}") from None
    except http.client.HTTPException as exc:
        kind = type(exc).__name__
        raise CommandError(f"{target.url} does not answer HTTP as a meshmail node does ({kind})") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise CommandError(f"{url} did not answer JSON (is it a meshmail node?)") from None


def resolve_id(target: Target, path: str, field: str, prefix: str, what: str, listing: str) -> str:
    """The id among those GET `path` lists under `field` that is `prefix` or alone starts with
    it; raises CommandError naming the `listing` command when none or several do."""
    if not prefix:
        raise CommandError(f"give a {what} id ({listing} shows them)")
    ids = [item["id"] for item in request(target, "GET", path)[field]]
    if prefix in ids:
        return prefix
    matches = [kid for kid in ids if kid.startswith(prefix.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CommandError(f"no {what} id starts with {prefix!r} ({listing} shows them)")
    shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
    raise CommandError(f"{prefix!r} starts {len(matches)} {what} ids ({shown}); give more of the id")


def _tls_context(target: Target) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=target.ca)
    except OSError as exc:
        raise CommandError(f"cannot read the CA {target.ca}: {exc.strerror or exc}") from None
    if target.ca:
        context.check_hostname = False  # any node certificate of this cluster's CA will do
    return context


def _unreachable(target: Target, reason: object) -> str:
    """The line for a request that got no HTTP answer: what went wrong and what to pass instead."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        why = reason.verify_message or reason.reason
        if target.ca is None:
            return f"cannot trust the node at {target.url}: {why}; {TRUST_HINT}"
        return f"the node at {target.url} has a certificate that the CA {target.ca} did not sign ({why})"
    if isinstance(reason, ssl.SSLError) and reason.reason in PLAIN_HTTP:
        http = "http:" + target.url.removeprefix("https:")
        return f"the node at {target.url} speaks plain HTTP, not HTTPS: use {http}"
    if isinstance(reason, ssl.SSLError):
        return f"no TLS connection with the node at {target.url}: {reason.reason or reason}"
    if isinstance(reason, ConnectionResetError) and target.url.startswith("http:") and _speaks_tls(target.url):
        https = "https:" + target.url.removeprefix("http:")
        return f"the node at {target.url} speaks HTTPS: use {https} and --ca DATA_DIR/{CA_CERT} (the cluster CA)"
    problem = getattr(reason, "strerror", None) or reason
    return f"cannot reach the node at {target.url}: {problem}"


def _speaks_tls(url: str) -> bool:
    """Whether the server of `url` completes a TLS handshake. The certificate is not checked:
    the answer only picks which hint to print."""
    parts = urllib.parse.urlsplit(url)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=HTTP_TIMEOUT) as raw:
            with context.wrap_socket(raw):
                return True
    except (OSError, ValueError):
        return False


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return exc.reason or "error"
