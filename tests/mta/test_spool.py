"""The spool on a real filesystem: round trips, the order of fsyncs and renames before store
returns, messages stored together sharing a batch file, group commit sharing folder fsyncs,
corrupt files quarantined on rescan, and a child process SIGKILLed while it stores, updates
and removes, leaving only whole messages.

`store` of bytes goes into a batch file; `store` of a file (`io.BytesIO` here) into a message
file of its own, as does `update` of a batched message."""

from __future__ import annotations

import io
import logging
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import attrs
import msgpack
import pytest
import trio

from meshmail.mta import spool as spool_module
from meshmail.mta.spool import (
    CorruptMessage,
    Envelope,
    Recipient,
    RecipientState,
    Spool,
    SpoolError,
    decode_envelope,
    encode_envelope,
    new_queue_id,
)
from meshmail.protocols.smtp import Reply

REPO = Path(__file__).resolve().parents[2]
START_MS = 1_700_000_000_000
MESSAGE = b"DKIM-Signature: v=1; a=rsa-sha256; b=abc\r\nSubject: hello\r\n\r\nbody line \xc3\xa9\r\n.\r\n"


def envelope(number: int = 0, **changes) -> Envelope:
    values = dict(
        id=new_queue_id(START_MS + number, number),
        sender="alice@example.net",
        recipients=(Recipient("bob@example.org", "s1"), Recipient("carol@example.com", "s2")),
        received_ms=START_MS + number,
        client_address="192.0.2.7",
        helo="mx.example.net",
        origin="m1",
    )
    values.update(changes)
    return Envelope(**values)


@pytest.fixture
def spool(tmp_path):
    opened = Spool.open(tmp_path / "queue")
    yield opened
    opened.close()


def test_queue_ids_sort_by_arrival_and_fit_a_file_name():
    ids = [new_queue_id(START_MS + step, random.Random(step).getrandbits(32)) for step in range(100)]
    assert ids == sorted(ids)
    assert all(re.fullmatch("[0-9a-v]{16}", i) for i in ids)
    assert len(set(ids)) == 100


async def test_a_stored_message_reads_back_byte_for_byte_with_its_envelope(spool):
    stored = await spool.store(envelope(), MESSAGE)
    assert stored.size == len(MESSAGE)
    assert await spool.read_message(stored.id) == (stored, MESSAGE)
    [path] = spool.paths(stored.id)
    assert path.parent == spool.folder and path.suffix == ".cps"  # a batch file, of one here
    assert not any(spool.temp_folder.iterdir())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert spool.scan().envelopes == [stored]


async def test_a_message_is_copied_from_a_file_from_its_position(spool):
    source = io.BytesIO(b"SKIP" + MESSAGE * 40_000)  # several copy chunks
    source.seek(4)
    stored = await spool.store(envelope(), source)
    assert stored.size == len(MESSAGE) * 40_000
    assert (await spool.read_message(stored.id))[1] == MESSAGE * 40_000
    assert spool.paths(stored.id) == [spool.message_path(stored.id)]
    assert stat.S_IMODE(spool.message_path(stored.id).stat().st_mode) == 0o600


async def test_an_update_replaces_the_envelope_and_a_rescan_sees_it(spool):
    stored = await spool.store(envelope(), MESSAGE)
    first, second = stored.recipients
    changed = attrs.evolve(
        stored,
        recipients=(
            attrs.evolve(first, state=RecipientState.DELIVERED, attempts=1, reply=Reply(250, "2.0.0", "queued as X")),
            attrs.evolve(second, attempts=1, next_attempt_ms=START_MS + 60_000, reply=Reply(451, "4.3.0", ("a", "b"))),
        ),
        warned=True,
    )
    await spool.update(changed)
    assert await spool.read_envelope(stored.id) == changed
    assert await spool.read_message(stored.id) == (changed, MESSAGE)
    assert spool.scan().envelopes == [changed]


async def test_an_update_of_a_message_not_queued_is_refused(spool):
    with pytest.raises(FileNotFoundError):
        await spool.update(envelope())
    assert not any(spool.temp_folder.iterdir())


async def test_a_second_store_under_the_same_id_is_refused(spool):
    stored = await spool.store(envelope(), MESSAGE)
    with pytest.raises(FileExistsError):
        await spool.store(stored, b"other")
    assert (await spool.read_message(stored.id))[1] == MESSAGE


