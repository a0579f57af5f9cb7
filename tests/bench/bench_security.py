"""Cluster bootstrap and security, timed with real processes on 127.0.0.1 (`make bench-security`).

Measures what an operator waits for: admitting a server (`meshmail join` until it is alive
in every view), `meshmail remove` until every view shows the node left, `meshmail keyring
rotate` on a live cluster, a login (scrypt), what the API pays per request for a bearer
token, and the single-use token race window: from the moment m1 records a redemption until
m2 knows of it. No peer system and no targets: the figures are printed alone. A script, not
a test (tests/test_benches.py runs its short mode).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from figures import FAILED, Figure, print_figures, verdict  # noqa: E402
from helpers.cluster import Cluster as Fleet  # noqa: E402
from helpers.cluster import states  # noqa: E402
from helpers.config import MESHMAIL  # noqa: E402

from meshmail.security import files  # noqa: E402
from meshmail.security.tokens import parse_join_token  # noqa: E402


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def wait_views(fleet: Fleet, names: list[str], condition) -> None:
    fleet.wait("bench condition", names, lambda statuses: all(condition(states(s)) for s in statuses.values()), 120)


def connect(fleet: Fleet, name: str) -> http.client.HTTPSConnection:
    """An HTTPS connection to node `name`'s API, trusting the cluster CA."""
    context = ssl.create_default_context(cafile=str(fleet.data_dir(name) / files.CA_CERT))
    context.check_hostname = False
    host, port = fleet.url(name).removeprefix("https://").rsplit(":", 1)
    return http.client.HTTPSConnection(host, int(port), context=context, timeout=10)


def api_latency(fleet: Fleet, name: str, path: str, token: str | None, count: int) -> float:
    """Median seconds of `count` GETs of `path` on one kept-alive HTTPS connection."""
    conn = connect(fleet, name)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            samples.append(time.perf_counter() - start)
            assert response.status == 200, response.status
    finally:
        conn.close()
    return statistics.median(samples)


