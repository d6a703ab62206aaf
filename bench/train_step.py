"""Train-step time of LoRA against full fine-tuning, the BitFit floor and PEFT.

    .venv/bin/python bench/train_step.py            # every model
    .venv/bin/python bench/train_step.py --quick    # fewer repeats, smaller models
    .venv/bin/python bench/train_step.py --compile  # also floor, full FT and LoRA under torch.compile
    .venv/bin/python bench/train_step.py --compile --compiled-only --no-inference --models gat --out DIR   # those alone
    .venv/bin/python bench/train_step.py --device cuda --dtype bf16   # on a GPU, bf16 autocast
    .venv/bin/python bench/train_step.py --models gcn,gat --update   # rerun some rows of the table
    .venv/bin/python bench/train_step.py --one-block --out DIR   # also LoRA before `kernels.rank_blocks`
    .venv/bin/python bench/train_step.py --linear-width 128 --out DIR   # also LoRA planned with another LINEAR_WIDTH
    .venv/bin/python bench/train_step.py --native-depthwise --out DIR   # also LoRA with torch's depthwise weight gradient
    .venv/bin/python bench/train_step.py --inference-only --batch 1   # unmerged inference one sample per call (serving)

Every contender is a copy of the same model in this one process; their steps are
interleaved (one step of each, round after round) so that drifting machine load hits
them alike, and the median step time is reported, relative to the BitFit floor: only
1-D parameters (biases, norms) train, so the backward runs through every layer but
computes no weight gradient — no adapter that trains inside every layer can be cheaper.
The steps are split into ``--runs`` consecutive groups; the spread is the range of the
groups' medians. Writes bench/results/train_step[_cuda][_quick].{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, cast

import torch
from results_file import merged_rows, write_results
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
    return F.cross_entropy(
        logits.float().flatten(0, -2), torch.zeros(logits.flatten(0, -2).shape[0], dtype=torch.long, device=logits.device)
    )


def _graph(nodes: int, edges: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(nodes, 128, generator=g), torch.randint(0, nodes, (2, edges), generator=g)


#: Input sizes: "quick" (a few minutes on CPU), "full" (the CPU tables), "gpu" (a GPU's
#: batch: 64 images at 224 px, 16 × 1 s of audio, 200k-node graphs).
SIZES = {
    "quick": dict(px=96, vit_px=112, seconds=0.5, nodes=5_000, edges=50_000, batch=8, audio=2),
    "full": dict(px=160, vit_px=224, seconds=1.0, nodes=20_000, edges=200_000, batch=8, audio=2),
    "gpu": dict(px=224, vit_px=224, seconds=1.0, nodes=200_000, edges=2_000_000, batch=64, audio=16),
}


def cases(quick: bool | str, batch_size: int | None = None) -> list[Case]:
    """The benchmark models at the sizes `quick` names (True: "quick", False: "full"),
    with `batch_size` samples per call in place of the size's where given (Swin-T takes
    half, at least one; the graphs stay whole)."""
    import timm
    import torchaudio
    import torchvision
    from torch_geometric.nn.models import GAT, GCN

    size = SIZES[quick if isinstance(quick, str) else ("quick" if quick else "full")]
    px, vit_px, seconds, nodes, edges, batch, audio = (size[k] for k in ("px", "vit_px", "seconds", "nodes", "edges", "batch", "audio"))
    utterances, sentences = 4, 16
    if batch_size is not None:
        batch = audio = utterances = sentences = batch_size
    windows = max(1, batch // 2)
    return [
        Case(
            "resnet50",
            lambda: torchvision.models.resnet50(num_classes=10),
            lambda: (torch.randn(batch, 3, px, px),),
            _classify,
            f"{px} px, batch {batch}",
            ("layer1", "layer2", "layer3", "layer4"),
        ),
        Case(
            "mobilenet_v3_large",
            lambda: torchvision.models.mobilenet_v3_large(num_classes=10),
            lambda: (torch.randn(batch, 3, px, px),),
            _classify,
            f"{px} px, batch {batch}",
            ("features",),
        ),
        Case(
            "convnext_tiny",
            lambda: torchvision.models.convnext_tiny(num_classes=10),
            lambda: (torch.randn(batch, 3, px, px),),
            _classify,
            f"{px} px, batch {batch}",
            ("features",),
        ),
        Case(
            "vit_small",
            lambda: timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=vit_px),
            lambda: (torch.randn(batch, 3, vit_px, vit_px),),
            _classify,
            f"{vit_px} px, batch {batch}",
            ("blocks",),
        ),
        Case(
            "swin_tiny",
            lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=vit_px),
            lambda: (torch.randn(windows, 3, vit_px, vit_px),),
            _classify,
            f"{vit_px} px, batch {windows}",
            ("layers.0.blocks", "layers.1.blocks", "layers.2.blocks", "layers.3.blocks"),
        ),
        Case(
            "wav2vec2_base",
            lambda: torchaudio.models.wav2vec2_base(aux_num_out=10),
            lambda: (torch.randn(audio, int(16000 * seconds)),),
            _classify,
            f"{seconds:g} s audio, batch {audio}",
            ("encoder.transformer.layers",),
        ),
        Case(
            "conformer",
            lambda: ConformerClassifier(),
            lambda: (torch.randn(utterances, 200, 80), torch.full((utterances,), 200)),
            _classify,
            f"{utterances} × 200 frames",
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
            "lstm_tagger",
            lambda: LSTMTagger(),
            lambda: (torch.randint(0, 5000, (sentences, 64)),),
            _classify,
            f"2-layer BiLSTM 256, {sentences}×64 tokens",
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


def _patched(fn: Callable[..., object], module: object, name: str, value: object) -> Callable[..., object]:
    """`fn` with ``module.name`` set to `value` during each call: a choice of the library
    switched for one contender, in its forward (the backward follows the forward's
    choices) or in `apply` (which plans the routes)."""

    def run(*args: object) -> object:
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn(*args)
        finally:
            setattr(module, name, saved)

    return run


def _forced_activation(model: nn.Module) -> Callable[..., object]:
    """Activation-route layers on their activations at any size (no per-call switch to W + ΔW)."""
    from lora_anywhere.rules import torch_nn

    return _patched(model, torch_nn, "SMALL_CALL_OFF_CPU", 0)


def _one_block(model: nn.Module) -> Callable[..., object]:
    """Every fused Linear call forming its rank-r products in one block of rows, as before
    `kernels.rank_blocks`."""
    from lora_anywhere import kernels

    return _patched(model, kernels, "rank_blocks", lambda *_: 1)


def _native_depthwise(model: nn.Module) -> Callable[..., object]:
    """Depthwise convs' weight gradients formed by torch's own conv, as before `lora_anywhere.depthwise`."""
    from lora_anywhere import depthwise

    return _patched(model, depthwise, "applies", lambda *_: False)


def _planned_with_linear_width(width: int, rank: int) -> Callable[[nn.Module], nn.Module]:
    """`apply` with `rules.torch_nn.LINEAR_WIDTH` set to `width` while it plans the routes."""
    from lora_anywhere.rules import torch_nn

    # `apply` returns the model it adapted: the switched call does too.
    return cast(Callable[[nn.Module], nn.Module], _patched(lambda model: la.apply(model, rank=rank), torch_nn, "LINEAR_WIDTH", width))


def bitfit(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    return model


def peft_lora(model: nn.Module, rank: int) -> nn.Module:
    import peft

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) and n]
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names))


def route_makers(rank: int) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The floor, full fine-tuning, LoRA as `apply` plans it and on each route forced for
    every layer, and PEFT: the contenders that `bench/op_count.py` and `bench/flops.py`
    count, each a function that makes one from a copy of the base model."""
    return {
        "BitFit floor": bitfit,
        "full fine-tuning": lambda m: m,
        "lora_anywhere": lambda m: la.apply(m, rank=rank),
        "lora_anywhere, weight route": lambda m: la.apply(m, rank=rank, route="weight"),
        "lora_anywhere, activation route": lambda m: la.apply(m, rank=rank, route="activation"),
        "PEFT LoRA": lambda m: peft_lora(m, rank),
    }


