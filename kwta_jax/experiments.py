"""The six ReLU-vs-k-WTA experiments of the Keras write-up, as presets.

The write-up (``shared/seeds/``) trained a ReLU and a k-WTA model per experiment and attacked
both with FGSM alone:

====== ============================================================== ========================
preset what                                                           write-up: clean / FGSM
====== ============================================================== ========================
seed-1 CIFAR-10 CNN, k-WTA in the dense layers only                   .8335 .825 / .1024 .1309
seed-2 the deeper CNN, k-WTA in the dense layers only                 .8071 .8026 / .1025 .1237
seed-3 k-WTA in the conv layers too, over C*H*W at ratio 0.7          .8071 .7924 / .1025 .1146
seed-4 k-WTA followed by ReLU                                         .8071 .8258 / .1025 .1048
seed-5 ratio 0.1 everywhere                                           .8071 .788 / .1025 .1319
seed-6 MNIST, FGSM eps 0.1 / 0.15 / 0.2                               see `EXPERIMENTS`
====== ============================================================== ========================

This module holds the presets only (data: a `TrainConfig` per experiment and the write-up's
numbers). `kwta_jax.experiment_workflow.run_experiment` trains both models of a preset, runs
the attack suite on both, and writes the write-up's table (`kwta_jax.reports.build_report`:
clean / FGSM rows, ReLU / k-WTA columns, the write-up's own numbers beside ours) extended with
PGD, the strongest adaptive attack, the per-example worst case and the gradient-masking
flags.
"""

from __future__ import annotations

import dataclasses

from kwta_jax.config import TrainConfig

__all__ = [
    "EXPERIMENTS",
    "OVERRIDABLE_FIELDS",
    "Experiment",
    "describe_experiments",
    "get_experiment",
]

# The training options a user may change in a preset (the rest define the experiment).
OVERRIDABLE_FIELDS: tuple[str, ...] = (
    "dataset", "data_dir", "epochs", "batch_size", "lr", "seed", "max_train", "max_test",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One preset: a training configuration for both activations and the write-up's numbers.

    ``writeup`` maps a row label (``"clean"``, ``"fgsm 0.1"``...) to the (ReLU, k-WTA)
    accuracies the write-up reported; ``fgsm_eps`` are the radii of its FGSM rows; ``eps``
    the radii at which we run the full suite (a superset of ``fgsm_eps``).
    """

    name: str
    description: str
    config: TrainConfig
    acts: tuple[str, str]
    fgsm_eps: tuple[float, ...]
    eps: tuple[float, ...]
    writeup: dict[str, tuple[float, float]]
    notes: str = ""

    def with_overrides(self, **config_overrides) -> Experiment:
        """A copy whose training configuration has the given fields replaced (``None``s are
        ignored, so CLI options that were not given keep the preset's value)."""
        changes = {k: v for k, v in config_overrides.items() if v is not None}
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))


_CIFAR_EPS = (8 / 255, 0.1)
_CIFAR = dict(dataset="cifar10", epochs=30, batch_size=128)
_CIFAR_NOTE = (
    "The write-up does not give its k for the dense layers; we use ratio 0.2 (the paper's "
    "starting sparsity). Its ReLU column for experiments 3-5 repeats experiment 2's numbers."
)


def _cifar(name, description, writeup, *, acts=("relu", "kwta"), notes=_CIFAR_NOTE, **config):
    return Experiment(
        name=name,
        description=description,
        config=TrainConfig(**{**_CIFAR, **config}),
        acts=acts,
        fgsm_eps=(0.1,),
        eps=_CIFAR_EPS,
        writeup={"clean": writeup[0], "fgsm 0.1": writeup[1]},
        notes=notes,
    )


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        _cifar(
            "seed-1",
            "CIFAR-10 CNN (conv32-conv32-pool-conv64-conv64-pool-dense512), k-WTA in the dense "
            "layer only",
            [(0.8335, 0.825), (0.1024, 0.1309)],
            model="cnn",
            ratio=0.2,
            kwta_scope="dense",
        ),
        _cifar(
            "seed-2",
            "the deeper CIFAR-10 CNN, k-WTA in the dense layers only",
            [(0.8071, 0.8026), (0.1025, 0.1237)],
            model="cnn_deep",
            ratio=0.2,
            kwta_scope="dense",
        ),
        _cifar(
            "seed-3",
            "CIFAR-10 CNN with every ReLU replaced by k-WTA: conv layers over C*H*W at ratio 0.7",
            [(0.8071, 0.7924), (0.1025, 0.1146)],
            model="cnn",
            ratio=0.2,
            conv_ratio=0.7,
            kwta_scope="all",
        ),
        _cifar(
            "seed-4",
            "CIFAR-10 CNN with k-WTA followed by ReLU (x -> k-WTA -> ReLU) in every layer",
            [(0.8071, 0.8258), (0.1025, 0.1048)],
            acts=("relu", "kwta_relu"),
            model="cnn",
            ratio=0.2,
            conv_ratio=0.7,
            kwta_scope="all",
        ),
        _cifar(
            "seed-5",
            "CIFAR-10 CNN with k-WTA at ratio 0.1 in every layer",
            [(0.8071, 0.788), (0.1025, 0.1319)],
            model="cnn",
            ratio=0.1,
            conv_ratio=0.1,
            kwta_scope="all",
            notes="Ratio 0.1 (k = n // 10) in the conv and dense layers, as in the write-up.",
        ),
        Experiment(
            name="seed-6",
            description="MNIST MLP, FGSM at eps 0.1 / 0.15 / 0.2 (embedded mnist5k by default; "
            "--dataset mnist for the full set through tensorflow-datasets)",
            config=TrainConfig(dataset="mnist5k", model="mlp"),
            acts=("relu", "kwta"),
            fgsm_eps=(0.1, 0.15, 0.2),
            eps=(0.1, 0.15, 0.2, 0.3),
            writeup={
                "clean": (0.9905, 0.991),
                "fgsm 0.1": (0.8358, 0.9581),
                "fgsm 0.15": (0.5209, 0.9145),
                "fgsm 0.2": (0.2452, 0.8426),
            },
            notes="The write-up's MNIST model and k are not given; we use train.py's MLP "
            "(784-512-512-10) and its default k-WTA ratio. It trained on the 60,000 MNIST "
            "digits; mnist5k has 4,000 training images, so clean accuracy is lower.",
        ),
    ]
}


def get_experiment(name: str) -> Experiment:
    """The preset called ``name``; a clear ``ValueError`` for an unknown one."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r} (choose from {', '.join(EXPERIMENTS)}).")
    return EXPERIMENTS[name]


def describe_experiments() -> str:
    """One entry per preset: name, description, and the settings that define it."""
    lines = []
    for name, e in EXPERIMENTS.items():
        c = e.config
        fgsm = ", ".join(f"{x:g}" for x in e.fgsm_eps)
        lines.append(f"{name}  {e.description}")
        lines.append(
            f"        {c.dataset}, {c.model}, {' vs '.join(e.acts)}, ratio {c.ratio:g}, "
            f"{c.epochs} epochs; FGSM eps {fgsm}"
        )
    return "\n".join(lines)
