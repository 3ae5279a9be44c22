"""Compile time of the default suite for a model with one 4096x4096 layer: parameters passed
to every compiled attack as an argument (`kwta_jax.adapters.from_nnx`, what the evaluation
does) against parameters captured as constants (a closure over the model's state, what it did
before). Prints one line per attack and the totals, with the load average.

    python docs/scripts/compile_time.py [--attacks fgsm pgd ...] [--width 4096]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kwta_jax import evaluation, suites
from kwta_jax.adapters import from_logits_fn
from kwta_jax.layers import KWTA, set_kwta_backward


class Wide(nnx.Module):
    def __init__(self, rngs, width=4096):
        self.fc1, self.act1 = nnx.Linear(784, width, rngs=rngs), KWTA(0.1)
        self.fc2, self.act2 = nnx.Linear(width, width, rngs=rngs), KWTA(0.1)
        self.fc3 = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        h = self.act1(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc3(self.act2(self.fc2(h)))


def _call(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def compile_seconds(models: evaluation.Models, spec, x, y) -> tuple[float, int]:
    run, params = evaluation._bind(spec, models)
    t0 = time.perf_counter()
    lowered = jax.jit(run).lower(params, x, y, jax.random.key(0), jnp.float32(0.1))
    lowered.compile()
    seconds = time.perf_counter() - t0  # tracing, lowering and XLA compilation
    return seconds, len(lowered.as_text())  # the HLO's size, outside the timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=list(suites.DEFAULT_SUITE))
    parser.add_argument("--width", type=int, default=4096, help="hidden units (default 4096)")
    args = parser.parse_args()
    model = Wide(nnx.Rngs(0), args.width)
    x, y = jnp.zeros((8, 28, 28, 1)), jnp.zeros(8, jnp.int32)
    model.eval()
    # Parameters as arguments; the same model as its own transfer source (the point is the
    # compilation of the transfer attack's two models, not what it finds).
    argument = evaluation.make_models(model, source=model)
    # Before: closures over each model's state (the BPDA copy a clone with the identity
    # backward), so every weight is a constant of every compiled attack.
    bpda = nnx.clone(model)
    set_kwta_backward(bpda, "identity")
    closure = evaluation.Models(
        from_logits_fn(functools.partial(_call, *nnx.split(model))),
        {"bpda": from_logits_fn(functools.partial(_call, *nnx.split(bpda))),
         "source": from_logits_fn(functools.partial(_call, *nnx.split(model)))},
    )  # fmt: skip
    total = {"argument": 0.0, "closure": 0.0}
    print(f"load average before: {os.getloadavg()}")
    for spec in suites.build_suite(args.attacks):
        row = []
        for name, models in (("argument", argument), ("closure", closure)):
            seconds, size = compile_seconds(models, spec, x, y)
            total[name] += seconds
            row.append(f"{name} {seconds:6.2f} s ({size / 1e6:6.1f} MB HLO)")
        print(f"{spec.name:<14} " + "   ".join(row))
    print(f"total: argument {total['argument']:.1f} s, closure {total['closure']:.1f} s, "
          f"ratio {total['closure'] / total['argument']:.1f}x; load average after: "
          f"{os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