async def test_remove_takes_the_message_and_its_update_away(spool):
    stored = await spool.store(envelope(), MESSAGE)
    await spool.update(attrs.evolve(stored, warned=True))
    await spool.remove(stored.id)
    assert sorted(p.name for p in spool.folder.iterdir()) == ["corrupt", "failed", "queue.lock", "tmp"]
    assert spool.scan().envelopes == []
    with pytest.raises(FileNotFoundError):
        await spool.read_message(stored.id)


@pytest.mark.parametrize("kept_as", ["batched", "own file"])
async def test_an_expired_message_moves_to_failed_with_its_final_envelope(spool, kept_as):
    data = MESSAGE if kept_as == "batched" else io.BytesIO(MESSAGE)
    stored = await spool.store(envelope(), data)
    final = attrs.evolve(stored, recipients=[attrs.evolve(r, state=RecipientState.FAILED) for r in stored.recipients])
    path = await spool.move_to_failed(final)
    assert path == spool.failed_folder / f"{stored.id}.msg"
    assert spool.scan().envelopes == []
    assert not list(spool.folder.glob("*.cps"))
    # The newest envelope beside the message file, or in it when the update wrote that file.
    newest = spool.failed_folder / f"{stored.id}.env"
    source, kind = (newest, 2) if newest.exists() else (path, 1)
    assert spool_module._read_file_head(source, kind).envelope == final
    assert newest.exists() == (kept_as == "own file")


def test_one_process_at_a_time_uses_the_folder(spool):
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool.open(spool.folder)


def test_the_envelope_codec_ignores_fields_it_does_not_know():
    original = envelope(recipients=(Recipient("b@example.org", "s1", reply=Reply(550, "5.1.1", "no such user")),))
    obj = msgpack.unpackb(encode_envelope(original))
    obj["future"] = [1, 2]
    obj["recipients"][0]["future"] = "x"
    assert decode_envelope(msgpack.packb(obj)) == original
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({"v": 1, "id": "x"}), msgpack.packb({**obj, "id": "../x"})):
        with pytest.raises(CorruptMessage):
            decode_envelope(bad)


# --- durability: what happens before store returns ---------------------------------------


class Recorder:
    """Wraps os.fsync and os.rename to log what each did, in order, with the file's kind."""

    def __init__(self, monkeypatch, delay_folder_sync: float = 0.0) -> None:
        self.events: list[tuple[str, str]] = []
        self.delay = delay_folder_sync
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
            if kind == "folder" and self.delay:
                time.sleep(self.delay)  # a slow disk: writers pile up behind the round
            real_fsync(fd)
            self.events.append((f"fsync-{kind}", path))

        def rename(source, destination):
            real_rename(source, destination)
            self.events.append(("rename", f"{source} -> {destination}"))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def count(self, kind: str) -> int:
        return sum(1 for event, _ in self.events if event == kind)


@pytest.mark.parametrize("kept_as", ["batched", "own file"])
async def test_the_file_is_synced_then_renamed_then_the_folder_synced_before_store_returns(
    spool, monkeypatch, kept_as
):
    recorder = Recorder(monkeypatch)
    stored = await spool.store(envelope(), MESSAGE if kept_as == "batched" else io.BytesIO(MESSAGE))
    recorder.events.append(("returned", ""))
    [final] = spool.paths(stored.id)
    kinds = [event for event, _ in recorder.events]
    assert kinds == ["fsync-file", "rename", "fsync-folder", "returned"]
    assert recorder.events[0][1].startswith(str(spool.temp_folder))
    assert recorder.events[1][1].endswith(f"-> {final}")
    assert recorder.events[2][1] == str(spool.folder)

    recorder.events.clear()
    await spool.update(attrs.evolve(stored, warned=True))
    recorder.events.append(("returned", ""))
    if kept_as == "batched":  # the message moves to a file of its own, then its batch file goes
        assert [event for event, _ in recorder.events] == [
            "fsync-file", "rename", "fsync-folder", "fsync-folder", "returned"
        ]  # fmt: skip
        assert recorder.events[1][1].endswith(f"-> {spool.message_path(stored.id)}")
        assert not final.exists()
    else:
        assert [event for event, _ in recorder.events] == ["fsync-file", "rename", "fsync-folder", "returned"]
        assert recorder.events[1][1].endswith(f"-> {spool.envelope_path(stored.id)}")

    recorder.events.clear()
    await spool.remove(stored.id)
    recorder.events.append(("returned", ""))
    assert recorder.events == [("fsync-folder", str(spool.folder)), ("returned", "")]


