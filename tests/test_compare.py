"""compare_with_nuts and to_inference_data, against closed-form posteriors and known
permutations.

Monte Carlo tolerances are 4 Monte Carlo standard errors, estimated by ArviZ from the
draws: of a mean, ``mcse_mean``; of an sd, ``mcse(method="sd")``; of an HDI end, that of
the p-quantile, sqrt(p (1 - p) / ESS_tail) / density.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from numpyro.infer import init_to_value
from numpyro.infer.util import log_density
from scipy import optimize, stats

from numpyro_onlineem import OnlineEM, compare_with_nuts, to_inference_data
from numpyro_onlineem.arviz_io import draws_to_inference_data
from numpyro_onlineem.compare import _check_same_mode, _nuts_model
from numpyro_onlineem.labels import component_axes, match_components, permute_components

SIGMA = np.array([2, 0, 1])  # the online fit's components are the true SIGMA[k]
M0, S0 = 1.0, 0.5  # Normal prior of the means
A0, B0 = 2.0, 3.0  # Beta prior of the probability
SIGMA_B = 0.8  # known sd


CENTERS = np.array([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]], np.float32)


def blocks(x, N, K=3):
    """Independent blocks in one data plate, so that one NUTS run serves every end-to-end
    test: the posterior factorises, and each block's posterior is its own."""
    mu = numpyro.sample("mu", dist.Normal(M0, S0))  # Normal mean; its sd is a param
    nu = numpyro.sample("nu", dist.Normal(M0, S0))  # Normal mean, known sd
    p = numpyro.sample("p", dist.Beta(A0, B0))  # Beta-Bernoulli
    lam = numpyro.param("lam", 0.0)  # Normal mean without a prior: MLE
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    # a Gaussian mixture with priors on its weights and means
    weights = numpyro.sample("weights", dist.Dirichlet(2.0 * jnp.ones(K)))
    locs = numpyro.sample("locs", dist.Normal(0.0, 10.0).expand([K, 2]).to_event(2))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("a", dist.Normal(mu, sigma), obs=x[:, 0])
        numpyro.sample("b", dist.Normal(nu, SIGMA_B), obs=x[:, 1])
        numpyro.sample("flip", dist.Bernoulli(p), obs=x[:, 2])
        numpyro.sample("c", dist.Normal(lam, SIGMA_B), obs=x[:, 3])
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x[:, 4:])


def normal_posterior(total, sigma, n):
    """Posterior of a Normal mean under Normal(M0, S0) given n points summing to
    ``total`` with known sd ``sigma``: (mean, sd)."""
    precision = 1 / S0**2 + n / sigma**2
    return (M0 / S0**2 + total / sigma**2) / precision, precision**-0.5


def beta_hdi(a, b, mass=0.94):
    """The narrowest interval of mass ``mass`` of Beta(a, b)."""
    width = lambda lo: stats.beta.ppf(lo + mass, a, b) - stats.beta.ppf(lo, a, b)
    lo = optimize.minimize_scalar(width, bounds=(0, 1 - mass), method="bounded").x
    return stats.beta.ppf(lo, a, b), stats.beta.ppf(lo + mass, a, b)


def mc_tolerances(result, name):
    """4 Monte Carlo standard errors of the NUTS mean and sd of a scalar site."""
    mcse_sd = float(az.mcse(result.nuts, var_names=[name], method="sd")[name])
    return 4 * result.table.loc[name, "mcse_mean"], 4 * mcse_sd


def quantile_tolerance(result, name, density_at_end, p=0.03):
    """4 Monte Carlo standard errors of the p-quantile of a scalar site."""
    ess = float(az.ess(result.nuts, var_names=[name], method="tail")[name])
    return 4 * np.sqrt(p * (1 - p) / ess) / density_at_end


def fit_exactly(em, x, *args, iters=60, **init_kwargs):
    """Online EM with step 1 on all the data: batch EM, iterated to its fixed point."""
    state = em.init(jax.random.PRNGKey(0), x, *args, **init_kwargs)
    for _ in range(iters):
        state, _ = em.update(state, x, *args)
    return state


