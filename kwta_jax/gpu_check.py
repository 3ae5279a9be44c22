"""Accelerator check: exactness of the compiled kernels, launch-parameter sweep, benchmark and
train-step timing, in one call that writes JSON.

``python -m kwta_jax.gpu_check --out DIR`` on a GPU machine (``scripts/gpu_check.sh`` does it
from a bare checkout, with nothing to install or download). Stages, each writing
``DIR/<stage>.json`` as soon as it ends (so a run cut short still leaves its results):

1. ``info``: device, versions, load average.
2. ``sweep``: the Pallas kernel's launch parameters (`KernelConfig`) and ``select``'s unrolled
   passes, timed on the key shapes; the fastest exact configuration per shape class.
3. ``exactness``: the *compiled* kernel (not interpret mode), with its default and the sweep's
   best configurations, and ``select``/``auto``, bit-for-bit against the `lax.top_k` reference
   on ties, signed zeros, infinities, NaNs, subnormals, float32/bfloat16/float16, rows up to
   2^20 (and one of more than 2^24 keys), ratios 0.1 and 0.7; derivatives (grad, hessian) and
   ``jax.shard_map``.
4. ``benchmark``: ReLU vs ``lax.top_k`` vs ``select`` vs ``pallas``, forward and forward +
   backward, with the achieved bandwidth (minimal bytes moved / time).
5. ``train_steps``: ReLU vs k-WTA train-step time for mlp, cnn, cnn_deep, resnet18 (k-WTA in
   every conv layer) on CIFAR-shaped synthetic batches.

Exit status 1 on any mismatch (the run continues to the end to report every one).
``--dry-run`` does the same at tiny sizes on any backend (interpret mode on CPU); the test suite
runs it so the script cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kwta_jax.benchmark import machine_info, time_call
from kwta_jax.kernels.kwta_pallas import (
    RESIDENT_MAX,
    default_config,
    kwta_reference,
    kwta_rows_pallas,
    triton_available,
)
from kwta_jax.layers import iter_kwta_layers
from kwta_jax.models import create_model
from kwta_jax.ops import kwta, resolve_impl
from kwta_jax.selection import kwta_rows_select
from kwta_jax.training import TrainState, train_step

__all__ = ["main", "run_checks"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of a run: full on an accelerator, tiny for ``--dry-run``."""

    streaming: tuple[int, int]  # the key conv shape [128, 32*32*64] as rows
    resident: tuple[int, int]  # a dense layer
    exact_shapes: tuple[tuple[int, int], ...]
    huge_row: int  # one row longer than 2^24 (float32 counts would drift)
    bench_shapes: tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]  # shape, ratios
    sweep_streaming: tuple[dict, ...]
    sweep_resident: tuple[dict, ...]
    unrolled: tuple[int, ...]
    models: tuple[str, ...]
    batch: int
    repeats: int


def _grid(**axes) -> tuple[dict, ...]:
    out = [{}]
    for name, values in axes.items():
        out = [dict(o, **{name: v}) for o in out for v in values]
    return tuple(out)


