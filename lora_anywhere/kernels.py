"""Activation-route LoRA for Linear and ConvNd as single autograd functions.

``y = layer(x) + s·B(A(x))``: z = A(x) has r channels, and the backward forms the
input gradient and the gradients of A and B only: no gradient of the frozen W is ever
formed, which is what keeps LoRA near the floor of training only biases.

The base product itself runs one of two ways, chosen per call by the rows it sees
(`folds_delta`): on W, with ``s·B z`` added into its output in place, or — where the
rows outnumber the weight's entries enough — on W + s·B A, formed for the call (and
again in the backward, so nothing more is kept). Folded, the forward and the input
gradient are one product each, as in the frozen layer, instead of a product plus a
pass over its output; A's and B's gradients still come from the activations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch.autograd import forward_ad as _forward_ad
from torch.nn import functional as F

from .errors import LoraError

_conv_backward = torch.ops.aten.convolution_backward.default


class FusedLinearLoRA(torch.autograd.Function):
    """The base matmul as in the frozen layer, A's projection z = x Aᵀ (kept as
    blocks of its r × N transpose, `rank_blocks`), and ``s·z Bᵀ`` accumulated into
    the output in place. (One matmul over ``[W; A]`` reads x once but must copy W and
    then split its output: measured slower, by up to 13 % of the frozen layer's step,
    on ViT-S and ViT-B shapes.)"""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        fold: bool,
        blocks: int,
    ) -> torch.Tensor:
        y, z = _linear_forward(x, weight, bias, a, b, scale, fold, blocks)
        # x is kept only for weight gradients: with A frozen (LoRA-FA) it is not.
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if keep_x else None, weight, a, b, z)
        ctx.x_shape = x.shape
        ctx.conf = (scale, fold, blocks, bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, z = ctx.saved_tensors
        s, fold, blocks, has_bias = ctx.conf
        if torch.is_grad_enabled():  # create_graph=True
            return recorded_backward(ctx, grad, lambda x, w, a, b: unfused_linear(x, w, None, a, b, s), x, weight, a, b, -1)
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        g_blocks = _row_blocks(g, blocks)
        # The rank-r products are formed with r rows (r × N, r × out), never r
        # columns: same FLOPs, but BLAS runs the N × r and out × r shapes up to 5×
        # slower on the CPU (bench/skinny_matmul.py).
        gz = per_sample_mm(b.t(), g_blocks.transpose(-2, -1)) if need_a or (need_x and not fold) else None  # unscaled
        gx = gw = gbias = ga = gb = None
        if need_x and fold:
            gx = torch.mm(g, plus_low_rank(weight, b, a, s)).view(ctx.x_shape)
        elif need_x:
            gx = torch.mm(g, weight)
            _add_product_(_row_blocks(gx, blocks), gz.transpose(-2, -1), a, s)
            gx = gx.view(ctx.x_shape)
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        if need_a:
            ga = _block_sum(scaled_mm(gz, _row_blocks(x2, blocks), s))
        if need_b:
            gb = _block_sum(scaled_mm(z, g_blocks, s)).t().contiguous()
        if need_w:
            gw = torch.mm(g.t(), x2)
        if need_bias and has_bias:
            gbias = g.sum(0)
        return gx, gw, gbias, ga, gb, None, None, None


def _linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float, fold: bool,
    blocks: int, keep_z: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """y = x Wᵀ + bias + s·(x Aᵀ) Bᵀ, and A's projection z (as `blocks` blocks of its
    r × N transpose) where the backward needs it."""
    x2 = x.reshape(-1, x.shape[-1])
    # Written through a view into a fresh tensor, so the output is not itself a
    # view: an in-place op after the layer (Hardswish(inplace=True)) must work.
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    y2 = y.view(-1, weight.shape[0])
    w = plus_low_rank(weight, b, a, scale) if fold else weight
    if bias is None:
        torch.mm(x2, w.t(), out=y2)
    else:
        torch.addmm(bias, x2, w.t(), out=y2)
    if fold and not keep_z:
        return y, None
    # A's projection with r rows, never r columns: see `FusedLinearLoRA.backward`.
    z = per_sample_mm(a, _row_blocks(x2, blocks).transpose(-2, -1))  # r × N, or (blocks, r, N / blocks)
    if not fold:
        _add_product_(_row_blocks(y2, blocks), z.transpose(-2, -1), b.t(), scale)
    return y, z


def _row_blocks(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """A matrix's rows as `blocks` equal blocks, (blocks, rows / blocks, cols); one block
    is the matrix itself: its products run as plain matmuls, with four to five view ops
    fewer per call than a batch of one (a few microseconds each: small calls, and a
    GPU's host, feel them)."""
    return t if blocks == 1 else t.view(blocks, -1, t.shape[-1])


def _add_product_(y: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, alpha: float) -> None:
    """``y += alpha · m1 @ m2`` in place, for a matrix y or a batch of them sharing m2."""
    if y.dim() == 2:
        y.addmm_(m1, m2, alpha=alpha)
    else:
        y.baddbmm_(m1, m2.expand(y.shape[0], *m2.shape), alpha=alpha)


def _block_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of a product's per-block terms (a matrix, from one block: itself)."""
    return t if t.dim() == 2 else t.sum(0)


def _linear_output(*args: Any) -> tuple[torch.Tensor, None]:
    return _linear_forward(*args, keep_z=False)[0], None


def recorded_backward(
    ctx: Any,
    grad: torch.Tensor,
    plain: Any,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    channel_dim: int,
) -> tuple[Any, ...]:
    """The gradients of a fused function (arguments x, weight, bias, A, B, …) for a
    backward with ``create_graph=True`` — a gradient penalty, a second-order method —
    as autograd forms them from `plain(x, weight, A, B)`, the function without its bias
    in differentiable ops, on the saved inputs: with a graph of their own. The fused
    backward forms them from tensors saved without one (A's output z), which a second
    backward would take for constants. `channel_dim` is the output's channel dimension."""
    if x is None:
        raise LoraError(
            "a backward with create_graph=True reached a layer adapted with a frozen A (LoRA-FA) on the activation route, "
            "which keeps no copy of its input to differentiate through; apply with route='weight' for such a use"
        )
    needs = ctx.needs_input_grad
    wanted = [(i, t) for i, t in ((0, x), (1, weight), (3, a), (4, b)) if needs[i]]
    grads: list[Any] = [None] * len(needs)
    if wanted:
        with torch.enable_grad():
            out = plain(x, weight, a, b)
        found = torch.autograd.grad(out, [t for _, t in wanted], grad, create_graph=True)
        for (i, _), g in zip(wanted, found):
            grads[i] = g
    if needs[2]:  # the bias's: the output gradient summed over all but the channels
        grads[2] = grad.sum([d for d in range(grad.dim()) if d != channel_dim % grad.dim()])
    return tuple(grads)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls and convs in on this device, or None."""
    if not _any_autocast():  # one call where autocast is off, as it mostly is
        return None
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except TypeError:  # torch < 2.4: one pair of functions per device type
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _apply(function: Any, plain: Any, x: torch.Tensor, *tensors: torch.Tensor | None, rest: tuple = ()) -> torch.Tensor:
    """Run an autograd function as autocast would run the ops inside it: their own
    mixed-dtype calls (addmm_ into a bf16 output with fp32 factors) would fail, so
    the inputs are cast to autocast's dtype first and the function runs without it.
    Where no gradient can flow (inference, evaluation) its forward, `plain`, runs
    alone: the autograd function's own cost per call is what small layers pay most."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return _run(function, plain, (x, *tensors, *rest))
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors)]
    with torch.autocast(x.device.type, enabled=False):
        return _run(function, plain, (*cast, *rest))


