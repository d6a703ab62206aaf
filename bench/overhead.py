"""The fixed cost of an adapted layer: what one call costs beyond the frozen layer's
own arithmetic — the Python and dispatch work per layer that a GPU cannot hide when
its kernels finish faster than the host issues them.

    .venv/bin/python bench/overhead.py [--quick]
    .venv/bin/python bench/overhead.py --device cuda    # on a GPU: what the host adds per layer

A stack of 50 tiny layers (Linear 16 → 16 on one row; Conv2d 8 → 8, 3×3 on a 4×4
image), so the arithmetic is negligible and the time is the per-call cost. For the
frozen stack, full fine-tuning (every weight trained: the cost a LoRA layer's training
step should not exceed), LoRA on each route (rank 4) and PEFT's LoRA, the time per
layer of a no-grad forward and of a training step (forward + backward), minimum over
repeats within a group, median (and range) over ``--runs`` groups, the contenders
interleaved. Writes bench/results/overhead[_cuda].{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from results_file import write_results
from torch import nn

import lora_anywhere as la

RESULTS = Path(__file__).parent / "results"
LAYERS, RANK = 50, 4
STACKS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "Linear 16→16": (lambda: nn.Linear(16, 16), lambda: torch.randn(1, 16)),
    "Conv2d 8→8 3×3": (lambda: nn.Conv2d(8, 8, 3, padding=1), lambda: torch.randn(1, 8, 4, 4)),
}


def contenders(layer: Callable[[], nn.Module], with_peft: bool) -> dict[str, nn.Module]:
    base = nn.Sequential(*[layer() for _ in range(LAYERS)])
    out = {
        "frozen": copy.deepcopy(base).requires_grad_(False),
        "full fine-tuning": copy.deepcopy(base),
        "LoRA, weight route": la.apply(copy.deepcopy(base), rank=RANK, route="weight"),
        "LoRA, activation route": la.apply(copy.deepcopy(base), rank=RANK, route="activation"),
    }
    if with_peft:
        try:
            from peft import LoraConfig, get_peft_model

            targets = [str(i) for i in range(LAYERS)]
            out["PEFT LoRA"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, target_modules=targets))
        except ImportError:
            pass
    return out


def per_layer_us(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` calls, in µs per layer: the floor that noise cannot lower."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 1e6 * best / LAYERS


def measure(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, runs: int) -> dict[str, dict[str, dict[str, float]]]:
    def forward(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(x)

        return run

    def step(m: nn.Module) -> Callable[[], None]:
        inp = x.clone().requires_grad_(True)  # the frozen stack still runs a backward

        def run() -> None:
            m.zero_grad(set_to_none=True)
            m(inp).sum().backward()

        return run

    out: dict[str, dict[str, dict[str, float]]] = {}
    for what, make in (("no-grad forward", forward), ("train step", step)):
        runners = {name: make(m) for name, m in models.items()}
        for run in runners.values():  # warm up
            for _ in range(5):
                run()
        groups: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(runs):
            for name, run in runners.items():
                groups[name].append(per_layer_us(run, repeats, x.device))
        out[what] = {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in groups.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--runs", type=int, default=5, help="groups of repeats, each giving its fastest call: their median and range")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 20 if args.quick else 100
    torch.manual_seed(0)
    results = {}
    for label, (layer, x) in STACKS.items():
        models = {name: m.to(device) for name, m in contenders(layer, not args.no_peft).items()}
        results[label] = measure(models, x().to(device), repeats, args.runs)
        for what, row in results[label].items():
            print(f"{label:<16} {what:<16} " + "  ".join(f"{k} {v['median']:.1f} µs" for k, v in row.items()), flush=True)
    meta = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "python": sys.version.split()[0], "device": args.device,
    }  # fmt: skip
    stem = "overhead" + ("_cuda" if device.type == "cuda" else "")
    lines = [
        f"Time per layer of a stack of {LAYERS} tiny layers (rank {RANK}): the fastest of {repeats} calls, median over "
        f"{args.runs} interleaved groups (range in brackets). {meta}",
        "",
    ]
    for label, measured in results.items():
        names = list(next(iter(measured.values())))
        lines += [f"**{label}**", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for what, row in measured.items():
            frozen = row["frozen"]["median"]
            cells = [
                f"{v['median']:.1f} µs ({v['min']:.1f}–{v['max']:.1f})" + ("" if n == "frozen" else f", +{v['median'] - frozen:.1f}")
                for n, v in row.items()
            ]
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
        lines.append("")
    write_results(args.out, stem, meta, results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
