"""What every domain of the demo shares: pretrain on task A, adapt to task B three
ways with the shared `Trainer`, and check that the LoRA model merges and reloads
exactly.

A domain only says how to make its data and its model; this module runs the same
protocol on each, so the numbers in the table are comparable across domains. Task B
is trained at the Trainer's default learning rates, whatever the method: the table
shows what a user gets without tuning (bench/quality.py compares them with the best
rate of a grid).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ... import api, attach, io
from ...errors import DemoError
from ...log import logger
from ...named import disabled
from ...training.checkpoint import MODEL_FILE
from ...training.trainer import Trainer

#: How the three ways of adapting to task B are named in the table.
LORA, HEAD, FULL = "LoRA", "head only", "full FT"
METHODS = (LORA, HEAD, FULL)
#: Outputs of the merged, unmerged and reloaded model must agree to this, relative to
#: the largest output (float32 rounding is ~1e-7).
TOLERANCE = 1e-5


@dataclass
class Data:
    """Train, validation and test sets of one task, in a form the trainer takes."""

    train: Any
    val: Any
    test: Any
    classes: int


@dataclass
class Domain:
    """One domain of the demo. ``build(classes)`` makes the base model with a head of
    that many outputs at ``head``; ``outputs(model, data)`` runs the model on a fixed
    batch of ``data`` for the exactness checks."""

    name: str
    task: str  # the trainer's task name
    task_a: str  # what the base model is pretrained on
    task_b: str  # what it is then adapted to
    model: str  # a few words on the architecture
    data_a: Callable[[bool], Data]  # fast → data
    data_b: Callable[[bool], Data]
    build: Callable[[int], nn.Module]
    head: str
    outputs: Callable[[nn.Module, Data], torch.Tensor]
    rank: int = 4
    targets: Any = None
    lora_trainable: list[str] = field(default_factory=list)  # besides the head
    epochs_a: int = 10
    epochs_b: int = 10
    lr_a: float = 3e-3  # pretraining the base on task A (task B takes the Trainer's defaults)
    batch_size: int = 64
    test_task: Any = None  # how `Trainer.evaluate` scores the test set (default: `task`)


@dataclass
class Row:
    """One line of the table."""

    domain: str
    method: str
    accuracy: float
    trainable: int
    total: int
    seconds: float
    file_bytes: int
    curve: list[float]


@dataclass
class Outcome:
    domain: Domain
    task_a_accuracy: float
    chance_b: float
    rows: list[Row]
    merge_error: float
    reload_error: float
    adapter_dir: Path


def head_only(model: nn.Module, head: str) -> nn.Module:
    """The base stays frozen; only the new head trains (a linear probe)."""
    return api.apply(model, exclude="*", trainable=[head])


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, base parameters); adapter factors count as trainable only."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in model.named_parameters() if attach.ADAPTERS not in n.split("."))
    return trainable, base


def fit(domain: Domain, model: nn.Module, data: Data, *, epochs: int, out_dir: Path, device: str, **options: Any) -> tuple[Trainer, float]:
    """Train with the shared trainer (its defaults, but for the domain's epochs and
    batch size, and `options`); return it and the wall time of `fit`."""
    trainer = Trainer(
        model, data.train, data.val, task=domain.task, epochs=epochs, batch_size=domain.batch_size,
        out_dir=out_dir, progress=False, device=device, seed=0, **options,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return trainer, time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    """The size of what a checkpoint folder holds: the adapter, or a plain model's tensors."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name in (io.TENSORS_FILE, MODEL_FILE))


