"""The MX against Postfix, with real processes (`make bench-mx`).

Postfix's own load generator, smtp-source, sends the same mail (N messages of 10 KB over S
sessions, several messages per session) to two inbound servers, each in front of a kit
Dovecot of its own (tests/helpers/mailkit.py) that takes mail over LMTP:

- Postfix (the kit's: smtpd, cleanup, qmgr, its lmtp client to the Dovecot), and
- a meshmail master m1 whose slave s1 publishes that Dovecot's LMTP endpoint (real
  `meshmail run` processes, tests/helpers/cluster.py).

Measured in one run: delivered messages per second while the Dovecot runs (Postfix relays,
meshmail delivers in-line before its 250); accepted messages per second while the Dovecot is
stopped (Postfix queues, fsync'd, its next hop refusing connections; meshmail queues, fsync'd,
its slave publishing the endpoint down); then, the Dovecot started again, the time until each
queue is in the mailbox. A full run does this three times on fresh systems and reports each
figure's median round (single rounds move with the shared machine's load).
A script, not a test (tests/test_benches.py runs its short mode).
Needs root (Dovecot and Postfix) and the Debian packages postfix and dovecot-lmtpd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from figures import FAILED, Figure, verdict  # noqa: E402
from helpers import mailkit  # noqa: E402
from helpers.cluster import Cluster  # noqa: E402
from helpers.config import set_key  # noqa: E402

from meshmail.security import files  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "bench.example"
SMTP_SOURCE = "/usr/sbin/smtp-source"
#: One recipient per phase, so each phase's mail is counted in a mailbox of its own.
RECIPIENTS = {phase: f"{phase}@{DOMAIN}" for phase in ("warm", "live", "queue", "shadow")}
USERS = {address: "bench-password-1" for address in RECIPIENTS.values()}
#: Messages sent to each server before the measured phases (processes forked, caches warm).
WARM_MESSAGES = 20
#: The slave probes its endpoints this often (the default is 5 s): how soon it publishes the
#: Dovecot down, and up again when it is back (part of meshmail's drain time).
PROBE_INTERVAL = 1.0
#: m1's MX: every message of the bench comes from 127.0.0.1, so the per-client limits go.
MX_SETTINGS = {"hostname": "mx.bench.test", "max_sessions_per_client": 1000, "connections_per_minute": 1_000_000,
               "messages_per_minute": 1_000_000}  # fmt: skip
#: Seconds one phase (sending, or waiting for a mailbox or a queue) may take.
PHASE_TIMEOUT = 600.0
POLL = 0.02
#: How often the bench asks m1's /status whether it sees the LMTP endpoint up while its queue
#: drains: each answer costs m1 some 8 ms of CPU (a TLS connection and the whole document),
#: CPU the drain needs (Postfix is asked nothing while its queue drains).
UP_POLL = 0.25

# Targets of issue 12 ("Benchmark"): queue path at least Postfix's acceptance rate, in-line
# at least 0.8 x Postfix's relay rate, drain time at most Postfix's.
TARGET_QUEUE_RATIO = 1.0
TARGET_INLINE_RATIO = 0.8
TARGET_DRAIN_RATIO = 1.0


class BenchError(Exception):
    """Something did not work as it must for a figure to mean anything."""


@attrs.frozen
class Sizes:
    messages: int
    sessions: int
    message_bytes: int


FULL = Sizes(messages=2000, sessions=20, message_bytes=10_240)
#: Rounds of a full run, each on fresh systems: the table gives each figure's median round, as
#: the machine's load from other tenants moves single rounds of either system by up to 2x.
FULL_ROUNDS = 3
SHORT = Sizes(messages=100, sessions=5, message_bytes=10_240)


# --- the load and the mailboxes ---------------------------------------------------------------


def smtp_source(port: int, recipient: str, messages: int, sessions: int, size: int) -> float:
    """Send `messages` of `size` bytes to `recipient` over `sessions` parallel SMTP sessions,
    each sending message after message on one connection (smtp-source -d); the seconds from
    the first connection until the last 250. Raises BenchError when a server refuses."""
    argv = [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-M", "client.bench.test", "-f", "sender@client.bench.test", "-t", recipient, f"{HOST}:{port}"]  # fmt: skip
    start = time.perf_counter()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=PHASE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"smtp-source to port {port} still running after {PHASE_TIMEOUT:.0f} s") from exc
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"smtp-source to port {port} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return seconds


def mailbox_count(dovecot: mailkit.Dovecot, address: str) -> int:
    """Messages in `address`'s INBOX (Dovecot's LMTP writes them to new/)."""
    maildir = dovecot.maildir(address)
    total = 0
    for sub in ("new", "cur"):
        try:
            total += sum(1 for _ in os.scandir(maildir / sub))
        except FileNotFoundError:
            pass
    return total


def wait_for(what: str, done: Callable[[], bool], timeout: float = PHASE_TIMEOUT, every: float = POLL) -> float:
    """Poll `done` every `every` seconds; the perf_counter() when it first held."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.perf_counter()


