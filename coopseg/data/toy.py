"""The toy dataset of the paper's §3.1: pairs of 240×240 images of two "modalities".

Foreground = a few random blobs (union of discs with smooth random outlines). In s2
the blobs are slightly different (each blob's centre and radius jittered by a few
pixels) and the whole foreground is translated by an integer vector of at most
`max_shift` pixels per axis, so s1 and s2 are similar relative to translations but
not equal up to one. Both images are sine patterns (`0.5 + 0.5 sin(2π k·x + φ)`):

- modality 1 (x1): the foreground/background is encoded by the *angle* of the
  stripes (foreground at +45°, background at -45°, same period 8 px);
- modality 2 (x2): it is encoded by the *frequency* (period 4 px inside, 10 px
  outside, same angle for both, drawn per pair).

Random phases, a small random angle jitter, and Gaussian noise (std 0.1 in x1,
0.2 in x2: modality 1 is the easier one, as the paper assumes) make the textures
differ from pair to pair. Everything comes from numpy.random.default_rng(seed):
the same seed gives the same pair, on any machine.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError

ANGLE_FG, ANGLE_BG, PERIOD_1 = math.radians(45.0), math.radians(-45.0), 8.0
PERIOD_FG_2, PERIOD_BG_2 = 4.0, 10.0
NOISE = (0.1, 0.2)


def _blob_mask(yy, xx, centres, radii, wobble) -> np.ndarray:
    mask = np.zeros(yy.shape, dtype=bool)
    theta = np.arctan2
    for (cy, cx), r, (amp, freq, phase) in zip(centres, radii, wobble):
        ang = theta(yy - cy, xx - cx)
        rr = r * (1.0 + amp * np.sin(freq * ang + phase))  # a smooth, non-circular outline
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rr ** 2
    return mask


def _stripes(yy, xx, angle, period, phase) -> np.ndarray:
    k = 2 * math.pi / period
    return 0.5 + 0.5 * np.sin(k * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)


TARGETS = ("s2", "oracle")


def make_toy_pair(seed: int, size: int = 240, max_shift: int = 32, *, target: str = "s2") -> dict:
    """One pair: dict(x1, x2, s1, s2), float32 tensors (1, size, size); x in [0, 1], s in {0, 1}.

    The same seed draws the same s1, x1, blobs and textures at every max_shift: only the
    translation (and what follows from it: where s2's blobs land, x2's foreground) changes.
    target="oracle" replaces s2 by s2* = s1 translated by the pair's translation (zeros
    where it comes from outside the image): what L_p converges to with a perfect registor,
    the target of the oracle gate (docs/toy.md#the-oracle-gate). x2 is unchanged."""
    _check_args(seed, size, max_shift)
    _check_target(target)
    rng = np.random.default_rng(int(seed))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    pair, shift = _draw(rng, yy, xx, size, max_shift)
    if target == "oracle":
        pair["s2"] = translate(pair["s1"], shift)
    return pair


def toy_shift(seed: int, size: int = 240, max_shift: int = 32) -> tuple[int, int]:
    """The pair's translation (dy, dx) in pixels: s2's blobs sit at s1's plus this (and their jitter)."""
    _check_args(seed, size, max_shift)
    shift = _layout(np.random.default_rng(int(seed)), size, max_shift)[3]
    return int(shift[0]), int(shift[1])


def translate(mask: torch.Tensor, shift) -> torch.Tensor:
    """mask (..., H, W) moved by the integer shift (dy, dx): out[y, x] = mask[y - dy, x - dx], 0 outside."""
    dy, dx = (int(v) for v in shift)
    out = torch.zeros_like(mask)
    H, W = mask.shape[-2:]
    if abs(dy) < H and abs(dx) < W:
        out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
            mask[..., max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def _check_target(target) -> None:
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def _check_args(seed, size, max_shift) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ConfigError(f"size must be an int >= 32, got {size!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift < size // 4:
        raise ConfigError(f"max_shift must be an int in [0, size/4) = [0, {size // 4}), got {max_shift!r}")


def _layout(rng, size: int, max_shift: int):
    """The pair's blobs and translation (the first draws of a seed; cheap: no image yet).
    Every draw is made in the same order and number whatever max_shift is (the shift's own
    draw is a uniform scaled afterwards), so a seed's s1, blobs and textures do not depend on
    it. Blobs keep clear of the image's edge by their own size only; with a large shift part
    of s2 may leave the image (that follows from the shift)."""
    n = int(rng.integers(2, 5))
    scale = size / 240.0
    radii = rng.uniform(12, 28, 4)[:n] * scale
    margin = radii.max() * 1.3 + 2
    centres = rng.uniform(margin, size - margin, (4, 2))[:n]
    wobble = np.stack([rng.uniform(0.0, 0.2, 4), rng.integers(2, 5, 4), rng.uniform(0, 2 * math.pi, 4)], 1)[:n]
    u = rng.uniform(0.0, 1.0, 2)
    shift = (np.minimum(np.floor(u * (2 * max_shift + 1)), 2 * max_shift) - max_shift).astype(int)
    centres2 = centres + rng.uniform(-3, 3, (4, 2))[:n] * scale   # slightly different...
    radii2 = radii * rng.uniform(0.9, 1.1, 4)[:n]                 # ...and translated
    return centres, radii, wobble, shift, centres2, radii2


def _draw(rng, yy, xx, size: int, max_shift: int) -> tuple[dict, tuple[int, int]]:
    centres, radii, wobble, shift, centres2, radii2 = _layout(rng, size, max_shift)
    s1 = _blob_mask(yy, xx, centres, radii, wobble)
    s2 = _blob_mask(yy - shift[0], xx - shift[1], centres2, radii2, wobble)  # exact integer translation

    jitter = rng.uniform(-math.radians(10), math.radians(10), 2)
    phase = rng.uniform(0, 2 * math.pi, 4)
    x1 = np.where(s1, _stripes(yy, xx, ANGLE_FG + jitter[0], PERIOD_1, phase[0]),
                  _stripes(yy, xx, ANGLE_BG + jitter[0], PERIOD_1, phase[1]))
    angle2 = rng.uniform(0, math.pi)
    x2 = np.where(s2, _stripes(yy, xx, angle2 + jitter[1], PERIOD_FG_2, phase[2]),
                  _stripes(yy, xx, angle2 + jitter[1], PERIOD_BG_2, phase[3]))
    x1 = np.clip(x1 + rng.normal(0, NOISE[0], x1.shape), 0, 1)
    x2 = np.clip(x2 + rng.normal(0, NOISE[1], x2.shape), 0, 1)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]

    return dict(x1=t(x1), x2=t(x2), s1=t(s1), s2=t(s2)), (int(shift[0]), int(shift[1]))


class ToyPairs(torch.utils.data.Dataset):
    """n toy pairs; item i is make_toy_pair(seed + i, size, max_shift, target=target). max_shift
    defaults to 32 px at size 240 (the paper), scaled with size otherwise."""

    def __init__(self, n: int, seed: int, size: int = 240, max_shift: int | None = None, target: str = "s2"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an int >= 1, got {n!r}")
        if max_shift is None and isinstance(size, int):
            max_shift = 32 * size // 240
        _check_args(seed, size, max_shift)
        _check_target(target)
        self.n, self.seed, self.size, self.max_shift, self.target = n, int(seed), size, max_shift, target

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} toy pairs")
        return make_toy_pair(self.seed + (i % self.n), self.size, self.max_shift, target=self.target)


def save_toy_figure(path, seed: int = 0, n: int = 3, size: int = 240) -> None:
    """A figure of n pairs (rows): x1 with s1's outline, x2 with s2's, and s1 vs s2."""
    import matplotlib  # lazy on purpose: matplotlib is only needed for figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row in range(n):
        p = make_toy_pair(seed + row, size, 32 * size // 240)
        s1, s2 = p["s1"][0].numpy(), p["s2"][0].numpy()
        for ax, img, mask, title in ((axes[row, 0], p["x1"][0], s1, "x1 (angle)"),
                                     (axes[row, 1], p["x2"][0], s2, "x2 (frequency)")):
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.contour(mask, levels=[0.5], colors="r", linewidths=0.8)
            ax.set_title(f"pair {seed + row}: {title}", fontsize=9)
        axes[row, 2].imshow(np.stack([s1, s2, np.zeros_like(s1)], -1))
        axes[row, 2].set_title("s1 (red) / s2 (green)", fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
