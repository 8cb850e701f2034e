r"""Data-driven initialisation: k-means++ on the first batch, for component locations.

Which optimum one pass of online EM reaches depends on where it starts, and mixture
components started at identical values never separate. The rule, per estimated site
that is the *location-like* parameter of a component (``Normal``/``MultivariateNormal``
``loc``, ``Poisson``/``Exponential`` ``rate``, ``Bernoulli`` ``probs``, indexed by an
enumerated latent):

* ``init="auto"`` (default): the site is set from k-means++ centres (then 50 Lloyd
  iterations, best of 10 restarts) over the init batch **unless** its initial value was
  chosen on purpose: a ``numpyro.param`` whose initial value differs across
  components. A placeholder such as ``jnp.zeros((K, D))`` is replaced, and so is a
  global site's start, which is drawn from its prior rather than chosen.
* ``init="kmeans++"``: every such site is set from the centres, whatever its value.
* ``init="model"``: nothing is changed; the model's own init values (or prior medians
  for global sites) are used.

Values passed as ``init_params`` to `OnlineEM.init` are never overridden. A site whose
constraint orders its values (``ordered_vector``) gets its centres sorted along the
ordered axis. The data are centred on their mean before k-means, so that float32 data
far from the origin keep their precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from numpyro_onlineem.families import MStepOptions
from numpyro_onlineem.mstep.constraints import base_constraint
from numpyro_onlineem.mstep.plan import Plan
from numpyro_onlineem.mstep.sites import site_grid

INIT_MODES = ("auto", "kmeans++", "model")


@functools.partial(jax.jit, static_argnames=("k", "num_iters", "num_restarts"))
def kmeans_pp(
    rng_key: jax.Array,
    x: jax.Array,
    k: int,
    num_iters: int = 50,
    num_restarts: int = 10,
) -> jax.Array:
    r"""Greedy k-means++ seeding followed by Lloyd iterations; the best of several restarts.

    Each new centre is the best (lowest inertia) of $2 + \lfloor\ln k\rfloor$
    candidates drawn with probability $\propto D(x)^2$, the squared distance to the
    nearest centre so far (Arthur & Vassilvitskii 2007; scikit-learn's default seeding).

    Parameters
    ----------
    rng_key : PRNGKey
    x : Array, shape (n, p)
    k : int
        Number of centres. With fewer than ``k`` points, centres repeat points and are
        jittered by 1e-3 of the data's spread.
    num_iters : int
        Lloyd iterations after seeding.
    num_restarts : int
        Independent seedings; the one with the lowest inertia is returned.

    Returns
    -------
    Array, shape (k, p)

    Notes
    -----
    The points are centred on their mean first: squared distances of float32 data far
    from the origin (``|x|^2 - 2 x c + |c|^2`` at an offset of thousands) would lose the
    spread of the data to cancellation.
    """
    x = jnp.asarray(x)
    mean = jnp.mean(x, axis=0)
    x = x - mean
    keys = jax.random.split(rng_key, num_restarts)
    centers, inertia = jax.vmap(lambda key: _kmeans_once(key, x, k, num_iters))(keys)
    return centers[jnp.argmin(inertia)] + mean


def _kmeans_once(rng_key, x, k, num_iters):
    n = x.shape[0]
    trials = 2 + int(np.log(max(k, 1)))
    key0, key_seed, key_jit = jax.random.split(rng_key, 3)
    first = jax.random.randint(key0, (), 0, n)
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first]) ** 2, -1)

    def seed(i, carry):
        centers, d2, key = carry
        key, sub = jax.random.split(key)
        total = d2.sum()
        p = jnp.where(total > 0, d2 / jnp.where(total > 0, total, 1.0), 1.0 / n)
        cand = jax.random.choice(sub, n, (trials,), p=p)
        cand_d2 = jnp.minimum(d2[None], jnp.sum((x[None] - x[cand][:, None]) ** 2, -1))
        best = jnp.argmin(cand_d2.sum(-1))
        return centers.at[i].set(x[cand[best]]), cand_d2[best], key

    centers, _, _ = jax.lax.fori_loop(1, k, seed, (centers, d2, key_seed))

    def sq_dist(centers):
        return jnp.sum(x * x, -1)[:, None] - 2.0 * x @ centers.T + jnp.sum(centers**2, -1)[None]

    def lloyd(_, centers):
        assign = jax.nn.one_hot(jnp.argmin(sq_dist(centers), -1), k, dtype=x.dtype)
        counts = assign.sum(0)
        means = assign.T @ x / jnp.where(counts > 0, counts, 1.0)[:, None]
        return jnp.where(counts[:, None] > 0, means, centers)

    centers = jax.lax.fori_loop(0, num_iters, lloyd, centers)
    inertia = jnp.sum(jnp.min(sq_dist(centers), -1))
    spread = jnp.std(x, 0) + 1e-12
    jitter = 1e-3 * spread * jax.random.normal(key_jit, centers.shape, x.dtype)
    return jnp.where(n < k, centers + jitter, centers), inertia


def _orders_components(constraint, block_map: np.ndarray, shape: tuple) -> bool:
    """Whether ``constraint`` orders the components: an ordered vector whose last axis
    runs over the components (``block_map`` gives the block of component ``k``)."""
    base = base_constraint(constraint)
    if not isinstance(base, constraints._OrderedVector | constraints._PositiveOrderedVector):
        return False
    first = block_map.reshape(len(block_map), -1)[:, 0]
    return len(shape) >= 1 and np.array_equal(np.diff(first), np.ones(len(first) - 1))


def data_driven_init(
    rng_key: jax.Array,
    plan: Plan,
    params: dict,
    trace,
    mode: str,
    user_set: frozenset,
    options: MStepOptions,
) -> tuple[dict, dict]:
    """Apply the rule of the module docstring.

    Returns
    -------
    params : dict
        Updated initial values.
    report : dict[str, str]
        For each location-like site, where its initial value came from.
    """
    params, report = dict(params), {}
    if mode == "model":
        return params, report
    for sp in plan.sites:
        fam = sp.family
        for role in fam.center_roles:
            pname = sp.learned.get(role)
            if pname is None:
                continue
            if pname in user_set:
                report[pname] = "given in init_params"
                continue
            site = trace[sp.site]
            grid, _ = site_grid(site)
            left = grid[: sp.data_axis]
            enum_axes = [i for i, s in enumerate(left) if s > 1]
            bm = sp.block_maps[role]
            if len(enum_axes) != 1:
                report[pname] = "from the model (not indexed by exactly one enumerated latent)"
                continue
            axis = enum_axes[0]
            k = left[axis]
            bm_k = np.moveaxis(bm, axis, 0).reshape((k,) + bm.shape[len(left) :])
            if len(np.unique(bm_k)) != bm_k.size:
                report[pname] = "from the model (tied across components)"
                continue
            site_info = plan.model_sites.params[pname]
            shape = site_info.shape
            ev = fam.role_event_ndim[role]
            event = tuple(shape[len(shape) - ev :]) if ev else ()
            blocks = np.array(params[pname]).reshape((-1,) + event)
            current = blocks[bm_k]
            deliberate = site_info.kind == "param" and not np.all(current == current[:1])
            if mode == "auto" and deliberate:
                report[pname] = "from the model (it differs across components)"
                continue
            right_event = tuple(bm_k.shape[1:]) + event
            value = jnp.asarray(site["value"])
            value = value.reshape(
                (1,) * (len(grid) + fam.value_event_ndim - value.ndim) + value.shape
            )
            value = jnp.moveaxis(value, sp.data_axis, 0)
            npts = value.shape[0]
            if any(s != 1 for s in value.shape[1 : 1 + len(left)]):
                report[pname] = "from the model (the data vary along enumerated dimensions)"
                continue
            value = value.reshape((npts,) + value.shape[1 + len(left) :])
            if npts < k:
                raise ValueError(
                    f"OnlineEM.init: the init batch has {npts} point(s), too few to place "
                    f"the {k} components of '{pname}' by k-means++ (at least {k}; a few "
                    "hundred give good starts). Pass a larger first batch (OnlineEM.run "
                    "buffers single points for it), give init_params={"
                    f"'{pname}': ...}}, or use OnlineEM(..., init='model')."
                )
            pts = jnp.broadcast_to(value, (npts,) + right_event).reshape((npts, -1))
            rng_key, sub = jax.random.split(rng_key)
            centers = kmeans_pp(sub, pts.astype(blocks.dtype), k=k)
            centers = np.asarray(fam.from_centers(role, centers, options))
            if _orders_components(site_info.constraint, bm_k, shape):
                centers = centers[np.argsort(centers[:, 0])]
            blocks[bm_k] = centers.reshape((k,) + right_event)
            params[pname] = jnp.asarray(blocks.reshape(shape), dtype=params[pname].dtype)
            report[pname] = f"from k-means++ over {npts} points of the init batch"
    return params, report
