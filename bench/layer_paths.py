"""One layer's training step on each route, relative to the frozen layer: the
measurements behind ``route="auto"`` and its per-call choices.

    .venv/bin/python bench/layer_paths.py [--quick]
    python bench/layer_paths.py --device cuda --dtype bf16 --batch-scale 8   # a GPU at batch 64

For Linear and Conv2d shapes taken from the benchmark models (ResNet-50 and
MobileNetV3-L at 160 px, ViT-S, Swin-T, wav2vec2, GCN, Conformer), time forward + backward of: the
frozen layer with an input that needs a gradient (the floor: what BitFit pays per
layer), full fine-tuning, rank-8 LoRA on the weight route, on the activation route's
fused call with ΔW never folded into the base product, and folded where the call has
many rows (`kernels.folds_delta`), and what ``route="auto"`` runs (which adds the
small-call switches, `rules.torch_nn.SMALL_CONV_CALL` on the CPU and
`SMALL_CALL_OFF_CPU` on a GPU). Contenders are interleaved and the median is reported.
On a GPU, ``--batch-scale 8`` gives the GPU run's batch of 64 (the shapes are for 8).
Writes bench/results/layer_paths[_cuda].{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from results_file import write_results
from torch import nn

import lora_anywhere as la
from lora_anywhere import kernels
from lora_anywhere.rules import torch_nn

RESULTS = Path(__file__).parent / "results"

# (label, layer factory, input shape)
LINEARS = [
    ("ViT-S qkv 384→1152", lambda: nn.Linear(384, 1152), (8 * 197, 384)),
    ("ViT-S fc1 384→1536", lambda: nn.Linear(384, 1536), (8 * 197, 384)),
    ("ViT-S fc2 1536→384", lambda: nn.Linear(1536, 384), (8 * 197, 1536)),
    ("Swin-T stage 1 qkv 96→288", lambda: nn.Linear(96, 288), (8 * 3136, 96)),
    ("Swin-T stage 2 qkv 192→576", lambda: nn.Linear(192, 576), (8 * 784, 192)),
    ("wav2vec2 q 768→768", lambda: nn.Linear(768, 768), (8 * 49, 768)),
    ("Linear 128→256 (GCN lin)", lambda: nn.Linear(128, 256), (20_000, 128)),
    ("Linear 256→256 (GCN lin)", lambda: nn.Linear(256, 256), (20_000, 256)),
    ("Conformer FFN 80→256", lambda: nn.Linear(80, 256), (4 * 200, 80)),
]
CONVS = [  # ResNet-50 at 160 px, batch 8: (in, out, kernel, stride, input size)
    (64, 64, 1, 1, 40),
    (64, 64, 3, 1, 40),
    (64, 256, 1, 1, 40),
    (256, 64, 1, 1, 40),
    (128, 128, 3, 1, 20),
    (128, 512, 1, 1, 20),
    (512, 128, 1, 1, 20),
    (256, 512, 1, 2, 40),
    (256, 256, 3, 1, 10),
    (256, 1024, 1, 1, 10),
    (1024, 256, 1, 1, 10),
    (512, 512, 3, 1, 5),
    (512, 2048, 1, 1, 5),
    (2048, 512, 1, 1, 5),
    # MobileNetV3-L's pointwise convs at 160 px, batch 8
    (40, 120, 1, 1, 20),
    (80, 200, 1, 1, 10),
    (112, 672, 1, 1, 10),
    (160, 960, 1, 1, 5),
]


def step(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    x = x.detach().requires_grad_(True)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        y = layer(x)
    y.backward(torch.ones_like(y))
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _set_switches(values: tuple[int, int, object]) -> None:
    """The per-call choices a contender runs with: the small-call bounds and the fold test."""
    torch_nn.SMALL_CONV_CALL, torch_nn.SMALL_CALL_OFF_CPU, kernels.folds_delta = values


def compare(label: str, layer: nn.Module, x: torch.Tensor, repeats: int, rank: int, dtype: torch.dtype | None = None) -> dict:
    activation = la.apply(copy.deepcopy(layer), rank=rank, route="activation")
    contenders = {
        "floor": copy.deepcopy(layer).requires_grad_(False),
        "full fine-tuning": copy.deepcopy(layer),
        "weight route": la.apply(copy.deepcopy(layer), rank=rank, route="weight"),
        "activation, unfolded": activation,
        "activation, folded": activation,
        "auto": la.apply(copy.deepcopy(layer), rank=rank),
    }
    # The two activation contenders run the fused call every time (no small-call
    # switch), on W, or on W + ΔW where `folds_delta` says so.
    fused_only = {"activation, unfolded": (0, 0, lambda *a: False), "activation, folded": (0, 0, kernels.folds_delta)}
    shipped = (torch_nn.SMALL_CONV_CALL, torch_nn.SMALL_CALL_OFF_CPU, kernels.folds_delta)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for round_ in range(repeats + 2):
        for name, model in contenders.items():
            _set_switches(fused_only.get(name, shipped))
            t = step(model, x, dtype)
            model.zero_grad(set_to_none=True)
            if round_ >= 2:
                times[name].append(t)
    _set_switches(shipped)
    floor = statistics.median(times["floor"])
    ratios = {k: statistics.median(v) / floor for k, v in times.items()}
    on_activations = bool(contenders["auto"].lora_adapters.default.activation_owners)
    return {"layer": label, "floor_ms": 1000 * floor, "ratios": ratios, "auto": "activation" if on_activations else "weight"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: under bf16 autocast")
    parser.add_argument("--batch-scale", type=int, default=1, help="times the shapes' batch (8 images, 8 sequences)")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    n = args.batch_scale
    torch.manual_seed(0)
    rows = []
    cases = [(label, make(), torch.randn(shape[0] * n, *shape[1:])) for label, make, shape in LINEARS]
    cases += [
        (
            f"Conv2d {i}→{o} {k}×{k}/{s} at {hw}×{hw}",
            nn.Conv2d(i, o, k, stride=s, padding=k // 2, bias=False),
            torch.randn(8 * n, i, hw, hw),
        )
        for i, o, k, s, hw in CONVS
    ]
    for label, layer, x in cases:
        row = compare(label, layer.to(args.device), x.to(args.device), repeats, args.rank, dtype)
        print(
            f"{label:<36} floor {row['floor_ms']:7.2f} ms  "
            + "  ".join(f"{k} {v:.2f}×" for k, v in row["ratios"].items() if k != "floor")
            + f"  auto: {row['auto']}",
            flush=True,
        )
        rows.append(row)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "rank": args.rank,
        "repeats": repeats,
        "device": args.device,
        "dtype": args.dtype,
        "batch_scale": n,
    }
    names = ["full fine-tuning", "weight route", "activation, unfolded", "activation, folded", "auto"]
    routes = ["weight route", "activation, unfolded", "activation, folded"]
    lines = [
        f"One layer's forward + backward, median of {repeats} interleaved runs, relative to the frozen layer (input gradient only);"
        f" the fastest LoRA route in bold; the last column is the route `auto` plans for the layer alone (a GCNConv keeps its `lin` on the weight route). {meta}",
        "",
        "| layer | frozen | " + " | ".join(names) + " | `auto` plans |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in rows:
        best = min(routes, key=lambda k: r["ratios"][k])
        cells = [f"**{r['ratios'][n]:.2f}×**" if n == best else f"{r['ratios'][n]:.2f}×" for n in names]
        lines.append(f"| {r['layer']} | {r['floor_ms']:.2f} ms | " + " | ".join(cells) + f" | {r['auto']} |")
    write_results(args.out, "layer_paths" + ("_cuda" if args.device == "cuda" else ""), meta, rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
