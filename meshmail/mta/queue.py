"""The in-memory index of the spool: per slave, a small record for each queued message (never
its bytes), which are due, and what the replies of an attempt mean for a message (delivered,
retried with backoff and jitter, bounced, expired, a delay warning due).

Pure: no I/O and no trio. Times are Unix milliseconds passed in (they are persisted in the
envelopes), randomness comes from the caller's random.Random.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Mapping

import attrs

from ..protocols.smtp import Reply
from .spool import Envelope, Recipient, RecipientState

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
#: A retry comes between (1 - JITTER) and 1 times its nominal delay, so messages queued
#: together do not all retry in the same instant.
JITTER = 0.2
#: The status of recipients still queued when their message expires (RFC 3463: delivery
#: time expired), when the slave never gave a reply.
EXPIRED = Reply(451, "4.4.7", "Delivery time expired")


@attrs.frozen
class RetryPolicy:
    """How long messages are retried: nominal delays double from `base_ms` up to `cap_ms`;
    a message still queued `lifetime_ms` after it arrived bounces; a delay warning goes out
    once after `warn_after_ms` (None: never)."""

    base_ms: int = attrs.field(default=MINUTE_MS, validator=attrs.validators.gt(0))
    cap_ms: int = attrs.field(default=HOUR_MS)
    lifetime_ms: int = attrs.field(default=5 * DAY_MS, validator=attrs.validators.gt(0))
    warn_after_ms: int | None = 4 * HOUR_MS

    @cap_ms.validator
    def _check_cap(self, _attribute: attrs.Attribute, value: int) -> None:
        if value < self.base_ms:
            raise ValueError("the retry cap is shorter than the base delay")

    def nominal_ms(self, attempts: int) -> int:
        """The delay before the next try after `attempts` (>= 1) failed ones, without jitter."""
        return min(self.cap_ms, self.base_ms << min(max(attempts, 1) - 1, 40))

    def delay_ms(self, attempts: int, rng: random.Random) -> int:
        """The nominal delay less up to JITTER of it, drawn from `rng`."""
        nominal = self.nominal_ms(attempts)
        return rng.randint(nominal - int(nominal * JITTER), nominal)


@attrs.define(slots=True, weakref_slot=False, eq=False)
class Entry:
    """One message at one slave, as small as it can be: 100,000 of these are the whole index."""

    id: str
    size: int
    received_ms: int
    next_ms: int
    attempts: int
    recipients: int
    in_flight: bool = False


@attrs.frozen
class Settlement:
    """What an attempt at one slave changed: the new envelope (to store with Spool.update, or
    Spool.remove when `done`), the recipients delivered and failed (a DSN for those), whether
    they failed by expiry, and the recipients to name in a delay warning (empty: none due)."""

    envelope: Envelope
    slave: str
    delivered: tuple[Recipient, ...] = ()
    failed: tuple[Recipient, ...] = ()
    expired: bool = False
    delayed: tuple[Recipient, ...] = ()

    @property
    def done(self) -> bool:
        """No recipient is queued any more, at any slave."""
        return not self.envelope.queued()

    @property
    def retry_ms(self) -> int | None:
        """When the slave's recipients are due again; None when none is queued there."""
        queued = self.envelope.queued(self.slave)
        return min(r.next_attempt_ms for r in queued) if queued else None


