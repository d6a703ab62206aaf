"""Data for `lora-anywhere train`: the four kinds of data set a config can name.

==============  ============================================================  ======================
kind            what is on disk                                               default task
==============  ============================================================  ======================
image-folder    ``train/<class>/*.png|jpg…`` (torchvision's ImageFolder)      image-classification
pyg             a file written by ``InMemoryDataset.save(graphs, path)``      node- or graph-classification
audio-folder    WAV files in ``<class>/`` folders, or beside a labels.csv     audio-classification
text-csv        a CSV with a text column and a label column                   text-classification
==============  ============================================================  ======================

Every kind takes ``train`` (a path), and ``val`` or else ``val_fraction`` (default
0.2) of the training set, split with a fixed seed. Frameworks are imported only for
the kind that needs them. Each loader checks what it reads and says what is wrong
and how to fix it; nothing is unpickled (the PyG file loads with
``weights_only=True``).
"""

from __future__ import annotations

import csv
import re
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from ..errors import DataSpecError


@dataclass
class LoadedData:
    train: Any
    val: Any
    classes: list[str]
    task: str  # the task the trainer runs by default on this data
    description: str


# ---------------------------------------------------------------------- options


_COMMON = {"kind", "train", "val", "val_fraction"}


def _check_keys(kind: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed - _COMMON)
    if unknown:
        raise DataSpecError(
            f"[data] kind {kind!r} has no option {', '.join(map(repr, unknown))}; its options are {', '.join(sorted(allowed | _COMMON))}"
        )


def _path(options: dict[str, Any], key: str, base: Path, *, required: bool, folder: bool | None) -> Path | None:
    value = options.get(key)
    if value is None:
        if required:
            raise DataSpecError(f'[data] needs {key} = "PATH" (relative to the config file\'s folder)')
        return None
    if not isinstance(value, str):
        raise DataSpecError(f"[data] {key} must be a path string, got {value!r}")
    path = (base / value).resolve()
    if not path.exists():
        raise DataSpecError(f"[data] {key}: {path} does not exist; paths are relative to the config file's folder ({base})")
    if folder is True and not path.is_dir():
        raise DataSpecError(f"[data] {key}: {path} is a file; give the folder that holds one subfolder per class")
    if folder is False and not path.is_file():
        raise DataSpecError(f"[data] {key}: {path} is a folder; give the file itself")
    return path


def _fraction(options: dict[str, Any]) -> float:
    fraction = options.get("val_fraction", 0.2)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataSpecError(f"[data] val_fraction must be a number between 0 and 1, got {fraction!r}")
    return float(fraction)


