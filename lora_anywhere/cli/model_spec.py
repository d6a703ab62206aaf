"""How a command builds its base model: a spec string, builder kwargs, a seed and
optional pretrained weights, so that `train`, `merge` and `evaluate` rebuild the same
base from the same description."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import build_model

CLASSES = "{classes}"


@dataclass
class ModelSpec:
    """How to build the base model: `build_model(spec, **kwargs)` under a seed, then
    optional pretrained weights."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    weights_ignore: list[str] = field(default_factory=list)
    seed: int = 0

    def resolved_kwargs(self, classes: int | None) -> dict[str, Any]:
        """kwargs with every ``"{classes}"`` replaced by the class count."""

        def sub(value: Any) -> Any:
            if value == CLASSES:
                if classes is None:
                    raise ConfigError(
                        f"model kwargs use {CLASSES!r}, but no class count is known here; give the number instead (e.g. --model-arg num_classes=3)"
                    )
                return classes
            if isinstance(value, dict):
                return {k: sub(v) for k, v in value.items()}
            if isinstance(value, list):
                return [sub(v) for v in value]
            return value

        return sub(self.kwargs)

    def build(self, classes: int | None = None) -> nn.Module:
        kwargs = self.resolved_kwargs(classes)
        torch.manual_seed(self.seed)
        try:
            model = build_model(self.spec, **kwargs)
        except (TypeError, ValueError) as exc:  # a model source's own complaint: an unknown name, a bad keyword
            raise ConfigError(f"model spec {self.spec!r} with {kwargs or 'no kwargs'}: {exc}") from exc
        if self.weights is not None:
            load_weights(model, self.weights, self.weights_ignore)
        return model


def load_weights(model: nn.Module, path: Path, ignore: list[str]) -> None:
    """Load base weights (safetensors, or a torch file of tensors), skipping keys that
    start with an `ignore` prefix; every other key must match the model exactly."""
    if not path.is_file():
        raise ConfigError(f"base weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as exc:  # safetensors, pickle and zip errors alike
        raise ConfigError(
            f"cannot read base weights {path} ({type(exc).__name__}: {exc}); give a .safetensors file or a torch state_dict"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state_dict (names → tensors)")
    skipped = lambda key: any(key.startswith(prefix) for prefix in ignore)  # noqa: E731
    expected = model.state_dict()
    wanted = {k: v for k, v in state.items() if not skipped(k)}
    problems = [f"missing {k}" for k in expected if k not in wanted and not skipped(k)]
    problems += [f"unexpected {k}" for k in wanted if k not in expected]
    problems += [
        f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in wanted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ConfigError(
            f"base weights {path} do not fit the model: {shown}. Check the model spec and kwargs, or list keys to skip in weights_ignore (e.g. the old head)"
        )
    model.load_state_dict(wanted, strict=False)


def parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (3, 0.5, true, [1, 2], "x"), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["num_classes=3", "dropout=0.1"]`` → ``{"num_classes": 3, "dropout": 0.1}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-arg {item!r} is not KEY=VALUE (e.g. --model-arg num_classes=10)")
        out[key.strip()] = parse_value(value)
    return out
