"""The one place that touches JAX internals whose shape differs between versions.

hetjax supports jax 0.10.x (the CPU package index), 0.11.x (the GPU machines) and
0.12.x. Everything below is either a private JAX API or a spot where those versions
differ; the rest of hetjax reads only this interface.

What differs between them:
- jax 0.12 merged `ClosedJaxpr` into `Jaxpr` (a jaxpr carries its consts, and the
  legacy `.jaxpr` / `.consts` accessors read it as a closed one);
- jax 0.11 replaced the `scan` params `num_consts` / `num_carry` with the flat trees
  `ft_in` / `ft_out` (`scan_counts`);
- jax 0.11 saves `one_minus_square(y)` for `tanh`, where 0.10 saves `y` and computes
  `1 - y**2` in the backward (`VERSION_ELEMENTWISE`, `DERIVED_FORMS`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax._src import core, dtypes, sharding_impls, source_info_util
from jax._src.interpreters import partial_eval as pe

# jax 0.12: one `Jaxpr` class, which carries its consts; `.jaxpr` is itself.
ClosedJaxpr = getattr(core, "ClosedJaxpr", core.Jaxpr)
Jaxpr = core.Jaxpr
JaxprEqn = core.JaxprEqn
Literal = core.Literal
Var = core.Var
Tracer = core.Tracer

# Frames inside hetjax are not the user's code: skip them in source summaries.
source_info_util.register_exclusion(os.path.dirname(__file__))

convert_constvars_jaxpr = pe.convert_constvars_jaxpr
eval_jaxpr = core.eval_jaxpr


def used_inputs(jaxpr: Jaxpr) -> list[bool]:
    """Which inputs of `jaxpr` its outputs depend on. JAX's DCE looks inside nested
    jaxprs: the transpose of a `jit` may take an input that it never reads."""
    return list(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[1])


def zeros_like_aval(aval: Any) -> Any:
    """Zeros of `aval`'s type: shape, dtype, weak type and, where the aval carries one
    (explicit mesh axes), its sharding."""
    try:
        from jax._src import ad_util

        return ad_util.zeros_like_aval(aval)
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - other versions
        return jax.numpy.zeros(aval.shape, aval.dtype)


def full_like_aval(aval: Any, value: Any) -> Any:
    """`value` filling `aval`'s type, its sharding (and shard_map variance) included."""
    return jax.lax.full_like(zeros_like_aval(aval), value)


def read_atom(env: dict, v: Any) -> Any:
    """The value of a jaxpr atom: a literal's own value, or a variable's in `env`."""
    return v.val if isinstance(v, Literal) else env[v]


def cotangent_aval(x: Any) -> Any:
    """The aval of a cotangent for a value shaped like `x` (float0 for ints)."""
    aval = core.ShapedArray(x.shape, x.dtype)
    to_ct = getattr(aval, "to_ct_aval", None) or aval.to_tangent_aval
    return to_ct()


