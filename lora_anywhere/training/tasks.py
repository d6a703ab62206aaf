"""Tasks: what one training step means for one kind of data.

The trainer knows nothing about images, graphs, audio or text; a task turns the
user's data into this process's batches and one batch into a loss and metric sums.
The built-in tasks work by duck typing, so the core never imports torch_geometric,
torchaudio or transformers: a graph batch is anything with ``.x``, ``.edge_index``
and ``.y``; an audio batch is ``(waveforms, lengths, labels)``; a text batch is a
dict of tensors with ``"labels"``.

A user changes a task by subclassing it (override `forward`, `loss`, `metrics` or
the whole `step`), or replaces it with a plain function ``loss = fn(model, batch)``.
Plugins add tasks by name through the ``lora_anywhere_register_tasks`` hook.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from ..errors import TaskError


@dataclass
class StepResult:
    """One batch's outcome. ``loss`` is the mean over ``count`` examples (it is what
    backward runs on); ``sums`` are metric totals over those examples, so that epoch
    metrics are exact means however the batches are sized or sharded."""

    loss: torch.Tensor
    count: int
    sums: dict[str, torch.Tensor | float]


@dataclass(frozen=True)
class LoaderSpec:
    """How the trainer wants data cut into batches for this process."""

    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1


class Task:
    """Base class of tasks. Subclasses implement `step`; most subclass `Classification`
    and override `forward` instead."""

    name: str = "custom"
    #: The main metric ("accuracy"), shown in progress bars; higher is better.
    metric: str | None = None

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__} must implement step(model, batch, *, train)")

    def collate(self, samples: list[Any]) -> Any:
        """Turn samples of a Dataset into one batch."""
        return default_collate(samples)

    def batches(self, data: Any, *, train: bool, spec: LoaderSpec) -> Iterable[Any]:
        """This process's batches for one epoch.

        A map-style Dataset gets a DataLoader whose order depends only on (seed,
        epoch), so a resumed run sees the same batches. Under DDP, training shards
        are padded to equal length (every rank must take the same number of steps)
        while evaluation shards are not (no sample is counted twice).
        """
        if _is_iterator(data):
            raise TaskError(
                "training data must be re-iterable (a Dataset, DataLoader or list of batches), not a one-shot iterator or generator"
            )
        if isinstance(data, Dataset) and not isinstance(data, (IterableDataset, DataLoader)):
            return self._loader(data, train=train, spec=spec, batch_size=spec.batch_size, collate_fn=self.collate, shuffle=train)
        if spec.world_size == 1:
            return data
        if _plain_loader(data):
            return self._loader(
                data.dataset,
                train=train,
                spec=spec,
                batch_size=data.batch_size,
                collate_fn=data.collate_fn,
                shuffle=train and isinstance(data.sampler, RandomSampler),
                num_workers=data.num_workers,
                pin_memory=data.pin_memory,
                drop_last=data.drop_last,
                worker_init_fn=data.worker_init_fn,
            )
        return Strided(data, spec.rank, spec.world_size, equal=train)

    def _loader(self, dataset: Any, *, train: bool, spec: LoaderSpec, shuffle: bool, **kwargs: Any) -> DataLoader:
        kwargs.setdefault("num_workers", spec.num_workers)
        if train:
            sampler: Any = DistributedSampler(dataset, num_replicas=spec.world_size, rank=spec.rank, shuffle=shuffle, seed=spec.seed)
            sampler.set_epoch(spec.epoch)
        else:
            sampler = range(spec.rank, len(dataset), spec.world_size)
        return DataLoader(dataset, sampler=sampler, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class LossTask(Task):
    """A task made of a plain function ``loss = fn(model, batch)``: no metrics, and the
    batch goes to the function as the data gives it."""

    def __init__(self, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "loss-function")

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        return StepResult(self.fn(model, batch), 1, {})


class Classification(Task):
    """Cross-entropy and accuracy over the examples `forward` selects.

    A batch is ``(inputs..., labels)`` — the model gets the inputs positionally — or a
    dict with ``labels`` — the model gets the other keys as keyword arguments. The
    output may be logits, a tuple starting with them, or an object with ``.logits``
    (as transformers models return)."""

    name = "classification"
    metric = "accuracy"
    label_key = "labels"

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return (logits, labels) of the examples that count."""
        if isinstance(batch, Mapping):
            if self.label_key not in batch:
                raise TaskError(f"{self.name}: a dict batch needs a {self.label_key!r} entry; it has {', '.join(map(repr, batch))}")
            labels = batch[self.label_key]
            out = model(**{k: v for k, v in batch.items() if k != self.label_key})
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            *inputs, labels = batch
            out = model(*inputs)
        else:
            raise TaskError(
                f"{self.name}: expected a batch (inputs..., labels) or a dict with {self.label_key!r}, got {type(batch).__name__}"
            )
        return logits_of(out), labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """Sums over the batch's examples; the trainer divides by the example count."""
        return {"accuracy": (logits.argmax(-1) == labels).sum()}

    def step(self, model: nn.Module, batch: Any, *, train: bool) -> StepResult:
        logits, labels = self.forward(model, batch, train=train)
        labels = labels.reshape(-1) if labels.dim() > 1 and labels.shape[-1] == 1 else labels
        with torch.no_grad():
            sums = self.metrics(logits.detach(), labels)
        return StepResult(self.loss(logits, labels), int(labels.shape[0]), sums)


