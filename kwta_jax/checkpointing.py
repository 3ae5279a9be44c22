"""Checkpoints with orbax-checkpoint: atomic, verified, resumable.

A checkpoint directory (``RUN_DIR/checkpoints``, see `kwta_jax.runs` for the rest of a run
directory) holds one orbax step per finished epoch ``N``, with three items::

    checkpoints/<N>/
        model          parameters and the other model state (BatchNorm statistics, dropout
                       RNG counters), as a flat {"000000": array, ...} dict
        train          optimizer state, step counter and PRNG key (same flat layout)
        meta           JSON: what the caller records (epoch, step, data position, ...), plus
                       the tree paths/shapes/dtypes of both items and their SHA-256 checksums

Why a flat dict of arrays: orbax then never has to rebuild NNX ``State`` or optax named
tuples; the tree structure comes from a freshly built template (the same code that trained
the model), and ``meta`` records every leaf's path, shape and dtype so a mismatch (changed
config or code) is reported clearly instead of silently mis-assigning arrays.

Atomicity: orbax writes each step to a temporary directory and renames it when complete, so
a process killed mid-save leaves only a ``*.orbax-checkpoint-tmp-*`` directory, which is not
a step and never replaces a finished one. Saving is synchronous (no background thread) so a
finished epoch's checkpoint is durable before the next epoch starts. A finalized step whose
files are damaged is caught on restore (read error or checksum mismatch): `restore_latest`
falls back to the newest good step and says so, and `quarantine` moves the bad step aside
(never deleting it) so new saves cannot collide with it. A save that fails (a full disk, a
file-size limit) is one `CheckpointError` naming the cause; its partial step is removed and the
finished steps stay as they were.

When one of orbax's concurrent reads or writes fails, orbax abandons the others and closes its
event loop; as they finish, asyncio and tensorstore report each of them ("Event loop is
closed", "Task exception was never retrieved", orbax's own error logs with tracebacks): noise
that looks like a crash around an error that is already reported. `RunCheckpoints` drops
exactly those reports while it is open (`quiet_abandoned_io`), and nothing else; the CLIs keep
the same filter for their whole process (reports can arrive after the manager closed).

This module knows nothing of models or training (it imports nothing from the project): it
stores two trees of arrays and a JSON dict per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "RunCheckpoints",
    "flatten_tree",
    "quiet_abandoned_io",
    "tree_checksum",
    "unflatten_tree",
]

CHECKPOINT_DIR = "checkpoints"
# After a failed read or write, how long `RunCheckpoints.close` lets orbax's abandoned
# operations finish (and report into the filters) before it removes the filters.
_SETTLE_SECONDS = 0.1
# An abandoned write can still create files (and their directories) in a failed step's
# temporary directory after it was removed, later on a loaded machine: `close` removes it
# again until it stays gone for one settle period, at most this many times.
_SETTLE_ROUNDS = 50


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt or does not match the model."""


# --------------------------------------------------------------------------------------------
# Flat array dicts.
# --------------------------------------------------------------------------------------------


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_spec(path, leaf) -> dict:
    """Path, shape and dtype of a leaf as stored (typed keys: their key data), JSON-friendly.
    ``leaf`` may be abstract (`jax.ShapeDtypeStruct`)."""
    is_key = _is_key(leaf)
    stored = jax.eval_shape(jax.random.key_data, leaf) if is_key else leaf
    spec = {"path": jax.tree_util.keystr(path), "shape": [int(d) for d in np.shape(stored)],
            "dtype": str(np.dtype(stored.dtype)), "prng_key": is_key}  # fmt: skip
    if is_key and isinstance(leaf, jax.Array):
        spec["prng_impl"] = str(jax.random.key_impl(leaf))
    return spec