async def test_fifty_concurrent_stores_share_batch_files(spool, monkeypatch):
    recorder = Recorder(monkeypatch, delay_folder_sync=0.05)
    stored: list[Envelope] = []

    async def store(number: int) -> None:
        stored.append(await spool.store(envelope(number), MESSAGE + b"%d" % number))
        [path] = spool.paths(stored[-1].id)
        assert any(event == "rename" and renamed.endswith(f"-> {path}") for event, renamed in recorder.events)

    async with trio.open_nursery() as nursery:
        for number in range(50):
            nursery.start_soon(store, number)
    # The first writers each start a round (up to STORE_ROUNDS at once); everyone who
    # arrived meanwhile shares the next.
    files = recorder.count("fsync-file")
    assert files <= spool_module.STORE_ROUNDS + 2, files
    assert len(list(spool.folder.glob("*.cps"))) == files
    assert spool.commit_rounds == files
    assert sorted(e.id for e in spool.scan().envelopes) == sorted(e.id for e in stored)
    for kept in stored:
        assert (await spool.read_message(kept.id))[1] == MESSAGE + b"%d" % int(kept.id[-2:], 32)


async def test_fifty_concurrent_updates_share_folder_fsyncs(spool, monkeypatch):
    stored = [await spool.store(envelope(number), io.BytesIO(MESSAGE)) for number in range(50)]
    recorder = Recorder(monkeypatch, delay_folder_sync=0.05)
    rounds = spool.commit_rounds

    async def update(kept: Envelope) -> None:
        await spool.update(attrs.evolve(kept, warned=True))
        assert any(event == "rename" and path.endswith(f"{kept.id}.env") for event, path in recorder.events)

    async with trio.open_nursery() as nursery:
        for kept in stored:
            nursery.start_soon(update, kept)
    assert recorder.count("fsync-file") == 50
    # One round for the first writer, then a few for everyone who arrived while it synced.
    assert recorder.count("fsync-folder") <= 5, recorder.count("fsync-folder")
    assert spool.commit_rounds - rounds == recorder.count("fsync-folder")
    # Every folder fsync follows the renames of its round: the last event of all is one.
    assert recorder.events[-1][0] == "fsync-folder"
    assert all(e.warned for e in spool.scan().envelopes)


@pytest.mark.parametrize("kept_as", ["batched", "own file"])
async def test_a_write_cancelled_before_its_round_leaves_nothing(spool, monkeypatch, kept_as):
    recorder = Recorder(monkeypatch, delay_folder_sync=0.2)
    rounds = spool_module.STORE_ROUNDS if kept_as == "batched" else 1
    first = [envelope(number) for number in range(1, rounds + 1)]
    data = (lambda: MESSAGE) if kept_as == "batched" else (lambda: io.BytesIO(MESSAGE))
    async with trio.open_nursery() as nursery:
        for kept in first:  # their rounds hold the next writer back
            nursery.start_soon(spool.store, kept, data())
        await trio.sleep(0.05)
        with trio.move_on_after(0.05) as scope:
            await spool.store(envelope(99), data())
    assert scope.cancelled_caught
    assert sorted(e.id for e in spool.scan().envelopes) == sorted(e.id for e in first)
    assert not any(spool.temp_folder.iterdir())
    renamed = [path for event, path in recorder.events if event == "rename"]
    assert len(renamed) == rounds and not any(envelope(99).id in path for path in renamed)


async def test_a_failed_file_fsync_fails_the_stores_of_that_file_only(spool, monkeypatch):
    real_fsync = os.fsync
    victim = envelope(7).id.encode()
    failed: list[bytes] = []  # what the file whose fsync failed held

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(str(spool.temp_folder)) and victim in (content := Path(path).read_bytes()):
            failed.append(content)
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    errors = []

    async def store(number):
        try:
            await spool.store(envelope(number), MESSAGE)
        except OSError as exc:
            errors.append((number, exc.errno))

    async with trio.open_nursery() as nursery:
        for number in range(5, 10):
            nursery.start_soon(store, number)
    [content] = failed
    shared = {number for number in range(5, 10) if envelope(number).id.encode() in content}
    assert len(shared) < 5  # the others went into files of their own
    assert sorted(errors) == [(number, 5) for number in sorted(shared)]
    kept = sorted(envelope(number).id for number in range(5, 10) if number not in shared)
    assert sorted(e.id for e in spool.scan().envelopes) == kept
    assert not any(spool.temp_folder.iterdir())


