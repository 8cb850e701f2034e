"""Tracing a model once and classifying its sites.

Every site of a NumPyro model falls into one of five classes:

==================  ===========================================  =================
class               how it is recognised                         how it is fitted
==================  ===========================================  =================
``param``           ``numpyro.param``                            maximum likelihood
``global``          latent ``numpyro.sample`` outside the data   posterior mode
                    plate (it has a prior)                       (MAP)
``enumerated``      latent, discrete, inside the data plate      exact posterior
``continuous local``latent, continuous, inside the data plate    not yet supported
``observed``        ``obs=`` given                               data
==================  ===========================================  =================

The *data plate* is the plate that holds every observed site; when several do (a plate
over features inside the one over data points), the one that also holds the discrete
latents. ``OnlineEM(..., data_plate="name")`` names it explicitly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
from numpyro import handlers
from numpyro.contrib.funsor import enum as enum_handler
from numpyro.contrib.funsor import trace as packed_trace
from numpyro.contrib.funsor.infer_util import plate_to_enum_plate
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_median


class ParamSite(NamedTuple):
    """A quantity the M step estimates: a ``numpyro.param`` or a global latent site.

    Attributes
    ----------
    name : str
    kind : str
        ``"param"`` (maximum likelihood) or ``"global"`` (posterior mode under its prior).
    shape : tuple of int
    constraint : numpyro.distributions.constraints.Constraint
        The support the constrained value lives in.
    """

    name: str
    kind: str
    shape: tuple
    constraint: Any


class ModelSites(NamedTuple):
    """Static description of a model, from one trace at ``init``.

    Attributes
    ----------
    params : dict[str, ParamSite]
        Sites the M step estimates, in trace order.
    enumerated : tuple of str
        Discrete local latent sites, enumerated exactly in the E step.
    observed : tuple of str
        Observed sites inside the data plate.
    local : tuple of str
        Every sample site inside the data plate (enumerated and observed).
    data_plate : str
        Name of the data plate.
    max_plate_nesting : int
        Number of batch dimensions used by plates; enumeration uses the ones left of it.
    """

    params: dict
    enumerated: tuple
    observed: tuple
    local: tuple
    data_plate: str
    max_plate_nesting: int


def _frames(site: dict) -> list:
    return [f for f in site["cond_indep_stack"] if f.dim is not None]


def trace_model(
    model: Callable,
    args: tuple,
    kwargs: dict,
    params: dict | None = None,
    rng_key: jax.Array | None = None,
) -> OrderedDict:
    """Run ``model`` once (seeded, with ``params`` substituted) and return its trace.

    Global latent sites that ``params`` does not cover start at their prior median.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    fn = handlers.seed(model, rng_key)
    fn = handlers.substitute(fn, substitute_fn=init_to_median)
    fn = handlers.substitute(fn, data=params or {})
    with numpyro.validation_enabled(False):
        return handlers.trace(fn).get_trace(*args, **kwargs)


def _find_data_plate(sample_sites: list, observed: list) -> str:
    """The plate shared by every observed site and every discrete latent inside it."""
    common = None
    for s in observed:
        names = {f.name for f in _frames(s)}
        common = names if common is None else common & names
    if not common:
        raise ValueError(
            f"OnlineEM: observed sites {[s['name'] for s in observed]} do not share a "
            "numpyro.plate. Wrap the data in `with numpyro.plate('data', N):` so that "
            "the data points are conditionally independent."
        )
    if len(common) > 1:
        # a per-datum discrete latent lives in the data plate but not in feature plates
        for s in sample_sites:
            names = {f.name for f in _frames(s)}
            if not s["is_observed"] and s["fn"].has_enumerate_support and names & common:
                common = common & names
    if len(common) > 1:
        raise ValueError(
            f"OnlineEM: the observed sites share the plates {sorted(common)}; name the one "
            "over data points with OnlineEM(model, data_plate=...)."
        )
    return next(iter(common))


