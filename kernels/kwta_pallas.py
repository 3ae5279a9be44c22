"""Fused k-WTA Pallas kernel: exact per-row threshold by radix search, then the mask.

Layout follows `jax.experimental.pallas.ops`: `kwta_reference` (plain JAX), the kernel
(`_kwta_kernel`, launched by `kwta_rows_pallas`), and `kwta_pallas`, a `jax.custom_vjp`
wrapper (``pallas_call`` has no transpose rule), side by side. `kwta_rows_pallas` itself carries
a `jax.custom_jvp`, so the op can be differentiated any number of times (``jax.hessian``).

Algorithm (one launch, no sort). Each program instance owns ``block_rows`` rows and
1. maps floats to order-preserving integer keys (the same order as `kwta_jax.rank_keys.rank_keys`:
   ``-0 == +0``, NaNs tie above ``+inf``), computed in float32 for every input dtype (16-bit
   floats widen exactly and monotonically);
2. finds the exact k-th largest key by a most-significant-digit-first radix search over its
   bits, ``radix_bits`` bits per pass: the threshold is the largest ``c`` with
   ``count(key >= c) >= k``, so a pass counts the keys at or above each of the
   ``2^radix_bits - 1`` candidates ``prefix | j << low`` and keeps the largest digit ``j``
   whose count is still ``>= k``. ``radix_bits=1`` is plain bisection (32 passes for float32);
   larger digits trade compute per pass for fewer passes over the data. Widened bf16 (f16)
   keys have 16 (13) constant low bits, so 16 (19, rounded up to a multiple of the digit)
   bits suffice. Counts are int32 (each tile's count is summed exactly in float32, < 2^24,
   then accumulated in int32), so rows of any length are exact;
3. writes ``where(key >= threshold, x, 0)``. The kernels load and store bit patterns
   (integers of the dtype's width), never float values, so winners come out bit for bit.

A row that fits one ``block_cols`` tile is loaded once and searched in registers
(*resident*); a longer row is counted tile by tile in every pass (*streaming*: a conv group of
32*32*64 floats is 256 KiB, more than a GPU's shared memory). *Split* mode (`KernelConfig`)
spreads a row over many programs instead, one count launch per pass; it was slower on an
H200 and is off by default.

Measured (docs/benchmarks.md, NVIDIA H200, jax 0.11.2): bit-exact against `kwta_reference`
on every tested case; on ``[128, 65536]`` float32 r=0.1, 0.17 ms: 2.5x faster than
``lax.top_k`` and 3.8x a ReLU (the 16 passes re-read the row from L2).

Lowering (measured with jax 0.10.2; Pallas's Triton backend is deprecated in jax 0.11 but
still there): the default GPU lowering (Mosaic GPU) rejects ``(8, 1024)`` float32 blocks
("Async copies only support <=256 elements per dim") and wants the newer ``plgpu.kernel`` API,
while the Triton lowering handles this kernel's tiles and in-kernel loops over ``pl.ds``
slices directly, and also serves ROCm. So GPUs use Triton and TPUs use Mosaic; one kernel
body serves both through `jax.lax.platform_dependent`, and every other backend (CPU) runs it
in interpret mode (correct, not fast: use ``impl="cpu"`` or ``"select"`` there).

TPU note: a program's block is ``block_rows`` whole rows in VMEM (double-buffered, input and
output): ``4 * block_rows * n * itemsize`` bytes must fit the scoped VMEM limit (16 MiB by
default on v5e: n <= 2^17 float32 rows with ``block_rows=8``). GPU (Triton) reads tiles from
global memory and has no such limit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kwta_jax.rank_keys import apply_threshold, key_dtype, rank_keys
from kwta_jax.selection import kwta_rows_select

try:  # Pallas's Triton backend is deprecated in jax 0.11 and may be removed later.
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    _pltriton = None
try:
    from jax.experimental.pallas import tpu as _pltpu
except ImportError:  # pragma: no cover - depends on the installed jax
    _pltpu = None

__all__ = [
    "KernelConfig",
    "default_config",
    "kwta_pallas",
    "kwta_reference",
    "kwta_rows_pallas",
    "triton_available",
]

_INT_MIN = np.int32(-(2**31))
_INT_MAX = np.int32(2**31 - 1)
# Low key bits that are constant for floats widened to float32 (23 - mantissa bits).
_SKIP_BITS = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 16, np.dtype(np.float16): 13}
RADIX_BITS = (1, 2, 4)
DEFAULT_BLOCK_COLS = 1024
# Longest row (in keys) that a GPU program keeps in registers by default.
RESIDENT_MAX = 4096
# jax 0.10 names the varying-axes field of an abstract value `manual_axis_type`; older
# releases called it `vma`. Output structs must carry the input's (inside `jax.shard_map`).
_SDS_PARAMS = inspect.signature(jax.ShapeDtypeStruct).parameters


def triton_available() -> bool:
    """Whether this jax still ships Pallas's Triton backend (GPU lowering of this kernel)."""
    return _pltriton is not None


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the kernel (see the module doc).

    Attributes:
      block_rows: rows per program (power of two).
      block_cols: width of a counting tile (power of two); rows up to this long are resident.
      radix_bits: bits resolved per pass over the row, one of `RADIX_BITS`.
      num_warps, num_stages: Triton launch parameters (GPU only; ``None``: Triton's default).
      split: one launch per pass over a ``(rows, n / block_cols)`` grid, the counts summed
        by XLA between launches, and the mask applied by XLA (*split* mode; GPU and interpret
        mode only), instead of one launch in which each program owns whole rows.
    """

    block_rows: int
    block_cols: int
    radix_bits: int = 1
    num_warps: int | None = None
    num_stages: int | None = None
    split: bool = False


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _pow2_at_most(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)


def default_config(rows: int, n: int, dtype, platform: str) -> KernelConfig:
    """Launch parameters for ``[rows, n]`` of ``dtype`` on ``platform`` (``"gpu"``, ``"tpu"``
    or ``"interpret"``).

    GPU (tuned on an H200 with ``python -m kwta_jax.gpu_check``, docs/benchmarks.md): rows up
    to 4096 keys are resident; programs hold few rows so that a batch of 128 long rows still
    spreads over every multiprocessor. TPU: one native (8 or 16, 128k) tile of sublanes per
    program, bisection (lowering verified, not yet measured on hardware).
    """
    itemsize = np.dtype(dtype).itemsize
    if platform == "gpu":
        width = _pow2_at_least(max(n, 16))
        if width <= RESIDENT_MAX:
            # Resident: about 4096 keys per program, but at least ~2 programs per SM (H100/H200
            # have 132 SMs).
            block_rows = min(
                _pow2_at_most(max(1, 4096 // width)), _pow2_at_most(max(1, rows // 264))
            )
            return KernelConfig(
                block_rows, width, radix_bits=2, num_warps=4 if width * block_rows <= 1024 else 8
            )
        # Longer rows: one program per row streams it tile by tile in every pass. On an H200
        # (docs/benchmarks.md) wider tiles were faster (on [128, 65536]: 2048 0.37 ms, 4096
        # 0.26, 8192 0.20, 16384 0.18), 2-bit digits beat 1 and 4, 8 warps beat 4, and split
        # mode (0.24 ms at best) lost to the single launch.
        return KernelConfig(1, min(16384, width), radix_bits=2, num_warps=8)
    block_rows = 8 if itemsize == 4 else 16
    width = max(128, _pow2_at_least(n))
    return KernelConfig(block_rows, min(DEFAULT_BLOCK_COLS, width), radix_bits=1)


def kwta_reference(x2d: jax.Array, k: int, use_abs: bool = False) -> tuple[jax.Array, jax.Array]:
    """Plain-JAX k-WTA rows (`jax.lax.top_k` on rank keys): what the kernel must reproduce.

    Args:
      x2d: ``[rows, n]`` floating array.
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.

    Returns:
      ``(y2d [rows, n] same dtype, threshold_key [rows])`` with unsigned keys of ``x2d``'s
      width.
    """
    threshold_key = lax.top_k(rank_keys(x2d, use_abs), k)[0][:, k - 1]
    return apply_threshold(x2d, threshold_key, use_abs)


def _signed_keys(x: jax.Array, use_abs: bool) -> jax.Array:
    """int32 keys of ``x`` widened to float32, ordered like `rank_keys` as *signed* ints.

    ``rank_keys(x.astype(f32)) == signed_keys ^ INT_MIN`` (bit pattern); signed int32 is used
    because unsigned compares are not supported by every Pallas backend.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    if use_abs:
        bits = bits & _INT_MAX
    is_nan = (bits & _INT_MAX) > np.int32(0x7F800000)
    bits = jnp.where(bits == _INT_MIN, jnp.int32(0), bits)  # -0.0 -> +0.0
    keys = jnp.where(bits < 0, bits ^ _INT_MAX, bits)  # negatives: flip magnitude bits
    return jnp.where(is_nan, _INT_MAX, keys)


def _bit_dtype(dtype) -> np.dtype:
    """Signed integer of ``dtype``'s width (every Pallas backend has signed integers)."""
    return np.dtype({2: np.int16, 4: np.int32}[np.dtype(dtype).itemsize])


def _padded_bits(x2d: jax.Array, rows_pad: int, n_pad: int) -> jax.Array:
    """The bit pattern of ``x2d`` padded with zeros to ``[rows_pad, n_pad]``.

    The kernels move bit patterns, never floats: a float load, pad or slice may canonicalise
    NaN payloads or flush subnormals on some backends (interpret mode on XLA:CPU), and winners
    must come out bit for bit. Padded columns are masked out of the counts; padded rows are
    discarded.
    """
    rows, n = x2d.shape
    bits = lax.bitcast_convert_type(x2d, _bit_dtype(x2d.dtype))
    if (rows_pad, n_pad) != (rows, n):
        bits = jnp.pad(bits, ((0, rows_pad - rows), (0, n_pad - n)))
    return bits


def _bits_keys(bits: jax.Array, dtype, use_abs: bool) -> jax.Array:
    """`_signed_keys` of the values whose bit patterns are ``bits``."""
    return _signed_keys(lax.bitcast_convert_type(bits, dtype), use_abs)


def _keep(mask: jax.Array, bits: jax.Array) -> jax.Array:
    """``where(mask, bits, 0)``: the winners' bit patterns, +0 elsewhere."""
    return jnp.where(mask, bits, jnp.zeros((), bits.dtype))


def _tile_counts(keys: jax.Array, cands: list[jax.Array]) -> list[jax.Array]:
    """``count(keys >= c)`` per row for each ``c: [block_rows, 1]``, as int32.

    A tile has fewer than 2^24 keys, so its float32 sum is exact (not every backend lowers
    integer reductions); tiles are accumulated in int32 by the caller.
    """
    return [
        jnp.sum((keys >= c).astype(jnp.float32), axis=1, keepdims=True).astype(jnp.int32)
        for c in cands
    ]


def _kwta_kernel(x_ref, y_ref, th_ref, *, k, n, dtype, use_abs, block_cols, radix_bits, passes):
    """One program: ``x_ref, y_ref: [block_rows, n_pad]``, ``th_ref: [block_rows, 1]`` int32.

    ``th_ref`` receives the threshold as an *unsigned* key bit pattern (int32 storage) of the
    float32-widened values.
    """
    block_rows, n_pad = x_ref.shape
    num_tiles = n_pad // block_cols
    col = lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
    digits = range(1, 1 << radix_bits)

    def tile_keys(xt, start):
        # Padding columns get the signed key INT_MIN (unsigned 0): below every candidate
        # (candidates are >= 1), so they are never counted.
        return jnp.where(col + start < n, _bits_keys(xt, dtype, use_abs), _INT_MIN)

    if num_tiles == 1:  # resident: one load, every pass in registers
        x_all = x_ref[...]
        keys_all = tile_keys(x_all, 0)

        def count(cands):
            return _tile_counts(keys_all, cands)
    else:

        def count(cands):
            def body(j, acc):
                start = pl.multiple_of(j * block_cols, block_cols)
                keys = tile_keys(x_ref[:, pl.ds(start, block_cols)], start)
                return tuple(a + c for a, c in zip(acc, _tile_counts(keys, cands), strict=True))

            zeros = tuple(jnp.zeros((block_rows, 1), jnp.int32) for _ in digits)
            return lax.fori_loop(0, num_tiles, body, zeros)

    def search_pass(i, prefix):
        low = jnp.int32(32 - radix_bits) - i * radix_bits  # lowest bit of this pass's digit
        cands = [(prefix | lax.shift_left(jnp.int32(d), low)) ^ _INT_MIN for d in digits]
        # count(key >= c) is non-increasing in c: the digit is how many candidates keep >= k.
        digit = sum((c >= k).astype(jnp.int32) for c in count(cands))
        return prefix | lax.shift_left(digit, low)

    prefix = lax.fori_loop(0, passes, search_pass, jnp.zeros((block_rows, 1), jnp.int32))
    th_ref[...] = prefix
    threshold_signed = prefix ^ _INT_MIN

    if num_tiles == 1:
        y_ref[...] = _keep(keys_all >= threshold_signed, x_all)
        return

    def apply(j, carry):
        start = pl.multiple_of(j * block_cols, block_cols)
        xt = x_ref[:, pl.ds(start, block_cols)]
        keep = _bits_keys(xt, dtype, use_abs) >= threshold_signed
        y_ref[:, pl.ds(start, block_cols)] = _keep(keep, xt)
        return carry

    lax.fori_loop(0, num_tiles, apply, 0)


def _count_kernel(x_ref, prefix_ref, step_ref, cnt_ref, *, n, dtype, use_abs, radix_bits):
    """Split mode, one program: counts of one ``[block_rows, block_cols]`` tile of a row.

    ``prefix_ref, step_ref: [block_rows, 1]`` int32: the threshold's bits found so far and
    ``1 << low`` of this pass; ``cnt_ref: [block_rows, 2^radix_bits]`` int32 receives
    ``count(key >= prefix | d * step)`` in column ``d`` (column 0 unused).
    """
    block_rows, block_cols = x_ref.shape
    start = pl.program_id(1) * block_cols
    col = lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)
    keys = jnp.where(col + start < n, _bits_keys(x_ref[...], dtype, use_abs), _INT_MIN)
    prefix, step = prefix_ref[...], step_ref[...]
    lane = lax.broadcasted_iota(jnp.int32, (block_rows, 1 << radix_bits), 1)
    out = jnp.zeros((block_rows, 1 << radix_bits), jnp.int32)
    for d in range(1, 1 << radix_bits):
        # prefix has zeros below this pass's digit, so `|` adds the digit (d * step wraps in
        # int32 exactly like the shift it stands for).
        (count,) = _tile_counts(keys, [(prefix | (step * d)) ^ _INT_MIN])
        out = jnp.where(lane == d, count, out)
    cnt_ref[...] = out