@dataclass
class Contender:
    name: str
    model: nn.Module | None
    error: str | None = None
    times: list[float] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    run: Callable[..., object] | None = None  # the model, or its compiled form


@dataclass
class Setup:
    """Where and how the steps run."""

    device: str = "cpu"
    dtype: str = "fp32"
    compile: bool = False
    one_block: bool = False  # also LoRA with its rank-r products in one block of rows
    linear_width: int | None = None  # also LoRA planned with this `LINEAR_WIDTH`
    native_depthwise: bool = False  # also LoRA with torch's own depthwise weight gradients
    compiled_only: bool = False  # with compile: only the compiled contenders (fewer models in memory at once)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device, dtype=torch.bfloat16) if self.dtype == "bf16" else contextlib.nullcontext()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


#: The contenders that also run compiled with --compile.
COMPILED = ("BitFit floor", "full fine-tuning", "lora_anywhere")


def contenders(case: Case, rank: int, with_peft: bool, setup: Setup | None = None) -> list[Contender]:
    setup = setup or Setup()
    torch.manual_seed(0)
    base = case.build()
    routes = route_makers(rank)
    shown = ("full fine-tuning", "BitFit floor", "lora_anywhere", "lora_anywhere, weight route")
    makers = {name: routes[name] for name in shown}
    if setup.device != "cpu":
        # A GPU trains small calls of activation-route layers on W + ΔW
        # (`SMALL_CALL_OFF_CPU`): the forced activation route shows what that choice gains.
        makers["lora_anywhere, activation route"] = routes["lora_anywhere, activation route"]
    if setup.one_block:
        makers["lora_anywhere, one block"] = routes["lora_anywhere"]
    if setup.native_depthwise:
        makers["lora_anywhere, native depthwise"] = routes["lora_anywhere"]
    if setup.linear_width is not None:
        makers[f"lora_anywhere, Linear width {setup.linear_width}"] = _planned_with_linear_width(setup.linear_width, rank)
    if with_peft:
        makers["PEFT LoRA"] = routes["PEFT LoRA"]
    plan = [] if setup.compile and setup.compiled_only else [(name, make, False) for name, make in makers.items()]
    if setup.compile:
        plan += [(f"{name}, compiled", makers[name], True) for name in COMPILED]
    out = []
    for name, make, compiled in plan:
        try:
            model = make(copy.deepcopy(base)).to(setup.device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            wrap = {
                "lora_anywhere, activation route": _forced_activation,
                "lora_anywhere, one block": _one_block,
                "lora_anywhere, native depthwise": _native_depthwise,
            }.get(name)
            run = torch.compile(model) if compiled else (wrap(model) if wrap else model)
            out.append(Contender(name, model, optimizer=torch.optim.AdamW(params, lr=1e-4), run=run))
        except Exception as exc:  # PEFT refuses some layers: report, don't crash
            out.append(Contender(name, None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    return out


def step(c: Contender, case: Case, inputs: tuple, setup: Setup | None = None) -> float:
    setup = setup or Setup()
    setup.sync()
    start = time.perf_counter()
    c.optimizer.zero_grad(set_to_none=True)
    with setup.autocast():
        loss = case.loss(c.run(*inputs))
    loss.backward()
    c.optimizer.step()
    setup.sync()
    return time.perf_counter() - start


def spread(times: list[float], runs: int) -> tuple[float, float]:
    """The lowest and highest median of `runs` consecutive groups of the steps."""
    size = max(1, len(times) // runs)
    medians = [statistics.median(times[i : i + size]) for i in range(0, size * runs, size) if times[i : i + size]]
    return min(medians), max(medians)


def run_case(case: Case, rank: int, repeats: int, with_peft: bool, setup: Setup | None = None, runs: int = 3) -> dict:
    setup = setup or Setup()
    all_contenders = contenders(case, rank, with_peft, setup)
    live = [c for c in all_contenders if c.model is not None]
    torch.manual_seed(1)
    inputs = tuple(t.to(setup.device) for t in case.inputs())
    for c in list(live):  # warm-up (and compilation)
        try:
            for _ in range(2):
                step(c, case, inputs, setup)
        except Exception as exc:  # a compiler that fails on this model: report it
            c.model, c.error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            live.remove(c)
    for round_ in range(repeats if live else 0):
        # Each round starts with the next contender, so none always runs right after
        # the same neighbour (big graph steps showed order effects of up to 25 %).
        for c in live[round_ % len(live) :] + live[: round_ % len(live)]:
            # The same random draws for every contender in a round: wav2vec2-base skips
            # random layers in training (LayerDrop), about 1 in 10, so unpaired draws
            # would move one contender's step against another's by that much.
            torch.manual_seed(round_)
            c.times.append(step(c, case, inputs, setup))
    medians = {c.name: statistics.median(c.times) for c in live}
    rows = {}
    for c in all_contenders:
        if c.model is None:
            rows[c.name] = {"error": c.error}
            continue
        floor_name = "BitFit floor, compiled" if c.name.endswith(", compiled") else "BitFit floor"
        full_name = "full fine-tuning, compiled" if c.name.endswith(", compiled") else "full fine-tuning"
        floor, full = medians.get(floor_name), medians.get(full_name)
        low, high = spread(c.times, runs)
        median = medians[c.name]
        trainable = sum(p.numel() for p in c.model.parameters() if p.requires_grad)
        rows[c.name] = {
            "median_s": median,
            "ratio_to_floor": median / floor if floor else None,
            "floor_spread": [low / floor, high / floor] if floor else None,
            "ratio_to_full": median / full if full else None,
            "ratio_to_peft": median / medians["PEFT LoRA"] if "PEFT LoRA" in medians else None,
            "trainable_params": trainable,
        }
    return {"case": case.name, "note": case.note, "rank": rank, "repeats": repeats, "runs": runs, "contenders": rows}


@torch.no_grad()
def inference(case: Case, rank: int, repeats: int, setup: Setup | None = None, runs: int = 3) -> dict:
    """Eval-mode forward of the base model, the adapted model unmerged, and merged,
    interleaved (and each compiled, with --compile), relative to the base with the range
    of the medians of `runs` groups of rounds; and the time `apply` takes on a fresh copy
    (median of 3)."""
    setup = setup or Setup()
    torch.manual_seed(0)
    base = case.build().eval().to(setup.device)
    applies = []
    for _ in range(3):
        fresh = copy.deepcopy(base)
        start = time.perf_counter()
        la.apply(fresh, rank=rank)
        applies.append(time.perf_counter() - start)
    unmerged = copy.deepcopy(fresh).eval()
    merged = la.merge(copy.deepcopy(fresh)).eval()
    inputs = tuple(t.to(setup.device) for t in case.inputs())
    models: dict[str, Callable] = {"base": base, "unmerged": unmerged, "merged": merged}
    if setup.compile:
        models.update({f"{k} compiled": torch.compile(m) for k, m in list(models.items())})
    times: dict[str, list[float]] = {k: [] for k in models}
    with setup.autocast():
        for round_ in range(repeats + 2):
            for name, model in models.items():
                setup.sync()
                start = time.perf_counter()
                model(*inputs)
                setup.sync()
                if round_ > 1:  # the first rounds warm up (and compile)
                    times[name].append(time.perf_counter() - start)
    out = {"apply_ms": 1000 * statistics.median(applies), **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}
    for kind in ("", " compiled"):
        if f"base{kind}" in times:
            base_s = statistics.median(times[f"base{kind}"])
            for k in ("unmerged", "merged"):
                key = f"{k}{kind.replace(' ', '_')}"
                out[f"{key}_ratio"] = statistics.median(times[f"{k}{kind}"]) / base_s
                out[f"{key}_range"] = ratio_range(times[f"{k}{kind}"], times[f"base{kind}"], runs)
    return out


def ratio_range(times: list[float], base: list[float], runs: int) -> tuple[float, float]:
    """The lowest and highest median of `runs` consecutive groups of rounds, relative to
    the base's median (as the train step's range is to the floor's): the ratio of the
    medians always lies inside it."""
    low, high = spread(times, runs)
    base_s = statistics.median(base)
    return low / base_s, high / base_s


def _cell(c: dict) -> str:
    if "error" in c:
        return f"refuses ({c['error'][:60]})"
    low, high = c["floor_spread"]
    return f"{c['ratio_to_floor']:.2f}× ({low:.2f}–{high:.2f}), {1000 * c['median_s']:.0f} ms"


def markdown(results: list[dict]) -> str:
    names = list(dict.fromkeys(n for r in results for n in r["contenders"]))
    lines = ["| model | " + " | ".join(names) + " | LoRA ÷ full FT | LoRA ÷ PEFT |", "|---|" + "---|" * (len(names) + 2)]
    for r in results:
        cells = [_cell(r["contenders"][n]) if n in r["contenders"] else "–" for n in names]
        lora = r["contenders"].get("lora_anywhere", {})
        compiled = r["contenders"].get("lora_anywhere, compiled", {}).get("ratio_to_full")
        full = f"{lora['ratio_to_full']:.2f}" if lora.get("ratio_to_full") else "–"
        if compiled:
            full = f"{full} (compiled {compiled:.2f})" if lora.get("ratio_to_full") else f"compiled {compiled:.2f}"
        peft_ran = "PEFT LoRA" in r["contenders"]
        peft = f"{lora['ratio_to_peft']:.2f}" if lora.get("ratio_to_peft") else ("PEFT refuses" if peft_ran else "not run")
        lines.append(f"| {r['case']} ({r['note']}) | " + " | ".join(cells) + f" | {full} | {peft} |")
    return "\n".join(lines)


def inference_markdown(results: list[dict]) -> str:
    compiled = "unmerged_compiled_ratio" in results[0]["inference"]
    extra = " unmerged, compiled | merged, compiled |" if compiled else ""
    lines = ["| model | base forward | unmerged | merged | apply |" + extra, "|---|---|---|---|---|" + ("---|---|" if compiled else "")]
    for r in results:
        i = r["inference"]
        cells = [_ratio_cell(i, k) for k in ("unmerged", "merged", *(("unmerged_compiled", "merged_compiled") if compiled else ()))]
        row = f"| {r['case']} | {i['base_ms']:.0f} ms | {cells[0]} | {cells[1]} | {i['apply_ms']:.0f} ms |"
        if compiled:
            row += f" {cells[2]} | {cells[3]} |"
        lines.append(row)
    return "\n".join(lines)


def _ratio_cell(inference_result: dict, key: str) -> str:
    spread_ = inference_result.get(f"{key}_range")  # absent in results written before it was measured
    cell = f"{inference_result[f'{key}_ratio']:.2f}×"
    return cell + (f" ({spread_[0]:.2f}–{spread_[1]:.2f})" if spread_ else "")


def plot(results: list[dict], path: Path) -> None:
    """Bars of each contender's train step relative to the floor, one group per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [n for n in dict.fromkeys(n for r in results for n in r["contenders"]) if not n.startswith("BitFit floor")]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))]
        ys = [r["contenders"].get(name, {}).get("ratio_to_floor") or 0.0 for r in results]
        ax.bar(xs, ys, width, label=name)
        for x, r in zip(xs, results):
            if "error" in r["contenders"].get(name, {}):
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


#: Compilations dynamo allows per function before it runs that function uncompiled.
RECOMPILE_LIMIT = 64


def allow_every_compiled_contender() -> None:
    """Lift dynamo's recompile limit (8 per function) for the contenders compiled in
    this one process. A model with graph breaks (PyG's GATConv: `remove_self_loops`)
    compiles its layer's forward once per layer shape and class; three compiled copies
    of GAT reached the limit, and the copy compiled last (LoRA) then ran its layers
    uncompiled: compiled LoRA took 1.13-1.27× compiled full fine-tuning's step, and
    1.01× with the limit lifted. One model in its own process needs no more than the
    default."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)


def _batch_suffix(args: argparse.Namespace) -> str:
    return "" if args.batch is None else f"_batch{args.batch}"


def inference_only(selected: list[Case], args: argparse.Namespace, repeats: int, setup: Setup) -> None:
    results = []
    for case in selected:
        print(f"== {case.name} ({case.note})", flush=True)
        results.append({"case": case.name, "note": case.note, "inference": inference(case, args.rank, repeats, setup, args.runs)})
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "runs": args.runs,
        **({"batch": args.batch} if args.batch is not None else {}),
    }
    text = (
        f"Inference (eval, no grad): median of {repeats} interleaved rounds relative to the base model's median, with the "
        f"range of the medians of {args.runs} groups of rounds, and the time of `apply`. {meta}\n\n" + inference_markdown(results) + "\n"
    )
    stem = "inference" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "") + _batch_suffix(args)
    write_results(args.out, stem, meta, results, text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (a few minutes)")
    parser.add_argument("--gpu-sizes", action="store_true", help="a GPU's batch sizes (64 images at 224 px, 200k-node graphs)")
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of: resnet50, mobilenet_v3_large, convnext_tiny, vit_small, swin_tiny, wav2vec2_base, conformer, gcn, gat, lstm_tagger",
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON of the last run")
    parser.add_argument("--runs", type=int, default=3, help="groups of steps whose medians give the spread")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: steps under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also the floor, full fine-tuning and LoRA under torch.compile")
    parser.add_argument("--compiled-only", action="store_true", help="with --compile: only the compiled contenders")
    parser.add_argument(
        "--one-block", action="store_true", help="also LoRA with its Linears' rank-r products in one block of rows (as before rank_blocks)"
    )
    parser.add_argument(
        "--linear-width", type=int, default=None, help="also LoRA whose routes are planned with this LINEAR_WIDTH (an A/B of the width)"
    )
    parser.add_argument(
        "--native-depthwise",
        action="store_true",
        help="also LoRA with its depthwise convs' weight gradients formed by torch's own conv (as before lora_anywhere.depthwise)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="samples per call of the image, audio and text models (serving: 1); the graphs stay whole"
    )
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--inference-only", action="store_true", help="only the inference table (bench/results/inference.md)")
    parser.add_argument(
        "--update", action="store_true", help="replace only these models' rows in the results of the same settings (and --repeats)"
    )
    args = parser.parse_args()
    if args.compiled_only and not args.compile:
        parser.error("--compiled-only needs --compile")
    setup = Setup(args.device, args.dtype, args.compile, args.one_block, args.linear_width, args.native_depthwise, args.compiled_only)
    if args.compile:
        allow_every_compiled_contender()
    stem = "train_step" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "") + _batch_suffix(args)
    if args.plot_only:
        plot(json.loads((args.out / f"{stem}.json").read_text())["results"], args.out / f"{stem}.png")
        return
    repeats = args.repeats or (5 if args.quick else 15)
    selected = [
        c for c in cases("gpu" if args.gpu_sizes else args.quick, args.batch) if not args.models or c.name in args.models.split(",")
    ]
    if args.inference_only:
        inference_only(selected, args, repeats, setup)
        return
    results = []
    for case in selected:
        print(f"== {case.name} ({case.note})", flush=True)
        result = run_case(case, args.rank, repeats, not args.no_peft, setup, args.runs)
        if not args.no_inference:
            result["inference"] = inference(case, args.rank, repeats, setup, args.runs)
        for name, row in result["contenders"].items():
            print(f"   {name:<36} " + (f"refuses: {row['error']}" if "error" in row else _cell(row)), flush=True)
        results.append(result)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        **({"one_block": True} if args.one_block else {}),
        **({"linear_width": args.linear_width} if args.linear_width is not None else {}),
        **({"native_depthwise": True} if args.native_depthwise else {}),
        **({"compiled_only": True} if args.compiled_only else {}),
        **({"batch": args.batch} if args.batch is not None else {}),
        "runs": args.runs,
    }
    if args.update:
        results = merged_rows(args.out, stem, meta, results)
    text = (
        f"Train step, median of {repeats} interleaved steps relative to the BitFit floor (compiled ones: to the compiled floor), "
        f"with the range of the medians of {args.runs} groups of steps. {meta}\n\n"
        + markdown(results)
        + (
            ""
            if args.no_inference
            else "\n\nInference (eval, no grad), relative to the base model (range: medians of groups of rounds), and the time of "
            "`apply`:\n\n" + inference_markdown(results)
        )
        + "\n"
    )
    write_results(args.out, stem, meta, results, text)
    plot(results, args.out / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