@pytest.fixture(scope="module")
def fit():
    """One online fit and one NUTS run (2 chains) for the end-to-end tests.

    - 'nu' is held by OnlineEM 5 posterior sd below its posterior mean (mstep fixed);
    - 'lam' gets a Normal prior through param_priors; 'sigma' is held by NUTS;
    - the mixture: online EM starts from the true means in the permuted order SIGMA,
      NUTS from them in order.
    """
    rng = np.random.default_rng(1)
    n = 240
    x = np.stack(
        [
            rng.normal(1.3, 1.5, n),
            rng.normal(-0.4, SIGMA_B, n),
            rng.uniform(size=n) < 0.3,
            rng.normal(0.2, SIGMA_B, n),
        ],
        axis=1,
    )
    x = np.concatenate([x, CENTERS[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))], axis=1)
    x = x.astype(np.float32)
    nu_mean, nu_sd = normal_posterior(x[:, 1].sum(), SIGMA_B, n)
    nu_held = nu_mean - 5 * nu_sd
    em = OnlineEM(blocks, step_size=1.0, burn_in=0, init="model", mstep={"nu": "fixed"})
    state = fit_exactly(em, x, n, iters=100, init_params={"nu": nu_held, "locs": CENTERS[SIGMA]})
    result = compare_with_nuts(
        em, state, x, n, rng_key=jax.random.PRNGKey(1), num_warmup=250, num_samples=500,
        num_chains=2, param_priors={"lam": dist.Normal(M0, S0)},
        nuts_kwargs={"init_strategy": init_to_value(values={"locs": CENTERS})},
    )  # fmt: skip
    return {"x": x, "n": n, "em": em, "state": state, "result": result, "nu_held": nu_held}


def test_table_layout(fit):
    result = fit["result"]
    # model order; sigma has no prior: held at the online estimate, not in the table
    assert list(result.table.index[:4]) == ["mu", "nu", "p", "lam"]
    assert len(result.table) == 4 + 3 + 6  # weights, locs
    assert list(result.table.columns) == [
        "estimate", "mean", "sd", "hdi_3%", "hdi_97%", "mcse_mean", "ess_bulk", "r_hat",
        "z", "inside_hdi",
    ]  # fmt: skip
    assert result.fixed == ("sigma",)
    # Converged, the split R-hat of 4 half chains (of the ranks, and of the ranks of
    # |draw - median|; ArviZ reports the larger) has R^2 - 1 ~ (F - 1) / n_eff with
    # F ~ chi2(3) / 3 and n_eff a half chain's ESS: R - 1 < 2.21 / n_eff at F's 99.9%
    # point. A chain left in another labelling would be far above.
    sites = list(dict.fromkeys(label.split("[")[0] for label in result.table.index))
    folded = az.ess(result.nuts, var_names=sites, method="folded")
    folded = np.concatenate([np.ravel(folded[name].values) for name in sites])
    n_eff = np.minimum(result.table["ess_bulk"], folded) / 4
    assert (result.table["r_hat"] - 1 < 2.21 / n_eff).all(), result.table["r_hat"]
    assert result.nuts_seconds > 0 and result.online_seconds is None
    params = fit["em"].get_params(fit["state"])
    for name in ("mu", "nu", "p", "lam"):
        assert result.table.loc[name, "estimate"] == pytest.approx(float(params[name]))


def test_normal_mean_given_a_held_param(fit):
    """NUTS mean, sd and HDI are the closed form given sigma = the online estimate; the
    online MAP is its mode (= mean)."""
    x, n, result = fit["x"], fit["n"], fit["result"]
    sigma = float(fit["em"].get_params(fit["state"])["sigma"])
    mean, sd = normal_posterior(x[:, 0].sum(), sigma, n)
    row = result.table.loc["mu"]
    assert row["estimate"] == pytest.approx(mean, rel=1e-5)
    tol_mean, tol_sd = mc_tolerances(result, "mu")
    assert row["mean"] == pytest.approx(mean, abs=tol_mean)
    assert row["sd"] == pytest.approx(sd, abs=tol_sd)
    z97 = stats.norm.ppf(0.97)
    tol_end = quantile_tolerance(result, "mu", stats.norm.pdf(z97) / sd)
    assert row["hdi_3%"] == pytest.approx(mean - z97 * sd, abs=tol_end)
    assert row["hdi_97%"] == pytest.approx(mean + z97 * sd, abs=tol_end)
    assert row["inside_hdi"]
    assert abs(row["z"]) < (tol_mean + tol_sd) / sd


