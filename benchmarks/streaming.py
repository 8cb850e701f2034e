"""The streaming benchmark's harness: a case's data, traced passes over the stream
(held-out log-likelihood after every segment), timed passes, and the two online EMs,
``OnlineEM.run`` and its hand-written twin (`benchmarks.handwritten`)."""

from __future__ import annotations

import functools
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.data import initial_params, make_mixture, mean_loglik, sample_mixture
from benchmarks.handwritten import T0, config_from_plan, jax_init, jax_scan
from numpyro_onlineem import OnlineEM, robbins_monro
from numpyro_onlineem.schedules import default_init_points
from tests.models import gmm_diag, gmm_full

MODELS = {"diag": gmm_diag, "full": gmm_full}
MIN_TIMED_SECONDS = 2.0  # short passes are timed again until they add up to this
MAX_REPEATS = 100


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
    x0 : ndarray, shape (N0, D)
        The first points (`init_size`, whole batches): k-means++ and the initial
        statistics.
    x : ndarray, shape (N, D)
        The rest of the stream, ``N`` a whole number of evaluation segments.
    x_test : ndarray
        Held-out points.
    per_eval : int
        Batches between two held-out evaluations.
    p0 : dict
        Starting parameters of every method.
    batch_size : int
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
    batch_size: int
    ll_star: float = np.nan

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
        with warnings.catch_warnings():
            # the traced pass's first segments may lie within a long burn-in (D=64 full)
            warnings.filterwarnings("ignore", message=r"OnlineEM\.run: .* within the burn-in")
            return em.run(key, data, batch_size=b, progress_bar=False, init_state=state).state

    out = online_result(case, run, state0, em.get_params, [case.x], case.segments_of, passes)
    out["config"] = config_from_plan(state0.plan, kappa)
    return out


def run_jax(case, config, passes):
    """The hand-written online EM over the same batches."""
    state0 = jax.jit(jax_init)(case.p0, jnp.asarray(case.x0))
    step = jax.jit(functools.partial(jax_scan, config))
    run = lambda s, xs: step(s, xs)[0]
    # NumPy segments, copied to the device inside the timed call, as em.run's are
    batches = case.batches_of
    return online_result(case, run, state0, lambda s: s.averaged, batches(case.x), batches, passes)


def stream_sizes(num_points, batch_size, evals):
    """``(N, batches per evaluation)``, with N cut to a whole number of segments."""
    num_batches = num_points // batch_size
    per_eval = max(1, num_batches // evals)
    return num_batches // per_eval * per_eval * batch_size, per_eval


def init_size(batch_size, k):
    """Points of the shared start: OnlineEM's default for ``run``
    (`numpyro_onlineem.schedules.default_init_points`: 50 per component), rounded up to
    whole batches."""
    n0 = default_init_points(k, 0.0, batch_size)
    return -(-n0 // batch_size) * batch_size


def make_case(args, d, k, covariance, n, per_eval):
    """Data (the same for both covariance types of a ``(D, K)``) and starting values
    (k-means++ over the first `init_size` points)."""
    mixture = make_mixture(args.seed, d, k)
    rng = np.random.default_rng([args.seed, d, k, 1])
    n0 = init_size(args.batch_size, k)
    stream = sample_mixture(rng, mixture, n0 + n)
    x_test = sample_mixture(rng, mixture, args.num_test)
    x0, x = stream[:n0], stream[n0:]
    p0 = initial_params(args.seed, x0, k, covariance)
    return Case(d, k, covariance, x0, x, x_test, per_eval, p0, args.batch_size)
