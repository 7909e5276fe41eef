"""Part of the cost stage: the device-memory timeline of a program under a plan.

Every device buffer is an interval of positions `[first, last]` with a size. The
bytes live at a position are the sum over the intervals that contain it. Positions
start at -1 (the arguments, before the first equation).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ._usage import ResidualUsage, Usage

Interval = tuple[int, int, int]  # (nbytes, first, last)


def memory_timeline(num_positions: int, intervals: Iterable[Interval]) -> np.ndarray:
    """Bytes live at positions -1 .. num_positions (index 0 is position -1).

    Example:
        >>> memory_timeline(3, [(10, -1, 3), (5, 0, 1), (7, 1, 2)]).tolist()
        [10, 15, 22, 17, 10]
    """
    delta = np.zeros(num_positions + 3, dtype=np.int64)
    for size, first, last in intervals:
        if size and last >= first:
            delta[first + 1] += size
            delta[last + 2] -= size
    return np.cumsum(delta)[:-1]


def residual_intervals(r: ResidualUsage) -> list[Interval]:
    """Where a residual occupies device memory, given its decision and pins."""
    if r.memory == "host" or (r.is_input and r.produced_at < 0):
        return []  # on host already, or an argument counted with the arguments
    if r.decision == "offload" and r.per_iteration:
        # The slice being made or read and the one in flight; the stack is on host.
        return [
            (2 * r.slice_nbytes, r.produced_at, r.produced_at),
            (2 * r.slice_nbytes, r.first_backward_use, r.last_backward_use),
        ]
    if r.decision == "recompute" and r.per_iteration:
        # Made and rebuilt one slice at a time inside the scans; never stored.
        return [
            (r.slice_nbytes, r.produced_at, r.produced_at),
            (r.slice_nbytes, r.first_backward_use, r.last_backward_use),
        ]
    if r.decision == "offload":
        assert r.offload_by is not None and r.prefetch_at is not None
        return [
            (r.nbytes, r.produced_at, max(r.offload_by, r.last_forward_use)),
            (r.nbytes, r.prefetch_at, r.last_backward_use),
        ]
    if r.decision == "recompute":
        return [
            (r.nbytes, r.produced_at, r.last_forward_use),
            (r.nbytes, r.first_backward_use, r.last_backward_use),
        ]
    return [(r.nbytes, r.produced_at, r.last_backward_use)]


def plan_timeline(usage: Usage, residuals: Iterable[ResidualUsage]) -> np.ndarray:
    """Device bytes at each position when the residuals follow their decisions."""
    intervals = [*usage.buffers]
    for r in residuals:
        intervals.extend(residual_intervals(r))
    return memory_timeline(len(usage.eqns), intervals)
