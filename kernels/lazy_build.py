"""A content-keyed, validated cache of shared libraries compiled at first use (the kernels).

`cached_library` returns ``<cache>/<stem>-<hash>.so`` for a build whose inputs hash to
``<hash>`` (`library_path`; the caller passes the source bytes, the command with placeholders
instead of paths, the tool versions... never an absolute path, so every clone of the repository
and every virtual environment with the same contents shares one build), building it first when
it is not there or does not pass validation. `load_library` loads it, validated again:

* the build writes a unique temporary file in the cache directory, which is renamed over the
  final name (`os.replace` is atomic): processes building at the same time each produce a
  complete library and readers never see a partial file;
* beside the library, ``<name>.so.sha256`` records its size and SHA-256 (`sidecar_path`),
  written atomically *before* the library is renamed into place. A library that does not match
  its record (`library_problem`: truncated, damaged, or without a record) is rebuilt by
  `cached_library` and never loaded by `load_library`, since loading a truncated shared library
  can kill the process (SIGBUS) instead of raising. If the rebuild fails too, the `BuildError`
  says both why the cached file was rejected and why the build failed;
* temporaries of the stem older than an hour (left by a killed build: SIGKILL skips the
  cleanup) are removed; younger ones may belong to a build still running.

Cache directory: ``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax`` (`cache_dir`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "BuildError",
    "cache_dir",
    "cached_library",
    "library_path",
    "library_problem",
    "load_library",
    "run_tool",
    "sidecar_path",
]

_TIMEOUT_S = 600
_OUTPUT_TAIL = 3000
_STALE_TMP_S = 3600.0


class BuildError(RuntimeError):
    """A build step failed; the message names the command and holds the tail of its output."""


def cache_dir() -> Path:
    """``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax``.

    Raises:
      BuildError: neither is set nor resolvable (no home directory).
    """
    env = os.environ.get("KWTA_JAX_CACHE_DIR")
    if env:
        return Path(env)
    try:
        return Path.home() / ".cache" / "kwta_jax"
    except RuntimeError as e:  # no HOME and no passwd entry for this uid
        raise BuildError(
            f"no cache directory ({e}). Set KWTA_JAX_CACHE_DIR to a writable directory."
        ) from e


def run_tool(cmd: Sequence[str], what: str, hint: str = "") -> subprocess.CompletedProcess:
    """Runs ``cmd``; raises `BuildError` if it cannot start or fails.

    The message names ``what``, holds the command and the tail of its output, and ends with
    ``hint`` (the way out, e.g. which variable picks another tool).
    """
    hint = f" {hint}" if hint else ""
    try:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:  # missing binary, timeout, ...
        raise BuildError(f"could not run {what} `{shlex.join(cmd)}`: {e}.{hint}") from e
    if result.returncode != 0:
        raise BuildError(
            f"{what} failed (exit {result.returncode}).{hint}\ncommand: {shlex.join(cmd)}\n"
            f"output (tail):\n{(result.stdout + result.stderr)[-_OUTPUT_TAIL:]}"
        )
    return result


def library_path(stem: str, key: Sequence[bytes], directory: Path | None = None) -> Path:
    """``<directory>/<stem>-<hash of key>.so``; ``directory`` defaults to `cache_dir`.

    Raises:
      BuildError: no ``directory`` and no cache directory (see `cache_dir`).
    """
    if "-" in stem:
        raise ValueError(f"library_path: stem must not contain '-'; got {stem!r}.")
    h = hashlib.sha256()
    for part in key:
        h.update(part)
        h.update(b"\0")
    return (cache_dir() if directory is None else directory) / f"{stem}-{h.hexdigest()[:20]}.so"


def sidecar_path(library: Path) -> Path:
    """Where the size and SHA-256 of ``library`` are recorded."""
    return library.with_name(library.name + ".sha256")


def _record(path: Path) -> str:
    """``"<size> <sha256>\\n"`` of a file: the content of its sidecar."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return f"{size} {h.hexdigest()}\n"


def library_problem(library: Path) -> str | None:
    """Why ``library`` must not be loaded, or ``None`` when it matches its recorded size and
    SHA-256 (a missing record, or a missing library, is a problem too)."""
    record = sidecar_path(library)
    try:
        expected = record.read_text()
    except FileNotFoundError:
        return f"{record.name} (its size and SHA-256) is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{record.name} is unreadable: {e}"
    try:
        actual = _record(library)
    except OSError as e:
        return f"{library.name} is unreadable: {e}"
    if actual != expected:
        return (
            f"{library.name} does not match {record.name} (size and SHA-256 "
            f"{actual.strip()!r}, recorded {expected.strip()!r}): truncated or damaged"
        )
    return None


def load_library(library: Path) -> ctypes.CDLL:
    """Loads ``library`` if it matches its record (checked here, just before the load: the
    file may have changed since it was built).

    Raises:
      BuildError: it does not match (it is not loaded), or the loader refused it.
    """
    problem = library_problem(library)
    if problem is not None:
        raise BuildError(f"not loading {library}: {problem}.")
    try:
        return ctypes.cdll.LoadLibrary(str(library))
    except OSError as e:
        raise BuildError(f"cannot load {library}: {e}") from e


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temporaries(directory: Path, stem: str) -> None:
    """Deletes the temporaries of ``stem`` (any key) older than an hour: builds that were killed."""
    for tmp in directory.glob(f"{stem}-*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink()
        except OSError:
            pass  # another process removed it, or it is not ours to remove


def cached_library(
    stem: str,
    key: Sequence[bytes],
    build: Callable[[Path], None],
    directory: Path | None = None,
) -> Path:
    """The library of ``stem`` for inputs ``key``, built with ``build(tmp_path)`` if needed.

    Args:
      stem: file-name prefix (no ``-``), e.g. ``"kwta_cuda"``.
      key: every input of the build as bytes (sources, the command with placeholders instead
        of paths, tool versions, target), never an absolute path of this checkout.
      build: writes the library to the path it is given; raises `BuildError` on failure.
      directory: cache directory (default `cache_dir`).

    Returns:
      The path of a complete library that matches its recorded size and SHA-256.

    Raises:
      BuildError: the build failed or the cache directory is not writable (the message also
        says why a cached library was rejected, if one was).
    """
    path = library_path(stem, key, directory)
    problem = library_problem(path)
    if problem is None:
        return path
    why = f"\n(the cached {path.name} was rejected first: {problem})" if path.exists() else ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent, stem)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise BuildError(
            f"cannot write to the cache directory {path.parent}: {e}. "
            f"Set KWTA_JAX_CACHE_DIR to a writable directory.{why}"
        ) from e
    try:
        build(Path(tmp))
        # mkstemp creates the file 0600 and a compiler keeps that mode (0711 once linked):
        # give the library the usual 0755 so that other users of a shared cache can load it.
        os.chmod(tmp, 0o755)
        # The record first: a library without a matching record is rebuilt, never loaded.
        _write_atomically(sidecar_path(path), _record(Path(tmp)))
        os.replace(tmp, path)
    except BuildError as e:
        raise BuildError(f"{e}{why}") from e
    except OSError as e:
        raise BuildError(
            f"cannot write {path}: {e}. Set KWTA_JAX_CACHE_DIR to a writable directory.{why}"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
