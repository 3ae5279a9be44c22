"""DeepFool (Moosavi-Dezfooli et al. 2016), L2 and L-inf.

Iteratively linearises every logit difference ``f_k = z_k - z_y`` and steps to the nearest
linearised decision boundary: ``r = (|f_l| + 1e-4) / ||w_l||_q^q * |w_l|^(q-1) sign(w_l)``
with ``w_l = grad f_l`` and ``q`` the dual norm (L2: ``q = 2``; L-inf: ``q = 1``, i.e.
``r = (|f_l| + 1e-4) / ||w_l||_1 * sign(w_l)``). DeepFool looks for a *minimal* perturbation;
to report accuracy at a radius the final point is projected onto the eps-ball ∩ [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from kwta_jax.attacks.projections import check_norm, project

__all__ = ["deepfool"]


def _logits_and_jacobian(logits_fn, x):
    """``(logits [B, C], jac [C, B, ...])``: one forward pass, one VJP per class."""
    logits, vjp = jax.vjp(logits_fn, x)
    eye = jnp.eye(logits.shape[-1], dtype=logits.dtype)
    cotangents = jnp.broadcast_to(eye[:, None, :], (eye.shape[0],) + logits.shape)
    (jac,) = jax.vmap(vjp)(cotangents)
    return logits, jac


def deepfool(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array | None = None,
    *,
    eps: float,
    steps: int = 50,
    overshoot: float = 0.02,
    norm: str = "l2",
) -> jax.Array:
    """DeepFool. ``x [B, H, W, C]`` float32 in [0, 1], ``y [B]`` -> ``x_adv`` like ``x``.

    Deterministic (``key`` is ignored). Examples stop moving once misclassified. Costs one
    forward pass and ``classes`` backward passes per step.
    """
    del key
    check_norm(norm)
    chex.assert_equal_shape_prefix((x, y), 1)
    b = x.shape[0]

    def step(_, r_tot):
        x_i = jnp.clip(x + (1.0 + overshoot) * r_tot, 0.0, 1.0)
        logits, jac = _logits_and_jacobian(logits_fn, x_i)
        num_classes = logits.shape[-1]
        jac = jac.reshape(num_classes, b, -1)
        onehot = jax.nn.one_hot(y, num_classes, dtype=bool)  # [B, C]
        z_y = jnp.sum(jnp.where(onehot, logits, 0.0), -1)
        f = logits - z_y[:, None]  # [B, C]
        w = jac - jnp.take_along_axis(jac, y[None, :, None], axis=0)  # [C, B, d]
        dual = jnp.abs(w).sum(-1) if norm == "linf" else jnp.sqrt((w**2).sum(-1))  # [C, B]
        dist = jnp.where(onehot.T, jnp.inf, jnp.abs(f).T / jnp.maximum(dual, 1e-12))
        nearest = jnp.argmin(dist, axis=0)  # [B]
        w_l = jnp.take_along_axis(w, nearest[None, :, None], axis=0)[0]  # [B, d]
        f_l = jnp.abs(jnp.take_along_axis(f, nearest[:, None], axis=1)[:, 0])
        n_l = jnp.take_along_axis(dual, nearest[None], axis=0)[0]
        if norm == "linf":
            r = ((f_l + 1e-4) / jnp.maximum(n_l, 1e-12))[:, None] * jnp.sign(w_l)
        else:
            r = ((f_l + 1e-4) / jnp.maximum(n_l**2, 1e-12))[:, None] * w_l
        still_correct = (jnp.argmax(logits, -1) == y)[:, None]
        return r_tot + jnp.where(still_correct, r, 0.0).reshape(x.shape)

    r_tot = lax.fori_loop(0, steps, step, jnp.zeros_like(x))
    return lax.stop_gradient(project(x + (1.0 + overshoot) * r_tot, x, eps, norm))
