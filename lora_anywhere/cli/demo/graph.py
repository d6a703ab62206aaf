"""Graphs: a GCN pretrained on one partition of a social graph's nodes, adapted to
another partition of the same nodes.

Every node has a city and a hobby (4 each, independent). Friendships form mostly
within a city or within a hobby, and a node's 16 features hint weakly at both.
Task A is the city, task B the hobby: both need the neighbours' features, but
different ones. The GCN's 8-wide output, trained on cities, keeps little about
hobbies, so a new head on it is barely above chance; rank-4 updates of the two
graph convolutions route the hobby signal through.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.data import Data as Graph
from torch_geometric.nn.models import GCN

from ...training.tasks import NodeClassification
from .common import Data, Domain

FEATURES, GROUPS = 16, 4


def social_graph(nodes: int, seed: int) -> Graph:
    """Nodes with ``city`` and ``hobby`` labels, friendships, noisy features, and
    train/val/test masks (50/20/30%)."""
    g = torch.Generator().manual_seed(seed)
    city = torch.randint(0, GROUPS, (nodes,), generator=g)
    hobby = torch.randint(0, GROUPS, (nodes,), generator=g)
    scale = 1200 / nodes  # the same expected number of friends at any size
    prob = scale * (0.002 + 0.01 * (city[:, None] == city[None]) + 0.01 * (hobby[:, None] == hobby[None]))
    upper = torch.triu(torch.rand(nodes, nodes, generator=g) < prob, 1)
    x = torch.randn(nodes, FEATURES, generator=g)
    x[:, :GROUPS] += 1.5 * F.one_hot(city, GROUPS)
    x[:, GROUPS : 2 * GROUPS] += 1.5 * F.one_hot(hobby, GROUPS)
    split = torch.rand(nodes, generator=g)
    return Graph(
        x=x, edge_index=(upper | upper.T).nonzero().T, city=city, hobby=hobby,
        train_mask=split < 0.5, val_mask=(split >= 0.5) & (split < 0.7), test_mask=split >= 0.7,
    )  # fmt: skip


class GraphNet(nn.Module):
    """A two-layer PyG GCN with an 8-wide output, and a linear head."""

    def __init__(self, classes: int = GROUPS) -> None:
        super().__init__()
        self.gnn = GCN(FEATURES, 32, num_layers=2, out_channels=8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.gnn(x, edge_index)))


def _data(label: str, fast: bool) -> Data:
    graph = social_graph(600 if fast else 1200, seed=0)
    graph.y = graph[label]
    # One full-graph step per batch: ten steps make an epoch.
    return Data(train=[graph] * 10, val=graph, test=graph, classes=GROUPS)


def _outputs(model: nn.Module, data: Data) -> torch.Tensor:
    # The checks run on CPU; on a GPU the trainer has moved this graph there (PyG's
    # Data.to works in place).
    return model(data.test.x.cpu(), data.test.edge_index.cpu())


DOMAIN = Domain(
    name="graph",
    task="node-classification",
    task_a="city",
    task_b="hobby",
    model="a 2-layer GCN (torch_geometric)",
    data_a=lambda fast: _data("city", fast),
    data_b=lambda fast: _data("hobby", fast),
    build=GraphNet,
    head="head",
    outputs=_outputs,
    test_task=NodeClassification(eval_mask="test_mask"),
    rank=4,
    epochs_a=15,
    epochs_b=15,
    lr_a=1e-2,
)
