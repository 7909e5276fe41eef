"""Stage 3: cost. Time per equation from its avals, and the device's rates.

The estimates are deliberately simple: flops for matrix products and convolutions,
bytes moved for everything else. They order and space the transfers; they are not
a profiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._compat import JaxprEqn, nbytes, shard_shape, sub_jaxprs

GB = 1e9
# Gradient accumulation: a parameter's cotangent is the sum of its uses' cotangents,
# padded to its shape ("add_any" is `add_jaxvals_p`'s name).
GRADIENT_SUM_PRIMITIVES = frozenset({"add_any", "pad"})
MIN_FUSION_SCALE = 0.05  # where a compiler's kernels outrun even the model's matmuls


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Rates and sizes of one accelerator and its host link.

    Example:
        >>> from hetjax import DeviceProfile
        >>> p = DeviceProfile.for_platform("gpu")
        >>> round(p.d2h_seconds(2**30) * 1e3)  # one GiB to host, in ms
        22
    """

    name: str
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    matmul_flops_per_s: float
    memory_bytes_per_s: float
    device_memory_bytes: int
    host_memory_bytes: int
    memory_kinds_work: bool = True
    # The compiled kernels' time for work other than matrix products over the cost
    # model's: XLA fuses the elementwise work the model charges equation by equation.
    # The compile check sets it from the compiled program (`calibrated`); 1 without one.
    fusion_scale: float = 1.0

    @classmethod
    def for_platform(cls, platform: str) -> DeviceProfile:
        """Defaults per platform. GPU link rates are the H200 figures in GPU_FINDINGS.md.

        On CPU the in-jit moves to host memory lower to nothing; the profile keeps
        GPU-like rates so a plan made on CPU has the structure a GPU would get.
        """
        gpu = cls(
            name="nvidia-gpu (H200 defaults)",
            h2d_bytes_per_s=52.4 * GB,
            d2h_bytes_per_s=48.5 * GB,
            matmul_flops_per_s=660e12,  # what `_simulate` charges an H200 (0.62 of peak)
            memory_bytes_per_s=3.0e12,
            device_memory_bytes=141 * 2**30,
            host_memory_bytes=512 * 2**30,
        )
        if platform in ("gpu", "cuda", "rocm"):
            return gpu
        return dataclasses.replace(
            gpu, name=f"{platform} (GPU-like rates)", memory_kinds_work=False
        )

    def d2h_seconds(self, num_bytes: int) -> float:
        return num_bytes / self.d2h_bytes_per_s

    def h2d_seconds(self, num_bytes: int) -> float:
        return num_bytes / self.h2d_bytes_per_s


def calibrated(profile: DeviceProfile, eqns: Sequence[JaxprEqn], compute_s: float) -> DeviceProfile:
    """`profile` with its `fusion_scale` set so that `eqns` take `compute_s` (a
    compiler's figure for the same program: `_simulate`'s kernel time). Matrix products
    keep their time; the rest of the work takes what is left.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from hetjax._cost import DeviceProfile, calibrated, jaxpr_seconds
        >>> eqns = jax.make_jaxpr(lambda x: jnp.tanh(x) * 2)(jnp.ones(1024)).eqns
        >>> p = calibrated(DeviceProfile.for_platform("gpu"), eqns, 1e-6)
        >>> round(jaxpr_seconds(eqns, p) * 1e6, 3)
        1.0
    """
    matmul, memory = np.sum([_split_seconds(e, profile) for e in eqns], axis=0)
    if memory <= 0:
        return profile
    scale = max(compute_s - matmul, MIN_FUSION_SCALE * memory) / memory
    return dataclasses.replace(profile, fusion_scale=float(scale))


def eqn_seconds(eqn: JaxprEqn, profile: DeviceProfile) -> float:
    """Estimated run time of one equation, nested jaxprs included."""
    matmul, memory = _split_seconds(eqn, profile)
    return matmul + memory * profile.fusion_scale


