r"""Exact E step by enumeration.

The local factors of a traced model (every sample site inside the data plate, with
the discrete latents enumerated in parallel) are contracted with funsor into the
per-datum marginal log-likelihood $\log p(x_i \mid \theta)$. The posterior
marginal of every factor's scope is the gradient of the total with respect to that
factor's log-probabilities (Eisner 2016):

$$
p(\mathrm{scope}(f) \mid x) = \partial \log Z / \partial \log f.
$$
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import funsor
import jax
import jax.numpy as jnp

from numpyro_onlineem.estep.base import EStepResult
from numpyro_onlineem.estep.logprob import fast_log_prob
from numpyro_onlineem.model import ModelSites, data_plate_frame

funsor.set_backend("jax")


class Factor(NamedTuple):
    """Static layout of one local factor: names of its batch dimensions."""

    name: str
    dim_to_name: tuple  # ((dim, name), ...)


def local_log_probs(
    trace: OrderedDict, sites: ModelSites, centers: dict | None = None
) -> tuple[dict, tuple]:
    """Unscaled log-probabilities of the local sites and their funsor layouts.

    Sites of a recognised family with ``to_event`` dimensions are computed by matrix
    products (`numpyro_onlineem.estep.logprob`), written about ``centers[name]`` where
    given (the reference points of the statistics); the others by their ``log_prob``.
    """
    centers = centers or {}
    log_probs, layout = {}, []
    for name in sites.local:
        site = trace[name]
        fn, value = site["fn"], site["value"]
        lp = None if site["intermediates"] else fast_log_prob(fn, value, centers.get(name))
        if lp is None:
            lp = (
                fn.log_prob(value, site["intermediates"])
                if site["intermediates"]
                else fn.log_prob(value)
            )
        dim_to_name = site["infer"]["dim_to_name"]
        lp = jnp.broadcast_to(lp, jnp.shape(lp))
        log_probs[name] = lp
        layout.append(Factor(name, tuple(dim_to_name.items())))
    return log_probs, tuple(layout)


def _mixture_axes(log_probs: dict, layout: tuple, sites: ModelSites) -> dict | None:
    """For a mixture (at most one enumerated site, no plate but the data plate): each
    factor's named axes as ``((axis of the factor, axis of a (states, data) grid),
    ...)``, every other axis having size one; ``None`` for any other layout."""
    if len(sites.enumerated) > 1:
        return None
    grid_axis = {sites.data_plate: 1, **{n: 0 for n in sites.enumerated}}
    axes = {}
    for fac in layout:
        lp, d2n = log_probs[fac.name], dict(fac.dim_to_name)
        pairs = []
        for i, size in enumerate(jnp.shape(lp)):
            name = d2n.get(i - jnp.ndim(lp))
            if name in grid_axis:
                pairs.append((i, grid_axis[name]))
            elif size != 1:
                return None
        axes[fac.name] = tuple(pairs)
    return axes


def _mixture_grid(log_probs: dict, axes: dict, size: int) -> tuple[jax.Array, dict]:
    """$\\sum_f \\log f(k, i)$ on the ``(states, data)`` grid of a mixture's factors
    (`_mixture_axes`), shape ``(K, size)``, and each factor's grid shape (`_to_grid`)."""
    total, shapes = jnp.zeros((1, 1), jnp.result_type(float)), {}
    for name, pairs in axes.items():
        lp = log_probs[name]
        on_grid = _to_grid(lp.reshape([lp.shape[i] for i, _ in pairs]), pairs)
        total, shapes[name] = total + on_grid, on_grid.shape
    return jnp.broadcast_to(total, (total.shape[0], size)), shapes


def _to_grid(lp: jax.Array, pairs: tuple) -> jax.Array:
    """A factor's log-probabilities without their size-one axes, on the grid's axes:
    ``(K or 1, batch or 1)``."""
    grid = [g for _, g in pairs]
    if grid == [1, 0]:
        lp, grid = lp.T, [0, 1]
    shape = [1, 1]
    for g, n in zip(grid, lp.shape, strict=True):
        shape[g] = n
    return lp.reshape(shape)


def _contract_mixture(log_probs: dict, axes: dict, size: int) -> jax.Array:
    """$\\log \\sum_k \\prod_f f(k, i)$ for factors on a ``(states, data)`` grid
    (`_mixture_axes`): one ``logsumexp``. The same contraction as funsor's, without its
    bookkeeping, which on the CPU costs more than the arithmetic for small batches."""
    return jax.nn.logsumexp(_mixture_grid(log_probs, axes, size)[0], axis=0)


