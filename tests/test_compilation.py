"""jit gives the same numbers, and updates with batches of one shape trace once."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag


def _counting_model():
    calls = {"n": 0}

    def model(x, K=2):
        calls["n"] += 1
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

    return model, calls


def _data(rng, n):
    return (rng.normal(size=(n, 3)) + 3 * rng.integers(0, 2, (n, 1))).astype(np.float32)


def test_jit_update_equals_update(rng):
    model, _ = _counting_model()
    x = _data(rng, 400)
    em = OnlineEM(model, burn_in=0)
    state0 = em.init(jax.random.PRNGKey(0), x[:100])
    jitted = jax.jit(em.update)
    s_eager, s_jit = state0, state0
    for i in range(1, 4):
        s_eager, loss_eager = em.update(s_eager, x[100 * i : 100 * (i + 1)])
        s_jit, loss_jit = jitted(s_jit, jnp.asarray(x[100 * i : 100 * (i + 1)]))
        np.testing.assert_allclose(loss_eager, loss_jit, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s_eager), jax.tree.leaves(s_jit), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_updates_of_one_shape_trace_once(rng):
    model, calls = _counting_model()
    x = _data(rng, 1000)
    em = OnlineEM(model)
    state = em.init(jax.random.PRNGKey(0), x[:50])
    before = calls["n"]
    state, _ = em.update(state, x[50:100])
    after_first = calls["n"]
    # the model's runs in one trace of the update: its E step, and the check of the
    # Polyak average against the iterate (core.check_average)
    per_trace = after_first - before
    assert per_trace == 2
    for i in range(2, 10):
        state, _ = em.update(state, x[50 * i : 50 * (i + 1)])
    assert calls["n"] == after_first
    # a new batch shape compiles once more, then is cached too
    state, _ = em.update(state, x[500:520])
    state, _ = em.update(state, x[520:540])
    assert calls["n"] == after_first + per_trace


def test_run_equals_sequential_updates(rng):
    model, _ = _counting_model()
    x = _data(rng, 1030)
    em = OnlineEM(model, chunk_size=4)
    result = em.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False, init_points=100)
    state = em.init(jax.random.PRNGKey(0), x[:100])  # run initialises on the first batch
    losses = []
    for i in range(1, 11):
        state, loss = em.update(state, x[100 * i : 100 * (i + 1)])
        losses.append(loss)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


# ------------------------------------------------------ compile once per model and shapes
_EVENTS: list | None = None


def _listen(event, duration, **kwargs):
    if _EVENTS is not None:
        _EVENTS.append((event.rsplit("/", 1)[-1], kwargs.get("fun_name")))


jax.monitoring.register_event_duration_secs_listener(_listen)


class _Compiles:
    """Counts JAX's traces and XLA compilations inside a ``with`` block."""

    def __enter__(self):
        global _EVENTS
        _EVENTS = []
        return self

    def __exit__(self, *exc):
        global _EVENTS
        self.events, _EVENTS = _EVENTS, None

    @property
    def traces(self) -> list:
        return [name for event, name in self.events if event == "jaxpr_trace_duration"]

    @property
    def compiles(self) -> list:
        return [name for event, name in self.events if event == "backend_compile_duration"]


