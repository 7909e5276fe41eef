"""Stage 1: trace. A loss function -> its forward and backward jaxprs.

The forward jaxpr maps inputs to outputs plus residuals; the backward jaxpr maps
residuals plus output cotangents to input cotangents. Both come from `jax.vjp`, so
they are exactly the computation `jax.grad` would run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import tree_flatten, tree_unflatten

from ._compat import (
    DERIVED_FORMS,
    ClosedJaxpr,
    Jaxpr,
    Var,
    bind_eqn,
    call_shardings,
    convert_constvars_jaxpr,
    cotangent_aval,
    eval_jaxpr,
    inlinable_call,
    inner_name_stack,
    on_host,
    read_atom,
    scan_counts,
    sub_jaxprs,
)


@dataclasses.dataclass(frozen=True)
class VjpProgram:
    """The forward and backward halves of a VJP, as closed jaxprs.

    `forward`:  (*inputs) -> (*outputs, *residuals)
    `backward`: (*residuals, *output_cotangents) -> (*input_cotangents)
    """

    forward: ClosedJaxpr
    backward: ClosedJaxpr
    num_inputs: int
    num_outputs: int
    # Residual indices `with_checkpoints` added: forward values JAX does not save, which
    # the backward takes but never reads. A chain may start from one (the plan then
    # stores it, on device or host), as `jax.checkpoint` restarts from a layer's input.
    checkpoints: tuple[int, ...] = ()

    @property
    def num_residuals(self) -> int:
        return len(self.forward.jaxpr.outvars) - self.num_outputs

    @property
    def residual_vars(self) -> list[Any]:
        return list(self.forward.jaxpr.outvars[self.num_outputs :])

    @property
    def num_positions(self) -> int:
        """Length of the program order: forward equations, then backward ones."""
        return len(self.forward.jaxpr.eqns) + len(self.backward.jaxpr.eqns)


def trace_primal(flat_fun: Any, args: Sequence[Any]) -> tuple[Jaxpr, list[Any], Any]:
    """Trace `flat_fun(*args) -> list` to a jaxpr with no constants.

    Constants, including tracers of enclosing transformations that `flat_fun`
    closes over, become leading inputs: they are returned and must be passed
    first. That keeps gradients flowing to closed-over values.
    Returns `(jaxpr, consts, out_shapes)`.
    """
    closed, out_shapes = jax.make_jaxpr(flat_fun, return_shape=True)(*args)
    return convert_constvars_jaxpr(closed.jaxpr), list(closed.consts), out_shapes


def trace_vjp(primal: Jaxpr | ClosedJaxpr, in_avals: Sequence[Any]) -> VjpProgram:
    """Split `primal` into forward (with residual outputs) and backward jaxprs."""
    pullback_tree: list[Any] = []
    closed = primal if isinstance(primal, ClosedJaxpr) else ClosedJaxpr(primal, ())
    jaxpr, consts = closed.jaxpr, closed.consts

    def run_primal(*xs: Any) -> list[Any]:
        return eval_jaxpr(jaxpr, consts, *xs)

    def forward(*xs: Any) -> tuple[list[Any], list[Any]]:
        outs, pullback = jax.vjp(run_primal, *xs)
        residuals, tree = tree_flatten(pullback)
        pullback_tree.append(tree)
        return outs, residuals

    fwd_closed, (out_shapes, res_shapes) = jax.make_jaxpr(forward, return_shape=True)(*in_avals)
    (tree,) = pullback_tree

    def backward(residuals: list[Any], cts: list[Any]) -> list[Any]:
        return list(tree_unflatten(tree, residuals)(cts))

    ct_avals = [_ct_shape(s) for s in out_shapes]
    bwd_closed = jax.make_jaxpr(backward)(res_shapes, ct_avals)
    program = VjpProgram(
        forward=fwd_closed,
        backward=bwd_closed,
        num_inputs=len(in_avals),
        num_outputs=len(out_shapes),
    )
    return with_checkpoints(defer_derived_forms(program, in_avals, ct_avals), in_avals, ct_avals)


# A forward value read again this many equations after it is made (a skip connection,
# such as a transformer layer's input, read by its norm and by the residual add after the
# layer) may be a checkpoint: chains rebuild the layer's internals from it. As many as a
# chain may hold (`_usage.MAX_CHAIN_EQNS`): a shorter-lived value (a norm's mean, the
# masked attention scores) would stop chains that do better from stored residuals.
MIN_CHECKPOINT_SPAN = 32
MATMUL_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
# A convolution's output that the forward widens (bf16 into its f32 batch norm) may be a
# checkpoint however short-lived: the f32 values the backward saves from it rebuild from
# half their bytes, with no matmul. On the reference cnn, XLA keeps the bf16 convolution
# outputs, not the f32 residuals JAX names. Not a dot_general's (the reference gpt's
# bf16 logits would stop the chain that rebuilds its f32 logits from the layers' output);
# TODO: measure that case before widening this.
WIDENED_CHECKPOINT_PRIMITIVES = frozenset({"conv_general_dilated"})


def checkpoint_candidates(program: VjpProgram) -> list[Var]:
    """The forward values `with_checkpoints` adds: float arrays on device, neither inputs,
    outputs nor residuals, whose last forward reader comes at least `MIN_CHECKPOINT_SPAN`
    equations after their producer, or which are convolution outputs the forward widens.
    Top-level values only (`scan_carry_checkpoints` has a scan's carries); the step form
    (`_step`) has no checkpoints yet."""
    fwd = program.forward.jaxpr
    taken = {v for v in fwd.outvars if isinstance(v, Var)}
    made: dict[Var, int] = {}
    last: dict[Var, int] = {}
    widened: set[Var] = set()
    convolved: set[Var] = set()
    for i, eqn in enumerate(fwd.eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                last[v] = i
        if eqn.primitive.name == "convert_element_type" and _widens(eqn):
            widened.update(v for v in eqn.invars if isinstance(v, Var))
        if eqn.primitive.name in WIDENED_CHECKPOINT_PRIMITIVES:
            convolved.update(eqn.outvars)
        made.update((v, i) for v in eqn.outvars)
    return [
        v for v, i in made.items()
        if v not in taken and v.aval.shape and not on_host(v.aval)
        and jnp.issubdtype(v.aval.dtype, jnp.inexact)
        and (last.get(v, i) - i >= MIN_CHECKPOINT_SPAN or v in convolved & widened)
    ]  # fmt: skip


def scan_carry_checkpoints(program: VjpProgram) -> dict[int, tuple[int, ...]]:
    """The top-level forward scans that stack residuals, by equation id, with the
    positions of their float array carries on device: a scan's per-iteration checkpoint
    is such a carry as each iteration starts (a scanned layer's input, where
    `jax.checkpoint` restarts), stacked by `with_checkpoints`."""
    residuals = {v for v in program.residual_vars if isinstance(v, Var)}
    found = {}
    for eqn in program.forward.jaxpr.eqns:
        if eqn.primitive.name != "scan":
            continue
        num_consts, num_carry = scan_counts(eqn)
        if residuals.isdisjoint(eqn.outvars[num_carry:]):
            continue
        carries = eqn.invars[num_consts : num_consts + num_carry]
        which = tuple(
            i for i, c in enumerate(carries)
            if c.aval.shape and not on_host(c.aval) and jnp.issubdtype(c.aval.dtype, jnp.inexact)
        )  # fmt: skip
        if which:
            found[id(eqn)] = which
    return found


def scan_like(eqn: Any, body: Any, init: Any, xs: list[Any]) -> tuple[Any, list[Any]]:
    """`lax.scan` with `eqn`'s length, direction and unrolling, in `eqn`'s name stack."""
    p = eqn.params
    with inner_name_stack(eqn):
        return jax.lax.scan(
            body, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )


def _scan_stacking_carries(
    eqn: Any, invals: Sequence[Any], which: tuple[int, ...]
) -> tuple[list[Any], list[Any]]:
    """The scan `eqn` evaluated on `invals`: its outputs, and the carries `which` (by
    position) stacked as each iteration starts."""
    num_consts, num_carry = scan_counts(eqn)
    consts, init = invals[:num_consts], list(invals[num_consts : num_consts + num_carry])
    body = eqn.params["jaxpr"]

    def iteration(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        outs = eval_jaxpr(body.jaxpr, body.consts, *consts, *carry, *x)
        return outs[:num_carry], [*outs[num_carry:], *(carry[i] for i in which)]

    carry, ys = scan_like(eqn, iteration, init, list(invals[num_consts + num_carry :]))
    made = len(ys) - len(which)
    return [*carry, *ys[:made]], list(ys[made:])


def runs_a_matmul(eqns: Sequence[Any]) -> bool:
    """Whether `eqns` run a matmul (or a convolution), nested ones too."""
    return any(
        e.primitive.name in MATMUL_PRIMITIVES or any(runs_a_matmul(j.eqns) for j in sub_jaxprs(e))
        for e in eqns
    )


def _widens(eqn: Any) -> bool:
    """Whether a `convert_element_type` makes a float wider (bf16 to f32)."""
    (x,), (y,) = eqn.invars, eqn.outvars
    return (
        jnp.issubdtype(x.aval.dtype, jnp.floating) and jnp.issubdtype(y.aval.dtype, jnp.floating)
        and jnp.dtype(y.aval.dtype).itemsize > jnp.dtype(x.aval.dtype).itemsize
    )  # fmt: skip


def with_checkpoints(
    program: VjpProgram, in_avals: Sequence[Any], ct_avals: Sequence[Any]
) -> VjpProgram:
    """`program` with `checkpoint_candidates` appended to its residuals, then the
    carries of `scan_carry_checkpoints`, stacked by their scans: the forward returns
    them too, the backward takes them and reads none. Unless a plan rebuilds a residual
    from one, the rewrite does not store it (`_rewrite.StoredLayout`)."""
    extra = checkpoint_candidates(program)
    carries = scan_carry_checkpoints(program)
    if not extra and not carries:
        return program
    fwd, bwd = program.forward, program.backward
    num_outputs, num_residuals = program.num_outputs, program.num_residuals
    saved = [*program.residual_vars, *extra]

    def forward(*xs: Any) -> tuple[list[Any], list[Any]]:
        stacks: list[Any] = []

        def bind(eqn: Any, invals: list[Any]) -> list[Any]:
            if id(eqn) not in carries:
                return bind_eqn(eqn, invals)
            outs, stacked = _scan_stacking_carries(eqn, invals, carries[id(eqn)])
            stacks.extend(stacked)
            return outs

        env = _eval_env(fwd.jaxpr, fwd.consts, xs, bind=bind)
        outputs = [read_atom(env, v) for v in fwd.jaxpr.outvars[:num_outputs]]
        return outputs, [*(read_atom(env, v) for v in saved), *stacks]

    fwd_closed, (_, saved_shapes) = jax.make_jaxpr(forward, return_shape=True)(*in_avals)

    def backward(values: list[Any], cts: list[Any]) -> list[Any]:
        return eval_jaxpr(bwd.jaxpr, bwd.consts, *values[:num_residuals], *cts)

    bwd_closed = jax.make_jaxpr(backward)(saved_shapes, list(ct_avals))
    return dataclasses.replace(
        program,
        forward=fwd_closed,
        backward=bwd_closed,
        checkpoints=tuple(range(num_residuals, len(saved_shapes))),
    )


def defer_derived_forms(
    program: VjpProgram, in_avals: Sequence[Any], ct_avals: Sequence[Any]
) -> VjpProgram:
    """`program` with each residual that the forward derives from one other value by
    a `DERIVED_FORMS` equation (jax >= 0.11 saves tanh's `one_minus_square(y)`) stored
    as that value instead, the equation running in the backward just before the first
    equation that reads its result.

    Only where `y` is not a residual already (where it is, the derived residual is
    rebuilt from it by the usage stage's recipes, as `one_minus_square` is cheap).
    Older jax stores `y` and computes `1 - y` in the backward; with this, every
    supported version stores `y` and the same plan moves the same bytes. The swap is
    byte for byte (`y` and `1 - y**2` have one type), so plain's figures stay those of
    jax's own residuals. Values are unchanged: the same equation runs on the same
    value, only later."""
    fwd = program.forward.jaxpr
    residuals = program.residual_vars
    producer = {v: e for e in fwd.eqns for v in e.outvars}
    read_in_forward = {v for e in fwd.eqns for v in e.invars if isinstance(v, Var)}
    read_in_forward.update(v for v in fwd.outvars[: program.num_outputs] if isinstance(v, Var))
    stored_anyway = {v for v in residuals if isinstance(v, Var)}
    derived: dict[int, Any] = {}  # residual index -> the equation that derives it
    for k, v in enumerate(residuals):
        eqn = producer.get(v) if isinstance(v, Var) else None
        if eqn is not None and eqn.primitive.name in DERIVED_FORMS and v not in read_in_forward:
            (source,) = eqn.invars
            # A source that is a residual already needs nothing here: the usage stage
            # rebuilds the derived value from it, and plain's figures keep counting both.
            if isinstance(source, Var) and source not in stored_anyway:
                derived[k] = eqn
    if not derived:
        return program
    stored: list[Any] = []  # the new residual atoms; a source stored once
    slot: list[int] = []  # residual k's value: stored[slot[k]], then its equation if derived
    for k, v in enumerate(residuals):
        atom = derived[k].invars[0] if k in derived else v
        if isinstance(atom, Var) and atom in stored:
            slot.append(stored.index(atom))
        else:
            slot.append(len(stored))
            stored.append(atom)
    skipped = {id(e) for e in derived.values()}  # not read in the forward any more
    consts = program.forward.consts
    num_outputs = program.num_outputs

    def forward(*xs: Any) -> tuple[list[Any], list[Any]]:
        env = _eval_env(fwd, consts, xs, skip=skipped)
        return [read_atom(env, v) for v in fwd.outvars[:num_outputs]], [
            read_atom(env, v) for v in stored
        ]

    fwd_closed, (_, stored_shapes) = jax.make_jaxpr(forward, return_shape=True)(*in_avals)
    bwd = program.backward

    def backward(values: list[Any], cts: list[Any]) -> list[Any]:
        # Each derived residual is made just before its first reader, not all at the
        # start: made early, every layer's would be live (and its source fetched) at once.
        jaxpr = bwd.jaxpr
        pending = {jaxpr.invars[k]: k for k in derived}
        env = dict(zip(jaxpr.constvars, bwd.consts, strict=True))
        env.update(
            (jaxpr.invars[k], values[slot[k]]) for k in range(len(residuals)) if k not in derived
        )
        env.update(zip(jaxpr.invars[len(residuals) :], cts, strict=True))

        def read(v: Any) -> Any:
            k = pending.pop(v, None) if isinstance(v, Var) else None
            if k is not None:
                env[v] = bind_eqn(derived[k], [values[slot[k]]])[0]
            return read_atom(env, v)

        for eqn in jaxpr.eqns:
            env.update(zip(eqn.outvars, bind_eqn(eqn, [read(v) for v in eqn.invars]), strict=True))
        return [read(v) for v in jaxpr.outvars]

    bwd_closed = jax.make_jaxpr(backward)(stored_shapes, list(ct_avals))
    return dataclasses.replace(program, forward=fwd_closed, backward=bwd_closed)


def _eval_env(
    jaxpr: Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    bind: Any = bind_eqn,
    skip: frozenset | set = frozenset(),
) -> dict:
    """Every value of `jaxpr` evaluated on `args`, each equation by `bind(eqn, invals)`,
    but the equations in `skip` (ids)."""
    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        if id(eqn) not in skip:
            outs = bind(eqn, [read_atom(env, v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs, strict=True))
    return env


def _ct_shape(s: Any) -> jax.ShapeDtypeStruct:
    ct = cotangent_aval(s)
    return jax.ShapeDtypeStruct(ct.shape, ct.dtype)


def inline_calls(jaxpr: Jaxpr, inputs: Sequence[Any]) -> ClosedJaxpr:
    """`jaxpr` with its nested `jit` calls inlined, recursively, with fresh variables.

    Inside an outer trace a nested `jit` is a scope, not a program: donation does not
    apply, and the shardings it names are kept as sharding constraints. Calls with
    layouts or compiler options of their own are left alone.
    """
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=_weak(x)) for x in inputs]
    return jax.make_jaxpr(lambda *xs: _eval_inlined(jaxpr, [], xs))(*avals)


def _eval_inlined(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env = _eval_env(jaxpr, consts, args, bind=_bind_inlined)
    return [read_atom(env, v) for v in jaxpr.outvars]


def _bind_inlined(eqn: Any, invals: list[Any]) -> list[Any]:
    """`eqn` bound to `invals`, or, for an inlinable `jit`, its body evaluated inline."""
    if not inlinable_call(eqn):
        return bind_eqn(eqn, invals)
    inner = eqn.params["jaxpr"]
    in_shardings, out_shardings = call_shardings(eqn)
    with inner_name_stack(eqn):
        invals = _constrain(invals, in_shardings)
        return _constrain(_eval_inlined(inner.jaxpr, inner.consts, invals), out_shardings)


def _constrain(values: list[Any], shardings: list[Any]) -> list[Any]:
    """A call's named shardings, kept as sharding constraints when it is inlined."""
    return [
        x if s is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(values, shardings, strict=True)
    ]


def _weak(x: Any) -> bool:
    return bool(getattr(getattr(x, "aval", x), "weak_type", False))


def calls_a_scan(jaxpr: Jaxpr) -> bool:
    """Whether a top-level `jit` call that `inline_calls` would inline holds a `scan`.

    Only then is inlining worth it in the loss form (the scan's stacked residuals can
    then move per iteration): run eagerly, an inlined call no longer runs as one
    compiled program, and its rounding may differ.
    """

    def has_scan(j: Jaxpr) -> bool:
        return any(e.primitive.name == "scan" or any(map(has_scan, sub_jaxprs(e)))
                   for e in j.eqns)  # fmt: skip

    return any(inlinable_call(e) and has_scan(e.params["jaxpr"].jaxpr) for e in jaxpr.eqns)


@dataclasses.dataclass
class _Slices:
    """A scan's stacked output kept as its per-iteration slices (`parts[i]`: iteration
    i's), for a later unrolled scan to read one at a time."""

    parts: list[Any]


def unroll_scans(closed: ClosedJaxpr) -> ClosedJaxpr:
    """`closed` with each top-level `scan` run as one copy of its body per iteration.

    Each iteration reads its slice of the scanned inputs (`lax.index_in_dim`); a stacked
    output that only later scans read as scanned inputs (a forward scan's residuals,
    read by its transposed scan in a train step) passes to them slice by slice and is
    never stacked, so each layer's values are values of their own, which a plan can
    keep, move or rebuild one by one. Other stacked outputs are written into their
    stack as each iteration makes them (`dynamic_update_index_in_dim`, in place).
    Scans nested in other constructs stay loops. Values are the scan's; XLA fuses the
    unrolled bodies differently from one loop body, so jitted results agree within
    rounding (op by op, bitwise).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def f(w, x):
        ...     return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, w)[0]
        >>> closed = jax.make_jaxpr(f)(jnp.ones((3, 4, 4)), jnp.ones((2, 4)))
        >>> [e.primitive.name for e in unroll_scans(closed).jaxpr.eqns].count("tanh")
        3
    """
    # Tried, not kept: each scanned input split once by `lax.split` (its gradient one
    # `concatenate` at the end, not a sum of padded slices), every stacked output kept
    # as slices and stacked where first read. The reference gpt_scan at remat's peak
    # (H200, jax 0.11.2 and 0.12.0.1) then moved 4.4 GiB at 290.3 ms predicted, 0.91 of
    # remat's extra flops, against 1.69 GiB, 217.9 ms and 0.79 as here (then, at 2144821).
    jaxpr = closed.jaxpr
    scanned_only = _read_only_as_scanned(jaxpr)

    def bind(eqn: Any, invals: list[Any]) -> list[Any]:
        if eqn.primitive.name == "scan" and eqn.params["length"] > 0:
            num_known = sum(scan_counts(eqn))
            known = [_whole(x) for x in invals[:num_known]]
            return _unrolled_scan(eqn, known, invals[num_known:], scanned_only)
        return bind_eqn(eqn, [_whole(x) for x in invals])

    def run(*args: Any) -> list[Any]:
        env = _eval_env(jaxpr, closed.consts, args, bind=bind)
        return [_whole(read_atom(env, v)) for v in jaxpr.outvars]

    avals = [
        jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=_weak(v)) for v in jaxpr.invars
    ]
    return jax.make_jaxpr(run)(*avals)


def _whole(x: Any) -> Any:
    """A value as one array: `_Slices` stacked."""
    return jnp.stack(x.parts) if isinstance(x, _Slices) else x


def _read_only_as_scanned(jaxpr: Jaxpr) -> set[Var]:
    """The top-level scans' stacked outputs that every reader reads as a scanned input
    of a scan (none is an output of `jaxpr`)."""
    whole_reads: set[Var] = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for eqn in jaxpr.eqns:
        scanned = eqn.invars[sum(scan_counts(eqn)) :] if eqn.primitive.name == "scan" else []
        whole_reads.update(v for v in eqn.invars if isinstance(v, Var) and v not in scanned)
    stacked = {
        v for e in jaxpr.eqns if e.primitive.name == "scan" for v in e.outvars[scan_counts(e)[1] :]
    }
    return stacked - whole_reads


def _unrolled_scan(eqn: Any, known: list[Any], xs: list[Any], scanned_only: set[Var]) -> list[Any]:
    """The scan `eqn`'s outputs, its body run once per iteration; `known` are its
    constants and initial carries, `xs` its scanned inputs (arrays or `_Slices`)."""
    num_consts, num_carry = scan_counts(eqn)
    consts, carry = known[:num_consts], known[num_consts:]
    length, body = eqn.params["length"], eqn.params["jaxpr"]
    stacked = eqn.outvars[num_carry:]
    parts: list[list[Any]] = [[None] * length for _ in stacked]
    stacks: list[Any] = [None] * len(stacked)
    with inner_name_stack(eqn):
        for i in reversed(range(length)) if eqn.params["reverse"] else range(length):
            x_i = [
                x.parts[i] if isinstance(x, _Slices) else jax.lax.index_in_dim(x, i, keepdims=False)
                for x in xs
            ]
            outs = eval_jaxpr(body.jaxpr, body.consts, *consts, *carry, *x_i)
            carry = outs[:num_carry]
            for j, (v, y) in enumerate(zip(stacked, outs[num_carry:], strict=True)):
                if v in scanned_only:
                    parts[j][i] = y
                    continue
                if stacks[j] is None:
                    stacks[j] = jnp.zeros(v.aval.shape, v.aval.dtype)
                stacks[j] = jax.lax.dynamic_update_index_in_dim(stacks[j], y, i, 0)
    ys = [
        _Slices(p) if v in scanned_only else s
        for v, p, s in zip(stacked, parts, stacks, strict=True)
    ]
    return [*carry, *ys]
