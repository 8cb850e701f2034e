"""The peers of the streaming benchmark: NumPyro ``SVI`` on the same model and
batches, and scikit-learn's batch ``GaussianMixture``."""

from __future__ import annotations

import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.contrib.funsor import config_enumerate
from numpyro.infer import SVI, TraceEnum_ELBO
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from benchmarks.handwritten import REG_COVAR
from benchmarks.streaming import MODELS, online_result


def run_svi(case, lr, passes):
    """NumPyro SVI (TraceEnum_ELBO, empty guide, Adam) over the same batches."""
    model = config_enumerate(functools.partial(MODELS[case.covariance], K=case.k))
    guide = lambda *args, **kwargs: None
    svi = SVI(model, guide, numpyro.optim.Adam(lr), TraceEnum_ELBO(max_plate_nesting=1))
    state0 = svi.init(jax.random.PRNGKey(0), jnp.asarray(case.x0), init_params=case.p0)

    @jax.jit
    def step(state, xs):
        return jax.lax.scan(lambda s, xb: svi.update(s, xb), state, xs)[0]

    # NumPy segments, copied to the device inside the timed call, as em.run's are
    batches = case.batches_of
    return online_result(case, step, state0, svi.get_params, batches(case.x), batches, passes)


def _sklearn_gmm(case, **kwargs):
    p0 = {name: v.astype(np.float64) for name, v in case.p0.items()}
    if case.covariance == "diag":
        precisions = p0["scales"] ** -2
    else:
        precisions = np.linalg.inv(p0["covs"])
    return GaussianMixture(
        n_components=case.k,
        covariance_type=case.covariance,
        weights_init=p0["weights"] / p0["weights"].sum(),
        means_init=p0["locs"],
        precisions_init=precisions,
        init_params="random_from_data",  # unused: every initial value is given
        reg_covar=REG_COVAR,
        random_state=0,
        **kwargs,
    )


def run_sklearn(case, tol, max_iter, gap_tol):
    """Batch EM on the whole stream (float64) to convergence, giving LL*; then its
    iterates again one by one (warm start) until the held-out score is within
    ``gap_tol`` of LL*. The time to that iterate is the converged fit's time prorated
    by iterations."""
    x = np.concatenate([case.x0, case.x]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = _sklearn_gmm(case, tol=tol, max_iter=max_iter)
        start = time.perf_counter()
        gm.fit(x)
        seconds = time.perf_counter() - start
        ll_star = gm.score(case.x_test)
        stepper = _sklearn_gmm(case, max_iter=1, warm_start=True)
        iters, first_gap = None, None
        for it in range(1, gm.n_iter_ + 1):
            stepper.fit(x)
            gap = ll_star - stepper.score(case.x_test)
            first_gap = gap if it == 1 else first_gap
            if gap <= gap_tol:
                iters = it
                break
    time.sleep(0.5)  # let the BLAS threads sklearn used stop spinning before any timing
    return {
        "ll_star": ll_star,
        "n_iter": gm.n_iter_,
        "throughput": len(x) * gm.n_iter_ / seconds,
        "gap": first_gap,
        "time_to_target": None if iters is None else seconds * iters / gm.n_iter_,
    }
