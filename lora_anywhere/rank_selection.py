"""Choose the LoRA rank by k-fold cross-validation with the shared trainer."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Subset

from .api import apply
from .errors import LoraError


@dataclass
class RankScore:
    rank: int
    mean: float
    std: float
    adapter_params: int
    folds: list[float] = field(default_factory=list)


@dataclass
class RankSelection:
    """The scores per rank and the chosen one: the smallest rank whose mean score is
    within one standard error of the best (the one-standard-error rule: a smaller
    adapter unless a larger one is clearly better)."""

    metric: str
    scores: list[RankScore]
    chosen: int

    def __str__(self) -> str:
        lines = [f"{'rank':>5}  {self.metric + ' (mean ± std)':>28}  {'adapter params':>14}"]
        for s in self.scores:
            mark = "  ← chosen" if s.rank == self.chosen else ""
            lines.append(f"{s.rank:>5}  {s.mean:>18.4f} ± {s.std:<7.4f}  {s.adapter_params:>14,}{mark}")
        return "\n".join(lines)


def fold_indices(n: int, folds: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i::folds] for i in range(folds)]


def select_rank(
    build_model: Callable[[], nn.Module],
    data: Sequence[Any],
    *,
    task: Any,
    ranks: Sequence[int] = (1, 2, 4, 8, 16),
    folds: int = 5,
    metric: str = "val_accuracy",
    apply_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> RankSelection:
    """Train ``build_model()`` adapted at each rank on k−1 folds of `data` and score it
    on the held-out fold (the last epoch's `metric`; ``val_loss`` is minimised, any
    other metric maximised). `data` is an indexable dataset of samples."""
    from .trainer import Trainer

    if folds < 2:
        raise LoraError(f"folds must be at least 2, got {folds}")
    if len(data) < folds:
        raise LoraError(f"{len(data)} samples cannot be split into {folds} folds; use fewer folds or more data")
    if not ranks:
        raise LoraError("ranks must name at least one candidate rank")
    minimise = metric.endswith("loss")
    parts = fold_indices(len(data), folds, seed)
    scores = []
    for rank in ranks:
        fold_scores, params = [], 0
        for k in range(folds):
            train_idx = [i for j, part in enumerate(parts) if j != k for i in part]
            torch.manual_seed(seed)
            model = apply(build_model(), rank=rank, **(apply_kwargs or {}))
            params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_adapters" in n)
            trainer = Trainer(model, Subset(data, train_idx), Subset(data, parts[k]), task=task, seed=seed, progress=False, **(trainer_kwargs or {}))
            history = trainer.fit()
            if metric not in history[-1]:
                raise LoraError(f"metric {metric!r} is not in the trainer's history; it has {', '.join(history[-1])}")
            fold_scores.append(float(history[-1][metric]))
        scores.append(RankScore(rank, statistics.fmean(fold_scores), statistics.pstdev(fold_scores), params, fold_scores))
    best = (min if minimise else max)(scores, key=lambda s: s.mean)
    margin = best.std / math.sqrt(folds)
    good = [s for s in scores if (s.mean <= best.mean + margin if minimise else s.mean >= best.mean - margin)]
    return RankSelection(metric, scores, min(s.rank for s in good))
