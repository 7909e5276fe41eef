"""Stage 5: rewrite. Interpreters that run the forward and backward jaxprs of a
`VjpProgram` with the plan's moves, pins and recomputations inserted.

Run under a trace (`jax.make_jaxpr`, `jax.jit`, `custom_vjp`), each interpreter emits
a new jaxpr: the original equations, plus

- forward: `device_put(r, Host)` right after each offloaded residual `r` is produced,
  and an `optimization_barrier` that ties the host copy to an input of the equation
  at `offload_by`, so the copy must finish there and cannot be sunk or folded;
- backward: an `optimization_barrier` that ties the host copy to an input of the
  equation at `prefetch_at`, then `device_put(r, Device)`, so the copy back starts
  there and not earlier; recomputed residuals are rebuilt just before first use.

A value moved in pieces (`ResidualUsage.pieces`) goes to host as that many arrays,
split along its leading axis and each tied at `offload_by`; in the backward, each piece
but the last is tied done by its position in `_plan.piece_arrivals`, and the pieces
are joined where the value is first read.

A residual stacked by a `scan` and read by one backward `scan` (`per_iteration`)
moves inside both loops instead: the forward loop puts each iteration's slice to
host, so the stacked output is a host buffer (XLA writes it with a dynamic-update-
slice per iteration); the backward loop carries the next iteration's slice, fetched
from that buffer one iteration ahead of its use (see `HostStack`). A stacked residual
with a per-iteration recipe is rebuilt inside the backward loop from the slices of
the others (`SliceRebuild`) and never stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import (
    DERIVED_FORMS,
    JaxprEqn,
    Literal,
    Var,
    bind_eqn,
    bind_tied_pool_gradient,
    eval_jaxpr,
    full_like_aval,
    read_atom,
    scan_counts,
    zeros_like_aval,
)
from ._cost import GRADIENT_SUM_PRIMITIVES
from ._fusion import fuses
from ._plan import Plan, arrival_positions, matmul_in, piece_arrivals
from ._trace import runs_a_matmul, scan_like
from ._usage import VIEW_PRIMITIVES, Recipe, Usage

HOST = jax.memory.Space.Host
DEVICE = jax.memory.Space.Device


def to_host(x: Any) -> Any:
    """Copy `x` from device to host memory. The source is named so that the copy's
    transpose (in a second-order gradient) copies the cotangent back to device."""
    return jax.device_put(x, HOST, src=DEVICE)


def to_device(x: Any) -> Any:
    """Copy `x` from host back to device memory."""
    return jax.device_put(x, DEVICE, src=HOST)


@dataclasses.dataclass(frozen=True)
class StoredLayout:
    """Which values the forward hands to the backward, in order."""

    residuals: tuple[int, ...]  # residual indices stored (kept or offloaded)
    inputs: tuple[int, ...]  # forward input indices that recomputations read

    @classmethod
    def of(cls, usage: Usage, plan: Plan) -> StoredLayout:
        rebuilt = [usage.recipe_of(r.index) for r in plan.residuals if r.decision == "recompute"]
        # A checkpoint is stored only for the recomputations that start from it: else
        # the forward would hold it for nothing where XLA does not drop it (eager).
        started = {a for recipe in rebuilt for a in recipe.residual_anchors}
        stored = tuple(
            r.index for r in plan.residuals
            if r.decision != "recompute" and (not r.checkpoint or r.index in started)
        )  # fmt: skip
        inputs = sorted({i for recipe in rebuilt for i in recipe.input_anchors})
        return cls(stored, tuple(inputs))


def accumulates(eqn: Any) -> bool:
    """Whether `eqn` adds up a gradient (`_cost.GRADIENT_SUM_PRIMITIVES`). XLA fuses the
    whole sum into one kernel (reference mlp: one 16-operand add); a barrier on a
    partial sum splits it into a full-size add per layer (+4.4 ms and +128 MiB, compiled
    for the H200), so ties never anchor on these."""
    return eqn.primitive.name in GRADIENT_SUM_PRIMITIVES


def gradient_sums(jaxpr: Any) -> set[Var]:
    """The values of `jaxpr` that only feed parameter-gradient sums: the pieces of a
    gradient (a layer's weight gradient), its partial sums, and outputs read by nothing
    else. A barrier on one of them keeps XLA from fusing the sum into one kernel."""
    outputs = {v for v in jaxpr.outvars if isinstance(v, Var)}
    consumers: dict[Var, list[int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                consumers.setdefault(v, []).append(i)
    sums: set[Var] = set()
    sinks: set[int] = set()  # accumulating equations whose outputs are sums
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        for v in eqn.outvars:
            readers = consumers.get(v, [])
            if (readers and all(c in sinks for c in readers)) or (not readers and v in outputs):
                sums.add(v)
        if accumulates(eqn) and all(v in sums for v in eqn.outvars):
            sinks.add(i)
    return sums


def gradient_pieces(jaxpr: Any) -> set[Var]:
    """The values of `jaxpr` that reach only its outputs, through views, converts and
    gradient sums: a layer's weight gradient, on its way out (a superset of
    `gradient_sums`)."""
    outputs = {v for v in jaxpr.outvars if isinstance(v, Var)}
    readers: dict[Var, list[Any]] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, Var):
                readers.setdefault(v, []).append(eqn)
    passes = VIEW_PRIMITIVES | {"convert_element_type"}
    pieces: set[Var] = set()
    for eqn in reversed(jaxpr.eqns):
        for v in eqn.outvars:
            rs = readers.get(v, [])
            if (not rs and v in outputs) or (
                rs
                and all(
                    (r.primitive.name in passes or accumulates(r))
                    and all(o in pieces for o in r.outvars)
                    for r in rs
                )
            ):
                pieces.add(v)
    return pieces


def _first_var(eqn: Any, env: dict, ok: Callable[[Var], bool]) -> Var | None:
    return next((v for v in eqn.invars if isinstance(v, Var) and v in env and ok(v)), None)


def reach_of(i: int, eqn: Any, reach: dict) -> int:
    """The position of the latest real work that the outputs of equation `i` wait for
    (-1: none, they exist as soon as the inputs do). Views pass their input's on: a
    slice of a weight orders nothing."""
    inputs = max((reach.get(v, -1) for v in eqn.invars if isinstance(v, Var)), default=-1)
    # TODO: a constant (no variable input) orders nothing either, but counted so here
    # (reach -1), a copy of the step form waited past its own fetch: `pin_at` found it
    # gone from `host` (the tiny cnn's adam step, min_bytes=0). `pin_at` must first drop
    # the copies fetched already. Today a copy may be tied to a scalar constant.
    return inputs if eqn.primitive.name in VIEW_PRIMITIVES else i


def _tie(values: list[Any], anchor: Any) -> tuple[list[Any], Any]:
    """Pin `values` to `anchor`: neither side can be used before both exist."""
    *tied, anchor = lax.optimization_barrier((*values, anchor))
    return list(tied), anchor


class PinQueue:
    """Host copies waiting for the equation that pins them (see module docstring).

    Copies scheduled at position `i` are tied, in one `optimization_barrier`, to an
    input of the first live equation at or after `i` that has a usable input. With
    `reach` (`reach_of` of each value), usable means made by work at or after the
    copied values' producers: a value that exists earlier orders nothing (tied to a
    slice of a weight, the reference mlp's first copy was waited for right after it
    started: 2.75 ms exposed, compiled for the H200).
    """

    def __init__(self) -> None:
        self.at: dict[int, list[Var]] = {}
        self.waiting: list[Var] = []
        self.produced: dict[Var, int] = {}

    def schedule(self, position: int, v: Var, produced_at: int = -1) -> None:
        self.at.setdefault(position, []).append(v)
        self.produced[v] = produced_at

    def pin_at(
        self,
        i: int,
        eqn: Any,
        env: dict,
        host: dict,
        avoid: Any = (),
        fallback: Any = None,
        reach: dict | None = None,
    ) -> list[Var]:
        """Tie the copies due by `i` to an input of `eqn` (None: not evaluated, carry
        on); tie to `fallback` when `eqn` itself reads one of them. Returns those tied."""
        self.waiting.extend(self.at.pop(i, ()))
        if not self.waiting or eqn is None:
            return []
        after = max(self.produced.get(v, -1) for v in self.waiting)
        usable = [
            v for v in eqn.invars
            if isinstance(v, Var) and v in env and v not in avoid
            and (reach is None or reach.get(v, -1) >= after)
        ]  # fmt: skip
        if not usable and fallback in env and any(v in self.waiting for v in eqn.invars):
            usable = [fallback]
        if not usable:
            return []
        tied, env[usable[0]] = _tie([host[v] for v in self.waiting], env[usable[0]])
        host.update(zip(self.waiting, tied, strict=True))
        done, self.waiting = self.waiting, []
        return done

    def pin_to_outputs(self, outputs: list[Any], host: dict) -> list[Any]:
        """Tie copies still waiting at the end to the program's array outputs."""
        if not self.waiting:
            return outputs
        outputs = list(outputs)
        arrays = [j for j, o in enumerate(outputs) if hasattr(o, "shape")]
        *tied, rest = lax.optimization_barrier(
            (*[host[v] for v in self.waiting], [outputs[j] for j in arrays])
        )
        host.update(zip(self.waiting, tied, strict=True))
        for j, o in zip(arrays, rest, strict=True):
            outputs[j] = o
        self.waiting = []
        return outputs


