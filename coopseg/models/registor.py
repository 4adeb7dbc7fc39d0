"""The registor (paper §3.2.2): masks in, a coarse displacement grid out.

4 blocks of two 3×3(×3) convs + ReLU followed by a 2×2(×2) max-pool (16, 32, 64, 128
channels), then a 1×1(×1) conv to `nd` channels: a displacement per node of a grid at
1/16 resolution, in voxels of the full-resolution grid and in spatial-axis order (the
coopseg_kernels convention), upsampled and applied by coopseg_kernels.warp.
omega="translation" (the toy task) averages that over space: a (B, nd, 1, …, 1) grid,
i.e. one translation. The last conv starts at zero, so the registor starts as the
identity; the other convs start from He (Kaiming-normal, ReLU gain) weights and zero
biases: with torch's default init each conv shrinks the signal, and after eight of
them the features (so the output) hardly depend on the input masks -- the toy's
translation registor then only learnt a constant shift (docs/notes.md#2026-11-24-the-toys-translation-registor).
`scale` multiplies the output (a fixed gain so that a few steps of Adam can reach
displacements of tens of voxels); 1 = the paper.

pool (omega="translation" only) says how the per-location shifts become one:
"mean" is the global average of the spec; "mask" (a documented departure, the toy
default) weights each location of the 1/16 grid by the mask mass it covers (the
input's channel sum, average-pooled by 16), so that locations that see only
background -- whose features are zero, hence whose output is the head's bias --
do not dilute the estimate. With "mean" the estimate shrinks by the fraction of
informative locations, which varies per crop and with the image size (measured:
slope of predicted vs true shift 0.7-0.8 on 128-px crops but 0.35 on the 240-px
images after 2500 steps; docs/toy.md#departure-mask-weighted-registor).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .inputs import check_float_input
from .lean import lean_conv_relu_pool
from .pooling import pool_like_input

OMEGAS = ("elastic", "translation")
POOLS = ("mean", "mask")


class RegistorBlock(nn.Module):
    def __init__(self, cin: int, cout: int, spatial_dims: int):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        self.conv1 = conv(cin, cout, kernel_size=3, padding=1)
        self.conv2 = conv(cout, cout, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = pool(2)

    def forward(self, x):
        return pool_like_input(self.pool, self.relu(self.conv2(self.relu(self.conv1(x)))))


class Registor(nn.Module):
    """forward(p: (B, in_channels, *S) mask probabilities) -> coarse (B, nd, *S//16),
    or (B, nd, 1, …, 1) for omega="translation". Sizes must be multiples of 16."""

    def __init__(self, spatial_dims: int = 3, omega: str = "elastic", in_channels: int = 2,
                 channels=(16, 32, 64, 128), scale: float = 1.0, checkpointing: bool = False,
                 pool: str = "mean"):
        super().__init__()
        if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if omega not in OMEGAS:
            raise ValueError(f"omega must be one of {', '.join(OMEGAS)}, got {omega!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool != "mean" and omega != "translation":
            raise ValueError(f"pool={pool!r} applies to omega='translation' only (the elastic grid is not "
                             f"pooled), got omega={omega!r}")
        if isinstance(in_channels, bool) or not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        channels = tuple(channels)
        if not channels or any(isinstance(c, bool) or not (isinstance(c, int) and c >= 1) for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of ints >= 1, got {channels!r}")
        if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        if not isinstance(checkpointing, bool):
            raise TypeError(f"checkpointing must be True or False, got {checkpointing!r}")
        self.pool = pool
        self.spatial_dims, self.omega, self.in_channels, self.scale = spatial_dims, omega, in_channels, float(scale)
        self.checkpointing = checkpointing
        chans = [in_channels, *channels]
        self.blocks = nn.ModuleList(RegistorBlock(a, b, spatial_dims) for a, b in zip(chans[:-1], chans[1:]))
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        for m in self.blocks.modules():
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.head = conv(chans[-1], spatial_dims, kernel_size=1)
        nn.init.zeros_(self.head.weight)  # identity at start
        nn.init.zeros_(self.head.bias)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"Registor input must be a torch.Tensor, got {type(p).__name__}")
        if p.dim() != self.spatial_dims + 2 or p.shape[1] != self.in_channels:
            raise ValueError(f"Registor input must be (B, {self.in_channels}, *S) with {self.spatial_dims} spatial "
                             f"axes, got shape {tuple(p.shape)}")
        if any(n % 16 or n == 0 for n in p.shape[2:]):
            raise ValueError(f"Registor input spatial sizes must be multiples of 16 (four 2x max-pools), "
                             f"got {tuple(p.shape[2:])}")
        check_float_input("Registor", p, self.head.weight)
        x = p
        for block in self.blocks:
            # Checkpointing: each block stores only its input and is recomputed in the
            # backward by a written-out backward that holds as little as it can at once.
            x = lean_conv_relu_pool(block, x) if (self.checkpointing and torch.is_grad_enabled()) else block(x)
        coarse = self.head(x) * self.scale
        if self.omega == "translation":
            dims = tuple(range(2, coarse.dim()))
            if self.pool == "mean":
                coarse = coarse.mean(dim=dims, keepdim=True)
            else:
                pool = nn.functional.avg_pool3d if self.spatial_dims == 3 else nn.functional.avg_pool2d
                # mask mass under each coarse cell (detached input: no gradient to the masks), plus a
                # tiny floor so that an all-empty pair falls back to the plain average
                # (clamped at 0: the inputs are probabilities; a negative sum must not flip a weight)
                w = pool(p.detach().float().sum(1, keepdim=True).clamp_(min=0), 16) + 1e-6
                coarse = (coarse * w).sum(dim=dims, keepdim=True) / w.sum(dim=dims, keepdim=True)
        return coarse
