"""Ctrl-C under the CLIs' policy (`kwta_jax.interrupts`): one line and exit status 130 at any
moment — during the imports, during the first XLA compilation, during a checkpoint save,
during attack.py — never a traceback, never a crash by signal, never an interrupt that is
swallowed while the run goes on. The policy itself is tested on its own first (no JAX)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_errors import SMALL, tree_hash
from test_faults import patched_cli as _patched

from kwta_jax import runs
from kwta_jax.checkpointing import RunCheckpoints

REPO = Path(__file__).resolve().parents[1]


def _assert_one_interrupted_line(proc_or_err, prog: str = "train.py") -> str:
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    for noise in ("Traceback", "KeyboardInterrupt", "Exception ignored", "Event loop is closed",
                  "cannot schedule new futures", "Fatal Python error"):  # fmt: skip
        assert noise not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: interrupted"), err[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------------
# The policy, without JAX (the module is loaded from its file: a stdlib-only leaf).
# --------------------------------------------------------------------------------------------

_POLICY = r"""
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("interrupts", sys.argv[1])
interrupts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interrupts)
interrupts.install(lambda signum: f"stopped by {signal.Signals(signum).name}")
mode = sys.argv[2]
print("ready", flush=True)
with interrupts.deferred():
    os.kill(os.getpid(), signal.SIGTERM if mode == "term" else signal.SIGINT)
    if mode == "twice":
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1.0)  # a save in progress: the first signal waits for its end
    print("section finished", flush=True)
print("after the section", flush=True)
time.sleep(5)
"""


@pytest.mark.parametrize(
    "mode, status, finished",
    [("once", 130, True), ("twice", 130, False), ("term", 143, True)],
    ids=["ctrl-c-waits-for-the-section", "second-ctrl-c-leaves-at-once", "sigterm"],
)
def test_the_policy_defers_to_the_end_of_a_section(mode, status, finished):
    path = REPO / "kwta_jax" / "interrupts.py"
    proc = subprocess.run([sys.executable, "-c", _POLICY, str(path), mode], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == status, proc.stderr
    assert ("section finished" in proc.stdout) == finished
    assert "after the section" not in proc.stdout  # it left at the end of the section
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    name = "SIGTERM" if mode == "term" else "SIGINT"
    assert lines == [f"stopped by {name}"], proc.stderr


# --------------------------------------------------------------------------------------------
# train.py and attack.py.
# --------------------------------------------------------------------------------------------

# SIGINT to this process inside the first XLA compilation (C++ on the main thread).
_CTRL_C_IN_FIRST_COMPILE = r"""
from jax._src import compiler
_compile = compiler.backend_compile_and_load
def backend_compile_and_load(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return _compile(*args, **kwargs)
compiler.backend_compile_and_load = backend_compile_and_load
"""

# SIGINT to this process as the first checkpoint save starts.
_CTRL_C_IN_FIRST_SAVE = r"""
from kwta_jax.checkpointing import RunCheckpoints
_save = RunCheckpoints.save
def save(self, step, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    return _save(self, step, *args, **kwargs)
RunCheckpoints.save = save
"""


def _sigint_blocked(pid: int) -> bool:
    """Whether process ``pid`` blocks SIGINT now (/proc/PID/status, SigBlk)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk"))
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def _interrupt_train_py(argv: list, when) -> tuple[subprocess.Popen, str]:
    """``python train.py ARGV``, SIGINT once ``when(proc)`` returns; ``(proc, stderr)``."""
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, argv)], cwd=REPO,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        when(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    return proc, err


def _imports_under_way(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not _sigint_blocked(proc.pid):  # train.py's first lines ran: imports under way
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)


@pytest.mark.slow
def test_ctrl_c_during_the_imports_is_held_until_the_policy_is_installed(tmp_path):
    out = tmp_path / "runs"
    _, err = _interrupt_train_py([*SMALL, "--out", out], _imports_under_way)
    assert "--resume" in _assert_one_interrupted_line(err)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.4, 1.5, 3.0])
def test_ctrl_c_at_any_moment_is_one_line_and_130(tmp_path, delay):
    """Wherever the signal lands (imports, JAX start-up, garbage collection callbacks, the
    first compilation, training, a save), the same line and status, and what was saved
    resumes."""
    out = tmp_path / "runs"
    argv = [*SMALL, "--epochs", "500", "--act", "relu", "--out", out]
    _, err = _interrupt_train_py(argv, lambda proc: time.sleep(delay))
    _assert_one_interrupted_line(err)
    run = out / "relu"
    if (run / "checkpoints").is_dir():  # what was saved is consistent and resumes
        with RunCheckpoints(run, read_only=True) as ckpt:
            steps = ckpt.steps()
        if steps:
            assert runs.check_resumable(run) == steps[-1]
            assert len((run / "metrics.jsonl").read_text().splitlines()) == steps[-1]


def _after_epoch_1(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if "epoch 1/50" in line:
            return


@pytest.mark.slow
def test_ctrl_c_after_an_epoch_says_how_to_resume(tmp_path):
    out = tmp_path / "runs"
    argv = [*SMALL, "--epochs", "50", "--act", "relu", "--out", out]
    _, err = _interrupt_train_py(argv, _after_epoch_1)
    assert "--resume" in _assert_one_interrupted_line(err)
    assert (out / "relu" / "checkpoints" / "1").is_dir()


@pytest.mark.slow
def test_ctrl_c_during_the_first_compilation_changes_nothing(run_copy):
    before = tree_hash(run_copy)
    argv = [*SMALL, "--epochs", "3", "--resume", "--out", run_copy]
    proc = _patched("train", _CTRL_C_IN_FIRST_COMPILE, argv)
    assert proc.returncode == 130, proc.stderr[-3000:]
    _assert_one_interrupted_line(proc)
    assert tree_hash(run_copy) == before


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_save_lets_it_finish(tmp_path):
    out = tmp_path / "runs"
    argv = [*SMALL, "--epochs", "3", "--act", "relu", "--out", out]
    proc = _patched("train", _CTRL_C_IN_FIRST_SAVE, argv)
    assert proc.returncode == 130, proc.stderr[-3000:]
    _assert_one_interrupted_line(proc)
    run = out / "relu"
    assert runs.check_resumable(run) == 1  # the save it interrupted is whole
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").open()] == [1]
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    assert not list(run.rglob("*.tmp-*")) and not list(out.rglob(".kwta-jax.lock"))


@pytest.mark.slow
def test_attack_py_ctrl_c_during_its_compilation_changes_nothing(run_copy):
    old = run_copy / "attack" / "results.json"
    old.parent.mkdir()
    old.write_text('{"old": true}\n')
    before = tree_hash(run_copy)
    argv = [run_copy, "--quick", "--n-examples", "32", "--attacks", "fgsm", "pgd", "--eps",
            "0.1", "--no-diagnostics", "--no-progress"]  # fmt: skip
    proc = _patched("attack", _CTRL_C_IN_FIRST_COMPILE, argv)
    assert proc.returncode == 130, proc.stderr[-3000:]
    _assert_one_interrupted_line(proc, "attack.py")
    assert tree_hash(run_copy) == before
