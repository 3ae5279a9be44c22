"""Benchmark: ReLU vs the top_k reference vs the fast paths, forward and forward+backward.

Run ``python -m kwta_jax.benchmark`` (``--help`` for options). For every shape and ratio it
times, on the default backend, ``jax.nn.relu``, ``kwta(impl="topk")`` (reference),
``kwta(impl="select")`` (fast exact XLA path), on the CPU backend ``kwta(impl="cpu")`` (the
C++ FFI kernel, when a compiler could build it) and, where the backend compiles Pallas (GPU,
TPU; interpret mode is not a timing), ``kwta(impl="pallas")``. Each timing is the median of
``--repeats`` calls of a jitted function after one warm-up call (compilation excluded), each
call ending in ``block_until_ready``. Prints a table (``--markdown`` for a Markdown one) and
writes JSON (``--json PATH``) with the machine details.
"""

from __future__ import annotations

import argparse
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

from kwta_jax.kernels.kwta_cpu import cpu_kernel_available
from kwta_jax.ops import kwta

__all__ = ["DEFAULT_SHAPES", "main", "run_benchmark", "time_call"]

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 512),
    (256, 4096),
    (128, 32, 32, 64),
    (128, 16, 16, 128),
    (32, 8, 8, 512),
)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((8, 64), (4, 4, 4, 8))
DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.7)
MODES = ("fwd", "fwd+bwd")


def time_call(fn: Callable, *args, repeats: int = 5, pipelined: bool = False) -> float:
    """Median wall time in milliseconds of ``fn(*args)`` after one warm-up call.

    ``pipelined``: time 3 trials of ``repeats`` back-to-back calls, waiting only after the
    last, and return the median time per call. On an accelerator this keeps the device busy
    and leaves the host's dispatch and synchronisation latency (tens of microseconds, as long
    as a whole k-WTA kernel) out of the per-call time.
    """
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    if pipelined:
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                out = fn(*args)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - start) / repeats)
        return 1e3 * statistics.median(times)
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _activation(name: str, ratio: float) -> Callable[[jax.Array], jax.Array]:
    if name == "relu":
        return jax.nn.relu
    return lambda x: kwta(x, ratio=ratio, impl=name)


