"""`lora-anywhere demo`: LoRA against head-only tuning and full fine-tuning, in four
domains, on data generated here (nothing is downloaded).

In each domain a small base model is pretrained on task A, then adapted to a
different task B that needs features the base does not compute (see each domain's
module for why). The three ways to task B run in the shared `Trainer`; the table
reports test accuracy, trainable parameters, train time and the size of what each
way has to save. The LoRA model is also merged, saved and reloaded onto a fresh copy
of the base, and its outputs must agree each time.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Sequence

import torch

from ...errors import DemoError
from ...log import logger
from . import report
from .common import Outcome, run_domain
from .vision import SmallCNN  # noqa: F401  (a model for `lora-anywhere inspect lora_anywhere.cli.demo:SmallCNN`)

DOMAINS = ("vision", "graph", "speech", "text")
#: The framework each domain needs beyond torch; without it the domain is skipped.
FRAMEWORKS = {"graph": "torch_geometric", "speech": "torchaudio"}


def resolve(names: Sequence[str]) -> list[str]:
    """``all`` (or nothing) → every domain; otherwise the names given, in order."""
    chosen: list[str] = []
    for name in names or ["all"]:
        if name not in (*DOMAINS, "all"):
            raise DemoError(f"unknown demo domain {name!r}; choose from {', '.join(DOMAINS)} or all")
        for domain in DOMAINS if name == "all" else [name]:
            if domain not in chosen:
                chosen.append(domain)
    return chosen


def run_demo(
    domains: Sequence[str] = ("all",),
    out_dir: str | Path = "runs/demo",
    *,
    fast: bool = False,
    device: str = "auto",
    threads: int | None = 1,
) -> list[Outcome]:
    """Run the demo for `domains`: progress lines go to the `lora_anywhere` logger,
    the results table (also returned, as outcomes) to results.csv and curves.png.

    ``fast`` trains on less data for fewer epochs (for tests: the numbers are then
    not the ones the README reports). ``threads`` caps torch's CPU threads: these
    models are so small that more threads mostly wait on each other, and on a busy
    machine they make training many times slower. None leaves torch's setting."""
    out = Path(out_dir)
    names = resolve(domains)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise DemoError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DemoError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu (or auto)")
    previous = torch.get_num_threads()
    if threads is not None and device == "cpu":
        torch.set_num_threads(threads)
    where = f"{device} ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})" if device == "cpu" else device
    logger.info(f"lora_anywhere demo: {', '.join(names)} on {where}{', fast mode' if fast else ''}; results in {out}")
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    try:
        for name in names:
            try:
                module = importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as exc:
                framework = FRAMEWORKS.get(name)
                if framework is None or (exc.name or "").split(".")[0] != framework:
                    raise
                logger.info(f"{name}: skipped: {framework} is not installed (pip install 'lora_anywhere[{name}]')")
                continue
            outcomes.append(run_domain(module.DOMAIN, out, fast=fast, device=device))
    finally:
        torch.set_num_threads(previous)
    if not outcomes:
        raise DemoError("no domain could run: install the frameworks named above")
    logger.info("\n" + report.table(outcomes))
    report.write_csv(outcomes, out / "results.csv")
    plotted = report.plot(outcomes, out / "curves.png")
    files = f"{out / 'results.csv'}" + (f", {out / 'curves.png'}" if plotted else " (no curves.png: matplotlib is not installed)")
    logger.info(f"\nwritten: {files}; total time {time.perf_counter() - start:.0f} s")
    return outcomes
