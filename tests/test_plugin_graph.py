"""The graph plugin: exact adapters on a zoo of real torch_geometric layers and models,
class-name and part targets, PyG's lazy and custom-state_dict Linear, the "pyg"
model source, and the plugin being inactive without torch_geometric."""

from __future__ import annotations

import copy
import importlib
import sys
from typing import Any, Callable

import pytest
import torch
from torch import nn

import lora_anywhere as la
from lora_anywhere.models import build_model
from lora_anywhere.rule import own_class
from lora_anywhere.testing import check_exact, randomize_adapters

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import (  # noqa: E402
    APPNP,
    AntiSymmetricConv,
    ChebConv,
    EdgeConv,
    GATConv,
    GatedGraphConv,
    GATv2Conv,
    GCNConv,
    GENConv,
    GINConv,
    GINEConv,
    GraphConv,
    HeteroConv,
    HeteroDictLinear,
    HeteroLinear,
    HGTConv,
    Linear,
    PNAConv,
    ResGatedGraphConv,
    RGCNConv,
    SAGEConv,
    SGConv,
    TransformerConv,
    to_hetero,
)
from torch_geometric.nn.dense import DenseGATConv, DenseGCNConv, DenseGINConv, DenseGraphConv, DenseSAGEConv  # noqa: E402

NODES, EDGES, FEATURES, EDGE_DIM, RELATIONS = 30, 100, 16, 3, 3


def graph(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(NODES, FEATURES, generator=gen),
        "edge_index": torch.randint(0, NODES, (2, EDGES), generator=gen),
        "edge_attr": torch.randn(EDGES, EDGE_DIM, generator=gen),
        "edge_type": torch.randint(0, RELATIONS, (EDGES,), generator=gen),
        "type_vec": torch.randint(0, RELATIONS, (NODES,), generator=gen),
    }


G = graph()


class Net(nn.Module):
    """A conv inside a model, called the way its kind needs: the rule's owner paths
    then start below a non-root layer, as in real models."""

    def __init__(self, conv: nn.Module, extra: str = "") -> None:
        super().__init__()
        self.conv = conv
        self.extra = extra

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        if self.extra == "edge_attr":
            return self.conv(x, edge_index, edge_attr)
        if self.extra == "edge_type":
            return self.conv(x, edge_index, edge_type)
        if self.extra == "pair":
            return self.conv((x, x.flip(0)), edge_index)
        return self.conv(x, edge_index)


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def weight_normed_mlp() -> nn.Sequential:
    net = mlp(FEATURES, 32, 32)
    nn.utils.parametrizations.weight_norm(net[0])
    return net


AGG = dict(
    aggregators=["mean", "min", "max", "std"],
    scalers=["identity", "amplification", "attenuation"],
    deg=torch.tensor([0, 3, 6, 8, 5, 4, 2, 1, 1]),
)

