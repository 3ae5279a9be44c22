"""APGD (Croce & Hein 2020, the gradient attack of AutoAttack): PGD with momentum and a
step size that needs no tuning.

The step starts at ``2 eps`` and is halved for an example at a checkpoint when, since the
previous checkpoint, (1) the loss increased in fewer than ``rho`` of the steps, or (2) the
step was not halved at the previous checkpoint and the best loss did not improve. On halving
the iterate restarts from the best point found. Checkpoints come at fractions 0, 0.22, ... of
the budget, with windows shrinking by 0.03 down to 0.06 of it (as in the paper).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.attacks import gradients
from kwta_jax.attacks.losses import LossFn, get_loss
from kwta_jax.attacks.pgd import keep_best
from kwta_jax.attacks.projections import (
    ascent_direction,
    batch_broadcast,
    check_norm,
    project,
    random_init,
)

__all__ = ["apgd", "apgd_checkpoints"]


def apgd_checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Static schedule: ``(is_checkpoint [steps] bool, window [steps] int)`` where ``window[i]``
    is the number of steps since the previous checkpoint (meaningful where checkpoint)."""
    first = max(int(0.22 * steps), 1)
    shrink, smallest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    is_ck, window = np.zeros(steps, bool), np.ones(steps, np.int32)
    i, w = first - 1, first
    while i < steps:
        is_ck[i], window[i] = True, w
        w = max(w - shrink, smallest)
        i += w
    return is_ck, window


def apgd(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    loss: str | LossFn = "ce",
    restarts: int = 1,
    rho: float = 0.75,
    alpha: float = 0.75,
    estimator: gradients.Estimator | None = None,
) -> jax.Array:
    """APGD-CE (``loss="ce"``) or APGD-DLR (``loss="dlr"``).

    Args:
      logits_fn, x, y, key, eps, norm: as in `pgd.gradient_attack`; ``x [B, H, W, C]``.
      steps: iterations per restart. restarts: random restarts (best iterate kept).
      loss: maximised loss (name or function). rho: oscillation threshold. alpha: weight of
        the new gradient step against momentum.
      estimator: gradient estimator; default exact autodiff of ``loss`` (EOT/BPDA-APGD with
        another one).

    Returns:
      ``x_adv`` like ``x``: the iterate with the largest margin on ``logits_fn``.
    """
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    if steps < 1 or restarts < 1:
        raise ValueError(f"apgd: need steps >= 1 and restarts >= 1; got {steps}, {restarts}.")
    if estimator is None:
        estimator = gradients.autodiff(logits_fn, get_loss(loss))
    is_ck, window = (jnp.asarray(a) for a in apgd_checkpoints(steps))
    b = x.shape[0]

    def evaluate(x_adv, k):
        value, g, logits = estimator(x_adv, y, k)
        return value, g, (logits_fn(x_adv) if logits is None else logits)

    def one_restart(r, best):
        k_init, k_steps = jax.random.split(jax.random.fold_in(key, r))
        x0 = random_init(k_init, x, eps, norm)
        f0, g0, logits0 = evaluate(x0, jax.random.fold_in(k_steps, steps))
        best = keep_best(*best, x0, logits0, y)

        def step(i, c):
            a = jnp.where(i == 0, 1.0, alpha)  # no momentum on the first step
            z = project(
                c["x"] + batch_broadcast(c["eta"], x) * ascent_direction(c["g"], norm), x, eps, norm
            )
            x_new = project(
                c["x"] + a * (z - c["x"]) + (1 - a) * (c["x"] - c["x_prev"]), x, eps, norm
            )
            f, g, logits = evaluate(x_new, jax.random.fold_in(k_steps, i))
            best_x, best_m = keep_best(c["best_x"], c["best_m"], x_new, logits, y)
            n_up = c["n_up"] + (f > c["f"])
            improved = f > c["f_best"]
            x_top = jnp.where(batch_broadcast(improved, x), x_new, c["x_top"])
            g_top = jnp.where(batch_broadcast(improved, x), g, c["g_top"])
            f_best = jnp.where(improved, f, c["f_best"])
            # Checkpoint: halve the step of stalled examples and restart them from their best.
            osc = n_up <= rho * window[i]
            no_progress = ~c["halved"] & (c["f_best_ck"] >= f_best)
            halve = is_ck[i] & (osc | no_progress)
            back = batch_broadcast(halve, x)
            x_cur = jnp.where(back, x_top, x_new)
            return dict(
                x=x_cur,
                x_prev=jnp.where(back, x_top, c["x"]),
                g=jnp.where(back, g_top, g),
                f=f,
                eta=jnp.where(halve, c["eta"] / 2, c["eta"]),
                x_top=x_top,
                g_top=g_top,
                f_best=f_best,
                n_up=jnp.where(is_ck[i], 0, n_up),
                halved=jnp.where(is_ck[i], halve, c["halved"]),
                f_best_ck=jnp.where(is_ck[i], f_best, c["f_best_ck"]),
                best_x=best_x,
                best_m=best_m,
            )

        init = dict(
            x=x0, x_prev=x0, g=g0, f=f0, eta=jnp.full((b,), 2.0 * eps, x.dtype),
            x_top=x0, g_top=g0, f_best=f0, n_up=jnp.zeros((b,), jnp.int32),
            halved=jnp.ones((b,), bool), f_best_ck=f0, best_x=best[0], best_m=best[1],
        )  # fmt: skip
        out = lax.fori_loop(0, steps, step, init)
        return out["best_x"], out["best_m"]

    init = (x, jnp.full((b,), -jnp.inf, jnp.float32))
    best_x, _ = lax.fori_loop(0, restarts, one_restart, init)
    return lax.stop_gradient(project(best_x, x, eps, norm))
