"""Weighted least squares for a Normal location linear in an estimated site
(``mstep/linear.py``), against NumPy batch EM and closed-form regressions."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.optimize import least_squares
from scipy.special import logsumexp
from scipy.stats import norm

from numpyro_onlineem import OnlineEM

K, D = 3, 3
TRUE_BETA = np.array([[0.0, 2.0, -1.0], [5.0, -1.0, 1.0], [-5.0, 0.5, 2.0]])
TRUE_SIGMA = np.array([0.5, 1.0, 0.3])
START = {"weights": np.ones(K) / K, "beta": TRUE_BETA + 0.4, "sigma": np.ones(K)}


def _data(rng, n):
    X = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, D - 1))], 1)
    z = rng.choice(K, n, p=[0.3, 0.3, 0.4])
    y = np.sum(X * TRUE_BETA[z], -1) + TRUE_SIGMA[z] * rng.normal(size=n)
    return X, y


def mixreg(X, y, form="sum", shared_sigma=False, prior_loc=None, prior_scale=1.0, known_sigma=None):
    """Cappé & Moulines's mixture of linear regressions, as a user writes it."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    if prior_loc is None:
        beta = numpyro.param("beta", jnp.zeros((K, D)))
    else:
        prior = dist.Normal(prior_loc, prior_scale).expand([K, D]).to_event(2)
        beta = numpyro.sample("beta", prior)
    if known_sigma is None:
        sigma = numpyro.param(
            "sigma", jnp.ones(() if shared_sigma else K), constraint=constraints.positive
        )
    else:
        sigma = known_sigma * jnp.ones(K)
    with numpyro.plate("data", X.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        if form == "sum":
            loc = jnp.sum(X * beta[z], -1)
        else:
            loc = jnp.einsum("nd,...nd->...n", X, beta[z])
        scale = sigma[z] if jnp.ndim(sigma) else sigma
        numpyro.sample("y", dist.Normal(loc, scale), obs=y)


def numpy_em(X, y, weights, beta, sigma, num_iters, prior=None, shared=False, known=None):
    """Batch EM of a mixture of linear regressions: responsibilities, weighted least
    squares per component (the posterior mode under a Normal(m0, s0) prior), then the
    noise from the residuals of the new coefficients. Yields every iterate."""
    beta, sigma = beta.copy(), np.broadcast_to(sigma, (K,)).astype(float)
    if known is not None:
        sigma = np.full(K, known)
    for _ in range(num_iters):
        logp = np.log(weights) + norm.logpdf(y[:, None], X @ beta.T, sigma)
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        weights = resp.mean(0)
        for k in range(K):
            w = resp[:, k] / sigma[k] ** 2
            lhs, rhs = X.T @ (w[:, None] * X), X.T @ (w * y)
            if prior is not None:
                lhs, rhs = lhs + np.eye(D) / prior[1] ** 2, rhs + prior[0] / prior[1] ** 2
            beta[k] = np.linalg.solve(lhs, rhs)
        sq = (y[:, None] - X @ beta.T) ** 2
        if known is None and shared:
            sigma = np.full(K, np.sqrt(np.sum(resp * sq) / len(y) + 1e-6))
        elif known is None:
            sigma = np.sqrt(np.sum(resp * sq, 0) / resp.sum(0) + 1e-6)
        yield weights, beta.copy(), sigma.copy()


def _mix_loglik(X, y, weights, beta, sigma):
    logp = np.log(weights) + norm.logpdf(y[:, None], X @ np.asarray(beta).T, sigma)
    return logsumexp(logp, axis=1).mean()


def _full_batch(model_kwargs, X, y, init, num_iters):
    em = OnlineEM(mixreg, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), X, y, init_params=init, **model_kwargs)
    for _ in range(num_iters):
        state, _ = em.update(state, X, y, **model_kwargs)
        yield em, state


