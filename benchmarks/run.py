"""Benchmark hetjax against plain JAX, JAX remat and JAX's own offload policy.

Usage:
    python benchmarks/run.py [--model mlp|cnn|gpt|gpt_scan] [--preset tiny|reference|full]
                             [--target h200|h100_sxm|a100_80gb|b200|local]
                             [--variants plain,jax_remat,...] [--steps 20] [--json PATH]
                             [--in-process]

Two modes, chosen by `--target`:
- **compiled** (`--target h200`, or any name of `hetjax.target_names()`; the default on a
  machine without a GPU): every variant's train step is compiled for that GPU, on any
  machine, and nothing runs. Each entry has XLA's memory figures for that GPU and
  `compiled_peak_bytes` (argument + output - alias + temp); `step_ms`, `peak_bytes` and
  `grad_rel_err` are null. The preset defaults to `reference`, and the JSON goes by
  default to `benchmarks/results/compiled/<model>_<preset>_<target>_jax<version>.json`.
  It needs the `gpu-compile` extra (in `.[dev]`).
- **run** (`--target local`, the default on a GPU): the variants train on this machine's
  device, as described below.

Every variant trains the same model with one jitted step (`jax.value_and_grad` and an
update by the model's optax optimizer: SGD for mlp and cnn, adamw for gpt and gpt_scan)
and runs in a fresh Python process, because `peak_bytes_in_use` is a high-water mark
for the whole process. The worker records, in this order:
  1. the compiled step's `memory_analysis()`: temp, host temp, argument, output bytes;
  2. the median and minimum time of `--steps` steps after `--warmup` steps;
  3. `peak_bytes_in_use` of device 0, read right after timing (None on CPU);
  4. the relative L2 error of the variant's gradient against the plain one, in f32,
     computed after timing so it cannot inflate the peak;
  5. every `hetjax.HetjaxWarning` raised on the way, in `warnings`;
  6. for hetjax variants, the planner's predictions (`predicted`: peak bytes without
     and with the plan, bytes moved, per-iteration bytes, exposed ms), to check its
     model against the compiled and measured figures;
  7. the step time `hetjax.simulate_step` predicts from the compiled schedule
     (`predicted_step_ms`, with its compute, exposed link and link-busy ms): in
     compiled mode always, in run mode on a GPU beside the measured `step_ms`. It is a
     prediction, labelled so in every table. Beside it, counted from the same compiled
     program: `matmul_flops` (recomputation shows here) and `d2h_bytes` / `h2d_bytes`.

In run mode the default preset is `tiny` on CPU and `reference` elsewhere. On CPU every
memory kind is the same memory, so figures run there check plumbing and numerics, never
savings: compile for a GPU target for those.

The JAX baselines (remat, JAX offload) of the bf16 models can show a `grad_rel_err` of
bf16 noise although they compute the same gradient (on CPU at the tiny preset: 9e-3 for
gpt, 1e-1 for cnn with `dots_saveable`): XLA's default `--xla_allow_excess_precision`
lets each compiled program skip different bf16 roundings. With
`XLA_FLAGS=--xla_allow_excess_precision=false` (the tests set it) every variant agrees
bitwise on CPU. The JSON records the `XLA_FLAGS` the workers ran with.
Setting `JAX_COMPILATION_CACHE_DIR` lets the worker processes share compiled programs
(the initialisation and the plain gradient are the same in every variant).
`--in-process` runs every variant in the parent instead: one start-up, one
initialisation and one plain gradient for all of them, and no `peak_bytes`. It is for
CPU checks (the tests use it), where there is no peak to measure anyway.

Results go to a table on the terminal, and to JSON with `--json PATH`; on a GPU the JSON
also goes by default to `benchmarks/results/<model>_<preset>_<device>.json`.

To add a variant, add a builder to `VARIANTS`; to add a model, register it in
`models.MODELS`. Without `--in-process` the parent process never starts a JAX backend:
it asks a worker (`--info`) what the device is, so that it holds no device memory itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name
from models import MODELS, Array, Layer, Loss, Model

import hetjax
from hetjax import compile_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMPILED_DIR = RESULTS_DIR / "compiled"
LOCAL = "local"  # --target: run on this machine instead of compiling for a GPU
# hetjax's default min_bytes (1 MiB) is larger than every residual of the tiny presets;
# there it is 0 so that the tiny runs still move something (on paper: CPU moves nothing).
TINY_MIN_BYTES = 0
DEFAULT_MIN_BYTES = 2**20
CPU_NOTE = (
    "note: on CPU every memory kind is the same memory and host copies lower to nothing, "
    "so the memory figures below prove nothing about savings."
)

# ------------------------------------------------------------------------------ variants
# A variant builder maps a model, and the GPU target it is compiled for (None: this
# machine), to candidate losses {detail: loss}. The worker compiles every candidate and
# keeps the one with the smallest compiled temp bytes.
Candidates = dict[str, Loss]
Builder = Callable[[Model, "str | None"], Candidates]


def plain(model: Model, target: str | None = None) -> Candidates:
    return {"jax.value_and_grad": model.loss}


def remat_with(policy_name: str) -> Builder:
    """Per-layer `jax.checkpoint` with one `jax.checkpoint_policies` policy."""

    def build(model: Model, target: str | None = None) -> Candidates:
        policy = getattr(jax.checkpoint_policies, policy_name)
        loss = model.loss_with(lambda layer: jax.checkpoint(layer, policy=policy))
        return {f"per-layer checkpoint, policy={policy_name}": loss}

    return build


def jax_remat(model: Model, target: str | None = None) -> Candidates:
    """Both remat policies; the worker reports the one with the smaller temp."""
    return {**remat_with("nothing_saveable")(model), **remat_with("dots_saveable")(model)}


def name_output(layer: Layer) -> Layer:
    """`layer` with its output tagged `layer_out` for a names-based policy."""

    def named(w: Any, x: Any) -> Any:
        return checkpoint_name(layer(w, x), "layer_out")

    return named


def jax_offload(model: Model, target: str | None = None) -> Candidates:
    """JAX's own offload policies on the whole loss.

    Always: every layer output saved to pinned host, nothing else saved. For models
    made of matmuls (`model.offload_dots`) also `offload_dot_with_no_batch_dims`, which
    sends every weight matmul's output to pinned host; the worker keeps the candidate
    with the smaller compiled temp.
    """
    names = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["layer_out"],
        offload_src="device",
        offload_dst="pinned_host",
    )
    candidates = {
        "save_and_offload_only_these_names(layer_out -> pinned_host)": jax.checkpoint(
            model.loss_with(name_output), policy=names
        )
    }
    if model.offload_dots:
        dots = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        candidates["offload_dot_with_no_batch_dims(device -> pinned_host)"] = jax.checkpoint(
            model.loss, policy=dots
        )
    return candidates


def hetjax_with(policy: str) -> Builder:
    """`hetjax.het_offload(loss, policy=policy, target=target)` on the whole loss: with a
    target (or on a GPU), `"auto"` checks its plan against that compiler."""

    def build(model: Model, target: str | None = None) -> Candidates:
        min_bytes = TINY_MIN_BYTES if model.preset == "tiny" else DEFAULT_MIN_BYTES
        loss = hetjax.het_offload(model.loss, policy=policy, min_bytes=min_bytes, target=target)
        return {f"het_offload(policy={policy!r}, min_bytes={min_bytes})": loss}

    return build


def hetjax_budget(fraction: float, of: str = "plain", unroll_scans: bool = False) -> Builder:
    """`policy="auto"` with a device budget of `fraction` x the peak of plain (`of="plain"`)
    or of per-layer `jax.checkpoint` with `nothing_saveable` (`of="remat"`); with
    `unroll_scans`, the loss's scans unrolled (`het_offload(unroll_scans=True)`).

    Where there is a compiler to check against (a target, or a GPU), the budget is in
    compiled bytes: `fraction` x the compiled peak of that loss's gradient computation,
    and the planner checks its plan against that compiler. Elsewhere it is `fraction` x
    the planner's predicted peak of that loss (a model).
    """

    def build(model: Model, target: str | None = None) -> Candidates:
        min_bytes = TINY_MIN_BYTES if model.preset == "tiny" else DEFAULT_MIN_BYTES
        params, batch = jax.eval_shape(model.init)
        if of == "remat":
            (reference,) = remat_with("nothing_saveable")(model).values()
        else:
            reference = model.loss
        plain = hetjax.analyze(reference, params, batch, policy="none", target=target)
        if plain.compiled is not None:
            budget, unit = fraction * plain.compiled.plain.peak_bytes, "compiled"
        else:
            budget, unit = fraction * plain.baseline_peak_bytes, "predicted"
        loss = hetjax.het_offload(
            model.loss, policy="auto", device_budget=budget, min_bytes=min_bytes, target=target,
            unroll_scans=unroll_scans,
        )  # fmt: skip
        budget_of = "" if of == "plain" else f", {fraction:g} x {of}'s peak"
        budget_of += ", unroll_scans=True" if unroll_scans else ""
        return {f"het_offload(policy='auto', device_budget={budget:.0f} B {unit}{budget_of})": loss}

    return build


VARIANTS: dict[str, Builder] = {
    "plain": plain,
    "jax_remat": jax_remat,
    "jax_offload": jax_offload,
    "hetjax_all": hetjax_with("all"),
    "hetjax_auto": hetjax_with("auto"),
    "hetjax_auto@0.8": hetjax_budget(0.8),
    "hetjax_auto@0.6": hetjax_budget(0.6),
    # Not in the default list (each budget is a search of a few compiles): tighter
    # budgets, and each remat policy on its own.
    "hetjax_auto@0.4": hetjax_budget(0.4),
    "hetjax_auto@0.2": hetjax_budget(0.2),
    # Memory-first: the budget is per-layer remat's compiled peak.
    "hetjax_auto@remat": hetjax_budget(1.0, of="remat"),
    # The same with the scans unrolled, so that each layer is planned on its own (a
    # scanned model only; elsewhere it is `hetjax_auto@remat`).
    "hetjax_unrolled@remat": hetjax_budget(1.0, of="remat", unroll_scans=True),
    "jax_remat_nothing": remat_with("nothing_saveable"),
    "jax_remat_dots": remat_with("dots_saveable"),
}
DEFAULT_VARIANTS = (
    "plain",
    "jax_remat",
    "jax_offload",
    "hetjax_all",
    "hetjax_auto",
    "hetjax_auto@0.8",
    "hetjax_auto@0.6",
)
RESULT_KEYS = (
    "name",
    "temp_bytes",
    "host_temp_bytes",
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "compiled_peak_bytes",
    "target",
    "peak_bytes",
    "step_ms",
    "step_ms_min",
    "predicted_step_ms",
    "predicted_compute_ms",
    "predicted_exposed_link_ms",
    "predicted_d2h_ms",
    "predicted_h2d_ms",
    "matmul_flops",
    "d2h_bytes",
    "h2d_bytes",
    "grad_rel_err",
    "warnings",
    "error",
)

# -------------------------------------------------------------------------------- worker


def log(message: str) -> None:
    """Progress on stderr: stdout carries only the result line."""
    print(message, file=sys.stderr, flush=True)


Step = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


def train_step(loss: Loss, optimizer: optax.GradientTransformation) -> Step:
    """One training step: `(params, opt_state, batch) -> (loss, params, opt_state)`."""

    def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), opt_state

    return step


def memory_fields(compiled: Any, target: str = LOCAL) -> dict[str, Any]:
    """The compiled program's memory figures, as `hetjax.CompiledMemory` reads them."""
    memory = hetjax.CompiledMemory.of(compiled, target)
    return {
        "temp_bytes": memory.temp_bytes,
        "host_temp_bytes": memory.host_temp_bytes,
        "argument_bytes": memory.argument_bytes,
        "output_bytes": memory.output_bytes,
        "alias_bytes": memory.alias_bytes,
        "compiled_peak_bytes": memory.peak_bytes,
        "target": target,
    }


