"""Durable storage of opaque byte records in a data directory: a snapshot plus an append-only log.

What the records mean is the caller's business; this module only keeps them safe across crashes.
It is synchronous, single-writer and free of trio (run it in a thread with trio.to_thread).
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..core.errors import MeshmailError
from ..core.files import atomic_write, sync_directory, write_all

#: First bytes of every journal file. The high-bit byte and the newline catch 7-bit and
#: newline-translating copies, as in PNG.
MAGIC = b"\x89MMJRNL\n"
#: Bumped on any incompatible change; a file with another version is refused, never rewritten.
FORMAT_VERSION = 1
#: Largest payload of one record. A length prefix above this is corruption, never an allocation.
MAX_RECORD_SIZE = 16 * 1024 * 1024

SNAPSHOT_NAME = "journal.snapshot"
LOG_NAME = "journal.log"
LOCK_NAME = "journal.lock"
#: Suffix of files being written before their atomic rename; leftovers are removed on open.
TEMP_SUFFIX = ".tmp"
#: Suffix of log bytes set aside after a bad record in the middle of the log.
CORRUPT_SUFFIX = ".corrupt"

_KIND_SNAPSHOT = 1
_KIND_LOG = 2
# magic, format version, kind, padding, generation; then crc32 of those 20 bytes.
_HEADER = struct.Struct("<8sHBxQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size
# payload length, crc32 of (length bytes + payload).
_LENGTH = struct.Struct("<I")
_FRAME = struct.Struct("<II")
FRAME_OVERHEAD = _FRAME.size


class JournalError(MeshmailError):
    """The journal cannot be used as it is; the message says why and what a person can do."""


@dataclass(frozen=True)
class LoadReport:
    """What the last scan found (`Journal.report`); repairs count from `Journal.open` on."""

    #: Generation of the snapshot (0: never compacted).
    generation: int
    snapshot_records: int
    log_records: int
    #: Bytes of an unfinished last record cut off the log (a crash during an append).
    torn_bytes: int = 0
    #: Bytes from a bad record that was not the last one to the end of the log, moved to `set_aside`.
    corrupt_bytes: int = 0
    #: Files holding the corrupt bytes, for the operator.
    set_aside: tuple[str, ...] = ()
    #: A log older than the snapshot was found and replaced (a crash in compaction).
    stale_log: bool = False
    #: Temporary files of an interrupted compaction or repair, removed.
    temp_files: int = 0

    @property
    def clean(self) -> bool:
        """Nothing was dropped, set aside or cleaned up."""
        return not (self.torn_bytes or self.corrupt_bytes or self.stale_log or self.temp_files)


class Journal:
    """A snapshot file plus an append-only log of records in one directory.

    Files (all 0600, the directory 0700 when created here): `journal.snapshot`, `journal.log`,
    `journal.lock` (an flock held while open: one process at a time).

    Format. Both data files start with a 24-byte header: MAGIC, format version (u16), kind
    (1 snapshot, 2 log), a padding byte, generation (u64), crc32 of the preceding 20 bytes;
    little-endian. Then records, each: payload length (u32), crc32 of the four length bytes
    followed by the payload (u32), payload. crc32 (zlib) because the threat is torn writes and
    bit rot in a directory only we can write, not an adversary: it catches every burst error of
    up to 32 bits and all but 1 in 2**32 of the rest, at memory speed in C; a cryptographic hash
    would cost throughput and buy nothing here. The length is inside the checksum so a flipped
    length is caught too.

    Generations. The snapshot carries a generation (a missing snapshot is generation 0 with no
    records), the log names the generation it follows. `compact` proceeds:

    1. write the records to `journal.snapshot.tmp` with generation G+1, fsync;
    2. rename it over `journal.snapshot`, fsync the directory (the commit point);
    3. write an empty log for G+1 to `journal.log.tmp`, fsync, rename it over `journal.log`,
       fsync the directory.

    A crash before step 2 leaves the old snapshot and the old log (generation G): the old
    state; the temporary file is removed on open. A crash after step 2 leaves the new snapshot
    and either the old log, whose generation G no longer matches and which is ignored and
    replaced on open (its records are in the new snapshot: `compact` is given the whole state),
    or the new empty log: the new state. A log for a generation newer than the snapshot cannot
    come from a crash (step 3 follows the fsync of step 2) and raises JournalError.

    Damage. Appends go to the end of the log and are fsynced before returning, so a crash can
    only leave an unfinished record after the last durable one (or, when the kernel wrote pages
    out of order, garbage followed by bytes of the same unfinished append). A scan keeps the
    records before the first bad one (short, oversize length, or checksum mismatch) and cuts
    the log back to there, so later appends are not hidden behind garbage:
    - a bad record reaching the end of the file is a torn write: cut, counted in `torn_bytes`;
    - a bad record with bytes after it (a torn batch, or bit rot in the middle of the log) is
      not skipped over, since the records after it may depend on it: everything from it to
      the end is first copied to `journal.log.<generation>.<offset>.corrupt`, then cut, and
      reported in `corrupt_bytes` and `set_aside`.
    A flipped length that points past the end of the file looks like a torn write and is
    treated as one. Headers and snapshots are only ever written whole and renamed into place,
    so damage there is not a crash: it raises JournalError naming the file rather than guess.

    After a failed write or fsync the log is cut back to its last good record and the journal
    refuses further writes until opened again. Not thread-safe: one caller at a time.
    """

    def __init__(self, directory: str, lock_fd: int, *, fsync: bool) -> None:
        """Use `Journal.open`."""
        self._dir = directory
        self._lock_fd: int | None = lock_fd
        self._fsync = fsync
        self._log_fd: int | None = None
        self._generation = 0
        self._snapshot_size = 0
        self._log_end = HEADER_SIZE
        self._torn_bytes = 0
        self._corrupt_bytes = 0
        self._set_aside: list[str] = []
        self._stale_log = False
        self._temp_files = 0
        self._report = LoadReport(0, 0, 0)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, fsync: bool = True) -> Journal:
        """Open the journal in `directory`, creating the directory (0700) and an empty log if missing.

        Removes temporary files, replaces a stale log and repairs a damaged log tail (see the
        class docstring); `report` says what was done. `fsync=False` skips every fsync: for
        tests and benchmarks only, a crash may then lose anything.

        Raises JournalError if another process has the journal open, or if a file is not a
        journal of this format or is damaged in a way a crash cannot explain.
        """
        path = os.fspath(directory)
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
            if fsync:
                sync_directory(os.path.dirname(os.path.abspath(path)))
        lock_fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalError(f"journal in {path} is in use by another process") from None
        journal = cls(path, lock_fd, fsync=fsync)
        try:
            journal._remove_temp_files()
            journal._scan()
        except BaseException:
            journal.close()
            raise
        return journal

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the files and release the lock. Idempotent."""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def directory(self) -> str:
        return self._dir

    @property
    def fsyncs(self) -> bool:
        """Whether writes are fsynced (False only when opened with fsync=False)."""
        return self._fsync

    @property
    def generation(self) -> int:
        """Generation of the current snapshot: the number of compactions so far."""
        return self._generation

    @property
    def report(self) -> LoadReport:
        """What the last `load` (or `open`) found, with every repair made since `open`."""
        return self._report

    def size(self) -> int:
        """Bytes on disk of the snapshot and the log together, headers included."""
        return self._snapshot_size + self._log_end

    def log_size(self) -> int:
        """Bytes of records in the log (0 right after `compact`): what compaction would fold in."""
        return self._log_end - HEADER_SIZE

    def load(self) -> list[bytes]:
        """The snapshot's records followed by the log's, in the order they were written.

        Repairs the log as `open` does if it finds damage; see `report`.
        """
        self._check_open()
        snapshot, log = self._scan()
        return snapshot + log

    def append(self, record: bytes) -> None:
        """Add one record to the log; it is durable when this returns.

        Raises ValueError if it is longer than MAX_RECORD_SIZE (nothing is written), JournalError
        after an earlier failed write, OSError if the write or fsync fails (the log is then
        cut back to its last good record).
        """
        self.append_many((record,))

    def append_many(self, records: Iterable[bytes]) -> None:
        """Add records to the log with one write and one fsync; all are durable when this returns.

        A crash during the call keeps a prefix of `records` (possibly empty). Raises as `append`.
        """
        data = b"".join(_frame(record) for record in records)
        fd = self._writable_log()
        if not data:
            return
        try:
            write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            self._abandon_log(fd)
            raise
        self._log_end += len(data)

    def compact(self, records: Iterable[bytes]) -> None:
        """Replace the whole journal by a snapshot of `records` and an empty log, atomically.

        `records` must be the complete state (everything `load` would return that is still
        wanted): after this, the old snapshot and log are gone. A crash at any point leaves
        either the old or the new state loadable (see the class docstring). Raises ValueError
        if a record is longer than MAX_RECORD_SIZE (the old state is kept), OSError on I/O
        errors, JournalError after an earlier failed write.
        """
        self._writable_log()
        generation = self._generation + 1
        written = self._write_atomic(SNAPSHOT_NAME, _snapshot_chunks(generation, records))
        # Committed: from here on the old log is stale, so it must not take another append.
        self._generation = generation
        self._snapshot_size = written
        old_fd, self._log_fd = self._log_fd, None
        if old_fd is not None:
            os.close(old_fd)
        self._start_log()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise JournalError(f"journal in {self._dir} is closed")

    def _writable_log(self) -> int:
        self._check_open()
        if self._log_fd is None:
            raise JournalError(f"journal in {self._dir} refuses writes after a failed one (open it again to recover)")
        return self._log_fd

    def _abandon_log(self, fd: int) -> None:
        """After a failed append: cut the log back to its last good record and stop writing."""
        self._log_fd = None
        try:
            os.ftruncate(fd, self._log_end)
            if self._fsync:
                os.fsync(fd)
        except OSError:
            pass  # the next open cuts the tail off anyway
        finally:
            os.close(fd)

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _remove_temp_files(self) -> None:
        for name in os.listdir(self._dir):
            if name.startswith("journal.") and name.endswith(TEMP_SUFFIX):
                os.unlink(self._path(name))
                self._temp_files += 1

    def _scan(self) -> tuple[list[bytes], list[bytes]]:
        """Read both files, repair the log if needed, make sure a log for this generation is open."""
        snapshot_path = self._path(SNAPSHOT_NAME)
        snapshot_data = _read_if_exists(snapshot_path)
        snapshot: list[bytes] = []
        generation = 0
        if snapshot_data is not None:
            generation = _parse_header(snapshot_data, snapshot_path, _KIND_SNAPSHOT)
            snapshot, end, damage = _parse_records(snapshot_data)
            if damage is not None:
                raise JournalError(
                    f"journal snapshot {snapshot_path} is damaged at byte {end}; snapshots are "
                    "written whole, so this is disk corruption, not a crash (restore it from a backup, "
                    "or move the directory aside and let the node resync)"
                )
        self._generation = generation
        self._snapshot_size = len(snapshot_data) if snapshot_data is not None else 0

        log_path = self._path(LOG_NAME)
        log_data = _read_if_exists(log_path)
        log: list[bytes] = []
        if log_data is not None:
            log_generation = _parse_header(log_data, log_path, _KIND_LOG)
            if log_generation > generation:
                raise JournalError(
                    f"journal log {log_path} follows snapshot generation {log_generation} but "
                    f"the snapshot is generation {generation}; a crash cannot do this (files from "
                    "different copies?): move the directory aside and let the node resync"
                )
            if log_generation < generation:
                self._stale_log = True
                log_data = None
            else:
                log, end, damage = _parse_records(log_data)
                if damage is not None:
                    self._cut_log(log_data, end, damage)
                self._log_end = end
        if log_data is None:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            self._start_log()
        elif self._log_fd is None:
            self._log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._report = LoadReport(
            generation=generation,
            snapshot_records=len(snapshot),
            log_records=len(log),
            torn_bytes=self._torn_bytes,
            corrupt_bytes=self._corrupt_bytes,
            set_aside=tuple(self._set_aside),
            stale_log=self._stale_log,
            temp_files=self._temp_files,
        )
        return snapshot, log

    def _cut_log(self, data: bytes, end: int, damage: str) -> None:
        """Drop the log from byte `end` on, first copying it aside if it is more than a torn tail."""
        dropped = len(data) - end
        if damage == "corrupt":
            name = f"{LOG_NAME}.{self._generation}.{end}{CORRUPT_SUFFIX}"
            serial = 1
            while os.path.exists(self._path(name)):
                serial += 1
                name = f"{LOG_NAME}.{self._generation}.{end}.{serial}{CORRUPT_SUFFIX}"
            self._write_atomic(name, [data[end:]])
            self._set_aside.append(self._path(name))
            self._corrupt_bytes += dropped
        else:
            self._torn_bytes += dropped
        fd = os.open(self._path(LOG_NAME), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, end)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _start_log(self) -> None:
        """Atomically replace the log by an empty one for the current generation and open it."""
        self._write_atomic(LOG_NAME, [_header(_KIND_LOG, self._generation)])
        self._log_fd = os.open(self._path(LOG_NAME), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._log_end = HEADER_SIZE

    def _write_atomic(self, name: str, chunks: Iterable[bytes]) -> int:
        """Write `chunks` to `name` by way of a temporary file (NAME.tmp): fsync, rename, fsync
        the directory. Returns the size written. On any error `name` is untouched."""
        final = self._path(name)
        return atomic_write(final, chunks, temporary=final + TEMP_SUFFIX, fsync=self._fsync)


def _frame(record: bytes) -> bytes:
    if len(record) > MAX_RECORD_SIZE:
        raise ValueError(f"journal record of {len(record)} bytes is over the limit of {MAX_RECORD_SIZE}")
    length = _LENGTH.pack(len(record))
    return length + _CRC.pack(zlib.crc32(record, zlib.crc32(length))) + record


def _header(kind: int, generation: int) -> bytes:
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, kind, generation)
    return fields + _CRC.pack(zlib.crc32(fields))


