"""het_offload on loss functions: same values and gradients, planned host moves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from lowering import placements_in_loops
from models import MODELS, conv_pool, max_pool

import hetjax
from hetjax._api import usage_and_plan

ALL = dict(policy="all", min_bytes=0)
# A link with no cost: a tiny model's copies then leave each residual a window (with the
# GPU's link, a one-layer copy cannot end before the backward that reads it begins).
INSTANT_LINK = dataclasses.replace(
    hetjax.DeviceProfile.for_platform("gpu"), h2d_bytes_per_s=1e18, d2h_bytes_per_s=1e18
)


def assert_trees_equal(a, b):
    """Exact equality, leaf by leaf: only data moved, so not one bit may differ."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# With jax >= 0.11 (its XLA), a pinned move late in the forward can split the fusion
# of the loss's final reduction, and the CPU compiler then sums it in another order: a
# returned loss may differ from plain by up to 2 units in the last place (seen with
# jax 0.11.2 on CPU: the bf16 attention block, and the adamw, jit+checkpoint and
# cond+fori+while train steps). Gradients and updates stay bitwise; the tests that
# return a loss compare it with this many ulps.
# TODO: pin moves without splitting the loss's fusion, and compare losses bitwise again.
LOSS_ULPS = 0 if jax.__version_info__ < (0, 11) else 2
# The derivative of tanh as a residual: jax 0.10 saves `y` and computes `1 - y` (`sub`)
# in the forward; jax >= 0.11 saves `one_minus_square(y)` where hetjax cannot store `y`
# instead (inside a scan body, or in a train step).
TANH_DERIVATIVES = ("sub", "one_minus_square")
NEW_FORMS = jax.__version_info__ >= (0, 11)


def assert_losses_close(a, b):
    """Loss values (a scalar or a list of them): bitwise, or within `LOSS_ULPS`."""
    np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=LOSS_ULPS)


def host_puts(jaxpr) -> int:
    return str(jaxpr).count("devices=(MemorySpace.Host,)")


def differentiable(args):
    return tuple(
        i for i, a in enumerate(args) if jnp.issubdtype(jax.tree.leaves(a)[0].dtype, jnp.floating)
    )


ORDERS = {
    "jit(grad)": lambda f, argnums: jax.jit(jax.grad(f, argnums)),
    "grad(jit)": lambda f, argnums: jax.grad(jax.jit(f), argnums),
    "jit(value_and_grad)": lambda f, argnums: jax.jit(jax.value_and_grad(f, argnums)),
    "grad eager": lambda f, argnums: jax.grad(f, argnums),
    "grad op by op": lambda f, argnums: op_by_op(jax.grad(f, argnums)),
}


def op_by_op(f):
    """`f` called under `jax.disable_jit`: every equation on its own, jnp's jits too."""

    def call(*args):
        with jax.disable_jit():
            return f(*args)

    return call


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("model", MODELS)
def test_gradients_bitwise_equal(model, order, request):
    if order == "grad eager" and model == "attention" and jax.__version_info__ >= (0, 12):
        # Not hetjax's rounding but jax 0.12's eager dispatch: without jit, it runs the
        # VJP of `x @ w` as one compiled program (bitwise `jax.jit`'s, a dot fused with
        # its transpose), where jax 0.11 ran it op by op. The decorated function
        # evaluates its traced equations one by one, as 0.11 did: in bf16 this block's
        # weight gradients then differ by roundings in 66-72% of entries (CPU). Under
        # `jax.disable_jit` both run op by op and agree bitwise ("grad op by op").
        request.applymarker(pytest.mark.xfail(strict=True, reason="jax 0.12 eager bf16"))
    loss, args = MODELS[model]()
    argnums = differentiable(args)
    expected = ORDERS[order](loss, argnums)(*args)
    got = ORDERS[order](hetjax.het_offload(loss, **ALL), argnums)(*args)
    if order == "jit(value_and_grad)":
        assert_losses_close(got[0], expected[0])
        got, expected = got[1], expected[1]
    assert_trees_equal(got, expected)


@pytest.mark.parametrize("model", MODELS)
def test_forward_value_unchanged(model):
    loss, args = MODELS[model]()
    assert_trees_equal(jax.jit(hetjax.het_offload(loss, **ALL))(*args), jax.jit(loss)(*args))


@pytest.mark.parametrize("model", ["mlp", "stacked_mlp", "cnn", "attention", "scan"])
def test_jaxpr_holds_planned_host_moves(model):
    loss, args = MODELS[model]()
    argnums = differentiable(args)
    jaxpr = jax.make_jaxpr(jax.grad(hetjax.het_offload(loss, **ALL), argnums))(*args)
    assert host_puts(jaxpr) > 0
    # The scan's residuals move slice by slice inside its loops (tested below); its one
    # whole residual, made just before the backward, has no window to move in.
    if model != "scan":
        assert "optimization_barrier" in str(jaxpr)
        # Every host copy comes back: one device_put to Device per host copy.
        assert str(jaxpr).count("devices=(MemorySpace.Device,)") == host_puts(jaxpr)


@pytest.mark.parametrize("model", ["stacked_mlp", "attention", "scan"])
def test_gpu_lowering_has_pinned_host(model):
    loss, args = MODELS[model]()
    step = jax.jit(jax.grad(hetjax.het_offload(loss, **ALL), differentiable(args)))
    text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "annotate_device_placement" in text
    assert '_xla_buffer_placement = "pinned_host"' in text


def test_policy_none_is_the_undecorated_function():
    loss, args = MODELS["mlp"]()
    plain = jax.make_jaxpr(jax.grad(loss))(*args)
    none = jax.make_jaxpr(jax.grad(hetjax.het_offload(loss, policy="none")))(*args)
    assert str(none) == str(plain)
    assert host_puts(none) == 0


def scan_eqns(jaxpr):
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


@pytest.mark.parametrize("policy", ["all", "none"])
def test_decorated_function_analyzes_with_its_own_options(policy):
    loss, args = MODELS["stacked_mlp"]()
    decorated = hetjax.het_offload(loss, policy=policy, min_bytes=0)
    report = decorated.analyze(*args)
    assert report.table() == hetjax.analyze(loss, *args, policy=policy, min_bytes=0).table()
    assert (report.moved_bytes > 0) == (policy == "all")


