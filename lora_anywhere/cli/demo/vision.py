"""Vision: a small CNN pretrained on the orientation of a bar, adapted to the bar's
stripe pattern.

Every image holds one bar with a random orientation, length, position and stripe
pattern (solid, or striped across its length with period 2, 3 or 4 pixels). Task A
is the orientation; task B the stripe pattern. A CNN trained on orientation learns
smooth, oriented line detectors, and global average pooling of those is nearly blind
to the stripes: a new head on the frozen features stays near chance. The stripes
need new filters, which rank-4 updates of the convolutions provide.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .common import Data, Domain

SIZE = 20
PERIODS = (math.inf, 2.0, 3.0, 4.0)  # stripe period along the bar, pixels (inf: solid)


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` noisy 1×SIZE×SIZE images of one bar: (images, orientation 0-3, stripes 0-3)."""
    g = torch.Generator().manual_seed(seed)
    orientation = torch.randint(0, 4, (n,), generator=g)
    stripes = torch.randint(0, 4, (n,), generator=g)
    length = torch.randint(0, 4, (n,), generator=g)
    angle = orientation.float() * math.pi / 4 + (torch.rand(n, generator=g) - 0.5) * 0.3
    half = 3.0 + 1.5 * length.float()
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 6
    grid = torch.arange(SIZE) - SIZE / 2 + 0.5
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    dx = xs[None] - centre[:, 0, None, None]
    dy = ys[None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    bar = torch.sigmoid(4 * (half[:, None, None] - along.abs())) * torch.exp(-(across**2))
    period = torch.tensor(PERIODS)[stripes][:, None, None]
    phase = torch.rand(n, generator=g)[:, None, None] * 2 * math.pi
    # A solid bar has the same mean brightness as a striped one: only the pattern differs.
    pattern = torch.where(torch.isinf(period), torch.full_like(along, 0.5), 0.5 + 0.5 * torch.cos(2 * math.pi * along / period + phase))
    image = bar * pattern + 0.1 * torch.randn(bar.shape, generator=g)
    return image[:, None], orientation, stripes


class SmallCNN(nn.Module):
    """A stem conv, a depthwise-separable block, a conv, global average pooling and a
    linear head (10k parameters)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()

        def block(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(1, 16)
        self.depthwise = block(16, 16, groups=16)
        self.pointwise = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.conv = block(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.pointwise(self.depthwise(self.stem(x))))
        return self.head(h.mean((2, 3)))


NORMS = ["stem.1", "depthwise.1", "pointwise.1", "conv.1"]


def _data(label: int, fast: bool) -> Data:
    """label 1: orientation (task A), 2: stripes (task B). Both tasks see the same
    kind of images; only the question changes."""
    sizes = (600, 300, 300) if fast else (3000, 500, 1000)
    sets = []
    for seed, n in zip((1, 2, 3), sizes):
        generated = bars(n, seed)
        sets.append(TensorDataset(generated[0], generated[label]))
    return Data(*sets, classes=4)


def _outputs(model: nn.Module, data: Data) -> torch.Tensor:
    return model(data.test.tensors[0][:64])


DOMAIN = Domain(
    name="vision",
    task="image-classification",
    task_a="bar orientation",
    task_b="stripe pattern",
    model="a small CNN (10k parameters)",
    data_a=lambda fast: _data(1, fast),
    data_b=lambda fast: _data(2, fast),
    build=SmallCNN,
    head="head",
    outputs=_outputs,
    rank=4,
    lora_trainable=NORMS,
    epochs_a=8,
    epochs_b=8,
    lr_a=3e-3,
)
