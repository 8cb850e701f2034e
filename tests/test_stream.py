"""`OnlineEM.run` on what users stream: single points from a generator with nothing else
given, arrays, the model's other arguments, the progress bar."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag


def _mixture(rng, d, k, n, spread=5.0):
    weights = rng.dirichlet(5 * np.ones(k))
    means = rng.normal(size=(k, d)) * spread / np.sqrt(d)
    scales = rng.uniform(0.5, 1.5, size=(k, d))
    z = rng.choice(k, n, p=weights)
    return (means[z] + scales[z] * rng.normal(size=(n, d))).astype(np.float32)


def _sklearn_score(train, test, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GaussianMixture(k, covariance_type="diag", n_init=3, random_state=0, tol=1e-4)
        return ref.fit(train).score(test)


def test_generator_of_single_points_with_nothing_else_given():
    # the users' own scenario: "our data is coming one by one", tens of dimensions
    d, k, n = 32, 5, 20_000
    x = _mixture(np.random.default_rng(3), d, k, n + 5_000)
    train, test = x[:n], x[n:]
    em = OnlineEM(lambda x: gmm_diag(x, K=k))
    result = em.run(jax.random.PRNGKey(0), (point for point in train), progress_bar=False)
    # run buffered the first points for init: every point is used once
    assert float(result.state.num_seen) == n
    assert result.losses.shape == (n - 256,)
    assert "k-means++ over 256 points" in em.mstep_paths(result.state)["locs"]
    online = float(em.log_likelihood(result.state, test).mean())
    assert online > _sklearn_score(train, test, k) - 0.05


def test_single_points_and_batches_give_the_same_fit():
    # the step of a batch is that of its points one at a time (batch_step)
    d, k, n = 48, 6, 8_000
    x = _mixture(np.random.default_rng(4), d, k, n + 2_000)
    train, test = x[:n], x[n:]
    em = OnlineEM(lambda x: gmm_diag(x, K=k))
    state = em.init(jax.random.PRNGKey(0), train[:500])
    singles = em.run(jax.random.PRNGKey(0), iter(train[500:]), init_state=state, progress_bar=False)
    batches = em.run(
        jax.random.PRNGKey(0), train[500:], batch_size=250, init_state=state, progress_bar=False
    )
    ll = [float(em.log_likelihood(r.state, test).mean()) for r in (singles, batches)]
    assert abs(ll[0] - ll[1]) < 0.01, ll
    assert ll[0] > _sklearn_score(train, test, k) - 0.02


def test_init_on_too_few_points_says_what_it_needs(rng):
    x = rng.normal(size=(10, 2)).astype(np.float32)
    em = OnlineEM(gmm_diag)
    with pytest.raises(ValueError, match=r"init batch has 1 point\(s\), too few to place the 3"):
        em.init(jax.random.PRNGKey(0), x[:1])
    # a point without its batch axis is named as such
    with pytest.raises(ValueError, match=r"shape \(2,\), which does not run along the data plate"):
        em.init(jax.random.PRNGKey(0), x[0])
    # with initial locations given, one point is enough
    state = em.init(jax.random.PRNGKey(0), x[:1], init_params={"locs": x[:3]})
    assert float(state.num_seen) == 1.0


def test_scalar_points_from_a_generator(rng):
    def mixture_1d(x, K=2):
        weights = numpyro.param("weights", np.ones(K) / K, constraint=dist.constraints.simplex)
        locs = numpyro.param("locs", np.zeros(K))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)

    x = np.concatenate([rng.normal(-3, 1, 3000), rng.normal(3, 1, 3000)]).astype(np.float32)
    rng.shuffle(x)
    em = OnlineEM(mixture_1d)
    result = em.run(jax.random.PRNGKey(0), (float(v) for v in x), progress_bar=False)
    assert float(result.state.num_seen) == len(x)
    np.testing.assert_allclose(np.sort(np.asarray(result.params["locs"])), [-3, 3], atol=0.1)


def test_other_model_arguments_go_to_run(rng):
    def gmm_n(x, N, K=3):
        weights = numpyro.sample("weights", dist.Dirichlet(np.ones(K)))
        locs = numpyro.param("locs", np.zeros((K, x.shape[-1])))
        with numpyro.plate("data", N, subsample_size=x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], 0.5).to_event(1), obs=x)

    centers = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    x = (centers[rng.integers(0, 3, 3000)] + 0.5 * rng.normal(size=(3000, 2))).astype(np.float32)
    em = OnlineEM(gmm_n)
    with pytest.raises(TypeError, match=r"em.run\(key, x, N, batch_size=100\) calls"):
        em.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False)
    result = em.run(jax.random.PRNGKey(0), x, 3000, batch_size=100, progress_bar=False)
    locs = np.asarray(result.params["locs"])
    np.testing.assert_allclose(locs[np.argsort(locs[:, 0])], centers, atol=0.1)
    # and with a generator of (args, kwargs) items and run's keyword arguments
    stream = (((p,), {}) for p in x)
    result = em.run(jax.random.PRNGKey(0), stream, N=3000, progress_bar=False)
    assert float(result.state.num_seen) == 3000


def test_progress_bar_counts_points_with_their_rate_and_total(rng, capsys):
    x = rng.normal(size=(2_000, 2)).astype(np.float32)
    em = OnlineEM(gmm_diag)
    em.run(jax.random.PRNGKey(0), x, batch_size=50)
    err = capsys.readouterr().err
    assert "2.00k/2.00k" in err and "pt/s" in err and "loss=" in err
    em.run(jax.random.PRNGKey(0), iter(x[:1000]))
    err = capsys.readouterr().err
    assert "1.00kpt" in err  # single points: counted as points, total unknown


def test_chunk_length_does_not_change_the_fit(rng, monkeypatch):
    from numpyro_onlineem import runner

    x = rng.normal(size=(3_000, 2)).astype(np.float32)
    em = OnlineEM(gmm_diag, chunk_size=8)
    ref = em.run(jax.random.PRNGKey(0), x, batch_size=20, progress_bar=False)
    # every fused call "too slow": run shortens its chunks as it goes
    monkeypatch.setattr(runner._Runner, "SLOW_CHUNK_SECONDS", 0.0)
    short = em.run(jax.random.PRNGKey(0), x, batch_size=20, progress_bar=False)
    np.testing.assert_allclose(short.losses, ref.losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(short.state), jax.tree.leaves(ref.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _gmm_subsampled(x, K=3):
    # NumPyro's SVI idiom: the whole data set, mini-batches drawn by the plate
    weights = numpyro.param("weights", np.ones(K) / K, constraint=dist.constraints.simplex)
    locs = numpyro.param("locs", np.zeros((K, x.shape[-1])))
    scales = numpyro.param(
        "scales", np.ones((K, x.shape[-1])), constraint=dist.constraints.positive
    )
    with numpyro.plate("data", x.shape[0], subsample_size=100) as idx:
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x[idx])


def test_subsampling_plate_draws_fresh_indices_every_update(rng):
    k = 3
    x = _mixture(rng, 2, k, 12_000, spread=12.0)
    train, test = x[:10_000], x[10_000:]
    em = OnlineEM(_gmm_subsampled)
    state = em.init(jax.random.PRNGKey(0), train)
    assert state.plan.model_sites.reads_subsample
    update = jax.jit(em.update)
    for _ in range(300):
        state, loss = update(state, train)
    assert float(state.num_seen) == 100 * 301
    # log_likelihood of the whole data given, not of a subsample
    ll = em.log_likelihood(state, test)
    assert ll.shape == (2_000,)
    assert float(ll.mean()) > _sklearn_score(train, test, k) - 0.02
    # run takes the whole data at every update, and refuses to cut it into batches
    result = em.run(
        jax.random.PRNGKey(0), itertools.repeat(train, 20), init_state=state, progress_bar=False
    )
    assert result.losses.shape == (20,)
    with pytest.raises(ValueError, match="draws its mini-batches itself"):
        em.run(jax.random.PRNGKey(0), train, batch_size=100, progress_bar=False)


def _prior_mixture(x, N=None, K=3):
    """Priors on the weights and locations; ``N=None``: the plate is the batch's size."""
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
    locs = numpyro.sample("locs", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
    scales = numpyro.param("scales", jnp.ones(K), constraint=constraints.positive)
    size = x.shape[0] if N is None else N
    with numpyro.plate("data", size, subsample_size=x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]), obs=x)


