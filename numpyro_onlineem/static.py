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
from typing import Any

import jax
import numpy as np
from numpyro.distributions import constraints


def freeze(x: Any) -> Any:
    """A hashable key equal for equal values: containers by content and order, arrays by
    shape, dtype and bytes, NumPyro constraints by type and arguments, other objects
    (functions, registered families) by themselves; a ``functools.partial`` by its
    function and bound arguments."""
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
    if isinstance(x, constraints.Constraint):
        # numpyro's parametrised constraints (interval, ...) define == but no hash
        return ("constraint", type(x).__qualname__, freeze(dict(sorted(vars(x).items()))))
    return x


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
