"""Cluster bootstrap and security, timed with real processes on 127.0.0.1 (`make bench-security`).

Measures what an operator waits for: admitting a server (`meshmail join` until it is alive
in every view), `meshmail remove` until every view shows the node left, `meshmail keyring
rotate` on a live cluster, a login (scrypt), and what the API pays per request for a
bearer token. Step 3 names no peer system to compare with; the figures are printed alone.
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def api_latency(fleet: Fleet, name: str, path: str, token: str | None, count: int) -> float:
    """Median seconds of `count` GETs of `path` on one kept-alive HTTPS connection."""
    context = ssl.create_default_context(cafile=str(fleet.data_dir(name) / files.CA_CERT))
    context.check_hostname = False
    host, port = fleet.url(name).removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
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
    context = ssl.create_default_context(cafile=str(fleet.data_dir(name) / files.CA_CERT))
    context.check_hostname = False
    host, port = fleet.url(name).removeprefix("https://").rsplit(":", 1)
    samples = []
    for _ in range(count):
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
        body = json.dumps({"account": "admin", "password": password})
        start = time.perf_counter()
        conn.request("POST", "/login", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        samples.append(time.perf_counter() - start)
        assert response.status == 200, response.status
        conn.close()
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slaves", type=int, default=4, help="servers joined after the two masters (default 4)")
    args = parser.parse_args()
    from helpers.cluster import PASSWORD

    with tempfile.TemporaryDirectory(prefix="meshmail-bench-") as root:
        fleet = Fleet(Path(root))
        try:
            rows = run(fleet, args.slaves, PASSWORD)
        finally:
            fleet.close()
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    print(f"meshmail security benchmark: real processes on 127.0.0.1, {machine}")
    print(f"{'measure':<68} {'result':>10}")
    for label, value in rows:
        print(f"{label:<68} {value:>10}")
    return 0


def run(fleet: Fleet, slaves: int, password: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    init = timed(lambda: fleet.init("m1"))
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    rows.append(("meshmail init (CA, keys, admin account; one process)", f"{init:.2f} s"))

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
        rows.append((f"token create + join + run -> {name} alive in all {len(everyone)} views", f"{total:.2f} s"))
    rows.append(("meshmail join alone (process, TLS, CSR, files), median", f"{statistics.median(joins):.2f} s"))

    # The single-use token race window: from a join admitted by m1 until m2 knows the
    # token is used (from then on m2 refuses it).
    token = fleet.token("m1", "slave")
    token_id = parse_join_token(token).token_id
    m2_token = files.read_api_token(fleet.data_dir("m2"))

    def used_on_m2() -> bool:
        return any(t["id"] == token_id and t["used"] == 1 for t in fleet.get("m2", "/tokens", m2_token)["tokens"])

    assert fleet.join("raced", token, "slave").returncode == 0
    start = time.perf_counter()  # the redemption was written on m1 before the join returned
    while not used_on_m2():
        time.sleep(0.005)
    window = time.perf_counter() - start
    rows.append(("join admitted by m1 -> m2 knows the token is used (race window)", f"{window * 1000:.0f} ms"))

    live = ["m1", *admitted]
    data = ["--data-dir", str(fleet.data_dir("m1"))]
    rotate = timed(lambda: subprocess.run([*MESHMAIL, "keyring", "rotate", *data], check=True, capture_output=True))
    rows.append((f"meshmail keyring rotate, {len(live)} live members (install, use, remove)", f"{rotate:.2f} s"))

    victim = admitted[-1]
    live.remove(victim)
    start = time.perf_counter()
    subprocess.run([*MESHMAIL, "remove", victim, *data], check=True, capture_output=True)
    wait_views(fleet, live, lambda view: view.get(victim) == "left")
    rows.append((f"meshmail remove -> {victim} left in all {len(live)} views", f"{time.perf_counter() - start:.2f} s"))

    login_ms = login_latency(fleet, "m1", password, 10) * 1000
    rows.append(("POST /login (scrypt N=2^15, r=8), median of 10", f"{login_ms:.1f} ms"))
    token = files.read_api_token(fleet.data_dir("m1"))
    open_ms = api_latency(fleet, "m1", "/health", None, 300) * 1000
    bearer_ms = api_latency(fleet, "m1", "/session", token, 300) * 1000
    rows.append(("GET /health (open), median of 300, kept-alive TLS", f"{open_ms:.2f} ms"))
    rows.append(("GET /session (bearer token checked), median of 300", f"{bearer_ms:.2f} ms"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
