"""`EvalResult`: what `kwta_jax.evaluation.run_suite` returns — predictions per attack and
radius, the per-example worst case and its adversarials, minimum-norm distances, per-image
arrays, JSON, and `EvalResult.save` / `EvalResult.load`.

Plain NumPy: a result can be built, read and compared without JAX or the models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kwta_jax.atomic import atomic_path

__all__ = ["EPS_RTOL", "EvalResult"]

# Radii are looked up with this relative tolerance: 8/255 typed as 0.0313725 finds 0.03137...
EPS_RTOL = 1e-4


@dataclasses.dataclass
class EvalResult:
    """Outcome of `run_suite`. Arrays are over the ``N`` evaluated examples.

    ``mode="full"``: ``pred[a][eps]`` is attack ``a``'s prediction on every example.
    ``mode="cascade"``: attack ``a`` ran only on the examples every earlier attack failed on
    (``attacked[a][eps]``); ``pred`` is -1 elsewhere, so ``accuracy(a, eps)`` is the robust
    accuracy after the stages up to ``a`` and the last one is the worst case. In both modes
    `worst_correct` is the per-example AND over attacks and `breaker` the first attack (in
    suite order) that broke each example; ``x_adv[eps]`` holds that attack's adversarial
    (the clean example where none broke it).

    Every method that takes ``eps`` finds the radius within a relative `EPS_RTOL`.
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
    x_adv: dict[float, np.ndarray] = dataclasses.field(default_factory=dict)  # eps -> [N, ...]
    indices: np.ndarray | None = None  # [N]: the examples' indices in their dataset
    preflight: list[dict] = dataclasses.field(default_factory=list)  # checks before attacking
    diagnostics: dict | None = None  # `kwta_jax.diagnostics.Diagnosis.to_dict()`, if run

    def eps(self, eps: float) -> float:
        """The stored radius equal to ``eps`` up to a relative `EPS_RTOL`.

        Raises:
          KeyError: no such radius (the message lists the ones evaluated).
        """
        for e in self.eps_values:
            if math.isclose(e, float(eps), rel_tol=EPS_RTOL, abs_tol=1e-12):
                return e
        raise KeyError(f"eps={eps!r} was not evaluated; radii: {self.eps_values}.")

    def _attack(self, attack: str) -> str:
        if attack not in self.pred:
            ran = list(self.pred)
            why = f" (skipped: {self.skipped[attack]})" if attack in self.skipped else ""
            raise KeyError(f"attack {attack!r} did not run{why}; attacks: {ran}.")
        return attack

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> np.ndarray:
        return self.clean_pred == self.labels

    def correct(self, attack: str, eps: float) -> np.ndarray:
        """``[N]`` bool: correct clean and under ``attack`` at ``eps`` (cascade: and under
        every earlier attack)."""
        return self.clean_correct & (self.pred[self._attack(attack)][self.eps(eps)] == self.labels)

    def accuracy(self, attack: str, eps: float) -> float:
        return float(self.correct(attack, eps).mean())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.mean())

    def worst_correct(self, eps: float, attacks_: Sequence[str] | None = None) -> np.ndarray:
        """``[N]`` bool: robust to every attack (of ``attacks_``, default all) at ``eps``."""
        eps = self.eps(eps)
        ok = self.clean_correct.copy()
        for a in self.pred if attacks_ is None else attacks_:
            ok &= self.pred[self._attack(a)][eps] == self.labels
        return ok

    def worst_accuracy(self, eps: float) -> float:
        return float(self.worst_correct(eps).mean())

    def breaker(self, eps: float) -> np.ndarray:
        """``[N]`` int: index in ``list(pred)`` of the first attack that broke each example
        at ``eps``; -1 where none did (robust), -2 where the clean prediction is wrong."""
        eps = self.eps(eps)
        out = np.where(self.clean_correct, -1, -2)
        for i, a in enumerate(self.pred):
            broke = (out == -1) & (self.pred[a][eps] >= 0) & (self.pred[a][eps] != self.labels)
            out[broke] = i
        return out

    def breaking_attack(self, eps: float) -> np.ndarray:
        """``[N]`` object: the name of the first attack that broke each example at ``eps``,
        ``None`` where none did, ``"clean"`` where the clean prediction is already wrong."""
        names = np.array([*self.pred, "clean", None], dtype=object)
        return names[self.breaker(eps)]  # -1 -> None, -2 -> "clean"

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
        median of the hardest examples alone would not be the model's). The smallest over
        every attack is ``None`` unless one of them ran on every clean-correct example (in the
        AutoAttack preset FAB-T is a late stage: no median, rather than ``inf`` for the
        examples it never saw)."""
        complete = [
            a for a, d in self.min_norm_dist.items()
            if (attack is None or a == attack) and not np.isnan(d[self.clean_correct]).any()
        ]  # fmt: skip
        if not complete:
            return None
        d = self.min_distance() if attack is None else self.min_norm_dist[attack]
        d = np.where(np.isnan(d), np.inf, d)[self.clean_correct]
        return float(np.median(d)) if len(d) else float("nan")

    def throughput(self, attack: str) -> float:
        """Examples attacked per second, over all radii, compilation excluded."""
        n = (
            sum(int(self.attacked[attack][e].sum()) for e in self.eps_values)
            if attack in self.attacked
            else self.n * len(self.eps_values)
        )
        return n / max(sum(self.seconds[attack].values()), 1e-9)

    def per_image(self) -> dict[str, np.ndarray]:
        """Per-example arrays: ``labels``, ``clean_pred``, ``attacks`` (names, suite order),
        ``robust/<attack>/<eps>`` and ``worst_robust/<eps>`` (bool), ``attacked/<attack>/<eps>``
        (bool), ``breaker/<eps>`` (int, see `breaker`), ``min_norm/<attack>`` (float; ``inf``
        none found, ``nan`` not attacked)."""
        out = {
            "labels": self.labels,
            "clean_pred": self.clean_pred,
            "attacks": np.asarray(list(self.pred), dtype=str),
            "eps": np.asarray(self.eps_values, np.float64),
        }
        for e in self.eps_values:
            out[f"worst_robust/{e}"] = self.worst_correct(e)
            out[f"breaker/{e}"] = self.breaker(e)
            for a in self.pred:
                out[f"robust/{a}/{e}"] = self.correct(a, e)
                out[f"attacked/{a}/{e}"] = (
                    self.attacked[a][e] if a in self.attacked else np.ones(self.n, bool)
                )
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
                entry["attacked"] = {
                    str(e): int(self.attacked[a][e].sum()) for e in self.eps_values
                }
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
            **({"indices": [int(i) for i in self.indices]} if self.indices is not None else {}),
            **({"preflight": self.preflight} if self.preflight else {}),
            **({"diagnostics": self.diagnostics} if self.diagnostics is not None else {}),
            **self.extra,
        }

    def rescaled(
        self, low: float, high: float, eps_values: Sequence[float] | None = None
    ) -> EvalResult:
        """This result for inputs that lived in ``[low, high]`` and were evaluated mapped to
        ``[0, 1]``: radii, distances and images back in the original units (``eps_values``:
        the original radii exactly, default the evaluated ones times ``high - low``)."""
        scale = float(high) - float(low)
        original = [e * scale for e in self.eps_values] if eps_values is None else eps_values
        eps = dict(zip(self.eps_values, map(float, original), strict=True))

        def by_eps(d):
            return {eps[e]: v for e, v in d.items()}

        def images(a):
            return low + scale * a

        return dataclasses.replace(
            self,
            eps_values=[eps[e] for e in self.eps_values],
            pred={a: by_eps(d) for a, d in self.pred.items()},
            seconds={a: by_eps(d) for a, d in self.seconds.items()},
            attacked={a: by_eps(d) for a, d in self.attacked.items()},
            examples={
                a: {eps[e]: images(v) for e, v in d.items()} for a, d in self.examples.items()
            },
            x_adv={eps[e]: images(v) for e, v in self.x_adv.items()},
            clean_examples=images(self.clean_examples),
            min_norm_dist={a: d * scale for a, d in self.min_norm_dist.items()},
        )

    # ----------------------------------------------------------------------------------------
    # Files.
    # ----------------------------------------------------------------------------------------

    _ARRAY_DICTS = ("pred", "attacked", "examples", "x_adv")
    _JSON_FIELDS = (
        "name",
        "norm",
        "eps_values",
        "seconds",
        "compile_s",
        "kinds",
        "skipped",
        "extra",
        "mode",
        "devices",
        "preflight",
        "diagnostics",
    )

    def save(self, path) -> Path:
        """Writes the whole result to one ``.npz`` (atomically); `load` reads it back.

        Arrays are stored as they are, everything else as JSON; ``extra`` must be
        JSON-serialisable (numbers become floats where JSON has no other type)."""
        path = Path(path)
        meta = {name: getattr(self, name) for name in self._JSON_FIELDS}
        meta["seconds"] = {a: {repr(e): t for e, t in d.items()} for a, d in self.seconds.items()}
        meta["attacks"] = list(self.pred)
        arrays = {
            "labels": self.labels,
            "clean_pred": self.clean_pred,
            "clean_examples": self.clean_examples,
        }
        if self.indices is not None:
            arrays["indices"] = self.indices
        for field in self._ARRAY_DICTS:
            for outer, inner in getattr(self, field).items():
                if field == "x_adv":
                    arrays[f"x_adv/{outer!r}"] = inner
                    continue
                for e, a in inner.items():
                    arrays[f"{field}/{outer}/{e!r}"] = a
        for a, d in self.min_norm_dist.items():
            arrays[f"min_norm_dist/{a}"] = d
        arrays["meta.json"] = np.frombuffer(json.dumps(meta, default=float).encode(), np.uint8)
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path) -> EvalResult:
        """An `EvalResult` written by `save`."""
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays.pop("meta.json").tobytes().decode())
        attacks = meta.pop("attacks")
        eps_values = [float(e) for e in meta["eps_values"]]
        nested = {field: {} for field in cls._ARRAY_DICTS}
        min_norm = {}
        for key, a in arrays.items():
            field, _, rest = key.partition("/")
            if field == "x_adv":
                nested["x_adv"][float(rest)] = a
            elif field in nested:
                outer, _, e = rest.rpartition("/")
                nested[field].setdefault(outer, {})[float(e)] = a
            elif field == "min_norm_dist":
                min_norm[rest] = a
        seconds = {a: {float(e): t for e, t in d.items()} for a, d in meta.pop("seconds").items()}
        return cls(
            labels=arrays["labels"],
            clean_pred=arrays["clean_pred"],
            clean_examples=arrays["clean_examples"],
            indices=arrays.get("indices"),
            pred={a: nested["pred"][a] for a in attacks},
            attacked={a: nested["attacked"][a] for a in attacks if a in nested["attacked"]},
            examples={a: nested["examples"].get(a, {}) for a in attacks},
            x_adv=nested["x_adv"],
            min_norm_dist=min_norm,
            seconds=seconds,
            **{**meta, "eps_values": eps_values},
        )
