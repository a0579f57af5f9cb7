"""Benchmark of meshmail gossip against HashiCorp Serf: N real processes of each on loopback.

Measures join-to-all-alive time, kill-9-to-all-failed time and steady-state bytes sent
per node per second, with the memberlist LAN profile on both sides. Run by
`make bench-gossip` as root; it is a script, not a test (pytest does not collect it;
tests/test_benches.py runs its short mode).
"""

from __future__ import annotations

import abc
import argparse
import base64
import ctypes
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import attrs
import msgpack

from meshmail.security import files

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

#: memberlist's DefaultLANConfig, which `serf agent -profile=lan` uses; written into each
#: meshmail node's config as well, so both sides probe and suspect on the same schedule.
LAN = {
    "probe_interval": 1.0,
    "probe_timeout": 0.5,
    "suspicion_mult": 4,
    "suspicion_max_timeout_mult": 6,
    "gossip_interval": 0.2,
    "gossip_nodes": 3,
    "push_pull_interval": 30.0,
    "indirect_checks": 3,
    "retransmit_mult": 4,
}

POLL_INTERVAL = 0.02
STARTUP_TIMEOUT = 30.0
#: Time between convergence and the steady-state window, so the join broadcasts have
#: finished their retransmits and do not count as steady state.
SETTLE = 2.0
#: Least time between convergence and the kill, as the issue asks.
MIN_QUIET_BEFORE_KILL = 3.0


class RoundFailed(Exception):
    """One round of one system could not be measured; the message says why."""


#: What a node's API can make a watcher thread fail with: a broken connection, a
#: refused request, or a reply without the expected fields.
WATCH_ERRORS = (
    OSError,
    http.client.HTTPException,
    RoundFailed,
    KeyError,
    TypeError,
    ValueError,
)


@attrs.frozen
class RoundResult:
    join_s: float | None = None
    fail_s: float | None = None
    #: The same two times for the first node done, which shows the spread.
    join_first_s: float | None = None
    #: The node that saw all alive last: the one to look at in its log when it lags.
    join_last_node: str | None = None
    fail_first_s: float | None = None
    bytes_per_node_s: float | None = None
    error: str | None = None


# --- processes -------------------------------------------------------------------------


