"""Shadow copies of queued mail on a second master, so that mail that got a 250 survives the
loss of the master that queued it, disk and all.

Before a master answers 250 for a message it queues, it also stores the message on one other
live master (the next one after itself in name order) and notes that master in the envelope
(`copy_at`). The master that queued it delivers; once it has, it tells the holder to drop its
copy. If the owner stays dead for `shadow_takeover`, the holder takes the copies over and
delivers them itself, noting each one taken (queue/taken.log). An owner that comes back asks
its holders what they took before delivering anything they hold a copy of, and drops those.

The masters talk over TCP with mutual TLS: each side shows its node certificate from the
cluster CA, and only masters are served. A request or an answer is one frame: a 4-byte length,
then a msgpack map. Requests: {"op": "copies", "copies": [[envelope, data], ...]} (answered
{"ok": true, "results": [null or error text, ...]} once every copy that took is on disk),
{"op": "store", "envelope", "data"} (one copy, as older masters send it), {"op": "drop", "ids"},
{"op": "taken"}; answers: {"ok": true, ...} or {"error": text}. Copies that sessions store at
the same time travel in one frame, and the holder writes them into one file with one fsync.
A holder still on code from before `copies` (a rolling upgrade) answers it "unknown op": it
then gets one `store` per copy.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import msgpack
import trio
from cryptography import x509

from ..config.sections import TlsSection
from ..core.address import Address
from ..core.errors import MeshmailError
from ..gossip.messages import State
from ..nodemeta import NodeMeta
from ..security import ca
from .spool import CorruptMessage, Envelope, decode_envelope

log = logging.getLogger("meshmail.mta")

_LENGTH = struct.Struct("!I")
#: Seconds one request may take (connect, TLS, the other side's fsync) before it fails.
REQUEST_TIMEOUT = 10.0
#: Seconds a shadow connection may sit idle on the holder's side.
IDLE_TIMEOUT = 120.0
#: Idle connections kept per holder: as many as sessions store copies at once, or each would pay
#: a TLS handshake.
POOL = 32
#: Ids in one drop request.
MAX_IDS = 10_000
#: Copies in one frame at most, and the bytes past which no further copy joins a frame (a
#: first copy always goes: the holder's frame limit takes a message of the largest size).
MAX_COPIES = 100
BATCH_BYTES = 1 << 20
#: Frames of copies under way to one holder at once: while one is, new copies gather for the
#: next (one measured larger frames and more messages a second than two, in bench-mx).
IN_FLIGHT = 1


class ShadowError(MeshmailError):
    """A shadow request that failed; str() says why."""


class ShadowRefused(ShadowError):
    """The holder answered the request with an error (`reason`, its words)."""

    def __init__(self, holder: str, reason: object) -> None:
        super().__init__(f"{holder} refused: {reason}")
        self.reason = reason


#: What a master from before the `copies` request answers it: it gets one `store` per copy.
_NO_COPIES = "unknown op 'copies'"


def contexts(tls: TlsSection) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts with this node's certificate, each requiring the other
    side's from the cluster CA. Names are checked against the certificate's subject, not DNS."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(tls.cert, tls.key)
    client = ssl.create_default_context(cafile=tls.ca)
    client.check_hostname = False
    client.load_cert_chain(tls.cert, tls.key)
    return server, client


def peer_node(stream: trio.SSLStream) -> tuple[str, str]:
    """(node name, role) of the other side's certificate."""
    der = stream.getpeercert(binary_form=True)
    if not der:
        return "", ""
    return ca.subject_role(x509.load_der_x509_certificate(der))


class Frames:
    """Frames over a stream: write one, read one (at most `limit` bytes)."""

    def __init__(self, stream: trio.abc.Stream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.buffer = bytearray()

    async def write(self, obj: dict[str, Any]) -> None:
        body = msgpack.packb(obj, use_bin_type=True)
        await self.stream.send_all(_LENGTH.pack(len(body)) + body)

    async def read(self) -> dict[str, Any] | None:
        """The next frame; None at a clean end of stream. Raises ShadowError on a bad one."""
        if not await self._fill(_LENGTH.size):
            return None
        (length,) = _LENGTH.unpack(self.buffer[: _LENGTH.size])
        if length > self.limit:
            raise ShadowError(f"frame of {length} bytes (limit {self.limit})")
        if not await self._fill(_LENGTH.size + length):
            raise ShadowError("stream ended inside a frame")
        body = bytes(self.buffer[_LENGTH.size : _LENGTH.size + length])
        del self.buffer[: _LENGTH.size + length]
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_map_len=16)
        except Exception:
            raise ShadowError("frame is not msgpack") from None
        if not isinstance(obj, dict):
            raise ShadowError("frame is not a map")
        return obj

    async def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            data = await self.stream.receive_some(max(65536, size - len(self.buffer)))
            if not data:
                if self.buffer:
                    raise ShadowError("stream ended inside a frame")
                return False
            self.buffer += data
        return True


@attrs.define(eq=False)
class _Copy:
    """One copy waiting for its frame, then for the holder's answer (`error`: None when kept)."""

    envelope: bytes
    data: bytes
    sent: bool = False
    done: bool = False
    error: str | None = None


