"""Property tests: every torch.nn rule is exact over random layer configurations.

For each configuration: output equals the base at init; randomised adapters change
it; merged == unmerged; unmerge restores; save/load round trip; remove gives back the
original types and keys (all in `check_exact`); the activation and weight routes give
the same outputs and the same adapter gradients; only adapters receive gradients; a
dense layer's merged update has rank ≤ r.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_anywhere as la
from lora_anywhere.testing import check_exact, randomize_adapters

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def linears(draw):
    i, o = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    bias = draw(st.booleans())
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    return (lambda: nn.Linear(i, o, bias=bias)), (torch.randn(*lead, i),)


@st.composite
def convs(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    if depthwise:
        cin, groups = cout, cout
    k = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from(["same", "valid", 0, 1])) if stride == 1 else draw(st.sampled_from(["valid", 0, 1]))
    if mode != "zeros" and padding in (0, "valid"):
        padding = 1
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = 7 if dims < 3 else 5
    x = torch.randn(2, cin, *(size,) * dims)
    return (lambda: conv_cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)), (x,)


@st.composite
def conv_transposes(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    output_padding = draw(st.integers(0, max(0, max(stride, dilation) - 1)))
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    x = torch.randn(2, cin, *(4,) * dims)
    padding = draw(st.integers(0, 1))
    return (lambda: cls(cin, cout, k, stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)), (
        x,
    )


@st.composite
def embeddings(draw):
    n, d = draw(st.integers(2, 30)), draw(st.integers(1, 12))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    x = torch.randint(0, n, (3, 5))
    return (lambda: nn.Embedding(n, d, padding_idx=padding_idx)), (x,)


@st.composite
def attentions(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    e = heads * draw(st.integers(2, 4))
    separate = draw(st.booleans())
    kdim, vdim = (draw(st.integers(1, 9)), draw(st.integers(1, 9))) if separate else (None, None)
    batch_first = draw(st.booleans())
    bias = draw(st.booleans())
    L, S, N = 4, 5, 2
    shape = (lambda n, length, d: (n, length, d)) if batch_first else (lambda n, length, d: (length, n, d))
    q = torch.randn(*shape(N, L, e))
    k = torch.randn(*shape(N, S, kdim or e))
    v = torch.randn(*shape(N, S, vdim or e))
    factory = lambda: nn.MultiheadAttention(e, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)  # noqa: E731
    return factory, (q, k, v)


@st.composite
def recurrents(draw):
    cls = draw(st.sampled_from([nn.RNN, nn.LSTM, nn.GRU]))
    i, h = draw(st.integers(1, 8)), draw(st.integers(2, 8))
    layers = draw(st.integers(1, 2))
    bidirectional = draw(st.booleans())
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=draw(st.booleans()))
    if cls is nn.LSTM and draw(st.booleans()):
        kwargs["proj_size"] = draw(st.integers(1, h - 1))
    x = torch.randn(3, 4, i)
    return (lambda: cls(i, h, **kwargs)), (x,)


def _rank_for(factory, wanted=2):
    """Rank 2, or the layer's full rank when that is smaller (a 1-wide layer)."""
    weight = factory().weight
    return min(wanted, weight.shape[0], weight[0].numel())


def _exact_both_paths(factory, inputs, rank=None):
    rank = rank or _rank_for(factory)
    for path in ("activation", "weight"):
        check_exact(factory, inputs, rank=rank, path=path)
    _paths_agree(factory, inputs, rank)