def test_estimate_outside_the_hdi(fit):
    """'nu' held 5 posterior sd below the closed-form mean: outside, z = -5."""
    x, n, result = fit["x"], fit["n"], fit["result"]
    mean, sd = normal_posterior(x[:, 1].sum(), SIGMA_B, n)
    row = result.table.loc["nu"]
    assert row["estimate"] == pytest.approx(fit["nu_held"], rel=1e-6)
    tol_mean, tol_sd = mc_tolerances(result, "nu")
    assert row["mean"] == pytest.approx(mean, abs=tol_mean)
    assert row["sd"] == pytest.approx(sd, abs=tol_sd)
    assert not row["inside_hdi"]
    assert row["z"] == pytest.approx(-5.0, abs=(tol_mean + 5 * tol_sd) / sd)


def test_beta_bernoulli(fit):
    x, n, result = fit["x"][:, 2], fit["n"], fit["result"]
    a, b = A0 + x.sum(), B0 + n - x.sum()
    row = result.table.loc["p"]
    assert row["estimate"] == pytest.approx((a - 1) / (a + b - 2), rel=1e-5)  # the mode
    tol_mean, tol_sd = mc_tolerances(result, "p")
    assert row["mean"] == pytest.approx(stats.beta.mean(a, b), abs=tol_mean)
    assert row["sd"] == pytest.approx(stats.beta.std(a, b), abs=tol_sd)
    lo, hi = beta_hdi(a, b)
    for column, end in (("hdi_3%", lo), ("hdi_97%", hi)):
        tol = quantile_tolerance(result, "p", stats.beta.pdf(end, a, b))
        assert row[column] == pytest.approx(end, abs=tol)
    assert row["inside_hdi"] and lo <= row["estimate"] <= hi


def test_param_prior_lifts_a_param_site(fit):
    """param_priors gives the param 'lam' a prior: NUTS samples the conjugate posterior;
    the online estimate is the MLE, the sample mean, and its flag and z are those of the
    closed form."""
    x, n, result = fit["x"][:, 3], fit["n"], fit["result"]
    mean, sd = normal_posterior(x.sum(), SIGMA_B, n)
    row = result.table.loc["lam"]
    assert row["estimate"] == pytest.approx(x.mean(), rel=1e-5)
    tol_mean, tol_sd = mc_tolerances(result, "lam")
    assert row["mean"] == pytest.approx(mean, abs=tol_mean)
    assert row["sd"] == pytest.approx(sd, abs=tol_sd)
    z = (x.mean() - mean) / sd
    assert row["z"] == pytest.approx(z, abs=(tol_mean + abs(z) * tol_sd) / sd)
    assert row["inside_hdi"] == (abs(z) <= stats.norm.ppf(0.97))


def test_plots_are_written(fit, tmp_path):
    result = dataclasses.replace(fit["result"], losses=np.linspace(2.0, 1.0, 300))
    files = result.plot(tmp_path / "plots")
    assert sorted(files) == ["forest", "loss", "posterior"]
    for path in files.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def normal_mean(x, N):
    mu = numpyro.sample("mu", dist.Normal(M0, S0))
    with numpyro.plate("data", N, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(mu, SIGMA_B), obs=x)


@pytest.mark.parametrize("subsample", ["data", "scaled"])
def test_subsampling_plate_log_density(subsample):
    """A plate of size N over n < N points, as NUTS runs it: 'data' is the posterior
    given the n points, 'scaled' the one with their likelihood scaled by N / n."""
    x = np.random.default_rng(0).normal(size=30).astype(np.float32)
    n, total, mu = len(x), 300, 0.3
    model = _nuts_model(normal_mean, {}, {}, subsample)
    log_joint, _ = log_density(model, (x, total), {}, {"mu": mu})
    loglik = stats.norm.logpdf(x, mu, SIGMA_B).sum()
    scale = 1 if subsample == "data" else total / n
    expected = stats.norm.logpdf(mu, M0, S0) + scale * loglik
    assert float(log_joint) == pytest.approx(expected, rel=1e-5)


