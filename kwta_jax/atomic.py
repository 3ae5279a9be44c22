"""Files written whole or not at all: every file the CLIs write goes through here.

`atomic_path` hands the writer a temporary name beside the target (same directory, so the
rename cannot cross filesystems; same suffix, so writers that infer the format from it still
work: ``savefig``, ``np.savez``), and when the writer is done, syncs the data and renames it
over the target. A writer that fails — a full disk, a size limit (``ulimit -f``), a killed
process — leaves the old file as it was, and no temporary file behind (except after SIGKILL,
where the temporary name is recognisable: ``.<name>.tmp-<pid><suffix>``). A Ctrl-C under the
CLIs' policy waits for the rename (`kwta_jax.interrupts.deferred`).

`write_atomic` (text or bytes) and `write_json_atomic` are the common cases; a figure is
``with atomic_path(path) as tmp: fig.savefig(tmp)``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from kwta_jax.interrupts import deferred

__all__ = ["atomic_path", "write_atomic", "write_json_atomic"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yields a temporary path for the writer; on success renames it onto ``path`` (data and
    directory entry synced), on failure removes it and re-raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with deferred():
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # the rename itself durable (not on every fs)
            _fsync(path.parent)


def write_atomic(path, data: str | bytes) -> None:
    """Writes ``data`` (text as UTF-8, or bytes) to ``path`` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path, payload) -> None:
    """``payload`` as indented JSON (NumPy scalars as floats), through `write_atomic`."""
    write_atomic(path, json.dumps(payload, indent=2, default=float) + "\n")
