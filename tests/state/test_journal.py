"""Tests of the snapshot + log journal: round trips, torn and flipped bytes, crashes in compaction,
permissions, and a real process killed with SIGKILL while it appends."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmail.state import journal as journal_module
from meshmail.state.journal import (
    FRAME_OVERHEAD,
    HEADER_SIZE,
    LOG_NAME,
    MAX_RECORD_SIZE,
    SNAPSHOT_NAME,
    Journal,
    JournalError,
)

REPO = Path(__file__).resolve().parents[2]


def make_records(count: int, seed: int = 0) -> list[bytes]:
    """Records of varied sizes, including an empty one."""
    rng = random.Random(seed)
    return [b""] + [rng.randbytes(rng.randint(1, 60)) for _ in range(count - 1)]


def frame_size(record: bytes) -> int:
    return FRAME_OVERHEAD + len(record)


# The helpers skip fsync: they build and inspect files; durability has its own tests.


def write_journal(directory: Path, records: list[bytes]) -> None:
    with Journal.open(directory, fsync=False) as journal:
        journal.append_many(records)


def load(directory: Path) -> tuple[list[bytes], journal_module.LoadReport]:
    with Journal.open(directory, fsync=False) as journal:
        return journal.load(), journal.report


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Round trips


@pytest.mark.parametrize("fsync", [True, False])
def test_round_trip(tmp_path: Path, fsync: bool) -> None:
    records = make_records(20)
    with Journal.open(tmp_path / "j", fsync=fsync) as journal:
        assert journal.load() == []
        journal.append(records[0])
        journal.append_many(records[1:10])
        journal.append_many([])
        for record in records[10:]:
            journal.append(record)
        assert journal.load() == records
        assert journal.report.clean
        assert journal.report.log_records == 20
        assert journal.log_size() == sum(map(frame_size, records))
        assert journal.size() == HEADER_SIZE + journal.log_size()


def test_reopen_after_close(tmp_path: Path) -> None:
    records = make_records(10)
    write_journal(tmp_path, records[:5])
    with Journal.open(tmp_path) as journal:
        assert journal.log_size() == sum(map(frame_size, records[:5]))
        journal.append_many(records[5:])
    loaded, report = load(tmp_path)
    assert loaded == records
    assert report.clean and report.generation == 0


def test_closed_journal_refuses_use(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    journal.close()
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.append(b"x")
    with pytest.raises(JournalError, match="closed"):
        journal.load()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with Journal.open(tmp_path):
        with pytest.raises(JournalError, match="in use by another process"):
            Journal.open(tmp_path)
    Journal.open(tmp_path).close()


# Torn writes and flipped bits


def test_torn_last_record_at_every_offset(tmp_path: Path) -> None:
    records = make_records(8) + [bytes(range(40))]
    source = tmp_path / "source"
    write_journal(source, records)
    log_bytes = (source / LOG_NAME).read_bytes()
    last_start = len(log_bytes) - frame_size(records[-1])
    for cut in range(last_start, len(log_bytes) + 1):
        directory = tmp_path / f"cut{cut}"
        shutil.copytree(source, directory)
        (directory / LOG_NAME).write_bytes(log_bytes[:cut])
        loaded, report = load(directory)
        if cut == len(log_bytes):
            assert loaded == records and report.clean
            continue
        assert loaded == records[:-1]
        assert report.torn_bytes == cut - last_start
        assert report.corrupt_bytes == 0 and report.set_aside == ()
        assert (directory / LOG_NAME).stat().st_size == last_start
        with Journal.open(directory, fsync=False) as journal:
            assert journal.report.clean  # the first open already cut the tail
            journal.append(b"after the crash")
        assert load(directory)[0] == records[:-1] + [b"after the crash"]


def test_torn_tail_is_cut_before_the_next_append_without_a_load(tmp_path: Path) -> None:
    records = make_records(5)
    write_journal(tmp_path, records)
    with open(tmp_path / LOG_NAME, "ab") as log:
        log.write(b"\x10\x00\x00\x00garb")
    with Journal.open(tmp_path) as journal:
        assert journal.report.torn_bytes == 8
        journal.append(b"next")
    assert load(tmp_path)[0] == records + [b"next"]


def test_zero_filled_tail(tmp_path: Path) -> None:
    """A file extended by the crash but whose data never reached the disk reads as zeros."""
    records = make_records(5)
    write_journal(tmp_path, records)
    with open(tmp_path / LOG_NAME, "ab") as log:
        log.write(bytes(4096))
    loaded, report = load(tmp_path)
    assert loaded == records
    assert report.torn_bytes + report.corrupt_bytes == 4096


def test_bit_flips_in_last_record(tmp_path: Path) -> None:
    records = make_records(6) + [b"the last record"]
    source = tmp_path / "source"
    write_journal(source, records)
    log_bytes = (source / LOG_NAME).read_bytes()
    last_start = len(log_bytes) - frame_size(records[-1])
    for offset in range(last_start, len(log_bytes)):
        for bit in range(8):
            directory = tmp_path / f"flip{offset}.{bit}"
            shutil.copytree(source, directory)
            flip_bit(directory / LOG_NAME, offset, bit)
            loaded, report = load(directory)
            assert loaded == records[:-1], (offset, bit)
            assert report.torn_bytes + report.corrupt_bytes == frame_size(records[-1])
            with Journal.open(directory, fsync=False) as journal:
                journal.append(b"again")
            assert load(directory)[0] == records[:-1] + [b"again"]
            shutil.rmtree(directory)


def test_flipped_bit_in_a_middle_record_is_set_aside(tmp_path: Path) -> None:
    records = make_records(10)
    write_journal(tmp_path, records)
    bad_start = HEADER_SIZE + sum(map(frame_size, records[:4]))
    original = (tmp_path / LOG_NAME).read_bytes()
    flip_bit(tmp_path / LOG_NAME, bad_start + FRAME_OVERHEAD + 2, 5)
    damaged_tail = (tmp_path / LOG_NAME).read_bytes()[bad_start:]

    with Journal.open(tmp_path) as journal:
        assert journal.load() == records[:4]
        report = journal.report
        assert report.corrupt_bytes == len(original) - bad_start
        assert report.torn_bytes == 0
        assert len(report.set_aside) == 1
        aside = Path(report.set_aside[0])
        assert aside.name == f"{LOG_NAME}.0.{bad_start}.corrupt"
        assert aside.read_bytes() == damaged_tail
        assert mode(aside) == 0o600
        assert (tmp_path / LOG_NAME).stat().st_size == bad_start
        journal.append(b"new")
    assert load(tmp_path)[0] == records[:4] + [b"new"]


def test_second_corruption_at_the_same_offset_keeps_both_copies(tmp_path: Path) -> None:
    write_journal(tmp_path, [b"a", b"b", b"c"])
    bad_start = HEADER_SIZE + frame_size(b"a")
    for round_ in range(2):
        flip_bit(tmp_path / LOG_NAME, bad_start + FRAME_OVERHEAD, round_)
        assert load(tmp_path)[0] == [b"a"]
        write_journal(tmp_path, [b"b", b"c"])
    assert len(list(tmp_path.glob("*.corrupt"))) == 2


def test_oversize_length_prefix_is_corruption(tmp_path: Path) -> None:
    records = make_records(4)
    write_journal(tmp_path, records)
    good = (tmp_path / LOG_NAME).read_bytes()
    huge = (MAX_RECORD_SIZE + 1).to_bytes(4, "little") + bytes(4)
    for tail in (huge, huge + b"some bytes", (2**32 - 1).to_bytes(4, "little") + bytes(4)):
        (tmp_path / LOG_NAME).write_bytes(good + tail)
        loaded, report = load(tmp_path)
        assert loaded == records
        assert report.corrupt_bytes == len(tail)
    # A middle record with an oversize length: the reader stops there, the rest is set aside.
    data = bytearray(good)
    second = HEADER_SIZE + frame_size(records[0])
    data[second : second + 4] = (MAX_RECORD_SIZE + 1).to_bytes(4, "little")
    (tmp_path / LOG_NAME).write_bytes(bytes(data))
    loaded, report = load(tmp_path)
    assert loaded == records[:1]
    assert report.corrupt_bytes == len(good) - second


def test_record_size_limit(tmp_path: Path) -> None:
    with Journal.open(tmp_path, fsync=False) as journal:
        journal.append(b"kept")
        largest = bytes(MAX_RECORD_SIZE)
        journal.append(largest)
        with pytest.raises(ValueError, match="over the limit"):
            journal.append(largest + b"!")
        with pytest.raises(ValueError, match="over the limit"):
            journal.append_many([b"not written", largest + b"!"])
        with pytest.raises(ValueError, match="over the limit"):
            journal.compact([b"x", largest + b"!"])
        assert journal.load() == [b"kept", largest]
        journal.append(b"still works")
    assert load(tmp_path)[0] == [b"kept", largest, b"still works"]
    assert not list(tmp_path.glob("*.tmp"))


# Headers


def test_header_damage_is_refused(tmp_path: Path) -> None:
    write_journal(tmp_path, [b"a"])
    log = tmp_path / LOG_NAME
    original = log.read_bytes()
    log.write_bytes(b"not a journal at all" + original)
    with pytest.raises(JournalError, match="not a meshmail journal file"):
        Journal.open(tmp_path)
    log.write_bytes(original[:10])
    with pytest.raises(JournalError, match="not a meshmail journal file"):
        Journal.open(tmp_path)
    data = bytearray(original)
    data[8] = 2  # format version
    log.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="journal format 2, this meshmail reads format 1"):
        Journal.open(tmp_path)
    for offset in (12, 16, 20):  # generation, header checksum
        data = bytearray(original)
        data[offset] ^= 1
        log.write_bytes(bytes(data))
        with pytest.raises(JournalError, match="damaged header"):
            Journal.open(tmp_path)
    log.write_bytes(original)
    assert load(tmp_path)[0] == [b"a"]


def test_damaged_snapshot_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as journal:
        journal.compact([b"one", b"two", b"three"])
    flip_bit(tmp_path / SNAPSHOT_NAME, HEADER_SIZE + FRAME_OVERHEAD + 1, 0)
    with pytest.raises(JournalError, match=f"{SNAPSHOT_NAME} is damaged at byte {HEADER_SIZE}"):
        Journal.open(tmp_path)


def test_log_newer_than_snapshot_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as journal:
        journal.compact([b"one"])
    (tmp_path / SNAPSHOT_NAME).unlink()
    with pytest.raises(JournalError, match="follows snapshot generation 1 but the snapshot is generation 0"):
        Journal.open(tmp_path)


# Compaction


def test_compaction_round_trip(tmp_path: Path) -> None:
    records = make_records(30)
    with Journal.open(tmp_path) as journal:
        journal.append_many(records[:10])
        journal.compact(records[:10])
        assert journal.generation == 1
        assert journal.log_size() == 0
        assert journal.load() == records[:10]
        assert journal.report.snapshot_records == 10 and journal.report.log_records == 0
        journal.append_many(records[10:20])
        assert journal.load() == records[:20]
        journal.compact(iter(records[5:20]))  # the caller's state may drop records it no longer needs
        journal.append_many(records[20:])
        assert journal.size() == (tmp_path / SNAPSHOT_NAME).stat().st_size + (tmp_path / LOG_NAME).stat().st_size
    loaded, report = load(tmp_path)
    assert loaded == records[5:]
    assert report.generation == 2 and report.clean
    with Journal.open(tmp_path) as journal:
        journal.compact([])
        assert journal.load() == []


class SimulatedCrash(BaseException):
    """The process died here: nothing after it runs, not even cleanup code."""


def test_crash_at_every_step_of_compaction(tmp_path: Path, crash_at) -> None:
    old = make_records(12, seed=1)
    new = [b"compacted"] + old[6:]

    def prepare(directory: Path) -> Journal:
        journal = Journal.open(directory)
        journal.append_many(old[:3])
        journal.compact(old[:3])
        journal.append_many(old[3:])
        return journal

    journal = prepare(tmp_path / "count")
    with crash_at(None) as calls:
        journal.compact(new)
    journal.close()
    steps = len(calls)
    assert calls.count("replace") == 2 and calls.count("fsync") >= 4

    outcomes = set()
    for step in range(steps + 1):
        directory = tmp_path / f"crash{step}"
        journal = prepare(directory)
        with crash_at(step):
            journal.compact(new)
        journal.close()
        with Journal.open(directory) as reopened:
            loaded = reopened.load()
            assert loaded in (old, new), step
            outcomes.add("old" if loaded == old else "new")
            assert not list(directory.glob("*.tmp"))
            reopened.append(b"after")
        assert load(directory)[0] == loaded + [b"after"]
    assert outcomes == {"old", "new"}


def test_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    write_journal(tmp_path, [b"a", b"b"])
    (tmp_path / (SNAPSHOT_NAME + ".tmp")).write_bytes(b"half a snap")
    (tmp_path / (LOG_NAME + ".tmp")).write_bytes(b"")
    (tmp_path / "unrelated.tmp").write_bytes(b"not ours")
    loaded, report = load(tmp_path)
    assert loaded == [b"a", b"b"]
    assert report.temp_files == 2
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == ["unrelated.tmp"]


def test_new_snapshot_with_stale_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash came after the snapshot was renamed into place and before the log was reset."""
    records = make_records(8)
    journal = Journal.open(tmp_path)
    journal.append_many(records)

    def crash() -> None:
        raise SimulatedCrash("before the new log")

    monkeypatch.setattr(journal, "_start_log", crash)
    with pytest.raises(SimulatedCrash):
        journal.compact(records[2:])
    with pytest.raises(JournalError, match="refuses writes"):
        journal.append(b"would go to the stale log")
    journal.close()
    assert (tmp_path / LOG_NAME).stat().st_size > HEADER_SIZE  # the stale log is still there

    with Journal.open(tmp_path) as reopened:
        assert reopened.report.stale_log
        assert reopened.load() == records[2:]
        assert reopened.log_size() == 0
        reopened.append(b"after")
    loaded, report = load(tmp_path)
    assert loaded == records[2:] + [b"after"]
    assert report.clean


