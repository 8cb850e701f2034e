r"""The E-step protocol: the posterior of a batch's local latents given the parameters.

An E step is a small static callable (hashable by value, it lives in the plan):

    estep(trace, sites, centers) -> EStepResult
    estep.log_likelihood(trace, sites, centers) -> (batch,)

from the model's trace on a batch (`numpyro_onlineem.model.enum_trace`) to the
per-datum marginal log-likelihood and the posterior weight of every configuration of
every local factor, which the M steps' statistics read
(`numpyro_onlineem.mstep.base.EStepBatch`). Exact enumeration of discrete latents is
`numpyro_onlineem.estep.enumerate.Enumerate`; a mean-field variational E step for
continuous local latents, or a forward-backward pass over a Markov chain, is one new
module implementing the same call, chosen when the plan recognises the model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Protocol

import jax

from numpyro_onlineem.model import ModelSites


class EStepResult(NamedTuple):
    r"""What the E step returns for one batch.

    Attributes
    ----------
    loglik : Array, shape (batch,)
        $\log p(x_i \mid \theta)$ for each datum of the data plate.
    weights : dict[str, Array]
        For each local site, the posterior probability of every configuration of its
        log-probability tensor (same shape as that tensor).
    log_probs : dict[str, Array]
        The log-probability tensors themselves.
    trace : OrderedDict
        The enumerated trace the factors came from.
    """

    loglik: jax.Array
    weights: dict
    log_probs: dict
    trace: OrderedDict


class EStep(Protocol):
    """An E step (see the module docstring)."""

    @property
    def name(self) -> str:
        """What it is, for reports."""

    def __call__(
        self, trace: OrderedDict, sites: ModelSites, centers: dict | None = None
    ) -> EStepResult:
        """The E step of one batch."""

    def log_likelihood(
        self, trace: OrderedDict, sites: ModelSites, centers: dict | None = None
    ) -> jax.Array:
        r"""$\log p(x_i \mid \theta)$ of every datum, ``(batch,)``: the ``loglik`` of the
        call alone, cheap to differentiate."""
