"""The durable spool of queued messages in DATA_DIR/queue/, written and fsync'd before the 250
is sent: messages stored at the same time share one batch file and its fsync, a message that
has been retried gets a file of its own, and concurrent writers share the folder's fsyncs.

It keeps bytes safe and hands envelopes back; it does not schedule (queue.py) or deliver.
All disk work runs in worker threads (trio.to_thread), never on the event loop.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import itertools
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import attrs
import msgpack
import trio

from ..core.errors import MeshmailError
from ..core.files import sync_directory, write_all
from ..protocols.smtp import Reply

log = logging.getLogger("meshmail.mta")

#: First bytes of every spool file. The high-bit byte and the newline catch 7-bit and
#: newline-translating copies, as in PNG.
MAGIC = b"\x89MMQUE\r\n"
#: Bumped on an incompatible change of the layout below; another version is corrupt to us.
FORMAT_VERSION = 1
#: Version of the envelope map; fields unknown to this version are ignored.
ENVELOPE_VERSION = 1
#: An envelope larger than this is corruption, never an allocation.
MAX_ENVELOPE_SIZE = 4 * 1024 * 1024
#: Bytes read at once when a rescan reads a header: most envelopes fit in the first read.
HEAD_READ = 4096
#: Batch rounds of new messages that may run at once: the next batch is written while one waits
#: for its fsyncs. More rounds make smaller batches, each a thread, a file and two fsyncs. Two
#: masters on one 2-core machine, taking 500 messages of 10 KB over 20 sessions in alternating
#: turns: 2 rounds accepted 18% more messages a second than 4 (22% with a shadow copy) for 20%
#: less CPU each; 1 did as well as 2, 8 worse than 4.
STORE_ROUNDS = 2
#: Chunks of a message copied from a file into the spool.
COPY_SIZE = 1 << 20

MESSAGE_SUFFIX = ".msg"
ENVELOPE_SUFFIX = ".env"
BATCH_SUFFIX = ".cps"
TEMP_FOLDER = "tmp"
CORRUPT_FOLDER = "corrupt"
FAILED_FOLDER = "failed"
LOCK_NAME = "queue.lock"

_KIND_MESSAGE = 1
_KIND_ENVELOPE = 2
#: A record of a batch file naming messages in it that are dropped (envelope: msgpack list of ids).
_KIND_DROPPED = 3
# magic, format version, kind, envelope length, data length, crc32 of the data; then crc32 of
# those 28 bytes followed by the envelope.
_HEAD = struct.Struct("<8sHHIQI")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size

#: Queue ids: what a file name, a log line and an SMTP reply can carry unquoted.
QUEUE_ID = re.compile(r"[A-Za-z0-9]{1,64}", re.ASCII)
_BASE32 = "0123456789abcdefghijklmnopqrstuv"


class SpoolError(MeshmailError):
    """The spool folder cannot be used; the message says why."""


class CorruptMessage(MeshmailError):
    """A spool file that is not a whole message of our format; str() says what is wrong."""


class RecipientState(enum.IntEnum):
    """Where a recipient stands; the numbers are stored on disk."""

    QUEUED = 0
    DELIVERED = 1
    FAILED = 2


def new_queue_id(now_ms: int, random_bits: int) -> str:
    """A queue id of 16 characters: 48 bits of Unix milliseconds, then 32 random bits, in
    lower-case base32 (so ids sort by arrival). `random_bits` comes from the caller's
    random.Random (getrandbits(32))."""
    value = ((now_ms & (1 << 48) - 1) << 32) | (random_bits & 0xFFFFFFFF)
    return "".join(_BASE32[(value >> shift) & 31] for shift in range(75, -1, -5))


def _check_id(_instance: object, _attribute: attrs.Attribute, value: str) -> None:
    if not isinstance(value, str) or not QUEUE_ID.fullmatch(value):
        raise ValueError(f"bad queue id {value!r}")


_str = attrs.validators.instance_of(str)
_int = attrs.validators.and_(attrs.validators.instance_of(int), attrs.validators.ge(0))


@attrs.frozen
class Recipient:
    """One recipient of a queued message: the slave that hosts it, where its delivery stands,
    the attempts made, when the next is due (Unix ms) and the slave's last reply."""

    address: str = attrs.field(validator=_str)
    slave: str = attrs.field(validator=_str)
    state: RecipientState = attrs.field(default=RecipientState.QUEUED, converter=RecipientState)
    attempts: int = attrs.field(default=0, validator=_int)
    next_attempt_ms: int = attrs.field(default=0, validator=_int)
    reply: Reply | None = None

    @property
    def queued(self) -> bool:
        return self.state is RecipientState.QUEUED


