"""Hugging Face PEFT LoRA folders, both ways, exactly.

A PEFT folder is ``adapter_config.json`` (with ``"peft_type": "LORA"``) beside
``adapter_model.safetensors``. PEFT wraps a module (Linear, Conv1d/2d/3d, Embedding,
transformers' Conv1D, nn.MultiheadAttention) and adds ``scale · B(A(x))`` to its
output, or reaches a raw 2-D parameter through ``target_parameters`` while the module
holding it runs. lora_anywhere sees every adapter as ``ΔW = scale · B @ A`` on one
tensor's matrix view (rows × the rest), so translating is re-laying out A and B per
PEFT layer kind; row blocks of one tensor (q and v of a fused qkv) become one LoRA on
the whole tensor, their A's stacked and each B in its rows, zeros elsewhere.

Where PEFT's computation is no such update of the same tensor — a grouped or dilated
conv, a weight-normed weight, a tensor two modules share, a module whose parent reads
its weight itself — nothing is translated: an export leaves the layer out (or refuses,
naming each), an import refuses the folder. A folder that would load with other
numbers is never written or read.

`save_peft` backs ``save_adapter(..., format="peft")``; `read_peft` turns a PEFT folder
into a native config and tensors, which `io.load_adapter` then checks and installs
like any native folder, so a refusal leaves the model unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import attach, io
from .adapter import LayerAdapter, ResolvedTarget
from .adapter_config import AdapterConfig, LayerRecord, TargetRecord
from .atomic import atomic_dir
from .errors import AdapterFileError, ExportError
from .log import logger
from .peft_layers import (
    CONV1D,
    DORA_KINDS,
    MHA,
    MHA_OUT_TWICE,
    OUTPUT_COLUMNS,
    PARAMETER,
    Options,
    Site,
    anchored,
    base_magnitude,
    from_peft,
    magnitude_to_peft,
    module_kind,
    output_features,
    parameter_sites,
    plain_modules,
    suffix_names,
    to_peft,
    to_save_matches,
    why_inexact,
    why_not_saved,
)
from .plan import _hook_weight_norm
from .registry import registry
from .state import adapted_layers, is_under, model_state
from .version import __version__

CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"
#: PEFT's prefix of every tensor key: the PeftModel's base_model, then its model.
KEY_PREFIX = "base_model.model."

#: init_lora_weights values that only choose starting values, which the saved tensors replace.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_peft_folder(path: str | os.PathLike) -> bool:
    """Whether `path` holds a PEFT adapter: an ``adapter_config.json`` naming a ``peft_type``.
    A folder that also holds a native adapter is ambiguous and refused."""
    folder = Path(path)
    try:
        if (folder / CONFIG_FILE).stat().st_size > io.MAX_CONFIG_BYTES:
            return False  # the native reader refuses it unread
        data = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False  # no such file, or not JSON: the native reader says what is wrong
    if not isinstance(data, dict) or "peft_type" not in data:
        return False
    if (folder / io.CONFIG_FILE).is_file():
        raise AdapterFileError(
            f"{folder} holds both a lora_anywhere adapter ({io.CONFIG_FILE}) and a PEFT adapter ({CONFIG_FILE}); "
            "move one of them to a folder of its own"
        )
    return True


def _most_common(values: list[Any]) -> Any:
    """The most frequent value (the smallest among equally frequent ones): the config's default."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _tidy(x: float) -> float | int:
    """An alpha that is a whole number up to rounding, written as one."""
    nearest = round(x)
    return int(nearest) if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else x


# ------------------------------------------------------------------ export


@dataclass
class _Block:
    """One adapted row block of a tensor as lora_anywhere holds it: ΔM[rows] = scale · b @ a."""

    rows: tuple[int, int]
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None
    where: str  # "layer:target", for messages


