"""``OnlineEM``: a thin object over the functional core, in the style of ``numpyro.infer.SVI``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_onlineem import core
from numpyro_onlineem.compilation import enable_compilation_cache
from numpyro_onlineem.families import MStepOptions
from numpyro_onlineem.first_trace import first_trace, model_sites
from numpyro_onlineem.initialization import INIT_MODES, data_driven_init
from numpyro_onlineem.model import (
    batch_indices,
    classify_sites,
    enum_trace,
    random_indices,
    reads_subsample,
    trace_model,
)
from numpyro_onlineem.mstep.plan import MSTEP_PATHS, UnsupportedModelError, array_attrs, make_plan
from numpyro_onlineem.mstep.sites import site_grid
from numpyro_onlineem.runner import run_stream
from numpyro_onlineem.schedules import (
    Schedule,
    as_schedule,
    default_burn_in,
    default_init_points,
)
from numpyro_onlineem.state import OnlineEMRunResult, OnlineEMState, UpdateInfo
from numpyro_onlineem.stream import (
    add_batch_axis,
    as_arrays,
    merge_args,
    split_args,
    with_extra,
)
from numpyro_onlineem.validation import check_inputs, check_support


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
        The step per ``step_points`` points: a constant, or an optax-style schedule
        ``t -> step`` evaluated at ``t`` = the points seen before the update (the init
        batch included) over ``step_points``. A batch of ``B`` points moves the
        statistics by ``1 - (1 - step) ** (B / step_points)``, so that single points
        and batches of any size give the same fit. Default: `robbins_monro` with an
        exponent chosen from the number of statistics per component ``m`` (see
        ``Plan.default_kappa``): ``kappa=0.6`` when ``m <= 1000`` (scalar, diagonal and
        small full covariances), ``kappa=1`` above (full covariances in dozens of
        dimensions and up).
    step_points : float
        How many points one step of the schedule stands for (default 256).
    damping : float, optional
        Pseudo-points $\nu$ of the damped M step: a parameter block whose statistics
        rest on $m$ effective points moves from its value toward the M step's by
        $m / (m + \nu)$ (see `numpyro_onlineem.mstep.closed_form.damped`), so that a component seen
        through a handful of points in many dimensions does not jump to where those
        points lie and lose its data. Default: the data dimension of a component (``D``
        for a ``D``-dimensional Gaussian) with the default schedule, ``0`` (plain M
        steps) with a ``step_size`` of the user's.
    burn_in : float, optional
        Data points to accumulate before the first M step (statistics are their exact
        running mean). Default: ``max(20, 10 K)`` with ``K`` the largest number of
        states of an enumerated site, and at least ``8 K D`` for a ``D``-dimensional
        full covariance (see `Plan.default_burn_in`).
    polyak : bool, optional
        Polyak–Ruppert averaging (what `get_params` returns), from ``polyak_start``
        points on: closed-form sites give the M step of their statistics' running mean
        since the start, numerical ones the mean of their iterates, each weighted by
        its batch's points (see `numpyro_onlineem.core.average_statistics`). An
        average that falls behind the iterate on fresh batches begins again
        (`numpyro_onlineem.core.check_average`).
        Default: on with the default schedule when ``kappa=0.6``, off with ``kappa=1``
        (the statistics are already a running mean) and off with a user ``step_size``.
    polyak_start : float, optional
        Points to see before the average starts. Default: ``5 * step_points`` (1,280
        points), and not before the burn-in ends.
    init : {"auto", "kmeans++", "model"}
        Data-driven initialisation of component locations; see
        `numpyro_onlineem.initialization`.
    reg_covar : float
        Added to every variance, as in scikit-learn's ``GaussianMixture``.
    min_count : float
        Parameter blocks with fewer expected data points than this keep their value.
    mstep : dict, optional
        The M step of chosen estimated sites, by name. By default a site takes the
        closed form where the model uses it directly as a parameter of a registered
        exponential family (`numpyro_onlineem.families`), and the numerical M step
        otherwise (`numpyro_onlineem.mstep.numerical`: generalized EM on the expected
        complete-data log-likelihood, in unconstrained space, so every constraint
        holds). Choices: ``"closed_form"`` (an error names the site when no closed form
        covers its use), ``"numerical"`` (even where a closed form exists), an optax
        ``GradientTransformation`` (numerical, with that optimizer), or ``"fixed"``
        (held at its initial value, from the model, its prior median or
        ``init_params``; never initialised from data; a constant to the other sites'
        M steps, so it may enter the model in any way). `mstep_paths` reports the path
        each site takes.
    numerical_steps : int
        Optimizer steps per update of a numerical M step that runs an optax optimizer
        (default 1: stochastic gradient ascent on the marginal log-likelihood).
    data_plate : str, optional
        Name of the data plate, when it cannot be inferred.
    chunk_size : int
        Number of batches fused into one compiled call by `run`.
    compilation_cache : bool
        Turn JAX's persistent compilation cache on at the first ``init`` (unless the
        user configured it), so that another process fitting the same model and shapes
        compiles nothing; see `numpyro_onlineem.compilation`. ``False`` leaves JAX's
        settings as they are.

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
        step_points: float = 256.0,
        damping: float | None = None,
        burn_in: float | None = None,
        polyak: bool | None = None,
        polyak_start: float | None = None,
        init: str = "auto",
        reg_covar: float = 1e-6,
        min_count: float = 1e-6,
        mstep: dict[str, str | optax.GradientTransformation] | None = None,
        numerical_steps: int = 1,
        data_plate: str | None = None,
        chunk_size: int = 100,
        compilation_cache: bool = True,
    ):
        if init not in INIT_MODES:
            raise ValueError(f"OnlineEM: init must be one of {INIT_MODES}, got {init!r}.")
        if burn_in is not None and burn_in < 0:
            raise ValueError(f"OnlineEM: burn_in must be >= 0, got {burn_in}.")
        if damping is not None and damping < 0:
            raise ValueError(f"OnlineEM: damping must be >= 0, got {damping}.")
        if not step_points > 0:
            raise ValueError(f"OnlineEM: step_points must be > 0, got {step_points}.")
        if reg_covar < 0:
            raise ValueError(f"OnlineEM: reg_covar must be >= 0, got {reg_covar}.")
        if chunk_size < 1:
            raise ValueError(f"OnlineEM: chunk_size must be >= 1, got {chunk_size}.")
        if polyak_start is not None and polyak_start < 0:
            raise ValueError(f"OnlineEM: polyak_start must be >= 0, got {polyak_start}.")
        mstep = dict(mstep or {})
        for name, path in mstep.items():
            if isinstance(path, optax.GradientTransformation):
                continue
            if not isinstance(path, str) or path not in MSTEP_PATHS:
                raise ValueError(
                    f"OnlineEM: mstep['{name}'] must be one of {MSTEP_PATHS} or an optax "
                    f"GradientTransformation, got {path!r}."
                )
        if int(numerical_steps) < 1:
            raise ValueError(f"OnlineEM: numerical_steps must be >= 1, got {numerical_steps}.")
        self.numerical_steps = int(numerical_steps)
        self.model = model
        self.mstep = mstep
        self.init_mode = init
        self.data_plate = data_plate
        self.chunk_size = int(chunk_size)
        self.config = core.Config(
            model=model,
            schedule=None if step_size is None else as_schedule(step_size),
            step_points=float(step_points),
            burn_in=None if burn_in is None else float(burn_in),
            polyak=None if polyak is None else bool(polyak),
            polyak_start=None if polyak_start is None else float(polyak_start),
            damping=None if damping is None else float(damping),
            options=MStepOptions(reg_covar=float(reg_covar), min_count=float(min_count)),
        )
        self.compilation_cache = bool(compilation_cache)
        # one compiled function per config, plan and shapes, shared by every OnlineEM
        # (both compare by value): a second fit of the same model compiles nothing
        config = self.config
        self._update_jit = lambda *a: _update_jit(config, *a)
        self._scan_jit = lambda *a: _scan_jit(config, *a)
        self._loglik_jit = lambda *a: _loglik_jit(config, *a)
        self._marginals_jit = lambda *a: _marginals_jit(config, *a)
        self._init_state_jit = lambda *a: _init_state_jit(config, *a)

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
        if self.compilation_cache:
            enable_compilation_cache()
        args, kwargs = as_arrays(args, kwargs)
        check_inputs(None, args, kwargs, "init")
        init_params = dict(init_params or {})
        first, sites = self._sites(rng_key, args, kwargs, init_params)
        check_support(first, "init")
        key_init, key_state = first.keys
        for what, names in (("init_params", init_params), ("OnlineEM(mstep=...)", self.mstep)):
            unknown = set(names) - set(sites.params)
            if unknown:
                raise ValueError(
                    f"OnlineEM.init: {what} names {sorted(unknown)}, which are not "
                    f"estimated sites of the model ({sorted(sites.params)})."
                )
        params, plan = self._initial_plan(first, sites, args, kwargs)
        indices = random_indices(key_init) if sites.reads_subsample else batch_indices
        if self.init_mode != "model":
            etrace = enum_trace(self.model, sites, params, args, kwargs, indices, concrete=True)
            params, report = data_driven_init(
                key_init,
                plan,
                params,
                etrace,
                self.init_mode,
                frozenset(init_params),
                self.config.options,
            )
            paths = dict(plan.paths)
            for name, what in report.items():
                paths[name] += f"; initial value {what}"
            plan = plan.replace(paths=paths)
        params = _in_support(plan, params, frozenset(init_params))
        etrace = enum_trace(self.model, sites, params, args, kwargs, indices, concrete=True)
        _check_symmetry(etrace, sites)
        state = self._init_state_jit(plan, params, key_state, *split_args(args, kwargs))
        _check_finite_start(state, params)
        return state

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
        args, kwargs = as_arrays(args, kwargs)
        check_inputs(state.plan.input_spec, args, kwargs, "update")
        return self._update_jit(state, *split_args(args, kwargs))

    def get_params(self, state: OnlineEMState) -> dict:
        """Constrained estimates of every ``numpyro.param`` and global latent site (the
        Polyak average when averaging is on), in the model's order."""
        return {name: state.averaged[name] for name in state.plan.model_sites.params}

    def mstep_paths(self, state: OnlineEMState) -> dict:
        """For each estimated site, the M step it takes (and, for a location-like site,
        where its initial value came from), in words."""
        return dict(state.plan.paths)

    # ------------------------------------------------------------- inference
    def log_likelihood(self, state: OnlineEMState, *args: Any, **kwargs: Any) -> jax.Array:
        r"""Marginal log-likelihood $\log p(x_i \mid \hat\theta)$ of each datum of the
        data plate, shape ``(batch,)``, at `get_params`."""
        args, kwargs = as_arrays(args, kwargs)
        check_inputs(state.plan.input_spec, args, kwargs, "log_likelihood")
        return self._loglik_jit(state, *split_args(args, kwargs))

    def compute_marginals(self, state: OnlineEMState, *args: Any, **kwargs: Any) -> dict:
        """Posterior marginals of the enumerated sites at `get_params`:
        ``{name: (batch, K) probabilities}``."""
        args, kwargs = as_arrays(args, kwargs)
        check_inputs(state.plan.input_spec, args, kwargs, "compute_marginals")
        return self._marginals_jit(state, *split_args(args, kwargs))

    # ------------------------------------------------------------------- run
    def run(
        self,
        rng_key: jax.Array,
        stream: Iterable | jax.Array | np.ndarray,
        *args: Any,
        batch_size: int | None = None,
        progress_bar: bool = True,
        init_params: dict | None = None,
        init_state: OnlineEMState | None = None,
        init_points: int | None = None,
        **kwargs: Any,
    ) -> OnlineEMRunResult:
        """Run online EM over a stream of mini-batches or single points.

        Parameters
        ----------
        rng_key : PRNGKey
        stream : iterable or array
            Items are a batch array, a tuple of positional arguments, or an
            ``(args, kwargs)`` pair, holding the per-datum arrays of the model (first
            axis: the data points). A single point (one dimension fewer) is a batch of
            one. An array with ``batch_size`` is cut into batches along its first axis (a
            final partial batch is used too); so is a tuple of arrays of one length,
            ``(X, y)``, the model's array arguments cut together.
        *args, **kwargs
            The model's other arguments (``N``, ``K``, ...), passed after each item's.
        batch_size : int, optional
            Required when ``stream`` is an array.
        progress_bar : bool
            A tqdm bar counting points, with their rate and the running loss.
        init_params : dict, optional
            Passed to `init` when ``init_state`` is not given.
        init_state : OnlineEMState, optional
            Continue from this state instead of initialising.
        init_points : int, optional
            Without ``init_state``, `init` takes the first ``init_points`` points of the
            stream (single points and small batches are buffered for it), the updates the
            rest, so every point is used once. Default: the plan's burn-in, at least
            ``step_points`` (256) and at least 50 points per component (1,000 for
            ``K = 20``): k-means++ needs points from every component, and the burn-in
            would hold the parameters for those points anyway (see
            `numpyro_onlineem.schedules.default_init_points`). From an array, `init`
            also takes the points that would make a last, shorter batch (fewer than
            ``batch_size``), so that no update compiles for that batch's shape alone,
            and leaves a batch to update with when the array holds two or more.
            ``run`` warns when the stream ends before any M step ran.

        Returns
        -------
        OnlineEMRunResult
            ``(params, state, losses)``: ``losses`` has one entry per update. Batches of
            one shape are fused ``chunk_size`` at a time into one compiled loop (fewer
            when a fused call would take over a second, so that the progress bar
            moves); a shorter last chunk runs in the same compiled loop, for the cost of
            its own batches. Shapes are checked eagerly (ValueError); values inside the
            compiled updates: a batch with non-finite or out-of-support values is
            skipped (the state is left as it was, its loss is not finite) and ``run``
            warns with the count at the end.
        """
        return run_stream(
            self,
            rng_key,
            stream,
            as_arrays(args, kwargs),
            batch_size=batch_size,
            progress_bar=progress_bar,
            init_params=init_params,
            init_state=init_state,
            init_points=init_points,
        )

    def _init_points(self, call, extra, init_points, plan=None) -> int:
        """Points `run` gives `init`: ``init_points``, or
        `numpyro_onlineem.schedules.default_init_points`."""
        if init_points is not None:
            if int(init_points) < 1:
                raise ValueError(f"OnlineEM.run: init_points must be >= 1, got {init_points}.")
            return int(init_points)
        if plan is None:
            plan = self._plan(jax.random.PRNGKey(0), *with_extra(call, extra), {})
        return default_init_points(plan.num_states, plan.default_burn_in, self.config.step_points)

    def _array_init_points(self, data, extra, batch_size: int, init_points) -> int:
        """Points `run` gives `init` from an array of data: ``init_points`` (at least a
        batch), or `_init_points`'s default, at most all but one batch (when that leaves
        `init` a batch), and the points of
        a last, shorter batch, which would compile an update of its own shape. The
        default's plan is made on exactly the points `init` then gets, so that `init`
        reuses its compiled runs; the number of components it needs first comes from an
        abstract run of the model (`model_sites`)."""
        if init_points is not None:
            return max(batch_size, self._init_points(None, extra, init_points))
        n = int(data.shape[0])

        def with_remainder(n0: int) -> int:
            n0 = max(batch_size, n0)
            if n >= 2 * batch_size:  # a batch is left to update with, init keeps one
                n0 = min(n0, n - batch_size)
            return n0 + (n - n0) % batch_size if n > n0 else n0

        def call(m: int):
            return with_extra(((data[:m],), {}), extra)

        sites = model_sites(self.model, self.data_plate, *call(batch_size))
        k = max(sites.num_states.values(), default=1)
        n0 = with_remainder(default_init_points(k, default_burn_in(k, []), self.config.step_points))
        plan = self._plan(jax.random.PRNGKey(0), *call(min(n0, n)), {})
        return max(n0, with_remainder(self._init_points(None, extra, None, plan)))

    def _plan(self, rng_key, args, kwargs, init_params):
        """The plan `init` would make on this call (no data-driven start)."""
        first, sites = self._sites(rng_key, args, kwargs, init_params)
        return self._initial_plan(first, sites, args, kwargs)[1]

    def _sites(self, rng_key, args, kwargs, init_params):
        """The model's first run on a call (`first_trace`), and its sites classified:
        ``(first, sites)``."""
        first = first_trace(self.model, self.data_plate, rng_key, args, kwargs, init_params)
        sites = first.sites
        batch, total = first.sizes
        if batch != total:
            sites = sites._replace(
                reads_subsample=reads_subsample(self.model, sites, args, kwargs),
                sized_by_batch=False,
            )
        return first, sites

    def _initial_plan(self, first, sites, args, kwargs):
        """The model's initial values and the M-step plan: ``(params, plan)``."""
        dtype = jnp.result_type(float)
        params = {name: jnp.asarray(first.values[name], dtype) for name in sites.params}
        _check_enumerated_run(self.model, sites, params, args, kwargs)
        plan = make_plan(self.model, sites, params, args, kwargs, self.mstep, self.numerical_steps)
        return params, plan

    def _is_single_point(self, call, extra) -> bool:
        """Whether a first stream item is a single point: the model cannot take it as a
        batch (its data would not run along the data plate), but takes it with a
        leading axis."""
        try:
            trace = trace_model(self.model, *with_extra(call, extra))
            classify_sites(trace, self.data_plate)
            return False
        except Exception as as_batch:
            try:
                trace = trace_model(self.model, *with_extra(add_batch_axis(call), extra))
                classify_sites(trace, self.data_plate)
            except Exception:
                raise as_batch from None
            return True


