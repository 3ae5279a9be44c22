"""What a PyTorch user already has, timed like this library's paths (`kwta_jax.gpu_check`).

* ``torch_topk_kwta``: the official k-WTA code of Xiao et al. (a554b554/kWTA-Activation,
  ``Sparsify2D_vol``): per sample, ``topk`` gives the k-th largest value, then
  ``(x >= threshold) * x``. ``torch_kthvalue_kwta``: the same with ``kthvalue``.
  ``torch_relu``: ``torch.relu``.
* `sparse_resnet18_step_ms`: a training step of their SparseResNet18.

Both are written here after the official code, not copied. PyTorch is optional: it is imported
inside the functions, and `unavailable` says why it cannot be used (then the callers skip it).
Timings go through `kwta_jax.benchmark.time_call` (a timed call returns `TorchDone`, which
waits for the GPU like a jax array).
"""

from __future__ import annotations

from collections.abc import Callable

from kwta_jax.benchmark import time_call

__all__ = ["ACTIVATIONS", "TorchDone", "activation_ms", "sparse_resnet18_step_ms", "unavailable"]

ACTIVATIONS = ("torch_relu", "torch_topk_kwta", "torch_kthvalue_kwta")


def unavailable() -> str | None:
    """Why PyTorch cannot be used on a GPU here, or ``None``."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means no PyTorch columns
        return f"import torch failed: {e!r}"[:300]
    return None if torch.cuda.is_available() else "torch has no CUDA device"


class TorchDone:
    """What a timed PyTorch call returns: `time_call` waits on it as on a jax array."""

    def block_until_ready(self):
        import torch

        torch.cuda.synchronize()
        return self


def kwta(ratio: float, by: str = "topk") -> Callable:
    """PyTorch k-WTA per sample, ``k = max(1, int(ratio * n))``: the threshold from ``topk``
    (the official ``Sparsify2D_vol``) or from ``kthvalue``, then ``(x >= threshold) * x``."""

    def act(x):
        flat = x.reshape(x.shape[0], -1)
        n = flat.shape[1]
        k = max(1, int(ratio * n))
        if by == "topk":
            threshold = flat.topk(k, dim=1).values[:, -1:]
        else:
            threshold = flat.kthvalue(n - k + 1, dim=1, keepdim=True).values
        return ((flat >= threshold).to(flat) * flat).view_as(x)

    return act


def activation_ms(
    name: str, ratio: float, mode: str, shape: tuple[int, ...], dtype: str, repeats: int
) -> float:
    """ms per call of activation ``name`` (one of `ACTIVATIONS`) on normal data of ``shape``
    and ``dtype`` (``"float32"``, ``"bfloat16"``) on the GPU; ``mode`` ``"fwd"`` or
    ``"fwd+bwd"`` (the gradient of ``<act(x), g>``)."""
    import torch

    by = {"torch_topk_kwta": "topk", "torch_kthvalue_kwta": "kthvalue"}
    act = torch.relu if name == "torch_relu" else kwta(ratio, by[name])
    x = torch.randn(shape, device="cuda", dtype=getattr(torch, dtype))
    g = torch.randn(shape, device="cuda", dtype=getattr(torch, dtype))
    x.requires_grad_(mode != "fwd")

    def call(x, g):
        if mode == "fwd":
            with torch.no_grad():
                act(x)
        else:
            torch.autograd.grad(act(x), x, g)
        return TorchDone()

    return time_call(call, x, g, repeats=repeats, pipelined=True)


def sparse_resnet18_step_ms(batch: int, n_steps: int, ratio: float = 0.1) -> float:
    """ms per SGD step (lr 0.1, momentum 0.9, weight decay 5e-4) of a SparseResNet18 on a
    synthetic CIFAR-shaped float32 batch: ReLU stem, then k-WTA over C*H*W (``topk`` then
    threshold) after the first BatchNorm and after the residual add of every basic block, as
    in the official model (and this library's ``resnet18`` with ``act="kwta"``)."""
    import torch
    from torch import nn

    class KWTA(nn.Module):
        def forward(self, x):
            return kwta(ratio)(x)

    def conv(cin, cout, stride, size=3):
        return nn.Conv2d(cin, cout, size, stride, size // 2, bias=False)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv(cin, cout, stride), nn.BatchNorm2d(cout), KWTA(),
                                      conv(cout, cout, 1), nn.BatchNorm2d(cout))  # fmt: skip
            self.short = nn.Identity()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(conv(cin, cout, stride, 1), nn.BatchNorm2d(cout))
            self.act = KWTA()

        def forward(self, x):
            return self.act(self.body(x) + self.short(x))

    widths = [64, 64, 64, 128, 128, 256, 256, 512, 512]
    blocks = [Block(i, o, 1 if i == o else 2) for i, o in zip(widths, widths[1:], strict=False)]
    model = nn.Sequential(
        conv(3, 64, 1), nn.BatchNorm2d(64), nn.ReLU(), *blocks,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10),
    )  # fmt: skip
    torch.backends.cudnn.benchmark = True
    model = model.cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return TorchDone()

    return time_call(step, x, y, repeats=n_steps, pipelined=True)
