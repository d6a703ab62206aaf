"""The learning-rate range test: for a model unlike the ones the defaults were
measured on.

Train for a few hundred steps while the rate grows exponentially from `start` to
`stop`, and watch the (smoothed) loss: it falls once the rate is large enough to
learn, and blows up once it is too large. The suggestion is a rate on the steep
part of the fall, safely below the blow-up (see `suggest`). Everything the sweep
changes — the trained parameters, the buffers, train/eval modes, the random number
generators — is put back afterwards, so the model is exactly as it was.

    result = lora_anywhere.find_lr(model, train_data, task="image-classification", out_dir="runs/lr")
    result.suggestion          # e.g. 0.012; runs/lr/lr_find.png shows the curve
    Trainer(model, ..., lr=result.suggestion)   # or Trainer(..., lr="find") does both
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from ..atomic import atomic_file
from ..errors import ConfigError
from ..log import logger
from . import optim
from .data import to_device
from .options import POSITIVE, Kind, check, integer
from .tasks import Task

if TYPE_CHECKING:
    from .trainer import Trainer

START, STOP, STEPS = 1e-6, 1.0, 200
#: The loss is smoothed with this exponential moving average (debiased) before it is read.
SMOOTHING = 0.9
#: The sweep stops when the smoothed loss exceeds this multiple of its lowest value.
DIVERGED = 4.0
CURVE_PNG, CURVE_CSV = "lr_find.png", "lr_find.csv"

SWEEP_OPTIONS: dict[str, Kind] = {"start": POSITIVE, "stop": POSITIVE, "steps": integer(10)}


@dataclass
class RangeTest:
    """The sweep: the rate and the raw and smoothed loss at each step, and the suggestion."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float

    def plot(self, path: str | os.PathLike) -> bool:
        """The smoothed loss against the rate (log scale), the suggestion marked; False
        without matplotlib."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return False
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        ax.plot(self.lrs, self.losses, color="0.8", linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggested lr {self.suggestion:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        top = max(self.smoothed[: max(1, len(self.smoothed) // 10)])  # the first losses set the scale
        ax.set_ylim(min(self.smoothed) - 0.05 * abs(top), top * 1.5 if top > 0 else None)
        ax.legend()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return True

    def write(self, folder: Path) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        writer.writerows(
            (i, f"{lr:.6g}", f"{loss:.6g}", f"{s:.6g}") for i, (lr, loss, s) in enumerate(zip(self.lrs, self.losses, self.smoothed))
        )
        with atomic_file(folder / CURVE_CSV) as tmp:
            tmp.write_text(buffer.getvalue())
        self.plot(folder / CURVE_PNG)


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The rate where the smoothed loss falls fastest (per factor of rate) before its
    lowest point, or a tenth of the rate at the lowest point if that is smaller.

    The steepest fall alone can sit right below the blow-up on a short curve, and the
    lowest point alone is where training is already unstable; the smaller of the two
    is on the safe side of both (and bench/quality.py compares it with the best rate
    of a grid)."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    tenth = lrs[lowest] / 10
    if lowest < 2:
        return tenth
    logs = [math.log(lr) for lr in lrs[: lowest + 1]]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, lowest)]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    return min(steepest, tenth) if slopes and min(slopes) < 0 else tenth


def sweep(
    trainer: Trainer, *, start: float = START, stop: float = STOP, steps: int = STEPS, out_dir: str | os.PathLike | None = None
) -> RangeTest:
    """Run the range test with a trainer's model, data, task, optimizer and parameter
    groups (every group at the swept rate; B at loraplus_ratio times it), one batch
    per step; restore the model; write the curve to `out_dir` if given."""
    check({"start": start, "stop": stop, "steps": steps}, SWEEP_OPTIONS, where="find_lr: ")
    if not start < stop:
        raise ConfigError(f"find_lr: start ({start:g}) must be below stop ({stop:g})")
    model = trainer.model
    groups = optim.parameter_groups(
        model,
        adapted=trainer.adapter is not None,
        lr=optim.rates(1.0),
        weight_decay=trainer.weight_decay,
        loraplus_ratio=trainer.loraplus_ratio,
    )
    optimizer = optim.make_optimizer(groups, trainer.optimizer_choice)
    ratios = [g.lr for g in groups]
    lrs, losses, smoothed = [], [], []
    average, best = 0.0, math.inf
    with _restored(model, trainer.device):
        trainer._train_mode()
        for i, batch in zip(range(steps), _forever(trainer)):
            lr = start * (stop / start) ** (i / (steps - 1))
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            loss = _step(trainer, model, optimizer, batch)
            if not math.isfinite(loss):
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            debiased = average / (1 - SMOOTHING ** (i + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(debiased)
            best = min(best, debiased)
            if debiased > DIVERGED * best:
                break
    if len(lrs) < 3:
        raise ConfigError(
            f"find_lr: the loss was not finite after {len(lrs)} steps from lr {start:g}; lower start, or check the data and the model"
        )
    result = RangeTest(lrs, losses, smoothed, suggest(lrs, smoothed))
    logger.info(f"lr range test: {len(lrs)} steps from {start:.2g} to {lrs[-1]:.2g}; suggested lr {result.suggestion:.3g}")
    if out_dir is not None and trainer.process_rank == 0:
        result.write(Path(out_dir))
    return result


def _step(trainer: Trainer, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    with trainer._autocast():
        objective = trainer.task.step(model, to_device(batch, trainer.device), train=True).loss
        if trainer.regularizer is not None:
            objective = objective + trainer.regularizer_weight * trainer.regularizer(model)
    value = float(objective.detach())
    if math.isfinite(value):
        objective.backward()
        if trainer.clip is not None:
            nn.utils.clip_grad_norm_(trainer.params, trainer.clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def _forever(trainer: Trainer) -> Iterator[Any]:
    """The training batches, epoch after epoch, as the trainer draws them."""
    epoch = 0
    while True:
        empty = True
        for batch in trainer.task.batches(trainer.train_data, train=True, spec=trainer._spec(epoch)):
            empty = False
            yield batch
        if empty:
            raise ConfigError("find_lr: the training data holds no batch")
        epoch += 1


@contextlib.contextmanager
def _restored(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Put back every parameter that trains, every buffer, each module's train/eval
    mode and the random number generators, however the block ends."""
    tensors = [t for t in model.parameters() if t.requires_grad] + list(model.buffers())
    copies = [t.detach().clone() for t in tensors]
    modes = [(m, m.training) for m in model.modules()]
    python = random.getstate()
    numpy_state = _numpy_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for t, c in zip(tensors, copies):
                t.copy_(c)
                t.grad = None
        for m, training in modes:
            m.training = training
        random.setstate(python)
        if numpy_state is not None:
            import numpy as np

            np.random.set_state(numpy_state)


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def find_lr(
    model: nn.Module,
    train_data: Any,
    *,
    task: str | Task | Callable[[nn.Module, Any], torch.Tensor],
    start: float = START,
    stop: float = STOP,
    steps: int = STEPS,
    out_dir: str | os.PathLike | None = None,
    **trainer_options: Any,
) -> RangeTest:
    """The learning-rate range test on `model` (adapted or plain) with `train_data`:
    `steps` steps from `start` to `stop`, the model restored afterwards. With
    `out_dir`, the curve is written there (``lr_find.png``, ``lr_find.csv``).
    `trainer_options` are the `Trainer`'s (batch_size, optimizer, loraplus_ratio,
    weight_decay, clip, device, precision, seed…), which the sweep trains with. A and
    B sweep at one rate unless ``loraplus_ratio`` is given, as they train when the
    suggestion is passed as ``lr``."""
    from .trainer import Trainer

    if "lr" in trainer_options:
        raise ConfigError("find_lr sweeps the learning rate itself; leave lr out (start and stop set the range)")
    trainer_options.setdefault("loraplus_ratio", optim.loraplus_ratio(None, "find"))
    trainer = Trainer(model, train_data, task=task, progress=False, **trainer_options)
    return sweep(trainer, start=start, stop=stop, steps=steps, out_dir=out_dir)
