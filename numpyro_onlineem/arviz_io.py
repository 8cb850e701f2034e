"""ArviZ ``InferenceData`` from an online fit, and the lazy import of the optional
dependencies of the comparison (``pip install "numpyro-onlineem[compare]"``)."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import arviz as az

INSTALL_HINT = 'pip install "numpyro-onlineem[compare]"'

# ArviZ 0.2x announces its coming refactor with a FutureWarning, once a day, from its
# own __init__. It is about ArviZ's next API, not about anything our user called, so the
# import made on the user's behalf silences that one message and nothing else.
ARVIZ_REFACTOR_NOTICE = r"\s*ArviZ is undergoing a major refactor"


def import_optional(name: str) -> ModuleType:
    """Import ``arviz``, ``pandas`` or ``matplotlib.pyplot`` on first use.

    Raises
    ------
    ImportError
        Naming the missing package and ``pip install "numpyro-onlineem[compare]"``.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=ARVIZ_REFACTOR_NOTICE, category=FutureWarning)
            return importlib.import_module(name)
    except ImportError as e:
        package = name.split(".")[0]
        raise ImportError(
            f"Comparing with NUTS and converting to ArviZ need {package}, which is not "
            f"installed: {INSTALL_HINT}"
        ) from e


def to_inference_data(em: Any, state: Any) -> az.InferenceData:
    r"""An online fit as ArviZ ``InferenceData``, so that ArviZ's tools work on it.

    The point estimate `OnlineEM.get_params` returns is one draw of one chain in the
    ``posterior`` group: each estimated site (``numpyro.param`` and global latent) under
    its own name, with dims ``(chain, draw, <name>_dim_0, ...)`` and the site's shape
    after them, as ``az.from_numpyro`` names a NUTS posterior.

    $$
    \text{posterior}[s][0, 0] = \hat\theta_s
    $$

    Parameters
    ----------
    em : OnlineEM
    state : OnlineEMState

    Returns
    -------
    arviz.InferenceData
        ``posterior`` group only; attributes ``inference_library="numpyro_onlineem"`` and
        ``estimate="point"``.

    Notes
    -----
    An estimator with a posterior (a streaming SVI fit, say) comes through
    `draws_to_inference_data` with its draws, ``(chains, draws) + shape`` per site.
    """
    params = em.get_params(state)
    return draws_to_inference_data(
        {name: np.asarray(value)[None, None] for name, value in params.items()}, estimate="point"
    )


def draws_to_inference_data(draws: dict[str, Any], estimate: str = "draws") -> az.InferenceData:
    """Draws of each site as the ``posterior`` group of an ``InferenceData``
    (``az.from_dict``).

    Parameters
    ----------
    draws : dict[str, Array]
        ``{site: array of shape (chains, draws) + site_shape}``.
    estimate : str
        What the draws are (``"point"``: one draw of a point estimate), recorded in the
        group's attributes.

    Returns
    -------
    arviz.InferenceData
        Dims ``(chain, draw, <site>_dim_0, ...)``.
    """
    from numpyro_onlineem import __version__

    az = import_optional("arviz")
    bad = {name: np.shape(v) for name, v in draws.items() if np.ndim(v) < 2}
    if bad:
        raise ValueError(
            f"draws_to_inference_data: every site needs leading (chain, draw) axes; got {bad}."
        )
    return az.from_dict(
        posterior={name: np.asarray(value) for name, value in draws.items()},
        posterior_attrs={
            "inference_library": "numpyro_onlineem",
            "inference_library_version": __version__,
            "estimate": estimate,
        },
    )