class ImageClassification(Classification):
    """Batches ``(images, labels)``, or dicts such as ``{"pixel_values", "labels"}``."""

    name = "image-classification"


class AudioClassification(Classification):
    """Batches ``(waveforms, lengths, labels)``: the model is called as
    ``model(waveforms, lengths)`` (or ``model(waveforms)`` with ``pass_lengths=False``),
    so it can ignore the padding. Dataset samples ``(waveform, label)`` of any length
    are padded with zeros along the last dimension."""

    name = "audio-classification"

    def __init__(self, pass_lengths: bool = True) -> None:
        self.pass_lengths = pass_lengths

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pass_lengths and isinstance(batch, (tuple, list)) and len(batch) == 3:
            batch = (batch[0], batch[2])
        return super().forward(model, batch, train=train)

    def collate(self, samples: list[Any]) -> Any:
        waves = [torch.as_tensor(s[0]) for s in samples]
        lengths = torch.tensor([w.shape[-1] for w in waves])
        out = waves[0].new_zeros((len(waves), *waves[0].shape[:-1], int(lengths.max())))
        for i, w in enumerate(waves):
            out[i, ..., : w.shape[-1]] = w
        return out, lengths, default_collate([s[-1] for s in samples])


class TextClassification(Classification):
    """Batches are dicts of tensors (``input_ids``, ``attention_mask``, …) with
    ``labels``; the model gets everything but the labels as keyword arguments. Dataset
    samples of different lengths are right-padded: ``input_ids`` with ``pad_id``, other
    sequences with 0 (so give samples an ``attention_mask`` if the model needs one)."""

    name = "text-classification"

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def collate(self, samples: list[Any]) -> Any:
        if not isinstance(samples[0], Mapping):
            return default_collate(samples)
        out = {}
        for key in samples[0]:
            values = [torch.as_tensor(s[key]) for s in samples]
            if values[0].dim() >= 1 and len({v.shape[0] for v in values}) > 1:
                pad = self.pad_id if key == "input_ids" else 0
                out[key] = nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
            else:
                out[key] = torch.stack(values)
        return out