def test_subsampling_plate_raises_by_default(fit):
    x, n = fit["x"], fit["n"]
    with pytest.raises(ValueError, match=f"plate 'data' has size {10 * n}.*N={n}"):
        compare_with_nuts(fit["em"], fit["state"], x, 10 * n, rng_key=jax.random.PRNGKey(0))


# ------------------------------------------------------------------- mixtures
def test_mixture_started_with_permuted_labels(fit):
    """The permutation found is SIGMA in both chains, and after alignment every online
    MAP lies in the NUTS 94% HDI."""
    result = fit["result"]
    assert result.component_sites == {"z": {"weights": 0, "locs": 0}}
    np.testing.assert_array_equal(result.permutation["z"], [SIGMA, SIGMA])
    # NUTS itself sampled in the true order: its raw means sit on the centres
    raw = {k: np.asarray(v) for k, v in result.mcmc.get_samples(group_by_chain=True).items()}
    np.testing.assert_allclose(raw["locs"].mean((0, 1)), CENTERS, atol=0.4)
    # relabelled, every site's draws are the raw ones permuted by SIGMA
    for name in ("weights", "locs"):
        np.testing.assert_array_equal(result.nuts.posterior[name].values, raw[name][:, :, SIGMA])
    mixture = result.table.iloc[4:]
    assert mixture["inside_hdi"].all(), mixture


def held_locs(x, K=2):
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(K)))
    locs = numpyro.param("locs", jnp.zeros(K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)


def test_held_values_index_traced_latents():
    """NUTS traces the model: a held value (NumPy, from get_params) indexed by a traced
    latent must be a JAX array in the model, and the log density is the model's."""
    x = np.float32([-1.0, 0.5, 2.0])
    locs, weights, z = np.float32([-1.0, 2.0]), np.float32([0.3, 0.7]), np.int32([0, 1, 1])
    model = _nuts_model(held_locs, {"locs": locs}, {}, "raise")
    log_joint = jax.jit(lambda w, z: log_density(model, (x,), {}, {"weights": w, "z": z})[0])
    expected = (
        stats.dirichlet.logpdf(weights, [1.0, 1.0])
        + np.log(weights[z]).sum()
        + stats.norm.logpdf(x, locs[z], 1.0).sum()
    )
    assert float(log_joint(weights, z)) == pytest.approx(expected, rel=1e-5)


def test_other_mode_under_held_sites_is_reported():
    """A chain whose sampled components sit in another order than the held ones is
    another mode: reported, not relabelled; the online order is not."""
    rng = np.random.default_rng(0)
    estimate = {"locs": np.array([-5.0, 0.0, 5.0]), "scales": np.ones(3)}
    near = estimate["locs"] + 0.1 * rng.normal(size=(2, 300, 3))
    _check_same_mode("z", estimate, {"locs": near}, {"locs": 0}, ["scales"])  # no warning
    swapped = near.copy()
    swapped[1] = swapped[1][:, [2, 0, 1]]  # chain 1's components: the online 2, 0, 1
    match = r"chain 1 of NUTS .* components \[1, 2, 0\] are the online 0, 1, 2.*another mode"
    with pytest.warns(UserWarning, match=match):
        _check_same_mode("z", estimate, {"locs": swapped}, {"locs": 0}, ["scales"])


def test_hungarian_match_per_chain():
    """Each chain in its own labelling (and K equal to the other dimension): the match
    recovers every chain's permutation, and relabelling puts every site, on its own axis,
    back in the estimate's order."""
    rng = np.random.default_rng(3)
    k, num_draws = 3, 200
    estimate = {
        "w": np.array([0.2, 0.3, 0.5]),
        "locs": rng.normal(size=(k, k)) * 5,  # components on axis 0
        "scales_t": rng.uniform(0.5, 2.0, (k, k)),  # components on axis 1
        "tied": rng.normal(size=k),  # not indexed by the latent
    }
    sites = {"w": 0, "locs": 0, "scales_t": 1}
    truth = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]])
    draws = {}
    for name, value in estimate.items():
        chains = []
        for perm in truth:
            v = np.take(value, np.argsort(perm), axis=sites[name]) if name in sites else value
            chains.append(v + 0.01 * rng.normal(size=(num_draws,) + v.shape))
        draws[name] = np.stack(chains)
    perm = match_components(estimate, draws, sites)
    np.testing.assert_array_equal(perm, truth)
    aligned = permute_components(draws, sites, perm)
    for name, value in estimate.items():
        np.testing.assert_allclose(
            aligned[name].mean(1), np.broadcast_to(value, (4,) + value.shape), atol=0.01
        )


