"""Which attention classes of timm and torchvision the plugin knows, and how each one
lays out its fused projection (read from the installed sources; see the tests).

Classes are looked up by import path, so a framework that is missing, or a version
that lacks one of them, costs only that entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from lora_anywhere import Rule

from .attention import FusedAttentionRule, one_query_row, thirds_unless_head_first

SEPARATE = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Entry:
    framework: str
    module: str
    cls: str
    options: dict[str, Any] = field(default_factory=dict)


ENTRIES: tuple[Entry, ...] = (
    # ViT, DeiT, MobileViT (v1) and most timm transformers.
    Entry("timm", "timm.layers.attention", "Attention"),
    Entry("timm", "timm.layers.attention", "AttentionRope", {"separate": SEPARATE}),
    Entry("timm", "timm.models.swin_transformer", "WindowAttention"),
    Entry("timm", "timm.models.swin_transformer_v2", "WindowAttention"),
    Entry("timm", "timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention"),
    Entry("timm", "timm.models.vision_transformer_relpos", "RelPosAttention"),
    # EVA and BEiT read self.qkv.weight themselves (with separate q and v biases).
    Entry("timm", "timm.models.eva", "EvaAttention", {"separate": SEPARATE}),
    Entry("timm", "timm.models.beit", "Attention"),
    Entry("timm", "timm.models.maxxvit", "AttentionCl", {"split": thirds_unless_head_first}),
    Entry("timm", "timm.models.maxxvit", "Attention2d", {"split": thirds_unless_head_first}),
    Entry("timm", "timm.models.mobilevit", "LinearSelfAttention", {"qkv": "qkv_proj", "proj": "out_proj", "split": one_query_row}),
    # torchvision's Swin calls F.linear(x, self.qkv.weight, …); ViT uses nn.MultiheadAttention (core rule).
    Entry("torchvision", "torchvision.models.swin_transformer", "ShiftedWindowAttention"),
    Entry("torchvision", "torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"),
    Entry("torchvision", "torchvision.models.maxvit", "RelativePositionalMultiHeadAttention", {"qkv": "to_qkv", "proj": "merge"}),
)


def attention_rules(frameworks: set[str]) -> dict[type, Rule]:
    """A rule per attention class of the given (importable) frameworks."""
    rules: dict[type, Rule] = {}
    for entry in ENTRIES:
        if entry.framework not in frameworks:
            continue
        try:
            cls = getattr(importlib.import_module(entry.module), entry.cls)
        except (ImportError, AttributeError):  # another version of the framework
            continue
        rules[cls] = FusedAttentionRule(cls, **entry.options)
    return rules
