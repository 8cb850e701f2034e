"""The loop of `OnlineEM.run`: a stream of arrays, batches or single points, turned into
an initialisation and fused compiled updates, with a progress bar in points.

* An array with ``batch_size`` is cut into chunks of ``chunk_size`` batches, each one
  compiled ``lax.scan`` (`numpyro_onlineem.stream.array_chunks`).
* An iterable's items (a batch, a tuple of arguments, an ``(args, kwargs)`` pair, a
  single point) are buffered into chunks of batches of one shape; single points become
  batches of one (`numpyro_onlineem.stream`).
* Without ``init_state``, `OnlineEM.init` takes the stream's first ``init_points``
  points (single points and small batches are buffered for it).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_onlineem.core import settled_flags
from numpyro_onlineem.state import OnlineEMRunResult, OnlineEMState
from numpyro_onlineem.stream import (
    Chunk,
    add_batch_axis,
    array_chunks,
    as_call,
    concat_calls,
    is_array,
    num_points,
    split_args,
    with_extra,
)
from numpyro_onlineem.validation import check_inputs


def run_stream(
    em,
    rng_key: jax.Array,
    stream,
    extra: tuple,
    *,
    batch_size: int | None,
    progress_bar: bool,
    init_params: dict | None,
    init_state: OnlineEMState | None,
    init_points: int | None,
) -> OnlineEMRunResult:
    """`OnlineEM.run` (see there); ``extra``: the model's other ``(args, kwargs)``."""
    if isinstance(stream, np.ndarray | jax.Array):
        if batch_size is None:
            raise ValueError(
                "OnlineEM.run: pass batch_size=... to cut an array stream into batches."
            )
        _check_batch_size(batch_size)
        if not stream.shape or stream.shape[0] == 0:
            raise ValueError(
                f"OnlineEM.run: the stream is an array of shape {stream.shape}, with no "
                "points along its first axis."
            )
    elif batch_size is not None and _is_columns(stream):
        _check_batch_size(batch_size)
        stream = _cut_columns(stream, int(batch_size))
    elif batch_size is not None:
        warnings.warn(
            f"OnlineEM.run: batch_size={batch_size} cuts arrays and tuples of arrays only; "
            f"the items of this {type(stream).__name__} are the batches as they come "
            "(single points, or batches of any size). Pass an array, or items of the batch "
            "size you want.",
            UserWarning,
            stacklevel=3,
        )
    runner = _Runner(em, extra, progress_bar)
    try:
        state = init_state
        if isinstance(stream, np.ndarray | jax.Array):
            data = stream if isinstance(stream, jax.Array) else np.asarray(stream)
            runner.start(total=int(data.shape[0]))
            if state is None:
                first = (data[: int(batch_size)],), {}
                with runner.explain_type_errors(first):
                    n0 = em._array_init_points(data, extra, int(batch_size), init_points)
                state = runner.init(rng_key, [((data[:n0],), {})], init_params)
                data = data[n0:]
            if state.plan.model_sites.reads_subsample:
                raise ValueError(
                    "OnlineEM.run: the model draws its mini-batches itself (its data "
                    f"plate '{state.plan.model_sites.data_plate}' subsamples the arrays "
                    "it is given), so an array cut into batches would be subsampled "
                    "again. Pass the whole data at every update: em.update(state, x) in "
                    "a loop, or em.run(key, itertools.repeat(x, num_updates), ...); or "
                    "pass mini-batches and let the plate only state N: "
                    "numpyro.plate('data', N, subsample_size=x.shape[0]) without x[idx]."
                )
            items = array_chunks(data, int(batch_size), runner.chunk_len)
        else:
            runner.start(total=None)
            items = iter(stream)
            if state is None:
                state = runner.init_from_items(rng_key, items, init_params, init_points)
        state = runner.consume(state, items)
    finally:
        runner.close()
    if state is None:
        raise ValueError("OnlineEM.run: the stream was empty.")
    return runner.result(state)


