"""The quickstart's code runs as written, and says what it prints."""

import re
from pathlib import Path

import numpy as np

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def _python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_quickstart_blocks_run_in_order():
    namespace = {}
    blocks = _python_blocks(QUICKSTART)
    assert len(blocks) >= 10
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"quickstart.md block {i + 1}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"quickstart.md block {i + 1} failed: {e!r}") from e
        if 'em.mstep_paths(state)["taus"]' in block:
            path = namespace["em"].mstep_paths(namespace["state"])["taus"]
            assert path == (
                "closed form: Normal scale of site 'obs' (as a precision: scale = tau ** -0.5), "
                "posterior mode under its Gamma prior"
            )
        if 'mstep={"weights": "fixed"}' in block:
            assert namespace["em"].mstep_paths(namespace["state"])["weights"] == (
                "fixed at its initial value"
            )
            np.testing.assert_array_equal(
                namespace["em"].get_params(namespace["state"])["weights"],
                np.float32([0.3, 0.3, 0.4]),
            )
        if "update_with_info" in block:
            step = 1 - (1 - (500 / 256 + 2) ** -0.6) ** (1 / 256)
            np.testing.assert_allclose(float(namespace["info"].step_size), step, rtol=1e-5)
        if "losses: (98,)" in block:
            assert namespace["result"].losses.shape == (98,)
        if "itertools.islice(sensor(), 1000)" in block:
            assert float(namespace["result"].state.num_seen) == 1000.0
