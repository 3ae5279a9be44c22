"""k-Winners-Take-All (k-WTA): keep the k largest activations of each competition group.

Semantics follow the official PyTorch code of Xiao et al. (ICLR 2020,
a554b554/kWTA-Activation):

* ``k = max(1, int(ratio * n))`` where ``n`` is the size of a competition group (``int``
  truncates, exactly like the official ``int(self.sr * size)``; some re-implementations use
  ``ceil``, which keeps one more unit whenever ``ratio * n`` is not an integer), or an explicit
  ``k``.
* The threshold of a group is its k-th largest value; the output is ``x`` where
  ``x >= threshold`` and ``0`` elsewhere. Ties at the threshold are all kept, so more than ``k``
  units may survive (the official code does the same).
* The threshold is computed **per sample** (per row of the batch), never from the first sample
  of the batch.

Ordering of special values (every implementation agrees on it):

* ``-0.0`` and ``+0.0`` compare equal (IEEE), so they tie.
* ``+inf`` is larger than every finite value and ``-inf`` smaller.
* Every NaN (any sign or payload) ranks *above* ``+inf`` (like ``torch.topk`` and NumPy's
  sort), and all NaNs tie with each other. A NaN that wins is propagated unchanged; if at least
  ``k`` entries of a group are NaN, only the NaNs survive.

Bits: every implementation gives the same output as the ``lax.top_k`` reference, bit for bit,
and a winner is its input's bit pattern (NaN payloads, signalling NaNs, subnormals, the sign of
zero), eagerly, under ``jit`` and ``vmap``, for ``groups="channel"`` (its transposes move bit
patterns) and for a batch-sharded input on several devices: the output is always selected from
the caller's own copy of ``x`` with integer operations. What XLA does outside the op can still
change bits: XLA:CPU (jaxlib 0.10.2) runs a bfloat16 all-gather in float32 (convert, gather,
convert back), which turns every NaN into 0x7FC0 / 0xFFC0, so resharding a bfloat16 output
(e.g. ``with_sharding_constraint`` to replicated) loses its NaN payloads. Inside the op such a
gathered copy only feeds a selector (the FFI kernels make XLA gather their input), whose rank
keys treat all NaNs alike.

With ``use_abs=True`` units are ranked by ``|x|`` but keep their signed value (the official
``*_abs`` variants).

Gradient: ``d kwta(x) = t * mask`` where ``mask = x >= threshold``; the threshold is treated as
a constant (it is piecewise constant in ``x``), and a non-finite upstream value at a loser gives
0 (a ``where``, not a product). ``grad``, ``vjp`` (``g * mask``), ``jvp``, ``jit``, ``vmap``,
``remat`` and higher derivatives all work.

Implementations (``impl=``) are *selectors*: they only find each row's threshold key (see
`Selector`). The op is then ``y = where(rank_keys(x) >= threshold, x, 0)`` and its derivative
``where(mask, upstream, 0)``, written once (`kwta_jax.rank_keys.apply_threshold`) in plain XLA:
the forward is the selector's read of ``x`` plus one fused pass, the backward one fused pass,
and both fuse with the neighbouring ops. Validation and grouping are shared too.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.backward import SURROGATES, active_scope
from kwta_jax.kernels.kwta_cpu import cpu_forward, cpu_kernel_available, cpu_threshold_keys
from kwta_jax.kernels.kwta_cuda import cuda_kernel_available, cuda_threshold_keys
from kwta_jax.kernels.kwta_pallas import pallas_threshold_keys, triton_available
from kwta_jax.rank_keys import apply_threshold, key_dtype, rank_keys, transpose_bits, winner_mask
from kwta_jax.selection import select_threshold_keys

__all__ = [
    "FUSED_FORWARD",
    "GROUPS",
    "IMPLEMENTATIONS",
    "Selector",
    "canonical_axes",
    "canonical_ratio",
    "competition_axes",
    "key_dtype",
    "kwta",
    "kwta_bpda",
    "kwta_mask",
    "kwta_rows",
    "num_winners",
    "rank_keys",
    "resolve_impl",
    "threshold_keys",
    "topk_threshold_keys",
]

Groups = Literal["sample", "channel"]
GROUPS: tuple[str, ...] = ("sample", "channel")

# A selector maps ``(x2d, k, use_abs)`` to ``threshold_key``: ``x2d: [rows, n]`` floating (a
# selector that supports ``vmap`` treats every leading dim as a row), ``k`` a Python int in
# ``[1, n]``, ``use_abs`` a bool; ``threshold_key: [rows]`` in ``key_dtype(x2d.dtype)`` is each
# row's exact k-th largest rank key (`rank_keys` order: -0 == +0, NaNs tie above +inf). The op
# calls selectors on ``lax.stop_gradient`` values only, so none needs a derivative rule.
Selector = Callable[[jax.Array, int, bool], jax.Array]
# Optional fused forward of a selector: ``(x2d, k, use_abs) -> (y2d, threshold_key)`` with ``y2d``
# bit-identical to `apply_threshold`'s. Used for the undifferentiated forward only (a kernel may
# write ``y`` faster than select + apply); under differentiation the op uses the selector and
# `apply_threshold`, whose derivative is the op's one rule.
FusedForward = Callable[[jax.Array, int, bool], tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------------------------
# Selectors.
# --------------------------------------------------------------------------------------------


def topk_threshold_keys(x2d: jax.Array, k: int, use_abs: bool = False) -> jax.Array:
    """Reference selector: `jax.lax.top_k` on the rank keys.

    Args:
      x2d: ``[..., n]`` floating array.
      k: number of winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.

    Returns:
      ``threshold_key [...]`` (`key_dtype` of ``x2d``): each row's k-th largest rank key.
    """
    return lax.top_k(rank_keys(x2d, use_abs), k)[0][..., k - 1]


# Every selector must agree bit-for-bit with "topk". Kernel modules add theirs here.
IMPLEMENTATIONS: dict[str, Selector] = {
    "topk": topk_threshold_keys,
    # Plain XLA interpolation search on counts (kwta_jax/selection.py): any backend.
    "select": select_threshold_keys,
    # Pallas kernel (kernels/kwta_pallas.py): Triton on GPU, Mosaic on TPU, interpret mode
    # (slow) on CPU.
    "pallas": pallas_threshold_keys,
    # CUDA kernel through XLA FFI (kernels/kwta_cuda.py): CUDA GPUs only, compiled with nvcc
    # at first use.
    "cuda": cuda_threshold_keys,
    # C++ sample-bracket selection through XLA FFI (kernels/kwta_cpu.py): CPU backend only,
    # compiled with the system C++ compiler at first use.
    "cpu": cpu_threshold_keys,
}
# Selectors with a fused forward kernel (see `FusedForward`). On CPU the kernel writes each row
# while it is still in cache from its selection, so the plain forward reads x once, not twice
# (docs/benchmarks.md: forward 1.3-1.8x faster than select + XLA apply).
FUSED_FORWARD: dict[str, FusedForward] = {"cpu": cpu_forward}


def resolve_impl(impl: str) -> str:
    """Name of the selector that ``impl`` selects on the default backend.

    ``"auto"`` picks the fastest exact selector available for `jax.default_backend`
    (measurements behind each choice: docs/benchmarks.md). How a few winners in long rows are
    found (the small-k path) is the selector's own choice, by k and n.
    """
    if impl == "auto":
        backend = jax.default_backend()
        if backend in ("gpu", "cuda", "rocm"):
            # Provisional until both kernels are timed on one GPU (docs/benchmarks.md: the
            # Pallas kernel is the measured one; the CUDA kernel has not run on a GPU yet).
            if triton_available():
                return "pallas"
            if cuda_kernel_available():
                return "cuda"
            return "select"
        # Several CPU devices (data parallelism): XLA partitions "select" along the sharded
        # batch, but it would gather the whole batch onto every device for an FFI call.
        single_cpu = backend == "cpu" and jax.local_device_count() == 1
        if single_cpu and cpu_kernel_available():
            return "cpu"
        # TPU: "select"; the Pallas kernel lowers for Mosaic but has not run on a TPU yet.
        return "select"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"kwta: impl must be 'auto' or one of {sorted(IMPLEMENTATIONS)}; got {impl!r}."
        )
    return impl


# --------------------------------------------------------------------------------------------
# The differentiable row op.
# --------------------------------------------------------------------------------------------


def threshold_keys(x2d: jax.Array, k: int, use_abs: bool, impl: str) -> jax.Array:
    """Each row's k-th largest rank key with selector ``impl``, as a constant (no derivative)."""
    return IMPLEMENTATIONS[impl](lax.stop_gradient(x2d), k, use_abs)


