"""k-WTA thresholds with a Pallas kernel: each row's exact k-th largest key by radix search.

Layout follows `jax.experimental.pallas.ops` (e.g. ``ops/gpu/softmax.py``):
`threshold_keys_reference` (plain JAX, `jax.lax.top_k`), the kernel (`_threshold_kernel`) and
its wrapper `pallas_threshold_keys` (the ``"pallas"`` selector), side by side. A selector only
finds thresholds: the op layer (`kwta_jax.ops`) calls it on ``stop_gradient``-ed input, applies
the mask and owns the derivative.

Algorithm (one launch, no sort). Each program instance owns ``block_rows`` rows and
1. maps floats to order-preserving integer keys (the order of `kwta_jax.rank_keys.rank_keys`:
   ``-0 == +0``, NaNs tie above ``+inf``), computed in float32 for every input dtype (16-bit
   floats widen exactly and monotonically);
2. finds the k-th largest key by a most-significant-digit-first radix search, ``radix_bits``
   bits per pass: the threshold is the largest ``c`` with ``count(key >= c) >= k``, so a pass
   counts the keys at or above each of the ``2^radix_bits - 1`` candidates
   ``prefix | j << low`` and keeps the largest digit ``j`` whose count is still ``>= k``.
   Widened bf16 (f16) keys have 16 (13) constant low bits, so 16 (19, rounded up to a multiple
   of the digit) bits suffice. Counts are int32 (each tile's count is summed exactly in
   float32, < 2^24, then accumulated in int32), so rows of any length are exact.
The kernel loads bit patterns (integers of the dtype's width), never float values, so that no
backend canonicalises NaNs or flushes subnormals on the way.

A row that fits one ``block_cols`` tile is loaded once and searched in registers
(*resident*); a longer row is counted tile by tile in every pass (*streaming*). Every pass
re-reads the row, which is what limits this kernel on GPUs (docs/benchmarks.md); the
``"cuda"`` selector (``kwta_cuda.py``) makes 2-3 passes with shared-memory histograms.

Lowering: GPUs use Pallas's Triton backend (deprecated in jax 0.11; `triton_available` says
whether this jax still has it; the Mosaic GPU lowering rejects this kernel's (8, 1024) float32
blocks), TPUs use Mosaic, through one `jax.lax.platform_dependent`; every other backend (CPU)
runs the kernel in interpret mode (correct, not fast). TPU: a program's block is
``block_rows`` whole rows in VMEM (double-buffered): ``2 * block_rows * n * itemsize`` bytes
and the kernel's temporaries must fit the scoped VMEM limit (16 MiB by default on v5e; rows of
2^17 float32 keys with ``block_rows=8`` take 8 MiB; not measured on a TPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kwta_jax.rank_keys import key_dtype, rank_keys

try:  # Pallas's Triton backend is deprecated in jax 0.11 and may be removed later.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    pltriton = None

__all__ = [
    "KernelConfig",
    "default_config",
    "pallas_threshold_keys",
    "threshold_keys_reference",
    "triton_available",
]

_INT_MIN = np.int32(-(2**31))
_INT_MAX = np.int32(2**31 - 1)
# Low key bits that are constant for floats widened to float32 (23 - mantissa bits).
_SKIP_BITS = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 16, np.dtype(np.float16): 13}
RADIX_BITS = (1, 2, 4)
# Longest row (in keys) that a GPU program keeps in registers by default.
RESIDENT_MAX = 4096
LAUNCH_OPTIONS = ("block_rows", "block_cols", "radix_bits", "num_warps", "num_stages")


def triton_available() -> bool:
    """Whether this jax still ships Pallas's Triton backend (the kernel's GPU lowering)."""
    return pltriton is not None


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the kernel.

    Attributes:
      block_rows: rows per program (power of two).
      block_cols: width of a counting tile (power of two, at most 2^22); rows up to this long
        are resident.
      radix_bits: bits resolved per pass over the row, one of `RADIX_BITS`.
      num_warps, num_stages: Triton launch parameters (GPU only; ``None``: Triton's default).
    """

    block_rows: int
    block_cols: int
    radix_bits: int = 1
    num_warps: int | None = None
    num_stages: int | None = None


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _pow2_at_most(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)


