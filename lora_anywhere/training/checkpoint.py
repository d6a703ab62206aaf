"""The tensors a Trainer checkpoint holds for the model: the adapter of an adapted
model, or what trains in a plain one.

An adapted model's checkpoint is its adapter folder (`save_adapter`: the factors and
the ``trainable`` modules). A plain model's is ``model.safetensors``: every parameter
that requires grad and every buffer (running statistics change in training), so a
frozen base is never written and a resumed run continues exactly. Either way a
checkpoint is read and checked whole before one value is copied into the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_dir
from ..errors import AdapterFileError, ShapeMismatchError
from ..io import adapter_state_dict, read_adapter, save_adapter, write_adapter
from ..sharding import copy_into

MODEL_FILE = "model.safetensors"
MODEL_FORMAT = "lora_anywhere.trained/1"


class ModelTensors:
    """What a checkpoint saves of the model. `live()` are detached views of the model's
    own tensors, so copying into them changes the model in place and the optimizer
    keeps pointing at the same parameters."""

    def live(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the tensors to `folder`, which takes the place of any old one atomically."""
        with atomic_dir(folder) as tmp:
            self.write(tmp)
        return Path(folder)

    def write(self, folder: Path) -> None:
        """Write the tensors into the existing `folder`, for a caller that makes that
        folder take its place atomically itself (a checkpoint adds its state beside them)."""
        raise NotImplementedError

    def read(self, folder: Path) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def checked(self, folder: Path) -> dict[str, torch.Tensor]:
        """The saved tensors, after checking that each one fits the model."""
        saved, current = self.read(folder), self.live()
        if set(saved) != set(current):
            differ = sorted(set(saved) ^ set(current))
            raise AdapterFileError(
                f"the checkpoint in {folder} was saved from another setup (differs in {', '.join(differ[:5])}); "
                "resume with the model and options of that run, or use a fresh out_dir"
            )
        for key, tensor in current.items():
            if tensor.shape != saved[key].shape:
                raise AdapterFileError(
                    f"the checkpoint in {folder} has {key} of shape {tuple(saved[key].shape)}, the model {tuple(tensor.shape)}"
                )
        return saved

    @torch.no_grad()
    def copy_in(self, saved: dict[str, torch.Tensor]) -> None:
        """Copy checked tensors in place (each rank its part, where FSDP2 shards them)."""
        for key, tensor in self.live().items():
            copy_into(tensor, saved[key])


class AdapterTensors(ModelTensors):
    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = model, name

    def live(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model, self.name)

    def save(self, folder: str | os.PathLike) -> Path:
        return save_adapter(self.model, folder, name=self.name)

    def write(self, folder: Path) -> None:
        write_adapter(self.model, folder, name=self.name)

    def read(self, folder: Path) -> dict[str, torch.Tensor]:
        return read_adapter(folder)[1]


class TrainedTensors(ModelTensors):
    """A plain model's parameters that require grad, and its buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def live(self) -> dict[str, torch.Tensor]:
        trained = {id(p) for p in self.model.parameters() if p.requires_grad}
        buffers = {id(b) for b in self.model.buffers()}
        return {k: v.detach() for k, v in self.model.state_dict(keep_vars=True).items() if id(v) in trained or id(v) in buffers}

    def write(self, folder: Path) -> None:
        tensors = {k: v.cpu().contiguous().clone() for k, v in self.live().items()}
        save_file(tensors, str(folder / MODEL_FILE), metadata={"format": MODEL_FORMAT})

    def read(self, folder: Path) -> dict[str, torch.Tensor]:
        path = folder / MODEL_FILE
        if not path.is_file():
            raise AdapterFileError(f"{folder} has no {MODEL_FILE}: expected a checkpoint of a model trained without an adapter")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterFileError(f"{path} is corrupt or not a safetensors file ({exc}); delete {folder} to start over") from exc


def load_trained(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Load a plain model's checkpoint (``best/`` or ``last/`` of a Trainer run) into
    `model`, built as it was for that run: every saved tensor must be one of its
    state_dict's, of the same shape, and all are checked before any is copied."""
    saved = TrainedTensors(model).read(Path(folder))
    state = model.state_dict(keep_vars=True)
    problems = [
        f"{key}: not in the model" if key not in state else f"{key}: saved {tuple(t.shape)}, the model has {tuple(state[key].shape)}"
        for key, t in saved.items()
        if key not in state or state[key].shape != t.shape
    ]
    if problems:
        raise ShapeMismatchError(f"the checkpoint in {folder} does not fit this model: {'; '.join(problems[:5])}")
    with torch.no_grad():
        for key, tensor in saved.items():
            state[key].detach().copy_(tensor)
    return model
