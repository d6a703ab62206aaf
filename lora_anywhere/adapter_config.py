"""What an adapter is, as data: enough to re-create it exactly on a fresh base model.

Saved as ``lora_anywhere_config.json`` beside the tensors, and kept on the adapted model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "lora_anywhere.adapter/2"
#: Older formats this version still reads. /1 called the compute route "path".
READABLE_FORMATS = ("lora_anywhere.adapter/1", FORMAT)


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
    route: str  # "activation", "weight" or "mixed": how it was computed when saved
    scale: float
    targets: dict[str, TargetRecord]


@dataclass
class AdapterConfig:
    name: str
    rank: int
    alpha: float
    dropout: float
    route: str
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
    def from_json(cls, data: dict[str, Any]) -> AdapterConfig:
        layers = {
            name: LayerRecord(**{**_renamed(rec), "targets": {k: TargetRecord(**t) for k, t in rec["targets"].items()}})
            for name, rec in data["layers"].items()
        }
        return cls(**{**_renamed(data), "layers": layers, "format": FORMAT})


def _renamed(record: dict[str, Any]) -> dict[str, Any]:
    """Format /1 wrote the compute route under the key "path"."""
    if "path" in record and "route" not in record:
        record = {("route" if k == "path" else k): v for k, v in record.items()}
    return record
