"""Stronger adaptive attacks on the default k-WTA MLP (docs/results.md, "Stronger budget").

    python train.py && python docs/scripts/stronger_adaptive.py      # ~3 min on 2 CPU cores

Attacks the first 500 mnist5k test images at L-inf eps 0.1 with the strong-budget APGD-DLR,
Square and BPDA+APGD-DLR of the suite, plus variants that `attack.py` does not expose: EOT with
a larger noise (sigma 0.1), finite differences with a larger step and 128 antithetic pairs,
and transfer from the ReLU model with 100 steps x 5 restarts.
"""

from __future__ import annotations

import functools
import time

from kwta_jax import attacks, data, reports, runs
from kwta_jax import evaluation as ev


def main(run_dir: str = "runs/default", n_examples: int = 500, eps: float = 0.1) -> None:
    p = functools.partial
    kwta_model, config = runs.load_trained_model(f"{run_dir}/kwta")
    relu_model, _ = runs.load_trained_model(f"{run_dir}/relu")
    ds = data.load_dataset(config["dataset"], seed=config["seed"])
    x, y = ds.test_images[:n_examples], ds.test_labels[:n_examples]
    suite = ev.build_suite(["apgd-dlr", "square", "bpda-apgd"], budget="strong") + [
        ev.AttackSpec("eot-sigma0.1", "eot", p(attacks.eot_pgd, samples=32, sigma=0.1, steps=100)),
        ev.AttackSpec(
            "fd-sigma0.05",
            "gradient-free",
            p(attacks.gradient_free, samples=128, steps=100, sigma=0.05),
        ),
        ev.AttackSpec(
            "transfer-strong",
            "transfer",
            p(attacks.transfer, steps=100, restarts=5),
            needs="source",
        ),  # fmt: skip
    ]
    models = ev.models_from_nnx(kwta_model, source=relu_model, name="kwta")
    t0 = time.perf_counter()
    res = ev.run_suite(models, x, y, suite=suite, eps_values=[eps])
    print(reports.format_table(res))
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
