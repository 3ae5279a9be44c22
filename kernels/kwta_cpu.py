"""Exact k-WTA thresholds on CPU through XLA FFI: the ``"cpu"`` selector.

The kernel (``kwta_cpu.cc`` and the headers next to it) *selects*: it reads each row and
returns its exact k-th largest rank key (`cpu_threshold_keys`). Under differentiation the op
layer (`kwta_jax.ops`) applies the threshold and differentiates it in plain XLA, which fuses
with the neighbouring ops; the plain forward is `cpu_forward`, which also writes each row's
output while the row is still in cache from its selection. It is plain C++17
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
* the cache itself is `kwta_jax.kernels.lazy_build`: the compiler writes a unique temporary
  file in the cache directory which is then renamed over the final name (`os.replace` is
  atomic), so processes building at the same time each produce a complete library and readers
  never see a partial file; next to the library, ``<name>.so.sha256`` records its size and
  SHA-256 (written before the library is renamed into place). A library is loaded only when it
  matches: a truncated or damaged file (loading one can kill the process with SIGBUS) is
  rebuilt, and if it cannot be rebuilt the kernel is off and `cpu_kernel_status` says why (both
  why the cached file was rejected and why the build failed).

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
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from kwta_jax.kernels import lazy_build
from kwta_jax.rank_keys import key_dtype

__all__ = [
    "FLAGS",
    "CpuKernelUnavailable",
    "build_library",
    "cpu_forward",
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
FORWARD_TARGET_NAME = "kwta_jax_kwta_cpu_forward"
STEM = "kwta_cpu"  # cache file names: kwta_cpu-<hash>.so
SUPPORTED_DTYPES = tuple(np.dtype(d) for d in (np.float16, jnp.bfloat16, np.float32, np.float64))


class CpuKernelUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded (see the message for the command/output)."""


_HINT = "Set CXX to a working C++17 compiler, or use impl='select'."
# Stand-ins for the paths in the compile command when it enters the cache key (paths are not
# content: every clone and virtual environment has its own).
_PLACEHOLDERS = ("<jax.ffi.include_dir>", "<kwta_cpu.cc>", "<output>")


def compiler_command() -> list[str]:
    """The C++ compiler command: ``$CXX`` split like a shell would, or ``["c++"]``."""
    return shlex.split(os.environ.get("CXX") or "c++")


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get("KWTA_JAX_CXXFLAGS", ""))


def _compile_command(cxx: list[str], include: str, source: str, output: str) -> list[str]:
    return [*cxx, *FLAGS, *_extra_flags(), f"-I{include}", source, "-o", output]


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


def _cache_key(cxx: list[str]) -> list[bytes]:
    """Everything that goes into the library, by content (see the module doc).

    Raises:
      lazy_build.BuildError: ``cxx --version`` cannot run or fails.
    """
    version = lazy_build.run_tool([*cxx, "--version"], "the C++ compiler (--version)", _HINT)
    return [
        *(source.read_bytes() for source in (SOURCE, *HEADERS)),
        shlex.join(_compile_command(cxx, *_PLACEHOLDERS)).encode(),
        version.stdout.encode(),
        jaxlib.__version__.encode(),
        _ffi_headers_digest(),
        platform.machine().encode(),
        _cpu_identity() if _extra_flags() else b"",
    ]


def library_path(cxx: list[str] | None = None, directory: Path | None = None) -> Path:
    """Cache path of the library: a hash of everything that goes into it, by content.

    Sources, compiler command (with its flags) and ``--version``, jaxlib version and FFI headers,
    architecture (and the CPU with ``$KWTA_JAX_CXXFLAGS``). No path enters the key, so clones
    and virtual environments of the same versions share one build.

    Raises:
      CpuKernelUnavailable: the compiler does not run, or there is no cache directory.
    """
    cxx = compiler_command() if cxx is None else cxx
    try:
        return lazy_build.library_path(STEM, _cache_key(cxx), directory)
    except lazy_build.BuildError as e:
        raise CpuKernelUnavailable(f"kwta_cpu: {e}") from e


