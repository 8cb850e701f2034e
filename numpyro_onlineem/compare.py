r"""Compare an online fit with NUTS on the same model: the posterior that the point
estimate summarises, side by side with it.

`compare_with_nuts` runs ``MCMC(NUTS(model))`` on the model function `OnlineEM` fitted,
unchanged, on the data given (discrete local latents enumerated by NumPyro), aligns the
component labels of the two fits, and returns both as ArviZ ``InferenceData`` with a
table and plots. ArviZ, pandas and matplotlib are imported on first use.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions import Distribution, ImproperUniform
from numpyro.distributions.transforms import biject_to
from numpyro.infer import MCMC, NUTS
from numpyro.primitives import Messenger
from scipy.optimize import linear_sum_assignment

from numpyro_onlineem import plots
from numpyro_onlineem.arviz_io import draws_to_inference_data, import_optional
from numpyro_onlineem.labels import (
    component_axes,
    component_costs,
    match_components,
    permute_components,
    trace_sites,
)

if TYPE_CHECKING:  # pragma: no cover
    import arviz as az
    import pandas as pd

SUBSAMPLE_MODES = ("raise", "data", "scaled")


@dataclass(frozen=True, repr=False)
class NUTSComparison:
    r"""What `compare_with_nuts` returns.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per scalar element of every estimated site NUTS sampled, indexed as
        ArviZ indexes them (``"locs[1, 0]"``), in model order. Columns: ``estimate`` (the
        online estimate), ``mean``, ``sd``, ``hdi_3%``, ``hdi_97%`` (named after
        ``hdi_prob``), ``mcse_mean``, ``ess_bulk``, ``r_hat`` (NaN with one chain) of the
        aligned NUTS draws, ``z`` $= (\text{estimate} - \text{mean}) / \text{sd}$ and
        ``inside_hdi`` (the estimate lies in the HDI, ends included).
    online : arviz.InferenceData
        The online estimate, one chain of one draw (`to_inference_data`).
    nuts : arviz.InferenceData
        The NUTS fit (``az.from_numpyro``, without a ``log_likelihood`` group: NumPyro
        would compute it at sampled, not summed-out, discrete latents), its posterior
        relabelled to the online estimate's components.
    mcmc : numpyro.infer.MCMC
        The NUTS run, as sampled (not relabelled).
    permutation : dict[str, Array]
        For each enumerated latent whose states index sites NUTS sampled, an int array of
        shape ``(num_chains, K)``: ``permutation[z][c, k]`` is the component of chain
        ``c`` that was relabelled ``k``, the online estimate's component ``k`` (the
        identity when a held ``numpyro.param`` fixes the labels).
    component_sites : dict[str, dict[str, int]]
        For each enumerated latent, the axis of each site its states index (those the
        permutation was applied to).
    fixed : tuple[str, ...]
        The ``numpyro.param`` sites NUTS held at the online estimate.
    nuts_seconds : float
        Wall time of NUTS: compilation, warmup and sampling.
    online_seconds : float or None
        Wall time of the online fit, as passed to `compare_with_nuts`.
    losses : Array or None, shape (num_updates,)
        The online fit's losses, as passed to `compare_with_nuts`.
    hdi_prob : float
    """

    table: pd.DataFrame
    online: az.InferenceData
    nuts: az.InferenceData
    mcmc: MCMC
    permutation: dict[str, np.ndarray]
    component_sites: dict[str, dict[str, int]]
    fixed: tuple[str, ...]
    nuts_seconds: float
    online_seconds: float | None
    losses: np.ndarray | None
    hdi_prob: float

    def plot(self, directory: str | Path) -> dict[str, Path]:
        """Save every plot as a PNG in ``directory`` (created if needed): ``posterior.png``,
        ``forest.png`` and, when the losses were passed, ``loss.png``.

        Returns
        -------
        dict[str, Path]
            ``{"posterior": ..., "forest": ..., "loss": ...}``, the files written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {
            "posterior": self.plot_posterior(directory / "posterior.png"),
            "forest": self.plot_forest(directory / "forest.png"),
        }
        if self.losses is not None:
            files["loss"] = self.plot_loss(directory / "loss.png")
        return files

    def plot_posterior(self, path: str | Path, dpi: int = 80, max_panels: int = 60) -> Path:
        """NUTS posterior density of every element in the table, the online estimate
        marked (`numpyro_onlineem.plots.plot_posterior`)."""
        return plots.plot_posterior(self, path, dpi=dpi, max_panels=max_panels)

    def plot_forest(self, path: str | Path, dpi: int = 80) -> Path:
        """Forest plot of both fits, one panel per site
        (`numpyro_onlineem.plots.plot_forest`)."""
        return plots.plot_forest(self, path, dpi=dpi)

    def plot_loss(self, path: str | Path, dpi: int = 80) -> Path:
        """The online loss over the stream (`numpyro_onlineem.plots.plot_loss`); needs
        ``losses``."""
        if self.losses is None:
            raise ValueError(
                "NUTSComparison.plot_loss: no losses; pass losses=result.losses (from "
                "OnlineEM.run) to compare_with_nuts."
            )
        return plots.plot_loss(self.losses, path, dpi=dpi)

    def __repr__(self) -> str:
        inside, rows = int(self.table["inside_hdi"].sum()), len(self.table)
        online = "" if self.online_seconds is None else f", online {self.online_seconds:.1f} s"
        return (
            f"NUTSComparison({inside} of {rows} estimates inside the "
            f"{self.hdi_prob:.0%} HDI, max |z| {self.table['z'].abs().max():.2f}; "
            f"NUTS {self.nuts_seconds:.1f} s{online}; permutation "
            f"{ {k: v.tolist() for k, v in self.permutation.items()} })"
        )

    @property
    def sites(self) -> list[str]:
        """The sites in the table, in model order."""
        return list(dict.fromkeys(label.split("[")[0] for label in self.table.index))


