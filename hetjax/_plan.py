"""Stage 4: plan. A decision per residual: keep, offload (with its two pin points)
or recompute.

Positions follow `_usage`: forward equations first, then backward ones. For an
offloaded residual, `offload_by` is the forward position whose equation waits for
the copy to host (the forward pin), and `prefetch_at` the backward position at
which the copy back to device starts (the backward pin).

Residuals with a cheap recipe (views, elementwise) are recomputed whenever anything
moves. `policy="auto"` may also recompute a residual by its chain (`Usage.chains`:
forward work with matmuls and reductions, from stored values), at the chain's cost in
the cost model. It has two modes:
- with `device_budget=B`: greedily free, at the current predicted peak, the largest
  residual that is idle there (recomputed by its chain where that takes less time than
  its two copies over the link, else moved), until the peak is at most B. The order of
  choices does not depend on B, so a smaller budget never frees fewer bytes.
- with no budget (no-slowdown): move the residuals, biggest idle bytes first, whose
  copies the cost model says hide under compute, then rebuild by chains, cheapest per
  byte freed first, within the same allowance (1% of the step).
`policy="all"` and a callable policy move; they rebuild no chain (but see
`rebuild_choices`, which `_check` tries where the greedy orders fall short). Where the
model says `all`'s or `auto`'s choices raise the peak above plain's, the residuals XLA
would rebuild anyway whose moves do it stay (`_without_harm`).

This stage rests on the memory model alone; `_check` holds its plans against a compiler
where there is one (`budget_order` and `hiding_order` are the orders it searches).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ._cost import DeviceProfile, eqn_seconds, jaxpr_seconds
from ._memory import plan_timeline
from ._trace import runs_a_matmul
from ._usage import Decision, ResidualUsage, Usage

Policy = str | Callable[[ResidualUsage], bool]
POLICIES = ("auto", "all", "none")
NO_SLOWDOWN_FRACTION = 0.01  # exposed transfer time allowed by "auto" with no budget
# Pins give each copy this much more than its link time: a barrier waits where its
# anchor is ready, a little before the pinned equation, and XLA's kernels outrun the
# cost model's (reference mlp, compiled for the H200: one move, 1.9 ms exposed at 1.0).
PIN_SLACK = 1.3
# Copies to host that may be in flight at once when a plan puts speed first: each must
# be done before the production of the IN_FLIGHT_FOR_SPEED-th next moved residual. One
# (the memory-first window) stalled the reference mlp's forward 1.1 ms per copy where
# two hide; but two cost `policy="all"` 320 MiB more there (H200 compiles).
IN_FLIGHT_FOR_SPEED = 2
# A value moved in pieces (`make_plan(pieces=...)`): XLA's scheduler starts each host
# copy a fixed latency before its done, whatever its bytes (about 2.8 ms among small
# kernels, compiled for the H200: `tests/test_simulate.py`), so a fetch longer than that
# waits wherever it is pinned; a piece that fits the window does not. Each piece's copy
# back is pinned done this many times its link time before the next's (the last at the
# first use); the copies to host get two in flight and more slack, since the cost
# model's clock runs slow in a transformer's forward. Reference gpt_scan unrolled at
# remat's loss-gradient peak, every other layer's 256 MiB MLP hidden moved in two pieces
# (H200, jax 0.11.2): 191.8 ms predicted, 2.6 exposed, against 219.9 and 33.7 whole.
# TODO: let the budget search try pieces (there, the split and the join cost about the
# flops saved, so the plan it keeps was still faster); pieces of a leading axis that is
# sharded over devices are untested.
PIECE_STAGGER = 1.2
PIECE_PIN_SLACK = 2.0
PIECE_IN_FLIGHT = 2
# How many chains with a matmul a rebuilt value may rest on, one rebuilt from another's
# value; chains without one (a norm from its layer's checkpoint) do not count. Deeper,
# the backward redoes the forward from further back, layer after layer, all at once.
# With 2: a layer's q, k and v from its normalized input (itself from its norms, from
# the layer's checkpoint), the attention probabilities from q and k. Budgets, H200, jax
# 0.11.2, loss-gradient peaks: counting every chain, a limit of 4 took the reference gpt
# at remat's budget to 9.05 GB (best prefix by hand) against 10.39 with 2, but the
# reference mlp at 0.6 of plain's peak to 0.72 of plain's against 0.62 with 2. Counting
# matmul chains, 2: the gpt's search found 9.36 GB, the mlp 0.62.
MAX_CHAIN_DEPTH = 2
# The compile check's candidate that rebuilds every chain (`chains_and_moves`) goes one
# deeper: a layer's attention output rests on its probabilities and v. With 2 the
# reference gpt missed remat's peak by 7%; with 3 it met it (H200, jax 0.11.2).
LAYER_CHAIN_DEPTH = 3


class HetjaxWarning(UserWarning):
    """hetjax kept something on device, or could not meet a budget."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn about `message` once per process, not once per trace."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, HetjaxWarning, stacklevel=3)


