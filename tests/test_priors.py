"""Global sites with conjugate priors: the M step is the closed-form posterior mode."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import norm

from numpyro_onlineem import OnlineEM, UnsupportedModelError


def gmm_dirichlet(x, K=3, alpha=3.0, size=None):
    weights = numpyro.sample("weights", dist.Dirichlet(alpha * jnp.ones(K)))
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    scales = numpyro.param("scales", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    n = x.shape[0] if size is None else size
    with numpyro.plate("data", n, subsample_size=x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)


def _responsibilities(x, weights, locs, scales):
    logp = np.log(weights) + norm.logpdf(x[:, None], locs[None], scales[None]).sum(-1)
    return np.exp(logp - logsumexp(logp, 1, keepdims=True))


def _data(rng, n=500):
    centers = np.array([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    z = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    return centers[z] + rng.normal(size=(n, 2)), centers


@pytest.mark.parametrize("total", [None, 5000])
def test_dirichlet_map_equals_posterior_mode(rng, x64, total):
    """One full-data step with gamma = 1: weights = (N r_k + alpha - 1) / (N + K alpha - K),
    with N the data plate's size (``subsample_size`` makes N the stream's total)."""
    x, centers = _data(rng)
    alpha, k = 3.0, 3
    init = {"weights": np.array([0.2, 0.3, 0.5]), "locs": centers + 0.3, "scales": np.ones((3, 2))}
    em = OnlineEM(gmm_dirichlet, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, 3, alpha, total, init_params=init)
    assert "posterior mode under its Dirichlet prior" in em.mstep_paths(state)["weights"]
    state, _ = em.update(state, x, 3, alpha, total)
    r = _responsibilities(x, init["weights"], init["locs"], init["scales"])
    n = len(x) if total is None else total
    expected = (n * r.mean(0) + alpha - 1) / (n + k * alpha - k)
    np.testing.assert_allclose(em.get_params(state)["weights"], expected, rtol=1e-8)


def test_dirichlet_map_fixed_point(rng, x64):
    """Iterated to convergence, the weights satisfy the MAP fixed-point equation."""
    x, centers = _data(rng, 200)
    alpha = 5.0
    em = OnlineEM(gmm_dirichlet, step_size=1.0, burn_in=0, init="model")
    state = em.init(
        jax.random.PRNGKey(0), x, 3, alpha, init_params={"locs": centers, "weights": np.ones(3) / 3}
    )
    for _ in range(200):
        state, _ = em.update(state, x, 3, alpha)
    p = em.get_params(state)
    r = _responsibilities(
        x, np.asarray(p["weights"]), np.asarray(p["locs"]), np.asarray(p["scales"])
    )
    expected = (r.sum(0) + alpha - 1) / (len(x) + 3 * alpha - 3)
    np.testing.assert_allclose(p["weights"], expected, rtol=1e-6)


def test_normal_prior_on_locations_shrinks_to_posterior_mode(rng, x64):
    """loc ~ Normal(m0, s0): mu = (m0/s0^2 + sum_i r_ik x_i / sigma^2) / (1/s0^2 + n_k/sigma^2)."""

    def model(x):
        K = 2
        locs = numpyro.sample("locs", dist.Normal(jnp.array([[1.0], [-1.0]]), 0.5).to_event(2))
        scales = numpyro.param("scales", jnp.ones((K, 1)), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

    x = np.concatenate([rng.normal(4.0, 1.0, 20), rng.normal(-4.0, 1.0, 20)])[:, None]
    init = {"locs": np.array([[3.0], [-3.0]]), "scales": np.array([[2.0], [1.5]])}
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    state, _ = em.update(state, x)
    r = _responsibilities(x, np.array([0.5, 0.5]), init["locs"], init["scales"])
    s2 = init["scales"][:, 0] ** 2
    m0, p0 = np.array([1.0, -1.0]), 1 / 0.25
    expected = (m0 * p0 + (r * x).sum(0) / s2) / (p0 + r.sum(0) / s2)
    np.testing.assert_allclose(em.get_params(state)["locs"][:, 0], expected, rtol=1e-8)


def test_beta_bernoulli_and_gamma_poisson_modes(rng, x64):
    """Single-component models (no latent): MAP = closed-form posterior mode."""

    def model(x, y):
        p = numpyro.sample("p", dist.Beta(3.0, 2.0))
        rate = numpyro.sample("rate", dist.Gamma(4.0, 2.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Bernoulli(p), obs=x)
            numpyro.sample("y", dist.Poisson(rate), obs=y)

    x = (rng.uniform(size=50) < 0.3).astype(float)
    y = rng.poisson(2.5, size=50).astype(float)
    em = OnlineEM(model, step_size=1.0, burn_in=0)
    state = em.init(jax.random.PRNGKey(0), x, y)
    state, _ = em.update(state, x, y)
    p = em.get_params(state)
    np.testing.assert_allclose(p["p"], (x.sum() + 3 - 1) / (50 + 3 + 2 - 2), rtol=1e-8)
    np.testing.assert_allclose(p["rate"], (y.sum() + 4 - 1) / (50 + 2), rtol=1e-8)


def test_non_conjugate_prior_is_reported(rng):
    def model(x):
        locs = numpyro.param("locs", jnp.zeros((2, 1)))
        scales = numpyro.sample("scales", dist.HalfCauchy(jnp.ones((2, 1))).to_event(2))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("obs", dist.Normal(locs[z], scales[z]).to_event(1), obs=x)

    with pytest.raises(UnsupportedModelError, match="'scales' has a HalfCauchy prior"):
        OnlineEM(model, mstep={"scales": "closed_form"}).init(
            jax.random.PRNGKey(0), rng.normal(size=(10, 1))
        )


@pytest.mark.parametrize("form", ["covariance_matrix", "precision_matrix"])
def test_wishart_priors_give_posterior_mode(rng, x64, form):
    """InverseWishart(nu, Psi) on a covariance: (Psi + S) / (n + nu + D + 1);
    Wishart(nu, V) on a precision: (n + nu - D - 1) (V^-1 + S)^-1; S the scatter matrix."""
    d, nu = 3, 7.0
    psi = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.5]])
    mean = np.array([1.0, -1.0, 0.5])
    prior = {"covariance_matrix": dist.InverseWishart, "precision_matrix": dist.Wishart}[form]

    def model(x):
        loc = numpyro.param("loc", jnp.zeros(d))
        mat = numpyro.sample("mat", prior(nu, scale_matrix=jnp.asarray(psi)))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.MultivariateNormal(loc, **{form: mat}), obs=x)

    x = rng.multivariate_normal(mean, np.eye(d), size=40)
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params={"loc": mean})
    state, _ = em.update(state, x)
    xbar = x.mean(0)
    scatter = (x - xbar).T @ (x - xbar)
    if form == "covariance_matrix":
        expected = (psi + scatter) / (len(x) + nu + d + 1)
    else:
        expected = (len(x) + nu - d - 1) * np.linalg.inv(np.linalg.inv(psi) + scatter)
    p = em.get_params(state)
    np.testing.assert_allclose(p["loc"], xbar, rtol=1e-10)
    np.testing.assert_allclose(p["mat"], expected, rtol=1e-8)
    with pytest.raises(UnsupportedModelError, match="Conjugate choices"):
        other = {"covariance_matrix": "precision_matrix", "precision_matrix": "covariance_matrix"}

        def wrong(x):
            loc = numpyro.param("loc", jnp.zeros(d))
            mat = numpyro.sample("mat", prior(nu, scale_matrix=jnp.asarray(psi)))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("obs", dist.MultivariateNormal(loc, **{other[form]: mat}), obs=x)

        OnlineEM(wrong, mstep={"mat": "closed_form"}).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "form,prior,a,b",
    [("precision", dist.Gamma, 3.0, 2.0), ("variance", dist.InverseGamma, 3.0, 2.0)],
)
def test_gamma_precision_and_inverse_gamma_variance_modes(rng, x64, form, prior, a, b):
    """Normal(mu, tau ** -0.5) with tau ~ Gamma(a, b): tau = (n/2 + a - 1) / (q/2 + b);
    Normal(mu, var ** 0.5) with var ~ InverseGamma(a, b): var = (q/2 + b) / (n/2 + a + 1);
    q the sum of squares about the mean (the location is a maximum-likelihood param)."""

    def model(x):
        loc = numpyro.param("loc", 0.0)
        s = numpyro.sample("s", prior(a, b))
        scale = s**-0.5 if form == "precision" else jnp.sqrt(s)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(loc, scale), obs=x)

    x = rng.normal(2.0, 1.5, size=60)
    em = OnlineEM(model, step_size=1.0, burn_in=0)
    state = em.init(jax.random.PRNGKey(0), x)
    assert f"as a {form}" in em.mstep_paths(state)["s"]
    assert f"posterior mode under its {prior.__name__} prior" in em.mstep_paths(state)["s"]
    state, _ = em.update(state, x)
    n, q = len(x), np.sum((x - x.mean()) ** 2)
    if form == "precision":
        expected = (n / 2 + a - 1) / (q / 2 + b)
    else:
        expected = (q / 2 + b) / (n / 2 + a + 1)
    p = em.get_params(state)
    np.testing.assert_allclose(p["loc"], x.mean(), rtol=1e-10)
    np.testing.assert_allclose(p["s"], expected, rtol=1e-10)


def test_mixture_with_gamma_precisions_matches_numpy_map_em(rng, x64):
    """Per-component precisions tau[z] ~ Gamma(a, b), three batch EM iterations (step 1,
    the whole data every batch) against the same MAP EM written in NumPy."""
    a, b, K = 2.5, 1.0, 2

    def model(x):
        locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
        taus = numpyro.sample("taus", dist.Gamma(a * jnp.ones(K), b).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.4, 0.6])))
            numpyro.sample("obs", dist.Normal(locs[z], taus[z] ** -0.5), obs=x)

    x = np.concatenate([rng.normal(-2.0, 0.5, 80), rng.normal(1.5, 1.2, 120)])
    locs, taus = np.array([-1.0, 1.0]), np.array([1.0, 1.0])
    em = OnlineEM(model, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params={"locs": locs, "taus": taus})
    for _ in range(3):
        state, _ = em.update(state, x)
        r = _responsibilities(
            x[:, None], np.array([0.4, 0.6]), locs[:, None], taus[:, None] ** -0.5
        )
        nk = r.sum(0)
        locs = (r * x[:, None]).sum(0) / nk
        q = (r * (x[:, None] - locs) ** 2).sum(0)
        taus = (nk / 2 + a - 1) / (q / 2 + b)
    p = em.get_params(state)
    np.testing.assert_allclose(p["locs"], locs, rtol=1e-8)
    np.testing.assert_allclose(p["taus"], taus, rtol=1e-8)


def test_gamma_prior_on_the_scale_itself_is_reported(rng):
    """A Gamma prior is conjugate to a precision, not to a standard deviation."""

    def model(x):
        s = numpyro.sample("s", dist.Gamma(2.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(0.0, s), obs=x)

    with pytest.raises(UnsupportedModelError, match="'s' has a Gamma prior.*as the scale"):
        OnlineEM(model, mstep={"s": "closed_form"}).init(jax.random.PRNGKey(0), rng.normal(size=10))

    def wrong_family(x):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(0.0, s**-0.5), obs=x)

    with pytest.raises(
        UnsupportedModelError, match=r"as the precision.*Conjugate choices: \['Gamma'\]"
    ):
        OnlineEM(wrong_family, mstep={"s": "closed_form"}).init(
            jax.random.PRNGKey(0), rng.normal(size=10)
        )
