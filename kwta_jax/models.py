"""Flax NNX models with a pluggable activation: ReLU, k-WTA, or k-WTA followed by ReLU.

Every model maps ``x: [B, H, W, C]`` float32 in ``[0, 1]`` to logits ``[B, num_classes]``
float32. Per-channel normalisation ``(x - mean) / std`` is the first operation *inside* the
model, so attacks and ``eps`` act on raw pixels.

Activations (``act=``):

* ``"relu"``: `jax.nn.relu`.
* ``"kwta"``: a `kwta_jax.layers.KWTA` module (``ratio``, ``groups``), so
  `set_kwta_ratio` / `set_kwta_backward` reach it.
* ``"kwta_relu"``: k-WTA then ReLU (the write-up's experiment 4): `KWTAReLU`, which holds a
  `KWTA`.

Dense layers always compete over the whole feature vector (``groups="sample"``); ``groups``
applies to convolutional feature maps (``"sample"``: over ``H*W*C``; ``"channel"``: over
``H*W`` per channel).

Models (``create_model(name, ...)``):

* ``mlp``: flatten - Dense 512 - act - Dense 512 - act - Dense ``num_classes``. The write-up
  does not give its MNIST layers; this is the classic Keras ``mnist_mlp`` without dropout.
* ``cnn``: the Keras ``cifar10_cnn`` of the write-up: conv32 - conv32 - pool - drop .25 -
  conv64 - conv64 - pool - drop .25 - dense512 - drop .5 - dense ``num_classes`` (3x3 convs,
  ``SAME`` padding, 2x2 max-pool). ``kwta_scope="dense"`` (experiment 1) puts the activation
  in the dense layer only and ReLU in the convs; ``"all"`` (experiment 3) uses it in the convs
  too, with ``conv_ratio`` (the write-up used 0.7 there).
* ``cnn_deep``: the deeper variant (experiment 2): three conv blocks (32, 64, 128; two convs
  each, pool, dropout) then dense512 - dense ``num_classes``. The write-up's exact layers are
  unknown; this is the VGG-style extension of ``cnn``.
* ``resnet18``: the sparse ResNet-18 of Xiao et al. (official ``SparseResNet18``): 3x3 stem
  conv64 - BN - ReLU, four stages of two basic blocks (64, 128, 256, 512), each block
  ``conv-BN-act-conv-BN (+ shortcut) - act``, global average pool, dense. With ``act="kwta"``
  k-WTA follows the first BatchNorm and the residual add of every block (``ReLU`` in the stem).

A `ModelSpec` is what a run directory stores of its model; `build_model` turns it (and a seed)
into an initialised model, `build_model_from_config` does the same from a ``config.json`` dict,
and `split_model` separates trainable parameters from the rest of the state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kwta_jax.layers import KWTA, iter_kwta_layers, set_kwta_ratio

__all__ = [
    "ACTIVATIONS",
    "KWTA_SCOPES",
    "MODELS",
    "CNN",
    "KWTAReLU",
    "MLP",
    "ModelSpec",
    "ResNet18",
    "build_model",
    "build_model_from_config",
    "create_model",
    "make_activation",
    "split_model",
]

ACTIVATIONS: tuple[str, ...] = ("relu", "kwta", "kwta_relu")
MODELS: tuple[str, ...] = ("mlp", "cnn", "cnn_deep", "resnet18")
KWTA_SCOPES: tuple[str, ...] = ("dense", "all")


class KWTAReLU(nnx.Module):
    """k-WTA followed by ReLU (keeps only winners that are also positive).

    Call: ``[B, ...]`` float -> same shape. ``self.kwta`` is a `KWTA`, so annealing and BPDA
    helpers reach it.
    """

    def __init__(self, ratio: float, *, groups: str = "sample"):
        self.kwta = KWTA(ratio, groups=groups)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.kwta(x))


def make_activation(act: str, ratio: float, groups: str = "sample") -> Callable:
    """The activation ``act`` (one of `ACTIVATIONS`) as a callable or NNX module."""
    if act == "relu":
        return jax.nn.relu
    if act == "kwta":
        return KWTA(ratio, groups=groups)
    if act == "kwta_relu":
        return KWTAReLU(ratio, groups=groups)
    raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}.")


class Normalize(nnx.Module):
    """``(x - mean) / std`` per channel; constants are static (not trained, not attacked)."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None):
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mean is None:
            return x
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return (x - mean) / std


