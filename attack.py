"""Evaluate checkpoints written by train.py against an adversarial attack suite.

    python attack.py runs/default            # every run under it (ReLU = transfer surrogate)
    python attack.py runs/default/kwta --attacks fgsm pgd bpda --eps 0.1 0.3 --quick

Prints per-attack robust accuracy, the per-example worst case over all attacks, throughput and
gradient-masking diagnostics; writes results.json and PNGs to --out (default RUN_DIR/attack).
This file parses the options and makes one call, kwta_jax.workflows.evaluate_run_dirs; it owns
the progress bars.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from tqdm.auto import tqdm

from kwta_jax import flags, runs, workflows
from kwta_jax.checkpointing import CheckpointError
from kwta_jax.evaluation import ATTACKS, BUDGETS, DEFAULT_EPS, DEFAULT_SUITE
from kwta_jax.runs import RunDirError


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
        "--attacks", nargs="+", default=list(DEFAULT_SUITE), metavar="NAME", help="attack suite"
    )
    parser.add_argument(
        "--eps", nargs="+", type=float, default=None, help="radii (default: per dataset)"
    )
    parser.add_argument("--norm", choices=["linf", "l2"], default="linf")
    parser.add_argument("--n-examples", type=int, default=1000, help="first N test images")
    parser.add_argument(
        "--batch-size", type=int, default=250, help="examples per compiled chunk (bounds memory)"
    )
    parser.add_argument("--seed", type=int, default=0, help="attack PRNG seed")
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="default",
        help="iterations / queries / samples of every attack",
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
    args = parser.parse_args(argv)  # fmt: skip

    unknown = [a for a in args.attacks if a not in ATTACKS and a != "all"]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)} or 'all'")
    # flags.positive: > 0 and finite (nan and inf are not radii).
    if args.eps is not None and any(flags.positive(e) for e in args.eps):
        parser.error(f"--eps values must be > 0 and finite; got {args.eps}")
    if args.n_examples <= 0 or args.batch_size <= 0:
        parser.error("--n-examples and --batch-size must be positive")
    if args.norm == "l2" and "square" in args.attacks:
        parser.error("square is L-inf only; drop it from --attacks for --norm l2")
    if args.quick:
        args.budget, args.n_examples = "quick", min(args.n_examples, 200)
    return args


def _bars(enabled: bool):
    """The progress-bar factory the library's loops take (`kwta_jax.progress`): tqdm."""
    return functools.partial(tqdm, leave=False, dynamic_ncols=True) if enabled else None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # Before loading anything: the results must be writable (default: RUN_DIR/attack).
        runs.check_writable(args.out if args.out is not None else Path(args.run_dir) / "attack")
        workflows.evaluate_run_dirs(
            args.run_dir, attack_names=args.attacks, eps_values=args.eps, norm=args.norm,
            n_examples=args.n_examples, batch_size=args.batch_size, seed=args.seed,
            budget=args.budget, surrogate=args.bpda_surrogate, out=args.out,
            diagnose=not args.no_diagnostics, progress=_bars(not args.no_progress),
            log=tqdm.write,
        )  # fmt: skip
    except (CheckpointError, RunDirError, OSError) as e:
        # No run there, a run that cannot be loaded, its dataset is not here, or an output
        # directory that cannot be written (read-only, full): one line, no traceback.
        # results.json is replaced atomically, so an older one survives a failed write.
        print(f"attack.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
