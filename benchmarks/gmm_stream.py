"""Streaming Gaussian mixtures: OnlineEM against its hand-written limit, SVI and sklearn.

One run, one table. For every case (dimension D, components K, covariance type) the
four methods see the same synthetic stream and start from the same parameters
(k-means++ centres of the first points, uniform weights, the pooled within-cluster
variance of those points):

* **OnlineEM**: ``em.run(key, x, batch_size=B, progress_bar=False)``.
* **JAX**: the same online EM math written by hand in plain JAX, one jitted
  ``lax.scan`` over the batches (responsibilities by logsumexp, running sufficient
  statistics with the same Robbins-Monro steps and burn-in, closed-form M step). It is
  the throughput OnlineEM can aim for ("our limit").
* **SVI**: NumPyro ``SVI`` with ``TraceEnum_ELBO`` on the same model (``z``
  enumerated), an empty guide (every global is a ``numpyro.param``) and Adam, one step
  per batch, in a jitted ``lax.scan``.
* **sklearn**: ``GaussianMixture`` batch EM on the whole stream, to convergence. Its
  held-out ``score`` is the batch optimum LL*.

Compile time is excluded (every compiled function is built before it is timed).
Held-out log-likelihoods are mean nats per point on a separate test sample.

Run ``python benchmarks/gmm_stream.py`` (about 20 minutes on 2 CPU cores), or a smoke
test: ``python benchmarks/gmm_stream.py --dims 2 --components 5 --num-points 5000 --quick``.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.linalg
import scipy.special
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions import constraints
from numpyro.infer import SVI, TraceEnum_ELBO
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM, kmeans_pp, robbins_monro

DEFAULT_POINTS = {2: 1_024_000, 64: 204_800, 256: 51_200}  # stream length per D
T0 = 2.0  # offset of the Robbins-Monro steps (OnlineEM's default)
REG_COVAR = 1e-6  # OnlineEM's and sklearn's default
MIN_COUNT = 1e-6  # OnlineEM's default


# ------------------------------------------------------------------------- models
def gmm_diag(x, K):
    """Diagonal Gaussian mixture; every global is a ``numpyro.param``."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    scales = numpyro.param("scales", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)


def gmm_full(x, K):
    """Full-covariance Gaussian mixture; every global is a ``numpyro.param``."""
    d = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, d)))
    covs = numpyro.param(
        "covs", jnp.broadcast_to(jnp.eye(d), (K, d, d)), constraint=constraints.positive_definite
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.MultivariateNormal(locs[z], covariance_matrix=covs[z]), obs=x)


MODELS = {"diag": gmm_diag, "full": gmm_full}


# --------------------------------------------------------------------------- data
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
    x = means[z] + np.einsum("nij,nj->ni", chols[z], eps)
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
    """Held-out mean log-likelihood per point, in NumPy float64, for any method's
    ``{"weights", "locs", "scales" | "covs"}``."""
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
            chol = np.linalg.cholesky(cov)
            y = scipy.linalg.solve_triangular(chol, (x - locs[j]).T, lower=True)
            maha[:, j] = np.sum(y * y, 0)
            half_logdet[j] = np.sum(np.log(np.diag(chol)))
    logp = np.log(weights) - half_logdet - 0.5 * d * np.log(2 * np.pi) - 0.5 * maha
    return float(np.mean(scipy.special.logsumexp(logp, 1)))


# --------------------------------------------------- online EM written in plain JAX
class JaxEMState(NamedTuple):
    """State of the hand-written online EM (the same recursion as OnlineEM).

    Attributes
    ----------
    params : dict
        ``weights (K,)``, ``locs (K, D)``, ``scales (K, D)`` or ``covs (K, D, D)``.
    stats : tuple
        Running per-point statistics ``n (K,)``, ``s1 (K, D)``, ``s2 (K, D)`` or
        ``(K, D, D)``.
    count : Array, int32
        Updates applied.
    seen : Array, float32
        Points seen (the init batch included).
    """

    params: dict
    stats: tuple
    count: jax.Array
    seen: jax.Array