def kwta_rows(x2d: jax.Array, k: int, use_abs: bool = False, impl: str = "topk") -> jax.Array:
    """k-WTA over the last axis of ``x2d: [rows, n]`` with selector ``impl``.

    No validation: `kwta` is the public entry point. ``impl`` must be a key of
    `IMPLEMENTATIONS` (not ``"auto"``).
    """
    # One device only: under SPMD partitioning XLA gathers an opaque call's input (bfloat16 in
    # float32, which canonicalises NaN payloads), so there the output must be selected from
    # the shard's own bits by apply_threshold.
    if impl in FUSED_FORWARD and jax.device_count() == 1:
        return _kwta_rows_fused(x2d, k, use_abs, impl)
    return apply_threshold(x2d, threshold_keys(x2d, k, use_abs, impl), use_abs)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _kwta_rows_fused(x2d: jax.Array, k: int, use_abs: bool, impl: str) -> jax.Array:
    return FUSED_FORWARD[impl](x2d, k, use_abs)[0]


@_kwta_rows_fused.defjvp
def _kwta_rows_fused_jvp(k, use_abs, impl, primals, tangents):
    # Differentiated: the selector and apply_threshold, whose derivative is the op's rule.
    threshold_key = threshold_keys(primals[0], k, use_abs, impl)
    return jax.jvp(lambda v: apply_threshold(v, threshold_key, use_abs)[0], primals, tangents)