class Watch:
    """`wait_for` in a thread of its own, every `every` seconds: `seen()` joins it and gives
    the perf_counter() when `done` first held, or raises what stopped it."""

    def __init__(self, what: str, done: Callable[[], bool], every: float) -> None:
        self._result: float | BaseException = BenchError(f"{what}: the watch never ended")

        def watch() -> None:
            try:
                self._result = wait_for(what, done, every=every)
            except BaseException as exc:  # noqa: BLE001 (raised again by seen())
                self._result = exc

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def seen(self) -> float:
        self._thread.join(PHASE_TIMEOUT)
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


def group_cpu(group: int) -> float:
    """CPU seconds (user + system, with reaped children's) of the processes in process group
    `group`: a server's master and the workers it forks."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == group:
            total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def wait_mailbox(what: str, dovecot: mailkit.Dovecot, address: str, count: int) -> float:
    """`wait_for` until `address`'s INBOX holds `count` messages."""
    return wait_for(what, lambda: mailbox_count(dovecot, address) >= count)


# --- meshmail ---------------------------------------------------------------------------------


class Meshmail:
    """A master m1 with its MX on 127.0.0.1 (client limits raised: every message comes from
    127.0.0.1), and a slave s1 publishing `dovecot`'s LMTP endpoint and its users' domain.
    With `profile`, m1 runs under cProfile and writes its profile there when it stops."""

    def __init__(self, root: Path, dovecot: mailkit.Dovecot, profile: Path | None) -> None:
        root.mkdir()
        self.fleet = Cluster(root)
        self.dovecot = dovecot
        self.profile = profile
        self.port = 0

    def start(self) -> None:
        fleet = self.fleet
        fleet.init("m1")
        config = fleet.data_dir("m1") / files.CONFIG
        text = config.read_text()
        for key, value in MX_SETTINGS.items():
            text = set_key(text, "mx", key, json.dumps(value))
        config.write_text(text)
        m1 = fleet._node("m1")
        if self.profile is not None:
            # `meshmail run ...` follows the prefix as "$@": drop its interpreter words.
            script = f'shift 3; exec "$0" -m cProfile -o {self.profile} -m meshmail "$@"'
            m1.prefix = ["sh", "-c", script, sys.executable]
        m1.start()
        fleet.wait_alive(["m1"])
        if fleet.join("s1", fleet.token("m1", "slave"), "slave").returncode != 0:
            raise BenchError(f"s1 could not join:\n{fleet.logs()}")
        fleet.append_config("s1", f"""
[endpoints]
lmtp = "{HOST}:{self.dovecot.ports["lmtp"]}"

[slave]
poll_interval = 0.2
settle = 0.5
probe_interval = {PROBE_INTERVAL}
probe_timeout = {PROBE_INTERVAL / 2}

[[slave.sources]]
type = "dovecot"
path = "{self.dovecot.passwd}"
""")  # fmt: skip
        fleet.start("s1")
        fleet.wait_alive(["m1", "s1"])
        fleet.wait("the bench domain on m1", ["m1"], lambda statuses: statuses["m1"]["state"]["domains"] >= 1)
        self.port = int(json.loads(m1.ready.read_text())["mx"].rsplit(":", 1)[1])

    def add_shadow_master(self) -> None:
        """Join and start a second master m2 (the same [mx] settings): m1 then stores a shadow
        copy of each message it queues there before the 250."""
        fleet = self.fleet
        if fleet.join("m2", fleet.token("m1", "master"), "master").returncode != 0:
            raise BenchError(f"m2 could not join:\n{fleet.logs()}")
        config = fleet.data_dir("m2") / files.CONFIG
        fleet._node("m2")  # the harness binds its ports to 0
        text = config.read_text()
        for key, value in MX_SETTINGS.items():
            text = set_key(text, "mx", key, json.dumps(value))
        config.write_text(text)
        fleet.start("m2")
        fleet.wait_alive(["m1", "m2"])

    def shadows_on_m2(self) -> int:
        return self.fleet.status("m2")["mx"]["shadows"]

    def lmtp_up(self) -> bool | None:
        """Whether m1 holds s1's LMTP endpoint for up (None: s1 not known or not alive there)."""
        for member in self.fleet.status("m1")["members"]:
            if member["name"] == "s1" and member["state"] == "alive":
                return member["endpoints"].get("lmtp", {}).get("up")
        return None

    def queued(self) -> int:
        return self.fleet.status("m1")["mx"]["queued"]

    def stop_m1(self) -> None:
        """SIGTERM m1 (it leaves, and cProfile writes its file), wait until it exited."""
        node = self.fleet.nodes["m1"]
        if node.exited() is None:
            node.send(signal.SIGTERM)
            assert node.process is not None
            node.process.wait(timeout=60)

    def close(self) -> None:
        self.fleet.close()


