"""What `train`, `select-rank` and `merge` do with a checked config: build, adapt,
train or cross-validate, and write the results."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from .. import api, io
from ..atomic import atomic_file
from ..errors import ConfigError, TaskError
from ..log import logger
from ..summary import summary
from ..training.rank_selection import NodeFolds, RankSelection, check_ranks, select_rank
from ..training.reporting import Report
from ..training.tasks import Classification, LoaderSpec, NodeClassification, get_task
from ..training.trainer import Trainer
from .config import TrainConfig
from .data import LoadedData, load_data
from .model_spec import CLASSES, ModelSpec
from .run_folder import RunRecord, absolute_data, read_run, write_run

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
    model: nn.Module | None = None
    test: dict[str, float] | None = None  # the final model's figures on [data] test
    process_rank: int = 0  # under torchrun, only rank 0 writes and prints


def _check_outputs(model: nn.Module, data: LoadedData, task: Any, spec: ModelSpec) -> None:
    """The task's pre-flight check on two training examples, and that the model has one
    output per class of the data, before any training (the trainer repeats the first
    check on its first batch)."""
    if not isinstance(task, Classification):
        return
    batch = next(iter(task.batches(data.train, train=False, spec=LoaderSpec(batch_size=2))))
    model.eval()
    try:
        with torch.no_grad():
            task.check(model, batch)
            logits, _ = task.forward(model, batch, train=False)
    except TaskError as exc:
        raise ConfigError(f"{exc} (model {spec.spec}: check its [model] kwargs, e.g. input sizes, and the [data] options)") from exc
    finally:
        model.train()
    if logits.shape[-1] != len(data.classes):
        raise ConfigError(
            f"the model {spec.spec} outputs {logits.shape[-1]} scores per example, but the data has {len(data.classes)} classes; "
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


def _task(config: TrainConfig, name: Any) -> Any:
    try:
        return get_task(name)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config.path}: [train] task: {exc}") from exc


def run_training(
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    rank: int | None = None,
) -> TrainResult:
    """Build, adapt and train as the config says (`overrides` replace [train] options,
    `rank` the [lora] rank); score the [data] test split; write the adapter, metrics,
    curves, reports and the run record (`run_folder`) to the output folder."""
    train_options = dict(config.train)
    out = Path(out_dir if out_dir is not None else train_options.get("out_dir", "runs/train"))
    train_options.pop("out_dir", None)
    train_options.update({k: v for k, v in (overrides or {}).items() if v is not None})
    _check_device(config, train_options.get("device"))
    seed = int(train_options.get("seed", 0))
    base = config.path.parent.resolve()
    data = load_data(config.data, base, seed=seed)
    logger.info(f"data: {data.description}")
    kwargs = config.model.resolved_kwargs(len(data.classes))
    model = config.model.build(len(data.classes))
    try:
        api.apply(model, **{**config.lora, **({"rank": rank} if rank is not None else {})})
    except TypeError as exc:
        raise ConfigError(f"{config.path}: [lora] {exc}") from exc
    task_name = train_options.pop("task", data.task)
    task = _task(config, task_name)
    _check_outputs(model, data, task, config.model)
    s = summary(model)
    logger.info(
        f"model: {config.model.spec}, {len(s.rows)} adapted tensors; {s.trainable_params:,} of {s.total_params:,} parameters train ({100 * s.trainable_share:.2f}%)"
    )
    try:
        trainer = Trainer(model, data.train, data.val, task=task, out_dir=out, class_names=data.classes, **train_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{config.path}: [train] {exc}") from exc
    history = trainer.fit()
    test = None
    if data.test is not None and not trainer.interrupted:  # every rank evaluates its share
        report = trainer.report(data.test)
        test = report.metrics
        if trainer.process_rank == 0:
            report.save(out, "test", data.classes)
            logger.info("test (the final adapter): " + ", ".join(f"{k} {v:.4g}" for k, v in test.items()))
    adapter = out / "adapter"
    if trainer.process_rank == 0:
        io.save_adapter(model, adapter)
        content = {
            "config": str(config.path),
            "model": config.model.record(len(data.classes)),
            "data": absolute_data(config.data, base),
            "data_seed": seed,
            "data_info": data.info,
            "classes": data.classes,
            "task": task_name if isinstance(task_name, str) else task.name,
            "lora": {**config.lora, **({"rank": rank} if rank is not None else {})},
            "train": {k: v for k, v in train_options.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "history": history,
            "test": test,
        }
        write_run(out, content)
    if history:
        last = history[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "lr", "seconds"))
        logger.info(f"after {int(last['epoch'])} epochs: {shown}")
    return TrainResult(out, adapter, history, data, kwargs, trainer.interrupted, model, test, trainer.process_rank)


def merge_command(result: TrainResult) -> str:
    """The `lora-anywhere merge` line that turns this run's adapter into plain weights."""
    return f"lora-anywhere merge --run {shlex.quote(str(result.out_dir))}"


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
    task = _task(config, config.train.get("task", data.task))
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


def merge_run(run_dir: str | Path, adapter: str | None, out: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """`merge_to_file` for a run folder: the base rebuilt from its record, its final
    adapter (or ``best``, ``last``, a path), into ``RUN_DIR/merged.safetensors`` unless
    `out` says otherwise."""
    record = read_run(run_dir)
    target = Path(out) if out is not None else record.folder / "merged.safetensors"
    return target, merge_to_file(record.model, record.adapter(adapter), target)


# ---------------------------------------------------------------------- evaluate

SPLITS = ("train", "val", "test")


@dataclass
class Evaluation:
    report: Report
    split: str
    adapter: Path
    record: RunRecord


def rebuild(record: RunRecord, adapter: str | None) -> tuple[nn.Module, Path]:
    """The trained model again: the run's base, rebuilt from its record, with an adapter
    of the run (the final one by default) loaded onto it."""
    path = record.adapter(adapter)
    model = record.model.build()
    io.load_adapter(model, path)
    return model, path


def split_of(record: RunRecord, data: LoadedData, split: str) -> tuple[Any, Any]:
    """(data, task) that score one split of a run's data; a graph's split is a mask."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is none of {', '.join(SPLITS)}")
    task = get_task(record.task)
    chosen = {"train": data.train, "val": data.val, "test": data.test}[split]
    if chosen is None:
        raise ConfigError("the run's data has no test split; add test = PATH to its [data] section (a graph: a test_mask) and train again")
    if isinstance(task, NodeClassification) and split == "train":
        task = NodeClassification(train_mask=task.train_mask, eval_mask=task.train_mask)
    return chosen, task


def evaluate_run(
    run_dir: str | Path, *, split: str = "val", adapter: str | None = None, device: str | None = None, batch_size: int | None = None
) -> Evaluation:
    """Score a run's adapter on one split of the data it was trained on: the model is
    rebuilt from the run record, the data reloaded from its [data] options."""
    record = read_run(run_dir)
    data = load_data(record.data, record.folder, seed=record.data_seed)
    model, path = rebuild(record, adapter)
    chosen, task = split_of(record, data, split)
    options = {"device": device or record.content.get("train", {}).get("device", "auto")}
    options["batch_size"] = batch_size or record.content.get("train", {}).get("batch_size", 32)
    trainer = Trainer(model, chosen, task=task, progress=False, class_names=record.classes, **options)
    report = trainer.report(chosen)
    return Evaluation(report, split, path, record)


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"
