"""Stage 6: report. The usage record and the plan, for people."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._api import het_offload, usage_and_plan
from ._check import (
    CHECKED_POLICIES,
    CompiledComparison,
    check_target,
    checks_against,
    compile_both,
)
from ._cost import DeviceProfile
from ._plan import Plan, Policy, check_options
from ._step import StepProgram
from ._target import parse_target
from ._usage import ResidualUsage


@dataclasses.dataclass(frozen=True)
class Report:
    """What `het_offload` would do to a function, computed without running it."""

    plan: Plan
    # Compiles the gradient computation without and with the plan, for the target (or
    # local GPU); None where there is no compiler. Run on first use of `compiled`.
    compile: Callable[[], CompiledComparison] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @functools.cached_property
    def compiled(self) -> CompiledComparison | None:
        """XLA's figures of the gradient computation without and with the plan, compiled
        on first use; None without a target or a local GPU."""
        return None if self.compile is None else self.compile()

    @property
    def residuals(self) -> tuple[ResidualUsage, ...]:
        """The plan's records, less the checkpoints no recomputation starts from."""
        return tuple(r for r in self.plan.residuals if r.read_in_backward or not r.checkpoint)

    @property
    def moved_bytes(self) -> int:
        return self.plan.moved_bytes

    @property
    def baseline_peak_bytes(self) -> int:
        """Predicted peak device bytes with every residual kept on device."""
        return self.plan.baseline_peak_bytes

    @property
    def predicted_peak_bytes(self) -> int:
        """Predicted peak device bytes under the plan."""
        return self.plan.predicted_peak_bytes

    @property
    def exposed_transfer_ms(self) -> float:
        """Predicted time the copies add to the step (not hidden under compute)."""
        return self.plan.exposed_transfer_s * 1e3

    @property
    def feasible(self) -> bool:
        """Whether the predicted peak meets `device_budget` (True without a budget)."""
        return self.plan.feasible

    def plot(self, ax: Any = None) -> Any:
        """A matplotlib `Figure`: device memory over program order, before and after,
        with each move drawn (to host at its producer, back at its prefetch point)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4)) if ax is None else (ax.figure, ax)
        positions = np.arange(-1, len(self.plan.baseline_memory) - 1)
        big = self.baseline_peak_bytes >= 2**30
        gib, unit = (2.0**30, "GiB") if big else (2.0**20, "MiB")
        ax.step(positions, self.plan.baseline_memory / gib, where="post", label="no plan")
        ax.step(positions, self.plan.predicted_memory / gib, where="post", label="with plan")
        ax.axvline(self.plan.boundary - 0.5, color="gray", ls=":", label="forward | backward")
        if self.plan.device_budget is not None:
            ax.axhline(self.plan.device_budget / gib, color="red", ls="--", label="budget")
        top = float(self.plan.baseline_memory.max()) / gib
        for i, r in enumerate(self.plan.offloaded):
            y = top * (1.02 + 0.02 * (i % 5))
            ax.plot([r.produced_at, r.offload_by], [y, y], color="tab:green", lw=2,
                    label="copy to host" if i == 0 else None)  # fmt: skip
            ax.plot([r.prefetch_at, r.first_backward_use], [y, y], color="tab:purple", lw=2,
                    label="copy to device" if i == 0 else None)  # fmt: skip
        ax.set_xlabel("program position (forward, then backward equations)")
        ax.set_ylabel(f"device memory ({unit}, predicted)")
        ax.set_title(
            f"policy={self.plan.policy}: peak {self.baseline_peak_bytes / gib:.2f} -> "
            f"{self.predicted_peak_bytes / gib:.2f} {unit}, {self.moved_bytes / gib:.2f} {unit} "
            f"moved, ~{self.exposed_transfer_ms:.1f} ms exposed"
        )
        ax.legend(loc="best", fontsize="small")
        return fig

    def table(self) -> str:
        """One row per residual, with the user's source line."""
        head = ("#", "shape", "dtype", "MiB", "producer", "made", "last fwd", "1st bwd",
                "decision", "move", "pin", "prefetch", "source")  # fmt: skip
        rows = [head]
        for r in self.residuals:
            rows.append((
                str(r.index), "x".join(map(str, r.shape)) or "()", r.dtype,
                f"{r.nbytes / 2**20:.2f}", r.primitive, str(r.produced_at),
                str(r.last_forward_use), str(r.first_backward_use),
                r.decision + (" (input)" if r.is_input else "")
                + ("" if r.read_in_backward else " (unread)")
                + (" (checkpoint)" if r.checkpoint else ""), r.move,
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
        lines.append(f"predicted peak: {self.baseline_peak_bytes / 2**20:.2f} MiB -> "
                     f"{self.predicted_peak_bytes / 2**20:.2f} MiB; exposed transfer "
                     f"~{self.exposed_transfer_ms:.2f} ms; feasible: {self.feasible}")  # fmt: skip
        lines.extend(self.compiled_lines())
        return "\n".join(lines)

    def compiled_lines(self) -> list[str]:
        """The compiled figures beside the predictions, or why there are none."""
        p, c = self.plan, self.compiled
        if p.checked_by is not None:
            check = [f"plan checked against {p.checked_by} ({p.check_compiles} compiles, "
                     f"{p.check_seconds:.1f} s): compiled peak "
                     f"{p.compiled_plain_peak_bytes / 2**20:.2f} MiB without it -> "
                     f"{p.compiled_peak_bytes / 2**20:.2f} MiB with it"]  # fmt: skip
        elif p.policy in CHECKED_POLICIES:
            check = ["plan not checked against a compiler (no GPU here and no target=): it "
                     "rests on the memory model alone"]  # fmt: skip
        else:
            check = []
        if c is None:
            return [*check, "compiled: not checked (no GPU here; target='h200' gives XLA's "
                    "H200 figures)"]  # fmt: skip
        where = f"compiled for {c.plain.target} ({c.plain.device_kind}, jax {c.plain.jax_version})"
        lines = [
            *check,
            f"{where}, not run:",
            f"  without the plan: {c.plain.summary()}",
            f"  with the plan:    {c.planned.summary()}; peak x{c.peak_ratio:.2f}",
        ]
        if c.plain_step is not None and c.planned_step is not None:
            lines += [
                "  step time predicted from the compiled schedule (hetjax.simulate_step):",
                f"    without the plan: {c.plain_step.summary()}",
                f"    with the plan:    {c.planned_step.summary()}",
            ]
        return lines


def analyze(
    fun: Any,
    *args: Any,
    policy: Policy = "auto",
    device_budget: float | None = None,
    min_bytes: int = 2**20,
    profile: DeviceProfile | None = None,
    target: str | os.PathLike | None = None,
    unroll_scans: bool = False,
    **kwargs: Any,
) -> Report:
    """The usage record and plan `het_offload` would use for `fun(*args, **kwargs)`.

    With `target` (a GPU name from `hetjax.target_names()`, `"h200x8"`, or a description
    file), or on a GPU, the report also holds XLA's compiled memory figures of the
    gradient computation without and with the plan (`report.compiled`, compiled when
    first read), beside the planner's predictions. A loss's gradient computation is its
    value and its VJP with respect to every array argument; a train step is compiled as
    it is. `policy="auto"` then also checks its plan against that compiler (never worse
    than plain; a budget in compiled bytes): `report.plan.checked_by` says against what.

    Example:
        >>> import jax, jax.numpy as jnp, hetjax
        >>> def loss(w, x):
        ...     return jnp.mean(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2)
        >>> report = hetjax.analyze(loss, jnp.ones((64, 64)), jnp.ones((32, 64)),
        ...                         policy="all", min_bytes=0)
        >>> print(report.table().splitlines()[0].split()[:4])
        ['#', 'shape', 'dtype', 'MiB']
        >>> w = x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
        >>> every = lambda r: True  # a callable policy: unchecked, unlike "all" and "auto"
        >>> report = hetjax.analyze(loss, w, x, policy=every, target="h200")
        >>> report.compiled.plain.host_temp_bytes, report.compiled.planned.host_temp_bytes
        (0, 2097152)
        >>> print(report.table().splitlines()[-6])
        compiled for h200 (NVIDIA H200 141GB HBM3e, jax ...), not run:
        >>> report.compiled.planned_step.d2h_ms > 0  # the moved tanh output, on the link
        True
    """
    check_options(policy, min_bytes, device_budget, unroll_scans)
    if target is not None:
        parse_target(target)
    options = dict(
        policy=policy, min_bytes=min_bytes, device_budget=device_budget, profile=profile,
        target=target, unroll_scans=unroll_scans,
    )  # fmt: skip
    usage, plan = usage_and_plan(fun, args, kwargs, options)
    if not checks_against(target):
        return Report(plan)
    planned = fun if policy == "none" else het_offload(fun, **options)
    is_step = isinstance(usage.program, StepProgram)
    arrays = [x for x in jax.tree.leaves((args, kwargs)) if hasattr(x, "dtype")]
    _, target = check_target(arrays, target)  # a sharded program: per device
    return Report(plan, lambda: compile_both(fun, planned, is_step, target, args, kwargs))
