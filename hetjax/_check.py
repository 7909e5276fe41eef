"""Stage: check a plan against the compiler.

The planner's memory figures are a model; XLA's fusion and buffer reuse decide the real
ones. This stage compiles the gradient computation without and with a plan, for a GPU
target or the local GPU, and keeps only plans the compiler confirms:
- `policy="auto"` without a budget moves (or recomputes) what does not slow the step:
  along the order in which the cost model expects moves to hide, then chains to
  rebuild, cheapest per byte first (`_plan.hiding_order`), the longest prefix whose
  predicted step time (`_simulate`, from the compiled schedule) is within
  `AUTO_SLOWDOWN` of plain's, and, among the prefixes compiled on the way there, the
  one with the lowest compiled peak below plain's. Where none saves memory, it moves
  nothing and says why, once.
- `policy="all"` never returns a plan whose compiled peak exceeds plain's. Beside moving
  every residual, it compiles moving what XLA rebuilds them from instead, rebuilding
  every chain without a matmul (`_plan.rebuild_choices`), its moves with their pins
  placed again without those it keeps for want of a window, and, where moving every
  residual compiles above plain's peak, moving all but the largest 1, 2 or 4 residuals;
  it keeps the lowest peak (within `NEAR_PEAK` of it, the fastest plan); where that is
  still above plain's, it moves nothing, and says why, once (a callable policy is the
  user's own choice, and is not checked);
- with `device_budget=B`, B is compiled bytes (argument + output - alias + temp of the
  gradient computation). Where the plan "auto" takes without a budget compiles to at
  most B, it is kept: it costs at most 5% of the step time. Else the planner's greedy
  orders of choices (`_plan.budget_order`, with and without the moves the cost model
  finds cheaper than rebuilding, on its clock calibrated to the compiled plain
  program) are searched by bisection for the shortest prefix that compiles to at most
  B (see `_bisect`); with every chain of the order rebuilt as another candidate (where
  it misses B, the values the chains start from moved, a group at a time,
  `_plan.anchor_groups`), and
  the moves the cost model prefers to those chains taken one group at a time
  (`_plan.move_groups`, each kept where B is still met and the predicted step time
  falls) and all at once, the fastest plan (predicted from its compiled schedule) that
  meets B is kept. Where none does, `rebuild_choices` (with and
  without moves) is compiled too, and the fastest plan within `NEAR_PEAK` of the
  lowest peak found is kept.

Compiled peaks are cached by the program, its input shapes, the plan's decisions and
the target: a program traced again does not compile again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._compat import Tracer, eval_jaxpr
from ._compile import CompiledMemory, compile_for
from ._cost import DeviceProfile, calibrated
from ._plan import (
    Plan,
    anchor_groups,
    budget_order,
    chains_and_moves,
    hiding_order,
    make_plan,
    move_groups,
    rebuild_choices,
    warn_once,
)
from ._rewrite import offloaded_call, ties_a_pool
from ._simulate import StepEstimate, simulate_step
from ._step import StepProgram, run_step
from ._target import parse_target, target_devices
from ._usage import Usage

CHECKED_POLICIES = ("auto", "all")
AUTO_SLOWDOWN = 0.05  # predicted step time "auto" (no budget) may add to plain's
NEAR_PEAK = 0.01  # an unmet budget, and "all", take the fastest plan this near the lowest peak
ANCHOR_GROUPS = 3  # groups of the chains' starting values a budget's search may move


@dataclasses.dataclass(frozen=True)
class CompiledComparison:
    """The compiled figures of one gradient computation, without and with the plan."""

    plain: CompiledMemory
    planned: CompiledMemory
    # Predicted from each compiled schedule (`_simulate`); None where the GPU's rates
    # are unknown.
    plain_step: StepEstimate | None = None
    planned_step: StepEstimate | None = None

    @property
    def peak_ratio(self) -> float:
        """Planned peak over plain peak: below 1 saves device memory."""
        return self.planned.peak_bytes / self.plain.peak_bytes


def checks_against(target: str | os.PathLike | None) -> bool:
    """Whether there is a compiler to check against: a named target, or a local GPU.
    A CPU compile says nothing about GPU memory, so on CPU without a target, none."""
    return target is not None or jax.default_backend() == "gpu"


def check_target(
    inputs: list[Any], target: str | os.PathLike | None
) -> tuple[list[jax.ShapeDtypeStruct], str | os.PathLike | None]:
    """What the check compiles for: the inputs as `ShapeDtypeStruct`s, and the target.

    Inputs sharded over one mesh of n > 1 devices (arrays, or `ShapeDtypeStruct`s with a
    `NamedSharding`) keep their shardings (the others are replicated over the mesh), and
    a target of one GPU becomes n of them ("h200" -> "h200x8"), so that the check
    compares the peaks of one device of the sharded program: on a 4 x 2 (data, model)
    mesh of H200s, a plan that saved 8% of the unsharded program's peak added 14% to
    each device's (an 8-layer 4096-wide bf16 MLP on 32,768 rows, jax 0.11.2). Tracers
    carry their shardings only under `Explicit` axes; with `Auto` axes (under `jax.jit`
    the partitioner picks shardings later) the check is unsharded, on one device, and
    one warning says so. Anything else is checked unsharded on one device.
    """
    shardings = [_mesh_sharding(x) for x in inputs]
    meshes = {s.mesh for s in shardings if s is not None}
    if not meshes and any(_on_auto_mesh(x) for x in inputs):
        warn_once(
            "hetjax: the inputs are sharded over a mesh with Auto axes, whose shardings "
            "are not known while tracing: the plan is checked unsharded, on one device, "
            "and may need more memory per device than plain. Explicit mesh axes "
            "(jax.sharding.AxisType.Explicit) let it be checked per device."
        )
    count = 1 if target is None else parse_target(target)[1]
    if len(meshes) != 1 or count not in (1, next(iter(meshes)).size):
        return [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in inputs], target
    (mesh,) = meshes
    if target is not None and count == 1:
        target = f"{os.fspath(target)}x{mesh.size}"
    if not isinstance(mesh, Mesh):  # abstract (a tracer's): laid over the target's devices
        devices = jax.devices()[: mesh.size] if target is None else target_devices(target)
        grid = np.array(devices, dtype=object).reshape(mesh.axis_sizes)
        mesh = Mesh(grid, mesh.axis_names, axis_types=mesh.axis_types)
    avals = [
        jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=NamedSharding(mesh, s.spec if s else PartitionSpec())
        )
        for x, s in zip(inputs, shardings, strict=True)
    ]
    return avals, target


def _tracer_mesh(x: Any) -> Any:
    """The (abstract) mesh in a tracer's type; None for anything else."""
    return getattr(jax.typeof(x).sharding, "mesh", None) if isinstance(x, Tracer) else None