@attrs.frozen
class Envelope:
    """What the spool keeps about a message besides its bytes. `sender` is "" for the null
    sender. `origin` is the master that accepted it; `shadow` says this master holds a copy
    for that owner. `warned` says a delay warning went out. `size` is the data's length.
    `copy_at` names the master that holds a shadow copy for us (told when it can drop it)."""

    id: str = attrs.field(validator=_check_id)
    sender: str = attrs.field(validator=_str)
    recipients: tuple[Recipient, ...] = attrs.field(converter=tuple)
    received_ms: int = attrs.field(validator=_int)
    client_address: str = attrs.field(default="", validator=_str)
    helo: str = attrs.field(default="", validator=_str)
    size: int = attrs.field(default=0, validator=_int)
    origin: str = attrs.field(default="", validator=_str)
    shadow: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    warned: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    #: The master holding a shadow copy of this message for us ("" when none does).
    copy_at: str = attrs.field(default="", validator=_str)

    def slaves(self) -> tuple[str, ...]:
        """The slaves with recipients still queued, in recipient order."""
        return tuple(dict.fromkeys(r.slave for r in self.recipients if r.queued))

    def queued(self, slave: str | None = None) -> tuple[Recipient, ...]:
        """The recipients still queued (at `slave`, when given)."""
        return tuple(r for r in self.recipients if r.queued and (slave is None or r.slave == slave))


# --- the envelope codec (lenient: unknown fields are ignored, so a newer node's files load) ---


def _reply_wire(reply: Reply | None) -> list | None:
    return None if reply is None else [reply.code, reply.enhanced, list(reply.lines)]


def encode_envelope(envelope: Envelope) -> bytes:
    """The msgpack form of an envelope, with its version."""
    return msgpack.packb(
        {
            "v": ENVELOPE_VERSION,
            "id": envelope.id,
            "sender": envelope.sender,
            "recipients": [
                {
                    "address": r.address,
                    "slave": r.slave,
                    "state": int(r.state),
                    "attempts": r.attempts,
                    "next_attempt_ms": r.next_attempt_ms,
                    "reply": _reply_wire(r.reply),
                }
                for r in envelope.recipients
            ],
            "received_ms": envelope.received_ms,
            "client_address": envelope.client_address,
            "helo": envelope.helo,
            "size": envelope.size,
            "origin": envelope.origin,
            "shadow": envelope.shadow,
            "warned": envelope.warned,
            "copy_at": envelope.copy_at,
        },
        use_bin_type=True,
    )


_ENVELOPE_FIELDS = tuple(f.name for f in attrs.fields(Envelope) if f.name != "recipients")
_RECIPIENT_FIELDS = tuple(f.name for f in attrs.fields(Recipient) if f.name != "reply")


def _recipient(obj: object) -> Recipient:
    if not isinstance(obj, dict):
        raise TypeError("recipient is not a map")
    reply = obj.get("reply")
    if reply is not None:
        code, enhanced, lines = reply
        reply = Reply(code, enhanced, tuple(lines))
    return Recipient(**{name: obj[name] for name in _RECIPIENT_FIELDS if name in obj}, reply=reply)


