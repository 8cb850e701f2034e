"""Bad input gets a ValueError naming the argument, the shape and the fix; the state
passed in stays usable and unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

from numpyro_onlineem import OnlineEM, UnsupportedModelError
from tests.models import gmm_diag


@pytest.fixture
def fitted(rng):
    x = rng.normal(size=(60, 4)).astype(np.float32)
    em = OnlineEM(gmm_diag)
    state = em.init(jax.random.PRNGKey(0), x[:30])
    state, _ = em.update(state, x[30:])
    return em, state, x


def _assert_same(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
    "batch,match",
    [
        (np.full((5, 4), np.nan, np.float32), r"args\[0\] \(shape \(5, 4\)\) has 20 non-finite"),
        (np.ones((5, 3), np.float32), r"args\[0\] has shape \(5, 3\), but init saw \(batch, 4\)"),
        (np.ones((0, 4), np.float32), r"args\[0\] is an empty batch \(shape \(0, 4\)\)"),
        (np.ones((4,), np.float32), r"reshape it to \(1, 4\)"),
    ],
)
def test_update_rejects_bad_batches(fitted, batch, match):
    em, state, x = fitted
    before = jax.tree.map(np.array, state)
    with pytest.raises(ValueError, match=match):
        em.update(state, batch)
    _assert_same(state, before)
    # the state is still usable
    state2, loss = em.update(state, x[:10])
    assert np.isfinite(loss)


def test_init_rejects_non_finite(rng):
    x = rng.normal(size=(10, 2))
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"first at index \(3, 1\): inf"):
        OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x)


def test_static_argument_change_is_rejected(fitted, rng):
    em, state, x = fitted
    with pytest.raises(ValueError, match="argument args\\[1\\] = 4 was not given at init"):
        em.update(state, x, 4)
    state = em.init(jax.random.PRNGKey(0), x, 3)
    with pytest.raises(ValueError, match="argument args\\[1\\] is 4 but was 3 at init"):
        em.update(state, x, 4)


def test_continuous_local_latent_is_named(rng):
    def model(x):
        loc = numpyro.param("loc", 0.0)
        with numpyro.plate("data", x.shape[0]):
            u = numpyro.sample("u", dist.Normal(loc, 1.0))
            numpyro.sample("obs", dist.Normal(u, 1.0), obs=x)

    with pytest.raises(NotImplementedError, match="site 'u' is a continuous latent"):
        OnlineEM(model).init(jax.random.PRNGKey(0), rng.normal(size=10))


def test_transformed_parameter_is_named(rng):
    def model(x):
        locs = numpyro.param("locs", jnp.zeros(2))
        log_scale = numpyro.param("log_scale", jnp.zeros(2))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("obs", dist.Normal(locs[z], jnp.exp(log_scale[z])), obs=x)

    # by default it takes the numerical M step; asking for the closed form says why not
    em = OnlineEM(model, mstep={"log_scale": "closed_form"})
    with pytest.raises(UnsupportedModelError, match="'log_scale' enters the scale of Normal"):
        em.init(jax.random.PRNGKey(0), rng.normal(size=10))


def test_parameter_in_unsupported_family_is_named(rng):
    def model(x):
        df = numpyro.param("df", 2.0, constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.StudentT(df, 0.0, 1.0), obs=x)

    em = OnlineEM(model, mstep={"df": "closed_form"})
    with pytest.raises(UnsupportedModelError, match="'df' enters site 'obs'"):
        em.init(jax.random.PRNGKey(0), rng.uniform(1, 2, size=10))


def test_no_plate_is_explained(rng):
    def model(x):
        loc = numpyro.param("loc", 0.0)
        numpyro.sample("obs", dist.Normal(loc, 1.0).expand([x.shape[0]]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="do not share a numpyro.plate"):
        OnlineEM(model).init(jax.random.PRNGKey(0), rng.normal(size=10))


def test_unknown_options_are_rejected():
    with pytest.raises(TypeError):
        OnlineEM(gmm_diag, learning_rate=0.1)
    with pytest.raises(ValueError, match="init must be one of"):
        OnlineEM(gmm_diag, init="random")


def _nested(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
    with numpyro.plate("data", x.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Categorical(weights))
        with numpyro.plate("features", x.shape[-1], dim=-1):
            numpyro.sample("obs", dist.Normal(locs[z.squeeze(-1)], 1.0), obs=x)


def test_data_plate_is_the_one_holding_the_latents(rng):
    x = rng.normal(size=(20, 3))
    state = OnlineEM(_nested).init(jax.random.PRNGKey(0), x)
    assert state.plan.model_sites.data_plate == "data"
    assert OnlineEM(_nested).compute_marginals(state, x)["z"].shape == (20, 2)


def test_ambiguous_data_plate_asks_for_a_name(rng):
    def model(x):
        loc = numpyro.param("loc", jnp.zeros(x.shape[-1]))
        with numpyro.plate("data", x.shape[0], dim=-2), numpyro.plate("f", x.shape[-1], dim=-1):
            numpyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"share the plates \['data', 'f'\]"):
        OnlineEM(model).init(jax.random.PRNGKey(0), rng.normal(size=(20, 3)))
    state = OnlineEM(model, data_plate="data").init(jax.random.PRNGKey(0), rng.normal(size=(20, 3)))
    assert state.plan.model_sites.data_plate == "data"


def test_run_skips_non_finite_batches_and_warns(rng):
    x = rng.normal(size=(500, 4)).astype(np.float32)
    bad = x.copy()
    bad[250, 2] = np.nan  # in the third batch of 100
    em = OnlineEM(gmm_diag, chunk_size=2)
    with pytest.warns(RuntimeWarning, match="1 of 4 batches had non-finite or out-of-support"):
        result = em.run(
            jax.random.PRNGKey(0), bad, batch_size=100, progress_bar=False, init_points=100
        )
    assert not np.isfinite(result.losses[1])
    assert np.all(np.isfinite(np.delete(result.losses, 1)))
    # the same as a stream without that batch
    clean = np.concatenate([x[:200], x[300:]])
    ref = em.run(jax.random.PRNGKey(0), clean, batch_size=100, progress_bar=False, init_points=100)
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(ref.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_zero_dimensional_array_arguments_are_accepted(rng):
    def shifted(x, shift):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(numpyro.param("loc", 0.0), 1.0), obs=x - shift)

    x = rng.normal(size=20)
    em = OnlineEM(shifted, step_size=1.0, burn_in=0)  # batch EM: the estimate is the mean
    state = em.init(jax.random.PRNGKey(0), x, jnp.asarray(1.0))
    state, loss = em.update(state, x, jnp.asarray(1.0))
    assert np.isfinite(loss)
    np.testing.assert_allclose(em.get_params(state)["loc"], np.mean(x - 1.0), rtol=1e-5)


def _poisson_mixture(x, K=2):
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    rates = numpyro.param("rates", jnp.array([1.0, 5.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Poisson(rates[z]), obs=x)


def test_out_of_support_counts_are_named_and_leave_the_state_untouched(rng):
    x = rng.poisson(3.0, 400).astype(np.float32)
    em = OnlineEM(_poisson_mixture)
    fractional = x.copy()
    fractional[7] = 2.5
    with pytest.raises(ValueError, match=r"site 'obs' must lie in its support .* index \(7,\)"):
        em.init(jax.random.PRNGKey(0), fractional)
    state = em.init(jax.random.PRNGKey(0), x[:200])
    before = jax.tree.map(np.array, state)
    negative = x[200:300].copy()
    negative[3] = -1.0
    with pytest.raises(ValueError, match=r"args\[0\] is observed site 'obs'.*index \(3,\): .*-1"):
        em.update(state, negative)
    _assert_same(state, before)
    # inside the user's jit: skipped and flagged, the state passed through unchanged
    after, info = jax.jit(em.update_with_info)(state, jnp.asarray(fractional[:100]))
    assert bool(info.out_of_support)
    _assert_same(after, before)
    after, info = jax.jit(em.update_with_info)(state, jnp.asarray(x[300:]))
    assert not bool(info.out_of_support) and not bool(info.nonfinite)


def test_lists_are_batches(rng):
    x = rng.normal(size=(60, 4)).astype(np.float32)
    em = OnlineEM(gmm_diag)
    from_list = em.init(jax.random.PRNGKey(0), x.tolist())
    from_array = em.init(jax.random.PRNGKey(0), x.astype(np.float64))
    for a, b in zip(jax.tree.leaves(from_list), jax.tree.leaves(from_array), strict=True):
        np.testing.assert_array_equal(a, b)
    state, loss = em.update(from_list, x[:10].tolist())
    assert np.isfinite(loss)
    with pytest.raises(TypeError, match="a list argument must hold numbers"):
        em.update(state, [["a", "b"]])


def test_init_params_of_the_wrong_shape_are_named(rng):
    with pytest.raises(
        ValueError,
        match=r"init_params\['locs'\] has shape \(2,\), but site 'locs' has shape \(3, 4\)",
    ):
        OnlineEM(gmm_diag).init(
            jax.random.PRNGKey(0), rng.normal(size=(20, 4)), init_params={"locs": np.zeros(2)}
        )


def _hmm_scan(x, K=2):
    from numpyro.contrib.control_flow import scan

    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.arange(K) * 1.0)

    def step(z_prev, xt):
        with numpyro.plate("seqs", x.shape[0], dim=-1):
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("obs", dist.Normal(locs[z], 1.0), obs=xt)
        return z, None

    scan(step, jnp.zeros(x.shape[0], jnp.int32), x.T)


def _hmm_markov(x, K=2):
    from numpyro.contrib.funsor import markov

    trans = numpyro.param("trans", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.arange(K) * 1.0)
    with numpyro.plate("seqs", x.shape[0], dim=-1):
        z = 0
        for t in markov(range(x.shape[1])):
            z = numpyro.sample(f"z_{t}", dist.Categorical(trans[z]))
            numpyro.sample(f"obs_{t}", dist.Normal(locs[z], 1.0), obs=x[:, t])


@pytest.mark.parametrize(
    "model,match",
    [
        (_hmm_scan, "uses numpyro.contrib.control_flow.scan. Markov chains"),
        (_hmm_markov, "site 'z_0' is inside a numpyro.contrib.funsor.markov context. Markov"),
    ],
)
def test_markov_chains_get_the_documented_error(rng, model, match):
    with pytest.raises(NotImplementedError, match=match):
        OnlineEM(model).init(jax.random.PRNGKey(0), rng.normal(size=(10, 5)).astype(np.float32))


def test_hmm_written_as_a_python_loop_is_named_a_chain(rng):
    def hmm(y, K=2):
        trans = numpyro.param("trans", jnp.full((K, K), 0.5), constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
        z = 0
        for t in range(y.shape[0]):
            z = numpyro.sample(f"z_{t}", dist.Categorical(trans[z]))
            numpyro.sample(f"y_{t}", dist.Normal(locs[z], 1.0), obs=y[t])

    y = rng.normal(size=20).astype(np.float32)
    with pytest.raises(ValueError, match="Markov chain.*not supported yet"):
        OnlineEM(hmm).init(jax.random.PRNGKey(0), y)


def _regression_mixture(X, y, subscripts):
    k, p = 2, X.shape[-1]
    weights = numpyro.param("weights", jnp.ones(k) / k, constraint=constraints.simplex)
    beta = numpyro.param("beta", jnp.array([[1.0] * p, [-1.0] * p]))
    with numpyro.plate("data", X.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("y", dist.Normal(jnp.einsum(subscripts, X, beta[z]), 0.5), obs=y)


def test_a_model_written_for_one_value_per_datum_is_told_about_enumeration(rng):
    """A new user's mixture of regressions with einsum('bp,bp->b', X, beta[z]) failed
    deep inside init's probes with NumPy's "Einstein sum subscript 'bp' does not contain
    the correct number of indices". It runs unenumerated, so the error now says what
    enumeration does to z and how to write the model; the suggested form fits, and its
    coefficients match the generating ones."""
    n, p = 4_000, 3
    X = rng.normal(size=(n, p)).astype(np.float32)
    truth = np.array([[2.0, -1.0, 0.5], [-2.0, 1.0, -0.5]])
    z = rng.random(n) < 0.4
    y = (np.sum(X * truth[z.astype(int)], -1) + 0.5 * rng.normal(size=n)).astype(np.float32)
    em = OnlineEM(_regression_mixture)
    with pytest.raises(UnsupportedModelError, match=r"fails with their states enumerated.*'bp'"):
        em.init(jax.random.PRNGKey(0), X[:500], y[:500], "bp,bp->b")
    result = em.run(
        jax.random.PRNGKey(0), (X, y), "...p,...p->...", batch_size=100, progress_bar=False
    )
    beta = np.asarray(result.params["beta"])
    beta = beta[np.argsort(-beta[:, 0])]  # the component with the positive first slope first
    np.testing.assert_allclose(beta, truth, atol=0.05)