@pytest.mark.parametrize("form", ["sum", "einsum"])
def test_mixture_of_regressions_equals_numpy_batch_em(rng, x64, form):
    X, y = _data(rng, 3000)
    runs = _full_batch({"form": form}, X, y, START, 8)
    reference = numpy_em(X, y, *START.values(), 8)
    for (em, state), (weights, beta, sigma) in zip(runs, reference, strict=True):
        p = em.get_params(state)
        np.testing.assert_allclose(p["weights"], weights, rtol=1e-8)
        np.testing.assert_allclose(p["beta"], beta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(p["sigma"], sigma, rtol=1e-8)
    paths = em.mstep_paths(state)
    assert paths["beta"].startswith("closed form: weighted least squares, Normal loc of site 'y'")
    assert "linear in 'beta' (3 blocks of 3 coefficients)" in paths["beta"]
    assert paths["sigma"].startswith("closed form: Normal scale of site 'y', from the residuals")


def test_one_pass_of_a_stream_reaches_the_batch_optimum(rng):
    """float32, Robbins-Monro steps, batches of 256: one pass ends within 0.01 nats per
    point of the batch EM optimum (NumPy, float64)."""
    X, y = _data(rng, 20_000)
    *_, best = numpy_em(X, y, *START.values(), 100)
    best_ll = _mix_loglik(X, y, *best)
    Xf, yf = X.astype(np.float32), y.astype(np.float32)
    stream = ((Xf[i : i + 256], yf[i : i + 256]) for i in range(0, len(y), 256))
    em = OnlineEM(mixreg)
    start = {k: np.asarray(v, np.float32) for k, v in START.items()}
    result = em.run(jax.random.PRNGKey(0), stream, progress_bar=False, init_params=start)
    p = {k: np.asarray(v, float) for k, v in result.params.items()}
    gap = best_ll - _mix_loglik(X, y, p["weights"], p["beta"], p["sigma"])
    assert gap < 0.01, gap
    np.testing.assert_allclose(p["beta"], best[1], atol=0.05)


def test_conjugate_prior_gives_the_bayesian_wls_mode(rng, x64):
    """A Normal(1, 0.2) prior on a global beta: every iterate is NumPy's batch EM with the
    Bayesian weighted least squares, pulled well away from the maximum likelihood."""
    X, y = _data(rng, 300)
    prior = (1.0, 0.2)
    init = START
    runs = _full_batch({"prior_loc": prior[0], "prior_scale": prior[1]}, X, y, init, 6)
    reference = numpy_em(X, y, *init.values(), 6, prior=prior)
    for (em, state), (weights, beta, sigma) in zip(runs, reference, strict=True):
        p = em.get_params(state)
        np.testing.assert_allclose(p["beta"], beta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(p["sigma"], sigma, rtol=1e-8)
        np.testing.assert_allclose(p["weights"], weights, rtol=1e-8)
    assert "posterior mode under its Normal prior" in em.mstep_paths(state)["beta"]
    *_, (_, beta_ml, _) = numpy_em(X, y, *init.values(), 6)
    assert np.max(np.abs(beta - beta_ml)) > 0.05  # the prior matters


@pytest.mark.parametrize("noise", ["shared", "known"])
def test_shared_and_known_noise(rng, x64, noise):
    X, y = _data(rng, 3000)
    if noise == "shared":
        kwargs, init = {"shared_sigma": True}, {**START, "sigma": np.array(1.0)}
        reference = numpy_em(X, y, *START.values(), 6, shared=True)
    else:
        kwargs, init = {"known_sigma": 0.7}, {k: v for k, v in START.items() if k != "sigma"}
        reference = numpy_em(X, y, *START.values(), 6, known=0.7)
    runs = _full_batch(kwargs, X, y, init, 6)
    for (em, state), (weights, beta, sigma) in zip(runs, reference, strict=True):
        p = em.get_params(state)
        np.testing.assert_allclose(p["weights"], weights, rtol=1e-8)
        np.testing.assert_allclose(p["beta"], beta, rtol=1e-8, atol=1e-10)
        if noise == "shared":
            np.testing.assert_allclose(p["sigma"], sigma[0], rtol=1e-8)
    assert em.mstep_paths(state)["beta"].startswith("closed form: weighted least squares")


def test_plain_regression_without_mixture(rng, x64):
    """No enumerated site: one update is ordinary least squares and the residual noise;
    with D = 1, a scalar slope beside a constant offset."""
    n = 500
    X = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, 2))], 1)
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=n)

    def regression(X, y):
        beta = numpyro.param("beta", jnp.zeros(X.shape[-1]))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)

    em = OnlineEM(regression, step_size=1.0, burn_in=0, init="model")
    state, _ = em.update(em.init(jax.random.PRNGKey(0), X, y), X, y)
    ols = np.linalg.lstsq(X, y, rcond=None)[0]
    p = em.get_params(state)
    np.testing.assert_allclose(p["beta"], ols, rtol=1e-9)
    np.testing.assert_allclose(p["sigma"], np.sqrt(np.mean((y - X @ ols) ** 2) + 1e-6), rtol=1e-9)
    assert "(3 coefficients)" in em.mstep_paths(state)["beta"]

    x = rng.normal(size=n)
    t = 2.0 + 1.5 * x + 0.3 * rng.normal(size=n)

    def slope_model(x, t):
        slope = numpyro.param("slope", 0.0)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("t", dist.Normal(2.0 + slope * x, 0.3), obs=t)

    em = OnlineEM(slope_model, step_size=1.0, burn_in=0, init="model")
    state, _ = em.update(em.init(jax.random.PRNGKey(0), x, t), x, t)
    np.testing.assert_allclose(em.get_params(state)["slope"], x @ (t - 2.0) / (x @ x), rtol=1e-9)
    assert em.mstep_paths(state)["slope"].startswith("closed form: weighted least squares")


