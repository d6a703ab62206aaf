"""The demo's results: one table for the terminal, a CSV, and one PNG of the curves."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ...atomic import atomic_file
from .common import METHODS, Outcome


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def table(outcomes: list[Outcome]) -> str:
    """Every domain's three ways to task B, with what each costs."""
    headers = ("domain", "task A → task B", "method", "accuracy", "trainable params", "train time", "adapter file")
    lines: list[tuple[str, ...]] = []
    for o in outcomes:
        for i, row in enumerate(o.rows):
            name = f"{row.method} r={o.domain.rank}" if row.method == METHODS[0] else row.method
            lines.append((
                o.domain.name if i == 0 else "",
                f"{o.domain.task_a} → {o.domain.task_b}" if i == 0 else "",
                name,
                f"{row.accuracy:.3f}",
                f"{row.trainable:,} ({100 * row.trainable / row.total:.1f}%)",
                f"{row.seconds:.1f} s",
                _size(row.file_bytes),
            ))  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    right = {3, 4, 5, 6}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(headers), fmt(tuple("-" * w for w in widths)), *(fmt(line) for line in lines), ""]
    chance = ", ".join(sorted({f"{o.chance_b:.2f}" for o in outcomes}))
    out.append(
        f"accuracy: on held-out task-B data (chance {chance}); trainable params: share of the base model's; train time: the whole fit"
    )
    for o in outcomes:
        out.append(
            f"{o.domain.name}: task A test accuracy {o.task_a_accuracy:.3f}; LoRA merged vs unmerged max |Δ| {o.merge_error:.1e}, "
            f"reloaded onto a fresh base {o.reload_error:.1e}; adapter in {o.adapter_dir}"
        )
    return "\n".join(out)


def write_csv(outcomes: list[Outcome], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "domain",
            "task_a",
            "task_b",
            "task_a_accuracy",
            "method",
            "accuracy",
            "trainable_params",
            "base_params",
            "train_seconds",
            "adapter_bytes",
        ]
    )
    for o in outcomes:
        for r in o.rows:
            writer.writerow(
                [
                    o.domain.name,
                    o.domain.task_a,
                    o.domain.task_b,
                    f"{o.task_a_accuracy:.4f}",
                    r.method,
                    f"{r.accuracy:.4f}",
                    r.trainable,
                    r.total,
                    f"{r.seconds:.2f}",
                    r.file_bytes,
                ]
            )
    with atomic_file(path) as tmp:
        tmp.write_text(buffer.getvalue())


def plot(outcomes: list[Outcome], path: Path) -> bool:
    """Validation accuracy per epoch, one panel per domain. False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(4 * len(outcomes), 3.4), layout="constrained")
    axes = fig.subplots(1, len(outcomes), squeeze=False)[0]
    for ax, o in zip(axes, outcomes):
        for row in o.rows:
            ax.plot(range(1, len(row.curve) + 1), row.curve, marker="o", markersize=3, label=row.method)
        ax.axhline(o.chance_b, color="grey", linestyle=":", label="chance")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{o.domain.name}: {o.domain.task_b}", fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("validation accuracy (task B)")
    axes[0].legend(fontsize=8)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True
