"""The public API: selection, options, errors, state, and all-or-nothing behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.encoder = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.encoder(self.bn(self.stem(x))).flatten(2).transpose(1, 2)
        h = self.attn(h, h, h)[0]
        return self.head(h.mean(1))


def make(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(2, 3, 6, 6)


def adapted_layers(model):
    return sorted({(r.layer, r.target) for r in la.summary(model).rows})


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (nn.Linear, {("attn.out_proj", "weight"), ("head", "weight")}),  # exact: MHA reads out_proj.weight
        ("Conv2d", {("stem", "weight"), ("encoder.0", "weight"), ("encoder.2", "weight")}),
        ("encoder.*", {("encoder.0", "weight"), ("encoder.2", "weight")}),
        (r"encoder\.[0-1]", {("encoder.0", "weight")}),
        ("MultiheadAttention:q,v", {("attn", "q"), ("attn", "v")}),
        (lambda name, m: name == "head", {("head", "weight")}),
        (["stem", "head"], {("stem", "weight"), ("head", "weight")}),
    ],
)
def test_targets(targets, expected):
    model = la.apply(make(), targets=targets)
    assert set(adapted_layers(model)) == expected


def test_default_adapts_every_layer_and_mha_claims_out_proj():
    model = la.apply(make())
    assert adapted_layers(model) == sorted(
        [("attn", t) for t in "qkv"]
        + [("attn", "out"), ("encoder.0", "weight"), ("encoder.2", "weight"), ("head", "weight"), ("stem", "weight")]
    )


def test_exclude():
    model = la.apply(make(), exclude=["stem", "MultiheadAttention:k"])
    layers = adapted_layers(model)
    assert ("stem", "weight") not in layers and ("attn", "k") not in layers and ("attn", "q") in layers


def test_rank_and_alpha_overrides():
    model = la.apply(make(), rank=2, alpha=4, ranks={"head": 4}, alphas={"encoder.*": 1.0})
    rows = {r.layer: r for r in la.summary(model).rows}
    assert rows["head"].rank == 4 and rows["stem"].rank == 2
    factors = dict(model.named_modules())
    assert factors["encoder.0.lora_adapters.default.factors.weight"].scale == pytest.approx(0.5)
    assert factors["stem.lora_adapters.default.factors.weight"].scale == pytest.approx(2.0)
    assert factors["head.lora_adapters.default.factors.weight"].scale == pytest.approx(1.0)


def test_rank_is_clamped_to_each_layers_full_rank():
    model = la.apply(make(), rank=16)
    rows = {r.layer: r.rank for r in la.summary(model).rows}
    assert rows["head"] == 5 and rows["stem"] == 8 and rows["encoder.2"] == 16


# ----------------------------------------------------------------------------- trainable & freezing


def test_only_adapters_and_trainable_modules_train():
    model = la.apply(make(), trainable=["head", "bn"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "bn.weight", "bn.bias"} <= trainable
    assert all(".lora_adapters." in n or n.startswith(("head.", "bn.")) for n in trainable)
    assert not any(n.startswith("head.lora_adapters") for n in trainable), "a trainable module is not also adapted"


def test_trainable_batchnorm_statistics_are_saved(tmp_path):
    model = la.apply(make().train(), trainable="bn")
    model(X)  # moves the running statistics
    la.save_adapter(model, tmp_path / "a")
    fresh = la.load_adapter(make(), tmp_path / "a")
    torch.testing.assert_close(fresh.bn.running_mean, model.bn.running_mean)
    assert fresh.bn.num_batches_tracked.item() == 1


def test_remove_restores_requires_grad_and_keys():
    model = make()
    model.head.bias.requires_grad_(False)
    keys = list(model.state_dict())
    la.apply(model)
    la.remove(model)
    assert list(model.state_dict()) == keys
    assert not model.head.bias.requires_grad and model.head.weight.requires_grad
    assert la.adapter_names(model) == []


# ----------------------------------------------------------------------------- errors


def test_targets_matching_nothing():
    with pytest.raises(la.TargetError, match="'encodr.*' matched no layer.*adaptable layers in this model: Conv2d ×3"):
        la.apply(make(), targets="encodr.*")
    with pytest.raises(la.TargetError, match="has no target 'x'; its targets are q, k, v, out"):
        la.apply(make(), targets="MultiheadAttention:x")
    with pytest.raises(la.TargetError, match="trainable 'nope' matched no module"):
        la.apply(make(), trainable="nope")
    with pytest.raises(la.TargetError, match="nothing to adapt"):
        la.apply(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(la.RankError, match="positive integer"):
        la.apply(make(), rank=rank)


def test_rank_too_large():
    with pytest.raises(la.RankError, match="larger than its full rank 5"):
        la.apply(make(), ranks={"head": 6})
    with pytest.raises(la.RankError, match="larger than the full rank of every selected layer"):
        la.apply(nn.Linear(3, 3), rank=4)


@pytest.mark.parametrize(("option", "value"), [("alpha", 0), ("dropout", 1.0), ("path", "fast"), ("name", "a.b")])
def test_bad_options(option, value):
    with pytest.raises(la.LoraError):
        la.apply(make(), **{option: value})


def test_apply_twice_needs_a_new_name():
    model = la.apply(make())
    with pytest.raises(la.AlreadyAdaptedError, match="name='another'"):
        la.apply(model)
    la.apply(model, name="second", targets="head")
    assert la.adapter_names(model) == ["default", "second"]


def test_failed_apply_leaves_the_model_as_it_was():
    model = make()
    model.head.lora_adapters = "taken"  # makes the last layer fail during install
    keys = list(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = model(X)
    with pytest.raises(la.LoraError, match="already has an attribute 'lora_adapters'"):
        la.apply(model)
    assert list(model.state_dict()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert la.adapter_names(model) == []
    torch.testing.assert_close(model(X), before)


def test_merge_without_adapter():
    with pytest.raises(la.NotAdaptedError, match="apply"):
        la.merge(make())


# ----------------------------------------------------------------------------- save & load


def test_save_load_round_trip_and_files(tmp_path):
    model = la.apply(make(), rank=3, trainable="head")
    randomize_adapters(model)
    expected = model(X)
    folder = la.save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "lora_anywhere_config.json").read_text())
    assert config["rank"] == 3 and config["layers"]["attn"]["rule"] == "torch.nn.MultiheadAttention"
    assert config["layers"]["stem"]["targets"]["weight"]["shape"] == [8, 3, 3, 3]
    assert config["library_version"] == la.__version__
    keys = set(la.adapter_state_dict(model))
    assert not any("encoder.0.weight" == k.split("/")[-1] for k in keys)
    assert "trainable/head.weight" in keys and "lora/attn/q/A" in keys
    torch.testing.assert_close(la.load_adapter(make(), folder)(X), expected)


def test_save_is_atomic_and_overwrites(tmp_path):
    model = la.apply(make())
    la.save_adapter(model, tmp_path / "a")
    randomize_adapters(model)
    la.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    torch.testing.assert_close(la.load_adapter(make(), tmp_path / "a")(X), model(X))


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Written through a temporary file, yet readable like any file the user writes."""
    import os

    mask = os.umask(0o022)
    try:
        folder = la.save_adapter(la.apply(make()), tmp_path / "a")
    finally:
        os.umask(mask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()} == {0o644}, folder


