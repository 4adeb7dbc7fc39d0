"""Normalisation layers of the segmentor, and the switch that keeps activation
checkpointing from updating BatchNorm running statistics twice.

`ContBatchNorm` is Models Genesis's ``ContBatchNorm3d``: it always normalises with
the statistics of the current batch, in eval too (the Genesis weights were trained
so). Unlike Genesis it updates the running statistics only in training mode: eval
never mutates the model. `norm="batch"` is standard BatchNorm (running statistics
in eval), `norm="instance"` is InstanceNorm with affine parameters.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("cont_bn", "batch", "instance")


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for 2-D or 3-D inputs with the state_dict keys of nn.BatchNorm3d
    (weight, bias, running_mean, running_var, num_batches_tracked).

    continuous=True: batch statistics in train *and* eval (Genesis ContBatchNorm3d).
    `update_stats` is a plain attribute (not state): activation checkpointing clears
    it while recomputing a block so that the recomputation leaves the running
    statistics alone (see coopseg.models.checkpointing).
    """

    def __init__(self, num_features: int, spatial_dims: int, continuous: bool):
        super().__init__(num_features)
        self.spatial_dims = spatial_dims
        self.continuous = continuous
        self.update_stats = True

    def _check_input_dim(self, x):
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}-D input (B, C, *S), got shape {tuple(x.shape)}")

    def forward(self, x):
        self._check_input_dim(x)
        if not (self.training or self.continuous):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # Batch statistics. The running statistics are updated apart, without autograd,
        # so that the recorded graph is the same whether or not they are updated -- which
        # activation checkpointing's recomputation (update_stats=False) relies on.
        if self.training and self.update_stats:
            self._update_running_stats(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @torch.no_grad()
    def _update_running_stats(self, x):
        """As nn.BatchNorm does in training: an exponential (or, momentum=None,
        cumulative) average of the batch mean and unbiased batch variance."""
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        # In float32, a group of channels at a time: under bf16 autocast a float32 copy
        # of the whole input would be twice its bytes (the forward's peak at full
        # resolution); 8 groups keep the copy at a quarter of the input.
        groups = x.split(max(1, -(-x.shape[1] // 8)), dim=1) if x.dtype != torch.float32 else (x,)
        stats = [torch.var_mean(g.float(), dim=dims, correction=1 if n > 1 else 0) for g in groups]
        var, mean = torch.cat([v for v, _ in stats]), torch.cat([m for _, m in stats])
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(var.to(self.running_var.dtype), m)

    def extra_repr(self):
        return super().extra_repr() + f", continuous={self.continuous}"


def make_norm(norm: str, channels: int, spatial_dims: int) -> nn.Module:
    if norm == "cont_bn":
        return BatchNormNd(channels, spatial_dims, continuous=True)
    if norm == "batch":
        return BatchNormNd(channels, spatial_dims, continuous=False)
    if norm == "instance":
        cls = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        return cls(channels, affine=True)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module):
    """Inside: no BatchNormNd below `module` updates its running statistics."""
    bns = [m for m in module.modules() if isinstance(m, BatchNormNd)]
    saved = [m.update_stats for m in bns]
    for m in bns:
        m.update_stats = False
    try:
        yield
    finally:
        for m, s in zip(bns, saved):
            m.update_stats = s
