"""Attack the exported models with the peer libraries and compare image by image with this
project's results (docs/attacks.md, "Against the peer libraries").

Runs in its own environment, with nothing of this project (torch is not a dependency here):

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch torchattacks foolbox
    python docs/scripts/peer_export.py runs/default --n-examples 500 --out runs/peers
    python attack.py runs/default --budget strong --n-examples 500 --eps 0.1 0.15 0.2 \\
        --out runs/default/attack_strong
    /tmp/peer/bin/python docs/scripts/peer_attacks.py runs/peers/kwta.npz \\
        --ours runs/default/attack_strong/results_per_image.npz --out runs/peers/kwta

The PyTorch port is the MLP with the official k-WTA semantics (a554b554/kWTA-Activation:
``k = int(ratio * n)``, keep ``x >= `` the k-th largest value, gradient through the winners);
its logits must equal the exported JAX logits (max abs difference below 1e-4) or nothing runs.
Attacks: torchattacks' AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square 5,000;
torchattacks builds it with 10 iterations), the same cascade with the reference's 100
iterations (``ta-autoattack-100``), its components alone on every image (100 iterations),
torchattacks PGD (100 steps, random start), and foolbox's FMN, PGD and DeepFool (L-inf).
Writes ``OUT/peers.json`` (accuracy per attack and eps, seconds, and with ``--ours`` the
images each peer attack breaks that the project's worst case counts as robust) and
``OUT/peers_per_image.npz`` (``robust/<attack>/<eps>``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class KWTA(nn.Module):
    """Official k-WTA (per sample): ``x * (x >= k-th largest of the row)``."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = max(1, int(self.ratio * x.shape[1]))
        threshold = x.topk(k, dim=1)[0][:, -1:]
        return x * (x >= threshold).to(x)


class PortedMLP(nn.Module):
    """The exported MLP: ``[N, 1, 28, 28]`` in [0, 1] -> normalise -> dense/act x depth ->
    head, ``[N, 10]`` logits."""

    def __init__(self, arrays):
        super().__init__()
        self.mean = float(arrays["mean"][0])
        self.std = float(arrays["std"][0])
        depth = sum(1 for k in arrays if k.startswith("kernel_"))
        layers = []
        for i in range(depth):
            layers.append(self._linear(arrays[f"kernel_{i}"], arrays[f"bias_{i}"]))
            act = str(arrays["act"])
            layers.append(KWTA(float(arrays["ratio"])) if act == "kwta" else nn.ReLU())
        layers.append(self._linear(arrays["head_kernel"], arrays["head_bias"]))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def _linear(kernel, bias) -> nn.Linear:
        layer = nn.Linear(*kernel.shape)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            layer.bias.copy_(torch.from_numpy(bias))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((x - self.mean) / self.std).reshape(x.shape[0], -1))


def _predict(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def _torchattacks(model, eps: float, seed: int) -> dict:
    import torchattacks as ta

    # torchattacks' AutoAttack "standard" builds APGD, APGD-T and FAB with their default of
    # 10 iterations; the reference (Croce & Hein) runs 100. "ta-autoattack-100" is the same
    # cascade (torchattacks' MultiAttack) with the reference's 100 iterations.
    reference = ta.MultiAttack(
        [
            ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
            ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=seed),
            ta.FAB(
                model,
                norm="Linf",
                eps=eps,
                steps=100,
                n_restarts=1,
                multi_targeted=True,
                n_classes=10,
                seed=seed,
            ),
            ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed),
        ]
    )
    return {
        "ta-autoattack": ta.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                       n_classes=10, seed=seed),
        "ta-autoattack-100": reference,
        "ta-apgd-ce": ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                              loss="ce", seed=seed),
        "ta-apgd-dlr": ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                               loss="dlr", seed=seed),
        "ta-apgd-t": ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                              n_classes=10, seed=seed),
        "ta-fab-t": ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                           multi_targeted=True, n_classes=10, seed=seed),
        "ta-square": ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1,
                               seed=seed),
        "ta-pgd": ta.PGD(model, eps=eps, alpha=eps / 40, steps=100, random_start=True),
    }  # fmt: skip


