"""Run by tests/test_sharding.py under torchrun (2 gloo processes on CPU).

For each model: the same adapted model is trained a few steps twice — sharded with
FSDP2 on both ranks (the same batch on each) and alone in this process — and the
two must agree: the adapter `save_adapter` writes from the sharded run, the outputs
after training, an adapter loaded before sharding and one merged after gathering.
Each rank writes what it found to OUT/rank<r>.json; the test reads and judges it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_anywhere as la
from lora_anywhere import depthwise, sharding
from lora_anywhere.rules import torch_nn
from lora_anywhere.testing import tensors_of

# As in conftest.py: tiny calls in training would take the weight route instead of
# the fused functions that the activation-route cases are here to shard.
torch_nn.SMALL_CONV_CALL = 0
torch_nn.SMALL_CALL_OFF_CPU = 0

STEPS = 3


class ConvGruNet(nn.Module):
    """The model of issue #16: a conv, BatchNorm, a GRU and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).transpose(1, 2)
        out, _ = self.gru(h)
        return self.head(out[:, -1])


class Tagger(nn.Module):
    """Embedding, a bidirectional LSTM with a projection, an attention layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 12, batch_first=True, bidirectional=True, proj_size=8)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(tokens))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h)


class TiedLM(nn.Module):
    """An embedding whose table the output layer reads too (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def grouped_convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 16, 1),
        nn.Flatten(),
        nn.LazyLinear(4),
    )


