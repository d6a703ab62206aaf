"""What an adapter is, as data: enough to re-create it exactly on a fresh base model.

Saved as ``adapter_config.json`` beside the tensors, and kept on the adapted model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "lora_anywhere.adapter/1"


@dataclass
class TargetRecord:
    owner: str
    tensor: str
    rows: list[int] | None
    shape: list[int]  # the whole base tensor's shape, checked on load
    rank: int


@dataclass
class LayerRecord:
    rule: str
    type: str
    path: str
    scale: float
    targets: dict[str, TargetRecord]


@dataclass
class AdapterConfig:
    name: str
    rank: int
    alpha: float
    dropout: float
    path: str
    targets: list[str] | None
    exclude: list[str] | None
    trainable: list[str]
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    freeze_a: bool = False
    rslora: bool = False
    init: str = "lora"
    dora: bool = False
    library_version: str = ""
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AdapterConfig":
        layers = {
            name: LayerRecord(**{**rec, "targets": {k: TargetRecord(**t) for k, t in rec["targets"].items()}})
            for name, rec in data["layers"].items()
        }
        return cls(**{**data, "layers": layers})


@dataclass
class ModelState:
    """Kept on the root model: its adapters' configs and the requires_grad flags the
    model had before the first `apply`, restored by `remove`."""

    adapters: dict[str, AdapterConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
