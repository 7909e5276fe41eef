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


def residual_intervals(r: ResidualUsage, made_in_forward: bool = True) -> list[Interval]:
    """Where a residual occupies device memory, given its decision and pins. Without
    `made_in_forward`, a rebuilt residual holds no bytes in the forward (XLA makes it
    inside the kernels that read it there: `Usage.made_in_readers`)."""
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
        rebuilt = [(r.nbytes, r.first_backward_use, r.last_backward_use)]
        if not made_in_forward:
            return rebuilt
        return [(r.nbytes, r.produced_at, r.last_forward_use), *rebuilt]
    return [(r.nbytes, r.produced_at, r.last_backward_use)]


def plan_timeline(usage: Usage, residuals: Iterable[ResidualUsage]) -> np.ndarray:
    """Device bytes at each position when the residuals follow their decisions.

    A residual XLA rebuilds in the backward's kernels (`Usage.fused`) holds no bytes of
    its own where the plan keeps it (or rebuilds it from residuals alone); its stored
    sources stay live until its last backward reader instead. One XLA makes inside its
    forward readers (`Usage.made_in_readers`) holds none in the forward where the plan
    rebuilds it.
    """
    # TODO: model how XLA allocates the gradient outputs. They get buffers apart from
    # its temp heap (earlier values may reuse them), so the compiled peak is arguments
    # + outputs + the heap's own peak, not the peak of their sum. The reference gpt's
    # `all` plan (H200, jax 0.11.2): modelled at 7323 MiB, XLA's live ranges at 7285,
    # compiled 9238 = 2569 arguments + 2569 outputs + a 4100 MiB heap that peaks at
    # the logits' softmax, before the backward makes any gradient. Counted whole, the
    # outputs push the plain baselines further over (mlp 1.14 -> 1.34 of the compiled
    # peak, gpt 1.11 -> 1.18, gpt_scan 0.97 -> 1.02, cnn 0.81 -> 0.82): that needs a
    # model of the buffer assignment, not of liveness. Any change moves the peak the
    # planner aims at, and every committed result would need compiling again.
    records = {r.index: r for r in residuals}
    on_device = {k for k, r in records.items() if r.decision == "keep" and r.memory == "device"}
    intervals = [*usage.buffers]
    need: dict[int, int] = {}  # stored forward values kept for fused residuals, by key
    size_and_end: dict[int, tuple[int, int]] = {}
    residual_need: dict[int, int] = {}
    for r in records.values():
        fused = usage.fused.get(r.index)
        rebuilt = (
            fused is not None
            and set(fused.residuals) <= on_device
            and (r.decision == "keep" or (r.decision == "recompute" and not fused.values))
        )
        made_in_forward = r.index not in usage.made_in_readers
        if not rebuilt:
            intervals.extend(residual_intervals(r, made_in_forward))
            continue
        if r.decision == "recompute" and made_in_forward:  # rebuilt in the readers
            intervals.append((r.nbytes, r.produced_at, r.last_forward_use))
        for key, (size, _, last_forward_use) in fused.values:
            need[key] = max(need.get(key, -1), r.last_backward_use)
            size_and_end[key] = (size, last_forward_use)
        for k in fused.residuals:
            residual_need[k] = max(residual_need.get(k, -1), r.last_backward_use)
    for key, until in need.items():
        size, last_forward_use = size_and_end[key]
        intervals.append((size, last_forward_use + 1, until))
    for k, until in residual_need.items():
        r = records[k]
        if not r.is_input:
            intervals.append((r.nbytes, r.last_backward_use + 1, until))
    return memory_timeline(len(usage.eqns), intervals)