def _outputs(model, inputs):
    out = model(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _paths_agree(factory, inputs, rank):
    """Same adapters, activation vs weight route: same outputs and same gradients, the
    input's included (a fused backward forms it its own way)."""
    results = []
    for path in ("activation", "weight"):
        inputs = [x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
        torch.manual_seed(0)
        model = factory().train()
        la.apply(model, rank=rank, path=path)
        randomize_adapters(model, seed=1)
        if getattr(model, "padding_idx", None) is not None:
            with torch.no_grad():  # as in training: B's padding row starts at 0 and never moves
                model.lora_adapters.default.factors.weight.B[model.padding_idx] = 0
        out = _outputs(model, inputs)
        out.float().pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        grads.update({f"input {i}": x.grad for i, x in enumerate(inputs) if x.is_floating_point()})
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad, f"frozen parameters received gradients: {frozen_with_grad}"
        trained = [n for n in grads if not n.startswith("input ")]
        assert all(".lora_adapters." in f".{n}" for n in trained), f"non-adapter parameters train: {trained}"
        results.append((out.detach(), grads))
    (out_a, g_a), (out_w, g_w) = results
    torch.testing.assert_close(out_a, out_w, rtol=1e-4, atol=1e-5)
    assert g_a.keys() == g_w.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_w[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")  # noqa: B023 (called at once)


@SETTINGS
@given(linears())
def test_linear(case):
    _exact_both_paths(*case)


@SETTINGS
@given(convs())
def test_conv(case):
    _exact_both_paths(*case)


@SETTINGS
@given(conv_transposes())
def test_conv_transpose(case):
    check_exact(*case, rank=_rank_for(case[0]))


@SETTINGS
@given(embeddings())
def test_embedding(case):
    _exact_both_paths(*case)


def test_embedding_max_norm_renormalises_the_adapted_rows():
    """max_norm renormalises looked-up rows in place on every forward, so outputs
    depend on history; compare merged and unmerged copies on their first forward."""
    torch.manual_seed(0)
    model = nn.Embedding(10, 4, max_norm=1.0)
    weight = model.weight.detach().clone()
    la.apply(model, rank=2)
    randomize_adapters(model, std=0.5)
    merged = copy.deepcopy(model)
    la.merge(merged)
    x = torch.tensor([[1, 2, 3], [3, 4, 9]])
    unmerged_out = model(x)
    torch.testing.assert_close(merged(x), unmerged_out)
    assert unmerged_out.norm(dim=-1).max() <= 1.0 + 1e-5
    torch.testing.assert_close(
        model.weight.detach() - weight, la.adapter_state_dict(model)["lora//weight/B"] @ la.adapter_state_dict(model)["lora//weight/A"]
    )


@SETTINGS
@given(attentions())
def test_multihead_attention(case):
    check_exact(*case, rank=2)


@SETTINGS
@given(recurrents())
def test_recurrent(case):
    check_exact(*case, rank=2)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.Linear(20, 30),
        lambda: nn.Conv2d(12, 16, 3),
        lambda: nn.Conv1d(8, 8, 5, groups=8),
        lambda: nn.ConvTranspose2d(6, 10, 3),
        lambda: nn.LSTM(6, 10),
    ],
)
def test_merged_delta_has_rank_at_most_r(factory):
    torch.manual_seed(0)
    model = factory()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    la.apply(model, rank=3)
    randomize_adapters(model)
    la.merge(model)
    la.remove(model, merge=True)
    for name, param in model.named_parameters():
        delta = (param.detach() - before[name]).reshape(param.shape[0], -1)
        if name.startswith("weight"):
            assert torch.linalg.matrix_rank(delta, atol=1e-5).item() <= 3, name


def test_mha_reads_adapted_weights_directly():
    """Code that reads in_proj_weight (as WavLM does) must see the adapter."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    x = torch.randn(3, 8)
    base = nn.functional.linear(x, mha.in_proj_weight)
    la.apply(mha, rank=2, targets="MultiheadAttention:q,v")
    randomize_adapters(mha)
    adapted = nn.functional.linear(x, mha.in_proj_weight)
    assert not torch.allclose(adapted[:, :8], base[:, :8])  # q changed
    torch.testing.assert_close(adapted[:, 8:16], base[:, 8:16])  # k untouched
    assert not torch.allclose(adapted[:, 16:], base[:, 16:])  # v changed


def test_out_proj_delta_added_once():
    """PEFT adds the MHA output delta twice; merged and unmerged must agree here."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 4, 8)
    la.apply(mha, rank=2, targets="MultiheadAttention:out")
    randomize_adapters(mha)
    unmerged = mha(x, x, x)[0]
    la.merge(mha)
    torch.testing.assert_close(mha(x, x, x)[0], unmerged, rtol=1e-5, atol=1e-6)


def test_parent_reads_child_attributes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
            self.qkv = nn.Linear(8, 24)
            self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            assert self.conv1.stride == (2, 2) and self.self_attn.batch_first
            h = self.conv1(x).flatten(2).transpose(1, 2)
            q, k, v = nn.functional.linear(h, self.qkv.weight, self.qkv.bias).chunk(3, -1)
            return self.self_attn(q, k, v)[0]

    check_exact(Block, (torch.randn(2, 3, 9, 9),), rank=2)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_weights_compose_and_merge(norm):
    def factory():
        conv = nn.Conv1d(6, 8, 3, padding=1)
        if norm == "weight_norm":
            return nn.utils.parametrizations.weight_norm(conv, dim=2)
        if norm == "spectral_norm":
            return nn.utils.parametrizations.spectral_norm(conv).eval()
        return nn.utils.weight_norm(conv, dim=2)

    check_exact(factory, (torch.randn(2, 6, 10),), rank=2)
    model = factory()
    la.apply(model, rank=2)
    randomize_adapters(model)
    la.merge(model)
    is_param = nn.utils.parametrize.is_parametrized(model, "weight")
    assert is_param or hasattr(model, "weight_v"), "merging dropped the weight parametrization"
    assert la.summary(model).rows, "merging dropped the adapter"


def test_lazy_layer_needs_a_forward_first():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(la.LazyLayerError, match="run one forward pass"):
        la.apply(model)
    model(torch.randn(2, 3))
    check_exact(_materialised_lazy, (torch.randn(2, 3, 6),))


def _materialised_lazy():
    model = nn.Sequential(nn.LazyConv1d(4, 1), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(2, 3, 6))
    return model


def test_deepcopy_and_pickle_of_adapted_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    la.apply(model, rank=2)
    randomize_adapters(model)
    x = torch.randn(1, 3, 6, 6)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    ("factory", "x"),
    [
        (lambda: nn.Linear(6, 5), torch.randn(4, 6)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), torch.randn(2, 4, 5, 5)),
        (lambda: nn.Conv1d(4, 8, 3, groups=2, dilation=2), torch.randn(2, 4, 9)),
        (lambda: nn.Embedding(9, 4), torch.randint(0, 9, (3, 4))),
    ],
)
def test_two_adapters_on_one_layer_unfused_path_is_exact(factory, x):
    """Two adapters (or dropout) take the unfused activation loop; it must agree with
    the weight route in outputs and gradients too."""
    results = []
    for path in ("activation", "weight"):
        torch.manual_seed(0)
        model = factory()
        la.apply(model, rank=2, path=path)
        la.apply(model, rank=2, path=path, name="second")
        randomize_adapters(model, seed=3)
        out = model(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cell", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_recurrent_cells(cell):
    check_exact(lambda: cell(5, 7), (torch.randn(3, 5),), rank=2)


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (lambda: nn.Linear(6, 5), torch.randn(2, 3, 6)),
        (lambda: nn.Linear(6, 5), torch.randn(4, 6)),
        (lambda: nn.Conv2d(3, 5, 3), torch.randn(2, 3, 6, 6)),
    ],
)
def test_inplace_op_after_an_adapted_layer(layer, x):
    """MobileNetV3's Hardswish(inplace=True) writes into the adapted layer's output."""
    model = la.apply(nn.Sequential(layer(), nn.Hardswish(inplace=True)), rank=2, path="activation")
    randomize_adapters(model)
    model(x).sum().backward()
    reference = la.apply(nn.Sequential(layer(), nn.Hardswish()), rank=2, path="weight")
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(reference(x), model(x))


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (lambda: nn.Linear(6, 5), torch.randn(2, 3, 6)),
        (lambda: nn.Conv1d(4, 6, 4, padding="same"), torch.randn(2, 4, 9)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), torch.randn(2, 4, 5, 5)),
        (lambda: nn.Conv2d(4, 8, 3, groups=4), torch.randn(2, 4, 5, 5)),
        (lambda: nn.Conv3d(2, 3, 2, stride=2), torch.randn(1, 2, 4, 4, 4)),
        (lambda: nn.Embedding(9, 4), torch.randint(0, 9, (3, 4))),
    ],
)
def test_activation_path_never_builds_the_weight_delta(layer, x, monkeypatch):
    """The activation route's point is to never form ΔW: reading `layer.weight` (W + ΔW)
    anywhere in its forward would cost a weight-sized matmul per step."""
    model = la.apply(layer(), rank=2, path="activation")

    def refuse(*args, **kwargs):
        raise AssertionError("ΔW was built on the activation route")

    monkeypatch.setattr(la.adapter.LowRank, "delta", refuse)
    monkeypatch.setattr(la.adapter.LayerAdapter, "add_to", refuse)
    model(x).float().sum().backward()