def compile_best(
    candidates: Candidates,
    optimizer: optax.GradientTransformation,
    state: tuple,
    batch: Any,
    target: str = LOCAL,
) -> tuple[str, Loss, Any, dict]:
    """Compile every candidate's step (for `target`, or for this machine); keep the one
    with the smallest temp bytes. `state` is `(params, opt_state)`.
    """
    best = None
    for detail, loss in candidates.items():
        step = jax.jit(train_step(loss, optimizer))
        compiled = compile_for(step, *state, batch, target=None if target == LOCAL else target)
        memory = memory_fields(compiled, target)
        log(f"  compiled {detail}: temp {memory['temp_bytes']} B")
        temp = memory["temp_bytes"] if memory["temp_bytes"] is not None else float("inf")
        if best is None or temp < best[0]:
            best = (temp, detail, loss, compiled, memory)
    assert best is not None, "a variant must have at least one candidate"
    return best[1:]


def time_steps(compiled: Any, state: tuple, batch: Any, steps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `steps` steps, after `warmup` untimed ones.

    `state` is `(params, opt_state)`, carried from step to step.
    """
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, *state = jax.block_until_ready(compiled(*state, batch))
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def peak_bytes() -> int | None:
    """Device 0's `peak_bytes_in_use` for this process, where the backend reports it."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


@jax.jit
def rel_l2_error(tree: Any, reference: Any) -> Array:
    """`||tree - reference|| / ||reference||` over all leaves, in float32, in one program."""
    f32 = jnp.float32
    diff = sum(
        jnp.sum((a.astype(f32) - b.astype(f32)) ** 2)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference), strict=True)
    )
    norm = sum(jnp.sum(b.astype(f32) ** 2) for b in jax.tree.leaves(reference))
    return jnp.sqrt(diff) / jnp.sqrt(norm)