def compare_with_nuts(
    em: Any,
    state: Any,
    *args: Any,
    rng_key: jax.Array,
    num_warmup: int = 500,
    num_samples: int = 1000,
    num_chains: int = 1,
    param_priors: dict[str, Distribution] | None = None,
    subsample: str = "raise",
    align: bool | dict[str, dict[str, int]] = True,
    hdi_prob: float = 0.94,
    losses: Any = None,
    online_seconds: float | None = None,
    nuts_kwargs: dict | None = None,
    mcmc_kwargs: dict | None = None,
    **kwargs: Any,
) -> NUTSComparison:
    r"""Run NUTS on the model `OnlineEM` fitted and set the online estimate beside it.

    NUTS samples the posterior of the model's global latent sites given the data passed
    (``*args, **kwargs``, the model's arguments, usually a subsample of the stream):

    $$
    p(\theta \mid x_{1:n}) \propto \pi(\theta) \prod_{i=1}^{n} \sum_z p(x_i, z \mid \theta),
    $$

    with ``MCMC(NUTS(model))`` on ``em.model`` itself, its discrete local latents
    enumerated by NumPyro (``config_enumerate``). The online estimate of a global site is
    its posterior mode, so it should lie inside the NUTS HDI when the two see the same
    posterior.

    - ``numpyro.param`` sites have no prior: by default NUTS holds them at the online
      estimate (``handlers.substitute``), and the posterior is conditional on them.
      ``param_priors={"locs": dist.Normal(0, 10)}`` gives chosen ones a prior instead
      (``handlers.lift``), and NUTS samples them too.
    - NUTS cannot subsample: it runs on exactly the points passed. A data plate declared
      with ``subsample_size`` smaller than its size (``numpyro.plate("data", N,
      subsample_size=x.shape[0])``, the size the online fit weighs the prior against)
      raises by default; pass the model's arguments for the points given (``N`` = their
      number), or ``subsample="data"`` to make the plate's size the number of points
      passed, or ``subsample="scaled"`` to keep the likelihood scaled by
      ``N / subsample_size``.
    - Component labels: for each enumerated latent, `component_axes` finds the axes of
      the sites its states index; each chain's components are matched to the online
      ones (`match_components`, Hungarian on the posterior means in posterior-sd units)
      and relabelled on every such site. When a ``numpyro.param`` held at the online
      estimate is indexed by the latent, it fixes the labels (NUTS cannot permute it):
      nothing is permuted, and a chain whose sampled components sit in another order
      (another mode of the posterior given the held values) is reported by a warning.

    Parameters
    ----------
    em : OnlineEM
        The online fit's object; ``em.model`` is run by NUTS.
    state : OnlineEMState
        The online fit; `OnlineEM.get_params` gives the estimates.
    *args, **kwargs
        The model's arguments for the data NUTS runs on. Names below are reserved.
    rng_key : PRNGKey
    num_warmup, num_samples, num_chains : int
        As in ``numpyro.infer.MCMC``. Chains run in parallel when there are as many
        devices, else one after the other (``mcmc_kwargs={"chain_method": ...}``).
    param_priors : dict[str, Distribution], optional
        Priors for ``numpyro.param`` sites, by name, broadcast to the site's shape; their
        support must lie in the site's constraint.
    subsample : {"raise", "data", "scaled"}
        What to do with a plate that subsamples (see above).
    align : bool or dict
        ``True``: find and align component labels; ``False``: leave them; a dict
        ``{latent: {site: axis}}``: align on these axes.
    hdi_prob : float
        Probability mass of the HDI (0.94, ArviZ's default: columns ``hdi_3%``,
        ``hdi_97%``).
    losses : Array, optional
        The online fit's losses (``OnlineEM.run(...).losses``), for `NUTSComparison.plot`.
    online_seconds : float, optional
        Wall time of the online fit, recorded next to NUTS's.
    nuts_kwargs, mcmc_kwargs : dict, optional
        Passed to ``NUTS`` (``init_strategy``, ``target_accept_prob``, ...) and ``MCMC``
        (``chain_method``, ``progress_bar`` (default off), ``thinning``, ...).

    Returns
    -------
    NUTSComparison
        ``table``, ``online``, ``nuts``, ``mcmc``, ``permutation``, times and plots.

    Raises
    ------
    ValueError
        For arguments out of range; a ``param_priors`` entry that names no
        ``numpyro.param`` site, does not broadcast to its shape or has a support wider
        than its constraint; a subsampling plate (``subsample="raise"``); a discrete
        latent NUTS cannot enumerate; an improper prior; nothing for NUTS to sample.
    TypeError
        For a ``param_priors`` value that is not a NumPyro distribution.
    """
    _check_options(num_warmup, num_samples, num_chains, subsample, hdi_prob, align)
    az = import_optional("arviz")
    estimate = {name: np.asarray(value) for name, value in em.get_params(state).items()}
    plain = trace_sites(em.model, estimate, args, kwargs)
    missing = sorted(set(estimate) - set(plain))
    if missing:
        raise ValueError(
            f"compare_with_nuts: the state estimates {missing}, which are not sites of "
            "em.model with these arguments; pass the state em fitted and the model's "
            "arguments."
        )
    order = [name for name in plain if name in estimate]
    priors = _check_param_priors(param_priors, plain, estimate)
    fixed = tuple(n for n in order if plain[n]["type"] == "param" and n not in priors)
    scales = _subsampling_plates(plain)
    if scales and subsample == "raise":
        name, (size, sub) = next(iter(scales.items()))
        raise ValueError(
            f"compare_with_nuts: the plate '{name}' has size {size} but subsamples "
            f"{sub} points (subsample_size={sub}). NUTS cannot subsample: it runs on "
            "exactly the points passed. Pass the model's arguments for these points (a "
            f"plate of size {sub}, e.g. N={sub}) to compare with the posterior given "
            "them; or subsample='data' to set the plate's size to the points passed; "
            f"or subsample='scaled' to keep their likelihood scaled by {size}/{sub}."
        )

    if isinstance(align, dict):
        _check_align(align, estimate)
    model = _nuts_model(em.model, {n: estimate[n] for n in fixed}, priors, subsample)
    sampled = _check_nuts_model(model, estimate, args, kwargs, priors)
    mcmc_kwargs = dict(mcmc_kwargs or {})
    mcmc_kwargs.setdefault("progress_bar", False)
    if "chain_method" not in mcmc_kwargs and num_chains > jax.local_device_count():
        mcmc_kwargs["chain_method"] = "sequential"
    mcmc = MCMC(
        NUTS(model, **(nuts_kwargs or {})),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        **mcmc_kwargs,
    )
    start = time.perf_counter()
    mcmc.run(rng_key, *args, **kwargs)
    draws = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    nuts_seconds = time.perf_counter() - start
    draws = {name: np.asarray(value) for name, value in draws.items()}

    if align is True:
        axes = component_axes(em.model, estimate, *args, **kwargs)
    else:
        axes = align or {}
    draws, permutation = _align_labels(axes, estimate, draws)

    nuts = az.from_numpyro(mcmc, log_likelihood=False)
    for name, value in draws.items():
        nuts.posterior[name] = (nuts.posterior[name].dims, value)
    online = draws_to_inference_data(
        {name: estimate[name][None, None] for name in order}, estimate="point"
    )
    table_sites = [name for name in order if name in sampled]
    table = _table(az, nuts, estimate, table_sites, hdi_prob, num_chains)
    _warn_if_chains_disagree(table)
    _warn_if_unaligned_and_apart(table, [latent for latent, sites in axes.items() if not sites])
    return NUTSComparison(
        table=table,
        online=online,
        nuts=nuts,
        mcmc=mcmc,
        permutation=permutation,
        component_sites={k: v for k, v in axes.items() if v},
        fixed=fixed,
        nuts_seconds=nuts_seconds,
        online_seconds=online_seconds,
        losses=None if losses is None else np.asarray(losses),
        hdi_prob=hdi_prob,
    )


