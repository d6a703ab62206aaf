"""Where adapters live on a model: the root's record of them, and the layers that
carry them. Shared by every module that walks an adapted model.

The record also keeps what the base model was outside the adapters: a training loop
changes more than A and B — the `trainable` modules, and buffers such as the running
statistics of BatchNorm layers in train mode. `disabled` and `remove(merge=False)`
put the base back from these copies, and `save_adapter` saves the buffers that moved.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from . import attach
from .adapter import LayerAdapter
from .adapter_config import AdapterConfig

_STATE = "_lora_anywhere_state"


@dataclass
class ModelState:
    """Kept on the root model: its adapters' configs, the requires_grad flags the
    model had before the first `apply` (restored by `remove`), and `base`: copies of
    the base model's persistent buffers and of every tensor of the `trainable`
    modules, as they were before any adapter was applied or loaded."""

    adapters: dict[str, AdapterConfig] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The model a wrapper runs — ``torch.compile``'s module (``_orig_mod``),
    ``nn.DataParallel`` and DDP (``module``) — so adapters, their names and their
    files belong to the plain model whether or not it was wrapped."""
    compiled = sys.modules.get("torch._dynamo.eval_frame")
    while True:
        if compiled is not None and isinstance(model, compiled.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def model_state(model: nn.Module) -> ModelState | None:
    return unwrap(model).__dict__.get(_STATE)


def set_model_state(model: nn.Module, state: ModelState | None) -> None:
    model = unwrap(model)
    if state is None:
        model.__dict__.pop(_STATE, None)
    else:
        model.__dict__[_STATE] = state


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, dict[str, LayerAdapter]]]:
    """Every layer below `model` that carries adapters, with them by name."""
    for name, module in unwrap(model).named_modules():
        adapters = attach.layer_adapters(module)
        if adapters:
            yield name, module, adapters


def is_under(name: str, prefix: str) -> bool:
    """Whether module `name` is `prefix` itself or below it ("" is the root, above all)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def base_tensors(model: nn.Module, *, buffers_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's own tensors by state_dict name — parameters (unless
    `buffers_only`) and persistent buffers — without the adapters'."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LayerAdapter) or attach.ADAPTERS in prefix.split("."):
            continue
        if not buffers_only:
            out.update((_join(prefix, n), p) for n, p in module._parameters.items() if p is not None)
        skip = module._non_persistent_buffers_set
        out.update((_join(prefix, n), b) for n, b in module._buffers.items() if b is not None and n not in skip)
    return out


def under_any(name: str, modules: Iterable[str]) -> bool:
    return any(is_under(name, m) for m in modules)


def trainable_modules(state: ModelState) -> set[str]:
    return {m for config in state.adapters.values() for m in config.trainable}


def remember_base(model: nn.Module, state: ModelState, trainable: Iterable[str]) -> list[str]:
    """Copy into `state.base` what is not there yet: every persistent buffer, and every
    tensor of the `trainable` modules. Tensors on the meta device have no values to
    copy. Returns the names added (so that a failed apply can take them out again)."""
    trainable = list(trainable)
    added = []
    for name, tensor in base_tensors(model).items():
        wanted = under_any(name, trainable) or not isinstance(tensor, nn.Parameter)
        if wanted and name not in state.base and tensor.device.type != "meta":
            state.base[name] = tensor.detach().clone()
            added.append(name)
    return added


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit (NaN equals the same NaN, -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    return torch.equal(a, b.to(a.device))


def changed_buffers(model: nn.Module, state: ModelState) -> dict[str, torch.Tensor]:
    """The base model's persistent buffers that are not what they were before the
    first adapter (or that have no copy to compare with), except those of `trainable`
    modules, which are saved with them."""
    owned = trainable_modules(state)
    out = {}
    for name, buffer in base_tensors(model, buffers_only=True).items():
        if under_any(name, owned) or buffer.device.type == "meta":
            continue
        if name not in state.base or not bitwise_equal(buffer, state.base[name]):
            out[name] = buffer
    return out


def _slot(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor | None], str]:
    """The dict (a module's ``_parameters`` or ``_buffers``) and key that hold `name`."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    return (module._parameters if leaf in module._parameters else module._buffers), leaf


def _restorable(model: nn.Module, state: ModelState, modules: Iterable[str], buffers: bool) -> list[str]:
    modules = list(modules)
    owned = trainable_modules(state)
    names = []
    for name in state.base:
        if under_any(name, modules) or (buffers and not under_any(name, owned)):
            with contextlib.suppress(AttributeError):
                slots, leaf = _slot(model, name)
                if slots.get(leaf) is not None:
                    names.append(name)
    return names


@torch.no_grad()
def restore_base(model: nn.Module, state: ModelState, modules: Iterable[str], *, buffers: bool) -> None:
    """Copy the remembered values back into the `modules` (trainable modules) and, with
    `buffers`, into every other base buffer: in place, so references stay valid."""
    for name in _restorable(model, state, modules, buffers):
        slots, leaf = _slot(model, name)
        live = slots[leaf]
        if live.shape == state.base[name].shape:
            live.copy_(state.base[name])


@contextlib.contextmanager
def base_swapped_in(model: nn.Module, state: ModelState) -> Iterator[None]:
    """Within the block the trainable modules and the base buffers hold fresh copies
    of their remembered values; the trained tensors themselves are set aside, not
    changed, so an autograd graph that saved them stays valid, and a forward in
    train mode inside the block leaves the remembered values as they were."""
    swapped = []
    try:
        for name in _restorable(model, state, trainable_modules(state), buffers=True):
            slots, leaf = _slot(model, name)
            live = slots[leaf]
            copy = state.base[name].to(device=live.device, dtype=live.dtype, copy=True)
            slots[leaf] = nn.Parameter(copy, requires_grad=False) if isinstance(live, nn.Parameter) else copy
            swapped.append((slots, leaf, live))
        yield
    finally:
        for slots, leaf, live in reversed(swapped):
            slots[leaf] = live
