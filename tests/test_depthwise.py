"""Depthwise convs whose weight gradient is formed on channels_last copies
(`lora_anywhere.depthwise`): the same numbers as torch's own conv on W + ΔW, on every
geometry; taken only where it pays, and never where the weight route's other cases
(DoRA, dropout, a compiled graph, another layout) need the layer's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_anywhere as la
from lora_anywhere import depthwise
from lora_anywhere.testing import check_exact, randomize_adapters

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture
def taken(monkeypatch):
    """How many weight gradients the channels_last way formed."""
    calls = []
    formed = depthwise._channels_last_weight_grad

    def counting(*args):
        calls.append(1)
        return formed(*args)

    monkeypatch.setattr(depthwise, "_channels_last_weight_grad", counting)
    return calls


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)  # the same dropout masks both ways
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {**grads, "input": x.grad}


def _both_ways(model: nn.Module, x: torch.Tensor, monkeypatch) -> tuple:
    """One training step the library's way, and one with torch's own weight gradient."""
    fast = _step(model, x)
    with monkeypatch.context() as m:
        m.setattr(depthwise, "applies", lambda *_: False)
        native = _step(model, x)
    return fast, native


def _assert_same(fast, native) -> None:
    torch.testing.assert_close(fast[0], native[0], rtol=0, atol=0)  # the same conv on the same W + ΔW
    assert fast[1].keys() == native[1].keys()
    for name in fast[1]:
        torch.testing.assert_close(fast[1][name], native[1][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")  # noqa: B023


@st.composite
def depthwise_convs(draw):
    channels = draw(st.integers(1, 6))
    multiplier = draw(st.sampled_from([1, 2]))
    k = (draw(st.integers(4, 6)), draw(st.integers(4, 6)))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from(["same", "valid", 0, 2])) if stride == 1 else draw(st.sampled_from(["valid", 0, 2]))
    if mode != "zeros" and padding in (0, "valid"):
        padding = 2
    bias = draw(st.booleans())
    size = 2 * dilation * max(k) + 1
    x = torch.randn(draw(st.integers(1, 3)), channels + 1, size, size)
    c = channels + 1
    return (
        lambda: nn.Conv2d(c, c * multiplier, k, stride=stride, padding=padding, dilation=dilation, groups=c, bias=bias, padding_mode=mode)
    ), x


@SETTINGS
@given(depthwise_convs())
def test_same_numbers_as_the_layers_own_conv(case):
    factory, x = case
    with pytest.MonkeyPatch.context() as monkeypatch:  # hypothesis runs many examples per fixture
        calls = []
        formed = depthwise._channels_last_weight_grad
        monkeypatch.setattr(depthwise, "_channels_last_weight_grad", lambda *a: calls.append(1) or formed(*a))
        torch.manual_seed(0)
        model = la.apply(factory(), rank=2)
        randomize_adapters(model, seed=1)
        _assert_same(*_both_ways(model, x, monkeypatch))
        assert calls, "the channels_last weight gradient was not taken"
    check_exact(factory, (x,), rank=2)


@pytest.mark.parametrize("kwargs", [{}, {"freeze_a": True}])
def test_a_trained_bias_and_a_frozen_a(kwargs, taken, monkeypatch):
    """The bias's gradient where it trains (as BitFit-style recipes do), and B's alone
    with A frozen (LoRA-FA)."""
    model = la.apply(nn.Conv2d(8, 8, 5, padding=2, groups=8), rank=2, **kwargs)
    model.bias.requires_grad_(True)
    randomize_adapters(model, seed=2)
    fast, native = _both_ways(model, torch.randn(2, 8, 12, 12), monkeypatch)
    _assert_same(fast, native)
    assert "bias" in fast[1] and "weight" not in fast[1]
    assert ("lora_adapters.default.factors.weight.A" in fast[1]) != ("freeze_a" in kwargs)
    assert len(taken) == 1


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # oneDNN's 3×3 kernel is faster as it is
        nn.Conv1d(8, 8, 31, padding=15, groups=8),  # level on the CPU: torch's
        nn.Conv2d(8, 16, 5, padding=2, groups=4),  # grouped, not depthwise
        nn.Conv2d(8, 8, 5, padding=2),
    ],
    ids=["3x3", "1-D", "grouped", "dense"],
)
def test_not_offered_where_it_does_not_pay(layer, taken):
    model = la.apply(copy.deepcopy(layer), rank=2)
    assert not depthwise.slow_nchw_weight_grad(layer)
    assert type(model).__lora_forward__ != "layer"
    x = torch.randn(2, 8, *(12,) * (layer.weight.dim() - 2))
    model(x).sum().backward()
    assert not taken


def test_a_subclass_with_its_own_forward_keeps_it(taken):
    class Shifted(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    layer = Shifted(4, 4, 5, padding=2, groups=4)
    model = la.apply(layer, rank=2)
    assert type(model).__lora_forward__ != "layer"
    model(torch.randn(1, 4, 9, 9)).sum().backward()
    assert not taken


@pytest.mark.parametrize(
    "case",
    ["unbatched", "channels_last", "no_grad", "dora", "dropout", "compiled"],
)
def test_other_calls_run_the_layers_own_forward(case, taken):
    layer = nn.Conv2d(4, 4, 5, padding=2, groups=4)
    x = torch.randn(2, 4, 10, 10)
    reference = la.apply(copy.deepcopy(layer), rank=2)
    randomize_adapters(reference, seed=3)
    model = la.apply(copy.deepcopy(layer), rank=2, dora=case == "dora", dropout=0.5 if case == "dropout" else 0.0)
    model.load_state_dict(reference.state_dict(), strict=False)
    run = model
    if case == "unbatched":
        x = x[0]
    elif case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "compiled":
        run = torch.compile(model, backend="aot_eager")
    if case == "no_grad":
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x))
    else:
        out = run(x.requires_grad_())
        out.sum().backward()
        if case in ("unbatched", "channels_last", "compiled"):
            torch.testing.assert_close(out, reference(x))
    assert not taken


@pytest.mark.parametrize("case", ["bf16", "fp16", "float64", "bf16 autocast"])
def test_other_dtypes_and_autocast_keep_torchs_weight_gradient(case, taken):
    """Measured faster in float32 only: in bf16, fp16 and float64 the copies were slower,
    and autocast computes the conv in bf16."""
    model = la.apply(nn.Conv2d(6, 6, 5, padding=2, groups=6), rank=2)
    randomize_adapters(model, seed=4)
    x = torch.randn(2, 6, 10, 10)
    if case == "bf16 autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "float64": torch.float64}[case]
        out = model.to(dtype)(x.to(dtype))
    out.float().sum().backward()
    assert model.lora_adapters.default.factors.weight.B.grad is not None
    assert not taken


def test_activation_checkpointing(taken, monkeypatch):
    model = la.apply(nn.Sequential(nn.Conv2d(4, 4, 5, padding=2, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 7, padding=3, groups=4)), rank=2)
    randomize_adapters(model, seed=5)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    checkpointed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with monkeypatch.context() as m:
        m.setattr(depthwise, "applies", lambda *_: False)
        model(x).sum().backward()
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-5)
    assert len(taken) == 2


def test_gradcheck_in_double():
    x = torch.randn(2, 3, 7, 7, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 1, 4, 4, dtype=torch.double, requires_grad=True)
    bias = torch.randn(6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: depthwise.ChannelsLastWeightGradConv.apply(x, w, b, [2, 1], [1, 2], [1, 2], 3), (x, w, bias)
    )


def test_a_real_model_keeps_its_routes_and_trains_as_before(taken, monkeypatch):
    """MobileNetV3's 5×5 depthwise convs take it, and only those; their adapters still
    report the weight route, and a training step matches torch's own weight gradients."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = la.apply(torchvision.models.mobilenet_v3_small(num_classes=4), rank=2)
    randomize_adapters(model, seed=6)
    offered = {n for n, m in model.named_modules() if getattr(type(m), "__lora_forward__", None) == "layer"}
    depthwise_5x5 = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.kernel_size == (5, 5)}
    assert offered == depthwise_5x5 and offered
    assert all(model.get_submodule(n).lora_adapters.default.route == "weight" for n in offered)
    fast, native = _both_ways(model, torch.randn(2, 3, 64, 64), monkeypatch)
    torch.testing.assert_close(fast[0], native[0], rtol=1e-5, atol=1e-5)
    for name in fast[1]:
        torch.testing.assert_close(fast[1][name], native[1][name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")  # noqa: B023
    assert len(taken) == len(offered)
