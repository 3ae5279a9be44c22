"""The CPU speed targets (issue 17), checked on a benchmark summary.

`check_targets` takes the rows of `kwta_jax.benchmark.summarize` (one run, interleaved) and
says, target by target and entry by entry, whether the default ``kwta`` met it:

* ``relu``: ``kwta`` at most `RELU_BOUND` times ReLU under the same transform, for every
  transform at the `RELU_RATIOS` on the `RELU_SHAPES` (the benchmark's default shapes and
  ratios, `kwta_jax.benchmark_cases`);
* ``small_k``: ``kwta`` at least `SPEEDUP_BOUND` times faster than ``lax.top_k`` plus a scatter
  on the small-k cases (``SMALL_K_CASES``), under every transform;
* ``torch``: ``kwta`` at least `SPEEDUP_BOUND` times faster than the official PyTorch code on
  every measured shape of at least `TORCH_MIN_ELEMENTS` elements.

An entry the run did not measure (a shape, transform or column it left out, e.g. PyTorch when
``import torch`` fails) is *not measured*, never met: a target is ``met`` only when all of its
entries were measured and met, ``missed`` when one was measured and missed, and ``not
checked`` when nothing of it was measured. ``python -m kwta_jax.benchmark --check`` prints
`format_targets` and exits 1 unless every target is met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kwta_jax.benchmark_cases import (
    DEFAULT_RATIOS,
    DEFAULT_SHAPES,
    MODE_TITLES,
    MODES,
    SMALL_K_CASES,
    setting_of,
)

__all__ = [
    "RELU_BOUND",
    "RELU_RATIOS",
    "RELU_SHAPES",
    "SPEEDUP_BOUND",
    "TORCH_MIN_ELEMENTS",
    "check_targets",
    "format_targets",
]

# The default run is the targets' table (benchmark_cases), so these are its shapes and ratios.
RELU_SHAPES = DEFAULT_SHAPES
RELU_RATIOS = DEFAULT_RATIOS
RELU_BOUND = 1.5
SPEEDUP_BOUND = 10.0
TORCH_MIN_ELEMENTS = 2**20


def _entry(shape, setting, mode, column, value, bound, at_most: bool) -> dict:
    entry = {"shape": list(shape), setting[0]: setting[1], "mode": mode, "column": column,
             "bound": bound}  # fmt: skip
    if value is None:
        entry["status"] = "not measured"
    else:
        entry["value"] = value
        entry["status"] = "met" if (value <= bound if at_most else value >= bound) else "missed"
    return entry


def _target(name: str, description: str, entries: list[dict], unchecked_why: str) -> dict:
    statuses = [e["status"] for e in entries]
    measured = [s for s in statuses if s != "not measured"]
    if not measured:
        status = "not checked"
    elif "missed" in measured:
        status = "missed"
    elif len(measured) < len(statuses):
        status = "partly measured"
    else:
        status = "met"
    target = {"name": name, "description": description, "status": status,
              "met": statuses.count("met"), "missed": statuses.count("missed"),
              "not_measured": statuses.count("not measured"), "entries": entries}  # fmt: skip
    if status == "not checked":
        target["why"] = unchecked_why
    return target


def check_targets(
    summary: Sequence[dict], *, modes: Sequence[str] = MODES, ratios: Sequence[float] = RELU_RATIOS
) -> dict:
    """The targets' verdict on `summarize` rows: ``{"all_met", "targets": [...]}``.

    Each target has ``name``, ``description``, ``status`` (``met``, ``missed``, ``partly
    measured`` or ``not checked``, with ``why``), counts of entries ``met`` / ``missed`` /
    ``not_measured``, and its ``entries`` (shape, ratio or k, mode, the column checked, its
    value and bound, status). ``all_met`` is true only when every target is ``met``.
    """
    rows = {(tuple(r["shape"]), setting_of(r), r["mode"]): r for r in summary}

    def value(shape, setting, mode, column):
        return rows.get((tuple(shape), setting, mode), {}).get(column)

    relu = [
        _entry(shape, ("ratio", ratio), mode, "auto/relu",
               value(shape, ("ratio", ratio), mode, "auto/relu"), RELU_BOUND, at_most=True)
        for shape in RELU_SHAPES for ratio in ratios for mode in modes
    ]  # fmt: skip
    small_k = [
        _entry(shape, ("k", k), mode, "topk_scatter/auto",
               value(shape, ("k", k), mode, "topk_scatter/auto"), SPEEDUP_BOUND, at_most=False)
        for shape, k in SMALL_K_CASES for mode in modes
    ]  # fmt: skip
    large = [(shape, ("ratio", ratio)) for shape in RELU_SHAPES for ratio in ratios]
    large += [(shape, ("k", k)) for shape, k in SMALL_K_CASES]
    torch = [
        _entry(shape, setting, mode, "torch/auto", value(shape, setting, mode, "torch/auto"),
               SPEEDUP_BOUND, at_most=False)
        for shape, setting in large if math.prod(shape) >= TORCH_MIN_ELEMENTS
        for mode in modes
    ]  # fmt: skip
    targets = [
        _target("relu", f"kwta / ReLU <= {RELU_BOUND:g} under the same transform", relu,
                "the run measured none of the target shapes (the default shapes are them)"),
        _target("small_k", f"top_k + scatter / kwta >= {SPEEDUP_BOUND:g} on the small-k cases",
                small_k, "the run measured no small-k case (the defaults are them)"),
        _target("torch", f"PyTorch / kwta >= {SPEEDUP_BOUND:g} on shapes of >= 2^20 elements",
                torch, "no PyTorch column: `import torch` failed or --no-torch was given"),
    ]  # fmt: skip
    return {"all_met": all(t["status"] == "met" for t in targets), "targets": targets}


def _describe(entry: dict) -> str:
    setting = f"r={entry['ratio']:g}" if "ratio" in entry else f"k={entry['k']}"
    shape = "x".join(map(str, entry["shape"]))
    return f"{shape} {setting} {MODE_TITLES.get(entry['mode'], entry['mode'])}"


def format_targets(report: dict) -> str:
    """The verdict as text: one line per target, then the entries that missed or were not
    measured (with their values)."""
    lines = ["targets (issue 17): " + ("all met" if report["all_met"] else "NOT all met")]
    for t in report["targets"]:
        total = len(t["entries"])
        counts = f"{t['met']} of {total} met, {t['missed']} missed"
        if t["not_measured"]:
            counts += f", {t['not_measured']} not measured"
        line = f"  {t['name']}: {t['status']} ({counts}): {t['description']}"
        lines.append(line + (f"; {t['why']}" if "why" in t else ""))
        for e in t["entries"]:
            if e["status"] == "missed":
                value, bound = e["value"], e["bound"]
                lines.append(f"    missed  {_describe(e)}: {value:.2f}x (bound {bound:g}x)")
        unmeasured = [_describe(e) for e in t["entries"] if e["status"] == "not measured"]
        if unmeasured and t["status"] != "not checked":
            lines.append("    not measured: " + ", ".join(unmeasured))
    return "\n".join(lines)
