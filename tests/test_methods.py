"""SVD initialisation (PiSSA) and DoRA on a layer from every domain kind: a conv, a
recurrent layer, an attention layer, an embedding; exact at init, merged == unmerged,
save/load round trip (all via check_exact)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import check_exact, randomize_adapters

LAYERS = {
    "conv": (lambda: nn.Conv2d(6, 12, 3, padding=1), (torch.randn(2, 6, 5, 5),)),
    "grouped conv": (lambda: nn.Conv1d(8, 8, 3, groups=4), (torch.randn(2, 8, 7),)),
    "lstm": (lambda: nn.LSTM(5, 8, num_layers=2), (torch.randn(4, 2, 5),)),
    "attention": (lambda: nn.MultiheadAttention(8, 2), (torch.randn(3, 2, 8),) * 3),
    "linear": (lambda: nn.Linear(10, 12), (torch.randn(3, 10),)),
    "embedding": (lambda: nn.Embedding(20, 6), (torch.randint(0, 20, (2, 5)),)),
    "weight-normed conv": (lambda: nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 6, 3), dim=2), (torch.randn(2, 4, 8),)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("path", ["activation", "weight"])
def test_svd_init_is_exact(layer, path):
    check_exact(*LAYERS[layer], rank=2, init="svd", path=path)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_dora_is_exact(layer):
    check_exact(*LAYERS[layer], rank=2, dora=True)


def test_svd_init_starts_from_the_principal_directions():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    weight = layer.weight.detach().clone()
    la.apply(layer, rank=3, alpha=6, init="svd")
    f = layer.lora_adapters.default.factors.weight
    u, s, vh = torch.linalg.svd(weight)
    torch.testing.assert_close(f.scale * f.B @ f.A, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    assert torch.equal(layer._parameters["weight"], weight), "the base tensor is never changed"
    torch.testing.assert_close(layer.weight, weight)  # ΔW = s(BA − B₀A₀) = 0 at init


def test_dora_magnitude_starts_at_the_row_norms_and_trains():
    torch.manual_seed(0)
    layer = la.apply(nn.Conv2d(3, 5, 3), rank=2, dora=True)
    adapter = layer.lora_adapters.default
    torch.testing.assert_close(adapter.magnitudes["weight"], layer._parameters["weight"].flatten(1).norm(dim=1))
    assert adapter.route == "weight" and adapter.magnitudes["weight"].requires_grad
    layer(torch.randn(1, 3, 5, 5)).sum().backward()
    assert adapter.magnitudes["weight"].grad is not None


def test_dora_unmerge_restores_the_weight():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    weight = layer.weight.detach().clone()
    la.apply(layer, rank=2, dora=True)
    randomize_adapters(layer, std=0.3)
    with torch.no_grad():
        layer.lora_adapters.default.magnitudes["weight"].mul_(1.5)
    la.merge(layer)
    assert not torch.allclose(layer.weight, weight)
    la.unmerge(layer)
    torch.testing.assert_close(layer._parameters["weight"], weight, rtol=1e-5, atol=1e-6)


def test_bad_init():
    with pytest.raises(la.LoraError, match="init must be one of"):
        la.apply(nn.Linear(3, 3), init="gaussian")
