"""Saving and loading adapters: safetensors for the tensors, JSON for the config.

Nothing is ever unpickled, and nothing is written half (`atomic.atomic_dir`: the
folder holds the old or the new complete adapter whenever the process dies).

An adapter folder is untrusted input. `read_adapter` checks a folder on its own —
every config key, type and range; exactly the tensors the config implies, with their
shapes; floating dtypes; finite values — and `load_adapter` then checks that it fits
the model (layers, rules, shapes, trainable modules, buffers). Only then is the model
changed: every refusal is an `AdapterFileError` (`ShapeMismatchError` when the
adapter belongs to another architecture) and leaves the model as it was.

Two folder formats exist, told apart by their file names: the native one
(``lora_anywhere_config.json`` + ``lora_anywhere_adapter.safetensors``) and Hugging
Face PEFT's (``adapter_config.json`` with a ``peft_type`` + ``adapter_model.safetensors``,
see `peft_format`). Native folders written before the rename used PEFT's file names
(their config has a ``format`` of ``lora_anywhere.adapter/…`` and no ``peft_type``);
they still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import attach
from .adapter import LayerAdapter, ResolvedTarget
from .adapter_config import FORMAT, AdapterConfig, TargetRecord
from .api import check_model, check_name, install, remove
from .atomic import atomic_dir, recover
from .errors import AdapterFileError, AlreadyAdaptedError, LoraError, NotAdaptedError, ShapeMismatchError
from .plan import ROUTE_AUTO, LayerPlan, activation_owners, resolve_targets
from .registry import registry
from .sharding import ADD_BEFORE_SHARDING, gathered, refuse_sharded, reshard, write_on_one_rank
from .state import base_tensors, changed_buffers, is_under, model_state, trainable_modules, under_any, unwrap

CONFIG_FILE = "lora_anywhere_config.json"
TENSORS_FILE = "lora_anywhere_adapter.safetensors"
#: The names native folders had before: PEFT's, which PEFT then could not read. Read, never written.
LEGACY_FILES = ("adapter_config.json", "adapter_model.safetensors")
FORMATS = ("native", "peft")
#: Larger configs are refused unread (a model with 100,000 adapted layers needs ~30 MB).
MAX_CONFIG_BYTES = 64 << 20
#: Key prefixes in the tensors file: adapter factors, `trainable` modules, base buffers.
LORA, TRAINABLE, BUFFERS = "lora/", "trainable/", "buffers/"


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


def _live_adapter(model: nn.Module, layer_name: str, name: str) -> LayerAdapter:
    """The adapter `name` on the layer the config lists, or a clear error when the model
    changed under it after `apply` (a layer replaced or deleted)."""
    try:
        adapters = model.get_submodule(layer_name)._modules.get(attach.ADAPTERS)
    except AttributeError:  # the layer itself is gone
        adapters = None
    if adapters is None or name not in adapters:
        raise NotAdaptedError(
            f"layer {layer_name!r} was adapted by {name!r} but carries no adapter now: it was replaced or removed after apply. "
            "Change the model first, then apply (or remove the adapter and apply again)"
        )
    return adapters[name]


def _factor_key(layer: str, target: str, factor: str) -> str:
    return f"{LORA}{layer}/{target}/{factor}"


def _module_state(model: nn.Module, module_name: str) -> dict[str, torch.Tensor]:
    """A trainable module's state_dict by full name, without adapters of others in it."""
    prefix = f"{module_name}." if module_name else ""
    state = model.get_submodule(module_name).state_dict(keep_vars=True)
    return {prefix + k: v for k, v in state.items() if attach.ADAPTERS not in k.split(".")}


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes: every A and B (and SVD starts and DoRA
    magnitudes), the parameters and buffers of the `trainable` modules, and the base
    model's buffers that training changed (e.g. BatchNorm running statistics updated
    by a loop that kept frozen norms in train mode). On a model sharded with FSDP2 they
    are shards."""
    model = unwrap(model)
    name = _adapter_name(model, name)
    state = model_state(model)
    config = state.adapters[name]
    reshard(model)  # FSDP2: every tensor a shard (DTensor), none freed while read
    out: dict[str, torch.Tensor] = {}
    for layer_name in config.layers:
        adapter = _live_adapter(model, layer_name, name)
        for key, value in adapter.saved_tensors().items():
            out[f"{LORA}{layer_name}/{key}"] = value.detach()
    for module_name in config.trainable:
        out.update((TRAINABLE + k, v.detach()) for k, v in _module_state(model, module_name).items())
    out.update((BUFFERS + k, v.detach()) for k, v in changed_buffers(model, state).items())
    return out


def save_adapter(
    model: nn.Module, path: str | os.PathLike, name: str | None = None, *, format: str = "native", strict: bool = True
) -> Path:
    """Write the adapter to folder `path`, atomically, and return the folder.

    ``format="native"`` (the default) writes ``lora_anywhere_adapter.safetensors`` and
    ``lora_anywhere_config.json``; ``format="peft"`` writes a Hugging Face PEFT LoRA
    folder that ``peft.PeftModel.from_pretrained(base, path)`` loads with the same
    outputs. A layer PEFT cannot express exactly is refused (`ExportError`, listing
    each); with ``strict=False`` the others are written and a warning names each one
    left out. On a model sharded with FSDP2, call it on every rank: they gather the
    adapter tensors (only those) and rank 0 writes."""
    if format not in FORMATS:
        raise LoraError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if format == "peft":
        from .peft_format import save_peft

        return save_peft(unwrap(model), path, name, strict=strict)
    tensors, config, sharded = _prepared(model, name)

    def write() -> None:
        with atomic_dir(path) as tmp:
            _write(tmp, tensors, config)

    # A sharded model (FSDP2): every rank gathered the adapter tensors; rank 0 writes.
    write_on_one_rank(sharded, write)
    return Path(path)


def write_adapter(model: nn.Module, folder: Path, name: str | None = None) -> None:
    """Write the adapter's two files into the existing `folder`, for a caller that
    makes that folder take its place atomically itself (a Trainer checkpoint, which
    adds its own state beside them). Not for a sharded model: see `save_adapter`."""
    tensors, config, _ = _prepared(model, name)
    _write(folder, tensors, config)


def _prepared(model: nn.Module, name: str | None) -> tuple[dict[str, torch.Tensor], AdapterConfig, bool]:
    """The tensors (whole, on the CPU) and the config to write, refused if they would
    not load, and whether the model is sharded (gathering is collective: every rank
    of a sharded model must call this)."""
    model = unwrap(model)
    name = _adapter_name(model, name)
    live, sharded = gathered(adapter_state_dict(model, name))
    for key, value in live.items():
        if value.device.type == "meta":
            raise LoraError(
                f"{key} is on the meta device and has no values to save; call model.to_empty(device=...) "
                "and load the base weights before saving"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LoraError(f"{key} holds NaN or infinite values; such an adapter would not load. Train with a lower lr or clip")
    buffers = sorted(k[len(BUFFERS) :] for k in live if k.startswith(BUFFERS))
    config = dataclasses.replace(model_state(model).adapters[name], buffers=buffers)
    return {k: v.cpu().contiguous().clone() for k, v in live.items()}, config, sharded


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT, "adapter": config.name})
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True))


# ---------------------------------------------------------------------- reading


def _native_files(folder: Path) -> tuple[str, str]:
    """The config and tensor file names of the native adapter in `folder`: today's, or the legacy ones."""
    if not (folder / CONFIG_FILE).is_file() and (folder / LEGACY_FILES[0]).is_file():
        return LEGACY_FILES
    return CONFIG_FILE, TENSORS_FILE


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a saved native adapter's config and tensors and check them against each
    other; `AdapterFileError` for anything off. This is the one way in for a native
    adapter file (PEFT folders come in through `peft_format.read_peft`)."""
    folder = recover(Path(path))  # a write that died between two renames
    how = f"expected a folder with {CONFIG_FILE} and {TENSORS_FILE}, as written by lora_anywhere.save_adapter"
    if not folder.is_dir():
        raise AdapterFileError(f"no adapter at {folder}: {how}")
    config_file, tensors_file = _native_files(folder)
    for file in (config_file, tensors_file):
        if not (folder / file).is_file():
            raise AdapterFileError(f"{folder} has no {file}: {how}")
    config = _read_config(folder / config_file)
    try:
        tensors = load_file(str(folder / tensors_file))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise AdapterFileError(f"{folder / tensors_file} is corrupt or not a safetensors file ({exc}); save the adapter again") from exc
    _refuse(folder, _file_problems(config, tensors), "is not a consistent adapter", "save the adapter again", AdapterFileError)
    return config, tensors


def _read_config(file: Path) -> AdapterConfig:
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{file} is {file.stat().st_size} bytes, more than any adapter config needs ({MAX_CONFIG_BYTES}); refused unread"
        )
    try:
        data = json.loads(file.read_bytes(), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        return AdapterConfig.from_json(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # RecursionError: nesting too deep
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AdapterFileError(f"{file} is not a valid lora_anywhere adapter config ({reason}); save the adapter again") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice in one object")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _file_problems(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Everything a folder can be checked for without a model: exactly the tensors its
    config implies, each of the right shape (where the config fixes it), floating
    factors, finite values."""
    shapes: dict[str, tuple[int, ...] | None] = {}  # None: fixed by the model
    for layer, record in config.layers.items():
        for tname, t in record.targets.items():
            rows, cols = t.matrix_shape
            factors = {"A": (t.rank, cols), "B": (rows, t.rank)}
            if config.init == "svd":
                factors.update(A0=(t.rank, cols), B0=(rows, t.rank))
            shapes.update((_factor_key(layer, tname, f), shape) for f, shape in factors.items())
            if config.dora:
                shapes[_factor_key(layer, tname, "m")] = None
    shapes.update((BUFFERS + b, None) for b in config.buffers)
    problems = [f"tensor {key} is missing" for key in sorted(shapes.keys() - tensors.keys())]
    for key, tensor in sorted(tensors.items()):
        owned = key.startswith(TRAINABLE) and under_any(key[len(TRAINABLE) :], config.trainable)
        if key not in shapes and not owned:
            problems.append(f"tensor {key} belongs to no layer, trainable module or buffer of the config")
            continue
        expected = shapes.get(key)
        if expected is not None and tuple(tensor.shape) != expected:
            problems.append(f"tensor {key} has shape {tuple(tensor.shape)}, expected {expected}")
        if key.startswith(LORA) and not tensor.dtype.is_floating_point:
            problems.append(f"tensor {key} is {tensor.dtype}, expected a floating-point dtype")
        elif tensor.dtype.is_complex:
            problems.append(f"tensor {key} is {tensor.dtype}: complex values are not supported")
        elif tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all()):
            problems.append(f"tensor {key} holds NaN or infinite values")
    return problems


