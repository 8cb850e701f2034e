"""Families beyond the diagonal Gaussian, each against an independent reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import poisson
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM


def poisson_mixture(x, K=3):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Poisson(rates[z]).to_event(1), obs=x)


def bernoulli_mixture(x, K=3):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    probs = numpyro.param(
        "probs", 0.5 * jnp.ones((K, x.shape[-1])), constraint=constraints.unit_interval
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Bernoulli(probs[z]).to_event(1), obs=x)


def exponential_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Exponential(rates[z]), obs=x)


def _numpy_em(x, weights, params, log_lik, m_step, num_iters):
    """Plain batch EM: responsibilities in log space, then the family's M step."""
    for _ in range(num_iters):
        logp = np.log(weights)[None] + log_lik(x, params)
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        weights = resp.mean(0)
        params = m_step(x, resp)
    return weights, params


def _poisson_ll(x, rates):
    return poisson.logpmf(x[:, None, :], rates[None]).sum(-1)


def _bernoulli_ll(x, probs):
    return (x[:, None] * np.log(probs[None]) + (1 - x[:, None]) * np.log1p(-probs[None])).sum(-1)


def _rate_m_step(x, resp):
    return resp.T @ x / resp.sum(0)[:, None]


def _match(est, ref):
    """Permutation of the rows of ``est`` closest to ``ref``."""
    import itertools

    best = min(
        itertools.permutations(range(len(ref))),
        key=lambda p: np.abs(est[list(p)] - ref).sum(),
    )
    return est[list(best)], list(best)


def _poisson_data(rng, n):
    rates = np.array([[1.0, 8.0, 3.0, 0.5], [6.0, 1.0, 9.0, 4.0], [12.0, 5.0, 0.5, 10.0]])
    z = rng.choice(3, n, p=[0.3, 0.3, 0.4])
    return rng.poisson(rates[z]).astype(np.float32), rates


def _bernoulli_data(rng, n):
    probs = np.array(
        [
            [0.9, 0.9, 0.1, 0.1, 0.8, 0.2],
            [0.1, 0.8, 0.9, 0.2, 0.1, 0.9],
            [0.5, 0.1, 0.2, 0.9, 0.9, 0.9],
        ]
    )
    z = rng.choice(3, n, p=[0.4, 0.35, 0.25])
    return (rng.uniform(size=(n, 6)) < probs[z]).astype(np.float32), probs


@pytest.mark.parametrize(
    "model,data,log_lik,name",
    [
        (poisson_mixture, _poisson_data, _poisson_ll, "rates"),
        (bernoulli_mixture, _bernoulli_data, _bernoulli_ll, "probs"),
    ],
)
def test_batch_limit_iterates_equal_numpy_em(rng, x64, model, data, log_lik, name):
    x, truth = data(rng, 2000)
    init = {
        "weights": np.array([0.2, 0.3, 0.5]),
        name: np.clip(truth + 0.2, 0.05, 0.95) if name == "probs" else truth + 1.0,
    }
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    for _ in range(5):
        state, _ = em.update(state, x)
    w, p = _numpy_em(x, init["weights"], init[name], log_lik, _rate_m_step, 5)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(params[name], p, rtol=1e-6)


@pytest.mark.parametrize(
    "model,data,log_lik,name",
    [
        (poisson_mixture, _poisson_data, _poisson_ll, "rates"),
        (bernoulli_mixture, _bernoulli_data, _bernoulli_ll, "probs"),
    ],
)
def test_one_pass_recovers_parameters(rng, model, data, log_lik, name):
    x, truth = data(rng, 30_000)
    em = OnlineEM(model)  # k-means++ over the first batch breaks the symmetric start
    result = em.run(jax.random.PRNGKey(1), x, batch_size=100, progress_bar=False)
    est, perm = _match(np.asarray(result.params[name]), truth)
    # the reference: batch EM to convergence from the online estimate
    w_ref, p_ref = _numpy_em(
        x.astype(np.float64),
        np.asarray(result.params["weights"], np.float64)[perm],
        est.astype(np.float64),
        log_lik,
        _rate_m_step,
        200,
    )
    np.testing.assert_allclose(est, p_ref, atol=0.05 * np.abs(truth).max())
    np.testing.assert_allclose(np.asarray(result.params["weights"])[perm], w_ref, atol=0.02)
    np.testing.assert_allclose(est, truth, atol=0.1 * np.abs(truth).max())


