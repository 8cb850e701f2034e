"""The mixture contraction of the E step against funsor's general one."""

import jax
import numpy as np
import pytest

import numpyro_onlineem.estep.enumerate as enumerate_
from numpyro_onlineem import OnlineEM
from numpyro_onlineem.model import enum_trace
from tests.models import gmm_dirichlet, gmm_full


@pytest.mark.parametrize("model", [gmm_dirichlet, gmm_full])
def test_mixture_contraction_equals_funsor(rng, x64, model, monkeypatch):
    x = rng.normal(size=(40, 3)) + 3.0 * rng.integers(0, 3, (40, 1))
    state = OnlineEM(model).init(jax.random.PRNGKey(0), x)
    sites = state.plan.model_sites
    trace = enum_trace(model, sites, state.params, (x,), {})
    fast = enumerate_.e_step(trace, sites, state.shifts)
    log_probs, layout = enumerate_.local_log_probs(trace, sites, state.shifts)
    assert enumerate_._mixture_axes(log_probs, layout, sites) is not None
    monkeypatch.setattr(enumerate_, "_mixture_axes", lambda *args: None)
    general = enumerate_.e_step(trace, sites, state.shifts)
    np.testing.assert_allclose(fast.loglik, general.loglik, rtol=1e-12)
    for name in sites.local:
        np.testing.assert_allclose(fast.weights[name], general.weights[name], atol=1e-12)
    np.testing.assert_allclose(fast.weights["z"].sum(0), 1.0, rtol=1e-12)
