"""Carlini-Wagner attacks (Carlini & Wagner 2017).

* `cw_l2`: the CW-L2 optimisation in tanh space, ``min ||x' - x||_2^2 + c * max(z_y -
  max_{j != y} z_j, -kappa)`` with Adam, a fixed trade-off ``c`` (no binary search, to keep
  the loop one `lax.fori_loop`), then projected onto the eps-ball to report accuracy at eps.
* `cw_pgd`: the CW margin loss under PGD (the variant RobustBench/AutoAttack-era papers run).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from jax import lax

from kwta_jax.attacks.losses import margin
from kwta_jax.attacks.pgd import gradient_attack
from kwta_jax.attacks.projections import lp_norm, project

__all__ = ["cw_l2", "cw_pgd"]


def cw_l2(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array | None = None,
    *,
    eps: float,
    steps: int = 100,
    c: float = 1.0,
    kappa: float = 0.0,
    learning_rate: float = 0.01,
) -> jax.Array:
    """CW-L2. ``x [B, H, W, C]`` in [0, 1], ``y [B]`` -> ``x_adv`` like ``x`` within L2 ``eps``.

    Keeps, per example, the iterate of largest margin among those inside the eps-ball (the
    unconstrained optimum may be larger than eps); deterministic (``key`` is ignored).
    """
    del key
    chex.assert_equal_shape_prefix((x, y), 1)
    # tanh space keeps every iterate in the box without clipping; 0.999999 avoids atanh(+-1).
    w0 = jnp.arctanh((2.0 * x - 1.0) * 0.999999)
    to_x = lambda w: 0.5 * (jnp.tanh(w) + 1.0)
    opt = optax.adam(learning_rate)

    def objective(w):
        x_w = to_x(w)
        logits = logits_fn(x_w)
        dist = jnp.sum(jnp.square(x_w - x).reshape(x.shape[0], -1), -1)
        hinge = jnp.maximum(-margin(logits, y), -kappa)
        return jnp.sum(dist + c * hinge), logits

    def step(_, carry):
        w, state, best_x, best_m = carry
        (_, logits), g = jax.value_and_grad(objective, has_aux=True)(w)
        x_w = to_x(w)
        m = jnp.where(lp_norm(x_w - x, "l2") <= eps, margin(logits, y), -jnp.inf)
        better = m > best_m
        best_x = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_w, best_x)
        best_m = jnp.where(better, m, best_m)
        updates, state = opt.update(g, state, w)
        return optax.apply_updates(w, updates), state, best_x, best_m

    init = (w0, opt.init(w0), x, jnp.full(y.shape, -jnp.inf, jnp.float32))
    w, _, best_x, best_m = lax.fori_loop(0, steps, step, init)
    # An example whose iterates all left the ball falls back to the last iterate, projected.
    fallback = project(to_x(w), x, eps, "l2")
    never = jnp.isneginf(best_m).reshape((-1,) + (1,) * (x.ndim - 1))
    return lax.stop_gradient(project(jnp.where(never, fallback, best_x), x, eps, "l2"))


def cw_pgd(logits_fn, x, y, key, *, eps: float, norm: str = "linf", **pgd_kwargs) -> jax.Array:
    """PGD on the CW margin loss; ``pgd_kwargs`` as in `pgd.gradient_attack`."""
    return gradient_attack(logits_fn, x, y, key, eps=eps, norm=norm, loss="margin", **pgd_kwargs)
