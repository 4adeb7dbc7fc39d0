"""A 2-D U-Net for the toy experiment that can see, and move, structures tens of pixels away.

The toy's second mask is, at best (a perfect registor, L_p converged), the first mask moved
by the pair's translation: up to 32 px per axis in the paper, so a blob must be copied from up
to ~45 px away. The Models Genesis U-Net (three 2× pools) holds almost all of its effective
receptive field within ~8 px after training (docs/toy.md#the-oracle-gate). This one has more
pooling levels (the bottleneck of a 128-px crop is 4 px wide with 5 pools) and, optionally, a
context block at the bottleneck (dilated convs, rates 1, 2, 4, or global self-attention) and
coordinate channels.

Any spatial size works: the input is zero-padded at the end of each axis to a multiple of
2**levels and the logits are cropped back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import check_float_input
from .norm import NORMS, make_norm

CONTEXTS = ("none", "dilated", "attention")
LEVELS_MAX = 7


def _block(cin: int, cout: int, norm: str, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), make_norm(norm, cout, 2),
                         nn.ReLU(inplace=True))


class GlobalAttention(nn.Module):
    """A transformer block over the bottleneck's pixels (pre-norm, 4 heads, learned 2-D
    position embedding added from the pixel's (y, x) in [-1, 1]): every bottleneck pixel can
    read any other, so content can move across the whole crop in one layer."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        heads = max(1, min(heads, channels // 8))
        self.pos = nn.Linear(2, channels)
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x):
        B, C, H, W = x.shape
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)
        pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(1, H * W, 2)
        t = x.flatten(2).transpose(1, 2) + self.pos(pos)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


class ToyUNet(nn.Module):
    """(B, in_channels, H, W) images → (B, out_channels, H, W) logits; 2-D only.

    levels:  number of 2× max-pools (the Genesis U-Net has 3);
    width:   channels 32·width at the top, doubled per level, at most 256·width;
    context: "dilated" adds three 3×3 convs with dilation 1, 2, 4 at the bottleneck;
             "attention" a transformer block over the bottleneck's pixels (GlobalAttention);
    coords:  appends two channels holding the pixel's (y, x) position in [-1, 1] of the input.
    """

    spatial_dims = 2
    checkpointing = False  # the toy is small: no activation checkpointing (the attribute CooperativeNet sets)

    def __init__(self, in_channels: int = 2, out_channels: int = 2, width: float = 0.5, levels: int = 5,
                 norm: str = "cont_bn", context: str = "none", coords: bool = False):
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= LEVELS_MAX:
            raise ValueError(f"levels must be an int in [1, {LEVELS_MAX}], got {levels!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 16:
            raise ValueError(f"width must be a number in (0, 16], got {width!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if not isinstance(coords, bool):
            raise TypeError(f"coords must be True or False, got {coords!r}")
        self.in_channels, self.out_channels, self.levels = in_channels, out_channels, levels
        self.width, self.norm, self.context, self.coords = float(width), norm, context, coords
        ch = [max(2, round(min(32 * 2 ** i, 256) * width)) for i in range(levels + 1)]
        cin = in_channels + (2 if coords else 0)
        self.down = nn.ModuleList()
        for i in range(levels + 1):
            self.down.append(nn.Sequential(_block(cin, ch[i], norm), _block(ch[i], ch[i], norm)))
            cin = ch[i]
        if context == "dilated":
            self.bottleneck = nn.Sequential(*[_block(ch[-1], ch[-1], norm, d) for d in (1, 2, 4)])
        elif context == "attention":
            self.bottleneck = GlobalAttention(ch[-1])
        else:
            self.bottleneck = nn.Identity()
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            self.up.append(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2))
            self.up_blocks.append(nn.Sequential(_block(2 * ch[i], ch[i], norm), _block(ch[i], ch[i], norm)))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ToyUNet input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ToyUNet input must be (B, C, H, W) with C={self.in_channels}, "
                             f"got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < 2:
            raise ValueError(f"ToyUNet input must be at least 2 px per side, got {tuple(x.shape[2:])}")
        m = 2 ** self.levels
        inner = [-(-n // m) for n in x.shape[2:]]
        batch_stats = self.norm == "cont_bn" or (self.norm == "batch" and self.training)
        values = inner[0] * inner[1] * (x.shape[0] if batch_stats else 1)
        if (self.norm == "instance" or batch_stats) and values < 2:
            raise ValueError(f"ToyUNet input too small for {self.norm} normalisation at the innermost level "
                             f"(sizes / {m} = {tuple(inner)}, batch {x.shape[0]}): it needs more than one value "
                             f"a channel there, e.g. a side of {2 * m} or fewer levels")
        check_float_input("ToyUNet", x, self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        H, W = x.shape[2:]
        m = 2 ** self.levels
        x = F.pad(x, (0, -W % m, 0, -H % m))
        if self.coords:
            ys = torch.linspace(-1, 1, x.shape[2], device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1, 1, x.shape[3], device=x.device, dtype=x.dtype)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            x = torch.cat([x, yy.expand(x.shape[0], 1, -1, -1), xx.expand(x.shape[0], 1, -1, -1)], 1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block in zip(self.up, self.up_blocks):
            x = block(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)[:, :, :H, :W]
