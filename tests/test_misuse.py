"""API contracts under careless use: refusals change nothing; copies, wrappers, modes,
mixed precision and hand-written training loops keep the promises of the README."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any, Callable

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere import attach
from lora_anywhere.registry import registry
from lora_anywhere.state import bitwise_equal, model_state
from lora_anywhere.testing import assert_same_fingerprint, randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a refusal must leave as it was: every tensor to the bit, the
    requires_grad flags, module classes, adapter names and their switches."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "names": la.adapter_names(model),
        "switches": {
            (n, a): (ad.active, ad.merged, ad.training) for n, m in model.named_modules() for a, ad in attach.layer_adapters(m).items()
        },
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    assert_same_fingerprint(before, fingerprint(model))


# ----------------------------------------------------------------------------- set_adapter


def test_set_adapter_refused_for_a_merged_adapter_switches_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    la.apply(model, name="a")
    la.apply(model, name="c", targets="0")  # on the first layer only: switched first
    la.apply(model, name="b", targets="1")
    la.merge(model, "b")
    before = fingerprint(model)
    with pytest.raises(la.LoraError, match="adapter 'b' is merged.*unmerge"):
        la.set_adapter(model, "a")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- copies


class TimmAttention(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers.attention import Attention

        self.attn = Attention(16, num_heads=2)

    def forward(self, x):
        return self.attn(x)


def _pyg(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torch_geometric.nn as gnn

        return {
            "Linear": lambda: gnn.Linear(6, 5),
            "HeteroLinear": lambda: gnn.HeteroLinear(6, 5, num_types=3),
            "HeteroDictLinear": lambda: gnn.HeteroDictLinear({"a": 6, "b": 4}, 5),
            "GATConv": lambda: gnn.GATConv(6, 5, heads=2),
            "AntiSymmetricConv": lambda: gnn.AntiSymmetricConv(6, num_iters=2),
            "DenseGCNConv": lambda: gnn.DenseGCNConv(6, 5),
        }[name]()

    return make


def _pyg_inputs(name: str) -> Any:
    x, edges = torch.randn(5, 6), torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
    return {
        "Linear": (x,),
        "HeteroLinear": (x, torch.tensor([0, 1, 2, 0, 1])),
        "HeteroDictLinear": ({"a": x, "b": torch.randn(3, 4)},),
        "GATConv": (x, edges),
        "AntiSymmetricConv": (x, edges),
        "DenseGCNConv": (x[None], torch.ones(1, 5, 5)),
    }[name]


def _logit_generator() -> nn.Module:
    from torchaudio.models.wav2vec2.components import LogitGenerator

    return LogitGenerator(8, num_classes=5, final_dim=6, skip_masked=False, skip_nomask=False)


def _conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(5, 6)


#: One layer per rule (per layer type for torch.nn), with its inputs.
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "Linear": (lambda: nn.Linear(6, 5), lambda: (torch.randn(3, 6),)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3), lambda: (torch.randn(2, 3, 8),)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3, groups=1), lambda: (torch.randn(2, 3, 6, 6),)),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 2), lambda: (torch.randn(1, 2, 4, 4, 4),)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), lambda: (torch.randn(2, 3, 5, 5),)),
    "Embedding": (lambda: nn.Embedding(10, 6), lambda: (torch.tensor([[1, 2, 9]]),)),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), lambda: (torch.randn(2, 3, 8),) * 3),
    "RNN": (lambda: nn.RNN(4, 5, num_layers=2), lambda: (torch.randn(3, 2, 4),)),
    "LSTM": (lambda: nn.LSTM(4, 5, proj_size=3, bidirectional=True), lambda: (torch.randn(3, 2, 4),)),
    "GRU": (lambda: nn.GRU(4, 5, batch_first=True), lambda: (torch.randn(2, 3, 4),)),
    "RNNCell": (lambda: nn.RNNCell(4, 5), lambda: (torch.randn(2, 4),)),
    "LSTMCell": (lambda: nn.LSTMCell(4, 5), lambda: (torch.randn(2, 4),)),
    "GRUCell": (lambda: nn.GRUCell(4, 5), lambda: (torch.randn(2, 4),)),
    "transformers.Conv1D": (_conv1d, lambda: (torch.randn(2, 3, 6),)),
    "timm Attention": (TimmAttention, lambda: (torch.randn(2, 4, 16),)),
    "torchaudio LogitGenerator": (
        _logit_generator,
        lambda: (
            torch.randn(2, 4, 8),
            torch.randint(0, 5, (2, 4)),
            torch.ones(2, 4, dtype=torch.bool),
            torch.zeros(2, 4, dtype=torch.bool),
        ),
    ),
    **{
        f"pyg {n}": (_pyg(n), lambda n=n: _pyg_inputs(n))
        for n in ("Linear", "HeteroLinear", "HeteroDictLinear", "GATConv", "AntiSymmetricConv", "DenseGCNConv")
    },
}


def test_the_copy_cases_cover_every_registered_rule_class():
    covered = {type(registry().rule_for(case())) for case, _ in CASES.values()}
    covered |= {type(registry().rule_for(m)) for case, _ in CASES.values() for m in case().modules() if registry().rule_for(m)}
    assert {type(r) for r in registry()._rules.values()} <= covered


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    from lora_anywhere.testing import run

    return run(model, inputs)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("case", list(CASES))
def test_deepcopy_pickle_and_torch_save_of_an_adapted_model(case: str, merged: bool):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    model = la.apply(make().eval(), rank=2)
    randomize_adapters(model, std=0.3)
    x = inputs()
    outputs(model, x)  # a forward first: some layers (RNNs) cache W + ΔW in their state
    if merged:
        la.merge(model)
    expected = outputs(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    for twin in copies:
        for got, want in zip(outputs(twin, x), expected):
            assert torch.equal(got, want)
        la.unmerge(twin) if merged else la.merge(twin)  # the copy is a working adapted model
        la.remove(twin, merge=False)
        assert la.adapter_names(twin) == []
    for got, want in zip(outputs(model, x), expected):
        assert torch.equal(got, want), "copying changed the original"


# ----------------------------------------------------------------------------- disabled, remove


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.norm(self.bn(self.conv(x))).mean((2, 3)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


X = torch.randn(4, 3, 6, 6)


def train_a_little(model: nn.Module, steps: int = 3) -> None:
    """A user's own loop: model.train() moves every BatchNorm's running statistics,
    frozen or not."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        loss = model(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(step))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_disabled_gives_the_base_outputs_after_training_trainable_modules_and_buffers():
    base = make_net().eval()
    expected = base(X)
    model = la.apply(make_net(), rank=2, trainable=["head", "norm"])
    train_a_little(model)
    trained = model(X)
    assert not torch.allclose(trained, expected)
    with la.disabled(model):
        assert torch.equal(model(X), expected)
    assert torch.equal(model(X), trained)
    with la.disabled(model, keep_trained=True):  # only the low-rank updates off
        only_adapters_off = model(X)
    assert not torch.equal(only_adapters_off, expected) and not torch.equal(only_adapters_off, trained)