FULL = Sizes(
    streaming=(128, 65536),
    resident=(256, 512),
    exact_shapes=((5, 300), (256, 512), (128, 65536), (4, 1 << 20)),
    huge_row=(1 << 24) + 1_024_000,
    bench_shapes=(
        ((256, 512), (0.1, 0.7)),
        ((256, 4096), (0.1, 0.7)),
        ((128, 32, 32, 64), (0.01, 0.1, 0.7)),
        ((128, 16, 16, 128), (0.1, 0.7)),
        ((32, 8, 8, 512), (0.1, 0.7)),
        ((1024, 32768), (0.01, 0.1, 0.7)),
        ((256, 1 << 20), (0.01, 0.1, 0.7)),
    ),
    sweep_streaming=_grid(
        block_cols=(2048, 4096, 8192, 16384), radix_bits=(1, 2, 4), num_warps=(4, 8)
    )
    + _grid(split=(True,), block_cols=(4096, 8192), radix_bits=(2, 4), num_warps=(4,)),
    sweep_resident=_grid(block_rows=(1, 2), radix_bits=(1, 2), num_warps=(4,)),
    unrolled=(0, 2, 4),
    models=("mlp", "cnn", "cnn_deep", "resnet18"),
    batch=128,
    repeats=20,
)
DRY = Sizes(
    streaming=(4, 600),
    resident=(8, 64),
    exact_shapes=((5, 300),),
    huge_row=0,
    bench_shapes=(((4, 64), (0.1,)),),
    sweep_streaming=_grid(block_cols=(128, 256), radix_bits=(1, 4), split=(False, True)),
    sweep_resident=_grid(block_rows=(1, 8), radix_bits=(2,)),
    unrolled=(0, 2),
    models=("mlp",),
    batch=4,
    repeats=2,
)
SPECIAL = np.array(
    [0.0, -0.0, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40, 6e4, 1e-7],
    np.float32,
)


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _case_data(shape, dtype, seed: int) -> jax.Array:
    """Normal data with ties, signed zeros, infinities, NaNs and subnormals mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, np.float32)
    rows, n = shape
    if n * rows <= 1 << 22:
        pick = rng.random(shape) < 0.1
        x = np.where(pick, rng.choice(SPECIAL, size=shape), x)
        x[0] = rng.choice(SPECIAL[:4], size=n)  # a row of ties
        if rows > 2:
            x[1] = np.nan  # all NaN
            x[2] = np.round(x[2])  # heavy ties
    with np.errstate(over="ignore"):
        return jnp.asarray(x).astype(dtype)


class Stage:
    """Collects a stage's records and mismatches, writes ``<out>/<name>.json``."""

    def __init__(self, name: str, out: Path, log: Callable[[str], None]):
        self.name, self.out, self.log = name, out, log
        self.records: list[dict] = []
        self.mismatches: list[str] = []
        self.start = time.perf_counter()

    def fail(self, what: str) -> None:
        self.mismatches.append(what)
        self.log(f"MISMATCH {what}")

    def write(self, **extra) -> dict:
        payload = dict(
            stage=self.name, seconds=round(time.perf_counter() - self.start, 1),
            loadavg=[round(v, 2) for v in os.getloadavg()], mismatches=self.mismatches,
            records=self.records, **extra,
        )  # fmt: skip
        (self.out / f"{self.name}.json").write_text(json.dumps(payload, indent=1, default=str))
        self.log(f"== {self.name}: {len(self.records)} records, {len(self.mismatches)} "
                 f"mismatches, {payload['seconds']} s")  # fmt: skip
        return payload


def _pallas(config: dict, interpret: bool) -> Callable:
    """Jitted ``(x2d, k, use_abs) -> (y2d, threshold_key)`` with launch overrides ``config``."""
    fn = functools.partial(kwta_rows_pallas, interpret=interpret, **config)
    return jax.jit(fn, static_argnums=(1, 2))


_reference = jax.jit(kwta_reference, static_argnums=(1, 2))
_select = jax.jit(kwta_rows_select, static_argnums=(1, 2))


def _check_rows(stage, label, fn, x, k, use_abs=False, reference=None) -> bool:
    """Compares ``fn(x, k, use_abs)`` bit for bit with the reference; records the result."""
    y, th = fn(x, k, use_abs)
    y_ref, th_ref = reference if reference is not None else _reference(x, k, use_abs)
    ok = np.array_equal(np.asarray(th), np.asarray(th_ref)) and np.array_equal(
        _bits(y), _bits(y_ref)
    )
    stage.records.append(dict(case=label, exact=bool(ok)))
    if not ok:
        stage.fail(label)
    return ok


# --------------------------------------------------------------------------------------------
# Stages.
# --------------------------------------------------------------------------------------------


def stage_info(out: Path, log) -> dict:
    info = machine_info()
    versions = {}
    for mod in ("jaxlib", "flax", "optax", "chex", "numpy", "orbax.checkpoint"):
        try:
            versions[mod] = __import__(mod, fromlist=["_"]).__version__
        except Exception as e:  # noqa: BLE001 - report, do not stop
            versions[mod] = f"unavailable: {e}"
    info.update(versions=versions, triton_available=triton_available(), python=sys.version)
    info["local_devices"] = [d.device_kind for d in jax.local_devices()]
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    (out / "info.json").write_text(json.dumps(info, indent=1, default=str))
    log(f"== info: {json.dumps(info, default=str)}")
    return info


def _time(fn, *args, repeats) -> float:
    return time_call(fn, *args, repeats=repeats, pipelined=True)