def _blobs(rng, n, d=4):
    centres = np.array([[0.0] * d, [5.0] * d, [-5.0] * d])
    return (centres[rng.integers(0, 3, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_second_fit_of_the_same_model_compiles_nothing(rng):
    x = _blobs(rng, 3000)
    em = OnlineEM(gmm_diag)
    first = em.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False)
    em.log_likelihood(first.state, x[:100])
    with _Compiles() as counted:
        em = OnlineEM(gmm_diag)  # a new object, as in a new fit
        second = em.run(jax.random.PRNGKey(1), x, batch_size=100, progress_bar=False)
        em.log_likelihood(second.state, x[:100])
    assert counted.traces == [] and counted.compiles == []
    assert first.state.plan == second.state.plan
    assert hash(first.state.plan) == hash(second.state.plan)
    # the fits are real: both reach the same mixture (up to the labels' order)
    np.testing.assert_allclose(
        np.sort(first.params["locs"][:, 0]), np.sort(second.params["locs"][:, 0]), atol=0.1
    )
    np.testing.assert_allclose(np.sort(first.params["locs"][:, 0]), [-5, 0, 5], atol=0.1)


def test_plans_differ_when_the_shapes_or_settings_do(rng):
    x = _blobs(rng, 200)
    a = OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x)
    b = OnlineEM(gmm_diag).init(jax.random.PRNGKey(0), x[:, :3])
    c = OnlineEM(gmm_diag, mstep={"scales": "fixed"}).init(jax.random.PRNGKey(0), x)
    assert a.plan != b.plan and a.plan != c.plan
    with _Compiles() as counted:
        OnlineEM(gmm_diag).update(b, x[:50, :3])
    assert counted.traces  # a new shape is compiled, once
    config = OnlineEM(gmm_diag, step_size=0.1, burn_in=10).config
    assert config == OnlineEM(gmm_diag, burn_in=10, step_size=0.1).config


def test_restored_state_compiles_nothing_and_continues_the_fit(rng, tmp_path):
    x = _blobs(rng, 2000)
    em = OnlineEM(gmm_diag)
    state = em.init(jax.random.PRNGKey(0), x[:500])
    for i in range(5, 10):
        state, _ = em.update(state, x[100 * i : 100 * (i + 1)])
    # save the arrays only, as a checkpoint would
    leaves, _ = jax.tree.flatten(state)
    np.savez(tmp_path / "state.npz", *[np.asarray(v) for v in leaves])
    continued, loss = em.update(state, x[1000:1100])

    with _Compiles() as counted:
        # a fresh object rebuilds the plan from the model, and the state from the file
        fresh = OnlineEM(gmm_diag)
        template = fresh.init(jax.random.PRNGKey(5), x[:500])
        saved = np.load(tmp_path / "state.npz")
        restored = jax.tree.unflatten(
            jax.tree.structure(template), [saved[f"arr_{i}"] for i in range(len(saved.files))]
        )
        again, loss_again = fresh.update(restored, x[1000:1100])
    assert counted.traces == [] and counted.compiles == []
    np.testing.assert_allclose(loss_again, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(continued), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


_SCRIPT = """
import collections, jax, numpy as np
import numpyro, numpyro.distributions as dist
from numpyro.distributions import constraints
import jax.numpy as jnp
from numpyro_onlineem import OnlineEM

counts = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: counts.update([event]))

def model(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.zeros((K, 2)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(locs[z], 1.0).to_event(1), obs=x)

x = np.random.default_rng(0).normal(size=(600, 2)).astype(np.float32)
x[::2] += 6.0
res = OnlineEM(model).run(jax.random.PRNGKey(0), x, batch_size=50, progress_bar=False)
print(counts["/jax/compilation_cache/cache_hits"], counts["/jax/compilation_cache/cache_misses"])
print(np.sort(np.asarray(res.params["locs"])[:, 0]))
"""


def test_a_second_process_reads_the_compiled_update_from_the_cache(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMPYRO_ONLINEEM_COMPILATION_CACHE": str(tmp_path / "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run():
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        hits, misses = map(int, out.stdout.split("\n")[0].split())
        return hits, misses, out.stdout.split("\n")[1]

    hits1, misses1, locs1 = run()
    assert misses1 > 0 and os.listdir(tmp_path / "cache")
    hits2, misses2, locs2 = run()
    # every program the first process wrote (the updates among them) is read back
    assert misses2 == 0 and hits2 >= 1
    assert locs1 == locs2
    np.testing.assert_allclose(np.array(locs2.strip("[]").split(), float), [0.0, 6.0], atol=0.2)


def test_equal_partial_models_share_the_compiled_update(rng):
    import functools

    x = _blobs(rng, 1000)
    first = OnlineEM(functools.partial(gmm_diag, K=3))
    first.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False)
    with _Compiles() as counted:
        again = OnlineEM(functools.partial(gmm_diag, K=3))
        again.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False)
    assert counted.traces == []
    assert first.config == again.config
    assert OnlineEM(functools.partial(gmm_diag, K=4)).config != first.config


def test_a_final_partial_chunk_compiles_no_update_of_its_own(rng):
    x = _blobs(rng, 2350)
    em = OnlineEM(gmm_diag, chunk_size=8)
    with _Compiles() as counted:
        # 2,100 points after the 250 of init: two chunks of 8 batches, then 5 batches
        result = em.run(
            jax.random.PRNGKey(0), x, batch_size=100, init_points=250, progress_bar=False
        )
    assert "_scan" in counted.traces and "_update" not in counted.traces
    assert result.losses.shape == (21,)
    # the padding is not applied: the same state as one update at a time
    state = em.init(jax.random.PRNGKey(0), x[:250])
    for i in range(21):
        state, loss = em.update(state, x[250 + 100 * i : 350 + 100 * i])
    np.testing.assert_allclose(result.losses[-1], loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padding_is_never_computed_even_where_a_model_would_fit_it(rng):
    def zero_blind(x, K=3):  # fits zeros like any data: computed padding would count
        gmm_diag(jnp.nan_to_num(x), K)

    x = _blobs(rng, 2350)
    em = OnlineEM(zero_blind, chunk_size=8)
    # 21 batches: two chunks, then a window of the last 8 whose first 3 are done; and
    # 5 batches, fewer than a chunk: padded with zeros
    for num_batches in (21, 5):
        n = 250 + 100 * num_batches
        with _Compiles() as counted:
            result = em.run(
                jax.random.PRNGKey(0), x[:n], batch_size=100, init_points=250, progress_bar=False
            )
        assert "_update" not in counted.traces
        state = em.init(jax.random.PRNGKey(0), x[:250])
        for i in range(num_batches):
            state, _ = em.update(state, x[250 + 100 * i : 350 + 100 * i])
        assert result.losses.shape == (num_batches,)
        assert float(result.state.num_seen) == n
        for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _fresh_mixture():
    """A model function new to the process, so that nothing of it is compiled yet."""

    def model(x, K=3):
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.zeros((K, x.shape[-1])))
        cov = numpyro.param(
            "cov",
            jnp.broadcast_to(jnp.eye(x.shape[-1]), (K, 4, 4)),
            constraint=constraints.positive_definite,
        )
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.MultivariateNormal(locs[z], cov[z]), obs=x)

    return model


