"""The segmentor: the Models Genesis UNet3D (Zhou et al., MICCAI 2019, the paper's [8])
with its module names, so that its published weights load (see genesis.py).

Topology (channels at width 1; every conv is 3×3(×3), padding 1, with bias, then
the norm and a ReLU; module `ops.<i>` = `conv1` + `bn1`):

    down_tr64   in→32→64      then 2× max-pool
    down_tr128  64→64→128     then 2× max-pool
    down_tr256  128→128→256   then 2× max-pool
    down_tr512  256→256→512   (no pool)
    up_tr256    up_conv 512→512 (k2 s2), concat skip 256: 768→256→256
    up_tr128    up_conv 256→256,         concat skip 128: 384→128→128
    up_tr64     up_conv 128→128,         concat skip 64:  192→64→64
    out_tr      final_conv 1×1(×1) 64→out_channels   (logits: no sigmoid, unlike Genesis)

That is 106 state_dict keys at width 1 with a BatchNorm. `width` scales every
channel count (rounded, at least 1) for small tests; `spatial_dims=2` swaps the 3-D
layers for their 2-D versions with the same names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checkpointing import checkpointed
from .inputs import check_float_input
from .lean import lean_conv_norm_relu
from .norm import NORMS, make_norm
from .pooling import pool_like_input

WIDTH_MAX = 64  # channel multiplier: 64x Models Genesis is already far beyond any GPU


def _layers(spatial_dims: int):
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d
    return nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d


class LUConv(nn.Module):
    def __init__(self, cin: int, cout: int, spatial_dims: int, norm: str):
        super().__init__()
        conv, _, _ = _layers(spatial_dims)
        self.conv1 = conv(cin, cout, kernel_size=3, padding=1)
        self.bn1 = make_norm(norm, cout, spatial_dims)
        self.activation = nn.ReLU(inplace=True)
        # Set by the Segmentor with its checkpointing: store only the inputs and
        # recompute this layer in the backward (coopseg.models.lean).
        self.lean = False

    def forward(self, *xs, up=None, head=None):
        """relu(norm(conv1(cat(xs)))), with xs[0] replaced by up(xs[0]) if `up` (an up
        level's transposed conv) is given. Several inputs (an up level's upsampled
        tensor and skip) are convolved with the matching input-channel slices of
        conv1's weight and summed, so that the concatenation is never stored (one
        weight parameter: the Models Genesis keys and shapes are unchanged). `head`
        (the segmentor's output conv) is applied to the result: the lean layer then
        does not store its output, only the logits leave it."""
        if self.lean and torch.is_grad_enabled():
            return lean_conv_norm_relu(self, *xs, up=up, head=head)
        return self.dense_forward(*xs, up=up, head=head)

    def dense_forward(self, *xs, up=None, head=None):
        y = self.activation(self.bn1(self._conv(xs, up)))
        return head(y) if head is not None else y

    def input_channels(self, xs, up=None) -> list[int]:
        """Channels of each conv input (xs[0] after `up`), checked against conv1."""
        sizes = [x.shape[1] for x in xs]
        if up is not None:
            sizes[0] = up.out_channels
        if sum(sizes) != self.conv1.in_channels:
            raise ValueError(f"conv1 expects {self.conv1.in_channels} input channels in all, got {sum(sizes)}")
        return sizes

    def _conv(self, xs, up=None):
        xs = list(xs)
        if up is None and len(xs) == 1:
            return self.conv1(xs[0])
        conv = F.conv3d if xs[0].dim() == 5 else F.conv2d
        w = self.conv1.weight
        sizes = self.input_channels(xs, up)
        # split (not slicing): its backward writes the weight gradient once, where
        # each slice's backward would allocate a full-size zero gradient.
        out = None
        for i, wi in enumerate(w.split(sizes, 1)):
            x = up(xs[0]) if (i == 0 and up is not None) else xs[i]
            # Without grad (the lean layers) the upsampled tensor is freed once convolved.
            part = conv(x, wi, self.conv1.bias if i == 0 else None, padding=self.conv1.padding)
            del x
            out = part if out is None else out.add_(part)
        return out


class DownTransition(nn.Module):
    """Two LUConvs; returns (pooled output, output before the pool)."""

    def __init__(self, cin: int, cmid: int, cout: int, spatial_dims: int, norm: str, pool: bool):
        super().__init__()
        _, _, maxpool = _layers(spatial_dims)
        self.ops = nn.Sequential(LUConv(cin, cmid, spatial_dims, norm), LUConv(cmid, cout, spatial_dims, norm))
        self.maxpool = maxpool(2) if pool else None

    def forward(self, x):
        before_pool = self.ops(x)
        pooled = pool_like_input(self.maxpool, before_pool) if self.maxpool is not None else before_pool
        return pooled, before_pool


class UpTransition(nn.Module):
    """Transposed conv ×2, concat the skip, two LUConvs."""

    def __init__(self, cin: int, cskip: int, cout: int, spatial_dims: int, norm: str):
        super().__init__()
        _, convT, _ = _layers(spatial_dims)
        self.up_conv = convT(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(cin + cskip, cout, spatial_dims, norm), LUConv(cout, cout, spatial_dims, norm))

    def forward(self, x, skip, head=None):
        # ops[0] takes (x, skip) and upsamples x itself: no stored concatenation, and
        # with lean layers the upsampled tensor is not stored either. `head`: a conv
        # applied to the output inside ops[1] (the segmentor's out_tr.final_conv).
        return self.ops[1](self.ops[0](x, skip, up=self.up_conv), head=head)


class OutputTransition(nn.Module):
    def __init__(self, cin: int, n_labels: int, spatial_dims: int):
        super().__init__()
        conv, _, _ = _layers(spatial_dims)
        self.final_conv = conv(cin, n_labels, kernel_size=1)

    def forward(self, x):
        return self.final_conv(x)


class Segmentor(nn.Module):
    """Models Genesis UNet3D: (B, in_channels, *S) images → (B, out_channels, *S) logits.

    The pair (x1, x2) comes in as 2 channels; one mask logit per modality comes out.
    Spatial sizes must be multiples of 8 (three 2× max-pools). `checkpointing=True`
    recomputes each U-Net level in backward instead of storing its activations, and
    inside it each conv+norm+ReLU (coopseg.models.lean): trades compute for memory.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, out_channels: int = 2, width: float = 1.0,
                 norm: str = "cont_bn", checkpointing: bool = False):
        super().__init__()
        if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if isinstance(width, bool) or not (isinstance(width, (int, float)) and 0 < width <= WIDTH_MAX):
            raise ValueError(f"width must be a number in (0, {WIDTH_MAX}], got {width!r}")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(checkpointing, bool):
            raise TypeError(f"checkpointing must be True or False, got {checkpointing!r}")
        spatial_dims = int(spatial_dims)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.width, self.norm = float(width), norm

        def c(n):
            return max(1, int(round(n * width)))

        nd = spatial_dims
        self.down_tr64 = DownTransition(in_channels, c(32), c(64), nd, norm, pool=True)
        self.down_tr128 = DownTransition(c(64), c(64), c(128), nd, norm, pool=True)
        self.down_tr256 = DownTransition(c(128), c(128), c(256), nd, norm, pool=True)
        self.down_tr512 = DownTransition(c(256), c(256), c(512), nd, norm, pool=False)
        self.up_tr256 = UpTransition(c(512), c(256), c(256), nd, norm)
        self.up_tr128 = UpTransition(c(256), c(128), c(128), nd, norm)
        self.up_tr64 = UpTransition(c(128), c(64), c(64), nd, norm)
        self.out_tr = OutputTransition(c(64), out_channels, nd)
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        # Checkpointing = trade compute for memory: recompute each U-Net level in the
        # backward, and inside it each conv+norm+ReLU (LUConv.lean).
        self._checkpointing = bool(on)
        for m in self.modules():
            if isinstance(m, LUConv):
                m.lean = self._checkpointing

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Segmentor input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            want = "(B, C, D, H, W)" if self.spatial_dims == 3 else "(B, C, H, W)"
            raise ValueError(f"Segmentor input must be {want} with C={self.in_channels}, got shape {tuple(x.shape)}")
        bad = [n for n in x.shape[2:] if n % 8 or n == 0]
        if bad:
            raise ValueError(f"Segmentor input spatial sizes must be multiples of 8 (three 2x max-pools), "
                             f"got {tuple(x.shape[2:])}")
        # the innermost level (1/8 of each side) normalises over its values: batch statistics
        # need more than one value a channel, InstanceNorm more than one voxel
        inner_sizes = tuple(n // 8 for n in x.shape[2:])
        inner = math.prod(inner_sizes)
        batch_stats = self.norm == "cont_bn" or (self.norm == "batch" and self.training)
        if (self.norm == "instance" and inner < 2) or (batch_stats and inner * x.shape[0] < 2):
            raise ValueError(f"Segmentor input too small for {self.norm} normalisation at the innermost level "
                             f"(sizes / 8 = {inner_sizes}, batch {x.shape[0]}): it needs "
                             f"more than one value a channel there, e.g. a side of 16")
        check_float_input("Segmentor", x, self.down_tr64.ops[0].conv1.weight)

    def _run(self, block, *args, **kwargs):
        return checkpointed(block, *args, **kwargs) if self.checkpointing else block(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        out, skip64 = self._run(self.down_tr64, x)
        out, skip128 = self._run(self.down_tr128, out)
        out, skip256 = self._run(self.down_tr256, out)
        out, _ = self._run(self.down_tr512, out)
        out = self._run(self.up_tr256, out, skip256)
        out = self._run(self.up_tr128, out, skip128)
        # out_tr's conv runs inside up_tr64's last layer (the same function as
        # out_tr(up_tr64(...))): with lean layers the full-resolution features are then
        # not stored for out_tr's backward, only recomputed there.
        return self._run(self.up_tr64, out, skip64, head=self.out_tr.final_conv)
