"""Models shared by the tests and the benchmarks (``benchmarks/``), written as a NumPyro
user would write them. Every global is a ``numpyro.param`` unless it says otherwise."""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints


def gmm_diag(x, K=3):
    """Diagonal Gaussian mixture."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    scales = numpyro.param("scales", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)


def gmm_full(x, K=3):
    """Full-covariance Gaussian mixture."""
    d = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, d)))
    covs = numpyro.param(
        "covs", jnp.broadcast_to(jnp.eye(d), (K, d, d)), constraint=constraints.positive_definite
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.MultivariateNormal(locs[z], covariance_matrix=covs[z]), obs=x)


def gmm_dirichlet(x, K=3, alpha=2.0):
    """Diagonal Gaussian mixture whose weights have a Dirichlet(alpha) prior (MAP)."""
    weights = numpyro.sample("weights", dist.Dirichlet(alpha * jnp.ones(K)))
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    scales = numpyro.param("scales", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)
