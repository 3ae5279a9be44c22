"""Checkpoints: flat-tree round trip, verified restore, corrupt/partial steps, resume that is
bit-identical to an uninterrupted run (in-process and after SIGKILL of a subprocess)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kwta_jax import data
from kwta_jax.checkpointing import (
    CheckpointError,
    RunCheckpoints,
    flatten_tree,
    unflatten_tree,
)
from kwta_jax.runs import load_trained_model
from kwta_jax.train_workflow import train_and_evaluate
from kwta_jax.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "layers": [jnp.arange(5, dtype=jnp.int32), jnp.zeros((), jnp.float32)],
        "key": jax.random.key(seed),
    }


def test_flatten_roundtrip_keeps_values_dtypes_and_prng_keys():
    tree = _tree(1)
    arrays, spec = flatten_tree(tree)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    assert [s["prng_key"] for s in spec].count(True) == 1
    back = unflatten_tree(jax.tree.map(jnp.zeros_like, _tree(0)), arrays, spec)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype
    np.testing.assert_array_equal(back["w"], tree["w"])
    np.testing.assert_array_equal(
        jax.random.key_data(back["key"]), jax.random.key_data(tree["key"])
    )
    # Abstract templates work too (load_trained_model builds no real model).
    abstract = jax.eval_shape(lambda: _tree(0))
    np.testing.assert_array_equal(unflatten_tree(abstract, arrays, spec)["layers"][0], np.arange(5))


def test_unflatten_rejects_a_different_model():
    arrays, spec = flatten_tree(_tree())
    other = dict(_tree(), w=jnp.zeros((4, 4)))
    with pytest.raises(CheckpointError, match="does not match"):
        unflatten_tree(other, arrays, spec)
    with pytest.raises(CheckpointError, match="holds 4 arrays but the model/optimizer has 5"):
        unflatten_tree(dict(_tree(), extra=jnp.ones(2)), arrays, spec)


def _corrupt(step_dir: Path, item: str = "model") -> None:
    """Overwrites every data file of ``item`` with garbage of the same size."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(os.urandom(max(p.stat().st_size, 8)))


def test_checkpointer_save_restore_and_refuses_to_overwrite(tmp_path):
    with RunCheckpoints(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _tree(step), {"s": jnp.int32(step)}, {"epoch": step})
        with pytest.raises(CheckpointError, match="refusing to overwrite"):
            ckpt.save(2, _tree(9), {"s": jnp.int32(9)}, {"epoch": 9})
        step, restored, bad = ckpt.restore_latest()
    assert step == 2 and bad == [] and restored["meta"]["epoch"] == 2
    back = unflatten_tree(_tree(0), restored["model"], restored["meta"]["model_spec"])
    np.testing.assert_array_equal(back["w"], _tree(2)["w"])


def test_corrupt_latest_falls_back_and_partial_saves_are_ignored(tmp_path):
    with RunCheckpoints(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _tree(step), {"s": jnp.int32(step)}, {"epoch": step})
    # A save killed half-way leaves a temporary directory: not a step.
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123").mkdir()
    _corrupt(tmp_path / "checkpoints" / "2")
    messages = []
    with RunCheckpoints(tmp_path, read_only=True) as ckpt:
        assert ckpt.steps() == [1, 2]
        step, restored, bad = ckpt.restore_latest(log=messages.append)
    assert step == 1 and bad == [2] and restored["meta"]["epoch"] == 1
    assert "checkpoints/2" in messages[0] and "corrupt" in messages[0]
    # The good step is untouched; quarantining the bad one keeps it on disk.
    with RunCheckpoints(tmp_path) as ckpt:
        moved = ckpt.quarantine(2)
        assert moved.exists() and ckpt.steps() == [1]
        _corrupt(tmp_path / "checkpoints" / "1", "train")
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            ckpt.restore_latest(log=lambda m: None)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    big = {"w": jnp.arange(4096, dtype=jnp.float32)}
    with RunCheckpoints(tmp_path) as ckpt:
        ckpt.save(1, big, {"s": jnp.int32(1)}, {"epoch": 1})
    files = sorted(
        (tmp_path / "checkpoints" / "1" / "model").rglob("*"), key=lambda p: -p.stat().st_size
    )
    target = next(p for p in files if p.is_file())
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with RunCheckpoints(tmp_path, read_only=True) as ckpt, pytest.raises(CheckpointError):
        ckpt.restore_latest(log=lambda m: None)


def test_load_trained_model_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_trained_model(tmp_path)


