"""Training memory of LoRA against full fine-tuning, the BitFit floor and PEFT, and
what activation checkpointing saves on top.

    .venv/bin/python bench/memory.py [--quick] [--models resnet50,...]
    .venv/bin/python bench/memory.py --device cuda --dtype bf16   # CUDA peak

On CPU counted, not sampled, so the numbers repeat on any machine (to about 0.1 MB):
the bytes of the tensors autograd saves for the backward of one training step (unique
storages, through ``torch.autograd.graph.saved_tensors_hooks``; with checkpointing,
the inputs each recomputed block holds instead), and the bytes of the trainable state
(gradients and AdamW's two moments, 3 × 4 bytes per trainable fp32 parameter). The
frozen weights are the same for every contender and are not counted. With
``--device cuda``: the peak of allocated memory over one forward and backward, above
what the model and its inputs hold before it (``torch.cuda.max_memory_allocated``),
plus the same AdamW state. Checkpointing recomputes each block of the model
(`train_step.Case.blocks`: ResNet bottlenecks, ViT/Swin/wav2vec2/Conformer layers, GNN
convs) with ``torch.utils.checkpoint`` (non-reentrant).
Writes bench/results/memory[_cuda].{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from results_file import write_results  # noqa: E402
from train_step import RESULTS, Case, bitfit, cases, checkpoint_blocks, peft_lora  # noqa: E402

import lora_anywhere as la  # noqa: E402


def step_saved_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor], kept: list[tuple] | None = None) -> int:
    """Bytes of the unique storages autograd saves for the backward of ``loss_fn()``
    (then runs that backward), leaving out the model's frozen parameters; `kept`
    collects the inputs that checkpointed blocks hold instead."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    for args in kept or ():
        for t in args:
            if isinstance(t, torch.Tensor):
                pack(t)
    loss.backward()
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    return sum(n for ptr, n in storages.items() if ptr not in frozen)


def cuda_peak_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Peak allocated CUDA memory over a forward and backward, above what is held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_fn().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    return peak


def trainable_state_bytes(model: nn.Module) -> int:
    """Gradients and AdamW's two moments: 3 × 4 bytes per trainable fp32 parameter."""
    return 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def contenders(rank: int, with_peft: bool) -> dict[str, Callable[[nn.Module], nn.Module]]:
    makers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "full fine-tuning": lambda m: m,
        "BitFit floor": bitfit,
        "lora_anywhere": lambda m: la.apply(m, rank=rank),
        "lora_anywhere, LoRA-FA (freeze_a)": lambda m: la.apply(m, rank=rank, freeze_a=True),
        "lora_anywhere, weight route": lambda m: la.apply(m, rank=rank, route="weight"),
    }
    if with_peft:
        makers["PEFT LoRA"] = lambda m: peft_lora(m, rank)
    return makers


#: Contenders measured once more with every block checkpointed.
CHECKPOINTED = ("full fine-tuning", "lora_anywhere")


def measure(model: nn.Module, case: Case, inputs: tuple, device: str, dtype: torch.dtype | None, blocks: tuple[str, ...]) -> dict:
    kept: list[tuple] = []
    if blocks:
        checkpoint_blocks(model, blocks, kept.append)
    autocast = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # wav2vec2-base skips random layers in training (LayerDrop): the same ones for every contender
        with autocast:
            return case.loss(model(*inputs))

    state = trainable_state_bytes(model)
    if device == "cuda":
        loss().backward()  # warm-up: cuDNN/cuBLAS workspaces are not the model's
        model.zero_grad(set_to_none=True)
        used = cuda_peak_bytes(model, loss)
        return {"peak_mb": used / 2**20, "trainable_state_mb": state / 2**20, "total_mb": (used + state) / 2**20}
    saved = step_saved_bytes(model, loss, kept)
    return {"saved_activation_mb": saved / 2**20, "trainable_state_mb": state / 2**20, "total_mb": (saved + state) / 2**20}


def measure_case(case: Case, args: argparse.Namespace, dtype: torch.dtype | None) -> dict:
    torch.manual_seed(0)
    base = case.build()
    inputs = tuple(t.to(args.device) for t in case.inputs())
    row = {}
    runs = [(name, make, ()) for name, make in contenders(args.rank, not args.no_peft).items()]
    runs += [(f"{name} + checkpointing", contenders(args.rank, False)[name], case.blocks) for name in CHECKPOINTED if case.blocks]
    for name, make, blocks in runs:
        try:
            model = make(copy.deepcopy(base)).to(args.device).train()
            row[name] = measure(model, case, inputs, args.device, dtype, blocks)
        except Exception as exc:
            row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}
        finally:
            model = None
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return {"case": case.name, "note": case.note, "contenders": row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu-sizes", action="store_true", help="a GPU's batch sizes (see train_step.SIZES)")
    parser.add_argument("--models", default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: the step under bf16 autocast")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    results = []
    for case in cases("gpu" if args.gpu_sizes else args.quick):
        if args.models and case.name not in args.models.split(","):
            continue
        result = measure_case(case, args, dtype)
        results.append(result)
        print(f"== {case.name} ({case.note})", flush=True)
        for name, r in result["contenders"].items():
            print(f"   {name:<36} " + (r["error"] if "error" in r else f"{r['total_mb']:8.1f} MB"), flush=True)
    names = list(dict.fromkeys(n for r in results for n in r["contenders"]))
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        cells = [_cell(r["contenders"].get(n)) for n in names]
        lines.append(f"| {r['case']} ({r['note']}) | " + " | ".join(cells) + " |")
    stem = "memory" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    what = (
        "peak CUDA memory of a forward and backward above the model and inputs (measured)"
        if args.device == "cuda"
        else "saved activations (counted)"
    )
    meta = {"torch": torch.__version__, "device": args.device, "dtype": args.dtype, "rank": args.rank, "quick": args.quick}
    text = f"Training memory beyond the frozen weights: {what} + gradients and AdamW state of trainable parameters. {meta}\n\n"
    write_results(args.out, stem, meta, results, text + "\n".join(lines) + "\n")
    print("\n".join(lines))


def _cell(c: dict | None) -> str:
    if c is None:
        return "–"
    return "refuses" if "error" in c else f"{c['total_mb']:.0f} MB"


if __name__ == "__main__":
    main()
