"""On a CUDA device (skipped without one; bench/gpu.sh runs them): the fused
activation-route kernels under bf16 autocast, merging, per-sample serving and
torch.compile (inductor) give the numbers the CPU reference gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2),
        nn.Flatten(1),
        nn.LazyLinear(64),
        nn.GELU(),
        nn.Linear(64, 5),
    )


def adapted(route: str) -> nn.Module:
    torch.manual_seed(0)
    model = net()
    model(torch.randn(1, 3, 16, 16))
    la.apply(model, rank=4, route=route)
    randomize_adapters(model, seed=1)
    return model


def step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        out = model(x)
    out.float().pow(2).mean().backward()
    return out.float(), [p.grad.float() for p in model.parameters() if p.requires_grad]


def fused_at_any_size(monkeypatch: pytest.MonkeyPatch, model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Make every activation-route training call on the GPU run the fused functions (a
    GPU's small calls take W + ΔW, `SMALL_CALL_OFF_CPU`, and this net's are all small),
    and check that they do."""
    from lora_anywhere.rules import torch_nn

    monkeypatch.setattr(torch_nn, "SMALL_CALL_OFF_CPU", 0)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        assert type(model[0](x).grad_fn).__name__ == "FusedConvLoRABackward"


@pytest.mark.parametrize("route", ["activation", "fused", "weight"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_step_matches_cpu(monkeypatch, route: str, dtype: torch.dtype | None) -> None:
    """On each route, and with the fused functions forced, as `auto` gives them to large
    calls only."""
    x = torch.randn(4, 3, 16, 16)
    layer_route = "weight" if route == "weight" else "activation"
    reference, reference_grads = step(adapted(layer_route), x, None)
    model = adapted(layer_route).cuda()
    if route == "fused":
        fused_at_any_size(monkeypatch, model, x.cuda(), dtype)
    out, grads = step(model, x.cuda(), dtype)
    # The fused functions run a conv of A besides W's, which may run in TF32 on the GPU.
    fp32 = 2e-3 if route == "fused" else 1e-4
    tol = dict(rtol=5e-2, atol=5e-2) if dtype is not None else dict(rtol=fp32, atol=fp32)
    torch.testing.assert_close(out.cpu(), reference, **tol)
    for g, r in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(g.cpu(), r, **tol)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_small_training_calls_take_w_plus_delta(monkeypatch, dtype: torch.dtype | None) -> None:
    """On a GPU an activation-route layer's small training call runs on W + ΔW
    (`SMALL_CALL_OFF_CPU`), with the fused route's numbers."""
    x = torch.randn(4, 3, 16, 16, device="cuda")
    model = adapted("activation").cuda()
    fused_at_any_size(monkeypatch, model, x, dtype)
    fused, fused_grads = step(model, x, dtype)
    monkeypatch.undo()  # the bound as shipped
    model = adapted("activation").cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        assert type(model[0](x).grad_fn).__name__ != "FusedConvLoRABackward"
    out, grads = step(model, x, dtype)
    # fp32 convs may run in TF32 on the GPU, where W + ΔW and W with s·B z round apart.
    tol = dict(rtol=5e-2, atol=5e-2) if dtype is not None else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, fused, **tol)
    for g, f in zip(grads, fused_grads, strict=True):
        torch.testing.assert_close(g, f, **tol)


@torch.no_grad()
def test_cuda_merge_and_per_sample() -> None:
    model = adapted("auto").cuda().eval()
    la.apply(model, rank=2, name="other")
    randomize_adapters(model, seed=2)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    la.set_adapter(model, "default")
    unmerged = model(x)
    la.merge(model, "default")
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-4)
    la.unmerge(model, "default")
    with la.per_sample(model, ["default", "other", None, "default"]):
        mixed = model(x)
    torch.testing.assert_close(mixed[[0, 3]], unmerged[[0, 3]], rtol=1e-4, atol=1e-4)


def test_cuda_compiled_matches_eager() -> None:
    model = adapted("auto").cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    eager, eager_grads = step(model, x, torch.bfloat16)
    torch._dynamo.reset()
    compiled, compiled_grads = step(torch.compile(model), x, torch.bfloat16)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    for g, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_gcn_low_rank_aggregation_matches_cpu(dtype: torch.dtype | None) -> None:
    """GCNConv's first conv aggregates A's r channels (`GCNConvRule.layer_forward`),
    on the GPU with the CPU's numbers."""
    models = pytest.importorskip("torch_geometric.nn.models")
    torch.manual_seed(0)
    model = la.apply(models.GCN(64, 64, num_layers=2, out_channels=4), rank=4, alpha=12.0)
    randomize_adapters(model, seed=1)
    x, edges = torch.randn(200, 64), torch.randint(0, 200, (2, 1000))  # wide enough to aggregate the rank

    def run(m: nn.Module, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None and device == "cuda"):
            out = m(x.to(device), edges.to(device))
        out.float().pow(2).mean().backward()
        return out.float().cpu(), [p.grad.float().cpu() for p in m.parameters() if p.requires_grad]

    reference, reference_grads = run(model, "cpu")
    out, grads = run(model.cuda(), "cuda")
    tol = dict(rtol=5e-2, atol=5e-2) if dtype is not None else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, reference, **tol)
    for g, r in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(g, r, **tol)
