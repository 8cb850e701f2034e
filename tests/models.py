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


def student_t_mixture(x, K=2):
    """Mixture of Student-t distributions: no closed-form M step for any of the
    components' parameters (the degrees of freedom least of all)."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.linspace(-1.0, 1.0, K))
    scales = numpyro.param("scales", jnp.ones(K), constraint=constraints.positive)
    df = numpyro.param("df", 5.0 * jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.StudentT(df[z], locs[z], scales[z]), obs=x)


def logistic_mixture(X, y, K=2):
    """Mixture of logistic regressions (``X``: ``(batch, D)`` with an intercept column):
    every coefficient enters through ``X @ beta[z]`` and a logit."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    beta = numpyro.param("beta", jnp.linspace(-1.0, 1.0, K)[:, None] * jnp.ones(X.shape[-1]))
    with numpyro.plate("data", X.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("y", dist.Bernoulli(logits=jnp.sum(X * beta[z], -1)), obs=y)


def gamma_mixture(x, K=3):
    """Mixture of Gamma distributions: shapes (``concentration``) and ``rate`` per
    component."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    concentration = numpyro.param(
        "concentration", 2.0 * jnp.ones(K), constraint=constraints.positive
    )
    rate = numpyro.param("rate", jnp.logspace(-1.0, 1.0, K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Gamma(concentration[z], rate[z]), obs=x)
