"""The data-driven initialisation rule: placeholders are replaced, deliberate values kept."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy import special
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM, kmeans_pp
from tests.models import gmm_diag


def _blobs(rng, n=600):
    centers = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    return (centers[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))).astype(np.float32), centers


def test_kmeans_pp_matches_sklearn_inertia(rng):
    x, _ = _blobs(rng)
    ours = np.asarray(kmeans_pp(jax.random.PRNGKey(0), x, 3))
    ref = KMeans(3, n_init=3, random_state=0).fit(x)
    inertia = ((x[:, None] - ours[None]) ** 2).sum(-1).min(1).sum()
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-3)


def test_placeholder_locations_are_initialised_from_data(rng):
    x, centers = _blobs(rng)
    state = OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x)
    locs = np.asarray(state.params["locs"])
    assert np.linalg.norm(locs[:, None] - centers[None], axis=-1).min(0).max() < 0.5
    np.testing.assert_array_equal(state.params["scales"], np.ones((3, 2)))  # not a location


@pytest.mark.parametrize("mode,changed", [("auto", False), ("kmeans++", True)])
def test_deliberate_values_are_kept_unless_forced(rng, mode, changed):
    x, _ = _blobs(rng)

    def model(x, K=3):
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

    state = OnlineEM(model, init=mode).init(jax.random.PRNGKey(0), x)
    assert (not np.allclose(state.params["locs"], [[1, 1], [2, 2], [3, 3]])) == changed


@pytest.mark.parametrize("mode", ["auto", "kmeans++", "model"])
def test_init_params_are_never_overridden(rng, mode):
    x, _ = _blobs(rng)
    zeros = np.zeros((3, 2))
    scales = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # distinct: not symmetric
    state = OnlineEM(gmm_diag, init=mode).init(
        jax.random.PRNGKey(0), x, init_params={"locs": zeros, "scales": scales}
    )
    np.testing.assert_array_equal(state.params["locs"], zeros)


def test_model_mode_keeps_placeholders_but_refuses_a_symmetric_start(rng):
    x, _ = _blobs(rng)
    # identical components never separate: every point weighs them alike
    with pytest.raises(ValueError, match=r"3 components of 'z' start identical.*\['obs'\]"):
        OnlineEM(gmm_diag, init="model").init(jax.random.PRNGKey(0), x)
    scales = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    em = OnlineEM(gmm_diag, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params={"scales": scales})
    np.testing.assert_array_equal(state.params["locs"], np.zeros((3, 2)))


@pytest.mark.parametrize("offset", [3e3, 1e5])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_default_start_far_from_the_origin_matches_sklearn(rng, offset, covariance):
    # float32 data thousands of units from the origin: k-means++ works on centred data
    from tests.models import gmm_full

    model = {"diag": gmm_diag, "full": gmm_full}[covariance]
    # components a unit apart, ten standard deviations: at an offset of 3,000 the float32
    # squared distances |x|^2 - 2 x c + |c|^2 are off by about one, and so were the
    # centres of k-means++ before it centred the data
    centers = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    x = offset + centers[rng.integers(0, 3, 12_000)] + 0.1 * rng.normal(size=(12_000, 3))
    x = x.astype(np.float32)
    train, test = x[:10_000], x[10_000:]
    ref = GaussianMixture(3, covariance_type=covariance, n_init=3, random_state=0)
    score = ref.fit(train.astype(np.float64)).score(test.astype(np.float64))
    em = OnlineEM(model)
    result = em.run(jax.random.PRNGKey(0), train, batch_size=100, progress_bar=False)
    assert float(em.log_likelihood(result.state, test).mean()) > score - 0.02


def test_a_prior_on_the_locations_keeps_the_data_driven_start(rng):
    # values drawn from a prior differ across components, but nobody chose them
    def gmm_prior(x, K=3):
        weights = numpyro.sample("weights", dist.Dirichlet(2.0 * jnp.ones(K)))
        locs = numpyro.sample("locs", dist.Normal(0.0, 10.0).expand([K, 2]).to_event(2))
        with numpyro.plate("data", 20_000, subsample_size=x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

    centers = np.array([[3.0, -2.0], [1.0, 3.5], [-3.5, -1.0]])
    x = (centers[rng.integers(0, 3, 20_000)] + rng.normal(size=(20_000, 2))).astype(np.float32)
    for seed in range(3):
        em = OnlineEM(gmm_prior)
        result = em.run(jax.random.PRNGKey(seed), x, batch_size=500, progress_bar=False)
        assert "k-means++" in em.mstep_paths(result.state)["locs"]
        locs = np.asarray(result.params["locs"])
        np.testing.assert_allclose(locs[np.argsort(locs[:, 0])], centers[[2, 1, 0]], atol=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_start_in_64_dimensions_reaches_the_batch_optimum(seed):
    """The fresh-fit benchmark's mixture (D=64, K=10, Dirichlet(5) weights, correlated
    noise): one k-means++ run rarely finds its best clustering of the 256 init points,
    and a merged pair of components is never undone online. The default start must
    reach scikit-learn's batch optimum anyway."""
    import functools

    from benchmarks.data import make_mixture, mean_loglik, sample_mixture

    d, k = 64, 10
    mixture = make_mixture(0, d, k)
    data_rng = np.random.default_rng([0, d, k, 2])
    x = sample_mixture(data_rng, mixture, 40_000)
    x_test = sample_mixture(data_rng, mixture, 5_000)
    ref = GaussianMixture(k, covariance_type="diag", n_init=3, random_state=0).fit(x)
    em = OnlineEM(functools.partial(gmm_diag, K=k))
    result = em.run(jax.random.PRNGKey(seed), x, batch_size=256, progress_bar=False)
    ours = mean_loglik({name: np.asarray(v) for name, v in result.params.items()}, x_test)
    assert ours > ref.score(x_test) - 0.02


