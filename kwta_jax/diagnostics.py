"""Gradient-masking diagnostics (Carlini et al. 2019, "On Evaluating Adversarial Robustness",
Sec. 5 checklist; AutoAttack's flags).

A defence that masks gradients makes gradient attacks fail while the model stays fragile.
Each check below compares attacks that *should* be ordered (iterative >= single-step, larger
eps >= smaller eps, white-box >= black-box) or measures the input gradient directly. Any
fired flag means the white-box numbers are not trustworthy; the worst case over the suite
(which includes the adaptive attacks) is then the number to report.

Like AutoAttack's ``checks.py``, this module sits on top of the suite runner
(`kwta_jax.evaluation`) and is never imported by it; `kwta_jax.reports.format_flags` prints
the flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kwta_jax import attacks
from kwta_jax.attacks.losses import loss_and_grad, margin
from kwta_jax.evaluation import EvalResult, Models, run_suite
from kwta_jax.suites import build_suite

__all__ = [
    "Flag",
    "gradient_masking_flags",
    "gradient_statistics",
    "large_eps_accuracy",
    "run_diagnostics",
]

WHITE_BOX_ITERATIVE = ("pgd", "mim", "apgd-ce", "apgd-dlr", "cw")
NON_GRADIENT_KINDS = ("gradient-free", "bpda", "eot", "transfer")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One diagnostic. ``fired`` means a sign of gradient masking; ``value`` is the measured
    quantity and ``threshold`` the level above which it fires."""

    name: str
    fired: bool
    value: float | None
    threshold: float
    explanation: str
    detail: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def gradient_statistics(
    logits_fn, x: np.ndarray, y: np.ndarray, *, eps: float, norm: str = "linf",
    batch_size: int = 250,
) -> dict:  # fmt: skip
    """Share of examples whose input gradient of the margin loss is exactly zero, and whose
    margin loss does not change along one ``eps`` steepest-ascent step (flat loss surface).

    The margin ``max_{j != y} z_j - z_y`` is used rather than cross-entropy because a
    confident softmax makes the cross-entropy gradient underflow to zero on any model.
    """

    @jax.jit
    def stats(xc, yc):
        loss, g, _ = loss_and_grad(logits_fn, margin, xc, yc)
        zero = jnp.max(jnp.abs(g).reshape(g.shape[0], -1), -1) == 0
        x_step = attacks.project(
            xc + eps * attacks.projections.ascent_direction(g, norm), xc, eps, norm
        )
        flat = jnp.abs(margin(logits_fn(x_step), yc) - loss) <= 1e-6 * (1 + jnp.abs(loss))
        return zero, flat

    zero, flat = [], []
    for a in range(0, len(x), batch_size):
        z, f = stats(jnp.asarray(x[a : a + batch_size]), jnp.asarray(y[a : a + batch_size]))
        zero.append(np.asarray(z))
        flat.append(np.asarray(f))
    return {
        "zero_gradient_share": float(np.concatenate(zero).mean()),
        "flat_loss_share": float(np.concatenate(flat).mean()),
    }


def large_eps_accuracy(
    models: Models, x, y, *, eps: float, norm: str = "linf", budget: str = "quick",
    batch_size: int = 250, seed: int = 0,
) -> float:  # fmt: skip
    """Accuracy under white-box PGD at a radius where every input can be made anything
    (``eps = 1`` for L-inf images in [0, 1]): an unbroken model here means the gradient is
    not pointing anywhere useful."""
    res = run_suite(
        dataclasses.replace(models, name=f"{models.name}@large-eps"), x, y,
        suite=build_suite(["pgd"], norm=norm, budget=budget), eps_values=[eps], norm=norm,
        batch_size=batch_size, seed=seed, keep=0,
    )  # fmt: skip
    return res.accuracy("pgd", eps)


def _best_white_box(res: EvalResult, iterative: Sequence[str], eps: float) -> float:
    return min(res.accuracy(a, eps) for a in iterative)


def _single_step_flag(res: EvalResult, iterative: Sequence[str], tol: float) -> Flag:
    eps = res.eps_values
    gaps = [_best_white_box(res, iterative, e) - res.accuracy("fgsm", e) for e in eps]
    i = int(np.argmax(gaps))
    return Flag(
        "iterative_weaker_than_single_step", gaps[i] > tol, gaps[i], tol,
        "Iterative white-box attacks should never do worse than one FGSM step; if they "
        "do, their gradients are misleading.",
        f"best iterative {100 * _best_white_box(res, iterative, eps[i]):.1f}% vs FGSM "
        f"{100 * res.accuracy('fgsm', eps[i]):.1f}% at eps={eps[i]:g}",
    )  # fmt: skip


def _eps_monotonic_flag(res: EvalResult, tol: float) -> Flag:
    eps = res.eps_values
    worst_rise, where = 0.0, ""
    # In cascade mode a row's accuracy depends on what earlier rows broke at that eps; only
    # the worst case is comparable across radii.
    series = {"worst case": [res.worst_accuracy(e) for e in eps]} if res.mode == "cascade" \
        else {a: [res.accuracy(a, e) for e in eps] for a in res.pred}  # fmt: skip
    for a, accs in series.items():
        for j in range(1, len(eps)):
            if accs[j] - accs[j - 1] > worst_rise:
                worst_rise = accs[j] - accs[j - 1]
                where = f"{a}: {100 * accs[j - 1]:.1f}% at {eps[j - 1]:g} -> " \
                        f"{100 * accs[j]:.1f}% at {eps[j]:g}"  # fmt: skip
    return Flag(
        "accuracy_not_decreasing_with_eps", worst_rise > tol, worst_rise, tol,
        "A larger ball contains the smaller one, so accuracy must not grow with eps; "
        "if it does, the attack gets lost rather than the model getting robust.", where,
    )  # fmt: skip