CONVS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "GCNConv": (lambda: GCNConv(FEATURES, 32), ""),
    "GATConv(edge_dim, residual)": (lambda: GATConv(FEATURES, 8, heads=2, edge_dim=EDGE_DIM, residual=True), "edge_attr"),
    "GATConv(bipartite)": (lambda: GATConv((FEATURES, FEATURES), 8, heads=2), "pair"),
    "GATv2Conv(edge_dim)": (lambda: GATv2Conv(FEATURES, 8, heads=2, edge_dim=EDGE_DIM), "edge_attr"),
    "GATv2Conv(share_weights)": (lambda: GATv2Conv(FEATURES, 8, heads=2, share_weights=True), ""),
    "SAGEConv(project)": (lambda: SAGEConv(FEATURES, 32, project=True), ""),
    "GINConv": (lambda: GINConv(mlp(FEATURES, 32, 32), train_eps=True), ""),
    "GINConv(weight_norm)": (lambda: GINConv(weight_normed_mlp()), ""),
    "GINEConv": (lambda: GINEConv(mlp(FEATURES, 32, 32), edge_dim=EDGE_DIM), "edge_attr"),
    "GraphConv": (lambda: GraphConv(FEATURES, 32), ""),
    "TransformerConv(edge_dim, beta)": (lambda: TransformerConv(FEATURES, 8, heads=2, edge_dim=EDGE_DIM, beta=True), "edge_attr"),
    "ChebConv": (lambda: ChebConv(FEATURES, 32, K=3), ""),
    "ResGatedGraphConv": (lambda: ResGatedGraphConv(FEATURES, 32), ""),
    "GENConv(edge_dim)": (lambda: GENConv(FEATURES, 32, edge_dim=EDGE_DIM, learn_t=True, num_layers=2), "edge_attr"),
    "SGConv": (lambda: SGConv(FEATURES, 32, K=2), ""),
    "EdgeConv": (lambda: EdgeConv(mlp(2 * FEATURES, 32, 32)), ""),
    "RGCNConv": (lambda: RGCNConv(FEATURES, 32, num_relations=RELATIONS), "edge_type"),
    "RGCNConv(bases)": (lambda: RGCNConv(FEATURES, 32, num_relations=RELATIONS, num_bases=2), "edge_type"),
    "RGCNConv(blocks)": (lambda: RGCNConv(FEATURES, 32, num_relations=RELATIONS, num_blocks=4), "edge_type"),
    "PNAConv(towers)": (lambda: PNAConv(FEATURES, 32, towers=2, edge_dim=EDGE_DIM, **AGG), "edge_attr"),
    "GatedGraphConv": (lambda: GatedGraphConv(FEATURES, num_layers=2), ""),
    "AntiSymmetricConv": (lambda: AntiSymmetricConv(FEATURES, num_iters=2), ""),
}

MODELS: dict[str, dict[str, Any]] = {
    "GCN": {},
    "GAT": {"heads": 2},
    "GAT(v2)": {"heads": 2, "v2": True},
    "GraphSAGE": {},
    "GIN": {},
    "EdgeCNN": {},
    "PNA": {},
    "GCN(jk=cat)": {"jk": "cat"},
}


def conv_inputs() -> tuple[torch.Tensor, ...]:
    return (G["x"], G["edge_index"], G["edge_attr"], G["edge_type"])


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_zoo_is_exact(name: str, coverage_table) -> None:
    make, extra = CONVS[name]
    report = check_exact(lambda: Net(make(), extra), conv_inputs())
    coverage_table("graph", name, report)
    assert report.coverage >= 0.99


@pytest.mark.parametrize("name", list(MODELS))
def test_model_zoo_is_exact(name: str, coverage_table) -> None:
    kind = name.split("(")[0]
    report = check_exact(lambda: build_model(f"pyg:{kind}", **MODELS[name]), (G["x"], G["edge_index"]))
    coverage_table("graph", f"pyg:{name}", report)
    assert report.coverage >= 0.99


def test_hetero_linear_is_exact(coverage_table) -> None:
    # Its weight is seen as types × (in·out), so the rank is at most the number of types.
    report = check_exact(lambda: HeteroLinear(FEATURES, 32, num_types=RELATIONS), (G["x"], G["type_vec"]), rank=RELATIONS)
    coverage_table("graph", "HeteroLinear", report)
    assert report.coverage >= 0.99


def test_hetero_linear_forms_its_update_once_per_forward(monkeypatch) -> None:
    """PyG's HeteroLinear (without pyg-lib) reads weight[t] once per type; the adapted
    weight is formed once per forward, not once per read."""
    import lora_anywhere.attach as attach

    model = la.apply(HeteroLinear(FEATURES, 32, num_types=RELATIONS, is_sorted=True), rank=2)
    formed = []
    effective = attach.effective_tensor
    monkeypatch.setattr(attach, "effective_tensor", lambda owner, tensor, **kw: formed.append(tensor) or effective(owner, tensor, **kw))
    type_vec = torch.arange(RELATIONS).repeat_interleave(4)
    model(torch.randn(len(type_vec), FEATURES), type_vec).sum().backward()
    assert sorted(formed) == ["bias", "weight"]