def _fixed_weights_mixture(x, K=3):
    weights = numpyro.param("weights", jnp.array([0.2, 0.5, 0.3]), constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros(K))
    scales = numpyro.param("scales", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]), obs=x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_unequal_weights_get_the_clusters_of_their_size(rng, seed):
    """k-means++ centres come in no particular order; with the weights held fixed (or
    given), a weight of 0.2 on the cluster of half the data is a start EM never undoes.
    The centres are matched to the weights by cluster size."""
    z = rng.choice(3, 20_000, p=[0.2, 0.5, 0.3])
    x = (np.array([4.0, -2.0, 1.0])[z] + 0.7 * rng.normal(size=20_000)).astype(np.float32)
    em = OnlineEM(_fixed_weights_mixture, mstep={"weights": "fixed"})
    result = em.run(jax.random.PRNGKey(seed), x, batch_size=100, progress_bar=False)
    assert "matched to the mixture weights" in em.mstep_paths(result.state)["locs"]
    np.testing.assert_allclose(result.params["locs"], [4.0, -2.0, 1.0], atol=0.05)
    # the reference: scikit-learn with the weights free reaches the same mixture
    ref = GaussianMixture(3, random_state=0).fit(x[:, None])
    ours = float(em.log_likelihood(result.state, x).mean())
    assert ours > ref.score(x[:, None]) - 0.005