class NodeClassification(Classification):
    """One graph (a PyG ``Data``) with boolean node masks, or mini-batches of subgraphs
    from torch_geometric's loaders. Training counts the nodes in ``train_mask``,
    evaluation those in ``eval_mask`` (pass the same graph as train and val data);
    batches from NeighborLoader count only their ``batch_size`` seed nodes. The model
    is called as ``model(x, edge_index)``; override `call` for other inputs."""

    name = "node-classification"

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
            return [data]  # full batch: every rank computes the same, correct gradient
        return super().batches(data, train=train, spec=spec)

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(self.call(model, batch))
        labels = batch.y
        keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        seeds = getattr(batch, "batch_size", None)
        if isinstance(seeds, int):
            keep[seeds:] = False
        mask = getattr(batch, self.train_mask if train else self.eval_mask, None)
        if mask is not None:
            keep &= mask.to(torch.bool)
        return logits[keep], labels[keep]


class GraphClassification(Classification):
    """Batches of graphs (PyG ``Batch``: ``.x``, ``.edge_index``, ``.batch``, one label
    per graph in ``.y``). A list or Dataset of single graphs is batched with PyG's
    ``Batch.from_data_list``. The model is called as ``model(x, edge_index, batch)``;
    override `call` for other inputs."""

    name = "graph-classification"

    def call(self, model: nn.Module, batch: Any) -> Any:
        index = getattr(batch, "batch", None)
        if index is None:
            index = torch.zeros(batch.x.shape[0], dtype=torch.long, device=batch.x.device)
        return model(batch.x, batch.edge_index, index)

    def collate(self, samples: list[Any]) -> Any:
        return _graph_batch(samples)

    def batches(self, data: Any, *, train: bool, spec: LoaderSpec) -> Iterable[Any]:
        if isinstance(data, (list, tuple)) and data and _is_graph(data[0]) and getattr(data[0], "batch", None) is None:
            return self._loader(list(data), train=train, spec=spec, batch_size=spec.batch_size, collate_fn=self.collate, shuffle=train)
        return super().batches(data, train=train, spec=spec)

    def forward(self, model: nn.Module, batch: Any, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_of(self.call(model, batch)), batch.y.reshape(-1)


BUILTIN: dict[str, type[Task]] = {
    cls.name: cls for cls in (ImageClassification, NodeClassification, GraphClassification, AudioClassification, TextClassification)
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


class Strided:
    """Every ``world_size``-th batch of an iterable, starting at ``rank``. With
    ``equal``, each rank gets the same number of batches (the tail is dropped), as
    DDP training needs."""

    def __init__(self, data: Iterable[Any], rank: int, world_size: int, *, equal: bool) -> None:
        self.data, self.rank, self.world_size, self.equal = data, rank, world_size, equal
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise TaskError(
                "under DDP, data without len() cannot be split evenly across ranks; pass a Dataset, a DataLoader or a list of batches"
            ) from None
        self.length = total // world_size if equal else len(range(rank, total, world_size))
        if equal and self.length == 0:
            raise TaskError(f"{total} batches cannot feed {world_size} ranks; use smaller batches or fewer processes")

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.data, self.rank, self.rank + self.length * self.world_size, self.world_size)


def _graph_batch(graphs: list[Any]) -> Any:
    from torch_geometric.data import Batch  # only reached with PyG graphs in hand

    return Batch.from_data_list(graphs)


def _is_graph(obj: Any) -> bool:
    return hasattr(obj, "edge_index") and hasattr(obj, "x") and not isinstance(obj, (Dataset, DataLoader))


def _is_iterator(obj: Any) -> bool:
    return isinstance(obj, Iterator) and iter(obj) is obj


def _plain_loader(data: Any) -> bool:
    """A torch DataLoader that can be rebuilt with a DistributedSampler (a subclass,
    such as PyG's neighbour loaders, may sample in ways a rebuild would lose)."""
    return (
        type(data) is DataLoader
        and data.batch_size is not None
        and not isinstance(data.dataset, IterableDataset)
        and isinstance(data.sampler, (RandomSampler, SequentialSampler))
    )
