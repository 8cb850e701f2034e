"""Fresh fit, compile included: what a user waits for.

`benchmarks.gmm_stream` excludes compile time. Here the clock runs from before
``OnlineEM(model)`` to the estimates on the host, on one stream of a diagonal Gaussian
mixture (by default D=64, K=10, batches of 256, 100,000 points cut to whole batches;
the first batch initialises, the others update):

* **OEM fresh**: a new Python process, JAX's persistent compilation cache off:
  ``em = OnlineEM(model)``, ``em.init(key, x0)``, ``em.run(key, x, batch_size=256,
  init_state=state)``, as a user writes it (k-means++ start on the first batch).
* **JAX fresh**: the hand-written twin (`benchmarks.handwritten`) in a new process:
  the data to the device, ``jax.jit(jax_init)`` and one ``jax.jit(jax_scan)`` over
  every batch, compiled and run from scratch. It starts from the k-means++ centres and
  pooled variance of the first batch (`benchmarks.data.initial_params`), computed
  before its clock starts.
* **OEM cache cold / warm**: OEM fresh in two new processes that share an empty
  persistent-cache directory: the first writes it, the second reads it.
* **OEM second fit**: a new ``OnlineEM(model)`` fitting again in a process that has
  fitted the same model and shapes before (it should compile nothing); **JAX second
  run** likewise.
* **skl**: scikit-learn ``GaussianMixture(covariance_type="diag")`` ``fit`` on the same
  points, from its own k-means start (its defaults: tol 1e-3, at most 100 iterations).

A second table times single updates at the stream's batch size: ``jax.jit(em.update)``
against the hand-written ``jax.jit(jax_update)``, the eager ``em.update(state, xb)`` with
JAX and with NumPy batches, and the fused ``em.run`` against ``jax.jit(jax_scan)``.

Compile events are JAX's own (``jax.monitoring``): traces, lowerings and XLA compiles,
persistent-cache hits apart. Held-out log-likelihoods (mean nats per point) come from
the same NumPy code for every fit (`benchmarks.data.mean_loglik`), so that speed is not
bought with a worse answer.

Run ``python -m benchmarks.fresh_fit`` from the repository root (a few minutes on 2 CPU
cores), or a smoke test: ``python -m benchmarks.fresh_fit --num-points 20000 --repeats 1``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.data import initial_params, make_mixture, mean_loglik, sample_mixture
from benchmarks.handwritten import JaxEMConfig, config_from_plan, jax_init, jax_scan, jax_update
from benchmarks.table import machine, markdown_head, markdown_row
from numpyro_onlineem import OnlineEM
from tests.models import gmm_diag

ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "NUMPYRO_ONLINEEM_COMPILATION_CACHE"  # see numpyro_onlineem.compilation


# ------------------------------------------------------------------ compile events
class CompileEvents:
    """JAX's compile events inside a ``with`` block, from ``jax.monitoring``: traces,
    lowerings, XLA compiles and persistent-cache hits."""

    SPANS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")

    def __enter__(self):
        self.events, self.spans = [], []
        self._event = lambda event, **kw: self.events.append(event.rsplit("/", 1)[-1])
        self._span = lambda event, start, end, **kw: self.spans.append(
            (event.rsplit("/", 1)[-1], start, end)
        )
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_time_span_listener(self._span)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._event)
        jax.monitoring.unregister_event_time_span_listener(self._span)

    def summary(self) -> dict:
        """``traces``, ``compiles`` (XLA compiles that were not persistent-cache hits),
        ``cache_hits``, and ``compile_seconds``: the wall time spent tracing, lowering,
        and compiling or reading the cache (nested traces counted once)."""
        spans = sorted((start, end) for event, start, end in self.spans if event in self.SPANS)
        seconds, reach = 0.0, -np.inf
        for start, end in spans:  # the length of the union of the spans
            seconds += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        hits = self.events.count("cache_hits")
        count = lambda name: sum(1 for event, _, _ in self.spans if event == name)
        return {
            "traces": count("jaxpr_trace_duration"),
            "compiles": count("backend_compile_duration") - hits,
            "cache_hits": hits,
            "compile_seconds": seconds,
        }


# -------------------------------------------------------------------------- data
def make_data(args):
    """The stream (whole batches), held-out points, and the hand-written twin's start.

    Returns
    -------
    dict
        ``x`` (num_batches * B, D) float32, the first batch initialising; ``x_test``;
        ``p0`` (`benchmarks.data.initial_params` of the first batch, diagonal).
    """
    b, d, k = args.batch_size, args.dim, args.components
    mixture = make_mixture(args.seed, d, k)
    rng = np.random.default_rng([args.seed, d, k, 2])
    x = sample_mixture(rng, mixture, args.num_points // b * b)
    x_test = sample_mixture(rng, mixture, args.num_test)
    return {"x": x, "x_test": x_test, "p0": initial_params(args.seed, x[:b], k, "diag")}


def save_data(path, data):
    p0 = {f"p0_{name}": value for name, value in data["p0"].items()}
    np.savez(path, x=data["x"], x_test=data["x_test"], **p0)


def load_data(path):
    with np.load(path) as f:
        p0 = {name[3:]: f[name] for name in f.files if name.startswith("p0_")}
        return {"x": f["x"], "x_test": f["x_test"], "p0": p0}


# ------------------------------------------------------------------------- fits
def fit_onlineem(model, x, b):
    """``OnlineEM`` as a user writes it: init on the first batch, ``run`` over the
    others, estimates to the host. Returns ``(params, {"init", "run", "seconds"})``."""
    start = time.perf_counter()
    key = jax.random.PRNGKey(0)
    em = OnlineEM(model)
    state = jax.block_until_ready(em.init(key, x[:b]))
    after_init = time.perf_counter()
    result = em.run(key, x[b:], batch_size=b, progress_bar=False, init_state=state)
    params = jax.device_get(result.params)
    end = time.perf_counter()
    return params, {"init": after_init - start, "run": end - after_init, "seconds": end - start}


# the twin jitted as its user would: once, at module level (the settings static)
jax_init_jit = jax.jit(jax_init)
jax_update_jit = jax.jit(jax_update, static_argnums=0)
jax_scan_jit = jax.jit(jax_scan, static_argnums=0)


def fit_handwritten(x, p0, config, b):
    """The hand-written twin: the stream to the device, `jax_init` on the first batch
    and one `jax_scan` over the others, estimates to the host. Returns
    ``(params, {"init", "run", "seconds"})``; ``init`` includes the transfer."""
    start = time.perf_counter()
    x0, xs = jnp.asarray(x[:b]), jnp.asarray(x[b:].reshape(-1, b, x.shape[-1]))
    state = jax.block_until_ready(jax_init_jit(p0, x0))
    after_init = time.perf_counter()
    state, _ = jax_scan_jit(config, state, xs)
    params = jax.device_get(state.averaged)
    end = time.perf_counter()
    return params, {"init": after_init - start, "run": end - after_init, "seconds": end - start}


def fit_sklearn(x, k, seed):
    """scikit-learn's diagonal ``GaussianMixture`` with its defaults (k-means start).
    Returns ``(params, {"seconds", "iterations"})``."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=k, covariance_type="diag", random_state=seed)
    start = time.perf_counter()
    gm.fit(x)
    seconds = time.perf_counter() - start
    params = {"weights": gm.weights_, "locs": gm.means_, "scales": np.sqrt(gm.covariances_)}
    return params, {"seconds": seconds, "iterations": gm.n_iter_}


