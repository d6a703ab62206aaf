"""Rules for every weight layer in torch.nn — the built-in plugin.

Registered through the same `lora_anywhere_register_rules` hook as any third-party
plugin. Each rule is exact on both routes: the activation route (where offered) and the
weight route give the same numbers, and so does the merged weight.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import depthwise
from ..hookspecs import hookimpl
from ..kernels import conv_lora, conv_positions, linear_lora, linear_rows, many_rows, one_position
from ..rule import Rule, Target

#: The one target of a layer that adapts its whole `weight`.
WEIGHT_TARGET = (Target("weight", "weight"),)


class LinearRule(Rule):
    """y = x Wᵀ + b. On activations: ``+ s · (x Aᵀ) Bᵀ``, as one autograd function
    (`kernels.FusedLinearLoRA`) when a single adapter runs without dropout."""

    name = "torch.nn.Linear"
    activation_base = nn.Linear

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return WEIGHT_TARGET

    def prefers_activation(self, layer: nn.Module, rank: int) -> bool:
        out_features, in_features = layer.weight.shape
        return wide_matrix(out_features, in_features, LINEAR_WIDTH)

    def weight_cheaper_without_grad(self, layer, weight, x):  # type: ignore[override]
        return many_rows(linear_rows(x), *weight.shape)

    def weight_cheaper_with_grad(self, layer, weight, rank, x):  # type: ignore[override]
        return small_training_call(x, linear_rows(x), *weight.shape, rank, conv=False)

    def stacks_samples(self, layer: nn.Module) -> bool:
        return True

    def forward(self, layer, weight, terms, x):  # type: ignore[override]
        if len(terms) == 1 and terms[0].rank_mask is not None:
            t = terms[0]
            return add_low_rank(F.linear(x, weight, layer.bias), t.mask_ranks(F.linear(x, t.a)), t.b, -1)
        if len(terms) == 1 and not terms[0].dropout_active:
            t = terms[0]
            return linear_lora(x, weight, layer.bias, t.a, t.b, t.scale)
        y = F.linear(x, weight, layer.bias)
        for t in terms:
            y = y + F.linear(F.linear(t.dropout(x), t.a) * t.scale, t.b)
        return y


def wide_matrix(out: int, cols: int, width: int) -> bool:
    """Whether training on the activations beats the weight route for an out × cols
    matrix: whether out·cols/(out + cols) exceeds `width`. The weight route's extra
    cost is a weight gradient, ∝ out·cols per row; the activation route's is a few
    passes over rows of width out + cols. The widths are measured per layer on CPU
    (bench/layer_paths.py): see `LINEAR_WIDTH` and `CONV_WIDTH`."""
    return out * cols > width * (out + cols)


#: Linear layers train faster on activations above this width (ViT-S, wav2vec2, Swin-T's
#: first stage at 96 × 288: width 72) and on the weight route up to it (Conformer's
#: 80 × 256: width 61): a Linear's weight gradient is one efficient GEMM
#: (bench/layer_paths.py). A GCNConv's `lin` stays on W + ΔW whatever its width, for
#: the conv's low-rank aggregation (`plan.activation_owners`).
LINEAR_WIDTH = 64
#: Ungrouped convs train faster on activations above this width (ResNet-50's 3×3
#: convs and its stages 2–4) and on the weight route up to it (a 1×1 conv 64 → 64):
#: a conv's weight gradient costs more than a GEMM of its size.
CONV_WIDTH = 48


def add_low_rank(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``y + B z`` over the channels at `channel_dim` of `z` (rank r) and `y` (rows of B);
    in place without autograd, where y is a fresh output nobody else holds."""
    if (torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or b.requires_grad)) or not y.is_contiguous():
        return y + torch.movedim(torch.movedim(z, channel_dim, -1) @ b.t(), -1, channel_dim)
    if channel_dim in (-1, y.dim() - 1):
        y.view(-1, y.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), b.t().to(y.dtype))
        return y
    n = y.shape[0]
    y.view(n, y.shape[1], -1).baddbmm_(b.to(y.dtype).expand(n, *b.shape), z.reshape(n, z.shape[1], -1))
    return y


