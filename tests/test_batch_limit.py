"""With step size 1 and the whole data set as every batch, online EM is batch EM: its
iterates must equal scikit-learn's GaussianMixture EM iterates from the same start."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import norm
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


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_float32_far_from_the_origin_equals_sklearn(rng, cov_type):
    # raw float32 moments of data 10^4 from the origin lose the variance (ulp 1e-3 at
    # 1e4, squared: 1e8 +- 10); moments about the init batch's mean keep it
    x = (_data(rng, n=2000, d=2) * 0.25 + 1e4).astype(np.float32)
    k, d = 3, 2
    # float64 starting means: given float32 ones, scikit-learn computes in float32 too
    means = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
    weights = np.full(k, 1 / k)
    covs = (
        np.full((k, d), 0.5) if cov_type == "diag" else np.broadcast_to(0.5 * np.eye(d), (k, d, d))
    )
    init = {"weights": weights, "locs": means}
    if cov_type == "diag":
        model, init["scales"] = gmm_diag, np.sqrt(covs)
    else:
        model, init["covs"] = gmm_full, covs
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    for _ in range(5):
        state, _ = em.update(state, x)
    params = em.get_params(state)
    assert params["locs"].dtype == np.float32
    gm = _sklearn_iterate(x.astype(np.float64), cov_type, weights, means, covs, 5)
    # float32 locations 1e4 from the origin are themselves only good to ~1e-3: that,
    # not the statistics, bounds the agreement
    np.testing.assert_allclose(params["weights"], gm.weights_, atol=5e-4)
    np.testing.assert_allclose(params["locs"], gm.means_, rtol=1e-6, atol=0)  # a few ulps
    cov = params["scales"] ** 2 if cov_type == "diag" else params["covs"]
    np.testing.assert_allclose(cov, gm.covariances_, rtol=2e-3, atol=2e-4)


def _shared_location_model(x, K=2):
    """One location and scale per component, shared by every coordinate: a cell pools
    coordinates, so the statistics' reference point is one number."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros(K))
    scales = numpyro.param("scales", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        fn = dist.Normal(locs[z][..., None], scales[z][..., None])
        numpyro.sample("obs", fn.expand(z.shape + x.shape[-1:]).to_event(1), obs=x)


def test_shared_location_far_from_the_origin_equals_numpy_em(rng):
    z = rng.integers(0, 2, 1000)
    x = np.array([0.0, 3.0])[z][:, None] + np.array([0.5, 1.0])[z][:, None] * rng.normal(
        size=(1000, 4)
    )
    x = (x + 1e3).astype(np.float32)
    init = {
        "weights": np.array([0.5, 0.5]),
        "locs": np.array([999.0, 1004.0]),
        "scales": np.ones(2),
    }
    em = OnlineEM(_shared_location_model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    for _ in range(5):
        state, _ = em.update(state, x)
    w, mu, sd, x64 = init["weights"], init["locs"], init["scales"], x.astype(np.float64)
    for _ in range(5):  # NumPy batch EM, float64
        logp = np.log(w) + norm.logpdf(x64[:, :, None], mu, sd).sum(1)
        r = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        n = r.sum(0)
        mu = (r * x64.sum(1, keepdims=True)).sum(0) / (4 * n)
        sd = np.sqrt((r * ((x64[:, :, None] - mu) ** 2).sum(1)).sum(0) / (4 * n) + 1e-6)
        w = n / len(x)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, atol=1e-4)
    np.testing.assert_allclose(params["locs"], mu, rtol=1e-6, atol=0)  # a few float32 ulps
    np.testing.assert_allclose(params["scales"], sd, rtol=1e-3)


@pytest.mark.parametrize("cov_type", ["diag", "full"])
def test_damped_batch_em_reaches_the_same_fixed_point(rng, x64, cov_type):
    # the damped M step keeps EM's fixed points: batch EM damped by 100 pseudo-points
    # (here a quarter of the data) converges where scikit-learn's does
    x = _data(rng)
    k = 3
    means = x[rng.choice(len(x), k, replace=False)]
    model = gmm_diag if cov_type == "diag" else gmm_full
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model", damping=100.0)
    state = em.init(jax.random.PRNGKey(0), x, init_params={"locs": means})
    losses = []
    for _ in range(400):
        state, loss = em.update(state, x)
        losses.append(float(loss))
    # a generalized EM step: the marginal likelihood never decreases
    assert np.all(np.diff(losses) < 1e-9)
    params = em.get_params(state)
    covs = params["scales"] ** 2 if cov_type == "diag" else params["covs"]
    gm = _sklearn_iterate(x, cov_type, params["weights"], params["locs"], covs, 1)
    np.testing.assert_allclose(params["weights"], gm.weights_, atol=1e-6)
    np.testing.assert_allclose(params["locs"], gm.means_, atol=1e-6)
    np.testing.assert_allclose(covs, gm.covariances_, atol=1e-6)


def test_effective_points_of_the_running_statistics(rng):
    # during burn-in the statistics are the exact running mean: every point weighs 1/n
    x = rng.normal(size=(500, 2)).astype(np.float32)
    em = OnlineEM(gmm_diag, burn_in=10_000)
    state = em.init(jax.random.PRNGKey(0), x[:100])
    for i in range(1, 5):
        state, _ = em.update(state, x[100 * i : 100 * (i + 1)])
    np.testing.assert_allclose(1.0 / state.weight_sq, 500.0, rtol=1e-5)
    # a constant step c per batch: sum of squares of the geometric weights
    c, b, n0 = 0.3, 50, 100
    em = OnlineEM(gmm_diag, step_size=c, step_points=b, burn_in=0)
    state = em.init(jax.random.PRNGKey(0), x[:n0])
    expected = 1.0 / n0
    for i in range(4):
        state, _ = em.update(state, x[n0 + b * i : n0 + b * (i + 1)])
        expected = (1 - c) ** 2 * expected + c**2 / b
    np.testing.assert_allclose(state.weight_sq, expected, rtol=1e-5)