@dataclass
class ExportPlan:
    """What a PEFT export of one adapter keeps (PEFT's LoRA sites, modules to save),
    what it leaves out and why, and notes on what PEFT does differently in training."""

    name: str
    config: AdapterConfig
    modules: dict[str, nn.Module]
    blocks: dict[Site, dict[str, list[_Block]]] = field(default_factory=dict)
    to_save: list[str] = field(default_factory=list)
    also_saved: list[str] = field(default_factory=list)  # modules PEFT's name matching wraps beside them
    left_out: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, site: Site, part: str, block: _Block) -> None:
        self.blocks.setdefault(site, {}).setdefault(part, []).append(block)

    def drop(self, site: Site, why: str) -> None:
        for blocks in self.blocks.pop(site).values():
            for block in blocks:
                self.left_out[block.where] = why

    @property
    def kept(self) -> list[str]:
        return [b.where for parts in self.blocks.values() for blocks in parts.values() for b in blocks]

    def describe(self) -> str:
        """What `lora-anywhere inspect --peft` prints."""
        kinds = Counter(site.kind for site in self.blocks)
        layers = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        lines = [
            f"PEFT export of adapter {self.name!r}: keeps {len(self.kept)} adapted tensors in {len(self.blocks)} PEFT LoRA layers"
            + (f" ({layers})" if layers else "")
            + (f" and {len(self.to_save)} modules to save" if self.to_save else "")
        ]
        if self.left_out:
            lines.append(f"leaves out {len(self.left_out)}:")
            lines += [f"  - {where}: {why}" for where, why in self.left_out.items()]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def export_plan(model: nn.Module, name: str | None = None) -> ExportPlan:
    """Where PEFT keeps each adapted tensor of adapter `name`, or why it cannot keep it exactly."""
    name = io._adapter_name(model, name)
    config = model_state(model).adapters[name]
    plan = ExportPlan(name, config, plain_modules(model))
    shared = attach.tensor_holders(model)
    for layer_name, _, adapters in adapted_layers(model):
        adapter = adapters.get(name)
        for t in adapter.targets.values() if adapter is not None else ():
            where = f"{layer_name or '<root>'}:{t.name}"
            site, part = _site_of(plan.modules, layer_name, t)
            why = why_inexact(plan.modules, shared, site) or _why_not_dora(site, t, adapter, adapters)
            why = why or (MHA_OUT_TWICE if part == "out" else None)
            if why:
                plan.left_out[where] = why
                continue
            f = adapter.factors[t.name]
            a, b = f.pair()
            magnitude = adapter.magnitudes[t.name].detach() if adapter.dora else None
            plan.add(site, part, _Block(t.rows or (0, t.shape[0]), a.detach(), b.detach(), f.scale, magnitude, where))
    for module in config.trainable:
        why = why_not_saved(plan.modules, shared, module)
        if why:
            plan.left_out[f"{module or '<root>'} (trainable)"] = why
        else:
            plan.to_save.append(module)
    _check_names(model, plan)
    _number_wrappers(plan)
    if config.freeze_a:
        plan.notes.append("PEFT has no LoRA-FA option: A trains there too (this changes training, not outputs)")
    if config.dropout and any(s.kind == PARAMETER for s in plan.blocks):
        plan.notes.append("PEFT's parameter LoRA has no dropout, so lora_dropout is written as 0 (this changes training, not outputs)")
    return plan


