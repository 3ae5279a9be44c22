"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack", ICML), the third attack of
AutoAttack "standard". L-inf and L2.

A minimum-norm attack. Per target class ``t`` it linearises ``f = z_t - z_y`` at the iterate
``x1`` and projects both ``x1`` and the clean ``x0`` onto the hyperplane ``f_lin = 0``
intersected with the [0, 1] box (closed form, `project_onto_hyperplane_in_box`), giving steps
``d1`` and ``d2``. The next iterate is the convex combination

    x1 <- clip((x1 + eta d1) (1 - a) + (x0 + eta d2) a),  a = min(|d1| / (|d1| + |d2|), alpha_max)

which favours the clean point when the boundary is near (``eta`` overshoots the linearised
boundary). Each adversarial iterate is recorded if it is the closest to ``x0`` so far, then
pulled back towards ``x0``: ``x1 <- x0 + beta (x1 - x0)``. One run per target (the other
classes ranked by clean logit), the smallest perturbation over all kept.

`fab_t_min_norm` returns the minimal adversarial found and its norm (the distance to the
decision boundary it certifies from above); `fab_t` is the eps-constrained form the robustness
suite runs (the clean input where the found norm exceeds eps).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.attacks.losses import top_other_classes
from kwta_jax.attacks.projections import check_norm, keep_within_eps, lp_norm

__all__ = ["fab_t", "fab_t_min_norm", "project_onto_hyperplane_in_box"]


def project_onto_hyperplane_in_box(
    t: jax.Array, w: jax.Array, c: jax.Array, norm: str
) -> jax.Array:
    """Minimal-norm step onto a hyperplane within the box, in closed form.

    Solves ``min ||d||  s.t.  w . d = -c,  0 <= t + d <= 1`` per row: ``c`` is the value at
    ``t`` of the affine function ``f(z) = w . (z - t) + c`` whose zero set is the hyperplane.
    Where the box does not reach the hyperplane, returns the box corner that gets closest to
    it (the largest possible decrease of ``|f|``). A zero ``w`` gives ``d = 0``.

    Every coordinate moves towards the hyperplane by ``|d_i| = min(tau m_i, room_i)`` with
    ``room_i`` its distance to the box face in that direction, ``m_i = 1`` (L-inf: all free
    coordinates move by the same ``tau``) or ``|w_i|`` (L2: the KKT solution, ``d`` parallel
    to ``w`` until a coordinate hits the box). The reached decrease ``g(tau) = sum_i |w_i|
    min(tau m_i, room_i)`` is piecewise linear and nondecreasing in ``tau`` with breakpoints
    ``room_i / m_i``: after sorting them, prefix and suffix sums give ``g`` at every breakpoint,
    and ``tau`` solving ``g(tau) = |c|`` lies on the first segment that reaches ``|c|``.

    Args:
      t: ``[B, d]`` float points in [0, 1]. w: ``[B, d]`` float normals. c: ``[B]`` float.
      norm: ``"linf"`` or ``"l2"``.

    Returns:
      ``d: [B, d]`` like ``t``, with ``t + d`` in [0, 1].
    """
    check_norm(norm)
    chex.assert_rank((t, w, c), (2, 2, 1))
    chex.assert_equal_shape((t, w))
    # Orient w so that reaching the hyperplane means decreasing w . z by |c|.
    s = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)[:, None]
    w_dir = w * s
    abs_w = jnp.abs(w_dir)
    room = jnp.where(w_dir > 0, t, 1.0 - t) * (w_dir != 0)
    if norm == "linf":
        rate = jnp.ones_like(abs_w)
    else:
        rate = abs_w
    safe_rate = jnp.where(rate > 0, rate, 1.0)
    saturates_at = jnp.where(rate > 0, room / safe_rate, 0.0)  # tau where coordinate i stops
    slope = abs_w * rate  # d g / d tau while coordinate i is free
    order = jnp.argsort(saturates_at, axis=-1)
    bp = jnp.take_along_axis(saturates_at, order, axis=-1)
    sl = jnp.take_along_axis(slope, order, axis=-1)
    saturated = jnp.cumsum(sl * bp, axis=-1) - sl * bp  # sum over earlier (saturated) coords
    free = jnp.flip(jnp.cumsum(jnp.flip(sl, -1), axis=-1), -1)  # slope of this and later
    g_at_bp = saturated + bp * free  # g(bp_k), nondecreasing in k
    target = jnp.abs(c)[:, None]
    reaches = g_at_bp >= target
    feasible = jnp.any(reaches, axis=-1)
    k = jnp.argmax(reaches, axis=-1)[:, None]  # first breakpoint at or past the hyperplane
    sat_k = jnp.take_along_axis(saturated, k, axis=-1)
    free_k = jnp.take_along_axis(free, k, axis=-1)
    tau = (target - sat_k) / jnp.maximum(free_k, jnp.finfo(t.dtype).tiny)
    tau = jnp.where(feasible[:, None], tau, jnp.inf)  # infeasible: every coordinate saturates
    step = jnp.where(rate > 0, jnp.minimum(tau * rate, room), 0.0)  # no inf * 0
    return -jnp.sign(w_dir) * step


def _target_gap_and_grad(logits_fn, x1, shape, y, target):
    """``f = z_t - z_y`` at ``x1: [B, d]`` and its input gradient (one backward pass)."""

    def total(z):
        logits = logits_fn(z.reshape(shape)).astype(jnp.float32)
        z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
        z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return jnp.sum(z_t - z_y), z_t - z_y

    (_, f), g = jax.value_and_grad(total, has_aux=True)(x1)
    return f, g


