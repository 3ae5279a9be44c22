"""Exact k-WTA thresholds on CPU through XLA FFI: the ``"cpu"`` selector.

The kernel (``kwta_cpu.cc`` and the headers next to it) only *selects*: it reads each row and
returns its exact k-th largest rank key. The op layer (`kwta_jax.ops`) applies the threshold
and differentiates it in plain XLA, which fuses with the neighbouring ops. It is plain C++17
against the XLA FFI headers that ship with jaxlib, so there is no build step at install time: it
is compiled **lazily at first use** with the system C++ compiler and cached. One build holds a
portable, an AVX2 and an AVX-512 version of the selection; the best one the CPU supports is
picked when it loads (`cpu_kernel_isa`).

Build and cache:

* compiler: ``$CXX`` (may hold arguments, e.g. ``"ccache g++"``) or ``c++``;
* flags: `FLAGS` plus ``-I<jax.ffi.include_dir()>``, plus ``$KWTA_JAX_CXXFLAGS`` if set;
* cache directory: ``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax``; the file name is a hash of
  *contents*, never of paths: the sources, the flags, the compiler's command and ``--version``,
  the jaxlib version and its FFI headers, and the architecture (with ``$KWTA_JAX_CXXFLAGS``
  set, also the CPU model and feature flags, since such flags are often machine-specific). So
  a new compiler, jaxlib, source or machine builds a new library, and every clone or virtual
  environment with the same ones shares it;
* the compiler writes a unique temporary file in the cache directory which is then renamed over
  the final name (`os.replace` is atomic), so processes building at the same time each produce a
  complete library and readers never see a partial file;
* next to the library, ``<name>.so.sha256`` records its size and SHA-256 (written before the
  library is renamed into place). A library is loaded only when it matches: a truncated or
  damaged file (loading one can kill the process with SIGBUS) is rebuilt, and if it cannot be
  rebuilt the kernel is off and `cpu_kernel_status` says why.

If no compiler works, `cpu_kernel_available` is False (`cpu_kernel_status` says why) and
``impl="auto"`` uses ``"select"``; asking for ``impl="cpu"`` explicitly raises
`CpuKernelUnavailable` with the compiler command and the tail of its output.
``KWTA_JAX_CPU_KERNEL=0`` disables the kernel (e.g. to time the fallback).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from kwta_jax.rank_keys import key_dtype

__all__ = [
    "FLAGS",
    "CpuKernelUnavailable",
    "build_library",
    "cpu_kernel_available",
    "cpu_kernel_isa",
    "cpu_kernel_status",
    "cpu_threshold_keys",
]

SOURCE = Path(__file__).with_name("kwta_cpu.cc")
# Everything the build reads from this package: the cache key hashes their contents.
HEADERS: tuple[Path, ...] = tuple(
    SOURCE.with_name(name) for name in ("kwta_select.h", "kwta_select_impl.h", "kwta_simd.h")
)
# Portable code generation (baseline x86-64 / aarch64): the kernel picks its AVX2 or AVX-512
# code at run time, so one cached library serves every machine of an architecture.
FLAGS: tuple[str, ...] = ("-O3", "-shared", "-fPIC", "-std=c++17")
# Instruction sets of the selection, in the kernel's order (its `isa` attribute).
ISAS: tuple[str, ...] = ("portable", "avx2", "avx512")
TARGET_NAME = "kwta_jax_kwta_cpu"
SUPPORTED_DTYPES = tuple(np.dtype(d) for d in (np.float16, jnp.bfloat16, np.float32, np.float64))
_COMPILE_TIMEOUT_S = 600
_STDERR_TAIL = 3000


class CpuKernelUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded (see the message for the command/output)."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax``.

    Raises:
      CpuKernelUnavailable: neither is set nor resolvable (no home directory).
    """
    env = os.environ.get("KWTA_JAX_CACHE_DIR")
    if env:
        return Path(env)
    try:
        return Path.home() / ".cache" / "kwta_jax"
    except RuntimeError as e:  # no HOME and no passwd entry for this uid
        raise CpuKernelUnavailable(
            f"kwta_cpu: no cache directory ({e}). Set KWTA_JAX_CACHE_DIR to a writable directory."
        ) from e


def compiler_command() -> list[str]:
    """The C++ compiler command: ``$CXX`` split like a shell would, or ``["c++"]``."""
    return shlex.split(os.environ.get("CXX") or "c++")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:  # missing binary, timeout, ...
        raise CpuKernelUnavailable(
            f"kwta_cpu: could not run the C++ compiler `{shlex.join(cmd)}`: {e}. Set CXX to a "
            "working C++17 compiler, or use impl='select'."
        ) from e


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get("KWTA_JAX_CXXFLAGS", ""))


def _compile_command(cxx: list[str], output: str | os.PathLike) -> list[str]:
    return [
        *cxx,
        *FLAGS,
        *_extra_flags(),
        f"-I{jax.ffi.include_dir()}",
        str(SOURCE),
        "-o",
        str(output),
    ]


