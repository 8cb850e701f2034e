r"""The functional core of online EM: pure functions of arrays and pytrees.

One update on a mini-batch $B_n$ (Cappé & Moulines 2009):

$$
\hat s_n = \hat s_{n-1} + \gamma_n \big( |B_n|^{-1} \textstyle\sum_{i \in B_n}
E_{\theta_{n-1}}[S(x_i, z_i) \mid x_i] - \hat s_{n-1} \big), \qquad
\theta_n = \bar\theta(\hat s_n).
$$

Statistics are per-datum averages; the M step weighs them by the data plate's total
size $N$ against the priors of global sites.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_onlineem.estep.enumerate import e_step, num_data
from numpyro_onlineem.model import ModelSites, enum_trace
from numpyro_onlineem.mstep.expfam import PRIOR_HYPERPARAMETERS, MStepOptions, segment_sum, unwrap
from numpyro_onlineem.mstep.plan import Plan, site_grid
from numpyro_onlineem.schedules import Schedule, robbins_monro
from numpyro_onlineem.state import OnlineEMState, UpdateInfo


class Config(NamedTuple):
    """Static settings of the core (hashable; part of the compiled function).

    Attributes
    ----------
    model : callable
    schedule : callable or None
        ``t -> step size`` after burn-in, evaluated at ``t`` = the number of batches
        of the current size seen before the update (init batch included; with a
        constant batch size, the update count plus one). ``None``: Robbins–Monro with
        the plan's exponent (`Plan.default_kappa`).
    burn_in : float or None
        Points to see before the first M step; until then statistics are the exact
        running mean of everything seen. ``None``: `Plan.default_burn_in`.
    polyak : bool or None
        Polyak–Ruppert averaging of the parameters; ``None``: on with the default
        schedule when `Plan.default_polyak` says so, off with a user schedule.
    polyak_start : float or None
        Points to see before the average starts; ``None``:
        `Plan.default_polyak_start`.
    options : MStepOptions
    """

    model: Callable
    schedule: Schedule | None
    burn_in: float | None
    polyak: bool | None
    polyak_start: float | None
    options: MStepOptions


def _align(arr: jax.Array, ndim: int) -> jax.Array:
    arr = jnp.asarray(arr)
    return arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)


def data_shifts(plan: Plan, trace: OrderedDict) -> dict:
    r"""Reference points $c$ about which the statistics of Gaussian sites are taken:
    the mean of the batch's data over the data axis, per coordinate, or over every
    coordinate when a cell pools several (`SitePlan.pooled_shift`).

    Returns
    -------
    dict[str, Array]
        Site -> $c$, shaped like the site's value aligned to its grid, size one on the
        data axis (and everywhere when pooled). Only sites whose family has a
        ``shift_role`` that is estimated.
    """
    out = {}
    for sp in plan.sites:
        fam = sp.family
        if fam.shift_role is None or fam.shift_role not in sp.learned:
            continue
        grid, _ = site_grid(trace[sp.site])
        value = _align(trace[sp.site]["value"], len(grid) + fam.value_event_ndim)
        value = value.astype(jnp.result_type(float))
        axis = None if sp.pooled_shift else sp.data_axis
        out[sp.site] = jnp.mean(value, axis=axis, keepdims=True)
    return out


class BatchStatistics(NamedTuple):
    r"""What the E step of one batch gives the update.

    Attributes
    ----------
    loglik : Array, shape (batch,)
        $\log p(x_i \mid \theta)$.
    stats : dict
        Site -> statistic -> array of shape ``(num_cells, ...)``: the batch mean of the
        expected sufficient statistics (about the reference points ``shifts``).
    batch_size, total_size : int, float
        Points in the batch, and in the data plate (``N`` of a subsampled plate).
    trace : OrderedDict
        The enumerated trace (the M step reads the priors' hyperparameters from it).
    shifts : dict
        The reference points used (`data_shifts`).
    """

    loglik: jax.Array
    stats: dict
    batch_size: int
    total_size: float
    trace: OrderedDict
    shifts: dict


def batch_statistics(
    config: Config,
    plan: Plan,
    params: dict,
    shifts: dict | None,
    args: tuple,
    kwargs: dict,
) -> BatchStatistics:
    """E step on one batch, with statistics about ``shifts`` (``None``: about this
    batch's own `data_shifts`, as at ``init``)."""
    sites = plan.model_sites
    trace = enum_trace(config.model, sites, params, args, kwargs)
    if shifts is None:
        shifts = data_shifts(plan, trace)
    res = e_step(trace, sites, shifts)
    batch_size, total_size = num_data(trace, sites)
    stats = {}
    for sp in plan.sites:
        site = trace[sp.site]
        grid, base = site_grid(site)
        fam = sp.family
        nd = len(grid)
        w = res.weights[sp.site]
        w = w.reshape(w.shape + (1,) * (nd - w.ndim))
        value = _align(site["value"], nd + fam.value_event_ndim)
        if sp.site in shifts:
            # the point the E step's Gaussian forms are centred on, too
            value = value.astype(jnp.result_type(float)) - shifts[sp.site]
        consts = {}
        for role, (_, arr) in fam.roles(base).items():
            if role not in sp.learned:
                consts[role] = _align(arr, nd + fam.role_event_ndim[role])
        moved = [jnp.moveaxis(a, sp.data_axis, 0) for a in (w, value)]
        consts = {k: jnp.moveaxis(v, sp.data_axis, 0) for k, v in consts.items()}
        raw = fam.suff_stats(moved[1], moved[0], consts, base)
        out = {k: _to_cells(v, sp, grid, v.shape[nd - 1 :]) / batch_size for k, v in raw.items()}
        stats[sp.site] = out
    return BatchStatistics(res.loglik, stats, batch_size, total_size, trace, shifts)


def _to_cells(v: jax.Array, sp, grid: tuple, event: tuple) -> jax.Array:
    """Sum an array over the grid positions off the data axis into cells:
    ``(num_cells, *event)``."""
    rest = grid[: sp.data_axis] + grid[sp.data_axis + 1 :]
    v = jnp.broadcast_to(v, rest + event).reshape((-1,) + event)
    if sp.cell_ids is not None:
        v = segment_sum(v, sp.cell_ids, sp.num_cells)
    return v


def _cell_shift(shift: jax.Array, sp, grid: tuple, event_ndim: int) -> jax.Array:
    """The reference point of every cell, ``(num_cells, *value_event)``, from a site's
    shift (constant within each cell by construction)."""
    shift = jnp.moveaxis(shift, sp.data_axis, 0)[0]
    event = tuple(shift.shape[shift.ndim - event_ndim :]) if event_ndim else ()
    total = _to_cells(shift, sp, grid, event)
    if sp.cell_ids is None:
        return total
    counts = np.bincount(sp.cell_ids, minlength=sp.num_cells).astype(float)
    return total / counts.reshape((-1,) + (1,) * event_ndim)


def _prior_blocks(fn, shape: tuple, role_event: tuple) -> dict:
    """Hyperparameters of a prior, broadcast over the estimated site's shape and cut into
    its parameter blocks: ``{name: (num_blocks, *role_event)}`` or ``(num_blocks,)``."""
    base = unwrap(fn)
    batch = shape[: len(shape) - len(role_event)]
    out = {}
    for key, full in PRIOR_HYPERPARAMETERS[type(base)].items():
        value = jnp.asarray(getattr(base, key))
        if full:
            out[key] = jnp.broadcast_to(value, shape).reshape((-1,) + tuple(role_event))
        else:
            out[key] = jnp.broadcast_to(value, batch).reshape(-1)
    return out


def m_step(
    config: Config,
    plan: Plan,
    params: dict,
    stats: dict,
    shifts: dict,
    total_size: float,
    trace,
):
    """Closed-form M step of every planned site, from the running statistics (taken
    about ``shifts``)."""
    new = dict(params)
    for sp in plan.sites:
        fam = sp.family
        shift = None
        if sp.site in shifts:
            grid, _ = site_grid(trace[sp.site])
            shift = _cell_shift(shifts[sp.site], sp, grid, fam.value_event_ndim)
        maps = {role: fam.reparams[role][name] for role, name in sp.reparams.items()}
        current, priors, events = {}, {}, {}
        for role, pname in sp.learned.items():
            shape = plan.model_sites.params[pname].shape
            ev = fam.role_event_ndim[role]
            events[role] = tuple(shape[len(shape) - ev :]) if ev else ()
            value = params[pname]
            if role in maps:
                value = maps[role].forward(value)
            current[role] = value.reshape((-1,) + events[role])
            prior_site = sp.priors.get(role)
            if prior_site is not None:
                priors[role] = _prior_blocks(trace[prior_site]["fn"], shape, events[role])
        groups = dict(sp.groups)  # static (NumPy) maps: identities are free
        out = fam.m_step(
            stats[sp.site],
            groups,
            current,
            priors,
            total_size,
            config.options,
            dict(sp.attrs),
            dict(sp.reparams),
            shift,
        )
        for role, value in out.items():
            pname = sp.learned[role]
            if role in maps:
                value = maps[role].inverse(value)
            new[pname] = value.reshape(params[pname].shape).astype(params[pname].dtype)
    return new


def init_state(
    config: Config, plan: Plan, params: dict, rng_key: jax.Array, args: tuple, kwargs: dict
) -> OnlineEMState:
    """State whose statistics are those of the init batch under ``params``, about the
    init batch's mean (`data_shifts`)."""
    batch = batch_statistics(config, plan, params, None, args, kwargs)
    return OnlineEMState(
        params=params,
        stats=batch.stats,
        shifts=batch.shifts,
        averaged=params,
        count=jnp.zeros((), jnp.int32),
        num_seen=jnp.asarray(batch.batch_size, jnp.result_type(float)),
        rng_key=rng_key,
        plan=plan,
    )


def update(
    config: Config, state: OnlineEMState, args: tuple, kwargs: dict
) -> tuple[OnlineEMState, UpdateInfo]:
    """One online EM update on the batch given by the model's ``args``/``kwargs``.

    Pure and jittable; the state's size is independent of how much data was seen.
    """
    plan = state.plan
    res = batch_statistics(config, plan, state.params, state.shifts, args, kwargs)
    batch, batch_size = res.stats, res.batch_size
    loss = -jnp.mean(res.loglik)
    dtype = state.num_seen.dtype
    seen = state.num_seen + batch_size
    burn_in = plan.default_burn_in if config.burn_in is None else config.burn_in
    in_burn_in = seen <= burn_in
    # the schedule runs on the number of batches of this size seen before (the init
    # batch included), so an update moves the statistics by the same amount whether
    # the points before it came one at a time or in batches
    schedule = config.schedule or robbins_monro(plan.default_kappa)
    step = jnp.asarray(schedule(state.num_seen / batch_size), dtype)
    gamma = jnp.minimum(jnp.where(in_burn_in, batch_size / seen, step), 1.0).astype(dtype)
    # a finite loss means finite data, log-densities and posterior weights, hence
    # finite batch statistics; otherwise the update is skipped. The guard is folded
    # into the elementwise updates (no branch, no extra pass over the state).
    finite = jnp.isfinite(loss)
    gamma = jnp.where(finite, gamma, 0.0)
    stats = jax.tree.map(
        lambda s, b: s + gamma.astype(s.dtype) * (jnp.where(finite, b, s) - s), state.stats, batch
    )
    proposed = m_step(config, plan, state.params, stats, state.shifts, res.total_size, res.trace)
    apply = finite & ~in_burn_in
    params = jax.tree.map(lambda new, old: jnp.where(apply, new, old), proposed, state.params)

    polyak = config.polyak
    if polyak is None:
        polyak = config.schedule is None and plan.default_polyak
    if polyak:
        # Polyak-Ruppert mean of the iterates, each weighted by its batch's points
        start = plan.default_polyak_start if config.polyak_start is None else config.polyak_start
        weight = jnp.where(seen > start, batch_size / jnp.maximum(seen - start, 1.0), 1.0)
        weight = jnp.where(finite, jnp.minimum(weight, 1.0), 0.0)
        averaged = jax.tree.map(
            lambda a, p: a + weight.astype(p.dtype) * (p - a), state.averaged, params
        )
    else:
        averaged = params
    new_state = OnlineEMState(
        params=params,
        stats=stats,
        shifts=state.shifts,
        averaged=averaged,
        count=state.count + finite.astype(state.count.dtype),
        num_seen=jnp.where(finite, seen, state.num_seen),
        rng_key=state.rng_key,
        plan=plan,
    )
    info = UpdateInfo(loss=loss, step_size=gamma, m_step=apply, nonfinite=~finite)
    return new_state, info


def log_likelihood(
    config: Config, sites: ModelSites, params: dict, args: tuple, kwargs: dict, shifts=None
) -> jax.Array:
    """Per-datum marginal log-likelihood $\\log p(x_i \\mid \\theta)$, shape (batch,)
    (Gaussian forms written about ``shifts``, see `data_shifts`)."""
    trace = enum_trace(config.model, sites, params, args, kwargs)
    return e_step(trace, sites, shifts).loglik


def marginals(
    config: Config, sites: ModelSites, params: dict, args: tuple, kwargs: dict, shifts=None
) -> dict:
    """Posterior marginals of every enumerated site, each of shape ``(batch, K)``."""
    trace = enum_trace(config.model, sites, params, args, kwargs)
    res = e_step(trace, sites, shifts)
    out = {}
    for name in sites.enumerated:
        w = res.weights[name]
        d2n = trace[name]["infer"]["dim_to_name"]
        name_to_axis = {n: w.ndim + d for d, n in d2n.items()}
        keep = (name_to_axis[sites.data_plate], name_to_axis[name])
        summed = tuple(i for i in range(w.ndim) if i not in keep)
        m = jnp.sum(w, axis=summed) if summed else w
        if keep[0] > keep[1]:
            m = m.T
        out[name] = m
    return out