@functools.cache
def load_model(model_name: str, preset: str) -> Model:
    """The model, built once per process (its jitted `init` then compiles once)."""
    return MODELS[model_name](preset)


@functools.cache
def jitted_grad(loss: Loss) -> Callable[[Any, Any], Any]:
    """`jax.jit(jax.grad(loss))`, one per loss function (plain's is the reference's)."""
    return jax.jit(jax.grad(loss))


@functools.cache
def reference_grads(model_name: str, preset: str) -> Any:
    """The plain loss's gradient at the model's initial params, once per process."""
    model = load_model(model_name, preset)
    return jitted_grad(model.loss)(*model.init())


def grad_rel_err(g_ref: Any, loss: Loss, params: Any, batch: Any) -> float:
    """`||g - g_ref|| / ||g_ref||` over all gradient leaves, in float32.

    The variant's gradient is its own jitted program, as the variant would run it.
    """
    return float(rel_l2_error(jitted_grad(loss)(params, batch), g_ref))


def schedule_fields(compiled: Any, target: str = LOCAL) -> dict[str, Any]:
    """The step time `hetjax.simulate_step` predicts from the compiled schedule (a
    prediction, not a measurement; None where the GPU has no description)."""
    try:
        e = hetjax.simulate_step(compiled, None if target == LOCAL else target)
    except ValueError as error:
        log(f"  no predicted step time: {error}")
        return {}
    return {
        "predicted_step_ms": e.step_ms,
        "predicted_compute_ms": e.compute_ms,
        "predicted_exposed_link_ms": e.exposed_link_ms,
        "predicted_d2h_ms": e.d2h_ms,
        "predicted_h2d_ms": e.h2d_ms,
        # counted from the compiled program, not predicted
        "matmul_flops": e.matmul_flops,
        "d2h_bytes": e.d2h_bytes,
        "h2d_bytes": e.h2d_bytes,
    }


