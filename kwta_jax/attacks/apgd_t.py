"""APGD-T (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"): targeted APGD, the second attack of AutoAttack "standard".

For each of the ``n_target_classes`` classes other than the label with the largest clean
logits, one `apgd.apgd` run (its step-size schedule, momentum and checkpoints unchanged)
maximises the targeted DLR loss ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)``. Success is
misclassification (any wrong class, not necessarily the target), and per example the most
adversarial point over all targets is kept. AutoAttack standard: 9 targets, 100 iterations,
1 restart per target, for L-inf and L2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from kwta_jax.attacks.apgd import apgd
from kwta_jax.attacks.losses import dlr_targeted, margin, top_other_classes
from kwta_jax.attacks.pgd import keep_best
from kwta_jax.attacks.projections import check_norm, project

__all__ = ["apgd_t"]


def apgd_t(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    n_target_classes: int = 9,
    restarts: int = 1,
    rho: float = 0.75,
    alpha: float = 0.75,
) -> jax.Array:
    """APGD-T: one targeted-DLR APGD run per target class, the best result kept per example.

    Args:
      logits_fn: ``[B, ...] float32 -> [B, classes]`` (at least 4 classes: the loss uses the
        4th largest logit).
      x: ``[B, H, W, C]`` float32 in [0, 1]. y: ``[B]`` int labels. key: PRNG key.
      eps: radius of the ``norm`` ball. steps: APGD iterations per run.
      norm: ``"linf"`` or ``"l2"``.
      n_target_classes: targets per example, the other classes ranked by clean logit (capped
        at ``classes - 1``). restarts: APGD restarts per target. rho, alpha: as in `apgd.apgd`.

    Returns:
      ``x_adv`` like ``x``, inside the eps-ball ∩ [0, 1]: per example the point of largest
      margin ``max_{j != y} z_j - z_y`` over all targets (the clean input if nothing beats it).
    """
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    logits0 = logits_fn(x)
    num_classes = logits0.shape[-1]
    if num_classes < 4:
        raise ValueError(f"apgd_t: the targeted DLR loss needs >= 4 classes; got {num_classes}.")
    if n_target_classes < 1:
        raise ValueError(f"apgd_t: need n_target_classes >= 1; got {n_target_classes}.")
    n_targets = min(n_target_classes, num_classes - 1)
    targets = top_other_classes(logits0, y, n_targets)  # [B, n_targets]

    def one_target(t, best):
        loss = functools.partial(dlr_targeted, target=targets[:, t])
        x_t = apgd(
            logits_fn, x, y, jax.random.fold_in(key, t), eps=eps, steps=steps, norm=norm,
            loss=loss, restarts=restarts, rho=rho, alpha=alpha,
        )  # fmt: skip
        return keep_best(*best, x_t, logits_fn(x_t), y)

    def maybe_one_target(t, best):
        # Once every example of the batch is misclassified, the remaining targets cannot
        # change the outcome: skip their runs (AutoAttack only attacks unbroken points).
        return lax.cond(jnp.all(best[1] > 0), lambda _, b: b, one_target, t, best)

    best_x, _ = lax.fori_loop(0, n_targets, maybe_one_target, (x, margin(logits0, y)))
    return lax.stop_gradient(project(best_x, x, eps, norm))
