"""apply / merge / unmerge / remove: the lifecycle of adapters on a model.

`apply` asks `plan` what to adapt and `install` carries the plan out, all or nothing;
merging moves ΔW into the base tensors and back, exactly."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from . import attach
from .adapter import LayerAdapter
from .adapter_config import NAME, AdapterConfig, LayerRecord, TargetRecord
from .errors import AlreadyAdaptedError, LoraError, NotAdaptedError, TargetError
from .plan import ROUTE_AUTO, ROUTE_LEAN, ROUTE_WEIGHT, ROUTES, LayerPlan, adaptable_summary, check_rank, plan_layers, resolve_trainable
from .sharding import ADD_BEFORE_SHARDING, MERGE_SHARDED, refuse_sharded
from .state import ModelState, adapted_layers, is_under, model_state, remember_base, restore_base, set_model_state, unwrap
from .version import __version__

DEFAULT = "default"
DEFAULT_RANK = 8
INITS = ("lora", "svd")


def _check_options(rank: Any, alpha: Any, dropout: Any, route: Any, name: Any) -> None:
    check_rank(rank, "rank")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha <= 0):
        raise LoraError(f"alpha must be a positive number or None (meaning alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise LoraError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if route not in ROUTES:
        raise LoraError(f"route must be one of {', '.join(map(repr, ROUTES))}, got {route!r}")
    check_name(name)


def check_name(name: Any) -> None:
    if not isinstance(name, str) or NAME.fullmatch(name) is None:
        raise LoraError(f"adapter name must be a string of 1 to 200 characters without '.', '/' or control characters, got {name!r}")


def check_model(model: Any) -> None:
    """Refuse what cannot carry adapters, before anything is changed."""
    if isinstance(model, torch.jit.ScriptModule):
        raise LoraError(
            "a torch.jit.script (or traced) module cannot take adapters: its code is compiled and its layers are not Python modules. "
            "Apply lora_anywhere to the Python model; to export, merge and remove the adapters first, then script it"
        )
    if not isinstance(model, nn.Module):
        raise LoraError(f"expected a torch.nn.Module, got {type(model).__name__}")


def _route_option(route: str | None, path: str | None) -> str:
    """`path=` is the old name of `route=` (kept so existing calls keep working)."""
    if path is not None and route is not None and path != route:
        raise LoraError(f"route={route!r} and path={path!r} disagree; path is the old name of route, give only route")
    return route if route is not None else (path if path is not None else ROUTE_AUTO)


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
    route: str | None = None,
    name: str = DEFAULT,
    freeze_a: bool = False,
    rslora: bool = False,
    init: str = "lora",
    dora: bool = False,
    path: str | None = None,
) -> nn.Module:
    """Add a low-rank adapter to every layer a rule covers (or those `targets` select),
    freeze every base parameter, and return the model (changed in place).

    ``rank`` (default 8) is clamped to each layer's full rank; a rank given explicitly
    that no selected layer can hold is an error. ``alpha`` defaults to ``rank`` (scale
    1). ``ranks``/``alphas`` map selectors to per-layer values. ``trainable`` names
    modules trained fully and saved with the adapter (a new head; norms with their
    running statistics). ``route`` forces how adapters are computed ("activation" where
    a rule offers it, or "weight"); both give the same numbers, "auto" (the default)
    picks the cheaper per layer; ``path`` is its old name. ``freeze_a`` keeps A a fixed
    random projection and trains only B (LoRA-FA: the activation route then needs no
    copy of the layer input for the backward, so with route "auto" every layer whose
    rule offers it takes that route). ``rslora`` scales by alpha/√rank instead of
    alpha/rank. ``init="svd"`` starts A and B from the top singular directions of each
    weight (PiSSA; the output is unchanged at init). ``dora`` learns a magnitude per
    output feature besides the low-rank direction (DoRA; weight route). If anything fails,
    the model is left exactly as it was.
    """
    wrapper, model = model, unwrap(model)
    check_model(model)
    route = _route_option(route, path)
    refuse_sharded(*model.parameters(), what="adding an adapter", fix=ADD_BEFORE_SHARDING)
    rank_given = rank is not None
    rank = DEFAULT_RANK if rank is None else rank
    _check_options(rank, alpha, dropout, route, name)
    if init not in INITS:
        raise LoraError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if (init == "svd" or dora) and any(p.device.type == "meta" for p in model.parameters()):
        raise LoraError(
            "init='svd' and dora=True start from the base weights, which a model on the meta device does not have yet; "
            "call model.to_empty(device=...) and load the base weights first"
        )
    state = model_state(model)
    if (state and name in state.adapters) or any(name in a for _, _, a in adapted_layers(model)):
        raise AlreadyAdaptedError(
            f"the model already has an adapter named {name!r}; pass name='another' to add a second adapter, "
            "or call lora_anywhere.remove(model) first"
        )
    trainable_names = resolve_trainable(model, trainable)
    planned_route = ROUTE_WEIGHT if dora else (ROUTE_LEAN if freeze_a and route == ROUTE_AUTO else route)
    plans = plan_layers(
        model, rank=rank, alpha=alpha, targets=targets, exclude=exclude, ranks=ranks, alphas=alphas, route=planned_route,
        skip=set(trainable_names), rank_given=rank_given, rslora=rslora,
    )  # fmt: skip
    if not plans and not trainable_names:
        raise TargetError(
            f"nothing to adapt in {type(model).__name__}: no layer is covered by a rule; adaptable layers: {adaptable_summary(model)}"
        )
    config = AdapterConfig(
        name=name,
        rank=rank,
        alpha=float(alpha if alpha is not None else rank),
        dropout=float(dropout),
        route=route,
        targets=_describe(targets),
        exclude=_describe(exclude),
        trainable=trainable_names,
        freeze_a=bool(freeze_a),
        rslora=bool(rslora),
        init=init,
        dora=bool(dora),
        library_version=__version__,
    )
    install(model, plans, config, dropout)
    return wrapper


def _initialise(layer: nn.Module, adapter: LayerAdapter, config: AdapterConfig) -> None:
    """SVD factors and DoRA magnitudes come from the base tensors they adapt."""
    blocks = {t.name: t.block_in(layer).detach() for t in adapter.targets.values()}
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
    remembered: list[str] = []
    state = model_state(model)
    fresh_state = state is None
    holders = attach.tensor_holders(model)
    try:
        for plan in plans:
            like = plan.targets[0].parameter_in(plan.module)
            adapter = LayerAdapter(
                plan.rule, plan.targets, plan.ranks, plan.scale, activation_owners=plan.activation, dropout=dropout,
                dtype=like.dtype, device=like.device, svd=config.init == "svd", dora=config.dora,
            )  # fmt: skip
            if initialise:
                _initialise(plan.module, adapter, config)
            adapter.train(plan.module.training)  # dropout follows the layer's mode
            container = plan.module._modules.get(attach.ADAPTERS)
            if container is None:
                if hasattr(plan.module, attach.ADAPTERS):
                    raise LoraError(f"layer {plan.name} already has an attribute {attach.ADAPTERS!r}; lora_anywhere needs that name")
                container = nn.ModuleDict().train(plan.module.training)
                plan.module.add_module(attach.ADAPTERS, container)
            touched.append(plan.module)
            container[config.name] = adapter
            attach.record_ties(plan.module, holders)
            attach.refresh(plan.module)
            config.layers[plan.name] = LayerRecord(
                rule=plan.rule.name,
                type=f"{type(plan.module).__module__}.{type(plan.module).__qualname__}",
                route=adapter.route,
                scale=plan.scale,
                targets={
                    t.name: TargetRecord(t.owner, t.tensor, list(t.rows) if t.rows else None, list(t.shape), adapter.factors[t.name].rank)
                    for t in plan.targets
                },
            )
        for pname, param in model.named_parameters():
            param.requires_grad_(any(is_under(pname, m) for m in config.trainable))
        for module in touched:
            module._modules[attach.ADAPTERS][config.name].set_trainable(True, freeze_a=config.freeze_a)
        if fresh_state:
            state = ModelState(requires_grad=grads)
            set_model_state(model, state)
        remembered = remember_base(model, state, config.trainable)
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
            set_model_state(model, None)
        else:
            for key in remembered:
                state.base.pop(key, None)
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


def selected_adapters(model: nn.Module, name: str | None) -> list[tuple[str, nn.Module, LayerAdapter]]:
    """(layer name, layer, adapter) for every adapter called `name` (any, for None)."""
    found = [
        (lname, layer, a)
        for lname, layer, adapters in adapted_layers(model)
        for aname, a in adapters.items()
        if name is None or aname == name
    ]
    if not found:
        what = f"an adapter named {name!r}" if name else "any adapter"
        raise NotAdaptedError(f"the model has no {what}; call lora_anywhere.apply(model) or load_adapter(model, path) first")
    return found


@torch.no_grad()
def shift_base(layer: nn.Module, adapter: LayerAdapter, sign: int, *, exact: bool = True) -> None:
    """Add (+1) or take out (-1) the adapter's ΔW in the layer's base tensors, in place;
    taking out restores the base to the bit (see `LayerAdapter.merge_block`). A merge
    that will never be taken out (`remove(merge=True)`) need not be `exact`."""
    for t in adapter.targets.values():
        refuse_sharded(t.parameter_in(layer), what="merging", fix=MERGE_SHARDED)
        adapter.merge_block(t, t.block_in(layer), sign, exact=exact)


def merge(model: nn.Module, name: str | None = None, *, exact: bool = True) -> nn.Module:
    """Add every live adapter's ΔW into its base tensor. The adapted layers then run
    at exactly the base model's speed; `unmerge` takes the update out again and gives
    back the base tensors to the bit: merging keeps the few elements of W that the
    rounding of W + ΔW loses (see `bench/exact_unmerge.py` for what that costs while
    merged). ``exact=False`` keeps nothing: unmerging may then miss W by an ulp."""
    for _, layer, adapter in selected_adapters(model, name):
        if adapter.live:
            shift_base(layer, adapter, +1, exact=exact)
            adapter.merged = True
            attach.refresh(layer)
    return model


def unmerge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take merged adapters back out of the base tensors, so they train again."""
    for _, layer, adapter in selected_adapters(model, name):
        if adapter.merged:
            shift_base(layer, adapter, -1)
            adapter.merged = False
            attach.refresh(layer)
    return model


