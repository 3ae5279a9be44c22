"""Square attack, L-inf (Andriushchenko et al. 2020; AutoAttack's gradient-free attack).

Random search: start from vertical stripes of ``+-eps``; at each query overwrite a random
square window (all channels, a random sign per channel) with ``+-eps`` and keep it for an
example if it increases the margin loss ``max_{j != y} z_j - z_y``. Examples already
misclassified stop changing. The window side shrinks with the query budget (the paper's
``p`` schedule). Uses only forward passes, so gradient masking cannot stop it.

Inputs of any rank are searched as images ``[B, H, W, C]``: ``[B, H, W]`` has one channel,
``[B, d]`` is one row of ``d`` features (its "squares" are runs of ``p d`` consecutive
features), and more than two inner axes are folded into the width.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kwta_jax.attacks.losses import margin
from kwta_jax.attacks.projections import project

__all__ = ["square", "square_fraction"]

# A NumPy constant: a module-level jnp array would start the JAX backend at import time.
_BOUNDS = np.asarray([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000])


def square_fraction(i, queries: int, p_init: float):
    """Fraction ``p`` of pixels in the window at query ``i``: ``p_init`` halved at each bound
    the query index passes, on a budget rescaled to 10,000 queries."""
    it = (i * 10000) // queries
    return p_init / 2.0 ** jnp.sum(it > _BOUNDS)


def square(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    queries: int = 1000,
    p_init: float = 0.8,
    norm: str = "linf",
    restarts: int = 1,
) -> jax.Array:
    """Square attack. ``x [B, ...]`` float32 in [0, 1] (images ``[B, H, W, C]``; see the
    module docstring for other ranks), ``y [B]`` -> ``x_adv`` like ``x``.

    ``queries``: model evaluations per example and restart (1 for the start, ``queries - 1``
    proposals). ``restarts``: independent runs (key ``fold_in(key, r)``; one run: ``key``
    itself); an example keeps the first run's point that misclassifies it, else the last
    run's. Only ``norm="linf"`` is implemented.
    """
    if norm != "linf":
        raise ValueError(f"square: only norm='linf' is implemented; got {norm!r}.")
    if restarts < 1:
        raise ValueError(f"square: restarts must be >= 1; got {restarts}.")
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    if x.ndim != 4:
        shape = x.shape
        as_image = (shape[0], 1, shape[1], 1) if x.ndim == 2 else \
            shape + (1,) if x.ndim == 3 else (shape[0], shape[1], -1, shape[-1])  # fmt: skip

        def image_logits_fn(v):
            return logits_fn(v.reshape(shape))

        x_adv = square(image_logits_fn, x.reshape(as_image), y, key, eps=eps, queries=queries,
                       p_init=p_init, norm=norm, restarts=restarts)  # fmt: skip
        return x_adv.reshape(shape)
    if restarts == 1:
        return _square_run(logits_fn, x, y, key, eps, queries, p_init)

    def restart(r, best):
        x_r = _square_run(logits_fn, x, y, jax.random.fold_in(key, r), eps, queries, p_init)
        broken = jnp.argmax(logits_fn(best), -1) != y
        return jnp.where(broken.reshape(-1, 1, 1, 1), best, x_r)

    return lax.fori_loop(1, restarts, restart, _square_run(
        logits_fn, x, y, jax.random.fold_in(key, 0), eps, queries, p_init))  # fmt: skip


def _square_run(logits_fn, x, y, key, eps, queries, p_init) -> jax.Array:
    """One Square run from a random vertical-stripes start."""
    norm = "linf"
    b, h, w, c = x.shape
    k_init, k_loop = jax.random.split(key)
    stripes = eps * jax.random.rademacher(k_init, (b, 1, w, c), x.dtype)
    x0 = project(x + stripes, x, eps, norm)
    m0 = margin(logits_fn(x0), y)
    rows = jnp.arange(h).reshape(1, h, 1, 1)
    cols = jnp.arange(w).reshape(1, 1, w, 1)

    def step(i, carry):
        x_cur, m_cur = carry
        k_pos, k_sign = jax.random.split(jax.random.fold_in(k_loop, i))
        p = square_fraction(i, queries, p_init)
        if min(h, w) > 1:
            side = jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w) - 1).astype(jnp.int32)
            side_h = side_w = side
        else:  # one row (or column) of features: a run of p * h * w of them
            run = jnp.clip(jnp.round(p * h * w), 1, max(h * w - 1, 1)).astype(jnp.int32)
            side_h, side_w = (1, run) if h == 1 else (run, 1)
        u = jax.random.uniform(k_pos, (2, b, 1, 1, 1))
        top = jnp.floor(u[0] * (h - side_h + 1)).astype(jnp.int32)
        left = jnp.floor(u[1] * (w - side_w + 1)).astype(jnp.int32)
        window = (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
        signs = eps * jax.random.rademacher(k_sign, (b, 1, 1, c), x.dtype)
        x_new = project(jnp.where(window, x + signs, x_cur), x, eps, norm)
        m_new = margin(logits_fn(x_new), y)
        accept = (m_new > m_cur) & (m_cur <= 0)
        sel = accept.reshape(b, 1, 1, 1)
        return jnp.where(sel, x_new, x_cur), jnp.where(accept, m_new, m_cur)

    x_adv, _ = lax.fori_loop(0, max(int(queries) - 1, 0), step, (x0, m0))
    return lax.stop_gradient(project(x_adv, x, eps, norm))
