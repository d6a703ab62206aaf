"""Pretrained base weights as people have them, read offline.

``[model] weights`` (or ``--weights``) is one of

- a file of tensors: ``.safetensors``, or a torch ``state_dict`` (also wrapped as
  ``{"state_dict": …}`` or ``{"model": …}``), read with ``weights_only=True``. For a
  ``timm:`` model it first goes through the model family's own
  ``checkpoint_filter_fn``, as ``timm.create_model(pretrained=True)`` would: a ViT
  checkpoint made at another image size gets its position embeddings resampled;
- a torchvision weights name, ``"ResNet18_Weights.IMAGENET1K_V1"`` (or ``"DEFAULT"``
  for a ``torchvision:`` spec), read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps what it downloaded;
- a transformers model folder (``save_pretrained`` output) for an ``hf:`` spec, built
  with ``from_pretrained(folder, local_files_only=True)``.

Nothing is downloaded. Keys listed in ``weights_ignore`` (the old head) are not loaded;
every other key must fit the model. The run folder records which weights were used
and their SHA-256, so `merge` and `evaluate` rebuild exactly the trained model.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ConfigError
from ..log import logger

TORCHVISION_NAME = re.compile(r"^(\w+_Weights\.)?[A-Z][A-Z0-9_]*$")
#: What a transformers model folder holds besides config.json.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Weights:
    """Where a base model's pretrained weights come from: ``kind`` is "file",
    "torchvision" (``name`` is the weights enum, ``path`` its file in the hub cache) or
    "transformers" (``path`` is the model folder)."""

    kind: str
    path: Path
    name: str | None = None

    def record(self) -> dict[str, Any]:
        """What the run folder keeps: enough to find the weights again and to notice
        that they changed."""
        return {"kind": self.kind, "path": str(self.path), "name": self.name, "sha256": fingerprint(self.path)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Weights:
        weights = cls(record["kind"], Path(record["path"]), record.get("name"))
        if weights.path.exists() and fingerprint(weights.path) != record["sha256"]:
            raise ConfigError(
                f"the base weights {weights.path} changed since this run trained on them (SHA-256 differs); the adapter would "
                "not reproduce the trained model. Put the original file back, or train again"
            )
        return weights


def resolve(value: str, spec: str, base: Path) -> Weights:
    """A ``weights`` value from a config (paths relative to `base`) or the command line."""
    path = (base / value).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"[model] weights must be a weights file or a transformers model folder: {path} is a folder without config.json; give a weights file, or a transformers model folder (save_pretrained)"
                )
            if not spec.startswith("hf:"):
                raise ConfigError(
                    f"[model] weights must fit the spec: {path} is a transformers model folder; use it with an hf: model spec (e.g. hf:BertModel)"
                )
            return Weights("transformers", path.resolve())
        return Weights("file", path.resolve())
    if spec.startswith("torchvision:") and TORCHVISION_NAME.match(value):
        return _torchvision_weights(value, spec.partition(":")[2])
    raise ConfigError(
        f"[model] weights must be an existing path: base weights {path} do not exist; give a weights file (.safetensors or a torch state_dict), a transformers model folder, "
        "or for a torchvision: model a weights name such as ResNet18_Weights.IMAGENET1K_V1"
    )


def _torchvision_weights(value: str, model_name: str) -> Weights:
    try:
        from torchvision import models
    except ImportError as exc:
        raise ConfigError("torchvision weights names need torchvision: pip install 'lora_anywhere[vision]'") from exc
    try:
        enum = models.get_weight(value) if "." in value else models.get_model_weights(model_name)[value]
    except (KeyError, ValueError) as exc:
        choices = (
            ", ".join(f"{w}" for w in models.get_model_weights(model_name))
            if model_name in models.list_models()
            else "see torchvision.models"
        )
        raise ConfigError(f"{value!r} is not a torchvision weights name for {model_name} ({choices}, or DEFAULT)") from exc
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(enum.url).path).name
    if not file.is_file():
        raise ConfigError(
            f"torchvision weights {enum} are not in the torch hub cache ({file}), and nothing is downloaded at run time. "
            f"Fetch them once where there is a network (torchvision.models.get_model({model_name!r}, weights={str(enum)!r})) "
            "and copy the file there, or point TORCH_HOME at a cache that has it"
        )
    return Weights("torchvision", file, str(enum))


def fingerprint(path: Path) -> str:
    """SHA-256 of a weights file, or of a model folder's config and weight files."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name == "config.json" or p.name in HF_WEIGHT_FILES)
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- loading


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; nothing is unpickled."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as exc:  # safetensors, pickle and zip errors alike
        raise ConfigError(
            f"cannot read base weights {path} ({type(exc).__name__}: {exc}); give a .safetensors file or a torch state_dict"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state_dict (names → tensors)")
    return state


def family_filter(spec: str, model: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
    """timm's own checkpoint adaptation for this model's family (resampled position
    embeddings, renamed keys), as its pretrained loader applies it; None elsewhere."""
    if not spec.startswith("timm:"):
        return None
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return None
    return lambda state: filter_fn(state, model)


def load_weights(model: nn.Module, path: Path, ignore: list[str], adapt: Callable[[dict], dict] | None = None) -> None:
    """Load base weights, skipping keys that start with an `ignore` prefix; every other
    key must match the model exactly. `adapt` (timm's filter) runs first."""
    if not path.is_file():
        raise ConfigError(f"base weights {path} do not exist")
    state = read_state(path)
    if adapt is not None:
        try:
            state = adapt(state)
        except Exception as exc:  # the family filter's own complaint about a foreign checkpoint
            raise ConfigError(f"base weights {path} do not fit this model's family ({type(exc).__name__}: {exc})") from exc
    skipped = lambda key: any(key.startswith(prefix) for prefix in ignore)  # noqa: E731
    expected = model.state_dict()
    wanted = {k: v for k, v in state.items() if not skipped(k)}
    problems = [f"missing {k}" for k in expected if k not in wanted and not skipped(k)]
    problems += [f"unexpected {k}" for k in wanted if k not in expected]
    problems += [
        f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in wanted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ConfigError(
            f"base weights {path} do not fit the model: {shown}. Check the model spec and kwargs, or list keys to skip in weights_ignore (e.g. the old head)"
        )
    model.load_state_dict(wanted, strict=False)


def from_pretrained(spec: str, folder: Path, kwargs: dict[str, Any], ignore: list[str]) -> nn.Module:
    """``transformers.<Class>.from_pretrained(folder, local_files_only=True, **kwargs)``.
    Tensors whose shape changed (a new head: ``num_labels``) are initialised afresh only
    where ``weights_ignore`` allows it."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("an hf: model from a folder needs transformers: pip install 'lora_anywhere[text]'") from exc
    name = spec.partition(":")[2]
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError(f"transformers has no model class {name!r}")
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{cls.__name__}.from_pretrained({str(folder)!r}) failed: {exc}") from exc
    mismatched = [key if isinstance(key, str) else key[0] for key in info.get("mismatched_keys", [])]
    refused = [k for k in mismatched if not any(k.startswith(p) for p in ignore)]
    if refused:
        raise ConfigError(
            f"base weights {folder}: {', '.join(refused[:6])} differ in shape from the model; list them (or their prefix) in "
            "weights_ignore to start them afresh, or check the model kwargs"
        )
    fresh = sorted(set(info.get("missing_keys", [])) | set(mismatched))
    if fresh:
        logger.info(
            f"weights: {len(fresh)} tensors not in {folder.name} start afresh: {', '.join(fresh[:6])}{' …' if len(fresh) > 6 else ''}"
        )
    return model