# --- the phases -------------------------------------------------------------------------------


@attrs.define
class Results:
    """Seconds per phase, by system ("postfix", "meshmail")."""

    live_accepted: dict[str, float] = attrs.Factory(dict)
    live_delivered: dict[str, float] = attrs.Factory(dict)
    queue_accepted: dict[str, float] = attrs.Factory(dict)
    drain: dict[str, float] = attrs.Factory(dict)
    #: CPU milliseconds per message of each server's processes (not Dovecot's), by phase.
    cpu_ms: dict[str, dict[str, float]] = attrs.Factory(dict)
    #: meshmail: from the Dovecot's start until m1 saw the endpoint up again.
    slave_seen_up: float = 0.0
    #: meshmail's queue path again with a second master holding shadow copies (seconds, CPU ms).
    shadow_accepted: float = 0.0
    shadow_cpu_ms: float = 0.0
    #: CPU milliseconds per message of m2, the master keeping the copies, meanwhile.
    holder_cpu_ms: float = 0.0


def live_phase(name: str, port: int, dovecot: mailkit.Dovecot, sizes: Sizes, results: Results) -> None:
    """Mail to a running Dovecot: seconds until smtp-source ended, and until the mailbox held all."""
    address = RECIPIENTS["live"]
    start = time.perf_counter()
    results.live_accepted[name] = smtp_source(port, address, sizes.messages, sizes.sessions, sizes.message_bytes)
    end = wait_mailbox(f"{name}: {sizes.messages} messages in the mailbox", dovecot, address, sizes.messages)
    results.live_delivered[name] = end - start
    if (found := mailbox_count(dovecot, address)) != sizes.messages:
        raise BenchError(f"{name}: {found} messages in the mailbox, {sizes.messages} sent")


