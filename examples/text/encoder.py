"""LoRA on a small transformer encoder (a transformers BERT) for text classification.

    python examples/text/encoder.py [--fast]

The text plugin's presets pick the attention projections (``text-attention``) and
the feed-forward layers (``text-mlp``) by name, for BERT, GPT-2, T5, Llama and more.
The task is order-sensitive: does keyword A come before keyword B in the sentence?
A bag-of-words model cannot tell; the attention layers (with position embeddings)
must. Random base weights; in real use ``BertForSequenceClassification.from_pretrained``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification

import lora_anywhere as la

VOCAB, A, B = 64, 2, 3  # 0 padding; 2 and 3 the keywords; 4+ filler


class Order(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(6, 17, (1,), generator=g))
            ids = torch.randint(4, VOCAB, (length,), generator=g)
            first, second = torch.randperm(length, generator=g)[:2].sort().values.tolist()
            label = int(torch.randint(0, 2, (1,), generator=g))
            ids[first], ids[second] = (A, B) if label else (B, A)
            self.items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", default="runs/examples/text")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    la.apply(model, rank=8, targets=["text-attention", "text-mlp"], trainable="classifier")
    s = la.summary(model)
    print(f"{len(s.rows)} adapted tensors; {s.trainable_params:,} of {s.total_params:,} parameters train")

    train, val = Order(64 if args.fast else 2000, 0), Order(32 if args.fast else 400, 1)
    history = la.Trainer(model, train, val, task="text-classification", epochs=1 if args.fast else 6,
                         lr=3e-3, batch_size=32, warmup=0.1, out_dir=args.out).fit()  # fmt: skip
    print(f"validation accuracy {history[-1]['val_accuracy']:.3f} (chance 0.5)")

    folder = la.save_adapter(model, f"{args.out}/adapter")
    size = (folder / "lora_anywhere_adapter.safetensors").stat().st_size
    print(f"adapter: {folder} ({size / 1024:.0f} KiB; the base model is {s.total_params * 4 / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
