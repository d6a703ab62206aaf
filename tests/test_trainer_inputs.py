"""What the trainer does with what a new user hands it: lists of samples are batched,
lists of batches and DataLoaders are used as they are, and what cannot be told apart
fails naming the cause; a model whose output does not fit the labels fails before the
first step with the fix in the message; node classification figures are on the
dataset's own held-out nodes, and nothing is reported as validation that was trained on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lora_anywhere as la
from lora_anywhere.errors import TaskError
from lora_anywhere.training.tasks import LoaderSpec, NodeClassification
from lora_anywhere.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


def xor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return la.apply(mlp(), rank=4)


def batches_of(trainer: Trainer, data) -> list:
    return list(trainer.task.batches(data, train=True, spec=trainer._spec(0)))


# ---------------------------------------------------------------------- lists, datasets, loaders


def test_a_list_of_samples_is_batched_with_batch_size_and_trains() -> None:
    x, y = xor(200, 0)
    samples = [(x[i], int(y[i])) for i in range(200)]  # what a new user builds by hand
    trainer = Trainer(adapted(), samples, samples[:64], task="image-classification", epochs=12, lr=3e-2, batch_size=16)
    batches = batches_of(trainer, samples)
    assert len(batches) == 13 and batches[0][0].shape == (16, 8) and batches[0][1].shape == (16,)
    history = trainer.fit()
    assert history[-1]["val_accuracy"] >= 0.8, history[-1]  # chance: 0.5


def test_a_list_of_batches_and_a_dataloader_are_used_as_they_are() -> None:
    x, y = xor(64, 0)
    as_batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 64, 10)]
    trainer = Trainer(adapted(), as_batches, task="image-classification", batch_size=4)
    assert [len(b[1]) for b in batches_of(trainer, as_batches)] == [10, 10, 10, 10, 10, 10, 4]
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    assert [len(b[1]) for b in batches_of(Trainer(adapted(), loader, task="image-classification"), loader)] == [20, 20, 20, 4]


def test_lists_of_dict_and_audio_samples_are_padded_per_batch() -> None:
    text = [{"input_ids": torch.arange(1, 3 + i % 4), "labels": i % 2} for i in range(10)]
    task = la.tasks.TextClassification()
    first = next(iter(task.batches(text, train=False, spec=LoaderSpec(batch_size=4))))
    assert first["input_ids"].shape == (4, 5) and first["labels"].tolist() == [0, 1, 0, 1]
    audio = [(torch.randn(100 + 10 * i), i % 3) for i in range(5)]
    waves, lengths, labels = next(iter(la.tasks.AudioClassification().batches(audio, train=False, spec=LoaderSpec(batch_size=5))))
    assert waves.shape == (5, 140) and lengths.tolist() == [100, 110, 120, 130, 140] and labels.tolist() == [0, 1, 2, 0, 1]


def test_samples_whose_label_kept_a_dimension_are_still_samples() -> None:
    x, y = xor(20, 0)
    samples = list(TensorDataset(x, y[:, None]))  # (x, tensor([label])) per sample
    trainer = Trainer(adapted(), samples, task="image-classification", batch_size=8)
    assert [len(b[1]) for b in batches_of(trainer, samples)] == [8, 8, 4]
    trainer.fit()


class BatchesAsItems(Dataset):
    """A Dataset whose every item is already a batch: the trainer would batch it again."""

    def __init__(self) -> None:
        self.x, self.y = xor(40, 0)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.x[10 * i : 10 * i + 10], self.y[10 * i : 10 * i + 10]


def test_what_cannot_be_batched_sensibly_fails_naming_the_cause() -> None:
    with pytest.raises(TaskError, match=r"Dataset's items are whole batches \(\(tensor \(10, 8\), tensor \(10,\)\)\).*as a list"):
        Trainer(adapted(), BatchesAsItems(), task="image-classification")
    ragged = [(torch.randn(8), torch.zeros(2, 2, dtype=torch.long))]
    with pytest.raises(TaskError, match=r"cannot tell whether the list's first element .* is one sample or a batch"):
        Trainer(adapted(), ragged, task="image-classification")
    with pytest.raises(TaskError, match="empty list"):
        Trainer(adapted(), [], task="image-classification")
    with pytest.raises(TaskError, match="re-iterable.*list"):
        Trainer(adapted(), iter([(torch.randn(8), 0)]), task="image-classification")


def test_a_loss_function_gets_list_elements_as_they_are() -> None:
    x, y = xor(32, 0)
    seen = []

    def loss_fn(model, batch):
        seen.append(batch[0].shape)
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    Trainer(adapted(), [(x[:16], y[:16]), (x[16:], y[16:])], task=loss_fn, epochs=1).fit()
    assert seen == [(16, 8), (16, 8)]


# ---------------------------------------------------------------------- the pre-flight check


class PerFrame(nn.Module):
    """A speech-like model that forgot to pool: (batch, frames, classes)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 16, stride=8)
        self.head = nn.Linear(8, classes)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(waves.unsqueeze(1))).transpose(1, 2))


def clips(n: int = 12) -> list:
    return [(torch.randn(400 + 8 * i), i % 3) for i in range(n)]


def untouched(model: nn.Module):
    before = {k: v.clone() for k, v in la.adapter_state_dict(model).items()}
    return lambda: all(torch.equal(before[k], v) for k, v in la.adapter_state_dict(model).items())


