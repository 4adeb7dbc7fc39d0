"""Benchmark cases: each pairs a fused op with its naive reference (and any
other baselines) on one input shape. Used by table.py and the pytest-benchmark
files, so both measure the same thing."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

import coopseg_kernels as ck
from benchmarks.harness import module_from_commit
from coopseg_kernels import reference
from coopseg_kernels.similarity.naive import brute_force_translation


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], dict]              # fresh inputs (leaf tensors, no grad)
    fused: Callable[[dict], torch.Tensor]
    naive: Callable[[dict], torch.Tensor]
    grad_inputs: tuple[str, ...]          # inputs that get gradients in forward+backward
    bytes_moved: Callable[[dict], int]    # minimal forward traffic (for % of copy bandwidth)
    others: dict[str, Callable[[dict], torch.Tensor]] = field(default_factory=dict)
    big: bool = False                     # skipped by --quick
    backward: bool = True                 # False: a forward-only computation (no fwd+bwd columns)
    compare: bool = False                 # report how far the fused output is from the naive one


def _smooth_coarse(B, size, spacing, device, amplitude=3.0):
    """Random coarse displacement grid (voxels) on nodes every `spacing` voxels."""
    s = [max(1, n // spacing) for n in size]
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, len(size), *s, generator=g) * amplitude).to(device)


def warp_cases(device: torch.device, dtype=torch.float32) -> list[Case]:
    cases = []
    for size, big in [((128, 128, 64), False), ((256, 256, 128), True), ((240, 240), False), ((1024, 1024), True)]:
        def make(size=size):
            g = torch.Generator().manual_seed(1)
            moving = torch.rand(1, 1, *size, generator=g).to(device=device, dtype=dtype)
            return {"moving": moving, "coarse": _smooth_coarse(1, size, 16, device)}

        cases.append(Case(
            op="warp", shape="x".join(map(str, size)) + " /16", make=make,
            fused=lambda x: ck.warp(x["moving"], x["coarse"]),
            naive=lambda x: reference.warp(x["moving"], x["coarse"]),
            grad_inputs=("moving", "coarse"),
            bytes_moved=lambda x: 2 * x["moving"].numel() * x["moving"].element_size(),
            big=big,
        ))
    return cases


def _dense_conv(x: torch.Tensor) -> torch.Tensor:
    """One depthwise 3x3(x3) convolution with the outer product of [1, 2, 1] / 4."""
    nd = x.dim() - 2
    k = torch.tensor([0.25, 0.5, 0.25], device=x.device, dtype=x.dtype)
    w = k
    for _ in range(nd - 1):
        w = w.unsqueeze(-1) * k
    C = x.shape[1]
    w = w.expand(C, 1, *([3] * nd)).contiguous()
    conv = torch.nn.functional.conv3d if nd == 3 else torch.nn.functional.conv2d
    return conv(x, w, padding=1, groups=C)


def blur_cases(device: torch.device, dtype=torch.float32) -> list[Case]:
    cases = []
    for size, big in [((128, 128, 64), False), ((256, 256, 128), True), ((1024, 1024), False)]:
        def make(size=size):
            g = torch.Generator().manual_seed(2)
            return {"x": torch.rand(1, 1, *size, generator=g).to(device=device, dtype=dtype)}

        cases.append(Case(
            op="blur", shape="x".join(map(str, size)) + " [1,2,1]", make=make,
            fused=lambda x: ck.blur(x["x"]),
            naive=lambda x: reference.blur(x["x"]),
            grad_inputs=("x",),
            bytes_moved=lambda x: 2 * x["x"].numel() * x["x"].element_size(),
            others={"dense conv": lambda x: _dense_conv(x["x"])},
            big=big,
        ))
    return cases


def _masks(size, device, seed):
    """Two overlapping blob masks (float), the second a deformed copy of the first."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij"))
    m = torch.zeros(size)
    for _ in range(3):
        c = torch.tensor([float(torch.randint(n // 4, 3 * n // 4, (), generator=g)) for n in size])
        m = torch.maximum(m, (((grid - c.view(-1, *[1] * len(size))) ** 2).sum(0) <= (min(size) / 5) ** 2).float())
    m = m[None, None].to(device)
    return m, (ck.warp(m, _smooth_coarse(1, size, 16, device)) > 0.5).float()


def similarity_cases(device: torch.device) -> list[Case]:
    size = (256, 256, 128)

    def make_step():
        s1, s2 = _masks(size, device, 3)
        return {"s1b": ck.blur(s1), "s2b": ck.blur(s2), "coarse": _smooth_coarse(1, size, 16, device, 1.0)}

    cases = [Case(
        op="D_S iteration", shape="256x256x128 /16", make=make_step,
        fused=lambda x: ck.similarity_step(x["s1b"], x["s2b"], x["coarse"])[1],
        naive=lambda x: reference.similarity_step(x["s1b"], x["s2b"], x["coarse"])[1],
        grad_inputs=(), bytes_moved=lambda x: 2 * x["s1b"].numel() * x["s1b"].element_size(),
        big=True, backward=False)]
    for size_t, bound in [((64, 64, 32), 4), ((128, 128, 64), 3)]:
        def make_t(size_t=size_t):
            s1, s2 = _masks(size_t, device, 4)
            return {"s1": s1 > 0.5, "s2": s2 > 0.5}

        # fused = method "auto" (the cost model's pick); the others force each algorithm
        cases.append(Case(
            op="translation search", shape="x".join(map(str, size_t)) + f" shifts<={bound}", make=make_t,
            fused=lambda x, b=bound: ck.translation_search(x["s1"], x["s2"], b)[1],
            naive=lambda x, b=bound: brute_force_translation(x["s1"], x["s2"], b)[1],
            others={m: (lambda x, b=bound, m=m: ck.translation_search(x["s1"], x["s2"], b, method=m)[1])
                    for m in ("direct", "fft")},
            grad_inputs=(), bytes_moved=lambda x: 2 * x["s1"].numel(), backward=False))
    return cases


def tsearch_bound_cases(device: torch.device) -> list[tuple[str, torch.Tensor, torch.Tensor, int | None]]:
    """The translation search at growing bounds: (shape label, s1, s2,
    max_translation). The blob masks of the fast table (a third of the volume's bounding box)
    at shifts <= 3, <= 16 and any shift, and a worst case for memory: masks whose bounding
    boxes are the whole volume (every crop is the volume), at any shift."""
    s1, s2 = _masks((128, 128, 64), device, 4)
    s1, s2 = s1 > 0.5, s2 > 0.5
    cases = [("128x128x64 blobs", s1, s2, b) for b in (3, 16, None)]
    g = torch.Generator().manual_seed(5)
    f1 = torch.rand(1, 1, 64, 64, 32, generator=g) < 0.5            # dense noise: every crop is the volume
    f2 = f1 ^ (torch.rand(1, 1, 64, 64, 32, generator=g) < 0.1)      # related, not a shift
    cases.append(("64x64x32 full-volume noise", f1.to(device), f2.to(device), None))
    return cases


def ds_pair(device: torch.device, size=(256, 256, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The D_S-per-pair case: blob masks (a union of 4 balls), s2 = s1 under a
    smooth deformation of a few voxels (a 5x5x3 grid, N(0, 2^2)) plus a shift of (5, -4, 3)."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij"))
    s1 = torch.zeros(size, dtype=torch.bool)
    for _ in range(4):
        c = torch.tensor([float(torch.randint(n // 3, 2 * n // 3, (), generator=g)) for n in size])
        r = min(size) / 6 * (0.7 + 0.6 * torch.rand((), generator=g).item())
        s1 |= ((grid - c.view(-1, *[1] * len(size))) ** 2).sum(0) <= r * r
    s1 = s1[None, None]
    g = torch.Generator().manual_seed(1)
    nd = len(size)
    coarse = torch.randn(1, nd, *([5, 5, 3][:nd]), generator=g) * 2.0
    coarse += torch.tensor([5.0, -4.0, 3.0][:nd]).view(1, nd, *[1] * nd)
    s2 = ck.warp(s1.float(), coarse) > 0.5
    return s1.to(device), s2.to(device)


# The single-level D_S optimizer that coarse-to-fine replaced: benchmarks/legacy_similarity.py, last in the tree here.
LEGACY_SIMILARITY = ("benchmarks/legacy_similarity.py", "caff10b")


def ds_optimizers() -> dict:
    """name -> fn(s1, s2) -> (score[B], iterations[B]) for the D_S-per-pair table. The old
    optimizer is loaded from git history (LEGACY_SIMILARITY); without it its fn is None (row skipped)."""
    legacy_similarity, why = module_from_commit(
        *LEGACY_SIMILARITY, name="coopseg_legacy_similarity",
        renamed={"coopseg_kernels.ops.similarity": "coopseg_kernels.ops.similarity_step"})

    def new(s1, s2):
        r = ck.relative_similarity(s1, s2, grid_spacing=16)
        return r.score, r.iterations

    def old(s1, s2):
        r = legacy_similarity.relative_similarity(s1, s2, grid_spacing=16)
        return r.score, torch.full_like(r.score, r.losses.shape[0] - 1, dtype=torch.int64)

    if legacy_similarity is None:
        print(f"skipped the D_S-per-pair row 'single-level (before issue 8)': {why}", file=sys.stderr, flush=True)
        old = None
    return {"coarse-to-fine (this version)": new, "single-level (before issue 8)": old}


def nn_warp_cases(device: torch.device, size=(256, 256, 128)) -> list[Case]:
    """coopseg_kernels.nn against MONAI's Warp (its defaults: padding "border"), bilinear and
    nearest, fp32: on a full-resolution DDF (a smooth /16 field plus N(0, 0.5^2) voxel noise) and
    on a /16 grid that MONAI needs upsampled by F.interpolate (ours: CoarseWarp, the fused warp).
    Skipped, with a note, without MONAI."""
    try:
        from monai.networks.blocks import Warp as MonaiWarp
    except ImportError:
        print("nn.Warp cases skipped: MONAI is not installed (pip install monai)", file=sys.stderr)
        return []
    import warnings

    import torch.nn.functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample"
        monai = {m: MonaiWarp(mode=m, padding_mode="border") for m in ("bilinear", "nearest")}
    name = "x".join(map(str, size))

    def upsample(c):
        return F.interpolate(c, size=size, mode="trilinear", align_corners=True)

    def make_ddf():
        g = torch.Generator().manual_seed(3)
        moving = torch.rand(1, 1, *size, generator=g).to(device)
        noise = 0.5 * torch.randn(1, len(size), *size, generator=g).to(device)
        return {"moving": moving, "ddf": upsample(_smooth_coarse(1, size, 16, device)) + noise}

    def make_coarse():
        g = torch.Generator().manual_seed(3)
        moving = torch.rand(1, 1, *size, generator=g).to(device)
        return {"moving": moving, "coarse": _smooth_coarse(1, size, 16, device)}

    cases = []
    for mode in ("bilinear", "nearest"):
        ours = ck.nn.Warp(mode=mode, padding_mode="border")
        coarse_ours = ck.nn.CoarseWarp(mode=mode, padding_mode="border")
        cases.append(Case(
            op="nn.Warp", shape=f"{name} DDF {mode}", make=make_ddf,
            fused=lambda x, f=ours: f(x["moving"], x["ddf"]),
            naive=lambda x, f=monai[mode]: f(x["moving"], x["ddf"]),
            grad_inputs=("moving", "ddf"),
            bytes_moved=lambda x: (2 * x["moving"].numel() + x["ddf"].numel()) * 4, big=True, compare=True))
        cases.append(Case(
            op="nn.Warp", shape=f"{name} /16 {mode}", make=make_coarse,
            fused=lambda x, f=coarse_ours: f(x["moving"], x["coarse"]),
            naive=lambda x, f=monai[mode]: f(x["moving"], upsample(x["coarse"])),
            grad_inputs=("moving", "coarse"),
            bytes_moved=lambda x: 2 * x["moving"].numel() * 4, big=True, compare=True))
    return cases


def all_cases(device: torch.device, ops: list[str] | None = None) -> list[Case]:
    cases = warp_cases(device) + blur_cases(device) + similarity_cases(device)
    if ops is None or "nn.Warp" in ops:
        cases += nn_warp_cases(device)
    return [c for c in cases if ops is None or c.op in ops]