# ------------------------------------------------------------------ validation
def _check_options(num_warmup, num_samples, num_chains, subsample, hdi_prob, align):
    for name, value, low in (
        ("num_warmup", num_warmup, 0),
        ("num_samples", num_samples, 4),
        ("num_chains", num_chains, 1),
    ):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"compare_with_nuts: {name} must be an int >= {low}, got {value!r}.")
    if subsample not in SUBSAMPLE_MODES:
        raise ValueError(
            f"compare_with_nuts: subsample must be one of {SUBSAMPLE_MODES}, got {subsample!r}."
        )
    if not 0 < hdi_prob < 1:
        raise ValueError(f"compare_with_nuts: hdi_prob must be in (0, 1), got {hdi_prob!r}.")
    if not isinstance(align, bool | dict):
        raise TypeError(
            f"compare_with_nuts: align must be True, False or {{latent: {{site: axis}}}}, "
            f"got {type(align).__name__}."
        )


def _check_param_priors(param_priors, plain, estimate):
    """Each prior broadcast to its site's shape, as one event; errors name the site."""
    params = [n for n in plain if n in estimate and plain[n]["type"] == "param"]
    out = {}
    for name, prior in (param_priors or {}).items():
        if name not in params:
            what = (
                f"'{name}' is a numpyro.sample site with its own prior"
                if name in plain and plain[name]["type"] == "sample"
                else f"'{name}' is not a site of the model"
            )
            raise ValueError(
                f"compare_with_nuts: param_priors names {what}; it takes numpyro.param "
                f"sites only: {params}."
            )
        if not isinstance(prior, Distribution):
            raise TypeError(
                f"compare_with_nuts: param_priors['{name}'] must be a NumPyro distribution "
                f"(e.g. dist.Normal(0.0, 10.0)), got {type(prior).__name__}."
            )
        shape = estimate[name].shape
        event = prior.event_shape
        batch = shape[: len(shape) - len(event)]
        if shape[len(batch) :] != tuple(event):
            raise ValueError(
                f"compare_with_nuts: param_priors['{name}'] has event shape {event}, which "
                f"does not end the site's shape {shape}."
            )
        try:
            prior = prior.expand(batch) if prior.batch_shape != batch else prior
        except ValueError as e:
            raise ValueError(
                f"compare_with_nuts: param_priors['{name}'] has batch shape "
                f"{prior.batch_shape}, which does not broadcast to the site's shape {shape}."
            ) from e
        constraint = plain[name]["kwargs"].get("constraint")
        if constraint is not None and not _support_within(prior.support, constraint, shape):
            raise ValueError(
                f"compare_with_nuts: param_priors['{name}'] has support {prior.support}, "
                f"wider than the site's constraint {constraint}: NUTS would propose values "
                f"the model does not accept. Use a prior on {constraint} (for a positive "
                "site, e.g. dist.LogNormal or dist.Gamma)."
            )
        out[name] = prior.to_event(len(batch)) if batch else prior
    return out


