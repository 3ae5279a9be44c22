"""The evaluation workflow: what ``python attack.py`` runs.

`evaluate_run_dirs`: load every run under a path (`kwta_jax.runs`), run the attack suite
(`kwta_jax.evaluation`) and the gradient-masking checks (`kwta_jax.diagnostics`) on its test
split, and write the report (`kwta_jax.reports`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kwta_jax import data, diagnostics, evaluation, reports, runs, sharding
from kwta_jax.atomic import write_json_atomic
from kwta_jax.multihost import is_primary
from kwta_jax.progress import MakeBar

__all__ = ["PRESETS", "evaluate_run_dirs"]

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)


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
    primary = is_primary()
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
    if not primary:
        return payload
    # Each file whole or not at all (a full disk keeps the old one); the results first.
    write_json_atomic(out / "results.json", payload)
    reports.save_per_image(results, out / "results_per_image.npz")
    reports.plot_accuracy_vs_eps(results, out / "accuracy_vs_eps.png")
    for run, res in zip(loaded, results, strict=True):
        reports.plot_examples(res, out / f"examples_{run.name}.png")
    log(
        f"\nwrote {out / 'results.json'}, {out / 'results_per_image.npz'}, "
        f"{out / 'accuracy_vs_eps.png'} and example grids"
    )
    return payload