def test_hetero_dict_linear_is_exact(coverage_table) -> None:
    inputs = ({"paper": G["x"], "author": G["x"][:7, :8]},)
    report = check_exact(lambda: HeteroDictLinear({"paper": FEATURES, "author": 8}, 32), inputs)
    coverage_table("graph", "HeteroDictLinear", report)
    assert report.coverage >= 0.99


META = (["a", "b"], [("a", "to", "b"), ("b", "to", "a"), ("a", "self", "a")])


def hetero_inputs() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(10, FEATURES, generator=gen), "b": torch.randn(8, FEATURES, generator=gen)}
    sizes = {"a": 10, "b": 8}
    edges = {
        et: torch.stack([torch.randint(0, sizes[et[0]], (30,), generator=gen), torch.randint(0, sizes[et[2]], (30,), generator=gen)])
        for et in META[1]
    }
    return x, edges


class Homogeneous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = SAGEConv((FEATURES, FEATURES), 32)
        self.conv2 = GATConv((32, 32), 4, heads=2, add_self_loops=False)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


HETERO: dict[str, Callable[[], nn.Module]] = {
    "to_hetero(SAGEConv, GATConv)": lambda: to_hetero(Homogeneous(), (META[0], META[1][:2])),
    "HGTConv": lambda: HGTConv(FEATURES, 16, META, heads=2),
    "HeteroConv(SAGE, GAT)": lambda: HeteroConv(
        {
            META[1][0]: SAGEConv((FEATURES, FEATURES), 16),
            META[1][1]: GATConv((FEATURES, FEATURES), 16, add_self_loops=False),
            META[1][2]: SAGEConv(FEATURES, 16),
        }
    ),
}


@pytest.mark.parametrize("name", list(HETERO))
def test_hetero_conv_zoo_is_exact(name: str, coverage_table) -> None:
    report = check_exact(HETERO[name], hetero_inputs())
    coverage_table("graph", name, report)
    assert report.coverage >= 0.99


DENSE: dict[str, Callable[[], nn.Module]] = {
    "DenseGCNConv": lambda: DenseGCNConv(FEATURES, 8),
    "DenseGATConv": lambda: DenseGATConv(FEATURES, 8, heads=2),
    "DenseGINConv": lambda: DenseGINConv(mlp(FEATURES, 8)),
    "DenseSAGEConv": lambda: DenseSAGEConv(FEATURES, 8),
    "DenseGraphConv": lambda: DenseGraphConv(FEATURES, 8),
}


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_conv_zoo_is_exact(name: str, coverage_table) -> None:
    gen = torch.Generator().manual_seed(2)
    adj = (torch.rand(2, 6, 6, generator=gen) > 0.5).float()
    report = check_exact(DENSE[name], (torch.randn(2, 6, FEATURES, generator=gen), adj))
    coverage_table("graph", name, report)
    assert report.coverage >= 0.99


