"""The fault catalogue (issue 21): every interrupt, fault and damaged input ends in one clear
line, and nothing is lost. `CATALOGUE` maps each case to the test that checks it (the tests
of signals, bad flags and multi-host runs live beside their subject; a test here checks that
every name in the catalogue exists). Where files are involved the run directory is hashed
before and after (`tree_hash`: names, modes, bytes).

The cases here: kill -9 during a checkpoint write, during the evaluation after training and
during attack.py's results write; a full disk (a real file-size limit, ``RLIMIT_FSIZE``, in
a subprocess, and an ENOSPC raised by the writer); two writers on one directory (the run
lock); a run directory whose ``checkpoints/`` is a file or whose ``config.json`` lost fields;
attack.py on a damaged ``config.json`` or checkpoint meta.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli_errors import SMALL, one_error_line, tree_hash, tree_state

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import attack  # noqa: E402
import train  # noqa: E402
from kwta_jax import runs  # noqa: E402
from kwta_jax.checkpointing import RunCheckpoints  # noqa: E402

# Issue 21's cases -> the tests that check them ("file::test"; parametrised tests by name).
# Cases 11, 18-21 (the kernel cache, gpu_check, NaN payloads) belong to the kernel and GPU
# work and are tested there.
CATALOGUE = {
    "1 Ctrl-C during the first XLA compile": [
        "test_signals.py::test_ctrl_c_during_the_first_compilation_changes_nothing",
        "test_signals.py::test_ctrl_c_at_any_moment_is_one_line_and_130",
    ],
    "2 Ctrl-C in the first second (gc callbacks)": [
        "test_signals.py::test_ctrl_c_at_any_moment_is_one_line_and_130",
    ],
    "3 Ctrl-C during the imports": [
        "test_signals.py::test_ctrl_c_during_the_imports_is_held_until_the_policy_is_installed",
    ],
    "4 Ctrl-C during a checkpoint save": [
        "test_signals.py::test_ctrl_c_during_a_checkpoint_save_lets_it_finish",
        "test_signals.py::test_the_policy_defers_to_the_end_of_a_section",
    ],
    "5 attack.py Ctrl-C": [
        "test_signals.py::test_attack_py_ctrl_c_during_its_compilation_changes_nothing",
    ],
    "6 disk full (train.py, --resume)": [
        "test_faults.py::test_a_full_disk_on_resume_is_one_line_and_changes_nothing",
        "test_faults.py::test_a_failed_write_keeps_the_previous_checkpoint_and_history",
    ],
    "7 two train.py on one --out": [
        "test_faults.py::test_two_train_py_on_one_out_leave_one_finished_run",
        "test_faults.py::test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over",
        "test_faults.py::test_overwrite_does_not_delete_results_attack_py_is_writing",
    ],
    "8 checkpoints/ replaced by a file": [
        "test_faults.py::test_resume_with_checkpoints_replaced_by_a_file_is_refused",
    ],
    "9 config.json missing fields, --resume --ratio 0.5": [
        "test_faults.py::test_resume_with_a_damaged_config_json_is_refused",
    ],
    "10 attack.py when a write fails": [
        "test_faults.py::test_attack_py_under_a_file_size_limit_leaves_only_whole_files",
    ],
    "12 attack.py on a damaged config.json or checkpoint meta": [
        "test_faults.py::test_attack_py_on_a_damaged_config_json_is_one_line",
        "test_faults.py::test_checkpoint_meta_without_checksums_is_one_line",
    ],
    "13 bad seeds": ["test_cli_errors.py::test_bad_seeds_are_refused_before_anything"],
    "14 --attacks fgsm fgsm": ["test_cli_errors.py::test_an_attack_named_twice_is_refused"],
    "15 --distributed: a missing or killed process": [
        "test_distributed.py::test_a_process_that_never_joins_is_named_in_one_line",
        "test_distributed.py::test_a_killed_process_is_named_and_the_run_resumes",
    ],
    "16 JAX_PLATFORMS=cuda without CUDA": [
        "test_cli_errors.py::test_a_jax_platform_that_is_not_here_is_one_line",
    ],
    "17 a missing dataset, an empty --data-dir": [
        "test_cli_errors.py::test_a_missing_dataset_is_one_line_that_says_how",
        "test_data.py::test_missing_tfds_dataset_says_how_to_get_it",
    ],
    "issue 19: RunCheckpoints, scoped hooks": [
        "test_checkpointing.py::test_run_checkpoints_quiets_abandoned_io_only_while_open",
    ],
    "kept: Ctrl-C after an epoch says how to resume": [
        "test_signals.py::test_ctrl_c_after_an_epoch_says_how_to_resume",
    ],
    "kept: kill -9 during a save, an evaluation, attack.py's write": [
        "test_faults.py::test_kill_9_during_a_checkpoint_write_keeps_the_previous_one",
        "test_faults.py::test_kill_9_during_evaluation_resumes_without_retraining",
        "test_faults.py::test_kill_9_while_attack_py_writes_leaves_the_old_results",
    ],
}


def test_the_catalogue_names_tests_that_exist():
    for case, tests in CATALOGUE.items():
        for test in tests:
            file, name = test.split("::")
            tree = ast.parse((REPO / "tests" / file).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{case}: {test} does not exist"


# Runs a CLI as `python CLI.py ARGV` does (its __main__ block), with a patch applied first (a
# hook that kills the process at the fault, or a resource limit).
_PATCHED_MAIN = r"""
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
{patch}
sys.argv = [{cli!r} + ".py", *{argv!r}]
runpy.run_path(os.path.join({repo!r}, {cli!r} + ".py"), run_name="__main__")
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
_replace = os.replace
def replace(src, dst):
    if str(dst).endswith("results.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst)
os.replace = replace
"""

# A file-size limit (ulimit -f): Python ignores SIGXFSZ, so a write past it fails (EFBIG).
_FILE_SIZE_LIMIT = r"""
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def patched_cli(cli: str, patch: str, argv: list) -> subprocess.CompletedProcess:
    """``CLI.main(argv)`` in a subprocess after ``patch`` (Python source) ran."""
    code = _PATCHED_MAIN.format(repo=str(REPO), patch=patch, cli=cli, argv=list(map(str, argv)))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=240)  # fmt: skip


