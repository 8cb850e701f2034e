"""Eager checks of user input, outside jit, with messages that name the fix.

Every check raises before any state is touched, so the state a caller passed in stays
valid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class InputSpec(NamedTuple):
    """Shapes of the model's array arguments at ``init``: ``(name, ndim, trailing)``."""

    arrays: tuple
    statics: tuple


def _named_inputs(args: tuple, kwargs: dict):
    for i, a in enumerate(args):
        yield f"args[{i}]", a
    for k in sorted(kwargs):
        yield k, kwargs[k]


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array | np.generic)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _all_finite(x) -> bool:
    """Fast check, on the device for JAX arrays (no copy to the host)."""
    if not np.issubdtype(x.dtype, np.inexact):
        return True
    if isinstance(x, jax.Array):
        return bool(jnp.isfinite(x).all())
    return bool(np.isfinite(x).all())


def describe_inputs(args: tuple, kwargs: dict) -> InputSpec:
    arrays, statics = [], []
    for name, val in _named_inputs(args, kwargs):
        if _is_array(val):
            arrays.append((name, np.ndim(val), tuple(np.shape(val)[1:])))
        elif val is None or isinstance(val, int | float | str | bool):
            statics.append((name, val))
    return InputSpec(tuple(arrays), tuple(statics))


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
        if values and not _is_tracer(val) and not _all_finite(val):
            bad = ~np.isfinite(np.asarray(val))
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