def check_options(
    policy: Any, min_bytes: Any, device_budget: Any, unroll_scans: Any = False
) -> None:
    """Raise `ValueError` (`TypeError` for a flag that is not a bool) naming the bad
    value, at decoration time."""
    if not isinstance(unroll_scans, bool):
        raise TypeError(f"het_offload: unroll_scans must be True or False, got {unroll_scans!r}")
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
    """Decisions for every residual of one program, and what they are predicted to do.

    `baseline_memory` and `predicted_memory` hold the device bytes live at positions
    -1 .. end (index 0 is position -1) without and with the plan.
    """

    residuals: tuple[ResidualUsage, ...]
    profile: DeviceProfile
    policy: str
    device_budget: float | None
    timeline: tuple[float, ...]  # estimated start time of each position, seconds
    boundary: int
    baseline_memory: np.ndarray
    predicted_memory: np.ndarray
    exposed_transfer_s: float
    # Set where the plan was checked against a compiler (`_check`): what it compiled for,
    # and the compiled peak (argument + output - alias + temp) without and with the plan.
    checked_by: str | None = None
    compiled_plain_peak_bytes: int | None = None
    compiled_peak_bytes: int | None = None
    # "auto" without a budget: pins that cost no compute over memory (see `_rewrite`).
    speed_first: bool = False
    # The step time predicted from each compiled schedule (`_simulate`), where known.
    predicted_plain_step_ms: float | None = None
    predicted_step_ms: float | None = None
    # The cost model's time for the chains the plan recomputes (`Usage.chains`).
    recompute_s: float = 0.0
    # The check's cost: compiles made (cached ones not counted) and its wall time.
    check_compiles: int = 0
    check_seconds: float = 0.0

    @property
    def offloaded(self) -> tuple[ResidualUsage, ...]:
        return tuple(r for r in self.residuals if r.decision == "offload")

    @property
    def moved_bytes(self) -> int:
        return sum(r.nbytes for r in self.offloaded)

    @property
    def baseline_peak_bytes(self) -> int:
        return int(self.baseline_memory.max())

    @property
    def predicted_peak_bytes(self) -> int:
        return int(self.predicted_memory.max())

    @property
    def feasible(self) -> bool:
        """Whether the peak meets `device_budget`: the compiled peak where the plan was
        checked against a compiler, else the predicted one."""
        if self.device_budget is None:
            return True
        if self.compiled_peak_bytes is not None:
            return self.compiled_peak_bytes <= self.device_budget
        return self.predicted_peak_bytes <= self.device_budget


def program_timeline(usage: Usage, profile: DeviceProfile) -> np.ndarray:
    """Estimated start time of each position; the last entry is the end of the step.

    An entry of `usage.eqns` may be a number of seconds instead of an equation
    (synthetic records in tests).
    """
    times = [e if isinstance(e, (int, float)) else eqn_seconds(e, profile) for e in usage.eqns]
    return np.concatenate([[0.0], np.cumsum(times)])


def make_plan(
    usage: Usage,
    policy: Policy = "auto",
    *,
    min_bytes: int = 2**20,
    device_budget: float | None = None,
    profile: DeviceProfile | None = None,
    speed_first: bool | None = None,
    choices: Mapping[int, Decision] | None = None,
    pieces: Mapping[int, int] | None = None,
) -> Plan:
    """Decide, for each residual of `usage`, whether to keep, offload or recompute it.
    `speed_first` (default: `"auto"` without a budget) pins for time over memory.
    `choices` (a prefix of `budget_order`) overrides the policy's own. `pieces` maps a
    residual's index to how many arrays it moves as, if it moves (`PIECE_STAGGER`)."""
    check_options(policy, min_bytes, device_budget)
    pieces = check_pieces(usage, pieces or {})
    policy_name = policy if isinstance(policy, str) else getattr(policy, "__name__", "callable")
    if speed_first is None:
        speed_first = policy == "auto" and device_budget is None
    profile, clock, eligible, evaluate = _choices(
        usage, policy, min_bytes, profile, speed_first, pieces
    )
    chosen: dict[int, Decision]
    if choices is not None:
        chosen = dict(choices)
    elif callable(policy):
        chosen = {r.index: "offload" for r in eligible if policy(r)}
    else:
        if policy == "all":
            chosen = {r.index: "offload" for r in eligible}
        elif device_budget is not None:
            chosen = dict(_greedy_choices(usage, eligible, device_budget, evaluate, profile))
            if evaluate(chosen)[1].max() > device_budget:  # unmet: memory before time
                rebuilding = dict(
                    _greedy_choices(usage, eligible, device_budget, evaluate, profile, False)
                )
                if evaluate(rebuilding)[1].max() < evaluate(chosen)[1].max():
                    chosen = rebuilding
        else:
            allowed = clock[-1] * NO_SLOWDOWN_FRACTION
            chosen = dict(_no_slowdown(usage, eligible, allowed, evaluate, profile))
        chosen = _without_harm(usage, chosen, evaluate)
    records, predicted, exposed = evaluate(chosen)
    # Without hetjax: every record as traced (no checkpoint stored), kept.
    kept = [dataclasses.replace(r, decision="keep") for r in usage.residuals]
    baseline = plan_timeline(usage, kept)
    rebuilt = [k for k, d in chosen.items() if d == "recompute"]
    plan = Plan(
        records, profile, policy_name, device_budget, tuple(float(t) for t in clock),
        usage.boundary, baseline, predicted, exposed, speed_first=speed_first,
        recompute_s=sum(chain_seconds(usage, k, profile) for k in rebuilt),
    )  # fmt: skip
    if not plan.feasible:
        short = plan.predicted_peak_bytes - device_budget
        warn_once(
            f"hetjax: device_budget={device_budget:,.0f} bytes cannot be met: the predicted "
            f"peak is {plan.predicted_peak_bytes:,} bytes, {short:,.0f} over, with every "
            "residual that helps moved to host or recomputed."
        )
    return plan


