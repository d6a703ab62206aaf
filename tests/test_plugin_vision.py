"""The vision plugin: exactness and coverage on a zoo of real timm and torchvision
models, the q/k/v row blocks of every fused attention layout (checked against what
the attention actually computes), the presets, depthwise convs at rank 16, the model
sources, and the plugin's status with one or both frameworks missing.

Models are built with random weights and small inputs; nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

import lora_anywhere as la  # noqa: E402
from lora_anywhere.models import build_model  # noqa: E402
from lora_anywhere.testing import check_exact, randomize_adapters, run  # noqa: E402

slow = pytest.mark.slow


@torch.no_grad()
def condition(model: nn.Module, size: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make every layer's effect visible in the output, as a trained model's would be.

    Random inits zero some heads (torchvision ViT) and post-norm scales (timm SwinV2),
    start layer scales at 1e-5 (timm's relpos ViTs), and leave BatchNorm statistics
    at mean 0 / variance 1, which in eval mode shrinks a deep CNN's signal to the
    float noise floor: any of these hides the adapters upstream of it. Deterministic,
    so two builds of a case stay equal."""
    gen = torch.Generator().manual_seed(1)
    model.to(dtype)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            scale = "Norm" in type(module).__name__ and name == "weight" or name.startswith("gamma")
            if p.dim() >= 2 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and scale and p.abs().max() < 1e-3:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if momenta:
        model.eval()
        for bn in momenta:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: one batch sets the statistics
            bn.train()
        model(torch.randn(16, 3, size, size, generator=gen).to(dtype))
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    return model.eval()


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    size: int
    slow: bool = False
    #: float64 where a deep random CNN amplifies float32 rounding (W + ΔW against
    #: W x + s·B(A x)) to near the check's 1e-4 (EfficientNet, RegNet: ~5e-5).
    dtype: torch.dtype = torch.float32
    #: The input's shape, if not a batch of two size × size images.
    shape: tuple[int, ...] | None = None

    def factory(self) -> nn.Module:
        return condition(self.build(), self.size, self.dtype)

    def inputs(self) -> Callable[[nn.Module], Any]:
        """Inputs for `check_exact`: a batch of two images in the model's dtype."""
        x = torch.randn(self.shape or (2, 3, self.size, self.size), generator=torch.Generator().manual_seed(0))
        return lambda model: model(x.to(next(model.parameters()).dtype))


