"""Regularisers: values equal the explicit ΔW formulas, and gradients flow to adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters
from lora_anywhere.training.regularize import delta_distance, delta_frobenius, factor_distance


def model_with_deltas(init="lora"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
    la.apply(model, rank=2, alpha=3, init=init)
    randomize_adapters(model)
    return model


def explicit_deltas(model):
    out = {}
    for layer_name, layer in (("0", model[0]), ("2", model[2])):
        out[f"{layer_name}/weight"] = layer.lora_adapters.default.factors.weight.delta()
    return out


@pytest.mark.parametrize("init", ["lora", "svd"])
def test_frobenius_matches_explicit(init):
    model = model_with_deltas(init)
    expected = sum(d.pow(2).sum() for d in explicit_deltas(model).values())
    torch.testing.assert_close(delta_frobenius(model), expected, rtol=1e-4, atol=1e-6)


def test_delta_distance_matches_explicit_and_trains():
    model = model_with_deltas()
    deltas = explicit_deltas(model)
    torch.manual_seed(1)
    targets = {"0/weight": torch.randn(6, 3, 3, 3), "2/weight": torch.randn(4, 96)}
    expected = sum((deltas[k] - targets[k].reshape(deltas[k].shape)).pow(2).sum() for k in targets)
    value = delta_distance(targets)(model)
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-4)
    value.backward()
    assert model[0].lora_adapters.default.factors.weight.B.grad.abs().sum() > 0


def test_penalty_pulls_delta_to_target_in_a_loop():
    model = model_with_deltas()
    target = {"2/weight": torch.full((4, 96), 0.01)}
    penalty = delta_distance(target)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    start = penalty(model).item()
    for _ in range(100):
        opt.zero_grad()
        (penalty(model) + 0.1 * delta_frobenius(model)).backward()
        opt.step()
    assert penalty(model).item() < 0.2 * start


def test_factor_distance_and_errors():
    model = model_with_deltas()
    a = model[2].lora_adapters.default.factors.weight.A.detach()
    assert factor_distance({"2/weight": a})(model).item() == pytest.approx(0.0)
    with pytest.raises(la.TargetError, match="no adapted matrix named nope/weight"):
        factor_distance({"nope/weight": a})(model)
    with pytest.raises(la.TargetError, match="must hold 4×96 values"):
        delta_distance({"2/weight": torch.zeros(3, 3)})(model)
    with pytest.raises(la.LoraError, match="no live adapter"):
        delta_frobenius(nn.Linear(2, 2))


def test_trainer_takes_a_regularizer():
    """A strong Frobenius penalty keeps ΔW much smaller than training without it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    norms = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = la.apply(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), rank=2)
        la.Trainer(
            model,
            data,
            task="image-classification",
            epochs=3,
            lr=0.05,
            batch_size=16,
            progress=False,
            regularizer=delta_frobenius,
            regularizer_weight=weight,
        ).fit()
        norms[weight] = delta_frobenius(model).item()
    assert norms[1.0] < 0.5 * norms[0.0]
    with pytest.raises(la.LoraError, match="regularizer must be None or a function"):
        la.Trainer(model, data, task="image-classification", regularizer="l2")
