r"""Keeping every estimate inside its site's support.

A closed-form M step returns values in the family's natural support for the role
(`Family.role_support`): any real location, a positive scale, a probability vector. A
site may declare a narrower constraint (``numpyro.param(..., constraint=...)``, or the
support of a global site's prior). At ``init`` each estimated role gets one of:

* nothing, when the natural support lies inside the declared one (`implies`);
* an exact projection (`Projection`), when the constrained maximiser of the M step's
  objective is known in closed form:

  - an interval-type bound (``positive``, ``greater_than``, ``less_than``,
    ``interval``, ...) on a role of scalar blocks: the objective is unimodal in each
    block, so clipping the unconstrained maximiser is the constrained maximiser;
  - ``ordered_vector`` (or ``positive_ordered_vector``) on a ``Normal`` location: the
    objective is a separable quadratic $-\tfrac12 \sum_k b_k (\mu_k - m_k)^2$, and its
    maximiser over ordered vectors is the weighted isotonic regression of $m$ with
    weights $b$ (pool-adjacent-violators), clipped to a positive bound where there is
    one;

* otherwise an `UnsupportedModelError` naming the site and the constraint.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints


class Interval(NamedTuple):
    """A scalar constraint as bounds: ``lo < x < hi`` (or ``<=`` where closed)."""

    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    def contains(self, other: Interval) -> bool:
        lo_ok = other.lo > self.lo or (
            other.lo == self.lo and (self.lo_closed or not other.lo_closed)
        )
        hi_ok = other.hi < self.hi or (
            other.hi == self.hi and (self.hi_closed or not other.hi_closed)
        )
        return lo_ok and hi_ok


def base_constraint(c: constraints.Constraint) -> constraints.Constraint:
    """Strip ``independent`` wrappers: the constraint of one element."""
    while isinstance(c, constraints._IndependentConstraint):
        c = c.base_constraint
    return c


def as_interval(c: constraints.Constraint) -> Interval | None:
    """The bounds of a scalar constraint, or ``None`` for any other constraint."""
    c = base_constraint(c)
    inf = math.inf
    if isinstance(c, constraints._Real):
        return Interval(-inf, inf, False, False)
    if isinstance(c, constraints._GreaterThanEq):
        return Interval(float(c.lower_bound), inf, True, False)
    if isinstance(c, constraints._GreaterThan):
        return Interval(float(c.lower_bound), inf, False, False)
    if isinstance(c, constraints._LessThanEq):
        return Interval(-inf, float(c.upper_bound), False, True)
    if isinstance(c, constraints._LessThan):
        return Interval(-inf, float(c.upper_bound), False, False)
    if isinstance(c, constraints._OpenInterval):
        return Interval(float(c.lower_bound), float(c.upper_bound), False, False)
    if isinstance(c, constraints._Interval):
        return Interval(float(c.lower_bound), float(c.upper_bound), True, True)
    return None


def implies(natural: constraints.Constraint, declared: constraints.Constraint) -> bool:
    """Whether every value in ``natural`` satisfies ``declared``."""
    a, b = as_interval(natural), as_interval(declared)
    if b is not None and b.lo == -math.inf and b.hi == math.inf:
        return True  # real, real_vector, real_matrix
    if a is not None and b is not None:
        return b.contains(a)
    n, d = base_constraint(natural), base_constraint(declared)
    if type(n) is type(d) and isinstance(n, constraints._SingletonConstraint):
        return True
    return isinstance(n, constraints._PositiveDefinite) and isinstance(
        d, constraints._PositiveSemiDefinite
    )


class Projection(NamedTuple):
    """An exact projection of M-step proposals onto a declared constraint (static).

    Attributes
    ----------
    bounds : Interval or None
        Clip to these bounds (open bounds by the next representable value inside).
    ordered : bool
        Weighted isotonic regression along the last axis first.
    """

    bounds: Interval | None
    ordered: bool

    def __call__(self, value: jax.Array, weights: jax.Array | None) -> jax.Array:
        r"""Project ``value`` (the site's shape; ordered along its last axis), with
        ``weights`` $b \ge 0$ of the same shape: the curvature of a separable quadratic
        objective (``None``: equal weights)."""
        if self.ordered:
            w = jnp.ones_like(value) if weights is None else weights
            value = isotonic_regression(value, w)
        if self.bounds is not None:
            lo, hi, lo_closed, hi_closed = self.bounds
            dtype = value.dtype
            if lo > -math.inf:
                lo = lo if lo_closed else float(np.nextafter(np.asarray(lo, dtype), np.inf))
                value = jnp.maximum(value, jnp.asarray(lo, dtype))
            if hi < math.inf:
                hi = hi if hi_closed else float(np.nextafter(np.asarray(hi, dtype), -np.inf))
                value = jnp.minimum(value, jnp.asarray(hi, dtype))
        return value


def isotonic_regression(y: jax.Array, w: jax.Array) -> jax.Array:
    r"""Weighted isotonic (non-decreasing) regression along the last axis:
    $\arg\min_{\mu_1 \le \dots \le \mu_n} \sum_i w_i (\mu_i - y_i)^2$, by the min-max
    formula $\hat\mu_i = \max_{j \le i} \min_{k \ge i} \bar y_{j..k}$ with
    $\bar y_{j..k}$ the weighted mean of $y_j, \dots, y_k$.

    $O(n^2)$ per vector, for the short vectors of component parameters. Blocks of zero
    weight take the value of the blocks they are pooled with.

    Parameters
    ----------
    y, w : Array, shape (..., n)

    Returns
    -------
    Array, shape (..., n)
    """
    n = y.shape[-1]
    # a tiny floor so that pools of empty blocks have a defined mean
    w = jnp.maximum(w, jnp.finfo(y.dtype).tiny * 1e6)
    zero = jnp.zeros(y.shape[:-1] + (1,), y.dtype)
    cy = jnp.concatenate([zero, jnp.cumsum(w * y, -1)], -1)
    cw = jnp.concatenate([zero, jnp.cumsum(w, -1)], -1)
    # mean[j, k] of the blocks j..k (j <= k), shape (..., n, n)
    mean = (cy[..., None, 1:] - cy[..., :-1, None]) / (cw[..., None, 1:] - cw[..., :-1, None])
    j = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    mean = jnp.where(j <= k, mean, jnp.inf)
    # lowest[j, i] = min over k >= i of mean[j, k]: a reversed running minimum
    lowest = jax.lax.cummin(mean, axis=mean.ndim - 1, reverse=True)
    return jnp.max(jnp.where(j <= k, lowest, -jnp.inf), axis=-2)


def plan_projection(
    site: str,
    declared: constraints.Constraint,
    natural: constraints.Constraint,
    quadratic: bool,
    scalar_blocks: bool,
    direct: bool,
) -> Projection | None:
    """The projection that keeps a role's closed-form estimates in the site's support,
    ``None`` when none is needed.

    Parameters
    ----------
    site : str
        Estimated site name, for the message.
    declared, natural : Constraint
        The site's constraint, and the support of the family's M step for the role.
    quadratic : bool
        Whether the role's M-step objective is a separable quadratic (a ``Normal``
        location), so that isotonic regression is its ordered maximiser.
    scalar_blocks : bool
        Whether every parameter block of the role is one scalar.
    direct : bool
        Whether the site enters directly (not through a reparametrisation).

    Raises
    ------
    UnsupportedModelError
    """
    from numpyro_onlineem.mstep.plan import UnsupportedModelError

    if implies(natural, declared):
        return None
    base = base_constraint(declared)
    bounds = as_interval(declared)
    if direct and scalar_blocks and bounds is not None:
        return Projection(bounds, ordered=False)
    if direct and quadratic and isinstance(base, constraints._OrderedVector):
        return Projection(None, ordered=True)
    if direct and quadratic and isinstance(base, constraints._PositiveOrderedVector):
        return Projection(Interval(0.0, math.inf, False, False), ordered=True)
    raise UnsupportedModelError(
        f"OnlineEM: site '{site}' is constrained to {declared}, which the closed-form M "
        f"step (values in {natural}) cannot keep: no exact projection is known for this "
        "use. Declare the constraint the family's parameter has, or hold the site with "
        f"OnlineEM(mstep={{'{site}': 'fixed'}}); a numerical M step in unconstrained "
        "space is planned."
    )
