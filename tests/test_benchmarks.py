"""The benchmark entry point runs end to end at the tiny preset and writes valid JSON.

Only plumbing and gradient agreement are checked: on CPU memory kinds do nothing and
timings mean nothing, so no figure is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
VARIANTS = [
    "plain",
    "jax_remat",
    "jax_offload",
    "hetjax_all",
    "hetjax_auto",
    "hetjax_auto@0.8",
    "hetjax_auto@0.6",
]
TOP_KEYS = {"device": str, "jax_version": str, "model": str, "preset": str, "config": dict}
INT_OR_NONE = (int, type(None))
FLOAT_OR_NONE = (float, type(None))
VARIANT_KEYS = {
    "name": str,
    "temp_bytes": INT_OR_NONE,
    "host_temp_bytes": INT_OR_NONE,
    "argument_bytes": INT_OR_NONE,
    "output_bytes": INT_OR_NONE,
    "peak_bytes": INT_OR_NONE,
    "step_ms": float,
    "step_ms_min": float,
    "grad_rel_err": float,
    "error": type(None),
}


def test_run_tiny_writes_schema(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    command = [sys.executable, str(RUN), "--preset", "tiny", "--steps", "2", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| variant |" in proc.stdout

    report = json.loads(out.read_text())
    for key, kind in TOP_KEYS.items():
        assert isinstance(report[key], kind), (key, report[key])
    assert report["model"] == "mlp" and report["preset"] == "tiny"
    assert [v["name"] for v in report["variants"]] == VARIANTS

    for v in report["variants"]:
        for key, kind in VARIANT_KEYS.items():
            assert key in v, (v["name"], key)
            assert isinstance(v[key], kind), (v["name"], key, v[key])
        assert isinstance(v["temp_bytes"], int), v
        assert v["grad_rel_err"] < 1e-2, v
    plain = report["variants"][0]
    assert plain["grad_rel_err"] == 0.0
