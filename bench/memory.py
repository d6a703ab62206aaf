"""Training memory of LoRA against full fine-tuning, the BitFit floor and PEFT.

    .venv/bin/python bench/memory.py [--quick] [--models resnet50,...]

Counted, not sampled, so the numbers repeat on any machine (to about 0.1 MB): the bytes of the
tensors autograd saves for the backward of one training step (unique storages, through
``torch.autograd.graph.saved_tensors_hooks``), and the bytes of the trainable state
(gradients and AdamW's two moments, 3 × 4 bytes per trainable fp32 parameter). The
frozen weights are the same for every contender and are not counted.
Writes bench/results/memory.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_step import RESULTS, Case, bitfit, cases, peft_lora  # noqa: E402

import lora_anywhere as la  # noqa: E402


def saved_bytes(model: nn.Module, case: Case, inputs: tuple) -> int:
    return step_saved_bytes(model, lambda: case.loss(model(*inputs)))


def step_saved_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for the backward of ``loss_fn()``
    (then runs that backward), leaving out the model's frozen parameters."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    return sum(n for ptr, n in storages.items() if ptr not in frozen)


def trainable_state_bytes(model: nn.Module) -> int:
    """Gradients and AdamW's two moments: 3 × 4 bytes per trainable fp32 parameter."""
    return 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def contenders(rank: int, with_peft: bool) -> dict[str, Callable[[nn.Module], nn.Module]]:
    makers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "full fine-tuning": lambda m: m,
        "BitFit floor": bitfit,
        "lora_anywhere": lambda m: la.apply(m, rank=rank),
        "lora_anywhere, LoRA-FA (freeze_a)": lambda m: la.apply(m, rank=rank, freeze_a=True),
        "lora_anywhere, weight route": lambda m: la.apply(m, rank=rank, path="weight"),
    }
    if with_peft:
        makers["PEFT LoRA"] = lambda m: peft_lora(m, rank)
    return makers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = []
    for case in cases(args.quick):
        if args.models and case.name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        base = case.build()
        inputs = case.inputs()
        row = {}
        for name, make in contenders(args.rank, not args.no_peft).items():
            try:
                model = make(copy.deepcopy(base)).train()
            except Exception as exc:
                row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}
                continue
            state = trainable_state_bytes(model)
            saved = saved_bytes(model, case, inputs)
            row[name] = {"saved_activation_mb": saved / 2**20, "trainable_state_mb": state / 2**20, "total_mb": (saved + state) / 2**20}
        results.append({"case": case.name, "note": case.note, "contenders": row})
        print(f"== {case.name} ({case.note})")
        for name, r in row.items():
            print(
                f"   {name:<36} "
                + (
                    r["error"]
                    if "error" in r
                    else f"{r['total_mb']:8.1f} MB (activations {r['saved_activation_mb']:.1f}, trainable state {r['trainable_state_mb']:.1f})"
                )
            )
    names = list(results[0]["contenders"])
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        cells = [("refuses" if "error" in c else f"{c['total_mb']:.0f} MB") for c in (r["contenders"][n] for n in names)]
        lines.append(f"| {r['case']} ({r['note']}) | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory_quick" if args.quick else "memory"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(
        "Training memory beyond the frozen weights: saved activations + gradients and AdamW state of trainable parameters (counted).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
