"""Streaming Gaussian mixtures: OnlineEM against its hand-written limit, SVI and sklearn.

One run, one table. For every case (dimension D, components K, covariance type) the
four methods see the same synthetic stream and start from the same parameters
(k-means++ centres of the first batch, uniform weights, and the pooled within-cluster
variance of that batch for every component):

* **OEM**: ``OnlineEM.run(key, x, batch_size=B, progress_bar=False)``; the first batch
  initialises (``init_params`` with ``init="model"``), the other N points update.
* **JAX**: the same online EM math written by hand in plain JAX, jitted ``lax.scan``
  over the batches: responsibilities by logsumexp, running sufficient statistics with
  the same Robbins-Monro steps, burn-in and Polyak averaging, closed-form M step. It is
  the throughput OnlineEM can aim for ("our limit").
* **SVI**: NumPyro ``SVI`` with ``TraceEnum_ELBO`` on the same model (``z``
  enumerated), an empty guide (every global is a ``numpyro.param``) and Adam, one step
  per batch, in a jitted ``lax.scan``.
* **skl**: scikit-learn ``GaussianMixture`` batch EM on the whole stream, run to
  convergence. Its held-out ``score`` is the batch optimum LL*.

Compile time is excluded: every compiled function runs once before it is timed.
Held-out log-likelihoods are mean nats per point on a separate test sample, computed
for every method by the same NumPy float64 code.

Run ``python benchmarks/gmm_stream.py`` (about 15 minutes on 2 CPU cores), or a smoke
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

# jaxlib 0.10.2 on the CPU can deadlock when two batched triangular solves run at once
# (each waits on the intra-op pool the other holds; seen in SVI's gradient on
# full-covariance mixtures, with 2 threads, in 4 of 5 runs). XLA's sequential thunk
# scheduler avoids it (0 of 5 runs, 200 updates each). It applies to every method alike.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

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
from threadpoolctl import threadpool_limits

from numpyro_onlineem import OnlineEM, kmeans_pp, robbins_monro
from numpyro_onlineem.schedules import DEFAULT_POLYAK_WINDOWS

DEFAULT_POINTS = {2: 256_000, 64: 102_400, 256: 51_200}  # stream length by D
OTHER_POINTS = 51_200  # stream length for a D not listed above
T0 = 2.0  # offset of the Robbins-Monro steps (OnlineEM's default)
REG_COVAR = 1e-6  # OnlineEM's and sklearn's default
MIN_COUNT = 1e-6  # OnlineEM's default
MIN_TIMED_SECONDS = 2.0  # short passes are timed again until they add up to this
MAX_REPEATS = 100


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
    ``REG_COVAR``, rounded) gives its component zero density.

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


# --------------------------------------------------- online EM written in plain JAX
class JaxEMState(NamedTuple):
    """State of the hand-written online EM (the same recursion as OnlineEM).

    Attributes
    ----------
    params : dict
        ``weights (K,)``, ``locs (K, D)``, ``scales (K, D)`` or ``covs (K, D, D)``.
    averaged : dict
        Polyak average of ``params`` (equal to them when averaging is off).
    stats : tuple
        Running per-point statistics ``n (K,)``, ``s1 (K, D)``, ``s2 (K, D)`` or
        ``(K, D, D)``.
    seen : Array, float32
        Points seen (the init batch included).
    weight_sq : Array, float32
        Sum of the squared weights of the points in the running statistics (1 / the
        effective number of points behind them).
    """

    params: dict
    averaged: dict
    stats: tuple
    seen: jax.Array
    weight_sq: jax.Array


class JaxEMConfig(NamedTuple):
    """Settings of the hand-written online EM: step exponent, burn-in (points), the
    point from which the Polyak average starts (``None``: no averaging), the points one
    step stands for, and the pseudo-points of the damped M step (0: plain)."""

    kappa: float
    burn_in: float
    polyak_start: float | None
    step_points: float = 256.0
    damping: float = 0.0


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


def jax_m_step(params, stats, batch_size, points=jnp.inf, damping=0.0):
    """Closed-form M step from per-point statistics. As in OnlineEM, a component whose
    expected count (statistics times the batch size) is below ``MIN_COUNT`` keeps its
    values, and so does a covariance that is not positive definite; with ``damping``
    > 0, each component moves toward its estimate by ``m / (m + damping)``, ``m`` its
    share of the ``points`` effective points (the location first, then the scale or
    covariance about the damped location)."""
    n, s1, s2 = stats
    keep = n * batch_size > MIN_COUNT
    safe_n = jnp.where(keep, n, 1.0)
    m = n * points
    rho = m / (m + damping) if damping > 0 else jnp.ones_like(n)

    def finish(name, value):
        mask = keep.reshape((-1,) + (1,) * (value.ndim - 1))
        value = jnp.where(mask, value, params[name])
        r = rho.reshape(mask.shape)
        return params[name] + r * (value - params[name])

    locs = finish("locs", s1 / safe_n[:, None])
    new = {"weights": n / jnp.sum(n), "locs": locs}
    if "scales" in params:
        var = s2 / safe_n[:, None] - 2 * locs * s1 / safe_n[:, None] + locs**2
        new["scales"] = finish("scales", jnp.sqrt(jnp.maximum(var, 0.0) + REG_COVAR))
    else:
        mean = s1 / safe_n[:, None]
        cov = s2 / safe_n[:, None, None] - locs[:, :, None] * mean[:, None, :]
        cov = cov - mean[:, :, None] * locs[:, None, :] + locs[:, :, None] * locs[:, None, :]
        cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2)) + REG_COVAR * jnp.eye(locs.shape[1])
        pd = jnp.all(jnp.isfinite(jnp.linalg.cholesky(cov)), axis=(1, 2))
        new["covs"] = finish("covs", jnp.where(pd[:, None, None], cov, params["covs"]))
    return new


def jax_init(params, x0):
    """State whose statistics are those of the init batch under ``params``."""
    params = {name: jnp.asarray(v) for name, v in params.items()}
    _, stats = jax_e_step(params, x0)
    n0 = jnp.float32(x0.shape[0])
    return JaxEMState(params, params, stats, n0, 1.0 / n0)


def jax_update(config, state, x):
    """One online EM update. Statistics move by ``gamma = (t + T0) ** -kappa``, ``t``
    the batches seen before (the init batch included), or by the exact running mean
    during burn-in; then the M step (skipped during burn-in) and the Polyak average,
    each iterate weighted by its batch's points."""
    loglik, batch = jax_e_step(state.params, x)
    b = x.shape[0]
    seen = state.seen + b
    in_burn_in = seen <= config.burn_in
    p = config.step_points
    step = 1.0 - (1.0 - (state.seen / p + T0) ** -config.kappa) ** (b / p)
    gamma = jnp.where(in_burn_in, b / seen, step)
    gamma = jnp.minimum(gamma, 1.0).astype(jnp.float32)
    stats = jax.tree.map(lambda s, new: s + gamma * (new - s), state.stats, batch)
    weight_sq = (1.0 - gamma) ** 2 * state.weight_sq + gamma**2 / b
    proposed = jax_m_step(state.params, stats, b, 1.0 / weight_sq, config.damping)
    params = jax.tree.map(lambda new, old: jnp.where(in_burn_in, old, new), proposed, state.params)
    if config.polyak_start is None:
        averaged = params
    else:
        start = config.polyak_start
        weight = jnp.minimum(jnp.where(seen > start, b / jnp.maximum(seen - start, 1.0), 1.0), 1)
        averaged = jax.tree.map(lambda a, p: a + weight * (p - a), state.averaged, params)
    return JaxEMState(params, averaged, stats, seen, weight_sq), -jnp.mean(loglik)


