"""The run directory: what ``train.py`` writes and ``attack.py`` reads.

A run directory holds::

    config.json        the resolved TrainConfig fields, "model_kwargs" (the model's
                       `kwta_jax.models.ModelSpec`) and "kwta_jax_version"
    metrics.jsonl      one JSON line per finished epoch
    checkpoints/<N>/   orbax checkpoint after epoch N (`kwta_jax.checkpointing`): the model
                       item (parameters and other model state), the train item (optimizer
                       state, step counter, PRNG key) and meta (epoch, step, k-WTA ratio, data
                       position, config, metrics history, leaf specs and checksums)
    curves.png         learning curves (`kwta_jax.reports.plot_learning_curves`)

This module owns that layout: reading (checked) and writing (atomically) ``config.json`` and
``metrics.jsonl``, what to do with a directory that already holds a run (`check_run_dir`), the
lock of a directory being written (`locked`), saving and restoring a training state with its
meta, finding run directories (`find_run_dirs`) and rebuilding a trained model
(`load_trained_model`). It sits on `kwta_jax.models` and
`kwta_jax.checkpointing`; the training state is handled through its fields (``params``,
``rest``, ``step``, ``opt_state``, ``key``), so nothing here imports the training loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from kwta_jax import __version__, locking
from kwta_jax.atomic import write_atomic
from kwta_jax.checkpointing import (
    CHECKPOINT_DIR,
    CheckpointError,
    RunCheckpoints,
    unflatten_tree,
)
from kwta_jax.config import TrainConfig, config_from_saved
from kwta_jax.models import ModelSpec, build_model_from_config, split_model

__all__ = [
    "RUN_FILES",
    "RunDirError",
    "check_resumable",
    "check_run_dir",
    "check_writable",
    "clear_results",
    "clear_run_dir",
    "find_run_dirs",
    "load_trained_model",
    "locked",
    "make_run_config",
    "read_config",
    "restore_training_state",
    "save_training_state",
    "write_config",
    "write_metrics",
]

RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "checkpoints")
_logger = logging.getLogger(__name__)


class RunDirError(ValueError):
    """A run directory cannot be used as asked (existing run without --resume, config clash)."""


# --------------------------------------------------------------------------------------------
# config.json and metrics.jsonl.
# --------------------------------------------------------------------------------------------


def _recorded(config: dict) -> dict:
    """A config dict as ``config.json`` records it: a ReLU run has no winner ratio, so its
    ``"ratio"`` is null (as in ``summary.json``), whatever ``--ratio`` said."""
    return dict(config, ratio=None) if config.get("act") == "relu" else config


def make_run_config(config: TrainConfig, spec: ModelSpec) -> dict:
    """The ``config.json`` dict of a resolved ``config`` whose model is ``spec``."""
    return {**_recorded(config.to_dict()), "model_kwargs": spec.to_kwargs(),
            "kwta_jax_version": __version__}  # fmt: skip


# What attack.py needs of a run's config.json to rebuild its model and its test split.
_LOADABLE = ("dataset", "model", "model_kwargs")
# What --resume needs to check the options (every training option and the model).
_RESUMABLE = (*(f.name for f in dataclasses.fields(TrainConfig)), "model_kwargs")


def _config_problem(saved, required: Sequence[str]) -> str | None:
    """What makes a ``config.json`` dict unusable (``None``: nothing): a missing ``required``
    field, a field of the wrong type or against its rule, a model that cannot be built."""
    try:
        config_from_saved(saved, required=required)
    except ValueError as e:
        return str(e)
    kwargs = saved.get("model_kwargs")
    if "model_kwargs" in saved and not isinstance(kwargs, dict):
        return f"model_kwargs {kwargs!r} is not a JSON object"
    if "model" in saved and "model_kwargs" in saved:
        try:  # abstract: shapes only, no parameters computed
            build_model_from_config(saved, abstract=True)
        except (TypeError, ValueError, KeyError) as e:
            return f"model {saved['model']!r} with these model_kwargs cannot be built ({e})"
    return None


def read_config(run_dir) -> dict:
    """The ``config.json`` of a run directory, checked: it must describe a model and a
    dataset this version can rebuild (raises `CheckpointError` in one line otherwise)."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{path} not found: not a run directory written by train.py."
        raise CheckpointError(msg) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}).") from None
    problem = _config_problem(config, _LOADABLE)
    if problem:
        raise CheckpointError(
            f"{path} is damaged: {problem}. Restore it from a copy, or retrain the run."
        )
    return config


def write_config(run_dir: Path, run_config: dict) -> None:
    write_atomic(run_dir / "config.json", json.dumps(run_config, indent=2) + "\n")


def write_metrics(run_dir: Path, history: Sequence[dict]) -> None:
    """Rewrites ``metrics.jsonl`` with ``history`` (one line per epoch), atomically: a full
    disk leaves the previous history whole, never a half-appended line."""
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


