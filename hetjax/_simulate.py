"""Stage: predict the step time of a compiled GPU program from its schedule.

A program compiled for a GPU (`_compile`, for a target or the local GPU) is scheduled:
`compiled.as_text()` lists each computation's instructions in the order they run, and
each move between memory spaces is a `copy-start` / `copy-done` pair. This stage walks
that schedule and adds up time. The model, and its limits:

- **One compute stream.** The entry computation is walked in schedule order; a `while`
  loop walks its body as many times as its known trip count (once, and named in
  `not_modelled`, where XLA gives none); `call` and `conditional` walk what they call
  (the costliest branch).
- **Roofline per kernel.** A fusion, a library call (cuBLAS, cuDNN) or any other
  kernel costs `max(flops / matrix rate, bytes / HBM rate) + LAUNCH_S`. Flops are
  counted for dots and convolutions only (elementwise work is bandwidth-bound); the
  matrix rate is the target's dense tensor-core rate for the dtype (f32 dots run as
  TF32, JAX's default on GPU) times `MATMUL_EFFICIENCY`. Bytes are what the kernel reads
  and writes: an operand the kernel only slices counts its slice, and an in-place
  `dynamic-update-slice` counts its update.
- **Two host links.** Each `copy-start` occupies its direction (device to host, host to
  device) from when it is issued and the link is free, for bytes / the DeviceProfile's
  rate; its `copy-done` waits for it. A kernel that reads or writes host memory (a slice
  of an offloaded stack) stalls the stream for those bytes at the link rate.
- **Collectives** run on an interconnect stream at the target's NVLink rate (an
  all-reduce moves its bytes twice); their `-done` waits for them. Multi-node links
  are not modelled.
- **Not modelled:** autotuning (a deviceless compile keeps default GEMM tiles),
  concurrent kernels on other streams, caches, clocks under power limits, the host's
  own time (launch gaps beyond `LAUNCH_S`, Python).

Calibration: `MATMUL_EFFICIENCY` and `LAUNCH_S` were fitted, by hand, to two real H200
step times of `shared/notes/GPU_FINDINGS.md` (plain and per-layer remat of its MLP,
jax 0.11.2); its third (JAX's names offload policy) was not fitted, and is predicted
within 15%. `tests/test_simulate.py` checks all three.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from ._cost import DeviceProfile
from ._target import parse_target, target_names

MATMUL_EFFICIENCY = 0.62  # of the dense tensor-core peak, for a deviceless-tuned GEMM
HBM_EFFICIENCY = 0.80  # of the target's memory bandwidth
LAUNCH_S = 4e-6  # per kernel

# Dense bf16 tensor-core flops per SM per clock, by compute capability (NVIDIA's
# published peaks divided by SMs x boost clock); f32 dots run as TF32 at half of it.
_TENSOR_FLOPS_PER_SM_CLOCK = {7: 1024, 8: 2048, 9: 4096, 10: 8192}
_CONSUMER_AMPERE_ADA = {(8, 6), (8, 7), (8, 9)}  # half the tensor rate of (8, 0)
# NVLink bytes per second, one direction, by compute capability.
_NVLINK_BYTES_PER_S = {7: 150e9, 8: 300e9, 9: 450e9, 10: 900e9}

_HOST_SPACE = "S(5)"
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
    "get-dimension-size", "iota",
}  # fmt: skip
_COLLECTIVES = {
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-broadcast", "ragged-all-to-all",
}  # fmt: skip
_SLICES = {"slice", "dynamic-slice", "gather"}
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "token": 0,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GpuRates:
    """The rates the simulator charges, for one GPU target."""

    name: str
    tensor_flops_per_s: float  # dense bf16 peak
    hbm_bytes_per_s: float
    interconnect_bytes_per_s: float

    @classmethod
    def of_target(cls, target: str | os.PathLike) -> GpuRates:
        """Rates from a target's description file (`hetjax.target_names()` or a path)."""
        path, _ = parse_target(target)
        return _rates_of_description(path.read_text(), os.fspath(target))


