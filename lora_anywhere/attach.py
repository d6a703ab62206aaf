"""How adapters reach a layer's output without changing what the layer is.

An adapted module keeps its type (it gets a cached subclass of its own class, like
torch's parametrize does), its attributes and exactly its state_dict keys: the base
tensor stays in ``_parameters`` and the adapters live in a child ``lora_adapters``.
The subclass adds, only while some adapter is live:

* a property per adapted tensor that returns W + ΔW, so every reader sees the adapted
  weight — the layer's own forward, a parent that calls ``F.linear(x, m.weight)``,
  ``nn.MultiheadAttention`` reading ``out_proj.weight``, an RNN's flat weights;
* on the activation route, a forward that runs the layer on its raw weight and adds
  ``s·B(A(x))``, so no ΔW is materialised and no full weight gradient is computed.

When nothing is live (all merged or disabled) the module gets its own class back and
runs at exactly the base model's speed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from . import weight_cache
from .adapter import LayerAdapter, Term
from .errors import LoraError
from .sharding import is_sharded, keep_sharded_class, may_be_sharded

ADAPTERS = "lora_adapters"
_LAYER = "_lora_layer"  # on a tensor owner: the layer whose adapters apply
_OWNER_NAME = "_lora_owner_path"  # on a tensor owner: its dotted name below that layer
_TIED = "_lora_tied"  # on a layer: modules outside it that hold one of its adapted tensors
_RULE = "_lora_rule"  # on a module whose forward adds adapters on the activations
_RAW = "_lora_raw"  # on a tensor owner, while its class saves or loads its state
_CACHE = "_lora_cache"  # on a tensor owner, during its own forward: W + ΔW per tensor

_CLASSES: dict[tuple[type, tuple[str, ...], bool], type] = {}


def base_class(module: nn.Module) -> type:
    return getattr(type(module), "__lora_base__", type(module))


def layer_adapters(layer: nn.Module) -> dict[str, LayerAdapter]:
    adapters = layer._modules.get(ADAPTERS)
    return dict(adapters.items()) if adapters is not None else {}


def effective_tensor(owner: nn.Module, tensor: str, *, include_activation: bool = True) -> torch.Tensor:
    """The tensor as the adapted model sees it: W plus every live adapter's ΔW (without
    those the owner's own forward adds on the activations, if asked). A shard (FSDP2,
    outside the forward) is returned as it is: ΔW is added where the tensor is whole."""
    w = owner._parameters[tensor]
    if may_be_sharded() and is_sharded(w):
        return w
    layer = owner.__dict__[_LAYER]
    owner_name = owner.__dict__[_OWNER_NAME]
    for adapter in layer._modules[ADAPTERS].values():
        if adapter.live and (include_activation or owner_name not in adapter.activation_owners):
            w = adapter.add_to(owner_name, tensor, w)
    return w


def _tensor_property(tensor: str) -> property:
    def get(self: nn.Module) -> torch.Tensor:
        if self.__dict__.get(_RAW):
            return self._parameters[tensor]
        cache = self.__dict__.get(_CACHE)
        if cache is not None:
            if tensor not in cache:
                cache[tensor] = effective_tensor(self, tensor)
            return cache[tensor]
        if not torch.is_grad_enabled():
            if weight_cache.usable():
                return _kept_tensor(self, tensor)
        else:  # training: a weight kept for evaluation is freed (a parent reads it, not this forward)
            weight_cache.drop(self)
        return effective_tensor(self, tensor)

    get.__name__ = tensor
    return property(get, doc=f"{tensor} with the live LoRA adapters added (lora_anywhere)")


def _kept_tensor(owner: nn.Module, tensor: str) -> torch.Tensor:
    """`effective_tensor`, formed once for all the no-grad calls that see the same inputs."""
    value = weight_cache.kept(owner, tensor)
    if value is None:
        layer, owner_name = owner.__dict__[_LAYER], owner.__dict__[_OWNER_NAME]
        slots: list[weight_cache.Slot] = [(owner._parameters, tensor)]
        for adapter in layer._modules[ADAPTERS].values():
            if adapter.live:
                slots += adapter.input_slots(owner_name, tensor)
        # Formed outside inference mode, where a tensor gets no version counter: the
        # check that nobody changed it in place needs one.
        with torch.inference_mode(False), torch.no_grad():
            value = effective_tensor(owner, tensor)
        weight_cache.keep(owner, tensor, slots, value)
    return value


def _adapted_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    layer, owner_name, rule = self.__dict__[_LAYER], self.__dict__[_OWNER_NAME], self.__dict__[_RULE]
    adapters = [a for a in layer._modules[ADAPTERS].values() if a.live and owner_name in a.activation_owners]
    grad, no_dropout = torch.is_grad_enabled(), not any(a.dropout_active for a in adapters)
    # No gradient to pay for: the layer's own forward reads W + ΔW (the property),
    # formed at the first call and kept (`weight_cache`), so every later call costs
    # what the base layer's does, whatever its rows; ``s·B(A(x))`` on the activations
    # would add its products to each call (one sample a call: 1.08-1.36× the base's
    # time on the benchmark models, `bench/train_step.py --inference-only --batch 1`).
    if not grad and no_dropout and (weight_cache.holds(self) or weight_cache.usable()):
        return type(self).__lora_base__.forward(self, *args, **kwargs)
    if grad:
        weight_cache.drop(self)
    weight = effective_tensor(self, "weight", include_activation=False)
    if not grad and no_dropout and rule.weight_cheaper_without_grad(self, weight, *args, **kwargs):
        return type(self).__lora_base__.forward(self, *args, **kwargs)
    terms = [a.activation_term(owner_name, weight.shape[0]) for a in adapters]
    if (
        grad
        and no_dropout
        # With A frozen (LoRA-FA) the activation route keeps no copy of the input: stay.
        and all(t.a.requires_grad for t in terms)
        and rule.weight_cheaper_with_grad(self, weight, sum(t.a.shape[0] for t in terms), *args, **kwargs)
    ):
        # Too small a call to pay for the fused call's extra kernels: the layer's own
        # forward on W + ΔW (the property), whose backward forms W's gradient.
        return type(self).__lora_base__.forward(self, *args, **kwargs)
    if adapters[0].sample_mask is not None and not any(a.dropout_p and a.training for a in adapters) and rule.stacks_samples(self):
        terms = [Term.stacked(terms)]
    out = rule.forward(self, weight, terms, *args, **kwargs)
    if any(t.adapter.sample_mask is not None and not t.selected for t in terms):
        raise LoraError(
            f"the rule {rule.name} does not apply per-sample adapters (its forward never calls Term.dropout or "
            "Term.select_samples); run one adapter at a time with set_adapter"
        )
    return out


def _layer_route_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # A training call the layer's rule can run cheaper than on W + ΔW (`Rule.layer_forward`).
    if torch.is_grad_enabled():
        parts = _low_rank_parts(self)
        if parts is not None:
            out = self.__dict__[_RULE].layer_forward(self, parts, *args, **kwargs)
            if out is not NotImplemented:
                return out
    return _weight_route_forward(self, *args, **kwargs)


def _low_rank_parts(layer: nn.Module) -> dict[str, tuple[torch.Tensor, list[Term]]] | None:
    """Each adapted module's base weight and the live adapters' terms on it, for
    `Rule.layer_forward`; None where a term would not give W + ΔW's numbers on the
    activations: DoRA, dropout (which the weight route does not apply), a per-sample
    batch, the activation route, an adapted tensor other than a weight, a shard."""
    live = [a for a in layer._modules[ADAPTERS].values() if a.live]
    if not live or any(a.dora or a.dropout_active or a.activation_owners for a in live):
        return None
    if any(t.tensor != "weight" for a in live for t in a.targets.values()):
        return None
    parts: dict[str, tuple[torch.Tensor, list[Term]]] = {}
    for adapter in live:
        for owner_name in dict.fromkeys(t.owner for t in adapter.targets.values()):
            if owner_name not in parts:
                weight = layer.get_submodule(owner_name)._parameters["weight"]
                if may_be_sharded() and is_sharded(weight):
                    return None
                parts[owner_name] = (weight, [])
            parts[owner_name][1].append(adapter.activation_term(owner_name, parts[owner_name][0].shape[0]))
    return parts


def _weight_route_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # A forward may read its weight many times (HeteroLinear reads weight[t] once per
    # type): form W + ΔW once per call. A compiled graph dedupes the reads itself.
    forward = type(self).__lora_base__.forward
    if _CACHE in self.__dict__ or torch.compiler.is_compiling():
        return forward(self, *args, **kwargs)
    if torch.is_grad_enabled():
        weight_cache.drop(self)
    elif weight_cache.usable():
        return forward(self, *args, **kwargs)  # the property keeps W + ΔW across calls
    self.__dict__[_CACHE] = {}
    try:
        return forward(self, *args, **kwargs)
    finally:
        del self.__dict__[_CACHE]


@contextlib.contextmanager
def _raw_tensors(module: nn.Module) -> Iterator[None]:
    # A class may save through its attributes (PyG's Linear reads self.weight): it
    # must store and load the base tensor, never W + ΔW, or a reload would add ΔW twice.
    module.__dict__[_RAW] = True
    try:
        yield
    finally:
        del module.__dict__[_RAW]


def _save_to_state_dict(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    with _raw_tensors(self):
        type(self).__lora_base__._save_to_state_dict(self, *args, **kwargs)


def _load_from_state_dict(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    with _raw_tensors(self):
        type(self).__lora_base__._load_from_state_dict(self, *args, **kwargs)


def _reduce(self: nn.Module, protocol: int) -> Any:
    # Lets pickle and copy rebuild the dynamic class from its importable base. A class
    # may cache its tensors in its state (an RNN's `_flat_weights`): taken with the raw
    # tensors, the state holds parameters only, never W + ΔW — a non-leaf tensor
    # that deepcopy refuses — and the copy forms W + ΔW again on its first forward.
    cls = type(self)
    with _raw_tensors(self):
        state = self.__getstate__()
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k not in (_RAW, _CACHE, weight_cache.KEPT)}
    return (_rebuild, (cls.__lora_base__, cls.__lora_tensors__, cls.__lora_forward__), state)


def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    # `.to()`, `.cuda()`, `.half()`: a kept W + ΔW on the old device or dtype is freed now.
    weight_cache.drop(self)
    return type(self).__lora_base__._apply(self, fn, recurse)


def _rebuild(base: type, tensors: tuple[str, ...], forward: str | bool) -> nn.Module:
    if isinstance(forward, bool):  # pickled by a version with two kinds of forward
        forward = FORWARD_ACTIVATION if forward else FORWARD_WEIGHT
    return object.__new__(adapted_class(base, tensors, forward))


#: What an adapted module's forward does: run its own forward on W + ΔW (the weight
#: route), add the terms on the activations (its rule's `forward`), or first try its
#: rule's `layer_forward` (a layer whose rule has one).
FORWARD_WEIGHT, FORWARD_ACTIVATION, FORWARD_LAYER = "weight", "activation", "layer"
_FORWARDS = {FORWARD_WEIGHT: _weight_route_forward, FORWARD_ACTIVATION: _adapted_forward, FORWARD_LAYER: _layer_route_forward}


def adapted_class(base: type, tensors: tuple[str, ...], forward: str) -> type:
    key = (base, tensors, forward)
    cls = _CLASSES.get(key)
    if cls is None:
        namespace: dict[str, Any] = {t: _tensor_property(t) for t in tensors}
        namespace.update(
            __lora_base__=base,
            __lora_tensors__=tensors,
            __lora_forward__=forward,
            __module__=base.__module__,
            __qualname__=base.__qualname__,
            __reduce_ex__=_reduce,
            _save_to_state_dict=_save_to_state_dict,
            _load_from_state_dict=_load_from_state_dict,
            _apply=_apply,
        )
        namespace["forward"] = _FORWARDS[forward]
        cls = type(base.__name__, (base,), namespace)
        _CLASSES[key] = cls
    return cls


def tensor_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every Parameter held by more than one module (tied weights), with its holders."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                found.setdefault(id(p), []).append((module, name))
    return {k: v for k, v in found.items() if len(v) > 1}


def record_ties(layer: nn.Module, holders: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Remember the other holders of the layer's adapted tensors, so `refresh` makes
    them read W + ΔW too: a tied LM head then computes with the adapted embedding,
    unmerged exactly as merged."""
    tied: list[tuple[nn.Module, str, str]] = list(layer.__dict__.get(_TIED, ()))
    for adapter in layer_adapters(layer).values():
        for t in adapter.targets.values():
            owner = t.owner_in(layer)
            for module, name in holders.get(id(t.parameter_in(layer)), ()):
                if module is owner or any(m is module for m, _, _ in tied):
                    continue
                if name != t.tensor or module.__dict__.get(_LAYER, layer) is not layer:
                    raise LoraError(
                        f"{t.tensor!r} of {type(owner).__name__} is tied to {name!r} of a {type(module).__name__} that is adapted on its own "
                        "or holds it under another name; exclude one of the two"
                    )
                tied.append((module, t.owner, t.tensor))
    if tied:
        layer.__dict__[_TIED] = tied


