"""Network namespaces for partition tests: one per node, joined by a bridge, cut by iptables.

`Net` makes a namespace per node with a veth pair into a bridge that lives in a namespace
of its own. The nodes' addresses (SUBNET) exist only on those veths: nothing routes them to
the host's interfaces, and `close` deletes every namespace (with its links and rules).
`place` moves the nodes of a helpers.cluster Cluster into them before they start: each
binds its namespace address, runs under `ip netns exec`, and is asked over HTTP through a
socket made inside its namespace (a socket keeps the namespace it was made in).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
from typing import Any

from helpers.cluster import HTTP_TIMEOUT, Cluster, Node
from helpers.config import set_key

#: What the namespaces take, and the line that installs it on Debian.
TOOLS = ("ip", "iptables")
INSTALL = "apt-get install iproute2 iptables"
#: The nodes' /24: address i+1 is the i-th node's (10.77.0.1, 10.77.0.2, ...).
SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


class Net:
    """Namespaces mm-test-<id>-NAME for `names`, on a bridge in mm-test-<id>-br.

    Call `create`, then `close` in a finally: it deletes whatever `create` got to make.
    """

    def __init__(self, names: list[str]) -> None:
        self.prefix = f"mm-test-{secrets.token_hex(3)}"
        self.names = list(names)
        self.bridge = f"{self.prefix}-br"
        self.made: list[str] = []

    def namespace(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def create(self) -> None:
        for namespace in [self.bridge, *map(self.namespace, self.names)]:
            _run("ip", "netns", "add", namespace)
            self.made.append(namespace)
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            inside, port = self.namespace(name), f"p{i}"
            _run("ip", "-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", inside)
            _run("ip", "-n", self.bridge, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", inside, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            _run("ip", "-n", inside, "link", "set", "eth0", "up")
            _run("ip", "-n", inside, "link", "set", "lo", "up")

    def cut(self, side: list[str], other: list[str]) -> None:
        """Drop every packet between the two sides, in and out, in the namespaces of both."""
        for near, far in ((side, other), (other, side)):
            for name in near:
                for peer in far:
                    for chain, direction in (("INPUT", "-s"), ("OUTPUT", "-d")):
                        self.iptables(name, "-A", chain, direction, self.address(peer), "-j", "DROP")

    def heal(self) -> None:
        """Remove every rule `cut` added."""
        for name in self.names:
            for chain in ("INPUT", "OUTPUT"):
                self.iptables(name, "-F", chain)

    def iptables(self, name: str, *rule: str) -> None:
        _run("ip", "netns", "exec", self.namespace(name), "iptables", "-w", *rule)

    def close(self) -> None:
        for namespace in reversed(self.made):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        self.made.clear()

    def place(self, cluster: Cluster) -> None:
        """Put the cluster's nodes (not started yet) into their namespaces: configs bound to
        the namespace addresses, processes run there, /status asked there."""
        for name, node in list(cluster.nodes.items()):
            text = node.config.read_text()
            for section in ("gossip", "http"):
                text = set_key(text, section, "bind", json.dumps(f"{self.address(name)}:0"))
            node.config.write_text(text)
            placed = NamespacedNode(name, node.config, node.run, node.log, node.ca, namespace=self.namespace(name))
            placed.host = self.address(name)
            placed.prefix = ["ip", "netns", "exec", self.namespace(name)]
            cluster.nodes[name] = placed


def connect_in(namespace: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to `address` made inside network namespace `namespace` (a thread of
    its own enters it, so this process stays where it is)."""
    made: dict[str, Any] = {}

    def inside() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {namespace}: {os.strerror(code)}")
            finally:
                os.close(fd)
            made["socket"] = socket.create_connection(address, timeout)
        except OSError as exc:
            made["error"] = exc

    thread = threading.Thread(target=inside, name=f"connect in {namespace}")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["socket"]


class NamespacedNode(Node):
    """A node in a network namespace, asked over plain HTTP from inside it."""

    def __init__(self, *args: Any, namespace: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.namespace = namespace

    def request(self, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON) of one request; raises OSError or ValueError."""
        assert self.ca is None, "namespaced nodes serve plain HTTP"
        connection = http.client.HTTPConnection(self.host, self.http_port, timeout=HTTP_TIMEOUT)
        connection.sock = connect_in(self.namespace, (self.host, self.http_port), HTTP_TIMEOUT)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def get(self, path: str, token: str | None = None) -> Any:
        status, document = self.request("GET", path, token)
        if status != 200:
            raise OSError(f"GET {path}: HTTP {status}: {document}")
        return document
