"""PEFT's LoRA layers as lora_anywhere needs to know them, reproduced from PEFT's
source (0.21) so that neither direction imports PEFT: which layer PEFT gives a module,
where its tensors sit in a saved file and how they are laid out, how PEFT matches
module and parameter names, and where what PEFT computes is no update ΔW = s·B@A of
the tensor lora_anywhere would adapt — the cases no translation can make exact.
`peft_format` translates with them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from . import attach
from .plan import _hook_weight_norm

# PEFT's LoRA layer kinds, and the raw parameters it reaches with target_parameters.
LINEAR, CONV1D, CONV, EMBEDDING, MHA, PARAMETER = "Linear", "Conv1D", "Conv", "Embedding", "MultiheadAttention", "parameter"
#: PEFT's LoRA kinds with a DoRA. Both libraries keep one magnitude per output feature:
#: a row of a Linear or conv weight, a column of an Embedding table or a Conv1D weight.
DORA_KINDS = (LINEAR, CONV, EMBEDDING, CONV1D)
#: Kinds whose stored weight has its output features along dim 1 (the transposed ones).
OUTPUT_COLUMNS = (EMBEDDING, CONV1D)
#: Parents that read a child's weight themselves instead of calling the child, so a
#: PEFT wrapper around the child never runs: class (import path) → child names.
#: (nn.MultiheadAttention's out_proj goes through PEFT's own MultiheadAttention layer;
#: TransformerEncoderLayer's fast path, taken in eval mode, reads its children's weights.)
BYPASSING_PARENTS = {
    "torch.nn.modules.activation.MultiheadAttention": ("out_proj",),
    "torch.nn.modules.transformer.TransformerEncoderLayer": ("self_attn", "linear1", "linear2"),
    "timm.models.eva.EvaAttention": ("qkv",),
    "timm.models.beit.Attention": ("qkv",),
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("qkv", "proj"),
}
#: PEFT (0.21.2 and before: huggingface/peft#3774) adds the out_proj LoRA of a
#: MultiheadAttention twice, unmerged and merged, so its numbers depend on the version.
MHA_OUT_TWICE = (
    "PEFT adds a MultiheadAttention's out_proj LoRA twice (up to 0.21.2 at least, huggingface/peft#3774), "
    "so what it computes depends on its version"
)


# ------------------------------------------------------------------ PEFT's layers


@dataclass(frozen=True)
class Site:
    """One place where PEFT keeps a LoRA: a module it wraps, or a parameter it reaches
    through target_parameters (``parameter`` names it; ``depth`` counts the
    ParamWrappers PEFT puts around this one, for parameters of the same module that
    come later)."""

    kind: str
    module: str
    parameter: str = ""
    depth: int = 0

    @property
    def key(self) -> str:
        """The name PEFT matches ``rank_pattern`` and ``alpha_pattern`` against."""
        return f"{self.module}.{self.parameter}" if self.parameter else self.module

    @property
    def parts(self) -> tuple[str, ...]:
        """PEFT's MultiheadAttention layer holds two LoRAs: on in_proj_weight and on out_proj."""
        return ("in", "out") if self.kind == MHA else ("",)

    def keys(self, part: str = "") -> tuple[str, str, str]:
        """The file keys (without PEFT's prefix) of this LoRA's A, B and DoRA magnitude."""
        if self.kind == MHA and part == "out":
            prefix = f"{self.module}.base_layer.out_proj."
        else:
            prefix = f"{self.module}." + "base_layer." * self.depth
        if self.kind == EMBEDDING:
            return f"{prefix}lora_embedding_A", f"{prefix}lora_embedding_B", f"{prefix}lora_magnitude_vector"
        return f"{prefix}lora_A.weight", f"{prefix}lora_B.weight", f"{prefix}lora_magnitude_vector"

    def tensor(self, part: str = "") -> tuple[str, str]:
        """The module holding the base tensor this LoRA updates, and the tensor's name."""
        if self.kind == MHA:
            return (f"{self.module}.out_proj".lstrip("."), "weight") if part == "out" else (self.module, "in_proj_weight")
        return self.module, self.parameter or "weight"

    def weight(self, modules: dict[str, nn.Module], part: str = "") -> nn.Parameter:
        """The raw base tensor this LoRA updates."""
        owner, tensor = self.tensor(part)
        return modules[owner]._parameters[tensor]

    def __str__(self) -> str:
        return f"{self.key} ({self.kind})"


def module_kind(module: nn.Module) -> str | None:
    """PEFT's LoRA layer for this module, in PEFT's dispatch order; None where it has none."""
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.MultiheadAttention):
        return MHA
    if isinstance(module, nn.Linear):
        return LINEAR
    if any(f"{c.__module__}.{c.__qualname__}" == "transformers.pytorch_utils.Conv1D" for c in type(module).__mro__):
        return CONV1D
    return None


