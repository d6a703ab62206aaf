"""Real data for bench/quality.py, each as a pair of tasks: pretrain on A, adapt to B.

* **digits**: the UCI handwritten digits (8×8, shipped in bench/data/digits.npz; see
  bench/data/README.md for the citation and licence). A: digits 0–4; B: digits 5–9,
  with a new head. The model is the demo's small CNN.
* **karate**: Zachary's karate club (34 members, 78 friendships; PyG's KarateClub
  graph, built into torch_geometric). A: the two factions the club split into
  (networkx's ``club`` attribute); B: the four communities PyG labels, each a part of
  one faction.
* **lesmis**: the co-appearance network of the 77 characters of *Les Misérables*
  (networkx). A: 5 communities, B: 6 communities, both from seeded Louvain partitions
  (resolution 0.5 and 1.0): B splits A's largest community three ways.

The graphs are small, so each seed draws its own stratified split (50% train, 20%
validation, 30% test nodes), and the node features are one-hot node ids (as in PyG's
KarateClub). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lora_anywhere.cli.demo.common import Data, Domain
from lora_anywhere.cli.demo.vision import NORMS, SmallCNN
from lora_anywhere.training.tasks import NodeClassification

DIGITS = Path(__file__).parent / "data" / "digits.npz"
SHARES = (0.5, 0.2, 0.3)  # train, validation, test


def stratified(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index sets (train, val, test) with each class split 50/20/30 (at least one
    training example per class)."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[], [], []]
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = max(1, round(SHARES[0] * len(idx)))
        n_val = round(SHARES[1] * len(idx))
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :])):
            part.append(chunk)
    return tuple(torch.cat(p).sort().values for p in parts)  # type: ignore[return-value]


# ---------------------------------------------------------------------- digits


def digits(seed: int) -> tuple[Data, Data]:
    """Task A (digits 0–4) and task B (5–9, labelled 0–4), each split by `seed`."""
    with np.load(DIGITS) as z:
        images = torch.from_numpy(z["images"]).float()[:, None] / 16.0
        labels = torch.from_numpy(z["labels"]).long()
    out = []
    for low in (0, 5):
        keep = (labels >= low) & (labels < low + 5)
        x, y = images[keep], labels[keep] - low
        out.append(Data(*(TensorDataset(x[i], y[i]) for i in stratified(y, seed)), classes=5))
    return out[0], out[1]


def _image_outputs(model: nn.Module, data: Data) -> torch.Tensor:
    return model(data.test.tensors[0][:64])


DIGITS_DOMAIN = Domain(
    name="digits",
    task="image-classification",
    task_a="digits 0–4",
    task_b="digits 5–9",
    model="the demo's small CNN (10k parameters)",
    data_a=lambda fast: digits(0)[0],
    data_b=lambda fast: digits(0)[1],
    build=SmallCNN,
    head="head",
    outputs=_image_outputs,
    rank=4,
    lora_trainable=NORMS,
    epochs_a=15,
    epochs_b=15,
    lr_a=3e-3,
    batch_size=32,
)


# ---------------------------------------------------------------------- graphs


class NodeNet(nn.Module):
    """A two-layer PyG GCN (16 wide, 8 out) on one-hot node ids, and a linear head."""

    def __init__(self, nodes: int, classes: int) -> None:
        super().__init__()
        from torch_geometric.nn.models import GCN

        self.gnn = GCN(nodes, 16, num_layers=2, out_channels=8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.gnn(x, edge_index)))


def _node_task(edge_index: torch.Tensor, labels: torch.Tensor, seed: int) -> Data:
    """One graph with one-hot node features, `labels` and a split stratified by them;
    ten full-graph steps make an epoch (as in the demo)."""
    from torch_geometric.data import Data as Graph

    n = len(labels)
    train, val, test = stratified(labels, seed)
    masks = [torch.zeros(n, dtype=torch.bool).index_fill_(0, i, True) for i in (train, val, test)]
    graph = Graph(x=torch.eye(n), edge_index=edge_index, y=labels, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])
    return Data(train=[graph] * 10, val=graph, test=graph, classes=int(labels.max()) + 1)


def karate(seed: int) -> tuple[Data, Data]:
    """Task A: the faction (2 classes); task B: the community (4 classes). Both split
    by the communities, so each seed's split is the same for A and B."""
    import networkx as nx
    from torch_geometric.datasets import KarateClub

    graph = KarateClub()[0]
    club = nx.karate_club_graph()
    faction = torch.tensor([club.nodes[i]["club"] == "Officer" for i in range(graph.num_nodes)], dtype=torch.long)
    b = _node_task(graph.edge_index, graph.y, seed)
    a = _node_task(graph.edge_index, faction, seed)
    _share_masks(a, b)
    return a, b


def lesmis(seed: int) -> tuple[Data, Data]:
    """Task A: 5 Louvain communities (resolution 0.5); task B: 6 (resolution 1.0)."""
    import networkx as nx

    g = nx.les_miserables_graph()
    names = sorted(g.nodes())
    index = {name: i for i, name in enumerate(names)}
    edges = torch.tensor([[index[u], index[v]] for u, v in g.edges()]).T
    edge_index = torch.cat([edges, edges.flip(0)], dim=1)

    def communities(resolution: float) -> torch.Tensor:
        found = nx.community.louvain_communities(g, seed=0, resolution=resolution)
        found = sorted(found, key=lambda c: min(index[n] for n in c))  # a fixed order of labels
        labels = torch.empty(len(names), dtype=torch.long)
        for label, members in enumerate(found):
            labels[[index[n] for n in members]] = label
        return labels

    b = _node_task(edge_index, communities(1.0), seed)
    a = _node_task(edge_index, communities(0.5), seed)
    _share_masks(a, b)
    return a, b


def _share_masks(a: Data, b: Data) -> None:
    """Task A trains on task B's training nodes only (and validates on its validation
    nodes), so no test node of B is seen with a label in pretraining."""
    for key in ("train_mask", "val_mask", "test_mask"):
        a.val[key] = b.val[key]


def _node_outputs(model: nn.Module, data: Data) -> torch.Tensor:
    return model(data.test.x.cpu(), data.test.edge_index.cpu())


def _node_domain(name: str, nodes: int, task_a: str, task_b: str, data: object) -> Domain:
    return Domain(
        name=name,
        task="node-classification",
        task_a=task_a,
        task_b=task_b,
        model="a 2-layer GCN on one-hot node ids (torch_geometric)",
        data_a=lambda fast: data(0)[0],  # type: ignore[operator]
        data_b=lambda fast: data(0)[1],  # type: ignore[operator]
        build=lambda classes: NodeNet(nodes, classes),
        head="head",
        outputs=_node_outputs,
        test_task=NodeClassification(eval_mask="test_mask"),
        rank=4,
        epochs_a=15,
        epochs_b=15,
        lr_a=1e-2,
    )


KARATE_DOMAIN = _node_domain("karate", 34, "faction", "community", karate)
LESMIS_DOMAIN = _node_domain("lesmis", 77, "5 communities", "6 communities", lesmis)

#: name → (domain, data(seed) → (task A, task B)).
REAL = {
    "digits": (DIGITS_DOMAIN, digits),
    "karate": (KARATE_DOMAIN, karate),
    "lesmis": (LESMIS_DOMAIN, lesmis),
}
