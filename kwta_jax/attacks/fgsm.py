"""Single-step attacks: FGSM (Goodfellow et al. 2015; the original write-up's attack) and its
L2 version FGM."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
from jax import lax

from kwta_jax.attacks.losses import LossFn, get_loss, loss_and_grad
from kwta_jax.attacks.projections import ascent_direction, project

__all__ = ["fgm_l2", "fgsm"]


def fgsm(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array | None = None,
    *,
    eps: float,
    norm: str = "linf",
    loss: str | LossFn = "ce",
) -> jax.Array:
    """``clip(x + eps * sign(grad_x L), 0, 1)`` (L-inf) or ``x + eps * g / ||g||_2`` projected
    (L2, FGM). Deterministic; ``key`` is accepted for the common attack signature.

    Shapes: ``x [B, H, W, C]`` float32 in [0, 1], ``y [B]`` int -> ``x_adv`` like ``x``.
    """
    del key
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    _, g, _ = loss_and_grad(logits_fn, get_loss(loss), x, y)
    return lax.stop_gradient(project(x + eps * ascent_direction(g, norm), x, eps, norm))


def fgm_l2(logits_fn, x, y, key=None, *, eps: float, loss: str | LossFn = "ce") -> jax.Array:
    """FGM: `fgsm` with ``norm="l2"``."""
    return fgsm(logits_fn, x, y, key, eps=eps, norm="l2", loss=loss)
