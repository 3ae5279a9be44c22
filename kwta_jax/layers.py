"""Flax wrappers of `kwta_jax.kwta`: an NNX module (recommended) and a linen module.

The op holds no parameters, so both modules are thin: their attributes are the op's static
arguments. The winner ratio is a *static* attribute (``k`` must be known at trace time), so
changing it (sparsity annealing) re-traces the jitted step once per new value but leaves the
model's parameters and the optimizer state untouched:

    model = MyModel(..., rngs=nnx.Rngs(0))         # contains KWTA layers
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    ...
    set_kwta_ratio(model, 0.1)                      # same model, same optimizer state

Plain functions stay first-class: ``functools.partial(kwta, ratio=0.1)`` is a valid activation
wherever a Flax model takes ``jax.nn.relu``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import nnx

from kwta_jax import ops
from kwta_jax.backward import BACKWARDS

__all__ = ["KWTA", "LinenKWTA", "iter_kwta_layers", "set_kwta_backward", "set_kwta_ratio"]


def _check_backward(backward: str) -> None:
    if backward not in BACKWARDS:
        raise ValueError(f"KWTA: backward must be one of {BACKWARDS}; got {backward!r}.")


def _apply(x, *, ratio, k, groups, axes, use_abs, impl, backward):
    kwargs = dict(ratio=ratio, k=k, groups=groups, axes=axes, use_abs=use_abs, impl=impl)
    if backward == "exact":
        return ops.kwta(x, **kwargs)
    return ops.kwta_bpda(x, surrogate=backward, **kwargs)


class KWTA(nnx.Module):
    """k-WTA activation as a Flax NNX module.

    Attributes (all static; see `kwta_jax.kwta` for their meaning):
      ratio, k, groups, axes, use_abs, impl: arguments of `kwta_jax.kwta`.
      backward: ``"exact"`` (the true derivative, default) or a BPDA surrogate
        (``"identity"``, ``"relu"``) used by adaptive attacks; see `kwta_jax.kwta_bpda`.

    Call: ``[batch, ...]`` floating array -> same shape and dtype.
    """

    def __init__(
        self,
        ratio: float | None = None,
        *,
        k: int | None = None,
        groups: str = "sample",
        axes: Sequence[int] | None = None,
        use_abs: bool = False,
        impl: str = "auto",
        backward: str = "exact",
    ):
        ops.check_static_args(ratio, k, groups, axes, use_abs, impl)
        _check_backward(backward)
        self.ratio = None if ratio is None else ops.canonical_ratio(ratio)
        self.k = k
        self.groups = groups
        self.axes = ops.canonical_axes(axes)
        self.use_abs = use_abs
        self.impl = impl
        self.backward = backward

    def __call__(self, x: jax.Array) -> jax.Array:
        return _apply(
            x,
            ratio=self.ratio,
            k=self.k,
            groups=self.groups,
            axes=self.axes,
            use_abs=self.use_abs,
            impl=self.impl,
            backward=self.backward,
        )


def iter_kwta_layers(model: nnx.Module):
    """Yields every `KWTA` layer inside an NNX ``model`` (the model itself included)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, KWTA):
            yield module


def set_kwta_ratio(model: nnx.Module, ratio: float) -> int:
    """Sets the winner ratio of every `KWTA` layer of ``model`` in place (sparsity annealing).

    Layers configured with an explicit ``k`` are switched to ``ratio``. Parameters and any
    optimizer state are untouched. Returns the number of layers changed.
    """
    ops.check_static_args(ratio, None)
    count = 0
    for layer in iter_kwta_layers(model):
        layer.ratio, layer.k = float(ratio), None
        count += 1
    return count


def set_kwta_backward(model: nnx.Module, backward: str) -> int:
    """Sets the backward rule of every `KWTA` layer of ``model`` in place; returns the count.

    Use on a copy (`flax.nnx.clone`) to build a BPDA model that shares the trained weights.
    """
    _check_backward(backward)
    count = 0
    for layer in iter_kwta_layers(model):
        layer.backward = backward
        count += 1
    return count


class LinenKWTA(nn.Module):
    """k-WTA activation as a Flax linen module (same attributes as `KWTA`).

    A linen module holds no parameters of its own, so a new ``LinenKWTA(ratio=...)`` (or
    ``model.clone(...)`` of the enclosing model) reuses the existing params and optimizer state.
    """

    ratio: float | None = None
    k: int | None = None
    groups: str = "sample"
    axes: tuple[int, ...] | None = None
    use_abs: bool = False
    impl: str = "auto"
    backward: str = "exact"

    def __post_init__(self):
        ops.check_static_args(self.ratio, self.k, self.groups, self.axes, self.use_abs, self.impl)
        _check_backward(self.backward)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _apply(
            x,
            ratio=self.ratio,
            k=self.k,
            groups=self.groups,
            axes=self.axes,
            use_abs=self.use_abs,
            impl=self.impl,
            backward=self.backward,
        )