def _component_logpdf(params, x):
    """``log N(x_b | mu_k, Sigma_k)``, shape (B, K), by matrix products."""
    locs = params["locs"]
    d = x.shape[-1]
    if "scales" in params:
        prec = params["scales"] ** -2
        maha = (x * x) @ prec.T - 2.0 * x @ (locs * prec).T + jnp.sum(locs**2 * prec, 1)
        half_logdet = -0.5 * jnp.sum(jnp.log(prec), 1)
    else:
        chol = jnp.linalg.cholesky(params["covs"])
        eye = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), chol.shape)
        prec_chol = jnp.swapaxes(jax.scipy.linalg.solve_triangular(chol, eye, lower=True), 1, 2)
        y = (
            jnp.einsum("bd,kde->kbe", x, prec_chol)
            - jnp.einsum("kd,kde->ke", locs, prec_chol)[:, None]
        )
        maha = jnp.sum(y * y, -1).T
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), 1)
    return -half_logdet - 0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * maha


def jax_e_step(params, x):
    """Per-point log-likelihood (B,) and the batch means of the expected statistics."""
    logp = jnp.log(params["weights"]) + _component_logpdf(params, x)
    loglik = jax.nn.logsumexp(logp, 1)
    resp = jnp.exp(logp - loglik[:, None])
    b = x.shape[0]
    s1 = resp.T @ x / b
    if "scales" in params:
        s2 = resp.T @ (x * x) / b
    else:
        s2 = jnp.einsum("bk,bd,be->kde", resp, x, x) / b
    return loglik, (resp.mean(0), s1, s2)


def jax_m_step(params, stats, batch_size):
    """Closed-form M step from per-point statistics; components whose expected count
    (statistics scaled by the batch size, as OnlineEM does) is below ``MIN_COUNT`` keep
    their values."""
    n, s1, s2 = stats
    keep = n * batch_size > MIN_COUNT
    safe_n = jnp.where(keep, n, 1.0)
    locs = s1 / safe_n[:, None]
    new = {"weights": n / jnp.sum(n), "locs": locs}
    if "scales" in params:
        var = jnp.maximum(s2 / safe_n[:, None] - locs**2, 0.0) + REG_COVAR
        new["scales"] = jnp.sqrt(var)
    else:
        cov = s2 / safe_n[:, None, None] - locs[:, :, None] * locs[:, None, :]
        cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2)) + REG_COVAR * jnp.eye(locs.shape[1])
        # as OnlineEM: a covariance that is not positive definite keeps its value
        pd = jnp.all(jnp.isfinite(jnp.linalg.cholesky(cov)), axis=(1, 2))
        new["covs"] = jnp.where(pd[:, None, None], cov, params["covs"])
    for name in ("locs", "scales", "covs"):
        if name in new:
            mask = keep.reshape((-1,) + (1,) * (new[name].ndim - 1))
            new[name] = jnp.where(mask, new[name], params[name])
    return new


def jax_init(params, x0):
    """State whose statistics are those of the init batch under ``params``."""
    params = {name: jnp.asarray(v) for name, v in params.items()}
    _, stats = jax_e_step(params, x0)
    return JaxEMState(params, stats, jnp.zeros((), jnp.int32), jnp.float32(x0.shape[0]))


def jax_update(kappa, burn_in, state, x):
    """One online EM update: the stochastic approximation of the statistics with
    ``(t + T0) ** -kappa`` steps, ``t`` the batches seen before (exact running mean
    during burn-in), then the M step (skipped during burn-in)."""
    loglik, batch = jax_e_step(state.params, x)
    b = x.shape[0]
    seen = state.seen + b
    in_burn_in = seen <= burn_in
    gamma = jnp.where(in_burn_in, b / seen, (state.seen / b + T0) ** -kappa)
    gamma = jnp.minimum(gamma, 1.0).astype(jnp.float32)
    stats = jax.tree.map(lambda s, new: s + gamma * (new - s), state.stats, batch)
    proposed = jax_m_step(state.params, stats, b)
    params = jax.tree.map(lambda new, old: jnp.where(in_burn_in, old, new), proposed, state.params)
    return JaxEMState(params, stats, state.count + 1, seen), -jnp.mean(loglik)


def jax_scan(kappa, burn_in, state, xs):
    """``jax_update`` over stacked batches ``xs`` of shape (num_batches, B, D)."""
    return jax.lax.scan(functools.partial(jax_update, kappa, burn_in), state, xs)


# ------------------------------------------------------------------------ helpers
def compiled(fn, *example_args):
    """``jax.jit(fn)`` compiled ahead of time for these arguments' shapes."""
    return jax.jit(fn).lower(*example_args).compile()


