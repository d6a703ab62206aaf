"""What `apply` did to a model, as a table: which layers, by which rule, at what cost."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from . import attach
from .state import adapted_layers

#: Parameters that are ≥ 2-D but are lookup tables of positions, special tokens or
#: attention biases, not weight matrices: coverage does not count them.
TABLE_NAME = re.compile(r"(pos|position|token|bias_table|rel_pos|relative|_bias$)", re.IGNORECASE)


def is_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """A weight matrix: two or more dimensions longer than 1 (weight_norm's g and a
    class token are vectors in disguise), and not a position/token/bias table."""
    return sum(d > 1 for d in shape) >= 2 and TABLE_NAME.search(name.rsplit(".", 1)[-1]) is None


@dataclass
class SummaryRow:
    layer: str
    rule: str
    target: str
    shape: tuple[int, ...]
    rank: int
    route: str  # "activation" or "weight"
    adapter_params: int

    @property
    def path(self) -> str:
        """The old name of `route`."""
        return self.route


@dataclass
class Summary:
    rows: list[SummaryRow] = field(default_factory=list)
    adapter_params: int = 0
    trainable_params: int = 0
    total_params: int = 0  # base parameters, adapters not counted
    matrix_params: int = 0  # base parameters in weight matrices (see `is_matrix`)
    covered_params: int = 0  # of those, the ones an adapter updates

    @property
    def coverage(self) -> float:
        """Share of the base model's matrix weights that an adapter updates."""
        return self.covered_params / self.matrix_params if self.matrix_params else 0.0

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        headers = ("layer", "target", "rule", "weight shape", "rank", "route", "adapter params")
        cells = [
            (r.layer or "<root>", r.target, r.rule, "×".join(map(str, r.shape)), str(r.rank), r.route, f"{r.adapter_params:,}")
            for r in self.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
        line = lambda values: "  ".join(v.ljust(w) if i < 6 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))  # noqa: E731
        out = [line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)]
        out.append("")
        out.append(f"adapted tensors: {len(self.rows)}   adapter parameters: {self.adapter_params:,}")
        out.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} base parameters ({100 * self.trainable_share:.2f}%)")
        out.append(f"matrix weights covered: {self.covered_params:,} of {self.matrix_params:,} ({100 * self.coverage:.2f}%)")
        return "\n".join(out)


def summary(model: nn.Module) -> Summary:
    """A table of every adapted tensor, with totals and the share of matrix weights
    covered. ``print(summary(model))`` shows it."""
    s = Summary()
    covered: dict[int, int] = {}
    for layer_name, layer, adapters in adapted_layers(model):
        for adapter in adapters.values():
            for t in adapter.targets.values():
                f = adapter.factors[t.name]
                n = f.A.numel() + f.B.numel()
                s.rows.append(
                    SummaryRow(
                        layer=layer_name,
                        rule=adapter.rule.name,
                        target=t.name,
                        shape=t.shape,
                        rank=f.rank,
                        route="activation" if t.owner in adapter.activation_owners else "weight",
                        adapter_params=n,
                    )
                )
                s.adapter_params += n
                tensor = t.parameter_in(layer)
                rows = t.shape[0] if t.rows is None else t.rows[1] - t.rows[0]
                covered[id(tensor)] = min(tensor.numel(), covered.get(id(tensor), 0) + tensor.numel() // t.shape[0] * rows)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        is_adapter = attach.ADAPTERS in name.split(".")
        if p.requires_grad:
            s.trainable_params += p.numel()
        if is_adapter:
            continue
        s.total_params += p.numel()
        if id(p) in covered or is_matrix(name, tuple(p.shape)):
            s.matrix_params += p.numel()
            s.covered_params += covered.get(id(p), 0)
    return s
