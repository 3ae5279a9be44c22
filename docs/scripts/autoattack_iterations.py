"""The AutoAttack preset at the reference's 100 iterations and at torchattacks' 10
(docs/attacks.md, "AutoAttack preset"), on the first 500 test images of a run.

    python train.py && python docs/scripts/autoattack_iterations.py runs/default/kwta \\
        --out runs/peers/ours_autoattack                     # ~5 min on 2 CPU cores

torchattacks' ``AutoAttack(version="standard")`` builds APGD-CE, APGD-T and FAB-T with their
default of 10 iterations; the reference implementation (Croce & Hein) runs 100. This runs
`kwta_jax.suites.autoattack_suite` both ways as a cascade, prints the robust accuracy of each
and writes ``OUT/<iterations>/results_per_image.npz`` for `peer_attacks.py`-style comparisons.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kwta_jax import data, evaluation, reports, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n-examples", type=int, default=500)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, config = runs.load_trained_model(args.run_dir)
    ds = data.load_dataset(config["dataset"], seed=config["seed"])
    x, y = ds.test_images[: args.n_examples], ds.test_labels[: args.n_examples]
    models = evaluation.models_from_nnx(model, name=args.run_dir.name)
    for iterations in (100, 10):
        suite = evaluation.autoattack_suite("linf", apgd_steps=iterations, fab_steps=iterations)
        t0 = time.perf_counter()
        res = evaluation.run_suite(models, x, y, suite=suite, eps_values=args.eps,
                                   mode="cascade")  # fmt: skip
        print(f"\n== AutoAttack preset, {iterations} iterations ({time.perf_counter() - t0:.0f} s)")
        print(reports.format_table(res))
        (args.out / str(iterations)).mkdir(parents=True, exist_ok=True)
        reports.save_per_image([res], args.out / str(iterations) / "results_per_image.npz")


if __name__ == "__main__":
    main()