def test_exponential_batch_limit_equals_closed_form(rng, x64):
    z = rng.choice(2, 3000, p=[0.4, 0.6])
    x = rng.exponential(1.0 / np.array([0.5, 4.0])[z])
    init = {"weights": np.array([0.5, 0.5]), "rates": np.array([0.3, 2.0])}
    em = OnlineEM(exponential_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    w, r = init["weights"], init["rates"]
    for _ in range(4):
        state, _ = em.update(state, x)
        logp = np.log(w) + np.log(r) - np.outer(x, r)
        resp = np.exp(logp - logsumexp(logp, 1, keepdims=True))
        w, r = resp.mean(0), resp.sum(0) / (resp * x[:, None]).sum(0)
    np.testing.assert_allclose(em.get_params(state)["rates"], r, rtol=1e-6)
    np.testing.assert_allclose(em.get_params(state)["weights"], w, rtol=1e-6)


def gmm_tied(x, K=3):
    d = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, d)))
    cov = numpyro.param("cov", jnp.eye(d), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.MultivariateNormal(locs[z], covariance_matrix=cov), obs=x)


def test_tied_covariance_equals_sklearn_tied(rng, x64):
    centers = rng.normal(scale=3.0, size=(3, 3))
    z = rng.integers(0, 3, 600)
    x = centers[z] + rng.normal(size=(600, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0.3], [0, 0, 0.7]])
    means = x[rng.choice(600, 3, replace=False)]
    weights = np.array([0.3, 0.3, 0.4])
    cov = np.eye(3) * 2.0
    em = OnlineEM(gmm_tied, step_size=1.0, burn_in=0, init="model")
    state = em.init(
        jax.random.PRNGKey(0), x, init_params={"locs": means, "cov": cov, "weights": weights}
    )
    for _ in range(4):
        state, _ = em.update(state, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(
            3,
            covariance_type="tied",
            weights_init=weights,
            means_init=means,
            precisions_init=np.linalg.inv(cov),
            max_iter=4,
            tol=0.0,
        ).fit(x)
    params = em.get_params(state)
    np.testing.assert_allclose(params["locs"], gm.means_, atol=1e-6)
    np.testing.assert_allclose(params["cov"], gm.covariances_, atol=1e-6)


@pytest.mark.parametrize("form", ["scale_tril", "precision_matrix"])
def test_covariance_forms_agree(rng, x64, form):
    """The M step returns the covariance in the form the model passed it."""
    x = rng.normal(size=(300, 3)) * np.array([1.0, 2.0, 0.5]) + rng.integers(0, 2, (300, 1)) * 4

    def model(x, form=form):
        K, d = 2, x.shape[-1]
        locs = numpyro.param("locs", jnp.zeros((K, d)))
        constraint = {
            "scale_tril": constraints.lower_cholesky,
            "precision_matrix": constraints.positive_definite,
        }[form]
        mats = numpyro.param("mats", jnp.broadcast_to(jnp.eye(d), (K, d, d)), constraint=constraint)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            numpyro.sample("obs", dist.MultivariateNormal(locs[z], **{form: mats[z]}), obs=x)

    def reference(x):
        K, d = 2, x.shape[-1]
        locs = numpyro.param("locs", jnp.zeros((K, d)))
        covs = numpyro.param(
            "covs",
            jnp.broadcast_to(jnp.eye(d), (K, d, d)),
            constraint=constraints.positive_definite,
        )
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            numpyro.sample(
                "obs", dist.MultivariateNormal(locs[z], covariance_matrix=covs[z]), obs=x
            )

    locs = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    states = []
    for m in (model, reference):
        em = OnlineEM(m, step_size=1.0, burn_in=0, init="model")
        state = em.init(jax.random.PRNGKey(0), x, init_params={"locs": locs})
        for _ in range(3):
            state, _ = em.update(state, x)
        states.append(em.get_params(state))
    covs = states[1]["covs"]
    if form == "scale_tril":
        np.testing.assert_allclose(states[0]["mats"], np.linalg.cholesky(covs), atol=1e-8)
    else:
        np.testing.assert_allclose(states[0]["mats"], np.linalg.inv(covs), atol=1e-8)
    np.testing.assert_allclose(states[0]["locs"], states[1]["locs"], atol=1e-8)
