"""The shared trainer: one loop for every domain, with the habits users expect.

What it trains is what `lora_anywhere.apply` left trainable (the adapters and the
``trainable`` modules); every other parameter and every frozen BatchNorm statistic
stays exactly as loaded, so a checkpoint needs only the adapter. A model without an
adapter trains every parameter that requires grad (full fine-tuning, pretraining),
and its checkpoints hold those and the buffers. The loop is plain PyTorch: AdamW (or
Adam, SGD, any optimizer) with a learning rate per parameter group (`optim`), warmup +
cosine, accumulation, clipping, bf16 autocast on CUDA, DDP
or FSDP2 under torchrun (`distributed`).
Checkpoints make a run resumable to the bit on CPU: the trained tensors, optimizer,
scheduler, RNG states and the position in the epoch are written together,
atomically, and a NaN loss or Ctrl-C never overwrites the last good one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import recover
from ..errors import AdapterFileError, ConfigError, LoraError, NonFiniteLossError, NotAdaptedError, ResumeError, TaskError
from ..state import model_state
from . import distributed, optim, options
from . import metrics as metric_sets
from .checkpoint import AdapterTensors, ModelTensors, TrainedTensors
from .data import LoaderSpec, check_dataset, length, to_device
from .reporting import Report, TensorBoard, epoch_line, plot_curves, process_rank, say, warn, write_history
from .reporting import bar as _bar
from .tasks import StepResult, Task, get_task

STATE_FILE = "trainer_state.pt"
STATE_VERSION = 1


# The rank-0 logging helpers under the names the loop uses.
_say, _warn, _rank = say, warn, process_rank


class Trainer:
    """Train a model's LoRA adapters (and ``trainable`` modules) on one task; a model
    without an adapter trains every parameter that requires grad.

    ``train_data``/``val_data`` may be a Dataset, a DataLoader, a list of batches, or
    (node classification) one graph. ``task`` is a name (``"image-classification"``,
    ``"node-classification"``, ``"graph-classification"``, ``"audio-classification"``,
    ``"text-classification"``, ``"token-classification"``, ``"frame-classification"``,
    ``"multi-label-classification"``, ``"regression"``, or one a plugin registers), a `Task`, or a function
    ``loss = fn(model, batch)``.

    ``warmup`` is a number of optimizer steps, or a fraction of all of them if below
    1. ``monitor`` ("val_loss", or e.g. "val_accuracy") picks the best checkpoint and
    drives early stopping after ``patience`` epochs without improvement. With
    ``out_dir``: ``metrics.csv`` (or ``.jsonl``), ``curves.png``, ``best/`` (the best
    adapter) and ``last/`` (the adapter plus the state `resume=True` continues from).
    ``regularizer`` (a penalty ``f(model) -> tensor``, see `lora_anywhere.regularize`)
    with ``regularizer_weight`` λ trains on task loss + λ·penalty (``weight`` is its old name).

    Learning rates: each parameter group (adapter factors, DoRA magnitudes, trainable
    modules, a plain model's parameters) has a measured default (`optim.DEFAULT_LR`).
    ``lr`` = a number sets every group, a mapping ``{"trainable": 3e-3}`` the groups it
    names, ``"find"`` runs the range test (`lora_anywhere.find_lr`) and uses its
    suggestion. ``loraplus_ratio`` trains B at that multiple of A's rate (LoRA+); left
    out, it is 16 at the default rates and 1 once ``lr`` sets the adapter's rate (or
    for PiSSA, whose A and B both default to 3e-2).
    ``optimizer`` is "adamw", "adam", "sgd" (momentum 0.9) or a function of the
    parameter groups that returns a torch optimizer (e.g. ``torch.optim.RAdam``).

    Under torchrun, ``strategy`` is ``"ddp"`` (a whole model per process) or ``"fsdp"``
    (the model sharded with FSDP2, bf16 through its mixed-precision policy; see
    `lora_anywhere.training.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        val_data: Any = None,
        *,
        task: str | Task | Callable[[nn.Module, Any], torch.Tensor],
        epochs: int = 3,
        lr: float | Mapping[str, float] | str | None = None,
        loraplus_ratio: float | None = None,
        optimizer: optim.OptimizerChoice = "adamw",
        weight_decay: float | Mapping[str, float] | None = None,
        batch_size: int = 32,
        grad_accum: int = 1,
        clip: float | None = 1.0,
        warmup: float = 0.0,
        schedule: str = "cosine",
        precision: str = "auto",
        device: str | torch.device = "auto",
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        log_format: str = "csv",
        progress: bool | None = None,
        monitor: str = "val_loss",
        patience: int | None = None,
        resume: bool = False,
        num_workers: int = 0,
        adapter: str | None = None,
        find_unused_parameters: bool | None = None,
        regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
        regularizer_weight: float = 0.0,
        weight: float | None = None,
        save_every: int = 1,
        plot_every: int | None = None,
        tensorboard: bool = False,
        class_names: list[str] | None = None,
        strategy: str = "ddp",
    ) -> None:
        options.check({k: v for k, v in locals().items() if k in options.TRAINER}, options.TRAINER)
        _check(patience is None or val_data is not None, "early stopping (patience=...) needs val_data to watch")
        _check(not resume or out_dir is not None, "resume=True needs the out_dir the interrupted run wrote to")
        _check(not tensorboard or out_dir is not None, "tensorboard=True writes to out_dir/tensorboard; give an out_dir")
        self.adapter, self.trainable_modules, self.saved = _what_trains(model, adapter)

        self.process_rank, self.world_size, self.device = _setup(device)
        self.strategy = distributed.strategy(strategy, self.world_size, self.device)
        self.precision = (
            ("bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32") if precision == "auto" else precision
        )
        # Sharding replaces the parameters: the optimizer is built on what it leaves.
        self.model = self.strategy.prepare(model.to(self.device), precision=self.precision, device=self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise NotAdaptedError("no parameter of the model requires grad: nothing to train")
        self.svd_init = self.adapter is not None and model_state(model).adapters[self.adapter].init == "svd"
        self.lr, self.optimizer_choice = lr, optimizer
        self.loraplus_ratio = optim.loraplus_ratio(loraplus_ratio, lr, svd_init=self.svd_init)
        self.weight_decay = optim.decays(weight_decay)
        self.task = get_task(task)
        self.train_data, self.val_data = train_data, val_data
        check_dataset(self.task, train_data)
        check_dataset(self.task, val_data)
        self._split_line = self.task.describe_split(train_data, val_data)  # raises when nothing is held out
        self.epochs, self.grad_accum, self.clip, self.seed = epochs, grad_accum, clip, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_format = log_format
        self.save_every, self.plot_every, self.class_names = save_every, plot_every, class_names
        self._tensorboard = TensorBoard(self.out_dir / "tensorboard") if tensorboard and self.out_dir and self.process_rank == 0 else None
        self._plotted = 0
        self._collections: dict[tuple[int, int], tuple[Task, Any]] = {}  # the task is kept so that its id stays its own
        #: The last validation's report (per-class accuracy, confusion matrix), written to out_dir at the end.
        self.val_report: Report | None = None
        # Bars on a terminal (or when asked); one logged line per epoch unless progress=False.
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.process_rank == 0
        self.report_epochs = progress is not False
        self.monitor, self.patience, self.resume = monitor, patience, resume
        self.find_unused_parameters = find_unused_parameters
        if weight is not None:  # the old name of regularizer_weight
            _check(regularizer_weight in (0, weight), "weight is the old name of regularizer_weight; give only regularizer_weight")
            regularizer_weight = weight
        self.regularizer, self.regularizer_weight = regularizer, float(regularizer_weight)

        per_epoch = length(self.task.batches(train_data, train=True, spec=self._spec(0)))
        if per_epoch is None and schedule != "constant":
            _warn(f"the training data has no len(), so the {schedule} schedule cannot be planned; using a constant lr")
            schedule = "constant"
        total = epochs * math.ceil((per_epoch or 1) / grad_accum)
        warm = int(warmup * total) if warmup < 1 else int(warmup)
        self._lr_factor = _schedule(schedule, warm, total)
        self._set_rates(None if lr == "find" else lr)

        self.history: list[dict[str, float]] = []
        self.best: float | None = None
        self.bad_epochs = 0
        self.interrupted = False
        self._ddp: nn.Module | None = None
        self._stop = _StopRequest()

    # ------------------------------------------------------------------ public

    def fit(self) -> list[dict[str, float]]:
        """Train; return the per-epoch history (also in ``self.history``). Call it once:
        to train further, make a Trainer with more epochs and ``resume=True``."""
        position = self._load_checkpoint() if self.resume else None
        if position is None:
            if self.lr == "find":
                self._set_rates(self._found_lr())
            _seed_everything(self.seed)
            position = {"epoch": 0, "batch": 0}
        if self.report_epochs:
            _say(optim.describe(self.groups, self.optimizer))
        self._preflight()
        net = self._wrapped()
        try:
            self._loop(net, position)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()
        self._finish()
        return self.history

    def _loop(self, net: nn.Module, position: dict[str, Any]) -> None:
        """The epochs from `position` on: train, validate, log, checkpoint; stops early,
        on Ctrl-C, or after the last epoch."""
        with self._stop:
            for epoch in range(position["epoch"], self.epochs):
                started = time.perf_counter()
                resume_at = position if position["epoch"] == epoch and "rng_epoch" in position else None
                train = self._train_epoch(net, epoch, resume_at)
                if train is None:
                    self.interrupted = True
                    _warn(
                        f"interrupted: checkpoint saved to {self.out_dir / 'last'}; run again with resume=True to continue"
                        if self.out_dir
                        else "interrupted"
                    )
                    break
                row: dict[str, float] = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train.items()}}
                if self.val_data is not None:
                    self.val_report = self._evaluate(self.val_data, self.task, f"val {epoch + 1}")
                    row.update({f"val_{k}": v for k, v in self.val_report.metrics.items()})
                row["lr"] = self.scheduler.get_last_lr()[0]
                row["seconds"] = round(time.perf_counter() - started, 3)
                self.history.append(row)
                # One line per epoch, terminal or not (nohup, Slurm, CI); the bars vanish.
                if self.report_epochs:
                    _say(epoch_line(row, self.epochs))
                if self._tensorboard is not None:
                    self._tensorboard.log(row)
                stop = self._end_of_epoch(row)
                interrupted = self._agreed(self._stop.requested)
                final = stop or interrupted or epoch + 1 == self.epochs
                if final or (epoch + 1) % self.save_every == 0:
                    self._save_checkpoint({"epoch": epoch + 1, "batch": 0, "rng_epoch": _rng_state(self.device)})
                self._write_logs(plot=self.plot_every is not None and (epoch + 1) % self.plot_every == 0)
                if interrupted:
                    self.interrupted = True
                    _warn(f"interrupted after epoch {epoch + 1}; run again with resume=True to continue")
                    break
                if stop:
                    _say(f"early stopping after epoch {epoch + 1}: {self.monitor} has not improved for {self.patience} epochs")
                    break

    def _preflight(self) -> None:
        """Before the first step: say which examples the figures are on, and run the
        task's check on the first training batch (eval mode, no gradients, every RNG
        restored, so training itself is unchanged): a model whose output does not fit
        the labels fails here, with the fix in the message, not mid-epoch."""
        if self._split_line:
            _say(self._split_line)
        batches = self.task.batches(self.train_data, train=True, spec=self._spec(0))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                batch = next(iter(batches), None)
            except LoraError:
                raise
            except Exception as exc:  # a collate or dataset error, before any step
                raise TaskError(
                    f"{self.task.name}: the first training batch cannot be made from the data ({type(exc).__name__}: {exc}); "
                    f"{self.task.data_hint()}"
                ) from exc
            if batch is None:
                raise TaskError("the training data gives no batch; check that it is not empty")
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), self._autocast():
                    self.task.check(self.model, to_device(batch, self.device))
            finally:
                self.model.train(was_training)

    def _finish(self) -> None:
        """After training: the curves (unless just drawn) and the last validation's report
        (per-class accuracy, confusion matrix) in out_dir."""
        if self.out_dir is None or self.process_rank != 0 or not self.history:
            return
        if self._plotted != len(self.history):
            plot_curves(self.history, self.out_dir / "curves.png")
            self._plotted = len(self.history)
        if self.val_report is not None and self.val_report.details:
            self.val_report.save(self.out_dir, "val", self.class_names)

    @property
    def rank(self) -> int:
        """The old name of `process_rank` (this process's index under torchrun, not a LoRA rank)."""
        return self.process_rank

    def evaluate(self, data: Any, task: str | Task | None = None) -> dict[str, float]:
        """The mean loss and the task's metrics over `data` (``accuracy`` and ``macro_f1``
        for classification). Under DDP every rank must call it; each evaluates its share."""
        return self.report(data, task).metrics

    def report(self, data: Any, task: str | Task | None = None) -> Report:
        """`evaluate` with the details that are not one number: per-class accuracy and
        the confusion matrix for classification (``report.save(folder, "test")`` writes
        them as JSON and PNG)."""
        return self._evaluate(data, get_task(task) if task is not None else self.task, "eval")

    # ------------------------------------------------------------------ optimizer and rates

    def _set_rates(self, lr: float | Mapping[str, float] | None) -> None:
        """(Re)build the parameter groups, the optimizer and the schedule for `lr` (see
        `optim`): called once at construction, and again after ``lr="find"``."""
        self.groups = optim.parameter_groups(
            self.model,
            adapted=self.adapter is not None,
            lr=optim.rates(lr, svd_init=self.svd_init),
            weight_decay=self.weight_decay,
            loraplus_ratio=self.loraplus_ratio,
        )
        self.optimizer = optim.make_optimizer(self.groups, self.optimizer_choice)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _found_lr(self) -> float:
        """``lr="find"``: the range test's suggestion, the same on every rank."""
        from .lr_finder import sweep

        self.range_test = sweep(self, out_dir=self.out_dir)
        found = self.range_test.suggestion
        if self.world_size > 1:
            agreed = [found]
            dist.broadcast_object_list(agreed, src=0)
            found = agreed[0]
        _say(f"lr='find': the range test suggests lr {found:.3g} for every parameter group")
        return found

    # ------------------------------------------------------------------ one epoch

    def _train_epoch(self, net: nn.Module, epoch: int, resume_at: dict[str, Any] | None) -> dict[str, float] | None:
        """Train one epoch; return its metrics, or None if stopped by Ctrl-C (saved)."""
        batches = self.task.batches(self.train_data, train=True, spec=self._spec(epoch))
        n = length(batches)
        start = resume_at["batch"] if resume_at else 0
        if resume_at:
            _set_rng(resume_at["rng_epoch"], self.device)
        rng_epoch = _rng_state(self.device)
        it = iter(batches)
        for _ in range(start):  # replay the loader's random draws up to where the run stopped
            next(it)
        totals = _Totals.restore(resume_at["totals"]) if start else _Totals()
        if start:
            _set_rng(resume_at["rng"], self.device)
        self._train_mode()
        bar = _bar(self.progress, total=n, initial=start, desc=f"epoch {epoch + 1}/{self.epochs}")
        done = seen = start
        try:
            for i, batch in enumerate(it, start):
                seen = i + 1
                group = self.grad_accum if n is None else min(self.grad_accum, n - (i // self.grad_accum) * self.grad_accum)
                boundary = (i + 1) % self.grad_accum == 0 or i + 1 == n
                sync = contextlib.nullcontext() if boundary else self.strategy.no_sync(net)
                with sync:
                    with self._autocast():
                        result = self.task.step(net, to_device(batch, self.device), train=True)
                    objective = result.loss
                    if self.regularizer is not None:  # the task loss + λ·penalty; metrics keep the task loss
                        objective = objective + self.regularizer_weight * self.regularizer(self.model)
                    bad, stop = self._flags(objective)
                    if bad:
                        raise NonFiniteLossError(self._diverged_message(objective, epoch, i))
                    (objective / group).backward()
                totals.add(result)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(totals.postfix(self.task.metric), refresh=False)
                if boundary:
                    self._optimizer_step()
                    done = i + 1
                    if stop and (n is None or done < n):
                        self._save_checkpoint(
                            {
                                "epoch": epoch,
                                "batch": done,
                                "rng_epoch": rng_epoch,
                                "rng": _rng_state(self.device),
                                "totals": totals.state(),
                            }
                        )
                        return None
            if done < seen:  # a trailing partial group (data without len)
                self._optimizer_step()
        finally:
            if bar is not None:
                bar.close()
        return self._reduce(totals).means()

    def _optimizer_step(self) -> None:
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _flags(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """Whether the loss is non-finite and whether a stop was asked for, agreed by
        every rank (one rank raising alone would leave the others waiting forever)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.world_size == 1:
            return bad, self._stop.requested
        flags = torch.tensor([float(bad), float(self._stop.requested)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _agreed(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _diverged_message(self, loss: torch.Tensor, epoch: int, index: int) -> str:
        last = self.out_dir / "last" if self.out_dir else None
        kept = f"the last good checkpoint is kept in {last}; " if last is not None and (last / STATE_FILE).is_file() else ""
        return (
            f"the loss became {loss.detach().float().item()} at epoch {epoch + 1}, batch {index + 1}: training stopped before that step. "
            f"{kept}try a lower lr (now {self.scheduler.get_last_lr()[0]:g}), clip=1.0 or precision='fp32', "
            "and check the data for NaN/inf; then run again (resume=True continues from the checkpoint)"
        )

    def _end_of_epoch(self, row: dict[str, float]) -> bool:
        """Track the monitored value, save the best adapter; return whether to stop early."""
        if self.monitor not in row:
            if self.monitor.startswith("val_") and self.val_data is None:
                return False
            raise LoraError(f"monitor {self.monitor!r} is not in the epoch's metrics ({', '.join(row)})")
        value = row[self.monitor]
        better = self.best is None or (value < self.best if _minimise(self.monitor) else value > self.best)
        if better:
            self.best, self.bad_epochs = value, 0
            if self.out_dir is not None and self.strategy.saves_on(self.process_rank):
                self.saved.save(self.out_dir / "best")
            return False
        self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    @torch.no_grad()
    def _evaluate(self, data: Any, task: Task, desc: str) -> Report:
        # The bare model: no DDP collectives, so ranks may hold shards of any size.
        was_training = self.model.training
        self.model.eval()
        totals = _Totals()
        collection, width = None, 0
        batches = task.batches(data, train=False, spec=self._spec(0))
        bar = _bar(self.progress, total=length(batches), initial=0, desc=desc)
        try:
            for batch, counted in self.strategy.eval_batches(batches):
                with self._autocast():
                    result = task.step(self.model, to_device(batch, self.device), train=False)
                if not counted:  # a rank whose share ended repeats a batch for the others
                    continue
                totals.add(result)
                if result.outputs is not None and result.targets is not None:
                    if not width:
                        width = result.outputs.shape[-1] if result.outputs.dim() > 1 else 1
                        collection = self._metric_collection(task, width)
                    if collection is not None:
                        metric_sets.update(collection, result.outputs, result.targets)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        metrics = self._reduce(totals).means()
        if self.world_size > 1:  # a rank that saw no batch still takes part in the metrics' sum
            widths: list[Any] = [None] * self.world_size
            dist.all_gather_object(widths, width)
            if not width and max(widths):
                collection = self._metric_collection(task, max(widths))
        details: dict[str, Any] = {}
        scalars: dict[str, float] = {}
        if collection is not None:
            scalars, details = metric_sets.summarise(collection)
            metrics.update(scalars)
        return Report(metrics, details, list(scalars))

    def _metric_collection(self, task: Task, width: int) -> Any:
        """The task's torchmetrics collection for outputs of this width, reset: made once
        per (task, width) and reused, as making one costs more than an evaluation's updates."""
        key = (id(task), width)
        if key not in self._collections:
            collection = task.eval_metrics(width)
            self._collections[key] = (task, collection.to(self.device) if collection is not None else None)
        collection = self._collections[key][1]
        if collection is not None:
            collection.reset()
        return collection

    # ------------------------------------------------------------------ helpers

    def _spec(self, epoch: int) -> LoaderSpec:
        return LoaderSpec(self.batch_size, self.num_workers, self.seed, epoch, self.process_rank, self.world_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_mode(self) -> None:
        """Train mode, except for frozen norm layers: their running statistics are part
        of the base model, which the adapter must not silently change. A plain model
        trains whole, as in any PyTorch loop."""
        self.model.train()
        if self.adapter is None:
            return
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and not any(
                name == t or name.startswith(f"{t}.") for t in self.trainable_modules
            ):
                module.eval()

    def _reduce(self, totals: _Totals) -> _Totals:
        if self.world_size == 1:
            return totals
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, totals.state())
        return _Totals.combine(parts)

    def _wrapped(self) -> nn.Module:
        """The model DDP runs, built once. Only parameters that require grad (adapters
        and ``trainable`` modules) get DDP's reduction hooks."""
        if self.world_size == 1 or self.strategy.sharded:
            return self.model
        if self._ddp is None:
            unused = self.find_unused_parameters
            if unused is None:
                unused = self._probe_unused()
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)
        return self._ddp

    def _probe_unused(self) -> bool:
        """Whether some trainable parameter gets no gradient (a head the loss skips, an
        adapter on an unused layer): one forward/backward on a first batch, in eval
        mode and with the RNG restored, so training itself is unchanged. DDP needs
        ``find_unused_parameters`` then, and is faster without it otherwise."""
        batches = self.task.batches(self.train_data, train=True, spec=self._spec(0))
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.model.eval()
            try:
                with self._autocast():
                    result = self.task.step(self.model, to_device(next(iter(batches)), self.device), train=True)
                result.loss.backward()
            finally:
                self.model.train()
        unused = any(p.grad is None for p in self.params)
        self.optimizer.zero_grad(set_to_none=True)
        return self._agreed(unused)

    # ------------------------------------------------------------------ files

    def _save_checkpoint(self, position: dict[str, Any]) -> None:
        if self.out_dir is None or not self.strategy.saves_on(self.process_rank):
            return
        state = {
            "version": STATE_VERSION,
            **position,
            "optimizer": self.strategy.optimizer_state(self.model, self.optimizer),
            "setup": optim.setup(self.groups, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }
        self.strategy.write_checkpoint(self.saved, self.out_dir / "last", lambda tmp: torch.save(state, tmp / STATE_FILE))

    def _load_checkpoint(self) -> dict[str, Any] | None:
        assert self.out_dir is not None
        folder = recover(self.out_dir / "last")  # a write that died between two renames
        if not (folder / STATE_FILE).is_file():
            _warn(f"no checkpoint in {folder}; starting from the beginning")
            return None
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFileError(f"{folder / STATE_FILE} cannot be read ({exc}); delete {folder} to start over") from exc
        if state.get("version") != STATE_VERSION:
            raise AdapterFileError(f"{folder / STATE_FILE} has version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = self._resumable(state, folder)
        self.saved.copy_in(saved)
        self.strategy.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.best, self.bad_epochs = list(state["history"]), state["best"], state["bad_epochs"]
        if state["epoch"] >= self.epochs:
            _warn(f"the run in {folder} already finished its {state['epoch']} epochs; nothing to resume")
        else:
            _say(f"resuming from {folder}: epoch {state['epoch'] + 1}, batch {state['batch']}")
        return state

    def _resumable(self, state: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
        """Check everything a resume will load against this run before any of it is
        copied: the saved tensors against the model, the optimizer setup against this
        one. Returns the saved tensors."""
        saved = self.saved.checked(folder)
        current = optim.setup(self.groups, self.optimizer)
        if "setup" in state:
            differ = optim.setup_difference(state["setup"], current)
        else:  # a checkpoint from before setups were recorded: compare the groups' sizes
            was = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
            now = [len(g["params"]) for g in self.optimizer.param_groups]
            differ = None if was == now else f"parameter groups of {was} tensors in the checkpoint, {now} now"
        if differ is not None:
            raise ResumeError(
                f"the checkpoint in {folder} was trained with another optimizer setup: {differ}. Resume with the options of "
                "that run (optimizer, lr groups, loraplus_ratio, freeze_a, trainable), or use a fresh out_dir; nothing was loaded"
            )
        was = state["scheduler"].get("base_lrs")
        if self.lr != "find" and was is not None and [float(x) for x in was] != [g.lr for g in self.groups]:
            _warn(
                f"resuming with the checkpoint's learning rates ({', '.join(f'{x:.3g}' for x in was)}); the lr given now applies to fresh runs"
            )
        return saved

    def _write_logs(self, *, plot: bool) -> None:
        """metrics.csv (or .jsonl) every epoch; curves.png when `plot` (and at the end)."""
        if self.out_dir is None or self.process_rank != 0:
            return
        write_history(self.history, self.out_dir / f"metrics.{self.log_format}")
        if plot:
            plot_curves(self.history, self.out_dir / "curves.png")
            self._plotted = len(self.history)


# ---------------------------------------------------------------------- running sums


@dataclass
class _Totals:
    """Example-weighted sums over an epoch, kept as tensors so a step costs no sync."""

    loss: Any = 0.0
    count: int = 0
    sums: dict[str, Any] = field(default_factory=dict)

    def add(self, result: StepResult) -> None:
        self.loss = self.loss + result.loss.detach().float() * result.count
        self.count += result.count
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"loss": float(self.loss) / n, **{k: float(v) / n for k, v in self.sums.items()}}

    def postfix(self, metric: str | None) -> dict[str, str]:
        means = self.means()
        shown = {"loss": f"{means['loss']:.4f}"}
        if metric in means:
            shown[metric[:3]] = f"{means[metric]:.3f}"
        return shown

    def state(self) -> dict[str, Any]:
        return {"loss": float(self.loss), "count": self.count, "sums": {k: float(v) for k, v in self.sums.items()}}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> _Totals:
        return cls(state["loss"], state["count"], dict(state["sums"]))

    @classmethod
    def combine(cls, states: list[dict[str, Any]]) -> _Totals:
        out = cls()
        for s in states:
            out.loss += s["loss"]
            out.count += s["count"]
            for k, v in s["sums"].items():
                out.sums[k] = out.sums.get(k, 0.0) + v
        return out


# ---------------------------------------------------------------------- Ctrl-C


class _StopRequest:
    """Turns the first Ctrl-C (or SIGTERM, as clusters send before preempting) into a
    request to stop at the next optimizer step, save and return; another one a second
    later stops at once. (Under torchrun a worker gets Ctrl-C twice at once: from the
    terminal and forwarded by the agent; that must not cost the checkpoint.) Signal
    handlers can only be set from the main thread; elsewhere Ctrl-C keeps its usual
    effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_AFTER_S = 1.0

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if time.monotonic() - self._first >= self.REPEAT_AFTER_S:
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, time.monotonic()
        _warn("stopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------- distributed


def _setup(device: str | torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and device; joins the process group torchrun describes (NCCL
    on GPU, gloo on CPU) unless the caller has already made one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() and world > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _rank(), world, device


# ---------------------------------------------------------------------- RNG


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG a training step may draw from, in types torch.load(weights_only=True) reads."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def _set_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# ---------------------------------------------------------------------- small pieces


def _what_trains(model: nn.Module, adapter: str | None) -> tuple[str | None, list[str], ModelTensors]:
    """The adapter a checkpoint saves (None for a plain model), the ``trainable``
    modules, and what the checkpoints hold: the adapter, or a plain model's trained
    parameters and buffers."""
    state = model_state(model)
    if not state or not state.adapters:
        if adapter is not None:
            raise NotAdaptedError(
                f"adapter={adapter!r} was given, but the model carries no adapter; leave adapter out to train the model itself"
            )
        return None, [], TrainedTensors(model)
    if adapter is None and len(state.adapters) > 1:
        raise NotAdaptedError(f"the model has several adapters ({', '.join(state.adapters)}); pass adapter=... to name the one to save")
    if adapter is not None and adapter not in state.adapters:
        raise NotAdaptedError(f"the model has no adapter named {adapter!r}; it has {', '.join(state.adapters)}")
    name = adapter or next(iter(state.adapters))
    return name, sorted({m for config in state.adapters.values() for m in config.trainable}), AdapterTensors(model, name)


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def _minimise(monitor: str) -> bool:
    return "loss" in monitor


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LoraError(message)