def test_scan_residuals_move_per_iteration():
    loss, args = MODELS["scan"]()
    report = hetjax.analyze(loss, *args, **ALL)
    stacked = [r for r in report.residuals if r.primitive == "scan"]
    assert stacked and all(r.move == "per-iteration" for r in stacked)
    assert "per-iteration" in report.table()
    # jax 0.10: the layer input and tanh(h @ w) move; 1 - tanh(...) is rebuilt from the
    # latter's slice inside the backward loop (GPU_FINDINGS, item 3: cheap ones never
    # move). jax >= 0.11 stacks one_minus_square(y) itself, in place of y: two stacks move.
    moved = [r for r in stacked if r.decision == "offload"]
    rebuilt = [r for r in stacked if r.decision == "recompute"]
    assert len(moved) == 2 and len(rebuilt) == (0 if NEW_FORMS else 1)

    jaxpr = jax.make_jaxpr(jax.grad(hetjax.het_offload(loss, **ALL)))(*args)
    forward, backward = scan_eqns(jaxpr)
    # Each iteration puts a slice of each to host; the stacked outputs are host arrays.
    assert host_puts(forward.params["jaxpr"]) == len(moved)
    assert sum("<host>" in str(v.aval) for v in forward.outvars) == len(moved)
    # The backward scan reads them from host one iteration ahead: one fetch in its
    # body per stack, and one before the loop (the last slice made, needed first).
    fetches = "devices=(MemorySpace.Device,)"
    assert str(backward.params["jaxpr"]).count(fetches) == len(moved)
    assert sum("<host>" in str(v.aval) for v in backward.invars) == len(moved)
    # (The whole-array `mul`, made just before the backward, has no window: kept.)
    assert str(jaxpr).count(fetches) == 2 * len(moved)
    if not NEW_FORMS:
        assert "sub 1.0" in str(backward.params["jaxpr"])  # the rebuilt 1 - y


def test_scan_gpu_lowering_moves_inside_the_loops():
    loss, args = MODELS["scan"]()
    step = jax.jit(jax.grad(hetjax.het_offload(loss, **ALL), differentiable(args)))
    text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # Slices go to pinned host inside the forward loop and come back inside the
    # backward one: the per-iteration pattern, not only a whole-array move.
    assert {"pinned_host", "device"} <= placements_in_loops(text)
    plain = jax.jit(jax.grad(loss, differentiable(args)))
    assert not placements_in_loops(plain.trace(*args).lower(lowering_platforms=("cuda",)).as_text())


def test_scan_inside_a_nested_jit_moves_per_iteration():
    """Layers stacked by a jitted helper: the call is inlined, so its scan is seen."""
    layers, args = MODELS["scan"]()
    loss = jax.jit(layers)  # the whole stack behind a jit boundary
    report = hetjax.analyze(loss, *args, **ALL)
    assert {r.move for r in report.residuals if r.primitive == "scan"} == {"per-iteration"}
    h = hetjax.het_offload(loss, **ALL)
    assert_trees_equal(jax.jit(jax.grad(h))(*args), jax.jit(jax.grad(loss))(*args))


def test_scan_per_layer_weight_copies_rebuilt_from_the_weights():
    """A layer's bf16 copy of its f32 weight slice, stacked by the scan, is a view of
    a parameter: never sent over the link (GPU_FINDINGS, item 3), and not kept either:
    the backward scan is given the f32 stack and rebuilds each layer's copy."""

    def loss(ws, x):
        def layer(h, w):
            return jnp.tanh(h @ w.astype(jnp.bfloat16)), None

        h, _ = lax.scan(layer, x.astype(jnp.bfloat16), ws)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    ws = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 16)) * 0.3
    x = jnp.ones((8, 16))
    stacked = {r.dtype + str(list(r.shape)): r for r in hetjax.analyze(loss, ws, x, **ALL).residuals
               if r.primitive == "scan"}  # fmt: skip
    weights = stacked["bfloat16[3, 16, 16]"]
    assert weights.is_input and (weights.decision, weights.move) == ("recompute", "per-iteration")
    assert stacked["bfloat16[3, 8, 16]"].move == "per-iteration"  # the activations move
    h = hetjax.het_offload(loss, **ALL)
    assert_trees_equal(jax.jit(jax.grad(h))(ws, x), jax.jit(jax.grad(loss))(ws, x))
    backward = [e for e in scan_eqns(jax.make_jaxpr(jax.grad(h))(ws, x)) if e.params["reverse"]]
    body = str(backward[0].params["jaxpr"])
    assert "convert_element_type" in body and "f32[16,16]" in body  # rebuilt from f32


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("unroll", [1, 2])
def test_scan_directions_unrolling_and_consts_bitwise(reverse, unroll):
    """The one-iteration-ahead layout depends on the scans' directions: check both,
    with unrolling, a closed-over constant and two carries."""

    def loss(ws, b, x):
        def layer(carry, w):
            h, s = carry
            y = jnp.tanh(h @ w + b)  # `b` is closed over: a scan constant
            return (y, s + jnp.sum(y**2)), jnp.sin(y)

        (h, s), ys = lax.scan(layer, (x, 0.0), ws, reverse=reverse, unroll=unroll)
        return jnp.mean(h**2) + s + jnp.mean(ys)

    k = jax.random.split(jax.random.PRNGKey(3), 3)
    ws = jax.random.normal(k[0], (5, 16, 16)) * 0.3
    b, x = jax.random.normal(k[1], (16,)) * 0.1, jax.random.normal(k[2], (8, 16))
    report = hetjax.analyze(loss, ws, b, x, **ALL)
    assert "per-iteration" in {r.move for r in report.residuals if r.primitive == "scan"}
    grad = lambda f: jax.jit(jax.grad(f, (0, 1, 2)))  # noqa: E731
    assert_trees_equal(grad(hetjax.het_offload(loss, **ALL))(ws, b, x), grad(loss)(ws, b, x))


