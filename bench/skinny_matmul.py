"""The rank-r products of LoRA's forward and backward, formed three ways: with r columns (how the
textbook writes them, and how autograd forms them for PEFT's nn.Linear A and B), with
r rows, and with r rows in blocks of rows, one per thread, as one batched matmul (how
`lora_anywhere.kernels` forms a Linear's on the CPU: `rank_blocks`). Same numbers up to
the order of sums, same FLOPs; only the shape BLAS is asked for differs.

    .venv/bin/python bench/skinny_matmul.py [--quick]

Shapes are the layers of the benchmark models (ViT-S at 224 px, batch 8; ResNet-50's
convs at 160 px as position rows). Each product is timed in ``--runs`` groups of
interleaved repeats; the table gives the median time and the range of the groups'
medians. Writes bench/results/skinny_matmul.{md,json}.
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

from lora_anywhere.kernels import per_sample_mm, rank_blocks

RESULTS = Path(__file__).parent / "results"
RANK = 8
# (label, rows N, in, out)
SHAPES = [
    ("ViT-S qkv", 8 * 197, 384, 1152),
    ("ViT-S fc1", 8 * 197, 384, 1536),
    ("ViT-S fc2", 8 * 197, 1536, 384),
    ("ResNet-50 1×1 64→256 at 40×40", 8 * 1600, 64, 256),
    ("ResNet-50 1×1 512→2048 at 5×5", 8 * 25, 512, 2048),
]


WAYS = ("r columns", "r rows", "r rows in blocks")


def products(n: int, cols: int, out: int) -> dict[str, tuple[Callable[[], torch.Tensor], ...]]:
    """Per product, one function per way of `WAYS`. g is the output gradient (N × out),
    z = x Aᵀ; the blocks are `rank_blocks`' for these rows."""
    x, a = torch.randn(n, cols), torch.randn(RANK, cols)
    g, z, b = torch.randn(n, out), torch.randn(n, RANK), torch.randn(out, RANK)
    k = rank_blocks(x, n)
    xk, gk, zk = x.view(k, -1, cols), g.view(k, -1, out), z.t().reshape(RANK, k, -1).transpose(0, 1)
    return {
        "z = x Aᵀ (N × r)": (lambda: x @ a.t(), lambda: (a @ x.t()).t(), lambda: per_sample_mm(a, xk.transpose(1, 2))),
        "gz = g B (N × r)": (lambda: g @ b, lambda: (b.t() @ g.t()).t(), lambda: per_sample_mm(b.t(), gk.transpose(1, 2))),
        "grad B = gᵀ z (out × r)": (lambda: g.t() @ z, lambda: (z.t() @ g).t(), lambda: torch.bmm(zk, gk).sum(0).t()),
    }


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A product's result as N × r (or out × r): blocks (k, r, N / k) joined."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).t() if t.dim() == 3 else t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--runs", type=int, default=3, help="groups of repeats whose medians give the spread")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    torch.manual_seed(0)
    rows = []
    for label, n, cols, out in SHAPES:
        for product, ways in products(n, cols, out).items():
            for way in ways[1:]:
                torch.testing.assert_close(as_rows(way()), ways[0](), rtol=1e-4, atol=1e-3)
            row = {"shape": label, "product": product, **group_medians(dict(zip(WAYS, ways)), args.runs, repeats)}
            rows.append(row)
            print(f"{label:<32} {product:<26}", "  ".join(f"{w} {row[w]['median_ms']:.3f} ms" for w in WAYS), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "python": sys.version.split()[0]}
    lines = [
        f"LoRA's rank-{RANK} products with r columns, r rows, and r rows in blocks of rows "
        f"(one per thread, as one batched matmul): median of {repeats} interleaved repeats, "
        f"range of the medians of {args.runs} groups. {meta}",
        "",
        "| layer | product | " + " | ".join(WAYS) + " | columns ÷ rows | rows ÷ rows in blocks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[w]['median_ms']:.3f} ms ({r[w]['min_ms']:.3f}–{r[w]['max_ms']:.3f})" for w in WAYS)
        c, w, k = (r[w]["median_ms"] for w in WAYS)
        lines.append(f"| {r['shape']} | {r['product']} | {cells} | {c / w:.1f}× | {w / k:.1f}× |")
    write_results(args.out, "skinny_matmul", meta, rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
