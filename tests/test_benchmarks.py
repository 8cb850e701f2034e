"""The benchmarks' own arithmetic, and a smoke run of `benchmarks.generalized_em`."""

import numpy as np
from scipy import stats
from scipy.special import expit

from benchmarks import generalized_em as gem


def test_component_logliks_match_scipy(rng):
    """The NumPy log-densities every method is scored by, against scipy.stats."""
    for name, bench in gem.BENCHES.items():
        arrays = bench.sample(rng, 50)
        got = bench.component_loglik(bench.truth, arrays)
        p = bench.truth
        if name == "gamma":
            x = arrays[0][:, None].astype(float)
            want = stats.gamma.logpdf(x, p["concentration"], scale=1 / p["rate"])
        elif name == "student_t":
            x = arrays[0][:, None].astype(float)
            want = stats.t.logpdf(x, p["df"], p["locs"], p["scales"])
        else:
            X, y = arrays
            prob = expit(X.astype(float) @ p["beta"].T)
            want = stats.bernoulli.logpmf(y[:, None], prob)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_pack_unpack_round_trip():
    for bench in gem.BENCHES.values():
        v = gem._pack(bench.spec, bench.truth)
        for name, value in gem._unpack(bench.spec, v).items():
            np.testing.assert_allclose(value, bench.truth[name], rtol=1e-12)


def test_generalized_em_smoke(capsys):
    """Tiny sizes: the Gamma mixture's table, its M-step paths, and the benchmark's
    held-out score of OnlineEM's estimates equal to ``OnlineEM.log_likelihood``."""
    argv = "--num-points 3000 --num-test 1000 --passes 2 --evals 2 --models gamma"
    args = gem.parse_args([*argv.split(), "--svi-lrs", "0.05"])
    result = gem.main(args)["gamma"]
    out = capsys.readouterr().out
    for line in ("| OEM (defaults) |", "| SVI Adam lr=0.05 |", "| scipy L-BFGS-B", "rate: "):
        assert line in out
    oem, svi = result["oem"], result["svi"]
    assert set(oem["paths"]) == {"weights", "concentration", "rate"}
    for curve in (oem["curve"], svi["curve"]):
        assert len(curve.loglik) == 1 + 2 * 2 and np.all(np.isfinite(curve.loglik))
        assert np.all(np.diff(curve.seconds) >= 0) and curve.loglik[-1] > curve.loglik[0]
    # the optimum is the optimum: no online fit of 3,000 points beats it by much
    assert oem["curve"].loglik.max() < result["ll_star"] + 0.02
    em, state = oem["em"], oem["state"]
    x_test = gem.make_data(gem.BENCHES["gamma"], args, 0).test
    ours = gem.mean_loglik(gem.BENCHES["gamma"], em.get_params(state), x_test)
    np.testing.assert_allclose(ours, float(np.mean(em.log_likelihood(state, *x_test))), rtol=1e-5)


def test_handwritten_twin_replicates_onlineem_defaults(rng):
    """The streaming benchmark's throughput ratio compares like with like: the
    hand-written twin, configured from OnlineEM's plan, computes the same iterates and
    the same Polyak average (the M step of the batches' averaged statistics) as
    `OnlineEM.run` with its defaults, batch for batch."""
    import functools

    import jax
    import jax.numpy as jnp

    from benchmarks.handwritten import config_from_plan, jax_init, jax_scan
    from numpyro_onlineem import OnlineEM
    from tests.models import gmm_diag

    d, k, b = 8, 3, 64
    centres = rng.normal(size=(k, d)) * 3.0
    x = (centres[rng.integers(0, k, 64 * 80)] + rng.normal(size=(64 * 80, d))).astype("f4")
    em = OnlineEM(functools.partial(gmm_diag, K=k), init="model")
    start = {"locs": x[:k], "scales": np.ones((k, d), "f4"), "weights": np.ones(k, "f4") / k}
    state = em.init(jax.random.PRNGKey(0), x[:b], init_params=start)
    result = em.run(
        jax.random.PRNGKey(0), x[b:], batch_size=b, init_state=state, progress_bar=False
    )
    config = config_from_plan(state.plan)
    assert config.polyak_start is not None  # the average is part of what is compared
    twin = jax_init(dict(state.params), jnp.asarray(x[:b]))
    twin, _ = jax_scan(config, twin, jnp.asarray(x[b:]).reshape(-1, b, d))
    assert float(result.state.averaged_points) > 1_000  # averaged for most of the stream
    for name in ("weights", "locs", "scales"):
        np.testing.assert_allclose(twin.params[name], result.state.params[name], atol=2e-4)
        np.testing.assert_allclose(twin.averaged[name], result.params[name], atol=2e-4)


def test_handwritten_twin_restarts_a_stale_average_as_onlineem_does():
    """The twin runs OnlineEM's check of the Polyak average too (its cost is part of
    the throughput compared): on two components that separate late, both find the
    average stale at the same update, begin it again, and end with the same average."""
    import jax
    import jax.numpy as jnp

    from benchmarks.handwritten import config_from_plan, jax_init, jax_scan
    from numpyro_onlineem import OnlineEM
    from tests.models import gmm_diag

    rng = np.random.default_rng(0)
    k, d, b = 3, 3, 256
    means = 4.0 * rng.normal(size=(k, d))
    scales = rng.uniform(0.3, 2.0, size=(k, d))
    z = rng.choice(k, 80 * b, p=rng.dirichlet(5 * np.ones(k)))
    x = (means[z] + scales[z] * rng.normal(size=(80 * b, d))).astype(np.float32)
    em = OnlineEM(lambda x: gmm_diag(x, K=k))
    state = em.init(jax.random.PRNGKey(0), x[:b])
    result = em.run(
        jax.random.PRNGKey(0), x[b:], batch_size=b, init_state=state, progress_bar=False
    )
    twin = jax_init(dict(state.params), jnp.asarray(x[:b]))
    twin, _ = jax_scan(config_from_plan(state.plan), twin, jnp.asarray(x[b:]).reshape(-1, b, d))
    start = config_from_plan(state.plan).polyak_start
    assert float(result.state.polyak_from) > start  # it began again
    assert float(twin.polyak_from) == float(result.state.polyak_from)
    for name in ("weights", "locs", "scales"):
        np.testing.assert_allclose(twin.averaged[name], result.params[name], atol=2e-4)
