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