@contextlib.contextmanager
def locked(directory) -> Iterator[Path]:
    """Holds the write lock of ``directory`` (`kwta_jax.locking.exclusive`) for the ``with``
    block; multi-host, process 0 holds it for all. Raises `RunDirError` naming the holder if
    another process writes there."""
    if jax.process_index() != 0:
        yield Path(directory)
        return
    try:
        with locking.exclusive(directory) as path:
            yield path
    except locking.DirectoryLocked as e:
        raise RunDirError(
            f"{e.directory} is in use by {e.holder}: wait for it to finish, or choose "
            "another --out."
        ) from None


# --------------------------------------------------------------------------------------------
# An existing run directory.
# --------------------------------------------------------------------------------------------


def _comparable(config: dict) -> dict:
    # Training longer (--epochs) on resume is allowed; everything else must match.
    ignore = {"epochs", "kwta_jax_version", "created_at"}
    return {k: v for k, v in config.items() if k not in ignore}


def _saved_config(run_dir: Path) -> dict | None:
    """The saved ``config.json`` of ``run_dir`` (``None`` if there is none); raises
    `RunDirError` if it cannot be read (resuming would overwrite it unchecked)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(
            f"cannot resume {run_dir}: {path} is unreadable ({type(e).__name__}), so its options "
            "cannot be checked; restore it or start over with --overwrite / another --out."
        ) from None
    problem = _config_problem(saved, _RESUMABLE)
    if problem:
        raise RunDirError(
            f"cannot resume {run_dir}: {path} is damaged ({problem}), so its options cannot be "
            "checked; restore it or start over with --overwrite / another --out."
        )
    return saved


def _config_changes(saved: dict, config: TrainConfig) -> str:
    """``"field: old -> new, ..."`` between a saved ``config.json`` and ``config``."""
    # ReLU runs written before "ratio" was recorded as null compare equal too.
    current, saved = _recorded(config.resolved().to_dict()), _recorded(saved)
    diff = sorted(k for k in _comparable(current) if k in saved and saved[k] != current[k])
    return ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in diff)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path) -> None:
    """Raises `RunDirError` unless ``path`` (or, if it does not exist yet, the directory it
    would be created in) can be written."""
    path = Path(path)
    target = _nearest_existing(path)
    if not target.is_dir():
        raise RunDirError(f"cannot write {path}: {target} is not a directory.")
    if not os.access(target, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write {path}: {target} is read-only (permission denied).")


def check_run_dir(run_dir, config: TrainConfig, *, resume: bool, overwrite: bool) -> str:
    """Decides what to do with ``run_dir`` before any work: ``"new"``, ``"resume"`` or
    ``"overwrite"``; changes nothing on disk.

    Raises `RunDirError` if ``run_dir`` (or the directories it would be made in, or its
    ``checkpoints/``) cannot be written; if it holds a run and neither flag is set; or if
    ``resume`` finds a run with a different configuration, an unreadable ``config.json``, or
    one made for more epochs than ``config.epochs`` (resuming trains longer, never shorter).
    """
    run_dir = Path(run_dir)
    check_writable(run_dir)
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if not existing:
        return "new"
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir():
        check_writable(checkpoints)
    if overwrite:
        return "overwrite"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise RunDirError(
            f"{checkpoints} is not a directory, so {run_dir} holds no checkpoint to resume; "
            "move it aside, or start over with --overwrite / another --out."
        )
    if not resume:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue "
            "it, --overwrite to start over, or choose another --out."
        )
    saved = _saved_config(run_dir)
    if saved is None:
        return "resume"
    changes = _config_changes(saved, config)
    if changes:
        raise RunDirError(
            f"cannot resume {run_dir}: its configuration differs ({changes}). Resume "
            "with the original options or use --overwrite / another --out."
        )
    if saved.get("epochs", 0) > config.epochs:
        raise RunDirError(
            f"cannot resume {run_dir} with --epochs {config.epochs}: it was started for "
            f"{saved['epochs']} epochs (resuming trains longer, never shorter; its checkpoints "
            "stay as they are). Pass --epochs >= that, or --overwrite / another --out."
        )
    return "resume"


def _remove_results(attack_dir: Path) -> None:
    """Removes an ``attack/`` directory, unless ``attack.py`` is writing it (`RunDirError`)."""
    if attack_dir.is_dir():
        with locked(attack_dir):
            shutil.rmtree(attack_dir)


def clear_run_dir(run_dir: Path) -> None:
    """Removes only the files a run writes, and the ``attack/`` results of its model (never
    other content of the directory)."""
    _remove_results(run_dir / "attack")
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def clear_results(out: Path) -> None:
    """Removes what ``train.py`` and ``attack.py`` wrote about the runs under ``out``
    (``out/summary.json`` and ``out/attack/``), before those runs are replaced."""
    _remove_results(out / "attack")
    (out / "summary.json").unlink(missing_ok=True)


def check_resumable(run_dir) -> int | None:
    """The epoch ``--resume`` would continue after (``None``: no finished checkpoint, a fresh
    start); reads the checkpoints without changing anything. Raises `RunDirError` if there are
    checkpoints but none reads back intact."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        return None
    try:
        with RunCheckpoints(run_dir, read_only=True) as ckpt:
            if not ckpt.steps():
                return None
            step, restored, _ = ckpt.restore_latest(log=lambda message: None)
            _check_training_meta(restored["meta"], ckpt.directory / str(step))
    except CheckpointError as e:
        raise RunDirError(
            f"cannot resume {run_dir}: every checkpoint is corrupt ({str(e).rstrip('.')}). "
            f"Move {run_dir / CHECKPOINT_DIR} aside or start over with --overwrite."
        ) from None
    return step


