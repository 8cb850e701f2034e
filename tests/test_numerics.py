"""Numerics: empty components stay valid, dtypes follow jax_enable_x64, and the E step
matches closed-form posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag, gmm_full


def test_component_without_responsibility_keeps_valid_state(rng):
    x = rng.normal(size=(2000, 2)).astype(np.float32)
    init = {
        "locs": np.array([[0.0, 0.0], [0.5, 0.5], [1e3, 1e3]]),
        "scales": np.ones((3, 2)),
        "weights": np.ones(3) / 3,
    }
    em = OnlineEM(gmm_diag, init="model", burn_in=0)
    state = em.init(jax.random.PRNGKey(0), x[:100], init_params=init)
    for i in range(1, 20):
        state, loss = em.update(state, x[100 * i : 100 * (i + 1)])
        assert np.isfinite(loss)
    p = em.get_params(state)
    np.testing.assert_array_equal(p["locs"][2], [1e3, 1e3])  # never saw data: kept
    np.testing.assert_array_equal(p["scales"][2], [1.0, 1.0])
    assert float(p["weights"][2]) < 1e-6
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(leaf))


def test_single_point_component_has_variance_floor(x64):
    """A component that owns one point gets variance reg_covar, never zero."""
    x = np.array([[0.0], [0.1], [-0.1], [50.0]])
    em = OnlineEM(gmm_diag, step_size=1.0, burn_in=0, init="model", reg_covar=1e-3)
    init = {
        "locs": np.array([[0.0], [50.0]]),
        "scales": np.ones((2, 1)),
        "weights": np.array([0.5, 0.5]),
    }
    state = em.init(jax.random.PRNGKey(0), x, 2, init_params=init)
    state, _ = em.update(state, x, 2)
    np.testing.assert_allclose(em.get_params(state)["scales"][1, 0] ** 2, 1e-3, rtol=1e-6)


def test_full_covariance_with_fewer_points_than_dims_stays_positive_definite(rng):
    x = rng.normal(size=(30, 20)).astype(np.float32)
    em = OnlineEM(gmm_full, burn_in=0, step_size=1.0, reg_covar=0.0)
    state = em.init(jax.random.PRNGKey(0), x, 3)
    state, loss = em.update(state, x, 3)
    covs = np.asarray(em.get_params(state)["covs"], np.float64)
    assert np.all(np.linalg.eigvalsh(covs) > 0)
    assert np.isfinite(loss)


def test_float32_by_default_and_float64_with_x64(rng):
    x = rng.normal(size=(50, 2))
    state = OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x)
    assert all(v.dtype == jnp.float32 for v in state.params.values())
    with jax.enable_x64(True):
        state = OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x)
        assert all(v.dtype == jnp.float64 for v in state.params.values())


def test_marginals_and_log_likelihood_match_closed_form(rng, x64):
    x = rng.normal(size=(40, 2)) * 2
    init = {
        "locs": np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, 2.0]]),
        "scales": np.array([[1.0, 0.5], [0.7, 1.2], [2.0, 1.0]]),
        "weights": np.array([0.2, 0.5, 0.3]),
    }
    em = OnlineEM(gmm_diag, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    logp = np.log(init["weights"]) + norm.logpdf(
        x[:, None], init["locs"][None], init["scales"][None]
    ).sum(-1)
    np.testing.assert_allclose(em.log_likelihood(state, x), logsumexp(logp, 1), rtol=1e-10)
    resp = np.exp(logp - logsumexp(logp, 1, keepdims=True))
    np.testing.assert_allclose(em.compute_marginals(state, x)["z"], resp, atol=1e-10)


def test_loss_is_negative_mean_log_likelihood_before_update(rng, x64):
    x = rng.normal(size=(30, 3))
    em = OnlineEM(gmm_full)
    state = em.init(jax.random.PRNGKey(0), x[:10])
    p = state.params
    logp = np.log(np.asarray(p["weights"])) + np.stack(
        [multivariate_normal(p["locs"][k], p["covs"][k]).logpdf(x[10:]) for k in range(3)], 1
    )
    _, loss = em.update(state, x[10:])
    np.testing.assert_allclose(loss, -logsumexp(logp, 1).mean(), rtol=1e-10)


def test_polyak_average_far_from_the_origin_keeps_moving(rng):
    """float32 locations 1e4 from the origin have a resolution of 1e-3: late increments
    of the Polyak average are smaller and were lost (the average froze at an early
    iterate, 0.057 from the same fit on centred data). Kahan's compensation keeps them:
    the two fits agree to the data's float32 resolution."""
    import functools

    d, k, n = 8, 3, 60_000
    centres = np.array([[0.0] * d, [3.0] * d, [-3.0] * d])
    z = rng.choice(k, n, p=[0.3, 0.3, 0.4])
    x = (centres[z] + rng.normal(size=(n, d))).astype(np.float32)
    fits = {}
    for offset in (0.0, 1e4):
        em = OnlineEM(functools.partial(gmm_diag, K=k))
        result = em.run(
            jax.random.PRNGKey(0), (x + offset).astype(np.float32), batch_size=20,
            progress_bar=False,
        )  # fmt: skip
        locs = np.asarray(result.params["locs"], np.float64) - offset
        fits[offset] = locs[np.argsort(locs[:, 0])]
    np.testing.assert_allclose(fits[1e4], fits[0.0], atol=2e-3)


def test_polyak_average_weighs_every_point_since_its_start_alike(rng):
    """The average of a closed-form site is the M step of the batches' statistics since
    the average began: for a Gaussian without latents, the sample mean and variance of
    those points exactly (numpy). The iterates' average underweighted the last window of
    the fast steps: it missed the sample mean by up to 0.004 and the standard deviations
    by up to 0.5 %."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    def gaussian(x):
        loc = numpyro.param("loc", jnp.zeros(x.shape[-1]))
        scale = numpyro.param("scale", jnp.ones(x.shape[-1]), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(loc, scale).to_event(1), obs=x)

    x = (rng.normal(size=(10_000, 4)) * [1.0, 2.0, 0.5, 1.0] + 3.0).astype(np.float32)
    em = OnlineEM(gaussian)
    state = em.init(jax.random.PRNGKey(0), x[:100])
    update = jax.jit(em.update)
    for i in range(100, len(x), 100):
        state, _ = update(state, x[i : i + 100])
    # the first batch to end past the default start (5 windows of 256 points) is the
    # 13th, x[1200:1300], counting the init batch's 100 points
    since = x[1_200:].astype(np.float64)
    params = em.get_params(state)
    np.testing.assert_allclose(params["loc"], since.mean(0), atol=2e-5)
    np.testing.assert_allclose(params["scale"], since.std(0), rtol=2e-4)
    # the last iterate rests on the last window only
    assert np.max(np.abs(np.asarray(state.params["loc"]) - since.mean(0))) > 5e-3