def _run(function: Any, plain: Any, args: tuple) -> torch.Tensor:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return function.apply(*args)
    return plain(*args)[0]


def linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    if plain_ops_only():
        return unfused_linear(x, weight, bias, a, b, scale)
    rows = linear_rows(x)
    fold = folds_delta(x, "matmul", rows, *weight.shape)
    return _apply(FusedLinearLoRA, _linear_output, x, weight, bias, a, b, rest=(scale, fold, rank_blocks(x, rows)))


def unfused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``x Wᵀ + bias + s·(x Aᵀ) Bᵀ`` in plain differentiable ops: what `FusedLinearLoRA` computes."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b) * scale


def unfused_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """The base conv plus s·B(A(x)) in plain differentiable ops (A a conv with the
    layer's geometry, B a 1×1 conv): what `FusedConvLoRA` computes."""
    conv, ones = _CONV[weight.dim() - 2], [1] * (weight.dim() - 2)
    z = conv(x, a.view(a.shape[0], *weight.shape[1:]), None, stride, padding, dilation)
    return conv(x, weight, bias, stride, padding, dilation) + conv(z, b.view(*b.shape, *ones)) * scale


_functorch_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)


_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def plain_ops_only() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jvp: per-sample gradients…),
    forward-mode AD (`torch.autograd.forward_ad`) or `torch.export` is running: they
    need plain ops, which they know how to transform or trace, not an autograd function
    (which would need a rule of its own for each of vmap and jvp, and whose `out=`
    products export refuses)."""
    return _functorch_stack() is not None or getattr(_forward_ad, "_current_level", -1) >= 0 or _exporting()


#: The fewest rows a block of `rank_blocks` holds.
BLOCK_ROWS = 64


def rank_blocks(x: torch.Tensor, rows: int) -> int:
    """In how many equal blocks of rows a fused Linear call forms its rank-r products,
    as one batched matmul: on the CPU one block per thread, where the rows divide
    evenly into blocks of at least `BLOCK_ROWS`; elsewhere, and in a compiled graph
    (which plans its own products), one. On 2 threads one r-row product over all rows
    ran up to 2.2× slower than the same product in 2 blocks (bench/skinny_matmul.py);
    only the order of the sums over rows changes."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return 1
    blocks = min(torch.get_num_threads(), rows // BLOCK_ROWS)
    while blocks > 1 and rows % blocks:
        blocks -= 1
    return max(blocks, 1)


def many_rows(rows: int, out: int, cols: int) -> bool:
    """Whether A and B on `rows` rows (rows·r·(out + cols) multiply-adds, and passes
    over rows of width out + cols) cost at least as much as forming ΔW = B·A once
    (out·r·cols): the choice of the Linear-like and conv rules between W + ΔW and
    the activations, with and without gradients."""
    return rows * (out + cols) >= out * cols


def folds_delta(x: torch.Tensor, op: str, rows: int, out: int, cols: int) -> bool:
    """Whether the base product of a fused call runs on W + s·B A (see the module's
    docstring): with many rows, and only where the product keeps fp32's precision.
    In bf16, fp16 or TF32, rounding W + ΔW to the compute dtype would drop a small ΔW
    that the separate term ``s·B z`` keeps, so those calls stay unfolded. (`op` is
    "matmul" or "conv": CUDA's TF32 switches are separate for the two.)"""
    dtype = autocast_dtype(x.device.type) or x.dtype  # what the product computes in
    if dtype not in (torch.float32, torch.float64) or not many_rows(rows, out, cols):
        return False
    if x.device.type != "cuda" or dtype == torch.float64:
        return True
    if op == "conv":
        return not torch.backends.cudnn.allow_tf32
    return torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FusedConvLoRA(torch.autograd.Function):
    """Ungrouped ConvNd with explicit symmetric padding (the caller pads otherwise).

    As for Linear, A does not run inside the base conv: a conv over ``[W; A]``
    returns ``[y; z]`` interleaved per sample, and taking y out of it cost more passes
    over the output than the base conv itself on oneDNN (measured per layer with
    bench/layer_paths.py). So the base conv runs on W + s·B A (folded) or on W, with
    ``s·B z`` accumulated into y in place by one batched matmul — or, for
    channels_last tensors, one plain matmul over the (positions × channels) rows.
    z = A(x) is a conv with r outputs (for a 1×1 conv, a matmul over positions); the
    backward mirrors it.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float,
                fold: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:  # fmt: skip
        y, z = _conv_forward(x, weight, bias, a, b, scale, fold, stride, padding, dilation)
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x if keep_x else None, weight, a, b, z)
        ctx.x_shape = x.shape
        ctx.conf = (scale, fold, list(stride), list(padding), list(dilation), bias is not None)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, z = ctx.saved_tensors
        scale, fold, stride, padding, dilation, has_bias = ctx.conf
        dims = weight.dim() - 2
        if torch.is_grad_enabled():  # create_graph=True

            def plain(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                return unfused_conv(x, w, None, a, b, scale, stride, padding, dilation)

            return recorded_backward(ctx, grad, plain, x, weight, a, b, 1)
        a_kernel = a.view(a.shape[0], *weight.shape[1:])
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        n, out, r = grad.shape[0], weight.shape[0], a_kernel.shape[0]
        g_rows, z_rows = channel_rows(grad), channel_rows(z)
        rows_layout = g_rows is not None and z_rows is not None  # channels_last; r rows, as in FusedLinearLoRA
        if not rows_layout:
            grad = grad.contiguous()
            g3 = grad.view(n, out, -1)
        gz = None  # s·Bᵀ grad, A's output gradient: for A's gradient, and for x's where not folded
        if need_a or (need_x and not fold):
            if rows_layout:
                gz = scaled_mm(b.t(), g_rows.t(), scale).view(r, n, *grad.shape[2:]).movedim(0, 1)
            else:
                gz = per_sample_mm(b.t(), g3, scale).view(n, r, *grad.shape[2:])
        no_pad = [0] * dims
        gx = gw = gbias = ga = gb = None
        # A 1×1 conv over NCHW tensors: A's terms are matmuls over positions (as in the
        # forward), and the input gradient needs no copies of grad and W side by side.
        point = pointwise(weight, stride, padding) and not rows_layout and (x is None or x.is_contiguous())
        if need_x:
            # The input-gradient conv needs x's shape only (as torch.nn.grad.conv2d_input
            # does), so a frozen A keeps no copy of x.
            shape_only = x if x is not None else grad.new_empty(1).expand(ctx.x_shape)
            if fold:
                w = plus_low_rank(weight, b, a_kernel, scale)
                gx = _conv_backward(grad, shape_only, w, None, stride, padding, dilation, False, no_pad, 1, [True, False, False])[0]
            elif point:
                gx = _conv_backward(grad, shape_only, weight, None, stride, padding, dilation, False, no_pad, 1, [True, False, False])[0]
                a_t, gz3 = a_kernel.view(r, -1).t(), gz.view(n, r, -1)
                if gx.is_contiguous():
                    gx.view(n, a_t.shape[0], -1).baddbmm_(a_t.expand(n, *a_t.shape), gz3)
                else:
                    gx = gx + per_sample_mm(a_t, gz3).view(gx.shape)
            else:  # one input-gradient conv through [W; A]
                gx = _conv_backward(
                    torch.cat([grad, gz], 1),
                    shape_only,
                    torch.cat([weight, a_kernel]),
                    None,
                    stride,
                    padding,
                    dilation,
                    False,
                    no_pad,
                    1,
                    [True, False, False],
                )[0]
        if need_a:
            if point:
                ga = torch.bmm(gz.view(n, r, -1), x.view(n, x.shape[1], -1).transpose(1, 2)).sum(0)
            else:
                ga = _conv_backward(gz, x, a_kernel, None, stride, padding, dilation, False, no_pad, 1, [False, True, False])[1].reshape(
                    r, -1
                )
        if need_w:
            gw = _conv_backward(grad, x, weight, None, stride, padding, dilation, False, no_pad, 1, [False, True, False])[1]
        if need_b:
            if rows_layout:
                gb = scaled_mm(z_rows.t(), g_rows, scale).t().contiguous()
            else:
                gb = scaled_mm(z.reshape(n, r, -1), g3.transpose(1, 2), scale).sum(0).t().contiguous()
        if need_bias and has_bias:
            gbias = grad.sum(dim=[0, *range(2, grad.dim())])
        return gx, gw, gbias, ga, gb, None, None, None, None, None


def _conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float,
                  fold: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  keep_z: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The base conv's output plus s·B z, and A's output z where the backward needs it."""
    dims = weight.dim() - 2
    n, r = x.shape[0], a.shape[0]
    a_kernel = a.view(r, *weight.shape[1:])
    y = _CONV[dims](x, plus_low_rank(weight, b, a, scale) if fold else weight, bias, stride, padding, dilation)
    if fold and not keep_z:
        return y, None
    if pointwise(weight, stride, padding) and x.is_contiguous():
        # A 1×1 conv is a matmul over positions: with r outputs a plain matmul skips
        # most of a oneDNN conv's fixed cost per call, which small inputs feel.
        z = per_sample_mm(a, x.view(n, x.shape[1], -1)).view(n, r, *x.shape[2:])
    else:
        z = _CONV[dims](x, a_kernel, None, stride, padding, dilation)
    if fold:
        return y, z
    y_rows, z_rows = channel_rows(y), channel_rows(z)
    if y_rows is not None and z_rows is not None:  # channels_last
        y_rows.addmm_(z_rows, b.t(), alpha=scale)
    elif y.is_contiguous():
        y.view(n, y.shape[1], -1).baddbmm_(b.expand(n, *b.shape), z.reshape(n, r, -1), alpha=scale)
    else:
        y = y + per_sample_mm(b, z.reshape(n, r, -1), scale).view(y.shape)
    return y, z


def _conv_output(*args: Any) -> tuple[torch.Tensor, None]:
    return _conv_forward(*args, keep_z=False)[0], None


def plus_low_rank(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale·B·A in W's shape, as one addmm: the op `merge_block` runs in place, so
    merged, unmerged and folded calls agree to the bit. A 2-D W is not reshaped: one op
    less per call, which small layers feel."""
    if a.dim() != 2:  # a conv's A as a kernel (the fused conv's backward)
        a = a.reshape(a.shape[0], -1)
    if w.dim() == 2:
        return torch.addmm(w, b, a, alpha=scale)
    return torch.addmm(w.reshape(b.shape[0], -1), b, a, alpha=scale).view(w.shape)


def scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · m1 @ m2`` (matrices, or batches of them) as one op where a product and
    a multiply would be two: addmm and baddbmm with beta=0 ignore their first argument
    (NaN included), which only has to broadcast to the result (m1's first column does)."""
    if m1.shape[-1] == 0:  # an empty sum (no rows in the batch): zeros, and no column to broadcast
        return torch.matmul(m1, m2)
    if m1.dim() == 2:
        return torch.addmm(m1[:, :1], m1, m2, beta=0, alpha=scale)
    return torch.baddbmm(m1[..., :1], m1, m2, beta=0, alpha=scale)


def per_sample_mm(m: torch.Tensor, t: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``m @ t[i]`` for every sample i of a (n, k, P) tensor, as one batched matmul
    (times `scale` inside it, `scaled_mm`, where given); a k × P matrix t gives m @ t.
    ``torch.matmul(m, t)`` would fold the batch into the rows instead, which copies all
    of t transposed and then its result back: on a 1×1 conv's input that copy cost more
    than the product itself (bench/layer_paths.py)."""
    if t.dim() == 2:
        return torch.mm(m, t) if scale is None else scaled_mm(m, t, scale)
    batched = m.expand(t.shape[0], *m.shape)
    return torch.bmm(batched, t) if scale is None else scaled_mm(batched, t, scale)


def linear_rows(x: torch.Tensor) -> int:
    """The rows a Linear-like call computes for `x` (every dimension but the features)."""
    return x.numel() // max(x.shape[-1], 1)


def conv_positions(layer: Any, x: torch.Tensor) -> int:
    """The output positions a conv computes for `x`, batched or not (about: padding
    and dilation aside)."""
    channels = x.shape[-len(layer.kernel_size) - 1]
    return x.numel() // max(channels, 1) // math.prod(layer.stride)


def one_position(layer: Any, x: torch.Tensor) -> bool:
    """Whether a conv call is a Linear over channels: a 1×1 kernel without padding on
    an input of one position, as in squeeze-excitation blocks. On the CPU a matmul
    does it several times faster than oneDNN's conv, whose fixed cost per call is
    most of such a small call, with or without the adapter."""
    dims = len(layer.kernel_size)
    no_padding = isinstance(layer.padding, str) or not any(layer.padding)  # "same"/"valid" pad a 1×1 kernel by 0
    return all(k == 1 for k in layer.kernel_size) and no_padding and all(s == 1 for s in x.shape[-dims:])


def pointwise(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> bool:
    """Whether a conv with this weight, stride and (explicit) padding is a 1×1 conv
    that keeps every position: a matmul over channels. (Dilation is moot at 1×1.)"""
    return all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in stride) and not any(padding)


def channel_rows(t: torch.Tensor) -> torch.Tensor | None:
    """`t` (N, C, …) as a (positions × C) matrix view when its channels are innermost
    in memory (channels_last), else None."""
    rows = t.movedim(1, -1)
    return rows.view(-1, t.shape[1]) if rows.is_contiguous() else None


def explicit_padding(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The layer's padding as symmetric ints, padding `x` itself where the layer's
    padding_mode or an asymmetric "same" needs it (exactly as the layer would). It
    reads the geometry only: `layer.weight` would build W + ΔW on an adapted layer."""
    dims = len(layer.kernel_size)
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), [0] * dims
    if layer.padding == "valid":
        return x, [0] * dims
    if layer.padding != "same":
        return x, list(layer.padding)
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    left = [t // 2 for t in total]
    if all(t % 2 == 0 for t in total):
        return x, left
    pad: list[int] = []
    for t, lo in reversed(list(zip(total, left))):
        pad += [lo, t - lo]
    return F.pad(x, pad), [0] * dims


def conv_lora(layer: Any, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    unbatched = x.dim() == weight.dim() - 1  # (C, L…), which torch's convs accept
    if unbatched:
        x = x.unsqueeze(0)
    if one_position(layer, x):
        n, ones = x.shape[0], [1] * (weight.dim() - 2)
        y = linear_lora(x.reshape(n, -1), weight.reshape(weight.shape[0], -1), layer.bias, a, b, scale).view(n, -1, *ones)
        return y.squeeze(0) if unbatched else y
    x, padding = explicit_padding(layer, x)
    if plain_ops_only():
        y = unfused_conv(x, weight, layer.bias, a, b, scale, list(layer.stride), padding, list(layer.dilation))
        return y.squeeze(0) if unbatched else y
    fold = folds_delta(x, "conv", conv_positions(layer, x), weight.shape[0], weight[0].numel())
    conf = (scale, fold, list(layer.stride), padding, list(layer.dilation))
    y = _apply(FusedConvLoRA, _conv_output, x, weight, layer.bias, a, b, rest=conf)
    return y.squeeze(0) if unbatched else y
