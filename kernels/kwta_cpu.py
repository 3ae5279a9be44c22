"""Exact k-WTA rows on CPU through XLA FFI: the ``"cpu"`` row implementation.

The kernel (``kwta_cpu.cc``, next to this file) is a two-pass radix select per row fused with
the mask; see the comment at its top. It is plain C++17 against the XLA FFI headers that ship
with jaxlib, so there is no build step at install time: it is compiled **lazily at first use**
with the system C++ compiler and cached.

Build and cache:

* compiler: ``$CXX`` (may hold arguments, e.g. ``"ccache g++"``) or ``c++``;
* flags: `FLAGS` plus ``-I<jax.ffi.include_dir()>``, plus ``$KWTA_JAX_CXXFLAGS`` if set (e.g.
  ``-march=native``: about 12% faster on an AVX-512 machine, see docs/benchmarks.md; the
  default build is portable so that one cache can serve different machines);
* cache directory: ``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax``; the file name is a hash
  of the source, the command and flags, the compiler's ``--version``, the jaxlib version and
  the architecture (with ``$KWTA_JAX_CXXFLAGS`` set, also the CPU model and feature flags,
  since such flags are often machine-specific), so a new compiler, jaxlib, source or machine
  builds a new library and never loads a stale one;
* the compiler writes a unique temporary file in the cache directory which is then renamed
  over the final name (`os.replace` is atomic), so processes building at the same time each
  produce a complete library and readers never see a partial file.

If no compiler works, `cpu_kernel_available` is False (`cpu_kernel_status` says why) and
``impl="auto"`` uses ``"select"``; asking for ``impl="cpu"`` explicitly raises
`CpuKernelUnavailable` with the compiler command and the tail of its output.
``KWTA_JAX_CPU_KERNEL=0`` disables the kernel (e.g. to time the fallback).
"""

from __future__ import annotations

import ctypes
import functools
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

from kwta_jax.rank_keys import key_dtype, rank_keys

__all__ = [
    "FLAGS",
    "CpuKernelUnavailable",
    "build_library",
    "cpu_kernel_available",
    "cpu_kernel_status",
    "kwta_rows_cpu",
]

SOURCE = Path(__file__).with_name("kwta_cpu.cc")
# Portable code generation (baseline x86-64 / aarch64). -march=native measured ~12% faster
# end to end on the key shape (AVX-512 machine; the target is met either way), but it needs
# the cache keyed by CPU, and not every compiler/arch accepts it: opt in with
# KWTA_JAX_CXXFLAGS=-march=native.
FLAGS: tuple[str, ...] = ("-O3", "-shared", "-fPIC", "-std=c++17")
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


def library_path(cxx: list[str] | None = None, directory: Path | None = None) -> Path:
    """Cache path of the library for this source, compiler (and its version), flags, jaxlib."""
    cxx = compiler_command() if cxx is None else cxx
    version = _run([*cxx, "--version"])
    if version.returncode != 0:
        raise CpuKernelUnavailable(
            f"kwta_cpu: `{shlex.join([*cxx, '--version'])}` failed "
            f"(exit {version.returncode}): {version.stderr[-_STDERR_TAIL:]}"
        )
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        shlex.join(_compile_command(cxx, "OUT")).encode(),
        version.stdout.encode(),
        jaxlib.__version__.encode(),
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


def build_library(cxx: list[str] | None = None, directory: Path | None = None) -> Path:
    """Compiles the kernel into the cache unless it is already there; returns its path.

    Safe to call from several threads or processes at once: each compiles into its own
    temporary file and atomically renames it to the final name.

    Raises:
      CpuKernelUnavailable: no compiler, or the compilation failed (the message holds the
        command and the tail of the compiler's output).
    """
    cxx = compiler_command() if cxx is None else cxx
    path = library_path(cxx, directory)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise CpuKernelUnavailable(
            f"kwta_cpu: cannot write to the cache directory {path.parent}: {e}. "
            "Set KWTA_JAX_CACHE_DIR to a writable directory."
        ) from e
    try:
        cmd = _compile_command(cxx, tmp)
        result = _run(cmd)
        if result.returncode != 0:
            raise CpuKernelUnavailable(
                f"kwta_cpu: compiling the CPU kernel failed (exit {result.returncode}).\n"
                f"command: {shlex.join(cmd)}\n"
                f"output (tail):\n{(result.stdout + result.stderr)[-_STDERR_TAIL:]}"
            )
        # mkstemp creates the file 0600 and the compiler keeps that mode (0711 once linked):
        # give the library the usual 0755 so that other users of a shared cache can load it.
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# Loaded library and registration state, set once per process (a failed build is not retried:
# it costs seconds, and the environment that made it fail does not change under a process).
_lock = threading.Lock()
_state: dict[str, object] = {}


