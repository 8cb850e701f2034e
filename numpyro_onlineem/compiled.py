"""Run a function of arrays as one compiled program, whatever Python objects it returns.

`OnlineEM.init` runs the model several times outside the update: once seeded, to
classify its sites (`numpyro_onlineem.first_trace`), and under enumeration, for the
data-driven start and the symmetry check. Run eagerly, every JAX operation of the model
(a gather, a categorical draw, a key split) is one more XLA program to compile, about
20 ms each on a CPU: 0.75 s for a Gaussian mixture's first run, measured in a new
process, against 0.26 s for the same run traced once and compiled as one program.

`compiled` traces ``fn(*static, arrays)`` under ``jit`` and splits what it returns (a
trace, a classification: any pytree) into its traced arrays, which become the compiled
program's outputs, and everything else (names, shapes, plates, constraints,
distributions' structure), kept from the trace. The result is the same pytree with
concrete arrays; an argument returned as it is comes back as the caller's own array
(``site["value"] is x`` holds for ``obs=x``, as it does eagerly). Programs are cached
per function, static arguments (compared by value, `numpyro_onlineem.static`) and
shapes, so that a second ``init`` of the same model compiles nothing.

A model that needs concrete values while it is traced (``int(x.sum())``, NumPy calls on
its arguments) cannot run under ``jit``; ``fn`` then runs eagerly, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints, transforms

from numpyro_onlineem.static import Static

NEEDS_VALUES = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)
"""The errors of a function that reads its arguments' values while it is traced."""


def shapes(tree) -> tuple:
    """What ``jit`` keys a trace on, for every leaf: shape, dtype and weak type (a Python
    number is weakly typed), so that one key is one trace."""
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple(_aval(x) for x in leaves))


def _aval(x) -> tuple:
    dtype = getattr(x, "dtype", None)
    dtype = str(np.asarray(x).dtype if dtype is None else dtype)
    weak = isinstance(x, int | float | complex) or bool(getattr(x, "weak_type", False))
    return (np.shape(x), dtype, weak)


_TAKEN_APART = (dist.Distribution, constraints.Constraint, transforms.Transform)


class _Unflattenable(Exception):
    """What ``fn`` returned cannot be taken apart into arrays and the rest."""


class _Object(NamedTuple):
    """A distribution, constraint or transform that holds traced values, taken apart:
    its class and its attributes (a pytree whose arrays ``jit`` can return)."""

    cls: type
    attrs: Any


class _Dict(NamedTuple):
    """A dict taken apart, its keys in their order (``jax.tree`` sorts a dict's keys:
    the sites would come back in alphabetical order)."""

    cls: type
    keys: tuple
    values: list


class _Named(NamedTuple):
    """A NamedTuple taken apart (so that the dicts inside it keep their order too)."""

    cls: type
    values: list


def _apart(x: Any) -> Any:
    """``x`` with its containers (dicts, NamedTuples) and every NumPyro distribution,
    constraint and transform that holds a traced value replaced by records of *all*
    their contents, cached properties included: their own pytree flattening keeps only
    the constructor's arguments (a ``MultivariateNormal`` given a covariance matrix
    would come back with its Cholesky factor alone). Objects without traced values are
    kept as they are, so ``constraints.real`` stays NumPyro's own singleton."""
    if isinstance(x, dict):
        return _Dict(type(x), tuple(x), [_apart(v) for v in x.values()])
    if isinstance(x, list):
        return [_apart(v) for v in x]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return _Named(type(x), [_apart(v) for v in x])
    if type(x) is tuple:
        return tuple(_apart(v) for v in x)
    if isinstance(x, _TAKEN_APART) and hasattr(x, "__dict__") and _holds_tracer(x, 8):
        return _Object(type(x), _apart(vars(x)))
    return x


def _together(x: Any) -> Any:
    """The inverse of `_apart`."""
    if isinstance(x, _Dict):
        items = zip(x.keys, (_together(v) for v in x.values), strict=True)
        try:
            return x.cls(items)
        except TypeError:  # a dict subclass with other constructor arguments
            return dict(items)
    if isinstance(x, _Named):
        return x.cls(*(_together(v) for v in x.values))
    if isinstance(x, _Object):
        obj = object.__new__(x.cls)
        obj.__dict__.update(_together(x.attrs))
        return obj
    if isinstance(x, list):
        return [_together(v) for v in x]
    if type(x) is tuple:
        return tuple(_together(v) for v in x)
    return x


def _holds_tracer(x: Any, depth: int = 4) -> bool:
    """Whether a Python object kept from the trace refers to a traced value through its
    attributes, containers or closure (a few levels deep)."""
    if isinstance(x, jax.core.Tracer):
        return True
    if depth == 0 or isinstance(x, str | bytes | int | float | type | np.ndarray):
        return False
    if isinstance(x, dict):
        children = list(x.values())
    elif isinstance(x, list | tuple | set | frozenset):
        children = list(x)
    else:
        children = list(getattr(x, "__dict__", {}).values())
        for cell in getattr(x, "__closure__", None) or ():
            try:
                children.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    return any(_holds_tracer(c, depth - 1) for c in children)


def _flatten(tree: Any):
    return jax.tree.flatten(_apart(tree), is_leaf=lambda x: isinstance(x, type | dict))


@functools.lru_cache(maxsize=128)
def _program(key: Static):
    """The compiled program of one value key, and the untraced part of its output (set
    when ``jit`` traces it)."""
    fn, static, _ = key.value
    found: dict = {}

    def run(arrays):
        inputs = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(arrays))}
        out = fn(*static, arrays)
        try:
            leaves, treedef = _flatten(out)
        except TypeError as e:  # a dict whose keys do not sort
            raise _Unflattenable from e
        # each leaf: ("kept", object), ("input", index): an argument passed through as
        # it is, given back as the caller's own array, or ("output", None)
        how = []
        for leaf in leaves:
            if not isinstance(leaf, jax.core.Tracer):
                if _holds_tracer(leaf):  # it would leak the trace's values
                    raise _Unflattenable
                how.append(("kept", leaf))
            elif id(leaf) in inputs:
                how.append(("input", inputs[id(leaf)]))
            else:
                how.append(("output", None))
        found["treedef"], found["how"] = treedef, how
        return [leaf for leaf, (kind, _) in zip(leaves, how, strict=True) if kind == "output"]

    return jax.jit(run), found


def compiled(fn: Callable[..., Any], static: tuple, arrays: Any) -> Any:
    """``fn(*static, arrays)``, computed by one compiled program (see the module
    docstring).

    Parameters
    ----------
    fn : callable
        A module-level function (it is part of the cache key), pure in ``arrays``.
    static : tuple
        Its other arguments, compared by value (`numpyro_onlineem.static.freeze`).
    arrays : pytree of arrays
        Traced.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arrays)):
        return fn(*static, arrays)  # already under the caller's jit
    key = Static((fn, static, shapes(arrays)))
    try:
        hash(key)
    except TypeError:  # a static argument that compares by value but has no hash
        return fn(*static, arrays)
    try:
        program, found = _program(key)
        outputs = program(arrays)
    except (*NEEDS_VALUES, _Unflattenable):
        return fn(*static, arrays)
    if len(outputs) != sum(kind == "output" for kind, _ in found["how"]):
        raise RuntimeError("numpyro_onlineem.compiled: a program and its trace disagree.")
    inputs, outputs = jax.tree.leaves(arrays), iter(outputs)
    leaves = [
        next(outputs) if kind == "output" else inputs[what] if kind == "input" else what
        for kind, what in found["how"]
    ]
    return _together(jax.tree.unflatten(found["treedef"], leaves))