class Processes:
    """Every process the bench starts, each in its own process group, killed by `close`.

    Children also get SIGKILL from the kernel if the bench itself dies (PR_SET_PDEATHSIG),
    so not even a `kill -9` of the bench leaves agents behind.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _die_with_parent(self) -> None:
        pr_set_pdeathsig = 1
        self._libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    def start(self, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                # Safe here: the bench starts processes only from the main thread while no
                # other thread of its own runs.
                preexec_fn=self._die_with_parent,  # noqa: PLW1509
            )
        self._procs.append(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process group of `proc` and reap it."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(
                f"warning: process {proc.pid} did not die after SIGKILL",
                file=sys.stderr,
            )

    def close(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs:
            self.kill(proc)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in text[-lines:]) or "    | (empty log)"


class PortPicker:
    """Free TCP+UDP ports on 127.0.0.1 below the ephemeral range, never handed out twice.

    Below the ephemeral range, a gossip port cannot also be the client port of some
    other TCP connection, so the sniffer's port filter counts gossip traffic only.
    """

    def __init__(self) -> None:
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        self._range = (max(1024, low - 12000), low - 1)
        self._given: set[int] = set()
        self._random = random.Random()

    def pick(self) -> int:
        for _ in range(1000):
            port = self._random.randrange(*self._range)
            if port in self._given or not self._free(port):
                continue
            self._given.add(port)
            return port
        raise RoundFailed("no free port found on 127.0.0.1")

    @staticmethod
    def _free(port: int) -> bool:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    return False
        return True


# --- traffic ---------------------------------------------------------------------------


class Sniffer:
    """Counts IPv4 bytes (headers included) of TCP and UDP packets to or from `ports` on lo.

    An AF_PACKET socket sees every loopback packet twice, once going out and once coming
    in; only the outgoing copy is counted, so each packet counts once, for its sender.
    Needs root (CAP_NET_RAW).
    """

    PACKET_OUTGOING = 4
    ETH_P_ALL = 0x0003

    def __init__(self, ports: set[int]) -> None:
        self._ports = ports
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)
        self.bytes = 0
        self.packets = 0
        self.seconds = 0.0

    @staticmethod
    def available() -> str | None:
        """None if sniffing works here, else the reason it does not."""
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(Sniffer.ETH_P_ALL)).close()
        except (OSError, AttributeError) as e:
            return f"no AF_PACKET socket ({e}); run as root"
        return None

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.seconds = time.monotonic() - self._started
        self._sock.close()

    def _run(self) -> None:
        ports = self._ports
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(65600)
            except TimeoutError:
                continue
            except OSError:
                return
            # lo frames carry a 14-byte Ethernet header with ethertype IPv4 = 0x0800.
            if addr[2] != self.PACKET_OUTGOING or len(data) < 38 or data[12:14] != b"\x08\x00":
                continue
            ihl = (data[14] & 0x0F) * 4
            proto = data[23]
            if proto not in (6, 17) or len(data) < 14 + ihl + 4:
                continue
            src, dst = struct.unpack_from("!HH", data, 14 + ihl)
            if src in ports or dst in ports:
                self.bytes += struct.unpack_from("!H", data, 16)[0]
                self.packets += 1


# --- clients ---------------------------------------------------------------------------


class SerfRpc:
    """A minimal client of Serf's msgpack RPC protocol over one TCP connection."""

    def __init__(self, port: int, timeout: float = 2.0) -> None:
        self._sock = socket.create_connection((HOST, port), timeout=timeout)
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        self._seq = 0
        self._call("handshake", {"Version": 1}, reply_body=False)

    def close(self) -> None:
        self._sock.close()

    def _read(self) -> object:
        while True:
            for obj in self._unpacker:
                return obj
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("serf closed the RPC connection")
            self._unpacker.feed(chunk)

    def _call(self, command: str, body: dict | None = None, *, reply_body: bool = True) -> dict:
        seq = self._seq
        self._seq += 1
        out = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            out += msgpack.packb(body)
        self._sock.sendall(out)
        header = self._read()
        if not isinstance(header, dict) or header.get("Seq") != seq:
            raise ConnectionError(f"serf RPC: unexpected reply header {header!r}")
        reply = self._read() if reply_body else {}
        if header.get("Error"):
            raise RoundFailed(f"serf RPC {command}: {header['Error']}")
        return reply

    def join(self, seeds: list[str]) -> int:
        return self._call("join", {"Existing": seeds, "Replay": False})["Num"]

    def view(self) -> dict[str, str]:
        return {m["Name"]: m["Status"] for m in self._call("members")["Members"]}


class MeshmailHttp:
    """A client of a meshmail node's HTTP API on one keep-alive connection."""

    def __init__(self, port: int, token: str | None, timeout: float = 2.0) -> None:
        self._port = port
        self._timeout = timeout
        self._conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        # POST /join is an admin request: the node's own API token (DATA_DIR/api-token) authorizes it.
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.name: str | None = None
        self.view()

    def close(self) -> None:
        self._conn.close()

    def _request(self, method: str, path: str, body: object = None) -> dict:
        payload = None if body is None else json.dumps(body).encode()
        headers = dict(self._auth)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        # The server may have closed an idle keep-alive connection: retry once on a new one.
        for attempt in (0, 1):
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                break
            except (
                http.client.RemoteDisconnected,
                BrokenPipeError,
                ConnectionResetError,
            ):
                self._conn.close()
                self._conn = http.client.HTTPConnection(HOST, self._port, timeout=self._timeout)
                if attempt:
                    raise
        if resp.status != 200:
            raise RoundFailed(f"meshmail {method} {path}: HTTP {resp.status}: {data[:200]!r}")
        try:
            return json.loads(data)
        except ValueError as e:
            raise RoundFailed(f"meshmail {method} {path}: not JSON ({e}): {data[:200]!r}") from None

    def join(self, seeds: list[str]) -> int:
        return self._request("POST", "/join", {"seeds": seeds})["joined"]

    def view(self) -> dict[str, str]:
        doc = self._request("GET", "/status")
        self.name = doc["node"]
        view = {m["name"]: m["state"] for m in doc["members"]}
        # A node that answers is alive, whether or not it lists itself among the members.
        view.setdefault(self.name, "alive")
        return view


