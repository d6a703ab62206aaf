"""Adapter rules for torch_geometric layers.

PyG's ``Linear`` is its own class (not an ``nn.Linear``), may be lazy and has a
custom state_dict, so it gets its own rule. A graph conv usually keeps its matrices
in child ``Linear`` modules, sometimes as parameters of its own (attention vectors,
relation weights); one rule on the conv claims both, through owner paths, so that
selecting a conv by class name ("GATConv") adapts everything in it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.dense.linear import Linear

from lora_anywhere import LinearRule, Rule, Target

#: Modules a conv rule leaves to their own rules: nested convs (their rule claims
#: what is inside them), and layers whose core rule sees their weights differently
#: (q/k/v blocks of an attention, an RNN's flat weights).
_OWN_RULE = (MessagePassing, nn.MultiheadAttention, nn.RNNBase)


class PygLinearRule(LinearRule):
    """torch_geometric's ``Linear``: y = x Wᵀ + b, like ``nn.Linear``, so the core's
    (fused) activation route is exact for it too. A lazy one (``in_channels=-1``) has
    no weight until its first forward; the core then refuses it."""

    name = "torch_geometric.nn.Linear"
    activation_base = Linear


class HeteroLinearRule(Rule):
    """``HeteroLinear`` keeps one in × out matrix per type in ``weight``
    (types × in × out, multiplied as ``x @ weight[t]``) and a per-type bias table
    ``bias`` (types × out, looked up as ``bias[type_vec]``).

    The core sees a tensor as ``rows × rest`` with rows its first dimension, so the
    update of ``weight`` is ``ΔW[t] = Σ_k B[t, k] · A_k``: every type mixes the same
    r in × out matrices A_k with its own coefficients — the basis decomposition RGCN
    uses for its relation weights, applied to the update (rank ≤ number of types).
    The bias table is a types × out matrix like an embedding table, and gets a
    low-rank update too. Both are read by the forward each time, so the weight route
    is exact. Without pyg-lib's segment_matmul that forward reads ``weight[t]`` once
    per type; the core forms W + ΔW once per forward call all the same."""

    name = "torch_geometric.nn.HeteroLinear"

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return tuple(Target(n, n) for n in ("weight", "bias") if layer._parameters.get(n) is not None)


class GraphLayerRule(Rule):
    """A graph conv (any ``MessagePassing``) or another PyG layer that holds weights:
    every matrix inside it — its own ≥2-D parameters and those of the modules below
    it — except inside nested convs, attentions and RNNs, which have rules of their
    own. Claiming the children through owner paths is what makes
    ``targets="GATConv"`` adapt the conv's ``lin`` too. All of it runs on the weight
    path: whoever reads a tensor (the conv's ``message``, a child's forward, a fused
    kernel) sees W + ΔW.

    Target names are the attribute paths with "." as "_", and a child Linear
    ``lin_X`` is just ``X``: GATConv has ``lin`` (or ``src``/``dst`` on bipartite
    input), ``att_src``, ``att_dst``, ``edge``, ``att_edge``, ``res``;
    TransformerConv ``query``, ``key``, ``value``, ``edge``, ``skip``, ``beta``;
    GINConv ``nn_0``, ``nn_2``; RGCNConv ``weight``, ``comp``, ``root``.

    Tensors with more than two dimensions are seen as ``first dim × rest``:
    GAT's attention vectors (1 × heads × C) become 1 × heads·C — a rank-1 matrix, so
    the update is simply a new vector; RGCNConv's ``weight`` (relations × in × out,
    or bases × in × out with ``comp`` the relations × bases mixing matrix) gets
    ``ΔW[r] = Σ_k B[r, k] · A_k``, RGCN's own basis decomposition applied to the
    update, with rank ≤ the number of relations (or bases). Bias vectors stored as
    1 × … × C tensors (ARMAConv) are left alone, as biases are elsewhere.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        found = [(path, tensor) for path, module in _owners(layer) for tensor in _matrices(module)]
        return _named(found)


def _owners(layer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The layer and every module below it whose tensors the layer's rule claims,
    each once, in `named_modules` order."""
    seen = {id(layer)}
    stack: list[tuple[str, nn.Module]] = [("", layer)]
    while stack:
        path, module = stack.pop()
        yield path, module
        children = []
        for name, child in module._modules.items():
            if child is None or id(child) in seen or isinstance(child, _OWN_RULE):
                continue
            if type(child).__module__.split(".")[0] == "lora_anywhere":
                continue  # adapters already on the layer
            if name == "parametrizations" and parametrize.is_parametrized(module):
                continue  # reached through the parametrized name instead
            seen.add(id(child))
            children.append((f"{path}.{name}" if path else name, child))
        stack.extend(reversed(children))


def _matrices(module: nn.Module) -> list[str]:
    """Names of the module's matrix tensors as its forward reads them: a
    parametrized or weight-normed weight by its own name (the core adapts the
    tensor underneath), a lazy one too (the core then asks for a forward first)."""
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += list(module.parametrizations.keys())
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            names = [n for n in names if n not in (f"{hook.name}_g", f"{hook.name}_v")] + [hook.name]
    out = []
    for n in names:
        p = module._parameters.get(n)
        if p is not None and is_lazy(p):
            out.append(n)
            continue
        shape = getattr(module, n).shape
        if len(shape) < 2:
            continue
        if n.endswith("bias") and sum(d > 1 for d in shape) < 2:
            continue
        out.append(n)
    return out


def _named(found: list[tuple[str, str]]) -> tuple[Target, ...]:
    """Targets with short names: the dotted path as "a_b", a child ``lin_X`` as X,
    unless that would clash with another name."""
    full = [_full_name(path, tensor) for path, tensor in found]
    short = [n[4:] if n.startswith("lin_") and len(n) > 4 else n for n in full]
    names = [s if short.count(s) == 1 and (s == f or s not in full) else f for s, f in zip(short, full)]
    return tuple(Target(name, tensor, owner=path) for name, (path, tensor) in zip(names, found))


def _full_name(path: str, tensor: str) -> str:
    if not path:
        return tensor
    parts = path.split(".")
    return "_".join(parts if tensor == "weight" else [*parts, tensor])
