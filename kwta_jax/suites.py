"""The attack suites: budgets, default radii, the attack table (`AttackSpec` per name), the
default and strong suites, AutoAttack's "standard" preset, and `resolve_suite`, the one place
that turns what a user or a CLI asks for (a suite name, a preset, attack names, specs, a
budget) into the list of attacks to run.

A suite is a list of `AttackSpec`: what to run, in which order, with which budget. Running it
is `kwta_jax.evaluation.run_suite`'s job; this module only says what an evaluation contains.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Sequence

from kwta_jax import attacks
from kwta_jax.attacks.fmn import FMN_ALPHA_INIT
from kwta_jax.attacks.projections import check_norm

__all__ = [
    "ATTACKS",
    "AUTOATTACK_STANDARD",
    "BUDGETS",
    "DEFAULT_EPS",
    "DEFAULT_SUITE",
    "ES_SCHEDULE_CPU",
    "KINDS",
    "MODES",
    "NAMED_SUITES",
    "NON_GRADIENT_KINDS",
    "PRESETS",
    "STRONG_SUITE",
    "AttackSpec",
    "autoattack_suite",
    "build_suite",
    "default_eps",
    "default_suite",
    "resolve_suite",
]

# Attack budgets (docs/attacks.md, "Budgets and cost", has what each costs and finds).
# "default" is sized for the cascade: strong's APGD stages (costly only on the few examples
# the cascade leaves them), cheaper PGD, EOT, finite differences and Square; FAB-T and `es`
# are left to "strong", the paper-grade budget.
# ``es_schedule``: the (antithetic pairs, patience) levels of `attacks.es`'s stall-triggered
# ramp; "strong" uses `attacks.ES_SCHEDULE_CPU`, `attacks.ES_SCHEDULE` (the literature's
# 100 -> 1,000 -> 20,000) is for accelerators (`attack.py --es-full`).
# ``fmn_step_scales``: one FMN run per initial step `FMN_ALPHA_INIT[norm] * scale`, the smallest
# adversarial kept; ``square_restarts``, ``apgd_t_restarts``: independent runs. On k-WTA's
# discontinuous landscape which images an attack breaks depends on its trajectory, so strong
# runs several (docs/attacks.md, "Against the peer libraries").
ES_SCHEDULE_CPU: tuple[tuple[int, int], ...] = attacks.ES_SCHEDULE_CPU
BUDGETS: dict[str, dict] = {
    "quick": dict(pgd_steps=5, apgd_steps=5, restarts=1, square_queries=50, eot_samples=2,
                  eot_steps=5, fd_samples=4, fd_steps=5, deepfool_steps=5, cw_steps=20,
                  fmn_steps=10, fab_steps=5, n_target_classes=3, es_schedule=((4, 2),),
                  fmn_step_scales=(1.0,), square_restarts=1, apgd_t_restarts=1),
    # "fast": 10-step attacks, the full per-attack table of 1,000 images in about a minute
    # (the experiments' budget, `train.py --experiment`); "default" before the cascade.
    "fast": dict(pgd_steps=10, apgd_steps=10, restarts=1, square_queries=100, eot_samples=4,
                 eot_steps=10, fd_samples=8, fd_steps=10, deepfool_steps=10, cw_steps=30,
                 fmn_steps=50, fab_steps=20, n_target_classes=9, es_schedule=((10, 3),),
                 fmn_step_scales=(1.0,), square_restarts=1, apgd_t_restarts=1),
    "default": dict(pgd_steps=10, apgd_steps=100, restarts=5, square_queries=2000,
                    eot_samples=4, eot_steps=10, fd_samples=8, fd_steps=10, deepfool_steps=10,
                    cw_steps=30, fmn_steps=200, fab_steps=20, n_target_classes=9,
                    es_schedule=((10, 3),), fmn_step_scales=(1.0, 0.3, 0.1),
                    square_restarts=1, apgd_t_restarts=1),
    "strong": dict(pgd_steps=100, apgd_steps=100, restarts=5, square_queries=5000,
                   eot_samples=32, eot_steps=100, fd_samples=64, fd_steps=100,
                   deepfool_steps=50, cw_steps=200, fmn_steps=1000, fab_steps=100,
                   n_target_classes=9, es_schedule=ES_SCHEDULE_CPU,
                   fmn_step_scales=(1.0, 0.3, 0.1), square_restarts=3, apgd_t_restarts=3),
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


# Kinds drive the diagnostics (`kwta_jax.diagnostics`) and the reports: a single gradient
# step, iterative white-box gradient attacks, minimum-norm attacks, and the attacks that do
# not trust the model's own gradient (a custom attack takes part through its kind).
KINDS = ("single-step", "white-box", "minimal-norm", "gradient-free", "bpda", "eot", "transfer")
NON_GRADIENT_KINDS = ("gradient-free", "bpda", "eot", "transfer")
# What each auxiliary model an attack can need is, for the message when it is missing.
AUXILIARY_MODELS = {
    "bpda": "no k-WTA layer: BPDA would be plain PGD",
    "source": "no transfer surrogate model",
}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack of a suite.

    ``fn(logits_fn, x, y, key, *, eps, [<needs>_logits_fn]) -> x_adv``: ``needs`` names the
    auxiliary model it also takes (``"bpda"``: the BPDA twin, ``"source"``: a transfer
    surrogate; ``None``: none), passed as the keyword ``<needs>_logits_fn``.
    ``kind``: one of `KINDS` (what the diagnostics compare it with).
    ``min_norm``: ``fn`` is a minimum-norm attack ``fn(logits_fn, x, y, key) -> (x_adv,
    dist)`` that takes no eps: it runs once for every radius (its point is kept at radius
    ``eps`` where ``dist <= eps``) and its distances are reported per example.
    ``measure_all``: a minimum-norm attack that runs on every clean-correct example even in a
    cascade, so that its median distance is the model's, not the cascade's leftovers' (FMN in
    the built-in suites; FAB-T, like AutoAttack's, only attacks what is left).
    """

    name: str
    kind: str
    fn: Callable
    needs: str | None = None
    description: str = ""
    min_norm: bool = False
    measure_all: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"AttackSpec {self.name!r}: kind must be one of {KINDS}; got "
                             f"{self.kind!r}.")  # fmt: skip
        if not callable(self.fn):
            raise TypeError(f"AttackSpec {self.name!r}: fn must be callable.")

    def skip_reason(self, auxiliary: Collection[str]) -> str | None:
        """Why this attack cannot run with the ``auxiliary`` models at hand (``None``: it can)."""
        if self.needs is None or self.needs in auxiliary:
            return None
        return AUXILIARY_MODELS.get(self.needs, f"no {self.needs!r} model")


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
                   p(attacks.square, queries=b["square_queries"], norm=norm,
                     restarts=b["square_restarts"]),
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
        AttackSpec("apgd-t", "white-box",
                   p(attacks.apgd_t, steps=b["apgd_steps"], norm=norm,
                     n_target_classes=b["n_target_classes"], restarts=b["apgd_t_restarts"]),
                   description="targeted APGD-DLR over the top classes (AutoAttack)"),
        AttackSpec("fmn", "minimal-norm",
                   p(attacks.fmn_min_norm, steps=b["fmn_steps"], norm=norm,
                     alpha_init=tuple(FMN_ALPHA_INIT[norm] * k for k in b["fmn_step_scales"])),
                   min_norm=True, measure_all=True,
                   description="FMN minimum-norm attack (Pintor et al. 2021)"),
        AttackSpec("fab-t", "minimal-norm",
                   p(attacks.fab_t_min_norm, steps=b["fab_steps"], norm=norm,
                     n_target_classes=b["n_target_classes"]),
                   min_norm=True, description="targeted FAB minimum-norm attack (AutoAttack)"),
        AttackSpec("es", "gradient-free",
                   p(attacks.es, schedule=attacks.check_es_schedule(b["es_schedule"]), norm=norm),
                   description="signed PGD on the smoothed margin, antithetic Gaussian "
                   "gradients (Tramer et al. 2020)"),
    ]  # fmt: skip
    return {s.name: s for s in specs}


