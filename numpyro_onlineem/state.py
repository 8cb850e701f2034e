"""State and diagnostics of online EM: immutable NamedTuple pytrees."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class OnlineEMState(NamedTuple):
    r"""Everything online EM carries from one mini-batch to the next.

    Its size depends on the model only, never on how much data has been seen.

    Attributes
    ----------
    params : dict[str, Array]
        Current estimates $\theta_n$ of every ``numpyro.param`` and global latent
        site, in constrained space (the shapes the model declares).
    stats : dict[str, dict[str, Array]]
        Running averages $\hat s_n$ of the expected sufficient statistics per
        datum, keyed by observed or latent site, then by statistic; leading axis: cells.
        Gaussian sites hold moments about ``shifts``. Keyed by M step
        (`numpyro_onlineem.mstep.base.MStep.name`): a closed-form M step by the local
        site whose statistics it keeps.
    mstep_states : dict[str, Any]
        Each M step's own state (`numpyro_onlineem.mstep.base.MStep.init`): ``()`` for
        the closed form and fixed paths, an optimizer's state for a numerical one.
    shifts : dict[str, Array]
        Fixed reference points $c$ of the Gaussian sites' statistics: the init batch's
        mean per coordinate (statistics of $x - c$, so that float32 moments of data far
        from the origin keep their precision). Set at ``init``, never updated.
    averaged : dict[str, Array]
        Polyak–Ruppert average of ``params`` (equal to ``params`` when averaging is off
        or has not started). `OnlineEM.get_params` returns it.
    averaged_residual : dict[str, Array]
        The low-order part of ``averaged`` lost to rounding (Kahan's compensation,
        `numpyro_onlineem.core.compensated_add`): float32 increments of an average far
        from the origin would otherwise be lost. Only the sites whose average is the
        mean of their iterates (those of no M step in ``averaged_stats``).
    averaged_stats : Array, float, shape (2, S)
        Polyak–Ruppert average of the statistics of the M steps that are functions of
        their statistics alone (closed form, weighted least squares): the running mean
        of the batches' statistics since the average began
        (`numpyro_onlineem.core.average_statistics`), raveled into one row
        (``jax.flatten_util.ravel_pytree`` of ``{M step: its statistics}``, keyed like
        ``stats``), and below it Kahan's residual of that row. Their sites' entries of
        ``averaged`` are their M steps of it, once it rests on more points than
        ``stats`` (``averaged_points >= 1 / weight_sq``). One array rather than a tree
        of pairs: one fused loop updates it, and a jitted call returns one buffer.
    averaged_points : Array, float, shape ()
        Points behind ``averaged_stats`` (0 before the average begins).
    polyak_from : Array, float, shape ()
        ``num_seen`` when the Polyak average last began (``-1`` before: every leaf of the
        state stays finite; it begins again when it falls behind the iterate,
        `numpyro_onlineem.core.check_average`): after the average's
        start (``polyak_start``), at the first update whose M steps have all settled
        (`MStep.settled`).
    polyak_check : Array, float, shape (3,)
        Count, sum and sum of squares of the average's excess loss over the iterate on
        fresh batches since the average (re)began (`numpyro_onlineem.core.check_average`).
    count : Array, int32, shape ()
        Number of updates applied.
    num_seen : Array, float, shape ()
        Number of data points seen by ``update`` (plus those of ``init``).
    weight_sq : Array, float, shape ()
        $\sum_i a_i^2$ over the weights $a_i$ of the points seen in the running
        statistics ($\sum_i a_i = 1$): $1 / $ ``weight_sq`` is the effective number of
        points behind them (``num_seen`` for a running mean, fewer when old points are
        forgotten).
    rng_key : Array
        PRNG key, split by operations that need randomness.
    plan : Plan
        Static M-step plan (pytree metadata, not an array).
    """

    params: dict
    stats: dict
    mstep_states: dict
    shifts: dict
    averaged: dict
    averaged_residual: dict
    averaged_stats: jax.Array
    averaged_points: jax.Array
    polyak_from: jax.Array
    polyak_check: jax.Array
    count: jax.Array
    num_seen: jax.Array
    weight_sq: jax.Array
    rng_key: jax.Array
    plan: object


class UpdateInfo(NamedTuple):
    """Diagnostics of one update, kept apart from the state.

    Attributes
    ----------
    loss : Array, shape ()
        Negative log marginal likelihood of the batch per datum, under the parameters
        before the update.
    step_size : Array, shape ()
        Step $\\gamma_n$ applied to the statistics.
    m_step : Array, bool, shape ()
        Whether the M step ran (False during burn-in).
    nonfinite : Array, bool, shape ()
        True when the batch's loss is not finite (non-finite data, or log-densities that
        overflow): the update was skipped and the state returned unchanged. (A finite
        loss implies finite statistics, and the closed-form M steps guard their
        divisions, so finite statistics give finite estimates.)
    out_of_support : Array, bool, shape ()
        True when an observed value lies outside its site's support (a negative or
        fractional count, say): the update was skipped and the state returned
        unchanged.
    num_points : Array, shape ()
        Points in the batch.
    """

    loss: jax.Array
    step_size: jax.Array
    m_step: jax.Array
    nonfinite: jax.Array
    out_of_support: jax.Array
    num_points: jax.Array

    @classmethod
    def zeros(cls, shape: tuple, real) -> UpdateInfo:
        """Infos of ``shape`` updates, all zero (False), real fields of dtype ``real``:
        the buffer a fused loop writes each update's info into."""
        zeros = lambda dtype: jnp.zeros(shape, dtype)
        return cls(
            loss=zeros(real),
            step_size=zeros(real),
            m_step=zeros(bool),
            nonfinite=zeros(bool),
            out_of_support=zeros(bool),
            num_points=zeros(real),
        )


class OnlineEMRunResult(NamedTuple):
    """What `OnlineEM.run` returns.

    Attributes
    ----------
    params : dict[str, Array]
        ``get_params`` of the final state.
    state : OnlineEMState
    losses : Array, shape (num_updates,)
        The loss of every update, in order.
    """

    params: dict
    state: OnlineEMState
    losses: jax.Array
