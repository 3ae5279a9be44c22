"""Rank keys: an order-preserving map from floats to unsigned integers, and the k-WTA apply.

Every k-WTA implementation ranks units by these keys, which is what makes them agree
bit-for-bit on ties, signed zeros, infinities and NaNs. A selector (`kwta_jax.ops`) finds each
row's threshold key; `apply_threshold` is the one place that turns rows and their threshold
keys into the k-WTA output, and `where_bits`'s derivative is the op's one derivative rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "apply_threshold",
    "key_dtype",
    "rank_keys",
    "transpose_bits",
    "where_bits",
    "winner_mask",
]

_KEY_DTYPES = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def key_dtype(dtype) -> np.dtype:
    """Unsigned integer dtype of the rank keys for floating ``dtype`` (same bit width)."""
    return np.dtype(_KEY_DTYPES[np.dtype(dtype).itemsize])


def rank_keys(x: jax.Array, use_abs: bool = False) -> jax.Array:
    """Order-preserving unsigned keys of a floating array.

    ``rank_keys(a) >= rank_keys(b)`` iff ``a >= b`` under this module's ordering: IEEE order
    with ``-0.0 == +0.0``, and every NaN equal to each other and above ``+inf``.
    Subnormals are ordered as in IEEE arithmetic without flush-to-zero, on every backend.

    Args:
      x: floating array of any shape (float16, bfloat16, float32 or float64).
      use_abs: rank by ``|x|`` instead of ``x``.

    Returns:
      Unsigned integer array (``uint16``/``uint32``/``uint64``, same bit width as ``x``) of
      the shape of ``x``.
    """
    # Integer ops only: float comparisons would flush subnormals to zero on some backends
    # (XLA:CPU), making the order depend on the device.
    kdt = key_dtype(x.dtype)
    nbits = 8 * kdt.itemsize
    sign = np.array(1 << (nbits - 1), kdt)
    top = np.array(np.iinfo(kdt).max, kdt)
    inf_bits = np.array(np.inf, x.dtype).view(kdt)
    bits = lax.bitcast_convert_type(x, kdt)
    if use_abs:
        bits = bits & ~sign
    is_nan = (bits & ~sign) > inf_bits
    # -0.0 -> +0.0, so that the two zeros get one key (they compare equal as floats).
    bits = jnp.where(bits == sign, np.array(0, kdt), bits)
    # Negative floats: flip every bit (larger magnitude -> smaller key); non-negative floats:
    # set the sign bit (so they sit above all negatives).
    keys = jnp.where(bits >= sign, ~bits, bits | sign)
    return jnp.where(is_nan, top, keys)


@jax.custom_jvp
def where_bits(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``where(mask, x, +0)`` selected on the bit pattern of ``x``; differentiable in ``x``.

    A float ``where`` (or transpose) may canonicalise NaN payloads and flush subnormals on
    some backends (XLA:CPU with AVX512-BF16 does both for bfloat16); on the integer view a
    kept value keeps every bit, on every backend. The derivative is the float ``where``'s
    (integer bitcasts alone would have none).
    """
    kdt = key_dtype(x.dtype)
    bits = jnp.where(mask, lax.bitcast_convert_type(x, kdt), np.array(0, kdt))
    return lax.bitcast_convert_type(bits, x.dtype)


@where_bits.defjvp
def _where_bits_jvp(primals, tangents):
    (mask, x), (_, t) = primals, tangents
    return where_bits(mask, x), jnp.where(mask, t, jnp.zeros((), t.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def transpose_bits(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """``jnp.transpose(x, perm)`` moved as bit patterns (see `where_bits`); differentiable.

    Non-floating arrays (a boolean mask) are transposed as they are.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.transpose(x, perm)
    kdt = key_dtype(x.dtype)
    return lax.bitcast_convert_type(jnp.transpose(lax.bitcast_convert_type(x, kdt), perm), x.dtype)


@transpose_bits.defjvp
def _transpose_bits_jvp(perm, primals, tangents):
    (x,), (t,) = primals, tangents
    return transpose_bits(x, perm), jnp.transpose(t, perm)


def winner_mask(x2d: jax.Array, threshold_key: jax.Array, use_abs: bool = False) -> jax.Array:
    """``rank_keys(x2d) >= threshold_key[..., None]``: the winners of each row (no derivative).

    Args:
      x2d: ``[..., n]`` floating.
      threshold_key: ``[...]`` rank keys (`key_dtype` of ``x2d``).
      use_abs: rank by ``|x|``.

    Returns:
      Boolean array of the shape of ``x2d``.
    """
    return rank_keys(lax.stop_gradient(x2d), use_abs) >= threshold_key[..., None]


def apply_threshold(
    x2d: jax.Array, threshold_key: jax.Array, use_abs: bool = False
) -> tuple[jax.Array, jax.Array]:
    """k-WTA output of rows given their threshold keys: ``(y2d, threshold_key)``.

    Plain XLA (integer ops, a compare and a select), so it fuses with what comes before and
    after it; its derivative is `where_bits`'s, ``upstream * mask`` as a ``where``.

    Args:
      x2d: ``[..., n]`` floating.
      threshold_key: ``[...]`` rank keys (`key_dtype` of ``x2d``), constant (no derivative).
      use_abs: rank by ``|x|``.

    Returns:
      ``y2d [..., n]``: ``x`` (bit for bit) where ``rank_keys(x) >= threshold``, ``+0``
      elsewhere; and ``threshold_key`` unchanged.
    """
    return where_bits(winner_mask(x2d, threshold_key, use_abs), x2d), threshold_key
