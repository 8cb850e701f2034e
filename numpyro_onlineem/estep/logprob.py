r"""Log-densities of recognised exponential families as matrix products.

A site such as ``Normal(locs[z], scales[z]).to_event(1)`` has a log-probability tensor
of shape ``(K, batch)`` that NumPyro computes elementwise over ``(K, batch, D)`` and
then sums over ``D``. Written in exponential-family form,

$$
\sum_{e} \log p(x_{be} \mid \theta_{ke})
= \sum_j \sum_e T_j(x_{be})\, \eta_j(\theta_{ke})
- \sum_e A(\theta_{ke}) + \sum_e \log h(x_{be}),
$$

each sum over the reinterpreted (event) dimensions $e$ of a product of a data term
and a parameter term is a matrix product, which never forms the ``(K, batch, D)``
tensor. This is how hand-written mixture code computes its densities (scikit-learn's
``GaussianMixture`` does the same for diagonal covariances).

Only sites with reinterpreted dimensions (``to_event``) of a family that gives a
``linear_form`` take this path, and ``MultivariateNormal`` sites of up to
``WHITEN_MAX_DIM`` dimensions (through their whitening matrices); ``Beta`` sites are
written out (`beta_log_prob`); every other site uses the distribution's own
``log_prob``. The Gaussian forms are written about a centre:
the reference point of the statistics when the caller gives one, else the mean
location over components, so that float32 cancellation stays at the scale of the
spread of the data, not of its distance from the origin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import betaln, xlogy

from numpyro_onlineem.families import find_family, unwrap

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Above this dimension NumPyro's own MultivariateNormal.log_prob (one triangular solve
# with every datum as a right-hand side) is faster than whitening on the CPU (measured:
# 1.4x faster at D = 64, 1.7x slower at D = 8, even at D = 32; K = 20, batches of 256).
WHITEN_MAX_DIM = 24
# Up to this many event elements, the pairs of an exponential-family form are contracted
# as one concatenated matrix product, above it one product per pair (XLA:CPU, K = 5-20,
# batches of 256, against the hand-written products: concatenated 0.92 vs 0.86 at
# D = 64, K = 20 and 0.83 vs 0.77 at D = 2; separate 0.88-1.00 vs 0.84-0.89 at D = 256).
CONCAT_MAX_EVENT = 128


def align(arr: jax.Array, ndim: int) -> jax.Array:
    """Prepend size-one axes up to ``ndim`` (NumPy broadcasting, made explicit)."""
    arr = jnp.asarray(arr)
    return arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)


def contract_trailing(a: jax.Array, b: jax.Array, num: int) -> jax.Array:
    r"""$\sum_e a_{\dots e}\, b_{\dots e}$ over the last ``num`` axes of two arrays of
    the same ndim that broadcast together, without materialising the broadcast.

    Size-one axes are dropped from the einsum, so ``(1, B, D) x (K, 1, D)`` runs as a
    ``(B, D) @ (D, K)`` matrix product, the larger operand on the left: on XLA:CPU that
    is 1.2-1.7x faster than ``(K, D) @ (D, B)`` (K = 5-20, D = 64-256, B = 256).
    Returns the broadcast leading shape.
    """
    nd = a.ndim
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    if a.size < b.size:
        a, b = b, a
    subs, arrays, free = [], [], []
    for op in (a, b):
        keep = [i for i in range(nd) if op.shape[i] != 1]
        arrays.append(op.reshape([op.shape[i] for i in keep]))
        subs.append("".join(_LETTERS[i] for i in keep))
        free += [i for i in keep if i < nd - num and i not in free]
    out = jnp.einsum(",".join(subs) + "->" + "".join(_LETTERS[i] for i in free), *arrays)
    perm = np.argsort(free)
    if not np.array_equal(perm, np.arange(len(free))):
        # the barrier keeps XLA from folding the transpose back into the product
        # (which it would compute as the slower small-times-large-transposed form)
        out = jnp.transpose(jax.lax.optimization_barrier(out), perm)
    return out.reshape(tuple(shape[: nd - num]))


def contract_pairs(pairs: list, num: int) -> jax.Array:
    r"""$\sum_j \sum_e T_{j,\dots e}\, \eta_{j,\dots e}$ over the last ``num`` axes.

    Up to ``CONCAT_MAX_EVENT`` event elements, as one matrix product: the data terms
    $T_j$ and the parameter terms $\eta_j$ are each concatenated along the (flattened)
    event axes, which saves the per-product overhead of small products. Above, one
    product per pair, which saves writing the concatenated data."""
    if len(pairs) == 1:
        return contract_trailing(*pairs[0], num)
    ts, etas = [t for t, _ in pairs], [e for _, e in pairs]
    nd = ts[0].ndim
    lead_t = jnp.broadcast_shapes(*(t.shape[: nd - num] for t in ts))
    lead_e = jnp.broadcast_shapes(*(e.shape[: nd - num] for e in etas))
    event = jnp.broadcast_shapes(*(a.shape[nd - num :] for a in ts + etas))
    size = int(np.prod(event, dtype=int))
    if size > CONCAT_MAX_EVENT:
        return sum(contract_trailing(t, e, num) for t, e in pairs)

    def stack(arrays, lead):
        flat = [jnp.broadcast_to(a, lead + event).reshape(lead + (size,)) for a in arrays]
        return jnp.concatenate(flat, axis=-1)

    return contract_trailing(stack(ts, lead_t), stack(etas, lead_e), 1)


def sum_trailing(a, grid: tuple, num: int) -> jax.Array:
    """Sum of ``a`` (broadcast to ``grid``) over the last ``num`` axes, computed on
    ``a``'s own shape: a size-one axis counts as many times as the grid is long there."""
    nd = len(grid)
    a = align(a, nd)
    axes = tuple(range(nd - num, nd))
    factor = float(np.prod([grid[i] for i in axes if a.shape[i] == 1 and grid[i] != 1]))
    return jnp.sum(a, axis=axes) * factor


