"""Serving many adapters: per-sample adapters in one batch equal each sample run
alone with its adapter, on every rule with an activation route; hotswapping an
adapter's tensors changes the outputs without recompiling a compiled model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.errors import LoraError, NotAdaptedError, ShapeMismatchError
from lora_anywhere.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", None, "b", "a", "c", "b"]


class TextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding="same", padding_mode="reflect")
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).relu()
        return self.head(h.mean(2))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, groups=4),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 5),
    )


def vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3)


def gpt2() -> nn.Module:
    pytest.importorskip("transformers")
    from lora_anywhere_text import build

    return build("GPT2LMHeadModel", vocab_size=30, pad_token_id=0, bos_token_id=1, eos_token_id=2)


g = torch.Generator().manual_seed(0)
MODELS: dict[str, tuple[Callable[[], nn.Module], torch.Tensor, dict[str, Any]]] = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3)), torch.randn(6, 8, generator=g), {}),
    "mlp-sequence": (lambda: nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3)), torch.randn(6, 5, 8, generator=g), {}),
    "cnn-bn-grouped": (cnn, torch.randn(6, 3, 6, 6, generator=g), {}),
    "embedding-conv": (TextNet, torch.randint(0, 30, (6, 7), generator=g), {}),
    "mlp-svd-init": (lambda: nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3)), torch.randn(6, 8, generator=g), {"init": "svd"}),
    "timm-vit": (vit, torch.randn(6, 3, 32, 32, generator=g), {}),
    "gpt2": (gpt2, torch.randint(0, 30, (6, 5), generator=g), {"targets": "Conv1D"}),
}


def adapted(build: Callable[[], nn.Module], options: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    for name in "abc":
        la.apply(model, rank=3, name=name, **options)
    randomize_adapters(model, std=0.1)  # every adapter a different, non-zero update
    return model


def logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def alone(model: nn.Module, x: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        with la.disabled(model):
            return logits(model(x))
    la.set_adapter(model, name)
    return logits(model(x))


@pytest.mark.parametrize("case", list(MODELS))
@torch.no_grad()
def test_per_sample_adapters_equal_each_sample_alone(case: str) -> None:
    build, x, options = MODELS[case]
    model = adapted(build, options)
    la.set_adapter(model, "c")
    before = logits(model(x))
    with la.per_sample(model, NAMES):
        mixed = logits(model(x))
    expected = torch.cat([alone(model, x[i : i + 1], n) for i, n in enumerate(NAMES)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert len({tuple(mixed[i].flatten()[:3].tolist()) for i in (0, 1, 2, 4)}) == 4  # the adapters differ
    la.set_adapter(model, "c")
    torch.testing.assert_close(logits(model(x)), before)  # the model's own choice is back


@torch.no_grad()
def test_per_sample_on_graph_nodes() -> None:
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn.models import GCN

    model = adapted(lambda: GCN(8, 16, 2, 3), {})
    x, edges = torch.randn(6, 8, generator=g), torch.tensor([[0, 1, 2, 3, 4, 5], [1, 0, 3, 2, 5, 4]])  # three 2-node graphs
    names = ["a", "a", None, None, "b", "b"]  # one name per node: each graph's name on its nodes
    with la.per_sample(model, names):
        mixed = model(x, edges)
    for graph, name in enumerate(["a", None, "b"]):
        nodes = slice(2 * graph, 2 * graph + 2)
        sub = torch.tensor([[0, 1], [1, 0]])
        torch.testing.assert_close(mixed[nodes], _graph_alone(model, x[nodes], sub, name))


def _graph_alone(model: nn.Module, x: torch.Tensor, edges: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        with la.disabled(model):
            return model(x, edges)
    la.set_adapter(model, name)
    return model(x, edges)


@torch.no_grad()
def test_per_sample_along_another_dim() -> None:
    model = adapted(lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)), {})
    x = torch.randn(5, 3, 8)  # sequence-first: the samples are along dim 1
    with la.per_sample(model, ["b", None, "a"], dim=1):
        out = model(x)
    for i, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(out[:, i : i + 1], alone(model, x[:, i : i + 1], name))


def test_per_sample_refuses_what_it_cannot_do_and_changes_nothing(tmp_path: Path) -> None:
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return self.attn(h, h, h, need_weights=False)[0]

    model = adapted(WithAttention, {})
    x = torch.randn(3, 4, 8)
    la.set_adapter(model, "a")
    with torch.no_grad():
        before = model(x)
    with pytest.raises(LoraError, match=r"attn \(MultiheadAttention\).*weight route only"):
        with la.per_sample(model, ["a", "b", None]):
            pass
    with pytest.raises(NotAdaptedError, match="'z'"):
        with la.per_sample(model, ["a", "z", None]):
            pass
    with pytest.raises(LoraError, match="list of adapter names"):
        with la.per_sample(model, "a"):
            pass
    mlp = adapted(lambda: nn.Sequential(nn.Linear(8, 4)), {})
    with pytest.raises(LoraError, match="5 samples were named"):
        with la.per_sample(mlp, ["a"] * 5):
            mlp(torch.randn(3, 8))
    la.merge(mlp, "a")
    with pytest.raises(LoraError, match="unmerge"):
        with la.per_sample(mlp, ["a", "b"]):
            pass
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert la.active_adapters(model) == ["a"]


def test_a_rule_that_ignores_the_selection_is_refused() -> None:
    class Doubling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.t()

    class CarelessRule(la.Rule):
        name = "tests.CarelessRule"
        activation_base = Doubling

        def targets(self, layer: nn.Module) -> Any:
            return (la.Target("weight", "weight"),)

        def forward(self, layer, weight, terms, x):  # type: ignore[override]
            return x @ weight.t() + sum((x @ t.a.t()) @ t.b.t() * t.scale for t in terms)  # never t.dropout(x)

    class Plugin:
        @la.hookimpl
        def lora_anywhere_register_rules(self, register):
            register(Doubling, CarelessRule())

    plugin = Plugin()
    la.register_plugin(plugin, name="careless")
    try:
        model = adapted(lambda: nn.Sequential(Doubling()), {})
        with pytest.raises(LoraError, match="does not apply per-sample adapters"):
            with la.per_sample(model, ["a", "b"]):
                model(torch.randn(2, 4))
    finally:
        la.unregister_plugin("careless")


def test_hotswap_changes_the_adapter_without_recompiling(tmp_path: Path) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))

    x = torch.randn(2, 4, 8)
    donor = la.apply(build(), rank=2, trainable=["3"])
    randomize_adapters(donor, seed=7)
    with torch.no_grad():
        donor[3].weight.mul_(2)
        wanted = donor(x)
    la.save_adapter(donor, tmp_path / "other")

    model = la.apply(build(), rank=2, trainable=["3"])
    randomize_adapters(model, seed=1)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        first = compiled(x)
        frames = counter.frame_count
        la.hotswap_adapter(model, tmp_path / "other")
        second = compiled(x)
    assert counter.frame_count == frames == 1
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, wanted)


def test_hotswap_refuses_an_adapter_of_another_shape_and_changes_nothing(tmp_path: Path) -> None:
    build = lambda: nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))  # noqa: E731
    la.save_adapter(la.apply(build(), rank=3), tmp_path / "rank3")
    la.save_adapter(la.apply(build(), rank=2, alpha=4), tmp_path / "alpha4")
    la.save_adapter(la.apply(build(), rank=2, targets="0"), tmp_path / "fewer")
    model = la.apply(build(), rank=2)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    for folder, message in (("rank3", "ranks"), ("alpha4", "scale"), ("fewer", "layers")):
        with pytest.raises(ShapeMismatchError, match=message):
            la.hotswap_adapter(model, tmp_path / folder)
    assert all(torch.equal(v, before[k]) for k, v in la.adapter_state_dict(model).items())
    with pytest.raises(NotAdaptedError):
        la.hotswap_adapter(model, tmp_path / "rank3", name="nope")
