"""The public transformation: `het_offload`."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar, overload

import jax
import numpy as np
from jax.tree_util import tree_flatten, tree_unflatten

from ._check import CHECKED_POLICIES, checked_plan, checks_against
from ._compat import Jaxpr, Tracer
from ._cost import DeviceProfile
from ._graph import GraphArgs, is_graph_object
from ._plan import Plan, Policy, check_options, make_plan
from ._rewrite import offloaded_call
from ._step import holds_backward, run_step, step_program, step_usage
from ._target import parse_target
from ._trace import calls_a_scan, inline_calls, trace_primal, trace_vjp, unroll_scans
from ._usage import Usage, residual_usage

F = TypeVar("F", bound=Callable[..., Any])


@overload
def het_offload(
    fun: F,
    *,
    policy: Policy = ...,
    device_budget: float | None = ...,
    min_bytes: int = ...,
    profile: DeviceProfile | None = ...,
    target: str | os.PathLike | None = ...,
    unroll_scans: bool = ...,
) -> F: ...
@overload
def het_offload(
    fun: None = None,
    *,
    policy: Policy = ...,
    device_budget: float | None = ...,
    min_bytes: int = ...,
    profile: DeviceProfile | None = ...,
    target: str | os.PathLike | None = ...,
    unroll_scans: bool = ...,
) -> Callable[[F], F]: ...
def het_offload(
    fun: Callable[..., Any] | None = None,
    *,
    policy: Policy = "auto",
    device_budget: float | None = None,
    min_bytes: int = 2**20,
    profile: DeviceProfile | None = None,
    target: str | os.PathLike | None = None,
    unroll_scans: bool = False,
) -> Any:
    """Keep the residuals of `fun`'s VJP in host memory between forward and backward.

    When `fun` is differentiated (`jax.grad`, `jax.value_and_grad`, `jax.vjp`), each
    residual the plan picks is copied to host memory right after it is produced and
    copied back just before its first backward use; both copies are pinned so XLA
    cannot fold or move them. Cheap residuals (views and elementwise functions of
    values the backward has anyway) are recomputed instead of stored. A residual
    that a `scan` stacks (one slice per layer) moves one slice per iteration, inside
    the forward and backward loops. Values and gradients are those of `fun`: bitwise
    equal where only data moves.

    `fun` may be a loss (differentiated outside) or a whole train step that takes
    the gradient inside (`jax.value_and_grad`, `nnx.value_and_grad`, optax, flax nnx
    graph objects as arguments); the step's forward-to-backward crossings are moved.

    Args:
      fun: the function to transform. Any pytrees of arrays in and out; non-array
        leaves (Python numbers, strings) are passed through unchanged.
      policy: `"auto"` (move what the cost model says hides under compute),
        `"all"` (move every eligible residual of at least `min_bytes`), `"none"`
        (identical to not decorating), or a callable `ResidualUsage -> bool`
        asked about each eligible residual (a move with no window between its
        two copies, made just before the backward, is kept). Where there is a
        compiler (`target`, or a local GPU), `"auto"` and `"all"` keep a plan only if
        it compiles to no higher a peak than the undecorated function; a callable is
        not checked.
      device_budget: peak device bytes for `"auto"`: compiled bytes (argument + output
        - alias + temp of the gradient computation) where the plan is checked against a
        compiler (`target`, or a local GPU), else the memory model's predicted bytes.
      min_bytes: residuals smaller than this stay on device.
      profile: the `DeviceProfile` used for timing; defaults per platform.
      target: the GPU compiler `"auto"` and `"all"` check their plan against, and that
        `.analyze` reports the figures of (`hetjax.target_names()`, `"h200x8"`, or a
        description file); None: the local GPU, if any. Inputs sharded over a mesh of n
        devices (`Explicit` axes, or sharded arguments outside `jax.jit`) are checked per
        device, on n of the target's GPUs.
      unroll_scans: run each top-level `scan` as one copy of its body per iteration, so
        that the plan keeps, moves or rebuilds each layer's values on their own. In a
        loop they can only move through a host stack, which XLA writes and reads inside
        the loop, on the compute stream, where no copy hides; so at a budget a loop's
        layers are rebuilt whole, as `jax.checkpoint` does. Compile time grows with the
        number of iterations, and XLA fuses the unrolled bodies differently from one
        loop body: gradients agree with the loop's within rounding, not bitwise.

    Example:
        >>> import jax, jax.numpy as jnp, hetjax
        >>> @hetjax.het_offload(policy="all", min_bytes=0)
        ... def loss(w, x):
        ...     return jnp.mean(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2)
        >>> w, x = jnp.full((8, 8), 0.1), jnp.ones((4, 8))
        >>> g = jax.jit(jax.grad(loss))(w, x)
        >>> bool(jnp.array_equal(g, jax.jit(jax.grad(loss.__wrapped__))(w, x)))
        True
        >>> loss.analyze(w, x).moved_bytes  # the plan, without running: tanh(x @ w)
        128

    (The second layer's tanh is made just before the backward, which reads it first:
    its copy to host could not end before its copy back must start, so it stays.)
    """
    check_options(policy, min_bytes, device_budget, unroll_scans)
    if target is not None:
        parse_target(target)  # a bad name fails here, not at the first call
    if fun is None:
        return functools.partial(
            het_offload,
            policy=policy,
            device_budget=device_budget,
            min_bytes=min_bytes,
            profile=profile,
            target=target,
            unroll_scans=unroll_scans,
        )
    if not callable(fun):
        raise TypeError(f"het_offload: expected a callable, got {fun!r}")

    options = dict(
        policy=policy, min_bytes=min_bytes, device_budget=device_budget, profile=profile,
        target=target, unroll_scans=unroll_scans,
    )  # fmt: skip
    if policy == "none":

        @functools.wraps(fun)
        def unchanged(*args: Any, **kwargs: Any) -> Any:
            return fun(*args, **kwargs)

        unchanged.analyze = functools.partial(_analyze, fun, options)  # type: ignore[attr-defined]
        return unchanged

    @functools.wraps(fun)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat_fun, dynamic, out_tree, graph = flatten_call(fun, args, kwargs)
        primal, consts, _ = trace_primal(flat_fun, dynamic)
        inputs = [*consts, *dynamic]
        if holds_backward(primal):  # a train step: one program, no custom_vjp
            outs = run_step(*plan_for(primal, inputs, options), inputs)
        else:
            outs = _offloaded(primal, options)(*inputs)
        num_outs = len(outs) - graph.num_state
        graph.write_back(outs[num_outs:])
        return tree_unflatten(out_tree[0], outs[:num_outs])

    wrapper.analyze = functools.partial(_analyze, fun, options)  # type: ignore[attr-defined]
    return wrapper


def _analyze(fun: Callable[..., Any], options: dict, *args: Any, **kwargs: Any) -> Any:
    """`decorated.analyze(*args)`: `hetjax.analyze` of the undecorated function with
    the decorator's options, the plan these arguments get, without running anything."""
    from ._report import analyze  # _report builds on this module

    return analyze(fun, *args, **options, **kwargs)