def _split_seconds(eqn: JaxprEqn, profile: DeviceProfile) -> tuple[float, float]:
    """An equation's time in matrix products, and in other work before `fusion_scale`."""
    name = str(eqn.primitive)
    moved = sum(nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars) if hasattr(v, "aval"))
    memory_time = moved / profile.memory_bytes_per_s
    if name in GRADIENT_SUM_PRIMITIVES:
        # XLA fuses a parameter's padded, summed cotangents into one kernel at the end,
        # which reads each piece once (reference mlp, H200).
        smallest = min(nbytes(v.aval) for v in eqn.invars if hasattr(v, "aval"))
        return 0.0, smallest / profile.memory_bytes_per_s
    if name == "dot_general":
        return max(_dot_flops(eqn) / profile.matmul_flops_per_s, memory_time), 0.0
    if name == "conv_general_dilated":
        return max(_conv_flops(eqn) / profile.matmul_flops_per_s, memory_time), 0.0
    inner = sub_jaxprs(eqn)
    if inner:
        reps = int(eqn.params.get("length", 1)) if name == "scan" else 1
        body = np.sum([_split_seconds(e, profile) for j in inner for e in j.eqns], axis=0)
        if name == "cond":  # one branch runs
            body = body / len(inner)
        return float(reps * body[0]), float(reps * body[1])
    return 0.0, memory_time


def jaxpr_seconds(eqns: Sequence[JaxprEqn], profile: DeviceProfile) -> float:
    return sum(eqn_seconds(e, profile) for e in eqns)


# Flops, like bytes, are per device: shapes are shard shapes where the avals carry
# their sharding (explicit mesh axes), whole shapes otherwise.


def _dot_flops(eqn: JaxprEqn) -> float:
    lhs = shard_shape(eqn.invars[0].aval)
    (lc, _), _ = eqn.params["dimension_numbers"]
    contract = np.prod([lhs[d] for d in lc], dtype=np.float64)
    out = np.prod(shard_shape(eqn.outvars[0].aval), dtype=np.float64)
    return 2.0 * float(out) * float(contract)


def _conv_flops(eqn: JaxprEqn) -> float:
    rhs: Any = eqn.invars[1].aval
    out = np.prod(shard_shape(eqn.outvars[0].aval), dtype=np.float64)
    # Each output element reads one filter's worth of inputs: kernel size / out features.
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0] if dn is not None else 0
    per_output = np.prod(rhs.shape, dtype=np.float64) / max(rhs.shape[out_feature_dim], 1)
    return 2.0 * float(out) * float(per_output)


def measure_device(num_bytes: int = 256 * 2**20, repeats: int = 5) -> DeviceProfile:
    """Time in-jit copies of a `num_bytes` array to host and back, and a matmul.

    On CPU, moves between memory kinds lower to nothing, so nothing is timed: the
    result is the platform default with `memory_kinds_work=False`, and its name says so.

    Example:
        >>> import hetjax
        >>> profile = hetjax.measure_device()
        >>> profile.h2d_bytes_per_s > 0
        True
    """
    import time

    import jax
    import jax.numpy as jnp

    platform = jax.default_backend()
    base = DeviceProfile.for_platform(platform)
    if platform == "cpu":
        return dataclasses.replace(base, name="cpu: memory kinds do nothing here (not measured)")

    def best_seconds(fn: Any, x: Any) -> float:
        jax.block_until_ready(fn(x))  # compile and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    to_host = jax.jit(lambda a: jax.device_put(a, jax.memory.Space.Host))
    to_device = jax.jit(lambda a: jax.device_put(a, jax.memory.Space.Device))
    on_host = jax.block_until_ready(to_host(x))
    d2h = best_seconds(to_host, x)
    h2d = best_seconds(to_device, on_host)
    m = jnp.ones((4096, 4096), jnp.bfloat16)
    matmul = best_seconds(jax.jit(lambda a: a @ a), m)
    scale = best_seconds(jax.jit(lambda a: a * 2), x)
    stats = jax.devices()[0].memory_stats() or {}
    return dataclasses.replace(
        base,
        name=f"{jax.devices()[0].device_kind} (measured)",
        d2h_bytes_per_s=num_bytes / d2h,
        h2d_bytes_per_s=num_bytes / h2d,
        matmul_flops_per_s=2 * 4096**3 / matmul,
        memory_bytes_per_s=2 * num_bytes / scale,
        device_memory_bytes=int(stats.get("bytes_limit", base.device_memory_bytes)),
    )
