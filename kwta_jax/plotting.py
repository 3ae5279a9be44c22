"""Learning-curve plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_learning_curves"]


def plot_learning_curves(history: Sequence[dict], path, *, title: str = "") -> Path:
    """Writes a PNG with loss (train/test) and accuracy (train/test) per epoch.

    Args:
      history: one dict per epoch with ``epoch``, ``train_loss``, ``test_loss``,
        ``train_accuracy``, ``test_accuracy`` (the lines of ``metrics.jsonl``).
      path: output ``.png`` path (written atomically: temporary file, then rename).

    Returns:
      ``Path(path)``.
    """
    import os

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split, style in (("train", "-o"), ("test", "--s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], style, ms=3, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ratios = [h.get("kwta_ratio") for h in history]
    if any(r is not None for r in ratios) and len(set(ratios)) > 1:
        twin = ax_acc.twinx()
        twin.step(epochs, ratios, "g:", where="mid", label="k-WTA ratio")
        twin.set_ylabel("k-WTA ratio", color="g")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