def bind_eqn(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """Bind `eqn` to new inputs, keeping its source line and name stack."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind_params, tuple):
        # Older JAX: `(subfuns, params)`, sub-functions bound positionally.
        subfuns, params = bind_params
        args = (*subfuns, *invals)
    else:
        # jax 0.10.x: one dict; call primitives carry `subfuns=` inside it.
        params, args = bind_params, tuple(invals)
    with _eqn_context(eqn):
        out = eqn.primitive.bind(*args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


@contextlib.contextmanager
def _eqn_context(eqn: JaxprEqn) -> Iterator[None]:
    """Bind under `eqn`'s source line, its name stack and its context (`eqn.ctx`)."""
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (
        source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
        eqn.ctx.manager,
    ):
        yield


POOL_GRADIENT_PIECES = 8  # at most; the reference cnn's peak fell no further with 16


def pool_gradient_pieces(shape: Sequence[int], params: dict) -> tuple[int, int]:
    """`(dimension, pieces)`: a max pool's gradient over an operand of `shape` is computed
    in `pieces` equal pieces along `dimension`, the first longer than 1 whose windows are
    single elements (the batch, else the channels: no window mixes two of its entries),
    at most `POOL_GRADIENT_PIECES` (the largest divisor of its size up to that);
    `(0, 1)`: whole.

    Example:
        >>> params = dict(window_dimensions=(1, 3, 3, 1), window_strides=(1, 2, 2, 1),
        ...               padding=((0, 0), (0, 1), (0, 1), (0, 0)))
        >>> pool_gradient_pieces((256, 128, 128, 64), params)
        (0, 8)
        >>> pool_gradient_pieces((6, 128, 128, 64), params)
        (0, 6)
    """
    for d, size in enumerate(shape):
        single = params["window_dimensions"][d] == params["window_strides"][d] == 1
        if single and tuple(params["padding"][d]) == (0, 0) and size > 1:
            return d, max(k for k in range(1, POOL_GRADIENT_PIECES + 1) if size % k == 0)
    return 0, 1


def bind_tied_pool_gradient(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """`bind_eqn` for a max pool's gradient (`select_and_scatter_add`), computed as JAX
    lowers it for CPU and GPU (the operand padded with the select's identity,
    `select_and_scatter` into zeros, the padding sliced off), with the padded operand and
    the zeros tied to the cotangent (`optimization_barrier`): the same values, but XLA
    can neither merge those zeros with the forward's (relu's `max(x, 0)`), which kept a
    buffer of zeros from the forward to this gradient, nor run the window reduction,
    1.25 GiB of values and indices on the reference cnn, before the cotangent exists.
    It runs in pieces along the batch (`pool_gradient_pieces`), each tied to the piece
    before, so one piece's window reduction is live at a time, and the pieces are
    concatenated: the same values, bit for bit (no window spans two images). The
    reference cnn's loss gradient, H200, jax 0.11.2, with every chain without a matmul
    rebuilt: a peak of 2709 MB whole, 1965 MB in 4 pieces, 1932 in 8 and in 16; nothing
    moved, 3239 whole, 3183 in 8. (Tying the whole operand, each piece padded after its
    barrier: 2030 and 3720; so and the pieces written into one buffer with
    `dynamic_update_slice`: 2096 and 4579.) `select_and_scatter` has no batching or
    differentiation rules: under `vmap` it is the primitive itself, untied, and its
    derivative is the primitive's (linear in the cotangent)."""
    from jax._src.lax import lax as lax_internal
    from jax._src.lax import windowed_reductions

    p = eqn.params
    select_prim, pads = p["select_prim"], p["padding"]

    def untied(source: Any, operand: Any) -> Any:
        return eqn.primitive.bind(source, operand, **p)

    @jax.custom_batching.custom_vmap
    def batchable(source: Any, operand: Any) -> Any:
        identity = (lax_internal._get_max_identity if select_prim is jax.lax.ge_p
                    else lax_internal._get_min_identity)  # fmt: skip
        scatter = jax.lax.bitwise_or if source.dtype == np.bool_ else jax.lax.add
        d, n = pool_gradient_pieces(operand.shape, p)
        size = operand.shape[d] // n
        done: list[Any] = []
        for k in range(n):
            piece = jax.lax.slice_in_dim(operand, k * size, (k + 1) * size, axis=d)
            padded = jax.lax.pad(piece, identity(piece.dtype), [(lo, hi, 0) for lo, hi in pads])
            cotangent = jax.lax.slice_in_dim(source, k * size, (k + 1) * size, axis=d)
            # Tied to the cotangent, and to the piece before: one piece at a time.
            padded, zero, cotangent, *_ = jax.lax.optimization_barrier(
                (padded, lax_internal._zero(padded), cotangent, *done[-1:])
            )
            out = windowed_reductions._select_and_scatter(
                padded, select_prim.bind, p["window_dimensions"], p["window_strides"],
                [(0, 0)] * len(pads), cotangent, zero, scatter,
            )  # fmt: skip
            starts = [lo for lo, _ in pads]
            done.append(jax.lax.slice(out, starts, [lo + e for lo, e in zip(starts, piece.shape)]))
        return done[0] if n == 1 else jax.lax.concatenate(done, d)

    @batchable.def_vmap
    def _(axis_size: int, in_batched: list[bool], source: Any, operand: Any) -> Any:
        del axis_size
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(untied, in_axes=axes)(source, operand), True

    @jax.custom_jvp
    def tied(source: Any, operand: Any) -> Any:
        return batchable(source, operand)

    @tied.defjvp
    def _(primals: Any, tangents: Any) -> Any:
        source, operand = primals
        return tied(source, operand), untied(tangents[0], operand)

    with _eqn_context(eqn):
        return [tied(*invals)]


def inlinable_call(eqn: JaxprEqn) -> bool:
    """A nested `jit` that can be inlined: no layouts or compiler options of its own,
    and shardings, if any, concrete (`call_shardings` keeps them as constraints).
    The primitive is `pjit` before jax 0.7, `jit` since."""
    if eqn.primitive.name not in ("pjit", "jit") or "jaxpr" not in eqn.params:
        return False
    p = eqn.params
    shardings = (*p.get("in_shardings", ()), *p.get("out_shardings", ()))
    layouts = (*p.get("in_layouts", ()), *p.get("out_layouts", ()))
    return (
        all(isinstance(s, (sharding_impls.UnspecifiedValue, jax.sharding.Sharding))
            for s in shardings)
        and all(x is None for x in layouts)
        and not p.get("compiler_options_kvs")
    )  # fmt: skip


def call_shardings(eqn: JaxprEqn) -> tuple[list[Any], list[Any]]:
    """The shardings a nested `jit` names for its inputs and outputs (None where it
    names none)."""

    def named(s: Any) -> Any:
        return None if isinstance(s, sharding_impls.UnspecifiedValue) else s

    p = eqn.params
    return [named(s) for s in p["in_shardings"]], [named(s) for s in p["out_shardings"]]


def inner_name_stack(eqn: JaxprEqn) -> Any:
    """A context in which equations bound from `eqn`'s sub-jaxpr keep `eqn`'s name
    stack as a prefix (so "transpose(" marks survive inlining)."""
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    return source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)


# Libraries whose frames are not the user's model code: a flax module's residual
# is reported at the user's line that called it (a loss, a block), not in flax.
LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in ("flax", "optax", "chex", "equinox"))