# --- clusters --------------------------------------------------------------------------


class Cluster(abc.ABC):
    """N started nodes of one system, their clients, and their gossip ports."""

    system = ""
    alive_word = "alive"
    failed_word = ""

    def __init__(self, n: int, workdir: Path, procs: Processes, ports: PortPicker) -> None:
        self.n = n
        self.workdir = workdir
        self.procs = procs
        self.names = [f"{self.system[0]}{i + 1}" for i in range(n)]
        self.gossip_ports = [ports.pick() for _ in range(n)]
        self.api_ports = [ports.pick() for _ in range(n)]
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.nodes: list[subprocess.Popen] = []
        self.clients: list[SerfRpc | MeshmailHttp] = []

    def start(self) -> None:
        for i in range(self.n):
            self.nodes.append(self._spawn(i))

    @abc.abstractmethod
    def _spawn(self, i: int) -> subprocess.Popen:
        """Start node i of this system."""

    @abc.abstractmethod
    def _connect(self, i: int) -> SerfRpc | MeshmailHttp:
        """A client of node i's API."""

    def log(self, i: int) -> Path:
        return self.workdir / f"{self.names[i]}.log"

    def wait_ready(self, timeout: float) -> None:
        """Connect a client to every node once its API answers; RoundFailed after `timeout`."""
        deadline = time.monotonic() + timeout
        for i in range(self.n):
            while True:
                if self.nodes[i].poll() is not None:
                    raise RoundFailed(
                        f"{self.system} node {self.names[i]} exited with code "
                        f"{self.nodes[i].returncode} at start:\n{_log_tail(self.log(i))}"
                    )
                try:
                    self.clients.append(self._connect(i))
                    break
                except (
                    OSError,
                    ConnectionError,
                    http.client.HTTPException,
                    RoundFailed,
                ) as e:
                    last = e
                if time.monotonic() > deadline:
                    raise RoundFailed(
                        f"{self.system} node {self.names[i]} API did not answer within "
                        f"{timeout:.0f} s (last error: {last}):\n{_log_tail(self.log(i))}"
                    )
                time.sleep(0.05)

    def seed(self) -> str:
        return f"{HOST}:{self.gossip_ports[0]}"

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.nodes:
            self.procs.kill(proc)


class SerfCluster(Cluster):
    system = "serf"
    failed_word = "failed"

    def _spawn(self, i: int) -> subprocess.Popen:
        argv = [
            "serf", "agent",
            f"-node={self.names[i]}",
            f"-bind={HOST}:{self.gossip_ports[i]}",
            f"-rpc-addr={HOST}:{self.api_ports[i]}",
            "-profile=lan",
            "-log-level=warn",
            f"-encrypt={self.key}",
        ]  # fmt: skip
        return self.procs.start(argv, self.log(i), cwd=self.workdir)

    def _connect(self, i: int) -> SerfRpc:
        return SerfRpc(self.api_ports[i])


class MeshmailCluster(Cluster):
    system = "meshmail"
    failed_word = "dead"

    def _spawn(self, i: int) -> subprocess.Popen:
        data_dir = self.workdir / self.names[i]
        data_dir.mkdir()
        config = self.workdir / f"{self.names[i]}.toml"
        config.write_text(
            "[node]\n"
            f'name = "{self.names[i]}"\n'
            'role = "master"\n'
            f'data_dir = "{data_dir}"\n'
            "[gossip]\n"
            f'bind = "{HOST}:{self.gossip_ports[i]}"\n'
            'cluster = "bench"\n'
            f'keys = ["{self.key}"]\n'
            "seeds = []\n"
            'profile = "lan"\n' + "".join(f"{key} = {value!r}\n" for key, value in LAN.items()) + "[http]\n"
            f'bind = "{HOST}:{self.api_ports[i]}"\n'
            "[mx]\n"
            "listen = false\n"  # membership alone is measured here
        )
        return self.procs.start(
            [*meshmail_command(), "run", "--config", str(config)],
            self.log(i),
            cwd=self.workdir,
        )

    def _connect(self, i: int) -> MeshmailHttp:
        # The node writes its API token before its HTTP API listens.
        client = MeshmailHttp(self.api_ports[i], files.read_api_token(self.workdir / self.names[i]))
        if client.name != self.names[i]:
            raise RoundFailed(f"meshmail /status on port {self.api_ports[i]} says node {client.name!r}")
        return client