def run_forward(usage: Usage, plan: Plan, inputs: Sequence[Any]) -> tuple[list, list]:
    """Evaluate the forward jaxpr: returns `(outputs, stored values)`."""
    program = usage.program
    jaxpr = program.forward.jaxpr
    res_vars = program.residual_vars
    layout = StoredLayout.of(usage, plan)
    stored_vars = [res_vars[k] for k in layout.residuals]

    # Offloaded residuals, by variable: producer eqn -> vars, pinned by position.
    offload_after: dict[int, list[Var]] = {}
    sliced: dict[int, list[Var]] = {}  # scan eqn -> its outputs moved per iteration
    host_pins = PinQueue()
    seen: set[Var] = set()
    pieces: dict[Var, int] = {}  # moved as that many arrays (`_plan.piece_arrivals`)
    for r in plan.offloaded:
        v = res_vars[r.index]
        if v in seen:
            continue
        seen.add(v)
        if r.per_iteration:
            sliced.setdefault(r.produced_at, []).append(v)
            continue
        offload_after.setdefault(r.produced_at, []).append(v)
        if r.pieces > 1:
            pieces[v] = r.pieces
        for key in [(v, p) for p in range(r.pieces)] if r.pieces > 1 else [v]:
            host_pins.schedule(r.offload_by, key, r.produced_at)

    live = _live_eqns(jaxpr, [*jaxpr.outvars[: program.num_outputs], *stored_vars])
    # Stacked by a scan only for chains that start from them (`_trace.with_checkpoints`).
    unused = {res_vars[r.index] for r in plan.residuals if r.checkpoint and r.per_iteration}
    unused -= set(stored_vars)
    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, program.forward.consts, strict=True))
    env.update(zip(jaxpr.invars, inputs, strict=True))
    host: dict[Var, Any] = {}
    reach: dict[Var, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        host_pins.pin_at(i, eqn if live[i] else None, env, host, reach=reach)
        reach.update((v, reach_of(i, eqn, reach)) for v in eqn.outvars)
        if not live[i]:
            continue
        invals = [read_atom(env, v) for v in eqn.invars]
        if i in sliced or not unused.isdisjoint(eqn.outvars):
            outs = scan_to_host(eqn, invals, sliced.get(i, ()), unused)
            moved = sliced.get(i, ())
            host.update((v, o) for v, o in zip(eqn.outvars, outs, strict=True) if v in moved)
        else:
            outs = bind_eqn(eqn, invals)
        env.update(zip(eqn.outvars, outs, strict=True))
        for v in offload_after.get(i, ()):
            if v in pieces:
                split = jnp.split(env[v], pieces[v])
                host.update(((v, p), to_host(x)) for p, x in enumerate(split))
            else:
                host[v] = to_host(env[v])
    outputs = [read_atom(env, v) for v in jaxpr.outvars[: program.num_outputs]]
    outputs = host_pins.pin_to_outputs(outputs, host)  # pinned at the end of the forward
    for v, n in pieces.items():
        host[v] = tuple(host.pop((v, p)) for p in range(n))
    stored = [host[v] if v in host else read_atom(env, v) for v in stored_vars]
    stored += [inputs[i] for i in layout.inputs]
    return outputs, stored


def orders(eqn: JaxprEqn) -> bool:
    """Whether `eqn`'s result may anchor a tie: it is made of values. A constant (a
    broadcast literal) orders nothing: tied to one, a rebuild made XLA keep the
    forward's equal constant, merged with it, until the tie (relu's 512 MiB of zeros on
    the reference cnn, H200, jax 0.11.2: 3246 -> 2709 MB with every chain without a
    matmul rebuilt). A broadcast of a value anchors by that value (`run_backward`): XLA
    must write out what a barrier reads, and fuses a broadcast into its readers
    otherwise (a batch norm's backward, its per-channel term broadcast to the stem's
    f32 shape: 1 GiB more on the reference cnn with every chain without a matmul
    rebuilt and the rest moved, H200, jax 0.12.0.1)."""
    return any(isinstance(v, Var) for v in eqn.invars)


def run_backward(
    usage: Usage, plan: Plan, stored: Sequence[Any], cotangents: Sequence[Any]
) -> list[Any]:
    """Evaluate the backward jaxpr: returns the input cotangents."""
    program = usage.program
    jaxpr = program.backward.jaxpr
    num_fwd = len(program.forward.jaxpr.eqns)
    layout = StoredLayout.of(usage, plan)
    res_invars = jaxpr.invars[: program.num_residuals]
    ct_invars = jaxpr.invars[program.num_residuals :]
    res_vars = program.residual_vars
    decision = {r.index: r.decision for r in plan.residuals}
    index_of_invar = {v: k for k, v in enumerate(res_invars)}

    value: dict[int, Any] = {}  # residual index -> value on device
    on_host: dict[int, Any] = {}  # residual index -> host copy not yet fetched
    for k, x in zip(layout.residuals, stored, strict=False):
        (on_host if decision[k] == "offload" else value)[k] = x
    input_value = dict(zip(layout.inputs, stored[len(layout.residuals) :], strict=True))

    prefetch: dict[int, list[int]] = {}
    arrive: dict[int, list[int]] = {}  # fetched copies to complete by then
    arrivals = arrival_positions(plan) if plan.speed_first else {}
    sliced: dict[int, list[Var]] = {}  # scan eqn -> its stacked inputs read from host
    # scan eqn -> {operand index: how to rebuild that stacked input slice by slice}
    rebuilt: dict[int, dict[int, SliceRebuild]] = {}
    for r in plan.residuals:
        if r.decision == "recompute" and r.per_iteration:
            j = r.first_backward_use - num_fwd
            at = jaxpr.eqns[j].invars.index(res_invars[r.index])
            recipe = usage.recipe_of(r.index)
            stacks = [input_value[i] for i in recipe.input_anchors]
            stacks += [value[k] for _, k in recipe.stack_slices]  # kept checkpoints
            scan = program.forward.jaxpr.eqns[r.produced_at]
            rebuilt.setdefault(j, {})[at] = slice_rebuild(scan, res_vars[r.index], recipe, stacks)
    piece_due: dict[int, list[tuple[int, int]]] = {}  # backward eqn -> (residual, piece)
    for k, due in piece_arrivals(plan).items():
        for p, at in due:
            piece_due.setdefault(at - num_fwd, []).append((k, p))
    for r in plan.offloaded:
        if r.per_iteration:
            sliced.setdefault(r.first_backward_use - num_fwd, []).append(res_invars[r.index])
            continue
        prefetch.setdefault(r.prefetch_at - num_fwd, []).append(r.index)
        if arrivals.get(r.index, r.first_backward_use) < r.first_backward_use:
            arrive.setdefault(arrivals[r.index] - num_fwd, []).append(r.index)

    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, program.backward.consts, strict=True))
    env.update(zip(ct_invars, cotangents, strict=True))
    recent = [next((c for c in cotangents if hasattr(c, "shape")), None)]

    replays = TiedReplays(res_vars, shared_rebuilds(usage, plan))

    fetched: dict[int, list[Any]] = {}  # the pieces fetched of a value moved in pieces

    def fetch(k: int) -> None:
        if k in on_host and isinstance(on_host[k], tuple):
            fetched[k] = [to_device(x) for x in on_host.pop(k)]
        elif k in on_host:
            value[k] = to_device(on_host.pop(k))

    def materialize(k: int) -> Any:
        if k not in value:
            fetch(k)
        if k in fetched:
            value[k] = jnp.concatenate(fetched.pop(k))
        if k not in value and k in replays.spare:  # made by a sibling's rebuild
            value[k] = replays.spare.pop(k)
        if k not in value:  # recompute from inputs and other residuals
            recipe = usage.recipe_of(k)
            fwd = program.forward.jaxpr
            forced = is_forced(recipe, fwd.eqns, decision)
            if forced and not plan.speed_first:
                recipe = from_stored(usage, recipe, fwd.eqns, decision)
            anchors = {res_vars[a]: materialize(a) for a in recipe.residual_anchors}
            anchors.update((fwd.invars[i], input_value[i]) for i in recipe.input_anchors)
            value[k] = replays(k, fwd.eqns, recipe, anchors, recent[0] if forced else None, forced)
        return value[k]

    def read(v: Any) -> Any:
        if isinstance(v, Literal):
            return v.val
        if v in index_of_invar and v not in env:
            env[v] = materialize(index_of_invar[v])
        return env[v]

    # A fetch is tied to a value that waits for the cotangents (not one made from
    # residuals and constants alone, which may run at the backward's start, nor a
    # partial gradient sum); put off to the next equation that reads one.
    flowing = set(ct_invars)
    # A plan that puts speed first lets XLA fuse each gradient sum into one kernel; one
    # that puts memory first ties into the partial sums, which splits the sum into an
    # add per layer (+4.4 ms on the reference mlp, H200) but frees each layer's piece
    # as it is added (-320 MiB there with `policy="all"`).
    sums = gradient_sums(jaxpr) if plan.speed_first else set()
    # Memory first, with layers rebuilt from checkpoints: each parameter-gradient piece
    # (a layer's weight or bias gradient) is tied into the next equation's flowing input,
    # so it is made at once and the values it reads die. Untied, XLA computed the pieces
    # of rebuilt layers last, holding every layer's activation gradient until then
    # (reference gpt, its whole budget order with chains four deep, H200, jax 0.11.2: a
    # 14.8 GB loss-gradient peak untied, 11.5 tied). Not otherwise: a 16-layer bf16 MLP
    # whose chains rest on residuals compiled above plain at every budget tied (jax
    # 0.10.2; 0.79 of plain's peak untied), and plans that only move stay as they were.
    # The tie's anchor is a value XLA stores anyway (not one it would fuse into its
    # readers, which the barrier makes it write out): with every chain of the reference
    # gpt rebuilt (H200, jax 0.11.2), anchored on the next flowing input, XLA wrote 25
    # f32 (b*t, d) products out and read more around them: 190.3 ms predicted, and
    # 187.7 anchored so, at the same compiled peak. The reference cnn's budgets: 0.91
    # of plain's train-step temp at 1.51x its predicted time, and 0.78 at 1.29x.
    # TODO: tying them in every `policy="all"` plan too took the reference gpt's `all`
    # from 4526 to 4101 MiB (loss gradient, H200, jax 0.11.2: XLA had reduced 24 bias
    # gradients at the program's end), but an FSDP-sharded `all` on eight CPU devices
    # then differed from plain's gradient by an ulp (tests/multidevice_cases.py).
    restarts = any(r.checkpoint and r.read_in_backward for r in plan.residuals)
    pieces = gradient_pieces(jaxpr) if restarts and not plan.speed_first else set()
    pending: list[Var] = []  # pieces made since the last flowing equation
    stored_anyway = set(ct_invars)  # flowing values not fused into their readers
    unfit = pieces | sums
    late: list[int] = []
    # Values broadcast from another: a tie to one ties to what it broadcasts, and the
    # broadcast is made again from the tied value. XLA must write out what a barrier
    # reads, and fuses a broadcast into its readers otherwise (the reference gpt's
    # `policy="all"`, its loss gradient, H200, jax 0.11.2: 25 fetches tied to f32
    # broadcasts of a layer norm's per-token terms: 6277 MiB temp, 4526 tied so, at the
    # same predicted time; the gpt_scan's 8327 -> 6348 MiB).
    broadcasts: dict[Var, Any] = {}

    def tie_to(values: list[Any], v: Var) -> list[Any]:
        made = broadcasts.get(v)
        if made is None:
            tied, env[v] = _tie(values, env[v])
            return tied
        tied, operand = _tie(values, env[made.invars[0]])
        env[v] = bind_eqn(made, [operand, *(read(x) for x in made.invars[1:])])[0]
        return tied

    for j, eqn in enumerate(jaxpr.eqns):
        ks = [k for k in (*late, *prefetch.get(j, ())) if k in on_host]
        at = _first_var(eqn, env, lambda v: v in stored_anyway and v not in unfit)
        if pending and at is not None:
            tied, env[at] = _tie([env[v] for v in pending], env[at])
            env.update(zip(pending, tied, strict=True))
            pending = []
        anchor = _first_var(eqn, env, lambda v: v in flowing and v not in sums)
        late = []
        if ks and anchor is None and j + 1 < len(jaxpr.eqns):
            late, ks = ks, []
        if ks and anchor is not None:
            on_host.update(zip(ks, tie_to([on_host[k] for k in ks], anchor), strict=True))
        for k in ks:
            fetch(k)
        # Pinned at both ends: XLA's scheduler would start a fetch only as early as its
        # own copy model asks (reference mlp, compiled for the H200: 1.9 ms ahead of its
        # use for a 2.6 ms copy), so the copy must also be done by its arrival.
        done = [k for k in arrive.get(j, ()) if k in value and res_invars[k] not in env]
        if done and anchor is not None:
            value.update(zip(done, tie_to([value[k] for k in done], anchor), strict=True))
        for k, p in piece_due.get(j, ()):
            if k in fetched and anchor is not None:
                (fetched[k][p],) = tie_to([fetched[k][p]], anchor)
        if j in sliced or j in rebuilt:  # stacks read from host or rebuilt, slice by slice
            here, rebuild = sliced.get(j, []), rebuilt.get(j, {})
            invals = [
                on_host.pop(index_of_invar[v]) if v in here else None if i in rebuild else read(v)
                for i, v in enumerate(eqn.invars)
            ]
            outs = scan_from_host(eqn, invals, [v in here for v in eqn.invars], rebuild)
        else:
            outs = bind_backward(eqn, [read(v) for v in eqn.invars])
        env.update(zip(eqn.outvars, outs, strict=True))
        if eqn.primitive.name == "broadcast_in_dim" and isinstance(eqn.invars[0], Var):
            broadcasts[eqn.outvars[0]] = eqn
        if all(v in pieces for v in eqn.outvars) and any(
            isinstance(v, Var) and v not in pieces for v in eqn.invars
        ):  # a piece made from backward values (not a view or sum of pieces)
            pending.extend(eqn.outvars)
        if any(isinstance(v, Var) and v in flowing for v in eqn.invars):
            flowing.update(eqn.outvars)
            if not fuses(eqn):
                stored_anyway.update(eqn.outvars)
        if outs and hasattr(outs[0], "shape") and eqn.outvars[0] not in sums and orders(eqn):
            recent[0] = read(eqn.invars[0]) if eqn.primitive.name == "broadcast_in_dim" else outs[0]
    return [read(v) for v in jaxpr.outvars]


