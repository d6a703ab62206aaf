"""Planning an `apply`: which layers of a model get adapters, on which of their
tensors, at what rank and scale, and on which compute route. Nothing is changed
here; `api.install` carries a plan out."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from . import attach
from .adapter import ROUTE_ACTIVATION, ROUTE_WEIGHT, LayerAdapter, ResolvedTarget
from .errors import LazyLayerError, LoraError, RankError, TargetError
from .registry import registry
from .rule import Rule
from .selection import ALL, SelectorSet, compile_many, first_value
from .state import adapted_layers, is_under

ROUTE_AUTO = "auto"
ROUTES = (ROUTE_AUTO, ROUTE_ACTIVATION, ROUTE_WEIGHT)
#: "auto" for LoRA-FA, which is chosen for memory: the activation route wherever it
#: saves memory (it then keeps no copy of the layer's input), else the faster route.
ROUTE_LEAN = "lean"


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    rule: Rule
    targets: list[ResolvedTarget]
    ranks: dict[str, int]  # per target: the layer's rank, clamped to that matrix's full rank
    scale: float
    activation: dict[str, Rule]  # see `activation_owners`


def check_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise RankError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def resolve_targets(layer_name: str, layer: nn.Module, rule: Rule, wanted: frozenset) -> list[ResolvedTarget]:
    """Bind the rule's targets to tensors. A parametrized weight (weight_norm,
    spectral_norm) is bound to its original tensor, which no activation route reads."""
    targets = list(rule.targets(layer))
    names = [t.name for t in targets]
    if wanted is not ALL:
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise TargetError(
                f"layer {layer_name or '<root>'} ({type(layer).__name__}) has no target {', '.join(map(repr, unknown))}; "
                f"its targets are {', '.join(names)}"
            )
        targets = [t for t in targets if t.name in wanted]
    resolved = []
    for t in targets:
        owner_name, tensor_name = t.owner, t.tensor
        owner = layer.get_submodule(owner_name)
        if parametrize.is_parametrized(owner, t.tensor):
            owner_name, tensor_name = _parametrized_source(layer_name, owner, t)
            owner = layer.get_submodule(owner_name)
        elif _hook_weight_norm(owner, t.tensor):
            # The old nn.utils.weight_norm recomputes `weight` from weight_g and
            # weight_v before every forward: adapt v, the tensor of the weight's shape.
            tensor_name = f"{t.tensor}_v"
        tensor = owner._parameters.get(tensor_name)
        if tensor is None:
            raise LoraError(f"rule {rule.name} names tensor {t.tensor!r} of {layer_name or '<root>'}, which has no such parameter")
        if is_lazy(tensor):
            raise LazyLayerError(
                f"layer {layer_name or '<root>'} ({type(layer).__name__}) is lazy and has no weights yet; "
                "run one forward pass with a real input first, then call apply"
            )
        if tensor.dim() < 2:
            raise LoraError(
                f"rule {rule.name} names {t.tensor!r} of {layer_name or '<root>'}, a {tensor.dim()}-D tensor; only matrices (2-D or more) can take a low-rank update"
            )
        resolved.append(ResolvedTarget(t.name, owner_name, tensor_name, t.rows, tuple(tensor.shape), rule.output_dim(layer, t)))
    return resolved


def _hook_weight_norm(owner: nn.Module, tensor: str) -> bool:
    from torch.nn.utils.weight_norm import WeightNorm

    return any(isinstance(h, WeightNorm) and h.name == tensor for h in owner._forward_pre_hooks.values())


def _parametrized_source(layer_name: str, owner: nn.Module, t: Any) -> tuple[str, str]:
    """For a parametrized tensor (weight_norm's g·v/‖v‖, spectral_norm's W/σ), adapt the
    original tensor of the same shape (v, or W before normalisation): the
    parametrization then runs on top of the adapted tensor, and merging adds ΔW to that
    original — exact, and both the adapter and the parametrization stay."""
    plist = owner.parametrizations[t.tensor]
    shape = getattr(owner, t.tensor).shape
    candidates = [n for n, p in plist._parameters.items() if n.startswith("original") and p is not None and p.shape == shape]
    if len(candidates) != 1:
        raise LoraError(
            f"cannot adapt {layer_name}.{t.tensor}: it carries a parametrization with no single original tensor of its shape {tuple(shape)}; "
            "exclude this layer, or remove the parametrization first"
        )
    prefix = f"{t.owner}." if t.owner else ""
    return f"{prefix}parametrizations.{t.tensor}", candidates[0]


def plan_layers(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None,
    targets: Any,
    exclude: Any,
    ranks: dict | None,
    alphas: dict | None,
    route: str,
    skip: set[str],
    rank_given: bool = True,
    rslora: bool = False,
) -> list[LayerPlan]:
    reg = registry()
    presets = reg.presets
    target_set = compile_many(targets, presets) if targets is not None else None
    exclude_set = compile_many(exclude, presets) if exclude is not None else None
    hits = {id(s): False for s in (target_set.selectors if target_set else [])}
    ex_hits = {id(s): False for s in (exclude_set.selectors if exclude_set else [])}
    claimed: set[str] = set()
    tensor_layer = _adapted_tensors(model)
    plans: list[LayerPlan] = []

    for name, module in model.named_modules():
        if (
            name in claimed
            or isinstance(module, LayerAdapter)
            or any(is_under(name, s) for s in skip)
            or attach.ADAPTERS in name.split(".")
        ):
            continue
        rule = reg.rule_for(module)
        if rule is None:
            continue
        wanted = ALL
        if target_set is not None:
            wanted = _match_and_count(target_set, hits, name, module)
            if wanted is None:
                continue
        if exclude_set is not None:
            dropped = _match_and_count(exclude_set, ex_hits, name, module)
            if dropped is ALL:
                continue
            if dropped:
                all_names = {t.name for t in rule.targets(module)}
                wanted = frozenset((all_names if wanted is ALL else wanted) - dropped)
                if not wanted:
                    continue
        resolved = resolve_targets(name, module, rule, wanted)
        resolved = _first_holder_only(name, module, resolved, tensor_layer)
        if not resolved:
            continue
        for t in rule.targets(module):
            if t.owner:
                claimed.add(f"{name}.{t.owner}" if name else t.owner)
        override = first_value(ranks, name, module, presets)
        layer_rank = check_rank(override, f"rank override for {name}") if override is not None else rank
        full = max(t.full_rank for t in resolved)
        if override is not None and override > full:
            raise RankError(f"rank override {override} for layer {name} is larger than its full rank {full}; use a rank of at most {full}")
        layer_alpha = first_value(alphas, name, module, presets)
        layer_alpha = layer_alpha if layer_alpha is not None else (alpha if alpha is not None else layer_rank)
        scale = float(layer_alpha) / (math.sqrt(layer_rank) if rslora else layer_rank)
        ranks_by_target = {t.name: min(layer_rank, t.full_rank) for t in resolved}
        plans.append(
            LayerPlan(name, module, rule, resolved, ranks_by_target, scale, activation_owners(route, module, rule, resolved, layer_rank))
        )

    for selectors, seen, what in ((target_set, hits, "target"), (exclude_set, ex_hits, "exclude")):
        if selectors is None:
            continue
        missing = [s.describe() for s in selectors.selectors if not seen[id(s)]]
        if missing:
            raise TargetError(
                f"{what} {', '.join(missing)} matched no layer that lora_anywhere can adapt; "
                f"adaptable layers in this model: {adaptable_summary(model)}"
            )
    if plans and rank_given and not ranks and rank > max(max(t.full_rank for t in p.targets) for p in plans):
        largest = max(max(t.full_rank for t in p.targets) for p in plans)
        raise RankError(
            f"rank {rank} is larger than the full rank of every selected layer (the largest is {largest}); use rank ≤ {largest}"
        )
    return plans


def _adapted_tensors(model: nn.Module) -> dict[int, str]:
    """id of every tensor that already carries an adapter → the layer holding it."""
    held: dict[int, str] = {}
    for layer_name, layer, adapters in adapted_layers(model):
        for adapter in adapters.values():
            for t in adapter.targets.values():
                held[id(t.parameter_in(layer))] = layer_name
    return held


def _first_holder_only(name: str, module: nn.Module, resolved: list[ResolvedTarget], tensor_layer: dict[int, str]) -> list[ResolvedTarget]:
    """Tied weights (one Parameter held by several modules, e.g. input embeddings and
    an LM head) get one adapter, on the first layer that selects them; the other
    holders read its W + ΔW (`attach.record_ties`). Two adapters on one tensor would
    make merging add both deltas where each reader saw only its own."""
    keep = []
    for t in resolved:
        if tensor_layer.setdefault(id(t.parameter_in(module)), name) == name:
            keep.append(t)
    if keep and len(keep) < len(resolved):
        shared = sorted({t.name for t in resolved} - {t.name for t in keep})
        raise TargetError(
            f"layer {name or '<root>'} shares target(s) {', '.join(shared)} with a layer adapted before it, but not its other targets; "
            f"exclude those targets (e.g. '{name}:{','.join(shared)}') or the other layer"
        )
    return keep


def _match_and_count(selectors: SelectorSet, hits: dict[int, bool], name: str, module: nn.Module):
    for s in selectors.selectors:
        if s(name, module) is not None:
            hits[id(s)] = True
    return selectors.match(name, module)


def activation_owners(route: str, layer: nn.Module, rule: Rule, targets: list[ResolvedTarget], rank: int) -> dict[str, Rule]:
    """The modules below `layer` (whose rule is `rule`) whose forward will add the
    adapter on the activations: those whose targets are all their own `weight`, whose
    rule offers the activation route for them, and (with route "auto") expects it to be
    the cheaper one, or (with ROUTE_LEAN) to save memory. Forcing "activation" still
    leaves the others on the weight route, which is always exact.

    With "auto", a layer whose rule applies its adapters itself (`Rule.layer_forward`,
    e.g. GCNConv's aggregation of the rank) keeps them all on the weight route, which
    that needs: a child's own preference (a GCNConv's ``lin``, wide enough for the
    activations) must not take away the layer's cheaper way."""
    if route == ROUTE_WEIGHT or (route == ROUTE_AUTO and rule.offers_layer_forward(layer)):
        return {}
    reg = registry()
    by_owner: dict[str, list[ResolvedTarget]] = {}
    for t in targets:
        by_owner.setdefault(t.owner, []).append(t)
    chosen = {}
    for owner_name, group in by_owner.items():
        if any(t.tensor != "weight" for t in group):
            continue
        owner = layer.get_submodule(owner_name)
        rule = reg.rule_for(owner)
        if rule is None or not rule.supports_activation(owner):
            continue
        if (
            route == ROUTE_ACTIVATION
            or rule.prefers_activation(owner, rank)
            or (route == ROUTE_LEAN and rule.activation_saves_memory(owner))
        ):
            chosen[owner_name] = rule
    return chosen