def fast_log_prob(
    fn: dist.Distribution, value: jax.Array, center: jax.Array | None = None
) -> jax.Array | None:
    """``fn.log_prob(value)`` by matrix products where ``fn`` qualifies (see the module
    docstring), else ``None``. ``center``: the point the Gaussian forms are written
    about, broadcastable to ``value`` aligned to the site's grid (``None``: the mean
    location over components)."""
    base = unwrap(fn)
    if type(base) is dist.MultivariateNormal:
        if base.event_shape[-1] > WHITEN_MAX_DIM:
            return None
        return whitened_log_prob(fn, base, value, center)
    if type(base) is dist.Beta and _only_expanded(fn):
        return jnp.broadcast_to(beta_log_prob(base, value), fn.batch_shape)
    return linear_log_prob(fn, value, center)


def _only_expanded(fn: dist.Distribution) -> bool:
    """Whether ``fn`` is its base distribution, or that expanded (no mask, no event)."""
    while isinstance(fn, dist.ExpandedDistribution):
        fn = fn.base_dist
    return type(fn) is dist.Beta


def beta_log_prob(base: dist.Beta, value: jax.Array) -> jax.Array:
    r"""$(a - 1) \log x + (b - 1) \log(1 - x) - \log B(a, b)$, what ``Beta.log_prob``
    gives, written out: NumPyro's (through ``Dirichlet.log_prob`` of the stacked
    ``[x, 1 - x]``) was miscompiled by XLA:CPU (jaxlib 0.10.2) on a ``(K, batch)`` grid
    of more than 32,768 elements, silently: a 3-component Beta mixture's
    log-likelihood of 20,000 points averaged 14.9 nats/point against the true 0.18."""
    a, b = base.concentration1, base.concentration0
    return xlogy(a - 1.0, value) + xlogy(b - 1.0, 1.0 - value) - betaln(a, b)


