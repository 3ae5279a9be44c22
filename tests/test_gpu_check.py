"""The GPU check script runs end to end on CPU (interpret mode, tiny sizes), so it cannot rot
between the rare sessions with a GPU; it fails loudly on a mismatch, refuses a GPU-sized run on
a machine without a GPU, and writes nothing inside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from kwta_jax import gpu_check
from kwta_jax.config import TrainConfig
from kwta_jax.training import time_train_step

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run_script(*args, out=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable  # the interpreter running the tests, not PATH's python3
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def _repo_entries() -> set[str]:
    return {p.name for p in REPO.iterdir()}


@pytest.mark.slow
def test_script_dry_run_from_a_bare_checkout(tmp_path):
    """scripts/gpu_check.sh needs no install step; every stage writes its JSON (at most 8
    files: what the GPU machine sends back)."""
    before = _repo_entries()
    out = tmp_path / "out"
    proc = _run_script("--dry-run", out=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _repo_entries() == before  # no gpu_check_out/ or anything else in the repository
    files = sorted(p.name for p in out.iterdir())
    assert files == ["benchmark.json", "exactness.json", "info.json", "log.txt", "pipeline.json",
                     "train_steps.json"]  # fmt: skip
    stages = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert stages["info"]["backend"] == "cpu" and "cuda_kernel_status" in stages["info"]
    exactness = stages["exactness"]
    assert exactness["mismatches"] == [] and len(exactness["records"]) > 20
    assert all(r["exact"] for r in exactness["records"])
    cases = " ".join(r["case"] for r in exactness["records"])
    for what in ("pallas (5, 300) bfloat16", "all equal (overflow)", "op select grad",
                 "op pallas jvp of grad"):  # fmt: skip
        assert what in cases
    row = stages["benchmark"]["records"][0]
    keys = {"shape", "ratio", "mode", "relu", "topk", "select", "pallas", "pallas GB/s", "bytes"}
    # no PyTorch column on a CPU machine, whether torch is missing or has no CUDA device
    why = stages["benchmark"]["torch"]
    assert keys <= set(row) and why.startswith(("import torch failed", "torch has no CUDA"))
    (steps,) = stages["train_steps"]["records"]
    assert steps["model"] == "mlp" and len(steps["relu_ms"]) == len(steps["kwta_ms"]) == 2
    assert steps["ratio_spread"] >= 0 and steps["ratio_median"] > 0
    pipeline = stages["pipeline"]["records"]
    assert [(r["step"], r["rc"]) for r in pipeline] == [("train", 0), ("attack", 0), ("es", 0)]
    assert "worst" in json.dumps(pipeline[1]["results"]) and pipeline[2]["wall_s"] > 0
    assert (out / "log.txt").read_text().rstrip().endswith("== done: 0 mismatches")


@pytest.mark.slow
def test_script_refuses_a_gpu_sized_run_without_a_gpu():
    before = _repo_entries()
    proc = _run_script(timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no GPU here (jax's default backend is 'cpu'); use --dry-run for the tiny "
        "rehearsal on this machine."
    ]
    assert _repo_entries() == before


def test_a_mismatch_or_an_error_is_recorded_and_fails_the_run(tmp_path, monkeypatch, capsys):
    stage = gpu_check.Stage("exactness", tmp_path, log=lambda m: None, deadline=float("inf"))
    stage.check("right", lambda: True)
    stage.check("wrong", lambda: False)
    stage.check("raises", lambda: 1 / 0)  # recorded, and the checks go on
    assert stage.mismatches == ["wrong", "raises"]
    stage.write()
    assert json.loads((tmp_path / "exactness.json").read_text())["mismatches"] == [
        "wrong",
        "raises",
    ]
    monkeypatch.setattr(gpu_check, "run_checks", lambda *a, **k: 1)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "o")]) == 1
    assert "FAILED: 1 mismatches" in capsys.readouterr().err


def test_a_crashed_stage_fails_the_run_and_the_others_still_run(tmp_path, monkeypatch):
    ran = []

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    def pipeline(out, sizes, *, deadline, log):
        ran.append("pipeline")
        return gpu_check.Stage("pipeline", out, log, deadline).write()

    monkeypatch.setattr(gpu_check, "stage_benchmark", crash)
    monkeypatch.setattr(gpu_check, "stage_pipeline", pipeline)
    assert gpu_check.run_checks(tmp_path, dry_run=True, stages=["benchmark", "pipeline"],
                                log=lambda m: None) == 1  # fmt: skip
    assert ran == ["pipeline"]
    crashed = json.loads((tmp_path / "benchmark.json").read_text())
    assert (
        crashed["mismatches"] == ["stage benchmark crashed"] and "out of memory" in crashed["error"]
    )


def test_the_default_output_is_outside_the_repository(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "run_checks", lambda *a, **k: 0)
    assert gpu_check.main(["--dry-run"]) == 0
    out = Path(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert out.is_dir() and REPO not in out.parents and (out / "log.txt").is_file()


def test_bandwidth_nominal_and_edge_cases():
    assert gpu_check._nominal_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu_check._nominal_gbps("NVIDIA H100 PCIe") == 2000.0
    assert gpu_check._nominal_gbps("NVIDIA H200") == 4800.0
    assert gpu_check._nominal_gbps("cpu") is None
    sizes = gpu_check.FULL
    cases = dict(gpu_check._edge_cases(sizes, 4))
    assert (
        cases["fits the buffer"].shape[1] == 8192 and cases["one past the buffer"].shape[1] == 8193
    )
    assert (cases["all equal (overflow)"] == 1.5).all()
    assert gpu_check._ks(300, (0.1, 0.7)) == [(30, False), (210, False), (100, True)]
    x = jnp.asarray([[1.0, -0.0, 0.0, 2.0]])
    assert gpu_check._bits(
        gpu_check._masked(x, gpu_check._reference(x, 2, False), False)
    ).tolist() == [[0x3F800000, 0, 0, 0x40000000]]


def test_time_train_step_rejects_bad_counts():
    with pytest.raises(ValueError, match="n_steps and trials must be >= 1"):
        time_train_step(TrainConfig(model="mlp"), n_steps=0)
