"""Evaluate any JAX model's adversarial robustness: ``evaluate(model, x, y, eps=..., key=...)``.

The front door for a user's own model (AutoAttack's ``run_standard_evaluation``, for JAX):

    from kwta_jax import robustness
    from kwta_jax.adapters import from_apply

    result = robustness.evaluate(from_apply(apply_fn, params), x_test, y_test,
                                 eps=8 / 255, key=jax.random.key(0), suite="autoattack")
    result.worst_accuracy(8 / 255), result.x_adv[8 / 255], result.breaking_attack(8 / 255)

It checks the model before attacking it (`kwta_jax.preflight`), builds the BPDA twin of every
library k-WTA inside it (`kwta_jax.adapters.Model.bpda`), resolves the suite
(`kwta_jax.suites.resolve_suite`), runs it (`kwta_jax.evaluation.run_suite`, a cascade by
default) and the gradient-masking checks (`kwta_jax.diagnostics`), and returns the
`kwta_jax.results.EvalResult` with all of it recorded.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from kwta_jax.adapters import Model, Models, as_model
from kwta_jax.diagnostics import Diagnosis, run_diagnostics
from kwta_jax.evaluation import as_eps_values, as_key, make_models, run_suite
from kwta_jax.preflight import PreflightError, run_preflight
from kwta_jax.progress import MakeBar
from kwta_jax.results import EvalResult
from kwta_jax.suites import AttackSpec, resolve_suite

__all__ = ["PreflightError", "diagnose", "evaluate"]


def _check_bounds(bounds) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds: expected (low, high) numbers; got {bounds!r}.") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"bounds: need finite low < high; got {bounds!r}.")
    return low, high


def _to_unit(model: Model, low: float, high: float) -> Model:
    """``model`` taking inputs mapped from ``[low, high]`` to ``[0, 1]``."""
    if (low, high) == (0.0, 1.0):
        return model

    def apply(params, x):
        return model.apply(params, low + (high - low) * x)

    return Model(apply, model.params, model.name)


def _bars(progress) -> MakeBar | None:
    if progress is True:
        return functools.partial(tqdm, leave=False, dynamic_ncols=True)
    return progress or None


def diagnose(
    models: Models,
    res: EvalResult,
    x: np.ndarray,
    y: np.ndarray,
    *,
    suite: Sequence[AttackSpec],
    key: jax.Array | int,
    batch_size: int = 250,
    progress: MakeBar | None = None,
) -> Diagnosis:
    """The gradient-masking checks (`kwta_jax.diagnostics.run_diagnostics`) of ``res``, the
    result of ``suite`` run on ``models`` with ``key``. The checks draw from
    ``fold_in(key, len(suite))``, a key none of the suite's attacks uses, so they are the
    same whether `evaluate` runs them or a caller that printed the suite's table first."""
    return run_diagnostics(
        models, res, x, y, suite=suite, batch_size=batch_size,
        key=jax.random.fold_in(as_key(key), len(suite)), progress=progress,
    )  # fmt: skip