class WithPropagation(nn.Module):
    """A conv with no weights at all (APPNP) still matches the conv rule: it must be
    passed over, not break `apply`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = GCNConv(FEATURES, 8)
        self.prop = APPNP(K=2, alpha=0.1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.prop(self.conv(x, edge_index), edge_index)


def test_conv_without_weights_is_passed_over() -> None:
    report = check_exact(WithPropagation, (G["x"], G["edge_index"]))
    assert report.adapted == 1 and report.coverage == 1.0


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_pyg_linear_both_paths_are_exact(path: str) -> None:
    factory = lambda: nn.Sequential(Linear(FEATURES, 32), nn.ReLU(), Linear(32, 4))  # noqa: E731
    check_exact(factory, (G["x"],), path=path)
    model = la.apply(factory(), path=path)
    assert {r.path for r in la.summary(model).rows} == {path}


@pytest.mark.parametrize("options", [{"init": "svd", "path": "activation"}, {"init": "svd"}, {"dora": True}])
def test_svd_init_and_dora_on_graph_layers(options: dict[str, Any]) -> None:
    check_exact(lambda: nn.Sequential(Linear(FEATURES, 32), nn.ReLU(), Linear(32, 4)), (G["x"],), **options)
    check_exact(lambda: build_model("pyg:GAT", heads=2), (G["x"], G["edge_index"]), **options)


def test_lazy_pyg_linear_asks_for_a_forward_first() -> None:
    for model in (nn.Sequential(Linear(-1, 8)), Net(GCNConv(-1, 8))):
        with pytest.raises(la.LazyLayerError, match="run one forward"):
            la.apply(model)
        assert not la.adapter_names(model)
        model(*conv_inputs()[: 1 if isinstance(model, nn.Sequential) else 4])
        la.apply(model)
        assert la.adapter_names(model) == ["default"]


@pytest.mark.parametrize("path", ["activation", "weight"])
def test_pyg_linear_state_dict_stores_the_base_weight(path: str) -> None:
    """PyG's Linear saves through ``self.weight``; with adapters live it must still
    store W, so that state_dict → load_state_dict reproduces the adapted model."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(Linear(FEATURES, 32), nn.ReLU(), Linear(32, 4))

    base = make()
    keys = list(base.state_dict())
    model = la.apply(make(), rank=4, path=path)
    randomize_adapters(model)
    out = model(G["x"])
    state = model.state_dict()
    assert [k for k in state if "lora_adapters" not in k] == keys
    for k in keys:
        assert torch.equal(state[k], base.state_dict()[k]), k
    other = la.apply(make(), rank=4, path=path)
    other.load_state_dict(state)
    torch.testing.assert_close(other(G["x"]), out)
    model.load_state_dict(state)  # onto itself: still W + ΔW, not W + 2ΔW
    torch.testing.assert_close(model(G["x"]), out)


def test_class_name_selects_a_conv_with_the_linears_inside_it() -> None:
    model = build_model("pyg:GAT", heads=2, jk="cat")  # jk adds a top-level Linear head
    la.apply(model, targets="GATConv")
    rows = la.summary(model).rows
    assert {(r.layer, r.target) for r in rows} == {(f"convs.{i}", t) for i in (0, 1) for t in ("lin", "att_src", "att_dst")}
    assert not any("lora_adapters" in n for n, _ in model.lin.named_modules())
    assert not any(n.startswith("lora_adapters") for n, _ in model.convs[0].lin.named_modules())
    base = model(G["x"], G["edge_index"])
    randomize_adapters(model)
    with torch.no_grad():
        for name, factors in model.convs[0].lora_adapters["default"].factors.items():
            if name != "lin":
                factors.B.zero_()
    # only lin's adapter is non-zero in the first conv, and it changes the output
    assert not torch.allclose(model(G["x"], G["edge_index"]), base)


def test_conv_parts_and_excludes() -> None:
    model = build_model("pyg:GAT")
    la.apply(model, targets="GATConv:att_src,att_dst")
    assert {r.target for r in la.summary(model).rows} == {"att_src", "att_dst"}
    assert not hasattr(model.convs[0].lin, "lora_adapters")  # claimed by the conv, not adapted alone
    model = la.apply(build_model("pyg:GAT"), exclude="GATConv:lin")
    assert {r.target for r in la.summary(model).rows} == {"att_src", "att_dst"}


def test_transformer_conv_attention_projections(coverage_table) -> None:
    make = lambda: Net(TransformerConv(FEATURES, 8, heads=2, edge_dim=EDGE_DIM, root_weight=True), "edge_attr")  # noqa: E731
    report = check_exact(make, conv_inputs(), targets="TransformerConv:query,key,value")
    model = la.apply(make(), targets="TransformerConv:query,key,value")
    rows = la.summary(model).rows
    assert sorted(r.target for r in rows) == ["key", "query", "value"]
    assert {r.shape for r in rows} == {(16, FEATURES)}
    assert report.coverage < 0.99  # edge and skip projections left out, as asked
    with pytest.raises(la.TargetError, match="its targets are key, query, value, edge, skip"):
        la.apply(make(), targets="TransformerConv:q")


def test_linear_selector_keeps_conv_linears_on_the_activation_path() -> None:
    # "auto" puts these small Linears on the weight route (measured cheaper); forced,
    # each conv's inner Linear adds its adapter on its own activations.
    model = la.apply(build_model("pyg:GCN"), targets="Linear", path="activation")
    rows = la.summary(model).rows
    assert {r.layer for r in rows} == {"convs.0.lin", "convs.1.lin"}
    assert {r.path for r in rows} == {"activation"}


