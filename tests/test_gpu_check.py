"""The GPU check script runs end to end on CPU (interpret mode, tiny sizes), so it cannot rot
between the rare sessions with a GPU, and it fails loudly on a mismatch."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jax.numpy as jnp
import pytest

from kwta_jax import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_script_dry_run_from_a_bare_checkout(tmp_path):
    """scripts/gpu_check.sh needs no install step: it lays out the package itself."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OUT=str(out)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stages = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(stages) == {"info", "sweep", "exactness", "benchmark", "train_steps"}
    assert stages["info"]["backend"] == "cpu" and "versions" in stages["info"]
    exactness = stages["exactness"]
    assert exactness["mismatches"] == [] and len(exactness["records"]) > 10
    assert all(r["exact"] for r in exactness["records"])
    assert stages["sweep"]["best"]["streaming"] and stages["sweep"]["best"]["resident"]
    row = stages["benchmark"]["records"][0]
    assert {"relu", "topk", "select", "pallas", "pallas GB/s", "bytes"} <= set(row)
    models = {(r["model"], r["act"]) for r in stages["train_steps"]["records"]}
    assert models == {("mlp", "relu"), ("mlp", "kwta")}
    assert (out / "log.txt").read_text().rstrip().endswith("== done: 0 mismatches")


def test_a_mismatch_is_recorded_and_fails_the_run(tmp_path, monkeypatch, capsys):
    stage = gpu_check.Stage("exactness", tmp_path, log=lambda m: None)
    x = jnp.arange(12.0).reshape(2, 6)

    def wrong(x, k, use_abs):
        y, th = gpu_check._reference(x, k, use_abs)
        return y.at[0, 0].set(1.0), th

    assert gpu_check._check_rows(stage, "wrong", wrong, x, 2) is False
    assert gpu_check._check_rows(stage, "right", gpu_check._reference, x, 2) is True
    assert stage.mismatches == ["wrong"]
    assert json.loads(stage.write()["mismatches"] and (tmp_path / "exactness.json").read_text())[
        "mismatches"
    ] == ["wrong"]
    monkeypatch.setattr(gpu_check, "run_checks", lambda *a, **k: 1)
    assert gpu_check.main(["--out", str(tmp_path / "o")]) == 1
    assert "FAILED: 1 mismatches" in capsys.readouterr().err