def _support_within(support, constraint, shape) -> bool:
    """Whether random points of ``support`` (mapped from unconstrained space) satisfy
    ``constraint``."""
    transform = biject_to(support)
    u = np.random.default_rng(0).normal(scale=3.0, size=(64,) + transform.inverse_shape(shape))
    return bool(np.all(constraint.check(transform(jnp.asarray(u)))))


def _subsampling_plates(trace) -> dict[str, tuple[int, int]]:
    return {
        name: site["args"]
        for name, site in trace.items()
        if site["type"] == "plate"
        and site["args"][1] is not None
        and site["args"][1] != site["args"][0]
    }


def _check_nuts_model(model, estimate, args, kwargs, priors) -> set[str]:
    """The latent sites NUTS will sample; errors for what NUTS cannot run. (The model
    is traced at the estimates: nothing but the discrete latents is drawn.)"""
    at_estimate = handlers.substitute(model, data=_as_jax(estimate))
    trace = handlers.trace(handlers.seed(at_estimate, rng_seed=0)).get_trace(*args, **kwargs)
    sampled = set()
    for name, site in trace.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            if not fn.has_enumerate_support:
                raise ValueError(
                    f"compare_with_nuts: site '{name}' ({_family(fn)}) is a discrete latent "
                    "without enumerate support; NUTS can only sum out discrete latents "
                    "with finite support (Categorical, Bernoulli, ...). Make it one, or "
                    "observe it."
                )
            mark = site["infer"].get("enumerate")
            if mark not in (None, "parallel"):
                raise ValueError(
                    f"compare_with_nuts: site '{name}' is marked "
                    f"infer={{'enumerate': {mark!r}}}; NUTS sums out discrete latents in "
                    "parallel only. Remove the mark or make it 'parallel'."
                )
            continue
        if _is_improper(fn):
            where = "param_priors" if name in priors else "the model"
            raise ValueError(
                f"compare_with_nuts: site '{name}' has an improper prior ({_family(fn)}) in "
                f"{where}. Its posterior need not be proper (a mixture component without "
                "points has an unbounded location), so NUTS may not converge. Give it a "
                "proper prior, e.g. dist.Normal(0.0, 10.0) on a location."
            )
        sampled.add(name)
    if not sampled:
        raise ValueError(
            "compare_with_nuts: NUTS has nothing to sample: every estimated site is a "
            "numpyro.param held at the online estimate. Give some a prior with "
            "param_priors={site: distribution}."
        )
    return sampled