def _cpu_identity() -> bytes:
    """CPU model and feature flags (Linux), for caches of machine-specific builds."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f if ln.startswith((b"model name", b"flags", b"Features"))]
        return b"".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode()


def _ffi_headers_digest() -> bytes:
    """SHA-256 of jaxlib's XLA FFI headers (their contents: the include path differs per venv)."""
    h = hashlib.sha256()
    root = Path(jax.ffi.include_dir())
    for header in sorted((root / "xla" / "ffi" / "api").glob("*.h")):
        h.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return h.digest()


def library_path(cxx: list[str] | None = None, directory: Path | None = None) -> Path:
    """Cache path of the library: a hash of everything that goes into it, by content.

    Sources, compiler command (with its flags) and ``--version``, jaxlib version and FFI headers,
    architecture (and the CPU with ``$KWTA_JAX_CXXFLAGS``). No path enters the key, so clones
    and virtual environments of the same versions share one build.
    """
    cxx = compiler_command() if cxx is None else cxx
    version = _run([*cxx, "--version"])
    if version.returncode != 0:
        raise CpuKernelUnavailable(
            f"kwta_cpu: `{shlex.join([*cxx, '--version'])}` failed "
            f"(exit {version.returncode}): {version.stderr[-_STDERR_TAIL:]}"
        )
    h = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in (SOURCE, *HEADERS)),
        shlex.join([*cxx, *FLAGS, *_extra_flags()]).encode(),
        version.stdout.encode(),
        jaxlib.__version__.encode(),
        _ffi_headers_digest(),
        platform.machine().encode(),
        _cpu_identity() if _extra_flags() else b"",
    ):
        h.update(part)
        h.update(b"\0")
    return (cache_dir() if directory is None else directory) / f"kwta_cpu-{h.hexdigest()[:20]}.so"


