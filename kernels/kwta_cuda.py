"""Exact k-WTA thresholds on NVIDIA GPUs through XLA FFI: the ``"cuda"`` selector.

The kernel (``kwta_cuda.cu``, next to this file; its algorithm is described at its top) is a
per-row radix select with 11-bit digits, shared-memory histograms and a shared-memory candidate
buffer: a float32 row is read from global memory twice on smooth data (three times when the
candidates overflow the buffer, once when the row fits it), instead of the Pallas kernel's 16
counting passes. Layout as in `jax.experimental.pallas.ops`: `cuda_threshold_keys_reference`
(plain JAX), the kernel (the ``.cu`` file) and its wrapper `cuda_threshold_keys`, side by side;
`cuda_kwta_forward` also writes ``y`` in the same launch (forward only).

Build (lazily, at first use, like ``kwta_cpu``; `kwta_jax.kernels.lazy_build`):

* compiler: ``$KWTA_JAX_NVCC`` (may hold arguments), else ``nvcc`` on ``PATH``, else
  ``$CUDA_HOME/bin/nvcc`` or ``/usr/local/cuda/bin/nvcc``, else the ``nvcc`` of the pip wheel
  ``nvidia-cuda-nvcc`` (``nvidia/cu13/bin`` or ``nvidia/cuda_nvcc/bin``; that wheel has no
  CUDA headers of its own, so it only works beside the ``nvidia-cuda-runtime`` and
  ``nvidia-cuda-cccl`` wheels' include directories on nvcc's path);
* target: the GPU's compute capability (``-gencode arch=compute_XY,code=sm_XY``);
* cache: ``$KWTA_JAX_CACHE_DIR`` or ``~/.cache/kwta_jax``, keyed by the source's content,
  the flags, the target, ``nvcc --version`` and the jaxlib version; validated (size and
  SHA-256) before it is loaded; built into a temporary file and renamed atomically.

`cuda_kernel_status` says why the kernel is not usable (not a CUDA backend, no nvcc, a failed
build, ``KWTA_JAX_CUDA_KERNEL=0``); `cuda_kernel_available` is its boolean. On anything but a
CUDA GPU nothing is compiled. Asking for the kernel where it is not available raises
`CudaKernelUnavailable` with that reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import shlex
import shutil
import threading
from pathlib import Path

import jax
import jaxlib
import numpy as np
from kwta_jax.kernels.kwta_pallas import threshold_keys_reference

from kwta_jax.kernels import lazy_build
from kwta_jax.rank_keys import key_dtype

__all__ = [
    "CudaKernelUnavailable",
    "FLAGS",
    "build_library",
    "cuda_kernel_available",
    "cuda_kernel_status",
    "cuda_kwta_forward",
    "cuda_threshold_keys",
    "cuda_threshold_keys_reference",
    "nvcc_command",
]

SOURCE = Path(__file__).with_name("kwta_cuda.cu")
FLAGS: tuple[str, ...] = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo")
SELECT_TARGET = "kwta_jax_kwta_cuda_select"
FORWARD_TARGET = "kwta_jax_kwta_cuda_forward"
SUPPORTED_DTYPES = tuple(np.dtype(d) for d in (np.float32, jax.numpy.bfloat16, np.float16))

cuda_threshold_keys_reference = threshold_keys_reference


class CudaKernelUnavailable(RuntimeError):
    """The CUDA kernel cannot be used here (the message says why)."""


def nvcc_command() -> list[str]:
    """The CUDA compiler command (see the module doc for the search order).

    Raises:
      CudaKernelUnavailable: none was found.
    """
    env = os.environ.get("KWTA_JAX_NVCC")
    if env:
        return shlex.split(env)
    found = shutil.which("nvcc")
    if found:
        return [found]
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.access(Path(home, "bin", "nvcc"), os.X_OK):
            return [str(Path(home, "bin", "nvcc"))]
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else ():
        for sub in ("cu13", "cuda_nvcc"):
            candidate = Path(root, sub, "bin", "nvcc")
            if os.access(candidate, os.X_OK):
                return [str(candidate)]
    raise CudaKernelUnavailable(
        "kwta_cuda: no CUDA compiler: set KWTA_JAX_NVCC, put nvcc on PATH, set CUDA_HOME, or "
        "pip install nvidia-cuda-nvcc (with nvidia-cuda-runtime and nvidia-cuda-cccl)."
    )


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get("KWTA_JAX_NVCCFLAGS", ""))


def _arch_flags(arch: str) -> list[str]:
    return ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def build_library(
    nvcc: list[str] | None = None, arch: str = "90", directory: Path | None = None
) -> Path:
    """Compiles ``kwta_cuda.cu`` for ``sm_<arch>`` into the cache (unless it is there).

    Needs no GPU (the tests build it on CPU-only machines). Returns the library's path.

    Raises:
      CudaKernelUnavailable: no nvcc, or the compilation failed (the message holds the command
        and the tail of the compiler's output).
    """
    nvcc = nvcc_command() if nvcc is None else nvcc
    flags = [*FLAGS, *_extra_flags(), *_arch_flags(arch)]
    include = f"-I{jax.ffi.include_dir()}"

    def compile_to(output: Path) -> None:
        cmd = [*nvcc, *flags, include, str(SOURCE), "-o", str(output)]
        lazy_build.run_tool(cmd, "nvcc (compiling the CUDA kernel)")

    try:
        version = lazy_build.run_tool([*nvcc, "--version"], "nvcc --version").stdout
        key = [
            SOURCE.read_bytes(),
            shlex.join([*nvcc[1:], *flags]).encode(),  # nvcc's own path is not content
            version.encode(),
            jaxlib.__version__.encode(),
            platform.machine().encode(),
        ]
        return lazy_build.cached_library("kwta_cuda", key, compile_to, directory)
    except lazy_build.BuildError as e:
        raise CudaKernelUnavailable(f"kwta_cuda: {e}") from e


def _cuda_arch() -> str:
    """The default device's compute capability as nvcc spells it (``"9.0"`` -> ``"90"``).

    Raises:
      CudaKernelUnavailable: the default backend is not a CUDA GPU.
    """
    if os.environ.get("KWTA_JAX_CUDA_KERNEL", "1") == "0":
        raise CudaKernelUnavailable("kwta_cuda: disabled by KWTA_JAX_CUDA_KERNEL=0.")
    backend = jax.default_backend()
    try:
        device = jax.devices("cuda")[0] if backend == "gpu" else None
    except RuntimeError:  # a ROCm GPU
        device = None
    if device is None:
        raise CudaKernelUnavailable(
            f"kwta_cuda: needs a CUDA GPU backend; the default backend is {backend!r}."
        )
    capability = str(getattr(device, "compute_capability", ""))
    if not capability.replace(".", "").isdigit():
        raise CudaKernelUnavailable(
            f"kwta_cuda: cannot read the compute capability of {device} ({capability!r})."
        )
    return capability.replace(".", "")


# Registration state, set once per process (a failed build is not retried: it costs seconds,
# and the environment that made it fail does not change under a process).
_lock = threading.Lock()
_state: dict[str, object] = {}


def _register(path: Path) -> None:
    """Loads the library (checked against its record) and registers both FFI targets for CUDA."""
    try:
        lib = lazy_build.load_library(path)
        handlers = {SELECT_TARGET: lib.KwtaCudaSelect, FORWARD_TARGET: lib.KwtaCudaForward}
    except (lazy_build.BuildError, AttributeError) as e:  # AttributeError: a missing symbol
        raise CudaKernelUnavailable(f"kwta_cuda: {e}") from e
    for name, handler in handlers.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="CUDA")
    _state["lib"] = lib  # keep the library loaded for the life of the process


def _ensure_registered(arch: str | None = None) -> None:
    """Builds, loads and registers once per process; raises `CudaKernelUnavailable`.

    ``arch``: build for this target without asking the backend (export and tests on machines
    without a GPU); ``None``: the default device's, which must be a CUDA GPU.
    """
    with _lock:
        if "error" not in _state:
            try:
                _register(build_library(arch=_cuda_arch() if arch is None else arch))
                _state["error"] = None
            except CudaKernelUnavailable as e:
                _state["error"] = e
        if _state["error"] is not None:
            raise _state["error"]


def cuda_kernel_status() -> str | None:
    """``None`` when the CUDA kernel is usable, else why not (builds it on first call)."""
    try:
        _ensure_registered()
    except CudaKernelUnavailable as e:
        return str(e)
    return None


def cuda_kernel_available() -> bool:
    """Whether the default backend is a CUDA GPU and the kernel is built and registered.

    Never raises (`cuda_kernel_status` says why not).
    """
    return cuda_kernel_status() is None


def _check(x2d: jax.Array, k: int, where: str) -> np.dtype:
    if x2d.ndim != 2:
        raise ValueError(f"{where}: x2d must be [rows, n]; got shape {x2d.shape}.")
    dtype = np.dtype(x2d.dtype)
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise TypeError(f"{where}: x2d must be floating; got {dtype}.")
    n = x2d.shape[1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"{where}: k must be an int in [1, n={n}]; got {k!r}.")
    if n >= 2**31 or x2d.shape[0] >= 2**31:
        raise ValueError(f"{where}: rows and n must be below 2^31; got shape {x2d.shape}.")
    return dtype


@functools.partial(jax.jit, static_argnums=(1, 2))
def _select_call(x2d, k, use_abs):
    call = jax.ffi.ffi_call(
        SELECT_TARGET,
        jax.ShapeDtypeStruct(x2d.shape[:-1], key_dtype(x2d.dtype)),
        # Every leading dim is a row, so a vmapped call is one call on the stacked input.
        vmap_method="broadcast_all",
    )
    return call(x2d, k=np.int64(k), use_abs=bool(use_abs))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _forward_call(x2d, k, use_abs):
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (
            jax.ShapeDtypeStruct(x2d.shape, x2d.dtype),
            jax.ShapeDtypeStruct(x2d.shape[:-1], key_dtype(x2d.dtype)),
        ),
        vmap_method="broadcast_all",
    )
    return call(x2d, k=np.int64(k), use_abs=bool(use_abs))


def cuda_threshold_keys(x2d: jax.Array, k: int, use_abs: bool = False) -> jax.Array:
    """Each row's exact k-th largest rank key, with the CUDA kernel (selector ``"cuda"``).

    Args:
      x2d: ``[rows, n]`` float32, bfloat16 or float16 (float64 goes to
        `cuda_threshold_keys_reference`: the kernel's keys are at most 32 bits).
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.

    Returns:
      ``[rows]`` of ``rank_keys.key_dtype(x2d.dtype)``, equal to
      `cuda_threshold_keys_reference`. Not differentiable (the op layer calls selectors on
      ``stop_gradient``-ed input and owns the derivative).

    Raises:
      TypeError, ValueError: bad ``x2d`` or ``k``. CudaKernelUnavailable: not a CUDA GPU, or
        the kernel cannot be built (`cuda_kernel_status`).
    """
    x2d = jax.numpy.asarray(x2d)
    dtype = _check(x2d, k, "cuda_threshold_keys")
    if dtype not in SUPPORTED_DTYPES:
        return threshold_keys_reference(x2d, int(k), bool(use_abs))
    if x2d.shape[0] == 0:
        return jax.numpy.zeros((0,), key_dtype(dtype))
    _ensure_registered()
    return _select_call(x2d, int(k), bool(use_abs))


def cuda_kwta_forward(x2d: jax.Array, k: int, use_abs: bool = False) -> tuple[jax.Array, jax.Array]:
    """k-WTA rows and their threshold keys from one launch (forward only, float16/32, bf16).

    The same selection as `cuda_threshold_keys`, then each block writes its row of
    ``y = where(rank_keys(x) >= threshold, x, +0)`` while the row is still in L2. For
    benchmarks (is the fused write faster than the op layer's separate mask pass?); it has no
    derivative rule.

    Returns:
      ``(y2d [rows, n] like x2d, threshold_key [rows])``.
    """
    x2d = jax.numpy.asarray(x2d)
    dtype = _check(x2d, k, "cuda_kwta_forward")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"cuda_kwta_forward: x2d must be float32, bfloat16 or float16; got {dtype}."
        )
    if x2d.shape[0] == 0:
        return x2d, jax.numpy.zeros((0,), key_dtype(dtype))
    _ensure_registered()
    return _forward_call(x2d, int(k), bool(use_abs))