def _site_of(modules: dict[str, nn.Module], layer_name: str, t: ResolvedTarget) -> tuple[Site, str]:
    """The PEFT site (and part) that would hold target `t` of layer `layer_name`."""
    owner = ".".join(p for p in (layer_name, t.owner) if p)
    tensor = t.tensor
    if "parametrizations" in owner.split("."):  # the tensor under a parametrization: the module's own name for it
        owner, _, tensor = owner.rpartition(".parametrizations.")
    elif tensor.endswith("_v") and _hook_weight_norm(modules[owner], tensor[:-2]):
        tensor = tensor[:-2]
    module = modules[owner]
    parent_name = owner.rpartition(".")[0]
    parent = modules.get(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and parent.out_proj is module and owner:
        return Site(MHA, parent_name), "out"
    kind = module_kind(module)
    if kind == MHA:
        return Site(MHA, owner), "in"
    if kind is not None and tensor == "weight":
        return Site(kind, owner), ""
    return Site(PARAMETER, owner, tensor), ""


def _why_not_dora(site: Site, t: ResolvedTarget, adapter: LayerAdapter, adapters: dict[str, LayerAdapter]) -> str | None:
    if not adapter.dora:
        return None
    if site.kind not in DORA_KINDS:
        return f"PEFT has no DoRA for a {site.kind} LoRA"
    if site.kind in OUTPUT_COLUMNS and t.rows is not None:
        return f"DoRA on some rows of a {site.kind} weight, whose output features are its columns"
    if t.rows is not None and any(a.merged for a in adapters.values() if a is not adapter):
        return "another adapter is merged into this tensor, so its base rows are not at hand; unmerge it first"
    return None


def _check_names(model: nn.Module, plan: ExportPlan) -> None:
    """Leave out what PEFT's name matching would get wrong: a LoRA under a name that
    matches a module to save, a module to save whose name ending catches a LoRA, a
    parameter name another parameter ends with, parameters beside Conv1D layers."""
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False) if attach.ADAPTERS not in n.split(".")]
    for site in list(plan.blocks):
        for m in plan.to_save:
            if site.kind != PARAMETER and re.match(rf"(^|.*\.){m}($|\..*)", site.module):
                plan.drop(site, f"PEFT puts no LoRA on a module whose name matches its module to save {m!r}")
                break
    for extra in (n for n in to_save_matches(all_names, plan.to_save) if n not in plan.to_save):
        for site in [s for s in plan.blocks if is_under(s.module, extra)]:
            plan.drop(site, f"PEFT matches modules to save by name ending, so it would save a copy of {extra}, which holds this layer")
        plan.also_saved.append(extra)
        plan.notes.append(f"PEFT also trains and saves a copy of {extra} (its name ends like a module to save); it is written unchanged")
    params = [f"{n}.{p}" for n, m in plan.modules.items() for p, _ in m.named_parameters(recurse=False)]
    keys = {s.key for s in plan.blocks if s.kind == PARAMETER}
    for site in [s for s in plan.blocks if s.kind == PARAMETER]:
        caught = [p for p in params if p.endswith(f".{site.key}") and p not in keys]
        if caught:
            plan.drop(site, f"PEFT's target_parameters match by name ending, so {caught[0]} would be adapted too")
    if any(s.kind == CONV1D for s in plan.blocks):
        for site in [s for s in plan.blocks if s.kind == PARAMETER]:
            plan.drop(
                site, "PEFT cannot combine target_parameters with transformers Conv1D layers (its parameter LoRA refuses fan_in_fan_out)"
            )


def _number_wrappers(plan: ExportPlan) -> None:
    """PEFT nests one ParamWrapper per parameter of a module, the first registered innermost."""
    by_module: dict[str, list[Site]] = {}
    for site in plan.blocks:
        if site.kind == PARAMETER:
            by_module.setdefault(site.module, []).append(site)
    for module, sites in by_module.items():
        order = [p for p, _ in plan.modules[module].named_parameters(recurse=False)]
        sites.sort(key=lambda s: order.index(s.parameter))
        for i, site in enumerate(sites):
            plan.blocks[Site(PARAMETER, module, site.parameter, depth=len(sites) - 1 - i)] = plan.blocks.pop(site)


