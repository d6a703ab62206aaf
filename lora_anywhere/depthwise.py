"""Weight-route training of depthwise convs whose weight gradient oneDNN forms slowly.

On the CPU, oneDNN forms the weight gradient of a 2-D depthwise conv with a 5×5 or
7×7 kernel over NCHW tensors 1.4–8× slower than over channels_last copies of the same
tensors, copying included: EfficientNet-B0's 5×5 conv of 240 channels at 28² (batch
8) took 54 ms against 11 ms, ConvNeXt-T's first 7×7 conv 163 ms against 33 ms
(`bench/results/depthwise_grad.md`; 3×3 kernels, which it has a fast path for, are
1.7–2.7× faster as they are). MobileNetV3, EfficientNet and ConvNeXt train their
depthwise convs on W + ΔW (their activation route is an unfused loop over groups), so
their LoRA step pays that weight gradient, and so does full fine-tuning. Here the conv
runs as torch runs it, and only its weight gradient is formed on channels_last copies
of the input and the output gradient. Same sums, in another order.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .kernels import autocast_dtype, explicit_padding, plain_ops_only

_conv_backward = torch.ops.aten.convolution_backward.default

#: The fewest kernel taps of a 2-D depthwise conv whose weight gradient is faster on
#: channels_last copies: 4×4 and up (a 3×3 kernel's is about 2× slower that way).
#: 1-D convs keep torch's: Conformer's 31 taps came out from 0.9× to 1.5× that way,
#: by width, length and run, with no gain measurable on the whole benchmark
#: Conformer; shorter kernels slower.
FEWEST_TAPS = 16


def slow_nchw_weight_grad(layer: nn.Module) -> bool:
    """Whether `layer` (a ConvNd) is a 2-D depthwise conv whose weight gradient is
    faster on channels_last tensors on the CPU (see the module's docstring)."""
    return len(layer.kernel_size) == 2 and layer.groups == layer.in_channels > 1 and math.prod(layer.kernel_size) >= FEWEST_TAPS


def applies(layer: nn.Module, x: Any) -> bool:
    """Whether this call takes the channels_last weight gradient: a batched NCHW input
    on the CPU, computed in float32 (in bf16, fp16 and float64 the copies were 3.5–7×
    slower, `bench/results/depthwise_grad.md`; autocast computes convs in bf16 or
    fp16), outside a compiled graph (which plans its own backward) and torch.func's
    transforms and torch.export (which need plain ops)."""
    return (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and autocast_dtype("cpu") is None
        and x.dim() == len(layer.kernel_size) + 2
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
        and not plain_ops_only()
    )


def conv(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s conv of `x` with `weight` (W + ΔW), its weight gradient formed in
    channels_last (where `applies`)."""
    x, padding = explicit_padding(layer, x)
    return ChannelsLastWeightGradConv.apply(x, weight, layer.bias, list(layer.stride), padding, list(layer.dilation), layer.groups)


class ChannelsLastWeightGradConv(torch.autograd.Function):
    """A 2-D conv (explicit symmetric padding) whose backward forms the input and bias
    gradients as torch does, and the weight gradient on channels_last copies. The
    copies live only while it is formed; what is kept for the backward is what torch's
    own conv keeps, the input and the weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, None if bias is None else [bias.shape[0]])
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, bias_sizes = ctx.conf
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias_sizes is not None
        gx = gw = gbias = None
        if need_x or need_bias:
            zeros = [0] * len(stride)
            gx, _, gbias = _conv_backward(
                grad, x, weight, bias_sizes, stride, padding, dilation, False, zeros, groups, [need_x, False, need_bias]
            )
        if need_w:
            gw = _channels_last_weight_grad(grad, x, weight, stride, padding, dilation, groups)
        return gx, gw, gbias, None, None, None, None


def _channels_last_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                               padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:  # fmt: skip
    """The conv's weight gradient from channels_last copies of `grad` and `x`; a 1-D
    conv (`bench/depthwise_grad.py` times them) runs as a 2-D one of height 1."""
    shape, geometry = weight.shape, [stride, padding, dilation]
    if weight.dim() == 3:
        grad, x, weight = grad.unsqueeze(2), x.unsqueeze(2), weight.unsqueeze(2)
        geometry = [[1, stride[0]], [0, padding[0]], [1, dilation[0]]]
    last = torch.channels_last
    gw = _conv_backward(
        grad.contiguous(memory_format=last),
        x.contiguous(memory_format=last),
        weight,
        None,
        *geometry,
        False,
        [0, 0],
        groups,
        [False, True, False],
    )[1]
    return gw.contiguous().view(shape)