class _Runner:
    """The loop of `OnlineEM.run`: initialisation from the stream's first points, fused
    updates, the progress bar, losses and skipped batches."""

    SLOW_CHUNK_SECONDS = 1.0
    # a final partial chunk is padded (with batches of zeros, never computed) when that
    # copies at most this many points of padding (or as many as it holds): cheaper than
    # compiling a single update (seconds)
    PAD_POINTS = 65_536

    def __init__(self, em, extra: tuple, progress_bar: bool):
        self.em = em
        self.extra = extra
        self.progress_bar = progress_bar
        self.length = em.chunk_size
        self.timed = set()
        self.infos = []
        self.bar = None
        self.checked = None  # (shape, dtype, static, other arrays) of the last chunk

    def chunk_len(self) -> int:
        return self.length

    def start(self, total: int | None) -> None:
        if self.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                desc="OnlineEM", total=total, unit="pt", unit_scale=True, mininterval=0.5
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # --------------------------------------------------------------- init
    def init(self, rng_key, calls: list, init_params) -> OnlineEMState:
        item = calls[0] if len(calls) == 1 else concat_calls(calls)
        args, kwargs = with_extra(item, self.extra)
        with self.explain_type_errors(item):
            try:
                state = self.em.init(rng_key, *args, init_params=init_params, **kwargs)
            except ValueError as e:
                if "Drop or" not in str(e):  # not about the data's values
                    raise
                raise ValueError(
                    f"OnlineEM.run: the stream's first {num_points(item)} points initialise "
                    f"the fit (OnlineEM.init), and {str(e).removeprefix('OnlineEM.init: ')} "
                    "Later batches with such values are skipped (with a warning); the "
                    "points that initialise the fit cannot be."
                ) from e
        if self.bar is not None:
            self.bar.update(num_points(item))
        return state

    @contextlib.contextmanager
    def explain_type_errors(self, item):
        """A model called with the wrong arguments says how ``run`` calls it."""
        try:
            yield
        except TypeError as e:
            args, kwargs = with_extra(item, self.extra)
            raise TypeError(
                f"OnlineEM.run: the model failed on the arguments {_describe(args, kwargs)}: "
                f"{e}. run calls the model with each stream item's arrays, then run's own "
                "*args and **kwargs: em.run(key, x, N, batch_size=100) calls "
                "model(x[i:i + 100], N)."
            ) from e

    def init_from_items(self, rng_key, items, init_params, init_points) -> OnlineEMState | None:
        first = next(items, None)
        if first is None:
            return None
        call = as_call(first)
        point_ndims = _ndims(call)
        with self.explain_type_errors(call):
            point = self.em._is_single_point(call, self.extra)
            if point:
                call = add_batch_axis(call)
            plan = self.em._plan(jax.random.PRNGKey(0), *with_extra(call, self.extra), {})
            if point:
                _check_prior_weight(plan)
            wanted = self.em._init_points(call, self.extra, init_points, plan)
        calls, seen = [call], num_points(call)
        while seen < wanted:
            item = next(items, None)
            if item is None:
                break
            call = as_call(item)
            if point and _ndims(call) == point_ndims:  # (a batch may follow single points)
                call = add_batch_axis(call)
            calls.append(call)
            seen += num_points(call)
        return self.init(rng_key, calls, init_params)

    # ------------------------------------------------------------ updates
    def consume(self, state, items) -> OnlineEMState | None:
        buffer, signature = [], None
        last = None  # (shape, dtype, expand, static) of the last bare-array item
        for item in items:
            if isinstance(item, Chunk):
                state = self._array_chunk(state, item)
                continue
            if last is not None and _same_bare_array(item, last):
                # a stream of arrays of one shape (single points, say): checked once
                arrays = [item[None] if last[2] else item] + last[4]
                static = last[3]
            else:
                args, kwargs = with_extra(as_call(item), self.extra)
                expanded = _single_point_to_batch(state.plan.input_spec, args, kwargs)
                check_inputs(state.plan.input_spec, *expanded, "run", values=False)
                arrays, static = split_args(*expanded)
                last = None
                if isinstance(item, np.ndarray) and not self.extra[1]:
                    expand = np.ndim(expanded[0][0]) != np.ndim(item)
                    last = (item.shape, item.dtype, expand, static, arrays[1:])
            if state.plan.model_sites.reads_subsample:
                # the whole data at every update: never stacked
                state = self._single(state, arrays, static)
                continue
            sig = (static, tuple(np.shape(a) for a in arrays))
            if buffer and (sig != signature or len(buffer) == self.length):
                state = self._flush(state, buffer)
                buffer = []
            buffer.append((arrays, static))
            signature = sig
        if buffer:
            state = self._flush(state, buffer)
        return state

    def _array_chunk(self, state, item):
        if state is None:  # an empty first part: init on the first batch
            state = self.init(jax.random.PRNGKey(0), [((item.data[0],), {})], None)
            item = Chunk(item.data[1:])
            if not len(item.data):
                return state
        data = item.data
        last = self.checked
        if last is None or last[0] != data.shape[1:] or last[1] != data.dtype:
            # chunks of one array share their shapes and other arguments: checked once
            args, kwargs = with_extra(((data[0],), {}), self.extra)
            check_inputs(state.plan.input_spec, args, kwargs, "run", values=False)
            _, static = split_args(args, kwargs)
            arrays = split_args(*with_extra(((data,), {}), self.extra))[0]
            self.checked = last = (data.shape[1:], data.dtype, static, arrays[1:])
        skip = item.skip
        return self._chunk(state, [data, *last[3]], last[2], int(data.shape[0]) - skip, skip)

    def _flush(self, state, buffer):
        static = buffer[0][1]
        stacked = [_stack(column) for column in zip(*(b[0] for b in buffer), strict=True)]
        return self._chunk(state, stacked, static, len(buffer))

    def _chunk(self, state, stacked, static, length, skip=0):
        """``length`` stacked batches in one fused call of the current chunk length,
        from batch ``skip`` of the stack on (the last chunk of an array: a full window
        whose first ``skip`` batches were applied already, see `Chunk`).

        A shorter chunk (the last of a generator's batches, or of an array shorter than
        a chunk) is padded (with zeros) to the chunk length, so that it needs no compile
        of its own; the fused call passes over the padding without computing it
        (`numpyro_onlineem.api._scan`). Padding is used when it costs at most
        `PAD_POINTS` points' copies (or as many as the chunk holds); otherwise the chunk
        runs one update at a time."""
        points = _batch_points(stacked[0], 1)
        if skip + length < self.length:
            wasted = (self.length - length) * points
            if wasted > max(length * points, self.PAD_POINTS):
                return self._singles(state, stacked, static, length)
            padded = [_pad(a, self.length) for a in stacked]
            new, infos = self.em._scan_jit(state, padded, static, np.int32(length), np.int32(0))
            self._record(infos, length * points, slice(0, length))
            return new
        start = time.perf_counter()
        count = (np.int32(length), np.int32(skip))
        state, infos = self.em._scan_jit(state, stacked, static, *count)
        self._record(infos, length * points, slice(skip, skip + length))
        elapsed = time.perf_counter() - start
        if self.length in self.timed and elapsed > self.SLOW_CHUNK_SECONDS and self.length > 1:
            # a fused call this slow would leave the progress bar still: shorter ones
            # (one more compile, only for updates that take this long anyway)
            self.length = max(1, 2 ** int(np.log2(self.length * 0.5 / elapsed)))
        self.timed.add(self.length)
        return state

    def _singles(self, state, stacked, static, length):
        for i in range(length):
            state = self._single(state, [a[i] for a in stacked], static)
        return state

    def _single(self, state, arrays, static):
        state, info = self.em._update_jit(state, arrays, static)
        self._record(info, _batch_points(arrays[0], 0), slice(None))
        return state

    def _record(self, infos, points: int, updates: slice) -> None:
        """Keep a fused call's (its ``updates``) or an update's info (``slice(None)``;
        on the device: read at the end)."""
        self.infos.append((infos, updates))
        if self.bar is not None:
            self.bar.update(points)
            loss = np.atleast_1d(np.asarray(infos.loss))[updates]
            self.bar.set_postfix(loss=f"{float(np.nanmean(loss)):.4f}", refresh=False)

    def result(self, state) -> OnlineEMRunResult:
        # every call's diagnostics to the host at once (one transfer each, overlapped)
        fields = [(i.loss, i.nonfinite, i.out_of_support) for i, _ in self.infos]
        fields = jax.device_get(fields)
        cut = lambda x, updates: np.atleast_1d(x)[updates]
        pieces = [
            (cut(f[0], n), cut(f[1] | f[2], n))
            for f, (_, n) in zip(fields, self.infos, strict=True)
        ]
        losses = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros((0,))
        skipped = np.flatnonzero(np.concatenate([p[1] for p in pieces])) if pieces else []
        losses = jnp.asarray(losses)
        if len(skipped):
            warnings.warn(
                f"OnlineEM.run: {len(skipped)} of {len(losses)} batches had non-finite or "
                "out-of-support values and were skipped (their losses are not finite); "
                f"the first was update {skipped[0]} of this run (counting from 0).",
                RuntimeWarning,
                stacklevel=3,
            )
        if not _warn_if_never_updated(self.em, state):
            _warn_if_unsettled(state)
            _warn_if_empty_components(state)
        return OnlineEMRunResult(self.em.get_params(state), state, losses)


