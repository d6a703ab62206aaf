"""Choose the LoRA rank by k-fold cross-validation with the shared trainer."""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Subset

from ..api import apply
from ..errors import LoraError
from ..log import logger


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

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the metric, the chosen rank and one entry per rank
        (mean, std, adapter parameters and the score of each fold)."""
        return {"metric": self.metric, "chosen": self.chosen, "scores": [asdict(s) for s in self.scores]}


class NodeFolds:
    """The labelled nodes of one graph as the samples to fold, for node
    classification: each fold's split is a shallow copy of the graph whose
    ``train_mask``/``val_mask`` hold that fold's nodes (the graph itself, its
    features and edges, are shared and never changed).

    ``nodes`` are the node indices to fold; by default those in ``train_mask`` or
    ``val_mask`` (every node if the graph has neither), so test nodes stay out."""

    def __init__(self, graph: Any, nodes: torch.Tensor | None = None) -> None:
        if nodes is None:
            masks = [m for m in (getattr(graph, "train_mask", None), getattr(graph, "val_mask", None)) if m is not None]
            keep = torch.zeros(graph.num_nodes, dtype=torch.bool)
            for m in masks:
                keep |= m.to(torch.bool).cpu()
            nodes = keep.nonzero().flatten() if masks else torch.arange(graph.num_nodes)
        self.graph, self.nodes = graph, nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def split(self, train: list[int], val: list[int]) -> tuple[Any, Any]:
        graph = copy.copy(self.graph)
        for name, chosen in (("train_mask", train), ("val_mask", val)):
            mask = torch.zeros(self.graph.num_nodes, dtype=torch.bool)
            mask[self.nodes[chosen]] = True
            setattr(graph, name, mask)
        return graph, graph


def fold_indices(n: int, folds: int, seed: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i::folds] for i in range(folds)]


def _split(data: Any, train: list[int], val: list[int]) -> tuple[Any, Any]:
    if callable(getattr(data, "split", None)):
        return data.split(train, val)
    return Subset(data, train), Subset(data, val)


def check_ranks(ranks: Sequence[int]) -> list[int]:
    ranks = list(ranks)
    if not ranks:
        raise LoraError("ranks must name at least one candidate rank, e.g. ranks=(1, 2, 4, 8)")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LoraError(f"every candidate rank must be a positive integer, got {r!r}")
    repeated = sorted({r for r in ranks if ranks.count(r) > 1})
    if repeated:
        raise LoraError(f"ranks name {', '.join(map(str, repeated))} more than once; list each candidate rank once")
    return ranks


def select_rank(
    build_model: Callable[[], nn.Module],
    data: Any,
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
    other metric maximised). The folds are the same for every rank.

    `data` is an indexable dataset of samples, or an object with ``len()`` and
    ``split(train_indices, val_indices) -> (train_data, val_data)``, such as
    `NodeFolds` for the nodes of one graph. Nothing is written to disk: pass no
    ``out_dir`` in `trainer_kwargs`. One line per rank goes to the `lora_anywhere` logger."""
    from .trainer import Trainer

    ranks = check_ranks(ranks)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise LoraError(f"folds must be an integer of at least 2, got {folds!r}")
    if len(data) < folds:
        raise LoraError(f"{len(data)} samples cannot be split into {folds} folds; use fewer folds or more data")
    minimise = metric.endswith("loss")
    parts = fold_indices(len(data), folds, seed)
    scores = []
    for rank in ranks:
        started = time.perf_counter()
        fold_scores, params = [], 0
        for k in range(folds):
            train_idx = [i for j, part in enumerate(parts) if j != k for i in part]
            train, val = _split(data, train_idx, parts[k])
            torch.manual_seed(seed)
            model = apply(build_model(), rank=rank, **(apply_kwargs or {}))
            params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_adapters" in n)
            trainer = Trainer(model, train, val, task=task, seed=seed, progress=False, **(trainer_kwargs or {}))
            if not scores and k == 0:  # a metric the trainer will never report: say so before any training
                report = trainer.report(val)
                known = sorted(
                    {f"val_{name}" for name in report.metrics} | {f"train_{n}" for n in report.metrics if n not in report.eval_only}
                )
                if metric not in known:
                    raise LoraError(f"metric {metric!r} is not one the trainer reports for this task; choose one of {', '.join(known)}")
            history = trainer.fit()
            if trainer.interrupted:  # Ctrl-C: stop the whole selection, not just this fold
                raise KeyboardInterrupt
            if not history or metric not in history[-1]:
                raise LoraError(
                    f"metric {metric!r} is not in the trainer's history; it has {', '.join(history[-1]) if history else 'no epochs'}"
                )
            fold_scores.append(float(history[-1][metric]))
        score = RankScore(rank, statistics.fmean(fold_scores), statistics.pstdev(fold_scores), params, fold_scores)
        scores.append(score)
        logger.info(
            f"rank {rank}: {metric} {score.mean:.4f} ± {score.std:.4f} over {folds} folds, {params:,} adapter parameters ({time.perf_counter() - started:.1f} s)"
        )
    best = (min if minimise else max)(scores, key=lambda s: s.mean)
    margin = best.std / math.sqrt(folds)
    good = [s for s in scores if (s.mean <= best.mean + margin if minimise else s.mean >= best.mean - margin)]
    return RankSelection(metric, scores, min(s.rank for s in good))
