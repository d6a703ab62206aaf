"""What exact unmerging costs: the elements merging rounds away, kept to restore W.

    .venv/bin/python bench/exact_unmerge.py          # ~1 minute on a 2-core CPU
    .venv/bin/python bench/exact_unmerge.py --quick  # one seed, one size

W + ΔW is rounded; taking ΔW out again misses W by an ulp wherever the sum changed
binade. `merge` keeps those elements (`LostBits`: position, old value, merged value)
so that `unmerge` restores W to the bit. For each dtype and size of update (‖ΔW‖ as a
share of ‖W‖; trained LoRA updates are typically 1–10%), in the same run:

* plain: the share of W's elements that one merge + unmerge changes without the
  record (what the library did before), and after 10 cycles;
* exact: the record's size as a share of the weight's bytes, and the elements wrong
  after 10 cycles (must be 0);
* the time of one merge with and without the record, per element of the weight
  (median of 3 repeats; on a shared machine, read the ratio, not the values).

Each cell is the mean over seeds of ViT-B-sized layers (768×768 attention, 768×3072
MLP), with the min–max over seeds. Writes bench/results/exact_unmerge.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.api import shift_base
from lora_anywhere.atomic import atomic_file
from lora_anywhere.attach import layer_adapters

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = [(768, 768), (3072, 768)]
RELATIVE = [0.01, 0.1, 1.0]


def adapted_layer(shape: tuple[int, int], dtype: torch.dtype, relative: float, seed: int) -> tuple[nn.Linear, object]:
    torch.manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0]).to(dtype)
    la.apply(layer, rank=16)
    (adapter,) = layer_adapters(layer).values()
    factor = adapter.factors["weight"]
    with torch.no_grad():
        factor.B.copy_(torch.randn(factor.B.shape))
        delta = factor.delta().float()
        factor.B.mul_(relative * layer._parameters["weight"].float().norm() / delta.norm())
    return layer, adapter


def wrong(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        (a.view(torch.int16 if a.element_size() == 2 else torch.int32) != b.view(torch.int16 if b.element_size() == 2 else torch.int32))
        .float()
        .mean()
        .item()
    )


def cycles(layer: nn.Linear, adapter: object, exact: bool, n: int) -> float:
    weight = layer._parameters["weight"]
    original = weight.detach().clone()
    for _ in range(n):
        shift_base(layer, adapter, +1, exact=exact)
        shift_base(layer, adapter, -1, exact=exact)
    return wrong(weight.detach(), original)


def measure(shape: tuple[int, int], dtype: torch.dtype, relative: float, seed: int, repeats: int) -> dict[str, float]:
    layer, adapter = adapted_layer(shape, dtype, relative, seed)
    weight = layer._parameters["weight"]
    plain_once = cycles(layer, adapter, exact=False, n=1)
    layer, adapter = adapted_layer(shape, dtype, relative, seed)
    plain_ten = cycles(layer, adapter, exact=False, n=10)
    layer, adapter = adapted_layer(shape, dtype, relative, seed)
    weight = layer._parameters["weight"]
    shift_base(layer, adapter, +1)
    kept = sum(lost.nbytes for lost in adapter._lost.values())
    shift_base(layer, adapter, -1)
    exact_ten = cycles(layer, adapter, exact=True, n=10)
    times = {True: [], False: []}
    for _ in range(repeats):
        for exact in (False, True):
            start = time.perf_counter()
            shift_base(layer, adapter, +1, exact=exact)
            times[exact].append(time.perf_counter() - start)
            shift_base(layer, adapter, -1, exact=exact)
    return {
        "plain_wrong_after_1": plain_once,
        "plain_wrong_after_10": plain_ten,
        "exact_wrong_after_10": exact_ten,
        "record_share_of_weight": kept / (weight.numel() * weight.element_size()),
        "merge_ns_per_element_plain": 1e9 * statistics.median(times[False]) / weight.numel(),
        "merge_ns_per_element_exact": 1e9 * statistics.median(times[True]) / weight.numel(),
    }


def spread(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return f"{scale * mean:.{digits}f} ({scale * min(values):.{digits}f}–{scale * max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2, 3, 4]
    sizes = SIZES[:1] if args.quick else SIZES
    rows = []
    for dname, dtype in DTYPES.items():
        for relative in RELATIVE:
            cells = [measure(shape, dtype, relative, seed, repeats=3) for shape in sizes for seed in seeds]
            rows.append({"dtype": dname, "relative": relative, "cells": cells})
            print(dname, relative, {k: round(statistics.fmean(c[k] for c in cells), 5) for k in cells[0]}, flush=True)
    lines = [
        "# Exact unmerge: what it keeps and what it saves",
        "",
        f"`bench/exact_unmerge.py`{' --quick' if args.quick else ''}; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"1 thread; layers {', '.join(f'{r}×{c}' for r, c in sizes)}, rank 16, seeds {seeds}. Mean (min–max) over layers × seeds.",
        "",
        "| dtype | ‖ΔW‖/‖W‖ | plain: % of W wrong after 1 cycle | plain: after 10 | exact: record, % of the weight's bytes | exact: % wrong after 10 | merge ns/element, plain | merge ns/element, exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = row["cells"]
        pick = lambda key, cells=cells: [c[key] for c in cells]  # noqa: E731
        lines.append(
            f"| {row['dtype']} | {row['relative']:g} | {spread(pick('plain_wrong_after_1'))} | {spread(pick('plain_wrong_after_10'))} "
            f"| {spread(pick('record_share_of_weight'))} | {spread(pick('exact_wrong_after_10'))} "
            f"| {spread(pick('merge_ns_per_element_plain'), 1.0, 1)} | {spread(pick('merge_ns_per_element_exact'), 1.0, 1)} |"
        )
    RESULTS.mkdir(exist_ok=True)
    with atomic_file(RESULTS / "exact_unmerge.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_file(RESULTS / "exact_unmerge.json") as tmp:
        tmp.write_text(json.dumps({"argv": sys.argv[1:], "torch": torch.__version__, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