def _without_harm(
    usage: Usage, chosen: dict[int, Decision], evaluate: Evaluate
) -> dict[int, Decision]:
    """The choices, less, where the model says they raise the peak above plain's, those
    of residuals XLA would rebuild in the backward from stored values (`Usage.fused`)
    whose removal lowers it: moved, such a residual is stored whole (in f32 where its
    source is bf16) until its copy is done. Biggest first. (The tiny cnn's `all`: 1.12x
    plain's predicted peak, 0.93x with one batch norm's value kept.)"""
    peak = evaluate(chosen)[1].max()
    if peak <= evaluate({})[1].max():
        return chosen
    for k in sorted(chosen, key=lambda k: (-usage.residuals[k].nbytes, k)):
        if k in usage.fused:
            trial = {j: d for j, d in chosen.items() if j != k}
            lower = evaluate(trial)[1].max()
            if lower < peak:
                chosen, peak = trial, lower
    return chosen


def chain_seconds(usage: Usage, k: int, profile: DeviceProfile) -> float:
    """The cost model's time to run residual `k`'s chain (`Usage.chains`) again: for a
    residual rebuilt one scan iteration at a time, its equations of the forward scan's
    body, once per iteration."""
    eqns, times = _chain_eqns(usage, k)
    return times * jaxpr_seconds(eqns, profile)


def _chain_eqns(usage: Usage, k: int) -> tuple[list[Any], int]:
    """Residual `k`'s chain as equations, and how many times they run: once, or once per
    iteration of the forward scan whose body they come from."""
    chain = usage.chains[k]
    r = usage.residuals[k]
    if not r.per_iteration:
        return [usage.eqns[e] for e in chain.eqns], 1
    scan = usage.eqns[r.produced_at]
    body = scan.params["jaxpr"].jaxpr.eqns
    return [body[e] for e in chain.eqns], int(scan.params["length"])


def _first_decision(r: ResidualUsage, policy: Policy, min_bytes: int, rebuild: bool) -> str:
    """ "offload" marks an eligible residual; the policy then picks among those. With
    `rebuild`, a residual with a chain is eligible too, moved or not."""
    if policy == "none" or not r.read_in_backward:  # unread: nothing to move
        return "keep"
    if r.recomputable:
        return "recompute"
    if r.is_input or r.nbytes < min_bytes or r.nbytes == 0:
        return "keep"
    if rebuild:
        return "offload"
    if not r.offloadable:
        if r.memory == "device":
            warn_once(
                f"hetjax: keeping a residual of type {r.dtype}{list(r.shape)} produced by "
                f"'{r.primitive}' on device: it cannot be placed in host memory."
            )
        return "keep"
    return "offload"


Evaluate = Callable[[Mapping[int, Decision]], tuple[tuple[ResidualUsage, ...], np.ndarray, float]]


def _moved(records: tuple[ResidualUsage, ...]) -> set[int]:
    """The residuals `records` move: a chosen move with no window is kept (`_with_pins`)."""
    return {r.index for r in records if r.decision == "offload"}


def budget_order(
    usage: Usage, min_bytes: int, profile: DeviceProfile | None = None, worth: bool = True
) -> list[tuple[int, Decision]]:
    """The budget mode's choices (a residual and "offload" or "recompute"), in the order
    it takes them, down to the smallest peak the model can reach: a smaller budget takes
    a longer prefix of it. Without `worth`, it moves nothing a chain may rebuild faster
    than the link carries it, hidden or not (`_greedy_choices`)."""
    profile, _, eligible, evaluate = _choices(usage, "auto", min_bytes, profile)
    return _greedy_choices(usage, eligible, -np.inf, evaluate, profile, worth)


def rebuild_choices(
    usage: Usage, min_bytes: int, profile: DeviceProfile | None = None, move: bool = False
) -> dict[int, Decision]:
    """Every residual whose chain runs no matmul rebuilt from stored values (from matmul
    outputs, where those are checkpoints: what `jax.checkpoint`'s `dots_saveable` keeps),
    and with `move`, every other residual the budget mode may choose moved. No flops
    beyond plain's. The compile check tries it where its greedy orders fall short: XLA
    already rebuilds much of what the memory model counts as stored (the reference cnn's
    f32 batch-norm values), so those orders free bytes that were never held."""
    _, _, eligible, _ = _choices(usage, "auto", min_bytes, profile)
    chosen: dict[int, Decision] = {
        r.index: "recompute"
        for r in eligible
        if r.index in usage.chains and not matmul_in(usage, r.index)
    }
    if move:
        chosen |= {r.index: "offload" for r in eligible if r.offloadable and r.index not in chosen}
    return chosen