def _check_align(align, estimate):
    for latent, sites in align.items():
        sizes = set()
        for name, axis in sites.items():
            if name not in estimate:
                raise ValueError(
                    f"compare_with_nuts: align['{latent}'] names '{name}', which is not an "
                    f"estimated site ({sorted(estimate)})."
                )
            shape = estimate[name].shape
            if not isinstance(axis, int) or not 0 <= axis < len(shape):
                raise ValueError(
                    f"compare_with_nuts: align['{latent}']['{name}'] = {axis!r} is not an "
                    f"axis of its shape {shape}."
                )
            sizes.add(shape[axis])
        if len(sizes) > 1:
            raise ValueError(
                f"compare_with_nuts: align['{latent}'] gives axes of different sizes {sizes}."
            )


def _align_labels(axes, estimate, draws):
    """Relabel the draws of each latent's sampled sites to the online components; a
    latent with a held site keeps its labels (the held values fix them)."""
    permutation = {}
    for latent, sites in axes.items():
        drawn = {name: axis for name, axis in sites.items() if name in draws}
        if not drawn:
            continue
        held = [name for name in sites if name not in draws]
        if held:  # NUTS cannot permute the held sites
            _check_same_mode(latent, estimate, draws, drawn, held)
            k = estimate[held[0]].shape[sites[held[0]]]
            num_chains = next(iter(draws.values())).shape[0]
            permutation[latent] = np.tile(np.arange(k), (num_chains, 1))
        else:
            permutation[latent] = match_components(estimate, draws, drawn)
            draws = permute_components(draws, drawn, permutation[latent])
    return draws, permutation


