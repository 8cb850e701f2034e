"""Step-size schedules for the stochastic approximation of sufficient statistics.

A schedule is an optax-style ``Callable[[t], step_size]``. Online EM evaluates it at
``t`` = the number of batches of the current batch size seen before an update, the
init batch included: with a constant batch size, ``t`` is the update's number (1 for
the first update after ``init``), and a single point after a 500-point init has
``t = 500``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax.typing import ArrayLike

Schedule = Callable[[ArrayLike], ArrayLike]


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

    def schedule(count: ArrayLike) -> ArrayLike:
        return (jnp.asarray(count, jnp.float32) + t0) ** (-kappa)

    return schedule


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

    def schedule(count: ArrayLike) -> ArrayLike:
        return jnp.full((), step_size, jnp.float32)

    return schedule


def as_schedule(value: float | Schedule) -> Schedule:
    """Accept a float (constant step) or a schedule, as optax does."""
    if callable(value):
        return value
    return constant(float(value))