def _launch_split(x2d, k, use_abs, config: KernelConfig, skip_bits, compiler_params, interpret):
    """Split mode: one count launch per radix pass; returns ``(y [rows, n], th_bits [rows])``.

    Every launch spreads a row over ``n / block_cols`` programs, so a batch of a few long rows
    still fills the device; the passes are unrolled (no data-dependent loop, so no host
    synchronisation) and the mask is one fused XLA elementwise pass.
    """
    rows, n = x2d.shape
    block_rows, block_cols, radix_bits = config.block_rows, config.block_cols, config.radix_bits
    rows_pad = -(-rows // block_rows) * block_rows
    n_pad = -(-n // block_cols) * block_cols
    xp = _padded_bits(x2d, rows_pad, n_pad)
    chunks, width = n_pad // block_cols, 1 << radix_bits
    count = pl.pallas_call(
        functools.partial(
            _count_kernel, n=n, dtype=x2d.dtype, use_abs=use_abs, radix_bits=radix_bits
        ),
        out_shape=_struct((rows_pad, chunks * width), jnp.int32, xp),
        grid=(rows_pad // block_rows, chunks),
        in_specs=[
            pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j)),
            pl.BlockSpec((block_rows, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((block_rows, 1), lambda i, j: (i, 0)),
        ],
        out_specs=pl.BlockSpec((block_rows, width), lambda i, j: (i, j)),
        compiler_params=compiler_params,
        interpret=interpret,
        name="kwta_count",
    )
    # Zeros that vary over the same shard_map axes as the data (a constant would not).
    zero = lax.bitcast_convert_type(xp[:, :1].astype(jnp.float32), jnp.int32) & 0
    prefix = zero
    passes = -(-(32 - skip_bits) // radix_bits)
    for i in range(passes):
        low = 32 - radix_bits * (i + 1)
        step = zero | np.array(1 << low, np.uint32).view(np.int32)
        counts = count(xp, prefix, step).reshape(rows_pad, chunks, width).sum(axis=1)
        digit = jnp.sum(counts[:, 1:] >= k, axis=1, keepdims=True, dtype=jnp.int32)
        prefix = prefix | (digit * step)
    th = prefix[:rows, 0]
    threshold_key = _threshold_to_key(th, x2d.dtype, skip_bits)
    y, _ = apply_threshold(x2d, threshold_key, use_abs)
    return y, th


def _threshold_to_key(th_bits: jax.Array, dtype, skip_bits: int) -> jax.Array:
    """Unsigned key of ``dtype`` from the kernel's float32-domain key (int32 bit pattern)."""
    ukey = lax.bitcast_convert_type(th_bits, jnp.uint32)
    positive = ukey >= np.uint32(2**31)
    if skip_bits:
        # Fill the skipped low bits as a data key has them: 0 for +, all ones for - values.
        low = np.uint32((1 << skip_bits) - 1)
        ukey = jnp.where(positive, ukey, ukey | low)
    bits = jnp.where(positive, ukey ^ np.uint32(2**31), ~ukey)
    value = lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)
    # The float32 key of a data value converts back exactly (NaN stays NaN, +0 stays +0).
    return rank_keys(value)


def _varies(x: jax.Array) -> bool:
    """Whether ``x`` varies over manual mesh axes (inside `jax.shard_map`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return not getattr(mat, "empty", True)
    return bool(getattr(aval, "vma", ()))  # pragma: no cover - older jax


def _struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct` varying over the same `jax.shard_map` axes as ``like``."""
    aval = jax.typeof(like)
    for field in ("manual_axis_type", "vma"):
        if field in _SDS_PARAMS and hasattr(aval, field):
            return jax.ShapeDtypeStruct(shape, dtype, **{field: getattr(aval, field)})
    return jax.ShapeDtypeStruct(shape, dtype)  # pragma: no cover - older jax


def _check_config(config: KernelConfig) -> None:
    for name in ("block_rows", "block_cols"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"kwta_rows_pallas: {name} must be a power of two >= 1; got {v!r}.")
    if config.block_cols > 1 << 22:
        # A tile's count is summed in float32, exact below 2^24.
        raise ValueError(f"kwta_rows_pallas: block_cols must be <= 2^22; got {config.block_cols}.")
    if config.radix_bits not in RADIX_BITS:
        raise ValueError(
            f"kwta_rows_pallas: radix_bits must be one of {RADIX_BITS}; got {config.radix_bits!r}."
        )
    if not isinstance(config.split, bool):
        raise TypeError(f"kwta_rows_pallas: split must be a bool; got {config.split!r}.")


def _launch(x2d, k, use_abs, config: KernelConfig, skip_bits, compiler_params, interpret):
    """Pads ``x2d`` to whole blocks, runs the kernel, returns ``(y [rows, n], th_bits [rows])``."""
    if config.split:
        return _launch_split(x2d, k, use_abs, config, skip_bits, compiler_params, interpret)
    rows, n = x2d.shape
    dtype = x2d.dtype
    block_rows, block_cols = config.block_rows, config.block_cols
    rows_pad = -(-rows // block_rows) * block_rows
    n_pad = -(-n // block_cols) * block_cols
    xp = _padded_bits(x2d, rows_pad, n_pad)
    nbits = 32 - skip_bits
    passes = -(-nbits // config.radix_bits)  # the last digit may reach into constant bits
    kernel = functools.partial(
        _kwta_kernel, k=k, n=n, dtype=dtype, use_abs=use_abs, block_cols=block_cols,
        radix_bits=config.radix_bits, passes=passes,
    )  # fmt: skip
    y, th = pl.pallas_call(
        kernel,
        out_shape=(_struct((rows_pad, n_pad), xp.dtype, xp), _struct((rows_pad, 1), jnp.int32, xp)),
        grid=(rows_pad // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, n_pad), lambda i: (i, 0))],
        out_specs=(
            pl.BlockSpec((block_rows, n_pad), lambda i: (i, 0)),
            pl.BlockSpec((block_rows, 1), lambda i: (i, 0)),
        ),
        compiler_params=compiler_params,
        interpret=interpret,
        name="kwta",
    )(xp)
    return lax.bitcast_convert_type(y[:rows, :n], dtype), th[:rows, 0]


def _platform_configs(rows, n, dtype, overrides: dict) -> dict[str, KernelConfig]:
    """Per-platform `KernelConfig` with the caller's explicit settings applied."""
    out = {}
    for platform in ("gpu", "tpu", "interpret"):
        config = dataclasses.replace(default_config(rows, n, dtype, platform), **overrides)
        _check_config(config)
        out[platform] = config
    return out


@functools.partial(
    jax.jit,
    static_argnames=(
        "k", "use_abs", "block_rows", "block_cols", "radix_bits", "num_warps", "num_stages",
        "split", "interpret",
    ),
)  # fmt: skip
def _kwta_rows_pallas_impl(
    x2d,
    k,
    use_abs,
    *,
    block_rows,
    block_cols,
    radix_bits,
    num_warps,
    num_stages,
    split,
    interpret,
):
    rows, n = x2d.shape
    dtype = np.dtype(x2d.dtype)
    if rows == 0:
        return x2d, jnp.zeros((0,), key_dtype(dtype))
    skip_bits = _SKIP_BITS[dtype]
    overrides = {
        name: value
        for name, value in (
            ("block_rows", block_rows), ("block_cols", block_cols), ("radix_bits", radix_bits),
            ("num_warps", num_warps), ("num_stages", num_stages), ("split", split),
        )
        if value is not None
    }  # fmt: skip
    configs = _platform_configs(rows, n, dtype, overrides)
    launch = functools.partial(_launch, x2d, k, use_abs, skip_bits=skip_bits)

    def interpreted(_=None):
        if _varies(x2d):
            raise NotImplementedError(
                "kwta_rows_pallas: interpret mode (impl='pallas' on CPU) cannot run inside "
                "jax.shard_map: Pallas's interpreter mixes varying and invariant values. Use "
                "impl='select' or 'cpu' there; the compiled GPU and TPU kernels work under "
                "shard_map."
            )
        return launch(configs["interpret"], compiler_params=None, interpret=True)

    if interpret:
        y, th = interpreted()
    else:

        def gpu(_):
            if _pltriton is None:  # pragma: no cover - jax without Pallas Triton
                raise NotImplementedError(
                    "kwta_rows_pallas: this jax has no Pallas Triton backend; use impl='select'."
                )
            c = configs["gpu"]
            params = _pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
            return launch(c, compiler_params=params, interpret=False)

        def tpu(_):
            # Split mode's [block_rows, 2^radix_bits] count blocks do not meet Mosaic's
            # (8, 128) tiling: TPUs always use the single launch.
            params = _pltpu.CompilerParams(dimension_semantics=("parallel",))
            config = dataclasses.replace(configs["tpu"], split=False)
            return launch(config, compiler_params=params, interpret=False)

        y, th = lax.platform_dependent(
            x2d,
            tpu=tpu,
            cuda=gpu,
            rocm=gpu,
            # Traced on every platform but lowered only on those without a kernel (CPU).
            default=interpreted
            if jax.default_backend() == "cpu"
            else lambda _: launch(configs["interpret"], compiler_params=None, interpret=True),
        )
    return y, _threshold_to_key(th, dtype, skip_bits)


def kwta_rows_pallas(
    x2d: jax.Array,
    k: int,
    use_abs: bool = False,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    radix_bits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split: bool | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact k-WTA rows with the fused Pallas kernel (row implementation ``"pallas"``).

    Args:
      x2d: ``[rows, n]`` float32, bfloat16 or float16 (float64 is delegated to
        `kwta_jax.selection.kwta_rows_select`: TPUs have no float64 and the kernel's keys are
        32-bit).
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.
      block_rows, block_cols, radix_bits, num_warps, num_stages, split: override the fields
        of the platform's `default_config` (see `KernelConfig`); ``None`` keeps the default.
      interpret: force interpret mode (default: interpret exactly when the platform has no
        Pallas lowering, i.e. CPU).

    Returns:
      ``(y2d [rows, n] same dtype, threshold_key [rows])``, bit-identical to `kwta_reference`.
      Differentiable (forward and reverse, any order): the derivative is ``t * mask``.

    Raises:
      TypeError: non-floating ``x2d``. ValueError: bad ``k`` or launch parameters.
    """
    x2d = jnp.asarray(x2d)
    if x2d.ndim != 2:
        raise ValueError(f"kwta_rows_pallas: x2d must be [rows, n]; got shape {x2d.shape}.")
    dtype = np.dtype(x2d.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"kwta_rows_pallas: x2d must be floating; got {dtype}.")
    n = x2d.shape[1]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"kwta_rows_pallas: k must be an int in [1, n={n}]; got {k!r}.")
    if dtype == np.float64:  # keys are 64-bit: no kernel path
        return kwta_rows_select(x2d, int(k), use_abs)
    launch = dict(
        block_rows=block_rows, block_cols=block_cols, radix_bits=radix_bits,
        num_warps=num_warps, num_stages=num_stages, split=split, interpret=bool(interpret),
    )  # fmt: skip
    # Validate explicit settings eagerly (trace time), with the argument's name.
    overrides = {a: v for a, v in launch.items() if a != "interpret" and v is not None}
    _platform_configs(x2d.shape[0], n, dtype, overrides)
    return _kwta_rows_pallas_diff(x2d, int(k), bool(use_abs), tuple(sorted(launch.items())))


# The raw pallas_call has no JVP rule: kwta's own custom_jvp evaluates the row implementation
# on JVP tracers when it is differentiated twice (jvp of grad, jax.hessian), and needs this.
@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _kwta_rows_pallas_diff(x2d, k, use_abs, launch):
    return _kwta_rows_pallas_impl(x2d, k, use_abs, **dict(launch))


@_kwta_rows_pallas_diff.defjvp
def _kwta_rows_pallas_diff_jvp(k, use_abs, launch, primals, tangents):
    (x2d,), (t2d,) = primals, tangents
    y2d, threshold_key = _kwta_rows_pallas_diff(x2d, k, use_abs, launch)
    mask = rank_keys(x2d, use_abs) >= threshold_key[:, None]
    dy = jnp.where(mask, t2d, jnp.zeros((), t2d.dtype))
    # The threshold key is an integer: its tangent is float0 (piecewise constant in x).
    return (y2d, threshold_key), (dy, np.zeros(threshold_key.shape, jax.dtypes.float0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def kwta_pallas(x2d: jax.Array, k: int, use_abs: bool = False) -> jax.Array:
    """Differentiable k-WTA rows with the Pallas kernel: ``[rows, n] -> [rows, n]``.

    Backward is ``g * mask`` (``where``, so a non-finite cotangent at a loser gives 0), with
    the mask recomputed from the saved per-row threshold: one elementwise pass.
    """
    return kwta_rows_pallas(x2d, k, use_abs)[0]


def _kwta_pallas_fwd(x2d, k, use_abs):
    y2d, threshold_key = kwta_rows_pallas(x2d, k, use_abs)
    return y2d, (x2d, threshold_key)


def _kwta_pallas_bwd(k, use_abs, residuals, g):
    del k
    x2d, threshold_key = residuals
    mask = rank_keys(x2d, use_abs) >= threshold_key[:, None]
    return (jnp.where(mask, g, jnp.zeros((), g.dtype)),)


kwta_pallas.defvjp(_kwta_pallas_fwd, _kwta_pallas_bwd)