def _foolbox(model, x, y, eps_values, only=None) -> dict[str, dict[float, np.ndarray]]:
    """``attack -> eps -> [N]`` success of foolbox's L-inf FMN, PGD and DeepFool."""
    import foolbox as fb

    fmodel = fb.PyTorchModel(model.eval(), bounds=(0, 1))
    out = {}
    for name, attack in {
        "fb-fmn": fb.attacks.LInfFMNAttack(steps=100),
        "fb-pgd": fb.attacks.LinfPGD(steps=100, rel_stepsize=0.025),
        "fb-deepfool": fb.attacks.LinfDeepFoolAttack(steps=50),
    }.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        _, clipped, success = attack(fmodel, x, y, epsilons=list(eps_values))
        out[name] = {e: np.asarray(s.numpy()) for e, s in zip(eps_values, success, strict=True)}
        # Re-check every adversarial point ourselves: inside the ball, classified wrongly.
        for e, xa in zip(eps_values, clipped, strict=True):
            assert float((xa - x).abs().max()) <= e + 1e-6
            out[name][e] = _predict(model, xa) != y.numpy()
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exported", type=Path, help="an .npz written by peer_export.py")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.15, 0.2])
    parser.add_argument("--ours", type=Path, help="the project's results_per_image.npz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", nargs="+", help="only these peer attacks (default: all)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    arrays = dict(np.load(args.exported))
    name = args.exported.stem
    model = PortedMLP(arrays).eval()
    x = torch.from_numpy(arrays["x"]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(arrays["y"])
    with torch.no_grad():
        gap = float(np.abs(model(x).numpy() - arrays["logits"]).max())
    print(f"{name}: {len(y)} images; port vs JAX logits: max |diff| {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit(f"error: the port's logits differ from JAX's by {gap:.2e} (> 1e-4).")
    clean = _predict(model, x) == y.numpy()
    robust: dict[str, dict[float, np.ndarray]] = {}
    seconds: dict[str, dict[float, float]] = {}
    for eps in args.eps:
        for attack_name, attack in _torchattacks(model, eps, args.seed).items():
            if args.attacks and attack_name not in args.attacks:
                continue
            t0 = time.perf_counter()
            x_adv = attack(x, y)
            assert float((x_adv - x).abs().max()) <= eps + 1e-6, attack_name
            robust.setdefault(attack_name, {})[eps] = clean & (_predict(model, x_adv) == y.numpy())
            seconds.setdefault(attack_name, {})[eps] = time.perf_counter() - t0
            print(f"  eps {eps} {attack_name}: {robust[attack_name][eps].mean():.3f} "
                  f"({seconds[attack_name][eps]:.0f} s)", flush=True)  # fmt: skip
    for attack_name, success in _foolbox(model, x, y, args.eps, args.attacks).items():
        robust[attack_name] = {e: clean & ~s for e, s in success.items()}
    union = {e: clean & np.logical_and.reduce([r[e] for r in robust.values()]) for e in args.eps}
    report = {
        "model": name, "n": int(len(y)), "port_max_abs_logit_diff": gap,
        "clean": float(clean.mean()),
        "accuracy": {a: {str(e): float(r[e].mean()) for e in args.eps} for a, r in robust.items()},
        "peer_union": {str(e): float(union[e].mean()) for e in args.eps},
        "seconds": {a: {str(e): s for e, s in v.items()} for a, v in seconds.items()},
    }  # fmt: skip
    if args.ours:
        ours = np.load(args.ours)
        report["ours_worst"], report["missed_by_ours"], report["ours_and_peers"] = {}, {}, {}
        # results_per_image.npz keys start with the run's display name, e.g. "kwta (kwta)/".
        prefix = next(k.split("/")[0] for k in ours if k.split("/")[0].split(" ")[0] == name)
        for e in args.eps:
            mine = ours[f"{prefix}/worst_robust/{e}"][: len(y)]
            report["ours_worst"][str(e)] = float(mine.mean())
            report["ours_and_peers"][str(e)] = float((mine & union[e]).mean())
            report["missed_by_ours"][str(e)] = {
                a: np.flatnonzero(mine & ~r[e]).tolist() for a, r in robust.items()
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(report, indent=1))
    np.savez(args.out / "peers_per_image.npz",
             **{f"robust/{a}/{e}": r[e] for a, r in robust.items() for e in args.eps})  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
