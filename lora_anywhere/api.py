"""apply / merge / unmerge / remove: the lifecycle of adapters on a model."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from . import attach
from .adapter import ACTIVATION, WEIGHT, LayerAdapter, ResolvedTarget
from .config import AdapterConfig, LayerRecord, ModelState, TargetRecord
from .errors import AlreadyAdaptedError, LazyLayerError, LoraError, NotAdaptedError, RankError, TargetError
from .registry import Rule, registry
from .selection import ALL, SelectorSet, compile_many, first_value

DEFAULT = "default"
DEFAULT_RANK = 8
PATHS = ("auto", ACTIVATION, WEIGHT)
#: "auto" for LoRA-FA, which is chosen for memory: the activation path wherever it
#: saves memory (it then keeps no copy of the layer's input), else the faster path.
LEAN = "lean"
INITS = ("lora", "svd")
_STATE = "_lora_anywhere_state"


# ----------------------------------------------------------------------------- state


def model_state(model: nn.Module) -> ModelState | None:
    return model.__dict__.get(_STATE)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, dict[str, LayerAdapter]]]:
    """Every layer below `model` that carries adapters, with them by name."""
    for name, module in model.named_modules():
        adapters = attach.layer_adapters(module)
        if adapters:
            yield name, module, adapters


# ----------------------------------------------------------------------------- planning


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    rule: Rule
    targets: list[ResolvedTarget]
    ranks: dict[str, int]  # per target: the layer's rank, clamped to that matrix's full rank
    scale: float
    activation: dict[str, Rule]  # see `activation_owners`


def _check_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise RankError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_options(rank: Any, alpha: Any, dropout: Any, path: str, name: Any) -> None:
    _check_rank(rank, "rank")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha <= 0):
        raise LoraError(f"alpha must be a positive number or None (meaning alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise LoraError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if path not in PATHS:
        raise LoraError(f"path must be one of {', '.join(map(repr, PATHS))}, got {path!r}")
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise LoraError(f"adapter name must be a non-empty string without '.' or '/', got {name!r}")


def resolve_targets(layer_name: str, layer: nn.Module, rule: Rule, wanted: frozenset) -> list[ResolvedTarget]:
    """Bind the rule's targets to tensors. A parametrized weight (weight_norm,
    spectral_norm) is bound to its original tensor, which no activation path reads."""
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
        owner = layer.get_submodule(t.owner) if t.owner else layer
        owner_path, tensor_name = t.owner, t.tensor
        if parametrize.is_parametrized(owner, t.tensor):
            owner_path, tensor_name = _parametrized_source(layer_name, owner, t)
            owner = layer.get_submodule(owner_path)
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
            raise LoraError(f"rule {rule.name} names {t.tensor!r} of {layer_name or '<root>'}, a {tensor.dim()}-D tensor; only matrices (2-D or more) can take a low-rank update")
        resolved.append(ResolvedTarget(t.name, owner_path, tensor_name, t.rows, tuple(tensor.shape)))
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


def _plan(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None,
    targets: Any,
    exclude: Any,
    ranks: dict | None,
    alphas: dict | None,
    path: str,
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
        if name in claimed or isinstance(module, LayerAdapter) or _under(name, skip) or attach.ADAPTERS in name.split("."):
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
        layer_rank = _check_rank(override, f"rank override for {name}") if override is not None else rank
        full = max(t.full_rank for t in resolved)
        if override is not None and override > full:
            raise RankError(
                f"rank override {override} for layer {name} is larger than its full rank {full}; use a rank of at most {full}"
            )
        layer_alpha = first_value(alphas, name, module, presets)
        layer_alpha = layer_alpha if layer_alpha is not None else (alpha if alpha is not None else layer_rank)
        scale = float(layer_alpha) / (math.sqrt(layer_rank) if rslora else layer_rank)
        ranks_by_target = {t.name: min(layer_rank, t.full_rank) for t in resolved}
        plans.append(LayerPlan(name, module, rule, resolved, ranks_by_target, scale, activation_owners(path, module, resolved, layer_rank)))

    for selectors, seen, what in ((target_set, hits, "target"), (exclude_set, ex_hits, "exclude")):
        if selectors is None:
            continue
        missing = [s.describe() for s in selectors.selectors if not seen[id(s)]]
        if missing:
            raise TargetError(
                f"{what} {', '.join(missing)} matched no layer that lora_anywhere can adapt; "
                f"adaptable layers in this model: {_adaptable_summary(model)}"
            )
    if plans and rank_given and not ranks and rank > max(max(t.full_rank for t in p.targets) for p in plans):
        largest = max(max(t.full_rank for t in p.targets) for p in plans)
        raise RankError(f"rank {rank} is larger than the full rank of every selected layer (the largest is {largest}); use rank ≤ {largest}")
    return plans


def _adapted_tensors(model: nn.Module) -> dict[int, str]:
    """id of every tensor that already carries an adapter → the layer holding it."""
    held: dict[int, str] = {}
    for layer_name, layer, adapters in adapted_layers(model):
        for adapter in adapters.values():
            for t in adapter.targets.values():
                owner = layer.get_submodule(t.owner) if t.owner else layer
                held[id(owner._parameters[t.tensor])] = layer_name
    return held


def _first_holder_only(name: str, module: nn.Module, resolved: list[ResolvedTarget], tensor_layer: dict[int, str]) -> list[ResolvedTarget]:
    """Tied weights (one Parameter held by several modules, e.g. input embeddings and
    an LM head) get one adapter, on the first layer that selects them; the other
    holders read its W + ΔW (`attach.record_ties`). Two adapters on one tensor would
    make merging add both deltas where each reader saw only its own."""
    keep = []
    for t in resolved:
        owner = module.get_submodule(t.owner) if t.owner else module
        if tensor_layer.setdefault(id(owner._parameters[t.tensor]), name) == name:
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


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)


def activation_owners(path: str, layer: nn.Module, targets: list[ResolvedTarget], rank: int) -> dict[str, Rule]:
    """The modules below `layer` whose forward will add the adapter on the activations:
    those whose targets are all their own `weight`, whose rule offers the activation
    path for them, and (with path "auto") expects it to be the cheaper one, or (with
    LEAN) to save memory. Forcing "activation" still leaves the others on the weight
    path, which is always exact."""
    if path == WEIGHT:
        return {}
    reg = registry()
    by_owner: dict[str, list[ResolvedTarget]] = {}
    for t in targets:
        by_owner.setdefault(t.owner, []).append(t)
    chosen = {}
    for owner_path, group in by_owner.items():
        if any(t.tensor != "weight" for t in group):
            continue
        owner = layer.get_submodule(owner_path) if owner_path else layer
        rule = reg.rule_for(owner)
        if rule is None or not rule.supports_activation(owner):
            continue
        if path == ACTIVATION or rule.prefers_activation(owner, rank) or (path == LEAN and rule.activation_saves_memory(owner)):
            chosen[owner_path] = rule
    return chosen


def _adaptable_summary(model: nn.Module) -> str:
    reg = registry()
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if reg.rule_for(module) is not None and attach.ADAPTERS not in name.split("."):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    if not counts:
        return "none (no registered rule covers any layer; see `lora-anywhere plugins`)"
    return ", ".join(f"{n} ×{c}" for n, c in sorted(counts.items()))


def _resolve_trainable(model: nn.Module, trainable: Any) -> list[str]:
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
            found = [n for n in found if not _under(n, set(found) - {n})]
        if not found:
            raise TargetError(f"trainable {spec!r} matched no module; give module names as in model.named_modules(), e.g. 'fc' or 'classifier.*'")
        empty = [n for n in found if not any(True for _ in modules[n].parameters())]
        if empty:
            raise TargetError(f"trainable {spec!r} matched {', '.join(empty)}, which has no parameters to train; name the module that holds them")
        names.extend(n for n in found if n not in names)
    return names


# ----------------------------------------------------------------------------- apply


def apply(
    model: nn.Module,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    targets: Any = None,
    exclude: Any = None,
    dropout: float = 0.0,
    trainable: Any = None,
    ranks: dict[Any, int] | None = None,
    alphas: dict[Any, float] | None = None,
    path: str = "auto",
    name: str = DEFAULT,
    freeze_a: bool = False,
    rslora: bool = False,
    init: str = "lora",
    dora: bool = False,
) -> nn.Module:
    """Add a low-rank adapter to every layer a rule covers (or those `targets` select),
    freeze every base parameter, and return the model (changed in place).

    ``rank`` (default 8) is clamped to each layer's full rank; a rank given explicitly
    that no selected layer can hold is an error. ``alpha`` defaults to ``rank`` (scale 1). ``ranks``/``alphas`` map selectors to
    per-layer values. ``trainable`` names modules trained fully and saved with the
    adapter (a new head; norms with their running statistics). ``path`` forces how
    adapters are computed ("activation" where a rule offers it, or "weight"); both give
    the same numbers, "auto" picks the cheaper per layer. ``freeze_a`` keeps A a fixed
    random projection and trains only B (LoRA-FA: the activation path then needs no
    copy of the layer input for the backward, so with path "auto" every layer whose
    rule offers it takes that path). ``rslora`` scales by alpha/√rank
    instead of alpha/rank. ``init="svd"`` starts A and B from the top singular
    directions of each weight (PiSSA; the output is unchanged at init). ``dora``
    learns a magnitude per output row besides the low-rank direction (DoRA; weight
    path). If anything fails, the model is left exactly as it was.
    """
    rank_given = rank is not None
    rank = DEFAULT_RANK if rank is None else rank
    _check_options(rank, alpha, dropout, path, name)
    if init not in INITS:
        raise LoraError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    state = model_state(model)
    if (state and name in state.adapters) or any(name in a for _, _, a in adapted_layers(model)):
        raise AlreadyAdaptedError(
            f"the model already has an adapter named {name!r}; pass name='another' to add a second adapter, "
            "or call lora_anywhere.remove(model) first"
        )
    trainable_names = _resolve_trainable(model, trainable)
    plans = _plan(model, rank=rank, alpha=alpha, targets=targets, exclude=exclude, ranks=ranks, alphas=alphas, path=WEIGHT if dora else (LEAN if freeze_a and path == "auto" else path), skip=set(trainable_names), rank_given=rank_given, rslora=rslora)
    if not plans and not trainable_names:
        raise TargetError(f"nothing to adapt in {type(model).__name__}: no layer is covered by a rule; adaptable layers: {_adaptable_summary(model)}")
    config = AdapterConfig(
        name=name,
        rank=rank,
        alpha=float(alpha if alpha is not None else rank),
        dropout=float(dropout),
        path=path,
        targets=_describe(targets),
        exclude=_describe(exclude),
        trainable=trainable_names,
        freeze_a=bool(freeze_a),
        rslora=bool(rslora),
        init=init,
        dora=bool(dora),
        library_version=_version(),
    )
    install(model, plans, config, dropout)
    return model


def _initialise(layer: nn.Module, adapter: LayerAdapter, config: AdapterConfig) -> None:
    """SVD factors and DoRA magnitudes come from the base tensors they adapt."""
    blocks = {}
    for t in adapter.targets.values():
        owner = layer.get_submodule(t.owner) if t.owner else layer
        raw = owner._parameters[t.tensor].detach()
        blocks[t.name] = raw if t.rows is None else raw[t.rows[0] : t.rows[1]]
    if config.init == "svd":
        for name, block in blocks.items():
            adapter.factors[name].init_from(block.reshape(block.shape[0], -1))
    if config.dora:
        adapter.init_magnitudes(blocks)


def install(model: nn.Module, plans: list[LayerPlan], config: AdapterConfig, dropout: float, initialise: bool = True) -> None:
    """Carry out a plan, all or nothing. `initialise=False` when the tensors will be
    loaded from a file anyway."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    touched: list[nn.Module] = []
    state = model_state(model)
    fresh_state = state is None
    holders = attach.tensor_holders(model)
    try:
        for plan in plans:
            ref = plan.targets[0]
            owner = plan.module.get_submodule(ref.owner) if ref.owner else plan.module
            like = owner._parameters[ref.tensor]
            adapter = LayerAdapter(
                plan.rule, plan.targets, plan.ranks, plan.scale, activation_owners=plan.activation, dropout=dropout,
                dtype=like.dtype, device=like.device, svd=config.init == "svd", dora=config.dora,
            )  # fmt: skip
            if initialise:
                _initialise(plan.module, adapter, config)
            container = plan.module._modules.get(attach.ADAPTERS)
            if container is None:
                if hasattr(plan.module, attach.ADAPTERS):
                    raise LoraError(f"layer {plan.name} already has an attribute {attach.ADAPTERS!r}; lora_anywhere needs that name")
                container = nn.ModuleDict()
                plan.module.add_module(attach.ADAPTERS, container)
            touched.append(plan.module)
            container[config.name] = adapter
            attach.record_ties(plan.module, holders)
            attach.refresh(plan.module)
            config.layers[plan.name] = LayerRecord(
                rule=plan.rule.name,
                type=f"{type(plan.module).__module__}.{type(plan.module).__qualname__}",
                path=adapter.path,
                scale=plan.scale,
                targets={
                    t.name: TargetRecord(t.owner, t.tensor, list(t.rows) if t.rows else None, list(t.shape), adapter.factors[t.name].rank)
                    for t in plan.targets
                },
            )
        keep = {f"{n}." for n in config.trainable}
        for pname, param in model.named_parameters():
            param.requires_grad_(any(pname.startswith(k) for k in keep))
        for module in touched:
            module._modules[attach.ADAPTERS][config.name].set_trainable(True, freeze_a=config.freeze_a)
        if fresh_state:
            state = ModelState(requires_grad=grads)
            model.__dict__[_STATE] = state
        state.adapters[config.name] = config
    except BaseException:
        for module in touched:
            container = module._modules.get(attach.ADAPTERS)
            if container is not None and config.name in container:
                del container[config.name]
            attach.refresh(module)
        for pname, param in model.named_parameters():
            if pname in grads:
                param.requires_grad_(grads[pname])
        if fresh_state:
            model.__dict__.pop(_STATE, None)
        raise


