"""Workflows: the library's layers composed into what the CLIs and the experiment presets run.

* `evaluate_run_dirs` (``attack.py``): load every run under a path (`kwta_jax.runs`), load
  its test split (`kwta_jax.data`), run the attack suite (`kwta_jax.evaluation`) and the
  gradient-masking checks (`kwta_jax.diagnostics`), write the report (`kwta_jax.reports`).

Everything here reports through a ``log`` callback (default: this module's logger) and shows
progress through a bar factory (``progress``, see `kwta_jax.progress`; the CLIs pass tqdm).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from kwta_jax import data, diagnostics, evaluation, reports, runs
from kwta_jax.progress import MakeBar

__all__ = ["evaluate_run_dirs"]

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)


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
) -> evaluation.EvalResult:
    """The suite (and the masking checks) on one loaded run; logs its table and flags."""
    name = f"{run.name} ({config.get('act', '?')})"
    eps = list(eps_values) if eps_values else list(evaluation.default_eps(config["dataset"]))
    models = evaluation.models_from_nnx(model, source=source, surrogate=surrogate, name=name)
    log(f"\n== {name}: {config['dataset']}, {len(x)} test examples, {norm} eps {eps}")
    t0 = time.perf_counter()
    res = evaluation.run_suite(models, x, y, suite=suite, eps_values=eps, norm=norm,
                               batch_size=batch_size, seed=seed, progress=progress)  # fmt: skip
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


def evaluate_run_dirs(
    path,
    *,
    attack_names: Sequence[str] = evaluation.DEFAULT_SUITE,
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
) -> dict:
    """Runs the attack suite on every run under ``path`` (see `kwta_jax.runs.find_run_dirs`)
    and writes the report; what ``attack.py`` does.

    With several runs, the ReLU one (``config["act"] == "relu"``) is the transfer surrogate
    of the others. Writes ``out/results.json``, ``out/accuracy_vs_eps.png`` and
    ``out/examples_<run>.png`` (``out`` defaults to ``path/attack``); logs the table, the
    worst case and the diagnostics. Returns the JSON payload.

    Raises:
      FileNotFoundError: no run under ``path`` (or a dataset that is not here).
      kwta_jax.checkpointing.CheckpointError: a run that cannot be loaded.
      ValueError: an unknown attack or budget.
    """
    log = log or _logger.info
    run_dirs = runs.find_run_dirs(path)
    suite = evaluation.build_suite(attack_names, norm=norm, budget=budget)
    loaded = {run: runs.load_trained_model(run) for run in run_dirs}
    relu = [r for r, (_, c) in loaded.items() if str(c.get("act", "")).lower() == "relu"]
    source = loaded[relu[0]][0] if relu else None
    out = Path(out) if out is not None else Path(path) / "attack"
    out.mkdir(parents=True, exist_ok=True)

    payload = {"path": str(path), "budget": budget, "seed": seed, "runs": []}
    results, datasets = [], {}
    for run, (model, config) in loaded.items():
        x, y = _test_examples(config, n_examples, datasets)
        res = _attack_run(
            run, model, config, x, y, source=None if run in relu[:1] else source, suite=suite,
            eps_values=eps_values, norm=norm, batch_size=batch_size, seed=seed,
            surrogate=surrogate, diagnose=diagnose, progress=progress, log=log,
        )  # fmt: skip
        results.append(res)
        payload["runs"].append(res.to_dict())
        reports.plot_examples(res, out / f"examples_{run.name}.png")
    reports.plot_accuracy_vs_eps(results, out / "accuracy_vs_eps.png")
    reports.save_json(payload, out / "results.json")
    log(f"\nwrote {out / 'results.json'}, {out / 'accuracy_vs_eps.png'} and example grids")
    return payload