# --- rescan -------------------------------------------------------------------------------


async def test_a_rescan_quarantines_corrupt_files_and_keeps_the_rest(spool, caplog):
    good = [await spool.store(envelope(n), io.BytesIO(MESSAGE)) for n in range(3)]
    whole = spool.message_path(good[0].id).read_bytes()
    damaged = {
        "0000000000000001": whole[: len(whole) - 5],  # truncated data
        "0000000000000002": whole[:20],  # truncated header
        "0000000000000003": b"garbage" * 10,
        "0000000000000004": whole[:40] + bytes([whole[40] ^ 1]) + whole[41:],  # a flipped envelope bit
        "0000000000000005": whole,  # another message's envelope under this name
    }
    for name, data in damaged.items():
        (spool.folder / f"{name}.msg").write_bytes(data)
    (spool.temp_folder / "half-written.msg.3").write_bytes(whole[:100])
    (spool.folder / "0000000000000009.env").write_bytes(b"orphan")
    with caplog.at_level(logging.ERROR, logger="meshmail.mta"):
        result = spool.scan()
    assert sorted(e.id for e in result.envelopes) == sorted(e.id for e in good)
    assert sorted(queue_id for queue_id, _ in result.corrupt) == sorted(damaged)
    assert (result.temp_files, result.orphans) == (1, 1)
    assert sorted(p.name for p in spool.corrupt_folder.iterdir()) == sorted(f"{n}.msg" for n in damaged)
    assert sum("is corrupt" in record.getMessage() for record in caplog.records) == len(damaged)
    assert spool.scan() == attrs.evolve(result, corrupt=[], temp_files=0, orphans=0)  # nothing left to clean


async def test_a_corrupt_envelope_update_falls_back_to_the_first_envelope(spool):
    stored = await spool.store(envelope(), io.BytesIO(MESSAGE))
    spool.envelope_path(stored.id).write_bytes(b"\x89MMQUE\r\n" + b"\0" * 40)
    result = spool.scan()
    assert result.envelopes == [stored]
    assert result.corrupt_updates == 1
    assert not spool.envelope_path(stored.id).exists()


async def test_damaged_data_is_caught_on_read_and_quarantined(spool):
    stored = await spool.store(envelope(), io.BytesIO(MESSAGE))
    path = spool.message_path(stored.id)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptMessage, match="data checksum"):
        await spool.read_message(stored.id)
    await spool.quarantine(stored.id, "data checksum mismatch")
    assert (spool.corrupt_folder / path.name).exists()
    assert spool.scan().envelopes == []


async def test_damaged_data_in_a_batch_file_quarantines_that_message_and_keeps_the_others(spool, reopened):
    await spool.store_copies(copies(3))  # one batch file
    [path] = spool.folder.glob("*.cps")
    whole = path.read_bytes()
    victim = envelope(1).id
    at = whole.index(MESSAGE + b"1")
    path.write_bytes(whole[:at] + b"X" + whole[at + 1 :])
    with pytest.raises(CorruptMessage, match="data checksum"):
        await spool.read_message(victim)
    await spool.quarantine(victim, "data checksum mismatch")
    assert (spool.corrupt_folder / f"{victim}.cps").read_bytes()[:at] == whole[:at]  # the evidence kept
    spool = reopened(spool)
    assert sorted(e.id for e in spool.scan().envelopes) == sorted(envelope(n).id for n in (0, 2))
    assert (await spool.read_message(envelope(2).id))[1] == MESSAGE + b"2"


async def test_reads_asked_for_at_the_same_time_share_a_thread_and_fail_alone(spool, monkeypatch):
    stored = [await spool.store(envelope(n), MESSAGE + b"%d" % n) for n in range(30)]
    [path] = spool.paths(stored[7].id)
    whole = path.read_bytes()
    at = whole.index(MESSAGE + b"7")
    path.write_bytes(whole[:at] + b"X" + whole[at + 1 :])
    threads = []
    real_run_sync = trio.to_thread.run_sync

    async def run_sync(fn, *args, **kwargs):
        threads.append(fn)
        return await real_run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    read: dict[str, bytes | Exception] = {}

    async def reader(kept: Envelope) -> None:
        try:
            read[kept.id] = (await spool.read_message(kept.id))[1]
        except CorruptMessage as exc:
            read[kept.id] = exc

    async with trio.open_nursery() as nursery:
        for kept in stored:
            nursery.start_soon(reader, kept)
    # The first read runs alone; the 29 that arrive meanwhile share the next thread.
    assert len(threads) == 2, threads
    assert isinstance(read.pop(stored[7].id), CorruptMessage)
    assert read == {kept.id: MESSAGE + b"%d" % n for n, kept in enumerate(stored) if n != 7}


