"""Part of the usage stage: which values XLA's GPU compiler stores, and which it rebuilds
inside the kernels that read them.

What was learnt from compiling the reference presets for the H200 (jax 0.11.2), against
a model that stored every value of the jaxpr (predicted over compiled peak: mlp 1.92,
gpt 1.75, cnn 2.95):

- XLA fuses elementwise work into the kernels that read it and duplicates a producer
  into each reader unless the producer is "expensive" (`InstructionFusion::IsExpensive`,
  with the GPU's exceptions: `exp`, `div`, `sqrt` and `rsqrt` are cheap in f32 and f16).
  So a residual that is cheap elementwise work of stored values (the cnn's f32 batch
  norm of a bf16 convolution, the gpt's f32 softmax `exp`, tanh's `1 - y**2`) is not
  stored: the backward's kernels rebuild it, and what stays live is its sources (the
  convolution's output, the scores, `y`). Read by a matmul in the backward, it is stored.
- A value made by a fusible op and read only by fusing readers is never materialized.
- An elementwise op may write its output over an operand that dies there (buffer
  reuse): the gradient of stacked weights, `add_any(pad(g_i), acc)`, is built in place.
  A sum of gradients (`add_any`) is stored from where it is first made, even where its
  readers could fuse it: XLA either builds it in place from the first add or keeps
  every addend for one kernel at the end. Counted only at the end, the reference mlp's
  537 MB stacked gradient was missing from the backward: its `all` plan modelled at
  0.70 of the compiled peak, 0.86 with it (H200, jax 0.11.2). Its first sum,
  `add_any(pad(g_i), pad(g_j))`, is born at the earlier pad: XLA makes that pad whole
  (a `loop_pad_fusion`) and adds the other pieces into it. Counted from the add, the
  mlp's plan at 0.8 of plain's peak modelled at 0.84 of its compiled peak, 0.90 so (its
  baseline 1.09, 1.14 so). A pad added to another value (the logits' gradient) fuses
  into the add, as before.
- Some ops need scratch the jaxpr does not show (`scratch_bytes`): a max pool's
  gradient holds an f32 value and four s32 indices per pooled value (1.25 GiB on the
  reference cnn). Counted, the planned peak of the plan the cnn's budgets kept then
  went from 0.82 to 0.95 of the compiled one (jax 0.10.2 to 0.12). Its programs also
  held bf16 zeros the size of the stem's output (512 MiB) from the forward's stem to
  the pool's gradient, once in plain's program and twice (with a copy the scatter
  writes into) in per-layer remat's and in hetjax's (jax 0.11.2): relu's zero and the
  scatter's, merged by XLA. hetjax now ties the pool's gradient to its cotangent
  (`_rewrite.bind_backward`), so the scatter's zeros are made in the backward; relu's
  are still held, by one of hetjax's own ties. The model counts neither: its plain
  peak is 0.80 of the compiled one.

The rules are an approximation of XLA's fusion heuristics (size limits, multi-output
fusion and the fusion merger are not modelled). Smaller programs store more than they
say: 4 attention layers on 8 x 1024 tokens keep their f32 softmax outputs (the model's
plain peak 0.76 of the compiled one, jax 0.11.2), 4 conv + batch-norm + relu layers on
32 64 x 64 images their relu masks (0.64); and pins that tie into a partial gradient
sum stop its in-place update. `_check` holds every plan against the
compiler where there is one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._compat import VERSION_ELEMENTWISE, Var, nbytes, pool_gradient_pieces, sub_jaxprs

# Primitives whose output is a view of, or a cheap elementwise function of, their
# inputs. A residual built only from these (and from values available in the
# backward anyway) is recomputed there instead of stored (GPU_FINDINGS.md, item 3).
VIEW_PRIMITIVES = frozenset(
    """slice squeeze reshape transpose broadcast_in_dim convert_element_type
    expand_dims dynamic_slice copy copy_p rev reduce_precision""".split()
)
ELEMENTWISE_PRIMITIVES = frozenset(
    """add sub mul neg div integer_pow square max min abs sign select_n exp exp2
    log log1p expm1 tanh logistic sqrt rsqrt sin cos erf pow eq ne gt ge lt le
    and or not""".split()
)
CHEAP_PRIMITIVES = VIEW_PRIMITIVES | ELEMENTWISE_PRIMITIVES | VERSION_ELEMENTWISE

# Elementwise ops XLA does not duplicate into several readers (IsExpensive).
EXPENSIVE = frozenset(
    """tanh log log1p expm1 logistic sin cos tan erf erf_inv erfc pow atan2 cbrt
    lgamma digamma""".split()
)
# Expensive elsewhere, cheap on the GPU in f32 and f16 (GpuInstructionFusion::IsExpensive).
CHEAP_IN_F32 = frozenset({"exp", "exp2", "div", "sqrt", "rsqrt"})
FUSIBLE = CHEAP_PRIMITIVES | frozenset({"add_any", "pad", "iota", "concatenate", "clamp"})
# Readers that take a fused producer into their own kernel (loop and input fusions).
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)
CALLS = frozenset({"jit", "pjit", "custom_jvp_call", "closed_call", "core_call"})
MAX_FUSED_EQNS = 16  # producers walked back from one residual to its stored sources


def fuses(eqn: Any) -> bool:
    """Whether XLA fuses `eqn` into the kernels that read its output."""
    name = str(eqn.primitive)
    if eqn.effects:
        return False
    bodies = sub_jaxprs(eqn)
    if bodies:  # a call XLA inlines (jit, custom_jvp_call): fused where its body is
        return name in CALLS and all(fuses(e) for j in bodies for e in j.eqns)
    if name not in FUSIBLE or name in EXPENSIVE:
        return False
    if name in CHEAP_IN_F32:
        return all(np.dtype(v.aval.dtype) in (np.float32, np.float16) for v in eqn.outvars)
    return True


def absorbs(eqn: Any) -> bool:
    """Whether `eqn` can take a fused producer into its kernel."""
    return fuses(eqn) or str(eqn.primitive) in REDUCTIONS


@dataclasses.dataclass(frozen=True)
class FusedSources:
    """What a residual XLA rebuilds in the backward's kernels keeps live instead of
    itself: stored values made in the forward (`(nbytes, made_at, last_forward_use)`,
    keyed by variable) and other residuals (by index). Inputs are live anyway."""

    values: tuple[tuple[int, tuple[int, int, int]], ...]
    residuals: tuple[int, ...]


def fused_sources(
    jaxpr: Any,
    v: Var,
    producer: dict,
    last_use: dict,
    input_index: dict,
    residual_of: dict,
) -> FusedSources | None:
    """The stored sources of `v` through fusible producers, or None where its producer
    does not fuse (or the walk runs past `MAX_FUSED_EQNS`)."""
    p = producer.get(v)
    if p is None or not fuses(jaxpr.eqns[p]):
        return None
    values: dict[int, tuple[int, int, int]] = {}
    residuals: set[int] = set()
    seen: set[int] = set()
    stack = [x for x in jaxpr.eqns[p].invars if isinstance(x, Var)]
    seen.add(p)
    while stack:
        x = stack.pop()
        if x in input_index:
            continue
        if x in residual_of:
            residuals.add(residual_of[x])
            continue
        q = producer.get(x)
        if q is None:
            continue
        if not fuses(jaxpr.eqns[q]):
            values[id(x)] = (nbytes(x.aval), q, last_use.get(x, q))
            continue
        if q not in seen:
            seen.add(q)
            if len(seen) > MAX_FUSED_EQNS:
                return None
            stack.extend(y for y in jaxpr.eqns[q].invars if isinstance(y, Var))
    return FusedSources(tuple(values.items()), tuple(sorted(residuals)))


def rebuilt_by_xla(
    jaxpr: Any,
    residual_vars: Any,
    backward_readers: Any,
    producer: dict,
    last_use: dict,
    input_index: dict,
    residual_of: dict,
) -> dict[int, FusedSources]:
    """The residuals (by index) XLA rebuilds in the backward's kernels, with their stored
    sources: made by fusible work (`fused_sources`), and read in the backward only by
    readers that absorb them. `backward_readers(k)` is residual `k`'s backward readers,
    or None where it is an output of the program (stored)."""
    fused = {}
    for k, v in enumerate(residual_vars):
        readers = backward_readers(k)
        if isinstance(v, Var) and readers is not None and all(absorbs(e) for e in readers):
            sources = fused_sources(jaxpr, v, producer, last_use, input_index, residual_of)
            if sources is not None:
                fused[k] = sources
    return fused


def made_in_readers(
    eqns: Any, records: Any, residual_vars: Any, outputs: Any = ()
) -> frozenset[int]:
    """The residuals (by index) that XLA makes inside the forward's kernels that read
    them, and so never stores there, when the plan does not store them: made by fusible
    work and read in the forward only by readers that absorb them. Rebuilt in the
    backward, the reference cnn's f32 batch-norm values (1 GiB each at the stem) were
    counted from the forward's norm to its relu: the memory model put the loss-gradient
    peak of every chain without a matmul rebuilt at 2756 MB, XLA at 1932 (H200, jax
    0.11.2); without them, 2031. `eqns` are the forward's (or the step's) equations, at
    the positions of `records` (`ResidualUsage`); `outputs` the program's outputs (stored
    whatever the plan does)."""
    readers: dict[Var, list[int]] = {}
    for i, eqn in enumerate(eqns):
        for x in eqn.invars:
            if isinstance(x, Var):
                readers.setdefault(x, []).append(i)
    made = set()
    for r in records:
        v = residual_vars[r.index]
        if r.per_iteration or r.produced_at < 0 or v in outputs or not fuses(eqns[r.produced_at]):
            continue
        forward = [i for i in readers.get(v, []) if i < r.first_backward_use]
        if all(absorbs(eqns[i]) for i in forward):
            made.add(r.index)
    return frozenset(made)


def stored_intervals(
    eqns: Any, offset: int, born: dict, last: dict, outputs: set, skip: set
) -> list[tuple[int, int, int]]:
    """Device intervals `(nbytes, first, last)` of the values of `eqns` (and of `born`'s
    inputs) that XLA stores, less `skip`: a value whose producer fuses and whose readers
    all absorb it is never stored; an elementwise output reuses the buffer of a
    same-sized operand that dies at its producer. `eqns[i]` is at position `offset + i`."""
    readers: dict[Var, list[Any]] = {}
    for eqn in eqns:
        for x in eqn.invars:
            if isinstance(x, Var):
                readers.setdefault(x, []).append(eqn)
    first = dict(born)
    fusing = [fuses(eqn) for eqn in eqns]  # `fuses` walks `jit` bodies: once per equation
    virtual: set[Var] = set()
    for eqn, fused in zip(eqns, fusing, strict=True):
        for v in eqn.outvars:
            if (
                fused
                and v not in outputs
                and str(eqn.primitive) != "add_any"  # a gradient sum: see above
                and all(absorbs(e) for e in readers.get(v, []))
            ):
                virtual.add(v)
    padded_at = {e.outvars[0]: offset + i for i, e in enumerate(eqns) if str(e.primitive) == "pad"}
    for i, eqn in enumerate(eqns):
        reuse = fusing[i] and any(
            isinstance(x, Var) and x in first and x not in skip and x not in virtual
            and last.get(x) == offset + i and nbytes(x.aval) == nbytes(eqn.outvars[0].aval)
            for x in eqn.invars
        )  # fmt: skip
        for v in eqn.outvars:
            first[v] = offset + i + (1 if reuse else 0)
        pieces = [x for x in eqn.invars if isinstance(x, Var)]
        if str(eqn.primitive) == "add_any" and pieces and all(x in padded_at for x in pieces):
            # A stacked gradient's first sum: the earlier pad's buffer (module docstring).
            first[eqn.outvars[0]] = min(padded_at[x] for x in pieces)
    scratch = [(scratch_bytes(eqn), offset + i, offset + i) for i, eqn in enumerate(eqns)]
    stored = [
        (nbytes(v.aval), b, last.get(v, b))
        for v, b in first.items()
        if v not in skip and v not in virtual
    ]
    return [s for s in scratch if s[0]] + stored


def scratch_bytes(eqn: Any) -> int:
    """Bytes XLA's GPU compiler adds while `eqn` runs, beyond its operands and outputs:
    a max pool's gradient (`select_and_scatter_add`) becomes a window reduction that
    carries, per window, the selected value (at least f32) and an s32 index for each
    dimension, then a scatter. The reference cnn's pool over a (256, 128, 128, 64) bf16
    input held five (256, 64, 64, 64) buffers, 1.25 GiB, in plain's compiled program
    (H200, jax 0.11.2). The rewrite computes it in pieces along the batch, one at a time
    (`_compat.bind_tied_pool_gradient`): a piece's. Nested equations count at their
    largest (they run in turn)."""
    if str(eqn.primitive) == "select_and_scatter_add":
        source = eqn.invars[0].aval
        value = max(np.dtype(source.dtype).itemsize, 4)
        _, pieces = pool_gradient_pieces(eqn.invars[1].aval.shape, eqn.params)
        return int(np.prod(source.shape)) * (value + 4 * len(source.shape)) // pieces
    return max((scratch_bytes(e) for j in sub_jaxprs(eqn) for e in j.eqns), default=0)