def test_single_points_with_priors_weighed_per_batch_are_refused(rng):
    z = rng.choice(3, 8000, p=[0.2, 0.5, 0.3])
    x = (np.array([4.0, -2.0, 1.0])[z] + 0.7 * rng.normal(size=8000)).astype(np.float32)
    # the prior would be weighed against one point: every location at the prior's mean
    with pytest.raises(ValueError, match=r"numpyro.plate\('data', N, subsample_size"):
        OnlineEM(_prior_mixture).run(jax.random.PRNGKey(0), (p for p in x), progress_bar=False)
    # with the data set's size declared, single points fit the mixture (NumPy reference:
    # the true means, which the posterior mode of 8,000 points sits next to)
    result = OnlineEM(_prior_mixture).run(
        jax.random.PRNGKey(0), (p for p in x), N=len(x), progress_bar=False
    )
    np.testing.assert_allclose(np.sort(result.params["locs"]), [-2.0, 1.0, 4.0], atol=0.1)


def test_non_finite_points_among_those_that_initialise_say_so(rng):
    x = rng.normal(size=(1000, 3)).astype(np.float32)
    x[10, 1] = np.nan
    with pytest.raises(ValueError, match=r"first 256 points initialise.*index \(10, 1\): nan"):
        OnlineEM(gmm_diag).run(jax.random.PRNGKey(0), (p for p in x), progress_bar=False)


