"""Tasks: what one training step means for one kind of data.

The trainer knows nothing about images, graphs, audio or text; a task turns the
user's data into this process's batches and one batch into a loss and metric sums.
The built-in tasks work by duck typing, so the core never imports torch_geometric,
torchaudio or transformers: a graph batch is anything with ``.x``, ``.edge_index``
and ``.y``; an audio batch is ``(waveforms, lengths, labels)``; a text batch is a
dict of tensors with ``"labels"``.

A task's interface is small (docs/trainer.md):

- `step(model, batch, *, train) -> StepResult`: the loss, the number of examples and
  metric sums of one batch (and, when evaluating, the outputs and targets);
- `collate(samples)`: samples into one batch; `batches(data, ...)`: the epoch's batches;
- `check(model, batch)`: the pre-flight check on the first batch, which says what to
  fix when the model's output does not fit the labels;
- `eval_metrics(width)`: the torchmetrics collection evaluation also computes;
- `example_kind(element)`: whether an element of a list is one sample or a batch.

A user changes a task by subclassing it (override `forward`, `loss`, `metrics` or
the whole `step`), or replaces it with a plain function ``loss = fn(model, batch)``.
Plugins add tasks by name through the ``lora_anywhere_register_tasks`` hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from ..errors import TaskError
from . import metrics as metric_sets
from .data import BATCH, SAMPLE, LoaderSpec, Strided, describe, loader, standard_batches

__all__ = [
    "AudioClassification",
    "Classification",
    "FrameClassification",
    "GraphClassification",
    "ImageClassification",
    "LoaderSpec",
    "LossTask",
    "MultiLabelClassification",
    "NodeClassification",
    "Regression",
    "StepResult",
    "Strided",
    "Supervised",
    "Task",
    "TextClassification",
    "TokenClassification",
    "available_tasks",
    "get_task",
    "logits_of",
]

#: Labels with this value count for nothing (token and frame classification padding),
#: as in ``F.cross_entropy``.
IGNORE = -100


@dataclass
class StepResult:
    """One batch's outcome. ``loss`` is the mean over ``count`` examples (it is what
    backward runs on); ``sums`` are metric totals over those examples, so that epoch
    metrics are exact means however the batches are sized or sharded. When evaluating,
    ``outputs`` and ``targets`` (detached, one row per counted example) feed the
    task's `eval_metrics`."""

    loss: torch.Tensor
    count: int
    sums: dict[str, torch.Tensor | float]
    outputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None


class Task:
    """Base class of tasks. Subclasses implement `step`; most subclass `Classification`
    and override `forward` instead."""

    name: str = "custom"
    #: The main metric ("accuracy"), shown in progress bars.
    metric: str | None = None
    #: Whether `example_kind` can tell a sample from a batch for this task's data.
    example_kind_known: bool = False

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__} must implement step(model, batch, *, train)")

    def collate(self, samples: list[Any]) -> Any:
        """Turn samples of a Dataset (or a list of samples) into one batch."""
        return default_collate(samples)

    def batches(self, data: Any, *, train: bool, spec: LoaderSpec) -> Iterable[Any]:
        """This process's batches for one epoch (see `data.standard_batches`)."""
        return standard_batches(self, data, train=train, spec=spec)

    def example_kind(self, element: Any) -> str | None:
        """``"sample"``, ``"batch"``, or None when this task cannot tell."""
        return None

    def data_hint(self) -> str:
        """What a sample and a batch of this task look like, for error messages."""
        return "give a Dataset of samples or a DataLoader"

    def check(self, model: nn.Module, batch: Any) -> None:
        """The pre-flight check: run the model on the first training batch (in eval mode,
        without gradients) and raise `TaskError` with the fix when its output does not
        fit the labels. The base class checks nothing."""

    def eval_metrics(self, width: int) -> Any:
        """A torchmetrics collection evaluation also computes, given the outputs' last
        dimension (the number of classes); None for none."""
        return None

    def describe_split(self, train_data: Any, val_data: Any) -> str | None:
        """A line saying which examples the train_ and val_ figures are on, logged when
        training starts; raises `TaskError` when nothing is held out to validate on."""
        return None

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class LossTask(Task):
    """A task made of a plain function ``loss = fn(model, batch)``: no metrics, and the
    batch goes to the function as the data gives it (a list is taken as batches)."""

    def __init__(self, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "loss-function")

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        return StepResult(self.fn(model, batch), 1, {})


# ---------------------------------------------------------------------- supervised


