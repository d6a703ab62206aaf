"""The text plugin: transformers models adapt exactly with full coverage; GPT-2's
Conv1D on both routes; tied input/output embeddings get one adapter that every holder
reads (a core behaviour, tested here on plain torch first); the text presets."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.models import build_model
from lora_anywhere.registry import registry
from lora_anywhere.testing import check_exact, randomize_adapters, run

VOCAB = 100
IDS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- tied weights (core)


class TiedLM(nn.Module):
    """The smallest tied language model: the head is the embedding table, shared."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(ids))))


@pytest.mark.parametrize("path", ["auto", "weight"])
def test_tied_weights_get_one_adapter_seen_by_every_holder(path: str) -> None:
    check_exact(TiedLM, (IDS,), path=path)
    model = la.apply(TiedLM(), rank=4, path=path)
    assert [row.layer for row in la.summary(model).rows] == ["embed", "body"], "the tied head must not get a second adapter"
    randomize_adapters(model)
    torch.testing.assert_close(model.head.weight, model.embed.weight)
    assert not torch.equal(model.head.weight, model.embed._parameters["weight"]), "the head does not see ΔW"
    summary = la.summary(model)
    assert summary.covered_params == summary.matrix_params == VOCAB * 16 + 16 * 16
    la.merge(model)
    assert model.head.weight is model.embed.weight, "merging untied the weights"
    la.remove(model)
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding


def test_tied_weights_adapter_lives_where_first_selected() -> None:
    check_exact(TiedLM, (IDS,), targets="head")
    model = la.apply(TiedLM(), rank=4, targets="head")
    la.apply(model, rank=2, name="second")  # the table stays on the head's adapters
    assert [(row.layer, row.rank) for row in la.summary(model).rows if row.layer != "body"] == [("head", 4), ("head", 2)]
    randomize_adapters(model)
    out = run(model, (IDS,))
    la.merge(model)
    torch.testing.assert_close(out, run(model, (IDS,)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- transformers

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lora_anywhere_text import Conv1DRule, build  # noqa: E402

ENC_DEC_IDS = dict(input_ids=IDS, decoder_input_ids=IDS[:, :5])
SPECIAL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: class name → (config overrides, inputs). Sizes come from the plugin's tiny defaults.
ZOO: dict[str, tuple[dict[str, Any], Any]] = {
    "BertModel": (dict(vocab_size=VOCAB), dict(input_ids=IDS)),
    "BertForMaskedLM": (dict(vocab_size=VOCAB), dict(input_ids=IDS)),
    "DistilBertModel": (dict(vocab_size=VOCAB), dict(input_ids=IDS)),
    "RobertaModel": (dict(vocab_size=VOCAB), dict(input_ids=IDS)),
    "GPT2LMHeadModel": (SPECIAL, dict(input_ids=IDS)),
    "T5ForConditionalGeneration": (SPECIAL, ENC_DEC_IDS),
    "BartForConditionalGeneration": (SPECIAL, ENC_DEC_IDS),
    "WhisperForConditionalGeneration": (
        dict(SPECIAL, decoder_start_token_id=1, num_mel_bins=16, max_source_positions=8, max_target_positions=16),
        dict(input_features=torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), decoder_input_ids=IDS[:, :5]),
    ),
    "ViTModel": ({}, dict(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))),
    "LlamaForCausalLM": (SPECIAL, dict(input_ids=IDS)),
}


def hf(name: str, **overrides: Any) -> Callable[[], nn.Module]:
    config = {**ZOO[name][0], **overrides} if name in ZOO else overrides
    return lambda: build(name, **config)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_exact_with_full_coverage(name: str, coverage_table) -> None:
    report = check_exact(hf(name), ZOO[name][1])
    coverage_table("text", name, report)
    assert report.coverage >= 0.99, f"{name}: only {report.coverage:.2%} of the weight matrices are adapted"


def test_text_plugin_is_active_with_its_rule_and_presets() -> None:
    info = {p.name: p for p in la.plugins()}["text"]
    assert info.status == "active", info
    assert info.rules == ["transformers.pytorch_utils.Conv1D"]
    presets = registry().presets
    assert {"text-attention", "text-mlp"} <= set(presets)


def test_hf_model_source_builds_tiny_random_models() -> None:
    model = build_model("hf:GPT2LMHeadModel", **SPECIAL)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert (model.config.n_embd, model.config.n_layer, model.config.vocab_size) == (32, 2, VOCAB)
    t5 = build_model("hf:T5Model")
    assert (t5.config.d_model, t5.config.num_layers, t5.config.num_decoder_layers, t5.config.d_ff) == (32, 2, 2, 64)
    with pytest.raises(ValueError, match="no model class 'NoSuchModel'"):
        build_model("hf:NoSuchModel")


# ----------------------------------------------------------------------------- GPT-2 Conv1D


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_gpt2_conv1d_merged_equals_unmerged(path: str) -> None:
    report = check_exact(hf("GPT2LMHeadModel"), ZOO["GPT2LMHeadModel"][1], targets="Conv1D", path=path)
    assert report.adapted == 8  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj × 2 blocks
    model = la.apply(hf("GPT2LMHeadModel")(), targets="Conv1D", path=path)
    assert {row.path for row in la.summary(model).rows} == {path}