def evaluate(
    model,
    x,
    y,
    *,
    eps: float | Sequence[float],
    key: jax.Array | int,
    norm: str = "linf",
    suite: str | AttackSpec | Sequence[str | AttackSpec] = "default",
    budget: str | dict | None = None,
    mode: str = "cascade",
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 250,
    source=None,
    bpda_surrogate: str = "identity",
    diagnostics: bool = True,
    preflight: bool = True,
    es_schedule: Sequence[tuple[int, int]] | None = None,
    progress: MakeBar | bool = True,
    log: Callable[[str], None] | None = print,
    mesh: Mesh | None = None,
    name: str | None = None,
) -> EvalResult:
    """Evaluates ``model`` on ``x [N, ...]``, ``y [N]`` against an attack suite.

    Args:
      model: an NNX module (put in eval mode on a copy) or a `kwta_jax.adapters.Model`
        (`from_nnx`, `from_linen`, `from_apply`); parameters are passed to every compiled
        attack as arguments, never baked in.
      x: inputs of any rank ``[N, ...]``, within ``bounds``. y: ``[N]`` integer labels.
      eps: one radius or several (in the units of ``x``).
      key: a PRNG key (an int is a seed); the results are a function of it.
      norm: ``"linf"`` or ``"l2"``.
      suite: ``"default"``, ``"strong"``, ``"fast"``, ``"quick"``, ``"autoattack"``, attack
        names (`kwta_jax.suites.ATTACKS`), `AttackSpec`, or a list of these (a named suite in
        a list expands in place); see `kwta_jax.suites.resolve_suite`.
      budget: the attacks' numbers (a name of `kwta_jax.suites.BUDGETS` or a dict of
        overrides); default: the named suite's, or ``"default"``.
      mode: ``"cascade"`` (default: each attack only on what the earlier ones left) or
        ``"full"`` (every attack on every example).
      bounds: the valid input range; attacks stay inside it. Inputs are mapped to [0, 1]
        for the attacks and every result is mapped back.
      batch_size: examples per compiled chunk (bounds memory).
      source: a transfer surrogate (a `Model` or NNX module) for the ``"transfer"`` attack.
      bpda_surrogate: the backward pass that replaces k-WTA in the BPDA twin.
      diagnostics: run the gradient-masking checks (`kwta_jax.diagnostics`).
      preflight: run the checks of `kwta_jax.preflight` first (errors stop here).
      es_schedule: the `es` attack's schedule instead of the budget's.
      progress: ``True`` (tqdm bars), ``False``, or a bar factory (`kwta_jax.progress`).
      log: where one-line messages go (pre-flight warnings); ``None`` silences them.
      mesh: devices that split each chunk (default: this host's).
      name: the model's name in tables (default: the `Model`'s).

    Returns:
      The `EvalResult` (``preflight`` and ``diagnostics`` recorded in it).

    Raises:
      TypeError, ValueError: a bad argument, named in the message.
      PreflightError: the model fails a check that makes robustness numbers meaningless.
    """
    model = as_model(model, name=name)
    low, high = _check_bounds(bounds)
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size: expected a positive int; got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1; got {batch_size}.")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x: expected [N, ...] inputs with N >= 1; got shape {x.shape}.")
    if not np.isfinite(x).all() or x.min() < low or x.max() > high:
        raise ValueError(
            f"x: inputs must lie within bounds=({low:g}, {high:g}); found "
            f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]. Pass the right bounds=."
        )
    eps_values = as_eps_values(eps)
    key = as_key(key)
    specs = resolve_suite(suite, norm=norm, budget=budget, es_schedule=es_schedule)
    x01 = (x - low) / (high - low) if (low, high) != (0.0, 1.0) else x
    unit = _to_unit(model, low, high)
    checks = run_preflight(unit, x01, y) if preflight else []
    for c in checks:
        if c.status != "ok" and log is not None:
            log(f"{model.name}: {c.name}: {c.message}")
    models = make_models(
        unit,
        source=None if source is None else _to_unit(as_model(source), low, high),
        surrogate=bpda_surrogate,
    )
    scale = high - low
    res = run_suite(
        models,
        x01,
        y,
        suite=specs,
        eps_values=[e / scale for e in eps_values],
        key=key,
        norm=norm,
        batch_size=batch_size,
        progress=_bars(progress),
        mode=mode,
        mesh=mesh,
    )
    res.preflight = [c.to_dict() for c in checks]
    if diagnostics:
        diagnosis = diagnose(
            models, res, x01, y, suite=specs, key=key, batch_size=batch_size,
            progress=_bars(progress),
        )  # fmt: skip
        res.diagnostics = diagnosis.to_dict()
    if (low, high) != (0.0, 1.0):
        res = res.rescaled(low, high, eps_values)
    return res