def _ensure_registered() -> None:
    """Builds, loads and registers the FFI target once; raises `CpuKernelUnavailable`."""
    with _lock:
        if "error" not in _state:
            try:
                if os.environ.get("KWTA_JAX_CPU_KERNEL", "1") == "0":
                    raise CpuKernelUnavailable("kwta_cpu: disabled by KWTA_JAX_CPU_KERNEL=0.")
                path = build_library()
                try:
                    lib = ctypes.cdll.LoadLibrary(str(path))
                    handler = lib.KwtaCpu
                except OSError as e:
                    raise CpuKernelUnavailable(f"kwta_cpu: cannot load {path}: {e}") from e
                jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(handler), platform="cpu")
                _state["lib"] = lib  # keep the library loaded for the life of the process
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


def kwta_rows_cpu(x2d: jax.Array, k: int, use_abs: bool) -> tuple[jax.Array, jax.Array]:
    """k-WTA rows with the FFI kernel (CPU backend only).

    Args:
      x2d: ``[rows, n]`` float16, bfloat16, float32 or float64 array (any number of leading
        dims works: all but the last are rows, which is how ``vmap`` batches it).
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.

    Returns:
      ``(y2d, threshold_key)``: ``y2d`` of the shape and dtype of ``x2d`` holding ``x`` where
      ``rank_keys(x) >= threshold_key[..., None]`` and ``+0`` elsewhere; ``threshold_key``
      ``x2d.shape[:-1]``, the unsigned key dtype of ``x2d`` (`kwta_jax.rank_keys.key_dtype`): each
      row's exact k-th largest rank key.

    Raises:
      TypeError: unsupported dtype. ValueError: ``k`` out of range.
      CpuKernelUnavailable: the kernel cannot be built here (use ``impl="select"``).
    """
    dtype = np.dtype(x2d.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"kwta_rows_cpu: x must be float16, bfloat16, float32 or float64; got {dtype}."
        )
    if x2d.ndim < 1:
        raise ValueError(f"kwta_rows_cpu: x must have rank >= 1; got shape {x2d.shape}.")
    n = x2d.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"kwta_rows_cpu: k={k} must be in [1, n={n}].")
    _ensure_registered()
    return _kwta_rows_ffi(x2d, int(k), bool(use_abs))


# Differentiable like the plain-JAX implementations (the FFI call itself has no JVP rule):
# kwta's own custom_jvp evaluates the row implementation on JVP tracers when it is
# differentiated twice (e.g. the JVP of a gradient), and then needs this rule.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _kwta_rows_ffi(x2d: jax.Array, k: int, use_abs: bool) -> tuple[jax.Array, jax.Array]:
    dtype = np.dtype(x2d.dtype)
    call = jax.ffi.ffi_call(
        TARGET_NAME,
        (
            jax.ShapeDtypeStruct(x2d.shape, dtype),
            jax.ShapeDtypeStruct(x2d.shape[:-1], key_dtype(dtype)),
        ),
        # The handler treats every leading dim as a row, so a vmapped call is one call on the
        # stacked input (no loop).
        vmap_method="broadcast_all",
    )
    y2d, threshold_key = call(x2d, k=np.int64(k), use_abs=use_abs)
    return y2d, threshold_key


@_kwta_rows_ffi.defjvp
def _kwta_rows_ffi_jvp(k, use_abs, primals, tangents):
    (x2d,), (t2d,) = primals, tangents
    y2d, threshold_key = _kwta_rows_ffi(x2d, k, use_abs)
    mask = rank_keys(x2d, use_abs) >= threshold_key[..., None]
    dy = jnp.where(mask, t2d, jnp.zeros((), t2d.dtype))
    # The threshold key is an integer: its tangent is float0 (piecewise constant in x).
    return (y2d, threshold_key), (dy, np.zeros(threshold_key.shape, jax.dtypes.float0))
