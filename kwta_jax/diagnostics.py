"""Gradient-masking diagnostics (Carlini et al. 2019, "On Evaluating Adversarial Robustness",
Sec. 5 checklist; AutoAttack's flags).

A defence that masks gradients makes gradient attacks fail while the model stays fragile.
Each check below compares attacks that *should* be ordered (iterative >= single-step, larger
eps >= smaller eps, white-box >= black-box) or measures the input gradient directly. Any
fired flag means the white-box numbers are not trustworthy; the worst case over the suite
(which includes the adaptive attacks) is then the number to report.

Attacks take part by their `kwta_jax.suites.AttackSpec.kind`, never by name, so a custom
attack is compared like a built-in one. The attack comparisons need every compared attack on
the same examples: in full mode that is the suite's own table; a cascade has no such table,
so `run_diagnostics` runs the compared attacks in full mode on a stratified sample. A check
that cannot run (no single-step attack in the suite, one radius, ...) is listed in
`Diagnosis.skipped` with the reason, and "no sign of gradient masking" is only said when
every check ran.

Like AutoAttack's ``checks.py``, this module sits on top of the suite runner
(`kwta_jax.evaluation`) and is never imported by it; `kwta_jax.reports.format_flags` prints
a `Diagnosis`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kwta_jax import attacks
from kwta_jax.attacks.losses import loss_and_grad, margin
from kwta_jax.evaluation import EvalResult, Models, as_key, run_suite
from kwta_jax.subsets import stratified_indices
from kwta_jax.suites import NON_GRADIENT_KINDS, AttackSpec, build_suite

__all__ = [
    "CHECKS",
    "Diagnosis",
    "Flag",
    "comparison_suite",
    "gradient_masking_flags",
    "gradient_statistics",
    "large_eps_accuracy",
    "run_diagnostics",
]

# Every check, in report order (one flag each, `<attack>_beats_white_box` one per attack).
CHECKS = (
    "iterative_weaker_than_single_step",
    "accuracy_not_decreasing_with_eps",
    "large_eps_not_broken",
    "non_gradient_beats_white_box",
    "zero_input_gradient",
    "flat_loss_along_gradient",
    "discontinuous_loss",
)


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


@dataclasses.dataclass
class Diagnosis:
    """The flags of the checks that ran, the checks that did not (``skipped``: check ->
    why), and ``notes`` on how they ran (e.g. the comparison sample)."""

    flags: list[Flag]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fired(self) -> list[Flag]:
        return [f for f in self.flags if f.fired]

    @property
    def complete(self) -> bool:
        """Every check of `CHECKS` ran."""
        return not self.skipped

    def __getitem__(self, name: str) -> Flag:
        for f in self.flags:
            if f.name == name:
                return f
        raise KeyError(
            f"no flag {name!r}; flags: {[f.name for f in self.flags]}; skipped: "
            f"{sorted(self.skipped)}."
        )

    def to_dict(self) -> dict:
        return {
            "flags": [f.to_dict() for f in self.flags],
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
            "complete": self.complete,
        }


# The jump test's step, as a fraction of the smallest radius: small enough that a continuous
# piecewise-linear model rarely crosses more than a kink or two, large enough to meet the
# discontinuities of a k-WTA (docs/attacks.md, "Diagnostics", has the measured shares).
JUMP_STEP_FRACTION = 0.1


def gradient_statistics(
    models: Models,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 250,
    key=0,
) -> dict:
    """Shares of the examples, on the margin loss ``L`` (not cross-entropy: a confident
    softmax makes its gradient underflow to zero on any model):

    * ``zero_gradient_share``: whose input gradient is exactly zero;
    * ``flat_loss_share``: whose loss does not change along one ``eps`` steepest-ascent step;
    * ``jump_share``: whose loss jumps over a random step ``d`` of `JUMP_STEP_FRACTION`
      ``* eps`` (random signs for L-inf, a random direction for L2): ``|L(x+d) - L(x) -
      (g(x) + g(x+d)).d / 2| > max(|g(x).d|, |g(x+d).d|) / 2 + 1e-4 (1 + |L(x)|)``. On a
      continuous model the change is the integral of the gradient along the step, close to
      the average of its two ends; a discontinuous one (k-WTA: a unit entering or leaving the
      winners) adds a jump that no gradient sees.
    """
    model = models.model
    key = as_key(key)
    r = JUMP_STEP_FRACTION * eps

    @jax.jit
    def stats(params, xc, yc, k):
        logits_fn = model.logits_fn(params)
        loss, g, _ = loss_and_grad(logits_fn, margin, xc, yc)
        zero = jnp.max(jnp.abs(g).reshape(g.shape[0], -1), -1) == 0
        x_step = attacks.project(
            xc + eps * attacks.projections.ascent_direction(g, norm), xc, eps, norm
        )
        flat = jnp.abs(margin(logits_fn(x_step), yc) - loss) <= 1e-6 * (1 + jnp.abs(loss))
        u = jax.random.normal(k, xc.shape, jnp.float32)
        xd = attacks.project(xc + r * attacks.projections.ascent_direction(u, norm), xc, r, norm)
        loss_d, g_d, _ = loss_and_grad(logits_fn, margin, xd, yc)
        d = (xd - xc).reshape(xc.shape[0], -1)
        ends = jnp.sum(g.reshape(d.shape) * d, -1), jnp.sum(g_d.reshape(d.shape) * d, -1)
        gap = jnp.abs(loss_d - loss - (ends[0] + ends[1]) / 2)
        tol = jnp.maximum(jnp.abs(ends[0]), jnp.abs(ends[1])) / 2 + 1e-4 * (1 + jnp.abs(loss))
        return zero, flat, gap > tol

    out = {"zero": [], "flat": [], "jump": []}
    for c, a in enumerate(range(0, len(x), batch_size)):
        xc, yc = jnp.asarray(x[a : a + batch_size]), jnp.asarray(y[a : a + batch_size])
        for name, v in zip(
            out, stats(model.params, xc, yc, jax.random.fold_in(key, c)), strict=True
        ):
            out[name].append(np.asarray(v))
    return {
        "zero_gradient_share": float(np.concatenate(out["zero"]).mean()),
        "flat_loss_share": float(np.concatenate(out["flat"]).mean()),
        "jump_share": float(np.concatenate(out["jump"]).mean()),
        "jump_step": r,
    }


def large_eps_accuracy(
    models: Models,
    x,
    y,
    *,
    eps: float,
    norm: str = "linf",
    budget: str = "quick",
    batch_size: int = 250,
    key=0,
) -> float:
    """Accuracy under white-box PGD at a radius where every input can be made anything
    (``eps = 1`` for L-inf inputs in [0, 1]): an unbroken model here means the gradient is
    not pointing anywhere useful."""
    res = run_suite(
        models.renamed(f"{models.name}@large-eps"),
        x,
        y,
        suite=build_suite(["pgd"], norm=norm, budget=budget),
        eps_values=[eps],
        norm=norm,
        batch_size=batch_size,
        key=key,
        keep=0,
    )
    return res.accuracy("pgd", eps)


def _of_kind(res: EvalResult, kinds: Sequence[str]) -> list[str]:
    return [a for a in res.pred if res.kinds[a] in kinds]


def _best(res: EvalResult, names: Sequence[str], eps: float) -> float:
    return min(res.accuracy(a, eps) for a in names)


def _single_step_flag(res: EvalResult, single: list[str], iterative: list[str], tol) -> Flag:
    eps = res.eps_values
    gaps = [_best(res, iterative, e) - _best(res, single, e) for e in eps]
    i = int(np.argmax(gaps))
    return Flag(
        "iterative_weaker_than_single_step",
        gaps[i] > tol,
        gaps[i],
        tol,
        "Iterative white-box attacks should never do worse than one gradient step; if they "
        "do, their gradients are misleading.",
        f"best iterative {100 * _best(res, iterative, eps[i]):.1f}% vs single-step "
        f"{100 * _best(res, single, eps[i]):.1f}% at eps={eps[i]:g}",
    )


def _eps_monotonic_flag(res: EvalResult, tol: float) -> Flag:
    eps = res.eps_values
    worst_rise, where = 0.0, ""
    # In cascade mode a row's accuracy depends on what earlier rows broke at that eps; only
    # the worst case is comparable across radii.
    series = (
        {"worst case": [res.worst_accuracy(e) for e in eps]}
        if res.mode == "cascade"
        else {a: [res.accuracy(a, e) for e in eps] for a in res.pred}
    )
    for a, accs in series.items():
        for j in range(1, len(eps)):
            if accs[j] - accs[j - 1] > worst_rise:
                worst_rise = accs[j] - accs[j - 1]
                where = (
                    f"{a}: {100 * accs[j - 1]:.1f}% at {eps[j - 1]:g} -> "
                    f"{100 * accs[j]:.1f}% at {eps[j]:g}"
                )
    return Flag(
        "accuracy_not_decreasing_with_eps",
        worst_rise > tol,
        worst_rise,
        tol,
        "A larger ball contains the smaller one, so accuracy must not grow with eps; "
        "if it does, the attack gets lost rather than the model getting robust.",
        where,
    )


def _non_gradient_flags(res: EvalResult, white_box: list[str], tol: float) -> list[Flag]:
    """One flag per attack that does not use the model's gradient, against the suite's
    reference white-box attack (its first one: PGD in every built-in suite)."""
    ref = white_box[0]
    flags = []
    for a in _of_kind(res, NON_GRADIENT_KINDS):
        gaps = [res.accuracy(ref, e) - res.accuracy(a, e) for e in res.eps_values]
        i = int(np.argmax(gaps))
        e = res.eps_values[i]
        only = res.worst_correct(e, white_box) & ~res.correct(a, e)
        flags.append(
            Flag(
                f"{a}_beats_{ref}",
                gaps[i] > tol,
                gaps[i],
                tol,
                "An EOT attack averages the model's gradient over random transformations of "
                "the input; beating white-box gradient attacks, which follow the plain gradient, "
                "means that gradient is masked, noisy or misleading."
                if res.kinds[a] == "eot"
                else f"A {res.kinds[a]} attack does not use the model's own gradient; beating the "
                "white-box gradient attacks means that gradient is masked or misleading.",
                f"{a} {100 * res.accuracy(a, e):.1f}% vs {ref} {100 * res.accuracy(ref, e):.1f}% "
                f"(best white-box {100 * _best(res, white_box, e):.1f}%) at eps={e:g}; it breaks "
                f"{int(only.sum())} example(s) that every white-box attack missed",
            )
        )
    return flags


def _gradient_flags(grad_stats: dict, share_threshold: float) -> list[Flag]:
    z, f = grad_stats["zero_gradient_share"], grad_stats["flat_loss_share"]
    j = grad_stats["jump_share"]
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
        Flag(
            "discontinuous_loss", j > share_threshold, j, share_threshold,
            "Share of inputs whose loss jumps over a small random step (more than the "
            "gradients at its two ends explain): the model is discontinuous there, so its "
            "gradient misleads gradient attacks (shattered gradients).",
            f"random steps of {grad_stats['jump_step']:.3g} ({JUMP_STEP_FRACTION:g} x the "
            "smallest eps)",
        ),
    ]  # fmt: skip


def gradient_masking_flags(
    res: EvalResult,
    *,
    comparison: EvalResult | None = None,
    grad_stats: dict | None = None,
    large_eps_acc: float | None = None,
    large_eps: float | None = None,
    tol: float = 0.03,
    share_threshold: float = 0.05,
    large_eps_threshold: float = 0.05,
) -> Diagnosis:
    """The `Diagnosis` of an `EvalResult` and the extra measurements given.

    The attack comparisons read ``comparison`` (a full-mode result of the compared attacks),
    else ``res`` itself when it is a full table; a cascade alone cannot compare attacks, and
    those checks are then reported as skipped. A measurement not given (``grad_stats``,
    ``large_eps_acc``) is a skipped check too.

    ``tol``: accuracy gap (absolute, e.g. 0.03 = 3 points) above which an ordering violation
    counts; small enough to catch masking, large enough that sampling noise of a few hundred
    examples and the randomness of random-search attacks do not fire on a plain model.
    """
    flags: list[Flag] = []
    skipped: dict[str, str] = {}
    table = comparison if comparison is not None else res if res.mode == "full" else None
    if table is None:
        why = "a cascade has no per-attack table (run_diagnostics runs one on a sample)"
        skipped["iterative_weaker_than_single_step"] = why
        skipped["non_gradient_beats_white_box"] = why
    else:
        single = _of_kind(table, ("single-step",))
        white_box = _of_kind(table, ("white-box",))
        if single and white_box:
            flags.append(_single_step_flag(table, single, white_box, tol))
        else:
            skipped["iterative_weaker_than_single_step"] = (
                "the suite needs a single-step and an iterative white-box attack"
            )
        if white_box and _of_kind(table, NON_GRADIENT_KINDS):
            flags.extend(_non_gradient_flags(table, white_box, tol))
        else:
            why = (
                "the suite needs an iterative white-box attack and one that does not use "
                "the model's gradient (gradient-free, BPDA, EOT or transfer)"
            )
            if res.skipped:
                why += "; " + "; ".join(f"{a} skipped: {w}" for a, w in res.skipped.items())
            skipped["non_gradient_beats_white_box"] = why
    if len(res.eps_values) > 1:
        flags.append(_eps_monotonic_flag(res, tol))
    else:
        skipped["accuracy_not_decreasing_with_eps"] = "one radius only"
    if large_eps_acc is not None:
        flags.append(
            Flag(
                "large_eps_not_broken",
                large_eps_acc > large_eps_threshold,
                large_eps_acc,
                large_eps_threshold,
                "With an unbounded budget any input can be turned into another class; PGD not "
                "reaching ~0% accuracy there means its gradient is uninformative.",
                f"PGD accuracy {100 * large_eps_acc:.1f}% at eps={large_eps}",
            )
        )
    else:
        skipped["large_eps_not_broken"] = "not measured"
    if grad_stats is not None:
        flags.extend(_gradient_flags(grad_stats, share_threshold))
    else:
        for check in ("zero_input_gradient", "flat_loss_along_gradient", "discontinuous_loss"):
            skipped[check] = "not measured"
    return Diagnosis(flags, skipped)


def comparison_suite(suite: Sequence[AttackSpec]) -> list[AttackSpec]:
    """The attacks the comparison checks need from ``suite``: its single-step attacks, its
    first iterative white-box attack (the reference) and every attack that does not use the
    model's gradient."""
    white_box = [s for s in suite if s.kind == "white-box"][:1]
    return [
        s
        for s in suite
        if s.kind == "single-step" or s in white_box or s.kind in NON_GRADIENT_KINDS
    ]


