"""Fast exact k-th-largest selection in plain XLA: the ``"select"`` selector.

`jax.lax.top_k` on XLA:CPU sorts whole rows (costs: docs/benchmarks.md), and a 32-step bit
bisection is exact but costs one full pass over the data per bit. This module finds
each row's exact k-th largest rank key (see `kwta_jax.rank_keys.rank_keys`) with a handful of
passes, by *interpolation search on counts*:

1. A strided sample of each row (about ``2 sqrt(n)`` keys, at most 512, sorted) proposes the
   first candidates around the sample quantile of the threshold; the first pass also finds
   each row's min and max key.
2. Every pass evaluates ``K`` candidate keys ``c`` for every row in **one** fused XLA variadic
   reduction, producing per candidate ``count(key >= c)``, ``min{key >= c}`` (successor) and
   ``max{key < c}`` (predecessor). The bracket ``[lo, hi]`` that must hold the threshold
   shrinks to the nearest *data* keys around it, so ties and gaps collapse immediately.
3. Next candidates interpolate linearly between ``lo`` and ``hi`` from the counts (the data are
   locally near-uniform inside a narrow bracket), spread over about one binomial standard
   deviation of the estimated position. A row whose bracket did not halve in key width probes
   the key-space midpoint next, so the width halves at least every two passes: at most
   ``2 * bits + 1`` passes on adversarial data, a handful on smooth data.
4. A row is finished when ``lo == hi`` or when a bracket end has exactly ``k`` (resp.
   ``k - 1``) keys at or above it (then that end is the k-th largest key).

Everything is exact integer arithmetic on the keys; the floating-point interpolation only
chooses *where* to probe, so it can cost passes but never correctness.

Why a variadic reduction: XLA:CPU (jax 0.10) lowers a plain ``sum(compare(...))`` by
materialising the compared array and handing it to a library reduction, a full write and read
per pass; a variadic ``lax.reduce`` stays one fused, vectorised, multi-threaded loop that reads
``x`` once (measurements: docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.rank_keys import apply_threshold, key_dtype, rank_keys

__all__ = ["default_unrolled_passes", "kwta_rows_select", "select_threshold_keys"]

# Candidate keys per refinement pass, evenly spread over +-_SPREAD standard deviations of the
# estimated position; the last one becomes the key-space midpoint for rows whose previous pass
# did not halve their bracket (progress guarantee). Tuned on [128, 65536] float32 on a 2-core
# CPU (pass counts x measured cost per candidate): more candidates cost more compute per pass
# (the pass is compute-bound), fewer cost more passes.
_PASS_CANDIDATES = 3
_SPREAD = 1.0
# First-pass probes: sample quantiles spanning +-_FIRST_SPREAD sample standard deviations.
_FIRST_CANDIDATES = 7
_FIRST_SPREAD = 3.0
# Largest sample per row for the first pass (sorted).
_SAMPLE = 512
# Refinement passes before the data-dependent loop, per backend: on XLA:CPU a loop iteration
# is cheap, on GPU each one waits for the device (docs/benchmarks.md).
_UNROLLED_PASSES = {"cpu": 0, "gpu": 0, "cuda": 0, "rocm": 0}


def _pass_stats(x2d: jax.Array, cands: jax.Array, use_abs: bool, extremes: bool = False):
    """One fused pass over ``x2d`` for every candidate.

    Args:
      x2d: ``[rows, n]`` floating.
      cands: ``[rows, K]`` candidate keys (key dtype of ``x2d``).
      use_abs: rank by ``|x|``.
      extremes: also return each row's smallest and largest key (same pass).

    Returns:
      ``(count [rows, K] int32, succ [rows, K], pred [rows, K])``: number of keys ``>= c``,
      smallest key ``>= c`` (key max if none) and largest key ``< c`` (0 if none); with
      ``extremes``, followed by ``min_key [rows]`` and ``max_key [rows]``.
    """
    keys = rank_keys(x2d, use_abs)
    kdt = keys.dtype
    top = np.array(np.iinfo(kdt).max, kdt)
    zero = np.array(0, kdt)
    num = cands.shape[1]
    operands, inits = [], []
    for j in range(num):
        ge = keys >= cands[:, j : j + 1]
        operands += [ge.astype(jnp.int32), jnp.where(ge, keys, top), jnp.where(ge, zero, keys)]
        inits += [np.int32(0), top, zero]
    if extremes:
        operands += [keys, keys]
        inits += [top, zero]

    def combine(a, b):
        out = []
        for j in range(num):
            out += [
                a[3 * j] + b[3 * j],
                jnp.minimum(a[3 * j + 1], b[3 * j + 1]),
                jnp.maximum(a[3 * j + 2], b[3 * j + 2]),
            ]
        if extremes:
            out += [jnp.minimum(a[-2], b[-2]), jnp.maximum(a[-1], b[-1])]
        return tuple(out)

    res = lax.reduce(tuple(operands), tuple(inits), combine, (1,))
    stats = res[: 3 * num]
    count = jnp.stack(stats[0::3], axis=1)
    succ = jnp.stack(stats[1::3], axis=1)
    pred = jnp.stack(stats[2::3], axis=1)
    if extremes:
        return count, succ, pred, res[-2], res[-1]
    return count, succ, pred


def _pick(values: jax.Array, idx: jax.Array) -> jax.Array:
    """``values[r, idx[r]]`` for ``values: [rows, K]``, ``0 <= idx < K`` (no gather: K is tiny)."""
    onehot = jnp.arange(values.shape[1])[None, :] == idx[:, None]
    return jnp.max(jnp.where(onehot, values, jnp.zeros((), values.dtype)), axis=1)


def _update(state, cands, count, succ, pred, k):
    """Shrinks each row's bracket ``[lo, hi]`` with one pass's statistics.

    Invariants (``t`` = the k-th largest key): ``lo <= t <= hi``; ``c_lo = count(key >= lo)``
    ``>= k``; ``c_hi = count(key > hi) < k``; ``lo`` and ``hi`` are data keys.
    ``cands`` must be sorted ascending and lie in ``(lo, hi]`` for unfinished rows.
    """
    lo, hi, c_lo, c_hi = state
    num = cands.shape[1]
    # count is non-increasing in the candidate, so the candidates with count >= k are a prefix.
    n_ge = jnp.sum(count >= k, axis=1)
    has_a = n_ge > 0
    has_b = n_ge < num
    ia = jnp.maximum(n_ge - 1, 0)
    ib = jnp.minimum(n_ge, num - 1)
    # t >= c_a and t is a data key, so t >= succ(c_a); t < c_b, so t <= pred(c_b).
    lo = jnp.where(has_a, _pick(succ, ia), lo)
    c_lo = jnp.where(has_a, _pick(count, ia), c_lo)
    hi = jnp.where(has_b, _pick(pred, ib), hi)
    c_hi = jnp.where(has_b, _pick(count, ib), c_hi)
    # Exactly k keys at or above lo: lo is the k-th largest. Exactly k - 1 above hi: hi is.
    hi = jnp.where(c_lo == k, lo, hi)
    lo = jnp.where(c_hi == k - 1, hi, lo)
    return lo, hi, c_lo, c_hi


def _interpolated_candidates(state, k, float_dtype, slow):
    """``[rows, K]`` sorted candidates in ``(lo, hi]`` for the next pass (see module doc).

    ``slow: [rows] bool`` marks rows whose last pass did not halve the bracket's key width;
    they probe the key-space midpoint instead of the outermost interpolated probe.
    """
    lo, hi, c_lo, c_hi = state
    kdt = lo.dtype
    width = hi - lo  # >= 0, exact in the key dtype
    m = (c_lo - c_hi).astype(float_dtype)  # keys inside [lo, hi]; >= 2 when lo < hi
    u = (c_lo - k).astype(float_dtype)  # estimated position of t above lo, in keys
    span = jnp.maximum(m - 1, 1)
    sigma = jnp.sqrt(u * jnp.maximum(m - 1 - u, 0) / span) + 0.5
    scale = width.astype(float_dtype) / span
    zs = np.linspace(-_SPREAD, _SPREAD, _PASS_CANDIDATES)

    def at(pos):
        off = jnp.clip(jnp.ceil(pos * scale), 1, width.astype(float_dtype))
        # The float estimate may round past width; clamp again in exact integer arithmetic.
        return lo + jnp.minimum(off.astype(kdt), width)

    # Increasing positions give non-decreasing probes (ceil and clip are monotone).
    probes = [at(u + z * sigma) for z in zs]
    mid = lo + width - width // 2  # in (lo, hi] when lo < hi: halves the key width
    # Slow rows: drop the last probe and insert `mid` into the sorted rest (elementwise
    # insertion: cheaper than an XLA sort per pass).
    rest = probes[:-1]
    inserted, carry = [], mid
    for p in rest:
        inserted.append(jnp.minimum(p, carry))
        carry = jnp.maximum(p, carry)
    inserted.append(carry)
    probes = [jnp.where(slow, a, b) for a, b in zip(inserted, probes, strict=True)]
    return jnp.stack(probes, axis=1)


def _sample_candidates(x2d, k, use_abs, num):
    """First-pass candidates: ``[rows, num]`` sample quantiles around the threshold's rank."""
    rows, n = x2d.shape
    # About sqrt(n) * 2 keys, at most _SAMPLE: XLA:CPU sorts are slow per key, so a big sample
    # would cost more than the passes it saves on short rows.
    size = min(_SAMPLE, max(32, 2 * int(np.sqrt(n))))
    # An odd stride so that channels-last rows (channel count a power of two) are all sampled.
    stride = max(1, n // size)
    stride = stride - 1 if stride % 2 == 0 else stride
    sample = lax.sort(rank_keys(x2d[:, ::stride], use_abs), dimension=1)
    s = sample.shape[1]
    p = k / n
    centre = (1.0 - p) * s  # ascending index of the threshold's estimate
    sigma = float(np.sqrt(s * p * (1.0 - p))) + 1.0
    zs = np.linspace(-_FIRST_SPREAD, _FIRST_SPREAD, num)
    idx = np.clip(np.round(centre + zs * sigma).astype(np.int64), 0, s - 1)
    return sample[:, idx]


def select_threshold_keys(
    x2d: jax.Array,
    k: int,
    use_abs: bool = False,
    *,
    return_passes: bool = False,
    unrolled_passes: int = 0,
):
    """Exact k-th largest rank key of every row, by interpolation search on counts.

    Args:
      x2d: ``[rows, n]`` floating array.
      k: ``1 <= k <= n``.
      use_abs: rank by ``|x|``.
      return_passes: also return the number of refinement passes (for tuning and tests).
      unrolled_passes: refinement passes to run unconditionally before the data-dependent
        loop (each finished row just re-probes its threshold). On GPU a loop iteration costs a
        device-to-host synchronisation; a fixed pass costs only its read of ``x2d``.

    Returns:
      ``threshold_key [rows]`` (key dtype of ``x2d``), equal to
      ``lax.top_k(rank_keys(x2d, use_abs), k)[0][:, k - 1]``; with ``return_passes``, the
      tuple ``(threshold_key, passes: int32 scalar)``.
    """
    rows, n = x2d.shape
    kdt = key_dtype(x2d.dtype)
    float_dtype = jnp.float64 if kdt.itemsize == 8 else jnp.float32
    # Pass 1: sample quantiles as candidates, plus the row's min/max keys (so that the bracket
    # ends are data keys even when the threshold falls outside every candidate).
    first = _sample_candidates(x2d, k, use_abs, _FIRST_CANDIDATES)
    count, succ, pred, lo, hi = _pass_stats(x2d, first, use_abs, extremes=True)
    state = (lo, hi, jnp.full((rows,), n, jnp.int32), jnp.zeros((rows,), jnp.int32))
    state = _update(state, first, count, succ, pred, k)

    def cond(carry):
        (lo, hi, _, _), _, _ = carry
        return jnp.any(lo != hi)

    def body(carry):
        state, slow, passes = carry
        lo, hi, _, _ = state
        cands = _interpolated_candidates(state, k, float_dtype, slow)
        # Finished rows probe their own threshold, which leaves their state unchanged.
        cands = jnp.where((lo == hi)[:, None], hi[:, None], cands)
        count, succ, pred = _pass_stats(x2d, cands, use_abs)
        new = _update(state, cands, count, succ, pred, k)
        slow = (new[1] - new[0]) > (hi - lo) // 2
        return new, slow, passes + 1

    # All-False, derived from `lo` so that it varies over the same `jax.shard_map` axes as the
    # rest of the carry (a fresh constant would not, and while_loop rejects the mismatch).
    slow = state[0] != state[0]
    carry = (state, slow, jnp.int32(1))
    for _ in range(unrolled_passes):
        # Fixed passes ahead of the loop: no data-dependent loop condition for them, which on
        # GPU means no device-to-host synchronisation per pass.
        carry = body(carry)
    (lo, _, _, _), _, passes = lax.while_loop(cond, body, carry)
    if return_passes:
        return lo, passes
    return lo


def default_unrolled_passes(backend: str) -> int:
    """Refinement passes run before the loop on ``backend`` (see `select_threshold_keys`)."""
    return _UNROLLED_PASSES.get(backend, 0)


def kwta_rows_select(
    x2d: jax.Array, k: int, use_abs: bool, *, unrolled_passes: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Exact k-WTA rows via `select_threshold_keys` and `apply_threshold` (the op layer's apply).

    For kernels that fall back to ``"select"`` and for the GPU checks; the op itself uses
    `select_threshold_keys` as its selector.

    Args:
      x2d: ``[rows, n]`` floating array.
      k: number of winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.
      unrolled_passes: see `select_threshold_keys` (default: `default_unrolled_passes` of the
        default backend).

    Returns:
      ``(y2d [rows, n] same dtype, threshold_key [rows] unsigned)``, bit-identical to
      `apply_threshold` of `kwta_jax.ops.topk_threshold_keys`.
    """
    if unrolled_passes is None:
        unrolled_passes = default_unrolled_passes(jax.default_backend())
    threshold_key = select_threshold_keys(x2d, k, use_abs, unrolled_passes=unrolled_passes)
    return apply_threshold(x2d, threshold_key, use_abs)