@pytest.mark.parametrize("reverse", [False, True])
def test_unrolled_scans_move_each_layer_and_keep_op_by_op_values(reverse):
    """`unroll_scans=True`: each iteration's values are residuals of their own, moved
    one by one, with no loop left; op by op the gradient is the loop's bit for bit,
    and under `jax.jit` within the rounding of plain's own jit against op by op."""

    def loss(ws, b, x):
        def layer(carry, w):
            h, s = carry
            y = jnp.tanh(h @ w + b)  # `b` is closed over: a scan constant
            return (y, s + jnp.sum(y**2)), jnp.sin(y)

        (h, s), ys = lax.scan(layer, (x, 0.0), ws, reverse=reverse)
        return jnp.mean(h**2) + s + jnp.mean(ys)

    k = jax.random.split(jax.random.PRNGKey(3), 3)
    ws = jax.random.normal(k[0], (5, 16, 16)) * 0.3
    b, x = jax.random.normal(k[1], (16,)) * 0.1, jax.random.normal(k[2], (8, 16))
    unrolled = dict(ALL, unroll_scans=True)
    report = hetjax.analyze(loss, ws, b, x, **unrolled)
    assert not [r for r in report.residuals if r.per_iteration or r.primitive == "scan"]
    tanhs = [r for r in report.residuals if r.primitive == "tanh" and r.decision == "offload"]
    assert len(tanhs) == len(ws)  # each layer's output, moved on its own
    f = hetjax.het_offload(loss, **unrolled)
    jaxpr = jax.make_jaxpr(jax.grad(f, (0, 1, 2)))(ws, b, x)
    assert "scan" not in {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert host_puts(jaxpr) == len(report.plan.offloaded) >= len(ws)
    with jax.disable_jit():
        op_by_op = jax.grad(loss, (0, 1, 2))(ws, b, x)
        assert_trees_equal(jax.grad(f, (0, 1, 2))(ws, b, x), op_by_op)
    got, expected = (jax.jit(jax.grad(g, (0, 1, 2)))(ws, b, x) for g in (f, loss))
    for g, e, o in zip(got, expected, op_by_op, strict=True):
        assert jnp.abs(g - e).max() <= max(jnp.abs(o - e).max(), 1e-6 * jnp.abs(e).max())


def test_scan_residual_read_after_the_scan_moves_whole():
    """A stacked output that the forward reads again must exist on device as a whole:
    it moves as one array after the scan, and the report says so."""

    def loss(ws, v, x):
        h, hs = lax.scan(lambda h, w: (jnp.tanh(h @ w), jnp.tanh(h @ w)), x, ws)
        return jnp.sum(h**2) + jnp.sum(hs * v)  # `hs` is read here and saved for dv

    ws = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8)) * 0.5
    v, x = jnp.full((8,), 0.3), jnp.ones((4, 8))
    report = hetjax.analyze(loss, ws, v, x, **ALL)
    moves = {r.move for r in report.residuals if r.primitive == "scan"}
    assert moves == {"whole", "per-iteration"}
    h = hetjax.het_offload(loss, **ALL)
    grad = jax.jit(jax.grad(h, (0, 1)))(ws, v, x)
    assert_trees_equal(grad, jax.jit(jax.grad(loss, (0, 1)))(ws, v, x))


def test_has_aux_and_int_labels():
    loss, (params, images, labels) = MODELS["cnn"]()

    def with_aux(params, images, labels):
        value = loss(params, images, labels)
        return value, {"labels": labels, "value": value}

    expected = jax.jit(jax.value_and_grad(with_aux, has_aux=True))(params, images, labels)
    got = jax.jit(jax.value_and_grad(hetjax.het_offload(with_aux, **ALL), has_aux=True))(
        params, images, labels
    )
    assert_trees_equal(got, expected)


def test_argnums_and_kwargs():
    loss, (w, v, x) = MODELS["control_flow"]()

    def kw_loss(w, v, *, x, scale=2.0):
        return scale * loss(w, v, x)

    h = hetjax.het_offload(kw_loss, **ALL)
    for argnums in (0, 1, (0, 1)):
        expected = jax.grad(kw_loss, argnums)(w, v, x=x, scale=3.0)
        assert_trees_equal(jax.grad(h, argnums)(w, v, x=x, scale=3.0), expected)


@pytest.mark.parametrize("model", ["mlp", "scan"])
def test_per_example_grads_under_vmap(model):
    loss, (params, x) = MODELS[model]()
    per_example = lambda f: jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0)))  # noqa: E731
    expected = per_example(loss)(params, x[:, None])
    got = per_example(hetjax.het_offload(loss, **ALL))(params, x[:, None])
    assert_trees_equal(got, expected)


def test_vmap_outside_and_inside():
    loss, (w, x) = MODELS["stacked_mlp"]()
    xs = jnp.stack([x, 2 * x])
    h = hetjax.het_offload(loss, **ALL)
    expected = jax.grad(lambda w: jnp.sum(jax.vmap(loss, (None, 0))(w, xs)))(w)
    got = jax.grad(lambda w: jnp.sum(jax.vmap(h, (None, 0))(w, xs)))(w)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_closed_over_tracer_gets_its_gradient():
    loss, (w, x) = MODELS["stacked_mlp"]()

    def outer(w, x):
        # The decorated function closes over `w`, a tracer of the outer grad.
        return hetjax.het_offload(lambda x: loss(w, x), **ALL)(x)

    assert_trees_equal(jax.grad(outer)(w, x), jax.grad(loss)(w, x))


@pytest.mark.skipif(not NEW_FORMS, reason="jax 0.10 saves no one_minus_square")
def test_derived_forms_are_stored_as_their_source_and_made_where_read():
    """jax >= 0.11 saves tanh's `one_minus_square(y)`; where `y` is not a residual,
    hetjax stores `y`, and makes each `one_minus_square` in the backward right before
    its reader: made at the start, every layer's would be live at once."""
    from hetjax._trace import trace_vjp

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w[0])) + jnp.sum(jnp.tanh(x @ w[1]) ** 2)

    w, x = jnp.full((2, 8, 8), 0.1), jnp.ones((4, 8))
    program = trace_vjp(jax.make_jaxpr(loss)(w, x), (w, x))
    assert "one_minus_square" not in str(program.forward)
    produced = {v: e.primitive.name for e in program.forward.jaxpr.eqns for v in e.outvars}
    assert [produced.get(v) for v in program.residual_vars].count("tanh") == 2
    eqns = program.backward.jaxpr.eqns
    made = [i for i, e in enumerate(eqns) if e.primitive.name == "one_minus_square"]
    assert len(made) == 2
    for i in made:
        assert eqns[i].outvars[0] in eqns[i + 1].invars  # its first reader comes next
    g = jax.jit(jax.grad(hetjax.het_offload(loss, **ALL)))(w, x)
    assert_trees_equal(g, jax.jit(jax.grad(loss))(w, x))


def test_split_fusions_are_the_only_difference_in_f32():
    """A layer norm after a matmul, f32. Moving its residuals changes no arithmetic: op
    by op (`jax.disable_jit`) the gradient is plain's, bit for bit. Under `jax.jit`, XLA
    fuses a multiply and the add that reads it into one fused multiply-add (one
    rounding); a pinned move that puts them in two kernels rounds twice, so a gradient
    may differ from plain's, by no more than plain's jit and op-by-op gradients differ."""

    def loss(w, x):
        h = x @ w
        c = h - h.mean(-1, keepdims=True)
        return jnp.sum(c * lax.rsqrt((c**2).mean(-1, keepdims=True) + 1e-6) * x)

    w = jax.random.normal(jax.random.key(1), (256, 256)) / 16
    x = jax.random.normal(jax.random.key(0), (256, 256))
    offloaded = hetjax.het_offload(loss, **ALL)
    with jax.disable_jit():
        op_by_op = jax.grad(loss, (0, 1))(w, x)
        assert_trees_equal(jax.grad(offloaded, (0, 1))(w, x), op_by_op)
    got, expected = (jax.jit(jax.grad(f, (0, 1)))(w, x) for f in (offloaded, loss))
    # jax 0.11.2, CPU: x's gradient differs by 7.5e-8 of its largest entry, where plain's
    # jit and op by op differ by 2.6e-7.
    for g, e, o in zip(got, expected, op_by_op, strict=True):
        assert jnp.abs(g - e).max() <= jnp.abs(o - e).max()


