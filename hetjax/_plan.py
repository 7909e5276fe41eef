"""Stage 4: plan. A decision per residual: keep, offload (with its two pin points)
or recompute.

Positions follow `_usage`: forward equations first, then backward ones. For an
offloaded residual, `offload_by` is the forward position whose equation waits for
the copy to host (the forward pin), and `prefetch_at` the backward position at
which the copy back to device starts (the backward pin).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ._cost import DeviceProfile, eqn_seconds
from ._usage import ResidualUsage, Usage

Policy = str | Callable[[ResidualUsage], bool]
POLICIES = ("auto", "all", "none")


class HetjaxWarning(UserWarning):
    """A residual stayed on device because hetjax could not move it."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn about `message` once per process, not once per trace."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, HetjaxWarning, stacklevel=3)


def check_options(policy: Any, min_bytes: Any, device_budget: Any) -> None:
    """Raise `ValueError` naming the bad value, at decoration time."""
    if not (callable(policy) or (isinstance(policy, str) and policy in POLICIES)):
        raise ValueError(
            f"het_offload: policy must be one of {POLICIES} or a callable "
            f"(ResidualUsage) -> bool, got {policy!r}"
        )
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, (int, np.integer)) or min_bytes < 0:
        raise ValueError(f"het_offload: min_bytes must be an int >= 0, got {min_bytes!r}")
    if device_budget is not None and (
        isinstance(device_budget, bool)
        or not isinstance(device_budget, (int, float, np.integer, np.floating))
        or not device_budget > 0
    ):
        raise ValueError(
            f"het_offload: device_budget must be a positive number of bytes or None, "
            f"got {device_budget!r}"
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Decisions for every residual of one program, and the profile they assume."""

    residuals: tuple[ResidualUsage, ...]
    profile: DeviceProfile
    policy: str
    timeline: tuple[float, ...]  # estimated start time of each position, seconds

    @property
    def offloaded(self) -> tuple[ResidualUsage, ...]:
        return tuple(r for r in self.residuals if r.decision == "offload")

    @property
    def moved_bytes(self) -> int:
        return sum(r.nbytes for r in self.offloaded)


def program_timeline(usage: Usage, profile: DeviceProfile) -> np.ndarray:
    """Estimated start time of each position; the last entry is the end of the step."""
    times = [eqn_seconds(e, profile) for e in usage.eqns]
    return np.concatenate([[0.0], np.cumsum(times)])


def make_plan(
    usage: Usage,
    policy: Policy = "auto",
    *,
    min_bytes: int = 2**20,
    device_budget: float | None = None,
    profile: DeviceProfile | None = None,
) -> Plan:
    """Decide, for each residual of `usage`, whether to keep, offload or recompute it."""
    check_options(policy, min_bytes, device_budget)
    profile = profile or DeviceProfile.for_platform("gpu")
    timeline = program_timeline(usage, profile)
    num_fwd = usage.boundary
    policy_name = policy if isinstance(policy, str) else getattr(policy, "__name__", "callable")

    decided: dict[int, str] = {}
    for r in usage.residuals:
        decided[r.index] = _first_decision(r, policy, min_bytes)
    if policy == "auto":
        # TODO: the budget-driven planner (device_budget) is issue 4; until then
        # "auto" is the no-slowdown mode whatever the budget.
        candidates = [r for r in usage.residuals if decided[r.index] == "offload"]
        hidden = _hidden_under_compute(candidates, timeline, num_fwd, profile)
        for r in candidates:
            if r.index not in hidden:
                decided[r.index] = "keep"
    elif callable(policy):
        for r in usage.residuals:
            if decided[r.index] == "offload" and not policy(r):
                decided[r.index] = "keep"

    first_need = _first_need(usage, decided)
    offload_by, prefetch_at = _pin_points(usage, decided, first_need, timeline, num_fwd, profile)
    residuals = tuple(
        dataclasses.replace(
            r,
            decision=decided[r.index],  # type: ignore[arg-type]
            offload_by=offload_by.get(r.index),
            prefetch_at=prefetch_at.get(r.index),
        )
        for r in usage.residuals
    )
    return Plan(residuals, profile, policy_name, tuple(float(t) for t in timeline))


def _first_decision(r: ResidualUsage, policy: Policy, min_bytes: int) -> str:
    if policy == "none":
        return "keep"
    if r.recomputable:
        return "recompute"
    if r.is_input or r.nbytes < min_bytes or r.nbytes == 0:
        return "keep"
    if not r.offloadable:
        if r.memory == "device":
            warn_once(
                f"hetjax: keeping a residual of type {r.dtype}{list(r.shape)} produced by "
                f"'{r.primitive}' on device: it cannot be placed in host memory."
            )
        return "keep"
    return "offload"


def _first_need(usage: Usage, decided: dict[int, str]) -> dict[int, int]:
    """Backward position at which each residual is first needed, recomputes included."""
    need = {r.index: r.first_backward_use for r in usage.residuals}
    by_index = {r.index: r for r in usage.residuals}

    def visit(k: int, at: int) -> None:
        need[k] = min(need[k], at)
        if decided[k] == "recompute":
            for a in usage.recipes[k].residual_anchors:
                visit(a, at)

    for k, d in decided.items():
        if d == "recompute":
            visit(k, by_index[k].first_backward_use)
    return need


def _hidden_under_compute(
    candidates: list[ResidualUsage],
    timeline: np.ndarray,
    num_fwd: int,
    profile: DeviceProfile,
) -> set[int]:
    """Residuals whose copies both ways fit in the link's idle time (no slowdown)."""
    forward_ok: list[ResidualUsage] = []
    link_free = 0.0
    for r in sorted(candidates, key=lambda r: (r.produced_at, r.index)):
        start = max(timeline[r.produced_at + 1], link_free)
        end = start + profile.d2h_seconds(r.nbytes)
        if end <= timeline[num_fwd]:
            forward_ok.append(r)
            link_free = end
    hidden: set[int] = set()
    link_busy_from = np.inf
    for r in sorted(forward_ok, key=lambda r: (-r.first_backward_use, r.index)):
        finish = min(timeline[r.first_backward_use], link_busy_from)
        start = finish - profile.h2d_seconds(r.nbytes)
        if start >= timeline[num_fwd]:
            hidden.add(r.index)
            link_busy_from = start
    return hidden


def _pin_points(
    usage: Usage,
    decided: dict[int, str],
    first_need: dict[int, int],
    timeline: np.ndarray,
    num_fwd: int,
    profile: DeviceProfile,
) -> tuple[dict[int, int], dict[int, int]]:
    """Forward and backward pin positions.

    A queue model of each link direction gives when each copy can finish (forward)
    or must start (backward). A window then bounds memory when the link is the
    bottleneck: a copy to host must finish before the next offloaded residual is
    produced, and a copy back must not start before the previously needed one is
    consumed. So at most about two moved residuals are on device at a time.
    """
    moved = [r for r in usage.residuals if decided[r.index] == "offload"]
    offload_by: dict[int, int] = {}
    link_free = 0.0
    by_production = sorted(moved, key=lambda r: (r.produced_at, r.index))
    for r in by_production:
        start = max(timeline[r.produced_at + 1], link_free)
        link_free = start + profile.d2h_seconds(r.nbytes)
        pos = int(np.searchsorted(timeline, link_free, side="left"))
        later = [m.produced_at for m in by_production if m.produced_at > r.produced_at]
        window_end = later[0] + 1 if later else num_fwd
        pos = min(pos, window_end)
        offload_by[r.index] = int(np.clip(pos, r.last_forward_use + 1, num_fwd))
    prefetch_at: dict[int, int] = {}
    link_busy_from = np.inf
    needs = sorted({first_need[r.index] for r in moved})
    for r in sorted(moved, key=lambda r: (-first_need[r.index], r.index)):
        need = first_need[r.index]
        finish = min(timeline[need], link_busy_from)
        link_busy_from = finish - profile.h2d_seconds(r.nbytes)
        pos = int(np.searchsorted(timeline, link_busy_from, side="right")) - 1
        earlier = [n for n in needs if n < need]
        window_start = earlier[-1] if earlier else num_fwd
        prefetch_at[r.index] = int(np.clip(max(pos, window_start), num_fwd, need))
    return offload_by, prefetch_at
