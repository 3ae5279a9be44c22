# ruff: noqa: E402 - SIGINT is held back before the imports (see kwta_jax.interrupts)
"""Evaluate checkpoints written by train.py against an adversarial attack suite.

    python attack.py runs/default            # every run under it (ReLU = transfer surrogate)
    python attack.py runs/default/kwta --attacks fgsm pgd bpda --eps 0.1 0.3 --quick
    python attack.py runs/default --preset autoattack     # AutoAttack "standard", cascade
    python attack.py runs/default --budget strong --mode full   # the per-attack table

Prints per-attack robust accuracy (cascade mode: after each stage), the per-example worst case
over all attacks, the attack that broke each example first, the median minimum-norm distance,
throughput and gradient-masking diagnostics; writes results.json, results_per_image.npz and
PNGs to --out (default RUN_DIR/attack), and <run>.result.npz with every result (the
worst-case adversarial of every example included; kwta_jax.results.EvalResult.load).
This file parses the options and makes one call, kwta_jax.attack_workflow.evaluate_run_dirs; it owns
the progress bars.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # a Ctrl-C during the imports below waits for interrupts.install
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

import argparse
import functools
import sys
from pathlib import Path

from tqdm.auto import tqdm

from kwta_jax import attack_workflow, flags, interrupts, multihost, runs
from kwta_jax.attacks import ES_SCHEDULE
from kwta_jax.checkpointing import CheckpointError, quiet_abandoned_io
from kwta_jax.config import ConfigError
from kwta_jax.runs import RunDirError
from kwta_jax.subsets import SUBSETS
from kwta_jax.suites import (
    ATTACKS,
    BUDGETS,
    DEFAULT_EPS,
    DEFAULT_SUITE,
    ES_SCHEDULE_CPU,
    MODES,
    STRONG_SUITE,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="attack.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=flags.DefaultsHelpFormatter,
        epilog=f"Attacks: {', '.join(ATTACKS)} (or 'all'). Default eps per dataset: "
        + "; ".join(f"{k}: {', '.join(f'{e:g}' for e in v)}" for k, v in DEFAULT_EPS.items()),
    )
    parser.add_argument("run_dir", help="a run directory (with config.json) or a parent of several")
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=None,
        metavar="NAME",
        help="attack suite, run in this order (cascade: list cheap ones first); default: "
        f"{' '.join(DEFAULT_SUITE)}, plus {' '.join(STRONG_SUITE[len(DEFAULT_SUITE) :])} with "
        "--budget strong (Square left out for --norm l2)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="cascade",
        help="cascade (default): AutoAttack's rule, each attack only on the examples every "
        "earlier one failed on; the same worst case as the full table for a fraction of the "
        "time (most examples fall to the cheap first attacks), with the attack that broke "
        "each example and the time per stage. full: every attack on every example, the "
        "per-attack table (and the masking checks that compare attacks)",
    )
    parser.add_argument(
        "--preset",
        choices=list(attack_workflow.PRESETS),
        default=None,
        help="autoattack: AutoAttack 'standard' (APGD-CE, APGD-T 9 targets, FAB-T 9 targets, "
        "Square 5,000 queries; 100 iterations, 1 restart; Square dropped for l2) instead of "
        "--attacks; --quick shrinks it",
    )
    parser.add_argument(
        "--es-full",
        action="store_true",
        help="es with the literature's sample schedule, levels of (antithetic pairs, "
        f"stalled steps before the next level) {list(ES_SCHEDULE)} (GPU-sized), instead of "
        f"the budget's ({list(ES_SCHEDULE_CPU)} for strong)",
    )
    parser.add_argument(
        "--eps", nargs="+", type=float, default=None, help="radii (default: per dataset)"
    )
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument(
        "--n-examples",
        "--max-examples",
        type=int,
        default=1000,
        help="test examples per run (at most the test split), chosen by --subset",
    )
    parser.add_argument(
        "--subset",
        choices=SUBSETS,
        default="stratified",
        help="which test examples: stratified (default): a fixed class-balanced subset drawn "
        "with --subset-seed (test splits are often sorted by class: mnist5k's first 500 are "
        "the digits 0-4); first: the first N, for continuity with numbers measured that way",
    )
    parser.add_argument(
        "--subset-seed",
        type=flags.checked(flags.integer, flags.seed_problem),
        default=0,
        help="seed of the stratified subset",
    )
    parser.add_argument(
        "--batch-size", type=int, default=250, help="examples per compiled chunk (bounds memory)"
    )
    parser.add_argument(
        "--seed", type=flags.checked(flags.integer, flags.seed_problem), default=0,
        help="attack PRNG seed",
    )  # fmt: skip
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="default",
        help="iterations / queries / samples of every attack: default (sized for the "
        "cascade: within ~2 points of strong in ~2 minutes on the default models), strong "
        "(paper-grade), fast (10-step attacks, for --mode full), quick (smoke runs)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: --budget quick and at most 200 examples"
    )
    parser.add_argument(
        "--bpda-surrogate",
        choices=["identity", "relu"],
        default="identity",
        help="backward pass that replaces k-WTA in BPDA",
    )
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/attack)")
    parser.add_argument("--no-diagnostics", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    flags.add_distributed_flags(
        parser, "all with the same options: each evaluates its share of every chunk on its "
        "devices, process 0 writes --out",
    )  # fmt: skip
    args = parser.parse_args(argv)  # fmt: skip
    args.distributed = flags.distributed_options(parser, args)

    if args.preset is not None and args.attacks is not None:
        parser.error("--preset and --attacks are exclusive: the preset fixes the attacks")
    unknown = [a for a in args.attacks or [] if a not in ATTACKS and a != "all"]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)} or 'all'")
    repeated = sorted({a for a in args.attacks or [] if args.attacks.count(a) > 1})
    if repeated:
        parser.error(f"--attacks names {', '.join(repeated)} more than once")
    # flags.positive: > 0 and finite (nan and inf are not radii).
    if args.eps is not None and any(flags.positive(e) for e in args.eps):
        parser.error(f"--eps values must be > 0 and finite; got {args.eps}")
    if args.n_examples <= 0 or args.batch_size <= 0:
        parser.error("--n-examples and --batch-size must be positive")
    if args.norm == "l2" and "square" in (args.attacks or []):
        parser.error("square is L-inf only; drop it from --attacks for --norm l2")
    if args.quick:
        args.budget, args.n_examples = "quick", min(args.n_examples, 200)
    return args


def _bars(enabled: bool):
    """The progress-bar factory the library's loops take (`kwta_jax.progress`): tqdm."""
    return functools.partial(tqdm, leave=False, dynamic_ncols=True) if enabled else None


