"""Workflows: the library's layers composed into what the CLIs and the experiment presets run.

* `train_and_evaluate`: one training run into a run directory (`kwta_jax.runs`): start-up
  checks, the dataset (`kwta_jax.data`), the model (`kwta_jax.models`), the epoch loop
  (`kwta_jax.training`, given the adversarial perturbation it needs), a checkpoint and a
  metrics line after every epoch, the learning curves (`kwta_jax.reports`).
* `run_comparison` / `compare_activations` (``train.py``): one run per activation, then clean
  and FGSM accuracy side by side (``summary.json``).
* `evaluate_run_dirs` (``attack.py``): load every run under a path, run the attack suite
  (`kwta_jax.evaluation`) and the gradient-masking checks (`kwta_jax.diagnostics`) on its test
  split, write the report.
* `run_experiment` / `run_experiments` (``train.py --experiment``): a preset of
  `kwta_jax.experiments` trained, attacked and tabulated beside the write-up's numbers.

Start-up problems surface before any training as `kwta_jax.runs.RunDirError` (a run directory
that cannot be used as asked) or `kwta_jax.data.DatasetUnavailableError` (data not here); the
CLIs print them as one-line errors. Everything here reports through a ``log`` callback
(default: this module's logger) and shows progress through a bar factory (``progress``, see
`kwta_jax.progress`; the CLIs pass tqdm).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from kwta_jax import attacks, data, diagnostics, evaluation, reports, runs, sharding, training
from kwta_jax.checkpointing import Checkpointer
from kwta_jax.config import ConfigError, TrainConfig
from kwta_jax.experiments import Experiment
from kwta_jax.models import build_model_from_config
from kwta_jax.progress import MakeBar
from kwta_jax.training import PerturbFn

__all__ = [
    "DEFAULT_FGSM_EPS",
    "RunResult",
    "check_batch_fits",
    "compare_activations",
    "evaluate_run_dirs",
    "fgsm_comparison",
    "initialize",
    "load_training_data",
    "make_pgd_perturb",
    "plan_experiments",
    "run_comparison",
    "run_experiment",
    "run_experiments",
    "train_and_evaluate",
]

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)

DEFAULT_FGSM_EPS: tuple[float, ...] = (0.1, 0.15, 0.2)


# --------------------------------------------------------------------------------------------
# One training run.
# --------------------------------------------------------------------------------------------


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


def _is_primary() -> bool:
    """Whether this process writes the run files (process 0; every process checkpoints)."""
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """All processes meet here (multi-host: nobody writes before everybody has checked)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initialize(distributed: bool | dict | None) -> None:
    """`kwta_jax.training.initialize_distributed` when ``distributed`` is true: ``True`` for
    the cluster of the environment, or a dict of `jax.distributed.initialize` keywords."""
    if not (distributed or isinstance(distributed, dict)):
        return
    try:
        training.initialize_distributed(**(distributed if isinstance(distributed, dict) else {}))
    except (ValueError, TypeError) as e:  # no cluster found, or inconsistent arguments
        raise ConfigError(
            f"--distributed: {str(e).strip().splitlines()[0]} (outside SLURM / Open MPI / "
            "Kubernetes, give --coordinator-address, --num-processes and --process-id)"
        ) from None


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
    ckpt: Checkpointer, state: training.TrainState, run_dir: Path, *, resume: bool, log: Log
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
    ckpt: Checkpointer, run_dir: Path, state: training.TrainState, config: TrainConfig,
    run_config: dict, history: list[dict],
) -> None:  # fmt: skip
    """The checkpoint and the ``metrics.jsonl`` line of the epoch that ends ``history``."""
    epoch = history[-1]["epoch"]
    ratio = training.anneal_ratio(config, epoch - 1)
    runs.save_training_state(ckpt, state, epoch=epoch, ratio=ratio, run_config=run_config,
                             history=history)  # fmt: skip
    if _is_primary():
        runs.append_metrics(run_dir, history[-1])


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
    mode = runs.check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    if mode == "resume":
        runs.check_resumable(run_dir)
    mesh = mesh or sharding.make_mesh()
    dataset = load_training_data(config) if dataset is None else dataset
    check_batch_fits(config, dataset, mesh)
    _sync(f"checked {run_dir}")
    if _is_primary():
        if mode == "overwrite":
            runs.clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    _sync(f"prepared {run_dir}")

    run_config = runs.make_run_config(config, training.model_spec(config, dataset))
    model = build_model_from_config(run_config)
    tx = training.create_optimizer(
        config, data.num_batches(len(dataset.train_labels), config.batch_size)
    )
    state = training.init_train_state(model, tx, config.seed)
    if perturb_fn is None and config.adv_eps > 0:
        perturb_fn = make_pgd_perturb(config.adv_eps, config.adv_steps, config.adv_step_size)

    with Checkpointer(run_dir, max_to_keep=keep_checkpoints) as ckpt:
        state, start_epoch, history, resumed = _start_or_resume(
            ckpt, state, run_dir, resume=mode == "resume", log=log
        )
        _sync(f"restored {run_dir}")  # process 0 has moved corrupt steps aside
        if start_epoch > config.epochs:  # a checkpoint past the saved config.json's epochs
            raise runs.RunDirError(
                f"cannot resume {run_dir} with --epochs {config.epochs}: its checkpoints "
                f"hold {start_epoch} epochs (resuming trains longer, never shorter)."
            )
        if _is_primary():
            runs.write_config(run_dir, run_config)
            runs.write_metrics(run_dir, history)
        epochs = training.train_epochs(
            model, tx, state, dataset, config, mesh=mesh, perturb_fn=perturb_fn,
            start_epoch=start_epoch, progress=progress,
        )  # fmt: skip
        for done, (state, record) in enumerate(epochs, start=1):
            history.append(record)
            _save_epoch(ckpt, run_dir, state, config, run_config, history)
            log(_epoch_line(config, record))
            if stop_after_epochs is not None and done >= stop_after_epochs:
                break
    if history and _is_primary():
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
    configs = {act: dataclasses.replace(config, act=act) for act in acts}
    runs.check_writable(out)
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
    _sync(f"checked {out}")
    if overwrite and _is_primary():
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
    if _is_primary():
        runs.write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
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


