"""Progress bars without a UI dependency in the library.

Long library loops (an epoch of training, one attack over its chunks) report progress through a
bar factory that the caller passes as ``progress``: ``progress(total=..., desc=..., unit=...)``
returns a bar with ``update(n=1)``, ``set_postfix(**values)`` and ``close()``. ``tqdm`` is such a
factory (``functools.partial(tqdm, leave=False)`` too): the CLIs pass it, the library never
imports tqdm. ``None`` (or ``False``) means no bar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Bar", "MakeBar", "open_bar"]


class Bar(Protocol):
    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


MakeBar = Callable[..., Bar]


class _NoBar:
    """The bar of ``progress=None``: does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def open_bar(progress: MakeBar | None, *, total: int, desc: str, unit: str) -> Bar:
    """A bar from the caller's factory, or one that does nothing."""
    return progress(total=total, desc=desc, unit=unit) if progress else _NoBar()
