"""Train-step time of LoRA against full fine-tuning, the BitFit floor and PEFT.

    .venv/bin/python bench/train_step.py            # every model
    .venv/bin/python bench/train_step.py --quick    # fewer repeats, smaller models

Every contender is a copy of the same model in this one process; their steps are
interleaved (one step of each, round after round) so that drifting machine load hits
them alike, and the median step time is reported, relative to the BitFit floor: only
1-D parameters (biases, norms) train, so the backward runs through every layer but
computes no weight gradient — no adapter that trains inside every layer can be cheaper.
Writes bench/results/train_step.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

import lora_anywhere as la
from lora_anywhere.atomic import atomic_file

RESULTS = Path(__file__).parent / "results"


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    loss: Callable[[object], torch.Tensor]
    note: str = ""
    blocks: tuple[str, ...] = ()  # containers whose children activation checkpointing recomputes


def _classify(out: object) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return F.cross_entropy(logits.float().flatten(0, -2), torch.zeros(logits.flatten(0, -2).shape[0], dtype=torch.long))


def _graph(nodes: int, edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(nodes, 128, generator=g), torch.randint(0, nodes, (2, edges), generator=g)


def cases(quick: bool) -> list[Case]:
    import timm
    import torchaudio
    import torchvision
    from torch_geometric.nn.models import GAT, GCN

    px = 96 if quick else 160
    vit_px = 112 if quick else 224
    seconds = 0.5 if quick else 1.0
    nodes, edges = (5_000, 50_000) if quick else (20_000, 200_000)
    return [
        Case(
            "resnet50",
            lambda: torchvision.models.resnet50(num_classes=10),
            lambda: (torch.randn(8, 3, px, px),),
            _classify,
            f"{px} px, batch 8",
            ("layer1", "layer2", "layer3", "layer4"),
        ),
        Case(
            "mobilenet_v3_large",
            lambda: torchvision.models.mobilenet_v3_large(num_classes=10),
            lambda: (torch.randn(8, 3, px, px),),
            _classify,
            f"{px} px, batch 8",
            ("features",),
        ),
        Case(
            "vit_small",
            lambda: timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=vit_px),
            lambda: (torch.randn(8, 3, vit_px, vit_px),),
            _classify,
            f"{vit_px} px, batch 8",
            ("blocks",),
        ),
        Case(
            "swin_tiny",
            lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=vit_px),
            lambda: (torch.randn(4, 3, vit_px, vit_px),),
            _classify,
            f"{vit_px} px, batch 4",
            ("layers.0.blocks", "layers.1.blocks", "layers.2.blocks", "layers.3.blocks"),
        ),
        Case(
            "wav2vec2_base",
            lambda: torchaudio.models.wav2vec2_base(aux_num_out=10),
            lambda: (torch.randn(2, int(16000 * seconds)),),
            _classify,
            f"{seconds:g} s audio, batch 2",
            ("encoder.transformer.layers",),
        ),
        Case(
            "conformer",
            lambda: ConformerClassifier(),
            lambda: (torch.randn(4, 200, 80), torch.full((4,), 200)),
            _classify,
            "4 × 200 frames",
            ("encoder.conformer_layers",),
        ),
        Case(
            "gcn",
            lambda: GCN(128, 256, num_layers=3, out_channels=10),
            lambda: _graph(nodes, edges),
            _classify,
            f"{nodes // 1000}k nodes, {edges // 1000}k edges",
            ("convs",),
        ),
        Case(
            "gat",
            lambda: GAT(128, 64, num_layers=3, out_channels=10, heads=4),
            lambda: _graph(nodes, edges),
            _classify,
            f"{nodes // 1000}k nodes, {edges // 1000}k edges",
            ("convs",),
        ),
        Case(
            "lstm_tagger", lambda: LSTMTagger(), lambda: (torch.randint(0, 5000, (16, 64)),), _classify, "2-layer BiLSTM 256, 16×64 tokens"
        ),
    ]


class ConformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import torchaudio

        self.encoder = torchaudio.models.Conformer(input_dim=80, num_heads=4, ffn_dim=256, num_layers=4, depthwise_conv_kernel_size=31)
        self.head = nn.Linear(80, 10)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, lengths)[0].mean(1))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 128)
        self.lstm = nn.LSTM(128, 256, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0])


def checkpoint_blocks(model: nn.Module, blocks: tuple[str, ...], keep: Callable[[tuple], None] | None = None) -> nn.Module:
    """Recompute each child of the `blocks` containers in the backward
    (torch.utils.checkpoint, non-reentrant) instead of keeping its activations. The
    containers are found by name suffix, so a PEFT-wrapped model works too; `keep`
    sees the inputs each checkpointed child holds on to."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if keep is not None:
                keep(args)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    found = 0
    for name, module in model.named_modules():
        if any(name == b or name.endswith("." + b) for b in blocks):
            for child in module.children():
                child.forward = wrap(child.forward)
                found += 1
    if not found:
        raise ValueError(f"no block container {blocks} in {type(model).__name__}")
    return model


