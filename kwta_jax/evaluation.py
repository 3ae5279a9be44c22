"""Robustness evaluation: run an attack suite on already loaded models, over chunked batches
at several radii, giving per-attack accuracy, the per-example worst case and throughput.

`run_suite` (RobustBench's ``benchmark(model, ...)``, AutoAttack's ``run_standard_evaluation``)
takes `Models` (pure ``x -> logits`` functions) and arrays; it knows nothing of checkpoints,
run directories or datasets (`kwta_jax.workflows.evaluate_run_dirs` composes those), and
reports are written by `kwta_jax.reports`.

Robust accuracy of an attack at ``eps`` is the share of examples that are classified
correctly *and* stay correct on the attack's adversarial example. The worst case counts an
example as robust only if it is correct clean and under *every* attack (AutoAttack's rule),
so it is at most every single attack's accuracy.

Each attack is compiled once (``eps`` is a traced argument; the last chunk is padded to the
chunk size) and run chunk by chunk, so memory is bounded by ``batch_size`` whatever the number
of examples; every adversarial chunk is checked against the threat model on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kwta_jax import attacks
from kwta_jax.attacks.losses import LogitsFn
from kwta_jax.attacks.projections import check_norm, check_threat_model
from kwta_jax.layers import iter_kwta_layers, set_kwta_backward
from kwta_jax.progress import MakeBar, open_bar

__all__ = [
    "ATTACKS",
    "BUDGETS",
    "DEFAULT_EPS",
    "DEFAULT_SUITE",
    "AttackSpec",
    "EvalResult",
    "Models",
    "build_suite",
    "default_eps",
    "models_from_nnx",
    "nnx_logits_fn",
    "predict",
    "run_attack",
    "run_suite",
    "skip_reason",
]

# Attack budgets. "default" keeps `attack.py` on the default mnist5k MLP (1,000 images, two
# models) within minutes on two CPU cores; "strong" is what a paper-grade evaluation needs.
BUDGETS: dict[str, dict] = {
    "quick": dict(pgd_steps=5, apgd_steps=5, restarts=1, square_queries=50, eot_samples=2,
                  eot_steps=5, fd_samples=4, fd_steps=5, deepfool_steps=5, cw_steps=20),
    "default": dict(pgd_steps=10, apgd_steps=10, restarts=1, square_queries=100,
                    eot_samples=4, eot_steps=10, fd_samples=8, fd_steps=10, deepfool_steps=10,
                    cw_steps=30),
    "strong": dict(pgd_steps=100, apgd_steps=100, restarts=5, square_queries=5000,
                   eot_samples=32, eot_steps=100, fd_samples=64, fd_steps=100,
                   deepfool_steps=50, cw_steps=200),
}  # fmt: skip

DEFAULT_EPS: dict[str, tuple[float, ...]] = {
    "mnist": (0.1, 0.15, 0.2, 0.3),
    "cifar": (8 / 255, 0.1),
}


def default_eps(dataset: str) -> tuple[float, ...]:
    """Default L-inf radii for a dataset name (``mnist*`` or ``cifar*``)."""
    for prefix, values in DEFAULT_EPS.items():
        if dataset.lower().startswith(prefix):
            return values
    raise ValueError(f"no default eps for dataset {dataset!r}; pass --eps.")


# Kinds drive the diagnostics: white-box gradient attacks versus attacks that do not trust the
# model's own gradient.
KINDS = ("single-step", "white-box", "minimal-norm", "gradient-free", "bpda", "eot", "transfer")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack of a suite.

    ``fn(logits_fn, x, y, key, *, eps, [bpda_logits_fn | source_logits_fn]) -> x_adv``;
    ``needs`` names the extra model it takes (``"bpda"``, ``"source"`` or ``None``).
    """

    name: str
    kind: str
    fn: Callable
    needs: str | None = None
    description: str = ""