class MLP(nnx.Module):
    """``[B, H, W, C]`` -> flatten -> (Dense ``width`` -> act) x ``depth`` -> Dense classes."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        act: str,
        ratio: float,
        width: int = 512,
        depth: int = 2,
        mean=None,
        std=None,
        rngs: nnx.Rngs,
    ):
        self.normalize = Normalize(mean, std)
        din = math.prod(input_shape)
        layers, acts = [], []
        for _ in range(depth):
            layers.append(nnx.Linear(din, width, rngs=rngs))
            acts.append(make_activation(act, ratio, "sample"))
            din = width
        self.layers = nnx.List(layers)
        self.acts = nnx.List(acts)
        self.head = nnx.Linear(din, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.normalize(x).reshape(x.shape[0], -1)
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = act(layer(x))
        return self.head(x)


class CNN(nnx.Module):
    """Keras-style CNN: blocks of (conv3x3 -> act) x 2 -> maxpool 2 -> dropout, then
    flatten -> dense ``hidden`` -> act -> dropout -> dense classes.

    ``channels=(32, 64)`` is the write-up's ``cnn``; ``(32, 64, 128)`` is ``cnn_deep``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        act: str,
        ratio: float,
        groups: str = "sample",
        kwta_scope: str = "dense",
        conv_ratio: float | None = None,
        channels: Sequence[int] = (32, 64),
        hidden: int = 512,
        dropout: bool = True,
        mean=None,
        std=None,
        rngs: nnx.Rngs,
    ):
        if kwta_scope not in KWTA_SCOPES:
            raise ValueError(f"kwta_scope must be one of {KWTA_SCOPES}; got {kwta_scope!r}.")
        self.normalize = Normalize(mean, std)
        conv_act = act if kwta_scope == "all" else "relu"
        conv_ratio = ratio if conv_ratio is None else conv_ratio
        h, w, cin = input_shape
        convs, conv_acts = [], []
        for c in channels:
            for _ in range(2):
                convs.append(nnx.Conv(cin, c, (3, 3), padding="SAME", rngs=rngs))
                conv_acts.append(make_activation(conv_act, conv_ratio, groups))
                cin = c
            h, w = h // 2, w // 2
        self.convs = nnx.List(convs)
        self.conv_acts = nnx.List(conv_acts)
        self.drop_conv = nnx.Dropout(0.25 if dropout else 0.0, rngs=rngs)
        self.dense = nnx.Linear(h * w * cin, hidden, rngs=rngs)
        self.dense_act = make_activation(act, ratio, "sample")
        self.drop_dense = nnx.Dropout(0.5 if dropout else 0.0, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.normalize(x)
        for i, (conv, act) in enumerate(zip(self.convs, self.conv_acts, strict=True)):
            x = act(conv(x))
            if i % 2 == 1:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
                x = self.drop_conv(x)
        x = x.reshape(x.shape[0], -1)
        x = self.drop_dense(self.dense_act(self.dense(x)))
        return self.head(x)


class BasicBlock(nnx.Module):
    """``act(BN(conv(act(BN(conv(x))))) + shortcut(x))``; ``[B, H, W, Cin] -> [B, H/s, W/s, C]``."""

    def __init__(self, cin: int, cout: int, stride: int, *, act, ratio, groups, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False,
                              rngs=rngs)  # fmt: skip
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.act1 = make_activation(act, ratio, groups)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.act2 = make_activation(act, ratio, groups)
        if stride != 1 or cin != cout:
            self.short_conv = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False,
                                       rngs=rngs)  # fmt: skip
            self.short_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        else:
            self.short_conv = self.short_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        short = x if self.short_conv is None else self.short_bn(self.short_conv(x))
        return self.act2(y + short)