def _rates_of_description(text: str, name: str) -> GpuRates:
    def number(field: str) -> float:
        m = re.search(rf"\b{field}:\s*([0-9.eE+]+)", text)
        if m is None:
            raise ValueError(f"hetjax: the target description {name!r} has no {field!r}")
        return float(m.group(1))

    cc = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
    major = int(re.search(r"major:\s*(\d+)", cc.group(1)).group(1)) if cc else 0
    minor_m = re.search(r"minor:\s*(\d+)", cc.group(1)) if cc else None
    minor = int(minor_m.group(1)) if minor_m else 0
    if major not in _TENSOR_FLOPS_PER_SM_CLOCK:
        raise ValueError(
            f"hetjax: no tensor-core rate known for compute capability {major}.{minor} "
            f"(target {name!r}); known: {sorted(_TENSOR_FLOPS_PER_SM_CLOCK)}"
        )
    per_clock = _TENSOR_FLOPS_PER_SM_CLOCK[major]
    if (major, minor) in _CONSUMER_AMPERE_ADA:
        per_clock //= 2
    return GpuRates(
        name=name,
        tensor_flops_per_s=number("core_count") * number("clock_rate_ghz") * 1e9 * per_clock,
        hbm_bytes_per_s=number("memory_bandwidth"),
        interconnect_bytes_per_s=_NVLINK_BYTES_PER_S[major],
    )


@dataclasses.dataclass(frozen=True)
class CopyTiming:
    """One copy between device and host memory as the walk of a schedule sees it
    (predicted): the stream issues it at `start_ms`, the link finishes it at
    `finish_ms`, and the stream reaches its `copy-done` at `done_ms`. What it adds to
    the step is `wait_ms`, the time the stream then waits for it: the copy a step
    waits on longest is `max(estimate.copies, key=lambda c: c.wait_ms)`."""

    direction: str  # "d2h" or "h2d"
    nbytes: float
    start_ms: float
    done_ms: float
    finish_ms: float

    @property
    def wait_ms(self) -> float:
        return max(0.0, self.finish_ms - self.done_ms)


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """A predicted step time, from a compiled GPU program's schedule. Predicted, not run.

    `compute_ms` is the kernels' roofline time; `d2h_ms` and `h2d_ms` the time each link
    direction is busy; `exposed_link_ms` the time the stream waits for the links (what
    moving to host adds to the step); `collective_ms` the interconnect's busy time.
    `matmul_flops` (dot and convolution flops, loops counted by their trips) and
    `d2h_bytes` / `h2d_bytes` (bytes each link direction carries) are counted from the
    program, not predicted: recomputation shows in the first, offloading in the others.
    `copies` times each host copy the stream ran (`CopyTiming`), in the order of their
    `copy-done`s, a loop's once per trip: which of them the stream waits for.
    """

    target: str
    step_ms: float
    compute_ms: float
    d2h_ms: float
    h2d_ms: float
    exposed_link_ms: float
    collective_ms: float
    kernels: int
    not_modelled: tuple[str, ...] = ()
    matmul_flops: float = 0.0
    d2h_bytes: float = 0.0
    h2d_bytes: float = 0.0
    copies: tuple[CopyTiming, ...] = ()

    def summary(self) -> str:
        """One line, e.g. `predicted 42.1 ms (compute 40.0, exposed link 2.1; ...)`."""
        return (
            f"predicted {self.step_ms:.1f} ms for {self.target} (compute {self.compute_ms:.1f}, "
            f"exposed link {self.exposed_link_ms:.1f}; link busy {self.d2h_ms:.1f} to host, "
            f"{self.h2d_ms:.1f} back), not run"
        )


