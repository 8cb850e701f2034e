"""JAX's persistent compilation cache, on by default for online EM.

A fit waits mostly for XLA to compile the update (seconds), not for the updates
themselves (microseconds each). Within a process, `OnlineEM` compiles once per model,
settings and shapes (its plans compare by value, see `numpyro_onlineem.static`). Across
processes, JAX's persistent cache keeps the compiled code on disk, so that a script run
again, or a second worker fitting the same model, starts updating at once.

`OnlineEM` turns the cache on, the first time it is used, unless the user chose for
themselves: when ``jax_compilation_cache_dir`` is already set (their directory is kept),
when ``jax_enable_compilation_cache`` is off, or when the environment variable
``NUMPYRO_ONLINEEM_COMPILATION_CACHE`` is ``0``/``false``/``off`` (or a directory to use
instead of the default ``~/.cache/numpyro_onlineem/jax``). Pass
``OnlineEM(..., compilation_cache=False)`` to leave JAX's settings untouched.

Why on by default: users of a streaming fit run the same model again and again (one
process per day of data, per worker, per notebook restart), and the cache turns each
run's seconds of compiling into milliseconds of reading. The cost is disk space (one
entry per compiled function, a few MB for a model; JAX evicts nothing by default, so
clear the directory when it grows) and that the setting is JAX's, global to the
process: other programs compiled in it are cached too. When this module sets the
directory it also lowers ``jax_persistent_cache_min_compile_time_secs`` from JAX's 1 s
to 0 (unless the user changed it): a fit compiles dozens of small programs (the
model's sampling and constraint checks at ``init``, k-means++, the statistics) that
each take well under a second but add up to seconds, and all of them fit in about
half a megabyte.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "NUMPYRO_ONLINEEM_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "numpyro_onlineem", "jax")
MIN_COMPILE_SECONDS = 0.0

_done = False


def cache_dir() -> str | None:
    """The directory this module would use, or ``None`` when the environment variable
    turns the cache off."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in ("0", "false", "off", "no"):
        return None
    if value.lower() in ("", "1", "true", "on", "yes"):
        value = DEFAULT_DIR
    return os.path.expanduser(value)


def enable_compilation_cache() -> str | None:
    """Turn JAX's persistent compilation cache on (once per process), unless the user
    configured it or opted out (see the module docstring). Returns the directory in
    use, or ``None``."""
    global _done
    current = jax.config.jax_compilation_cache_dir
    if _done or current or not jax.config.jax_enable_compilation_cache:
        return current or None
    _done = True
    path = cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: compile as before
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
