"""Smoke test of the benchmark CLI at tiny size."""

from __future__ import annotations

import json

from kwta_jax.kernels.kwta_cpu import cpu_kernel_available

from kwta_jax import benchmark


def test_benchmark_cli_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(
        ["--quick", "--shapes", "4x16", "--ratios", "0.5", "--json", str(out), "--quiet"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "select/ReLU" in text and "top_k/select" in text
    payload = json.loads(out.read_text())
    impls = {r["impl"] for r in payload["records"]}
    # no pallas timing on CPU (interpret mode); cpu where the kernel builds
    assert impls == {"relu", "topk", "select"} | ({"cpu"} if cpu_kernel_available() else set())
    assert all(r["ms"] > 0 for r in payload["records"])
    assert {r["mode"] for r in payload["records"]} == {"fwd", "fwd+bwd"}
    assert payload["machine"]["backend"] == "cpu"


def test_benchmark_markdown_table():
    summary = benchmark.summarize(
        [
            {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "relu", "ms": 1.0},
            {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "topk", "ms": 40.0},
            {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "select", "ms": 2.0},
        ]
    )
    table = benchmark.format_table(summary, markdown=True)
    assert "| 2x3 | 0.1 | fwd | 1.00 | 40.00 | 2.00 | 2.00x | 20.00x |" in table
