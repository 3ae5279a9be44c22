"""The training workflow: what ``python train.py`` runs.

* `train_and_evaluate`: one training run into a run directory (`kwta_jax.runs`): start-up
  checks, the dataset (`kwta_jax.data`), the model (`kwta_jax.models`), the epoch loop
  (`kwta_jax.training`, given the adversarial perturbation it needs), a checkpoint and a
  metrics line after every epoch, the learning curves (`kwta_jax.reports`).
* `run_comparison` / `compare_activations`: one run per activation, then clean and FGSM
  accuracy side by side (``summary.json``).

Start-up problems surface before any training as `kwta_jax.runs.RunDirError` (a run directory
that cannot be used as asked), `kwta_jax.config.ConfigError` or
`kwta_jax.data.DatasetUnavailableError` (data not here); the CLI prints them as one-line
errors. Everything here reports through a ``log`` callback (default: this module's logger) and
shows progress through a bar factory (``progress``, see `kwta_jax.progress`; the CLI passes
tqdm).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kwta_jax import attacks, data, evaluation, interrupts, reports, runs, sharding, training
from kwta_jax.atomic import write_json_atomic
from kwta_jax.checkpointing import RunCheckpoints
from kwta_jax.config import ConfigError, TrainConfig
from kwta_jax.models import build_model_from_config
from kwta_jax.multihost import initialize, is_primary, sync
from kwta_jax.progress import MakeBar
from kwta_jax.training import PerturbFn

__all__ = [
    "DEFAULT_FGSM_EPS",
    "RunResult",
    "check_batch_fits",
    "compare_activations",
    "fgsm_comparison",
    "load_training_data",
    "make_pgd_perturb",
    "run_comparison",
    "train_and_evaluate",
]

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)

DEFAULT_FGSM_EPS: tuple[float, ...] = (0.1, 0.15, 0.2)


@dataclasses.dataclass
class RunResult:
    """Outcome of `train_and_evaluate`.

    ``model``: trained ``nnx.Module`` in eval mode. ``config``: the ``config.json`` dict.
    ``history``: one dict per epoch (as in ``metrics.jsonl``). ``resumed_from``: epoch the run
    resumed after (``None`` for a fresh run).
    """

    model: nnx.Module
    config: dict
    history: list[dict]
    run_dir: Path
    resumed_from: int | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def make_pgd_perturb(eps: float, steps: int, step_size: float) -> PerturbFn:
    """PGD (L-inf, random start) of `kwta_jax.attacks.pgd` as a training ``perturb_fn``."""
    return functools.partial(attacks.pgd, eps=eps, steps=steps, step_size=step_size)


def load_training_data(config: TrainConfig) -> data.Dataset:
    """The dataset of ``config`` (its split, seed and size limits)."""
    return data.load_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed, test_size=config.test_size,
        max_train=config.max_train, max_test=config.max_test,
    )  # fmt: skip


def check_batch_fits(config: TrainConfig, dataset: data.Dataset, mesh: Mesh) -> None:
    """Raises `kwta_jax.config.ConfigError` unless ``config.batch_size`` splits over ``mesh``
    and is at most the training set (a larger batch would train mostly on padding)."""
    training.check_mesh_fits(config.batch_size, mesh)
    n = len(dataset.train_labels)
    if config.batch_size > n:
        raise ConfigError(
            f"--batch-size {config.batch_size} is larger than the {n} training examples of "
            f"{dataset.name}; pass --batch-size {n} or less."
        )


def _start_or_resume(
    ckpt: RunCheckpoints, state: training.TrainState, run_dir: Path, *, resume: bool, log: Log
) -> tuple[training.TrainState, int, list[dict], bool]:
    """``(state, epochs already done, their history, resumed?)`` of a run directory."""
    if resume and ckpt.steps():
        state, done, history = runs.restore_training_state(ckpt, state, log=log)
        log(f"{run_dir}: resumed after epoch {done} (step {int(state.step)}).")
        return state, done, history, True
    if resume:
        log(f"{run_dir}: no finished checkpoint to resume; starting from scratch.")
    return state, 0, [], False


def _save_epoch(
    ckpt: RunCheckpoints, run_dir: Path, state: training.TrainState, config: TrainConfig,
    run_config: dict, history: list[dict], *, first: bool,
) -> None:  # fmt: skip
    """The checkpoint of the epoch that ends ``history``, then ``metrics.jsonl`` (and, after
    the ``first`` checkpoint of this session, ``config.json``). Nothing is written before the
    checkpoint is: a run that cannot save (a full disk) keeps its files as they were. A Ctrl-C
    waits for the end (`kwta_jax.interrupts.deferred`)."""
    epoch = history[-1]["epoch"]
    ratio = training.anneal_ratio(config, epoch - 1)
    with interrupts.deferred():
        runs.save_training_state(ckpt, state, epoch=epoch, ratio=ratio, run_config=run_config,
                                 history=history)  # fmt: skip
        if is_primary():
            if first:
                runs.write_config(run_dir, run_config)
            runs.write_metrics(run_dir, history)


def _epoch_line(config: TrainConfig, record: dict) -> str:
    return (
        f"{config.model}/{config.act} epoch {record['epoch']}/{config.epochs}: "
        f"loss {record['train_loss']:.4f}, train acc {record['train_accuracy']:.4f}, "
        f"test acc {record['test_accuracy']:.4f} ({record['epoch_seconds']:.1f} s)"
    )


def train_and_evaluate(
    config: TrainConfig,
    run_dir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dataset: data.Dataset | None = None,
    perturb_fn: PerturbFn | None = None,
    mesh: Mesh | None = None,
    progress: MakeBar | None = None,
    log: Log | None = None,
    stop_after_epochs: int | None = None,
    keep_checkpoints: int = 3,
) -> RunResult:
    """Trains one model into ``run_dir`` with a checkpoint after every epoch (the last
    ``keep_checkpoints`` stay on disk).

    Args:
      config: the run's `TrainConfig` (validated here).
      run_dir: output directory (``config.json``, ``metrics.jsonl``, ``checkpoints/``,
        ``curves.png``; see `kwta_jax.runs`).
      resume: continue from the newest good checkpoint in ``run_dir`` (a fresh start if there
        is none). Corrupt newer steps are moved aside and reported.
      overwrite: delete a previous run's files in ``run_dir`` first.
      dataset: a loaded dataset (default: `load_training_data` of the config).
      perturb_fn: adversarial-training perturbation; default: PGD from ``config.adv_*`` when
        ``config.adv_eps > 0`` (`make_pgd_perturb`), else none.
      mesh: device mesh (default: all devices, `kwta_jax.sharding.make_mesh`).
      progress: a bar factory for each epoch (`kwta_jax.progress`; ``None``: no bars).
      log: one-line messages (default: this module's logger).
      stop_after_epochs: stop (as if killed) after this many epochs of this call (tests).
      keep_checkpoints: how many of the newest epoch checkpoints stay on disk (older ones are
        deleted as new ones are saved).

    Raises:
      kwta_jax.runs.RunDirError, kwta_jax.config.ConfigError: found before any training
        (and before anything in ``run_dir`` changes).

    With several processes (`kwta_jax.training.initialize_distributed`) every process calls
    this with the same arguments and a ``run_dir`` on a shared filesystem; process 0 writes the
    run files, all of them write their part of the checkpoints.

    Returns:
      `RunResult` with the trained eval-mode model.
    """
    log = log or _logger.info
    config = config.resolved()
    config.validate()
    run_dir = Path(run_dir)
    runs.check_writable(run_dir)
    with runs.locked(run_dir):
        return _train_locked(
            config, run_dir, resume=resume, overwrite=overwrite, dataset=dataset,
            perturb_fn=perturb_fn, mesh=mesh, progress=progress, log=log,
            stop_after_epochs=stop_after_epochs, keep_checkpoints=keep_checkpoints,
        )  # fmt: skip


def _train_locked(
    config: TrainConfig, run_dir: Path, *, resume: bool, overwrite: bool,
    dataset: data.Dataset | None, perturb_fn: PerturbFn | None, mesh: Mesh | None,
    progress: MakeBar | None, log: Log, stop_after_epochs: int | None, keep_checkpoints: int,
) -> RunResult:  # fmt: skip
    """`train_and_evaluate` once ``run_dir`` is locked."""
    mode = runs.check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    if mode == "resume":
        runs.check_resumable(run_dir)
    mesh = mesh or sharding.make_mesh()
    dataset = load_training_data(config) if dataset is None else dataset
    check_batch_fits(config, dataset, mesh)
    sync(f"checked {run_dir}")
    if is_primary():
        if mode == "overwrite":
            with interrupts.deferred():  # never half a deletion
                runs.clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    sync(f"prepared {run_dir}")

    run_config = runs.make_run_config(config, training.model_spec(config, dataset))
    model = build_model_from_config(run_config)
    tx = training.create_optimizer(
        config, data.num_batches(len(dataset.train_labels), config.batch_size)
    )
    state = training.init_train_state(model, tx, config.seed)
    if perturb_fn is None and config.adv_eps > 0:
        perturb_fn = make_pgd_perturb(config.adv_eps, config.adv_steps, config.adv_step_size)

    with RunCheckpoints(run_dir, max_to_keep=keep_checkpoints) as ckpt:
        state, start_epoch, history, resumed = _start_or_resume(
            ckpt, state, run_dir, resume=mode == "resume", log=log
        )
        sync(f"restored {run_dir}")  # process 0 has moved corrupt steps aside
        if start_epoch > config.epochs:  # a checkpoint past the saved config.json's epochs
            raise runs.RunDirError(
                f"cannot resume {run_dir} with --epochs {config.epochs}: its checkpoints "
                f"hold {start_epoch} epochs (resuming trains longer, never shorter)."
            )
        epochs = training.train_epochs(
            model, tx, state, dataset, config, mesh=mesh, perturb_fn=perturb_fn,
            start_epoch=start_epoch, progress=progress,
        )  # fmt: skip
        for done, (state, record) in enumerate(epochs, start=1):
            history.append(record)
            _save_epoch(ckpt, run_dir, state, config, run_config, history, first=done == 1)
            log(_epoch_line(config, record))
            if stop_after_epochs is not None and done >= stop_after_epochs:
                break
    if history and is_primary():
        title = f"{config.dataset} {config.model} {config.act}"
        reports.plot_learning_curves(history, run_dir / "curves.png", title=title)
    final = training.trained_model(model, state)
    return RunResult(final, run_config, history, run_dir, start_epoch if resumed else None)


# --------------------------------------------------------------------------------------------
# train.py: ReLU vs k-WTA.
# --------------------------------------------------------------------------------------------


def fgsm_comparison(
    model: nnx.Module,
    images: np.ndarray,
    labels: np.ndarray,
    eps_values: Sequence[float] = DEFAULT_FGSM_EPS,
    *,
    batch_size: int = 500,
) -> dict:
    """Clean and FGSM (L-inf) accuracy of an eval-mode ``model`` on ``images [N, H, W, C]``.

    Uses `kwta_jax.evaluation.run_suite` with `kwta_jax.attacks.fgsm` (compiled once, eps
    traced). Returns ``{"clean": float, "fgsm": {eps: float}}``.
    """
    res = evaluation.run_suite(
        evaluation.models_from_nnx(model), images, labels,
        suite=evaluation.build_suite(["fgsm"]), eps_values=list(eps_values),
        batch_size=batch_size,
    )  # fmt: skip
    return {
        "clean": float(res.clean_correct.mean()),
        "fgsm": {float(e): res.accuracy("fgsm", e) for e in res.eps_values},
    }


def _comparison_entry(result: RunResult, robust: dict, *, act: str, attack_s: float) -> dict:
    """One activation's entry in ``summary.json``."""
    step_ms = [h["step_ms"] for h in result.history if h.get("step_ms") is not None]
    return {
        "run_dir": str(result.run_dir),
        "act": act,
        "ratio": result.final.get("kwta_ratio"),
        "epochs": len(result.history),
        "clean_accuracy": robust["clean"],
        "fgsm_accuracy": {str(e): a for e, a in robust["fgsm"].items()},
        "final_train_loss": result.final.get("train_loss"),
        # The training time of every epoch, over all sessions of a resumed run (restoring and
        # re-evaluating a finished run is not training).
        "train_seconds": float(sum(h.get("train_seconds", 0.0) for h in result.history)),
        "attack_seconds": attack_s,
        # Median over epochs; each epoch's step_ms leaves out its first step (compilation).
        "step_ms": float(np.median(step_ms)) if step_ms else None,
    }


def run_comparison(
    config: TrainConfig,
    out,
    *,
    acts: Sequence[str] = ("relu", "kwta"),
    eps_values: Sequence[float] = DEFAULT_FGSM_EPS,
    resume: bool = False,
    overwrite: bool = False,
    progress: MakeBar | None = None,
    log: Log | None = None,
    keep_checkpoints: int = 3,
) -> dict:
    """Trains ``config`` once per activation into ``out/<act>/``, evaluates clean and FGSM
    accuracy on the test set, writes ``out/summary.json`` and returns it.

    Every run directory is checked (`kwta_jax.runs.check_run_dir`, and with ``resume`` its
    checkpoints), the dataset loaded and the batch size checked against it and the devices
    before any training starts, so bad options or a missing dataset fail fast, leaving ``out``
    as it was. ``overwrite`` also removes ``out/attack`` and ``out/summary.json`` (the results
    of the runs it replaces).
    """
    log = log or _logger.info
    config = config.resolved()
    out = Path(out)
    runs.check_writable(out)
    with runs.locked(out):
        return _compare_locked(config, out, acts=acts, eps_values=eps_values, resume=resume,
                               overwrite=overwrite, progress=progress, log=log,
                               keep_checkpoints=keep_checkpoints)  # fmt: skip


def _compare_locked(
    config: TrainConfig, out: Path, *, acts: Sequence[str], eps_values: Sequence[float],
    resume: bool, overwrite: bool, progress: MakeBar | None, log: Log, keep_checkpoints: int,
) -> dict:  # fmt: skip
    """`run_comparison` once ``out`` is locked."""
    configs = {act: dataclasses.replace(config, act=act) for act in acts}
    modes = {}
    for act, cfg in configs.items():
        cfg.validate()
        modes[act] = runs.check_run_dir(out / act, cfg, resume=resume, overwrite=overwrite)
        if modes[act] == "resume":
            runs.check_resumable(out / act)
    if resume and all(m == "new" for m in modes.values()):
        log(f"--resume: {out} holds no run ({', '.join(acts)}); training from scratch.")
    mesh = sharding.make_mesh()
    dataset = load_training_data(config)
    check_batch_fits(config, dataset, mesh)
    log(f"{dataset!r} on {jax.device_count()} {jax.default_backend()} device(s)")
    sync(f"checked {out}")
    if overwrite and is_primary():
        with interrupts.deferred():
            runs.clear_results(out)
    summary: dict[str, Any] = {
        "dataset": config.dataset, "model": config.model, "eps": list(eps_values),
        "devices": jax.device_count(), "backend": jax.default_backend(), "runs": {},
    }  # fmt: skip
    t_all = time.perf_counter()
    for act, cfg in configs.items():
        result = train_and_evaluate(cfg, out / act, resume=resume, overwrite=overwrite,
                                    dataset=dataset, mesh=mesh, progress=progress, log=log,
                                    keep_checkpoints=keep_checkpoints)  # fmt: skip
        t1 = time.perf_counter()
        robust = fgsm_comparison(result.model, dataset.test_images, dataset.test_labels,
                                 eps_values)  # fmt: skip
        summary["runs"][act] = _comparison_entry(
            result, robust, act=act, attack_s=time.perf_counter() - t1
        )
    summary["total_seconds"] = time.perf_counter() - t_all
    if is_primary():
        write_json_atomic(out / "summary.json", summary)
    return summary


def compare_activations(
    config: TrainConfig, out, *, distributed: bool | dict | None = None, log: Log | None = None,
    **options,
) -> dict:  # fmt: skip
    """``train.py``'s job: `run_comparison` (``options``: its keywords), then the table and
    where the runs are. ``distributed``: `initialize` first (True, or the keywords of
    `jax.distributed.initialize`)."""
    log = log or _logger.info
    initialize(distributed)
    summary = run_comparison(config, out, log=log, **options)
    log("")
    log(reports.format_comparison(summary))
    log(f"\nruns in {out}/ ({', '.join(summary['runs'])}), summary in {out}/summary.json; "
        f"total {summary['total_seconds']:.0f} s")  # fmt: skip
    return summary
