"""A conv + norm + ReLU that keeps only its inputs for the backward (memory-lean).

Autograd would keep, per conv + norm + ReLU, the conv's input, the conv output (the
norm's input) and the ReLU output. `lean_conv_norm_relu` keeps only the inputs --
which are the previous layer's output, kept anyway by that layer's consumer, so they
cost nothing extra -- and recomputes the conv output in the backward, one layer at a
time. Used by the segmentor when checkpointing is on (coopseg.models.checkpointing
then recomputes a whole U-Net level, and inside it this recomputes one layer at a
time), it roughly halves what a recomputed level holds, at the price of one more
conv forward per layer in the backward.

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
updated in the first pass only (the recomputation runs with them frozen).
"""
from __future__ import annotations

import torch

from .norm import frozen_running_stats


class _LeanConvNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, n_inputs, *args):
        inputs = args[:n_inputs]
        ctx.layer = layer
        dev = inputs[0].device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(*inputs)
        return layer.dense_forward(*inputs)  # autograd.Function.forward runs without grad

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        params = [p for p in layer.parameters()]
        dev, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled), frozen_running_stats(layer):
            y = layer.dense_forward(*inputs)
        wrt = [x for x in inputs if x.requires_grad] + [p for p in params if p.requires_grad]
        grads = iter(torch.autograd.grad(y, wrt, dy, allow_unused=True))
        g_in = [next(grads) if x.requires_grad else None for x in inputs]
        g_par = {id(p): next(grads) for p in params if p.requires_grad}
        # The parameters reach autograd through the Function's extra arguments (below).
        return (None, None, *g_in, *[g_par.get(id(p)) for p in params])


def lean_conv_norm_relu(layer, *inputs):
    """layer.dense_forward(*inputs), storing only `inputs` for the backward."""
    params = list(layer.parameters())
    return _LeanConvNormReLU.apply(layer, len(inputs), *inputs, *params)
