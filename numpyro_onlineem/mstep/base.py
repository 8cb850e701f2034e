r"""The M-step protocol: how one group of estimated sites is updated, as pure functions.

In the style of optax's ``GradientTransformation``, an M step is a small static object
(a NamedTuple: hashable by value, so it can live in the plan that ``jit`` sees) with
three pure functions:

* ``init(params) -> mstep_state``: its own state (an optimizer's moments, say; ``()``
  when it needs none), kept in ``OnlineEMState.mstep_states[name]``;
* ``statistics(batch) -> stats``: what it needs from the E step of one batch
  (`EStepBatch`), as per-datum averages. Online EM keeps their stochastic
  approximation $\hat s_n = \hat s_{n-1} + \gamma_n (\bar s_n - \hat s_{n-1})$ in
  ``OnlineEMState.stats[name]``;
* ``update(stats, params, mstep_state, context) -> (params, mstep_state)``: the new
  values of its sites (every other entry of ``params`` returned unchanged) from the
  running statistics.

Two implementations: `numpyro_onlineem.mstep.closed_form` (exponential-family sites)
and `numpyro_onlineem.mstep.fixed` (sites held at their initial value). Another path,
a numerical M step say, is one new module implementing the same three functions; the
plan chooses it per site and the core never changes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Protocol

import jax


class EStepBatch(NamedTuple):
    """What the E step of one batch gives the M steps.

    Attributes
    ----------
    trace : OrderedDict
        The model's trace on the batch, enumerated sites with their enumeration axes.
    weights : dict[str, Array]
        Local site -> posterior weight of every position of its log-prob grid, given the
        data (`numpyro_onlineem.estep.enumerate.EStepResult`).
    shifts : dict[str, Array]
        Reference points of the Gaussian sites' statistics
        (`numpyro_onlineem.core.data_shifts`).
    batch_size : int
        Points in the batch.
    total_size : float
        Points in the data plate, ``N``.
    """

    trace: OrderedDict
    weights: dict
    shifts: dict
    batch_size: int
    total_size: float


class MStepContext(NamedTuple):
    """What every M step may read at an update, besides its statistics.

    Attributes
    ----------
    config : numpyro_onlineem.core.Config
        The static settings of the fit.
    batch : EStepBatch
        The E step of the current batch (priors' hyperparameters come from its trace).
    effective_points : Array, shape ()
        The effective number of points behind the running statistics
        (``1 / OnlineEMState.weight_sq``).
    """

    config: Any
    batch: EStepBatch
    effective_points: jax.Array


class MStep(Protocol):
    """An M step of some estimated sites (see the module docstring)."""

    @property
    def name(self) -> str:
        """Key of its statistics and state in `OnlineEMState`."""

    def init(self, params: dict) -> Any:
        """Its state, from the initial parameters."""

    def statistics(self, batch: EStepBatch) -> dict:
        """Per-datum statistics of one batch."""

    def update(
        self, stats: dict, params: dict, mstep_state: Any, context: MStepContext
    ) -> tuple[dict, Any]:
        """New parameters (all of them) and state, from the running statistics."""