# --- a real process killed while it writes -------------------------------------------------

CHILD = r"""
import random, sys, trio
from meshmail.mta.spool import Envelope, Recipient, RecipientState, Spool, new_queue_id
import attrs

folder, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)

async def writer(spool, worker):
    number = 0
    while True:
        number += 1
        data = (b"Subject: %d/%d\r\n\r\n" % (worker, number)) + rng.randbytes(rng.randrange(50_000))
        env = Envelope(id=new_queue_id(seed * 1000 + worker, number * 64 + worker), sender="a@example.net",
                       recipients=[Recipient("b@example.org", "s1")], received_ms=seed)
        env = await spool.store(env, data)
        print("stored", env.id, env.size, flush=True)
        if number % 3 == 0:
            env = attrs.evolve(env, recipients=[attrs.evolve(env.recipients[0], attempts=number)])
            await spool.update(env)
            print("updated", env.id, number, flush=True)
        if number % 5 == 0:
            print("removing", env.id, flush=True)  # from here on it may be gone
            await spool.remove(env.id)

async def main():
    spool = Spool.open(folder)
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        for worker in range(8):
            nursery.start_soon(writer, spool, worker)

trio.run(main)
"""


def test_a_process_killed_while_it_stores_leaves_whole_messages_or_nothing(tmp_path):
    rng = random.Random(7)
    folder = tmp_path / "queue"
    acknowledged: dict[str, int] = {}  # id -> size, for every store that returned
    attempts: dict[str, int] = {}
    removing: set[str] = set()
    for round_ in range(20):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(folder), str(round_)], stdout=subprocess.PIPE, cwd=REPO
        )
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Only whole lines count: the kill can cut the last one short.
        for line in child.stdout.read().decode().split("\n")[:-1]:
            verb, queue_id, *rest = line.split()
            if verb == "stored":
                acknowledged[queue_id] = int(rest[0])
            elif verb == "updated":
                attempts[queue_id] = int(rest[0])
            else:
                removing.add(queue_id)
        child.stdout.close()

        spool = Spool.open(folder)
        try:
            result = spool.scan()
            assert result.corrupt == [] and result.corrupt_updates == 0, f"round {round_}"
            found = {e.id: e for e in result.envelopes}
            assert set(acknowledged) - removing <= set(found), f"round {round_}: an acknowledged message is missing"
            for queue_id, env in found.items():
                got, data = trio.run(spool.read_message, queue_id)  # data checksum verified
                assert len(data) == env.size == got.size
                if queue_id in acknowledged:
                    assert env.size == acknowledged[queue_id]
                if queue_id in attempts and queue_id not in removing:
                    assert env.recipients[0].attempts == attempts[queue_id], f"round {round_}: update lost"
            assert not any(spool.temp_folder.iterdir())
        finally:
            spool.close()
    assert len(acknowledged) > 100  # the kills landed among many writes


# --- copies files: shadow copies stored together ---


def copies(count: int) -> list[tuple[Envelope, bytes]]:
    return [(envelope(n, shadow=True), MESSAGE + b"%d" % n) for n in range(count)]


@pytest.fixture
def reopened():
    """A function opening the folder of a spool again, as after a restart (the old one closed)."""
    opened: list[Spool] = []

    def reopen(spool: Spool) -> Spool:
        spool.close()
        opened.append(Spool.open(spool.folder))
        opened[-1].scan()
        return opened[-1]

    yield reopen
    for spool in opened:
        spool.close()


async def test_copies_stored_together_go_into_one_file_with_one_fsync(spool, monkeypatch, reopened):
    recorder = Recorder(monkeypatch)
    stored = await spool.store_copies(copies(20))
    recorder.events.append(("returned", ""))
    assert [event for event, _ in recorder.events] == ["fsync-file", "rename", "fsync-folder", "returned"]
    assert sorted(path.suffix for path in spool.folder.iterdir() if path.is_file()) == [".cps", ".lock"]
    for (sent, data), kept in zip(copies(20), stored, strict=True):
        assert kept == attrs.evolve(sent, size=len(data))
        assert await spool.read_message(kept.id) == (kept, data)
    assert sorted(e.id for e in reopened(spool).scan().envelopes) == sorted(e.id for e in stored)