def why_inexact(modules: dict[str, nn.Module], shared: dict[int, list], site: Site) -> str | None:
    """Why PEFT's LoRA at `site` is no update ΔW = s·B@A of the tensor lora_anywhere
    would adapt (so no translation can be exact), or None where it is."""
    if not site.module:
        return "PEFT cannot adapt the model's root module itself; wrap the model in a container module"
    return "; ".join(_inexact(modules, shared, site)) or None


def _inexact(modules: dict[str, nn.Module], shared: dict[int, list], site: Site) -> Iterator[str]:
    module = modules[site.module]
    if site.kind == CONV:
        if module.groups > 1:
            yield (
                f"a grouped conv (groups={module.groups}): PEFT's LoRA A is an ungrouped conv that mixes channels across "
                "groups, PEFT cannot merge it, and an exact copy would need rank groups × r"
            )
        if any(d != 1 for d in module.dilation):
            yield f"PEFT's LoRA conv ignores the layer's dilation={tuple(module.dilation)}, so its unmerged outputs are no update of the weight"
        if module.padding_mode != "zeros" and module.padding != "valid" and any(_tuple(module.padding)):
            yield f"PEFT's LoRA conv pads with zeros, the layer with padding_mode={module.padding_mode!r}"
    if site.kind == EMBEDDING and module.max_norm is not None:
        yield f"PEFT renormalises its own LoRA table (max_norm={module.max_norm}) instead of the adapted rows"
    if site.kind == MHA and not module._qkv_same_embed_dim:
        yield "PEFT's MultiheadAttention LoRA needs q, k and v of one size (kdim = vdim = embed_dim)"
    tensor_name = "in_proj_weight" if site.kind == MHA else (site.parameter or "weight")
    tensor = module._parameters.get(tensor_name)
    if tensor is not None and is_lazy(tensor):
        yield f"its {tensor_name} is not materialised yet (a lazy layer): run one forward pass with a real input first"
        return
    if tensor is None or parametrize.is_parametrized(module, tensor_name) or _hook_weight_norm(module, tensor_name):
        yield f"its {tensor_name} is weight-normed (or parametrized): PEFT adds its update after the norm, lora_anywhere adapts the tensor under it"
    elif site.kind == PARAMETER and tensor.dim() != 2:
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            yield "PEFT has no LoRA for ConvTranspose layers"
        else:
            yield (
                f"a {tensor.dim()}-D tensor: PEFT's target_parameters reads it as stacked experts, each with an update of its own, "
                "where lora_anywhere's low-rank update spans them all"
            )
    holders = [m for m, _ in shared.get(id(tensor), ()) if m is not module] if tensor is not None else []
    if holders:
        yield (
            f"its {tensor_name} is shared with another module ({type(holders[0]).__name__}; tied weights): PEFT changes the outputs of one holder only, "
            "lora_anywhere every reader of the tensor"
        )
    bypass = _bypassed_by(modules, site.module)
    if bypass:
        yield f"{bypass} reads {site.module}'s weight itself, so PEFT's wrapper around {site.module} would never run"


def why_not_saved(modules: dict[str, nn.Module], shared: dict[int, list], name: str) -> str | None:
    """Why PEFT's copy of module `name` (a module to save) would compute otherwise than
    training the module itself, or None."""
    if not name:
        return "PEFT cannot save the model's root module as a module to save"
    inside = {id(m) for m in modules[name].modules()}
    for tensor in modules[name].parameters():
        outside = [m for m, _ in shared.get(id(tensor), ()) if id(m) not in inside]
        if outside:
            return (
                f"its parameters are shared with a module outside it ({type(outside[0]).__name__}; tied weights): "
                f"PEFT trains and saves a copy of {name}, which unties them"
            )
    return None


def _bypassed_by(modules: dict[str, nn.Module], name: str) -> str | None:
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or not child:
        return None
    for cls in type(parent).__mro__:
        if child in BYPASSING_PARENTS.get(f"{cls.__module__}.{cls.__qualname__}", ()):
            return f"its parent {parent_name or '<root>'} ({type(parent).__name__})"
    return None


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by name, without lora_anywhere's adapters: the names a plain base has."""
    return {n: m for n, m in model.named_modules() if attach.ADAPTERS not in n.split(".")}


# ------------------------------------------------------------------ layouts