# ------------------------------------------------------------- component axes
def gmm_k_equals_d(x, K=2):
    weights = numpyro.sample("weights", dist.Dirichlet(2.0 * jnp.ones(K)))
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    scale = numpyro.param("scale", jnp.ones(x.shape[-1]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], scale).to_event(1), obs=x)


def gmm_transposed(x, K=2):
    logits = numpyro.param("logits", jnp.zeros(K))
    locs_t = numpyro.param("locs_t", jnp.zeros((x.shape[-1], K)))  # components on axis 1
    scales = numpyro.param("scales", jnp.ones((K, x.shape[-1])), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(logits=logits))
        loc = jnp.moveaxis(locs_t[:, z], 0, -1)
        numpyro.sample("obs", dist.Normal(loc, scales[z]).to_event(1), obs=x)


def two_latents(x):
    w1 = numpyro.param("w1", jnp.ones(2) / 2, constraint=constraints.simplex)
    w2 = numpyro.param("w2", jnp.ones(2) / 2, constraint=constraints.simplex)
    m1, m2 = numpyro.param("m1", jnp.zeros(2)), numpyro.param("m2", jnp.zeros(2))
    with numpyro.plate("data", x.shape[0]):
        a = numpyro.sample("a", dist.Categorical(w1))
        b = numpyro.sample("b", dist.Categorical(w2))
        numpyro.sample("o1", dist.Normal(m1[a], 1.0), obs=x[:, 0])
        numpyro.sample("o2", dist.Normal(m2[b], 1.0), obs=x[:, 1])