def refresh(layer: nn.Module) -> None:
    """Give the layer and every tensor owner below it the class their live adapters need."""
    adapters = layer_adapters(layer)
    live = [a for a in adapters.values() if a.live]
    owners: dict[str, set[str]] = {t.owner: set() for a in adapters.values() for t in a.targets.values()}
    for owner_name, module in layer.named_modules():  # owners swapped earlier, to reset
        if module.__dict__.get(_LAYER) is layer:
            owners.setdefault(owner_name, set())
    for adapter in live:
        for t in adapter.targets.values():
            owners[t.owner].add(t.tensor)
    owners.setdefault("", set())
    for owner_name, tensors in owners.items():
        owner = layer.get_submodule(owner_name)
        weight_cache.drop(owner)
        base = base_class(owner)
        # A forward on the activations reads the raw weight itself; other readers of
        # `weight` (a parent calling F.linear on it) still see W + ΔW via the property.
        forward = any(owner_name in a.activation_owners for a in live)
        names = tuple(sorted(tensors | ({"weight"} if forward else set())))
        if forward:
            kind, rule = FORWARD_ACTIVATION, next(a.activation_rule(owner_name) for a in live if owner_name in a.activation_owners)
        elif owner_name == "" and live and live[0].rule.offers_layer_forward(layer):
            kind, rule = FORWARD_LAYER, live[0].rule
        else:
            kind, rule = FORWARD_WEIGHT, None
        if names or kind == FORWARD_LAYER:
            owner.__class__ = keep_sharded_class(owner, adapted_class(base, names, kind))
            owner.__dict__[_LAYER] = layer
            owner.__dict__[_OWNER_NAME] = owner_name
            if rule is not None:
                owner.__dict__[_RULE] = rule
            else:
                owner.__dict__.pop(_RULE, None)
        else:
            owner.__class__ = keep_sharded_class(owner, base)
            for key in (_LAYER, _OWNER_NAME, _RULE):
                owner.__dict__.pop(key, None)
    live_tensors = {(t.owner, t.tensor) for a in live for t in a.targets.values()}
    for module, owner_name, tensor in layer.__dict__.get(_TIED, ()):
        weight_cache.drop(module)
        if (owner_name, tensor) in live_tensors:
            module.__class__ = keep_sharded_class(module, adapted_class(base_class(module), (tensor,), FORWARD_WEIGHT))
            module.__dict__[_LAYER] = layer
            module.__dict__[_OWNER_NAME] = owner_name
        else:
            module.__class__ = keep_sharded_class(module, base_class(module))
            module.__dict__.pop(_LAYER, None)
            module.__dict__.pop(_OWNER_NAME, None)
    if not adapters:
        layer.__dict__.pop(_TIED, None)
        if ADAPTERS in layer._modules:
            del layer._modules[ADAPTERS]
