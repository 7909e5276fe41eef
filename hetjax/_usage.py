"""Stage 2: usage. One `ResidualUsage` per residual: the patent's forward-pass monitor.

Positions are in program order: forward equations are `0 .. F-1`, backward equations
`F .. F+B-1`. A function input is produced at position -1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

from ._compat import Literal as LiteralAtom
from ._compat import (
    Var,
    is_extended,
    nbytes,
    on_host,
    scan_counts,
    source_line,
    sub_jaxprs,
    used_inputs,
)
from ._fusion import (
    CHEAP_PRIMITIVES,
    VIEW_PRIMITIVES,
    FusedSources,
    made_in_readers,
    rebuilt_by_xla,
    stored_intervals,
)
from ._trace import VjpProgram

Decision = Literal["keep", "offload", "recompute"]

# A parameter gathered or laid out anew (FSDP's `reshard` of a weight) is still a
# copy of an input: kept on device as plain JAX keeps it, not moved, and not
# recomputed, which would add a collective to the backward.
LAYOUT_PRIMITIVES = frozenset({"reshard", "sharding_constraint", "mesh_cast"})
MAX_RECOMPUTE_EQNS = 8
# A chain is forward work the backward may redo from stored values, matmuls and
# reductions included: `jax.checkpoint`'s recomputation, chosen per residual by the
# planner at a cost (#13). Not through loops (their bodies are rebuilt slice by slice
# instead), collectives, layout changes (a collective in the backward), or host moves.
MAX_CHAIN_EQNS = 32
NOT_IN_CHAINS = (
    frozenset(
        """scan while cond device_put psum pmax pmin ppermute all_gather all_to_all
    reduce_scatter psum_scatter axis_index pbroadcast psum_invariant""".split()
    )
    | LAYOUT_PRIMITIVES
)


@dataclasses.dataclass(frozen=True)
class ResidualUsage:
    """How one residual is produced and used, and what the plan does with it.

    Example:
        >>> import jax, jax.numpy as jnp, hetjax
        >>> def loss(w, x):
        ...     return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2)
        >>> w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
        >>> report = hetjax.analyze(loss, w, x, policy="all", min_bytes=0)
        >>> [(r.primitive, r.decision) for r in report.residuals if r.decision == "offload"]
        [('tanh', 'offload')]
        >>> report.moved_bytes  # tanh(x @ w): 32 x 64 float32; its derivatives are rebuilt
        8192
    """

    index: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    primitive: str
    source: str
    produced_at: int
    last_forward_use: int
    first_backward_use: int
    last_backward_use: int
    is_input: bool
    recomputable: bool
    offloadable: bool
    memory: str = "device"
    # A stacked output of a forward `scan` read only as a stacked input of one
    # backward `scan`: it can move one iteration's slice at a time.
    per_iteration: bool = False
    # Where the backward pass that reads it starts; None: at the record's boundary.
    # A train step that takes several gradients has one backward pass per gradient.
    backward_from: int | None = None
    # False when the backward takes it but never reads it (see `_unread_in_backward`).
    read_in_backward: bool = True
    # A forward value JAX does not save, which a chain may start from (`_trace.
    # with_checkpoints`); read in the backward only where the plan recomputes from it.
    checkpoint: bool = False
    decision: Decision = "keep"
    offload_by: int | None = None
    prefetch_at: int | None = None
    # An offloaded value moves as this many arrays, split along its leading axis (see
    # `_plan.piece_arrivals`).
    pieces: int = 1

    @property
    def idle_span(self) -> int:
        """Positions between the last forward use and the first backward use."""
        return self.first_backward_use - self.last_forward_use

    @property
    def move(self) -> str:
        """How an offloaded residual travels: "per-iteration" slices inside the scans
        that make and read it, as a "whole" array, or "in N pieces". A residual recomputed slice by
        slice inside the backward scan is "per-iteration" too; otherwise ""."""
        if self.decision == "offload":
            if self.per_iteration:
                return "per-iteration"
            return f"in {self.pieces} pieces" if self.pieces > 1 else "whole"
        if self.decision == "recompute" and self.per_iteration:
            return "per-iteration"
        return ""

    @property
    def slice_nbytes(self) -> int:
        """Bytes of one scan iteration's slice (the whole for other residuals)."""
        if self.per_iteration and self.shape and self.shape[0]:
            return self.nbytes // self.shape[0]
        return self.nbytes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to recompute a residual in the backward from values available there."""

    eqns: tuple[int, ...]  # forward equation indices, in program order
    input_anchors: tuple[int, ...]  # forward input indices it reads
    residual_anchors: tuple[int, ...]  # residual indices it reads
    # Set for a residual rebuilt one scan iteration at a time (`slice_recipe`): then
    # `eqns` index the forward scan's body, each residual anchor is a pair (body
    # variable, operand index of the backward scan that reads that anchor's stack), and
    # each input anchor (a stacked function input, such as the layers' weights, that
    # the backward scan is given as an extra operand) its body variable.
    slices: tuple[tuple[Var, int], ...] = ()
    input_slices: tuple[Var, ...] = ()
    # Consts of the forward scan that fill an array with one literal (`broadcast_literal`),
    # as (body variable, scalar): the backward makes them anew, whole.
    fills: tuple[tuple[Var, Any], ...] = ()
    # Per-iteration checkpoints (a scan's stacked carry) among the residual anchors, as
    # (body variable, residual index): the backward scan is given their stacks too.
    stack_slices: tuple[tuple[Var, int], ...] = ()
    chain: bool = False  # made by `chain_for`: costlier work than views and elementwise


@dataclasses.dataclass(frozen=True)
class Usage:
    """The usage record of a program: residuals, how to recompute some, and the
    program order the positions refer to.

    The planner reads only `residuals`, `recipes`, `eqns` and `boundary`; `program`
    is for the rewrite of the form that produced the record.
    """

    program: Any
    residuals: tuple[ResidualUsage, ...]
    recipes: dict[int, Recipe]
    eqns: tuple[Any, ...]  # every top-level equation, in program order
    boundary: int  # positions < boundary are forward, the rest backward
    # Device buffers other than residuals, as (nbytes, first, last) positions:
    # arguments, intermediates, gradients. Residuals' intervals follow their plan.
    buffers: tuple[tuple[int, int, int], ...] = ()
    # Costlier recipes (`chain_for`) of residuals with no cheap one: the planner may
    # recompute one of these instead of moving it, at the chain's cost.
    chains: dict[int, Recipe] = dataclasses.field(default_factory=dict)
    # Residuals XLA rebuilds inside the backward's kernels instead of storing them
    # (`_fusion`), and the stored values they keep live instead.
    fused: dict[int, FusedSources] = dataclasses.field(default_factory=dict)
    # Residuals XLA makes inside the forward's kernels that read them (`_fusion.
    # made_in_readers`): rebuilt in the backward, they hold no bytes in the forward.
    made_in_readers: frozenset[int] = frozenset()

    @functools.cached_property
    def checkpoints(self) -> frozenset[int]:
        """The residuals a chain may start from that the backward does not read
        (`ResidualUsage.checkpoint`): stored only where a chosen recomputation reads one."""
        return frozenset(r.index for r in self.residuals if r.checkpoint)

    def recipe_of(self, k: int) -> Recipe:
        """How residual `k` is rebuilt when the plan recomputes it."""
        return self.recipes[k] if k in self.recipes else self.chains[k]


def residual_usage(program: VjpProgram) -> Usage:
    fwd = program.forward.jaxpr
    bwd = program.backward.jaxpr
    num_fwd = len(fwd.eqns)
    num_bwd = len(bwd.eqns)
    res_vars = program.residual_vars

    producer, last_use = def_use(fwd.eqns)
    input_index = {v: i for i, v in enumerate(fwd.invars)}

    bwd_res_invars = bwd.invars[: program.num_residuals]
    first_use: dict[Var, int] = {}
    last_bwd_use: dict[Var, int] = {}
    readers = eqns_reading(bwd.eqns)
    for j, eqn in enumerate(bwd.eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                first_use.setdefault(v, num_fwd + j)
                last_bwd_use[v] = num_fwd + j
    end = num_fwd + num_bwd
    for v in bwd.outvars:
        if isinstance(v, Var):
            first_use.setdefault(v, end)
            last_bwd_use[v] = end
    # Read in the forward after being made, or an output: must exist as a whole there.
    whole_in_forward = set(last_use) | set(fwd.outvars[: program.num_outputs])

    # The first residual index for each var; a repeated var shares its record. Cheap
    # recipes never start from a checkpoint: storing one costs what it saves.
    residual_of: dict[Var, int] = {}
    for k, v in enumerate(res_vars):
        if isinstance(v, Var) and k not in program.checkpoints:
            residual_of.setdefault(v, k)

    recipes: dict[int, Recipe] = {}
    records = []
    for k, v in enumerate(res_vars):
        aval = v.aval
        if not isinstance(v, Var):
            records.append(_constant_record(k, aval, num_fwd + num_bwd))
            continue
        p = producer.get(v, -1)
        recipe = None if p < 0 else recipe_for(fwd, v, producer, input_index, residual_of)
        if recipe is not None:
            recipes[k] = recipe
        read_as = bwd_res_invars[k]
        sliceable = (
            p >= 0
            and v not in whole_in_forward
            and res_vars.count(v) == 1
            and read_as not in bwd.outvars
            and moves_per_iteration(fwd.eqns[p], v, readers.get(read_as, []), read_as)
        )
        records.append(
            residual_record(
                k, v, fwd, producer,
                last_forward_use=max(p, last_use.get(v, p)),
                first_backward_use=first_use.get(read_as, end),
                last_backward_use=last_bwd_use.get(read_as, end),
                input_index=input_index,
                recipe=recipe,
                per_iteration=sliceable,
            )
        )  # fmt: skip
    scans = dict(
        forward_eqns=fwd.eqns,
        readers_of=lambda k: readers.get(bwd_res_invars[k], []),
        stacked={v: (k, bwd_res_invars[k]) for v, k in residual_of.items()},
        var_of=res_vars,
        input_index=input_index,
    )
    records = [dataclasses.replace(r, checkpoint=r.index in program.checkpoints) for r in records]

    def backward_readers(k: int) -> list | None:
        read_as = bwd_res_invars[k]
        return None if read_as in bwd.outvars else readers.get(read_as, [])

    fused = rebuilt_by_xla(
        fwd, res_vars, backward_readers, producer, last_use, input_index, residual_of
    )
    records = with_slice_recipes(records, recipes, **scans)
    records, recipes = _unread_in_backward(
        records, recipes, used_inputs(bwd)[: program.num_residuals]
    )
    stacked_checkpoints = {
        res_vars[r.index]: r.index for r in records
        if r.checkpoint and _stacked_by_scan(fwd.eqns[r.produced_at], res_vars[r.index])
    }  # fmt: skip
    records = [_stacked_checkpoint(r) if r.index in stacked_checkpoints.values() else r
               for r in records]  # fmt: skip
    return Usage(
        program=program,
        residuals=tuple(records),
        recipes=recipes,
        eqns=(*fwd.eqns, *bwd.eqns),
        boundary=num_fwd,
        buffers=_vjp_buffers(program, set(res_vars)),
        fused=fused,
        made_in_readers=made_in_readers(
            fwd.eqns, records, res_vars, set(fwd.outvars[: program.num_outputs])
        ),
        chains={
            **chains_of(records, fwd, producer, input_index, res_vars),
            **slice_recipes(
                records, recipes, **scans, find=chain_for, checkpoints=stacked_checkpoints
            ),
        },
    )


def _stacked_by_scan(eqn: Any, v: Var) -> bool:
    """Whether `v` is a stacked output of the scan `eqn` (not its final carry)."""
    return is_scan(eqn) and v in eqn.outvars[scan_counts(eqn)[1] :]


def _stacked_checkpoint(r: ResidualUsage) -> ResidualUsage:
    """A scan's stacked carry (`_trace.scan_carry_checkpoints`): it moves no slices, and
    unless a chain starts from it, it is never made (XLA drops the unread stack)."""
    before = r.produced_at - 1  # an empty interval until `_plan` reads it
    return dataclasses.replace(
        r, offloadable=False, per_iteration=True, last_forward_use=before,
        first_backward_use=before, last_backward_use=before,
    )  # fmt: skip


def chains_of(
    records: list[ResidualUsage], jaxpr: Any, producer: dict, input_index: dict, var_of: Any
) -> dict[int, Recipe]:
    """The chain recipes (`chain_for`) of the residuals with nothing cheaper: read in the
    backward, moved whole, neither inputs nor rebuilt cheaply. A chain stops at the
    residuals the backward reads (stored, or rebuilt cheaply), at checkpoints (stored
    only for the chains that start there) and at inputs."""
    stops: dict[Var, int] = {}
    for r in records:
        if (r.read_in_backward or r.checkpoint) and isinstance(var_of[r.index], Var):
            stops.setdefault(var_of[r.index], r.index)
    chains = {}
    for r in records:
        v = var_of[r.index]
        if (
            r.read_in_backward and not r.recomputable and not r.is_input
            and not r.per_iteration and r.produced_at >= 0 and stops.get(v) == r.index
        ):  # fmt: skip
            chain = chain_for(jaxpr, v, producer, input_index, stops)
            if chain is not None:
                chains[r.index] = chain
    return chains


def _unread_in_backward(
    records: list[ResidualUsage], recipes: dict[int, Recipe], read: list[bool]
) -> tuple[list[ResidualUsage], dict[int, Recipe]]:
    """Residuals the backward takes but never reads (a `jit`'s transpose can take all
    of the `jit`'s residuals and use a few): XLA drops them, so moving one moves
    nothing, and keeping one costs nothing after its forward uses. Unless a recipe
    rebuilds another residual from it, it dies with its last forward use."""
    recipes = {k: recipe for k, recipe in recipes.items() if read[k]}
    anchors = {a for recipe in recipes.values() for a in recipe.residual_anchors}
    out = []
    for r, is_read in zip(records, read, strict=True):
        if not is_read:
            end = r.last_forward_use if r.index not in anchors else r.last_backward_use
            r = dataclasses.replace(
                r, read_in_backward=False, recomputable=False, per_iteration=False,
                first_backward_use=min(end, r.first_backward_use), last_backward_use=end,
            )  # fmt: skip
        out.append(r)
    return out, recipes


def with_slice_recipes(
    records: list[ResidualUsage],
    recipes: dict[int, Recipe],
    forward_eqns: Any,
    readers_of: Any,
    stacked: dict[Var, tuple[int, Var]],
    var_of: Any,
    input_index: dict[Var, int],
) -> list[ResidualUsage]:
    """Give each per-iteration residual that one scan iteration can rebuild cheaply
    from other stacked residuals a `slice_recipe` (added to `recipes`), and mark it
    recomputable. Recipes are acyclic: an anchor is made before what it rebuilds.

    `readers_of(k)` lists the backward equations reading residual `k`; `stacked` maps a
    forward variable to its residual index and the variable the backward reads it as;
    `input_index` numbers the function inputs.
    """
    found = slice_recipes(records, recipes, forward_eqns, readers_of, stacked, var_of, input_index)
    recipes.update(found)  # an anchor may be rebuilt too: the rewrite rebuilds it first
    return [dataclasses.replace(r, recomputable=True) if r.index in found else r
            for r in records]  # fmt: skip


def slice_recipes(
    records: list[ResidualUsage],
    recipes: dict[int, Recipe],
    forward_eqns: Any,
    readers_of: Any,
    stacked: dict[Var, tuple[int, Var]],
    var_of: Any,
    input_index: dict[Var, int],
    find: Any = None,
    checkpoints: dict[Var, int] | None = None,
) -> dict[int, Recipe]:
    """`slice_recipe` of each per-iteration residual that has no recipe in `recipes`;
    with `find=chain_for`, the chains that rebuild them one scan iteration at a time,
    which may start from `checkpoints` (stacked carries, by variable)."""
    found: dict[int, Recipe] = {}
    producer = def_use(forward_eqns)[0]

    def fill_of(v: Any) -> Any:
        return broadcast_literal(v, producer, forward_eqns)

    for r in records:
        if r.per_iteration and r.index not in recipes and not r.checkpoint:
            (reader,) = readers_of(r.index)
            scan = forward_eqns[r.produced_at]
            recipe = slice_recipe(
                scan, reader, var_of[r.index], stacked, input_index, find, fill_of, checkpoints
            )
            if recipe is not None:
                found[r.index] = recipe
    return found


def slice_recipe(
    scan: Any,
    reader: Any,
    v: Var,
    stacked: dict[Var, tuple[int, Var]],
    input_index: dict,
    find: Any = None,
    fill_of: Any = lambda v: None,
    checkpoints: dict[Var, int] | None = None,
) -> Recipe | None:
    """How the backward scan `reader` can rebuild, in each iteration, its slice of `v`
    (a stacked output of the forward `scan`): cheap equations of `scan`'s body, run
    on that iteration's slices of other stacked residuals that `reader` reads too
    (stacked outputs of `scan`, or stacked inputs such as the layers' weights), or of
    stacked function inputs that `reader` can be given (the f32 weights of a layer's
    bf16 copy). `find=chain_for` looks for a chain instead of cheap equations.
    A const of `scan` that `reader` takes as a const too serves whole, and one that
    `fill_of` (outer variable -> scalar or None) says fills an array with a literal is
    made anew (the reference gpt_scan's attention mask and fill value, made once outside
    the loop: its softmax `exp` is rebuilt from them and the iteration's q and k). A
    stacked output of `scan` in `checkpoints` serves too: the backward scan is given its
    stack (`Recipe.stack_slices`)."""
    body = scan.params["jaxpr"].jaxpr
    num_consts, num_carry = scan_counts(scan)
    first_stacked = num_consts + num_carry
    read_consts, read_carry = scan_counts(reader)
    pairs = [
        *zip(scan.outvars[num_carry:], body.outvars[num_carry:], strict=True),
        *zip(scan.invars[first_stacked:], body.invars[first_stacked:], strict=True),
    ]
    consts = set(body.invars[:num_consts])
    pairs += zip(scan.invars[:num_consts], body.invars[:num_consts], strict=True)
    anchors: dict[Var, int] = {}  # body variable -> residual index
    where: dict[int, tuple[Var, int]] = {}  # residual index -> (body var, reader operand)
    given: dict[Var, int] = {}  # body variable -> stacked checkpoint given to `reader`
    for outer, inner in pairs:
        if outer is v or not isinstance(inner, Var) or inner in anchors:
            continue
        if checkpoints and isinstance(outer, Var) and outer in checkpoints:
            anchors[inner] = given[inner] = checkpoints[outer]
            continue
        if not isinstance(outer, Var) or outer not in stacked:
            continue
        j, read_as = stacked[outer]
        operands = (
            range(read_consts)
            if inner in consts
            else range(read_consts + read_carry, len(reader.invars))
        )
        at = [i for i in operands if reader.invars[i] is read_as]
        if at:
            anchors[inner] = j
            where[j] = (inner, at[0])
    # Stacked inputs of `scan` that are function inputs, where no residual serves.
    inputs = {
        inner: input_index[outer]
        for outer, inner in zip(scan.invars[first_stacked:], body.invars[first_stacked:])
        if isinstance(outer, Var) and outer in input_index and inner not in anchors
    }
    fills = {
        inner: value
        for outer, inner in zip(scan.invars[:num_consts], body.invars[:num_consts], strict=True)
        if inner not in anchors and (value := fill_of(outer)) is not None
    }
    target = body.outvars[scan.outvars.index(v)]
    if not isinstance(target, Var):
        return None
    recipe = (find or recipe_for)(body, target, def_use(body.eqns)[0], inputs, anchors, fills)
    if recipe is None:
        return None
    body_var_of_input = {i: inner for inner, i in inputs.items()}
    return dataclasses.replace(
        recipe,
        slices=tuple(where[j] for j in recipe.residual_anchors if j in where),
        input_slices=tuple(body_var_of_input[i] for i in recipe.input_anchors),
        stack_slices=tuple((x, j) for x, j in given.items() if j in recipe.residual_anchors),
    )


def _vjp_buffers(program: VjpProgram, residual_vars: set) -> tuple[tuple[int, int, int], ...]:
    """Device intervals of every value of a `VjpProgram` that is not a residual, as XLA
    stores them (`_fusion.stored_intervals`)."""
    fwd, bwd = program.forward.jaxpr, program.backward.jaxpr
    num_fwd = len(fwd.eqns)
    end = num_fwd + len(bwd.eqns)
    out: list[tuple[int, int, int]] = [(nbytes(v.aval), -1, end) for v in fwd.invars]
    for jaxpr, offset, skip in (
        (fwd, 0, residual_vars | set(fwd.invars)),
        (bwd, num_fwd, set(bwd.invars[: program.num_residuals])),
    ):
        born: dict[Var, int] = {v: offset - 1 for v in jaxpr.invars if v not in skip}
        last: dict[Var, int] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if isinstance(v, Var):
                    last[v] = offset + i
        outputs = jaxpr.outvars if jaxpr is bwd else jaxpr.outvars[: program.num_outputs]
        for v in outputs:
            if isinstance(v, Var):
                last[v] = end if jaxpr is bwd else num_fwd
        stored = {v for v in jaxpr.outvars if isinstance(v, Var)}  # residuals: the plan decides
        out += stored_intervals(jaxpr.eqns, offset, born, last, stored, skip)
    return tuple(out)


def def_use(eqns: Any) -> tuple[dict[Var, int], dict[Var, int]]:
    """Producer position and last use position of each variable of `eqns`."""
    producer: dict[Var, int] = {}
    last_use: dict[Var, int] = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                last_use[v] = i
        for v in eqn.outvars:
            producer[v] = i
    return producer, last_use


def eqns_reading(eqns: Any) -> dict[Var, list[Any]]:
    """The distinct equations that read each variable, in program order."""
    readers: dict[Var, list[Any]] = {}
    for eqn in eqns:
        for v in dict.fromkeys(x for x in eqn.invars if isinstance(x, Var)):
            readers.setdefault(v, []).append(eqn)
    return readers


def is_scan(eqn: Any) -> bool:
    return eqn.primitive.name == "scan"


def moves_per_iteration(producer: Any, v: Var, readers: list[Any], read_as: Var) -> bool:
    """Whether `v`, made by the equation `producer`, is a stacked output of a scan
    that one scan of the same length, running the other way (as a transposed scan
    does), reads (as `read_as`) only as a stacked input.
    Then each iteration's slice can go to host as it is made and come back for the
    iteration that reads it, and the stacked array never exists on device."""
    if not is_scan(producer) or v not in producer.outvars[scan_counts(producer)[1] :]:
        return False
    if len(readers) != 1 or not is_scan(readers[0]):
        return False
    reader = readers[0]
    first_stacked = sum(scan_counts(reader))
    at = [i for i, x in enumerate(reader.invars) if x is read_as]
    return (
        len(at) == 1
        and at[0] >= first_stacked
        and reader.params["length"] == producer.params["length"]
        and reader.params["reverse"] != producer.params["reverse"]  # reads last slice first
    )


def residual_record(
    k: int,
    v: Var,
    jaxpr: Any,
    producer: dict[Var, int],
    *,
    last_forward_use: int,
    first_backward_use: int,
    last_backward_use: int,
    input_index: dict[Var, int],
    recipe: Recipe | None = None,
    per_iteration: bool = False,
    backward_from: int | None = None,
) -> ResidualUsage:
    """The record of residual `k`, the variable `v` of `jaxpr` (forward or whole step)."""
    aval = v.aval
    p = producer.get(v, -1)
    eqn = jaxpr.eqns[p] if p >= 0 else None
    return ResidualUsage(
        index=k,
        shape=tuple(aval.shape),
        dtype=str(aval.dtype),
        nbytes=nbytes(aval),
        primitive="argument" if eqn is None else str(eqn.primitive),
        source="argument" if eqn is None else source_line(eqn),
        produced_at=p,
        last_forward_use=last_forward_use,
        first_backward_use=first_backward_use,
        last_backward_use=last_backward_use,
        is_input=(
            v in input_index
            or _aliases_input(jaxpr, v, producer, input_index)
            or (eqn is not None and _stacked_view_of_input(eqn, v, jaxpr, producer, input_index))
        ),
        recomputable=recipe is not None,
        offloadable=not is_extended(aval.dtype) and not on_host(aval),
        memory="host" if on_host(aval) else "device",
        per_iteration=per_iteration,
        backward_from=backward_from,
    )


def _constant_record(k: int, aval: Any, end: int) -> ResidualUsage:
    return ResidualUsage(
        index=k, shape=tuple(aval.shape), dtype=str(aval.dtype), nbytes=nbytes(aval),
        primitive="literal", source="constant", produced_at=-1, last_forward_use=-1,
        first_backward_use=end, last_backward_use=end, is_input=True, recomputable=False,
        offloadable=False,
    )  # fmt: skip


def _stacked_view_of_input(eqn: Any, v: Var, jaxpr: Any, producer: dict, input_index: dict) -> bool:
    """Whether `v`, a stacked output of the scan `eqn`, is in each iteration a view
    (slice, convert, ...) of what the iteration reads from a function input: the
    per-layer copies of stacked weights. Like the whole-array views of inputs, they
    are kept, never moved."""
    if not is_scan(eqn):
        return False
    nc, nk = scan_counts(eqn)
    if v not in eqn.outvars[nk:]:
        return False
    body = eqn.params["jaxpr"].jaxpr
    first_x = nc + nk
    from_inputs = {
        inner: None
        for i, (inner, outer) in enumerate(zip(body.invars, eqn.invars, strict=True))
        if (i < first_x - nk or i >= first_x)  # consts and stacked inputs, not the carry
        and isinstance(outer, Var)
        and (outer in input_index or _aliases_input(jaxpr, outer, producer, input_index))
    }
    inner_out = body.outvars[eqn.outvars.index(v)]
    if not isinstance(inner_out, Var):
        return False
    return _aliases_input(body, inner_out, def_use(body.eqns)[0], from_inputs)


def _aliases_input(fwd: Any, v: Var, producer: dict, input_index: dict) -> bool:
    """Whether `v` is a view (slice, reshape, convert, reshard...) of a function input."""
    while v not in input_index:
        p = producer.get(v)
        if p is None:
            return False
        eqn = fwd.eqns[p]
        if str(eqn.primitive) not in VIEW_PRIMITIVES | LAYOUT_PRIMITIVES:
            return False
        v = eqn.invars[0]
        if not isinstance(v, Var):
            return False
    return True


def recipe_for(
    fwd: Any,
    target: Var,
    producer: dict,
    input_index: dict,
    residual_of: dict,
    fills: dict | None = None,
) -> Recipe | None:
    """The cheap forward equations that rebuild `target` from inputs and residuals (and
    `fills`: variables that `Recipe.fills` makes anew)."""
    return _rebuild(
        fwd, target, producer, input_index, residual_of, fills or {}, _cheap, MAX_RECOMPUTE_EQNS
    )


def chain_for(
    fwd: Any,
    target: Var,
    producer: dict,
    input_index: dict,
    residual_of: dict,
    fills: dict | None = None,
) -> Recipe | None:
    """The forward equations, of any cost, that rebuild `target` from inputs and
    residuals: at most `MAX_CHAIN_EQNS`, none of `NOT_IN_CHAINS` (at any depth)."""
    chain = _rebuild(
        fwd, target, producer, input_index, residual_of, fills or {}, _chainable, MAX_CHAIN_EQNS
    )
    return None if chain is None else dataclasses.replace(chain, chain=True)


def broadcast_literal(v: Any, producer: dict, eqns: Any, given: dict | None = None) -> Any:
    """The scalar that fills `v`, where `v` broadcasts a literal (`jnp.full`, the fill
    value of a `where`), through `jit` calls; else None. `given`: the scalars of
    variables known to hold one (a call's inputs given literals)."""
    given = given or {}
    p = producer.get(v)
    if p is None:
        return None
    eqn = eqns[p]
    scalars = [x.val if isinstance(x, LiteralAtom) else given.get(x) for x in eqn.invars]
    name = str(eqn.primitive)
    if name == "broadcast_in_dim":
        return scalars[0]
    if name not in ("jit", "pjit"):
        return None
    inner = eqn.params["jaxpr"].jaxpr
    out = inner.outvars[eqn.outvars.index(v)]
    inner_given = {x: c for x, c in zip(inner.invars, scalars, strict=True) if c is not None}
    if not isinstance(out, Var):
        return None
    return broadcast_literal(out, def_use(inner.eqns)[0], inner.eqns, inner_given)


def _cheap(eqn: Any) -> bool:
    """A view or elementwise op, or a constant made from literals alone (such as the
    `reshard 1.0` of explicit sharding)."""
    constant = not any(isinstance(x, Var) for x in eqn.invars) and not sub_jaxprs(eqn)
    return (str(eqn.primitive) in CHEAP_PRIMITIVES or constant) and not eqn.effects


def _chainable(eqn: Any) -> bool:
    if eqn.effects or str(eqn.primitive) in NOT_IN_CHAINS:
        return False
    if any(on_host(v.aval) for v in eqn.outvars):
        return False
    return all(_chainable(e) for j in sub_jaxprs(eqn) for e in j.eqns)


def _rebuild(
    fwd: Any,
    target: Var,
    producer: dict,
    input_index: dict,
    residual_of: dict,
    fills: dict,
    allowed: Any,
    max_eqns: int,
) -> Recipe | None:
    eqns: set[int] = set()
    inputs: set[int] = set()
    residuals: set[int] = set()
    filled: dict[Var, Any] = {}
    stack = [target]
    while stack:
        v = stack.pop()
        if v is not target:
            if v in fills:
                filled[v] = fills[v]
                continue
            if v in input_index:
                inputs.add(input_index[v])
                continue
            if v in residual_of:
                residuals.add(residual_of[v])
                continue
        p = producer.get(v)
        if p is None:
            return None
        if p in eqns:
            continue
        eqn = fwd.eqns[p]
        if not allowed(eqn):
            return None
        eqns.add(p)
        if len(eqns) > max_eqns:
            return None
        stack.extend(x for x in eqn.invars if isinstance(x, Var))
    return Recipe(
        tuple(sorted(eqns)),
        tuple(sorted(inputs)),
        tuple(sorted(residuals)),
        fills=tuple(filled.items()),
    )
