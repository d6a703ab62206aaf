"""What the trainer tells the user: log lines, progress bars, the metrics file, the
curves, evaluation reports (per-class accuracy, confusion matrix) and TensorBoard.

Everything here writes from rank 0 only under torchrun, writes files atomically, and
treats its optional dependencies (tqdm, matplotlib, tensorboard, torchmetrics) as
optional: without one, the rest still works and one notice says what is lost.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist

from ..atomic import atomic_file
from ..log import logger

_MISSING_NOTED: set[str] = set()


def process_rank() -> int:
    """This process's index under torchrun (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def say(message: str, level: int = logging.INFO) -> None:
    """One line for the `lora_anywhere` logger, from rank 0 only (see `log.py`)."""
    if process_rank() == 0:
        logger.log(level, message)


def warn(message: str) -> None:
    say(message, logging.WARNING)


def optional(module: str, what: str) -> Any:
    """Import an optional dependency, or say once what is lost without it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if module not in _MISSING_NOTED:
            _MISSING_NOTED.add(module)
            warn(f"{module} is not installed, so {what}; pip install 'lora_anywhere[train]'")
        return None


def bar(enabled: bool, *, total: int | None, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    tqdm = optional("tqdm.auto", "there are no progress bars")
    if tqdm is None:
        return None
    return tqdm.tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """``epoch 3/10  train_loss 0.41  …``: the line logged after every epoch."""
    return f"epoch {int(row['epoch'])}/{epochs}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """The per-epoch history as CSV (``metrics.csv``) or JSON lines (``metrics.jsonl``)."""
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in history)
    else:
        columns = list(dict.fromkeys(k for row in history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        text = buffer.getvalue()
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """``curves.png``: losses on the left, every other metric on the right, per epoch."""
    figure_module = optional("matplotlib.figure", "no curves.png is drawn")
    if figure_module is None or not history:
        return
    fig = figure_module.Figure(figsize=(10, 4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    skip = {"epoch", "lr", "seconds"}
    for key in dict.fromkeys(k for row in history for k in row):
        if key in skip:
            continue
        ax = loss_ax if key.endswith("loss") else metric_ax
        ax.plot(epochs, [row.get(key, math.nan) for row in history], marker="o", label=key)
    for ax, title in ((loss_ax, "loss"), (metric_ax, "metrics")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.lines:
            ax.legend()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_confusion(matrix: list[list[int]], classes: Sequence[str], path: Path, title: str) -> None:
    """A confusion matrix as a PNG: rows are the true classes, columns the predicted
    ones, each cell its count (shaded by the share of its row)."""
    figure_module = optional("matplotlib.figure", "no confusion-matrix PNG is drawn")
    if figure_module is None:
        return
    n = len(matrix)
    size = min(12.0, 2.0 + 0.45 * n)
    fig = figure_module.Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    rows = [max(1, sum(r)) for r in matrix]
    ax.imshow([[c / rows[i] for c in r] for i, r in enumerate(matrix)], cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count / rows[i] > 0.5 else "black", fontsize=8)
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=90 if n > 8 else 0)
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


@dataclass
class Report:
    """An evaluation: the scalar figures (``loss``, ``accuracy``, ``macro_f1``…) and the
    details that are not one number (``per_class_accuracy``, ``confusion_matrix``)."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    #: The figures only evaluation computes (macro_f1, r2): the history has no train_ one of them.
    eval_only: list[str] = field(default_factory=list)
    #: which examples the figures are on, e.g. "30 nodes (not in train_mask)"
    on: str | None = None

    def save(self, folder: str | Path, name: str, classes: Sequence[str] | None = None) -> list[Path]:
        """``{name}_report.json`` (everything) and, for classification,
        ``{name}_confusion.png``; returns the files written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        matrix = self.details.get("confusion_matrix")
        if classes is None and matrix is not None:
            classes = [str(i) for i in range(len(matrix))]
        payload = {"metrics": self.metrics, "on": self.on, "classes": list(classes) if classes else None, **self.details}
        written = [folder / f"{name}_report.json"]
        with atomic_file(written[0]) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        if matrix is not None and classes is not None:
            plot_confusion(matrix, classes, folder / f"{name}_confusion.png", f"{name}: confusion matrix")
            if (folder / f"{name}_confusion.png").is_file():
                written.append(folder / f"{name}_confusion.png")
        return written


class TensorBoard:
    """Every epoch's figures as TensorBoard scalars (``torch.utils.tensorboard``'s
    SummaryWriter), in ``folder``; ``tensorboard --logdir folder`` shows them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writer: Any = None
        self._unavailable = False

    def log(self, row: dict[str, float]) -> None:
        writer = self._open()
        if writer is None:
            return
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch":
                split, _, name = key.partition("_")
                writer.add_scalar(f"{name}/{split}" if name and split in ("train", "val") else key, value, step)
        writer.flush()

    def _open(self) -> Any:
        if self._writer is None and not self._unavailable:
            module = optional("torch.utils.tensorboard", "there is no TensorBoard log (pip install tensorboard)")
            if module is None:
                self._unavailable = True
            else:
                self._writer = module.SummaryWriter(log_dir=str(self.folder))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
