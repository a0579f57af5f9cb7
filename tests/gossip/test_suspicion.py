"""The Lifeguard suspicion timer (meshmail.gossip.suspicion.Suspicion) in simulated time.

The deadline starts at start + maximum and moves earlier, in place, with each new
independent confirmation, down to start + minimum at `expected` confirmations. Tests run
under pytest-trio's autojump clock (MockClock(autojump_threshold=0)).
"""

from __future__ import annotations

import pytest
import trio

from meshmail.gossip.suspicion import Suspicion

MIN, MAX, K = 2.0, 30.0, 3


def suspicion(expected: int = K, start: float | None = None) -> Suspicion:
    return Suspicion(trio.current_time() if start is None else start, MIN, MAX, expected, {"accuser"})


async def fires_at(s: Suspicion, confirmations: dict[float, str]) -> float:
    """Run the timer, confirming at the given offsets from start; return when it fired, from start."""

    async def confirm_later() -> None:
        for offset, source in sorted(confirmations.items()):
            await trio.sleep_until(s.start + offset)
            s.confirm(source)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(confirm_later)
        with s.scope:
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    assert s.scope.cancelled_caught
    return trio.current_time() - s.start


async def test_no_confirmation_fires_at_maximum(autojump_clock) -> None:
    """Unconfirmed, the suspicion lasts the maximum."""
    assert await fires_at(suspicion(), {}) == pytest.approx(MAX)


@pytest.mark.parametrize(
    ("confirmations", "expected"),
    [
        # timeouts by hand: 1 -> 16 s, 2 -> 7.810525 s, 3 -> 2 s (see test_timing)
        ({1.0: "b"}, 16.0),
        ({1.0: "b", 3.0: "c"}, 7.810525),
        ({1.0: "b", 3.0: "c", 5.0: "d"}, 5.0),  # deadline start + 2 already passed: fires at once
        ({0.5: "b", 0.6: "c", 0.7: "d"}, 2.0),
        ({20.0: "b"}, 20.0),  # a confirmation after the 16 s mark ends it at once
    ],
)
async def test_deadline_moves_with_confirmations(autojump_clock, confirmations, expected) -> None:
    """Each new confirmation moves the deadline earlier, in place, as the Lifeguard formula says."""
    assert await fires_at(suspicion(), confirmations) == pytest.approx(expected, abs=1e-6)


async def test_deadline_property(autojump_clock) -> None:
    """deadline and the cancel scope's deadline agree after every confirmation."""
    s = suspicion(start=100.0)
    assert s.deadline == s.scope.deadline == 130.0
    assert s.confirm("b") is True
    assert s.deadline == s.scope.deadline == pytest.approx(116.0)
    assert s.confirmations == 1


async def test_duplicate_confirmer_ignored(autojump_clock) -> None:
    """A member confirming twice, or the accuser itself, counts once (or not at all)."""
    s = suspicion(start=0.0)
    assert s.confirm("accuser") is False
    assert s.confirmations == 0 and s.scope.deadline == 30.0
    assert s.confirm("b") is True
    assert s.confirm("b") is False
    assert s.confirmations == 1
    assert s.scope.deadline == pytest.approx(16.0)


async def test_stops_at_expected(autojump_clock) -> None:
    """After `expected` confirmations further ones are refused and the deadline stays at the minimum."""
    s = suspicion(start=0.0)
    assert [s.confirm(x) for x in "bcdef"] == [True, True, True, False, False]
    assert s.confirmed_by == {"accuser", "b", "c", "d"}
    assert s.scope.deadline == MIN


async def test_nothing_expected_means_minimum(autojump_clock) -> None:
    """In a cluster too small for confirmations the timer is the minimum and cannot move."""
    s = suspicion(expected=0)
    assert s.confirm("b") is False
    assert await fires_at(s, {}) == pytest.approx(MIN)


async def test_cancelled_scope_stops_timer(autojump_clock) -> None:
    """Cancelling the scope (a refutation) ends the wait at once, before any deadline."""
    s = suspicion()
    s.scope.cancel()
    with s.scope:
        await trio.sleep_forever()
    assert trio.current_time() == s.start
