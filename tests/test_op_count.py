"""How many operations an adapted train step dispatches, against full fine-tuning's:
the count a GPU pays a launch for (`bench/op_count.py` counts it on the benchmark
models). Counts, not times: they are the same on every machine and torch version
tested, so a change that adds kernels per layer fails here before a GPU sees it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import count_ops, randomize_adapters


class _Attention(nn.Module):
    """A packed q/k/v projection (three row blocks of one tensor) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


CASES = {
    "convs": (
        lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(1024, 10)),
        lambda: torch.randn(4, 3, 8, 8),
    ),
    "attention": (_Attention, lambda: torch.randn(2, 5, 16)),
}


def _step_ops(model: nn.Module, x: torch.Tensor, autocast: bool) -> int:
    def step() -> None:
        model.zero_grad(set_to_none=True)  # as an optimizer does: no gradient to add to
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().sum().backward()

    step()
    return sum(count_ops(step).values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("case", list(CASES))
def test_weight_route_adds_at_most_three_ops_per_target(case, autocast):
    """The weight route's train step dispatches full fine-tuning's operations plus at
    most three per adapted target (W + s·B·A, and A's and B's gradients from W's) and
    one per packed tensor (joining its row blocks)."""
    build, inputs = CASES[case]
    torch.manual_seed(0)
    base, x = build(), inputs()
    full = _step_ops(copy.deepcopy(base), x, autocast)
    model = la.apply(copy.deepcopy(base), rank=2, route="weight")
    randomize_adapters(model, seed=1)
    rows = la.summary(model).rows
    packed = {row.layer for row in rows if row.target in ("q", "k", "v")}
    assert _step_ops(model, x, autocast) <= full + 3 * len(rows) + len(packed)
