"""The README's Python examples run as written, in order."""

import itertools
import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["grads"].shape == namespace["w"].shape
    assert float(namespace["value"]) > 0


def test_readme_results_table_is_the_committed_results():
    """The table of compiled results is the committed JSON of jax 0.11.2, rounded: temp,
    predicted step time and matmul flops, as ratios to plain's."""
    results = README.parent / "benchmarks" / "results" / "compiled"
    lines = README.read_text().split("| variant | mlp | cnn | gpt | gpt_scan |\n")[1].splitlines()
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[1:])
    rows = [line.strip("| ").split(" | ") for line in table]
    models = ["mlp", "cnn", "gpt", "gpt_scan"]
    runs = {}
    for model in models:
        report = json.loads((results / f"{model}_reference_h200_jax0.11.2.json").read_text())
        runs[model] = {v["name"]: v for v in report["variants"]}
    assert len(rows) >= 5
    for name, *cells in rows:
        for model, cell in zip(models, cells, strict=True):
            v, plain = runs[model][name], runs[model]["plain"]
            if name == "plain":
                expected = (
                    f"{v['temp_bytes'] / 2**20:.0f} MiB, {v['predicted_step_ms']:.0f} ms, "
                    f"{v['matmul_flops'] / 1e12:.1f} TF"
                )
            else:
                expected = ", ".join(
                    f"{v[key] / plain[key]:.2f}"
                    for key in ("temp_bytes", "predicted_step_ms", "matmul_flops")
                )
            assert cell == expected, (name, model)
