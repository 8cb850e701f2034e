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
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.contrib.funsor import enum as enum_handler
from numpyro.contrib.funsor import trace as packed_trace
from numpyro.contrib.funsor.enum_messenger import LocalNamedMessenger
from numpyro.contrib.funsor.infer_util import plate_to_enum_plate
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_median
from numpyro.primitives import _PYRO_STACK, Messenger

from numpyro_onlineem.compiled import compiled
from numpyro_onlineem.stream import merge_args, split_args

CHAINS_UNSUPPORTED = (
    "Markov chains (HMMs and other models whose discrete latents depend on each "
    "other in sequence) are not supported yet: the enumeration E step handles "
    "latents that are independent given the parameters, one set per data point. "
    "Support for chains is planned."
)


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
    reads_subsample : bool
        Whether the observed values are read through the data plate's subsample
        indices (``with plate("data", N, subsample_size=B) as idx: ... obs=x[idx]``, the
        full data passed at every update): each update then draws fresh indices.
    sized_by_batch : bool
        Whether the data plate's size is the batch's own (``plate("data", x.shape[0])``)
        rather than a declared data-set size ``N`` (``subsample_size``): priors of global
        sites are then weighed against each batch as if it were the whole data set.
    num_states : dict[str, int]
        Enumerated site -> the number of values of its support.
    """

    params: dict
    enumerated: tuple
    observed: tuple
    local: tuple
    data_plate: str
    max_plate_nesting: int
    reads_subsample: bool = False
    sized_by_batch: bool = True
    num_states: dict = {}


def _frames(site: dict) -> list:
    return [f for f in site["cond_indep_stack"] if f.dim is not None]


class _ChainGuard(Messenger):
    """Refuses the constructs of Markov chains, ``scan`` and ``markov``, with a message
    that names them, before any other handler sees them."""

    def process_message(self, msg):
        if msg["type"] == "control_flow":
            raise NotImplementedError(
                "OnlineEM: the model uses numpyro.contrib.control_flow.scan. " + CHAINS_UNSUPPORTED
            )
        if msg["type"] == "sample" and any(type(h) is LocalNamedMessenger for h in _PYRO_STACK):
            raise NotImplementedError(
                f"OnlineEM: site '{msg['name']}' is inside a numpyro.contrib.funsor.markov "
                "context. " + CHAINS_UNSUPPORTED
            )


class _CheckedSubstitute(Messenger):
    """``handlers.substitute(data=values)`` that first checks each value's shape against
    the site's own (a ``numpyro.param``'s initial value, a sample site's distribution),
    so that a wrong shape is named instead of failing inside the model."""

    def __init__(self, fn, values: dict, what: str):
        self.values = values
        self.what = what
        super().__init__(fn)

    def process_message(self, msg):
        name = msg.get("name")
        if msg["type"] not in ("param", "sample") or name not in self.values:
            return
        value = self.values[name]
        if msg["type"] == "param":
            expected = tuple(jnp.shape(msg["args"][0])) if msg["args"] else None
        else:
            expected = tuple(msg["fn"].shape(msg["kwargs"].get("sample_shape", ())))
        got = tuple(jnp.shape(value))
        if expected is not None and got != expected:
            raise ValueError(
                f"OnlineEM.init: {self.what}['{name}'] has shape {got}, but site '{name}' "
                f"has shape {expected}."
            )
        msg["value"] = value


def batch_indices(size: int, subsample_size: int) -> jax.Array:
    """The data plate's indices by default: the first ``subsample_size`` points. A model
    that does not read its data through them (it gets its mini-batch as an argument)
    only takes their number; fixing them spares NumPyro's draw of a random subset of
    ``size`` at every update."""
    return jnp.arange(subsample_size)


def all_indices(size: int, subsample_size: int) -> jax.Array:
    """Every point of the data plate: log-likelihoods and marginals of the whole data."""
    return jnp.arange(size)


def random_indices(rng_key: jax.Array) -> Callable:
    """Indices drawn uniformly with replacement: $O(B)$ per update, where NumPyro's
    draw without replacement costs $O(N)$."""

    def draw(size: int, subsample_size: int) -> jax.Array:
        return jax.random.randint(rng_key, (subsample_size,), 0, size)

    return draw


class _DataPlateIndices(Messenger):
    """Sets the subsample indices of the data plate: ``indices(size, subsample_size)``."""

    def __init__(self, fn, data_plate: str, indices: Callable):
        self.data_plate = data_plate
        self.indices = indices
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "plate" or msg["name"] != self.data_plate:
            return
        size, subsample_size = msg["args"]
        if subsample_size is None or subsample_size == size:
            return
        value = self.indices(size, subsample_size)
        msg["value"] = value
        msg["args"] = (size, value.shape[0])


def reads_subsample(model: Callable, sites: ModelSites, args: tuple, kwargs: dict) -> bool:
    """Whether the observed values change with the data plate's subsample indices."""
    traces = []
    for shift in (0, 1):

        def indices(size, subsample_size, shift=shift):
            return (jnp.arange(subsample_size) + shift) % size

        fn = _DataPlateIndices(model, sites.data_plate, indices)
        traces.append(trace_model(fn, args, kwargs))
    return any(
        not np.array_equal(np.asarray(traces[0][n]["value"]), np.asarray(traces[1][n]["value"]))
        for n in sites.observed
    )


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
    fn = handlers.seed(_ChainGuard(model), rng_key)
    fn = handlers.substitute(fn, substitute_fn=init_to_median)
    fn = _CheckedSubstitute(fn, params or {}, "init_params")
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
            "the data points are conditionally independent. (Observations in a Python "
            "loop over time steps, each with its own discrete state, form a Markov "
            f"chain: {CHAINS_UNSUPPORTED})"
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
            _check_runs_along_plate(site, data_plate)
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
        num_states={n: support_size(trace[n]["fn"]) for n in enumerated},
    )