def ordinal(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    slope = numpyro.param("slope", jnp.ones(2))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("obs", dist.Normal(z * slope[0], 1.0), obs=x[:, 0])


f32 = lambda *a: np.array(a, np.float32)


@pytest.mark.parametrize(
    "model,params,expected",
    [
        (  # K = D = 2: locs on axis 0, the tied scale (shape (D,) = (K,)) on none
            gmm_k_equals_d,
            {"weights": f32(0.4, 0.6), "locs": f32([0, 1], [2, 3]), "scale": f32(1, 1)},
            {"z": {"weights": 0, "locs": 0}},
        ),
        (  # softmax weights, locations with components on axis 1, K = D
            gmm_transposed,
            {"logits": f32(0, 1), "locs_t": f32([0, 1], [2, 3]), "scales": f32([1, 2], [2, 1])},
            {"z": {"logits": 0, "locs_t": 1, "scales": 0}},
        ),
        (  # two latents with the same K, each with its own sites
            two_latents,
            {"w1": f32(0.3, 0.7), "w2": f32(0.5, 0.5), "m1": f32(0, 1), "m2": f32(0, 0)},
            {"a": {"w1": 0, "m1": 0}, "b": {"w2": 0, "m2": 0}},
        ),
        (  # z enters as a number: its labels are not exchangeable
            ordinal,
            {"w": f32(0.2, 0.8), "slope": f32(1, 2)},
            {"z": {}},
        ),
    ],
    ids=["k_equals_d_tied_scale", "axis_1_softmax", "two_latents", "not_exchangeable"],
)  # fmt: skip
def test_component_axes(model, params, expected):
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    assert component_axes(model, params, x) == expected


# ------------------------------------------------------------ InferenceData
def test_to_inference_data_round_trip(fit):
    em, state = fit["em"], fit["state"]
    params = em.get_params(state)
    idata = to_inference_data(em, state)
    assert isinstance(idata, az.InferenceData)
    assert idata.groups() == ["posterior"]
    assert set(idata.posterior.data_vars) == set(params)
    assert set(params) == {"mu", "nu", "p", "lam", "sigma", "weights", "locs"}
    for name, value in params.items():
        var = idata.posterior[name]
        assert var.dims == ("chain", "draw") + tuple(f"{name}_dim_{i}" for i in range(value.ndim))
        assert var.shape == (1, 1) + value.shape
        np.testing.assert_array_equal(var.values[0, 0], np.asarray(value))
    assert idata.posterior.attrs["estimate"] == "point"
    # draws (a posterior, later) come through the same conversion, with their chains
    draws = np.random.default_rng(0).normal(size=(2, 5, 3, 2))
    idata = draws_to_inference_data({"locs": draws}, estimate="draws")
    np.testing.assert_array_equal(idata.posterior["locs"].values, draws)
    assert idata.posterior["locs"].dims == ("chain", "draw", "locs_dim_0", "locs_dim_1")
    with pytest.raises(ValueError, match=r"leading \(chain, draw\) axes; got \{'w': \(3,\)\}"):
        draws_to_inference_data({"w": np.ones(3)})
    # the comparison's online fit is the same conversion
    idata = to_inference_data(em, state)
    for name in params:
        np.testing.assert_array_equal(
            fit["result"].online.posterior[name].values, idata.posterior[name].values
        )


# --------------------------------------------------------------------- errors
def improper(x):
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def with_count(x, count=False):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    if count:
        numpyro.sample("n", dist.Poisson(3.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def only_params(x):
    mu = numpyro.param("loc", 0.0)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def test_models_nuts_cannot_run(rng):
    x = rng.normal(size=30).astype(np.float32)
    key = jax.random.PRNGKey(0)
    em = OnlineEM(improper, mstep={"mu": "fixed"})
    state = em.init(key, x, init_params={"mu": 0.0})
    with pytest.raises(ValueError, match=r"site 'mu' has an improper prior \(ImproperUniform\)"):
        compare_with_nuts(em, state, x, rng_key=key)
    em = OnlineEM(with_count)
    state = em.init(key, x)
    with pytest.raises(ValueError, match=r"site 'n' \(Poisson\) is a discrete latent without"):
        compare_with_nuts(em, state, x, count=True, rng_key=key)
    with pytest.raises(ValueError, match=r"the state estimates \['mu'\], which are not sites"):
        compare_with_nuts(OnlineEM(only_params), state, x, rng_key=key)
    em = OnlineEM(only_params)
    state = em.init(key, x)
    with pytest.raises(ValueError, match="NUTS has nothing to sample.*param_priors"):
        compare_with_nuts(em, state, x, rng_key=key)


N01 = dist.Normal(0.0, 1.0)


@pytest.mark.parametrize(
    "option,error,match",
    [
        ({"param_priors": {"nope": N01}}, ValueError, "'nope' is not a site"),
        ({"param_priors": {"mu": N01}}, ValueError, "'mu' is a numpyro.sample site"),
        ({"param_priors": {"lam": 3.0}}, TypeError, r"\['lam'\] must be a NumPyro distribution"),
        (
            {"param_priors": {"lam": dist.Normal(jnp.zeros(4), 1.0)}},
            ValueError,
            r"batch shape \(4,\), which does not broadcast to the site's shape \(\)",
        ),
        (
            {"param_priors": {"sigma": N01}},
            ValueError,
            r"support Real\(\), wider than the site's constraint Positive",
        ),
        ({"num_samples": 2}, ValueError, "num_samples must be an int >= 4"),
        ({"num_chains": 0}, ValueError, "num_chains must be an int >= 1"),
        ({"subsample": "drop"}, ValueError, "subsample must be one of"),
        ({"hdi_prob": 1.5}, ValueError, r"hdi_prob must be in \(0, 1\)"),
        ({"align": {"z": {"mu": 0}}}, ValueError, r"\['z'\]\['mu'\] = 0 is not an axis"),
        ({"align": {"z": {"nope": 0}}}, ValueError, r"align\['z'\] names 'nope', which is not"),
        ({"align": "yes"}, TypeError, "align must be True, False or"),
    ],
)
def test_options_are_validated(fit, option, error, match):
    em, state, x, n = fit["em"], fit["state"], fit["x"], fit["n"]
    with pytest.raises(error, match=match):
        compare_with_nuts(em, state, x, n, rng_key=jax.random.PRNGKey(0), **option)


# ------------------------------------------------------ optional dependencies
def test_missing_arviz_says_what_to_install(monkeypatch, fit):
    em, state = fit["em"], fit["state"]
    monkeypatch.setitem(sys.modules, "arviz", None)  # import arviz now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "numpyro-onlineem\[compare\]"'):
        to_inference_data(em, state)


def _python(code, cache):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True
    )


def test_lazy_import_and_no_arviz_notice(tmp_path):
    """Importing the package loads none of the optional dependencies; the comparison's own
    import of ArviZ, with warnings as errors and ArviZ's daily refactor notice due (a
    fresh cache), does not pass the notice on."""
    ours = _python(
        """
        import sys, warnings
        warnings.simplefilter("error")
        import numpyro_onlineem
        lazy = ("arviz", "matplotlib", "pandas", "numpyro_onlineem.compare")
        assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]
        numpyro_onlineem.compare_with_nuts
        from numpyro_onlineem.arviz_io import import_optional
        import_optional("arviz")
        print("ok")
        """,
        tmp_path,
    )
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "ok"
    if not (tmp_path / "arviz" / "daily_warning").exists():  # written when the notice is issued
        pytest.skip("this ArviZ does not announce its refactor on import")


def _bernoulli_mixture(x):
    """Two Normal components chosen by a Bernoulli latent: relabelling them swaps the
    locations and maps p to 1 - p, which is no permutation of axes (no alignment)."""
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(p))
        numpyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


@pytest.fixture(scope="module")
def bernoulli_fit():
    rng = np.random.default_rng(0)
    x = (np.where(rng.random(300) < 0.3, 3.0, -3.0) + rng.normal(size=300)).astype(np.float32)
    em = OnlineEM(_bernoulli_mixture)
    return em, em.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False).state, x