def test_disabled_leaves_a_graph_built_before_it_able_to_backpropagate():
    """Reference outputs under `disabled` (DPO, KL to the base) inside one step."""
    model = la.apply(make_net(), rank=2, trainable="head")
    train_a_little(model)
    model.train()
    out = model(X)
    with la.disabled(model), torch.no_grad():
        ref = model(X)  # train mode: BatchNorm updates the copies it is given, not the remembered ones
    (out - ref).square().mean().backward()
    assert model.head.weight.grad is not None
    model.eval()
    with la.disabled(model):
        assert torch.equal(model(X), make_net().eval()(X))


def test_remove_without_merge_gives_back_the_base_and_with_merge_keeps_the_training():
    base = make_net().eval()
    expected = base(X)
    model = la.apply(make_net(), rank=2, trainable="head")
    train_a_little(model)
    trained = model(X)
    merged_copy = copy.deepcopy(model)
    la.remove(model, merge=False)
    assert torch.equal(model(X), expected)
    assert {k: torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items()} == dict.fromkeys(base.state_dict(), True)
    la.remove(merged_copy, merge=True)
    torch.testing.assert_close(merged_copy(X), trained)


def test_delete_adapter_restores_only_its_own_trainable_modules():
    model = la.apply(make_net(), rank=2, name="a", trainable="head")
    la.apply(model, rank=2, name="b", targets="conv", trainable="norm")
    head, norm = model.head.weight.detach().clone(), model.norm.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.norm.weight.add_(1.0)
    la.delete_adapter(model, "b")
    assert torch.equal(model.norm.weight, norm) and torch.equal(model.head.weight, head + 1.0)


