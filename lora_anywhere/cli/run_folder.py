"""The run folder's record: ``run.json`` says exactly what `train` built and trained
on — the model spec and resolved kwargs, the pretrained weights (path, name, SHA-256)
and their ignore list, the seed, the [data] options with absolute paths, the classes,
the task, the trainer options — so that ``merge --run``, ``evaluate`` and ``predict``
rebuild the same base model, put the adapter on it, and reproduce the trained model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import io
from ..atomic import atomic_file
from ..errors import ConfigError
from .model_spec import ModelSpec

RUN_FILE = "run.json"
RUN_FORMAT = "lora_anywhere.run/1"
#: [data] options that are paths, relative to the config file's folder.
PATH_OPTIONS = ("train", "val", "test", "tokenizer")
#: Checkpoints inside a run folder that ``--adapter`` names.
CHECKPOINTS = ("adapter", "best", "last")


@dataclass
class RunRecord:
    folder: Path
    model: ModelSpec
    data: dict[str, Any]
    data_seed: int
    classes: list[str]
    task: str
    content: dict[str, Any]

    def adapter(self, name: str | None) -> Path:
        """The adapter folder `name` names: ``adapter`` (the final one, the default),
        ``best`` or ``last`` inside the run folder, or a path."""
        name = name or "adapter"
        path = self.folder / name if name in CHECKPOINTS else Path(name)
        if not any((path / file).is_file() for file in (io.CONFIG_FILE, io.LEGACY_FILES[0])):  # native, legacy or PEFT
            raise ConfigError(f"no adapter at {path}; give adapter, best or last (folders of {self.folder}), or an adapter folder")
        return path


def absolute_data(options: dict[str, Any], base: Path) -> dict[str, Any]:
    """[data] options with their paths made absolute, so the record works from anywhere."""
    return {k: str((base / v).resolve()) if k in PATH_OPTIONS and isinstance(v, str) else v for k, v in options.items()}


def write_run(folder: Path, content: dict[str, Any]) -> Path:
    path = folder / RUN_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"format": RUN_FORMAT, **content}, indent=2) + "\n")
    return path


def read_run(folder: str | Path) -> RunRecord:
    """The record of a run folder, checked; the weights it names must be unchanged."""
    folder = Path(folder)
    path = folder / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} holds no {RUN_FILE}; give the folder `lora-anywhere train` wrote (its --out, or [train] out_dir)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(content, dict) or content.get("format") != RUN_FORMAT:
        raise ConfigError(
            f"{path} is not a run record of this version (format {content.get('format') if isinstance(content, dict) else None!r}, "
            f"expected {RUN_FORMAT!r}); train again, or merge with --model/--weights/--adapter"
        )
    try:
        return RunRecord(
            folder,
            ModelSpec.from_record(content["model"]),
            dict(content["data"]),
            int(content["data_seed"]),
            list(content["classes"]),
            str(content["task"]),
            content,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} lacks a field or has one of the wrong type ({type(exc).__name__}: {exc}); train again") from exc
