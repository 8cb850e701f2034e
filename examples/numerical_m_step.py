"""A mixture whose M step has no closed form, fitted online: heavy-tailed clusters.

A user asked: "the expectation of the log likelihood is quite complex and cannot be
maximized in closed form. Can the maximum be found numerically, as part of the
algorithm?" Here is such a model: a mixture of Student-t distributions. Nothing but the
mixture weights has a closed-form M step: the locations, the scales and above all the
degrees of freedom must be found numerically. The model is ordinary NumPyro, with
constraints and a prior:

* the locations are an ``ordered_vector`` (it fixes the labels: component 0 is the
  leftmost);
* the degrees of freedom have a ``Gamma(2, 0.1)`` prior (Juárez & Steel 2010), so they
  are a posterior mode, and stay positive.

``OnlineEM`` chooses the M step of every site by itself: the weights take the closed
form, the other sites the numerical M step (Newton steps with the observed
information, in unconstrained space, so that both constraints hold after every update).
The script prints which path each site took, fits a stream of mini-batches in one pass,
and compares the result with the batch posterior mode that ``scipy.optimize`` finds on
all the data.

Run it with ``python examples/numerical_m_step.py`` (under a minute on two CPU cores),
or with tiny arguments: ``python examples/numerical_m_step.py --num-points 5000``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from scipy import stats
from scipy.optimize import minimize
from scipy.special import logsumexp

from numpyro_onlineem import OnlineEM

DF_PRIOR = (2.0, 0.1)  # Gamma(concentration, rate) on the degrees of freedom


def student_t_mixture(x, N, K=3):
    """Student-t mixture: ordered locations, positive scales, degrees of freedom with a
    Gamma prior. ``N``: the size of the data set the stream comes from, so that the
    prior weighs against all of it."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.linspace(-1.0, 1.0, K), constraint=constraints.ordered_vector)
    scales = numpyro.param("scales", jnp.ones(K), constraint=constraints.positive)
    df = numpyro.sample("df", dist.Gamma(*DF_PRIOR).expand([K]).to_event(1))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.StudentT(df[z], locs[z], scales[z]), obs=x)


def make_data(rng, n):
    """Three heavy-tailed clusters with unequal weights and degrees of freedom."""
    truth = {
        "weights": np.array([0.25, 0.45, 0.3]),
        "locs": np.array([-6.0, 0.0, 5.0]),
        "scales": np.array([0.7, 1.5, 0.5]),
        "df": np.array([3.0, 8.0, 2.0]),
    }
    z = rng.choice(3, n, p=truth["weights"])
    x = truth["locs"][z] + truth["scales"][z] * rng.standard_t(truth["df"][z])
    return x.astype(np.float32), truth


def mean_loglik(x, p) -> float:
    """Mean log-density per point of the mixture at parameters ``p`` (NumPy)."""
    x = np.asarray(x, float)[:, None]
    lp = stats.t.logpdf(x, p["df"][None], p["locs"][None], p["scales"][None])
    lp = lp + np.log(p["weights"])[None]
    return float(logsumexp(lp, axis=1).mean())


def batch_map(x, start) -> dict:
    """The batch posterior mode on all the data: L-BFGS (scipy) in unconstrained space,
    with the gradient of the NumPy-equivalent log-posterior from JAX in float64."""
    a, b = DF_PRIOR
    k = len(start["weights"])

    def unpack(v, xp):
        locs = xp.cumsum(xp.concatenate([v[k : k + 1], xp.exp(v[k + 1 : 2 * k])]))
        weights = xp.exp(v[:k] - logsumexp_xp(v[:k], xp))
        return {"weights": weights, "locs": locs, "scales": xp.exp(v[2 * k : 3 * k]),
                "df": xp.exp(v[3 * k :])}  # fmt: skip

    with jax.enable_x64(True):
        data = jnp.asarray(x, jnp.float64)[:, None]

        def neg_log_post(v):
            p = unpack(v, jnp)
            lp = jax.scipy.stats.t.logpdf(data, p["df"], p["locs"], p["scales"])
            ll = jax.nn.logsumexp(lp + jnp.log(p["weights"]), axis=1).sum()
            prior = jax.scipy.stats.gamma.logpdf(p["df"], a, scale=1.0 / b).sum()
            return -(ll + prior) / data.shape[0]

        value_and_grad = jax.jit(jax.value_and_grad(neg_log_post))

        def fun(v):
            val, grad = value_and_grad(jnp.asarray(v))
            return float(val), np.asarray(grad, float)

        v0 = np.concatenate(
            [
                np.log(start["weights"]),
                [start["locs"][0]],
                np.log(np.diff(start["locs"])),
                np.log(start["scales"]),
                np.log(start["df"]),
            ]
        )
        v = minimize(fun, v0, jac=True, method="L-BFGS-B", options={"maxiter": 2000}).x
    return unpack(np.asarray(v), np)


def logsumexp_xp(v, xp):
    top = xp.max(v)
    return top + xp.log(xp.sum(xp.exp(v - top)))


def main(args):
    rng = np.random.default_rng(args.seed)
    x, truth = make_data(rng, args.num_points)
    x_test, _ = make_data(rng, args.test_points)
    n, b = len(x), args.batch_size

    em = OnlineEM(student_t_mixture)
    stream = (x[i : i + b] for i in range(0, n - b + 1, b))  # mini-batches, as they arrive
    start = time.perf_counter()
    result = em.run(jax.random.PRNGKey(args.seed), stream, n, progress_bar=not args.no_progress)
    online_seconds = time.perf_counter() - start
    online = {k: np.asarray(v, float) for k, v in result.params.items()}

    print("M step of each site:")
    for name, path in em.mstep_paths(result.state).items():
        print(f"  {name}: {path}")

    start = time.perf_counter()
    reference = batch_map(x[: n - n % b], online)
    batch_seconds = time.perf_counter() - start
    rows = {"online EM (one pass)": online, "batch MAP (scipy)": reference, "truth": truth}
    print(f"\n{n:,} points, batches of {b}; held-out log-likelihood on {len(x_test):,} points")
    names = ("weights", "locs", "scales", "df")
    print(f"{'':22s} {'loglik':>8s}" + "".join(f"  {k:>20s}" for k in names))
    lls = {}
    for label, p in rows.items():
        lls[label] = mean_loglik(x_test, p)
        cells = [np.array2string(np.asarray(p[k]), precision=2) for k in names]
        print(f"{label:22s} {lls[label]:8.4f}" + "".join(f"  {c:>20s}" for c in cells))
    print(
        f"\nonline: {online_seconds:.1f} s for one pass, compilation included; "
        f"the batch optimizer: {batch_seconds:.1f} s on the same points"
    )
    ordered = bool(np.all(np.diff(online["locs"]) > 0)) and bool(np.all(online["df"] > 0))
    print(f"constraints hold (ordered locations, positive degrees of freedom): {ordered}")
    return {
        "online": online,
        "reference": reference,
        "truth": truth,
        "heldout": lls,
        "paths": em.mstep_paths(result.state),
        "package_heldout_ll": float(jnp.mean(em.log_likelihood(result.state, x_test, n))),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=200_000)
    parser.add_argument("--test-points", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