def tv(name: str, size: int = 32, slow: bool = False, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Case:
    kwargs.setdefault("num_classes", 10)
    return Case(f"torchvision:{name}", lambda: torchvision.models.get_model(name, weights=None, **kwargs), size, slow, dtype)


def tm(name: str, size: int = 32, slow: bool = False, **kwargs: Any) -> Case:
    kwargs.setdefault("num_classes", 10)
    if "img_size" not in kwargs and size != 32:
        kwargs["img_size"] = size
    return Case(f"timm:{name}", lambda: timm.create_model(name, pretrained=False, **kwargs), size, slow)


def tv_maxvit_small() -> nn.Module:
    # maxvit_t fixes partition_size=7, so it needs 224×224 inputs; the same class at a
    # small configuration exercises the same blocks in a fraction of the time.
    from torchvision.models.maxvit import MaxVit

    return MaxVit(
        input_size=(32, 32),
        stem_channels=16,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


ZOO = {
    c.name: c
    for c in [
        tv("resnet18"),
        tv("mobilenet_v3_small"),
        tv("efficientnet_b0", slow=True, dtype=torch.float64),
        tv("convnext_tiny"),
        tv("regnet_y_400mf", dtype=torch.float64),
        tv("densenet121"),
        tv("swin_t"),
        tv("swin_v2_t"),
        tv("vit_b_16", slow=True, image_size=32),
        Case("torchvision:MaxVit(small)", tv_maxvit_small, 32),
        tv("maxvit_t", size=224, slow=True),
        tm("vit_tiny_patch16_224", img_size=32),
        tm("deit_tiny_distilled_patch16_224", img_size=32),
        tm("swin_tiny_patch4_window7_224", img_size=32, window_size=4),
        tm("swinv2_tiny_window8_256", img_size=32, window_size=4),
        tm("swinv2_cr_tiny_ns_224", img_size=32, window_size=4),
        tm("eva02_tiny_patch14_224", size=28),
        tm("beit_base_patch16_224", slow=True, img_size=32),
        tm("vit_relpos_small_patch16_224", img_size=32),
        tm("maxvit_tiny_tf_224", size=64, slow=True),
        tm("maxvit_rmlp_pico_rw_256", size=64),
        tm("coatnet_pico_rw_224", size=64),
        tm("mobilevit_xxs", size=64),
        tm("mobilevitv2_050", size=64),
        tm("convmixer_768_32"),
        tm("convnext_atto"),
    ]
}


def zoo_params(names: list[str] | None = None) -> list[Any]:
    cases = [ZOO[n] for n in names] if names is not None else list(ZOO.values())
    return [pytest.param(c, id=c.name, marks=slow if c.slow else ()) for c in cases]


def adapted(model: nn.Module) -> dict[str, set[str]]:
    """Adapted layer → its adapted target names."""
    out: dict[str, set[str]] = {}
    for row in la.summary(model).rows:
        out.setdefault(row.layer, set()).add(row.target)
    return out


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether b differs from a by more than float noise, relative to a's scale."""
    return bool((a - b).abs().max() > 1e-5 * a.abs().max())


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.factory().eval()


# ----------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("case", zoo_params())
def test_zoo_exact_with_full_coverage(case: Case, coverage_table) -> None:
    report = check_exact(case.factory, case.inputs())
    coverage_table("vision", case.name, report)
    assert report.coverage >= 0.99, f"{case.name}: adapters cover {report.coverage:.2%} of the matrix weights"


# ------------------------------------------------------------------- attention blocks

#: Attention classes by name, written out here rather than read from the plugin.
ATTENTION = {
    "Attention",
    "WindowAttention",
    "WindowMultiHeadAttention",
    "RelPosAttention",
    "EvaAttention",
    "AttentionCl",
    "Attention2d",
    "LinearSelfAttention",
    "ShiftedWindowAttention",
    "ShiftedWindowAttentionV2",
    "RelativePositionalMultiHeadAttention",
    "MultiheadAttention",
}


def attention_blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ATTENTION]


def head_first(module: nn.Module) -> bool:
    return getattr(module, "head_first", False)


ATTENTION_MODELS = [
    "timm:vit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
    "timm:swinv2_tiny_window8_256",
    "timm:swinv2_cr_tiny_ns_224",
    "timm:eva02_tiny_patch14_224",
    "timm:beit_base_patch16_224",
    "timm:vit_relpos_small_patch16_224",
    "timm:maxvit_tiny_tf_224",
    "timm:mobilevit_xxs",
    "timm:mobilevitv2_050",
    "torchvision:swin_t",
    "torchvision:swin_v2_t",
    "torchvision:vit_b_16",
    "torchvision:MaxVit(small)",
]


@pytest.mark.parametrize("case", zoo_params(ATTENTION_MODELS))
def test_attention_preset_adapts_exactly_q_and_v(case: Case) -> None:
    model = la.apply(build(case), targets="attention")
    blocks = attention_blocks(model)
    assert blocks and adapted(model) == {b: {"q", "v"} for b in blocks}


#: Blocks that read ``self.qkv.weight`` themselves (BEiT and EVA with their q/v
#: biases, torchvision's Swin), a 1-row q (MobileViTv2), nn.MultiheadAttention.
@pytest.mark.parametrize(
    "case",
    zoo_params(
        ["timm:eva02_tiny_patch14_224", "timm:beit_base_patch16_224", "torchvision:swin_t", "timm:mobilevitv2_050", "torchvision:vit_b_16"]
    ),
)
def test_attention_preset_is_exact(case: Case) -> None:
    report = check_exact(case.factory, case.inputs(), targets="attention")
    assert report.adapted == 2 * len(attention_blocks(build(case)))


@pytest.mark.parametrize("case", zoo_params(["timm:vit_tiny_patch16_224", "torchvision:swin_t", "torchvision:vit_b_16"]))
def test_attention_all_preset(case: Case) -> None:
    model = la.apply(build(case), targets="attention-all")
    out = "out" if "vit_b_16" in case.name else "proj"  # nn.MultiheadAttention's own name
    assert adapted(model) == {b: {"q", "k", "v", out} for b in attention_blocks(model)}


def _interleaved_pair() -> nn.Module:
    from timm.models.maxxvit import AttentionCl

    return nn.Sequential(AttentionCl(32, dim_head=8, head_first=True), AttentionCl(32, dim_head=8, head_first=True))


_PAIR = Case("two head-first AttentionCl", _interleaved_pair, 3, shape=(2, 3, 3, 32))


@pytest.mark.parametrize("case", [pytest.param(_PAIR, id="AttentionCl-pair"), *zoo_params(["timm:maxvit_rmlp_pico_rw_256"])])
def test_head_interleaved_qkv_is_adapted_whole(case: Case) -> None:
    """timm's *_rw MaxViT/CoAtNet store q, k, v per head ([q₁ k₁ v₁ q₂ …]): no row
    block is q alone, so the presets adapt the fused projection whole, and ":q" is refused."""
    model = build(case)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "AttentionCl"]
    assert blocks and all(head_first(model.get_submodule(b)) for b in blocks)
    la.apply(model, targets="attention")
    assert adapted(model) == {f"{b}.qkv": {"weight"} for b in blocks}
    la.remove(model)
    la.apply(model, targets="attention-all")
    assert adapted(model) == {**{f"{b}.qkv": {"weight"} for b in blocks}, **{b: {"proj"} for b in blocks}}
    la.remove(model)
    with pytest.raises(la.TargetError, match="its targets are proj"):
        la.apply(model, targets="AttentionCl:q")
    check_exact(case.factory, case.inputs(), targets="attention")


