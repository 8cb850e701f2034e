"""Streaming Gaussian mixtures: OnlineEM against its hand-written limit, SVI and sklearn.

One run, one table. For every case (dimension D, components K, covariance type) the
four methods see the same synthetic stream and start from the same parameters
(k-means++ centres of the first points, uniform weights, and the pooled within-cluster
variance of those points for every component). The first points are ``50 K`` rounded
up to whole batches (256 at K=5, 1,024 at K=20), what ``OnlineEM.run`` gives ``init`` by
default (`numpyro_onlineem.schedules.default_init_points`):

* **OEM**: ``OnlineEM.run(key, x, batch_size=B, progress_bar=False)``; the first points
  initialise (``init_params`` with ``init="model"``), the other N points update.
* **JAX**: the same online EM math written by hand in plain JAX, jitted ``lax.scan``
  over the batches: responsibilities by logsumexp, running sufficient statistics with
  the same Robbins-Monro steps, burn-in and Polyak averaging, closed-form M step. It is
  the throughput OnlineEM can aim for ("our limit").
* **SVI**: NumPyro ``SVI`` with ``TraceEnum_ELBO`` on the same model (``z``
  enumerated), an empty guide (every global is a ``numpyro.param``) and Adam, one step
  per batch, in a jitted ``lax.scan``.
* **skl**: scikit-learn ``GaussianMixture`` batch EM on the whole stream, run to
  convergence. Its held-out ``score`` is the batch optimum LL*.

Compile time is excluded: every compiled function runs once before it is timed. Every
timed pass starts from the stream in host memory (NumPy), and each call copies its
batches to the device, as ``em.run`` does with a NumPy array.
Held-out log-likelihoods are mean nats per point on a separate test sample, computed
for every method by the same NumPy float64 code.

Run ``python -m benchmarks.gmm_stream`` from the repository root (about 20 minutes on 2
CPU cores), or a smoke test:
``python -m benchmarks.gmm_stream --dims 2 --components 5 --num-points 5000 --quick``.
The pieces: `benchmarks.data` (mixtures, starting values, held-out score),
`benchmarks.handwritten` (the twin), `benchmarks.streaming` (traced and timed passes,
OnlineEM and the twin), `benchmarks.peers` (SVI, scikit-learn), `benchmarks.table`.
"""

from __future__ import annotations

import argparse
import functools
import os

# jaxlib 0.10.2 on the CPU can deadlock when two batched triangular solves run at once
# (each waits on the intra-op pool the other holds; seen in SVI's gradient on
# full-covariance mixtures, with 2 threads, in 4 of 5 runs). XLA's sequential thunk
# scheduler avoids it (0 of 5 runs, 200 updates each). It applies to every method alike.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import jax
import numpy as np

from benchmarks.data import initial_params, make_mixture, sample_mixture
from benchmarks.peers import run_sklearn, run_svi
from benchmarks.streaming import (
    Passes,
    make_case,
    measure,
    run_jax,
    run_onlineem,
    stream_sizes,
    timed,
)
from benchmarks.table import COLUMNS, header, markdown_head, table_row
from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag

DEFAULT_POINTS = {2: 256_000, 64: 102_400, 256: 51_200}  # stream length by D
OTHER_POINTS = 51_200  # stream length for a D not listed above


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
    print(header(args, sizes))
    print(markdown_head(COLUMNS), flush=True)
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
