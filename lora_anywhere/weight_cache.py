"""W + ΔW kept across calls that need no gradient (evaluation, inference).

Without a gradient to pay for, an unmerged layer runs fastest on the weight it would
have after merging; forming that weight on every call costs a pass over W per layer,
and adding A's and B's products on the activations instead costs extra products on
every call, which small batches and GPUs (where the host issues every kernel) feel
most. So the first no-grad call of a layer, whatever its rows, keeps what it formed
(outside inference mode, whose tensors carry no version), and later calls reuse it as long
as every tensor it was formed from is the same object, in the same storage, at the
same version, with the same gradient — an optimizer step, a load, `.to()` or any
in-place change forms it again, and a changed adapter set (merge, disable, remove)
drops it. What no version counts is not seen: a write through ``tensor.data``
between two no-grad calls (run one call with gradients, or `merge`, after such a
write).

It costs one copy of each adapted weight while it is held. It is dropped by the
layer's next call that records gradients (training resumes) and is never pickled,
copied or saved; `merge` gives the same speed with no copy. It is not used while a
graph is compiled (the compiled graph forms W + ΔW itself) or in a process group
(an FSDP2 layer's whole weight exists only inside its forward).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

#: On a tensor owner: tensor name → (what it was formed from, the tensors held, W + ΔW, its version).
KEPT = "_lora_kept_weights"


_DISTRIBUTED = dist.is_available()  # fixed for the build; asked on every no-grad call otherwise


def usable() -> bool:
    """Whether a weight may be kept now: outside a compiled graph and a process group."""
    if torch.compiler.is_compiling():
        return False
    return not (_DISTRIBUTED and dist.is_initialized())


def _fingerprint(inputs: Sequence[torch.Tensor]) -> tuple | None:
    """Each input's identity, storage and version, and those of its gradient: a fused
    optimizer writes parameters without counting a version, but only after a backward
    has changed their gradients. None where an input is not a plain leaf tensor (one
    computed for this call, as `torch.func.functional_call` passes): nothing is kept."""
    # One plain loop: it runs for every adapted tensor an unmerged layer reads without
    # gradients, where the base layer's own call costs a few tens of microseconds.
    prints = []
    try:
        for t in inputs:
            if not t.is_leaf:
                return None
            grad = t.grad
            prints.append((id(t), t.data_ptr(), t._version, None if grad is None else (id(grad), grad._version)))
    except RuntimeError:  # tensors made under inference_mode carry no version; functorch's wrappers no storage
        return None
    return tuple(prints)


def kept(owner: nn.Module, tensor: str, inputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The weight kept for `tensor` if it was formed from exactly these `inputs`, as
    they are now, and nobody changed it in place since."""
    entry = owner.__dict__.get(KEPT, {}).get(tensor)
    if entry is None:
        return None
    fingerprint, _, value, version = entry
    if value._version != version or fingerprint != _fingerprint(inputs):
        return None
    return value


def keep(owner: nn.Module, tensor: str, inputs: Sequence[torch.Tensor], value: torch.Tensor) -> None:
    fingerprint = _fingerprint(inputs)
    if fingerprint is None or value.is_inference():
        return
    # The inputs and their gradients are held (the gradients are the adapters': small), so
    # that no id in the fingerprint can be reused by another tensor.
    held = (*inputs, *(t.grad for t in inputs if t.grad is not None))
    owner.__dict__.setdefault(KEPT, {})[tensor] = (fingerprint, held, value, value._version)


def holds(owner: nn.Module) -> bool:
    return not torch.compiler.is_compiling() and KEPT in owner.__dict__


def drop(owner: nn.Module) -> None:
    if not torch.compiler.is_compiling():  # a compiled graph never keeps one
        owner.__dict__.pop(KEPT, None)