def stage_sweep(out: Path, sizes: Sizes, interpret: bool, log) -> dict:
    """Times every launch configuration on the streaming and resident key shapes (r=0.1),
    each checked bit for bit; returns the three fastest exact configurations per class."""
    stage = Stage("sweep", out, log)
    best = {}
    for cls, shape, grid in (
        ("streaming", sizes.streaming, sizes.sweep_streaming),
        ("resident", sizes.resident, sizes.sweep_resident),
    ):
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        k = max(1, int(0.1 * shape[1]))
        reference = _reference(x, k, False)
        relu_ms = _time(jax.jit(jax.nn.relu), x, repeats=sizes.repeats)
        default = dataclasses.asdict(default_config(*shape, jnp.float32, "gpu"))
        timed = []
        for origin, config in [("default", default)] + [("sweep", c) for c in grid]:
            fn = _pallas(config, interpret)
            try:
                exact = _check_rows(stage, f"sweep {cls} {config}", fn, x, k, reference=reference)
                ms = _time(fn, x, k, False, repeats=sizes.repeats)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is data
                stage.records.append(dict(cls=cls, config=config, error=repr(e)[:400]))
                log(f"sweep {cls} {config}: {repr(e)[:200]}")
                continue
            stage.records.append(dict(cls=cls, origin=origin, config=config, ms=ms,
                                      relu_ms=relu_ms, exact=exact))  # fmt: skip
            log(f"sweep {cls} {config} {ms:.4f} ms ({ms / relu_ms:.2f}x ReLU)")
            if exact:
                timed.append((ms, config))
        for u in sizes.unrolled:
            fn = jax.jit(
                functools.partial(kwta_rows_select, unrolled_passes=u), static_argnums=(1, 2)
            )
            exact = _check_rows(stage, f"select unrolled={u}", fn, x, k, reference=reference)
            ms = _time(fn, x, k, False, repeats=sizes.repeats)
            stage.records.append(dict(cls=cls, select_unrolled=u, ms=ms, relu_ms=relu_ms,
                                      exact=exact))  # fmt: skip
            log(f"sweep {cls} select unrolled={u} {ms:.4f} ms ({ms / relu_ms:.2f}x ReLU)")
        timed.sort(key=lambda t: t[0])
        best[cls] = [c for _, c in timed[:3]]
    return stage.write(best=best)


def _best_for(best: dict, n: int) -> dict | None:
    """The fastest swept configuration that applies to rows of ``n`` keys."""
    if n <= RESIDENT_MAX:
        resident = best.get("resident", [])
        # A resident tile is as wide as the row: never carry over the swept shape's width.
        return {a: v for a, v in resident[0].items() if a != "block_cols"} if resident else None
    streaming = best.get("streaming", [])
    return streaming[0] if streaming else None


def stage_exactness(out: Path, sizes: Sizes, best: dict, interpret: bool, log) -> dict:
    """Bit-exactness of the compiled paths against `kwta_reference` (lax.top_k)."""
    stage = Stage("exactness", out, log)
    seed = 0
    for shape in sizes.exact_shapes:
        configs = {"default": {}}
        if (c := _best_for(best, shape[1])) is not None:
            configs["best"] = c
        for dtype_name, dtype in DTYPES.items():
            seed += 1
            x = _case_data(shape, dtype, seed)
            for ratio in (0.1, 0.7):
                k = max(1, int(ratio * shape[1]))
                reference = _reference(x, k, False)
                for name, config in configs.items():
                    label = f"pallas[{name}={config}] {shape} {dtype_name} k={k}"
                    _check_rows(stage, label, _pallas(config, interpret), x, k, reference=reference)
                label = f"select {shape} {dtype_name} k={k}"
                _check_rows(stage, label, _select, x, k, reference=reference)
            k = max(1, shape[1] // 3)
            _check_rows(stage, f"pallas use_abs {shape} {dtype_name} k={k}",
                        _pallas({}, interpret), x, k, True)  # fmt: skip
            log(f"exactness {shape} {dtype_name}: {len(stage.mismatches)} mismatches so far")
    if sizes.huge_row:
        x = jax.random.normal(jax.random.key(7), (1, sizes.huge_row), jnp.float32)
        k = (1 << 24) + 500
        _check_rows(
            stage, f"pallas huge row n={sizes.huge_row} k={k}", _pallas({}, interpret), x, k
        )
        del x
    _check_derivatives(stage, interpret)
    return stage.write(auto=resolve_impl("auto"))


def _check_derivatives(stage: Stage, interpret: bool) -> None:
    """grad, hessian-vector, auto and shard_map of the op with impl='pallas' vs 'topk'."""
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 16))
    impl = "pallas"
    for name, fn in {
        "forward": lambda x, i: kwta(x, ratio=0.2, impl=i),
        "grad": lambda x, i: jax.grad(lambda v: (kwta(v, ratio=0.2, impl=i) ** 2).sum())(x),
        "jvp_of_grad": lambda x, i: jax.jvp(
            jax.grad(lambda v: (kwta(v, ratio=0.2, impl=i) ** 2).sum()), (x,), (jnp.ones_like(x),)
        )[1],
        "auto": lambda x, i: kwta(x, ratio=0.2, impl="auto" if i == impl else "topk"),
    }.items():
        got, want = jax.jit(fn, static_argnums=1)(x, impl), jax.jit(fn, static_argnums=1)(x, "topk")
        ok = np.array_equal(_bits(got), _bits(want))
        stage.records.append(dict(case=f"derivative {name}", exact=bool(ok)))
        if not ok:
            stage.fail(f"derivative {name}")
    if not interpret:  # interpret mode cannot run inside shard_map (see kwta_rows_pallas)
        mesh = Mesh(np.asarray(jax.local_devices()), ("b",))
        for i in ("pallas", "select", "auto"):
            f = jax.jit(jax.shard_map(functools.partial(kwta, ratio=0.1, impl=i), mesh=mesh,
                                      in_specs=P("b"), out_specs=P("b")))  # fmt: skip
            ok = np.array_equal(_bits(f(x)), _bits(kwta(x, ratio=0.1, impl="topk")))
            stage.records.append(dict(case=f"shard_map {i}", exact=bool(ok)))
            if not ok:
                stage.fail(f"shard_map {i}")