# --------------------------------------------------------------------------------------------
# Resume.
# --------------------------------------------------------------------------------------------

TINY = dict(epochs=3, batch_size=32, max_train=256, max_test=64)


@pytest.fixture(scope="module")
def tiny_data():
    return data.load_dataset("mnist5k", max_train=256, max_test=64)


def _final(run_dir):
    with RunCheckpoints(run_dir, read_only=True) as ckpt:
        step, restored, bad = ckpt.restore_latest(("model", "train"))
    assert not bad
    return step, restored


def _assert_identical(run_a, run_b):
    (sa, a), (sb, b) = _final(run_a), _final(run_b)
    assert sa == sb
    for item in ("model", "train"):
        assert a["meta"][f"{item}_sha256"] == b["meta"][f"{item}_sha256"]
        for k in a[item]:
            np.testing.assert_array_equal(a[item][k], b[item][k])
    losses = lambda r: [h["train_loss"] for h in r["meta"]["history"]]  # noqa: E731
    assert losses(a) == losses(b)


def test_resume_is_bit_identical_and_survives_a_corrupt_latest_step(tmp_path, tiny_data):
    cfg = TrainConfig(act="relu", **TINY)
    kw = dict(dataset=tiny_data, progress=False, log=lambda m: None)
    full = train_and_evaluate(cfg, tmp_path / "full", **kw)
    part = train_and_evaluate(cfg, tmp_path / "part", stop_after_epochs=2, **kw)
    assert len(part.history) == 2
    _corrupt(tmp_path / "part" / "checkpoints" / "2")  # resume must fall back to epoch 1
    logs = []
    resumed = train_and_evaluate(cfg, tmp_path / "part", resume=True, dataset=tiny_data,
                                 progress=False, log=logs.append)  # fmt: skip
    assert resumed.resumed_from == 1
    assert any("moved corrupt checkpoint aside" in m for m in logs)
    assert list((tmp_path / "part" / "checkpoints").glob("2.corrupt-*"))
    _assert_identical(tmp_path / "full", tmp_path / "part")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rewritten from the checkpoint's history, no duplicates
    x = tiny_data.test_images[:8]
    np.testing.assert_array_equal(full.model(x), resumed.model(x))


_KILL_SCRIPT = """
import sys
from kwta_jax.training import TrainConfig
from kwta_jax.train_workflow import train_and_evaluate
cfg = TrainConfig(act="kwta", epochs=5, batch_size=32, max_train=384, max_test=32)
train_and_evaluate(cfg, sys.argv[1], resume=True, progress=False)
"""


def _spawn(run_dir, cache_dir):
    # A persistent compilation cache lets the resumed process skip recompiling (same
    # executables, so no effect on the numbers).
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(run_dir)], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path):
    victim = _spawn(tmp_path / "killed", tmp_path / "cache")
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpt_dir / "2").is_dir():
        assert victim.poll() is None, victim.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    steps_at_kill = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert victim.returncode == -signal.SIGKILL and max(steps_at_kill) < 5  # really mid-run
    # Both start after the kill, so they reuse the victim's compilations from the cache.
    resumed = _spawn(tmp_path / "killed", tmp_path / "cache")
    reference = _spawn(tmp_path / "ref", tmp_path / "cache")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert reference.wait(timeout=180) == 0, reference.stderr.read()
    _assert_identical(tmp_path / "ref", tmp_path / "killed")


def test_run_checkpoints_quiets_abandoned_io_only_while_open(tmp_path):
    """Issue 19: the filters for orbax's abandoned reads and writes ("Event loop is closed"
    through `sys.unraisablehook`, asyncio's "never retrieved", orbax's error logs) are scoped
    to an open `RunCheckpoints`; every other report passes, and nothing stays installed."""
    seen = []
    hook = seen.append
    previous = sys.unraisablehook
    sys.unraisablehook = hook
    try:
        closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
        other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
        filters = {n: list(logging.getLogger(n).filters) for n in ("asyncio", "absl")}
        with RunCheckpoints(tmp_path):
            sys.unraisablehook(closed)
            sys.unraisablehook(other)
            record = logging.makeLogRecord({"msg": "Task exception was never retrieved"})
            assert not all(f.filter(record) for f in logging.getLogger("asyncio").filters)
        assert seen == [other]
        assert sys.unraisablehook is hook  # restored
        assert {n: list(logging.getLogger(n).filters) for n in filters} == filters
        sys.unraisablehook(closed)  # once closed, reported again
        assert seen == [other, closed]
    finally:
        sys.unraisablehook = previous
