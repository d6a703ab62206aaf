"""How many tensor operations a train step and an inference call dispatch: a count that
does not depend on the machine, where a GPU's step time does when its kernels finish
faster than the host issues them (the GPU run of #16: LoRA 1.3–1.8× full fine-tuning's
step although its extra arithmetic is a few percent).

    .venv/bin/python bench/op_count.py [--models resnet50,vit_small [--update]] [--out DIR]

Each operation that reaches a kernel counts once (views, which launch none, and the
optimizer's reads of its CPU step counters are not counted), in the forward, the
backward and AdamW's step (foreach, as on a GPU), under bf16 autocast as `bench/gpu.sh`
runs; the models and inputs are `bench/train_step.py`'s quick sizes. LoRA runs on each
route for every layer: on a GPU, `route="auto"` trains these models' calls on the weight
route (`SMALL_CALL_OFF_CPU`), so the weight route's column is what a GPU runs. Per
adapted layer: (contender − BitFit floor) ÷ the adapted layers. A Linear's rank-r
products run in one block of rows, as on a GPU (`kernels.rank_blocks`). Inference counts the
second eval call without gradients of the unmerged model (the first forms what the
layers keep). Writes bench/results/op_count.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import copy
import platform
import sys
from pathlib import Path

import torch
from results_file import merged_rows, write_results
from torch import nn
from train_step import Case, cases, route_makers

import lora_anywhere as la
from lora_anywhere import kernels
from lora_anywhere.rules import torch_nn
from lora_anywhere.testing import count_ops

RESULTS = Path(__file__).parent / "results"


def train_ops(model: nn.Module, case: Case, inputs: tuple) -> collections.Counter[str]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = case.loss(model(*inputs))
        loss.backward()
        opt.step()

    step()  # AdamW's state is created at its first step
    return count_ops(step)


def inference_ops(model: nn.Module, inputs: tuple) -> collections.Counter[str]:
    model.eval()

    def call() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(*inputs)

    call()
    return count_ops(call)


def adapted_layers(model: nn.Module) -> int:
    return len({row.layer for row in la.summary(model).rows})


def run_case(case: Case, rank: int) -> dict:
    torch.manual_seed(0)
    base = case.build()
    inputs = case.inputs()
    # LoRA as planned: its inference is counted below; its train step, route by route.
    makers = {name: make for name, make in route_makers(rank).items() if name != "lora_anywhere"}
    rows: dict[str, dict] = {}
    layers = None
    for name, make in makers.items():
        try:
            model = make(copy.deepcopy(base)).train()
        except Exception as exc:  # PEFT refuses some layers
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
            continue
        if name == "lora_anywhere, weight route":
            layers = adapted_layers(model)
        train = train_ops(model, case, inputs)
        rows[name] = {"train": sum(train.values()), "train_by_op": dict(train.most_common())}
        if name in ("BitFit floor", "PEFT LoRA"):
            rows[name]["inference"] = sum(inference_ops(model, inputs).values())
    rows["lora_anywhere"] = {"inference": sum(inference_ops(la.apply(copy.deepcopy(base), rank=rank), inputs).values())}
    floor = rows["BitFit floor"]
    for row in rows.values():
        if "train" in row and layers:
            row["train_per_layer"] = (row["train"] - floor["train"]) / layers
        if "inference" in row and layers:
            row["inference_per_layer"] = (row["inference"] - floor["inference"]) / layers
    return {"case": case.name, "adapted_layers": layers, "contenders": rows}


#: The models `bench/serving.py` serves, and how many adapters share a batch there.
SERVING_MODELS, SERVED_ADAPTERS = ("vit_small", "resnet50"), 8


def serving_ops(case: Case, rank: int) -> dict:
    """One no-grad `per_sample` pass over a batch of `SERVED_ADAPTERS` adapters, one per
    sample, against the base model's pass: operations beyond it, per adapted layer."""
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    base = sum(inference_ops(model, inputs).values())
    names = [f"a{i}" for i in range(SERVED_ADAPTERS)]
    for name in names:
        la.apply(model, rank=rank, name=name)
    samples = [names[i % len(names)] for i in range(inputs[0].shape[0])]

    def call() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), la.per_sample(model, samples):
            model(*inputs)

    call()
    served = sum(count_ops(call).values())
    return {"base": base, "per_sample": served, "per_layer": (served - base) / adapted_layers(model), "adapters": SERVED_ADAPTERS}


COLUMNS = ("full fine-tuning", "lora_anywhere, weight route", "lora_anywhere, activation route", "PEFT LoRA")


def markdown(results: list[dict]) -> str:
    lines = [
        "Operations per train step beyond the BitFit floor's, per adapted layer (the floor's whole count in its column).",
        "",
        "| model | adapted layers | BitFit floor | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        c = r["contenders"]
        cells = [f"+{c[k]['train_per_layer']:.1f}" if "train" in c[k] else "refuses" for k in COLUMNS]
        lines.append(f"| {r['case']} | {r['adapted_layers']} | {c['BitFit floor']['train']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Operations per no-grad inference call beyond the base model's, per adapted layer (unmerged).",
        "",
        "| model | base | lora_anywhere | PEFT LoRA |",
        "|---|---|---|---|",
    ]
    for r in results:
        c = r["contenders"]
        cells = [f"+{c[k]['inference_per_layer']:.1f}" if "inference" in c[k] else "refuses" for k in ("lora_anywhere", "PEFT LoRA")]
        lines.append(f"| {r['case']} | {c['BitFit floor']['inference']} | " + " | ".join(cells) + " |")
    served = [r for r in results if "serving" in r]
    if served:
        lines += [
            "",
            f"Operations of one no-grad `per_sample` pass with {SERVED_ADAPTERS} adapters in the batch (entering the context included), "
            "and beyond the base model's pass per adapted layer.",
            "",
            "| model | base | per_sample | beyond the base, per layer |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['case']} | {r['serving']['base']} | {r['serving']['per_sample']} | +{r['serving']['per_layer']:.1f} |" for r in served
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v3_large,vit_small,swin_tiny,wav2vec2_base,conformer,gcn,gat")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--update", action="store_true", help="replace only these models' rows in the results of the same settings")
    args = parser.parse_args()
    torch_nn.SMALL_CONV_CALL = 0  # each route as forced, not the CPU's per-call choice
    # A Linear's rank-r products in one block of rows, as on a GPU (on the CPU they run
    # in one block per thread, whose partial sums add an op per product).
    kernels.rank_blocks = lambda *_: 1
    results = []
    for case in cases(True):
        if case.name in args.models.split(","):
            print(f"== {case.name}", flush=True)
            result = run_case(case, args.rank)
            if case.name in SERVING_MODELS:
                result["serving"] = serving_ops(case, args.rank)
            results.append(result)
    meta = {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(), "rank": args.rank}
    if args.update:
        results = merged_rows(args.out, "op_count", meta, results)
    text = markdown(results)
    write_results(args.out, "op_count", meta, results, text)
    print(text)


if __name__ == "__main__":
    main()
