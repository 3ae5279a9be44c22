"""A scope that swaps the backward pass of every library k-WTA for a BPDA surrogate.

Adaptive attacks on k-WTA (Tramer et al. 2020) differentiate a *twin* of the model: the same
forward pass, with each k-WTA's derivative replaced by a smooth surrogate's (BPDA, Athalye et
al. 2018). Inside ``with kwta_backward("identity"):`` every `kwta_jax.kwta` that is *traced*
computes `kwta_jax.kwta_bpda` instead, so the twin of any model — an NNX or linen module, or a
pure function — needs no argument threaded through the user's code:

    def bpda_apply(params, x):
        with kwta_backward("identity"):
            return apply(params, x)

The scope is read at trace time: enter it inside the function that `jax.jit` traces (as
above), not around a call of an already compiled function, whose cached trace would not see
it; for the same reason a k-WTA inside a sub-function the model itself wraps in `jax.jit` is
not reached (Flax modules do not do that; plain functions should not). The scope also counts
the k-WTA ops it reached (`BackwardScope.calls`), which tells whether a model contains any.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

__all__ = ["BACKWARDS", "SURROGATES", "BackwardScope", "active_scope", "kwta_backward"]

SURROGATES: tuple[str, ...] = ("identity", "relu")
# What a KWTA layer's ``backward`` attribute accepts: the exact derivative or a surrogate.
BACKWARDS: tuple[str, ...] = ("exact",) + SURROGATES


@dataclasses.dataclass
class BackwardScope:
    """An active `kwta_backward` scope: its ``surrogate`` and how many k-WTA ops it reached."""

    surrogate: str
    calls: int = 0


_SCOPE: contextvars.ContextVar[BackwardScope | None] = contextvars.ContextVar(
    "kwta_jax_backward_scope", default=None
)


@contextlib.contextmanager
def kwta_backward(surrogate: str = "identity") -> Iterator[BackwardScope]:
    """Within the scope, every traced `kwta_jax.kwta` uses ``surrogate``'s derivative.

    Args:
      surrogate: ``"identity"`` or ``"relu"`` (see `kwta_jax.kwta_bpda`).

    Yields:
      The `BackwardScope`; its ``calls`` counts the k-WTA ops traced inside it.
    """
    if surrogate not in SURROGATES:
        raise ValueError(
            f"kwta_backward: surrogate must be one of {SURROGATES}; got {surrogate!r}."
        )
    scope = BackwardScope(surrogate)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def active_scope() -> BackwardScope | None:
    """The innermost active `kwta_backward` scope, or ``None``."""
    return _SCOPE.get()