def jax_scan(config, state, xs):
    """``jax_update`` over stacked batches ``xs`` of shape (num_batches, B, D)."""
    return jax.lax.scan(functools.partial(jax_update, config), state, xs)


# ------------------------------------------------------------------------ helpers
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
        Training time at each evaluation: points processed over the method's measured
        throughput (the fastest timed pass), so that a trace's clock and its throughput
        column agree and millisecond segments add no timer jitter; starts at 0.
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

    def seconds_to(self, target):
        """Training seconds until the held-out LL first reaches ``target``, or ``None``."""
        hit = self.first_within(target)
        return None if hit is None else float(self.seconds[hit])

    def loglik_at(self, seconds):
        """Held-out LL of the last evaluation made by ``seconds`` of training."""
        return float(self.loglik[np.searchsorted(self.seconds, seconds, side="right") - 1])


def traced_pass(advance, get_params, state, segments, x_test, trace=None, stop_at=None):
    """Feed ``segments`` to ``advance(state, segment)``, evaluating the held-out LL
    after each, appending to ``trace`` (whose ``seconds`` are zeros until
    `online_result` fills them in). Stops early once the LL reaches ``stop_at``.

    Returns
    -------
    state, Trace
    """
    if trace is None:
        trace = Trace(
            np.zeros(1), np.zeros(1, int), np.array([mean_loglik(get_params(state), x_test)])
        )
    points, loglik = list(trace.points), list(trace.loglik)
    for segment in segments:
        if stop_at is not None and loglik[-1] >= stop_at:
            break
        state = jax.block_until_ready(advance(state, segment))
        points.append(points[-1] + int(np.prod(segment.shape[:-1])))
        loglik.append(mean_loglik(get_params(state), x_test))
    return state, Trace(np.zeros(len(points)), np.array(points), np.array(loglik))


