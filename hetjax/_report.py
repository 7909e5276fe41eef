"""Stage 6: report. The usage record and the plan, for people."""

from __future__ import annotations

import dataclasses
from typing import Any

from ._api import usage_and_plan
from ._cost import DeviceProfile
from ._plan import Plan, Policy, check_options
from ._usage import ResidualUsage


@dataclasses.dataclass(frozen=True)
class Report:
    """What `het_offload` would do to a function, computed without running it."""

    plan: Plan

    @property
    def residuals(self) -> tuple[ResidualUsage, ...]:
        return self.plan.residuals

    @property
    def moved_bytes(self) -> int:
        return self.plan.moved_bytes

    def table(self) -> str:
        """One row per residual, with the user's source line."""
        head = ("#", "shape", "dtype", "MiB", "producer", "made", "last fwd", "1st bwd",
                "decision", "pin", "prefetch", "source")  # fmt: skip
        rows = [head]
        for r in self.residuals:
            rows.append((
                str(r.index), "x".join(map(str, r.shape)) or "()", r.dtype,
                f"{r.nbytes / 2**20:.2f}", r.primitive, str(r.produced_at),
                str(r.last_forward_use), str(r.first_backward_use),
                r.decision + (" (input)" if r.is_input else ""),
                "" if r.offload_by is None else str(r.offload_by),
                "" if r.prefetch_at is None else str(r.prefetch_at), r.source,
            ))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]  # fmt: skip
        lines.insert(1, "-" * len(lines[0]))
        total = sum(r.nbytes for r in self.residuals)
        lines.append(f"moved to host: {self.moved_bytes / 2**20:.2f} MiB "
                     f"of {total / 2**20:.2f} MiB of residuals")  # fmt: skip
        return "\n".join(lines)


def analyze(
    fun: Any,
    *args: Any,
    policy: Policy = "auto",
    device_budget: float | None = None,
    min_bytes: int = 2**20,
    profile: DeviceProfile | None = None,
    **kwargs: Any,
) -> Report:
    """The usage record and plan `het_offload` would use for `fun(*args, **kwargs)`.

    Example:
        >>> import jax.numpy as jnp, hetjax
        >>> def loss(w, x):
        ...     return jnp.mean(jnp.tanh(x @ w) ** 2)
        >>> report = hetjax.analyze(loss, jnp.ones((64, 64)), jnp.ones((32, 64)),
        ...                         policy="all", min_bytes=0)
        >>> print(report.table().splitlines()[0].split()[:4])
        ['#', 'shape', 'dtype', 'MiB']
    """
    check_options(policy, min_bytes, device_budget)
    options = dict(policy=policy, min_bytes=min_bytes, device_budget=device_budget, profile=profile)
    _, plan = usage_and_plan(fun, args, kwargs, options)
    return Report(plan)
