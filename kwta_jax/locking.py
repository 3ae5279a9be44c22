"""An exclusive lock on a directory, for the processes that write into it.

`exclusive(directory)` takes ``fcntl.flock`` on ``directory/.kwta-jax.lock`` without waiting;
the file records who holds it (program, pid, host, start time) so that a second writer's error
names the holder. The kernel drops a ``flock`` when its process dies, however it dies, so a
lock file left by a killed process is stale by construction: the next writer takes it (and
the error never blames a dead process). On release the lock file is removed, and so are the
directories the lock had to create, if they are still empty: a writer that stops at start-up
leaves the directory as it found it (so does one that leaves through
`kwta_jax.interrupts.exit_now`: a Ctrl-C).

The same process may take the lock of a directory again while it holds it (nested calls: a
workflow that locks its output and calls another that locks the same one).

This module imports only `kwta_jax.interrupts` from the project.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kwta_jax import interrupts

__all__ = ["LOCK_NAME", "DirectoryLocked", "exclusive"]

LOCK_NAME = ".kwta-jax.lock"

_held: dict[str, int] = {}  # real path of a locked directory -> nesting depth (this process)


class DirectoryLocked(OSError):
    """Another process holds the directory's lock; ``holder`` describes it."""

    def __init__(self, directory: Path, holder: str):
        super().__init__(f"{directory} is in use by {holder}")
        self.directory, self.holder = directory, holder


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"{info['program']} (pid {info['pid']} on {info['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it holds the lock but has not written who it is yet


def _make_dirs(directory: Path) -> list[Path]:
    """Creates ``directory`` and its missing parents; returns those it created, deepest
    first."""
    missing = []
    d = directory.absolute()
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
    return missing


def _acquire(path: Path) -> int:
    """An fd holding ``flock`` on ``path`` (created if needed); raises `BlockingIOError` with
    the fd's description of the holder as its message."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            description = _describe(fd)
            os.close(fd)
            raise BlockingIOError(description) from None
        # The holder before us may have removed the file between our open and our flock:
        # then we locked an orphan and must lock the file that is there now.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def exclusive(directory, *, program: str | None = None) -> Iterator[Path]:
    """Holds the lock of ``directory`` (created if missing) for the ``with`` block.

    Args:
      directory: the directory the caller is about to write into.
      program: how the holder is named to a second writer (default: ``sys.argv[0]``'s name).

    Raises:
      DirectoryLocked: another process holds it (nothing was created or changed).
    """
    directory = Path(directory)
    key = os.path.realpath(directory)
    if key in _held:
        _held[key] += 1
        try:
            yield directory
        finally:
            _held[key] -= 1
        return
    created = _make_dirs(directory)
    path = directory / LOCK_NAME
    try:
        fd = _acquire(path)
    except BlockingIOError as e:
        _remove_empty(created)
        raise DirectoryLocked(directory, str(e)) from None
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1

    def release() -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it: the next writer locks a new file
        os.close(fd)
        _remove_empty(created)

    try:
        info = {"program": program or Path(sys.argv[0] or "python").name, "pid": os.getpid(),
                "host": socket.gethostname(), "since": time.time()}  # fmt: skip
        with contextlib.suppress(OSError):  # a full disk: the lock holds, unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        with interrupts.on_exit(release):
            yield directory
    finally:
        del _held[key]
        release()


def _remove_empty(created: list[Path]) -> None:
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return  # not empty (or gone): what is in it is someone's
