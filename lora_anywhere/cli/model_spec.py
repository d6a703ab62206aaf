"""How a command builds its base model: a spec string, builder kwargs, a seed and
optional pretrained weights, so that `train`, `merge`, `evaluate` and `predict`
rebuild the same base from the same description (which the run folder records)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import build_model
from ..registry import registry
from .pretrained import Weights, family_filter, from_pretrained, load_weights

CLASSES = "{classes}"


@dataclass
class ModelSpec:
    """How to build the base model: `build_model(spec, **kwargs)` under a seed, then
    optional pretrained weights (see `pretrained`)."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Weights | None = None
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
        import_builder(self.spec)
        torch.manual_seed(self.seed)
        if self.weights is not None and self.weights.kind == "transformers":
            return from_pretrained(self.spec, self.weights.path, kwargs, self.weights_ignore)
        try:
            model = build_model(self.spec, **kwargs)
        except (TypeError, ValueError) as exc:  # a model source's own complaint: an unknown name, a bad keyword
            raise ConfigError(f"model spec {self.spec!r} with {kwargs or 'no kwargs'}: {exc}") from exc
        if self.weights is not None:
            load_weights(model, self.weights.path, self.weights_ignore, family_filter(self.spec, model))
        return model

    def record(self, classes: int | None) -> dict[str, Any]:
        """What the run folder keeps to rebuild this base: kwargs resolved, weights
        with their SHA-256."""
        return {
            "spec": self.spec,
            "kwargs": self.resolved_kwargs(classes),
            "weights": self.weights.record() if self.weights is not None else None,
            "weights_ignore": list(self.weights_ignore),
            "seed": self.seed,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ModelSpec:
        weights = Weights.from_record(record["weights"]) if record.get("weights") else None
        return cls(record["spec"], dict(record["kwargs"]), weights, list(record.get("weights_ignore", [])), int(record.get("seed", 0)))


def import_builder(spec: str) -> None:
    """Import the module of a ``package.module:callable`` spec as ``python -m`` would
    find it — the current folder first when it is not importable otherwise — and say
    why an import fails (no such module here, or an error inside it)."""
    prefix, sep, name = spec.partition(":")
    if not (prefix and sep and name) or prefix in registry().model_sources or prefix in sys.modules:
        return  # build_model says what is wrong with a malformed spec
    here = os.getcwd()
    try:
        _import(spec, prefix)
        return
    except ModuleNotFoundError:
        if here in sys.path or "" in sys.path:
            raise _not_found(spec, prefix, here) from None
    sys.path.insert(0, here)  # where `python -m` looks first
    try:
        _import(spec, prefix)
    except ModuleNotFoundError:
        sys.path.remove(here)
        raise _not_found(spec, prefix, here) from None
    except ConfigError:
        sys.path.remove(here)
        raise


def _import(spec: str, prefix: str) -> None:
    """Import `prefix`; a ModuleNotFoundError escapes only when `prefix` itself is not
    found (not a module it imports), every other failure is a ConfigError."""
    try:
        importlib.import_module(prefix)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (prefix == exc.name or prefix.startswith(f"{exc.name}.")):
            raise
        raise ConfigError(f"model spec {spec!r}: importing {prefix} failed inside it: {exc}; install what it needs") from exc
    except Exception as exc:  # a syntax error, a failing import-time statement
        raise ConfigError(f"model spec {spec!r}: importing {prefix} raised {type(exc).__name__}: {exc}") from exc


def _not_found(spec: str, prefix: str, here: str) -> ConfigError:
    known = ", ".join(sorted(registry().model_sources)) or "none (install a domain extra, e.g. lora_anywhere[vision])"
    file = Path(here, *prefix.split(".")).with_suffix(".py")
    return ConfigError(
        f"model spec {spec!r}: {prefix!r} is neither a model source ({known}) nor a module in the current folder "
        f"({file} does not exist) or on sys.path; run from the folder that holds it, or install its package"
    )


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
