r"""Data-driven initialisation: k-means++ on the first batch, for component locations.

Which optimum one pass of online EM reaches depends on where it starts, and mixture
components started at identical values never separate. The rule, per estimated site
that is the *location-like* parameter of a component (``Normal``/``MultivariateNormal``
``loc``, ``Poisson``/``Exponential`` ``rate``, ``Bernoulli`` ``probs``, indexed by an
enumerated latent):

* ``init="auto"`` (default): the site is set from k-means++ centres (then up to 50
  Lloyd iterations, best of 10 or 50 restarts, `init_restarts`; on the host, in NumPy)
  over the init batch **unless** its initial value was
  chosen on purpose: a ``numpyro.param`` whose initial value differs across
  components (an ``ordered_vector`` site's always does, so it does not count), and
  which gives every component data: some point of the init batch nearest to it. A
  placeholder such as ``jnp.zeros((K, D))`` is replaced, and so is a global site's
  start, which is drawn from its prior rather than chosen, and a value such as
  ``jnp.linspace(-1, 1, K)`` when the data lie far from it (at an offset of 1e3 every
  point is nearest to one end: the other components would explain no data, and EM
  never moves a component that explains none).
* ``init="kmeans++"``: every such site is set from the centres, whatever its value.
* ``init="model"``: nothing is changed; the model's own init values (or prior medians
  for global sites) are used.

Values passed as ``init_params`` to `OnlineEM.init` are never overridden: a component
that no point of the init batch is nearest to gets a ``RuntimeWarning`` there.
``init="model"`` checks nothing (it runs no k-means and no extra trace). A site whose
constraint orders its values (``ordered_vector``) gets its centres sorted along the
ordered axis; a site whose prior's mean differs across components gets, for each
component, the centre nearest that mean (`_match_prior`); otherwise, when the latent's
mixture weights are unequal at the start (fixed, given or chosen), the centres are
matched to them by cluster size (`_match_weights`). The data are centred on their mean
before k-means, so that float32 data far from the origin keep their precision. A
family of positive, skewed data clusters their logarithms instead
(`numpyro_onlineem.families.Family.center_space`: Exponential, Gamma).
"""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from numpyro.distributions import constraints

from numpyro_onlineem.families import MStepOptions, unwrap
from numpyro_onlineem.mstep.constraints import base_constraint
from numpyro_onlineem.mstep.plan import Plan
from numpyro_onlineem.mstep.sites import log_prob_shape, site_grid

INIT_MODES = ("auto", "kmeans++", "model")


def kmeans_pp(
    rng_key: jax.Array,
    x: ArrayLike,
    k: int,
    num_iters: int = 50,
    num_restarts: int = 10,
) -> np.ndarray:
    r"""Greedy k-means++ seeding followed by Lloyd iterations; the best of several restarts.

    Each new centre is the best (lowest inertia) of $2 + \lfloor\ln k\rfloor$
    candidates drawn with probability $\propto D(x)^2$, the squared distance to the
    nearest centre so far (Arthur & Vassilvitskii 2007; scikit-learn's default seeding).

    Parameters
    ----------
    rng_key : PRNGKey
        Seeds the host's random generator.
    x : array-like, shape (n, p)
    k : int
        Number of centres. With fewer than ``k`` points, centres repeat points and are
        jittered by 1e-3 of the data's spread.
    num_iters : int
        Most Lloyd iterations after seeding (fewer when the assignment stops changing).
    num_restarts : int
        Independent seedings; the one with the lowest inertia is returned.

    Returns
    -------
    numpy.ndarray, shape (k, p), the dtype of ``x``

    Notes
    -----
    It runs on the host, in NumPy float64: on the few hundred points of an init batch
    it takes milliseconds, where compiling it with XLA took seconds (1-2.5 s on two CPU
    cores, most of a fresh fit's wait). The points are centred on their mean first:
    squared distances of data far from the origin (``|x|^2 - 2 x c + |c|^2`` at an
    offset of thousands) would otherwise lose the spread of the data to cancellation.
    """
    return _kmeans(host_rng(rng_key), x, k, num_iters, num_restarts)