def _mixture_posterior(log_probs: dict, axes: dict, size: int) -> tuple[jax.Array, dict]:
    r"""``(loglik, weights)`` of a mixture (`_mixture_axes`) in closed form: the
    posterior $r_{ki} = \exp(\ell_{ki} - \log \sum_{k'} e^{\ell_{k'i}})$ on the grid,
    summed over the grid axes a factor is constant along. It is the gradient that
    `e_step` takes otherwise, without its backward pass's transposes (4 of the 54
    fused operations of a D=64, K=10 mixture's update; no measurable change in time)."""
    total, shapes = _mixture_grid(log_probs, axes, size)
    # logsumexp's own steps, so that one exponential gives both (a second pass of exp
    # over the grid cost 6 us of 37 at D=2, K=20)
    top = jnp.max(total, axis=0)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    e = jnp.exp(total - top)
    norm = jnp.sum(e, axis=0)
    loglik = jnp.log(norm) + top
    post = e / norm
    weights = {}
    for name, pairs in axes.items():
        lp = log_probs[name]
        w = post
        for g in (0, 1):
            if shapes[name][g] == 1 and post.shape[g] != 1:
                w = jnp.sum(w, axis=g, keepdims=True)
        if [g for _, g in pairs] == [1, 0]:
            w = w.T
        weights[name] = w.reshape(lp.shape).astype(lp.dtype)
    return loglik, weights


def _contract(log_probs: dict, layout: tuple, sites: ModelSites, plates: frozenset, size: int):
    """Per-datum log marginal likelihood, shape (size,), by funsor's sum-product."""
    factors = []
    for fac in layout:
        lp = log_probs[fac.name]
        factors.append(
            funsor.to_funsor(lp, output=funsor.Real, dim_to_name=OrderedDict(fac.dim_to_name))
        )
    sum_vars = frozenset(sites.enumerated)
    eliminate = sum_vars | (plates - {sites.data_plate})
    with funsor.interpretations.lazy:
        lazy = funsor.sum_product.sum_product(
            funsor.ops.logaddexp, funsor.ops.add, factors, eliminate=eliminate, plates=plates
        )
    result = funsor.optimizer.apply_optimizer(lazy)
    if set(result.inputs) - {sites.data_plate}:
        raise ValueError(
            "OnlineEM: the enumerated log density did not reduce to one value per datum; "
            f"left-over dimensions: {sorted(set(result.inputs) - {sites.data_plate})}."
        )
    data = result.data
    if sites.data_plate not in result.inputs:
        data = jnp.broadcast_to(data, (size,))
    return data


def _marginal(trace: OrderedDict, sites: ModelSites, centers: dict | None):
    """The local factors of an enumerated trace, ``log_probs -> loglik (batch,)``
    (their contraction over the enumerated states), and a mixture's axes
    (`_mixture_axes`; ``None`` for other layouts) with the batch size."""
    log_probs, layout = local_log_probs(trace, sites, centers)
    plates = frozenset(
        f.name for n in sites.local for f in trace[n]["cond_indep_stack"] if f.dim is not None
    )
    size = data_plate_frame(trace[sites.observed[0]], sites.data_plate).size
    axes = None
    if plates == frozenset({sites.data_plate}):
        axes = _mixture_axes(log_probs, layout, sites)
    if axes is not None:
        contract = lambda lps: _contract_mixture(lps, axes, size)
    else:
        contract = lambda lps: _contract(lps, layout, sites, plates, size)
    return log_probs, contract, (axes, size)


def e_step(trace: OrderedDict, sites: ModelSites, centers: dict | None = None) -> EStepResult:
    """Exact posterior weights of every local factor of an enumerated trace
    (``centers``: see `local_log_probs`): the gradients of the summed marginal
    log-likelihood with respect to the factors (a mixture's in closed form,
    `_mixture_posterior`)."""
    log_probs, contract, (axes, size) = _marginal(trace, sites, centers)
    if axes is not None:
        loglik, weights = _mixture_posterior(log_probs, axes, size)
        return EStepResult(loglik, weights, log_probs, trace)

    def total(lps):
        ll = contract(lps)
        return ll.sum(), ll

    (_, loglik), weights = jax.value_and_grad(total, has_aux=True)(log_probs)
    return EStepResult(loglik, weights, log_probs, trace)


def log_likelihood(trace: OrderedDict, sites: ModelSites, centers: dict | None = None) -> jax.Array:
    r"""$\log p(x_i \mid \theta)$ of every datum, ``(batch,)``: `e_step`'s ``loglik``
    without the posterior weights, for functions that differentiate it."""
    log_probs, contract, _ = _marginal(trace, sites, centers)
    return contract(log_probs)


def num_data(trace: OrderedDict, sites: ModelSites) -> tuple[int, float]:
    """``(batch_size, total_size)`` of the data plate.

    ``numpyro.plate("data", N, subsample_size=B)`` gives ``(B, N)``; a plate of the
    batch's own size gives ``(B, B)``.
    """
    site = trace[sites.observed[0]]
    size = data_plate_frame(site, sites.data_plate).size
    scale = site["scale"]
    total = size if scale is None else size * float(scale)
    return size, total


class Enumerate(NamedTuple):
    """The exact E step by enumeration (`e_step`), as the plan's `EStep`."""

    @property
    def name(self) -> str:
        return "enumerate"

    def __call__(
        self, trace: OrderedDict, sites: ModelSites, centers: dict | None = None
    ) -> EStepResult:
        return e_step(trace, sites, centers)

    def log_likelihood(
        self, trace: OrderedDict, sites: ModelSites, centers: dict | None = None
    ) -> jax.Array:
        return log_likelihood(trace, sites, centers)
