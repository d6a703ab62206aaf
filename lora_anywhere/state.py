"""Where adapters live on a model: the root's record of them, and the layers that
carry them. Shared by every module that walks an adapted model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from . import attach
from .adapter import LayerAdapter
from .adapter_config import AdapterConfig

_STATE = "_lora_anywhere_state"


@dataclass
class ModelState:
    """Kept on the root model: its adapters' configs and the requires_grad flags the
    model had before the first `apply`, restored by `remove`."""

    adapters: dict[str, AdapterConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def model_state(model: nn.Module) -> ModelState | None:
    return model.__dict__.get(_STATE)


def set_model_state(model: nn.Module, state: ModelState | None) -> None:
    if state is None:
        model.__dict__.pop(_STATE, None)
    else:
        model.__dict__[_STATE] = state


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, dict[str, LayerAdapter]]]:
    """Every layer below `model` that carries adapters, with them by name."""
    for name, module in model.named_modules():
        adapters = attach.layer_adapters(module)
        if adapters:
            yield name, module, adapters


def is_under(name: str, prefix: str) -> bool:
    """Whether module `name` is `prefix` itself or below it ("" is the root, above all)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")