def test_init_runs_the_model_as_a_few_compiled_programs(rng):
    # eagerly, every operation of the model's runs at init (the seeded run, the probes,
    # the data-driven start) was a program of its own: 35 for a Gaussian mixture
    x = _blobs(rng, 300)
    key = jax.random.PRNGKey(0)
    with _Compiles() as counted:
        state = OnlineEM(_fresh_mixture()).init(key, x)
    assert len(counted.compiles) <= 6, counted.compiles
    # and the start is the data-driven one: one centre in each of the three blobs
    np.testing.assert_allclose(np.sort(state.params["locs"][:, 0]), [-5, 0, 5], atol=0.5)


def test_compiled_runs_give_what_eager_runs_give(rng):
    from numpyro_onlineem.compiled import compiled
    from numpyro_onlineem.first_trace import _first_run, first_trace
    from numpyro_onlineem.stream import split_args

    x = _blobs(rng, 200)
    model = _fresh_mixture()
    key = jax.random.PRNGKey(3)
    first = first_trace(model, None, key, (x,), {}, {})
    inputs, static = split_args((x,), {})
    eager = _first_run(model, None, static, (key, inputs, {}))
    assert first.sites == eager.sites and first.sizes == eager.sizes
    # in the model's order (jax.tree sorts a dict's keys)
    assert list(first.sites.params) == list(eager.sites.params) == ["weights", "locs", "cov"]
    for name in eager.values:
        np.testing.assert_allclose(first.values[name], eager.values[name], rtol=1e-6)
    assert first.observed["obs"] is x  # passed through: the caller's own array
    assert str(first.supports["obs"]) == str(eager.supports["obs"])

    # a MultivariateNormal keeps the covariance it was given, not only its Cholesky factor
    def build(scale, arrays):
        return {"d": dist.MultivariateNormal(arrays, covariance_matrix=scale * jnp.eye(2))}

    out = compiled(build, (2.0,), jnp.ones(2))["d"]
    np.testing.assert_allclose(out.covariance_matrix, 2.0 * np.eye(2))
    np.testing.assert_allclose(out.scale_tril, np.sqrt(2.0) * np.eye(2), rtol=1e-6)

    # a function that reads its arguments' values in Python runs eagerly instead
    def reads(scale, arrays):
        return {"total": scale * float(arrays.sum())}

    assert compiled(reads, (3.0,), jnp.arange(4.0)) == {"total": 18.0}


