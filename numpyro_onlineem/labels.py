r"""Component labels: which axes of the estimated sites a discrete latent's states index,
and the Hungarian match that aligns the labels of two fits.

Mixture components are exchangeable: relabelling the states of ``z`` by a permutation
$\sigma$, together with every parameter axis that ``z`` indexes, leaves the model's
density unchanged. `component_axes` finds those axes from the model alone, by that
property; `match_components` and `permute_components` align the draws of a second fit
(NUTS) to the online estimate.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate, enum
from numpyro.contrib.funsor import trace as enum_trace
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from scipy.optimize import linear_sum_assignment

from numpyro_onlineem.model import support_size

#: Largest number of joint axis assignments `component_axes` tries for one latent.
MAX_ASSIGNMENTS = 4096


def component_axes(
    model: Callable, params: dict, *args: Any, rng_seed: int = 0, **kwargs: Any
) -> dict[str, dict[str, int]]:
    r"""For each discrete latent site the model enumerates, the axis of each estimated
    site that its states index.

    A site's axis belongs to latent ``z`` (with ``K`` states) when permuting it, jointly
    with the other sites' axes of ``z``, by $\sigma$ permutes every local log-probability
    factor along ``z``'s enumeration dimension by the same $\sigma$ and changes nothing
    else:

    $$
    \log p(x_i, z_i = k \mid \sigma \cdot \theta) = \log p(x_i, z_i = \sigma(k) \mid \theta)
    \quad \text{for all } i, k.
    $$

    The factors are those of the model's local sites (observed and enumerated, not the
    priors of global sites), computed with ``numpyro.contrib.funsor`` enumeration at
    random values near ``params`` (so that no two components tie). Every joint
    assignment of axes of size ``K`` is tried, with a cyclic shift and a transposition
    as $\sigma$; sites that no local factor depends on are left out. A ``K`` that equals
    another dimension, parameters tied across components and several sites per latent
    are all decided by the factors, not by shapes.

    Parameters
    ----------
    model : callable
        The NumPyro model.
    params : dict[str, Array]
        Constrained values of the estimated sites (``numpyro.param`` and global latent
        sites), by name, as `OnlineEM.get_params` returns them.
    *args, **kwargs
        The model's arguments (a batch of data).
    rng_seed : int
        Seed of the random values.

    Returns
    -------
    dict[str, dict[str, int]]
        ``{latent: {site: axis}}`` for every enumerated latent, in model order; the axis
        counts from 0 in the site's shape. An empty inner dict: no estimated site is
        indexed by that latent's states (its labels are not exchangeable, or it has one
        state).

    Raises
    ------
    ValueError
        When two different assignments both pass (the model's symmetry is ambiguous:
        pass the axes yourself, ``compare_with_nuts(..., align={...})``), or more than
        `MAX_ASSIGNMENTS` would have to be tried.
    """
    rng = np.random.default_rng(rng_seed)
    params = {name: np.asarray(value) for name, value in params.items()}
    plain = trace_sites(model, params, args, kwargs)
    unknown = sorted(set(params) - set(plain))
    if unknown:
        raise ValueError(
            f"component_axes: {unknown} are not sites of the model (its sites: {sorted(plain)})."
        )
    if not any(
        site["type"] == "sample" and not site["is_observed"] and site["fn"].support.is_discrete
        for site in plain.values()
    ):
        return {}
    probe = {name: _generic(value, _support(plain[name]), rng) for name, value in params.items()}
    factors, latents = _factor_function(model, params, plain, args, kwargs)
    base = factors(probe)
    for name, value in base.items():
        if np.isnan(value).any():
            raise ValueError(
                f"component_axes: the log-probability of site '{name}' is NaN near the "
                "given estimates; cannot tell which axes the latents index."
            )
    inert = set()
    for name in params:
        moved = dict(probe, **{name: _generic(params[name], _support(plain[name]), rng)})
        if _same(factors(moved), base):
            inert.add(name)
    claimed: set[tuple[str, int]] = set()
    result = {}
    for latent, (dim, k) in latents.items():
        found = _search(latent, dim, k, probe, base, factors, inert, claimed)
        claimed.update(found.items())
        result[latent] = found
    return result


def trace_sites(model: Callable, params: dict, args: tuple, kwargs: dict) -> dict:
    """One plain trace of the model (no enumeration) with ``params`` substituted."""
    params = {name: jnp.asarray(value) for name, value in params.items()}
    seeded = handlers.seed(handlers.substitute(model, data=params), rng_seed=0)
    return handlers.trace(seeded).get_trace(*args, **kwargs)


def _factor_function(model, params, plain, args, kwargs):
    """A jitted ``values -> {site: log-prob tensor}`` over the local sites, with discrete
    latents enumerated; and ``{latent: (enumeration dim, number of states)}``."""
    plate_dims = [f.dim for site in plain.values() for f in site.get("cond_indep_stack", [])]
    first_dim = min(plate_dims, default=0) - 1

    def run(values):
        values = {name: jnp.asarray(value) for name, value in values.items()}
        seeded = handlers.seed(handlers.substitute(model, data=values), rng_seed=0)
        with enum_trace() as tr, enum(first_available_dim=first_dim):
            config_enumerate(seeded)(*args, **kwargs)
        return tr

    tr = run(params)
    local = [
        name
        for name, site in tr.items()
        if site["type"] == "sample"
        and name not in params
        and (site["is_observed"] or site["infer"].get("enumerate") == "parallel")
    ]
    latents = {
        name: (
            tr[name]["infer"]["name_to_dim"][name],
            support_size(tr[name]["fn"]),
        )
        for name in local
        if not tr[name]["is_observed"]
    }

    @jax.jit
    def factors(values):
        trace = run(values)
        return {name: trace[name]["fn"].log_prob(trace[name]["value"]) for name in local}

    return (lambda values: jax.tree.map(np.asarray, factors(values))), latents


def _search(latent, dim, k, probe, base, factors, inert, claimed):
    if k < 2:
        return {}
    options = []
    for name, value in probe.items():
        axes = [a for a in range(value.ndim) if value.shape[a] == k and (name, a) not in claimed]
        if axes and name not in inert:
            options.append([(name, a) for a in axes] + [None])
    total = int(np.prod([len(o) for o in options])) if options else 0
    if total > MAX_ASSIGNMENTS:
        raise ValueError(
            f"component_axes: {total} joint assignments of axes of size {k} would have to be "
            f"tried for latent '{latent}'; pass them yourself: align={{'{latent}': "
            "{site: axis, ...}}."
        )
    sigmas = [np.roll(np.arange(k), -1)] + ([np.r_[1, 0, 2:k]] if k > 2 else [])
    expected = [{n: _permute_dim(f, sigma, dim) for n, f in base.items()} for sigma in sigmas]
    passing = []
    for choice in itertools.product(*options):
        assignment = dict(c for c in choice if c is not None)
        if not assignment:
            continue
        if all(
            _same(factors(_permute_values(probe, assignment, sigma)), target)
            for sigma, target in zip(sigmas, expected, strict=True)
        ):
            passing.append(assignment)
    if len(passing) > 1:
        raise ValueError(
            f"component_axes: several assignments of axes to the states of '{latent}' leave "
            f"the model unchanged: {passing}. Pass the right one yourself: "
            f"align={{'{latent}': {{site: axis, ...}}}}."
        )
    return passing[0] if passing else {}


def _support(site):
    if site["type"] == "param":
        return site["kwargs"].get("constraint", constraints.real)
    return site["fn"].support


def _generic(value, support, rng):
    """A random value of the support near ``value``, in unconstrained space, so that no
    two components tie."""
    transform = biject_to(support)
    u = np.clip(np.nan_to_num(np.asarray(transform.inv(value))), -30.0, 30.0)  # a 0 weight
    u = u + 0.1 * rng.standard_normal(u.shape)
    return np.asarray(transform(u.astype(value.dtype)), value.dtype)


def _permute_values(values, assignment, sigma):
    out = dict(values)
    for name, axis in assignment.items():
        out[name] = np.take(values[name], sigma, axis=axis)
    return out


def _permute_dim(factor, sigma, dim):
    if factor.ndim >= -dim and factor.shape[dim] == len(sigma):
        return np.take(factor, sigma, axis=dim)
    return factor


def _same(a: dict, b: dict) -> bool:
    for name in b:
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return False
        finite = np.abs(y[np.isfinite(y)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        tol = 1e-4 if y.dtype == np.float32 else 1e-9
        if not np.allclose(x, y, rtol=tol, atol=tol * scale, equal_nan=True):
            return False
    return True


# ------------------------------------------------------------------- alignment
def component_costs(
    estimate: dict[str, np.ndarray], draws: dict[str, np.ndarray], sites: dict[str, int]
) -> np.ndarray:
    r"""The cost of giving each chain's component ``j`` the estimate's label ``k``: the
    squared distance of the estimate's component ``k`` to the chain's posterior mean of
    component ``j``, in units of the chain's posterior variance $v_{s,e}$ of each element
    (averaged over components), averaged over every element ``e`` of every site ``s``:

    $$
    C_{kj} = \operatorname{mean}_{s, e}\, (\hat\theta_{s,k,e} - \bar\theta_{s,j,e})^2 / v_{s,e}.
    $$

    Parameters
    ----------
    estimate : dict[str, Array]
        Point estimates by site, shape ``site_shape``.
    draws : dict[str, Array]
        Draws by site, shape ``(chains, draws) + site_shape``.
    sites : dict[str, int]
        The axis of each site indexed by the latent's ``K`` states (`component_axes`);
        every site must have draws.

    Returns
    -------
    Array, shape (chains, K, K)
        ``C[c, k, j]``, a mean squared standardised distance (about 1 for a chain whose
        component ``j`` is the estimate's ``k``).
    """
    if not sites:
        raise ValueError("component_costs: no sites to match on.")
    costs, count = 0.0, 0
    for name, axis in sites.items():
        est = np.moveaxis(np.asarray(estimate[name], np.float64), axis, 0)
        chains = np.moveaxis(np.asarray(draws[name], np.float64), axis + 2, 2)
        num_chains, num_draws, k = chains.shape[:3]
        est, chains = est.reshape(k, -1), chains.reshape(num_chains, num_draws, k, -1)
        mean, var = chains.mean(1), chains.var(1).mean(1, keepdims=True)  # (c, K, e), (c, 1, e)
        var = var + 1e-12 * max(float(var.max()), 1e-300)
        costs = costs + (((est[None, :, None, :] - mean[:, None]) ** 2) / var[:, None]).sum(-1)
        count += est.shape[1]
    return costs / count


def match_components(
    estimate: dict[str, np.ndarray], draws: dict[str, np.ndarray], sites: dict[str, int]
) -> np.ndarray:
    """Hungarian match of each chain's components to the estimate's: the permutation of
    least total `component_costs`, by ``scipy.optimize.linear_sum_assignment``.

    Parameters
    ----------
    estimate, draws, sites
        As for `component_costs`.

    Returns
    -------
    Array, int, shape (chains, K)
        ``perm[c, k]``: the component of chain ``c`` that corresponds to the estimate's
        component ``k`` (`permute_components` applies it).
    """
    perms = []
    for cost in component_costs(estimate, draws, sites):
        rows, cols = linear_sum_assignment(cost)
        perms.append(cols[np.argsort(rows)])
    return np.stack(perms)


def permute_components(
    draws: dict[str, np.ndarray], sites: dict[str, int], perm: np.ndarray
) -> dict[str, np.ndarray]:
    """Relabel each chain's draws along each site's axis (`component_axes`):
    ``out[s][c, d, ..., k, ...] = draws[s][c, d, ..., perm[c, k], ...]`` for every site
    ``s`` in ``sites``; other sites are returned as they are."""
    out = dict(draws)
    for name, axis in sites.items():
        if name not in draws:
            continue
        value = np.asarray(draws[name])
        out[name] = np.stack(
            [np.take(value[c], perm[c], axis=axis + 1) for c in range(value.shape[0])]
        )
    return out
