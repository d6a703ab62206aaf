"""torch.compile on adapted models: one graph (fullgraph=True) on both routes, the same
outputs and gradients as eager, for training and for no_grad inference. The
aot_eager backend traces forward and backward like inductor does without needing a
C++ compiler, so a failure here is a tracing problem, not a toolchain one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding="same", padding_mode="reflect")
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.relu())


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_compiled_adapted_model_matches_eager(path):
    torch.manual_seed(0)
    model = la.apply(Mixed(), rank=2, path=path)
    randomize_adapters(model, seed=1)
    tokens = torch.randint(0, 20, (3, 7))
    expected = model(tokens)
    expected.pow(2).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(tokens)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, expected)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=lambda m: f"{name}: {m}")  # noqa: B023 (called at once)
    many = torch.randint(0, 20, (8, 40))  # enough rows for the no_grad weight route
    with torch.no_grad():
        torch.testing.assert_close(compiled(many), model(many))
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
