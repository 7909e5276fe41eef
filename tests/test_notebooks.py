"""The notebooks under notebooks/ execute top to bottom without an error.

Each notebook runs with nbclient in a fresh kernel, in memory: the committed files, and
their outputs, are not rewritten. The working directory is notebooks/, as in Jupyter.

The kernel must be the interpreter running pytest (a fresh `pip install -e ".[dev]"` venv
in CI), not whatever `python3` kernel a user or system Jupyter folder happens to define.
So the `kernel_env` fixture writes a `python3` kernelspec for `sys.executable` into a temp
folder with ipykernel's `write_kernel_spec` and puts that folder first on `JUPYTER_PATH`,
which jupyter_client searches before the user, environment and system folders.

The committed files carry their outputs, charts included, as a reader opens them: they are
executed the same way (`MPLBACKEND=module://matplotlib_inline.backend_inline`,
`JAX_PLATFORMS=cpu`) and written back, and must print no path of the machine that ran them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_benchmarks.ipynb"]
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python3` resolves to a kernel running this interpreter, with a headless backend."""
    data = tmp_path / "jupyter"
    kernelspec.write_kernel_spec(data / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    from jupyter_client.kernelspec import KernelSpecManager

    argv = KernelSpecManager().get_kernel_spec("python3").argv
    assert argv[0] == sys.executable, argv


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name: str, kernel_env: None) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError on the first cell that errors
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors


# An absolute path in a printed output: a POSIX or home-relative path of some machine.
MACHINE_PATH = re.compile(r"(?<![\w.])(/(home|work|tmp|Users|root|opt|var|mnt)/|~/)")


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_have_charts_and_no_machine_paths(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} holds no chart"
    texts = [o.get("text", "") for o in outputs]
    texts += [o.get("data", {}).get("text/plain", "") for o in outputs]
    texts += ["\n".join(o.get("traceback", [])) for o in outputs]
    for text in texts:
        text = "".join(text) if isinstance(text, list) else text
        assert str(NOTEBOOKS.parent) not in text, text
        assert not MACHINE_PATH.search(text), text
