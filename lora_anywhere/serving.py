"""Serving many adapters from one base model.

`per_sample` runs one batch whose samples each use their own adapter (or none): every
adapted layer computes the base output once and adds, for each adapter in the batch,
``s·B(A(x))`` on that adapter's samples only — exactly what each sample gets alone,
at the cost of one base pass plus the low-rank terms, instead of one pass per adapter.
It needs the activation route, so every layer an adapter touches must offer it.

`hotswap_adapter` replaces an adapter's tensors in place with those of a saved one of
the same shapes: a model compiled with ``torch.compile`` keeps its graphs (they read
the tensors, which keep their identity), so switching adapters costs no recompile.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch
from torch import nn

from . import attach
from .adapter import LayerAdapter
from .errors import LoraError, NotAdaptedError, ShapeMismatchError
from .io import adapter_state_dict, read_adapter
from .plan import ROUTE_ACTIVATION, activation_owners
from .state import adapted_layers, model_state


@contextlib.contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None], *, dim: int = 0) -> Iterator[nn.Module]:
    """Within the block, sample ``i`` of every input (index ``i`` along `dim`) runs
    with adapter ``names[i]`` alone, or the base model where it is None; the model's
    own choice of active adapters is restored afterwards.

    For a graph model, a "sample" is a node: give one name per node (e.g. a graph's
    name for each of its nodes, from ``batch.batch``). Layers that other layers read
    the weight of, or that only offer the weight route (``nn.MultiheadAttention``,
    RNNs, graph attention vectors), cannot take per-sample adapters: the error names
    them. Merged adapters must be unmerged first.
    """
    layers = _serving_plan(model, names)
    index = {n: i for i, n in enumerate(dict.fromkeys(n for n in names if n is not None))}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.tensor([index.get(n, -1) if n is not None else -1 for n in names], device=device)
    masks: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # one per adapter and dtype, shared by its layers
    saved: list[tuple[nn.Module, LayerAdapter, bool, dict]] = []
    try:
        for layer, forced in layers:
            for aname, adapter in attach.layer_adapters(layer).items():
                saved.append((layer, adapter, adapter.active, adapter.activation_owners))
                adapter.active = aname in index
                if adapter.active:
                    adapter.activation_owners = forced
                    key = (aname, adapter.factors[next(iter(adapter.factors))].A.dtype)
                    if key not in masks:
                        masks[key] = (ids == index[aname]).to(key[1])
                    adapter.sample_mask = masks[key]
                    adapter.sample_dim = dim
            attach.refresh(layer)
        yield model
    finally:
        for _, adapter, active, owners in saved:
            adapter.active, adapter.activation_owners, adapter.sample_mask = active, owners, None
        for layer, _ in layers:
            attach.refresh(layer)


def _serving_plan(model: nn.Module, names: Sequence[str | None]) -> list[tuple[nn.Module, dict]]:
    """Each adapted layer with the activation owners its adapters must use; checks
    everything before anything is changed."""
    state = model_state(model)
    known = list(state.adapters) if state else []
    if isinstance(names, str) or not len(names):
        raise LoraError("per_sample needs a list of adapter names, one per sample (None for the base model)")
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise NotAdaptedError(
            f"per_sample: the model has no adapter named {', '.join(map(repr, unknown))}; it has {', '.join(known) or 'none'}"
        )
    used = {n for n in names if n is not None}
    plan, problems = [], []
    for lname, layer, adapters in adapted_layers(model):
        for aname, adapter in adapters.items():
            if adapter.merged:
                raise LoraError(f"adapter {aname!r} is merged into the weights; call unmerge(model, {aname!r}) before per_sample")
        targets = [t for aname, a in adapters.items() if aname in used for t in a.targets.values()]
        if not targets:
            plan.append((layer, {}))
            continue
        dora = [aname for aname in used if aname in adapters and adapters[aname].dora]
        forced = activation_owners(ROUTE_ACTIVATION, layer, next(iter(adapters.values())).rule, targets, 1)
        missing = sorted({t.owner or "itself" for t in targets if t.owner not in forced})
        if dora or missing:
            what = "DoRA adapters" if dora else f"{', '.join(missing)} (weight route only)"
            problems.append(f"{lname or '<root>'} ({type(layer).__name__}): {what}")
        plan.append((layer, forced))
    if problems:
        shown = "\n  - ".join(problems[:10]) + (f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise LoraError(
            f"per-sample adapters need the activation route on every adapted layer, and these layers lack it:\n  - {shown}\n"
            "exclude them when applying the adapters, or run one adapter at a time with set_adapter"
        )
    return plan


@torch.no_grad()
def hotswap_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Replace the tensors of adapter `name` (the only one, by default) in place with
    those saved at `path`, which must have the same layers, targets, ranks and scales.
    A compiled model runs the new adapter without recompiling. Nothing changes if the
    saved adapter does not fit."""
    state = model_state(model)
    names = list(state.adapters) if state else []
    if name is None and len(names) == 1:
        name = names[0]
    if name not in names:
        raise NotAdaptedError(f"hotswap_adapter: the model has no adapter named {name!r}; it has {', '.join(names) or 'none'}")
    config, tensors = read_adapter(path)
    current = state.adapters[name]
    problems = [f"{what}: the model's adapter has {mine!r}, the file {theirs!r}" for what, mine, theirs in _differences(current, config)]
    live = adapter_state_dict(model, name)
    problems += [f"tensor {k} is missing from the file" for k in live if k not in tensors]
    problems += [
        f"tensor {k}: the file has {tuple(tensors[k].shape)}, the model {tuple(v.shape)}"
        for k, v in live.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems += [f"the file has tensor {k}, which the model's adapter lacks" for k in tensors if k not in live]
    if problems:
        shown = "\n  - ".join(problems[:20])
        raise ShapeMismatchError(
            f"the adapter at {path} cannot replace {name!r} in place:\n  - {shown}\nload it beside with load_adapter(model, path, name=...) instead"
        )
    for key, value in live.items():
        value.copy_(tensors[key])
    return model


def _differences(mine, theirs) -> list[tuple[str, object, object]]:
    """Where two adapter configs differ in a way that changes the computation."""
    found = [(k, getattr(mine, k), getattr(theirs, k)) for k in ("init", "dora", "trainable") if getattr(mine, k) != getattr(theirs, k)]
    if set(mine.layers) != set(theirs.layers):
        found.append(("layers", sorted(set(mine.layers) - set(theirs.layers)), sorted(set(theirs.layers) - set(mine.layers))))
        return found
    for lname, record in mine.layers.items():
        other = theirs.layers[lname]
        if record.scale != other.scale:
            found.append((f"scale of {lname}", record.scale, other.scale))
        ranks = {t: r.rank for t, r in record.targets.items()}
        other_ranks = {t: r.rank for t, r in other.targets.items()}
        if ranks != other_ranks:
            found.append((f"targets and ranks of {lname}", ranks, other_ranks))
    return found


__all__ = ["per_sample", "hotswap_adapter"]
