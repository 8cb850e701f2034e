r"""The numerical (generalized) M step of sites that have no closed form.

Generalized EM (Dempster, Laird & Rubin 1977) only asks the M step to increase

$$
Q(\theta \mid \theta') = \textstyle\sum_i E_{p(z_i \mid x_i, \theta')}
[\log p(x_i, z_i \mid \theta)] + \log \pi(\theta),
$$

the expected complete-data log-likelihood with the E step's posterior held fixed (plus
the log-prior of global sites: the fit is a posterior mode). Its sites are optimised in
unconstrained space, $\theta = T(u)$ with $T$ = ``biject_to(site.support)``, so every
NumPyro constraint (positive, simplex, interval, ordered, Cholesky factors, ...) holds
exactly after every update; no log-Jacobian is added, so the optimum is the mode in
the constrained space, as in the closed form. The mini-batch's $Q$ is scaled to the data
as the data plate states it: $N$ times its per-datum average, against the log-prior.

Two methods, both pure and jittable, both with their state in the inference state:

``"newton"`` (the default up to `NEWTON_MAX_DIM` unconstrained numbers): a stochastic
Newton step with the online observed information, Titterington's (1984) recursion with
the marginal likelihood's curvature in place of the complete data's,

$$
u_n = u_{n-1} + \gamma_n |\hat H_n|^{-1} \nabla_u \bar q_n(u_{n-1}), \qquad
\hat H_n = \hat H_{n-1} + \gamma_n (H_n - \hat H_{n-1}),
$$

with $H_n = -\nabla^2_u \bar\ell_n(u_{n-1})$ the batch's observed information per
datum ($\bar\ell_n$ its marginal log-likelihood, the E step run again inside the
derivative), kept as a stochastic approximation exactly like a closed-form site's
sufficient statistics (its "statistics"). $|\hat H|$ has the absolute eigenvalues of
$\hat H$, floored at `EIGEN_FLOOR` / sqrt(B) times the largest, so the step is an ascent
direction even where the likelihood is not concave. By Fisher's identity
$\nabla_u \bar q_n(u_{n-1}) = \nabla_u \bar\ell_n(u_{n-1})$, so this is stochastic
Newton ascent on the (penalised) marginal log-likelihood: under the Robbins–Monro
conditions ($\sum\gamma = \infty$, $\sum\gamma^2 < \infty$) the iterates converge to a
stationary point, and Polyak averaging with $\kappa < 1$ gives them the efficient rate.
The complete-data information $-\nabla^2_u \bar q_n$ (Titterington's own choice) is
larger by the missing information, so its steps are shorter, at EM's rate: measured on
the benchmark's mixture of two logistic regressions (`benchmarks/generalized_em.py`,
50k points), one pass ended 0.0146 nats/point short of the batch MLE with it and
0.0003 short with the observed information.

``"optax"`` (above `NEWTON_MAX_DIM`, or with an optimizer of the user's):
``steps`` optimizer steps on the batch's $-\bar q$, under ``lax.scan``, the E-step
posterior held fixed, the optimizer's state carried from one update to the next, and
its updates scaled by the Robbins–Monro decay $\gamma(t) / \gamma(0)$ of the
statistics' schedule. With one step it is stochastic gradient ascent on the marginal
log-likelihood (Fisher's identity), which converges to a stationary point under the
same conditions; Adam's preconditioning keeps it scale-free in practice.

Both end with `cap_step` (a value behind a nonlinear transform moves by at most
`MAX_STEP`) and `ascent` (Armijo backtracking on the batch's $\bar q_n$): every update
increases the batch's expected complete-data log-likelihood, a generalized EM step, so
the full-batch limit never decreases the marginal log-likelihood.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import IdentityTransform, biject_to

from numpyro_onlineem.mstep.base import EStepBatch, MStepContext

NEWTON_MAX_DIM = 256
"""Largest number of unconstrained values a group of numerical sites may have for the
default method to be ``"newton"``: its information matrix is ``p x p``, formed from
``p`` Hessian-vector products and eigen-decomposed at every update. Measured on a
mixture of two logistic regressions, batches of 256, two CPU cores: 2.7 ms per update
at p = 80, 5.7 at 128, 19 at 256, 69 at 512. Above it, one Adam step per update costs
well under a millisecond but converges far more slowly: one pass of 40,000 points of a
mixture of two Poisson regressions in 70 dimensions (140 values) ended 2.2 nats/point
short of the MLE with Adam and 0.02 short with Newton."""

MAX_STEP = 2.0
"""Largest change in one update of an unconstrained value behind a nonlinear transform
(a log-scale, a logit): a scale changes by at most a factor ``e**2``."""

EIGEN_FLOOR = 1e-3
"""Smallest absolute eigenvalue of the information, relative to the largest, for a
batch of one point; a batch of $B$ points floors at ``EIGEN_FLOOR / sqrt(B)``, as the
noise of its score along an eigenvector shrinks. From a poor start the online
information is indefinite, and an eigenvalue that crosses zero on the way to the
optimum passes through tiny values, along whose eigenvector a single point's score took
a whole capped step (`MAX_STEP`). At a floor of 1e-6, 20,000 single points of a
three-component mixture with locations ``5 tanh(u)`` ended 0.28 nats/point short in 3
of 5 data orders (the locations collapsed near point 1,100), where batches of four did
not; at 1e-3 all five are within 0.003 of batches of four. A floor of 1e-3 at every
batch size slowed the flat directions of batches of 256 (a Student-t mixture's degrees
of freedom: one pass of 5,000 points 0.0065 nats/point short of the batch MAP, against
0.0026 at 1e-6)."""

SETTLED_RATIO = 4.0
r"""A Newton group has settled when its Newton decrement per datum, $g^\top |\hat H|^{-1}
g$, is at most this many times its noise level $p / B$ at the optimum (the batch's
score has covariance $I / B$ there, in the information's metric). Before that its
iterates are still in their transient, and a Polyak average over them would keep it:
on a mixture of two Poisson regressions in 60 dimensions (120 values) the decrement
fell from 400 times its noise level to about 1 over the first 20,000 points, and an
average started after 5,120 points (then the default start) ended one pass 0.16
nats/point short where the last iterate was 0.004 short."""


RATIO_MEMORY = 10.0
"""Updates over which `NewtonState.ratio` is a geometric running mean: one batch with
an outlying point (a decrement 20 times the others', seen on a logistic mixture) does
not unsettle a group, and a single low draw in a transient does not settle it."""


class NewtonState(NamedTuple):
    """The ``"newton"`` method's state: the geometric running mean of its Newton
    decrement over its noise level, over about `RATIO_MEMORY` updates (``-1`` before
    the first M step), see `SETTLED_RATIO`."""

    ratio: jax.Array


def _smoothed(previous: jax.Array, ratio: jax.Array) -> jax.Array:
    """`NewtonState.ratio` after one more update's ``ratio``: an exponential moving
    average of its logarithm (the first finite value as it is)."""
    tiny = jnp.finfo(previous.dtype).tiny
    log_new = jnp.log(jnp.maximum(ratio, tiny)).astype(previous.dtype)
    log_prev = jnp.log(jnp.maximum(previous, tiny))
    first = previous < 0
    mean = jnp.where(first, log_new, log_prev + (log_new - log_prev) / RATIO_MEMORY)
    return jnp.where(jnp.isfinite(mean), jnp.exp(mean), previous)


def default_optimizer() -> optax.GradientTransformation:
    """Adam with step 0.05, the ``"optax"`` method's optimizer unless the user gives one."""
    return optax.adam(0.05)


class Numerical(NamedTuple):
    """The numerical M step of a group of estimated sites, optimised jointly.

    Attributes
    ----------
    sites : tuple of str
        The estimated sites it updates.
    constraints : tuple
        Each site's constraint (its support), in the order of ``sites``.
    method : str
        ``"newton"`` or ``"optax"`` (see the module docstring).
    optimizer : optax.GradientTransformation or None
        The ``"optax"`` method's optimizer (``None``: `default_optimizer`).
    steps : int
        Optimizer steps per update (``"optax"``).
    index : int
        Its position among the plan's numerical groups (its state's name).
    """

    sites: tuple
    constraints: tuple
    method: str = "newton"
    optimizer: Any = None
    steps: int = 1
    index: int = 0

    @property
    def name(self) -> str:
        return f"<numerical {self.index}>"

    @property
    def estimated(self) -> tuple:
        return self.sites

    def _unconstrained(self, params: dict) -> dict:
        return {
            n: biject_to(c).inv(params[n])
            for n, c in zip(self.sites, self.constraints, strict=True)
        }

    def _constrained(self, params: dict, u: dict) -> dict:
        new = dict(params)
        for n, c in zip(self.sites, self.constraints, strict=True):
            new[n] = biject_to(c)(u[n]).astype(params[n].dtype)
        return new

    def _objective(self, batch: EStepBatch, params: dict, unravel):
        r"""$u \mapsto \bar q(u)$: the batch's expected complete-data log-likelihood per
        datum, plus the log-prior of the global sites over $N$."""

        def objective(flat: jax.Array) -> jax.Array:
            local, priors = batch.expected_log_joint(self._constrained(params, unravel(flat)))
            prior = sum(priors.values(), jnp.zeros(()))
            return local + prior / batch.total_size

        return objective

    def _marginal(self, batch: EStepBatch, params: dict, unravel):
        r"""$u \mapsto \bar\ell(u)$: the batch's marginal log-likelihood per datum, plus
        the log-prior of the global sites over $N$."""

        def objective(flat: jax.Array) -> jax.Array:
            values = self._constrained(params, unravel(flat))
            _, priors = batch.expected_log_joint(values)
            prior = sum(priors.values(), jnp.zeros(()))
            return batch.log_marginal(values) + prior / batch.total_size

        return objective

    def _optimizer(self) -> optax.GradientTransformation:
        return default_optimizer() if self.optimizer is None else self.optimizer

    def _linear(self) -> list:
        """Per site, whether its transform is the identity (a real site): the cap
        `MAX_STEP` applies to the others."""
        return [isinstance(biject_to(c), IdentityTransform) for c in self.constraints]

    def init(self, params: dict) -> Any:
        if self.method == "newton":
            return NewtonState(jnp.asarray(-1.0, jnp.result_type(float)))
        flat, _ = ravel_pytree(self._unconstrained(params))
        return self._optimizer().init(flat)

    def statistics(self, batch: EStepBatch) -> dict:
        r"""``"newton"``: the batch's observed information at the current value,
        ``{"info": -\nabla^2_u \bar\ell(u') (p, p)}``; ``"optax"``: none (its steps read
        the batch's $Q$ directly)."""
        if self.method != "newton":
            return {}
        flat, unravel = ravel_pytree(self._unconstrained(batch.params))
        info = -jax.hessian(self._marginal(batch, batch.params, unravel))(flat)
        return {"info": 0.5 * (info + info.T)}

    def update(
        self, stats: dict, params: dict, mstep_state: Any, context: MStepContext
    ) -> tuple[dict, Any]:
        u = self._unconstrained(params)
        flat, unravel = ravel_pytree(u)
        objective = self._objective(context.batch, params, unravel)
        value, grad = jax.value_and_grad(objective)(flat)
        if self.method == "newton":
            floor = EIGEN_FLOOR / float(context.batch.batch_size) ** 0.5
            direction = newton_direction(stats["info"], grad, floor)
            noise = flat.size / context.batch.batch_size
            mstep_state = NewtonState(
                _smoothed(mstep_state.ratio, jnp.vdot(grad, direction) / noise)
            )
            step = context.step_size.astype(flat.dtype) * direction
        else:
            optimizer = self._optimizer()
            decay = context.decay.astype(flat.dtype)

            def one(carry, _):
                v, opt_state = carry
                g = jax.grad(lambda w: -objective(w))(v)
                updates, opt_state = optimizer.update(g, opt_state, v)
                return (v + decay * updates, opt_state), None

            (end, mstep_state), _ = jax.lax.scan(one, (flat, mstep_state), None, length=self.steps)
            step = end - flat
        mask = jnp.concatenate(
            [
                jnp.full(jnp.size(ravel_pytree(u[n])[0]), not lin)
                for n, lin in zip(self.sites, self._linear(), strict=True)
            ]
        )
        step = cap_step(step, mask)
        new = flat + ascent(objective, flat, value, grad, step)
        return self._constrained(params, unravel(new)), mstep_state

    def settled(self, mstep_state: Any) -> jax.Array:
        """Whether its iterates have left their transient (`SETTLED_RATIO`; always, for
        the ``"optax"`` method), bool, shape ()."""
        if self.method != "newton":
            return jnp.asarray(True)
        return (mstep_state.ratio >= 0) & (mstep_state.ratio <= SETTLED_RATIO)


def newton_direction(info: jax.Array, gradient: jax.Array, floor: float = EIGEN_FLOOR) -> jax.Array:
    r"""$|H|_+^{-1} g$: the Newton direction with the information ``info`` (``(p, p)``,
    symmetric) made positive definite: its eigenvalues replaced by their absolute
    values, floored at ``floor`` times the largest. ``gradient``: ``(p,)``."""
    evals, evecs = jnp.linalg.eigh(info)
    mag = jnp.abs(evals)
    mag = jnp.maximum(mag, floor * jnp.max(mag) + jnp.finfo(info.dtype).tiny)
    return evecs @ ((evecs.T @ gradient) / mag)


def cap_step(step: jax.Array, capped: jax.Array) -> jax.Array:
    """``step`` (``(p,)``) shrunk, direction kept, so that no value flagged in
    ``capped`` (those behind a nonlinear transform: log-scales, logits) moves by more
    than `MAX_STEP` in one update."""
    largest = jnp.max(jnp.where(capped, jnp.abs(step), 0.0))
    return step * jnp.minimum(1.0, MAX_STEP / jnp.maximum(largest, jnp.finfo(step.dtype).tiny))


def ascent(objective, flat: jax.Array, value: jax.Array, grad: jax.Array, step: jax.Array):
    r"""The largest $\alpha s$, $\alpha \in \{1, 1/2, \dots, 2^{-9}\}$, that increases
    the batch's objective enough (Armijo's condition, up to float rounding):

    $$
    \bar q(u + \alpha s) \ge \bar q(u) + 10^{-4} \alpha \max(g^\top s, 0),
    $$

    or no step. So every update increases the batch's expected complete-data
    log-likelihood: the generalized EM step, whose full-batch limit never decreases the
    marginal log-likelihood. ``flat``, ``grad``, ``step``: ``(p,)``."""
    slope = jnp.maximum(jnp.vdot(grad, step), 0.0)
    tol = 8.0 * jnp.finfo(flat.dtype).eps * (1.0 + jnp.abs(value))

    def accepted(alpha):
        new = objective(flat + alpha * step)
        return jnp.isfinite(new) & (new >= value + 1e-4 * alpha * slope - tol)

    def cond(carry):
        alpha, done, count = carry
        return ~done & (count < 10)

    def body(carry):
        alpha, _, count = carry
        alpha = jnp.where(count > 0, 0.5 * alpha, alpha)
        return alpha, accepted(alpha), count + 1

    alpha, done, _ = jax.lax.while_loop(
        cond, body, (jnp.ones((), flat.dtype), jnp.zeros((), bool), jnp.zeros((), jnp.int32))
    )
    return jnp.where(done, alpha, 0.0) * step