def decode_envelope(data: bytes) -> Envelope:
    """The envelope in `data`; raises CorruptMessage for bad msgpack, types or values."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=64)
    except Exception as exc:  # msgpack raises a handful of unrelated types
        raise CorruptMessage(f"bad envelope: {type(exc).__name__}") from None
    try:
        if not isinstance(obj, dict) or not isinstance(obj.get("v"), int) or obj["v"] < 1:
            raise TypeError("not a versioned map")
        recipients = tuple(_recipient(item) for item in obj["recipients"])
        return Envelope(
            **{name: obj[name] for name in _ENVELOPE_FIELDS if name in obj},
            recipients=recipients,
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptMessage(f"bad envelope: {exc}") from None


# --- the file layout ------------------------------------------------------------------------


def _header(kind: int, envelope: bytes, data_length: int, data_crc: int) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, kind, len(envelope), data_length, data_crc)
    return head + _CRC.pack(zlib.crc32(envelope, zlib.crc32(head)))


@attrs.frozen
class _Head:
    envelope: Envelope
    data_length: int
    data_crc: int
    #: Where the message's bytes start in the file.
    data_offset: int


@attrs.frozen
class _BatchedAt:
    """Where a message in a batch file is: the file's name and its record's offset."""

    file: str
    offset: int


@attrs.frozen
class _Record:
    """One record read at `offset`: its kind, its envelope's bytes (not decoded), the length
    and crc32 of its data, and where its data starts and the record ends."""

    kind: int
    envelope: bytes
    data_length: int
    data_crc: int
    data_offset: int

    @property
    def end(self) -> int:
        return self.data_offset + self.data_length


def _read_record(fd: int, offset: int, size: int) -> _Record:
    """Reads and checks the header and envelope of the record at `offset` of an open spool
    file of `size` bytes (a whole message or envelope file is one record)."""
    first = os.pread(fd, HEAD_READ, offset)
    if len(first) < HEADER_SIZE:
        raise CorruptMessage(f"short header ({len(first)} bytes)")
    magic, version, kind, envelope_length, data_length, data_crc = _HEAD.unpack_from(first)
    (crc,) = _CRC.unpack_from(first, _HEAD.size)
    if magic != MAGIC:
        raise CorruptMessage("not a spool file (bad magic)")
    if version != FORMAT_VERSION:
        raise CorruptMessage(f"format {version}, expected {FORMAT_VERSION}")
    if envelope_length > MAX_ENVELOPE_SIZE:
        raise CorruptMessage(f"envelope length {envelope_length} is too large")
    end = offset + HEADER_SIZE + envelope_length
    if size < end + data_length:
        raise CorruptMessage(f"{size - offset} bytes, the header says {end + data_length - offset}")
    envelope = first[HEADER_SIZE : HEADER_SIZE + envelope_length]
    if len(envelope) < envelope_length:
        envelope += os.pread(fd, envelope_length - len(envelope), offset + len(first))
    if zlib.crc32(envelope, zlib.crc32(first[: _HEAD.size])) != crc:
        raise CorruptMessage("header checksum mismatch")
    return _Record(kind, envelope, data_length, data_crc, end)


def _read_head(fd: int, kind: int) -> _Head:
    """Reads and checks the header and envelope of an open spool file; its size must be exact."""
    size = os.fstat(fd).st_size
    record = _read_record(fd, 0, size)
    if record.kind != kind:
        raise CorruptMessage(f"kind {record.kind}, expected kind {kind}")
    if size != record.end:
        raise CorruptMessage(f"{size} bytes, the header says {record.end}")
    return _Head(decode_envelope(record.envelope), record.data_length, record.data_crc, record.data_offset)


def _read_file_head(path: str | Path, kind: int) -> _Head:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_head(fd, kind)
    finally:
        os.close(fd)


Data = bytes | bytearray | memoryview | BinaryIO


def _data_length(data: Data) -> int:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).nbytes
    start = data.tell()
    end = data.seek(0, os.SEEK_END)
    data.seek(start)
    return end - start


def _chunks(data: Data) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
        return
    while chunk := data.read(COPY_SIZE):
        yield chunk


# --- group commit ---------------------------------------------------------------------------


@attrs.define(eq=False)
class _Pending:
    """One change waiting for a commit round: a temporary file, written and synced, to rename
    into the queue folder, or files to remove from it."""

    fd: int = -1
    temp: Path | None = None
    final: Path | None = None
    remove: tuple[Path, ...] = ()
    error: OSError | None = None
    done: bool = False

    def apply(self) -> None:
        """Makes the change (rename, or unlink); the folder's fsync follows once per round."""
        if self.temp is not None:
            os.rename(self.temp, self.final)
        for path in self.remove:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def discard(self) -> None:
        """Drops a change that was never applied: closes and removes its temporary file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass


@attrs.define(eq=False)
class _GroupCommit:
    """Shares the folder's fsync among concurrent writers. A writer adds its change (a synced
    temporary file, or removals) to the pending list; the first one to find no round running
    takes everything pending and runs a round in a worker thread (each rename or unlink, then
    one fsync of the folder), and every writer whose change was in it wakes. Writers arriving
    meanwhile form the next round."""

    folder: Path
    #: Rounds that may run at once (the folder's group commit: one, so each round's single
    #: fsync covers all that waited meanwhile).
    depth: int = 1
    _pending: list[_Pending] = attrs.field(factory=list)
    _running: int = 0
    _round_done: trio.Event = attrs.field(factory=trio.Event)
    #: Rounds run and changes committed, for the counters.
    rounds: int = 0
    changes: int = 0

    async def commit(self, change: _Pending) -> None:
        """Returns once `change` is durable; raises the OSError of its rename or unlink, or of
        the folder's fsync. Cancelled before its round starts, the change is dropped."""
        self._pending.append(change)
        try:
            while not change.done:
                if self._running < self.depth and change in self._pending:
                    await self._run_round()
                else:
                    await self._round_done.wait()
        except trio.Cancelled:
            if change in self._pending:
                self._pending.remove(change)
                change.discard()
            raise
        if change.error is not None:
            raise change.error

    async def _run_round(self) -> None:
        batch, self._pending = self._pending, []
        self._running += 1
        try:
            await self._run(batch)
        finally:
            self._running -= 1
            self._round_done.set()
            self._round_done = trio.Event()

    async def _run(self, batch: list) -> None:
        await trio.to_thread.run_sync(self._round, batch)

    def _round(self, batch: list) -> None:
        self._apply(batch)
        self.rounds += 1
        self.changes += len(batch)
        for change in batch:
            change.done = True

    def _apply(self, batch: list[_Pending]) -> None:
        """Each rename or unlink, then one fsync of the folder; errors go to the changes."""
        applied = []
        for change in batch:
            try:
                change.apply()
                applied.append(change)
            except OSError as exc:
                change.error = exc
                change.discard()
        # An error of the folder's fsync fails them all, though the renames may still reach
        # the disk: a duplicate delivery beats a lost message.
        self._sync_folder(applied)

    def _sync_folder(self, changes: list) -> None:
        """One fsync of the folder for `changes` made in it; its error goes to each of them."""
        if not changes:
            return
        try:
            sync_directory(self.folder)
        except OSError as exc:
            for change in changes:
                change.error = exc


@attrs.define(eq=False)
class _Drop:
    """A message to drop from its batch file: `last`, the file's last live message (the file
    goes), else named in a drop record. `undo` puts it back in the spool's index when the drop
    is not made."""

    path: Path
    queue_id: str
    last: bool
    undo: Callable[[], None]
    error: OSError | None = None
    done: bool = False

    def discard(self) -> None:
        self.undo()