@pytest.mark.parametrize(
    "seed, expected",
    [
        (0, "chains disagree"),  # one chain in each labelling: pooled, r_hat 1.8
        (1, "outside NUTS's HDI on all"),  # both chains in the other labelling
        (3, None),  # both in the online labelling
    ],
)
def test_unaligned_labellings_and_disagreeing_chains_are_reported(bernoulli_fit, seed, expected):
    """A new user's Bernoulli mixture: NUTS's chains land in either labelling, and no
    permutation of axes relates them. Both failures used to pass silently: pooled chains
    put every estimate inside a meaningless HDI (r_hat 1.8), and two relabelled chains
    put all of them outside (|z| up to 90). Reference: each chain's mean against the
    estimate and its relabelling (p -> 1 - p, the locations swapped)."""
    em, state, x = bernoulli_fit
    estimate = {k: np.asarray(v, np.float64) for k, v in em.get_params(state).items()}
    online = np.r_[estimate["p"], estimate["locs"]]
    relabelled = np.r_[1 - estimate["p"], estimate["locs"][::-1]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compare_with_nuts(
            em,
            state,
            x,
            rng_key=jax.random.PRNGKey(seed),
            num_warmup=200,
            num_samples=200,
            num_chains=2,
            param_priors={"locs": dist.Normal(0.0, 10.0)},
        )
    post = result.nuts.posterior
    means = np.stack([post["p"].mean("draw"), *post["locs"].mean("draw").T], -1)  # (chain, 3)
    near = lambda ref: np.all(np.abs(means - ref) < 0.15, axis=1)
    messages = [str(w.message) for w in caught if "compare_with_nuts" in str(w.message)]
    if expected is None:
        assert near(online).all() and not messages, messages
    else:
        assert len(messages) == 1 and expected in messages[0], messages
        if expected == "chains disagree":
            assert near(online).sum() == 1 and near(relabelled).sum() == 1
            assert result.table["r_hat"].min() > 1.5
        else:
            assert near(relabelled).all() and not result.table["inside_hdi"].any()
