"""Online EM for Gaussian mixtures written by hand in plain JAX: OnlineEM's twin.

The same recursion as ``OnlineEM`` on the benchmarks' mixtures (`tests.models`), with
nothing derived from a model: responsibilities by logsumexp over matrix-product
log-densities, running sufficient statistics with the same Robbins-Monro steps, burn-in
and Polyak averaging (with the same check of the average against the iterate, every
``CHECK_EVERY`` updates, that restarts a stale one), and the closed-form M step. It is
the throughput OnlineEM can aim for ("our limit"). `jax_update` is one step,
`jax_scan` fuses many in one ``lax.scan``; nothing here jits for you.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_onlineem.core import CHECK_EVERY, stale_average
from numpyro_onlineem.schedules import DEFAULT_POLYAK_WINDOWS

T0 = 2.0  # offset of the Robbins-Monro steps (OnlineEM's default)
REG_COVAR = 1e-6  # OnlineEM's and sklearn's default
MIN_COUNT = 1e-6  # OnlineEM's default


class JaxEMState(NamedTuple):
    """State of the hand-written online EM (the same recursion as OnlineEM).

    Attributes
    ----------
    params : dict
        ``weights (K,)``, ``locs (K, D)``, ``scales (K, D)`` or ``covs (K, D, D)``.
    averaged : dict
        Polyak average: the M step of ``averaged_stats`` once averaging has begun
        (equal to ``params`` before, and when averaging is off).
    stats : tuple
        Running per-point statistics ``n (K,)``, ``s1 (K, D)``, ``s2 (K, D)`` or
        ``(K, D, D)``.
    averaged_stats : tuple
        Running mean of the batches' statistics since the average began (as
        OnlineEM's ``averaged_stats``).
    averaged_points : Array, float32
        Effective points behind ``averaged_stats``.
    seen : Array, float32
        Points seen (the init batch included).
    weight_sq : Array, float32
        Sum of the squared weights of the points in the running statistics (1 / the
        effective number of points behind them).
    polyak_from : Array, float32
        Points seen when the average last began (-1 before).
    check : Array, float32, shape (3,)
        Count, sum and sum of squares of the average's excess loss over the iterate at
        the checks since it began (OnlineEM's ``polyak_check``).
    count : Array, int32
        Updates applied.
    """

    params: dict
    averaged: dict
    stats: tuple
    averaged_stats: tuple
    averaged_points: jax.Array
    seen: jax.Array
    weight_sq: jax.Array
    polyak_from: jax.Array
    check: jax.Array
    count: jax.Array


class JaxEMConfig(NamedTuple):
    """Settings of the hand-written online EM: step exponent, burn-in (points), the
    point from which the Polyak average starts (``None``: no averaging), the points one
    step stands for, and the pseudo-points of the damped M step (0: plain)."""

    kappa: float
    burn_in: float
    polyak_start: float | None
    step_points: float = 256.0
    damping: float = 0.0


def config_from_plan(plan, kappa=None):
    """The settings that replicate ``OnlineEM``'s for ``plan`` (``state.plan`` of a
    mixture's fit with the default ``step_points``): its default step exponent, burn-in,
    Polyak averaging and damping (``kappa=None``), or plain ``robbins_monro(kappa, T0)``
    steps without averaging or damping."""
    polyak = kappa is None and plan.default_polyak
    obs = next(sp for sp in plan.sites if sp.site == "obs")
    return JaxEMConfig(
        plan.default_kappa if kappa is None else kappa,
        plan.default_burn_in,
        max(DEFAULT_POLYAK_WINDOWS * 256.0, plan.default_burn_in) if polyak else None,
        step_points=256.0,
        damping=obs.component_points if kappa is None else 0.0,
    )


def _component_logpdf(params, x):
    """``log N(x_b | mu_k, Sigma_k)``, shape (B, K), by matrix products."""
    locs = params["locs"]
    d = x.shape[-1]
    if "scales" in params:
        prec = params["scales"] ** -2
        maha = (x * x) @ prec.T - 2.0 * x @ (locs * prec).T + jnp.sum(locs**2 * prec, 1)
        half_logdet = -0.5 * jnp.sum(jnp.log(prec), 1)
    else:
        chol = jnp.linalg.cholesky(params["covs"])
        eye = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype), chol.shape)
        prec_chol = jnp.swapaxes(jax.scipy.linalg.solve_triangular(chol, eye, lower=True), 1, 2)
        y = (
            jnp.einsum("bd,kde->kbe", x, prec_chol)
            - jnp.einsum("kd,kde->ke", locs, prec_chol)[:, None]
        )
        maha = jnp.sum(y * y, -1).T
        half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)), 1)
    return -half_logdet - 0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * maha


def jax_e_step(params, x):
    """Per-point log-likelihood (B,) and the batch means of the expected statistics."""
    logp = jnp.log(params["weights"]) + _component_logpdf(params, x)
    loglik = jax.nn.logsumexp(logp, 1)
    resp = jnp.exp(logp - loglik[:, None])
    b = x.shape[0]
    s1 = resp.T @ x / b
    if "scales" in params:
        s2 = resp.T @ (x * x) / b
    else:
        s2 = jnp.einsum("bk,bd,be->kde", resp, x, x) / b
    return loglik, (resp.mean(0), s1, s2)


def jax_m_step(params, stats, batch_size, points=jnp.inf, damping=0.0):
    """Closed-form M step from per-point statistics. As in OnlineEM, a component whose
    expected count (statistics times the batch size) is below ``MIN_COUNT`` keeps its
    values, and so does a covariance that is not positive definite; with ``damping``
    > 0, each component moves toward its estimate by ``m / (m + damping)``, ``m`` its
    share of the ``points`` effective points (the location first, then the scale or
    covariance about the damped location)."""
    n, s1, s2 = stats
    keep = n * batch_size > MIN_COUNT
    safe_n = jnp.where(keep, n, 1.0)
    m = n * points
    rho = m / (m + damping) if damping > 0 else jnp.ones_like(n)

    def finish(name, value):
        mask = keep.reshape((-1,) + (1,) * (value.ndim - 1))
        value = jnp.where(mask, value, params[name])
        r = rho.reshape(mask.shape)
        return params[name] + r * (value - params[name])

    locs = finish("locs", s1 / safe_n[:, None])
    new = {"weights": n / jnp.sum(n), "locs": locs}
    if "scales" in params:
        var = s2 / safe_n[:, None] - 2 * locs * s1 / safe_n[:, None] + locs**2
        new["scales"] = finish("scales", jnp.sqrt(jnp.maximum(var, 0.0) + REG_COVAR))
    else:
        mean = s1 / safe_n[:, None]
        cov = s2 / safe_n[:, None, None] - locs[:, :, None] * mean[:, None, :]
        cov = cov - mean[:, :, None] * locs[:, None, :] + locs[:, :, None] * locs[:, None, :]
        cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2)) + REG_COVAR * jnp.eye(locs.shape[1])
        pd = jnp.all(jnp.isfinite(jnp.linalg.cholesky(cov)), axis=(1, 2))
        new["covs"] = finish("covs", jnp.where(pd[:, None, None], cov, params["covs"]))
    return new


def jax_init(params, x0):
    """State whose statistics are those of the init batch under ``params``."""
    params = {name: jnp.asarray(v) for name, v in params.items()}
    _, stats = jax_e_step(params, x0)
    n0 = jnp.float32(x0.shape[0])
    zero = jnp.float32(0.0)
    return JaxEMState(
        params, params, stats, stats, zero, n0, 1.0 / n0, -1.0 + zero, jnp.zeros(3), jnp.int32(0)
    )


def jax_check(state, x, loss):
    """Every ``CHECK_EVERY`` updates once the average has begun, the average's excess
    loss over the iterate on this batch (which neither has seen) joins running sums;
    at 4, 8, 16, ... checks, a mean above 3 standard errors marks the average stale
    (OnlineEM's verdict, `stale_average`). Returns the sums and the verdict."""
    looking = (state.polyak_from >= 0) & (state.count % CHECK_EVERY == 0)

    def excess():
        d = -jnp.mean(jax_e_step(state.averaged, x)[0]) - loss
        return jnp.clip(jnp.where(jnp.isnan(d), 10.0, d), -10.0, 10.0)

    d = jax.lax.cond(looking, excess, lambda: jnp.float32(0.0))
    check = state.check + jnp.where(looking, jnp.stack([1.0, d, d * d]), 0.0)
    return check, looking & stale_average(check)


def jax_update(config, state, x):
    """One online EM update. Statistics move by ``gamma = (t + T0) ** -kappa``, ``t``
    the batches seen before (the init batch included), or by the exact running mean
    during burn-in; then the M step (skipped during burn-in) and the Polyak average,
    the M step of the statistics' average."""
    loglik, batch = jax_e_step(state.params, x)
    loss = -jnp.mean(loglik)
    b = x.shape[0]
    seen = state.seen + b
    in_burn_in = seen <= config.burn_in
    p = config.step_points
    step = 1.0 - (1.0 - (state.seen / p + T0) ** -config.kappa) ** (b / p)
    gamma = jnp.where(in_burn_in, b / seen, step)
    gamma = jnp.minimum(gamma, 1.0).astype(jnp.float32)
    stats = jax.tree.map(lambda s, new: s + gamma * (new - s), state.stats, batch)
    weight_sq = (1.0 - gamma) ** 2 * state.weight_sq + gamma**2 / b
    proposed = jax_m_step(state.params, stats, b, 1.0 / weight_sq, config.damping)
    params = jax.tree.map(lambda new, old: jnp.where(in_burn_in, old, new), proposed, state.params)
    polyak_from, check = state.polyak_from, state.check
    if config.polyak_start is None:
        averaged, avg_stats, points = params, state.averaged_stats, state.averaged_points
    else:
        # the average of the batches' statistics since the start (again, when the check
        # finds it stale); its M step is the average once it rests on more points than
        # the running statistics
        start = config.polyak_start
        check, stale = jax_check(state, x, loss)
        begins = ((polyak_from < 0) | stale) & (seen > start) & ~in_burn_in
        check = jnp.where(begins, 0.0, check)
        polyak_from = jnp.where(begins, jnp.maximum(state.seen, start), polyak_from)
        on = polyak_from >= 0
        points = jnp.where(begins, 0.0, state.averaged_points) + b
        points = jnp.where(on, points, 0.0)
        w = jnp.where(on, b / jnp.maximum(points, 1.0), 0.0)
        avg_stats = jax.tree.map(lambda a, new: a + w * (new - a), state.averaged_stats, batch)
        # damped toward the iterates' average, as OnlineEM's
        since = seen - polyak_from
        weight = jnp.minimum(jnp.where(on & (since > 0), b / jnp.maximum(since, 1.0), 1.0), 1)
        iterates = jax.tree.map(lambda a, p: a + weight * (p - a), state.averaged, params)
        from_stats = jax_m_step(iterates, avg_stats, b, points, config.damping)
        use = on & (points * weight_sq >= 1.0)
        averaged = jax.tree.map(lambda f, a: jnp.where(use, f, a), from_stats, iterates)
    new = JaxEMState(
        params,
        averaged,
        stats,
        avg_stats,
        points,
        seen,
        weight_sq,
        polyak_from,
        check,
        state.count + 1,
    )
    return new, loss


def jax_scan(config, state, xs):
    """``jax_update`` over stacked batches ``xs`` of shape (num_batches, B, D)."""
    return jax.lax.scan(functools.partial(jax_update, config), state, xs)