def test_part_syntax_selects_targets_per_block() -> None:
    case = ZOO["timm:vit_tiny_patch16_224"]
    model = la.apply(build(case), targets="Attention:q,v")
    assert adapted(model) == {f"blocks.{i}.attn": {"q", "v"} for i in range(12)}
    la.remove(model)
    la.apply(model, targets=["blocks.0.attn:k", "blocks.11.attn:v,proj"])
    assert adapted(model) == {"blocks.0.attn": {"k"}, "blocks.11.attn": {"v", "proj"}}
    la.remove(model)
    # q of a block, the rest of the model whole: the block's qkv is claimed by its rule.
    la.apply(model, targets=["Attention:q", "*.mlp.*"])
    assert adapted(model)["blocks.3.attn"] == {"q"} and "blocks.3.attn.qkv" not in adapted(model)
    la.remove(model)
    la.apply(model, exclude="attention")  # everything but q and v
    assert adapted(model)["blocks.3.attn"] == {"k", "proj"} and adapted(model)["blocks.3.mlp.fc1"] == {"weight"}
    la.remove(model)
    with pytest.raises(la.TargetError, match="its targets are q, k, v, proj"):
        la.apply(model, targets="Attention:query")
    check_exact(case.factory, case.inputs(), targets=["blocks.0.attn:k", "blocks.11.attn:v,proj"])


