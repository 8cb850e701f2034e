"""Value keys of static configuration: what ``jit`` compares to reuse a compiled update.

The M-step plan and the settings of `OnlineEM` reach ``jit`` as static data (pytree
metadata and static arguments). ``jit`` reuses a compiled function when their hashes
and ``==`` agree, so they compare by *value*: two ``init`` calls on the same model,
settings and shapes give equal plans and compile nothing the second time, and a state
restored with a plan rebuilt from the model finds the compiled update of the first.

`freeze` turns the nested containers those objects hold (dicts, tuples, NumPy index
maps, NumPyro constraints, registered families) into one hashable key.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jax
import numpy as np
from numpyro.distributions import constraints


def freeze(x: Any) -> Any:
    """A hashable key equal for equal values: containers by content and order, arrays by
    shape, dtype and bytes, NumPyro constraints by type and arguments, other objects
    (registered families) by themselves; a function by itself and the plain values it
    reads (`_read_values`); a ``functools.partial`` by its function and bound
    arguments."""
    if x is None or isinstance(x, bool | int | float | str | bytes | np.generic):
        return x
    if isinstance(x, np.ndarray | jax.Array):
        arr = np.asarray(x)
        return ("array", arr.shape, arr.dtype.str, arr.tobytes())
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple
        return (type(x).__qualname__, *(freeze(v) for v in x))
    if isinstance(x, tuple | list):
        return (type(x).__name__, *(freeze(v) for v in x))
    if isinstance(x, dict):
        return ("dict", *((k, freeze(v)) for k, v in x.items()))
    if isinstance(x, frozenset | set):
        return ("set", *sorted(map(freeze, x), key=repr))
    if isinstance(x, functools.partial):  # a model with some arguments bound
        return ("partial", freeze(x.func), freeze(x.args), freeze(x.keywords))
    if isinstance(x, types.FunctionType):
        return ("function", x, _read_values(x))
    if isinstance(x, constraints.Constraint):
        # numpyro's parametrised constraints (interval, ...) define == but no hash
        return ("constraint", type(x).__qualname__, freeze(dict(sorted(vars(x).items()))))
    if callable(x) and hasattr(x, "__dict__") and not isinstance(x, type):
        # a model object: itself and the plain values of its attributes
        values = sorted((k, _value_key(v)) for k, v in vars(x).items() if _is_value(v))
        return ("callable", x, tuple(values))
    return x


_VALUE_TYPES = (bool, int, float, complex, str, bytes, np.generic, np.ndarray, jax.Array)
_LARGE = 10_000  # elements: a larger array counts by identity, not by its bytes


def _value_key(v: Any) -> Any:
    if isinstance(v, np.ndarray | jax.Array) and np.size(v) > _LARGE:
        return ("large array", id(v), np.shape(v), str(v.dtype))
    return freeze(v)


def _is_value(v: Any) -> bool:
    if isinstance(v, tuple):
        return all(_is_value(e) for e in v)
    return v is None or isinstance(v, _VALUE_TYPES)


def _names(code: types.CodeType) -> set:
    """The global names a function's code reads, its nested functions' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _read_values(fn: types.FunctionType) -> tuple:
    """The plain values (numbers, strings, arrays, tuples of them) a function reads from
    its module's globals, its closure and its defaults. A compiled function bakes them
    in, as ``jax.jit`` does; keying on them means that a model run again after a
    module-level constant changed (``INIT_SCALE = 5.0`` in a notebook) compiles again
    instead of using the old value."""
    glob = fn.__globals__
    out = [
        (name, _value_key(glob[name]))
        for name in sorted(_names(fn.__code__))
        if name in glob and _is_value(glob[name])
    ]
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _is_value(value):
            out.append((name, _value_key(value)))
    out.append(("defaults", freeze(fn.__defaults__), freeze(fn.__kwdefaults__)))
    return tuple(out)


class Static:
    """A value made hashable by `freeze`, for ``jit``'s static arguments (NumPyro's
    parametrised constraints define ``==`` but no hash)."""

    __slots__ = ("value", "_key")

    def __init__(self, value: Any):
        self.value = value
        self._key = freeze(value)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and self._key == other._key