def test_a_short_array_is_fitted_not_only_initialised():
    # 300 points in batches of 100: the default init (256 points and the 44 of a last,
    # short batch) would take them all and no M step would run; init leaves a batch
    rng = np.random.default_rng(0)
    centres = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]])
    x = (centres[rng.integers(0, 3, 300)] + 2.7 * rng.normal(size=(300, 2))).astype(np.float32)
    em = OnlineEM(gmm_diag)
    result = em.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False)
    assert result.losses.shape == (1,)
    reference = GaussianMixture(3, covariance_type="diag", random_state=0).fit(x).score(x)
    assert float(em.log_likelihood(result.state, x).mean()) > reference - 0.1
    assert not np.allclose(result.params["scales"], 1.0)  # not the model's placeholder
    # a stream that ends with init is fitted by no M step: run says so
    with pytest.warns(RuntimeWarning, match="no M step has run"):
        em.run(jax.random.PRNGKey(0), x[:200], batch_size=300, progress_bar=False)


def test_run_refuses_an_empty_array_and_a_fractional_batch_size():
    em = OnlineEM(gmm_diag)
    with pytest.raises(ValueError, match=r"shape \(0, 2\), with no points"):
        em.run(jax.random.PRNGKey(0), np.zeros((0, 2), np.float32), batch_size=10)
    with pytest.raises(ValueError, match="whole number >= 1, got 50.5"):
        em.run(jax.random.PRNGKey(0), np.zeros((100, 2), np.float32), batch_size=50.5)
    x = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    with pytest.warns(UserWarning, match="cuts arrays and tuples of arrays only"):
        em.run(jax.random.PRNGKey(0), list(x), batch_size=100, progress_bar=False)


def test_a_single_point_then_batches_from_one_generator():
    # the first item decides that items are single points; later batches stay batches
    rng = np.random.default_rng(1)
    centres = np.array([[-4.0, 0.0], [0.0, 4.0], [4.0, -1.0]])
    x = (centres[rng.integers(0, 3, 2000)] + rng.normal(size=(2000, 2))).astype(np.float32)
    em = OnlineEM(gmm_diag)
    stream = iter([x[0]] + [x[i : i + 50] for i in range(1, 2000, 50)])
    result = em.run(jax.random.PRNGKey(0), stream, progress_bar=False)
    assert float(result.state.num_seen) == 2000
    reference = GaussianMixture(3, covariance_type="diag", random_state=0).fit(x).score(x)
    assert float(em.log_likelihood(result.state, x).mean()) > reference - 0.01