# --------------------------------------------------------------------------------------------
# Validation and grouping.
# --------------------------------------------------------------------------------------------


def _check_dtype(x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            "kwta: x must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {dtype}. Cast integer or boolean inputs first, e.g. x.astype(jnp.float32)."
        )


def check_static_args(
    ratio: float | None,
    k: int | None,
    groups: str = "sample",
    axes: Sequence[int] | None = None,
    use_abs: bool = False,
    impl: str = "auto",
) -> None:
    """Validates the arguments of `kwta` that do not depend on ``x`` (used by the layers too)."""
    if (ratio is None) == (k is None):
        raise ValueError(
            "kwta: give exactly one of ratio= (fraction of winners, in (0, 1]) or k= "
            f"(number of winners, >= 1); got ratio={ratio!r}, k={k!r}."
        )
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"kwta: ratio must be a Python float in (0, 1]; got {ratio!r}.")
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"kwta: ratio must be in (0, 1]; got {ratio!r}.")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"kwta: k must be a Python int >= 1; got {k!r}.")
        if k < 1:
            raise ValueError(f"kwta: k must be >= 1; got {k!r}.")
    if groups not in GROUPS:
        raise ValueError(f"kwta: groups must be one of {GROUPS}; got {groups!r}.")
    if axes is not None:
        if groups != "sample":
            raise ValueError(
                f"kwta: give either groups= or axes=, not both; got groups={groups!r}, "
                f"axes={axes!r}."
            )
        if isinstance(axes, numbers.Integral):
            axes = (axes,)
        if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes):
            raise TypeError(f"kwta: axes must be a sequence of ints; got {axes!r}.")
        if len(axes) == 0:
            raise ValueError("kwta: axes must name at least one axis; got an empty sequence.")
    if not isinstance(use_abs, bool):
        raise TypeError(f"kwta: use_abs must be a bool; got {use_abs!r}.")
    if not isinstance(impl, str):
        raise TypeError(f"kwta: impl must be a string; got {impl!r}.")
    resolve_impl(impl)


