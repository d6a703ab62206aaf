"""`lora-anywhere train CONFIG.toml`, `lora-anywhere select-rank CONFIG.toml` and
`lora-anywhere merge`: a model spec, a data spec, LoRA options and trainer options in
one file → adapter, metrics and curves (or a rank chosen by cross-validation).

    [model]                      # paths in [model] and [data]: relative to this file
    spec = "torchvision:resnet18"
    kwargs = { num_classes = "{classes}" }   # "{classes}": the data's class count
    weights = "base.safetensors"             # optional pretrained weights: a file, a torchvision
                                             # name ("ResNet18_Weights.DEFAULT"), an hf folder
    weights_ignore = ["fc."]                 # keys not to load (the old head)
    seed = 0                                 # random init of what weights leave out

    [data]
    kind = "image-folder"        # image-folder | pyg | audio-folder | text-csv
    train = "data/images/train"

    [lora]                       # keyword arguments of lora_anywhere.apply
    rank = 8
    trainable = ["fc"]

    [train]                      # keyword arguments of lora_anywhere.Trainer
    epochs = 3
    out_dir = "runs/vision"      # relative to the current folder

    [select_rank]                # optional: `lora-anywhere select-rank` reads it
    ranks = [1, 2, 4, 8]
    folds = 5
    metric = "val_accuracy"      # or val_loss (minimised), train_accuracy, …
    seed = 0                     # the folds and the trainer's seed

The base model is built under ``torch.manual_seed(seed)``, so a base without
``weights`` is the same random model each time, and `merge` can rebuild it.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import api, plan
from ..errors import ConfigError
from ..training import options
from ..training.options import BOOLEAN, POSITIVE, TEXT, Kind, choice, integer, listing, number, strings, table
from ..training.trainer import Trainer
from .model_spec import CLASSES, ModelSpec
from .pretrained import resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("model", "data", "lora", "train", "select_rank")
#: `[lora]` and `[train]` take what `apply` and `Trainer` take, by keyword.
LORA_KEYS = {n for n, p in inspect.signature(api.apply).parameters.items() if p.kind is p.KEYWORD_ONLY}
#: (class_names comes from the data.)
TRAIN_KEYS = {n for n, p in inspect.signature(Trainer.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY} - {"class_names"}

# What each option of [model], [lora], [train] and [select_rank] allows, checked as
# the file is read (`options.check`), before anything is built or loaded.
_SELECTORS = Kind((TEXT | strings(empty=False)).test, 'a name, a glob or a class name, or a list of them, e.g. ["Conv2d", "fc"]')
MODEL_OPTIONS: dict[str, Kind] = {
    "spec": Kind(TEXT.test, 'a model spec "source:name", e.g. "torchvision:resnet18", "pyg:GCN", "mypackage.models:build"'),
    "kwargs": Kind(
        table(TEXT, Kind(lambda v: True, "")).test, f'a table of keyword arguments, e.g. kwargs = {{ num_classes = "{CLASSES}" }}'
    ),
    "weights": Kind(TEXT.test, "a path string to a .safetensors file or a torch state_dict"),
    "weights_ignore": Kind(strings().test, 'a list of key prefixes, e.g. ["fc."]'),
    "seed": integer(0),
}
LORA_OPTIONS: dict[str, Kind] = {
    "rank": integer(1),
    "alpha": POSITIVE,
    "targets": _SELECTORS,
    "exclude": _SELECTORS,
    "dropout": number(0, below=1),
    "trainable": _SELECTORS,
    "ranks": table(TEXT, integer(1)),
    "alphas": table(TEXT, POSITIVE),
    "route": choice(*plan.ROUTES),
    "path": choice(*plan.ROUTES),
    "freeze_a": BOOLEAN,
    "rslora": BOOLEAN,
    "init": choice(*api.INITS),
    "dora": BOOLEAN,
}
SELECT_RANK_OPTIONS: dict[str, Kind] = {
    "ranks": listing(integer(1), "a non-empty list of positive integers, e.g. ranks = [1, 2, 4, 8]"),
    "folds": integer(2),
    "metric": Kind(TEXT.test, 'a metric name such as "val_accuracy" or "val_loss"'),
    "seed": integer(0),
}


@dataclass
class TrainConfig:
    path: Path
    model: ModelSpec
    data: dict[str, Any]
    lora: dict[str, Any]
    train: dict[str, Any]
    select_rank: dict[str, Any] = field(default_factory=dict)


def _table(raw: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table (a [{name}] section), got {type(value).__name__}")
    return dict(value)


def _only(section: dict[str, Any], allowed: set[str], name: str, path: Path, what: str, kinds: dict[str, Kind]) -> None:
    """No unknown option, and each known one of a kind it allows."""
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{path}: [{name}] has no option {', '.join(map(repr, unknown))}; {what}: {', '.join(sorted(allowed))}")
    options.check(section, kinds, where=f"{path}: [{name}] ")


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a training config; see the module docstring for its shape."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see examples/configs/ for one per domain")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc})") from exc
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}; a config has [model], [data], [lora] and [train] (and optionally [select_rank])"
        )
    base = path.parent.resolve()
    model, data, lora, train, select = (_table(raw, name, path) for name in SECTIONS)
    _only(model, set(MODEL_OPTIONS), "model", path, "its options are", MODEL_OPTIONS)
    _only(lora, LORA_KEYS - {"name"}, "lora", path, "it takes the keyword arguments of lora_anywhere.apply", LORA_OPTIONS)
    _only(train, TRAIN_KEYS, "train", path, "it takes the keyword arguments of lora_anywhere.Trainer", options.TRAINER)
    _only(select, set(SELECT_RANK_OPTIONS), "select_rank", path, "its options are", SELECT_RANK_OPTIONS)
    if "spec" not in model:
        raise ConfigError(f'{path}: [model] needs spec = "source:name" (e.g. "torchvision:resnet18", "pyg:GCN", "mypackage.models:build")')
    spec, kwargs, ignore, seed = model["spec"], model.get("kwargs", {}), model.get("weights_ignore", []), model.get("seed", 0)
    weights = model.get("weights")
    if "kind" not in data:
        raise ConfigError(f'{path}: [data] needs kind = "image-folder", "pyg", "audio-folder" or "text-csv"')
    return TrainConfig(
        path=path,
        model=ModelSpec(spec, kwargs, resolve(weights, spec, base) if weights else None, ignore, seed),
        data=data,
        lora=lora,
        train=train,
        select_rank=select,
    )
