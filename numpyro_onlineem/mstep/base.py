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

An M step may also have ``reference(batch) -> Array``: a fixed point its statistics are
taken about, computed once from the init batch and kept in
``OnlineEMState.shifts[name]`` (read back as ``batch.shifts[name]``).

Four implementations: `numpyro_onlineem.mstep.closed_form` (exponential-family
sites), `numpyro_onlineem.mstep.linear` (weighted least squares for a Normal location
linear in a site), `numpyro_onlineem.mstep.numerical` (generalized EM: Newton or optax steps on
the expected complete-data log-likelihood, in unconstrained space) and
`numpyro_onlineem.mstep.fixed` (sites held at their initial value). Another path is one
new module implementing the same three functions; the plan chooses it per site and the
core never changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax


class EStepBatch(NamedTuple):
    r"""What the E step of one batch gives the M steps.

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
    params : dict
        The estimated sites' values the E step ran at, $\theta'$.
    expected_log_joint : callable
        ``params -> (local, priors)``: the batch's expected complete-data
        log-likelihood per datum at ``params``, with the E step's posterior held fixed,
        $\bar q(\theta) = |B|^{-1} \sum_i E_{p(z_i \mid x_i, \theta')}
        [\log p(x_i, z_i \mid \theta)]$ (shape ``()``), and the log-prior of every global
        site at ``params`` (``{site: ()}``). Numerical M steps optimise it.
    trace_at : callable or None
        ``params -> OrderedDict``: the model's trace on the batch at other values of the
        estimated sites (the same data and subsample). The weighted least squares of
        `numpyro_onlineem.mstep.linear` differentiates a location through it.
    log_marginal : callable or None
        ``params -> ()``: the batch's marginal log-likelihood per datum at other values
        of the estimated sites, $|B|^{-1} \sum_i \log p(x_i \mid \theta)$ (the E step
        run again at ``params``). Its Hessian is the observed information that the
        numerical Newton step preconditions with.
    """

    trace: OrderedDict
    weights: dict
    shifts: dict
    batch_size: int
    total_size: float
    params: dict
    expected_log_joint: Callable
    trace_at: Callable | None = None
    log_marginal: Callable | None = None


class MStepContext(NamedTuple):
    r"""What every M step may read at an update, besides its statistics.

    Attributes
    ----------
    config : numpyro_onlineem.core.Config
        The static settings of the fit.
    batch : EStepBatch
        The E step of the current batch (priors' hyperparameters come from its trace).
    effective_points : Array, shape ()
        The effective number of points behind the running statistics
        (``1 / OnlineEMState.weight_sq``).
    step_size : Array, shape ()
        The step $\gamma_n$ of this batch's statistics (the exact running mean's during
        the burn-in).
    decay : Array, shape ()
        The step-size schedule's decay so far, $\gamma(t) / \gamma(0)$ per
        ``step_points`` points (1 with a constant step): numerical M steps scale their
        optimizer's steps by it.
    """

    config: Any
    batch: EStepBatch
    effective_points: jax.Array
    step_size: jax.Array
    decay: jax.Array


class MStep(Protocol):
    """An M step of some estimated sites (see the module docstring). It may also give
    ``settled(mstep_state) -> bool array``: whether its iterates have left their
    transient (the numerical Newton step's; `numpyro_onlineem.core.settled_flags`); and
    the class attribute ``averages_statistics = True`` when its ``update`` is a function
    of its statistics alone (closed form, weighted least squares), so that its Polyak
    average is its ``update`` of the averaged statistics
    (`numpyro_onlineem.core.average_statistics`) rather than the mean of its iterates."""

    @property
    def name(self) -> str:
        """Key of its statistics and state in `OnlineEMState`."""

    @property
    def estimated(self) -> tuple:
        """The estimated sites it updates (every other entry of ``params`` it returns
        unchanged)."""

    def init(self, params: dict) -> Any:
        """Its state, from the initial parameters."""

    def statistics(self, batch: EStepBatch) -> dict:
        """Per-datum statistics of one batch."""

    def update(
        self, stats: dict, params: dict, mstep_state: Any, context: MStepContext
    ) -> tuple[dict, Any]:
        """New parameters (all of them) and state, from the running statistics."""
