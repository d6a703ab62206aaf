"""The LoRA methods side by side on the demo's tasks: accuracy, parameters, memory.

    .venv/bin/python bench/methods.py            # 3 seeds, the demo's full budget
    .venv/bin/python bench/methods.py --quick    # 1 seed, the demo's --fast data and epochs

For each domain of `lora-anywhere demo` (vision, graph, speech, text) the base model
is pretrained on task A exactly as the demo does, then adapted to task B with the
demo's LoRA budget (rank, targets, trainable modules, epochs, batch size) and
each method: plain LoRA, LoRA-FA (``freeze_a=True``), PiSSA (``init="svd"``), DoRA
(``dora=True``) and rsLoRA (``rslora=True``); head-only tuning and full fine-tuning
(the plain model) are the references. Every method trains at the rates the demo
was tuned to by hand before the Trainer had measured defaults (`RATES`: one for the
LoRA methods, one for each reference, per domain), with 10% warmup, so these results
stay comparable run to run; bench/quality.py compares the methods at the Trainer's
defaults and at each one's best rate of a grid. Seed s draws the new head and the
adapters under ``torch.manual_seed(1 + s)`` and gives the trainer seed s, so seed 0
is the demo's own run. Reported per method: test accuracy and final validation loss
(mean and spread over the seeds), trainable parameters, and the training memory of
one step on a demo batch, counted as bench/memory.py counts it (the bytes autograd
saves for the backward + 12 bytes of gradient and AdamW state per trainable
parameter; the frozen weights are left out). Writes bench/results/methods.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from memory import step_saved_bytes, trainable_state_bytes  # noqa: E402
from results_file import write_results  # noqa: E402
from train_step import RESULTS  # noqa: E402

import lora_anywhere as la  # noqa: E402
from lora_anywhere.cli.demo import DOMAINS  # noqa: E402
from lora_anywhere.cli.demo.common import FULL, HEAD, LORA, Data, Domain, count_trainable, fit, head_only  # noqa: E402
from lora_anywhere.training.tasks import LoaderSpec, get_task  # noqa: E402
from lora_anywhere.training.trainer import Trainer  # noqa: E402

#: The LoRA variants, as keyword arguments of `apply` on top of the demo's.
VARIANTS: dict[str, dict[str, Any]] = {
    "LoRA": {},
    "LoRA-FA (freeze_a)": {"freeze_a": True},
    "PiSSA (init=svd)": {"init": "svd"},
    "DoRA (dora)": {"dora": True},
    "rsLoRA (rslora)": {"rslora": True},
}
REFERENCES = {"head only": HEAD, "full FT": FULL}
METHODS = (*VARIANTS, *REFERENCES)
#: The demo's hand-tuned rates from before the Trainer's measured defaults, per domain:
#: the LoRA methods, head-only tuning, full fine-tuning.
RATES = {
    "vision": {LORA: 1e-2, HEAD: 1e-2, FULL: 3e-3},
    "graph": {LORA: 2e-2, HEAD: 1e-2, FULL: 1e-2},
    "speech": {LORA: 1e-2, HEAD: 1e-2, FULL: 3e-3},
    "text": {LORA: 1e-2, HEAD: 1e-2, FULL: 3e-3},
}


def adapt(domain: Domain, method: str, model: nn.Module) -> nn.Module:
    """`model` (the pretrained base with a new head) made ready to train by `method`."""
    if method in VARIANTS:
        return la.apply(
            model, rank=domain.rank, targets=domain.targets, trainable=[domain.head, *domain.lora_trainable], **VARIANTS[method]
        )
    if REFERENCES[method] == HEAD:
        return head_only(model, domain.head)
    return model  # full fine-tuning: the plain model, every parameter trains


def learning_rate(domain: Domain, method: str) -> float:
    return RATES[domain.name][LORA if method in VARIANTS else REFERENCES[method]]


def step_memory(domain: Domain, model: nn.Module, data: Data) -> dict[str, float]:
    """Training memory beyond the frozen weights for one step on the first batch of
    task B's training data (the demo's batch size), counted as bench/memory.py does."""
    task = get_task(domain.task)
    batch = next(iter(task.batches(data.train, train=True, spec=LoaderSpec(batch_size=domain.batch_size))))
    model.train()
    state = trainable_state_bytes(model)
    saved = step_saved_bytes(model, lambda: task.step(model, batch, train=True).loss)
    model.zero_grad(set_to_none=True)
    return {"saved_activation_kb": saved / 1024, "trainable_state_kb": state / 1024, "total_kb": (saved + state) / 1024}


def train_b(domain: Domain, model: nn.Module, data: Data, *, method: str, epochs: int, seed: int) -> dict[str, float]:
    """Task B with the demo's budget at `RATES` (with this seed and no checkpoints);
    the test accuracy and the last epoch's validation loss."""
    trainer = Trainer(
        model, data.train, data.val, task=domain.task, epochs=epochs, lr=learning_rate(domain, method), batch_size=domain.batch_size,
        warmup=0.1, progress=False, device="cpu", seed=seed,
    )  # fmt: skip
    start = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - start
    test = trainer.evaluate(data.test, task=domain.test_task)
    return {"accuracy": test["accuracy"], "val_loss": history[-1]["val_loss"], "seconds": seconds}


