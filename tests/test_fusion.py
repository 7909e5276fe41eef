"""The memory model's knowledge of what XLA's GPU compiler stores (`hetjax._fusion`).

Memory against the compiler itself is in tests/test_compiled.py; these run on any
backend and check the rules one at a time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from models import max_pool

import hetjax
from hetjax import _fusion
from hetjax._api import usage_and_plan
from hetjax._compat import Var
from hetjax._memory import memory_timeline, plan_timeline

NONE = dict(policy="none", min_bytes=0, device_budget=None, profile=None, target=None)
F32, BF16 = jnp.float32, jnp.bfloat16


def usage_of(fun, *args):
    return usage_and_plan(fun, args, {}, NONE)[0]


def eqns_of(fun, *args):
    return {str(e.primitive): e for e in jax.make_jaxpr(fun)(*args).jaxpr.eqns}


def test_which_ops_xla_fuses_on_a_gpu() -> None:
    f32, bf16 = jnp.ones((4, 4), F32), jnp.ones((4, 4), BF16)
    wide = eqns_of(lambda x: (jnp.exp(x), jnp.tanh(x), x + 1, x @ x, x.sum()), f32)
    assert _fusion.fuses(wide["exp"]) and _fusion.fuses(wide["add"])  # cheap in f32
    assert not _fusion.fuses(wide["tanh"])  # expensive: not duplicated into readers
    assert not _fusion.fuses(wide["dot_general"]) and not _fusion.fuses(wide["reduce_sum"])
    assert _fusion.absorbs(wide["reduce_sum"]) and not _fusion.absorbs(wide["dot_general"])
    assert not _fusion.fuses(eqns_of(jnp.exp, bf16)["exp"])  # expensive outside f32, f16
    # A call XLA inlines fuses where its body does: relu, where.
    assert _fusion.fuses(eqns_of(jax.nn.relu, f32)["custom_jvp_call"])


def test_a_cheap_f32_residual_costs_its_stored_source_not_itself() -> None:
    # exp of a bf16 matmul's output, widened to f32: JAX saves the f32 exp, XLA keeps
    # the bf16 product and rebuilds exp in the backward's kernel.
    def loss(w, x):
        return jnp.sum(jnp.exp((x @ w).astype(F32)))

    w, x = jax.ShapeDtypeStruct((512, 512), BF16), jax.ShapeDtypeStruct((256, 512), BF16)
    usage = usage_of(loss, w, x)
    (exp,) = [r for r in usage.residuals if r.primitive == "exp"]
    sources = usage.fused[exp.index]
    assert [size for _, (size, *_) in sources.values] == [256 * 512 * 2] and not sources.residuals
    kept = [dataclasses.replace(r, decision="keep") for r in usage.residuals]
    at_boundary = plan_timeline(usage, kept)[usage.boundary + 1]  # index 0 is position -1
    arguments, loss_and_cotangent = w.size * 2 + x.size * 2, 2 * 4
    assert at_boundary == arguments + 256 * 512 * 2 + loss_and_cotangent  # the product, not exp
    # Moved, it would be stored in f32 until its copy is done: above plain, so `all`
    # keeps it (and moves nothing else: the arguments stay).
    moved = hetjax.analyze(loss, w, x, policy="all", min_bytes=0)
    assert moved.moved_bytes == 0 and moved.predicted_peak_bytes == moved.baseline_peak_bytes


def test_an_output_reuses_the_buffer_of_an_operand_that_dies_there() -> None:
    # sin is stored (expensive); the add writes over it where it is last read.
    x = jnp.ones((256, 256), F32)
    jaxpr = jax.make_jaxpr(lambda x: jnp.sin(x) + 1.0)(x).jaxpr
    outputs = set(jaxpr.outvars)
    last = {jaxpr.eqns[0].outvars[0]: 1, jaxpr.outvars[0]: 2}
    intervals = _fusion.stored_intervals(jaxpr.eqns, 0, {}, last, outputs, set())
    assert sorted(intervals) == [(x.nbytes, 0, 1), (x.nbytes, 2, 2)]
    assert memory_timeline(2, intervals).max() == x.nbytes


def test_a_value_read_only_by_fusing_readers_is_never_stored() -> None:
    x = jnp.ones((256, 256), F32)
    jaxpr = jax.make_jaxpr(lambda x: jnp.sum((x * 2.0 + 1.0) ** 2))(x).jaxpr
    last = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.invars if isinstance(v, Var)}
    intervals = _fusion.stored_intervals(jaxpr.eqns, 0, {}, last, set(jaxpr.outvars), set())
    assert [size for size, *_ in intervals] == [4]  # the sum alone: one kernel
    assert np.all(memory_timeline(len(jaxpr.eqns), intervals) <= 4)


def test_a_sum_of_gradients_is_stored_from_its_first_piece() -> None:
    # The stacked weights' gradient is `add_any(pad(dw_i), ...)` over the layers: XLA
    # holds the whole sum from the first add (in place, or as every `dw_i` kept for one
    # kernel at the end), never just at the end; and the first add, of two pads, is
    # the earlier pad made whole (a `loop_pad_fusion`), so from that pad.
    def loss(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return jnp.sum(x)

    w, x = jax.ShapeDtypeStruct((4, 128, 128), F32), jax.ShapeDtypeStruct((64, 128), F32)
    usage = usage_of(loss, w, x)
    adds = [
        i for i, e in enumerate(usage.eqns)
        if str(e.primitive) == "add_any" and e.outvars[0].aval.shape == w.shape
    ]  # fmt: skip
    assert len(adds) == 3 and adds[0] > usage.boundary
    made = {e.outvars[0]: i for i, e in enumerate(usage.eqns)}
    pads = sorted(made[x] for x in usage.eqns[adds[0]].invars)
    assert [str(usage.eqns[i].primitive) for i in pads] == ["pad", "pad"] and pads[1] < adds[0]
    wide = [(first, last) for size, first, last in usage.buffers if size == w.size * 4]
    held = memory_timeline(len(usage.eqns), [(1, a, b) for a, b in wide if a >= 0])
    assert np.all(held[pads[0] + 1 :] == 1) and np.all(held[: pads[0] + 1] == 0)


def test_a_max_pools_gradient_counts_xlas_scratch() -> None:
    # The backward's select_and_scatter_add: per pooled value, its f32 value and an s32
    # index per dimension (5 x 4 bytes), while it runs; nothing for other equations. The
    # rewrite computes it one image at a time here (`_compat.pool_gradient_pieces`: a
    # batch of 2, 2 pieces): half of that.
    x = jnp.ones((2, 8, 8, 3), BF16)
    _, vjp = jax.vjp(max_pool, x)
    pooled = jnp.ones((2, 4, 4, 3), BF16)
    (gradient,) = jax.make_jaxpr(vjp)(pooled).jaxpr.eqns
    piece = pooled.size * (4 + 4 * 4) // 2
    assert _fusion.scratch_bytes(gradient) == piece
    assert [_fusion.scratch_bytes(e) for e in jax.make_jaxpr(max_pool)(x).jaxpr.eqns] == [0]
    # Inside a call (a jit of the gradient) it counts as well.
    (call,) = jax.make_jaxpr(jax.jit(vjp))(pooled).jaxpr.eqns
    assert _fusion.scratch_bytes(call) == piece
    usage = usage_of(lambda x: jnp.sum(max_pool(x).astype(F32) ** 2), x)
    # In the memory model: at the gradient's position in the backward, there alone.
    (at,) = [first for size, first, last in usage.buffers if size == piece]
    assert at >= usage.boundary and str(usage.eqns[at].primitive) == "select_and_scatter_add"
    assert (piece, at, at) in usage.buffers


def test_a_rebuilt_residual_made_inside_its_forward_readers_holds_no_forward_bytes() -> None:
    # h, a convert of a matmul's output, is read in the forward by a multiply alone:
    # XLA makes it inside that kernel. Rebuilt in the backward (by its chain), it holds
    # no bytes in the forward; h * h, read by a matmul, is stored whatever the plan.
    def loss(w, x):
        h = (x @ w).astype(F32)
        return jnp.sum((h * h) @ w.astype(F32))

    w, x = jax.ShapeDtypeStruct((256, 256), BF16), jax.ShapeDtypeStruct((512, 256), BF16)
    usage = usage_of(loss, w, x)
    (h,) = [r for r in usage.residuals if r.shape == (512, 256) and r.dtype == "float32"
            and r.primitive == "convert_element_type"]  # fmt: skip
    (square,) = [r for r in usage.residuals if r.primitive == "mul"]
    assert h.index in usage.made_in_readers and h.index in usage.chains
    assert square.index not in usage.made_in_readers
    plan = [dataclasses.replace(r, decision="recompute" if r is h else "keep")
            for r in usage.residuals]  # fmt: skip
    unmarked = dataclasses.replace(usage, made_in_readers=frozenset())
    timeline, as_stored = plan_timeline(usage, plan), plan_timeline(unmarked, plan)
    forward = slice(h.produced_at + 1, h.last_forward_use + 2)  # index 0 is position -1
    assert np.all(as_stored[forward] - timeline[forward] == h.nbytes)
    assert np.array_equal(as_stored[forward.stop :], timeline[forward.stop :])
    # Kept, it is stored from the forward on: the same either way.
    kept = [dataclasses.replace(r, decision="keep") for r in usage.residuals]
    assert np.array_equal(plan_timeline(usage, kept), plan_timeline(unmarked, kept))
