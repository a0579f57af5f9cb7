"""Wall-clock readings in the two forms the cluster uses: Unix milliseconds (records, tokens,
the replicated state's physical clock) and text for people and JSON."""

from __future__ import annotations

import datetime
import time


def wall_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """RFC 3339 UTC with milliseconds, as JSON documents carry time: 2026-01-01T10:00:00.000Z."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_ms(ms: int) -> str:
    """A minute-precise UTC time for people: 2026-01-01 10:00 UTC."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
