"""Fixtures of the state tests: a process that "dies" at a chosen system call."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest


class SimulatedCrash(BaseException):
    """The process died here: nothing after it runs, not even cleanup code."""


@contextmanager
def _crash_at(step: int | None) -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(os, name) for name in ("write", "fsync", "replace", "unlink", "ftruncate")}

    def wrap(name: str, original: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            calls.append(name)
            if step is not None and len(calls) > step:
                raise SimulatedCrash(name)
            return original(*args)

        return call

    for name, original in originals.items():
        setattr(os, name, wrap(name, original))
    try:
        yield calls
    except SimulatedCrash:
        pass  # the process is gone; what it left on disk is what the test looks at
    finally:
        for name, original in originals.items():
            setattr(os, name, original)


@pytest.fixture
def crash_at() -> Callable[[int | None], AbstractContextManager[list[str]]]:
    """`with crash_at(step) as calls:` counts the write, fsync, rename, unlink and truncate
    calls in its block; at number `step` the process "dies": that call and every later one
    raise, so no cleanup code can tidy up what a real crash leaves behind, and the block
    ends there. `step` None never dies. `calls` names the calls made."""
    return _crash_at