# ----------------------------------------------------------------------------- modes


def test_new_adapters_take_their_layers_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model.eval()
    model[1].train()
    la.apply(model, dropout=0.5, route="activation")
    assert not any(m.training for m in model[0].modules()) and all(m.training for m in model[1].modules())
    randomize_adapters(model)
    model.eval()
    x = torch.randn(4, 8)
    assert torch.equal(model(x), model(x))


def test_adapters_on_an_eval_model_do_not_drop_out():
    model = la.apply(nn.Linear(8, 8).eval(), dropout=0.9, route="activation")
    randomize_adapters(model)
    x = torch.randn(16, 8)
    assert torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------- DoRA's axis


def _dora_cases() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    """Layers whose tensor keeps the output features on a dimension other than 0."""
    return {
        "Embedding": (lambda: nn.Embedding(7, 5), 1),
        "transformers.Conv1D": (_conv1d, 1),  # in × out
        "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 2), 1),
        "Linear": (lambda: nn.Linear(6, 5), 0),
    }


@pytest.mark.parametrize("case", list(_dora_cases()))
def test_dora_keeps_one_magnitude_per_output_feature(case: str, tmp_path):
    make, dim = _dora_cases()[case]
    torch.manual_seed(0)
    model = la.apply(make(), rank=2, dora=True)
    (adapter,) = [a for m in model.modules() for a in attach.layer_adapters(m).values()]
    weight = next(iter(adapter.targets.values()))
    tensor = weight.parameter_in(model)
    outputs_ = tensor.shape[dim]
    magnitude = next(iter(adapter.magnitudes.values()))
    assert magnitude.shape == (outputs_,)
    others = [d for d in range(tensor.dim()) if d != dim]
    torch.testing.assert_close(magnitude, torch.linalg.vector_norm(tensor, dim=others), rtol=0, atol=0)
    randomize_adapters(model, std=0.3)
    with torch.no_grad():
        magnitude.mul_(torch.linspace(0.5, 2.0, outputs_))
    effective = model.weight.detach().clone()  # W' = m ⊙ V/‖V‖ as the layer reads it
    torch.testing.assert_close(torch.linalg.vector_norm(effective, dim=others), magnitude.detach(), rtol=1e-5, atol=1e-6)
    la.merge(model)
    assert torch.equal(tensor, effective)  # merged == unmerged, to the bit
    la.unmerge(model)
    la.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = la.load_adapter(make(), tmp_path / "a")
    assert torch.equal(fresh.weight, effective)


