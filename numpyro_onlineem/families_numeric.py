r"""Exponential families whose maximiser has no closed form: exact statistics, Newton M step.

``Gamma``, ``Beta``, ``Dirichlet`` and ``VonMises`` observations keep the exact online
statistics (their sufficient statistics are finite: $\sum w \log x$, $\sum w \cos x$,
...), as the closed-form families do. Only the maximisation of the expected complete-data
log-likelihood given those statistics is numerical: a fixed number of safeguarded Newton
steps per parameter block, from the current value. The M step is still the maximiser of
the objective of the running statistics (not of one mini-batch), so the Cappé–Moulines
recursion and its convergence are unchanged.

Every objective here is concave in the parameter (the log-partition function is convex),
and the solvers only ever move to a point of higher objective: at each iteration they
take the best of a few Newton proposals (in $\theta$, $\log\theta$ and $1/\theta$, which
between them cover the regimes where the objective is close to linear in one of those
coordinates, Minka 2002), or the plain Newton step once it is small. Every solver runs
under `iterate`: at most a fixed number of iterations, stopping once no value moves
(relative to itself) by more than a few float roundings; online, from the previous
update's value, that is two or three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln, i0e, i1e, polygamma
from numpyro.distributions import constraints

from numpyro_onlineem.families import (
    Family,
    MStepInputs,
    _keep,
    contract_data,
    finish_role,
    rate_from_log_centers,
    segment_sum,
    take,
)

NUM_NEWTON_ITERS = 12
"""Newton iterations per M step. From a good start (the current value, or the better of
it and a closed-form approximation) 3-5 reach float64 precision; the rest cover a start
far from the maximiser (the first M step after the burn-in)."""

_NEAR = 0.1  # a Newton step below this fraction of the value is taken without a check

_ROUNDINGS = 16.0  # `iterate` stops when no value moves by more than this many epsilons


def iterate(body, x0: jax.Array, num_iters: int) -> jax.Array:
    r"""``x <- body(x)`` from ``x0`` until no element moves by more than `_ROUNDINGS`
    float epsilons relative to itself, at most ``num_iters`` times: the result of
    ``lax.fori_loop(0, num_iters, body, x0)`` up to rounding (a ``body`` that no longer
    moves its argument leaves it where it is), at the cost of the iterations needed.
    ``x0``: any shape."""
    tol = _ROUNDINGS * jnp.finfo(x0.dtype).eps

    def cond(carry):
        i, _, done = carry
        return (i < num_iters) & ~done

    def step(carry):
        i, x, _ = carry
        new = body(i, x)
        moved = jnp.abs(new - x) > tol * jnp.abs(x)
        return i + 1, new, ~jnp.any(moved | jnp.isnan(new))

    init = (jnp.zeros((), jnp.int32), x0, jnp.zeros((), bool))
    return jax.lax.while_loop(cond, step, init)[1]


def _trigamma(x: jax.Array) -> jax.Array:
    return polygamma(1, x)


def _safe_log(x: jax.Array) -> jax.Array:
    """``log x`` floored at the smallest positive normal number (``x = 0`` gives a
    finite value, so that a zero weight times it stays zero)."""
    return jnp.log(jnp.maximum(x, jnp.finfo(jnp.result_type(x)).tiny))


def _pool_last(v: jax.Array, groups: np.ndarray, num: int) -> jax.Array:
    """`segment_sum` over the last axis: ``(..., num_cells) -> (..., num)``."""
    return jnp.moveaxis(segment_sum(jnp.moveaxis(v, -1, 0), groups, num), 0, -1)


def _best(objective, current: jax.Array, proposals: list, event_ndim: int) -> jax.Array:
    """The point of highest objective among ``current`` and the ``proposals`` (each like
    ``current``, ``(num_blocks, *event)``), per block; infeasible proposals (not finite,
    not positive) are skipped."""
    cands = jnp.stack([current, *proposals])
    axes = tuple(range(cands.ndim - event_ndim, cands.ndim))
    valid = jnp.all(jnp.isfinite(cands) & (cands > 0), axis=axes)
    cands = jnp.where(valid.reshape(valid.shape + (1,) * event_ndim), cands, current)
    values = jnp.where(valid, objective(cands), -jnp.inf)
    values = jnp.where(jnp.isnan(values), -jnp.inf, values)
    best = jnp.argmax(values, axis=0)
    return jnp.take_along_axis(cands, best.reshape((1,) + best.shape + (1,) * event_ndim), 0)[0]


def _scalar_proposals(x: jax.Array, grad: jax.Array, hess: jax.Array) -> tuple:
    r"""Newton proposals for the root of $g = f'$ of a concave $f$ of a positive scalar:
    in $x$, in $\log x$ and in $1/x$ (Minka's generalized Newton for the Gamma shape).
    Returns ``(step, [proposals])`` with ``step`` $= -g/h$."""
    step = -grad / hess
    rel = step / x
    in_log = x * jnp.exp(jnp.clip(rel, -30.0, 30.0))
    inv = 1.0 / x - rel / x  # v + g / (x^2 h) with v = 1/x
    in_inv = jnp.where(inv > 0, 1.0 / jnp.where(inv > 0, inv, 1.0), jnp.inf)
    return step, [x + step, in_log, in_inv]


def maximise_positive(objective, grad_hess, x0: jax.Array, num_iters: int = NUM_NEWTON_ITERS):
    r"""Maximise a concave function of one positive scalar per block,
    $\hat x_b = \arg\max_{x > 0} f_b(x)$, by safeguarded Newton steps from ``x0``.

    Parameters
    ----------
    objective : callable
        ``(..., num_blocks) -> (..., num_blocks)``: $f_b$, elementwise over leading axes.
    grad_hess : callable
        ``(num_blocks,) -> ((num_blocks,), (num_blocks,))``: $f'_b$ and $f''_b < 0$.
    x0 : Array, shape (num_blocks,)
        The start (positive).

    Returns
    -------
    Array, shape (num_blocks,)
    """

    def body(_, x):
        g, h = grad_hess(x)
        step, proposals = _scalar_proposals(x, g, h)
        best = _best(objective, x, proposals, 0)
        near = (jnp.abs(step) <= _NEAR * x) & (h < 0)
        return jnp.where(near, x + step, best)

    return iterate(body, x0, num_iters)


def dirichlet_objective(alpha: jax.Array, mean_log: jax.Array) -> jax.Array:
    r"""$f(\alpha) = \log\Gamma(\alpha_0) - \sum_k \log\Gamma(\alpha_k) +
    \sum_k \alpha_k \bar m_k$ (the Dirichlet log-likelihood per point, less
    $\sum_k \bar m_k$), with $\alpha_0 = \sum_k\alpha_k$; ``alpha``:
    ``(..., num_blocks, D)``, ``mean_log``: ``(num_blocks, D)`` the mean of $\log x$."""
    return gammaln(alpha.sum(-1)) - gammaln(alpha).sum(-1) + (alpha * mean_log).sum(-1)


def fit_dirichlet(
    mean_log: jax.Array, alpha0: jax.Array, num_iters: int = NUM_NEWTON_ITERS
) -> jax.Array:
    r"""The Dirichlet maximum-likelihood concentration from the mean of $\log x$,
    $\psi(\alpha_k) - \psi(\alpha_0) = \bar m_k$, by Newton steps from ``alpha0``.

    Minka's $O(D)$ Newton step (the Hessian is $\mathrm{diag}(-\psi'(\alpha_k)) +
    \psi'(\alpha_0) 11^\top$, diagonal plus rank one), in $\alpha$ and multiplicative
    ($\alpha e^{\Delta/\alpha}$); a Newton step on the precision $s = \alpha_0$ with
    the mean $\alpha/s$ held, which moves a start of the wrong scale in one or two steps;
    and the fixed point $\psi(\alpha_k') = \psi(\alpha_0) + \bar m_k$, which always
    increases the objective (Minka 2000, "Estimating a Dirichlet distribution") and
    rescues starts where the Newton step leaves the positive orthant. The best of them is
    kept.

    Parameters
    ----------
    mean_log : Array, shape (num_blocks, D)
    alpha0 : Array, shape (num_blocks, D)
        The start (positive).

    Returns
    -------
    Array, shape (num_blocks, D)
    """
    objective = lambda a: dirichlet_objective(a, mean_log)

    def body(_, a):
        total = a.sum(-1, keepdims=True)
        grad = digamma(total) - digamma(a) + mean_log
        q = -_trigamma(a)
        z = _trigamma(total)
        b = (grad / q).sum(-1, keepdims=True) / (1.0 / z + (1.0 / q).sum(-1, keepdims=True))
        step = -(grad - b) / q
        # the precision s with the mean mu held: f(s) = lgamma(s) - sum lgamma(s mu) + ...
        s, mu = total[..., 0], a / total
        g_s = digamma(s) - (mu * digamma(a)).sum(-1) + (mu * mean_log).sum(-1)
        h_s = _trigamma(s) - (mu * mu * _trigamma(a)).sum(-1)
        _, on_s = _scalar_proposals(s, g_s, h_s)
        proposals = [a + step, a * jnp.exp(jnp.clip(step / a, -30.0, 30.0))]
        proposals += [p[..., None] * mu for p in on_s]
        proposals.append(inverse_digamma(digamma(total) + mean_log))
        best = _best(objective, a, proposals, 1)
        near = jnp.all(jnp.abs(step) <= _NEAR * a, axis=-1, keepdims=True)
        return jnp.where(near, a + step, best)

    return iterate(body, alpha0, num_iters)


def gamma_shape_start(c: jax.Array) -> jax.Array:
    r"""Minka's (2002) approximate Gamma shape from $c = \log\bar x - \overline{\log x}
    \ge 0$: $\alpha \approx (3 - c + \sqrt{(c - 3)^2 + 24 c}) / (12 c)$."""
    return (3.0 - c + jnp.sqrt((c - 3.0) ** 2 + 24.0 * c)) / (12.0 * c)


def inverse_digamma_start(t: jax.Array) -> jax.Array:
    r"""Minka's start for $\psi(\alpha) = t$: $e^t + 1/2$ for $t \ge -2.22$,
    $-1/(t + \gamma)$ below."""
    neg = jnp.minimum(t + 0.5772156649015329, -1e-3)
    return jnp.where(t >= -2.22, jnp.exp(t) + 0.5, -1.0 / neg)


def inverse_digamma(y: jax.Array, num_iters: int = 5) -> jax.Array:
    r"""$\psi^{-1}(y)$ by Newton from Minka's start (`inverse_digamma_start`); five
    iterations reach float64 precision."""

    def body(_, x):
        return jnp.maximum(x - (digamma(x) - y) / _trigamma(x), 0.5 * x)

    return iterate(body, inverse_digamma_start(y), num_iters)


def _better(objective, current: jax.Array, start: jax.Array) -> jax.Array:
    """The better of the current value and a closed-form approximation, per block."""
    return _best(objective, current, [start], 0)


class _NumericFamily(Family):
    maximiser = "exact statistics, Newton maximiser"

    def roles(self, base):
        return {role: (role, getattr(base, role)) for role in self.role_event_ndim}


class GammaFamily(_NumericFamily):
    r"""``Gamma(concentration, rate)``.

    Statistics per cell: $n = \sum w$, $s_1 = \sum w y$, $s_l = \sum w \log y$, with
    $y = \beta x$ when the rate is a constant $\beta$ (so that $y \sim$ Gamma$(\alpha, 1)$)
    and $y = x$ otherwise; with a constant concentration, also $n_\alpha = \sum w\alpha$.

    M step. Both learned (one rate per concentration block): the rate profiled out,
    $\beta(\alpha) = (\alpha n + a - 1)/(s_1 + b)$ ($a = 1, b = 0$ without a prior), and
    $\log\beta(\alpha) - \psi(\alpha) + s_l/n = 0$ solved by Newton (`maximise_positive`)
    from the better of the current value and Minka's approximation; then
    $\beta = \beta(\alpha)$. Concentration alone: $\psi(\alpha) = s_l/n$. Rate alone:
    $\beta = (N n_\alpha + a - 1)/(N s_1 + b)$ under a ``Gamma(a, b)`` prior,
    $n_\alpha / s_1$ without. Roles tied differently are updated one after the other
    (ECM: the concentration given the current rate, then the rate). The concentration has
    no conjugate prior.

    A data-driven start sets the rate from k-means centres of $\log x$ (geometric means
    $c$) as $e^{-\gamma}/c$ ($\gamma$ Euler's constant): the components' mean logarithms
    match the centres where the concentration is 1 (its usual placeholder), and the
    first M step re-fits the rate to whatever concentration holds.
    """

    name = "Gamma"
    dist_types = (dist.Gamma,)
    role_event_ndim = {"concentration": 0, "rate": 0}
    conjugate_priors = {"rate": (dist.Gamma,)}
    center_roles = ("rate",)
    center_space = "log"
    role_support = {"concentration": constraints.positive, "rate": constraints.positive}

    def num_stats(self, base):
        return 3

    def suff_stats(self, value, weight, consts, base):
        y = value * consts["rate"] if "rate" in consts else value
        stats = {
            "n": contract_data(weight),
            "s1": contract_data(weight, y),
            "sl": contract_data(weight, _safe_log(y)),
        }
        if "concentration" in consts:
            stats["na"] = contract_data(weight, consts["concentration"])
        return stats

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        n, s1, sl = (num_data * stats[k] for k in ("n", "s1", "sl"))
        prior = priors.get("rate")
        a, b = (1.0, 0.0) if prior is None else (prior["concentration"], prior["rate"])
        out = {}
        if "concentration" in groups:
            g, nb = groups["concentration"]
            count = segment_sum(n, g, nb)
            safe = jnp.where(count > 0, count, 1.0)
            sum_l = segment_sum(sl, g, nb)
            alpha = current["concentration"]
            profiled = "rate" in groups and _same(groups["rate"], groups["concentration"])
            if profiled:
                sum_1 = jnp.maximum(segment_sum(s1, g, nb), jnp.finfo(s1.dtype).tiny)

                def rate_of(al):
                    return jnp.maximum((al * count + a - 1.0) / (sum_1 + b), 1e-30)

                def objective(al):
                    beta = rate_of(al)
                    f = al * count * jnp.log(beta) - count * gammaln(al) + al * sum_l
                    f = f - beta * sum_1 + (a - 1.0) * jnp.log(beta) - b * beta
                    return f / safe

                def grad_hess(al):
                    grad = count * jnp.log(rate_of(al)) - count * digamma(al) + sum_l
                    hess = count**2 / (al * count + a - 1.0) - count * _trigamma(al)
                    return grad / safe, hess / safe

                c = jnp.maximum(jnp.log(sum_1 / safe) - sum_l / safe, 1e-12)
                start = gamma_shape_start(c)
            else:
                if "rate" in groups:  # ECM: given the current rate of each cell
                    log_rate = jnp.log(take(current["rate"], groups["rate"][0]))
                    sum_l = sum_l + segment_sum(n * log_rate, g, nb)
                t = sum_l / safe
                objective = lambda al: al * t - gammaln(al)
                grad_hess = lambda al: (t - digamma(al), -_trigamma(al))
                start = inverse_digamma_start(t)
            alpha = maximise_positive(objective, grad_hess, _better(objective, alpha, start))
            alpha = jnp.maximum(alpha, options.prob_eps)
            alpha = _keep(count, alpha, current["concentration"], options.min_count)
            out["concentration"] = finish_role(finish, "concentration", alpha, count)
        if "rate" in groups:
            g, nb = groups["rate"]
            if "concentration" in groups:
                na = n * take(out["concentration"], groups["concentration"][0])
            else:
                na = num_data * stats["na"]
            num = segment_sum(na, g, nb) + a - 1.0
            den = segment_sum(s1, g, nb) + b
            count = segment_sum(n, g, nb)
            if prior is not None:
                count = jnp.where(num > 0, jnp.inf, 0.0)
            rate = jnp.maximum(num / jnp.where(den > 0, den, 1.0), options.prob_eps)
            rate = _keep(count, rate, current["rate"], options.min_count)
            out["rate"] = finish_role(finish, "rate", rate, count)
        return out

    def from_centers(self, role, centers, options):
        return rate_from_log_centers(centers, options)


def _same(a: tuple, b: tuple) -> bool:
    """Whether two roles' static groups send every cell to the same block."""
    return a[1] == b[1] and np.array_equal(a[0], b[0])


class BetaFamily(_NumericFamily):
    r"""``Beta(concentration1, concentration0)``.

    Statistics per cell: $n = \sum w$, $l_1 = \sum w \log x$,
    $l_0 = \sum w \log(1 - x)$; with a constant role, also $\sum w c$ for its value $c$
    (taken as the same for every point of a cell, as a parameter is).

    M step: both learned with the same blocks, the two-dimensional Dirichlet fit on
    $(x, 1 - x)$ (`fit_dirichlet`: Newton per block from the current value). One learned,
    or the two tied differently (ECM, one after the other): $\sum_c n_c \psi(a + b_c) -
    n\psi(a) + l_1 = 0$ by `maximise_positive`. No conjugate priors.

    A data-driven start sets ``concentration1`` from k-means centres $m$ as $m/(1 - m)$:
    the components' means match the centres where ``concentration0`` is 1.
    """

    name = "Beta"
    dist_types = (dist.Beta,)
    role_event_ndim = {"concentration1": 0, "concentration0": 0}
    center_roles = ("concentration1",)
    role_support = {"concentration1": constraints.positive, "concentration0": constraints.positive}
    _other = {"concentration1": "concentration0", "concentration0": "concentration1"}
    _log_stat = {"concentration1": "l1", "concentration0": "l0"}

    def num_stats(self, base):
        return 3

    def suff_stats(self, value, weight, consts, base):
        stats = {
            "n": contract_data(weight),
            "l1": contract_data(weight, _safe_log(value)),
            "l0": contract_data(weight, _safe_log(1.0 - value)),
        }
        for role, c in consts.items():
            stats[role] = contract_data(weight, c)
        return stats

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        n = num_data * stats["n"]
        out = {}
        if len(groups) == 2 and _same(groups["concentration1"], groups["concentration0"]):
            g, nb = groups["concentration1"]
            count = segment_sum(n, g, nb)
            safe = jnp.where(count > 0, count, 1.0)[:, None]
            logs = jnp.stack([stats["l1"], stats["l0"]], -1) * num_data
            start = jnp.stack([current["concentration1"], current["concentration0"]], -1)
            ab = fit_dirichlet(segment_sum(logs, g, nb) / safe, start)
            ab = _keep(count, jnp.maximum(ab, options.prob_eps), start, options.min_count)
            for i, role in enumerate(("concentration1", "concentration0")):
                out[role] = finish_role(finish, role, ab[:, i], count)
            return out
        for role in ("concentration1", "concentration0"):
            if role not in groups:
                continue
            g, nb = groups[role]
            other = self._other[role]
            if other in groups:  # ECM: given the other role's latest value
                value = out.get(other, current[other])
                b_cell = take(value, groups[other][0])
            else:
                b_cell = stats[other] / jnp.where(stats["n"] > 0, stats["n"], 1.0)
            count = segment_sum(n, g, nb)
            safe = jnp.where(count > 0, count, 1.0)
            t = segment_sum(num_data * stats[self._log_stat[role]], g, nb) / safe
            frac = n / take(safe, g)  # each cell's share of its block

            def objective(x, g=g, nb=nb, b_cell=b_cell, frac=frac, t=t):
                mixed = _pool_last(frac * gammaln(x[..., g] + b_cell), g, nb)
                return mixed - gammaln(x) + x * t

            def grad_hess(x, g=g, nb=nb, b_cell=b_cell, frac=frac, t=t):
                xc = x[..., g] + b_cell
                grad = _pool_last(frac * digamma(xc), g, nb) - digamma(x) + t
                hess = _pool_last(frac * _trigamma(xc), g, nb) - _trigamma(x)
                return grad, hess

            value = maximise_positive(objective, grad_hess, current[role])
            value = _keep(
                count, jnp.maximum(value, options.prob_eps), current[role], options.min_count
            )
            out[role] = finish_role(finish, role, value, count)
        return out

    def from_centers(self, role, centers, options):
        m = jnp.clip(centers, 0.05, 0.95)
        return m / (1.0 - m)


class DirichletFamily(_NumericFamily):
    r"""``Dirichlet(concentration)`` observations.

    Statistics per cell: $n = \sum w$ and $l = \sum w \log x$ (a $D$-vector). M step:
    `fit_dirichlet` on $l / n$ per block, from the current value. No conjugate prior.

    A data-driven start sets the concentration from k-means centres $m$ (points of the
    simplex) as $10 D\, m$: the components' means match the centres, with a moderate
    precision that the first M steps re-fit.
    """

    name = "Dirichlet"
    dist_types = (dist.Dirichlet,)
    value_event_ndim = 1
    role_event_ndim = {"concentration": 1}
    center_roles = ("concentration",)
    role_support = {"concentration": constraints.independent(constraints.positive, 1)}

    def num_stats(self, base):
        return 1 + base.concentration.shape[-1]

    def suff_stats(self, value, weight, consts, base):
        return {
            "n": contract_data(weight),
            "l": contract_data(weight[..., None], _safe_log(value)),
        }

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        g, nb = groups["concentration"]
        count = segment_sum(num_data * stats["n"], g, nb)
        safe = jnp.where(count > 0, count, 1.0)[:, None]
        mean_log = segment_sum(num_data * stats["l"], g, nb) / safe
        alpha = fit_dirichlet(mean_log, current["concentration"])
        alpha = jnp.maximum(alpha, options.prob_eps)
        alpha = _keep(count, alpha, current["concentration"], options.min_count)
        return {"concentration": finish_role(finish, "concentration", alpha, count)}

    def from_centers(self, role, centers, options):
        m = jnp.maximum(centers, 1e-3)
        m = m / m.sum(-1, keepdims=True)
        return 10.0 * m.shape[-1] * m


def mean_resultant_ratio(kappa: jax.Array) -> jax.Array:
    r"""$A(\kappa) = I_1(\kappa)/I_0(\kappa)$, from the scaled Bessel functions."""
    return i1e(kappa) / i0e(kappa)


def _ratio_derivative(kappa: jax.Array, ratio: jax.Array) -> jax.Array:
    r"""$A'(\kappa) = 1 - A/\kappa - A^2$; above $\kappa = 50$ its asymptotic series
    $\frac{1}{2\kappa^2} + \frac{1}{4\kappa^3} + \frac{3}{8\kappa^4} +
    \frac{25}{32\kappa^5}$ (the exact form cancels there)."""
    exact = 1.0 - ratio / kappa - ratio**2
    inv = 1.0 / kappa
    series = inv**2 * (0.5 + inv * (0.25 + inv * (0.375 + inv * 25.0 / 32.0)))
    return jnp.where(kappa > 50.0, series, exact)


def fit_von_mises_concentration(
    r_bar: jax.Array, kappa0: jax.Array, num_iters: int = NUM_NEWTON_ITERS
) -> jax.Array:
    r"""The von Mises concentration of mean resultant length $\bar R$:
    $A(\kappa) = \bar R$, i.e. $\arg\max_\kappa \kappa \bar R - \log I_0(\kappa)$, by
    Newton from the better of ``kappa0`` and the approximation
    $\bar R (2 - \bar R^2)/(1 - \bar R^2)$ (Banerjee et al. 2005).

    Parameters
    ----------
    r_bar : Array, shape (num_blocks,)
        In $[0, 1)$.
    kappa0 : Array, shape (num_blocks,)

    Returns
    -------
    Array, shape (num_blocks,)
    """
    # kappa (R - 1) - log i0e(kappa): the objective without the kappa of I0's scaling
    objective = lambda k: k * (r_bar - 1.0) - jnp.log(i0e(k))

    def grad_hess(k):
        ratio = mean_resultant_ratio(k)
        return r_bar - ratio, -_ratio_derivative(k, ratio)

    start = r_bar * (2.0 - r_bar**2) / (1.0 - r_bar**2)
    start = jnp.maximum(start, 1e-6)
    return maximise_positive(objective, grad_hess, _better(objective, kappa0, start), num_iters)


def _wrap(angle: jax.Array) -> jax.Array:
    r"""An angle mapped into $[-\pi, \pi]$ (angles already there are unchanged)."""
    wrapped = jnp.mod(angle + jnp.pi, 2.0 * jnp.pi) - jnp.pi
    return jnp.where(jnp.abs(angle) <= jnp.pi, angle, wrapped)


class VonMisesFamily(_NumericFamily):
    r"""``VonMises(loc, concentration)``.

    Statistics per cell: $n = \sum w$, $C = \sum w \kappa' \cos x'$,
    $S = \sum w \kappa' \sin x'$, with $x' = x - \mu$ for a constant location $\mu$
    ($x' = x$ otherwise) and $\kappa'$ a constant concentration ($1$ otherwise).

    M step: $\mu = \operatorname{atan2}(S, C)$ (pooled over the cells of a block, each
    weighed by its current concentration); then $\kappa$ solves
    $A(\kappa) = I_1(\kappa)/I_0(\kappa) = \bar R$ with
    $\bar R = (C\cos\mu + S\sin\mu)/n$ (`fit_von_mises_concentration`), from the current
    value. A damped location moves along the shorter arc. No conjugate priors.

    A data-driven start sets the location from k-means centres of the angles (the
    wrap-around at $\pm\pi$ is ignored there; EM moves across it).
    """

    name = "VonMises"
    dist_types = (dist.VonMises,)
    role_event_ndim = {"loc": 0, "concentration": 0}
    center_roles = ("loc",)
    role_support = {"loc": constraints.circular, "concentration": constraints.positive}

    def num_stats(self, base):
        return 3

    def suff_stats(self, value, weight, consts, base):
        x = value - consts["loc"] if "loc" in consts else value
        w = weight * consts["concentration"] if "concentration" in consts else weight
        return {
            "n": contract_data(weight),
            "c": contract_data(w, jnp.cos(x)),
            "s": contract_data(w, jnp.sin(x)),
        }

    def m_step(self, stats: dict, inputs: MStepInputs) -> dict:
        groups, current, priors, num_data, options, attrs, reparams, shift, finish = inputs
        n, c, s = (num_data * stats[k] for k in ("n", "c", "s"))
        out = {}
        if "loc" in groups:
            g, nb = groups["loc"]
            kappa = (
                take(current["concentration"], groups["concentration"][0])
                if ("concentration" in groups)
                else 1.0
            )
            count = segment_sum(n, g, nb)
            loc = jnp.arctan2(segment_sum(kappa * s, g, nb), segment_sum(kappa * c, g, nb))
            loc = _keep(count, loc, current["loc"], options.min_count)
            # the short way round, so that a damped step stays between the two angles
            loc = current["loc"] + _wrap(loc - current["loc"])
            out["loc"] = _wrap(finish_role(finish, "loc", loc, count))
        if "concentration" in groups:
            g, nb = groups["concentration"]
            mu = take(out["loc"], groups["loc"][0]) if "loc" in groups else 0.0
            count = segment_sum(n, g, nb)
            safe = jnp.where(count > 0, count, 1.0)
            r_bar = segment_sum(c * jnp.cos(mu) + s * jnp.sin(mu), g, nb) / safe
            eps = jnp.finfo(r_bar.dtype).eps
            r_bar = jnp.clip(r_bar, 0.0, 1.0 - 16 * eps)
            kappa = fit_von_mises_concentration(r_bar, current["concentration"])
            kappa = jnp.maximum(kappa, options.prob_eps)
            kappa = _keep(count, kappa, current["concentration"], options.min_count)
            out["concentration"] = finish_role(finish, "concentration", kappa, count)
        return out

    def from_centers(self, role, centers, options):
        return _wrap(centers)


NUMERIC_FAMILIES = (GammaFamily(), BetaFamily(), DirichletFamily(), VonMisesFamily())
"""The built-in families with a Newton M step, registered by `numpyro_onlineem.families`."""
