"""Synthetic Gaussian mixtures, the starting values every method shares, and the
held-out log-likelihood every method is scored by (NumPy, float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from threadpoolctl import threadpool_limits

from numpyro_onlineem import kmeans_pp


def make_mixture(seed, d, k):
    """A random full-covariance mixture: Dirichlet(5) weights, means
    ``N(0, 9 / sqrt(D))`` per coordinate, covariances ``diag(s) C diag(s)`` with scales
    ``s ~ U(0.7, 1.4)`` and a correlation matrix ``C`` with a rank-2 factor part
    (correlations up to about 0.7).

    Returns
    -------
    weights : ndarray, shape (K,)
    means : ndarray, shape (K, D)
    chols : ndarray, shape (K, D, D)
        Cholesky factors of the covariances.
    """
    rng = np.random.default_rng([seed, d, k])
    weights = rng.dirichlet(np.full(k, 5.0))
    means = rng.normal(scale=3.0 / d**0.25, size=(k, d))
    chols = np.empty((k, d, d))
    for j in range(k):
        load = rng.uniform(-0.6, 0.6, size=(d, min(2, d - 1)))
        corr = load @ load.T + np.diag(1.0 - np.sum(load**2, 1))
        s = rng.uniform(0.7, 1.4, size=d)
        chols[j] = np.linalg.cholesky(s[:, None] * corr * s[None, :])
    return weights, means, chols


def sample_mixture(rng, mixture, n):
    """``n`` points of the mixture, float32, shape (n, D)."""
    weights, means, chols = mixture
    z = rng.choice(len(weights), size=n, p=weights)
    eps = rng.normal(size=(n, means.shape[1]))
    x = means[z]
    for j in range(len(weights)):  # one component at a time: no (n, D, D) gather
        x[z == j] += eps[z == j] @ chols[j].T
    return x.astype(np.float32)


def initial_params(seed, x0, k, covariance):
    """Starting values shared by every method: k-means++ centres of ``x0`` (with Lloyd
    iterations), uniform weights, and for every component the pooled within-cluster
    variance of ``x0`` (a diagonal covariance).

    Returns
    -------
    dict
        ``{"weights": (K,), "locs": (K, D)}`` and ``"scales": (K, D)`` (diag) or
        ``"covs": (K, D, D)`` (full), float32.
    """
    locs = np.asarray(kmeans_pp(jax.random.PRNGKey(seed), jnp.asarray(x0), k))
    nearest = np.argmin(((x0[:, None, :] - locs[None]) ** 2).sum(-1), 1)
    var = np.maximum(((x0 - locs[nearest]) ** 2).mean(0), 1e-3)
    params = {"weights": np.full(k, 1.0 / k), "locs": locs}
    if covariance == "diag":
        params["scales"] = np.broadcast_to(np.sqrt(var), locs.shape)
    else:
        params["covs"] = np.broadcast_to(np.diag(var), (k,) + var.shape * 2)
    return {name: np.asarray(v, np.float32) for name, v in params.items()}


def mean_loglik(params, x):
    """Held-out mean log-likelihood per point (NumPy, float64) of any method's
    ``{"weights", "locs", "scales" | "covs"}``. A covariance that is not positive
    definite once in float64 (a collapsed component, its smallest eigenvalue at
    ``REG_COVAR`` of `benchmarks.handwritten`, rounded) gives its component zero density.

    It runs with one BLAS thread: OpenBLAS's worker threads spin for a while after each
    call, and would take CPU from the timed segment that follows."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _mean_loglik(params, x)


def _mean_loglik(params, x):
    x = np.asarray(x, np.float64)
    p = {name: np.asarray(v, np.float64) for name, v in params.items()}
    weights, locs = p["weights"], p["locs"]
    d = x.shape[1]
    if "scales" in p:
        prec = p["scales"] ** -2
        maha = (x * x) @ prec.T - 2.0 * x @ (locs * prec).T + np.sum(locs**2 * prec, 1)
        half_logdet = -0.5 * np.sum(np.log(prec), 1)
    else:
        maha = np.empty((len(x), len(weights)))
        half_logdet = np.empty(len(weights))
        for j, cov in enumerate(p["covs"]):
            try:
                chol = np.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                maha[:, j], half_logdet[j] = np.inf, 0.0
                continue
            prec_chol = scipy.linalg.solve_triangular(chol, np.eye(d), lower=True).T
            maha[:, j] = np.sum(((x - locs[j]) @ prec_chol) ** 2, 1)
            half_logdet[j] = np.sum(np.log(np.diag(chol)))
    logp = np.log(weights) - half_logdet - 0.5 * d * np.log(2 * np.pi) - 0.5 * maha
    return float(np.mean(scipy.special.logsumexp(logp, 1)))
