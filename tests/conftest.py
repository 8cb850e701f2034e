"""Test configuration: CPU only, fixed seeds, warnings are errors (pyproject)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture
def x64():
    """Run a test in float64 (``jax_enable_x64``), restoring the default afterwards."""
    with jax.enable_x64(True):
        yield
