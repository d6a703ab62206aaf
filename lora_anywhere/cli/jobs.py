"""What `train`, `select-rank` and `merge` do with a checked config: build, adapt,
train or cross-validate, and write the results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from .. import api, io
from ..atomic import atomic_file
from ..errors import ConfigError
from ..log import logger
from ..training.rank_selection import NodeFolds, RankSelection, check_ranks, select_rank
from ..training.tasks import Classification, LoaderSpec, get_task
from ..training.trainer import Trainer
from .config import TrainConfig
from .data import LoadedData, load_data
from .model_spec import CLASSES, ModelSpec

#: `[train]` options that cross-validation leaves out: its folds write nothing to disk
#: and take their seed from [select_rank] (or [train] seed).
NOT_FOR_FOLDS = ("out_dir", "resume", "log_format", "progress", "seed", "task")


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
            f'set the model\'s output size to "{CLASSES}" in [model] kwargs (e.g. num_classes = "{CLASSES}")'
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
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    epochs: int | None = None,
    device: str | None = None,
    rank: int | None = None,
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
    logger.info(f"data: {data.description}")
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
    from ..summary import summary

    s = summary(model)
    logger.info(
        f"model: {config.model.spec}, {len(s.rows)} adapted tensors; {s.trainable_params:,} of {s.total_params:,} parameters train ({100 * s.trainable_share:.2f}%)"
    )
    try:
        trainer = Trainer(model, data.train, data.val, task=task, out_dir=out, **train_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: [train] {exc}") from exc
    history = trainer.fit()
    adapter = io.save_adapter(model, out / "adapter")
    run = {
        "config": str(config.path),
        "model": {
            "spec": config.model.spec,
            "kwargs": kwargs,
            "weights": str(config.model.weights) if config.model.weights else None,
            "seed": config.model.seed,
        },
        "classes": data.classes,
        "history": history,
    }
    with atomic_file(out / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=2))
    if history:
        last = history[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "lr", "seconds"))
        logger.info(f"after {int(last['epoch'])} epochs: {shown}")
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
        return {
            "config": str(config.path),
            "model": config.model.spec,
            "folds": self.folds,
            "seed": self.seed,
            "samples": self.samples,
            **self.selection.as_dict(),
        }


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
    logger.info(f"data: {data.description}; {len(samples)} {'nodes' if isinstance(samples, NodeFolds) else 'samples'} to fold")
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
    logger.info(
        f"cross-validating ranks {', '.join(map(str, selection_ranks))} with {folds} folds on {metric} ({_epochs(int(trainer_options.get('epochs', 3)))} per fold)"
    )
    selection = select_rank(
        lambda: config.model.build(len(data.classes)), samples, task=task, ranks=selection_ranks, folds=folds, metric=metric,
        apply_kwargs=apply_options, trainer_kwargs=trainer_options, seed=int(seed),
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
