"""One pass of online EM over a stream against scikit-learn's converged batch fit."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM, kmeans_pp
from tests.models import gmm_diag

D, K, N = 64, 10, 200_000


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(K, D))
    scales = rng.uniform(0.5, 1.5, size=(K, D))
    weights = rng.dirichlet(5 * np.ones(K))
    z = rng.choice(K, N + 20_000, p=weights)
    x = (centers[z] + rng.normal(size=(len(z), D)) * scales[z]).astype(np.float32)
    return x[:N], x[N:]


def _sklearn(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(K, covariance_type="diag", max_iter=500, tol=1e-6, **kw).fit(x)


def _model(x):
    return gmm_diag(x, K=K)


def test_one_pass_reaches_batch_optimum_from_same_means(stream):
    train, test = stream
    # A start with one mean in each of the 10 clusters: from a start that puts two means
    # in one cluster, batch EM sits near a saddle and which optimum it leaves for depends
    # on the BLAS build (-92.12 here, -91.06 on another machine), so the test would not
    # compare like with like.
    means0 = np.asarray(kmeans_pp(jax.random.PRNGKey(0), jnp.asarray(train[:2000]), K, 20))
    reference = _sklearn(train, means_init=means0).score(test)
    em = OnlineEM(_model, init="model")
    result = em.run(
        jax.random.PRNGKey(0),
        train,
        batch_size=100,
        progress_bar=False,
        init_params={"locs": means0},
    )
    # init takes the first 500 points (50 per component), the updates the rest, the
    # last batch partial
    assert result.losses.shape == (-(-(N - 500) // 100),)
    online = float(em.log_likelihood(result.state, test).mean())
    assert online > reference - 0.02, (online, reference)


def test_one_pass_from_data_driven_init(stream):
    train, test = stream
    reference = _sklearn(train, random_state=0).score(test)
    em = OnlineEM(_model)  # default: k-means++ over the first batch
    state = em.init(jax.random.PRNGKey(0), train[:2000])
    result = em.run(
        jax.random.PRNGKey(0),
        train[2000:],
        batch_size=100,
        progress_bar=False,
        init_state=state,
    )
    online = float(em.log_likelihood(result.state, test).mean())
    assert online > reference - 0.02, (online, reference)


def test_single_points_from_a_generator(rng):
    centers = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    z = rng.integers(0, 3, 3000)
    x = (centers[z] + 0.5 * rng.normal(size=(3000, 2))).astype(np.float32)
    em = OnlineEM(gmm_diag)
    state = em.init(jax.random.PRNGKey(0), x[:50])
    # a point at a time through update ...
    for point in x[50:80]:
        state, loss = em.update(state, point[None])
        assert np.isfinite(loss)
    # ... and through run, which buffers single points from a generator
    result = em.run(
        jax.random.PRNGKey(0), (p for p in x[80:]), progress_bar=False, init_state=state
    )
    assert result.losses.shape == (len(x) - 80,)
    assert np.all(np.isfinite(result.losses))
    locs = np.asarray(result.params["locs"])
    order = [int(np.argmin(np.linalg.norm(locs - c, axis=1))) for c in centers]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(locs[order], centers, atol=0.15)
    np.testing.assert_allclose(np.asarray(result.params["scales"])[order], 0.5, atol=0.1)


def test_an_average_that_falls_behind_the_iterate_begins_again():
    """Two overlapping components that separate only after some 10,000 points: the E
    steps of that transient stayed in the Polyak average, whose scales ended inflated
    (0.44 against 0.31): 0.10 nats/point short of scikit-learn where the last iterate
    was 0.001 short. Checked on fresh batches against the iterate, the stale average now
    begins again, and ends with the iterate or better."""
    rng = np.random.default_rng(0)
    k, d = 3, 3
    means = 4.0 * rng.normal(size=(k, d))
    scales = rng.uniform(0.3, 2.0, size=(k, d))
    weights = rng.dirichlet(5 * np.ones(k))

    def draw(n):
        z = rng.choice(k, n, p=weights)
        return (means[z] + scales[z] * rng.normal(size=(n, d))).astype(np.float32)

    x, test = draw(100_000), draw(20_000)
    ref = GaussianMixture(
        k, covariance_type="diag", weights_init=weights, means_init=means,
        precisions_init=1 / scales**2, tol=1e-10, max_iter=2000,
    ).fit(x[:20_000])  # fmt: skip
    em = OnlineEM(lambda x: gmm_diag(x, K=k))
    result = em.run(jax.random.PRNGKey(0), x[:20_000], batch_size=256, progress_bar=False)
    average = float(em.log_likelihood(result.state, test).mean())
    iterate = result.state._replace(averaged=result.state.params)
    last = float(em.log_likelihood(iterate, test).mean())
    assert float(result.state.polyak_from) > 1_280  # it began again
    assert average > last - 0.002
    assert average > ref.score(test) - 0.005
