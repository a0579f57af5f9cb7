"""The IMAP proxy against nginx's mail proxy, with real processes (`make bench-proxy`).

One Dovecot (tests/helpers/mailkit.py) and the same client load three ways in one run:
direct, through nginx's mail proxy (Debian nginx-light + libnginx-mod-mail, its auth answered
by nginx itself, so it pays no external cost) and through a meshmail master whose slave
publishes that Dovecot (real `meshmail run` processes; plain IMAP towards Dovecot, as nginx).
The client speaks IMAP on raw sockets (imaplib's own parsing is slower than either proxy).
Measured: login latency (connect, greeting, LOGIN, SELECT, LOGOUT, one at a time), logins
per second with 50 clients at once, a bulk FETCH of a large mailbox plain and with TLS on the
client side, the proxy's memory per idle session (many sessions in IDLE), and meshmail's p99
login latency while its master sends the full domain map to a newly joined node.

A script, not a test (tests/test_benches.py runs its short mode). Needs root (Dovecot) and
the Debian packages dovecot-imapd, nginx-light and libnginx-mod-mail.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from figures import FAILED, Figure, verdict  # noqa: E402
from helpers import mailkit  # noqa: E402
from helpers.cluster import Cluster, kill_group  # noqa: E402

from meshmail.security import files  # noqa: E402
from meshmail.state.records import DomainRoute  # noqa: E402
from meshmail.state.replica import ClusterState  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "bench.example"
PASSWORD = "bench-password-1"
#: bench logs in for the latency and rate figures, bulk holds the large mailbox, idle idles.
USERS = {f"{name}@{DOMAIN}": PASSWORD for name in ("bench", "bulk", "idle")}
CONCURRENCY = 50
#: Messages of the bulk mailbox, each about this many bytes (base64 body, LF line ends on disk).
MESSAGE_BYTES = 1_000_000
#: Slaves the domains of the synced map route to (the bench's own domain routes to s1).
HOSTING_SLAVES = 100
#: Seconds one socket operation may block, and a setup step (a node loading its map) may take.
IO_TIMEOUT = 60.0
SETUP_TIMEOUT = 900.0
MiB = 1 << 20

# Targets of issue 11 ("Benchmark").
TARGET_ADDED_P50_MS = 0.2
TARGET_BULK_RATIO = 0.9
TARGET_RSS_RATIO = 2.0
TARGET_SYNC_P99_RATIO = 3.0

#: Dovecot tuned so that the backend is cheap for all three ways and holds thousands of
#: sessions: login processes in high-performance mode, imap processes serving many clients
#: (all users share one uid), no per-user+IP connection cap (every client is 127.0.0.1).
DOVECOT_LIMITS = """
default_client_limit = 20000
default_process_limit = 1000
mail_max_userip_connections = 20000
service imap-login {
  service_count = 0
  process_min_avail = 2
  client_limit = 10000
}
service imap {
  service_count = 0
  client_limit = 100
  process_limit = 400
}
service auth {
  client_limit = 20000
}
service anvil {
  client_limit = 20000
}
"""

#: nginx's mail proxy as the peer, after /work/shared/peers/nginx-mail.conf with one addition:
#: an IMAP listener with TLS from the first byte (@NGX_IMAPS@, the certificate @CERT@ @KEY@;
#: TLS 1.3 allowed, which nginx 1.22 leaves off by default and meshmail's Python speaks), and
#: worker_rlimit_nofile for the idle sessions. The auth_http answer comes from nginx
#: itself: every login goes to the one backend, as a single-slave meshmail routes it.
NGINX_CONF = """
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
pid @ROOT@/nginx.pid;
error_log @ROOT@/error.log;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path @ROOT@/body;
  proxy_temp_path @ROOT@/proxy;
  fastcgi_temp_path @ROOT@/fastcgi;
  uwsgi_temp_path @ROOT@/uwsgi;
  scgi_temp_path @ROOT@/scgi;
  map $http_auth_protocol $backend_port { imap @IMAP@; pop3 @POP3@; default @IMAP@; }
  server {
    listen 127.0.0.1:@AUTH@;
    location = /auth {
      add_header Auth-Status OK;
      add_header Auth-Server 127.0.0.1;
      add_header Auth-Port $backend_port;
      return 204;
    }
  }
}
mail {
  auth_http 127.0.0.1:@AUTH@/auth;
  proxy_pass_error_message on;
  proxy_buffer 64k;
  server { listen 127.0.0.1:@NGX_IMAP@; protocol imap; }
  server { listen 127.0.0.1:@NGX_POP3@; protocol pop3; }
  server {
    listen 127.0.0.1:@NGX_IMAPS@ ssl;
    protocol imap;
    ssl_certificate @CERT@;
    ssl_certificate_key @KEY@;
    ssl_protocols TLSv1.2 TLSv1.3;
  }
}
"""


class BenchError(Exception):
    """Something did not work as it must for a figure to mean anything."""


@attrs.frozen
class Sizes:
    logins: int  # sequential logins per way, in `rounds` rounds that take turns
    rounds: int
    rate_seconds: float  # measuring window of the concurrent logins, per way and round
    rate_rounds: int
    mailbox_mb: int
    bulk_repeat: int
    idle: int
    domains: int
    rest_logins: int  # logins measuring meshmail's p99 at rest


FULL = Sizes(logins=1000, rounds=5, rate_seconds=8.0, rate_rounds=2, mailbox_mb=100, bulk_repeat=3, idle=5000,
             domains=1_000_000, rest_logins=1000)  # fmt: skip
SHORT = Sizes(logins=50, rounds=1, rate_seconds=1.0, rate_rounds=1, mailbox_mb=5, bulk_repeat=1, idle=200,
              domains=20_000, rest_logins=50)  # fmt: skip


# --- the client: scripted IMAP exchanges on raw sockets -------------------------------------


@attrs.frozen
class Step:
    """Send `command` (nothing for the greeting), then read until a line starting with
    `expect` ends the answer; `ok` is the word that must follow it."""

    command: bytes
    expect: bytes
    ok: bytes = b"OK"


def login_steps(user: str, last: Iterable[Step] = ()) -> list[Step]:
    return [
        Step(b"", b"*"),
        Step(f"a1 LOGIN {user} {PASSWORD}\r\n".encode(), b"a1"),
        Step(b"a2 SELECT INBOX\r\n", b"a2"),
        *last,
    ]


def session_steps(user: str) -> list[Step]:
    """Connect, greeting, LOGIN, SELECT, LOGOUT: one measured login."""
    return login_steps(user, [Step(b"a3 LOGOUT\r\n", b"a3")])


def idle_steps(user: str) -> list[Step]:
    """A session left in IDLE: the server's continuation request ends it."""
    return login_steps(user, [Step(b"a3 IDLE\r\n", b"+", b"idling")])