def run_domain(domain: Domain, out: Path, *, fast: bool, device: str) -> Outcome:
    """The whole protocol for one domain; see the module docstring."""
    out = out / domain.name
    data_a, data_b = domain.data_a(fast), domain.data_b(fast)
    epochs_a = max(2, domain.epochs_a // 4) if fast else domain.epochs_a
    epochs_b = max(2, domain.epochs_b // 4) if fast else domain.epochs_b

    torch.manual_seed(0)
    base = domain.build(data_a.classes)  # a plain model: the trainer trains all of it
    trainer, seconds = fit(domain, base, data_a, epochs=epochs_a, out_dir=out / "pretrain", device=device, lr=domain.lr_a, warmup=0.1)
    acc_a = trainer.evaluate(data_a.test, task=domain.test_task)["accuracy"]
    pretrained = {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}
    logger.info(f"{domain.name}: pretrained {domain.model} on task A ({domain.task_a}): test accuracy {acc_a:.3f}, {seconds:.1f} s")

    def fresh() -> nn.Module:
        """The pretrained base with a new, identically initialised head for task B."""
        model = domain.build(data_a.classes)
        model.load_state_dict(pretrained)
        torch.manual_seed(1)
        fresh_head = domain.build(data_b.classes).get_submodule(domain.head)
        _set_submodule(model, domain.head, fresh_head)
        return model

    rows: list[Row] = []
    lora_model: nn.Module | None = None
    for method in METHODS:
        model = fresh()
        if method == LORA:
            api.apply(model, rank=domain.rank, targets=domain.targets, trainable=[domain.head, *domain.lora_trainable])
        elif method == HEAD:
            head_only(model, domain.head)
        # full FT: the plain model, every parameter trains
        trainable, total = count_trainable(model)
        trainer, seconds = fit(domain, model, data_b, epochs=epochs_b, out_dir=out / _slug(method), device=device)
        accuracy = trainer.evaluate(data_b.test, task=domain.test_task)["accuracy"]
        saved = trainer.saved.save(out / _slug(method) / "final")
        curve = [row["val_accuracy"] for row in trainer.history]
        rows.append(Row(domain.name, method, accuracy, trainable, total, seconds, folder_bytes(saved), curve))
        logger.info(f"{domain.name}: {method:<9} on task B ({domain.task_b}): test accuracy {accuracy:.3f}, {seconds:.1f} s")
        if method == LORA:
            lora_model = model

    assert lora_model is not None
    merge_error, reload_error, scale, adapter_dir = check_exact(lora_model, fresh, domain, data_b, out / "adapter")
    logger.info(
        f"{domain.name}: merged vs unmerged max |Δ| {merge_error:.1e}; adapter reloaded onto a fresh base: max |Δ| {reload_error:.1e}"
    )
    if not max(merge_error, reload_error) <= TOLERANCE * scale:
        raise DemoError(
            f"demo {domain.name}: exactness check failed: merged vs unmerged {merge_error:.2e}, reloaded vs trained {reload_error:.2e} "
            f"(allowed {TOLERANCE * scale:.1e}); this is a bug in lora_anywhere, please report it with this output"
        )
    return Outcome(domain, acc_a, 1.0 / data_b.classes, rows, merge_error, reload_error, adapter_dir)


@torch.no_grad()
def check_exact(
    model: nn.Module, fresh: Callable[[], nn.Module], domain: Domain, data: Data, folder: Path
) -> tuple[float, float, float, Path]:
    """Merged vs unmerged outputs, and a saved adapter reloaded onto a fresh base vs
    the trained model, on CPU in float32 where they must agree to rounding. Returns
    both max differences, the largest output (the scale of rounding) and the folder.

    The adapter must also change the outputs (with it switched off, the model is the
    base with the new head): agreement between outputs an all-zero update never
    touched would prove nothing."""
    model = model.cpu().eval()
    unmerged = domain.outputs(model, data)
    with disabled(model, keep_trained=True):
        without = domain.outputs(model, data)
    api.merge(model)
    merged = domain.outputs(model, data)
    api.unmerge(model)
    saved = io.save_adapter(model, folder)
    reloaded = fresh()
    io.load_adapter(reloaded, saved)
    again = domain.outputs(reloaded.eval(), data)
    scale = max(1.0, unmerged.abs().max().item())
    effect = (unmerged - without).abs().max().item()
    if effect <= 100 * TOLERANCE * scale:
        raise DemoError(
            f"demo {domain.name}: the trained LoRA adapter changes the outputs by only {effect:.1e}, so the exactness checks would prove nothing; train longer or with a higher lr"
        )
    return (merged - unmerged).abs().max().item(), (again - unmerged).abs().max().item(), scale, saved


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _slug(method: str) -> str:
    return method.lower().replace(" ", "-")