def child(args):
    """One fit in this (new) process; prints its timings, compile events and held-out
    log-likelihood as one JSON line."""
    data = load_data(args.data)
    b, k = args.batch_size, args.components
    model = functools.partial(gmm_diag, K=k)
    config = None if args.config is None else JaxEMConfig(**json.loads(args.config))
    with CompileEvents() as events:
        if args.child == "oem":
            params, out = fit_onlineem(model, data["x"], b)
        else:
            params, out = fit_handwritten(data["x"], data["p0"], config, b)
    out.update(events.summary(), loglik=mean_loglik(params, data["x_test"]))
    print(json.dumps(out))


def in_new_process(args, role, data_path, cache=None, config=None):
    """`child` in a new Python process (persistent cache off, or in ``cache``); adds
    ``process``, the seconds from its start to its exit."""
    env = {**os.environ, CACHE_ENV: cache or "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "benchmarks.fresh_fit", "--child", role, "--data", data_path]
    command += ["--batch-size", str(args.batch_size), "--components", str(args.components)]
    if config is not None:
        settings = {name: None if v is None else float(v) for name, v in config._asdict().items()}
        command += ["--config", json.dumps(settings)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"fresh_fit --child {role} failed:\n{done.stderr}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process"] = seconds
    return out


# ---------------------------------------------------------------- per update
def seconds_per_update(advance, state, batches, repeats):
    """Fastest of ``repeats`` loops of ``state = advance(state, xb)`` over ``batches``
    (after one call that compiles), over the number of batches."""
    jax.block_until_ready(advance(state, batches[0]))
    best = np.inf
    for _ in range(repeats):
        s = state
        start = time.perf_counter()
        for xb in batches:
            s = advance(s, xb)
        jax.block_until_ready(s)
        best = min(best, time.perf_counter() - start)
    return best / len(batches)


def per_update(model, x, b, p0, config, repeats):
    """Seconds per update at batch ``b``: ``{name: seconds}``."""
    host = list(x.reshape(-1, b, x.shape[-1])[1:])
    device = [jnp.asarray(xb) for xb in host]
    em = OnlineEM(model)
    state = em.init(jax.random.PRNGKey(0), x[:b])
    jitted = jax.jit(em.update)
    step = functools.partial(jax_update_jit, config)
    scan = functools.partial(jax_scan_jit, config)
    jstate = jax_init_jit(p0, jnp.asarray(x[:b]))
    key = jax.random.PRNGKey(0)

    def run(s, xs):
        return (em.run(key, xs, batch_size=b, progress_bar=False, init_state=s).state,)

    def fused(fn, s, stream):  # one call over every batch, per batch
        return seconds_per_update(lambda s, xs: fn(s, xs)[0], s, [stream], repeats) / len(host)

    def each(fn, s, batches):  # one call per batch
        return seconds_per_update(lambda s, xb: fn(s, xb)[0], s, batches, repeats)

    return {
        "jit_update": each(jitted, state, device),
        "jax_step": each(step, jstate, device),
        "eager_device": each(em.update, state, device),
        "eager_numpy": each(em.update, state, host),
        "run": fused(run, state, jnp.asarray(x[b:])),
        "jax_scan": fused(scan, jstate, jnp.stack(device)),
    }


# ------------------------------------------------------------------------ report
FIT_COLUMNS = (
    "fit",
    "process",
    "init s",
    "run s",
    "fit s",
    "process s",
    "compile s",
    "other s",
    "compiles",
    "cache hits",
    "held-out LL",
    "fit / JAX",
    "skl / fit",
)
CALL_COLUMNS = ("update", "us/update", "JAX / this")


def fit_row(name, where, r, jax_seconds, skl_seconds):
    """A row of the fit table; ``jax_seconds``: the hand-written reference's."""
    cell = lambda key, spec: format(r[key], spec) if key in r else ""
    ratio = "" if jax_seconds is None else format(r["seconds"] / jax_seconds, ".2f")
    return markdown_row(
        [
            name,
            where,
            cell("init", ".2f"),
            cell("run", ".2f"),
            format(r["seconds"], ".2f"),
            cell("process", ".2f"),
            cell("compile_seconds", ".2f"),
            format(r["seconds"] - r["compile_seconds"], ".2f") if "compile_seconds" in r else "",
            cell("compiles", "d"),
            cell("cache_hits", "d"),
            format(r["loglik"], ".3f"),
            ratio,
            format(skl_seconds / r["seconds"], ".2f"),
        ]
    )


def fresh_fits(args, data, config):
    """The fits in new processes, ``args.repeats`` of each, the fastest kept:
    ``{"oem", "jax", "cold", "warm"}``."""
    runs = {"oem": [], "jax": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        save_data(path, data)
        for i in range(args.repeats):
            runs["oem"].append(in_new_process(args, "oem", path))
            runs["jax"].append(in_new_process(args, "jax", path, config=config))
            cache = os.path.join(tmp, f"cache{i}")  # empty: the first process writes it
            runs["cold"].append(in_new_process(args, "oem", path, cache=cache))
            runs["warm"].append(in_new_process(args, "oem", path, cache=cache))
    return {name: min(tries, key=lambda r: r["seconds"]) for name, tries in runs.items()}


def same_process_fits(model, data, config, args):
    """Fits in this process, which has fitted ``model`` (and run the twin) before, the
    fastest of ``args.repeats``: ``{"oem", "partial", "jax", "skl"}``; ``partial`` with
    a new ``functools.partial`` of the same model function and arguments."""
    x, x_test, p0, b = data["x"], data["x_test"], data["p0"], args.batch_size
    fits = {
        "oem": lambda: fit_onlineem(model, x, b),
        "partial": lambda: fit_onlineem(functools.partial(model.func, **model.keywords), x, b),
        "jax": lambda: fit_handwritten(x, p0, config, b),
        "skl": lambda: fit_sklearn(x, args.components, args.seed),
    }
    out = {}
    for name, fit in fits.items():
        runs = []
        for _ in range(args.repeats):
            with CompileEvents() as events:
                params, run = fit()
            if name != "skl":
                run.update(events.summary())
            runs.append((run, params))
        run, params = min(runs, key=lambda r: r[0]["seconds"])
        out[name] = {**run, "loglik": mean_loglik(params, x_test)}
    return out


def print_header(args, n):
    b = args.batch_size
    print(
        f"# Fresh-fit benchmark. {machine()}.\n"
        f"# Diagonal Gaussian mixture, D={args.dim}, K={args.components}; {n:,} points in"
        f" batches of {b} (the first initialises, {n // b - 1:,} updates);"
        f" {args.num_test:,} held-out points.\n"
        "# fit s: from before OnlineEM(model) (JAX: before the data go to the device) to the"
        f" estimates on the host, compile included; fastest of {args.repeats} (new processes:"
        " process s, the process's whole life, Python and imports included).\n"
        "# compile s: wall time tracing, lowering and XLA compiling (or reading the"
        " persistent cache); other s: fit s - compile s (Python, transfers, updates);"
        " compiles: XLA compiles that were not cache hits. fit / JAX: fit"
        " s over the hand-written twin's (new processes: JAX fresh; same process: JAX second"
        " run); skl / fit: scikit-learn's fit s over this one (> 1: faster than"
        " scikit-learn).\n"
        f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}\n",
        flush=True,
    )


def main(args):
    b = args.batch_size
    os.environ[CACHE_ENV] = "0"  # this process leaves the user's cache alone
    data = make_data(args)
    x = data["x"]
    print_header(args, len(x))
    # a first fit in this process: the plan the twin replicates, and the compiles that
    # the second fit should not repeat
    model = functools.partial(gmm_diag, K=args.components)
    config = config_from_plan(OnlineEM(model).init(jax.random.PRNGKey(0), x[:b]).plan)
    fit_onlineem(model, x, b)
    fit_handwritten(x, data["p0"], config, b)
    fresh = fresh_fits(args, data, config)
    second = same_process_fits(model, data, config, args)
    skl = second.pop("skl")
    calls = per_update(model, x, b, data["p0"], config, args.call_repeats)

    jf, js = fresh["jax"]["seconds"], second["jax"]["seconds"]
    print(markdown_head(FIT_COLUMNS))
    rows = [
        ("OEM fresh", "new, no cache", fresh["oem"], jf),
        ("JAX fresh", "new", fresh["jax"], jf),
        ("OEM cache cold", "new, writes cache", fresh["cold"], jf),
        ("OEM cache warm", "new, reads cache", fresh["warm"], jf),
        ("OEM second fit", "same", second["oem"], js),
        ("OEM second fit, new partial", "same", second["partial"], js),
        ("JAX second run", "same", second["jax"], js),
        (f"skl ({skl['iterations']} it)", "same", skl, None),
    ]
    for name, where, r, ref in rows:
        print(fit_row(name, where, r, ref, skl["seconds"]))
    print()
    print(markdown_head(CALL_COLUMNS))
    names = [
        ("jax.jit(em.update), JAX batches", "jit_update", "jax_step"),
        ("hand-written jax.jit(jax_update)", "jax_step", "jax_step"),
        ("em.update eager, JAX batches", "eager_device", "jax_step"),
        ("em.update eager, NumPy batches", "eager_numpy", "jax_step"),
        ("em.run, compiled", "run", "jax_scan"),
        ("hand-written jax.jit(jax_scan)", "jax_scan", "jax_scan"),
    ]
    for label, key, ref in names:
        row = [label, format(calls[key] * 1e6, ".1f"), format(calls[ref] / calls[key], ".2f")]
        print(markdown_row(row))
    print(
        f"\n# Batch {b}. us/update: fastest of {args.call_repeats} loops over the"
        f" {len(x) // b - 1:,} updates, after one that compiles; JAX / this: the hand-written"
        " step's time (em.run: its scan's) over this one (target >= 0.9)."
    )
    print(
        f"# Second fit in the same process: {second['oem']['compiles']} compiles"
        f" ({second['oem']['traces']} traces); with a new functools.partial of the model:"
        f" {second['partial']['compiles']}. Second new process, persistent cache warm:"
        f" {fresh['warm']['cache_hits']} cache hits, {fresh['warm']['compiles']} compiles."
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--num-points", type=int, default=100_000, help="stream length, cut to whole batches"
    )
    parser.add_argument("--num-test", type=int, default=10_000, help="held-out points")
    parser.add_argument("--repeats", type=int, default=3, help="new processes per fresh fit")
    parser.add_argument("--call-repeats", type=int, default=5, help="timed loops per update row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("oem", "jax"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    child(args) if args.child else main(args)
