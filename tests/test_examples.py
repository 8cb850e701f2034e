"""Every script in ``examples/`` runs with tiny arguments, and what it returns is right."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_streaming_gmm(module, result, out):
    online, batch, truth = result["online"], result["batch"], result["truth"]
    # well-separated components (16 apart, unit noise): both fits find the truth
    assert batch["heldout_ll"] > result["truth_ll"] - 0.1
    assert online["heldout_ll"] > batch["heldout_ll"] - 0.15
    assert batch["mean_dist"] < 0.35
    assert online["mean_dist"] < 0.5
    perm = module.match_components(online["params"]["locs"], truth["locs"])
    np.testing.assert_allclose(online["params"]["weights"][perm], truth["weights"], atol=0.05)
    np.testing.assert_allclose(online["params"]["scales"][perm], truth["scales"], rtol=0.25)
    # the example's own NumPy log-likelihood agrees with OnlineEM.log_likelihood
    assert online["heldout_ll"] == pytest.approx(online["package_heldout_ll"], rel=1e-5)
    for row in ("online EM", "batch EM", "truth"):
        assert row in out


def check_compare_with_nuts(module, result, out):
    comparison, truth = result["comparison"], result["truth"]
    table, k = comparison.table, len(truth["weights"])
    assert len(table) == k + 2 * truth["locs"].size
    # aligned, each online estimate is within 4 NUTS posterior sd of the NUTS mean (a
    # component left with another's label would be tens of sd away)
    assert (table["z"].abs() < 4).all(), table
    # after alignment, NUTS's component k and the online component k are nearest to the
    # same true component, for every chain
    nearest = lambda locs: np.argmin(
        np.linalg.norm(locs[:, None] - truth["locs"][None], axis=-1), axis=1
    )
    online = nearest(comparison.online.posterior["locs"].values[0, 0])
    assert sorted(online) == list(range(k))
    for chain in comparison.nuts.posterior["locs"].values:
        np.testing.assert_array_equal(nearest(chain.mean(0)), online)
    assert sorted(comparison.permutation["z"][0]) == list(range(k))
    assert comparison.online_seconds > 0 and comparison.nuts_seconds > 0
    # init takes 256 points (the default) and the 224 a last, short batch would have
    # held: 480; then 18 updates of 240
    assert len(comparison.losses) == 18
    for path in result["plots"].values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(next(iter(result["plots"].values())).parent)
    assert "online estimates inside the NUTS 94% HDI" in out


def check_numerical_m_step(module, result, out):
    online, reference, lls = result["online"], result["reference"], result["heldout"]
    # one pass of 5,000 points lands near the batch posterior mode scipy finds (the
    # full run: 200,000 points, equal to 4 decimals)
    assert lls["online EM (one pass)"] > lls["batch MAP (scipy)"] - 0.01
    np.testing.assert_allclose(online["locs"], reference["locs"], atol=0.1)
    np.testing.assert_allclose(online["weights"], reference["weights"], atol=0.05)
    assert np.all(np.diff(online["locs"]) > 0) and np.all(online["df"] > 0)
    assert result["paths"]["weights"].startswith("closed form")
    for name in ("locs", "scales", "df"):
        assert result["paths"][name].startswith("numerical"), result["paths"][name]
    assert "k-means++" in result["paths"]["locs"]
    # the example's NumPy log-likelihood agrees with OnlineEM.log_likelihood (which
    # averages the iterates too: same parameters)
    assert lls["online EM (one pass)"] == pytest.approx(result["package_heldout_ll"], rel=1e-5)
    assert "constraints hold (ordered locations, positive degrees of freedom): True" in out


# name -> (tiny command-line arguments, check of main's result and printed output)
EXAMPLES = {
    "streaming_gmm": (
        # 300 points for init, 700 one at a time, 7 batches of 100
        "--num-points 1700 --init-points 300 --dim 8 --components 3 --test-points 500 "
        "--no-progress".split(),
        check_streaming_gmm,
    ),
    "compare_with_nuts": (
        # 4,800 points online, NUTS on 240 of them (shapes of tests/test_compare.py's
        # mixture, whose compiled operations it reuses when both run)
        "--num-points 4800 --batch-size 240 --nuts-points 240 --num-warmup 200 "
        "--num-samples 300 --num-chains 1 --no-progress".split(),
        check_compare_with_nuts,
    ),
    "numerical_m_step": (
        "--num-points 5000 --test-points 2000 --no-progress".split(),
        check_numerical_m_step,
    ),
}


@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_example_runs(path, capsys):
    if path.stem not in EXAMPLES:
        pytest.fail(
            f"examples/{path.name} has no smoke test: add its tiny arguments and a check "
            "to EXAMPLES in tests/test_examples.py."
        )
    argv, check = EXAMPLES[path.stem]
    module = load_example(path.stem)
    result = module.main(module.parse_args(argv))
    check(module, result, capsys.readouterr().out)


def test_match_components_recovers_a_permutation():
    module = load_example("streaming_gmm")
    rng = np.random.default_rng(0)
    for k in (3, 9):  # exhaustive search, then greedy
        true = rng.normal(size=(k, 4)) * 10
        perm = rng.permutation(k)
        est = np.empty_like(true)
        est[perm] = true + 0.1 * rng.normal(size=true.shape)
        np.testing.assert_array_equal(module.match_components(est, true), perm)