def answer_done(buffer: bytes, step: Step) -> bool:
    """Whether `buffer` holds the whole answer to `step`: a complete line starting with its
    `expect` (the last line of an IMAP answer). Raises BenchError if that line is no `ok`."""
    if not buffer.endswith(b"\r\n"):
        return False
    prefix = step.expect + b" "
    at = 0 if buffer.startswith(prefix) else buffer.rfind(b"\r\n" + prefix) + 2
    if at == 1:
        return False
    word = buffer[at + len(prefix) :].split(b" ", 1)[0].rstrip(b"\r\n")
    if word != step.ok:
        raise BenchError(f"expected {step.expect.decode()} {step.ok.decode()}, got {buffer[at : at + 200]!r}")
    return True


def run_steps(sock: socket.socket, steps: list[Step]) -> None:
    """Drive `steps` on a blocking socket."""
    for step in steps:
        if step.command:
            sock.sendall(step.command)
        buffer = b""
        while not answer_done(buffer, step):
            data = sock.recv(65536)
            if not data:
                raise BenchError(f"connection closed waiting for {step.expect!r}: {buffer[-200:]!r}")
            buffer += data


def timed_session(port: int, user: str) -> float:
    """Seconds of one login session (connect to close), one at a time."""
    start = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        run_steps(sock, session_steps(user))
    return time.perf_counter() - start


class Connection:
    __slots__ = ("sock", "port", "step", "buffer", "connecting")

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.step = 0
        self.buffer = b""
        self.connecting = True


