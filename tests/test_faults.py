"""Fault injection: kill -9 during a checkpoint write, during the evaluation after training and
during attack.py's results write; a full disk (ENOSPC, simulated in the writer: a size-limited
filesystem needs privileges). Each time the previous checkpoint stays intact and a resume
finishes the job; results.json is the old or the new file, never a truncated one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from kwta_jax import runs  # noqa: E402
from kwta_jax.checkpointing import Checkpointer  # noqa: E402

SMALL = ["--max-train", "256", "--max-test", "128", "--batch-size", "64", "--eps", "0.1",
         "--no-progress", "--epochs", "2"]  # fmt: skip

# Runs train.py's main with a hook patched in (the hook kills the process at the fault).
_PATCHED_MAIN = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
{patch}
import train
sys.exit(train.main({argv!r}))
"""

_KILL_AT_STEP_2_RENAME = r"""
from orbax.checkpoint._src.path import async_path
_rename = async_path.rename
async def rename(src, dst):
    if str(dst).endswith("/checkpoints/2"):  # step 2 is written, not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return await _rename(src, dst)
async_path.rename = rename
"""

_KILL_IN_KWTA_EVALUATION = r"""
from kwta_jax import train_workflow
_fgsm = train_workflow.fgsm_comparison
calls = []
def fgsm_comparison(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the k-WTA model's evaluation, after both runs trained
        os.kill(os.getpid(), signal.SIGKILL)
    return _fgsm(*args, **kwargs)
train_workflow.fgsm_comparison = fgsm_comparison
"""

_KILL_AT_RESULTS_RENAME = r"""
import os as _os
_replace = _os.replace
def replace(src, dst):
    if str(dst).endswith("results.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst)
_os.replace = replace
"""


def _run(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _patched_train(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    return _run(_PATCHED_MAIN.format(repo=str(REPO), patch=patch, argv=argv))


def _steps(run_dir: Path) -> list[int]:
    with Checkpointer(run_dir, read_only=True) as ckpt:
        return ckpt.steps()


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "runs"
    argv = [*SMALL, "--act", "kwta", "--out", str(out)]
    killed = _patched_train(_KILL_AT_STEP_2_RENAME, argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = out / "kwta"
    assert _steps(run) == [1]  # the half-written step 2 is not a checkpoint
    assert runs.check_resumable(run) == 1
    assert train.main([*argv, "--resume"]) == 0
    assert _steps(run) == [1, 2]
    history = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [h["epoch"] for h in history] == [1, 2]


@pytest.mark.slow
def test_kill_9_during_evaluation_resumes_without_retraining(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = [*SMALL, "--out", str(out)]
    killed = _patched_train(_KILL_IN_KWTA_EVALUATION, argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    metrics = {act: (out / act / "metrics.jsonl").read_bytes() for act in ("relu", "kwta")}
    capsys.readouterr()
    assert train.main([*argv, "--resume"]) == 0
    log = capsys.readouterr().out
    assert log.count("resumed after epoch 2") == 2 and " epoch 1/2" not in log  # no training
    assert {act: (out / act / "metrics.jsonl").read_bytes() for act in metrics} == metrics
    assert set(json.loads((out / "summary.json").read_text())["runs"]) == {"relu", "kwta"}


@pytest.mark.slow
def test_kill_9_while_attack_py_writes_leaves_the_old_results(tmp_path):
    out = tmp_path / "runs"
    assert train.main([*SMALL, "--act", "kwta", "--out", str(out)]) == 0
    results = out / "attack" / "results.json"
    results.parent.mkdir()
    results.write_text('{"old": true}\n')
    code = (
        f"import os, signal, sys\nsys.path.insert(0, {str(REPO)!r})\n{_KILL_AT_RESULTS_RENAME}\n"
        f"import attack\nsys.exit(attack.main([{str(out)!r}, '--quick', '--n-examples', '32',"
        " '--attacks', 'fgsm', '--eps', '0.1', '--no-diagnostics', '--no-progress']))"
    )
    killed = _run(code)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads(results.read_text()) == {"old": True}  # the old file, whole


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "runs"
    save = Checkpointer.save

    def save_or_fill_the_disk(self, step, *args, **kwargs):
        if step == 2:  # the writer hits ENOSPC half-way through epoch 2's checkpoint
            (self.directory / "2.orbax-checkpoint-tmp-0").mkdir()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / "2"))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save_or_fill_the_disk)
    capsys.readouterr()
    assert train.main([*SMALL, "--act", "relu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("train.py: error:"))
    assert "No space left on device" in line and "intact" in line
    monkeypatch.undo()
    assert _steps(out / "relu") == [1] and runs.check_resumable(out / "relu") == 1