def meshmail_command() -> list[str]:
    script = Path(sys.executable).with_name("meshmail")
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshmail"]


# --- measuring -------------------------------------------------------------------------


def _watch_all(
    cluster: Cluster,
    indices: list[int],
    done,
    timeout: float,
    *,
    before=None,
    at_start=None,
) -> list[float]:
    """Poll the nodes `indices` concurrently until `done(view)` holds on each of them.

    The clock starts just before `at_start()` (the kill) runs, if given; then each thread
    runs `before(i)` (its join request) if given, and polls every POLL_INTERVAL. Returns
    for each node the seconds from the start to its first satisfying answer; raises
    RoundFailed naming the nodes still waiting after `timeout`.
    """
    go = threading.Event()
    stop = threading.Event()
    t0 = [0.0]
    results: dict[int, float] = {}
    errors: dict[int, str] = {}
    last_view: dict[int, dict[str, str]] = {}

    def run(i: int) -> None:
        go.wait()
        client = cluster.clients[i]
        try:
            if before is not None:
                before(i)
            while not stop.is_set():
                view = client.view()
                if done(view):
                    results[i] = time.monotonic() - t0[0]
                    return
                last_view[i] = view
                time.sleep(POLL_INTERVAL)
        except WATCH_ERRORS as e:  # this round's failure, reported with the node's name
            errors[i] = f"{type(e).__name__}: {e}"
            stop.set()  # the round has failed: the other nodes need not be waited for

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in indices]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    t0[0] = time.monotonic()
    if at_start is not None:
        at_start()
    go.set()
    try:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
    for thread in threads:
        thread.join(2 + 2 * POLL_INTERVAL)
    if errors:
        i, err = next(iter(errors.items()))
        raise RoundFailed(f"{cluster.names[i]}: {err}")
    waiting = [i for i in indices if i not in results]
    if waiting:
        sample = waiting[0]
        raise RoundFailed(
            f"{len(waiting)}/{len(indices)} nodes not done after {timeout:.0f} s "
            f"(e.g. {cluster.names[sample]} sees {last_view.get(sample)})"
        )
    return [results[i] for i in indices]


def measure(cluster: Cluster, args: argparse.Namespace) -> RoundResult:
    """Run one round on a started cluster: join, steady-state traffic, kill -9."""
    cluster.wait_ready(STARTUP_TIMEOUT)
    everyone = set(cluster.names)
    seed = [cluster.seed()]

    def join(i: int) -> None:
        # A join that reached no node can never converge: fail now rather than after the timeout.
        if i and cluster.clients[i].join(seed) < 1:
            raise RoundFailed(f"join through {seed[0]} reached no node")

    def all_alive(view: dict[str, str]) -> bool:
        return everyone <= {name for name, state in view.items() if state == cluster.alive_word}

    joined = _watch_all(cluster, list(range(cluster.n)), all_alive, args.timeout, before=join)
    converged = time.monotonic()

    per_node_rate = None
    if args.sniff:
        time.sleep(SETTLE)
        with Sniffer(set(cluster.gossip_ports)) as sniffer:
            time.sleep(args.window)
        per_node_rate = sniffer.bytes / sniffer.seconds / cluster.n
    time.sleep(max(0.0, converged + MIN_QUIET_BEFORE_KILL - time.monotonic()))

    victim = cluster.n - 1
    name = cluster.names[victim]

    def reported_failed(view: dict[str, str]) -> bool:
        return view.get(name) == cluster.failed_word

    cluster.clients[victim].close()
    survivors = list(range(cluster.n - 1))

    def kill_victim() -> None:
        os.killpg(cluster.nodes[victim].pid, signal.SIGKILL)

    failed = _watch_all(cluster, survivors, reported_failed, args.timeout, at_start=kill_victim)
    return RoundResult(
        join_s=max(joined),
        fail_s=max(failed),
        join_first_s=min(joined),
        join_last_node=cluster.names[joined.index(max(joined))],
        fail_first_s=min(failed),
        bytes_per_node_s=per_node_rate,
    )


