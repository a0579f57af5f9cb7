"""The queue index and its scheduling at fixed times: backoff with jitter, due and kick,
what replies do to recipients, expiry and the delay warning, the /status figures, and an
index rebuilt from a rescan of the spool."""

from __future__ import annotations

import random

import attrs
import pytest

from meshmail.mta.queue import (
    DAY_MS,
    EXPIRED,
    HOUR_MS,
    MINUTE_MS,
    Queue,
    RetryPolicy,
    SlaveStats,
    expire,
    settle,
)
from meshmail.mta.spool import Envelope, Recipient, RecipientState, Spool, new_queue_id
from meshmail.protocols.smtp import Reply

T0 = 1_700_000_000_000
OK = Reply(250, "2.0.0", "Ok")
BUSY = Reply(451, "4.3.0", "try later")
UNKNOWN = Reply(550, "5.1.1", "no such user")
UNREACHABLE = Reply(451, "4.4.1", "slave unreachable")


def message(number: int = 0, *, slaves=("s1",), size: int = 1000, received_ms: int = T0, **changes) -> Envelope:
    recipients = [Recipient(f"u{i}@{slave}.example", slave) for i, slave in enumerate(slaves)]
    return Envelope(
        id=new_queue_id(received_ms, number),
        sender="alice@example.net",
        recipients=recipients,
        received_ms=received_ms,
        size=size,
        **changes,
    )


def queue(**policy) -> Queue:
    return Queue(RetryPolicy(**policy), random.Random(1))


@pytest.mark.parametrize(
    ("attempts", "nominal"),
    [(1, MINUTE_MS), (2, 2 * MINUTE_MS), (3, 4 * MINUTE_MS), (6, 32 * MINUTE_MS), (7, HOUR_MS), (500, HOUR_MS)],
)
def test_the_nominal_delay_doubles_from_a_minute_up_to_an_hour(attempts, nominal):
    assert RetryPolicy().nominal_ms(attempts) == nominal


def test_jitter_stays_within_a_fifth_below_the_nominal_delay_and_spreads():
    policy, rng = RetryPolicy(), random.Random(3)
    for attempts in (1, 4, 9):
        nominal = policy.nominal_ms(attempts)
        draws = [policy.delay_ms(attempts, rng) for _ in range(2000)]
        assert min(draws) >= nominal * 0.8 and max(draws) <= nominal
        assert max(draws) - min(draws) > nominal * 0.15  # spread, not one value


def test_a_shorter_policy_is_taken_as_given_and_a_cap_below_the_base_refused():
    policy = RetryPolicy(base_ms=1000, cap_ms=4000)
    assert [policy.nominal_ms(n) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 4000]
    with pytest.raises(ValueError):
        RetryPolicy(base_ms=MINUTE_MS, cap_ms=1000)


def test_due_hands_out_each_entry_once_until_it_is_settled():
    q = queue()
    first, second = message(1), message(2)
    q.load([first, attrs.evolve(second, recipients=[attrs.evolve(second.recipients[0], next_attempt_ms=T0 + 5000)])])
    assert [e.id for e in q.due("s1", T0)] == [first.id]
    assert q.due("s1", T0 + 10_000) == [q.entries("s1")[1]]  # the first is in flight
    assert q.due("s1", T0 + 10_000) == []
    assert q.next_due_ms("s1") is None
    result = q.settle(first, "s1", {}, T0 + 10_000, fallback=UNREACHABLE)
    assert T0 + 10_000 + 48_000 <= result.retry_ms <= T0 + 10_000 + MINUTE_MS
    assert q.next_due_ms("s1") == result.retry_ms
    assert q.due("s1", result.retry_ms - 1) == []
    assert [e.id for e in q.due("s1", result.retry_ms)] == [first.id]
    assert q.due("s2", T0) == [] and q.next_due_ms("s2") is None


def test_due_respects_a_limit_and_release_puts_an_entry_back():
    q = queue()
    q.load(message(n) for n in range(5))
    taken = q.due("s1", T0, limit=2)
    assert len(taken) == 2
    q.release(taken[0].id, "s1")
    assert [e.id for e in q.due("s1", T0)] == sorted([taken[0].id, *(e.id for e in q.entries("s1")[2:])])


def test_kick_makes_a_slaves_waiting_entries_due_now_and_leaves_others_alone():
    q = queue()
    late = [message(n, slaves=("s1",)) for n in range(3)] + [message(9, slaves=("s2",))]
    for env in late:
        env = attrs.evolve(env, recipients=[attrs.evolve(r, next_attempt_ms=T0 + HOUR_MS) for r in env.recipients])
        q.add(env)
    assert q.due("s1", T0 + MINUTE_MS) == []
    assert q.kick("s1", T0 + MINUTE_MS) == 3
    assert len(q.due("s1", T0 + MINUTE_MS)) == 3
    assert q.due("s2", T0 + MINUTE_MS) == []
    assert q.kick("s1", T0 + MINUTE_MS) == 0  # all three in flight: a kick does not hand them out twice


