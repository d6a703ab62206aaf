"""One rule for the fused-qkv attention blocks of timm and torchvision.

These blocks compute q, k and v with one projection (a Linear, or a 1×1 conv) whose
output rows are the q, k and v blocks, and some of them never call that projection:
BEiT, EVA and torchvision's Swin hand ``self.qkv.weight`` to ``F.linear`` themselves.
So the rule names row blocks of the projection's weight and lets the core's weight
path serve every reader of that tensor. The output projection is offered as "proj"
whatever the block calls it, so one selector ("…:q,v,proj") fits every family.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from lora_anywhere import Rule, Target

#: How a block's fused rows split into q, k, v: their sizes in order, or None where
#: the layout interleaves them per head and no row block is q alone.
Split = Callable[[nn.Module, int], "tuple[int, int, int] | None"]

QKV = ("q", "k", "v")


def thirds(layer: nn.Module, rows: int) -> tuple[int, int, int] | None:
    """[q; k; v] stacked: the layout of every block that reshapes to (…, 3, heads, head_dim)."""
    return (rows // 3,) * 3 if rows % 3 == 0 else None


def thirds_unless_head_first(layer: nn.Module, rows: int) -> tuple[int, int, int] | None:
    """timm's MaxViT/CoAtNet: ``head_first=True`` (the ``*_rw`` models) stores
    [q₁ k₁ v₁ q₂ k₂ v₂ …] per head, so only the ``head_first=False`` layout has blocks."""
    return None if getattr(layer, "head_first", False) else thirds(layer, rows)


def one_query_row(layer: nn.Module, rows: int) -> tuple[int, int, int] | None:
    """MobileViTv2's separable attention: one query row (a context score), then k and v."""
    d = getattr(layer, "embed_dim", None)
    return (1, d, d) if isinstance(d, int) and rows == 1 + 2 * d else None


def out_rows(module: nn.Module) -> int | None:
    """Output rows of a Linear or conv, read from its config so that nothing computes
    the weight (a parametrized or already adapted weight would be recomputed)."""
    for attr in ("out_features", "out_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


class FusedAttentionRule(Rule):
    """q, k, v as row blocks of the fused projection (or as separate ``q/k/v_proj``
    Linears in blocks built unfused, like EVA with ``qkv_fused=False``) and the output
    projection as "proj". Where the rows interleave per head, only "proj" is offered
    and the fused projection is left to its own rule, adapted whole: exact, but not
    splittable into q and v."""

    def __init__(
        self,
        cls: type,
        *,
        qkv: str = "qkv",
        proj: str = "proj",
        split: Split = thirds,
        separate: tuple[str, str, str] | None = None,
    ) -> None:
        self.name = f"{cls.__module__}.{cls.__qualname__}"
        self.qkv, self.proj, self.split, self.separate = qkv, proj, split, separate

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        found: list[Target] = []
        fused = getattr(layer, self.qkv, None)
        if isinstance(fused, nn.Module):
            rows = out_rows(fused)
            sizes = self.split(layer, rows) if rows is not None else None
            if sizes is not None:
                start = 0
                for name, size in zip(QKV, sizes):
                    found.append(Target(name, "weight", self.qkv, (start, start + size)))
                    start += size
        elif self.separate is not None:
            found.extend(
                Target(name, "weight", attr) for name, attr in zip(QKV, self.separate) if isinstance(getattr(layer, attr, None), nn.Module)
            )
        if isinstance(getattr(layer, self.proj, None), nn.Module):
            found.append(Target("proj", "weight", self.proj))
        # A block that does not fit (a subclass built differently) offers nothing: the
        # core then leaves its Linears and convs to their own rules, adapted whole.
        return tuple(found)
