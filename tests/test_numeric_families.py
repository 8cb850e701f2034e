"""Families with exact statistics and a Newton maximiser (Gamma, Beta, Dirichlet, von
Mises), each against an independent reference: SciPy's maximum-likelihood fits, and
NumPy batch EM whose M step is `scipy.optimize`."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from scipy import optimize, stats
from scipy.special import logsumexp

from numpyro_onlineem import OnlineEM
from numpyro_onlineem.families import MStepInputs, MStepOptions, find_family

NEWTON = "exact statistics, Newton maximiser"


# ----------------------------------------------------------------- references
def _minimize(nll, x0):
    """A tight BFGS minimum of ``nll`` from ``x0`` (unconstrained coordinates)."""
    res = optimize.minimize(nll, x0, method="BFGS", options={"gtol": 1e-10, "maxiter": 2000})
    return res.x


def _gamma_wmle(x, w, rate=None):
    """Weighted Gamma MLE (concentration, rate) in log coordinates; a fixed ``rate``
    leaves the concentration alone."""
    if rate is None:
        nll = lambda u: -np.sum(w * stats.gamma.logpdf(x, np.exp(u[0]), scale=np.exp(-u[1])))
        return np.exp(_minimize(nll, [0.0, 0.0]))
    nll = lambda u: -np.sum(w * stats.gamma.logpdf(x, np.exp(u[0]), scale=1.0 / rate))
    return np.exp(_minimize(nll, [0.0]))[0]


def _beta_wmle(x, w):
    nll = lambda u: -np.sum(w * stats.beta.logpdf(x, np.exp(u[0]), np.exp(u[1])))
    return np.exp(_minimize(nll, [0.0, 0.0]))


def _dirichlet_wmle(x, w):
    logx = np.log(x)

    def nll(u):
        a = np.exp(u)
        from scipy.special import gammaln

        return -np.sum(w * (gammaln(a.sum()) - gammaln(a).sum() + ((a - 1) * logx).sum(-1)))

    return np.exp(_minimize(nll, np.zeros(x.shape[-1])))


def _vonmises_wmle(x, w, loc=None, loc0=0.0):
    """Weighted von Mises MLE (loc, concentration); a fixed ``loc`` leaves the
    concentration alone."""
    if loc is None:
        nll = lambda u: -np.sum(w * stats.vonmises.logpdf(x, np.exp(u[1]), loc=u[0]))
        u = _minimize(nll, [loc0, 0.0])
        return np.array([np.angle(np.exp(1j * u[0])), np.exp(u[1])])
    nll = lambda u: -np.sum(w * stats.vonmises.logpdf(x, np.exp(u[0]), loc=loc))
    return np.exp(_minimize(nll, [0.0]))[0]


def _numpy_em(x, weights, params, log_lik, m_step, num_iters):
    """Plain batch EM: responsibilities in log space, then the reference M step."""
    for _ in range(num_iters):
        logp = np.log(weights)[None] + log_lik(x, params)
        resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        weights = resp.mean(0)
        params = m_step(x, resp, params)
    return weights, params


def _m_step_alone(family, value, weight, roles, consts=None, priors=None, current=None):
    """A family's M step on the exact statistics of weighted data, one block per role
    (``value``: ``(n,)`` or ``(n, D)``)."""
    n = len(value)
    v = jnp.asarray(value)[:, None]
    w = jnp.asarray(weight)[:, None]
    consts = {k: jnp.full((n, 1), c) for k, c in (consts or {}).items()}
    stats_ = {k: s / n for k, s in family.suff_stats(v, w, consts, None).items()}
    ev = family.role_event_ndim
    current = current or {}
    cur = {r: jnp.asarray(current.get(r, 1.0 if not ev[r] else np.ones(value.shape[-1])))[None]
           for r in roles}  # fmt: skip
    inputs = MStepInputs(
        groups={r: (np.zeros(1, np.int32), 1) for r in roles},
        current=cur,
        priors=priors or {},
        num_data=float(n),
        options=MStepOptions(),
        attrs={r: r for r in roles},
        reparams={},
    )
    return {k: np.asarray(v)[0] for k, v in family.m_step(stats_, inputs).items()}


# ------------------------------------------------------- the M step alone vs SciPy
def test_gamma_m_step_is_the_weighted_mle(rng, x64):
    fam = find_family(dist.Gamma(1.0, 1.0))
    x = rng.gamma(3.0, 1.0 / 2.0, 500)
    # unit weights: SciPy's own fit
    a_ref, _, scale_ref = stats.gamma.fit(x, floc=0)
    out = _m_step_alone(fam, x, np.ones(500), ["concentration", "rate"])
    np.testing.assert_allclose(out["concentration"], a_ref, rtol=1e-5)
    np.testing.assert_allclose(out["rate"], 1.0 / scale_ref, rtol=1e-5)
    # weighted, from a start far from the maximiser
    w = rng.uniform(0.1, 1.0, 500)
    out = _m_step_alone(
        fam, x, w, ["concentration", "rate"], current={"concentration": 50.0, "rate": 0.01}
    )
    np.testing.assert_allclose([out["concentration"], out["rate"]], _gamma_wmle(x, w), rtol=1e-6)
    # the concentration alone (constant rate): the weighted MLE given the rate
    out = _m_step_alone(fam, x, w, ["concentration"], consts={"rate": 2.5})
    np.testing.assert_allclose(out["concentration"], _gamma_wmle(x, w, rate=2.5), rtol=1e-6)
    # the rate alone, under a Gamma(a, b) prior: the posterior mode, found numerically
    a, b = 3.0, 4.0
    prior = {"rate": {"concentration": jnp.array([a]), "rate": jnp.array([b])}}
    out = _m_step_alone(fam, x, w, ["rate"], consts={"concentration": 3.0}, priors=prior)
    # the mode in the rate itself (not in log rate): a bounded search over the rate
    mode = optimize.minimize_scalar(
        lambda r: (
            -(
                np.sum(w * stats.gamma.logpdf(x, 3.0, scale=1.0 / r))
                + stats.gamma.logpdf(r, a, scale=1.0 / b)
            )
        ),
        bounds=(1e-3, 100.0),
        method="bounded",
        options={"xatol": 1e-10},
    ).x
    np.testing.assert_allclose(out["rate"], mode, rtol=1e-6)


def test_beta_m_step_is_the_weighted_mle(rng, x64):
    fam = find_family(dist.Beta(1.0, 1.0))
    x = rng.beta(2.0, 5.0, 400)
    a_ref, b_ref, _, _ = stats.beta.fit(x, floc=0, fscale=1)
    out = _m_step_alone(fam, x, np.ones(400), ["concentration1", "concentration0"])
    np.testing.assert_allclose([out["concentration1"], out["concentration0"]], [a_ref, b_ref],
                               rtol=1e-4)  # fmt: skip
    w = rng.uniform(0.1, 1.0, 400)
    out = _m_step_alone(
        fam, x, w, ["concentration1", "concentration0"],
        current={"concentration1": 30.0, "concentration0": 0.1},
    )  # fmt: skip
    ref = _beta_wmle(x, w)
    np.testing.assert_allclose([out["concentration1"], out["concentration0"]], ref, rtol=1e-6)
    # one role learned, the other a constant
    out = _m_step_alone(fam, x, w, ["concentration1"], consts={"concentration0": 4.0})
    nll = lambda u: -np.sum(w * stats.beta.logpdf(x, np.exp(u[0]), 4.0))
    np.testing.assert_allclose(out["concentration1"], np.exp(_minimize(nll, [0.0]))[0], rtol=1e-6)


def test_dirichlet_m_step_is_the_weighted_mle(rng, x64):
    fam = find_family(dist.Dirichlet(jnp.ones(4)))
    x = rng.dirichlet([8.0, 3.0, 1.5, 20.0], 600)
    w = rng.uniform(0.1, 1.0, 600)
    ref = _dirichlet_wmle(x, w)
    for start in (np.ones(4), np.full(4, 200.0), np.array([0.01, 5.0, 0.3, 1.0])):
        out = _m_step_alone(fam, x, w, ["concentration"], current={"concentration": start})
        np.testing.assert_allclose(out["concentration"], ref, rtol=1e-6)


def test_vonmises_m_step_is_the_weighted_mle(rng, x64):
    fam = find_family(dist.VonMises(0.0, 1.0))
    x = stats.vonmises.rvs(4.0, loc=2.8, size=500, random_state=rng)
    kappa_ref, loc_ref, _ = stats.vonmises.fit(x, fscale=1)
    out = _m_step_alone(fam, x, np.ones(500), ["loc", "concentration"])
    np.testing.assert_allclose(out["loc"], loc_ref, atol=1e-6)
    np.testing.assert_allclose(out["concentration"], kappa_ref, rtol=1e-5)
    w = rng.uniform(0.1, 1.0, 500)
    out = _m_step_alone(
        fam, x, w, ["loc", "concentration"], current={"loc": -2.0, "concentration": 200.0}
    )
    ref = _vonmises_wmle(x, w, loc0=2.8)
    np.testing.assert_allclose([out["loc"], out["concentration"]], ref, rtol=1e-6)
    # a constant location: the concentration given it; a constant concentration: atan2
    out = _m_step_alone(fam, x, w, ["concentration"], consts={"loc": 2.0})
    np.testing.assert_allclose(out["concentration"], _vonmises_wmle(x, w, loc=2.0), rtol=1e-6)
    out = _m_step_alone(fam, x, w, ["loc"], consts={"concentration": 3.0})
    np.testing.assert_allclose(out["loc"], ref[0], atol=1e-6)


# ------------------------------------------------------------------- mixtures
def gamma_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    conc = numpyro.param("conc", jnp.linspace(1.0, 5.0, K), constraint=constraints.positive)
    rate = numpyro.param("rate", jnp.linspace(1.0, 0.5, K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Gamma(conc[z], rate[z]), obs=x)


def _gamma_data(rng, n):
    # shapes 2 and 9, means 2 and 8
    z = rng.choice(2, n, p=[0.4, 0.6])
    conc, rate = np.array([2.0, 9.0]), np.array([1.0, 9.0 / 8.0])
    return rng.gamma(conc[z], 1.0 / rate[z])


def _gamma_mix_ll(x, w, conc, rate):
    logp = np.log(w)[None] + stats.gamma.logpdf(x[:, None], conc[None], scale=1.0 / rate[None])
    return logsumexp(logp, axis=1).mean()


def _gamma_mix_mle(x):
    """The full-batch MLE of a 2-component Gamma mixture by `scipy.optimize.minimize`
    from several starts: (mean log-likelihood, weights, conc, rate)."""

    def unpack(u):
        w = np.exp(u[:2] - logsumexp(u[:2]))
        return w, np.exp(u[2:4]), np.exp(u[4:6])

    nll = lambda u: -_gamma_mix_ll(x, *unpack(u))
    best = None
    for c0, m0 in [((1.0, 5.0), (1.0, 10.0)), ((3.0, 3.0), (1.5, 6.0)), ((1.0, 1.0), (2.0, 8.0))]:
        u0 = np.r_[0.0, 0.0, np.log(c0), np.log(np.array(c0) / np.array(m0))]
        res = optimize.minimize(nll, u0, method="BFGS", options={"gtol": 1e-9, "maxiter": 5000})
        if best is None or res.fun < best.fun:
            best = res
    return (-best.fun, *unpack(best.x))


def test_gamma_mixture_reaches_the_scipy_mle(rng):
    x = _gamma_data(rng, 3000)
    ll_mle, w_mle, c_mle, r_mle = _gamma_mix_mle(x)
    em = OnlineEM(gamma_mixture)
    state = em.init(jax.random.PRNGKey(0), x[:300].astype(np.float32))
    assert em.mstep_paths(state)["conc"].startswith(f"{NEWTON}: Gamma concentration of site")
    assert em.mstep_paths(state)["rate"].startswith(f"{NEWTON}: Gamma rate of site")
    # the default online run: five shuffled passes in batches of 100
    stream = np.concatenate([x[rng.permutation(len(x))] for _ in range(5)]).astype(np.float32)
    params = em.run(jax.random.PRNGKey(1), stream, batch_size=100, progress_bar=False).params
    w, c, r = (np.asarray(params[k], np.float64) for k in ("weights", "conc", "rate"))
    gap = ll_mle - _gamma_mix_ll(x, w, c, r)
    assert gap < 0.005, gap  # 6e-4 nats/point measured
    # shape and rate move together along a flat ridge of the likelihood, which online EM
    # descends slowly (batch EM takes ~100 iterations): within the sampling error only
    perm = _match(c / r, c_mle / r_mle)
    np.testing.assert_allclose((c / r)[perm], c_mle / r_mle, rtol=0.12)
    np.testing.assert_allclose(c[perm], c_mle, rtol=0.25)
    np.testing.assert_allclose(r[perm], r_mle, rtol=0.25)
    np.testing.assert_allclose(w[perm], w_mle, atol=0.05)


def test_gamma_mixture_batch_limit_reaches_the_scipy_mle(rng, x64):
    """Full-batch steps (step size 1): batch EM, whose fixed point is the MLE."""
    x = _gamma_data(rng, 3000)
    ll_mle, w_mle, c_mle, r_mle = _gamma_mix_mle(x)
    em = OnlineEM(gamma_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x)
    for _ in range(150):
        state, _ = em.update(state, x)
    params = em.get_params(state)
    w, c, r = (np.asarray(params[k]) for k in ("weights", "conc", "rate"))
    assert abs(ll_mle - _gamma_mix_ll(x, w, c, r)) < 1e-6
    perm = _match(c / r, c_mle / r_mle)
    np.testing.assert_allclose(c[perm], c_mle, rtol=1e-3)
    np.testing.assert_allclose(r[perm], r_mle, rtol=1e-3)


def _match(est, ref):
    """The permutation of ``est`` closest to ``ref``."""
    return list(
        min(itertools.permutations(range(len(ref))), key=lambda p: np.abs(est[list(p)] - ref).sum())
    )


def gamma_fixed_rate(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    conc = numpyro.param("conc", jnp.array([1.0, 4.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Gamma(conc[z], 2.0), obs=x)


def test_gamma_with_a_constant_rate_equals_numpy_em(rng, x64):
    z = rng.choice(2, 2000, p=[0.3, 0.7])
    x = rng.gamma(np.array([1.5, 8.0])[z], 0.5)
    em = OnlineEM(gamma_fixed_rate, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x)
    assert em.mstep_paths(state)["conc"].startswith(f"{NEWTON}: Gamma concentration")
    for _ in range(6):
        state, _ = em.update(state, x)
    log_lik = lambda x, c: stats.gamma.logpdf(x[:, None], c[None], scale=0.5)
    m_step = lambda x, resp, c: np.array([_gamma_wmle(x, resp[:, k], rate=2.0) for k in range(2)])
    w, c = _numpy_em(x, np.array([0.5, 0.5]), np.array([1.0, 4.0]), log_lik, m_step, 6)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(params["conc"], c, rtol=1e-6)


def beta_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    a = numpyro.param("a", jnp.array([1.0, 5.0]), constraint=constraints.positive)
    b = numpyro.param("b", jnp.array([5.0, 1.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Beta(a[z], b[z]), obs=x)


def test_beta_mixture_equals_numpy_em(rng, x64):
    z = rng.choice(2, 2000, p=[0.45, 0.55])
    x = rng.beta(np.array([2.0, 9.0])[z], np.array([8.0, 3.0])[z])
    em = OnlineEM(beta_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x)
    assert em.mstep_paths(state)["a"].startswith(f"{NEWTON}: Beta concentration1")
    for _ in range(5):
        state, _ = em.update(state, x)

    def log_lik(x, ab):
        return stats.beta.logpdf(x[:, None], ab[None, :, 0], ab[None, :, 1])

    m_step = lambda x, resp, ab: np.array([_beta_wmle(x, resp[:, k]) for k in range(2)])
    init = np.array([[1.0, 5.0], [5.0, 1.0]])
    w, ab = _numpy_em(x, np.array([0.5, 0.5]), init, log_lik, m_step, 5)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(np.c_[params["a"], params["b"]], ab, rtol=1e-6)


def dirichlet_mixture(x, K=2):
    d = x.shape[-1]
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    conc = numpyro.param(
        "conc", jnp.ones((K, d)) + jnp.arange(K)[:, None], constraint=constraints.positive
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Dirichlet(conc[z]), obs=x)


def test_dirichlet_mixture_equals_numpy_em(rng, x64):
    alpha = np.array([[10.0, 2.0, 2.0], [2.0, 3.0, 12.0]])
    z = rng.choice(2, 1500, p=[0.4, 0.6])
    x = np.stack([rng.dirichlet(alpha[k]) for k in z])
    init = {"weights": np.array([0.5, 0.5]), "conc": np.array([[3.0, 1.0, 1.0], [1.0, 1.0, 3.0]])}
    em = OnlineEM(dirichlet_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x, init_params=init)
    assert em.mstep_paths(state)["conc"].startswith(f"{NEWTON}: Dirichlet concentration")
    for _ in range(5):
        state, _ = em.update(state, x)
    log_lik = lambda x, a: np.stack([stats.dirichlet.logpdf(x.T, ak) for ak in a], -1)
    m_step = lambda x, resp, a: np.array([_dirichlet_wmle(x, resp[:, k]) for k in range(2)])
    w, a = _numpy_em(x, init["weights"], init["conc"], log_lik, m_step, 5)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(params["conc"], a, rtol=1e-6)


def vonmises_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]), constraint=constraints.circular)
    kappa = numpyro.param("kappa", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.VonMises(loc[z], kappa[z]), obs=x)


def test_vonmises_mixture_equals_numpy_em(rng, x64):
    z = rng.choice(2, 2000, p=[0.35, 0.65])
    # one component straddles the wrap-around at +-pi
    x = stats.vonmises.rvs(np.array([8.0, 3.0])[z], loc=np.array([3.0, 0.5])[z], random_state=rng)
    em = OnlineEM(vonmises_mixture, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x)
    paths = em.mstep_paths(state)
    assert paths["loc"].startswith(f"{NEWTON}: VonMises loc")
    assert paths["kappa"].startswith(f"{NEWTON}: VonMises concentration")
    for _ in range(6):
        state, _ = em.update(state, x)

    def log_lik(x, p):
        return stats.vonmises.logpdf(x[:, None], p[None, :, 1], loc=p[None, :, 0])

    def m_step(x, resp, p):
        return np.array([_vonmises_wmle(x, resp[:, k], loc0=p[k, 0]) for k in range(2)])

    init = np.array([[-1.0, 1.0], [1.0, 1.0]])
    w, p = _numpy_em(x, np.array([0.5, 0.5]), init, log_lik, m_step, 6)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(params["loc"], p[:, 0], atol=1e-6)
    np.testing.assert_allclose(params["kappa"], p[:, 1], rtol=1e-6)


def vonmises_fixed_loc(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    kappa = numpyro.param("kappa", jnp.array([0.5, 5.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.VonMises(0.5, kappa[z]), obs=x)


def test_vonmises_with_a_constant_loc_equals_numpy_em(rng, x64):
    z = rng.choice(2, 2000, p=[0.5, 0.5])
    x = stats.vonmises.rvs(np.array([1.0, 20.0])[z], loc=0.5, random_state=rng)
    em = OnlineEM(vonmises_fixed_loc, step_size=1.0, burn_in=0, init="model")
    state = em.init(jax.random.PRNGKey(0), x)
    for _ in range(6):
        state, _ = em.update(state, x)
    log_lik = lambda x, k: stats.vonmises.logpdf(x[:, None], k[None], loc=0.5)
    m_step = lambda x, resp, k: np.array([_vonmises_wmle(x, resp[:, j], loc=0.5) for j in range(2)])
    w, k = _numpy_em(x, np.array([0.5, 0.5]), np.array([0.5, 5.0]), log_lik, m_step, 6)
    params = em.get_params(state)
    np.testing.assert_allclose(params["weights"], w, rtol=1e-6)
    np.testing.assert_allclose(params["kappa"], k, rtol=1e-6)


def test_beta_mixture_log_likelihood_of_many_points_equals_scipy(rng):
    """20,000 points of a 3-component Beta mixture: a (3, 20000) grid. NumPyro's
    ``Beta.log_prob`` there was miscompiled by XLA:CPU (jaxlib 0.10.2; 14.9 nats/point
    against 0.18); the library writes the Beta density out."""

    def model(x, K=3):
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        a = numpyro.param("a", jnp.array([1.0, 2.0, 3.0]), constraint=constraints.positive)
        b = numpyro.param("b", jnp.array([3.0, 2.0, 1.0]), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Beta(a[z], b[z]), obs=x)

    params = {
        "weights": np.array([0.372, 0.447, 0.181]),
        "a": np.array([1.430747, 14.674702, 1.8546219]),
        "b": np.array([6.0231204, 14.863576, 0.5265]),
    }
    x = rng.uniform(0.01, 0.99, 20_000).astype(np.float32)
    em = OnlineEM(model, init="model")
    state = em.init(jax.random.PRNGKey(0), x[:500], init_params=params)
    ours = np.asarray(em.log_likelihood(state, x))
    dens = sum(
        w * stats.beta.pdf(x.astype(np.float64), a, b)
        for w, a, b in zip(params["weights"], params["a"], params["b"], strict=True)
    )
    np.testing.assert_allclose(ours, np.log(dens), rtol=1e-4, atol=1e-4)
