"""Log-densities by matrix products equal NumPyro's own ``log_prob``."""

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from numpyro_onlineem.estep.logprob import WHITEN_MAX_DIM, fast_log_prob

K, B, D = 4, 9, 5


def _cases(rng):
    pos = lambda *shape: jnp.asarray(rng.uniform(0.3, 3.0, shape))
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape))
    x = normal(B, D)
    counts = jnp.asarray(rng.poisson(3.0, (B, D)).astype(float))
    bits = jnp.asarray((rng.uniform(size=(B, D)) < 0.4).astype(float))
    a = rng.normal(size=(K, 1, D, D))
    cov = jnp.asarray(a @ np.swapaxes(a, -1, -2) + np.eye(D))
    return {
        "normal indexed": (dist.Normal(normal(K, 1, D), pos(K, 1, D)).to_event(1), x),
        "normal tied scale": (dist.Normal(normal(K, 1, D), pos(D)).to_event(1), x),
        "normal scalar scale": (dist.Normal(normal(K, 1, D), 0.7).to_event(1), x),
        "normal expanded": (dist.Normal(0.5, pos(D)).expand([K, 1, D]).to_event(1), x),
        "normal two event dims": (
            dist.Normal(normal(K, 1, 2, D), pos(K, 1, 2, D)).to_event(2),
            normal(B, 2, D),
        ),
        "poisson": (dist.Poisson(pos(K, 1, D)).to_event(1), counts),
        "bernoulli": (
            dist.Bernoulli(probs=jnp.asarray(rng.uniform(size=(K, 1, D)))).to_event(1),
            bits,
        ),
        "bernoulli at 0 and 1": (
            dist.Bernoulli(probs=jnp.asarray([[[0.0, 1.0, 0.5, 0.2, 1.0]]])).to_event(1),
            bits,
        ),
        "exponential": (dist.Exponential(pos(K, 1, D)).to_event(1), jnp.abs(x)),
        "mvn": (dist.MultivariateNormal(normal(K, 1, D), covariance_matrix=cov), x),
        "mvn shared covariance": (
            dist.MultivariateNormal(normal(K, 1, D), covariance_matrix=cov[0, 0]),
            x,
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "normal indexed",
        "normal tied scale",
        "normal scalar scale",
        "normal expanded",
        "normal two event dims",
        "poisson",
        "bernoulli",
        "bernoulli at 0 and 1",
        "exponential",
        "mvn",
        "mvn shared covariance",
    ],
)
def test_equals_numpyro_log_prob(x64, rng, name):
    fn, value = _cases(rng)[name]
    fast = fast_log_prob(fn, value)
    assert fast is not None
    expected = fn.log_prob(value)
    assert fast.shape == expected.shape
    np.testing.assert_allclose(fast, expected, rtol=1e-10, atol=1e-10)


def test_float32_far_from_the_origin(rng):
    """Centring keeps float32 cancellation at the scale of the data's spread: data a
    thousand units from the origin, unit scales."""
    locs = 1000.0 + rng.normal(size=(K, 1, 64))
    x = (1000.0 + rng.normal(size=(B, 64))).astype(np.float32)
    fn = dist.Normal(jnp.asarray(locs, jnp.float32), 1.0).to_event(1)
    reference = dist.Normal(locs, 1.0).to_event(1).log_prob(x.astype(np.float64))
    np.testing.assert_allclose(fast_log_prob(fn, jnp.asarray(x)), reference, rtol=2e-5)


def test_other_sites_keep_their_own_log_prob(rng):
    x = jnp.asarray(rng.normal(size=(B,)))
    assert fast_log_prob(dist.Normal(jnp.zeros((K, 1)), 1.0), x) is None  # no event dims
    big = WHITEN_MAX_DIM + 1
    mvn = dist.MultivariateNormal(jnp.zeros((K, 1, big)), jnp.eye(big))
    assert fast_log_prob(mvn, jnp.zeros((B, big))) is None
    masked = dist.Normal(jnp.zeros((K, 1, D)), 1.0).mask(False).to_event(1)
    assert fast_log_prob(masked, jnp.zeros((B, D))) is None
    assert fast_log_prob(dist.Categorical(jnp.ones(K) / K), jnp.arange(K)) is None