def _linspace_locations(x, K=3):
    """A mixture whose locations start at ``linspace(-1, 1)``: distinct, so they read
    as chosen, and far from data at an offset."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    start = jnp.linspace(-1.0, 1.0, K)[:, None] * jnp.ones(x.shape[-1])
    locs = numpyro.param("locs", start)
    scales = numpyro.param("scales", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)


def test_chosen_locations_that_leave_components_without_data_are_replaced(rng):
    # at an offset of 1,000 every point is nearest to the last start: the other two
    # components would explain nothing and die (held-out 5+ nats/point short)
    x, _ = _blobs(rng, 12_000)
    x = x + 1000.0
    train, test = x[:10_000], x[10_000:]
    ref = GaussianMixture(3, covariance_type="diag", n_init=3, random_state=0)
    score = ref.fit(train.astype(np.float64)).score(test.astype(np.float64))
    em = OnlineEM(_linspace_locations)
    result = em.run(jax.random.PRNGKey(0), train, batch_size=100, progress_bar=False)
    assert (
        "no point of it was nearest to component(s) [0, 1]" in em.mstep_paths(result.state)["locs"]
    )
    assert float(em.log_likelihood(result.state, test).mean()) > score - 0.02
    # where the same values give every component data, they are kept as chosen
    start = np.linspace(-1, 1, 3)[:, None] * np.ones(2)
    near = (start[rng.integers(0, 3, 600)] + 0.3 * rng.normal(size=(600, 2))).astype(np.float32)
    state = OnlineEM(_linspace_locations).init(jax.random.PRNGKey(0), near)
    np.testing.assert_array_equal(state.params["locs"], start)


@pytest.mark.parametrize("mode", ["auto", "kmeans++"])
def test_given_locations_that_leave_components_without_data_are_kept_with_a_warning(rng, mode):
    x, _ = _blobs(rng)
    given = {"locs": np.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])}
    with pytest.warns(RuntimeWarning, match=r"'locs'.*component\(s\) \[0, 1\] with no point"):
        state = OnlineEM(_linspace_locations, init=mode).init(
            jax.random.PRNGKey(0), x + 1000.0, init_params=given
        )
    np.testing.assert_array_equal(state.params["locs"], given["locs"])


def test_component_priors_label_the_data_driven_start(rng):
    """Normal priors on the locations with a mean per component (-4, 0, 4) label the
    components. The k-means++ centres were given in k-means' own order (by cluster
    size): the component whose prior sat at -4 ended at +4, 0.22 nats/point below the
    log-joint density of the truth. Matched to the priors' means, the fit ends at the
    truth's log-joint density (scipy)."""
    from scipy.special import logsumexp
    from scipy.stats import norm

    prior_means, prior_sd, n = np.array([-4.0, 0.0, 4.0]), 0.1, 20_000

    def gmm_map(x, N, K=3):
        w = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
        loc_prior = dist.Normal(jnp.asarray(prior_means, jnp.float32)[:, None], prior_sd)
        locs = numpyro.sample("locs", loc_prior.to_event(2))
        scales = numpyro.param("scales", jnp.ones((K, 1)), constraint=constraints.positive)
        with numpyro.plate("data", N, subsample_size=x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

    means, sds, weights = prior_means, np.array([1.0, 0.7, 1.3]), np.array([0.5, 0.3, 0.2])
    z = rng.choice(3, n, p=weights)
    x = (means[z] + sds[z] * rng.normal(size=n)).astype(np.float32)[:, None]
    em = OnlineEM(gmm_map)
    result = em.run(jax.random.PRNGKey(0), x, n, batch_size=64, progress_bar=False)
    assert "matched to the prior's component means" in em.mstep_paths(result.state)["locs"]

    def log_joint(w, m, s):
        lp = np.log(w) + norm.logpdf(x[:, :1].astype(float), m, s)
        return (logsumexp(lp, 1).sum() + norm.logpdf(m, prior_means, prior_sd).sum()) / n

    p = {k: np.asarray(v, np.float64) for k, v in result.params.items()}
    np.testing.assert_allclose(p["locs"][:, 0], prior_means, atol=0.1)
    fitted = log_joint(p["weights"], p["locs"][:, 0], p["scales"][:, 0])
    assert fitted > log_joint(weights, means, sds) - 0.002


def _positive_mixture(x, family="exponential", K=4):
    """A mixture of products of Exponential (or Gamma) coordinates, rates per component
    and dimension, written as a new user would."""
    d = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.ones((K, d)), constraint=constraints.positive)
    if family == "gamma":
        conc = numpyro.param("conc", 2.0 * jnp.ones((K, d)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        fn = dist.Exponential(rate[z]) if family == "exponential" else dist.Gamma(conc[z], rate[z])
        numpyro.sample("obs", fn.to_event(1), obs=x)


@pytest.mark.parametrize("family, dim, batch", [("exponential", 300, 1), ("gamma", 100, 50)])
def test_skewed_positive_data_in_hundreds_of_dimensions_start_from_log_clusters(family, dim, batch):
    """k-means++ on raw Exponential data in 300 dimensions (rates drawn per component and
        dimension) split the clusters badly: 20,000 single points ended 37 nats/point short
        of batch EM started at the truth, a weight at 0 (Gamma, D=100, batches of 50: 11
    short). Clustered
        on log x, the default start reaches batch EM's optimum. Reference: batch EM in NumPy
        from the generating values, on the same points."""
    rng = np.random.default_rng(4)
    k, n = 4, 20_000
    w = np.array([0.35, 0.3, 0.2, 0.15])
    rate = rng.gamma(2.0, 1.0, (k, dim))
    conc = rng.uniform(1.0, 5.0, (k, dim)) if family == "gamma" else np.ones((k, dim))

    def draw(m):
        z = rng.choice(k, m, p=w)
        return rng.gamma(conc[z], 1.0 / rate[z]).astype(np.float32)

    x, x_test = draw(n), draw(5_000)

    def component_logpdf(x, conc, rate):
        x = x.astype(np.float64)
        return (
            np.log(x) @ (conc - 1).T
            - x @ rate.T
            + np.sum(conc * np.log(rate) - special.gammaln(conc), 1)
        )

    def loglik(x, w, conc, rate):
        return special.logsumexp(component_logpdf(x, conc, rate) + np.log(w), 1).mean()

    # batch EM from the truth (the concentration by Newton on its digamma equation)
    ref_w, ref_conc, ref_rate = w.copy(), conc.copy(), rate.copy()
    logx = np.log(x.astype(np.float64))
    previous = -np.inf
    for _ in range(100):
        lp = component_logpdf(x, ref_conc, ref_rate) + np.log(ref_w)
        total = special.logsumexp(lp, 1, keepdims=True)
        if total.mean() - previous < 1e-7:
            break
        previous = total.mean()
        r = np.exp(lp - total)
        nk = r.sum(0)
        ref_w = nk / n
        mean = r.T @ x.astype(np.float64) / nk[:, None]
        if family == "gamma":
            s = np.log(mean) - r.T @ logx / nk[:, None]
            for _ in range(20):
                ref_conc = ref_conc - (np.log(ref_conc) - special.digamma(ref_conc) - s) / (
                    1 / ref_conc - special.polygamma(1, ref_conc)
                )
        ref_rate = ref_conc / mean

    em = OnlineEM(functools.partial(_positive_mixture, family=family))
    if batch == 1:  # single points, as they come
        result = em.run(jax.random.PRNGKey(0), (point for point in x), progress_bar=False)
    else:
        result = em.run(jax.random.PRNGKey(0), x, batch_size=batch, progress_bar=False)
    p = {name: np.asarray(v, np.float64) for name, v in result.params.items()}
    fitted = loglik(x_test, p["weights"], p.get("conc", np.ones((k, dim))), p["rate"])
    reference = loglik(x_test, ref_w, ref_conc, ref_rate)
    assert reference - fitted < 0.05, (fitted, reference)
    np.testing.assert_allclose(np.sort(p["weights"]), np.sort(w), atol=0.02)
