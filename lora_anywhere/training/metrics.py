"""Evaluation metrics that are not means over examples — macro-F1, per-class
accuracy, the confusion matrix, R² — computed by torchmetrics.

A task makes a collection with `classification`, `multilabel` or `regression` once it
has seen its first outputs (which give the number of classes), the trainer updates it
batch by batch and `summarise` turns its values into scalars (the history's
``val_macro_f1``) and details (lists, for the report files). Under DDP, torchmetrics
sums each metric's state over the ranks when it computes. torchmetrics is optional:
without it these figures are missing, with one notice.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .reporting import optional


def _torchmetrics() -> Any:
    return optional("torchmetrics", "there is no macro-F1, per-class accuracy, confusion matrix or R²")


def classification(num_classes: int, ignore_index: int | None = None) -> Any:
    """macro-F1, per-class accuracy (the share of each class's examples predicted as
    that class) and the confusion matrix (rows: true class, columns: predicted)."""
    tm = _torchmetrics()
    if tm is None or num_classes < 2:
        return None
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

    common = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
    return tm.MetricCollection(
        {
            "macro_f1": MulticlassF1Score(average="macro", **common),
            "per_class_accuracy": MulticlassAccuracy(average="none", **common),
            "confusion_matrix": MulticlassConfusionMatrix(**common),
        }
    )


def multilabel(num_labels: int) -> Any:
    """macro-F1 over labels and each label's accuracy (logits > 0 count as "on")."""
    tm = _torchmetrics()
    if tm is None:
        return None
    from torchmetrics.classification import MultilabelAccuracy, MultilabelF1Score

    common = {"num_labels": num_labels, "threshold": 0.0, "validate_args": False}  # thresholds on logits
    return tm.MetricCollection(
        {"macro_f1": MultilabelF1Score(average="macro", **common), "per_label_accuracy": MultilabelAccuracy(average="none", **common)}
    )


def regression(num_outputs: int) -> Any:
    """R² (the share of the targets' variance the model explains), averaged over outputs."""
    tm = _torchmetrics()
    if tm is None:
        return None
    from torchmetrics.regression import R2Score

    return tm.MetricCollection({"r2": R2Score(multioutput="uniform_average")})


def summarise(collection: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalars, details) of a collection's computed values: 0-d values are scalars,
    the rest (per-class vectors, the confusion matrix) become nested lists."""
    with warnings.catch_warnings():
        # A rank that evaluated no batch still joins the sum; torchmetrics warns about it.
        warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
        values = collection.compute()
    scalars, details = {}, {}
    for name, value in values.items():
        value = value.detach().cpu()
        if value.dim() == 0:
            scalars[name] = float(value)
        else:
            details[name] = value.tolist()
    return scalars, details


def update(collection: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One batch's (outputs, targets) into the collection (made on their device)."""
    if targets.numel():
        collection.update(outputs.float(), targets)