def queue_phase(name: str, port: int, sizes: Sizes, results: Results) -> None:
    address = RECIPIENTS["queue"]
    results.queue_accepted[name] = smtp_source(port, address, sizes.messages, sizes.sessions, sizes.message_bytes)


def drain_postfix(postfix: mailkit.Postfix, dovecot: mailkit.Dovecot, sizes: Sizes, results: Results) -> None:
    """Start the Dovecot, ask Postfix to flush its queue at once (it would retry within its
    backoff anyway), seconds until the mailbox holds every queued message."""
    dovecot.start()
    start = time.perf_counter()
    flush = subprocess.run(["postqueue", "-c", str(postfix.config_dir), "-f"], capture_output=True, text=True)
    if flush.returncode != 0:
        raise BenchError(f"postqueue -f failed: {flush.stderr.strip()}")
    end = wait_mailbox("postfix: the queue in the mailbox", dovecot, RECIPIENTS["queue"], sizes.messages)
    results.drain["postfix"] = end - start
    dovecot_cpu(dovecot, "postfix", sizes, results)


def drain_meshmail(mesh: Meshmail, dovecot: mailkit.Dovecot, sizes: Sizes, results: Results) -> None:
    """Start the Dovecot; seconds until the mailbox holds every queued message and m1's queue
    is empty. Nothing is asked of meshmail: the slave's probe publishes the endpoint up and
    m1's queue runner delivers what waits for it at once. Meanwhile a thread asks m1 every
    UP_POLL seconds whether it sees the endpoint up yet (for the row under the drain)."""
    dovecot.start()
    start = time.perf_counter()
    up = Watch("meshmail: m1 sees the LMTP endpoint up", lambda: mesh.lmtp_up() is True, UP_POLL)
    wait_mailbox("meshmail: the queue in the mailbox", dovecot, RECIPIENTS["queue"], sizes.messages)
    end = wait_for("meshmail: m1's queue empty", lambda: mesh.queued() == 0)
    results.drain["meshmail"] = end - start
    results.slave_seen_up = up.seen() - start
    dovecot_cpu(dovecot, "meshmail", sizes, results)


def dovecot_cpu(dovecot: mailkit.Dovecot, name: str, sizes: Sizes, results: Results) -> None:
    """Record the CPU milliseconds per queued message the Dovecot spent since it was started for
    the drain (its start included, the same for both systems)."""
    assert dovecot.process is not None
    results.cpu_ms.setdefault("dovecot drain", {})[name] = group_cpu(dovecot.process.pid) * 1000 / sizes.messages


@contextmanager
def counting_cpu(results: Results, phase: str, name: str, group: int, messages: int) -> Iterator[None]:
    """Record the CPU milliseconds per message process group `group` spends in the block."""
    before = group_cpu(group)
    yield
    results.cpu_ms.setdefault(phase, {})[name] = (group_cpu(group) - before) * 1000 / messages


