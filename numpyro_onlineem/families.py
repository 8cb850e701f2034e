r"""Exponential families: expected sufficient statistics and closed-form M steps.

Each family is one entry of a registry (`register_family` adds one; the E and M steps
and the plan read it through `find_family`), with the same small interface:

* ``roles(base)``: the distribution's parameter arrays, keyed by role, with the
  attribute each was read from (``MultivariateNormal`` reads its covariance from
  ``covariance_matrix``, ``precision_matrix`` or ``scale_tril``, as the model gave it).
* ``suff_stats(value, weight, consts, base)``: the weighted statistics
  $\sum_i w_i\, T(x_i)$, summed over the data axis (axis 0); ``consts`` holds
  the roles that are not estimated (absorbed into the statistics).
* ``m_step(stats, inputs)`` (`MStepInputs`):
  the maximiser of
  $N \langle s, \phi(\theta)\rangle - N\psi(\theta) + \log \pi(\theta)$ over the
  learned roles, or its conditional maximiser role by role (ECM) where roles are
  coupled.

Gaussian families (``shift_role = "loc"``) take their moments about a fixed reference
point $c$ per cell, the mean of the init batch: ``value`` arrives as $x - c$ and the
M step receives $c$ as ``shift``. Raw moments $\sum w x^2$ of float32 data a thousand
units from the origin lose the variance to cancellation; moments about $c$ keep it.

Statistics live on *cells*: the distinct combinations of parameter elements used at
one position of the site. ``groups[role]`` maps each cell to the parameter block it
reads, so tied parameters (one scale shared by all components, say) pool the cells
that share them. Adding a family means registering one entry; the E step and the
stochastic approximation never change.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from numpyro.distributions.util import clamp_probs

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class MStepOptions(NamedTuple):
    """Numerical safeguards of the closed-form M step.

    Attributes
    ----------
    reg_covar : float
        Added to every variance (diagonal of every covariance), as scikit-learn's
        ``GaussianMixture(reg_covar=...)``: a floor that keeps a component from
        collapsing onto one point.
    min_count : float
        A parameter block whose expected number of data points is below this keeps
        its current value (a component that receives no responsibility stays valid).
    prob_eps : float
        Bernoulli probabilities are clipped to ``[prob_eps, 1 - prob_eps]`` and
        Poisson / Exponential rates floored at ``prob_eps``.
    """

    reg_covar: float = 1e-6
    min_count: float = 1e-6
    prob_eps: float = 1e-6


class Reparam(NamedTuple):
    r"""A site that enters a distribution argument through a fixed elementwise map:
    ``Normal(loc, tau ** -0.5)`` estimates the precision $\tau$ of the ``scale`` role.

    Attributes
    ----------
    name : str
        What the site is, e.g. ``"precision"``.
    forward : callable
        Site value -> role value (``tau -> tau ** -0.5``); NumPy and JAX arrays alike.
    inverse : callable
        Role value -> site value (``scale -> scale ** -2``).
    formula : str
        The map, in words, for `OnlineEM.mstep_paths`.
    """

    name: str
    forward: Any
    inverse: Any
    formula: str


class MStepInputs(NamedTuple):
    r"""What a family's closed-form M step receives besides the running statistics.

    Attributes
    ----------
    groups : dict[str, tuple]
        Role -> (cell -> parameter block index as a NumPy array, number of blocks).
    current : dict[str, Array]
        Role -> current value, ``(num_blocks, *role_event)`` (reparametrised sites
        already mapped forward).
    priors : dict[str, dict]
        Role -> hyperparameters of its conjugate prior, cut into blocks
        (`PRIOR_HYPERPARAMETERS`); absent for ``numpyro.param`` sites.
    num_data : float
        $N$, the size of the data plate: statistics are per-datum averages, the M step
        weighs $N$ times them against the priors.
    options : MStepOptions
    attrs : dict[str, str]
        Role -> distribution attribute it is read from.
    reparams : dict[str, str]
        Role -> name of the reparametrisation of the roles that have one.
    shift : Array or None
        The reference point of every cell, ``(num_cells, *value_event)``, for
        statistics taken about one (``None``: about the origin).
    finish : dict or None
        Role -> callable ``(blocks, count, weights) -> blocks`` to apply to the role's
        proposal before the roles that depend on it (the damped step toward it, then
        the projection onto the site's constraint; `finish_role`).
    """

    groups: dict
    current: dict
    priors: dict
    num_data: Any
    options: MStepOptions
    attrs: dict
    reparams: dict
    shift: Any = None
    finish: dict | None = None


def contract_data(*ops: jax.Array) -> jax.Array:
    r"""Sum over axis 0 of the broadcast product of ``ops`` (all of the same ndim).

    Size-one axes are dropped from the einsum so that broadcasting never materialises:
    $\sum_b w_{kb}\, x_{bd}$ runs as one matrix product.
    """
    ndim = ops[0].ndim
    shape = jnp.broadcast_shapes(*(op.shape for op in ops))
    subs, arrays = [], []
    for op in ops:
        keep = [i for i in range(ndim) if op.shape[i] != 1 or shape[i] == 1]
        arrays.append(op.reshape([op.shape[i] for i in keep]))
        subs.append("".join(_LETTERS[i] for i in keep))
    out = "".join(_LETTERS[i] for i in range(1, ndim))
    return jnp.einsum(",".join(subs) + "->" + out, *arrays)


def _is_identity(groups, num: int) -> bool:
    """Whether a static group map sends cell ``i`` to block ``i``, one to one."""
    return (
        isinstance(groups, np.ndarray)
        and len(groups) == num
        and np.array_equal(groups, np.arange(num))
    )


def segment_sum(x: jax.Array, groups: np.ndarray, num: int) -> jax.Array:
    """Sum the leading axis of ``x`` into ``num`` groups (``groups``: cell -> group).

    Static maps are specialised: one-to-one maps cost nothing, a single group is a sum.
    """
    if _is_identity(groups, num):
        return x
    if num == 1 and isinstance(groups, np.ndarray):
        return jnp.sum(x, axis=0, keepdims=True)
    return jax.ops.segment_sum(x, jnp.asarray(groups), num_segments=num)


def rate_from_log_centers(centers: jax.Array, options: MStepOptions) -> jax.Array:
    r"""The rate of unit shape whose mean logarithm is $\log c$, at k-means centres of
    $\log x$ (geometric means $c$, `Family.center_space` ``"log"``): since
    $E[\log x] = -\log\lambda - \gamma$ for an Exponential($\lambda$),
    $\lambda = e^{-\gamma}/c$ ($\gamma$ Euler's constant)."""
    return np.exp(-np.euler_gamma) / jnp.maximum(centers, options.prob_eps)


def take(x: jax.Array, groups: np.ndarray) -> jax.Array:
    """``x[groups]``: the block of every cell (free for a one-to-one map)."""
    if _is_identity(groups, x.shape[0]):
        return x
    return x[jnp.asarray(groups)]


def finish_role(
    finish: dict | None, role: str, value: jax.Array, count: jax.Array, weights=None
) -> jax.Array:
    """A role's M-step proposal ``(num_blocks, *role_event)``, damped and kept inside its
    site's constraint by the caller's hook (``MStepInputs.finish``); ``count``:
    ``(num_blocks,)`` expected points behind each block."""
    if not finish or role not in finish:
        return value
    return finish[role](value, count, weights)


def _keep(count: jax.Array, new: jax.Array, current: jax.Array, min_count: float) -> jax.Array:
    """``new`` where the block saw enough data, ``current`` elsewhere."""
    mask = (count > min_count).reshape(count.shape + (1,) * (new.ndim - count.ndim))
    return jnp.where(mask, new, current)


class Family:
    """Base class of a registry entry. See the module docstring for the interface."""

    name: str = ""
    dist_types: tuple = ()
    value_event_ndim: int = 0
    role_event_ndim: dict = {}
    # role -> distributions accepted as conjugate priors on a global site in that role
    conjugate_priors: dict = {}
    # role -> reparametrisations recognised besides the direct use: {name: Reparam}
    reparams: dict = {}
    # roles whose data-driven initialisation from cluster centres makes sense
    center_roles: tuple = ()
    # where k-means runs for that start: "data", or "log" for positive data whose spread
    # grows with their scale (the centres passed to `from_centers` are then geometric
    # means): on raw Exponential data in 300 dimensions k-means++ split the clusters
    # badly, and the fit ended 37 nats/point short of batch EM from the same start
    center_space: str = "data"
    # role whose estimation makes the statistics moments about a fixed reference point
    # (the Gaussian location), or None: statistics of the value itself
    shift_role: str | None = None
    # role -> the support of the values the closed-form M step returns for it
    role_support: dict = {}
    # roles whose M-step objective is a separable quadratic in the role's value (a
    # Normal location): an ordered constraint is kept exactly by isotonic regression
    quadratic_roles: tuple = ()
    # how the M step maximises, in words, for `OnlineEM.mstep_paths`
    maximiser: str = "closed form"

    def roles(self, base: dist.Distribution) -> dict:
        """Role name -> (distribution attribute name, array)."""
        raise NotImplementedError

    def num_stats(self, base: dist.Distribution) -> int:
        """Number of scalar statistics per cell."""
        return 2

    def accepts_prior(
        self, role: str, attr: str, prior: dist.Distribution, reparam: str | None = None
    ) -> bool:
        """Whether ``prior`` on the site in ``role`` (read from ``attr``, through the
        named reparametrisation if any) is conjugate."""
        return type(prior) in self.prior_choices(role, attr, reparam)

    def prior_choices(self, role: str, attr: str, reparam: str | None = None) -> list:
        """The conjugate prior families for ``role`` read from ``attr``."""
        key = role if reparam is None else (role, reparam)
        return list(self.conjugate_priors.get(key, ()))

    def attrs(self, role: str) -> tuple:
        """Attribute names of the distribution that are functions of ``role``."""
        return (role,)

    def support(self, role: str, attr: str, reparam: str | None = None):
        """The support of the closed-form estimates of the site in ``role`` (read from
        ``attr``; through the named reparametrisation, a positive quantity)."""
        if reparam is not None:
            return constraints.positive
        return self.role_support[role]

    has_linear_form: bool = False

    def linear_form(self, value, params, num_event, center=None) -> tuple[list, Any, Any]:
        r"""Elementwise exponential-family form of the log-density,
        $\log p(x \mid \theta) = \sum_j T_j(x)\, \eta_j(\theta) - A(\theta) + \log h(x)$.

        ``value`` and every ``params[role]`` have the same ndim and broadcast together;
        the last ``num_event`` axes are summed by the caller
        (`numpyro_onlineem.estep.logprob`). ``center``, broadcastable to ``value``, is a
        point the form may be written about (families with a ``shift_role``); ``None``:
        the family's choice. Returns ``([(T_j, eta_j), ...], A, log_h)``, every array of
        that ndim (or a Python float).
        """
        raise NotImplementedError

    def suff_stats(self, value, weight, consts, base) -> dict:
        raise NotImplementedError

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        """Closed-form M step (see the module docstring and `MStepInputs`): the
        maximiser, in role values, of every learned role, each proposal passed through
        ``inputs.finish`` (`finish_role`) with ``count`` the ``N``-scaled expected points
        of each block (``inf`` under a prior) and ``weights`` the curvature of a
        separable quadratic objective, or ``None``."""
        raise NotImplementedError

    def from_centers(self, role: str, centers: jax.Array, options: MStepOptions) -> jax.Array:
        """Initial value of ``role`` from k-means centres (same shape as the value)."""
        return centers


class NormalFamily(Family):
    r"""``Normal(loc, scale)``, elementwise (``to_event`` for diagonal multivariate).

    Statistics per cell: $n = \sum w$, $s_1 = \sum w x$,
    $s_2 = \sum w x^2$. M step: $\mu = s_1 / n$,
    $\sigma^2 = s_2/n - \mu^2 + \text{reg\_covar}$. A ``Normal(m_0, s_0)`` prior on
    a global ``loc`` gives $\mu = (m_0/s_0^2 + N s_1/\sigma^2)/(1/s_0^2 + N n/\sigma^2)$.

    The scale may also be a precision, ``Normal(loc, tau ** -0.5)``, or a variance,
    ``Normal(loc, var ** 0.5)``. With $q = \sum w (x - \mu)^2$, a ``Gamma(a, b)``
    prior on a global precision gives $\tau = (N n/2 + a - 1)/(N q/2 + b)$ and an
    ``InverseGamma(a, b)`` prior on a global variance $v = (N q/2 + b)/(N n/2 + a + 1)$
    (no ``reg_covar`` then: the prior regularises).
    """

    name = "Normal"
    dist_types = (dist.Normal,)
    role_event_ndim = {"loc": 0, "scale": 0}
    conjugate_priors = {
        "loc": (dist.Normal,),
        ("scale", "precision"): (dist.Gamma,),
        ("scale", "variance"): (dist.InverseGamma,),
    }
    reparams = {
        "scale": {
            "precision": Reparam("precision", lambda t: t**-0.5, lambda s: s**-2.0, "tau ** -0.5"),
            "variance": Reparam("variance", lambda v: v**0.5, lambda s: s**2.0, "var ** 0.5"),
        }
    }
    center_roles = ("loc",)
    shift_role = "loc"
    role_support = {"loc": constraints.real, "scale": constraints.positive}
    quadratic_roles = ("loc",)

    def roles(self, base):
        return {"loc": ("loc", base.loc), "scale": ("scale", base.scale)}

    def num_stats(self, base):
        return 3

    has_linear_form = True

    def linear_form(self, value, params, num_event, center=None):
        # centred (by default on the mean location over the non-event axes): (x - c) and
        # (mu - c) stay at the scale of the spread of the data around the components
        loc, scale = params["loc"], params["scale"]
        if center is None:
            center = jnp.mean(loc, axis=tuple(range(loc.ndim - num_event)), keepdims=True)
        x, mu = value - center, loc - center
        prec = 1.0 / scale**2
        a = 0.5 * mu * mu * prec + jnp.log(scale) + 0.5 * jnp.log(2.0 * jnp.pi)
        return [(x * x, -0.5 * prec), (x, mu * prec)], a, 0.0

    def suff_stats(self, value, weight, consts, base):
        x = value - consts["loc"] if "loc" in consts else value
        w = weight / consts["scale"] ** 2 if "scale" in consts else weight
        return {
            "n": contract_data(w),
            "s1": contract_data(w, x),
            "s2": contract_data(w, x * x),
        }

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        n, s1, s2 = (num_data * stats[k] for k in ("n", "s1", "s2"))
        c = 0.0 if shift is None else shift
        out = {}
        if "loc" in groups:
            g, nb = groups["loc"]
            prec = (
                1.0 / take(current["scale"], groups["scale"][0]) ** 2 if "scale" in groups else 1.0
            )
            a = segment_sum(prec * (s1 + n * c), g, nb)
            b = segment_sum(prec * n, g, nb)
            count = segment_sum(n, g, nb)
            if priors.get("loc") is not None:
                m0, s0 = priors["loc"]["loc"], priors["loc"]["scale"]
                a, b = a + m0 / s0**2, b + 1.0 / s0**2
                count = jnp.full_like(count, jnp.inf)
            loc = _keep(count, a / jnp.where(b > 0, b, 1.0), current["loc"], options.min_count)
            # the quadratic's curvature b weighs the blocks of an ordered projection
            out["loc"] = finish_role(finish, "loc", loc, count, b)
        if "scale" in groups:
            g, nb = groups["scale"]
            # the new location about each cell's reference point
            mu = take(out["loc"], groups["loc"][0]) - c if "loc" in groups else 0.0
            q = s2 - 2.0 * mu * s1 + mu * mu * n
            num = segment_sum(q, g, nb)
            den = segment_sum(n, g, nb)
            prior = priors.get("scale")
            if prior is None:
                var = jnp.maximum(num / jnp.where(den > 0, den, 1.0), 0.0) + options.reg_covar
            else:
                a, b = prior["concentration"], prior["rate"]
                # the mode of the variance; a Gamma(a, b) precision has the mode of an
                # InverseGamma(a - 2, b) variance
                shape = a + 1.0 if reparams.get("scale") == "variance" else a - 1.0
                rate = 0.5 * jnp.maximum(num, 0.0) + b
                shape = 0.5 * den + shape
                var = rate / jnp.where(shape > 0, shape, 1.0)
                # a Gamma precision with a < 1 and too little data has its mode at 0
                den = jnp.where(shape > 0, jnp.inf, 0.0)
            scale = _keep(den, jnp.sqrt(var), current["scale"], options.min_count)
            out["scale"] = finish_role(finish, "scale", scale, den)
        return out


class MultivariateNormalFamily(Family):
    r"""``MultivariateNormal(loc, covariance_matrix | precision_matrix | scale_tril)``.

    Statistics per cell: $n$, $s_1 = \sum w x$, $S_2 = \sum w x x^\top$.
    M step: $\mu = s_1/n$, $\Sigma = Q/n + \text{reg\_covar}\, I$ with
    $Q = S_2 - \mu s_1^\top - s_1\mu^\top + n\mu\mu^\top$, returned in whichever
    form the model passed. Conjugate priors on a global site: ``InverseWishart(nu, Psi)``
    on ``covariance_matrix`` gives $\Sigma = (\Psi + N Q)/(N n + \nu + D + 1)$;
    ``Wishart(nu, V)`` on ``precision_matrix`` gives
    $\Lambda^{-1} = (V^{-1} + N Q)/(N n + \nu - D - 1)$. Cost $O(K D^3)$ per M step.
    """

    name = "MultivariateNormal"
    dist_types = (dist.MultivariateNormal,)
    value_event_ndim = 1
    role_event_ndim = {"loc": 1, "cov": 2}
    conjugate_priors = {"loc": (dist.Normal,), "cov": (dist.InverseWishart, dist.Wishart)}
    center_roles = ("loc",)
    shift_role = "loc"
    role_support = {"loc": constraints.real_vector, "cov": constraints.positive_definite}
    _forms = ("covariance_matrix", "precision_matrix", "scale_tril")
    _cov_priors = {"covariance_matrix": dist.InverseWishart, "precision_matrix": dist.Wishart}

    def prior_choices(self, role, attr, reparam=None):
        if role == "cov":
            return [self._cov_priors[attr]] if attr in self._cov_priors else []
        return super().prior_choices(role, attr, reparam)

    def support(self, role, attr, reparam=None):
        if role == "cov" and attr == "scale_tril":
            return constraints.lower_cholesky
        return super().support(role, attr, reparam)

    def cov_form(self, base) -> str:
        for form in self._forms[:2]:
            if form in vars(base):
                return form
        return "scale_tril"

    def roles(self, base):
        form = self.cov_form(base)
        return {"loc": ("loc", base.loc), "cov": (form, getattr(base, form))}

    def attrs(self, role):
        return self._forms if role == "cov" else (role,)

    def num_stats(self, base):
        d = base.event_shape[-1]
        return 1 + d + d * d

    def suff_stats(self, value, weight, consts, base):
        x = value - consts["loc"] if "loc" in consts else value
        w = weight[..., None]
        return {
            "n": contract_data(weight),
            "s1": contract_data(w, x),
            "s2": contract_data(w[..., None], x[..., :, None], x[..., None, :]),
        }

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        n, s1, s2 = (num_data * stats[k] for k in ("n", "s1", "s2"))
        c = jnp.zeros_like(s1) if shift is None else shift
        out = {}
        mu = c
        if "loc" in groups:
            g, _ = groups["loc"]
            if priors.get("loc") is not None:
                # diagonal Normal prior, current precision: (L0 + n L)^-1 (L0 m0 + L s1)
                prec = _precision(take(current["cov"], groups["cov"][0]), attrs["cov"])
                l0 = 1.0 / take(priors["loc"]["scale"], g) ** 2
                lhs = n[:, None, None] * prec + jax.vmap(jnp.diag)(l0)
                s1_raw = s1 + n[:, None] * c
                rhs = jnp.einsum("cij,cj->ci", prec, s1_raw) + l0 * take(priors["loc"]["loc"], g)
                mu = jnp.linalg.solve(lhs, rhs[..., None])[..., 0]
            else:
                safe_n = jnp.where(n > 0, n, 1.0)
                mu = _keep(n, c + s1 / safe_n[:, None], take(current["loc"], g), options.min_count)
            one_to_one = _is_identity(g, current["loc"].shape[0])
            if one_to_one:
                count = n if priors.get("loc") is None else jnp.full_like(n, jnp.inf)
                mu = finish_role(finish, "loc", mu, count)
            out["loc"] = mu if one_to_one else current["loc"].at[jnp.asarray(g)].set(mu)
        if "cov" in groups:
            g, nb = groups["cov"]
            mu = mu - c  # the location about each cell's reference point
            q = s2 - mu[:, :, None] * s1[:, None, :] - s1[:, :, None] * mu[:, None, :]
            q = q + n[:, None, None] * mu[:, :, None] * mu[:, None, :]
            num = segment_sum(q, g, nb)
            den = segment_sum(n, g, nb)
            d = s1.shape[-1]
            prior = priors.get("cov")
            if prior is None:
                cov = num / jnp.where(den > 0, den, 1.0)[:, None, None]
                cov = cov + options.reg_covar * jnp.eye(d)
            elif attrs["cov"] == "covariance_matrix":  # InverseWishart(nu, Psi)
                nu = prior["concentration"]
                cov = (prior["scale_matrix"] + num) / (den + nu + d + 1.0)[:, None, None]
                den = jnp.full_like(den, jnp.inf)
            else:  # Wishart(nu, V) on the precision
                nu = prior["concentration"]
                v_inv = jnp.linalg.inv(prior["scale_matrix"])
                cov = (v_inv + num) / (den + nu - d - 1.0)[:, None, None]
                den = jnp.full_like(den, jnp.inf)
            cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
            chol = jnp.linalg.cholesky(cov)
            # a block whose estimate is not positive definite (fewer points than
            # dimensions, round-off) keeps its current value
            valid = jnp.all(jnp.isfinite(chol), axis=(-2, -1))
            count = jnp.where(valid, den, 0.0)
            cov = _keep(
                count, _from_cov(cov, chol, attrs["cov"]), current["cov"], options.min_count
            )
            out["cov"] = finish_role(finish, "cov", cov, count)
        return out


def _from_cov(cov: jax.Array, chol: jax.Array, form: str) -> jax.Array:
    if form == "covariance_matrix":
        return cov
    if form == "scale_tril":
        return chol
    eye = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)
    return jax.scipy.linalg.cho_solve((chol, True), eye)


def _precision(value: jax.Array, form: str) -> jax.Array:
    if form == "precision_matrix":
        return value
    if form == "scale_tril":
        eye = jnp.broadcast_to(jnp.eye(value.shape[-1], dtype=value.dtype), value.shape)
        return jax.scipy.linalg.cho_solve((value, True), eye)
    return jnp.linalg.inv(value)


class CategoricalFamily(Family):
    r"""``Categorical(probs)``: counts $c_k = \sum w [x = k]$.

    M step $p_k \propto c_k$; with a ``Dirichlet(alpha)`` prior on a global site,
    the posterior mode $p_k \propto \max(N c_k + \alpha_k - 1, 0)$.
    """

    name = "Categorical"
    dist_types = (dist.CategoricalProbs,)
    role_event_ndim = {"probs": 1}
    conjugate_priors = {"probs": (dist.Dirichlet,)}
    role_support = {"probs": constraints.simplex}

    def roles(self, base):
        return {"probs": ("probs", base.probs)}

    def num_stats(self, base):
        return base.probs.shape[-1]

    def suff_stats(self, value, weight, consts, base):
        num = base.probs.shape[-1]
        onehot = jax.nn.one_hot(value, num, dtype=weight.dtype)
        return {"counts": contract_data(weight[..., None], onehot)}

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        g, nb = groups["probs"]
        counts = segment_sum(num_data * stats["counts"], g, nb)
        total = counts.sum(-1)
        if priors.get("probs") is not None:
            counts = jnp.maximum(counts + priors["probs"]["concentration"] - 1.0, 0.0)
            total = jnp.full_like(total, jnp.inf)
        norm = counts.sum(-1, keepdims=True)
        new = counts / jnp.where(norm > 0, norm, 1.0)
        new = _keep(total, new, current["probs"], options.min_count)
        return {"probs": finish_role(finish, "probs", new, total)}


class _CountRateFamily(Family):
    r"""One-parameter families with statistics $n = \sum w$, $s_1 = \sum w x$, whose
    M step is a ratio of (prior-augmented) pooled statistics: subclasses give the ratio
    and the clipping that keeps the estimate inside the support."""

    role = ""

    def roles(self, base):
        return {self.role: (self.role, getattr(base, self.role))}

    def suff_stats(self, value, weight, consts, base):
        return {"n": contract_data(weight), "s1": contract_data(weight, value)}

    def ratio(self, n, s1, prior):
        """(numerator, denominator) of the estimate from pooled ``N``-scaled statistics."""
        raise NotImplementedError

    def clip(self, value, options):
        return jnp.maximum(value, options.prob_eps)

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        g, nb = groups[self.role]
        n = segment_sum(num_data * stats["n"], g, nb)
        s1 = segment_sum(num_data * stats["s1"], g, nb)
        prior = priors.get(self.role)
        num, den = self.ratio(n, s1, prior)
        count = n if prior is None else jnp.full_like(n, jnp.inf)
        value = self.clip(num / jnp.where(den > 0, den, 1.0), options)
        value = _keep(count, value, current[self.role], options.min_count)
        return {self.role: finish_role(finish, self.role, value, count)}


class BernoulliFamily(_CountRateFamily):
    r"""``Bernoulli(probs)``: $p = s_1/n$; ``Beta(a, b)`` prior:
    $p = (N s_1 + a - 1)/(N n + a + b - 2)$."""

    name = "Bernoulli"
    dist_types = (dist.BernoulliProbs,)
    role = "probs"
    role_event_ndim = {"probs": 0}
    conjugate_priors = {"probs": (dist.Beta,)}
    center_roles = ("probs",)
    role_support = {"probs": constraints.open_interval(0.0, 1.0)}

    has_linear_form = True

    def linear_form(self, value, params, num_event, center=None):
        # NumPyro's clamping: log p and log(1 - p) stay finite
        p = clamp_probs(params["probs"])
        log_q = jnp.log1p(-p)
        return [(value, jnp.log(p) - log_q)], -log_q, 0.0

    def ratio(self, n, s1, prior):
        if prior is None:
            return s1, n
        a, b = prior["concentration1"], prior["concentration0"]
        return s1 + a - 1.0, n + a + b - 2.0

    def clip(self, value, options):
        return jnp.clip(value, options.prob_eps, 1.0 - options.prob_eps)

    def from_centers(self, role, centers, options):
        return jnp.clip(centers, 0.05, 0.95)


class _PositiveRateFamily(_CountRateFamily):
    """A positive ``rate`` with a conjugate ``Gamma`` prior."""

    role = "rate"
    role_event_ndim = {"rate": 0}
    conjugate_priors = {"rate": (dist.Gamma,)}
    center_roles = ("rate",)
    role_support = {"rate": constraints.positive}

    has_linear_form = True


class PoissonFamily(_PositiveRateFamily):
    r"""``Poisson(rate)``: $\lambda = s_1/n$; ``Gamma(a, b)`` prior:
    $\lambda = (N s_1 + a - 1)/(N n + b)$."""

    name = "Poisson"
    dist_types = (dist.Poisson,)

    def linear_form(self, value, params, num_event, center=None):
        rate = params["rate"]
        # a zero rate gives log(tiny) rather than -inf (x log rate with x = 0 stays 0)
        log_rate = jnp.log(jnp.maximum(rate, jnp.finfo(rate.dtype).tiny))
        return [(value, log_rate)], rate, -gammaln(value + 1.0)

    def ratio(self, n, s1, prior):
        if prior is None:
            return s1, n
        return s1 + prior["concentration"] - 1.0, n + prior["rate"]

    def from_centers(self, role, centers, options):
        return centers + 0.5


class ExponentialFamily(_PositiveRateFamily):
    r"""``Exponential(rate)``: $\lambda = n/s_1$; ``Gamma(a, b)`` prior:
    $\lambda = (N n + a - 1)/(N s_1 + b)$."""

    name = "Exponential"
    dist_types = (dist.Exponential,)
    center_space = "log"

    def linear_form(self, value, params, num_event, center=None):
        rate = params["rate"]
        return [(value, -rate)], -jnp.log(rate), 0.0

    def ratio(self, n, s1, prior):
        if prior is None:
            return n, s1
        return n + prior["concentration"] - 1.0, s1 + prior["rate"]

    def from_centers(self, role, centers, options):
        return rate_from_log_centers(centers, options)


class LocationFamily(Family):
    """Not a registry entry: the ``loc`` of any real-valued distribution whose parameters
    take the numerical M step (``StudentT``, ``Cauchy``, ``Laplace``, ...), for the
    data-driven start only (`numpyro_onlineem.initialization`): its centres are
    k-means++ centres of the data, as a Gaussian location's are."""

    name = "location"
    center_roles = ("loc",)

    def __init__(self, event_ndim: int):
        self.value_event_ndim = event_ndim
        self.role_event_ndim = {"loc": event_ndim}


LOCATION_FAMILIES = {0: LocationFamily(0), 1: LocationFamily(1)}
"""One `LocationFamily` per event rank: module-level, so that plans compare equal."""


# hyperparameters each conjugate prior supplies; True: shaped like the estimated site
# (broadcast over it), False: one value per parameter block (e.g. Wishart's degrees)
PRIOR_HYPERPARAMETERS = {
    dist.Normal: {"loc": True, "scale": True},
    dist.Dirichlet: {"concentration": True},
    dist.Beta: {"concentration1": True, "concentration0": True},
    dist.Gamma: {"concentration": True, "rate": True},
    dist.InverseGamma: {"concentration": True, "rate": True},
    dist.InverseWishart: {"concentration": False, "scale_matrix": True},
    dist.Wishart: {"concentration": False, "scale_matrix": True},
}


# the Newton-maximiser families build on the base class above (hence the late import)
from numpyro_onlineem.families_numeric import NUMERIC_FAMILIES  # noqa: E402

_REGISTRY: list[Family] = [
    NormalFamily(),
    MultivariateNormalFamily(),
    CategoricalFamily(),
    BernoulliFamily(),
    PoissonFamily(),
    ExponentialFamily(),
    *NUMERIC_FAMILIES,
]


def register_family(family: Family) -> Family:
    """Add a family to the registry, ahead of the ones already there (so a user's entry
    for a distribution type replaces the built-in one). Returns it, so that it can
    decorate an instance's creation: ``register_family(RayleighFamily())``.

    The family's M step is then chosen for every site whose base distribution is one of
    ``family.dist_types``, its statistics are accumulated online, and its sites'
    log-densities come from the distribution's own ``log_prob`` (or from
    ``linear_form`` when it sets ``has_linear_form``). Plans made before keep the
    family they were made with.
    """
    if not isinstance(family, Family):
        raise TypeError(
            f"register_family: expected an instance of a Family subclass, got {family!r}."
        )
    if not family.name or not family.dist_types:
        raise ValueError(
            f"register_family: {type(family).__name__} needs a name and dist_types "
            "(the NumPyro distribution classes it covers)."
        )
    if family in _REGISTRY:
        _REGISTRY.remove(family)
    _REGISTRY.insert(0, family)
    return family


def registered_families() -> tuple[Family, ...]:
    """Every registered family, the most recently registered first."""
    return tuple(_REGISTRY)


def family_names() -> str:
    """The registered families' names, for error messages: ``"Normal, Poisson, ..."``."""
    return ", ".join(dict.fromkeys(fam.name for fam in reversed(_REGISTRY)))


def unwrap(fn: dist.Distribution) -> dist.Distribution:
    """Strip ``Independent`` and ``ExpandedDistribution`` wrappers."""
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


def find_family(base: Any) -> Family | None:
    """The registry entry for a (base) distribution, or ``None``."""
    for fam in _REGISTRY:
        if type(base) in fam.dist_types:
            return fam
    return None
