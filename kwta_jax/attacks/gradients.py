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
* `finite_differences_blocked` — the same estimate with memory bounded by a block of samples
  (a ``lax.scan`` accumulates the sum), for the thousands of samples the `es` attack uses.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kwta_jax.attacks.losses import LogitsFn, LossFn, loss_and_grad

__all__ = [
    "Estimator",
    "autodiff",
    "eot",
    "finite_differences",
    "finite_differences_blocked",
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


def finite_differences_blocked(
    logits_fn: LogitsFn, loss_fn: LossFn, *, samples: int, sigma: float, block_size: int
) -> Estimator:
    """`finite_differences` with at most ``block_size`` antithetic pairs in memory at once.

    The ``samples`` pairs are drawn in ``ceil(samples / block)`` blocks of ``block =
    min(block_size, samples)`` (pairs past ``samples`` in the last block get weight 0), each
    block one batch of ``2 * block * B`` forward passes; a ``lax.scan`` over the blocks sums
    ``(L(x + sigma u) - L(x - sigma u)) u``, so peak memory does not grow with ``samples``.
    Block ``j`` draws its noise from ``fold_in(key, j)``.
    """
    # sigma may be traced (`es` sets it to eps, a traced argument of the suite's attacks).
    bad_sigma = isinstance(sigma, (int, float)) and sigma <= 0
    if samples < 1 or bad_sigma or block_size < 1:
        raise ValueError(
            "finite_differences_blocked: need samples >= 1, sigma > 0, block_size >= 1; got "
            f"{samples}, {sigma}, {block_size}."
        )
    block = min(block_size, samples)
    n_blocks = -(-samples // block)

    def estimate(x, y, key):
        b = x.shape[0]
        y2 = jnp.tile(y, 2 * block)

        def one_block(carry, j):
            grad_sum, loss_sum = carry
            u = jax.random.normal(jax.random.fold_in(key, j), (block,) + x.shape, x.dtype)
            xs = jnp.concatenate([x[None] + sigma * u, x[None] - sigma * u])
            losses = loss_fn(logits_fn(xs.reshape((2 * block * b,) + x.shape[1:])), y2)
            losses = losses.reshape(2, block, b)
            valid = (j * block + jnp.arange(block) < samples).astype(losses.dtype)[:, None]
            diff = (losses[0] - losses[1]) * valid  # [block, B]
            grad_sum = grad_sum + jnp.einsum("sb,sb...->b...", diff, u)
            loss_sum = loss_sum + jnp.sum((losses[0] + losses[1]) * valid, axis=0)
            return (grad_sum, loss_sum), None

        init = (jnp.zeros_like(x), jnp.zeros((b,), jnp.float32))
        (grad_sum, loss_sum), _ = jax.lax.scan(one_block, init, jnp.arange(n_blocks))
        return loss_sum / (2.0 * samples), grad_sum / (2.0 * sigma * samples), None

    return estimate
