"""lora_anywhere plugin for timm and torchvision.

Adds rules for the fused-qkv attention blocks of both libraries (so a block's q, k,
v and output projection can be adapted one by one), the presets "attention" (q and
v, as in the LoRA paper), "attention-all" and "mlp", and the model sources
``timm:NAME`` and ``torchvision:NAME`` (random weights; nothing is downloaded).

Convolutions, Linears and nn.MultiheadAttention are the core's: every CNN of both
libraries is covered without this plugin. It registers what is importable: with only
torchvision installed it is active for torchvision alone.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Callable

from torch import nn

from lora_anywhere import LoraError, Rule, hookimpl

from .catalog import attention_rules
from .presets import attention_preset, mlp


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: The frameworks found at import time, by name.
FRAMEWORKS: dict[str, ModuleType] = {n: m for n in ("timm", "torchvision") if (m := _import(n)) is not None}
if not FRAMEWORKS:
    # The core lists a plugin that raises ModuleNotFoundError as inactive.
    raise ModuleNotFoundError("lora_anywhere_vision needs timm or torchvision", name="timm or torchvision")

RULES: dict[type, Rule] = attention_rules(set(FRAMEWORKS))

QV = frozenset({"q", "v"})
QKV_PROJ = frozenset({"q", "k", "v", "proj"})


@hookimpl
def lora_anywhere_register_rules(register: Callable[[type, Rule], None]) -> None:
    for cls, rule in RULES.items():
        register(cls, rule)


@hookimpl
def lora_anywhere_register_presets(register: Callable[[str, Any], None]) -> None:
    register("attention", attention_preset(RULES, QV, QV, "attention"))
    register("attention-all", attention_preset(RULES, QKV_PROJ, frozenset({"q", "k", "v", "out"}), "attention-all"))
    register("mlp", mlp)


def build_timm(name: str, **kwargs: Any) -> nn.Module:
    """``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)``."""
    timm = FRAMEWORKS["timm"]
    if kwargs.get("pretrained"):
        raise LoraError("the timm: model source builds random weights and downloads nothing; load a checkpoint into the model yourself")
    kwargs.pop("pretrained", None)
    if not timm.is_model(name):
        raise LoraError(f"timm has no model {name!r}; timm.list_models('*pattern*') lists them")
    return timm.create_model(name, pretrained=False, **kwargs)


def build_torchvision(name: str, **kwargs: Any) -> nn.Module:
    """``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``.

    Every ``weights*`` argument is None: detection and segmentation builders would
    otherwise download an ImageNet backbone (``weights_backbone``) by default."""
    models = FRAMEWORKS["torchvision"].models
    if name not in models.list_models():
        raise LoraError(f"torchvision has no model {name!r}; torchvision.models.list_models() lists them")
    for arg in inspect.signature(models.get_model_builder(name)).parameters:
        if arg.startswith("weights"):
            if kwargs.get(arg) is not None:
                raise LoraError(
                    f"the torchvision: model source builds random weights and downloads nothing ({arg}=…); load a checkpoint into the model yourself"
                )
            kwargs[arg] = None
    return models.get_model(name, **kwargs)


_SOURCES = {"timm": build_timm, "torchvision": build_torchvision}


@hookimpl
def lora_anywhere_register_model_sources(register: Callable[[str, Callable[..., nn.Module]], None]) -> None:
    for framework in FRAMEWORKS:
        register(framework, _SOURCES[framework])