def classify_sites(trace: OrderedDict, data_plate: str | None = None) -> ModelSites:
    """Classify the sites of a model trace (see the module docstring).

    Raises
    ------
    ValueError
        When the model has no observed site, no plate around its observed sites, or a
        site the online EM cannot handle (continuous local latents, observed sites
        outside the data plate).
    """
    sample_sites = [s for s in trace.values() if s["type"] == "sample"]
    observed = [s for s in sample_sites if s["is_observed"]]
    if not observed:
        raise ValueError(
            "OnlineEM: the model has no observed site. Pass the data to "
            "numpyro.sample(..., obs=x) inside a numpyro.plate over the data points."
        )
    if data_plate is None:
        data_plate = _find_data_plate(sample_sites, observed)

    def in_plate(site):
        return any(f.name == data_plate for f in _frames(site))

    params, enumerated, local = OrderedDict(), [], []
    for site in trace.values():
        name = site["name"]
        if site["type"] == "param":
            constraint = site["kwargs"].get("constraint", constraints.real)
            params[name] = ParamSite(name, "param", tuple(jnp.shape(site["value"])), constraint)
        elif site["type"] != "sample":
            continue
        elif site["is_observed"]:
            if not in_plate(site):
                raise ValueError(
                    f"OnlineEM: observed site '{name}' lies outside the data plate "
                    f"'{data_plate}'. Every observed site must be inside it."
                )
            local.append(name)
        elif in_plate(site):
            local.append(name)
            if site["fn"].has_enumerate_support:
                enumerated.append(name)
            else:
                raise NotImplementedError(
                    f"OnlineEM: site '{name}' is a continuous latent inside the data plate "
                    f"'{data_plate}' ({type(site['fn']).__name__}). Only discrete local "
                    "latents are supported for now (they are enumerated exactly); the "
                    "mean-field E step for continuous locals is planned."
                )
        else:
            if site["fn"].has_enumerate_support and site["fn"].support.is_discrete:
                raise NotImplementedError(
                    f"OnlineEM: site '{name}' is a discrete global latent (outside the data "
                    f"plate '{data_plate}'). Only continuous global sites (MAP) are supported."
                )
            params[name] = ParamSite(
                name, "global", tuple(jnp.shape(site["value"])), site["fn"].support
            )
    max_plate_nesting = max(
        [-f.dim for s in trace.values() if s["type"] == "sample" for f in _frames(s)] or [0]
    )
    return ModelSites(
        params=dict(params),
        enumerated=tuple(enumerated),
        observed=tuple(s["name"] for s in observed),
        local=tuple(local),
        data_plate=data_plate,
        max_plate_nesting=max_plate_nesting,
    )


def enum_trace(
    model: Callable,
    sites: ModelSites,
    params: dict,
    args: tuple,
    kwargs: dict,
) -> OrderedDict:
    """Trace ``model`` with ``params`` substituted and the enumerated sites enumerated in
    parallel, each over a batch dimension left of the plates. Every sample site carries
    ``site["infer"]["dim_to_name"]`` for funsor.
    """
    enumerated = set(sites.enumerated)

    def config(site):
        if site["type"] == "sample" and site["name"] in enumerated:
            return {"enumerate": "parallel"}
        return {}

    fn = handlers.substitute(model, data=params)
    fn = numpyro.contrib.funsor.infer_config(fn, config)
    fn = enum_handler(fn, first_available_dim=-sites.max_plate_nesting - 1)
    fn = handlers.seed(fn, jax.random.PRNGKey(0))
    with numpyro.validation_enabled(False), plate_to_enum_plate():
        return packed_trace(fn).get_trace(*args, **kwargs)


def data_plate_frame(site: dict, data_plate: str):
    """The ``CondIndepStackFrame`` of the data plate in ``site``."""
    for f in site["cond_indep_stack"]:
        if f.name == data_plate:
            return f
    raise KeyError(data_plate)
