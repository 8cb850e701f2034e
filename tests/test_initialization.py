"""The data-driven initialisation rule: placeholders are replaced, deliberate values kept."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from sklearn.cluster import KMeans

from numpyro_onlineem import OnlineEM, kmeans_pp
from tests.models import gmm_diag


def _blobs(rng, n=600):
    centers = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    return (centers[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))).astype(np.float32), centers


def test_kmeans_pp_matches_sklearn_inertia(rng):
    x, _ = _blobs(rng)
    ours = np.asarray(kmeans_pp(jax.random.PRNGKey(0), x, 3))
    ref = KMeans(3, n_init=3, random_state=0).fit(x)
    inertia = ((x[:, None] - ours[None]) ** 2).sum(-1).min(1).sum()
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-3)


def test_placeholder_locations_are_initialised_from_data(rng):
    x, centers = _blobs(rng)
    state = OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x)
    locs = np.asarray(state.params["locs"])
    assert np.linalg.norm(locs[:, None] - centers[None], axis=-1).min(0).max() < 0.5
    np.testing.assert_array_equal(state.params["scales"], np.ones((3, 2)))  # not a location


@pytest.mark.parametrize("mode,changed", [("auto", False), ("kmeans++", True)])
def test_deliberate_values_are_kept_unless_forced(rng, mode, changed):
    x, _ = _blobs(rng)

    def model(x, K=3):
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

    state = OnlineEM(model, init=mode).init(jax.random.PRNGKey(0), x)
    assert (not np.allclose(state.params["locs"], [[1, 1], [2, 2], [3, 3]])) == changed


@pytest.mark.parametrize("mode", ["auto", "kmeans++", "model"])
def test_init_params_are_never_overridden(rng, mode):
    x, _ = _blobs(rng)
    zeros = np.zeros((3, 2))
    state = OnlineEM(gmm_diag, init=mode).init(
        jax.random.PRNGKey(0), x, init_params={"locs": zeros}
    )
    np.testing.assert_array_equal(state.params["locs"], zeros)


def test_model_mode_keeps_placeholders(rng):
    x, _ = _blobs(rng)
    state = OnlineEM(gmm_diag, init="model").init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(state.params["locs"], np.zeros((3, 2)))