def test_second_order_gradient():
    f = lambda x: jnp.sum(jnp.tanh(x) ** 3)  # noqa: E731
    x = jnp.linspace(-1, 1, 16)
    expected = jax.grad(lambda x: jnp.sum(jax.grad(f)(x)))(x)
    got = jax.grad(lambda x: jnp.sum(jax.grad(hetjax.het_offload(f, **ALL))(x)))(x)
    # Run eagerly, each version groups the ops its own way: equal to f32 rounding of
    # the largest entry (jax 0.12.0.1: 4.8e-8 apart at 0.045, entries up to 1.37).
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model", ["mlp", "stacked_mlp", "scan"])
def test_second_order_through_the_moves(model):
    """grad of a function of the gradient differentiates the host copies themselves
    (per-iteration ones included): each copy's transpose must come back to device.
    The second-order program differs from plain JAX's (recomputed residuals are
    differentiated through their recipes), so results agree to rounding."""
    loss, args = MODELS[model]()

    def grad_norm(f):
        return jax.jit(jax.grad(lambda *a: sum(jnp.sum(g**2) for g in jax.tree.leaves(
            jax.grad(f)(*a)))))  # fmt: skip

    expected = grad_norm(loss)(*args)
    got = grad_norm(hetjax.het_offload(loss, **ALL))(*args)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        # f32 rounding of a second-order sum, scaled to the largest entry (in f64 the
        # two agree to 1e-15 of it).
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))


def test_no_retrace_on_second_call():
    traces = 0
    loss, (w, x) = MODELS["stacked_mlp"]()

    def counted(w, x):
        nonlocal traces
        traces += 1
        return loss(w, x)

    step = jax.jit(jax.grad(hetjax.het_offload(counted, **ALL)))
    step(w, x)
    first = traces
    step(w, x)
    step(w + 1, x)
    assert traces == first


def test_decorator_forms_keep_signature():
    @hetjax.het_offload
    def bare(x, y):
        """Doc."""
        return jnp.sum(x * y)

    @hetjax.het_offload(policy="all", min_bytes=0)
    def called(x, y):
        return jnp.sum(x * y)

    x = jnp.arange(4.0)
    assert bare.__doc__ == "Doc." and bare.__name__ == "bare"
    assert_trees_equal(jax.grad(bare)(x, x), jax.grad(called)(x, x))


def test_inputs_and_weight_slices_are_never_offloaded():
    loss, (w, x) = MODELS["stacked_mlp"]()
    report = hetjax.analyze(loss, w, x, policy="all", min_bytes=0)
    for r in report.residuals:
        if r.is_input:
            assert r.decision != "offload", r
    slices = [r for r in report.residuals if r.primitive == "squeeze"]
    assert slices and all(r.is_input and r.decision == "recompute" for r in slices)
    # 1 - y**2 of tanh and the like are rebuilt, not moved: only the tanh outputs move,
    # whatever form the jax version saves (hetjax stores y for one_minus_square(y)).
    moved = [r for r in report.residuals if r.decision == "offload"]
    assert moved and {r.primitive for r in moved} == {"tanh"}
    assert report.moved_bytes == sum(r.nbytes for r in moved)
    assert not any(r.primitive in TANH_DERIVATIVES and r.decision != "recompute"
                   for r in report.residuals)  # fmt: skip


def test_a_residual_the_backward_never_reads_is_not_moved():
    # `jnp.where` runs as a jit whose linearization saves a float zeros array that
    # its transpose takes but never reads: XLA drops it, so a move of it moves nothing.
    def loss(w, x):
        s = x @ w
        s = jnp.where(jnp.tril(jnp.ones(s.shape, bool)), s, -1e9)
        return jnp.sum(jax.nn.softmax(s) ** 2)

    w, x = jnp.full((64, 64), 0.01), jnp.ones((64, 64))
    report = hetjax.analyze(loss, w, x, policy="all", min_bytes=0)  # warns of nothing
    unread = [r for r in report.residuals if not r.read_in_backward]
    assert unread and all(r.decision == "keep" and r.idle_span == 0 for r in unread)
    assert "keep (unread)" in report.table()
    assert any(r.decision == "offload" for r in report.residuals)
    moved = hetjax.het_offload(loss, policy="all", min_bytes=0)
    assert_trees_equal(jax.grad(moved)(w, x), jax.grad(loss)(w, x))


def _attention(x, w):
    """Single-head f32 self-attention, its q, k and v from one product with `w`."""
    q, k, v = jnp.split(x @ w, 3, axis=-1)
    probs = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1)
    return jnp.einsum("bts,bsd->btd", probs, v)


def _norm(x):
    """Layer norm without scale or bias."""
    h = x - x.mean(-1, keepdims=True)
    return h * lax.rsqrt((h**2).mean(-1, keepdims=True) + 1e-5)


def _four_attention_layers():
    """Weights of four attention layers (width 32) and a (2, 256, 32) input."""
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    ws = [jax.random.normal(k, (32, 96)) * 0.1 for k in keys[:4]]
    return ws, jax.random.normal(keys[4], (2, 256, 32))


def _traced(loss, *args):
    """The primal jaxpr of `loss`, its flat inputs, and its usage (`min_bytes=0`)."""
    from hetjax._api import flatten_call, plan_for, trace_primal

    flat, dynamic, *_ = flatten_call(loss, args, {})
    primal, consts, _ = trace_primal(flat, dynamic)
    inputs = [*consts, *dynamic]
    options = dict(policy="none", min_bytes=0, device_budget=None, profile=None, target=None)
    return primal, inputs, plan_for(primal, inputs, options)[0]


def _barriers(jaxpr):
    """Every `optimization_barrier` of `jaxpr`, nested ones too, with the equation that
    made each of its operands in that jaxpr (None: made outside it)."""
    from hetjax._compat import Var, sub_jaxprs

    producer = {}
    for eqn in jaxpr.eqns:
        producer.update(dict.fromkeys(eqn.outvars, eqn))
        if eqn.primitive.name == "optimization_barrier":
            yield eqn, [producer.get(v) if isinstance(v, Var) else None for v in eqn.invars]
        for inner in sub_jaxprs(eqn):
            yield from _barriers(inner)


