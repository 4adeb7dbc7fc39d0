"""A conv + norm + ReLU that keeps only its inputs for the backward (memory-lean).

Autograd would keep, per conv + norm + ReLU, the conv's input, the conv output (the
norm's input) and the ReLU output. `lean_conv_norm_relu` keeps only the inputs --
which are the previous layer's output, kept anyway by that layer's consumer, so they
cost nothing extra -- and recomputes the conv output in the backward, one layer at a
time. Used by the segmentor when checkpointing is on (coopseg.models.checkpointing
then recomputes a whole U-Net level, and inside it this recomputes one layer at a
time), it roughly halves what a recomputed level holds, at the price of one more
conv forward per layer in the backward.

An up level's first layer also takes the transposed conv (`up`): it stores the
low-resolution input instead of the upsampled tensor (8x smaller in 3-D) and
upsamples again in the backward.

The backward is written out (`_backward_batch_stats`) for the segmentor's case, a
BatchNormNd with batch statistics (training, or ContBatchNorm) and a ReLU, so that
it can order the work to hold as little as possible at once -- the conv's weight
gradient and each input's gradient are separate passes of the conv backward, and
the upsampled tensor (and then its gradient) exists only while it is used:

    recompute c = conv(inputs)            (the upsampled tensor freed once convolved)
    z = norm(c) -> dz = dy where z > 0    (written over z: the ReLU backward)
    dc, dγ, dβ = norm backward(dz, c)     (c, dz freed)
    up level: u = up(x) -> dW_u; u freed -> du -> up's backward -> dx; du freed
    the other inputs: dW_i, dx_i

It calls the aten backward kernels that autograd would call on the same tensors
(ReluBackward, NativeBatchNormBackward, ConvolutionBackward, the autocast casts'
backward, the weight split's backward), so its gradients equal the plain path's.
Other norms (InstanceNorm, a BatchNorm in eval with running statistics) recompute
the layer under autograd in the backward instead (`_backward_autograd`).

Why not the InPlace-ABN idea (store only y = relu(γ x̂ + β) and invert it): with a
plain ReLU the backward of a BatchNorm in training mode needs x̂ everywhere, also
where y = 0 (dL/dx_i = γ/σ (dz_i − mean(dz) − x̂_i · mean(dz x̂)), non-zero where
dz_i = 0), and the ReLU has thrown those values away; InPlace-ABN needs an
invertible (leaky) activation, which would change the Models Genesis network.

Several inputs (the up levels: the upsampled tensor and the skip) are convolved
with the matching input-channel slices of the one conv weight and summed: the same
function as conv(cat(inputs)), without the concatenation (see LUConv).

The recomputation is exact: it runs the same modules under the same autocast state,
and the norm uses batch statistics (training, or ContBatchNorm) or fixed running
statistics (eval), so it gives the first pass's output. The running statistics are
updated in the first pass only (the recomputation runs with them frozen, or, written
out, never calls the norm module).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .norm import BatchNormNd, frozen_running_stats

aten = torch.ops.aten


class _LeanConvNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, up, n_inputs, *args):
        inputs = args[:n_inputs]
        ctx.layer, ctx.up, ctx.n_inputs = layer, up, n_inputs
        dev = inputs[0].device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(*inputs)
        return layer.dense_forward(*inputs, up=up)  # autograd.Function.forward runs without grad

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if _batch_stats_relu(ctx.layer):
            grads = _backward_batch_stats(ctx, dy)
        else:
            grads = _backward_autograd(ctx, dy)
        return (None, None, None, *grads)


def _params(layer, up) -> list[torch.Tensor]:
    return list(layer.parameters()) + (list(up.parameters()) if up is not None else [])


def lean_conv_norm_relu(layer, *inputs, up=None):
    """layer.dense_forward(*inputs, up=up), storing only `inputs` for the backward."""
    return _LeanConvNormReLU.apply(layer, up, len(inputs), *inputs, *_params(layer, up))


def _batch_stats_relu(layer) -> bool:
    bn = layer.bn1
    return (isinstance(bn, BatchNormNd) and (bn.training or bn.continuous)
            and isinstance(layer.activation, nn.ReLU))


def _backward_autograd(ctx, dy):
    """Recompute the layer under autograd and differentiate it (any norm)."""
    layer, up = ctx.layer, ctx.up
    inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
    params = _params(layer, up)
    dev, enabled, dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled), frozen_running_stats(layer):
        y = layer.dense_forward(*inputs, up=up)
    wrt = [x for x in inputs if x.requires_grad] + [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(y, wrt, dy, allow_unused=True))
    g_in = [next(grads) if x.requires_grad else None for x in inputs]
    g_par = {id(p): next(grads) for p in params if p.requires_grad}
    # The parameters reach autograd through the Function's extra arguments.
    return (*g_in, *[g_par.get(id(p)) for p in params])


def _conv_args(conv: nn.Module) -> tuple:
    """convolution_backward's (stride, padding, dilation, transposed, output_padding, groups)."""
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    return (list(conv.stride), list(conv.padding), list(conv.dilation), transposed,
            list(conv.output_padding) if transposed else [0] * len(conv.stride), conv.groups)