ATTACKS: tuple[str, ...] = tuple(_attack_table("linf", BUDGETS["default"]))
# Cheap to expensive: the order of the cascade (`run_suite(mode="cascade")`).
DEFAULT_SUITE: tuple[str, ...] = (
    "fgsm", "pgd", "apgd-ce", "apgd-dlr", "bpda", "transfer", "fmn", "apgd-t", "square", "eot",
    "gradient-free",
)  # fmt: skip
# The strong suite adds FAB-T and the literature's k-WTA attack (`es`).
STRONG_SUITE: tuple[str, ...] = DEFAULT_SUITE + ("fab-t", "es")
MODES = ("full", "cascade")


def default_suite(budget: str = "default", norm: str = "linf") -> tuple[str, ...]:
    """The attack names run by default at ``budget`` (`STRONG_SUITE` for ``"strong"``), less
    Square for ``norm="l2"`` (only the L-inf Square attack is implemented)."""
    names = STRONG_SUITE if budget == "strong" else DEFAULT_SUITE
    return names if norm == "linf" else tuple(n for n in names if n != "square")


def _budget_numbers(budget: str | dict) -> dict:
    """A budget's numbers: a name of `BUDGETS`, or a dict overriding "default"'s."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {sorted(BUDGETS)}; got {budget!r}.")
        return dict(BUDGETS[budget])
    if not isinstance(budget, dict):
        raise TypeError(f"budget must be a name of {sorted(BUDGETS)} or a dict; got "
                        f"{type(budget).__name__}.")  # fmt: skip
    unknown = sorted(set(budget) - set(BUDGETS["default"]))
    if unknown:
        raise ValueError(f"budget: unknown key(s) {unknown}; known: {sorted(BUDGETS['default'])}.")
    return {**BUDGETS["default"], **budget}


def build_suite(
    names: Sequence[str | AttackSpec] | str = DEFAULT_SUITE, *, norm: str = "linf",
    budget: str | dict = "default",
) -> list[AttackSpec]:  # fmt: skip
    """The `AttackSpec` of each name in ``names`` (``"all"`` expands to every attack; a single
    name may be given as a string; `AttackSpec` entries are kept as they are).

    Raises:
      ValueError: an unknown or repeated attack, an unknown budget, Square with L2.
    """
    check_norm(norm)
    table = _attack_table(norm, _budget_numbers(budget))
    if isinstance(names, str | AttackSpec):
        names = [names]
    names = list(ATTACKS) if list(names) == ["all"] else list(names)
    bad = [n for n in names if not isinstance(n, str | AttackSpec)]
    if bad:
        raise TypeError(f"attacks: entries must be attack names or AttackSpec; got {bad!r}.")
    unknown = [n for n in names if isinstance(n, str) and n not in table]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)} or 'all'.")
    specs = [table[n] if isinstance(n, str) else n for n in names]
    seen = [s.name for s in specs]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise ValueError(f"attacks: {repeated} repeated; give each attack once.")
    if norm == "l2" and "square" in seen:
        raise ValueError("square: only the L-inf Square attack is implemented; drop it for L2.")
    return specs


# AutoAttack "standard" (Croce & Hein 2020, version="standard"): 100 iterations, 1 restart
# for APGD-CE; 9 target classes, 1 restart each, for APGD-T and FAB-T; Square 5,000 queries.
AUTOATTACK_STANDARD = dict(apgd_steps=100, restarts=1, n_target_classes=9, fab_steps=100,
                           square_queries=5000, apgd_t_restarts=1,
                           square_restarts=1)  # fmt: skip


# AutoAttack shrunk for smoke runs (``budget="quick"`` with the preset).
AUTOATTACK_QUICK = dict(apgd_steps=5, fab_steps=5, n_target_classes=3, square_queries=50)
PRESETS = ("autoattack",)
# Suites a user can name: the budget each one runs at (the preset has its own numbers).
NAMED_SUITES: dict[str, str | None] = {
    "default": "default", "strong": "strong", "fast": "fast", "quick": "quick",
    "autoattack": None,
}  # fmt: skip


def autoattack_suite(norm: str = "linf", **overrides) -> list[AttackSpec]:
    """AutoAttack "standard": APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000
    queries), in that order; run it with ``run_suite(..., mode="cascade")`` as AutoAttack
    does. ``overrides`` change `AUTOATTACK_STANDARD`'s numbers. For ``norm="l2"`` Square is
    left out (only the L-inf Square attack is implemented), so the L2 preset is weaker than
    AutoAttack's."""
    budget = {**AUTOATTACK_STANDARD, **overrides}
    names = ["apgd-ce", "apgd-t", "fab-t"] + (["square"] if norm == "linf" else [])
    return build_suite(names, norm=norm, budget=budget)


