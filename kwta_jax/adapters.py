"""Models as attacks see them: a pure ``apply(params, x) -> logits`` and its ``params``.

An evaluation compiles every attack once per model; if the weights were captured by the
attacked function they would be baked into the compiled program as constants (one 4096x4096
layer: seconds of compilation and 134 MB of HLO, paid again for every attack). Here the
parameters always travel as an argument of the compiled attack. Three adapters cover the ways
a JAX model is written:

    model = from_nnx(nnx_module)                   # Flax NNX: eval mode, state as params
    model = from_linen(module, variables)          # Flax linen
    model = from_apply(apply_fn, params)           # any pure function apply(params, x)

`Model.bpda` is the model's BPDA twin for adaptive attacks: the same forward pass with the
derivative of every library k-WTA inside replaced by a surrogate's
(`kwta_jax.backward.kwta_backward`), whatever the model's code looks like. `Models` is what an
evaluation attacks: the model and the auxiliary models some attacks need (`make_models`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from kwta_jax.backward import SURROGATES, kwta_backward

__all__ = [
    "Apply",
    "Model",
    "Models",
    "as_model",
    "from_apply",
    "from_linen",
    "from_logits_fn",
    "from_nnx",
    "make_models",
    "models_from_nnx",
]

# ``apply(params, x) -> logits``: ``x [B, ...]`` inputs, ``[B, classes]`` logits.
Apply = Callable[[Any, jax.Array], jax.Array]

# Attributes that Flax modules (and custom ones following their convention) use for their
# train/eval behaviour, and the value each takes in eval mode.
_EVAL_ATTRIBUTES = {
    "deterministic": True,
    "use_running_average": True,
    "train": False,
    "training": False,
    "is_training": False,
}


def _unjitted(fn: Callable) -> Callable:
    """The Python function behind a `jax.jit` wrapper: a cached trace would not see the
    `kwta_backward` scope that the BPDA twin traces it in."""
    while hasattr(fn, "lower") and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _bpda_apply(apply: Apply, surrogate: str, params, x):
    with kwta_backward(surrogate):
        return apply(params, x)


@dataclasses.dataclass(frozen=True)
class Model:
    """A classifier: ``apply(params, x) -> logits`` (pure) and its ``params`` (a pytree).

    ``name`` labels tables and files. Build one with `from_nnx`, `from_linen`, `from_apply`
    or `from_logits_fn`.
    """

    apply: Apply
    params: Any = None
    name: str = "model"

    def logits_fn(self, params: Any = None) -> Callable[[jax.Array], jax.Array]:
        """``x -> logits`` with ``params`` (default: the model's own) bound."""
        return functools.partial(self.apply, self.params if params is None else params)

    def bpda(self, surrogate: str = "identity") -> Model:
        """The BPDA twin: same forward pass and parameters (the same object, so it is passed
        to a compiled attack once), every library k-WTA differentiated as ``surrogate``."""
        if surrogate not in SURROGATES:
            raise ValueError(f"bpda: surrogate must be one of {SURROGATES}; got {surrogate!r}.")
        apply = functools.partial(_bpda_apply, self.apply, surrogate)
        return Model(apply, self.params, f"{self.name} (BPDA {surrogate})")

    def count_kwta(self, x: jax.Array) -> int:
        """How many library k-WTA ops one forward pass on inputs shaped like ``x`` traces
        (no computation: abstract evaluation). 0 means a BPDA twin would be the model."""
        with kwta_backward() as scope:
            # A new function each time: JAX caches traces by function, and a cached trace
            # would not run the k-WTA ops again to be counted.
            jax.eval_shape(
                lambda p, v: self.apply(p, v), self.params, jax.ShapeDtypeStruct(x.shape, x.dtype)
            )
        return scope.calls


def from_apply(apply_fn: Apply, params: Any, *, name: str = "model") -> Model:
    """A pure ``apply_fn(params, x) -> logits`` and its ``params``.

    Pass the plain Python function, not a `jax.jit` of it: the evaluation compiles it with
    the attacks (a jitted one is unwrapped).
    """
    if not callable(apply_fn):
        raise TypeError(
            f"from_apply: apply_fn must be callable (params, x) -> logits; got "
            f"{type(apply_fn).__name__}."
        )
    return Model(_unjitted(apply_fn), params, name)


def _call_closure(fn, params, x):
    del params
    return fn(x)


def from_logits_fn(logits_fn: Callable[[jax.Array], jax.Array], *, name: str = "model") -> Model:
    """A closure ``x -> logits`` whose weights are captured (fine for small models; large
    ones compile faster through `from_apply`, which passes them as an argument)."""
    if not callable(logits_fn):
        raise TypeError(
            f"from_logits_fn: logits_fn must be callable x -> logits; got "
            f"{type(logits_fn).__name__}."
        )
    return Model(functools.partial(_call_closure, _unjitted(logits_fn)), None, name)


def _apply_linen(module: nn.Module, kwargs: dict, variables, x):
    return module.apply(variables, x, **kwargs)


def from_linen(module: nn.Module, variables: Any, *, name: str = "model", **apply_kwargs) -> Model:
    """A Flax linen ``module`` and its ``variables`` (``{"params": ..., "batch_stats": ...}``).

    ``apply_kwargs`` are passed to every ``module.apply`` call (e.g. ``train=False``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"from_linen: module must be a flax.linen.Module; got "
            f"{type(module).__name__} (use from_nnx for NNX models)."
        )
    return Model(functools.partial(_apply_linen, module, dict(apply_kwargs)), variables, name)


def _train_mode_layers(model: nnx.Module) -> list[str]:
    """Paths of the modules whose train/eval attributes still say train."""
    found = []
    for path, module in nnx.iter_modules(model):
        for attr, eval_value in _EVAL_ATTRIBUTES.items():
            value = getattr(module, attr, None)
            if isinstance(value, bool) and value != eval_value:
                where = "/".join(map(str, path)) or type(module).__name__
                found.append(f"{where}.{attr}={value}")
    return found


def _apply_nnx(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def from_nnx(model: nnx.Module, *, name: str = "model") -> Model:
    """A Flax NNX ``model``, in eval mode: a copy with `nnx.Module.eval` applied (Dropout
    deterministic, BatchNorm on its running averages); the original is left as it is.

    Raises:
      ValueError: a layer of the copy is still in train mode (an attribute ``train``,
        ``training`` or ``is_training`` that `nnx.Module.eval` does not set): an attack on it
        would see random or batch-dependent outputs.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"from_nnx: model must be a flax.nnx.Module; got "
            f"{type(model).__name__} (use from_linen or from_apply)."
        )
    model = nnx.clone(model)
    model.eval()
    train = _train_mode_layers(model)
    if train:
        raise ValueError(
            f"from_nnx: layers still in train mode after model.eval(): {', '.join(train)}; "
            "set them to eval mode before evaluating."
        )
    graphdef, state = nnx.split(model)
    return Model(functools.partial(_apply_nnx, graphdef), state, name)