@pytest.mark.parametrize(
    ("layer", "many", "few"),
    [
        (lambda: nn.Linear(64, 32), torch.randn(4, 30, 64), torch.randn(2, 64)),
        (lambda: nn.Conv2d(8, 16, 3, stride=2), torch.randn(2, 8, 20, 20), torch.randn(1, 8, 3, 3)),
        (lambda: nn.Embedding(50, 8), torch.randint(0, 50, (4, 30)), torch.randint(0, 50, (2, 3))),
    ],
)
def test_inference_takes_the_weight_path_when_it_is_cheaper(layer, many, few, monkeypatch):
    """Under no_grad, where nothing can be kept across calls (as in a process group),
    an activation-route layer forms W + ΔW for a call that sees enough rows (no weight
    gradient to pay for); on few rows it adds A and B. Both exact."""
    monkeypatch.setattr(la.weight_cache, "usable", lambda: False)
    model = la.apply(layer(), rank=2, path="activation")
    randomize_adapters(model)
    built = []
    add_to = la.adapter.LayerAdapter.add_to
    monkeypatch.setattr(la.adapter.LayerAdapter, "add_to", lambda self, *args: built.append(1) or add_to(self, *args))
    for x, weight_path in ((many, True), (few, False)):
        expected = model(x).detach()
        assert not built, "the training forward built ΔW"
        with torch.no_grad():
            got = model(x)
        assert bool(built) == weight_path
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        built.clear()


