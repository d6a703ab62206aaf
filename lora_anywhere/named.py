"""Several named adapters on one model: switch, disable, delete, combine.

Each `apply(..., name=...)` (or `load_adapter(..., name=...)`) adds one adapter beside
the others. Only active adapters are applied; `set_adapter` picks one, `disabled`
gives base outputs for a while, `combine` makes a new adapter that is exactly a
weighted sum of others.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Mapping

import torch
from torch import nn

from . import attach
from .adapter import LayerAdapter
from .adapter_config import TargetRecord
from .api import remove, shift_base
from .errors import LoraError, NotAdaptedError
from .state import adapted_layers, base_swapped_in, model_state, unwrap


def _names(model: nn.Module) -> list[str]:
    state = model_state(model)
    return list(state.adapters) if state else []


def _require(model: nn.Module, name: str) -> None:
    if name not in _names(model):
        raise NotAdaptedError(f"the model has no adapter named {name!r}; it has {', '.join(_names(model)) or 'none'}")


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make `name` the one active (and trainable) adapter; the others stay on the model
    but are neither applied nor trained. Merged adapters are part of the weights: take
    them out with `unmerge` first to switch away from them."""
    _require(model, name)
    merged = sorted({a for _, _, adapters in adapted_layers(model) for a, adapter in adapters.items() if adapter.merged and a != name})
    if merged:  # checked on every layer before any is switched
        raise LoraError(
            f"adapter {merged[0]!r} is merged into the weights; call unmerge(model, {merged[0]!r}) before switching to {name!r}"
        )
    for _, layer, adapters in adapted_layers(model):
        for aname, adapter in adapters.items():
            adapter.active = aname == name
            adapter.set_trainable(adapter.active, freeze_a=model_state(model).adapters[aname].freeze_a)
        attach.refresh(layer)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    return [n for n in _names(model) if any(a.active for _, _, lay in adapted_layers(model) for k, a in lay.items() if k == n)]


@contextlib.contextmanager
def disabled(model: nn.Module, *, keep_trained: bool = False) -> Iterator[nn.Module]:
    """Within the block the model computes exactly what its base does: merged adapters
    are taken out, every adapter is switched off, and the `trainable` modules and base
    buffers hold what they held before the first adapter (copies: the trained tensors
    are set aside unchanged, so a graph built before the block still backpropagates).
    All is restored afterwards. ``keep_trained=True`` switches off only the low-rank
    updates, leaving the trainable modules and buffers as trained: what the adapters
    alone change."""
    state = model_state(model)
    base = base_swapped_in(unwrap(model), state) if state and not keep_trained else contextlib.nullcontext()
    with base, _adapters_off(model):
        yield model


@contextlib.contextmanager
def _adapters_off(model: nn.Module) -> Iterator[None]:
    saved: list[tuple[nn.Module, LayerAdapter, bool, bool]] = []
    for _, layer, adapters in adapted_layers(model):
        for adapter in adapters.values():
            saved.append((layer, adapter, adapter.active, adapter.merged))
            if adapter.merged:
                shift_base(layer, adapter, -1)
                adapter.merged = False
            adapter.active = False
        attach.refresh(layer)
    try:
        yield
    finally:
        for layer, adapter, active, merged in saved:
            adapter.active = active
            if merged:
                shift_base(layer, adapter, +1)
                adapter.merged = True
        for layer in {id(layer): layer for layer, *_ in saved}.values():
            attach.refresh(layer)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Take one adapter off (its update leaves the weights if it was merged)."""
    _require(model, name)
    return remove(model, merge=False, name=name)


@torch.no_grad()
def combine(model: nn.Module, weights: Mapping[str, float], name: str = "combined") -> nn.Module:
    """Add adapter `name` with ΔW = Σ wᵢ·ΔWᵢ exactly: its factors are the others'
    stacked (rank Σ rᵢ, each B scaled by wᵢ·sᵢ). It becomes the active adapter."""
    if not weights:
        raise LoraError("combine() needs at least one adapter name with its weight, e.g. {'a': 0.5, 'b': 0.5}")
    for n in weights:
        _require(model, n)
        if model_state(model).adapters[n].dora:
            raise LoraError(
                f"adapter {n!r} is a DoRA adapter, whose update is not linear in its factors; combine() takes plain LoRA adapters"
            )
    if name in _names(model):
        raise LoraError(f"the model already has an adapter named {name!r}; choose another name for the combination")
    state = model_state(model)
    first = state.adapters[next(iter(weights))]
    config = copy.deepcopy(first)
    # Its factors hold the SVD starts already (`LowRank.pair`) and its scale is 1.
    config.name, config.layers, config.alpha, config.freeze_a, config.rslora, config.init = name, {}, 1.0, False, False, "lora"
    config.trainable = []
    for layer_name, layer, adapters in adapted_layers(model):
        parts = [(adapters[n], w) for n, w in weights.items() if n in adapters]
        if not parts:
            continue
        targets = {t.name: t for a, _ in parts for t in a.targets.values()}
        like = next(iter(parts[0][0].factors.values())).A
        ranks = {t: sum(a.factors[t].pair()[0].shape[0] for a, _ in parts if t in a.factors) for t in targets}
        combined = LayerAdapter(
            parts[0][0].rule,
            targets.values(),
            ranks,
            1.0,
            activation_owners=parts[0][0].activation_owners,
            dropout=0.0,
            dtype=like.dtype,
            device=like.device,
        )
        for tname in targets:
            pieces = [(a.factors[tname], w) for a, w in parts if tname in a.factors]
            pairs = [(f.pair(), w * f.scale) for f, w in pieces]
            combined.factors[tname].A = nn.Parameter(torch.cat([a for (a, _), _ in pairs]).clone())
            combined.factors[tname].B = nn.Parameter(torch.cat([b * w for (_, b), w in pairs], dim=1).clone())
        layer._modules[attach.ADAPTERS][name] = combined
        record = copy.deepcopy(state.adapters[next(n for n in weights if n in adapters)].layers[layer_name])
        record.scale = 1.0
        record.targets = {
            t.name: TargetRecord(t.owner, t.tensor, list(t.rows) if t.rows else None, list(t.shape), combined.factors[t.name].rank)
            for t in targets.values()
        }
        config.layers[layer_name] = record
    config.rank = max(t.rank for record in config.layers.values() for t in record.targets.values())
    state.adapters[name] = config
    return set_adapter(model, name)


__all__ = ["set_adapter", "active_adapters", "disabled", "delete_adapter", "combine"]
