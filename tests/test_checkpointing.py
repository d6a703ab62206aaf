"""Activation checkpointing (torch.utils.checkpoint, non-reentrant) on adapted models:
the recomputed forward runs the same fused autograd functions (`kernels.py`), the
same weight-route W + ΔW and the same dropout masks, so the gradients equal those of
the plain step, on both routes."""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


class Blocks(nn.Module):
    """Residual blocks of a Linear, a conv (plain, channels_last or grouped), an
    embedding and an LSTM, each block a unit to checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
        self.conv = nn.Sequential(nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 16, 5, padding=2, groups=4))
        self.lstm = nn.LSTM(16, 8, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.checkpointed = False

    def run(self, block: Callable[..., Any], *args: Any) -> Any:
        return checkpoint(block, *args, use_reentrant=False) if self.checkpointed else block(*args)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.run(self.mlp, h)
        h = h + self.run(lambda x: self.conv(x.transpose(1, 2)).transpose(1, 2), h)
        h = h + self.run(lambda x: self.lstm(x)[0], h)
        h = h + self.run(lambda x: self.attn(x, x, x, need_weights=False)[0], h)
        return self.head(h.mean(1))


def grads(model: Blocks, tokens: torch.Tensor, checkpointed: bool) -> dict[str, torch.Tensor]:
    model.checkpointed = checkpointed
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks; checkpoint replays them in the recompute
    model(tokens).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "options",
    [
        {"route": "activation"},
        {"route": "weight"},
        {"route": "activation", "dropout": 0.2},
        {"route": "activation", "freeze_a": True},
        {"route": "auto", "init": "svd"},
        {"route": "weight", "dora": True},
    ],
    ids=["activation", "weight", "dropout", "lora-fa", "svd", "dora"],
)
def test_checkpointed_gradients_equal_plain_ones(options: dict) -> None:
    torch.manual_seed(0)
    model = la.apply(Blocks(), rank=4, trainable=["head"], **options)
    randomize_adapters(model, seed=1)
    tokens = torch.randint(0, 30, (3, 9))
    plain = grads(model, tokens, checkpointed=False)
    recomputed = grads(model, tokens, checkpointed=True)
    assert plain.keys() == recomputed.keys()
    assert any("lora_adapters" in n for n in plain)
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")  # noqa: B023


def test_checkpointed_fused_conv_channels_last() -> None:
    torch.manual_seed(0)
    model = la.apply(nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2)), rank=4, route="activation")
    model = model.to(memory_format=torch.channels_last)
    randomize_adapters(model, seed=1)
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last).requires_grad_()

    def step(run: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        x.grad = None
        run(x).pow(2).sum().backward()
        return [x.grad.clone(), *(p.grad.clone() for p in model.parameters() if p.requires_grad)]

    plain = step(model)
    recomputed = step(functools.partial(checkpoint, model, use_reentrant=False))
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