class Case(NamedTuple):
    """One benchmark case and its data, shared by every method.

    Attributes
    ----------
    d, k : int
        Dimension and number of components.
    covariance : str
        ``"diag"`` or ``"full"``.
    x0 : ndarray, shape (B, D)
        The first batch: k-means++ and the initial statistics.
    x : ndarray, shape (N, D)
        The rest of the stream, ``N`` a whole number of evaluation segments.
    x_test : ndarray
        Held-out points.
    per_eval : int
        Batches between two held-out evaluations.
    p0 : dict
        Starting parameters of every method.
    ll_star : float
        Held-out LL of the converged batch fit.
    """

    d: int
    k: int
    covariance: str
    x0: np.ndarray
    x: np.ndarray
    x_test: np.ndarray
    per_eval: int
    p0: dict
    ll_star: float = np.nan

    @property
    def batch_size(self):
        return len(self.x0)

    def segments_of(self, x):
        """``x`` (N, D) cut into evaluation segments, shape (evals, points, D)."""
        return x.reshape(-1, self.per_eval * self.batch_size, self.d)

    def batches_of(self, x):
        """``x`` (N, D) cut into segments of batches, shape (evals, per_eval, B, D)."""
        return x.reshape(-1, self.per_eval, self.batch_size, self.d)


