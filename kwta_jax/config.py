"""The training configuration: `TrainConfig`, the one place where a training option is declared.

Each field is declared with `kwta_jax.flags.option`: its default, its ``train.py`` flag (help,
choices, parsing) and the rule its value must follow. ``train.py`` generates its flags from
these fields (`kwta_jax.flags.add_flags`), and `TrainConfig.validate` checks the same rules, so
a new option is added here and nowhere else.

A run directory's ``config.json`` holds `TrainConfig.to_dict` of the resolved config (plus the
model's spec and the package version, see `kwta_jax.runs`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from kwta_jax.data import DATASETS
from kwta_jax.flags import (
    at_least_one,
    field_errors,
    in_unit_interval,
    integer,
    non_negative,
    number,
    option,
    positive,
    seed_problem,
)
from kwta_jax.models import ACTIVATIONS, KWTA_SCOPES, MODELS

__all__ = ["OPTIMIZERS", "ConfigError", "TrainConfig", "config_from_saved"]

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


class ConfigError(ValueError):
    """Options that are valid on their own but cannot work here (a batch size that does not
    split over the devices or is larger than the dataset); found before any training."""


def _parse_anneal(text: str) -> tuple[float, float, int]:
    """``--anneal START:END:EVERY`` -> ``(start, end, every)`` (the rule is `_anneal_problem`)."""
    try:
        start, end, every = text.split(":")
        return float(start), float(end), int(every)
    except ValueError:
        msg = f"expected START:END:EVERY (e.g. 0.2:0.1:2); got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _anneal_problem(anneal) -> str | None:
    if len(anneal) != 3:
        return f"must be (start, end, every); got {anneal}"
    start, end, every = anneal
    if not (0 < start <= 1 and 0 < end <= 1):
        return f"ratios must be in (0, 1]; got {start}, {end}"
    if int(every) != every or every < 1:
        return f"step interval must be an integer >= 1; got {every}"
    return None


def _momentum_problem(momentum: float) -> str | None:
    return None if 0.0 <= momentum < 1.0 else f"must be in [0, 1); got {momentum}"


def _test_size_problem(test_size: int) -> str | None:
    # mnist5k has 5,000 images: both splits must be non-empty.
    return None if 0 < test_size < 5000 else f"must be in (0, 5000); got {test_size}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (JSON-serialisable; stored in ``config.json``).

    ``None`` means "the default for this model" and is filled in by `resolved`:
    ``optimizer`` ``"adam"`` (``"sgd"`` for resnet18), ``lr`` 1e-3 (adam) / 0.1 (sgd),
    ``weight_decay`` 0 (adam) / 5e-4 (sgd).

    ``anneal=(start, end, every)``: the k-WTA ratio moves linearly from ``start`` to ``end``
    in steps every ``every`` epochs, reaching ``end`` in the last stage (``ratio`` is then
    ``end``). ``adv_eps > 0`` turns on PGD adversarial training (L-inf, ``adv_steps`` steps of
    ``adv_step_size``, default ``2.5 * adv_eps / adv_steps``).

    The field order is the order of ``config.json`` and of ``train.py --help``.
    """

    dataset: str = option("mnist5k", "dataset", choices=DATASETS)
    model: str = option("mlp", "architecture", choices=MODELS)
    # One run per activation: the flag takes several, the config holds one.
    act: str = option(
        "kwta", "activations to train, one run each (kwta_relu = k-WTA then ReLU)",
        choices=ACTIVATIONS, nargs="+", flag_default=["relu", "kwta"], label="activation",
    )  # fmt: skip
    # The flag's None ("not given") lets train.py tell an explicit --ratio from the default.
    ratio: float = option(
        0.1, "k-WTA winner ratio in (0, 1] (default 0.1; with --anneal: its END)",
        parse=number, check=in_unit_interval, flag_default=None,
    )  # fmt: skip
    groups: str = option(
        "sample", "k-WTA competition groups of conv feature maps (dense layers: whole vector)",
        choices=("sample", "channel"), label="k-WTA groups",
    )  # fmt: skip
    kwta_scope: str = option(
        "dense", "cnn/cnn_deep: k-WTA in the dense layer only, or in the conv layers too",
        choices=KWTA_SCOPES, label="k-WTA scope",
    )  # fmt: skip
    conv_ratio: float | None = option(
        None, "cnn/cnn_deep with --kwta-scope all: ratio of the conv k-WTA (default --ratio; "
        "the write-up's experiment 3 used 0.7)", parse=number, check=in_unit_interval,
    )  # fmt: skip
    epochs: int = option(10, "training epochs", parse=integer, check=at_least_one)
    batch_size: int = option(
        128, "global batch size (a multiple of the device count)", parse=integer,
        check=at_least_one, label="batch size",
    )  # fmt: skip
    lr: float | None = option(
        None, "learning rate (default: 1e-3 for adam, 0.1 for sgd)", parse=number,
        check=positive, label="learning rate",
    )  # fmt: skip
    optimizer: str | None = option(
        None, "adam (default for mlp/cnn) or sgd+momentum with the piecewise schedule "
        "(default for resnet18)", choices=OPTIMIZERS,
    )  # fmt: skip
    weight_decay: float | None = option(
        None, "weight decay (default: 0 for adam, 5e-4 for sgd)", parse=number,
        check=non_negative, label="weight decay",
    )  # fmt: skip
    momentum: float = option(0.9, "SGD momentum", flag=False, check=_momentum_problem)
    anneal: tuple[float, float, int] | None = option(
        None, "sparsity annealing: k-WTA ratio from START to END in steps every EVERY epochs",
        parse=_parse_anneal, check=_anneal_problem, metavar="START:END:EVERY",
    )  # fmt: skip
    # No flag means no adversarial training, so an explicit --adv-train 0 is refused.
    adv_eps: float = option(
        0.0, "adversarial training with L-inf PGD of radius EPS", flag="--adv-train",
        parse=number, check=non_negative, flag_check=positive, flag_default=None,
        metavar="EPS", label="adversarial-training eps",
    )  # fmt: skip
    adv_steps: int = option(
        7, "PGD steps", parse=integer, check=at_least_one, label="adversarial-training steps"
    )
    adv_step_size: float | None = option(
        None, "PGD step size (default 2.5 * EPS / steps)", parse=number, check=positive,
        label="adversarial-training step size",
    )  # fmt: skip
    seed: int = option(0, "seed of data split, order and init", parse=integer, check=seed_problem)
    data_dir: str | None = option(None, "tensorflow-datasets data directory (tfds datasets)")
    test_size: int = option(1000, "mnist5k: test split size", flag=False, check=_test_size_problem)
    max_train: int | None = option(
        None, "use at most N training examples", parse=integer, check=at_least_one
    )
    max_test: int | None = option(
        None, "use at most N test examples", parse=integer, check=at_least_one
    )

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in for this model."""
        opt = self.optimizer or ("sgd" if self.model == "resnet18" else "adam")
        lr = self.lr if self.lr is not None else (0.1 if opt == "sgd" else 1e-3)
        wd = self.weight_decay if self.weight_decay is not None else (5e-4 if opt == "sgd" else 0.0)
        anneal = None if self.anneal is None else tuple(self.anneal)
        if anneal is not None:
            anneal = (float(anneal[0]), float(anneal[1]), int(anneal[2]))
        ratio = anneal[1] if anneal is not None else self.ratio
        step = self.adv_step_size
        if self.adv_eps > 0 and step is None:
            step = 2.5 * self.adv_eps / self.adv_steps
        return dataclasses.replace(
            self, optimizer=opt, lr=float(lr), weight_decay=float(wd), anneal=anneal,
            ratio=float(ratio), adv_step_size=step,
        )  # fmt: skip

    def validate(self) -> None:
        """Raises ValueError naming every invalid field (each field's rule is declared with
        it, above; the rules that involve several fields are here)."""
        errors = field_errors(self)
        if self.model == "mlp" and self.groups == "channel" and self.act != "relu":
            errors.append("groups='channel' needs convolutional feature maps; mlp has none")
        # resnet18 on 28x28 MNIST works, it is just not what the paper did: allowed.
        if errors:
            raise ValueError("invalid training configuration: " + "; ".join(errors) + ".")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["anneal"] = None if self.anneal is None else list(self.anneal)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("anneal") is not None:
            kw["anneal"] = tuple(kw["anneal"])
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# A saved configuration (config.json).
# --------------------------------------------------------------------------------------------

_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "None": (type(None),),
               "tuple": (list, tuple)}  # fmt: skip


def _type_problem(name: str, value: Any) -> str | None:
    """Whether ``value`` (from JSON) has the type of field ``name`` (its annotation)."""
    annotation = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    kinds = [part.strip().split("[")[0] for part in str(annotation).split("|")]
    accepted = tuple(t for kind in kinds for t in _JSON_TYPES[kind])
    if isinstance(value, accepted) and not isinstance(value, bool):
        return None
    words = {"str": "a string", "int": "an integer", "float": "a number", "None": "null",
             "tuple": "a list"}  # fmt: skip
    return f"{name} {value!r} is not {' or '.join(words[kind] for kind in kinds)}"


def config_from_saved(saved: Any, *, required: Iterable[str] = ()) -> TrainConfig:
    """The `TrainConfig` of a ``config.json`` dict, checked field by field: a JSON object,
    the ``required`` fields present, every field present of its type (``None`` ratio of a
    ReLU run allowed) and following its rule (`TrainConfig.validate`). Fields not present keep
    their defaults; unknown keys are ignored.

    Raises:
      ValueError: one line naming every problem.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"not a run configuration (a JSON {type(saved).__name__})")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    missing = [k for k in required if k not in saved]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    fields = {k: v for k, v in saved.items() if k in names}
    if fields.get("ratio", 0.1) is None and fields.get("act") == "relu":
        del fields["ratio"]  # a ReLU run records no winner ratio
    errors = [p for k, v in fields.items() if (p := _type_problem(k, v))]
    if errors:
        raise ValueError("; ".join(errors))
    config = TrainConfig.from_dict(fields)
    try:
        config.validate()
    except (ValueError, TypeError) as e:  # TypeError: the items of a list field
        problem = str(e).removeprefix("invalid training configuration: ").rstrip(".")
        raise ValueError(problem) from None
    return config
