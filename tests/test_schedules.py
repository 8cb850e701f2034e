import numpy as np
import pytest

from numpyro_onlineem import constant, robbins_monro


def test_robbins_monro_values():
    sched = robbins_monro(kappa=0.7, t0=10.0)
    t = np.arange(5)
    np.testing.assert_allclose([float(sched(i)) for i in t], (t + 10.0) ** -0.7, rtol=1e-6)


@pytest.mark.parametrize("kappa", [0.5, 1.2, 0.0])
def test_robbins_monro_rejects_divergent_exponents(kappa):
    with pytest.raises(ValueError, match="kappa must lie in"):
        robbins_monro(kappa=kappa)


def test_constant():
    assert float(constant(0.3)(1000)) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        constant(1.5)