@attrs.define(eq=False)
class _Outbox:
    """The copies for one holder not sent yet, and how many frames are under way."""

    pending: list[_Copy] = attrs.field(factory=list)
    sending: int = 0
    answered: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class Links:
    """The owner's side: connections to holders, kept open for reuse.

    `members` gives the current member list (MemberInfo); `name` is this node's."""

    name: str
    members: Callable[[], list]
    context: ssl.SSLContext
    limit: int
    _idle: dict[str, list[Frames]] = attrs.field(factory=dict)
    _outboxes: dict[str, _Outbox] = attrs.field(factory=dict)
    #: Holders on code from before `copies` (a rolling upgrade): they get one `store` per copy.
    _one_by_one: set[str] = attrs.field(factory=set)

    def holders(self) -> list[str]:
        """The live masters that keep shadows, in the order to try them: the next after this
        node in name order first (so copies spread over the masters)."""
        found = sorted(
            m.name for m in self.members()
            if m.name != self.name and m.state == State.ALIVE and _meta(m).role == "master" and _meta(m).shadow
        )  # fmt: skip
        after = [n for n in found if n > self.name]
        return after + [n for n in found if n < self.name]

    def alive(self, holder: str) -> bool | None:
        """Whether `holder` is alive (None: not a member at all)."""
        member = next((m for m in self.members() if m.name == holder), None)
        return None if member is None else member.state in (State.ALIVE, State.SUSPECT)

    async def call(self, holder: str, request: dict[str, Any]) -> dict[str, Any]:
        """Send `request` to `holder`; its answer. Raises ShadowError."""
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                frames = self._idle.get(holder, []).pop() if self._idle.get(holder) else await self._open(holder)
                await frames.write(request)
                answer = await frames.read()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            raise ShadowError(f"shadow request to {holder} failed: {exc or type(exc).__name__}") from None
        if answer is None:
            raise ShadowError(f"{holder} closed the shadow connection")
        if "error" in answer:
            await trio.aclose_forcefully(frames.stream)
            raise ShadowRefused(holder, answer["error"])
        pool = self._idle.setdefault(holder, [])
        if len(pool) < POOL:
            pool.append(frames)
        else:
            await trio.aclose_forcefully(frames.stream)
        return answer

    async def store(self, holder: str, envelope: bytes, data: bytes) -> None:
        """Keep a copy (`envelope` encoded, `data`) at `holder`; returns once it is on disk
        there. Copies stored meanwhile share frames: the first caller to find a frame free
        sends every copy waiting (up to MAX_COPIES, BATCH_BYTES), the others wait for the
        answer. Raises ShadowError (a copy cancelled before its frame left is not sent)."""
        box = self._outboxes.setdefault(holder, _Outbox())
        copy = _Copy(envelope, data)
        box.pending.append(copy)
        try:
            while not copy.done:
                if not copy.sent and box.sending < IN_FLIGHT:
                    await self._send(holder, box)
                else:
                    await box.answered.wait()
        except trio.Cancelled:
            if not copy.sent:
                box.pending.remove(copy)
            raise
        if copy.error is not None:
            raise ShadowError(copy.error)

    async def _send(self, holder: str, box: _Outbox) -> None:
        """One frame of the copies waiting for `holder`; each copy learns its result."""
        batch, size = [], 0
        while box.pending and len(batch) < MAX_COPIES:
            size += len(box.pending[0].envelope) + len(box.pending[0].data)
            if batch and size > BATCH_BYTES:
                break
            batch.append(box.pending.pop(0))
        for copy in batch:
            copy.sent = True
        box.sending += 1
        errors: list[str | None] = [f"shadow request to {holder} cancelled"] * len(batch)
        try:
            errors = await self._deliver(holder, batch)
        except ShadowError as exc:
            errors = [str(exc)] * len(batch)
        finally:  # cancelled meanwhile, the copies' callers hear their copy failed
            for copy, error in zip(batch, errors, strict=True):
                copy.error, copy.done = error, True
            box.sending -= 1
            box.answered.set()
            box.answered = trio.Event()

    async def _deliver(self, holder: str, batch: list[_Copy]) -> list[str | None]:
        """Send `batch` to `holder` in one `copies` frame, or one `store` each to a holder that
        does not know `copies` yet; an error (None: kept) per copy. Raises ShadowError."""
        if holder not in self._one_by_one:
            try:
                answer = await self.call(holder, {"op": "copies", "copies": [[c.envelope, c.data] for c in batch]})
            except ShadowRefused as exc:
                if exc.reason != _NO_COPIES:
                    raise
                log.info("shadow copies for %s go one by one: it runs an older meshmail", holder)
                self._one_by_one.add(holder)
            else:
                results = answer.get("results")
                if isinstance(results, list) and len(results) == len(batch):
                    return [None if r is None else f"{holder} refused: {r}" for r in results]
                return [f"{holder} answered without a result per copy"] * len(batch)
        errors: list[str | None] = []
        for copy in batch:
            try:
                await self.call(holder, {"op": "store", "envelope": copy.envelope, "data": copy.data})
                errors.append(None)
            except ShadowError as exc:
                errors.append(str(exc))
        return errors

    async def _open(self, holder: str) -> Frames:
        member = next((m for m in self.members() if m.name == holder), None)
        if member is None or not _meta(member).shadow:
            raise ShadowError(f"{holder} keeps no shadows")
        address = Address.parse(_meta(member).shadow)
        stream = await trio.open_tcp_stream(address.host, address.port)
        tls = trio.SSLStream(stream, self.context, server_hostname=address.host)
        await tls.do_handshake()
        if peer_node(tls) != (holder, "master"):
            await trio.aclose_forcefully(tls)
            raise ShadowError(f"the shadow store at {address} is not master {holder}")
        return Frames(tls, self.limit)


