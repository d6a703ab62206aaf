"""Saving and loading adapters: safetensors for the tensors, JSON for the config.

Nothing is ever unpickled, and nothing is written half: both files go into a
temporary folder that then takes the target's place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import attach
from .adapter_config import FORMAT, READABLE_FORMATS, AdapterConfig
from .api import install, remove
from .atomic import atomic_dir
from .errors import AdapterFileError, AlreadyAdaptedError, NotAdaptedError, ShapeMismatchError
from .plan import LayerPlan, activation_owners, resolve_targets
from .registry import registry
from .sharding import ADD_BEFORE_SHARDING, gathered, refuse_sharded, reshard, write_on_one_rank
from .state import model_state

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"


def _adapter_name(model: nn.Module, name: str | None) -> str:
    state = model_state(model)
    names = list(state.adapters) if state else []
    if not names:
        raise NotAdaptedError("the model carries no adapter; call lora_anywhere.apply(model) first (on the model itself, not a submodule)")
    if name is None:
        if len(names) > 1:
            raise NotAdaptedError(f"the model has several adapters ({', '.join(names)}); pass name=... to choose one")
        return names[0]
    if name not in names:
        raise NotAdaptedError(f"the model has no adapter named {name!r}; it has {', '.join(names)}")
    return name


def _factor_key(layer: str, target: str, factor: str) -> str:
    return f"lora/{layer}/{target}/{factor}"


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes: every A and B (and SVD starts and DoRA
    magnitudes), and the parameters and buffers (e.g. BatchNorm running statistics)
    of the `trainable` modules. On a model sharded with FSDP2 they are shards."""
    name = _adapter_name(model, name)
    config = model_state(model).adapters[name]
    reshard(model)  # FSDP2: every tensor a shard (DTensor), none freed while read
    out: dict[str, torch.Tensor] = {}
    for layer_name in config.layers:
        layer = model.get_submodule(layer_name)
        adapter = layer._modules[attach.ADAPTERS][name]
        for key, value in adapter.saved_tensors().items():
            out[f"lora/{layer_name}/{key}"] = value.detach()
    for module_name in config.trainable:
        for key, value in model.get_submodule(module_name).state_dict().items():
            out[f"trainable/{module_name}.{key}" if module_name else f"trainable/{key}"] = value.detach()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write the adapter to folder `path` (``adapter_model.safetensors`` and
    ``adapter_config.json``), atomically. Returns the folder. On a model sharded
    with FSDP2, call it on every rank: they gather the adapter tensors (only those)
    and rank 0 writes."""
    name = _adapter_name(model, name)
    config = model_state(model).adapters[name]
    # A sharded model (FSDP2): every rank gathers the adapter tensors, rank 0 writes.
    whole, sharded = gathered(adapter_state_dict(model, name))
    tensors = {k: v.cpu().contiguous().clone() for k, v in whole.items()}

    def write() -> None:
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "adapter": name})
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True))

    write_on_one_rank(sharded, write)
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a saved adapter's config and tensors, with a clear error for anything off."""
    folder = Path(path)
    how = f"expected a folder with {CONFIG_FILE} and {TENSORS_FILE}, as written by lora_anywhere.save_adapter"
    if not folder.is_dir():
        raise AdapterFileError(f"no adapter at {folder}: {how}")
    for file in (CONFIG_FILE, TENSORS_FILE):
        if not (folder / file).is_file():
            raise AdapterFileError(f"{folder} has no {file}: {how}")
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format {data.get('format')!r}, expected one of {', '.join(READABLE_FORMATS)}")
        config = AdapterConfig.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AdapterFileError(
            f"{folder / CONFIG_FILE} is not a valid lora_anywhere adapter config ({exc}); save the adapter again"
        ) from exc
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{folder / TENSORS_FILE} is corrupt or not a safetensors file ({exc}); save the adapter again") from exc
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Re-create a saved adapter on a plain base model and load its tensors.

    Every layer, rule and shape is checked before the model is touched; a mismatch
    raises `ShapeMismatchError` naming each difference, and leaves the model as it was.
    """
    refuse_sharded(*model.parameters(), what="loading an adapter", fix=ADD_BEFORE_SHARDING)
    config, tensors = read_adapter(path)
    if name is not None:
        config.name = name
    if model_state(model) and config.name in model_state(model).adapters:
        raise AlreadyAdaptedError(
            f"the model already has an adapter named {config.name!r}; pass name='another' to load it beside, or remove the existing one"
        )
    plans, problems = _plans_from_config(model, config, tensors)
    state_dict = model.state_dict(keep_vars=True)
    for module_name in config.trainable:
        prefix = f"{module_name}." if module_name else ""
        for key in [k for k in tensors if k.startswith(f"trainable/{prefix}")]:
            mkey = key[len("trainable/") :]
            if mkey not in state_dict:
                problems.append(f"trainable tensor {mkey} is not in the model")
            elif tuple(state_dict[mkey].shape) != tuple(tensors[key].shape):
                problems.append(f"trainable tensor {mkey}: saved {tuple(tensors[key].shape)}, model has {tuple(state_dict[mkey].shape)}")
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ShapeMismatchError(
            f"the adapter at {path} does not fit this model:\n  - {shown}\nload it onto the model it was trained on (same architecture and sizes)"
        )
    install(model, plans, config, config.dropout, initialise=False)
    try:
        with torch.no_grad():
            for layer_name in config.layers:
                adapter = model.get_submodule(layer_name)._modules[attach.ADAPTERS][config.name]
                for key, target in adapter.saved_tensors().items():
                    source = tensors.get(f"lora/{layer_name}/{key}")
                    if source is None or source.shape != target.shape:
                        found = "missing" if source is None else f"of shape {tuple(source.shape)}"
                        raise ShapeMismatchError(
                            f"the adapter at {path}: tensor lora/{layer_name}/{key} is {found}, expected {tuple(target.shape)}; save the adapter again"
                        )
                    target.copy_(source)
            for key, value in tensors.items():
                if key.startswith("trainable/"):
                    state_dict[key[len("trainable/") :]].copy_(value)
    except BaseException:
        remove(model, merge=False, name=config.name)
        raise
    return model


def _plans_from_config(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> tuple[list[LayerPlan], list[str]]:
    reg = registry()
    plans: list[LayerPlan] = []
    problems: list[str] = []
    for layer_name, record in config.layers.items():
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            problems.append(f"layer {layer_name!r} ({record.type}) is not in the model")
            continue
        rule = reg.rule_for(layer)
        if rule is None or rule.name != record.rule:
            found = rule.name if rule else "no rule"
            problems.append(f"layer {layer_name!r}: saved with rule {record.rule}, the model's {type(layer).__name__} has {found}")
            continue
        try:
            resolved = resolve_targets(layer_name, layer, rule, frozenset(record.targets))
        except Exception as exc:
            problems.append(f"layer {layer_name!r}: {exc}")
            continue
        ranks: dict[str, int] = {}
        for t in resolved:
            saved = record.targets[t.name]
            if list(t.shape) != list(saved.shape):
                problems.append(f"layer {layer_name!r} target {t.name}: saved for shape {tuple(saved.shape)}, the model has {t.shape}")
                continue
            rows, cols = t.matrix_shape
            for factor, shape in (("A", (saved.rank, cols)), ("B", (rows, saved.rank))):
                key = _factor_key(layer_name, t.name, factor)
                if key not in tensors:
                    problems.append(f"tensor {key} is missing from the adapter file")
                elif tuple(tensors[key].shape) != shape:
                    problems.append(f"tensor {key}: shape {tuple(tensors[key].shape)}, expected {shape}")
            ranks[t.name] = saved.rank
        # Both routes give the same numbers: keep the saved preference where possible.
        preference = "auto" if record.route == "mixed" else record.route
        activation = activation_owners(preference, layer, resolved, max(ranks.values(), default=1))
        plans.append(LayerPlan(layer_name, layer, rule, resolved, ranks, record.scale, activation))
    return plans, problems