#: A conv call on the CPU whose weight route adds fewer multiply-adds than this — the
#: weight gradient, positions·out·cols, and A's and B's from it, 3·r·out·cols —
#: trains faster on W + ΔW than with the activation route's extra kernels (per layer,
#: bench/layer_paths.py: MobileNetV3's pointwise convs at 60M and below lose on the
#: activations, ResNet-50's 1×1 and 3×3 convs from 210M up win).
SMALL_CONV_CALL = 100_000_000
#: The same bound for a Linear's or conv's training call on a GPU (any device but the
#: CPU). There a call's extra kernels cost launches and passes over the activations
#: whatever their arithmetic, and a weight gradient below ~10¹¹ FLOPs takes well under
#: 0.2 ms on an H100/H200: in the one H200 run (bf16, batch 64; docs/benchmarks.md),
#: whose layers' calls all stay below 2·10¹⁰, the weight route trained ResNet-50 and
#: wav2vec2-base about 25 % faster than `auto` did with their wide layers on the
#: activations, and no model measurably slower.
#: Above it (a 4096 × 4096 Linear over 8k tokens: 1.4·10¹¹) the weight gradient's GEMM
#: costs more than the activation route saves. Not measured per layer on a GPU yet.
SMALL_CALL_OFF_CPU = 50_000_000_000


def small_training_call(x: torch.Tensor, rows: int, out: int, cols: int, rank: int, *, conv: bool) -> bool:
    """Whether a training call of a layer on the activation route is better served by
    W + ΔW: whether its weight route adds fewer multiply-adds than `SMALL_CONV_CALL`
    (a conv on the CPU; the CPU trains Linears above `LINEAR_WIDTH` faster on the
    activations at any rows) or `SMALL_CALL_OFF_CPU` (a Linear or conv elsewhere)."""
    cost = (rows + 3 * rank) * out * cols
    if x.device.type == "cpu":
        return conv and cost < SMALL_CONV_CALL
    return cost < SMALL_CALL_OFF_CPU


_CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvRule(Rule):
    """ConvNd with any kernel, stride, padding (incl. "same"), dilation, padding_mode
    and groups. The matrix is out × (in/groups · k…), shared by the groups, so any rank
    up to that matrix's full rank works, depthwise convs included.

    On activations, A is a conv with the layer's own geometry (``layer._conv_forward``
    applies padding_mode, padding, stride, dilation and groups exactly as the layer
    does) and g·r output channels; B is a grouped 1×1 conv. Ungrouped convs with one
    adapter and no dropout run as one autograd function (`kernels.py`). Grouped convs
    train on W + ΔW; on the CPU a 2-D depthwise conv with a kernel of 16 taps or more
    forms that weight gradient on channels_last copies (`layer_forward`,
    `lora_anywhere.depthwise`), which oneDNN runs faster.
    """

    def __init__(self, base: type) -> None:
        self.activation_base = base
        self.name = f"torch.nn.{base.__name__}"
        self.dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[base]

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return WEIGHT_TARGET

    def prefers_activation(self, layer: nn.Module, rank: int) -> bool:
        # Ungrouped only: a grouped conv's activation route is the unfused loop.
        return layer.groups == 1 and wide_matrix(layer.out_channels, layer.in_channels * math.prod(layer.kernel_size), CONV_WIDTH)

    def activation_saves_memory(self, layer: nn.Module) -> bool:
        # A grouped conv's A runs per group: g·r channels, r times the output's size.
        return layer.groups == 1

    def weight_cheaper_without_grad(self, layer, weight, x):  # type: ignore[override]
        if one_position(layer, x):  # the fused call is a matmul, the layer's own a slower conv
            return False
        return many_rows(conv_positions(layer, x), weight.shape[0], weight[0].numel())

    def weight_cheaper_with_grad(self, layer, weight, rank, x):  # type: ignore[override]
        if x.device.type == "cpu" and one_position(layer, x):
            return False
        return small_training_call(x, conv_positions(layer, x), weight.shape[0], weight[0].numel(), rank, conv=True)

    def stacks_samples(self, layer: nn.Module) -> bool:
        return layer.groups == 1

    def offers_layer_forward(self, layer: nn.Module) -> bool:
        return self.supports_activation(layer) and depthwise.slow_nchw_weight_grad(layer)

    def layer_forward(self, layer, parts, *args, **kwargs):  # type: ignore[override]
        # A depthwise conv on W + ΔW, as the weight route runs it, with the weight
        # gradient on channels_last copies where oneDNN forms it faster (`depthwise`).
        if kwargs or len(args) != 1 or not depthwise.applies(layer, args[0]):
            return NotImplemented
        return depthwise.conv(layer, args[0], layer.weight)

    def forward(self, layer, weight, terms, x):  # type: ignore[override]
        g = layer.groups
        if len(terms) == 1 and terms[0].rank_mask is not None:  # ungrouped
            t = terms[0]
            z = t.mask_ranks(layer._conv_forward(x, t.a.view(-1, *weight.shape[1:]), None), channel_dim=-self.dims - 1)
            return add_low_rank(layer._conv_forward(x, weight, layer.bias), z, t.b, -self.dims - 1)
        if g == 1 and len(terms) == 1 and not terms[0].dropout_active:
            t = terms[0]
            return conv_lora(layer, x, weight, t.a, t.b, t.scale)
        y = layer._conv_forward(x, weight, layer.bias)
        ones = (1,) * self.dims
        for t in terms:
            r = t.a.shape[0]
            a_kernel = t.a.view(r, *weight.shape[1:])
            if g > 1:
                a_kernel = a_kernel.repeat(g, *(1,) * (a_kernel.dim() - 1))
            z = layer._conv_forward(t.dropout(x), a_kernel, None) * t.scale
            y = y + _CONV_FN[self.dims](z, t.b.reshape(t.b.shape[0], r, *ones), groups=g)
        return y