def _meta(member) -> NodeMeta:
    return _decoded(member.meta)


@functools.lru_cache(maxsize=256)
def _decoded(meta: bytes) -> NodeMeta:
    """Members' metadata, decoded once per version (holders() reads it for every message)."""
    return NodeMeta.decode(meta)


class TakenLog:
    """The ids of shadow copies this master took over, by owner: queue/taken.log, one line
    "owner id" each, appended and fsync'd before the message is delivered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.taken: dict[str, set[str]] = {}
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                owner, _, queue_id = line.partition(" ")
                if owner and queue_id:
                    self.taken.setdefault(owner, set()).add(queue_id)

    async def add(self, owner: str, ids: list[str]) -> None:
        text = "".join(f"{owner} {queue_id}\n" for queue_id in ids).encode()
        await trio.to_thread.run_sync(self._append, text)
        self.taken.setdefault(owner, set()).update(ids)

    def _append(self, text: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)


async def serve_holder(stream: trio.SocketStream, runner, context: ssl.SSLContext, limit: int, name: str) -> None:
    """Answer one master's shadow requests (`runner` keeps the copies: Runner.hold, drop,
    taken_from). Only another master with a cluster certificate is served."""
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            await tls.do_handshake()
        origin, role = peer_node(tls)
        if role != "master" or not origin or origin == name:
            log.warning("shadow store: refused %s (%s)", origin or "a peer without a node certificate", role or "-")
            return
        frames = Frames(tls, limit)
        while True:
            with trio.move_on_after(IDLE_TIMEOUT):
                request = await frames.read()
                if request is None:
                    return
                await frames.write(await _answer(runner, origin, request))
                continue
            return
    except (ShadowError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
            ssl.SSLError) as exc:  # fmt: skip
        log.info("shadow store: connection ended: %s", exc or type(exc).__name__)
    finally:
        await trio.aclose_forcefully(tls)


async def _answer(runner, origin: str, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    try:
        if op == "copies":
            copies = request.get("copies")
            if not isinstance(copies, list) or not 0 < len(copies) <= MAX_COPIES:
                return {"error": f"copies must be a list of 1 to {MAX_COPIES} [envelope, data] pairs"}
            return {"ok": True, "results": await _hold_all(runner, origin, copies)}
        if op == "store":
            [error] = await _hold_all(runner, origin, [[request.get("envelope"), request.get("data")]])
            return {"error": error} if error else {"ok": True}
        if op == "drop":
            ids = request.get("ids")
            if not isinstance(ids, list) or len(ids) > MAX_IDS or not all(isinstance(i, str) for i in ids):
                return {"error": "ids must be a list of queue ids"}
            await runner.drop(origin, ids)
            return {"ok": True}
        if op == "taken":
            return {"ok": True, "ids": runner.taken_from(origin)}
    except CorruptMessage as exc:
        return {"error": str(exc)}
    except OSError as exc:
        log.error("shadow store: cannot keep a copy for %s: %s", origin, exc)
        return {"error": "cannot store now"}
    return {"error": f"unknown op {op!r}"}


async def _hold_all(runner, origin: str, copies: list) -> list[str | None]:
    """Keep every well-formed copy in one write (Runner.hold); None or the reason for each."""
    results: list[str | None] = [None] * len(copies)
    valid: list[tuple[Envelope, bytes]] = []
    where: list[int] = []
    for index, copy in enumerate(copies):
        checked = _checked(copy)
        if isinstance(checked, str):
            results[index] = checked
        else:
            valid.append(checked)
            where.append(index)
    if valid:
        try:
            held = await runner.hold(origin, valid)
        except OSError as exc:
            log.error("shadow store: cannot keep %d copies for %s: %s", len(valid), origin, exc)
            held = ["cannot store now"] * len(valid)
        for index, result in zip(where, held, strict=True):
            results[index] = result
    return results


def _checked(copy: object) -> tuple[Envelope, bytes] | str:
    """A copy ([envelope, data]) decoded, or why it cannot be."""
    if not isinstance(copy, list) or len(copy) != 2 or not all(isinstance(part, bytes) for part in copy):
        return "a copy is an [envelope, data] pair of byte strings"
    try:
        envelope = decode_envelope(copy[0])
    except CorruptMessage as exc:
        return str(exc)
    if len(copy[1]) != envelope.size:
        return "data does not match the envelope"
    return envelope, copy[1]
