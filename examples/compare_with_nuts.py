"""How far to trust an online fit: online EM on a million streamed points, NUTS on a subsample.

A Bayesian Gaussian mixture (Dirichlet weights, Normal means, Gamma precisions) is fitted
by `OnlineEM.run` over a stream of 1,000,000 points, in one pass. `compare_with_nuts` then
runs NumPyro's NUTS on the same model, unchanged, on a random subsample of 2,000 points,
aligns the component labels of the two fits and prints, for every parameter, the online
estimate next to the NUTS posterior mean, sd and 94% HDI. The plots (posterior densities
with the online estimates marked, a forest plot of both fits, the online loss over the
stream) are saved as PNGs.

The online estimate has seen 500 times more data than NUTS, so the NUTS posterior is the
wider one: the estimate should sit inside it, at a standardised distance ``z`` of the
order of one.

    pip install -e ".[compare]" && python examples/compare_with_nuts.py --plots-dir plots
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import init_to_value

from numpyro_onlineem import OnlineEM, compare_with_nuts, kmeans_pp


def gmm(x, N, K=3):
    """Bayesian Gaussian mixture with diagonal precisions. ``N``: the size of the data set
    the prior is weighed against; ``x``: the points of one batch."""
    D = x.shape[-1]
    weights = numpyro.sample("weights", dist.Dirichlet(2.0 * jnp.ones(K)))
    locs = numpyro.sample("locs", dist.Normal(0.0, 10.0).expand([K, D]).to_event(2))
    taus = numpyro.sample("taus", dist.Gamma(2.0, 1.0).expand([K, D]).to_event(2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], taus[z] ** -0.5).to_event(1), obs=x)


# ------------------------------------------------------------------------- data
def make_truth(rng, K, D, separation):
    angles = 2 * np.pi * (np.arange(K) / K + rng.uniform(0, 1 / K))
    locs = np.zeros((K, D))
    locs[:, 0], locs[:, 1 % D] = np.cos(angles), np.sin(angles)  # on a circle in 2 dims
    return {
        "weights": rng.dirichlet(5.0 * np.ones(K)),
        "locs": separation / (2 * np.sin(np.pi / K)) * locs,  # neighbours `separation` apart
        "scales": rng.uniform(0.6, 1.4, (K, D)),
    }


def sample(rng, truth, n):
    z = rng.choice(len(truth["weights"]), n, p=truth["weights"])
    noise = rng.normal(size=(n, truth["locs"].shape[1]))
    return (truth["locs"][z] + truth["scales"][z] * noise).astype(np.float32)


# ------------------------------------------------------------------------- main
def main(args):
    rng = np.random.default_rng(args.seed)
    K, D = args.components, args.dim
    truth = make_truth(rng, K, D, args.separation)
    x = sample(rng, truth, args.num_points)  # the stream, simulated up front
    key_online, key_nuts, key_kmeans = jax.random.split(jax.random.PRNGKey(args.seed), 3)

    # Online EM: one pass over the stream, batches of `batch_size`. The prior is weighed
    # against the whole stream, N = num_points (see the quickstart's "Priors and the
    # size of the data set"): run passes it, and K, to the model after each batch. The
    # initial locations come from k-means++ on the stream's first points (a draw from
    # the prior is a placeholder, not a chosen value).
    em = OnlineEM(gmm)
    start = time.perf_counter()
    run = em.run(
        key_online,
        x,
        N=args.num_points,
        K=K,
        batch_size=args.batch_size,
        progress_bar=args.progress,
    )
    jax.block_until_ready(run.params)
    online_seconds = time.perf_counter() - start

    # NUTS on a subsample. NUTS cannot subsample, so the model gets the subsample's own
    # size, N = nuts_points: its posterior is the one given these points. NUTS starts
    # from k-means++ centres of the subsample (not from the online fit, which it checks);
    # its labels need not be the online fit's, and compare_with_nuts aligns them.
    x_sub = x[rng.choice(len(x), args.nuts_points, replace=False)]
    locs0 = kmeans_pp(key_kmeans, jnp.asarray(x_sub), k=K)
    comparison = compare_with_nuts(
        em,
        run.state,
        x_sub,
        N=args.nuts_points,
        K=K,
        rng_key=key_nuts,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        losses=run.losses,
        online_seconds=online_seconds,
        nuts_kwargs={"init_strategy": init_to_value(values={"locs": locs0})},
    )

    table = comparison.table
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    inside = int(table["inside_hdi"].sum())
    print(
        f"\n{inside} of {len(table)} online estimates inside the NUTS "
        f"{comparison.hdi_prob:.0%} HDI; largest |z| = {table['z'].abs().max():.2f}."
    )
    for latent, perm in comparison.permutation.items():
        print(f"Labels of '{latent}': NUTS component perm[c, k] of chain c is online k: {perm}")
    print(
        f"online EM: {args.num_points:,} points, one pass, {online_seconds:.1f} s "
        f"({args.num_points / online_seconds:,.0f} points/s, compilation included)"
    )
    print(
        f"NUTS:      {args.nuts_points:,} points, {args.num_chains} x "
        f"({args.num_warmup} + {args.num_samples}) iterations, {comparison.nuts_seconds:.1f} s"
    )
    plots_dir = args.plots_dir or tempfile.mkdtemp(prefix="compare_with_nuts_")
    plots = comparison.plot(plots_dir)
    print("Plots: " + ", ".join(str(path) for path in plots.values()))
    return {"comparison": comparison, "truth": truth, "plots": plots}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=1_000_000, help="length of the stream")
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--nuts-points", type=int, default=2_000, help="subsample for NUTS")
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1_000)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--separation", type=float, default=6.0, help="between neighbours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
