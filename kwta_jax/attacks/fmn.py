"""FMN, the Fast Minimum-Norm attack (Pintor et al. 2021, "Fast Minimum-norm Adversarial
Attacks through Adaptive Norm Constraints", NeurIPS). L-inf and L2.

Normalised gradient ascent on the logit difference ``max_{j != y} z_j - z_y`` from the clean
input, inside an L_p ball whose radius ``epsilon`` adapts per example:

* not adversarial yet and never was: ``epsilon = ||delta|| + |loss| / ||grad||_dual`` (the
  linear estimate of the distance to the boundary), here at least ``epsilon (1 + gamma)``
  (a deviation, see `step`: the paper's rule can stall);
* not adversarial, but an adversarial was found before: ``epsilon *= 1 + gamma``;
* adversarial: ``epsilon = min(epsilon (1 - gamma), best norm found)``.

Then ``delta += alpha grad / ||grad||_2``, projected onto the ``epsilon``-ball and the box.
``alpha`` and ``gamma`` are annealed by a cosine from their initial to their final values.
The smallest adversarial perturbation met is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.attacks.losses import margin
from kwta_jax.attacks.projections import check_norm, keep_within_eps, lp_norm

__all__ = ["FMN_ALPHA_INIT", "fmn", "fmn_min_norm"]

# Initial step sizes: 1 for L2 and 10 for L-inf, as we read the paper's setup (the gradient
# step is L2-normalised for every norm, so the L-inf step is larger: the projection onto the
# L-inf ball clips most of it). On small random MLPs L-inf with 1 measured within 0.1%.
FMN_ALPHA_INIT: dict[str, float] = {"l2": 1.0, "linf": 10.0}


def _project_flat(delta: jax.Array, radius: jax.Array, norm: str) -> jax.Array:
    """``delta [B, d]`` onto the per-example ball of ``radius [B]``."""
    if norm == "linf":
        return jnp.clip(delta, -radius[:, None], radius[:, None])
    scale = jnp.minimum(1.0, radius / jnp.maximum(lp_norm(delta, "l2"), 1e-12))
    return delta * scale[:, None]


def fmn_min_norm(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array | None = None,
    *,
    norm: str = "linf",
    steps: int = 100,
    alpha_init: float | Sequence[float] | None = None,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
) -> tuple[jax.Array, jax.Array]:
    """FMN as a minimum-norm attack (untargeted). Deterministic: ``key`` is ignored.

    Args:
      logits_fn: ``[B, ...] float32 -> [B, classes]``.
      x: ``[B, H, W, C]`` float32 in [0, 1]. y: ``[B]`` int labels.
      norm: ``"linf"`` or ``"l2"``. steps: iterations (gradient evaluations) per run.
      alpha_init: initial step, default `FMN_ALPHA_INIT` (1 for L2, 10 for L-inf); a
        sequence runs FMN once per initial step and keeps each example's smallest
        adversarial (on a masked model the trajectories differ; the cost adds up).
      alpha_final: final step, default ``alpha_init / 100``.
      gamma_init, gamma_final: the radius' relative change, annealed likewise.

    Returns:
      ``(x_adv, dist)``: ``x_adv`` like ``x``, in [0, 1], per example the misclassified point
      of smallest distance to ``x`` met (``x`` where none was met or ``x`` is already
      misclassified); ``dist [B]`` float32 its ``norm`` distance (``inf`` where none).
    """
    del key
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    if steps < 1:
        raise ValueError(f"fmn: need steps >= 1; got {steps}.")
    if isinstance(alpha_init, Sequence):
        if not alpha_init:
            raise ValueError("fmn: alpha_init is an empty sequence; give at least one step.")
        runs = [
            fmn_min_norm(logits_fn, x, y, None, norm=norm, steps=steps, alpha_init=float(a),
                         alpha_final=alpha_final, gamma_init=gamma_init,
                         gamma_final=gamma_final)
            for a in alpha_init
        ]  # fmt: skip
        best_x, best_dist = runs[0]
        for x_r, d_r in runs[1:]:
            better = d_r < best_dist
            best_x = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_r, best_x)
            best_dist = jnp.where(better, d_r, best_dist)
        return best_x, best_dist
    alpha_init = FMN_ALPHA_INIT[norm] if alpha_init is None else alpha_init
    alpha_final = alpha_init / 100.0 if alpha_final is None else alpha_final
    b, d = x.shape[0], int(np.prod(x.shape[1:]))
    x0 = x.reshape(b, d)
    # The largest perturbation the box allows: no radius beyond it is useful.
    worst = lp_norm(jnp.maximum(x0, 1.0 - x0), norm)

    def evaluate(delta):
        def total(dl):
            logits = logits_fn((x0 + dl).reshape(x.shape))
            m = margin(logits, y)
            return jnp.sum(m), (m, logits)

        (_, (m, logits)), g = jax.value_and_grad(total, has_aux=True)(delta)
        return m, g, jnp.argmax(logits, -1) != y

    def record(delta, is_adv, best_x, best_dist):
        dist = lp_norm(delta, norm)
        better = is_adv & (dist < best_dist)
        best_x = jnp.where(better[:, None], x0 + delta, best_x)
        return best_x, jnp.where(better, dist, best_dist)

    def step(i, c):
        delta, radius, best_x, best_dist = c
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * i / steps))
        alpha = alpha_final + (alpha_init - alpha_final) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        m, g, is_adv = evaluate(delta)
        best_x, best_dist = record(delta, is_adv, best_x, best_dist)
        found = jnp.isfinite(best_dist)
        # The dual norm of the gradient turns the loss into a distance (L1 for L-inf).
        g_dual = jnp.sum(jnp.abs(g), -1) if norm == "linf" else lp_norm(g, "l2")
        to_boundary = jnp.abs(m) / jnp.maximum(g_dual, 1e-12)
        # Before the first success the paper sets the radius to the linear estimate of the
        # boundary. That can stall: where the model is linear the estimate is exact and an
        # iterate exactly on the boundary is not misclassified; where the box clips the step,
        # ||delta|| and with it the estimate stop growing. So the radius also grows by at
        # least (1 + gamma) per step until the first success.
        estimate = jnp.maximum(lp_norm(delta, norm) + to_boundary, radius * (1.0 + gamma))
        radius = jnp.where(
            is_adv,
            jnp.minimum(radius * (1.0 - gamma), best_dist),
            jnp.where(found, radius * (1.0 + gamma), estimate),
        )
        radius = jnp.minimum(radius, worst)
        g_unit = g / jnp.maximum(lp_norm(g, "l2"), 1e-12)[:, None]
        delta = _project_flat(delta + alpha * g_unit, radius, norm)
        delta = jnp.clip(x0 + delta, 0.0, 1.0) - x0
        return delta, radius, best_x, best_dist

    init = (
        jnp.zeros_like(x0),
        jnp.zeros((b,), jnp.float32),
        x0,
        jnp.full((b,), jnp.inf, jnp.float32),
    )
    delta, _, best_x, best_dist = lax.fori_loop(0, steps, step, init)
    # The last iterate has not been evaluated yet: one more forward pass.
    is_adv = jnp.argmax(logits_fn((x0 + delta).reshape(x.shape)), -1) != y
    best_x, best_dist = record(delta, is_adv, best_x, best_dist)
    return lax.stop_gradient(best_x.reshape(x.shape)), lax.stop_gradient(best_dist)


def fmn(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array | None = None,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    alpha_init: float | Sequence[float] | None = None,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
) -> jax.Array:
    """FMN at radius ``eps``: `fmn_min_norm`'s point where its norm is at most ``eps``, else
    the clean ``x``. ``x [B, H, W, C]`` in [0, 1], ``y [B]`` -> ``x_adv`` like ``x``, inside
    the eps-ball ∩ [0, 1]. Deterministic (``key`` is ignored)."""
    x_adv, dist = fmn_min_norm(
        logits_fn, x, y, key, norm=norm, steps=steps, alpha_init=alpha_init,
        alpha_final=alpha_final, gamma_init=gamma_init, gamma_final=gamma_final,
    )  # fmt: skip
    return keep_within_eps(x_adv, dist, x, eps, norm)
