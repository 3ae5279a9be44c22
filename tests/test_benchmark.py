"""Smoke tests of the benchmark CLI at tiny size (no timing is asserted: the machine is shared)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kwta_jax.kernels.kwta_cpu import cpu_kernel_available

from kwta_jax import benchmark


def test_benchmark_cli_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = benchmark.main(
        ["--quick", "--shapes", "4x16", "--ratios", "0.5", "--json", str(out), "--quiet",
         "--no-torch", "--impls", "relu", "auto", "topk", "select", "cpu"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "kwta/ReLU" in text and "top_k+scatter/kwta" in text
    payload = json.loads(out.read_text())
    impls = {r["impl"] for r in payload["records"]}
    # no pallas timing on CPU (interpret mode); cpu where the kernel builds
    assert impls == {"relu", "auto", "topk", "select", "cpu", "topk_scatter"}
    assert all(r["ms"] > 0 for r in payload["records"])
    assert {r["mode"] for r in payload["records"]} == set(benchmark.MODES)
    assert {r["mode"] for r in payload["records"] if r["impl"] == "topk"} == {"fwd"}
    assert payload["machine"]["backend"] == "cpu"
    assert "loadavg_start" in payload["machine"] and "loadavg_end" in payload["machine"]
    auto = [r for r in payload["records"] if r["impl"] == "auto"]
    assert {r["resolved"] for r in auto} == {"cpu" if cpu_kernel_available() else "select"}


@pytest.mark.parametrize("mode", benchmark.MODES)
def test_every_transform_computes_the_op_and_its_derivative(mode):
    """What is timed is what the table says: relu and kwta under fwd / grad Σy² / grad ⟨y,g⟩
    / vjp give the forward or the derivative (upstream * mask)."""
    x = jnp.array([[3.0, -1.0, 2.0, 0.5]])
    g = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    fn = benchmark._transformed(benchmark._activation("auto", None, 2), mode)
    y = jnp.array([[3.0, 0.0, 2.0, 0.0]])
    mask = y != 0
    want = {
        "fwd": y,
        "grad_sq": 2 * y,
        "grad_dot": jnp.where(mask, g, 0.0),
        "vjp": (y, jnp.where(mask, g, 0.0)),
    }[mode]
    got = fn(x, g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (a == b).all()


def test_official_pytorch_kwta_matches_the_op():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 5)).astype(np.float32)
    got = benchmark.official_pytorch_kwta(torch.from_numpy(x), 4).numpy()
    want = np.asarray(benchmark.kwta(x, k=4, impl="topk"))
    np.testing.assert_array_equal(got, want)


def test_benchmark_markdown_table():
    records = [
        {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "relu", "ms": 1.0},
        {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "topk", "ms": 40.0},
        {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "auto", "ms": 2.0},
        {"shape": [2, 3], "k": 1, "mode": "grad_sq", "impl": "relu", "ms": 1.0},
        {"shape": [2, 3], "k": 1, "mode": "grad_sq", "impl": "auto", "ms": 1.5},
        {"shape": [2, 3], "k": 1, "mode": "grad_sq", "impl": "topk_scatter", "ms": 30.0},
    ]
    table = benchmark.format_table(benchmark.summarize(records), markdown=True)
    assert "| 2x3 | 0.1 | fwd | 1.000 | 2.000 | 2.00x | 40.000 | 20.00x | - | - |" in table
    assert "| 2x3 | k=1 | grad Σy² | 1.000 | 1.500 | 1.50x | - | - | 30.000 | 20.00x |" in table


def test_entries_that_page_faulted_are_marked():
    """A time that is mostly page-fault handling (a freshly mapped output) says so."""
    records = [
        {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "relu", "ms": 7.0,
         "faults_per_call": 8193.0},
        {"shape": [2, 3], "ratio": 0.1, "mode": "fwd", "impl": "auto", "ms": 2.0,
         "faults_per_call": 0.0},
        {"shape": [2, 3], "ratio": 0.7, "mode": "fwd", "impl": "auto", "ms": 3.0,
         "faults_per_call": benchmark.FAULTED - 1},
    ]  # fmt: skip
    table = benchmark.format_table(benchmark.summarize(records))
    lines = table.splitlines()
    assert "7.000†" in lines[1] and "2.000†" not in lines[1]
    # ReLU is timed once per shape (the same faulted time in both rows); 99 faults are not many
    assert "7.000†" in lines[2] and "3.000†" not in lines[2]
    assert lines[-1] == benchmark.FAULT_NOTE
    clean = [{**r, "faults_per_call": 0.0} for r in records]
    assert "†" not in benchmark.format_table(benchmark.summarize(clean))


def test_the_cli_records_page_faults_per_call(tmp_path):
    out = tmp_path / "bench.json"
    rc = benchmark.main(
        ["--quick", "--shapes", "4x16", "--ratios", "0.5", "--small-k", "--json", str(out),
         "--quiet", "--no-torch", "--impls", "relu", "auto", "--modes", "fwd", "--rounds", "1"]
    )  # fmt: skip
    assert rc == 0
    records = json.loads(out.read_text())["records"]
    assert all(r["faults_per_call"] >= 0 for r in records)


def test_steady_allocator_env_keeps_a_users_setting():
    env = benchmark.steady_allocator_env({"PATH": "/bin"})
    if env is None:  # not Linux with glibc: nothing to set
        assert not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
        return
    assert env["GLIBC_TUNABLES"] == benchmark.STEADY_ALLOCATOR_TUNABLES and env["PATH"] == "/bin"
    assert benchmark.steady_allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None


@pytest.mark.skipif(
    benchmark.steady_allocator_env({}) is None, reason="glibc tunables: Linux with glibc only"
)
@pytest.mark.parametrize("allocator", ["steady", "as-is"])
def test_the_cli_runs_itself_under_the_steady_allocator(tmp_path, allocator):
    """`python -m kwta_jax.benchmark` starts again with the tunables (glibc reads them at
    start-up), records them, and leaves them out with --allocator as-is."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run(
        [sys.executable, "-m", "kwta_jax.benchmark", "--quick", "--shapes", "4x16", "--ratios",
         "0.5", "--small-k", "--impls", "relu", "auto", "--modes", "fwd", "--no-torch",
         "--quiet", "--allocator", allocator, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    tunables = json.loads(out.read_text())["machine"]["glibc_tunables"]
    want = benchmark.STEADY_ALLOCATOR_TUNABLES if allocator == "steady" else None
    assert tunables == want
    assert f"GLIBC_TUNABLES={want}" in proc.stdout


def test_warm_up_runs_enough_calls_and_stops_on_slow_ones():
    """An entry is timed only after `WARM_UP_CALLS` untimed calls over `WARM_UP_S` seconds
    (the first calls after an idle spell are slow), or after `WARM_UP_MAX_S` of slow calls."""
    fast = jnp.zeros(())
    calls = benchmark._warm_up(lambda: fast, ())
    assert calls >= benchmark.WARM_UP_CALLS

    made = []

    def slow():  # each call alone takes more than half of WARM_UP_MAX_S
        made.append(1)
        time.sleep(0.6 * benchmark.WARM_UP_MAX_S)
        return fast

    # 2 calls (1 if the machine oversleeps), never WARM_UP_CALLS of them
    assert benchmark._warm_up(slow, ()) == len(made) <= 2 < benchmark.WARM_UP_CALLS


def test_fast_entries_are_timed_over_more_calls():
    """At least ``repeats`` calls; more while they fit in ``min_seconds``, at most
    ``max_calls``; the record counts them per round."""
    fast = jnp.zeros(())
    assert len(benchmark._call_times(lambda: fast, (), 3)) == 3
    many = benchmark._call_times(lambda: fast, (), 3, min_seconds=10.0, max_calls=50)
    assert len(many) == 50 and all(t >= 0 for t in many)

    def slow():
        time.sleep(0.02)
        return fast

    assert len(benchmark._call_times(slow, (), 2, min_seconds=0.01, max_calls=50)) == 2
    records = benchmark.run_benchmark(
        [(4, 16)], [0.5], ["relu"], repeats=2, small_k=(), modes=["fwd"], rounds=2,
        use_torch=False,
    )  # fmt: skip
    (record,) = records
    assert len(record["rounds_calls"]) == 2
    assert all(2 <= c <= benchmark.MAX_TIMED_CALLS for c in record["rounds_calls"])