def test_load_onto_other_shapes_names_the_mismatch(tmp_path):
    la.save_adapter(la.apply(make()), tmp_path / "a")
    other = make()
    other.head = nn.Linear(16, 7)
    keys = list(other.state_dict())
    with pytest.raises(la.ShapeMismatchError, match=r"layer 'head' target weight: saved for shape \(5, 16\), the model has \(7, 16\)"):
        la.load_adapter(other, tmp_path / "a")
    assert list(other.state_dict()) == keys and la.adapter_names(other) == []
    del other.attn
    with pytest.raises(la.ShapeMismatchError, match="layer 'attn'"):
        la.load_adapter(other, tmp_path / "a")


def test_missing_and_corrupt_adapter_files(tmp_path):
    with pytest.raises(la.AdapterFileError, match="no adapter at"):
        la.load_adapter(make(), tmp_path / "nothing")
    folder = la.save_adapter(la.apply(make()), tmp_path / "a")
    (folder / "lora_anywhere_adapter.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(la.AdapterFileError, match="corrupt or not a safetensors file"):
        la.load_adapter(make(), folder)
    (folder / "lora_anywhere_config.json").write_text("{not json")
    with pytest.raises(la.AdapterFileError, match="not a valid lora_anywhere adapter config"):
        la.load_adapter(make(), folder)
    (folder / "lora_anywhere_config.json").unlink()
    with pytest.raises(la.AdapterFileError, match="has no lora_anywhere_config.json"):
        la.load_adapter(make(), folder)


def test_summary_table():
    text = str(la.summary(la.apply(make(), rank=2)))
    assert "torch.nn.MultiheadAttention" in text and "matrix weights covered" in text
    assert la.summary(make()).coverage == 0.0


def test_dropout_trains_but_is_identity_in_eval():
    model = la.apply(make(), dropout=0.5, targets="head", path="activation")
    randomize_adapters(model)
    assert torch.equal(model.eval()(X), model(X))
    model.train()
    outs = {tuple(model.head(torch.ones(1, 16)).detach().flatten().tolist()) for _ in range(5)}
    assert len(outs) > 1


def test_remove_an_adapter_of_trainable_modules_only():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    la.apply(model, trainable="1")
    la.remove(model)
    assert model_state_is_gone(model) and model[1].weight.requires_grad


def model_state_is_gone(model):
    return la.adapter_names(model) == [] and "_lora_anywhere_state" not in model.__dict__