def test_dora_on_embeddings_matches_peft():
    """PEFT normalises per embedding dimension; so does this library now."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)

        def forward(self, ids):
            return self.emb(ids)

    ours = la.apply(Tokens(), rank=2, dora=True)
    randomize_adapters(ours, std=0.3)
    theirs = Tokens()
    theirs.load_state_dict({"emb.weight": ours.emb._parameters["weight"].detach().clone()})
    theirs = get_peft_model(theirs, LoraConfig(r=2, lora_alpha=2, target_modules=["emb"], use_dora=True, init_lora_weights=False))
    layer = theirs.base_model.model.emb
    (adapter,) = attach.layer_adapters(ours.emb).values()
    factor = adapter.factors["weight"]
    with torch.no_grad():  # ΔW = B_ours A_ours = (B_peft A_peft)ᵀ
        layer.lora_embedding_A["default"].copy_(factor.B.T)
        layer.lora_embedding_B["default"].copy_(factor.A.T)
        layer.lora_magnitude_vector["default"].weight.copy_(adapter.magnitudes["weight"])
    ids = torch.tensor([[0, 3, 6, 2]])
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- wrappers


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


WRAPPERS = {"torch.compile": torch.compile, "DataParallel": nn.DataParallel}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
def test_a_wrapped_model_saves_names_that_load_onto_the_plain_model(wrap: str, tmp_path):
    plain = small()
    wrapper = WRAPPERS[wrap](plain)
    assert la.apply(wrapper, rank=2) is wrapper
    randomize_adapters(plain)
    la.save_adapter(wrapper, tmp_path / "a")
    x = torch.randn(2, 4)
    assert set(la.adapter_state_dict(wrapper)) == {f"lora/{n}/weight/{f}" for n in ("0", "2") for f in "AB"}
    assert torch.equal(la.load_adapter(small(), tmp_path / "a")(x), plain(x))
    fresh = small()
    wrapped = WRAPPERS[wrap](fresh)
    assert la.load_adapter(wrapped, tmp_path / "a") is wrapped
    assert torch.equal(fresh(x), plain(x))
    la.merge(wrapper)
    la.remove(wrapper)
    assert la.adapter_names(plain) == [] and "_lora_anywhere_state" not in plain.__dict__
    assert all(p.requires_grad for p in plain.parameters())


def test_a_ddp_wrapped_model_saves_plain_names(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        plain = la.apply(small(), rank=2)
        ddp = nn.parallel.DistributedDataParallel(plain)
        la.save_adapter(ddp, tmp_path / "a")
        assert all(not k.startswith("lora/module.") for k in la.adapter_state_dict(ddp))
        fresh = la.load_adapter(small(), tmp_path / "a")
        assert torch.equal(fresh(torch.ones(1, 4)), plain(torch.ones(1, 4)))
    finally:
        dist.destroy_process_group()


def test_a_scripted_module_is_refused_clearly(tmp_path):
    scripted = torch.jit.script(small())
    with pytest.raises(la.LoraError, match="torch.jit.script.*Apply lora_anywhere to the Python model"):
        la.apply(scripted)
    la.save_adapter(la.apply(small()), tmp_path / "a")
    with pytest.raises(la.LoraError, match="torch.jit.script"):
        la.load_adapter(scripted, tmp_path / "a")


def test_a_meta_device_model_starts_with_zero_b_after_to_empty(tmp_path):
    with torch.device("meta"):
        model = small()
    la.apply(model, rank=2)
    with pytest.raises(la.LoraError, match="meta device.*to_empty"):
        la.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(la.LoraError, match="meta device"):
        la.apply(small_on_meta(), dora=True)
    model.to_empty(device="cpu")
    factors = [m for m in model.modules() if type(m).__name__ == "LowRank"]
    assert factors and all(torch.equal(f.B, torch.zeros_like(f.B)) for f in factors)
    assert all(f.A.abs().sum() > 0 for f in factors)
    model.load_state_dict({k: v for k, v in small().state_dict().items()}, strict=False)  # the base weights
    x = torch.randn(2, 4)
    assert torch.equal(model(x), small()(x))
    la.save_adapter(model, tmp_path / "a")


def small_on_meta() -> nn.Module:
    with torch.device("meta"):
        return small()


def test_loading_onto_a_meta_model_is_refused(tmp_path):
    la.save_adapter(la.apply(small()), tmp_path / "a")
    model = small_on_meta()
    with pytest.raises(la.ShapeMismatchError, match="meta device"):
        la.load_adapter(model, tmp_path / "a")
    assert la.adapter_names(model) == []


# ----------------------------------------------------------------------------- exact unmerge


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def exactness_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Conv1d(48, 16, 3), nn.MultiheadAttention(16, 2, batch_first=True))
    return model.to(dtype)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_and_unmerge_restore_the_base_to_the_bit(dtype: torch.dtype, dora: bool):
    model = exactness_model(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    la.apply(model, rank=4, dora=dora)
    randomize_adapters(model, std=0.5)  # large updates: many sums change binade
    for _ in range(5):
        la.merge(model)
        la.unmerge(model)
    la.merge(model)
    with la.disabled(model):
        for key, value in model.state_dict().items():
            if key in base:
                assert bitwise_equal(value, base[key]), key
    la.remove(model, merge=False)
    for key, value in model.state_dict().items():
        assert bitwise_equal(value, base[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_two_adapters_merged_and_unmerged_in_reverse_order_are_exact(dtype: torch.dtype):
    model = exactness_model(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    la.apply(model, name="a", rank=4)
    la.apply(model, name="b", rank=2)
    randomize_adapters(model, std=0.5)
    la.merge(model, "a")
    la.merge(model, "b")
    la.unmerge(model, "b")
    la.unmerge(model, "a")
    la.remove(model, merge=False)
    for key, value in model.state_dict().items():
        assert bitwise_equal(value, base[key]), key


def test_a_weight_changed_while_merged_keeps_the_change():
    """The record is put back only where merging it again gives what the block holds."""
    model = exactness_model(torch.bfloat16)[0]
    la.apply(model, rank=4)
    randomize_adapters(model, std=0.5)
    la.merge(model)
    (adapter,) = attach.layer_adapters(model).values()
    assert adapter._lost, "bf16 with large updates loses bits"
    raw = model._parameters["weight"]
    with torch.no_grad():
        raw.add_(1.0)  # e.g. another tool edits the merged weight
    expected = adapter._without(next(iter(adapter.targets.values())), raw.detach().clone())
    la.unmerge(model)
    assert bitwise_equal(raw.detach(), expected)


def test_merge_without_exactness_keeps_nothing():
    model = la.apply(exactness_model(torch.bfloat16)[0], rank=4)
    randomize_adapters(model, std=0.5)
    la.merge(model, exact=False)
    (adapter,) = attach.layer_adapters(model).values()
    assert adapter._lost == {}


# ----------------------------------------------------------------------------- a hand-written loop


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5)


def test_a_hand_written_loop_on_resnet18_reloads_to_the_same_predictions(tmp_path):
    """model.train() in a user's loop moves the running statistics of every (frozen)
    BatchNorm; the saved adapter carries them, so a fresh base reproduces the model."""
    model = la.apply(resnet18(), rank=2, trainable="fc")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    for _epoch in range(2):
        model.train()
        for batch in range(0, 16, 8):
            loss = nn.functional.cross_entropy(model(images[batch : batch + 8]), labels[batch : batch + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(images)
    saved = la.save_adapter(model, tmp_path / "adapter")
    keys = set(la.adapter_state_dict(model))
    assert "buffers/bn1.running_mean" in keys and "buffers/layer4.1.bn2.num_batches_tracked" in keys
    fresh = la.load_adapter(resnet18().eval(), saved)
    with torch.no_grad():
        got = fresh(images)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_buffers_an_eval_loop_left_alone_are_not_saved():
    model = la.apply(resnet18().eval(), rank=2)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert not [k for k in la.adapter_state_dict(model) if k.startswith("buffers/")]
    assert model_state(model).base  # remembered all the same


def test_saving_after_an_adapted_layer_was_replaced_says_what_happened(tmp_path) -> None:
    model = la.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), rank=2)
    model[2] = nn.Linear(4, 3)  # a new head after apply
    with pytest.raises(la.NotAdaptedError, match="'2' was adapted by 'default' but carries no adapter now"):
        la.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