def test_inference_with_active_dropout_stays_on_activations(monkeypatch):
    model = la.apply(nn.Linear(64, 32), rank=2, path="activation", dropout=0.5).train()
    monkeypatch.setattr(la.adapter.LayerAdapter, "add_to", lambda *args: pytest.fail("dropout needs the activation route"))
    with torch.no_grad():
        model(torch.randn(100, 64))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("conv", "shape", "layout"),
    [
        (nn.Conv1d, (2, 4, 7), torch.contiguous_format),
        (nn.Conv2d, (2, 4, 3, 5), torch.contiguous_format),
        (nn.Conv2d, (2, 4, 3, 5), torch.channels_last),
        (nn.Conv3d, (2, 4, 2, 3, 2), torch.contiguous_format),
    ],
)
def test_pointwise_conv_activation_path(bias, conv, shape, layout):
    """A 1×1 conv's fused route runs A's terms as matmuls: outputs and every gradient,
    the input's included, as on the weight route."""
    x = torch.randn(*shape).to(memory_format=layout)
    _paths_agree(lambda: conv(4, 6, 1, bias=bias), (x,), rank=2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("conv", "shape", "layout"), [(nn.Conv2d, (2, 4, 6, 6), torch.channels_last), (nn.Conv3d, (2, 4, 3, 4, 5), torch.channels_last_3d)]
)
def test_conv_activation_path_on_channels_last_inputs(bias, conv, shape, layout):
    x = torch.randn(*shape).to(memory_format=layout)
    _paths_agree(lambda: conv(4, 6, 3, padding=1, bias=bias).to(memory_format=layout), (x,), rank=2)
    model = la.apply(conv(4, 6, 3, padding=1, bias=bias).to(memory_format=layout), rank=2, path="activation")
    assert model(x).is_contiguous(memory_format=layout), "the adapter changed the conv's memory format"


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (lambda: nn.Linear(16, 8), torch.randn(2, 4, 16)),
        (lambda: nn.Linear(16, 8, bias=False), torch.randn(4, 16)),
        (lambda: nn.Conv2d(4, 8, 3), torch.randn(2, 4, 6, 6)),
        (lambda: nn.Conv2d(4, 8, 3), torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)),
        (lambda: nn.Embedding(10, 4), torch.randint(0, 10, (3, 5))),
    ],
)
def test_both_paths_under_autocast(layer, x):
    """The trainer runs bf16 autocast on CUDA; CPU autocast runs the same code. Both
    paths give the base layer's output dtype and gradients in the factors' dtype."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = layer()(x).dtype
    results = []
    for path in ("activation", "weight"):
        torch.manual_seed(0)
        model = la.apply(layer(), rank=2, path=path)
        randomize_adapters(model, seed=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == expected_dtype, path
        out.float().pow(2).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.dtype == torch.float32 for g in grads.values())
        results.append((out.float(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0.05, atol=0.05)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=0.1, atol=0.1)


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (lambda: nn.Conv1d(4, 6, 3, padding="same", padding_mode="reflect"), torch.randn(4, 9)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2), torch.randn(4, 7, 7)),
        (lambda: nn.Conv2d(4, 6, 3, groups=2), torch.randn(4, 7, 7)),
        (lambda: nn.Conv3d(2, 3, 2), torch.randn(2, 4, 4, 4)),
    ],
)
def test_conv_on_unbatched_inputs(layer, x):
    """torch's convs take (C, L…) without a batch dimension; so must both routes."""
    check_exact(layer, (x,), rank=2, path="activation")
    _paths_agree(layer, (x,), rank=2)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [(nn.Conv2d, (5, 12, 1, 1)), (nn.Conv2d, (12, 1, 1)), (nn.Conv1d, (5, 12, 1))],
    ids=["batched", "unbatched", "conv1d"],
)
def test_a_conv_over_one_position_runs_as_a_linear(conv, shape, monkeypatch):
    """Squeeze-excitation convs (1×1 kernel, one position) run the fused Linear call, in
    training and without gradients where no W + ΔW can be kept, with the weight route's
    numbers."""
    from lora_anywhere import kernels

    calls = []
    linear_lora = kernels.linear_lora
    monkeypatch.setattr(kernels, "linear_lora", lambda *args: calls.append(1) or linear_lora(*args))
    factory = lambda: conv(12, 6, 1)  # noqa: E731
    x = torch.randn(*shape)
    _paths_agree(factory, (x,), rank=3)
    assert calls, "the one-position conv did not run as a Linear"
    calls.clear()
    torch.manual_seed(0)
    model = la.apply(factory(), rank=3, route="activation").eval()
    randomize_adapters(model, seed=1)
    monkeypatch.setattr(la.weight_cache, "usable", lambda: False)  # as in a process group
    with torch.no_grad():
        unmerged = model(x)
        assert calls
        la.merge(model)
        torch.testing.assert_close(unmerged, model(x))