class ConvTransposeRule(Rule):
    """ConvTransposeNd incl. output_padding, dilation and groups. The weight is
    in × out/groups × k…, so the matrix rows are the input channels, and the output
    channels are its second dimension (with groups, output channel j of every group
    shares DoRA's magnitude j). Weight route."""

    def __init__(self, base: type) -> None:
        self.name = f"torch.nn.{base.__name__}"

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return WEIGHT_TARGET

    def output_dim(self, layer: nn.Module, target: Target) -> int:
        return 1


class EmbeddingRule(Rule):
    """Embedding: the matrix is num_embeddings × dim, ΔW = s·B A with B a zero table of
    rank-r rows. B's padding_idx row starts at zero and gets no gradient on either route,
    so the padding row is never adapted. With ``max_norm`` the renormalisation must see
    W + ΔW, so such a layer takes the weight route (and, unlike the plain layer, leaves
    the frozen base rows as they are)."""

    name = "torch.nn.Embedding"
    activation_base = nn.Embedding

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return WEIGHT_TARGET

    def supports_activation(self, layer: nn.Module) -> bool:
        return layer.max_norm is None and super().supports_activation(layer)

    def output_dim(self, layer: nn.Module, target: Target) -> int:
        return 1  # num_embeddings × dim: the output features are the columns

    def weight_cheaper_without_grad(self, layer, weight, x):  # type: ignore[override]
        # Each looked-up row costs r·dim on activations; ΔW costs r·dim per table row.
        return x.numel() >= weight.shape[0]

    def forward(self, layer, weight, terms, x):  # type: ignore[override]
        y = F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse)
        for t in terms:
            rows = F.embedding(x, t.b, layer.padding_idx, None, 2.0, layer.scale_grad_by_freq, False)
            y = y + t.select_samples(rows @ (t.a * t.scale))
        return y


class MultiheadAttentionRule(Rule):
    """nn.MultiheadAttention: the q, k and v blocks of the packed ``in_proj_weight``
    (or ``q/k/v_proj_weight`` when kdim/vdim differ) and ``out_proj``. The module
    hands these tensors to ``F.multi_head_attention_forward`` itself, so only the
    weight route is exact; targets ``"q"``, ``"k"``, ``"v"``, ``"out"`` pick blocks."""

    name = "torch.nn.MultiheadAttention"

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        e = layer.embed_dim
        if layer._qkv_same_embed_dim:
            qkv = [Target(n, "in_proj_weight", rows=(i * e, (i + 1) * e)) for i, n in enumerate("qkv")]
        else:
            qkv = [Target(n, f"{n}_proj_weight") for n in "qkv"]
        return (*qkv, Target("out", "weight", owner="out_proj"))


class RNNRule(Rule):
    """RNN, LSTM (incl. proj_size) and GRU: every input, hidden and projection matrix
    of every layer and direction (``weight_ih_l0``, ``weight_hh_l1_reverse``, …)."""

    name = "torch.nn.RNNBase"

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return tuple(Target(n, n) for n in layer._flat_weights_names if n.startswith("weight_"))


class RNNCellRule(Rule):
    """RNNCell, LSTMCell and GRUCell: ``weight_ih`` and ``weight_hh``, weight route
    (the cell hands both to a fused kernel)."""

    name = "torch.nn.RNNCellBase"

    def targets(self, layer: nn.Module) -> Sequence[Target]:
        return (Target("weight_ih", "weight_ih"), Target("weight_hh", "weight_hh"))


@hookimpl
def lora_anywhere_register_rules(register: Callable[[type, Rule], None]) -> None:
    register(nn.Linear, LinearRule())
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register(conv, ConvRule(conv))
    for conv in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register(conv, ConvTransposeRule(conv))
    register(nn.Embedding, EmbeddingRule())
    register(nn.MultiheadAttention, MultiheadAttentionRule())
    register(nn.RNNBase, RNNRule())
    register(nn.RNNCellBase, RNNCellRule())


@hookimpl
def lora_anywhere_register_presets(register: Callable[[str, Any], None]) -> None:
    register("all", None)
