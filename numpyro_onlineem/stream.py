"""Streams: what a user gives `OnlineEM.run`, turned into the model's arguments, one
batch at a time.

An item of a stream is a batch array, a tuple of positional arguments, or an
``(args, kwargs)`` pair; the arguments given to ``run`` itself follow each item's. An
array stream is cut into batches along its first axis. Items hold per-datum arrays
(their first axis runs over the data points): a single point, one dimension fewer, is a
batch of one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np


class StaticArgs(NamedTuple):
    """The non-array part of the model's arguments (hashable: compiled into the update).

    Attributes
    ----------
    treedef : PyTreeDef
        Structure of ``(args, kwargs)``.
    is_array : tuple of bool
        Which leaves are arrays (traced).
    values : tuple
        The other leaves (Python scalars, strings, None), ``None`` at array positions.
    """

    treedef: Any
    is_array: tuple
    values: tuple


def is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def as_arrays(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Lists of numbers become NumPy arrays (``[[1.0, 2.0], [3.0, 4.0]]`` is a batch of
    two points); every other argument is passed on as it is."""

    def convert(x):
        if isinstance(x, list):
            arr = np.asarray(x)
            if arr.dtype.kind in "biuf":
                return arr
            raise TypeError(
                f"OnlineEM: a list argument must hold numbers (a batch of data), got "
                f"{type(x[0]).__name__ if x else 'an empty list'} elements; pass a NumPy "
                "or JAX array."
            )
        return x

    return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}


def split_args(args: tuple, kwargs: dict) -> tuple[list, StaticArgs]:
    """Arrays are traced; Python scalars, strings and None (``K=3``) stay static."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    flags = tuple(is_array(leaf) for leaf in leaves)
    arrays = [leaf for leaf, a in zip(leaves, flags, strict=True) if a]
    values = tuple(None if a else leaf for leaf, a in zip(leaves, flags, strict=True))
    return arrays, StaticArgs(treedef, flags, values)


def merge_args(arrays: list, static: StaticArgs) -> tuple[tuple, dict]:
    """The inverse of `split_args`."""
    it = iter(arrays)
    leaves = [next(it) if a else v for a, v in zip(static.is_array, static.values, strict=True)]
    return jax.tree.unflatten(static.treedef, leaves)


def as_call(item: Any) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` that one stream item holds (a bare Python number is a
    scalar data point)."""
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], tuple)
        and isinstance(item[1], dict)
    ):
        args, kwargs = item
    elif isinstance(item, tuple):
        args, kwargs = item, {}
    elif isinstance(item, int | float) and not isinstance(item, bool):
        args, kwargs = (np.asarray(item),), {}  # a scalar data point
    else:
        args, kwargs = (item,), {}
    return as_arrays(tuple(args), dict(kwargs))


def with_extra(call: tuple[tuple, dict], extra: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """An item's arguments followed by ``run``'s own ``*args`` and ``**kwargs``."""
    return call[0] + extra[0], {**call[1], **extra[1]}


def add_batch_axis(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """A single point as a batch of one: a leading axis on every array of the item."""
    args, kwargs = call
    expand = lambda a: np.asarray(a)[None] if is_array(a) else a
    return tuple(expand(a) for a in args), {k: expand(v) for k, v in kwargs.items()}


def num_points(call: tuple[tuple, dict]) -> int:
    """Points in an item: the length of its first array's first axis."""
    for leaf in jax.tree.leaves(call):
        if is_array(leaf):
            return int(np.shape(leaf)[0]) if np.ndim(leaf) else 1
    raise ValueError("OnlineEM.run: a stream item holds no array (no data).")


def concat_calls(calls: list) -> tuple[tuple, dict]:
    """One batch from several: the arrays concatenated along their first axis (the data
    points), every other argument taken from the first."""
    arrays = [split_args(*call)[0] for call in calls]
    static = split_args(*calls[0])[1]
    merged = [np.concatenate([np.asarray(a[i]) for a in arrays]) for i in range(len(arrays[0]))]
    return merge_args(merged, static)


class Chunk(NamedTuple):
    """Equal batches of an array stream, stacked: ``data`` has shape
    ``(num_batches, batch_size, ...)``; its first ``skip`` batches were applied already
    (the last chunk of an array is a full chunk's window that ends at the array's end,
    so that it shares the full chunks' compiled program with no padding)."""

    data: Any
    skip: int = 0


@functools.partial(jax.jit, static_argnums=(2, 3))
def _window(data: jax.Array, start: jax.Array, num: int, batch_size: int) -> jax.Array:
    """Batches ``start`` to ``start + num`` of a device array, stacked:
    ``(num, batch_size, ...)``, in one copy (slicing and then reshaping eagerly copies
    twice). Compiled per array shape: a program of one slice."""
    flat = jax.lax.dynamic_slice_in_dim(data, start * batch_size, num * batch_size)
    return flat.reshape((num, batch_size) + data.shape[1:])


def array_chunks(data: Any, batch_size: int, chunk_len) -> Iterator:
    """Cut an array into `Chunk` s of ``chunk_len()`` batches (asked before each chunk);
    a final partial batch comes last, on its own. A NumPy array is cut into views, so
    each point is copied to the device once, by the compiled call that uses it; a
    device array into one copy per chunk (`_window`)."""
    n = data.shape[0]
    num = n // batch_size
    if isinstance(data, jax.Array):
        cut = lambda lo, hi: _window(data, np.int32(lo), hi - lo, batch_size)
    else:
        full = data[: num * batch_size].reshape((num, batch_size) + data.shape[1:])
        cut = lambda lo, hi: full[lo:hi]
    start = 0
    while start < num:
        size = chunk_len()
        stop = min(start + size, num)
        if stop - start < size <= num:  # a full-sized window ending at the last batch
            yield Chunk(cut(num - size, num), skip=size - (stop - start))
        else:
            yield Chunk(cut(start, stop))
        start = stop
    if num * batch_size < n:
        yield data[num * batch_size :]
