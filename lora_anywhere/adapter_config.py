"""What an adapter is, as data: enough to re-create it exactly on a fresh base model.

Saved as ``lora_anywhere_config.json`` beside the tensors, and kept on the adapted model.
A file is read through `AdapterConfig.from_json`, which checks every key, type and
range before anything is built from it: adapter files are shared, and a config is
untrusted input.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT = "lora_anywhere.adapter/3"
#: Older formats this version still reads. /1 called the compute route "path"; /2 had
#: no base buffers and normalised DoRA's magnitude along the first axis of every
#: tensor (rows of an Embedding or transformers' Conv1D, not its output features).
READABLE_FORMATS = ("lora_anywhere.adapter/1", "lora_anywhere.adapter/2", FORMAT)
ROUTES = ("auto", "activation", "weight")  # as `apply` takes them
LAYER_ROUTES = ("activation", "weight", "mixed")  # as a layer computed them
INITS = ("lora", "svd")
#: A valid adapter name: it becomes part of state_dict keys, so no "." or "/".
NAME = re.compile(r"[^./\x00-\x1f]{1,200}")
#: Module and tensor names as `named_modules` gives them ("" is the root): no empty
#: part, no "/" (the separator of tensor keys in the file), no control characters.
MODULE_NAME = re.compile(r"(?=.{0,1000}$)(|[^./\x00-\x1f]+(\.[^./\x00-\x1f]+)*)", re.DOTALL)


@dataclass
class TargetRecord:
    owner: str
    tensor: str
    rows: list[int] | None
    shape: list[int]  # the whole base tensor's shape, checked on load
    rank: int

    @property
    def matrix_shape(self) -> tuple[int, int]:
        rows = self.shape[0] if self.rows is None else self.rows[1] - self.rows[0]
        return rows, math.prod(self.shape[1:])


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
    #: Base buffers saved with the adapter (filled by `save_adapter`): those the
    #: training changed, e.g. running statistics of frozen BatchNorm layers.
    buffers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "format": FORMAT}

    @classmethod
    def from_json(cls, data: Any) -> AdapterConfig:
        """Build a config from parsed JSON, checking it whole: a ValueError names the
        first key that is missing, unknown, of the wrong type or out of range. The
        result keeps the file's `format`."""
        data = _renamed(_mapping(data, "the config"))
        _keys(data, "the config", required=_REQUIRED, optional=_OPTIONAL)
        fmt = data.get("format")
        if fmt not in READABLE_FORMATS:
            raise ValueError(f"format {fmt!r}, expected one of {', '.join(READABLE_FORMATS)}")
        layers = {
            _text(name, "a layer name", MODULE_NAME): _layer(record, f"layer {name!r}")
            for name, record in _mapping(data["layers"], "layers").items()
        }
        return cls(
            name=_text(data["name"], "name", NAME),
            rank=_count(data["rank"], "rank"),
            alpha=_positive(data["alpha"], "alpha"),
            dropout=_fraction(data["dropout"], "dropout"),
            route=_choice(data["route"], "route", ROUTES),
            targets=_texts(data["targets"], "targets", optional=True),
            exclude=_texts(data["exclude"], "exclude", optional=True),
            trainable=[_text(m, "a trainable module", MODULE_NAME) for m in _texts(data["trainable"], "trainable")],
            layers=layers,
            freeze_a=_flag(data.get("freeze_a", False), "freeze_a"),
            rslora=_flag(data.get("rslora", False), "rslora"),
            init=_choice(data.get("init", "lora"), "init", INITS),
            dora=_flag(data.get("dora", False), "dora"),
            library_version=_text(data.get("library_version", ""), "library_version", re.compile(r".{0,100}")),
            format=fmt,
            buffers=[_text(b, "a buffer name", MODULE_NAME) for b in _texts(data.get("buffers", []), "buffers")],
        )


_REQUIRED = {"name", "rank", "alpha", "dropout", "route", "targets", "exclude", "trainable", "layers", "format"}
_OPTIONAL = {"freeze_a", "rslora", "init", "dora", "library_version", "buffers"}


def _renamed(record: dict[str, Any]) -> dict[str, Any]:
    """Format /1 wrote the compute route under the key "path"."""
    if "path" in record and "route" not in record:
        record = {("route" if k == "path" else k): v for k, v in record.items()}
    return record


def _layer(data: Any, where: str) -> LayerRecord:
    data = _renamed(_mapping(data, where))
    _keys(data, where, required={"rule", "type", "route", "scale", "targets"})
    targets = _mapping(data["targets"], f"{where} targets")
    if not targets:
        raise ValueError(f"{where} has no targets")
    return LayerRecord(
        rule=_text(data["rule"], f"{where} rule", re.compile(r".{1,200}")),
        type=_text(data["type"], f"{where} type", re.compile(r".{1,300}")),
        route=_choice(data["route"], f"{where} route", LAYER_ROUTES),
        scale=_positive(data["scale"], f"{where} scale"),
        targets={_text(k, f"a target of {where}", MODULE_NAME): _target(t, f"{where} target {k!r}") for k, t in targets.items()},
    )


def _target(data: Any, where: str) -> TargetRecord:
    data = _mapping(data, where)
    _keys(data, where, required={"owner", "tensor", "rows", "shape", "rank"})
    shape = data["shape"]
    if not isinstance(shape, list) or not 2 <= len(shape) <= 8:
        raise ValueError(f"{where}: shape must be a list of 2 to 8 sizes, got {shape!r}")
    shape = [_count(d, f"{where} shape") for d in shape]
    rows = data["rows"]
    if rows is not None:
        if not isinstance(rows, list) or len(rows) != 2:
            raise ValueError(f"{where}: rows must be null or [start, stop], got {rows!r}")
        start, stop = (_whole(r, f"{where} rows") for r in rows)
        if not 0 <= start < stop <= shape[0]:
            raise ValueError(f"{where}: rows {rows} are not a block of the tensor's {shape[0]} rows")
        rows = [start, stop]
    return TargetRecord(
        owner=_text(data["owner"], f"{where} owner", MODULE_NAME),
        tensor=_text(data["tensor"], f"{where} tensor", MODULE_NAME),
        rows=rows,
        shape=shape,
        rank=_count(data["rank"], f"{where} rank"),
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _keys(data: dict[str, Any], where: str, *, required: set[str], optional: set[str] = frozenset()) -> None:
    missing = sorted(required - data.keys())
    unknown = sorted(data.keys() - required - optional)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(map(repr, unknown))}"] if unknown else [])
        raise ValueError(f"{where}: {'; '.join(parts)}")


def _text(value: Any, where: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ValueError(f"{where} {value!r:.80} is not valid")
    return value


def _texts(value: Any, where: str, *, optional: bool = False) -> list[str] | None:
    if value is None and optional:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= 1000 for v in value):
        raise ValueError(f"{where} must be a list of strings{' or null' if optional else ''}, got {value!r:.80}")
    return list(value)


def _whole(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be a whole number, got {value!r:.80}")
    return value


def _count(value: Any, where: str) -> int:
    value = _whole(value, where)
    if value < 1:
        raise ValueError(f"{where} must be at least 1, got {value}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r:.80}")
    return float(value)


def _positive(value: Any, where: str) -> float:
    value = _number(value, where)
    if value <= 0:
        raise ValueError(f"{where} must be positive, got {value}")
    return value


def _fraction(value: Any, where: str) -> float:
    value = _number(value, where)
    if not 0 <= value < 1:
        raise ValueError(f"{where} must be in [0, 1), got {value}")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r:.80}")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{where} must be one of {', '.join(choices)}, got {value!r:.80}")
    return value