def chains_and_moves(
    usage: Usage,
    order: list[tuple[int, Decision]],
    min_bytes: int,
    profile: DeviceProfile | None = None,
) -> tuple[dict[int, Decision], dict[int, Decision]]:
    """Every residual of `order` (`budget_order`) that a chain may rebuild, in order,
    rebuilt (`LAYER_CHAIN_DEPTH` chains with a matmul deep at most), then, largest first,
    any other that frees at least half its bytes at the modelled peak so; and, of those,
    the ones worth moving instead (`_worth_moving`), moved."""
    profile, _, eligible, evaluate = _choices(usage, "auto", min_bytes, profile)
    rebuilt: dict[int, Decision] = {}
    for k, _ in order:
        if _chain_allowed(usage, k, rebuilt, max_depth=LAYER_CHAIN_DEPTH):
            rebuilt[k] = "recompute"
    # The order stops where the modelled peak stops falling; the last layer's q, k and v
    # come after it (the reference gpt at remat's peak, H200, jax 0.11.2: rebuilt, the
    # plan met it, 0.985 of the budget; without them, 1.023). A residual its chain rebuilds
    # where it is needed at the peak (the logits' 2 GiB `exp`) frees nothing there.
    peak = evaluate(rebuilt)[1].max()
    for r in sorted(eligible, key=lambda r: (-r.nbytes, r.index)):
        if r.index in rebuilt or not _chain_allowed(
            usage, r.index, rebuilt, max_depth=LAYER_CHAIN_DEPTH
        ):
            continue
        trial = {**rebuilt, r.index: "recompute"}
        trial_peak = evaluate(trial)[1].max()
        if peak - trial_peak >= r.nbytes / 2:
            rebuilt, peak = trial, trial_peak
    worth = _worth_moving(usage, eligible, evaluate, profile)
    return rebuilt, {k: "offload" for k in rebuilt if k in worth}


def move_groups(
    usage: Usage, moves: Mapping[int, Decision], profile: DeviceProfile | None = None
) -> list[dict[int, Decision]]:
    """`moves` (`chains_and_moves`' second half) grouped by the line of code that makes
    them, which in a stack of layers is the same value in every layer; the group whose
    chain takes longest first. The compile check takes them one group at a time: beside
    other moves XLA may start a copy late (the reference gpt's MLP hiddens, beside its
    attention outputs), so moves that save few flops can cost more link time than they
    save (`_check`)."""
    profile = profile or DeviceProfile.for_platform("gpu")
    return _by_line(
        usage.residuals, moves, lambda g: -max(chain_seconds(usage, k, profile) for k in g)
    )


def anchor_groups(
    usage: Usage, records: tuple[ResidualUsage, ...], min_bytes: int
) -> list[dict[int, Decision]]:
    """The residuals a plan (`records`) keeps on device and rebuilds chains from (a
    layer's stream between its sublayers), moved, grouped by the line of code that
    makes them, most bytes first. Moving them adds no flops: where every chain rebuilt
    (`chains_and_moves`) misses a budget, the compile check moves them a group at a
    time until it is met (`_check`). A scan's per-iteration chains start from slices of
    stacks, which are not among them."""
    by_index = {r.index: r for r in records}
    anchors = {
        a
        for r in records
        if r.decision == "recompute" and not r.per_iteration and r.index in usage.chains
        for a in usage.recipe_of(r.index).residual_anchors
    }
    moves: dict[int, Decision] = {
        k: "offload"
        for k in anchors
        if (r := by_index[k]).decision == "keep" and r.memory == "device" and r.offloadable
        and not r.is_input and not r.per_iteration and r.nbytes >= max(min_bytes, 1)
    }  # fmt: skip
    return _by_line(records, moves, lambda g: -sum(by_index[k].nbytes for k in g))


def _by_line(
    records: Iterable[ResidualUsage],
    choices: Mapping[int, Decision],
    order: Callable[[dict[int, Decision]], float],
) -> list[dict[int, Decision]]:
    """`choices` grouped by the line of code that makes each residual (in a stack of
    layers, the same value of every layer), the groups by `order`, least first."""
    source = {r.index: r.source for r in records}
    groups: dict[str, dict[int, Decision]] = {}
    for k in sorted(choices):
        groups.setdefault(source[k], {})[k] = choices[k]
    return sorted(groups.values(), key=lambda g: (order(g), min(g)))


def _choices(
    usage: Usage,
    policy: Policy,
    min_bytes: int,
    profile: DeviceProfile | None,
    speed_first: bool = False,
    pieces: Mapping[int, int] | None = None,
) -> tuple[DeviceProfile, np.ndarray, list[ResidualUsage], Evaluate]:
    """The profile, the clock, the residuals a policy may move (or, for "auto",
    recompute by a chain), and how a set of choices evaluates: `(records, predicted
    memory, exposed seconds)`."""
    in_flight = IN_FLIGHT_FOR_SPEED if speed_first else 1
    profile = profile or DeviceProfile.for_platform("gpu")
    clock = program_timeline(usage, profile)
    rebuild = policy == "auto"
    first = {r.index: _first_decision(r, policy, min_bytes, r.index in usage.chains and rebuild)
             for r in usage.residuals}  # fmt: skip
    eligible = [r for r in usage.residuals if first[r.index] == "offload"]
    if rebuild:  # a checkpoint a chain starts from may move too (`_greedy_choices`)
        eligible += [r for r in usage.residuals
                     if r.checkpoint and r.offloadable and r.nbytes >= min_bytes]  # fmt: skip
    base = {k: ("keep" if d == "offload" else d) for k, d in first.items()}

    def evaluate(
        chosen: Mapping[int, Decision],
    ) -> tuple[tuple[ResidualUsage, ...], np.ndarray, float]:
        decided = {k: chosen.get(k, d) for k, d in base.items()}
        if not chosen:
            # Recomputing alone saves nothing XLA does not save itself: compiled for the
            # H200 it cost up to 56% more temp (reference cnn). Without a move, keep.
            decided = {k: ("keep" if d == "recompute" else d) for k, d in decided.items()}
        records = _with_pins(usage, decided, clock, profile, in_flight, pieces or {})
        return records, plan_timeline(usage, records), _exposed_seconds(records, clock, profile)

    return profile, clock, eligible, evaluate