class Supervised(Task):
    """Tasks whose batches are ``(inputs..., labels)`` — the model gets the inputs
    positionally — or a dict with ``labels`` — the model gets the other keys as keyword
    arguments. The output may be a tensor, a tuple starting with one, or an object with
    ``.logits`` (as transformers models return). Subclasses define the loss, the metric
    sums, and the checks of the output against the labels."""

    label_key = "labels"
    #: Dimensions of one example's label: 0 for a class index or a number, 1 for one
    #: label per token or frame, or a multi-hot vector.
    label_dims = 0
    example_kind_known = True

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return (outputs, labels) of the examples that count."""
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise TaskError(f"{self.name}: a dict batch needs a {self.label_key!r} entry; it has {', '.join(map(repr, batch))}")
            labels = batch[self.label_key]
            out = model(**{k: v for k, v in batch.items() if k != self.label_key})
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            *inputs, labels = batch
            out = model(*inputs)
        else:
            raise TaskError(f"{self.name}: expected a batch (inputs..., labels) or a dict with {self.label_key!r}, got {describe(batch)}")
        if not isinstance(labels, torch.Tensor):
            raise TaskError(f"{self.name}: the batch's labels are {describe(labels)}, not a tensor; {self.data_hint()}")
        return logits_of(out), labels

    def examples(self, outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, labels) with one row per counted example."""
        return outputs, labels

    def collate(self, samples: list[Any]) -> Any:
        """Tuples are stacked; dicts too, with sequences of different lengths right-padded with 0."""
        return pad_dicts(samples, {})

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """Sums over the batch's examples; the trainer divides by the example count."""
        return {}

    def check_outputs(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Raise `TaskError` with the fix when the outputs do not fit the labels."""

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        outputs, labels = self.examples(*self.forward(model, batch, train=train))
        with torch.no_grad():
            sums = self.metrics(outputs.detach(), labels)
        loss = self.loss(outputs, labels) if labels.shape[0] else outputs.sum() * 0.0  # no example counts here
        result = StepResult(loss, int(labels.shape[0]), sums)
        if not train:
            result.outputs, result.targets = outputs.detach(), labels
        return result

    def check(self, model: nn.Module, batch: Any) -> None:
        try:
            outputs, labels = self.forward(model, batch, train=True)
        except TaskError:
            raise
        except Exception as exc:  # the model's own error, reported with what it was given
            raise TaskError(
                f"{self.name}: the model fails on the first training batch ({describe(batch)}): {type(exc).__name__}: {exc}. "
                f"{self.call_hint()}"
            ) from exc
        self.check_outputs(outputs, labels)
        try:
            self.loss(*self.examples(outputs, labels))
        except Exception as exc:
            raise TaskError(
                f"{self.name}: the loss cannot be computed on the first training batch (outputs {tuple(outputs.shape)}, "
                f"labels {tuple(labels.shape)} {labels.dtype}): {type(exc).__name__}: {exc}"
            ) from exc

    def call_hint(self) -> str:
        return "The model gets a batch's inputs positionally (a dict batch: as keyword arguments); see docs/trainer.md"

    def data_hint(self) -> str:
        one = "one number" if self.label_dims == 0 else "a 1-D tensor"
        return f"a sample is (inputs..., label) with {one} as its label, or a dict with a {self.label_key!r} entry; a batch has a batch dimension in front of each"

    def example_kind(self, element: Any) -> str | None:
        if isinstance(element, Mapping):
            labels, first = element.get(self.label_key), next((v for k, v in element.items() if k != self.label_key), None)
        elif isinstance(element, (tuple, list)) and len(element) >= 2:
            labels, first = element[-1], element[0]
        else:
            return None
        if labels is None:
            return None
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):
                return None
        if labels.dim() == self.label_dims:
            return SAMPLE
        if labels.dim() == self.label_dims + 1:
            if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] != labels.shape[0]:
                # (x, y) with y of shape (1,): one sample whose label kept a dimension
                return SAMPLE if labels.shape[-1] == 1 and self.label_dims == 0 else None
            return BATCH
        return None


class Classification(Supervised):
    """Single-label classification: cross-entropy and accuracy over the examples
    `forward` selects; evaluation adds macro-F1, per-class accuracy and the confusion
    matrix. Outputs are logits ``(batch, classes)``, labels class indices ``(batch,)``."""

    name = "classification"
    metric = "accuracy"
    #: The task for one label per time step, named in the per-frame error message.
    sequence_task = "frame-classification (audio) or token-classification (text)"

    def examples(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, (labels.reshape(-1) if labels.dim() > 1 and labels.shape[-1] == 1 else labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        return {"accuracy": (logits.argmax(-1) == labels).sum()}

    def eval_metrics(self, width: int) -> Any:
        return metric_sets.classification(width, ignore_index=IGNORE)

    def check_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = self.examples(logits, labels)[1]
        out, lab = tuple(logits.shape), tuple(labels.shape)
        if labels.is_floating_point() and logits.shape != labels.shape:
            raise TaskError(
                f"{self.name}: the labels are floating point {lab}; single-label classification needs class indices (integers). "
                "For one 0/1 target per class use task='multi-label-classification'; for numbers to predict, task='regression'"
            )
        if logits.dim() == labels.dim() + 2 and logits.shape[:1] == labels.shape[:1]:
            raise TaskError(
                f"{self.name}: the model outputs {out}: a score vector per time step (frame or token), but there is one label per "
                f"example {lab}. Pool over time in the model (e.g. logits.mean(1), or the first token), or use task={self.sequence_task} "
                "with one label per step"
            )
        one_number = logits.dim() == labels.dim() or (logits.dim() == labels.dim() + 1 and logits.shape[-1] == 1)
        if one_number and not labels.is_floating_point():
            raise TaskError(
                f"{self.name}: the model outputs {out}: one number per example, but classification needs one score per class, "
                f"(batch, classes). Make its last layer output the number of classes; for numbers to predict use task='regression'"
            )
        if logits.dim() != labels.dim() + 1 and logits.shape != labels.shape:
            raise TaskError(f"{self.name}: the model outputs {out} for labels {lab}; classification expects (batch, classes) and (batch,)")
        if logits.shape[0] != labels.shape[0]:
            raise TaskError(f"{self.name}: the model outputs {out[0]} rows for {lab[0]} labels; it must return one row per example")
        if not labels.is_floating_point() and labels.numel():
            counted = labels[labels != IGNORE]
            top = int(counted.max()) if counted.numel() else 0
            if top >= logits.shape[-1] or (counted.numel() and int(counted.min()) < 0):
                raise TaskError(
                    f"{self.name}: labels go from {int(counted.min())} to {top}, but the model outputs {logits.shape[-1]} scores per "
                    f"example; make it output at least {top + 1} (the number of classes), and use labels 0 … classes-1"
                )


class ImageClassification(Classification):
    """Batches ``(images, labels)``, or dicts such as ``{"pixel_values", "labels"}``."""

    name = "image-classification"


class AudioClassification(Classification):
    """Batches ``(waveforms, lengths, labels)``: the model is called as
    ``model(waveforms, lengths)`` (or ``model(waveforms)`` with ``pass_lengths=False``),
    so it can ignore the padding. Dataset samples ``(waveform, label)`` of any length
    are padded with zeros along the last dimension."""

    name = "audio-classification"
    sequence_task = "'frame-classification'"

    def __init__(self, pass_lengths: bool = True) -> None:
        self.pass_lengths = pass_lengths

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(model, _without_lengths(batch, self.pass_lengths), train=train)

    def collate(self, samples: list[Any]) -> Any:
        return pad_waves(samples, default_collate([s[-1] for s in samples]))

    def call_hint(self) -> str:
        how = "model(waveforms, lengths)" if self.pass_lengths else "model(waveforms)"
        return f"The {self.name} task calls {how} with waveforms (batch, …, samples); AudioClassification(pass_lengths=False) leaves out the lengths"


class TextClassification(Classification):
    """Batches are dicts of tensors (``input_ids``, ``attention_mask``, …) with
    ``labels``; the model gets everything but the labels as keyword arguments. Dataset
    samples of different lengths are right-padded: ``input_ids`` with ``pad_id``, other
    sequences with 0 (so give samples an ``attention_mask`` if the model needs one)."""

    name = "text-classification"
    sequence_task = "'token-classification'"

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def collate(self, samples: list[Any]) -> Any:
        return pad_dicts(samples, {"input_ids": self.pad_id})


class TokenClassification(Classification):
    """One label per token: dict batches as in text classification, with ``labels`` of
    shape (batch, tokens) and -100 where a token counts for nothing (padding, special
    tokens). The model returns (batch, tokens, classes); accuracy and the loss are over
    the labelled tokens."""

    name = "token-classification"
    label_dims = 1
    sequence_task = "'token-classification'"

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def examples(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.dim() < 3:
            return logits, labels
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        keep = labels != IGNORE
        return logits[keep], labels[keep]

    def collate(self, samples: list[Any]) -> Any:
        return pad_dicts(samples, {"input_ids": self.pad_id, self.label_key: IGNORE})

    def check_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        out, lab = tuple(logits.shape), tuple(labels.shape)
        if labels.dim() != 2:
            raise TaskError(f"{self.name}: the labels are {lab}; give one label per step, (batch, steps), with -100 where none applies")
        if logits.dim() == 2:
            raise TaskError(
                f"{self.name}: the model outputs {out}: one score vector per example, but the labels are per step {lab}. "
                "Return the per-step scores (batch, steps, classes), or use a per-example classification task"
            )
        if logits.dim() != 3 or logits.shape[:2] != labels.shape[:2]:
            raise TaskError(
                f"{self.name}: the model outputs {out} for labels {lab}: it must return (batch, steps, classes) with the labels' "
                f"{lab[1] if len(lab) > 1 else '?'} steps. Give one label per output step (pad with -100)"
            )
        super().check_outputs(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class FrameClassification(TokenClassification):
    """One label per output frame of an audio model: samples ``(waveform, frame_labels)``
    are batched as ``(waveforms, lengths, labels)`` — waveforms padded with zeros, labels
    with -100 — and the model is called as ``model(waveforms, lengths)`` (or
    ``model(waveforms)`` with ``pass_lengths=False``) and returns (batch, frames,
    classes)."""

    name = "frame-classification"
    sequence_task = "'frame-classification'"

    def __init__(self, pass_lengths: bool = True) -> None:
        self.pass_lengths = pass_lengths

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(model, _without_lengths(batch, self.pass_lengths), train=train)

    call_hint = AudioClassification.call_hint

    def collate(self, samples: list[Any]) -> Any:
        labels = nn.utils.rnn.pad_sequence([torch.as_tensor(s[-1]) for s in samples], batch_first=True, padding_value=IGNORE)
        return pad_waves(samples, labels)


class MultiLabelClassification(Supervised):
    """Any number of classes per example: outputs are logits (batch, classes), labels
    0/1 targets of the same shape. Binary cross-entropy on the logits; ``accuracy`` is
    the share of (example, class) decisions that are right (logit > 0 means "on");
    evaluation adds macro-F1 and each label's accuracy."""

    name = "multi-label-classification"
    metric = "accuracy"
    label_dims = 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        return {"accuracy": ((logits > 0) == (labels > 0.5)).float().mean(-1).sum()}

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        result = super().step(model, batch, train=train)
        if result.targets is not None:
            result.targets = (result.targets > 0.5).long()
        return result

    def eval_metrics(self, width: int) -> Any:
        return metric_sets.multilabel(width)

    def check_outputs(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if labels.dim() != 2:
            raise TaskError(
                f"{self.name}: the labels are {tuple(labels.shape)}; multi-label needs one 0/1 target per class and example, "
                "(batch, classes). For one class per example use a classification task"
            )
        if logits.shape != labels.shape:
            raise TaskError(
                f"{self.name}: the model outputs {tuple(logits.shape)} for labels {tuple(labels.shape)}; it must output one logit "
                "per class, the labels' shape"
            )


class Regression(Supervised):
    """Numbers to predict: targets of shape (batch,) — or (batch, outputs) with
    ``Regression(target_dims=1)`` — and outputs of the same shape ((batch, 1) is fine
    for one target). Mean squared error is the loss; ``mae`` and ``mse`` are reported,
    and evaluation adds R²."""

    name = "regression"
    metric = "mae"

    def __init__(self, target_dims: int = 0) -> None:
        self.label_dims = target_dims

    def examples(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        return outputs, targets

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs.float(), targets.float())

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor | float]:
        error = (outputs.float() - targets.float()).reshape(targets.shape[0], -1)
        return {"mae": error.abs().mean(1).sum(), "mse": error.pow(2).mean(1).sum()}

    def eval_metrics(self, width: int) -> Any:
        return metric_sets.regression(width)

    def check_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs, targets = self.examples(outputs, targets)
        if not targets.is_floating_point():
            targets = targets.float()  # integer targets are numbers too
        if outputs.shape != targets.shape:
            raise TaskError(
                f"{self.name}: the model outputs {tuple(outputs.shape)} for targets {tuple(targets.shape)}; it must output one number "
                "per target, (batch,) or (batch, 1) for one target per example"
            )


# ---------------------------------------------------------------------- graphs

#: The node masks a graph may carry; a mask that is missing means the nodes no other mask claims.
NODE_MASKS = ("train_mask", "val_mask", "test_mask")


class NodeClassification(Classification):
    """One graph (a PyG ``Data``) with boolean node masks, or mini-batches of subgraphs
    from torch_geometric's loaders. Training counts the nodes in ``train_mask``,
    evaluation those in ``eval_mask`` (pass the same graph as train and val data);
    batches from NeighborLoader count only their ``batch_size`` seed nodes. A mask the
    graph lacks stands for the nodes that none of its other masks (``train_mask``,
    ``val_mask``, ``test_mask``) claims — KarateClub's held-out nodes are those outside
    its ``train_mask`` — and a graph without any mask counts every node. The model is
    called as ``model(x, edge_index)``; override `call` for other inputs."""

    name = "node-classification"
    example_kind_known = False

    def __init__(self, train_mask: str = "train_mask", eval_mask: str = "val_mask") -> None:
        self.train_mask = train_mask
        self.eval_mask = eval_mask

    def call(self, model: nn.Module, batch: Any) -> Any:
        return model(batch.x, batch.edge_index)

    def collate(self, samples: list[Any]) -> Any:
        return _graph_batch(samples)

    def batches(self, data: Any, *, train: bool, spec: LoaderSpec) -> Iterable[Any]:
        if isinstance(data, Dataset) and not isinstance(data, DataLoader) and len(data) == 1 and _is_graph(data[0]):
            data = data[0]  # a one-graph dataset such as Planetoid
        if _is_graph(data):
            # Full batch: every rank trains on the same, correct gradient; one rank evaluates.
            return [data] if train or spec.rank == 0 else []
        return super().batches(data, train=train, spec=spec)

    def nodes(self, graph: Any, *, train: bool) -> tuple[torch.Tensor | None, str]:
        """The boolean mask of the nodes a figure counts, and in words which they are."""
        name = self.train_mask if train else self.eval_mask
        mask = getattr(graph, name, None)
        if mask is not None:
            return mask.to(torch.bool), name
        others = [m for m in dict.fromkeys((self.train_mask, self.eval_mask, *NODE_MASKS)) if m != name]
        present = [m for m in others if getattr(graph, m, None) is not None]
        if not present:
            return None, "every node (the graph has no masks)"
        claimed = torch.zeros_like(getattr(graph, present[0]), dtype=torch.bool)
        for m in present:
            claimed |= getattr(graph, m).to(torch.bool)
        return ~claimed, f"the nodes in no {' or '.join(present)} (the graph has no {name})"

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(self.call(model, batch))
        labels = batch.y
        keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        seeds = getattr(batch, "batch_size", None)
        if isinstance(seeds, int):
            keep[seeds:] = False
        mask, _ = self.nodes(batch, train=train)
        if mask is not None:
            keep &= mask.to(keep.device)
        return logits[keep], labels[keep]

    def describe_split(self, train_data: Any, val_data: Any) -> str | None:
        if not _is_graph(train_data):
            return None
        train_nodes, train_how = self.nodes(train_data, train=True)
        line = f"{self.name}: train_ figures on {_count(train_nodes, train_data)} nodes: {train_how}"
        if val_data is None or not _is_graph(val_data):
            return line
        val_nodes, val_how = self.nodes(val_data, train=False)
        if val_data is train_data and (val_nodes is None or train_nodes is None or bool((val_nodes & train_nodes).any())):
            overlap = "every node" if val_nodes is None or train_nodes is None else f"{int((val_nodes & train_nodes).sum())} nodes"
            raise TaskError(
                f"{self.name}: the validation graph is the training graph and {overlap} would be both trained on and validated on, "
                f"so nothing is held out (train: {train_how}; val: {val_how}). Give the graph a {self.eval_mask} (and a "
                f"{self.train_mask}) that do not overlap, or pass no val_data"
            )
        if val_nodes is not None and not bool(val_nodes.any()):
            raise TaskError(f"{self.name}: no node is left to validate on ({val_how}); give the graph a {self.eval_mask}")
        return f"{line}; val_ figures on {_count(val_nodes, val_data)} nodes: {val_how}"


class GraphClassification(Classification):
    """Batches of graphs (PyG ``Batch``: ``.x``, ``.edge_index``, ``.batch``, one label
    per graph in ``.y``). A list or Dataset of single graphs is batched with PyG's
    ``Batch.from_data_list``. The model is called as ``model(x, edge_index, batch)``;
    override `call` for other inputs."""

    name = "graph-classification"
    example_kind_known = False

    def call(self, model: nn.Module, batch: Any) -> Any:
        index = getattr(batch, "batch", None)
        if index is None:
            index = torch.zeros(batch.x.shape[0], dtype=torch.long, device=batch.x.device)
        return model(batch.x, batch.edge_index, index)

    def collate(self, samples: list[Any]) -> Any:
        return _graph_batch(samples)

    def batches(self, data: Any, *, train: bool, spec: LoaderSpec) -> Iterable[Any]:
        if isinstance(data, (list, tuple)) and data and _is_graph(data[0]) and getattr(data[0], "batch", None) is None:
            return loader(list(data), train=train, spec=spec, batch_size=spec.batch_size, collate_fn=self.collate, shuffle=train)
        return super().batches(data, train=train, spec=spec)

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_of(self.call(model, batch)), batch.y.reshape(-1)


BUILTIN: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        ImageClassification,
        NodeClassification,
        GraphClassification,
        AudioClassification,
        TextClassification,
        TokenClassification,
        FrameClassification,
        MultiLabelClassification,
        Regression,
    )
}


