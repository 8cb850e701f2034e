"""Streaming Gaussian mixture: online EM on points that arrive one at a time.

High-dimensional points (256 coordinates by default) arrive one at a time from a
Python generator, then in mini-batches. ``OnlineEM`` keeps a fixed-size summary of
everything seen (the running expected sufficient statistics), so each update costs
the same however long the stream has run. At the end, the online fit is compared with
batch EM run to convergence on all the data the stream delivered, and the script prints
what the users asked about: what taking in one more point costs (online: one update of
constant microseconds; batch: a refit on everything seen, whose time grows with it), and
the whole time each fit kept them waiting, compilation included.

Run it with ``python examples/streaming_gmm.py`` (about a minute on two CPU cores), or
with tiny arguments: ``python examples/streaming_gmm.py --num-points 300 --dim 8
--components 3``.
"""

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from numpyro_onlineem import OnlineEM


def gmm(x, K=5):
    """Diagonal Gaussian mixture. Every global is a ``numpyro.param`` (maximum
    likelihood); the component ``z`` of each point is enumerated exactly."""
    D = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    # Identical placeholders: init replaces them by k-means++ centres of its first batch
    # (values that differ across components would be kept).
    locs = numpyro.param("locs", jnp.zeros((K, D)))
    scales = numpyro.param("scales", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)


# --------------------------------------------------------------------------- data
def make_truth(rng, K, D, separation):
    """A random diagonal GMM: unequal weights, means ~ N(0, separation^2 / D) per
    coordinate (so components are ``separation`` apart on average), scales in [0.5, 1.5]."""
    return {
        "weights": rng.dirichlet(5.0 * np.ones(K)),
        "locs": rng.normal(0.0, separation / np.sqrt(2 * D), (K, D)),
        "scales": rng.uniform(0.5, 1.5, (K, D)),
    }


def sample(rng, truth, n):
    z = rng.choice(len(truth["weights"]), n, p=truth["weights"])
    noise = rng.normal(size=(n, truth["locs"].shape[1]))
    return (truth["locs"][z] + truth["scales"][z] * noise).astype(np.float32)


def one_at_a_time(points):
    """A stream of single points, shape (D,), as a sensor or a socket would deliver them."""
    yield from points


def in_batches(points, batch_size):
    """A stream of mini-batches, shape (batch_size, D); the last one may be shorter."""
    for start in range(0, len(points), batch_size):
        yield points[start : start + batch_size]


# ------------------------------------------------------------------- evaluation
def gmm_log_likelihood(x, weights, locs, scales):
    """log p(x_i) per point, computed independently of the package (NumPy, float64)."""
    x, locs, scales = (np.asarray(a, np.float64) for a in (x, locs, scales))
    z = (x[:, None, :] - locs[None]) / scales[None]  # (n, K, D)
    log_comp = -0.5 * np.sum(z**2 + np.log(2 * np.pi * scales[None] ** 2), axis=-1)
    log_joint = np.log(np.asarray(weights, np.float64))[None] + log_comp
    top = log_joint.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(log_joint - top).sum(axis=1, keepdims=True)))[:, 0]


def match_components(est_locs, true_locs):
    """Permutation ``perm`` such that estimated component ``perm[k]`` is true component
    ``k``: exact search over all permutations for small K, greedy otherwise."""
    cost = np.linalg.norm(true_locs[:, None, :] - est_locs[None, :, :], axis=-1)  # (K, K)
    K = len(cost)
    if K <= 7:
        perms = np.array(list(itertools.permutations(range(K))))
        return perms[np.argmin(cost[np.arange(K), perms].sum(axis=1))]
    perm = np.full(K, -1)
    for flat in np.argsort(cost, axis=None):
        k, j = np.unravel_index(flat, cost.shape)
        if perm[k] < 0 and j not in perm:
            perm[k] = j
    return perm


def summarize(params, truth, x_test, seconds):
    params = {k: np.asarray(v) for k, v in params.items()}
    perm = match_components(params["locs"], truth["locs"])
    dist_to_truth = np.linalg.norm(params["locs"][perm] - truth["locs"], axis=-1)
    return {
        "heldout_ll": float(np.mean(gmm_log_likelihood(x_test, **params))),
        "mean_dist": float(dist_to_truth.mean()),
        "seconds": seconds,
        "params": params,
    }