@attrs.define(eq=False)
class _DropCommit(_GroupCommit):
    """Shares the syncs of drops the same way. A round removes each batch file whose last
    message is dropped (the messages dropped with it need no record: a delivery round often
    takes a whole file), then fsyncs the folder once; to each other file it appends one record
    naming every message dropped there meanwhile, and fdatasyncs that file."""

    def _apply(self, batch: list) -> None:
        by_path: dict[Path, list[_Drop]] = {}
        for drop in batch:
            by_path.setdefault(drop.path, []).append(drop)
        removed: list[_Drop] = []
        for path, drops in by_path.items():
            try:
                if any(drop.last for drop in drops):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    removed += drops
                else:
                    _append_dropped(path, [drop.queue_id for drop in drops])
            except OSError as exc:
                for drop in drops:
                    drop.error = exc
        self._sync_folder(removed)


@attrs.define(eq=False)
class _NewMessage:
    """A message waiting for a batch round: its envelope, its bytes, and once stored its
    envelope with `size` set."""

    envelope: Envelope
    data: bytes
    stored: Envelope | None = None
    at: _BatchedAt | None = None
    error: OSError | None = None
    done: bool = False

    def discard(self) -> None:
        pass


@attrs.define(eq=False)
class _StoreBatch(_GroupCommit):
    """Shares one batch file among new messages stored at the same time: a round writes every
    message pending into one file (Spool._write_batch: its fsync, rename and the folder's
    fsync, in one worker thread), and every writer whose message was in it wakes. Up to
    `depth` rounds run at once; writers arriving while all run form the next. Fewer files
    created and synced per message is what lets a spool on one disk keep up with many
    sessions at once."""

    spool: Spool | None = None

    def _apply(self, batch: list[_NewMessage]) -> None:
        assert self.spool is not None
        try:
            self.spool._write_new(batch)
        except OSError as exc:
            for new in batch:
                new.error = new.error or exc

    async def _run(self, batch: list) -> None:
        await super()._run(batch)  # in a worker thread, not cancellable: the round's writers wait
        if kept := [(new.stored, new.at) for new in batch if new.at is not None]:
            assert self.spool is not None
            self.spool._register(kept)


@attrs.define(eq=False)
class _Read:
    """A message to read in a read round: its id, then its envelope and bytes, or the error."""

    queue_id: str
    result: tuple[Envelope, bytes] | None = None
    error: Exception | None = None
    done: bool = False

    def discard(self) -> None:
        pass


@attrs.define(eq=False)
class _ReadBatch(_GroupCommit):
    """Shares a worker thread among the reads of queued messages asked for at the same time (a
    delivery round's lanes each read their next message): a round reads every message pending,
    in one worker thread. A thread for each read cost the event loop more than the read itself
    on a busy machine: the woken thread takes the CPU from the loop, then waits for the
    interpreter lock the loop holds."""

    spool: Spool | None = None

    def _apply(self, batch: list[_Read]) -> None:
        assert self.spool is not None
        for read in batch:
            try:
                read.result = self.spool._read_message(read.queue_id)
            except (OSError, CorruptMessage) as exc:
                read.error = exc


def _append_dropped(path: Path, ids: list[str]) -> None:
    packed = msgpack.packb(ids, use_bin_type=True)
    record = _header(_KIND_DROPPED, packed, 0, 0) + packed
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        try:
            write_all(fd, record)
            os.fdatasync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # a part written would hide the records after it
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


# --- the spool ------------------------------------------------------------------------------


@attrs.frozen
class ScanResult:
    """What a rescan found: the envelopes of the whole messages, and what it cleaned up."""

    envelopes: list[Envelope]
    #: (queue id, reason) of each message moved to corrupt/.
    corrupt: list[tuple[str, str]]
    #: Unreadable envelope updates moved to corrupt/ (the message kept its first envelope).
    corrupt_updates: int = 0
    #: Leftovers of writes that never committed, removed from tmp/.
    temp_files: int = 0
    #: Envelope updates whose message was already gone, removed.
    orphans: int = 0