def host_rng(rng_key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key (raw or typed)."""
    data = rng_key if rng_key.dtype == np.uint32 else jax.random.key_data(rng_key)
    return np.random.default_rng(np.asarray(data).ravel().tolist())


def _kmeans(rng, x, k, num_iters, num_restarts) -> np.ndarray:
    x_in = np.asarray(x)
    x = x_in.astype(np.float64).reshape(len(x_in), -1)
    mean = x.mean(axis=0)
    x = x - mean
    best, best_inertia = None, np.inf
    for _ in range(num_restarts):
        centers, inertia = _kmeans_once(rng, x, k, num_iters)
        if best is None or inertia < best_inertia:
            best, best_inertia = centers, inertia
    return (best + mean).reshape((k,) + x_in.shape[1:]).astype(x_in.dtype)


def _kmeans_once(rng: np.random.Generator, x: np.ndarray, k: int, num_iters: int):
    n = x.shape[0]
    trials = 2 + int(np.log(max(k, 1)))
    first = rng.integers(n)
    centers = np.repeat(x[first][None], k, axis=0)
    d2 = np.sum((x - x[first]) ** 2, -1)
    for i in range(1, k):
        total = d2.sum()
        p = d2 / total if total > 0 else np.full(n, 1.0 / n)
        cand = rng.choice(n, trials, p=p)
        cand_d2 = np.minimum(d2[None], np.sum((x[None] - x[cand][:, None]) ** 2, -1))
        best = np.argmin(cand_d2.sum(-1))
        centers[i], d2 = x[cand[best]], cand_d2[best]

    sq = np.sum(x * x, -1)
    dist = lambda c: _sq_distances(x, c, sq)
    assign = None
    for _ in range(num_iters):
        new_assign = np.argmin(dist(centers), -1)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        onehot = assign[:, None] == np.arange(k)[None]
        counts = onehot.sum(0)
        sums = onehot.T.astype(x.dtype) @ x
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    inertia = float(np.sum(np.maximum(np.min(dist(centers), -1), 0.0)))
    if n < k:
        centers = centers + 1e-3 * (x.std(0) + 1e-12) * rng.standard_normal(centers.shape)
    return centers, inertia


SMALL_KMEANS_WORK = 1e6
"""``n k D`` up to which the init's k-means++ takes 50 restarts instead of 10."""


def init_restarts(n: int, k: int, d: int) -> int:
    """Restarts of the init's k-means++: 50 for a small problem (``n k D`` up to
    `SMALL_KMEANS_WORK`, a fraction of a second on the host), else 10.

    In many dimensions one k-means++ run rarely finds the best clustering of a few
    hundred points: on 256 points of a D=64, K=10 mixture (Dirichlet(5) weights), 3-5 %
    of single runs reached the lowest inertia, and online EM does not undo a merged
    pair of components. From 10 restarts, 3 of 6 default fits of the fresh-fit benchmark
    ended 0.45 nats/point short of the batch optimum; from 50, all 6 reached it.
    """
    return 50 if n * k * d <= SMALL_KMEANS_WORK else 10


def _component_weights(trace, site: dict, axis: int, k: int) -> np.ndarray | None:
    """The mixture weights of the enumerated latent along grid ``axis`` of ``site``,
    when they are one vector of ``k`` unequal probabilities (a fixed, given or
    deliberate start); ``None`` otherwise (equal weights: any order of the centres
    will do)."""
    dim = axis - len(log_prob_shape(site))
    name = site["infer"].get("dim_to_name", {}).get(dim)
    if name is None or name not in trace:
        return None
    fn = trace[name]["fn"]
    probs = getattr(unwrap(fn), "probs", None)
    if probs is None:
        return None
    probs = np.asarray(probs, np.float64)
    if probs.size != k:
        return None
    probs = probs.reshape(k)
    if np.allclose(probs, probs[0], rtol=1e-6, atol=0.0):
        return None
    return probs


def _sq_distances(x: np.ndarray, centers: np.ndarray, x_sq: np.ndarray | None = None):
    """Squared distances ``(n, k)`` of points to centres (``x_sq``: the points' squared
    norms, when already computed)."""
    if x_sq is None:
        x_sq = np.sum(x * x, -1)
    return x_sq[:, None] - 2.0 * x @ centers.T + np.sum(centers * centers, -1)[None]


def _cluster_sizes(pts: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """How many of the points ``(n, p)`` have each of the centres ``(k, p)`` as their
    nearest, ``(k,)``; distances about the points' mean (no cancellation)."""
    pts = pts.astype(np.float64)
    mean = pts.mean(axis=0)
    d2 = _sq_distances(pts - mean, centers.astype(np.float64) - mean)
    return np.bincount(np.argmin(d2, -1), minlength=len(centers))


def _match_weights(
    centers: np.ndarray, means: np.ndarray, pts: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Reorder the initial values ``centers`` of k-means clusters (``means``, centres
    of ``pts`` in the space k-means ran in) so that the component with the ``j``-th
    largest weight gets the ``j``-th largest cluster of the init batch: a fixed or given
    weight then describes a cluster of about its size (with the centres in k-means' own
    order, a fixed weight of 0.2 could sit on the cluster of half the data, a start that
    EM does not undo)."""
    sizes = _cluster_sizes(pts, means)
    out = np.empty_like(centers)
    out[np.argsort(-weights, kind="stable")] = centers[np.argsort(-sizes, kind="stable")]
    return out


def _prior_component_means(trace, pname: str, shape: tuple, event: tuple, bm_k: np.ndarray):
    """The mean of a sampled site's prior per component, ``(k, p)``, when it differs
    across components (a prior that labels them), else ``None``."""
    site = trace.get(pname)
    if site is None or site["type"] != "sample" or site.get("is_observed"):
        return None
    try:
        mean = np.broadcast_to(np.asarray(site["fn"].mean, np.float64), shape)
    except (NotImplementedError, AttributeError, ValueError):
        return None
    means = mean.reshape((-1,) + event)[bm_k].reshape(bm_k.shape[0], -1)
    if not np.all(np.isfinite(means)) or np.all(means == means[:1]):
        return None
    return means


def _match_prior(centers: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Reorder k-means centres so that each component gets the centre nearest its
    prior's mean: the assignment of least summed squared distance (every permutation up
    to 6 components, the closest remaining pair first above). A prior with component
    means at -4, 0 and 4 labels the components; started in k-means' own order, the
    component whose prior sat at -4 ended at +4, 0.22 nats/point below the truth's
    log-joint density (prior scale 0.1)."""
    k = len(centers)
    cost = np.sum((centers[:, None, :] - means[None, :, :]) ** 2, -1)  # (centre, component)
    if k <= 6:
        perms = np.array(list(itertools.permutations(range(k))))
        order = perms[np.argmin(cost[perms, np.arange(k)].sum(1))]
    else:
        order = np.empty(k, int)
        cost = cost.astype(np.float64)
        for _ in range(k):
            c, j = np.unravel_index(np.argmin(cost), cost.shape)
            order[j] = c
            cost[c, :], cost[:, j] = np.inf, np.inf
    return centers[order]


MIN_POINTS_PER_COMPONENT = 10
"""Init-batch points per component below which `_without_data` finds none: a component
of weight ``1 / k`` is then nearest to none of ``10 k`` points with probability at
most ``e**-10``."""


def _without_data(centers: np.ndarray, pts: np.ndarray) -> list:
    """The components (indices into ``centers``, ``(k, p)``) whose centre no point of
    the init batch (``pts``, ``(n, p)``) has as its nearest: started there, a component
    explains no data, and EM does not revive it. Components that start at one centre
    share its points (other roles, such as their scales, tell them apart)."""
    if len(pts) < MIN_POINTS_PER_COMPONENT * len(centers):  # too few to tell
        return []
    if not (np.all(np.isfinite(pts)) and np.all(np.isfinite(centers))):
        return []
    distinct, which = np.unique(centers.astype(np.float64), axis=0, return_inverse=True)
    counts = _cluster_sizes(pts, distinct)
    return [int(i) for i in np.flatnonzero(counts[np.ravel(which)] == 0)]


def _warn_without_data(pname: str, empty: list, source: str) -> None:
    if empty:
        warnings.warn(
            f"OnlineEM.init: the initial value of '{pname}' ({source}) leaves component(s) "
            f"{empty} with no point of the init batch nearest to them: started there, they "
            "explain no data and EM will not move them (their weights go to zero). Start "
            "from the data: OnlineEM(..., init='kmeans++'), or give init_params near the "
            "data.",
            RuntimeWarning,
            stacklevel=4,
        )


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
    rng = host_rng(rng_key)
    for sp in plan.sites + plan.center_sites:
        fam = sp.family
        for role in fam.center_roles:
            pname = sp.learned.get(role)
            if pname is None:
                continue
            given = pname in user_set
            if given:
                report[pname] = "given in init_params"
            site = trace[sp.site]
            grid, _ = site_grid(site)
            left = grid[: sp.data_axis]
            enum_axes = [i for i, s in enumerate(left) if s > 1]
            bm = sp.block_maps[role]
            if len(enum_axes) != 1:
                if not given:
                    report[pname] = "from the model (not indexed by exactly one enumerated latent)"
                continue
            axis = enum_axes[0]
            k = left[axis]
            bm_k = np.moveaxis(bm, axis, 0).reshape((k,) + bm.shape[len(left) :])
            if len(np.unique(bm_k)) != bm_k.size:
                if not given:
                    report[pname] = "from the model (tied across components)"
                continue
            site_info = plan.model_sites.params[pname]
            shape = site_info.shape
            ev = fam.role_event_ndim[role]
            event = tuple(shape[len(shape) - ev :]) if ev else ()
            blocks = np.array(params[pname]).reshape((-1,) + event)
            current = blocks[bm_k]
            ordered = _orders_components(site_info.constraint, bm_k, shape)
            right_event = tuple(bm_k.shape[1:]) + event
            value = np.asarray(site["value"])  # on the host: nothing to compile
            value = value.reshape(
                (1,) * (len(grid) + fam.value_event_ndim - value.ndim) + value.shape
            )
            value = np.moveaxis(value, sp.data_axis, 0)
            npts = value.shape[0]
            if any(s != 1 for s in value.shape[1 : 1 + len(left)]):
                if not given:
                    report[pname] = "from the model (the data vary along enumerated dimensions)"
                continue
            value = value.reshape((npts,) + value.shape[1 + len(left) :])
            pts = np.broadcast_to(value, (npts,) + right_event)
            pts = pts.reshape((npts, -1)).astype(blocks.dtype)
            empty = _without_data(current.reshape(k, -1), pts)
            if given or mode == "model":
                _warn_without_data(pname, empty, "given in init_params" if given else "the model's")
                continue
            # an ordered site cannot start with equal values: distinct ones are no sign
            # of a choice
            deliberate = (
                site_info.kind == "param" and not ordered and not np.all(current == current[:1])
            )
            if mode == "auto" and deliberate and not empty:
                report[pname] = "from the model (it differs across components)"
                continue
            if npts < k:
                raise ValueError(
                    f"OnlineEM.init: the init batch has {npts} point(s), too few to place "
                    f"the {k} components of '{pname}' by k-means++ (at least {k}; a few "
                    "hundred give good starts). Pass a larger first batch (OnlineEM.run "
                    "buffers single points for it), give init_params={"
                    f"'{pname}': ...}}, or use OnlineEM(..., init='model')."
                )
            space = pts
            if fam.center_space == "log":  # positive, skewed data: clusters of log x
                space = np.log(np.maximum(pts, np.finfo(pts.dtype).tiny))
            means = _kmeans(rng, space, k, 50, init_restarts(npts, k, pts.shape[1]))
            centers = np.exp(means) if fam.center_space == "log" else means
            centers = np.asarray(fam.from_centers(role, centers, options))
            how = f"from k-means++ over {npts} points of the init batch"
            if mode == "auto" and deliberate:
                how += (
                    f" (the model's values differ across components, but no point of it "
                    f"was nearest to component(s) {empty}: they would have had no data)"
                )
            prior_means = _prior_component_means(trace, pname, shape, event, bm_k)
            if ordered:
                centers = centers[np.argsort(centers[:, 0])]
            elif prior_means is not None:
                centers = _match_prior(centers, prior_means.astype(centers.dtype))
                how += ", matched to the prior's component means"
            else:
                weights = _component_weights(trace, site, axis, k)
                if weights is not None:
                    centers = _match_weights(centers, means, space, weights)
                    how += ", matched to the mixture weights by cluster size"
            blocks[bm_k] = centers.reshape((k,) + right_event)
            params[pname] = jnp.asarray(blocks.reshape(shape), dtype=params[pname].dtype)
            report[pname] = how
    return params, report