def whitened_log_prob(
    fn: dist.Distribution,
    base: dist.MultivariateNormal,
    value: jax.Array,
    center: jax.Array | None = None,
) -> jax.Array:
    r"""``MultivariateNormal`` log-density through its whitening matrices
    $U_k = L_k^{-\top}$ (one triangular solve per component, not per datum):
    $\log p(x \mid k) = -\tfrac12 \lVert (x - \mu_k) U_k \rVert^2
    - \sum_i \log L_{k,ii} - \tfrac D2 \log 2\pi$, with $(x - \mu_k) U_k$ a matrix
    product for all data at once."""
    value = jnp.asarray(value)
    lp_shape = tuple(
        jnp.broadcast_shapes(tuple(fn.batch_shape), value.shape[: value.ndim - fn.event_dim])
    )
    num = len(fn.event_shape) - 1
    grid = lp_shape + tuple(fn.event_shape[:num])
    nd = len(grid)
    d = base.event_shape[-1]
    ftype = jnp.result_type(float)
    tril = align(base.scale_tril, nd + 2).astype(ftype)
    loc = align(base.loc, nd + 1).astype(ftype)
    x = align(value, nd + 1).astype(ftype)
    if center is None:
        center = jnp.mean(loc, axis=tuple(range(nd)), keepdims=True)
    eye = jnp.broadcast_to(jnp.eye(d, dtype=ftype), tril.shape)
    whiten = jnp.swapaxes(jax.scipy.linalg.solve_triangular(tril, eye, lower=True), -1, -2)
    y = _matvec(x - center, whiten) - _matvec(loc - center, whiten)
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(tril, axis1=-2, axis2=-1)), -1)
    lp = -0.5 * jnp.sum(y * y, -1) - half_log_det - 0.5 * d * jnp.log(2.0 * jnp.pi)
    return jnp.broadcast_to(sum_trailing(lp, grid, num), lp_shape)


def _matvec(v: jax.Array, m: jax.Array) -> jax.Array:
    """``v[..., d] @ m[..., d, e]`` broadcast over the leading axes, as a matrix product
    (size-one leading axes are dropped from the einsum)."""
    nd = v.ndim - 1
    shape = jnp.broadcast_shapes(v.shape[:-1], m.shape[:-2])
    vs = [i for i in range(nd) if v.shape[i] != 1]
    ms = [i for i in range(nd) if m.shape[i] != 1]
    out = [i for i in range(nd) if shape[i] != 1]
    sub = lambda axes: "".join(_LETTERS[i] for i in axes)
    res = jnp.einsum(
        f"{sub(vs)}y,{sub(ms)}yz->{sub(out)}z",
        v.reshape([v.shape[i] for i in vs] + [v.shape[-1]]),
        m.reshape([m.shape[i] for i in ms] + list(m.shape[-2:])),
    )
    return res.reshape(tuple(shape) + (m.shape[-1],))


def linear_log_prob(
    fn: dist.Distribution, value: jax.Array, center: jax.Array | None = None
) -> jax.Array | None:
    """``fn.log_prob(value)`` by matrix products, or ``None`` when ``fn`` does not
    qualify (no reinterpreted dimensions, or a family without a linear form).

    Parameters
    ----------
    fn : Distribution
        ``Independent`` (possibly over ``ExpandedDistribution``) of a scalar family.
    value : Array
        Broadcastable to ``fn.batch_shape + fn.event_shape``.
    center : Array, optional
        Passed to the family's ``linear_form``.

    Returns
    -------
    Array or None
        Shape ``broadcast(fn.batch_shape, value.shape[:-event_dim])``.
    """
    base = unwrap(fn)
    family = find_family(base)
    if family is None or family.value_event_ndim or not family.has_linear_form:
        return None
    num = len(fn.event_shape) - len(base.event_shape)
    if num == 0:
        return None
    value = jnp.asarray(value)
    lp_shape = tuple(
        jnp.broadcast_shapes(tuple(fn.batch_shape), value.shape[: value.ndim - fn.event_dim])
    )
    grid = lp_shape + tuple(fn.event_shape[:num])
    nd = len(grid)
    ftype = jnp.result_type(float)
    params = {role: align(arr, nd).astype(ftype) for role, (_, arr) in family.roles(base).items()}
    x = align(value, nd).astype(ftype)
    pairs, a, log_h = family.linear_form(x, params, num, center)
    lp = contract_pairs(pairs, num)
    lp = lp - sum_trailing(a, grid, num) + sum_trailing(log_h, grid, num)
    return jnp.broadcast_to(lp, lp_shape)
