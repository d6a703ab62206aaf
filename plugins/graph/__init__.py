"""lora_anywhere plugin for torch_geometric: rules for PyG's Linear, HeteroLinear and
every graph conv, the preset "graph-convs", and the model source "pyg"
(``pyg:GAT`` builds ``torch_geometric.nn.models.GAT`` with random weights).

Importing it without torch_geometric raises ModuleNotFoundError, which lists the
plugin as inactive.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch_geometric  # noqa: F401  # first: inactive when torch_geometric is missing
from torch import nn
from torch_geometric.nn import models
from torch_geometric.nn.conv import AntiSymmetricConv, GCNConv, MessagePassing
from torch_geometric.nn.dense import DenseGATConv, DenseGCNConv, DenseGINConv, DenseGraphConv, DenseSAGEConv
from torch_geometric.nn.dense.linear import HeteroDictLinear, HeteroLinear, Linear

from lora_anywhere import LoraError, hookimpl

from .rules import GCNConvRule, GraphLayerRule, HeteroLinearRule, PygLinearRule

__all__ = ["GCNConvRule", "GraphLayerRule", "HeteroLinearRule", "PygLinearRule", "build_model"]


@hookimpl
def lora_anywhere_register_rules(register: Callable[[type, Any], None]) -> None:
    register(Linear, PygLinearRule())
    register(HeteroLinear, HeteroLinearRule())
    register(MessagePassing, GraphLayerRule("torch_geometric.nn.MessagePassing"))
    register(GCNConv, GCNConvRule())
    # Not MessagePassing subclasses, but graph layers with weights of their own
    # (DenseGATConv's attention vectors, AntiSymmetricConv's W) or ones a user
    # selects by class name all the same.
    for cls in (AntiSymmetricConv, HeteroDictLinear, DenseGATConv, DenseGCNConv, DenseGINConv, DenseGraphConv, DenseSAGEConv):
        register(cls, GraphLayerRule(f"torch_geometric.nn.{cls.__name__}"))


@hookimpl
def lora_anywhere_register_presets(register: Callable[[str, Any], None]) -> None:
    # Every graph conv with the Linears inside it; not the model's heads or encoders.
    register("graph-convs", MessagePassing)


@hookimpl
def lora_anywhere_register_model_sources(register: Callable[[str, Callable[..., nn.Module]], None]) -> None:
    register("pyg", build_model)


#: Small sizes for the models' usual arguments, used where the caller gives none.
DEFAULTS: dict[str, Any] = {"in_channels": 16, "hidden_channels": 32, "num_layers": 2, "out_channels": 4}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """``torch_geometric.nn.models.<name>(**kwargs)`` with random weights, filling
    in `DEFAULTS` for the arguments the constructor takes and the caller left out.
    PNA also gets mean/min/max/std aggregators, the three degree scalers and a flat
    degree histogram, which it cannot be built without."""
    cls = getattr(models, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        known = sorted(n for n in models.__all__ if isinstance(getattr(models, n, None), type))
        raise LoraError(f"pyg has no model {name!r}; torch_geometric.nn.models offers {', '.join(known)}")
    params = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in DEFAULTS.items() if k in params and k not in kwargs}
    if issubclass(cls, models.PNA):
        args.setdefault("aggregators", ["mean", "min", "max", "std"])
        args.setdefault("scalers", ["identity", "amplification", "attenuation"])
        args.setdefault("deg", torch.ones(8, dtype=torch.long))
    return cls(**{**args, **kwargs})
