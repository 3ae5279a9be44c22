"""Benchmark: k-WTA against ReLU, ``lax.top_k`` and the official PyTorch code, forward and backward.

Run ``python -m kwta_jax.benchmark`` (``--help`` for options). On the default backend it times,
for every shape and ratio and under four transforms (``fwd``; ``grad_sq``: the gradient of
``sum(y**2)``; ``grad_dot``: the gradient of ``<y, g>``; ``vjp``: ``y`` and its pullback of
``g``), ``jax.nn.relu`` and ``kwta`` with each implementation (``auto`` and the selectors the
backend runs: ``select``, ``cpu`` where the C++ kernel builds, ``pallas`` on a GPU or TPU;
``topk``, the reference, only with ``--impls``: it is a full sort on XLA:CPU). Small-k cases
(TopK sparse autoencoders: a few winners in long rows) add ``lax.top_k`` plus a scatter.
When ``import torch`` works, the official PyTorch k-WTA (a554b554/kWTA-Activation
``Sparsify1D`` / ``Sparsify2D_vol``: ``topk``, then ``x * (x >= k-th value)``; our own copy of
it, `official_pytorch_kwta`) runs beside, on as many threads as XLA's CPU pool.

Interleaved: everything is compiled first, then each of ``--rounds`` rounds times every case
(untimed calls until it runs at steady speed, then the median of at least ``--repeats`` calls,
more for fast entries: `MIN_TIMED_S`; each ends in ``block_until_ready``); an
entry is the median over rounds, so a slow spell of a shared machine hits every column alike. After
a PyTorch entry the benchmark waits `TORCH_SETTLE_S` for PyTorch's spinning OpenMP threads to
sleep, so that they do not slow the next entry. Minor page faults per call are recorded too, and
entries that page-faulted (`FAULTED`) are marked with † in the table. On Linux the command runs
under `STEADY_ALLOCATOR_TUNABLES` (glibc malloc settings under which freed outputs are reused
instead of freshly mapped on every call; the module starts itself again with them), so that times
are the ops' own, not page-fault handling; ``--allocator as-is`` keeps the environment's settings.
The load average is recorded at the start and the end. Prints a table, writes JSON (``--json
PATH``). ``--check`` adds the verdict on the CPU speed targets (`kwta_jax.benchmark_targets`)
and exits 1 unless all are met."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.benchmark_cases import (
    DEFAULT_RATIOS,
    DEFAULT_SHAPES,
    MODE_TITLES,
    MODES,
    SMALL_K_CASES,
    setting_of,
)
from kwta_jax.benchmark_targets import check_targets, format_targets
from kwta_jax.kernels.kwta_cpu import cpu_kernel_available, cpu_kernel_isa
from kwta_jax.ops import kwta, resolve_impl

__all__ = [
    "DEFAULT_SHAPES",
    "MODES",
    "SMALL_K_CASES",
    "machine_info",
    "main",
    "official_pytorch_kwta",
    "restart_under_steady_allocator",
    "run_benchmark",
    "steady_allocator_env",
    "summarize",
    "time_call",
]

QUICK_SHAPES = ((8, 64), (4, 4, 4, 8))
QUICK_SMALL_K = (((4, 256), 3),)
# Seconds to wait after a PyTorch entry: libgomp's threads spin-wait for about 5-10 ms after
# a parallel region before they sleep (measured on the 2-core machine of docs/benchmarks.md).
TORCH_SETTLE_S = 0.1
# Untimed calls before an entry is timed: at least WARM_UP_CALLS and WARM_UP_S seconds, or
# WARM_UP_MAX_S seconds when the calls are slow. After an idle spell (the pause above) the first
# calls are slow: measured on [256,4096], kwta 0.78, 0.47, 0.40, 0.33 ms, then 0.28; ReLU 0.98,
# 0.50, 0.23, 0.19, then 0.17. With one untimed call, the median of 5 timed calls was the fourth
# call after the pause: 15-20 % slow, for whichever entry followed a PyTorch one.
WARM_UP_CALLS = 5
WARM_UP_S = 0.005
WARM_UP_MAX_S = 0.05
# Timed calls per entry and round: at least --repeats, and more while they fit in MIN_TIMED_S
# (at most MAX_TIMED_CALLS). With 5 calls, the median of a 0.05-0.15 ms entry was so noisy that
# `auto` and `cpu`, the same function, read up to 39 % apart in one run.
MIN_TIMED_S = 0.01
MAX_TIMED_CALLS = 200
# glibc malloc settings the CLI runs under (`steady_allocator_env`; ``--allocator as-is`` keeps
# the environment's). By default XLA:CPU's outputs of 32 MiB and more come from a fresh mmap on
# every call (and smaller ones too, depending on the heap), so a ReLU over [128,32,32,64] takes
# 7 ms of which 6 are page faults, and which entries fault depends on what ran before. One
# arena, no mmap, no trimming: freed outputs are reused, no entry faults, and the times are the
# ops' own (measured: ReLU 1.05 ms there).
STEADY_ALLOCATOR_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=4294967295:glibc.malloc.top_pad=67108864"
)
# Minor page faults per call from which an entry is marked in the table: its output buffer was
# freshly mapped (glibc serves allocations of 32 MiB and more with mmap; whether a smaller one
# faults depends on the heap), so its time is mostly the kernel's fault handling.
FAULTED = 100
FAULT_NOTE = (
    f"† at least {FAULTED} minor page faults per call: the output was freshly mapped memory, so "
    "the time is mostly page-fault handling, not the op"
)


def time_call(fn: Callable, *args, repeats: int = 5, pipelined: bool = False) -> float:
    """Median wall time in milliseconds of ``fn(*args)`` after one warm-up call.

    ``pipelined``: time 3 trials of ``repeats`` back-to-back calls, waiting only after the last
    (on an accelerator: the host's dispatch latency stays out of the per-call time).
    """
    jax.block_until_ready(fn(*args))  # compile + warm-up
    return _median_ms(fn, args, repeats, pipelined)


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (``None`` where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _warm_up(fn: Callable, args: tuple) -> int:
    """Untimed calls of ``fn(*args)`` until the entry runs at its steady speed (`WARM_UP_CALLS`,
    `WARM_UP_S`, `WARM_UP_MAX_S`); returns how many were made."""
    start, calls = time.perf_counter(), 0
    while True:
        jax.block_until_ready(fn(*args))
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= WARM_UP_MAX_S or (calls >= WARM_UP_CALLS and elapsed >= WARM_UP_S):
            return calls


def _call_times(
    fn: Callable, args: tuple, repeats: int, min_seconds: float = 0.0, max_calls: int = 0
) -> list[float]:
    """Seconds of each call of ``fn(*args)`` (each ending in ``block_until_ready``): ``repeats``
    calls, and more while less than ``min_seconds`` have passed and fewer than ``max_calls``
    were made."""
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < repeats or (
        time.perf_counter() - begin < min_seconds and len(times) < max_calls
    ):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def _median_ms(fn: Callable, args: tuple, repeats: int, pipelined: bool = False) -> float:
    if not pipelined:
        return 1e3 * statistics.median(_call_times(fn, args, repeats))
    times = []  # seconds per call of a pipelined trial
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / repeats)
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------------------------
# What is timed.
# --------------------------------------------------------------------------------------------


def _transformed(act: Callable[[jax.Array], jax.Array], mode: str) -> Callable:
    """``act`` under ``mode``, jitted, as a function of ``(x, g)``."""
    if mode == "fwd":
        return jax.jit(lambda x, g: act(x))
    if mode == "grad_sq":
        return jax.jit(jax.grad(lambda x, g: jnp.sum(act(x) ** 2)))
    if mode == "grad_dot":
        return jax.jit(jax.grad(lambda x, g: jnp.vdot(act(x), g)))
    if mode == "vjp":

        def forward_and_pullback(x, g):
            y, pull = jax.vjp(act, x)
            return y, pull(g)[0]

        return jax.jit(forward_and_pullback)
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def _topk_scatter(k: int) -> Callable[[jax.Array], jax.Array]:
    """The usual TopK-autoencoder activation: ``lax.top_k`` of each row, scattered into zeros."""

    def act(x):
        x2d = x.reshape(x.shape[0], -1)
        values, index = lax.top_k(x2d, k)
        rows = jnp.arange(x2d.shape[0])[:, None]
        return jnp.zeros_like(x2d).at[rows, index].set(values).reshape(x.shape)

    return act


def _activation(impl: str, ratio: float | None, k: int | None) -> Callable:
    if impl == "relu":
        return jax.nn.relu
    if impl == "topk_scatter":
        return _topk_scatter(k)
    return lambda x: kwta(x, ratio=ratio, k=k, impl=impl)


def _torch():
    """The torch module if it imports (it is not a dependency), else ``None``."""
    try:
        return importlib.import_module("torch") if importlib.util.find_spec("torch") else None
    except Exception:  # noqa: BLE001 - a broken install is the same as none here
        return None


def official_pytorch_kwta(x, k: int):
    """The official k-WTA (a554b554/kWTA-Activation ``Sparsify1D``, ``Sparsify2D_vol``).

    Per sample: the k-th largest value of the flattened sample by ``torch.topk``, then
    ``x * (x >= threshold)``; written here from the paper's code, for timing only.
    """
    flat = x.reshape(x.shape[0], -1)
    threshold = flat.topk(k, dim=1)[0][:, -1:]
    return (flat * (flat >= threshold).to(flat)).reshape(x.shape)


def _torch_case(torch, x: np.ndarray, g: np.ndarray, k: int, mode: str):
    """A no-argument callable that runs the official code under ``mode`` once."""
    xt, gt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(g))
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return official_pytorch_kwta(xt, k)

        return run
    xg = xt.clone().requires_grad_(True)

    def run():
        y = official_pytorch_kwta(xg, k)
        if mode == "grad_sq":
            return torch.autograd.grad((y * y).sum(), xg)[0]
        dx = torch.autograd.grad(y, xg, gt)[0]
        return (y, dx) if mode == "vjp" else dx

    return run


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """Backend, devices, CPU model and core count, versions, load average."""
    info = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    if info["backend"] == "cpu":
        info["cpu_kernel_isa"] = cpu_kernel_isa()
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def default_impls() -> list[str]:
    """ReLU, ``auto`` and every selector the backend runs natively (no interpret mode)."""
    impls = ["relu", "auto", "select"]
    if jax.default_backend() == "cpu" and cpu_kernel_available():
        impls.append("cpu")
    if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
        impls.append("pallas")
    return impls


def _cases(shapes, ratios, small_k, impls, modes, topk_modes, torch, dtype):
    """Every (record, callable, args) to time; arrays are made once per shape."""
    cases = []
    key = jax.random.key(0)
    groups = [(shape, [("ratio", r) for r in ratios]) for shape in shapes]
    groups += [(shape, [("k", k)]) for shape, k in small_k]
    for shape, settings in groups:
        kx, kg, key = jax.random.split(key, 3)
        x = jax.random.normal(kx, shape, dtype)
        g = jax.random.normal(kg, shape, dtype)
        n = int(np.prod(shape[1:]))
        for kind, value in settings:
            ratio, k = (value, None) if kind == "ratio" else (None, value)
            winners = max(1, int(ratio * n)) if ratio is not None else k
            names = list(impls) + (["topk_scatter"] if kind == "k" else [])
            for mode in modes:
                for impl in names:
                    if impl == "topk" and mode not in topk_modes:
                        continue
                    if impl == "relu" and kind == "ratio" and value != ratios[0]:
                        continue  # ReLU does not depend on the ratio: timed once per shape
                    record = {"shape": list(shape), kind: value, "mode": mode, "impl": impl}
                    if impl == "auto":
                        record["resolved"] = resolve_impl("auto")
                    act = _activation(impl, ratio, k)
                    cases.append((record, _transformed(act, mode), (x, g)))
                if torch is not None:
                    record = {"shape": list(shape), kind: value, "mode": mode, "impl": "torch"}
                    run = _torch_case(torch, np.asarray(x), np.asarray(g), winners, mode)
                    cases.append((record, lambda *_, run=run: run(), ()))
    return cases


def run_benchmark(
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    impls: Sequence[str] | None = None,
    repeats: int = 5,
    dtype=jnp.float32,
    log: Callable[[str], None] | None = None,
    *,
    small_k: Sequence[tuple[tuple[int, ...], int]] = SMALL_K_CASES,
    modes: Sequence[str] = MODES,
    rounds: int = 5,
    topk_modes: Sequence[str] = ("fwd",),
    use_torch: bool = True,
) -> list[dict]:
    """Times every case, interleaved over ``rounds``; returns one record per case.

    Records: ``{"shape", "ratio" or "k", "mode", "impl", "ms", "rounds_ms", "rounds_calls"}``
    (timed calls per round; ``impl="auto"`` also has ``"resolved"``). ``impls`` defaults to
    `default_impls`; ``topk`` (the reference, a full sort of the rank keys on XLA:CPU: seconds
    per call on the large shapes) is timed in ``topk_modes`` only when asked for; ``torch``
    joins when ``use_torch`` and it imports.
    """
    if impls is None:
        impls = default_impls()
    torch = _torch() if use_torch else None
    if torch is not None:
        # The same thread count as XLA's CPU pool (one per core).
        torch.set_num_threads(os.cpu_count() or 1)
    cases = _cases(shapes, ratios, small_k, impls, modes, topk_modes, torch, dtype)
    for record, fn, args in cases:  # compile and warm up everything before timing anything
        jax.block_until_ready(fn(*args))
        if log is not None:
            log(f"compiled {record}")
    for r in range(rounds):
        for record, fn, args in cases:
            _warm_up(fn, args)  # untimed: threads wake, buffers and caches settle
            faults = _minor_faults()
            times = _call_times(fn, args, repeats, MIN_TIMED_S, MAX_TIMED_CALLS)
            record.setdefault("rounds_ms", []).append(1e3 * statistics.median(times))
            record.setdefault("rounds_calls", []).append(len(times))
            if faults is not None:
                per_call = (_minor_faults() - faults) / len(times)
                record.setdefault("rounds_faults_per_call", []).append(per_call)
            if record["impl"] == "torch":
                # PyTorch's OpenMP threads keep spinning for milliseconds after a call; on a
                # small machine they would take cores from the next entry (measured: ReLU
                # 2-6x slower right after a torch call). Let them go to sleep first.
                time.sleep(TORCH_SETTLE_S)
        if log is not None:
            log(f"round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})")
    records = []
    for record, _, _ in cases:
        record["ms"] = statistics.median(record["rounds_ms"])
        if "rounds_faults_per_call" in record:
            record["faults_per_call"] = statistics.median(record["rounds_faults_per_call"])
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------


def summarize(records: list[dict]) -> list[dict]:
    """One row per (shape, ratio or k, mode): ms per impl, and the ratios that matter.

    ``<impl>/relu`` (cost against ReLU under the same transform), ``topk/auto``,
    ``topk_scatter/auto`` and ``torch/auto`` (speed-ups of the default ``kwta``).
    """
    relu = {(tuple(r["shape"]), r["mode"]): r for r in records if r["impl"] == "relu"}
    rows: dict[tuple, dict] = {}

    def put(row: dict, r: dict) -> None:  # one record's time (and fault mark) into a row
        row[r["impl"]] = r["ms"]
        if r.get("faults_per_call", 0) >= FAULTED:
            row.setdefault("faulted", []).append(r["impl"])

    for r in records:
        setting = setting_of(r)
        key = (tuple(r["shape"]), setting, r["mode"])
        row = rows.setdefault(key, {"shape": r["shape"], setting[0]: setting[1], "mode": r["mode"]})
        put(row, r)
        if "resolved" in r:
            row["resolved"] = r["resolved"]
    out = []
    for (shape, _, mode), row in rows.items():
        if (shape, mode) in relu and "relu" not in row:  # ReLU is timed once per shape
            put(row, relu[(shape, mode)])
        for impl in ("auto", "select", "cpu", "pallas"):
            if impl in row and "relu" in row:
                row[f"{impl}/relu"] = row[impl] / row["relu"]
        for other in ("topk", "topk_scatter", "torch"):
            if other in row and "auto" in row:
                row[f"{other}/auto"] = row[other] / row["auto"]
        out.append(row)
    return out


_COLUMNS = (
    ("relu", "ReLU ms"),
    ("auto", "kwta ms"),
    ("auto/relu", "kwta/ReLU"),
    ("select", "select ms"),
    ("select/relu", "select/ReLU"),
    ("cpu", "cpu ms"),
    ("cpu/relu", "cpu/ReLU"),
    ("pallas", "pallas ms"),
    ("pallas/relu", "pallas/ReLU"),
    ("topk", "top_k ms"),
    ("topk/auto", "top_k/kwta"),
    ("topk_scatter", "top_k+scatter ms"),
    ("topk_scatter/auto", "top_k+scatter/kwta"),
    ("torch", "PyTorch ms"),
    ("torch/auto", "PyTorch/kwta"),
)


def format_table(summary: list[dict], markdown: bool = False) -> str:
    """Plain-text (or Markdown) table of `summarize` rows; absent columns are dropped."""
    cols = [(k, h) for k, h in _COLUMNS if any(k in row for row in summary)]
    header = ["shape", "ratio / k", "mode"] + [h for _, h in cols]
    lines = []
    for row in summary:
        setting = f"{row['ratio']:g}" if "ratio" in row else f"k={row['k']}"
        cells = [
            "x".join(map(str, row["shape"])),
            setting,
            MODE_TITLES.get(row["mode"], row["mode"]),
        ]
        for k, _ in cols:
            v = row.get(k)
            if v is None:
                cells.append("-")
            elif "/" in k:
                cells.append(f"{v:.2f}x")
            else:
                cells.append(f"{v:.3f}" + ("†" if k in row.get("faulted", ()) else ""))
        lines.append(cells)
    note = [] if not any(row.get("faulted") for row in summary) else [FAULT_NOTE]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out + ["", *note] if note else out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*c) for c in lines] + note)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must look like 128x32x32x64; got {text!r}"
        ) from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs >= 2 positive dims; got {text!r}")
    return shape


def _parse_small_k(text: str) -> tuple[tuple[int, ...], int]:
    shape_text, _, k_text = text.partition(":")
    try:
        k = int(k_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"small-k case must look like 256x32768:32; got {text!r}"
        ) from None
    shape = _parse_shape(shape_text)
    if not 1 <= k <= int(np.prod(shape[1:])):
        raise argparse.ArgumentTypeError(f"k must be in [1, row size]; got {text!r}")
    return shape, k


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kwta_jax.benchmark", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    shapes_default = " ".join("x".join(map(str, s)) for s in DEFAULT_SHAPES)
    add("--shapes", type=_parse_shape, nargs="+", default=None,
        help=f"shapes like 256x512 128x32x32x64 (default: {shapes_default})")  # fmt: skip
    add("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    add("--small-k", type=_parse_small_k, nargs="*", default=None,
        help="small-k cases SHAPE:K (default: 256x32768:32 64x131072:64; "
        "none: --small-k alone)")  # fmt: skip
    add("--impls", nargs="+", default=None,
        help="subset of relu auto topk select cpu pallas (default: all the backend "
        "runs)")  # fmt: skip
    add("--modes", nargs="+", default=list(MODES), choices=MODES)
    add("--topk-modes", nargs="*", default=["fwd"], choices=MODES,
        help="transforms that time the top_k reference (a full sort on XLA:CPU)")  # fmt: skip
    add("--repeats", type=int, default=5,
        help="timed calls per entry and round, at least (more while they fit in "
        f"{MIN_TIMED_S * 1e3:g} ms, at most {MAX_TIMED_CALLS})")  # fmt: skip
    add("--rounds", type=int, default=5, help="interleaved rounds (entry = median over rounds)")
    add("--no-torch", action="store_true", help="leave the official PyTorch code out")
    add("--quick", action="store_true", help="tiny shapes, 2 repeats, 2 rounds (smoke)")
    add("--json", type=str, default=None, help="write records, summary and machine here")
    add("--markdown", action="store_true", help="print a Markdown table")
    add("--quiet", action="store_true", help="no progress lines")
    add("--check", action="store_true",
        help="also check the CPU speed targets (kwta_jax.benchmark_targets) on this run: "
        "print the verdict, add it to the JSON, exit 1 unless every target is met; "
        "entries the run left out count as not measured, never met")  # fmt: skip
    add("--allocator", choices=("steady", "as-is"), default="steady",
        help="steady (default): run under STEADY_ALLOCATOR_TUNABLES, so that no entry's time "
        "is page faults of freshly mapped outputs; as-is: the environment's malloc "
        "settings")  # fmt: skip
    args = parser.parse_args(argv)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    small_k = args.small_k
    if small_k is None:
        small_k = QUICK_SMALL_K if args.quick else SMALL_K_CASES
    repeats, rounds = (2, 2) if args.quick else (args.repeats, args.rounds)
    if repeats < 1 or rounds < 1:
        parser.error("--repeats and --rounds must be >= 1")
    for r in args.ratios:
        if not 0 < r <= 1:
            parser.error(f"--ratios must be in (0, 1]; got {r}")
    known = {"relu", "auto", "topk", "select", "cpu", "pallas"}
    if args.impls is not None and not set(args.impls) <= known:
        parser.error(f"--impls must be among {sorted(known)}; got {args.impls}")

    info = machine_info()
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    records = run_benchmark(
        shapes, args.ratios, args.impls, repeats, log=log, small_k=small_k,
        modes=args.modes, rounds=rounds, topk_modes=args.topk_modes, use_torch=not args.no_torch,
    )  # fmt: skip
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    torch = _torch() if not args.no_torch else None
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    summary = summarize(records)
    print(
        f"# backend={info['backend']} device={info['device_kind']} cpu={info.get('cpu_model')} "
        f"cores={info['cpu_count']} isa={info.get('cpu_kernel_isa')} jax={info['jax']} "
        f"torch={info.get('torch')} repeats={repeats} rounds={rounds} "
        f"load={info.get('loadavg_start')}->{info.get('loadavg_end')} "
        f"GLIBC_TUNABLES={info['glibc_tunables']}"
    )
    print(format_table(summary, markdown=args.markdown))
    targets = check_targets(summary) if args.check else None
    if targets is not None:
        print(format_targets(targets))
    if args.json:
        payload = {"machine": info, "repeats": repeats, "rounds": rounds, "records": records,
                   "summary": summary}  # fmt: skip
        if targets is not None:
            payload["targets"] = targets
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, default=float)
        os.replace(tmp, args.json)
    return 0 if targets is None or targets["all_met"] else 1


def steady_allocator_env(environ: dict[str, str]) -> dict[str, str] | None:
    """``environ`` plus `STEADY_ALLOCATOR_TUNABLES`, or ``None`` where they do not apply.

    They apply on Linux with glibc when ``GLIBC_TUNABLES`` is not set already (a user's own
    setting is kept).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if "GLIBC_TUNABLES" in environ:
        return None
    return {**environ, "GLIBC_TUNABLES": STEADY_ALLOCATOR_TUNABLES}


def restart_under_steady_allocator(argv: Sequence[str]) -> None:
    """Replaces this process by ``python *argv`` under `steady_allocator_env`, where it applies.

    glibc reads its tunables when a process starts, so a timing script calls this first thing
    (``argv`` starts it again, e.g. ``["-m", "kwta_jax.benchmark", ...]``); in the restarted
    process ``GLIBC_TUNABLES`` is set and this returns.
    """
    env = steady_allocator_env(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, *argv], env)


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--allocator", default="steady")
    if pre.parse_known_args(sys.argv[1:])[0].allocator == "steady":
        restart_under_steady_allocator(["-m", "kwta_jax.benchmark", *sys.argv[1:]])
    sys.exit(main())
