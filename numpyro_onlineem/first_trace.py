"""The model's first run at ``init``: its sites, initial values and observed values,
from one compiled program (`numpyro_onlineem.compiled`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from numpyro_onlineem.compiled import NEEDS_VALUES, compiled, shapes
from numpyro_onlineem.estep.enumerate import num_data
from numpyro_onlineem.model import ModelSites, classify_sites, trace_model
from numpyro_onlineem.static import Static
from numpyro_onlineem.stream import StaticArgs, merge_args, split_args


class FirstTrace(NamedTuple):
    """What `OnlineEM.init` reads from the model's first run.

    Attributes
    ----------
    sites : ModelSites
    values : dict
        Site -> initial value of every estimated site (``numpyro.param`` and global
        latent sites), in ``sites.params`` order.
    observed : dict
        Observed site -> its value.
    in_support : dict
        Observed site -> boolean array, whether each value lies in the site's support.
    supports : dict
        Observed site -> its support (a NumPyro constraint).
    sizes : tuple of (int, float)
        ``(batch_size, total_size)`` of the data plate (`num_data`).
    keys : tuple of PRNGKey
        ``(key_init, key_state)``: the two keys left after the run's own, split from
        the caller's key.
    """

    sites: ModelSites
    values: dict
    observed: dict
    in_support: dict
    supports: dict
    sizes: tuple
    keys: tuple


def _first_run(
    model: Callable, data_plate: str | None, static_args: StaticArgs, arrays: tuple
) -> FirstTrace:
    rng_key, inputs, init_params = arrays
    args, kwargs = merge_args(inputs, static_args)
    key_trace, key_init, key_state = jax.random.split(rng_key, 3)
    trace = trace_model(model, args, kwargs, init_params, key_trace)
    sites = classify_sites(trace, data_plate)
    return FirstTrace(
        sites=sites,
        values={n: trace[n]["value"] for n in sites.params},
        observed={n: trace[n]["value"] for n in sites.observed},
        in_support={n: trace[n]["fn"].support(trace[n]["value"]) for n in sites.observed},
        supports={n: trace[n]["fn"].support for n in sites.observed},
        sizes=num_data(trace, sites),
        keys=(key_init, key_state),
    )


def first_trace(
    model: Callable,
    data_plate: str | None,
    rng_key: jax.Array,
    args: tuple,
    kwargs: dict,
    init_params: dict,
) -> FirstTrace:
    """Run ``model`` once, seeded, with ``init_params`` substituted and global latents
    at their prior median (`trace_model`), and classify its sites (`classify_sites`).

    Raises
    ------
    ValueError, NotImplementedError
        From `classify_sites`, for models online EM cannot fit.
    """
    inputs, static_args = split_args(args, kwargs)
    return compiled(_first_run, (model, data_plate, static_args), (rng_key, inputs, init_params))


_SITES: dict = {}
_MAX_SITES = 64


def model_sites(model: Callable, data_plate: str | None, args: tuple, kwargs: dict) -> ModelSites:
    """The model's sites (`classify_sites`) from an abstract run, ``jax.eval_shape``:
    nothing runs or compiles. Cached per model, arguments and shapes (compared by value),
    so that a second call traces nothing either.

    Raises
    ------
    ValueError, NotImplementedError
        From `classify_sites`, for models online EM cannot fit.
    """
    inputs, static_args = split_args(args, kwargs)
    key = Static((model, data_plate, static_args, shapes(inputs)))
    try:
        return _SITES[key]
    except (KeyError, TypeError):  # (TypeError: a static argument with no hash)
        pass
    found = {}

    def run(inputs):
        first = _first_run(model, data_plate, static_args, (jax.random.PRNGKey(0), inputs, {}))
        found["sites"] = first.sites
        return 0.0

    try:
        jax.eval_shape(run, inputs)
    except NEEDS_VALUES:  # a model that reads its values in Python: run it
        first = first_trace(model, data_plate, jax.random.PRNGKey(0), args, kwargs, {})
        found["sites"] = first.sites
    try:
        if len(_SITES) >= _MAX_SITES:
            _SITES.clear()
        _SITES[key] = found["sites"]
    except TypeError:
        pass
    return found["sites"]
