"""Multi-host: importing the package leaves JAX uninitialised (so `jax.distributed.initialize`
can still run), and ``train.py --distributed`` in two processes on localhost (CPU collectives
through gloo, one device each) trains what one process with two devices trains."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

_IMPORT_ALL = r"""
import importlib, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import kwta_jax, kwta_jax.attacks, kwta_jax.kernels
names = {"train", "attack"}
for pkg in (kwta_jax, kwta_jax.attacks, kwta_jax.kernels):
    names |= {m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")}
for name in sorted(names):
    importlib.import_module(name)
from jax._src import xla_bridge
assert not xla_bridge._backends, f"a JAX backend was initialised: {list(xla_bridge._backends)}"
import jax
# The proof: initialize must come before any backend; with one process it needs no peer.
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[2]}", num_processes=1,
                           process_id=0, initialization_timeout=30)
assert jax.process_count() == 1
jax.distributed.shutdown()
print("OK", len(names))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return dict(env, JAX_PLATFORMS="cpu", **extra)


def test_importing_every_module_starts_no_jax_backend():
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, str(REPO), str(_free_port())], cwd=REPO,
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")
    assert int(proc.stdout.split()[1]) > 30  # every module of the package was imported


_TRAIN = ["--epochs", "1", "--max-train", "256", "--max-test", "128", "--batch-size", "64",
          "--act", "kwta", "--eps", "0.1", "--no-progress"]  # fmt: skip