def test_nonlinear_and_shared_locations_take_the_numerical_path(rng, x64):
    """``tanh(X @ beta)`` is not linear, ``X @ beta + offset`` combines two sites: both
    go to the numerical M step, and the nonlinear one fits scipy's least squares."""
    n = 800
    X = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, 2))], 1)
    y = 2.0 * np.tanh(X @ np.array([0.3, 1.0, -0.5])) + 0.2 * rng.normal(size=n)

    def nonlinear(X, y):
        beta = numpyro.param("beta", jnp.full(X.shape[-1], 0.1))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(2.0 * jnp.tanh(X @ beta), sigma), obs=y)

    def two_sites(X, y):
        beta = numpyro.param("beta", jnp.zeros(X.shape[-1]))
        offset = numpyro.param("offset", 0.0)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ beta + offset, 1.0), obs=y)

    em = OnlineEM(two_sites, init="model")
    paths = em.mstep_paths(em.init(jax.random.PRNGKey(0), X, y))
    assert paths["beta"].startswith("numerical") and paths["offset"].startswith("numerical")

    em = OnlineEM(nonlinear, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), X, y)
    assert em.mstep_paths(state)["beta"].startswith("numerical: Newton")
    for _ in range(30):
        state, _ = em.update(state, X, y)
    ref = least_squares(lambda b: 2.0 * np.tanh(X @ b) - y, np.full(3, 0.1), xtol=1e-14).x
    np.testing.assert_allclose(em.get_params(state)["beta"], ref, rtol=1e-6)


def test_run_cuts_a_tuple_of_arrays_like_a_generator_of_its_batches(rng):
    n = 2_000
    X = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, 2))], 1).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=n)).astype(np.float32)

    def regression(X, y):
        beta = numpyro.param("beta", jnp.zeros(X.shape[-1]))
        sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)

    em = OnlineEM(regression)
    key = jax.random.PRNGKey(0)
    cut = em.run(key, (X, y), batch_size=100, progress_bar=False)
    batches = ((X[i : i + 100], y[i : i + 100]) for i in range(0, n, 100))
    given = em.run(key, batches, progress_bar=False)
    for name in ("beta", "sigma"):
        np.testing.assert_array_equal(cut.params[name], given.params[name])
    # one pass of the stream ends at ordinary least squares on all of it
    ols = np.linalg.lstsq(X.astype(float), y.astype(float), rcond=None)[0]
    np.testing.assert_allclose(cut.params["beta"], ols, atol=0.02)
    with pytest.raises(ValueError, match=r"lengths \[2000, 1999\]"):
        em.run(key, (X, y[:-1]), batch_size=100, progress_bar=False)