def large_depthwise() -> nn.Module:
    """A 5×5 depthwise conv: its weight gradient takes channels_last copies (`depthwise`)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Flatten(), nn.LazyLinear(4))


def cases() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], dict[str, Any], str | None]]:
    """name → (build the base model, make its inputs, apply options, block units)."""
    g = torch.Generator().manual_seed(1)
    mlp = lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))  # noqa: E731
    found: dict[str, Any] = {
        "linear-activation": (mlp, lambda: torch.randn(6, 8, generator=g), {"route": "activation"}, None),
        "linear-weight": (mlp, lambda: torch.randn(6, 8, generator=g), {"route": "weight"}, None),
        "conv-bn-gru": (ConvGruNet, lambda: torch.randn(4, 4, 10, generator=g), {"route": "activation", "trainable": ["head"]}, None),
        "grouped-convs": (grouped_convs, lambda: torch.randn(2, 3, 6, 6, generator=g), {"route": "activation"}, None),
        "large-depthwise": (large_depthwise, lambda: torch.randn(2, 3, 6, 6, generator=g), {}, None),
        "embedding-lstm-mha": (Tagger, lambda: torch.randint(0, 20, (3, 7), generator=g), {"rank": 3}, None),
        "tied-embedding": (TiedLM, lambda: torch.randint(0, 20, (3, 7), generator=g), {}, None),
        "transformer-layer": (
            lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
            lambda: torch.randn(2, 5, 16, generator=g),
            {},
            None,
        ),
    }
    try:
        from torch_geometric.nn.models import GAT, GCN

        graph = lambda: (torch.randn(12, 16, generator=g), torch.randint(0, 12, (2, 40), generator=g))  # noqa: E731
        found["pyg-gcn"] = (lambda: GCN(16, 32, 2, 4), graph, {}, None)
        found["pyg-gat"] = (lambda: GAT(16, 32, 2, 4, heads=2), graph, {}, None)
    except ImportError:
        pass
    try:
        import timm

        vit = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=3)  # noqa: E731
        found["timm-vit"] = (vit, lambda: torch.randn(2, 3, 32, 32, generator=g), {"trainable": ["head"]}, None)
        found["timm-vit-blocks"] = (vit, lambda: torch.randn(2, 3, 32, 32, generator=g), {"trainable": ["head"]}, "blocks")
        found["timm-vit-blocks-checkpointed"] = (vit, lambda: torch.randn(2, 3, 32, 32, generator=g), {"checkpoint": True}, "blocks")
    except ImportError:
        pass
    try:
        import torchaudio

        config = dict(
            extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2)], extractor_conv_bias=False,
            encoder_embed_dim=32, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4,
            encoder_num_layers=2, encoder_num_heads=2, encoder_attention_dropout=0.0, encoder_ff_interm_features=64,
            encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
        )  # fmt: skip
        w2v = lambda: torchaudio.models.wav2vec2_model(**config, aux_num_out=4)  # noqa: E731
        found["torchaudio-wav2vec2"] = (w2v, lambda: torch.randn(2, 1600, generator=g), {}, None)
        found["torchaudio-wav2vec2-layers"] = (w2v, lambda: torch.randn(2, 1600, generator=g), {}, "encoder.transformer.layers")
    except ImportError:
        pass
    return found


def call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def loss_of(output: Any) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in tensors_of(output) if t.is_floating_point())


def train(model: nn.Module, inputs: Any) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for module in model.modules():  # frozen statistics, as the Trainer keeps them
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()
    for _ in range(STEPS):
        loss_of(call(model, inputs)).backward()
        optimizer.step()
        optimizer.zero_grad()


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = [t.float() for t in tensors_of(call(model, inputs))]
    model.train()
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max().item() for x, y in zip(a, b)), default=0.0)


def built(build: Callable[[], nn.Module], inputs: Any) -> nn.Module:
    torch.manual_seed(0)  # the same base on every rank, as loaded from a checkpoint
    model = build()
    with torch.no_grad():
        call(model.eval(), inputs)  # materialises lazy layers
    torch.manual_seed(1)
    return model.train()


def checkpointed(build: Callable[[], nn.Module], blocks: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = build()
        for block in model.get_submodule(blocks):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        return model

    return make


def units_of(model: nn.Module, blocks: str | None) -> list[nn.Module] | None:
    return None if blocks is None else list(model.get_submodule(blocks))[::-1]


def channels_last_grads(run: Callable[[], None]) -> int:
    """How many depthwise weight gradients `run` formed on channels_last copies."""
    calls: list[int] = []
    formed = depthwise._channels_last_weight_grad
    depthwise._channels_last_weight_grad = lambda *args: calls.append(1) or formed(*args)
    try:
        run()
    finally:
        depthwise._channels_last_weight_grad = formed
    return len(calls)


def check(name: str, build: Callable[[], nn.Module], make_inputs: Callable[[], Any], options: dict[str, Any], blocks: str | None, out: Path) -> dict[str, Any]:  # fmt: skip
    inputs = make_inputs()
    rank = options.pop("rank", 2)
    if options.pop("checkpoint", False):  # activation checkpointing inside each FSDP unit
        build = checkpointed(build, blocks)
    adapted = lambda: la.apply(built(build, inputs), rank=rank, **options)  # noqa: E731  # seeded: the same A everywhere
    model, single = adapted(), adapted()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_adapters" not in k}
    sharding.shard(model, units=units_of(model, blocks))
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    report: dict[str, Any] = {
        "frozen_sharded": bool(frozen) and all(sharding.is_sharded(p) for p in frozen),
        "trained_sharded": all(sharding.is_sharded(p) for p in model.parameters() if p.requires_grad),
        "units": len(units_of(model, blocks) or sharding.shard_units(single)),
    }
    report["channels_last_grads"] = channels_last_grads(lambda: train(model, inputs))
    train(single, inputs)
    report["output_diff"] = max_diff(outputs(model, inputs), outputs(single, inputs))

    folder = out / name
    la.save_adapter(model, folder)  # on every rank: gathers, rank 0 writes
    saved = load_file(str(folder / "lora_anywhere_adapter.safetensors"))
    expected = la.adapter_state_dict(single)
    report["saved_keys_match"] = sorted(saved) == sorted(expected)
    report["saved_diff"] = max(((saved[k] - expected[k]).abs().max().item() for k in expected if k in saved), default=0.0)
    report["adapter_moved"] = any(v.abs().max().item() > 0 for k, v in saved.items() if k.endswith("/B"))
    base_after = {k: v.full_tensor() if sharding.is_sharded(v) else v for k, v in model.state_dict().items() if "lora_adapters" not in k}
    report["base_unchanged"] = all(
        torch.equal(base_before[k], base_after[k])
        for k in base_before
        if not any(k.startswith(f"{m}.") for m in options.get("trainable", []))
    )

    loaded = la.load_adapter(built(build, inputs), folder)  # before sharding
    sharding.shard(loaded, units=units_of(loaded, blocks))
    report["loaded_then_sharded_diff"] = max_diff(outputs(loaded, inputs), outputs(single, inputs))

    merged = la.merge(la.load_adapter(built(build, inputs), folder))  # gathered: the plain base
    report["merged_diff"] = max_diff(outputs(merged, inputs), outputs(single, inputs))
    report["merge_sharded_refused"] = refused(lambda: la.merge(model))
    report["apply_sharded_refused"] = refused(lambda: la.apply(model, name="second"))
    report["load_sharded_refused"] = refused(lambda: la.load_adapter(model, folder, name="second"))
    return report


def refused(call: Callable[[], Any]) -> str:
    try:
        call()
    except la.LoraError as exc:
        return type(exc).__name__
    return "accepted"


def failed_save(out: Path) -> dict[str, Any]:
    """Rank 0 cannot write (a file stands where the folder should go): every rank
    must raise, none may hang, and the file must be left as it was."""
    blocker = out / "blocked"
    if dist.get_rank() == 0:
        blocker.write_text("not a folder")
    dist.barrier()
    model = la.apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), rank=2)
    sharding.shard(model)
    try:
        la.save_adapter(model, blocker)
        raised = "nothing"
    except Exception as exc:
        raised = type(exc).__name__
    return {"raised": raised, "left_alone": blocker.read_text() == "not a folder"}


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out, rank = Path(sys.argv[1]), dist.get_rank()
    only = sys.argv[2:]
    reports = {}
    for name, (build, make_inputs, options, blocks) in cases().items():
        if only and name not in only:
            continue
        try:
            reports[name] = check(name, build, make_inputs, dict(options), blocks, out)
        except Exception as exc:  # reported per case, so one failure does not hide the others
            reports[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if os.environ.get("FSDP_WORKER_RAISE"):
                raise
            dist.barrier()
    reports["failed-save"] = failed_save(out)
    (out / f"rank{rank}.json").write_text(json.dumps(reports, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
