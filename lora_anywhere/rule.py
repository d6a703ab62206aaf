"""What a rule is: everything lora_anywhere knows about one layer type.

A rule says which tensors of the layer it can adapt (each seen as a rows × rest
matrix, or a row block of one), and optionally how to run the layer with the
adapters applied to its activations. Rules are registered for layer types by
plugins (`registry`); this module depends on nothing else of the library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Target:
    """One matrix a rule can adapt.

    ``tensor`` names a parameter of the module at ``owner`` (a dotted path from the
    layer; "" is the layer itself). The matrix is ``tensor[rows].reshape(n, -1)``: rows
    of a Linear, output channels of a conv, input channels of a ConvTranspose, gate
    rows of an RNN weight, the q/k/v block of a packed attention projection.
    """

    name: str
    tensor: str
    owner: str = ""
    rows: tuple[int, int] | None = None


class Rule:
    """Base class of adapter rules. Subclasses override `targets` and, when the layer
    can be computed on its activations, `forward` and `prefers_activation`."""

    #: Stable name written into saved adapters, e.g. ``"torch.nn.Linear"``.
    name: str = ""

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        raise NotImplementedError

    #: Set by rules that implement `forward`: the layer type whose own forward it
    #: replaces. A subclass that overrides forward falls back to the weight route.
    activation_base: type | None = None

    def prefers_activation(self, layer: nn.Module, rank: int) -> bool:
        """Whether `y = layer(x) + s·B(A(x))` is cheaper than running with W + ΔW."""
        return True

    def output_dim(self, layer: nn.Module, target: Target) -> int:
        """The dimension of the target's tensor that indexes the layer's output
        features: 0 for a Linear or conv weight (out × in…), 1 where the tensor is
        stored the other way round (an Embedding's num × dim table, a weight kept
        in × out). DoRA learns one magnitude per output feature along it."""
        return 0

    def activation_saves_memory(self, layer: nn.Module) -> bool:
        """Whether the activation route keeps less for the backward than the weight
        route when A is frozen (LoRA-FA): then it saves no copy of the input."""
        return True

    def weight_cheaper_without_grad(self, layer: nn.Module, weight: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        """For a call under ``no_grad`` where nothing can be kept (inside a compiled
        graph, in a process group): whether forming W + ΔW for this call and running
        the layer's own forward costs less than adding ``s·B(A(x))`` on every row of
        these inputs. `weight` is the raw base tensor. Without a weight gradient to pay
        for, the weight route wins as soon as the layer sees enough rows."""
        return False

    def weight_cheaper_with_grad(self, layer: nn.Module, weight: torch.Tensor, rank: int, *args: Any, **kwargs: Any) -> bool:
        """For a training call of a layer on the activation route, with A trained and no
        dropout: whether this call is better served by W + ΔW and the layer's own
        forward (whose backward forms W's gradient, and A's and B's from it). True
        where the weight gradient is cheap enough that the activation route's extra
        kernels cost more than it saves. Both give the same numbers."""
        return False

    def forward(self, layer: nn.Module, weight: torch.Tensor, terms: Sequence[Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run `layer` with base weight `weight` and add each term ``scale · B(A(x))``.

        A term has ``a`` (r × cols of the weight's matrix view), ``b`` (rows × r),
        ``scale``, ``dropout(x)`` and ``dropout_active``.
        """
        raise NotImplementedError

    def layer_forward(self, layer: nn.Module, parts: Mapping[str, tuple[torch.Tensor, Sequence[Any]]], *args: Any, **kwargs: Any) -> Any:
        """A training call of a layer whose adapters all take the weight route, with them
        applied some cheaper way the layer's structure allows — or NotImplemented (the
        default) to run the layer's own forward on W + ΔW. Must give the same numbers.

        `parts` maps each adapted module below the layer (its path; "" is the layer) to
        its base weight and the live adapters' terms on it, as `forward` gets them. The
        core offers it only where every term can be applied on activations: plain LoRA,
        no dropout, no per-sample batch, no shard; with route "auto" a rule that has one
        keeps every module below its layer on the weight route for it
        (`plan.activation_owners`). (GCNConv aggregates A's r channels
        instead of its output's: on input features, which need no gradient, its
        backward then never runs the aggregation over the output's channels.)"""
        return NotImplemented

    def offers_layer_forward(self, layer: nn.Module) -> bool:
        """Whether `layer_forward` may run this layer's training calls: wherever the
        rule overrides it, unless the rule narrows it to the layers of its type that
        its cheaper way suits (ConvRule: depthwise convs with large kernels). Only
        such a layer takes the core's layer forward and the veto of
        `plan.activation_owners`."""
        return type(self).layer_forward is not Rule.layer_forward

    def stacks_samples(self, layer: nn.Module) -> bool:
        """Whether `forward` takes the adapters of a per-sample batch as one stacked
        term, applying ``term.mask_ranks`` to A's output before B (faster than one
        term per adapter, each with its samples' inputs selected by ``term.dropout``)."""
        return False

    def supports_activation(self, layer: nn.Module) -> bool:
        base = self.activation_base
        return base is not None and _forward_of(type(layer)) is base.forward

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def own_class(layer: nn.Module) -> type:
    """The layer's own class: an adapted layer runs as a subclass of it that the core
    makes (`attach.adapted_class`), whose forward is the core's."""
    return getattr(type(layer), "__lora_base__", type(layer))


def _forward_of(cls: type) -> Any:
    base = getattr(cls, "__lora_base__", cls)
    return base.forward


def rule_in_mro(rules: Mapping[type, Rule], module: nn.Module) -> Rule | None:
    """The rule registered for the module's class or its nearest base class, so that
    subclasses (``NonDynamicallyQuantizableLinear``) are covered by their base's rule."""
    for cls in type(module).__mro__:
        rule = rules.get(cls)
        if rule is not None:
            return rule
    return None
