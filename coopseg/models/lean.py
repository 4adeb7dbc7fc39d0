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
upsamples again in the backward. The segmentor's last layer also takes its output
conv (`head`): only the logits leave the layer, so its full-resolution output is not
stored for the output conv's backward but recomputed there (with c dropped while the
head's input gradient is made, and recomputed after: one more conv, less at once).
The registor's blocks (conv, ReLU, conv, ReLU, max-pool) have their own lean version,
`lean_conv_relu_pool`, at the end of this module.

The backward is written out (`_backward_batch_stats`) for the segmentor's case, a
BatchNormNd with batch statistics (training, or ContBatchNorm) and a ReLU, so that
it can order the work to hold as little as possible at once -- the conv's weight
gradient and each input's gradient are separate passes of the conv backward, and
the upsampled tensor (and then its gradient) exists only while it is used:

    recompute c = conv(inputs)            (the upsampled tensor freed once convolved)
    z = norm(c) -> dz = dy where z > 0    (written over z: the ReLU backward, a real
                                           in-place kernel)
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
from .pooling import pool_like_input

aten = torch.ops.aten


class _LeanConvNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, up, head, n_inputs, *args):
        inputs = args[:n_inputs]
        ctx.layer, ctx.up, ctx.head, ctx.n_inputs = layer, up, head, n_inputs
        ctx.autocast = _autocast_state(inputs[0])
        ctx.save_for_backward(*inputs)
        return layer.dense_forward(*inputs, up=up, head=head)  # autograd.Function.forward runs without grad

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if _batch_stats_relu(ctx.layer):
            grads = _backward_batch_stats(ctx, dy)
        else:
            grads = _backward_autograd(ctx, dy)
        return (None, None, None, None, *grads)


def _autocast_state(x: torch.Tensor) -> tuple:
    """(device type, enabled, dtype) of autocast for x's device: the backward recomputes
    under the same state as the forward."""
    dev = x.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def _params(layer, up=None, head=None) -> list[torch.Tensor]:
    return [p for m in (layer, up, head) if m is not None for p in m.parameters()]


def lean_conv_norm_relu(layer, *inputs, up=None, head=None):
    """layer.dense_forward(*inputs, up=up, head=head), storing only `inputs` for the backward."""
    return _LeanConvNormReLU.apply(layer, up, head, len(inputs), *inputs, *_params(layer, up, head))


def _batch_stats_relu(layer) -> bool:
    bn = layer.bn1
    return (isinstance(bn, BatchNormNd) and (bn.training or bn.continuous)
            and isinstance(layer.activation, nn.ReLU))


def _backward_autograd(ctx, dy):
    """Recompute the layer under autograd and differentiate it (any norm)."""
    layer, up, head = ctx.layer, ctx.up, ctx.head
    inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
    params = _params(layer, up, head)
    dev, enabled, dtype = ctx.autocast
    with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled), frozen_running_stats(layer):
        y = layer.dense_forward(*inputs, up=up, head=head)
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


def _autocast_caster(enabled: bool, dtype: torch.dtype):
    def cast(t):  # what autocast does to a conv's floating-point arguments
        if t is None or not enabled or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)
    return cast


def _conv_grads(g, inp, conv, need_inp, cast, weight=None, bias=True):
    """convolution_backward of conv(cast(inp), cast(weight)) (weight: conv.weight or a
    slice of it), gradients in the parameters' dtype (the autocast casts' backward).
    inp=None: only the weight and bias gradients."""
    weight = conv.weight if weight is None else weight
    b = conv.bias if bias else None
    need_w, need_b = weight.requires_grad, b is not None and b.requires_grad
    dinp, dw, db = aten.convolution_backward(g, cast(inp), cast(weight), [b.shape[0]] if b is not None else None,
                                             *_conv_args(conv), [need_inp, need_w, need_b])
    return (dinp, dw.to(weight.dtype) if need_w else None, db.to(b.dtype) if need_b else None)


