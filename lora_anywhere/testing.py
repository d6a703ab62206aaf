"""Checks that an adapted model is exact, for this project's tests and for plugin authors.

    from lora_anywhere.testing import check_exact
    report = check_exact(lambda: MyNet(), (torch.randn(2, 16),))
    print(report.coverage)

`check_exact` runs the whole contract on one model: output equal to the base at init;
randomised adapters change it; merged == unmerged; unmerge restores; only adapter
parameters train; save then load onto a fresh base reproduces the output; `remove`
gives back the original types and state_dict keys with the merged output.
`count_ops` counts the kernels a step dispatches (`tests/test_op_count.py`).
"""

from __future__ import annotations

import collections
import math
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import api, attach, io
from .adapter import LowRank
from .state import bitwise_equal
from .summary import summary

Inputs = Any  # a tuple of positional args, a dict of keyword args, or a callable(model)


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Every floating tensor in a nested output (tuples, lists, dicts, dataclasses)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_of(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_of(v)
    elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
        yield from tensors_of(value.to_tuple())
    elif hasattr(value, "__dataclass_fields__"):
        yield from tensors_of([getattr(value, f) for f in value.__dataclass_fields__])


def run(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        if callable(inputs) and not isinstance(inputs, nn.Module):
            out = inputs(model)
        elif isinstance(inputs, dict):
            out = model(**inputs)
        else:
            out = model(*inputs)
    return [t.detach().clone() for t in tensors_of(out)]


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference relative to the output's scale, over all outputs."""
    assert len(a) == len(b), f"outputs differ in count: {len(a)} vs {len(b)}"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.numel():
            continue
        # Equal entries (the same ±inf, as in masked logits, or both NaN) differ by 0;
        # any other non-finite difference is an infinite error. The scale comes from
        # the finite entries: an inf or NaN must never hide a difference.
        same = (x == y) | (x.isnan() & y.isnan())
        diff = torch.where(same, torch.zeros_like(x), (x - y).abs()).max().item()
        finite = x[x.isfinite()]
        scale = max(finite.abs().max().item(), 1e-3) if finite.numel() else 1.0
        worst = max(worst, math.inf if math.isnan(diff) else diff / scale)
    return worst


@torch.no_grad()
def randomize_adapters(model: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter a non-zero B (and a fresh A), as training would."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LowRank):
            for p in (module.A, module.B):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * std)


@dataclass
class Report:
    coverage: float
    adapted: int
    init_error: float
    change: float
    merge_error: float
    unmerge_error: float
    load_error: float
    remove_error: float


def check_exact(
    factory: Callable[[], nn.Module],
    inputs: Inputs,
    *,
    tol: float = 1e-4,
    std: float = 0.05,
    seed: int = 0,
    **apply_kwargs: Any,
) -> Report:
    """Run the adapter contract on ``factory()``; raise AssertionError on any breach."""
    apply_kwargs.setdefault("rank", 4)
    torch.manual_seed(seed)
    model = factory().eval()
    keys = list(model.state_dict())
    types = {n: type(m) for n, m in model.named_modules()}
    base = run(model, inputs)

    api.apply(model, **apply_kwargs)
    assert list(k for k in model.state_dict() if attach.ADAPTERS not in k.split(".")) == keys, "apply changed the base state_dict keys"
    init = max_error(base, run(model, inputs))
    assert init <= tol, f"output at init differs from the base by {init:.2e}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    non_adapter = {n for n in trainable if attach.ADAPTERS not in n.split(".")}
    allowed = tuple(f"{t}." for t in api.model_state(model).adapters[apply_kwargs.get("name", api.DEFAULT)].trainable)
    assert all(n.startswith(allowed) for n in non_adapter) if allowed else not non_adapter, (
        f"base parameters left trainable: {sorted(non_adapter)[:5]}"
    )

    randomize_adapters(model, std, seed)
    adapted = run(model, inputs)
    change = max_error(base, adapted)
    assert change > 10 * tol, f"randomised adapters do not change the output (max change {change:.2e})"
    api.merge(model)
    merge_err = max_error(adapted, run(model, inputs))
    assert merge_err <= tol, f"merged output differs from unmerged by {merge_err:.2e}"
    api.unmerge(model)
    unmerge_err = max_error(adapted, run(model, inputs))
    assert unmerge_err <= tol, f"unmerged output differs by {unmerge_err:.2e}"
    report_summary = summary(model)

    with tempfile.TemporaryDirectory() as tmp:
        io.save_adapter(model, f"{tmp}/adapter")
        torch.manual_seed(seed)
        fresh = factory().eval()
        io.load_adapter(fresh, f"{tmp}/adapter")
        load_err = max_error(adapted, run(fresh, inputs))
        assert load_err <= tol, f"a saved and reloaded adapter differs by {load_err:.2e}"

    api.remove(model, merge=True)
    assert list(model.state_dict()) == keys, "remove did not restore the original state_dict keys"
    assert {n: type(m) for n, m in model.named_modules()} == types, "remove did not restore the original module types"
    remove_err = max_error(adapted, run(model, inputs))
    assert remove_err <= tol, f"remove(merge=True) output differs by {remove_err:.2e}"
    return Report(report_summary.coverage, len(report_summary.rows), init, change, merge_err, unmerge_err, load_err, remove_err)


def assert_same_fingerprint(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Two snapshots of a model are the same: every tensor under ``"tensors"`` to the bit
    (NaN and -0.0 included), every other entry equal. For tests that a refused call
    left the model exactly as it was."""
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert bitwise_equal(after["tensors"][key], value), key
    assert {k: v for k, v in after.items() if k != "tensors"} == {k: v for k, v in before.items() if k != "tensors"}


#: Operations that launch no kernel: a tensor's detached alias, and a read of a CPU
#: scalar (AdamW's step counters); views are not counted either.
_NO_KERNEL = (torch.ops.aten.detach.default, torch.ops.aten._local_scalar_dense.default)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if not func.is_view and func not in _NO_KERNEL:
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> collections.Counter[str]:
    """The operations `run()` dispatches that run a kernel, by name, in its forward and
    backward alike. Where a GPU's kernels finish faster than the host issues them, a
    step's time follows this count; unlike a time, it does not depend on the machine's
    speed or load (only on the torch version's kernels)."""
    with _OpCounter() as counter:
        run()
    return counter.ops
