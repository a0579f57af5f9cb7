"""The MX's queue at work: taking a finished message from a session (in-line delivery to the
slaves that answer, the rest kept on disk, here and as a shadow copy on another master, before
the 250), and the delivery loop that retries what waits (per slave, backoff with jitter, at
once when a slave comes back), bounces what a slave refuses for good or what waited past the
queue lifetime (RFC 3464 DSNs), and keeps the shadow copies of other masters (shadow.py).
"""

from __future__ import annotations

import collections
import heapq
import logging
import random
from collections.abc import Iterable, Mapping

import attrs
import trio

from ..core.address import Address
from ..core.clock import wall_ms
from ..core.errors import MeshmailError
from ..metrics import Metrics
from ..protocols.lmtp import Transaction
from ..protocols.mx import MailFrom
from ..protocols.smtp import Reply
from ..routing import SERVICE_DOWN, UNKNOWN_DOMAIN, NoRoute, Route, Router
from . import dsn
from .deliver import (
    DELIVERY_ERRORS,
    SMARTHOST,
    UNREACHABLE,
    Client,
    Connection,
    Deliverer,
    Lane,
    resolve,
    route_to,
    smarthost_route,
)
from .queue import Entry, Queue, Settlement, expire
from .shadow import MAX_IDS, Links, ShadowError, TakenLog
from .spool import (
    CorruptMessage,
    Envelope,
    Recipient,
    RecipientState,
    Spool,
    encode_envelope,
    new_queue_id,
)

log = logging.getLogger("meshmail.mta")

NOT_QUEUED = Reply(451, "4.3.0", "Cannot keep the message now, try again later")
#: How often the loop looks for due messages and returning slaves without being woken.
TICK = 1.0
#: Messages one delivery round takes from a slave's queue, and how many of them are handed
#: over at once (each on its own connection; 20 is Postfix's default per-destination concurrency).
BATCH = 200
PER_SLAVE = 20
#: While mail waits for a slave whose health probe publishes its mail service down, this
#: master tries a session with it this often (seconds); one that greets counts as up for
#: LOOK_VALID seconds, until the slave's own probe catches up. A try may take LOOK_TIMEOUT.
#: Ten a second cost a refused connection each while the service is down; the mail then starts
#: within about 0.05 s of the service's return.
LOOK_INTERVAL = 0.1
LOOK_VALID = 30.0
LOOK_TIMEOUT = 5.0
#: How often messages past the queue lifetime are looked for (seconds).
SWEEP = 300.0
#: A master this node does not know yet is not taken for dead before this many seconds after
#: the start (the node may still be joining).
UNKNOWN_GRACE = 60.0


