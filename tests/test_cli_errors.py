"""Bad input to train.py / attack.py: one ``error:`` line on stderr naming the problem, exit
code 2, and the run directory byte-identical before and after (hashed). Also the surprises of
issue 13 item 4: a shorter resume, a resume with no run, --overwrite and the old attack/
results, --keep-checkpoints, the times of a resumed finished run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import attack  # noqa: E402
import train  # noqa: E402
from kwta_jax import data, train_workflow  # noqa: E402
from kwta_jax.config import ConfigError, TrainConfig  # noqa: E402

SMALL = ["--max-train", "256", "--max-test", "128", "--batch-size", "64", "--eps", "0.1",
         "--no-progress"]  # fmt: skip


def tree_state(path: Path) -> dict[str, str]:
    """Every file and directory under ``path``, relative name -> mode and SHA-256 of its bytes
    (compare two with ``==``: pytest then names the entries that differ)."""
    state = {}
    for p in sorted(Path(path).rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "directory"
        state[str(p.relative_to(path))] = f"{stat.S_IMODE(p.lstat().st_mode):o} {digest}"
    return state


def tree_hash(path: Path) -> str:
    """SHA-256 of every file and directory under ``path``: names, modes and bytes."""
    return hashlib.sha256(repr(tree_state(path)).encode()).hexdigest()


@pytest.fixture
def finished(trained_runs) -> Path:
    """A finished 2-epoch ReLU + k-WTA run (conftest: trained once per session)."""
    return trained_runs


@pytest.fixture
def runs(run_copy) -> Path:
    return run_copy


def one_error_line(err: str, prog: str) -> str:
    """The one ``PROG: error:`` line of ``err`` (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train_error(capsys, out: Path, *argv) -> str:
    """train.py's error line for ``argv``, checking exit 2 and that ``out`` did not change."""
    before = tree_hash(out) if out.exists() else None
    capsys.readouterr()
    try:
        code = train.main([*SMALL, "--out", str(out), *argv])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert (tree_hash(out) if out.exists() else None) == before
    return one_error_line(capsys.readouterr().err, "train.py")


def _corrupt_checkpoints(run_dir: Path, steps=None) -> None:
    """Truncates the array files of the checkpoints ``steps`` (default: all)."""
    for step_dir in (run_dir / "checkpoints").iterdir():
        if steps is None or int(step_dir.name) in steps:
            for f in step_dir.glob("model/**/d/*"):
                f.write_bytes(f.read_bytes()[:10])


def test_resume_with_fewer_epochs_than_the_run_is_refused(capsys, runs):
    line = _train_error(capsys, runs, "--epochs", "1", "--resume")
    assert "started for 2 epochs" in line and "--epochs 1" in line


@pytest.mark.parametrize("other", [[], ["--lr", "0.01"]], ids=["same-options", "other-options"])
def test_resume_with_a_garbage_config_json_is_refused(capsys, runs, other):
    (runs / "kwta" / "config.json").write_text("{garbage")
    line = _train_error(capsys, runs, "--epochs", "2", "--resume", *other)
    assert "config.json is unreadable" in line or "configuration differs" in line
    if not other:
        assert "kwta/config.json is unreadable" in line


def test_resume_when_every_checkpoint_is_corrupt_is_refused_at_start_up(capsys, runs):
    _corrupt_checkpoints(runs / "kwta")
    line = _train_error(capsys, runs, "--epochs", "2", "--resume")
    assert "cannot resume" in line and "every checkpoint is corrupt" in line
    assert "Falling back" not in capsys.readouterr().out  # refused before any restore


def test_a_batch_larger_than_the_dataset_is_refused(capsys, tmp_path):
    out = tmp_path / "new"
    line = _train_error(capsys, out, "--epochs", "1", "--batch-size", "512", "--resume")
    assert "--batch-size 512 is larger than the 256 training examples" in line
    assert not out.exists()


def test_resume_without_a_run_is_reported(tmp_path):
    lines = []
    cfg = TrainConfig(epochs=1, batch_size=512, max_train=256, max_test=64)
    with pytest.raises(ConfigError):
        train_workflow.run_comparison(cfg, tmp_path / "none", resume=True, log=lines.append)
    assert any("holds no run" in line and "from scratch" in line for line in lines)


@pytest.mark.parametrize("eps", ["nan", "inf"])
def test_attack_rejects_non_finite_eps(capsys, runs, eps):
    before = tree_hash(runs)
    with pytest.raises(SystemExit) as e:
        attack.main([str(runs), "--eps", "0.1", eps])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err, "attack.py")
    assert "--eps values must be > 0 and finite" in line
    assert tree_hash(runs) == before and not (runs / "attack").exists()


