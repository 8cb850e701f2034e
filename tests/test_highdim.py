"""High-dimensional diagonal mixtures: one pass with the defaults against scikit-learn's
batch EM from the same start, and no component starves, whatever the batch size."""

import warnings

import jax
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag


def overlapping_mixture(d, k, n, seed, smallest=0.05):
    """``k`` diagonal components in ``d`` dimensions that stay about as hard to tell
    apart whatever ``d``: means about 2 apart (the scales are about 1), scales in
    ``1 +- 0.3 (32 / d) ** 0.5`` (so that their differences add up to about the same
    divergence), Dirichlet(5) weights with the smallest set to ``smallest``; 10,000
    held-out points, and means 0.1 of the mean spread from the truth to start from."""
    rng = np.random.default_rng([seed, d, k])
    weights = rng.dirichlet(5 * np.ones(k))
    low = np.argmin(weights)
    weights[low] = 0.0
    weights = weights / weights.sum() * (1 - smallest)
    weights[low] = smallest
    spread = 1.5 / np.sqrt(d)
    means = rng.normal(size=(k, d)) * spread
    half_width = 0.3 * np.sqrt(32 / d)
    scales = rng.uniform(1 - half_width, 1 + half_width, size=(k, d))
    z = rng.choice(k, n + 10_000, p=weights)
    x = (means[z] + scales[z] * rng.normal(size=(len(z), d))).astype(np.float32)
    start = (means + 0.1 * spread * rng.normal(size=means.shape)).astype(np.float32)
    return x[:n], x[n:], weights, start


# (D, K, batch size, stream length): unequal weights, the smallest 5 %
CASES = [
    (32, 4, 32, 40_000),
    (32, 16, 32, 60_000),
    (128, 4, 32, 40_000),
    (128, 16, 64, 80_000),
    (512, 4, 64, 20_000),
    (512, 16, 128, 40_000),
]


@pytest.mark.parametrize("d,k,batch,n", CASES, ids=[f"D{c[0]}-K{c[1]}-B{c[2]}" for c in CASES])
def test_one_pass_matches_batch_em_without_starving(d, k, batch, n):
    train, test, weights, start = overlapping_mixture(d, k, n, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GaussianMixture(
            k, covariance_type="diag", means_init=start, max_iter=500, tol=1e-4
        ).fit(train)
    em = OnlineEM(lambda x: gmm_diag(x, K=k))
    result = em.run(
        jax.random.PRNGKey(0),
        train,
        batch_size=batch,
        progress_bar=False,
        init_params={"locs": start},
    )
    online = float(em.log_likelihood(result.state, test).mean())
    assert online > ref.score(test) - 0.02, (online, ref.score(test))
    # no component starves: every weight keeps at least half of the true smallest one
    assert np.asarray(result.params["weights"]).min() > 0.5 * weights.min()


def test_components_that_die_after_a_short_init_say_so_and_init_points_revives_them():
    """The users' scenario: 300-dimensional points far from the origin, one at a time,
    eight components told apart mostly by their scales (the means are 6 apart, the
    points' spread about 17). k-means++ over the default 400 init points does not find
    the clusters, two components end with weight 0 and the fit is nats per point short
    of scikit-learn: that must not be silent. The warning's remedy, more init points,
    reaches scikit-learn's fit (its own k-means over every point)."""
    d, k = 300, 8
    rng = np.random.default_rng(7)
    weights = rng.dirichlet(3 * np.ones(k))
    means = 1e4 + rng.normal(0, 6 / np.sqrt(2 * d), (k, d))
    scales = rng.uniform(0.5, 1.5, (k, d))

    def draw(n):
        z = rng.choice(k, n, p=weights)
        return means[z] + scales[z] * rng.normal(size=(n, d))

    x64, x_test = draw(20_000), draw(5_000)
    x = x64.astype(np.float32)
    ref = GaussianMixture(k, covariance_type="diag", n_init=2, random_state=0).fit(x64)
    reference = ref.score(x_test)
    em = OnlineEM(gmm_diag_k8)

    def heldout(params):
        gm = GaussianMixture(k, covariance_type="diag")
        gm.weights_ = np.asarray(params["weights"], np.float64)
        gm.means_ = np.asarray(params["locs"], np.float64)
        gm.covariances_ = np.asarray(params["scales"], np.float64) ** 2
        gm.precisions_cholesky_ = 1.0 / np.asarray(params["scales"], np.float64)
        return gm.score(x_test)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = em.run(jax.random.PRNGKey(0), (p for p in x), progress_bar=False)
    empty = [w for w in caught if "explain no data" in str(w.message)]
    gap = reference - heldout(result.params)
    assert gap < 0.05 or empty, (gap, [str(w.message) for w in caught])
    assert gap > 1.0 and len(empty) == 1  # today's default start: the case to flag
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = em.run(jax.random.PRNGKey(0), (p for p in x), init_points=2000, progress_bar=False)
    assert reference - heldout(result.params) < 0.02


def gmm_diag_k8(x):
    return gmm_diag(x, K=8)