def online_result(case, run, state0, get_params, timed_items, reshape, passes):
    """Traced passes of an online method, and a timer of its full pass.

    ``run(state, item)`` advances the state over one item of the stream. The traced
    passes feed ``reshape(points)`` segment by segment: the stream in order, then
    (while the held-out LL is short of ``LL* - gap``) up to ``passes.max - 1`` more
    passes, each in a new random order. ``passes.gap`` is ``None`` for one pass only.
    The result's ``timer()`` times one pass over ``timed_items`` from ``state0`` (after
    a first call that compiles); `measure` calls it and fills in the throughput.
    """
    run(state0, reshape(case.x)[0])
    state, trace = traced_pass(run, get_params, state0, reshape(case.x), case.x_test)
    one_pass = trace.loglik[-1]
    if passes.gap is not None:
        target = case.ll_star - passes.gap
        rng = np.random.default_rng(0)
        for _ in range(passes.max - 1):
            if trace.first_within(target) is not None:
                break
            shuffled = reshape(case.x[rng.permutation(len(case.x))])
            state, trace = traced_pass(
                run, get_params, state, shuffled, case.x_test, trace, stop_at=target
            )
    hit = None if passes.gap is None else trace.first_within(case.ll_star - passes.gap)

    def timer():
        state, seconds = state0, 0.0
        for item in timed_items:
            state, dt = timed(run, state, item)
            seconds += dt
        return seconds

    return {
        "timer": timer,
        "num_points": len(case.x),
        "gap": case.ll_star - one_pass,
        "trace": trace,
        "passes": np.inf if hit is None else trace.points[hit] / len(case.x),
    }


def measure(results, repeats):
    """Fill in ``throughput`` (points per second of the fastest timed pass) and the
    traces' clocks of ``results`` from `online_result`. Their passes are timed in
    turn, round after round (OnlineEM and its hand-written twin see the same machine
    state), at least ``repeats`` rounds and until each method's passes add up to
    ``MIN_TIMED_SECONDS`` (at most ``MAX_REPEATS`` rounds)."""
    best = [np.inf] * len(results)
    spent = [0.0] * len(results)
    done = 0
    while done < repeats or (min(spent) < MIN_TIMED_SECONDS and done < MAX_REPEATS):
        for i, result in enumerate(results):
            seconds = result["timer"]()
            best[i], spent[i] = min(best[i], seconds), spent[i] + seconds
        done += 1
    for result, seconds in zip(results, best, strict=True):
        result["throughput"] = result["num_points"] / seconds
        trace = result["trace"]
        result["trace"] = trace._replace(seconds=trace.points * seconds / result["num_points"])


class Passes(NamedTuple):
    """How far the traced passes go: at most ``max`` passes, until the held-out LL is
    within ``gap`` of LL* (``gap=None``: one pass)."""

    max: int
    gap: float | None


# ------------------------------------------------------------------------ methods
def run_onlineem(case, kappa, passes):
    """OnlineEM with its defaults (``kappa=None``) or ``robbins_monro(kappa)`` steps.
    The timed pass is one ``em.run`` over the whole stream."""
    model = functools.partial(MODELS[case.covariance], K=case.k)
    options = {} if kappa is None else {"step_size": robbins_monro(kappa, T0)}
    # segments are whole chunks, so the full run and the traced pass share one compile
    em = OnlineEM(model, init="model", chunk_size=case.per_eval, **options)
    key = jax.random.PRNGKey(0)
    b = case.batch_size
    state0 = em.init(key, case.x0, init_params=case.p0)

    def run(state, data):
        return em.run(key, data, batch_size=b, progress_bar=False, init_state=state).state

    out = online_result(case, run, state0, em.get_params, [case.x], case.segments_of, passes)
    plan = state0.plan
    polyak = kappa is None and plan.default_polyak
    obs = next(sp for sp in plan.sites if sp.site == "obs")
    out["config"] = JaxEMConfig(
        plan.default_kappa if kappa is None else kappa,
        plan.default_burn_in,
        max(DEFAULT_POLYAK_WINDOWS * 256.0, plan.default_burn_in) if polyak else None,
        step_points=256.0,
        damping=obs.component_points if kappa is None else 0.0,
    )
    return out


def run_jax(case, config, passes):
    """The hand-written online EM over the same batches."""
    state0 = jax.jit(jax_init)(case.p0, jnp.asarray(case.x0))
    step = jax.jit(functools.partial(jax_scan, config))
    run = lambda s, xs: step(s, xs)[0]
    batches = lambda x: jnp.asarray(case.batches_of(x))
    return online_result(case, run, state0, lambda s: s.averaged, batches(case.x), batches, passes)


