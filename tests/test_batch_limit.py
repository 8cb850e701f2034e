"""With step size 1 and the whole data set as every batch, online EM is batch EM: its
iterates must equal scikit-learn's GaussianMixture EM iterates from the same start."""

import warnings

import jax
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag, gmm_full


def _data(rng, n=400, d=3, k=3):
    centers = rng.normal(scale=4.0, size=(k, d))
    z = rng.integers(0, k, n)
    return centers[z] + rng.normal(size=(n, d)) * rng.uniform(0.5, 1.5, size=(k, d))[z]


def _sklearn_iterate(x, cov_type, weights, means, covs, num_iters):
    precisions = np.linalg.inv(covs) if cov_type == "full" else 1.0 / covs
    gm = GaussianMixture(
        n_components=len(weights),
        covariance_type=cov_type,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions,
        max_iter=num_iters,
        tol=0.0,
        reg_covar=1e-6,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(x)
    return gm


@pytest.mark.parametrize("cov_type", ["diag", "full"])
@pytest.mark.parametrize("num_iters", [1, 3, 10])
def test_iterates_equal_sklearn(rng, x64, cov_type, num_iters):
    x = _data(rng)
    k, d = 3, x.shape[1]
    means = x[rng.choice(len(x), k, replace=False)]
    weights = np.array([0.2, 0.3, 0.5])
    if cov_type == "diag":
        covs = rng.uniform(0.5, 2.0, size=(k, d))
        model, init = gmm_diag, {"weights": weights, "locs": means, "scales": np.sqrt(covs)}
    else:
        a = rng.normal(size=(k, d, d))
        covs = a @ a.transpose(0, 2, 1) / d + np.eye(d)
        model, init = gmm_full, {"weights": weights, "locs": means, "covs": covs}
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    for _ in range(num_iters):
        state, _ = em.update(state, x)
    params = em.get_params(state)
    gm = _sklearn_iterate(x, cov_type, weights, means, covs, num_iters)
    np.testing.assert_allclose(params["weights"], gm.weights_, atol=1e-4)
    np.testing.assert_allclose(params["locs"], gm.means_, atol=1e-4)
    if cov_type == "diag":
        np.testing.assert_allclose(params["scales"] ** 2, gm.covariances_, atol=1e-4)
    else:
        np.testing.assert_allclose(params["covs"], gm.covariances_, atol=1e-4)