def flatten_tree(tree) -> tuple[dict[str, np.ndarray], list[dict]]:
    """``(arrays, spec)``: leaves as host NumPy arrays keyed ``"000000", "000001", ...`` in
    tree order; typed PRNG keys become their ``uint32`` key data. ``spec`` lists each leaf's
    path, shape and dtype (JSON-friendly) for validation on restore."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, spec = {}, []
    for i, (path, leaf) in enumerate(leaves):
        value = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        arrays[f"{i:06d}"] = np.asarray(jax.device_get(value))
        spec.append(_leaf_spec(path, leaf))
    return arrays, spec


def unflatten_tree(template, arrays: dict[str, np.ndarray], spec: list[dict]):
    """Inverse of `flatten_tree`: the leaves of ``arrays`` in the structure of ``template``
    (concrete or abstract leaves), validated against the saved ``spec``.

    Raises `CheckpointError` if the number, paths, shapes or dtypes of the leaves differ.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    want = [_leaf_spec(path, leaf) for path, leaf in leaves]
    if len(arrays) != len(want) or len(spec) != len(want):
        raise CheckpointError(
            f"checkpoint holds {len(arrays)} arrays but the model/optimizer has {len(want)}; "
            "was it written with a different --model/--act/--optimizer or code version?"
        )
    out = []
    for i, (saved, w) in enumerate(zip(spec, want, strict=True)):
        value = np.asarray(arrays[f"{i:06d}"])
        got = (saved["path"], saved["shape"], saved["dtype"], list(value.shape), str(value.dtype))
        if got != (w["path"], w["shape"], w["dtype"], w["shape"], w["dtype"]):
            raise CheckpointError(
                f"checkpoint leaf {saved['path']} {tuple(value.shape)} {value.dtype} does not "
                f"match the model's {w['path']} {tuple(w['shape'])} {w['dtype']}; was it written "
                "with different options or code?"
            )
        if saved["prng_key"]:
            value = jax.random.wrap_key_data(value, impl=saved.get("prng_impl", "threefry2x32"))
        out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes (in key order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Manager.
# --------------------------------------------------------------------------------------------


class _ReadOnlyNotice(logging.Filter):
    """Drops orbax's "Given directory is read only" notice (and nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "directory is read only" not in record.getMessage()


class _AbandonedIoNotice(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" and orbax's error logs of the
    operations it abandoned after a failure (and nothing else)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" in message:
            return False
        return not (record.levelno >= logging.ERROR and "raised an exception" in message)


def _is_closed_loop_report(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _install_quiet_abandoned_io() -> Callable[[], None]:
    """Installs the filters of `quiet_abandoned_io`; returns the function that removes them
    (and restores the previous hook, unless someone replaced it since)."""
    notice, loggers = _AbandonedIoNotice(), [logging.getLogger(n) for n in ("asyncio", "absl")]
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_closed_loop_report(unraisable):
            previous(unraisable)

    for logger in loggers:
        logger.addFilter(notice)
    sys.unraisablehook = hook

    def remove() -> None:
        for logger in loggers:
            logger.removeFilter(notice)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous

    return remove


@contextlib.contextmanager
def quiet_abandoned_io(*, for_process: bool = False) -> Iterator[None]:
    """While open: drops the reports of orbax's abandoned reads and writes (see the module
    docstring) from `sys.unraisablehook` and the ``asyncio`` / ``absl`` loggers; every other
    report passes. ``for_process=True`` (for a CLI's ``__main__``, whose process ends inside
    the block): the filters stay to the end, also for the reports that arrive while the
    interpreter shuts down."""
    remove = _install_quiet_abandoned_io()
    try:
        yield
    finally:
        if not for_process:
            remove()


class RunCheckpoints:
    """The checkpoints of a run directory: an orbax `CheckpointManager` over
    ``run_dir/checkpoints`` with verified restore. Steps are epoch numbers (the checkpoint
    after epoch ``N`` is step ``N``). Use it as a context manager (it closes the manager and
    ends `quiet_abandoned_io`).
    """

    def __init__(self, run_dir, *, max_to_keep: int | None = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory {self.directory}.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            # Synchronous: a finished epoch is on disk before the next one starts.
            enable_async_checkpointing=False,
            # Leftovers of a killed save are harmless, but clean them on (re)start.
            cleanup_tmp_directories=not read_only,
        )
        # orbax logs (through absl) that a read-only directory is read-only: expected here.
        absl_logger, notice = logging.getLogger("absl"), _ReadOnlyNotice()
        if read_only:
            absl_logger.addFilter(notice)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, item_names=("model", "train", "meta"), options=options
            )
        finally:
            absl_logger.removeFilter(notice)
        self._failed: list[int] = []  # steps whose save failed
        self._abandoned = False  # whether orbax abandoned reads or writes (a failure)
        self._quiet = contextlib.ExitStack()
        self._quiet.enter_context(quiet_abandoned_io())

    def close(self) -> None:
        try:
            self._manager.close()
            if self._abandoned:  # a read or write failed: let orbax's abandoned ones report
                time.sleep(_SETTLE_SECONDS)  # (into the filters) before they are removed
            for _ in range(_SETTLE_ROUNDS):  # until a failed step's leftovers stay gone
                if not self._remove_partial():
                    break
                time.sleep(_SETTLE_SECONDS)
        finally:
            self._quiet.close()

    def _remove_partial(self) -> bool:
        """Removes the temporary directories of the saves that failed; whether it found any."""
        found = False
        for step in self._failed:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
                found = True
        return found

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def steps(self) -> list[int]:
        """Finalized steps on disk, ascending (partial/temporary saves are not listed)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, model_tree, train_tree, meta: dict) -> None:
        """Saves ``model_tree`` (params and model state), ``train_tree`` (optimizer state,
        step, key) and JSON ``meta`` as step ``step`` atomically."""
        import orbax.checkpoint as ocp

        if step in self.steps():
            raise CheckpointError(
                f"checkpoint step {step} already exists in {self.directory}; refusing to "
                "overwrite it."
            )
        model_arrays, model_spec = flatten_tree(model_tree)
        train_arrays, train_spec = flatten_tree(train_tree)
        meta = dict(meta)
        meta.update(
            model_spec=model_spec, train_spec=train_spec,
            model_sha256=tree_checksum(model_arrays), train_sha256=tree_checksum(train_arrays),
            saved_at=time.time(),
        )  # fmt: skip
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(model_arrays),
                    train=ocp.args.StandardSave(train_arrays),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
            # Free what the partial step took (a full disk) and keep the finished ones (again
            # at close: orbax's abandoned writes may still be finishing).
            self._failed.append(step)
            self._abandoned = True
            self._remove_partial()
            raise CheckpointError(
                f"cannot write checkpoint {step} in {self.directory}: {_cause(e)}"
            ) from None

    def _restore_step(self, step: int, items: tuple[str, ...]) -> dict:
        """Reads ``items`` of ``step`` and verifies their checksums; raises `CheckpointError`."""
        import orbax.checkpoint as ocp

        where = self.directory / str(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:  # noqa: BLE001 - any read failure means "unusable step"
            self._abandoned = True
            raise CheckpointError(f"checkpoint {where} is unreadable (meta: {_short(e)}).") from e
        missing = _missing_meta(meta, items)
        if missing:
            raise CheckpointError(f"checkpoint {where} has no valid meta item ({missing}).")
        out = {"meta": meta}
        for item in items:
            spec = meta[f"{item}_spec"]
            try:
                # Restore as host NumPy arrays of the recorded shapes/dtypes.
                target = {f"{i:06d}": np.zeros(s["shape"], np.dtype(s["dtype"]))
                          for i, s in enumerate(spec)}  # fmt: skip
                arrays = self._manager.restore(
                    step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
                )[item]
            except Exception as e:  # noqa: BLE001
                self._abandoned = True
                raise CheckpointError(
                    f"checkpoint {where} is corrupt or partial ({item}: {_short(e)})."
                ) from e
            arrays = {k: np.asarray(v) for k, v in arrays.items()}
            if tree_checksum(arrays) != meta[f"{item}_sha256"]:
                raise CheckpointError(
                    f"checkpoint {where} is corrupt: the {item} arrays do not match the "
                    "checksum recorded when they were saved."
                )
            out[item] = arrays
        return out

    def restore_latest(
        self, items: tuple[str, ...] = ("model", "train"), *, log=None
    ) -> tuple[int, dict, list[int]]:
        """Restores the newest step that reads back intact.

        Returns ``(step, {"meta": dict, item: arrays...}, bad_steps)`` where ``bad_steps`` are
        newer steps that failed verification (reported through ``log`` / a warning, once a
        good step is found). Raises `CheckpointError` (one line naming every step and why) if
        there is no step or none is good.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(
                f"no finished checkpoint in {self.directory} (a save interrupted before it "
                "completed leaves only a temporary directory, which is ignored)."
            )
        bad, errors = [], []
        for step in reversed(steps):
            try:
                restored = self._restore_step(step, items)
            except CheckpointError as e:
                bad.append(step)
                errors.append(str(e))
                continue
            for error in errors:
                msg = f"warning: {error} Falling back to an older checkpoint."
                (log or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
            return step, restored, bad
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: every step failed verification "
            f"({' '.join(errors)})"
        )

    def quarantine(self, step: int) -> Path:
        """Renames a bad step directory to ``<step>.corrupt-<time>`` (kept for inspection,
        no longer a step, so later saves never touch it). Returns the new path."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt-{int(time.time())}"
        os.replace(src, dst)
        self._manager.reload()
        return dst


def _missing_meta(meta, items: tuple[str, ...]) -> str:
    """What a restored meta item lacks for ``items`` ("" if nothing)."""
    if not isinstance(meta, dict):
        return f"a {type(meta).__name__}, not a JSON object"
    for item in items:
        if not isinstance(meta.get(f"{item}_spec"), list):
            return f"no {item}_spec"
        if not isinstance(meta.get(f"{item}_sha256"), str):
            return f"no {item}_sha256"
    return ""


def _cause(e: BaseException) -> str:
    """The cause of a failed write in one line: the OS error if there is one (tensorstore
    reports it as ``[os_error_code='28']`` inside a ValueError)."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.strerror:
            return f"{err.strerror} ({type(err).__name__})"
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
        return os.strerror(int(code.group(1)))
    return _short(e)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
