"""The weight gradient of depthwise convs, formed by torch's conv on NCHW (NCL) tensors
and on channels_last copies of them (`lora_anywhere.depthwise`, copies included).

    .venv/bin/python bench/depthwise_grad.py [--quick]

Shapes are the depthwise convs of real models at the benchmark sizes: MobileNetV3-L
at 160 px and EfficientNet-B0 and ConvNeXt-T at 224 px (batch 8), Conformer's 1-D
kernel of 31 taps (the benchmark's 4 × 200 frames, and Conformer-S's width over
400), and 3×3 and short 1-D kernels, which the library leaves to torch, all in
float32; and one of EfficientNet-B0's in bf16, fp16 and float64, also left to torch.
Each way is timed in ``--runs`` groups of interleaved repeats; the table gives the
median time and the range of the groups' medians, and whether the library takes
channels_last copies for that layer and input. Writes
bench/results/depthwise_grad.{md,json}.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
from interleaved import group_medians
from results_file import write_results
from torch import nn

from lora_anywhere import depthwise

RESULTS = Path(__file__).parent / "results"
_conv_backward = torch.ops.aten.convolution_backward.default

# (label, batch, channels, spatial size (one int per dimension), kernel, stride[, dtype: float32 if not given])
SHAPES: list[tuple] = [
    ("MobileNetV3-L 3×3, 64 ch at 80², stride 2", 8, 64, (80, 80), 3, 2),
    ("MobileNetV3-L 3×3, 72 ch at 40²", 8, 72, (40, 40), 3, 1),
    ("MobileNetV3-L 5×5, 72 ch at 40², stride 2", 8, 72, (40, 40), 5, 2),
    ("MobileNetV3-L 5×5, 120 ch at 20²", 8, 120, (20, 20), 5, 1),
    ("MobileNetV3-L 5×5, 672 ch at 10²", 8, 672, (10, 10), 5, 1),
    ("MobileNetV3-L 5×5, 960 ch at 5²", 8, 960, (5, 5), 5, 1),
    ("EfficientNet-B0 3×3, 32 ch at 112²", 8, 32, (112, 112), 3, 1),
    ("EfficientNet-B0 5×5, 240 ch at 28²", 8, 240, (28, 28), 5, 1),
    ("EfficientNet-B0 5×5, 1152 ch at 7²", 8, 1152, (7, 7), 5, 1),
    ("ConvNeXt-T 7×7, 96 ch at 56²", 8, 96, (56, 56), 7, 1),
    ("ConvNeXt-T 7×7, 384 ch at 14²", 8, 384, (14, 14), 7, 1),
    ("ConvNeXt-T 7×7, 768 ch at 7²", 8, 768, (7, 7), 7, 1),
    ("Conformer (benchmark's) 1-D, 31 taps, 80 ch at 200", 4, 80, (200,), 31, 1),
    ("Conformer-S 1-D, 31 taps, 144 ch at 400", 4, 144, (400,), 31, 1),
    ("1-D, 15 taps, 256 ch at 200", 4, 256, (200,), 15, 1),
    ("1-D, 3 taps, 256 ch at 400", 4, 256, (400,), 3, 1),
    ("EfficientNet-B0 5×5, 240 ch at 28², bf16", 8, 240, (28, 28), 5, 1, torch.bfloat16),
    ("EfficientNet-B0 5×5, 240 ch at 28², fp16", 8, 240, (28, 28), 5, 1, torch.float16),
    ("EfficientNet-B0 5×5, 240 ch at 28², float64", 8, 240, (28, 28), 5, 1, torch.float64),
]
WAYS = ("torch (NCHW)", "channels_last copies")


def gradients(
    batch: int, channels: int, size: tuple[int, ...], k: int, stride: int, dtype: torch.dtype = torch.float32
) -> tuple[bool, tuple[Callable[[], torch.Tensor], ...]]:
    """Whether lora_anywhere takes channels_last copies for this layer and input, and
    the layer's weight gradient for one output gradient, each way of `WAYS`."""
    dims = len(size)
    layer = (nn.Conv1d if dims == 1 else nn.Conv2d)(channels, channels, k, stride=stride, padding=k // 2, groups=channels).to(dtype)
    x = torch.randn(batch, channels, *size, dtype=dtype)
    grad = torch.randn_like(layer(x))
    w = layer.weight.detach()
    geometry = (list(layer.stride), list(layer.padding), list(layer.dilation))
    zeros = [0] * dims

    def native() -> torch.Tensor:
        return _conv_backward(grad, x, w, None, *geometry, False, zeros, channels, [False, True, False])[1]

    def channels_last() -> torch.Tensor:
        return depthwise._channels_last_weight_grad(grad, x, w, *geometry, channels)

    return depthwise.slow_nchw_weight_grad(layer) and depthwise.applies(layer, x), (native, channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--runs", type=int, default=3, help="groups of repeats whose medians give the spread")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    torch.manual_seed(0)
    rows = []
    for label, *shape in SHAPES:
        takes, ways = gradients(*shape)
        native, copies = (way().float() for way in ways)
        torch.testing.assert_close(copies, native, rtol=2e-2, atol=2e-2 * native.abs().max().item())  # bf16's and fp16's rounding
        row = {
            "layer": label,
            "channels_last": takes,
            **group_medians(dict(zip(WAYS, ways)), args.runs, repeats),
        }
        rows.append(row)
        print(f"{label:<44}", "  ".join(f"{w} {row[w]['median_ms']:.2f} ms" for w in WAYS), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "python": sys.version.split()[0]}
    lines = [
        f"Weight gradient of depthwise convs: torch's conv on NCHW (NCL) tensors, and on channels_last copies "
        f"(the copies' time included): median of {repeats} interleaved repeats, range of the medians of {args.runs} groups. {meta}",
        "",
        "| layer | " + " | ".join(WAYS) + " | NCHW ÷ channels_last | lora_anywhere takes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[w]['median_ms']:.2f} ms ({r[w]['min_ms']:.2f}–{r[w]['max_ms']:.2f})" for w in WAYS)
        native, last = (r[w]["median_ms"] for w in WAYS)
        lines.append(f"| {r['layer']} | {cells} | {native / last:.2f}× | {'channels_last' if r['channels_last'] else 'torch'} |")
    write_results(args.out, "depthwise_grad", meta, rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
