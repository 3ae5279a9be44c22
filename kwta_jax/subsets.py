"""Which test examples an evaluation uses.

Test splits are often sorted by class (mnist5k's is: its first 500 images are the digits
0-4, its first 100 all zeros), so "the first N" measures a few classes. `stratified_indices`
draws a fixed, seed-determined, class-balanced subset instead; `first_indices` keeps the
first N for continuity with numbers measured that way. Plain NumPy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SUBSETS", "first_indices", "select_indices", "stratified_indices"]

SUBSETS = ("stratified", "first")


def first_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """``[min(n, N)]``: the first ``n`` indices."""
    return np.arange(min(int(n), len(labels)))


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``[min(n, N)]`` sorted indices with the classes as balanced as the data allow.

    Every class gets ``n // C`` examples (the first ``n % C`` classes in a seeded order one
    more); a class with fewer examples gives all it has and the rest are spread over the
    others the same way. Within a class the examples are a seeded random choice. The same
    ``labels``, ``n`` and ``seed`` always give the same indices.
    """
    labels = np.asarray(labels)
    n = min(int(n), len(labels))
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    take = {c: 0 for c in classes}
    left = n
    while left > 0:
        open_ = [c for c in classes if take[c] < len(pools[c])]
        share, extra = divmod(left, len(open_))
        for i, c in enumerate(open_):
            add = min(share + (i < extra), len(pools[c]) - take[c])
            take[c] += add
            left -= add
    return np.sort(np.concatenate([pools[c][: take[c]] for c in classes]))


def select_indices(labels: np.ndarray, n: int, subset: str = "stratified", seed: int = 0):
    """The indices of ``subset`` (one of `SUBSETS`) of size ``min(n, N)``."""
    if subset == "first":
        return first_indices(labels, n)
    if subset == "stratified":
        return stratified_indices(labels, n, seed)
    raise ValueError(f"subset must be one of {SUBSETS}; got {subset!r}.")