def to_peft(kind: str, a: torch.Tensor, b: torch.Tensor, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_anywhere's (A, B) of ΔM = B @ A on the tensor's matrix view → PEFT's lora_A, lora_B.

    transformers' Conv1D and Embedding store their weight transposed to how PEFT's
    LoRA computes (in × out, and tokens × dim), so there A and B trade places."""
    if kind in (CONV1D, EMBEDDING):
        return b.T.contiguous(), a.T.contiguous()
    if kind == CONV:
        rank = a.shape[0]
        return a.reshape(rank, *weight_shape[1:]), b.reshape(b.shape[0], rank, *(1,) * (len(weight_shape) - 2))
    return a, b


def from_peft(kind: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_A, lora_B → lora_anywhere's (A, B) on the tensor's matrix view."""
    if kind in (CONV1D, EMBEDDING):
        return b.T.contiguous(), a.T.contiguous()
    if kind == CONV:
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return a, b


def output_features(kind: str, weight_shape: tuple[int, ...]) -> int:
    """How many DoRA magnitudes a PEFT LoRA of `kind` on a weight of this shape has."""
    return weight_shape[1] if kind in OUTPUT_COLUMNS else weight_shape[0]


def base_magnitude(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output feature: the magnitude of a DoRA whose update is zero."""
    w = weight.detach()
    return w.norm(dim=0) if kind in OUTPUT_COLUMNS else w.reshape(w.shape[0], -1).norm(dim=1)


def magnitude_to_peft(kind: str, m: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """DoRA's magnitude per output row; PEFT keeps a conv's as 1 × out × 1 ×…"""
    return m.reshape(1, -1, *(1,) * (len(weight_shape) - 2)) if kind == CONV else m


# ------------------------------------------------------------------ PEFT's name matching


@dataclass
class Options:
    """The parts of a PEFT LoraConfig that decide what is adapted and how."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_parameters: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)

    def selects(self, key: str) -> bool:
        """PEFT's `check_target_module_exists`: whether module `key` gets a LoRA."""
        excluded = self.exclude_modules
        if excluded:
            if isinstance(excluded, str):
                if re.fullmatch(excluded, key):
                    return False
            elif key in excluded or any(key.endswith(f".{e}") for e in excluded):
                return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save):
            return False  # PEFT never puts a LoRA where a module to save is
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            return re.fullmatch(targets, key) is not None
        if key in targets:
            return True  # a listed full name ignores layers_to_transform, as in PEFT
        found = any(key.endswith(f".{t}") for t in targets)
        layers = self.layers_to_transform
        if found and layers is not None and (not isinstance(layers, list) or layers):
            index = _layer_index(key, self.layers_pattern)
            found = index is not None and (index == layers if isinstance(layers, int) else index in layers)
        return found

    def scale_of(self, key: str) -> tuple[int, float]:
        """The rank and scale PEFT gives the LoRA named `key` (rank_pattern, alpha_pattern, rsLoRA)."""
        rank = int(_pattern_value(self.rank_pattern, key, self.r))
        alpha = float(_pattern_value(self.alpha_pattern, key, self.alpha))
        return rank, alpha / (math.sqrt(rank) if self.rslora else rank)


def _layer_index(key: str, patterns: list[str] | None) -> int | None:
    """The layer number PEFT reads from a module name for layers_to_transform."""
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the value of the first pattern matching the end of `key`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def parameter_sites(modules: dict[str, nn.Module], targets: list[str]) -> Iterator[Site]:
    """PEFT's `_inject_parameters`: every parameter a target_parameters entry names
    (the full name, or a name ending in "." + entry), each module's in registration
    order (a parametrized module's: by exact name, in sorted order). PEFT wraps each
    around the ones before it, so the last is the outermost."""
    wanted = sorted(set(targets))
    for name, module in modules.items():
        if hasattr(module, "parametrizations"):
            found = []
            for key in wanted:
                owner, _, param = key.rpartition(".")
                if owner == name and getattr(module, param, None) is not None:
                    found.append(param)
        else:
            found = [
                p
                for p, _ in module.named_parameters(recurse=False)
                if (key := f"{name}.{p}") in wanted or any(key.endswith(f".{t}") for t in wanted)
            ]
        for i, p in enumerate(found):
            yield Site(PARAMETER, name, p, depth=len(found) - 1 - i)


def suffix_names(chosen: list[str], all_names: Iterator[str] | list[str]) -> list[str]:
    """The shortest name endings that PEFT's list matching (a name equal to an entry,
    or ending in "." + entry) maps onto exactly the modules `chosen`: ["query",
    "value"] rather than every full name, and a full name where a short one would
    also catch a module that is not chosen."""
    chosen_set, names = set(chosen), [n for n in all_names if n]
    out: set[str] = set()
    for name in chosen:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if all(n in chosen_set for n in names if n == suffix or n.endswith(f".{suffix}")):
                out.add(suffix)
                break
    return sorted(out)


def anchored(key: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT matches to the module `key` alone."""
    return f"^{re.escape(key)}"


def to_save_matches(all_names: list[str], entries: list[str]) -> list[str]:
    """PEFT's `_set_trainable`: every module whose name ends with an entry (no dot needed)."""
    return [n for n in all_names if n and any(n.endswith(e) for e in entries)]
