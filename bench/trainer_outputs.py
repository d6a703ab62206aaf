"""What a run's files cost: a 50-epoch GAT on KarateClub, fit without out_dir and
with it, as the trainer writes by default (metrics every epoch, checkpoints every
epoch, curves at the end) and with curves drawn every epoch (``plot_every=1``, what
it did before) or checkpoints every 10 epochs (``save_every=10``).

    .venv/bin/python bench/trainer_outputs.py [--repeats 3]

One torch thread; each setting runs `--repeats` times, interleaved, and the median
and the range are reported. Writes bench/results/trainer_outputs.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lora_anywhere as la
from lora_anywhere.atomic import atomic_file

RESULTS = Path(__file__).parent / "results"
SETTINGS: dict[str, dict[str, Any] | None] = {
    "no out_dir": None,
    "out_dir (default: curves at the end)": {},
    "out_dir, save_every=10": {"save_every": 10},
    "out_dir, plot_every=1 (curves every epoch)": {"plot_every": 1},
}


def fit_seconds(options: dict[str, Any] | None) -> float:
    from torch_geometric.datasets import KarateClub
    from torch_geometric.nn.models import GAT

    graph = KarateClub()[0]
    torch.manual_seed(0)
    model = la.apply(GAT(34, 16, 2, 4, heads=2), rank=4)
    with tempfile.TemporaryDirectory() as folder:
        extra = {} if options is None else {"out_dir": folder, **options}
        trainer = la.Trainer(model, graph, graph, task="node-classification", epochs=50, lr=1e-2, progress=False, **extra)
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    fit_seconds(None)  # warm up: imports, first-call costs
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, options in SETTINGS.items():
            times[name].append(fit_seconds(options))
    rows = [{"setting": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": t} for name, t in times.items()]
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {load}), Python {sys.version.split()[0]}, torch {torch.__version__}, 1 thread"
    lines = [
        "# What a run's files cost: 50 epochs of a GAT on KarateClub",
        "",
        f"`bench/trainer_outputs.py --repeats {args.repeats}` on {machine}. Median (min–max) wall time of `Trainer.fit`.",
        "",
        "| setting | fit time |",
        "|---|---|",
        *(f"| {r['setting']} | {r['median_s']:.2f} s ({r['min_s']:.2f}–{r['max_s']:.2f}) |" for r in rows),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    with atomic_file(RESULTS / "trainer_outputs.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_file(RESULTS / "trainer_outputs.json") as tmp:
        tmp.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