def run_diagnostics(
    models: Models,
    res: EvalResult,
    x: np.ndarray,
    y: np.ndarray,
    *,
    suite: Sequence[AttackSpec] | None = None,
    large_eps: float | None = None,
    n_large: int = 200,
    n_compare: int = 200,
    batch_size: int = 250,
    key=0,
    progress=None,
    **flag_kwargs,
) -> Diagnosis:
    """Measures what the checks need and returns `gradient_masking_flags`.

    The gradient statistics use every example of ``x``; PGD at ``large_eps`` (default 1 for
    L-inf, ``sqrt(d)`` for L2) a stratified sample of ``n_large``. For a cascade ``res``, the
    `comparison_suite` of ``suite`` (the suite that produced ``res``) runs in full mode on a
    stratified sample of ``n_compare`` examples at ``res``'s smallest radius."""
    key = as_key(key)
    if large_eps is None:
        large_eps = 1.0 if res.norm == "linf" else float(np.sqrt(np.prod(x.shape[1:])))
    notes = []
    stats = gradient_statistics(
        models, x, y, eps=min(res.eps_values), norm=res.norm, batch_size=batch_size,
        key=jax.random.fold_in(key, 3),
    )  # fmt: skip
    large = stratified_indices(y, n_large)
    acc = large_eps_accuracy(
        models,
        x[large],
        y[large],
        eps=large_eps,
        norm=res.norm,
        batch_size=min(batch_size, len(large)),
        key=jax.random.fold_in(key, 1),
    )
    comparison = None
    if res.mode == "cascade" and suite is not None and comparison_suite(suite):
        sample = stratified_indices(y, n_compare)
        comparison = run_suite(
            models.renamed(f"{models.name}@comparison"),
            x[sample],
            y[sample],
            suite=comparison_suite(suite),
            # The smallest radius: where the attacks differ most (most examples still stand),
            # at a fraction of the cost of every radius.
            eps_values=[min(res.eps_values)],
            norm=res.norm,
            batch_size=batch_size,
            key=jax.random.fold_in(key, 2),
            keep=0,
            mode="full",
            progress=progress,
        )
        notes.append(
            f"attack comparisons: {', '.join(comparison.pred)} in full mode at "
            f"eps={min(res.eps_values):g} on a stratified "
            f"sample of {len(sample)} examples"
        )
    diagnosis = gradient_masking_flags(
        res,
        comparison=comparison,
        grad_stats=stats,
        large_eps_acc=acc,
        large_eps=large_eps,
        **flag_kwargs,
    )
    diagnosis.notes[:0] = notes
    return diagnosis