def planner_fields(loss: Loss, params: Any, batch: Any) -> dict[str, Any]:
    """For hetjax variants, what the planner predicted, to hold against the compiled
    and measured figures: peak bytes without and with the plan (its device-memory
    model), bytes moved (and how many of them per scan iteration), exposed ms."""
    if not hasattr(loss, "analyze"):
        return {}
    report = loss.analyze(params, batch)
    return {
        "predicted": {
            "baseline_peak_bytes": report.baseline_peak_bytes,
            "peak_bytes": report.predicted_peak_bytes,
            "moved_bytes": report.moved_bytes,
            "moved_per_iteration_bytes": sum(
                r.nbytes for r in report.residuals if r.decision == "offload" and r.per_iteration
            ),
            "exposed_transfer_ms": report.exposed_transfer_ms,
            # Where the plan was checked against a compiler: which, and its peaks.
            "checked_by": report.plan.checked_by,
            "compiled_plain_peak_bytes": report.plan.compiled_plain_peak_bytes,
            "compiled_peak_bytes": report.plan.compiled_peak_bytes,
        }
    }


def empty_result(name: str) -> dict[str, Any]:
    return {key: None for key in RESULT_KEYS} | {"name": name}


@contextlib.contextmanager
def recorded(result: dict) -> Iterator[None]:
    """Record the `HetjaxWarning`s raised inside in `result["warnings"]`, and an
    exception in `result["error"]` instead of raising it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hetjax.HetjaxWarning)
        try:
            yield
        except Exception as e:  # any failure is a result to report
            traceback.print_exc(file=sys.stderr)
            result["error"] = f"{type(e).__name__}: {e}"
    for w in caught:
        if issubclass(w.category, hetjax.HetjaxWarning):
            result["warnings"].append(str(w.message))
        else:  # other warnings still reach stderr as usual
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def measure(
    model_name: str, preset: str, variant: str, steps: int, warmup: int, record_peak: bool = True
) -> dict:
    """One variant's figures; an exception is recorded in `error`, not raised."""
    result = empty_result(variant) | {"warnings": []}
    with recorded(result):
        model = load_model(model_name, preset)
        params, batch = model.init()
        state = (params, model.optimizer.init(params))
        candidates = VARIANTS[variant](model, None)
        detail, loss, compiled, memory = compile_best(candidates, model.optimizer, state, batch)
        result |= memory | {"detail": detail} | planner_fields(loss, params, batch)
        if jax.default_backend() == "gpu":
            result |= schedule_fields(compiled)
        log(f"  timing {steps} steps of {detail}")
        times = time_steps(compiled, state, batch, steps, warmup)
        result["peak_bytes"] = peak_bytes() if record_peak else None
        result["step_ms"] = statistics.median(times)
        result["step_ms_min"] = min(times)
        g_ref = reference_grads(model_name, preset)
        result["grad_rel_err"] = grad_rel_err(g_ref, loss, params, batch)
    return result


