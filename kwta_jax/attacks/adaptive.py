"""Adaptive attacks against gradient masking, as Tramer et al. (2020) ran against k-WTA.

All are `pgd.gradient_attack` (or `apgd.apgd`) with another gradient estimator; success is
always judged on the attacked ``logits_fn``:

* `bpda` — gradients of a BPDA copy of the model: k-WTA forward, a smooth surrogate
  (identity or ReLU) backward. Build it with ``layers.set_kwta_backward(nnx.clone(model),
  "identity")``; it shares the trained weights.
* `eot_pgd` — gradients averaged over Gaussian-perturbed inputs (EOT / randomized smoothing
  of the loss surface).
* `gradient_free` — antithetic Gaussian finite differences of the margin loss: forward passes
  only.
* `transfer` — PGD on a surrogate model (e.g. the ReLU model trained alike), applied to the
  target.
"""

from __future__ import annotations

import jax

from kwta_jax.attacks import gradients
from kwta_jax.attacks.apgd import apgd
from kwta_jax.attacks.losses import LogitsFn, LossFn, get_loss
from kwta_jax.attacks.pgd import gradient_attack

__all__ = ["bpda", "bpda_apgd", "eot_pgd", "gradient_free", "transfer"]


def bpda(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    bpda_logits_fn: LogitsFn,
    loss: str | LossFn = "ce",
    **pgd_kwargs,
) -> jax.Array:
    """PGD with gradients of ``bpda_logits_fn`` (same forward as ``logits_fn``, smooth
    backward). ``pgd_kwargs``: steps, step_size, norm, restarts, schedule, random_start."""
    est = gradients.surrogate(bpda_logits_fn, get_loss(loss))
    return gradient_attack(logits_fn, x, y, key, eps=eps, estimator=est, **pgd_kwargs)


def bpda_apgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    bpda_logits_fn: LogitsFn,
    loss: str | LossFn = "ce",
    **apgd_kwargs,
) -> jax.Array:
    """APGD with BPDA gradients (``apgd_kwargs``: steps, norm, restarts, rho, alpha)."""
    est = gradients.surrogate(bpda_logits_fn, get_loss(loss))
    return apgd(logits_fn, x, y, key, eps=eps, estimator=est, **apgd_kwargs)


def transfer(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    source_logits_fn: LogitsFn,
    loss: str | LossFn = "ce",
    **pgd_kwargs,
) -> jax.Array:
    """Transfer attack: PGD on ``source_logits_fn``; among its iterates the one most
    adversarial for the target ``logits_fn`` is returned."""
    est = gradients.surrogate(source_logits_fn, get_loss(loss))
    return gradient_attack(logits_fn, x, y, key, eps=eps, estimator=est, **pgd_kwargs)


def eot_pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    samples: int = 8,
    sigma: float = 0.05,
    loss: str | LossFn = "ce",
    **pgd_kwargs,
) -> jax.Array:
    """PGD with the EOT gradient ``mean_i grad L(x + sigma n_i)`` over ``samples`` draws."""
    est = gradients.eot(logits_fn, get_loss(loss), samples=samples, sigma=sigma)
    return gradient_attack(logits_fn, x, y, key, eps=eps, estimator=est, **pgd_kwargs)


def gradient_free(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    samples: int = 16,
    sigma: float = 0.01,
    loss: str | LossFn = "margin",
    **pgd_kwargs,
) -> jax.Array:
    """PGD with antithetic finite-difference gradients of the margin loss (``2 * samples``
    forward passes per step, no backward pass; Tramer et al. 2020, Sec. on k-WTA)."""
    est = gradients.finite_differences(logits_fn, get_loss(loss), samples=samples, sigma=sigma)
    return gradient_attack(logits_fn, x, y, key, eps=eps, estimator=est, **pgd_kwargs)
