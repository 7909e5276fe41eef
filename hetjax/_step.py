"""The step form: `het_offload` on a function that takes the gradient inside.

A train step's jaxpr holds its forward and its backward pass in one program; JAX
marks the backward equations with "transpose(" in their name stack. Top-level
`jit` calls are inlined first, so a crossing inside one (a nested `jax.jit` of a
gradient) becomes visible. The residuals are the values that forward equations
define and backward equations read (a step that takes several gradients has one
set per backward pass). They get the same records, planner and pins as the loss
form; `run_step` evaluates the one program with the moves inserted. No
`custom_vjp` is involved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ._compat import (
    ClosedJaxpr,
    Jaxpr,
    Var,
    is_transpose,
    nbytes,
    read_atom,
    sub_jaxprs,
)
from ._fusion import made_in_readers, rebuilt_by_xla, stored_intervals
from ._plan import Plan, warn_once
from ._rewrite import (
    PinQueue,
    SliceRebuild,
    TiedReplays,
    accumulates,
    bind_backward,
    is_forced,
    orders,
    reach_of,
    scan_from_host,
    scan_to_host,
    shared_rebuilds,
    slice_rebuild,
    to_device,
    to_host,
)
from ._trace import inline_calls, unroll_scans
from ._usage import (
    Recipe,
    Usage,
    chain_for,
    chains_of,
    def_use,
    eqns_reading,
    moves_per_iteration,
    recipe_for,
    residual_record,
    slice_recipes,
    with_slice_recipes,
)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A step with its calls inlined, and the variables that cross forward -> backward."""

    program: ClosedJaxpr
    residual_vars: tuple[Var, ...]
    boundary: int  # position of the first backward equation (len(eqns) if none)


def holds_backward(jaxpr: Jaxpr) -> bool:
    """Whether `jaxpr` (at any depth) contains equations of a transposed computation."""
    return any(is_transpose(e) or any(holds_backward(j) for j in sub_jaxprs(e)) for e in jaxpr.eqns)


def step_program(primal: Jaxpr, inputs: Sequence[Any], unroll: bool = False) -> StepProgram:
    """Inline `primal`'s calls (and with `unroll`, unroll its scans: `unroll_scans`) and
    find the values crossing forward -> backward."""
    closed = inline_calls(primal, inputs)
    if unroll:
        closed = unroll_scans(closed)
    jaxpr = closed.jaxpr
    eqns = jaxpr.eqns
    boundary = next((i for i, e in enumerate(eqns) if is_transpose(e)), len(eqns))
    # A backward pass (or part of one) inside a construct that is not inlined: its
    # crossings are not visible here, so its residuals stay where XLA puts them.
    holder = next((e for e in eqns if not is_transpose(e) and holds_backward_inside(e)), None)
    if holder is not None:
        warn_once(
            f"hetjax: part of this step's backward pass runs inside '{holder.primitive}'; "
            "the residuals inside it stay on device."
        )
    producer, _ = def_use(eqns)
    # Read by a backward equation, made by a forward one: a step that takes several
    # gradients has a crossing from each forward pass to its backward pass.
    crossing: dict[Var, None] = {}
    for eqn in eqns[boundary:]:
        if is_transpose(eqn):
            for v in eqn.invars:
                if isinstance(v, Var) and v in producer and not is_transpose(eqns[producer[v]]):
                    crossing[v] = None
    ordered = sorted(crossing, key=lambda v: producer[v])
    return StepProgram(closed, tuple(ordered), boundary)


def holds_backward_inside(eqn: Any) -> bool:
    return any(holds_backward(j) for j in sub_jaxprs(eqn))