def resolve_suite(
    suite: str | AttackSpec | Sequence[str | AttackSpec] | None = None,
    *,
    norm: str = "linf",
    budget: str | dict | None = None,
    es_schedule: Sequence[tuple[int, int]] | None = None,
) -> list[AttackSpec]:
    """The attacks an evaluation runs, from what the user asked for.

    Args:
      suite: ``None`` or a name of `NAMED_SUITES` (``"default"``, ``"strong"``, ``"fast"``,
        ``"quick"``: that budget's `default_suite`; ``"autoattack"``: `autoattack_suite`), or
        attack names / `AttackSpec` (a single one or a list; ``"all"``) run at ``budget``.
      budget: the numbers of the attacks (a name of `BUDGETS` or a dict of overrides);
        default: the named suite's own, or ``"default"`` for a list. With
        ``suite="autoattack"``, ``"quick"`` shrinks the preset for smoke runs.
      es_schedule: replaces the budget's schedule of `es` (e.g. the literature's,
        `kwta_jax.attacks.ES_SCHEDULE`).
    """
    if isinstance(suite, str) and suite in PRESETS:
        if es_schedule is not None:
            raise ValueError("es_schedule: the autoattack preset has no es attack.")
        if budget not in (None, "quick", "default", "strong"):
            raise ValueError(f"budget: the autoattack preset has its own budget; only 'quick' "
                             f"shrinks it; got {budget!r}.")  # fmt: skip
        return autoattack_suite(norm, **(AUTOATTACK_QUICK if budget == "quick" else {}))
    if suite is None or (isinstance(suite, str) and suite in NAMED_SUITES):
        budget = NAMED_SUITES.get(suite or "default") if budget is None else budget
        names = default_suite(budget if isinstance(budget, str) else "default", norm)
    elif not isinstance(suite, str | AttackSpec) and any(
        isinstance(n, str) and n in NAMED_SUITES for n in suite
    ):
        # A list that names whole suites ("autoattack", then extra attacks): each part
        # resolved on its own, in order.
        specs = [
            spec
            for part in suite
            for spec in (
                resolve_suite(part, norm=norm, budget=budget, es_schedule=es_schedule)
                if isinstance(part, str) and part in NAMED_SUITES
                else [part]
                if isinstance(part, AttackSpec)
                else resolve_suite([part], norm=norm, budget=budget, es_schedule=es_schedule)
            )
        ]
        return build_suite(specs, norm=norm)
    else:
        names, budget = suite, "default" if budget is None else budget
    numbers = _budget_numbers(budget)
    if es_schedule is not None:
        numbers["es_schedule"] = tuple(tuple(int(v) for v in p) for p in es_schedule)
    return build_suite(names, norm=norm, budget=numbers)