def _bench_fn(impl: str, ratio: float, mode: str, config: dict | None, interpret: bool):
    if impl == "relu":
        act = jax.nn.relu
    elif impl == "pallas":
        act = lambda x: kwta_rows_pallas(  # noqa: E731
            x.reshape(x.shape[0], -1), max(1, int(ratio * np.prod(x.shape[1:]))),
            interpret=interpret, **(config or {}),
        )[0].reshape(x.shape)  # fmt: skip
    else:
        act = functools.partial(kwta, ratio=ratio, impl=impl)
    if mode == "fwd":
        return jax.jit(lambda x, g: act(x))
    return jax.jit(jax.grad(lambda x, g: jnp.vdot(act(x), g)))


def stage_benchmark(
    out: Path, sizes: Sizes, best: dict, interpret: bool, deadline: float, log
) -> dict:
    """ReLU / top_k / select / pallas (the sweep's best configuration for the row length, the
    default where the sweep found none), per shape, ratio and mode."""
    stage = Stage("benchmark", out, log)
    for shape, ratios in sizes.bench_shapes:
        if time.perf_counter() > deadline:
            stage.records.append(dict(shape=list(shape), skipped="time budget"))
            continue
        n = int(np.prod(shape[1:]))
        config = _best_for(best, n) or {}
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        g = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        nbytes = x.size * x.dtype.itemsize
        for ratio in ratios:
            for mode in ("fwd", "fwd+bwd"):
                moved = (2 if mode == "fwd" else 3) * nbytes  # read x (and g), write the result
                row = dict(shape=list(shape), ratio=ratio, mode=mode, bytes=moved,
                           pallas_config=config)  # fmt: skip
                for impl in ("relu", "topk", "select", "pallas"):
                    if impl == "relu" and ratio != ratios[0]:
                        same = [r for r in stage.records if r["shape"] == list(shape)]
                        row[impl] = next(r[impl] for r in same if r["mode"] == mode)
                        continue
                    fn = _bench_fn(impl, ratio, mode, config, interpret)
                    try:
                        first = time.perf_counter()
                        jax.block_until_ready(fn(x, g))
                        slow = time.perf_counter() - first > 2.0
                        ms = _time(fn, x, g, repeats=3 if slow else sizes.repeats)
                    except Exception as e:  # noqa: BLE001 - e.g. top_k out of memory
                        row[impl] = f"error: {repr(e)[:200]}"
                        continue
                    row[impl] = ms
                    row[f"{impl} GB/s"] = moved / ms / 1e6
                    log(f"bench {shape} r={ratio} {mode} {impl}: {ms:.4f} ms "
                        f"({moved / ms / 1e6:.0f} GB/s)")  # fmt: skip
                stage.records.append(row)
        stage.write()  # after every shape: a run cut short keeps what it measured
    return stage.write()


