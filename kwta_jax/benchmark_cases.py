"""The benchmark's case table: shapes, ratios, small-k cases and transforms.

`kwta_jax.benchmark` times these by default and `kwta_jax.benchmark_targets` checks the CPU
speed targets (issue 17) on them, so the default run is exactly the targets' table.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_RATIOS",
    "DEFAULT_SHAPES",
    "MODES",
    "MODE_TITLES",
    "SMALL_K_CASES",
    "setting_of",
]

# Layer shapes of the paper's networks (per-sample competition: a row is one sample).
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (128, 32, 32, 64),
    (128, 16, 16, 128),
    (32, 8, 8, 512),
    (256, 4096),
    (256, 512),
)
DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.7)
# (shape, k): TopK-autoencoder shapes, a few winners in long rows.
SMALL_K_CASES: tuple[tuple[tuple[int, ...], int], ...] = (((256, 32768), 32), ((64, 131072), 64))
# fwd: the op; grad_sq: the gradient of sum(y**2); grad_dot: the gradient of <y, g>;
# vjp: y and its pullback of g.
MODES: tuple[str, ...] = ("fwd", "grad_sq", "grad_dot", "vjp")
MODE_TITLES = {"fwd": "fwd", "grad_sq": "grad Σy²", "grad_dot": "grad ⟨y,g⟩", "vjp": "vjp"}


def setting_of(record: dict) -> tuple[str, float]:
    """A record's (or summary row's) case setting: ``("ratio", r)`` or ``("k", k)``."""
    return ("ratio", record["ratio"]) if "ratio" in record else ("k", record["k"])
