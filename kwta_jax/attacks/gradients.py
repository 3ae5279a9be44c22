"""Gradient estimators: where an iterative attack gets its ascent direction from.

An estimator is ``estimator(x_adv, y, key) -> (loss [B], grad [B, ...], logits [B, C] | None)``.
``logits`` are the *attacked* model's logits at ``x_adv`` when the estimator computed them as a
by-product (plain autodiff), else ``None`` and the attack evaluates the model itself: an attack
always judges success on the true model, whatever model or estimate it takes gradients from.

* `autodiff` — exact white-box gradient of the model (PGD, APGD, MIM, FGSM).
* `surrogate` — gradient of another function: a BPDA copy of the model (k-WTA forward,
  smooth backward; Athalye et al. 2018) or another model (transfer attack).
* `eot` — Expectation over Transformation: gradient averaged over Gaussian-perturbed inputs,
  which smooths a discontinuous loss surface.
* `finite_differences` — gradient-free estimate from antithetic Gaussian queries (NES; the
  estimator Tramer et al. 2020 used against k-WTA). Only forward passes of the model.
* `finite_differences_blocked` — the same estimate for thousands of pairs: `antithetic_sums`
  evaluates them in blocks (memory bounded, a loop accumulates the sum) with one noise draw per
  pair shared by the batch; `es` calls `antithetic_sums` on the examples it still attacks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kwta_jax.attacks.losses import LogitsFn, LossFn, loss_and_grad

__all__ = [
    "Estimator",
    "antithetic_sums",
    "autodiff",
    "eot",
    "finite_differences",
    "finite_differences_blocked",
    "largest_divisor",
    "pairs_per_block",
    "surrogate",
]

Estimator = Callable[[jax.Array, jax.Array, jax.Array], tuple]


def autodiff(logits_fn: LogitsFn, loss_fn: LossFn) -> Estimator:
    """Exact input gradient of ``loss_fn(logits_fn(x), y)``."""

    def estimate(x, y, key):
        del key
        return loss_and_grad(logits_fn, loss_fn, x, y)

    return estimate


def surrogate(grad_logits_fn: LogitsFn, loss_fn: LossFn) -> Estimator:
    """Gradient of the loss of ``grad_logits_fn`` (a BPDA model or a transfer source); the
    attacked model is queried separately by the attack."""

    def estimate(x, y, key):
        del key
        loss, grad, _ = loss_and_grad(grad_logits_fn, loss_fn, x, y)
        return loss, grad, None

    return estimate


def eot(logits_fn: LogitsFn, loss_fn: LossFn, *, samples: int, sigma: float) -> Estimator:
    """``mean_i grad L(x + sigma * n_i)``, ``n_i ~ N(0, I)``, ``samples`` draws per step.

    The draws are evaluated as one batch of ``samples * B`` inputs (memory grows with
    ``samples``; the evaluation chunks the example axis to bound it).
    """
    if samples < 1 or sigma < 0:
        raise ValueError(f"eot: need samples >= 1 and sigma >= 0; got {samples}, {sigma}.")

    def estimate(x, y, key):
        noise = sigma * jax.random.normal(key, (samples,) + x.shape, x.dtype)
        xs = (x[None] + noise).reshape((samples * x.shape[0],) + x.shape[1:])
        loss, grad, _ = loss_and_grad(logits_fn, loss_fn, xs, jnp.tile(y, samples))
        mean = lambda v: v.reshape((samples,) + x.shape[:1] + v.shape[1:]).mean(0)
        return mean(loss), mean(grad), None

    return estimate


def finite_differences(
    logits_fn: LogitsFn, loss_fn: LossFn, *, samples: int, sigma: float
) -> Estimator:
    """Antithetic Gaussian finite differences (NES, Ilyas et al. 2018):

    ``g = 1 / (2 sigma n) * sum_i (L(x + sigma u_i) - L(x - sigma u_i)) u_i``, ``u_i ~ N(0, I)``,
    ``n = samples`` pairs (``2n`` forward passes per step, no backward pass). Unbiased for the
    gradient of the Gaussian-smoothed loss, so it sees through a discontinuous activation.
    """
    if samples < 1 or sigma <= 0:
        raise ValueError(
            f"finite_differences: need samples >= 1 and sigma > 0; got {samples}, {sigma}."
        )

    def estimate(x, y, key):
        b, d = x.shape[0], int(np.prod(x.shape[1:]))
        u = jax.random.normal(key, (samples, b, d), x.dtype)
        xs = jnp.concatenate([x.reshape(1, b, d) + sigma * u, x.reshape(1, b, d) - sigma * u])
        losses = loss_fn(
            logits_fn(xs.reshape((2 * samples * b,) + x.shape[1:])), jnp.tile(y, 2 * samples)
        ).reshape(2, samples, b)
        diff = losses[0] - losses[1]  # [samples, B]
        grad = jnp.einsum("sb,sbd->bd", diff, u) / (2.0 * sigma * samples)
        return 0.5 * (losses[0] + losses[1]).mean(0), grad.reshape(x.shape), None

    return estimate


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n >= 1`` that is at most ``cap`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def pairs_per_block(samples: int, block_size: int, batch: int) -> tuple[int, int]:
    """``(pairs per block, blocks)`` for ``samples`` antithetic pairs on ``batch`` examples with
    at most ``max(block_size, batch)`` (pair, example) evaluations per block: the largest block
    that divides ``samples`` if it is at least half the cap, else the cap (the last block then
    holds the remainder). Every one of the ``samples`` pairs is evaluated exactly once."""
    cap = max(1, min(samples, block_size // max(batch, 1)))
    divisor = largest_divisor(samples, cap)
    block = divisor if 2 * divisor >= cap else cap
    return block, -(-samples // block)


def antithetic_sums(
    logits_fn: LogitsFn,
    loss_fn: LossFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    sigma,
    block: int,
    n_blocks,
    first=0,
) -> tuple[jax.Array, jax.Array]:
    """``(sum_i (L(x + sigma u_i) - L(x - sigma u_i)) u_i [B, ...], sum_i of both losses [B])``
    over the pairs ``first <= i < first + block * n_blocks``, ``block`` pairs (``2 * block * B``
    forward passes) at a time. ``u_i ~ N(0, I)`` of one example's shape is drawn from
    ``fold_in(key, i)`` and shared by every example of the batch, so an example's sums depend on
    its own input, the key and the pair indices only. ``n_blocks`` and ``first`` may be traced
    (a ``while`` loop then runs the blocks)."""
    b, shape = x.shape[0], x.shape[1:]
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, x.dtype)

    def one_block(j, carry):
        u = jax.vmap(draw)(first + j * block + jnp.arange(block))  # [block, ...]
        xs = jnp.stack([x[None] + sigma * u[:, None], x[None] - sigma * u[:, None]])
        logits = logits_fn(xs.reshape((2 * block * b,) + shape))
        losses = loss_fn(logits, jnp.tile(y, 2 * block)).reshape(2, block, b)
        diff = (losses[0] - losses[1]).astype(x.dtype)  # [block, B]
        grad = (diff.T @ u.reshape(block, -1)).reshape(x.shape)
        return carry[0] + grad, carry[1] + jnp.sum(losses[0] + losses[1], axis=0)

    init = (jnp.zeros_like(x), jnp.zeros((b,), jnp.float32))
    return jax.lax.fori_loop(0, n_blocks, one_block, init)


def finite_differences_blocked(
    logits_fn: LogitsFn, loss_fn: LossFn, *, samples: int, sigma: float, block_size: int
) -> Estimator:
    """`finite_differences` for thousands of pairs: memory bounded, noise shared by the batch.

    `antithetic_sums` over exactly ``samples`` pairs in blocks (`pairs_per_block`: at most
    ``max(block_size, B)`` (pair, example) evaluations, i.e. ``2 * max(block_size, B)`` forward
    passes, at once). Pair ``i``'s noise comes from ``fold_in(key, i)`` and is shared by the
    batch: an example's estimate does not depend on the batch it is in, nor on the blocking.

    Returns ``(mean loss over the 2 * samples queries [B], grad like x, None)``.
    """
    # sigma may be traced (`es` sets it to eps, a traced argument of the suite's attacks).
    bad_sigma = isinstance(sigma, (int, float)) and sigma <= 0
    if samples < 1 or bad_sigma or block_size < 1:
        raise ValueError(
            "finite_differences_blocked: need samples >= 1, sigma > 0, block_size >= 1; got "
            f"{samples}, {sigma}, {block_size}."
        )

    def estimate(x, y, key):
        block, n_blocks = pairs_per_block(samples, block_size, x.shape[0])
        full = samples // block
        sums = functools.partial(antithetic_sums, logits_fn, loss_fn, x, y, key, sigma=sigma)
        grad_sum, loss_sum = sums(block=block, n_blocks=full)
        if n_blocks > full:  # the remainder, its own (smaller) block
            grad, loss = sums(block=samples - full * block, n_blocks=1, first=full * block)
            grad_sum, loss_sum = grad_sum + grad, loss_sum + loss
        return loss_sum / (2.0 * samples), grad_sum / (2.0 * sigma * samples), None

    return estimate
