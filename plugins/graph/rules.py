"""Adapter rules for torch_geometric layers.

PyG's ``Linear`` is its own class (not an ``nn.Linear``), may be lazy and has a
custom state_dict, so it gets its own rule. A graph conv usually keeps its matrices
in child ``Linear`` modules, sometimes as parameters of its own (attention vectors,
relation weights); one rule on the conv claims both, through owner paths, so that
selecting a conv by class name ("GATConv") adapts everything in it.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm
from torch_geometric.nn.conv import GCNConv, MessagePassing
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.nn.dense.linear import Linear

from lora_anywhere import LinearRule, Rule, Target
from lora_anywhere.rule import own_class
from lora_anywhere.rules.torch_nn import linear_rows

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


class GCNConvRule(GraphLayerRule):
    """GCNConv, ``out = Â·lin(x) + bias`` with Â the normalised adjacency: an
    aggregation linear in lin's output, so ``Â·x(W + s·BA)ᵀ = Â·xWᵀ + s·(Â·xAᵀ)Bᵀ``.

    On input features, which need no gradient (a GCN's first conv), the conv runs that
    way: the frozen product and its aggregation over the output's channels then need no
    backward at all, and the adapter's gradient runs through an aggregation of A's r
    channels. Full fine-tuning pays that backward, and so did LoRA on W + ΔW; the BitFit
    floor does not. Everywhere else (an input that needs a gradient, a conv too narrow
    for it to save work, another aggregation, hooks on the conv's message passing, a
    subclass with a forward or messages of its own) the conv runs on W + ΔW like every
    other graph conv. Its targets and saved name are `GraphLayerRule`'s: adapters saved
    before load unchanged."""

    def __init__(self) -> None:
        super().__init__("torch_geometric.nn.MessagePassing")

    def layer_forward(  # type: ignore[override]
        self, layer: nn.Module, parts: Mapping[str, tuple[Tensor, Sequence[Any]]], x: Any, edge_index: Any, edge_weight: Any = None
    ) -> Any:
        if set(parts) != {"lin"} or not isinstance(x, Tensor) or x.requires_grad or not isinstance(edge_index, Tensor):
            return NotImplemented
        if not _aggregates_linearly(layer):
            return NotImplemented
        weight, terms = parts["lin"]
        if not _aggregating_rank_is_cheaper(x, edge_index, weight, sum(t.a.shape[0] for t in terms)):
            return NotImplemented
        edge_index, edge_weight = _normalized(layer, x, edge_index, edge_weight)
        out = layer.propagate(edge_index, x=F.linear(x, weight, layer.lin.bias), edge_weight=edge_weight)
        if len(terms) == 1:
            a, b, scale = terms[0].a, terms[0].b, terms[0].scale
        else:
            a, b, scale = torch.cat([t.a for t in terms]), torch.cat([t.b * t.scale for t in terms], dim=1), 1.0
        low = layer.propagate(edge_index, x=F.linear(x, a), edge_weight=edge_weight)
        # s·(Â·xAᵀ)Bᵀ and the sum as one op, in the aggregation's dtype: under autocast
        # it would cast both aggregations and B, there and back.
        with torch.autocast(x.device.type, enabled=False):
            b = b.to(out.dtype)
            if out.dim() == 2:
                out = torch.addmm(out, low.to(out.dtype), b.t(), alpha=scale)
            else:
                out = out + (low.to(out.dtype) @ b.t()) * scale
        return out if layer.bias is None else out + layer.bias


#: MessagePassing's hooks on the steps of a propagation: GCNConvRule's forward
#: propagates twice, so a conv with any of them runs on W + ΔW instead.
_PROPAGATION_HOOKS = tuple(
    f"_{step}_forward{kind}_hooks" for step in ("propagate", "message", "aggregate", "message_and_aggregate") for kind in ("", "_pre")
)
_LINEAR_STEPS = ("forward", "propagate", "message", "aggregate", "message_and_aggregate", "update")


def _aggregates_linearly(conv: nn.Module) -> bool:
    """Whether this GCNConv's propagation is GCNConv's own weighted sum or mean of
    messages, with nothing hooked into it."""
    cls = own_class(conv)
    if any(getattr(cls, name) is not getattr(GCNConv, name) for name in _LINEAR_STEPS):
        return False
    if any(getattr(conv, name, None) for name in _PROPAGATION_HOOKS) or getattr(conv, "explain", False):
        return False
    return isinstance(conv.aggr, str) and conv.aggr in ("add", "sum", "mean")


def _aggregating_rank_is_cheaper(x: Tensor, edge_index: Tensor, weight: Tensor, rank: int) -> bool:
    """Whether aggregating A's `rank` channels costs less than W + ΔW's backward: that
    saves W's gradient (rows·in·out) and the aggregation of the output's channels
    (edges·out), and costs A's projection and gradient, B's terms (rows·rank·(2·in +
    3·out)) and the aggregation of the rank's channels, there and back. Counted in
    multiply-adds, which favours W + ΔW: an aggregation's scatter costs more per
    element than a matmul. A narrow conv (Cora's 1433 → 16 at rank 8) stays on W + ΔW."""
    rows = linear_rows(x)
    edges = edge_index.shape[-1] if edge_index.layout == torch.strided else edge_index._nnz()  # a sparse adjacency: its entries
    out, cols = weight.shape
    saved = rows * cols * out + edges * out
    spent = rows * rank * (2 * cols + 3 * out) + 2 * edges * rank
    return spent < saved


def _normalized(conv: nn.Module, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The edges and weights GCNConv's forward propagates over: normalised (Â) unless
    the conv says not to, and cached where it caches them, as its forward does."""
    if not conv.normalize:
        return edge_index, edge_weight
    if conv._cached_edge_index is not None:
        return conv._cached_edge_index
    edge_index, edge_weight = gcn_norm(
        edge_index, edge_weight, x.size(conv.node_dim), conv.improved, conv.add_self_loops, conv.flow, x.dtype
    )
    if conv.cached:
        conv._cached_edge_index = (edge_index, edge_weight)
    return edge_index, edge_weight


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
