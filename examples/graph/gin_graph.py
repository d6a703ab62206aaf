"""LoRA on a PyG GIN for graph classification: which shape is this graph?

    python examples/graph/gin_graph.py [--fast]

Each graph is a cycle, a star or a path of 6–12 nodes with two random extra edges;
every node feature is 1, so only the structure tells them apart. GIN's convs hold
MLPs; the graph plugin adapts their Linears. The head (after mean pooling) is a
new module and trains fully.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import global_add_pool
from torch_geometric.nn.models import GIN

import lora_anywhere as la


def shapes(n: int, seed: int) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(n):
        label, size = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(6, 13, (1,), generator=g))
        if label == 0:
            edges = [(i, (i + 1) % size) for i in range(size)]
        elif label == 1:
            edges = [(0, i) for i in range(1, size)]
        else:
            edges = [(i, i + 1) for i in range(size - 1)]
        edges += [tuple(torch.randint(0, size, (2,), generator=g).tolist()) for _ in range(2)]
        index = torch.tensor(edges).T
        graphs.append(Data(x=torch.ones(size, 1), edge_index=torch.cat([index, index.flip(0)], 1), y=torch.tensor([label])))
    return graphs


class ShapeClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gnn = GIN(in_channels=1, hidden_channels=32, num_layers=3)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return self.head(global_add_pool(self.gnn(x, edge_index), batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", default="runs/examples/gin")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ShapeClassifier()
    la.apply(model, rank=4, targets="graph-convs", trainable="head")
    print(la.summary(model))
    train = DataLoader(shapes(60 if args.fast else 600, 0), batch_size=32, shuffle=True)
    val = shapes(30 if args.fast else 200, 1)
    history = la.Trainer(model, train, val, task="graph-classification", epochs=2 if args.fast else 15, lr=1e-2, out_dir=args.out).fit()
    print(f"validation accuracy {history[-1]['val_accuracy']:.3f} (chance 0.33)")

    fresh = ShapeClassifier()
    fresh.load_state_dict(la.remove(model, merge=False).state_dict())  # the same base weights, adapters off
    la.load_adapter(fresh, f"{args.out}/best")  # the best epoch's adapter and head
    print(f"best epoch's adapter reloaded: {len(la.summary(fresh).rows)} adapted tensors")


if __name__ == "__main__":
    main()