def _on_auto_mesh(x: Any) -> bool:
    """Whether `x` is a tracer on a mesh of several devices whose axes are all Auto."""
    mesh = _tracer_mesh(x)
    return (
        mesh is not None
        and mesh.size > 1
        and all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    )


def _mesh_sharding(x: Any) -> NamedSharding | None:
    """`x`'s sharding over a mesh of several devices, where it is known: an array's or a
    `ShapeDtypeStruct`'s, or a tracer's under `Explicit` mesh axes (its type's sharding
    names an abstract mesh: the check lays it over the target's devices)."""
    if isinstance(x, Tracer):
        mesh = _tracer_mesh(x)
        explicit = mesh is not None and any(
            t == jax.sharding.AxisType.Explicit for t in mesh.axis_types
        )
        return jax.typeof(x).sharding if explicit and mesh.size > 1 else None
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding
    return None


def gradient_computation(fun: Callable[..., Any], is_step: bool) -> Callable[..., Any]:
    """What gets compiled: a train step (which takes its gradient inside) as it is; a
    loss as its value and its VJP with respect to every array argument, for a cotangent
    of ones (what `jax.value_and_grad(fun)` computes, with the arguments' gradients too).
    The plan check (`gradient_program`) compiles the same computation."""
    if is_step:
        return fun

    def value_and_gradient(*args: Any, **kwargs: Any) -> Any:
        leaves, tree = jax.tree.flatten((args, kwargs))
        arrays = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]

        def of_arrays(*xs: Any) -> Any:
            merged = list(leaves)
            for i, x in zip(arrays, xs, strict=True):
                merged[i] = x
            a, k = jax.tree.unflatten(tree, merged)
            return fun(*a, **k)

        value, pullback = jax.vjp(of_arrays, *(leaves[i] for i in arrays))
        return value, pullback(jax.tree.map(_ones_cotangent, value))

    return value_and_gradient


