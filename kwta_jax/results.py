"""`EvalResult`: what `kwta_jax.evaluation.run_suite` returns — predictions per attack and
radius, the per-example worst case, minimum-norm distances, per-image arrays, JSON.

Plain NumPy: a result can be built, read and compared without JAX or the models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["EvalResult"]


@dataclasses.dataclass
class EvalResult:
    """Outcome of `run_suite`. Arrays are over the ``N`` evaluated examples.

    ``mode="full"``: ``pred[a][eps]`` is attack ``a``'s prediction on every example.
    ``mode="cascade"``: attack ``a`` ran only on the examples every earlier attack failed on
    (``attacked[a][eps]``); ``pred`` is -1 elsewhere, so ``accuracy(a, eps)`` is the robust
    accuracy after the stages up to ``a`` and the last one is the worst case. In both modes
    `worst_correct` is the per-example AND over attacks and `breaker` the first attack (in
    suite order) that broke each example.
    """

    name: str
    norm: str
    eps_values: list[float]
    labels: np.ndarray  # [N]
    clean_pred: np.ndarray  # [N]
    pred: dict[str, dict[float, np.ndarray]]  # attack -> eps -> [N]
    seconds: dict[str, dict[float, float]]
    compile_s: dict[str, float]
    kinds: dict[str, str]
    skipped: dict[str, str]
    examples: dict[str, dict[float, np.ndarray]]  # attack -> eps -> x_adv[:keep]
    clean_examples: np.ndarray  # x[:keep]
    extra: dict = dataclasses.field(default_factory=dict)
    mode: str = "full"
    attacked: dict[str, dict[float, np.ndarray]] = dataclasses.field(default_factory=dict)
    min_norm_dist: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # a -> [N]
    devices: int = 1

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> np.ndarray:
        return self.clean_pred == self.labels

    def correct(self, attack: str, eps: float) -> np.ndarray:
        """``[N]`` bool: correct clean and under ``attack`` at ``eps`` (cascade: and under
        every earlier attack)."""
        return self.clean_correct & (self.pred[attack][eps] == self.labels)

    def accuracy(self, attack: str, eps: float) -> float:
        return float(self.correct(attack, eps).mean())

    def worst_correct(self, eps: float, attacks_: Sequence[str] | None = None) -> np.ndarray:
        """``[N]`` bool: robust to every attack (of ``attacks_``, default all) at ``eps``."""
        ok = self.clean_correct.copy()
        for a in self.pred if attacks_ is None else attacks_:
            ok &= self.pred[a][eps] == self.labels
        return ok

    def worst_accuracy(self, eps: float) -> float:
        return float(self.worst_correct(eps).mean())

    def breaker(self, eps: float) -> np.ndarray:
        """``[N]`` int: index in ``list(pred)`` of the first attack that broke each example
        at ``eps``; -1 where none did (robust), -2 where the clean prediction is wrong."""
        out = np.where(self.clean_correct, -1, -2)
        for i, a in enumerate(self.pred):
            broke = (out == -1) & (self.pred[a][eps] >= 0) & (self.pred[a][eps] != self.labels)
            out[broke] = i
        return out

    def broken_by(self, eps: float) -> dict[str, int]:
        """Examples each attack broke first at ``eps`` (suite order)."""
        b = self.breaker(eps)
        return {a: int((b == i).sum()) for i, a in enumerate(self.pred)}

    def min_distance(self) -> np.ndarray | None:
        """``[N]``: smallest distance found by the minimum-norm attacks per example (``inf``
        where none found an adversarial); ``None`` without a minimum-norm attack."""
        if not self.min_norm_dist:
            return None
        d = np.stack(list(self.min_norm_dist.values()))
        d = np.where(np.isnan(d), np.inf, d)
        return d.min(0)

    def median_min_norm(self, attack: str | None = None) -> float | None:
        """Median over the clean-correct examples of the minimum-norm distance (of ``attack``,
        default the smallest over every minimum-norm attack); an example where nothing was
        found counts as ``inf`` (so the median is ``inf`` if that is most of them). ``nan``
        without clean-correct examples; ``None`` without a minimum-norm attack, or for an
        ``attack`` that did not run on every clean-correct example (a late cascade stage: the
        median of the hardest examples alone would not be the model's)."""
        d = self.min_distance() if attack is None else self.min_norm_dist[attack]
        if d is None or np.isnan(d[self.clean_correct]).any():
            return None
        d = np.where(np.isnan(d), np.inf, d)[self.clean_correct]
        return float(np.median(d)) if len(d) else float("nan")

    def throughput(self, attack: str) -> float:
        """Examples attacked per second, over all radii, compilation excluded."""
        n = sum(int(self.attacked[attack][e].sum()) for e in self.eps_values) \
            if attack in self.attacked else self.n * len(self.eps_values)  # fmt: skip
        return n / max(sum(self.seconds[attack].values()), 1e-9)

    def per_image(self) -> dict[str, np.ndarray]:
        """Per-example arrays: ``labels``, ``clean_pred``, ``attacks`` (names, suite order),
        ``robust/<attack>/<eps>`` and ``worst_robust/<eps>`` (bool), ``attacked/<attack>/<eps>``
        (bool), ``breaker/<eps>`` (int, see `breaker`), ``min_norm/<attack>`` (float; ``inf``
        none found, ``nan`` not attacked)."""
        out = {"labels": self.labels, "clean_pred": self.clean_pred,
               "attacks": np.asarray(list(self.pred), dtype=str),
               "eps": np.asarray(self.eps_values, np.float64)}  # fmt: skip
        for e in self.eps_values:
            out[f"worst_robust/{e}"] = self.worst_correct(e)
            out[f"breaker/{e}"] = self.breaker(e)
            for a in self.pred:
                out[f"robust/{a}/{e}"] = self.correct(a, e)
                out[f"attacked/{a}/{e}"] = self.attacked[a][e] if a in self.attacked \
                    else np.ones(self.n, bool)  # fmt: skip
        for a, d in self.min_norm_dist.items():
            out[f"min_norm/{a}"] = d
        return out

    def to_dict(self) -> dict:
        attacks_ = {}
        for a in self.pred:
            entry = {
                "kind": self.kinds[a],
                "accuracy": {str(e): self.accuracy(a, e) for e in self.eps_values},
                "seconds": {str(e): self.seconds[a][e] for e in self.eps_values},
                "compile_seconds": self.compile_s[a],
                "examples_per_second": self.throughput(a),
            }
            if a in self.attacked:
                entry["attacked"] = {str(e): int(self.attacked[a][e].sum())
                                     for e in self.eps_values}  # fmt: skip
            if a in self.min_norm_dist:
                entry["median_min_norm"] = self.median_min_norm(a)
            attacks_[a] = entry
        return {
            "model": self.name,
            "norm": self.norm,
            "mode": self.mode,
            "devices": self.devices,
            "n_examples": self.n,
            "eps": self.eps_values,
            "clean_accuracy": float(self.clean_correct.mean()),
            "attacks": attacks_,
            "worst_case_accuracy": {str(e): self.worst_accuracy(e) for e in self.eps_values},
            "broken_by": {str(e): self.broken_by(e) for e in self.eps_values},
            "median_min_norm": self.median_min_norm(),
            "skipped": self.skipped,
            **self.extra,
        }