class Spool:
    """The folder DATA_DIR/queue/ and its files.

    Layout: a message stored from bytes goes into a batch file with the others stored at
    the same time, as do the shadow copies that arrive together (`store_copies`): a file
    `<first id>.<n>.cps` holding records one after the other, each a 32-byte header (MAGIC,
    format version u16, kind u16, envelope length u32, data length u64, crc32 of the data,
    crc32 of the header's first 28 bytes and the envelope; little-endian), the envelope
    (msgpack), then the message's bytes exactly as received (DKIM signatures stay valid). A
    batch of messages costs one file and one fsync rather than one each: creating and syncing
    a small file costs more than writing its bytes, and one disk takes only so many journal
    commits a second. Dropping a message from a batch file (delivered, or a copy no longer
    needed) appends a record (kind 3) naming it, fdatasync'd (drops at the same time share a
    record and its fdatasync); dropping the file's last message removes the file.

    `update` of a message in a batch file moves it to a message file of its own, `<id>.msg`
    (same header, written once and never changed), as does `store` of data in a file (a large
    message). `<id>.env` (same header, kind 2, no data) then holds the newest envelope: a small
    file replaced atomically, rather than a rewrite of the whole message on every attempt
    (messages are up to the size limit, and retried for days). Subfolders: tmp/ (writes
    before their rename; emptied on open), corrupt/ (files a rescan could not read), failed/
    (expired messages no DSN could be sent for). queue.lock holds an flock while open, so one
    process at a time uses the folder.

    Durability: `store`, `store_copies` and `update` write a temporary file in tmp/ (same
    filesystem), fsync it, rename it into the folder, fsync the folder, and only then return;
    `remove` unlinks and fsyncs the folder. So a file in the folder is always whole. A batch
    round does all of it in its own thread, and up to STORE_ROUNDS rounds overlap (the disk
    folds their fsyncs into shared journal commits); the other changes share the folder's
    fsyncs (see _GroupCommit).
    Updates of one message must not overlap: the delivery of a message runs one at a time.
    """

    def __init__(self, folder: Path, lock_fd: int) -> None:
        self.folder = folder
        self.temp_folder = folder / TEMP_FOLDER
        self.corrupt_folder = folder / CORRUPT_FOLDER
        self.failed_folder = folder / FAILED_FOLDER
        self._lock_fd = lock_fd
        self._commit = _GroupCommit(folder)
        self._temp_names = itertools.count()
        #: Messages kept in batch files: where each one's record is, and the live ids per file.
        self._in_batch: dict[str, _BatchedAt] = {}
        self._batch_files: dict[str, set[str]] = {}
        self._drops = _DropCommit(folder)
        self._batch = _StoreBatch(folder, depth=STORE_ROUNDS, spool=self)
        self._reads = _ReadBatch(folder, spool=self)
        self._waiting: set[str] = set()  # ids waiting for a batch round
        self._batches = 0  # batch files written

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> Spool:
        """Opens (creating, 0700) the spool folder and its subfolders and takes its lock.
        Synchronous: call it before serving, or in a thread. Raises SpoolError."""
        folder = Path(folder)
        try:
            for path in (
                folder,
                folder / TEMP_FOLDER,
                folder / CORRUPT_FOLDER,
                folder / FAILED_FOLDER,
            ):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot use the queue folder {folder}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise SpoolError(f"the queue folder {folder} is in use by another process") from None
        return cls(folder, lock_fd)

    def close(self) -> None:
        """Releases the folder's lock."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @property
    def commit_rounds(self) -> int:
        """Rounds of fsyncs run so far: the folder's group commits and the batch files written."""
        return self._commit.rounds + self._batches

    def paths(self, queue_id: str) -> list[Path]:
        """The files holding a queued message now: its batch file, or its message file and
        envelope update (those that exist)."""
        if queue_id in self._in_batch:
            return [self.folder / self._in_batch[queue_id].file]
        return [path for path in (self.message_path(queue_id), self.envelope_path(queue_id)) if path.exists()]

    def message_path(self, queue_id: str) -> Path:
        return self.folder / f"{queue_id}{MESSAGE_SUFFIX}"

    def envelope_path(self, queue_id: str) -> Path:
        return self.folder / f"{queue_id}{ENVELOPE_SUFFIX}"

    # --- writing ---

    async def store(self, envelope: Envelope, data: Data) -> Envelope:
        """Writes a new message durably; returns its envelope with `size` set to the data's
        length. `data` is bytes or a binary file read from its position to its end. Messages
        in bytes stored at the same time share a batch file (see _StoreBatch); a file's data
        gets a message file of its own. Raises OSError (the caller answers 451), or
        FileExistsError when the id is already queued."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return await self._write(envelope, data)
        if envelope.id in self._in_batch or envelope.id in self._waiting:
            raise FileExistsError(f"queue id {envelope.id} is already queued")
        new = _NewMessage(envelope, bytes(data))
        self._waiting.add(envelope.id)
        try:
            await self._batch.commit(new)
        finally:
            self._waiting.discard(envelope.id)
        assert new.stored is not None
        return new.stored

    async def update(self, envelope: Envelope) -> None:
        """Replaces the stored envelope of a queued message durably (attempts, recipients'
        states and replies); a message in a batch file moves to a message file of its own (a
        rescan prefers that file to the record if a crash comes before the record is dropped).
        Raises FileNotFoundError when the message is not queued."""
        if envelope.id in self._in_batch:
            _, data = await trio.to_thread.run_sync(self._read_batched, envelope.id, True)
            await self._write(envelope, data)
            await self._drop_batched(envelope.id)
            return
        await self._write(envelope, None)

    async def _write(self, envelope: Envelope, data: Data | None) -> Envelope:
        change, envelope = await trio.to_thread.run_sync(self._write_temp, envelope, data)
        await self._commit.commit(change)
        return envelope

    def _write_temp(self, envelope: Envelope, data: Data | None) -> tuple[_Pending, Envelope]:
        if data is not None:
            envelope = attrs.evolve(envelope, size=_data_length(data))
            final, kind = self.message_path(envelope.id), _KIND_MESSAGE
            if final.exists():
                raise FileExistsError(f"queue id {envelope.id} is already queued")
        else:
            final, kind = self.envelope_path(envelope.id), _KIND_ENVELOPE
            if not self.message_path(envelope.id).exists():
                raise FileNotFoundError(f"queue id {envelope.id} is not queued")
        temp = self.temp_folder / f"{final.name}.{next(self._temp_names)}"
        packed = encode_envelope(envelope)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        change = _Pending(fd=fd, temp=temp, final=final)
        try:
            os.lseek(fd, HEADER_SIZE, os.SEEK_SET)
            write_all(fd, packed)
            length = crc = 0
            for chunk in _chunks(data) if data is not None else ():
                write_all(fd, chunk)
                length, crc = length + len(chunk), zlib.crc32(chunk, crc)
            if length != envelope.size and data is not None:
                raise OSError(f"message data changed while it was written ({length} of {envelope.size} bytes)")
            os.pwrite(fd, _header(kind, packed, length, crc), 0)
            # Each writer syncs its own file in its own thread: the kernel folds concurrent
            # fsyncs into shared journal commits (3.5 times the stores per second of one
            # thread syncing every file of a round in turn, measured with 50 writers).
            os.fsync(fd)
            os.close(fd)
            change.fd = -1
        except BaseException:
            change.discard()
            raise
        return change, envelope

    async def remove(self, queue_id: str) -> None:
        """Removes a delivered (or deleted) message durably. The message file goes
        first: a crash between the two unlinks leaves an orphan envelope update, which a rescan
        drops."""
        if queue_id in self._in_batch:
            await self._drop_batched(queue_id)
            return
        await self._commit.commit(_Pending(remove=(self.message_path(queue_id), self.envelope_path(queue_id))))

    # --- batch files ---

    async def store_copies(self, copies: list[tuple[Envelope, bytes]]) -> list[Envelope]:
        """Writes shadow copies durably into one new batch file; returns their envelopes with
        `size` set. The ids must not be kept here yet (the caller's index knows). Raises OSError."""
        kept = await trio.to_thread.run_sync(self._write_batch, copies)
        self._register(kept)
        return [envelope for envelope, _ in kept]

    def _register(self, kept: list[tuple[Envelope, _BatchedAt]]) -> None:
        """Indexes the messages of a batch file just written (on the event loop)."""
        self._batches += 1
        self._batch_files[kept[0][1].file] = {envelope.id for envelope, _ in kept}
        for envelope, at in kept:
            self._in_batch[envelope.id] = at

    def _write_batch(self, copies: list[tuple[Envelope, bytes]]) -> list[tuple[Envelope, _BatchedAt]]:
        """Writes a batch file in tmp/, fsyncs it, renames it into the folder and fsyncs the
        folder, all in the calling thread (rounds in other threads overlap theirs); each
        envelope (`size` set) with where its record is."""
        chunks: list[bytes] = []
        envelopes, offsets, offset = [], [], 0
        for envelope, data in copies:
            envelope = attrs.evolve(envelope, size=len(data))
            packed = encode_envelope(envelope)
            chunks += (_header(_KIND_MESSAGE, packed, len(data), zlib.crc32(data)), packed, data)
            envelopes.append(envelope)
            offsets.append(offset)
            offset += HEADER_SIZE + len(packed) + len(data)
        # A name no file has (the first id may head a file that lives on without it).
        while (self.folder / (name := f"{envelopes[0].id}.{next(self._temp_names)}{BATCH_SUFFIX}")).exists():
            pass
        change = _Pending(temp=self.temp_folder / name, final=self.folder / name)
        change.fd = os.open(change.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(change.fd, b"".join(chunks))
            os.fsync(change.fd)
            os.close(change.fd)
            change.fd = -1
            change.apply()
        except BaseException:
            change.discard()
            raise
        try:
            sync_directory(self.folder)
        except BaseException:
            # Perhaps on disk, perhaps not: gone is better than a duplicate after the 451.
            with contextlib.suppress(OSError):
                os.unlink(change.final)
            raise
        return [(envelope, _BatchedAt(name, offset)) for envelope, offset in zip(envelopes, offsets, strict=True)]

    def _write_new(self, batch: list[_NewMessage]) -> None:
        """`_write_batch` of the new messages in `batch` whose id has no message file here (the
        others get FileExistsError), each told its stored envelope and place. Raises OSError."""
        fresh = []
        for new in batch:
            if self.message_path(new.envelope.id).exists():
                new.error = FileExistsError(f"queue id {new.envelope.id} is already queued")
            else:
                fresh.append(new)
        if fresh:
            kept = self._write_batch([(new.envelope, new.data) for new in fresh])
            for new, (envelope, at) in zip(fresh, kept, strict=True):
                new.stored, new.at = envelope, at

    async def _drop_batched(self, queue_id: str) -> None:
        """Drops a message from its batch file: a record naming it appended to the file, or
        the file removed when it was the last message there. The index forgets it at once
        (so the file's last drop knows it is the last), and takes it back if the drop is not
        made (cancelled before its round, or an OSError, which is raised)."""
        at = self._in_batch.pop(queue_id)
        live = self._batch_files[at.file]
        live.discard(queue_id)
        if not live:
            del self._batch_files[at.file]

        def undo() -> None:
            self._in_batch[queue_id] = at
            self._batch_files.setdefault(at.file, live).add(queue_id)

        drop = _Drop(self.folder / at.file, queue_id, last=not live, undo=undo)
        try:
            await self._drops.commit(drop)
        except OSError:
            undo()
            raise

    def _read_batched(self, queue_id: str, with_data: bool) -> tuple[Envelope, bytes]:
        """The envelope (and the data, `with_data`) of a message in a batch file."""
        at = self._in_batch[queue_id]
        fd = os.open(self.folder / at.file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            record = _read_record(fd, at.offset, os.fstat(fd).st_size)
            data = os.pread(fd, record.data_length, record.data_offset) if with_data else b""
        finally:
            os.close(fd)
        if record.kind != _KIND_MESSAGE:
            raise CorruptMessage(f"kind {record.kind} where the record of {queue_id} was")
        envelope = decode_envelope(record.envelope)
        if envelope.id != queue_id:
            raise CorruptMessage(f"record of {queue_id} holds the envelope of {envelope.id}")
        if with_data and (len(data) != record.data_length or zlib.crc32(data) != record.data_crc):
            raise CorruptMessage("message data checksum mismatch")
        return envelope, data

    async def move_to_failed(self, envelope: Envelope) -> Path:
        """Moves an expired message whose DSN cannot be sent to failed/, with `envelope` (its
        final state) beside it; returns the message's new path."""
        await self.update(envelope)
        return await trio.to_thread.run_sync(self._move, envelope.id, self.failed_folder)

    async def quarantine(self, queue_id: str, reason: str) -> None:
        """Moves a message found unreadable (CorruptMessage from read_message) to corrupt/: its
        files, or for a message in a batch file a copy of that file, before the message is
        dropped from it."""
        log.error("queue: message %s is corrupt (%s); moved to %s", queue_id, reason, self.corrupt_folder)
        if queue_id in self._in_batch:
            source = self.folder / self._in_batch[queue_id].file
            await trio.to_thread.run_sync(_save_copy, source, self.corrupt_folder / f"{queue_id}{BATCH_SUFFIX}")
            await self._drop_batched(queue_id)
            return
        await trio.to_thread.run_sync(self._move, queue_id, self.corrupt_folder)

    def _move(self, queue_id: str, target: Path) -> Path:
        moved = target / f"{queue_id}{MESSAGE_SUFFIX}"
        # The message first: a crash after it leaves an orphan envelope update, dropped on rescan.
        for source in (self.message_path(queue_id), self.envelope_path(queue_id)):
            destination = _free_name(target / source.name)
            try:
                os.rename(source, destination)
            except FileNotFoundError:
                continue
            if source.suffix == MESSAGE_SUFFIX:
                moved = destination
        sync_directory(target)
        sync_directory(self.folder)
        return moved

    # --- reading ---

    async def read_envelope(self, queue_id: str) -> Envelope:
        """The newest envelope of a queued message. Raises FileNotFoundError, CorruptMessage."""
        return await trio.to_thread.run_sync(self._read_envelope, queue_id)

    def _read_envelope(self, queue_id: str) -> Envelope:
        if queue_id in self._in_batch:
            return self._read_batched(queue_id, False)[0]
        head = _read_file_head(self.message_path(queue_id), _KIND_MESSAGE)
        return self._newest(queue_id, head.envelope)

    def _newest(self, queue_id: str, first: Envelope) -> Envelope:
        try:
            envelope = _read_file_head(self.envelope_path(queue_id), _KIND_ENVELOPE).envelope
        except FileNotFoundError:
            envelope = first
        if envelope.id != queue_id:
            raise CorruptMessage(f"file of {queue_id} holds the envelope of {envelope.id}")
        return envelope

    async def read_message(self, queue_id: str) -> tuple[Envelope, bytes]:
        """The newest envelope and the bytes of a queued message, checked against their
        checksums. Raises FileNotFoundError, CorruptMessage (then call quarantine). Reads
        asked for at the same time share a worker thread (see _ReadBatch)."""
        read = _Read(queue_id)
        await self._reads.commit(read)
        assert read.result is not None
        return read.result

    def _read_message(self, queue_id: str) -> tuple[Envelope, bytes]:
        if queue_id in self._in_batch:
            return self._read_batched(queue_id, True)
        fd = os.open(self.message_path(queue_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = _read_head(fd, _KIND_MESSAGE)
            data = os.pread(fd, head.data_length, head.data_offset)
        finally:
            os.close(fd)
        if len(data) != head.data_length or zlib.crc32(data) != head.data_crc:
            raise CorruptMessage("message data checksum mismatch")
        return self._newest(queue_id, head.envelope), data

    # --- rescan ---

    async def rescan(self) -> ScanResult:
        """`scan` in a worker thread."""
        return await trio.to_thread.run_sync(self.scan)

    def scan(self) -> ScanResult:
        """Reads the envelope of every message in the folder (headers only, not the data), as
        on start: leftovers in tmp/ are removed, unreadable messages are moved to corrupt/ and
        logged, an unreadable envelope update is moved there too (the message keeps its first
        envelope: a duplicate delivery beats a lost message), orphan updates are removed."""
        temp_files = 0
        for entry in os.scandir(self.temp_folder):
            os.unlink(entry.path)
            temp_files += 1
        folder = str(self.folder)
        names = set(os.listdir(folder))
        envelopes: list[Envelope] = []
        corrupt: list[tuple[str, str]] = []
        corrupt_updates = orphans = emptied = 0
        self._in_batch, self._batch_files = {}, {}
        for name in sorted(names):
            queue_id, suffix = os.path.splitext(name)
            if suffix == ENVELOPE_SUFFIX and f"{queue_id}{MESSAGE_SUFFIX}" not in names:
                os.unlink(self.folder / name)
                orphans += 1
            if suffix == BATCH_SUFFIX:
                copies = self._scan_batch(name, names)
                envelopes += copies
                emptied += not copies
            if suffix != MESSAGE_SUFFIX:
                continue
            try:
                envelope = _read_file_head(os.path.join(folder, name), _KIND_MESSAGE).envelope
                if envelope.id != queue_id:
                    raise CorruptMessage(f"holds the envelope of {envelope.id}")
            except CorruptMessage as exc:
                log.error(
                    "queue: %s is corrupt (%s); moved to %s",
                    name,
                    exc,
                    self.corrupt_folder,
                )
                os.rename(self.folder / name, _free_name(self.corrupt_folder / name))
                corrupt.append((queue_id, str(exc)))
                continue
            if f"{queue_id}{ENVELOPE_SUFFIX}" in names:
                try:
                    envelope = self._newest(queue_id, envelope)
                except CorruptMessage as exc:
                    log.error(
                        "queue: the envelope update of %s is corrupt (%s); using its first",
                        queue_id,
                        exc,
                    )
                    update = self.envelope_path(queue_id)
                    os.rename(update, _free_name(self.corrupt_folder / update.name))
                    corrupt_updates += 1
            envelopes.append(envelope)
        if corrupt or corrupt_updates:
            sync_directory(self.corrupt_folder)
        if corrupt or corrupt_updates or orphans or emptied:
            sync_directory(self.folder)
        return ScanResult(envelopes, corrupt, corrupt_updates, temp_files, orphans)

    def _scan_batch(self, name: str, names: set[str]) -> list[Envelope]:
        """The live messages of batch file `name` (not dropped, not moved to a message file of
        their own), registered; the file is removed when none is. A record that cannot be read
        ends the file there (the tail of a crash while the file or a drop record was written):
        the rest is cut off, after a copy of it is saved in corrupt/."""
        path = self.folder / name
        kept: dict[str, tuple[Envelope, int]] = {}
        dropped: set[str] = set()
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            offset, size = 0, os.fstat(fd).st_size
            while offset < size:
                try:
                    record = _read_record(fd, offset, size)
                    if record.kind == _KIND_MESSAGE:
                        envelope = decode_envelope(record.envelope)
                        kept[envelope.id] = (envelope, offset)
                    elif record.kind == _KIND_DROPPED:
                        dropped.update(_dropped_ids(record.envelope))
                    else:
                        raise CorruptMessage(f"kind {record.kind}")
                except CorruptMessage as exc:
                    saved = _save_copy(path, self.corrupt_folder / name, offset)
                    log.warning("queue: %s is cut at byte %d of %d (%s); the rest is in %s",
                                name, offset, size, exc, saved)  # fmt: skip
                    os.ftruncate(fd, offset)
                    os.fsync(fd)
                    break
                offset = record.end
        finally:
            os.close(fd)
        live = {queue_id: found for queue_id, found in kept.items()
                if queue_id not in dropped and f"{queue_id}{MESSAGE_SUFFIX}" not in names}  # fmt: skip
        if not live:
            os.unlink(path)
            return []
        self._batch_files[name] = set(live)
        for queue_id, (_, offset) in live.items():
            self._in_batch[queue_id] = _BatchedAt(name, offset)
        return [envelope for envelope, _ in live.values()]


def _dropped_ids(packed: bytes) -> list[str]:
    try:
        ids = msgpack.unpackb(packed, raw=False)
    except Exception:  # msgpack raises a handful of unrelated types
        raise CorruptMessage("bad list of dropped copies") from None
    if not isinstance(ids, list) or not all(isinstance(queue_id, str) for queue_id in ids):
        raise CorruptMessage("bad list of dropped copies")
    return ids


def _save_copy(source: Path, target: Path, offset: int = 0) -> Path:
    """Copies `source` from byte `offset` to a new file at `target` (or a free name beside
    it), fsync'd with its folder; returns its path."""
    target = _free_name(target)
    private = functools.partial(os.open, mode=0o600)  # like every file of the spool
    with open(source, "rb") as reader, open(target, "xb", opener=private) as writer:
        reader.seek(offset)
        while chunk := reader.read(COPY_SIZE):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    sync_directory(target.parent)
    return target


def _free_name(path: Path) -> Path:
    """`path`, or `path.N` for the first N not taken (corrupt/ may already hold that name)."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate
