"""The evaluation workflow: what ``python attack.py`` runs.

`evaluate_run_dirs`: load every run under a path (`kwta_jax.runs`), evaluate it on a
class-balanced subset of its test split (`kwta_jax.subsets`, `kwta_jax.robustness`) with the
gradient-masking checks (`kwta_jax.diagnostics`), and write the report (`kwta_jax.reports`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from kwta_jax import data, reports, robustness, runs, sharding, subsets
from kwta_jax.adapters import Model, from_nnx
from kwta_jax.atomic import write_json_atomic
from kwta_jax.evaluation import make_models
from kwta_jax.multihost import is_primary
from kwta_jax.progress import MakeBar
from kwta_jax.results import EvalResult
from kwta_jax.suites import PRESETS, AttackSpec, default_eps, resolve_suite

__all__ = ["PRESETS", "evaluate_run_dirs"]

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)


def _test_examples(
    config: dict, n_examples: int, cache: dict, *, subset: str, subset_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [n, H, W, C] float32, y [n] int32, indices [n])``: the test examples ``subset``
    picks (`kwta_jax.subsets`) from a run's test split, loaded once per split (``cache``)."""
    # The test split is a function of these fields (the split of mnist5k is seeded).
    split = {k: config.get(k) for k in ("data_dir", "seed", "test_size", "max_test")}
    split = {k: v for k, v in split.items() if v is not None}
    key = (config["dataset"], tuple(sorted(split.items())))
    if key not in cache:
        cache[key] = data.load_dataset(config["dataset"], **split)
    ds = cache[key]
    indices = subsets.select_indices(ds.test_labels, n_examples, subset, subset_seed)
    x = np.asarray(ds.test_images[indices], np.float32)
    y = np.asarray(ds.test_labels[indices], np.int32)
    return x, y, indices


def _subset_words(subset: str, subset_seed: int, n: int) -> str:
    if subset == "first":
        return f"the first {n} test examples"
    return f"{n} test examples (class-balanced subset, seed {subset_seed})"


def _attack_run(
    run: Path,
    model: Model,
    config: dict,
    x: np.ndarray,
    y: np.ndarray,
    *,
    source: Model | None,
    suite: Sequence[AttackSpec],
    eps_values: Sequence[float] | None,
    norm: str,
    batch_size: int,
    key: jax.Array,
    surrogate: str,
    diagnose: bool,
    progress: MakeBar | None,
    log: Log,
    mode: str,
    what: str,
    mesh: Mesh | None = None,
) -> EvalResult:
    """The suite (and the masking checks) on one loaded run; logs its table and flags."""
    eps = list(eps_values) if eps_values else list(default_eps(config["dataset"]))
    log(f"\n== {model.name}: {config['dataset']}, {what}, {norm} eps {eps}, {mode} mode")
    t0 = time.perf_counter()
    res = robustness.evaluate(
        model, x, y, eps=eps, key=key, norm=norm, suite=suite, mode=mode,
        batch_size=batch_size, source=source, bpda_surrogate=surrogate, diagnostics=False,
        progress=progress or False, log=log, mesh=mesh,
    )  # fmt: skip
    res.extra["run_dir"] = str(run)
    res.extra["config"] = config
    log(reports.format_table(res))
    if diagnose:
        models = make_models(model, source=source, surrogate=surrogate)
        diagnosis = robustness.diagnose(
            models, res, x, y, suite=suite, key=key, batch_size=batch_size, progress=progress
        )
        res.diagnostics = diagnosis.to_dict()
        log(reports.format_flags(diagnosis, model.name))
    res.extra["wall_seconds"] = time.perf_counter() - t0
    log(f"({res.extra['wall_seconds']:.0f} s)")
    return res


def _without_es_note(results: Sequence[EvalResult], suite: Sequence[AttackSpec]) -> str:
    """A line for the runs flagged as masked when the suite leaves out `es`, whose worst case
    is then an upper bound that `es` lowers most (docs/attacks.md, "Measured today"); empty
    otherwise."""
    flagged = [r.name for r in results
               if r.diagnostics and any(f["fired"] for f in r.diagnostics["flags"])]  # fmt: skip
    if not flagged or "es" in {spec.name for spec in suite}:
        return ""
    return (
        f"\nnote: gradient masking flagged on {', '.join(flagged)}, and this suite leaves out "
        "es (Tramer et al.'s attack on the smoothed model, the strongest here against masked "
        "gradients): the worst case above is an upper bound; for a number to publish, run "
        "the strong budget (attack.py --budget strong)."
    )


def evaluate_run_dirs(
    path,
    *,
    attack_names: Sequence[str] | None = None,
    eps_values: Sequence[float] | None = None,
    norm: str = "linf",
    n_examples: int = 1000,
    subset: str = "stratified",
    subset_seed: int = 0,
    batch_size: int = 250,
    seed: int = 0,
    budget: str = "default",
    surrogate: str = "identity",
    out=None,
    diagnose: bool = True,
    progress: MakeBar | None = None,
    log: Log | None = None,
    mode: str = "cascade",
    preset: str | None = None,
    es_schedule: Sequence[tuple[int, int]] | None = None,
    mesh: Mesh | None = None,
) -> dict:
    """Runs the attack suite on every run under ``path`` (see `kwta_jax.runs.find_run_dirs`)
    and writes the report; what ``attack.py`` does.

    Each run is evaluated on ``n_examples`` of its test split chosen by ``subset``
    (`kwta_jax.subsets`: ``"stratified"``, class-balanced with ``subset_seed``, or
    ``"first"``), with `kwta_jax.robustness.evaluate` (``seed`` is its key), then the
    gradient-masking checks. A loaded model with no k-WTA (a ReLU run) is the transfer
    surrogate of the others. Writes to ``out`` (default ``path/attack``): ``results.json``,
    ``results_per_image.npz`` (`kwta_jax.reports.save_per_image`), ``<run>.result.npz``
    (`EvalResult.save`: everything, the worst-case adversarial of every example included),
    ``accuracy_vs_eps.png`` and ``examples_<run>.png``; logs the table, the worst case and the
    diagnostics. Returns the JSON payload.

    ``attack_names``: default the ``budget``'s suite (`kwta_jax.suites.resolve_suite`).
    ``mode``: ``"cascade"`` (default) or ``"full"`` (see `kwta_jax.evaluation.run_suite`).
    ``preset="autoattack"``: AutoAttack "standard" instead of ``attack_names`` (its own
    budget; ``budget="quick"`` shrinks it for smoke runs). ``es_schedule``: replaces the
    budget's schedule of `es` (e.g. `kwta_jax.attacks.ES_SCHEDULE`, the literature's).
    ``mesh``: devices that split each chunk (default: a `sharding.make_mesh` of every
    device). Multi-host (after `kwta_jax.multihost.initialize`): every process runs this with
    the same arguments, the mesh spans all hosts' devices, each evaluates its share of every
    chunk, and process 0 alone logs and writes the files.

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
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}; got {preset!r}.")
    suite = resolve_suite(preset or attack_names or budget, norm=norm,
                          budget=budget if attack_names or preset else None,
                          es_schedule=es_schedule)  # fmt: skip
    mesh = sharding.make_mesh() if mesh is None else mesh
    key = jax.random.key(seed)
    out = Path(out) if out is not None else Path(path) / "attack"
    datasets, loaded = {}, {}
    for run in run_dirs:
        module, config = runs.load_trained_model(run)
        model = from_nnx(module, name=f"{run.name} ({config.get('act', '?')})")
        examples = _test_examples(config, n_examples, datasets, subset=subset,
                                  subset_seed=subset_seed)  # fmt: skip
        loaded[run] = (model, config, examples)
    # Transfer surrogates: the loaded models without k-WTA, for the others of the same input.
    plain = [r for r, (m, _, (x, _, _)) in loaded.items() if m.count_kwta(x[:1]) == 0]
    if primary:
        out.mkdir(parents=True, exist_ok=True)

    payload = {"path": str(path), "budget": budget, "seed": seed, "mode": mode,
               "preset": preset, "attacks": [s.name for s in suite], "devices": mesh.size,
               "subset": subset, "subset_seed": subset_seed, "runs": []}  # fmt: skip
    if es_schedule is not None:
        payload["es_schedule"] = [list(p) for p in es_schedule]
    results = []
    for run, (model, config, (x, y, indices)) in loaded.items():
        sources = [loaded[r][0] for r in plain
                   if r != run and loaded[r][2][0].shape[1:] == x.shape[1:]]  # fmt: skip
        res = _attack_run(
            run, model, config, x, y, source=sources[0] if sources else None, suite=suite,
            eps_values=eps_values, norm=norm, batch_size=batch_size, key=key,
            surrogate=surrogate, diagnose=diagnose, progress=progress, log=log, mode=mode,
            what=_subset_words(subset, subset_seed, len(x)), mesh=mesh,
        )  # fmt: skip
        res.indices = indices
        results.append(res)
        payload["runs"].append(res.to_dict())
    note = _without_es_note(results, suite)
    if note:
        log(note)
    if not primary:
        return payload
    # Each file whole or not at all (a full disk keeps the old one); the results first.
    write_json_atomic(out / "results.json", payload)
    reports.save_per_image(results, out / "results_per_image.npz")
    for run, res in zip(loaded, results, strict=True):
        res.save(out / f"{run.name}.result.npz")
    reports.plot_accuracy_vs_eps(results, out / "accuracy_vs_eps.png")
    for run, res in zip(loaded, results, strict=True):
        reports.plot_examples(res, out / f"examples_{run.name}.png")
    log(
        f"\nwrote {out / 'results.json'}, {out / 'results_per_image.npz'}, "
        f"<run>.result.npz (every result, worst-case adversarials included; "
        f"EvalResult.load), {out / 'accuracy_vs_eps.png'} and example grids"
    )
    return payload