def measure(postfix: mailkit.Postfix, mesh: Meshmail, dovecots: dict[str, mailkit.Dovecot], sizes: Sizes) -> Results:
    """The phases in order: warm-up, live (Postfix, then meshmail), both Dovecots stopped,
    queue (meshmail, then Postfix: neither retries while the other is measured), drains."""
    results = Results()
    ports = {"postfix": postfix.port, "meshmail": mesh.port}
    assert postfix.process is not None
    groups = {"postfix": postfix.process.pid, "meshmail": mesh.fleet.processes["m1"].pid}

    def cpu(phase: str, name: str) -> ContextManager[None]:
        return counting_cpu(results, phase, name, groups[name], sizes.messages)

    for name, port in ports.items():
        smtp_source(port, RECIPIENTS["warm"], WARM_MESSAGES, min(sizes.sessions, WARM_MESSAGES), sizes.message_bytes)
        wait_mailbox(f"{name}: warm-up mail delivered", dovecots[name], RECIPIENTS["warm"], WARM_MESSAGES)
    for name, port in ports.items():
        print(f"{name}: {sizes.messages:,} messages to a running Dovecot ...", flush=True)
        with cpu("live", name):
            live_phase(name, port, dovecots[name], sizes, results)
    for dovecot in dovecots.values():
        dovecot.stop()
    wait_for("meshmail: m1 sees the LMTP endpoint down", lambda: mesh.lmtp_up() is False, 60)
    for name in ("meshmail", "postfix"):
        print(f"{name}: {sizes.messages:,} messages while its Dovecot is stopped ...", flush=True)
        with cpu("queue", name):
            queue_phase(name, ports[name], sizes, results)
    if (queued := mesh.queued()) != sizes.messages:
        raise BenchError(f"meshmail: m1 reports {queued} messages queued, {sizes.messages} were sent")
    print("postfix: Dovecot back, flushing the queue ...", flush=True)
    with cpu("drain", "postfix"):
        drain_postfix(postfix, dovecots["postfix"], sizes, results)
    print("meshmail: Dovecot back ...", flush=True)
    with cpu("drain", "meshmail"):
        drain_meshmail(mesh, dovecots["meshmail"], sizes, results)
    for name, dovecot in dovecots.items():
        if (found := mailbox_count(dovecot, RECIPIENTS["queue"])) != sizes.messages:
            raise BenchError(f"{name}: {found} queued messages delivered, {sizes.messages} sent")
    shadow_phase(mesh, dovecots["meshmail"], sizes, results)
    return results


def measure_shadow(postfix: mailkit.Postfix, mesh: Meshmail, dovecots: dict[str, mailkit.Dovecot],
                   sizes: Sizes) -> Results:  # fmt: skip
    """Only what the shadow rows need: warm-up, Postfix's queue path (its Dovecot stopped),
    then meshmail's queue path with a shadow master."""
    results = Results()
    assert postfix.process is not None
    for name, port in {"postfix": postfix.port, "meshmail": mesh.port}.items():
        smtp_source(port, RECIPIENTS["warm"], WARM_MESSAGES, min(sizes.sessions, WARM_MESSAGES), sizes.message_bytes)
        wait_mailbox(f"{name}: warm-up mail delivered", dovecots[name], RECIPIENTS["warm"], WARM_MESSAGES)
    dovecots["postfix"].stop()
    print(f"postfix: {sizes.messages:,} messages while its Dovecot is stopped ...", flush=True)
    with counting_cpu(results, "queue", "postfix", postfix.process.pid, sizes.messages):
        queue_phase("postfix", postfix.port, sizes, results)
    shadow_phase(mesh, dovecots["meshmail"], sizes, results)
    return results


def shadow_phase(mesh: Meshmail, dovecot: mailkit.Dovecot, sizes: Sizes, results: Results) -> None:
    """The queue path once more, with m2 holding a shadow copy of every message m1 queues;
    then the Dovecot back and the queue delivered (not timed)."""
    print("meshmail: a second master joins; messages while the Dovecot is stopped, with shadow copies ...", flush=True)
    mesh.add_shadow_master()
    dovecot.stop()
    wait_for("meshmail: m1 sees the LMTP endpoint down", lambda: mesh.lmtp_up() is False, 60)
    group, holder = mesh.fleet.processes["m1"].pid, mesh.fleet.processes["m2"].pid
    before, holder_before = group_cpu(group), group_cpu(holder)
    results.shadow_accepted = smtp_source(mesh.port, RECIPIENTS["shadow"], sizes.messages, sizes.sessions,
                                          sizes.message_bytes)  # fmt: skip
    results.shadow_cpu_ms = (group_cpu(group) - before) * 1000 / sizes.messages
    results.holder_cpu_ms = (group_cpu(holder) - holder_before) * 1000 / sizes.messages
    if (held := mesh.shadows_on_m2()) != sizes.messages:
        raise BenchError(f"meshmail: m2 holds {held} shadow copies, {sizes.messages} messages were queued")
    dovecot.start()
    wait_mailbox("meshmail: the shadowed queue in the mailbox", dovecot, RECIPIENTS["shadow"], sizes.messages)