def run_round(
    system: str, n: int, r: int, args: argparse.Namespace, procs: Processes, ports: PortPicker
) -> RoundResult:
    """Start a fresh cluster of `system` in its own folder under args.workdir, measure it, and
    stop every node of it. A failed round's error quotes the end of each node's log."""
    workdir = args.workdir / f"{system}-{n}-round{r + 1}"
    workdir.mkdir(parents=True)
    cluster = {"serf": SerfCluster, "meshmail": MeshmailCluster}[system](n, workdir, procs, ports)
    try:
        cluster.start()
        return measure(cluster, args)
    except RoundFailed as e:
        tails = "\n".join(f"  {cluster.log(i).name}:\n{_log_tail(cluster.log(i), 8)}" for i in range(n))
        return RoundResult(error=f"{e}\n{tails}")
    finally:
        cluster.close()


# --- report ----------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(
            argv,
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (out.stdout or out.stderr).strip()


def describe_machine(args: argparse.Namespace) -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    serf_binary = _run(["serf", "version"]).splitlines()
    serf_package = _run(["dpkg-query", "-W", "-f", "${Version}", "serf"])
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    lines = [
        (
            f"machine : nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), "
            f"{cpu}, Linux {platform.release()}"
        ),
        f"serf    : Debian package {serf_package}; binary says {' / '.join(serf_binary[:2])}",
        (
            f"meshmail: {_meshmail_version()} (repo "
            f"{commit if len(commit) < 16 else 'without commits'}), "
            f"command {' '.join(meshmail_command())}"
        ),
        f"python  : {platform.python_version()}, msgpack {'.'.join(map(str, msgpack.version))}",
        "settings: LAN profile on both, " + ", ".join(f"{k} {v}" for k, v in LAN.items()),
        "          (serf: -profile=lan; meshmail: profile lan with each value also written in the config)",
        (
            f"method  : {args.rounds} round(s) per size, nodes polled concurrently every "
            f"{POLL_INTERVAL * 1000:.0f} ms; traffic = IPv4 bytes of TCP+UDP packets to or "
            f"from the gossip ports, sniffed on lo for {args.window:.0f} s from "
            f"{SETTLE:.0f} s after convergence"
        ),
    ]
    return lines


def _meshmail_version() -> str:
    from importlib import metadata

    try:
        return "version " + metadata.version("meshmail")
    except metadata.PackageNotFoundError:
        return "not installed as a package"


FIGURES = [
    ("join_s", "join -> all see all alive (s)", "{:.3f}"),
    ("fail_s", "kill -9 -> all report failed (s)", "{:.2f}"),
    ("bytes_per_node_s", "bytes sent per node per second", "{:.0f}"),
]


def _median(results: list[RoundResult], field: str) -> float | None:
    values = [getattr(r, field) for r in results if getattr(r, field) is not None]
    return statistics.median(values) if values else None


