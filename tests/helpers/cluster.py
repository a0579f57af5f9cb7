"""Real `meshmail run` processes on 127.0.0.1 for end-to-end tests, asked over real HTTP(S).

One harness, two ways to make nodes: `Cluster.configured` writes configs by hand (plain
HTTP), `Cluster.init` and `Cluster.join` run `meshmail init` and `join` (TLS, data dirs).
Every config binds port 0: a node is run with --ready-file and the harness reads its ports
from there, so no test picks ports. Plain helpers, not fixtures: a test wraps a Cluster in
a fixture that calls `close`, which SIGKILLs every process group it started. Waiting is
polling /status against a deadline; each node's output goes to a log file failures quote.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from helpers import passwords
from helpers.cli import cli, ok
from helpers.config import MESHMAIL, bound_to, minimal_config, new_key_b64, with_seeds
from meshmail.core.address import Address
from meshmail.security import files

HOST = "127.0.0.1"
#: The admin password of clusters made by `Cluster.init`.
PASSWORD = "correct horse battery"
#: Start of a process, a join, or news crossing a small local cluster on a slow CI machine.
TIMEOUT = 30.0
#: Time between two looks at a ready file or two rounds of /status requests.
POLL_INTERVAL = 0.05
#: How long one /status request may take.
HTTP_TIMEOUT = 5.0
#: Lines of each process log quoted in a failure message.
LOG_TAIL = 40

#: What one node reports about the others: {member name: (state, incarnation)}.
View = dict[str, tuple[str, int]]


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group a process leads (started with start_new_session) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def states(status: dict[str, Any]) -> dict[str, str]:
    """{member name: state} of a /status document."""
    return {member["name"]: member["state"] for member in status["members"]}


def view(status: dict[str, Any]) -> View:
    return {member["name"]: (member["state"], member["incarnation"]) for member in status["members"]}


class Node:
    """One node: its config, data dir, log, ready file and current process (None when
    never started); its ports once it has reported them.

    `run` is how `meshmail run` finds the config (--config FILE or --data-dir DIR); `ca`
    is the cluster CA to check its HTTPS with (None: it serves plain HTTP).
    """

    def __init__(self, name: str, config: Path, run: list[str], log: Path, ca: Path | None = None) -> None:
        self.name = name
        #: The address its config binds and the tests reach it at.
        self.host = HOST
        #: Words run before `meshmail run` (prlimit, ip netns exec), each taking the rest as its command.
        self.prefix: list[str] = []
        self.config = config
        self.run = run
        self.log = log
        self.ready = log.with_suffix(".ready.json")
        self.ca = ca
        self.process: subprocess.Popen | None = None
        self.gossip_port: int | None = None
        self.http_port: int | None = None

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start `meshmail run` in a new process group, appending its output to the log."""
        self.ready.unlink(missing_ok=True)  # a SIGKILLed node leaves its ready file behind
        with open(self.log, "ab") as out:
            out.write(f"----- meshmail run ({time.strftime('%H:%M:%S')})\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [*self.prefix, *MESHMAIL, "run", *self.run, "--ready-file", str(self.ready)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        """Wait for the ready file and take the node's ports from it.

        After the first start the ports are written into the config: the CLI's --config and
        --data-dir find a node's HTTP port there, and a restart binds the same ports (which
        the node held until then), so a restarted node keeps its gossip address.
        Raises AssertionError, quoting the log, if the process exits first or on timeout.
        """
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.exited() is not None or time.monotonic() > deadline:
                why = f"exited with {self.exited()}" if self.exited() is not None else f"not within {timeout:.1f} s"
                raise AssertionError(f"{self.name} never reported its ports: {why}\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL)
        bound = {name: Address.parse(text) for name, text in json.loads(self.ready.read_text()).items()}
        if self.gossip_port is None:
            self.config.write_text(bound_to(self.config.read_text(), bound["gossip"].port, bound["http"].port))
        self.gossip_port, self.http_port = bound["gossip"].port, bound["http"].port

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

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}:{self.http_port}"

    def get(self, path: str, token: str | None = None) -> Any:
        """GET `path` from the node and decode its JSON; raises OSError or ValueError."""
        context = None
        if self.ca is not None:
            context = ssl.create_default_context(cafile=str(self.ca))
            context.check_hostname = False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=context) as response:
            return json.loads(response.read())


class Cluster:
    """Nodes under `root` (data dir root/NAME, log root/NAME.log), each its own process group.

    Use `close` in a finally: it kills every process, whatever state the test left them in.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, Node] = {}
        #: Nodes made by `configured` that wait for n1's gossip address as their seed.
        self._unseeded: set[str] = set()

    # --- nodes from configs written here

    @classmethod
    def configured(cls, n: int, root: Path, gossip: str = "") -> Cluster:
        """`n` nodes n1..nN from the minimal config (one gossip key), none started yet.

        `gossip` holds TOML lines added to every node's [gossip] section. `start` seeds the
        others with the gossip address n1 reports.
        """
        cluster = cls(root)
        key = new_key_b64()
        for i in range(n):
            name = f"n{i + 1}"
            cluster.data_dir(name).mkdir()
            text = minimal_config(name, key=key, data_dir=str(cluster.data_dir(name)))
            text = text.replace('profile = "local"\n', f'profile = "local"\n{gossip}', 1)
            config = root / f"{name}.toml"
            config.write_text(text)
            cluster.nodes[name] = Node(name, config, ["--config", str(config)], root / f"{name}.log")
        cluster._unseeded = set(cluster.nodes) - {"n1"}
        return cluster

    # --- nodes made by `meshmail init` and `meshmail join`

    def data_dir(self, name: str) -> Path:
        return self.root / name

    def append_config(self, name: str, text: str) -> None:
        """Add TOML `text` at the end of node `name`'s config (made by init or join)."""
        config = self.data_dir(name) / files.CONFIG
        config.write_text(config.read_text() + text)

    def placement(self, name: str) -> list[str]:
        """Where init or join puts a node. They write their default ports (they take 1..65535
        only); the harness rebinds the config to port 0 before the node ever runs."""
        return ["--data-dir", str(self.data_dir(name)), "--bind", HOST]

    def init(self, name: str, cluster: str = "prod") -> None:
        password_file = self.root / "admin-password"
        password_file.write_text(PASSWORD + "\n")
        passwords.register(PASSWORD)
        ok("init", "--name", cluster, "--node-name", name, *self.placement(name), "--admin-password-file",
           str(password_file))  # fmt: skip
        self._node(name)

    def token(self, via: str, role: str, *extra: str) -> str:
        return ok("token", "create", "--role", role, "--quiet", "--data-dir", str(self.data_dir(via)), *extra).strip()

    def join(self, name: str, token: str, role: str) -> subprocess.CompletedProcess:
        result = cli("join", token, "--role", role, "--name", name, *self.placement(name))
        if result.returncode == 0:
            self._node(name)
        return result

    def _node(self, name: str) -> Node:
        """The node NAME: made by `configured`, or by init or join in data dir root/NAME,
        whose config then binds port 0 (it never ran here)."""
        if name not in self.nodes:
            data = self.data_dir(name)
            config = data / files.CONFIG
            config.write_text(bound_to(config.read_text(), 0, 0))
            log = self.root / f"{name}.log"
            self.nodes[name] = Node(name, config, ["--data-dir", str(data)], log, ca=data / files.CA_CERT)
        return self.nodes[name]

    # --- processes

    def start(self, *names: str) -> None:
        """Start the named nodes (every node by default) and wait until each has reported its ports.

        Nodes made by `configured` other than n1 join through n1's gossip address, so n1
        starts first, alone.
        """
        nodes = [self._node(name) for name in names] if names else list(self.nodes.values())
        later = [node for node in nodes if node.name in self._unseeded]
        _start_together([node for node in nodes if node not in later])
        if later:
            seed = self.nodes["n1"]
            assert seed.gossip_port is not None, "n1 is the seed of the other nodes: start it first"
            for node in later:
                node.config.write_text(with_seeds(node.config.read_text(), [f"{seed.host}:{seed.gossip_port}"]))
                self._unseeded.remove(node.name)
            _start_together(later)

    def kill(self, name: str) -> None:
        self.nodes[name].kill()

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        """The current process of every node that has one."""
        return {name: node.process for name, node in self.nodes.items() if node.process is not None}

    def logs(self) -> str:
        return "\n".join(f"--- {name} (exit {node.exited()}):\n{node.log_tail()}" for name, node in self.nodes.items())

    # --- asking the nodes

    def url(self, name: str) -> str:
        return self.nodes[name].url

    def get(self, name: str, path: str, token: str | None = None) -> Any:
        return self.nodes[name].get(path, token)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name, "/status")

    def wait(
        self, what: str, names: list[str], condition: Callable[[dict[str, dict]], bool], timeout: float = TIMEOUT
    ) -> dict[str, dict]:
        """Poll the /status of the named nodes until condition({name: status}) holds; returns those.

        Raises AssertionError, quoting the last views and every log, after `timeout`
        seconds or as soon as one of the named nodes exits.
        """
        deadline = time.monotonic() + timeout
        while True:
            statuses: dict[str, dict] = {}
            problems: dict[str, str] = {}
            for name in names:
                try:
                    statuses[name] = self.status(name)
                except (OSError, ValueError) as exc:
                    problems[name] = f"no answer: {exc}"
            if len(statuses) == len(names) and condition(statuses):
                return statuses
            gone = {name: self.nodes[name].exited() for name in names if self.nodes[name].exited() is not None}
            if gone or time.monotonic() > deadline:
                why = f"exited: {gone}" if gone else f"not within {timeout:.1f} s"
                views = {name: view(status) for name, status in statuses.items()} | problems
                raise AssertionError(f"{what}: {why}; last views {views}\n{self.logs()}")
            time.sleep(POLL_INTERVAL)

    def wait_until(
        self, what: str, names: list[str], condition: Callable[[Mapping[str, View]], bool], timeout: float
    ) -> dict[str, View]:
        """`wait` with a condition on the nodes' views of the members; returns those views."""
        statuses = self.wait(what, names, lambda found: condition(_views(found)), timeout)
        return _views(statuses)

    def wait_alive(self, names: list[str], observers: list[str] | None = None) -> None:
        self.wait(
            f"{names} alive in the views of {observers or names}",
            observers or names,
            lambda statuses: all(
                all(states(status).get(name) == "alive" for name in names) for status in statuses.values()
            ),
        )


def _start_together(nodes: list[Node]) -> None:
    for node in nodes:
        node.spawn()
    for node in nodes:
        node.wait_ready()


def _views(statuses: Mapping[str, dict]) -> dict[str, View]:
    return {name: view(status) for name, status in statuses.items()}