#: The phases of the CPU rows, in the order of the rows above them.
PHASES = ("queue", "live", "drain")


# --- the report -------------------------------------------------------------------------------


@attrs.frozen
class Row:
    """One line of the table: Postfix's and meshmail's values (text, "-" when not measured),
    meshmail / Postfix, and the target, if any."""

    label: str
    postfix: str
    meshmail: str
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None


def shadow_rows(results: Results, sizes: Sizes) -> list[Row]:
    """The rows of the queue path with a shadow master, against Postfix's queue path."""
    postfix = sizes.messages / results.queue_accepted["postfix"]
    shadow = sizes.messages / results.shadow_accepted
    return [
        Row("  with a shadow copy on another master (msgs/s)", f"{postfix:.0f}", f"{shadow:.0f}", shadow / postfix,
            f">= {TARGET_QUEUE_RATIO:g} x Postfix", shadow / postfix >= TARGET_QUEUE_RATIO),
        Row("  server CPU per message with the shadow copy (ms)", f"{results.cpu_ms['queue']['postfix']:.2f}",
            f"{results.shadow_cpu_ms:.2f}", results.shadow_cpu_ms / results.cpu_ms["queue"]["postfix"]),
        Row("  and of m2, keeping the copies (ms)", "-", f"{results.holder_cpu_ms:.2f}"),
    ]  # fmt: skip


def rows_of(results: Results, sizes: Sizes) -> list[Row]:
    n = sizes.messages

    def rate(seconds: dict[str, float]) -> tuple[float, float, float]:
        pf, mm = n / seconds["postfix"], n / seconds["meshmail"]
        return pf, mm, mm / pf

    queue = rate(results.queue_accepted)
    live = rate(results.live_delivered)
    accepted = rate(results.live_accepted)
    drain_pf, drain_mm = results.drain["postfix"], results.drain["meshmail"]
    return [
        Row("queue path: accepted msgs/s (next hop down, fsync'd)", f"{queue[0]:.0f}", f"{queue[1]:.0f}", queue[2],
            f">= {TARGET_QUEUE_RATIO:g} x Postfix", queue[2] >= TARGET_QUEUE_RATIO),
        *shadow_rows(results, sizes),
        Row("relay / in-line: delivered msgs/s (next hop up)", f"{live[0]:.0f}", f"{live[1]:.0f}", live[2],
            f">= {TARGET_INLINE_RATIO:g} x Postfix", live[2] >= TARGET_INLINE_RATIO),
        Row("  accepted msgs/s (smtp-source done)", f"{accepted[0]:.0f}", f"{accepted[1]:.0f}", accepted[2]),
        Row(f"drain: Dovecot back -> {n:,} queued in the mailbox (s)", f"{drain_pf:.2f}", f"{drain_mm:.2f}",
            drain_mm / drain_pf, f"<= {TARGET_DRAIN_RATIO:g} x Postfix", drain_mm <= TARGET_DRAIN_RATIO * drain_pf),
        Row("  of it until m1 saw the slave's LMTP up (s)", "-", f"{results.slave_seen_up:.2f}"),
        Row("  drain rate (msgs/s)", f"{n / drain_pf:.0f}", f"{n / drain_mm:.0f}", drain_pf / drain_mm),
        *(cpu_row(f"server CPU per message, {phase} (ms)", results.cpu_ms[phase]) for phase in PHASES),
        cpu_row("  the Dovecot's CPU per message, drain (ms)", results.cpu_ms["dovecot drain"]),
    ]  # fmt: skip


def cpu_row(label: str, ms: dict[str, float]) -> Row:
    return Row(label, f"{ms['postfix']:.2f}", f"{ms['meshmail']:.2f}", ms["meshmail"] / ms["postfix"])


