"""Build a model from a spec string, for the command line and configs.

``prefix:name`` uses a model source a plugin registered (``torchvision:resnet50``,
``timm:vit_small_patch16_224``, ``torchaudio:wav2vec2_base``, ``pyg:GAT``);
``package.module:callable`` imports and calls. Models get random weights: nothing is
downloaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .errors import LoraError
from .registry import registry


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise LoraError(f"model spec {spec!r} is not of the form 'source:name' (e.g. 'torchvision:resnet18') or 'package.module:callable'")
    sources = registry().model_sources
    if prefix in sources:
        model = sources[prefix](name, **kwargs)
    else:
        try:
            module = importlib.import_module(prefix)
        except ImportError as exc:
            known = ", ".join(sorted(sources)) or "none (install a domain extra, e.g. lora_anywhere[vision])"
            raise LoraError(
                f"model spec {spec!r}: {prefix!r} is neither a model source ({known}) nor an importable module ({exc})"
            ) from exc
        try:
            factory = getattr(module, name)
        except AttributeError as exc:
            raise LoraError(f"model spec {spec!r}: module {prefix} has no attribute {name!r}") from exc
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise LoraError(
                f"model spec {spec!r}: calling {prefix}.{name}() failed ({exc}); point the spec at a callable that builds the model from defaults"
            ) from exc
    if not isinstance(model, nn.Module):
        raise LoraError(f"model spec {spec!r} built a {type(model).__name__}, not an nn.Module")
    return model