def timed(fn, *args):
    """``(result, seconds)`` of ``fn(*args)``, waiting for every output."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


class Trace(NamedTuple):
    """Held-out mean log-likelihood after every segment of the stream.

    Attributes
    ----------
    seconds : ndarray
        Cumulative training time at each evaluation (evaluation excluded); starts at 0.
    points : ndarray
        Points processed at each evaluation; starts at 0.
    loglik : ndarray
        Held-out mean log-likelihood per point at each evaluation.
    """

    seconds: np.ndarray
    points: np.ndarray
    loglik: np.ndarray

    def first_within(self, target):
        """Index of the first evaluation at or above ``target``, or ``None``."""
        hits = np.flatnonzero(self.loglik >= target)
        return int(hits[0]) if hits.size else None

    def loglik_at(self, seconds):
        """Held-out LL of the last evaluation made by ``seconds`` of training."""
        return float(self.loglik[np.searchsorted(self.seconds, seconds, side="right") - 1])


def traced_pass(advance, get_params, state, segments, x_test, stop_at=None):
    """Feed ``segments`` to ``advance(state, segment)``, timing every call and
    evaluating the held-out LL after each (untimed). Stops early once the LL reaches
    ``stop_at``.

    Returns
    -------
    state, Trace
    """
    seconds, points, loglik = [0.0], [0], [mean_loglik(get_params(state), x_test)]
    for segment in segments:
        state, dt = timed(advance, state, segment)
        seconds.append(seconds[-1] + dt)
        points.append(points[-1] + int(np.prod(segment.shape[:-1])))
        loglik.append(mean_loglik(get_params(state), x_test))
        if stop_at is not None and loglik[-1] >= stop_at:
            break
    return state, Trace(np.array(seconds), np.array(points), np.array(loglik))


# ------------------------------------------------------------------------ methods
def run_onlineem(case, kappa, x, segments, x_test, p0, target):
    """Throughput of one ``em.run`` over the whole stream, its held-out LL, the traced
    pass and, for full covariances, the passes needed to reach ``target``."""
    model = functools.partial(MODELS[case.covariance], K=case.k)
    if kappa is None:  # the library's defaults: schedule, Polyak averaging, burn-in
        em = OnlineEM(model, init="model")
    else:
        em = OnlineEM(model, step_size=robbins_monro(kappa, T0), init="model")
    key = jax.random.PRNGKey(case.seed)
    b = case.batch_size
    state0 = em.init(key, x[:b], init_params=p0)

    def run(state, data):
        return em.run(key, data, batch_size=b, progress_bar=False, init_state=state).state

    # Compile every chunk shape of the full run and of a segment: a full chunk, the tail.
    for data in (x, segments[0]):
        num_batches = len(data) // b
        for n in {min(num_batches, em.chunk_size) * b, (num_batches % em.chunk_size) * b}:
            if n:
                run(state0, data[:n])
    state, seconds = timed(run, state0, x)
    out = {
        "throughput": len(x) / seconds,
        "gap": case.ll_star - mean_loglik(em.get_params(state), x_test),
        "kappa": state0.plan.default_kappa if kappa is None else kappa,
        "burn_in": state0.plan.default_burn_in,
    }
    state, trace = traced_pass(run, em.get_params, state0, segments, x_test)
    out["trace"] = trace
    if case.covariance == "full":
        hit = trace.first_within(target)
        out["passes"] = (
            trace.points[hit] / len(x)
            if hit is not None
            else _more_passes(run, em.get_params, state, case, x_test, target)
        )
    return out


def _more_passes(run, get_params, state, case, x_test, target):
    """Passes OnlineEM needs to reach ``target`` when the first did not (``inf`` past
    the cap), each further pass over the stream in a new random order."""
    rng = np.random.default_rng(case.seed)
    for p in range(1, case.max_passes):
        order = rng.permutation(len(case.x)).reshape(case.segments.shape[:2])
        state, trace = traced_pass(run, get_params, state, case.x[order], x_test, stop_at=target)
        hit = trace.first_within(target)
        if hit is not None:
            return p + trace.points[hit] / len(case.x)
    return np.inf


def run_jax(case, kappa, burn_in, segments, x_test, p0):
    """The hand-written online EM over the same segments (no Polyak averaging)."""
    b = case.batch_size
    state0 = jax.jit(jax_init)(p0, jnp.asarray(case.x[:b]))
    stacked = jnp.asarray(segments).reshape((len(segments), -1, b, case.d))
    step = compiled(functools.partial(jax_scan, kappa, burn_in), state0, stacked[0])
    state, trace = traced_pass(
        lambda s, xs: step(s, xs)[0], lambda s: s.params, state0, stacked, x_test
    )
    return {
        "throughput": trace.points[-1] / trace.seconds[-1],
        "gap": case.ll_star - trace.loglik[-1],
        "trace": trace,
    }


def run_svi(case, segments, x_test, p0, lr):
    """NumPyro SVI (TraceEnum_ELBO, empty guide, Adam) over the same segments."""
    model = config_enumerate(functools.partial(MODELS[case.covariance], K=case.k))
    svi = SVI(
        model,
        lambda *args, **kwargs: None,
        numpyro.optim.Adam(lr),
        TraceEnum_ELBO(max_plate_nesting=1),
    )
    b = case.batch_size
    state0 = svi.init(jax.random.PRNGKey(case.seed), jnp.asarray(case.x[:b]), init_params=p0)
    stacked = jnp.asarray(segments).reshape((len(segments), -1, b, case.d))

    def scan(state, xs):
        return jax.lax.scan(lambda s, xb: svi.update(s, xb), state, xs)

    step = compiled(scan, state0, stacked[0])
    state, trace = traced_pass(
        lambda s, xs: step(s, xs)[0], svi.get_params, state0, stacked, x_test
    )
    return {
        "throughput": trace.points[-1] / trace.seconds[-1],
        "gap": case.ll_star - trace.loglik[-1],
        "trace": trace,
    }


def _sklearn_gmm(case, p0, **kwargs):
    weights = p0["weights"].astype(np.float64)
    if case.covariance == "diag":
        precisions = p0["scales"].astype(np.float64) ** -2
    else:
        precisions = np.linalg.inv(p0["covs"].astype(np.float64))
    return GaussianMixture(
        n_components=case.k,
        covariance_type=case.covariance,
        weights_init=weights / weights.sum(),
        means_init=p0["locs"].astype(np.float64),
        precisions_init=precisions,
        init_params="random_from_data",
        reg_covar=REG_COVAR,
        random_state=case.seed,
        **kwargs,
    )


def run_sklearn(case, x64, x_test, p0, tol, max_iter, gap_tol):
    """Batch EM to convergence (the optimum LL*), then its iterates one by one (warm
    start) until the held-out score is within ``gap_tol`` of LL*. The time to that
    iterate is the converged fit's time prorated by iterations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = _sklearn_gmm(case, p0, tol=tol, max_iter=max_iter)
        start = time.perf_counter()
        gm.fit(x64)
        seconds = time.perf_counter() - start
        ll_star = gm.score(x_test)
        stepper = _sklearn_gmm(case, p0, max_iter=1, warm_start=True)
        iters, first_gap = None, None
        for it in range(1, gm.n_iter_ + 1):
            stepper.fit(x64)
            gap = ll_star - stepper.score(x_test)
            first_gap = gap if it == 1 else first_gap
            if gap <= gap_tol:
                iters = it
                break
    return {
        "ll_star": ll_star,
        "n_iter": gm.n_iter_,
        "throughput": len(x64) * gm.n_iter_ / seconds,
        "gap": first_gap,
        "time_to_target": None if iters is None else seconds * iters / gm.n_iter_,
    }


