"""Accepting connections through a shortage of file descriptors or memory.

`ResilientListener` wraps a trio Listener: when accept() fails for want of a resource
(EMFILE, ENFILE, ENOMEM, ENOBUFS) it counts the failure, logs it at most once a minute,
backs off and tries again, so a flood of connections slows a server down but never stops it.
Every other error still raises.
"""

from __future__ import annotations

import collections
import errno
import logging
import os

import trio

log = logging.getLogger("meshmail.accept")

#: accept() errors that mean "out of a resource for now" (trio.serve_listeners' list).
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: The first pause after a failed accept; each further failure in a row doubles it up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 1.0
#: A listener logs its shortage at most this often (seconds); the counter counts every failure.
LOG_INTERVAL = 60.0


class Shortages:
    """Counts and logs accept() failures for want of a resource: every one as
    `<name>.accept_shortage` in `counters`, a log line at most every LOG_INTERVAL seconds."""

    def __init__(self, name: str, counters: collections.Counter[str] | None = None) -> None:
        self.name = name
        self.counters: collections.Counter[str] = collections.Counter() if counters is None else counters
        self._logged_at = -LOG_INTERVAL
        self._unlogged = 0

    def note(self, code: int, now: float) -> None:
        """Count a failure with errno `code` at time `now` (seconds of any monotonic clock)."""
        self.counters[f"{self.name}.accept_shortage"] += 1
        self._unlogged += 1
        if now - self._logged_at < LOG_INTERVAL:
            return
        log.error(
            "%s listener cannot accept connections: %s (%s); %d failure(s) since the last report, "
            "retrying every %.1f-%.1f s (raise the open files limit, e.g. LimitNOFILE in the systemd unit)",
            self.name, os.strerror(code), errno.errorcode.get(code, code), self._unlogged, BACKOFF_FIRST, BACKOFF_MAX,
        )  # fmt: skip
        self._logged_at = now
        self._unlogged = 0


class ResilientListener(trio.abc.Listener[trio.abc.Stream]):
    """A Listener whose accept() waits out resource shortages instead of raising.

    Args:
        listener: the listener to accept from (closed by aclose()).
        name: what the listener serves, for the log line and the counter ("gossip", "imap").
        counters: where each failed accept is counted, as `<name>.accept_shortage`.
    """

    def __init__(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        name: str,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        self.listener = listener
        self.name = name
        self.shortages = Shortages(name, counters)
        self.counters = self.shortages.counters

    async def accept(self) -> trio.abc.Stream:
        """The next connection; resource shortages are waited out, other errors raise."""
        delay = BACKOFF_FIRST
        while True:
            try:
                return await self.listener.accept()
            except OSError as exc:
                if exc.errno not in SHORTAGE_ERRNOS:
                    raise
                self.shortages.note(exc.errno, trio.current_time())
            await trio.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX)

    async def aclose(self) -> None:
        await self.listener.aclose()
