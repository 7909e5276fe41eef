"""Stage: check a plan against the compiler.

The planner's memory figures are a model; XLA's fusion and buffer reuse decide the real
ones. This stage compiles the gradient computation without and with the plan, for a
GPU target or the local GPU, and returns both sets of figures.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._compile import CompiledMemory, compiled_memory

# TODO(#12): the planner uses these figures: never worse than plain, budgets in
# compiled bytes, compiles cached by shapes and options.


@dataclasses.dataclass(frozen=True)
class CompiledComparison:
    """The compiled figures of one gradient computation, without and with the plan."""

    plain: CompiledMemory
    planned: CompiledMemory

    @property
    def peak_ratio(self) -> float:
        """Planned peak over plain peak: below 1 saves device memory."""
        return self.planned.peak_bytes / self.plain.peak_bytes


def checks_against(target: str | os.PathLike | None) -> bool:
    """Whether there is a compiler to check against: a named target, or a local GPU.
    A CPU compile says nothing about GPU memory, so on CPU without a target, none."""
    return target is not None or jax.default_backend() == "gpu"


def gradient_computation(fun: Callable[..., Any], is_step: bool) -> Callable[..., Any]:
    """What gets compiled: a train step (which takes its gradient inside) as it is; a
    loss as its value and its gradient with respect to the first argument, the
    computation `jax.value_and_grad(fun)` makes of a scalar loss."""
    if is_step:
        return fun

    def value_and_gradient(first: Any, *rest: Any, **kwargs: Any) -> Any:
        value, pullback = jax.vjp(lambda p: fun(p, *rest, **kwargs), first)
        return value, pullback(jax.tree.map(jnp.ones_like, value))

    return value_and_gradient


def compile_both(
    plain: Callable[..., Any],
    planned: Callable[..., Any],
    is_step: bool,
    target: str | os.PathLike | None,
    args: tuple,
    kwargs: dict,
) -> CompiledComparison:
    """Compile the gradient computation of `plain` and of `planned` (the same function
    under `het_offload`) for `target` (None: the local backend)."""
    figures = [
        compiled_memory(gradient_computation(f, is_step), *args, target=target, **kwargs)
        for f in (plain, planned)
    ]
    return CompiledComparison(*figures)
