"""How the Trainer runs on several processes (torchrun): DDP or FSDP2.

``"ddp"`` keeps a whole copy of the model on every rank and reduces the gradients of
what trains. ``"fsdp"`` shards the model with FSDP2 (`lora_anywhere.shard`: each
adapted layer and each trained module, then the root), so each rank holds 1/N of the
frozen base — the way to train adapters on a model larger than one device. Under
``"fsdp"`` saving is collective: every rank gathers the adapter (and the optimizer
state, for checkpoints) and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_dir
from ..errors import ConfigError, TaskError
from ..log import logger
from ..sharding import is_sharded, shard, write_on_one_rank
from ..state import model_state
from .checkpoint import ModelTensors

STRATEGIES = ("ddp", "fsdp")
_END = object()


class Strategy:
    """``"ddp"``: one whole model per rank, wrapped in DistributedDataParallel by the
    Trainer. Also what a single process uses."""

    name = "ddp"

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size, self.device = world_size, device

    def prepare(self, model: nn.Module, *, precision: str, device: torch.device) -> nn.Module:
        return model

    @property
    def sharded(self) -> bool:
        return False

    def no_sync(self, net: nn.Module) -> contextlib.AbstractContextManager:
        """Skip the gradient reduction of an accumulation step (not the last one)."""
        return net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()

    def saves_on(self, rank: int) -> bool:
        """Whether this rank takes part in saving: only rank 0 holds what is written."""
        return rank == 0

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def write_checkpoint(self, saved: ModelTensors, folder: Path, write_rest: Callable[[Path], None]) -> None:
        # The trained tensors and the trainer state go into one folder that replaces
        # `folder` whole, so a crash never pairs them with another step's optimizer state.
        with atomic_dir(folder) as tmp:
            saved.write(tmp)
            write_rest(tmp)

    def eval_batches(self, batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """(batch, counted) pairs: every batch, each counted."""
        for batch in batches:
            yield batch, True


class ShardedStrategy(Strategy):
    """``"fsdp"``: the model sharded with FSDP2 (mixed precision through FSDP2's
    MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction)."""

    name = "fsdp"

    def prepare(self, model: nn.Module, *, precision: str, device: torch.device) -> nn.Module:
        if self.world_size == 1:
            logger.info("strategy 'fsdp' on one process: nothing to shard, the model trains whole")
            return model
        state = model_state(model)
        if not state or not state.adapters:
            raise ConfigError(
                "strategy='fsdp' shards the frozen base of an adapted model; a model without an adapter trains whole "
                "under strategy='ddp' (or call lora_anywhere.apply(model) first)"
            )
        if any(is_sharded(p) for p in model.parameters()):
            return model  # sharded by the caller, with units of their choice
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
        return shard(model, mp_policy=policy)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def no_sync(self, net: nn.Module) -> contextlib.AbstractContextManager:
        return _gradient_sync_off(net) if self.sharded else contextlib.nullcontext()

    def saves_on(self, rank: int) -> bool:
        return True  # gathering is collective; rank 0 alone writes

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def write_checkpoint(self, saved: ModelTensors, folder: Path, write_rest: Callable[[Path], None]) -> None:
        if not self.sharded:
            super().write_checkpoint(saved, folder, write_rest)
            return
        staging = folder.with_name(f".{folder.name}.adapter")
        saved.save(staging)  # every rank gathers; rank 0 writes

        def write() -> None:
            try:
                with atomic_dir(folder) as tmp:
                    shutil.copytree(staging, tmp, dirs_exist_ok=True)
                    write_rest(tmp)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        write_on_one_rank(True, write)  # every rank returns, or raises, when rank 0 is done

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def eval_batches(self, batches: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """Every rank must run as many forwards as the others (each one gathers the
        shards of every rank): a rank whose share ends early runs its last batch
        again, uncounted, until every rank's share has ended."""
        if not self.sharded:
            yield from super().eval_batches(batches)
            return
        it, last = iter(batches), _END
        while True:
            batch = next(it, _END)
            if not self._any_rank(batch is not _END):
                return
            if batch is not _END:
                last = batch
                yield batch, True
            elif last is _END:
                raise TaskError("this rank got no evaluation batch while others did; use smaller batches or fewer processes")
            else:
                yield last, False


def strategy(name: Any, world_size: int, device: torch.device) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {name!r}")
    return (ShardedStrategy if name == "fsdp" else Strategy)(world_size, device)


@contextlib.contextmanager
def _gradient_sync_off(net: nn.Module) -> Iterator[None]:
    units = [m for m in net.modules() if hasattr(m, "set_requires_gradient_sync")]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)
