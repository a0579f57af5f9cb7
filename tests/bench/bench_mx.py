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
queue is in the mailbox; then the queue paths again, meshmail's with a second master keeping
shadow copies. The queue paths are measured in turns (each system a quarter of the messages at
a time, the other idle meanwhile), so a minute of a busier machine weighs on both alike, and
the queue path and the drain twice a round, the drains in the order ABBA. A full run does this
three times on fresh systems and reports each figure's median round (single rounds move with
the shared machine's load).
A script, not a test (tests/test_benches.py runs its short mode).
Needs root (Dovecot and Postfix) and the Debian packages postfix and dovecot-lmtpd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from figures import FAILED, Figure, verdict  # noqa: E402
from helpers import mailkit  # noqa: E402
from helpers.cluster import Cluster  # noqa: E402
from helpers.config import set_key  # noqa: E402

from meshmail.mta.runner import LOOK_INTERVAL  # noqa: E402
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
#: Postfix's own retry timing, not the kit's 2-4 s: with its Dovecot stopped, the kit's Postfix
#: retried its deferred queue (up to 2,000 messages) every few seconds, CPU taken from
#: meshmail's turns and drains (its drain is flushed with postqueue -f either way).
POSTFIX_SETTINGS = {"queue_run_delay": "300s", "minimal_backoff_time": "300s", "maximal_backoff_time": "4000s"}
#: Seconds one phase (sending, or waiting for a mailbox or a queue) may take.
PHASE_TIMEOUT = 600.0
POLL = 0.02
#: The queue paths are measured in turns: each system takes 1 / SLICES of the messages at a time,
#: the systems alternating (which goes first alternates too), so the shared machine's load,
#: which moves by up to 2x within a minute, weighs on both alike rather than on whichever ran
#: in a slower minute.
SLICES = 4
#: Each round measures the queue path and the drain this many times, the drains in the order
#: Postfix, meshmail, meshmail, Postfix (or the other way round in even rounds): one drain of
#: each moved by up to 1.4x with the machine's load, and neither system should always drain
#: second. The table gives the mean.
CYCLES = 2
#: Before each turn the bench waits until the servers are idle (what one system still does
#: after its turn, Postfix deferring its new queue files say, must not slow the other's): their
#: process groups together using less than QUIET_CPU of a core over QUIET_WINDOW seconds,
#: waiting QUIET_TIMEOUT seconds at most.
QUIET_CPU = 0.1
QUIET_WINDOW = 0.5
QUIET_TIMEOUT = 20.0
#: m1's log line when it begins delivering what waited for a slave that answers again.
BACK_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO meshmail\.mta: slave s1 is back: delivering")

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

    def spooled(self) -> int:
        """Files holding queued messages in m1's queue folder (batch files, message files)."""
        folder = self.fleet.data_dir("m1") / "queue"
        return sum(1 for path in folder.iterdir() if path.suffix in (".cps", ".msg"))

    def delivering_since(self, after: float) -> float:
        """When (time.time()) m1 logged, at `after` or later, that it began delivering the mail
        waiting for s1 (the line has milliseconds; m1's clock is the bench's)."""
        for line in self.fleet.nodes["m1"].log.read_text(errors="replace").splitlines():
            if (found := BACK_LINE.match(line)) is not None:
                logged = time.mktime(time.strptime(found[1], "%Y-%m-%d %H:%M:%S")) + int(found[2]) / 1000
                if logged >= after - 0.001:
                    return logged
        raise BenchError("m1 never logged that it delivers s1's queue")

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
    """Seconds per phase, by system ("postfix", "meshmail"): the queue path's and the drain's
    added up over CYCLES (the CPU figures are means)."""

    live_accepted: dict[str, float] = attrs.Factory(dict)
    live_delivered: dict[str, float] = attrs.Factory(dict)
    queue_accepted: dict[str, float] = attrs.Factory(dict)
    drain: dict[str, float] = attrs.Factory(dict)
    #: CPU milliseconds per message of each server's processes (not Dovecot's), by phase.
    cpu_ms: dict[str, dict[str, float]] = attrs.Factory(dict)
    #: meshmail: from the Dovecot's start until m1 began delivering its queue (mean).
    delivering_after: float = 0.0
    #: The queue paths again, meshmail with a second master holding shadow copies (seconds).
    shadow_accepted: dict[str, float] = attrs.Factory(dict)
    #: CPU milliseconds per message of m2, the master keeping the copies, meanwhile.
    holder_cpu_ms: float = 0.0