def test_replies_deliver_fail_and_retry_recipients_of_one_slave():
    env = attrs.evolve(
        message(),
        recipients=[Recipient("a@x.example", "s1"), Recipient("b@x.example", "s1"), Recipient("c@x.example", "s1")],
    )
    result = settle(
        env, "s1", {"a@x.example": OK, "b@x.example": UNKNOWN, "c@x.example": BUSY}, T0, RetryPolicy(), random.Random()
    )
    a, b, c = result.envelope.recipients
    assert (a.state, b.state, c.state) == (RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.QUEUED)
    assert (a.reply, b.reply, c.reply) == (OK, UNKNOWN, BUSY)
    assert a.attempts == b.attempts == c.attempts == 1
    assert result.delivered == (a,) and result.failed == (b,) and not result.expired
    assert not result.done and result.retry_ms == c.next_attempt_ms
    again = settle(result.envelope, "s1", {"c@x.example": OK}, T0 + MINUTE_MS, RetryPolicy(), random.Random())
    assert again.done and again.delivered[0].attempts == 2
    with pytest.raises(KeyError):
        settle(env, "s1", {"a@x.example": OK}, T0, RetryPolicy(), random.Random())


def test_a_message_for_two_slaves_is_queued_at_each_until_both_took_it():
    q = queue()
    env = message(slaves=("s1", "s2"), size=700)
    q.add(env)
    assert q.stats(T0).slaves == {"s1": SlaveStats(1, 700), "s2": SlaveStats(1, 700)}
    [entry] = q.due("s1", T0)
    first = q.settle(env, "s1", {env.recipients[0].address: OK}, T0)
    assert not first.done and q.slaves() == ["s2"]
    second = q.settle(first.envelope, "s2", {}, T0, fallback=BUSY)
    assert not second.done and q.entries("s2")[0].attempts == 1
    third = q.settle(second.envelope, "s2", {env.recipients[1].address: OK}, T0 + 2 * MINUTE_MS)
    assert third.done and env.id not in q and q.slaves() == []


def test_a_temporary_failure_past_the_lifetime_fails_as_expired():
    policy = RetryPolicy(lifetime_ms=5 * DAY_MS)
    env = message()
    just_before = settle(env, "s1", {}, T0 + 5 * DAY_MS - 1, policy, random.Random(), fallback=BUSY)
    assert not just_before.failed and not just_before.expired
    after = settle(just_before.envelope, "s1", {}, T0 + 5 * DAY_MS, policy, random.Random(), fallback=BUSY)
    assert after.expired and after.done
    assert after.failed[0].reply == BUSY and after.failed[0].state is RecipientState.FAILED


def test_the_expiry_sweep_fails_what_was_never_tried_again():
    q = queue(lifetime_ms=DAY_MS)
    old, young = message(1), message(2, received_ms=T0 + HOUR_MS)
    tried = attrs.evolve(old, recipients=[attrs.evolve(old.recipients[0], reply=BUSY, attempts=3)])
    q.load([tried, young])
    assert q.expired(T0 + DAY_MS - 1) == []
    assert q.expired(T0 + DAY_MS) == [old.id]
    assert expire(young, T0 + DAY_MS, q.policy) is None
    result = expire(tried, T0 + DAY_MS, q.policy)
    assert result.expired and result.done and result.failed[0].reply == BUSY
    assert expire(young, T0 + HOUR_MS + DAY_MS, q.policy).failed[0].reply == EXPIRED
    q.apply(result)
    assert old.id not in q and q.expired(T0 + 2 * DAY_MS) == [young.id]


def test_a_delay_warning_comes_once_after_four_hours_and_never_to_the_null_sender():
    policy, rng = RetryPolicy(), random.Random()
    env = message()
    early = settle(env, "s1", {}, T0 + 4 * HOUR_MS - 1, policy, rng, fallback=BUSY)
    assert early.delayed == ()
    warned = settle(early.envelope, "s1", {}, T0 + 4 * HOUR_MS, policy, rng, fallback=BUSY)
    assert [r.address for r in warned.delayed] == [env.recipients[0].address] and warned.envelope.warned
    later = settle(warned.envelope, "s1", {}, T0 + 5 * HOUR_MS, policy, rng, fallback=BUSY)
    assert later.delayed == ()
    bounce = attrs.evolve(env, sender="")
    assert settle(bounce, "s1", {}, T0 + 4 * HOUR_MS, policy, rng, fallback=BUSY).delayed == ()
    quiet = RetryPolicy(warn_after_ms=None)
    assert settle(env, "s1", {}, T0 + 4 * HOUR_MS, quiet, rng, fallback=BUSY).delayed == ()