def step_usage(program: StepProgram) -> Usage:
    """The usage record of a step: positions are indices into its one program."""
    jaxpr = program.program.jaxpr
    boundary = program.boundary
    end = len(jaxpr.eqns)
    producer, _ = def_use(jaxpr.eqns)
    uses: dict[Var, list[int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                uses.setdefault(v, []).append(i)
    input_index = {v: i for i, v in enumerate((*jaxpr.constvars, *jaxpr.invars))}
    residual_of = {v: k for k, v in enumerate(program.residual_vars)}
    readers = eqns_reading(jaxpr.eqns)
    recipes: dict[int, Recipe] = {}
    records = []
    backward = [is_transpose(e) for e in jaxpr.eqns]
    for k, v in enumerate(program.residual_vars):
        recipe = recipe_for(jaxpr, v, producer, input_index, residual_of)
        if recipe is not None:
            recipes[k] = recipe
        first_bwd = next(i for i in uses[v] if backward[i])
        fwd = [i for i in uses[v] if i < first_bwd]
        last_fwd = max([producer[v], *fwd])
        last_bwd = end if v in jaxpr.outvars else uses[v][-1]
        sliceable = v not in jaxpr.outvars and moves_per_iteration(
            jaxpr.eqns[producer[v]], v, readers[v], v
        )
        records.append(
            residual_record(
                k, v, jaxpr, producer,
                last_forward_use=last_fwd,
                first_backward_use=first_bwd,
                last_backward_use=last_bwd,
                input_index=input_index,
                recipe=recipe,
                per_iteration=sliceable,
                # the start of the backward pass that reads it
                backward_from=backward.index(True, last_fwd + 1),
            )
        )  # fmt: skip
    residual_vars = program.residual_vars
    scans = dict(
        forward_eqns=jaxpr.eqns,
        readers_of=lambda k: readers[residual_vars[k]],
        stacked={v: (k, v) for k, v in enumerate(residual_vars)},
        var_of=residual_vars,
        input_index=input_index,
    )
    records = with_slice_recipes(records, recipes, **scans)
    last = {v: u[-1] for v, u in uses.items()}

    def backward_readers(k: int) -> list | None:
        v = residual_vars[k]
        return None if v in jaxpr.outvars else [jaxpr.eqns[i] for i in uses[v] if backward[i]]

    fused = rebuilt_by_xla(
        jaxpr, residual_vars, backward_readers, producer, last, input_index, residual_of
    )
    return Usage(
        program=program,
        residuals=tuple(records),
        recipes=recipes,
        eqns=tuple(jaxpr.eqns),
        boundary=boundary,
        buffers=_step_buffers(jaxpr, set(program.residual_vars), last),
        fused=fused,
        made_in_readers=made_in_readers(jaxpr.eqns, records, residual_vars, set(jaxpr.outvars)),
        chains={
            **chains_of(records, jaxpr, producer, input_index, residual_vars),
            **slice_recipes(records, recipes, **scans, find=chain_for),
        },
    )


def _step_buffers(jaxpr: Jaxpr, residuals: set, last: dict) -> tuple[tuple[int, int, int], ...]:
    """Device intervals `(nbytes, first, last)` of the step's values other than residuals,
    as XLA stores them (`_fusion.stored_intervals`)."""
    end = len(jaxpr.eqns)
    last = {**last, **{v: end for v in jaxpr.outvars if isinstance(v, Var)}}
    out = [(nbytes(v.aval), -1, end) for v in (*jaxpr.constvars, *jaxpr.invars)]
    outputs = {v for v in jaxpr.outvars if isinstance(v, Var)}
    return (*out, *stored_intervals(jaxpr.eqns, 0, {}, last, outputs, residuals))


def run_step(usage: Usage, plan: Plan, inputs: Sequence[Any]) -> list[Any]:
    """Evaluate the step with the plan's moves: the step's flat outputs."""
    program: StepProgram = usage.program
    closed = program.program
    jaxpr = closed.jaxpr
    res_vars = program.residual_vars
    inputs_of_values = [*closed.consts, *inputs]  # numbered as recipes number inputs
    produced: dict[int, list[Var]] = {}
    # Stacked by a scan and moved inside the scans that make and read them, by the
    # position of each scan.
    made_sliced: dict[int, list[Var]] = {}
    read_sliced: dict[int, list[Var]] = {}
    host_pins = PinQueue()  # host copies waiting for their forward pin
    device_pins = PinQueue()  # host copies waiting for their backward pin
    rebuild: dict[int, list[int]] = {}  # first backward use -> residuals recomputed there
    # backward scan -> {operand index: how to rebuild that stacked input slice by slice}
    sliced_rebuilds: dict[int, dict[int, SliceRebuild]] = {}
    for r in plan.residuals:
        v = res_vars[r.index]
        if r.decision == "recompute" and r.per_iteration:
            at = jaxpr.eqns[r.first_backward_use].invars.index(v)
            recipe = usage.recipe_of(r.index)
            stacks = [inputs_of_values[i] for i in recipe.input_anchors]
            rebuild_slices = slice_rebuild(jaxpr.eqns[r.produced_at], v, recipe, stacks)
            sliced_rebuilds.setdefault(r.first_backward_use, {})[at] = rebuild_slices
        elif r.decision == "recompute":
            rebuild.setdefault(r.first_backward_use, []).append(r.index)
    for r in plan.offloaded:
        v = res_vars[r.index]
        if r.per_iteration:
            made_sliced.setdefault(r.produced_at, []).append(v)
            read_sliced.setdefault(r.first_backward_use, []).append(v)
            continue
        # TODO: move a value planned in pieces (`ResidualUsage.pieces`) in pieces here
        # too; no plan of a whole train step has them yet, and whole it is still right.
        produced.setdefault(r.produced_at, []).append(v)
        host_pins.schedule(r.offload_by, v, r.produced_at)
        device_pins.schedule(r.prefetch_at, v)

    inputs_of = (*jaxpr.constvars, *jaxpr.invars)  # recipes number inputs this way
    rebuilt: set[int] = set()
    replays = TiedReplays(res_vars, shared_rebuilds(usage, plan))

    def recompute(k: int) -> None:
        """Rebuild residual `k` for the backward (and first any recomputed anchor), so
        the forward's value dies at its last forward use."""
        if k in rebuilt:
            return
        rebuilt.add(k)
        if k in replays.spare:  # made by a sibling's rebuild
            env[res_vars[k]] = replays.spare.pop(k)
            return
        recipe = usage.recipe_of(k)
        for a in recipe.residual_anchors:
            if plan.residuals[a].decision == "recompute":
                recompute(a)
        anchors = {res_vars[a]: env[res_vars[a]] for a in recipe.residual_anchors}
        anchors.update((inputs_of[a], env[inputs_of[a]]) for a in recipe.input_anchors)
        forced = is_forced(recipe, jaxpr.eqns, {r.index: r.decision for r in plan.residuals})
        after = env.get(recent) if forced else None
        env[res_vars[k]] = replays(k, jaxpr.eqns, recipe, anchors, after, forced)

    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(jaxpr.invars, inputs, strict=True))
    host: dict[Var, Any] = {}
    recent = None  # the latest value computed: an anchor when an equation has none
    given = frozenset(inputs_of)  # exist from the start: they order nothing
    reach: dict[Var, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        host_pins.pin_at(i, eqn, env, host, reach=reach)
        for v in device_pins.pin_at(i, eqn, env, host, avoid=given | host.keys(), fallback=recent):
            env[v] = to_device(host.pop(v))
        for k in rebuild.get(i, ()):
            recompute(k)
        invals = [read_atom(env, v) for v in eqn.invars]
        if i in made_sliced:
            outs = scan_to_host(eqn, invals, made_sliced[i])
        elif i in read_sliced or i in sliced_rebuilds:
            from_host = [v in read_sliced.get(i, []) for v in eqn.invars]
            outs = scan_from_host(eqn, invals, from_host, sliced_rebuilds.get(i))
        else:
            outs = bind_backward(eqn, invals)
        env.update(zip(eqn.outvars, outs, strict=True))
        reach.update((v, reach_of(i, eqn, reach)) for v in eqn.outvars)
        if orders(eqn) and not (plan.speed_first and accumulates(eqn)):  # `gradient_sums`
            recent = next((v for v in eqn.outvars if hasattr(env.get(v), "shape")), recent)
        for v in produced.get(i, ()):
            host[v] = to_host(env[v])
    outputs = [read_atom(env, v) for v in jaxpr.outvars]
    return host_pins.pin_to_outputs(outputs, host)