def warm_up(ports: dict[str, int], dovecots: dict[str, mailkit.Dovecot], sizes: Sizes) -> None:
    """WARM_MESSAGES to each system, delivered (processes forked, caches warm); not measured."""
    for name, port in ports.items():
        smtp_source(port, RECIPIENTS["warm"], WARM_MESSAGES, min(sizes.sessions, WARM_MESSAGES), sizes.message_bytes)
        wait_mailbox(f"{name}: warm-up mail delivered", dovecots[name], RECIPIENTS["warm"], WARM_MESSAGES)


def live_phase(name: str, port: int, dovecot: mailkit.Dovecot, sizes: Sizes, results: Results) -> None:
    """Mail to a running Dovecot: seconds until smtp-source ended, and until the mailbox held all."""
    address = RECIPIENTS["live"]
    start = time.perf_counter()
    results.live_accepted[name] = smtp_source(port, address, sizes.messages, sizes.sessions, sizes.message_bytes)
    end = wait_mailbox(f"{name}: {sizes.messages} messages in the mailbox", dovecot, address, sizes.messages)
    results.live_delivered[name] = end - start
    if (found := mailbox_count(dovecot, address)) != sizes.messages:
        raise BenchError(f"{name}: {found} messages in the mailbox, {sizes.messages} sent")


def stop_dovecots(mesh: Meshmail, dovecots: dict[str, mailkit.Dovecot]) -> None:
    """Stop both Dovecots; return once m1 sees s1's LMTP endpoint published down."""
    for dovecot in dovecots.values():
        dovecot.stop()
    wait_for("meshmail: m1 sees the LMTP endpoint down", lambda: mesh.lmtp_up() is False, 60)


def wait_quiet(groups: list[int]) -> None:
    """Wait until the process groups `groups` together use less than QUIET_CPU of a core over
    QUIET_WINDOW (QUIET_TIMEOUT at most: a busier machine then slows a figure, it is no error)."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    before = sum(group_cpu(group) for group in groups)
    while time.monotonic() < deadline:
        time.sleep(QUIET_WINDOW)
        now = sum(group_cpu(group) for group in groups)
        if now - before < QUIET_CPU * QUIET_WINDOW:
            return
        before = now


def slices(messages: int) -> list[int]:
    """`messages` in SLICES turns (fewer for a handful), as even as they go."""
    count = max(1, min(SLICES, messages // 20))
    return [messages // count + (index < messages % count) for index in range(count)]


def take_turns(targets: dict[str, int], recipient: str, groups: dict[str, list[int]],
               sizes: Sizes) -> tuple[dict[str, float], dict[int, float]]:  # fmt: skip
    """Send `sizes.messages` to each system of `targets` (name -> port) in turns (see SLICES),
    each turn once the servers are idle: each system's seconds added up, and the CPU
    milliseconds per message of each process group of `groups` (name -> groups of that system)
    from the start of its system's turns until the servers were idle again."""
    everyone = [group for found in groups.values() for group in found]
    seconds = dict.fromkeys(targets, 0.0)
    spent = dict.fromkeys(everyone, 0.0)
    names = list(targets)
    wait_quiet(everyone)  # and after each turn: each starts with the servers idle
    for turn, count in enumerate(slices(sizes.messages)):
        for name in names if turn % 2 == 0 else names[::-1]:
            before = {group: group_cpu(group) for group in groups[name]}
            seconds[name] += smtp_source(targets[name], recipient, count, min(sizes.sessions, count),
                                         sizes.message_bytes)  # fmt: skip
            wait_quiet(everyone)
            for group in groups[name]:
                spent[group] += group_cpu(group) - before[group]
    return seconds, {group: total * 1000 / sizes.messages for group, total in spent.items()}