def default_config(rows: int, n: int, dtype, platform: str) -> KernelConfig:
    """Launch parameters for ``[rows, n]`` of ``dtype`` on ``platform`` (``"gpu"``, ``"tpu"``
    or ``"interpret"``).

    GPU (tuned on an H200 with an earlier version that also wrote ``y``, docs/benchmarks.md):
    rows up to 4096 keys are resident, programs hold few rows so that a batch of 128 long rows
    still spreads over every multiprocessor; longer rows stream 16384-key tiles with 2-bit
    digits and 8 warps (1, 4-bit digits, narrower tiles and 4 warps were slower). TPU: one
    native (8 or 16, 128k) tile of sublanes per program, bisection (lowering verified, not
    measured).
    """
    if platform == "gpu":
        width = _pow2_at_least(max(n, 16))
        if width <= RESIDENT_MAX:
            # About 4096 keys per program, but at least ~2 programs per SM (132 SMs).
            block_rows = min(
                _pow2_at_most(max(1, 4096 // width)), _pow2_at_most(max(1, rows // 264))
            )
            num_warps = 4 if width * block_rows <= 1024 else 8
            return KernelConfig(block_rows, width, radix_bits=2, num_warps=num_warps)
        return KernelConfig(1, min(16384, width), radix_bits=2, num_warps=8)
    block_rows = 8 if np.dtype(dtype).itemsize == 4 else 16
    return KernelConfig(block_rows, min(1024, max(128, _pow2_at_least(n))), radix_bits=1)


def threshold_keys_reference(x2d: jax.Array, k: int, use_abs: bool = False) -> jax.Array:
    """Each row's k-th largest rank key with `jax.lax.top_k`: what the kernels must return.

    Args:
      x2d: ``[rows, n]`` floating array.
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.

    Returns:
      ``[rows]`` of ``rank_keys.key_dtype(x2d.dtype)``.
    """
    return lax.top_k(rank_keys(x2d, use_abs), k)[0][:, k - 1]


def _signed_keys(bits: jax.Array, dtype, use_abs: bool) -> jax.Array:
    """int32 keys of the values with bit patterns ``bits``, widened to float32 and ordered like
    `rank_keys` as *signed* ints (``rank_keys(f32) == signed ^ INT_MIN``; not every Pallas
    backend compares unsigned integers)."""
    wide = lax.bitcast_convert_type(lax.bitcast_convert_type(bits, dtype).astype(jnp.float32),
                                    jnp.int32)  # fmt: skip
    if use_abs:
        wide = wide & _INT_MAX
    is_nan = (wide & _INT_MAX) > np.int32(0x7F800000)
    wide = jnp.where(wide == _INT_MIN, jnp.int32(0), wide)  # -0.0 -> +0.0
    keys = jnp.where(wide < 0, wide ^ _INT_MAX, wide)  # negatives: flip magnitude bits
    return jnp.where(is_nan, _INT_MAX, keys)


def _tile_counts(keys: jax.Array, candidates: list[jax.Array]) -> list[jax.Array]:
    """``count(keys >= c)`` per row for each ``c: [block_rows, 1]``, as int32 (a tile has
    fewer than 2^24 keys, so its float32 sum is exact; not every backend lowers integer
    reductions)."""
    return [
        jnp.sum((keys >= c).astype(jnp.float32), axis=1, keepdims=True).astype(jnp.int32)
        for c in candidates
    ]


def _threshold_kernel(x_ref, th_ref, *, k, n, dtype, use_abs, block_cols, radix_bits, passes):
    """One program: ``x_ref: [block_rows, n_pad]`` bit patterns; ``th_ref: [block_rows, 1]``
    int32 receives the threshold as the *unsigned* key bit pattern of the float32-widened
    values."""
    block_rows, n_pad = x_ref.shape
    num_tiles = n_pad // block_cols
    col = lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
    digits = range(1, 1 << radix_bits)

    def tile_keys(bits, start):
        # Padding columns get the signed key INT_MIN (unsigned 0): below every candidate
        # (candidates are >= 1), so they are never counted.
        return jnp.where(col + start < n, _signed_keys(bits, dtype, use_abs), _INT_MIN)

    if num_tiles == 1:  # resident: one load, every pass in registers
        keys_all = tile_keys(x_ref[...], 0)

        def count(candidates):
            return _tile_counts(keys_all, candidates)
    else:

        def count(candidates):
            def body(j, acc):
                start = pl.multiple_of(j * block_cols, block_cols)
                keys = tile_keys(x_ref[:, pl.ds(start, block_cols)], start)
                return tuple(
                    a + c for a, c in zip(acc, _tile_counts(keys, candidates), strict=True)
                )

            zeros = tuple(jnp.zeros((block_rows, 1), jnp.int32) for _ in digits)
            return lax.fori_loop(0, num_tiles, body, zeros)

    def search_pass(i, prefix):
        low = jnp.int32(32 - radix_bits) - i * radix_bits  # lowest bit of this pass's digit
        candidates = [(prefix | lax.shift_left(jnp.int32(d), low)) ^ _INT_MIN for d in digits]
        # count(key >= c) is non-increasing in c: the digit is how many candidates keep >= k.
        digit = sum((c >= k).astype(jnp.int32) for c in count(candidates))
        return prefix | lax.shift_left(digit, low)

    th_ref[...] = lax.fori_loop(0, passes, search_pass, jnp.zeros((block_rows, 1), jnp.int32))


def _threshold_to_key(th_bits: jax.Array, dtype, skip_bits: int) -> jax.Array:
    """Unsigned key of ``dtype`` from the kernel's float32-domain key (int32 bit pattern)."""
    ukey = lax.bitcast_convert_type(th_bits, jnp.uint32)
    positive = ukey >= np.uint32(2**31)
    if skip_bits:
        # Fill the skipped low bits as a data key has them: 0 for +, all ones for - values.
        ukey = jnp.where(positive, ukey, ukey | np.uint32((1 << skip_bits) - 1))
    bits = jnp.where(positive, ukey ^ np.uint32(2**31), ~ukey)
    value = lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)
    # The float32 key of a data value converts back exactly (NaN stays NaN, +0 stays +0).
    return rank_keys(value)


def _check_config(config: KernelConfig) -> None:
    for name in ("block_rows", "block_cols"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"pallas_threshold_keys: {name} must be a power of two; got {v!r}.")
    if config.block_cols > 1 << 22:  # a tile's count is summed in float32, exact below 2^24
        raise ValueError(
            f"pallas_threshold_keys: block_cols must be <= 2^22; got {config.block_cols}."
        )
    if config.radix_bits not in RADIX_BITS:
        raise ValueError(
            f"pallas_threshold_keys: radix_bits must be one of {RADIX_BITS}; "
            f"got {config.radix_bits!r}."
        )


def _launch(x2d, k, use_abs, config: KernelConfig, compiler_params, interpret) -> jax.Array:
    """Pads ``x2d``'s bit patterns to whole blocks and runs the kernel: ``th_bits [rows]``."""
    rows, n = x2d.shape
    dtype = np.dtype(x2d.dtype)
    block_rows, block_cols = config.block_rows, config.block_cols
    rows_pad = -(-rows // block_rows) * block_rows
    n_pad = -(-n // block_cols) * block_cols
    bits = lax.bitcast_convert_type(x2d, {2: jnp.int16, 4: jnp.int32}[dtype.itemsize])
    bits = jnp.pad(bits, ((0, rows_pad - rows), (0, n_pad - n)))  # masked out / discarded
    passes = -(-(32 - _SKIP_BITS[dtype]) // config.radix_bits)
    kernel = functools.partial(
        _threshold_kernel, k=k, n=n, dtype=dtype, use_abs=use_abs, block_cols=block_cols,
        radix_bits=config.radix_bits, passes=passes,
    )  # fmt: skip
    # Inside jax.shard_map the output must vary over the same mesh axes as the input.
    mat = jax.typeof(bits).manual_axis_type
    th = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_pad, 1), jnp.int32, manual_axis_type=mat),
        grid=(rows_pad // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, n_pad), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((block_rows, 1), lambda i: (i, 0)),
        compiler_params=compiler_params,
        interpret=interpret,
        name="kwta_threshold",
    )(bits)
    return th[:rows, 0]


def _configs(rows, n, dtype, overrides: dict) -> dict[str, KernelConfig]:
    """Per-platform `KernelConfig` with the caller's explicit settings applied and checked."""
    out = {}
    for platform in ("gpu", "tpu", "interpret"):
        config = dataclasses.replace(default_config(rows, n, dtype, platform), **overrides)
        _check_config(config)
        out[platform] = config
    return out


@functools.partial(jax.jit, static_argnames=("k", "use_abs", "launch", "interpret"))
def _threshold_keys(x2d, k, use_abs, launch, interpret):
    rows, n = x2d.shape
    dtype = np.dtype(x2d.dtype)
    configs = _configs(rows, n, dtype, dict(launch))

    def interpreted(_=None):
        if not jax.typeof(x2d).manual_axis_type.empty:
            raise NotImplementedError(
                "pallas_threshold_keys: interpret mode (impl='pallas' on CPU) cannot run inside "
                "jax.shard_map: Pallas's interpreter mixes varying and invariant values. Use "
                "impl='select' or 'cpu' there; the compiled GPU and TPU kernels work under "
                "shard_map."
            )
        return _launch(x2d, k, use_abs, configs["interpret"], None, True)

    def gpu(_):
        if pltriton is None:  # pragma: no cover - jax without Pallas Triton
            raise NotImplementedError(
                "pallas_threshold_keys: this jax has no Pallas Triton backend; use "
                "impl='cuda' or 'select'."
            )
        c = configs["gpu"]
        params = pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
        return _launch(x2d, k, use_abs, c, params, False)

    def tpu(_):
        params = pltpu.CompilerParams(dimension_semantics=("parallel",))
        return _launch(x2d, k, use_abs, configs["tpu"], params, False)

    if interpret:
        th = interpreted()
    else:
        # `default` is traced on every platform but lowered only where there is no kernel:
        # off CPU it must not raise (inside shard_map on a GPU), so there it is plain.
        default = interpreted
        if jax.default_backend() != "cpu":
            default = lambda _: _launch(x2d, k, use_abs, configs["interpret"], None, True)  # noqa: E731
        th = lax.platform_dependent(x2d, tpu=tpu, cuda=gpu, rocm=gpu, default=default)
    return _threshold_to_key(th, dtype, _SKIP_BITS[dtype])


def pallas_threshold_keys(
    x2d: jax.Array, k: int, use_abs: bool = False, **launch_overrides
) -> jax.Array:
    """Each row's exact k-th largest rank key, with the Pallas kernel (selector ``"pallas"``).

    Args:
      x2d: ``[rows, n]`` float32, bfloat16 or float16 (float64 goes to
        `threshold_keys_reference`: TPUs have no float64 and the kernel's keys are 32-bit).
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.
      **launch_overrides: fields of `KernelConfig` (``block_rows``, ``block_cols``,
        ``radix_bits``, ``num_warps``, ``num_stages``) replacing the platform's
        `default_config`, and ``interpret=True`` to force interpret mode (the default
        interprets exactly where the platform has no Pallas lowering, i.e. CPU).

    Returns:
      ``[rows]`` of ``rank_keys.key_dtype(x2d.dtype)``, equal to `threshold_keys_reference`.
      Not differentiable (``pallas_call`` has no JVP rule): the op layer calls selectors on
      ``stop_gradient``-ed input.

    Raises:
      TypeError: non-floating ``x2d``, an unknown launch option. ValueError: bad ``k`` or
        launch parameters (at trace time).
    """
    x2d = jnp.asarray(x2d)
    if x2d.ndim != 2:
        raise ValueError(f"pallas_threshold_keys: x2d must be [rows, n]; got shape {x2d.shape}.")
    dtype = np.dtype(x2d.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"pallas_threshold_keys: x2d must be floating; got {dtype}.")
    n = x2d.shape[1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"pallas_threshold_keys: k must be an int in [1, n={n}]; got {k!r}.")
    interpret = bool(launch_overrides.pop("interpret", False))
    unknown = sorted(set(launch_overrides) - set(LAUNCH_OPTIONS))
    if unknown:
        raise TypeError(
            f"pallas_threshold_keys: unknown launch options {unknown}; accepted: "
            f"{list(LAUNCH_OPTIONS)} and interpret."
        )
    launch = tuple(sorted((a, v) for a, v in launch_overrides.items() if v is not None))
    _configs(x2d.shape[0], n, dtype, dict(launch))  # bad settings fail here, by name
    if dtype == np.float64:
        return threshold_keys_reference(x2d, int(k), bool(use_abs))
    if x2d.shape[0] == 0:
        return jnp.zeros((0,), key_dtype(dtype))
    return _threshold_keys(x2d, int(k), bool(use_abs), launch, interpret)
