"""Serving a batch whose samples use different adapters: `la.per_sample` (one pass)
against running the model once per adapter (on that adapter's samples, or on the
whole batch), and the base model alone as the floor.

    .venv/bin/python bench/serving.py [--quick] [--adapters 2,8] [--device cuda --dtype bf16]

Eval mode, no grad; the contenders' calls are interleaved round after round (each
round starting with the next contender) and the median and the range over rounds
are reported, relative to the base model's pass. Writes bench/results/serving.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_results  # noqa: E402
from train_step import RESULTS  # noqa: E402

import lora_anywhere as la  # noqa: E402
from lora_anywhere.testing import randomize_adapters  # noqa: E402


def models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]]:
    import timm
    import torchvision

    px = 96 if quick else 160
    return {
        "vit_small": (
            lambda: timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=px),
            lambda n: torch.randn(n, 3, px, px),
        ),
        "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), lambda n: torch.randn(n, 3, px, px)),
    }


def contenders(model: nn.Module, base: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    adapters = list(dict.fromkeys(names))
    rows = {a: torch.tensor([i for i, n in enumerate(names) if n == a], device=x.device) for a in adapters}

    def one_pass() -> torch.Tensor:
        with la.per_sample(model, names):
            return model(x)

    def per_adapter_samples() -> torch.Tensor:
        out = None
        for a in adapters:
            la.set_adapter(model, a)
            y = model(x[rows[a]])
            out = y.new_empty(len(names), *y.shape[1:]) if out is None else out
            out[rows[a]] = y
        return out

    def per_adapter_batch() -> torch.Tensor:
        out = None
        for a in adapters:
            la.set_adapter(model, a)
            y = model(x)
            out = torch.empty_like(y) if out is None else out
            out[rows[a]] = y[rows[a]]
        return out

    return {
        "base model (floor)": lambda: base(x),
        "per_sample, one pass": one_pass,
        "once per adapter, its samples": per_adapter_samples,
        "once per adapter, whole batch": per_adapter_batch,
    }


def run(name: str, build: Callable[[], nn.Module], inputs: Callable[[int], torch.Tensor], k: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base = build().eval().to(args.device)
    model = build().eval().to(args.device)
    model.load_state_dict(base.state_dict())
    for i in range(k):
        la.apply(model, rank=args.rank, name=f"a{i}")
    randomize_adapters(model, std=0.02)
    generator = torch.Generator().manual_seed(1)
    names = [f"a{i}" for i in torch.randint(0, k, (args.batch,), generator=generator).tolist()]
    x = inputs(args.batch).to(args.device)
    calls = contenders(model, base, x, names)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    times: dict[str, list[float]] = {c: [] for c in calls}
    with torch.no_grad(), autocast:
        reference = calls["per_sample, one pass"]()
        error = max((calls[c]() - reference).abs().max().item() for c in calls if c.startswith("once"))
        order = list(calls)
        for round_ in range(args.repeats + 1):
            for c in order[round_ % len(order) :] + order[: round_ % len(order)]:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                calls[c]()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if round_:  # the first round warms up
                    times[c].append(time.perf_counter() - start)
    floor = statistics.median(times["base model (floor)"])
    rows = {
        c: {
            "median_ms": 1000 * statistics.median(t),
            "ratio": statistics.median(t) / floor,
            "min_ratio": min(t) / floor,
            "max_ratio": max(t) / floor,
        }
        for c, t in times.items()
    }
    print(f"== {name}, {k} adapters, batch {args.batch} (largest difference from per_sample: {error:.1e})", flush=True)
    for c, r in rows.items():
        print(f"   {c:<32} {r['ratio']:.2f}× ({r['min_ratio']:.2f}–{r['max_ratio']:.2f})  {r['median_ms']:.1f} ms", flush=True)
    return {"model": name, "adapters": k, "batch": args.batch, "max_abs_difference": error, "contenders": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None, help="comma-separated subset of: vit_small, resnet50")
    parser.add_argument("--adapters", default="2,8")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.batch = args.batch or (16 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 7)
    results = []
    for name, (build, inputs) in models(args.quick).items():
        if args.models and name not in args.models.split(","):
            continue
        for k in (int(v) for v in args.adapters.split(",")):
            results.append(run(name, build, inputs, k, args))
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    suffix = ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    names = list(results[0]["contenders"])
    lines = ["| model | adapters | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in results:
        cells = [f"{c['ratio']:.2f}× ({c['min_ratio']:.2f}–{c['max_ratio']:.2f})" for c in r["contenders"].values()]
        lines.append(f"| {r['model']} (batch {r['batch']}) | {r['adapters']} | " + " | ".join(cells) + " |")
    text = f"Inference of a batch whose samples use different adapters, relative to the base model (median, range). {meta}\n\n"
    write_results(args.out, f"serving{suffix}", meta, results, text + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