def find_run_dirs(path) -> list[Path]:
    """Run directories under ``path``: ``[path]`` if it holds a ``config.json``, else its
    sub-directories that do (sorted). Raises ``FileNotFoundError`` if there are none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist.")
    if (path / "config.json").is_file():
        return [path]
    runs = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
    if not runs:
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json and no sub-directory with one; pass a run "
            "directory written by train.py (e.g. runs/default/kwta) or its parent."
        )
    return runs


# --------------------------------------------------------------------------------------------
# Checkpoints of a training state.
# --------------------------------------------------------------------------------------------


def save_training_state(
    ckpt: RunCheckpoints, state, *, epoch: int, ratio: float, run_config: dict, history: list
) -> None:
    """Checkpoint after ``epoch`` (1-based) of a `kwta_jax.training.TrainState`: the model
    item is ``(params, rest)``, the train item ``(step, opt_state, key)``; the next epoch
    starts at batch 0 of epoch ``epoch``."""
    meta = {
        "epoch": epoch, "step": int(state.step), "kwta_ratio": ratio,
        "data_position": {"epoch": epoch, "batch": 0},
        "config": run_config, "history": history,
    }  # fmt: skip
    ckpt.save(epoch, (state.params, state.rest), (state.step, state.opt_state, state.key), meta)


def _check_training_meta(meta: dict, where: Path) -> None:
    """Raises `CheckpointError` unless ``meta`` holds what resuming reads besides the arrays."""
    try:
        epoch = meta["data_position"]["epoch"]
        ok = isinstance(epoch, int) and all(isinstance(h["epoch"], int) for h in meta["history"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {where} has no valid meta item (data position).")


def restore_training_state(
    ckpt: RunCheckpoints, state, *, log: Callable[[str], None]
) -> tuple[Any, int, list[dict]]:
    """The newest good checkpoint restored into the structure of ``state`` (a freshly built
    `kwta_jax.training.TrainState`). Corrupt newer steps are moved aside and reported.

    Returns ``(state, epochs_done, history)`` (the history of those epochs only).
    """
    step, restored, bad = ckpt.restore_latest(log=log)
    for corrupt in bad:
        if jax.process_index() == 0:  # multi-host: one process moves it (a shared directory)
            log(f"moved corrupt checkpoint aside: {ckpt.quarantine(corrupt)}")
    meta = restored["meta"]
    _check_training_meta(meta, ckpt.directory / str(step))
    params, rest = unflatten_tree((state.params, state.rest), restored["model"], meta["model_spec"])
    step, opt_state, key = unflatten_tree(
        (state.step, state.opt_state, state.key), restored["train"], meta["train_spec"]
    )
    state = state.replace(step=step, params=params, rest=rest, opt_state=opt_state, key=key)
    epochs_done = int(meta["data_position"]["epoch"])
    history = [h for h in meta["history"] if h["epoch"] <= epochs_done]
    return state, epochs_done, history


def load_trained_model(run_dir, *, log=None) -> tuple[nnx.Module, dict]:
    """Model of a run directory, restored from its newest good checkpoint, in eval mode.

    Args:
      run_dir: a directory written by train.py (``config.json`` and ``checkpoints/``).
      log: where to report skipped corrupt checkpoints (default: this module's logger, one
        line each).

    Returns:
      ``(model, config)``: the ``nnx.Module`` (``[B, H, W, C]`` float32 in [0, 1] ->
      ``[B, classes]``, eval mode, k-WTA ratio of the restored epoch) and the ``config.json``
      dict (``dataset``, ``model``, ``act``, ``ratio``, ``groups``, ``seed``, ``data_dir``, ...;
      ``"restored_epoch"`` and ``"kwta_ratio"`` are added).

    Raises:
      CheckpointError: no config, no good checkpoint, or a checkpoint that does not match.
    """
    config = read_config(run_dir)
    with RunCheckpoints(run_dir, read_only=True) as ckpt:
        step, restored, _ = ckpt.restore_latest(("model",), log=log or _logger.warning)
    meta = restored["meta"]
    # Abstract: no initialisation compute, the arrays come from the checkpoint.
    model = build_model_from_config(config, ratio=meta.get("kwta_ratio"), abstract=True)
    graphdef, params, rest = split_model(model)
    params, rest = unflatten_tree((params, rest), restored["model"], meta["model_spec"])
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    config = dict(config, restored_epoch=meta.get("epoch", step), kwta_ratio=meta.get("kwta_ratio"))
    return model, config
