"""`es` alone on one trained run, with its cost (docs/attacks.md, "`es`").

    python train.py
    python docs/scripts/es_alone.py runs/default/kwta --n-examples 100 --eps 0.1
    python docs/scripts/es_alone.py runs/default/kwta --pairs 2000        # 2,000 pairs every step
    # On the images a cascade left (its results_per_image.npz, the run's key in it):
    python docs/scripts/es_alone.py runs/default/kwta --n-examples 500 --eps 0.1 0.15 0.2 \
        --left runs/default/attack/results_per_image.npz --key "kwta (kwta)"

Attacks the first N test images that the model classifies correctly (or the ones the cascade
left robust, `--left`) with `kwta_jax.attacks.es.es_trace`, jitted, and prints per radius the
robust accuracy over the N images, the forward passes of the estimate (padding excluded), the
compile and run times, the user CPU time and the load averages before and after.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from kwta_jax import attacks, data, evaluation, runs
from kwta_jax.attacks.es import es_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--n-examples", type=int, default=100)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1])
    ap.add_argument(
        "--schedule",
        default=repr(attacks.ES_SCHEDULE_CPU),
        help="(pairs, patience) levels, a Python literal (default: ES_SCHEDULE_CPU)",
    )
    ap.add_argument("--pairs", type=int, help="this many pairs every step, no ramp, no giving up")
    ap.add_argument("--left", help="results_per_image.npz of a cascade: attack what it left")
    ap.add_argument("--key", help="the run's key in --left (e.g. 'kwta (kwta)')")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    schedule = ((args.pairs, 100),) if args.pairs else ast.literal_eval(args.schedule)
    model, config = runs.load_trained_model(args.run_dir)
    ds = data.load_dataset(config["dataset"], seed=config["seed"])
    x_all = np.asarray(ds.test_images[: args.n_examples], np.float32)
    y_all = np.asarray(ds.test_labels[: args.n_examples], np.int32)
    f = evaluation.nnx_logits_fn(model)
    predict = jax.jit(lambda v: jnp.argmax(f(v), -1))
    left = np.load(args.left) if args.left else None
    for eps in args.eps:
        if left is None:
            todo = np.flatnonzero(np.asarray(predict(x_all)) == y_all)
        else:
            todo = np.flatnonzero(left[f"{args.key}/worst_robust/{eps:g}"][: args.n_examples])
        x, y = jnp.asarray(x_all[todo]), jnp.asarray(y_all[todo])
        run = jax.jit(functools.partial(es_trace, f, eps=eps, schedule=schedule))
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        compiled = run.lower(x, y, jax.random.key(args.seed)).compile()
        compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        x_adv, trace = compiled(x, y, jax.random.key(args.seed))
        x_adv.block_until_ready()
        run_s = time.perf_counter() - t0
        cpu_s = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
        attacks.check_threat_model(x_adv, x, eps, "linf", name="es")
        robust = int(np.sum(np.asarray(predict(x_adv)) == np.asarray(y)))
        forward = 2 * int(np.asarray(trace.pairs).sum())
        print(
            f"eps {eps:g}: {len(todo)} attacked, {robust} robust = "
            f"{100 * robust / args.n_examples:.1f} % of {args.n_examples}; schedule {schedule}; "
            f"{forward / 1e6:.1f} M forward passes; compile {compile_s:.0f} s, run {run_s:.0f} s "
            f"(user CPU {cpu_s:.0f} s); load {load0:.1f} -> {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