async def test_dropped_copies_stay_dropped_and_the_last_one_takes_the_file_away(spool, reopened):
    first, second, third = await spool.store_copies(copies(3))
    await spool.remove(second.id)
    spool = reopened(spool)
    assert sorted(e.id for e in spool.scan().envelopes) == sorted([first.id, third.id])
    assert (await spool.read_message(third.id))[1] == MESSAGE + b"2"
    await spool.remove(first.id)
    await spool.remove(third.id)
    assert not list(spool.folder.glob("*.cps"))
    assert reopened(spool).scan().envelopes == []


async def test_an_update_moves_a_copy_to_a_message_file_of_its_own(spool, reopened):
    first, second = await spool.store_copies(copies(2))
    taken = attrs.evolve(first, shadow=False)
    await spool.update(taken)
    assert spool.message_path(first.id).exists()
    assert await spool.read_message(first.id) == (taken, MESSAGE + b"0")
    found = {e.id: e for e in reopened(spool).scan().envelopes}
    assert found == {first.id: taken, second.id: second}


async def test_a_message_file_wins_over_its_copy_after_a_crash_between_them(spool, reopened):
    first, second = await spool.store_copies(copies(2))
    taken = await spool.store(attrs.evolve(first, shadow=False), io.BytesIO(MESSAGE + b"0"))  # copy not dropped yet
    spool = reopened(spool)
    found = {e.id: e for e in spool.scan().envelopes}
    assert found == {first.id: taken, second.id: second}
    await spool.remove(second.id)  # the file's last live copy: the file goes
    assert not list(spool.folder.glob("*.cps"))
    assert spool.message_path(first.id).exists()


async def test_a_drop_record_cut_short_by_a_crash_is_cut_off_and_later_drops_count(spool, caplog, reopened):
    first, second, third = await spool.store_copies(copies(3))
    await spool.remove(first.id)
    [path] = spool.folder.glob("*.cps")
    whole = path.stat().st_size
    with open(path, "ab") as file:
        file.write(b"\x89MMQUE\r\n\x01\x00\x03")  # a crash in the middle of the next record
    with caplog.at_level(logging.WARNING, logger="meshmail.mta"):
        spool = reopened(spool)
    assert "is cut at byte" in caplog.text
    assert path.stat().st_size == whole
    assert (spool.corrupt_folder / path.name).read_bytes() == b"\x89MMQUE\r\n\x01\x00\x03"  # the cut tail, kept
    assert sorted(e.id for e in spool.scan().envelopes) == sorted([second.id, third.id])
    await spool.remove(second.id)
    assert [e.id for e in reopened(spool).scan().envelopes] == [third.id]


async def test_copies_dropped_at_the_same_time_share_a_drop_record(spool, monkeypatch, reopened):
    stored = await spool.store_copies(copies(20))
    syncs: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        syncs.append(fd)
        time.sleep(0.02)  # a slow disk: drops arriving meanwhile wait for the next round
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    async with trio.open_nursery() as nursery:
        for kept in stored[1:]:
            nursery.start_soon(spool.remove, kept.id)
    assert 1 <= len(syncs) <= 3, len(syncs)
    assert [e.id for e in reopened(spool).scan().envelopes] == [stored[0].id]


async def test_a_batch_file_whose_messages_go_together_is_removed_with_one_folder_fsync(spool, monkeypatch, reopened):
    stored = await spool.store_copies(copies(20))
    records: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (records.append(fd), real(fd))[1])
    recorder = Recorder(monkeypatch, delay_folder_sync=0.02)
    async with trio.open_nursery() as nursery:
        for kept in stored:
            nursery.start_soon(spool.remove, kept.id)
    # The first drop's round runs alone and writes a record; the file's last drop takes the
    # file and every drop that came with it.
    assert len(records) <= 1
    assert recorder.count("fsync-folder") == 1
    assert not list(spool.folder.glob("*.cps"))
    assert reopened(spool).scan().envelopes == []


async def test_a_drop_that_fails_leaves_the_message_in_its_batch_file(spool, monkeypatch, reopened):
    first, second = await spool.store_copies(copies(2))

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError, match="Input/output"):
        await spool.remove(first.id)
    monkeypatch.undo()
    assert (await spool.read_message(first.id))[1] == MESSAGE + b"0"  # still indexed, still readable
    await spool.remove(second.id)  # not the last one: first is still there
    assert sorted(e.id for e in reopened(spool).scan().envelopes) == [first.id]
