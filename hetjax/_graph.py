"""Graph objects (flax nnx modules, optimizers, rngs) among a call's arguments.

A traced function gets fresh objects merged from the callers' state, and returns
their state afterwards, so that in-place updates (`optimizer.update(model, grads)`)
reach the caller's objects through `nnx.update` and no tracer leaks into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.tree_util import tree_flatten, tree_unflatten

try:
    from flax import nnx
except ImportError:  # pragma: no cover - flax is optional
    nnx = None


def is_graph_object(x: Any) -> bool:
    return nnx is not None and nnx.graph.is_graph_node(x)


class GraphArgs:
    """The graph objects among `leaves`, split once into a graphdef and state leaves.

    Example:
        >>> from flax import nnx
        >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> g = GraphArgs([model, 1.0])
        >>> lifted = g.lift([model, 1.0])  # the object, then its kernel and bias
        >>> lifted[:2], g.num_state
        ([None, 1.0], 2)
        >>> leaves, objects = g.lower(lifted)  # fresh objects, as inside a trace
        >>> type(leaves[0]).__name__, leaves[0] is model
        ('Linear', False)
    """

    def __init__(self, leaves: Sequence[Any]) -> None:
        self.where = [i for i, x in enumerate(leaves) if is_graph_object(x)]
        self.objects = [leaves[i] for i in self.where]
        self.num_leaves = len(leaves)
        self.num_state = 0
        self.out_tree: Any = None
        if self.objects:
            self.graphdef, state = nnx.split(self.objects)
            self.state_leaves, self.state_tree = tree_flatten(state)
            self.num_state = len(self.state_leaves)

    def lift(self, leaves: Sequence[Any]) -> list[Any]:
        """Leaves with each graph object replaced by None, then the state leaves."""
        if not self.objects:
            return list(leaves)
        out = [None if i in self.where else x for i, x in enumerate(leaves)]
        return out + list(self.state_leaves)

    def lower(self, lifted: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """Inverse of `lift` on (traced) leaves: the leaves with fresh objects merged
        from the state leaves, and those objects."""
        leaves = list(lifted[: self.num_leaves])
        if not self.objects:
            return leaves, []
        state = tree_unflatten(self.state_tree, lifted[self.num_leaves :])
        objects = nnx.merge(self.graphdef, state)
        for i, obj in zip(self.where, objects, strict=True):
            leaves[i] = obj
        return leaves, objects

    def state_after(self, objects: list[Any]) -> list[Any]:
        """The state leaves of `objects` after the call (their in-place updates)."""
        if not self.objects:
            return []
        leaves, self.out_tree = tree_flatten(nnx.split(objects)[1])
        return leaves

    def write_back(self, state_leaves: Sequence[Any]) -> None:
        """Update the caller's objects with the state the call left."""
        if self.objects:
            nnx.update(self.objects, tree_unflatten(self.out_tree, list(state_leaves)))
