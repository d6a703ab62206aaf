"""LoRA and its variants against head-only tuning and full fine-tuning, on real data
and on the demo's tasks: test accuracy at the Trainer's default learning rates and
at each method's best rate from a small grid.

    .venv/bin/python bench/quality.py                  # every task (about 60 min on 1 thread)
    .venv/bin/python bench/quality.py --tasks digits   # some tasks; the others' results are kept
    .venv/bin/python bench/quality.py --quick          # 1 seed, the demo's --fast data, 2 rates: a smoke test
    .venv/bin/python bench/quality.py --explore --settings 'adapter 0.01, trainable 0.03'   # one explored setting
    .venv/bin/python bench/quality.py --rank 8 --settings default --out DIR   # at apply's default rank

Tasks (each: pretrain a small model on task A, adapt it to task B with a new head):
real data — the UCI handwritten digits (0–4 → 5–9), Zachary's karate club (faction →
community) and Les Misérables (5 → 6 Louvain communities), see bench/real_data.py —
and the demo's generated tasks (vision, graph, speech, text; `lora-anywhere demo`).

Methods: LoRA, LoRA-FA (``freeze_a``), PiSSA (``init="svd"``) and DoRA (``dora``) at
rank 4 with the new head (and in vision, digits and speech the norms) trainable;
head-only tuning; full fine-tuning of the plain model. All train in the shared
`Trainer` with the task's epochs and batch size and nothing else set: "default" is
exactly what a user gets without choosing a learning rate. The grid then sets one
rate for every parameter group; the best rate is the one with the highest mean
*validation* accuracy, and the table reports the *test* accuracy there. LoRA also
runs with ``lr="find"`` (the range test picks the rate).

Seeds: seed s draws the new head and the adapters under ``torch.manual_seed(1 + s)``
and gives the trainer seed s (seed 0 is the demo's own run); on the real data each
seed also draws its own stratified split, and the base is pretrained on it. Reported:
mean ± standard deviation over seeds (min and max in the JSON), the trainable share
of the base model's parameters and the size of what each method saves (the adapter
file; the whole trained model for full fine-tuning). Writes bench/results/quality.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from methods import adapt  # noqa: E402
from real_data import REAL  # noqa: E402
from train_step import RESULTS  # noqa: E402

from lora_anywhere.atomic import atomic_file  # noqa: E402
from lora_anywhere.cli.demo import DOMAINS  # noqa: E402
from lora_anywhere.cli.demo.common import Data, Domain, count_trainable  # noqa: E402
from lora_anywhere.io import TENSORS_FILE  # noqa: E402
from lora_anywhere.training import optim  # noqa: E402
from lora_anywhere.training.checkpoint import MODEL_FILE  # noqa: E402
from lora_anywhere.training.trainer import Trainer  # noqa: E402

PISSA = "PiSSA (init=svd)"
METHODS = ("LoRA", "LoRA-FA (freeze_a)", PISSA, "DoRA (dora)", "head only", "full FT")
#: 1e-3 (the old default) is left out: on the digits and the karate club it was the worst rate
#: of every method (an exploratory run of this script).
#: The grid of rates per method: three around where each kind of training did best in
#: the exploratory run (adapters and heads higher, whole models lower).
ADAPTED_GRID = (1e-2, 3e-2, 1e-1)
GRID = {"full FT": (3e-3, 1e-2, 3e-2)}
QUICK_GRID = (3e-3, 3e-2)
#: LoRA's extra runs: adapter and trainable modules at different rates; LoRA+.
ADAPTER_RATES, TRAINABLE_RATES = (1e-2, 3e-2), (3e-3, 1e-2, 3e-2, 1e-1)
LORAPLUS_RATES, LORAPLUS_RATIOS = (3e-3, 1e-2), (4, 16)
#: PiSSA at LoRA's default (A at 5e-3, B at 16×), which PiSSA's own default is not.
LORAPLUS_DEFAULT = "adapter 0.005, B ×16 (LoRA's default)"
#: The default before LoRA+: A and B at 3e-2 (every other group at its default).
OLD_DEFAULT = "adapter 0.03 (the default before LoRA+)"
#: Around the default (A at 5e-3, B at 16× it, the trainable modules at theirs): (A's rate, ratio).
LORAPLUS_NEIGHBOURS = ((2e-3, 16), (3e-3, 16), (3e-3, 10), (3e-3, 24), (4e-3, 12))
#: LoRA's warmup runs: the first share of the optimizer steps ramps the rates up.
WARMUPS = (0.1,)
#: LoRA's weight-decay runs: AdamW's decay on the adapter factors only, A and B at 3e-2
#: (the default before LoRA+).
ADAPTER_DECAYS = (0.1, 1.0)
TASKS = (*REAL, *DOMAINS)
#: What "default" trains with: each group's rate, B's multiple of A's (LoRA+), and
#: PiSSA's adapter rate (A and B alike).
DEFAULT_RATES = {**optim.DEFAULT_LR, "loraplus_ratio": optim.DEFAULT_LORAPLUS_RATIO, "adapter, PiSSA": optim.SVD_ADAPTER_LR}
#: Seeds per task: the small graphs vary far more from split to split, and cost little.
SEEDS = {"karate": 10, "lesmis": 10}
DEFAULT_SEEDS = 3
OUT = RESULTS / "quality"


def task_setup(name: str, quick: bool) -> tuple[Domain, Callable[[int], tuple[Data, Data]], bool]:
    """The task's domain, its data for a seed, and whether each seed splits anew."""
    if name in REAL:
        domain, data = REAL[name]
        return domain, data, True
    domain = importlib.import_module(f"lora_anywhere.cli.demo.{name}").DOMAIN
    cached: dict[str, tuple[Data, Data]] = {}

    def fixed(seed: int) -> tuple[Data, Data]:
        if "data" not in cached:
            cached["data"] = (domain.data_a(quick), domain.data_b(quick))
        return cached["data"]

    return domain, fixed, False


