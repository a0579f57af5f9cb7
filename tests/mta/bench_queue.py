"""Figures for the queue, run by hand (python tests/mta/bench_queue.py [count]): fsyncs per
message when 50 stores run at once, the time a rescan of 100,000 queued messages takes (in
batch files of 8, as stores at the same time leave them), the memory per message of the
spool's and the queue's indexes, and what the /status figures of that queue cost. Prints
them; asserts nothing about time."""

from __future__ import annotations

import os
import random
import stat
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

from meshmail.mta import spool as spool_module
from meshmail.mta.queue import Queue, RetryPolicy
from meshmail.mta.spool import Envelope, Recipient, Spool, new_queue_id

T0 = 1_700_000_000_000
DATA = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"


def envelope(number: int, rng: random.Random) -> Envelope:
    slave = f"s{number % 4}"
    return Envelope(
        id=new_queue_id(T0 + number, rng.getrandbits(32)),
        sender=f"sender{number}@example.net",
        recipients=[Recipient(f"user{number}@{slave}.example", slave)],
        received_ms=T0 + number,
        client_address="192.0.2.7",
        helo="mx.example.net",
        size=len(DATA),
        origin="m1",
    )


async def group_commit(folder: Path, concurrent: int, rounds: int) -> None:
    counts = {"file": 0, "folder": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        counts["folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"] += 1
        real_fsync(fd)

    os.fsync = fsync
    spool = Spool.open(folder)
    rng = random.Random(1)
    started = time.perf_counter()
    try:
        for round_ in range(rounds):
            async with trio.open_nursery() as nursery:
                for number in range(concurrent):
                    nursery.start_soon(spool.store, envelope(round_ * concurrent + number, rng), DATA)
    finally:
        os.fsync = real_fsync
        spool.close()
    elapsed = time.perf_counter() - started
    messages = concurrent * rounds
    print(
        f"group commit: {rounds} x {concurrent} concurrent stores: {counts['file']} file fsyncs, "
        f"{counts['folder']} folder fsyncs ({spool.commit_rounds} rounds); "
        f"{(counts['file'] + counts['folder']) / messages:.3f} fsyncs per message "
        f"(2 with a file each and no group commit); "
        f"{messages / elapsed:.0f} stores/s"
    )


def fill(folder: Path, count: int, per_file: int = 8) -> None:
    """Writes `count` messages straight into the folder, `per_file` to a batch file (no fsync:
    this is setup)."""
    rng = random.Random(2)
    crc = spool_module.zlib.crc32(DATA)
    for first in range(0, count, per_file):
        records, name = [], ""
        for number in range(first, min(first + per_file, count)):
            env = envelope(number, rng)
            name = name or f"{env.id}.0{spool_module.BATCH_SUFFIX}"
            packed = spool_module.encode_envelope(env)
            records += (spool_module._header(spool_module._KIND_MESSAGE, packed, len(DATA), crc), packed, DATA)
        with open(folder / name, "wb") as file:
            file.write(b"".join(records))


def rescan_and_index(folder: Path, count: int) -> None:
    spool = Spool.open(folder)
    started = time.perf_counter()
    result = spool.scan()
    scanned = time.perf_counter() - started
    assert len(result.envelopes) == count and not result.corrupt
    del result
    spool.close()
    spool = Spool.open(folder)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    envelopes = spool.scan().envelopes
    queue = Queue(RetryPolicy(), random.Random(3))
    queue.load(envelopes)
    del envelopes  # the queue keeps what it needs; the spool keeps where each message is
    indexed = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    started = time.perf_counter()
    queue.stats(T0)
    first_stats = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(100):
        queue.stats(T0)
    later_stats = (time.perf_counter() - started) / 100
    started = time.perf_counter()
    due = sum(len(queue.due(slave, T0 + 10**9)) for slave in queue.slaves())
    taken = time.perf_counter() - started
    spool.close()
    print(f"rescan: {count} messages in {scanned:.2f} s ({scanned / count * 1e6:.0f} us each, warm page cache)")
    print(f"index: {indexed / count:.0f} bytes per message, the spool's and the queue's "
          f"({indexed / 2**20:.1f} MiB for {count} messages)")
    print(f"stats (/status): the first {first_stats * 1000:.1f} ms (it looks for the oldest), "
          f"then {later_stats * 1e6:.0f} us each")
    print(f"due: {due} entries taken in {taken * 1000:.0f} ms")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as temporary:
        trio.run(group_commit, Path(temporary) / "commit", 50, 10)
        folder = Path(temporary) / "queue"
        Spool.open(folder).close()
        started = time.perf_counter()
        fill(folder, count)
        print(f"setup: {count} messages written in {time.perf_counter() - started:.1f} s")
        rescan_and_index(folder, count)


if __name__ == "__main__":
    main()