def competition_axes(
    ndim: int, groups: str = "sample", axes: Sequence[int] | int | None = None
) -> tuple[int, ...]:
    """Sorted, non-negative axes over which units compete, for an input of rank ``ndim``.

    Axis 0 is always the batch axis and never competes.

    * ``groups="sample"``: all non-batch axes (dense ``[B, F]`` -> ``F``; conv NHWC ->
      ``H*W*C``, the official ``Sparsify2D_vol``).
    * ``groups="channel"``: every non-batch axis but the last, i.e. one group per channel of a
      channels-last input (conv NHWC -> ``H*W`` for each ``C``, the official ``Sparsify2D``).
    * ``axes=(...)``: explicit axes (negative values count from the end).
    """
    if axes is not None:
        if isinstance(axes, numbers.Integral):
            axes = (axes,)
        normalized = []
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"kwta: axes entry {a} is out of range for an input of rank {ndim} "
                    f"(accepted: 1..{ndim - 1} or -{ndim - 1}..-1)."
                )
            normalized.append(a % ndim)
        if 0 in normalized:
            raise ValueError(
                f"kwta: axes={tuple(axes)} contains the batch axis 0; competition is always "
                "within a sample, so use axes among 1..ndim-1."
            )
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"kwta: axes={tuple(axes)} names an axis twice.")
        return tuple(sorted(normalized))
    if groups == "sample":
        if ndim < 2:
            raise ValueError(
                f"kwta: x must have rank >= 2 ([batch, features...]) for groups='sample'; "
                f"got rank {ndim}. Add a batch axis, e.g. x[None]."
            )
        return tuple(range(1, ndim))
    if ndim < 3:
        raise ValueError(
            "kwta: x must have rank >= 3 ([batch, spatial..., channels]) for "
            f"groups='channel'; got rank {ndim}."
        )
    return tuple(range(1, ndim - 1))


def canonical_ratio(ratio: float) -> float:
    """``ratio`` as a Python float; a NumPy float counts as its shortest decimal.

    ``np.float32(0.7)`` is 0.699999988..., and ``int(0.699999988 * 10)`` keeps 6 units where the
    user who wrote 0.7 means 7: read it as 0.7, the value its ``repr`` shows. The op and the
    layers both go through here, so they always agree.
    """
    if isinstance(ratio, np.floating):
        return float(np.format_float_positional(ratio, unique=True, trim="-"))
    return float(ratio)