def settle(
    envelope: Envelope,
    slave: str,
    replies: Mapping[str, Reply],
    now_ms: int,
    policy: RetryPolicy,
    rng: random.Random,
    *,
    fallback: Reply | None = None,
) -> Settlement:
    """Applies the replies of one attempt at `slave` to the recipients queued there: 2xx is
    delivered, 5xx failed, 4xx retried after policy.delay_ms (one draw for all of them, so a
    message goes to a slave in one transaction). Recipients missing from `replies` get
    `fallback` (the reply for a slave that could not be reached); without it they raise
    KeyError. Past the lifetime, a 4xx fails as expired instead. Once the message is older
    than the policy's warn_after, the first retry marks it warned and names the recipients
    still queued in `delayed` (never for a null sender)."""
    expired = now_ms - envelope.received_ms >= policy.lifetime_ms
    attempts = 1 + max((r.attempts for r in envelope.queued(slave)), default=0)
    retry_at = now_ms + policy.delay_ms(attempts, rng)
    recipients, delivered, failed = [], [], []
    for recipient in envelope.recipients:
        if recipient.queued and recipient.slave == slave:
            reply = replies.get(recipient.address, fallback)
            if reply is None:
                raise KeyError(f"no reply for {recipient.address}")
            recipient = _after(recipient, reply, attempts, retry_at, expired)
            if recipient.state is RecipientState.DELIVERED:
                delivered.append(recipient)
            elif recipient.state is RecipientState.FAILED:
                failed.append(recipient)
        recipients.append(recipient)
    envelope = attrs.evolve(envelope, recipients=recipients)
    delayed: tuple[Recipient, ...] = ()
    if (
        policy.warn_after_ms is not None
        and not envelope.warned
        and envelope.sender
        and envelope.queued(slave)
        and now_ms - envelope.received_ms >= policy.warn_after_ms
    ):
        delayed = envelope.queued()
        envelope = attrs.evolve(envelope, warned=True)
    expired_failures = expired and any(r.reply is None or r.reply.temporary for r in failed)
    return Settlement(envelope, slave, tuple(delivered), tuple(failed), expired_failures, delayed)


def _after(recipient: Recipient, reply: Reply, attempts: int, retry_at: int, expired: bool) -> Recipient:
    if reply.positive:
        state, retry_at = RecipientState.DELIVERED, 0
    elif reply.temporary and not expired:
        state = RecipientState.QUEUED
    else:
        state, retry_at = RecipientState.FAILED, 0
    return attrs.evolve(recipient, state=state, attempts=attempts, next_attempt_ms=retry_at, reply=reply)


def expire(envelope: Envelope, now_ms: int, policy: RetryPolicy) -> Settlement | None:
    """Fails every queued recipient of a message past its lifetime, keeping each one's last
    reply (EXPIRED when it never had one); None while the message is younger. For the sweep
    of messages whose slave is never tried again (Queue.expired)."""
    if now_ms - envelope.received_ms < policy.lifetime_ms:
        return None
    failed = [
        attrs.evolve(r, state=RecipientState.FAILED, next_attempt_ms=0, reply=r.reply or EXPIRED)
        for r in envelope.queued()
    ]
    by_address = {(r.address, r.slave): r for r in failed}
    recipients = [by_address.get((r.address, r.slave), r) if r.queued else r for r in envelope.recipients]
    slaves = envelope.slaves()
    return Settlement(
        attrs.evolve(envelope, recipients=recipients),
        slaves[0] if slaves else "",
        failed=tuple(failed),
        expired=True,
    )


@attrs.frozen
class SlaveStats:
    messages: int
    bytes: int


@attrs.frozen
class QueueStats:
    """The figures for /status: queued messages and bytes per slave (a message with recipients
    at two slaves counts at both), distinct messages, the age of the oldest, shadow copies held."""

    slaves: dict[str, SlaveStats]
    messages: int
    oldest_age_ms: int
    shadows: int
    shadow_bytes: int


@attrs.define(eq=False)
class _SlaveQueue:
    entries: dict[str, Entry] = attrs.field(factory=dict)
    # (next_ms, id) of entries waiting; an item whose entry is gone, in flight or rescheduled
    # is skipped when it comes up (cheaper than removing it from the middle of the heap).
    heap: list[tuple[int, str]] = attrs.field(factory=list)
    bytes: int = 0

    def live(self, item: tuple[int, str]) -> Entry | None:
        entry = self.entries.get(item[1])
        if entry is None or entry.in_flight or entry.next_ms != item[0]:
            return None
        return entry


