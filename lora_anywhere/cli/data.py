"""Data for `lora-anywhere train`: the four kinds of data set a config can name.

==============  ============================================================  ======================
kind            what is on disk                                               default task
==============  ============================================================  ======================
image-folder    ``train/<class>/*.png|jpg…`` (torchvision's ImageFolder)      image-classification
pyg             a file written by ``InMemoryDataset.save(graphs, path)``      node- or graph-classification
audio-folder    WAV files in ``<class>/`` folders, or beside a labels.csv     audio-classification
text-csv        a CSV with a text column and a label column                   text-classification
==============  ============================================================  ======================

Every kind takes ``train`` (a path), ``val`` or else ``val_fraction`` (default 0.2)
of the training set, split with a fixed seed, and optionally ``test`` (a path, scored
once after training; for one graph, its ``test_mask``). Frameworks are imported only
for the kind that needs them. Each loader checks what it reads and says what is wrong
and how to fix it; nothing is unpickled (the PyG file loads with
``weights_only=True``). What a loader chose (normalisation, augmentation, which nodes
each split holds) is in `LoadedData.info`, which the run folder records.
"""

from __future__ import annotations

import copy
import csv
import re
import wave
import zlib
from dataclasses import dataclass, field
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
    test: Any = None
    #: What the loader chose, as the run folder records it (normalisation, augmentation, node splits…).
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- options


_COMMON = {"kind", "train", "val", "val_fraction", "test"}


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


def _counts(train: Any, val: Any, test: Any, noun: str) -> str:
    """ "8 training and 2 validation images", with "and 3 test" when there is a test set."""
    if test is None:
        return f"{len(train)} training and {len(val)} validation {noun}"
    return f"{len(train)} training, {len(val)} validation and {len(test)} test {noun}"


def _int(options: dict[str, Any], key: str, default: int | None, minimum: int = 1) -> int | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataSpecError(f"[data] {key} must be an integer ≥ {minimum}, got {value!r}")
    return value


# ---------------------------------------------------------------------- images

#: ImageNet's channel statistics, which torchvision's and timm's ImageNet weights expect.
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
AUGMENTATIONS = ("crop", "flip", "color")


