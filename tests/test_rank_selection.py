"""select_rank: k-fold cross-validation over ranks with the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.rank_selection import fold_indices, select_rank


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
    result = select_rank(build, data(), task="image-classification", ranks=(1, 4), folds=3, trainer_kwargs={"epochs": 3, "lr": 0.05, "batch_size": 16})
    assert [s.rank for s in result.scores] == [1, 4]
    assert result.chosen in (1, 4)
    assert result.scores[0].adapter_params < result.scores[1].adapter_params
    assert all(0.0 <= s.mean <= 1.0 and len(s.folds) == 3 for s in result.scores)
    assert max(s.mean for s in result.scores) > 0.6, "the adapted model learns the task"
    assert "← chosen" in str(result)


def test_select_rank_errors():
    with pytest.raises(la.LoraError, match="folds must be at least 2"):
        select_rank(build, data(), task="image-classification", folds=1)
    with pytest.raises(la.LoraError, match="cannot be split"):
        select_rank(build, data(3), task="image-classification", folds=5)