@attrs.define(eq=False)
class Runner:
    """The spool and its index, and what delivers from them. `origin` is this node's name."""

    spool: Spool
    queue: Queue
    deliverer: Deliverer
    router: Router
    hostname: str
    origin: str
    rng: random.Random = attrs.field(factory=random.SystemRandom)
    #: Where recipients are counted by result, and the queue's size is read from.
    metrics: Metrics = attrs.field(factory=Metrics)
    #: Shadow copies: links to the holders (None: none are kept), the ids taken over, and the
    #: time an owner must stay dead before its copies here are taken over (seconds).
    links: Links | None = None
    taken: TakenLog | None = None
    takeover_after: float = 600.0
    #: Where notices to senders outside the cluster go (None: they are not sent).
    smarthost: Address | None = None
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _up: dict[str, bool] = attrs.field(factory=dict)
    _busy: set[str] = attrs.field(factory=set)
    #: Slave -> when this master's own look found its mail service answering (trio time).
    _answered: dict[str, float] = attrs.field(factory=dict)
    _looking: set[str] = attrs.field(factory=set)
    _looker: Deliverer | None = None
    _locks: dict[str, trio.Semaphore] = attrs.field(factory=dict)
    #: Ids of shadow copies being written now.
    _holding: set[str] = attrs.field(factory=set)
    #: Holder -> ids of messages delivered here whose copy there is not dropped yet.
    _undropped: dict[str, set[str]] = attrs.field(factory=dict)
    #: Holder -> queued messages held back until it says which ones it took over.
    _unconfirmed: dict[str, list[Envelope]] = attrs.field(factory=dict)
    #: Owner or holder -> since when (trio time) it has been seen dead.
    _down_since: dict[str, float] = attrs.field(factory=dict)
    _started: float = 0.0  # when run() started (trio time)

    @property
    def held_back(self) -> int:
        """Queued messages waiting for their shadow's holder to say what it took over."""
        return sum(len(held) for held in self._unconfirmed.values())

    def load(self, envelopes: list[Envelope]) -> None:
        """Take the envelopes a rescan found: queued ones and shadow copies into the index,
        except messages with a shadow copy elsewhere (held back until that master says what
        it took over); delivered ones whose copy is not dropped yet, to drop."""
        for envelope in envelopes:
            if envelope.shadow or (envelope.queued() and not envelope.copy_at):
                self.queue.add(envelope)
            elif envelope.queued():
                self._unconfirmed.setdefault(envelope.copy_at, []).append(envelope)
            elif envelope.copy_at:
                self._undropped.setdefault(envelope.copy_at, set()).add(envelope.id)

    def __attrs_post_init__(self) -> None:
        self.metrics.mx_queued.set_function(lambda: self.queue.stats(wall_ms()).messages)

    def _count(self, result: str, recipients: int = 1) -> None:
        """Counts `recipients` under `result` (delivered, queued...), shown even at 0."""
        self.metrics.mx_recipients.labels(result=result).inc(recipients)

    def _route(self, slave: str) -> tuple[Route | NoRoute, str]:
        """How to reach `slave` now; a service its health probe still publishes as down counts
        as up for a while after this master's own look found it answering (_look), until the
        probe catches up: once it publishes the service up, a later "down" is a new outage."""
        if slave == SMARTHOST:
            return smarthost_route(self.smarthost)
        route, protocol = route_to(self.router, slave)
        answered = self._answered.get(slave)
        if answered is None:
            return route, protocol
        if isinstance(route, Route):
            del self._answered[slave]
        elif route.reason == SERVICE_DOWN and trio.current_time() - answered < LOOK_VALID:
            return route_to(self.router, slave, unprobed=True)
        return route, protocol

    def _failed(self, slave: str, replies: list[Reply]) -> None:
        """A look's answer no longer counts once the slave could not be reached after it."""
        if replies and all(reply is UNREACHABLE for reply in replies):
            self._answered.pop(slave, None)

    def _look_if_down(self, slave: str, nursery: trio.Nursery) -> None:
        """Start looking at `slave`'s mail service when its health probe publishes it down."""
        if slave in self._looking or slave == SMARTHOST:
            return
        route = self._route(slave)[0]
        if isinstance(route, NoRoute) and route.reason == SERVICE_DOWN:
            self._looking.add(slave)
            nursery.start_soon(self._look, slave)

    async def _look(self, slave: str) -> None:
        """While mail waits for `slave` and its health probe publishes the service down, try a
        session with it every LOOK_INTERVAL: once one greets, the mail goes at once instead of
        after the slave's next probe (slave.probe_interval) and the gossip that spreads it."""
        try:
            while slave in self.queue.slaves():
                route, _ = self._route(slave)
                if not (isinstance(route, NoRoute) and route.reason == SERVICE_DOWN):
                    return
                unprobed, protocol = route_to(self.router, slave, unprobed=True)
                if isinstance(unprobed, Route) and await self._answers(unprobed, protocol):
                    self._answered[slave] = trio.current_time()
                    log.info("slave %s's %s service answers again (before its health probe says so)", slave, protocol)
                    self._wake.set()
                    return
                await trio.sleep(LOOK_INTERVAL)
        finally:
            self._looking.discard(slave)

    async def _answers(self, route: Route, protocol: str) -> bool:
        """Whether a session with `route` opens (one connect, the greeting, LHLO/EHLO)."""
        if self._looker is None:  # a Deliverer of its own, whose connector tries once
            connector = attrs.evolve(self.deliverer.connector, tries=1)
            self._looker = Deliverer(connector, self.deliverer.hostname, self.deliverer.timeout)
        probe = Connection(self._looker, route, protocol, None)
        try:
            with trio.move_on_after(LOOK_TIMEOUT):
                await probe.open()
                return True
        except DELIVERY_ERRORS:
            pass
        finally:
            await probe.close()
        return False

    def new_id(self) -> str:
        return new_queue_id(wall_ms(), self.rng.getrandbits(32))

    # --- a message from a session ----------------------------------------------------------

    async def accept(
        self, queue_id: str, sender: MailFrom, recipients: list[tuple[str, Route | NoRoute, str]], data: bytes,
        client: Client,
    ) -> Reply:  # fmt: skip
        """Deliver `data` to the recipients' slaves that answer and keep the rest; the reply to
        the end of DATA (the slave's refusal when every recipient was refused for good)."""
        replies: dict[int, Reply] = {}
        by_slave: dict[str, list[int]] = collections.defaultdict(list)
        for index, (_, route, _) in enumerate(recipients):
            if isinstance(route, Route):
                by_slave[route.slave].append(index)

        async def deliver(indices: list[int]) -> None:
            _, route, protocol = recipients[indices[0]]
            assert isinstance(route, Route)
            transaction = _transaction(sender, [recipients[i][0] for i in indices], len(data))
            answers = await self.deliverer.deliver(route, protocol, transaction, data, client)
            self._failed(route.slave, answers)
            replies.update(zip(indices, answers, strict=True))

        async with trio.open_nursery() as nursery:
            for indices in by_slave.values():
                nursery.start_soon(deliver, indices)
        for _, route, _ in recipients:
            if isinstance(route, NoRoute):
                self._up[route.slave] = False  # so its return is noticed, however soon it comes
        now = wall_ms()
        records = [
            _record(address, route, replies.get(i), now, self.queue) for i, (address, route, _) in enumerate(recipients)
        ]
        envelope = Envelope(
            queue_id,
            sender.reverse_path,
            records,
            now,
            client.address[0],
            client.helo,
            len(data),
            self.origin,
        )
        delivered = [r for r in records if r.state is RecipientState.DELIVERED]
        failed = [r for r in records if r.state is RecipientState.FAILED]
        self._count("delivered", len(delivered))
        if envelope.queued():
            try:
                envelope = await self._keep(envelope, data)
            except OSError as exc:
                log.error("message %s not queued: %s", queue_id, exc)
                return NOT_QUEUED
            self.queue.add(envelope)
            self._count("queued", len(envelope.queued()))
        elif not delivered:
            self._count("refused", len(failed))
            return failed[0].reply or NOT_QUEUED
        log.info(
            "message %s from <%s> via %s: %d delivered, %d queued, %d failed",
            queue_id, sender.reverse_path, client.address[0], len(delivered), len(envelope.queued()), len(failed),
        )  # fmt: skip
        if failed:
            await self._bounce(envelope, failed, data)
        what = "queued" if envelope.queued() else "delivered"
        return Reply(250, "2.0.0", f"Ok: {what} as {queue_id}")

    async def _keep(self, envelope: Envelope, data: bytes) -> Envelope:
        """Store a message to queue here and, while another master lives, a shadow copy there,
        both before returning (at once: the two fsyncs overlap). Raises OSError."""
        links = self.links
        holders = links.holders() if links is not None else []
        if links is None or not holders:
            return await self.spool.store(envelope, data)
        envelope = attrs.evolve(envelope, copy_at=holders[0])
        copied: list[str] = []
        stored: list[Envelope] = []

        async def copy() -> None:
            packed = encode_envelope(envelope)
            for holder in holders[:2]:
                try:
                    await links.store(holder, packed, data)
                except ShadowError as exc:
                    log.warning("message %s: %s", envelope.id, exc)
                else:
                    copied.append(holder)
                    return

        async def store() -> None:
            stored.append(await self.spool.store(envelope, data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy)
            nursery.start_soon(store)
        kept = stored[0]
        if copied != [kept.copy_at]:
            kept = attrs.evolve(kept, copy_at=copied[0] if copied else "")
            await self.spool.update(kept)
            if not copied:
                self._count("unshadowed")
                log.warning("message %s is queued on this master only: no other master took a copy", envelope.id)
        return kept

    # --- the delivery loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver what is due, slave by slave, until cancelled."""
        next_sweep = self._started = trio.current_time()
        async with trio.open_nursery() as nursery:
            while True:
                now = wall_ms()
                self._kick_returned(now)
                for slave in self.queue.slaves():
                    self._look_if_down(slave, nursery)
                    if slave not in self._busy and (entries := self.queue.due(slave, now, BATCH)):
                        self._busy.add(slave)
                        nursery.start_soon(self._round, slave, [entry.id for entry in entries])
                if trio.current_time() >= next_sweep:
                    next_sweep = trio.current_time() + SWEEP
                    nursery.start_soon(self._sweep, now)
                if self.links is not None and "shadows" not in self._busy:
                    self._busy.add("shadows")
                    nursery.start_soon(self._shadow_round)
                with trio.move_on_after(TICK):
                    await self._wake.wait()
                self._wake = trio.Event()

    def wake(self) -> None:
        """Look at the queue now (membership changed: a slave may be back)."""
        self._wake.set()

    def _kick_returned(self, now: int) -> None:
        """Make a slave's waiting messages due at once when it answers again."""
        for slave in self.queue.slaves():
            up = isinstance(self._route(slave)[0], Route)
            if up and self._up.get(slave) is False:
                log.info(
                    "slave %s is back: delivering its %d queued message(s)",
                    slave,
                    self.queue.kick(slave, now),
                )
            self._up[slave] = up

    async def _round(self, slave: str, ids: list[str]) -> None:
        """Attempt `ids` at `slave` over PER_SLAVE lanes at once (their spool writes then share
        fsyncs; a lane keeps its session to the slave where it can, see Lane). A lane that is
        done takes the next message, and what else comes due meanwhile while the slave still
        has a route: a drain never waits for a round's slowest lane nor opens new sessions."""
        route, protocol = self._route(slave)
        todo = collections.deque(ids)

        def next_id() -> str | None:
            if not todo and isinstance(route, Route) and isinstance(self._route(slave)[0], Route):
                todo.extend(entry.id for entry in self.queue.due(slave, wall_ms(), BATCH))
            return todo.popleft() if todo else None

        async def lane() -> None:
            way = Lane(self.deliverer, route, protocol) if isinstance(route, Route) else None
            settled: trio.Event | None = None  # the last message's spool write, done behind
            try:
                async with trio.open_nursery() as behind:
                    while (queue_id := next_id()) is not None:
                        lock = self._lock(queue_id)
                        await lock.acquire()
                        try:
                            attempt = await self._attempt(slave, queue_id, way)
                            if settled is not None:
                                await settled.wait()
                        except BaseException:
                            lock.release()
                            raise
                        settled = trio.Event()
                        behind.start_soon(self._settle_behind, attempt, lock, settled)
            finally:
                if way is not None:
                    await way.close()

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(PER_SLAVE, len(ids))):
                    nursery.start_soon(lane)
        finally:
            for queue_id in todo:  # cancelled: not attempted, due again at the next look
                self.queue.release(queue_id, slave)
            self._busy.discard(slave)
            self._wake.set()

    async def _settle_behind(self, attempt: tuple[Settlement, bytes] | None, lock: _HeldLock, done: trio.Event) -> None:
        """Settle an attempt in the spool while its lane hands over the next message (the
        message's lock is held until then: nothing else changes it meanwhile)."""
        try:
            if attempt is not None:
                await self._settle(*attempt)
        finally:
            lock.release()
            done.set()

    async def _attempt(self, slave: str, queue_id: str, lane: Lane | None) -> tuple[Settlement, bytes] | None:
        """One try of a queued message at `slave` over `lane` (None: the slave cannot be
        reached now), settled in the index; what `_settle` then writes to the spool (None:
        nothing to write)."""
        try:
            envelope, data = await self.spool.read_message(queue_id)
        except (CorruptMessage, OSError) as exc:
            log.error("queued message %s cannot be read (%s): moved aside", queue_id, exc)
            self.queue.remove(queue_id)
            await self.spool.quarantine(queue_id, str(exc))
            return None
        recipients = envelope.queued(slave)
        if not recipients:
            self.queue.release(queue_id, slave)
            return None
        addresses = [r.address for r in recipients]
        if lane is not None:
            transaction = _transaction(MailFrom(envelope.sender), addresses, len(data))
            client = (
                Client((envelope.client_address, 0), ("0.0.0.0", 0), envelope.helo) if envelope.client_address else None
            )
            replies = await lane.deliver(transaction, data, client)
            self._failed(slave, replies)
        elif isinstance(self._route(slave)[0], Route):
            # The slave came back while this round found it gone: due again at once, not after
            # a retry delay (the kick on its return missed this message, in flight here).
            self.queue.release(queue_id, slave)
            return None
        else:
            replies = [UNREACHABLE] * len(addresses)
        return self.queue.settle(envelope, slave, dict(zip(addresses, replies, strict=True)), wall_ms()), data

    async def _settle(self, result: Settlement, data: bytes) -> None:
        envelope = result.envelope
        self._count("delivered", len(result.delivered))
        self._count("deferred", len(envelope.queued(result.slave)))
        if result.done:
            await self._finish(envelope)
        else:
            await self.spool.update(envelope)
        if result.delivered:
            log.info(
                "queued message %s delivered to %d recipient(s) at %s",
                envelope.id,
                len(result.delivered),
                result.slave,
            )
        if result.failed:
            await self._bounce(envelope, list(result.failed), data)
        if result.delayed:
            await self._bounce(envelope, list(result.delayed), data, dsn.DELAYED)

    async def _sweep(self, now: int) -> None:
        """Bounce the messages past the queue lifetime whose slave never got to try them."""
        for queue_id in self.queue.expired(now):
            async with self._lock(queue_id):
                try:
                    envelope, data = await self.spool.read_message(queue_id)
                except (CorruptMessage, OSError):
                    continue
                result = expire(envelope, now, self.queue.policy)
                if result is not None:
                    self.queue.apply(result)
                    await self._settle(result, data)

    async def _finish(self, envelope: Envelope) -> None:
        """A message with nothing left to deliver: gone from the spool, once its shadow copy
        is dropped (until then its file stays, so a restart still knows to drop it)."""
        if envelope.copy_at and self.links is not None:
            try:
                await self.links.call(envelope.copy_at, {"op": "drop", "ids": [envelope.id]})
            except ShadowError:
                await self.spool.update(envelope)
                self._undropped.setdefault(envelope.copy_at, set()).add(envelope.id)
                return
        await self.spool.remove(envelope.id)

    # --- shadow copies -------------------------------------------------------------------------

    async def hold(self, origin: str, copies: list[tuple[Envelope, bytes]]) -> list[str | None]:
        """Keep the shadow copies of `origin`'s messages, durably and in one write, before the
        answer; for each, None once it is kept (a copy sent again after a lost answer: the first
        one stands) or why it is not. Raises OSError (none was kept)."""
        results: list[str | None] = [None] * len(copies)
        fresh: list[tuple[Envelope, bytes]] = []
        ids: set[str] = set()
        for index, (envelope, data) in enumerate(copies):
            if envelope.id in self._holding or envelope.id in ids:
                results[index] = "a copy of this message is being stored already"
            elif envelope.id not in self.queue:
                fresh.append((attrs.evolve(envelope, shadow=True, origin=origin, copy_at=""), data))
                ids.add(envelope.id)
        if not fresh:
            return results
        self._holding |= ids
        try:
            for envelope in await self.spool.store_copies(fresh):
                self.queue.add(envelope)
        finally:
            self._holding -= ids
        return results

    async def drop(self, origin: str, ids: list[str]) -> None:
        """`origin` delivered these: forget their shadow copies here."""
        held = set(self.queue.shadows(origin))
        for queue_id in ids:
            if queue_id in held:
                async with self._lock(queue_id):
                    self.queue.remove(queue_id)
                    await self.spool.remove(queue_id)

    def taken_from(self, origin: str) -> list[str]:
        """Ids of `origin`'s messages this master took over."""
        return sorted(self.taken.taken.get(origin, ())) if self.taken is not None else []

    async def _shadow_round(self) -> None:
        """Take over the copies of owners dead too long, confirm held-back messages with their
        holders, and tell holders about deliveries they have not heard of."""
        try:
            now = trio.current_time()
            for origin in self.queue.shadow_origins():
                if self._dead_for(origin, now) >= self.takeover_after:
                    await self._take_over(origin)
            for holder in list(self._unconfirmed):
                await self._confirm(holder, now)
            for holder, ids in list(self._undropped.items()):
                await self._drop_at(holder, ids)
        finally:
            self._busy.discard("shadows")

    def _dead_for(self, name: str, now: float) -> float:
        """How long master `name` has been seen dead. One this node does not know yet (it may
        still be joining the cluster) counts only after UNKNOWN_GRACE from this runner's start."""
        assert self.links is not None
        alive = self.links.alive(name)
        if alive:
            self._down_since.pop(name, None)
            return 0.0
        since = self._down_since.setdefault(name, now)
        if alive is None and now - self._started < UNKNOWN_GRACE:
            return 0.0
        return now - since

    async def _take_over(self, origin: str) -> None:
        ids = self.queue.shadows(origin)
        if self.taken is not None:
            await self.taken.add(origin, ids)
        for queue_id in ids:
            async with self._lock(queue_id):
                try:
                    envelope = await self.spool.read_envelope(queue_id)
                except (CorruptMessage, OSError):
                    continue
                envelope = attrs.evolve(envelope, shadow=False, copy_at="")
                await self.spool.update(envelope)
                self.queue.add(envelope)
        self._count("taken_over", len(ids))
        log.warning("master %s stayed dead: this master delivers its %d queued message(s) now", origin, len(ids))
        self._wake.set()

    async def _confirm(self, holder: str, now: float) -> None:
        """Release the messages held back for `holder` once it says which it took over (or
        once it has been dead long enough that it can hold none it would deliver)."""
        assert self.links is not None
        held = self._unconfirmed[holder]
        if self.links.alive(holder):
            try:
                taken = set((await self.links.call(holder, {"op": "taken"})).get("ids", []))
            except ShadowError:
                return
        elif self._dead_for(holder, now) >= self.takeover_after:
            taken = set()
        else:
            return
        if taken:
            log.warning("%d queued message(s) were taken over by %s while this master was dead", len(taken), holder)
        for envelope in held:
            if envelope.id in taken:
                await self.spool.remove(envelope.id)
            else:
                self.queue.add(envelope)
        del self._unconfirmed[holder]
        self._wake.set()

    async def _drop_at(self, holder: str, ids: set[str]) -> None:
        assert self.links is not None
        done = sorted(ids)[:MAX_IDS]
        gone = self.links.alive(holder) is None and self._dead_for(holder, trio.current_time()) >= self.takeover_after
        if not gone:  # tell it; one no longer in the cluster holds nothing to drop
            try:
                await self.links.call(holder, {"op": "drop", "ids": done})
            except ShadowError:
                return
        for queue_id in done:
            await self.spool.remove(queue_id)
            ids.discard(queue_id)
        if not ids:
            del self._undropped[holder]

    def _lock(self, queue_id: str) -> _HeldLock:
        return _HeldLock(self._locks, queue_id)

    # --- operators' controls (the admin API) ---------------------------------------------------

    async def listing(self, slave: str | None, limit: int) -> tuple[list[Queued], int]:
        """The first `limit` messages queued (at `slave`, when given) by arrival, and how many
        more there are. A message delivered while the list is read is left out."""
        if slave is None:
            ids = {entry.id for name in self.queue.slaves() for entry in self.queue.entries(name)}
        else:
            ids = {entry.id for entry in self.queue.entries(slave)}
        shown = heapq.nsmallest(limit, ids)  # ids sort by arrival
        found = []
        for queue_id in shown:
            try:
                envelope = await self.spool.read_envelope(queue_id)
            except (CorruptMessage, OSError):
                continue  # gone since, or moved aside at its next attempt
            entries = self.queue.held(queue_id)
            if slave is not None:
                entries = {slave: entries[slave]} if slave in entries else {}
            if entries:
                found.append(Queued(envelope, entries))
        return found, len(ids) - len(shown)

    async def message(self, queue_id: str) -> Queued | None:
        """The queued message `queue_id` (a shadow copy too), None when there is none. Raises
        CorruptMessage for a message whose files cannot be read."""
        if queue_id not in self.queue:
            return None
        try:
            envelope = await self.spool.read_envelope(queue_id)
        except FileNotFoundError:
            return None
        return Queued(envelope, self.queue.held(queue_id))

    def flush(self, slave: str | None = None) -> int:
        """Makes the waiting messages at `slave` (every slave: None) due now and wakes the
        delivery loop; returns how many (a message waiting at two slaves counts twice)."""
        now = wall_ms()
        flushed = sum(self.queue.kick(name, now) for name in ([slave] if slave else self.queue.slaves()))
        if flushed:
            log.info("queue flushed%s: %d message(s) due now", f" for slave {slave}" if slave else "", flushed)
        self._wake.set()
        return flushed

    async def retry(self, queue_id: str) -> bool:
        """Makes message `queue_id` due now at each of its slaves and wakes the delivery loop;
        False when it is not queued here. Raises Busy while it is being delivered or when this
        master holds only a shadow copy. Like a flush, it leaves the times on disk alone."""
        async with self._lock(queue_id):
            entries = self._owned(queue_id)
            if not entries:
                return False
            try:
                envelope = await self.spool.read_envelope(queue_id)
            except FileNotFoundError:
                return False
            if not self._owned(queue_id):  # the loop may have taken it meanwhile
                return False
            now = wall_ms()
            due = [attrs.evolve(r, next_attempt_ms=min(r.next_attempt_ms, now)) if r.queued else r
                   for r in envelope.recipients]  # fmt: skip
            self.queue.add(attrs.evolve(envelope, recipients=due))
        log.info("queued message %s due now (retry asked)", queue_id)
        self._wake.set()
        return True

    async def delete(self, queue_id: str, by: str) -> bool:
        """Removes message `queue_id` (readable or not) from the index and the spool, no notice
        sent to anyone, and logs that `by` did; False when it is not queued here.
        Raises Busy while it is being delivered (a delete never races a delivery: both hold
        the message's lock) or when this master holds only a shadow copy."""
        self._owned(queue_id)  # refuse at once rather than wait for a delivery under way
        async with self._lock(queue_id):
            if not self._owned(queue_id):
                return False
            try:
                envelope = await self.spool.read_envelope(queue_id)
            except (CorruptMessage, FileNotFoundError):
                envelope = None
            self.queue.remove(queue_id)
            await self.spool.remove(queue_id)
        if envelope is None:
            log.warning("queued message %s (unreadable) deleted by %s", queue_id, by)
        else:
            log.warning("queued message %s from <%s> to %s deleted by %s, undelivered", queue_id, envelope.sender,
                        ", ".join(f"<{r.address}>" for r in envelope.queued()), by)  # fmt: skip
        return True

    def _owned(self, queue_id: str) -> dict[str, Entry]:
        """The entries of a message this master delivers; raises Busy for one in flight or a
        shadow copy."""
        entries = self.queue.held(queue_id)
        if any(entry.in_flight for entry in entries.values()):
            raise Busy(f"message {queue_id} is being delivered now; try again when the attempt is over")
        if not entries and queue_id in self.queue:
            raise Busy(f"message {queue_id} is a shadow copy held for another master, which delivers it")
        return entries

    # --- bounces -----------------------------------------------------------------------------

    async def _bounce(
        self,
        envelope: Envelope,
        recipients: list[Recipient],
        data: bytes,
        action: str = dsn.FAILED,
    ) -> None:
        """Tell the sender about `recipients` (failed, or delayed): a DSN kept in the queue for
        the sender's slave, or for the smarthost when the sender is outside the cluster (without
        a smarthost: logged and counted as bounces_unsent). Never to the null sender."""
        notification = dsn.build(envelope, recipients, data, hostname=self.hostname, now_ms=wall_ms(), action=action,
                                 retry_until_ms=envelope.received_ms + self.queue.policy.lifetime_ms)  # fmt: skip
        if notification is None:
            return
        route, _ = resolve(self.router, notification.recipient)
        slave = route.slave
        if isinstance(route, NoRoute) and route.reason == UNKNOWN_DOMAIN and self.smarthost is not None:
            slave = SMARTHOST
        if not slave:
            self._count("bounces_unsent")
            log.warning("%s notice for message %s to <%s> not sent: the sender is outside the cluster",
                        action, envelope.id, notification.recipient)  # fmt: skip
            return
        now = wall_ms()
        notice = Envelope(self.new_id(), "", [Recipient(notification.recipient, slave, next_attempt_ms=now)], now,
                          origin=self.origin)  # fmt: skip
        try:
            notice = await self.spool.store(notice, notification.data)
        except OSError as exc:
            log.error("%s notice for message %s not queued: %s", action, envelope.id, exc)
            return
        self.queue.add(notice)
        self._count("bounces" if action == dsn.FAILED else "delay_warnings")
        self._wake.set()


