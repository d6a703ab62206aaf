"""`lora-anywhere demo`: the whole adapter lifecycle on data generated here.

A small CNN is pretrained on task A (the orientation of a bar), then adapted with
LoRA to task B (the bar's length) with a new head; the adapter is merged, saved and
reloaded onto a fresh copy of the pretrained base, and each step is checked.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import api, io
from .summary import summary

SIZE = 16


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of one bar each: (images, orientation class 0-3, length class 0-3)."""
    g = torch.Generator().manual_seed(seed)
    orientation = torch.randint(0, 4, (n,), generator=g)
    length = torch.randint(0, 4, (n,), generator=g)
    angle = orientation.float() * math.pi / 4
    half = 1.5 + 1.5 * length.float()
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 4
    ys, xs = torch.meshgrid(torch.arange(SIZE) - SIZE / 2 + 0.5, torch.arange(SIZE) - SIZE / 2 + 0.5, indexing="ij")
    dx = xs[None] - centre[:, 0, None, None]
    dy = ys[None] - centre[:, 1, None, None]
    along = dx * torch.cos(angle)[:, None, None] + dy * torch.sin(angle)[:, None, None]
    across = -dx * torch.sin(angle)[:, None, None] + dy * torch.cos(angle)[:, None, None]
    image = torch.sigmoid(4 * (half[:, None, None] - along.abs())) * torch.exp(-(across**2) / 0.8)
    image = image + 0.1 * torch.randn(image.shape, generator=g)
    return image[:, None], orientation, length


class SmallCNN(nn.Module):
    """A stem conv, a depthwise-separable block, a conv, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        block = lambda cin, cout, groups=1: nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())  # noqa: E731
        self.stem = block(1, 16)
        self.depthwise = block(16, 16, groups=16)
        self.pointwise = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.conv = block(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.pointwise(self.depthwise(self.stem(x))))
        return self.head(h.mean((2, 3)))


NORMS = ["stem.1", "depthwise.1", "pointwise.1", "conv.1"]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def run_demo(steps: int = 150, out_dir: str | Path = "runs/demo") -> dict[str, float]:
    torch.manual_seed(0)
    out = Path(out_dir)
    x, orient, length = bars(4000, seed=1)
    vx, vorient, vlength = bars(1000, seed=2)

    print(f"[1/5] pretraining a small CNN on task A (bar orientation), {steps} steps")
    base = SmallCNN()
    train(base, x, orient, steps, lr=3e-3)
    acc_a = accuracy(base, vx, vorient)
    print(f"      task A validation accuracy: {acc_a:.3f}")
    pretrained = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh() -> nn.Module:
        model = SmallCNN()
        model.load_state_dict(pretrained)
        torch.manual_seed(1)
        model.head = nn.Linear(32, 4)  # a new head for task B
        return model

    model = fresh()
    print("[2/5] LoRA on every conv and linear layer, rank 4; new head and norms train fully")
    api.apply(model, rank=4, trainable=["head", *NORMS])
    s = summary(model)
    print(f"      {len(s.rows)} adapted tensors, {s.trainable_params:,} of {s.total_params:,} parameters train ({100 * s.trainable_share:.1f}%)")

    start = time.perf_counter()
    train(model, x, length, steps, lr=3e-3)
    acc_b = accuracy(model, vx, vlength)
    print(f"[3/5] task B (bar length) after {steps} steps: validation accuracy {acc_b:.3f} (chance 0.25), {time.perf_counter() - start:.1f} s")

    model.eval()
    with torch.no_grad():
        unmerged = model(vx)
        api.merge(model)
        merged = model(vx)
        api.unmerge(model)
    merge_error = (merged - unmerged).abs().max().item()
    print(f"[4/5] merged vs unmerged outputs: max difference {merge_error:.1e}")

    folder = io.save_adapter(model, out / "adapter")
    size = sum(f.stat().st_size for f in folder.iterdir())
    reloaded = fresh()
    io.load_adapter(reloaded, folder)
    with torch.no_grad():
        reload_error = (reloaded.eval()(vx) - unmerged).abs().max().item()
    print(f"[5/5] saved {folder} ({size / 1024:.1f} KiB); reloaded onto a fresh base: max difference {reload_error:.1e}")
    if merge_error > 1e-4 or reload_error > 1e-4:
        raise RuntimeError(f"demo check failed: merge error {merge_error:.2e}, reload error {reload_error:.2e}")
    return {"task_a_accuracy": acc_a, "task_b_accuracy": acc_b, "merge_error": merge_error, "reload_error": reload_error}
