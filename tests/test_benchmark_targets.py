"""The CPU speed targets' verdict: met only when every entry was measured and met, missed when
one measured entry missed, never met for what the run left out; and the CLI's ``--check``."""

from __future__ import annotations

import json
import math

import pytest

from kwta_jax import benchmark
from kwta_jax.benchmark_cases import DEFAULT_RATIOS, DEFAULT_SHAPES, MODES, SMALL_K_CASES
from kwta_jax.benchmark_targets import (
    RELU_BOUND,
    SPEEDUP_BOUND,
    TORCH_MIN_ELEMENTS,
    check_targets,
    format_targets,
)


def full_summary(relu_ratio=1.2, topk_speedup=12.0, torch_speedup=20.0) -> list[dict]:
    """`summarize` rows of a full default run whose every ratio is the given one."""
    rows = []
    for shape in DEFAULT_SHAPES:
        for ratio in DEFAULT_RATIOS:
            for mode in MODES:
                rows.append({"shape": list(shape), "ratio": ratio, "mode": mode, "relu": 1.0,
                             "auto": relu_ratio, "auto/relu": relu_ratio,
                             "torch/auto": torch_speedup})  # fmt: skip
    for shape, k in SMALL_K_CASES:
        for mode in MODES:
            rows.append({"shape": list(shape), "k": k, "mode": mode,
                         "auto/relu": relu_ratio, "topk_scatter/auto": topk_speedup,
                         "torch/auto": torch_speedup})  # fmt: skip
    return rows


def by_name(report: dict) -> dict:
    return {t["name"]: t for t in report["targets"]}


def test_all_met_only_when_every_target_is_met():
    report = check_targets(full_summary())
    assert report["all_met"]
    assert {t["name"]: t["status"] for t in report["targets"]} == {
        "relu": "met", "small_k": "met", "torch": "met"
    }  # fmt: skip
    targets = by_name(report)
    assert len(targets["relu"]["entries"]) == len(DEFAULT_SHAPES) * len(DEFAULT_RATIOS) * 4
    assert len(targets["small_k"]["entries"]) == len(SMALL_K_CASES) * 4
    # the PyTorch target covers exactly the shapes of >= 2^20 elements ([256,512] is smaller)
    shapes = {tuple(e["shape"]) for e in targets["torch"]["entries"]}
    want = {s for s in DEFAULT_SHAPES if math.prod(s) >= TORCH_MIN_ELEMENTS}
    want |= {s for s, _ in SMALL_K_CASES}
    assert shapes == want and (256, 512) not in shapes


@pytest.mark.parametrize(
    "value,status", [(RELU_BOUND, "met"), (RELU_BOUND + 0.01, "missed"), (0.5, "met")]
)
def test_the_relu_bound_is_inclusive(value, status):
    rows = full_summary()
    hit = next(r for r in rows if r["shape"] == [256, 4096] and r["mode"] == "grad_sq")
    hit["auto/relu"] = value
    report = check_targets(rows)
    relu = by_name(report)["relu"]
    assert relu["status"] == status and report["all_met"] == (status == "met")
    if status == "missed":
        assert relu["missed"] == 1
        (entry,) = [e for e in relu["entries"] if e["status"] == "missed"]
        assert entry["shape"] == [256, 4096] and entry["mode"] == "grad_sq"
        assert "256x4096 r=0.1 grad Σy²: 1.51x (bound 1.5x)" in format_targets(report)


@pytest.mark.parametrize("name,column", [("small_k", "topk_scatter/auto"), ("torch", "torch/auto")])
def test_speedup_bounds_are_at_least(name, column):
    rows = full_summary()
    for value, status in ((SPEEDUP_BOUND, "met"), (SPEEDUP_BOUND - 0.1, "missed")):
        for r in rows:
            if column in r and r["mode"] == "vjp":
                r[column] = value
        assert by_name(check_targets(rows))[name]["status"] == status


def test_a_missing_torch_column_is_not_checked_never_met():
    rows = full_summary()
    for r in rows:
        del r["torch/auto"]
    report = check_targets(rows)
    torch = by_name(report)["torch"]
    assert torch["status"] == "not checked" and torch["met"] == 0
    assert "import torch" in torch["why"]
    assert not report["all_met"]
    assert "torch: not checked" in format_targets(report)


def test_a_partial_run_is_partly_measured_and_lists_what_is_missing():
    rows = [r for r in full_summary() if r["mode"] != "vjp"]
    report = check_targets(rows)
    relu = by_name(report)["relu"]
    assert relu["status"] == "partly measured" and relu["missed"] == 0
    assert relu["not_measured"] == len(DEFAULT_SHAPES) * len(DEFAULT_RATIOS)
    assert not report["all_met"]
    text = format_targets(report)
    assert "not measured: 128x32x32x64 r=0.1 vjp" in text
    # a miss outranks what was not measured
    rows[0]["auto/relu"] = 2.0
    assert by_name(check_targets(rows))["relu"]["status"] == "missed"


def test_an_empty_run_checks_nothing():
    report = check_targets([])
    assert not report["all_met"]
    assert {t["status"] for t in report["targets"]} == {"not checked"}


def test_the_cli_check_reports_and_fails_on_a_run_that_left_the_targets_out(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(
        ["--quick", "--shapes", "4x16", "--ratios", "0.5", "--small-k", "--no-torch", "--quiet",
         "--impls", "relu", "auto", "--modes", "fwd", "--check", "--json", str(out)]
    )  # fmt: skip
    assert rc == 1  # nothing of the targets' table was measured: not met
    text = capsys.readouterr().out
    assert "targets (issue 17): NOT all met" in text
    assert "relu: not checked" in text and "torch: not checked" in text
    payload = json.loads(out.read_text())
    assert payload["targets"]["all_met"] is False
    assert {t["status"] for t in payload["targets"]["targets"]} == {"not checked"}


def test_without_check_the_cli_exits_0_and_writes_no_verdict(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(
        ["--quick", "--shapes", "4x16", "--ratios", "0.5", "--small-k", "--no-torch", "--quiet",
         "--impls", "relu", "auto", "--modes", "fwd", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert "targets" not in capsys.readouterr().out
    assert "targets" not in json.loads(out.read_text())
