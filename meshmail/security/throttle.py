"""Failed logins, limited per client address and per account name: the admin API's password
logins and the mail proxy's both count here (each with its own limits).

A key with `limit` failures inside the window is refused until the oldest leaves it. An
account's budget is shared by the addresses it never logged in from; an address it logged
in from before has a budget of its own, so strangers guessing a password cannot lock the
owner out. The clock is the caller's (trio.current_time, time.monotonic): nothing here sleeps.
"""

from __future__ import annotations

import collections

import attrs

#: Addresses remembered per account as ones it logged in from, and accounts remembered.
KNOWN_ADDRESSES = 16
KNOWN_ACCOUNTS = 10_000


@attrs.define
class RateLimiter:
    """Failures per key within a sliding window; a key with `limit` of them is blocked until
    the oldest leaves the window. At most `max_keys` keys are tracked (oldest forgotten)."""

    limit: int
    window: float
    max_keys: int = 100_000
    _failures: collections.OrderedDict[str, collections.deque] = attrs.field(factory=collections.OrderedDict)

    def count(self, key: str, now: float) -> int:
        """Failures of `key` inside the window (at most `limit`)."""
        times = self._failures.get(key)
        if not times:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return len(times)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        if self.count(key, now) < self.limit:
            return 0.0
        return max(0.0, self._failures[key][0] + self.window - now)

    def forgive(self, key: str, when: float) -> None:
        """Take back one failure recorded at `when` (a check that turned out good)."""
        times = self._failures.get(key)
        if times is not None:
            try:
                times.remove(when)
            except ValueError:
                pass

    def fail(self, key: str, now: float) -> None:
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.limit)
            if len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        times.append(now)


@attrs.define
class LoginThrottle:
    """Failed logins per client address (`per_address` in `window` seconds) and per account
    (`per_account`, its budget shared as the module says)."""

    per_address: int
    per_account: int
    window: float
    by_address: RateLimiter = attrs.field(init=False)
    by_account: RateLimiter = attrs.field(init=False)
    #: account -> the addresses it logged in from lately (most recent last).
    known: collections.OrderedDict[str, list[str]] = attrs.field(init=False, factory=collections.OrderedDict)

    def __attrs_post_init__(self) -> None:
        self.by_address = RateLimiter(self.per_address, self.window)
        self.by_account = RateLimiter(self.per_account, self.window)

    def budget(self, account: str, address: str) -> str:
        """The key whose failures limit logins to `account` from `address`."""
        known = address in self.known.get(account, ())
        return f"{account}@{address}" if known else account

    def retry_after(self, account: str, address: str, now: float) -> float:
        """Seconds until `address` may try `account` again; 0 when it may now."""
        budget = self.budget(account, address)
        return max(self.by_address.retry_after(address, now), self.by_account.retry_after(budget, now))

    def failures(self, account: str, address: str, now: float) -> int:
        """Recent failures that count against this login: the larger of the two budgets'."""
        return max(self.by_address.count(address, now), self.by_account.count(self.budget(account, address), now))

    def fail(self, account: str, address: str, now: float) -> None:
        self.by_address.fail(address, now)
        self.by_account.fail(self.budget(account, address), now)

    def forgive(self, account: str, address: str, when: float) -> None:
        """Take back the failure recorded at `when` for a login that turned out good."""
        self.by_address.forgive(address, when)
        self.by_account.forgive(self.budget(account, address), when)

    def remember(self, account: str, address: str) -> None:
        """`account` logged in from `address`: that pair gets a budget of its own from now."""
        addresses = self.known.pop(account, [])
        self.known[account] = [a for a in addresses if a != address][-(KNOWN_ADDRESSES - 1) :] + [address]
        if len(self.known) > KNOWN_ACCOUNTS:
            self.known.popitem(last=False)
