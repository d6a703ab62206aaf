"""Adapted models under FSDP2 (`torch.distributed.fsdp.fully_shard`).

FSDP2 keeps each parameter as a DTensor shard between forwards and swaps the whole
tensor in for the forward and backward of the module it was sharded with. Three
things follow for adapters, and this module holds them:

* a shard cannot take part in W + ΔW (W's rows and A's rows are split differently
  across ranks): a tensor read while sharded is the raw shard, and ΔW is added only
  inside the forward, where every tensor of the layer is whole;
* FSDP2 gives a sharded module a class of its own in front of the module's class,
  which must stay in front when lora_anywhere gives the module its adapted class;
* saving gathers the adapter tensors (and only those) from every rank; one rank
  writes the folder.

Nothing here imports ``torch.distributed`` before the user has: a tensor can only be
a DTensor once ``torch.distributed.tensor`` is loaded.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

import torch

from .errors import ShardingError

_TENSOR_MODULE = "torch.distributed.tensor"
_FSDP_MODULE = "torch.distributed.fsdp"
_WRAPPED: dict[type, type] = {}  # an inner class → its FSDP2 class, made by `keep_sharded_class`


def may_be_sharded() -> bool:
    """Whether any tensor can be a DTensor now: a check that costs nothing when not,
    for the paths every call runs. A DTensor lives on a device mesh, whose process group
    exists (torch.distributed.tensor alone is loaded by timm, torch.compile and others)."""
    if _TENSOR_MODULE not in sys.modules:
        return False
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def is_sharded(*tensors: Any) -> bool:
    """Whether any of `tensors` is a DTensor (an FSDP2 shard, between the forwards)."""
    module = sys.modules.get(_TENSOR_MODULE)
    return module is not None and any(isinstance(t, module.DTensor) for t in tensors)


def _fsdp_module_class() -> type | None:
    module = sys.modules.get(_FSDP_MODULE)
    return getattr(module, "FSDPModule", None) if module is not None else None


def keep_sharded_class(module: torch.nn.Module, inner: type) -> type:
    """The class `module` gets when its own class becomes `inner`: `inner` itself, or,
    for a module `fully_shard` was called on, FSDP2's class in front of `inner` (as
    `fully_shard` builds it: ``FSDP<Name>(FSDPModule, <Name>)``), so its hooks and
    methods (`unshard`, `set_requires_gradient_sync`, …) stay."""
    fsdp = _fsdp_module_class()
    current = type(module)
    if fsdp is None or not issubclass(current, fsdp) or issubclass(inner, fsdp):
        return inner
    if current.__bases__ == (fsdp, inner):
        return current
    cls = _WRAPPED.get(inner)
    if cls is None:
        namespace = {k: v for k, v in current.__dict__.items() if k == "__deepcopy__"}  # FSDP2 refuses deepcopy
        cls = type(f"FSDP{inner.__name__}", (fsdp, inner), namespace)
        _WRAPPED[inner] = cls
    return cls


#: How to merge the adapter of a model trained sharded.
MERGE_SHARDED = (
    "save_adapter(model, folder) on every rank, then load_adapter(base, folder) onto the unsharded base model "
    "(or gather its full state dict) and merge that"
)


#: How to add an adapter to a model that is to be sharded.
ADD_BEFORE_SHARDING = "apply or load_adapter first, then shard the model (lora_anywhere.shard or fully_shard)"


def refuse_sharded(*tensors: torch.Tensor, what: str, fix: str) -> None:
    """Raise `ShardingError` if a tensor is a shard: `what` needs whole tensors."""
    if is_sharded(*tensors):
        raise ShardingError(f"{what} needs whole tensors, but the model is sharded with fully_shard; {fix}")


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state (no communication).
    A unit left whole after a forward (the root, by default) would otherwise be
    resharded under a reader's hands: reading a module's state_dict does that, and
    frees the whole tensors read from it a moment before."""
    fsdp = _fsdp_module_class()
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp):
            module.reshard()


def gathered(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor whole, and whether any was a shard. Gathering is a collective:
    every rank must call this, with the same tensors in the same order."""
    out: dict[str, torch.Tensor] = {}
    sharded = False
    for key, value in tensors.items():
        if is_sharded(value):
            sharded = True
            value = value.full_tensor()
        out[key] = value
    return out, sharded


@torch.no_grad()
def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``, also when `target` is a shard: each rank keeps its part
    of the whole `value` it read (no communication)."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def write_on_one_rank(sharded: bool, write: Callable[[], Any]) -> Any:
    """Run `write` here, or — for a sharded model, whose every rank holds the same
    gathered tensors — on rank 0 only, and tell every rank whether it worked, so that
    no rank returns before the folder is complete and every rank raises if it is not."""
    dist = sys.modules.get("torch.distributed")
    if not sharded or dist is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return write()
    result = failure = None
    if dist.get_rank() == 0:
        try:
            result = write()
        except Exception as exc:  # reported to every rank below, then raised here
            failure = exc
    message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise ShardingError(f"rank 0 could not write the adapter ({message[0]}); nothing was written")
    return result


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `shard` gives a `fully_shard` call of their own, innermost first
    (FSDP2 shards bottom-up): each adapted layer, with its adapters, which FSDP2 then
    gathers with its weight, and each module the adapter trains whole. A module
    holding a tensor that a module outside it holds too (tied weights) is left to an
    enclosing unit, as FSDP2 needs."""
    from . import attach
    from .state import model_state

    state = model_state(model)
    trained = {name for config in state.adapters.values() for name in config.trainable} if state else set()
    holders = attach.tensor_holders(model)
    units = []
    for name, module in model.named_modules():
        if module is model or not (name in trained or attach.ADAPTERS in module._modules):
            continue
        inside = {id(m) for m in module.modules()}
        if not any(id(h) not in inside for p in module.parameters() for h, _ in holders.get(id(p), ())):
            units.append(module)
    return units[::-1]


def shard(
    model: torch.nn.Module, *, units: list[torch.nn.Module] | None = None, mesh: Any = None, mp_policy: Any = None, **options: Any
) -> torch.nn.Module:
    """`fully_shard` each unit (default: `shard_units`, e.g. transformer blocks can be
    passed instead), innermost first, then the whole model; the frozen base is sharded
    like the adapters, which alone train. Call it after `apply` or `load_adapter` and
    before building the optimizer; `options` go to every `fully_shard` call. Needs
    torch ≥ 2.6 and an initialised process group (torchrun)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as exc:
        raise ShardingError(f"sharding needs torch ≥ 2.6 with torch.distributed (FSDP2); this torch has no fully_shard ({exc})") from exc
    dist = sys.modules["torch.distributed"]
    if not dist.is_initialized():
        raise ShardingError("sharding needs a process group: run under torchrun and call torch.distributed.init_process_group() first")
    kwargs = dict(options, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for unit in units if units is not None else shard_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model
