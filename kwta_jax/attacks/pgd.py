"""Projected gradient ascent: PGD (Madry et al. 2018) and MIM (Dong et al. 2018).

One engine, `gradient_attack`, composes a loss, a gradient estimator (`gradients`), a step
rule (steepest ascent for the norm, optional momentum, step-size schedule) and the projection
(`projections.project`). The adaptive attacks (BPDA, EOT, finite differences, transfer) are
the same engine with another estimator.

The whole attack is traceable: restarts and steps are ``lax.fori_loop``s, keys are explicit
(``fold_in`` of the step index), and the returned batch is the per-example iterate with the
largest margin on the attacked model (so a success found at any step or restart is kept).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from kwta_jax.attacks import gradients
from kwta_jax.attacks.losses import LogitsFn, LossFn, get_loss, margin
from kwta_jax.attacks.projections import ascent_direction, check_norm, project, random_init

__all__ = ["SCHEDULES", "gradient_attack", "keep_best", "mim", "pgd", "step_size_at"]

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")


def step_size_at(step_size, i, steps: int, schedule: str):
    """Step size at iteration ``i`` of ``steps``: constant, cosine or linear decay to 0."""
    if schedule == "constant":
        return step_size
    frac = i / max(steps, 1)
    if schedule == "cosine":
        return step_size * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if schedule == "linear":
        return step_size * (1.0 - frac)
    raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")


def keep_best(best_x, best_m, x_adv, logits, y):
    """Per example, keeps whichever of ``best_x`` / ``x_adv`` has the larger margin
    (``max_{j != y} z_j - z_y``, positive iff misclassified) on the attacked model."""
    m = margin(logits, y)
    better = m > best_m
    sel = better.reshape(better.shape + (1,) * (x_adv.ndim - 1))
    return jnp.where(sel, x_adv, best_x), jnp.where(better, m, best_m)


def gradient_attack(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    momentum: float = 0.0,
    schedule: str = "constant",
    estimator: gradients.Estimator | None = None,
) -> jax.Array:
    """Iterative projected steepest ascent of ``loss`` inside the eps-ball ∩ [0, 1].

    Args:
      logits_fn: ``[B, ...] float32 -> [B, classes]``, the attacked model (success is judged
        on it).
      x: ``[B, H, W, C]`` float32 in [0, 1]. y: ``[B]`` int labels. key: PRNG key.
      eps: radius of the ball. steps: iterations per restart.
      step_size: step length (L-inf: per coordinate; L2: Euclidean); default ``2.5 eps /
        steps`` (Madry et al.).
      norm: ``"linf"`` or ``"l2"``. random_start: start uniformly in the ball.
      restarts: independent runs; the best iterate over all runs is kept.
      loss: a name of `losses.LOSSES` or a loss function. Ignored if ``estimator`` is given.
      momentum: 0 for PGD; ``mu > 0`` accumulates L1-normalised gradients (MIM).
      schedule: step-size schedule, one of `SCHEDULES`.
      estimator: gradient estimator (`gradients`); default exact autodiff of ``loss``.

    Returns:
      ``x_adv``: ``[B, H, W, C]`` like ``x``, inside the ball and the box.
    """
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    if steps < 1 or restarts < 1:
        raise ValueError(f"need steps >= 1 and restarts >= 1; got {steps}, {restarts}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")
    if step_size is None:
        step_size = 2.5 * eps / steps
    if estimator is None:
        estimator = gradients.autodiff(logits_fn, get_loss(loss))

    def one_restart(r, best):
        k_init, k_steps = jax.random.split(jax.random.fold_in(key, r))
        x0 = random_init(k_init, x, eps, norm) if random_start else x

        def step(i, carry):
            x_adv, velocity, best_x, best_m = carry
            _, g, logits = estimator(x_adv, y, jax.random.fold_in(k_steps, i))
            if logits is None:
                logits = logits_fn(x_adv)
            best_x, best_m = keep_best(best_x, best_m, x_adv, logits, y)
            if momentum:
                l1 = jnp.sum(jnp.abs(g).reshape(g.shape[0], -1), axis=-1)
                g = g / jnp.maximum(l1, 1e-12).reshape((-1,) + (1,) * (g.ndim - 1))
                velocity = momentum * velocity + g
                g = velocity
            alpha = step_size_at(step_size, i, steps, schedule)
            x_adv = project(x_adv + alpha * ascent_direction(g, norm), x, eps, norm)
            return x_adv, velocity, best_x, best_m

        x_last, _, best_x, best_m = lax.fori_loop(0, steps, step, (x0, jnp.zeros_like(x), *best))
        return keep_best(best_x, best_m, x_last, logits_fn(x_last), y)

    init = (x, jnp.full(y.shape, -jnp.inf, jnp.float32))
    best_x, _ = lax.fori_loop(0, restarts, one_restart, init)
    # The best iterate is a projected point; re-projecting is a no-op that makes the invariant
    # hold by construction, and stop_gradient makes it a constant for adversarial training.
    return lax.stop_gradient(project(best_x, x, eps, norm))


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    loss: str | LossFn = "ce",
    schedule: str = "constant",
) -> jax.Array:
    """PGD (Madry et al. 2018): `gradient_attack` without momentum. Also the adversarial-
    training hook: ``functools.partial(pgd, eps=..., steps=..., step_size=...)``.

    Shapes: ``x [B, H, W, C]`` float32 in [0, 1], ``y [B]`` int -> ``x_adv`` like ``x``.
    """
    return gradient_attack(
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        random_start=random_start,
        restarts=restarts,
        loss=loss,
        schedule=schedule,
    )


def mim(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    decay: float = 1.0,
    random_start: bool = False,
    restarts: int = 1,
    loss: str | LossFn = "ce",
) -> jax.Array:
    """Momentum Iterative Method (Dong et al. 2018): ``v <- decay * v + g / ||g||_1``, step
    along ``sign(v)`` (L-inf) or ``v / ||v||_2`` (L2). Default step ``eps / steps``."""
    if step_size is None:
        step_size = eps / steps
    return gradient_attack(
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        random_start=random_start,
        restarts=restarts,
        loss=loss,
        momentum=decay,
    )