def as_model(model: Any, *, name: str | None = None) -> Model:
    """``model`` as a `Model`: a `Model` as it is, an NNX module through `from_nnx`.

    Raises:
      TypeError: anything else, with the adapter to use.
    """
    if isinstance(model, Model):
        return model if name is None else dataclasses.replace(model, name=name)
    if isinstance(model, nnx.Module):
        return from_nnx(model, name=name or "model")
    hint = (
        "wrap it with kwta_jax.adapters.from_linen(module, variables)"
        if isinstance(model, nn.Module)
        else "wrap it with kwta_jax.adapters.from_apply(apply_fn, params)"
        if callable(model)
        else "pass an NNX module or a kwta_jax.adapters.Model"
    )
    raise TypeError(
        f"model: expected a flax.nnx.Module or a Model; got {type(model).__name__}: {hint}."
    )


@dataclasses.dataclass(frozen=True)
class Models:
    """The attacked model and the auxiliary models some attacks take gradients from, by the
    name an `AttackSpec.needs` uses: ``"bpda"`` (the BPDA twin: same forward pass, smooth
    backward) and ``"source"`` (a transfer surrogate), or any name a custom attack needs.

    ``bpda_needs_kwta``: the ``"bpda"`` twin is the automatic one (`make_models`), which
    `run_suite` drops when the model contains no k-WTA (BPDA would be plain PGD); a twin
    given by hand is always used."""

    model: Model
    auxiliary: Mapping[str, Model] = dataclasses.field(default_factory=dict)
    bpda_needs_kwta: bool = False

    @property
    def name(self) -> str:
        return self.model.name

    def renamed(self, name: str) -> Models:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, name=name))


def make_models(
    model, *, source=None, surrogate: str | None = "identity", name: str | None = None
) -> Models:
    """`Models` for ``model`` (a `Model` or an NNX module): its BPDA twin with ``surrogate``
    (`Model.bpda`; dropped by `run_suite` when the model has no k-WTA; ``None``: none) and
    the transfer ``source`` if given."""
    model = as_model(model, name=name)
    auxiliary = {}
    if surrogate is not None:
        auxiliary["bpda"] = model.bpda(surrogate)
    if source is not None:
        auxiliary["source"] = as_model(source, name="source")
    return Models(model, auxiliary, bpda_needs_kwta=True)


def models_from_nnx(model, *, source=None, surrogate: str = "identity", name="model") -> Models:
    """`make_models` for an NNX ``model`` (and an NNX ``source``)."""
    return make_models(model, source=source, surrogate=surrogate, name=name)
