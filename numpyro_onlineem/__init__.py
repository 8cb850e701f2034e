"""numpyro-onlineem: online EM for NumPyro models.

Public names only; see `OnlineEM`.
"""

from numpyro_onlineem.api import OnlineEM
from numpyro_onlineem.initialization import kmeans_pp
from numpyro_onlineem.mstep.expfam import MStepOptions
from numpyro_onlineem.mstep.plan import UnsupportedModelError
from numpyro_onlineem.schedules import constant, robbins_monro
from numpyro_onlineem.state import OnlineEMRunResult, OnlineEMState, UpdateInfo

__version__ = "0.1.0"

__all__ = [
    "MStepOptions",
    "OnlineEM",
    "OnlineEMRunResult",
    "OnlineEMState",
    "UnsupportedModelError",
    "UpdateInfo",
    "constant",
    "kmeans_pp",
    "robbins_monro",
]
