"""Per-example attack losses on logits; every loss is *maximised* by the attacker.

All functions map ``logits: [B, C]`` float and ``y: [B]`` int to ``[B]`` float32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "LOSSES",
    "LogitsFn",
    "LossFn",
    "cross_entropy",
    "dlr",
    "dlr_targeted",
    "get_loss",
    "margin",
    "loss_and_grad",
    "top_other_classes",
]

# The model as attacks see it: ``[B, H, W, C]`` float32 images in [0, 1] -> ``[B, classes]``
# logits. Defined here, the lowest module of the package, so every attack and the suite runner
# share one alias.
LogitsFn = Callable[[jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _true_and_best_other(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(z_y [B], max_{j != y} z_j [B])``."""
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(y, num_classes, dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return z_y, z_other


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy ``-log softmax(z)_y``; ``[B, C], [B] -> [B]``.

    Computed as ``softplus(a)``, ``a = logsumexp_{j != y} (z_j - z_y)``: the same quantity
    without cancellation. Through ``log_softmax`` a confident image (``p_y`` within ~6e-8 of
    1) rounds ``p_y`` to 1 in float32: the true class's derivative ``-(1 - p_y)`` becomes 0
    while the others' ``p_j`` do not, and the input gradient's sign flips on many pixels. Here
    the derivative is ``-sigmoid(a) = -(1 - p_y)`` for ``z_y`` and ``p_j`` for the others,
    each to float32 relative precision.
    """
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    others = jax.nn.logsumexp(logits - z_y[:, None], axis=-1, where=~onehot)
    return jax.nn.softplus(others)


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y``: positive iff misclassified."""
    z_y, z_other = _true_and_best_other(logits.astype(jnp.float32), y)
    return z_other - z_y


def dlr(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Difference of Logits Ratio (Croce & Hein 2020), the loss of APGD-DLR.

    ``-(z_y - max_{j != y} z_j) / (z_(1) - z_(3) + 1e-12)`` with ``z_(i)`` the sorted logits:
    invariant to shifting and scaling the logits, so logit rescaling cannot mask it.
    Needs at least 3 classes.
    """
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] < 3:
        raise ValueError(f"dlr: needs at least 3 classes; got {logits.shape[-1]}.")
    z_y, z_other = _true_and_best_other(logits, y)
    top3 = jax.lax.top_k(logits, 3)[0]
    return (z_other - z_y) / (top3[:, 0] - top3[:, 2] + 1e-12)


def dlr_targeted(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
    """Targeted DLR (Croce & Hein 2020, the loss of APGD-T); ``[B, C], [B], [B] -> [B]``.

    ``-(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)`` with ``z_(i)`` the sorted logits:
    maximised, it pushes the target logit ``z_t`` above the true one; like `dlr` it is invariant
    to shifting and scaling the logits. Needs at least 4 classes. Not in `LOSSES` (it takes the
    target too): pass ``functools.partial(dlr_targeted, target=t)`` where a loss is expected.
    """
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] < 4:
        raise ValueError(f"dlr_targeted: needs at least 4 classes; got {logits.shape[-1]}.")
    z_y = jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=-1)[:, 0]
    z_t = jnp.take_along_axis(logits, target[:, None].astype(jnp.int32), axis=-1)[:, 0]
    top4 = jax.lax.top_k(logits, 4)[0]
    return (z_t - z_y) / (top4[:, 0] - 0.5 * (top4[:, 2] + top4[:, 3]) + 1e-12)


def top_other_classes(logits: jax.Array, y: jax.Array, n: int) -> jax.Array:
    """The ``n`` classes other than ``y`` with the largest logits, best first: ``[B, C], [B] ->
    [B, n]`` int32 (the target classes of APGD-T and FAB-T, ranked on the clean logits)."""
    if not 1 <= n < logits.shape[-1]:
        raise ValueError(f"top_other_classes: need 1 <= n < {logits.shape[-1]}; got {n}.")
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    return jax.lax.top_k(jnp.where(onehot, -jnp.inf, logits.astype(jnp.float32)), n)[1]


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "margin": margin, "cw": margin, "dlr": dlr}


def get_loss(loss: str | LossFn) -> LossFn:
    """A loss function from its name (a key of `LOSSES`) or the function itself."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {sorted(LOSSES)}.")
    return LOSSES[loss]


def loss_and_grad(
    logits_fn: Callable[[jax.Array], jax.Array], loss_fn: LossFn, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example loss, its input gradient and the logits, in one forward/backward pass.

    Examples are independent (the model is in eval mode and k-WTA competes within a sample),
    so the gradient of the summed loss is the per-example gradient.

    Returns:
      ``(loss [B] float32, grad [B, ...] like x, logits [B, C])``.
    """

    def total(x_):
        logits = logits_fn(x_)
        per_example = loss_fn(logits, y)
        return jnp.sum(per_example), (per_example, logits)

    (_, (per_example, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
    return per_example, grad, logits
