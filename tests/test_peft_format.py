"""Adapters exchanged with Hugging Face PEFT, both ways, checked against real PEFT.

Export: ``la.save_adapter(model, folder, format="peft")`` must give the adapted
model's outputs through ``PeftModel.from_pretrained(plain_base, folder)``, unmerged and
after PEFT's ``merge_and_unload``. Import: ``la.load_adapter(plain_base, folder)`` on a
folder PEFT wrote must give PEFT's outputs, unmerged and merged. Where PEFT computes a
layer otherwise, both directions refuse, naming it, and touch nothing.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.adapter import LayerAdapter
from lora_anywhere.peft_format import export_plan
from lora_anywhere.state import model_state
from lora_anywhere.testing import max_error, randomize_adapters, run

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: Largest difference, relative to the output's scale, that still counts as the same output.
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out, unmatched keys of modules to save, …
        yield


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Adapters as after training: random A and B, DoRA magnitudes off ‖W‖, and the
    trainable modules (a new head, BatchNorm statistics) moved from the base."""
    randomize_adapters(model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, LayerAdapter):
            for m in module.magnitudes.values():
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen))
    state = model_state(model)
    for name in state.adapters[la.adapter_names(model)[0]].trainable if state else ():
        for tensor in model.get_submodule(name).state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=gen))


@torch.no_grad()
def randomize_peft(model: nn.Module, seed: int = 0) -> None:
    """A PEFT model as after training: every LoRA tensor and module to save moved."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        if "lora_magnitude_vector" in name:
            tensor.mul_(1 + 0.1 * noise)
        elif "lora_" in name:
            tensor.copy_(0.1 * noise)
        elif "modules_to_save" in name:
            tensor.add_(0.1 * noise)


def export_and_check(make, inputs, folder, **apply_kwargs) -> dict:
    """Adapt, randomise, export; PEFT must reproduce the outputs unmerged and merged.
    Returns the adapter_config.json written."""
    model = la.apply(make(), **apply_kwargs)
    randomize(model)
    expected = run(model, inputs)
    assert max_error(expected, run(make(), inputs)) > 20 * TOL, "the adapter does not change the outputs: the test could not fail"
    la.save_adapter(model, folder, format="peft")
    loaded = PeftModel.from_pretrained(make(), folder).eval()
    assert max_error(expected, run(loaded, inputs)) <= TOL, "PEFT's unmerged outputs differ"
    assert max_error(expected, run(loaded.merge_and_unload(), inputs)) <= TOL, "PEFT's merged outputs differ"
    return json.loads((folder / "adapter_config.json").read_text())


def peft_folder(make, folder, tweak=None, **lora_config) -> tuple[nn.Module, object]:
    """A PEFT LoRA adapter with random weights, saved to `folder`; returns the PEFT model."""
    model = get_peft_model(make(), LoraConfig(**lora_config)).eval()
    randomize_peft(model)
    if tweak is not None:
        tweak(model)
    model.save_pretrained(folder)
    return model


def import_and_check(make, inputs, folder, tweak=None, **lora_config) -> nn.Module:
    """Save a random PEFT adapter, load it with lora_anywhere: PEFT's outputs, unmerged and merged."""
    peft_model = peft_folder(make, folder, tweak, **lora_config)
    expected = run(peft_model, inputs)
    assert max_error(expected, run(make(), inputs)) > 20 * TOL, "the adapter does not change the outputs: the test could not fail"
    model = la.load_adapter(make(), folder)
    assert max_error(expected, run(model, inputs)) <= TOL, "unmerged outputs differ from PEFT's"
    la.merge(model)
    assert max_error(expected, run(model, inputs)) <= TOL, "merged outputs differ from PEFT's"
    la.unmerge(model)
    return model


def assert_import_refused(make, inputs, folder, match: str) -> None:
    """Loading fails with AdapterFileError and leaves the model exactly as it was."""
    model = make()
    run(model, inputs)  # an embedding with max_norm renormalises its rows on the first call
    keys, before = list(model.state_dict()), run(model, inputs)
    with pytest.raises(la.AdapterFileError, match=match):
        la.load_adapter(model, folder)
    assert list(model.state_dict()) == keys and la.adapter_names(model) == []
    assert max_error(before, run(model, inputs)) == 0.0


def zero_left_out(model: nn.Module, left_out: list[str]) -> None:
    """Zero the B of each "layer:target" a partial export left out: what PEFT then computes."""
    with torch.no_grad():
        for where in left_out:
            layer, target = where.split(":")
            adapter = model.get_submodule(layer).lora_adapters["default"]
            adapter.factors[target].B.zero_()


# ----------------------------------------------------------------------------- models