def _steps(run_dir: Path) -> list[int]:
    with RunCheckpoints(run_dir, read_only=True) as ckpt:
        return ckpt.steps()


def _history(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]


def _main_error(capsys, main, argv, prog="train.py") -> str:
    """``main(argv)``'s one error line (exit status 2)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    return one_error_line(capsys.readouterr().err, prog)


# --------------------------------------------------------------------------------------------
# kill -9.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "runs"
    argv = [*SMALL, "--epochs", "2", "--act", "kwta", "--out", str(out)]
    killed = patched_cli("train", _KILL_AT_STEP_2_RENAME, argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = out / "kwta"
    assert _steps(run) == [1]  # the half-written step 2 is not a checkpoint
    assert runs.check_resumable(run) == 1
    assert train.main([*argv, "--resume"]) == 0
    assert _steps(run) == [1, 2] and _history(run) == [1, 2]


@pytest.mark.slow
def test_kill_9_during_evaluation_resumes_without_retraining(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = [*SMALL, "--epochs", "2", "--out", str(out)]
    killed = patched_cli("train", _KILL_IN_KWTA_EVALUATION, argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    metrics = {act: (out / act / "metrics.jsonl").read_bytes() for act in ("relu", "kwta")}
    capsys.readouterr()
    assert train.main([*argv, "--resume"]) == 0
    log = capsys.readouterr().out
    assert log.count("resumed after epoch 2") == 2 and " epoch 1/2" not in log  # no training
    assert {act: (out / act / "metrics.jsonl").read_bytes() for act in metrics} == metrics
    assert set(json.loads((out / "summary.json").read_text())["runs"]) == {"relu", "kwta"}


_ATTACK = ["--quick", "--n-examples", "32", "--attacks", "fgsm", "--eps", "0.1",
           "--no-diagnostics", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_kill_9_while_attack_py_writes_leaves_the_old_results(run_copy):
    results = run_copy / "attack" / "results.json"
    results.parent.mkdir()
    results.write_text('{"old": true}\n')
    killed = patched_cli("attack", _KILL_AT_RESULTS_RENAME, [run_copy, *_ATTACK])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads(results.read_text()) == {"old": True}  # the old file, whole


# --------------------------------------------------------------------------------------------
# A full disk.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_on_resume_is_one_line_and_changes_nothing(run_copy):
    """``ulimit -f 1000`` (1 MB per file; the MLP's parameters are 2.7 MB): the checkpoint of
    epoch 3 cannot be written. One line; config.json still says 2 epochs, the history and the
    checkpoints are as they were, the partial step is gone."""
    before = tree_state(run_copy)
    argv = [*SMALL, "--epochs", "3", "--resume", "--out", run_copy]
    proc = patched_cli("train", _FILE_SIZE_LIMIT.format(limit=1_000_000), argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, "train.py")
    assert "cannot write checkpoint 3" in line and "File too large" in line and "intact" in line
    assert len([x for x in proc.stderr.splitlines() if x.strip()]) == 1, proc.stderr[-3000:]
    assert tree_state(run_copy) == before


def test_a_failed_write_keeps_the_previous_checkpoint_and_history(run_copy, monkeypatch, capsys):
    """ENOSPC raised by the checkpoint writer half-way through epoch 3's save (after it made
    its temporary directory)."""
    save = RunCheckpoints.save

    def save_or_fill_the_disk(self, step, *args, **kwargs):
        if step == 3:
            (self.directory / "3.orbax-checkpoint-tmp-0").mkdir()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / "3"))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", save_or_fill_the_disk)
    run = run_copy / "relu"
    metrics = (run / "metrics.jsonl").read_bytes()
    argv = [*SMALL, "--act", "relu", "--epochs", "3", "--resume", "--out", run_copy]
    line = _main_error(capsys, train.main, argv)
    assert "No space left on device" in line and "intact" in line
    monkeypatch.undo()
    assert _steps(run) == [1, 2] and runs.check_resumable(run) == 2
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def _whole(path: Path) -> bool:
    """Whether a results file is complete (PNG to its IEND chunk, JSON and npz parse)."""
    if path.suffix == ".png":
        return path.read_bytes().endswith(b"IEND\xaeB`\x82")
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".npz":
        with np.load(path) as z:
            list(z.items())
    return True


@pytest.mark.slow
def test_attack_py_under_a_file_size_limit_leaves_only_whole_files(run_copy):
    """``ulimit -f 30`` (30 KB) on a second attack.py run over the same --out: one line, and
    every file there is the old one or the new one, whole."""
    out = run_copy / "attack"
    assert attack.main([str(run_copy), *_ATTACK]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"results.json", "accuracy_vs_eps.png", "examples_kwta.png"} <= set(old)
    argv = [run_copy, *_ATTACK, "--eps", "0.2"]
    proc = patched_cli("attack", _FILE_SIZE_LIMIT.format(limit=30_000), argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "File too large" in one_error_line(proc.stderr, "attack.py")
    assert sorted(p.name for p in out.iterdir()) == sorted(old)  # no temporary file left
    assert all(_whole(p) for p in out.iterdir())
    assert any(p.read_bytes() == old[p.name] for p in out.iterdir() if p.suffix == ".png")


# --------------------------------------------------------------------------------------------
# Two writers.
# --------------------------------------------------------------------------------------------

_HOLD_LOCK = r"""
import sys, time
sys.path.insert(0, {repo!r})
from kwta_jax import locking
with locking.exclusive(sys.argv[1], program="holder.py"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK.format(repo=str(REPO)), str(directory)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(run_copy, capsys):
    holder = _hold_lock(run_copy)
    try:
        before = tree_hash(run_copy)
        argv = [*SMALL, "--epochs", "3", "--resume", "--out", run_copy]
        line = _main_error(capsys, train.main, argv)
        assert f"in use by holder.py (pid {holder.pid} on" in line
        assert tree_hash(run_copy) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder leaves its lock file behind
        holder.wait()
    assert (run_copy / ".kwta-jax.lock").exists()
    assert train.main([*map(str, argv), "--act", "relu"]) == 0  # a stale lock: no obstacle
    assert _history(run_copy / "relu") == [1, 2, 3]
    assert not (run_copy / ".kwta-jax.lock").exists()  # released and removed on exit


@pytest.mark.slow
def test_overwrite_does_not_delete_results_attack_py_is_writing(run_copy, capsys):
    (run_copy / "attack").mkdir()
    holder = _hold_lock(run_copy / "attack")  # attack.py writing its results there
    try:
        before = tree_hash(run_copy)
        line = _main_error(capsys, train.main, [*SMALL, "--epochs", "1", "--overwrite",
                                                "--out", run_copy])  # fmt: skip
        assert "attack is in use by holder.py" in line
        assert tree_hash(run_copy) == before
        line = _main_error(capsys, attack.main, [run_copy, *_ATTACK], "attack.py")
        assert "in use by holder.py" in line
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_train_py_on_one_out_leave_one_finished_run(tmp_path):
    out = tmp_path / "runs"
    argv = [sys.executable, "train.py", *SMALL, "--epochs", "2", "--act", "relu", "--out", out]
    procs = [subprocess.Popen(list(map(str, argv)), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=240) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-2000:] for _, err in outputs]
    err = next(err for p, (_, err) in zip(procs, outputs, strict=True) if p.returncode == 2)
    line = one_error_line(err, "train.py")
    assert "in use by train.py" in line or "already holds a run" in line
    assert runs.check_resumable(out / "relu") == 2 and _history(out / "relu") == [1, 2]