def _check_enumerated_run(model, sites, params: dict, args: tuple, kwargs: dict) -> None:
    """Run the model once with its discrete latents enumerated, at its initial values
    (it ran without enumeration already): a model written for one value per datum (an
    ``einsum("bp,bp->b", X, beta[z])``) fails here with NumPy's own message, deep inside
    the plan's probes; say what enumeration does to its arrays instead."""
    if not sites.enumerated:
        return
    try:
        enum_trace(model, sites, params, args, kwargs, concrete=True)
    except UnsupportedModelError:
        raise
    except Exception as error:
        raise UnsupportedModelError(
            f"OnlineEM.init: the model runs with one value per datum for "
            f"{sorted(sites.enumerated)}, but fails with their states enumerated "
            f"({type(error).__name__}: {error}). Enumeration gives each discrete latent its "
            "states along a leading axis of its own (K states of z: shape (K, 1) inside "
            "the data plate), so an array indexed by it (beta[z]) gains that axis. Write "
            "the model so that it broadcasts over extra leading axes: "
            "jnp.einsum('...p,...p->...', X, beta[z]) rather than 'bp,bp->b', "
            "jnp.sum(..., axis=-1) rather than axis=1, x[..., None]; NumPyro's own "
            "enumeration (TraceEnum_ELBO, NUTS) runs the model the same way."
        ) from error