def pretrain(domain: Domain, data: Data, epochs: int) -> tuple[dict[str, torch.Tensor], float]:
    """Task A on the plain model (the demo's protocol, seed 0): its state and test accuracy."""
    torch.manual_seed(0)
    model = domain.build(data.classes)
    trainer = Trainer(
        model, data.train, data.val, task=domain.task, epochs=epochs, lr=domain.lr_a, batch_size=domain.batch_size,
        warmup=0.1, progress=False, device="cpu", seed=0,
    )  # fmt: skip
    _fit(trainer)
    accuracy = trainer.evaluate(data.test, task=domain.test_task)["accuracy"]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, accuracy


def _fit(trainer: Trainer) -> list[dict[str, float]]:
    history = trainer.fit()
    if trainer.interrupted:  # Ctrl-C stops the trainer; it must stop the benchmark too
        raise KeyboardInterrupt
    return history


def fresh(domain: Domain, base: dict[str, torch.Tensor], classes_a: int, classes_b: int, seed: int) -> nn.Module:
    """The pretrained base with a new head for task B drawn under seed 1 + s."""
    model = domain.build(classes_a)
    model.load_state_dict(base)
    torch.manual_seed(1 + seed)
    head = domain.build(classes_b).get_submodule(domain.head)
    parent, _, attr = domain.head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, head)
    return model


def train_b(
    domain: Domain, model: nn.Module, data: Data, *, epochs: int, seed: int, options: dict[str, Any]
) -> tuple[Trainer, dict[str, Any]]:
    """Task B with nothing but the task's budget and the setting's `options` set."""
    trainer = Trainer(
        model, data.train, data.val, task=domain.task, epochs=epochs, batch_size=domain.batch_size, progress=False, device="cpu",
        seed=seed, **options,
    )  # fmt: skip
    start = time.perf_counter()
    history = _fit(trainer)
    seconds = time.perf_counter() - start
    test = trainer.evaluate(data.test, task=domain.test_task)["accuracy"]
    row: dict[str, Any] = {
        "seed": seed,
        "test": test,
        "val": history[-1]["val_accuracy"],
        "val_loss": history[-1]["val_loss"],
        "seconds": seconds,
    }
    if options.get("lr") == "find":
        curve = trainer.range_test
        row.update(found_lr=curve.suggestion, curve={"lr": curve.lrs, "smoothed": curve.smoothed})
    return trainer, row


