"""Generalized online EM: models whose M step has no closed form, against SVI and the
batch MLE.

For each model, one synthetic training stream (batches of 256 by default; the first
batch initialises) and a held-out set, both from a fixed seed, and three methods from
the same initial values:

* **OEM**: ``OnlineEM(model)`` with its defaults (`numpyro_onlineem.mstep.numerical`
  for every site no closed form covers), ``em.init`` on the first batch (the shared
  initial values given as ``init_params``), then ``em.run`` over the stream, segment by
  segment, pass after pass.
* **SVI**: NumPyro ``SVI(config_enumerate(model), guide, Adam(lr),
  TraceEnum_ELBO(max_plate_nesting=1))`` with an empty guide (every global is a
  ``numpyro.param``; the local ``z`` is enumerated), a jitted ``lax.scan`` of
  ``svi.update`` over the same batches. The ELBO is the models' own: their data plate has
  the batch's size, so it is the batch's log-likelihood (OnlineEM scales its batch
  objective the same way; Adam does not depend on the scale). The best of ``--svi-lrs``
  (highest held-out log-likelihood at the end) is reported.
* **scipy**: the batch MLE on the whole training set, ``scipy.optimize.minimize``
  (L-BFGS-B, finite-difference gradients) on the mixture's negative log-likelihood in
  NumPy (float64, unconstrained coordinates), from the truth, the shared start and a
  perturbed start; the best is LL*.

Passes after the first visit the stream in a new random order, the same for both
online methods. Held-out log-likelihoods (mean nats per point) come from the same
NumPy code for every method. Clocks: ``compile s`` is JAX's tracing, lowering and XLA
compiling (`benchmarks.fresh_fit.CompileEvents`) in ``init`` and a first call over one
segment (discarded); the curves' seconds are steady-state training time (held-out
evaluations excluded, compiles subtracted).

The models (`tests.models`): ``gamma_mixture`` (K=3; its Gamma sites take the numerical
Newton path, or a closed form where the library registers one: the table says which),
``student_t_mixture`` (K=2: locations, scales and degrees of freedom, no closed form
anywhere) and ``logistic_mixture`` (K=2 logistic regressions, D=3 with an intercept).

Run ``python -m benchmarks.generalized_em`` from the repository root, or a smoke test:
``python -m benchmarks.generalized_em --num-points 20000 --num-test 5000 --passes 2``.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.contrib.funsor import config_enumerate
from numpyro.infer import SVI, TraceEnum_ELBO
from scipy.optimize import minimize
from scipy.special import gammaln, log_expit, log_softmax
from threadpoolctl import threadpool_limits

from benchmarks.fresh_fit import CompileEvents
from benchmarks.table import fmt, machine, markdown_head, markdown_row
from numpyro_onlineem import OnlineEM
from tests.models import gamma_mixture, logistic_mixture, student_t_mixture

GAP_TOL = 0.01  # nats per point: "within the batch optimum"


# ------------------------------------------------------------------------ models
class Bench(NamedTuple):
    """One model of the benchmark.

    Attributes
    ----------
    name : str
    model : callable
        The NumPyro model, called with one batch's arrays.
    truth : dict
        The generating parameters.
    sample : callable
        ``sample(rng, n) -> tuple of arrays`` (float32, first axis the points).
    component_loglik : callable
        ``(params, arrays) -> (n, K)``: each component's log-density of each point
        (NumPy, float64).
    start : callable
        ``start(arrays) -> params``: every method's initial values, from the first batch.
    spec : tuple
        ``(name, kind, shape)`` of each parameter, ``kind`` in ``"simplex"``,
        ``"positive"``, ``"real"``: the unconstrained coordinates of the scipy fit.
    """

    name: str
    model: Callable
    truth: dict
    sample: Callable
    component_loglik: Callable
    start: Callable
    spec: tuple


def _quantile_groups(x, k):
    """The sorted points cut into ``k`` groups of equal size."""
    return np.array_split(np.sort(np.asarray(x, np.float64)), k)


# Gamma mixture: shapes 2, 5, 12; means 1, 4, 15
GAMMA_TRUTH = {
    "weights": np.array([0.5, 0.3, 0.2]),
    "concentration": np.array([2.0, 5.0, 12.0]),
    "rate": np.array([2.0, 1.25, 0.8]),
}


def _gamma_sample(truth, rng, n):
    z = rng.choice(3, size=n, p=truth["weights"])
    x = rng.gamma(truth["concentration"][z], 1.0 / truth["rate"][z])
    return (x.astype(np.float32),)


def _gamma_component_loglik(p, arrays):
    x = np.asarray(arrays[0], np.float64)[:, None]
    a, b = p["concentration"][None], p["rate"][None]
    return a * np.log(b) - gammaln(a) + (a - 1.0) * np.log(x) - b * x


def _gamma_start(arrays):
    """Moments of each third of the sorted first batch: shape mean^2/var, rate mean/var."""
    groups = _quantile_groups(arrays[0], 3)
    mean = np.array([g.mean() for g in groups])
    var = np.array([max(g.var(), 1e-3 * g.mean() ** 2) for g in groups])
    return {"weights": np.full(3, 1 / 3), "concentration": mean**2 / var, "rate": mean / var}


# Student-t mixture: tests/test_numerical.py's
T_TRUTH = {
    "weights": np.array([0.3, 0.7]),
    "locs": np.array([-3.0, 2.0]),
    "scales": np.array([0.5, 1.5]),
    "df": np.array([3.0, 10.0]),
}


def _t_sample(truth, rng, n):
    z = rng.choice(2, size=n, p=truth["weights"])
    x = truth["locs"][z] + truth["scales"][z] * rng.standard_t(truth["df"][z])
    return (x.astype(np.float32),)


def _t_component_loglik(p, arrays):
    x = np.asarray(arrays[0], np.float64)[:, None]
    df, loc, scale = p["df"][None], p["locs"][None], p["scales"][None]
    r = (x - loc) / scale
    return (
        gammaln(0.5 * (df + 1))
        - gammaln(0.5 * df)
        - 0.5 * np.log(df * np.pi)
        - np.log(scale)
        - 0.5 * (df + 1) * np.log1p(r * r / df)
    )


def _t_start(arrays):
    """Median and standard deviation of each half of the sorted first batch; df 5."""
    groups = _quantile_groups(arrays[0], 2)
    return {
        "weights": np.full(2, 0.5),
        "locs": np.array([np.median(g) for g in groups]),
        "scales": np.array([max(g.std(), 1e-3) for g in groups]),
        "df": np.full(2, 5.0),
    }


# mixture of logistic regressions: tests/test_numerical.py's
LOGISTIC_TRUTH = {
    "weights": np.array([0.4, 0.6]),
    "beta": np.array([[-1.0, 3.0, 0.0], [1.0, -1.0, 2.5]]),
}


def _logistic_sample(truth, rng, n):
    X = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, 2))], 1)
    z = rng.choice(2, size=n, p=truth["weights"])
    logit = np.sum(X * truth["beta"][z], -1)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return X.astype(np.float32), y


def _logistic_component_loglik(p, arrays):
    X, y = (np.asarray(a, np.float64) for a in arrays)
    logits = X @ p["beta"].T
    return y[:, None] * log_expit(logits) + (1.0 - y[:, None]) * log_expit(-logits)


def _logistic_start(arrays):
    """The model's own initial values: coefficients -1 and +1 everywhere."""
    d = arrays[0].shape[-1]
    return {"weights": np.full(2, 0.5), "beta": np.linspace(-1.0, 1.0, 2)[:, None] * np.ones(d)}