@pytest.mark.parametrize(
    ("model", "data", "task", "message"),
    [
        (PerFrame(), clips(), "audio-classification", r"outputs \(4, \d+, 3\): a score vector per time step.*'frame-classification'"),
        (nn.Linear(8, 1), [(torch.randn(8), i % 2) for i in range(8)], "image-classification", r"one number per example.*regression"),
        (nn.Linear(8, 2), [(torch.randn(8), i % 5) for i in range(8)], "image-classification", r"labels go from 0 to 4.*at least 5"),
        (nn.Linear(8, 2), [(torch.randn(8), float(i % 2)) for i in range(8)], "image-classification", r"floating point.*class indices"),
        (
            nn.Linear(5, 2),
            [(torch.randn(8), i % 2) for i in range(8)],
            "image-classification",
            r"fails on the first training batch \(\[tensor \(4, 8\), tensor \(4,\)\]\): RuntimeError: .*4x8 and 5x2",
        ),
        (
            nn.Linear(8, 3),
            [(torch.randn(8), torch.ones(4)) for i in range(8)],
            "multi-label-classification",
            r"outputs \(4, 3\) for labels \(4, 4\)",
        ),
    ],
    ids=["per-frame logits", "one output", "too few classes", "float labels", "wrong input size", "multi-label width"],
)
def test_a_model_that_does_not_fit_the_data_fails_before_the_first_step(model, data, task, message) -> None:
    torch.manual_seed(0)
    la.apply(model, rank=1)
    same = untouched(model)
    trainer = Trainer(model, data, task=task, epochs=1, batch_size=4)
    with pytest.raises(TaskError, match=message):
        trainer.fit()
    assert same() and trainer.history == []


def test_the_frame_task_the_message_names_trains_that_model() -> None:
    frames = [(torch.randn(400), torch.full(((400 - 16) // 8 + 1,), i % 3)) for i in range(12)]
    torch.manual_seed(0)
    model = la.apply(PerFrame(), rank=2)
    history = Trainer(model, frames, frames, task="frame-classification", epochs=1, batch_size=4).fit()
    assert {"train_accuracy", "val_accuracy", "val_macro_f1"} <= set(history[-1])


# ---------------------------------------------------------------------- node masks


def karate():
    from torch_geometric.datasets import KarateClub

    return KarateClub()[0]  # shipped with PyG: 34 nodes, a train_mask of 4, no val_mask


def test_karate_club_validates_on_the_nodes_outside_its_train_mask(log_lines: list[str]) -> None:
    from torch_geometric.nn.models import GAT

    graph = karate()
    assert not hasattr(graph, "val_mask") or graph.val_mask is None
    torch.manual_seed(0)
    model = la.apply(GAT(34, 16, 2, 4, heads=2), rank=4)
    trainer = Trainer(model, graph, graph, task="node-classification", epochs=5, lr=1e-2)
    history = trainer.fit()
    assert (
        "node-classification: train_ figures on 4 nodes: train_mask; val_ figures on 30 nodes: the nodes in no train_mask (the graph has no val_mask)"
        in log_lines
    )
    held_out = graph.clone()
    held_out.val_mask = ~graph.train_mask
    assert trainer.evaluate(held_out)["accuracy"] == pytest.approx(history[-1]["val_accuracy"])


def test_a_graph_without_masks_cannot_validate_on_itself() -> None:
    from torch_geometric.data import Data

    graph = Data(x=torch.randn(10, 4), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.arange(10) % 2)
    from torch_geometric.nn.models import GCN

    model = la.apply(GCN(4, 8, 2, 2), rank=2)
    with pytest.raises(TaskError, match="every node would be both trained on and validated on.*Give the graph a val_mask"):
        Trainer(model, graph, graph, task="node-classification")
    other = graph.clone()  # another graph (inductive): every node of it is held out
    Trainer(model, graph, other, task="node-classification", epochs=1).fit()
    overlapping = graph.clone()
    overlapping.train_mask = torch.ones(10, dtype=torch.bool)
    overlapping.val_mask = torch.arange(10) < 3
    with pytest.raises(TaskError, match="3 nodes would be both trained on and validated on"):
        Trainer(model, overlapping, overlapping, task="node-classification")


def test_missing_train_and_val_masks_leave_out_the_other_splits(log_lines: list[str]) -> None:
    from torch_geometric.data import Data

    graph = Data(x=torch.randn(10, 4), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.arange(10) % 2)
    graph.test_mask = torch.arange(10) >= 8
    graph.val_mask = torch.arange(10) < 3
    task = NodeClassification()
    train_nodes, how = task.nodes(graph, train=True)
    assert (
        train_nodes.tolist() == [False] * 3 + [True] * 5 + [False] * 2
        and how == "the nodes in no val_mask or test_mask (the graph has no train_mask)"
    )
    del graph.val_mask
    graph.train_mask = torch.arange(10) < 5
    val_nodes, how = task.nodes(graph, train=False)
    assert val_nodes.nonzero().flatten().tolist() == [5, 6, 7]  # the test nodes stay out of validation

    class Pointwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, edge_index):
            return self.lin(x)

    Trainer(la.apply(Pointwise(), rank=1), graph, graph, task="node-classification", epochs=1).fit()
    assert any(
        line.endswith("val_ figures on 3 nodes: the nodes in no train_mask or test_mask (the graph has no val_mask)") for line in log_lines
    )