def test_resuming_a_finished_run_keeps_its_files_and_reports_training_time(capsys, runs):
    config_before = (runs / "kwta" / "config.json").read_bytes()
    metrics_before = (runs / "kwta" / "metrics.jsonl").read_bytes()
    assert train.main([*SMALL, "--epochs", "2", "--out", str(runs), "--resume"]) == 0
    assert (runs / "kwta" / "config.json").read_bytes() == config_before
    assert (runs / "kwta" / "metrics.jsonl").read_bytes() == metrics_before
    summary = json.loads((runs / "summary.json").read_text())
    for act in ("relu", "kwta"):
        history = [json.loads(line) for line in (runs / act / "metrics.jsonl").open()]
        entry = summary["runs"][act]
        # "train s" is the epochs' training time, not the restore and re-evaluation.
        assert entry["train_seconds"] == pytest.approx(sum(h["train_seconds"] for h in history))
        # ms/step leaves out each epoch's first (compiling) step.
        assert all(h["step_ms"] * (256 // 64 - 1) < 1000 * h["train_seconds"] for h in history)


def test_overwrite_removes_the_old_results_and_keeps_n_checkpoints(runs):
    (runs / "attack").mkdir()
    (runs / "attack" / "results.json").write_text("{}")
    (runs / "relu" / "attack").mkdir()
    argv = [*SMALL, "--epochs", "2", "--out", str(runs), "--overwrite", "--keep-checkpoints", "1"]
    assert train.main(argv) == 0
    assert not (runs / "attack").exists() and not (runs / "relu" / "attack").exists()
    for act in ("relu", "kwta"):
        assert sorted(p.name for p in (runs / act / "checkpoints").iterdir()) == ["2"]


# --------------------------------------------------------------------------------------------
# In subprocesses: several devices, another user, signals.
# --------------------------------------------------------------------------------------------


def _cli(*argv, env=None, user: bool = False, timeout=180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *map(str, argv)]
    if user and os.geteuid() == 0:  # root writes anywhere: run as nobody
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_two_devices_is_refused_at_start_up(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "new"
    proc = _cli("train.py", *SMALL, "--batch-size", "127", "--out", out, env=env)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "train.py")
    assert "batch size 127 must be a multiple of the 2 devices" in line
    assert not out.exists()


@pytest.fixture
def read_only_runs(finished):
    """A copy of the finished runs that the test's CLIs (as nobody when run as root) cannot
    write, in a directory they can read."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the privileges")
    base = Path(tempfile.mkdtemp(prefix="kwta-ro-"))
    base.chmod(0o755)
    out = base / "runs"
    shutil.copytree(finished, out)
    for p in [out, *out.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    yield out
    for p in [out, *out.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    shutil.rmtree(base)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, where",
    [
        (["train.py", "--epochs", "2", "--resume"], ""),
        (["train.py", "--epochs", "2", "--overwrite"], ""),
        (["train.py", "--epochs", "1"], "fresh"),
        (["attack.py", "--quick"], ""),
    ],
    ids=["resume", "overwrite", "fresh-out", "attack-default-out"],
)
def test_read_only_directories_are_a_one_line_error(read_only_runs, argv, where):
    before = tree_hash(read_only_runs)
    cli, *rest = argv
    if cli == "train.py":
        out = read_only_runs / where if where else read_only_runs
        proc = _cli(cli, *SMALL, *rest, "--out", out, user=True)
    else:
        proc = _cli(cli, read_only_runs, *rest, user=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr, Path(cli).name)
    assert "read-only" in line or "Permission denied" in line
    assert tree_hash(read_only_runs) == before


@pytest.mark.slow
def test_a_truncated_checkpoint_falls_back_without_asyncio_tracebacks(runs):
    _corrupt_checkpoints(runs / "kwta", steps={2})
    proc = _cli("train.py", *SMALL, "--epochs", "2", "--act", "kwta", "--resume", "--out", runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert "never retrieved" not in proc.stderr
    assert "Falling back to an older checkpoint" in proc.stdout
    assert "resumed after epoch 1" in proc.stdout


# --------------------------------------------------------------------------------------------
# Issue 21: seeds, repeated attacks, a JAX platform that is not here, a missing dataset.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cli", ["train.py", "attack.py"])
@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999", "1.5"])
def test_bad_seeds_are_refused_before_anything(capsys, tmp_path, cli, seed):
    out = tmp_path / "runs"
    argv = [*SMALL, "--out", str(out)] if cli == "train.py" else [str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        (train if cli == "train.py" else attack).main([*argv, "--seed", seed])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err, cli)
    assert "--seed" in line and ("[0, 4294967295]" in line or "not an integer" in line)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_an_attack_named_twice_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        attack.main([str(tmp_path), "--attacks", "fgsm", "pgd", "fgsm"])
    assert e.value.code == 2
    assert "--attacks names fgsm more than once" in one_error_line(
        capsys.readouterr().err, "attack.py"
    )


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["train.py", "attack.py"])
def test_a_jax_platform_that_is_not_here_is_one_line(finished, tmp_path, cli):
    env = dict(os.environ, JAX_PLATFORMS="cuda")  # this machine's jaxlib has no CUDA
    out = tmp_path / "out"
    if cli == "train.py":
        proc = _cli(cli, *SMALL, "--epochs", "1", "--out", out, env=env)
    else:
        proc = _cli(cli, finished, "--quick", "--out", out, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr, cli)
    assert "JAX cannot start a backend (JAX_PLATFORMS='cuda')" in line
    assert len([x for x in proc.stderr.splitlines() if x.strip()]) == 1
    assert not out.exists()


@pytest.mark.parametrize("where", ["empty", "default"])
def test_a_missing_dataset_is_one_line_that_says_how(capsys, tmp_path, where):
    (tmp_path / "tfds").mkdir()
    argv = ["--data-dir", str(tmp_path / "tfds")] if where == "empty" else []
    if where == "default" and data._tfds_dir(None).joinpath("cifar10").exists():
        pytest.skip("cifar10 is prepared in this machine's tfds directory")
    out = tmp_path / "runs"
    capsys.readouterr()
    assert train.main([*SMALL, "--dataset", "cifar10", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "dataset 'cifar10' is not available offline" in lines[0]
    assert "(no cifar10/ folder there)" in lines[0] and "FileFormat" not in lines[0]
    assert "tfds.data_source('cifar10'" in lines[0] and "--data-dir" in lines[0]
    assert not out.exists()
