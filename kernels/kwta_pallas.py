"""Fused k-WTA Pallas kernel: exact per-row threshold by bit bisection, then the mask.

Layout follows `jax.experimental.pallas.ops`: `kwta_reference` (plain JAX), the kernel
(`_kwta_kernel`, launched by `kwta_rows_pallas`), and `kwta_pallas`, a `jax.custom_vjp`
wrapper (``pallas_call`` has no transpose rule), side by side.

Algorithm (one launch, no sort). Each program instance owns ``block_rows`` rows and
1. maps floats to order-preserving integer keys (the same order as `kwta_jax.keys.rank_keys`:
   ``-0 == +0``, NaNs tie above ``+inf``), computed in float32 for every input dtype (16-bit
   floats widen exactly and monotonically);
2. finds the exact k-th largest key by bisection over its bits, most significant first: the
   threshold is the largest ``c`` with ``count(key >= c) >= k``, so bit ``b`` is kept iff
   ``count(key >= prefix | 2^b) >= k``. Counting walks the row in ``block_cols``-wide tiles
   (multi-pass), so rows of any length work (a conv group of 32*32*64 floats is 256 KiB,
   more than a GPU's shared memory). Widened bf16 (f16) keys have 16 (13) constant low bits,
   so 16 (19) steps suffice instead of 32;
3. writes ``where(key >= threshold, x, 0)`` tile by tile.

Lowering choice (measured with jax 0.10.2): the default GPU lowering (Mosaic GPU) rejects
``(8, 1024)`` float32 blocks ("Async copies only support <=256 elements per dim") and wants
the newer ``plgpu.kernel`` API, while the Triton lowering handles this kernel's tiles and the
in-kernel loops over ``pl.ds`` slices of a row block directly, and also serves ROCm. So GPUs
use Triton (``jax.experimental.pallas.triton.CompilerParams``) and TPUs use Mosaic; one
kernel body serves both through `jax.lax.platform_dependent`, and every other backend (CPU)
runs it in interpret mode (correct, not fast: use ``impl="select"`` there).

TPU note: a program's block is ``block_rows`` whole rows in VMEM (double-buffered, input and
output): ``4 * block_rows * n * itemsize`` bytes must fit the scoped VMEM limit (16 MiB by
default on v5e: n <= 2^17 float32 rows with ``block_rows=8``). GPU (Triton) reads tiles from
global memory and has no such limit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kwta_jax.keys import rank_keys

__all__ = ["kwta_pallas", "kwta_reference", "kwta_rows_pallas"]

_INT_MIN = np.int32(-(2**31))
_INT_MAX = np.int32(2**31 - 1)
# Low key bits that are constant for floats widened to float32 (23 - mantissa bits).
_SKIP_BITS = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 16, np.dtype(np.float16): 13}
DEFAULT_BLOCK_COLS = 1024


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
    keys = rank_keys(x2d, use_abs)
    threshold_key = lax.top_k(keys, k)[0][:, k - 1]
    y2d = jnp.where(keys >= threshold_key[:, None], x2d, jnp.zeros((), x2d.dtype))
    return y2d, threshold_key


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


def _kwta_kernel(x_ref, y_ref, th_ref, *, k, n, use_abs, block_cols, skip_bits):
    """One program: ``x_ref, y_ref: [block_rows, n_pad]``, ``th_ref: [block_rows, 1]`` int32.

    ``th_ref`` receives the threshold as an *unsigned* key bit pattern (int32 storage) of the
    float32-widened values.
    """
    block_rows, n_pad = x_ref.shape
    num_tiles = n_pad // block_cols
    col = lax.broadcasted_iota(jnp.int32, (block_rows, block_cols), 1)

    def tile(j):
        start = pl.multiple_of(j * block_cols, block_cols)
        return start, x_ref[:, pl.ds(start, block_cols)]

    def count_ge(cand_signed):
        def body(j, acc):
            start, xt = tile(j)
            hit = (_signed_keys(xt, use_abs) >= cand_signed) & (col + start < n)
            # float32 counts: int reductions are not lowered by every backend; exact < 2^24.
            return acc + jnp.sum(hit.astype(jnp.float32), axis=1, keepdims=True)

        return lax.fori_loop(0, num_tiles, body, jnp.zeros((block_rows, 1), jnp.float32))

    def bisect(i, prefix):
        bit = lax.shift_left(jnp.int32(1), jnp.int32(31) - i)
        cand = prefix | bit  # unsigned key bit pattern
        keep = count_ge(cand ^ _INT_MIN) >= np.float32(k)
        return jnp.where(keep, cand, prefix)

    prefix = lax.fori_loop(0, 32 - skip_bits, bisect, jnp.zeros((block_rows, 1), jnp.int32))
    th_ref[...] = prefix
    threshold_signed = prefix ^ _INT_MIN

    def apply(j, carry):
        start, xt = tile(j)
        keep = _signed_keys(xt, use_abs) >= threshold_signed
        y_ref[:, pl.ds(start, block_cols)] = jnp.where(keep, xt, jnp.zeros((), xt.dtype))
        return carry

    lax.fori_loop(0, num_tiles, apply, 0)


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


@functools.partial(
    jax.jit, static_argnames=("k", "use_abs", "block_rows", "block_cols", "interpret")
)
def kwta_rows_pallas(
    x2d: jax.Array,
    k: int,
    use_abs: bool = False,
    *,
    block_rows: int | None = None,
    block_cols: int = DEFAULT_BLOCK_COLS,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact k-WTA rows with the fused Pallas kernel (row implementation ``"pallas"``).

    Args:
      x2d: ``[rows, n]`` float32, bfloat16 or float16 (float64 is delegated to
        `kwta_jax.select.kwta_rows_select`: TPUs have no float64 and the kernel's keys are
        32-bit).
      k: winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.
      block_rows: rows per program (default 8 for 32-bit, 16 for 16-bit dtypes: one native
        TPU tile of sublanes).
      block_cols: width of a counting tile (power of two, multiple of 128); rows longer than
        this are counted in several passes.
      interpret: force interpret mode (default: interpret exactly when the platform has no
        Pallas lowering, i.e. CPU).

    Returns:
      ``(y2d [rows, n] same dtype, threshold_key [rows])``, bit-identical to `kwta_reference`.

    Raises:
      TypeError: non-floating ``x2d``. ValueError: bad ``k`` or block sizes.
    """
    if x2d.ndim != 2:
        raise ValueError(f"kwta_rows_pallas: x2d must be [rows, n]; got shape {x2d.shape}.")
    dtype = np.dtype(x2d.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"kwta_rows_pallas: x2d must be floating; got {dtype}.")
    rows, n = x2d.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"kwta_rows_pallas: k must be an int in [1, n={n}]; got {k!r}.")
    if block_cols < 128 or block_cols & (block_cols - 1):
        raise ValueError(
            f"kwta_rows_pallas: block_cols must be a power of two >= 128; got {block_cols}."
        )
    if dtype == np.float64:
        from kwta_jax.select import kwta_rows_select  # keys are 64-bit: no kernel path

        return kwta_rows_select(x2d, k, use_abs)
    skip_bits = _SKIP_BITS[dtype]
    if block_rows is None:
        block_rows = 8 if dtype.itemsize == 4 else 16
    if block_rows < 1:
        raise ValueError(f"kwta_rows_pallas: block_rows must be >= 1; got {block_rows}.")
    # Never wider than the (padded) row, so short rows are not padded to a full tile.
    block_cols = min(block_cols, max(128, 1 << (n - 1).bit_length()))
    rows_pad = -(-rows // block_rows) * block_rows
    n_pad = -(-n // block_cols) * block_cols
    xp = x2d
    if (rows_pad, n_pad) != (rows, n):
        # Padded columns are masked out of the counts; padded rows are discarded.
        xp = jnp.pad(x2d, ((0, rows_pad - rows), (0, n_pad - n)))

    kernel = functools.partial(
        _kwta_kernel, k=k, n=n, use_abs=use_abs, block_cols=block_cols, skip_bits=skip_bits
    )

    def call(compiler_params=None, interpret_mode=False):
        return pl.pallas_call(
            kernel,
            out_shape=(
                jax.ShapeDtypeStruct((rows_pad, n_pad), dtype),
                jax.ShapeDtypeStruct((rows_pad, 1), jnp.int32),
            ),
            grid=(rows_pad // block_rows,),
            in_specs=[pl.BlockSpec((block_rows, n_pad), lambda i: (i, 0))],
            out_specs=(
                pl.BlockSpec((block_rows, n_pad), lambda i: (i, 0)),
                pl.BlockSpec((block_rows, 1), lambda i: (i, 0)),
            ),
            compiler_params=compiler_params,
            interpret=interpret_mode,
            name="kwta",
        )(xp)

    if interpret:
        y, th = call(interpret_mode=True)
    else:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas import triton as pltriton

        y, th = lax.platform_dependent(
            xp,
            tpu=lambda _: call(pltpu.CompilerParams(dimension_semantics=("parallel",))),
            cuda=lambda _: call(pltriton.CompilerParams(num_warps=4, num_stages=1)),
            rocm=lambda _: call(pltriton.CompilerParams(num_warps=4, num_stages=1)),
            default=lambda _: call(interpret_mode=True),
        )
    y = y[:rows, :n]
    threshold_key = _threshold_to_key(th[:rows, 0], dtype, skip_bits)
    return y, threshold_key


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