# --------------------------------------------------------------------------- main
class Case(NamedTuple):
    """One benchmark case and its data (shared by every method)."""

    d: int
    k: int
    covariance: str
    seed: int
    batch_size: int
    max_passes: int
    x: np.ndarray  # (N, D) float32, the stream
    segments: np.ndarray  # (num_evals, points per evaluation, D)
    ll_star: float = np.nan


def stream_sizes(num_points, batch_size, evals):
    """``(N, batches per evaluation)`` with N a whole number of evaluation segments."""
    num_batches = num_points // batch_size
    per_eval = max(1, num_batches // evals)
    return num_batches // per_eval * per_eval * batch_size, per_eval


def fmt(value, spec=".3f"):
    """A table cell: ``n/a`` for a missing time, ``>`` for a pass count past the cap."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if np.isinf(value):
        return "cap"
    return format(value, spec)


COLUMNS = (
    "case",
    "kappa",
    "N",
    "OEM kpt/s",
    "JAX kpt/s",
    "OEM/JAX",
    "SVI kpt/s",
    "skl kpt/s",
    "skl it",
    "LL*",
    "gap OEM",
    "gap JAX",
    "gap SVI",
    "gap skl1",
    "t.02 OEM",
    "t.02 JAX",
    "t.02 SVI",
    "t.02 skl",
    "skl/OEM",
    "SVI gap@T",
    "OEM passes",
)


def table_row(case, kappa, oem, jx, svi, skl, gap_tol, first):
    """One markdown row; the SVI and sklearn cells are printed only on a case's first
    row (they do not depend on the step-size exponent)."""
    target = case.ll_star - gap_tol
    t_oem, t_jax, t_svi = (
        None if (i := r["trace"].first_within(target)) is None else r["trace"].seconds[i]
        for r in (oem, jx, svi)
    )
    ratio = None
    if t_oem is not None and skl["time_to_target"] is not None:
        ratio = skl["time_to_target"] / t_oem
    svi_at = case.ll_star - svi["trace"].loglik_at(oem["trace"].seconds[-1])
    cells = [
        f"D={case.d} K={case.k} {case.covariance}",
        f"{oem['kappa']:g}" + (" (default)" if kappa is None else ""),
        f"{len(case.x):,}",
        fmt(oem["throughput"] / 1e3, ".1f"),
        fmt(jx["throughput"] / 1e3, ".1f"),
        fmt(oem["throughput"] / jx["throughput"], ".2f"),
        fmt(svi["throughput"] / 1e3, ".1f") if first else "",
        fmt(skl["throughput"] / 1e3, ".1f") if first else "",
        str(skl["n_iter"]) if first else "",
        fmt(case.ll_star, ".2f"),
        fmt(oem["gap"]),
        fmt(jx["gap"]),
        fmt(svi["gap"]) if first else "",
        fmt(skl["gap"]) if first else "",
        fmt(t_oem, ".3g"),
        fmt(t_jax, ".3g"),
        fmt(t_svi, ".3g") if first else "",
        fmt(skl["time_to_target"], ".3g") if first else "",
        fmt(ratio, ".1f"),
        fmt(svi_at),
        fmt(oem.get("passes"), ".2f") if case.covariance == "full" else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def flat_cost(args):
    """Seconds of updates ``[w, 2w)`` and ``[late, late + w)`` of ``OnlineEM.run`` with
    tiny batches; each window is timed three times from the same state (the state is
    an immutable pytree), keeping the fastest."""
    d, k, b, w = args.flat_dim, args.flat_components, args.flat_batch, args.flat_window
    mixture = make_mixture(args.seed, d, k)
    x = sample_mixture(np.random.default_rng([args.seed, 1]), mixture, 8 * w * b)
    windows = x.reshape(8, w * b, d)
    p0 = initial_params(args.seed, x[: args.init_points], k, "diag")
    em = OnlineEM(functools.partial(gmm_diag, K=k), init="model")
    key = jax.random.PRNGKey(args.seed)

    def run(state, data):
        return em.run(key, data, batch_size=b, progress_bar=False, init_state=state).state

    state = run(em.init(key, x[:b], init_params=p0), windows[0])
    seconds = {}
    for i in range(1, args.flat_late // w + 1):
        if i in (1, args.flat_late // w):
            seconds[i * w] = min(timed(run, state, windows[i % 8])[1] for _ in range(3))
        state = run(state, windows[i % 8])
    early, late = seconds.values()
    return (
        f"Cost per update (OnlineEM.run, D={d}, K={k}, diag, batch {b}, fastest of 3): "
        f"updates {w:,}-{2 * w:,}: {early:.3f} s; updates {args.flat_late:,}-"
        f"{args.flat_late + w:,}: {late:.3f} s; ratio late/early {late / early:.2f}; "
        f"{early / w * 1e6:.0f} us per update."
    )


def main(args):
    if args.quick:
        args.evals, args.kappas, args.max_passes = 5, [], 2
        args.num_test, args.flat_window, args.flat_late = 2_000, 100, 1_000
    gap_tol = args.gap
    sizes = {
        d: stream_sizes(
            args.num_points or DEFAULT_POINTS.get(d, 51_200), args.batch_size, args.evals
        )
        for d in args.dims
    }
    header = [
        f"# GMM stream benchmark: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
        f"numpyro {numpyro.__version__}",
        f"# Batch size {args.batch_size}; N points per pass (by D): "
        + ", ".join(f"D={d}: {n:,}" for d, (n, _) in sizes.items())
        + f"; {args.num_test:,} held-out points; {args.evals} evaluations per pass.",
        "# kpt/s: thousands of points per second (compile excluded; sklearn: N * iterations"
        " / fit time). OEM = OnlineEM.run, JAX = same math hand-written in JAX,",
        f"# SVI = NumPyro SVI (TraceEnum_ELBO, Adam lr={args.svi_lr}), skl = sklearn"
        f" GaussianMixture (float64, tol={args.sklearn_tol}); skl it = its iterations.",
        "# LL*: held-out mean log-lik per point of the converged batch fit. gap X: LL* - LL"
        " after one pass (skl1: after one batch EM iteration).",
        f"# t.02 X: seconds until LL >= LL* - {gap_tol} (n/a: not within one pass);"
        " skl/OEM = t.02 skl / t.02 OEM (> 1: OnlineEM is faster).",
        "# SVI gap@T: LL* - LL of SVI after the time OnlineEM took for its pass. OEM passes:"
        f" passes OnlineEM needs to get within {gap_tol} (cap = {args.max_passes}).",
    ]
    print("\n".join(header), flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)
    for d in args.dims:
        for k in args.components:
            mixture = make_mixture(args.seed, d, k)
            n, per_eval = sizes[d]
            rng = np.random.default_rng([args.seed, d, k, 1])
            x = sample_mixture(rng, mixture, n)
            x_test = sample_mixture(rng, mixture, args.num_test)
            segments = x.reshape(n // (per_eval * args.batch_size), -1, d)
            for covariance in args.covariances:
                if covariance == "full" and d > args.full_max_dim:
                    continue
                case = Case(
                    d, k, covariance, args.seed, args.batch_size, args.max_passes, x, segments
                )
                p0 = initial_params(args.seed, x[: args.init_points], k, covariance)
                skl = run_sklearn(
                    case,
                    x.astype(np.float64),
                    x_test,
                    p0,
                    args.sklearn_tol,
                    args.sklearn_max_iter,
                    gap_tol,
                )
                case = case._replace(ll_star=skl["ll_star"])
                svi = run_svi(case, segments, x_test, p0, args.svi_lr)
                # first row: the library's defaults; full covariances: a sweep of kappa
                kappas = [None] + (args.kappas if covariance == "full" else [])
                for i, kappa in enumerate(kappas):
                    oem = run_onlineem(case, kappa, x, segments, x_test, p0, case.ll_star - gap_tol)
                    jx = run_jax(case, oem["kappa"], oem["burn_in"], segments, x_test, p0)
                    print(table_row(case, kappa, oem, jx, svi, skl, gap_tol, i == 0), flush=True)
    print()
    print(flat_cost(args))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def ints(text):
        return [int(v) for v in text.split(",")]

    def floats(text):
        return [float(v) for v in text.split(",")]

    parser.add_argument("--dims", type=ints, default=[2, 64, 256])
    parser.add_argument("--components", type=ints, default=[5, 20])
    parser.add_argument("--covariances", type=lambda s: s.split(","), default=["diag", "full"])
    parser.add_argument(
        "--full-max-dim", type=int, default=64, help="largest D with a full-covariance case"
    )
    parser.add_argument(
        "--num-points", type=int, default=None, help="stream length (default: by D, see header)"
    )
    parser.add_argument("--num-test", type=int, default=10_000, help="held-out points")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--init-points", type=int, default=1_000, help="points for k-means++")
    parser.add_argument("--evals", type=int, default=20, help="held-out evaluations per pass")
    parser.add_argument("--gap", type=float, default=0.02, help="target gap to LL*, nats/point")
    parser.add_argument(
        "--kappas",
        type=floats,
        default=[0.6, 0.8, 1.0],
        help="step exponents tried besides the default (full cases)",
    )
    parser.add_argument("--max-passes", type=int, default=5, help="cap on OnlineEM passes")
    parser.add_argument("--svi-lr", type=float, default=0.01, help="Adam step size of SVI")
    parser.add_argument("--sklearn-tol", type=float, default=1e-4)
    parser.add_argument("--sklearn-max-iter", type=int, default=500)
    parser.add_argument("--flat-dim", type=int, default=64)
    parser.add_argument("--flat-components", type=int, default=5)
    parser.add_argument("--flat-batch", type=int, default=8)
    parser.add_argument("--flat-window", type=int, default=1_000, help="updates per timing")
    parser.add_argument("--flat-late", type=int, default=100_000, help="first late update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 5 evaluations, defaults only, 2 passes"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