class Probe:
    """Records the first scaled_dot_product_attention call (q, k, v) or the first
    softmax input and output of a forward pass."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []
        sdpa, softmax = F.scaled_dot_product_attention, torch.Tensor.softmax

        def record_sdpa(q, k, v, *args, **kwargs):
            self.calls.append((q.clone(), k.clone(), v.clone()))
            return sdpa(q, k, v, *args, **kwargs)

        def record_softmax(x, *args, **kwargs):
            y = softmax(x, *args, **kwargs)
            self.calls.append((x.clone(), y.clone()))
            return y

        monkeypatch.setattr(F, "scaled_dot_product_attention", record_sdpa)
        monkeypatch.setattr(torch.Tensor, "softmax", record_softmax)

    def first(self, model: nn.Module, inputs: tuple) -> tuple[torch.Tensor, ...]:
        self.calls.clear()
        out = run(model, inputs)
        return (*self.calls[0], *out)


def _fused_attention_on(model: nn.Module) -> None:
    for m in model.modules():  # timm's Swin takes the explicit path unless told otherwise
        if hasattr(m, "fused_attn"):
            m.fused_attn = True


#: Models whose first attention block calls scaled_dot_product_attention(q, k, v).
SDPA_MODELS = [
    "timm:vit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
    "timm:eva02_tiny_patch14_224",
    "timm:beit_base_patch16_224",
    "timm:maxvit_tiny_tf_224",
    "timm:vit_relpos_small_patch16_224",
]
#: Models whose first attention block computes softmax(q kᵀ) itself.
SOFTMAX_MODELS = [
    "timm:swinv2_tiny_window8_256",
    "timm:swinv2_cr_tiny_ns_224",
    "torchvision:swin_t",
    "torchvision:swin_v2_t",
    "torchvision:MaxVit(small)",
]


@pytest.mark.parametrize("case", zoo_params(SDPA_MODELS))
def test_row_blocks_are_what_attention_uses_as_q_k_v(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapting block q changes the q the first attention call receives, and neither
    k nor v; likewise for k and v. This checks the layouts against the models' own code."""
    probe = Probe(monkeypatch)
    model = build(case)
    _fused_attention_on(model)
    block = attention_blocks(model)[0]
    base = probe.first(model, case.inputs())
    assert len(probe.calls[0]) == 3, "expected scaled_dot_product_attention"
    for target in "qkv":
        la.apply(model, targets=f"{block}:{target}")
        randomize_adapters(model)
        changed = probe.first(model, case.inputs())
        assert {n: differs(a, b) for n, a, b in zip("qkv", base[:3], changed[:3])} == {n: n == target for n in "qkv"}, target
        la.remove(model, merge=False)