def simulate_step(
    compiled: Any, target: str | os.PathLike | None = None, *, profile: DeviceProfile | None = None
) -> StepEstimate:
    """Predict the step time of a compiled GPU program by walking its schedule.

    `compiled` is a compiled program (`hetjax.compile_for`, or `jax.jit(f).lower(...)
    .compile()` on a GPU) or its `as_text()`. `target` names the GPU it was compiled for
    (None: the local GPU, recognised by its device kind). `profile` gives the host link
    rates (default: the H200 rates measured in GPU_FINDINGS.md). See the module docstring
    for the model.

    Example:
        >>> import jax, jax.numpy as jnp, hetjax
        >>> x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
        >>> program = hetjax.compile_for(jax.jit(lambda a: a @ a), x, target="h200")
        >>> estimate = hetjax.simulate_step(program, target="h200")
        >>> 0.1 < estimate.step_ms < 1.0, estimate.exposed_link_ms, estimate.copies
        (True, 0.0, ())
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    rates = GpuRates.of_target(target) if target is not None else _local_rates(compiled)
    profile = profile or DeviceProfile.for_platform("gpu")
    return _Walk(_parse_module(text), rates, profile).run()


def _local_rates(compiled: Any) -> GpuRates:
    """The rates of the local GPU, matched by device kind against the shipped targets."""
    kinds = {d.device_kind for d in getattr(compiled, "devices", lambda: [])() or []}
    if not kinds:
        import jax

        kinds = {jax.devices()[0].device_kind}
    kind = next(iter(kinds))
    for name in target_names():
        path, _ = parse_target(name)
        if f'"{kind}"' in path.read_text():
            return GpuRates.of_target(name)
    raise ValueError(
        f"hetjax: no target description matches the device kind {kind!r}; pass "
        f"target= one of {target_names()} or a description file"
    )


# ---------------------------------------------------------------------------------------
# Parsing the scheduled HLO text.


@dataclasses.dataclass(frozen=True)
class _Shape:
    dtype: str
    dims: tuple[int, ...]
    host: bool

    @property
    def nbytes(self) -> float:
        return math.prod(self.dims) * _DTYPE_BYTES.get(self.dtype, 4)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shapes: tuple[_Shape, ...]  # one, or a tuple's elements
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    number: int | None = None  # a parameter's index

    @property
    def nbytes(self) -> float:
        return sum(s.nbytes for s in self.shapes)


@dataclasses.dataclass(frozen=True)
class _Module:
    computations: dict[str, list[_Instruction]]
    entry: str


_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")


def _parse_module(text: str) -> _Module:
    computations: dict[str, list[_Instruction]] = {}
    entry = current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        m = _LINE.match(line)
        if m:
            computations[current].append(_parse_instruction(m.group(1), m.group(2)))
    if entry is None:
        raise ValueError("hetjax: no ENTRY computation in the program text")
    return _Module(computations, entry)


def _parse_instruction(name: str, rest: str) -> _Instruction:
    if rest.startswith("("):
        end = _closing(rest, 0)
        type_text, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    end = _closing("(" + rest, 0)
    operand_text, attrs = rest[: end - 1], rest[end:]
    shapes = tuple(
        _Shape(
            m.group(1),
            tuple(int(d) for d in m.group(2).split(",") if d),
            _HOST_SPACE in (m.group(3) or ""),
        )  # fmt: skip
        for m in _SHAPE.finditer(type_text)
    )
    operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
    opcode = opcode.strip()
    number = int(operand_text) if opcode == "parameter" and operand_text.isdigit() else None
    return _Instruction(name, shapes, opcode, operands, attrs, number)


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _backend_config(attrs: str) -> dict:
    m = re.search(r"backend_config=(\{.*\})\s*$", attrs)
    if not m:
        return {}
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return {}


# ---------------------------------------------------------------------------------------
# Costing kernels.


def _dot_flops(inst: _Instruction, shapes: dict[str, _Instruction]) -> float:
    lhs = shapes[inst.operands[0]].shapes[0]
    dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
    contracting = [int(d) for d in dims.group(1).split(",") if d] if dims else []
    return 2.0 * math.prod(inst.shapes[0].dims) * math.prod(lhs.dims[d] for d in contracting)


def _conv_flops(out: _Shape, rhs: _Shape, attrs: str) -> float:
    """2 x output elements x (kernel elements per output feature): holds for the forward
    convolution and for both of its gradients written as convolutions."""
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    per_output = math.prod(rhs.dims)
    if labels and "o" in labels.group(1):
        per_output //= max(1, rhs.dims[labels.group(1).index("o")])
    return 2.0 * math.prod(out.dims) * per_output


def _library_flops(inst: _Instruction, shapes: dict[str, _Instruction]) -> float:
    """Flops of a cuBLAS or cuDNN custom call."""
    m = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
    target = m.group(1) if m else ""
    if "cublas" in target or "matmul" in target:
        config = _backend_config(inst.attrs)
        numbers = config.get("gemm_backend_config", config).get("dot_dimension_numbers", {})
        contracting = [int(d) for d in numbers.get("lhs_contracting_dimensions", [])]
        lhs = shapes[inst.operands[0]].shapes[0]
        return 2.0 * math.prod(inst.shapes[0].dims) * math.prod(lhs.dims[d] for d in contracting)
    if "conv" in target and len(inst.operands) >= 2:
        return _conv_flops(inst.shapes[0], shapes[inst.operands[1]].shapes[0], inst.attrs)
    return 0.0


def _flops_of(computation: list[_Instruction], module: _Module) -> tuple[float, str]:
    """Matrix flops of a fused computation (nested fusions included), and the dtype of
    its widest dot's operands."""
    shapes = {i.name: i for i in computation}
    flops, dtype = 0.0, "bf16"
    for inst in computation:
        if inst.opcode == "dot":
            flops += _dot_flops(inst, shapes)
            dtype = shapes[inst.operands[0]].shapes[0].dtype
        elif inst.opcode == "convolution":
            flops += _conv_flops(inst.shapes[0], shapes[inst.operands[1]].shapes[0], inst.attrs)
            dtype = shapes[inst.operands[0]].shapes[0].dtype
        elif inst.opcode == "fusion":
            inner = module.computations.get(_attr(inst.attrs, "calls") or "", [])
            f, d = _flops_of(inner, module)
            flops, dtype = flops + f, (d if f else dtype)
    return flops, dtype