def test_small_conv_training_calls_run_on_w_plus_delta(monkeypatch):
    """Below `SMALL_CONV_CALL` an activation-route conv trains through W + ΔW (its own
    forward), with the same numbers; not with A frozen (LoRA-FA keeps no copy of the
    input on activations), under dropout, or without gradients."""
    from lora_anywhere.rules import torch_nn

    monkeypatch.setattr(torch_nn, "SMALL_CONV_CALL", 10**8)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)

    def grad_fn(**options):
        torch.manual_seed(0)
        model = la.apply(nn.Conv2d(4, 8, 3), rank=2, route="activation", **options)
        randomize_adapters(model, seed=1)
        return type(model(x).grad_fn).__name__, model

    assert grad_fn()[0] == "ConvolutionBackward0"
    assert grad_fn(freeze_a=True)[0] == "FusedConvLoRABackward"
    assert grad_fn(dropout=0.5)[0] != "ConvolutionBackward0"
    monkeypatch.setattr(torch_nn, "SMALL_CONV_CALL", 0)
    assert grad_fn()[0] == "FusedConvLoRABackward"
    _paths_agree(lambda: nn.Conv2d(4, 8, 3), (x.detach(),), rank=2)
    monkeypatch.setattr(torch_nn, "SMALL_CONV_CALL", 10**8)
    _paths_agree(lambda: nn.Conv2d(4, 8, 3), (x.detach(),), rank=2)


