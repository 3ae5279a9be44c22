"""A plain NumPy k-WTA, written independently of the library (no rank keys), for tests."""

from __future__ import annotations

import numpy as np


def numpy_kwta(x: np.ndarray, k: int, axes: tuple[int, ...], use_abs: bool = False) -> np.ndarray:
    """k-WTA of ``x`` over ``axes`` (non-negative, sorted), row by row, in float64.

    Ordering: IEEE comparisons (so -0.0 == +0.0) with every NaN above +inf, as documented in
    `kwta_jax.ops`. Returns an array of ``x``'s dtype holding ``x`` at winners, +0 elsewhere.
    """
    x = np.asarray(x)
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    perm = rest + tuple(axes)
    xt = np.transpose(x, perm)
    rows = xt.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
    out = np.zeros_like(rows)
    for i, row in enumerate(rows):
        v = row.astype(np.float64)
        if use_abs:
            v = np.abs(v)
        threshold = np.sort(v)[v.size - k]  # ascending sort puts NaNs last, i.e. largest
        mask = np.isnan(v) if np.isnan(threshold) else (v >= threshold) | np.isnan(v)
        out[i] = np.where(mask, row, np.zeros((), row.dtype))
    return np.transpose(out.reshape(xt.shape), np.argsort(perm))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bit pattern (NaN- and ±0-exact)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    unsigned = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(unsigned), b.view(unsigned)))


def numpy_rank_keys(x: np.ndarray, use_abs: bool = False) -> np.ndarray:
    """Unsigned keys in the documented order, from the bits (for tests of threshold keys).

    Larger key = larger value; -0.0 and +0.0 share a key; every NaN has the largest key.
    """
    x = np.asarray(x)
    unsigned = np.dtype(f"u{x.dtype.itemsize}")
    bits = x.view(unsigned)
    sign = unsigned.type(1 << (8 * x.dtype.itemsize - 1))
    if use_abs:
        bits = bits & ~sign
    magnitude = bits & ~sign
    inf_bits = np.array(np.inf, x.dtype).view(unsigned)
    keys = np.where((bits & sign) != 0, ~bits, bits | sign)  # negative: larger |x| is smaller
    keys = np.where(magnitude == 0, sign, keys)
    keys = np.where(magnitude > inf_bits, np.iinfo(unsigned).max, keys)
    return keys.astype(unsigned)


def numpy_threshold_keys(x: np.ndarray, k: int, use_abs: bool = False) -> np.ndarray:
    """The k-th largest `numpy_rank_keys` of every row (last axis) of ``x``."""
    keys = numpy_rank_keys(x, use_abs)
    return np.sort(keys, axis=-1)[..., keys.shape[-1] - k]
