"""`es`: the attack Tramer et al. (2020, "On Adaptive Attacks to Adversarial Example
Defenses", the k-WTA case study) ran against k-Winners-Take-All.

k-WTA makes the loss surface piecewise constant at small scales, so its exact gradient says
little about where the loss goes at the scale of eps. The attack instead follows the gradient
of a *smoothed* model, ``E_u L(x + sigma u)`` with ``u ~ N(0, I)`` and ``sigma = eps``,
estimated from forward passes only with antithetic Gaussian differences. It is signed PGD
(steepest ascent for the norm) on the margin loss ``max_{j != y} z_j - z_y`` with that
estimate, the number of samples per step ramped up over the iterations (the literature used
100, then 1,000, then 20,000 at CIFAR-10 scale), and it stops moving an example as soon as it
is misclassified.

Cost: a step with ``n`` samples is ``2 n`` forward passes per example (no backward pass).
Memory is bounded by ``block_size`` pairs (`gradients.finite_differences_blocked`), whatever
the sample count. Steps are skipped altogether once the whole batch is misclassified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
from jax import lax

from kwta_jax.attacks import gradients
from kwta_jax.attacks.losses import LossFn, get_loss, margin
from kwta_jax.attacks.pgd import keep_best
from kwta_jax.attacks.projections import ascent_direction, check_norm, project, random_init

__all__ = ["ES_SCHEDULE", "es"]

# (steps, samples per step) phases: the literature's sample ramp 100 -> 1,000 -> 20,000; the
# step counts are this library's choice (the samples are what makes the estimate reliable).
ES_SCHEDULE: tuple[tuple[int, int], ...] = ((100, 100), (50, 1000), (20, 20000))


def es(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    schedule: Sequence[tuple[int, int]] = ES_SCHEDULE,
    sigma: float | None = None,
    step_size: float | None = None,
    block_size: int = 256,
    loss: str | LossFn = "margin",
    random_start: bool = False,
) -> jax.Array:
    """Signed PGD with an antithetic Gaussian estimate of the smoothed model's gradient.

    Args:
      logits_fn: ``[B, ...] float32 -> [B, classes]``, only ever called forward.
      x: ``[B, H, W, C]`` float32 in [0, 1]. y: ``[B]`` int labels. key: PRNG key.
      eps: radius of the ``norm`` ball (``"linf"``: sign steps; ``"l2"``: normalised steps).
      schedule: static ``((steps, samples), ...)`` phases run in order; ``samples``
        antithetic pairs (``2 samples`` forward passes) per step of the phase.
      sigma: smoothing scale, default ``eps``.
      step_size: default ``2.5 eps / total steps`` (Madry et al.'s rule).
      block_size: antithetic pairs evaluated at once (peak memory ~ ``2 block_size B``
        inputs and their activations).
      loss: maximised loss, default the margin ``max_{j != y} z_j - z_y``.
      random_start: start uniformly in the ball instead of at ``x``.

    Returns:
      ``x_adv`` like ``x``, inside the eps-ball ∩ [0, 1]: an example's first misclassified
      iterate (it is frozen there), else its iterate of largest margin.
    """
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    phases = tuple((int(steps), int(samples)) for steps, samples in schedule)
    if not phases or any(steps < 0 or samples < 1 for steps, samples in phases):
        raise ValueError(f"es: schedule needs (steps >= 0, samples >= 1) phases; got {schedule}.")
    total_steps = sum(steps for steps, _ in phases)
    if total_steps < 1:
        raise ValueError(f"es: the schedule has no steps; got {schedule}.")
    sigma = eps if sigma is None else sigma
    step_size = 2.5 * eps / total_steps if step_size is None else step_size
    loss_fn = get_loss(loss)
    k_init, k_steps = jax.random.split(key)
    x_adv = random_init(k_init, x, eps, norm) if random_start else x
    best = (x, jnp.full(y.shape, -jnp.inf, jnp.float32))

    first_step = 0
    # A Python loop over the (few, static) phases: each has its own sample count, hence its
    # own block shape; the iterations of a phase are a lax.fori_loop.
    for steps, samples in phases:
        estimator = gradients.finite_differences_blocked(
            logits_fn, loss_fn, samples=samples, sigma=sigma, block_size=block_size
        )

        def step(i, carry, estimator=estimator, first_step=first_step):
            x_adv, best_x, best_m = carry
            logits = logits_fn(x_adv)
            best_x, best_m = keep_best(best_x, best_m, x_adv, logits, y)
            done = margin(logits, y) > 0  # misclassified: frozen from now on

            def move(x_adv):
                _, g, _ = estimator(x_adv, y, jax.random.fold_in(k_steps, first_step + i))
                x_new = project(x_adv + step_size * ascent_direction(g, norm), x, eps, norm)
                return jnp.where(done.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, x_new)

            # Skip the (expensive) estimate once the whole batch is misclassified.
            x_adv = lax.cond(jnp.all(done), lambda v: v, move, x_adv)
            return x_adv, best_x, best_m

        x_adv, *best = lax.fori_loop(0, steps, step, (x_adv, *best))
        first_step += steps

    best_x, _ = keep_best(*best, x_adv, logits_fn(x_adv), y)
    return lax.stop_gradient(project(best_x, x, eps, norm))