def _attack_table(norm: str, b: dict) -> dict[str, AttackSpec]:
    p = functools.partial
    pgd_kw = dict(steps=b["pgd_steps"], restarts=b["restarts"], norm=norm)
    specs = [
        AttackSpec("fgsm", "single-step", p(attacks.fgsm, norm=norm),
                   description="FGSM / FGM, one signed-gradient step"),
        AttackSpec("pgd", "white-box", p(attacks.pgd, **pgd_kw),
                   description="PGD, cross-entropy, random start"),
        AttackSpec("mim", "white-box", p(attacks.mim, steps=b["pgd_steps"], norm=norm),
                   description="momentum iterative method"),
        AttackSpec("apgd-ce", "white-box",
                   p(attacks.apgd, steps=b["apgd_steps"], restarts=b["restarts"], norm=norm),
                   description="APGD, cross-entropy"),
        AttackSpec("apgd-dlr", "white-box",
                   p(attacks.apgd, steps=b["apgd_steps"], restarts=b["restarts"], norm=norm,
                     loss="dlr"),
                   description="APGD, DLR loss"),
        AttackSpec("cw", "white-box",
                   p(attacks.cw_pgd, **pgd_kw) if norm == "linf"
                   else p(attacks.cw_l2, steps=b["cw_steps"]),
                   description="CW margin loss under PGD (L-inf) / CW-L2 optimisation (L2)"),
        AttackSpec("deepfool", "minimal-norm",
                   p(attacks.deepfool, steps=b["deepfool_steps"], norm=norm),
                   description="DeepFool, projected onto the eps-ball"),
        AttackSpec("square", "gradient-free",
                   p(attacks.square, queries=b["square_queries"], norm=norm),
                   description="Square attack (random search, margin loss)"),
        AttackSpec("gradient-free", "gradient-free",
                   p(attacks.gradient_free, samples=b["fd_samples"], steps=b["fd_steps"],
                     sigma=0.02, norm=norm),
                   description="PGD on antithetic finite-difference gradients of the margin"),
        AttackSpec("bpda", "bpda", p(attacks.bpda, **pgd_kw), needs="bpda",
                   description="PGD with k-WTA replaced by identity on the backward pass"),
        AttackSpec("bpda-apgd", "bpda",
                   p(attacks.bpda_apgd, steps=b["apgd_steps"], restarts=b["restarts"],
                     norm=norm, loss="dlr"),
                   needs="bpda", description="APGD-DLR with BPDA gradients"),
        AttackSpec("eot", "eot",
                   p(attacks.eot_pgd, samples=b["eot_samples"], sigma=0.05,
                     steps=b["eot_steps"], norm=norm),
                   description="PGD on gradients averaged over Gaussian-perturbed inputs"),
        AttackSpec("transfer", "transfer", p(attacks.transfer, **pgd_kw), needs="source",
                   description="PGD on the surrogate (ReLU) model, applied to this one"),
    ]  # fmt: skip
    return {s.name: s for s in specs}


ATTACKS: tuple[str, ...] = tuple(_attack_table("linf", BUDGETS["default"]))
DEFAULT_SUITE: tuple[str, ...] = (
    "fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "bpda", "eot", "gradient-free", "transfer",
)  # fmt: skip


def build_suite(
    names: Sequence[str] = DEFAULT_SUITE, *, norm: str = "linf", budget: str | dict = "default"
) -> list[AttackSpec]:
    """The `AttackSpec` of each name in ``names`` (``"all"`` expands to every attack)."""
    check_norm(norm)
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {sorted(BUDGETS)}; got {budget!r}.")
        budget = BUDGETS[budget]
    table = _attack_table(norm, {**BUDGETS["default"], **budget})
    names = list(ATTACKS) if list(names) == ["all"] else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)} or 'all'.")
    if len(set(names)) != len(names):
        raise ValueError(f"attack names repeat: {names}.")
    if norm == "l2" and "square" in names:
        raise ValueError("square: only the L-inf Square attack is implemented; drop it for L2.")
    return [table[n] for n in names]


# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """The attacked model and the extra models adaptive attacks take gradients from.

    ``bpda_logits_fn``: same forward pass, smooth backward (``None`` when the model has no
    k-WTA layer: BPDA would be plain PGD). ``source_logits_fn``: transfer surrogate.
    """

    logits_fn: LogitsFn
    bpda_logits_fn: LogitsFn | None = None
    source_logits_fn: LogitsFn | None = None
    name: str = "model"


def nnx_logits_fn(model) -> LogitsFn:
    """A pure ``x -> logits`` of an NNX model (its state is captured as constants)."""
    graphdef, state = nnx.split(model)
    return lambda x: nnx.merge(graphdef, state)(x)


def models_from_nnx(model, *, source=None, surrogate: str = "identity", name="model") -> Models:
    """`Models` for an NNX ``model`` in eval mode: a BPDA copy (k-WTA backward replaced by
    ``surrogate``) if it has k-WTA layers, and the transfer ``source`` model if given."""
    bpda_fn = None
    if any(True for _ in iter_kwta_layers(model)):
        bpda_model = nnx.clone(model)
        set_kwta_backward(bpda_model, surrogate)
        bpda_fn = nnx_logits_fn(bpda_model)
    return Models(
        logits_fn=nnx_logits_fn(model),
        bpda_logits_fn=bpda_fn,
        source_logits_fn=None if source is None else nnx_logits_fn(source),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------


def _chunks(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the example axis to ``size`` by repeating the first example (fixed shapes: one
    compilation per attack)."""
    if a.shape[0] == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - a.shape[0], axis=0)])


def predict(logits_fn: LogitsFn, x: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """Predicted labels ``[N]`` int, computed in chunks."""
    fn = jax.jit(lambda x_: jnp.argmax(logits_fn(x_), -1))
    bs = min(batch_size, len(x))
    out = [np.asarray(fn(_pad(x[a:b], bs)))[: b - a] for a, b in _chunks(len(x), bs)]
    return np.concatenate(out).astype(np.int64)


def _bind(spec: AttackSpec, models: Models) -> Callable | None:
    extra = {}
    if spec.needs == "bpda":
        if models.bpda_logits_fn is None:
            return None
        extra["bpda_logits_fn"] = models.bpda_logits_fn
    elif spec.needs == "source":
        if models.source_logits_fn is None:
            return None
        extra["source_logits_fn"] = models.source_logits_fn

    def run(x, y, key, eps):
        x_adv = spec.fn(models.logits_fn, x, y, key, eps=eps, **extra)
        return x_adv, jnp.argmax(models.logits_fn(x_adv), -1)

    return run


def skip_reason(spec: AttackSpec, models: Models) -> str | None:
    """Why ``spec`` cannot run on ``models`` (``None`` if it can)."""
    if spec.needs == "bpda" and models.bpda_logits_fn is None:
        return "no k-WTA layer: BPDA would be plain PGD"
    if spec.needs == "source" and models.source_logits_fn is None:
        return "no transfer surrogate model"
    return None


def run_attack(
    spec: AttackSpec,
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps_values: Sequence[float],
    norm: str,
    key: jax.Array,
    batch_size: int = 250,
    keep: int = 0,
    progress: MakeBar | None = None,
) -> dict:
    """Runs one attack at every radius over ``x [N, H, W, C]``, ``y [N]`` in chunks.

    Returns ``{"pred": {eps: [N] int}, "seconds": {eps: float}, "compile_s": float,
    "examples": {eps: x_adv[:keep]}}``. Raises `AttackInvariantError` if an adversarial
    example leaves its ball or the box. ``progress``: a bar factory (`kwta_jax.progress`).
    """
    run = _bind(spec, models)
    n = len(x)
    bs = min(batch_size, n)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(run)
        .lower(jnp.asarray(x[:bs]), jnp.asarray(y[:bs]), key, jnp.float32(eps_values[0]))
        .compile()
    )
    out = {"pred": {}, "seconds": {}, "examples": {}, "compile_s": time.perf_counter() - t0}
    bar = open_bar(progress, total=n * len(eps_values), desc=f"{models.name}:{spec.name}",
                   unit="ex")  # fmt: skip
    for ie, eps in enumerate(eps_values):
        preds, kept = [], []
        t0 = time.perf_counter()
        for ic, (a, b) in enumerate(_chunks(n, bs)):
            k = jax.random.fold_in(jax.random.fold_in(key, ie), ic)
            xc, yc = _pad(x[a:b], bs), _pad(y[a:b], bs)
            x_adv, pred = compiled(jnp.asarray(xc), jnp.asarray(yc), k, jnp.float32(eps))
            x_adv = np.asarray(x_adv)[: b - a]
            check_threat_model(x_adv, x[a:b], eps, norm, name=spec.name)
            preds.append(np.asarray(pred)[: b - a])
            if sum(len(v) for v in kept) < keep:
                kept.append(x_adv[:keep])
            bar.update(b - a)
        out["seconds"][eps] = time.perf_counter() - t0
        out["pred"][eps] = np.concatenate(preds).astype(np.int64)
        out["examples"][eps] = np.concatenate(kept)[:keep] if kept else x[:0]
    bar.close()
    return out