def test_a_lognormal_written_as_a_transformed_normal_fits_as_scipy_does(rng):
    # NumPyro checks `domain is constraints.real` inside ExpTransform: the compiled
    # init must give the singleton back, not a copy of it
    x = np.exp(rng.normal(1.0, 0.5, 4000)).astype(np.float32)

    def model(x):
        loc = numpyro.param("loc", 0.0)
        scale = numpyro.param("scale", 1.0, constraint=constraints.positive)
        base = dist.Normal(loc, scale)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample(
                "obs", dist.TransformedDistribution(base, dist.transforms.ExpTransform()), obs=x
            )

    em = OnlineEM(model, step_size=1.0, burn_in=0)
    state = em.init(jax.random.PRNGKey(0), x)
    for _ in range(30):
        state, _ = em.update(state, x)
    params = em.get_params(state)
    # the MLE of a log-normal: the mean and standard deviation of log x
    np.testing.assert_allclose(params["loc"], np.log(x).mean(), rtol=1e-3)
    np.testing.assert_allclose(params["scale"], np.log(x).std(), rtol=1e-3)


def test_a_start_whose_log_density_is_not_finite_is_refused(rng):
    def model(x, K=2):
        weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
        locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
        sd = numpyro.param("sd", jnp.zeros(K))  # no constraint, and 0: not a scale
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("obs", dist.Normal(locs[z], sd[z]), obs=x)

    x = rng.normal(size=200).astype(np.float32)
    with pytest.raises(ValueError, match=r"not finite .* sd in \[0, 0\]"):
        OnlineEM(model).init(jax.random.PRNGKey(0), x)
    # given a valid value, the same model starts: its statistics are the batch's own
    state = OnlineEM(model).init(jax.random.PRNGKey(0), x, init_params={"sd": np.ones(2)})
    np.testing.assert_allclose(np.sum(state.stats["obs"]["n"]), 1.0, rtol=1e-6)
    # (moments about the batch's mean: their second one is its variance)
    np.testing.assert_allclose(np.sum(state.stats["obs"]["s2"]), x.var(), rtol=1e-4)


INIT_SCALE = 1.0


def _reads_a_global(x):
    weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
    locs = numpyro.param("locs", jnp.array([-1.0, 1.0]))
    sd = numpyro.param("sd", INIT_SCALE * jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[z], sd[z]), obs=x)


def test_a_changed_module_constant_is_read_again(rng, monkeypatch):
    # compiled programs bake in the values a model reads; they are keyed on them, so a
    # constant changed between two fits (a notebook cell run again) is not stale
    x = rng.normal(size=200).astype(np.float32)
    em = OnlineEM(_reads_a_global, init="model")
    np.testing.assert_allclose(em.get_params(em.init(jax.random.PRNGKey(0), x))["sd"], 1.0)
    monkeypatch.setattr(sys.modules[__name__], "INIT_SCALE", 5.0)
    for fit in (em, OnlineEM(_reads_a_global, init="model")):
        np.testing.assert_allclose(fit.get_params(fit.init(jax.random.PRNGKey(0), x))["sd"], 5.0)


def test_run_from_an_array_compiles_each_init_program_once(rng):
    # the plan that sizes init is made on the very points init then gets: its compiled
    # model runs serve both (they were compiled twice, for a batch and for init's points)
    x = _blobs(rng, 1000)
    key = jax.random.PRNGKey(0)
    with _Compiles() as counted:
        result = OnlineEM(_fresh_mixture()).run(key, x, batch_size=100, progress_bar=False)
    assert counted.compiles.count("jit(run)") == 2, counted.compiles  # first run, probes
    assert len(counted.compiles) <= 7, counted.compiles
    # init took 256 points and the 44 of a last, short batch: 7 updates of 100
    assert result.losses.shape == (7,)
    np.testing.assert_allclose(np.sort(result.params["locs"][:, 0]), [-5, 0, 5], atol=0.2)
