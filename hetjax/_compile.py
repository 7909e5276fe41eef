"""Stage: compile a function for a target (or the local backend) and read its memory.

On CPU, moves between memory kinds lower to nothing, so a CPU compile says nothing about
GPU memory. A compile for a GPU target (`_target`) is XLA's real GPU program: its
`memory_analysis()` holds the device and host bytes XLA would use on that GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ._target import target_devices


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory figures for one compiled program, in bytes, per device.

    `peak_bytes` is argument + output - alias + temp: what the program needs on the
    device at once, the figure a budget is about. Host temp is pinned host memory.
    """

    target: str  # a target name, or "local"
    device_kind: str
    jax_version: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    host_temp_bytes: int

    @classmethod
    def of(cls, compiled: Any, target: str = "local") -> CompiledMemory:
        """The figures of a compiled program (`jax.jit(f).lower(...).compile()`, or
        `hetjax.compile_for`), compiled for `target`."""
        stats = compiled.memory_analysis()
        if stats is None:
            raise RuntimeError(f"the {target!r} backend gives no memory analysis")

        def field(name: str) -> int:
            return int(getattr(stats, name, 0) or 0)

        (device, *_) = _devices_of(compiled)
        return cls(
            target=target,
            device_kind=device.device_kind,
            jax_version=jax.__version__,
            argument_bytes=field("argument_size_in_bytes"),
            output_bytes=field("output_size_in_bytes"),
            alias_bytes=field("alias_size_in_bytes"),
            temp_bytes=field("temp_size_in_bytes"),
            host_temp_bytes=field("host_temp_size_in_bytes"),
        )

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def summary(self) -> str:
        """One line in MiB, naming what was compiled for."""
        mib = 2.0**20
        return (
            f"peak {self.peak_bytes / mib:.2f} MiB (temp {self.temp_bytes / mib:.2f}, "
            f"arguments {self.argument_bytes / mib:.2f}, outputs {self.output_bytes / mib:.2f}, "
            f"aliased {self.alias_bytes / mib:.2f}), host temp {self.host_temp_bytes / mib:.2f} MiB"
        )


def compile_for(
    fun: Callable[..., Any], *args: Any, target: str | os.PathLike | None = None, **kwargs: Any
) -> Any:
    """`fun(*args, **kwargs)` compiled for `target` (a name from `hetjax.target_names()`,
    `"h200x8"` for eight, a description file), or for the local backend when None.

    Arguments may be arrays or `jax.ShapeDtypeStruct`s; for a target, each is placed
    on its devices: a `NamedSharding` keeps its mesh shape, axis names and spec over the
    target's devices, anything else goes on the first device. A function that is
    already jitted keeps its own options (donation, shardings). Nothing runs.

    Example:
        >>> import jax, jax.numpy as jnp, hetjax
        >>> @hetjax.het_offload(policy="all")
        ... def loss(w, x):
        ...     return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w) ** 2)
        >>> w = x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
        >>> text = hetjax.compile_for(jax.grad(loss), w, x, target="h200").as_text()
        >>> "copy-start" in text  # tanh(x @ w) to host and back, scheduled beside compute
        True
    """
    jitted = fun if hasattr(fun, "trace") else jax.jit(fun)
    if target is not None:
        args, kwargs = place_on(target_devices(target), (args, kwargs))
    return jitted.trace(*args, **kwargs).lower().compile()


def compiled_memory(
    fun: Callable[..., Any], *args: Any, target: str | os.PathLike | None = None, **kwargs: Any
) -> CompiledMemory:
    """XLA's memory figures of `fun(*args, **kwargs)` compiled for `target`.

    `target` is a GPU name (`hetjax.target_names()`), `"h200x8"` for a mesh of eight,
    or a description file: the figures are those of the real GPU program, on any
    machine (needs `pip install "hetjax[gpu-compile]"`, and `JAX_PLATFORMS=cpu` where
    there is no GPU). None compiles for the local backend.

    Example:
        >>> import jax, jax.numpy as jnp, hetjax
        >>> w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
        >>> m = hetjax.compiled_memory(lambda w: jnp.tanh(w @ w).sum(), w, target="h200")
        >>> m.device_kind, m.argument_bytes // 2**20, m.host_temp_bytes
        ('NVIDIA H200 141GB HBM3e', 32, 0)
        >>> m.peak_bytes == m.argument_bytes + m.output_bytes - m.alias_bytes + m.temp_bytes
        True
    """
    compiled = compile_for(fun, *args, target=target, **kwargs)
    return CompiledMemory.of(compiled, "local" if target is None else os.fspath(target))


def _devices_of(compiled: Any) -> list[Any]:
    shardings = jax.tree.leaves(compiled.input_shardings) + jax.tree.leaves(
        compiled.output_shardings
    )
    for sharding in shardings:
        return sorted(sharding.device_set, key=lambda d: d.id)
    return jax.devices()


def place_on(devices: list[Any], tree: Any) -> Any:
    """Every array leaf of `tree` as a `ShapeDtypeStruct` on `devices` (see `compile_for`);
    other leaves (Python numbers, strings) unchanged."""
    device_set = set(devices)
    meshes: dict[Any, Mesh] = {}

    def sharding_of(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            mesh = sharding.mesh
            if set(mesh.devices.flat) <= device_set:
                return sharding
            if mesh.devices.size != len(devices):
                raise ValueError(
                    f"an argument is sharded over a mesh of {mesh.devices.size} devices "
                    f"{dict(mesh.shape)}; the target has {len(devices)}"
                )
            if mesh not in meshes:
                grid = np.array(devices, dtype=object).reshape(mesh.devices.shape)
                meshes[mesh] = Mesh(grid, mesh.axis_names, axis_types=mesh.axis_types)
            return NamedSharding(meshes[mesh], sharding.spec)
        if len(devices) == 1:
            return SingleDeviceSharding(devices[0])
        return NamedSharding(Mesh(np.array(devices, dtype=object), ("devices",)), PartitionSpec())

    def place(x: Any) -> Any:
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            return x
        weak = bool(getattr(x, "weak_type", False))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x), weak_type=weak)

    return jax.tree.map(place, tree)