def run_domain(name: str, *, quick: bool, seeds: int, say: Callable[[str], None]) -> dict[str, Any]:
    domain: Domain = importlib.import_module(f"lora_anywhere.cli.demo.{name}").DOMAIN
    data_a, data_b = domain.data_a(quick), domain.data_b(quick)
    epochs_a = max(2, domain.epochs_a // 4) if quick else domain.epochs_a
    epochs_b = max(2, domain.epochs_b // 4) if quick else domain.epochs_b

    # Pretraining on task A: the demo's own code and seed.
    torch.manual_seed(0)
    base = domain.build(data_a.classes)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, seconds = fit(domain, base, data_a, epochs=epochs_a, out_dir=Path(tmp), device="cpu", lr=domain.lr_a, warmup=0.1)
    acc_a = trainer.evaluate(data_a.test, task=domain.test_task)["accuracy"]
    pretrained = {k: v.detach().clone() for k, v in base.state_dict().items()}
    say(f"{name}: pretrained on task A ({domain.task_a}): test accuracy {acc_a:.3f} ({seconds:.1f} s)")

    def fresh(seed: int) -> nn.Module:
        """The pretrained base with a new head for task B, drawn under seed 1 + s (the
        demo's seed 1 for s = 0); the adapters `apply` adds draw from the same stream."""
        model = domain.build(data_a.classes)
        model.load_state_dict(pretrained)
        torch.manual_seed(1 + seed)
        head = domain.build(data_b.classes).get_submodule(domain.head)
        parent, _, attr = domain.head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, head)
        return model

    rows: dict[str, Any] = {}
    for method in METHODS:
        try:
            runs = []
            for seed in range(seeds):
                model = adapt(domain, method, fresh(seed))
                if seed == 0:
                    trainable, total = count_trainable(model)
                    memory = step_memory(domain, copy.deepcopy(model), data_b)
                runs.append(train_b(domain, model, data_b, method=method, epochs=epochs_b, seed=seed))
        except Exception as exc:  # a method that fails on a demo model is a bug: keep the traceback
            rows[method] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            say(f"{name}: {method}: FAILED: {type(exc).__name__}: {exc}")
            print(traceback.format_exc(), file=sys.stderr)
            continue
        accuracy = [r["accuracy"] for r in runs]
        loss = [r["val_loss"] for r in runs]
        rows[method] = {
            "accuracy_mean": statistics.fmean(accuracy),
            "accuracy_min": min(accuracy),
            "accuracy_max": max(accuracy),
            "val_loss_mean": statistics.fmean(loss),
            "trainable_params": trainable,
            "base_params": total,
            **memory,
            "train_seconds_mean": statistics.fmean(r["seconds"] for r in runs),
            "runs": runs,
        }
        r = rows[method]
        say(
            f"{name}: {method:<19} accuracy {r['accuracy_mean']:.3f} [{r['accuracy_min']:.3f}, {r['accuracy_max']:.3f}], val loss {r['val_loss_mean']:.3f}, "
            f"{trainable:,} trainable, memory {r['total_kb']:.0f} KiB, {r['train_seconds_mean']:.1f} s per run"
        )
    return {
        "domain": name, "task_a": domain.task_a, "task_b": domain.task_b, "model": domain.model, "rank": domain.rank,
        "epochs_b": epochs_b, "batch_size": domain.batch_size, "task_a_accuracy": acc_a, "chance_b": 1.0 / data_b.classes, "methods": rows,
    }  # fmt: skip


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    seeds = meta["seeds"]
    spread = f"mean of {seeds} seeds [min, max]" if seeds > 1 else "one seed"
    lines = [
        f"LoRA methods on the demo's tasks (`lora-anywhere demo`), each with the demo's LoRA budget. {meta}",
        "",
        f"accuracy: held-out task-B test accuracy, {spread}; val loss: last epoch's validation loss, mean; "
        "trainable: parameters that train (adapters + head, + norms in vision and speech); "
        "memory: one training step beyond the frozen weights, saved activations + 12 B/trainable parameter (gradient + AdamW), counted as bench/memory.py does; "
        "time: mean wall time of one training run (noisy: a shared 2-core machine).",
        "",
        "| domain (task A → B) | method | accuracy | val loss | trainable | memory (activations + state) | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        label = f"{res['domain']} ({res['task_a']} → {res['task_b']}, rank {res['rank']})"
        for method, r in res["methods"].items():
            if "error" in r:
                lines.append(f"| {label} | {method} | fails: {r['error'][:80]} | | | | |")
            else:
                acc = f"{r['accuracy_mean']:.3f}" + (f" [{r['accuracy_min']:.3f}, {r['accuracy_max']:.3f}]" if seeds > 1 else "")
                mem = f"{r['total_kb']:,.0f} KiB ({r['saved_activation_kb']:,.0f} + {r['trainable_state_kb']:,.0f})"
                lines.append(
                    f"| {label} | {method} | {acc} | {r['val_loss_mean']:.3f} | {r['trainable_params']:,} | {mem} | {r['train_seconds_mean']:.1f} s |"
                )
            label = ""
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo's --fast data and epochs, one seed (a smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, or 1 with --quick)")
    parser.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated, from {','.join(DOMAINS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "seeds": seeds,
    }
    start = time.perf_counter()
    results = [
        run_domain(name, quick=args.quick, seeds=seeds, say=lambda line: print(line, flush=True)) for name in args.domains.split(",")
    ]
    meta["total_seconds"] = round(time.perf_counter() - start)
    stem = "methods_quick" if args.quick else "methods"
    text = markdown(meta, results)
    write_results(args.out, stem, meta, results, text)
    print("\n" + text)
    print(f"written: {args.out / stem}.md and .json; {meta['total_seconds']} s")


if __name__ == "__main__":
    main()