_STALE_TMP_S = 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Deletes temporary files of builds that were killed (SIGKILL skips their cleanup).

    Only files older than an hour: a younger one may belong to a build still running.
    """
    for tmp in path.parent.glob(path.stem + ".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink()
        except OSError:
            pass  # another process removed it, or it is not ours to remove


def _digest_line(library: Path) -> str:
    """``"<size> <sha256>"`` of a file, the content of its ``.sha256`` sidecar."""
    data = library.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def sidecar_path(library: Path) -> Path:
    """Where the size and SHA-256 of ``library`` are recorded."""
    return library.with_name(library.name + ".sha256")


def library_problem(library: Path) -> str | None:
    """Why the cached ``library`` must not be loaded, or ``None`` when it matches its record.

    Loading a truncated shared library can kill the process (SIGBUS) instead of raising, so
    every load is checked first: the file's size and SHA-256 against its sidecar.
    """
    record = sidecar_path(library)
    try:
        expected = record.read_text()
    except FileNotFoundError:
        return f"{record.name} (its size and SHA-256) is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{record.name} is unreadable: {e}"
    try:
        actual = _digest_line(library)
    except OSError as e:
        return f"{library.name} is unreadable: {e}"
    if actual != expected:
        return (
            f"{library.name} does not match {record.name} (size and SHA-256 "
            f"{actual.strip()!r}, recorded {expected.strip()!r}): truncated or damaged"
        )
    return None


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(cxx: list[str] | None = None, directory: Path | None = None) -> Path:
    """Compiles the kernel into the cache unless a valid build is there; returns its path.

    A cached library that does not match its size/SHA-256 record (truncated, damaged, or from
    an interrupted copy) is rebuilt. Safe to call from several threads or processes at once:
    each compiles into its own temporary file, records it, and atomically renames it.

    Raises:
      CpuKernelUnavailable: no compiler, the compilation failed (the message holds the command
        and the tail of the compiler's output), or the cache cannot be written (the message
        says why a cached library was rejected, if one was).
    """
    cxx = compiler_command() if cxx is None else cxx
    path = library_path(cxx, directory)
    rejected = library_problem(path) if path.exists() else None
    if path.exists() and rejected is None:
        return path
    why = f" (the cached library was rejected: {rejected})" if rejected else ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise CpuKernelUnavailable(
            f"kwta_cpu: cannot write to the cache directory {path.parent}: {e}{why}. "
            "Set KWTA_JAX_CACHE_DIR to a writable directory."
        ) from e
    try:
        cmd = _compile_command(cxx, tmp)
        try:
            result = _run(cmd)
        except CpuKernelUnavailable as e:
            raise CpuKernelUnavailable(f"{e}{why}") from e
        if result.returncode != 0:
            raise CpuKernelUnavailable(
                f"kwta_cpu: compiling the CPU kernel failed (exit {result.returncode}){why}.\n"
                f"command: {shlex.join(cmd)}\n"
                f"output (tail):\n{(result.stdout + result.stderr)[-_STDERR_TAIL:]}"
            )
        # mkstemp creates the file 0600 and the compiler keeps that mode (0711 once linked):
        # give the library the usual 0755 so that other users of a shared cache can load it.
        os.chmod(tmp, 0o755)
        # The record first: a library without a matching record is rebuilt, never loaded.
        _write_atomically(sidecar_path(path), _digest_line(Path(tmp)))
        os.replace(tmp, path)
    except OSError as e:
        raise CpuKernelUnavailable(
            f"kwta_cpu: cannot write the kernel into the cache directory {path.parent}: {e}{why}."
            " Set KWTA_JAX_CACHE_DIR to a writable directory."
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# Loaded library and registration state, set once per process (a failed build is not retried:
# it costs seconds, and the environment that made it fail does not change under a process).
_lock = threading.Lock()
_state: dict[str, object] = {}


def _ensure_registered() -> None:
    """Builds, checks, loads and registers the FFI target once; raises `CpuKernelUnavailable`."""
    with _lock:
        if "error" not in _state:
            try:
                if os.environ.get("KWTA_JAX_CPU_KERNEL", "1") == "0":
                    raise CpuKernelUnavailable("kwta_cpu: disabled by KWTA_JAX_CPU_KERNEL=0.")
                path = build_library()
                problem = library_problem(path)  # replaced since the build: check what we load
                if problem is not None:
                    raise CpuKernelUnavailable(f"kwta_cpu: not loading {path}: {problem}.")
                try:
                    lib = ctypes.cdll.LoadLibrary(str(path))
                    handler = lib.KwtaCpu
                    best_isa = lib.KwtaCpuBestIsa
                except OSError as e:
                    raise CpuKernelUnavailable(f"kwta_cpu: cannot load {path}: {e}") from e
                best_isa.restype = ctypes.c_int64
                jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(handler), platform="cpu")
                _state["lib"] = lib  # keep the library loaded for the life of the process
                _state["isa"] = ISAS[best_isa()]
                _state["error"] = None
            except CpuKernelUnavailable as e:
                _state["error"] = e
        if _state["error"] is not None:
            raise _state["error"]


def cpu_kernel_status() -> str | None:
    """``None`` when the CPU kernel is usable, else why not (builds it on first call)."""
    try:
        _ensure_registered()
    except CpuKernelUnavailable as e:
        return str(e)
    return None


def cpu_kernel_available() -> bool:
    """Whether the CPU kernel is built (compiling it on first call) and registered.

    Never raises: a missing or failing compiler gives False (`cpu_kernel_status` says why).
    """
    return cpu_kernel_status() is None


def cpu_kernel_isa() -> str | None:
    """The instruction set the kernel runs with here (one of `ISAS`), ``None`` if unavailable."""
    return _state.get("isa") if cpu_kernel_available() else None


def cpu_threshold_keys(
    x2d: jax.Array, k: int, use_abs: bool = False, *, isa: str | None = None
) -> jax.Array:
    """Exact k-th largest rank key of every row, with the FFI kernel (CPU backend only).

    A selector (see `kwta_jax.ops.IMPLEMENTATIONS`): it has no derivative rule, the op layer
    calls it on ``lax.stop_gradient`` values.

    Args:
      x2d: ``[..., n]`` float16, bfloat16, float32 or float64 array; every leading dim is a
        row (so a ``vmap`` of it is one call on the stacked input).
      k: ``1 <= k <= n``.
      use_abs: rank by ``|x|``.
      isa: force an instruction set (one of `ISAS`, e.g. to test each code path); the default
        is the best one the CPU supports.

    Returns:
      ``threshold_key`` of shape ``x2d.shape[:-1]`` in the unsigned key dtype of ``x2d``
      (`kwta_jax.rank_keys.key_dtype`), equal to
      ``lax.top_k(rank_keys(x2d, use_abs), k)[0][..., k - 1]``.

    Raises:
      TypeError: unsupported dtype. ValueError: ``k`` or ``isa`` out of range, or ``isa`` not
        supported by this CPU. CpuKernelUnavailable: the kernel cannot be built here (use
        ``impl="select"``).
    """
    dtype = np.dtype(x2d.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"cpu_threshold_keys: x must be float16, bfloat16, float32 or float64; got {dtype}."
        )
    if x2d.ndim < 1:
        raise ValueError(f"cpu_threshold_keys: x must have rank >= 1; got shape {x2d.shape}.")
    n = x2d.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"cpu_threshold_keys: k={k} must be in [1, n={n}].")
    if isa is not None and isa not in ISAS:
        raise ValueError(f"cpu_threshold_keys: isa must be one of {ISAS} or None; got {isa!r}.")
    _ensure_registered()
    if isa is not None and ISAS.index(isa) > ISAS.index(_state["isa"]):
        raise ValueError(
            f"cpu_threshold_keys: isa={isa!r} is not supported by this CPU "
            f"(it supports up to {_state['isa']!r})."
        )
    call = jax.ffi.ffi_call(
        TARGET_NAME,
        jax.ShapeDtypeStruct(x2d.shape[:-1], key_dtype(dtype)),
        # The handler treats every leading dim as a row, so a vmapped call is one call on the
        # stacked input (no loop).
        vmap_method="broadcast_all",
    )
    level = -1 if isa is None else ISAS.index(isa)
    return call(x2d, k=np.int64(k), use_abs=bool(use_abs), isa=np.int64(level))
