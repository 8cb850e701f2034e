"""``OnlineEM``: a thin object over the functional core, in the style of ``numpyro.infer.SVI``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_onlineem import core
from numpyro_onlineem.initialization import INIT_MODES, data_driven_init
from numpyro_onlineem.model import classify_sites, enum_trace, trace_model
from numpyro_onlineem.mstep.expfam import MStepOptions
from numpyro_onlineem.mstep.plan import MSTEP_PATHS, make_plan
from numpyro_onlineem.schedules import Schedule, as_schedule
from numpyro_onlineem.state import OnlineEMRunResult, OnlineEMState, UpdateInfo
from numpyro_onlineem.validation import check_inputs


class OnlineEM:
    r"""Online EM (Cappé & Moulines 2009) for a NumPyro model, with no hand-written math.

    The E step is exact: discrete latent sites inside the data plate are enumerated.
    The M step is closed form for every ``numpyro.param`` site (maximum likelihood) and
    every global latent site with a conjugate prior (posterior mode) that the model uses
    directly as a parameter of a supported exponential family. Each update costs the
    same, however much data has been seen.

    $$
    \hat s_n = \hat s_{n-1} + \gamma_n (\bar s(B_n; \theta_{n-1}) - \hat s_{n-1}),
    \qquad \theta_n = \bar\theta(\hat s_n)
    $$

    Parameters
    ----------
    model : callable
        A NumPyro model; its arguments are the data of one mini-batch.
    step_size : float or callable, optional
        A constant step, or an optax-style schedule ``t -> step``, evaluated at ``t`` =
        the number of batches of the current size seen before the update (the init
        batch included; with a constant batch size, the update count plus one). Default:
        `robbins_monro` with an exponent chosen from
        the number of statistics per component ``m`` (see ``Plan.default_kappa``):
        ``kappa=0.6`` when ``m <= 1000`` (scalar, diagonal and small full covariances),
        ``kappa=1`` above (full covariances in dozens of dimensions and up).
    burn_in : float, optional
        Data points to accumulate before the first M step (statistics are their exact
        running mean). Default: ``max(20, 10 K)`` with ``K`` the largest number of
        states of an enumerated site, and at least ``8 K D`` for a ``D``-dimensional
        full covariance (see `Plan.default_burn_in`).
    polyak : bool, optional
        Polyak–Ruppert averaging of the parameters (what `get_params` returns),
        each iterate weighted by its batch's points, from ``polyak_start`` points on.
        Default: on with the default schedule when ``kappa=0.6``, off with ``kappa=1``
        (the statistics are already a running mean) and off with a user ``step_size``.
    polyak_start : float, optional
        Points to see before the average starts. Default: 100 burn-ins (``1000 K``
        points for a mixture of ``K`` components).
    init : {"auto", "kmeans++", "model"}
        Data-driven initialisation of component locations; see
        `numpyro_onlineem.initialization`.
    reg_covar : float
        Added to every variance, as in scikit-learn's ``GaussianMixture``.
    min_count : float
        Parameter blocks with fewer expected data points than this keep their value.
    mstep : dict[str, str], optional
        The M step of chosen estimated sites, by name: ``"closed_form"`` (the default
        for every site; an error names the site when the model uses it in a way no
        closed form covers) or ``"fixed"`` (held at its initial value, from the model,
        its prior median or ``init_params``; never initialised from data). A fixed site
        is a constant to the other sites' M steps, so it may enter the model in any
        way. `mstep_paths` reports the path each site takes.
    data_plate : str, optional
        Name of the data plate, when it cannot be inferred.
    chunk_size : int
        Number of batches fused into one compiled call by `run`.

    Examples
    --------
    >>> em = OnlineEM(gmm)                                  # doctest: +SKIP
    >>> state = em.init(jax.random.PRNGKey(0), x0)          # doctest: +SKIP
    >>> state, loss = em.update(state, xb)                  # doctest: +SKIP
    >>> em.get_params(state)["locs"].shape                  # doctest: +SKIP
    (3, 2)
    """

    def __init__(
        self,
        model: Callable,
        *,
        step_size: float | Schedule | None = None,
        burn_in: float | None = None,
        polyak: bool | None = None,
        polyak_start: float | None = None,
        init: str = "auto",
        reg_covar: float = 1e-6,
        min_count: float = 1e-6,
        mstep: dict[str, str] | None = None,
        data_plate: str | None = None,
        chunk_size: int = 100,
    ):
        if init not in INIT_MODES:
            raise ValueError(f"OnlineEM: init must be one of {INIT_MODES}, got {init!r}.")
        if burn_in is not None and burn_in < 0:
            raise ValueError(f"OnlineEM: burn_in must be >= 0, got {burn_in}.")
        if reg_covar < 0:
            raise ValueError(f"OnlineEM: reg_covar must be >= 0, got {reg_covar}.")
        if chunk_size < 1:
            raise ValueError(f"OnlineEM: chunk_size must be >= 1, got {chunk_size}.")
        if polyak_start is not None and polyak_start < 0:
            raise ValueError(f"OnlineEM: polyak_start must be >= 0, got {polyak_start}.")
        mstep = dict(mstep or {})
        for name, path in mstep.items():
            if path not in MSTEP_PATHS:
                raise ValueError(
                    f"OnlineEM: mstep['{name}'] must be one of {MSTEP_PATHS}, got {path!r}."
                )
        self.model = model
        self.mstep = mstep
        self.init_mode = init
        self.data_plate = data_plate
        self.chunk_size = int(chunk_size)
        self.config = core.Config(
            model=model,
            schedule=None if step_size is None else as_schedule(step_size),
            burn_in=None if burn_in is None else float(burn_in),
            polyak=None if polyak is None else bool(polyak),
            polyak_start=None if polyak_start is None else float(polyak_start),
            options=MStepOptions(reg_covar=float(reg_covar), min_count=float(min_count)),
        )
        jit = functools.partial(jax.jit, static_argnums=(2,))
        self._update_jit = jit(functools.partial(_update, self.config))
        self._scan_jit = jit(functools.partial(_scan, self.config))
        self._loglik_jit = jit(functools.partial(_loglik, self.config))
        self._marginals_jit = jit(functools.partial(_marginals, self.config))
        self._init_state_jit = jax.jit(
            functools.partial(_init_state, self.config), static_argnums=(4,)
        )

    # ------------------------------------------------------------------ init
    def init(
        self, rng_key: jax.Array, *args: Any, init_params: dict | None = None, **kwargs: Any
    ) -> OnlineEMState:
        """Trace the model on a first batch, classify its sites, choose the M steps,
        initialise the parameters and compute the first statistics.

        Parameters
        ----------
        rng_key : PRNGKey
        *args, **kwargs
            The model's arguments for one batch: shapes, data-driven initialisation
            and the initial statistics come from it.
        init_params : dict, optional
            Constrained initial values by site name; they are never overridden.

        Returns
        -------
        OnlineEMState
        """
        check_inputs(None, args, kwargs, "init")
        init_params = dict(init_params or {})
        key_trace, key_init, key_state = jax.random.split(rng_key, 3)
        trace = trace_model(self.model, args, kwargs, init_params, key_trace)
        sites = classify_sites(trace, self.data_plate)
        for what, names in (("init_params", init_params), ("OnlineEM(mstep=...)", self.mstep)):
            unknown = set(names) - set(sites.params)
            if unknown:
                raise ValueError(
                    f"OnlineEM.init: {what} names {sorted(unknown)}, which are not "
                    f"estimated sites of the model ({sorted(sites.params)})."
                )
        dtype = jnp.result_type(float)
        params = {}
        for name, ps in sites.params.items():
            value = jnp.asarray(trace[name]["value"], dtype)
            if value.shape != ps.shape:
                raise ValueError(f"OnlineEM.init: site '{name}' has shape {value.shape}.")
            params[name] = value
        fixed = frozenset(name for name, path in self.mstep.items() if path == "fixed")
        plan = make_plan(self.model, sites, params, args, kwargs, fixed)
        if self.init_mode != "model":
            etrace = enum_trace(self.model, sites, params, args, kwargs)
            params, report = data_driven_init(
                key_init,
                plan,
                params,
                etrace,
                self.init_mode,
                frozenset(init_params),
                self.config.options,
            )
            for name, what in report.items():
                plan.paths[name] += f"; initial value {what}"
        return self._init_state_jit(plan, params, key_state, *_split(args, kwargs))

    # ---------------------------------------------------------------- update
    def update(
        self, state: OnlineEMState, *args: Any, **kwargs: Any
    ) -> tuple[OnlineEMState, jax.Array]:
        """One online EM update on a mini-batch (the model's arguments).

        Returns
        -------
        state : OnlineEMState
        loss : Array, shape ()
            Negative log marginal likelihood of the batch per datum, under the
            parameters before the update.
        """
        state, info = self.update_with_info(state, *args, **kwargs)
        return state, info.loss

    def update_with_info(
        self, state: OnlineEMState, *args: Any, **kwargs: Any
    ) -> tuple[OnlineEMState, UpdateInfo]:
        """`update`, returning the full `UpdateInfo` diagnostics."""
        check_inputs(state.plan.input_spec, args, kwargs, "update")
        return self._update_jit(state, *_split(args, kwargs))

    def get_params(self, state: OnlineEMState) -> dict:
        """Constrained estimates of every ``numpyro.param`` and global latent site (the
        Polyak average when averaging is on)."""
        return dict(state.averaged)

    def mstep_paths(self, state: OnlineEMState) -> dict:
        """For each estimated site, the M step it takes (and, for a location-like site,
        where its initial value came from), in words."""
        return dict(state.plan.paths)

    # ------------------------------------------------------------- inference
    def log_likelihood(self, state: OnlineEMState, *args: Any, **kwargs: Any) -> jax.Array:
        r"""Marginal log-likelihood $\log p(x_i \mid \hat\theta)$ of each datum of the
        data plate, shape ``(batch,)``, at `get_params`."""
        check_inputs(state.plan.input_spec, args, kwargs, "log_likelihood")
        return self._loglik_jit(state, *_split(args, kwargs))

    def compute_marginals(self, state: OnlineEMState, *args: Any, **kwargs: Any) -> dict:
        """Posterior marginals of the enumerated sites at `get_params`:
        ``{name: (batch, K) probabilities}``."""
        check_inputs(state.plan.input_spec, args, kwargs, "compute_marginals")
        return self._marginals_jit(state, *_split(args, kwargs))

    # ------------------------------------------------------------------- run
    def run(
        self,
        rng_key: jax.Array,
        stream: Iterable | jax.Array | np.ndarray,
        *,
        batch_size: int | None = None,
        progress_bar: bool = True,
        init_params: dict | None = None,
        init_state: OnlineEMState | None = None,
    ) -> OnlineEMRunResult:
        """Run online EM over a stream of mini-batches.

        Parameters
        ----------
        rng_key : PRNGKey
        stream : iterable or array
            Items are a batch array, a tuple of positional arguments, or an
            ``(args, kwargs)`` pair. A single point (one dimension fewer than the init
            batch) is a batch of one. An array with ``batch_size`` is cut into batches
            along its first axis (a final partial batch is used too). Without
            ``init_state``, the first batch initialises (`init`) and the others
            update, so every point is used once.
        batch_size : int, optional
            Required when ``stream`` is an array.
        progress_bar : bool
            A tqdm bar with the running loss.
        init_params : dict, optional
            Passed to `init` (on the first batch) when ``init_state`` is not given.
        init_state : OnlineEMState, optional
            Continue from this state instead of initialising.

        Returns
        -------
        OnlineEMRunResult
            ``(params, state, losses)``; batches are fused ``chunk_size`` at a time into
            one compiled ``lax.scan``. Shapes are checked eagerly (ValueError); values
            are checked inside the compiled updates: a batch with non-finite values is
            skipped (the state is left as it was, its loss is not finite) and ``run`` warns
            with the count at the end.
        """
        if isinstance(stream, np.ndarray | jax.Array):
            if batch_size is None:
                raise ValueError(
                    "OnlineEM.run: pass batch_size=... to cut an array stream into batches."
                )
            total = -(-stream.shape[0] // int(batch_size)) - (init_state is None)
            stream = _array_chunks(stream, int(batch_size), self.chunk_size)
        else:
            total = None
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(desc="OnlineEM", unit="batch", total=total)
        state = init_state
        losses, skipped, buffer, signature = [], [], [], None
        try:
            for item in stream:
                if isinstance(item, _Chunk):
                    chunk = item.data
                    if state is None:
                        state = self.init(rng_key, chunk[0], init_params=init_params)
                        chunk = chunk[1:]
                        if not len(chunk):
                            continue
                    check_inputs(state.plan.input_spec, (chunk[0],), {}, "run", values=False)
                    if buffer:
                        state = self._flush(state, buffer, (losses, skipped), bar)
                        buffer = []
                    _, static = _split((chunk[0],), {})
                    state = self._scan_chunk(state, [chunk], static, (losses, skipped), bar)
                    continue
                args, kwargs = _as_call(item)
                if state is None:
                    state = self.init(rng_key, *args, init_params=init_params, **kwargs)
                    continue
                args = _single_point_to_batch(state.plan.input_spec, args)
                arrays, static = _split(args, kwargs)
                sig = (static, tuple(np.shape(a) for a in arrays))
                if buffer and (sig != signature or len(buffer) == self.chunk_size):
                    state = self._flush(state, buffer, (losses, skipped), bar)
                    buffer = []
                check_inputs(state.plan.input_spec, args, kwargs, "run", values=False)
                buffer.append((arrays, static))
                signature = sig
            if buffer:
                state = self._flush(state, buffer, (losses, skipped), bar)
        finally:
            if bar is not None:
                bar.close()
        if state is None:
            raise ValueError("OnlineEM.run: the stream was empty.")
        losses = jnp.concatenate(losses) if losses else jnp.zeros((0,))
        skipped = np.flatnonzero(np.concatenate(skipped)) if skipped else []
        if len(skipped):
            warnings.warn(
                f"OnlineEM.run: {len(skipped)} of {len(losses)} batches had non-finite values "
                f"and were skipped (their losses are not finite); the first was update "
                f"{skipped[0]} of this run (counting from 0).",
                RuntimeWarning,
                stacklevel=2,
            )
        return OnlineEMRunResult(self.get_params(state), state, losses)

    def _flush(self, state, buffer, record, bar):
        static = buffer[0][1]
        if len(buffer) == 1:
            state, info = self._update_jit(state, buffer[0][0], static)
            return self._record(jax.tree.map(lambda a: a[None], info), record, bar, state)
        stacked = [jnp.stack(column) for column in zip(*(b[0] for b in buffer), strict=True)]
        return self._scan_chunk(state, stacked, static, record, bar)

    def _scan_chunk(self, state, stacked, static, record, bar):
        state, infos = self._scan_jit(state, stacked, static)
        return self._record(infos, record, bar, state)

    @staticmethod
    def _record(infos, record, bar, state):
        losses, skipped = record
        losses.append(infos.loss)
        skipped.append(infos.nonfinite)
        if bar is not None:
            bar.update(int(infos.loss.shape[0]))
            bar.set_postfix(loss=f"{float(jnp.nanmean(infos.loss)):.4f}")
        return state


class _StaticArgs(NamedTuple):
    """The non-array part of the model's arguments (hashable: compiled into the update)."""

    treedef: Any
    is_array: tuple
    values: tuple


def _split(args: tuple, kwargs: dict) -> tuple[list, _StaticArgs]:
    """Arrays are traced; Python scalars, strings and None (``K=3``) stay static."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = tuple(isinstance(leaf, jax.Array | np.ndarray | np.generic) for leaf in leaves)
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]
    values = tuple(None if a else leaf for leaf, a in zip(leaves, is_array, strict=True))
    return arrays, _StaticArgs(treedef, is_array, values)


def _merge(arrays: list, static: _StaticArgs) -> tuple[tuple, dict]:
    it = iter(arrays)
    leaves = [next(it) if a else v for a, v in zip(static.is_array, static.values, strict=True)]
    return jax.tree.unflatten(static.treedef, leaves)


def _init_state(config, plan, params, rng_key, arrays, static):
    args, kwargs = _merge(arrays, static)
    return core.init_state(config, plan, params, rng_key, args, kwargs)


def _update(config, state, arrays, static):
    args, kwargs = _merge(arrays, static)
    return core.update(config, state, args, kwargs)


def _scan(config, state, arrays, static):
    def body(s, batch):
        args, kwargs = _merge(batch, static)
        return core.update(config, s, args, kwargs)

    return jax.lax.scan(body, state, arrays)


def _loglik(config, state, arrays, static):
    args, kwargs = _merge(arrays, static)
    sites = state.plan.model_sites
    return core.log_likelihood(config, sites, state.averaged, args, kwargs, state.shifts)


def _marginals(config, state, arrays, static):
    args, kwargs = _merge(arrays, static)
    sites = state.plan.model_sites
    return core.marginals(config, sites, state.averaged, args, kwargs, state.shifts)


def _as_call(item) -> tuple[tuple, dict]:
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], tuple)
        and isinstance(item[1], dict)
    ):
        return item[0], item[1]
    if isinstance(item, tuple):
        return item, {}
    return (item,), {}


def _single_point_to_batch(spec, args: tuple) -> tuple:
    if spec is None:
        return args
    ndims = {name: ndim for name, ndim, _ in spec.arrays}
    out = []
    for i, a in enumerate(args):
        ndim = ndims.get(f"args[{i}]")
        if ndim is not None and np.ndim(a) == ndim - 1:
            a = jnp.asarray(a)[None]
        out.append(a)
    return tuple(out)


class _Chunk(NamedTuple):
    """Several equal batches of an array stream, stacked: shape (num, batch, ...)."""

    data: jax.Array


def _array_chunks(data, batch_size: int, chunk_size: int):
    """Cut an array into chunks of ``chunk_size`` stacked batches; a final partial batch
    comes last, on its own. A NumPy array is cut into views, so each point is copied to
    the device once, by the compiled call that uses it."""
    if batch_size < 1:
        raise ValueError(f"OnlineEM.run: batch_size must be >= 1, got {batch_size}.")
    if not isinstance(data, jax.Array):
        data = np.asarray(data)
    n = data.shape[0]
    num = n // batch_size
    full = data[: num * batch_size].reshape((num, batch_size) + data.shape[1:])
    for start in range(0, num, chunk_size):
        yield _Chunk(full[start : start + chunk_size])
    if num * batch_size < n:
        yield data[num * batch_size :]
