"""`es`: the attack Tramer et al. (2020, "On Adaptive Attacks to Adversarial Example
Defenses", the k-WTA case study) ran against k-Winners-Take-All.

k-WTA makes the loss surface piecewise constant at small scales, so its exact gradient says
little about where the loss goes at the scale of eps. The attack instead follows the gradient
of a *smoothed* model, ``E_u L(x + sigma u)`` with ``u ~ N(0, I)`` and ``sigma = eps``,
estimated from forward passes only with antithetic Gaussian pairs. It is signed PGD (steepest
ascent for the norm; 100 steps of eps / 3) on the margin loss ``max_{j != y} z_j - z_y``, and
stops moving an example as soon as it is misclassified.

The sample count ramps up when progress stalls, per example (the literature's 100 -> 1,000 ->
20,000). A schedule is a tuple of levels ``(pairs, patience)``: every example starts at the
first level; after ``patience`` consecutive steps at its level without a new best margin (on
the attacked model, at the iterate) it moves to the next level, and after the last level's
``patience`` it gives up (stops, keeping its best iterate). So an example that progresses stays
cheap, one that stalls gets a better estimate, and one stalled at the top stops costing.

Cost: a step of an example at a level with ``n`` pairs is ``2 n`` forward passes (no backward
pass). Only the examples still running are computed: per level, they are gathered and padded to
the smallest of a few bucket sizes (`bucket_sizes`, a ``lax.switch``), so a step costs in
proportion to the examples left at each level, with exactly that level's number of pairs, in
blocks of at most ``block_size`` (pair, example) evaluations that bound memory
(`gradients.antithetic_sums`). A block's pair count divides every level's (their greatest
common divisor bounds it: choose pair counts with a large one, e.g. multiples of 100), so each
bucket compiles one forward shape whatever the schedule. An example's noise depends only on the
key, the step and its level, not on the other examples of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax

from kwta_jax.attacks import gradients
from kwta_jax.attacks.losses import LossFn, get_loss, margin
from kwta_jax.attacks.pgd import keep_best
from kwta_jax.attacks.projections import (
    ascent_direction,
    batch_broadcast,
    check_norm,
    project,
    random_init,
)

__all__ = [
    "ES_SCHEDULE",
    "ES_SCHEDULE_CPU",
    "ESTrace",
    "bucket_sizes",
    "check_es_schedule",
    "es",
    "es_trace",
]

# (antithetic pairs, patience) levels. `ES_SCHEDULE`: the literature's ramp 100 -> 1,000 ->
# 20,000, and an example stalled at 20,000 runs to the end of its 100 steps (a patience of 100
# never runs out); sized for an accelerator. `ES_SCHEDULE_CPU`: the strong budget's, sized for
# the images a CPU cascade leaves (docs/attacks.md has its cost and strength).
ES_SCHEDULE: tuple[tuple[int, int], ...] = ((100, 5), (1000, 5), (20000, 100))
ES_SCHEDULE_CPU: tuple[tuple[int, int], ...] = ((100, 5), (2000, 5))


class ESTrace(NamedTuple):
    """Per-example account of an `es` run (all ``[B]``).

    ``pairs``: antithetic pairs evaluated (``2 * pairs`` forward passes, padding excluded);
    ``level``: the last schedule level reached; ``steps``: steps taken (moves of the iterate);
    ``gave_up``: stopped stalled at the last level; ``broken``: misclassified at the end.
    """

    pairs: jax.Array
    level: jax.Array
    steps: jax.Array
    gave_up: jax.Array
    broken: jax.Array


def check_es_schedule(schedule: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """The schedule as a tuple of ``(pairs >= 1, patience >= 1)`` levels, or a ValueError."""
    try:
        levels = tuple((int(pairs), int(patience)) for pairs, patience in schedule)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"es: schedule must be (pairs, patience) levels; got {schedule!r}."
        ) from err
    if not levels or any(pairs < 1 or patience < 1 for pairs, patience in levels):
        raise ValueError(
            f"es: schedule needs (pairs >= 1, patience >= 1) levels; got {schedule!r}."
        )
    return levels


def bucket_sizes(batch: int, smallest: int = 1) -> tuple[int, ...]:
    """The padded sizes a level's running examples are computed at: ``batch``, then halved
    (rounded up) down to ``smallest``; ascending."""
    sizes = {batch}
    while batch > smallest:
        batch = max(smallest, -(-batch // 2))
        sizes.add(batch)
    return tuple(sorted(sizes))


def _running_gradient(sums, x, y, key, mask, pairs, sizes, block_for):
    """The antithetic sum over ``pairs`` pairs (traced) of the examples where ``mask``, gathered
    and padded to the smallest fitting size of ``sizes``: ``[B, ...]``, zero where not ``mask``
    (unnormalised: a step only uses its direction). ``sums(x, y, key, block, n_blocks)`` is
    `gradients.antithetic_sums`; ``block_for(size)`` the pairs per block at a size (a divisor
    of every level's pairs)."""
    count = jnp.sum(mask)
    order = jnp.argsort(~mask, stable=True)  # the masked examples first, in batch order

    def at_size(size):
        def run(_):
            idx = order[:size]
            block = block_for(size)
            g, _ = sums(x[idx], y[idx], key, block, pairs // block)
            g = g * batch_broadcast(jnp.arange(size) < count, g)
            return jnp.zeros_like(x).at[idx].set(g)

        return run

    branch = jnp.where(count == 0, 0, jnp.searchsorted(jnp.asarray(sizes), count) + 1)
    return lax.switch(branch, [lambda _: jnp.zeros_like(x)] + [at_size(s) for s in sizes], None)


def es_trace(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    schedule: Sequence[tuple[int, int]] = ES_SCHEDULE,
    steps: int = 100,
    step_size: float | None = None,
    sigma: float | None = None,
    block_size: int = 4096,
    loss: str | LossFn = "margin",
    random_start: bool = False,
    smallest_bucket: int = 1,
) -> tuple[jax.Array, ESTrace]:
    """Signed PGD with an antithetic Gaussian estimate of the smoothed model's gradient, the
    sample count ramped per example when it stalls (module docstring).

    Args:
      logits_fn: ``[B, ...] float32 -> [B, classes]``, only ever called forward.
      x: ``[B, H, W, C]`` float32 in [0, 1]. y: ``[B]`` int labels. key: PRNG key.
      eps: radius of the ``norm`` ball (``"linf"``: sign steps; ``"l2"``: normalised steps).
      schedule: static ``((pairs, patience), ...)`` levels (`check_es_schedule`; `ES_SCHEDULE`
        is the literature's ramp).
      steps: iterations (each example moves at most this many times).
      step_size: default ``eps / 3``.
      sigma: smoothing scale, default ``eps``.
      block_size: at most this many (pair, example) evaluations per forward batch (unless one
        pair of a bucket is more): peak memory ~ ``2 * max(block_size, B)`` inputs and their
        activations.
      loss: maximised loss, default the margin ``max_{j != y} z_j - z_y``.
      random_start: start uniformly in the ball instead of at ``x``.
      smallest_bucket: the smallest padded size a level's running examples are computed at
        (`bucket_sizes`; each size compiles its own forward pass).

    Returns:
      ``(x_adv, trace)``: ``x_adv`` like ``x``, inside the eps-ball ∩ [0, 1] (an example's
      first misclassified iterate, where it is frozen, else its iterate of largest margin);
      ``trace`` the per-example account, `ESTrace`.
    """
    check_norm(norm)
    chex.assert_rank(y, 1)
    chex.assert_equal_shape_prefix((x, y), 1)
    levels = check_es_schedule(schedule)
    if steps < 1 or block_size < 1 or smallest_bucket < 1:
        raise ValueError(
            "es: need steps >= 1, block_size >= 1, smallest_bucket >= 1; got "
            f"{steps}, {block_size}, {smallest_bucket}."
        )
    sigma = eps if sigma is None else sigma
    step_size = eps / 3 if step_size is None else step_size
    loss_fn = get_loss(loss)
    pairs_at = jnp.asarray([n for n, _ in levels], jnp.int32)
    patience = jnp.asarray([p for _, p in levels], jnp.int32)
    top = len(levels) - 1
    sizes = bucket_sizes(x.shape[0], min(smallest_bucket, x.shape[0]))
    # One block size per bucket, dividing every level's pair count: each bucket compiles one
    # forward shape whatever the levels, and every level runs exactly its pairs.
    common = math.gcd(*(n for n, _ in levels))
    block_for = lambda size: gradients.largest_divisor(common, block_size // size)

    def sums(x_, y_, key_, block, n_blocks):
        return gradients.antithetic_sums(
            logits_fn, loss_fn, x_, y_, key_, sigma=sigma, block=block, n_blocks=n_blocks
        )

    k_init, k_steps = jax.random.split(key)
    b = y.shape[0]

    def step(i, carry):
        x_adv, best_x, best_m, level, stall, level_best, gave_up, pairs, moves = carry
        logits = logits_fn(x_adv)
        m = margin(logits, y)
        best_x, best_m = keep_best(best_x, best_m, x_adv, logits, y)
        done = m > 0  # misclassified: frozen from now on
        # Stall bookkeeping: a new best margin at this level resets the count; `patience`
        # steps without one move the example up a level (or, at the top, stop it).
        improved = m > level_best
        stall = jnp.where(improved, 0, stall + 1)
        level_best = jnp.maximum(level_best, m)
        promote = ~done & ~gave_up & (stall >= patience[level])
        gave_up = gave_up | (promote & (level == top))
        up = promote & (level < top)
        level = jnp.where(up, level + 1, level)
        stall = jnp.where(promote, 0, stall)
        level_best = jnp.where(up, m, level_best)
        running = ~done & ~gave_up

        k_step = jax.random.fold_in(k_steps, i)

        def add_level(j, g):
            at_level = running & (level == j)
            g_j = _running_gradient(
                sums, x_adv, y, jax.random.fold_in(k_step, j), at_level, pairs_at[j], sizes,
                block_for,
            )  # fmt: skip
            return g + g_j

        g = lax.fori_loop(0, len(levels), add_level, jnp.zeros_like(x))
        x_new = project(x_adv + step_size * ascent_direction(g, norm), x, eps, norm)
        x_adv = jnp.where(batch_broadcast(running, x), x_new, x_adv)
        pairs = pairs + jnp.where(running, pairs_at[level], 0)
        moves = moves + running.astype(jnp.int32)
        return x_adv, best_x, best_m, level, stall, level_best, gave_up, pairs, moves

    x0 = random_init(k_init, x, eps, norm) if random_start else x
    zeros = jnp.zeros((b,), jnp.int32)
    init = (
        x0,
        x,
        jnp.full((b,), -jnp.inf, jnp.float32),
        zeros,
        zeros,
        jnp.full((b,), -jnp.inf, jnp.float32),
        jnp.zeros((b,), bool),
        zeros,
        zeros,
    )
    x_adv, best_x, best_m, level, _, _, gave_up, pairs, moves = lax.fori_loop(0, steps, step, init)
    best_x, best_m = keep_best(best_x, best_m, x_adv, logits_fn(x_adv), y)
    x_best = lax.stop_gradient(project(best_x, x, eps, norm))
    return x_best, ESTrace(pairs, level, moves, gave_up, best_m > 0)


def es(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    **options,
) -> jax.Array:
    """`es_trace` without the account: ``x_adv`` like ``x``, inside the eps-ball ∩ [0, 1].
    ``options``: `es_trace`'s (``norm``, ``schedule``, ``steps``, ...)."""
    return es_trace(logits_fn, x, y, key, eps=eps, **options)[0]