#: Largest split r-hat of a sampled site before `compare_with_nuts` warns that its chains
#: disagree (1.01 is Vehtari et al.'s (2021) bar for a final analysis; a comparison's
#: short runs often miss it by a little, while chains in different modes give 1.5 to 2).
R_HAT_MAX = 1.05


def _warn_if_chains_disagree(table) -> None:
    """Warn when NUTS's chains disagree (r-hat above `R_HAT_MAX`): the table pools them,
    so its mean, sd, HDI and z describe no one posterior mode."""
    r_hat = table["r_hat"].to_numpy(dtype=float)
    if not np.any(r_hat > R_HAT_MAX):
        return
    rows = list(table.index[r_hat > R_HAT_MAX])
    warnings.warn(
        f"compare_with_nuts: NUTS's chains disagree on {len(rows)} of {len(table)} rows "
        f"(r_hat up to {np.nanmax(r_hat):.3g} on {rows[:5]}): the table pools them, so its "
        "mean, sd, HDI and z do not describe one posterior mode. A chain stuck in another "
        "mode, or too short a warmup, is the usual cause: look at the chains apart "
        "(result.nuts.posterior), run longer (num_warmup=...), or start NUTS at the online "
        "estimate (nuts_kwargs={'init_strategy': init_to_value(values=em.get_params(state))}).",
        UserWarning,
        stacklevel=3,
    )


def _warn_if_unaligned_and_apart(table, unaligned: list) -> None:
    """Warn when a latent's labels could not be aligned and the online estimate lies
    outside NUTS's HDI on every row: NUTS may have sampled the other labelling."""
    if not unaligned or len(table) < 2 or bool(table["inside_hdi"].any()):
        return
    warnings.warn(
        f"compare_with_nuts: the online estimate lies outside NUTS's HDI on all "
        f"{len(table)} rows (|z| up to {np.nanmax(np.abs(table['z'])):.3g}), and the labels "
        f"of {unaligned} could not be aligned: relabelling their states is not a "
        "permutation of axes of the estimated sites (a Bernoulli latent's probability p "
        "against 1 - p, say). NUTS may have sampled the other labelling, or the two fits "
        "sit at different modes: compare the chains' means with the estimate, or write "
        "the latent as a Categorical over weights indexed like the components.",
        UserWarning,
        stacklevel=3,
    )


#: Mean squared standardised distance above which a chain is not near the online fit.
OTHER_MODE_COST = 16.0


def _check_same_mode(latent, estimate, draws, sampled, held):
    """Warn when a chain sampled the components of a latent with held sites in another
    order than the online fit: another mode of the posterior given the held values."""
    costs = component_costs(estimate, draws, sampled)
    for c, cost in enumerate(costs):
        k = len(cost)
        rows, cols = linear_sum_assignment(cost)
        best = cols[np.argsort(rows)]
        if (best != np.arange(k)).any() and np.trace(cost) / k > OTHER_MODE_COST:
            warnings.warn(
                f"compare_with_nuts: chain {c} of NUTS sampled the components of "
                f"{sorted(sampled)} in another order than the online fit (its components "
                f"{best.tolist()} are the online {', '.join(map(str, range(k)))}), while "
                f"{held} are held at the online estimate in its order: that is another mode "
                "of the posterior given the held values, so the table compares different "
                "modes. Start NUTS at the online estimate (nuts_kwargs={'init_strategy': "
                "init_to_value(values=em.get_params(state))}) or give the held sites "
                "priors (param_priors).",
                UserWarning,
                stacklevel=4,
            )