def compile_both(
    plain: Callable[..., Any],
    planned: Callable[..., Any],
    is_step: bool,
    target: str | os.PathLike | None,
    args: tuple,
    kwargs: dict,
) -> CompiledComparison:
    """Compile the gradient computation of `plain` and of `planned` (the same function
    under `het_offload`) for `target` (None: the local backend)."""
    without = _compiled(gradient_computation(plain, is_step), target, args, kwargs)
    if planned is plain:
        return CompiledComparison(without[0], without[0], without[1], without[1])
    with_plan = _compiled(gradient_computation(planned, is_step), target, args, kwargs)
    return CompiledComparison(without[0], with_plan[0], without[1], with_plan[1])


def _compiled(
    fun: Callable[..., Any], target: str | os.PathLike | None, args: tuple, kwargs: dict
) -> tuple[CompiledMemory, StepEstimate | None]:
    """The compiled memory of `fun` and its predicted step time (None where unknown)."""
    compiled = compile_for(fun, *args, target=target, **kwargs)
    memory = CompiledMemory.of(compiled, "local" if target is None else os.fspath(target))
    try:
        return memory, simulate_step(compiled, target)
    except ValueError as e:  # a GPU without a shipped description
        warn_once(f"hetjax: no predicted step time: {e}")
        return memory, None


Inputs = list[Any]
# (program, decisions) -> (peak bytes, predicted step ms, predicted kernel ms)
_compiles: dict[tuple, tuple[int, float | None, float | None]] = {}


