"""The stall watch: its per-second bookkeeping as pure calls, and its task under a manual MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshmail.core.stall import TICK, WINDOW, StallWatch


def test_longest_is_the_largest_stall_of_the_last_minute():
    watch = StallWatch()
    assert watch.longest(0.0) == 0.0
    watch.record(10.2, 0.01)
    watch.record(10.7, 0.30)  # the same second: the larger one stays
    watch.record(10.9, 0.02)
    watch.record(11.5, 0.10)
    assert watch.longest(11.6) == 0.30
    # Second 10 leaves the window 60 s later; second 11 is then the longest left.
    assert watch.longest(10 + WINDOW - 0.01) == 0.30
    assert watch.longest(10 + WINDOW) == 0.10
    assert watch.longest(11 + WINDOW) == 0.0


def test_a_bucket_reused_after_a_minute_forgets_the_old_second():
    watch = StallWatch()
    watch.record(5.0, 2.0)
    watch.record(5.0 + WINDOW, 0.01)  # same slot of the ring, a minute later
    assert watch.longest(5.0 + WINDOW) == 0.01


def test_stalls_from_the_future_of_now_are_not_counted():
    watch = StallWatch()
    watch.record(30.0, 1.0)
    assert watch.longest(29.5) == 0.0


@pytest.mark.parametrize("tick", [0, -0.1])
def test_the_tick_must_be_positive(tick):
    with pytest.raises(ValueError):
        StallWatch(tick=tick)


async def _advance(clock: trio.testing.MockClock, seconds: float) -> None:
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def test_the_task_records_how_late_it_woke(mock_clock):
    """Ticks on time record nothing; time moving on by 0.8 s while the watch sleeps (what a
    blocking call on the loop does) is a stall of 0.8 - TICK, seen for a minute."""
    watch = StallWatch()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(40):
            await _advance(mock_clock, TICK)
        assert watch.longest(trio.current_time()) == pytest.approx(0.0, abs=1e-9)
        await _advance(mock_clock, 0.8)
        stalled_at = trio.current_time()
        assert watch.longest(stalled_at) == pytest.approx(0.8 - TICK)
        for _ in range(20):
            await _advance(mock_clock, 1.0)  # late by 1 - TICK each time: longer stalls
        assert watch.longest(trio.current_time()) == pytest.approx(1.0 - TICK)
        await _advance(mock_clock, TICK)
        assert watch.longest(stalled_at + WINDOW + 30) == pytest.approx(0.0, abs=1e-9)
        nursery.cancel_scope.cancel()
