r"""The closed-form M step of a Normal location linear in an estimated site: weighted
least squares.

A ``Normal`` local site whose location is affine in one estimated site $\beta$,

$$
y_i \sim \mathcal{N}(a_{ip}^\top \beta_{b(p)} + c_{ip},\ \sigma_{g(p)}^2),
$$

at every position $p$ of its grid off the data axis (an enumerated component, an
output), with $\beta_{b(p)}$ the block of coefficients that position reads (the row
``beta[z]`` the enumerated latent selects) and $\sigma$ learned or constant: a
mixture of linear regressions (Cappé & Moulines 2009, section 4.2), written
``Normal(jnp.sum(X * beta[z], -1), sigma[z])``. The design rows $a_{ip}$ are the
derivative of the traced location with respect to $\beta$, taken at every batch
(`jax.linearize` of the model re-traced at other values of $\beta$; exact, since the
location is affine), and $c_{ip}$ is the location at $\beta = 0$.

Statistics per position, with $u_{ip} = (a_{ip}, y_i - c_{ip}) - r_p$ about a fixed
reference point $r_p$ (the mean of the init batch's rows, `LinearGaussian.reference`),
and $w_{ip}$ the posterior weight of the position (divided by the variance when the
scale is a constant): $n_p = \sum_i w_{ip}$, $m_p = \sum_i w_{ip} u_{ip}$ and
$G_p = \sum_i w_{ip} u_{ip} u_{ip}^\top$, per-datum batch means, shapes ``(P,)``,
``(P, D + 1)``, ``(P, D + 1, D + 1)``.

M step (ECM: the coefficients given the current scales, then the scales given the new
coefficients). With $S_p = G_p + m_p r_p^\top + r_p m_p^\top + n_p r_p r_p^\top$ (the
raw moments of $(a, y - c)$), split into $S^{aa}_p$ and $S^{ay}_p$:

$$
\beta_b = \Big(N \sum_{p \in b} S^{aa}_p / \sigma_p^2 + \Lambda_0\Big)^{-1}
\Big(N \sum_{p \in b} S^{ay}_p / \sigma_p^2 + \Lambda_0 m_0\Big),
$$

with a conjugate ``Normal(m_0, Λ_0^{-1/2})`` prior on a global $\beta$ (elementwise),
none for a ``numpyro.param`` (plain weighted least squares). Then, with
$v_p = (-\beta_{b(p)}, 1)$, the weighted residual sum of squares
$Q_p = v_p^\top G_p v_p + 2 (r_p^\top v_p)(m_p^\top v_p) + n_p (r_p^\top v_p)^2$,
taken about the reference point so that data far from the origin keep their
precision, and $\sigma_g^2 = \sum_{p \in g} Q_p / \sum_{p \in g} n_p$ +
``reg_covar``, or the ``NormalFamily`` posterior modes under a ``Gamma`` prior on a
precision or an ``InverseGamma`` prior on a variance.

A block whose $N \sum_{p \in b} S^{aa}_p / \sigma_p^2$ is singular (fewer points
than coefficients, or a collinear design) has a ridge of `RIDGE` times its mean
diagonal added, only then; a block with fewer than ``options.min_count`` expected
points keeps its value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_onlineem.estep.logprob import align
from numpyro_onlineem.families import Family, segment_sum, take, unwrap
from numpyro_onlineem.mstep.base import EStepBatch, MStepContext
from numpyro_onlineem.mstep.closed_form import _prior_blocks, damped
from numpyro_onlineem.mstep.sites import site_grid

RIDGE = 1e-6
"""Ridge added to a singular block of the normal equations, relative to the mean of
its diagonal."""


class LinearSite(NamedTuple):
    """A Normal local site whose location is linear in one estimated site (static).

    Attributes
    ----------
    site : str
        The Normal local site.
    family : Family
        Its family (``NormalFamily``).
    coef : str
        The estimated site $\\beta$ the location is linear in.
    coef_shape : tuple of int
    data_axis : int
        Axis of the data plate in the site's grid.
    blocks : numpy.ndarray, shape (num_blocks, D)
        The flat indices in $\\beta$ of every block's coefficients.
    position_block : numpy.ndarray, shape (P,)
        The block each grid position off the data axis reads.
    scale : str or None
        The estimated site used (directly or through a `Family.reparams` map) as the
        scale; ``None`` for a constant scale.
    scale_groups : tuple
        ``(position -> scale block, number of blocks)`` (``()`` without ``scale``).
    scale_shape : tuple of int
    scale_reparam : str or None
    attrs : dict[str, str]
        Role -> distribution attribute.
    priors : dict[str, str]
        Role -> the global site with a conjugate prior (``"loc"``: $\\beta$'s Normal).
    projection : Projection or None
        Keeps the scale site inside its declared constraint.
    """

    site: str
    family: Family
    coef: str
    coef_shape: tuple
    data_axis: int
    blocks: np.ndarray
    position_block: np.ndarray
    scale: str | None = None
    scale_groups: tuple = ()
    scale_shape: tuple = ()
    scale_reparam: str | None = None
    attrs: dict = {}
    priors: dict = {}
    projection: Any = None

    @property
    def num_positions(self) -> int:
        return len(self.position_block)

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    def num_stats(self) -> int:
        """Scalar statistics over every position."""
        d = self.block_size + 1
        return self.num_positions * (1 + d + d * d)


class LinearGaussian(NamedTuple):
    """Weighted least squares for a `LinearSite` (see the module docstring)."""

    site: LinearSite
    averages_statistics = True  # its update reads its statistics alone

    @property
    def name(self) -> str:
        return f"<linear {self.site.site}>"

    @property
    def estimated(self) -> tuple:
        return (self.site.coef,) + (() if self.site.scale is None else (self.site.scale,))

    def init(self, params: dict) -> tuple:
        return ()

    def _rows(self, batch: EStepBatch) -> tuple[jax.Array, jax.Array]:
        """``(z, w)``: the rows $(a_{ip}, y_i - c_{ip})$, ``(B, P, D + 1)``, and their
        weights $w_{ip}$, ``(B, P)``."""
        ls = self.site
        site = batch.trace[ls.site]
        grid, base = site_grid(site)
        nd = len(grid)
        coef = batch.params[ls.coef]

        def loc(b):
            tr = batch.trace_at({**batch.params, ls.coef: b})
            return jnp.broadcast_to(align(unwrap(tr[ls.site]["fn"]).loc, nd), grid)

        # one tangent per coefficient of a block, set in every block at once: each
        # position reads one block, so its tangent is its design row's entry
        size = int(np.prod(ls.coef_shape, dtype=int))
        tangents = np.zeros((ls.block_size, size))
        for j in range(ls.block_size):
            tangents[j, ls.blocks[:, j]] = 1.0
        tangents = jnp.asarray(tangents.reshape((-1,) + tuple(ls.coef_shape)), coef.dtype)
        c, linear = jax.linearize(loc, jnp.zeros_like(coef))
        a = jax.vmap(linear)(tangents)  # (D, *grid)

        def flat(x):  # (*grid) -> (B, P)
            return jnp.moveaxis(x, ls.data_axis, 0).reshape(grid[ls.data_axis], -1)

        y = jnp.broadcast_to(align(site["value"], nd), grid).astype(c.dtype)
        z = jnp.concatenate([jax.vmap(flat, out_axes=-1)(a), flat(y - c)[..., None]], -1)
        w = batch.weights[ls.site]
        w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (nd - w.ndim)), grid)
        if ls.scale is None:  # a constant scale: the weights of weighted least squares
            w = w / jnp.broadcast_to(align(base.scale, nd), grid) ** 2
        return z, flat(w).astype(z.dtype)

    def reference(self, batch: EStepBatch) -> jax.Array:
        """The fixed point $r_p$ the statistics are taken about: the mean row of the
        (init) batch at every position, ``(P, D + 1)``."""
        z, _ = self._rows(batch)
        return jnp.mean(z, axis=0)

    def statistics(self, batch: EStepBatch) -> dict:
        """``{"n": (P,), "m": (P, D + 1), "G": (P, D + 1, D + 1)}``, per-datum batch
        means about `reference`."""
        z, w = self._rows(batch)
        u = z - batch.shifts[self.name]
        b = batch.batch_size
        return {
            "n": jnp.sum(w, 0) / b,
            "m": jnp.einsum("ip,ipa->pa", w, u) / b,
            "G": jnp.einsum("ip,ipa,ipb->pab", w, u, u) / b,
        }

    def update(
        self, stats: dict, params: dict, mstep_state: Any, context: MStepContext
    ) -> tuple[dict, Any]:
        ls, config, batch = self.site, context.config, context.batch
        options, big_n = config.options, batch.total_size
        n, m, g = (big_n * stats[k] for k in ("n", "m", "G"))
        r = batch.shifts[self.name]
        d = ls.block_size
        nb = ls.blocks.shape[0]
        nu = config.damping
        if nu is None:
            nu = float(d) if config.schedule is None else 0.0
        points = context.effective_points / big_n

        # the coefficients, by weighted least squares given the current scales
        raw = g + m[:, :, None] * r[:, None, :] + r[:, :, None] * m[:, None, :]
        raw = raw + n[:, None, None] * r[:, :, None] * r[:, None, :]
        prec = jnp.ones_like(n)
        if ls.scale is not None:
            sigma = self._scale_values(params[ls.scale])
            prec = 1.0 / take(sigma, ls.scale_groups[0]) ** 2
        pb = ls.position_block
        lhs = segment_sum(prec[:, None, None] * raw[:, :d, :d], pb, nb)
        rhs = segment_sum(prec[:, None] * raw[:, :d, d], pb, nb)
        count = segment_sum(n, pb, nb)
        flat = params[ls.coef].reshape(-1)
        current = flat[ls.blocks]
        prior = ls.priors.get("loc")
        if prior is not None:
            hyper = _prior_blocks(batch.trace[prior]["fn"], ls.coef_shape, ())
            l0 = 1.0 / hyper["scale"][ls.blocks] ** 2
            lhs = lhs + jax.vmap(jnp.diag)(l0)
            rhs = rhs + l0 * hyper["loc"][ls.blocks]
            count = jnp.full_like(count, jnp.inf)
        beta = solve_blocks(lhs, rhs)
        beta = jnp.where((count > options.min_count)[:, None], beta, current)
        beta = damped(beta, current, count * points, nu)
        new = dict(params)
        flat = flat.at[ls.blocks.reshape(-1)].set(beta.reshape(-1).astype(flat.dtype))
        new[ls.coef] = flat.reshape(params[ls.coef].shape)
        if ls.scale is None:
            return new, mstep_state

        # the scales, from the residuals of the new coefficients
        v = jnp.concatenate([-take(beta, pb), jnp.ones_like(n)[:, None]], -1)
        rv = jnp.sum(r * v, -1)
        q = jnp.einsum("pa,pab,pb->p", v, g, v) + 2.0 * rv * jnp.sum(m * v, -1) + n * rv**2
        groups, ng = ls.scale_groups
        num = jnp.maximum(segment_sum(q, groups, ng), 0.0)
        den = segment_sum(n, groups, ng)
        prior = ls.priors.get("scale")
        if prior is None:
            var = num / jnp.where(den > 0, den, 1.0) + options.reg_covar
        else:
            hyper = _prior_blocks(batch.trace[prior]["fn"], ls.scale_shape, ())
            a, b = hyper["concentration"], hyper["rate"]
            # NormalFamily's modes: an InverseGamma variance, a Gamma precision
            shape = a + 1.0 if ls.scale_reparam == "variance" else a - 1.0
            shape = 0.5 * den + shape
            var = (0.5 * num + b) / jnp.where(shape > 0, shape, 1.0)
            den = jnp.where(shape > 0, jnp.inf, 0.0)
        current = self._scale_values(params[ls.scale])
        scale = jnp.where(den > options.min_count, jnp.sqrt(var), current)
        scale = damped(scale, current, den * points, nu)
        value = scale.reshape(ls.scale_shape)
        if ls.scale_reparam is not None:
            value = ls.family.reparams["scale"][ls.scale_reparam].inverse(value)
        if ls.projection is not None:
            value = ls.projection(value, None)
        new[ls.scale] = value.astype(params[ls.scale].dtype)
        return new, mstep_state

    def _scale_values(self, value: jax.Array) -> jax.Array:
        """The scale of every scale block, ``(num_blocks,)``, from the site's value."""
        ls = self.site
        if ls.scale_reparam is not None:
            value = ls.family.reparams["scale"][ls.scale_reparam].forward(value)
        return value.reshape(-1)


def solve_blocks(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    r"""$A_b^{-1} r_b$ for every block, ``lhs``: ``(nb, D, D)`` symmetric positive
    semi-definite, ``rhs``: ``(nb, D)``; a singular block (its Cholesky factor not
    finite) gets a ridge of `RIDGE` times its mean diagonal first."""
    ok = jnp.all(jnp.isfinite(jnp.linalg.cholesky(lhs)), axis=(-2, -1))
    d = lhs.shape[-1]
    mean_diag = jnp.trace(lhs, axis1=-2, axis2=-1) / d
    ridge = jnp.where(ok, 0.0, RIDGE * mean_diag + jnp.finfo(lhs.dtype).tiny)
    lhs = lhs + ridge[:, None, None] * jnp.eye(d, dtype=lhs.dtype)
    return jnp.linalg.solve(lhs, rhs[..., None])[..., 0]