def login_latency(fleet: Fleet, name: str, password: str, count: int) -> float:
    samples = []
    for _ in range(count):
        conn = connect(fleet, name)
        body = json.dumps({"account": "admin", "password": password})
        start = time.perf_counter()
        conn.request("POST", "/login", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        samples.append(time.perf_counter() - start)
        assert response.status == 200, response.status
        conn.close()
    return statistics.median(samples)


#: Pause between two polls of GET /tokens while timing the race window.
POLL_PAUSE = 0.002


class UsedWatch(threading.Thread):
    """Polls node `name`'s GET /tokens on one kept-alive connection until token `token_id`
    shows used. `bounds` is then (start of the last poll that showed it unused, end of the
    first poll that showed it used), in time.time() seconds: the node learned of the
    redemption between the two. `ready` is set after the first poll."""

    def __init__(self, fleet: Fleet, name: str, token_id: str, timeout: float = 30.0) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.node = name
        self.conn = connect(fleet, name)
        self.headers = {"Authorization": f"Bearer {files.read_api_token(fleet.data_dir(name))}"}
        self.token_id = token_id
        self.timeout = timeout
        self.ready = threading.Event()
        self.bounds: tuple[float, float] | None = None
        self.error: str | None = None
        self.polls: list[float] = []

    def used(self) -> bool:
        self.conn.request("GET", "/tokens", headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET /tokens on {self.node}: HTTP {response.status}")
        return any(t["id"] == self.token_id and t["used"] >= 1 for t in json.loads(body)["tokens"])

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        last_unused = None
        try:
            while time.monotonic() < deadline:
                start = time.time()
                used = self.used()
                end = time.time()
                self.polls.append(end - start)
                if used:
                    if last_unused is None:
                        self.error = f"{self.node}: the token was used before the join"
                    else:
                        self.bounds = (last_unused, end)
                    return
                last_unused = start
                self.ready.set()
                time.sleep(POLL_PAUSE)
            self.error = f"{self.node}: the token did not show used within {self.timeout:.0f} s"
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            self.error = f"{self.node}: {type(exc).__name__}: {exc}"
        finally:
            self.ready.set()
            self.conn.close()


def admitted_at(fleet: Fleet, master: str, name: str) -> float:
    """time.time() of `master`'s log line "admitted node <name>", which it writes right after
    recording the redemption (the log's timestamps have millisecond resolution)."""
    for line in (fleet.root / f"{master}.log").read_text(errors="replace").splitlines():
        if f" admitted node {name} " in line:
            return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"no line 'admitted node {name}' in the log of {master}")


def race_window(fleet: Fleet, joiner: str) -> tuple[float, float, float]:
    """Join `joiner` through m1 with a fresh single-use token while m2 is polled; (least,
    most, poll ms): the bounds of the time from m1 recording the redemption until m2 knows of
    it, and the median time of one poll of m2."""
    token = fleet.token("m1", "slave")
    watch = UsedWatch(fleet, "m2", parse_join_token(token).token_id)
    watch.start()
    watch.ready.wait(10)
    joined = fleet.join(joiner, token, "slave")
    watch.join(watch.timeout + 5)
    if joined.returncode != 0:
        raise RuntimeError(f"join of {joiner} failed: {joined.stderr.strip()}")
    if watch.error or watch.bounds is None:
        raise RuntimeError(f"race window: {watch.error}")
    recorded = admitted_at(fleet, "m1", joiner)
    after, by = watch.bounds
    return max(0.0, after - recorded) * 1000, (by - recorded) * 1000, statistics.median(watch.polls) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slaves", type=int, default=None, help="servers joined after the two masters (default 4)")
    parser.add_argument("--short", action="store_true", help="smoke run: one slave, few samples; fails on errors only")
    args = parser.parse_args()
    if args.slaves is None:
        args.slaves = 1 if args.short else 4
    samples = Samples(races=1, logins=3, requests=50) if args.short else Samples()
    from helpers.cluster import PASSWORD

    with tempfile.TemporaryDirectory(prefix="meshmail-bench-") as root:
        fleet = Fleet(Path(root))
        try:
            figures, notes = run(fleet, args.slaves, PASSWORD, samples)
        except (AssertionError, RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"bench-security failed: {exc}", file=sys.stderr)
            return FAILED
        finally:
            fleet.close()
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    print_figures(f"meshmail security benchmark: real processes on 127.0.0.1, {machine}", figures)
    print("\n".join(notes))
    return verdict(figures, args.short)


@attrs.frozen
class Samples:
    """How many times the repeated measures are taken."""

    races: int = 5
    logins: int = 10
    requests: int = 300


def run(fleet: Fleet, slaves: int, password: str, samples: Samples) -> tuple[list[Figure], list[str]]:
    """The figures, and notes on how they were measured."""
    figures: list[Figure] = []
    init = timed(lambda: fleet.init("m1"))
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    figures.append(Figure("meshmail init (CA, keys, admin account; one process)", f"{init:.2f} s"))

    # Admit a second master and the slaves one by one: token, join, run, alive everywhere.
    names = ["m2", *(f"s{i}" for i in range(1, slaves + 1))]
    admitted = []
    joins = []
    for name in names:
        role = "master" if name.startswith("m") else "slave"
        start = time.perf_counter()
        token = fleet.token("m1", role)
        joins.append(timed(lambda name=name, token=token, role=role: fleet.join(name, token, role)))
        fleet.start(name)
        everyone = ["m1", *admitted, name]
        wait_views(fleet, everyone, lambda view, everyone=everyone: all(view.get(n) == "alive" for n in everyone))
        admitted.append(name)
        total = time.perf_counter() - start
        figures.append(
            Figure(f"token create + join + run -> {name} alive in all {len(everyone)} views", f"{total:.2f} s")
        )
    figures.append(
        Figure("meshmail join alone (process, TLS, CSR, files), median", f"{statistics.median(joins):.2f} s")
    )

    # The single-use token race window: while m2 does not know a redemption m1 recorded, m2
    # would admit a second join with the same token.
    races = [race_window(fleet, f"raced{i + 1}") for i in range(samples.races)]
    least = statistics.median(r[0] for r in races)
    most = statistics.median(r[1] for r in races)
    poll = statistics.median(r[2] for r in races)
    figures.append(
        Figure(
            f"race window: m1 records a redemption -> m2's /tokens shows it, median of {samples.races}",
            f"{least:.0f}-{most:.0f} ms",
        )
    )

    live = ["m1", *admitted]
    data = ["--data-dir", str(fleet.data_dir("m1"))]
    rotate = timed(lambda: subprocess.run([*MESHMAIL, "keyring", "rotate", *data], check=True, capture_output=True))
    figures.append(
        Figure(f"meshmail keyring rotate, {len(live)} live members (install, use, remove)", f"{rotate:.2f} s")
    )

    victim = admitted[-1]
    live.remove(victim)
    start = time.perf_counter()
    subprocess.run([*MESHMAIL, "remove", victim, *data], check=True, capture_output=True)
    wait_views(fleet, live, lambda view: view.get(victim) == "left")
    figures.append(
        Figure(f"meshmail remove -> {victim} left in all {len(live)} views", f"{time.perf_counter() - start:.2f} s")
    )

    login_ms = login_latency(fleet, "m1", password, samples.logins) * 1000
    figures.append(Figure(f"POST /login (scrypt N=2^15, r=8), median of {samples.logins}", f"{login_ms:.1f} ms"))
    token = files.read_api_token(fleet.data_dir("m1"))
    open_ms = api_latency(fleet, "m1", "/health", None, samples.requests) * 1000
    bearer_ms = api_latency(fleet, "m1", "/session", token, samples.requests) * 1000
    figures.append(Figure(f"GET /health (open), median of {samples.requests}, kept-alive TLS", f"{open_ms:.2f} ms"))
    figures.append(Figure(f"GET /session (bearer token checked), median of {samples.requests}", f"{bearer_ms:.2f} ms"))
    race = (
        "race window: each sample joins a new node through m1 with a fresh single-use token; m1 recorded the\n"
        "redemption at the time of its log line 'admitted node' (ms resolution), and m2 learned of it between\n"
        "its last GET /tokens showing the token unused and its first showing it used (polled on a kept-alive\n"
        f"TLS connection, one poll about {poll:.1f} ms, then {POLL_PAUSE * 1000:.0f} ms pause): "
        + ", ".join(f"{a:.0f}-{b:.0f}" for a, b, _ in races)
        + " ms"
    )
    return figures, race.splitlines()


if __name__ == "__main__":
    sys.exit(main())