def test_stats_count_messages_bytes_the_oldest_and_shadows():
    q = queue()
    one, two = message(1, size=100), message(2, slaves=("s1", "s2"), size=200, received_ms=T0 - 10_000)
    shadow = message(3, slaves=("s2",), size=400, origin="m2", shadow=True)
    q.load([one, two, shadow])
    stats = q.stats(T0 + 5000)
    assert stats.slaves == {"s1": SlaveStats(2, 300), "s2": SlaveStats(1, 200)}
    assert stats.messages == 2 and stats.oldest_age_ms == 15_000
    assert (stats.shadows, stats.shadow_bytes) == (1, 400)
    assert q.shadows("m2") == [shadow.id]
    assert [e.id for e in q.due("s2", T0 + DAY_MS)] == [two.id]  # a shadow is never due here
    q.remove(two.id)
    q.remove(shadow.id)
    assert q.stats(T0).slaves == {"s1": SlaveStats(1, 100)} and q.stats(T0).shadows == 0


async def test_the_index_is_rebuilt_from_a_rescan_of_the_spool(tmp_path):
    spool = Spool.open(tmp_path / "queue")
    q = queue()
    stored = [await spool.store(message(n, slaves=("s1", "s2")[: 1 + n % 2]), b"x" * (10 + n)) for n in range(6)]
    for env in stored:
        q.add(env)
    [entry] = q.due("s1", T0, limit=1)
    env, _ = await spool.read_message(entry.id)
    result = q.settle(env, "s1", {}, T0, fallback=BUSY)
    await spool.update(result.envelope)
    spool.close()

    spool = Spool.open(tmp_path / "queue")
    rebuilt = queue()
    rebuilt.load(spool.scan().envelopes)
    assert rebuilt.stats(T0) == q.stats(T0)
    assert {e.id: (e.next_ms, e.attempts) for e in rebuilt.entries("s1")} == {
        e.id: (e.next_ms, e.attempts) for e in q.entries("s1")
    }
    assert entry.id not in [e.id for e in rebuilt.due("s1", T0)]
    spool.close()


def scanned_stats(q: Queue, held: dict[str, Envelope], now_ms: int) -> tuple:
    """The /status figures by a scan of the index (the messages queued at its slaves) and of
    the shadow copies the test added."""
    queued = {entry.id: entry for slave in q.slaves() for entry in q.entries(slave)}
    shadows = [env for env in held.values() if env.shadow]
    assert sorted(q.shadows("m2")) == sorted(env.id for env in shadows)
    oldest = min([now_ms, *(entry.received_ms for entry in queued.values())])
    return len(queued), now_ms - oldest, len(shadows), sum(env.size for env in shadows)


def test_stats_kept_as_the_index_changes_match_a_scan_of_it():
    """Adds (at one slave or two, shadows, again for a message queued already), removals,
    settlements (part of a message delivered, some of it retried) in random order: the counts
    stats() keeps always equal what a scan of the whole index finds."""
    rng = random.Random(7)
    q = queue()
    held: dict[str, Envelope] = {}
    for step in range(3000):
        now = T0 + step * 1000
        action = rng.random()
        if action < 0.45 or not held:
            slaves = rng.choice([("s1",), ("s2",), ("s1", "s2"), ("s2", "s3", "s1")])
            shadow = rng.random() < 0.15
            env = message(step, slaves=slaves, size=rng.randrange(1, 5000),
                          received_ms=T0 + rng.randrange(-10**6, step * 1000 + 1),
                          **({"origin": "m2", "shadow": True} if shadow else {}))  # fmt: skip
            if held and rng.random() < 0.1:  # a message indexed again, as a retry's update does
                env = rng.choice(list(held.values()))
            q.add(env)
            held[env.id] = env
        elif action < 0.7:
            q.remove(held.pop(rng.choice(list(held))).id)
        else:
            env = rng.choice(list(held.values()))
            if env.shadow or not env.queued():
                continue
            slave = rng.choice(env.slaves())
            replies = {r.address: rng.choice([OK, BUSY, UNKNOWN]) for r in env.queued(slave)}
            result = q.settle(env, slave, replies, now)
            if result.done:
                del held[env.id]
            else:
                held[env.id] = result.envelope
        stats = q.stats(now)
        kept = (stats.messages, stats.oldest_age_ms, stats.shadows, stats.shadow_bytes)
        assert kept == scanned_stats(q, held, now), step
    assert q.stats(T0 + 10**9).messages == len([e for e in held.values() if not e.shadow])