def test_second_adapter_on_a_conv_leaves_the_first_alone() -> None:
    model = la.apply(build_model("pyg:GAT"), name="one")
    la.apply(model, name="two")
    adapters = model.convs[0].lora_adapters
    assert set(adapters["one"].factors) == set(adapters["two"].factors) == {"lin", "att_src", "att_dst"}
    assert len(la.summary(model).rows) == 12  # 2 convs × 3 targets × 2 adapters, none on A/B factors


def test_graph_convs_preset_leaves_heads_alone() -> None:
    model = la.apply(build_model("pyg:GCN", jk="cat"), targets="graph-convs")
    assert {r.layer for r in la.summary(model).rows} == {"convs.0", "convs.1"}


def test_pyg_model_source() -> None:
    model = build_model("pyg:GraphSAGE")
    assert type(model).__name__ == "GraphSAGE"
    assert (model.in_channels, model.hidden_channels, model.num_layers, model.out_channels) == (16, 32, 2, 4)
    assert build_model("pyg:GCN", hidden_channels=8, num_layers=3).convs[1].out_channels == 8
    assert build_model("pyg:PNA")(G["x"], G["edge_index"]).shape == (NODES, 4)
    with pytest.raises(la.LoraError, match="no model 'NoSuchNet'"):
        build_model("pyg:NoSuchNet")


def test_plugin_is_listed_active() -> None:
    info = {p.name: p for p in la.plugins()}["graph"]
    assert info.status == "active", info.error
    assert "torch_geometric.nn.dense.linear.Linear" in info.rules
    assert "torch_geometric.nn.conv.message_passing.MessagePassing" in info.rules


def test_plugin_is_inactive_without_torch_geometric(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    monkeypatch.delitem(sys.modules, "lora_anywhere_graph", raising=False)
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module("lora_anywhere_graph")
    assert info.value.name == "torch_geometric"


def test_unmerged_adapted_conv_trains_only_adapters() -> None:
    model = la.apply(Net(RGCNConv(FEATURES, 32, num_relations=RELATIONS, num_bases=2), "edge_type"))
    randomize_adapters(model)
    model(*conv_inputs()).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_adapters" in n for n in grads)
    assert {n.rsplit(".", 2)[-2] for n in grads} >= {"weight", "comp", "root"}


#: Input features wide enough that aggregating the adapter's rank beats W + ΔW's backward
#: (`rules._aggregating_rank_is_cheaper`).
WIDE = 64
X_WIDE = torch.randn(NODES, WIDE, generator=torch.Generator().manual_seed(1))


class OneConv(nn.Module):
    """A GCNConv inside a model, with its optional edge weights."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x, edge_index, edge_weight)


def _propagations(model: nn.Module, monkeypatch, *inputs: Any) -> tuple[torch.Tensor, list[tuple[int, bool]]]:
    """The model's output and, for each GCNConv propagation it ran, the channels it
    aggregated and whether they need a gradient."""
    seen: list[tuple[int, bool]] = []
    cls = own_class(next(m for m in model.modules() if isinstance(m, GCNConv)))  # PyG makes a subclass its own propagate
    propagate = cls.propagate

    def spy(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((kwargs["x"].shape[-1], kwargs["x"].requires_grad))
        return propagate(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(cls, "propagate", spy)
        return model(*inputs), seen


def _on_the_weight_route(monkeypatch) -> None:
    from lora_anywhere_graph import GCNConvRule

    monkeypatch.setattr(GCNConvRule, "layer_forward", lambda *args, **kwargs: NotImplemented)


def _same_training_step(model: nn.Module, monkeypatch, *inputs: Any) -> list[tuple[int, bool]]:
    """Run a step of `model` and of its copy on W + ΔW: equal outputs and gradients.
    Returns the propagations of `model`'s step."""
    twin = copy.deepcopy(model)
    out, seen = _propagations(model, monkeypatch, *inputs)
    out.square().sum().backward()
    with monkeypatch.context() as m:
        _on_the_weight_route(m)
        expected = twin(*inputs)
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in twin.named_parameters() if p.grad is not None} and grads
    for name, p in twin.named_parameters():
        if p.grad is not None:
            # Summed in another order: rounding relative to the largest entry, not to each.
            atol = 1e-5 * max(1.0, p.grad.abs().max().item())
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=atol, msg=lambda text, name=name: f"{name}: {text}")
    return seen