def _in_support(plan, params: dict, given: frozenset) -> dict:
    """Initial values inside their sites' constraints: a data-driven start is projected
    (`numpyro_onlineem.mstep.constraints`, equal weights); any other value outside its
    constraint is an error, since the user or the model chose it."""
    out, ok = _project_and_check(plan, given, params)
    for name, ps in plan.model_sites.params.items():
        if not bool(ok[name]):
            source = {"param": "the model's initial value", "global": "drawn from its prior"}
            where = "given in init_params" if name in given else source[ps.kind]
            raise ValueError(
                f"OnlineEM.init: the initial value of site '{name}' ({where}) is outside "
                f"its constraint {ps.constraint}: {np.asarray(out[name])}."
            )
    return out


def _check_finite_start(state: OnlineEMState, params: dict) -> None:
    """Refuse a start whose init-batch statistics are not finite: the log density is
    then not finite at the initial values (a scale of 0), and every update would be
    skipped, leaving the initial values as the silent answer."""
    leaves = jax.tree.leaves(state.stats)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):  # init under the caller's jit
        return
    if all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves):
        return
    ranges = ", ".join(
        f"{name} in [{float(np.min(v)):.4g}, {float(np.max(v)):.4g}]"
        for name, v in ((n, np.asarray(params[n])) for n in state.plan.model_sites.params)
        if v.size
    )
    raise ValueError(
        "OnlineEM.init: the model's log density is not finite on the init batch at the "
        f"initial values ({ranges}), so every update would be skipped. An initial value "
        "outside what its distribution accepts (a scale of 0, say) is the usual cause: "
        "give valid ones in init_params, or a constraint (constraints.positive) and a "
        "valid initial value to numpyro.param."
    )