def _fusion_bytes(
    inst: _Instruction, fused: list[_Instruction], shapes: dict[str, _Instruction]
) -> tuple[float, float, float]:
    """(device bytes, host bytes read, host bytes written) of one fusion kernel."""
    params: dict[int, str] = {}
    users: dict[str, list[_Instruction]] = {}
    for f in fused:
        if f.opcode == "parameter" and f.number is not None:
            params[f.number] = f.name
        for o in f.operands:
            users.setdefault(o, []).append(f)
    root = fused[-1] if fused else None
    in_place = root is not None and root.opcode == "dynamic-update-slice"
    device = host_read = host_written = 0.0
    for i, operand in enumerate(inst.operands):
        source = shapes.get(operand)
        if source is None:
            continue
        read = sum(s.nbytes for s in source.shapes)
        uses = list(_through_bitcasts(params.get(i), users))
        if uses and all(u.opcode in _SLICES for u in uses):
            read = sum(u.nbytes for u in uses)
        if (
            in_place
            and root is not None
            and uses == [root]
            and root.operands[0] in _aliases(params.get(i), users)
        ):
            read = 0.0  # the buffer updated in place is not read
        host = any(s.host for s in source.shapes)
        host_read += read if host else 0.0
        device += 0.0 if host else read
    written = inst.nbytes
    if in_place and root is not None and len(root.operands) > 1:
        update = {f.name: f for f in fused}.get(root.operands[1])
        written = update.nbytes if update is not None else written
    if any(s.host for s in inst.shapes):
        host_written += written
    else:
        device += written
    return device, host_read, host_written


def _through_bitcasts(name: str | None, users: dict[str, list[_Instruction]]) -> Iterator:
    for u in users.get(name or "", []):
        if u.opcode in ("bitcast", "reshape"):
            yield from _through_bitcasts(u.name, users)
        else:
            yield u


def _aliases(name: str | None, users: dict[str, list[_Instruction]]) -> set[str]:
    """`name` and the bitcasts of it."""
    out = {name or ""}
    for u in users.get(name or "", []):
        if u.opcode in ("bitcast", "reshape"):
            out |= _aliases(u.name, users)
    return out


# ---------------------------------------------------------------------------------------
# Walking the schedule.