def compile_variant(model_name: str, preset: str, variant: str, target: str) -> dict:
    """One variant's train step compiled for `target`, from shapes only: nothing runs,
    so there is no time, no measured peak and no gradient to compare."""
    result = empty_result(variant) | {"warnings": []}
    with recorded(result):
        model = load_model(model_name, preset)
        params, batch = jax.eval_shape(model.init)
        state = (params, jax.eval_shape(model.optimizer.init, params))
        candidates = VARIANTS[variant](model, target)
        detail, loss, compiled, memory = compile_best(
            candidates, model.optimizer, state, batch, target
        )
        result |= memory | {"detail": detail} | planner_fields(loss, params, batch)
        result |= schedule_fields(compiled, target)
    return result


def device_info() -> dict[str, str]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# -------------------------------------------------------------------------------- parent


def run_worker(extra: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run this script with `extra` arguments; its last JSON stdout line, and an error."""
    command = [sys.executable, str(Path(__file__).resolve()), *extra]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, f"timed out after {timeout:.0f} s; stderr tail: {tail(e.stderr)}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return None, f"worker exited with code {proc.returncode}; stderr tail: {tail(proc.stderr)}"
    return json.loads(lines[-1]), ""


def tail(text: str | bytes | None, lines: int = 5) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " | ".join((text or "").strip().splitlines()[-lines:])


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """One variant in a fresh process; a crash or timeout becomes its `error`.

    With `--in-process` it runs here instead, without a peak (the high-water mark
    would include every variant before it) and without a timeout.
    """
    if args.in_process:
        # hetjax warns once per message and process (a private set, also cleared by
        # tests/conftest.py); clear it so that each variant records its own warnings.
        getattr(getattr(hetjax, "_plan", None), "_warned", set()).clear()
        return measure(args.model, args.preset, variant, args.steps, args.warmup, False)
    extra = ["--worker", variant, "--model", args.model, "--preset", args.preset]
    extra += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    result, error = run_worker(extra, args.timeout)
    return result if result is not None else empty_result(variant) | {"error": error}


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def progress_line(r: dict) -> str:
    if r["error"]:
        return f"{r['name']}: ERROR {r['error']}"
    notes = "".join(f"\n  HetjaxWarning: {w}" for w in r.get("warnings") or [])
    ran = "" if r["step_ms"] is None else (
        f", peak {mib(r['peak_bytes'])} MiB, {r['step_ms']:.2f} ms/step, "
        f"grad rel err {r['grad_rel_err']:.1e}"
    )  # fmt: skip
    return (
        f"{r['name']}: temp {mib(r['temp_bytes'])} MiB, host temp {mib(r['host_temp_bytes'])} "
        f"MiB, compiled peak {mib(r['compiled_peak_bytes'])} MiB{ran} [{r.get('detail', '')}]"
        f"{notes}"
    )


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


def table(results: list[dict]) -> str:
    """A markdown table of the results, compiled peak and step time relative to `plain`."""
    plain = next((r for r in results if r["name"] == "plain" and not r["error"]), None)
    base_peak, base_ms = (None, None) if plain is None else (
        plain["compiled_peak_bytes"], plain["step_ms"]
    )  # fmt: skip
    base_predicted = None if plain is None else plain["predicted_step_ms"]
    header = ["variant", "temp MiB", "host temp MiB", "compiled peak MiB", "vs plain",
              "peak MiB", "step ms", "vs plain", "predicted ms", "vs plain",
              "grad rel err"]  # fmt: skip
    rows = [header, ["---"] * len(header)]
    for r in results:
        ms = r["step_ms"]
        rows.append(
            [
                r["name"] + (" (error)" if r["error"] else ""),
                mib(r["temp_bytes"]),
                mib(r["host_temp_bytes"]),
                mib(r["compiled_peak_bytes"]),
                ratio(r["compiled_peak_bytes"], base_peak),
                mib(r["peak_bytes"]),
                "-" if ms is None else f"{ms:.2f}",
                ratio(ms, base_ms),
                "-" if r["predicted_step_ms"] is None else f"{r['predicted_step_ms']:.1f}",
                ratio(r["predicted_step_ms"], base_predicted),
                "-" if r["grad_rel_err"] is None else f"{r['grad_rel_err']:.1e}",
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def json_path(args: argparse.Namespace, info: dict) -> Path | None:
    """`--json`, else the default results file of a compile or of a GPU run, else None
    (a CPU run writes nothing)."""
    if args.json:
        return Path(args.json)
    if args.target != LOCAL:
        name = f"{args.model}_{args.preset}_{slug(args.target)}_jax{info['jax_version']}.json"
        return COMPILED_DIR / name
    if info["platform"] != "gpu":
        return None
    return RESULTS_DIR / f"{args.model}_{args.preset}_{slug(info['device_kind'])}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument(
        "--preset", default=None, help="default: reference, or tiny for a run on CPU"
    )
    parser.add_argument(
        "--target",
        default=None,
        help=f"a GPU to compile for, without running ({', '.join(hetjax.target_names())}), "
        f"or '{LOCAL}' to run on this machine; default: '{LOCAL}' on a GPU, else h200",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every variant in this process: faster (one import, one init, one plain "
        "gradient), for CPU checks; records no peak_bytes",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--info", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.info:
        print(json.dumps(device_info()), flush=True)
        return 0
    if args.worker:
        result = measure(args.model, args.preset, args.worker, args.steps, args.warmup)
        print(json.dumps(result), flush=True)
        return 0

    if args.target not in (None, LOCAL):
        return compile_main(args)
    info, error = (device_info(), "") if args.in_process else run_worker(["--info"], args.timeout)
    if info is None:
        print(f"could not start a JAX worker: {error}", file=sys.stderr)
        return 2
    on_cpu = info["platform"] == "cpu"
    if args.target is None and info["platform"] != "gpu":
        args.target = "h200"  # no GPU here: figures that mean something are compiled ones
        return compile_main(args)
    args.target = LOCAL
    args.preset = args.preset or ("tiny" if on_cpu else "reference")
    try:
        config = MODELS[args.model](args.preset).config
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    device = f"{info['device_kind']} ({info['platform']})"
    print(f"{args.model} / {args.preset} on {device}, jax {info['jax_version']}", flush=True)
    if info["xla_flags"]:
        print(f"XLA_FLAGS={info['xla_flags']}", flush=True)
    if on_cpu:
        print(CPU_NOTE, flush=True)

    results = []
    for variant in args.variants.split(","):
        results.append(run_variant(args, variant))
        print(progress_line(results[-1]), flush=True)
    return finish(args, info, device, config, results)


def compile_main(args: argparse.Namespace) -> int:
    """Compiled mode: every variant compiled for `args.target` in this process."""
    if os.environ.get("JAX_PLATFORMS") is None:
        # No GPU needed: the CUDA plugin registers its compile-only targets only when
        # JAX starts on the CPU platform (hetjax/_target.py).
        jax.config.update("jax_platforms", "cpu")
    args.preset = args.preset or "reference"
    try:
        config = MODELS[args.model](args.preset).config
        (target_device, *_) = hetjax.target_devices(args.target)
    except (ValueError, RuntimeError) as e:
        print(f"{e}\n(or run on this machine instead: --target {LOCAL})", file=sys.stderr)
        return 2
    info = device_info() | {"platform": "compiled", "device_kind": target_device.device_kind}
    device = f"{target_device.device_kind} (compiled for {args.target}, not run)"
    print(f"{args.model} / {args.preset}: {device}, jax {info['jax_version']}")
    print(
        f"note: XLA's memory figures for the {args.target} program, compiled on this "
        f"machine, and step times predicted from its schedule (hetjax.simulate_step): "
        f"nothing runs, so there is no measured time or peak, and no gradient check.",
        flush=True,
    )
    results = []
    for variant in args.variants.split(","):
        getattr(getattr(hetjax, "_plan", None), "_warned", set()).clear()
        results.append(compile_variant(args.model, args.preset, variant, args.target))
        print(progress_line(results[-1]), flush=True)
    return finish(args, info, device, config, results)


def finish(
    args: argparse.Namespace, info: dict, device: str, config: dict, results: list[dict]
) -> int:
    """Print the table and write the JSON; non-zero when a variant failed."""
    print(table(results), flush=True)
    path = json_path(args, info)
    if path is not None:
        report = {
            "device": device,
            "target": args.target,
            "jax_version": info["jax_version"],
            "xla_flags": info["xla_flags"],
            "model": args.model,
            "preset": args.preset,
            "config": config,
            "variants": results,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", flush=True)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