def _every_chain_rebuilt(loss, *args, speed_first):
    """The primal jaxpr of `loss`, its flat inputs, its usage, and the plan that rebuilds
    every chain of the budget order (`_plan.chains_and_moves`), nothing moved."""
    from hetjax._plan import budget_order, chains_and_moves, make_plan

    primal, inputs, usage = _traced(loss, *args)
    chains = chains_and_moves(usage, budget_order(usage, 0), 0)[0]
    plan = make_plan(usage, "auto", min_bytes=0, choices=chains, speed_first=speed_first)
    return primal, inputs, usage, plan


def _assert_plan_gradients_close(primal, inputs, usage, plan):
    """The gradient computation with `plan` gives plain's values (within rounding)."""
    from hetjax._check import gradient_program

    planned, plain = (jax.jit(gradient_program(primal, usage, p))(*inputs) for p in (plan, None))
    for a, b in zip(jax.tree.leaves(planned), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))


def _assert_gradients_close(fun, loss, *args):
    # Forward work run again, as under jax.checkpoint: XLA may fuse (and so round) it
    # differently from the forward's (jax 0.12, op by op: 2e-7 of the largest entry).
    for grad in (jax.grad, lambda f: jax.jit(jax.grad(f))):
        for a, b in zip(grad(fun)(*args), grad(loss)(*args), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))


def test_a_budget_rebuilds_attention_probabilities_by_a_chain():
    # Four f32 attention layers: under a budget, the softmax of q.k^T is rebuilt in the
    # backward from the stored q and k (a chain with a matmul), not moved.
    def loss(ws, x):
        for w in ws:
            x = x + _attention(x, w)
        return jnp.sum(x**2)

    ws, x = _four_attention_layers()
    plain = hetjax.analyze(loss, ws, x, policy="none", min_bytes=0).baseline_peak_bytes
    fun = hetjax.het_offload(loss, min_bytes=0, device_budget=0.5 * plain)
    report = fun.analyze(ws, x)
    rebuilt = [r for r in report.residuals if r.decision == "recompute" and r.primitive == "exp"]
    assert rebuilt and report.plan.recompute_s > 0 and report.feasible
    assert report.predicted_peak_bytes <= 0.5 * plain
    assert "recompute" in report.table()
    _assert_gradients_close(fun, loss, ws, x)


def test_a_chain_reads_an_anchor_rebuilt_by_a_chain_as_it_is():
    """The softmax's sum is rebuilt from its exp, itself rebuilt from q and k by a chain
    tied into the backward: the sum reads that exp untied. Tied again, XLA had to write
    the f32 exp out across the barrier (the reference gpt, H200: the fused softmax split
    in three kernels, 19 ms a step predicted). The gradients stay plain's."""
    from hetjax._check import gradient_program

    def loss(ws, x):
        for w in ws:
            x = x + _attention(x, w)
        return jnp.sum(x**2)

    primal, inputs, usage, plan = _every_chain_rebuilt(loss, *_four_attention_layers(),
                                                       speed_first=True)  # fmt: skip
    rebuilt = {r.index: r for r in plan.residuals if r.decision == "recompute"}
    exps = {k for k, r in rebuilt.items() if r.primitive == "exp" and k in usage.chains}
    sums = [k for k in rebuilt if k in usage.chains and exps & {*usage.chains[k].residual_anchors}]
    assert exps and sums
    text = jax.jit(gradient_program(primal, usage, plan)).lower(*inputs).as_text()
    barriers = [line for line in text.splitlines() if "optimization_barrier" in line]
    assert barriers  # q and k are tied, where the exp's chain starts
    assert not any("tensor<2x256x256xf32>" in line for line in barriers)
    _assert_plan_gradients_close(primal, inputs, usage, plan)


def _dot_generals(jaxpr) -> int:
    """How many matmuls `jaxpr` runs, nested ones too."""
    from hetjax._compat import sub_jaxprs

    return sum(
        (eqn.primitive.name == "dot_general") + sum(map(_dot_generals, sub_jaxprs(eqn)))
        for eqn in jaxpr.eqns
    )


def test_outputs_of_one_matmul_are_rebuilt_by_one_matmul():
    """A layer's q, k and v come from one matmul. With its attention output moved, the
    backward reads v before q and k; each rebuilt by its own replay, it ran that matmul
    twice (the reference gpt at remat's peak, H200, jax 0.11.2: 6 more (b*t, d) x (d,
    3d) matmuls, 0.84 of remat's extra flops where the plan counts 0.68). Now the first
    replay hands the others over: the backward runs each rebuilt matmul once."""
    from hetjax._check import gradient_program
    from hetjax._plan import budget_order, chains_and_moves, make_plan

    def loss(ws, x):
        for w in ws:
            x = x + _attention(_norm(x), w) @ w[:, 64:]
        return jnp.sum(x**2)

    primal, inputs, usage = _traced(loss, *_four_attention_layers())
    chains = chains_and_moves(usage, budget_order(usage, 0), 0)[0]
    outputs = {  # the attention outputs, read by the projections' weight gradients
        r.index: "offload" for r in usage.residuals
        if r.shape == (2, 256, 32) and r.index in chains and r.primitive == "dot_general"
    }  # fmt: skip
    assert len(outputs) >= 3  # the last layer's is kept: read at once
    plan = make_plan(usage, "auto", min_bytes=0, choices={**chains, **outputs},
                     speed_first=False)  # fmt: skip
    rebuilt = {
        e for r in plan.residuals if r.decision == "recompute" and r.index in usage.chains
        for e in usage.chains[r.index].eqns if usage.eqns[e].primitive.name == "dot_general"
    }  # fmt: skip
    qkv = {e for e in rebuilt if usage.eqns[e].outvars[0].aval.shape[-1] == 96}
    assert len(qkv) == 4  # every layer's q, k and v are rebuilt
    plain, planned = (
        _dot_generals(jax.make_jaxpr(gradient_program(primal, usage, p))(*inputs).jaxpr)
        for p in (None, plan)
    )
    assert planned == plain + len(rebuilt)
    _assert_plan_gradients_close(primal, inputs, usage, plan)