# --------------------------------------------------------------------------------------------
# Damaged run directories.
# --------------------------------------------------------------------------------------------


def test_resume_with_checkpoints_replaced_by_a_file_is_refused(run_copy, capsys):
    ckpt = run_copy / "kwta" / "checkpoints"
    for p in sorted(ckpt.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    ckpt.rmdir()
    ckpt.write_text("not a directory\n")
    before = tree_hash(run_copy)
    line = _main_error(capsys, train.main, [*SMALL, "--epochs", "3", "--resume", "--out",
                                            run_copy])  # fmt: skip
    assert "checkpoints is not a directory" in line
    assert tree_hash(run_copy) == before  # metrics.jsonl (2 epochs of history) untouched


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: [c.pop("ratio"), c.pop("model_kwargs")], "lacks ratio, model_kwargs"),
        (lambda c: c.update(ratio="0.1"), "ratio '0.1' is not a number"),
        (lambda c: c.update(epochs=2.5), "epochs 2.5 is not an integer"),
        (lambda c: c.update(model_kwargs=[]), "model_kwargs [] is not a JSON object"),
    ],
    ids=["missing-fields", "ratio-string", "epochs-float", "model-kwargs-list"],
)
def test_resume_with_a_damaged_config_json_is_refused(run_copy, capsys, damage, message):
    path = run_copy / "kwta" / "config.json"
    config = json.loads(path.read_text())
    damage(config)
    path.write_text(json.dumps(config))
    before = tree_hash(run_copy)
    argv = [*SMALL, "--epochs", "3", "--resume", "--ratio", "0.5", "--out", run_copy]
    line = _main_error(capsys, train.main, argv)
    assert "config.json is damaged" in line and message in line
    assert tree_hash(run_copy) == before


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c.pop("model_kwargs"), "lacks model_kwargs"),
        (lambda c: c.pop("dataset"), "lacks dataset"),
        (lambda c: c.pop("model"), "lacks model"),
        (lambda c: c.update(model=5), "model 5 is not a string"),
        (lambda c: c.update(model_kwargs="oops"), "model_kwargs 'oops' is not a JSON object"),
        (lambda c: c.update(ratio="0.1"), "ratio '0.1' is not a number"),
        (lambda c: c.update(dataset="imagenet"), "unknown dataset 'imagenet'"),
        (lambda c: c.update(seed="zero"), "seed 'zero' is not an integer"),
        (lambda c: c["model_kwargs"].update(act="gelu"), "cannot be built"),
        (None, "a JSON list"),
    ],
    ids=["no-model-kwargs", "no-dataset", "no-model", "model-5", "model-kwargs-oops",
         "ratio-string", "imagenet", "seed-zero", "bad-model-kwargs", "json-list"],
)  # fmt: skip
def test_attack_py_on_a_damaged_config_json_is_one_line(run_copy, capsys, damage, message):
    run = run_copy / "kwta"
    config = json.loads((run / "config.json").read_text())
    config = [config] if damage is None else config
    if damage is not None:
        damage(config)
    (run / "config.json").write_text(json.dumps(config))
    before = tree_hash(run)
    line = _main_error(capsys, attack.main, [run, *_ATTACK], "attack.py")
    assert "config.json is damaged" in line and message in line
    assert tree_hash(run) == before


def test_checkpoint_meta_without_checksums_is_one_line(run_copy, capsys):
    run = run_copy / "kwta"
    for meta in run.glob("checkpoints/*/meta/metadata"):
        payload = json.loads(meta.read_text())
        del payload["model_sha256"]
        meta.write_text(json.dumps(payload))
    before = tree_hash(run_copy)
    line = _main_error(capsys, attack.main, [run, *_ATTACK], "attack.py")
    assert "no usable checkpoint" in line and "no model_sha256" in line
    line = _main_error(capsys, train.main, [*SMALL, "--epochs", "3", "--resume", "--out",
                                            run_copy])  # fmt: skip
    assert "every checkpoint is corrupt" in line and "no model_sha256" in line
    assert tree_hash(run_copy) == before
