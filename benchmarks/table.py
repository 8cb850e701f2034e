"""The streaming benchmark's table: its header, columns and rows (markdown), and the
helpers every benchmark table uses."""

from __future__ import annotations

import os
import platform

import jax
import numpy as np
import numpyro

from benchmarks.streaming import MIN_TIMED_SECONDS

COLUMNS = (
    "case",
    "kappa",
    "OEM kpt/s",
    "JAX kpt/s",
    "OEM/JAX",
    "SVI kpt/s",
    "skl kpt/s",
    "skl it",
    "LL*",
    "gap OEM",
    "gap JAX",
    "gap SVI",
    "gap skl1",
    "t.02 OEM",
    "t.02 JAX",
    "t.02 SVI",
    "t.02 skl",
    "skl/OEM",
    "SVI gap@T",
    "OEM passes",
)


def fmt(value, spec):
    """A table cell: ``n/a`` for a target never reached, ``>cap`` past the pass cap."""
    if value is None:
        return "n/a"
    if np.isinf(value):
        return ">cap"
    return format(value, spec)


def table_row(case, kappa_label, oem, jx, svi, skl, gap_tol, first):
    """One markdown row. The SVI and sklearn cells, which do not depend on the step
    sizes, are filled on a case's first row only."""
    target = case.ll_star - gap_tol
    t_oem = oem["trace"].seconds_to(target)
    ratio = None
    if t_oem is not None and skl["time_to_target"] is not None:
        ratio = skl["time_to_target"] / max(t_oem, 1e-9)
    one_pass = oem["trace"].seconds[np.searchsorted(oem["trace"].points, len(case.x))]

    def only_first(cell):
        return cell if first else ""

    cells = [
        f"D={case.d} K={case.k} {case.covariance}",
        kappa_label,
        fmt(oem["throughput"] / 1e3, ".1f"),
        fmt(jx["throughput"] / 1e3, ".1f"),
        fmt(oem["throughput"] / jx["throughput"], ".2f"),
        only_first(fmt(svi["throughput"] / 1e3, ".1f")),
        only_first(fmt(skl["throughput"] / 1e3, ".1f")),
        only_first(str(skl["n_iter"])),
        fmt(case.ll_star, ".2f"),
        fmt(oem["gap"], ".3f"),
        fmt(jx["gap"], ".3f"),
        only_first(fmt(svi["gap"], ".3f")),
        only_first(fmt(skl["gap"], ".3f")),
        fmt(t_oem, ".3g"),
        fmt(jx["trace"].seconds_to(target), ".3g"),
        only_first(fmt(svi["trace"].seconds_to(target), ".3g")),
        only_first(fmt(skl["time_to_target"], ".3g")),
        fmt(ratio, ".1f"),
        fmt(case.ll_star - svi["trace"].loglik_at(one_pass), ".3f"),
        fmt(oem["passes"], ".2f"),
    ]
    return markdown_row(cells)


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """``"<CPU>, <n> CPU cores, jax <version> (<backend>), numpyro <version>; load
    average at start <load>"``: the first words of every benchmark's header."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} ({jax.default_backend()}), numpyro {numpyro.__version__}; "
        f"load average at start {load:.2f}"
    )


def markdown_row(cells):
    """``| a | b | c |``."""
    return "| " + " | ".join(cells) + " |"


def markdown_head(columns):
    """The header row and the rule under it."""
    return markdown_row(columns) + "\n" + "|" + "|".join("---" for _ in columns) + "|"


def header(args, sizes):
    """The streaming table's comment lines: machine, sizes, and what each column means.
    ``sizes`` maps D to ``(N, batches per evaluation)``."""
    tol = args.gap
    return (
        f"# GMM stream benchmark. {machine()}.\n"
        f"# Batch size {args.batch_size}; stream N (updates, after the init points): "
        + ", ".join(f"D={d}: {n:,}" for d, (n, _) in sizes.items())
        + f"; {args.num_test:,} held-out points; held-out LL every 1/{args.evals} pass.\n"
        "# Shared start: k-means++ over the first 50 K points (whole batches; OnlineEM.run's"
        " default init_points), which also initialise OEM's and JAX's statistics.\n"
        "# kpt/s: thousand points per second, compile excluded, fastest of >="
        f" {args.repeats} passes (>= {MIN_TIMED_SECONDS:g} s of them; OEM and JAX timed in"
        " turn; skl: N x iterations / fit time). OEM = OnlineEM.run;"
        " JAX = the same math hand-written in JAX;\n"
        f"# SVI = NumPyro SVI, TraceEnum_ELBO, Adam lr={args.svi_lr}; skl = sklearn"
        f" GaussianMixture, float64, tol={args.sklearn_tol}; skl it = its iterations.\n"
        "# kappa: step exponent; '*' = OnlineEM's defaults for the case (with '+avg': Polyak"
        " averaging on), JAX replicating them.\n"
        "# LL*: held-out mean log-lik per point of the converged batch fit. gap X = LL* - LL"
        " after one pass (skl1: after one batch EM iteration).\n"
        f"# t.02 X: training seconds until LL >= LL* - {tol}, over up to {args.max_passes}"
        " passes (the first in stream order, then reshuffled; n/a: not reached): points"
        " needed / throughput (skl: fit time x iterations needed / iterations);"
        " skl/OEM = t.02 skl / t.02 OEM (> 1: OnlineEM is faster).\n"
        "# SVI gap@T: LL* - LL of SVI after the seconds OnlineEM took for one pass."
        f" OEM passes: passes until LL >= LL* - {tol} (>cap: not within {args.max_passes}).\n"
        f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}\n"
    )