def _frees_at(r: ResidualUsage, position: int) -> bool:
    """Whether moving or rebuilding `r` lowers the bytes at `position`: it is idle there,
    or it moves one scan iteration at a time and is held whole there (the scans that
    make and read it hold only slices then)."""
    if r.per_iteration:
        return r.produced_at <= position <= r.last_backward_use
    return r.last_forward_use < position < r.first_backward_use


def _greedy_choices(
    usage: Usage,
    eligible: list[ResidualUsage],
    budget: float,
    evaluate: Evaluate,
    profile: DeviceProfile,
    worth: bool = True,
) -> list[tuple[int, Decision]]:
    """Until the predicted peak is at most `budget`: free the biggest residual idle at
    the peak. Move it where it is among those worth the link (`_worth_moving`, with
    `worth`); else recompute it by its chain where that takes less time than its two
    copies over the link (the link is shared by every move, hidden or not), else move
    it. A move left with no window (`_with_pins`) is rebuilt where a chain may, else
    kept."""
    chosen: dict[int, Decision] = {}
    moving = _worth_moving(usage, eligible, evaluate, profile) if worth else frozenset()
    while True:
        records, memory, _ = evaluate(chosen)
        moved = _moved(records)
        windowless = [k for k, d in chosen.items() if d == "offload" and k not in moved]
        if windowless:  # rebuilt where a chain may, else kept
            for k in windowless:
                chosen[k] = "recompute" if _chain_allowed(usage, k, chosen) else "keep"
            continue
        if memory.max() <= budget:
            return list(chosen.items())
        peak = int(np.argmax(memory)) - 1  # index 0 is position -1
        # As evaluated: a checkpoint is read in the backward once a chain starts there.
        now = [records[r.index] for r in eligible if r.index not in chosen]
        idle = [
            r for r in now
            if r.read_in_backward and _frees_at(r, peak)
            and (r.offloadable or _chain_allowed(usage, r.index, chosen))
        ]  # fmt: skip
        if not idle:
            return list(chosen.items())
        best = max(idle, key=lambda r: (r.nbytes, r.idle_span, -r.index))
        link_s = profile.d2h_seconds(best.nbytes) + profile.h2d_seconds(best.nbytes)
        rebuild = _chain_allowed(usage, best.index, chosen) and (
            not best.offloadable
            or (best.index not in moving and chain_seconds(usage, best.index, profile) < link_s)
        )
        chosen[best.index] = "recompute" if rebuild else "offload"


def _worth_moving(
    usage: Usage, eligible: list[ResidualUsage], evaluate: Evaluate, profile: DeviceProfile
) -> frozenset[int]:
    """The residuals cheaper to move than to rebuild, taken in order of their chains'
    time, costliest first: each where the link time it adds beyond what hides under
    compute (the queue model of `evaluate`) is less than its chain's time. Each move
    narrows the window of the one before it (a copy must be done before the next moved
    residual is made), so the link goes first to what saves the most recomputation
    (the reference gpt: its MLP's hidden layer, every other layer; taken by time per
    byte, the attention's small outputs went first and left q, k and v no window).
    Residuals moved one scan iteration at a time are left out: the compiled schedule's
    copies into a host stack (`_simulate`) do not hide.
    # TODO: a GPU run to say whether per-iteration copies hide (the planner's queue
    # model says they do).
    """
    rebuildable = [
        r for r in eligible
        if r.offloadable and not r.per_iteration and r.index in usage.chains
        and matmul_in(usage, r.index)
    ]  # fmt: skip
    # Outputs of one equation (a layer's q, k and v, split from one matmul) share their
    # chain: moving some of them saves nothing. They move together or not at all.
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in rebuildable:
        groups.setdefault(usage.chains[r.index].eqns, []).append(r.index)
    cost = {g: chain_seconds(usage, ks[0], profile) for g, ks in groups.items()}
    moved: dict[int, Decision] = {}
    exposed = 0.0
    for g in sorted(groups, key=lambda g: (-cost[g], groups[g])):
        trial = {**moved, **dict.fromkeys(groups[g], "offload")}
        records, _, trial_exposed = evaluate(trial)
        added = trial_exposed - exposed
        if added < cost[g] and _moved(records) >= set(trial):
            moved, exposed = trial, exposed + added
    return frozenset(moved)


