"""Choosing the M step of every estimated site, automatically, at ``init``.

A site gets the closed-form M step when it is used *directly* as a parameter of a
registered exponential family (`numpyro_onlineem.families`), possibly indexed
by enumerated latents or broadcast: ``Normal(locs[z], scales[z])``,
``Categorical(weights)``, ``MultivariateNormal(locs[z], covariance_matrix=cov)``.

The use is recognised by running the model on *probe* values, never by reading its
source:

1. every estimated element gets a distinct integer id; the ids that arrive in a
   distribution's arguments give the gather map from parameter elements to positions;
2. random valid values then check that the argument really is that gather (and not,
   say, ``2 * locs[z]``);
3. perturbing one site at a time finds every place it enters, so a site used in any
   way the closed form does not cover is reported instead of silently mis-fitted.

Every position of a site is then assigned a *cell*: the distinct combination of
parameter blocks it reads. Statistics are accumulated per cell.

`make_plan` runs three steps, data flowing one way: `recognise` (the probes: how each
estimated site is used, refusing what no M step covers), `build` (the immutable,
value-hashed `Plan`: projections, priors, the M steps in order, the defaults), and
`report` (`Plan.paths`, the words `OnlineEM.mstep_paths` returns). A new M-step path
is one more kind of use for `recognise` and one more `MStep` for `build`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from numpyro_onlineem.estep.enumerate import Enumerate
from numpyro_onlineem.families import (
    LOCATION_FAMILIES,
    Family,
    family_names,
    find_family,
    unwrap,
)
from numpyro_onlineem.model import ModelSites, data_plate_frame, enum_trace
from numpyro_onlineem.mstep.closed_form import ClosedForm
from numpyro_onlineem.mstep.constraints import base_constraint, implies, plan_projection
from numpyro_onlineem.mstep.fixed import Fixed
from numpyro_onlineem.mstep.linear import LinearGaussian, LinearSite
from numpyro_onlineem.mstep.numerical import NEWTON_MAX_DIM, Numerical
from numpyro_onlineem.mstep.sites import SitePlan, log_prob_shape, site_grid
from numpyro_onlineem.schedules import default_burn_in, default_kappa, default_polyak
from numpyro_onlineem.static import Static, freeze
from numpyro_onlineem.validation import InputSpec, describe_inputs


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """The M-step plan of a model: one `SitePlan` per contributing site.

    Immutable and static (no arrays of the state): it travels in `OnlineEMState` as
    pytree metadata, so ``jit`` sees it as part of the function. It compares and hashes
    by value (`numpyro_onlineem.static.freeze`): plans made from the same model,
    settings and shapes are equal, and the compiled update of one serves the other.

    Attributes
    ----------
    sites : tuple of SitePlan
    paths : dict[str, str]
        For each estimated site, which M step it takes, in words.
    model_sites : ModelSites
        The site classification the plan was made for.
    default_burn_in : float
        Points before the first M step unless the user sets it
        (`numpyro_onlineem.schedules.default_burn_in`).
    num_states : int
        The largest number of states of an enumerated site (``K``).
    input_spec : InputSpec
        Shapes of the model's arguments at init, against which batches are checked.
    stats_per_component : float
        Number of sufficient statistics per component ``m`` (all statistics over the
        largest number of enumerated states ``K``).
    msteps : tuple of MStep
        The M steps of the estimated sites, in the order they run
        (`numpyro_onlineem.mstep.base`).
    estep : EStep
        The E step (`numpyro_onlineem.estep.base`): exact enumeration.
    unaveraged : tuple of str
        Sites whose constraint is not convex (`NOT_AVERAGED`): the Polyak average of
        values inside it can leave it, so their average is the current iterate.
    center_sites : tuple of SitePlan
        Where numerical location sites are read (`Recognition.center_sites`), for the
        data-driven start only.
    linear : tuple of LinearSite
        Normal sites whose location is linear in an estimated site, fitted by weighted
        least squares (`numpyro_onlineem.mstep.linear`).
    """

    sites: tuple
    paths: dict
    model_sites: ModelSites
    default_burn_in: float
    num_states: int = 1
    input_spec: InputSpec | None = None
    stats_per_component: float = 0.0
    msteps: tuple = ()
    estep: Any = Enumerate()
    unaveraged: tuple = ()
    center_sites: tuple = ()
    linear: tuple = ()

    @property
    def default_kappa(self) -> float:
        """Step-size exponent unless the user gives a schedule
        (`numpyro_onlineem.schedules.default_kappa`)."""
        return default_kappa(self.stats_per_component)

    @property
    def default_polyak(self) -> bool:
        """Whether averaging is on by default (`numpyro_onlineem.schedules.default_polyak`)."""
        return default_polyak(self.default_kappa)

    @property
    def numerical_sites(self) -> dict:
        """Site -> the numerical M step (`numpyro_onlineem.mstep.numerical.Numerical`)
        that updates it."""
        return {n: m for m in self.msteps if isinstance(m, Numerical) for n in m.sites}

    def replace(self, **changes) -> Plan:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def _key(self) -> tuple:
        return freeze(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return isinstance(other, Plan) and self._hash == other._hash and self._key == other._key

    @functools.cached_property
    def _hash(self) -> int:
        return hash(self._key)

    def __hash__(self) -> int:
        # cached: jit hashes the plan at every call, a nested tuple each time otherwise
        return self._hash

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {v}" for k, v in self.paths.items())
        return f"Plan({body})"


MSTEP_PATHS = ("closed_form", "numerical", "fixed")
"""The M steps a site can be given with ``OnlineEM(mstep={site: path})`` (an optax
``GradientTransformation`` also: the numerical M step with that optimizer)."""

NOT_AVERAGED = (
    constraints.corr_cholesky,
    constraints.corr_matrix,
    constraints.sphere,
    constraints.circular,
)
"""Constraints whose sets are not convex (or, for angles, wrap around): a site
constrained to one is not Polyak-averaged."""


class UnsupportedModelError(ValueError):
    """The model uses an estimated site in a way no available M step covers."""


def array_attrs(fn, prefix="") -> dict:
    """The numeric arguments of a distribution (and of the ones it wraps, and of its
    transforms), as arrays.
    NumPy scalars count: ``s ** -0.5`` of a 0-d probe array is an ``np.float32``."""
    out = {}
    for key, val in vars(fn).items():
        if key.startswith("_"):
            # a private attribute behind a public property is an argument by that name
            # (MixtureSameFamily's component_distribution); other private ones are
            # helpers, not arguments (Beta's own Dirichlet)
            if not isinstance(getattr(type(fn), key[1:], None), property):
                continue
            key = key[1:]
        if isinstance(val, dist.Distribution):
            out.update(array_attrs(val, prefix))
        elif isinstance(val, jax.Array | np.ndarray | np.floating | float):
            out[prefix + key] = np.asarray(val)
        elif isinstance(val, list | tuple):  # a TransformedDistribution's transforms
            for i, t in enumerate(val):
                if isinstance(t, dist.transforms.Transform):
                    out.update(array_attrs(t, f"{prefix}{key}[{i}]."))
    return out


def _unconstrained_shape(name: str, ps) -> tuple:
    try:
        return tuple(biject_to(ps.constraint).inverse_shape(ps.shape))
    except NotImplementedError as e:
        raise UnsupportedModelError(
            f"OnlineEM: site '{name}': no bijection to the support {ps.constraint}."
        ) from e


@functools.partial(jax.jit, static_argnums=0)
def _to_support(supports: Static, us: dict) -> dict:
    """``biject_to(constraint)(u)`` of every site in one compiled call (op by op it
    compiles a program per operation, a tenth of a second each on the CPU)."""
    return {name: biject_to(supports.value[name])(u) for name, u in us.items()}


class SiteUse(NamedTuple):
    """How the probes found one estimated site used: as ``role`` of the local
    ``family`` site ``local``, directly or through the reparametrisation ``reparam``, or
    (``linear``) as the coefficients of a location linear in it, and (for a global site)
    with the prior ``prior``."""

    local: str
    role: str
    family: Family
    reparam: str | None
    prior: Any = None
    linear: bool = False


class Recognition(NamedTuple):
    """What `recognise` found by probing the model (static, no arrays of the state).

    Attributes
    ----------
    site_plans : tuple of SitePlan
        One per local site of a registered family that reads an estimated site, before
        `build` adds projections and priors.
    uses : dict[str, SiteUse | None]
        Estimated (not fixed) site -> its one use, ``None`` when the data never read it.
    fixed : tuple of str
        Sites held at their initial value.
    num_states : int
        Largest number of states of an enumerated site.
    full_dims : tuple of int
        Dimensions of the estimated full covariances.
    total_stats : float
        Statistics over every cell of every site.
    input_spec : InputSpec
    numerical : tuple of str
        Sites that take the numerical M step: chosen by the user, or used in a way no
        closed form covers.
    center_sites : tuple of SitePlan
        For each numerical site used directly (possibly indexed) as the ``loc`` of a
        real-valued local distribution (``StudentT(df[z], locs[z], ...)``), where it is
        read: the data-driven start places it as it does a Gaussian location.
    linear : tuple of LinearSite
        Normal sites whose location is linear in an estimated site (weighted least
        squares, `numpyro_onlineem.mstep.linear`), before `build` adds their priors.
    """

    site_plans: tuple
    uses: dict
    fixed: tuple
    num_states: int
    full_dims: tuple
    total_stats: float
    input_spec: InputSpec
    numerical: tuple = ()
    center_sites: tuple = ()
    linear: tuple = ()


def make_plan(
    model: Callable,
    sites: ModelSites,
    params: dict,
    args: tuple,
    kwargs: dict,
    mstep: dict | None = None,
    numerical_steps: int = 1,
) -> Plan:
    """The M-step plan of a model: `recognise` → `build` → `report`.

    Parameters
    ----------
    mstep : dict, optional
        The user's choice of M step per site: ``"fixed"`` (held at its value in
        ``params``: the model sees it as a constant, so it may enter it in any way),
        ``"closed_form"`` (an error when no closed form covers it), ``"numerical"``, or
        an optax ``GradientTransformation`` (numerical, with that optimizer). Every
        other site takes the closed form where one covers its use, the numerical M step
        otherwise.
    numerical_steps : int
        Optimizer steps per update of the ``"optax"`` numerical method.

    Raises
    ------
    UnsupportedModelError
        Naming the site and the reason, when a site enters the model in a way no
        available M step covers.
    """
    mstep = dict(mstep or {})
    fixed = frozenset(n for n, p in mstep.items() if isinstance(p, str) and p == "fixed")
    closed = frozenset(n for n, p in mstep.items() if isinstance(p, str) and p == "closed_form")
    numerical = frozenset(n for n, p in mstep.items() if not isinstance(p, str) or p == "numerical")
    found = recognise(model, sites, params, args, kwargs, fixed, numerical, closed)
    optimizers = {n: p for n, p in mstep.items() if not isinstance(p, str)}
    plan = build(found, sites, optimizers, int(numerical_steps))
    return plan.replace(paths=report(found, plan))


def _probe_values(sites: ModelSites, names: list) -> tuple[dict, dict, dict, dict]:
    """Distinct integer ids for every estimated element (``ids``, with each site's first
    id in ``base``), and two random valid values of every site."""
    dtype = jnp.result_type(float)
    ids, rand_a, rand_b, base = {}, {}, {}, {}
    offset = 1
    rng = np.random.default_rng(20091)  # NumPy: nothing to compile
    for name in names:
        ps = sites.params[name]
        size = int(np.prod(ps.shape, dtype=int))
        base[name] = offset
        ids[name] = (offset + np.arange(size)).reshape(ps.shape).astype(dtype)
        offset += size
        shape = _unconstrained_shape(name, ps)
        rand_a[name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
        rand_b[name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
    if offset > 2 ** (jnp.finfo(dtype).nmant + 1):
        raise UnsupportedModelError(
            "OnlineEM: too many estimated elements to recognise the model in "
            f"{jnp.dtype(dtype).name}; enable float64 with jax_enable_x64."
        )
    supports = Static({name: sites.params[name].constraint for name in names})
    rand_a, rand_b = (
        {name: np.asarray(v) for name, v in _to_support(supports, rand).items()}
        for rand in (rand_a, rand_b)
    )
    return ids, rand_a, rand_b, base


class _Probes(NamedTuple):
    """The model run on probe values (see the module docstring)."""

    names: list
    ids: dict
    rand_a: dict
    base: dict
    tr_id: dict
    tr_a: dict
    deps: dict
    retrace: Callable = None


class _NotClosedForm(Exception):
    """A site that the closed-form M step does not cover, and why (`recognise` gives it
    the numerical M step, or raises the reason when the user asked for the closed
    form)."""

    def __init__(self, site: str, reason: str):
        super().__init__(reason)
        self.site = site
        self.reason = reason


def recognise(
    model: Callable,
    sites: ModelSites,
    params: dict,
    args: tuple,
    kwargs: dict,
    fixed: frozenset = frozenset(),
    numerical: frozenset = frozenset(),
    closed_form: frozenset = frozenset(),
) -> Recognition:
    """Run the model on probe values (see the module docstring) and find how every
    estimated site is used. A site whose use no closed form covers takes the numerical
    M step (as do the sites in ``numerical``), unless the user asked for its closed form
    (``closed_form``): an `UnsupportedModelError` then names the site and the reason."""
    probes = _probe(model, sites, params, args, kwargs, fixed)
    numerical = frozenset(numerical)
    while True:
        try:
            found = _closed_form_uses(probes, sites, numerical)
        except _NotClosedForm as e:
            if e.site in closed_form or e.site in numerical:
                raise UnsupportedModelError(e.reason) from None
            numerical = numerical | {e.site}
            continue
        joining = _joining_numerical(found, probes, numerical) - closed_form
        if joining:
            numerical = numerical | joining
            continue
        numerical = tuple(name for name in sites.params if name in numerical)
        return found._replace(
            fixed=tuple(name for name in sites.params if name in fixed),
            numerical=numerical,
            center_sites=_center_sites(probes, sites, numerical),
            input_spec=describe_inputs(args, kwargs, {n: probes.tr_id[n] for n in sites.observed}),
        )


def _joining_numerical(found: Recognition, probes: _Probes, numerical: frozenset) -> frozenset:
    """The closed-form sites that share a local site with a numerical one: they join
    its numerical M step. Alone, each would be a conditional maximisation given the
    other's current value (ECM), and online the two move at different speeds: a
    closed-form scale jumps to the residuals about a numerical location that has moved
    only a step toward its optimum, and a mixture whose scales all swell merges its
    components (measured: a mixture of two regressions with shared coefficients ended
    0.28 nats/point short of the MLE that way, 0.0001 with the scales numerical too).
    A location role (the family's ``center_roles``) keeps its closed form: a weighted
    mean, whatever the scales."""
    joining = set()
    for sp in found.site_plans:
        if any(any(site == sp.site for site, _ in probes.deps[n]) for n in numerical):
            # a location is a weighted mean whatever the other roles' values (up to
            # the weight of a prior): it keeps its closed form
            joining.update(n for r, n in sp.learned.items() if r not in sp.family.center_roles)
    return frozenset(joining) - numerical


def _center_sites(probes: _Probes, sites: ModelSites, numerical: tuple) -> tuple:
    """`Recognition.center_sites`: the local sites whose ``loc`` is a gather of one
    numerical site, with its block map."""
    out = []
    for name in numerical:
        for sname in sites.local:
            if (sname, "loc") not in probes.deps[name]:
                continue
            site_id = probes.tr_id[sname]
            grid, base_id = site_grid(site_id)
            real = base_constraint(base_id.support) in (constraints.real, constraints.real_vector)
            if not real or not isinstance(getattr(base_id, "loc", None), jax.Array | np.ndarray):
                continue
            ev = len(base_id.event_shape)
            if ev not in LOCATION_FAMILIES:
                continue
            arr_id = np.asarray(base_id.loc)
            arr_a = np.asarray(unwrap(probes.tr_a[sname]["fn"]).loc)
            event = tuple(arr_id.shape[arr_id.ndim - ev :]) if ev else ()
            args = (grid, event, probes.base[name], probes.ids[name], probes.rand_a[name])
            block = _decode(arr_id, arr_a, *args)
            data_axis = (
                len(log_prob_shape(site_id)) + data_plate_frame(site_id, sites.data_plate).dim
            )
            if block is None or not np.all(block == np.take(block, [0], axis=data_axis)):
                continue
            out.append(
                SitePlan(
                    site=sname,
                    family=LOCATION_FAMILIES[ev],
                    data_axis=data_axis,
                    attrs={"loc": "loc"},
                    learned={"loc": name},
                    cell_ids=None,
                    num_cells=0,
                    groups={},
                    block_maps={"loc": np.take(block, 0, axis=data_axis)},
                    priors={},
                    reparams={},
                )
            )
            break
    return tuple(out)


def _probe(model, sites, params, args, kwargs, fixed) -> _Probes:
    """Trace the model at the probe ids and at random valid values, and find every
    (site, argument) each estimated site enters, by perturbing one site at a time."""
    names = [name for name in sites.params if name not in fixed]
    constants = {name: params[name] for name in sites.params if name in fixed}
    ids, rand_a, rand_b, base = _probe_values(sites, names)

    def retrace(values):
        values = {**constants, **values}
        return enum_trace(model, sites, values, args, kwargs, concrete=True)

    def run(values):
        tr = retrace(values)
        return tr, {s["name"]: array_attrs(s["fn"]) for s in tr.values() if s["type"] == "sample"}

    tr_id, _ = run(ids)
    tr_a, attrs_a = run(rand_a)
    deps = {}
    for name in names:
        _, attrs_j = run({**rand_a, name: rand_b[name]})
        deps[name] = {
            (s, a)
            for s, arrs in attrs_a.items()
            for a, v in arrs.items()
            if a in attrs_j.get(s, {})
            and (
                v.shape != attrs_j[s][a].shape or not np.allclose(v, attrs_j[s][a], equal_nan=True)
            )
        }
    return _Probes(names, ids, rand_a, base, tr_id, tr_a, deps, retrace)


def _closed_form_uses(probes: _Probes, sites: ModelSites, numerical: frozenset) -> Recognition:
    """How every estimated site outside ``numerical`` is used, for the closed form;
    `_NotClosedForm` for the first site it does not cover. Roles read from numerical
    sites are constants to the closed form (statistics given their current value)."""
    names, ids, rand_a, base, tr_id, tr_a, deps, _ = probes
    closed = [n for n in names if n not in numerical]
    site_plans, linear, uses = [], [], {name: [] for name in closed}
    for sname in sites.local:
        site_id, site_a = tr_id[sname], tr_a[sname]
        grid, base_id = site_grid(site_id)
        family = find_family(base_id)
        if family is None:
            continue
        plate_dim = data_plate_frame(site_id, sites.data_plate).dim
        data_axis = len(log_prob_shape(site_id)) + plate_dim
        roles_id = family.roles(base_id)
        roles_a = family.roles(unwrap(site_a["fn"]))
        attrs, learned, block_maps, nblocks, reparams = {}, {}, {}, {}, {}
        linear_loc = None
        for role, (attr, arr_id) in roles_id.items():
            attrs[role] = attr
            used_by = [n for n in names if any((sname, a) in deps[n] for a in family.attrs(role))]
            if not used_by or all(n in numerical for n in used_by):
                continue
            if len(used_by) > 1:
                pname = next(n for n in used_by if n not in numerical)
                raise _NotClosedForm(
                    pname,
                    f"OnlineEM: the {role} of {family.name} site '{sname}' combines "
                    f"{used_by}; the closed-form M step needs each distribution argument "
                    "to be one estimated site used directly (possibly indexed).",
                )
            pname = used_by[0]
            ev = family.role_event_ndim[role]
            role_event = tuple(np.shape(arr_id))[np.ndim(arr_id) - ev :] if ev else ()
            # used directly (possibly indexed), or through a known reparametrisation
            for rp in (None, *family.reparams.get(role, {}).values()):
                block = _decode(
                    np.asarray(arr_id),
                    np.asarray(roles_a[role][1]),
                    grid,
                    role_event,
                    base[pname],
                    ids[pname],
                    rand_a[pname],
                    rp,
                )
                if block is not None:
                    if rp is not None:
                        reparams[role] = rp.name
                    break
            if block is None and family.name == "Normal" and role == "loc":
                found = _linear_loc(probes, sites, sname, pname, grid, data_axis)
                if found is not None:
                    linear_loc = (pname, *found)
                    continue
            if block is None:
                known = [rp.formula for rp in family.reparams.get(role, {}).values()]
                also = f" or through one of {known}" if known else ""
                raise _NotClosedForm(
                    pname,
                    f"OnlineEM: site '{pname}' enters the {role} of {family.name} site "
                    f"'{sname}' through a transformation. The closed-form M step needs it "
                    f"used directly, possibly indexed by the enumerated latent (e.g. "
                    f"{pname}[z]){also}. Leave its M step to the default (numerical), or "
                    f"hold it at its initial value with mstep={{'{pname}': 'fixed'}}.",
                )
            if not np.all(block == np.take(block, [0], axis=data_axis)):
                raise UnsupportedModelError(
                    f"OnlineEM: site '{pname}' is indexed by the data index in site "
                    f"'{sname}'; estimated sites must be shared by all data points."
                )
            block_maps[role] = np.take(block, 0, axis=data_axis)
            nblocks[role] = int(np.prod(sites.params[pname].shape, dtype=int)) // int(
                np.prod(role_event, dtype=int)
            )
            learned[role] = pname
            uses[pname].append(SiteUse(sname, role, family, reparams.get(role)))
        if linear_loc is not None:
            coef, blocks, position_block = linear_loc
            scale = learned.get("scale")
            linear.append(
                LinearSite(
                    site=sname,
                    family=family,
                    coef=coef,
                    coef_shape=tuple(sites.params[coef].shape),
                    data_axis=data_axis,
                    blocks=blocks,
                    position_block=position_block,
                    scale=scale,
                    scale_groups=()
                    if scale is None
                    else (block_maps["scale"].reshape(-1).astype(np.int32), nblocks["scale"]),
                    scale_shape=() if scale is None else tuple(sites.params[scale].shape),
                    scale_reparam=reparams.get("scale"),
                    attrs=dict(attrs),
                )
            )
            uses[coef].append(SiteUse(sname, "loc", family, None, linear=True))
            continue
        if not learned:
            continue
        site_plans.append(
            _site_plan(
                sname, site_id, family, grid, data_axis, attrs, learned, block_maps,
                nblocks, reparams, roles_a, sites,
            )
        )  # fmt: skip

    checked = {}
    for name in closed:
        covered = {(u.local, a) for u in uses[name] for a in u.family.attrs(u.role)}
        stray = sorted(deps[name] - covered)
        if stray:
            s, a = stray[0]
            raise _NotClosedForm(
                name,
                f"OnlineEM: site '{name}' enters site '{s}' (argument '{a}') in a way the "
                f"closed-form M step does not recognise. It must be used directly as a "
                f"parameter of a registered family ({family_names()}; register_family adds "
                "one), possibly indexed by the enumerated latent; leave its M step to the "
                "default (numerical) otherwise.",
            )
        if len(uses[name]) > 1:
            where = [f"{u.local}.{u.role}" for u in uses[name]]
            raise _NotClosedForm(
                name,
                f"OnlineEM: site '{name}' is used in several places ({where}); the "
                "closed-form M step supports one use per estimated site.",
            )
        use = uses[name][0] if uses[name] else None
        if use is not None and sites.params[name].kind == "global":
            site_attrs = {sp.site: sp.attrs for sp in (*site_plans, *linear)}
            use = use._replace(prior=_check_prior(name, use, tr_a, deps, names, site_attrs))
        checked[name] = use

    cardinalities = [sites.num_states[n] for n in sites.enumerated]
    # a full covariance needs more points than dimensions before its first M step
    full_dims = tuple(
        int(np.shape(unwrap(tr_id[sp.site]["fn"]).loc)[-1])
        for sp in site_plans
        if "cov" in sp.learned
    )
    total_stats = sum(
        sp.num_cells * sp.family.num_stats(unwrap(tr_id[sp.site]["fn"])) for sp in site_plans
    ) + sum(ls.num_stats() for ls in linear)
    return Recognition(
        site_plans=tuple(site_plans),
        uses=checked,
        fixed=(),
        num_states=max(cardinalities or [1]),
        full_dims=full_dims,
        total_stats=float(total_stats),
        input_spec=None,
        linear=tuple(linear),
    )


def _linear_loc(probes: _Probes, sites: ModelSites, sname: str, pname: str, grid, data_axis):
    r"""Whether the location of Normal site ``sname`` is affine in site ``pname``, each
    grid position reading one block of its coefficients: ``(blocks, position_block)``
    for `numpyro_onlineem.mstep.linear.LinearSite`, ``None`` otherwise.

    The model is traced (once, compiled) at $\beta = 0$ and two random values, with its
    Jacobian $J$ at 0, every other site at its random probe value: the location is
    affine when $\mu(b) = \mu(0) + J b$ at both. The positions off the data axis
    must each read a set of coefficients (the nonzero columns of $J$ over the data)
    that is either the set of another position or disjoint from it, all of one size.
    """
    if not implies(constraints.real, sites.params[pname].constraint):
        return None
    shape = tuple(sites.params[pname].shape)
    dtype = jnp.result_type(float)
    others = {n: jnp.asarray(v) for n, v in probes.rand_a.items() if n != pname}

    def loc(b):
        fn = unwrap(probes.retrace({**others, pname: b})[sname]["fn"])
        return jnp.broadcast_to(
            jnp.reshape(fn.loc, (1,) * (len(grid) - jnp.ndim(fn.loc)) + jnp.shape(fn.loc)), grid
        )

    rng = np.random.default_rng(20092)
    points = np.stack([np.zeros(shape), rng.normal(size=shape), rng.normal(size=shape)])
    try:
        values, jac = jax.jit(lambda bs: (jax.vmap(loc)(bs), jax.jacfwd(loc)(bs[0])))(
            jnp.asarray(points, dtype)
        )
    except Exception:  # a model that cannot be differentiated or batched: not linear
        return None
    values, jac = np.asarray(values, float), np.asarray(jac, float)
    size = int(np.prod(shape, dtype=int))
    jac = jac.reshape(tuple(grid) + (size,))
    for b, value in zip(points[1:], values[1:], strict=True):
        predicted = values[0] + jac @ b.reshape(-1)
        tol = 1e-4 * (np.max(np.abs(jac) @ np.abs(b.reshape(-1))) + np.max(np.abs(values[0])))
        if not np.all(np.isfinite(value)) or np.max(np.abs(value - predicted)) > tol + 1e-30:
            return None
    jac = np.moveaxis(jac, data_axis, 0)
    reads = np.any(jac.reshape(jac.shape[0], -1, size) != 0, axis=0)  # (P, size)
    sets, position_block = np.unique(reads, axis=0, return_inverse=True)
    counts = sets.sum(1)
    if counts.min() == 0 or len(set(counts)) > 1 or sets.sum(0).max() > 1:
        return None
    blocks = np.stack([np.flatnonzero(row) for row in sets]).astype(np.int32)
    return blocks, position_block.reshape(-1).astype(np.int32)


def _site_plan(
    sname, site_id, family, grid, data_axis, attrs, learned, block_maps, nblocks, reparams,
    roles_a, sites,
) -> SitePlan:  # fmt: skip
    """The cells of one local site: the distinct combinations of parameter blocks its
    positions read (see the module docstring)."""
    stacked = np.stack([block_maps[r].reshape(-1) for r in learned], axis=-1)
    cells, first, inverse = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = {r: (cells[:, i].astype(np.int32), nblocks[r]) for i, r in enumerate(learned)}
    if family.name == "MultivariateNormal" and "loc" in learned:
        tied = len(np.unique(groups["loc"][0])) != len(cells)
        if "cov" not in learned:  # a constant covariance: one per location
            cov = np.asarray(roles_a["cov"][1])
            cov = np.broadcast_to(cov, tuple(grid) + cov.shape[-2:])
            cov = np.take(cov, 0, axis=data_axis).reshape((-1,) + cov.shape[-2:])
            tied = any(
                not np.allclose(cov[inverse == c], cov[inverse == c][:1]) for c in range(len(cells))
            )
        if tied:
            raise UnsupportedModelError(
                f"OnlineEM: MultivariateNormal site '{sname}' ties one location across "
                "several covariances; give each component its own location."
            )
    identity = len(cells) == len(inverse) and np.array_equal(inverse, np.arange(len(inverse)))
    # the element of the data each position reads (data point 0), to see whether a
    # cell pools positions that read different coordinates
    value_shape = np.shape(site_id["value"])
    value_shape = (1,) * (len(grid) + family.value_event_ndim - len(value_shape)) + value_shape
    reads = np.arange(int(np.prod(value_shape[: len(grid)], dtype=int)))
    reads = np.broadcast_to(reads.reshape(value_shape[: len(grid)]), grid)
    reads = np.take(reads, 0, axis=data_axis).reshape(-1)
    pooled = len(np.unique(np.stack([inverse, reads], -1), axis=0)) != len(cells)
    return SitePlan(
        site=sname,
        family=family,
        data_axis=data_axis,
        attrs=attrs,
        learned=learned,
        cell_ids=None if identity else inverse.astype(np.int32),
        num_cells=len(cells),
        groups=groups,
        block_maps=block_maps,
        priors={},
        reparams=reparams,
        pooled_shift=bool(pooled),
        projections={},
        component_points=_component_points(site_id, grid, data_axis, sites.enumerated),
    )


def _check_prior(name, use: SiteUse, tr_a, deps, names, site_attrs: dict):
    """The prior of global site ``name``, when it has a closed-form posterior mode in
    its use; an `UnsupportedModelError` naming the conjugate choices otherwise.
    ``site_attrs``: local site -> role -> the distribution attribute it is read from."""
    fam, role, reparam = use.family, use.role, use.reparam
    prior_fn = unwrap(tr_a[name]["fn"])
    attr = site_attrs[use.local][role]
    if not fam.accepts_prior(role, attr, prior_fn, reparam):
        what = role
        if reparam is not None:
            what = f"{reparam} ({role} = {fam.reparams[role][reparam].formula})"
        allowed = fam.prior_choices(role, attr, reparam)
        raise _NotClosedForm(
            name,
            f"OnlineEM: global site '{name}' has a {type(prior_fn).__name__} prior, "
            f"which has no closed-form posterior mode as the {what} of "
            f"{fam.name} ('{attr}'). Conjugate choices: "
            f"{[t.__name__ for t in allowed] or 'none'}; or leave its M step to the "
            "default (numerical).",
        )
    hyper = [n for n in names if any(s == name for s, _ in deps[n])]
    if hyper:
        raise _NotClosedForm(
            name,
            f"OnlineEM: the prior of '{name}' depends on {hyper}; hierarchical "
            "priors have no closed-form M step; leave its M step to the default "
            "(numerical).",
        )
    return type(prior_fn)


def build(
    found: Recognition, sites: ModelSites, optimizers: dict | None = None, numerical_steps: int = 1
) -> Plan:
    """The static plan from what `recognise` found: each local site's projections and
    priors, the M steps in order (closed form, then numerical, then fixed), and the
    defaults that depend on the model (its ``paths`` are left to `report`).
    ``optimizers``: site -> the optax optimizer the user gave it."""
    site_plans = {sp.site: sp for sp in found.site_plans}
    linear = {ls.site: ls for ls in found.linear}
    for name, use in found.uses.items():
        if use is None:
            continue
        if use.local in linear:
            linear[use.local] = _linear_with(linear[use.local], name, use, sites)
            continue
        sp = site_plans[use.local]
        fam, role = use.family, use.role
        projection = plan_projection(
            name,
            sites.params[name].constraint,
            fam.support(role, sp.attrs[role], use.reparam),
            quadratic=role in fam.quadratic_roles,
            scalar_blocks=fam.role_event_ndim[role] == 0,
            direct=use.reparam is None,
        )
        if projection is not None:
            sp = sp._replace(projections={**sp.projections, role: projection})
        if use.prior is not None:
            sp = sp._replace(priors={**sp.priors, role: name})
        site_plans[use.local] = sp
    plans = tuple(site_plans.values())
    msteps = [
        ClosedForm(sp, {role: sites.params[p].shape for role, p in sp.learned.items()})
        for sp in plans
    ]
    msteps.extend(LinearGaussian(ls) for ls in linear.values())
    msteps.extend(_numerical_groups(found.numerical, sites, optimizers or {}, numerical_steps))
    if found.fixed:
        msteps.append(Fixed(found.fixed))
    return Plan(
        sites=plans,
        linear=tuple(linear.values()),
        paths={},
        model_sites=sites,
        default_burn_in=default_burn_in(found.num_states, list(found.full_dims)),
        num_states=int(found.num_states),
        input_spec=found.input_spec,
        stats_per_component=found.total_stats / found.num_states,
        msteps=tuple(msteps),
        center_sites=found.center_sites,
        unaveraged=tuple(
            name
            for name, ps in sites.params.items()
            if base_constraint(ps.constraint) in NOT_AVERAGED
        ),
    )


def _linear_with(ls: LinearSite, name: str, use: SiteUse, sites: ModelSites) -> LinearSite:
    """A linear site with the prior of ``name`` (its coefficients, or its scale) and
    the projection that keeps its scale inside the scale site's constraint."""
    if use.prior is not None:
        ls = ls._replace(priors={**ls.priors, use.role: name})
    if use.role == "scale":
        fam = use.family
        projection = plan_projection(
            name,
            sites.params[name].constraint,
            fam.support("scale", "scale", use.reparam),
            quadratic=False,
            scalar_blocks=True,
            direct=use.reparam is None,
        )
        ls = ls._replace(projection=projection)
    return ls


def _numerical_groups(names: tuple, sites: ModelSites, optimizers: dict, steps: int) -> list:
    """The numerical M steps: the sites with the same optimizer (the default, or one the
    user gave) optimised jointly, by Newton steps up to `NEWTON_MAX_DIM` unconstrained
    values with the default, by optax steps otherwise."""
    groups: dict = {}
    for name in names:
        groups.setdefault(optimizers.get(name), []).append(name)
    out = []
    for index, (optimizer, members) in enumerate(groups.items()):
        cons = tuple(sites.params[n].constraint for n in members)
        size = sum(
            int(np.prod(biject_to(c).inverse_shape(sites.params[n].shape), dtype=int))
            for n, c in zip(members, cons, strict=True)
        )
        method = "newton" if optimizer is None and size <= NEWTON_MAX_DIM else "optax"
        out.append(Numerical(tuple(members), cons, method, optimizer, int(steps), index))
    return out


def report(found: Recognition, plan: Plan) -> dict:
    """For each estimated site, in the model's order, the M step it takes, in words."""
    site_plans = {sp.site: sp for sp in plan.sites}
    linear = {ls.site: ls for ls in plan.linear}
    numerical = plan.numerical_sites
    paths = {}
    for name, ps in plan.model_sites.params.items():
        if name in found.fixed:
            paths[name] = "fixed at its initial value"
            continue
        if name in numerical:
            paths[name] = _numerical_path(name, ps, numerical[name])
            continue
        use = found.uses[name]
        if use is None:
            paths[name] = "unused by the data: kept at its initial value"
            continue
        if use.local in linear:
            paths[name] = _linear_path(name, use, linear[use.local])
            continue
        fam, role, reparam = use.family, use.role, use.reparam
        path = f"{fam.maximiser}: {fam.name} {role} of site '{use.local}'"
        if reparam is not None:
            path += f" (as a {reparam}: {role} = {fam.reparams[role][reparam].formula})"
        if use.prior is not None:
            path += f", posterior mode under its {use.prior.__name__} prior"
        else:
            path += ", maximum likelihood"
        projection = site_plans[use.local].projections.get(role)
        if projection is not None:
            how = "isotonic regression" if projection.ordered else "clipping"
            path += f"; kept in its constraint {ps.constraint} by {how}"
        paths[name] = path
    return paths


def _linear_path(name: str, use: SiteUse, ls: LinearSite) -> str:
    """`report`'s words for a site of a weighted-least-squares M step."""
    goal = "maximum likelihood"
    if use.prior is not None:
        goal = f"posterior mode under its {use.prior.__name__} prior"
    if use.linear:
        blocks, size = ls.blocks.shape
        how = f"{blocks} blocks of {size} coefficients" if blocks > 1 else f"{size} coefficients"
        return (
            f"closed form: weighted least squares, Normal loc of site '{ls.site}' linear "
            f"in '{name}' ({how}), {goal}"
        )
    path = f"closed form: Normal scale of site '{ls.site}'"
    if use.reparam is not None:
        path += (
            f" (as a {use.reparam}: scale = {use.family.reparams['scale'][use.reparam].formula})"
        )
    path += f", from the residuals of the weighted least squares of '{ls.coef}', {goal}"
    if ls.projection is not None:
        path += "; kept in its constraint by clipping"
    return path


def _numerical_path(name: str, ps, m: Numerical) -> str:
    """`report`'s words for a site of a numerical M step."""
    if m.method == "newton":
        how = "Newton steps with the online observed information"
    else:
        opt = "Adam(0.05)" if m.optimizer is None else "the given optax optimizer"
        how = f"{m.steps} {opt} step{'s' if m.steps > 1 else ''} per update"
    others = [n for n in m.sites if n != name]
    jointly = f", jointly with {others}" if others else ""
    goal = "posterior mode" if ps.kind == "global" else "maximum likelihood"
    return (
        f"numerical: {how} on the expected complete-data log-likelihood{jointly}, "
        f"{goal}; in unconstrained space, so its constraint {ps.constraint} holds exactly"
    )


def _component_points(site: dict, grid: tuple, data_axis: int, enumerated: tuple) -> float:
    """Elements of one data point's value per state of the enumerated latents: the grid
    positions off the data axis over the enumerated states, times the value's event."""
    shape = log_prob_shape(site)
    states = 1
    for dim, name in site["infer"]["dim_to_name"].items():
        if name in enumerated:
            states *= shape[dim]
    positions = int(np.prod(grid, dtype=int)) // grid[data_axis] // states
    value = np.shape(site["value"])
    event = value[len(value) - site["fn"].event_dim :] if site["fn"].event_dim else ()
    reinterpreted = len(grid) - len(shape)
    return float(positions * int(np.prod(event[reinterpreted:], dtype=int)))


def _decode(arr_id, arr_a, grid, role_event, base, ids, rand_a, reparam=None):
    """Gather map from parameter blocks to grid positions, or ``None`` if ``arr`` is not
    a gather of the parameter (mapped by ``reparam.forward`` when given)."""
    target = tuple(grid) + tuple(role_event)
    try:
        a = np.broadcast_to(arr_id, target)
        b = np.broadcast_to(arr_a, target)
    except ValueError:
        return None
    atol = 1e-3
    if reparam is not None:
        with np.errstate(all="ignore"):
            a = reparam.inverse(a.astype(np.float64))
        atol = 2e-2  # the map and its inverse round twice in float32
    r = np.rint(a)
    if not np.all(np.isfinite(a)) or not np.allclose(a, r, rtol=0, atol=atol):
        return None
    if np.abs(r).max(initial=0.0) >= 2.0**53:  # no index: and no int64 for it either
        return None
    idx = r.astype(np.int64) - base
    if idx.min() < 0 or idx.max() >= ids.size:
        return None
    expected = rand_a.reshape(-1)[idx]
    if reparam is not None:
        expected = reparam.forward(expected)
    if not np.allclose(b, expected, rtol=1e-5, atol=1e-6):
        return None
    if not role_event:
        return idx
    size = int(np.prod(role_event))
    flat = idx.reshape(tuple(grid) + (size,))
    first = flat[..., :1]
    if not (np.all(flat == first + np.arange(size)) and np.all(first % size == 0)):
        return None
    if tuple(ids.shape[len(ids.shape) - len(role_event) :]) != tuple(role_event):
        return None
    return first[..., 0] // size


jax.tree_util.register_pytree_node(Plan, lambda p: ((), p), lambda aux, _: aux)