def _interrupted(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"attack.py: {what}; every file it had written is whole (old or new, never half)"


def main(argv=None) -> int:
    # Ctrl-C: one line and exit 130 at any moment (kwta_jax.interrupts), never a traceback.
    restore = interrupts.install(_interrupted)
    try:
        return _run(parse_args(argv))
    finally:
        restore()


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / "attack"
    try:
        # Before loading anything: runs to attack, and a place for the results that can be
        # written (default: RUN_DIR/attack).
        runs.find_run_dirs(args.run_dir)
        runs.check_writable(out)
        multihost.initialize(args.distributed, hint="Start every process again.")
        with runs.locked(out):  # one writer per output directory
            attack_workflow.evaluate_run_dirs(
                args.run_dir, attack_names=args.attacks, eps_values=args.eps, norm=args.norm,
                n_examples=args.n_examples, subset=args.subset, subset_seed=args.subset_seed,
                batch_size=args.batch_size, seed=args.seed,
                budget=args.budget, surrogate=args.bpda_surrogate, out=args.out,
                diagnose=not args.no_diagnostics, progress=_bars(not args.no_progress),
                log=tqdm.write, mode=args.mode, preset=args.preset,
                es_schedule=ES_SCHEDULE if args.es_full else None,
            )  # fmt: skip
    except (CheckpointError, RunDirError, ConfigError, OSError) as e:
        # No run there, a run that cannot be loaded, its dataset is not here, an output
        # directory that cannot be written (read-only, full, in use): one line, no traceback.
        # Every file is replaced atomically, so an older one survives a failed write.
        multihost.wait_for_lost_peer()  # multi-host: or a lost process, named by the watchdog
        return _error(e)
    except Exception as e:
        if args.distributed is None:
            raise  # a bug: its traceback
        multihost.wait_for_lost_peer()  # multi-host: a lost peer is named by the watchdog
        return _error(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    return 0


def _error(e) -> int:
    print(f"attack.py: error: {' '.join(str(e).split())}", file=sys.stderr)
    multihost.leave(2)  # multi-host: no wait at JAX's shutdown barrier
    return 2


if __name__ == "__main__":
    # orbax's abandoned writes after a failed save report themselves until the very end.
    with quiet_abandoned_io(for_process=True):
        sys.exit(main())