def adaptable_summary(model: nn.Module) -> str:
    reg = registry()
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if reg.rule_for(module) is not None and attach.ADAPTERS not in name.split("."):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    if not counts:
        return "none (no registered rule covers any layer; see `lora-anywhere plugins`)"
    return ", ".join(f"{n} ×{c}" for n, c in sorted(counts.items()))


def resolve_trainable(model: nn.Module, trainable: Any) -> list[str]:
    if trainable is None:
        return []
    specs = [trainable] if isinstance(trainable, str) else list(trainable)
    names: list[str] = []
    modules = dict(model.named_modules())
    presets = registry().presets
    for spec in specs:
        if isinstance(spec, str) and spec in modules:
            found = [spec]
        else:
            selector = compile_many(spec, presets)
            found = [n for n, m in modules.items() if n and attach.ADAPTERS not in n.split(".") and selector.match(n, m) is not None]
            # keep the outermost matches only
            found = [n for n in found if not any(is_under(n, other) for other in found if other != n)]
        if not found:
            raise TargetError(
                f"trainable {spec!r} matched no module; give module names as in model.named_modules(), e.g. 'fc' or 'classifier.*'"
            )
        empty = [n for n in found if not any(True for _ in modules[n].parameters())]
        if empty:
            raise TargetError(
                f"trainable {spec!r} matched {', '.join(empty)}, which has no parameters to train; name the module that holds them"
            )
        names.extend(n for n in found if n not in names)
    return names
