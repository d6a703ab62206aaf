"""Target presets for vision models: "attention", "attention-all" and "mlp".

Each preset is a predicate ``f(name, module)`` returning the target names to adapt
(or False). The core calls it on every module a rule covers, parents before their
children, and skips a child once its parent's rule has claimed it.
"""

from __future__ import annotations

from typing import Callable, Mapping

from torch import nn
from torch.nn.modules.conv import _ConvNd

from lora_anywhere import Rule
from lora_anywhere.rule import rule_in_mro

Predicate = Callable[[str, nn.Module], "bool | frozenset[str]"]

#: Names timm and torchvision give a fused q/k/v projection.
FUSED_QKV = frozenset({"qkv", "to_qkv", "qkv_proj"})
#: Module names of the feed-forward part of a block (timm: mlp, mlp_tokens/channels
#: in Mixer; torchvision: mlp in ViT and Swin, mlp_layer in MaxViT).
MLP = frozenset({"mlp", "ffn", "feed_forward", "mlp_layer", "mlp_block", "mlp_tokens", "mlp_channels"})
#: A small MLP under these computes attention position biases (timm MaxViT's
#: rel_pos.mlp), not a block's feed-forward.
NOT_MLP = frozenset({"attn", "attention", "rel_pos"})

WEIGHT_LAYERS = (nn.Linear, _ConvNd)


def attention_preset(rules: Mapping[type, Rule], parts: frozenset[str], mha_parts: frozenset[str], name: str) -> Predicate:
    """Select ``parts`` of every attention block a rule of ``rules`` covers,
    ``mha_parts`` of every nn.MultiheadAttention, and — where q, k and v share rows
    that no row block separates (head-interleaved layouts, unknown blocks) — the
    fused projection whole, as the closest exact choice."""

    def select(module_name: str, module: nn.Module) -> bool | frozenset[str]:
        if isinstance(module, nn.MultiheadAttention):
            return mha_parts
        rule = rule_in_mro(rules, module)
        if rule is not None:
            offered = {t.name for t in rule.targets(module)}
            return frozenset(parts & offered) or False
        return module_name.rsplit(".", 1)[-1] in FUSED_QKV and isinstance(module, WEIGHT_LAYERS)

    select.__name__ = name
    return select


def mlp(module_name: str, module: nn.Module) -> bool:
    """Every Linear and conv inside a block's feed-forward module."""
    scopes = module_name.split(".")[:-1]
    return isinstance(module, WEIGHT_LAYERS) and any(s in MLP for s in scopes) and not any(s in NOT_MLP for s in scopes)