def _backward_batch_stats(ctx, dy):
    """The written-out backward: BatchNormNd with batch statistics, ReLU. Returns
    the gradients of (*inputs, *layer parameters, *up parameters, *head parameters)."""
    layer, up, head, n = ctx.layer, ctx.up, ctx.head, ctx.n_inputs
    need = ctx.needs_input_grad[4:]
    need_x, need_p = need[:n], need[n:]
    conv, bn = layer.conv1, layer.bn1
    xs = list(ctx.saved_tensors)
    dev, enabled, dtype = ctx.autocast
    cast = _autocast_caster(enabled, dtype)
    grads = {}

    def recompute_conv():  # the first pass's conv output (same modules, same autocast state)
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return layer._conv(xs, up)

    with torch.no_grad():
        c = recompute_conv()
        z, mean, invstd = aten.native_batch_norm(c, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
        if head is None:
            dz = aten.threshold_backward.grad_input(dy, z, 0, grad_input=z)  # ReLU backward, over z
        else:
            # The layer's output y is the head's input: recomputed here, never stored.
            # c is dropped while y and the head's input gradient exist, and
            # recomputed after (one more conv: the least memory at once).
            del c
            y = z.relu_()
            dyy, grads[id(head.weight)], grads[id(head.bias)] = _conv_grads(dy, y, head, True, cast)
            dz = aten.threshold_backward.grad_input(dyy, y, 0, grad_input=dyy)  # ReLU backward
            del y, dyy
            c = recompute_conv()
        del z
        bn_mask = [True, bn.weight is not None and bn.weight.requires_grad,
                   bn.bias is not None and bn.bias.requires_grad]
        # (Not written over dz with the .out overload: for this op that is generated as
        # the functional op plus a copy, so it would only hide the temporary from the
        # memory benchmark's counter.)
        dc, dgamma, dbeta = aten.native_batch_norm_backward(dz, c, bn.weight, None, None, mean, invstd, True,
                                                            bn.eps, bn_mask)
        if bn.weight is not None:
            grads[id(bn.weight)] = dgamma if bn_mask[1] else None
            grads[id(bn.bias)] = dbeta if bn_mask[2] else None
        del dz, c

        w = conv.weight
        sizes = layer.input_channels(xs, up)
        w_parts = w.split(sizes, 1) if len(xs) > 1 else (w,)
        dw_parts: list = []
        dxs: list = [None] * n
        for i, (x, wi) in enumerate(zip(xs, w_parts)):
            if i == 0 and up is not None:
                # The upsampled tensor: its weight gradient first, then free it, then its
                # gradient, which up's backward turns into the low-resolution one.
                with torch.autocast(dev, dtype=dtype, enabled=enabled):
                    u = up(x)
                _, dwi, dbi = _conv_grads(dc, u, conv, False, cast, weight=wi)
                del u
                # (the input only gives the shape here, as in torch.nn.grad.conv3d_input)
                shape_only = dc.new_empty(1).expand(dc.shape[0], sizes[0], *dc.shape[2:])
                du = aten.convolution_backward(dc, shape_only, cast(wi), None, *_conv_args(conv),
                                               [True, False, False])[0]
                dx, grads[id(up.weight)], grads[id(up.bias)] = _conv_grads(du, x, up, need_x[0], cast)
                del du
            else:
                dx, dwi, dbi = _conv_grads(dc, x, conv, need_x[i], cast, weight=wi, bias=(i == 0))
            dxs[i] = dx.to(x.dtype) if dx is not None else None
            dw_parts.append(dwi)
            if i == 0:
                grads[id(conv.bias)] = dbi
        if w.requires_grad:
            grads[id(w)] = torch.cat(dw_parts, 1) if len(dw_parts) > 1 else dw_parts[0]

    params = _params(layer, up, head)
    return (*[g if need_x[i] else None for i, g in enumerate(dxs)],
            *[grads.get(id(p)) if need_p[j] else None for j, p in enumerate(params)])


class _LeanConvReLUPool(torch.autograd.Function):
    """A registor block (conv, ReLU, conv, ReLU, max-pool) storing only its input.

    Backward: h1 = relu(conv1(x)), h2 = relu(conv2(h1)); h1 dropped; the pool's and
    second ReLU's backward (g over h2's gradient); h2 dropped; h1 recomputed (one
    more conv1, the cheapest conv of the block) for conv2's backward; first ReLU;
    conv1's backward. At most two block-sized tensors and the pool indices at once."""

    @staticmethod
    def forward(ctx, block, x, *params):
        ctx.block = block
        ctx.autocast = _autocast_state(x)
        ctx.save_for_backward(x)
        return block(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dpooled):
        block = ctx.block
        (x,) = ctx.saved_tensors
        need_x, *need_p = ctx.needs_input_grad[1:]
        dev, enabled, dtype = ctx.autocast
        cast = _autocast_caster(enabled, dtype)

        def h1_of_x():
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                return block.relu(block.conv1(x))

        grads = {}
        with torch.no_grad():
            h1 = h1_of_x()
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                h2 = block.relu(block.conv2(h1))
            del h1
            with torch.enable_grad():  # the pool's own backward (it keeps h2 and the indices)
                h2g = h2.detach().requires_grad_()
                (g,) = torch.autograd.grad(pool_like_input(block.pool, h2g), h2g, dpooled)
                del h2g
            g = aten.threshold_backward.grad_input(g, h2, 0, grad_input=g)  # second ReLU, over g
            del h2
            h1 = h1_of_x()
            dh1, grads[id(block.conv2.weight)], grads[id(block.conv2.bias)] = _conv_grads(g, h1, block.conv2,
                                                                                          True, cast)
            del g
            dh1 = aten.threshold_backward.grad_input(dh1, h1, 0, grad_input=dh1)  # first ReLU
            del h1
            dx, grads[id(block.conv1.weight)], grads[id(block.conv1.bias)] = _conv_grads(dh1, x, block.conv1,
                                                                                         need_x, cast)
        params = list(block.parameters())
        return (None, dx.to(x.dtype) if (need_x and dx is not None) else None,
                *[grads.get(id(p)) if need_p[j] else None for j, p in enumerate(params)])


def lean_conv_relu_pool(block, x):
    """block(x) for a registor block, storing only x for the backward."""
    return _LeanConvReLUPool.apply(block, x, *block.parameters())
