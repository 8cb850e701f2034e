"""What the plan knows of one local site: its family, its grid and its cells."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from numpyro_onlineem.families import Family, unwrap


class SitePlan(NamedTuple):
    """How one local site feeds the closed-form M step.

    Attributes
    ----------
    site : str
    family : Family
    data_axis : int
        Axis of the data plate in the site's grid (log-prob shape + reinterpreted dims).
    attrs : dict[str, str]
        Role -> distribution attribute it is read from.
    learned : dict[str, str]
        Role -> estimated site name, for the roles the M step updates.
    cell_ids : numpy.ndarray or None
        Cell of every grid position off the data axis (flattened); ``None`` when the
        cells are those positions in order.
    num_cells : int
    groups : dict[str, tuple]
        Role -> (cell -> parameter block index, number of blocks).
    block_maps : dict[str, numpy.ndarray]
        Role -> parameter block index at every grid position off the data axis.
    priors : dict[str, str | None]
        Role -> global site whose prior is conjugate to it (``None`` for ``param``).
    reparams : dict[str, str]
        Role -> name of the reparametrisation through which its site enters
        (``Family.reparams``), for the roles that are not used directly.
    pooled_shift : bool
        Whether some cell pools positions that read different elements of the data
        (a location shared across coordinates): the statistics' reference point is
        then one number for the whole site (see `numpyro_onlineem.core.data_shifts`).
    projections : dict[str, Projection]
        Role -> the projection that keeps its estimates inside the estimated site's
        constraint, for the roles that need one
        (`numpyro_onlineem.mstep.constraints`).
    component_points : float
        The data elements of one data point that one state of the enumerated latents
        describes (``D`` for a ``D``-dimensional Gaussian component): the default
        pseudo-points of the damped M step (`numpyro_onlineem.mstep.closed_form.damped`).
    """

    site: str
    family: Family
    data_axis: int
    attrs: dict
    learned: dict
    cell_ids: np.ndarray | None
    num_cells: int
    groups: dict
    block_maps: dict
    priors: dict
    reparams: dict
    pooled_shift: bool = False
    projections: dict = {}
    component_points: float = 1.0


def site_grid(site: dict) -> tuple[tuple, dist.Distribution]:
    """(grid shape, base distribution): the grid is the log-prob shape followed by the
    event dims that wrappers reinterpreted; every role broadcasts over it."""
    fn = site["fn"]
    base = unwrap(fn)
    extra = tuple(fn.event_shape)[: len(fn.event_shape) - len(base.event_shape)]
    return log_prob_shape(site) + extra, base


def log_prob_shape(site: dict) -> tuple:
    fn, value = site["fn"], site["value"]
    return tuple(
        jnp.broadcast_shapes(
            tuple(fn.batch_shape), jnp.shape(value)[: jnp.ndim(value) - fn.event_dim]
        )
    )
