"""`lora-anywhere train CONFIG.toml`, `lora-anywhere select-rank CONFIG.toml` and
`lora-anywhere merge`: a model spec, a data spec, LoRA options and trainer options in
one file → adapter, metrics and curves (or a rank chosen by cross-validation).

    [model]                      # paths in [model] and [data]: relative to this file
    spec = "torchvision:resnet18"
    kwargs = { num_classes = "{classes}" }   # "{classes}": the data's class count
    weights = "base.safetensors"             # optional pretrained base weights
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
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from . import api, io
from .atomic import atomic_file
from .data_specs import LoadedData, load_data
from .errors import LoraError
from .models import build_model
from .rank_selection import NodeFolds, RankSelection, check_ranks, select_rank
from .tasks import Classification, LoaderSpec, get_task
from .trainer import Trainer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CLASSES = "{classes}"
SECTIONS = ("model", "data", "lora", "train", "select_rank")
MODEL_KEYS = {"spec", "kwargs", "weights", "weights_ignore", "seed"}
SELECT_RANK_KEYS = {"ranks", "folds", "metric", "seed"}
#: `[train]` options that cross-validation leaves out: its folds write nothing to disk
#: and take their seed from [select_rank] (or [train] seed).
NOT_FOR_FOLDS = ("out_dir", "resume", "log_format", "progress", "seed", "task")
#: `[lora]` and `[train]` take what `apply` and `Trainer` take, by keyword.
LORA_KEYS = {n for n, p in inspect.signature(api.apply).parameters.items() if p.kind is p.KEYWORD_ONLY}
TRAIN_KEYS = {n for n, p in inspect.signature(Trainer.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY}


class ConfigError(LoraError):
    """A config file, or a command-line model description, cannot be used as it is."""


# ---------------------------------------------------------------------- the model


@dataclass
class ModelSpec:
    """How to build the base model: `build_model(spec, **kwargs)` under a seed, then
    optional pretrained weights."""

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    weights_ignore: list[str] = field(default_factory=list)
    seed: int = 0

    def resolved_kwargs(self, classes: int | None) -> dict[str, Any]:
        """kwargs with every ``"{classes}"`` replaced by the class count."""

        def sub(value: Any) -> Any:
            if value == CLASSES:
                if classes is None:
                    raise ConfigError(f"model kwargs use {CLASSES!r}, but no class count is known here; give the number instead (e.g. --model-arg num_classes=3)")
                return classes
            if isinstance(value, dict):
                return {k: sub(v) for k, v in value.items()}
            if isinstance(value, list):
                return [sub(v) for v in value]
            return value

        return sub(self.kwargs)

    def build(self, classes: int | None = None) -> nn.Module:
        kwargs = self.resolved_kwargs(classes)
        torch.manual_seed(self.seed)
        try:
            model = build_model(self.spec, **kwargs)
        except (TypeError, ValueError) as exc:  # a model source's own complaint: an unknown name, a bad keyword
            raise ConfigError(f"model spec {self.spec!r} with {kwargs or 'no kwargs'}: {exc}") from exc
        if self.weights is not None:
            load_weights(model, self.weights, self.weights_ignore)
        return model


def load_weights(model: nn.Module, path: Path, ignore: list[str]) -> None:
    """Load base weights (safetensors, or a torch file of tensors), skipping keys that
    start with an `ignore` prefix; every other key must match the model exactly."""
    if not path.is_file():
        raise ConfigError(f"base weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except Exception as exc:  # safetensors, pickle and zip errors alike
        raise ConfigError(f"cannot read base weights {path} ({type(exc).__name__}: {exc}); give a .safetensors file or a torch state_dict") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state_dict (names → tensors)")
    skipped = lambda key: any(key.startswith(prefix) for prefix in ignore)  # noqa: E731
    expected = model.state_dict()
    wanted = {k: v for k, v in state.items() if not skipped(k)}
    problems = [f"missing {k}" for k in expected if k not in wanted and not skipped(k)]
    problems += [f"unexpected {k}" for k in wanted if k not in expected]
    problems += [f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}" for k, v in wanted.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ConfigError(f"base weights {path} do not fit the model: {shown}. Check the model spec and kwargs, or list keys to skip in weights_ignore (e.g. the old head)")
    model.load_state_dict(wanted, strict=False)


def parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (3, 0.5, true, [1, 2], "x"), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["num_classes=3", "dropout=0.1"]`` → ``{"num_classes": 3, "dropout": 0.1}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-arg {item!r} is not KEY=VALUE (e.g. --model-arg num_classes=10)")
        out[key.strip()] = parse_value(value)
    return out


# ---------------------------------------------------------------------- the config file


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


def _only(section: dict[str, Any], allowed: set[str], name: str, path: Path, what: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{path}: [{name}] has no option {', '.join(map(repr, unknown))}; {what}: {', '.join(sorted(allowed))}")


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
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; a config has [model], [data], [lora] and [train] (and optionally [select_rank])")
    base = path.parent.resolve()
    model, data, lora, train, select = (_table(raw, name, path) for name in SECTIONS)
    _only(model, MODEL_KEYS, "model", path, "its options are")
    _only(lora, LORA_KEYS - {"name"}, "lora", path, "it takes the keyword arguments of lora_anywhere.apply")
    _only(train, TRAIN_KEYS, "train", path, "it takes the keyword arguments of lora_anywhere.Trainer")
    _only(select, SELECT_RANK_KEYS, "select_rank", path, "its options are")
    _check_select_rank(select, path)
    spec = model.get("spec")
    if not isinstance(spec, str):
        raise ConfigError(f"{path}: [model] needs spec = \"source:name\" (e.g. \"torchvision:resnet18\", \"pyg:GCN\", \"mypackage.models:build\")")
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{path}: [model] kwargs must be a table, e.g. kwargs = {{ num_classes = \"{CLASSES}\" }}")
    ignore = model.get("weights_ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError(f"{path}: [model] weights_ignore must be a list of key prefixes, e.g. [\"fc.\"]")
    seed = model.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{path}: [model] seed must be an integer, got {seed!r}")
    weights = model.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise ConfigError(f"{path}: [model] weights must be a path string")
    if "kind" not in data:
        raise ConfigError(f"{path}: [data] needs kind = \"image-folder\", \"pyg\", \"audio-folder\" or \"text-csv\"")
    return TrainConfig(
        path=path,
        model=ModelSpec(spec, kwargs, (base / weights) if weights else None, ignore, seed),
        data=data,
        lora=lora,
        train=train,
        select_rank=select,
    )


def _check_select_rank(select: dict[str, Any], path: Path) -> None:
    def whole(value: Any, minimum: int) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and value >= minimum

    ranks = select.get("ranks", [1])
    if not isinstance(ranks, list) or not ranks or not all(whole(r, 1) for r in ranks):
        raise ConfigError(f"{path}: [select_rank] ranks must be a non-empty list of positive integers, e.g. ranks = [1, 2, 4, 8], got {ranks!r}")
    if not whole(select.get("folds", 2), 2):
        raise ConfigError(f"{path}: [select_rank] folds must be an integer of at least 2, got {select['folds']!r}")
    if not isinstance(select.get("metric", ""), str):
        raise ConfigError(f"{path}: [select_rank] metric must be a metric name such as \"val_accuracy\" or \"val_loss\", got {select['metric']!r}")
    if not whole(select.get("seed", 0), 0):
        raise ConfigError(f"{path}: [select_rank] seed must be an integer ≥ 0, got {select['seed']!r}")


# ---------------------------------------------------------------------- train


@dataclass
class TrainResult:
    out_dir: Path
    adapter: Path
    history: list[dict[str, float]]
    data: LoadedData
    model_kwargs: dict[str, Any]
    interrupted: bool = False  # Ctrl-C: the trainer saved last/, which resume = true continues


def _check_outputs(model: nn.Module, data: LoadedData, task: Any, spec: ModelSpec) -> None:
    """One forward pass on two training examples before training starts, so that a
    model whose output does not fit the data fails with a message instead of a
    cross-entropy index error minutes later."""
    if not isinstance(task, Classification):
        return
    batch = next(iter(task.batches(data.train, train=False, spec=LoaderSpec(batch_size=2))))
    model.eval()
    try:
        with torch.no_grad():
            logits, _ = task.forward(model, batch, train=False)
    except Exception as exc:
        raise ConfigError(
            f"the model {spec.spec} cannot run on a batch of this data ({type(exc).__name__}: {exc}); "
            f"the {task.name} task calls it as described in docs/trainer.md — check the model kwargs (input sizes) and [data] options"
        ) from exc
    finally:
        model.train()
    if logits.shape[-1] != len(data.classes):
        raise ConfigError(
            f"the model outputs {logits.shape[-1]} scores per example, but the data has {len(data.classes)} classes; "
            f"set the model's output size to \"{CLASSES}\" in [model] kwargs (e.g. num_classes = \"{CLASSES}\")"
        )


def _check_device(config: TrainConfig, device: Any) -> None:
    """A device the trainer can use (`auto`, `cpu`, `cuda`, `cuda:N`), before any work."""
    if device is None or device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{config.path}: device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{config.path}: device {device!r} was asked for, but torch sees no CUDA device; use cpu or auto")


def run_training(
    config: TrainConfig, *, out_dir: str | Path | None = None, epochs: int | None = None, device: str | None = None, rank: int | None = None, say: Callable[[str], None] = print
) -> TrainResult:
    """Build, adapt and train as the config says (`rank` overrides [lora] rank); write
    the adapter, metrics, curves, the class names and the resolved config to the output
    folder."""
    train_options = dict(config.train)
    out = Path(out_dir if out_dir is not None else train_options.pop("out_dir", "runs/train"))
    train_options.pop("out_dir", None)
    if epochs is not None:
        train_options["epochs"] = epochs
    if device is not None:
        train_options["device"] = device
    _check_device(config, train_options.get("device"))
    data = load_data(config.data, config.path.parent.resolve(), seed=int(train_options.get("seed", 0)))
    say(f"data: {data.description}")
    kwargs = config.model.resolved_kwargs(len(data.classes))
    model = config.model.build(len(data.classes))
    try:
        api.apply(model, **{**config.lora, **({"rank": rank} if rank is not None else {})})
    except TypeError as exc:
        raise ConfigError(f"{config.path}: [lora] {exc}") from exc
    task_name = train_options.pop("task", data.task)
    try:
        task = get_task(task_name)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config.path}: [train] task: {exc}") from exc
    _check_outputs(model, data, task, config.model)
    from .summary import summary

    s = summary(model)
    say(f"model: {config.model.spec}, {len(s.rows)} adapted tensors; {s.trainable_params:,} of {s.total_params:,} parameters train ({100 * s.trainable_share:.2f}%)")
    try:
        trainer = Trainer(model, data.train, data.val, task=task, out_dir=out, **train_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: [train] {exc}") from exc
    history = trainer.fit()
    adapter = io.save_adapter(model, out / "adapter")
    run = {
        "config": str(config.path),
        "model": {"spec": config.model.spec, "kwargs": kwargs, "weights": str(config.model.weights) if config.model.weights else None, "seed": config.model.seed},
        "classes": data.classes,
        "history": history,
    }
    with atomic_file(out / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=2))
    if history:
        last = history[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "lr", "seconds"))
        say(f"after {int(last['epoch'])} epochs: {shown}")
    return TrainResult(out, adapter, history, data, kwargs, trainer.interrupted)


def merge_command(result: TrainResult, spec: ModelSpec) -> str:
    """The `lora-anywhere merge` line that turns this run's adapter into plain weights."""
    args = " ".join(f"--model-arg {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in result.model_kwargs.items())
    parts = ["lora-anywhere merge", f"--model {spec.spec}", args]
    if spec.weights is not None:
        parts.append(f"--weights {spec.weights}")
    if spec.seed:
        parts.append(f"--seed {spec.seed}")
    parts += [f"--adapter {result.adapter}", f"--out {result.out_dir / 'merged.safetensors'}"]
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------- select-rank


@dataclass
class RankSelectionResult:
    selection: RankSelection
    folds: int
    seed: int
    samples: int
    data: LoadedData

    def as_dict(self, config: TrainConfig) -> dict[str, Any]:
        return {"config": str(config.path), "model": config.model.spec, "folds": self.folds, "seed": self.seed, "samples": self.samples, **self.selection.as_dict()}


def _fold_data(data: LoadedData) -> Any:
    """Training and validation data together, as the samples cross-validation folds:
    one indexable data set, or the labelled nodes of one graph."""
    if data.train is data.val:  # node classification: one graph with both masks
        return NodeFolds(data.train)
    if isinstance(data.train, list) and isinstance(data.val, list):  # graphs
        return data.train + data.val
    return ConcatDataset([data.train, data.val])


def run_rank_selection(
    config: TrainConfig,
    *,
    ranks: list[int] | None = None,
    folds: int | None = None,
    metric: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    say: Callable[[str], None] = print,
) -> RankSelectionResult:
    """k-fold cross-validation over candidate ranks on the config's training and
    validation data together: [lora] options other than rank go to `apply`, [train]
    options to the `Trainer` (but no output folder: the folds write nothing). The
    arguments override [select_rank]."""
    options = config.select_rank
    ranks = list(ranks if ranks is not None else options.get("ranks", [1, 2, 4, 8, 16]))
    folds = folds if folds is not None else options.get("folds", 5)
    metric = metric if metric is not None else options.get("metric", "val_accuracy")
    seed = options.get("seed", config.train.get("seed", 0))
    trainer_options = {k: v for k, v in config.train.items() if k not in NOT_FOR_FOLDS}
    if epochs is not None:
        trainer_options["epochs"] = epochs
    if device is not None:
        trainer_options["device"] = device
    _check_device(config, trainer_options.get("device"))
    apply_options = {k: v for k, v in config.lora.items() if k != "rank"}
    data = load_data(config.data, config.path.parent.resolve(), seed=int(seed))
    samples = _fold_data(data)
    say(f"data: {data.description}; {len(samples)} {'nodes' if isinstance(samples, NodeFolds) else 'samples'} to fold")
    try:
        task = get_task(config.train.get("task", data.task))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config.path}: [train] task: {exc}") from exc
    # Fail fast, before any fold trains: the LoRA options, the model on this data, the
    # trainer options (checked with the first candidate rank).
    selection_ranks = check_ranks(ranks)
    model = config.model.build(len(data.classes))
    try:
        api.apply(model, rank=selection_ranks[0], **apply_options)
    except TypeError as exc:
        raise ConfigError(f"{config.path}: [lora] {exc}") from exc
    _check_outputs(model, data, task, config.model)
    try:
        Trainer(model, data.train, data.val, task=task, progress=False, **trainer_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: [train] {exc}") from exc
    say(f"cross-validating ranks {', '.join(map(str, selection_ranks))} with {folds} folds on {metric} ({_epochs(int(trainer_options.get('epochs', 3)))} per fold)")
    selection = select_rank(
        lambda: config.model.build(len(data.classes)), samples, task=task, ranks=selection_ranks, folds=folds, metric=metric,
        apply_kwargs=apply_options, trainer_kwargs=trainer_options, seed=int(seed), say=say,
    )  # fmt: skip
    return RankSelectionResult(selection, folds, int(seed), len(samples), data)


def train_command(config: TrainConfig, rank: int) -> str:
    """The `lora-anywhere train` line that trains at `rank` with this config."""
    return f"lora-anywhere train {config.path} --rank {rank}"


# ---------------------------------------------------------------------- merge


def merge_to_file(spec: ModelSpec, adapter: str | Path, out: str | Path) -> dict[str, Any]:
    """Build the base, load the adapter, merge it in and write the plain model's
    state_dict as safetensors (atomically). The file loads into the model built
    from the same spec with ``load_state_dict``."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the merged weights are written as safetensors; name the file *.safetensors")
    model = spec.build()
    io.load_adapter(model, adapter)
    if any(True for _ in api.adapted_layers(model)):
        api.remove(model, merge=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_file(out) as tmp:
        save_file(state, str(tmp), metadata={"format": "lora_anywhere.merged/1", "model": spec.spec})
    return {"tensors": len(state), "parameters": sum(v.numel() for v in state.values()), "bytes": out.stat().st_size}


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"