def _jitted(act: Callable, mode: str) -> Callable:
    if mode == "fwd":
        return jax.jit(lambda x, g: act(x))
    # Forward and backward: the gradient of <act(x), g> w.r.t. x is the VJP of act at x.
    return jax.jit(jax.grad(lambda x, g: jnp.vdot(act(x), g)))


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
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def run_benchmark(
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    impls: Sequence[str] | None = None,
    repeats: int = 5,
    dtype=jnp.float32,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Times every (shape, ratio, mode, implementation); returns one record per timing.

    Records: ``{"shape", "ratio", "mode", "impl", "ms"}``. ``impls`` defaults to relu, topk,
    select, plus cpu on the CPU backend (when the kernel builds) and pallas on a GPU or TPU.
    """
    if impls is None:
        impls = ["relu", "topk", "select"]
        if jax.default_backend() == "cpu" and cpu_kernel_available():
            impls.append("cpu")
        if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
            impls.append("pallas")
    records = []
    key = jax.random.key(0)
    for shape in shapes:
        kx, kg, key = jax.random.split(key, 3)
        x = jax.random.normal(kx, shape, dtype)
        g = jax.random.normal(kg, shape, dtype)
        for ratio in ratios:
            for mode in MODES:
                for impl in impls:
                    if impl == "relu" and ratio != ratios[0]:
                        # ReLU does not depend on the ratio: time it once per shape and mode.
                        prev = next(
                            r
                            for r in records
                            if r["shape"] == list(shape)
                            and r["mode"] == mode
                            and r["impl"] == "relu"
                        )
                        ms = prev["ms"]
                    else:
                        fn = _jitted(_activation(impl, ratio), mode)
                        ms = time_call(fn, x, g, repeats=repeats)
                    records.append(
                        {"shape": list(shape), "ratio": ratio, "mode": mode, "impl": impl, "ms": ms}
                    )
                    if log is not None:
                        log(f"{shape} r={ratio} {mode:8s} {impl:7s} {ms:10.3f} ms")
    return records


def summarize(records: list[dict]) -> list[dict]:
    """One row per (shape, ratio, mode): ms per impl and the ratios of the fast paths."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (tuple(r["shape"]), r["ratio"], r["mode"])
        rows.setdefault(key, {"shape": r["shape"], "ratio": r["ratio"], "mode": r["mode"]})
        rows[key][r["impl"]] = r["ms"]
    out = []
    for row in rows.values():
        for impl in ("select", "cpu", "pallas"):
            if impl in row:
                if "relu" in row:
                    row[f"{impl}/relu"] = row[impl] / row["relu"]
                if "topk" in row:
                    row[f"topk/{impl}"] = row["topk"] / row[impl]
        out.append(row)
    return out


_COLUMNS = (
    ("relu", "ReLU ms"),
    ("topk", "top_k ms"),
    ("select", "select ms"),
    ("cpu", "cpu ms"),
    ("pallas", "pallas ms"),
    ("select/relu", "select/ReLU"),
    ("topk/select", "top_k/select"),
    ("cpu/relu", "cpu/ReLU"),
    ("topk/cpu", "top_k/cpu"),
    ("pallas/relu", "pallas/ReLU"),
    ("topk/pallas", "top_k/pallas"),
)


def format_table(summary: list[dict], markdown: bool = False) -> str:
    """Plain-text (or Markdown) table of `summarize` rows; absent columns are dropped."""
    cols = [(k, h) for k, h in _COLUMNS if any(k in row for row in summary)]
    header = ["shape", "ratio", "mode"] + [h for _, h in cols]
    lines = []
    for row in summary:
        cells = ["x".join(map(str, row["shape"])), f"{row['ratio']:g}", row["mode"]]
        for k, _ in cols:
            v = row.get(k)
            if v is None:
                cells.append("-")
            elif "/" in k:
                cells.append(f"{v:.2f}x")
            else:
                cells.append(f"{v:.2f}")
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*c) for c in lines])


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kwta_jax.benchmark", description=__doc__)
    parser.add_argument(
        "--shapes",
        type=_parse_shape,
        nargs="+",
        default=None,
        help="shapes like 256x512 128x32x32x64 (default: "
        + " ".join("x".join(map(str, s)) for s in DEFAULT_SHAPES)
        + ")",
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument(
        "--impls",
        nargs="+",
        default=None,
        help="subset of relu topk select cpu pallas (default: all the backend compiles)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per entry")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke)")
    parser.add_argument("--json", type=str, default=None, help="write records + machine here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--quiet", action="store_true", help="no per-entry progress lines")
    args = parser.parse_args(argv)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    repeats = 2 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    for r in args.ratios:
        if not 0 < r <= 1:
            parser.error(f"--ratios must be in (0, 1]; got {r}")
    known = {"relu", "topk", "select", "cpu", "pallas"}
    if args.impls is not None and not set(args.impls) <= known:
        parser.error(f"--impls must be among {sorted(known)}; got {args.impls}")

    info = machine_info()
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    records = run_benchmark(shapes, args.ratios, args.impls, repeats, log=log)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    summary = summarize(records)
    print(
        f"# backend={info['backend']} device={info['device_kind']} cpu={info.get('cpu_model')} "
        f"cores={info['cpu_count']} jax={info['jax']} repeats={repeats} "
        f"load={info.get('loadavg_start')}->{info.get('loadavg_end')}"
    )
    print(format_table(summary, markdown=args.markdown))
    if args.json:
        payload = {"machine": info, "repeats": repeats, "records": records, "summary": summary}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