def _describe(spec: Any) -> list[str] | None:
    if spec is None:
        return None
    items = spec if isinstance(spec, (list, tuple, set, frozenset)) else [spec]
    out = []
    for s in items:
        if isinstance(s, str):
            out.append(s)
        elif isinstance(s, type):
            out.append(f"{s.__module__}.{s.__qualname__}")
        else:
            out.append(repr(s))
    return out


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------- merge & co


def _selected(model: nn.Module, name: str | None) -> list[tuple[str, nn.Module, LayerAdapter]]:
    found = [(lname, layer, a) for lname, layer, adapters in adapted_layers(model) for aname, a in adapters.items() if name is None or aname == name]
    if not found:
        what = f"an adapter named {name!r}" if name else "any adapter"
        raise NotAdaptedError(f"the model has no {what}; call lora_anywhere.apply(model) or load_adapter(model, path) first")
    return found


@torch.no_grad()
def _shift(layer: nn.Module, adapter: LayerAdapter, sign: int) -> None:
    for t in adapter.targets.values():
        owner = layer.get_submodule(t.owner) if t.owner else layer
        raw = owner._parameters[t.tensor]
        adapter.merge_block(t, raw if t.rows is None else raw[t.rows[0] : t.rows[1]], sign)


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Add every live adapter's ΔW into its base tensor. The adapted layers then run
    at exactly the base model's speed; `unmerge` takes the update out again."""
    for _, layer, adapter in _selected(model, name):
        if adapter.live:
            _shift(layer, adapter, +1)
            adapter.merged = True
            attach.refresh(layer)
    return model


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take merged adapters back out of the base tensors, so they train again."""
    for _, layer, adapter in _selected(model, name):
        if adapter.merged:
            _shift(layer, adapter, -1)
            adapter.merged = False
            attach.refresh(layer)
    return model


def remove(model: nn.Module, merge: bool = True, name: str | None = None) -> nn.Module:
    """Take adapters off the model. With ``merge=True`` their updates stay in the base
    weights; with ``merge=False`` the base weights are restored. Once no adapter is
    left, every layer has its original type, the state_dict exactly its original keys,
    and every parameter the requires_grad flag it had before `apply`."""
    state = model_state(model)
    only_trainable = state is not None and (name is None or name in state.adapters)
    selected = _selected(model, name) if not only_trainable or any(True for _ in adapted_layers(model)) else []
    for _, layer, adapter in selected:
        if merge and adapter.live:
            _shift(layer, adapter, +1)
        elif not merge and adapter.merged:
            _shift(layer, adapter, -1)
        container = layer._modules[attach.ADAPTERS]
        for key, value in list(container.items()):
            if value is adapter:
                del container[key]
        attach.refresh(layer)
    if state is not None:
        for key in [k for k in state.adapters if name is None or k == name]:
            del state.adapters[key]
        if not state.adapters and not any(True for _ in adapted_layers(model)):
            for pname, param in model.named_parameters():
                if pname in state.requires_grad:
                    param.requires_grad_(state.requires_grad[pname])
            del model.__dict__[_STATE]
    return model


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, _, adapters in adapted_layers(model):
        names.extend(n for n in adapters if n not in names)
    return names
