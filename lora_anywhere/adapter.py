"""The trainable state of an adapter: low-rank factor pairs, grouped per layer.

These modules hold parameters only. How they change a layer's output lives in
`attach.py`; what a layer type offers lives in its rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .registry import Rule, Target

ACTIVATION, WEIGHT = "activation", "weight"


class LowRank(nn.Module):
    """ΔM = scale · B @ A for one rows × cols matrix. B starts at zero, so the
    adapted model computes exactly what the base model does until it trains."""

    def __init__(self, rows: int, cols: int, rank: int, scale: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, cols, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rows, rank, dtype=dtype, device=device))
        self.scale = float(scale)
        # The initialisation nn.Linear gives its weight (and PEFT gives A).
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The rows × cols update, scale folded into the small factor."""
        return (self.B * self.scale) @ self.A

    def extra_repr(self) -> str:
        return f"rows={self.B.shape[0]}, cols={self.A.shape[1]}, rank={self.rank}, scale={self.scale:g}"


@dataclass(frozen=True)
class ResolvedTarget:
    """A rule's target bound to a concrete tensor of a concrete layer."""

    name: str
    owner: str  # dotted path from the layer to the module that owns the tensor
    tensor: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]  # the whole tensor's shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        n = self.shape[0] if self.rows is None else self.rows[1] - self.rows[0]
        return n, math.prod(self.shape[1:])

    @property
    def full_rank(self) -> int:
        return min(self.matrix_shape)


class LayerAdapter(nn.Module):
    """One named adapter on one layer: a `LowRank` per target.

    ``path`` says how it reaches the output: on the activations (the rule's forward)
    or on the weight (whoever reads the tensor sees W + ΔW).
    """

    def __init__(self, rule: Rule, targets: Iterable[ResolvedTarget], ranks: Mapping[str, int], scale: float, *, path: str, dropout: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.rule = rule
        self.targets = {t.name: t for t in targets}
        self.path = path
        self.dropout_p = float(dropout)
        self.merged = False
        self.active = True
        self.factors = nn.ModuleDict(
            {t.name: LowRank(*t.matrix_shape, ranks[t.name], scale, dtype=dtype, device=device) for t in self.targets.values()}
        )

    @property
    def live(self) -> bool:
        """Whether this adapter still has to be added at run time."""
        return self.active and not self.merged

    @property
    def dropout_active(self) -> bool:
        return self.dropout_p > 0.0 and self.training

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        # With p = 0 the input is passed through: no copy of the activation.
        if self.dropout_p == 0.0 or not self.training:
            return x
        return F.dropout(x, self.dropout_p, training=True)

    def tensor_delta(self, owner: str, tensor: str, like: torch.Tensor) -> torch.Tensor | None:
        """ΔW for one tensor, in its full shape, or None if this adapter does not touch it."""
        blocks = [t for t in self.targets.values() if t.owner == owner and t.tensor == tensor]
        if not blocks:
            return None
        if len(blocks) == 1 and blocks[0].rows is None:
            return self.factors[blocks[0].name].delta().view(like.shape).to(like.dtype)
        # Row blocks (q, k, v of a packed projection): zeros where nothing is adapted.
        blocks.sort(key=lambda t: t.rows[0])
        pieces, row = [], 0
        tail = like.shape[1:]
        for t in blocks:
            start, stop = t.rows
            if start > row:
                pieces.append(like.new_zeros((start - row, *tail)))
            pieces.append(self.factors[t.name].delta().view(stop - start, *tail).to(like.dtype))
            row = stop
        if row < like.shape[0]:
            pieces.append(like.new_zeros((like.shape[0] - row, *tail)))
        return torch.cat(pieces, dim=0)

    def block_deltas(self) -> Iterable[tuple[ResolvedTarget, torch.Tensor]]:
        for t in self.targets.values():
            n = t.matrix_shape[0]
            yield t, self.factors[t.name].delta().view(n, *t.shape[1:])

    def extra_repr(self) -> str:
        state = "merged" if self.merged else ("active" if self.active else "disabled")
        return f"rule={self.rule.name}, path={self.path}, dropout={self.dropout_p:g}, {state}"