def saved_bytes(trainer: Trainer) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = trainer.saved.save(Path(tmp) / "saved")
        return sum(f.stat().st_size for f in folder.iterdir() if f.name in (TENSORS_FILE, MODEL_FILE))


def grid_of(method: str, override: tuple[float, ...] | None = None) -> tuple[float, ...]:
    return override if override is not None else GRID.get(method, ADAPTED_GRID)


def settings(method: str, grid: tuple[float, ...] | None, explore: bool) -> dict[str, dict[str, Any]]:
    """The runs of one method, by name: the Trainer options each sets. LoRA also runs
    with ``lr="find"``; with `explore`, also with the adapter and the trainable modules
    at different rates, with LoRA+ (B at 4× to 24× A's rate; the default is LoRA+ at
    16×), with a warmup and with weight decay on the adapter factors; PiSSA also at
    LoRA's default."""
    out: dict[str, dict[str, Any]] = {"default": {}, **{f"{lr:g}": {"lr": lr} for lr in grid_of(method, grid)}}
    if method == PISSA and explore:
        out[LORAPLUS_DEFAULT] = {"lr": {"adapter": optim.DEFAULT_LR["adapter"]}, "loraplus_ratio": optim.DEFAULT_LORAPLUS_RATIO}
    if method == "LoRA":
        out["find"] = {"lr": "find"}
        if explore:
            out[OLD_DEFAULT] = {"lr": {"adapter": 0.03}}
            for a in ADAPTER_RATES:
                out.update({f"adapter {a:g}, trainable {t:g}": {"lr": {"adapter": a, "trainable": t}} for t in TRAINABLE_RATES if t != a})
            out.update(
                {f"{lr:g}, B ×{ratio}": {"lr": lr, "loraplus_ratio": float(ratio)} for lr in LORAPLUS_RATES for ratio in LORAPLUS_RATIOS}
            )
            out.update(
                {f"adapter {a:g}, B ×{ratio}": {"lr": {"adapter": a}, "loraplus_ratio": float(ratio)} for a, ratio in LORAPLUS_NEIGHBOURS}
            )
            out.update({f"adapter 0.03, warmup {w:g}": {"lr": {"adapter": 0.03}, "warmup": w} for w in WARMUPS})
            out.update(
                {f"adapter 0.03, trainable 0.1, warmup {w:g}": {"lr": {"adapter": 0.03, "trainable": 0.1}, "warmup": w} for w in WARMUPS}
            )
            out.update(
                {
                    f"adapter 0.03, adapter weight decay {d:g}": {"lr": {"adapter": 0.03}, "weight_decay": {"adapter": d}}
                    for d in ADAPTER_DECAYS
                }
            )
    return out


