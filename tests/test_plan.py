"""The M-step choice per site (``OnlineEM(mstep=...)``), against NumPy batch EM."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from numpyro_onlineem import OnlineEM, UnsupportedModelError
from tests.models import gmm_diag, gmm_full


def _data(rng, n=600):
    centers = np.array([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    scales = np.array([[0.5, 1.0], [1.0, 0.7], [1.5, 0.5]])
    z = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    return centers[z] + scales[z] * rng.normal(size=(n, 2)), centers, scales


def _numpy_em(x, weights, locs, scales, num_iters, learn_weights=True, learn_scales=True):
    """Batch EM of a diagonal Gaussian mixture, with some parameters held fixed."""
    for _ in range(num_iters):
        logp = np.log(weights) + norm.logpdf(x[:, None], locs[None], scales[None]).sum(-1)
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        n = resp.sum(0)
        locs = resp.T @ x / n[:, None]
        if learn_scales:
            scales = np.sqrt(resp.T @ x**2 / n[:, None] - locs**2 + 1e-6)
        if learn_weights:
            weights = n / len(x)
    return weights, locs, scales


def _batch_em(model, x, init, num_iters, **options):
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model", **options)
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    for _ in range(num_iters):
        state, _ = em.update(state, x)
    return em, state


def test_fixed_weights_stay_and_others_follow_em_with_known_weights(rng, x64):
    x, centers, scales = _data(rng)
    init = {"weights": np.array([0.5, 0.3, 0.2]), "locs": centers + 0.5, "scales": scales + 0.3}
    em, state = _batch_em(gmm_diag, x, init, 4, mstep={"weights": "fixed"})
    params = em.get_params(state)
    w, locs, sc = _numpy_em(x, *init.values(), 4, learn_weights=False)
    np.testing.assert_array_equal(params["weights"], init["weights"])
    np.testing.assert_allclose(params["locs"], locs, rtol=1e-8)
    np.testing.assert_allclose(params["scales"], sc, rtol=1e-8)
    assert em.mstep_paths(state)["weights"] == "fixed at its initial value"
    assert em.mstep_paths(state)["locs"].startswith("closed form")


def _log_scale_model(x, K=3):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    log_scales = numpyro.param("log_scales", jnp.zeros((K, x.shape[-1])))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], jnp.exp(log_scales[z])).to_event(1), obs=x)


def test_fixed_site_may_enter_through_a_transformation(rng, x64):
    x, centers, scales = _data(rng)
    init = {"weights": np.full(3, 1 / 3), "locs": centers - 0.4, "log_scales": np.log(scales)}
    with pytest.raises(UnsupportedModelError, match="log_scales"):
        OnlineEM(_log_scale_model, init="model", mstep={"log_scales": "closed_form"}).init(
            jax.random.PRNGKey(0), x, init_params=init
        )
    em, state = _batch_em(_log_scale_model, x, init, 3, mstep={"log_scales": "fixed"})
    params = em.get_params(state)
    w, locs, _ = _numpy_em(x, init["weights"], init["locs"], scales, 3, learn_scales=False)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-8)
    np.testing.assert_allclose(params["locs"], locs, rtol=1e-8)
    np.testing.assert_allclose(params["log_scales"], init["log_scales"])


def test_fixed_covariances_give_em_with_known_covariances(rng, x64):
    x, centers, scales = _data(rng)
    covs = np.stack([np.diag(s**2) + 0.1 * (1 - np.eye(2)) for s in scales])
    init = {"weights": np.full(3, 1 / 3), "locs": centers + 0.3, "covs": covs}
    em, state = _batch_em(gmm_full, x, init, 3, mstep={"covs": "fixed"})
    weights, locs = init["weights"], init["locs"]
    for _ in range(3):
        logp = np.log(weights) + np.stack(
            [multivariate_normal(m, c).logpdf(x) for m, c in zip(locs, covs, strict=True)], 1
        )
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        weights, locs = resp.mean(0), resp.T @ x / resp.sum(0)[:, None]
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], weights, rtol=1e-8)
    np.testing.assert_allclose(params["locs"], locs, rtol=1e-8)
    np.testing.assert_allclose(params["covs"], covs)


def _tied_mvn_model(x, covs):
    loc = numpyro.param("loc", jnp.zeros(x.shape[-1]))
    weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.MultivariateNormal(loc, covariance_matrix=covs[z]), obs=x)


def test_location_shared_across_constant_covariances_is_reported(rng):
    # the closed form would need precision-weighted means; it must not run unweighted
    x = rng.normal(size=(50, 2)).astype(np.float32)
    covs = jnp.stack([jnp.eye(2), 4.0 * jnp.eye(2)])
    em = OnlineEM(_tied_mvn_model)
    with pytest.raises(UnsupportedModelError, match="ties one location across"):
        em.init(jax.random.PRNGKey(0), x, covs)


def test_mstep_choices_are_checked(rng):
    with pytest.raises(ValueError, match=r"mstep\['locs'\] must be one of"):
        OnlineEM(gmm_diag, mstep={"locs": "newton"})
    x = rng.normal(size=(30, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"mstep=\.\.\.\) names \['loc'\]"):
        OnlineEM(gmm_diag, mstep={"loc": "fixed"}).init(jax.random.PRNGKey(0), x)
