"""How far training moves the pretrained weights: LoRA at the Trainer's default rates
(LoRA+: A at 5e-3, B at 16× it), LoRA at the old default (A and B at 3e-2) and full
fine-tuning, on the tasks of bench/quality.py where the old default fell behind.

    .venv/bin/python bench/update_size.py                        # karate and speech, 3 seeds
    .venv/bin/python bench/update_size.py --tasks karate --seeds 10

For each weight W of the pretrained body (what LoRA adapts here): ‖W_after − W_before‖ / ‖W_before‖ (Frobenius), with LoRA's
update merged into W; and the run's final training loss, validation loss and test
accuracy. It shows why the default is LoRA+: with A and B at one rate, Adam moves
each factor about one rate per step, so the product B·A grows with both and ends
several times the size of the weight, where full fine-tuning moves it about once its
size. Writes bench/results/update_size.{md,json}.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from methods import adapt  # noqa: E402
from quality import fresh, pretrain, task_setup, train_b  # noqa: E402
from results_file import write_results  # noqa: E402
from train_step import RESULTS  # noqa: E402

import lora_anywhere as la  # noqa: E402
from lora_anywhere.summary import is_matrix  # noqa: E402

#: name → (method in bench/methods.py, Trainer options).
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "LoRA, default (A 5e-3, B 8e-2)": ("LoRA", {}),
    "LoRA, old default (A and B 3e-2)": ("LoRA", {"lr": {"adapter": 3e-2}}),
    "full FT": ("full FT", {}),
}


def weights(model: torch.nn.Module, domain: Any) -> list[str]:
    """The weight matrices and kernels of the pretrained body (not the new head), as
    `la.summary` counts them: what LoRA adapts in these models."""
    return [n for n, p in model.named_parameters() if is_matrix(n, tuple(p.shape)) and not n.startswith(f"{domain.head}.")]


def run(task: str, seeds: int) -> list[dict[str, Any]]:
    domain, data_for, _ = task_setup(task, quick=False)
    rows = []
    for seed in range(seeds):
        data_a, data_b = data_for(seed)
        base, _ = pretrain(domain, data_a, domain.epochs_a)
        for setting, (method, options) in SETTINGS.items():
            model = fresh(domain, base, data_a.classes, data_b.classes, seed)
            names = weights(model, domain)
            before = {n: model.state_dict()[n].clone() for n in names}
            model = adapt(domain, method, model)
            trainer, result = train_b(domain, model, data_b, epochs=domain.epochs_b, seed=seed, options=options)
            if method != "full FT":
                la.merge(model)
            after = model.state_dict()
            rows.append(
                {
                    "task": task, "seed": seed, "setting": setting, "test": result["test"], "val_loss": result["val_loss"],
                    "train_loss": trainer.history[-1]["train_loss"],
                    "update": {n: float((after[n] - before[n]).norm() / before[n].norm()) for n in names},
                }
            )  # fmt: skip
        print(f"{task} seed {seed}: " + "; ".join(f"{r['setting']} test {r['test']:.3f}" for r in rows[-len(SETTINGS) :]), flush=True)
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# How far training moves the pretrained weights",
        "",
        f"`bench/update_size.py` ({meta}). ‖ΔW‖ / ‖W‖ of each adapted weight after training (LoRA's update merged),"
        " the median over the seeds and the range; the final training and validation loss and the test accuracy, mean over the seeds.",
        "",
        "| task | setting | ‖ΔW‖ / ‖W‖ per adapted weight: median (min–max) | train loss | val loss | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        for setting in SETTINGS:
            mine = [r for r in rows if r["task"] == task and r["setting"] == setting]
            names = list(mine[0]["update"])
            cells = []
            for n in names:
                values = [r["update"][n] for r in mine]
                cells.append(f"`{n}` {statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})")
            train_loss, val_loss, test = (statistics.fmean(r[key] for r in mine) for key in ("train_loss", "val_loss", "test"))
            lines.append(
                f"| {task} ({len(mine)} seeds) | {setting} | {'<br>'.join(cells)} | {train_loss:.3g} | {val_loss:.3g} | {test:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="karate,speech", help="comma-separated tasks of bench/quality.py")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for task in args.tasks.split(",") for row in run(task, args.seeds)]
    meta = {"torch": torch.__version__, "threads": 1, "machine": platform.machine(), "seeds": args.seeds}
    write_results(args.out, "update_size", meta, rows, markdown(meta, rows))
    print(f"written {args.out / 'update_size.md'}")


if __name__ == "__main__":
    main()