def bitfit(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    return model


def peft_lora(model: nn.Module, rank: int) -> nn.Module:
    import peft

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) and n]
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names))


@dataclass
class Contender:
    name: str
    model: nn.Module | None
    error: str | None = None
    times: list[float] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None


def contenders(case: Case, rank: int, with_peft: bool) -> list[Contender]:
    torch.manual_seed(0)
    base = case.build()
    makers: dict[str, Callable[[nn.Module], nn.Module]] = {
        "full fine-tuning": lambda m: m,
        "BitFit floor": bitfit,
        "lora_anywhere": lambda m: la.apply(m, rank=rank),
        "lora_anywhere, weight route": lambda m: la.apply(m, rank=rank, path="weight"),
    }
    if with_peft:
        makers["PEFT LoRA"] = lambda m: peft_lora(m, rank)
    out = []
    for name, make in makers.items():
        try:
            model = make(copy.deepcopy(base)).train()
            params = [p for p in model.parameters() if p.requires_grad]
            out.append(Contender(name, model, optimizer=torch.optim.AdamW(params, lr=1e-4)))
        except Exception as exc:  # PEFT refuses some layers: report, don't crash
            out.append(Contender(name, None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    return out


def step(c: Contender, case: Case, inputs: tuple) -> float:
    start = time.perf_counter()
    c.optimizer.zero_grad(set_to_none=True)
    loss = case.loss(c.model(*inputs))
    loss.backward()
    c.optimizer.step()
    return time.perf_counter() - start


def run_case(case: Case, rank: int, repeats: int, with_peft: bool) -> dict:
    all_contenders = contenders(case, rank, with_peft)
    live = [c for c in all_contenders if c.model is not None]
    torch.manual_seed(1)
    inputs = case.inputs()
    for c in live:  # warm-up
        for _ in range(2):
            step(c, case, inputs)
    for round_ in range(repeats):
        # Each round starts with the next contender, so none always runs right after
        # the same neighbour (big graph steps showed order effects of up to 25 %).
        for c in live[round_ % len(live) :] + live[: round_ % len(live)]:
            c.times.append(step(c, case, inputs))
    floor = statistics.median(next(c for c in live if c.name == "BitFit floor").times)
    rows = {}
    for c in all_contenders:
        if c.model is None:
            rows[c.name] = {"error": c.error}
            continue
        median = statistics.median(c.times)
        trainable = sum(p.numel() for p in c.model.parameters() if p.requires_grad)
        rows[c.name] = {"median_s": median, "ratio_to_floor": median / floor, "trainable_params": trainable}
    return {"case": case.name, "note": case.note, "rank": rank, "repeats": repeats, "contenders": rows}


@torch.no_grad()
def inference(case: Case, rank: int, repeats: int) -> dict:
    """Eval-mode forward of the base model, the adapted model unmerged, and merged,
    interleaved; and the time `apply` takes on a fresh copy (median of 3)."""
    torch.manual_seed(0)
    base = case.build().eval()
    applies = []
    for _ in range(3):
        fresh = copy.deepcopy(base)
        start = time.perf_counter()
        la.apply(fresh, rank=rank)
        applies.append(time.perf_counter() - start)
    unmerged = copy.deepcopy(fresh).eval()
    merged = la.merge(copy.deepcopy(fresh)).eval()
    inputs = case.inputs()
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    times: dict[str, list[float]] = {k: [] for k in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model(*inputs)
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base_s = statistics.median(times["base"])
    return {
        "apply_ms": 1000 * statistics.median(applies),
        **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()},
        "unmerged_ratio": statistics.median(times["unmerged"]) / base_s,
        "merged_ratio": statistics.median(times["merged"]) / base_s,
    }


def markdown(results: list[dict]) -> str:
    names = list(results[0]["contenders"])
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        cells = []
        for n in names:
            c = r["contenders"].get(n, {})
            cells.append(f"refuses ({c['error'][:60]})" if "error" in c else f"{c['ratio_to_floor']:.2f}× ({1000 * c['median_s']:.0f} ms)")
        lines.append(f"| {r['case']} ({r['note']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def inference_markdown(results: list[dict]) -> str:
    lines = ["| model | base forward | unmerged | merged | apply |", "|---|---|---|---|---|"]
    for r in results:
        i = r["inference"]
        lines.append(
            f"| {r['case']} | {i['base_ms']:.0f} ms | {i['unmerged_ratio']:.2f}× | {i['merged_ratio']:.2f}× | {i['apply_ms']:.0f} ms |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Bars of each contender's train step relative to the floor, one group per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [n for n in results[0]["contenders"] if n != "BitFit floor"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))]
        ys = [r["contenders"][name].get("ratio_to_floor", 0.0) for r in results]
        ax.bar(xs, ys, width, label=name)
        for x, r in zip(xs, results):
            if "error" in r["contenders"][name]:
                ax.text(x, 0.05, "refuses", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.1, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(results)), [r["case"] for r in results], rotation=20, ha="right")
    ax.set_ylabel("train step ÷ BitFit floor")
    ax.legend(fontsize=8, ncols=len(names))
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (a few minutes)")
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of: resnet50, mobilenet_v3_large, vit_small, swin_tiny, wav2vec2_base, conformer, gcn, gat, lstm_tagger",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON of the last run")
    args = parser.parse_args()
    stem = "train_step_quick" if args.quick else "train_step"
    if args.plot_only:
        plot(json.loads((args.out / f"{stem}.json").read_text())["results"], args.out / f"{stem}.png")
        return
    repeats = args.repeats or (5 if args.quick else 15)
    selected = [c for c in cases(args.quick) if not args.models or c.name in args.models.split(",")]
    results = []
    for case in selected:
        print(f"== {case.name} ({case.note})", flush=True)
        result = run_case(case, args.rank, repeats, with_peft=not args.no_peft)
        result["inference"] = inference(case, args.rank, repeats)
        for name, row in result["contenders"].items():
            print(
                f"   {name:<28} "
                + (
                    f"refuses: {row['error']}"
                    if "error" in row
                    else f"{row['ratio_to_floor']:.2f}× floor ({1000 * row['median_s']:.0f} ms)"
                ),
                flush=True,
            )
        results.append(result)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "quick": args.quick,
    }
    with atomic_file(args.out / f"{stem}.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    text = (
        f"Train step, median of {repeats} interleaved steps, relative to the BitFit floor. {meta}\n\n"
        + markdown(results)
        + "\n\nInference (eval, no grad), relative to the base model, and the time of `apply`:\n\n"
        + inference_markdown(results)
        + "\n"
    )
    with atomic_file(args.out / f"{stem}.md") as tmp:
        tmp.write_text(text)
    plot(results, args.out / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