def test_gradient_pieces_are_tied_to_values_xla_stores_anyway():
    """Memory first, a layer's weight and bias gradients are tied into the backward as
    they are made; the value they are tied to is one XLA writes out anyway (a product,
    a reduction), never one it would fuse into its readers: the barrier would make it
    write that out (the reference gpt, H200: 25 f32 (b*t, d) products a step; 2.6 ms
    predicted in all)."""
    from hetjax._check import gradient_program
    from hetjax._fusion import fuses

    def loss(params, x):
        for w, b in params:
            x = x + _attention(_norm(x), w)
            x = x + jnp.tanh(_norm(x) @ w[:, :32] + b)
        return jnp.sum(x**2)

    ws, x = _four_attention_layers()
    params = [(w, jnp.full(32, 0.1)) for w in ws]
    primal, inputs, usage, plan = _every_chain_rebuilt(loss, params, x, speed_first=False)
    assert any(r.checkpoint and r.read_in_backward for r in plan.residuals)  # restarts
    program = jax.make_jaxpr(gradient_program(primal, usage, plan))(*inputs)
    shapes = {w.shape for w in ws} | {(32,)}
    anchors = [  # producers of the anchors of barriers that tie made weight-shaped values
        made[-1]
        for eqn, made in _barriers(program.jaxpr)
        if any(
            p is not None and v.aval.shape in shapes
            for v, p in zip(eqn.invars[:-1], made[:-1], strict=True)
        )
    ]
    assert anchors
    assert not [a.primitive.name for a in anchors if a is not None and fuses(a)]
    _assert_plan_gradients_close(primal, inputs, usage, plan)


def test_rebuilds_are_never_tied_to_a_constant_or_a_broadcast():
    """A rebuild tied to a constant (a broadcast literal: relu's zeros in the backward)
    is ordered by nothing, and XLA keeps the forward's equal constant, merged with it,
    until the tie (the reference cnn, H200, jax 0.11.2: 512 MiB of zeros; every chain
    without a matmul rebuilt compiled to 3246 MB so, 2709 MB tied to values). Tied to a
    broadcast of a value, XLA writes the broadcast out (a batch norm's per-channel term
    at the stem's f32 shape: 1 GiB, the reference cnn, jax 0.12.0.1)."""
    from test_benchmarks import benchmark_models

    from hetjax._check import gradient_program
    from hetjax._compat import Var
    from hetjax._plan import make_plan, rebuild_choices

    models = benchmark_models()
    cnn = models.cnn("tiny")
    primal, inputs, usage = _traced(cnn.loss_with(models.identity_layer), *cnn.init())
    choices = rebuild_choices(usage, 0)
    plan = make_plan(usage, "auto", min_bytes=0, choices=choices, speed_first=False)
    assert any(r.decision == "recompute" for r in plan.residuals)
    program = jax.make_jaxpr(gradient_program(primal, usage, plan))(*inputs)
    # The producers of every barrier's anchor made in the barrier's jaxpr.
    anchors = [made[-1] for _, made in _barriers(program.jaxpr) if made[-1] is not None]
    assert anchors
    constants = [a for a in anchors if not any(isinstance(v, Var) for v in a.invars)]
    assert not constants, [str(a) for a in constants]
    broadcasts = [a for a in anchors if a.primitive.name == "broadcast_in_dim"]
    assert not broadcasts, [str(a) for a in broadcasts]


def test_fetches_are_never_tied_to_a_broadcast():
    """A fetch tied to a broadcast (a layer norm's per-token terms, broadcast in its
    backward) made XLA write the broadcast out: the reference gpt's `policy="all"`, its
    loss gradient, H200, jax 0.11.2: 6277 MiB temp so, 4526 tied to what is broadcast."""
    from test_benchmarks import benchmark_models

    from hetjax._check import gradient_program
    from hetjax._plan import make_plan

    models = benchmark_models()
    gpt = models.gpt("tiny")
    primal, inputs, usage = _traced(gpt.loss_with(models.identity_layer), *gpt.init())
    plan = make_plan(usage, "all", min_bytes=0)
    assert plan.offloaded
    program = jax.make_jaxpr(gradient_program(primal, usage, plan))(*inputs)
    anchors = [made[-1] for _, made in _barriers(program.jaxpr) if made[-1] is not None]
    assert len(anchors) >= len(plan.offloaded)
    assert not [str(a) for a in anchors if a.primitive.name == "broadcast_in_dim"]
    # Op by op (bf16, so no jit: XLA may keep fused bf16 values at more precision), the
    # same values: a barrier passes its operands through.
    with jax.disable_jit():
        planned, plain = (gradient_program(primal, usage, p)(*inputs) for p in (plan, None))
    assert_trees_equal(planned, plain)
    # (Its bf16 gradients match plain's only within XLA's excess precision: checked
    # elsewhere; here, with --xla_allow_excess_precision=false, 9e-8 relative on CPU.)


def test_a_budget_rebuilds_norms_from_a_checkpoint_of_the_layer_input():
    # Pre-norm residual layers: the stream x is no residual (the norm keeps its own f32
    # pieces), but it lives across the layer, so it is a checkpoint. Under a tight
    # budget the norms' pieces are rebuilt from it, as jax.checkpoint restarts a layer.
    def loss(ws, x):
        for w in ws:
            x = x + _attention(_norm(x), w)
        return jnp.sum(x**2)

    ws, x = _four_attention_layers()
    none = hetjax.analyze(loss, ws, x, policy="none", min_bytes=0)
    assert not any(r.checkpoint for r in none.residuals)  # stored only where a chain starts
    # Without a budget ("auto" puts speed first), chains start from residuals only.
    fast = hetjax.analyze(loss, ws, x, min_bytes=0)
    assert fast.plan.recompute_s > 0 and not any(r.checkpoint for r in fast.residuals)
    budget = 0.2 * none.baseline_peak_bytes  # below what the model can reach
    fun = hetjax.het_offload(loss, min_bytes=0, device_budget=budget)
    with pytest.warns(hetjax.HetjaxWarning, match="cannot be met"):
        report = fun.analyze(ws, x)
    checkpoints = [r for r in report.residuals if r.checkpoint]
    assert checkpoints and all(r.read_in_backward for r in checkpoints)
    assert all(r.decision in ("keep", "offload") and r.primitive == "add" for r in checkpoints)
    assert "(checkpoint)" in report.table()
    # Layers 2 and 3's x - mean, rebuilt from the checkpoint x (no residual lies between;
    # the last layer's is read as soon as the backward starts: never idle at the peak).
    centered = [r for r in report.residuals if r.primitive == "sub" and r.shape == x.shape]
    assert [r.decision for r in centered[1:3]] == ["recompute"] * 2
    assert report.predicted_peak_bytes < 0.5 * none.baseline_peak_bytes
    assert report.baseline_peak_bytes == none.baseline_peak_bytes  # plain stores none
    _assert_gradients_close(fun, loss, ws, x)


