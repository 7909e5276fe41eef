import pytest

from hetjax import _plan


@pytest.fixture(autouse=True)
def fresh_warnings():
    """hetjax warns once per process; give each test its own 'once'."""
    _plan._warned.clear()
    yield