def _as_jax(values: dict) -> dict:
    """JAX arrays for substitution: the model may index them with traced latents."""
    return {name: jnp.asarray(value) for name, value in values.items()}


def _is_improper(fn) -> bool:
    while not isinstance(fn, ImproperUniform) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, ImproperUniform)


def _family(fn) -> str:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


# ----------------------------------------------------------------- NUTS model
class _FullDataPlates(Messenger):
    """Plates that subsample run on the points given: indices ``0..subsample_size - 1``;
    with ``rescale``, the sites inside lose the plate's ``size / subsample_size`` scale,
    so that the plate is as if of the points' own size."""

    def __init__(self, fn=None, rescale: bool = True):
        self.rescale = rescale
        self.ratios: dict[str, float] = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "plate":
            size, sub = msg["args"]
            if sub is not None and sub != size and msg["value"] is None:
                msg["value"] = jnp.arange(sub)
                self.ratios[msg["name"]] = sub / size
        elif msg["type"] == "sample" and self.rescale:
            for frame in msg["cond_indep_stack"]:
                if frame.name in self.ratios:
                    msg["scale"] = msg["scale"] * self.ratios[frame.name]


def _nuts_model(model, fixed, priors, subsample):
    """The model as NUTS runs it: discrete latents marked for enumeration, param sites
    held fixed or lifted to their priors, subsampling plates over the points given."""
    lifted = handlers.lift(model, prior=priors)
    model = config_enumerate(handlers.substitute(lifted, data=_as_jax(fixed)))
    if subsample == "raise":
        return model

    def full_data(*args, **kwargs):
        with _FullDataPlates(rescale=subsample == "data"):
            return model(*args, **kwargs)

    return full_data


# ---------------------------------------------------------------------- table
def _table(az, nuts, estimate, sites, hdi_prob, num_chains):
    pd = import_optional("pandas")
    stats = az.summary(nuts, var_names=sites, kind="stats", hdi_prob=hdi_prob, round_to="none")
    columns = {
        "mcse_mean": az.mcse(nuts, var_names=sites, method="mean"),
        "ess_bulk": az.ess(nuts, var_names=sites, method="bulk"),
    }
    if num_chains > 1:
        columns["r_hat"] = az.rhat(nuts, var_names=sites)
    extra = pd.DataFrame(
        {column: _flatten(ds, sites) for column, ds in columns.items()}, index=_labels(nuts, sites)
    )
    lo, hi = stats.columns[2], stats.columns[3]
    table = pd.DataFrame(index=stats.index)
    table["estimate"] = pd.Series(
        np.concatenate([estimate[name].ravel() for name in sites]), index=_labels(nuts, sites)
    )
    table["mean"], table["sd"] = stats["mean"], stats["sd"]
    table[lo], table[hi] = stats[lo], stats[hi]
    table["mcse_mean"], table["ess_bulk"] = extra["mcse_mean"], extra["ess_bulk"]
    table["r_hat"] = extra["r_hat"] if "r_hat" in extra else np.nan
    table["z"] = (table["estimate"] - table["mean"]) / table["sd"]
    table["inside_hdi"] = (table[lo] <= table["estimate"]) & (table["estimate"] <= table[hi])
    if table["estimate"].isna().any():  # labels of ArviZ and ours differ: a bug
        raise RuntimeError(f"compare_with_nuts: rows without an estimate: {table.index}")
    return table


def _labels(idata, sites) -> list[str]:
    labels = []
    for name in sites:
        coords = [idata.posterior[name][dim].values for dim in idata.posterior[name].dims[2:]]
        shape = idata.posterior[name].shape[2:]
        for index in np.ndindex(shape):
            inner = ", ".join(str(c[i]) for c, i in zip(coords, index, strict=True))
            labels.append(f"{name}[{inner}]" if shape else name)
    return labels


def _flatten(ds, sites) -> np.ndarray:
    return np.concatenate([np.ravel(ds[name].values) for name in sites])
