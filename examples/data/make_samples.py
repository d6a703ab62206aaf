"""Write the tiny sample data sets that examples/configs/*.toml and the tests use.

    python examples/data/make_samples.py      # rewrites examples/data/{images,graphs,audio,text}

Each set is a few KB, in the format a real data set of its kind has on disk, so
`lora-anywhere train` reads them with its real loaders: PNG files in one folder per
class, a PyG data set written by ``InMemoryDataset.save``, 16-bit PCM WAV files with
a labels.csv, and CSV files of texts and labels. Fixed seeds: running it again
gives the same files.
"""

from __future__ import annotations

import csv
import math
import random
import shutil
import struct
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent


def images(root: Path, rng: random.Random) -> None:
    """16×16 RGB PNGs of three shapes (ring, cross, bar) in noise: 8 per class to
    train on, 3 to validate on."""
    from PIL import Image

    def draw(shape: str) -> Image.Image:
        cx, cy = 7.5 + rng.uniform(-2, 2), 7.5 + rng.uniform(-2, 2)
        tint = [rng.uniform(0.6, 1.0) for _ in range(3)]
        pixels = []
        for y in range(16):
            for x in range(16):
                dx, dy = x - cx, y - cy
                if shape == "ring":
                    on = abs(math.hypot(dx, dy) - 4.5) < 1.2
                elif shape == "cross":
                    on = (abs(dx) < 1.2 or abs(dy) < 1.2) and max(abs(dx), abs(dy)) < 6
                else:
                    on = abs(dy) < 1.5 and abs(dx) < 6
                value = (0.85 if on else 0.1) + rng.gauss(0, 0.08)
                pixels.append(tuple(max(0, min(255, int(255 * value * t))) for t in tint))
        image = Image.new("RGB", (16, 16))
        image.putdata(pixels)
        return image

    for split, count in (("train", 8), ("val", 3)):
        for shape in ("bar", "cross", "ring"):
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                draw(shape).save(folder / f"{i}.png", optimize=True)


def graphs(root: Path) -> None:
    """social.pt: one graph of 60 nodes in 3 communities, with features that hint at
    the community and train/val/test masks (node classification). shapes.pt: 30
    small graphs, each a cycle, a star or a path (graph classification)."""
    import torch
    from torch_geometric.data import Data, InMemoryDataset

    g = torch.Generator().manual_seed(0)
    n, k = 60, 3
    y = torch.arange(n) % k
    prob = torch.where(y[:, None] == y[None], 0.25, 0.02)
    upper = torch.triu(torch.rand(n, n, generator=g) < prob, 1)
    x = torch.nn.functional.one_hot(y, 8).float() + 0.8 * torch.randn(n, 8, generator=g)
    split = torch.rand(n, generator=g)
    social = Data(
        x=x.half().float(),
        edge_index=(upper | upper.T).nonzero().T,
        y=y,
        train_mask=split < 0.6,
        val_mask=(split >= 0.6) & (split < 0.8),
        test_mask=split >= 0.8,
    )
    root.mkdir(parents=True)
    InMemoryDataset.save([social], str(root / "social.pt"))

    shapes = []
    for i in range(30):
        label, size = i % 3, 5 + i % 4
        if label == 0:  # cycle
            edges = [(j, (j + 1) % size) for j in range(size)]
        elif label == 1:  # star
            edges = [(0, j) for j in range(1, size)]
        else:  # path
            edges = [(j, j + 1) for j in range(size - 1)]
        index = torch.tensor(edges, dtype=torch.long).T
        shapes.append(Data(x=torch.ones(size, 1), edge_index=torch.cat([index, index.flip(0)], 1), y=torch.tensor([label])))
    InMemoryDataset.save(shapes, str(root / "shapes.pt"))


def audio(root: Path, rng: random.Random) -> None:
    """0.15 s WAV clips at 8 kHz of three sounds — a rising chirp, a falling chirp and
    a steady tone — with labels.csv, 6 clips per class to train on, 2 to validate on."""
    rate, seconds = 8000, 0.15
    for split, count in (("train", 6), ("val", 2)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for label in ("down", "tone", "up"):
            for i in range(count):
                start, end = {"up": (400, 1600), "down": (1600, 400), "tone": (900, 900)}[label]
                start *= rng.uniform(0.9, 1.1)
                end *= rng.uniform(0.9, 1.1)
                n = int(rate * seconds * rng.uniform(0.8, 1.0))
                phase, frames = 0.0, bytearray()
                for j in range(n):
                    phase += 2 * math.pi * (start + (end - start) * j / n) / rate
                    value = 0.6 * math.sin(phase) + rng.gauss(0, 0.05)
                    frames += struct.pack("<h", max(-32768, min(32767, int(32767 * value))))
                name = f"{label}_{i}.wav"
                with wave.open(str(folder / name), "wb") as f:
                    f.setnchannels(1)
                    f.setsampwidth(2)
                    f.setframerate(rate)
                    f.writeframes(bytes(frames))
                rows.append((name, label))
        with (folder / "labels.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["file", "label"])
            writer.writerows(rows)


def text(root: Path, rng: random.Random) -> None:
    """Short messages about an order: complaints, praise and questions (30 to train
    on, 9 to validate on)."""
    things = ["the parcel", "my order", "the headphones", "the blue lamp", "this kettle", "the delivery"]
    templates = {
        "complaint": ["{t} arrived broken", "{t} never came", "{t} is faulty and I want a refund", "very unhappy with {t}"],
        "praise": ["{t} is great , thank you", "love {t} !", "{t} came early and works well", "really happy with {t}"],
        "question": ["when will {t} arrive ?", "can I change {t} ?", "where is {t} now ?", "does {t} come with a warranty ?"],
    }
    root.mkdir(parents=True)
    for split, count in (("train", 10), ("val", 3)):
        rows = [(rng.choice(templates[label]).format(t=rng.choice(things)), label) for label in templates for _ in range(count)]
        rng.shuffle(rows)
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(rows)


def main() -> None:
    for name in ("images", "graphs", "audio", "text"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    images(HERE / "images", random.Random(0))
    graphs(HERE / "graphs")
    audio(HERE / "audio", random.Random(1))
    text(HERE / "text", random.Random(2))
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file() and f.suffix != ".py")
    print(f"wrote the sample data sets under {HERE} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
