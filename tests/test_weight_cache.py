"""W + ΔW kept across no-grad calls (`weight_cache`): reused only while nothing it
was formed from changed, never copied or saved, dropped when training resumes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere import attach, weight_cache
from lora_anywhere.testing import randomize_adapters


class Net(nn.Module):
    """One layer of each kind that reads W + ΔW without gradients: Linear and conv
    (rows enough to pick the weight), and the weight-route-only attention, LSTM and
    embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.rnn = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        h = self.attn(h, h, h)[0]
        return self.head(self.rnn(h)[0])


TOKENS = torch.randint(0, 10, (4, 12), generator=torch.Generator().manual_seed(0))


def adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = la.apply(Net(), rank=4).eval()
    randomize_adapters(model, seed=seed)
    return model


def holders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if weight_cache.holds(m)]


def uncached(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(weight_cache, "usable", lambda: False)
        return model(TOKENS)


def evaluate(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_second_call_reuses_the_weight_and_equals_merged(monkeypatch):
    model = adapted()
    first = evaluate(model)
    assert len(holders(model)) >= 5  # every adapted tensor owner keeps one
    formed = []
    real = attach.effective_tensor
    monkeypatch.setattr(attach, "effective_tensor", lambda *a, **k: formed.append(k) or real(*a, **k))
    second = evaluate(model)
    # Only the raw base weight is read (an activation-route layer's first look); no W + ΔW is formed.
    assert all(k == {"include_activation": False} for k in formed)
    assert torch.equal(first, second)
    monkeypatch.undo()
    assert torch.equal(second, uncached(model, monkeypatch))
    assert torch.equal(second, evaluate(la.merge(copy.deepcopy(model))))


def _optimizer_step(model: nn.Module) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(TOKENS).sum().backward()
    opt.step()


def _fused_step_without_forward(model: nn.Module) -> None:
    # A compiled training step skips the drop in its forward; a fused optimizer writes
    # without counting a version. The gradients it stepped from are what changed.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    assert [p._version for p in params] == before  # what makes this case hard


def _load_other_state(model: nn.Module) -> None:
    model.load_state_dict(adapted(seed=1).state_dict())


def _load_other_adapter(model: nn.Module, tmp_path) -> None:
    la.save_adapter(adapted(seed=2), tmp_path / "other")
    la.hotswap_adapter(model, tmp_path / "other")


def _change_a_base_weight(model: nn.Module) -> None:
    with torch.no_grad():
        model.head._parameters["weight"].mul_(2)


def _write_into_the_weight_read(model: nn.Module) -> None:
    with torch.no_grad():
        model.head.weight.mul_(0)  # a reader changing what it was handed, in place


def _put_a_new_factor_in_place(model: nn.Module) -> None:
    factor = next(iter(model.head.lora_adapters.values())).factors["weight"]
    factor.B = nn.Parameter(factor.B.detach() + 1)  # a new tensor in the same place


def _put_a_new_base_weight_in_place(model: nn.Module) -> None:
    model.head.weight = nn.Parameter(model.head._parameters["weight"].detach() * 2)


def _to_double(model: nn.Module) -> None:
    model.double()


def _merge_and_unmerge(model: nn.Module) -> None:
    la.unmerge(la.merge(model))


CHANGES = {
    "optimizer step": _optimizer_step,
    "fused step, no forward": _fused_step_without_forward,
    "load_state_dict": _load_other_state,
    "hotswap_adapter": _load_other_adapter,
    "base weight in place": _change_a_base_weight,
    "write into the weight read": _write_into_the_weight_read,
    "new factor tensor": _put_a_new_factor_in_place,
    "new base weight": _put_a_new_base_weight_in_place,
    "to(float64)": _to_double,
    "merge, unmerge": _merge_and_unmerge,
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_change_forms_the_weight_again(change, monkeypatch, tmp_path):
    model = adapted()
    before = evaluate(model)
    if change is _load_other_adapter:
        change(model, tmp_path)
    else:
        change(model)
    after = evaluate(model)
    if change is _write_into_the_weight_read:
        assert torch.equal(after, before)  # the tensor handed out was a copy
        return
    if change is not _merge_and_unmerge:
        assert not torch.equal(after.to(before.dtype), before)
    assert torch.equal(after, uncached(model, monkeypatch))


def test_disabling_an_adapter_is_seen():
    model = adapted()
    evaluate(model)
    with la.disabled(model):
        assert not holders(model)
        off = evaluate(model)
    la.remove(model, merge=False)
    assert torch.equal(off, evaluate(model))


def test_a_forward_with_gradients_frees_it():
    model = adapted()
    evaluate(model)
    model.train()
    model(TOKENS)
    assert holders(model) == []


def test_to_frees_it():
    model = adapted()
    evaluate(model)
    model.to(torch.float32)
    assert holders(model) == []


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (lambda: nn.Linear(512, 512), torch.randn(1, 512)),
        (lambda: nn.Conv2d(128, 128, 3, padding=1), torch.randn(1, 128, 2, 2)),
        (lambda: nn.Conv2d(512, 256, 1), torch.randn(2, 512, 1, 1)),  # squeeze-excitation
        (lambda: nn.Embedding(1000, 64), torch.tensor([[3]])),
    ],
    ids=["Linear", "Conv2d", "Conv2d over one position", "Embedding"],
)
def test_one_row_keeps_the_merged_weight_from_the_first_call(layer, x, monkeypatch):
    """A call of one sample (serving) on a large weight: forming W + ΔW costs more than
    A and B on its rows, once, and then nothing for every later call; and every call,
    the first included, gives the merged model's bits."""
    torch.manual_seed(0)
    model = la.apply(nn.Sequential(layer()), rank=4, route="activation").eval()
    randomize_adapters(model, seed=2)
    merged = la.merge(copy.deepcopy(model))
    with torch.no_grad():
        first, second, expected = model(x), model(x), merged(x)
    assert holders(model) == [model[0]]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    formed = []
    real = attach.effective_tensor
    monkeypatch.setattr(attach, "effective_tensor", lambda *a, **k: formed.append(k) or real(*a, **k))
    with torch.no_grad():
        model(x)
    assert formed == []


def test_without_keeping_few_rows_take_the_activation_route(monkeypatch):
    """Where nothing can be kept (a compiled graph, a process group) a call of few rows
    adds A and B on its activations, and the same call twice gives the same bits."""
    torch.manual_seed(0)
    model = la.apply(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512)), rank=4).eval()
    randomize_adapters(model, seed=2)
    x = torch.randn(1, 512)
    monkeypatch.setattr(weight_cache, "usable", lambda: False)
    formed = []
    real = attach.effective_tensor
    monkeypatch.setattr(attach, "effective_tensor", lambda *a, **k: formed.append(k) or real(*a, **k))
    with torch.no_grad():
        first, second = model(x), model(x)
    assert holders(model) == []
    assert all(k == {"include_activation": False} for k in formed)  # only the raw base weight is read
    assert torch.equal(first, second)
    torch.testing.assert_close(first, la.merge(copy.deepcopy(model))(x), rtol=1e-5, atol=1e-5)


