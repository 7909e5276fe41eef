"""Compile targets: GPUs described by their figures, so XLA compiles for them without one.

A target is a `stream_executor.GpuTargetConfigProto` in text form. The package ships the
H100 SXM, H200, A100 80 GB and B200 (`hetjax/targets/*.txtpb`). XLA's GPU compiler, given
one, produces the real GPU program (buffer assignment, host buffers, schedule) on a
machine with no GPU. It needs the CUDA PJRT plugin at jaxlib's version
(`pip install "hetjax[gpu-compile]"`), and on a machine without a GPU, JAX must start
with `JAX_PLATFORMS=cpu`: otherwise the plugin fails its CUDA check and never registers.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from jax.experimental import topologies

TARGETS_DIR = Path(__file__).resolve().parent / "targets"
TARGET_SUFFIX = ".txtpb"
PLUGIN = "jax-cuda12-plugin"
EXTRA = "hetjax[gpu-compile]"


def target_names() -> list[str]:
    """The GPU targets hetjax ships, by name.

    Example:
        >>> import hetjax
        >>> hetjax.target_names()
        ['a100_80gb', 'b200', 'h100_sxm', 'h200']
    """
    return sorted(p.name.removesuffix(TARGET_SUFFIX) for p in TARGETS_DIR.glob("*" + TARGET_SUFFIX))


def parse_target(target: str | os.PathLike) -> tuple[Path, int]:
    """`(description file, device count)` of a target: a shipped name or a description
    file, either optionally followed by `x<count>` (`"h200x8"`: eight H200s).

    Example:
        >>> path, count = parse_target("h100_sxmx4")
        >>> path.name, count
        ('h100_sxm.txtpb', 4)
    """
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise TypeError(f"target must be a target name or a file path, got {target!r}")
    if Path(target).is_file():
        return Path(target), 1
    match = re.fullmatch(r"(.+?)(?:x(\d+))?", target)
    assert match is not None
    base, count = match.group(1), int(match.group(2) or 1)
    if count < 1:
        raise ValueError(f"target {target!r}: the device count must be at least 1, got {count}")
    path = TARGETS_DIR / (base + TARGET_SUFFIX)
    if path.is_file():
        return path, count
    if Path(base).is_file():
        return Path(base), count
    raise ValueError(
        f"unknown target {target!r}: expected one of {target_names()}, optionally with a "
        f"device count ('h200x8'), or the path of a GpuTargetConfigProto text file"
    )


def target_devices(target: str | os.PathLike) -> list[Any]:
    """The compile-only devices of a target: `"h200"` gives one, `"h200x8"` eight.

    They compile programs (`jax.jit(f).trace(*args).lower().compile()`) but run nothing.
    Give arguments as `jax.ShapeDtypeStruct`s with a sharding on these devices, or use
    `hetjax.compiled_memory`, which does it for you.

    Example:
        >>> import hetjax
        >>> [d.device_kind for d in hetjax.target_devices("h200x2")]
        ['NVIDIA H200 141GB HBM3e', 'NVIDIA H200 141GB HBM3e']
    """
    path, count = parse_target(target)
    return list(_topology(str(path.resolve()), count).devices)


@functools.cache
def _topology(path: str, count: int) -> Any:
    """One topology per description and count, so that its devices can share a mesh."""
    check_plugin()
    try:
        return topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{count}", target_config=Path(path).read_text()
        )
    except NotImplementedError as e:
        platforms = os.environ.get("JAX_PLATFORMS")
        raise RuntimeError(
            f"the CUDA plugin is installed but did not register (JAX_PLATFORMS="
            f"{platforms!r}). On a machine without a GPU, JAX must start with "
            f"JAX_PLATFORMS=cpu: set it in the environment before the first JAX "
            f"computation, for example `JAX_PLATFORMS=cpu python train.py`."
        ) from e


def check_plugin() -> None:
    """Raise with the install command when the CUDA plugin is missing or mismatched."""
    problem = plugin_problem(_installed(PLUGIN), _installed("jaxlib"))
    if problem is not None or importlib.util.find_spec("jax_plugins") is None:
        raise RuntimeError(problem or plugin_problem(None, _installed("jaxlib")))


def plugin_problem(plugin: str | None, jaxlib: str | None) -> str | None:
    """What is wrong with the installed CUDA plugin version for this jaxlib, if anything.

    Example:
        >>> plugin_problem("0.11.2", "0.11.2") is None
        True
    """
    if plugin is None:
        return (
            f"compiling for a GPU target needs the CUDA PJRT plugin at jaxlib's version: "
            f'pip install "{EXTRA}" (or pip install "jax[cuda12-local]=={jaxlib}")'
        )
    if plugin != jaxlib:
        return (
            f"{PLUGIN} {plugin} does not match jaxlib {jaxlib}: "
            f'pip install "jax[cuda12-local]=={jaxlib}"'
        )
    return None


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