def print_table(rows: list[Row], short: bool) -> None:
    width = max(len(row.label) for row in rows)
    cell = max(9, *(len(row.meshmail) for row in rows))
    print(f"{'measure':{width}}  {'postfix':>9}  {'meshmail':>{cell}}  {'ratio':>6}  {'target':18}  verdict")
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        judged = "" if row.ok is None else "(short)" if short else "ok" if row.ok else "MISSED"
        values = f"{row.postfix:>9}  {row.meshmail:>{cell}}  {ratio:>6}"
        print(f"{row.label:{width}}  {values}  {row.target:18}  {judged}".rstrip())


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """Each row as in its median round: the round whose ratio (or, for a row without one,
    whose meshmail figure) is the median of all rounds' (the lower middle of an even count)."""

    def key(row: Row) -> float:
        if row.ratio is not None:
            return row.ratio
        try:
            return float(row.meshmail)
        except ValueError:
            return 0.0

    return [sorted(same, key=key)[(len(same) - 1) // 2] for same in zip(*rounds, strict=True)]


def report(done: list[Results], sizes: Sizes, short: bool, only: str | None = None) -> list[Figure]:
    rounds = [shadow_rows(results, sizes) if only == "shadow" else rows_of(results, sizes) for results in done]
    rows = median_rows(rounds)
    print()
    print(f"meshmail MX benchmark: smtp-source, {sizes.messages:,} messages of {sizes.message_bytes:,} bytes over "
          f"{sizes.sessions} sessions, {len(done)} round(s) on fresh systems; nproc {os.cpu_count()}, "
          f"{platform.machine()}, Python {platform.python_version()}")  # fmt: skip
    print_table(rows, short)
    if len(done) > 1:
        print()
        print("each round's ratio (the table shows each row's median round):")
        for row, same in zip(rows, zip(*rounds, strict=True), strict=True):
            if row.target:
                print(f"  {row.label.strip()}: " + ", ".join(f"{r.ratio:.2f}" for r in same))
    print()
    print("ratio: meshmail / Postfix (for the drain rate: Postfix's seconds / meshmail's). Delivered: from "
          "smtp-source's start until the mailbox held every message (meshmail answers 250 after the slave took "
          "it; Postfix after its queue file). Drain: from the Dovecot's start; Postfix is flushed at once "
          f"(postqueue -f), meshmail's slave probes its endpoint every {PROBE_INTERVAL:g} s. Server CPU: user + system "
          "of Postfix's processes (master, smtpd, cleanup, qmgr, lmtp, ...) or of m1, not of Dovecot; the "
          "Dovecot's own row is its CPU from its start for the drain until the queue was in.")  # fmt: skip
    return [Figure(row.label.strip(), "", row.target, row.ok) for row in rows if row.ok is not None]


def merge_profiles(rounds: list[Path], path: Path) -> None:
    """The profiles of every round's m1 added up, written to `path`."""
    stats = pstats.Stats(*(str(found) for found in rounds))
    stats.dump_stats(str(path))


def print_profile(path: Path, rounds: int, lines: int = 30) -> None:
    print(f"\nm1 under cProfile (whole run, {rounds} round(s) added up; {path}):")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)


# --- the run ----------------------------------------------------------------------------------


def missing() -> list[str]:
    problems = mailkit.unavailable("dovecot", "postfix")
    if not os.access(SMTP_SOURCE, os.X_OK):
        problems.append(f"{SMTP_SOURCE} not found (apt-get install postfix)")
    return problems


def run_round(root: Path, sizes: Sizes, profile: Path | None, only: str | None) -> Results:
    """One round on fresh systems under `root`: both Dovecots, Postfix and meshmail started,
    the phases measured, everything stopped again."""
    dovecots = {name: mailkit.Dovecot(root / f"dovecot-{name}", USERS, name=f"d-{name}")
                for name in ("postfix", "meshmail")}  # fmt: skip
    postfix = mailkit.Postfix(root / "postfix", dovecots["postfix"], [DOMAIN])
    mesh = Meshmail(root / "meshmail", dovecots["meshmail"], profile)
    try:
        for dovecot in dovecots.values():
            dovecot.start()
        postfix.start()
        mesh.start()
        return (measure_shadow if only == "shadow" else measure)(postfix, mesh, dovecots, sizes)
    except (BenchError, AssertionError, RuntimeError, OSError) as exc:
        logs = {"postfix": postfix.log_tail(), "meshmail": mesh.fleet.logs(),
                **{f"dovecot-{name}": d.log_tail() for name, d in dovecots.items()}}  # fmt: skip
        for name, tail in logs.items():
            print(f"--- {name}:\n{tail[-4000:]}", file=sys.stderr)
        raise BenchError(str(exc)) from exc
    finally:
        if profile is not None:
            mesh.stop_m1()
        mesh.close()
        postfix.close()
        for dovecot in dovecots.values():
            dovecot.close()


def run(root: Path, sizes: Sizes, short: bool, profile: Path | None, only: str | None = None, rounds: int = 1) -> int:
    """`rounds` rounds one after the other, each on fresh systems, then the report (and, with
    `profile`, every round's m1 profile added up, written there and printed)."""
    done: list[Results] = []
    profiles: list[Path] = []
    try:
        for number in range(1, rounds + 1):
            if rounds > 1:
                print(f"--- round {number} of {rounds}", flush=True)
            folder = root / f"round-{number}"
            round_profile = folder / "m1.prof" if profile is not None else None
            if round_profile is not None:
                profiles.append(round_profile)
            done.append(run_round(folder, sizes, round_profile, only))
    except BenchError as exc:
        print(f"bench-mx failed: {exc}", file=sys.stderr)
        return FAILED
    figures = report(done, sizes, short, only)
    if profile is not None and (written := [path for path in profiles if path.exists()]):
        merge_profiles(written, profile)
        print_profile(profile, len(written))
    return verdict(figures, short)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke = f"smoke run: {SHORT.messages} messages over {SHORT.sessions} sessions; fails on errors only"
    parser.add_argument("--short", action="store_true", help=smoke)
    parser.add_argument("--messages", type=int, help=f"messages per phase (default {FULL.messages:,})")
    parser.add_argument("--sessions", type=int, help=f"parallel SMTP sessions (default {FULL.sessions})")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="run m1 under cProfile in every round, write the rounds' profiles added up to FILE, print "
                             "its top functions")  # fmt: skip
    parser.add_argument(
        "--only",
        choices=["shadow"],
        help="run only Postfix's queue path and meshmail's queue path with a shadow master",
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep every file and log under DIR (new or empty)")
    parser.add_argument("--rounds", type=int, help=f"rounds on fresh systems (default {FULL_ROUNDS}, short 1)")
    args = parser.parse_args()
    sizes = SHORT if args.short else FULL
    rounds = args.rounds if args.rounds is not None else 1 if args.short else FULL_ROUNDS
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    sizes = attrs.evolve(sizes, messages=args.messages or sizes.messages, sessions=args.sessions or sizes.sessions)
    if problems := missing():
        print("bench-mx cannot run: " + "; ".join(problems), file=sys.stderr)
        return FAILED
    profile = args.profile.resolve() if args.profile else None
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        if any(args.keep.iterdir()):
            print(f"bench-mx: {args.keep} is not empty", file=sys.stderr)
            return FAILED
        return run(args.keep.resolve(), sizes, args.short, profile, args.only, rounds)
    with tempfile.TemporaryDirectory(prefix="meshmail-bench-mx-") as root:
        try:
            return run(Path(root), sizes, args.short, profile, args.only, rounds)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