GCN_VARIANTS = {
    "default": {},
    "cached": {"cached": True},
    "improved, no self-loops": {"improved": True, "add_self_loops": False},
    "not normalized": {"normalize": False},
    "mean": {"aggr": "mean"},
}


@pytest.mark.parametrize("options", GCN_VARIANTS.values(), ids=GCN_VARIANTS.keys())
def test_gcn_conv_on_input_features_aggregates_only_the_adapter_rank(options: dict[str, Any], monkeypatch) -> None:
    # Â·x(W + s·BA)ᵀ = Â·xWᵀ + s·(Â·xAᵀ)Bᵀ: on features that need no gradient, the
    # output's channels are aggregated without one, and only A's r channels with one.
    model = la.apply(OneConv(GCNConv(WIDE, 64, **options)), rank=4, alpha=12.0)
    randomize_adapters(model)
    inputs = (X_WIDE, G["edge_index"], G["edge_attr"][:, 0].abs())
    for _ in range(2):  # a cached conv normalises once
        model.zero_grad()
        assert _same_training_step(model, monkeypatch, *inputs) == [(64, False), (4, True)]


def test_gcn_first_conv_aggregates_the_rank_and_later_convs_run_on_w_plus_delta(monkeypatch) -> None:
    model = la.apply(build_model("pyg:GCN", in_channels=WIDE, num_layers=3, hidden_channels=64), rank=4, alpha=12.0)
    randomize_adapters(model)
    seen = _same_training_step(model, monkeypatch, X_WIDE, G["edge_index"])
    # conv 0 aggregates 64 channels without a gradient and 4 with; the next convs' inputs
    # need gradients, so they aggregate their outputs (64, then 4 classes) with them.
    assert seen == [(64, False), (4, True), (64, True), (4, True)]


def test_gcn_convs_as_wide_as_the_benchmarks_keep_their_lin_on_w_plus_delta(monkeypatch) -> None:
    # `auto` trains a Linear of this width (128 → 256) alone on its activations, but
    # the first conv's low-rank aggregation saves more (bench/train_step.py's GCN): a
    # GCNConv's lin stays on W + ΔW, and route="activation" still moves it.
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    assert la.summary(la.apply(PygLinear(128, 256), rank=8)).rows[0].route == "activation"
    gcn = build_model("pyg:GCN", in_channels=128, num_layers=3, hidden_channels=256)
    assert {row.route for row in la.summary(la.apply(copy.deepcopy(gcn), rank=8, route="activation")).rows} == {"activation"}
    model = la.apply(gcn, rank=8)
    assert {row.route for row in la.summary(model).rows} == {"weight"}
    randomize_adapters(model)
    seen = _same_training_step(model, monkeypatch, torch.randn(NODES, 128), G["edge_index"])
    assert seen[:2] == [(256, False), (8, True)]


@pytest.mark.parametrize("options", [{"name": "second"}, {"init": "svd"}], ids=["two adapters", "svd init"])
def test_gcn_conv_low_rank_aggregation_with_adapter_options(options: dict[str, Any], monkeypatch) -> None:
    model = la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0)
    if options.get("name"):
        la.apply(model, rank=2, alpha=6.0, **options)
    else:
        model = la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0, **options)
    randomize_adapters(model)
    # Two adapters aggregate their ranks together; PiSSA's frozen start (−B₀A₀) doubles A's rows.
    rank = {"name": 6, "init": 8}.get(next(iter(options)), 4)
    assert _same_training_step(model, monkeypatch, X_WIDE, G["edge_index"]) == [(64, False), (rank, True)]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
