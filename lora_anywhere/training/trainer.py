"""The shared trainer: one loop for every domain, with the habits users expect.

What it trains is what `lora_anywhere.apply` left trainable (the adapters and the
``trainable`` modules); every other parameter and every frozen BatchNorm statistic
stays exactly as loaded, so a checkpoint needs only the adapter. The loop is plain
PyTorch: AdamW, warmup + cosine, accumulation, clipping, bf16 autocast on CUDA, DDP
or FSDP2 under torchrun (`distributed.py`). Checkpoints make a run resumable to the bit on CPU: the adapter,
optimizer, scheduler, RNG states and the position in the epoch are written together,
atomically, and a NaN loss or Ctrl-C never overwrites the last good one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
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
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_file
from ..errors import AdapterFileError, LoraError, NonFiniteLossError, NotAdaptedError
from ..io import adapter_state_dict, read_adapter, save_adapter
from ..log import logger
from ..state import model_state
from . import distributed
from .tasks import LoaderSpec, StepResult, Task, get_task

STATE_FILE = "trainer_state.pt"
STATE_VERSION = 1
SCHEDULES = ("cosine", "linear", "constant")


def _say(message: str, level: int = logging.INFO) -> None:
    """One line for the `lora_anywhere` logger, from rank 0 only (see `log.py`)."""
    if _rank() == 0:
        logger.log(level, message)


def _warn(message: str) -> None:
    _say(message, logging.WARNING)


class Trainer:
    """Train a model's LoRA adapters (and ``trainable`` modules) on one task.

    ``train_data``/``val_data`` may be a Dataset, a DataLoader, a list of batches, or
    (node classification) one graph. ``task`` is a name (``"image-classification"``,
    ``"node-classification"``, ``"graph-classification"``, ``"audio-classification"``,
    ``"text-classification"``, or one a plugin registers), a `Task`, or a function
    ``loss = fn(model, batch)``.

    ``warmup`` is a number of optimizer steps, or a fraction of all of them if below
    1. ``monitor`` ("val_loss", or e.g. "val_accuracy") picks the best checkpoint and
    drives early stopping after ``patience`` epochs without improvement. With
    ``out_dir``: ``metrics.csv`` (or ``.jsonl``), ``curves.png``, ``best/`` (the best
    adapter) and ``last/`` (the adapter plus the state `resume=True` continues from).
    ``regularizer`` (a penalty ``f(model) -> tensor``, see `lora_anywhere.regularize`)
    with ``regularizer_weight`` λ trains on task loss + λ·penalty (``weight`` is its old name).
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
        lr: float = 1e-3,
        weight_decay: float = 0.0,
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
        strategy: str = "ddp",
    ) -> None:
        _check(isinstance(epochs, int) and epochs >= 1, f"epochs must be a positive integer, got {epochs!r}")
        _check(isinstance(grad_accum, int) and grad_accum >= 1, f"grad_accum must be a positive integer, got {grad_accum!r}")
        _check(lr > 0, f"lr must be positive, got {lr!r}")
        _check(clip is None or clip > 0, f"clip must be positive or None, got {clip!r}")
        _check(schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        _check(precision in ("auto", "bf16", "fp32"), f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
        _check(log_format in ("csv", "jsonl"), f"log_format must be 'csv' or 'jsonl', got {log_format!r}")
        _check(warmup >= 0, f"warmup must be ≥ 0, got {warmup!r}")
        _check(patience is None or val_data is not None, "early stopping (patience=...) needs val_data to watch")
        _check(not resume or out_dir is not None, "resume=True needs the out_dir the interrupted run wrote to")
        state = model_state(model)
        if not state or not state.adapters:
            raise NotAdaptedError("the model carries no adapter; call lora_anywhere.apply(model, ...) before training it")
        if adapter is None and len(state.adapters) > 1:
            raise NotAdaptedError(f"the model has several adapters ({', '.join(state.adapters)}); pass adapter=... to name the one to save")
        self.adapter = adapter or next(iter(state.adapters))
        self.trainable_modules = sorted({m for config in state.adapters.values() for m in config.trainable})

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
        self.task = get_task(task)
        self.train_data, self.val_data = train_data, val_data
        self.epochs, self.grad_accum, self.clip, self.seed = epochs, grad_accum, clip, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_format = log_format
        # Bars on a terminal (or when asked); one logged line per epoch unless progress=False.
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.process_rank == 0
        self.report_epochs = progress is not False
        self.monitor, self.patience, self.resume = monitor, patience, resume
        self.find_unused_parameters = find_unused_parameters
        _check(
            regularizer is None or callable(regularizer),
            "regularizer must be a function penalty(model) -> tensor, e.g. lora_anywhere.regularize.delta_frobenius",
        )
        if weight is not None:  # the old name of regularizer_weight
            _check(regularizer_weight in (0, weight), "weight is the old name of regularizer_weight; give only regularizer_weight")
            regularizer_weight = weight
        _check(regularizer_weight >= 0, f"regularizer_weight (λ of the regularizer) must be ≥ 0, got {regularizer_weight!r}")
        self.regularizer, self.regularizer_weight = regularizer, float(regularizer_weight)

        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        per_epoch = _length(self.task.batches(train_data, train=True, spec=self._spec(0)))
        if per_epoch is None and schedule != "constant":
            _warn(f"the training data has no len(), so the {schedule} schedule cannot be planned; using a constant lr")
            schedule = "constant"
        total = epochs * math.ceil((per_epoch or 1) / grad_accum)
        warm = int(warmup * total) if warmup < 1 else int(warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(schedule, warm, total))

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
            _seed_everything(self.seed)
            position = {"epoch": 0, "batch": 0}
        net = self._wrapped()
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
                    row.update({f"val_{k}": v for k, v in self._evaluate(self.val_data, self.task, f"val {epoch + 1}").items()})
                row["lr"] = self.scheduler.get_last_lr()[0]
                row["seconds"] = round(time.perf_counter() - started, 3)
                self.history.append(row)
                # One line per epoch, terminal or not (nohup, Slurm, CI); the bars vanish.
                if self.report_epochs:
                    _say(f"epoch {epoch + 1}/{self.epochs}  " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
                stop = self._end_of_epoch(row)
                self._save_checkpoint({"epoch": epoch + 1, "batch": 0, "rng_epoch": _rng_state(self.device)})
                self._write_logs()
                if self._agreed(self._stop.requested):
                    self.interrupted = True
                    _warn(f"interrupted after epoch {epoch + 1}; run again with resume=True to continue")
                    break
                if stop:
                    _say(f"early stopping after epoch {epoch + 1}: {self.monitor} has not improved for {self.patience} epochs")
                    break
        return self.history

    @property
    def rank(self) -> int:
        """The old name of `process_rank` (this process's index under torchrun, not a LoRA rank)."""
        return self.process_rank

    @torch.no_grad()
    def evaluate(self, data: Any, task: str | Task | None = None) -> dict[str, float]:
        """The mean loss and the task's metrics (``accuracy`` for classification) over `data`.
        Under DDP every rank must call it; each evaluates its share."""
        return self._evaluate(data, get_task(task) if task is not None else self.task, "eval")

    # ------------------------------------------------------------------ one epoch

    def _train_epoch(self, net: nn.Module, epoch: int, resume_at: dict[str, Any] | None) -> dict[str, float] | None:
        """Train one epoch; return its metrics, or None if stopped by Ctrl-C (saved)."""
        batches = self.task.batches(self.train_data, train=True, spec=self._spec(epoch))
        n = _length(batches)
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
                        result = self.task.step(net, _to_device(batch, self.device), train=True)
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
                save_adapter(self.model, self.out_dir / "best", name=self.adapter)
            return False
        self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    @torch.no_grad()
    def _evaluate(self, data: Any, task: Task, desc: str) -> dict[str, float]:
        # The bare model: no DDP collectives, so ranks may hold shards of any size.
        was_training = self.model.training
        self.model.eval()
        totals = _Totals()
        batches = task.batches(data, train=False, spec=self._spec(0))
        bar = _bar(self.progress, total=_length(batches), initial=0, desc=desc)
        try:
            for batch, counted in self.strategy.eval_batches(batches):
                with self._autocast():
                    result = task.step(self.model, _to_device(batch, self.device), train=False)
                if counted:
                    totals.add(result)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        return self._reduce(totals).means()

    # ------------------------------------------------------------------ helpers

    def _spec(self, epoch: int) -> LoaderSpec:
        return LoaderSpec(self.batch_size, self.num_workers, self.seed, epoch, self.process_rank, self.world_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_mode(self) -> None:
        """Train mode, except for frozen norm layers: their running statistics are part
        of the base model, which the adapter must not silently change."""
        self.model.train()
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
                    result = self.task.step(self.model, _to_device(next(iter(batches)), self.device), train=True)
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
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }
        self.strategy.write_checkpoint(self.model, self.out_dir / "last", self.adapter, lambda tmp: torch.save(state, tmp / STATE_FILE))

    def _load_checkpoint(self) -> dict[str, Any] | None:
        assert self.out_dir is not None
        folder = self.out_dir / "last"
        if not (folder / STATE_FILE).is_file():
            _warn(f"no checkpoint in {folder}; starting from the beginning")
            return None
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFileError(f"{folder / STATE_FILE} cannot be read ({exc}); delete {folder} to start over") from exc
        if state.get("version") != STATE_VERSION:
            raise AdapterFileError(f"{folder / STATE_FILE} has version {state.get('version')!r}, expected {STATE_VERSION}")
        _copy_adapter(self.model, folder, self.adapter)
        self.strategy.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.best, self.bad_epochs = list(state["history"]), state["best"], state["bad_epochs"]
        if state["epoch"] >= self.epochs:
            _warn(f"the run in {folder} already finished its {state['epoch']} epochs; nothing to resume")
        else:
            _say(f"resuming from {folder}: epoch {state['epoch'] + 1}, batch {state['batch']}")
        return state

    def _write_logs(self) -> None:
        if self.out_dir is None or self.process_rank != 0:
            return
        if self.log_format == "jsonl":
            text = "".join(json.dumps(row) + "\n" for row in self.history)
        else:
            columns = list(dict.fromkeys(k for row in self.history for k in row))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.history)
            text = buffer.getvalue()
        with atomic_file(self.out_dir / f"metrics.{self.log_format}") as tmp:
            tmp.write_text(text)
        _plot(self.history, self.out_dir / "curves.png")


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


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def _copy_adapter(model: nn.Module, folder: Path, name: str) -> None:
    """Load a saved adapter's values into the model's existing adapter, in place, so the
    optimizer keeps pointing at the same parameters."""
    _, saved = read_adapter(folder)
    current = adapter_state_dict(model, name)  # detached views of the live tensors
    if set(saved) != set(current):
        differ = sorted(set(saved) ^ set(current))
        raise AdapterFileError(
            f"the checkpoint in {folder} was saved from another adapter setup (differs in {', '.join(differ[:5])}); use a fresh out_dir"
        )
    with torch.no_grad():
        for key, tensor in current.items():
            if tensor.shape != saved[key].shape:
                raise AdapterFileError(
                    f"the checkpoint in {folder} has {key} of shape {tuple(saved[key].shape)}, the model {tuple(tensor.shape)}"
                )
            distributed.copy_into(tensor, saved[key])


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


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    to = getattr(obj, "to", None)
    return to(device) if callable(to) else obj  # a PyG Data/Batch, a BatchEncoding


_MISSING_NOTED: set[str] = set()


def _optional(module: str, what: str) -> Any:
    """Import an optional dependency, or say once what is lost without it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if module not in _MISSING_NOTED:
            _MISSING_NOTED.add(module)
            _warn(f"{module} is not installed, so {what}; pip install 'lora_anywhere[train]'")
        return None


def _bar(enabled: bool, *, total: int | None, initial: int, desc: str) -> Any:
    if not enabled:
        return None
    tqdm = _optional("tqdm.auto", "there are no progress bars")
    if tqdm is None:
        return None
    return tqdm.tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _plot(history: list[dict[str, float]], path: Path) -> None:
    figure_module = _optional("matplotlib.figure", "no curves.png is drawn")
    if figure_module is None or not history:
        return
    fig = figure_module.Figure(figsize=(10, 4), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    skip = {"epoch", "lr", "seconds"}
    for key in dict.fromkeys(k for row in history for k in row):
        if key in skip:
            continue
        ax = loss_ax if key.endswith("loss") else metric_ax
        ax.plot(epochs, [row.get(key, math.nan) for row in history], marker="o", label=key)
    for ax, title in ((loss_ax, "loss"), (metric_ax, "metrics")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.lines:
            ax.legend()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LoraError(message)