def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval()


def bert():
    transformers = pytest.importorskip("transformers")
    from lora_anywhere_text import tiny_config

    torch.manual_seed(0)
    return transformers.BertModel(tiny_config(transformers.BertConfig)).eval()


def gpt2():
    transformers = pytest.importorskip("transformers")
    from lora_anywhere_text import tiny_config

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(tiny_config(transformers.GPT2Config, n_embd=32, n_layer=2, n_head=2)).eval()


def wav2vec2():
    torchaudio = pytest.importorskip("torchaudio")
    torch.manual_seed(0)
    return torchaudio.models.wav2vec2_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2)], extractor_conv_bias=False,
        encoder_embed_dim=32, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4,
        encoder_num_layers=2, encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=64,
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None,
    ).eval()  # fmt: skip


class TextCNN(nn.Module):
    """Embedding → Conv1d → Linear, with the options PEFT handles otherwise."""

    def __init__(self, dilation: int = 1, padding_mode: str = "zeros", max_norm: float | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16, padding_idx=0, max_norm=max_norm)
        self.conv = nn.Conv1d(16, 24, 3, padding=dilation, dilation=dilation, padding_mode=padding_mode)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.embed(tokens).transpose(1, 2)).relu().mean(-1))


def text_cnn(**kwargs):
    torch.manual_seed(0)
    return TextCNN(**kwargs).eval()


class Tagger(nn.Module):
    """A bidirectional two-layer LSTM between two Linears: eight weights on one module."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.proj(x))[0])


def tagger():
    torch.manual_seed(0)
    return Tagger().eval()


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0] + x)


def attention_block():
    torch.manual_seed(0)
    return AttentionBlock().eval()


def encoder_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)).eval()


IMAGES = (torch.randn(2, 3, 32, 32),)
TOKENS = (torch.randint(1, 100, (2, 7)),)
WORDS = (torch.tensor([[3, 0, 7, 9, 12, 0], [1, 2, 3, 4, 5, 6]]),)
AUDIO = (torch.randn(2, 400),)
SEQUENCE = (torch.randn(2, 5, 6),)
TOKENS_16 = (torch.randn(2, 5, 16),)


# ----------------------------------------------------------------------------- export: real architectures


def test_export_resnet_convs_and_a_new_head(tmp_path):
    config = export_and_check(resnet, IMAGES, tmp_path / "peft", rank=4, targets="Conv2d", trainable=["fc", "bn1"])
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["fc", "bn1"]
    assert "conv1" in config["target_modules"] and "downsample.0" in config["target_modules"]
    assert config["r"] == 4 and config["lora_alpha"] == 4 and not config["rank_pattern"]  # the stem conv is clamped to 3·7·7 > 4


def test_export_vit_q_and_v_of_the_fused_qkv_as_one_block_lora(tmp_path):
    config = export_and_check(vit, IMAGES, tmp_path / "peft", rank=4, alpha=8, targets="attention", trainable="head")
    # q and v are row blocks of qkv: PEFT gets one LoRA on all of qkv, A's stacked (rank 4 + 4), B's in their rows.
    assert config["target_modules"] == ["qkv"] and config["r"] == 8 and config["lora_alpha"] == 16


def test_export_vit_dora_on_row_blocks(tmp_path):
    """The k rows get the magnitude ‖W row‖, so PEFT's DoRA leaves them as they are."""
    config = export_and_check(vit, IMAGES, tmp_path / "peft", rank=2, targets="attention", dora=True)
    assert config["use_dora"] is True


def test_export_bert_query_value_rslora_and_per_layer_ranks(tmp_path):
    config = export_and_check(
        bert, TOKENS, tmp_path / "peft", rank=4, alpha=6, rslora=True, targets=["*.query", "*.value"],
        ranks={"*.layer.0.*": 2}, alphas={"*.layer.1.attention.self.value": 3},
    )  # fmt: skip
    assert config["target_modules"] == ["query", "value"] and config["use_rslora"] is True
    assert config["r"] == 2 and set(config["rank_pattern"].values()) == {4}  # two of four layers have rank 2
    assert len(config["rank_pattern"]) == 2 and len(config["alpha_pattern"]) >= 1


def test_export_gpt2_c_attn_conv1d(tmp_path):
    config = export_and_check(gpt2, TOKENS, tmp_path / "peft", rank=4, targets="*.c_attn")
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]


def test_export_embedding_conv1d_model_with_svd_init(tmp_path):
    """PiSSA-style starts (A0, B0 frozen) export as one LoRA of twice the rank."""
    config = export_and_check(text_cnn, WORDS, tmp_path / "peft", rank=3, init="svd")
    assert config["target_modules"] == ["conv", "embed", "head"] and config["r"] == 6