def test_small_training_calls_off_the_cpu_run_on_w_plus_delta(monkeypatch):
    """On a GPU (any device but the CPU) a Linear's or conv's training call below
    `SMALL_CALL_OFF_CPU` multiply-adds is better served by W + ΔW; on the CPU only a
    conv's, below `SMALL_CONV_CALL`. Meta tensors stand in for a device's: only the
    device type and shapes are read."""
    from lora_anywhere.rules import torch_nn

    monkeypatch.setattr(torch_nn, "SMALL_CONV_CALL", 10**8)
    monkeypatch.setattr(torch_nn, "SMALL_CALL_OFF_CPU", 10**8)
    linear, conv = torch_nn.LinearRule(), torch_nn.ConvRule(nn.Conv2d)
    lin_layer, conv_layer = nn.Linear(64, 32), nn.Conv2d(16, 32, 3)
    for device, linear_small in (("cpu", False), ("meta", True)):
        rows = torch.empty(100, 64, device=device)  # (100 + 3·8)·32·64 ≈ 2.5·10⁵
        assert linear.weight_cheaper_with_grad(lin_layer, lin_layer.weight, 8, rows) is linear_small
        assert conv.weight_cheaper_with_grad(conv_layer, conv_layer.weight, 8, torch.empty(2, 16, 10, 10, device=device))
        many = torch.empty(100_000, 64, device=device)  # 2·10⁸
        assert not linear.weight_cheaper_with_grad(lin_layer, lin_layer.weight, 8, many)
        assert not conv.weight_cheaper_with_grad(conv_layer, conv_layer.weight, 8, torch.empty(200, 16, 100, 100, device=device))
    # A squeeze-excitation conv runs as a matmul on the CPU; elsewhere it is a call like any.
    se = nn.Conv2d(64, 16, 1)
    assert not conv.weight_cheaper_with_grad(se, se.weight, 8, torch.empty(4, 64, 1, 1))
    assert conv.weight_cheaper_with_grad(se, se.weight, 8, torch.empty(4, 64, 1, 1, device="meta"))


def test_fused_calls_fold_delta_only_with_many_rows_in_full_precision():
    """W + ΔW replaces W in the base product only where it is cheaper (many rows) and
    where rounding it cannot drop a small ΔW (not bf16, fp16, or under autocast)."""
    from lora_anywhere.kernels import folds_delta

    many, few = torch.randn(64, 8), torch.randn(2, 8)
    assert folds_delta(many, "matmul", 64, 8, 8)
    assert folds_delta(many.double(), "conv", 64, 8, 8)
    assert not folds_delta(few, "matmul", 2, 8, 8)
    assert not folds_delta(many.bfloat16(), "matmul", 64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not folds_delta(many, "matmul", 64, 8, 8)


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: nn.Linear(12, 10), (12,)),
        (lambda: nn.Conv2d(6, 10, 3, padding=1), (6, 2, 2)),
        (lambda: nn.Conv2d(6, 10, 1), (6, 1, 2)),
    ],
    ids=["linear", "conv 3×3", "conv 1×1"],
)
def test_folded_and_unfolded_calls_train_alike(factory, shape, rows):
    """One row runs the fused call on W (plus s·B z), many rows on W + ΔW: each gives
    the weight route's outputs and gradients."""
    from lora_anywhere.kernels import folds_delta

    x = torch.randn(rows, *shape, dtype=torch.float64)
    positions = rows * math.prod(shape[1:])
    layer = factory()
    assert folds_delta(x, "conv", positions, layer.weight.shape[0], layer.weight[0].numel()) == (rows > 1)
    _paths_agree(lambda: factory().double(), (x,), rank=3)


@pytest.mark.parametrize("threads, rows, blocks", [(4, 1000, 4), (4, 1002, 3), (2, 130, 2), (2, 131, 1), (4, 127, 1), (1, 1000, 1)])
def test_linear_rank_products_run_in_a_block_of_rows_per_thread(threads, rows, blocks, monkeypatch):
    """On the CPU a fused Linear call forms its rank-r products in one block of rows per
    thread where the rows divide evenly into blocks of at least `BLOCK_ROWS` (fewer
    blocks where they do not, one off the CPU): the weight route's outputs and
    gradients all the same."""
    from lora_anywhere import kernels

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = torch.randn(rows, 12, dtype=torch.float64)
    assert kernels.rank_blocks(x.to("meta"), rows) == 1
    choose, chosen = kernels.rank_blocks, []

    def recording(*args):
        chosen.append(choose(*args))
        return chosen[-1]

    monkeypatch.setattr(kernels, "rank_blocks", recording)
    _paths_agree(lambda: nn.Linear(12, 10).double(), (x,), rank=3)
    assert chosen == [blocks]