def _chain_allowed(
    usage: Usage,
    k: int,
    chosen: Mapping[int, Decision],
    every_chain: bool = False,
    max_depth: int = MAX_CHAIN_DEPTH,
) -> bool:
    """Whether residual `k` may be rebuilt by its chain, given the choices so far: no
    value may then rest on more than `MAX_CHAIN_DEPTH` chains with a matmul (with
    `every_chain`, chains of any kind), one rebuilt from another's value; a scan's
    per-iteration values, on any number."""
    if k not in usage.chains:
        return False
    depth = chain_depths(usage, {**chosen, k: "recompute"}, every_chain)
    # A scan's per-iteration values rest on slices of their own iteration: however deep
    # their chains, the backward loop redoes one layer, as per-layer `jax.checkpoint`
    # does (the reference gpt_scan at remat's peak, H200, jax 0.11.2: its attention
    # output, rebuilt, 0.95 of the budget at 197.7 ms predicted; limited to 3 deep, it
    # moved instead, 0.97 at 233.7 ms, the copies into a host stack not hidden).
    looped = {r.index for r in usage.residuals if r.per_iteration}
    return all(d <= max_depth for j, d in depth.items() if j not in looped)


def chain_depths(
    usage: Usage, chosen: Mapping[int, Decision], every_chain: bool = False
) -> dict[int, int]:
    """For each residual `chosen` rebuilds, how many chains with a matmul (with
    `every_chain`, chains of any kind) it rests on, one rebuilt from another's value."""
    depth: dict[int, int] = {}

    def of(j: int) -> int:
        if j not in depth:
            rebuilt = chosen.get(j) == "recompute" or j in usage.recipes
            recipe = usage.recipe_of(j) if rebuilt else None
            counts = recipe is not None and recipe.chain and (every_chain or matmul_in(usage, j))
            depth[j] = (
                0
                if recipe is None
                else counts + max((of(a) for a in recipe.residual_anchors), default=0)
            )
        return depth[j]

    return {j: of(j) for j, d in chosen.items() if d == "recompute"}


def matmul_in(usage: Usage, k: int) -> bool:
    """Whether residual `k`'s chain runs a matmul (or a convolution), nested ones too."""
    return runs_a_matmul(_chain_eqns(usage, k)[0])


def _no_slowdown(
    usage: Usage,
    eligible: list[ResidualUsage],
    allowed_s: float,
    evaluate: Evaluate,
    profile: DeviceProfile,
) -> list[tuple[int, Decision]]:
    """Move what hides under compute: biggest idle bytes first, while exposure is ~0.
    Then rebuild by chains, cheapest per byte freed first, within what is left of
    `allowed_s`."""
    return _hiding_choices(usage, eligible, allowed_s, evaluate, profile, allowed_s)


def _hiding_choices(
    usage: Usage,
    eligible: list[ResidualUsage],
    allowed_s: float,
    evaluate: Evaluate,
    profile: DeviceProfile,
    chain_allowance_s: float,
) -> list[tuple[int, Decision]]:
    """`_no_slowdown`'s choices, in the order it takes them: the chains it takes cost at
    most `chain_allowance_s` with the exposed link time."""
    moved: list[int] = []
    movable = [r for r in eligible if r.offloadable and r.index not in usage.checkpoints]
    for r in sorted(movable, key=lambda r: (-r.nbytes * r.idle_span, r.index)):
        records, _, exposed = evaluate(dict.fromkeys([*moved, r.index], "offload"))
        if exposed <= allowed_s and r.index in _moved(records):
            moved.append(r.index)
    chosen: dict[int, Decision] = dict.fromkeys(moved, "offload")
    spent = evaluate(chosen)[2] if moved else 0.0
    # Speed first, chains start from residuals only, and any chain counts toward the
    # depth: the gradient pieces are not tied then (`_rewrite`: ties cost time there),
    # and XLA computed the weight gradients of deeply rebuilt layers last, holding their
    # activation gradients (reference gpt, H200, jax 0.11.2: "auto" compiled to 0.93 of
    # plain's temp with checkpoints and four chains deep, 0.78 as here).
    cost = {r.index: chain_seconds(usage, r.index, profile)
            for r in eligible if r.index in usage.chains and r.index not in chosen
            and usage.checkpoints.isdisjoint(usage.chains[r.index].residual_anchors)}  # fmt: skip
    # Cheapest per byte and position freed: a residual read as soon as the backward
    # starts (the logits) frees nothing when rebuilt.
    freed = {r.index: r.nbytes * max(r.idle_span, 0) for r in eligible if r.index in cost}
    for k in sorted(cost, key=lambda k: (cost[k] / freed[k] if freed[k] else np.inf, k)):
        if spent + cost[k] <= chain_allowance_s and _chain_allowed(usage, k, chosen, True):
            chosen[k] = "recompute"
            spent += cost[k]
    return list(chosen.items())


def hiding_order(
    usage: Usage, min_bytes: int, profile: DeviceProfile | None = None
) -> tuple[list[tuple[int, Decision]], list[tuple[int, Decision]]]:
    """The choices of `policy="auto"` without a budget, in the order it takes them: the
    moves the cost model says hide under compute (biggest idle bytes first), then every
    residual a chain can rebuild, cheapest per byte first; and the chains alone, with no
    move. A shorter prefix risks less; the compile check (`_check`) takes the longest
    within its time limit."""
    profile, clock, eligible, evaluate = _choices(usage, "auto", min_bytes, profile, True)
    allowed = clock[-1] * NO_SLOWDOWN_FRACTION
    choices = _hiding_choices(usage, eligible, allowed, evaluate, profile, np.inf)
    alone = _hiding_choices(usage, eligible, -np.inf, evaluate, profile, np.inf)  # no move
    return choices, alone