def _backward_batch_stats(ctx, dy):
    """The written-out backward: BatchNormNd with batch statistics, ReLU. Returns
    the gradients of (*inputs, *layer parameters, *up parameters)."""
    layer, up, n = ctx.layer, ctx.up, ctx.n_inputs
    need = ctx.needs_input_grad[3:]
    need_x, need_p = need[:n], need[n:]
    conv, bn = layer.conv1, layer.bn1
    xs = list(ctx.saved_tensors)
    dev, enabled, dtype = ctx.autocast

    def cast(t):  # what autocast does to a conv's floating-point arguments
        if t is None or not enabled or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    with torch.no_grad():
        # The first pass's conv output (same modules, same autocast state).
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            c = layer._conv(xs, up)
        z, mean, invstd = aten.native_batch_norm(c, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
        dz = aten.threshold_backward.grad_input(dy, z, 0, grad_input=z)  # ReLU backward, over z
        del z
        bn_mask = [True, bn.weight is not None and bn.weight.requires_grad,
                   bn.bias is not None and bn.bias.requires_grad]
        dc, dgamma, dbeta = aten.native_batch_norm_backward(dz, c, bn.weight, None, None, mean, invstd, True,
                                                            bn.eps, bn_mask)
        del dz, c

        w = conv.weight
        sizes = layer.input_channels(xs, up)
        w_parts = w.split(sizes, 1) if len(xs) > 1 else (w,)
        args = _conv_args(conv)
        dw_parts, db = [], None
        dxs: list = [None] * n
        for i, (x, wi) in enumerate(zip(xs, w_parts)):
            bias_sizes = [conv.bias.shape[0]] if (i == 0 and conv.bias is not None) else None
            wc = cast(wi)
            if i == 0 and up is not None:
                # The upsampled tensor: its weight gradient first, then free it, then its
                # gradient, which up's backward turns into the low-resolution one.
                with torch.autocast(dev, dtype=dtype, enabled=enabled):
                    u = up(x)
                _, dwi, dbi = aten.convolution_backward(dc, u, wc, bias_sizes, *args,
                                                        [False, w.requires_grad, bias_sizes is not None])
                del u
                # (its input only gives the shape here, as in torch.nn.grad.conv3d_input)
                shape_only = dc.new_empty(1).expand(dc.shape[0], sizes[0], *dc.shape[2:])
                du = aten.convolution_backward(dc, shape_only, wc, None, *args, [True, False, False])[0]
                xc, upw = cast(x), cast(up.weight)
                dx, dupw, dupb = aten.convolution_backward(
                    du, xc, upw, [up.bias.shape[0]] if up.bias is not None else None, *_conv_args(up),
                    [need_x[0], up.weight.requires_grad, up.bias is not None and up.bias.requires_grad])
                del du
                up_grads = [dupw, dupb]
            else:
                xc = cast(x)
                dx, dwi, dbi = aten.convolution_backward(dc, xc, wc, bias_sizes, *args,
                                                         [need_x[i], w.requires_grad, bias_sizes is not None])
                del xc
            dxs[i] = dx.to(x.dtype) if dx is not None else None
            dw_parts.append(dwi.to(w.dtype) if dwi is not None else None)
            if i == 0 and dbi is not None:
                db = dbi.to(conv.bias.dtype)
        dw = (torch.cat(dw_parts, 1) if len(dw_parts) > 1 else dw_parts[0]) if w.requires_grad else None

    grads = {id(conv.weight): dw, id(conv.bias): db if conv.bias is not None else None}
    if bn.weight is not None:
        grads[id(bn.weight)] = dgamma
        grads[id(bn.bias)] = dbeta
    if up is not None:
        up_w, up_b = up_grads
        grads[id(up.weight)] = up_w.to(up.weight.dtype) if up_w is not None else None
        if up.bias is not None:
            grads[id(up.bias)] = up_b.to(up.bias.dtype) if up_b is not None else None
    params = _params(layer, up)
    return (*[g if need_x[i] else None for i, g in enumerate(dxs)],
            *[grads.get(id(p)) if need_p[j] else None for j, p in enumerate(params)])