def source_line(eqn: JaxprEqn) -> str:
    """The user's `file:line (function)` that emitted `eqn`, or "unknown"."""
    try:
        frames = list(source_info_util.user_frames(eqn.source_info.traceback))
        mine = [f for f in frames if not any(d in f.file_name for d in LIBRARY_DIRS)]
        frame = (mine or frames or [None])[0]
        if frame is None:
            return "unknown"
        return f"{short_path(frame.file_name)}:{frame.start_line} ({frame.function_name})"
    except Exception:  # pragma: no cover - summaries are best effort
        return "unknown"


def short_path(path: str) -> str:
    """`path` relative to the working directory when it is inside it, else its file name:
    a table names the user's file without printing the layout of their machine.

    Example:
        >>> short_path("/somewhere/else/train.py")
        'train.py'
    """
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return os.path.basename(path) if relative.startswith("..") else relative


def is_transpose(eqn: JaxprEqn) -> bool:
    """Whether JAX marked `eqn` as part of a transposed (backward) computation."""
    return "transpose(" in str(eqn.source_info.name_stack)


def is_extended(dtype: Any) -> bool:
    """PRNG keys and other extended dtypes cannot be placed in host memory."""
    return dtypes.issubdtype(dtype, dtypes.extended) or dtype == dtypes.float0


def on_host(aval: Any) -> bool:
    return getattr(aval, "memory_space", None) == core.MemorySpace.Host


def nbytes(aval: Any) -> int:
    """Bytes of one value on one device; PRNG keys count their underlying integers.

    A value whose aval carries its sharding (mesh axes of type `Explicit`) counts one
    shard. Under `Auto` axes the partitioner picks shardings after tracing, so the
    aval has none and the whole value is counted.
    """
    if not hasattr(aval, "shape") or aval.dtype == dtypes.float0:
        return 0
    shape, dtype = shard_shape(aval), aval.dtype
    if is_extended(dtype):  # trailing physical dims (a key's words) are not sharded
        physical = core.physical_aval(aval)
        shape, dtype = (*shape, *physical.shape[len(aval.shape) :]), physical.dtype
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def shard_shape(aval: Any) -> tuple[int, ...]:
    """The shape of one device's shard of `aval`, as far as the aval knows it.

    Only mesh axes of type `Explicit` named in `aval.sharding.spec` divide a
    dimension: `Auto` axes are not in the spec, and inside `shard_map` the aval is
    already the local block and its `Manual` axes are not counted again.
    """
    shape = tuple(int(d) for d in aval.shape)
    sharding = getattr(aval, "sharding", None)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None or not getattr(mesh, "axis_names", ()):
        return shape
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    }
    out = list(shape)
    for dim, entry in enumerate(tuple(spec)[: len(shape)]):
        names = (entry,) if isinstance(entry, str) else entry if isinstance(entry, tuple) else ()
        ways = int(np.prod([sizes[n] for n in names if n in explicit], dtype=np.int64))
        out[dim] = -(-out[dim] // ways)  # explicit shardings divide evenly; ceil anyway
    return tuple(out)


def sub_jaxprs(eqn: JaxprEqn) -> list[Jaxpr]:
    """Every jaxpr nested in `eqn`'s params (pjit, cond branches, scan, ...)."""
    found: list[Jaxpr] = []

    def visit(x: Any) -> None:
        if isinstance(x, ClosedJaxpr):
            found.append(x.jaxpr)
        elif isinstance(x, Jaxpr):
            found.append(x)
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)

    for value in eqn.params.values():
        visit(value)
    return found


def typeof(x: Any) -> Any:
    return jax.typeof(x) if hasattr(jax, "typeof") else core.get_aval(x)


# Cheap elementwise primitives that only some jax versions emit (recomputable).
VERSION_ELEMENTWISE = frozenset({"one_minus_square"})  # jax >= 0.11: tanh's 1 - y**2
# Of those, the ones a newer jax computes in the forward and saves where an older one
# saves their input and computes them in the backward (`defer_derived_forms`).
DERIVED_FORMS = frozenset({"one_minus_square"})


def scan_counts(eqn: JaxprEqn) -> tuple[int, int]:
    """`(num_consts, num_carry)` of a `scan` equation: its operands are the consts,
    then the carry, then the stacked inputs; its outputs the carry, then the stacks."""
    p = eqn.params
    if "num_consts" in p:  # jax 0.10
        return p["num_consts"], p["num_carry"]
    consts, carry, _ = p["ft_in"].unpack()  # jax >= 0.11: flat trees of the operands
    return len(consts), len(carry)