def _first_need(
    records: dict[int, ResidualUsage], decided: dict[int, str], usage: Usage
) -> tuple[dict[int, int], dict[int, int]]:
    """Backward position at which each residual is first needed, recomputes included;
    and, for each checkpoint a chosen chain starts from, the last such position."""
    end = len(usage.eqns)
    need = {k: end if k in usage.checkpoints else r.first_backward_use
            for k, r in records.items()}  # fmt: skip
    last: dict[int, int] = {}

    def visit(k: int, at: int) -> None:
        need[k] = min(need[k], at)
        if k in usage.checkpoints:
            last[k] = max(last.get(k, at), at)
        if decided[k] == "recompute" and (k in usage.recipes or k in usage.chains):
            for a in usage.recipe_of(k).residual_anchors:
                visit(a, at)

    for k, d in decided.items():
        if d == "recompute":
            visit(k, records[k].first_backward_use)
    return need, last


def _read_checkpoints(
    records: dict[int, ResidualUsage], need: dict[int, int], last: dict[int, int]
) -> dict[int, ResidualUsage]:
    """`records` with each checkpoint a chain starts from read in the backward, from the
    first to the last recomputation that reads it."""
    return records | {
        k: dataclasses.replace(
            records[k], read_in_backward=True, first_backward_use=need[k], last_backward_use=at
        )
        for k, at in last.items()
    }


def _with_pins(
    usage: Usage,
    decided: dict[int, str],
    clock: np.ndarray,
    profile: DeviceProfile,
    in_flight: int = 1,
    pieces: Mapping[int, int] | None = None,
) -> tuple[ResidualUsage, ...]:
    """Records with decisions and the forward and backward pin positions.

    A queue model of each link direction gives when each copy can finish (forward)
    or must start (backward). A window then bounds memory when the link is the
    bottleneck: a copy to host must finish before the `in_flight`-th next moved residual
    is produced, and a copy back must not start before the previously needed one is
    consumed. So at most about `in_flight` + 1 moved residuals are in flight at a time.

    A move whose copy to host is not done before its copy back must start (both pinned
    at the forward's end) frees nothing and costs the link both ways: it is kept (the
    reference mlp's hiding order, H200, jax 0.11.2: XLA held the device copy of such a
    residual through the backward). The other pins stay where they were placed with it:
    placed again, the copy before it would be pinned at the forward's end too, and so on.
    """
    by_index = {r.index: r for r in usage.residuals}
    need, last = _first_need(by_index, decided, usage)  # keeping a move changes neither
    by_index = _read_checkpoints(by_index, need, last)
    # (`check_pieces` has refused pieces of a value moved one scan slice at a time.)
    pieces = {k: n for k, n in (pieces or {}).items() if decided.get(k) == "offload"}
    pins = _pin_positions(usage, by_index, need, decided, clock, profile, in_flight, pieces)
    windowless = [
        k for k, at in pins.items()
        if not by_index[k].per_iteration and at["offload_by"] >= at["prefetch_at"]
    ]  # fmt: skip
    decided = {**decided, **dict.fromkeys(windowless, "keep")}
    for k in windowless:
        del pins[k]
        pieces.pop(k, None)
    for k, n in pieces.items():
        pins[k]["pieces"] = n
    return tuple(
        dataclasses.replace(by_index[r.index], decision=decided[r.index], **pins.get(r.index, {}))  # type: ignore[arg-type]
        for r in usage.residuals
    )


def _pin_positions(
    usage: Usage,
    by_index: dict[int, ResidualUsage],
    need: dict[int, int],
    decided: dict[int, str],
    clock: np.ndarray,
    profile: DeviceProfile,
    in_flight: int,
    pieces: Mapping[int, int],
) -> dict[int, dict[str, int]]:
    """`offload_by` and `prefetch_at` of each moved residual (`_with_pins`), from the
    records `by_index` and first needs `need` of `_first_need`."""
    residuals = [by_index[r.index] for r in usage.residuals]
    moved = [r for r in residuals if decided[r.index] == "offload"]

    def backward_from(r: ResidualUsage) -> int:
        return usage.boundary if r.backward_from is None else r.backward_from

    pins: dict[int, dict[str, int]] = {r.index: {} for r in moved}

    link_free = 0.0
    by_production = sorted(moved, key=lambda r: (r.produced_at, r.index))
    productions = sorted({r.produced_at for r in moved})
    for r in by_production:
        split = pieces.get(r.index, 1) > 1
        slack = PIECE_PIN_SLACK if split else PIN_SLACK
        flight = max(in_flight, PIECE_IN_FLIGHT) if split else in_flight
        link_free = max(clock[_copy_starts(r)], link_free) + slack * profile.d2h_seconds(r.nbytes)
        pos = int(np.searchsorted(clock, link_free, side="left"))
        later = [p for p in productions if p > r.produced_at]
        end_fwd = backward_from(r)
        pos = min(pos, later[flight - 1] + 1 if len(later) >= flight else end_fwd)
        pins[r.index]["offload_by"] = int(np.clip(pos, r.last_forward_use + 1, end_fwd))

    link_busy_from = np.inf
    needs = sorted({need[r.index] for r in moved})
    for r in sorted(moved, key=lambda r: (-need[r.index], r.index)):
        at = need[r.index]
        link_busy_from = min(clock[_fetch_due(r, at)], link_busy_from) - (
            PIN_SLACK * profile.h2d_seconds(r.nbytes)
        )
        pos = int(np.searchsorted(clock, link_busy_from, side="right")) - 1
        earlier = [n for n in needs if n < at]
        end_fwd = backward_from(r)
        pos = max(pos, earlier[-1] if earlier else end_fwd)
        pins[r.index]["prefetch_at"] = int(np.clip(pos, end_fwd, at))

    for r in moved:
        if r.per_iteration:  # copied inside the scans that make and read it
            pins[r.index] = {"offload_by": r.produced_at + 1, "prefetch_at": need[r.index]}
    return pins


