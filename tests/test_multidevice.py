"""het_offload under SPMD sharding on 8 virtual CPU devices.

JAX fixes its device count when it starts, and this session has one CPU device. So
the cases in `multidevice_cases.py` run in a pytest subprocess of their own, started
with `XLA_FLAGS=--xla_force_host_platform_device_count=8` on the CPU platform.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CASES = TESTS / "multidevice_cases.py"


def test_on_eight_virtual_cpu_devices() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags)
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-m", "pytest", "-q", "-rfEX", "-p", "no:cacheprovider", str(CASES)]
    proc = subprocess.run(
        command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = proc.stdout.strip().splitlines()[-1]  # stderr may end with plugin logs
    assert re.search(r"\b\d{2,} passed", summary), output[-6000:]
    assert not re.search(r"\b(failed|errors?|skipped|xpassed)\b", summary), output[-6000:]