class Queue:
    """The index: per slave, an Entry for each message with recipients queued there, and the
    shadow copies this master holds for other masters (by owner; never due here).

    A delivery loop takes due entries (`due`), which are then in flight until `settle` (or
    `release`) puts them back or drops them; `kick` makes a slave's entries due at once.
    """

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self._slaves: dict[str, _SlaveQueue] = {}
        self._shadows: dict[str, dict[str, Entry]] = {}
        # Kept as the index changes, so that stats() does not scan it (/status and /metrics
        # ask often; a scan of 100,000 entries held the event loop some 20 ms): the entries
        # beyond a message's first (it is queued at several slaves), the bytes of the shadow
        # copies, and when the oldest queued message came (None: not known, scanned for once).
        self._copies = 0
        self._shadow_bytes = 0
        self._oldest: int | None = None

    def load(self, envelopes: Iterable[Envelope]) -> None:
        """Adds the envelopes of a rescan."""
        for envelope in envelopes:
            self.add(envelope)

    def add(self, envelope: Envelope) -> None:
        """Indexes a stored message (again, when it was already: its records are replaced)."""
        self.remove(envelope.id)
        if envelope.shadow:
            entry = Entry(
                envelope.id,
                envelope.size,
                envelope.received_ms,
                0,
                0,
                len(envelope.queued()),
            )
            self._shadows.setdefault(envelope.origin, {})[envelope.id] = entry
            self._shadow_bytes += entry.size
            return
        slaves = envelope.slaves()
        if slaves:
            self._copies += len(slaves) - 1
            if self._oldest is not None:
                self._oldest = min(self._oldest, envelope.received_ms)
        for slave in slaves:
            queued = envelope.queued(slave)
            entry = Entry(
                envelope.id,
                envelope.size,
                envelope.received_ms,
                min(r.next_attempt_ms for r in queued),
                max(r.attempts for r in queued),
                len(queued),
            )
            self._insert(slave, entry)

    def _insert(self, slave: str, entry: Entry) -> None:
        queue = self._slaves.setdefault(slave, _SlaveQueue())
        queue.entries[entry.id] = entry
        queue.bytes += entry.size
        heapq.heappush(queue.heap, (entry.next_ms, entry.id))

    def remove(self, queue_id: str) -> None:
        """Forgets a message everywhere (delivered, deleted, moved to failed/, a shadow dropped)."""
        for slave, queue in list(self._slaves.items()):
            entry = queue.entries.get(queue_id)
            if entry is not None:
                self._drop(slave, queue, entry)
        for origin, shadows in list(self._shadows.items()):
            entry = shadows.pop(queue_id, None)
            if entry is not None:
                self._shadow_bytes -= entry.size
                if not shadows:
                    del self._shadows[origin]

    def _drop(self, slave: str, queue: _SlaveQueue, entry: Entry) -> None:
        """Takes `entry` out of `slave`'s queue (its heap item is skipped when it comes up)."""
        del queue.entries[entry.id]
        queue.bytes -= entry.size
        if not queue.entries:
            del self._slaves[slave]
        if any(entry.id in other.entries for other in self._slaves.values()):
            self._copies -= 1
        elif self._oldest is not None and entry.received_ms <= self._oldest:
            self._oldest = None  # the oldest may have left: the next stats() looks again

    def __contains__(self, queue_id: str) -> bool:
        return any(queue_id in q.entries for q in self._slaves.values()) or any(
            queue_id in s for s in self._shadows.values()
        )

    def slaves(self) -> list[str]:
        """The slaves with queued messages."""
        return list(self._slaves)

    def entries(self, slave: str) -> list[Entry]:
        """The entries at `slave` (for `queue list`)."""
        queue = self._slaves.get(slave)
        return list(queue.entries.values()) if queue else []

    def shadow_origins(self) -> list[str]:
        """The masters whose shadow copies this master holds."""
        return list(self._shadows)

    def held(self, queue_id: str) -> dict[str, Entry]:
        """The entries of message `queue_id` by slave; empty when none is queued here (a
        shadow copy has none)."""
        return {slave: queue.entries[queue_id] for slave, queue in self._slaves.items() if queue_id in queue.entries}

    def shadows(self, origin: str) -> list[str]:
        """The ids of the shadow copies held for master `origin`."""
        return list(self._shadows.get(origin, ()))

    # --- scheduling ---

    def due(self, slave: str, now_ms: int, limit: int | None = None) -> list[Entry]:
        """Takes up to `limit` entries at `slave` due at `now_ms`, earliest first; they are in
        flight (not due again) until settle or release."""
        queue = self._slaves.get(slave)
        taken: list[Entry] = []
        while queue and queue.heap and queue.heap[0][0] <= now_ms and (limit is None or len(taken) < limit):
            entry = queue.live(heapq.heappop(queue.heap))
            if entry is not None:
                entry.in_flight = True
                taken.append(entry)
        return taken

    def next_due_ms(self, slave: str) -> int | None:
        """When the next entry at `slave` is due (maybe in the past); None when none waits."""
        queue = self._slaves.get(slave)
        while queue and queue.heap:
            if queue.live(queue.heap[0]) is not None:
                return queue.heap[0][0]
            heapq.heappop(queue.heap)
        return None

    def kick(self, slave: str, now_ms: int) -> int:
        """Makes every waiting entry at `slave` due at `now_ms` (gossip says it is back);
        returns how many. The times stored in the envelopes are left alone."""
        queue = self._slaves.get(slave)
        if queue is None:
            return 0
        waiting = [entry for entry in queue.entries.values() if not entry.in_flight]
        for entry in waiting:
            entry.next_ms = min(entry.next_ms, now_ms)
        queue.heap = [(entry.next_ms, entry.id) for entry in waiting]
        heapq.heapify(queue.heap)
        return len(waiting)

    def release(self, queue_id: str, slave: str) -> None:
        """Puts an entry taken by `due` back, unchanged (its attempt ended without replies)."""
        queue = self._slaves.get(slave)
        entry = queue.entries.get(queue_id) if queue else None
        if queue is not None and entry is not None and entry.in_flight:
            entry.in_flight = False
            heapq.heappush(queue.heap, (entry.next_ms, entry.id))

    def settle(
        self,
        envelope: Envelope,
        slave: str,
        replies: Mapping[str, Reply],
        now_ms: int,
        *,
        fallback: Reply | None = None,
    ) -> Settlement:
        """`settle` (the function) with this queue's policy and rng; the index follows the
        result. The caller stores the settlement's envelope (or removes the message)."""
        result = settle(envelope, slave, replies, now_ms, self.policy, self.rng, fallback=fallback)
        self.apply(result)
        return result

    def apply(self, result: Settlement) -> None:
        """Brings the index in line with a settlement (or an `expire`)."""
        if result.done:
            self.remove(result.envelope.id)
            return
        queue = self._slaves.get(result.slave)
        entry = queue.entries.get(result.envelope.id) if queue else None
        if queue is None or entry is None:
            return
        queued = result.envelope.queued(result.slave)
        if not queued:
            self._drop(result.slave, queue, entry)
            return
        entry.next_ms = min(r.next_attempt_ms for r in queued)
        entry.attempts = max(r.attempts for r in queued)
        entry.recipients = len(queued)
        entry.in_flight = False
        heapq.heappush(queue.heap, (entry.next_ms, entry.id))

    def expired(self, now_ms: int) -> list[str]:
        """Ids of the messages (not shadows, not in flight) past their lifetime at `now_ms`,
        for a sweep with `expire`. A scan of the index: call it every few minutes, not per due."""
        limit = now_ms - self.policy.lifetime_ms
        found = {
            entry.id
            for queue in self._slaves.values()
            for entry in queue.entries.values()
            if entry.received_ms <= limit and not entry.in_flight
        }
        return sorted(found)

    def stats(self, now_ms: int) -> QueueStats:
        """The figures for /status, from counts kept as the index changes: a look at each
        slave's queue, and a scan for the oldest message only once the one known has left."""
        per_slave = {slave: SlaveStats(len(queue.entries), queue.bytes) for slave, queue in self._slaves.items()}
        if self._oldest is None and self._slaves:
            self._oldest = min(entry.received_ms for queue in self._slaves.values() for entry in queue.entries.values())
        oldest = now_ms if self._oldest is None else min(now_ms, self._oldest)
        return QueueStats(
            slaves=per_slave,
            messages=sum(stats.messages for stats in per_slave.values()) - self._copies,
            oldest_age_ms=now_ms - oldest,
            shadows=sum(len(held) for held in self._shadows.values()),
            shadow_bytes=self._shadow_bytes,
        )
