"""Families beyond the diagonal Gaussian, each against an independent reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import poisson
from sklearn.mixture import GaussianMixture

from numpyro_onlineem import OnlineEM


def poisson_mixture(x, K=3):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Poisson(rates[z]).to_event(1), obs=x)


def bernoulli_mixture(x, K=3):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    probs = numpyro.param(
        "probs", 0.5 * jnp.ones((K, x.shape[-1])), constraint=constraints.unit_interval
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Bernoulli(probs[z]).to_event(1), obs=x)


def exponential_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Exponential(rates[z]), obs=x)


def _numpy_em(x, weights, params, log_lik, m_step, num_iters):
    """Plain batch EM: responsibilities in log space, then the family's M step."""
    for _ in range(num_iters):
        logp = np.log(weights)[None] + log_lik(x, params)
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        weights = resp.mean(0)
        params = m_step(x, resp)
    return weights, params


def _poisson_ll(x, rates):
    return poisson.logpmf(x[:, None, :], rates[None]).sum(-1)


def _bernoulli_ll(x, probs):
    return (x[:, None] * np.log(probs[None]) + (1 - x[:, None]) * np.log1p(-probs[None])).sum(-1)


def _rate_m_step(x, resp):
    return resp.T @ x / resp.sum(0)[:, None]


def _match(est, ref):
    """Permutation of the rows of ``est`` closest to ``ref``."""
    import itertools

    best = min(
        itertools.permutations(range(len(ref))),
        key=lambda p: np.abs(est[list(p)] - ref).sum(),
    )
    return est[list(best)], list(best)


def _poisson_data(rng, n):
    rates = np.array([[1.0, 8.0, 3.0, 0.5], [6.0, 1.0, 9.0, 4.0], [12.0, 5.0, 0.5, 10.0]])
    z = rng.choice(3, n, p=[0.3, 0.3, 0.4])
    return rng.poisson(rates[z]).astype(np.float32), rates


def _bernoulli_data(rng, n):
    probs = np.array(
        [
            [0.9, 0.9, 0.1, 0.1, 0.8, 0.2],
            [0.1, 0.8, 0.9, 0.2, 0.1, 0.9],
            [0.5, 0.1, 0.2, 0.9, 0.9, 0.9],
        ]
    )
    z = rng.choice(3, n, p=[0.4, 0.35, 0.25])
    return (rng.uniform(size=(n, 6)) < probs[z]).astype(np.float32), probs


@pytest.mark.parametrize(
    "model,data,log_lik,name",
    [
        (poisson_mixture, _poisson_data, _poisson_ll, "rates"),
        (bernoulli_mixture, _bernoulli_data, _bernoulli_ll, "probs"),
    ],
)
def test_batch_limit_iterates_equal_numpy_em(rng, x64, model, data, log_lik, name):
    x, truth = data(rng, 2000)
    init = {
        "weights": np.array([0.2, 0.3, 0.5]),
        name: np.clip(truth + 0.2, 0.05, 0.95) if name == "probs" else truth + 1.0,
    }
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    for _ in range(5):
        state, _ = em.update(state, x)
    w, p = _numpy_em(x, init["weights"], init[name], log_lik, _rate_m_step, 5)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(params[name], p, rtol=1e-6)


@pytest.mark.parametrize(
    "model,data,log_lik,name",
    [
        (poisson_mixture, _poisson_data, _poisson_ll, "rates"),
        (bernoulli_mixture, _bernoulli_data, _bernoulli_ll, "probs"),
    ],
)
def test_one_pass_recovers_parameters(rng, model, data, log_lik, name):
    x, truth = data(rng, 30_000)
    em = OnlineEM(model)  # k-means++ over the first batch breaks the symmetric start
    result = em.run(jax.random.PRNGKey(1), x, batch_size=100, progress_bar=False)
    est, perm = _match(np.asarray(result.params[name]), truth)
    # the reference: batch EM to convergence from the online estimate
    w_ref, p_ref = _numpy_em(
        x.astype(np.float64),
        np.asarray(result.params["weights"], np.float64)[perm],
        est.astype(np.float64),
        log_lik,
        _rate_m_step,
        200,
    )
    np.testing.assert_allclose(est, p_ref, atol=0.05 * np.abs(truth).max())
    np.testing.assert_allclose(np.asarray(result.params["weights"])[perm], w_ref, atol=0.02)
    np.testing.assert_allclose(est, truth, atol=0.1 * np.abs(truth).max())