def bind_backward(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """`bind_eqn` for a backward equation; a max pool's gradient is tied to its cotangent
    (`bind_tied_pool_gradient`): the reference cnn's plans compiled for the H200 held
    zeros from the forward and the gradient's indices early (jax 0.11.2: 3370 -> 3246 MB
    peak with every chain without a matmul rebuilt)."""
    # TODO: a pool inside a call the rewrite binds whole (a `jit` it does not inline)
    # keeps JAX's own gradient.
    if eqn.primitive.name == "select_and_scatter_add":
        return bind_tied_pool_gradient(eqn, invals)
    return bind_eqn(eqn, invals)


def ties_a_pool(usage: Usage) -> bool:
    """Whether the rewrite ties a max pool's gradient (`bind_backward`): then, even with
    nothing moved or rebuilt, it is not plain's program."""
    return any(eqn.primitive.name == "select_and_scatter_add" for eqn in usage.eqns)


def is_forced(recipe: Recipe, eqns: Sequence[Any], decision: dict[int, str]) -> bool:
    """Whether a recomputation must be tied into the backward (`replay`'s `after`).

    Only where that was seen to save memory, compiled for the H200: a value rebuilt from
    a residual fetched from host (untied, XLA may fold the round trip and keep the
    forward's copy), a derived form hetjax stored as its source (`1 - y**2` of tanh,
    from `y`), and a value rebuilt from the function's inputs alone (a layer's bf16 copy
    of its weights: untied, the reference gpt's `policy="all"` took 21.5 GiB of temp
    instead of 6.9). A recomputation from residuals kept on device is left to XLA, which
    fuses it into its readers or keeps the forward's value, as without hetjax: tied, it
    forces its anchors to be materialized across the barrier (2.2 GiB of f32 anchors on
    the reference cnn). And a chain (`_usage.chain_for`): untied, nothing keeps XLA
    from merging (CSE) the backward's matmuls with the forward's identical ones and
    keeping their outputs, as if stored (chains were tied from the start; the untied
    form was not compiled).
    """
    if recipe.chain or any(decision[a] == "offload" for a in recipe.residual_anchors):
        return True
    if recipe.input_anchors and not recipe.residual_anchors:
        return True
    return any(eqns[e].primitive.name in DERIVED_FORMS for e in recipe.eqns)


def from_stored(
    usage: Usage, recipe: Recipe, eqns: Sequence[Any], decision: dict[int, str]
) -> Recipe:
    """`recipe` with each anchor that is itself rebuilt without a matmul replaced by its
    own recipe's equations and anchors, down to stored values: the tie (`replay`'s
    `after`) then holds those, not the rebuilt values, which XLA would otherwise have to
    materialize across the barrier (the reference cnn, H200, jax 0.11.2: each relu
    rebuilt from its batch norm's f32 `mul` and `sub`, 1 GiB each at the stem, held at
    the loss-gradient peak). A rebuilt matmul stays an anchor: redone, it costs flops.
    Memory-first plans only: with the reference gpt's `policy="auto"` (speed first), its
    loss-gradient peak rose from 0.82 to 0.87 of plain's."""
    steps, anchors, inputs = set(recipe.eqns), [], set(recipe.input_anchors)
    for a in recipe.residual_anchors:
        inner = usage.recipe_of(a) if decision[a] == "recompute" else None  # else stored
        if (
            inner is None or inner.slices or runs_a_matmul([eqns[e] for e in inner.eqns])
            or (not inner.chain and is_forced(inner, eqns, decision))
        ):  # fmt: skip
            anchors.append(a)
            continue
        inner = from_stored(usage, inner, eqns, decision)
        steps.update(inner.eqns)
        anchors.extend(inner.residual_anchors)
        inputs.update(inner.input_anchors)
    return dataclasses.replace(
        recipe, eqns=tuple(sorted(steps)), residual_anchors=tuple(dict.fromkeys(anchors)),
        input_anchors=tuple(sorted(inputs)),
    )  # fmt: skip


def replay(
    eqns: Sequence[Any],
    recipe: Recipe,
    target: Var,
    anchors: dict,
    after: Any,
    untied: Collection[Var] = (),
) -> dict[Any, Any]:
    """Rebuild `target` in the backward: run `recipe`'s equations (indices into `eqns`)
    on the `anchors` (variable -> value), those not in `untied` tied to the value `after`
    first. Returns every value the equations made, `target`'s among them."""
    tie = [v for v in anchors if v not in untied]
    if after is not None and tie:
        # Keeps XLA from merging this with the forward's copy (CSE) and from hoisting
        # it out of the backward. An anchor rebuilt from tied values is the backward's
        # own already; tied again, XLA must materialize it across the barrier: the
        # reference gpt's f32 softmax `exp`, 1 GiB a layer, read by its sum's chain,
        # split the fused softmax in three kernels (every chain rebuilt, H200, jax
        # 0.11.2: 209 ms predicted tied, 190 untied; per-layer `jax.checkpoint` 183).
        tied, _ = _tie([anchors[v] for v in tie], after)
        anchors = {**anchors, **dict(zip(tie, tied, strict=True))}
    local = dict(anchors)
    for e in recipe.eqns:
        eqn = eqns[e]
        outs = bind_eqn(eqn, [read_atom(local, v) for v in eqn.invars])
        local.update(zip(eqn.outvars, outs, strict=True))
    return local


@dataclasses.dataclass
class TiedReplays:
    """`replay` for a run of rebuilds that remembers which rebuilt residuals rest on a
    tie: a rebuild reading one of those leaves it untied (`replay`'s `untied`)."""

    res_vars: Sequence[Any]
    # Residuals rebuilt by a chain with a matmul, by variable: a replay that makes one
    # of them on its way to another (a layer's q, k and v, outputs of one matmul) hands
    # it over (`spare`) instead of the matmul running again where it is first read.
    shared: Mapping[Any, int] = dataclasses.field(default_factory=dict)
    on_tie: set[int] = dataclasses.field(default_factory=set)
    spare: dict[int, Any] = dataclasses.field(default_factory=dict)

    def __call__(
        self, k: int, eqns: Sequence[Any], recipe: Recipe, anchors: dict, after: Any, forced: bool
    ) -> Any:
        """Residual `k` rebuilt by `recipe` (`replay`), tied to `after`; `forced`: its
        rebuild must be tied (`is_forced`), so its readers' rebuilds leave it untied."""
        fresh = {self.res_vars[a] for a in recipe.residual_anchors if a in self.on_tie}
        made = replay(eqns, recipe, self.res_vars[k], anchors, after, untied=fresh)
        tied = forced or bool(fresh)
        for v, j in self.shared.items():
            if j != k and v in made and j not in self.spare:
                self.spare[j] = made[v]
                if tied:
                    self.on_tie.add(j)
        if tied:
            self.on_tie.add(k)
        return made[self.res_vars[k]]


def shared_rebuilds(usage: Usage, plan: Plan) -> dict[Any, int]:
    """`TiedReplays.shared`: the residuals `plan` rebuilds whole by a chain that runs a
    matmul. With the reference gpt's every chain rebuilt and its MLP's hidden layer and
    attention output moved (H200, jax 0.11.2), a layer's v, read first, was rebuilt apart
    from its q and k: 6 more (b*t, d) x (d, 3d) matmuls than rebuilding the three once."""
    res_vars = usage.program.residual_vars
    return {
        res_vars[r.index]: r.index
        for r in plan.residuals
        if r.decision == "recompute" and not r.per_iteration and r.index in usage.chains
        and matmul_in(usage, r.index)
    }  # fmt: skip


def _split_scan(eqn: Any, values: Sequence[Any]) -> tuple[list, list, list]:
    """A scan's operands (or flags over them) as `(consts, carry, stacked)`."""
    nc, nk = scan_counts(eqn)
    return list(values[:nc]), list(values[nc : nc + nk]), list(values[nc + nk :])


class HostStack(NamedTuple):
    """A scan-stacked residual in host memory, laid out to be read one iteration ahead.

    Forward iteration `f` stores, at its own index, the slice iteration `f - 1` made;
    the slice of the last iteration is kept apart in `last`. A backward scan runs the
    other way round, so at each index it finds the slice it needs next, while the
    one it needs now was fetched one iteration earlier (the first: `last`).
    """

    shifted: Any  # (length, *slice shape); the first iteration's index holds zeros
    last: Any  # the slice made by the forward's last iteration


def scan_to_host(
    eqn: Any, invals: Sequence[Any], moved: Collection[Var], unused: Collection[Var] = ()
) -> list[Any]:
    """Evaluate the scan `eqn` with its stacked outputs `moved` built in host memory,
    one slice per iteration, as `HostStack`s: the stacks never exist on device. Its
    stacked outputs in `unused` are not made (None): a per-iteration checkpoint that no
    chain starts from, which eager execution would otherwise hold.

    Each iteration carries the slice it made to the next one, which copies it to host
    beside its own compute."""
    body = eqn.params["jaxpr"]
    consts, init, xs = _split_scan(eqn, invals)
    nk = len(init)
    moves = [v in moved for v in eqn.outvars[nk:]]
    made_here = [v not in unused for v in eqn.outvars[nk:]]
    held = [zeros_like_aval(a) for a, m in zip(body.out_avals[nk:], moves, strict=True) if m]

    def iteration(carry: tuple, x: list[Any]) -> tuple[tuple, list[Any]]:
        carry, held = carry
        outs = eval_jaxpr(body.jaxpr, body.consts, *consts, *carry, *x)
        made = [y for y, m in zip(outs[nk:], moves, strict=True) if m]
        previous = iter([to_host(h) for h in held])
        ys = [next(previous) if m else y for y, m in zip(outs[nk:], moves, strict=True)]
        return (outs[:nk], made), [y for y, keep in zip(ys, made_here, strict=True) if keep]

    (carry, last), ys = scan_like(eqn, iteration, (init, held), xs)
    lasts = iter([to_host(h) for h in last])
    kept = iter(ys)
    ys = [next(kept) if keep else None for keep in made_here]
    stacks = [HostStack(y, next(lasts)) if m else y for y, m in zip(ys, moves, strict=True)]
    return [*carry, *stacks]


class SliceRebuild(NamedTuple):
    """How a backward scan rebuilds, each iteration, its slice of one residual (a
    per-iteration `Recipe`, whose equations are those of the forward scan's body)."""

    body_eqns: Any
    recipe: Recipe
    target: Var
    # Stacks given whole, sliced by the loop: the inputs of `recipe.input_slices`, then
    # the checkpoints of `recipe.stack_slices`.
    input_stacks: tuple


def slice_rebuild(forward_scan: Any, v: Var, recipe: Recipe, inputs: Sequence[Any]) -> SliceRebuild:
    """`inputs`: the values of the function inputs, numbered as `recipe.input_anchors`,
    then of the checkpoints of `recipe.stack_slices`."""
    body = forward_scan.params["jaxpr"].jaxpr
    target = body.outvars[forward_scan.outvars.index(v)]
    return SliceRebuild(body.eqns, recipe, target, tuple(inputs))


def scan_from_host(
    eqn: Any,
    invals: Sequence[Any],
    from_host: Sequence[bool],
    rebuild: dict[int, SliceRebuild] | None = None,
) -> list[Any]:
    """Evaluate the scan `eqn` whose operands flagged in `from_host` are `HostStack`s
    made by a scan that ran the other way: the loop carries each one's next slice,
    fetched to device one iteration ahead of its use, so that copy runs beside the
    current iteration's compute. Operands in `rebuild` (by operand index; their
    `invals` are not read) are rebuilt each iteration from the other slices."""
    rebuild = rebuild or {}
    body = eqn.params["jaxpr"]
    consts, init, xs = _split_scan(eqn, invals)
    first = len(consts) + len(init)
    flags = _split_scan(eqn, from_host)[2]
    kept = [i not in rebuild for i in range(first, first + len(xs))]
    ready0 = [to_device(x.last) for x, f in zip(xs, flags, strict=True) if f]
    xs = [x.shifted if f else x for x, f, k in zip(xs, flags, kept, strict=True) if k]
    extra = [stack for r in rebuild.values() for stack in r.input_stacks]  # more operands

    def iteration(carry: tuple, x: list[Any]) -> tuple[tuple, list[Any]]:
        carry, ready = carry
        slices, now = iter(x), iter(ready)
        x = [next(slices) if k else None for k in kept]
        # TODO: the last iteration fetches the zeros slice: one slice of extra traffic
        # per scan, cheaper than a cond around the copy.
        ahead = [to_device(s) for s, f in zip(x, flags, strict=True) if f]
        x = [next(now) if f else s for s, f in zip(x, flags, strict=True)]
        inputs = {i: [next(slices) for _ in r.input_stacks] for i, r in rebuild.items()}

        def rebuilt(i: int) -> Any:  # anchors that are rebuilt too come first
            if i < len(consts):  # a const anchor serves whole
                return consts[i]
            if x[i - first] is None:
                r = rebuild[i]
                anchors = {var: rebuilt(at) for var, at in r.recipe.slices}
                given = [*r.recipe.input_slices, *(var for var, _ in r.recipe.stack_slices)]
                anchors.update(zip(given, inputs[i], strict=True))
                anchors.update((v, full_like_aval(v.aval, c)) for v, c in r.recipe.fills)
                x[i - first] = replay(r.body_eqns, r.recipe, r.target, anchors, None)[r.target]
            return x[i - first]

        for i in rebuild:
            rebuilt(i)
        outs = eval_jaxpr(body.jaxpr, body.consts, *consts, *carry, *x)
        return (outs[: len(init)], ahead), outs[len(init) :]

    (carry, _), ys = scan_like(eqn, iteration, (init, ready0), [*xs, *extra])
    return [*carry, *ys]


def _live_eqns(jaxpr: Any, needed: Sequence[Any]) -> list[bool]:
    """Top-level liveness: which equations contribute to `needed` or have effects."""
    used = {v for v in needed if isinstance(v, Var)}
    live = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if eqn.effects or any(v in used for v in eqn.outvars):
            live[i] = True
            used.update(v for v in eqn.invars if isinstance(v, Var))
    return live


def offloaded_call(
    primal: Any, plan_for: Callable[[list[Any]], tuple[Usage, Plan]]
) -> Callable[..., list]:
    """A `custom_vjp` function that evaluates the jaxpr `primal`; its VJP follows the
    plan `plan_for(inputs)` returns as `(usage, plan)`, made when the forward is traced."""
    state: dict[str, Any] = {}

    @jax.custom_vjp
    def call(*inputs: Any) -> list[Any]:
        return eval_jaxpr(primal, (), *inputs)

    def fwd(*inputs: Any) -> tuple[list[Any], list[Any]]:
        state["usage"], state["plan"] = plan_for(list(inputs))
        return run_forward(state["usage"], state["plan"], inputs)

    def bwd(stored: list[Any], cts: list[Any]) -> tuple[Any, ...]:
        return tuple(run_backward(state["usage"], state["plan"], stored, cts))

    call.defvjp(fwd, bwd)
    return call
