"""Turning what the user passes as data into this process's batches.

The trainer accepts a map-style Dataset, a DataLoader, a list of samples, a list of
batches, or (node classification) one graph. Which of the two lists a list is, is
decided by looking at its first element with the task's own `Task.example_kind`: a
classification sample has one label (a number), a batch a vector of them. What the
task cannot tell apart is refused with a message that names the cause and the fix,
instead of a TypeError from deep inside the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from ..errors import TaskError

if TYPE_CHECKING:
    from .tasks import Task

SAMPLE, BATCH = "sample", "batch"


@dataclass(frozen=True)
class LoaderSpec:
    """How the trainer wants data cut into batches for this process."""

    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1


def standard_batches(task: Task, data: Any, *, train: bool, spec: LoaderSpec) -> Iterable[Any]:
    """This process's batches for one epoch, for data of any of the accepted kinds.

    A map-style Dataset or a list of samples gets a DataLoader (``batch_size``, the
    task's ``collate``) whose order depends only on (seed, epoch), so a resumed run sees
    the same batches. A DataLoader or a list of batches is used as it is. Under DDP,
    training shards are padded to equal length (every rank must take the same number
    of steps) while evaluation shards are not (no sample is counted twice).
    """
    if is_iterator(data):
        raise TaskError(
            "training data must be re-iterable (a Dataset, DataLoader, or a list of samples or batches), not a one-shot iterator or generator; "
            "wrap it in list(...)"
        )
    if isinstance(data, Dataset) and not isinstance(data, (IterableDataset, DataLoader)):
        return loader(data, train=train, spec=spec, batch_size=spec.batch_size, collate_fn=task.collate, shuffle=train)
    if isinstance(data, (list, tuple)) and list_of_samples(task, data):
        return loader(list(data), train=train, spec=spec, batch_size=spec.batch_size, collate_fn=task.collate, shuffle=train)
    if spec.world_size == 1:
        return data
    if plain_loader(data):
        return loader(
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


def loader(dataset: Any, *, train: bool, spec: LoaderSpec, shuffle: bool, **kwargs: Any) -> DataLoader:
    """A DataLoader over this process's share: a seeded DistributedSampler for training,
    every ``world_size``-th index for evaluation."""
    kwargs.setdefault("num_workers", spec.num_workers)
    if train:
        sampler: Any = DistributedSampler(dataset, num_replicas=spec.world_size, rank=spec.rank, shuffle=shuffle, seed=spec.seed)
        sampler.set_epoch(spec.epoch)
    else:
        sampler = range(spec.rank, len(dataset), spec.world_size)
    return DataLoader(dataset, sampler=sampler, **kwargs)


def list_of_samples(task: Task, data: list[Any] | tuple[Any, ...]) -> bool:
    """Whether a list holds samples (to be batched) rather than batches (used as they
    are), judged by its first element; a list the task cannot judge is taken as batches."""
    if not data:
        raise TaskError("the data is an empty list: give at least one sample or batch")
    kind = task.example_kind(data[0])
    if kind == SAMPLE:
        return True
    if kind is None and task.example_kind_known:
        raise TaskError(
            f"{task.name}: cannot tell whether the list's first element ({describe(data[0])}) is one sample or a batch. "
            f"{task.data_hint()}; or pass a Dataset (one sample per item) or a DataLoader (batches)"
        )
    return False


def check_dataset(task: Task, dataset: Any) -> None:
    """A Dataset must give one sample per item: one that gives whole batches would be
    batched again, and the model would get a batch of batches. (Reads item 0 once.)"""
    if not task.example_kind_known or not isinstance(dataset, Dataset) or isinstance(dataset, (IterableDataset, DataLoader)):
        return
    try:
        first = dataset[0]  # type: ignore[index]
    except Exception:  # a dataset that cannot be indexed at 0 fails later, in its DataLoader, with its own error
        return
    if task.example_kind(first) == BATCH:
        raise TaskError(
            f"{task.name}: the Dataset's items are whole batches ({describe(first)}); a Dataset gives one sample per item, "
            "which the trainer batches with batch_size. Pass these batches as a list or a DataLoader(dataset, batch_size=None) instead"
        )


def describe(obj: Any) -> str:
    """A short account of a sample or batch for an error message: types and shapes."""
    if isinstance(obj, torch.Tensor):
        return f"tensor {tuple(obj.shape)}" if obj.dim() else f"tensor({obj.item():g})"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(obj.items())[:6]) + "}"
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(describe(v) for v in obj[:4]) + (", …" if len(obj) > 4 else "")
        return f"({inner})" if isinstance(obj, tuple) else f"[{inner}]"
    if isinstance(obj, (int, float, bool)):
        return repr(obj)
    return type(obj).__name__


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


def length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch with every tensor in it moved to `device`, containers kept."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    to = getattr(obj, "to", None)
    return to(device) if callable(to) else obj  # a PyG Data/Batch, a BatchEncoding


def is_iterator(obj: Any) -> bool:
    return isinstance(obj, Iterator) and iter(obj) is obj


def plain_loader(data: Any) -> bool:
    """A torch DataLoader that can be rebuilt with a DistributedSampler (a subclass,
    such as PyG's neighbour loaders, may sample in ways a rebuild would lose)."""
    return (
        type(data) is DataLoader
        and data.batch_size is not None
        and not isinstance(data.dataset, IterableDataset)
        and isinstance(data.sampler, (RandomSampler, SequentialSampler))
    )