def run_task(
    name: str, *, quick: bool, seeds: int, grid: tuple[float, ...] | None, explore: bool, only: set[str] | None,
    previous: dict[str, Any] | None, resume: bool, say: Callable[[str], None], save: Callable[[dict[str, Any]], None],
    rank: int | None = None, methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:  # fmt: skip
    """Every (method, setting, seed) run of one task, saved after each seed; with
    `only`, just those settings (the others kept from `previous`, the same task's
    earlier results); with `resume`, only the runs `previous` lacks."""
    domain, data_for, resplit = task_setup(name, quick)
    if rank is not None:
        domain = dataclasses.replace(domain, rank=rank)
    epochs_a = max(2, domain.epochs_a // 4) if quick and not resplit else domain.epochs_a
    epochs_b = max(2, domain.epochs_b // 4) if quick and not resplit else domain.epochs_b
    plan = {m: {s: v for s, v in settings(m, grid, explore).items() if (only is None or s in only) and m in methods} for m in METHODS}
    kept = (previous or {}).get("methods", {}) if (only or resume or methods != METHODS) else {}
    runs = {m: dict(kept.get(m, {}).get("runs", {})) for m in METHODS}
    for m in METHODS:
        for s in plan[m]:
            runs[m][s] = [r for r in runs[m].get(s, []) if resume and r["seed"] < seeds]
    sizes: dict[str, dict[str, int]] = {m: kept[m]["sizes"] for m in kept if kept[m].get("sizes")}
    result = {
        "task": name, "task_a": domain.task_a, "task_b": domain.task_b, "model": domain.model, "rank": domain.rank,
        "epochs_b": epochs_b, "batch_size": domain.batch_size, "seeds": seeds, "resplit": resplit,
        "task_a_accuracy": (previous or {}).get("task_a_accuracy"),
        "default_lr": DEFAULT_RATES if "default" in plan["LoRA"] else (previous or {}).get("default_lr"),
        "methods": {m: {"sizes": sizes.get(m), "runs": runs[m]} for m in METHODS},
    }  # fmt: skip
    task_a: list[float] = []
    base: tuple[dict[str, torch.Tensor], float] | None = None
    for seed in range(seeds):
        todo = {m: {s: v for s, v in plan[m].items() if seed not in {r["seed"] for r in runs[m][s]}} for m in METHODS}
        if not any(todo.values()) and all(m in sizes for m in METHODS):
            continue
        data_a, data_b = data_for(seed)
        if base is None or resplit:
            base = pretrain(domain, data_a, epochs_a)
            task_a.append(base[1])
        for method in METHODS:
            for setting, options in todo[method].items():
                model = adapt(domain, method, fresh(domain, base[0], data_a.classes, data_b.classes, seed))
                _, row = train_b(domain, model, data_b, epochs=epochs_b, seed=seed, options=options)
                runs[method][setting].append(row)
            if method not in sizes:  # what it trains and saves: the same whatever the rate
                model = adapt(domain, method, fresh(domain, base[0], data_a.classes, data_b.classes, seed))
                trainable, total = count_trainable(model)
                trainer = Trainer(model, data_b.train, task=domain.task, progress=False, device="cpu")
                sizes[method] = {"trainable": trainable, "base": total, "saved_bytes": saved_bytes(trainer)}
                result["methods"][method]["sizes"] = sizes[method]
            if todo[method]:
                shown = ", ".join(f"{s} {runs[method][s][-1]['test']:.3f}" for s in todo[method])
                say(f"{name} seed {seed}: {method:<19} test accuracy at {shown}")
        result["task_a_accuracy"] = statistics.fmean(task_a)
        save(result)
    return result


def stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(runs: dict[str, list[dict[str, Any]]], grid: tuple[float, ...]) -> dict[str, Any]:
    """Test and validation accuracy per setting; the rate of `grid` with the best mean
    validation accuracy."""
    out = {
        setting: {"test": stats([r["test"] for r in rows]), "val": stats([r["val"] for r in rows])}
        for setting, rows in runs.items()
        if rows
    }
    rates = [f"{r:g}" for r in grid if f"{r:g}" in out]
    return {"settings": out, "best": max(rates, key=lambda s: out[s]["val"]["mean"]) if rates else None}


def summaries(res: dict[str, Any], grid: tuple[float, ...] | None = None) -> dict[str, dict[str, Any]]:
    return {m: {**v, **summarise(v["runs"], grid_of(m, grid))} for m, v in res["methods"].items()}


# ---------------------------------------------------------------------- report


def _is_rate(setting: str) -> bool:
    try:
        float(setting)
    except ValueError:
        return False
    return True


def _acc(s: dict[str, float], seeds: int) -> str:
    """mean ± sd, and the number of seeds where it is not the task's."""
    text = f"{s['mean']:.3f} ± {s['sd']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"
    return text if s["n"] == seeds else f"{text} ({s['n']} seed{'s' if s['n'] > 1 else ''})"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    defaults = {json.dumps(r.get("default_lr")) for r in results.values()}
    lines = [
        "# Quality: LoRA and its variants vs head-only and full fine-tuning",
        "",
        f"`bench/quality.py` ({meta}). Test accuracy on task B, mean ± standard deviation over the seeds. "
        f"**default**: the Trainer's default learning rates ({', '.join(defaults)}), nothing set but epochs and batch size; "
        "**best**: the grid rate with the highest mean validation accuracy, and the test accuracy there. "
        "trainable: share of the base model's parameters that train; saved: the file each method writes "
        "(adapter, or the whole trained model for full FT).",
        "",
        "| task (A → B) | method | default | best (lr) | trainable | saved |",
        "|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        label = f"{name} ({res['task_a']} → {res['task_b']}, {res['seeds']} seeds)"
        for method, m in summaries(res).items():
            if not m["sizes"] or not m["settings"]:
                continue
            default = m["settings"].get("default")
            best = m["settings"][m["best"]]["test"] if m["best"] else None
            share = m["sizes"]["trainable"] / m["sizes"]["base"]
            lines.append(
                f"| {label} | {method} | {_acc(default['test'], res['seeds']) if default else '—'} | "
                f"{_acc(best, res['seeds']) + ' (' + str(m['best']) + ')' if best else '—'} | "
                f"{share:.1%} | {_size(m['sizes']['saved_bytes'])} |"
            )
            label = ""
    lines += [
        "",
        "## LoRA against full fine-tuning at the defaults",
        "",
        "| task | LoRA | full FT | LoRA / full FT | within 2%? | LoRA − full FT, paired by seed (95% CI) | LoRA, lr='find' (rates found) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        s = summaries(res)
        lora, full = s["LoRA"]["settings"], s["full FT"]["settings"]
        if "default" not in lora or "default" not in full:
            continue
        a, b = lora["default"]["test"]["mean"], full["default"]["test"]["mean"]
        found = [r["found_lr"] for r in res["methods"]["LoRA"]["runs"].get("find", [])]
        find = f"{lora['find']['test']['mean']:.3f} ({', '.join(f'{x:.2g}' for x in found)})" if found else "—"
        diff = paired(res["methods"]["LoRA"]["runs"]["default"], res["methods"]["full FT"]["runs"]["default"])
        gap = f"{diff['mean']:+.3f} ({diff['low']:+.3f} to {diff['high']:+.3f}, {diff['n']} seeds)" if diff["n"] > 1 else "—"
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.1%} | {'yes' if a >= 0.98 * b else '**no**'} | {gap} | {find} |")
    lines += ["", "## Test accuracy by learning rate (one rate for every group; mean over seeds)", ""]
    for name, res in results.items():
        s = summaries(res)
        grid = sorted({k for m in s.values() for k in m["settings"] if _is_rate(k)}, key=float)
        lines += [f"**{name}**", "", "| method | " + " | ".join(grid) + " | default |", "|---" * (len(grid) + 2) + "|"]
        for method, m in s.items():
            cells = [
                (f"{m['settings'][k]['test']['mean']:.3f}" + (" *" if k == m["best"] else "")) if k in m["settings"] else "—"
                for k in [*grid, "default"]
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "\\* the rate chosen on validation accuracy.", ""]
    lines += [
        "## LoRA's other settings (`--explore`)",
        "",
        "Test accuracy, mean over (the number of seeds, and LoRA ÷ full fine-tuning at its default on those seeds).",
        "",
        *_explored(results),
    ]
    return "\n".join(lines) + "\n"


def paired(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, float]:
    """Test accuracy minus the reference's on the seeds both ran: the mean difference, a
    95% interval (normal approximation) and the ratio of the means."""
    ref = {r["seed"]: r["test"] for r in reference}
    pairs = [(r["test"], ref[r["seed"]]) for r in rows if r["seed"] in ref]
    if not pairs:
        return {"n": 0}
    diffs = [x - y for x, y in pairs]
    mean = statistics.fmean(diffs)
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    ratio = statistics.fmean(x for x, _ in pairs) / statistics.fmean(y for _, y in pairs)
    return {"n": len(pairs), "mean": mean, "low": mean - half, "high": mean + half, "ratio": ratio}


def _explored(results: dict[str, dict[str, Any]]) -> list[str]:
    """LoRA's test accuracy (mean) for its extra settings, one column per task, and
    its ratio to full fine-tuning's (default) on the same seeds."""
    extra = lambda setting: not _is_rate(setting) and setting not in ("default", "find")  # noqa: E731
    names = [n for n, r in results.items() if any(extra(k) and v for k, v in r["methods"]["LoRA"]["runs"].items())]
    if not names:
        return ["(not run)"]
    rows = dict.fromkeys(k for n in names for k in results[n]["methods"]["LoRA"]["runs"] if k != "find")
    lines = ["| LoRA: lr | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in rows:
        cells = []
        for n in names:
            rs = results[n]["methods"]["LoRA"]["runs"].get(k) or []
            vs = paired(rs, results[n]["methods"]["full FT"]["runs"].get("default", []))
            ratio = f", {vs['ratio']:.1%}" if vs["n"] else ""
            cells.append(f"{statistics.fmean(r['test'] for r in rs):.3f} ({len(rs)}{ratio})" if rs else "—")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--quick", action="store_true", help="1 seed, the demo's --fast data, two rates (a smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default 3; 10 on the small graphs)")
    parser.add_argument(
        "--settings",
        default=None,
        help="rerun only these settings (separated by ';', e.g. 'default;find' or, with --explore, 'adapter 0.01, trainable 0.1'); keep the others",
    )
    parser.add_argument(
        "--explore", action="store_true", help="LoRA also with the adapter and trainable modules at different rates, and LoRA+"
    )
    parser.add_argument("--grid", default=None, help="one grid of rates for every method, comma-separated (default: each method's GRID)")
    parser.add_argument("--resume", action="store_true", help="keep the runs the results file has; do only the missing ones")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rank", type=int, default=None, help="the adapters' rank (default: each task's, 4)")
    parser.add_argument("--methods", default=",".join(METHODS), help="rerun only these methods (separated by ','); keep the others")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    stem = "quality_quick" if args.quick else "quality"
    path = args.out / f"{stem}.json"
    results = json.loads(path.read_text())["results"] if path.is_file() else {}
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "python": sys.version.split()[0]}
    only = {x.strip() for x in args.settings.split(";")} if args.settings else None
    methods = tuple(m.strip() for m in args.methods.split(","))
    if unknown_methods := sorted(set(methods) - set(METHODS)):
        parser.error(f"unknown method(s) {', '.join(unknown_methods)}; choose from {', '.join(METHODS)}")
    grid = tuple(float(r) for r in args.grid.split(",")) if args.grid else (QUICK_GRID if args.quick else None)

    def save(result: dict[str, Any]) -> None:
        """After each seed, so an interrupted run keeps what it finished (--resume goes on)."""
        results[result["task"]] = result
        ordered = {n: results[n] for n in TASKS if n in results}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"meta": meta, "results": ordered}, indent=2) + "\n")
        with atomic_file(args.out / f"{stem}.md") as tmp:
            tmp.write_text(markdown(meta, ordered))

    for name in names:
        seeds = 1 if args.quick else (args.seeds or SEEDS.get(name, DEFAULT_SEEDS))
        start = time.perf_counter()
        run_task(
            name, quick=args.quick, seeds=seeds, grid=grid, explore=args.explore, only=only, previous=results.get(name),
            resume=args.resume, say=lambda line: print(line, flush=True), save=save, rank=args.rank, methods=methods,
        )  # fmt: skip
        print(f"{name}: {time.perf_counter() - start:.0f} s; written {path} and {stem}.md", flush=True)


if __name__ == "__main__":
    main()