# --------------------------------------------------------------------------------------------
# attack.py: the suite on the runs of a directory.
# --------------------------------------------------------------------------------------------


def _test_examples(config: dict, n_examples: int, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_examples`` test images ``[n, H, W, C]`` float32 and labels ``[n]`` int32
    of a run's dataset, loaded once per distinct split (``cache``)."""
    # The test split is a function of these fields (the split of mnist5k is seeded).
    split = {k: config.get(k) for k in ("data_dir", "seed", "test_size", "max_test")}
    split = {k: v for k, v in split.items() if v is not None}
    key = (config["dataset"], tuple(sorted(split.items())))
    if key not in cache:
        cache[key] = data.load_dataset(config["dataset"], **split)
    ds = cache[key]
    x = np.asarray(ds.test_images[:n_examples], np.float32)
    y = np.asarray(ds.test_labels[:n_examples], np.int32)
    return x, y


def _attack_run(
    run: Path,
    model: nnx.Module,
    config: dict,
    x: np.ndarray,
    y: np.ndarray,
    *,
    source: nnx.Module | None,
    suite: Sequence[evaluation.AttackSpec],
    eps_values: Sequence[float] | None,
    norm: str,
    batch_size: int,
    seed: int,
    surrogate: str,
    diagnose: bool,
    progress: MakeBar | None,
    log: Log,
    mode: str = "full",
    mesh: Mesh | None = None,
) -> evaluation.EvalResult:
    """The suite (and the masking checks) on one loaded run; logs its table and flags."""
    name = f"{run.name} ({config.get('act', '?')})"
    eps = list(eps_values) if eps_values else list(evaluation.default_eps(config["dataset"]))
    models = evaluation.models_from_nnx(model, source=source, surrogate=surrogate, name=name)
    what = f"{len(x)} test examples, {norm} eps {eps}, {mode} mode"
    log(f"\n== {name}: {config['dataset']}, {what}")
    t0 = time.perf_counter()
    res = evaluation.run_suite(models, x, y, suite=suite, eps_values=eps, norm=norm,
                               batch_size=batch_size, seed=seed, progress=progress, mode=mode,
                               mesh=mesh)  # fmt: skip
    res.extra["run_dir"] = str(run)
    res.extra["config"] = config
    log(reports.format_table(res))
    if diagnose:
        flags = diagnostics.run_diagnostics(models, res, x, y, batch_size=batch_size, seed=seed)
        res.extra["flags"] = [f.to_dict() for f in flags]
        log(reports.format_flags(flags, name))
    res.extra["wall_seconds"] = time.perf_counter() - t0
    log(f"({res.extra['wall_seconds']:.0f} s)")
    return res


def _evaluation_suite(
    attack_names: Sequence[str] | None,
    *,
    preset: str | None,
    norm: str,
    budget: str,
    es_schedule: Sequence[tuple[int, int]] | None,
) -> list[evaluation.AttackSpec]:
    """The attacks `evaluate_run_dirs` runs: the ``preset``'s, or ``attack_names`` (default
    `evaluation.default_suite` of ``budget``) at ``budget`` (``es_schedule`` replacing its
    schedule for `es`)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}; got {preset!r}.")
        # The quick budget shrinks the preset for smoke runs; otherwise AutoAttack standard.
        quick = {"apgd_steps": 5, "fab_steps": 5, "n_target_classes": 3, "square_queries": 50}
        return evaluation.autoattack_suite(norm, **(quick if budget == "quick" else {}))
    names = evaluation.default_suite(budget, norm) if attack_names is None else attack_names
    numbers: str | dict = budget
    if es_schedule is not None:
        if budget not in evaluation.BUDGETS:
            raise ValueError(f"budget must be one of {sorted(evaluation.BUDGETS)}; got {budget!r}.")
        numbers = {**evaluation.BUDGETS[budget], "es_schedule": tuple(map(tuple, es_schedule))}
    return evaluation.build_suite(names, norm=norm, budget=numbers)


PRESETS = ("autoattack",)


def evaluate_run_dirs(
    path,
    *,
    attack_names: Sequence[str] | None = None,
    eps_values: Sequence[float] | None = None,
    norm: str = "linf",
    n_examples: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
    budget: str = "default",
    surrogate: str = "identity",
    out=None,
    diagnose: bool = True,
    progress: MakeBar | None = None,
    log: Log | None = None,
    mode: str = "full",
    preset: str | None = None,
    es_schedule: Sequence[tuple[int, int]] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Runs the attack suite on every run under ``path`` (see `kwta_jax.runs.find_run_dirs`)
    and writes the report; what ``attack.py`` does.

    With several runs, the ReLU one (``config["act"] == "relu"``) is the transfer surrogate
    of the others. Writes ``out/results.json``, ``out/results_per_image.npz`` (see
    `kwta_jax.reports.save_per_image`), ``out/accuracy_vs_eps.png`` and
    ``out/examples_<run>.png`` (``out`` defaults to ``path/attack``); logs the table, the
    worst case and the diagnostics. Returns the JSON payload.

    ``attack_names``: default `evaluation.default_suite` of ``budget``. ``mode``: ``"full"``
    (every attack on every example) or ``"cascade"`` (see `evaluation.run_suite`).
    ``preset="autoattack"``: `evaluation.autoattack_suite` instead of ``attack_names`` (its
    own budget; ``budget="quick"`` shrinks it for smoke runs). ``es_schedule``: replaces the
    budget's schedule of `es` (e.g. `kwta_jax.attacks.ES_SCHEDULE`, the literature's).
    ``mesh``: devices that split each chunk (default: a `sharding.make_mesh` of every
    device). Multi-host (after `initialize`): every process runs this with the same
    arguments, the mesh spans all hosts' devices, each evaluates its share of every chunk,
    and process 0 alone logs and writes the files.

    Raises:
      FileNotFoundError: no run under ``path`` (or a dataset that is not here).
      kwta_jax.checkpointing.CheckpointError: a run that cannot be loaded.
      ValueError: an unknown attack or budget.
    """
    log = log or _logger.info
    primary = _is_primary()
    if not primary:  # the other processes compute their share and stay quiet
        log, progress = (lambda *_: None), None
    run_dirs = runs.find_run_dirs(path)
    suite = _evaluation_suite(attack_names, preset=preset, norm=norm, budget=budget,
                              es_schedule=es_schedule)  # fmt: skip
    mesh = sharding.make_mesh() if mesh is None else mesh
    loaded = {run: runs.load_trained_model(run) for run in run_dirs}
    relu = [r for r, (_, c) in loaded.items() if str(c.get("act", "")).lower() == "relu"]
    source = loaded[relu[0]][0] if relu else None
    out = Path(out) if out is not None else Path(path) / "attack"
    if primary:
        out.mkdir(parents=True, exist_ok=True)

    payload = {"path": str(path), "budget": budget, "seed": seed, "mode": mode,
               "preset": preset, "attacks": [s.name for s in suite], "devices": mesh.size,
               "runs": []}  # fmt: skip
    if es_schedule is not None:
        payload["es_schedule"] = [list(p) for p in es_schedule]
    results, datasets = [], {}
    for run, (model, config) in loaded.items():
        x, y = _test_examples(config, n_examples, datasets)
        res = _attack_run(
            run, model, config, x, y, source=None if run in relu[:1] else source, suite=suite,
            eps_values=eps_values, norm=norm, batch_size=batch_size, seed=seed,
            surrogate=surrogate, diagnose=diagnose, progress=progress, log=log, mode=mode,
            mesh=mesh,
        )  # fmt: skip
        results.append(res)
        payload["runs"].append(res.to_dict())
        if primary:
            reports.plot_examples(res, out / f"examples_{run.name}.png")
    if not primary:
        return payload
    reports.plot_accuracy_vs_eps(results, out / "accuracy_vs_eps.png")
    runs.write_json_atomic(out / "results.json", payload)  # never a truncated results.json
    reports.save_per_image(results, out / "results_per_image.npz")
    log(
        f"\nwrote {out / 'results.json'}, {out / 'results_per_image.npz'}, "
        f"{out / 'accuracy_vs_eps.png'} and example grids"
    )
    return payload


# --------------------------------------------------------------------------------------------
# train.py --experiment: the write-up's presets.
# --------------------------------------------------------------------------------------------


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
        progress=progress, log=log,
    )  # fmt: skip
    report = reports.build_report(experiment, payload)
    report["train_summary"] = summary
    report["budget"] = budget
    runs.write_json_atomic(out / "experiment.json", report)
    table = reports.format_report(report)
    runs.write_atomic(out / "table.md", table + "\n")
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
