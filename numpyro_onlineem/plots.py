"""The comparison's plots, saved as PNG through ArviZ and matplotlib: NUTS posterior
densities with the online estimates marked, a forest plot of both fits, and the online
loss over the stream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from numpyro_onlineem.arviz_io import import_optional

if TYPE_CHECKING:  # pragma: no cover
    from numpyro_onlineem.compare import NUTSComparison


def plot_posterior(
    comparison: NUTSComparison, path: str | Path, dpi: int = 80, max_panels: int = 60
) -> Path:
    """NUTS posterior density of every element in the table (``az.plot_posterior``, with
    its HDI), the online estimate marked as the reference value: the vertical line, with
    the posterior mass on either side of it. Beyond ``max_panels`` elements ArviZ plots
    the first ones and warns."""
    az, plt = import_optional("arviz"), import_optional("matplotlib.pyplot")
    nuts, online, sites = comparison.nuts, comparison.online, comparison.sites
    ref_val = {
        name: [
            {**_selection(nuts, name, index), "ref_val": float(value)}
            for index, value in np.ndenumerate(online.posterior[name].values[0, 0])
        ]
        for name in sites
    }
    panels = min(len(comparison.table), max_panels)
    with az.rc_context({"plot.max_subplots": panels}):
        axes = az.plot_posterior(
            nuts,
            var_names=sites,
            hdi_prob=comparison.hdi_prob,
            ref_val=ref_val,
            textsize=9,
            figsize=_grid_size(panels),
        )
    figure = np.ravel(axes)[0].figure
    figure.suptitle("NUTS posterior; online estimate: vertical line", fontsize=12)
    figure.set_layout_engine("constrained")
    return _save(plt, figure, path, dpi)


def plot_forest(comparison: NUTSComparison, path: str | Path, dpi: int = 80) -> Path:
    """Forest plot of both fits (``az.plot_forest``), one panel per site so that each has
    its own scale: for NUTS the mean and the HDI, for the online fit its estimate,
    element by element."""
    az, plt = import_optional("arviz"), import_optional("matplotlib.pyplot")
    sites = comparison.sites
    sizes = [int(np.prod(comparison.nuts.posterior[name].shape[2:])) for name in sites]
    figure, axes = plt.subplots(
        len(sites),
        1,
        figsize=(6, 0.9 * len(sites) + 0.4 * sum(sizes)),
        gridspec_kw={"height_ratios": [1 + s for s in sizes]},
        squeeze=False,
    )
    for name, ax in zip(sites, axes[:, 0], strict=True):
        az.plot_forest(
            [comparison.nuts, comparison.online],
            model_names=["NUTS", "online EM"],
            var_names=[name],
            combined=True,
            hdi_prob=comparison.hdi_prob,
            legend=False,
            textsize=10,
            ax=ax,
        )
        ax.set_title(name, fontsize=11)
    figure.suptitle(f"NUTS mean and {comparison.hdi_prob:.0%} HDI; online estimate", fontsize=11)
    figure.tight_layout()
    return _save(plt, figure, path, dpi)


def plot_loss(losses: Any, path: str | Path, dpi: int = 80) -> Path:
    """The online loss of each update (negative log-likelihood per point of its batch,
    under the parameters before it) over the stream, with its running mean over 1 % of
    the updates; updates on a log scale."""
    plt = import_optional("matplotlib.pyplot")
    losses = np.asarray(losses, np.float64)
    figure, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.5, label="batch")
    width = max(1, len(losses) // 100)
    if width > 1:
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1 :], smooth, lw=1.5, label=f"mean of {width}")
    ax.set_xscale("log")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (nats per point)")
    ax.set_title("Online EM over the stream")
    ax.legend()
    return _save(plt, figure, path, dpi)


def _selection(idata, name, index) -> dict:
    dims = idata.posterior[name].dims[2:]
    return {dim: idata.posterior[name][dim].values[i] for dim, i in zip(dims, index, strict=True)}


def _grid_size(n: int) -> tuple[float, float]:
    cols = min(n, 3)
    rows = -(-n // cols)
    return (3.6 * cols, 2.9 * rows + 0.6)


def _save(plt, figure, path, dpi) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path
