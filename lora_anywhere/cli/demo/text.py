"""Text: a small transformer encoder pretrained on which two keywords a sentence
holds, adapted to which of them comes first.

Each sequence is 8–16 filler tokens with two different keywords (of 4) at random
places. Task A is the unordered pair (6 classes), which the encoder learns to
recognise wherever the keywords stand; task B is the keyword that comes first (4
classes). Mean-pooled features of a pair detector say nothing about order, so a new
head on them can at best guess between the two keywords (about 0.5); rank-4 updates
of attention, feed-forward layers and embeddings learn to use positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from ...training.tasks import TextClassification
from .common import Data, Domain

VOCAB, KEYWORDS, MAX_LEN, WIDTH = 40, 4, 24, 32  # ids: 0 padding, 1-4 keywords, 5+ filler
PAIRS = [(a, b) for a in range(KEYWORDS) for b in range(a + 1, KEYWORDS)]


class KeywordPairs(Dataset):
    """Dict samples (``input_ids``, ``attention_mask``, ``labels``); the label is the
    pair's index (``"pair"``) or the first keyword (``"first"``)."""

    def __init__(self, n: int, seed: int, label: str) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items: list[dict[str, torch.Tensor | int]] = []
        for _ in range(n):
            length = int(torch.randint(8, 17, (1,), generator=g))
            pair = int(torch.randint(0, len(PAIRS), (1,), generator=g))
            first, second = PAIRS[pair] if torch.rand(1, generator=g) < 0.5 else PAIRS[pair][::-1]
            ids = torch.randint(1 + KEYWORDS, VOCAB, (length,), generator=g)
            where = torch.randperm(length, generator=g)[:2].sort().values
            ids[where[0]], ids[where[1]] = 1 + first, 1 + second
            self.items.append(
                {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": pair if label == "pair" else first}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return self.items[i]


class TextEncoder(nn.Module):
    """Token and position embeddings, a 2-layer ``nn.TransformerEncoder`` (width 32,
    2 heads), mean pooling over real tokens, a 16-wide projection and a linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(MAX_LEN, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.proj = nn.Sequential(nn.Linear(WIDTH, 16), nn.ReLU())
        self.head = nn.Linear(16, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.encoder(self.tokens(input_ids) + self.positions(positions), src_key_padding_mask=attention_mask == 0)
        mask = attention_mask[..., None].to(h.dtype)
        return self.head(self.proj((h * mask).sum(1) / mask.sum(1)))


def _data(label: str, fast: bool) -> Data:
    sizes = (800, 300, 300) if fast else (3000, 500, 1000)
    return Data(*(KeywordPairs(n, seed, label) for seed, n in zip((1, 2, 3), sizes)), classes=len(PAIRS) if label == "pair" else KEYWORDS)


def _outputs(model: nn.Module, data: Data) -> torch.Tensor:
    batch = TextClassification().collate([data.test[i] for i in range(32)])
    return model(batch["input_ids"], batch["attention_mask"])


DOMAIN = Domain(
    name="text",
    task="text-classification",
    task_a="keyword pair",
    task_b="first keyword",
    model="a 2-layer transformer encoder",
    data_a=lambda fast: _data("pair", fast),
    data_b=lambda fast: _data("first", fast),
    build=TextEncoder,
    head="head",
    outputs=_outputs,
    rank=4,
    epochs_a=8,
    epochs_b=8,
    lr_a=3e-3,
)