def test_gcn_conv_on_a_sparse_adjacency(monkeypatch) -> None:
    from torch_geometric.utils import to_torch_csr_tensor

    model = la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0)
    randomize_adapters(model)
    adjacency = to_torch_csr_tensor(G["edge_index"].flip(0), size=(NODES, NODES))
    assert _same_training_step(model, monkeypatch, X_WIDE, adjacency) == [(64, False), (4, True)]


def _hooked(conv: GCNConv) -> GCNConv:
    conv.register_propagate_forward_hook(lambda module, inputs, out: out)
    return conv


class _OwnMessages(GCNConv):
    def message(self, x_j: torch.Tensor, edge_weight: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(super().message(x_j, edge_weight))


FALLBACKS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "max aggregation": lambda: (la.apply(OneConv(GCNConv(WIDE, 64, aggr="max")), rank=4, alpha=12.0), (X_WIDE, G["edge_index"])),
    "propagate hook": lambda: (la.apply(OneConv(_hooked(GCNConv(WIDE, 64))), rank=4, alpha=12.0), (X_WIDE, G["edge_index"])),
    "own messages": lambda: (la.apply(OneConv(_OwnMessages(WIDE, 64)), rank=4, alpha=12.0), (X_WIDE, G["edge_index"])),
    "input needs a gradient": lambda: (
        la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0),
        (X_WIDE.clone().requires_grad_(), G["edge_index"]),
    ),
    "dropout": lambda: (la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0, dropout=0.5), (X_WIDE, G["edge_index"])),
    "DoRA": lambda: (la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0, dora=True), (X_WIDE, G["edge_index"])),
    "activation route": lambda: (
        la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0, route="activation"),
        (X_WIDE, G["edge_index"]),
    ),
    "narrow input, cheaper on W + ΔW": lambda: (la.apply(OneConv(GCNConv(FEATURES, 64)), rank=8), (G["x"], G["edge_index"])),
    "LoRA-FA (activation route)": lambda: (
        la.apply(OneConv(GCNConv(WIDE, 64)), rank=4, alpha=12.0, freeze_a=True),
        (X_WIDE, G["edge_index"]),
    ),
}


@pytest.mark.parametrize("make", FALLBACKS.values(), ids=FALLBACKS.keys())
def test_gcn_conv_runs_on_w_plus_delta_where_aggregating_the_rank_would_not_be_exact_or_cheaper(make, monkeypatch) -> None:
    model, inputs = make()
    randomize_adapters(model)
    seen = _same_training_step(model, monkeypatch, *inputs)
    assert seen == [(64, True)]  # one aggregation, of the output's channels, with a gradient


def test_gcn_conv_low_rank_aggregation_under_autocast(monkeypatch) -> None:
    # In bf16 the two ways round differently; aggregating the rank must stay about as
    # close to the fp32 step as W + ΔW (rounded to bf16 as a whole) does.
    gen = torch.Generator().manual_seed(2)
    x, edges = torch.randn(500, WIDE, generator=gen), torch.randint(0, 500, (2, 5000), generator=gen)
    model = la.apply(build_model("pyg:GCN", in_channels=WIDE, hidden_channels=64), rank=4, alpha=12.0)
    randomize_adapters(model, std=0.2)
    on_weight, reference = copy.deepcopy(model), copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, seen = _propagations(model, monkeypatch, x, edges)
        with monkeypatch.context() as m:
            _on_the_weight_route(m)
            expected = on_weight(x, edges)
    assert seen[:2] == [(64, False), (4, True)]
    assert out.dtype == expected.dtype
    exact = reference(x, edges)
    for y in (out, expected, exact):
        y.float().square().sum().backward()

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b).norm() / b.norm()).item()

    assert error(out, exact) <= max(1.5 * error(expected, exact), 0.02)
    for (name, p), q, r in zip(model.named_parameters(), on_weight.parameters(), reference.parameters()):
        if r.grad is not None:
            assert p.grad is not None and p.grad.dtype == p.dtype, name
            assert error(p.grad, r.grad) <= max(1.5 * error(q.grad, r.grad), 0.02), name