def image_options(options: dict[str, Any]) -> dict[str, Any]:
    """The image options, checked, with their defaults: what the run folder records and
    `image_transform` builds from."""
    size = options.get("image_size", 224)
    if isinstance(size, bool) or not (
        isinstance(size, int) and size > 0 or isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise DataSpecError(f"[data] image_size must be a positive integer or [height, width], got {size!r}")
    normalize = options.get("normalize", "none")
    if normalize == "imagenet":
        stats: dict[str, Any] | None = dict(IMAGENET)
    elif normalize == "none":
        stats = None
    else:
        raise DataSpecError(
            f'[data] normalize must be "imagenet" (ImageNet\'s mean and std) or "none", got {normalize!r}; or give mean and std'
        )
    if "mean" in options or "std" in options:
        mean, std = options.get("mean"), options.get("std")
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
            raise DataSpecError(f"[data] mean and std must be lists of one number per channel, got mean={mean!r}, std={std!r}")
        if "normalize" in options:
            raise DataSpecError("[data] give either normalize or mean and std, not both")
        stats = {"mean": mean, "std": std}
    augment = options.get("augment", False)
    if augment is True:
        augment = ["crop", "flip"]
    if augment is False:
        augment = []
    if not isinstance(augment, list) or not set(augment) <= set(AUGMENTATIONS):
        raise DataSpecError(f"[data] augment must be true (crop and flip), false, or a list of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    return {"image_size": size, "grayscale": bool(options.get("grayscale", False)), "normalize": stats, "augment": augment}


def image_transform(chosen: dict[str, Any], *, train: bool) -> Any:
    """Resize to ``image_size``, [0, 1] tensors, then the normalisation; for training
    also the augmentations: ``crop`` (a random 50–100% area crop, resized back),
    ``flip`` (left–right) and ``color`` (brightness, contrast, saturation ±20%)."""
    from torchvision import transforms

    size = chosen["image_size"] if isinstance(chosen["image_size"], int) else tuple(chosen["image_size"])
    steps: list[Any] = []
    augment = chosen["augment"] if train else []
    steps.append(transforms.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True) if "crop" in augment else transforms.Resize(size))
    if "flip" in augment:
        steps.append(transforms.RandomHorizontalFlip())
    if "color" in augment:
        steps.append(transforms.ColorJitter(0.2, 0.2, 0.2))
    if chosen["grayscale"]:
        steps.append(transforms.Grayscale())
    steps.append(transforms.ToTensor())
    if chosen["normalize"] is not None:
        steps.append(transforms.Normalize(chosen["normalize"]["mean"], chosen["normalize"]["std"]))
    return transforms.Compose(steps)


def describe_images(chosen: dict[str, Any]) -> str:
    size = chosen["image_size"]
    shown = f"{size}×{size}" if isinstance(size, int) else f"{size[0]}×{size[1]}"
    norm = chosen["normalize"]
    if norm is None:
        how = 'scaled to [0, 1], not normalised (normalize = "imagenet" for ImageNet-pretrained weights)'
    else:
        how = f"scaled to [0, 1], normalised with mean {norm['mean']} and std {norm['std']}"
    augment = f"; training augmented with {', '.join(chosen['augment'])}" if chosen["augment"] else ""
    return f"{shown}, {how}{augment}"


def load_images(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """torchvision's ImageFolder; see `image_options` for the choices."""
    _check_keys("image-folder", options, {"image_size", "grayscale", "mean", "std", "normalize", "augment"})
    try:
        from torchvision import datasets
    except ImportError as exc:
        raise DataSpecError("[data] kind 'image-folder' needs torchvision: pip install 'lora_anywhere[vision]'") from exc
    chosen = image_options(options)
    train_tf, eval_tf = image_transform(chosen, train=True), image_transform(chosen, train=False)

    def folder(path: Path, transform: Any) -> Any:
        try:
            return datasets.ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in them
            raise DataSpecError(f"[data] {path}: {exc}; put the images in one subfolder per class, e.g. {path}/cat/1.png") from exc

    def same_classes(other: Any, key: str) -> Any:
        if other.classes != train.classes:
            raise DataSpecError(
                f"[data] the class folders differ: train has {train.classes}, {key} has {other.classes}; use the same class names in both"
            )
        return other

    train_dir = _path(options, "train", base, required=True, folder=True)
    train = folder(train_dir, train_tf)
    val_dir = _path(options, "val", base, required=False, folder=True)
    if val_dir is not None:
        train_set, val_set = train, same_classes(folder(val_dir, eval_tf), "val")
    else:  # two views of one folder: augmented for training, plain for validation
        train_set, _ = _split(train, options, seed)
        _, val_set = _split(folder(train_dir, eval_tf), options, seed)
    test_dir = _path(options, "test", base, required=False, folder=True)
    test_set = same_classes(folder(test_dir, eval_tf), "test") if test_dir is not None else None
    return LoadedData(
        train_set,
        val_set,
        list(train.classes),
        "image-classification",
        f"{_counts(train_set, val_set, test_set, 'images')} of {len(train.classes)} classes, {describe_images(chosen)}",
        test=test_set,
        info=chosen,
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
    graph: node classification on its own masks (see `_node_split`). Several: graph
    classification, one ``y`` each."""
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
        graph, test_view, split = _node_split(train[0], options, seed)
        classes = int(graph.y.max()) + 1
        return LoadedData(
            graph,
            graph,
            [str(c) for c in range(classes)],
            "node-classification",
            f"one graph of {graph.num_nodes} nodes ({split}), {classes} classes",
            test=test_view,
            info={"nodes": split},
        )
    graphs = [train[i] for i in range(len(train))]
    if val_path is not None:
        val_data = SavedGraphs(val_path)
        train_set, val_set = graphs, [val_data[i] for i in range(len(val_data))]
    else:
        train_set, val_set = (list(part) for part in _split(graphs, options, seed))
    test_path = _path(options, "test", base, required=False, folder=False)
    test_set = None
    if test_path is not None:
        test_data = SavedGraphs(test_path)
        test_set = [test_data[i] for i in range(len(test_data))]
    classes = int(max(int(g.y.max()) for g in graphs)) + 1
    return LoadedData(
        train_set,
        val_set,
        [str(c) for c in range(classes)],
        "graph-classification",
        f"{_counts(train_set, val_set, test_set, 'graphs')}, {classes} classes",
        test=test_set,
    )


def _node_split(graph: Any, options: dict[str, Any], seed: int) -> tuple[Any, Any, str]:
    """The graph's own masks when it has them (a missing val_mask: the nodes no other
    mask claims); a random split only when it has none and ``val_fraction`` asks for
    one. Returns the graph, a view of it whose val_mask is its test_mask (or None),
    and which nodes each split holds, in words."""
    masks = [m for m in ("train_mask", "val_mask", "test_mask") if getattr(graph, m, None) is not None]
    if masks and "val_fraction" in options:
        raise DataSpecError(
            f"[data] the graph has its own {', '.join(masks)}, which are used as they are; leave out val_fraction (it splits graphs without masks)"
        )
    if not masks:
        if "val_fraction" not in options:
            raise DataSpecError(
                "[data] the graph has no train_mask, val_mask or test_mask, so nothing is held out to validate on; add masks to the "
                "graph, or set val_fraction = 0.2 to hold out a random 20% of its nodes"
            )
        order = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(graph.num_nodes * _fraction(options)))
        graph.val_mask = torch.zeros(graph.num_nodes, dtype=torch.bool)
        graph.val_mask[order[:n_val]] = True
        graph.train_mask = ~graph.val_mask
    from ..training.tasks import NodeClassification

    task = NodeClassification()
    train_nodes, train_how = task.nodes(graph, train=True)
    val_nodes, val_how = task.nodes(graph, train=False)
    if not masks:
        val_how = f"a random {_fraction(options):.0%} (val_fraction; the graph has no masks)"
    test_view, test_how = None, ""
    if getattr(graph, "test_mask", None) is not None:
        test_view = copy.copy(graph)
        test_view.val_mask = graph.test_mask
        test_how = f", {int(graph.test_mask.sum())} to test on (test_mask)"
    counted = lambda mask: graph.num_nodes if mask is None else int(mask.sum())  # noqa: E731
    split = f"{counted(train_nodes)} to train on ({train_how}), {counted(val_nodes)} to validate on ({val_how}){test_how}"
    return graph, test_view, split


# ---------------------------------------------------------------------- audio


#: The files an audio folder lists: WAV is read by the standard library, the rest by torchaudio.
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


def read_audio(path: Path) -> tuple[torch.Tensor, int]:
    """A mono float waveform and its sample rate: PCM WAV with the standard library's
    `wave` (no audio backend needed), any other file — FLAC, MP3, Ogg, float WAV — with
    ``torchaudio.load``, which needs a decoding backend (torchcodec, with FFmpeg)."""
    if path.suffix.lower() == ".wav":
        try:
            return read_wav(path)
        except DataSpecError as exc:
            if "not a PCM WAV file" not in str(exc):
                raise
            first = exc
    else:
        first = None
    try:
        import torchaudio

        waveform, rate = torchaudio.load(str(path))
    except Exception as exc:  # no backend (ImportError, RuntimeError), or a file it cannot decode
        if first is not None and path.suffix.lower() == ".wav":
            raise first from exc
        raise DataSpecError(
            f"[data] {path} cannot be read: torchaudio.load failed ({type(exc).__name__}: {exc}). torchaudio reads "
            f"{path.suffix} through a backend (pip install torchcodec, with FFmpeg installed); or convert the file to PCM WAV, which "
            "needs none: ffmpeg -i in.flac -ac 1 out.wav"
        ) from exc
    return waveform.float().mean(0), int(rate)


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
        wave_, rate = read_audio(self.files[i])
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
    pairs = [(f, d.name) for d in sorted(folder.iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if f.suffix.lower() in AUDIO_SUFFIXES]
    if not pairs:
        raise DataSpecError(
            f"[data] {folder} has neither labels.csv (columns file,label) nor class subfolders with audio files ({', '.join(AUDIO_SUFFIXES)})"
        )
    return pairs


def load_audio(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """Audio files (see `read_audio`: PCM WAV needs no audio backend), labelled by
    ``labels.csv`` or by class subfolders. All files must share one sample rate;
    ``sample_rate`` states it, ``max_seconds`` crops long files."""
    _check_keys("audio-folder", options, {"sample_rate", "max_seconds"})
    train_dir = _path(options, "train", base, required=True, folder=True)
    val_dir = _path(options, "val", base, required=False, folder=True)
    train_pairs = _audio_listing(train_dir)
    val_pairs = _audio_listing(val_dir) if val_dir is not None else []
    test_dir = _path(options, "test", base, required=False, folder=True)
    test_pairs = _audio_listing(test_dir) if test_dir is not None else []
    classes = _classes([label for _, label in train_pairs])
    _known_labels(classes, [label for _, label in val_pairs], "validation")
    _known_labels(classes, [label for _, label in test_pairs], "test")
    _, rate = read_audio(train_pairs[0][0])
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
    test_set = dataset(test_pairs) if test_pairs else None
    return LoadedData(
        train_set,
        val_set,
        classes,
        "audio-classification",
        f"{_counts(train_set, val_set, test_set, 'clips')} at {rate} Hz, {len(classes)} classes",
        test=test_set,
        info={"sample_rate": rate, "max_seconds": seconds},
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


def _known_labels(classes: list[str], labels: list[str], split: str) -> None:
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataSpecError(f"[data] {split} labels {unknown} do not occur in the training data ({classes})")


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


def text_encoder(options: dict[str, Any], base: Path) -> tuple[Callable[[str], list[int]], str]:
    """The tokenizer a [data] section names — a local Hugging Face tokenizer folder
    (``tokenizer``) or `hashing_tokenizer` (``vocab_size``) — cut to ``max_length``
    tokens, and its description."""
    max_length = _int(options, "max_length", 128)
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
        return (lambda text: hf(text, truncation=True, max_length=max_length)["input_ids"]), f"tokenizer {tokenizer_dir.name}"
    vocab_size = _int(options, "vocab_size", None, minimum=2)
    if vocab_size is None:
        raise DataSpecError(
            "[data] kind 'text-csv' needs vocab_size = N (the rows of the model's token embedding) or tokenizer = \"FOLDER\""
        )
    hashing = hashing_tokenizer(vocab_size, bool(options.get("lowercase", True)))
    return (lambda text: hashing(text)[:max_length]), f"hashing tokenizer, {vocab_size} ids"


def load_text(options: dict[str, Any], base: Path, seed: int) -> LoadedData:
    """A CSV (``text_column``, ``label_column``), tokenised by `text_encoder`."""
    _check_keys("text-csv", options, {"text_column", "label_column", "max_length", "vocab_size", "lowercase", "tokenizer"})
    text_col, label_col = options.get("text_column", "text"), options.get("label_column", "label")
    paths = {split: _path(options, split, base, required=split == "train", folder=False) for split in ("train", "val", "test")}
    rows = {split: _read_csv(path, [text_col, label_col]) for split, path in paths.items() if path is not None}
    classes = _classes([r[label_col] for r in rows["train"]])
    _known_labels(classes, [r[label_col] for r in rows.get("val", [])], "validation")
    _known_labels(classes, [r[label_col] for r in rows.get("test", [])], "test")
    encode, what = text_encoder(options, base)
    index = {c: i for i, c in enumerate(classes)}

    def dataset(split: str) -> Texts:
        ids = [encode(r[text_col]) for r in rows[split]]
        empty = [i + 2 for i, t in enumerate(ids) if not t]
        if empty:
            raise DataSpecError(f"[data] {paths[split]}: rows {empty[:5]} have no tokens in column {text_col!r}; remove them")
        return Texts(ids, [index[r[label_col]] for r in rows[split]])

    train = dataset("train")
    train_set, val_set = (train, dataset("val")) if "val" in rows else _split(train, options, seed)
    test_set = dataset("test") if "test" in rows else None
    return LoadedData(
        train_set,
        val_set,
        classes,
        "text-classification",
        f"{_counts(train_set, val_set, test_set, 'texts')} ({what}), {len(classes)} classes",
        test=test_set,
        info={"tokenizer": what},
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