def add(totals: dict[str, float], name: str, value: float) -> None:
    totals[name] = totals.get(name, 0.0) + value


def drain_postfix(postfix: mailkit.Postfix, dovecot: mailkit.Dovecot, count: int, results: Results) -> None:
    """Start the Dovecot, ask Postfix to flush its queue once it is up (it would retry within
    its backoff anyway); seconds from the start until the mailbox holds `count` messages
    (every queued one). Both systems' drains count from the Dovecot's start command: its
    start-up (every port open and a greeting) is the same for both, and m1 may begin while
    it lasts."""
    start = time.perf_counter()
    dovecot.start()
    flush = subprocess.run(["postqueue", "-c", str(postfix.config_dir), "-f"], capture_output=True, text=True)
    if flush.returncode != 0:
        raise BenchError(f"postqueue -f failed: {flush.stderr.strip()}")
    end = wait_mailbox("postfix: the queue in the mailbox", dovecot, RECIPIENTS["queue"], count)
    add(results.drain, "postfix", end - start)


def drain_meshmail(mesh: Meshmail, dovecot: mailkit.Dovecot, count: int, results: Results) -> None:
    """Start the Dovecot; seconds until the mailbox holds `count` messages (every queued one)
    and m1's queue folder holds none (looked at on disk, as the mailbox: asking m1's /status
    takes CPU and event-loop time from the drain; /status is asked once at the end to check).
    Nothing is asked of meshmail meanwhile: m1's queue runner finds the slave answering again
    (or the slave's probe publishes the endpoint up) and delivers what waits for it. When m1
    began is read from its log afterwards, for the row under the drain."""
    start, wall = time.perf_counter(), time.time()
    dovecot.start()
    wait_mailbox("meshmail: the queue in the mailbox", dovecot, RECIPIENTS["queue"], count)
    end = wait_for("meshmail: m1's queue folder empty", lambda: mesh.spooled() == 0)
    if (queued := mesh.queued()) != 0:
        raise BenchError(f"meshmail: m1's queue folder is empty, but m1 reports {queued} messages queued")
    add(results.drain, "meshmail", end - start)
    results.delivering_after += (mesh.delivering_since(wall) - wall) / CYCLES


@contextmanager
def counting_cpu(results: Results, phase: str, name: str, group: int, messages: int) -> Iterator[None]:
    """Add the CPU milliseconds per message (of `messages`) that process group `group` spends in
    the block to `results.cpu_ms[phase][name]`."""
    before = group_cpu(group)
    yield
    add(results.cpu_ms.setdefault(phase, {}), name, (group_cpu(group) - before) * 1000 / messages)