# ---------------------------------------------------------------------------- main
def main(args):
    rng = np.random.default_rng(args.seed)
    K, D = args.components, args.dim
    truth = make_truth(rng, K, D, args.separation)
    # The stream is simulated up front only so that batch EM can see the same data at
    # the end; online EM itself only ever looks at the current point or batch.
    x_stream = sample(rng, truth, args.num_points)
    x_test = sample(rng, truth, args.test_points)
    n_init = min(args.init_points, args.num_points // 3)
    n_single = min(args.single_points, args.num_points // 2)
    x_single = x_stream[:n_single]
    x_batched = x_stream[n_single:]
    model = lambda x: gmm(x, K=K)
    key_init, key_run = jax.random.split(jax.random.PRNGKey(args.seed))

    # ---------------------------------------------------------------- online EM
    # The users' own scenario: points arrive one at a time from a generator, and nothing
    # but the model is given. run buffers the first points for init (k-means++ needs
    # points of every component: 256 of them by default), then updates with each point.
    # Steps are defined per point, so points one at a time and batches fit alike.
    em = OnlineEM(model)
    start = time.perf_counter()
    print(f"{n_single} points, one at a time, from a generator:")
    result = em.run(key_run, one_at_a_time(x_single), progress_bar=args.progress)
    _report_phase(em, result.state, x_test, n_single, time.perf_counter() - start)
    state_single = result.state
    print("M step of each site:")
    for name, path in em.mstep_paths(result.state).items():
        print(f"  {name:8s} {path}")

    # The same object continues from the state with mini-batches.
    print(f"\n{len(x_batched)} points in mini-batches of {args.batch_size}:")
    phase = time.perf_counter()
    result = em.run(
        key_run,
        in_batches(x_batched, args.batch_size),
        init_state=result.state,
        progress_bar=args.progress,
    )
    heldout = _report_phase(em, result.state, x_test, len(x_batched), time.perf_counter() - phase)
    online = summarize(result.params, truth, x_test, time.perf_counter() - start)
    online["package_heldout_ll"] = heldout  # em.log_likelihood, to check summarize's

    # ----------------------------------------------------------------- batch EM
    # With step size 1, no burn-in, no averaging and the whole data set as every batch,
    # an update is exactly one iteration of batch EM, started from k-means++ centres of
    # the first points.
    batch_em = OnlineEM(model, step_size=1.0, burn_in=0, polyak=False)
    start = time.perf_counter()
    x_all = jnp.asarray(x_stream)
    batch_state = batch_em.init(key_init, x_stream[:n_init])
    losses = []  # loss of an update: under the parameters before it
    for _ in range(args.batch_iters):
        batch_state, loss = batch_em.update(batch_state, x_all)
        losses.append(float(loss))
        if len(losses) > 1 and abs(losses[-2] - losses[-1]) < args.tol:
            break
    batch = summarize(batch_em.get_params(batch_state), truth, x_test, time.perf_counter() - start)
    print(f"\nBatch EM on all {args.num_points} points: {len(losses)} iterations.")

    # ------------------------------------------------- the cost of one more point
    # Online: one more point is one update, the same however many came before. Batch:
    # one more point means a refit on everything seen, which grows with the data.
    seen = sorted({n_single, args.num_points})
    online_us = {n_single: _update_cost(em, state_single, x_test), args.num_points: None}
    online_us[args.num_points] = _update_cost(em, result.state, x_test)
    refit_s = {n: _refit_seconds(batch_em, key_init, x_stream[:n], n_init, args) for n in seen}
    print("\nThe cost of taking in one more point, after n points (compiled)")
    print(f"{'n':>9s} {'online: one update (median)':>28s} {'batch: refit on all n':>23s}")
    for n in seen:
        print(f"{n:9,d} {online_us[n]:25.0f} us {refit_s[n]:21.2f} s")
    online["update_us"] = online_us
    batch["refit_seconds"] = refit_s

    # -------------------------------------------------------------------- table
    oracle = float(np.mean(gmm_log_likelihood(x_test, **truth)))
    print(f"\nHeld-out log-likelihood per point ({args.test_points} test points, D={D}, K={K})")
    print(f"{'':10s} {'log-lik':>10s} {'gap':>8s} {'|mu - mu*|':>11s} {'time (s)':>9s}")
    for name, res in (("online EM", online), ("batch EM", batch)):
        gap = res["heldout_ll"] - batch["heldout_ll"]
        print(
            f"{name:10s} {res['heldout_ll']:10.3f} {gap:8.3f} {res['mean_dist']:11.4f} "
            f"{res['seconds']:9.1f}"
        )
    print(f"{'truth':10s} {oracle:10.3f} {oracle - batch['heldout_ll']:8.3f}")
    print("gap: to batch EM; |mu - mu*|: mean distance of the matched means to the true ones;")
    print("time: the whole wait, compilation included: from OnlineEM(...) to the last")
    print("update (online), from init to convergence (batch).")
    return {"online": online, "batch": batch, "truth_ll": oracle, "truth": truth}


def _update_cost(em, state, x_test, repeats=200):
    """Median wall time of ``em.update`` on one point (a batch of one; compiled, device
    arrays), in µs, over ``repeats`` points."""
    points = jnp.asarray(x_test[:repeats])[:, None]
    state, _ = em.update(state, points[0])  # compiles once for a single point
    jax.block_until_ready(state)
    times = []
    for point in points:
        start = time.perf_counter()
        state, loss = em.update(state, point)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def _refit_seconds(batch_em, key, x, n_init, args):
    """Batch EM from scratch on ``x``, to the same tolerance: the refit one more point
    would need (timed on a second run, so that compiling for this data size is left
    out, as it is for the online update)."""
    _refit(batch_em, key, x, n_init, args)
    start = time.perf_counter()
    _refit(batch_em, key, x, n_init, args)
    return time.perf_counter() - start


def _refit(batch_em, key, x, n_init, args):
    state = batch_em.init(key, x[:n_init])
    x = jnp.asarray(x)
    previous = None
    for _ in range(args.batch_iters):
        state, loss = batch_em.update(state, x)
        loss = float(loss)
        if previous is not None and abs(previous - loss) < args.tol:
            break
        previous = loss
    jax.block_until_ready(state)


def _report_phase(em, state, x_test, num_points, seconds):
    heldout = float(jnp.mean(em.log_likelihood(state, x_test)))
    print(
        f"  {seconds:.1f} s ({num_points / seconds:,.0f} points/s, compilation included); "
        f"held-out log-likelihood per point {heldout:.3f}"
    )
    return heldout


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=100_000, help="length of the stream")
    parser.add_argument("--init-points", type=int, default=500, help="batch EM's k-means++")
    parser.add_argument("--single-points", type=int, default=20_000, help="first, one at a time")
    parser.add_argument("--batch-size", type=int, default=100, help="mini-batch size afterwards")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--separation", type=float, default=16.0, help="mean distance of means")
    parser.add_argument("--test-points", type=int, default=5_000)
    parser.add_argument("--batch-iters", type=int, default=100, help="max batch EM iterations")
    parser.add_argument("--tol", type=float, default=1e-4, help="batch EM loss tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