@pytest.mark.parametrize("causal", [False, True])
def test_a_budget_rebuilds_a_scans_attention_probabilities_slice_by_slice(causal):
    # The same layers under lax.scan: each backward iteration rebuilds its layer's
    # probabilities from its slices of q and k; the stacked probabilities never exist.
    # Causal, `jnp.where(mask, scores, fill)`: JAX hoists the broadcast fill value out
    # of the loop as a const of the scan that no residual holds; the backward loop
    # makes it anew (`Recipe.fills`) to rebuild the softmax's `exp`.
    mask = jnp.tril(jnp.ones((256, 256), bool))

    def layer(x, w):
        q, k, v = jnp.split(x @ w, 3, axis=-1)
        scores = jnp.einsum("btd,bsd->bts", q, k)
        if causal:
            scores = jnp.where(mask, scores, jnp.finfo(x.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return x + jnp.einsum("bts,bsd->btd", probs, v), None

    def loss(ws, x):
        return jnp.sum(lax.scan(layer, x, ws)[0] ** 2)

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    ws = jax.random.normal(keys[0], (4, 32, 96)) * 0.1
    x = jax.random.normal(keys[1], (2, 256, 32))
    plain = hetjax.analyze(loss, ws, x, policy="none", min_bytes=0).baseline_peak_bytes
    fun = hetjax.het_offload(loss, min_bytes=0, device_budget=0.5 * plain)
    report = fun.analyze(ws, x)
    probs = [r for r in report.residuals if r.shape == (4, 2, 256, 256)]
    assert probs and all(r.decision == "recompute" and r.move == "per-iteration" for r in probs)
    assert report.plan.recompute_s > 0 and report.moved_bytes == 0 and report.feasible
    options = dict(policy="none", min_bytes=0, device_budget=None, profile=None, target=None)
    chains = usage_and_plan(loss, (ws, x), {}, options)[0].chains
    filled = [report.plan.residuals[k] for k, chain in chains.items() if chain.fills]
    assert [(r.shape, r.decision) for r in filled] == causal * [((4, 2, 256, 256), "recompute")]
    for grad in (jax.grad, lambda f: jax.jit(jax.grad(f))):
        a, b = grad(fun)(ws, x), grad(loss)(ws, x)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))


def test_a_scan_rebuilds_a_layers_norms_from_its_stacked_input():
    # The layer input is the scan's carry: JAX saves its norm's pieces, never the input.
    # A per-iteration checkpoint stacks the carry; the backward loop rebuilds the pieces
    # from its slice, as `jax.checkpoint` restarts a layer from its input.
    def layer(x, w):
        centered = x - jnp.mean(x, axis=-1, keepdims=True)
        h = centered * lax.rsqrt(jnp.mean(centered**2, axis=-1, keepdims=True) + 1e-6)
        return x + jnp.tanh(h @ w[0]) @ w[1], None

    def loss(ws, x):
        return jnp.sum(lax.scan(layer, x, ws)[0] ** 2)

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    ws = jax.random.normal(keys[0], (4, 2, 64, 64)) * 0.1
    x = jax.random.normal(keys[1], (256, 64))
    options = dict(policy="none", min_bytes=0, device_budget=None, profile=None, target=None)
    usage = usage_and_plan(loss, (ws, x), {}, options)[0]
    (stack,) = [r for r in usage.residuals if r.checkpoint]
    assert (stack.shape, stack.per_iteration, stack.offloadable) == ((4, 256, 64), True, False)
    from_stack = {k for k, chain in usage.chains.items() if chain.stack_slices}
    assert from_stack and all(
        usage.chains[k].residual_anchors == (stack.index,) for k in from_stack
    )
    fun = hetjax.het_offload(loss, min_bytes=0, device_budget=1)
    with pytest.warns(hetjax.HetjaxWarning, match="cannot be met"):
        report = fun.analyze(ws, x)
    rebuilt = {r.index for r in report.residuals if r.decision == "recompute"}
    assert rebuilt & from_stack and report.plan.residuals[stack.index].decision == "keep"
    for grad in (jax.grad, lambda f: jax.jit(jax.grad(f))):
        np.testing.assert_array_equal(grad(fun)(ws, x), grad(loss)(ws, x))
    # Where no chain starts from it, the forward loop does not stack the carry (eager
    # execution would hold it): it makes plain's outputs, plus one carried slice per
    # stack it moves to host.
    moving = hetjax.het_offload(loss, policy="all", min_bytes=0)
    moved = [r for r in moving.analyze(ws, x).residuals
             if (r.decision, r.move) == ("offload", "per-iteration")]  # fmt: skip

    def forward_scan_outputs(f):
        eqns = jax.make_jaxpr(jax.grad(f))(ws, x).jaxpr.eqns
        return next(len(e.outvars) for e in eqns if e.primitive.name == "scan")

    assert forward_scan_outputs(moving) == forward_scan_outputs(loss) + len(moved) > 0


def test_min_bytes_and_callable_policy():
    loss, (w, x) = MODELS["stacked_mlp"]()
    g = jax.grad(loss)(w, x)
    big = hetjax.het_offload(loss, policy="all", min_bytes=10**9)
    assert host_puts(jax.make_jaxpr(jax.grad(big))(w, x)) == 0
    seen = []

    def only_first(r: hetjax.ResidualUsage) -> bool:
        seen.append(r)
        return len(seen) == 1

    picky = hetjax.het_offload(loss, policy=only_first, min_bytes=0, profile=INSTANT_LINK)
    assert host_puts(jax.make_jaxpr(jax.grad(picky))(w, x)) == 1
    assert seen and all(isinstance(r, hetjax.ResidualUsage) for r in seen)
    assert_trees_equal(jax.grad(picky)(w, x), g)


def test_extended_dtype_residual_stays_and_warns_once():
    @jax.custom_vjp
    def noisy(x, key):
        return x * 2.0

    def noisy_fwd(x, key):
        return x * 2.0, (jax.random.split(key, x.shape[0]),)

    def noisy_bwd(res, ct):
        (keys,) = res  # a key-typed residual: it cannot live in host memory
        noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
        return ct * (2.0 + 0.0 * noise[:, None]), None

    noisy.defvjp(noisy_fwd, noisy_bwd)

    def loss(x, key):
        return jnp.sum(jnp.tanh(noisy(x, key)) ** 2)

    x, key = jnp.ones((4, 8)), jax.random.key(0)
    h = hetjax.het_offload(loss, **ALL)
    with pytest.warns(hetjax.HetjaxWarning, match="key<fry>.*cannot be placed in host") as caught:
        g = jax.grad(h)(x, key)
        jax.grad(h)(x, key)  # traced again: no second warning
    assert len(caught) == 1
    assert_trees_equal(g, jax.grad(loss)(x, key))


def test_non_differentiable_argument_gets_jax_error():
    loss, (params, images, labels) = MODELS["cnn"]()
    h = hetjax.het_offload(loss, **ALL)
    with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs"):
        jax.grad(h, argnums=2)(params, images, labels)


@pytest.mark.parametrize("bad", ["fast", 3, None, ["all"]])
def test_bad_policy_names_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[").replace("]", r"\]")):
        hetjax.het_offload(lambda x: x, policy=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True])
