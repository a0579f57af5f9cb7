"""The `meshmail` command as an operator runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import base64
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.cli import assert_one_line_failure, closed_port, meshmail
from helpers.config import MESHMAIL, bound_to, minimal_config

from meshmail.cli.client import node_url
from meshmail.cli.render import format_status
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
    from meshmail.cli import CommandError
    from meshmail.cli.tokens import parse_duration

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
        found = re.search(rb"http on ([^\s,]+)", log)
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


# --- start-up, help, and finding the node --------------------------------------------------

#: What a command that only parses or asks a node something must not load (the node's stack).
NODE_STACK = ("trio", "hypercorn", "quart", "quart_trio", "cryptography")


def test_parsing_loads_no_node_stack():
    script = (
        "import json, sys\n"
        "from meshmail.cli.parser import build_parser\n"
        "build_parser().parse_args(['status', '--url', 'http://127.0.0.1:1'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([MESHMAIL[0], "-c", script], capture_output=True, text=True, timeout=30, check=True)
    loaded = json.loads(result.stdout)
    assert [name for name in loaded if name.split(".")[0] in NODE_STACK] == []
    assert "meshmail.config" not in loaded and "attrs" not in loaded


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of `parser` and every subcommand under it, each subcommand's
    summary checked on the way."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert summaries.get(name), f"meshmail {' '.join((*path, name))}: no summary"
                yield from walk(sub, (*path, name))


def test_every_command_option_and_positional_has_help():
    from meshmail.cli.parser import build_parser

    commands = list(walk(build_parser()))
    assert len(commands) > 30
    for path, parser in commands:
        where = f"meshmail {' '.join(path)}"
        assert parser.description, f"{where}: no description"
        assert "loopback" not in parser.description, where
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{where}: {action.dest} has no help"
            assert "loopback" not in action.help, f"{where}: {action.dest}"


def test_help_says_what_changing_commands_need():
    for args in (["domains", "assign"], ["domains", "unassign"], ["leave"]):
        text = " ".join(meshmail(*args, "--help").stdout.split())
        assert "needs an admin login or API token" in text, args
    placement = " ".join(meshmail("init", "--help").stdout.split())
    assert "--gossip-port P UDP and TCP port of the gossip between nodes (default: 7946)" in placement
    assert "(default: 8443)" in placement


def test_no_node_in_the_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHMAIL_DATA_DIR", str(tmp_path))
    for args in (["status"], ["domains", "list"], ["token", "revoke", "3f2a"]):
        assert_one_line_failure(
            meshmail(*args), f"no node found in {tmp_path}", "--data-dir DIR", "--url URL --token TOKEN"
        )
    assert_one_line_failure(meshmail("run"), f"no node found in {tmp_path}", "meshmail init", "--config FILE")


def test_run_defaults_to_the_default_data_dir(tmp_path, monkeypatch):
    (tmp_path / "meshmail.toml").write_text(minimal_config("dflt"))
    monkeypatch.setenv("MESHMAIL_DATA_DIR", str(tmp_path))
    result = meshmail("run", "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"meshmail: {tmp_path / 'meshmail.toml'}: config ok (node dflt, cluster test)\n"


def test_url_needs_a_scheme():
    assert_one_line_failure(
        meshmail("status", "--url", "10.0.0.5:8443"), "--url needs http:// or https://", "https://10.0.0.5:8443"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["init", "--name", "prod", "--node-name", "a b"], ["--node-name 'a b': a node name is 1 to 63"]),
        (["init", "--name", "bad name!"], ["--name 'bad name!': a cluster name is 1 to 63 letters"]),
        (["init", "--name", "x" * 64, "--node-name", "m1"], ["a cluster name is"]),
        (["join", "mmjoin1.AAAA", "--role", "slave", "--name", "a b"], ["--name 'a b': a node name is"]),
    ],
)
def test_bad_names_name_their_flag(tmp_path, args, words):
    data_dir = tmp_path / "node"
    assert_one_line_failure(meshmail(*args, "--data-dir", str(data_dir)), *words)
    assert not data_dir.exists()


def test_no_terminal_for_a_password_names_the_flag(tmp_path):
    def without_terminal(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*MESHMAIL, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    init = ["init", "--name", "prod", "--node-name", "m1", "--data-dir", str(tmp_path / "m1"), "--bind", "127.0.0.1"]
    assert_one_line_failure(without_terminal(*init), "no terminal", "pass --admin-password-file FILE")
    passwd = ["admin", "passwd", "root", "--url", f"http://127.0.0.1:{closed_port()}"]
    assert_one_line_failure(without_terminal(*passwd), "no terminal", "pass --password-file FILE")


# --- a node made by init, speaking HTTPS ---------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory) -> Iterator[Path]:
    """The data dir of a running master made by `meshmail init` (HTTPS with the cluster CA)."""
    root = tmp_path_factory.mktemp("tls-node")
    (root / "password").write_text("correct horse battery\n")
    data_dir = root / "m1"
    gossip, http = closed_port(), closed_port()
    init = meshmail(
        "init", "--name", "prod", "--node-name", "m1", "--data-dir", str(data_dir), "--bind", "127.0.0.1",
        "--gossip-port", str(gossip), "--http-port", str(http), "--admin-password-file", str(root / "password"),
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    config = data_dir / files.CONFIG  # its MX and shadow store on free ports too, not 25 and 7947
    config.write_text(bound_to(config.read_text(), gossip, http))
    ready = root / "ready.json"
    with open(root / "m1.log", "wb") as log:
        process = subprocess.Popen(
            [*MESHMAIL, "run", "--data-dir", str(data_dir), "--ready-file", str(ready)], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, (root / "m1.log").read_text()
            time.sleep(0.05)
        yield data_dir
    finally:
        process.kill()
        process.wait()


def https_url(data_dir: Path) -> str:
    return node_url(load(data_dir / "meshmail.toml"))


def test_http_to_an_https_node(tls_node):
    https = https_url(tls_node)
    http = "http:" + https.removeprefix("https:")
    assert_one_line_failure(
        meshmail("status", "--url", http), f"the node at {http} speaks HTTPS", f"use {https}", "--ca DATA_DIR/ca.pem"
    )


def test_https_without_the_cluster_ca(tls_node, tmp_path):
    url = https_url(tls_node)
    assert_one_line_failure(meshmail("status", "--url", url), "certificate", "pass --ca", "ca.pem in a node's data dir")
    ok = meshmail("status", "--url", url, "--ca", str(tls_node / "ca.pem"))
    assert ok.returncode == 0 and ok.stdout.startswith("node m1 (master) in cluster prod"), ok.stderr
    other = tmp_path / "other"
    made = meshmail(
        "init", "--name", "other", "--node-name", "x1", "--data-dir", str(other), "--bind", "127.0.0.1",
        "--admin-password-file", str(tls_node.parent / "password"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert_one_line_failure(
        meshmail("status", "--url", url, "--ca", str(other / "ca.pem")), f"{other / 'ca.pem'} did not sign"
    )


def test_status_loads_no_node_stack(tls_node):
    """A real `meshmail status --data-dir` (config, API token, HTTPS): what it imported."""
    command = [MESHMAIL[0], "-X", "importtime", *MESHMAIL[1:], "status", "--data-dir", str(tls_node)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("node m1"), result.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "meshmail.config" in loaded
    assert sorted(name for name in loaded if name.split(".")[0] in NODE_STACK) == []


def test_token_revoke_takes_a_unique_prefix(tls_node):
    target = ["--data-dir", str(tls_node)]

    def ids() -> list[str]:
        result = meshmail("token", "list", "--json", *target)
        return [token["id"] for token in json.loads(result.stdout)["tokens"]]

    # Enough tokens that two ids share their first hex digit.
    while len({token_id[0] for token_id in ids()}) == len(ids()):
        assert meshmail("token", "create", "--role", "slave", "-q", *target).returncode == 0
    first = [token_id[0] for token_id in ids()]
    shared = next(digit for digit in first if first.count(digit) > 1)
    assert_one_line_failure(meshmail("token", "revoke", shared, *target), f"'{shared}' starts 2 join token ids")
    assert_one_line_failure(meshmail("token", "revoke", "xyz", *target), "no join token id starts with 'xyz'")
    victim = next(token_id for token_id in ids() if token_id[0] == shared)
    prefix = victim[:12]
    revoked = meshmail("token", "revoke", prefix, *target)
    assert revoked.stdout == f"meshmail: token {victim} revoked\n", revoked.stderr
    statuses = {
        token["id"]: token["status"]
        for token in json.loads(meshmail("token", "list", "--json", *target).stdout)["tokens"]
    }
    assert statuses[victim] == "revoked"


def test_keyring_ids_and_prefixes(tls_node):
    target = ["--data-dir", str(tls_node)]
    [key] = json.loads(meshmail("keyring", "list", "--json", *target).stdout)["keys"]
    unknown = "0000" if not key["id"].startswith("0000") else "ffff"
    assert_one_line_failure(
        meshmail("keyring", "use", unknown, *target), f"no key id starts with '{unknown}'", "meshmail keyring list"
    )
    used = meshmail("keyring", "use", key["id"][:4], *target)
    assert used.stdout == f"meshmail: key {key['id']} is the primary key\n", used.stderr