def test_export_dora_on_conv_and_linear(tmp_path):
    export_and_check(text_cnn, WORDS, tmp_path / "peft", rank=3, targets=["conv", "head"], dora=True)


def test_export_dora_on_embedding_and_conv1d(tmp_path):
    """Their weights are stored transposed (output features are columns), and both
    libraries keep one DoRA magnitude per output feature."""
    export_and_check(text_cnn, WORDS, tmp_path / "embedding", rank=2, targets=["embed"], dora=True)
    export_and_check(gpt2, TOKENS, tmp_path / "conv1d", rank=2, targets="*.c_attn", dora=True)


def test_export_lstm_weights_through_target_parameters(tmp_path):
    """Eight weights of one LSTM: PEFT nests one wrapper per parameter, in registration order."""
    config = export_and_check(tagger, SEQUENCE, tmp_path / "peft", rank=3, targets=["LSTM", "head"])
    assert config["target_modules"] == ["head"] and len(config["target_parameters"]) == 8


def test_export_q_v_of_nn_multihead_attention(tmp_path):
    config = export_and_check(attention_block, TOKENS_16, tmp_path / "peft", rank=2, targets=["MultiheadAttention:q,v", "proj"])
    assert config["target_modules"] == ["attn", "proj"]


def test_export_refuses_multihead_attention_out_proj_which_peft_adds_twice(tmp_path):
    model = la.apply(attention_block(), rank=2, targets="MultiheadAttention")
    with pytest.raises(la.ExportError, match=r"attn:out: PEFT adds a MultiheadAttention's out_proj LoRA twice"):
        la.save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def test_transformer_encoder_layer_bypasses_peft_in_eval_and_is_refused(tmp_path):
    """In eval mode nn.TransformerEncoderLayer's fast path reads the weights of
    self_attn, linear1 and linear2 itself: PEFT's LoRA there changes nothing."""
    peft_model = peft_folder(encoder_layer, tmp_path / "from_peft", r=2, target_modules=["self_attn", "linear1"])
    assert max_error(run(encoder_layer(), TOKENS_16), run(peft_model, TOKENS_16)) == 0.0
    assert_import_refused(
        encoder_layer, TOKENS_16, tmp_path / "from_peft", r"0.linear1 \(Linear\): its parent 0 \(TransformerEncoderLayer\)"
    )
    model = la.apply(encoder_layer(), rank=2, targets=["*.linear1"])
    with pytest.raises(la.ExportError, match=r"reads 0.linear1's weight itself"):
        la.save_adapter(model, tmp_path / "peft", format="peft")


def test_export_wav2vec2_refuses_the_positional_conv_and_partial_leaves_it_out(tmp_path, log_lines):
    model = la.apply(wav2vec2(), rank=4)
    randomize(model)
    with pytest.raises(la.ExportError) as raised:
        la.save_adapter(model, tmp_path / "peft", format="peft")
    message = str(raised.value)
    assert "encoder.transformer.pos_conv_embed.conv:weight: a grouped conv (groups=4)" in message and "weight-normed" in message
    assert "exclude=['encoder.transformer.pos_conv_embed.conv']" in message and "strict=False" in message
    assert not (tmp_path / "peft").exists()

    la.save_adapter(model, tmp_path / "peft", format="peft", strict=False)
    assert any("leaves out 1 adapted tensor" in line and "pos_conv_embed.conv:weight" in line for line in log_lines)
    zero_left_out(model, ["encoder.transformer.pos_conv_embed.conv:weight"])
    expected = run(model, AUDIO)
    loaded = PeftModel.from_pretrained(wav2vec2(), tmp_path / "peft").eval()
    assert max_error(expected, run(loaded, AUDIO)) <= TOL
    assert max_error(expected, run(loaded.merge_and_unload(), AUDIO)) <= TOL


def test_export_graph_linears_and_refuse_gat_attention_vectors(tmp_path, log_lines):
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GATConv, GCNConv

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = GATConv(8, 8, heads=2)
            self.conv2 = GCNConv(16, 4)

        def forward(self, x, edge_index):
            return self.conv2(self.conv1(x, edge_index).relu(), edge_index)

    def make():
        torch.manual_seed(0)
        return Net().eval()

    inputs = (torch.randn(6, 8), torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]]))
    model = la.apply(make(), rank=2)
    randomize(model)
    with pytest.raises(la.ExportError, match=r"conv1:att_src: a 3-D tensor(.|\n)*conv1:att_dst: a 3-D tensor"):
        la.save_adapter(model, tmp_path / "peft", format="peft")
    la.save_adapter(model, tmp_path / "peft", format="peft", strict=False)
    assert any("conv1:att_src" in line and "conv1:att_dst" in line for line in log_lines)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["conv1.lin.weight", "conv2.lin.weight"] and config["target_modules"] == []
    zero_left_out(model, ["conv1:att_src", "conv1:att_dst"])
    expected = run(model, inputs)
    loaded = PeftModel.from_pretrained(make(), tmp_path / "peft").eval()
    assert max_error(expected, run(loaded, inputs)) <= TOL
    assert max_error(expected, run(loaded.merge_and_unload(), inputs)) <= TOL


