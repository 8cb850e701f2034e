"""Test configuration: CPU only, fixed seeds, warnings are errors (pyproject)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every XLA:CPU executable
    holds memory mappings of its own; the suite compiles thousands of programs, and in
    one process they passed the kernel's 65,530 mappings per process
    (``vm.max_map_count``), where XLA's next compile crashed (a segmentation fault at
    test 233)."""
    yield
    jax.clear_caches()


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