def _split(dataset: Any, options: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """(train, val) from one data set: ``val_fraction`` of it, drawn with `seed`."""
    fraction = _fraction(options)
    n = len(dataset)
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise DataSpecError(f'[data] {n} examples are too few to split off a validation set; add data or give val = "PATH"')
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def _int(options: dict[str, Any], key: str, default: int | None, minimum: int = 1) -> int | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataSpecError(f"[data] {key} must be an integer ≥ {minimum}, got {value!r}")
    return value


# ---------------------------------------------------------------------- images


def load_images(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """torchvision's ImageFolder; images are resized to ``image_size`` and scaled to
    [0, 1], then normalised with ``mean``/``std`` if given."""
    _check_keys("image-folder", options, {"image_size", "grayscale", "mean", "std"})
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise DataSpecError("[data] kind 'image-folder' needs torchvision: pip install 'lora_anywhere[vision]'") from exc
    size = options.get("image_size", 224)
    if isinstance(size, bool) or not (
        isinstance(size, int) and size > 0 or isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise DataSpecError(f"[data] image_size must be a positive integer or [height, width], got {size!r}")
    steps: list[Any] = [transforms.Resize(size if isinstance(size, int) else tuple(size))]
    if options.get("grayscale", False):
        steps.append(transforms.Grayscale())
    steps.append(transforms.ToTensor())
    if "mean" in options or "std" in options:
        mean, std = options.get("mean"), options.get("std")
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
            raise DataSpecError(f"[data] mean and std must be lists of one number per channel, got mean={mean!r}, std={std!r}")
        steps.append(transforms.Normalize(mean, std))
    transform = transforms.Compose(steps)

    def folder(path: Path) -> Any:
        try:
            return datasets.ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in them
            raise DataSpecError(f"[data] {path}: {exc}; put the images in one subfolder per class, e.g. {path}/cat/1.png") from exc

    train_dir = _path(options, "train", base, required=True, folder=True)
    val_dir = _path(options, "val", base, required=False, folder=True)
    train = folder(train_dir)
    if val_dir is not None:
        val = folder(val_dir)
        if val.classes != train.classes:
            raise DataSpecError(
                f"[data] the class folders differ: train has {train.classes}, val has {val.classes}; use the same class names in both"
            )
        train_set, val_set = train, val
    else:
        train_set, val_set = _split(train, options, seed)
    return LoadedData(
        train_set,
        val_set,
        list(train.classes),
        "image-classification",
        f"{len(train_set)} training and {len(val_set)} validation images of {len(train.classes)} classes",
    )


# ---------------------------------------------------------------------- graphs


def _read_graphs(path: Path) -> tuple[Any, Any]:
    """What ``InMemoryDataset.save`` wrote — (the collated graph as a dict, its
    slices, its class) — read without ever unpickling: PyG's own ``load`` retries
    with ``weights_only=False`` when the safe load meets an unknown global, which
    lets a crafted file run code. Here the only classes a file may name are PyG's
    graph classes; anything else is refused."""
    from torch_geometric.data import Data, HeteroData

    how = "write it with InMemoryDataset.save(list_of_graphs, path)"
    try:
        with torch.serialization.safe_globals([Data, HeteroData]):
            out = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler's refusal, or not a torch file at all
        raise DataSpecError(f"[data] {path} is not a PyG data set file ({type(exc).__name__}: {str(exc)[:300]}); {how}") from None
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise DataSpecError(f"[data] {path} holds a {type(out).__name__}, not the (graph, slices, class) that PyG saves; {how}")
    data, slices, graph_class = (*out, Data) if len(out) == 2 else out
    if graph_class not in (Data, HeteroData) or not isinstance(slices, (dict, type(None))):
        raise DataSpecError(f"[data] {path} names {graph_class!r} as its graph class, expected Data or HeteroData; {how}")
    try:
        graph = graph_class.from_dict(data) if isinstance(data, dict) else data
    except Exception as exc:
        raise DataSpecError(f"[data] {path} holds a graph PyG cannot rebuild ({type(exc).__name__}: {exc}); {how}") from None
    if not isinstance(graph, (Data, HeteroData)):
        raise DataSpecError(f"[data] {path} holds a {type(graph).__name__}, not a PyG graph; {how}")
    return graph, slices


def load_graphs(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """A PyG data set saved with ``InMemoryDataset.save(list_of_graphs, path)``. One
    graph: node classification on its ``train_mask``/``val_mask`` (made from
    ``val_fraction`` if absent). Several: graph classification, one ``y`` each."""
    _check_keys("pyg", options, set())
    try:
        from torch_geometric.data import InMemoryDataset
    except ImportError as exc:
        raise DataSpecError("[data] kind 'pyg' needs torch_geometric: pip install 'lora_anywhere[graph]'") from exc

    class SavedGraphs(InMemoryDataset):
        def __init__(self, path: Path) -> None:
            super().__init__(None)
            self.data, self.slices = _read_graphs(path)

    train_path = _path(options, "train", base, required=True, folder=False)
    val_path = _path(options, "val", base, required=False, folder=False)
    train = SavedGraphs(train_path)
    if len(train) == 0 or getattr(train[0], "y", None) is None:
        raise DataSpecError(f"[data] {train_path}: the graphs need labels in y (one per node, or one per graph)")
    if len(train) == 1:
        if val_path is not None:
            raise DataSpecError(
                "[data] node classification takes one graph with train_mask and val_mask; leave out val (or use val_fraction)"
            )
        graph = train[0]
        if getattr(graph, "train_mask", None) is None or getattr(graph, "val_mask", None) is None:
            order = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(seed))
            n_val = max(1, round(graph.num_nodes * _fraction(options)))
            graph.val_mask = torch.zeros(graph.num_nodes, dtype=torch.bool)
            graph.val_mask[order[:n_val]] = True
            graph.train_mask = ~graph.val_mask
        classes = int(graph.y.max()) + 1
        return LoadedData(
            graph,
            graph,
            [str(c) for c in range(classes)],
            "node-classification",
            f"one graph of {graph.num_nodes} nodes ({int(graph.train_mask.sum())} to train on, {int(graph.val_mask.sum())} to validate on), {classes} classes",
        )
    graphs = [train[i] for i in range(len(train))]
    if val_path is not None:
        val_data = SavedGraphs(val_path)
        train_set, val_set = graphs, [val_data[i] for i in range(len(val_data))]
    else:
        train_set, val_set = (list(part) for part in _split(graphs, options, seed))
    classes = int(max(int(g.y.max()) for g in graphs)) + 1
    return LoadedData(
        train_set,
        val_set,
        [str(c) for c in range(classes)],
        "graph-classification",
        f"{len(train_set)} training and {len(val_set)} validation graphs, {classes} classes",
    )


# ---------------------------------------------------------------------- audio


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """A PCM WAV file as a mono float waveform in [-1, 1], and its sample rate."""
    try:
        with wave.open(str(path), "rb") as f:
            rate, width, channels, frames = f.getframerate(), f.getsampwidth(), f.getnchannels(), f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataSpecError(f"[data] {path} is not a PCM WAV file ({exc}); convert it, e.g. ffmpeg -i in.mp3 -ac 1 out.wav") from exc
    if width == 1:
        samples = (torch.frombuffer(bytearray(frames), dtype=torch.uint8).float() - 128) / 128
    elif width == 2:
        samples = torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768
    elif width == 3:
        raw = torch.frombuffer(bytearray(frames), dtype=torch.uint8).reshape(-1, 3).long()
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        samples = torch.where(value >= 1 << 23, value - (1 << 24), value).float() / (1 << 23)
    elif width == 4:
        samples = torch.frombuffer(bytearray(frames), dtype=torch.int32).float() / 2**31
    else:
        raise DataSpecError(f"[data] {path}: {8 * width}-bit samples are not supported; use 8, 16, 24 or 32-bit PCM")
    return samples.reshape(-1, channels).mean(1), rate


class AudioFiles(Dataset):
    """``(waveform, label)`` for each file, read when asked for (cropped to
    ``max_samples``)."""

    def __init__(self, files: list[Path], labels: list[int], rate: int, max_samples: int | None) -> None:
        self.files, self.labels, self.rate, self.max_samples = files, labels, rate, max_samples

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        wave_, rate = read_wav(self.files[i])
        if rate != self.rate:
            raise DataSpecError(
                f"[data] {self.files[i]} has sample rate {rate}, the others {self.rate}; resample it (e.g. ffmpeg -i in.wav -ar {self.rate} out.wav)"
            )
        return wave_[: self.max_samples], self.labels[i]


def _audio_listing(folder: Path) -> list[tuple[Path, str]]:
    """(file, label) pairs: from ``labels.csv`` (columns file,label) if the folder
    has one, else from one subfolder per class."""
    table = folder / "labels.csv"
    if table.is_file():
        rows = _read_csv(table, ["file", "label"])
        pairs = [(folder / row["file"], row["label"]) for row in rows]
        missing = [str(p) for p, _ in pairs if not p.is_file()]
        if missing:
            raise DataSpecError(f"[data] {table} lists files that do not exist: {', '.join(missing[:3])}; paths are relative to {folder}")
        return pairs
    pairs = [(f, d.name) for d in sorted(folder.iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if f.suffix.lower() == ".wav"]
    if not pairs:
        raise DataSpecError(f"[data] {folder} has neither labels.csv (columns file,label) nor class subfolders with .wav files")
    return pairs


def load_audio(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """WAV files (read with the standard library's `wave`, so no audio backend is
    needed), labelled by ``labels.csv`` or by class subfolders. All files must share
    one sample rate; ``sample_rate`` states it, ``max_seconds`` crops long files."""
    _check_keys("audio-folder", options, {"sample_rate", "max_seconds"})
    train_dir = _path(options, "train", base, required=True, folder=True)
    val_dir = _path(options, "val", base, required=False, folder=True)
    train_pairs = _audio_listing(train_dir)
    val_pairs = _audio_listing(val_dir) if val_dir is not None else []
    classes = _classes([label for _, label in train_pairs])
    unknown = sorted({label for _, label in val_pairs} - set(classes))
    if unknown:
        raise DataSpecError(f"[data] validation labels {unknown} do not occur in the training data ({classes})")
    _, rate = read_wav(train_pairs[0][0])
    wanted = _int(options, "sample_rate", None)
    if wanted is not None and wanted != rate:
        raise DataSpecError(
            f"[data] sample_rate is {wanted}, but {train_pairs[0][0]} has {rate}; resample the files or set sample_rate = {rate}"
        )
    seconds = options.get("max_seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
        raise DataSpecError(f"[data] max_seconds must be a positive number, got {seconds!r}")
    max_samples = int(seconds * rate) if seconds else None
    index = {c: i for i, c in enumerate(classes)}

    def dataset(pairs: list[tuple[Path, str]]) -> AudioFiles:
        return AudioFiles([p for p, _ in pairs], [index[label] for _, label in pairs], rate, max_samples)

    train = dataset(train_pairs)
    train_set, val_set = (train, dataset(val_pairs)) if val_pairs else _split(train, options, seed)
    return LoadedData(
        train_set,
        val_set,
        classes,
        "audio-classification",
        f"{len(train_set)} training and {len(val_set)} validation clips at {rate} Hz, {len(classes)} classes",
    )


# ---------------------------------------------------------------------- text


def _read_csv(path: Path, columns: list[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise DataSpecError(f"[data] {path} has no column {', '.join(map(repr, missing))}; its columns are {reader.fieldnames}")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataSpecError(f"[data] {path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    if not rows:
        raise DataSpecError(f"[data] {path} has a header but no rows")
    return rows


def _classes(labels: list[str]) -> list[str]:
    """Sorted class names; numerically when every label is an integer."""
    unique = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


WORD = re.compile(r"\w+|[^\w\s]")


def hashing_tokenizer(vocab_size: int, lowercase: bool = True) -> Callable[[str], list[int]]:
    """Words and punctuation → ids in [1, vocab_size) by a stable hash (0 is padding):
    no vocabulary file to ship, and any model with an embedding of ``vocab_size``
    rows fits. Distinct words may share an id; a large vocab_size makes that rare."""

    def encode(text: str) -> list[int]:
        words = WORD.findall(text.lower() if lowercase else text)
        return [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in words]

    return encode


class Texts(Dataset):
    """Dict samples ``{"input_ids", "attention_mask", "labels"}`` as the text task
    takes them (it pads each batch)."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.tensor(self.ids[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def load_text(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """A CSV (``text_column``, ``label_column``), tokenised by a local Hugging Face
    tokenizer folder (``tokenizer``) or by `hashing_tokenizer` (``vocab_size``, which
    must match the model's embedding), cut to ``max_length`` tokens."""
    _check_keys("text-csv", options, {"text_column", "label_column", "max_length", "vocab_size", "lowercase", "tokenizer"})
    text_col, label_col = options.get("text_column", "text"), options.get("label_column", "label")
    max_length = _int(options, "max_length", 128)
    train_path = _path(options, "train", base, required=True, folder=False)
    val_path = _path(options, "val", base, required=False, folder=False)
    train_rows = _read_csv(train_path, [text_col, label_col])
    val_rows = _read_csv(val_path, [text_col, label_col]) if val_path is not None else []
    classes = _classes([r[label_col] for r in train_rows])
    unknown = sorted({r[label_col] for r in val_rows} - set(classes))
    if unknown:
        raise DataSpecError(f"[data] validation labels {unknown} do not occur in the training data ({classes})")
    tokenizer_dir = _path(options, "tokenizer", base, required=False, folder=True)
    if tokenizer_dir is not None:
        if "vocab_size" in options:
            raise DataSpecError(
                "[data] give either tokenizer (a local Hugging Face tokenizer folder) or vocab_size (the hashing tokenizer), not both"
            )
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except ImportError as exc:
            raise DataSpecError("[data] tokenizer needs transformers: pip install 'lora_anywhere[text]'") from exc
        except (OSError, ValueError) as exc:
            raise DataSpecError(
                f"[data] tokenizer: {tokenizer_dir} is not a tokenizer folder ({exc}); save one there with tokenizer.save_pretrained(...)"
            ) from exc
        encode: Callable[[str], list[int]] = lambda text: hf(text, truncation=True, max_length=max_length)["input_ids"]  # noqa: E731
        what = f"tokenizer {tokenizer_dir.name}"
    else:
        vocab_size = _int(options, "vocab_size", None, minimum=2)
        if vocab_size is None:
            raise DataSpecError(
                "[data] kind 'text-csv' needs vocab_size = N (the rows of the model's token embedding) or tokenizer = \"FOLDER\""
            )
        encode = hashing_tokenizer(vocab_size, bool(options.get("lowercase", True)))
        what = f"hashing tokenizer, {vocab_size} ids"
    index = {c: i for i, c in enumerate(classes)}

    def dataset(rows: list[dict[str, str]], path: Path) -> Texts:
        ids = [encode(r[text_col])[:max_length] for r in rows]
        empty = [i + 2 for i, t in enumerate(ids) if not t]
        if empty:
            raise DataSpecError(f"[data] {path}: rows {empty[:5]} have no tokens in column {text_col!r}; remove them")
        return Texts(ids, [index[r[label_col]] for r in rows])

    train = dataset(train_rows, train_path)
    train_set, val_set = (train, dataset(val_rows, val_path)) if val_path is not None else _split(train, options, seed)
    return LoadedData(
        train_set,
        val_set,
        classes,
        "text-classification",
        f"{len(train_set)} training and {len(val_set)} validation texts ({what}), {len(classes)} classes",
    )


KINDS: dict[str, Callable[[dict[str, Any], Path, int], LoadedData]] = {
    "image-folder": load_images,
    "pyg": load_graphs,
    "audio-folder": load_audio,
    "text-csv": load_text,
}


def load_data(options: dict[str, Any], base: Path, seed: int = 0) -> LoadedData:
    """The data a ``[data]`` section describes; paths are relative to `base`."""
    kind = options.get("kind")
    if kind not in KINDS:
        raise DataSpecError(f"[data] kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return KINDS[kind](options, base, seed)