def remove(model: nn.Module, merge: bool = True, name: str | None = None) -> nn.Module:
    """Take adapters off the model. With ``merge=True`` their updates stay in the base
    weights; with ``merge=False`` the base weights are restored. Once no adapter is
    left, every layer has its original type, the state_dict exactly its original keys,
    and every parameter the requires_grad flag it had before `apply`.

    ``merge=False`` gives back the base model exactly: the `trainable` modules of the
    removed adapters, and once no adapter is left every base buffer (BatchNorm
    statistics a training loop moved), return to what they were before `apply` or
    `load_adapter`. With ``merge=True`` they keep what training made of them."""
    wrapper, model = model, unwrap(model)
    state = model_state(model)
    only_trainable = state is not None and (name is None or name in state.adapters)
    selected = selected_adapters(model, name) if not only_trainable or any(True for _ in adapted_layers(model)) else []
    for _, layer, adapter in selected:
        if merge and adapter.live:
            shift_base(layer, adapter, +1, exact=False)
        elif not merge and adapter.merged:
            shift_base(layer, adapter, -1)
        container = layer._modules[attach.ADAPTERS]
        for key, value in list(container.items()):
            if value is adapter:
                del container[key]
        attach.refresh(layer)
    if state is not None:
        removed = [k for k in state.adapters if name is None or k == name]
        if not merge:
            kept = {m for k, c in state.adapters.items() if k not in removed for m in c.trainable}
            modules = [m for k in removed for m in state.adapters[k].trainable if m not in kept]
            restore_base(model, state, modules, buffers=len(removed) == len(state.adapters))
        for key in removed:
            del state.adapters[key]
        if not state.adapters and not any(True for _ in adapted_layers(model)):
            for pname, param in model.named_parameters():
                if pname in state.requires_grad:
                    param.requires_grad_(state.requires_grad[pname])
            set_model_state(model, None)
    return wrapper


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, _, adapters in adapted_layers(model):
        names.extend(n for n in adapters if n not in names)
    return names