def fab_t_min_norm(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    eps: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """FAB-T as a minimum-norm attack. Defaults: AutoAttack "standard" (9 targets, 100
    iterations, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9).

    Args:
      logits_fn: ``[B, ...] float32 -> [B, classes]``, at least 2 classes.
      x: ``[B, H, W, C]`` float32 in [0, 1]. y: ``[B]`` int labels. key: PRNG key (used by
        the random starts of restarts after the first only).
      norm: ``"linf"`` or ``"l2"``. steps: iterations per run.
      n_target_classes: targets per example, the other classes ranked by clean logit (capped
        at ``classes - 1``). restarts: runs per target; the first starts at ``x``, later ones
        at a random point at distance ``r / 2`` with ``r = min(best norm so far, eps)``
        (from ``x`` while nothing was found and ``eps`` is None).
      alpha_max, eta, beta: the FAB step parameters (see the module docstring).
      eps: only the radius of the random starts.

    Returns:
      ``(x_adv, dist)``: ``x_adv`` like ``x``, in [0, 1], per example the misclassified point
      of smallest ``norm`` distance to ``x`` found (``x`` itself where none was found or ``x``
      is already misclassified); ``dist [B]`` float32 its distance (``inf`` where none was
      found, 0 where ``x`` is misclassified).
    """
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    if steps < 1 or restarts < 1 or n_target_classes < 1:
        raise ValueError(
            f"fab_t: need steps, restarts, n_target_classes >= 1; got {steps}, {restarts}, "
            f"{n_target_classes}."
        )
    b, d = x.shape[0], int(np.prod(x.shape[1:]))
    y = y.astype(jnp.int32)
    x0 = x.reshape(b, d)
    logits0 = logits_fn(x)
    n_targets = min(n_target_classes, logits0.shape[-1] - 1)
    targets = top_other_classes(logits0, y, n_targets)  # [B, n_targets]
    init_dist = jnp.where(jnp.argmax(logits0, -1) != y, 0.0, jnp.inf).astype(jnp.float32)
    start_cap = jnp.inf if eps is None else eps

    def one_run(run, carry):
        best_x, best_dist = carry
        target = targets[:, run // restarts]
        k_dir = jax.random.fold_in(key, run)
        if norm == "linf":
            direction = jax.random.uniform(k_dir, (b, d), x.dtype, -1.0, 1.0)
        else:
            direction = jax.random.normal(k_dir, (b, d), x.dtype)
        direction = direction / jnp.maximum(lp_norm(direction, norm), 1e-12)[:, None]
        radius = jnp.minimum(best_dist, start_cap)
        radius = jnp.where((run % restarts > 0) & jnp.isfinite(radius), radius, 0.0)
        x_start = jnp.clip(x0 + 0.5 * radius[:, None] * direction, 0.0, 1.0)

        def step(_, c):
            x1, best_x, best_dist = c
            f, w = _target_gap_and_grad(logits_fn, x1, x.shape, y, target)
            # The linearisation of f at x1 evaluated at x0: f + w . (x0 - x1).
            f_at_x0 = f + jnp.sum(w * (x0 - x1), axis=-1)
            both = project_onto_hyperplane_in_box(
                jnp.concatenate([x1, x0]),
                jnp.concatenate([w, w]),
                jnp.concatenate([f, f_at_x0]),
                norm,
            )
            d1, d2 = both[:b], both[b:]
            a1 = jnp.maximum(lp_norm(d1, norm), 1e-8)
            a2 = jnp.maximum(lp_norm(d2, norm), 1e-8)
            a = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
            x1 = jnp.clip((x1 + eta * d1) * (1.0 - a) + (x0 + eta * d2) * a, 0.0, 1.0)
            is_adv = jnp.argmax(logits_fn(x1.reshape(x.shape)), -1) != y
            dist = lp_norm(x1 - x0, norm)
            better = is_adv & (dist < best_dist)
            best_x = jnp.where(better[:, None], x1, best_x)
            best_dist = jnp.where(better, dist, best_dist)
            # Past the boundary: step back towards x0 to look for a closer crossing.
            x1 = jnp.where(is_adv[:, None], x0 + beta * (x1 - x0), x1)
            return x1, best_x, best_dist

        _, best_x, best_dist = lax.fori_loop(0, steps, step, (x_start, best_x, best_dist))
        return best_x, best_dist

    best_x, best_dist = lax.fori_loop(0, n_targets * restarts, one_run, (x0, init_dist))
    return lax.stop_gradient(best_x.reshape(x.shape)), lax.stop_gradient(best_dist)


def fab_t(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
) -> jax.Array:
    """FAB-T at radius ``eps``: `fab_t_min_norm`'s point where its norm is at most ``eps``,
    else the clean ``x``. ``x [B, H, W, C]`` in [0, 1], ``y [B]`` -> ``x_adv`` like ``x``,
    inside the eps-ball ∩ [0, 1]."""
    x_adv, dist = fab_t_min_norm(
        logits_fn, x, y, key, norm=norm, steps=steps, n_target_classes=n_target_classes,
        restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, eps=eps,
    )  # fmt: skip
    return keep_within_eps(x_adv, dist, x, eps, norm)