def test_bad_min_bytes_names_the_value(bad):
    with pytest.raises(ValueError, match="min_bytes"):
        hetjax.het_offload(lambda x: x, min_bytes=bad)


@pytest.mark.parametrize("bad", [0, -5, "big"])
def test_bad_device_budget_names_the_value(bad):
    with pytest.raises(ValueError, match=f"device_budget.*{bad}"):
        hetjax.het_offload(lambda x: x, device_budget=bad)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_unroll_scans_names_the_value(bad):
    with pytest.raises(TypeError, match=f"unroll_scans.*{bad!r}"):
        hetjax.het_offload(lambda x: x, unroll_scans=bad)


def test_not_callable():
    with pytest.raises(TypeError, match="callable"):
        hetjax.het_offload(42)


def test_python_scalar_and_string_leaves_pass_through():
    def loss(x, cfg):
        assert isinstance(cfg["name"], str) and isinstance(cfg["power"], int)
        return jnp.sum(x ** cfg["power"])

    x = jnp.arange(3.0)
    cfg = {"name": "cube", "power": 3}
    assert_trees_equal(jax.grad(hetjax.het_offload(loss, **ALL))(x, cfg), jax.grad(loss)(x, cfg))


def test_nested_het_offload():
    loss, (w, x) = MODELS["stacked_mlp"]()
    inner = hetjax.het_offload(loss, **ALL)
    outer = hetjax.het_offload(lambda w, x: inner(w, x) * 2.0, **ALL)
    assert_trees_equal(
        jax.jit(jax.grad(outer))(w, x), jax.jit(jax.grad(lambda w, x: loss(w, x) * 2.0))(w, x)
    )


def test_while_loop_keeps_jax_error():
    def loss(x):
        y = lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * 2.0, c[1] + 1), (x, 0))[0]
        return jnp.sum(jnp.sin(y))

    x = jnp.linspace(0, 1, 8)
    # Reverse-mode through while_loop is a JAX error with or without hetjax.
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(loss)(x)
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(hetjax.het_offload(loss, **ALL))(x)


@pytest.mark.parametrize("policy", ["all", "nothing moved"])
def test_a_max_pools_gradient_is_tied_to_its_cotangent_and_bitwise_plains(policy):
    # The backward computes it as JAX lowers it for CPU and GPU, with its zeros and the
    # padded operand behind a barrier with the cotangent, in pieces along the batch
    # (`bind_tied_pool_gradient`).
    loss, (ws, x) = conv_pool()
    decorated = hetjax.het_offload(loss, policy="all" if policy == "all" else lambda r: False)
    plain_jaxpr = str(jax.make_jaxpr(jax.grad(loss))(ws, x))
    jaxpr = str(jax.make_jaxpr(jax.grad(decorated))(ws, x))
    assert "select_and_scatter_add" in plain_jaxpr and "select_and_scatter_add" not in jaxpr
    # One piece per image of the batch of 4 (`pool_gradient_pieces`), each behind a barrier.
    assert jaxpr.count("select_and_scatter[") == 4 <= jaxpr.count("optimization_barrier")
    for order in ("jit(grad)", "grad eager"):
        assert_trees_equal(ORDERS[order](decorated, 0)(ws, x), ORDERS[order](loss, 0)(ws, x))
    per_example = jax.vmap(jax.grad(decorated), in_axes=(None, 0))
    expected = jax.vmap(jax.grad(loss), in_axes=(None, 0))
    assert_trees_equal(per_example(ws, x[:, None]), expected(ws, x[:, None]))

    def second_order(f):  # through the pool's gradient: its own derivative
        return jax.jit(jax.grad(lambda ws: jnp.sum(jax.grad(f)(ws, x)[0] ** 2)))(ws)

    assert_trees_equal(second_order(decorated), second_order(loss))


def test_the_backward_keeps_the_users_scopes_and_source_lines():
    """Profiles and errors name the user's code: each equation the rewrite binds again,
    the pool's tied gradient too, keeps its named scope and its source line."""
    from jax._src import source_info_util

    def loss(w, x):
        with jax.named_scope("stem"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("pooling"):
            h = max_pool(h.reshape(4, 8, 8, 16))
        return jnp.sum(h**2)

    w, x = jnp.ones((16, 16)) / 16, jnp.ones((256, 16))

    def sources(f):  # primitive -> (name stack, the user's frame: file, line)
        found = {}
        for eqn in jax.make_jaxpr(jax.grad(f))(w, x).eqns:
            frame = source_info_util.user_frame(eqn.source_info.traceback)
            found[eqn.primitive.name] = (str(eqn.source_info.name_stack),
                                         frame and (frame.file_name, frame.start_line))  # fmt: skip
        return found

    plain, decorated = sources(loss), sources(hetjax.het_offload(loss, policy="all", min_bytes=0))
    assert "stem" in decorated["tanh"][0] and "pooling" in decorated["custom_jvp_call"][0]
    assert decorated["tanh"][1] == plain["tanh"][1] and plain["tanh"][1][0] == __file__
    assert decorated["custom_jvp_call"][1] == plain["select_and_scatter_add"][1] is not None


@pytest.mark.parametrize("name", ["mlp", "attention", "cnn"])
def test_a_value_moved_in_pieces_gives_plains_gradient(name):
    # Split along the leading axis, moved as arrays of their own, joined where read:
    # only data moves, so op by op the gradients are plain's bit for bit, and jitted
    # in f32 they are the whole moves' (on CPU the moves lower to nothing). In bf16
    # (the attention block), XLA may keep fused values at more precision, differently
    # around the joins (see Numerics in the README).
    from hetjax._check import gradient_program
    from hetjax._plan import make_plan, piece_arrivals

    loss, args = MODELS[name]()
    primal, inputs, usage = _traced(loss, *args)
    whole = make_plan(usage, "all", min_bytes=0)
    pieces = {r.index: 2 for r in whole.offloaded if r.shape and r.shape[0] % 2 == 0}
    plan = make_plan(usage, "all", min_bytes=0, pieces=pieces)
    assert pieces and {r.index for r in plan.offloaded if r.pieces == 2} == set(pieces)
    assert set(piece_arrivals(plan)) == set(pieces)
    joins = [
        str(jax.make_jaxpr(gradient_program(primal, usage, p))(*inputs)).count("concatenate")
        for p in (plan, whole)
    ]
    assert joins[0] > joins[1]
    with jax.disable_jit():
        planned, plain = (gradient_program(primal, usage, p)(*inputs) for p in (plan, None))
    assert_trees_equal(planned, plain)
    if name != "attention":
        jitted = (jax.jit(gradient_program(primal, usage, p))(*inputs) for p in (plan, whole))
        assert_trees_equal(*jitted)
