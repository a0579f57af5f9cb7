"""The `meshmail` command as an operator runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from helpers.cli import assert_one_line_failure, closed_port, meshmail
from helpers.config import MESHMAIL, minimal_config

from meshmail.cli import format_status, node_url
from meshmail.config import load, loads
from meshmail.security import files

SUBCOMMANDS = ["run", "status", "leave", "keygen"]


def test_help():
    result = meshmail("--help")
    assert result.returncode == 0
    for command in SUBCOMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_command(command):
    result = meshmail(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: meshmail {command}")


def test_keygen_prints_a_gossip_key():
    first, second = meshmail("keygen"), meshmail("keygen")
    assert first.returncode == 0
    assert len(base64.b64decode(first.stdout.strip(), validate=True)) == 32
    assert first.stdout != second.stdout


def test_run_with_a_bad_config(write_config):
    path = write_config(minimal_config().replace('profile = "local"', 'profile = "local"\nprobe_intervall = 1'))
    assert_one_line_failure(meshmail("run", "--config", str(path)), str(path), "gossip.probe_intervall: unknown key")


def test_run_with_a_missing_config(tmp_path):
    path = tmp_path / "absent.toml"
    assert_one_line_failure(meshmail("run", "--config", str(path)), f"meshmail: {path}: cannot read")


def test_run_check(write_config):
    path = write_config(minimal_config("checked"))
    result = meshmail("run", "--config", str(path), "--check")
    assert result.returncode == 0 and "config ok" in result.stdout


def test_run_with_the_gossip_port_taken(write_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(minimal_config().replace('bind = "127.0.0.1:0"', f'bind = "127.0.0.1:{port}"', 1))
        result = meshmail("run", "--config", str(path))
    assert_one_line_failure(result, f"cannot listen for gossip on 127.0.0.1:{port}", "in use")


@pytest.mark.parametrize("command", ["status", "leave"])
def test_unreachable_node(command):
    url = f"http://127.0.0.1:{closed_port()}"
    assert_one_line_failure(meshmail(command, "--url", url), "cannot reach the node at", "refused")


@pytest.mark.parametrize(
    ("url", "words"), [("http://[::1", "Invalid IPv6 URL"), ("http://127.0.0.1:1/x y", "bad URL")]
)
def test_bad_urls_are_one_line(url, words):
    assert_one_line_failure(meshmail("status", "--url", url), words)


def test_a_server_that_is_not_http_is_one_line():
    """A --url at a port that greets like SMTP (not HTTP): one line, not a traceback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def greet() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"220 mail.example ESMTP\r\n")
                connection.recv(4096)

        import threading

        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        assert_one_line_failure(meshmail("status", "--url", f"http://127.0.0.1:{port}"), "does not answer HTTP")
        thread.join(5)


@pytest.mark.parametrize("ttl", ["0.5s", "0", "-1h", "366d", "soon"])
def test_token_ttl_bounds(ttl):
    from meshmail.cli import CommandError, parse_duration

    with pytest.raises(CommandError, match="--ttl"):
        parse_duration(ttl)


def test_status_with_a_bad_config(write_config):
    path = write_config("[node]\n")
    assert_one_line_failure(meshmail("status", "--config", str(path)), f"{path}: node.name: missing")


def test_status_url_from_config_needs_a_port(write_config):
    path = write_config(minimal_config())
    assert_one_line_failure(meshmail("status", "--config", str(path)), "http.bind has port 0")


async def test_run_status_leave(write_config):
    """One real node process: status as a table and as JSON, then `meshmail leave` ends it
    with status 0; a second process ends with status 0 on SIGTERM."""
    path = write_config(minimal_config("proc"))
    process = await trio.lowlevel.open_process(
        [*MESHMAIL, "run", "--config", str(path)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(20):
            url = await _wait_for_http(process)
            table = await trio.to_thread.run_sync(meshmail, "status", "--url", url)
            assert table.returncode == 0, table.stderr
            assert re.search(r"^proc\s+alive\s+\d+\s+127\.0\.0\.1:\d+\s+master", table.stdout, re.M), table.stdout
            as_json = await trio.to_thread.run_sync(meshmail, "status", "--url", url, "--json")
            assert '"node": "proc"' in as_json.stdout
            refused = await trio.to_thread.run_sync(meshmail, "leave", "--url", url)
            assert_one_line_failure(refused, "answered 401", "authentication required")
            token = files.read_api_token(Path(load(path).node.data_dir))
            left = await trio.to_thread.run_sync(meshmail, "leave", "--url", url, "--token", token)
            assert left.returncode == 0, left.stderr
            assert await process.wait() == 0
    finally:
        _stop(process)

    process = await trio.lowlevel.open_process(
        [*MESHMAIL, "run", "--config", str(path)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(20):
            await _wait_for_http(process)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        _stop(process)


async def _wait_for_http(process: trio.Process) -> str:
    """Read the node's log until it says where it serves HTTP; return that URL."""
    log = b""
    async for chunk in process.stderr:
        log += chunk
        found = re.search(rb"http on (\S+)\n", log)
        if found:
            return "http://" + found.group(1).decode()
    raise AssertionError(f"node exited before serving HTTP: {log.decode(errors='replace')}")


def _stop(process: trio.Process) -> None:
    if process.returncode is None:
        process.kill()


def test_format_status():
    document = {
        "node": "m1",
        "role": "master",
        "cluster": "prod",
        "address": "10.0.0.1:7946",
        "incarnation": 3,
        "health_score": 0,
        "members": [
            {
                "name": "m1",
                "state": "alive",
                "incarnation": 3,
                "address": "10.0.0.1:7946",
                "role": "master",
                "endpoints": {},
                "tags": {},
                "changed": "2026-01-01T10:00:00.000Z",
                "changed_unix": 1767261600.0,
            },
            {
                "name": "s2",
                "state": "dead",
                "incarnation": 12,
                "address": "10.0.0.2:7946",
                "role": "slave",
                "endpoints": {
                    "imap": dict(address="10.0.0.2:143", transport="starttls", client_address="id", up=True),
                    "lmtp": dict(address="10.0.0.2:24", transport="plain", client_address="none", up=False),
                },
                "tags": {},
                "changed": "2026-01-01T10:05:00.000Z",
                "changed_unix": 1767261900.0,
            },
        ],
        "counters": {"packets_in": 10, "dropped.auth_failed": 2},
    }
    assert format_status(document).splitlines() == [
        "node m1 (master) in cluster prod at 10.0.0.1:7946, incarnation 3, health 0",
        "",
        "NAME  STATE  INC  ADDRESS        ROLE    ENDPOINTS                                 CHANGED",
        "m1    alive  3    10.0.0.1:7946  master  -                                         2026-01-01T10:00:00.000Z",
        "s2    dead   12   10.0.0.2:7946  slave   imap=10.0.0.2:143,lmtp=10.0.0.2:24(down)  2026-01-01T10:05:00.000Z",
        "",
        "counters:",
        "  packets_in           10",
        "  dropped.auth_failed  2",
    ]


@pytest.mark.parametrize(
    ("bind", "url"),
    [
        ("127.0.0.2:8080", "http://127.0.0.2:8080"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080"),
        ("[::]:8081", "http://[::1]:8081"),
        ("status.example.com:80", "http://status.example.com:80"),
    ],
)
def test_node_url_from_config(bind, url):
    config = loads(minimal_config().replace('bind = "127.0.0.1:0"\n\n', f'bind = "{bind}"\n\n', 1))
    assert config.http.bind != ("127.0.0.1", 0)
    assert node_url(config) == url
