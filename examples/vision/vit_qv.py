"""LoRA on the q and v projections of a timm ViT, as in the LoRA paper.

    python examples/vision/vit_qv.py [--fast]

timm's ``Attention`` computes q, k and v with one fused ``qkv`` Linear; the vision
plugin knows its row blocks, so ``targets="Attention:q,v"`` adapts only q and v (the
preset ``targets="attention"`` means the same for every attention type it knows).
Random base weights here; in real use ``timm.create_model(name, pretrained=True)``.
The task: is the image's bright stripe horizontal or vertical.
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.data import TensorDataset

import lora_anywhere as la


def stripes(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x, y = 0.5 * torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g)
    at = torch.randint(4, 28, (n,), generator=g)
    for i in range(n):
        if y[i]:
            x[i, :, :, at[i] - 2 : at[i] + 2] += 1.5
        else:
            x[i, :, at[i] - 2 : at[i] + 2, :] += 1.5
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", default="runs/examples/vit")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=2, depth=2 if args.fast else 4
    )
    la.apply(model, rank=8, targets="Attention:q,v", trainable="head")
    print(la.summary(model))

    train, val = stripes(64 if args.fast else 512, 0), stripes(32 if args.fast else 256, 1)
    history = la.Trainer(model, train, val, task="image-classification", epochs=1 if args.fast else 4,
                         lr=3e-3, batch_size=32, warmup=0.1, out_dir=args.out).fit()  # fmt: skip
    print(f"validation accuracy {history[-1]['val_accuracy']:.3f} (chance 0.5)")

    model.eval()
    x = val.tensors[0][:8]
    with torch.no_grad():
        before = model(x)
        la.merge(model)  # q and v blocks of each fused qkv weight get their ΔW; k stays as it was
        print(f"merged vs unmerged: max |Δ| {(model(x) - before).abs().max():.1e}")
    la.remove(model)  # the plain timm model again, adapters merged in
    print(type(model.blocks[0].attn.qkv).__name__, "with", sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main()
