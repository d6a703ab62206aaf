"""Several named adapters, LoRA-FA (frozen A) and rsLoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import check_exact, randomize_adapters


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 5), nn.GRU(5, 6)).eval()


X = torch.randn(2, 4, 6)


def out(model):
    with torch.no_grad():
        return model(X)[0]


def two_adapters():
    model = make()
    base = out(model)
    la.apply(model, rank=2, name="a")
    la.apply(model, rank=3, name="b", targets=["0", "3"])
    randomize_adapters(model)
    return model, base


def test_set_adapter_switches_and_trains_only_the_active_one():
    model, base = two_adapters()
    both = out(model)
    la.set_adapter(model, "a")
    only_a = out(model)
    assert la.active_adapters(model) == ["a"]
    assert not torch.allclose(only_a, both) and not torch.allclose(only_a, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
    la.set_adapter(model, "b")
    assert all(".b." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(la.NotAdaptedError, match="no adapter named 'c'"):
        la.set_adapter(model, "c")


def test_disabled_gives_base_outputs_even_when_merged():
    model, base = two_adapters()
    adapted = out(model)
    la.merge(model, "a")
    with la.disabled(model):
        torch.testing.assert_close(out(model), base)
    torch.testing.assert_close(out(model), adapted, rtol=1e-5, atol=1e-6)


def test_delete_adapter():
    model, _ = two_adapters()
    la.delete_adapter(model, "a")
    assert la.adapter_names(model) == ["b"]
    assert not any(".a." in k for k in model.state_dict())


def test_combine_is_exactly_the_weighted_sum(tmp_path):
    model, base = two_adapters()
    la.set_adapter(model, "a")
    da = out(model) - base
    # the GRU output is not linear in ΔW: compare on a linear model instead below
    lin = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    x = torch.randn(4, 6)
    la.apply(lin, rank=2, name="a")
    la.apply(lin, rank=2, name="b")
    randomize_adapters(lin)
    base_w = {n: p.detach().clone() for n, p in lin.named_parameters() if "lora" not in n}
    deltas = {}
    for name in ("a", "b"):
        la.set_adapter(lin, name)
        la.merge(lin, name)
        deltas[name] = {n: p.detach() - base_w[n] for n, p in lin.named_parameters() if "lora" not in n}
        la.unmerge(lin, name)
    la.combine(lin, {"a": 0.3, "b": -1.5}, name="mix")
    la.merge(lin, "mix")
    for n, p in lin.named_parameters():
        if "lora" not in n and n.endswith("weight"):
            torch.testing.assert_close(p.detach() - base_w[n], 0.3 * deltas["a"][n] - 1.5 * deltas["b"][n], rtol=1e-5, atol=1e-6)
    la.unmerge(lin, "mix")
    expected = lin(x)
    la.save_adapter(lin, tmp_path / "mix", name="mix")
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    fresh.load_state_dict({k: v for k, v in base_w.items()})
    torch.testing.assert_close(la.load_adapter(fresh, tmp_path / "mix")(x), expected)
    assert da.abs().max() > 0


def test_save_and_load_by_name(tmp_path):
    model, _ = two_adapters()
    la.set_adapter(model, "b")
    expected = out(model)
    la.save_adapter(model, tmp_path / "b", name="b")
    fresh = la.load_adapter(make(), tmp_path / "b", name="bee")
    assert la.adapter_names(fresh) == ["bee"]
    torch.testing.assert_close(out(fresh), expected)
    with pytest.raises(la.NotAdaptedError, match="several adapters"):
        la.save_adapter(model, tmp_path / "x")


@pytest.mark.parametrize(
    ("factory", "x"),
    [
        (lambda: nn.Conv2d(3, 16, 3), torch.randn(2, 3, 6, 6)),
        (lambda: nn.LSTM(4, 6), torch.randn(3, 2, 4)),
        (lambda: nn.MultiheadAttention(8, 2), (torch.randn(3, 2, 8),) * 3),
        (lambda: nn.Linear(8, 8), torch.randn(2, 8)),
    ],
)
def test_freeze_a_trains_only_b_and_stays_exact(factory, x):
    inputs = x if isinstance(x, tuple) else (x,)
    check_exact(factory, inputs, rank=2, freeze_a=True)
    model = la.apply(factory(), rank=2, freeze_a=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".B") for n in trainable)


def test_freeze_a_takes_the_activation_path_where_it_saves_memory():
    """A narrow Linear trains faster on the weight route, but LoRA-FA is chosen for its
    memory, which only the activation route saves: "auto" then means activation."""
    assert not la.apply(nn.Linear(8, 8), rank=2).lora_adapters.default.activation_owners
    assert la.apply(nn.Linear(8, 8), rank=2, freeze_a=True).lora_adapters.default.activation_owners
    assert not la.apply(nn.Linear(8, 8), rank=2, freeze_a=True, path="weight").lora_adapters.default.activation_owners
    # …but not a grouped conv, whose A runs per group on r times the output's size.
    assert not la.apply(nn.Conv2d(8, 8, 3, groups=8), rank=2, freeze_a=True).lora_adapters.default.activation_owners


def test_freeze_a_survives_save_and_load(tmp_path):
    model = la.apply(make(), rank=2, freeze_a=True)
    la.save_adapter(model, tmp_path / "fa")
    fresh = la.load_adapter(make(), tmp_path / "fa")
    assert all(n.endswith(".B") for n, p in fresh.named_parameters() if p.requires_grad)


def test_rslora_scales_by_root_rank():
    model = la.apply(nn.Linear(16, 16), rank=4, alpha=8, rslora=True)
    assert model.lora_adapters.default.factors.weight.scale == pytest.approx(8 / 2)
    check_exact(lambda: nn.Linear(16, 16), (torch.randn(2, 16),), rank=4, rslora=True)
