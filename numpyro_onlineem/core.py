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

import dataclasses
import functools
import operator
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro.distributions import constraints

from numpyro_onlineem.estep.enumerate import local_log_probs, num_data
from numpyro_onlineem.estep.logprob import align
from numpyro_onlineem.families import MStepOptions
from numpyro_onlineem.model import (
    ModelSites,
    all_indices,
    batch_indices,
    enum_trace,
    random_indices,
)
from numpyro_onlineem.mstep.base import EStepBatch, MStepContext
from numpyro_onlineem.mstep.constraints import base_constraint
from numpyro_onlineem.mstep.plan import Plan
from numpyro_onlineem.mstep.sites import site_grid
from numpyro_onlineem.schedules import Schedule, default_polyak_start, robbins_monro
from numpyro_onlineem.state import OnlineEMState, UpdateInfo
from numpyro_onlineem.static import freeze


@dataclasses.dataclass(frozen=True, eq=False)
class Config:
    """Static settings of the core (part of the compiled function), compared and hashed
    by value (`numpyro_onlineem.static.freeze`): a model given as an equal
    ``functools.partial`` again, or an equal schedule, finds the compiled update.

    Attributes
    ----------
    model : callable
    schedule : callable or None
        ``t -> step size`` per ``step_points`` points, after burn-in, evaluated at
        ``t`` = the points seen before the update (init batch included) divided by
        ``step_points``; see `step_size`. ``None``: Robbins–Monro with the plan's
        exponent (`Plan.default_kappa`).
    step_points : float
        The number of points a step of the schedule stands for.
    burn_in : float or None
        Points to see before the first M step; until then statistics are the exact
        running mean of everything seen. ``None``: `Plan.default_burn_in`.
    polyak : bool or None
        Polyak–Ruppert averaging (`average_statistics`, and the iterates of numerical
        M steps); ``None``: on with the default
        schedule when `Plan.default_polyak` says so, off with a user schedule.
    polyak_start : float or None
        Points to see before the average starts; ``None``: ``5 * step_points``, and
        not before the burn-in ends.
    damping : float or None
        Pseudo-points $\nu$ of the damped M step (`damped`); ``None``: the data
        dimension of each component with the default schedule, none with a user one.
    options : MStepOptions
    """

    model: Callable
    schedule: Schedule | None
    step_points: float
    burn_in: float | None
    polyak: bool | None
    polyak_start: float | None
    damping: float | None
    options: MStepOptions

    @functools.cached_property
    def _key(self) -> tuple:
        return freeze(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return isinstance(other, Config) and self._hash == other._hash and self._key == other._key


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
        value = align(trace[sp.site]["value"], len(grid) + fam.value_event_ndim)
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
        M step name -> its statistics of the batch (`MStep.statistics`).
    estep : EStepBatch
        The E step's result, for the M steps' updates.
    """

    loglik: jax.Array
    stats: dict
    estep: EStepBatch


def batch_statistics(
    config: Config,
    plan: Plan,
    params: dict,
    shifts: dict | None,
    args: tuple,
    kwargs: dict,
    indices=batch_indices,
    reread: Callable[[], tuple[tuple, dict]] | None = None,
) -> BatchStatistics:
    """E step on one batch, then every M step's statistics, about ``shifts`` (``None``:
    about this batch's own `data_shifts` and M-step references, as at ``init``), the
    data plate's subsample drawn by ``indices`` (see `numpyro_onlineem.model.enum_trace`).

    ``reread``: ``() -> (args, kwargs)``, the same batch read again where
    ``log_marginal`` needs it (`update`'s ``reread``)."""
    sites = plan.model_sites
    trace = enum_trace(config.model, sites, params, args, kwargs, indices)
    fresh = shifts is None
    if fresh:
        shifts = data_shifts(plan, trace)
    res = plan.estep(trace, sites, shifts)
    batch_size, total_size = num_data(trace, sites)
    weights = jax.lax.stop_gradient(res.weights)

    def trace_at(values: dict, a: tuple = args, k: dict = kwargs) -> OrderedDict:
        return enum_trace(config.model, sites, values, a, k, indices)

    def expected_log_joint(values: dict) -> tuple[jax.Array, dict]:
        tr = trace_at(values)
        log_probs, _ = local_log_probs(tr, sites)
        local = sum(jnp.sum(weights[n] * log_probs[n]) for n in sites.local)
        priors = {
            n: jnp.sum(tr[n]["fn"].log_prob(tr[n]["value"]))
            for n, ps in sites.params.items()
            if ps.kind == "global"
        }
        return local / batch_size, priors

    def log_marginal(values: dict) -> jax.Array:
        tr = trace_at(values) if reread is None else trace_at(values, *reread())
        return jnp.mean(plan.estep.log_likelihood(tr, sites, shifts))

    batch = EStepBatch(
        trace,
        res.weights,
        shifts,
        batch_size,
        total_size,
        params,
        expected_log_joint,
        trace_at,
        log_marginal,
    )
    if fresh:  # the fixed reference points of the M steps that take one (MStep.reference)
        refs = {m.name: m.reference(batch) for m in plan.msteps if hasattr(m, "reference")}
        batch = batch._replace(shifts={**shifts, **refs})
    stats = {m.name: m.statistics(batch) for m in plan.msteps}
    return BatchStatistics(res.loglik, stats, batch)


def m_step(
    config: Config,
    plan: Plan,
    params: dict,
    stats: dict,
    mstep_states: dict,
    batch: EStepBatch,
    effective_points: jax.Array | float = jnp.inf,
    step_size: jax.Array | float = 1.0,
    decay: jax.Array | float = 1.0,
) -> tuple[dict, dict]:
    """Every M step of the plan, in order, from the running statistics ``stats``
    (`MStep.update`): ``(params, mstep_states)``."""
    context = MStepContext(
        config, batch, jnp.asarray(effective_points), jnp.asarray(step_size), jnp.asarray(decay)
    )
    new_states = {}
    for m in plan.msteps:
        params, new_states[m.name] = m.update(stats[m.name], params, mstep_states[m.name], context)
    return params, new_states


def init_state(
    config: Config, plan: Plan, params: dict, rng_key: jax.Array, args: tuple, kwargs: dict
) -> OnlineEMState:
    """State whose statistics are those of the init batch under ``params``, about the
    init batch's mean (`data_shifts`)."""
    indices = batch_indices
    if plan.model_sites.reads_subsample:
        rng_key, key = jax.random.split(rng_key)
        indices = random_indices(key)
    batch = batch_statistics(config, plan, params, None, args, kwargs, indices)
    averaged_stats, _ = ravel_pytree(_averaged_part(plan, batch.stats))
    iterates = _iterate_averaged(plan, params)
    return OnlineEMState(
        params=params,
        stats=batch.stats,
        mstep_states={m.name: m.init(params) for m in plan.msteps},
        shifts=batch.estep.shifts,
        averaged=params,
        averaged_residual={n: jnp.zeros_like(params[n]) for n in iterates},
        averaged_stats=jnp.stack([averaged_stats, jnp.zeros_like(averaged_stats)]),
        averaged_points=jnp.zeros((), jnp.result_type(float)),
        polyak_from=jnp.asarray(-1.0, jnp.result_type(float)),
        polyak_check=jnp.zeros((3,), jnp.result_type(float)),
        count=jnp.zeros((), jnp.int32),
        num_seen=jnp.asarray(batch.estep.batch_size, jnp.result_type(float)),
        weight_sq=jnp.asarray(1.0 / batch.estep.batch_size, jnp.result_type(float)),
        rng_key=rng_key,
        plan=plan,
    )


def compensated_add(total: jax.Array, residual: jax.Array, increment: jax.Array):
    r"""``total + increment`` with Kahan's compensation: ``(new total, new residual)``.

    The Polyak average moves by ever smaller increments $w_n (\theta_n - \bar\theta)$;
    in float32 a location 10^4 from the origin has a resolution of 10^-3, and an
    increment below half of it would be lost each time, freezing the average at an
    early iterate. The residual keeps the low-order part that the rounding dropped and
    adds it back with the next increment, so the average accumulates them exactly.
    """
    y = increment - residual
    new = total + y
    return new, (new - total) - y


def _map_pairs(fn, totals, residuals, *others) -> tuple:
    """``fn(total, residual, *other) -> (total, residual)`` over the leaves of a running
    sum and its Kahan residuals: ``(totals, residuals)``, trees shaped like ``totals``."""
    if not jax.tree.leaves(totals):
        return totals, residuals
    pairs = jax.tree.map(fn, totals, residuals, *others)
    outer = jax.tree.structure(totals)
    return jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)


def _averages_stats(mstep) -> bool:
    """Whether an M step's Polyak average is its M step of the averaged statistics
    (`average_statistics`): one whose update is a function of its statistics alone."""
    return bool(getattr(mstep, "averages_statistics", False))


def _averaged_part(plan: Plan, stats: dict) -> dict:
    """The statistics of the M steps that average them (`_averages_stats`), keyed by M
    step: the tree whose leaves ``OnlineEMState.averaged_stats`` ravels
    (``jax.flatten_util.ravel_pytree``, in its leaf order)."""
    return {m.name: stats[m.name] for m in plan.msteps if _averages_stats(m)}


def _iterate_averaged(plan: Plan, params: dict) -> tuple:
    """The estimated sites whose Polyak average is the mean of their iterates (with
    Kahan's compensation, `compensated_add`): those of no M step that averages its
    statistics. The others' mean of iterates only bridges the short time before the
    M step of the averaged statistics takes over, and then anchors its damping."""
    from_stats = {n for m in plan.msteps if _averages_stats(m) for n in m.estimated}
    return tuple(n for n in params if n not in from_stats)


def average_statistics(
    state: OnlineEMState,
    batch: jax.Array,
    batch_size: int,
    begins: jax.Array,
    adds: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    r"""The Polyak average of the statistics: the running mean of the batches'
    statistics since the average began at $n_0$ points,

    $$
    \tilde s_n = \frac{\sum_{n_0 < k \le n} |B_k|\, \bar s(B_k; \theta_{k-1})}
    {\sum_{n_0 < k \le n} |B_k|}.
    $$

    The iterates $\theta_k$ move with the fast steps $\gamma_k$ (they forget the start),
    while $\tilde s$ weighs every point since the start alike, as batch EM does: the M
    step of $\tilde s$ is the average's estimate (`update` uses it once $\tilde s$ rests
    on more points than the running statistics $\hat s_n$, the iterates' average
    before). Averaging the parameters instead weighs a point by how long the iterates
    remember it, which underweights the last window of about $1/\gamma_n$ steps: one pass
    at D=256, K=20 ended 0.031 nats/point short of batch EM that way and 0.017 this way.
    ($\hat s_{n_0}$ is not taken in: it still holds the E steps of the first iterates,
    and a 3-dimensional mixture started with scales ten times too large ended 0.2
    nats/point short with it.)

    ``batch``: this batch's statistics of the averaging M steps, raveled as
    ``state.averaged_stats`` (``(S,)``); ``begins``: the average begins with this
    update; ``adds``: this batch joins it. Returns ``(averaged statistics and their
    Kahan residuals, (2, S); their points)``: one array, so that one fused loop updates
    both.
    """
    dtype = state.averaged_points.dtype
    joins = adds & ~begins
    points = jnp.where(begins, 0.0, state.averaged_points) + batch_size
    points = jnp.where(begins | joins, points, state.averaged_points).astype(dtype)
    weight = jnp.where(begins | joins, batch_size / points, 0.0)

    a, c = state.averaged_stats
    c = jnp.where(begins, 0.0, c).astype(c.dtype)
    # a skipped batch's statistics may be NaN: never multiplied in, even by 0
    step = weight.astype(a.dtype) * (jnp.where(weight > 0, batch, a) - a)
    return jnp.stack(compensated_add(a, c, step)), points


CHECK_EVERY = 16
"""Updates between two comparisons of the Polyak average with the iterate
(`check_average`): one more evaluation of a batch's log-likelihood each."""

MIN_CHECKS = 4
"""Checks before the first verdict (then at twice as many, and so on)."""

CHECK_Z = 3.0
"""How many standard errors the average's mean excess loss must exceed for a restart."""


def check_average(
    state: OnlineEMState, batch: EStepBatch, loss: jax.Array, finite: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Whether the Polyak average has fallen behind the iterate, on fresh data.

    Every `CHECK_EVERY` updates, on the batch not yet seen by either, the excess loss of
    the average over the iterate, $d = -\ell(\bar\theta) + \ell(\theta)$ (mean
    per point, clipped to 10 nats), joins running sums since the average began. When
    their count reaches `MIN_CHECKS` = 4, then 8, 16, ... and the mean of $d$ exceeds
    `CHECK_Z` standard errors, the average is stale: it still holds the iterates' (or,
    for the statistics' average, the E steps') transient, which only fades like
    $n_0 / n$, and it begins again. On a 3-component mixture whose components
    separated only after 10,000 points, the average without this check ended 0.12
    nats/point short where the iterate was 0.0006 short.

    Returns the updated sums ``(count, sum d, sum d^2)`` and the verdict.
    """
    dtype = state.polyak_check.dtype
    looking = (state.polyak_from >= 0) & finite & (state.count % CHECK_EVERY == 0)

    def excess():
        d = -batch.log_marginal(state.averaged) - loss
        return jnp.clip(jnp.where(jnp.isnan(d), 10.0, d), -10.0, 10.0).astype(dtype)

    d = jax.lax.cond(looking, excess, lambda: jnp.zeros((), dtype))
    check = state.polyak_check + jnp.where(looking, jnp.stack([1.0, d, d * d]), 0.0).astype(dtype)
    return check, looking & stale_average(check)


def stale_average(check: jax.Array) -> jax.Array:
    r"""The verdict of `check_average` on its sums ``(count n, sum d, sum d^2)``, shape
    (3,): whether the mean of $d$ exceeds `CHECK_Z` standard errors, decided when $n$ is
    `MIN_CHECKS` = 4, 8, 16, ... only (few looks, few false alarms; a paired difference
    on the same batch has little noise where the average lags). Bool, shape ()."""
    n = check[0]
    mean = check[1] / jnp.maximum(n, 1.0)
    var = jnp.maximum(check[2] / jnp.maximum(n, 1.0) - mean**2, 0.0)
    power = (n >= MIN_CHECKS) & (jnp.exp2(jnp.round(jnp.log2(jnp.maximum(n, 1.0)))) == n)
    return power & (mean > CHECK_Z * jnp.sqrt(var / jnp.maximum(n, 1.0)))


def batch_step(
    schedule: Schedule, num_seen: jax.Array, batch_size: float, step_points: float
) -> jax.Array:
    r"""The step of a batch of $B$ points when the schedule gives the step $\gamma(t)$
    per $P$ = ``step_points`` points, $t = n_{\text{seen}} / P$:

    $$
    \gamma_B = 1 - (1 - \gamma(t))^{B / P}.
    $$

    $P/B$ batches of $B$ points ($P$ single points, say) retain the old statistics by
    the same factor $1 - \gamma(t)$ as one batch of $P$ points, so a stream gives the
    same statistics however it is cut into batches (up to the variation of $\gamma$
    within a window, and the M steps in between). ``num_seen``: points seen before the
    batch; returns a float32 scalar, 1 when $\gamma(t) = 1$.
    """
    g = jnp.clip(jnp.asarray(schedule(num_seen / step_points), jnp.float32), 0.0, 1.0)
    return -jnp.expm1((batch_size / step_points) * jnp.log1p(-g))


def update(
    config: Config,
    state: OnlineEMState,
    args: tuple,
    kwargs: dict,
    reread: Callable[[], tuple[tuple, dict]] | None = None,
) -> tuple[OnlineEMState, UpdateInfo]:
    """One online EM update on the batch given by the model's ``args``/``kwargs``.

    Pure and jittable; the state's size is independent of how much data was seen.
    ``reread``: ``() -> (args, kwargs)``, the same batch, for the check of the Polyak
    average (`check_average`), which runs in a branch every `CHECK_EVERY` updates. A
    loop over stacked batches passes its indexing of the stack, so that the branch
    reads the stack in place: a copy of the batch as the branch's operand cost
    about a tenth of an update at D=256 (``None``: ``args``, ``kwargs``).
    """
    plan = state.plan
    rng_key, indices = state.rng_key, batch_indices
    if plan.model_sites.reads_subsample:  # the model draws its batch from the data given
        rng_key, key = jax.random.split(rng_key)
        indices = random_indices(key)
    res = batch_statistics(config, plan, state.params, state.shifts, args, kwargs, indices, reread)
    batch, batch_size = res.stats, res.estep.batch_size
    loss = -jnp.mean(res.loglik)
    dtype = state.num_seen.dtype
    seen = state.num_seen + batch_size
    burn_in = plan.default_burn_in if config.burn_in is None else config.burn_in
    in_burn_in = seen <= burn_in
    schedule = config.schedule or robbins_monro(plan.default_kappa)
    step = batch_step(schedule, state.num_seen, batch_size, config.step_points).astype(dtype)
    gamma = jnp.minimum(jnp.where(in_burn_in, batch_size / seen, step), 1.0).astype(dtype)
    # a finite loss means finite data, log-densities and posterior weights, hence
    # finite batch statistics; data outside a site's support (a fractional count) can
    # have a finite loss and are caught apart. Otherwise the update is skipped: the
    # guard is folded into the elementwise updates (no branch, no extra pass over the
    # state).
    in_support = observed_in_support(res.estep.trace, plan.model_sites)
    finite = jnp.isfinite(loss) & in_support
    gamma = jnp.where(finite, gamma, 0.0)
    stats = jax.tree.map(
        lambda s, b: s + gamma.astype(s.dtype) * (jnp.where(finite, b, s) - s), state.stats, batch
    )
    # every point of this batch weighs gamma / B in the new statistics
    weight_sq = (1.0 - gamma) ** 2 * state.weight_sq + gamma**2 / batch_size
    first = jnp.asarray(schedule(0.0), dtype)
    decay = jnp.where(
        first > 0, jnp.asarray(schedule(state.num_seen / config.step_points), dtype) / first, 1.0
    )
    proposed, mstep_states = m_step(
        config,
        plan,
        state.params,
        stats,
        state.mstep_states,
        res.estep,
        1.0 / weight_sq,
        gamma,
        decay,
    )
    apply = finite & ~in_burn_in
    keep = lambda new, old: jnp.where(apply, new, old)
    params = jax.tree.map(keep, proposed, state.params)
    mstep_states = jax.tree.map(keep, mstep_states, state.mstep_states)

    polyak = config.polyak
    if polyak is None:
        polyak = config.schedule is None and plan.default_polyak
    if polyak:
        # Polyak-Ruppert mean of the iterates, each weighted by its batch's points
        start = config.polyak_start
        if start is None:
            start = default_polyak_start(config.step_points, burn_in)
        settled = functools.reduce(operator.and_, settled_flags(plan, mstep_states).values(), True)
        check, stale = check_average(state, res.estep, loss, finite)
        # the average begins (again, when it has fallen behind the iterate: `check_average`)
        begins = ((state.polyak_from < 0) | stale) & (seen > start) & settled & apply
        check = jnp.where(begins, 0.0, check)
        # from the start itself when the M steps are settled by then (the first
        # update past it may straddle it), else from this update on
        opening = jnp.maximum(state.num_seen, jnp.asarray(start, dtype))
        polyak_from = jnp.where(begins, opening, state.polyak_from).astype(dtype)
        weight = jnp.where(
            (polyak_from >= 0) & (seen > polyak_from),
            batch_size / jnp.maximum(seen - polyak_from, 1.0),
            1.0,
        )
        weight = jnp.minimum(weight, 1.0)

        def average(a, c, p):
            new = compensated_add(a, c, weight.astype(p.dtype) * (p - a))
            # a skipped batch leaves the average (and its residual) as they were
            return tuple(jnp.where(finite, n, o) for n, o in zip(new, (a, c), strict=True))

        # the sites averaged through their statistics move plainly until the M step of
        # the averaged statistics takes over (`_iterate_averaged`)
        averaged = {
            n: jnp.where(finite, a + weight.astype(a.dtype) * (params[n] - a), a)
            for n, a in state.averaged.items()
            if n not in state.averaged_residual
        }
        compensated, residual = _map_pairs(
            average,
            {n: state.averaged[n] for n in state.averaged_residual},
            state.averaged_residual,
            {n: params[n] for n in state.averaged_residual},
        )
        averaged.update(compensated)
        part = _averaged_part(plan, batch)
        flat, unravel = ravel_pytree(part)
        averaged_stats, averaged_points = average_statistics(
            state, flat, batch_size, begins, finite & (polyak_from >= 0)
        )
        # the M steps of the statistics' average (of those that are functions of their
        # statistics alone), once it rests on more points than the running statistics
        ended = (polyak_from >= 0) & finite & (averaged_points * weight_sq >= 1.0)
        context = MStepContext(
            config, res.estep, averaged_points, jnp.asarray(gamma), jnp.asarray(decay)
        )
        from_stats, mean = averaged, unravel(averaged_stats[0])
        for m in plan.msteps:
            if m.name in part:
                from_stats, _ = m.update(mean[m.name], from_stats, mstep_states[m.name], context)
        averaged = jax.tree.map(lambda a, b: jnp.where(ended, a, b), from_stats, averaged)
        # a value outside a non-convex constraint is no estimate: those are not averaged
        averaged = {**averaged, **{n: params[n] for n in plan.unaveraged}}
    else:
        averaged, residual = params, state.averaged_residual
        polyak_from = state.polyak_from
        averaged_stats = state.averaged_stats
        averaged_points = state.averaged_points
        check = state.polyak_check
    new_state = OnlineEMState(
        params=params,
        stats=stats,
        mstep_states=mstep_states,
        shifts=state.shifts,
        averaged=averaged,
        averaged_residual=residual,
        averaged_stats=averaged_stats,
        averaged_points=averaged_points,
        polyak_from=polyak_from,
        polyak_check=check,
        count=state.count + finite.astype(state.count.dtype),
        num_seen=jnp.where(finite, seen, state.num_seen),
        weight_sq=weight_sq,
        rng_key=rng_key,
        plan=plan,
    )
    info = UpdateInfo(
        loss=loss,
        step_size=gamma,
        m_step=apply,
        nonfinite=~jnp.isfinite(loss),
        out_of_support=~in_support,
        num_points=jnp.asarray(batch_size, dtype),
    )
    return new_state, info


def settled_flags(plan: Plan, mstep_states: dict) -> dict:
    """``{M step name: settled}`` (bool arrays, shape ()) of the M steps that report
    whether their iterates have left their transient (`MStep.settled`, the numerical
    Newton steps'); the Polyak average waits for all of them."""
    return {m.name: m.settled(mstep_states[m.name]) for m in plan.msteps if hasattr(m, "settled")}


def observed_in_support(trace, sites: ModelSites) -> jax.Array:
    """Whether every observed value lies in its site's support (bool, shape ()).

    Real-valued supports are left to the finite-loss guard of `update` (a value in
    them is any finite number, and a non-finite one makes the loss non-finite): a pass
    over every element of the batch saved at every update."""
    ok = jnp.asarray(True)
    for name in sites.observed:
        site = trace[name]
        support = site["fn"].support
        if base_constraint(support) in (constraints.real, constraints.real_vector):
            continue
        ok = ok & jnp.all(support(site["value"]))
    return ok


def _whole_data(sites: ModelSites):
    return all_indices if sites.reads_subsample else batch_indices


def log_likelihood(
    config: Config, plan: Plan, params: dict, args: tuple, kwargs: dict, shifts=None
) -> jax.Array:
    """Per-datum marginal log-likelihood $\\log p(x_i \\mid \\theta)$, shape (batch,)
    (Gaussian forms written about ``shifts``, see `data_shifts`); every point of a
    model that reads its data through the data plate's subsample."""
    sites = plan.model_sites
    trace = enum_trace(config.model, sites, params, args, kwargs, _whole_data(sites))
    return plan.estep(trace, sites, shifts).loglik


def marginals(
    config: Config, plan: Plan, params: dict, args: tuple, kwargs: dict, shifts=None
) -> dict:
    """Posterior marginals of every enumerated site, each of shape ``(batch, K)``."""
    sites = plan.model_sites
    trace = enum_trace(config.model, sites, params, args, kwargs, _whole_data(sites))
    res = plan.estep(trace, sites, shifts)
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
