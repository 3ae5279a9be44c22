"""Threat models: L-inf and L2 balls intersected with the [0, 1] box, and the steepest-ascent
step for each norm.

Shapes: images ``x: [B, H, W, C]`` (any ``[B, ...]`` works), per-example quantities ``[B]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NORMS",
    "AttackInvariantError",
    "ascent_direction",
    "check_norm",
    "check_threat_model",
    "keep_within_eps",
    "lp_norm",
    "project",
    "random_init",
    "threat_model_violations",
]

NORMS: tuple[str, ...] = ("linf", "l2")

# Float32 slack for the invariant checks: clipping x +- eps rounds by up to an ulp of 1.0.
_TOL = 1e-5


class AttackInvariantError(AssertionError):
    """An adversarial example left its eps-ball or the [0, 1] box."""


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")


def _per_example(fn, v: jax.Array) -> jax.Array:
    return fn(v.reshape(v.shape[0], -1), axis=-1)


def lp_norm(delta: jax.Array, norm: str) -> jax.Array:
    """Per-example norm of ``delta: [B, ...]`` -> ``[B]``."""
    check_norm(norm)
    if norm == "linf":
        return _per_example(jnp.max, jnp.abs(delta))
    return jnp.sqrt(_per_example(jnp.sum, jnp.square(delta)))


def batch_broadcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """``[B]`` -> ``[B, 1, 1, ...]`` broadcastable against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """Maps ``x_adv`` into ``{x': ||x' - x|| <= eps} ∩ [0, 1]^d``.

    The ball projection is applied first and the box clip second. Since ``x`` is in the box,
    clipping only shrinks every coordinate of ``x' - x`` towards 0, so the result stays in the
    ball: both invariants hold (for L-inf this is the exact projection onto the intersection).
    """
    check_norm(norm)
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        n = lp_norm(delta, "l2")
        delta = delta * batch_broadcast(jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12)), delta)
    return jnp.clip(x + delta, 0.0, 1.0)


def ascent_direction(g: jax.Array, norm: str) -> jax.Array:
    """Unit-norm steepest-ascent direction for gradient ``g``: ``sign(g)`` (L-inf) or
    ``g / ||g||_2`` (L2). A zero gradient gives a zero direction (the attack stalls, which is
    what gradient masking looks like)."""
    check_norm(norm)
    if norm == "linf":
        return jnp.sign(g)
    return g / batch_broadcast(jnp.maximum(lp_norm(g, "l2"), 1e-12), g)


def random_init(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """A random point of the threat model around ``x``: uniform in the L-inf ball, or uniform
    in the L2 ball (Gaussian direction, radius ``eps * U^(1/d)``), then clipped to the box."""
    check_norm(norm)
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    else:
        k_dir, k_rad = jax.random.split(key)
        d = int(np.prod(x.shape[1:]))
        direction = ascent_direction(jax.random.normal(k_dir, x.shape, x.dtype), "l2")
        radius = jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d) * eps
        delta = direction * batch_broadcast(radius, x)
    return project(x + delta, x, eps, norm)


def keep_within_eps(x_adv: jax.Array, dist: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """The eps-constrained result of a minimum-norm attack: per example ``x_adv`` where its
    found perturbation norm ``dist [B]`` is at most ``eps``, else the clean ``x``; projected
    (a no-op on valid inputs) so the threat model holds by construction."""
    within = batch_broadcast(dist <= eps, x)
    return jax.lax.stop_gradient(project(jnp.where(within, x_adv, x), x, eps, norm))


def threat_model_violations(x_adv, x, eps: float, norm: str, tol: float = _TOL) -> dict:
    """Host-side check; returns ``{"ball": count, "box": count, "finite": count}`` of
    examples that violate each invariant (all zeros when the attack is valid)."""
    check_norm(norm)
    x_adv, x = np.asarray(x_adv, np.float64), np.asarray(x, np.float64)
    if x.shape[0] == 0:  # no example (a cascade radius where nothing was left): valid
        return {"ball": 0, "box": 0, "finite": 0}
    flat = (x_adv - x).reshape(x.shape[0], -1)
    dist = np.abs(flat).max(-1) if norm == "linf" else np.sqrt((flat**2).sum(-1))
    xa = x_adv.reshape(x.shape[0], -1)
    return {
        "ball": int(np.sum(~(dist <= eps * (1 + tol) + tol))),
        "box": int(np.sum(~((xa >= -tol) & (xa <= 1 + tol)).all(-1))),
        "finite": int(np.sum(~np.isfinite(xa).all(-1))),
    }


def check_threat_model(x_adv, x, eps: float, norm: str, *, name: str = "attack") -> None:
    """Raises `AttackInvariantError` if any example of ``x_adv`` is outside its eps-ball, the
    [0, 1] box, or not finite; shapes must match."""
    if np.shape(x_adv) != np.shape(x):
        raise AttackInvariantError(
            f"{name}: adversarial batch has shape {np.shape(x_adv)}, inputs {np.shape(x)}."
        )
    bad = threat_model_violations(x_adv, x, eps, norm)
    if any(bad.values()):
        raise AttackInvariantError(
            f"{name}: {bad['ball']} example(s) outside the {norm} ball of radius {eps}, "
            f"{bad['box']} outside [0, 1], {bad['finite']} non-finite; this is a bug in the "
            "attack (its final projection was skipped)."
        )