def test_failed_append_is_cut_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal.open(tmp_path)
    journal.append(b"good")
    real_write = os.write

    def half_then_fail(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        journal.append(b"x" * 100)
    monkeypatch.undo()
    assert (tmp_path / LOG_NAME).stat().st_size == HEADER_SIZE + frame_size(b"good")
    with pytest.raises(JournalError, match="open it again"):
        journal.append(b"refused")
    journal.close()
    with Journal.open(tmp_path) as reopened:
        assert reopened.report.clean
        assert reopened.load() == [b"good"]
        reopened.append(b"next")


def test_appends_and_creation_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    directory = tmp_path / "data" / "state"
    tmp_path.joinpath("data").mkdir()
    journal = Journal.open(directory)
    # The new directory's entry in its parent, the new log's contents, then its entry.
    assert synced == [str(tmp_path / "data"), str(directory / LOG_NAME) + ".tmp", str(directory)]
    synced.clear()
    journal.append(b"one")
    journal.append_many([b"two", b"three"])
    assert synced == [str(directory / LOG_NAME)] * 2
    journal.close()


def test_permissions(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    with Journal.open(directory) as journal:
        journal.append(b"a")
        journal.compact([b"a"])
    assert mode(directory) == 0o700
    for name in (SNAPSHOT_NAME, LOG_NAME, "journal.lock"):
        assert mode(directory / name) == 0o600, name


# Against a model


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=40)),
        st.tuples(st.just("append_many"), st.lists(st.binary(max_size=40), max_size=5)),
        st.tuples(st.just("compact"), st.integers(min_value=0, max_value=10)),
        st.tuples(st.just("reopen"), st.none()),
        st.tuples(st.just("load"), st.none()),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_matches_a_list(ops: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        model: list[bytes] = []
        journal = Journal.open(directory, fsync=False)
        try:
            for op, argument in ops:
                if op == "append":
                    journal.append(argument)
                    model.append(argument)
                elif op == "append_many":
                    journal.append_many(argument)
                    model.extend(argument)
                elif op == "compact":
                    model = model[argument:]  # the caller keeps only part of its state
                    journal.compact(model)
                elif op == "reopen":
                    journal.close()
                    journal = Journal.open(directory, fsync=False)
                    assert journal.report.clean
                else:
                    assert journal.load() == model
            assert journal.load() == model
            assert journal.size() == sum(
                os.path.getsize(os.path.join(directory, name))
                for name in (SNAPSHOT_NAME, LOG_NAME)
                if os.path.exists(os.path.join(directory, name))
            )
        finally:
            journal.close()


# A real process killed with SIGKILL


CHILD = r"""
import random, sys
from meshmail.state.journal import Journal

def record(i):
    return b"%d:" % i * (1 + i % 97)

directory, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
journal = Journal.open(directory)
state = journal.load()
written = len(state)
while True:
    if rng.random() < 0.03:
        journal.compact(state)
        continue
    batch = [record(written + k) for k in range(rng.choice((1, 1, 1, 4)))]
    if len(batch) == 1:
        journal.append(batch[0])
    else:
        journal.append_many(batch)
    state.extend(batch)
    written += len(batch)
    sys.stdout.write("%d\n" % written)  # every record below this number is durable
    sys.stdout.flush()
"""


def child_record(i: int) -> bytes:
    return b"%d:" % i * (1 + i % 97)


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_while_appending(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    directory = tmp_path / "state"
    durable = 0
    for _round in range(2):  # the second child continues the journal the first one left
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(seed * 10 + _round)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert child.stdout is not None
        try:
            target = durable + rng.randint(20, 400)
            while durable < target:
                line = child.stdout.readline()
                assert line, "the child died on its own"
                durable = int(line)
            time.sleep(rng.random() / 500)  # so the kill can land anywhere in the next append or compaction
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for line in child.stdout.read().splitlines():  # reported before it died
            durable = int(line)
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        loaded, report = load(directory)
        assert len(loaded) >= durable
        assert loaded == [child_record(i) for i in range(len(loaded))]
        assert not report.corrupt_bytes or report.set_aside
        durable = len(loaded)