def canonical_axes(axes: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """``axes`` as a tuple (an int names one axis), or ``None``."""
    if axes is None:
        return None
    if isinstance(axes, numbers.Integral):
        return (int(axes),)
    return tuple(axes)


def num_winners(n: int, ratio: float | None = None, k: int | None = None) -> int:
    """Number of winners in a group of ``n`` units: ``max(1, int(ratio * n))`` or ``k``."""
    if k is not None:
        if k > n:
            raise ValueError(f"kwta: k={k} is larger than the competition group size n={n}.")
        return int(k)
    return max(1, int(canonical_ratio(ratio) * n))


def _to_rows(x, ratio, k, groups, axes, use_abs, impl):
    """Validates and moves the competition axes last; returns what `_from_rows` needs."""
    check_static_args(ratio, k, groups, axes, use_abs, impl)
    x = jnp.asarray(x)  # a nested list of floats is a float32 array, as everywhere in JAX
    _check_dtype(x)
    comp = competition_axes(x.ndim, groups, axes)
    rest = tuple(a for a in range(x.ndim) if a not in comp)
    perm = rest + comp
    # Layout changes on the bit view: a float transpose may canonicalise NaN payloads
    # (XLA:CPU, bfloat16), and winners must come out bit for bit.
    xt = x if perm == tuple(range(x.ndim)) else transpose_bits(x, perm)
    n = int(np.prod([x.shape[a] for a in comp]))
    if n == 0:
        raise ValueError(f"kwta: the competition group of x with shape {x.shape} is empty.")
    kk = num_winners(n, ratio, k)
    return xt.reshape(-1, n), (xt.shape, perm), kk, resolve_impl(impl)


def _from_rows(y2d, layout):
    shape, perm = layout
    y = y2d.reshape(shape)
    if perm == tuple(range(len(perm))):
        return y
    return transpose_bits(y, tuple(np.argsort(perm)))


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def kwta(
    x: jax.Array,
    *,
    ratio: float | None = None,
    k: int | None = None,
    groups: Groups = "sample",
    axes: Sequence[int] | int | None = None,
    use_abs: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """k-Winners-Take-All activation, per sample.

    Keeps, in every competition group of every sample, the units whose value is at least the
    group's k-th largest value, and zeroes the others.

    Args:
      x: ``[batch, ...]`` floating array (float16, bfloat16, float32, float64).
      ratio: fraction of winners in ``(0, 1]``; ``k = max(1, int(ratio * n))``.
      k: number of winners, ``1 <= k <= n`` (give exactly one of ``ratio`` and ``k``).
      groups: ``"sample"`` (all non-batch axes compete) or ``"channel"`` (one group per
        channel of a channels-last input). See `competition_axes`.
      axes: explicit competition axes instead of ``groups`` (never the batch axis 0).
      use_abs: rank by ``|x|`` and keep the signed value.
      impl: selector: ``"auto"`` or a key of `IMPLEMENTATIONS`.

    Returns:
      Array of the shape and dtype of ``x``.

    Inside a `kwta_jax.backward.kwta_backward` scope (traced there), the result is that of
    `kwta_bpda` with the scope's surrogate: same forward pass, surrogate derivative.

    Raises:
      TypeError, ValueError: at trace time, for any invalid argument.
    """
    kwargs = dict(ratio=ratio, k=k, groups=groups, axes=axes, use_abs=use_abs, impl=impl)
    scope = active_scope()
    if scope is not None:
        scope.calls += 1
        return kwta_bpda(x, surrogate=scope.surrogate, **kwargs)
    return _kwta_exact(x, **kwargs)


def _kwta_exact(x, *, ratio, k, groups, axes, use_abs, impl):
    x2d, layout, kk, name = _to_rows(x, ratio, k, groups, axes, use_abs, impl)
    return _from_rows(kwta_rows(x2d, kk, use_abs, name), layout)


def kwta_mask(
    x: jax.Array,
    *,
    ratio: float | None = None,
    k: int | None = None,
    groups: Groups = "sample",
    axes: Sequence[int] | int | None = None,
    use_abs: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """Boolean mask of the winners of `kwta` (same arguments); shape of ``x``."""
    x2d, layout, kk, name = _to_rows(x, ratio, k, groups, axes, use_abs, impl)
    mask = winner_mask(x2d, threshold_keys(x2d, kk, use_abs, name), use_abs)
    return _from_rows(mask, layout)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _with_surrogate_grad(x, y, surrogate):
    """Returns ``y``; its derivative is that of ``surrogate`` at ``x`` (``y`` gets none)."""
    del x, surrogate
    return y


@_with_surrogate_grad.defjvp
def _with_surrogate_grad_jvp(surrogate, primals, tangents):
    (x, y), (t, _) = primals, tangents
    if surrogate == "relu":
        t = jnp.where(x > 0, t, jnp.zeros((), t.dtype))
    return y, t


def kwta_bpda(x: jax.Array, *, surrogate: str = "identity", **kwta_kwargs) -> jax.Array:
    """`kwta` in the forward pass, a smooth surrogate's derivative in the backward pass.

    Backward Pass Differentiable Approximation (Athalye et al. 2018), the adaptive attack that
    Tramer et al. (2020) use against k-WTA: gradients flow as if the activation were the
    identity (``surrogate="identity"``) or a ReLU (``surrogate="relu"``). For attacks only.

    Args:
      x: as in `kwta`.
      surrogate: ``"identity"`` or ``"relu"``.
      **kwta_kwargs: the keyword arguments of `kwta`.
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"kwta_bpda: surrogate must be one of {SURROGATES}; got {surrogate!r}.")
    kwargs = dict(ratio=None, k=None, groups="sample", axes=None, use_abs=False, impl="auto")
    y = _kwta_exact(lax.stop_gradient(x), **{**kwargs, **kwta_kwargs})
    return _with_surrogate_grad(x, y, surrogate)