def _ndims(call: tuple) -> tuple:
    """The number of dimensions of every array in a call's ``(args, kwargs)``."""
    return tuple(np.ndim(a) for a in jax.tree.leaves(call) if is_array(a))


def _check_batch_size(batch_size) -> None:
    if int(batch_size) < 1 or int(batch_size) != batch_size:
        raise ValueError(f"OnlineEM.run: batch_size must be a whole number >= 1, got {batch_size}.")


def _is_columns(stream) -> bool:
    """A tuple of arrays (``(X, y)``): the model's array arguments, to cut together."""
    return (
        isinstance(stream, tuple)
        and len(stream) > 0
        and all(isinstance(a, np.ndarray | jax.Array) and np.ndim(a) > 0 for a in stream)
    )


def _cut_columns(columns: tuple, batch_size: int):
    """Batches ``(X[i:i + B], y[i:i + B])`` of a tuple of arrays of one length."""
    lengths = [int(np.shape(a)[0]) for a in columns]
    if len(set(lengths)) != 1 or lengths[0] == 0:
        raise ValueError(
            "OnlineEM.run: a tuple of arrays with batch_size holds the model's array "
            "arguments, cut together along their first axis; these have lengths "
            f"{lengths}. Pass arrays of one, nonzero length."
        )
    return (tuple(a[i : i + batch_size] for a in columns) for i in range(0, lengths[0], batch_size))


