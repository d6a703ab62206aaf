"""The speech plugin: every torchaudio model family adapts exactly, with ≥ 99 % of its
weight matrices covered, on small configs and 0.25 s of 16 kHz audio."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

torchaudio = pytest.importorskip("torchaudio")
M = torchaudio.models

import lora_anywhere as la  # noqa: E402
from lora_anywhere.models import build_model  # noqa: E402
from lora_anywhere.testing import check_exact, max_error, randomize_adapters, run  # noqa: E402

WAVE = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))  # 0.25 s at 16 kHz

#: A wav2vec2-style encoder small enough for a unit test: 3 conv feature layers
#: (4000 samples → 199 frames), 2 transformer layers of width 32.
SMALL_W2V2: dict[str, Any] = dict(
    extractor_mode="group_norm",
    extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2), (16, 2, 2)],
    extractor_conv_bias=False,
    encoder_embed_dim=32,
    encoder_projection_dropout=0.0,
    encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4,
    encoder_num_layers=2,
    encoder_num_heads=2,
    encoder_attention_dropout=0.0,
    encoder_ff_interm_features=64,
    encoder_ff_interm_dropout=0.0,
    encoder_dropout=0.0,
    encoder_layer_norm_first=False,
    encoder_layer_drop=0.0,
)
FRAMES = 199


def small_wav2vec2() -> nn.Module:
    return M.wav2vec2_model(**SMALL_W2V2, aux_num_out=10)


def small_wav2vec2_prenorm() -> nn.Module:
    return M.wav2vec2_model(
        **{**SMALL_W2V2, "extractor_mode": "layer_norm", "extractor_conv_bias": True, "encoder_layer_norm_first": True}, aux_num_out=None
    )


def small_wavlm() -> nn.Module:
    return M.wavlm_model(**SMALL_W2V2, encoder_num_buckets=32, encoder_max_distance=64, aux_num_out=None)


def small_hubert_pretrain() -> nn.Module:
    return M.hubert_pretrain_model(
        **SMALL_W2V2,
        mask_prob=0.8,
        mask_selection="static",
        mask_other=0.0,
        mask_length=2,
        no_mask_overlap=False,
        mask_min_space=1,
        mask_channel_prob=0.0,
        mask_channel_selection="static",
        mask_channel_other=0.0,
        mask_channel_length=2,
        no_mask_channel_overlap=False,
        mask_channel_min_space=1,
        skip_masked=False,
        skip_nomask=False,
        num_classes=10,
        final_dim=16,
        feature_grad_mult=None,
    )


def hubert_pretrain_inputs(model: nn.Module) -> Any:
    # Pre-training masks frames at random even in eval mode: the same mask every call.
    torch.manual_seed(1)
    return model(WAVE, torch.randint(0, 10, (2, FRAMES), generator=torch.Generator().manual_seed(2)))


def small_rnnt() -> nn.Module:
    return M.emformer_rnnt_model(
        input_dim=16,
        encoding_dim=16,
        num_symbols=10,
        segment_length=4,
        right_context_length=1,
        time_reduction_input_dim=16,
        time_reduction_stride=2,
        transformer_num_heads=2,
        transformer_ffn_dim=16,
        transformer_num_layers=1,
        transformer_dropout=0.0,
        transformer_activation="relu",
        transformer_left_context_length=2,
        transformer_max_memory_size=0,
        transformer_weight_init_scale_strategy="depthwise",
        transformer_tanh_on_mem=False,
        symbol_embedding_dim=16,
        num_lstm_layers=1,
        lstm_layer_norm=True,
        lstm_layer_norm_epsilon=1e-5,
        lstm_dropout=0.0,
    )


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


slow = pytest.mark.slow
#: name → (factory, inputs, check_exact options). `std` is raised where the output is
#: a softmax or cosine score that a 0.05 adapter barely moves.
ZOO: dict[str, tuple[Callable[[], nn.Module], Any, dict[str, Any]]] = {
    "wav2vec2 (small config, CTC head)": (small_wav2vec2, (WAVE,), {}),
    "wavlm (small config)": (small_wavlm, (WAVE,), {}),
    "hubert pre-training (small config)": (small_hubert_pretrain, hubert_pretrain_inputs, {"std": 0.2}),
    "conformer": (
        lambda: M.Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=7),
        (r(2, 20, 16), torch.tensor([20, 15])),
        {},
    ),
    "emformer": (
        lambda: M.Emformer(
            input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, segment_length=4, right_context_length=1, left_context_length=2
        ),
        (r(2, 13, 16), torch.tensor([12, 10])),
        {},
    ),
    "emformer rnn-t": (
        small_rnnt,
        (
            r(2, 17, 16),
            torch.tensor([17, 13]),
            torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(3)),
            torch.tensor([5, 4]),
        ),
        {},
    ),
    "deepspeech": (lambda: M.DeepSpeech(n_feature=16, n_hidden=32, n_class=10), (r(2, 1, 20, 16),), {"std": 0.1}),
    "convtasnet (small config)": (
        lambda: M.ConvTasNet(
            num_sources=2,
            enc_kernel_size=16,
            enc_num_feats=32,
            msk_kernel_size=3,
            msk_num_feats=16,
            msk_num_hidden_feats=32,
            msk_num_layers=2,
            msk_num_stacks=1,
        ),
        (r(2, 1, 800),),
        {},
    ),
    # dconv_lstm/attn=2: the residual branches of layers 2+ get their BLSTM and local attention.
    "hdemucs (small config)": (
        lambda: M.HDemucs(sources=["voice", "rest"], channels=4, nfft=256, depth=4, dconv_comp=1, dconv_lstm=2, dconv_attn=2),
        (r(1, 2, 2048),),
        {},
    ),
    "wavernn (small config)": (
        lambda: M.WaveRNN(
            upsample_scales=[2, 2],
            n_classes=16,
            hop_length=4,
            n_res_block=2,
            n_rnn=16,
            n_fc=16,
            kernel_size=5,
            n_freq=8,
            n_hidden=16,
            n_output=16,
        ),
        (r(2, 1, 24), r(2, 1, 8, 10)),
        {},
    ),
    "squim objective (small config)": (
        lambda: M.squim_objective_model(
            feat_dim=16, win_len=8, d_model=16, nhead=2, hidden_dim=16, num_blocks=1, rnn_type="LSTM", chunk_size=8
        ),
        (r(2, 800),),
        {},
    ),
    "wav2letter (waveform)": (lambda: M.Wav2Letter(num_classes=10, input_type="waveform", num_features=1), (r(1, 1, 4000),), {"std": 0.1}),
    "wav2vec2 (small, layer-norm-first like large/xlsr)": (small_wav2vec2_prenorm, (WAVE,), {}),
    "wav2vec2_base": (M.wav2vec2_base, (WAVE[:1],), {}),
    "wavlm_base": (M.wavlm_base, (WAVE[:1],), {}),
}
SLOW = {"wav2letter (waveform)", "wav2vec2_base", "wavlm_base"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=slow) if n in SLOW else n for n in ZOO])
def test_zoo_exact_with_full_coverage(name: str, coverage_table) -> None:
    factory, inputs, options = ZOO[name]
    report = check_exact(factory, inputs, **options)
    coverage_table("speech", name, report)
    assert report.coverage >= 0.99, f"{name}: only {report.coverage:.2%} of the weight matrices are adapted"


def test_speech_plugin_is_active_with_its_rule() -> None:
    info = {p.name: p for p in la.plugins()}["speech"]
    assert info.status == "active", info
    assert "torchaudio.models.wav2vec2.components.LogitGenerator" in info.rules


def test_hubert_label_embeddings_are_adapted_exactly() -> None:
    report = check_exact(small_hubert_pretrain, hubert_pretrain_inputs, targets="LogitGenerator", std=0.5)
    assert report.adapted == 1
    model = small_hubert_pretrain()
    la.apply(model, targets="LogitGenerator", rank=4)
    rows = la.summary(model).rows
    assert [(row.layer, row.target, tuple(row.shape)) for row in rows] == [("logit_generator", "labels", (10, 16))]


def test_exactness_check_sees_differences_beside_masked_logits() -> None:
    """HuBERT's logits hold -inf where a negative is the positive class. An inf must
    neither hide a difference elsewhere (core fix in testing.max_error) nor count as one."""
    inf = float("inf")
    masked = torch.tensor([[2.0, -inf], [1.0, 0.5]])
    assert max_error([masked], [masked.clone()]) == 0.0
    assert max_error([masked], [masked + torch.tensor([[0.0, 0.0], [0.0, 1.0]])]) == pytest.approx(0.5)
    assert max_error([masked], [torch.ones(2, 2)]) == inf


def _attention_hooks(model: nn.Module) -> list[str]:
    calls: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            m.register_forward_hook(lambda *_, n=name: calls.append(n))
    return calls


@pytest.mark.parametrize("block", ["q", "k", "v", "out"])
def test_wavlm_attention_reads_each_adapted_block(block: str) -> None:
    """WavLM never calls its nn.MultiheadAttention: it reads in_proj_weight with F.linear
    and calls out_proj itself. An adapter on any one block must still reach the output,
    and merge exactly."""
    torch.manual_seed(0)
    model = small_wavlm().eval()
    calls = _attention_hooks(model)
    base = run(model, (WAVE,))
    la.apply(model, targets=f"MultiheadAttention:{block}", rank=4)
    assert {row.target for row in la.summary(model).rows} == {block}
    randomize_adapters(model, std=0.1)
    adapted = run(model, (WAVE,))
    assert calls == [], "WavLM called nn.MultiheadAttention.forward; this test no longer checks the direct read"
    assert max((a - b).abs().max().item() for a, b in zip(base, adapted)) > 1e-3
    la.merge(model)
    for a, b in zip(adapted, run(model, (WAVE,))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_wavlm_relative_position_bias_is_an_adapted_embedding() -> None:
    """The bucket × head bias table is computed once in layer 0 and passed on to every
    layer; its adapter reaches the output and merges exactly, and it can be left out."""
    report = check_exact(small_wavlm, (WAVE,), targets="*.rel_attn_embed", rank=2, std=0.5)
    assert report.adapted == 1
    model = la.apply(small_wavlm(), exclude="*.rel_attn_embed")
    assert not any(row.layer.endswith("rel_attn_embed") for row in la.summary(model).rows)


def _pos_conv(model: nn.Module) -> nn.Conv1d:
    return model.encoder.transformer.pos_conv_embed.conv


def _old_style_weight_norm() -> nn.Module:
    """wav2vec2 as older torchaudio built it: the `nn.utils.weight_norm` hook."""
    model = small_wav2vec2()
    conv = _pos_conv(model)
    parametrize.remove_parametrizations(conv, "weight")
    torch.nn.utils.weight_norm(conv, name="weight", dim=2)
    return model


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_weight_normed_positional_conv_merges_and_keeps_its_norm(style: str) -> None:
    factory = small_wav2vec2 if style == "parametrization" else _old_style_weight_norm
    check_exact(factory, (WAVE,), targets="*.pos_conv_embed.conv", std=0.2)

    torch.manual_seed(0)
    model = factory().eval()
    conv = _pos_conv(model)
    if style == "parametrization":
        g_of, v_of = (lambda: conv.parametrizations.weight.original0), (lambda: conv.parametrizations.weight.original1)
    else:
        g_of, v_of = (lambda: conv.weight_g), (lambda: conv.weight_v)
    g, v = g_of().detach().clone(), v_of().detach().clone()
    la.apply(model, targets="*.pos_conv_embed.conv", rank=4)
    randomize_adapters(model, std=0.2)
    adapted = run(model, (WAVE,))
    la.merge(model)
    assert torch.equal(g_of(), g), "merging changed the weight norm's magnitude g"
    assert not torch.equal(v_of(), v), "merging did not move the direction v"
    la.remove(model, merge=True)
    if style == "parametrization":
        assert parametrize.is_parametrized(conv, "weight")
    else:
        assert any(type(h).__name__ == "WeightNorm" for h in conv._forward_pre_hooks.values())
    for a, b in zip(adapted, run(model, (WAVE,))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm_of(conv.weight), g.expand_as(norm_of(conv.weight)), rtol=1e-5, atol=1e-6)


def norm_of(weight: torch.Tensor) -> torch.Tensor:
    """‖w‖ over every dim but 2: what weight_norm(dim=2) pins to g."""
    return weight.norm(dim=(0, 1), keepdim=True)


DEPTHWISE = "*.conv_module.sequential.2"  # Conv1d(16, 16, 7, groups=16)


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_conformer_depthwise_conv_on_both_paths(path: str) -> None:
    factory = ZOO["conformer"][0]
    report = check_exact(factory, ZOO["conformer"][1], targets=DEPTHWISE, path=path, std=0.3)
    assert report.adapted == 2
    model = la.apply(factory(), targets=DEPTHWISE, rank=4, path=path)
    assert {(row.rank, row.path) for row in la.summary(model).rows} == {(4, path)}, "a depthwise conv must take rank > 1"


def test_convtasnet_decoder_transpose_conv() -> None:
    factory, inputs, _ = ZOO["convtasnet (small config)"]
    report = check_exact(factory, inputs, targets="ConvTranspose1d", std=0.3)
    assert report.adapted == 1


def test_torchaudio_model_source() -> None:
    model = build_model("torchaudio:Conformer", input_dim=16, num_heads=2, ffn_dim=32, num_layers=1, depthwise_conv_kernel_size=3)
    assert isinstance(model, M.Conformer)
    with pytest.raises(ValueError, match="no model factory 'nope'"):
        build_model("torchaudio:nope")


def test_speech_plugin_is_inactive_without_torchaudio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchaudio the plugin's import fails with ModuleNotFoundError naming it,
    which the core reports as "inactive", never as a crash."""
    monkeypatch.setitem(sys.modules, "torchaudio", None)
    monkeypatch.delitem(sys.modules, "lora_anywhere_speech", raising=False)
    with pytest.raises(ModuleNotFoundError) as missing:
        importlib.import_module("lora_anywhere_speech")
    assert missing.value.name == "torchaudio"