def is_dynamic(x: Any) -> bool:
    """Array leaves (and `ShapeDtypeStruct`s, for `analyze`) are traced; other leaves
    (Python numbers, strings) stay static."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, Tracer, jax.ShapeDtypeStruct))


def flatten_call(
    fun: Callable[..., Any], args: tuple, kwargs: dict
) -> tuple[Callable[..., list], list[Any], list[Any], GraphArgs]:
    """`fun(*args, **kwargs)` as a function of its array leaves, returning a flat list.

    The output tree is written to the returned one-element list when traced. Graph
    objects (flax nnx) enter as their state leaves; the flat list ends with their
    state after the call, for `GraphArgs.write_back`.
    """
    leaves, in_tree = tree_flatten((args, kwargs), is_leaf=is_graph_object)
    graph = GraphArgs(leaves)
    leaves = graph.lift(leaves)
    mask = [is_dynamic(x) for x in leaves]
    dynamic = [x for x, m in zip(leaves, mask, strict=True) if m]
    out_tree: list[Any] = []

    def flat_fun(*dyn: Any) -> list[Any]:
        it = iter(dyn)
        merged = [next(it) if m else x for x, m in zip(leaves, mask, strict=True)]
        merged, objects = graph.lower(merged)
        a, k = tree_unflatten(in_tree, merged)
        out_leaves, tree = tree_flatten(fun(*a, **k))
        out_tree[:] = [tree]
        return out_leaves + graph.state_after(objects)

    return flat_fun, dynamic, out_tree, graph


def plan_for(primal: Jaxpr, inputs: list[Any], options: dict) -> tuple[Usage, Plan]:
    """Trace, record and plan: the pure front half of the pipeline, in the step form
    when `primal` takes a gradient itself, else in the loss form."""
    # TODO: let a checked budget try the unrolled program itself, keeping the faster
    # plan. Unrolled, the reference gpt_scan at remat's peak is predicted faster (192.8
    # ms against the loop's 202.5 and remat's 198.4, H200, jax 0.11.2), rebuilding less
    # (0.92 of remat's extra flops against 1.00); but planning it takes several times
    # longer, and jitted gradients agree only within rounding.
    unroll = options.get("unroll_scans", False)
    if holds_backward(primal):
        usage = step_usage(step_program(primal, inputs, unroll))
    elif unroll or calls_a_scan(primal):  # inlined, the scan's residuals can move
        program = inline_calls(primal, inputs)
        usage = residual_usage(trace_vjp(unroll_scans(program) if unroll else program, inputs))
    else:
        usage = residual_usage(trace_vjp(primal, inputs))
    if options["policy"] in CHECKED_POLICIES and checks_against(options.get("target")):
        return usage, checked_plan(primal, inputs, usage, options)
    rest = {k: v for k, v in options.items() if k not in ("policy", "target", "unroll_scans")}
    return usage, make_plan(usage, options["policy"], **rest)


def usage_and_plan(
    fun: Callable[..., Any], args: tuple, kwargs: dict, options: dict
) -> tuple[Usage, Plan]:
    """The record and plan `het_offload(fun, **options)` uses for these arguments."""
    flat_fun, dynamic, *_ = flatten_call(fun, args, kwargs)
    primal, consts, _ = trace_primal(flat_fun, dynamic)
    return plan_for(primal, [*consts, *dynamic], options)


def _offloaded(primal: Jaxpr, options: dict) -> Callable[..., list]:
    """A `custom_vjp` function that evaluates `primal`, with the rewritten VJP."""
    return offloaded_call(primal, lambda inputs: plan_for(primal, inputs, options))
