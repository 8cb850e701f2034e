"""jit gives the same numbers, and updates with batches of one shape trace once."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from numpyro_onlineem import OnlineEM


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
    state, _ = em.update(state, x[50:100])
    after_first = calls["n"]
    for i in range(2, 10):
        state, _ = em.update(state, x[50 * i : 50 * (i + 1)])
    assert calls["n"] == after_first
    # a new batch shape compiles once more, then is cached too
    state, _ = em.update(state, x[500:520])
    state, _ = em.update(state, x[520:540])
    assert calls["n"] == after_first + 1


def test_run_equals_sequential_updates(rng):
    model, _ = _counting_model()
    x = _data(rng, 1030)
    em = OnlineEM(model, chunk_size=4)
    result = em.run(jax.random.PRNGKey(0), x, batch_size=100, progress_bar=False)
    state = em.init(jax.random.PRNGKey(0), x[:100])  # run initialises on the first batch
    losses = []
    for i in range(1, 11):
        state, loss = em.update(state, x[100 * i : 100 * (i + 1)])
        losses.append(loss)
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
