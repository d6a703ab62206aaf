"""LoRA on a PyG GCN for node classification on one graph.

    python examples/graph/gcn_node.py [--fast]

The graph plugin adapts each ``GCNConv`` (its inner Linear) on the activation route.
The graph: four communities, dense inside and sparse across; each node's features
are a noisy hint of its community. Training uses the nodes in ``train_mask``,
validation those in ``val_mask``, and the test mask is scored at the end.
"""

from __future__ import annotations

import argparse

import torch
from torch_geometric.data import Data
from torch_geometric.nn.models import GCN

import lora_anywhere as la
from lora_anywhere.training.tasks import NodeClassification


def communities(n: int, k: int = 4, seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    prob = torch.where(y[:, None] == y[None, :], 20 / n, 1 / n)
    upper = torch.triu(torch.rand(n, n, generator=g) < prob, 1)
    split = torch.rand(n, generator=g)
    return Data(x=torch.nn.functional.one_hot(y, 16).float() + torch.randn(n, 16, generator=g), edge_index=(upper | upper.T).nonzero().T, y=y,
                train_mask=split < 0.6, val_mask=(split >= 0.6) & (split < 0.8), test_mask=split >= 0.8)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", default="runs/examples/gcn")
    args = parser.parse_args()

    graph = communities(200 if args.fast else 1000)
    torch.manual_seed(0)
    model = GCN(in_channels=16, hidden_channels=64, num_layers=2, out_channels=4)  # load pretrained weights in real use
    la.apply(model, rank=4, targets="graph-convs")  # the graph plugin's preset: every message-passing layer
    print(la.summary(model))

    trainer = la.Trainer(model, graph, graph, task="node-classification", epochs=10 if args.fast else 100, lr=1e-2, out_dir=args.out)
    trainer.fit()
    test = trainer.evaluate(graph, task=NodeClassification(eval_mask="test_mask"))
    print(f"test accuracy {test['accuracy']:.3f} (chance 0.25)")

    model.eval()
    with torch.no_grad():
        before = model(graph.x, graph.edge_index)
        la.merge(model)
        print(f"merged vs unmerged: max |Δ| {(model(graph.x, graph.edge_index) - before).abs().max():.1e}")


if __name__ == "__main__":
    main()
