"""How much arithmetic a train step does beyond the BitFit floor's, counted, not timed:
how much of a time ratio in `bench/train_step.py` is arithmetic, and how much is the
way it runs.

    .venv/bin/python bench/flops.py [--models resnet50,vit_small [--update]] [--rank 8] [--out DIR]

`torch.utils.flop_counter.FlopCounterMode` counts the floating-point operations of the
products (matmuls, convs and their gradients, attention) in the forward and the
backward of one step, at `bench/train_step.py`'s CPU sizes and in float32, for the same
contenders as there (`flop_counter` says what it counts beyond torch's own). It does
not count elementwise work (norms, activations, the optimizer). For a model whose step
is mostly products, LoRA ÷ floor here is about the least its time ratio can be as long
as LoRA runs this arithmetic: its rank-r products are skinny and run below the base
products' rate, not above it. A goal in the time table below a ratio here needs less
arithmetic, not faster kernels.

GCN, GAT and the LSTM tagger are left out: most of their step is message passing or an
LSTM's fused cell, which the counter does not count.

LoRA runs as `apply` plans it on this machine (route "auto"), and on each route forced
for every layer. lora_anywhere gives each of q, k and v of a fused qkv projection (timm's
ViT, Swin) its own rank-r pair: three times PEFT's rank on that layer. The last columns
hold the measured time ratio from the committed `bench/results/train_step.json`, where
it has the model, and measured ÷ counted: how far from its arithmetic the step runs.
Writes bench/results/flops.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
from results_file import merged_rows, write_results
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from train_step import Case, _patched, cases, route_makers

from lora_anywhere.rules import torch_nn

RESULTS = Path(__file__).parent / "results"
COLUMNS = (
    "full fine-tuning",
    "lora_anywhere",
    "lora_anywhere, weight route",
    "lora_anywhere, activation route",
    "PEFT LoRA",
)


#: Models whose step this count misses the main part of: message passing (sparse
#: gathers and scatters) and an LSTM's fused cell are not products it knows.
UNCOUNTED = {"gcn": "message passing", "gat": "message passing", "lstm_tagger": "the LSTM's own kernels"}


def conv_backward_flops(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: object, _stride: object,
                        _padding: object, _dilation: object, transposed: bool, _output_padding: object, _groups: int,
                        output_mask: list[bool], out_shape: object = None) -> int:  # fmt: skip
    """A conv's input and weight gradients each cost what its forward does. (torch's own
    formula for the weight gradient, up to at least 2.13, drops the groups and counts a
    depthwise conv's weight gradient `groups` times over: MobileNetV3's full
    fine-tuning came out at 13.7× the floor's arithmetic.)"""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _inplace_product_flops(_self_shape: list[int], m1_shape: list[int], m2_shape: list[int], *_: object, **__: object) -> int:
    """``t.addmm_(m1, m2)`` and ``t.baddbmm_(m1, m2)``: the product's, as for their
    out-of-place forms (torch's counter knows only those: the activation route adds
    s·B z into the base output in place, which it would not count)."""
    batch = m1_shape[0] if len(m1_shape) == 3 else 1
    rows, inner = m1_shape[-2:]
    return 2 * batch * rows * inner * m2_shape[-1]


def flop_counter() -> FlopCounterMode:
    """torch's counter, with the in-place products counted and grouped convs' weight
    gradients counted once."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten.convolution_backward: conv_backward_flops,
            aten.addmm_: _inplace_product_flops,
            aten.baddbmm_: _inplace_product_flops,
        },
    )


def step_flops(model: nn.Module, case: Case, inputs: tuple, run: Callable[..., object] | None = None) -> int:
    """The products' floating-point operations in one forward (through `run`, the model
    by default) and backward of `model`."""
    run = run or model
    model.train()
    run(*inputs)  # a first call forms what the layers keep (plans, caches)
    for p in model.parameters():
        p.grad = None
    counter = flop_counter()
    torch.manual_seed(0)  # wav2vec2-base skips random layers in training (LayerDrop): the same ones for every contender
    with counter:
        case.loss(run(*inputs)).backward()
    return counter.get_total_flops()


def _every_conv_call_on_activations(model: nn.Module) -> Callable[..., object]:
    """`model` with every conv call on its activations: on the CPU small conv calls train
    on W + ΔW otherwise (`SMALL_CONV_CALL`), whatever the route asked for."""
    return _patched(model, torch_nn, "SMALL_CONV_CALL", 0)


def run_case(case: Case, rank: int) -> dict:
    torch.manual_seed(0)
    base = case.build()
    inputs = case.inputs()
    rows: dict[str, dict] = {}
    for name, make in route_makers(rank).items():
        try:
            model = make(copy.deepcopy(base))
        except Exception as exc:  # PEFT refuses some layers
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
            continue
        run = _every_conv_call_on_activations(model) if name == "lora_anywhere, activation route" else model
        rows[name] = {"flops": step_flops(model, case, inputs, run)}
    floor = rows["BitFit floor"]["flops"]
    for row in rows.values():
        if "flops" in row:
            row["ratio_to_floor"] = row["flops"] / floor
    return {"case": case.name, "note": case.note, "contenders": rows}


def measured_ratios(path: Path) -> dict[str, float]:
    """LoRA's measured step ÷ floor per model in a train_step results file, if there is one."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["results"]
    return {r["case"]: r["contenders"]["lora_anywhere"]["ratio_to_floor"] for r in rows if "lora_anywhere" in r["contenders"]}


def markdown(results: list[dict], measured: dict[str, float]) -> str:
    lines = [
        "Products' floating-point operations of one train step (forward and backward), relative to the BitFit floor's "
        "(its count in GFLOP in its column); `bench/train_step.py`'s CPU sizes, float32. The last two columns: "
        "lora_anywhere's measured step ÷ floor in `bench/results/train_step.md`, and that ÷ its counted ratio.",
        "",
        "| model | BitFit floor | " + " | ".join(COLUMNS) + " | measured, lora_anywhere | measured ÷ counted |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for r in results:
        c = r["contenders"]
        cells = [f"{c[k]['ratio_to_floor']:.3f}×" if "flops" in c[k] else "refuses" for k in COLUMNS]
        seen = measured.get(r["case"])
        tail = [f"{seen:.2f}×", f"{seen / c['lora_anywhere']['ratio_to_floor']:.2f}"] if seen else ["–", "–"]
        lines.append(f"| {r['case']} ({r['note']}) | {c['BitFit floor']['flops'] / 1e9:.1f} | " + " | ".join(cells + tail) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [c.name for c in cases(False) if c.name not in UNCOUNTED]
    parser.add_argument("--models", default=",".join(names), help="comma-separated subset of: " + ", ".join(names))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--update", action="store_true", help="replace only these models' rows in the results of the same settings")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(names)
    if unknown:
        why = "; ".join(f"{name}: the count misses {UNCOUNTED[name]}" for name in sorted(unknown) if name in UNCOUNTED)
        parser.error(f"cannot count {sorted(unknown)}{' (' + why + ')' if why else ''}; choose from {names}")
    results = []
    for case in cases(False):
        if case.name in args.models.split(","):
            print(f"== {case.name}", flush=True)
            results.append(run_case(case, args.rank))
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(), "rank": args.rank}
    if args.update:
        results = merged_rows(args.out, "flops", meta, results)
    text = markdown(results, measured_ratios(RESULTS / "train_step.json"))
    write_results(args.out, "flops", meta, results, text)
    print(text)


if __name__ == "__main__":
    main()