def _refuse(where: Any, problems: list[str], what: str, fix: str, error: type[AdapterFileError]) -> None:
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise error(f"the adapter at {where} {what}:\n  - {shown}\n{fix}")


# ---------------------------------------------------------------------- loading


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Re-create a saved adapter on a plain base model and load its tensors.

    `path` is a native folder or a Hugging Face PEFT LoRA folder (recognised by the
    ``peft_type`` in its ``adapter_config.json``; see `peft_format`), which is
    translated into a native adapter first. The whole folder is checked first, then
    every layer, rule, shape, trainable module and buffer against the model; a mismatch
    raises `ShapeMismatchError` naming each difference, anything else wrong with the
    folder `AdapterFileError`, and either leaves the model exactly as it was."""
    from . import peft_format

    wrapper, model = model, unwrap(model)
    check_model(model)
    refuse_sharded(*model.parameters(), what="loading an adapter", fix=ADD_BEFORE_SHARDING)
    folder = recover(Path(path))  # a write that died between two renames
    if peft_format.is_peft_folder(folder):
        config, tensors = peft_format.read_peft(model, folder)
        _refuse(
            path, _file_problems(config, tensors), "does not translate into a consistent adapter", "report it as a bug", AdapterFileError
        )
    else:
        config, tensors = read_adapter(path)
    if name is not None:
        check_name(name)
        config.name = name
    if model_state(model) and config.name in model_state(model).adapters:
        raise AlreadyAdaptedError(
            f"the model already has an adapter named {config.name!r}; pass name='another' to load it beside, or remove the existing one"
        )
    plans, problems = _plans_from_config(model, config, tensors)
    live = model.state_dict(keep_vars=True)
    problems += _trainable_problems(model, config, tensors, live) + _buffer_problems(model, config, tensors)
    fix = "load it onto the model it was trained on (same architecture and sizes)"
    _refuse(path, problems, "does not fit this model", fix, ShapeMismatchError)
    config.format = FORMAT
    install(model, plans, config, config.dropout, initialise=False)
    try:
        with torch.no_grad():
            for layer_name in config.layers:
                adapter = model.get_submodule(layer_name)._modules[attach.ADAPTERS][config.name]
                for key, target in adapter.saved_tensors().items():
                    target.copy_(tensors[f"{LORA}{layer_name}/{key}"])
            for key, value in tensors.items():
                if key.startswith((TRAINABLE, BUFFERS)):
                    live[key.split("/", 1)[1]].copy_(value)
    except BaseException:
        remove(model, merge=False, name=config.name)
        raise
    return wrapper


def _dtype_problem(key: str, saved: torch.Tensor, live: torch.Tensor) -> list[str]:
    if live.device.type == "meta":
        return [f"{key}: the model's tensor is on the meta device; call model.to_empty(device=...) and load the base weights first"]
    if tuple(saved.shape) != tuple(live.shape):
        return [f"tensor {key}: saved {tuple(saved.shape)}, the model has {tuple(live.shape)}"]
    if live.is_floating_point() != saved.is_floating_point() or (not live.is_floating_point() and saved.dtype != live.dtype):
        return [f"tensor {key} is {saved.dtype}, the model's is {live.dtype}"]
    return []


def _trainable_problems(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], live: dict[str, Any]) -> list[str]:
    """Each trainable module exists, overlaps no adapted layer and no other trainable
    module, and the file holds exactly its state_dict."""
    problems = []
    for module_name in config.trainable:
        try:
            expected = _module_state(model, module_name)
        except AttributeError:
            problems.append(f"trainable module {module_name!r} is not in the model")
            continue
        others = [*config.layers, *(m for m in config.trainable if m != module_name)]
        clash = [o for o in others if is_under(o, module_name) or is_under(module_name, o)]
        if clash:
            problems.append(f"trainable module {module_name!r} overlaps {', '.join(map(repr, clash[:3]))}")
        saved = {k[len(TRAINABLE) :] for k in tensors if k.startswith(TRAINABLE) and under_any(k[len(TRAINABLE) :], [module_name])}
        for key in sorted(expected.keys() - saved):
            problems.append(f"trainable tensor {key} is missing from the file")
        for key in sorted(saved - expected.keys()):
            problems.append(f"trainable tensor {key} is not in the model's {module_name or 'root'} module")
        for key in sorted(saved & expected.keys()):
            problems += _dtype_problem(TRAINABLE + key, tensors[TRAINABLE + key], live[key])
    return problems


def _buffer_problems(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    buffers = base_tensors(model, buffers_only=True)
    state = model_state(model)
    owned = [*config.trainable, *(trainable_modules(state) if state else ())]
    problems = []
    for name in config.buffers:
        if name not in buffers or under_any(name, owned):
            problems.append(f"buffer {name!r} is not a buffer of the base model")
        else:
            problems += _dtype_problem(BUFFERS + name, tensors[BUFFERS + name], buffers[name])
    return problems


def _plans_from_config(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> tuple[list[LayerPlan], list[str]]:
    reg = registry()
    plans: list[LayerPlan] = []
    problems: list[str] = []
    claimed: dict[int, str] = {}  # each module, and each base tensor, takes one adapter
    for layer_name, record in config.layers.items():
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            problems.append(f"layer {layer_name!r} ({record.type}) is not in the model")
            continue
        if claimed.setdefault(id(layer), layer_name) != layer_name:
            problems.append(f"layer {layer_name!r} is the same module as layer {claimed[id(layer)]!r}")
            continue
        rule = reg.rule_for(layer)
        if attach.ADAPTERS in layer_name.split(".") or rule is None or rule.name != record.rule:
            found = rule.name if rule else "no rule"
            problems.append(f"layer {layer_name!r}: saved with rule {record.rule}, the model's {type(layer).__name__} has {found}")
            continue
        try:
            resolved = resolve_targets(layer_name, layer, rule, frozenset(record.targets))
        except LoraError as exc:
            problems.append(f"layer {layer_name!r}: {exc}")
            continue
        layer_problems = [p for t in resolved for p in _target_problems(layer_name, layer, t, record.targets[t.name], config, tensors)]
        for t in resolved:
            holder = claimed.setdefault(id(t.parameter_in(layer)), layer_name)
            if holder != layer_name:
                layer_problems.append(f"layer {layer_name!r} target {t.name}: its tensor is tied to one that layer {holder!r} adapts")
        problems += layer_problems
        if layer_problems:
            continue
        ranks = {t.name: record.targets[t.name].rank for t in resolved}
        # Both routes give the same numbers: keep the saved preference where possible.
        preference = ROUTE_AUTO if record.route == "mixed" else record.route
        activation = activation_owners(preference, layer, rule, resolved, max(ranks.values()))
        plans.append(LayerPlan(layer_name, layer, rule, resolved, ranks, record.scale, activation))
    return plans, problems


def _target_problems(
    layer_name: str, layer: nn.Module, t: ResolvedTarget, saved: TargetRecord, config: AdapterConfig, tensors: dict[str, torch.Tensor]
) -> list[str]:
    where = f"layer {layer_name!r} target {t.name}"
    if list(t.shape) != list(saved.shape):
        return [f"{where}: saved for shape {tuple(saved.shape)}, the model has {t.shape}"]
    if (saved.owner, saved.tensor, tuple(saved.rows) if saved.rows else None) != (t.owner, t.tensor, t.rows):
        return [
            f"{where}: saved for tensor {saved.owner}.{saved.tensor} rows {saved.rows}, the rule now adapts {t.owner}.{t.tensor} rows {t.rows}"
        ]
    if t.parameter_in(layer).device.type == "meta":
        return [f"{where}: the model's tensor is on the meta device; call model.to_empty(device=...) and load the base weights first"]
    if not config.dora:
        return []
    if t.output_dim != 0 and config.format != FORMAT:
        return [
            f"{where}: a DoRA adapter of format {config.format}, whose magnitudes were per row; this version keeps one per output feature (train it again)"
        ]
    key = _factor_key(layer_name, t.name, "m")
    expected = (t.block_shape[t.output_dim],)
    return [] if tuple(tensors[key].shape) == expected else [f"tensor {key} has shape {tuple(tensors[key].shape)}, expected {expected}"]