def available_tasks() -> dict[str, Task | type[Task]]:
    """Every task by name: the built-in ones, then those plugins register (a plugin may
    replace a built-in task of the same name)."""
    from ..registry import registry

    return {**BUILTIN, **registry().tasks}


def get_task(task: str | Task | type[Task] | Callable[[nn.Module, Any], torch.Tensor]) -> Task:
    """A task from a name, a Task (class or instance), or a loss function."""
    if isinstance(task, Task):
        return task
    if isinstance(task, type) and issubclass(task, Task):
        return task()
    if isinstance(task, str):
        known = available_tasks()
        if task not in known:
            raise TaskError(
                f"unknown task {task!r}; known tasks: {', '.join(sorted(known))} (or pass a Task, or a function loss = fn(model, batch))"
            )
        found = known[task]
        return found() if isinstance(found, type) else found
    if callable(task):
        return LossTask(task)
    raise TaskError(f"task must be a name, a lora_anywhere.Task or a function loss = fn(model, batch), got {task!r}")


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model's output, whatever container holds them."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TaskError(
            f"cannot find logits in the model's output ({type(out).__name__}); return a tensor, a tuple starting with one, or an object with .logits"
        )
    return logits


# ---------------------------------------------------------------------- collation


def pad_waves(samples: list[Any], labels: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(waveforms, lengths, labels)`` from ``(waveform, …)`` samples of any length:
    zero-padded along the last dimension."""
    waves = [torch.as_tensor(s[0]) for s in samples]
    lengths = torch.tensor([w.shape[-1] for w in waves])
    out = waves[0].new_zeros((len(waves), *waves[0].shape[:-1], int(lengths.max())))
    for i, w in enumerate(waves):
        out[i, ..., : w.shape[-1]] = w
    return out, lengths, labels


def pad_dicts(samples: list[Any], pads: dict[str, int]) -> Any:
    """Dict samples into one dict batch; sequences of different lengths are right-padded
    with ``pads[key]`` (0 for keys not named)."""
    if not isinstance(samples[0], Mapping):
        return default_collate(samples)
    out = {}
    for key in samples[0]:
        values = [torch.as_tensor(s[key]) for s in samples]
        if values[0].dim() >= 1 and len({v.shape[0] for v in values}) > 1:
            out[key] = nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pads.get(key, 0))
        else:
            out[key] = torch.stack(values)
    return out


def _without_lengths(batch: Any, pass_lengths: bool) -> Any:
    """An audio batch ``(waveforms, lengths, labels)`` as ``(waveforms, labels)`` when the
    model takes no lengths."""
    if not pass_lengths and isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[2]
    return batch


def _graph_batch(graphs: list[Any]) -> Any:
    from torch_geometric.data import Batch  # only reached with PyG graphs in hand

    return Batch.from_data_list(graphs)


def _is_graph(obj: Any) -> bool:
    return hasattr(obj, "edge_index") and hasattr(obj, "x") and not isinstance(obj, (Dataset, DataLoader))


def _count(mask: torch.Tensor | None, graph: Any) -> int:
    return int(graph.num_nodes if mask is None else mask.sum())
