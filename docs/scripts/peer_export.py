"""Export a trained MLP run and its test images for `peer_attacks.py` (docs/attacks.md,
"Against the peer libraries").

    python docs/scripts/peer_export.py runs/default --n-examples 500 --out runs/peers

Writes ``OUT/<model>.npz`` per run under RUN_DIR: the MLP's weights (``kernel_i`` ``[in,
out]``, ``bias_i``; ``head_*``), its normalisation, k-WTA ratio, the first N test images
``x`` ``[N, 28, 28, 1]`` float32 in [0, 1], labels ``y`` and the JAX logits on ``x``, which the
PyTorch port must reproduce before any comparison counts. Needs only this project; the peer
side (torch, torchattacks, foolbox) needs nothing of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flax import nnx

from kwta_jax import data, runs


def export(run_dir: Path, n_examples: int, out: Path) -> Path:
    model, config = runs.load_trained_model(run_dir)
    if config["model"] != "mlp":
        raise SystemExit(f"error: {run_dir}: only the mlp model has a PyTorch port here.")
    ds = data.load_dataset(config["dataset"], seed=config["seed"])
    x = np.asarray(ds.test_images[:n_examples], np.float32)
    y = np.asarray(ds.test_labels[:n_examples], np.int64)
    arrays = {"x": x, "y": y, "logits": np.asarray(nnx.jit(lambda m, v: m(v))(model, x))}
    for i, layer in enumerate(model.layers):
        arrays[f"kernel_{i}"] = np.asarray(layer.kernel[...])
        arrays[f"bias_{i}"] = np.asarray(layer.bias[...])
    arrays["head_kernel"] = np.asarray(model.head.kernel[...])
    arrays["head_bias"] = np.asarray(model.head.bias[...])
    arrays["mean"] = np.asarray(model.normalize.mean, np.float32)
    arrays["std"] = np.asarray(model.normalize.std, np.float32)
    arrays["act"] = np.asarray(config["act"])
    arrays["ratio"] = np.asarray(config.get("ratio") or 0.0, np.float64)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{run_dir.name}.npz"
    np.savez(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory or a parent of several")
    parser.add_argument("--n-examples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("runs/peers"))
    args = parser.parse_args()
    for run in runs.find_run_dirs(args.run_dir):
        print(export(run, args.n_examples, args.out))


if __name__ == "__main__":
    main()
