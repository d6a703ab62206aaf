"""An example lora_anywhere plugin: it teaches lora_anywhere a layer of its own.

`GatedLinear` computes ``(x Vᵀ) ⊙ sigmoid(x Gᵀ)`` with two weight matrices, ``value``
and ``gate``, that no built-in rule knows. The plugin registers a rule for it (two
targets: each matrix gets its own low-rank update) and a model source, so that
``lora-anywhere inspect example:GatedMLP`` works. lora_anywhere finds the module
through the entry point in pyproject.toml; nothing has to import it by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import lora_anywhere as la


class GatedLinear(nn.Module):
    """y = (x Vᵀ) ⊙ sigmoid(x Gᵀ): a gated linear unit without biases."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.gate = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.value.T) * torch.sigmoid(x @ self.gate.T)


class GatedLinearRule(la.Rule):
    """Both matrices are adaptable, each seen as out × in. A weight-route rule needs
    nothing more: the layer's own forward then reads W + ΔW, and merging is exact."""

    name = "la_example_plugin.GatedLinear"

    def targets(self, layer: nn.Module) -> list[la.Target]:
        return [la.Target("value", "value"), la.Target("gate", "gate")]


class GatedMLP(nn.Module):
    """Two gated layers and a plain Linear head: a model for the model source."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(GatedLinear(features, hidden), GatedLinear(hidden, hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


@la.hookimpl
def lora_anywhere_register_rules(register: Callable[[type, la.Rule], None]) -> None:
    register(GatedLinear, GatedLinearRule())


@la.hookimpl
def lora_anywhere_register_model_sources(register: Callable[[str, Callable[..., nn.Module]], None]) -> None:
    def build(name: str, **kwargs: Any) -> nn.Module:
        if name != "GatedMLP":
            raise ValueError(f"the example source has one model, 'GatedMLP', not {name!r}")
        return GatedMLP(**kwargs)

    register("example", build)