def _copy_starts(r: ResidualUsage) -> int:
    """The position whose start time the copy to host of `r` can start at: after its
    producer, or, moving per iteration, with the scan that makes it (beside it)."""
    return r.produced_at if r.per_iteration else r.produced_at + 1


def _fetch_due(r: ResidualUsage, need: int) -> int:
    """The position by whose start the copy back of `r`, needed at `need`, must be
    done: `need` itself, or, moving per iteration, the end of the scan that reads it
    (each slice is due by its own iteration; the last by the scan's end)."""
    return need + 1 if r.per_iteration else need


def _exposed_seconds(
    records: tuple[ResidualUsage, ...], clock: np.ndarray, profile: DeviceProfile
) -> float:
    """Time the copies add to the step: stalls where a pinned equation waits on the link."""
    moved = [r for r in records if r.decision == "offload"]
    delay = 0.0
    link_free = 0.0
    for r in sorted(moved, key=lambda r: (r.produced_at, r.index)):
        start = max(clock[_copy_starts(r)] + delay, link_free)
        link_free = start + profile.d2h_seconds(r.nbytes)
        delay += max(0.0, link_free - (clock[r.offload_by] + delay))
    for r in sorted(moved, key=lambda r: (r.prefetch_at, r.first_backward_use, r.index)):
        start = max(clock[r.prefetch_at] + delay, link_free)
        link_free = start + profile.h2d_seconds(r.nbytes)
        delay += max(0.0, link_free - (clock[_fetch_due(r, r.first_backward_use)] + delay))
    return delay


def arrival_positions(plan: Plan) -> dict[int, int]:
    """For each residual fetched whole (in one piece), the backward position by which its copy back
    is done by the cost model (its link queue, with `PIN_SLACK`), at most its first use."""
    clock = np.asarray(plan.timeline)
    arrivals: dict[int, int] = {}
    link_free = 0.0
    fetched = [r for r in plan.offloaded if not r.per_iteration and r.pieces < 2]
    for r in sorted(fetched, key=lambda r: (r.prefetch_at, r.first_backward_use, r.index)):
        link_free = max(clock[r.prefetch_at], link_free) + PIN_SLACK * plan.profile.h2d_seconds(
            r.nbytes
        )
        at = int(np.searchsorted(clock, link_free, side="left"))
        arrivals[r.index] = min(at, r.first_backward_use)
    return arrivals


def check_pieces(usage: Usage, pieces: Mapping[int, int]) -> dict[int, int]:
    """`pieces` checked against `usage`: each key a residual's index, each count a
    positive int that divides the residual's leading axis."""
    by_index = {r.index: r for r in usage.residuals}
    for k, n in pieces.items():
        r = by_index.get(k)
        if r is None:
            raise ValueError(f"pieces: {k!r} is not the index of a residual")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"pieces: {n!r} for residual {k} is not a positive int")
        if n > 1 and (not r.shape or r.shape[0] % n):
            raise ValueError(
                f"pieces: residual {k} ({r.dtype}{list(r.shape)}, {r.source}) does not "
                f"split into {n} pieces along its leading axis"
            )
        if n > 1 and r.per_iteration:
            raise ValueError(f"pieces: residual {k} ({r.source}) moves one scan slice at a time")
    return {k: n for k, n in pieces.items() if n > 1}


def piece_arrivals(plan: Plan) -> dict[int, list[tuple[int, int]]]:
    """For each residual moved in pieces, `(piece, position)` for every piece but the
    last: the backward position by which that piece's copy back is done,
    `PIECE_STAGGER` times a piece's link time before the next piece's (the last piece is
    done by the first use), and after its `prefetch_at`.

    Example: a (8, 1024) f32 value fetched in 4 pieces, read at position 40, where the
    clock runs 1 ms a position and a piece takes 1 ms on the link: pieces 0, 1 and 2 are
    done by positions 36, 37 and 38 (1.2 ms apart, rounded down).
    """
    clock = np.asarray(plan.timeline)
    arrivals: dict[int, list[tuple[int, int]]] = {}
    for r in plan.offloaded:
        if r.pieces < 2:
            continue
        assert r.prefetch_at is not None
        step = PIECE_STAGGER * plan.profile.h2d_seconds(r.nbytes // r.pieces)
        due = clock[r.first_backward_use]
        arrivals[r.index] = [
            (p, max(int(np.searchsorted(clock, due - (r.pieces - 1 - p) * step, "right")) - 1,
                    r.prefetch_at + 1))
            for p in range(r.pieces - 1)
        ]  # fmt: skip
    return arrivals
