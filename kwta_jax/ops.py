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

Ordering of special values (every implementation agrees bit-for-bit on it):

* ``-0.0`` and ``+0.0`` compare equal (IEEE), so they tie.
* ``+inf`` is larger than every finite value and ``-inf`` smaller.
* Every NaN (any sign or payload) ranks *above* ``+inf`` (like ``torch.topk`` and NumPy's
  sort), and all NaNs tie with each other. A NaN that wins is propagated unchanged; if at least
  ``k`` entries of a group are NaN, only the NaNs survive.

With ``use_abs=True`` units are ranked by ``|x|`` but keep their signed value (the official
``*_abs`` variants).

Gradient: ``d kwta(x) = t * mask`` where ``mask = x >= threshold``; the threshold is treated as
a constant (it is piecewise constant in ``x``). The rule is a ``custom_jvp``, so ``grad``,
``vjp`` (``g * mask``), ``jvp``, ``jit``, ``vmap`` and ``remat`` all work.

Implementations (``impl=``) only differ in how the per-row threshold is found; they share the
validation, the grouping and the derivative defined here.
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
from kwta_jax.kernels.kwta_cpu import cpu_kernel_available, kwta_rows_cpu
from kwta_jax.kernels.kwta_pallas import kwta_rows_pallas, triton_available
from kwta_jax.rank_keys import apply_threshold, key_dtype, rank_keys, transpose_bits
from kwta_jax.selection import kwta_rows_select

__all__ = [
    "GROUPS",
    "canonical_axes",
    "canonical_ratio",
    "IMPLEMENTATIONS",
    "competition_axes",
    "kwta",
    "kwta_bpda",
    "kwta_mask",
    "kwta_rows",
    "kwta_rows_topk",
    "key_dtype",
    "num_winners",
    "rank_keys",
    "resolve_impl",
]

Groups = Literal["sample", "channel"]
GROUPS: tuple[str, ...] = ("sample", "channel")

# A row implementation maps ``x2d: [rows, n]`` (floating) to ``(y2d, threshold_key)`` where
# ``y2d`` has the shape and dtype of ``x2d`` and ``threshold_key: [rows]`` is the k-th largest
# rank key (see `rank_keys`) of each row.
RowImpl = Callable[[jax.Array, int, bool], tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------------------------
# Row implementations.
# --------------------------------------------------------------------------------------------


def kwta_rows_topk(x2d: jax.Array, k: int, use_abs: bool) -> tuple[jax.Array, jax.Array]:
    """Reference row implementation with `jax.lax.top_k` on the rank keys.

    Args:
      x2d: ``[rows, n]`` floating array.
      k: number of winners per row, ``1 <= k <= n``.
      use_abs: rank by ``|x|``.

    Returns:
      ``(y2d [rows, n] same dtype, threshold_key [rows] unsigned)``.
    """
    keys = rank_keys(x2d, use_abs)
    threshold_key = lax.top_k(keys, k)[0][:, k - 1]
    return apply_threshold(x2d, threshold_key, use_abs)


# Every implementation must agree bit-for-bit with "topk". Kernel modules add theirs here.
IMPLEMENTATIONS: dict[str, RowImpl] = {
    "topk": kwta_rows_topk,
    # Plain XLA interpolation search on counts (kwta_jax/selection.py): any backend.
    "select": kwta_rows_select,
    # Fused Pallas kernel (kernels/kwta_pallas.py): Triton on GPU, Mosaic on TPU, interpret
    # mode (slow) on CPU.
    "pallas": kwta_rows_pallas,
    # C++ radix-select kernel through XLA FFI (kernels/kwta_cpu.py): CPU backend only,
    # compiled with the system C++ compiler at first use.
    "cpu": kwta_rows_cpu,
}


def resolve_impl(impl: str) -> str:
    """Name of the row implementation that ``impl`` selects on the default backend.

    ``"auto"`` picks the fastest exact implementation available for `jax.default_backend`.
    """
    if impl == "auto":
        # CPU: the FFI kernel ("cpu", two passes over the data, 1.7-2x ReLU on
        # [128,32,32,64]) when a C++ compiler could build it, else "select" (exact plain
        # XLA, 2.4-4.6x ReLU there; top_k is a full sort on XLA:CPU); docs/benchmarks.md.
        # GPU: the Pallas kernel (Triton), measured bit-exact on an H200 and faster than
        # "select" and "top_k" on every benchmarked shape (docs/benchmarks.md).
        # TPU: "select"; the kernel lowers for Mosaic but has not run on a TPU yet.
        # With several CPU devices (data parallelism) "select" again: XLA partitions it along
        # the sharded batch, but gathers the whole batch onto every device for an FFI call.
        backend = jax.default_backend()
        if backend in ("gpu", "cuda", "rocm") and triton_available():
            return "pallas"
        single_cpu = backend == "cpu" and jax.local_device_count() == 1
        if single_cpu and cpu_kernel_available():
            return "cpu"
        return "select"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"kwta: impl must be 'auto' or one of {sorted(IMPLEMENTATIONS)}; got {impl!r}."
        )
    return impl


# --------------------------------------------------------------------------------------------
# The differentiable row op.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def kwta_rows(x2d: jax.Array, k: int, use_abs: bool = False, impl: str = "topk") -> jax.Array:
    """k-WTA over the last axis of ``x2d: [rows, n]`` with row implementation ``impl``.

    No validation: `kwta` is the public entry point. ``impl`` must be a key of
    `IMPLEMENTATIONS` (not ``"auto"``).
    """
    return IMPLEMENTATIONS[impl](x2d, k, use_abs)[0]


@kwta_rows.defjvp
def _kwta_rows_jvp(k, use_abs, impl, primals, tangents):
    (x2d,), (t2d,) = primals, tangents
    y2d, threshold_key = IMPLEMENTATIONS[impl](x2d, k, use_abs)
    mask = rank_keys(x2d, use_abs) >= threshold_key[:, None]
    # `where` rather than `t * mask`: a non-finite tangent at a losing unit gives 0, not NaN.
    return y2d, jnp.where(mask, t2d, jnp.zeros((), t2d.dtype))


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
      impl: row implementation: ``"auto"`` or a key of `IMPLEMENTATIONS`.

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
    _, threshold_key = IMPLEMENTATIONS[name](lax.stop_gradient(x2d), kk, use_abs)
    return _from_rows(rank_keys(x2d, use_abs) >= threshold_key[:, None], layout)


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
