"""Checks on a model before it is attacked, as AutoAttack's ``checks.py`` does.

An evaluation is only meaningful if the model is a deterministic function of each input
alone, returning logits. Each check returns a `Check`: ``"ok"``, ``"warning"`` (the numbers
can still be reported, with a caveat) or ``"error"`` (they would be meaningless; the caller
stops). `run_preflight` runs them all on a few examples; its records go into
`kwta_jax.results.EvalResult.preflight`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kwta_jax.adapters import Model

__all__ = ["Check", "PreflightError", "run_preflight"]

STATUSES = ("ok", "warning", "error")


class PreflightError(ValueError):
    """The model fails a check that makes any robustness number meaningless."""


@dataclasses.dataclass(frozen=True)
class Check:
    """One pre-flight check: its ``name``, ``status`` (one of `STATUSES`) and a one-line
    ``message``."""

    name: str
    status: str
    message: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _logits(model: Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)(model.params, jnp.asarray(x)), np.float64)


def check_output(model: Model, x: np.ndarray, y: np.ndarray) -> list[Check]:
    """Logits of shape ``[B, classes]``, finite, covering the labels; and logits rather than
    probabilities (rows in [0, 1] summing to 1: a softmax layer left in the model weakens the
    gradient attacks, whose losses expect logits)."""
    z = _logits(model, x)
    if z.ndim != 2 or z.shape[0] != len(x) or z.shape[1] < 2:
        return [
            Check(
                "output_shape",
                "error",
                f"the model must return logits [B, classes>=2] for B inputs; got shape "
                f"{z.shape} for {len(x)} inputs.",
            )
        ]
    checks = [Check("output_shape", "ok", f"logits [B, {z.shape[1]}]")]
    if not np.isfinite(z).all():
        checks.append(Check("finite_logits", "error", "the model returns non-finite logits."))
    if int(y.max()) >= z.shape[1] or int(y.min()) < 0:
        checks.append(
            Check(
                "labels",
                "error",
                f"y: labels must lie in [0, {z.shape[1]}) for a model with "
                f"{z.shape[1]} classes; got [{int(y.min())}, {int(y.max())}].",
            )
        )
    probabilities = (z >= 0).all() and (z <= 1).all() and np.allclose(z.sum(1), 1.0, atol=1e-4)
    checks.append(
        Check(
            "logits_not_probabilities",
            "warning",
            "the outputs look like probabilities (in [0, 1], rows summing to 1): pass the "
            "logits (remove the final softmax), or the gradient attacks are weakened.",
        )
        if probabilities
        else Check("logits_not_probabilities", "ok", "outputs are logits")
    )
    return checks


def check_deterministic(model: Model, x: np.ndarray) -> Check:
    """Two forward passes of the same inputs agree (no dropout or other randomness)."""
    a, b = _logits(model, x), _logits(model, x)
    if np.array_equal(a, b):
        return Check("deterministic", "ok", "two forward passes agree")
    return Check(
        "deterministic",
        "warning",
        f"two forward passes of the same inputs differ (max {np.abs(a - b).max():.3g}):"
        " a randomised model needs EOT attacks and repeated evaluation; deterministic "
        "attacks under-report its vulnerability.",
    )


def check_batch_independent(model: Model, x: np.ndarray, tol: float = 1e-4) -> Check:
    """Each example's logits do not depend on the other examples of its batch (BatchNorm in
    train mode, batch-level ops): the evaluation pads and regroups batches freely."""
    together = _logits(model, x)
    alone = np.stack(
        [_logits(model, np.repeat(x[i : i + 1], len(x), axis=0))[0] for i in range(len(x))]
    )
    gap = np.abs(together - alone).max() / (1.0 + np.abs(together).max())
    if gap <= tol:
        return Check("batch_independent", "ok", "logits do not depend on the batch")
    return Check(
        "batch_independent",
        "error",
        f"an example's logits change with the other examples of its batch (relative "
        f"gap {gap:.3g}): e.g. BatchNorm in train mode; put the model in eval mode.",
    )


def run_preflight(model: Model, x: np.ndarray, y: np.ndarray, *, n: int = 8) -> list[Check]:
    """Every check on the first ``n`` examples (at least 2, for the batch check).

    Raises:
      PreflightError: a check with status ``"error"`` (the message is its one line).
    """
    x, y = np.asarray(x[:n], np.float32), np.asarray(y[:n])
    if len(x) == 1:
        x, y = np.concatenate([x, 1.0 - x]), np.concatenate([y, y])
    try:
        checks = check_output(model, x, y)
    except (TypeError, ValueError) as e:  # the model cannot take these inputs at all
        raise PreflightError(
            f"the model fails on inputs of shape {x.shape[1:]} (per example): "
            f"{str(e).strip().splitlines()[0]}"
        ) from e
    if not any(c.status == "error" for c in checks):
        checks += [check_deterministic(model, x), check_batch_independent(model, x)]
    errors = [c for c in checks if c.status == "error"]
    if errors:
        raise PreflightError(f"{model.name}: {errors[0].message}")
    return checks
