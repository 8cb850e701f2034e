r"""The closed-form M step of one exponential-family site (`numpyro_onlineem.families`).

``statistics``: the expected sufficient statistics of the batch per datum, summed into
the site's cells (`numpyro_onlineem.mstep.plan.SitePlan`), about the Gaussian sites'
reference points. ``update``: the family's closed-form maximiser of the expected
complete-data log-likelihood (plus the log-prior of global sites) given the running
statistics, damped toward the current value (`damped`) and projected onto each
estimated site's constraint.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_onlineem.estep.logprob import align
from numpyro_onlineem.families import PRIOR_HYPERPARAMETERS, MStepInputs, segment_sum, unwrap
from numpyro_onlineem.mstep.base import EStepBatch, MStepContext
from numpyro_onlineem.mstep.sites import SitePlan, site_grid


class ClosedForm(NamedTuple):
    """The closed-form M step of the estimated sites one local site reads.

    Attributes
    ----------
    site : SitePlan
    shapes : dict[str, tuple]
        Role -> shape of the estimated site it learns.
    """

    site: SitePlan
    shapes: dict
    averages_statistics = True  # its update reads its statistics alone

    @property
    def name(self) -> str:
        return self.site.site

    @property
    def estimated(self) -> tuple:
        return tuple(self.site.learned.values())

    def init(self, params: dict) -> tuple:
        return ()

    def statistics(self, batch: EStepBatch) -> dict:
        """Site statistic -> ``(num_cells, ...)``: the batch mean of the expected
        sufficient statistics, about ``batch.shifts``."""
        sp = self.site
        site = batch.trace[sp.site]
        grid, base = site_grid(site)
        fam = sp.family
        nd = len(grid)
        w = batch.weights[sp.site]
        w = w.reshape(w.shape + (1,) * (nd - w.ndim))
        value = align(site["value"], nd + fam.value_event_ndim)
        if sp.site in batch.shifts:
            # the point the E step's Gaussian forms are centred on, too
            value = value.astype(jnp.result_type(float)) - batch.shifts[sp.site]
        consts = {}
        for role, (_, arr) in fam.roles(base).items():
            if role not in sp.learned:
                consts[role] = align(arr, nd + fam.role_event_ndim[role])
        moved = [jnp.moveaxis(a, sp.data_axis, 0) for a in (w, value)]
        consts = {k: jnp.moveaxis(v, sp.data_axis, 0) for k, v in consts.items()}
        raw = fam.suff_stats(moved[1], moved[0], consts, base)
        return {
            k: _to_cells(v, sp, grid, v.shape[nd - 1 :]) / batch.batch_size for k, v in raw.items()
        }

    def update(
        self, stats: dict, params: dict, mstep_state: Any, context: MStepContext
    ) -> tuple[dict, Any]:
        """The family's M step from the running statistics, damped by the
        ``context.effective_points`` behind them."""
        sp, config, batch = self.site, context.config, context.batch
        fam = sp.family
        shift = None
        if sp.site in batch.shifts:
            grid, _ = site_grid(batch.trace[sp.site])
            shift = _cell_shift(batch.shifts[sp.site], sp, grid, fam.value_event_ndim)
        maps = {role: fam.reparams[role][name] for role, name in sp.reparams.items()}
        current, priors = {}, {}
        for role, pname in sp.learned.items():
            shape = self.shapes[role]
            ev = fam.role_event_ndim[role]
            event = tuple(shape[len(shape) - ev :]) if ev else ()
            value = params[pname]
            if role in maps:
                value = maps[role].forward(value)
            current[role] = value.reshape((-1,) + event)
            prior_site = sp.priors.get(role)
            if prior_site is not None:
                priors[role] = _prior_blocks(batch.trace[prior_site]["fn"], shape, event)
        nu = config.damping
        if nu is None:
            nu = sp.component_points if config.schedule is None else 0.0
        # block counts are N-scaled per-point averages: m = count / N * effective points
        scale = context.effective_points / batch.total_size
        finish = {
            role: _finisher(sp.projections.get(role), self.shapes[role], current[role], scale, nu)
            for role in sp.learned
        }
        inputs = MStepInputs(
            groups=dict(sp.groups),  # static (NumPy) maps: identities are free
            current=current,
            priors=priors,
            num_data=batch.total_size,
            options=config.options,
            attrs=dict(sp.attrs),
            reparams=dict(sp.reparams),
            shift=shift,
            finish=finish,
        )
        new = dict(params)
        for role, value in fam.m_step(stats, inputs).items():
            pname = sp.learned[role]
            if role in maps:
                value = maps[role].inverse(value)
            new[pname] = value.reshape(params[pname].shape).astype(params[pname].dtype)
        return new, mstep_state


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


def damped(proposal: jax.Array, current: jax.Array, points: jax.Array, nu: float) -> jax.Array:
    r"""The damped M step of a parameter block whose statistics rest on ``points``
    effective points:

    $$
    \theta \leftarrow \theta + \frac{m}{m + \nu} (\bar\theta(\hat s) - \theta).
    $$

    The maximiser of the M step's objective plus a proximal term that holds $\theta$ with
    the weight of $\nu$ points: a block seen through a handful of points (a small
    component early in a stream of high-dimensional data) moves a little, one seen
    through many moves all the way. A fixed point of EM is one of the damped step, and
    a step toward the maximiser along the segment still increases the objective (it is
    concave or unimodal along it in every registered family), so the damped step is a
    generalized EM step. The constraints of every family are convex, so the damped value
    keeps them. ``points``: ``(num_blocks,)``, ``inf`` under a prior (no damping).
    """
    if nu <= 0:
        return proposal
    rho = jnp.where(jnp.isinf(points), 1.0, points / (points + nu))
    rho = rho.reshape(rho.shape + (1,) * (proposal.ndim - rho.ndim)).astype(proposal.dtype)
    return current + rho * (proposal - current)


def _finisher(projection, shape: tuple, current: jax.Array, scale: jax.Array, nu: float):
    """The ``finish`` hook of one role (`Family.m_step`): the damped step toward the
    proposal (``count * scale`` effective points per block), then the `Projection` of
    the site's values, applied to parameter blocks ``(num_blocks, *role_event)`` with
    per-block weights ``(num_blocks,)``."""

    def apply(blocks, count, weights):
        blocks = damped(blocks, current, count * scale, nu)
        if projection is None:
            return blocks
        if weights is not None:
            extra = (1,) * (blocks.ndim - weights.ndim)
            weights = jnp.broadcast_to(weights.reshape(weights.shape + extra), blocks.shape)
            weights = weights.reshape(shape)
        return projection(blocks.reshape(shape), weights).reshape(blocks.shape)

    return apply