def run_svi(case, lr, passes):
    """NumPyro SVI (TraceEnum_ELBO, empty guide, Adam) over the same batches."""
    model = config_enumerate(functools.partial(MODELS[case.covariance], K=case.k))
    guide = lambda *args, **kwargs: None
    svi = SVI(model, guide, numpyro.optim.Adam(lr), TraceEnum_ELBO(max_plate_nesting=1))
    state0 = svi.init(jax.random.PRNGKey(0), jnp.asarray(case.x0), init_params=case.p0)

    @jax.jit
    def step(state, xs):
        return jax.lax.scan(lambda s, xb: svi.update(s, xb), state, xs)[0]

    batches = lambda x: jnp.asarray(case.batches_of(x))
    return online_result(case, step, state0, svi.get_params, batches(case.x), batches, passes)


def _sklearn_gmm(case, **kwargs):
    p0 = {name: v.astype(np.float64) for name, v in case.p0.items()}
    if case.covariance == "diag":
        precisions = p0["scales"] ** -2
    else:
        precisions = np.linalg.inv(p0["covs"])
    return GaussianMixture(
        n_components=case.k,
        covariance_type=case.covariance,
        weights_init=p0["weights"] / p0["weights"].sum(),
        means_init=p0["locs"],
        precisions_init=precisions,
        init_params="random_from_data",  # unused: every initial value is given
        reg_covar=REG_COVAR,
        random_state=0,
        **kwargs,
    )