def test_exponential_batch_limit_equals_closed_form(rng, x64):
    z = rng.choice(2, 3000, p=[0.4, 0.6])
    x = rng.exponential(1.0 / np.array([0.5, 4.0])[z])
    init = {"weights": np.array([0.5, 0.5]), "rates": np.array([0.3, 2.0])}
    em = OnlineEM(exponential_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    w, r = init["weights"], init["rates"]
    for _ in range(4):
        state, _ = em.update(state, x)
        logp = np.log(w) + np.log(r) - np.outer(x, r)
        resp = np.exp(logp - logsumexp(logp, 1, keepdims=True))
        w, r = resp.mean(0), resp.sum(0) / (resp * x[:, None]).sum(0)
    np.testing.assert_allclose(em.get_params(state)["rates"], r, rtol=1e-6)
    np.testing.assert_allclose(em.get_params(state)["weights"], w, rtol=1e-6)


def gmm_tied(x, K=3):
    d = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, d)))
    cov = numpyro.param("cov", jnp.eye(d), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.MultivariateNormal(locs[z], covariance_matrix=cov), obs=x)


def test_tied_covariance_equals_sklearn_tied(rng, x64):
    centers = rng.normal(scale=3.0, size=(3, 3))
    z = rng.integers(0, 3, 600)
    x = centers[z] + rng.normal(size=(600, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0.3], [0, 0, 0.7]])
    means = x[rng.choice(600, 3, replace=False)]
    weights = np.array([0.3, 0.3, 0.4])
    cov = np.eye(3) * 2.0
    em = OnlineEM(gmm_tied, step_size=1.0, burn_in=0, init="model")
    state = em.init(
        jax.random.PRNGKey(0), x, init_params={"locs": means, "cov": cov, "weights": weights}
    )
    for _ in range(4):
        state, _ = em.update(state, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(
            3,
            covariance_type="tied",
            weights_init=weights,
            means_init=means,
            precisions_init=np.linalg.inv(cov),
            max_iter=4,
            tol=0.0,
        ).fit(x)
    params = em.get_params(state)
    np.testing.assert_allclose(params["locs"], gm.means_, atol=1e-6)
    np.testing.assert_allclose(params["cov"], gm.covariances_, atol=1e-6)


@pytest.mark.parametrize("form", ["scale_tril", "precision_matrix"])
def test_covariance_forms_agree(rng, x64, form):
    """The M step returns the covariance in the form the model passed it."""
    x = rng.normal(size=(300, 3)) * np.array([1.0, 2.0, 0.5]) + rng.integers(0, 2, (300, 1)) * 4

    def model(x, form=form):
        K, d = 2, x.shape[-1]
        locs = numpyro.param("locs", jnp.zeros((K, d)))
        constraint = {
            "scale_tril": constraints.lower_cholesky,
            "precision_matrix": constraints.positive_definite,
        }[form]
        mats = numpyro.param("mats", jnp.broadcast_to(jnp.eye(d), (K, d, d)), constraint=constraint)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            numpyro.sample("obs", dist.MultivariateNormal(locs[z], **{form: mats[z]}), obs=x)

    def reference(x):
        K, d = 2, x.shape[-1]
        locs = numpyro.param("locs", jnp.zeros((K, d)))
        covs = numpyro.param(
            "covs",
            jnp.broadcast_to(jnp.eye(d), (K, d, d)),
            constraint=constraints.positive_definite,
        )
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            numpyro.sample(
                "obs", dist.MultivariateNormal(locs[z], covariance_matrix=covs[z]), obs=x
            )

    locs = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    states = []
    for m in (model, reference):
        em = OnlineEM(m, step_size=1.0, burn_in=0, init="model")
        state = em.init(jax.random.PRNGKey(0), x, init_params={"locs": locs})
        for _ in range(3):
            state, _ = em.update(state, x)
        states.append(em.get_params(state))
    covs = states[1]["covs"]
    if form == "scale_tril":
        np.testing.assert_allclose(states[0]["mats"], np.linalg.cholesky(covs), atol=1e-8)
    else:
        np.testing.assert_allclose(states[0]["mats"], np.linalg.inv(covs), atol=1e-8)
    np.testing.assert_allclose(states[0]["locs"], states[1]["locs"], atol=1e-8)


# ------------------------------------------------- a family added through the registry
class Rayleigh(dist.Distribution):
    r"""A user's own distribution: $p(x \mid \sigma) = x \sigma^{-2} e^{-x^2 / 2\sigma^2}$."""

    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive
    reparametrized_params = ["scale"]

    def __init__(self, scale, validate_args=None):
        self.scale = scale
        super().__init__(batch_shape=jnp.shape(scale), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        u = jax.random.uniform(key, sample_shape + self.batch_shape)
        return self.scale * jnp.sqrt(-2.0 * jnp.log1p(-u))

    def log_prob(self, value):
        return jnp.log(value) - 2.0 * jnp.log(self.scale) - 0.5 * (value / self.scale) ** 2


def _rayleigh_family():
    from numpyro_onlineem import Family
    from numpyro_onlineem.families import contract_data, finish_role, segment_sum

    class RayleighFamily(Family):
        r"""Statistics $n = \sum w$, $s_2 = \sum w x^2$; M step $\sigma^2 = s_2 / 2n$."""

        name = "Rayleigh"
        dist_types = (Rayleigh,)
        role_event_ndim = {"scale": 0}
        role_support = {"scale": constraints.positive}

        def roles(self, base):
            return {"scale": ("scale", base.scale)}

        def suff_stats(self, value, weight, consts, base):
            return {"n": contract_data(weight), "s2": contract_data(weight, value * value)}

        def m_step(self, stats, inputs):
            g, nb = inputs.groups["scale"]
            n = segment_sum(inputs.num_data * stats["n"], g, nb)
            s2 = segment_sum(inputs.num_data * stats["s2"], g, nb)
            scale = jnp.sqrt(s2 / (2.0 * jnp.where(n > 0, n, 1.0)))
            scale = jnp.where(n > inputs.options.min_count, scale, inputs.current["scale"])
            return {"scale": finish_role(inputs.finish, "scale", scale, n)}

    return RayleighFamily()


@pytest.fixture
def rayleigh_family():
    from numpyro_onlineem import families, register_family

    fam = register_family(_rayleigh_family())
    yield fam
    families._REGISTRY.remove(fam)


def rayleigh_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    scales = numpyro.param("scales", jnp.linspace(0.5, 3.0, K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", Rayleigh(scales[z]), obs=x)


def _rayleigh_ll(x, scales):
    s = scales[None]
    return np.log(x[:, None]) - 2 * np.log(s) - 0.5 * (x[:, None] / s) ** 2


def _rayleigh_m_step(x, resp):
    return np.sqrt((resp * x[:, None] ** 2).sum(0) / (2 * resp.sum(0)))


def test_a_family_added_through_the_registry_is_fitted(rng, x64, rayleigh_family):
    from numpyro_onlineem.mstep.plan import UnsupportedModelError

    z = rng.choice(2, 3000, p=[0.35, 0.65])
    x = np.array([1.0, 4.0])[z] * np.sqrt(-2 * np.log(rng.uniform(size=3000)))
    # full-batch limit: the iterates of NumPy EM, to float64 precision
    em = OnlineEM(rayleigh_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x)
    assert em.mstep_paths(state)["scales"].startswith("closed form: Rayleigh scale")
    for _ in range(10):
        state, _ = em.update(state, x)
    w, s = _numpy_em(
        x, np.array([0.5, 0.5]), np.array([0.5, 3.0]), _rayleigh_ll, _rayleigh_m_step, 10
    )
    np.testing.assert_allclose(em.get_params(state)["weights"], w, rtol=1e-8)
    np.testing.assert_allclose(em.get_params(state)["scales"], s, rtol=1e-8)
    # online, one pass of single points with the defaults: NumPy EM's optimum
    z = rng.choice(2, 20_000, p=[0.35, 0.65])
    x_stream = np.array([1.0, 4.0])[z] * np.sqrt(-2 * np.log(rng.uniform(size=20_000)))
    result = OnlineEM(rayleigh_mixture).run(
        jax.random.PRNGKey(1), iter(x_stream), progress_bar=False
    )
    w_opt, s_opt = _numpy_em(x_stream, w, s, _rayleigh_ll, _rayleigh_m_step, 300)

    def loglik(weights, scales):
        logp = np.log(weights)[None] + _rayleigh_ll(x_stream, np.asarray(scales, float))
        return logsumexp(logp, axis=1).mean()

    params = result.params
    assert loglik(params["weights"], params["scales"]) > loglik(w_opt, s_opt) - 0.002
    np.testing.assert_allclose(params["scales"], s_opt, rtol=0.05)

    # a family without center roles gets no data-driven start: identical placeholders
    # are refused rather than fitted as one component
    def identical(x, K=2):
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        scales = numpyro.param("scales", jnp.ones(K), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", Rayleigh(scales[z]), obs=x)

    with pytest.raises(ValueError, match="start identical"):
        OnlineEM(identical).init(jax.random.PRNGKey(0), x)
    # unregistered, the same model is refused with a message that lists the registry
    from numpyro_onlineem import families

    families._REGISTRY.remove(rayleigh_family)
    try:
        with pytest.raises(UnsupportedModelError, match="registered family.*Normal"):
            OnlineEM(rayleigh_mixture, mstep={"scales": "closed_form"}).init(
                jax.random.PRNGKey(0), x[:100]
            )
    finally:
        families._REGISTRY.insert(0, rayleigh_family)