class ResNet18(nnx.Module):
    """Sparse ResNet-18 (Xiao et al.): ReLU stem, `BasicBlock` s with ``act``; 32x32 inputs."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        act: str,
        ratio: float,
        groups: str = "sample",
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        mean=None,
        std=None,
        rngs: nnx.Rngs,
    ):
        self.normalize = Normalize(mean, std)
        cin = input_shape[-1]
        self.stem_conv = nnx.Conv(cin, widths[0], (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(widths[0], momentum=0.9, rngs=rngs)
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, w, stride, act=act, ratio=ratio, groups=groups,
                                         rngs=rngs))  # fmt: skip
                cin = w
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem_conv(self.normalize(x))))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything `create_model` needs, JSON-friendly: a run's ``config.json`` stores it as
    ``model`` (the name) and ``model_kwargs`` (`to_kwargs`). Defaults are `create_model`'s."""

    name: str
    act: str = "relu"
    ratio: float = 0.1
    groups: str = "sample"
    num_classes: int = 10
    input_shape: tuple[int, ...] = (28, 28, 1)
    kwta_scope: str = "dense"
    conv_ratio: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        """The spec of a ``config.json`` dict (its ``model`` and ``model_kwargs``)."""
        kwargs = dict(config["model_kwargs"])
        for name in ("input_shape", "mean", "std"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(kwargs[name])
        return cls(name=config["model"], **kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        """The `create_model` keywords (``config.json``'s ``model_kwargs``; lists, not tuples,
        so the JSON round trip is the identity)."""
        as_list = lambda v: None if v is None else list(v)  # noqa: E731
        return dict(
            act=self.act, ratio=self.ratio, groups=self.groups, num_classes=self.num_classes,
            input_shape=list(self.input_shape), kwta_scope=self.kwta_scope,
            conv_ratio=self.conv_ratio, mean=as_list(self.mean), std=as_list(self.std),
        )  # fmt: skip


def create_model(
    name: str,
    *,
    act: str = "relu",
    ratio: float = 0.1,
    groups: str = "sample",
    num_classes: int = 10,
    input_shape: Sequence[int] = (28, 28, 1),
    rngs: nnx.Rngs,
    kwta_scope: str = "dense",
    conv_ratio: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nnx.Module:
    """Builds model ``name`` (one of `MODELS`) with activation ``act``.

    Args:
      name: ``"mlp"``, ``"cnn"``, ``"cnn_deep"`` or ``"resnet18"``.
      act: ``"relu"``, ``"kwta"`` or ``"kwta_relu"``.
      ratio: k-WTA winner ratio in ``(0, 1]`` (ignored for ReLU).
      groups: k-WTA competition groups of conv feature maps (``"sample"`` or ``"channel"``).
      num_classes: number of logits.
      input_shape: ``(H, W, C)`` of one image.
      rngs: parameter (``params``) and dropout (``dropout``, CNNs only) randomness.
      kwta_scope: CNNs: ``"dense"`` (k-WTA in the dense layer only) or ``"all"``.
      conv_ratio: CNNs with ``kwta_scope="all"``: ratio of the conv k-WTA (default ``ratio``).
      mean, std: per-channel normalisation applied inside the model (``None``: none).

    Returns:
      An ``nnx.Module``: ``[B, H, W, C]`` float32 in [0, 1] -> ``[B, num_classes]`` logits.
      Built in training mode; call ``model.eval()`` for inference.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}.")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C); got {input_shape}.")
    common = dict(num_classes=num_classes, input_shape=input_shape, act=act, ratio=ratio,
                  mean=mean, std=std, rngs=rngs)  # fmt: skip
    if name == "mlp":
        return MLP(**common)
    if name in ("cnn", "cnn_deep"):
        channels = (32, 64) if name == "cnn" else (32, 64, 128)
        return CNN(**common, groups=groups, kwta_scope=kwta_scope, conv_ratio=conv_ratio,
                   channels=channels)  # fmt: skip
    if input_shape[0] < 8 or input_shape[1] < 8:
        raise ValueError(f"resnet18 needs images of at least 8x8; got {input_shape}.")
    return ResNet18(**common, groups=groups)


# --------------------------------------------------------------------------------------------
# Building a model from its spec (what training and loading a run both need).
# --------------------------------------------------------------------------------------------

# Activation options hold no variables, so they are left out of the initializer's cache key.
_ACT_KWARGS = ("act", "ratio", "groups", "kwta_scope", "conv_ratio")


def _rngs(seed: int) -> nnx.Rngs:
    return nnx.Rngs(params=jax.random.key(seed), dropout=jax.random.key(seed + 1))


@functools.lru_cache(maxsize=16)
def _state_initializer(name: str, kwargs_json: str) -> Callable[[jax.Array], nnx.State]:
    """Jitted ``seed -> nnx.State`` of a freshly initialised model, cached per architecture.

    The activation holds no variables, so it is fixed to ReLU here: the ReLU and k-WTA
    versions of a model get the same initial parameters for a seed and share one compilation
    (eager or per-model initialisation compiles every initializer separately: seconds on a
    small CPU).
    """
    kwargs = dict(json.loads(kwargs_json), act="relu")

    def init(seed):
        return nnx.state(create_model(name, **kwargs, rngs=_rngs(seed)))

    return jax.jit(init)


def build_model(
    spec: ModelSpec, *, seed: int = 0, ratio: float | None = None, abstract: bool = False
) -> nnx.Module:
    """The model of ``spec`` in train mode, its parameters initialised from ``seed``.

    Parameters come from one jitted call, shared by every activation of the same
    architecture. ``abstract=True`` returns the model with `jax.ShapeDtypeStruct` leaves (no
    compute; fill it from a checkpoint). ``ratio`` (if given and the model has k-WTA layers)
    replaces the initial k-WTA ratio, e.g. the annealed ratio of a checkpoint.
    """
    kwargs = spec.to_kwargs()
    model = nnx.eval_shape(lambda: create_model(spec.name, **kwargs, rngs=_rngs(seed)))
    if not abstract:
        graphdef, abstract_state = nnx.split(model)
        arch = {k: v for k, v in kwargs.items() if k not in _ACT_KWARGS}
        init = _state_initializer(spec.name, json.dumps(arch, sort_keys=True))
        state = init(jnp.int32(seed))
        if jax.tree.structure(state) != jax.tree.structure(abstract_state):
            raise AssertionError(f"{spec.name}: the activation changed the variables.")
        model = nnx.merge(graphdef, state)
    if ratio is not None and any(True for _ in iter_kwta_layers(model)):
        set_kwta_ratio(model, ratio)
    return model


def build_model_from_config(
    config: Mapping[str, Any], *, ratio: float | None = None, abstract: bool = False
) -> nnx.Module:
    """The model of a ``config.json`` dict (``model``, ``model_kwargs``, ``seed``), in train
    mode; see `build_model` for ``ratio`` and ``abstract``."""
    spec = ModelSpec.from_run_config(config)
    return build_model(spec, seed=int(config.get("seed", 0)), ratio=ratio, abstract=abstract)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: trainable parameters and all other state (BatchNorm
    statistics, dropout RNG keys and counters)."""
    return nnx.split(model, nnx.Param, ...)