class Swarm:
    """Many scripted connections at once on non-blocking sockets and one selector: a client
    that costs a few syscalls per IMAP line, far less than the servers it drives. New
    connections go to `ports` in turn."""

    def __init__(self, ports: Sequence[int], steps: list[Step]) -> None:
        self.ports = ports
        self.steps = steps
        self.selector = selectors.DefaultSelector()
        self.open_count = 0
        self.opened = 0

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        port = self.ports[self.opened % len(self.ports)]
        sock.connect_ex((HOST, port))
        self.selector.register(sock, selectors.EVENT_WRITE, Connection(sock, port))
        self.open_count += 1
        self.opened += 1

    def poll(self) -> list[Connection]:
        """Move every ready connection on; the ones whose script ended (unregistered, not closed)."""
        done = []
        events = self.selector.select(IO_TIMEOUT)
        if not events:
            raise BenchError(f"no answer within {IO_TIMEOUT:.0f} s on ports {self.ports}")
        for key, _ in events:
            conn: Connection = key.data
            if conn.connecting:
                error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise BenchError(f"connect to port {conn.port}: {os.strerror(error)}")
                conn.connecting = False
                self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
                continue
            data = conn.sock.recv(65536)
            if not data:
                raise BenchError(f"port {conn.port} closed a session at step {conn.step}: {conn.buffer[-200:]!r}")
            conn.buffer += data
            while answer_done(conn.buffer, self.steps[conn.step]):
                conn.buffer = b""
                conn.step += 1
                if conn.step == len(self.steps):
                    self.selector.unregister(conn.sock)
                    self.open_count -= 1
                    done.append(conn)
                    break
                conn.sock.send(self.steps[conn.step].command)
        return done

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of `pids` so far (from /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Rate:
    logins_per_s: float
    client_busy: float  # the client's CPU seconds over the window's seconds
    proxy_cpu_ms: float  # the proxy's CPU milliseconds per login (0 for direct)


def login_rate(ports: Sequence[int], seconds: float, proxy_pids: Callable[[], list[int]]) -> Rate:
    """Logins per second with CONCURRENCY sessions at all times (each one connects to the
    next of `ports`, logs in, selects, logs out), counted over `seconds` after a one-second
    warm-up."""
    swarm = Swarm(ports, session_steps(f"bench@{DOMAIN}"))
    try:
        for _ in range(CONCURRENCY):
            swarm.open()
        warm_until = time.perf_counter() + 1.0
        while time.perf_counter() < warm_until:
            for conn in swarm.poll():
                conn.sock.close()
                swarm.open()
        pids = proxy_pids()
        count = 0
        start, cpu, proxy_cpu = time.perf_counter(), time.process_time(), cpu_seconds(pids)
        end = start + seconds
        while time.perf_counter() < end:
            for conn in swarm.poll():
                conn.sock.close()
                count += 1
                swarm.open()
        wall = time.perf_counter() - start
        return Rate(count / wall, (time.process_time() - cpu) / wall, (cpu_seconds(pids) - proxy_cpu) * 1000 / count)
    finally:
        swarm.close()


def open_idle_sessions(port: int, count: int) -> list[socket.socket]:
    """`count` sessions logged in and in IDLE, opened CONCURRENCY at a time; their sockets."""
    swarm = Swarm([port], idle_steps(f"idle@{DOMAIN}"))
    idle: list[socket.socket] = []
    try:
        started = 0
        while len(idle) < count:
            while swarm.open_count < CONCURRENCY and started < count:
                swarm.open()
                started += 1
            idle += [conn.sock for conn in swarm.poll()]
    except BaseException:
        for sock in idle:
            sock.close()
        raise
    finally:
        swarm.close()
    return idle


def bulk_fetch(port: int, context: ssl.SSLContext | None) -> tuple[float, int, str]:
    """FETCH of every message of the bulk mailbox (BODY.PEEK[]); (MB/s, bytes, TLS cipher)."""
    raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    sock = context.wrap_socket(raw, server_hostname=HOST) if context else raw
    with sock:
        run_steps(sock, login_steps(f"bulk@{DOMAIN}"))
        buffer = bytearray(4 * MiB)
        view = memoryview(buffer)
        received = 0
        tail = b""
        start = time.perf_counter()
        sock.sendall(b"a3 FETCH 1:* BODY.PEEK[]\r\n")
        # The bodies are base64 lines: no line of them starts with "a3 ".
        while not (tail.endswith(b"\r\n") and b"\r\na3 " in tail):
            n = sock.recv_into(view)
            if n == 0:
                raise BenchError(f"connection closed during the FETCH after {received:,} bytes")
            received += n
            tail = (tail + bytes(view[: min(n, 256)] if n < 256 else view[n - 256 : n]))[-256:]
        seconds = time.perf_counter() - start
        if b"\r\na3 OK" not in tail:
            raise BenchError(f"FETCH failed: {tail!r}")
        run_steps(sock, [Step(b"a4 LOGOUT\r\n", b"a4")])
        cipher = sock.cipher()[0] if isinstance(sock, ssl.SSLSocket) else ""
    return received / seconds / 1e6, received, cipher


# --- the systems under test -------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def fill_mailbox(dovecot: mailkit.Dovecot, address: str, count: int, size: int) -> None:
    """Write `count` messages of about `size` bytes into `address`'s INBOX (Maildir cur/, seen)."""
    maildir = dovecot.maildir(address)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    body = base64.encodebytes(os.urandom(size * 3 // 4))
    stamp = int(time.time())
    for i in range(count):
        head = f"From: sender@{DOMAIN}\nTo: {address}\nSubject: message {i}\nMessage-ID: <{i}.{stamp}@{DOMAIN}>\n\n"
        (maildir / "cur" / f"{stamp}.M{i}P1.bench:2,S").write_bytes(head.encode() + body)
    home = maildir.parent
    for folder in [home.parent, home, *home.rglob("*")]:
        os.chown(folder, mailkit.MAIL_UID, mailkit.MAIL_GID)


class Nginx:
    """nginx's mail proxy from NGINX_CONF in `root`, in front of `dovecot`."""

    def __init__(self, root: Path, dovecot: mailkit.Dovecot, cert: Path, key: Path) -> None:
        self.root = root
        root.mkdir()
        auth, self.imap, pop3, self.imaps = mailkit.free_ports(4)
        values = {"@ROOT@": str(root), "@IMAP@": str(dovecot.ports["imap"]), "@POP3@": str(dovecot.ports["pop3"]),
                  "@AUTH@": str(auth), "@NGX_IMAP@": str(self.imap), "@NGX_POP3@": str(pop3),
                  "@NGX_IMAPS@": str(self.imaps), "@CERT@": str(cert), "@KEY@": str(key)}  # fmt: skip
        text = NGINX_CONF
        for name, value in values.items():
            text = text.replace(name, value)
        self.config = root / "nginx.conf"
        self.config.write_text(text)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        argv = ["nginx", "-c", str(self.config), "-p", str(self.root), "-e", str(self.root / "error.log"),
                "-g", "daemon off;"]  # fmt: skip
        with open(self.root / "nginx.out", "ab") as out:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + mailkit.START_TIMEOUT
        while not all(mailkit._accepts(HOST, port) for port in (self.imap, self.imaps)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"nginx did not start: {self.log_tail()}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The master and its workers."""
        assert self.process is not None
        return [self.process.pid, *children(self.process.pid)]

    def log_tail(self) -> str:
        return mailkit._tail(self.root / "nginx.out", self.root / "error.log")

    def stop(self) -> None:
        if self.process is not None:
            kill_group(self.process)


def fill_state(data_dir: Path, count: int) -> None:
    """Write `count` domain routes into a stopped node's state, as if 100 hosting slaves had
    published them: what a master of a large cluster loads from its journal when it starts."""
    state = ClusterState.open(data_dir / files.STATE, "m1", lambda: int(time.time() * 1000), fsync=False)
    try:
        routes = [DomainRoute(f"hosting-{i}", "slave") for i in range(HOSTING_SLAVES)]
        batch = 50_000
        for first in range(0, count, batch):
            state.write_domains((f"customer{i}.example", routes[i % HOSTING_SLAVES])
                                for i in range(first, min(count, first + batch)))  # fmt: skip
        state.compact()
    finally:
        state.close()


def wait_quiet(pids: list[int], busy: float = 0.1) -> None:
    """Wait until `pids` together use less than `busy` of a core over a second (at most
    SETUP_TIMEOUT)."""
    deadline = time.monotonic() + SETUP_TIMEOUT
    used = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        used, last = cpu_seconds(pids), used
        if used - last < busy:
            return
    raise BenchError(f"processes {pids} still busy after {SETUP_TIMEOUT:.0f} s")


def domains_of(fleet: Cluster, name: str) -> int:
    return fleet.status(name)["state"]["domains"]


def start_node(fleet: Cluster, name: str) -> None:
    node = fleet._node(name)
    node.spawn()
    node.wait_ready(SETUP_TIMEOUT)


class Meshmail:
    """A master m1 with [proxy] holding `domains` routes, and a slave s1 publishing the
    Dovecot's domain; m2 joins later as the newly joined node of the sync figure (a master
    with the same [proxy], which the split figure then uses)."""

    def __init__(self, root: Path, dovecot: mailkit.Dovecot, cert: Path, key: Path, domains: int) -> None:
        root.mkdir()
        self.fleet = Cluster(root)
        self.dovecot = dovecot
        self.cert, self.key = cert, key
        self.domains = domains
        self.imap = self.imaps = 0

    def start(self) -> None:
        fleet = self.fleet
        fleet.init("m1")
        fill_state(fleet.data_dir("m1"), self.domains)
        self.add_proxy("m1")
        start_node(fleet, "m1")
        fleet.wait_alive(["m1"])
        if fleet.join("s1", fleet.token("m1", "slave"), "slave").returncode != 0:
            raise BenchError(f"s1 could not join:\n{fleet.logs()}")
        fleet.append_config(
            "s1",
            f"""
[endpoints]
imap = {{ address = "{HOST}:{self.dovecot.ports["imap"]}", transport = "plain" }}

[slave]
poll_interval = 0.2
settle = 0.5

[[slave.sources]]
type = "dovecot"
path = "{self.dovecot.passwd}"
""",
        )
        start_node(fleet, "s1")
        fleet.wait_alive(["m1", "s1"])
        total = self.domains + 1
        fleet.wait(
            "the map on m1 and s1",
            ["m1", "s1"],
            lambda statuses: all(s["state"]["domains"] >= total for s in statuses.values()),
            SETUP_TIMEOUT,
        )
        # Both stay busy for a while after the full sync to s1: measure once they are quiet.
        wait_quiet([fleet.processes[name].pid for name in ("m1", "s1")])
        self.imap, self.imaps = self.ports("m1")

    def add_proxy(self, name: str) -> None:
        """Give master `name` (not started yet) the [proxy] of the bench: IMAP and IMAPS only."""
        self.fleet.append_config(
            name,
            f"""
[proxy]
imap = "{HOST}:0"
imaps = "{HOST}:0"
pop3 = false
pop3s = false
submission = false
submissions = false
cert = "{self.cert}"
key = "{self.key}"
max_sessions = 20000
max_sessions_per_client = 20000
""",
        )

    def ports(self, name: str) -> tuple[int, int]:
        """The IMAP and IMAPS ports of master `name`'s proxy (from its ready file)."""
        ports = json.loads(self.fleet._node(name).ready.read_text())
        return int(ports["imap"].rsplit(":", 1)[1]), int(ports["imaps"].rsplit(":", 1)[1])

    def pids(self) -> list[int]:
        return [self.fleet.processes["m1"].pid]

    def sessions(self) -> int | None:
        """Sessions open on m1's proxy; None when /status does not answer in time (a master
        closing thousands of sessions at once on a busy machine may take longer)."""
        try:
            return sum(self.fleet.status("m1")["proxy"]["sessions"].values())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self.fleet.close()


# --- the measurements -----------------------------------------------------------------------


@attrs.define
class Way:
    """One way to reach the Dovecot: its plain and TLS IMAP ports and the processes in between."""

    name: str
    imap: int
    imaps: int
    context: ssl.SSLContext
    pids: Callable[[], list[int]]
    latencies: list[float] = attrs.Factory(list)
    rates: list[Rate] = attrs.Factory(list)
    bulk: dict[str, float] = attrs.Factory(dict)
    ciphers: set[str] = attrs.Factory(set)
    idle_kib: float | None = None


def quantile(values: list[float], q: int) -> float:
    """The q-th percentile, interpolated between the values measured (never beyond the largest)."""
    return values[0] if len(values) == 1 else statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure_latency(ways: list[Way], sizes: Sizes) -> None:
    """`sizes.logins` sequential sessions per way, in rounds that take turns between the ways."""
    user = f"bench@{DOMAIN}"
    for way in ways:
        for _ in range(5):
            timed_session(way.imap, user)  # warm-up: connections, processes, caches
    per_round = max(1, sizes.logins // sizes.rounds)
    for r in range(sizes.rounds):
        for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
            way.latencies += [timed_session(way.imap, user) for _ in range(per_round)]


def measure_rate(ways: list[Way], sizes: Sizes) -> None:
    for r in range(sizes.rate_rounds):
        for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
            way.rates.append(login_rate([way.imap], sizes.rate_seconds, way.pids))


def measure_bulk(ways: list[Way], sizes: Sizes) -> int:
    """Best MB/s of `sizes.bulk_repeat` FETCHes per way, plain and TLS; the bytes of one."""
    bulk_fetch(ways[0].imap, None)  # Dovecot builds its index and cache, the page cache fills
    size = 0
    for kind in ("plain", "tls"):
        for _ in range(sizes.bulk_repeat):
            for way in ways:
                rate, size, cipher = bulk_fetch(way.imaps if kind == "tls" else way.imap,
                                                way.context if kind == "tls" else None)  # fmt: skip
                way.bulk[kind] = max(way.bulk.get(kind, 0.0), rate)
                if cipher:
                    way.ciphers.add(cipher)
    return size


def measure_idle(way: Way, count: int, sessions: Callable[[], int | None] | None) -> None:
    """KiB of RSS per idle session of the proxy's processes: the delta over a baseline, taken
    a second after `count` sessions reached IDLE, over `count`. `sessions` is what the
    proxy reports, checked before and after (None: it reports nothing)."""
    before = sum(rss_kib(pid) for pid in way.pids())
    idle = open_idle_sessions(way.imap, count)
    try:
        time.sleep(1.0)
        after = sum(rss_kib(pid) for pid in way.pids())
        if sessions is not None:
            wait_sessions(way, sessions, lambda n: n >= count, f"{count} sessions open")
    finally:
        for sock in idle:
            sock.close()
    way.idle_kib = (after - before) / count
    if sessions is not None:
        wait_sessions(way, sessions, lambda n: n == 0, "no session left after the clients closed")
    time.sleep(1.0)  # nginx's and Dovecot's processes close theirs too


def wait_sessions(way: Way, sessions: Callable[[], int | None], done: Callable[[int], bool], what: str) -> None:
    deadline = time.monotonic() + 2 * IO_TIMEOUT
    while (found := sessions()) is None or not done(found):
        if time.monotonic() > deadline:
            raise BenchError(f"{way.name}: not {what} within {2 * IO_TIMEOUT:.0f} s (it reports {found})")
        time.sleep(0.5)


@attrs.frozen
class Sync:
    rest: list[float]
    during: list[float]
    refused_rest: int  # logins answered NO (e.g. [UNAVAILABLE]) at rest
    refused_during: int
    seconds: float


def measure_sync(mesh: Meshmail, sizes: Sizes) -> Sync:
    """meshmail's login latency at rest, then while m1 sends its whole map to m2, a master
    joining the cluster (run with nice 19, so that it takes the CPU m1 and the client leave,
    as if it ran on its own machine; its apply() does not slow m1 down). A login answered
    NO is counted, not fatal: the proxy refuses logins while it holds the slave for dead."""
    fleet = mesh.fleet
    samples: list[tuple[float, float, bool]] = []  # (start, seconds, logged in)
    stop = threading.Event()
    failures: list[BaseException] = []

    def logins() -> None:
        try:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    samples.append((start, timed_session(mesh.imap, f"bench@{DOMAIN}"), True))
                except BenchError:
                    samples.append((start, time.perf_counter() - start, False))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def run_while(busy: Callable[[], bool]) -> None:
        stop.clear()
        thread = threading.Thread(target=logins, daemon=True)
        thread.start()
        try:
            while busy() and not failures:
                time.sleep(0.2)
        finally:
            stop.set()
            thread.join(IO_TIMEOUT)
        if failures:
            raise BenchError(f"a login failed: {failures[0]!r}")

    def resting() -> bool:
        mesh.sessions()  # the main thread polls m1's /status as it polls m2's during the sync
        return len(samples) < sizes.rest_logins

    run_while(resting)
    rest = [seconds for _, seconds, ok in samples if ok]
    refused_rest = len(samples) - len(rest)
    samples.clear()
    if fleet.join("m2", fleet.token("m1", "master"), "master").returncode != 0:
        raise BenchError(f"m2 could not join:\n{fleet.logs()}")
    mesh.add_proxy("m2")
    node = fleet._node("m2")
    node.prefix = ["nice", "-n", "19"]
    total = mesh.domains + 1
    window: list[float] = []
    deadline = time.monotonic() + SETUP_TIMEOUT

    def syncing() -> bool:
        if not window:
            window.append(time.perf_counter())
            node.spawn()
            return True
        if node.exited() is not None or time.monotonic() > deadline:
            raise BenchError(f"m2 never held the whole map:\n{node.log_tail()}")
        if node.http_port is None:
            if node.ready.exists():
                node.wait_ready()
            return True
        try:
            if len(window) == 1 and domains_of(fleet, "m2") >= total:
                window.append(time.perf_counter())
        except (OSError, ValueError):
            pass  # not serving yet
        return len(window) == 1 or sum(1 for start, *_ in samples if start >= window[0]) < 20

    run_while(syncing)
    window_samples = [(seconds, ok) for start, seconds, ok in samples if window[0] <= start <= window[1]]
    during = [seconds for seconds, ok in window_samples if ok]
    during = during or [seconds for start, seconds, ok in samples if start >= window[0] and ok][:1]
    if not rest or not during:
        raise BenchError("every meshmail login was refused at rest or during the sync")
    refused = sum(1 for _, ok in window_samples if not ok)
    return Sync(rest, during, refused_rest, refused, window[1] - window[0])


@attrs.frozen
class Split:
    """Logins/s of m1's proxy alone and of the same clients split over m1's and m2's (best
    round of each), and the proxies' CPU per login (median round)."""

    one: float
    two: float
    cpu_one: float
    cpu_two: float


def measure_split(mesh: Meshmail, sizes: Sizes) -> Split:
    """What a second proxy process adds on this machine (issue 11 asks to measure before
    adding worker processes): the concurrent logins through m1 alone, and in turns with it
    the same clients split over m1 and m2, a master whose proxy serves the same routes (its
    nice undone after the sync, every thread of it)."""
    fleet = mesh.fleet
    pids = [fleet.processes[name].pid for name in ("m1", "m2")]
    for task in os.listdir(f"/proc/{pids[1]}/task"):
        os.setpriority(os.PRIO_PROCESS, int(task), 0)
    wait_quiet(pids)
    ports = [mesh.imap, mesh.ports("m2")[0]]
    one: list[Rate] = []
    two: list[Rate] = []
    for _ in range(sizes.rate_rounds):
        one.append(login_rate(ports[:1], sizes.rate_seconds, lambda: pids[:1]))
        two.append(login_rate(ports, sizes.rate_seconds, lambda: pids))
    return Split(
        max(r.logins_per_s for r in one),
        max(r.logins_per_s for r in two),
        statistics.median(r.proxy_cpu_ms for r in one),
        statistics.median(r.proxy_cpu_ms for r in two),
    )


# --- the report -------------------------------------------------------------------------------


@attrs.frozen
class Row:
    """One line of the table: a value per way (None: not measured that way), the ratio
    meshmail / nginx (or as `ratio` says) and the target, if any."""

    label: str
    values: tuple[float | None, float | None, float | None]
    digits: int = 2
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None


def ms(seconds: float) -> float:
    return seconds * 1000


def rows_of(ways: list[Way], sync: Sync, split: Split, sizes: Sizes) -> list[Row]:
    direct, nginx, mesh = ways

    def each(value: Callable[[Way], float | None], proxies_only: bool = False) -> tuple:
        return tuple(None if proxies_only and way is direct else value(way) for way in ways)

    def ratio(values: tuple) -> float | None:
        return values[2] / values[1] if values[1] and values[2] is not None else None

    p50 = each(lambda w: ms(statistics.median(w.latencies)))
    p99 = each(lambda w: ms(quantile(w.latencies, 99)))
    added = (None, p50[1] - p50[0], p50[2] - p50[0])
    rate = each(lambda w: max(r.logins_per_s for r in w.rates))
    cpu = each(lambda w: statistics.median(r.proxy_cpu_ms for r in w.rates), proxies_only=True)
    busy = each(lambda w: 100 * max(r.client_busy for r in w.rates))
    plain = each(lambda w: w.bulk["plain"])
    tls = each(lambda w: w.bulk["tls"])
    idle = each(lambda w: w.idle_kib, proxies_only=True)
    rest99, during99 = ms(quantile(sync.rest, 99)), ms(quantile(sync.during, 99))
    refused = sync.refused_rest + sync.refused_during
    mailbox = f"{sizes.mailbox_mb} MB"
    return [
        Row("login latency p50 (ms)", p50, ratio=ratio(p50)),
        Row("  added over direct (ms)", added, ratio=ratio(added),
            target=f"<= nginx's + {TARGET_ADDED_P50_MS} ms", ok=added[2] <= added[1] + TARGET_ADDED_P50_MS),
        Row("login latency p99 (ms)", p99, ratio=ratio(p99)),
        Row(f"logins/s, {CONCURRENCY} clients at once", rate, 0, ratio(rate), ">= nginx", rate[2] >= rate[1]),
        Row("  proxy CPU per login (ms)", cpu, ratio=ratio(cpu)),
        Row("  client CPU busy (% of one core)", busy, 0),
        Row("meshmail logins/s, one master (after the sync)", (None, None, split.one), 0),
        Row("  proxy CPU per login (ms)", (None, None, split.cpu_one)),
        Row("  split over two masters' proxies: logins/s", (None, None, split.two), 0, ratio=split.two / split.one),
        Row("  their CPU per login (ms)", (None, None, split.cpu_two), ratio=split.cpu_two / split.cpu_one),
        Row(f"bulk FETCH of {mailbox}, plain (MB/s)", plain, 0, ratio(plain), f">= {TARGET_BULK_RATIO} x nginx",
            plain[2] >= TARGET_BULK_RATIO * plain[1]),
        Row(f"bulk FETCH of {mailbox}, TLS (MB/s)", tls, 0, ratio(tls), f">= {TARGET_BULK_RATIO} x nginx",
            tls[2] >= TARGET_BULK_RATIO * tls[1]),
        Row(f"RSS per idle session, {sizes.idle:,} in IDLE (KiB)", idle, 1, ratio(idle),
            f"<= {TARGET_RSS_RATIO:g} x nginx", idle[2] <= TARGET_RSS_RATIO * idle[1]),
        Row("meshmail login p99 at rest (ms)", (None, None, rest99)),
        Row(f"  during a full sync of {sizes.domains:,} domains (ms)", (None, None, during99),
            ratio=during99 / rest99, target=f"<= {TARGET_SYNC_P99_RATIO:g} x at rest",
            ok=during99 <= TARGET_SYNC_P99_RATIO * rest99),
        Row("  longest login at rest (ms)", (None, None, ms(max(sync.rest)))),
        Row("  longest login during the sync (ms)", (None, None, ms(max(sync.during))),
            ratio=max(sync.during) / max(sync.rest)),
        Row("  logins refused (NO), at rest and during the sync", (None, None, float(refused)), 0, target="none",
            ok=refused == 0),
    ]  # fmt: skip


def print_table(rows: list[Row], short: bool) -> None:
    width = max(len(row.label) for row in rows)
    print(f"{'measure':{width}}  {'direct':>9}  {'nginx':>9}  {'meshmail':>9}  {'ratio':>6}  {'target':28}  verdict")
    for row in rows:
        cells = "  ".join("-".rjust(9) if v is None else f"{v:9.{row.digits}f}" for v in row.values)
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        judged = "" if row.ok is None else "(short)" if short else "ok" if row.ok else "MISSED"
        print(f"{row.label:{width}}  {cells}  {ratio:>6}  {row.target:28}  {judged}".rstrip())


def report(ways: list[Way], sync: Sync, split: Split, sizes: Sizes, fetched: int, short: bool) -> list[Figure]:
    rows = rows_of(ways, sync, split, sizes)
    print()
    print(f"meshmail proxy benchmark: one Dovecot, direct / nginx mail proxy / meshmail master; "
          f"nproc {os.cpu_count()}, {platform.machine()}, Python {platform.python_version()}")  # fmt: skip
    print_table(rows, short)
    print()
    print("ratio: meshmail / nginx (for the sync rows: during / at rest; for the two-master rows: two masters / "
          "one, measured in turns after the sync). Latency: "
          f"{len(ways[0].latencies)} sessions per way, one at a time, in {sizes.rounds} rounds taking turns. "
          f"Rate: best of {sizes.rate_rounds} x {sizes.rate_seconds:g} s.")  # fmt: skip
    print(f"Bulk: best of {sizes.bulk_repeat}, {fetched:,} bytes on the wire per FETCH; TLS ciphers: "
          + "; ".join(f"{w.name} {'/'.join(sorted(w.ciphers))}" for w in ways)
          + " (direct TLS is Dovecot's own imaps).")  # fmt: skip
    print(f"Sync: m2 held the whole map {sync.seconds:.1f} s after it started; meshmail logins: "
          f"{len(sync.rest)} at rest, {len(sync.during)} during the sync; "
          f"refused (NO, e.g. [UNAVAILABLE] while m1 held s1 for dead): {sync.refused_rest} at rest, "
          f"{sync.refused_during} during.")  # fmt: skip
    return [Figure(row.label.strip(), "", row.target, row.ok) for row in rows if row.ok is not None]


# --- the run ----------------------------------------------------------------------------------


def missing() -> list[str]:
    problems = mailkit.unavailable("dovecot")
    if shutil.which("nginx") is None or not Path("/usr/lib/nginx/modules/ngx_mail_module.so").exists():
        problems.append("nginx's mail proxy not installed (apt-get install nginx-light libnginx-mod-mail)")
    return problems


def run(root: Path, sizes: Sizes, short: bool) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    if hard < 2 * sizes.idle + 1000:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} is too low for {sizes.idle:,} idle sessions")
    cert, key = mailkit.write_certificate(root / "proxy-tls")
    dovecot = mailkit.Dovecot(root / "dovecot", USERS, extra_config=DOVECOT_LIMITS)
    nginx = Nginx(root / "nginx", dovecot, cert, key)
    mesh = Meshmail(root / "meshmail", dovecot, cert, key, sizes.domains)
    try:
        fill_mailbox(dovecot, f"bench@{DOMAIN}", 20, 5_000)
        fill_mailbox(dovecot, f"bulk@{DOMAIN}", sizes.mailbox_mb * 1_000_000 // MESSAGE_BYTES, MESSAGE_BYTES)
        dovecot.start()
        nginx.start()
        print(f"meshmail: m1 holds {sizes.domains:,} domains; starting m1 and s1 ...", flush=True)
        mesh.start()
        proxy_context = ssl.create_default_context(cafile=str(cert))
        ways = [
            Way("direct", dovecot.ports["imap"], dovecot.ports["imaps"], dovecot.client_context(), lambda: []),
            Way("nginx", nginx.imap, nginx.imaps, proxy_context, nginx.pids),
            Way("meshmail", mesh.imap, mesh.imaps, proxy_context, mesh.pids),
        ]
        print("login latency ...", flush=True)
        measure_latency(ways, sizes)
        print(f"logins/s with {CONCURRENCY} clients ...", flush=True)
        measure_rate(ways, sizes)
        print("bulk FETCH ...", flush=True)
        fetched = measure_bulk(ways, sizes)
        print(f"{sizes.idle:,} idle sessions ...", flush=True)
        measure_idle(ways[1], sizes.idle, None)
        measure_idle(ways[2], sizes.idle, mesh.sessions)
        print(f"login latency during a full sync of {sizes.domains:,} domains ...", flush=True)
        sync = measure_sync(mesh, sizes)
        print("logins/s split over two masters ...", flush=True)
        split = measure_split(mesh, sizes)
    except (BenchError, AssertionError, RuntimeError, OSError) as exc:
        print(f"bench-proxy failed: {exc}", file=sys.stderr)
        logs = {"dovecot": dovecot.log_tail(), "nginx": nginx.log_tail(), "meshmail": mesh.fleet.logs()}
        for name, tail in logs.items():
            print(f"--- {name}:\n{tail[-4000:]}", file=sys.stderr)
        return FAILED
    finally:
        mesh.close()
        nginx.stop()
        dovecot.close()
    return verdict(report(ways, sync, split, sizes, fetched, short), short)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--short",
        action="store_true",
        help=f"smoke run: {SHORT.logins} logins, a {SHORT.mailbox_mb} MB mailbox, {SHORT.idle} idle sessions, "
        f"{SHORT.domains:,} domains; fails on errors only",
    )
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (new or empty) and keep its files and logs there")
    args = parser.parse_args()
    problems = missing()
    if problems:
        print("bench-proxy: " + "; ".join(problems), file=sys.stderr)
        return 2
    sizes = SHORT if args.short else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            return run(Path(args.keep).resolve(), sizes, args.short)
        with tempfile.TemporaryDirectory(prefix="meshmail-bench-proxy-") as root:
            return run(Path(root), sizes, args.short)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
