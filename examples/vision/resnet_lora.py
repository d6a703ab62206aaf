"""LoRA on a torchvision ResNet-18: adapters on every conv, a new head, the shared
trainer, then merge, save and reload.

    python examples/vision/resnet_lora.py [--fast]

The base has random weights here, because nothing is downloaded; in real use build it
with ``torchvision.models.resnet18(weights="DEFAULT")`` and replace ``fc``.
The task: which quadrant of a 32×32 image holds a bright patch.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.utils.data import TensorDataset

import lora_anywhere as la


def patches(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x, y = 0.5 * torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = 16 * (c // 2) + 4, 16 * (c % 2) + 4
        x[i, :, r : r + 8, col : col + 8] += 1.5
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", default="runs/examples/resnet")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    la.apply(model, rank=8, targets="Conv2d", trainable="fc")  # adapters on every conv; fc trains fully
    s = la.summary(model)
    print(f"{len(s.rows)} adapted convs; {s.trainable_params:,} of {s.total_params:,} parameters train")

    train, val = patches(64 if args.fast else 512, 0), patches(32 if args.fast else 256, 1)
    trainer = la.Trainer(model, train, val, task="image-classification", epochs=1 if args.fast else 3,
                         lr=3e-3, batch_size=32, warmup=0.1, out_dir=args.out)  # fmt: skip
    history = trainer.fit()
    print(f"validation accuracy {history[-1]['val_accuracy']:.3f} (chance 0.25)")

    model.eval()
    x = val.tensors[0][:8]
    with torch.no_grad():
        before = model(x)
        la.merge(model)  # ΔW into the conv weights: inference at the plain model's speed
        print(f"merged vs unmerged: max |Δ| {(model(x) - before).abs().max():.1e}")
        la.unmerge(model)

    folder = la.save_adapter(model, f"{args.out}/adapter")
    fresh = torchvision.models.resnet18(num_classes=4)
    fresh.load_state_dict(base_state)  # the same base the adapter was trained on
    la.load_adapter(fresh, folder)
    with torch.no_grad():
        # The same numbers up to float rounding: a layer may add its adapter through
        # W + ΔW or on the activations, call by call (see docs/how-it-works.md).
        gap = (fresh.eval()(x) - before).abs().max().item()
    assert gap < 1e-4, f"the reloaded adapter gives different outputs: max |Δ| {gap:.1e}"
    print(f"reloaded onto a fresh base: the same outputs (max |Δ| {gap:.1e})")


if __name__ == "__main__":
    main()
