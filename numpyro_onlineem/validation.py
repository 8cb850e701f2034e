"""Eager checks of user input, outside jit, with messages that name the fix.

Every check raises before any state is touched, so the state a caller passed in stays
valid. Shapes are always checked. Values (finite, inside the observed sites' supports)
are checked here for NumPy data, on the host, at no cost to the device; JAX arrays are
not read back (that would wait for the device at every batch): the compiled update
checks them, skips a bad batch and flags it in `UpdateInfo`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class InputSpec(NamedTuple):
    """What ``init`` saw of the model's arguments.

    Attributes
    ----------
    arrays : tuple of (name, ndim, trailing shape)
        The array arguments.
    statics : tuple of (name, value)
        The other arguments.
    observed : tuple of (name, site, support)
        Array arguments that are observed values as they are (``obs=x``), with the
        support of their site.
    """

    arrays: tuple
    statics: tuple
    observed: tuple = ()


def _named_inputs(args: tuple, kwargs: dict):
    for i, a in enumerate(args):
        yield f"args[{i}]", a
    for k in sorted(kwargs):
        yield k, kwargs[k]


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array | np.generic)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _on_host(x) -> bool:
    """NumPy data, whose values can be checked without waiting for the device."""
    return isinstance(x, np.ndarray | np.generic)


def describe_inputs(args: tuple, kwargs: dict, observed: dict | None = None) -> InputSpec:
    """The `InputSpec` of a call; ``observed`` maps observed site names to their
    traced sites, to find the arguments used as observed values directly."""
    arrays, statics, obs = [], [], []
    for name, val in _named_inputs(args, kwargs):
        if _is_array(val):
            arrays.append((name, np.ndim(val), tuple(np.shape(val)[1:])))
            for site_name, site in (observed or {}).items():
                if site["value"] is val:
                    obs.append((name, site_name, site["fn"].support))
        elif val is None or isinstance(val, int | float | str | bool):
            statics.append((name, val))
    return InputSpec(tuple(arrays), tuple(statics), tuple(obs))


def _first_bad(ok, values, shape) -> str:
    bad = ~np.asarray(ok, bool)
    index = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()
    return f"{int(bad.sum())} value(s) outside it, the first at index {index}: " + repr(
        np.asarray(values)[index] if np.ndim(values) else np.asarray(values)
    )


def check_support(first, where: str) -> None:
    """Every observed value of the model's first run
    (`numpyro_onlineem.first_trace.FirstTrace`) lies in its site's support.

    Raises
    ------
    ValueError
        Naming the site, the index of the first value outside the support, and it.
    """
    for name, ok in first.in_support.items():
        if _is_tracer(ok):  # init under the caller's jit: the values are not known
            continue
        ok = np.asarray(ok)
        if not ok.all():
            raise ValueError(
                f"OnlineEM.{where}: observed site '{name}' must lie in its support "
                f"{first.supports[name]}; it has "
                f"{_first_bad(ok, first.observed[name], ok.shape)}. Drop or correct those "
                "points before the update."
            )


def check_inputs(
    spec: InputSpec | None, args: tuple, kwargs: dict, where: str, values: bool = True
) -> None:
    """Reject empty batches, non-finite values (when ``values``) and shapes that differ
    from ``init``'s.

    Raises
    ------
    ValueError
        Naming the argument, its shape or value, and the fix.
    """
    found = dict(_named_inputs(args, kwargs))
    for name, val in found.items():
        if not _is_array(val):
            continue
        shape = tuple(np.shape(val))
        if shape and shape[0] == 0:
            raise ValueError(
                f"OnlineEM.{where}: argument {name} is an empty batch (shape {shape}); pass "
                "at least one data point."
            )
        if values and _on_host(val) and np.issubdtype(val.dtype, np.inexact):
            bad = ~np.isfinite(val)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"OnlineEM.{where}: argument {name} (shape {shape}) has "
                    f"{int(bad.sum())} non-finite value(s), the first at index {first}: "
                    f"{np.asarray(val)[first]}. Drop or impute those points before the update."
                )
    if spec is None:
        return
    for name, ndim, trailing in spec.arrays:
        if name not in found:
            raise ValueError(f"OnlineEM.{where}: argument {name} given at init is missing.")
        shape = tuple(np.shape(found[name]))
        if ndim == 0 and len(shape) == 0:
            continue
        if len(shape) != ndim or shape[1:] != trailing:
            expect = "(batch, " + ", ".join(map(str, trailing)) + ")" if trailing else "(batch,)"
            raise ValueError(
                f"OnlineEM.{where}: argument {name} has shape {shape}, but init saw "
                f"{expect}. Every batch must keep the trailing shape; a single point is "
                f"a batch of one: reshape it to (1, {', '.join(map(str, trailing))})."
            )
    if values:
        for name, site, support in spec.observed:
            val = found.get(name)
            if val is not None and _on_host(val):
                ok = np.asarray(support(val))
                if not ok.all():
                    raise ValueError(
                        f"OnlineEM.{where}: argument {name} is observed site '{site}', which "
                        f"must lie in its support {support}; it has {_first_bad(ok, val, 0)}. "
                        "Drop or correct those points before the update."
                    )
    known = {name for name, _ in spec.statics} | {name for name, _, _ in spec.arrays}
    for name, val in found.items():
        if name not in known and not _is_array(val):
            raise ValueError(
                f"OnlineEM.{where}: argument {name} = {val!r} was not given at init; the "
                "model's structure is fixed at init: pass the same arguments to both."
            )
    for name, val in spec.statics:
        if name in found and not _is_tracer(found[name]) and found[name] != val:
            raise ValueError(
                f"OnlineEM.{where}: argument {name} is {found[name]!r} but was {val!r} at "
                "init; call init again to change the model's structure."
            )
