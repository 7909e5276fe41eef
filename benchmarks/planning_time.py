"""How long hetjax takes to plan, beside one compile of the train step it plans for.

    JAX_PLATFORMS=cpu python benchmarks/planning_time.py [MODEL ...]

For each reference preset (default: mlp, cnn, gpt, gpt_scan), compiled for the H200 on
this machine: the wall time of one compile of the plain train step, then, for
`policy="auto"` without a budget and with a budget of 0.6 of plain's compiled peak, the
compiles the plan check made, the seconds it took, and the whole `hetjax.analyze` call
(tracing and planning included). Each plan starts with an empty compile cache.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import run  # noqa: E402

import hetjax  # noqa: E402
from hetjax import _check  # noqa: E402

TARGET = "h200"


def main(models: list[str]) -> None:
    print(f"jax {jax.__version__}, compiled for {TARGET} on {os.cpu_count()} CPU cores")
    print("| model | one step compile | plan | compiles | check | analyze |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in models:
        model = run.load_model(name, "reference")
        params, batch = jax.eval_shape(model.init)
        state = (params, jax.eval_shape(model.optimizer.init, params))
        start = time.perf_counter()
        step = jax.jit(run.train_step(model.loss, model.optimizer))
        hetjax.compile_for(step, *state, batch, target=TARGET)
        one = time.perf_counter() - start
        plain = hetjax.compiled_memory(jax.value_and_grad(model.loss), params, batch, target=TARGET)
        for label, budget in (("auto", None), ("auto@0.6", 0.6 * plain.peak_bytes)):
            _check._compiles.clear()  # each plan pays for its own compiles
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hetjax.HetjaxWarning)
                plan = hetjax.analyze(
                    model.loss, params, batch, device_budget=budget, target=TARGET
                ).plan
            total = time.perf_counter() - start
            print(
                f"| {name} | {one:.0f} s | {label} | {plan.check_compiles} | "
                f"{plan.check_seconds:.0f} s | {total:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or ["mlp", "cnn", "gpt", "gpt_scan"])