def _stack(blocks: list[_Block], rows: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) for row blocks of a tensor: the A's stacked, each B in its rows and
    its own columns (zeros elsewhere), rescaled to the common `scale`. Exact: still
    ΔM[block] = scale · B[block] @ A."""
    if len(blocks) == 1 and blocks[0].rows == (0, rows) and blocks[0].scale == scale:
        return blocks[0].a, blocks[0].b
    blocks = sorted(blocks, key=lambda blk: blk.rows)
    a = torch.cat([blk.a for blk in blocks])
    b = a.new_zeros(rows, a.shape[0])
    column = 0
    for blk in blocks:
        rank = blk.a.shape[0]
        b[blk.rows[0] : blk.rows[1], column : column + rank] = blk.b if blk.scale == scale else blk.b * (blk.scale / scale)
        column += rank
    return a, b


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) at a higher rank, with zero rows and columns: the same ΔM."""
    extra = rank - a.shape[0]
    if not extra:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def _peft_tensors(plan: ExportPlan) -> tuple[dict[str, torch.Tensor], dict[Site, tuple[int, float]]]:
    """Every tensor of the PEFT file, and each site's rank and scale."""
    out: dict[str, torch.Tensor] = {}
    ranks: dict[Site, tuple[int, float]] = {}
    for site, parts in plan.blocks.items():
        scale = next(iter(parts.values()))[0].scale
        weights = {part: site.weight(plan.modules, part) for part in site.parts}
        pairs = {part: _stack(parts[part], weights[part].shape[0], scale) for part in parts}
        rank = max(a.shape[0] for a, _ in pairs.values())
        for part, weight in weights.items():
            rows, cols = weight.shape[0], weight[0].numel()
            a, b = _pad(*pairs[part], rank) if part in pairs else (weight.new_zeros(rank, cols), weight.new_zeros(rows, rank))
            key_a, key_b, key_m = site.keys(part)
            out[key_a], out[key_b] = to_peft(site.kind, a, b, tuple(weight.shape))
            if plan.config.dora:
                if site.kind in OUTPUT_COLUMNS:  # one whole block (`_why_not_dora`): its magnitudes are the columns'
                    magnitude = parts[part][0].magnitude.clone()
                else:
                    magnitude = base_magnitude(site.kind, weight)  # rows no block adapts keep their norm
                    for blk in parts[part]:
                        magnitude[blk.rows[0] : blk.rows[1]] = blk.magnitude
                out[key_m] = magnitude_to_peft(site.kind, magnitude, tuple(weight.shape))
        ranks[site] = (rank, scale)
    for module in plan.to_save + plan.also_saved:
        for key, value in plan.modules[module].state_dict().items():
            if attach.ADAPTERS not in key.split("."):
                out[f"{module}.{key}"] = value
    return {KEY_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in out.items()}, ranks


def _peft_config(plan: ExportPlan, ranks: dict[Site, tuple[int, float]]) -> dict[str, Any]:
    """PEFT's adapter_config.json: one rank and alpha for most sites, patterns for the others."""
    rslora = plan.config.rslora
    alphas = {site: _tidy(scale * (math.sqrt(rank) if rslora else rank)) for site, (rank, scale) in ranks.items()}
    r = _most_common([rank for rank, _ in ranks.values()])
    alpha = _most_common(list(alphas.values()))
    modules = [s.module for s in ranks if s.kind != PARAMETER]
    parameters = sorted(s.key for s in ranks if s.kind == PARAMETER)
    has_parameters = bool(parameters)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0 if has_parameters else plan.config.dropout,
        "target_modules": suffix_names(modules, list(plan.modules)) if modules else [],
        "target_parameters": parameters or None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {anchored(s.key): rank for s, (rank, _) in ranks.items() if rank != r},
        "alpha_pattern": {anchored(s.key): a for s, a in alphas.items() if a != alpha},
        "use_rslora": rslora,
        "use_dora": plan.config.dora,
        "fan_in_fan_out": any(s.kind == CONV1D for s in ranks),
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": plan.to_save or None,
    }


def save_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, strict: bool = True) -> Path:
    """Write adapter `name` as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained``
    loads onto the plain base model with the same outputs, unmerged and merged.

    A tensor PEFT cannot hold exactly raises `ExportError` listing each one and why;
    with ``strict=False`` the rest is written and a warning names each left out."""
    plan = export_plan(model, name)
    if plan.left_out and strict:
        listed = "\n  - ".join(f"{where}: {why}" for where, why in plan.left_out.items())
        layers = sorted({where.split(":")[0] for where in plan.left_out})
        raise ExportError(
            f"PEFT cannot hold {len(plan.left_out)} of the adapted tensors of adapter {plan.name!r} exactly:\n  - {listed}\n"
            f"exclude these layers when you apply the adapter (exclude={layers!r}), or pass strict=False "
            "(CLI: --partial) to write the others and leave these out"
        )
    if not plan.blocks:
        raise ExportError(f"adapter {plan.name!r} has no adapted tensor PEFT can hold; nothing to write")
    if plan.left_out:
        listed = "; ".join(f"{where} ({why})" for where, why in plan.left_out.items())
        logger.warning("PEFT export leaves out %d adapted tensors: %s", len(plan.left_out), listed)
    for note in plan.notes:
        logger.warning("PEFT export: %s", note)
    tensors, ranks = _peft_tensors(plan)
    config = _peft_config(plan, ranks)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt", "lora_anywhere": __version__})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return Path(path)


