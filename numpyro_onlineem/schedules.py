"""Step-size schedules for the stochastic approximation of sufficient statistics.

A schedule is an optax-style ``Callable[[t], step_size]``. Online EM evaluates it at
``t`` = the number of batches of the current batch size seen before an update, the
init batch included: with a constant batch size, ``t`` is the update's number (1 for
the first update after ``init``), and a single point after a 500-point init has
``t = 500``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax.typing import ArrayLike

Schedule = Callable[[ArrayLike], ArrayLike]


class RobbinsMonro(NamedTuple):
    r"""$\gamma_t = (t + t_0)^{-\kappa}$ (see `robbins_monro`); a value-hashable callable,
    so that two fits with the same settings share their compiled update."""

    kappa: float
    t0: float

    def __call__(self, count: ArrayLike) -> ArrayLike:
        return (jnp.asarray(count, jnp.float32) + self.t0) ** (-self.kappa)


class Constant(NamedTuple):
    r"""$\gamma_t = c$ (see `constant`); value-hashable."""

    step_size: float

    def __call__(self, count: ArrayLike) -> ArrayLike:
        return jnp.full((), self.step_size, jnp.float32)


def robbins_monro(kappa: float = 0.6, t0: float = 2.0) -> Schedule:
    r"""Robbins–Monro step sizes $\gamma_t = (t + t_0)^{-\kappa}$.

    With ``0.5 < kappa <= 1`` the steps satisfy $\sum \gamma_t = \infty$ and
    $\sum \gamma_t^2 < \infty$, the conditions of Cappé & Moulines (2009).

    Parameters
    ----------
    kappa : float
        Decay exponent in ``(0.5, 1]``. Small values forget the start quickly and
        are noisier; values near 1 average more (close to batch EM's running mean).
    t0 : float
        Offset, ``t0 >= 1`` so that the first step is at most 1.

    Examples
    --------
    >>> sched = robbins_monro(kappa=0.6, t0=2.0)
    >>> round(float(sched(0)), 4)
    0.6598
    """
    if not 0.5 < kappa <= 1.0:
        raise ValueError(f"robbins_monro: kappa must lie in (0.5, 1], got {kappa}.")
    if t0 < 1.0:
        raise ValueError(f"robbins_monro: t0 must be >= 1 so that steps are <= 1, got {t0}.")
    return RobbinsMonro(float(kappa), float(t0))


def constant(step_size: float) -> Schedule:
    r"""A constant step $\gamma_t = c$. With ``c = 1`` and the whole data set as
    every batch, online EM is exactly batch EM.

    Examples
    --------
    >>> float(constant(1.0)(10))
    1.0
    """
    if not 0.0 < step_size <= 1.0:
        raise ValueError(f"constant: step_size must lie in (0, 1], got {step_size}.")
    return Constant(float(step_size))


def as_schedule(value: float | Schedule) -> Schedule:
    """Accept a float (constant step) or a schedule, as optax does."""
    if callable(value):
        return value
    return constant(float(value))


# ------------------------------------------------------------------ defaults
DEFAULT_STEP_POINTS = 256.0
"""Points one step of the schedule stands for, unless the user sets ``step_points``."""

DEFAULT_POLYAK_WINDOWS = 5.0
"""Default start of the Polyak average, in ``step_points``: after the transient of the
first steps. On the benchmark's D=256, K=20 diagonal stream (one pass of 51,200 points
from a 1,024-point start), the statistics' average
(`numpyro_onlineem.core.average_statistics`) started after 5 windows ended one pass
0.017 nats/point short of the batch optimum (seed 0; 0.004 and 0.020 on seeds 1 and 2),
after 10 windows 0.020, right after the init 0.017. (The parameters' average: 0.025 after
5 windows, 0.031 after 20, 0.05 after 20,000 points on the stream of an earlier run.)"""


def default_kappa(stats_per_component: float) -> float:
    """Step-size exponent unless the user gives a schedule: ``0.6`` when a component has
    ``m <= 1000`` sufficient statistics, else ``1.0``. Statistics of many dimensions per
    component (full covariances) need a long averaging window: their M step is a
    nonlinear function of noisy statistics (a matrix inverse), and a short window leaves
    it biased."""
    return 0.6 if stats_per_component <= 1000 else 1.0


def default_polyak(kappa: float) -> bool:
    """Averaging is on with ``kappa < 1`` (it removes the iterates' noise) and off with
    ``kappa=1`` (the statistics are already a running mean)."""
    return kappa < 1.0


def default_polyak_start(step_points: float, burn_in: float) -> float:
    """Points before the Polyak average starts: `DEFAULT_POLYAK_WINDOWS` steps, and not
    before the burn-in ends."""
    return max(DEFAULT_POLYAK_WINDOWS * step_points, burn_in)


INIT_POINTS_PER_STATE = 50
"""Points per state of the enumerated site that `OnlineEM.run` gives `OnlineEM.init` by
default (see `default_init_points`)."""


def default_init_points(num_states: int, burn_in: float, step_points: float) -> int:
    """Points `OnlineEM.run` buffers for `OnlineEM.init` (its k-means++ start and first
    statistics) unless the user sets ``init_points``: the burn-in, at least
    ``step_points``, and at least `INIT_POINTS_PER_STATE` ``* K``.

    k-means++ can only seed a component from the points it is given: from ``B`` points a
    component of weight ``w`` is seen ``w B`` times. Measured on the streaming
    benchmark's D=256, K=20 diagonal stream, three seeds each, held-out nats/point after
    one pass: a start from 256 points (13 per component) ended in local optima 1.3 to
    4.4 below the best, one from 1,000 points (50 per component) within 1.4 of it, as
    close as scikit-learn's own fits (k-means on all the data, 0.7 to 2.4 below).
    """
    return int(max(burn_in, step_points, INIT_POINTS_PER_STATE * num_states))


def default_burn_in(num_states: int, full_dims: list) -> float:
    """Points before the first M step unless the user sets it: ``max(20, 10 K)``, ``K``
    the largest number of states of an enumerated site, and at least ``8 K D`` when a
    ``D``-dimensional full covariance is estimated (about eight points per dimension and
    component: by Marchenko–Pastur, the eigenvalues of a covariance from ``n = 8 D``
    points lie within ``(1 ± (D/n)^0.5)^2``, about 0.42–1.83 times the true ones; from
    ``2 D`` points the smallest shrink to 0.09 of theirs, the first M step is
    overconfident and one pass can settle in a worse optimum, measured 0.7 nats/point
    short at K=20, D=64)."""
    return float(max([20, 10 * num_states] + [8 * num_states * d for d in full_dims]))