def _final_params(run_dir: Path) -> list[np.ndarray]:
    sys.path.insert(0, str(REPO))
    import jax
    from flax import nnx

    from kwta_jax.runs import load_trained_model

    model, _ = load_trained_model(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
    procs = _start_two(tmp_path / "two")
    one = subprocess.run(
        [sys.executable, "train.py", *_TRAIN, "--out", str(tmp_path / "one")], cwd=REPO,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    outputs = _finish(procs)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "on 2 cpu device(s)" in outputs[0][0] and "on 2 cpu device(s)" in one.stdout

    two_run, one_run = tmp_path / "two" / "kwta", tmp_path / "one" / "kwta"
    # Process 0 writes the run files, once.
    assert len((two_run / "metrics.jsonl").read_text().splitlines()) == 1
    two_m = json.loads((two_run / "metrics.jsonl").read_text())
    one_m = json.loads((one_run / "metrics.jsonl").read_text())
    for key in ("step", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert two_m[key] == pytest.approx(one_m[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(_final_params(two_run), _final_params(one_run), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["devices"] == 2

    # Both processes resume from the shared checkpoint and train one more epoch.
    outputs = _finish(_start_two(tmp_path / "two", "--resume", "--epochs", "2"))
    assert all("resumed after epoch 1" in out for out, _ in outputs)
    history = [json.loads(x) for x in (two_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == two_m


def _start_two(out: Path, *extra: str, command=("train.py", *_TRAIN)) -> list[subprocess.Popen]:
    """``command`` (default ``train.py``) as processes 0 and 1 of a 2-process cluster on
    localhost."""
    dist = ["--out", str(out), "--coordinator-address", f"127.0.0.1:{_free_port()}",
            "--num-processes", "2"]  # fmt: skip
    return [
        subprocess.Popen(
            [sys.executable, *command, *dist, *extra, "--process-id", str(i)],
            cwd=REPO,
            env=_env(JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    """Their ``(stdout, stderr)`` once both exit 0 (bounded: 240 s)."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240))
    finally:
        for p in procs:  # a process whose peer died waits for it: never leave one behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outputs


@pytest.mark.parametrize("script", ["train.py", "attack.py"])
def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path, script):
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORD"))}
    out = tmp_path / "runs"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a run to attack, as far as start-up sees
    args = _TRAIN if script == "train.py" else [str(tmp_path / "run"), "--quick"]
    proc = subprocess.run(
        [sys.executable, script, *args, "--distributed", "--out", str(out)], cwd=REPO,
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith(f"{script}: error:")]
    assert "--distributed" in line and "--coordinator-address" in line
    assert not out.exists()


_ATTACK = ["--attacks", "fgsm", "pgd", "fmn", "--quick", "--n-examples", "44", "--eps", "0.1",
           "0.3", "--batch-size", "16", "--no-diagnostics", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_two_processes_evaluate_like_one_process_with_two_devices(tmp_path):
    trained = subprocess.run(
        [sys.executable, "train.py", *_TRAIN, "--out", str(tmp_path / "run")], cwd=REPO,
        env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = str(tmp_path / "run")
    outputs = _finish(_start_two(tmp_path / "two", command=("attack.py", run, *_ATTACK)))
    one = subprocess.run(
        [sys.executable, "attack.py", run, *_ATTACK, "--out", str(tmp_path / "one")], cwd=REPO,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"), capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # Process 0 reports; process 1 computes its share and says nothing.
    assert "worst case" in outputs[0][0] and "worst case" not in outputs[1][0]
    two_json = json.loads((tmp_path / "two" / "results.json").read_text())
    one_json = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two_json["devices"] == one_json["devices"] == 2
    # Chunks, keys and random draws are those of one process with two devices: equal results.
    with np.load(tmp_path / "two" / "results_per_image.npz") as a:
        with np.load(tmp_path / "one" / "results_per_image.npz") as b:
            assert sorted(a) == sorted(b) and any("/robust/pgd/" in k for k in a)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    worst = [r["worst_case_accuracy"] for r in two_json["runs"]]
    assert worst == [r["worst_case_accuracy"] for r in one_json["runs"]]


# --------------------------------------------------------------------------------------------
# Faults: bounded waits, one line naming the process, a state that resumes.
# --------------------------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("[Gloo]")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_process_that_never_joins_is_named_in_one_line(tmp_path):
    """Process 0 without process 1, and process 1 without process 0 (two clusters): each
    waits --init-timeout seconds, not JAX's 5 minutes, then one line and status 2."""
    procs = {
        me: subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *_TRAIN,
                "--out",
                str(tmp_path / f"alone{me}"),
                "--coordinator-address",
                f"127.0.0.1:{_free_port()}",
                "--num-processes",
                "2",
                "--process-id",
                str(me),
                "--init-timeout",
                "3",
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for me in (0, 1)
    }
    try:
        errs = {me: p.communicate(timeout=120)[1] for me, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for me, p in procs.items():
        assert p.returncode == 2, errs[me][-3000:]
        line = _one_error_line(errs[me])
        missing = "process 1" if me == 0 else "process 0 (the coordinator at 127.0.0.1:"
        assert f"--distributed: {missing}" in line and "did not join within 3 s" in line
        assert not (tmp_path / f"alone{me}").exists()


@pytest.mark.slow
def test_a_killed_process_is_named_and_the_run_resumes(tmp_path):
    """kill -9 of process 1 while the checkpoint of epoch 2 is saved (or just after): process 0
    names it in one line within seconds (--peer-timeout 3), whether its save or its next
    collective failed first, and both processes started again with --resume finish."""
    out = tmp_path / "two"
    procs = _start_two(out, "--epochs", "8", "--peer-timeout", "3")
    ckpt = out / "kwta" / "checkpoints"
    try:
        deadline = time.monotonic() + 180
        while not (any(ckpt.glob("2.orbax-checkpoint-tmp*")) or (ckpt / "2").is_dir()):
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.002)
        procs[1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - t_kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 2, err[-3000:]
    line = _one_error_line(err)
    assert "process 1 of 2 stopped" in line and "--resume" in line
    assert waited < 30  # bounded by --peer-timeout (JAX alone: ~100 s, then SIGABRT)
    outputs = _finish(_start_two(out, "--epochs", "8", "--resume"))
    assert all("resumed after epoch" in o for o, _ in outputs)
    history = [json.loads(x) for x in (out / "kwta" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 9))