def checked_plan(primal: Any, inputs: Inputs, usage: Usage, options: dict) -> Plan:
    """The plan of `options["policy"]` ("auto" or "all") for `usage`, checked against the
    compiler of `options["target"]` (None: the local GPU). See the module docstring."""
    started, compiles = time.perf_counter(), 0
    policy, budget = options["policy"], options["device_budget"]
    avals, target = check_target(inputs, options.get("target"))
    where = "the local GPU" if target is None else os.fspath(target)
    min_bytes, profile = options["min_bytes"], options["profile"]
    program = (_program_key(primal, avals), where)
    unrolled = options.get("unroll_scans", False)

    def compiled(plan: Plan | None) -> tuple[int, float | None]:
        """(compiled peak bytes, predicted step ms) of the gradient computation."""
        nonlocal compiles
        # An unrolled program's plan is another program's, whatever its decisions.
        key = (program, None if plan is None else (unrolled, _decisions(plan)))
        if key not in _compiles:
            compiles += 1
            fun = gradient_program(primal, usage, plan)
            memory, step = _compiled(fun, target, tuple(avals), {})
            _compiles[key] = (memory.peak_bytes, *((None, None) if step is None
                              else (step.step_ms, step.compute_ms)))  # fmt: skip
        return _compiles[key][:2]

    def peak(plan: Plan) -> int:
        return compiled(plan)[0]

    plain, plain_ms = compiled(None)
    # A budget's plans space their copies by the cost model's clock calibrated to the
    # compiled kernels (XLA fuses what the model charges per equation: on the reference
    # gpt, H200, jax 0.11.2, the clock ran 2.9x slow and the pins left each copy 70% of
    # its link time). "auto" without a budget keeps the model's own clock: its order is
    # trimmed by compiled step times, and the model's optimism about hiding gives it
    # more to choose from (reference mlp: 0.83 of plain's temp so, 0.89 calibrated).
    plain_kernel_ms = _compiles[(program, None)][2]
    budget_profile = profile
    if plain_kernel_ms is not None:
        budget_profile = calibrated(profile or DeviceProfile.for_platform("gpu"), usage.eqns,
                                    plain_kernel_ms / 1e3)  # fmt: skip
    unchanged = make_plan(usage, "none", min_bytes=min_bytes, profile=profile)
    # Nothing moved, the rewrite is plain's program, except where it ties a max pool's
    # gradient to its cotangent (`_rewrite.bind_backward`): that one is compiled (the
    # reference cnn, H200, jax 0.11.2: a train step's temp 0.75 of plain's).
    tied = ties_a_pool(usage)
    nothing = (unchanged, peak(unchanged) if tied else plain)
    # Without a budget, "auto" takes the moves the cost model expects to hide, then
    # chains, in its order (or, where no prefix of that helps, the chains alone); a
    # budget takes the greedy order that lowers the modelled peak fastest.
    speed_first = policy == "auto" and budget is None

    def prefix_of(
        order: list, speed_first: bool = speed_first, profile: DeviceProfile | None = profile
    ) -> Callable[[int], Plan]:
        return lambda k: make_plan(usage, "auto", min_bytes=min_bytes, profile=profile,
                                   speed_first=speed_first, choices=dict(order[:k]))  # fmt: skip

    def step_ms_of(plan: Plan) -> float | None:
        return plain_ms if plan is unchanged and not tied else compiled(plan)[1]

    def rebuilt(move: bool, profile: DeviceProfile | None = profile) -> list[tuple[Plan, int]]:
        """`rebuild_choices`' plan and its peak; none where it chooses nothing."""
        choices = rebuild_choices(usage, min_bytes, profile, move)
        if not choices:
            return []
        plan = make_plan(usage, "auto", min_bytes=min_bytes, profile=profile,
                         speed_first=False, choices=choices)  # fmt: skip
        return [(plan, peak(plan))]

    def by_chains(order: list, profile: DeviceProfile | None) -> list[tuple[Plan, int]]:
        """Every residual of the greedy `order` that a chain may rebuild, rebuilt, and nothing
        moved; where that misses the budget, the values those chains start from moved, one
        group (`_plan.anchor_groups`) at a time, each kept where it lowers the peak, until
        it is met; then the moves `_plan.chains_and_moves` picks instead of their chains,
        one group (`_plan.move_groups`) at a time, each kept where the plan still meets the
        budget (or its peak so far) and its predicted step time falls; then all of them;
        with their peaks. Where the order's shortest prefix that meets the budget moves a
        layer's checkpoints too, rebuilding each layer from kept checkpoints may meet it
        faster. (The reference gpt's train step at remat's peak, H200, jax 0.11.2: every
        chain rebuilt met it at 191 ms predicted, 0.93 of remat's extra flops, where the
        order's prefix took 222 ms and 1.05, moving 1.5 GiB. With all 13 moves (1.8 GiB),
        its loss gradient: 0.71 of remat's extra flops, but 1.09 of remat's peak and 200.7
        ms against 185.9 without them. Its five MLP hiddens alone: 0.985 of the peak, 0.74
        of the extra flops, 184.3 ms; beside the attention outputs' 64 MiB copies, XLA
        started each hidden's late.)"""
        # TODO: hide the copies XLA still starts late. The pins place only a copy's
        # done; XLA's scheduler places its start. With all 13 moves of the reference
        # gpt's loss gradient at remat's peak (H200, jax 0.11.2) it started each 256 MiB
        # MLP-hidden copy a layer after the value was made, five loop fusions before the
        # pinned done (1.5 ms of 5.5 on the link). Split in four slices along the
        # leading axis, each slice's done pinned a quarter further on, fetched back one
        # by one and joined, the 12 moves that meet the budget hid (186.7 ms predicted
        # against 201.1), but the compiled peak rose from 8473 to 8985 MiB where XLA's
        # own live ranges peak at 8138 MiB either way (128 MiB slices: 9113; 32 MiB:
        # 8825 at 210.9 ms). Not kept. (Read then as a badly packed heap, not checked:
        # the compiled peak sums the peaks of the outputs and of the temp heap, which
        # a live-range peak does not; see `_memory.plan_timeline`.)
        # The reference gpt_scan unrolled at remat's peak, every chain and each layer's
        # stream after its attention moved, every other layer's 256 MiB MLP hidden moved
        # too (0.70 of remat's extra flops; H200, jax 0.11.2, schedule walked per copy):
        # 219.9 ms predicted, 33.7 exposed, against 189.3 without the hiddens. Forward,
        # the pins bind: each hidden's done is pinned 6.1 ms after it is made by the
        # model's clock, which runs 1.4x slow there (two layers: 14.6 ms against 10.5
        # compiled), so 3 ms after its start for 5.5 ms on the link; with two in flight
        # and a slack of 2.5 (hand-patched, not kept: every plan's pins would move) each
        # waits 0.5 ms at most. Backward (the clock within 10% of the compiled: 20.9 ms
        # per two layers against 22.9), XLA starts each hidden's fetch 2.4-2.8 ms before
        # its done, where `prefetch_at` allowed 6.7 ms: 2.3-2.7 ms waits each, at a
        # slack of 1.3 or 2.5. XLA gives a host copy a fixed latency, whatever its
        # bytes: a fetch tied early, then 300 small kernels and a fixed matmul, started
        # 86 kernels (2.8 ms predicted) before its done at every size from 32 to 512 MiB
        # (exposed from 256 MiB on); among small matmuls instead, 5.0-5.4 ms: the latency
        # is counted in XLA's own kernel estimates. Fetching slices of the host copy
        # compiles to kernels that read host memory (no async copy): pieces small enough
        # for that window must go to host as arrays of their own.
        chains, moved = chains_and_moves(usage, order, min_bytes, profile)
        if not chains:
            return []

        def planned(choices: dict) -> tuple[Plan, int, float]:
            plan = make_plan(usage, "auto", min_bytes=min_bytes, profile=profile,
                             speed_first=False, choices=choices)  # fmt: skip
            peak_bytes, ms = compiled(plan)
            return plan, peak_bytes, np.inf if ms is None else ms

        plan, best_peak, best_ms = planned(chains)
        found, best = [(plan, best_peak)], chains
        # Over the budget, the values the chains start from move, a line of code at a
        # time, until it is met: no flops added. (The reference gpt_scan unrolled, its
        # loss gradient at remat's peak, 10.12 GB, H200, jax 0.11.2: every chain
        # rebuilt, 10.36 GB at 189.1 ms predicted; with each layer's stream after its
        # attention moved, 0.75 GiB, 9.62 GB at 189.3 ms.)
        for group in anchor_groups(usage, plan.residuals, min_bytes)[:ANCHOR_GROUPS]:
            if best_peak <= budget:
                break
            trial = {**best, **group}
            plan, peak_bytes, ms = planned(trial)
            found.append((plan, peak_bytes))
            if peak_bytes < best_peak:
                best, best_peak, best_ms = trial, peak_bytes, ms
        base = best
        for group in move_groups(usage, moved, profile):
            trial = {**best, **group}
            plan, peak_bytes, ms = planned(trial)
            found.append((plan, peak_bytes))
            if peak_bytes <= max(budget, best_peak) and ms < best_ms:
                best, best_peak, best_ms = trial, peak_bytes, ms
        if moved:
            found.append(planned({**base, **moved})[:2])
        return found

    def without_largest(plan: Plan, plain: int) -> list[tuple[Plan, int]]:
        """`plan` less its 1, 2, then 4 largest moves, until one compiles below `plain`."""
        moved = sorted(plan.offloaded, key=lambda r: -r.nbytes)
        found = []
        for k in (1, 2, 4):
            if k >= len(moved):
                break
            left_out = {r.index for r in moved[:k]}
            fewer = make_plan(usage, lambda r: r.index not in left_out, min_bytes=min_bytes,
                              profile=profile)  # fmt: skip
            found.append((fewer, peak(fewer)))
            if found[-1][1] < plain:
                break
        return found

    def placed_again(plan: Plan) -> list[tuple[Plan, int]]:
        """`plan`'s moves, their pins placed again without the moves `plan` keeps for
        want of a window (`_plan._with_pins` leaves the other pins where that move's
        copies put them); none where it keeps none. (Hugging Face's GPT-2, as below,
        H200, jax 0.11.2: its 1.5 GiB `exp` kept, 0.88 of plain's temp; placed again
        without it, 0.66.)"""
        moved = {r.index for r in plan.offloaded}
        again = make_plan(usage, lambda r: r.index in moved, min_bytes=min_bytes, profile=profile)
        return [] if _decisions(again) == _decisions(plan) else [(again, peak(again))]

    def fastest_saving() -> tuple[Plan, int]:
        """ "auto" without a budget: `unchanged` where nothing saves memory in time."""
        limit = plain_ms * (1 + AUTO_SLOWDOWN)
        with_moves, chains_alone = hiding_order(usage, min_bytes, profile)
        orders = [with_moves, chains_alone] if with_moves != chains_alone else [with_moves]
        for order in orders:
            plan, planned = _fastest_saving(
                prefix_of(order, True), len(order), compiled, limit, nothing
            )
            if plan is not unchanged:
                break
        return plan, planned

    if speed_first and plain_ms is not None:
        plan, planned = fastest_saving()
        if plan is unchanged and planned >= plain:
            warn_once(
                f"hetjax: policy='auto' moves nothing here: no plan along its order of moves "
                f"and recomputations compiles below the {plain:,} bytes peak without it, for "
                f"{where}, with a predicted step time within {AUTO_SLOWDOWN:.0%} of plain's "
                f"({plain_ms:.1f} ms). A device_budget trades time for memory."
            )
    elif budget is None or policy == "all":
        plan = make_plan(usage, policy, min_bytes=min_bytes, profile=profile)
        planned = peak(plan)
        if policy == "all":
            # Moving what XLA would rebuild forces it to exist: move what it rebuilds from
            # (the reference cnn, H200, jax 0.11.2, its pool's gradient still whole: moving
            # all, 0.99 of plain's peak at 21x its predicted time; every chain without a
            # matmul rebuilt and the rest moved, 0.70 at 4.5x; in pieces, that one 0.43),
            # or, above plain, leave the largest moves out (an f32 value XLA fuses away
            # from its bf16 source: Hugging Face's GPT-2, 2 layers, bf16, 8 x 1024
            # tokens: moving all, 1.30x plain's peak; all but the softmax's 1.5 GiB f32
            # `exp` of the logits, 0.68x). The lowest peak wins; within NEAR_PEAK of it,
            # the fastest plan.
            candidates = [(plan, planned), *rebuilt(move=True), *placed_again(plan)]
            if planned > plain:
                candidates += without_largest(plan, plain)
            lowest = min(p for _, p in candidates)
            plan, planned = min(
                (c for c in candidates if c[1] <= lowest * (1 + NEAR_PEAK)),
                key=lambda c: (step_ms_of(c[0]) or np.inf, c[1]),
            )
        if planned > plain:
            warn_once(
                f"hetjax: policy={policy!r} moves nothing here: its plan compiles to a peak "
                f"of {planned:,} bytes for {where}, above the {plain:,} bytes without it."
            )
            plan, planned = nothing
    else:
        # What "auto" takes without a budget may meet it already, within 5% of plain's
        # time (the reference gpt_scan: 0.50 of plain's temp, which meets 0.8 of plain's
        # peak, where the budget's own order took 3.21x the time).
        fast = fastest_saving() if plain_ms is not None else nothing
        if fast[1] <= budget:
            plan, planned = fast
        else:
            # The greedy order, with and without moving what the cost model says is
            # cheaper to move than to rebuild (fewer flops: the reference gpt at 0.4 of
            # plain's peak, 1.06x plain's matmul flops against 1.11x, and faster), and
            # every chain rebuilt (the gpt at remat's peak); the fastest plan wins.
            order = budget_order(usage, min_bytes, budget_profile)
            orders = [order, budget_order(usage, min_bytes, budget_profile, worth=False)]
            found = [fast, *by_chains(order, budget_profile)]
            for each in orders[: 1 + (orders[1] != order)]:
                prefix = prefix_of(each, profile=budget_profile)
                found.append(_bisect(prefix, len(each), compiled, budget, nothing))
            if all(p > budget for _, p in found):  # short: try no-matmul rebuilds too
                found += [*rebuilt(False, budget_profile), *rebuilt(True, budget_profile)]
            # Unmet, every plan within NEAR_PEAK of the lowest peak competes: a plan that
            # is lower by a hair may be slower by much.
            lowest = min(p for _, p in found)
            limit = budget if lowest <= budget else lowest * (1 + NEAR_PEAK)
            plan, planned = min(
                (c for c in found if c[1] <= limit),
                key=lambda c: (step_ms_of(c[0]) or np.inf, c[1]),
            )
        if planned > budget:
            warn_once(
                f"hetjax: device_budget={budget:,.0f} bytes cannot be met for {where}: the "
                f"best plan found compiles to a peak of {planned:,} bytes ({plain:,} "
                f"without hetjax)."
            )
    step_ms = step_ms_of(plan)
    return dataclasses.replace(
        plan, policy=policy, device_budget=budget, checked_by=where,
        compiled_plain_peak_bytes=plain, compiled_peak_bytes=planned,
        predicted_plain_step_ms=plain_ms, predicted_step_ms=step_ms,
        check_compiles=compiles, check_seconds=time.perf_counter() - started,
    )  # fmt: skip