def format_table(
    results: dict[tuple[str, int], list[RoundResult]],
    sizes: list[int],
    systems: list[str],
) -> str:
    header = f"{'median over rounds':34} {'N':>3}"
    for system in systems:
        header += f" {system:>16}"
    if len(systems) == 2:
        header += f" {'/'.join(systems):>15}"
    rows = [header, "-" * len(header)]
    for n in sizes:
        for field, label, fmt in FIGURES:
            row = f"{label:34} {n:>3}"
            medians = []
            for system in systems:
                rounds = results.get((system, n), [])
                value = _median(rounds, field)
                medians.append(value)
                ok = sum(1 for r in rounds if getattr(r, field) is not None)
                cell = "n/a" if value is None else fmt.format(value)
                if ok < len(rounds) or not rounds:
                    cell += f" ({ok}/{len(rounds)})"
                row += f" {cell:>16}"
            if len(systems) == 2:
                a, b = medians
                ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
                row += f" {ratio:>15}"
            rows.append(row)
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_gossip.py",
        description="Compare meshmail gossip with HashiCorp Serf on loopback (LAN profile): "
        "join-to-all-alive time, kill-9-to-all-failed time, bytes sent per node per second.",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per size and system (default 5)")
    parser.add_argument("--sizes", default="8,16", help="cluster sizes, comma separated (default 8,16)")
    parser.add_argument(
        "--short",
        action="store_true",
        help="smoke run: 1 round, N=4, 2 s of traffic counting; fails on errors only, not on the target",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep every node's log in this folder (default: a temporary folder removed at the end)",
    )
    parser.add_argument(
        "--systems",
        default="meshmail,serf",
        help="systems to run, comma separated (default meshmail,serf)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds before a phase fails (default 60)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=10.0,
        help="seconds of traffic counting (default 10)",
    )
    args = parser.parse_args(argv)
    if args.short:
        args.rounds, args.sizes, args.window = 1, "4", 2.0
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of integers: {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 3:
        parser.error("--sizes: each cluster needs at least 3 nodes (a seed, a victim, a survivor)")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - {"meshmail", "serf"}
    if unknown or not args.systems:
        parser.error(f"--systems: choose among meshmail, serf (got {','.join(args.systems)})")
    if args.rounds < 1 or args.timeout <= 0 or args.window <= 0:
        parser.error("--rounds, --timeout and --window must be positive")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_rounds(args: argparse.Namespace, procs: Processes, results: dict[tuple[str, int], list[RoundResult]]) -> None:
    """Every round of every size and system into `results`, each printed as it ends."""
    ports = PortPicker()
    for n in args.sizes:
        for r in range(args.rounds):
            # Alternate which system goes first, so neither always runs on a warmer machine.
            order = args.systems if r % 2 == 0 else args.systems[::-1]
            for system in order:
                result = run_round(system, n, r, args, procs, ports)
                results.setdefault((system, n), []).append(result)
                tag = f"[{system:8} N={n:<2} round {r + 1}/{args.rounds}]"
                if result.error:
                    print(f"{tag} FAILED: {result.error}", flush=True)
                    continue
                rate = "n/a" if result.bytes_per_node_s is None else f"{result.bytes_per_node_s:.0f}"
                print(
                    f"{tag} all alive {result.join_s:.3f} s "
                    f"(first {result.join_first_s:.3f}, last {result.join_last_node}), all report failed "
                    f"{result.fail_s:.2f} s (first {result.fail_first_s:.2f}), "
                    f"{rate} B/node/s",
                    flush=True,
                )


TARGET = "meshmail/serf <= 1.00 on both times"


def missed_targets(results: dict[tuple[str, int], list[RoundResult]], sizes: list[int]) -> list[str]:
    """The times, per size, whose meshmail/serf ratio of medians is over 1.00 or unknown."""
    missed = []
    for n in sizes:
        for field, label, _ in FIGURES[:2]:
            ours = _median(results.get(("meshmail", n), []), field)
            theirs = _median(results.get(("serf", n), []), field)
            if ours is None or not theirs or ours / theirs > 1.0:
                missed.append(f"{label} N={n}")
    return missed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "serf" in args.systems and shutil.which("serf") is None:
        print("bench_gossip: serf not found on PATH (apt-get install serf)", file=sys.stderr)
        return 2
    no_sniff = Sniffer.available()
    args.sniff = no_sniff is None
    # Even when started in the background (where SIGINT is inherited as ignored), Ctrl-C or
    # kill -INT must stop the bench through its clean-up path.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)

    for line in describe_machine(args):
        print(line)
    if no_sniff:
        print(f"traffic : not measured: {no_sniff}")
    print(flush=True)

    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    # Every round's configs, data and logs, in one folder: kept only if --logs names where.
    args.workdir = Path(tempfile.mkdtemp(prefix="meshmail-bench-gossip-", dir=args.logs))
    procs = Processes()
    results: dict[tuple[str, int], list[RoundResult]] = {}
    interrupted = False
    try:
        run_rounds(args, procs, results)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every node", file=sys.stderr)
    finally:
        procs.close()
        if args.logs is not None:
            print(f"logs: {args.workdir}")
        else:
            shutil.rmtree(args.workdir, ignore_errors=True)

    print()
    print(format_table(results, args.sizes, args.systems))
    if interrupted:
        return 130
    if any(r.error for rounds in results.values() for r in rounds):
        return 1
    if len(args.systems) < 2:
        return 0
    if args.short:
        print(f"target: {TARGET} (not judged in short mode)")
        return 0
    missed = missed_targets(results, args.sizes)
    print(f"target: {TARGET}: " + (f"MISSED ({', '.join(missed)})" if missed else "met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
