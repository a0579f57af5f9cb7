"""Hybrid logical clock: send/receive rules, skew refusal, counter bound, restart monotonicity."""

import attrs
import pytest

from meshmail.state.hlc import MAX_LOGICAL, ClockSkewError, HybridClock, Timestamp


class FakeClock:
    """Physical time that a test sets by hand."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def T(wall_ms: int, logical: int, node: str = "a") -> Timestamp:
    return Timestamp(wall_ms, logical, node)


@pytest.mark.parametrize(
    "physical, expected",
    [
        ([100], [T(100, 0)]),
        ([100, 100, 100], [T(100, 0), T(100, 1), T(100, 2)]),
        ([100, 101], [T(100, 0), T(101, 0)]),
        # The physical clock goes back: keep the wall time, count logically.
        ([100, 90, 95, 100, 101], [T(100, 0), T(100, 1), T(100, 2), T(100, 3), T(101, 0)]),
        ([5_000, 0], [T(5_000, 0), T(5_000, 1)]),
    ],
)
def test_now(physical, expected):
    clock = FakeClock(physical[0])
    hlc = HybridClock("a", clock)
    issued = []
    for ms in physical:
        clock.ms = ms
        issued.append(hlc.now())
    assert issued == expected


@pytest.mark.parametrize(
    "state, physical, remote, expected",
    [
        # Our physical clock is ahead of both: it wins, counter resets.
        (T(100, 3), 200, T(150, 7, "b"), T(200, 0)),
        # Remote is ahead: adopt its wall time, one past its counter.
        (T(100, 3), 100, T(150, 7, "b"), T(150, 8)),
        # We are ahead of physical and remote: count on from ours.
        (T(300, 3), 100, T(150, 7, "b"), T(300, 4)),
        # Equal wall times: one past the larger counter.
        (T(150, 3), 100, T(150, 7, "b"), T(150, 8)),
        (T(150, 9), 100, T(150, 7, "b"), T(150, 10)),
        # Remote exactly max_skew ahead is still accepted.
        (T(100, 0), 100, T(60_100, 0, "b"), T(60_100, 1)),
    ],
)
def test_observe(state, physical, remote, expected):
    hlc = HybridClock("a", FakeClock(physical), floor=state)
    assert hlc.observe(remote) == expected
    assert hlc.high_water == expected


def test_observe_refuses_timestamps_too_far_ahead():
    hlc = HybridClock("a", FakeClock(1_000), max_skew_ms=500, floor=T(1_000, 4))
    with pytest.raises(ClockSkewError) as info:
        hlc.observe(T(1_501, 0, "b"))
    assert info.value.ahead_ms == 501
    assert "b" in str(info.value) and "501 ms ahead" in str(info.value)
    assert hlc.high_water == T(1_000, 4)  # never adopted
    assert hlc.now() == T(1_000, 5)


def test_receive_is_after_send():
    """A timestamp issued after receiving a message is greater than the message's."""
    sender = HybridClock("b", FakeClock(10_000))
    receiver = HybridClock("a", FakeClock(9_000))
    sent = sender.now()
    assert receiver.observe(sent) > sent
    assert receiver.now() > sent


def test_logical_counter_is_bounded():
    clock = FakeClock(100)
    hlc = HybridClock("a", clock, floor=T(100, MAX_LOGICAL - 1))
    assert hlc.now() == T(100, MAX_LOGICAL)
    assert hlc.now() == T(101, 0)  # borrows the next millisecond rather than overflowing
    clock.ms = 101
    assert hlc.now() == T(101, 1)


def test_observe_bounds_a_remote_counter_at_the_limit():
    hlc = HybridClock("a", FakeClock(100))
    assert hlc.observe(T(100, MAX_LOGICAL, "b")) == T(101, 0)


def test_restart_from_high_water_is_monotonic():
    clock = FakeClock(1_000)
    hlc = HybridClock("a", clock)
    for _ in range(5):
        last = hlc.now()
    persisted = hlc.high_water
    assert persisted == last
    clock.ms = 10  # the machine comes back with its clock far behind
    restarted = HybridClock("a", clock, floor=persisted)
    assert restarted.now() > persisted


def test_floor_from_another_node_id_still_bounds():
    restarted = HybridClock("a", FakeClock(0), floor=T(500, 2, "zzz"))
    assert restarted.now() == T(500, 3)


def test_ties_are_broken_by_node_id():
    assert T(100, 0, "a") < T(100, 0, "b") < T(100, 1, "a") < T(101, 0, "a")
    assert sorted([T(5, 0, "b"), T(5, 0, "a")]) == [T(5, 0, "a"), T(5, 0, "b")]


@pytest.mark.parametrize(
    "wall_ms, logical, node",
    [
        (-1, 0, "a"),
        (1 << 63, 0, "a"),
        (0, -1, "a"),
        (0, MAX_LOGICAL + 1, "a"),
        (True, 0, "a"),
        (0, 1.0, "a"),
        ("1", 0, "a"),
        (0, 0, ""),
        (0, 0, "x" * 129),
        (0, 0, b"a"),
        (0, 0, None),
    ],
)
def test_timestamp_rejects(wall_ms, logical, node):
    with pytest.raises((TypeError, ValueError)):
        Timestamp(wall_ms, logical, node)


def test_timestamp_is_frozen_and_shares_node_ids():
    ts = Timestamp(1, 0, "".join(["no", "de"]))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ts.wall_ms = 2
    assert ts.node is Timestamp(2, 0, "node").node