def _warn_if_never_updated(em, state) -> bool:
    """Warn when no M step has moved the parameters: the stream ended with `init`, or
    within the burn-in, and the estimates are still the initial values. Returns whether
    it warned."""
    burn_in = em.config.burn_in
    burn_in = state.plan.default_burn_in if burn_in is None else burn_in
    seen, count = float(state.num_seen), int(state.count)
    if count > 0 and seen > burn_in:
        return False
    why = (
        "no update followed init"
        if count == 0
        else f"all of them fell within the burn-in of {burn_in:g} points"
    )
    warnings.warn(
        f"OnlineEM.run: {seen:g} points seen and {why}, so no M step has run: the estimates "
        "are still the initial values. Pass more points, fewer to init (init_points=...), "
        "or a shorter burn-in (OnlineEM(..., burn_in=...)).",
        RuntimeWarning,
        stacklevel=4,
    )
    return True


def _warn_if_unsettled(state) -> None:
    """Warn when a numerical M step ends the stream still in its transient
    (`numpyro_onlineem.mstep.numerical.SETTLED_RATIO`): its estimates are still moving
    toward the optimum, by more than their noise."""
    flags = settled_flags(state.plan, state.mstep_states)
    moving = [m for m in state.plan.msteps if m.name in flags and not bool(flags[m.name])]
    if not moving:
        return
    sites = sorted(n for m in moving for n in m.sites)
    ratio = max(float(state.mstep_states[m.name].ratio) for m in moving)
    unaveraged = " (and are not Polyak-averaged yet)" if float(state.polyak_from) < 0 else ""
    warnings.warn(
        f"OnlineEM.run: the numerical M step of {sites} has not settled: its Newton steps "
        f"would still raise the batch's log-likelihood by {ratio:.3g} times their noise "
        f"level, so these estimates are still moving toward the optimum{unaveraged}. Pass "
        "more data, or the same data again (em.run(key, x, init_state=result.state)).",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_if_empty_components(state) -> None:
    r"""Warn when a component of a mixture ends with an estimated weight below one point
    of those seen ($w_k n < 1$): it explains no data. Components that start without
    data, or that k-means++ over a few hundred init points did not find (clusters in
    300 dimensions told apart mostly by their scales), die like this and leave a fit
    nats per point short, with no other sign."""
    seen = float(state.num_seen)
    for sp in state.plan.sites:
        name = sp.learned.get("probs") if sp.family.name == "Categorical" else None
        if name is None:
            continue
        weights = np.asarray(state.averaged[name], np.float64)
        empty = np.argwhere(weights * seen < 1.0)
        if not len(empty):
            continue
        which = [tuple(int(i) for i in e) if weights.ndim > 1 else int(e[0]) for e in empty]
        warnings.warn(
            f"OnlineEM.run: component(s) {which} of '{sp.site}' end with weight(s) "
            f"{np.round(weights[tuple(empty.T)], 6).tolist()} (under one of the {seen:g} "
            f"points seen): they explain no data, so the fit has fewer components than "
            "the model. Their start left them without points, or k-means++ over the init "
            "points did not find the clusters (in hundreds of dimensions a few hundred "
            "points can be too few): pass more points to init (OnlineEM.run(..., "
            "init_points=...)), give init_params near the data, or use fewer components.",
            RuntimeWarning,
            stacklevel=5,
        )


def _single_point_to_batch(spec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Arrays with one dimension fewer than at ``init`` are single points: batches of one."""
    ndims = {name: ndim for name, ndim, _ in spec.arrays}
    expand = lambda a, name: (
        np.asarray(a)[None] if is_array(a) and np.ndim(a) == ndims.get(name, -9) - 1 else a
    )
    args = tuple(expand(a, f"args[{i}]") for i, a in enumerate(args))
    return args, {k: expand(v, k) for k, v in kwargs.items()}


def _same_bare_array(item, last) -> bool:
    """Whether a stream item is a NumPy array of the shape and dtype of the last one."""
    return isinstance(item, np.ndarray) and item.shape == last[0] and item.dtype == last[1]


def _batch_points(array, axis: int) -> int:
    """Points in a batch (``axis`` 0) or in each batch of a stack (``axis`` 1)."""
    shape = np.shape(array)
    return int(shape[axis]) if len(shape) > axis else 1


def _check_prior_weight(plan) -> None:
    """Single points and priors weighed against the batch's own size: refused.

    With ``plate("data", x.shape[0])`` the data plate's size is each batch's, and the
    M step weighs a global site's prior against it as if the batch were the whole data
    set: against one point for a single point, so the prior would dominate the fit (the
    locations of a mixture all end at the prior's mean)."""
    with_prior = [name for sp in (*plan.sites, *plan.linear) for name in sp.priors.values()]
    if with_prior and plan.model_sites.sized_by_batch:
        plate = plan.model_sites.data_plate
        raise ValueError(
            f"OnlineEM.run: the stream holds single points, and the priors of "
            f"{sorted(set(with_prior))} are weighed against the size of the data plate "
            f"'{plate}', which is each batch's own (1 for a single point): every update "
            "would weigh the prior against one point, and the prior would dominate the "
            f"fit. Declare the size of the data set: numpyro.plate('{plate}', N, "
            "subsample_size=x.shape[0]) and pass N (em.run(key, stream, N=...)); or "
            "declare these sites with numpyro.param (maximum likelihood)."
        )


def _pad(stacked, length: int):
    """Stacked batches padded to ``length`` with batches of zeros (never computed, see
    `numpyro_onlineem.api._scan`), where they are: on the device for a device array
    (not through the host and back), else on the host."""
    xp = jnp if isinstance(stacked, jax.Array) else np
    widths = [(0, length - stacked.shape[0])] + [(0, 0)] * (np.ndim(stacked) - 1)
    return xp.pad(stacked, widths)


def _stack(arrays) -> Any:
    """Stack batches along a new leading axis: on the host when they are there (one copy
    to the device for the chunk, not one per batch)."""
    if all(isinstance(a, np.ndarray | np.generic) for a in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def _describe(args: tuple, kwargs: dict) -> str:
    """``(x: (100, 2) float32, 3, N=1000)``: the shapes of arrays, the other values."""
    show = lambda v: f"{np.shape(v)} {np.asarray(v).dtype}" if is_array(v) else repr(v)
    parts = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