@pytest.mark.parametrize("case", zoo_params(SOFTMAX_MODELS))
def test_row_blocks_softmax_attention(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """q and k change the attention logits; v leaves them alone but changes the output."""
    probe = Probe(monkeypatch)
    model = build(case)
    block = attention_blocks(model)[0]
    base = probe.first(model, case.inputs())
    for target in "qkv":
        la.apply(model, targets=f"{block}:{target}")
        randomize_adapters(model)
        changed = probe.first(model, case.inputs())
        assert differs(base[0], changed[0]) == (target != "v"), target
        assert differs(base[-1], changed[-1]), target
        la.remove(model, merge=False)


def test_mobilevitv2_query_is_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """MobileViTv2 splits qkv_proj into [1, d, d]: the one query row feeds the first
    softmax (context scores); k and v do not."""
    case = ZOO["timm:mobilevitv2_050"]
    probe = Probe(monkeypatch)
    model = build(case)
    block = attention_blocks(model)[0]
    assert model.get_submodule(block).qkv_proj.out_channels == 1 + 2 * model.get_submodule(block).embed_dim
    base = probe.first(model, case.inputs())
    for target in "qkv":
        la.apply(model, targets=f"{block}:{target}")
        randomize_adapters(model)
        changed = probe.first(model, case.inputs())
        assert differs(base[0], changed[0]) == (target == "q")
        assert differs(base[-1], changed[-1])
        la.remove(model, merge=False)
    ranks = {r.target: r.rank for r in la.summary(la.apply(model, targets=f"{block}:q,v", rank=8)).rows}
    assert ranks == {"q": 1, "v": 8}  # q is a 1-row matrix


class Tokens(nn.Module):
    """One attention layer on (batch, tokens, dim) or (batch, dim, h, w) input."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def _module_cases() -> list[Any]:
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention
    from timm.models.maxxvit import Attention2d, AttentionCl

    tokens, image = torch.randn(2, 5, 32), torch.randn(2, 32, 3, 3)
    return [
        pytest.param(lambda: AttentionRope(32, num_heads=4), tokens, {"q", "k", "v", "proj"}, id="AttentionRope-fused"),
        pytest.param(
            lambda: AttentionRope(32, num_heads=4, qkv_fused=False, num_kv_heads=2), tokens, {"q", "k", "v", "proj"}, id="AttentionRope-gqa"
        ),
        pytest.param(
            lambda: EvaAttention(32, num_heads=4, qkv_fused=False, norm_layer=nn.LayerNorm),
            tokens,
            {"q", "k", "v", "proj"},
            id="EvaAttention-unfused",
        ),
        pytest.param(
            lambda: AttentionCl(32, dim_head=8, head_first=False),
            torch.randn(2, 3, 3, 32),
            {"q", "k", "v", "proj"},
            id="AttentionCl-blocks",
        ),
        pytest.param(lambda: Attention2d(32, dim_head=8, head_first=False), image, {"q", "k", "v", "proj"}, id="Attention2d-blocks"),
        pytest.param(lambda: Attention2d(32, dim_head=8, head_first=True), image, {"proj"}, id="Attention2d-interleaved"),
    ]


@pytest.mark.parametrize("factory, x, targets", _module_cases())
def test_attention_modules_alone(factory: Callable[[], nn.Module], x: torch.Tensor, targets: set[str]) -> None:
    report = check_exact(lambda: Tokens(factory()), (x,))
    assert report.coverage == 1.0
    model = la.apply(Tokens(factory()))
    assert adapted(model)["attn"] == targets


def test_a_block_that_does_not_fit_offers_nothing() -> None:
    """A block the layout does not fit (qkv rows not 3 equal blocks, no proj) gets no
    targets, so the core adapts its Linears whole with their own rule."""
    from lora_anywhere_vision.attention import FusedAttentionRule

    odd = nn.Module()
    odd.qkv = nn.Linear(4, 5)
    assert FusedAttentionRule(nn.Module).targets(odd) == ()
    odd.proj = nn.Linear(5, 4)
    assert [t.name for t in FusedAttentionRule(nn.Module).targets(odd)] == ["proj"]


# ----------------------------------------------------------------------------- mlp


@pytest.mark.parametrize(
    "case, expected",
    [
        ("timm:vit_tiny_patch16_224", lambda n: n.endswith((".mlp.fc1", ".mlp.fc2"))),
        ("timm:maxvit_rmlp_pico_rw_256", lambda n: ".mlp.fc" in n and ".rel_pos." not in n),
        ("torchvision:swin_v2_t", lambda n: ".mlp." in n),
        ("torchvision:MaxVit(small)", lambda n: ".mlp_layer." in n),
    ],
)
def test_mlp_preset(case: str, expected: Callable[[str], bool]) -> None:
    model = build(ZOO[case])
    weights = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    la.apply(model, targets="mlp")
    assert set(adapted(model)) == {n for n in weights if expected(n)} != set()


def test_mlp_preset_on_a_cnn_matches_nothing() -> None:
    with pytest.raises(la.TargetError, match="'mlp' matched no layer"):
        la.apply(build(ZOO["torchvision:resnet18"]), targets="mlp")


# ----------------------------------------------------------------------------- depthwise


@pytest.mark.parametrize("path", ["auto", "activation", "weight"])
@pytest.mark.parametrize(
    "case",
    zoo_params(["torchvision:mobilenet_v3_small", "timm:convnext_atto"])
    + [pytest.param(ZOO["torchvision:convnext_tiny"], id="torchvision:convnext_tiny", marks=slow)],
)
def test_depthwise_convs_at_rank_16(case: Case, path: str) -> None:
    report = check_exact(case.factory, case.inputs(), rank=16, path=path)
    assert report.coverage >= 0.99
    model = la.apply(build(case), rank=16, path=path)
    depthwise = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    assert depthwise
    rows = {r.layer: r for r in la.summary(model).rows}
    for name, conv in depthwise.items():
        k = conv.weight[0].numel()  # the matrix is channels × k·k
        assert rows[name].rank == min(16, k)
        assert rows[name].path == ("weight" if path == "auto" else path)


# ----------------------------------------------------------------------------- plugin


def test_plugin_is_active_with_its_rules() -> None:
    info = {p.name: p for p in la.plugins()}["vision"]
    assert info.status == "active", info.error
    for cls in (
        "timm.layers.attention.Attention",
        "timm.models.beit.Attention",
        "timm.models.eva.EvaAttention",
        "torchvision.models.swin_transformer.ShiftedWindowAttention",
    ):
        assert cls in info.rules


_STATUS = """
import json, sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # import fails as if not installed
import lora_anywhere as la
from lora_anywhere.registry import registry
info = {p.name: p for p in la.plugins()}["vision"]
print(json.dumps({"status": info.status, "error": info.error, "rules": info.rules, "sources": sorted(registry().model_sources), "presets": sorted(registry().presets)}))
"""


@pytest.mark.parametrize("missing", [["timm"], ["timm", "torchvision"]], ids=["torchvision-only", "neither"])
def test_plugin_with_frameworks_missing(missing: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", _STATUS, *missing], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout.strip().splitlines()[-1])
    if missing == ["timm"]:
        assert status["status"] == "active"
        assert status["rules"] and all(r.startswith("torchvision.") for r in status["rules"])
        assert "torchvision" in status["sources"] and "timm" not in status["sources"]
        assert {"attention", "attention-all", "mlp"} <= set(status["presets"])
    else:
        assert status["status"] == "inactive" and "timm or torchvision" in status["error"]
        assert status["rules"] == []


def test_model_sources_build_random_models_without_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model source tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    vit = build_model("timm:vit_tiny_patch16_224", img_size=32, num_classes=3)
    assert type(vit).__name__ == "VisionTransformer" and vit.head.out_features == 3
    assert type(build_model("torchvision:resnet18", num_classes=4)).__name__ == "ResNet"
    # detection builders default to an ImageNet backbone: the source turns it off
    detector = build_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert type(detector).__name__ == "FasterRCNN"
    for spec, kwargs in [
        ("timm:resnet18", {"pretrained": True}),
        ("torchvision:resnet18", {"weights": "DEFAULT"}),
        ("torchvision:fasterrcnn_resnet50_fpn", {"weights_backbone": "DEFAULT"}),
    ]:
        with pytest.raises(la.LoraError, match="downloads nothing"):
            build_model(spec, **kwargs)
    with pytest.raises(la.LoraError, match="timm has no model 'no_such_net'"):
        build_model("timm:no_such_net")
    with pytest.raises(la.LoraError, match="torchvision has no model 'no_such_net'"):
        build_model("torchvision:no_such_net")


def test_docs_snippet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The example in docs/plugins/vision.md runs and prints what the page shows."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "plugins" / "vision.md").read_text()
    code, shown = page.split("```python\n", 1)[1].split("\n```\n", 1)
    expected = shown.split("```\n", 1)[1].split("```", 1)[0].splitlines()
    exec(compile(code, "vision.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == expected[0] and printed[2] == expected[2]
    assert float(printed[1].split(":")[1]) < 1e-4
