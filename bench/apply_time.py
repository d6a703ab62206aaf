"""How long `apply` (and `merge`) take on larger models.

    .venv/bin/python bench/apply_time.py

The models are built with random weights; each is copied fresh for every timed call
and the median of 5 is reported. Writes bench/results/apply_time.{md,json}.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.atomic import atomic_file

RESULTS = Path(__file__).parent / "results"


def models() -> dict[str, Callable[[], nn.Module]]:
    import timm
    import torchaudio
    import torchvision
    import transformers

    return {
        "ViT-B/16 (timm)": lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
        "ResNet-152 (torchvision)": lambda: torchvision.models.resnet152(),
        "wav2vec2-large (torchaudio)": lambda: torchaudio.models.wav2vec2_large(),
        "BERT-base (transformers)": lambda: transformers.BertModel(transformers.BertConfig()),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    rows = []
    for name, build in models().items():
        torch.manual_seed(0)
        base = build()
        params = sum(p.numel() for p in base.parameters())
        applies, merges = [], []
        for _ in range(5):
            fresh = copy.deepcopy(base)
            applies.append(timed(lambda: la.apply(fresh, rank=8)))  # noqa: B023 (called at once)
            merges.append(timed(lambda: la.merge(fresh)))  # noqa: B023 (called at once)
        summary = la.summary(la.apply(copy.deepcopy(base), rank=8))
        row = {
            "model": name,
            "params": params,
            "apply_ms": 1000 * statistics.median(applies),
            "merge_ms": 1000 * statistics.median(merges),
            "coverage": summary.coverage,
        }
        print(
            f"{name:<30} {params / 1e6:6.1f} M params  apply {row['apply_ms']:6.1f} ms  merge {row['merge_ms']:6.1f} ms  coverage {row['coverage']:.1%}",
            flush=True,
        )
        rows.append(row)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "rank": 8,
    }
    lines = [
        f"`apply(model, rank=8)` and `merge`, median of 5 on fresh copies. {meta}",
        "",
        "| model | parameters | apply | merge | weights adapted |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['apply_ms']:.0f} ms | {r['merge_ms']:.0f} ms | {r['coverage']:.1%} |"
        for r in rows
    ]
    for file, text in (
        ("apply_time.json", json.dumps({"meta": meta, "results": rows}, indent=2)),
        ("apply_time.md", "\n".join(lines) + "\n"),
    ):
        with atomic_file(RESULTS / file) as tmp:
            tmp.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
