"""A slave publishing a hosting server's worth of domains, timed with real processes
(`make bench-slave`).

Two masters and one slave on 127.0.0.1, joined with tokens. The slave lists N domains
(100,000 by default) in a DirectAdmin-style file. Measured: how long until both masters
route all of them after the slave starts, how long a one-line edit of the file takes to
reach both masters, and the slave's memory. Step 4 names no peer system; the figures are
printed alone. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.cli import cli  # noqa: E402
from helpers.cluster import Cluster as Fleet  # noqa: E402

from meshmail.security import files  # noqa: E402

SETTINGS = """
[slave]
poll_interval = 1.0
settle = 2.0
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def slave_of(fleet: Fleet, master: str, domain: str) -> str | None:
    """The slave a master's map names for `domain` (the slave has no endpoints here)."""
    result = cli("domains", "show", domain, "--json", "--data-dir", str(fleet.data_dir(master)))
    return json.loads(result.stdout)["slave"] if result.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=100_000)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="meshmail-bench-") as root:
        fleet = Fleet(Path(root))
        try:
            run(fleet, Path(root), args.domains, rows)
        finally:
            fleet.close()
    print(f"meshmail slave benchmark: real processes on 127.0.0.1, {platform.machine()}, "
          f"Python {platform.python_version()}")  # fmt: skip
    for label, value in rows:
        print(f"{label:<66} {value:>12}")
    return 0


def run(fleet: Fleet, root: Path, count: int, rows: list[tuple[str, str]]) -> None:
    fleet.init("m1")
    fleet.start("m1")
    fleet.wait_alive(["m1"])
    assert fleet.join("m2", fleet.token("m1", "master"), "master").returncode == 0
    assert fleet.join("s1", fleet.token("m1", "slave"), "slave").returncode == 0
    listing = root / "domains"
    listing.write_text("".join(f"customer{i}.example\n" for i in range(count)))
    config = fleet.data_dir("s1") / files.CONFIG
    config.write_text(config.read_text() + SETTINGS + f'[[slave.sources]]\ntype = "directadmin"\npath = "{listing}"\n')
    fleet.start("m2")
    fleet.wait_alive(["m1", "m2"])

    start = time.perf_counter()
    fleet.start("s1")
    fleet.wait("all routes on both masters", ["m1", "m2"],
               lambda statuses: all(s["state"]["domains"] >= count for s in statuses.values()), 600)  # fmt: skip
    rows.append((f"slave start -> {count:,} domains in both masters' maps", f"{time.perf_counter() - start:.2f} s"))
    rows.append(("slave RSS after publishing", f"{rss_kib(fleet.processes['s1'].pid) / 1024:.0f} MiB"))

    # One edit: a domain leaves the list, another joins it.
    start = time.perf_counter()
    text = listing.read_text().replace("customer0.example\n", "") + "newcomer.example\n"
    temporary = listing.with_suffix(".new")
    temporary.write_text(text)
    temporary.replace(listing)
    deadline = time.monotonic() + 120
    while not all(slave_of(fleet, m, "newcomer.example") == "s1" for m in ("m1", "m2")):
        assert time.monotonic() < deadline, "the edit did not reach the masters"
        time.sleep(0.1)
    added = time.perf_counter() - start
    while not all(slave_of(fleet, m, "customer0.example") is None for m in ("m1", "m2")):
        assert time.monotonic() < deadline, "the removal did not reach the masters"
        time.sleep(0.1)
    rows.append(("file edit -> new domain in both masters' maps (settle 2 s)", f"{added:.2f} s"))
    rows.append(("file edit -> removed domain gone from both maps", f"{time.perf_counter() - start:.2f} s"))


if __name__ == "__main__":
    sys.exit(main())
