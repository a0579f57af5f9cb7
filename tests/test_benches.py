"""Every benchmark of tests/bench/ in its short mode, so a bench that rots fails the suite.

Short mode runs small sizes once and fails on errors only, never on figures: these tests
check that each bench runs to the end and prints its figures, not how fast anything is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import mailkit

BENCH = Path(__file__).resolve().parent / "bench"
#: Seconds one short run may take before it counts as hung (each takes well under a minute).
RUN_TIMEOUT = 300

#: Each bench script and lines its output must hold: the figures it exists to print.
BENCHES = {
    "bench_gossip.py": [
        "join -> all see all alive (s)",
        "kill -9 -> all report failed (s)",
        "bytes sent per node per second",
    ],
    "bench_state.py": [
        "(a) full sync of 10,000 to a fresh node",
        "(a) resolve(), address hit",
        "(a) RSS per entry",
        "(b) in-sync exchange, both ways",
        "(c) one change, both ways",
    ],
    "bench_security.py": [
        "meshmail init",
        "token create + join + run -> s1 alive",
        "race window: m1 records a redemption -> m2's /tokens shows it",
        "meshmail keyring rotate",
        "meshmail remove -> s1 left",
        "POST /login",
        "GET /session (bearer token checked)",
    ],
    "bench_proxy.py": [
        "login latency p50 (ms)",
        "  added over direct (ms)",
        "login latency p99 (ms)",
        "logins/s, 50 clients at once",
        "meshmail logins/s, one master (after the sync)",
        "  split over two masters' proxies: logins/s",
        "bulk FETCH of 5 MB, plain (MB/s)",
        "bulk FETCH of 5 MB, TLS (MB/s)",
        "RSS per idle session, 200 in IDLE (KiB)",
        "meshmail login p99 at rest (ms)",
        "  during a full sync of 20,000 domains (ms)",
        "  longest login during the sync (ms)",
        "  logins refused (NO), at rest and during the sync",
    ],
    "bench_slave.py": [
        "slave start -> 1,000 domains in the first master's map",
        "slave start -> 1,000 domains in both masters' maps",
        "file edit -> new domain in both masters' maps",
        "slave RSS after publishing",
    ],
    "bench_mx.py": [
        "queue path: accepted msgs/s (next hop down, fsync'd)",
        "  with a shadow copy on another master (msgs/s)",
        "relay / in-line: delivered msgs/s (next hop up)",
        "drain: Dovecot back -> 100 queued in the mailbox (s)",
    ],
}


def run_short(script: str) -> str:
    """Run `script --short`; its output, after checking it exited 0."""
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--short"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{script} --short exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(BENCHES))
def test_bench_runs_in_short_mode_and_prints_its_figures(script):
    if script == "bench_gossip.py" and shutil.which("serf") is None and not os.environ.get("CI"):
        pytest.skip("the gossip bench runs beside HashiCorp Serf: apt-get install serf")
    if script == "bench_proxy.py":
        mailkit.require("dovecot")
        if shutil.which("nginx") is None and not os.environ.get("CI"):
            pytest.skip("the proxy bench runs beside nginx's mail proxy: apt-get install nginx-light libnginx-mod-mail")
    if script == "bench_mx.py":
        mailkit.require("dovecot", "postfix")
    output = run_short(script)
    missing = [line for line in BENCHES[script] if not any(row.startswith(line) for row in output.splitlines())]
    assert not missing, f"{script} --short printed no line starting with {missing}:\n{output}"


def test_bench_mx_reports_each_row_from_its_median_round():
    """A full bench-mx run is several rounds; each row of its table comes from the round whose
    ratio is the median, so one lucky (or unlucky) round decides nothing."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_mx
    finally:
        sys.path.remove(str(BENCH))
    Row = bench_mx.Row

    def round_of(ratio: float, cpu: str) -> list[Row]:
        return [
            Row("rate", "100", f"{100 * ratio:.0f}", ratio, ">= 1 x Postfix", ratio >= 1),
            Row("cpu", "-", cpu),
        ]

    rounds = [round_of(1.4, "2.0"), round_of(0.9, "3.0"), round_of(1.1, "1.0")]
    rate, cpu = bench_mx.median_rows(rounds)
    assert (rate.meshmail, rate.ratio, rate.ok) == ("110", 1.1, True)
    assert cpu.meshmail == "2.0"
    rate, _ = bench_mx.median_rows([round_of(0.9, "1"), round_of(1.2, "1")])  # even count: the lower middle
    assert (rate.ratio, rate.ok) == (0.9, False)
    assert bench_mx.median_rows([round_of(1.2, "1")]) == round_of(1.2, "1")