BENCHES = {
    "gamma": Bench(
        "Gamma mixture, K=3",
        functools.partial(gamma_mixture, K=3),
        GAMMA_TRUTH,
        functools.partial(_gamma_sample, GAMMA_TRUTH),
        _gamma_component_loglik,
        _gamma_start,
        (
            ("weights", "simplex", (3,)),
            ("concentration", "positive", (3,)),
            ("rate", "positive", (3,)),
        ),
    ),
    "student_t": Bench(
        "Student-t mixture, K=2",
        functools.partial(student_t_mixture, K=2),
        T_TRUTH,
        functools.partial(_t_sample, T_TRUTH),
        _t_component_loglik,
        _t_start,
        (
            ("weights", "simplex", (2,)),
            ("locs", "real", (2,)),
            ("scales", "positive", (2,)),
            ("df", "positive", (2,)),
        ),
    ),
    "logistic": Bench(
        "Mixture of logistic regressions, K=2, D=3",
        functools.partial(logistic_mixture, K=2),
        LOGISTIC_TRUTH,
        functools.partial(_logistic_sample, LOGISTIC_TRUTH),
        _logistic_component_loglik,
        _logistic_start,
        (("weights", "simplex", (2,)), ("beta", "real", (2, 3))),
    ),
}


def mean_loglik(bench, params, arrays):
    """Mean log-likelihood per point (NumPy, float64) of ``params`` on ``arrays``; one
    BLAS thread (see `benchmarks.data.mean_loglik`)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _mean_loglik(bench, params, arrays)


def _mean_loglik(bench, params, arrays):
    p = {name: np.asarray(v, np.float64) for name, v in params.items()}
    with np.errstate(all="ignore"):
        lp = np.log(p["weights"])[None] + bench.component_loglik(p, arrays)
        top = np.max(lp, axis=1)  # logsumexp, without scipy's overhead (the MLE's inner loop)
        value = float(np.mean(top + np.log(np.sum(np.exp(lp - top[:, None]), axis=1))))
    return value if np.isfinite(value) else -np.inf


# --------------------------------------------------------------------- batch MLE
def _pack(spec, params):
    parts = []
    for name, kind, _ in spec:
        v = np.asarray(params[name], np.float64)
        if kind == "simplex":
            v = np.log(v[:-1] / v[-1])
        elif kind == "positive":
            v = np.log(v)
        parts.append(v.ravel())
    return np.concatenate(parts)


def _unpack(spec, vector):
    params, i = {}, 0
    for name, kind, shape in spec:
        size = int(np.prod(shape)) - (kind == "simplex")
        v = vector[i : i + size]
        i += size
        if kind == "simplex":
            v = np.exp(log_softmax(np.append(v, 0.0)))
        elif kind == "positive":
            v = np.exp(v)
        params[name] = v.reshape(shape)
    return params


def scipy_mle(bench, train, p0, seed):
    """L-BFGS-B on the training set's mean negative log-likelihood from the truth,
    ``p0`` and ``p0`` perturbed. Returns ``(params, {"seconds", "starts", "nit"})``:
    the best optimum, the time of all starts, their iterations."""

    def nll(v):
        value = -_mean_loglik(bench, _unpack(bench.spec, v), train)
        return value if np.isfinite(value) else 1e10

    rng = np.random.default_rng([seed, 7])
    v0 = _pack(bench.spec, p0)
    starts = [_pack(bench.spec, bench.truth), v0, v0 + 0.3 * rng.normal(size=v0.shape)]
    start = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        fits = [minimize(nll, s, method="L-BFGS-B", options={"maxiter": 1000}) for s in starts]
    seconds = time.perf_counter() - start
    best = min(fits, key=lambda r: r.fun)
    nit = "/".join(str(r.nit) for r in fits)
    return _unpack(bench.spec, best.x), {"seconds": seconds, "starts": len(starts), "nit": nit}


# ------------------------------------------------------------------------- data
class Data(NamedTuple):
    """A model's stream and held-out set.

    Attributes
    ----------
    first : tuple of ndarray
        The first batch (``B`` points): OnlineEM's ``init`` and every start.
    stream : tuple of ndarray
        The rest, ``evals * per_eval * B`` points, updated on, pass after pass.
    test : tuple of ndarray
        Held-out points.
    per_eval : int
        Batches between two held-out evaluations.
    p0 : dict
        Every method's initial values (float32).
    """

    first: tuple
    stream: tuple
    test: tuple
    per_eval: int
    p0: dict

    @property
    def batch_size(self):
        return len(self.first[0])

    @property
    def num_points(self):
        return len(self.stream[0])

    def train(self):
        return tuple(np.concatenate([a, b]) for a, b in zip(self.first, self.stream, strict=True))

    def segments(self, order):
        """The stream in ``order``, cut into evaluation segments: a list of tuples of
        arrays shaped ``(per_eval, B, ...)``."""
        b, n = self.batch_size, self.per_eval
        arrays = [a[order] for a in self.stream]
        num = len(order) // (n * b)
        return [
            tuple(a[i * n * b : (i + 1) * n * b].reshape(n, b, *a.shape[1:]) for a in arrays)
            for i in range(num)
        ]


def make_data(bench, args, index):
    rng = np.random.default_rng([args.seed, index])
    b = args.batch_size
    num_batches = max(args.evals, args.num_points // b - 1)
    per_eval = num_batches // args.evals
    train = bench.sample(rng, b + args.evals * per_eval * b)
    test = bench.sample(rng, args.num_test)
    first = tuple(a[:b] for a in train)
    stream = tuple(a[b:] for a in train)
    p0 = {k: np.asarray(v, np.float32) for k, v in bench.start(first).items()}
    return Data(first, stream, test, per_eval, p0)


def pass_orders(data, passes, seed):
    """The order of the stream in each pass: as drawn, then shuffled (shared by the
    online methods)."""
    rng = np.random.default_rng([seed, 11])
    n = data.num_points
    return [np.arange(n)] + [rng.permutation(n) for _ in range(passes - 1)]


# --------------------------------------------------------------- online methods
class Curve(NamedTuple):
    """Held-out log-likelihood after each segment: ``seconds`` (steady training time),
    ``points`` (stream points processed), ``loglik``; all start with the initial value."""

    seconds: np.ndarray
    points: np.ndarray
    loglik: np.ndarray

    def at(self, seconds):
        """The log-likelihood at ``seconds`` of training, linearly interpolated (its
        last value past its end)."""
        return float(np.interp(seconds, self.seconds, self.loglik))

    def passes_to(self, target, num_points):
        hits = np.flatnonzero(self.loglik >= target)
        return np.inf if not hits.size else self.points[hits[0]] / num_points


def traced(bench, data, orders, advance, state, get_params):
    """Feed the segments of every pass to ``state = advance(state, segment)``; the
    held-out log-likelihood after each. Returns ``(state, Curve, compile seconds)``:
    any compile during the segments is taken out of the clock."""
    seconds, points, loglik = [0.0], [0], [mean_loglik(bench, get_params(state), data.test)]
    compile_seconds = 0.0
    for order in orders:
        for segment in data.segments(order):
            with CompileEvents() as events:
                start = time.perf_counter()
                state = jax.block_until_ready(advance(state, segment))
                elapsed = time.perf_counter() - start
            spent = events.summary()["compile_seconds"]
            compile_seconds += spent
            seconds.append(seconds[-1] + max(elapsed - spent, 0.0))
            points.append(points[-1] + len(segment[0]) * data.batch_size)
            loglik.append(mean_loglik(bench, get_params(state), data.test))
    return state, Curve(np.array(seconds), np.array(points), np.array(loglik)), compile_seconds


def run_onlineem(bench, data, orders):
    """OnlineEM with its defaults, ``run`` over one segment at a time (one compiled
    chunk per segment)."""
    key = jax.random.PRNGKey(0)
    em = OnlineEM(bench.model, chunk_size=data.per_eval, compilation_cache=False)
    one_array = len(data.first) == 1

    def advance(state, segment):
        if one_array:  # an array stream, cut into batches by run
            stream = segment[0].reshape(-1, *segment[0].shape[2:])
        else:  # a tuple of arrays per batch
            stream = list(zip(*segment, strict=True))
        result = em.run(
            key, stream, batch_size=data.batch_size, progress_bar=False, init_state=state
        )
        return result.state

    with CompileEvents() as events:
        state0 = jax.block_until_ready(em.init(key, *data.first, init_params=data.p0))
        advance(state0, data.segments(orders[0])[0])  # compiles
    state, curve, more = traced(bench, data, orders, advance, state0, em.get_params)
    return {
        "compile": events.summary()["compile_seconds"] + more,
        "curve": curve,
        "paths": em.mstep_paths(state0),
        "em": em,
        "state": state,
    }


def run_svi(bench, data, orders, lr):
    """NumPyro SVI: empty guide, enumerated ``z``, Adam(lr), one jitted ``lax.scan`` of
    ``svi.update`` per segment."""
    model = config_enumerate(bench.model)
    guide = lambda *args, **kwargs: None
    svi = SVI(model, guide, numpyro.optim.Adam(lr), TraceEnum_ELBO(max_plate_nesting=1))

    @jax.jit
    def scan(state, segment):
        return jax.lax.scan(lambda s, batch: (svi.update(s, *batch)[0], None), state, segment)[0]

    def advance(state, segment):
        return scan(state, tuple(jnp.asarray(a) for a in segment))

    with CompileEvents() as events:
        p0 = {k: jnp.asarray(v) for k, v in data.p0.items()}
        state0 = svi.init(jax.random.PRNGKey(0), *data.first, init_params=p0)
        jax.block_until_ready(advance(state0, data.segments(orders[0])[0]))
    _, curve, more = traced(bench, data, orders, advance, state0, svi.get_params)
    return {"compile": events.summary()["compile_seconds"] + more, "curve": curve, "lr": lr}


# ------------------------------------------------------------------------ report
COLUMNS = (
    "method",
    "compile s",
    "train s",
    "s/pass",
    "kpt/s",
    "LL 1 pass",
    "LL end",
    "gap 1 pass",
    "gap end",
    "passes to .01",
    "LL @ T1",
    "gap @ T1",
)


def online_row(label, result, data, ll_star, t1):
    curve = result["curve"]
    n = data.num_points
    one = curve.loglik[np.searchsorted(curve.points, n)]
    passes = curve.points[-1] / n
    return markdown_row(
        [
            label,
            fmt(result["compile"], ".2f"),
            fmt(curve.seconds[-1], ".3g"),
            fmt(curve.seconds[-1] / passes, ".3g"),
            fmt(curve.points[-1] / curve.seconds[-1] / 1e3, ".0f"),
            fmt(one, ".4f"),
            fmt(curve.loglik[-1], ".4f"),
            fmt(ll_star - one, ".4f"),
            fmt(ll_star - curve.loglik[-1], ".4f"),
            fmt(curve.passes_to(ll_star - GAP_TOL, n), ".2f").replace(">cap", "—"),
            fmt(curve.at(t1), ".4f"),
            fmt(ll_star - curve.at(t1), ".4f"),
        ]
    )


def curve_table(oem, svi):
    """The two curves side by side: held-out LL against steady seconds."""
    lines = [markdown_head(("points", "OEM s", "OEM LL", "SVI s", "SVI LL"))]
    a, b = oem["curve"], svi["curve"]
    for i in range(len(a.points)):
        lines.append(
            markdown_row(
                [
                    f"{a.points[i]:,}",
                    f"{a.seconds[i]:.3f}",
                    f"{a.loglik[i]:.4f}",
                    f"{b.seconds[i]:.3f}",
                    f"{b.loglik[i]:.4f}",
                ]
            )
        )
    return "\n".join(lines)


def run_model(name, args, index):
    bench = BENCHES[name]
    data = make_data(bench, args, index)
    train = data.train()
    mle, fit = scipy_mle(bench, train, data.p0, args.seed)
    ll_star = mean_loglik(bench, mle, data.test)
    orders = pass_orders(data, args.passes, args.seed)
    oem = run_onlineem(bench, data, orders)
    svis = [run_svi(bench, data, orders, lr) for lr in args.svi_lrs]
    svi = max(svis, key=lambda r: (r["curve"].loglik[-1], r["curve"].at(0.0)))
    n = data.num_points
    t1 = float(oem["curve"].seconds[np.searchsorted(oem["curve"].points, n)])

    print(
        f"## {bench.name}: {len(train[0]):,} training points ({data.batch_size:,} initialise,"
        f" {n:,} per pass, batches of {data.batch_size}), {len(data.test[0]):,} held-out;"
        f" held-out LL every {data.per_eval} batches"
    )
    print("# OnlineEM M-step paths:")
    for site, path in oem["paths"].items():
        print(f"#   {site}: {path}")
    print(
        f"# scipy MLE: held-out LL* = {ll_star:.4f}, train LL {mean_loglik(bench, mle, train):.4f},"
        f" {fit['seconds']:.2f} s for {fit['starts']} starts (iterations {fit['nit']});"
        f" truth: held-out LL {mean_loglik(bench, bench.truth, data.test):.4f}"
    )
    print(
        "# SVI Adam lr, held-out LL at the end: "
        + ", ".join(f"{r['lr']:g}: {r['curve'].loglik[-1]:.4f}" for r in svis)
        + f" (best: {svi['lr']:g})"
    )
    print(f"# T1 = OEM's first pass, {t1:.3f} s of steady training\n")
    print(markdown_head(COLUMNS))
    print(online_row("OEM (defaults)", oem, data, ll_star, t1))
    print(online_row(f"SVI Adam lr={svi['lr']:g}", svi, data, ll_star, t1))
    print(
        markdown_row(
            ["scipy L-BFGS-B (batch MLE)", "", fmt(fit["seconds"], ".2f")]
            + [""] * 3
            + [fmt(ll_star, ".4f"), "", "0", "", "", ""]
        )
    )
    won = ll_star - oem["curve"].at(t1) < ll_star - svi["curve"].at(t1)
    print(
        f"\n# target (closer to LL* than SVI at equal wall time T1): {'met' if won else 'NOT met'}"
    )
    print()
    print(curve_table(oem, svi))
    print(flush=True)
    return {"oem": oem, "svi": svi, "svis": svis, "ll_star": ll_star, "t1": t1, "met": won}


def print_header(args):
    print(
        f"# Generalized online EM benchmark. {machine()}.\n"
        f"# Batch size {args.batch_size}; about {args.num_points:,} training points per model"
        f" (whole evaluation segments); {args.num_test:,} held-out; {args.passes} passes"
        f" ({args.evals} held-out evaluations per pass; passes after the first reshuffled, the"
        f" same order for OEM and SVI); seed {args.seed}.\n"
        "# OEM = OnlineEM(model) with its defaults, em.run per segment; SVI = NumPyro SVI,"
        " TraceEnum_ELBO, empty guide, Adam (best lr of "
        + ", ".join(f"{lr:g}" for lr in args.svi_lrs)
        + "), lax.scan of svi.update per segment; scipy = L-BFGS-B batch MLE (float64).\n"
        "# compile s: JAX trace, lower and compile seconds (init and a first segment);"
        " train s: steady training seconds over every pass (held-out evaluations and compiles"
        " excluded); kpt/s: thousand points per steady second.\n"
        f"# LL: held-out mean log-lik per point; gap = LL* - LL (LL*: the scipy MLE's);"
        f" passes to .01: passes until gap <= {GAP_TOL} (—: not within {args.passes});"
        " LL @ T1: held-out LL after T1, the steady seconds OEM took for its first pass"
        " (interpolated between evaluations; a method done sooner: its last value).\n"
        f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}\n",
        flush=True,
    )


def main(args):
    print_header(args)
    return {name: run_model(name, args, i) for i, name in enumerate(BENCHES) if name in args.models}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=tuple(BENCHES),
        default=list(BENCHES),
        help="model groups to run (default: all)",
    )
    parser.add_argument("--num-points", type=int, default=200_000, help="training points")
    parser.add_argument("--num-test", type=int, default=20_000, help="held-out points")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--evals", type=int, default=8, help="held-out evaluations per pass")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--svi-lrs", type=float, nargs="+", default=[1e-3, 1e-2, 5e-2], help="Adam steps tried"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
