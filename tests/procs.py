"""Real `meshmail run` processes on 127.0.0.1 for end-to-end tests, asked over real HTTP.

Plain helpers, not fixtures: a test module wraps a `Cluster` in a fixture that calls
`close`, which SIGKILLs every process group it started. Waiting is always polling
/status against a deadline; each process's output goes to a log file that failures quote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from conftest import MESHMAIL, minimal_config, new_key_b64

HOST = "127.0.0.1"
#: Time between two rounds of /status requests while waiting for a condition.
POLL_INTERVAL = 0.05
#: How long one /status request may take.
HTTP_TIMEOUT = 2.0
#: Lines of each process log quoted in a failure message.
LOG_TAIL = 40

#: What one node reports about the others: {member name: (state, incarnation)}.
View = dict[str, tuple[str, int]]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports on HOST that are free for TCP and UDP at once (gossip uses both).

    Each comes from the kernel (bind to port 0); all sockets stay open until every port is
    chosen, so the kernel cannot hand out one port twice.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind((HOST, port))
            except OSError:
                continue  # taken for UDP: keep the TCP socket so the kernel moves on
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def node_config(name: str, *, key: str, gossip_port: int, http_port: int, seeds: list[int], gossip: str) -> str:
    """The conftest minimal config on fixed ports, joining through `seeds` (gossip ports on
    HOST), with `gossip` (TOML lines) added to the [gossip] section."""
    text = minimal_config(name, key=key)
    replacements = [
        (f'bind = "{HOST}:0"\ncluster', f'bind = "{HOST}:{gossip_port}"\ncluster'),
        (f'[http]\nbind = "{HOST}:0"', f'[http]\nbind = "{HOST}:{http_port}"'),
        ('profile = "local"\n', f'profile = "local"\nseeds = {json.dumps([f"{HOST}:{p}" for p in seeds])}\n{gossip}'),
    ]
    for old, new in replacements:
        if text.count(old) != 1:
            raise AssertionError(f"conftest.minimal_config changed shape: {old!r} not found once in:\n{text}")
        text = text.replace(old, new)
    return text


def get_status(http_port: int) -> dict[str, Any]:
    """GET /status of the node whose HTTP server is on `http_port`; raises OSError or ValueError."""
    url = f"http://{HOST}:{http_port}/status"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return json.loads(response.read())


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group a process leads (started with start_new_session) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


class Node:
    """One node: its config file, ports, log file and current process (None when never started)."""

    def __init__(self, name: str, config: Path, gossip_port: int, http_port: int, log: Path) -> None:
        self.name = name
        self.config = config
        self.gossip_port = gossip_port
        self.http_port = http_port
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start `meshmail run` in a new process group, appending its output to the log."""
        with open(self.log, "ab") as out:
            out.write(f"----- meshmail run ({time.strftime('%H:%M:%S')})\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [*MESHMAIL, "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def send(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the node's whole process group and reap it."""
        if self.process is not None:
            kill_group(self.process)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        except OSError as exc:
            return f"    (no log: {exc})"
        return "\n".join(f"    | {line}" for line in lines) or "    (empty log)"


class Cluster:
    """`n` nodes n1..nN on HOST, each seeded with every gossip port, none started yet.

    `gossip` holds TOML lines added to every node's [gossip] section. Use `close` in a
    finally: it kills every process, whatever state the test left them in.
    """

    def __init__(self, n: int, workdir: Path, write_config: Callable[[str], Path], gossip: str = "") -> None:
        ports = free_ports(2 * n)
        gossip_ports, http_ports = ports[:n], ports[n:]
        key = new_key_b64()
        self.nodes: dict[str, Node] = {}
        for i in range(n):
            name = f"n{i + 1}"
            text = node_config(
                name, key=key, gossip_port=gossip_ports[i], http_port=http_ports[i], seeds=gossip_ports, gossip=gossip
            )
            self.nodes[name] = Node(name, write_config(text), gossip_ports[i], http_ports[i], workdir / f"{name}.log")

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {name} (exit {node.exited()}):\n{node.log_tail()}" for name, node in self.nodes.items())

    def views(self, names: list[str]) -> dict[str, View | str]:
        """Each named node's view of the members, or the error text if it did not answer."""
        views: dict[str, View | str] = {}
        for name in names:
            try:
                document = get_status(self.nodes[name].http_port)
            except (OSError, ValueError) as exc:
                views[name] = f"no answer: {exc}"
                continue
            views[name] = {m["name"]: (m["state"], m["incarnation"]) for m in document["members"]}
        return views

    def wait_until(
        self, what: str, names: list[str], condition: Callable[[Mapping[str, View]], bool], timeout: float
    ) -> dict[str, View]:
        """Poll the named nodes' /status until `condition` holds for all their views together.

        Returns those views. Raises AssertionError, quoting the last views and every log,
        after `timeout` seconds or as soon as one of the named nodes exits.
        """
        deadline = time.monotonic() + timeout
        while True:
            views = self.views(names)
            answered = {name: view for name, view in views.items() if not isinstance(view, str)}
            if len(answered) == len(names) and condition(answered):
                return answered
            gone = {name: self.nodes[name].exited() for name in names if self.nodes[name].exited() is not None}
            if gone or time.monotonic() > deadline:
                why = f"exited: {gone}" if gone else f"not within {timeout:.1f} s"
                raise AssertionError(f"{what}: {why}; last views {views}\n{self.logs()}")
            time.sleep(POLL_INTERVAL)
