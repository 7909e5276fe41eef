"""Check `hetjax.simulate_step` against the real H200 step times of GPU_FINDINGS.md.

    JAX_PLATFORMS=cpu python benchmarks/calibrate.py [--json PATH]

Rebuilds the three programs measured on a real H200 (shared/notes/GPU_FINDINGS.md:
the reference MLP, 16 x 4096 bf16 layers on 16,384 rows, `value_and_grad` + SGD, one
jit), compiles each for the H200 target and prints measured, predicted and their ratio.
Nothing runs on a GPU here: the predictions come from the compiled schedule.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import run  # noqa: E402

import hetjax  # noqa: E402

# Median step times on one real H200 with jax 0.11.2, from shared/notes/GPU_FINDINGS.md
# (2026-11-27), each variant in a fresh process. The run.py variant and candidate that
# rebuild each program are named beside it.
H200_MEASURED_MS = {
    "plain": ("plain", "jax.value_and_grad", 42.4),
    "per-layer remat": ("jax_remat_nothing", "policy=nothing_saveable", 55.7),
    "JAX names offload": ("jax_offload", "save_and_offload_only_these_names", 111.0),
}


def compiled_programs(target: str = "h200") -> dict[str, Any]:
    """The three measured programs, compiled for `target`, by name."""
    model = run.load_model("mlp", "reference")
    params, batch = jax.eval_shape(model.init)
    state = (params, jax.eval_shape(model.optimizer.init, params))
    programs = {}
    for name, (variant, detail, _) in H200_MEASURED_MS.items():
        (loss,) = [f for d, f in run.VARIANTS[variant](model, target).items() if detail in d]
        step = jax.jit(run.train_step(loss, model.optimizer))
        programs[name] = hetjax.compile_for(step, *state, batch, target=target)
    return programs


def main(argv: list[str] | None = None) -> int:
    """Print measured, predicted and their ratio; `--json PATH` writes them too."""
    argv = sys.argv[1:] if argv is None else argv
    rows = {}
    for name, program in compiled_programs().items():
        rows[name] = {
            "measured_ms": H200_MEASURED_MS[name][2],
            "predicted_ms": hetjax.simulate_step(program, target="h200").step_ms,
        }
    print(f"compiled for the H200 with jax {jax.__version__}; measured on a real H200, jax 0.11.2")
    print("| program | measured ms | predicted ms | ratio |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        measured, predicted = row["measured_ms"], row["predicted_ms"]
        print(f"| {name} | {measured:.1f} | {predicted:.1f} | {predicted / measured:.2f} |")
    if argv[:1] == ["--json"]:
        Path(argv[1]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