def _check_symmetry(trace, sites) -> None:
    """Refuse a start at which the components of an enumerated latent are identical in
    every distribution that depends on it: their posterior weights are then equal (or
    proportional to the mixture weights) for every point, the M step gives them the same
    values again, and EM never separates them: a silent one-component fit."""
    for latent in sites.enumerated:
        size = sites.num_states[latent]
        if size < 2:
            continue
        readers, differs = [], False
        for name in sites.local:
            if name == latent:
                continue
            site = trace[name]
            dims = {n: d for d, n in site["infer"].get("dim_to_name", {}).items()}
            if latent not in dims:
                continue
            grid, base = site_grid(site)
            lp_ndim = len(grid) - (len(site["fn"].event_shape) - len(base.event_shape))
            from_end = len(grid) - (lp_ndim + dims[latent]) + len(base.event_shape)
            readers.append(name)
            for value in array_attrs(base).values():
                axis = value.ndim - from_end
                if axis >= 0 and value.shape[axis] > 1:
                    first = np.take(value, [0], axis=axis)
                    if not np.allclose(value, first, rtol=0.0, atol=0.0, equal_nan=True):
                        differs = True
        if readers and not differs:
            raise ValueError(
                f"OnlineEM.init: the {size} components of '{latent}' start identical in "
                f"every distribution that depends on it ({readers}), so EM would keep "
                "them identical (every point weighs them alike). Give them distinct "
                "initial values: in the model's numpyro.param init, or with "
                "init_params={...}; the default start (init='auto') sets component "
                "locations of the built-in families from k-means++, and a family added "
                "with register_family does so through its center_roles."
            )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _project_and_check(plan, given: frozenset, params: dict) -> tuple[dict, dict]:
    """`_in_support`'s arrays, in one compiled call: the projected values, and whether
    each site's value satisfies its constraint."""
    projections = {
        sp.learned[role]: proj for sp in plan.sites for role, proj in sp.projections.items()
    }
    out, ok = dict(params), {}
    for name, ps in plan.model_sites.params.items():
        if name not in given and name in projections:
            out[name] = projections[name](out[name], None)
        ok[name] = jnp.all(ps.constraint(out[name]))
    return out, ok


