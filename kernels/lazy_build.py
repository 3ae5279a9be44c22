"""A content-keyed cache of shared libraries compiled at first use (the kernels' builds).

`cached_library` returns ``<cache>/<stem>-<hash>.so`` for a build whose inputs hash to
``<hash>`` (the caller passes the source bytes, flags, compiler version... never an absolute
path, so every clone of the repository shares one build), building it first when it is not
there or does not pass validation:

* the compiler writes a unique temporary file in the cache directory, which is renamed over
  the final name (`os.replace` is atomic): processes building at the same time each produce a
  complete library and readers never see a partial file;
* beside the library, ``<name>.sha256`` (also written atomically) holds its digest; a library
  whose digest does not match (truncated, damaged, or a build raced by another process) is
  rebuilt instead of loaded, so a bad cache entry never crashes the process that loads it;
* temporaries older than an hour (left by a killed build) are removed.

Cache directory: ``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["BuildError", "cache_dir", "cached_library", "digest_ok", "run_tool"]

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


def run_tool(cmd: Sequence[str], what: str) -> subprocess.CompletedProcess:
    """Runs ``cmd``; raises `BuildError` (naming ``what``) if it cannot start or fails."""
    try:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:  # missing binary, timeout, ...
        raise BuildError(f"could not run {what} `{shlex.join(cmd)}`: {e}") from e
    if result.returncode != 0:
        raise BuildError(
            f"{what} failed (exit {result.returncode}).\ncommand: {shlex.join(cmd)}\n"
            f"output (tail):\n{(result.stdout + result.stderr)[-_OUTPUT_TAIL:]}"
        )
    return result


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def digest_ok(path: Path) -> bool:
    """Whether ``path`` exists and matches the digest recorded beside it."""
    try:
        return _digest_path(path).read_text().strip() == _sha256(path)
    except OSError:
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temporaries(path: Path) -> None:
    for tmp in path.parent.glob(path.name.split("-")[0] + "-*.tmp"):
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
      key: every input of the build as bytes (source, flags, tool versions, target), never
        an absolute path of this checkout.
      build: writes the library to the path it is given; raises `BuildError` on failure.
      directory: cache directory (default `cache_dir`).

    Returns:
      The path of a complete library whose digest matches its ``.sha256`` file.

    Raises:
      BuildError: the build failed or the cache directory is not writable.
    """
    h = hashlib.sha256()
    for part in key:
        h.update(part)
        h.update(b"\0")
    path = (cache_dir() if directory is None else directory) / f"{stem}-{h.hexdigest()[:20]}.so"
    if digest_ok(path):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise BuildError(
            f"cannot write to the cache directory {path.parent}: {e}. "
            "Set KWTA_JAX_CACHE_DIR to a writable directory."
        ) from e
    try:
        build(Path(tmp))
        # mkstemp creates the file 0600: give the library the usual 0755 so that other users
        # of a shared cache can load it.
        os.chmod(tmp, 0o755)
        digest = _sha256(Path(tmp))
        os.replace(tmp, path)
        _atomic_write_text(_digest_path(path), digest + "\n")
    except OSError as e:
        raise BuildError(f"cannot write {path}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
