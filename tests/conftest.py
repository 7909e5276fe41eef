import os

import jax
import pytest

from hetjax import _plan

# The suite checks numerics on CPU, and GPU memory by compiling for GPU targets
# (tests/test_compiled.py). Where there is no GPU, the CUDA plugin registers its compile-only
# targets only when JAX starts with JAX_PLATFORMS=cpu. Set JAX_PLATFORMS to run elsewhere.
# jax is imported already (pytest reads hetjax.HetjaxWarning from pyproject.toml), but no
# backend has started: the config update still decides; the variable is for subprocesses.
if "JAX_PLATFORMS" not in os.environ:
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")


@pytest.fixture(autouse=True)
def fresh_warnings():
    """hetjax warns once per process; give each test its own 'once'."""
    _plan._warned.clear()
    yield
