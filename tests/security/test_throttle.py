"""Failed-login budgets: per client address, per account shared by strangers, and a budget of
its own for an address the account logged in from before."""

from __future__ import annotations

from meshmail.security.throttle import KNOWN_ADDRESSES, LoginThrottle, RateLimiter


def test_a_key_is_blocked_at_its_limit_until_the_oldest_failure_leaves_the_window():
    limiter = RateLimiter(limit=3, window=60.0)
    for second in (0.0, 10.0, 20.0):
        assert limiter.retry_after("k", second) == 0.0
        limiter.fail("k", second)
    assert limiter.count("k", 20.0) == 3
    assert limiter.retry_after("k", 30.0) == 30.0  # the failure at 0 leaves the window at 60
    assert limiter.retry_after("k", 60.0) == 0.0 and limiter.count("k", 60.0) == 2
    assert limiter.count("k", 200.0) == 0 and "k" not in limiter._failures


def test_forgiving_takes_back_one_failure_and_keys_are_bounded():
    limiter = RateLimiter(limit=2, window=60.0, max_keys=3)
    limiter.fail("k", 1.0)
    limiter.fail("k", 2.0)
    limiter.forgive("k", 1.0)
    limiter.forgive("k", 99.0)  # never recorded: nothing happens
    assert limiter.count("k", 3.0) == 1
    for key in ("a", "b", "c", "d"):
        limiter.fail(key, 5.0)
    assert len(limiter._failures) == 3 and limiter.count("k", 5.0) == 0  # the oldest key went


def test_strangers_share_an_accounts_budget_but_cannot_lock_its_owner_out():
    throttle = LoginThrottle(per_address=100, per_account=3, window=300.0)
    throttle.remember("ann@one.example", "192.0.2.1")  # the owner logged in from there before
    for n in range(3):
        throttle.fail("ann@one.example", f"198.51.100.{n}", float(n))
    assert throttle.retry_after("ann@one.example", "198.51.100.9", 3.0) > 0  # any stranger now waits
    assert throttle.failures("ann@one.example", "198.51.100.9", 3.0) == 3
    assert throttle.retry_after("ann@one.example", "192.0.2.1", 3.0) == 0.0  # the owner does not
    assert throttle.failures("ann@one.example", "192.0.2.1", 3.0) == 0


def test_one_address_is_limited_across_accounts():
    throttle = LoginThrottle(per_address=2, per_account=100, window=300.0)
    throttle.fail("a@x.example", "203.0.113.5", 0.0)
    throttle.fail("b@x.example", "203.0.113.5", 1.0)
    assert throttle.retry_after("c@x.example", "203.0.113.5", 2.0) == 298.0
    assert throttle.retry_after("c@x.example", "203.0.113.6", 2.0) == 0.0
    throttle.forgive("b@x.example", "203.0.113.5", 1.0)
    assert throttle.retry_after("c@x.example", "203.0.113.5", 2.0) == 0.0


def test_known_addresses_are_bounded_per_account():
    throttle = LoginThrottle(per_address=10, per_account=10, window=300.0)
    for n in range(KNOWN_ADDRESSES + 5):
        throttle.remember("ann", f"10.0.0.{n}")
    assert len(throttle.known["ann"]) == KNOWN_ADDRESSES
    assert throttle.budget("ann", "10.0.0.0") == "ann"  # the oldest was forgotten
    assert throttle.budget("ann", f"10.0.0.{KNOWN_ADDRESSES + 4}") == f"ann@10.0.0.{KNOWN_ADDRESSES + 4}"