def run_sklearn(case, tol, max_iter, gap_tol):
    """Batch EM on the whole stream (float64) to convergence, giving LL*; then its
    iterates again one by one (warm start) until the held-out score is within
    ``gap_tol`` of LL*. The time to that iterate is the converged fit's time prorated
    by iterations."""
    x = np.concatenate([case.x0, case.x]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = _sklearn_gmm(case, tol=tol, max_iter=max_iter)
        start = time.perf_counter()
        gm.fit(x)
        seconds = time.perf_counter() - start
        ll_star = gm.score(case.x_test)
        stepper = _sklearn_gmm(case, max_iter=1, warm_start=True)
        iters, first_gap = None, None
        for it in range(1, gm.n_iter_ + 1):
            stepper.fit(x)
            gap = ll_star - stepper.score(case.x_test)
            first_gap = gap if it == 1 else first_gap
            if gap <= gap_tol:
                iters = it
                break
    time.sleep(0.5)  # let the BLAS threads sklearn used stop spinning before any timing
    return {
        "ll_star": ll_star,
        "n_iter": gm.n_iter_,
        "throughput": len(x) * gm.n_iter_ / seconds,
        "gap": first_gap,
        "time_to_target": None if iters is None else seconds * iters / gm.n_iter_,
    }


# ------------------------------------------------------------------------- report
COLUMNS = (
    "case",
    "kappa",
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


def fmt(value, spec):
    """A table cell: ``n/a`` for a target never reached, ``>cap`` past the pass cap."""
    if value is None:
        return "n/a"
    if np.isinf(value):
        return ">cap"
    return format(value, spec)


def table_row(case, kappa_label, oem, jx, svi, skl, gap_tol, first):
    """One markdown row. The SVI and sklearn cells, which do not depend on the step
    sizes, are filled on a case's first row only."""
    target = case.ll_star - gap_tol
    t_oem = oem["trace"].seconds_to(target)
    ratio = None
    if t_oem is not None and skl["time_to_target"] is not None:
        ratio = skl["time_to_target"] / max(t_oem, 1e-9)
    one_pass = oem["trace"].seconds[np.searchsorted(oem["trace"].points, len(case.x))]

    def only_first(cell):
        return cell if first else ""

    cells = [
        f"D={case.d} K={case.k} {case.covariance}",
        kappa_label,
        fmt(oem["throughput"] / 1e3, ".1f"),
        fmt(jx["throughput"] / 1e3, ".1f"),
        fmt(oem["throughput"] / jx["throughput"], ".2f"),
        only_first(fmt(svi["throughput"] / 1e3, ".1f")),
        only_first(fmt(skl["throughput"] / 1e3, ".1f")),
        only_first(str(skl["n_iter"])),
        fmt(case.ll_star, ".2f"),
        fmt(oem["gap"], ".3f"),
        fmt(jx["gap"], ".3f"),
        only_first(fmt(svi["gap"], ".3f")),
        only_first(fmt(skl["gap"], ".3f")),
        fmt(t_oem, ".3g"),
        fmt(jx["trace"].seconds_to(target), ".3g"),
        only_first(fmt(svi["trace"].seconds_to(target), ".3g")),
        only_first(fmt(skl["time_to_target"], ".3g")),
        fmt(ratio, ".1f"),
        fmt(case.ll_star - svi["trace"].loglik_at(one_pass), ".3f"),
        fmt(oem["passes"], ".2f"),
    ]
    return "| " + " | ".join(cells) + " |"


def flat_cost(args):
    """Seconds of updates ``[w, 2w)`` and ``[late, late + w)`` of ``OnlineEM.run`` with
    tiny batches. Each window is timed ten times from the same state (the state is an
    immutable pytree), keeping the fastest."""
    d, k, b, w = args.flat_dim, args.flat_components, args.flat_batch, args.flat_window
    rng = np.random.default_rng([args.seed, 1])
    x0 = sample_mixture(rng, make_mixture(args.seed, d, k), 256)
    windows = sample_mixture(rng, make_mixture(args.seed, d, k), 8 * w * b).reshape(8, w * b, d)
    em = OnlineEM(functools.partial(gmm_diag, K=k), init="model")
    key = jax.random.PRNGKey(0)

    def run(state, data):
        return em.run(key, data, batch_size=b, progress_bar=False, init_state=state).state

    state = em.init(key, x0, init_params=initial_params(args.seed, x0, k, "diag"))
    state = run(state, windows[0])  # updates [0, w), compiles
    last = args.flat_late // w
    seconds = {}
    for i in range(1, last + 1):
        if i in (1, last):
            seconds[i] = min(timed(run, state, windows[i % 8])[1] for _ in range(10))
        state = run(state, windows[i % 8])
    early, late = seconds[1], seconds[last]
    return (
        f"Cost per update (OnlineEM.run, D={d}, K={k}, diag, batch {b}, fastest of 10): "
        f"updates {w:,}-{2 * w:,}: {early:.4f} s, updates {last * w:,}-{(last + 1) * w:,}: "
        f"{late:.4f} s; ratio late/early {late / early:.2f} ({early / w * 1e6:.0f} us per "
        "update)."
    )


def stream_sizes(num_points, batch_size, evals):
    """``(N, batches per evaluation)``, with N cut to a whole number of segments."""
    num_batches = num_points // batch_size
    per_eval = max(1, num_batches // evals)
    return num_batches // per_eval * per_eval * batch_size, per_eval


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_case(args, d, k, covariance, n, per_eval):
    """Data (the same for both covariance types of a ``(D, K)``) and starting values."""
    mixture = make_mixture(args.seed, d, k)
    rng = np.random.default_rng([args.seed, d, k, 1])
    stream = sample_mixture(rng, mixture, args.batch_size + n)
    x_test = sample_mixture(rng, mixture, args.num_test)
    x0, x = stream[: args.batch_size], stream[args.batch_size :]
    p0 = initial_params(args.seed, x0, k, covariance)
    return Case(d, k, covariance, x0, x, x_test, per_eval, p0)


def main(args):
    if args.quick:
        args.evals, args.kappas, args.max_passes, args.repeats = 5, [], 2, 1
        args.num_test, args.flat_window, args.flat_late = 2_000, 100, 1_000
    sizes = {
        d: stream_sizes(
            args.num_points or DEFAULT_POINTS.get(d, OTHER_POINTS), args.batch_size, args.evals
        )
        for d in args.dims
    }
    tol = args.gap
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# GMM stream benchmark. {cpu_name()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), numpyro {numpyro.__version__}; "
        f"load average at start {load:.2f}.\n"
        f"# Batch size {args.batch_size}; stream N (updates, after the init batch): "
        + ", ".join(f"D={d}: {n:,}" for d, (n, _) in sizes.items())
        + f"; {args.num_test:,} held-out points; held-out LL every 1/{args.evals} pass.\n"
        "# kpt/s: thousand points per second, compile excluded, fastest of >="
        f" {args.repeats} passes (>= {MIN_TIMED_SECONDS:g} s of them; OEM and JAX timed in"
        " turn; skl: N x iterations / fit time). OEM = OnlineEM.run;"
        " JAX = the same math hand-written in JAX;\n"
        f"# SVI = NumPyro SVI, TraceEnum_ELBO, Adam lr={args.svi_lr}; skl = sklearn"
        f" GaussianMixture, float64, tol={args.sklearn_tol}; skl it = its iterations.\n"
        "# kappa: step exponent; '*' = OnlineEM's defaults for the case (with '+avg': Polyak"
        " averaging on), JAX replicating them.\n"
        "# LL*: held-out mean log-lik per point of the converged batch fit. gap X = LL* - LL"
        " after one pass (skl1: after one batch EM iteration).\n"
        f"# t.02 X: training seconds until LL >= LL* - {tol}, over up to {args.max_passes}"
        " passes (the first in stream order, then reshuffled; n/a: not reached): points"
        " needed / throughput (skl: fit time x iterations needed / iterations);"
        " skl/OEM = t.02 skl / t.02 OEM (> 1: OnlineEM is faster).\n"
        "# SVI gap@T: LL* - LL of SVI after the seconds OnlineEM took for one pass."
        f" OEM passes: passes until LL >= LL* - {tol} (>cap: not within {args.max_passes}).\n"
        f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}\n"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|", flush=True)
    for d in args.dims:
        for k in args.components:
            for covariance in args.covariances:
                if covariance == "full" and d > args.full_max_dim:
                    continue
                case = make_case(args, d, k, covariance, *sizes[d])
                skl = run_sklearn(case, args.sklearn_tol, args.sklearn_max_iter, tol)
                case = case._replace(ll_star=skl["ll_star"])
                passes = Passes(args.max_passes, tol)
                svi = run_svi(case, args.svi_lr, passes)
                measure([svi], args.repeats)
                oem = run_onlineem(case, None, passes)
                default = oem["config"]
                rows = [
                    (f"{default.kappa:g}*" + ("+avg" * (default.polyak_start is not None)), oem)
                ]
                if covariance == "full":  # the hard case: try other step exponents
                    for kappa in args.kappas:
                        if kappa != default.kappa or default.polyak_start is not None:
                            result = run_onlineem(case, kappa, passes)
                            rows.append((f"{kappa:g}", result))
                for i, (label, result) in enumerate(rows):
                    jx = run_jax(case, result["config"], passes)
                    measure([result, jx], args.repeats)
                    print(table_row(case, label, result, jx, svi, skl, tol, i == 0), flush=True)
    print()
    print(flat_cost(args), flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def ints(text):
        return [int(v) for v in text.split(",")]

    def floats(text):
        return [float(v) for v in text.split(",") if v]

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
    parser.add_argument("--evals", type=int, default=20, help="held-out evaluations per pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (fastest kept)")
    parser.add_argument("--gap", type=float, default=0.02, help="target gap to LL*, nats/point")
    parser.add_argument(
        "--kappas",
        type=floats,
        default=[0.6, 0.8, 1.0],
        help="step exponents tried besides the defaults (full covariances)",
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
        "--quick",
        action="store_true",
        help="smoke test: 5 evaluations, defaults only, 2 passes, one timing",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
