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

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

#: On a tensor owner: tensor name → (where its inputs live, their fingerprint, what is held, W + ΔW, its version).
KEPT = "_lora_kept_weights"

#: Where a tensor that W + ΔW is formed from lives: its module's `_parameters` (or
#: `_buffers`) dict and its key there.
Slot = tuple[dict[str, Any], str]

_DISTRIBUTED = dist.is_available()  # fixed for the build; asked on every no-grad call otherwise


def usable() -> bool:
    """Whether a weight may be kept now: outside a compiled graph and a process group."""
    if torch.compiler.is_compiling():
        return False
    return not (_DISTRIBUTED and dist.is_initialized())


def _fingerprint(slots: Sequence[Slot]) -> tuple | None:
    """The identity, storage and version of the tensor in each slot now, and those of
    its gradient: a fused optimizer writes parameters without counting a version, but
    only after a backward has changed their gradients. None where a slot holds
    something other than a plain leaf tensor (one computed for this call, as
    `torch.func.functional_call` puts there): nothing is kept."""
    # One plain loop over the places themselves: it runs for every adapted tensor an
    # unmerged layer reads without gradients, where the base layer's own call costs a
    # few tens of microseconds, and Python work between the layer's kernels also slows
    # the kernels (measured: each microsecond of it cost about three).
    prints = []
    try:
        for d, k in slots:
            t = d.get(k)
            if t is None or not t.is_leaf:
                return None
            grad = t.grad
            prints.append((id(t), t.data_ptr(), t._version, None if grad is None else (id(grad), grad._version)))
    except RuntimeError:  # tensors made under inference_mode carry no version; functorch's wrappers no storage
        return None
    return tuple(prints)


def kept(owner: nn.Module, tensor: str) -> torch.Tensor | None:
    """The weight kept for `tensor` if the tensors it was formed from are still the
    ones in their places, unchanged, and nobody changed it in place since."""
    entry = owner.__dict__.get(KEPT, {}).get(tensor)
    if entry is None:
        return None
    slots, fingerprint, _, value, version = entry
    if value._version != version or fingerprint != _fingerprint(slots):
        return None
    return value


def keep(owner: nn.Module, tensor: str, slots: Sequence[Slot], value: torch.Tensor) -> None:
    """Keep `value`, formed from the tensors now in `slots`, for later no-grad calls.
    The slots stay right until the adapters on `tensor` change, which drops it."""
    fingerprint = _fingerprint(slots)
    if fingerprint is None or value.is_inference():
        return
    # The inputs and their gradients are held (the gradients are the adapters': small), so
    # that no id in the fingerprint can be reused by another tensor.
    inputs = [d[k] for d, k in slots]
    held = (*inputs, *(t.grad for t in inputs if t.grad is not None))
    owner.__dict__.setdefault(KEPT, {})[tensor] = (tuple(slots), fingerprint, held, value, value._version)


def holds(owner: nn.Module) -> bool:
    return not torch.compiler.is_compiling() and KEPT in owner.__dict__


def drop(owner: nn.Module) -> None:
    if not torch.compiler.is_compiling():  # a compiled graph never keeps one
        owner.__dict__.pop(KEPT, None)