def test_conv1d_paths_agree_in_output_and_adapter_gradients() -> None:
    torch.manual_seed(0)
    layer = Conv1D(12, 6)
    x = torch.randn(3, 5, 6)
    results = []
    for path in ("activation", "weight"):
        model = nn.Sequential(Conv1D(12, 6))
        model.load_state_dict({"0.weight": layer.weight, "0.bias": layer.bias})
        la.apply(model, rank=3, alpha=6, path=path)
        randomize_adapters(model, std=0.3)
        y = model(x)
        y.square().sum().backward()
        f = model[0].lora_adapters["default"].factors["weight"]
        results.append((y.detach(), f.A.grad.clone(), f.B.grad.clone(), f.delta().detach()))
    (y_act, ga_act, gb_act, delta), (y_w, ga_w, gb_w, _) = results
    expected = x @ (layer.weight + delta) + layer.bias  # W is in × out: ΔW is too
    torch.testing.assert_close(y_act, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_w, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga_act, ga_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb_act, gb_w, rtol=1e-5, atol=1e-5)


def test_conv1d_rule_sees_in_by_out_matrix() -> None:
    assert [t.tensor for t in Conv1DRule().targets(Conv1D(12, 6))] == ["weight"]
    model = la.apply(nn.Sequential(Conv1D(12, 6)), rank=2)
    f = model[0].lora_adapters["default"].factors["weight"]
    assert (tuple(f.B.shape), tuple(f.A.shape)) == ((6, 2), (2, 12))


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_keeps_adapter_gradients(reentrant: bool) -> None:
    """Checkpointed blocks recompute their forward in the backward; with the base
    frozen, the adapters must still get gradients (a known trap with reentrant
    checkpointing and frozen inputs)."""
    model = hf("GPT2LMHeadModel")()
    la.apply(model, rank=4, targets="text-attention")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.endswith(".B")}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ----------------------------------------------------------------------------- tied embeddings in transformers


@pytest.mark.parametrize(
    "name, table, readers",
    [
        ("GPT2LMHeadModel", "transformer.wte", ["lm_head"]),
        ("BertForMaskedLM", "bert.embeddings.word_embeddings", ["cls.predictions.decoder"]),
        ("T5ForConditionalGeneration", "shared", ["encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]),
    ],
)
def test_tied_input_and_output_embeddings(name: str, table: str, readers: list[str]) -> None:
    model = hf(name)().eval()
    shared = model.get_submodule(table).weight
    assert all(model.get_submodule(r).weight is shared for r in readers), "the model is not tied as this test assumes"
    la.apply(model, rank=4)
    layers = [row.layer for row in la.summary(model).rows]
    assert table in layers and not set(readers) & set(layers), "a tied table must carry exactly one adapter"
    randomize_adapters(model)
    for r in readers:
        torch.testing.assert_close(model.get_submodule(r).weight, model.get_submodule(table).weight)
    out = run(model, ZOO[name][1])
    la.merge(model)
    assert all(model.get_submodule(r).weight is model.get_submodule(table).weight for r in readers)
    for a, b in zip(out, run(model, ZOO[name][1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- presets

ATTENTION = {
    "BertModel": {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"},
    "DistilBertModel": {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"},
    "GPT2LMHeadModel": {"attn.c_attn", "attn.c_proj"},
    "T5ForConditionalGeneration": {
        "SelfAttention.q",
        "SelfAttention.k",
        "SelfAttention.v",
        "SelfAttention.o",
        "EncDecAttention.q",
        "EncDecAttention.k",
        "EncDecAttention.v",
        "EncDecAttention.o",
    },
    "BartForConditionalGeneration": {f"{a}.{p}" for a in ("self_attn", "encoder_attn") for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "LlamaForCausalLM": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
}
MLP = {
    "BertModel": {"intermediate.dense", "output.dense"},
    "DistilBertModel": {"ffn.lin1", "ffn.lin2"},
    "GPT2LMHeadModel": {"mlp.c_fc", "mlp.c_proj"},
    "T5ForConditionalGeneration": {"DenseReluDense.wi", "DenseReluDense.wo"},
    "BartForConditionalGeneration": {"fc1", "fc2"},
    "LlamaForCausalLM": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
}


def _selected(model: nn.Module, preset: str) -> set[str]:
    la.apply(model, targets=preset, rank=2)
    return {row.layer for row in la.summary(model).rows}


def _ending_in(model: nn.Module, suffixes: set[str]) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and any(n.endswith("." + s) for s in suffixes)}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_text_presets_pick_attention_and_mlp_projections(name: str) -> None:
    model = hf(name)()
    attention = _ending_in(model, ATTENTION[name])
    mlp = _ending_in(model, MLP[name]) - attention  # BERT: "output.dense" ends both
    assert attention and mlp
    assert _selected(hf(name)(), "text-attention") == attention
    assert _selected(hf(name)(), "text-mlp") == mlp


def test_text_presets_leave_non_text_layers_alone() -> None:
    """The presets match projection names on Linear/Conv1D only: a conv called "k" or a
    vision block's "qkv" is not taken."""
    model = nn.Sequential()
    model.add_module("k", nn.Conv1d(4, 4, 1))
    model.add_module("qkv", nn.Linear(4, 12))
    model.add_module("q", nn.Linear(4, 4))
    la.apply(model, targets="text-attention", rank=2)
    assert [row.layer for row in la.summary(model).rows] == ["q"]


def test_text_plugin_is_inactive_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without transformers the plugin's import fails with ModuleNotFoundError naming it,
    which the core reports as "inactive", never as a crash."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "lora_anywhere_text", raising=False)
    with pytest.raises(ModuleNotFoundError) as missing:
        importlib.import_module("lora_anywhere_text")
    assert missing.value.name == "transformers"