def support_size(fn) -> int:
    """The number of values of a discrete distribution's support (a static shape, also
    under ``jit``)."""
    return int(jnp.shape(fn.enumerate_support(expand=False))[0])


def _check_runs_along_plate(site: dict, data_plate: str) -> None:
    """An observed value must have one entry per data point along the data plate; a value
    broadcast along it (a single point given where a batch is expected) is refused."""
    frame = data_plate_frame(site, data_plate)
    shape = tuple(jnp.shape(site["value"]))
    batch = shape[: len(shape) - site["fn"].event_dim]
    along = batch[frame.dim] if len(batch) >= -frame.dim else 1
    if along != frame.size:
        raise ValueError(
            f"OnlineEM: observed site '{site['name']}' has a value of shape {shape}, which "
            f"does not run along the data plate '{data_plate}' (size {frame.size}, dim "
            f"{frame.dim}): every data point would see the same value. Pass the data as a "
            "batch whose first axis runs over the data points; a single point is a batch "
            "of one, x[None]."
        )


def enum_trace(
    model: Callable,
    sites: ModelSites,
    params: dict,
    args: tuple,
    kwargs: dict,
    indices: Callable = batch_indices,
    concrete: bool = False,
) -> OrderedDict:
    """Trace ``model`` with ``params`` substituted and the enumerated sites enumerated in
    parallel, each over a batch dimension left of the plates, and the data plate's
    subsample ``indices`` (`batch_indices`, `all_indices`, `random_indices`). Every
    sample site carries ``site["infer"]["dim_to_name"]`` for funsor.

    With ``concrete``, the trace's values are computed by one compiled program per
    model, sites and shapes (`numpyro_onlineem.compiled`) rather than one per operation.
    """
    if concrete and indices is batch_indices:  # (other indices close over a key)
        inputs, static_args = split_args(args, kwargs)
        return compiled(_enum_run, (model, sites, static_args), (params, inputs))
    enumerated = set(sites.enumerated)

    def config(site):
        if site["type"] == "sample" and site["name"] in enumerated:
            return {"enumerate": "parallel"}
        return {}

    fn = _DataPlateIndices(model, sites.data_plate, indices)
    fn = handlers.substitute(fn, data=params)
    fn = numpyro.contrib.funsor.infer_config(fn, config)
    fn = enum_handler(fn, first_available_dim=-sites.max_plate_nesting - 1)
    fn = handlers.seed(fn, jax.random.PRNGKey(0))
    with numpyro.validation_enabled(False), plate_to_enum_plate():
        return packed_trace(fn).get_trace(*args, **kwargs)


def _enum_run(model: Callable, sites: ModelSites, static_args, arrays: tuple) -> OrderedDict:
    params, inputs = arrays
    args, kwargs = merge_args(inputs, static_args)
    return enum_trace(model, sites, params, args, kwargs)


def data_plate_frame(site: dict, data_plate: str):
    """The ``CondIndepStackFrame`` of the data plate in ``site``."""
    for f in site["cond_indep_stack"]:
        if f.name == data_plate:
            return f
    raise KeyError(data_plate)