def _adaptive_flags(res: EvalResult, iterative: Sequence[str], tol: float) -> list[Flag]:
    """One flag per attack that does not use the model's gradient, against white-box PGD."""
    # The issue's (and Tramer et al.'s) comparison is against white-box PGD at the same budget;
    # without PGD in the suite, against the best iterative white-box attack.
    ref_name = "pgd" if "pgd" in res.pred else "best white-box"

    def ref(e):
        return res.accuracy("pgd", e) if "pgd" in res.pred else _best_white_box(res, iterative, e)

    flags = []
    for a in res.pred:
        if res.kinds[a] not in NON_GRADIENT_KINDS:
            continue
        gaps = [ref(e) - res.accuracy(a, e) for e in res.eps_values]
        i = int(np.argmax(gaps))
        e = res.eps_values[i]
        only = res.worst_correct(e, iterative) & ~res.correct(a, e)
        flags.append(Flag(
            f"{a}_beats_pgd", gaps[i] > tol, gaps[i], tol,
            "An EOT attack averages the model's gradient over random transformations of "
            "the input; beating white-box PGD, which follows the plain gradient, means that "
            "gradient is masked, noisy or misleading." if res.kinds[a] == "eot" else
            f"A {res.kinds[a]} attack does not use the model's own gradient; beating "
            "white-box PGD means that gradient is masked or misleading.",
            f"{a} {100 * res.accuracy(a, e):.1f}% vs {ref_name} {100 * ref(e):.1f}% "
            f"(best white-box {100 * _best_white_box(res, iterative, e):.1f}%) at eps={e:g}; "
            f"it breaks {int(only.sum())} example(s) that every white-box attack missed",
        ))  # fmt: skip
    return flags


def _gradient_flags(grad_stats: dict, share_threshold: float) -> list[Flag]:
    z, f = grad_stats["zero_gradient_share"], grad_stats["flat_loss_share"]
    return [
        Flag(
            "zero_input_gradient", z > share_threshold, z, share_threshold,
            "Share of inputs whose loss gradient is exactly zero: gradient attacks cannot "
            "move them at all (shattered / saturated gradients).",
        ),
        Flag(
            "flat_loss_along_gradient", f > share_threshold, f, share_threshold,
            "Share of inputs whose loss does not change after an eps step along the gradient "
            "sign: the local gradient says nothing about the loss nearby.",
        ),
    ]  # fmt: skip


def gradient_masking_flags(
    res: EvalResult,
    *,
    grad_stats: dict | None = None,
    large_eps_acc: float | None = None,
    large_eps: float | None = None,
    tol: float = 0.03,
    share_threshold: float = 0.05,
    large_eps_threshold: float = 0.05,
) -> list[Flag]:
    """Computes the flags from an `EvalResult` (and optional extra measurements).

    In cascade mode only the flags that do not compare attacks on the same examples are
    computed (eps monotonicity of the worst case, large eps, gradient statistics).

    ``tol``: accuracy gap (absolute, e.g. 0.03 = 3 points) above which an ordering violation
    counts; small enough to catch masking, large enough that sampling noise of a few hundred
    examples and the randomness of random-search attacks do not fire on a plain model.
    """
    flags: list[Flag] = []
    # Cascade mode (`run_suite(mode="cascade")`) has no per-attack accuracy on the same
    # examples, so the checks that compare attacks need the full table and are left out.
    iterative = [a for a in WHITE_BOX_ITERATIVE if a in res.pred and res.mode == "full"]
    if "fgsm" in res.pred and iterative:
        flags.append(_single_step_flag(res, iterative, tol))
    if len(res.eps_values) > 1:
        flags.append(_eps_monotonic_flag(res, tol))
    if large_eps_acc is not None:
        flags.append(Flag(
            "large_eps_not_broken", large_eps_acc > large_eps_threshold, large_eps_acc,
            large_eps_threshold,
            "With an unbounded budget any input can be turned into another class; PGD not "
            "reaching ~0% accuracy there means its gradient is uninformative.",
            f"PGD accuracy {100 * large_eps_acc:.1f}% at eps={large_eps}",
        ))  # fmt: skip
    if iterative:
        flags.extend(_adaptive_flags(res, iterative, tol))
    if grad_stats is not None:
        flags.extend(_gradient_flags(grad_stats, share_threshold))
    return flags


def run_diagnostics(
    models: Models,
    res: EvalResult,
    x: np.ndarray,
    y: np.ndarray,
    *,
    large_eps: float | None = None,
    n_large: int = 200,
    batch_size: int = 250,
    seed: int = 0,
    **flag_kwargs,
) -> list[Flag]:
    """Measures the gradient statistics and large-eps accuracy on (a prefix of) ``x`` and
    returns `gradient_masking_flags`. ``large_eps`` defaults to 1 (L-inf) or ``sqrt(d)``."""
    if large_eps is None:
        large_eps = 1.0 if res.norm == "linf" else float(np.sqrt(np.prod(x.shape[1:])))
    stats = gradient_statistics(
        models.logits_fn, x, y, eps=min(res.eps_values), norm=res.norm, batch_size=batch_size
    )
    acc = large_eps_accuracy(
        models, x[:n_large], y[:n_large], eps=large_eps, norm=res.norm,
        batch_size=min(batch_size, n_large), seed=seed,
    )  # fmt: skip
    return gradient_masking_flags(
        res, grad_stats=stats, large_eps_acc=acc, large_eps=large_eps, **flag_kwargs
    )