def test_never_copied_pickled_or_saved(tmp_path):
    model = adapted()
    out = evaluate(model)
    keys = set(model.state_dict())
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert holders(other) == []
        assert torch.equal(evaluate(other), out)
    assert set(model.state_dict()) == keys
    la.save_adapter(model, tmp_path / "a")
    fresh = la.load_adapter(Net(), tmp_path / "a")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(evaluate(fresh.eval()), out)


def test_inference_mode_and_no_grad_agree(monkeypatch):
    model = adapted()
    with torch.inference_mode():
        first = model(TOKENS)
        kept = len(holders(model))
        second = model(TOKENS)
    assert kept >= 5  # formed outside inference mode, so that it can be checked and kept
    assert torch.equal(first, second)
    assert torch.equal(first, evaluate(model))
    assert torch.equal(first, uncached(model, monkeypatch))


def test_functional_call_sees_the_tensors_it_is_given(monkeypatch):
    """`torch.func.functional_call` swaps tensors in for one call: the result must be
    computed from them, never from a weight kept for the model's own tensors."""
    model, other = adapted(seed=0), adapted(seed=4)
    evaluate(model)  # keeps weights formed from model's own tensors
    swapped = {k: v.detach().clone() for k, v in other.state_dict().items()}
    with torch.no_grad():
        out = torch.func.functional_call(model, swapped, (TOKENS,))
    assert torch.equal(out, evaluate(other))
    assert torch.equal(evaluate(model), uncached(model, monkeypatch))
