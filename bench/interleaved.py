"""Timing several ways of doing one thing, interleaved: one repeat of each way, round
after round, so that the machine's drifting load hits them alike. The rounds are split
into groups; a way's figure is the median of the groups' medians, and its spread the
range of those medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def group_medians(ways: dict[str, Callable[[], object]], runs: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per way: {"median_ms", "min_ms", "max_ms"} over `runs` groups of `repeats` rounds."""
    groups: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(runs):
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(repeats):
            for w, fn in ways.items():
                times[w].append(timed(fn))
        for w, v in times.items():
            groups[w].append(statistics.median(v))
    return {w: {"median_ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v), "max_ms": 1000 * max(v)} for w, v in groups.items()}