@dataclasses.dataclass
class EvalResult:
    """Outcome of `run_suite`. Arrays are over the ``N`` evaluated examples."""

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

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def clean_correct(self) -> np.ndarray:
        return self.clean_pred == self.labels

    def correct(self, attack: str, eps: float) -> np.ndarray:
        """``[N]`` bool: correct clean and under ``attack`` at ``eps``."""
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

    def throughput(self, attack: str) -> float:
        """Examples per second, over all radii, compilation excluded."""
        return self.n * len(self.eps_values) / max(sum(self.seconds[attack].values()), 1e-9)

    def to_dict(self) -> dict:
        return {
            "model": self.name,
            "norm": self.norm,
            "n_examples": self.n,
            "eps": self.eps_values,
            "clean_accuracy": float(self.clean_correct.mean()),
            "attacks": {
                a: {
                    "kind": self.kinds[a],
                    "accuracy": {str(e): self.accuracy(a, e) for e in self.eps_values},
                    "seconds": {str(e): self.seconds[a][e] for e in self.eps_values},
                    "compile_seconds": self.compile_s[a],
                    "examples_per_second": self.throughput(a),
                }
                for a in self.pred
            },
            "worst_case_accuracy": {str(e): self.worst_accuracy(e) for e in self.eps_values},
            "skipped": self.skipped,
            **self.extra,
        }


def run_suite(
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    *,
    suite: Sequence[AttackSpec],
    eps_values: Sequence[float],
    norm: str = "linf",
    batch_size: int = 250,
    seed: int = 0,
    keep: int = 8,
    progress: MakeBar | None = None,
) -> EvalResult:
    """Runs ``suite`` on ``x [N, H, W, C]`` float32 in [0, 1], ``y [N]`` at each radius.

    Attack ``i`` gets key ``fold_in(key(seed), i)``, so results are reproducible for a seed.
    Attacks whose extra model is missing are skipped (listed in ``result.skipped``). Each
    attack shows a bar from ``progress`` (a factory, see `kwta_jax.progress`; ``None``: none).
    """
    check_norm(norm)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    if x.ndim != 4 or y.shape != (len(x),):
        raise ValueError(f"run_suite: need x [N, H, W, C] and y [N]; got {x.shape}, {y.shape}.")
    if len(x) == 0:
        raise ValueError("run_suite: no examples.")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("run_suite: images must lie in [0, 1].")
    eps_values = [float(e) for e in eps_values]
    if not eps_values or min(eps_values) <= 0:
        raise ValueError(f"run_suite: eps values must be > 0; got {eps_values}.")
    key = jax.random.key(seed)
    res = EvalResult(
        name=models.name, norm=norm, eps_values=eps_values, labels=y.astype(np.int64),
        clean_pred=predict(models.logits_fn, x, batch_size=batch_size), pred={}, seconds={},
        compile_s={}, kinds={}, skipped={}, examples={}, clean_examples=x[:keep],
    )  # fmt: skip
    for i, spec in enumerate(suite):
        reason = skip_reason(spec, models)
        if reason:
            res.skipped[spec.name] = reason
            continue
        out = run_attack(
            spec, models, x, y, eps_values=eps_values, norm=norm,
            key=jax.random.fold_in(key, i), batch_size=batch_size, keep=keep, progress=progress,
        )  # fmt: skip
        res.pred[spec.name] = out["pred"]
        res.seconds[spec.name] = out["seconds"]
        res.compile_s[spec.name] = out["compile_s"]
        res.kinds[spec.name] = spec.kind
        res.examples[spec.name] = out["examples"]
    return res