# ------------------------------------------------------------------ import

#: Config keys that describe the adapter but not its computation.
_METADATA = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
    "fan_in_fan_out",  # PEFT sets it per layer type: True for Conv1D, False for Linear
    "megatron_core", "qalora_group_size", "runtime_config",
    "loftq_config", "eva_config",  # settings of initialisations, which the saved tensors replace
}  # fmt: skip
#: Config keys `_options` reads.
_INTERPRETED = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "target_parameters", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "modules_to_save", "bias", "init_lora_weights",
}  # fmt: skip


def read_peft(model: nn.Module, path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA folder as a native adapter config and tensors for `model`, with
    every target resolved as PEFT resolves it on this model. Anything PEFT computes
    otherwise than lora_anywhere can reproduce raises `AdapterFileError`, naming it;
    the model is not touched."""
    folder = Path(path)
    options = _options(folder / CONFIG_FILE)
    tensors = _peft_file_tensors(folder)
    modules = plain_modules(model)
    sites, to_save = _resolve(model, modules, options, folder)
    return _translate(model, modules, options, sites, to_save, tensors, folder)


def _options(file: Path) -> Options:
    data = json.loads(file.read_text())
    if data.get("peft_type") != "LORA":
        raise AdapterFileError(
            f"{file} is a PEFT {data.get('peft_type')} adapter; lora_anywhere reads PEFT LoRA adapters (peft_type LORA) only"
        )
    for key, value in data.items():
        if key not in _METADATA and key not in _INTERPRETED and value not in (None, False, {}, [], ""):
            raise AdapterFileError(
                f"{file}: PEFT option {key}={value!r} is not supported; lora_anywhere reproduces plain LoRA, rsLoRA and DoRA "
                "adapters exactly and nothing else"
            )
    if data.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{file}: PEFT option bias={data['bias']!r} trains the adapted layers' biases too, which lora_anywhere does not reproduce"
        )
    init = data.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
        raise AdapterFileError(
            f"{file}: PEFT option init_lora_weights={init!r} changes the base weights (or the computation) when PEFT loads the adapter; "
            "convert it to a plain LoRA with PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    try:
        options = Options(
            r=_positive_int(data.get("r", 8), "r"),
            alpha=_number(data.get("lora_alpha", 8), "lora_alpha"),
            dropout=_dropout(data.get("lora_dropout", 0.0)),
            target_modules=_names(data.get("target_modules"), "target_modules", regex=True),
            exclude_modules=_names(data.get("exclude_modules"), "exclude_modules", regex=True),
            target_parameters=_names(data.get("target_parameters"), "target_parameters") or [],
            layers_to_transform=_layers(data.get("layers_to_transform")),
            layers_pattern=_names(data.get("layers_pattern"), "layers_pattern", single=True),
            rank_pattern={str(k): _positive_int(v, f"rank_pattern[{k!r}]") for k, v in (data.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): _number(v, f"alpha_pattern[{k!r}]") for k, v in (data.get("alpha_pattern") or {}).items()},
            rslora=bool(data.get("use_rslora", False)),
            dora=bool(data.get("use_dora", False)),
            modules_to_save=_names(data.get("modules_to_save"), "modules_to_save") or [],
        )
        for pattern in [*options.modules_to_save, *options.rank_pattern, *options.alpha_pattern, *(options.layers_pattern or [])]:
            re.compile(pattern)
    except (TypeError, ValueError, AttributeError, re.error) as exc:
        raise AdapterFileError(f"{file} is not a valid PEFT LoRA config ({exc})") from exc
    if options.target_modules == "all-linear":
        raise AdapterFileError(
            f"{file}: target_modules='all-linear' is resolved by PEFT from the transformers model class; "
            "load and save the adapter with PEFT once (it writes the resolved module names) and read that folder"
        )
    if options.target_modules is None and not options.target_parameters:
        raise AdapterFileError(
            f"{file} names no target_modules (PEFT then picks them from the transformers model type); "
            "load and save the adapter with PEFT once (it writes the resolved names) and read that folder"
        )
    return options


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _dropout(value: Any) -> float:
    p = _number(value, "lora_dropout")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {value!r}")
    return p


def _names(value: Any, what: str, *, regex: bool = False, single: bool = False) -> Any:
    """A list of names (kept in order), or one regex string where PEFT takes one."""
    if value is None:
        return None
    if isinstance(value, str):
        if regex:
            re.compile(value)
            return value
        if single:
            return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of names{' or a regex' if regex else ''}, got {value!r}")
    return list(dict.fromkeys(value))


def _layers(value: Any) -> list[int] | int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise ValueError(f"layers_to_transform must be a layer number or a list of them, got {value!r}")


def _peft_file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by key, without PEFT's ``base_model.model.`` prefix."""
    file = folder / TENSORS_FILE
    if not file.is_file():
        if (folder / PICKLED_FILE).is_file():
            raise AdapterFileError(
                f"{folder} keeps its tensors in {PICKLED_FILE}, a pickle, which lora_anywhere never loads; "
                f"have PEFT write {TENSORS_FILE}: PeftModel.from_pretrained(base, folder).save_pretrained(new_folder)"
            )
        raise AdapterFileError(f"{folder} has no {TENSORS_FILE}: expected a PEFT LoRA folder as PeftModel.save_pretrained writes it")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{file} is corrupt or not a safetensors file ({exc})") from exc
    if tensors and all(k.startswith(KEY_PREFIX) for k in tensors):
        tensors = {k[len(KEY_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def _resolve(model: nn.Module, modules: dict[str, nn.Module], options: Options, folder: Path) -> tuple[list[Site], list[str]]:
    """PEFT's sites and modules to save on this model, as PEFT would pick them; every
    one PEFT would refuse, or that lora_anywhere cannot reproduce, is an error."""
    problems: list[str] = []
    chosen = [n for n in modules if n and options.selects(n)]
    sites: list[Site] = []
    for name in chosen:
        outer = next((o for o in chosen if o != name and is_under(name, o)), None)
        kind = module_kind(modules[name])
        if outer is not None:
            problems.append(f"{name}: PEFT would target it and {outer}, which holds it")
        elif kind is None:
            problems.append(f"{name} ({type(modules[name]).__name__}): PEFT has no LoRA layer for it and refuses this folder too")
        else:
            sites.append(Site(kind, name))
    for site in parameter_sites(modules, options.target_parameters):
        if site.module in chosen:
            problems.append(f"{site.key}: its module is a target module too, which PEFT refuses")
        else:
            sites.append(site)
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False) if attach.ADAPTERS not in n.split(".")]
    matched = to_save_matches(all_names, options.modules_to_save)
    to_save = [n for n in matched if not any(o != n and is_under(n, o) for o in matched)]
    shared = attach.tensor_holders(model)
    problems += [f"{m} (module to save): {why}" for m in to_save if (why := why_not_saved(modules, shared, m))]
    for site in sites:
        holder = next((m for m in to_save if is_under(site.module, m)), None)
        why = why_inexact(modules, shared, site)
        if holder is not None:
            why = f"it lies in {holder}, which modules_to_save also names"
        elif options.dora and site.kind not in DORA_KINDS:
            why = f"PEFT has no DoRA for a {site.kind} LoRA"
        if why:
            problems.append(f"{site}: {why}")
    if not sites and not problems:
        problems.append("its target_modules and target_parameters match no module or parameter of this model")
    if problems:
        _refuse(folder, model, problems)
    return sites, to_save


def _refuse(folder: Path, model: nn.Module, problems: list[str]) -> None:
    shown = "\n  - ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise AdapterFileError(
        f"the PEFT adapter at {folder} cannot be loaded exactly onto this {type(model).__name__}:\n  - {shown}\n"
        "a folder that does not fit was made for another model: load it onto the one it was trained on; "
        "a layer PEFT computes otherwise than lora_anywhere has no exact translation: train without it (exclude_modules)"
    )


@dataclass
class _Binding:
    """Where lora_anywhere keeps (part of) one PEFT LoRA: a rule target of a layer."""

    layer: str
    module: nn.Module
    target: Any  # rule.Target
    tensor: torch.Tensor
    rows: tuple[int, int]


def _bind(modules: dict[str, nn.Module], start: str, owner: str, tensor: str) -> list[_Binding]:
    """The rule targets that cover tensor `tensor` of module `owner`: the closest layer
    from `start` up whose rule offers the whole tensor, or row blocks tiling it."""
    reg = registry()
    weight = modules[owner]._parameters[tensor]
    layer = start
    while True:
        module = modules[layer]
        rule = reg.rule_for(module)
        relative = "" if owner == layer else owner[len(layer) + 1 :] if layer else owner
        found = [t for t in (rule.targets(module) if rule else ()) if t.owner == relative and t.tensor == tensor]
        whole = [t for t in found if t.rows is None]
        if whole:
            return [_Binding(layer, module, whole[0], weight, (0, weight.shape[0]))]
        blocks = sorted(found, key=lambda t: t.rows)
        if blocks and blocks[0].rows[0] == 0 and blocks[-1].rows[1] == weight.shape[0]:
            if all(x.rows[1] == y.rows[0] for x, y in zip(blocks, blocks[1:])):
                return [_Binding(layer, module, t, weight, t.rows) for t in blocks]
        if not layer:
            return []
        layer = layer.rpartition(".")[0]


def _translate(
    model: nn.Module,
    modules: dict[str, nn.Module],
    options: Options,
    sites: list[Site],
    to_save: list[str],
    tensors: dict[str, torch.Tensor],
    folder: Path,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The native config and tensors that compute what PEFT computes from these sites."""
    problems: list[str] = []
    layers: dict[str, LayerRecord] = {}
    native: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for site in sites:
        rank, scale = options.scale_of(site.key)
        for part in site.parts:
            found = _site_tensors(modules, options, site, part, rank, tensors, problems)
            used.update(site.keys(part))
            if found is None:
                continue
            owner, tensor = site.tensor(part)
            bindings = _bind(modules, site.module, owner, tensor)
            if not bindings:
                problems.append(
                    f"{site}: no lora_anywhere rule adapts {owner}.{tensor}; is the plugin for {type(modules[owner]).__name__} active? (`lora-anywhere plugins`)"
                )
                continue
            for binding in bindings:
                _record(layers, native, binding, *found, scale, problems)
    for module in to_save:
        for key in modules[module].state_dict():
            if f"{module}.{key}" in tensors:
                native[f"trainable/{module}.{key}"] = tensors[f"{module}.{key}"]
                used.add(f"{module}.{key}")
            else:
                problems.append(f"{module}.{key}: the file lacks this tensor of module to save {module}")
    problems += _unplaced(model, {k: v for k, v in tensors.items() if k not in used})
    if problems:
        _refuse(folder, model, problems)
    config = AdapterConfig(
        name="default",
        rank=options.r,
        alpha=options.alpha,
        dropout=options.dropout,
        route="auto",
        targets=[f"peft:{t}" for t in _listed(options.target_modules)] + [f"peft:{t}" for t in options.target_parameters],
        exclude=[f"peft:{t}" for t in _listed(options.exclude_modules)] or None,
        trainable=to_save,
        layers=layers,
        rslora=options.rslora,
        dora=options.dora,
        library_version=__version__,
    )
    return config, native


def _listed(names: list[str] | str | None) -> list[str]:
    return [] if names is None else [names] if isinstance(names, str) else names


def _site_tensors(
    modules: dict[str, nn.Module], options: Options, site: Site, part: str, rank: int, tensors: dict[str, torch.Tensor], problems: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(A, B, magnitude) of one PEFT LoRA in lora_anywhere's layout, or None (and a problem) if the file does not fit."""
    weight = site.weight(modules, part)
    rows, cols = weight.shape[0], weight[0].numel()
    expected = to_peft(site.kind, torch.empty(rank, cols, device="meta"), torch.empty(rows, rank, device="meta"), tuple(weight.shape))
    key_a, key_b, key_m = site.keys(part)
    ok = True
    for key, shape in zip((key_a, key_b), (e.shape for e in expected)):
        if key not in tensors:
            problems.append(f"{key}: missing from the file (PEFT expects it for {site})")
            ok = False
        elif tensors[key].shape != shape:
            problems.append(f"{key}: shape {tuple(tensors[key].shape)}, PEFT expects {tuple(shape)} for {site} at rank {rank}")
            ok = False
    magnitude = None
    if options.dora:
        magnitude = tensors.get(key_m)
        features = output_features(site.kind, tuple(weight.shape))
        if magnitude is None or magnitude.numel() != features:
            found = "missing" if magnitude is None else f"of shape {tuple(magnitude.shape)}"
            problems.append(f"{key_m}: DoRA magnitude {found}, PEFT expects {features} values for {site}")
            ok = False
    if not ok:
        return None
    a, b = from_peft(site.kind, tensors[key_a], tensors[key_b])
    if part == "out":
        if b.any():
            problems.append(f"{key_b}: {MHA_OUT_TWICE}")
        return None  # a zero update, whatever PEFT does with it
    return a, b, magnitude.reshape(-1) if magnitude is not None else None


def _record(
    layers: dict[str, LayerRecord],
    native: dict[str, torch.Tensor],
    binding: _Binding,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor | None,
    scale: float,
    problems: list[str],
) -> None:
    """Keep one PEFT LoRA's rows as a target of a native layer. A layer has one scale:
    a second LoRA with another scale on the same layer has the ratio folded into B."""
    rule = registry().rule_for(binding.module)
    base = attach.base_class(binding.module)
    record = layers.setdefault(
        binding.layer,
        LayerRecord(rule.name, f"{base.__module__}.{base.__qualname__}", "weight" if magnitude is not None else "auto", scale, {}),
    )
    t = binding.target
    if t.name in record.targets:
        problems.append(f"{binding.layer}:{t.name} would get two PEFT LoRAs")
        return
    start, stop = binding.rows
    factor = scale / record.scale
    prefix = f"lora/{binding.layer}/{t.name}"
    native[f"{prefix}/A"] = a.clone()
    native[f"{prefix}/B"] = b[start:stop] * factor if factor != 1.0 else b[start:stop].clone()
    if magnitude is not None:  # one per output feature: a whole layer's, or its block's rows
        native[f"{prefix}/m"] = (magnitude if t.rows is None else magnitude[start:stop]).clone()
    record.targets[t.name] = TargetRecord(t.owner, t.tensor, list(t.rows) if t.rows else None, list(binding.tensor.shape), a.shape[0])


def _unplaced(model: nn.Module, left: dict[str, torch.Tensor]) -> list[str]:
    """Problems for tensors in the file that no LoRA or module to save takes; a copy of
    a base tensor with the base's values (PEFT saves embeddings it adapts) is harmless."""
    state = {k: v for k, v in model.state_dict().items() if attach.ADAPTERS not in k.split(".")}
    problems = []
    for key, value in left.items():
        base_key = re.sub(r"\.base_layer(?=\.)", "", key)
        same = (
            base_key in state
            and state[base_key].shape == value.shape
            and torch.equal(state[base_key].cpu(), value.to(state[base_key].dtype))
        )
        if not same:
            problems.append(f"{key}: a tensor the config gives no place on this model (PEFT would skip it with a warning)")
    return problems