def measure(postfix: mailkit.Postfix, mesh: Meshmail, dovecots: dict[str, mailkit.Dovecot], sizes: Sizes,
            number: int = 1) -> Results:  # fmt: skip
    """The phases in order: warm-up; live (Postfix, then meshmail); CYCLES times: both Dovecots
    stopped, the queue paths (in turns: neither retries while the other is measured), the drains
    (ABBA over the cycles, Postfix first in odd rounds `number`); the queue paths again with a
    shadow master."""
    results = Results()
    ports = {"postfix": postfix.port, "meshmail": mesh.port}
    assert postfix.process is not None
    groups = {"postfix": postfix.process.pid, "meshmail": mesh.fleet.processes["m1"].pid}

    warm_up(ports, dovecots, sizes)
    for name, port in ports.items():
        print(f"{name}: {sizes.messages:,} messages to a running Dovecot ...", flush=True)
        with counting_cpu(results, "live", name, groups[name], sizes.messages):
            live_phase(name, port, dovecots[name], sizes, results)
    drains = {"postfix": lambda count: drain_postfix(postfix, dovecots["postfix"], count, results),
              "meshmail": lambda count: drain_meshmail(mesh, dovecots["meshmail"], count, results)}  # fmt: skip
    servers = [postfix.process.pid, *(node.pid for node in mesh.fleet.processes.values())]
    for cycle in range(CYCLES):
        stop_dovecots(mesh, dovecots)
        print(f"both: {sizes.messages:,} messages each while the Dovecots are stopped, in turns ...", flush=True)
        seconds, spent = take_turns(ports, RECIPIENTS["queue"], {name: [group] for name, group in groups.items()},
                                    sizes)  # fmt: skip
        for name, group in groups.items():
            add(results.queue_accepted, name, seconds[name])
            add(results.cpu_ms.setdefault("queue", {}), name, spent[group] / CYCLES)
        if (queued := mesh.queued()) != sizes.messages:
            raise BenchError(f"meshmail: m1 reports {queued} messages queued, {sizes.messages} were sent")
        in_mailbox = (cycle + 1) * sizes.messages
        for name in ("postfix", "meshmail") if (number + cycle) % 2 else ("meshmail", "postfix"):
            wait_quiet(servers)
            print(f"{name}: Dovecot back, its queue delivered ...", flush=True)
            with counting_cpu(results, "drain", name, groups[name], CYCLES * sizes.messages):
                drains[name](in_mailbox)
            process = dovecots[name].process
            assert process is not None  # started for the drain: all its CPU is the drain's
            add(results.cpu_ms.setdefault("dovecot drain", {}), name,
                group_cpu(process.pid) * 1000 / (CYCLES * sizes.messages))  # fmt: skip
    for name, dovecot in dovecots.items():
        if (found := mailbox_count(dovecot, RECIPIENTS["queue"])) != CYCLES * sizes.messages:
            raise BenchError(f"{name}: {found} queued messages delivered, {CYCLES * sizes.messages} sent")
    shadow_phase(postfix, mesh, dovecots, sizes, results)
    return results


def measure_shadow(postfix: mailkit.Postfix, mesh: Meshmail, dovecots: dict[str, mailkit.Dovecot],
                   sizes: Sizes) -> Results:  # fmt: skip
    """Only what the shadow rows need: warm-up, then the queue paths in turns, meshmail's with
    a shadow master."""
    results = Results()
    warm_up({"postfix": postfix.port, "meshmail": mesh.port}, dovecots, sizes)
    shadow_phase(postfix, mesh, dovecots, sizes, results)
    return results


def shadow_phase(postfix: mailkit.Postfix, mesh: Meshmail, dovecots: dict[str, mailkit.Dovecot], sizes: Sizes,
                 results: Results) -> None:  # fmt: skip
    """The queue paths once more in turns, with m2 holding a shadow copy of every message m1
    queues; then meshmail's Dovecot back and its queue delivered (not timed)."""
    print("meshmail: a second master joins; both: messages while the Dovecots are stopped, in turns, meshmail's "
          "with shadow copies ...", flush=True)  # fmt: skip
    mesh.add_shadow_master()
    stop_dovecots(mesh, dovecots)
    assert postfix.process is not None
    group, holder = mesh.fleet.processes["m1"].pid, mesh.fleet.processes["m2"].pid
    groups = {"postfix": [postfix.process.pid], "meshmail": [group, holder]}
    results.shadow_accepted, spent = take_turns({"postfix": postfix.port, "meshmail": mesh.port},
                                                RECIPIENTS["shadow"], groups, sizes)  # fmt: skip
    results.cpu_ms["shadow"] = {"postfix": spent[postfix.process.pid], "meshmail": spent[group]}
    results.holder_cpu_ms = spent[holder]
    if (held := mesh.shadows_on_m2()) != sizes.messages:
        raise BenchError(f"meshmail: m2 holds {held} shadow copies, {sizes.messages} messages were queued")
    dovecots["meshmail"].start()
    wait_mailbox("meshmail: the shadowed queue in the mailbox", dovecots["meshmail"], RECIPIENTS["shadow"],
                 sizes.messages)  # fmt: skip


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
    """The rows of the queue path with a shadow master, against Postfix's queue path in the
    same turns."""
    postfix = sizes.messages / results.shadow_accepted["postfix"]
    shadow = sizes.messages / results.shadow_accepted["meshmail"]
    return [
        Row("  with a shadow copy on another master (msgs/s)", f"{postfix:.0f}", f"{shadow:.0f}", shadow / postfix,
            f">= {TARGET_QUEUE_RATIO:g} x Postfix", shadow / postfix >= TARGET_QUEUE_RATIO),
        cpu_row("  server CPU per message with the shadow copy (ms)", results.cpu_ms["shadow"]),
        Row("  and of m2, keeping the copies (ms)", "-", f"{results.holder_cpu_ms:.2f}"),
    ]  # fmt: skip