@pytest.mark.parametrize(
    ("make", "targets", "dora", "match"),
    [
        (lambda: text_cnn(dilation=2), "conv", False, r"conv:weight: PEFT's LoRA conv ignores the layer's dilation=\(2,\)"),
        (
            lambda: text_cnn(padding_mode="reflect"),
            "conv",
            False,
            r"conv:weight: PEFT's LoRA conv pads with zeros, the layer with padding_mode='reflect'",
        ),
        (lambda: text_cnn(max_norm=1.0), "embed", False, r"embed:weight: PEFT renormalises its own LoRA table \(max_norm=1.0\)"),
        (gpt2, None, False, r"transformer.wte:weight: its weight is shared with another module \(Linear; tied weights\)"),
        (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3)), None, False, r"0:weight: PEFT has no LoRA for ConvTranspose layers"),
        (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), None, False, r"0:weight: a grouped conv \(groups=2\)"),
        (lambda: nn.Linear(4, 4), None, False, r"<root>:weight: PEFT cannot adapt the model's root module"),
    ],
    ids=["dilated", "reflect-padded", "max-norm", "tied", "conv-transpose", "grouped", "root"],
)
def test_export_refuses_what_peft_computes_otherwise(tmp_path, make, targets, dora, match):
    model = la.apply(make(), rank=2, targets=targets, dora=dora)
    with pytest.raises(la.ExportError, match=match):
        la.save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def test_tied_modules_to_save_are_refused_both_ways(tmp_path):
    """GPT-2's LM head shares its weight with the token embedding: PEFT trains a copy
    of a module to save, so the embedding would keep the old weight."""
    model = la.apply(gpt2(), rank=2, targets="*.c_attn", trainable="lm_head")
    with pytest.raises(
        la.ExportError, match=r"lm_head \(trainable\): its parameters are shared with a module outside it \(Embedding; tied weights\)"
    ):
        la.save_adapter(model, tmp_path / "peft", format="peft")
    peft_folder(gpt2, tmp_path / "from_peft", r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    assert_import_refused(gpt2, TOKENS, tmp_path / "from_peft", r"lm_head \(module to save\): its parameters are shared")


def test_export_refuses_a_layer_whose_parent_reads_its_weight_itself(tmp_path):
    """torchvision's Swin hands self.qkv.weight to its attention function: PEFT's
    wrapper around qkv would never run (shown here with PEFT itself)."""
    swin = pytest.importorskip("torchvision.models.swin_transformer")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(swin.ShiftedWindowAttention(16, [2, 2], [0, 0], num_heads=2)).eval()

    inputs = (torch.randn(2, 4, 4, 16),)
    model = la.apply(make(), rank=2, targets="*.qkv")
    with pytest.raises(la.ExportError, match=r"0.qkv:weight: its parent 0 \(ShiftedWindowAttention\) reads 0.qkv's weight itself"):
        la.save_adapter(model, tmp_path / "peft", format="peft")
    peft_model = peft_folder(make, tmp_path / "from_peft", r=2, target_modules=["qkv"])
    assert max_error(run(make(), inputs), run(peft_model, inputs)) == 0.0  # PEFT's LoRA on qkv changes nothing
    assert_import_refused(make, inputs, tmp_path / "from_peft", r"reads 0.qkv's weight itself")


def test_export_names_peft_matches_exactly(tmp_path):
    """PEFT matches target_modules, target_parameters and modules_to_save by name
    ending: the export uses names that catch exactly what is adapted, and leaves out
    what PEFT would match beside it."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.enc = nn.ModuleDict({"lstm": nn.LSTM(4, 4, batch_first=True), "fc": nn.Linear(4, 4)})
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.enc["fc"](self.enc["lstm"](self.lstm(x)[0])[0]))

    def make():
        torch.manual_seed(0)
        return Net().eval()

    model = la.apply(make(), rank=2, targets=["lstm", "enc.fc"])  # the top LSTM, not enc.lstm
    plan = export_plan(model)
    assert set(plan.left_out) == {"lstm:weight_ih_l0", "lstm:weight_hh_l0"}
    assert "enc.lstm.weight_ih_l0 would be adapted too" in plan.left_out["lstm:weight_ih_l0"]

    config = export_and_check(make, (torch.randn(2, 3, 4),), tmp_path / "peft", rank=2, targets="enc.fc")
    assert config["target_modules"] == ["enc.fc"]  # "fc" alone would catch the top fc too

    model = la.apply(make(), rank=2, targets="enc.fc", trainable="fc")
    notes = export_plan(model).notes
    assert any("also trains and saves a copy of enc.fc" in note for note in notes)  # PEFT: "enc.fc".endswith("fc")


# ----------------------------------------------------------------------------- import: real architectures


def test_import_resnet_convs_and_modules_to_save(tmp_path):
    model = import_and_check(
        resnet, IMAGES, tmp_path / "from_peft", r=4, lora_alpha=8, target_modules=["conv1", "conv2"], modules_to_save=["fc"]
    )
    assert model_state(model).adapters["default"].trainable == ["fc"]
    assert model.fc.weight.requires_grad and not model.conv1._parameters["weight"].requires_grad


def test_import_vit_qkv_with_dora(tmp_path):
    import_and_check(vit, IMAGES, tmp_path / "from_peft", r=4, target_modules=["qkv"], modules_to_save=["head"], use_dora=True)


def test_import_bert_layers_to_transform_patterns_and_rslora(tmp_path):
    model = import_and_check(
        bert, TOKENS, tmp_path / "from_peft", r=4, lora_alpha=8, target_modules=["query", "value", "dense"], layers_to_transform=[1],
        rank_pattern={"value": 2}, alpha_pattern={r"layer\.1\.attention\.self\.query": 3}, use_rslora=True,
    )  # fmt: skip
    adapted = {row.layer: row.rank for row in la.summary(model).rows}
    assert adapted == {
        "encoder.layer.1.attention.self.query": 4,
        "encoder.layer.1.attention.self.value": 2,
        "encoder.layer.1.attention.output.dense": 4,
        "encoder.layer.1.intermediate.dense": 4,  # PEFT matches "dense" by name ending, as here
        "encoder.layer.1.output.dense": 4,
    }


def test_import_bert_regex_targets_and_embeddings(tmp_path):
    import_and_check(bert, TOKENS, tmp_path / "from_peft", r=2, target_modules=r".*\.(query|key|word_embeddings)")


def test_import_gpt2_c_attn_conv1d(tmp_path):
    import_and_check(gpt2, TOKENS, tmp_path / "from_peft", r=4, target_modules=["c_attn", "c_proj"])


def test_import_embedding_conv1d_with_dora_on_the_conv(tmp_path):
    import_and_check(text_cnn, WORDS, tmp_path / "from_peft", r=3, target_modules=["conv", "head"], use_dora=True)


def test_import_dora_on_embedding_and_conv1d(tmp_path):
    import_and_check(text_cnn, WORDS, tmp_path / "embedding", r=3, target_modules=["embed"], use_dora=True)
    import_and_check(gpt2, TOKENS, tmp_path / "conv1d", r=2, target_modules=["c_attn", "c_proj"], use_dora=True)
    import_and_check(text_cnn, WORDS, tmp_path / "plain", r=3, target_modules=["embed", "conv"])


def test_import_lstm_target_parameters_nested_on_one_module(tmp_path):
    import_and_check(
        tagger, SEQUENCE, tmp_path / "from_peft", r=2, target_modules=[], modules_to_save=["head"],
        target_parameters=["lstm.weight_hh_l1_reverse", "lstm.weight_ih_l0", "lstm.weight_hh_l0"],
        rank_pattern={"lstm.weight_ih_l0": 4},
    )  # fmt: skip


def test_import_graph_linears_through_target_parameters(tmp_path):
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GATConv

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gat = GATConv(8, 8, heads=2)

        def forward(self, x, edge_index):
            return self.gat(x, edge_index)

    def make():
        torch.manual_seed(0)
        return Net().eval()

    inputs = (torch.randn(6, 8), torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]]))
    model = import_and_check(make, inputs, tmp_path / "from_peft", r=2, target_modules=[], target_parameters=["gat.lin.weight"])
    assert [row.rule for row in la.summary(model).rows] == ["torch_geometric.nn.Linear"]


def test_import_wav2vec2_with_excluded_positional_conv(tmp_path):
    import_and_check(
        wav2vec2, AUDIO, tmp_path / "from_peft", r=4, target_modules=["k_proj", "v_proj", "conv"],
        exclude_modules=["pos_conv_embed.conv"],
    )  # fmt: skip


def test_import_refuses_the_wav2vec2_positional_conv(tmp_path):
    peft_folder(wav2vec2, tmp_path / "from_peft", r=4, target_modules=["k_proj", "conv"])
    assert_import_refused(
        wav2vec2, AUDIO, tmp_path / "from_peft", r"encoder.transformer.pos_conv_embed.conv \(Conv\): a grouped conv \(groups=4\)"
    )


def test_import_multihead_attention_and_refuse_its_out_proj_lora(tmp_path):
    def zero_out_proj(model):
        with torch.no_grad():
            model.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()

    model = import_and_check(attention_block, TOKENS_16, tmp_path / "from_peft", tweak=zero_out_proj, r=2, target_modules=["attn"])
    assert {row.target for row in la.summary(model).rows} == {"q", "k", "v"}
    peft_folder(attention_block, tmp_path / "doubled", r=2, target_modules=["attn"])
    assert_import_refused(
        attention_block, TOKENS_16, tmp_path / "doubled", r"out_proj.lora_B.weight: PEFT adds a MultiheadAttention's out_proj"
    )


def test_imported_adapter_trains_merges_and_saves_natively(tmp_path):
    model = import_and_check(bert, TOKENS, tmp_path / "from_peft", r=2, target_modules=["query", "value"])
    before = run(model, TOKENS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_adapters" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(*TOKENS).last_hidden_state[:, :, 0].sum().backward()  # (a mean square would be flat after LayerNorm)
    optimizer.step()
    model.eval()
    after = run(model, TOKENS)
    assert max_error(before, after) > 1e-4
    la.save_adapter(model, tmp_path / "native")
    assert max_error(after, run(la.load_adapter(bert(), tmp_path / "native"), TOKENS)) <= TOL  # merge + unmerge round W
    la.save_adapter(model, tmp_path / "peft_again", format="peft")
    assert max_error(after, run(PeftModel.from_pretrained(bert(), tmp_path / "peft_again").eval(), TOKENS)) <= TOL


def test_export_a_merged_adapter_beside_another(tmp_path):
    """The factors are what is exported: merging changes nothing, and the other adapter is not written."""
    model = la.apply(text_cnn(), rank=2, targets="conv", name="other")
    la.apply(model, rank=3, name="mine")
    randomize(model)
    la.set_adapter(model, "mine")
    expected = run(model, WORDS)
    la.merge(model, "mine")
    la.save_adapter(model, tmp_path / "peft", name="mine", format="peft")
    loaded = PeftModel.from_pretrained(text_cnn(), tmp_path / "peft").eval()
    assert max_error(expected, run(loaded, WORDS)) <= TOL
    with pytest.raises(la.NotAdaptedError, match="several adapters"):
        la.save_adapter(model, tmp_path / "peft", format="peft")
    with pytest.raises(la.LoraError, match="format must be one of 'native', 'peft'"):
        la.save_adapter(model, tmp_path / "peft", name="mine", format="PEFT")


def test_import_beside_an_adapter_and_under_another_name(tmp_path):
    peft_model = peft_folder(text_cnn, tmp_path / "from_peft", r=2, target_modules=["conv", "head"])
    model = la.apply(text_cnn(), rank=2, targets="embed")
    la.load_adapter(model, tmp_path / "from_peft", name="peft")
    assert la.adapter_names(model) == ["default", "peft"]
    la.set_adapter(model, "peft")
    assert max_error(run(peft_model, WORDS), run(model, WORDS)) <= TOL
    with pytest.raises(la.AlreadyAdaptedError):
        la.load_adapter(model, tmp_path / "from_peft", name="peft")


def test_native_and_peft_round_trips_give_the_same_adapter(tmp_path):
    """native → PEFT → native → PEFT keeps every output (the way back in bit for bit)."""
    model = la.apply(text_cnn(), rank=3, trainable="head")
    randomize(model)
    expected = run(model, WORDS)
    la.save_adapter(model, tmp_path / "peft", format="peft")
    back = la.load_adapter(text_cnn(), tmp_path / "peft")
    assert max_error(expected, run(back, WORDS)) == 0.0
    la.save_adapter(back, tmp_path / "peft2", format="peft")
    loaded = PeftModel.from_pretrained(text_cnn(), tmp_path / "peft2").eval()
    assert max_error(expected, run(loaded, WORDS)) <= TOL


# ----------------------------------------------------------------------------- import: refusals


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("IA3", lambda: peft.IA3Config(target_modules=["conv", "head"], feedforward_modules=["head"])),
        ("LOHA", lambda: peft.LoHaConfig(r=2, target_modules=["head"])),
        ("PROMPT_TUNING", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    ],
)
def test_import_refuses_other_peft_types(tmp_path, kind, config):
    folder = tmp_path / "other"
    folder.mkdir()
    config().save_pretrained(folder)
    assert_import_refused(text_cnn, WORDS, folder, rf"is a PEFT {kind} adapter; lora_anywhere reads PEFT LoRA adapters")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, r"bias='all' trains the adapted layers' biases"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' changes the base weights"),
        ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
        ({"lora_bias": True}, r"PEFT option lora_bias=True is not supported"),
        ({"use_qalora": True}, r"PEFT option use_qalora=True is not supported"),
        ({"layer_replication": [[0, 1]]}, r"PEFT option layer_replication=\[\[0, 1\]\] is not supported"),
        ({"velora_config": {"rank": 2}}, r"PEFT option velora_config="),
        ({"some_future_variant": True}, r"PEFT option some_future_variant=True is not supported"),
        ({"target_modules": "all-linear"}, r"target_modules='all-linear' is resolved by PEFT from the transformers model class"),
        ({"target_modules": None}, r"names no target_modules"),
        ({"r": "eight"}, r"not a valid PEFT LoRA config \(r must be a positive integer, got 'eight'\)"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be in \[0, 1\), got 1.5"),
        ({"target_modules": "conv(("}, r"not a valid PEFT LoRA config"),
        ({"rank_pattern": {"(": 2}}, r"not a valid PEFT LoRA config"),
    ],
)
def test_import_refuses_options_it_cannot_reproduce(tmp_path, change, match):
    folder = tmp_path / "from_peft"
    peft_folder(text_cnn, folder, r=2, target_modules=["conv", "embed", "head"])
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    assert_import_refused(text_cnn, WORDS, folder, match)


@pytest.mark.parametrize(
    ("make", "lora_config", "match"),
    [
        (lambda: text_cnn(dilation=2), dict(target_modules=["conv"]), r"conv \(Conv\): PEFT's LoRA conv ignores the layer's dilation"),
        (lambda: text_cnn(max_norm=1.0), dict(target_modules=["embed"]), r"embed \(Embedding\): PEFT renormalises its own LoRA table"),
        (
            gpt2,
            dict(target_modules=["c_attn", "wte"]),
            r"transformer.wte \(Embedding\): its weight is shared with another module \(Linear; tied weights\)",
        ),
        (attention_block, dict(target_modules=["out_proj"]), r"its parent attn \(MultiheadAttention\) reads attn.out_proj's weight itself"),
    ],
    ids=["dilated", "max-norm", "tied", "mha-out-proj"],
)
def test_import_refuses_layers_peft_computes_otherwise(tmp_path, make, lora_config, match):
    peft_folder(make, tmp_path / "from_peft", r=2, **lora_config)
    inputs = {gpt2: TOKENS, attention_block: TOKENS_16}.get(make, WORDS)
    assert_import_refused(make, inputs, tmp_path / "from_peft", match)


def test_import_refuses_configs_peft_itself_refuses(tmp_path):
    """A module that is both a target module and a target parameter's holder, a
    target inside another target, a module PEFT has no LoRA layer for."""
    folder = tmp_path / "from_peft"
    peft_folder(tagger, folder, r=2, target_modules=["head"])
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for change, match in [
        (
            {"target_modules": ["proj", "head"], "target_parameters": ["proj.weight"]},
            r"proj.weight: its module is a target module too",
        ),
        ({"target_modules": ["head", "lstm"]}, r"lstm \(LSTM\): PEFT has no LoRA layer for it"),
        # modules_to_save matches by name ending: "oj" catches proj, which also gets a LoRA
        ({"target_modules": ["proj"], "modules_to_save": ["oj"]}, r"proj \(Linear\): it lies in proj, which modules_to_save also names"),
    ]:
        config_file.write_text(json.dumps({**config, **change}))
        assert_import_refused(tagger, SEQUENCE, folder, match)
    peft_folder(attention_block, folder, r=2, target_modules=["proj"])
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "target_modules": ["attn", "out_proj"]}))
    assert_import_refused(attention_block, TOKENS_16, folder, r"attn.out_proj: PEFT would target it and attn, which holds it")


def test_import_refuses_a_folder_that_does_not_fit_the_model(tmp_path):
    """Made for another model: missing tensors, other shapes and tensors with no
    place are each named; PEFT would load it with warnings and other numbers."""
    peft_folder(lambda: text_cnn(), tmp_path / "from_peft", r=2, target_modules=["conv", "embed"], modules_to_save=["head"])

    def wider():
        model = text_cnn()
        model.conv = nn.Conv1d(16, 32, 3, padding=1)
        model.head = nn.Linear(32, 3)
        return model

    assert_import_refused(wider, WORDS, tmp_path / "from_peft", r"conv.lora_B.weight: shape \(24, 2, 1\), PEFT expects \(32, 2, 1\)")
    files = tmp_path / "from_peft"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(files / "adapter_model.safetensors"))
    extra = {**tensors, "base_model.model.stray.lora_A.weight": torch.zeros(2, 2)}
    save_file(extra, str(files / "adapter_model.safetensors"))
    assert_import_refused(text_cnn, WORDS, files, r"stray.lora_A.weight: a tensor the config gives no place on this model")
    del tensors["base_model.model.embed.lora_embedding_B"]
    save_file(tensors, str(files / "adapter_model.safetensors"))
    assert_import_refused(text_cnn, WORDS, files, r"embed.lora_embedding_B: missing from the file")


def test_import_refuses_pickles_corrupt_files_and_ambiguous_folders(tmp_path):
    folder = tmp_path / "from_peft"
    peft_folder(text_cnn, folder, r=2, target_modules=["conv"])
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert_import_refused(text_cnn, WORDS, folder, "is corrupt or not a safetensors file")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    assert_import_refused(text_cnn, WORDS, folder, r"adapter_model.bin, a pickle, which lora_anywhere never loads")
    (folder / "adapter_model.bin").unlink()
    la.save_adapter(la.apply(text_cnn(), rank=2), tmp_path / "native")
    for file in (tmp_path / "native").iterdir():
        file.rename(folder / file.name)
    assert_import_refused(text_cnn, WORDS, folder, "holds both a lora_anywhere adapter")


def test_peft_cannot_mistake_a_native_folder_for_its_own(tmp_path):
    """The native folder no longer borrows PEFT's file names: PEFT says the folder is
    not one of its own instead of loading part of it."""
    la.save_adapter(la.apply(text_cnn(), rank=2), tmp_path / "native")
    assert not (tmp_path / "native" / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(text_cnn(), tmp_path / "native")


# ----------------------------------------------------------------------------- CLI


def test_cli_convert_both_ways_and_inspect(tmp_path, capsys):
    from lora_anywhere.cli import main
    from lora_anywhere.cli.model_spec import ModelSpec

    spec = ModelSpec("hf:BertModel")
    make = lambda: spec.build().eval()  # noqa: E731  the CLI's base: the same seed, the same weights
    peft_model = peft_folder(make, tmp_path / "from_peft", r=2, target_modules=["query", "value"])
    expected = run(peft_model, TOKENS)
    assert main(["convert", str(tmp_path / "from_peft"), str(tmp_path / "native"), "--to", "native", "--model", "hf:BertModel"]) == 0
    assert "from a PEFT folder" in capsys.readouterr().out
    assert max_error(expected, run(la.load_adapter(make(), tmp_path / "native"), TOKENS)) <= TOL
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "peft"), "--to", "peft", "--model", "hf:BertModel"]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    assert max_error(expected, run(PeftModel.from_pretrained(make(), tmp_path / "peft").eval(), TOKENS)) <= TOL

    assert main(["inspect", "hf:BertModel", "--adapter", str(tmp_path / "peft"), "--peft"]) == 0
    assert "PEFT export of adapter 'default': keeps 4 adapted tensors in 4 PEFT LoRA layers (4 Linear)" in capsys.readouterr().out


def test_cli_convert_refuses_and_partial_writes_the_rest(tmp_path, capsys):
    from lora_anywhere.cli import main

    la.save_adapter(la.apply(gpt2(), rank=2), tmp_path / "native")  # the tied token embedding cannot go to PEFT
    args = ["convert", str(tmp_path / "native"), str(tmp_path / "peft"), "--to", "peft", "--model", "hf:GPT2LMHeadModel"]
    args += ["--model-arg", "n_embd=32", "--model-arg", "n_layer=2", "--model-arg", "n_head=2"]
    assert main(args) == 1
    assert "transformer.wte:weight: its weight is shared" in capsys.readouterr().err and not (tmp_path / "peft").exists()
    assert main([*args, "--partial"]) == 0
    assert "1 adapted tensors left out" in capsys.readouterr().out and (tmp_path / "peft" / "adapter_config.json").is_file()
    assert main(["inspect", "hf:GPT2LMHeadModel", *args[-6:], "--adapter", str(tmp_path / "native"), "--peft"]) == 0
    assert "leaves out 1:\n  - transformer.wte:weight" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("keep me")
    assert main([*args[:2], str(tmp_path), *args[3:], "--partial"]) == 1
    assert "is not an adapter folder" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "keep me"