def stage_train_steps(out: Path, sizes: Sizes, impls: Sequence[str], deadline: float, log):
    """Median train-step ms, ReLU vs k-WTA (in every conv layer too), CIFAR-shaped batches.

    ``impls``: k-WTA implementations, most important first; every model gets ReLU and the
    first before any model gets the next (so a deadline cuts the least useful timings).
    """
    stage = Stage("train_steps", out, log)
    rng = np.random.default_rng(0)
    b = sizes.batch
    batch = {
        "image": jnp.asarray(rng.random((b, 32, 32, 3), np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, b).astype(np.int32)),
        "weight": jnp.ones((b,), jnp.float32),
    }
    tx = optax.adam(1e-3)
    plan = [p for m in sizes.models for p in [(m, "relu", None), (m, "kwta", impls[0])]]
    plan += [(m, "kwta", i) for i in impls[1:] for m in sizes.models]
    for name, act, impl in plan:
        if time.perf_counter() > deadline:
            stage.records.append(dict(model=name, act=act, impl=impl, skipped="time budget"))
            continue
        model = create_model(name, act=act, ratio=0.1, input_shape=(32, 32, 3),
                             kwta_scope="all", rngs=nnx.Rngs(0))  # fmt: skip
        for layer in iter_kwta_layers(model):
            layer.impl = impl
        ms = _time_train_step(model, tx, batch, sizes.repeats)
        stage.records.append(dict(model=name, act=act, impl=impl, ms=ms, batch=b))
        log(f"train step {name} {act}[{impl}]: {ms:.3f} ms")
    return stage.write()


def _time_train_step(model, tx, batch, repeats: int) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), jax.random.key(0))
    step = jax.jit(functools.partial(train_step, graphdef, tx))
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / repeats)
    return 1e3 * float(np.median(times))


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------


def run_checks(
    out: Path,
    *,
    dry_run: bool = False,
    stages: Sequence[str] = (),
    budget_s: float = 480.0,
    log=print,
) -> int:
    """Runs the stages (all by default) in about ``budget_s`` seconds; returns the number of
    mismatches.

    Order: sweep, exactness, train steps (at most a third of the budget), benchmark (shapes
    past the deadline are skipped and recorded as such).
    """
    deadline = time.perf_counter() + budget_s
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY if dry_run else FULL
    interpret = jax.default_backend() == "cpu"
    wanted = set(stages) or {"sweep", "exactness", "benchmark", "train_steps"}
    mismatches = 0
    stage_info(out, log)
    best: dict = {}
    impls = ["select", "pallas"]
    if "sweep" in wanted:
        res = stage_sweep(out, sizes, interpret, log)
        best, mismatches = res["best"], mismatches + len(res["mismatches"])
        # The faster exact path on the streaming key shape goes first in the train steps.
        fastest = {}
        for r in res["records"]:
            if r.get("cls") == "streaming" and r.get("exact") and "ms" in r:
                impl = "select" if "select_unrolled" in r else "pallas"
                fastest[impl] = min(fastest.get(impl, 1e9), r["ms"])
        impls.sort(key=lambda i: fastest.get(i, 1e9))
    if "exactness" in wanted:
        mismatches += len(stage_exactness(out, sizes, best, interpret, log)["mismatches"])
    if "train_steps" in wanted:
        train_deadline = min(deadline, time.perf_counter() + budget_s / 3)
        stage_train_steps(out, sizes, impls, train_deadline, log)
    if "benchmark" in wanted:
        stage_benchmark(out, sizes, best, interpret, deadline, log)
    log(f"== done: {mismatches} mismatches")
    return mismatches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kwta_jax.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="directory for the JSON files")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU: interpret)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="time budget (later timings are skipped)")  # fmt: skip
    parser.add_argument("--stages", nargs="*", default=[],
                        choices=["sweep", "exactness", "benchmark", "train_steps"],
                        help="subset of stages (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    start = time.perf_counter()
    log_path = Path(args.out) / "log.txt"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:

        def log(msg: str) -> None:
            line = f"[{time.perf_counter() - start:7.1f}s] {msg}"
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        log(f"kwta_jax.gpu_check on {platform.node()}: backend={jax.default_backend()}")
        mismatches = run_checks(Path(args.out), dry_run=args.dry_run, stages=args.stages,
                                budget_s=args.budget_s, log=log)  # fmt: skip
    if mismatches:
        print(f"FAILED: {mismatches} mismatches (see {args.out}/exactness.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