def build_library(cxx: list[str] | None = None, directory: Path | None = None) -> Path:
    """Compiles the kernel into the cache unless a valid build is there; returns its path.

    A cached library that does not match its size/SHA-256 record (truncated, damaged, or from
    an interrupted copy) is rebuilt. Safe to call from several threads or processes at once
    (`kwta_jax.kernels.lazy_build.cached_library`).

    Raises:
      CpuKernelUnavailable: no compiler, the compilation failed (the message holds the command
        and the tail of the compiler's output), or the cache cannot be written (the message
        says why a cached library was rejected, if one was).
    """
    cxx = compiler_command() if cxx is None else cxx

    def compile_to(output: Path) -> None:
        cmd = _compile_command(cxx, jax.ffi.include_dir(), str(SOURCE), str(output))
        lazy_build.run_tool(cmd, "the C++ compiler (compiling the CPU kernel)", _HINT)

    try:
        return lazy_build.cached_library(STEM, _cache_key(cxx), compile_to, directory)
    except lazy_build.BuildError as e:
        raise CpuKernelUnavailable(f"kwta_cpu: {e}") from e


def _load_kernel() -> tuple[ctypes.CDLL, dict[str, object], object]:
    """Builds (if needed) and loads the library, checked against its record just before.

    Returns the library, its FFI handlers by target name, and its ``KwtaCpuBestIsa``.
    """
    path = build_library()
    try:
        lib = lazy_build.load_library(path)
        handlers = {TARGET_NAME: lib.KwtaCpu, FORWARD_TARGET_NAME: lib.KwtaCpuForward}
        return lib, handlers, lib.KwtaCpuBestIsa
    except (lazy_build.BuildError, AttributeError) as e:  # AttributeError: a missing symbol
        raise CpuKernelUnavailable(f"kwta_cpu: {e}") from e


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
                lib, handlers, best_isa = _load_kernel()
                best_isa.restype = ctypes.c_int64
                for name, handler in handlers.items():
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
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


def _checked_call_args(name: str, x2d: jax.Array, k: int, isa: str | None) -> int:
    """Validates a kernel call's arguments (errors name ``name``); returns the ``isa`` level."""
    dtype = np.dtype(x2d.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: x must be float16, bfloat16, float32 or float64; got {dtype}.")
    if x2d.ndim < 1:
        raise ValueError(f"{name}: x must have rank >= 1; got shape {x2d.shape}.")
    n = x2d.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"{name}: k={k} must be in [1, n={n}].")
    if isa is not None and isa not in ISAS:
        raise ValueError(f"{name}: isa must be one of {ISAS} or None; got {isa!r}.")
    _ensure_registered()
    if isa is not None and ISAS.index(isa) > ISAS.index(_state["isa"]):
        raise ValueError(
            f"{name}: isa={isa!r} is not supported by this CPU "
            f"(it supports up to {_state['isa']!r})."
        )
    return -1 if isa is None else ISAS.index(isa)


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
    level = _checked_call_args("cpu_threshold_keys", x2d, k, isa)
    call = jax.ffi.ffi_call(
        TARGET_NAME,
        jax.ShapeDtypeStruct(x2d.shape[:-1], key_dtype(np.dtype(x2d.dtype))),
        # The handler treats every leading dim as a row, so a vmapped call is one call on the
        # stacked input (no loop).
        vmap_method="broadcast_all",
    )
    return call(x2d, k=np.int64(k), use_abs=bool(use_abs), isa=np.int64(level))


def cpu_forward(
    x2d: jax.Array, k: int, use_abs: bool = False, *, isa: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """The k-WTA forward of every row in one kernel call: ``(y, threshold_key)``.

    The op layer's fused forward for ``impl="cpu"`` (`kwta_jax.ops.FUSED_FORWARD`): used when
    ``kwta`` is not differentiated. Each row is written right after its selection, while it is
    still in cache, so ``x`` is read once instead of twice (`cpu_threshold_keys` followed by the
    XLA apply reads it again). No derivative rule: under differentiation the op uses the
    selector and `kwta_jax.rank_keys.apply_threshold`.

    Args:
      x2d, k, use_abs, isa: as for `cpu_threshold_keys`.

    Returns:
      ``y`` of ``x2d``'s shape and dtype, equal bit for bit to
      ``apply_threshold(x2d, threshold_key, use_abs)[0]`` (``x`` where its rank key is at
      least the row's threshold, ``+0`` elsewhere); and ``threshold_key`` as
      `cpu_threshold_keys` returns it.

    Raises:
      As `cpu_threshold_keys`.
    """
    level = _checked_call_args("cpu_forward", x2d, k, isa)
    call = jax.ffi.ffi_call(
        FORWARD_TARGET_NAME,
        (
            jax.ShapeDtypeStruct(x2d.shape, x2d.dtype),
            jax.ShapeDtypeStruct(x2d.shape[:-1], key_dtype(np.dtype(x2d.dtype))),
        ),
        vmap_method="broadcast_all",
    )
    return call(x2d, k=np.int64(k), use_abs=bool(use_abs), isa=np.int64(level))
