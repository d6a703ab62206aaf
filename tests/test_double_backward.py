"""A backward with ``create_graph=True`` through adapted layers — a gradient penalty on
the input (WGAN-GP, R1) or on the parameters' gradients (second-order and
meta-learning methods) — gives autograd's second derivatives on every route: the fused
functions and the depthwise conv record a differentiable backward for it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere import depthwise
from lora_anywhere.errors import LoraError
from lora_anywhere.testing import randomize_adapters

LAYERS = {
    "Linear": (lambda: nn.Linear(8, 70), lambda: torch.randn(3, 40, 8)),
    "Conv2d 3×3": (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), lambda: torch.randn(2, 4, 9, 9)),
    "Conv2d 1×1": (lambda: nn.Conv2d(4, 6, 1), lambda: torch.randn(2, 4, 5, 5)),
    "Conv2d channels_last": (
        lambda: nn.Conv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last),
        lambda: torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last),
    ),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 5, padding=2, bias=False), lambda: torch.randn(2, 4, 11)),
    "depthwise 5×5": (lambda: nn.Conv2d(4, 4, 5, padding=2, groups=4), lambda: torch.randn(2, 4, 8, 8)),
}


def _input_penalty(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _parameter_penalty(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    return {**{n: p.grad for n, p in model.named_parameters() if p.requires_grad}, "input": x.grad}


@pytest.mark.parametrize("penalty", [_input_penalty, _parameter_penalty], ids=["input", "parameters"])
@pytest.mark.parametrize("layer", LAYERS, ids=list(LAYERS))
def test_second_derivatives_match_autograds(layer, penalty, monkeypatch):
    build, make_x = LAYERS[layer]
    torch.manual_seed(0)
    base, x = build(), make_x()
    adapted = la.apply(copy.deepcopy(base), rank=2, route="activation" if "depthwise" not in layer else "auto")
    randomize_adapters(adapted, seed=1)
    reference = la.apply(copy.deepcopy(base), rank=2, route="weight")
    reference.load_state_dict(adapted.state_dict())
    for model in (adapted, reference):
        if model.bias is not None:
            model.bias.requires_grad_(True)
    got = penalty(adapted, x)
    with monkeypatch.context() as m:
        m.setattr(depthwise, "applies", lambda *_: False)  # torch's own conv, for the depthwise reference
        expected = penalty(reference, x)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")  # noqa: B023


def test_lora_fa_on_the_activation_route_says_what_to_do():
    """LoRA-FA's activation route keeps no copy of the input (its point): a backward that
    must differentiate through it again is refused with the way out, and the plain
    backward still runs."""
    model = la.apply(nn.Linear(8, 70), rank=2, route="activation", freeze_a=True)
    randomize_adapters(model, seed=1)
    x = torch.randn(40, 8, requires_grad=True)
    with pytest.raises(LoraError, match="route='weight'"):
        torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    model(x).pow(2).sum().backward()
    assert model.lora_adapters.default.factors.weight.B.grad is not None
    weight_route = la.apply(nn.Linear(8, 70), rank=2, route="weight", freeze_a=True)
    (gx,) = torch.autograd.grad(weight_route(x).pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
