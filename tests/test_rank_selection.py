"""select_rank: k-fold cross-validation over ranks with the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.training.rank_selection import fold_indices, select_rank


def data(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i], y[i]) for i in range(n)]


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_folds_partition_the_data():
    parts = fold_indices(10, 3, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_select_rank_table_and_choice():
    result = select_rank(
        build, data(), task="image-classification", ranks=(1, 4), folds=3, trainer_kwargs={"epochs": 3, "lr": 0.05, "batch_size": 16}
    )
    assert [s.rank for s in result.scores] == [1, 4]
    assert result.chosen in (1, 4)
    assert result.scores[0].adapter_params < result.scores[1].adapter_params
    assert all(0.0 <= s.mean <= 1.0 and len(s.folds) == 3 for s in result.scores)
    assert max(s.mean for s in result.scores) > 0.6, "the adapted model learns the task"
    assert "← chosen" in str(result)


def test_select_rank_errors():
    with pytest.raises(la.LoraError, match="folds must be an integer of at least 2"):
        select_rank(build, data(), task="image-classification", folds=1)
    with pytest.raises(la.LoraError, match="cannot be split"):
        select_rank(build, data(3), task="image-classification", folds=5)
    with pytest.raises(la.LoraError, match="at least one candidate rank"):
        select_rank(build, data(), task="image-classification", ranks=())
    for bad in (0, -2, 1.5, True):
        with pytest.raises(la.LoraError, match="must be a positive integer"):
            select_rank(build, data(), task="image-classification", ranks=(1, bad))
    with pytest.raises(la.LoraError, match="name 2 more than once"):
        select_rank(build, data(), task="image-classification", ranks=(2, 4, 2))


def test_an_unknown_metric_fails_before_any_training(monkeypatch):
    from lora_anywhere.training import trainer

    monkeypatch.setattr(trainer.Trainer, "fit", lambda self: pytest.fail("trained before checking the metric"))
    with pytest.raises(
        la.LoraError, match=r"metric 'val_f1' is not one the trainer reports .* train_accuracy, train_loss, val_accuracy, val_loss"
    ):
        select_rank(build, data(), task="image-classification", ranks=(1,), folds=2, metric="val_f1")


def test_val_loss_is_minimised_and_the_result_is_plain_data(log_lines):
    result = select_rank(
        build,
        data(),
        task="image-classification",
        ranks=(2, 1),
        folds=2,
        metric="val_loss",
        trainer_kwargs={"epochs": 1, "batch_size": 32},
    )
    plain = result.as_dict()
    assert plain["metric"] == "val_loss" and [s["rank"] for s in plain["scores"]] == [2, 1]  # the order given
    assert all(set(s) == {"rank", "mean", "std", "adapter_params", "folds"} for s in plain["scores"])
    assert len(log_lines) == 2 and log_lines[0].startswith("rank 2: val_loss ")
    best = min(result.scores, key=lambda s: s.mean)
    assert result.chosen <= best.rank  # the smallest rank within one standard error of the lowest loss


def test_ctrl_c_stops_the_whole_selection(monkeypatch):
    from lora_anywhere.training import trainer

    fits = []

    def interrupted(self):
        fits.append(1)
        self.interrupted = True
        return []

    monkeypatch.setattr(trainer.Trainer, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        select_rank(build, data(), task="image-classification", ranks=(1, 2), folds=3)
    assert fits == [1]


def test_node_folds_split_the_labelled_nodes_of_one_graph():
    from torch_geometric.data import Data

    from lora_anywhere.training.rank_selection import NodeFolds

    n = 12
    graph = Data(x=torch.randn(n, 8), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.arange(n) % 2)
    graph.train_mask = torch.arange(n) < 6
    graph.val_mask = (torch.arange(n) >= 6) & (torch.arange(n) < 9)  # nodes 9-11: test nodes, never folded
    folds = NodeFolds(graph)
    assert len(folds) == 9
    train, val = folds.split([0, 2, 4, 6, 8], [1, 3, 5, 7])
    assert train is val and train is not graph
    assert train.train_mask.nonzero().flatten().tolist() == [0, 2, 4, 6, 8] and train.val_mask.nonzero().flatten().tolist() == [1, 3, 5, 7]
    assert graph.train_mask.sum() == 6 and train.x is graph.x  # the original graph is untouched, its tensors shared

    class GCNNet(nn.Module):
        def __init__(self):
            super().__init__()
            from torch_geometric.nn import GCNConv

            self.conv = GCNConv(8, 2)

        def forward(self, x, edge_index):
            return self.conv(x, edge_index)

    result = select_rank(GCNNet, folds, task="node-classification", ranks=(1, 2), folds=3, trainer_kwargs={"epochs": 1})
    assert [s.rank for s in result.scores] == [1, 2] and all(len(s.folds) == 3 for s in result.scores)
