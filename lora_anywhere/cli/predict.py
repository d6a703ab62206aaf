"""`lora-anywhere predict RUN_DIR INPUT…`: a run's trained model on new files.

The model is rebuilt from the run record with its adapter; the inputs are read the
way the run's [data] kind reads its files — images resized and normalised as in
training (no augmentation), audio files read and cropped alike, texts tokenised by
the same tokenizer — and each gets its most likely class and that class's
probability. For node classification the run's own graph is the input: every node
gets a prediction, labelled or not.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..training.data import LoaderSpec
from ..training.tasks import Classification, get_task, logits_of
from .data import AUDIO_SUFFIXES, image_options, image_transform, load_data, read_audio, text_encoder
from .jobs import rebuild
from .run_folder import read_run

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Prediction:
    input: str
    label: str
    probability: float


def predict_run(run_dir: str | Path, inputs: list[str], *, adapter: str | None = None, batch_size: int = 32) -> list[Prediction]:
    """One prediction per input (per node, for a node-classification run)."""
    record = read_run(run_dir)
    task = get_task(record.task)
    if not isinstance(task, Classification):
        raise ConfigError(f"predict gives classes; the run's task {record.task!r} is not a classification task")
    model, _ = rebuild(record, adapter)
    model.eval()
    kind = record.data["kind"]
    if kind == "pyg":
        return _predict_nodes(record, model, task, inputs)
    names, samples = _read_inputs(kind, record.data, record.content.get("data_info", {}), record.folder, inputs)
    out: list[Prediction] = []
    with torch.no_grad():
        for batch in task.batches(samples, train=False, spec=LoaderSpec(batch_size=batch_size)):
            logits, _ = task.forward(model, batch, train=False)
            out += _top(logits, record.classes, names[len(out) : len(out) + len(logits)])
    return out


def write_predictions(predictions: list[Prediction], path: str | Path | None) -> str:
    """The predictions as CSV (input, label, probability): to `path`, or returned."""
    rows = [["input", "label", "probability"]] + [[p.input, p.label, f"{p.probability:.4f}"] for p in predictions]
    if path is None:
        return "\n".join(",".join(_cell(c) for c in row) for row in rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return str(path)


def _cell(text: str) -> str:
    return f'"{text}"' if any(c in text for c in ',"\n') else text


def _top(logits: torch.Tensor, classes: list[str], names: list[str]) -> list[Prediction]:
    probability, index = logits.float().softmax(-1).max(-1)
    return [Prediction(name, classes[i], float(p)) for name, i, p in zip(names, index.tolist(), probability.tolist())]


def _predict_nodes(record: Any, model: nn.Module, task: Any, inputs: list[str]) -> list[Prediction]:
    if inputs:
        raise ConfigError("for a graph run, predict labels every node of the run's own graph; give no INPUT")
    data = load_data(record.data, record.folder, seed=record.data_seed)
    if data.task != "node-classification":
        raise ConfigError("predict on graphs covers node classification (the run's own graph); score graph classification with evaluate")
    with torch.no_grad():
        logits = logits_of(task.call(model, data.train))
    return _top(logits, record.classes, [f"node {i}" for i in range(logits.shape[0])])


def _files(inputs: list[str], suffixes: tuple[str, ...], what: str) -> list[Path]:
    """The input files: each INPUT a file, or a folder searched recursively."""
    if not inputs:
        raise ConfigError(f"give one or more {what} files or folders to predict on")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes)
            if not found:
                raise ConfigError(f"{path} holds no {what} files ({', '.join(suffixes)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path} does not exist")
    return files


def _read_inputs(kind: str, options: dict[str, Any], info: dict[str, Any], folder: Path, inputs: list[str]) -> tuple[list[str], list[Any]]:
    """(names, samples with a placeholder label 0) for the run's data kind."""
    if kind == "image-folder":
        from PIL import Image

        transform = image_transform(image_options(options), train=False)
        files = _files(inputs, IMAGE_SUFFIXES, "image")
        return [str(f) for f in files], [(transform(Image.open(f).convert("RGB")), 0) for f in files]
    if kind == "audio-folder":
        files = _files(inputs, AUDIO_SUFFIXES, "audio")
        rate, seconds = info.get("sample_rate"), info.get("max_seconds")
        samples = []
        for f in files:
            wave, file_rate = read_audio(f)
            if rate is not None and file_rate != rate:
                raise ConfigError(f"{f} has sample rate {file_rate}; the model was trained at {rate} Hz: resample it")
            samples.append((wave[: int(seconds * file_rate)] if seconds else wave, 0))
        return [str(f) for f in files], samples
    if kind == "text-csv":
        encode, _ = text_encoder(options, folder)
        names, texts = _texts(inputs, options.get("text_column", "text"))
        samples = []
        for text in texts:
            ids = torch.tensor(encode(text) or [0], dtype=torch.long)
            samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": 0})
        return names, samples
    raise ConfigError(f"predict does not read inputs of kind {kind!r}")


def _texts(inputs: list[str], column: str) -> tuple[list[str], list[str]]:
    """Texts from CSV files (their `column`) or plain text files (one text per line)."""
    names, texts = [], []
    for item in inputs:
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; give CSV files (a {column!r} column) or text files (one text per line)")
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if column not in (reader.fieldnames or []):
                    raise ConfigError(f"{path} has no column {column!r}; its columns are {reader.fieldnames}")
                rows = [row[column] for row in reader]
        else:
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        names += [f"{path}:{i + 1}" for i in range(len(rows))]
        texts += rows
    if not texts:
        raise ConfigError("the inputs hold no text to predict on")
    return names, texts
