"""The adapted forward, backward and no-grad calls never ask for a tensor's value on
the host. On a GPU such a read (``.item()``, ``bool(t)``, ``torch.equal``, ``nonzero``)
waits for every queued kernel, so the host stops running ahead of the device: a step
then costs the GPU's time plus the host's instead of the larger of the two. On the CPU
the same reads show as the operations below, which is what this test looks for in
frames of lora_anywhere's own code."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_anywhere as la
from lora_anywhere.testing import randomize_adapters

PACKAGE = str(Path(la.__file__).parent)
#: Operations whose result the host must wait for (an output read on the host).
READS_ON_HOST = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose", "masked_select", "unique", "_unique2"}


class HostReads(TorchDispatchMode):
    """Records each host read that a frame of lora_anywhere's code asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.__name__.split(".")[0] in READS_ON_HOST:
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            if ours:
                self.found.append(f"{func.__name__} from {ours[-1].filename}:{ours[-1].lineno}")
        return func(*args, **(kwargs or {}))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 300), nn.GELU(), nn.Linear(300, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, groups=8), nn.Conv2d(64, 8, 1), nn.ConvTranspose2d(8, 4, 2), nn.Flatten(), nn.LazyLinear(3)
    )  # fmt: skip


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.lstm(self.attn(h, h, h)[0])[0]


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "linear": (_mlp, lambda: torch.randn(6, 12)),
    "convs": (_cnn, lambda: torch.randn(2, 3, 10, 10)),
    "sequence": (_Seq, lambda: torch.randint(0, 50, (2, 7))),
}


@pytest.mark.parametrize("options", [{"route": "auto"}, {"route": "weight"}, {"route": "activation"}, {"dora": True}], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_reads_in_training_or_inference_calls(case, options):
    build, inputs = CASES[case]
    torch.manual_seed(0)
    model = build()
    x = inputs()
    model(x)  # lazy layers take their shapes
    la.apply(model, rank=4, **options)
    randomize_adapters(model, seed=1)
    reads = HostReads()
    with reads:
        model.train()
        model(x).float().pow(2).mean().backward()
        model.eval()
        with torch.no_grad():
            model(x)
            model(x)  # the second call reuses the kept W + ΔW
    assert not reads.found, reads.found
