"""The arithmetic a fused activation-route step adds over the frozen layer's, counted
with `torch.utils.flop_counter` (`bench/flops.py` counts it on the benchmark models):
exactly the rank-r products LoRA needs, so a kernel change that computes one twice, or a
full-width product where a rank-r one does, fails here on any machine."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere import kernels
from lora_anywhere.rules import torch_nn

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from flops import flop_counter  # noqa: E402

RANK = 4


def _step_flops(model: nn.Module, x: torch.Tensor) -> int:
    x = x.clone().requires_grad_(True)  # the input gradient, as inside a network
    counter = flop_counter()
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def _frozen(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def _expected_extra(rows: int, cols: int, out: int, folded: bool) -> int:
    """A's products (rows × cols × r) and B's (rows × r × out): the forward, the input
    gradient and the factor's gradient each need one of both, unfolded. Folded, the
    base product runs on W + ΔW (formed twice: forward and backward, out × r × cols
    each) and takes the forward's and the input gradient's terms in."""
    per_pass = 2 * rows * RANK * (cols + out)
    return 2 * per_pass + 4 * out * RANK * cols if folded else 3 * per_pass


CASES = {
    # name: (layer, input, rows, cols, out); a conv's rows are its output positions
    "Linear": (lambda: nn.Linear(64, 48), (16, 64), 16, 64, 48),
    "Linear, many rows": (lambda: nn.Linear(64, 48), (256, 64), 256, 64, 48),
    "Conv2d 3×3": (lambda: nn.Conv2d(32, 32, 3, padding=1), (1, 32, 4, 4), 16, 32 * 9, 32),
    "Conv2d 3×3, many positions": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6), 72, 8 * 9, 12),
    "Conv2d 1×1": (lambda: nn.Conv2d(32, 24, 1), (1, 32, 3, 3), 9, 32, 24),
    "Conv2d 1×1, many positions": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 10, 10), 200, 8, 12),
    "Conv1d, stride 2": (lambda: nn.Conv1d(16, 16, 5, stride=2, padding=2), (2, 16, 20), 20, 16 * 5, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_activation_route_adds_only_the_rank_r_products(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_nn, "SMALL_CONV_CALL", 0)  # the CPU trains small conv calls on W + ΔW
    build, shape, rows, cols, out = CASES[case]
    torch.manual_seed(0)
    layer, x = build(), torch.randn(*shape)
    frozen = _step_flops(_frozen(copy.deepcopy(layer)), x)
    adapted = la.apply(nn.Sequential(copy.deepcopy(layer)), rank=RANK, route="activation")
    for p in adapted.parameters():
        if p.dim() == 1:
            p.requires_grad_(False)  # the bias's gradient is a sum, which no product counts anyway
    folded = kernels.many_rows(rows, out, cols)
    assert _step_flops(adapted, x) - frozen == _expected_extra(rows, cols, out, folded)


def test_cases_cover_both_ways_of_running_the_base_product() -> None:
    ways = {name: kernels.many_rows(rows, out, cols) for name, (_, _, rows, cols, out) in CASES.items()}
    assert set(ways.values()) == {True, False}, ways


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_conv_gradients_are_counted_at_the_forwards_cost(groups: int) -> None:
    """Each of a conv's input and weight gradients costs its forward, grouped or not
    (torch's own formula counts a grouped weight gradient `groups` times over)."""
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    counter = flop_counter()
    with counter:
        y = conv(x)
    forward = counter.get_total_flops()
    assert forward == 2 * 2 * 64 * 16 * (16 // groups) * 9
    with counter:  # counts from zero again
        y.sum().backward()
    assert counter.get_total_flops() == 2 * forward
