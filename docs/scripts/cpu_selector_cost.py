"""Where the CPU k-WTA's time goes, against ReLU (docs/benchmarks.md, "What is left").

For each shape (ratio 0.1, per-sample groups, float32), interleaved in one process like
``python -m kwta_jax.benchmark`` (one untimed call, then the median of ``--repeats`` calls, the
median over ``--rounds``), under the benchmark's steady glibc malloc settings: ReLU; the C++
selector alone (`cpu_threshold_keys`: one read of x); kwta's plain forward (the fused kernel:
select, then write each row from cache); the unfused forward (selector + the XLA apply, which
reads x again: what every derivative form pays); ``grad Σy²``; and the XLA passes alone, with
the threshold keys found beforehand (the apply, and ``grad Σy²``'s one fused pass). All as
ratios to ReLU. ``grad Σy²`` is the selector plus its pass, so no design with an opaque
selector takes the selector's ratio out of the derivative forms.

    python docs/scripts/cpu_selector_cost.py [--repeats 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import jax
import jax.numpy as jnp
from kwta_jax.kernels.kwta_cpu import cpu_threshold_keys

from kwta_jax import ops
from kwta_jax.benchmark import restart_under_steady_allocator, time_call
from kwta_jax.rank_keys import apply_threshold

SHAPES = ((128, 32, 32, 64), (128, 16, 16, 128), (32, 8, 8, 512), (256, 4096), (256, 512))
RATIO = 0.1


def cases(shape: tuple[int, ...]) -> dict:
    n = math.prod(shape[1:])
    k = ops.num_winners(n, ratio=RATIO)

    def unfused(v):
        rows = v.reshape(shape[0], n)
        return apply_threshold(rows, cpu_threshold_keys(rows, k), False)[0].reshape(shape)

    # The threshold keys of the input every case gets (`main` makes it with key 0), so that the
    # XLA passes can be timed without the selector.
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    keys = cpu_threshold_keys(x.reshape(shape[0], n), k)

    def given_keys(v):  # y from keys found beforehand: the XLA pass alone
        return apply_threshold(v.reshape(shape[0], n), keys, False)[0].reshape(shape)

    return {
        "relu": jax.jit(jax.nn.relu),
        "selector": jax.jit(lambda v: cpu_threshold_keys(v.reshape(shape[0], n), k)),
        "apply, keys given": jax.jit(given_keys),
        "fwd (fused)": jax.jit(lambda v: ops.kwta(v, ratio=RATIO)),
        "fwd (unfused)": jax.jit(unfused),
        "grad Σy², keys given": jax.jit(jax.grad(lambda v: jnp.sum(given_keys(v) ** 2))),
        "grad Σy²": jax.jit(jax.grad(lambda v: jnp.sum(ops.kwta(v, ratio=RATIO) ** 2))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES')}")  # fmt: skip
    for shape in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        fns = cases(shape)
        rounds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                rounds[name].append(time_call(fn, x, repeats=args.repeats))
        ms = {name: statistics.median(v) for name, v in rounds.items()}
        cells = [f"ReLU {ms['relu']:.3f} ms"]
        cells += [f"{name} {ms[name] / ms['relu']:.2f}x" for name in fns if name != "relu"]
        print("x".join(map(str, shape)), " | ".join(cells))
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    restart_under_steady_allocator(sys.argv)
    main()
