"""Penalties on the adapters, for a regularised objective: loss + λ·penalty.

Each penalty is a function ``penalty(model) -> scalar tensor`` with gradients to the
adapters, so it works in a hand-written loop (``loss = task_loss + 0.01 *
delta_frobenius(model)``) and in the trainer (``Trainer(..., regularizer=penalty,
regularizer_weight=0.01)``). Norms of ΔW = s·B·A are computed through r×r products, never by
forming ΔW.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ..adapter import LowRank, ResolvedTarget
from ..errors import LoraError, TargetError
from ..state import adapted_layers

Penalty = Callable[[nn.Module], torch.Tensor]


def _factors(model: nn.Module, name: str | None) -> Iterator[tuple[str, ResolvedTarget, LowRank]]:
    found = False
    for layer_name, _, adapters in adapted_layers(model):
        for aname, adapter in adapters.items():
            if (name is None and adapter.live) or aname == name:
                for t in adapter.targets.values():
                    found = True
                    yield f"{layer_name}/{t.name}", t, adapter.factors[t.name]
    if not found:
        raise LoraError("the model has no live adapter to regularise; call lora_anywhere.apply(model) first")


def _squared_norm(f: LowRank) -> torch.Tensor:
    a, b = f.pair()
    # ‖s·B·A‖²_F = s²·tr((AAᵀ)(BᵀB)): two r×r Gram matrices.
    return f.scale**2 * ((a @ a.T) * (b.T @ b)).sum()


def delta_frobenius(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """Σ ‖ΔW‖²_F over every adapted matrix (of adapter `name`, or of every live one)."""
    return torch.stack([_squared_norm(f) for _, _, f in _factors(model, name)]).sum()


def _target_matrix(key: str, t: ResolvedTarget, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    rows, cols = t.matrix_shape
    if value.numel() != rows * cols:
        raise TargetError(
            f"target matrix for {key} has shape {tuple(value.shape)}; it must hold {rows}×{cols} values (the matrix view of {t.tensor})"
        )
    return value.reshape(rows, cols).to(like)


def delta_distance(targets: Mapping[str, torch.Tensor], name: str | None = None) -> Penalty:
    """A penalty Σ ‖ΔW − T‖²_F for the given target matrices, keyed ``"layer/target"``
    as in `adapter_state_dict` (``"encoder.0/weight"``, ``"attn/q"``); T may be given in
    the tensor's shape or its matrix view. Adapted matrices without a T are not
    penalised."""

    def penalty(model: nn.Module) -> torch.Tensor:
        terms, used = [], set()
        for key, t, f in _factors(model, name):
            if key not in targets:
                continue
            used.add(key)
            a, b = f.pair()
            target = _target_matrix(key, t, targets[key], a)
            # ‖sBA − T‖² = ‖sBA‖² − 2s⟨BA, T⟩ + ‖T‖², with ⟨BA, T⟩ = Σ (BᵀT) ⊙ A.
            terms.append(_squared_norm(f) - 2 * f.scale * ((b.T @ target) * a).sum() + target.pow(2).sum())
        unknown = sorted(set(targets) - used)
        if unknown:
            raise TargetError(
                f"delta_distance: no adapted matrix named {', '.join(unknown)}; keys look like 'layer/target', e.g. 'encoder.0/weight'"
            )
        return torch.stack(terms).sum()

    return penalty


def factor_distance(targets: Mapping[str, torch.Tensor], factor: str = "A", name: str | None = None) -> Penalty:
    """A penalty Σ ‖F − T‖²_F pulling factor A (r × cols) or B (rows × r) towards given
    matrices, keyed ``"layer/target"``."""
    if factor not in ("A", "B"):
        raise LoraError(f"factor must be 'A' or 'B', got {factor!r}")

    def penalty(model: nn.Module) -> torch.Tensor:
        terms, used = [], set()
        for key, _, f in _factors(model, name):
            if key in targets:
                used.add(key)
                value = getattr(f, factor)
                target = targets[key].to(value)
                if target.shape != value.shape:
                    raise TargetError(f"factor_distance: {key} {factor} has shape {tuple(value.shape)}, the target {tuple(target.shape)}")
                terms.append((value - target).pow(2).sum())
        unknown = sorted(set(targets) - used)
        if unknown:
            raise TargetError(f"factor_distance: no adapted matrix named {', '.join(unknown)}")
        return torch.stack(terms).sum()

    return penalty