def _fastest_saving(
    prefix: Callable[[int], Plan],
    n: int,
    compiled: Callable[[Plan], tuple[int, float | None]],
    limit_ms: float,
    unchanged: tuple[Plan, int],
) -> tuple[Plan, int]:
    """`policy="auto"` without a budget: bisect the greedy order for the longest prefix
    whose predicted step time is at most `limit_ms` (moving more costs more link time,
    near enough), then keep, of the prefixes compiled, the lowest peak below plain's
    among those within the limit; `unchanged` where none is."""
    seen: dict[int, tuple[Plan, int, float]] = {}

    def at(k: int) -> tuple[Plan, int, float]:
        if k not in seen:
            plan = prefix(k)
            peak, ms = compiled(plan)
            seen[k] = (plan, peak, float("inf") if ms is None else ms)
        return seen[k]

    lo, hi = 0, n
    if at(n)[2] <= limit_ms:
        lo = n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at(mid)[2] <= limit_ms:
            lo = mid
        else:
            hi = mid - 1
    fits = [(peak, k) for k, (_, peak, ms) in seen.items() if ms <= limit_ms and k > 0]
    if not fits or min(fits)[0] >= unchanged[1]:
        return unchanged
    peak, k = min(fits)
    return seen[k][0], peak


def _bisect(
    prefix: Callable[[int], Plan],
    n: int,
    compiled: Callable[[Plan], tuple[int, float | None]],
    budget: float,
    unchanged: tuple[Plan, int],
) -> tuple[Plan, int]:
    """The shortest prefix of the greedy order whose plan compiles to at most `budget`
    (fewest bytes moved or recomputed), found by bisection. If none does, the lowest
    peak seen, or the fastest plan whose peak is within `NEAR_PEAK` of it (the reference
    gpt at 0.4 of plain's peak, before checkpoints: 14,189 MiB at 2.40x the predicted
    time, or 14,232 MiB at 1.15x). Without hetjax's rewrite at all (`unchanged`) is a
    candidate too.

    The compiled peak falls along the order, and may rise again near its end (recomputing
    more than XLA schedules well: for a 16-layer, 1024-wide bf16 MLP on 16,384 rows, the
    whole order compiled to 822 MiB and half of it to 506, against 616 without hetjax;
    H200, jax 0.11.2). Where the whole order misses the budget, the prefix is halved
    while that lowers the peak, then the lowest point is narrowed down by thirds, and
    the bisection runs below the first prefix found to meet the budget."""
    seen: dict[int, tuple[Plan, int]] = {}
    step_ms: dict[int, float] = {}

    def at(k: int) -> tuple[Plan, int]:
        if k not in seen:
            plan = prefix(k)
            peak, ms = compiled(plan)
            seen[k], step_ms[k] = (plan, peak), np.inf if ms is None else ms
        return seen[k]

    if unchanged[1] <= budget:
        return unchanged
    low = n
    while at(low)[1] > budget and low // 2 > 0 and at(low // 2)[1] < at(low)[1]:
        low //= 2
    # Still over: the lowest point lies between half and twice `low`; narrow it down
    # by thirds (the reference gpt's loss gradient, H200, jax 0.11.2: 14,232 MiB at 40
    # of its 126 choices, 16,860 MiB at all of them).
    a, b = low // 2, min(2 * low, n)
    while at(low)[1] > budget and b - a > 2 and not any(p <= budget for _, p in seen.values()):
        m1, m2 = a + (b - a) // 3, b - (b - a) // 3
        if at(m1)[1] < at(m2)[1]:
            b = m2
        else:
            a = m1
    meets = [k for k, (_, p) in seen.items() if p <= budget]
    if not meets:
        lowest = min(p for _, p in [*seen.values(), unchanged])
        if unchanged[1] <= lowest * (1 + NEAR_PEAK):
            return unchanged
        near = [k for k, (_, p) in seen.items() if p <= lowest * (1 + NEAR_PEAK)]
        return seen[min(near, key=lambda k: (step_ms[k], seen[k][1]))]
    lo, hi = 0, min(meets)  # at(hi) meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[1] <= budget:
            hi = mid
        else:
            lo = mid + 1
    return at(hi)


def gradient_program(primal: Any, usage: Usage, plan: Plan | None) -> Callable[..., Any]:
    """The gradient computation of `primal` (its flat inputs in), without a plan or
    with `plan`: a train step as it is, a loss as its value and its VJP with respect to
    every input, for a cotangent of ones."""
    if isinstance(usage.program, StepProgram):
        if plan is None:
            return _plain(primal)
        return lambda *xs: run_step(usage, plan, list(xs))
    call = _plain(primal) if plan is None else offloaded_call(primal, lambda _: (usage, plan))
    return gradient_computation(call, is_step=False)  # every flat input is an array


def _plain(primal: Any) -> Callable[..., list]:
    return lambda *xs: eval_jaxpr(primal, (), *xs)


def _ones_cotangent(x: Any) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.ones_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _program_key(primal: Any, avals: list[jax.ShapeDtypeStruct]) -> tuple:
    shapes = tuple((a.shape, str(a.dtype), str(a.sharding)) for a in avals)
    return (hashlib.sha1(str(primal).encode()).hexdigest(), shapes)


def _decisions(plan: Plan) -> tuple:
    return tuple((r.decision, r.offload_by, r.prefetch_at, r.pieces) for r in plan.residuals)