def _init_state(config, plan, params, rng_key, arrays, static):
    args, kwargs = merge_args(arrays, static)
    return core.init_state(config, plan, params, rng_key, args, kwargs)


def _update(config, state, arrays, static, reread=None):
    args, kwargs = merge_args(arrays, static)
    again = None if reread is None else lambda: merge_args(reread(), static)
    return core.update(config, state, args, kwargs, again)


def _scan(config, state, arrays, static, length, skip):
    """`_update` over stacked batches ``skip`` to ``skip + length`` (traced counts): the
    others are padding or were applied already, and are never computed (a loop of
    ``length`` steps, as ``lax.scan`` lowers to), so that a shorter call shares the full
    chunk's compiled program and costs its own batches only. Returns the state and the
    stacked infos (zeros elsewhere)."""
    num = jax.tree.leaves(arrays)[0].shape[0]
    # every field of every update's info in one (num, fields) buffer: one write per
    # update instead of one per field (each write is an operation of the loop's body)
    dtypes = UpdateInfo.zeros((), state.num_seen.dtype)
    rows = jnp.zeros((num, len(dtypes)), state.num_seen.dtype)

    def body(i, carry):
        s, out = carry
        # read again in the branch that checks the Polyak average (`core.update`)
        at = lambda: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), arrays)
        s, one = _update(config, s, at(), static, at)
        row = jnp.stack([v.astype(out.dtype) for v in one])
        return s, jax.lax.dynamic_update_index_in_dim(out, row, i, 0)

    stop = jnp.minimum(skip + length, num)
    state, rows = jax.lax.fori_loop(skip, stop, body, (state, rows))
    fields = (rows[:, j].astype(z.dtype) for j, z in enumerate(dtypes))
    return state, UpdateInfo(*fields)


def _loglik(config, state, arrays, static):
    args, kwargs = merge_args(arrays, static)
    return core.log_likelihood(config, state.plan, state.averaged, args, kwargs, state.shifts)


def _marginals(config, state, arrays, static):
    args, kwargs = merge_args(arrays, static)
    return core.marginals(config, state.plan, state.averaged, args, kwargs, state.shifts)


_update_jit = jax.jit(_update, static_argnums=(0, 3))
_scan_jit = jax.jit(_scan, static_argnums=(0, 3))
_loglik_jit = jax.jit(_loglik, static_argnums=(0, 3))
_marginals_jit = jax.jit(_marginals, static_argnums=(0, 3))
_init_state_jit = jax.jit(_init_state, static_argnums=(0, 1, 5))
