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
from jax.tree_util import tree_flatten, tree_unflatten

from ._compat import ClosedJaxpr, Jaxpr, convert_constvars_jaxpr, cotangent_aval, eval_jaxpr


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


def trace_vjp(primal: Jaxpr, in_avals: Sequence[Any]) -> VjpProgram:
    """Split `primal` into forward (with residual outputs) and backward jaxprs."""
    pullback_tree: list[Any] = []

    def run_primal(*xs: Any) -> list[Any]:
        return eval_jaxpr(primal, (), *xs)

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
    return VjpProgram(
        forward=fwd_closed,
        backward=bwd_closed,
        num_inputs=len(in_avals),
        num_outputs=len(out_shapes),
    )


def _ct_shape(s: Any) -> jax.ShapeDtypeStruct:
    ct = cotangent_aval(s)
    return jax.ShapeDtypeStruct(ct.shape, ct.dtype)