def rows_of(results: Results, sizes: Sizes) -> list[Row]:
    n = sizes.messages

    def rate(seconds: dict[str, float], messages: int = n) -> tuple[float, float, float]:
        pf, mm = messages / seconds["postfix"], messages / seconds["meshmail"]
        return pf, mm, mm / pf

    queue = rate(results.queue_accepted, CYCLES * n)
    live = rate(results.live_delivered)
    accepted = rate(results.live_accepted)
    drain_pf, drain_mm = results.drain["postfix"] / CYCLES, results.drain["meshmail"] / CYCLES
    return [
        Row("queue path: accepted msgs/s (next hop down, fsync'd)", f"{queue[0]:.0f}", f"{queue[1]:.0f}", queue[2],
            f">= {TARGET_QUEUE_RATIO:g} x Postfix", queue[2] >= TARGET_QUEUE_RATIO),
        *shadow_rows(results, sizes),
        Row("relay / in-line: delivered msgs/s (next hop up)", f"{live[0]:.0f}", f"{live[1]:.0f}", live[2],
            f">= {TARGET_INLINE_RATIO:g} x Postfix", live[2] >= TARGET_INLINE_RATIO),
        Row("  accepted msgs/s (smtp-source done)", f"{accepted[0]:.0f}", f"{accepted[1]:.0f}", accepted[2]),
        Row(f"drain: Dovecot back -> {n:,} queued in the mailbox (s)", f"{drain_pf:.2f}", f"{drain_mm:.2f}",
            drain_mm / drain_pf, f"<= {TARGET_DRAIN_RATIO:g} x Postfix", drain_mm <= TARGET_DRAIN_RATIO * drain_pf),
        Row("  of it until m1 began delivering (s)", "-", f"{results.delivering_after:.2f}"),
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
    print(f"ratio: meshmail / Postfix (for the drain rate: Postfix's seconds / meshmail's). Queue paths: in "
          f"{SLICES} turns each, the systems alternating, each turn once the servers were idle; with the drains, "
          f"{CYCLES} times a round (the drains' order ABBA), the mean shown. Delivered: from "
          "smtp-source's start until the mailbox held every message (meshmail answers 250 after the slave took "
          "it; Postfix after its queue file). Drain: from the Dovecot's start command; Postfix is flushed once it "
          f"is up (postqueue -f); meshmail's m1 tries the slave every {LOOK_INTERVAL:g} s while its probe (every "
          f"{PROBE_INTERVAL:g} s) publishes it down, until the mailbox and m1's queue folder are done. Server CPU: "
          "user + system of Postfix's processes (master, smtpd, cleanup, qmgr, lmtp, ...) or of m1, not of Dovecot; "
          "the Dovecot's own row is its CPU from its start for the drain until the queue was in.")  # fmt: skip
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


def run_round(root: Path, sizes: Sizes, profile: Path | None, only: str | None, number: int = 1) -> Results:
    """One round on fresh systems under `root`: both Dovecots, Postfix and meshmail started,
    the phases measured, everything stopped again."""
    dovecots = {name: mailkit.Dovecot(root / f"dovecot-{name}", USERS, name=f"d-{name}")
                for name in ("postfix", "meshmail")}  # fmt: skip
    postfix = mailkit.Postfix(root / "postfix", dovecots["postfix"], [DOMAIN], settings=POSTFIX_SETTINGS)
    mesh = Meshmail(root / "meshmail", dovecots["meshmail"], profile)
    try:
        for dovecot in dovecots.values():
            dovecot.start()
        postfix.start()
        mesh.start()
        if only == "shadow":
            return measure_shadow(postfix, mesh, dovecots, sizes)
        return measure(postfix, mesh, dovecots, sizes, number)
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
            done.append(run_round(folder, sizes, round_profile, only, number))
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
