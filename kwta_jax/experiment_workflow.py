"""The experiment workflow: ``train.py --experiment``, the write-up's presets
(`kwta_jax.experiments`) trained, attacked and tabulated beside the write-up's numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from kwta_jax import data, evaluation, reports, runs
from kwta_jax.atomic import write_atomic, write_json_atomic
from kwta_jax.attack_workflow import evaluate_run_dirs
from kwta_jax.experiments import Experiment
from kwta_jax.multihost import initialize
from kwta_jax.progress import MakeBar
from kwta_jax.train_workflow import run_comparison

__all__ = ["plan_experiments", "run_experiment", "run_experiments"]

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)


def run_experiment(
    experiment: Experiment,
    out,
    *,
    attacks: Sequence[str] = evaluation.DEFAULT_SUITE,
    budget: str = "fast",
    n_examples: int = 1000,
    batch_size: int = 250,
    resume: bool = False,
    overwrite: bool = False,
    progress: MakeBar | None = None,
    log: Log | None = None,
    keep_checkpoints: int = 3,
) -> dict:
    """Trains both models of ``experiment`` into ``out/<act>/``, attacks them (the full
    per-attack table, at ``budget``: default "fast", 10-step attacks), and writes
    ``out/experiment.json``, ``out/table.md`` and ``out/accuracy_vs_eps.png``.

    Returns the report (see `kwta_jax.reports.build_report`).
    """
    log = log or _logger.info
    out = Path(out)
    config = experiment.config
    log(f"== experiment {experiment.name}: {experiment.description}")
    summary = run_comparison(
        config, out, acts=experiment.acts, eps_values=experiment.fgsm_eps, resume=resume,
        overwrite=overwrite, progress=progress, log=log, keep_checkpoints=keep_checkpoints,
    )  # fmt: skip
    log(reports.format_comparison(summary))
    payload = evaluate_run_dirs(
        out, attack_names=attacks, eps_values=experiment.eps, n_examples=n_examples,
        batch_size=batch_size, seed=config.seed, budget=budget, out=out / "attack",
        progress=progress, log=log, mode="full",
    )  # fmt: skip
    report = reports.build_report(experiment, payload)
    report["train_summary"] = summary
    report["budget"] = budget
    write_json_atomic(out / "experiment.json", report)
    table = reports.format_report(report)
    write_atomic(out / "table.md", table + "\n")
    reports.plot_report(report, out / "accuracy_vs_eps.png")
    log("\n" + table)
    log(f"\nwrote {out / 'table.md'}, {out / 'experiment.json'}, {out / 'accuracy_vs_eps.png'}")
    return report


def plan_experiments(
    planned: Sequence[tuple[Experiment, str]], *, resume: bool = False, overwrite: bool = False
) -> tuple[list[tuple[Experiment, str]], dict[str, str]]:
    """Start-up checks of experiments about to run: every run directory (raises
    `kwta_jax.runs.RunDirError`) and every dataset. Reads no images.

    Args:
      planned: ``(experiment, out)`` pairs.

    Returns:
      ``(runnable, unavailable)``: the pairs whose data is here, and ``{name: message}`` for
      the others (the message says how to get the data).
    """
    runnable, unavailable = [], {}
    for experiment, out in planned:
        for act in experiment.acts:
            cfg = dataclasses.replace(experiment.config, act=act)
            runs.check_run_dir(f"{out}/{act}", cfg, resume=resume, overwrite=overwrite)
        try:
            data.check_available(experiment.config.dataset, data_dir=experiment.config.data_dir)
        except data.DatasetUnavailableError as e:
            unavailable[experiment.name] = str(e)
            continue
        runnable.append((experiment, out))
    return runnable, unavailable


def run_experiments(
    planned: Sequence[tuple[Experiment, str]],
    *,
    skip_unavailable: bool = False,
    budget: str = "fast",
    n_examples: int = 1000,
    resume: bool = False,
    overwrite: bool = False,
    distributed: bool | dict | None = None,
    progress: MakeBar | None = None,
    log: Log | None = None,
    warn: Log | None = None,
    keep_checkpoints: int = 3,
) -> tuple[list[str], list[str]]:
    """``train.py --experiment``: `plan_experiments`, then `run_experiment` for each preset
    whose data is here.

    Without ``skip_unavailable`` a missing dataset raises `kwta_jax.data.DatasetUnavailableError`
    before any training; with it (``--experiment all``) those presets are skipped and ``warn``
    says why. Returns ``(names run, names skipped)``.
    """
    warn = warn or _logger.warning
    runnable, unavailable = plan_experiments(planned, resume=resume, overwrite=overwrite)
    if unavailable and not skip_unavailable:
        raise data.DatasetUnavailableError(next(iter(unavailable.values())))
    initialize(distributed)
    for name, message in unavailable.items():
        warn(f"skipping experiment {name}: {message}\n")
    for experiment, out in runnable:
        run_experiment(experiment, out, budget=budget, n_examples=n_examples, resume=resume,
                       overwrite=overwrite, progress=progress, log=log,
                       keep_checkpoints=keep_checkpoints)  # fmt: skip
    return [e.name for e, _ in runnable], list(unavailable)
