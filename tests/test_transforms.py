"""torch.func's transforms over adapted models — per-sample gradients (vmap over grad,
as differentially private training computes them), vmapped inference, Jacobians —
forward-mode AD and torch.export, on every route: under them the fused functions run
as plain ops, which they know how to transform or trace."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, padding=2, groups=8),  # depthwise: channels_last weight gradient outside transforms
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 70),
        nn.Tanh(),
        nn.Linear(70, 3),
    )


@pytest.fixture(params=["auto", "activation", "weight"])
def adapted(request) -> nn.Module:
    model = la.apply(_model(), rank=2, route=request.param)
    randomize_adapters(model, seed=1)
    return model


def _loss(model: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, params, (x.unsqueeze(0),)).pow(2).sum()


def test_per_sample_gradients_match_one_backward_per_sample(adapted):
    x = torch.randn(4, 3, 6, 6)
    params = {n: p.detach() for n, p in adapted.named_parameters() if p.requires_grad}
    per_sample = vmap(grad(lambda p, xi: _loss(adapted, p, xi)), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        adapted.zero_grad()
        adapted(x[i : i + 1]).pow(2).sum().backward()
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")  # noqa: B023


def test_vmapped_inference_and_jacobians(adapted):
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = adapted(x)
        mapped = vmap(lambda xi: adapted(xi.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(mapped, expected, rtol=1e-5, atol=1e-5)
    jacobian = jacrev(lambda xi: adapted(xi.unsqueeze(0)).squeeze(0))(x[0])
    assert jacobian.shape == (3, 3, 6, 6)
    # The Jacobian's rows are the input gradients of each output: one backward each.
    xi = x[:1].clone().requires_grad_(True)
    (row,) = torch.autograd.grad(adapted(xi)[0, 1], xi)
    torch.testing.assert_close(jacobian[1], row[0], rtol=1e-4, atol=1e-5)


def test_a_model_adapted_and_merged_stays_transformable():
    model = la.apply(_model(), rank=2)
    randomize_adapters(model, seed=2)
    merged = la.merge(copy.deepcopy(model))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(vmap(lambda xi: merged(xi.unsqueeze(0)))(x).squeeze(1), model(x), rtol=1e-4, atol=1e-5)


def test_forward_mode_derivatives_match_the_jacobian(adapted):
    """A directional derivative by forward-mode AD (dual tensors, and torch.func.jvp)
    equals the Jacobian applied to the direction."""
    x, direction = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 6, 6)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(adapted(forward_ad.make_dual(x, direction))).tangent
    _, by_jvp = jvp(adapted, (x,), (direction,))
    jacobian = jacrev(lambda xi: adapted(xi))(x)  # (1, 3) + x's shape
    expected = (jacobian * direction).flatten(2).sum(-1)
    torch.testing.assert_close(tangent, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_jvp, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("route", ["auto", "activation", "weight"])
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_an_unmerged_model_exports(route, strict):
    """torch.export traces the adapters as they are (no merge needed first), and the
    exported program computes what the model does. Few rows on large Linears keep them
    on the activations, where the fused function would have been traced into the
    program with its `out=` products, which refuse to run where gradients are on."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 5, padding=2, groups=16),
        nn.Flatten(),
        nn.Linear(16 * 16 * 16, 100),
        nn.Linear(100, 200),
    )
    la.apply(model, rank=2, route=route)
    randomize_adapters(model, seed=1)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,), strict=strict)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)  # grad on, as a user calls it