@pytest.mark.parametrize("fold", [False, True], ids=["on W", "on W + ΔW"])
@pytest.mark.parametrize("layout", ["linear", "linear in 3 blocks", "channels_last", "contiguous", "pointwise"])
def test_fused_backward_matches_numerical_gradients(layout, fold):
    """The fused functions write their own backward (rank-r products taken in the shape
    BLAS runs fastest, a Linear's in blocks of rows; the base product on W or on
    W + ΔW): every input's gradient is checked against finite differences."""
    from lora_anywhere.kernels import FusedConvLoRA, FusedLinearLoRA

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    kernel = 1 if layout == "pointwise" else 3
    a, b = torch.randn(2, 3 * kernel * kernel, **f64), torch.randn(4, 2, **f64)
    if layout.startswith("linear"):
        x, w, bias = torch.randn(3, 5, 27, **f64), torch.randn(4, 27, **f64), torch.randn(4, **f64)
        blocks = 3 if "blocks" in layout else 1
        assert torch.autograd.gradcheck(lambda *t: FusedLinearLoRA.apply(*t, 0.7, fold, blocks), (x, w, bias, a, b))
        return
    memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).to(memory_format=memory).requires_grad_()
    w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64).to(memory_format=memory).requires_grad_()
    bias = torch.randn(4, **f64)
    # Returned as an NHWC view for channels_last, so the gradient that reaches the
    # backward is channels_last too, as it is from the next layer of a real model.
    order = (0, 2, 3, 1) if layout == "channels_last" else (0, 1, 2, 3)
    geometry = ([1, 1], [0, 0], [1, 1]) if layout == "pointwise" else ([2, 1], [1, 1], [1, 1])
    conv = lambda *t: FusedConvLoRA.apply(*t, 0.5, fold, *geometry).permute(order)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w, bias, a, b))


@pytest.mark.parametrize("fold", [False, True], ids=["on W", "on W + ΔW"])
@pytest.mark.parametrize("layout", ["linear", "contiguous", "channels_last"])
def test_fused_backward_of_an_empty_batch(layout, fold):
    """A batch without rows (a ragged batch's empty part) still trains: the rank-r
    products sum over no rows, so A's and B's gradients are zeros of their shapes,
    not an error."""
    from lora_anywhere.kernels import FusedConvLoRA, FusedLinearLoRA

    a, b = torch.randn(2, 27, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    if layout == "linear":
        x, w = torch.randn(0, 27, requires_grad=True), torch.randn(4, 27)
        y = FusedLinearLoRA.apply(x, w, None, a, b, 0.7, fold, 1)
    else:
        memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(0, 3, 5, 5).to(memory_format=memory).requires_grad_()
        y = FusedConvLoRA.apply(x, torch.randn(4, 3, 3, 3), None, a, b, 0.5, fold, [1, 1], [1, 1], [1, 1])
    y.sum().backward()
    assert y.shape[0] == 0 and x.grad.shape == x.shape
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("blocks", ["q,v", "k", "q,k,v"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_packed_row_blocks_unmerged_equal_merged_to_the_bit(blocks, autocast):
    """W + ΔW of some row blocks of a packed projection (one addmm per block, W's own
    rows between them) is what merging writes into W, bit for bit, with and without
    autocast; training through it gives gradients to the adapted blocks' factors."""
    torch.manual_seed(0)
    model = la.apply(nn.MultiheadAttention(8, 2), rank=2, route="weight", targets=f"MultiheadAttention:{blocks}")
    randomize_adapters(model, seed=1)
    x = torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, x, x)[0]
        out.float().sum().backward()
        with torch.no_grad():
            unmerged = model(x, x, x)[0]
            la.merge(model)
            merged = model(x, x, x)[0]
    assert torch.equal(unmerged, merged)
    assert torch.equal(out.detach(), merged)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[3] for n in grads} == set(blocks.split(","))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
