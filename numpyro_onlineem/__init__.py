"""numpyro-onlineem: online EM for NumPyro models.

Public names only; see `OnlineEM`. The comparison with NUTS (`compare_with_nuts`,
`NUTSComparison`, `to_inference_data`) is imported on first use, with its optional
dependencies (ArviZ, pandas, matplotlib: ``pip install "numpyro-onlineem[compare]"``).
"""

from typing import TYPE_CHECKING

from numpyro_onlineem.api import OnlineEM
from numpyro_onlineem.families import Family, MStepInputs, MStepOptions, register_family
from numpyro_onlineem.initialization import kmeans_pp
from numpyro_onlineem.mstep.plan import UnsupportedModelError
from numpyro_onlineem.schedules import constant, robbins_monro
from numpyro_onlineem.state import OnlineEMRunResult, OnlineEMState, UpdateInfo

if TYPE_CHECKING:  # pragma: no cover
    from numpyro_onlineem.arviz_io import to_inference_data
    from numpyro_onlineem.compare import NUTSComparison, compare_with_nuts

__version__ = "0.1.0"

_LAZY = {
    "compare_with_nuts": "numpyro_onlineem.compare",
    "NUTSComparison": "numpyro_onlineem.compare",
    "to_inference_data": "numpyro_onlineem.arviz_io",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'numpyro_onlineem' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Family",
    "MStepInputs",
    "MStepOptions",
    "NUTSComparison",
    "OnlineEM",
    "OnlineEMRunResult",
    "OnlineEMState",
    "UnsupportedModelError",
    "UpdateInfo",
    "compare_with_nuts",
    "constant",
    "kmeans_pp",
    "register_family",
    "robbins_monro",
    "to_inference_data",
]