def _snapshot_chunks(generation: int, records: Iterable[bytes]) -> Iterator[bytes]:
    yield _header(_KIND_SNAPSHOT, generation)
    for record in records:
        yield _frame(record)


def _parse_header(data: bytes, path: str, kind: int) -> int:
    """The generation in the header of `data` read from `path`; JournalError if it is not one of ours."""
    if len(data) < HEADER_SIZE or data[: len(MAGIC)] != MAGIC:
        raise JournalError(f"{path} is not a meshmail journal file (move it aside)")
    magic, version, found_kind, generation = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise JournalError(
            f"{path} is journal format {version}, this meshmail reads format {FORMAT_VERSION} "
            "(run the meshmail version that wrote it)"
        )
    (crc,) = _CRC.unpack_from(data, _HEADER.size)
    if crc != zlib.crc32(data[: _HEADER.size]) or found_kind != kind:
        raise JournalError(
            f"{path} has a damaged header; headers are written whole, so this is disk "
            "corruption, not a crash (restore it from a backup, or move the directory aside and let the node resync)"
        )
    return generation


def _parse_records(data: bytes) -> tuple[list[bytes], int, str | None]:
    """Records after the header, the offset after the last good one, and None, "torn" or "corrupt".

    "torn": the first bad record reaches the end of `data`; "corrupt": bytes follow it, or its
    length is over MAX_RECORD_SIZE.
    """
    records: list[bytes] = []
    position = HEADER_SIZE
    end = len(data)
    view = memoryview(data)
    while position < end:
        if end - position < FRAME_OVERHEAD:
            return records, position, "torn"
        length, crc = _FRAME.unpack_from(data, position)
        if length > MAX_RECORD_SIZE:
            return records, position, "corrupt"
        start = position + FRAME_OVERHEAD
        stop = start + length
        if stop > end:
            return records, position, "torn"
        if zlib.crc32(view[start:stop], zlib.crc32(view[position : position + _LENGTH.size])) != crc:
            return records, position, "torn" if stop == end else "corrupt"
        records.append(data[start:stop])
        position = stop
    return records, position, None


def _read_if_exists(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return None
