"""The figures a benchmark prints and the exit status they give, shared by the bench scripts.

A figure may carry a target. In full mode a missed target makes the exit status 1; in short
mode (small sizes, one round, run by the test suite) targets are printed but not judged, so
only errors fail it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import attrs

#: Exit status when a target is missed or the bench could not measure.
FAILED = 1


@attrs.frozen
class Figure:
    """One measured value, as printed; `ok` is None when the figure has no target."""

    label: str
    value: str
    target: str = ""
    ok: bool | None = None


def print_figures(title: str, figures: list[Figure], target_heading: str = "target") -> None:
    """Print `figures` as a table under `title`; without targets, a table of values only."""
    width = max(len(f.label) for f in figures)
    value_width = max(12, *(len(f.value) for f in figures))
    target_width = max(len(target_heading), *(len(f.target) for f in figures))
    judged = any(f.ok is not None for f in figures)
    print(title)
    heading = f"{'measure':{width}}  {'result':>{value_width}}"
    print(heading + (f"  {target_heading:>{target_width}}  ok" if judged else ""))
    for f in figures:
        row = f"{f.label:{width}}  {f.value:>{value_width}}"
        if judged:
            ok = "" if f.ok is None else "yes" if f.ok else "NO"
            row += f"  {f.target:>{target_width}}  {ok}"
        print(row)


def verdict(figures: list[Figure], short: bool) -> int:
    """0 unless a target was missed in full mode; says on stderr which ones were."""
    if short and any(f.ok is not None for f in figures):
        print("short mode: targets are not judged (sizes too small for the figures to mean much)")
        return 0
    missed = [f.label for f in figures if f.ok is False]
    if missed:
        print(f"target missed: {'; '.join(missed)}", file=sys.stderr)
        return FAILED
    return 0


def best_seconds(action: Callable[[], object], repeat: int = 3) -> float:
    """The least wall-clock seconds of `repeat` runs of `action`: the run least disturbed by
    the other processes of the machine."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best