class Busy(MeshmailError):
    """A queued message that cannot be changed now; str() says why."""


@attrs.frozen
class Queued:
    """A queued message as operators see it: its newest envelope and its index entries by
    slave (none for a shadow copy)."""

    envelope: Envelope
    entries: Mapping[str, Entry]

    @property
    def in_flight(self) -> bool:
        return any(entry.in_flight for entry in self.entries.values())


@attrs.define
class _HeldLock:
    """A lock per queue id, dropped when nobody holds or waits for it. Any task may release
    it (a delivery hands its message's lock to the task that settles it)."""

    locks: dict[str, trio.Semaphore]
    key: str

    async def acquire(self) -> None:
        await self.locks.setdefault(self.key, trio.Semaphore(1, max_value=1)).acquire()

    def release(self) -> None:
        lock = self.locks[self.key]
        lock.release()
        if not lock.statistics().tasks_waiting:
            del self.locks[self.key]

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def _transaction(sender: MailFrom, addresses: Iterable[str], size: int) -> Transaction:
    return Transaction(
        sender.reverse_path,
        tuple(addresses),
        size=size,
        body="8BITMIME",
        smtputf8=sender.smtputf8,
    )


def _record(address: str, route: Route | NoRoute, reply: Reply | None, now: int, queue: Queue) -> Recipient:
    """The spool record of one recipient after the in-line attempt (`reply`; None: not tried)."""
    if reply is not None and reply.positive:
        return Recipient(address, route.slave, RecipientState.DELIVERED, 1, 0, reply)
    if reply is not None and reply.code >= 500:
        return Recipient(address, route.slave, RecipientState.FAILED, 1, 0, reply)
    attempts = 0 if reply is None else 1
    return Recipient(
        address,
        route.slave,
        attempts=attempts,
        next_attempt_ms=now + queue.policy.delay_ms(max(attempts, 1), queue.rng),
        reply=reply,
    )