class _Walk:
    """One pass over the schedule: the stream's clock, the links' and the interconnect's."""

    def __init__(self, module: _Module, rates: GpuRates, profile: DeviceProfile):
        self.module, self.rates, self.profile = module, rates, profile
        self.now = 0.0
        self.compute = self.link_wait = self.collective_busy = self.collective_wait = 0.0
        self.busy = {"d2h": 0.0, "h2d": 0.0}  # seconds each direction carries bytes
        self.moved = {"d2h": 0.0, "h2d": 0.0}  # bytes each direction carries
        self.flops = 0.0
        self.free = {"d2h": 0.0, "h2d": 0.0, "net": 0.0}  # when each is next free
        self.pending: dict[str, tuple[str, float]] = {}  # async start -> (stream, done at)
        self.issued: dict[str, tuple[float, float]] = {}  # host copy -> (bytes, issued at)
        self.copies: list[CopyTiming] = []
        self.kernels = 0
        self.not_modelled: set[str] = set()

    def run(self) -> StepEstimate:
        self.walk(self.module.entry)
        end = max([self.now, *(done for _, done in self.pending.values())])
        self.link_wait += end - self.now  # copies still in flight when the stream ends
        self.now = end
        return StepEstimate(
            target=self.rates.name,
            step_ms=self.now * 1e3,
            compute_ms=self.compute * 1e3,
            d2h_ms=self.busy["d2h"] * 1e3,
            h2d_ms=self.busy["h2d"] * 1e3,
            exposed_link_ms=self.link_wait * 1e3,
            collective_ms=self.collective_busy * 1e3,
            kernels=self.kernels,
            not_modelled=tuple(sorted(self.not_modelled)),
            matmul_flops=self.flops,
            d2h_bytes=self.moved["d2h"],
            h2d_bytes=self.moved["h2d"],
            copies=tuple(self.copies),
        )

    def walk(self, computation: str) -> None:
        instructions = self.module.computations.get(computation, [])
        shapes = {i.name: i for i in instructions}
        for inst in instructions:
            self.step(inst, shapes)

    def step(self, inst: _Instruction, shapes: dict[str, _Instruction]) -> None:
        op = inst.opcode
        if op in _FREE:
            return
        if op == "copy-start":
            source = shapes.get(inst.operands[0]) if inst.operands else None
            to_host = bool(inst.shapes) and inst.shapes[0].host
            from_host = source is not None and any(s.host for s in source.shapes)
            nbytes = inst.shapes[0].nbytes if inst.shapes else 0.0
            if to_host == from_host:  # a device-to-device copy, run as a kernel
                self.kernel(2 * nbytes / self._hbm(), 0.0)
                self.pending[inst.name] = ("none", self.now)
                return
            direction = "d2h" if to_host else "h2d"
            self.pending[inst.name] = (direction, self.transfer(direction, nbytes))
            self.issued[inst.name] = (nbytes, self.now)
        elif op == "copy-done" or (op.endswith("-done") and inst.operands):
            way, done = self.pending.pop(inst.operands[0], ("none", self.now))
            if op == "copy-done" and inst.operands[0] in self.issued:
                nbytes, start = self.issued.pop(inst.operands[0])
                self.copies.append(CopyTiming(way, nbytes, start * 1e3, self.now * 1e3, done * 1e3))
            if done > self.now:
                wait = done - self.now
                if op == "copy-done":
                    self.link_wait += wait
                else:
                    self.collective_wait += wait
                self.now = done
        elif op in _COLLECTIVES or (op.endswith("-start") and op[:-6] in _COLLECTIVES):
            nbytes = inst.nbytes if op in _COLLECTIVES else _collective_bytes(inst, shapes)
            seconds = nbytes * (2 if op.startswith("all-reduce") else 1)
            seconds /= self.rates.interconnect_bytes_per_s
            start = max(self.now, self.free["net"])
            self.free["net"] = start + seconds
            self.collective_busy += seconds
            if op in _COLLECTIVES:  # synchronous
                self.collective_wait += self.free["net"] - self.now
                self.now = self.free["net"]
            else:
                self.pending[inst.name] = ("net", self.free["net"])
        elif op == "while":
            body = _attr(inst.attrs, "body")
            condition = _attr(inst.attrs, "condition")
            trips = _trip_count(inst.attrs)
            if trips is None:
                self.not_modelled.add("a while loop without a known trip count (walked once)")
                trips = 1
            for _ in range(trips):
                if condition:
                    self.walk(condition)
                if body:
                    self.walk(body)
        elif op in ("call", "async-start"):
            called = _attr(inst.attrs, "to_apply") or _attr(inst.attrs, "calls")
            if called:
                self.walk(called)
            if op == "async-start":
                self.pending[inst.name] = ("none", self.now)
        elif op == "conditional":
            branches = re.findall(r"%([\w.\-]+)", _branch_text(inst.attrs))
            if branches:
                self.walk(max(branches, key=self._cost_of_computation))
        elif op in ("fusion", "custom-call", "dot", "convolution"):
            self.kernel(*self._kernel_cost(inst, shapes))
        elif op == "fusion-start":  # an async fusion, on the same stream: its result is
            # the called computation's root, not the (operands, result, context) tuple
            fused = self.module.computations.get(_attr(inst.attrs, "calls") or "", [])
            result = fused[-1].shapes if fused else inst.shapes
            as_fusion = dataclasses.replace(inst, opcode="fusion", shapes=result)
            self.kernel(*self._kernel_cost(as_fusion, shapes))
        elif op == "send" or op == "recv":
            self.not_modelled.add(f"'{op}'")
        else:  # an unfused kernel: bytes in and out
            read = sum(shapes[o].nbytes for o in inst.operands if o in shapes)
            self.kernel((read + inst.nbytes) / self._hbm(), 0.0)

    def kernel(self, seconds: float, host_seconds: float) -> None:
        """Run one kernel on the stream; host bytes it touches go over the link."""
        self.kernels += 1
        seconds += LAUNCH_S
        self.compute += seconds
        self.now += seconds
        if host_seconds:
            self.link_wait += host_seconds
            self.now += host_seconds

    def transfer(self, direction: str, nbytes: float) -> float:
        rate = self.profile.d2h_bytes_per_s if direction == "d2h" else self.profile.h2d_bytes_per_s
        start = max(self.now, self.free[direction])
        self.free[direction] = start + nbytes / rate
        self.busy[direction] += nbytes / rate
        self.moved[direction] += nbytes
        return self.free[direction]

    def _hbm(self) -> float:
        return self.rates.hbm_bytes_per_s * HBM_EFFICIENCY

    def _kernel_cost(
        self, inst: _Instruction, shapes: dict[str, _Instruction]
    ) -> tuple[float, float]:
        """(roofline seconds, seconds of host-link traffic) of one kernel."""
        called = _attr(inst.attrs, "calls") or ""
        if inst.opcode == "fusion":
            fused = self.module.computations.get(called, [])
            flops, dtype = _flops_of(fused, self.module)
            device, host_read, host_written = _fusion_bytes(inst, fused, shapes)
        else:
            if inst.opcode == "dot":
                flops = _dot_flops(inst, shapes)
            elif inst.opcode == "convolution":
                flops = _conv_flops(inst.shapes[0], shapes[inst.operands[1]].shapes[0], inst.attrs)
            else:
                flops = _library_flops(inst, shapes)
            source = shapes.get(inst.operands[0]) if inst.operands else None
            dtype = source.shapes[0].dtype if source is not None and source.shapes else "bf16"
            device = sum(shapes[o].nbytes for o in inst.operands if o in shapes) + (
                inst.shapes[0].nbytes if inst.shapes else 0.0
            )
            host_read = host_written = 0.0
        matrix = self.rates.tensor_flops_per_s * MATMUL_EFFICIENCY * _dtype_speed(dtype)
        seconds = max(flops / matrix, device / self._hbm())
        reading = host_read / self.profile.h2d_bytes_per_s
        writing = host_written / self.profile.d2h_bytes_per_s
        self.busy["h2d"] += reading
        self.busy["d2h"] += writing
        self.moved["h2d"] += host_read
        self.moved["d2h"] += host_written
        self.flops += flops
        return seconds, reading + writing

    def _cost_of_computation(self, name: str) -> float:
        walk = _Walk(_Module(self.module.computations, name), self.rates, self.profile)
        walk.walk(name)
        return walk.now


def _dtype_speed(dtype: str) -> float:
    """Tensor-core speed of a dot's operand dtype, relative to bf16."""
    if dtype.startswith("f8"):
        return 2.0
    if dtype in ("bf16", "f16", "s8", "u8"):
        return 1.0
    if dtype == "f32":
        return 0.5  # TF32
    return 1 / 16  # f64 and others: no tensor cores worth counting


def _trip_count(attrs: str) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    return int(m.group(1)) if m else None


def _branch_text(attrs: str) -> str:
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if m:
        return m.group(1)
    pair = (_attr(attrs, "true_computation"), _attr(attrs, "false_computation"))
    return " ".join(f"%{name}" for name in pair if name)


def _collective_bytes(inst: _Instruction, shapes: dict[str, _Instruction]) -> float:
    """Bytes an async collective's start moves: its operands."""
    return sum(shapes[o].nbytes for o in inst.operands if o in shapes) or inst.nbytes
