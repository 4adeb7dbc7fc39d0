"""The deterministic image gradient of the Triton warps (triton/warp_gather.py), under the
interpreter: the same sum as the atomic scatter and as reference.warp's gradient -- exactly
where every product and sum is exact (dyadic displacements, integer gradients), within the
per-dtype tolerance otherwise --, bitwise equal from run to run, for every mode, padding,
2-D and 3-D, the coarse and the full-resolution path, fp32/fp64/fp16/bf16, the non-finite
rules, large displacements that cross program tiles, many outputs on one voxel; fp64
gradcheck; the `deterministic` switch and its errors."""
from __future__ import annotations

import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import nn, reference
from coopseg_kernels.ops.warp_dense import warp_dense
from helpers import assert_matches_reference

pytest.importorskip("triton")

MODES = ["bilinear", "nearest"]
PADS = ["zeros", "border", "reflection"]
# (image size, coarse size): the coarse path, and the dense path (coarse size = image size)
# S = 9 / s = 3 and S = 5 / s = 2 give interpolation weights in quarters (exact arithmetic)
GEOMETRIES = [((9, 5), (3, 2)), ((5, 9, 5), (2, 3, 2)), ((7, 6), (7, 6)), ((5, 6, 7), (5, 6, 7))]


def _image_grad(moving, coarse, g, **kw):
    m = moving.detach().clone().requires_grad_()
    return torch.autograd.grad(ck.warp(m, coarse, backend="triton", **kw), m, g)[0]


def _dyadic_inputs(size, coarse_size, dtype, scale=6.0):
    """Displacements up to +-scale that make every position, weight and sum exact in fp32 (and
    in the halves' fp32 accumulation): a dense field in 1/4 voxels, a coarse grid in whole
    voxels (its quarter interpolation weights give positions in 1/64 voxels in 3-D);
    integer output gradients."""
    nd = len(size)
    moving = torch.randn(2, 2, *size).to(dtype)
    q = 4 if tuple(coarse_size) == tuple(size) else 1
    coarse = (torch.randn(2, nd, *coarse_size) * scale * q).round() / q
    g = torch.randint(-3, 4, (2, 2, *size)).to(dtype)
    return moving, coarse.to(reference.math_dtype(dtype)), g


@pytest.mark.parametrize("size,coarse_size", GEOMETRIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADS)
def test_gather_equals_atomic_scatter_and_reference_exactly(size, coarse_size, mode, padding_mode):
    moving, coarse, g = _dyadic_inputs(size, coarse_size, torch.float32)
    det = _image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode, deterministic=True)
    atomic = _image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode, deterministic=False)
    m = moving.clone().requires_grad_()
    want = torch.autograd.grad(reference.warp(m, coarse, padding_mode=padding_mode, mode=mode), m, g)[0]
    assert torch.equal(det, atomic)
    assert torch.equal(det, want)
    assert det.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size,coarse_size", [GEOMETRIES[1], GEOMETRIES[3]])
def test_gather_dtypes(size, coarse_size, dtype):
    # halves accumulate in fp32 and round once, as the atomic path: exact here, so equal
    moving, coarse, g = _dyadic_inputs(size, coarse_size, dtype)
    for mode in MODES:
        det = _image_grad(moving, coarse, g, padding_mode="reflection", mode=mode, deterministic=True)
        atomic = _image_grad(moving, coarse, g, padding_mode="reflection", mode=mode, deterministic=False)
        assert det.dtype == dtype and torch.equal(det, atomic), mode


@pytest.mark.parametrize("size,coarse_size", [((13, 11, 9), (3, 4, 2)), ((23, 17, 19), (23, 17, 19)),
                                              ((37, 29), (5, 3))])
@pytest.mark.parametrize("padding_mode", PADS)
def test_large_displacements_across_tiles_match_reference(size, coarse_size, padding_mode):
    # displacements of about the volume's size: outputs reach image voxels of other programs
    nd = len(size)
    moving = torch.randn(1, 1, *size)
    coarse = torch.randn(1, nd, *coarse_size) * max(size)
    g = torch.randn(1, 1, *size)
    runs = [_image_grad(moving, coarse, g, padding_mode=padding_mode, deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])  # bitwise
    m = moving.clone().requires_grad_()
    want = torch.autograd.grad(reference.warp(m, coarse, padding_mode=padding_mode), m, g)[0]
    assert_matches_reference(runs[0], want, scale="max", names="grad_moving")


@pytest.mark.parametrize("mode", MODES)
def test_many_outputs_on_one_voxel(mode):
    # border padding far outside: every output reads the same corner voxel (one long run)
    moving = torch.randn(1, 1, 6, 7, 5)
    coarse = torch.full((1, 3, 2, 2, 2), -50.0)
    g = torch.randn(1, 1, 6, 7, 5)
    det = _image_grad(moving, coarse, g, padding_mode="border", mode=mode, deterministic=True)
    assert det[0, 0, 0, 0, 0] == pytest.approx(float(g.double().sum()), rel=1e-5)
    assert det.flatten()[1:].abs().max() == 0


@pytest.mark.parametrize("size,coarse_size", [GEOMETRIES[1], GEOMETRIES[3]])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_rules(size, coarse_size, mode):
    # a non-finite node / displacement: its outputs add nothing; a non-finite grad_out reaches
    # the corners inside (docs/conventions.md#non-finite-values)
    moving, coarse, g = _dyadic_inputs(size, coarse_size, torch.float32)
    coarse[0, 1, 1, 1, 0] = float("nan")
    coarse[1, 0, 0, 1, 1] = float("inf")
    g[0, 0, 2, 3, 1] = float("nan")
    g[1, 1, 1, 2, 4] = float("-inf")
    for pad in PADS:
        det = _image_grad(moving, coarse, g, padding_mode=pad, mode=mode, deterministic=True)
        atomic = _image_grad(moving, coarse, g, padding_mode=pad, mode=mode, deterministic=False)
        torch.testing.assert_close(det, atomic, rtol=0, atol=0, equal_nan=True)
        assert det.isnan().any()


@pytest.mark.parametrize("size,coarse_size", [((4, 3, 5), (2, 2, 3)), ((4, 3, 5), (4, 3, 5)), ((5, 4), (5, 4))])
@pytest.mark.parametrize("padding_mode", PADS)
def test_gradcheck_fp64(size, coarse_size, padding_mode):
    nd = len(size)
    m = torch.randn(1, 2, *size, dtype=torch.float64, requires_grad=True)
    c = (torch.randn(1, nd, *coarse_size, dtype=torch.float64) * 1.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: ck.warp(x, y, padding_mode=padding_mode, backend="triton", deterministic=True), (m, c))


def test_int64_offsets(monkeypatch):
    monkeypatch.setenv("COOPSEG_FORCE_INT64", "1")
    test_gather_equals_atomic_scatter_and_reference_exactly((5, 9, 5), (2, 3, 2), "bilinear", "reflection")
    test_gather_equals_atomic_scatter_and_reference_exactly((7, 6), (7, 6), "nearest", "zeros")


def test_switch_follows_torch_and_modules(monkeypatch):
    from coopseg_kernels.triton import warp_gather

    calls = []
    real = warp_gather.gather_image_grad
    monkeypatch.setattr(warp_gather, "gather_image_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    moving = torch.randn(1, 1, 5, 6, requires_grad=True)
    coarse, ddf = torch.randn(1, 2, 2, 3), torch.randn(1, 2, 5, 6)
    for fn in (lambda: ck.warp(moving, coarse, backend="triton"),
               lambda: nn.Warp(backend="triton")(moving, ddf),
               lambda: nn.SpatialTransformer(backend="triton")(moving, ddf),
               lambda: nn.CoarseWarp(backend="triton")(moving, coarse)):
        fn().sum().backward()  # atomic by default, as grid_sample
        assert not calls
        torch.use_deterministic_algorithms(True)
        try:
            fn().sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        assert len(calls) == 1
        calls.clear()
    nn.Warp(backend="triton", deterministic=True)(moving, ddf).sum().backward()
    ck.warp(moving, ddf, backend="triton", deterministic=True).sum().backward()
    assert len(calls) == 2
    # the C++ kernels take no switch: always deterministic
    ck.warp(moving, coarse, backend="cpp", deterministic=True).sum().backward()
    assert len(calls) == 2


def test_deterministic_argument_errors():
    moving, coarse = torch.randn(1, 1, 5, 6), torch.randn(1, 2, 2, 3)
    with pytest.raises(TypeError, match="deterministic must be True, False or None, got 1"):
        ck.warp(moving, coarse, deterministic=1)
    with pytest.raises(TypeError, match="deterministic must be True, False or None, got 'yes'"):
        warp_dense(moving, torch.randn(1, 2, 5, 6), deterministic="yes")
    for cls in (nn.Warp, nn.SpatialTransformer, nn.CoarseWarp):
        with pytest.raises(TypeError, match="deterministic must be True, False or None"):
            cls(deterministic=0)


def test_opcheck():
    moving = torch.randn(1, 2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    coarse = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, 5, 6, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.coopseg.warp.default,
                          (moving, coarse, True, "reflection", "bilinear", "triton", True))
    torch.library.opcheck(torch.ops.coopseg.warp_backward.default,
                          (g, moving.detach(), coarse.detach(), True, "zeros", "nearest", "triton", True, True, True))
    ddf = torch.randn(1, 3, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.coopseg.warp_dense.default, (moving, ddf, "border", "bilinear", "triton", True))


# ----------------------------------------------------------------------------- GPU (make gpu-check)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size,coarse_size", [((41, 37, 35), (3, 4, 3)), ((41, 37, 35), (41, 37, 35)),
                                              ((257, 129), (9, 5))])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_gather_is_bitwise_repeatable_and_matches_atomic(size, coarse_size, mode, dtype):
    nd = len(size)
    moving = torch.randn(2, 2, *size, device="cuda").to(dtype)
    coarse = torch.randn(2, nd, *coarse_size, device="cuda") * 4
    g = torch.randn(2, 2, *size, device="cuda").to(dtype)
    for pad in PADS:
        runs = [_image_grad(moving, coarse, g, padding_mode=pad, mode=mode, deterministic=True) for _ in range(3)]
        assert all(torch.equal(r, runs[0]) for r in runs[1:]), pad
        atomic = _image_grad(moving, coarse, g, padding_mode=pad, mode=mode, deterministic=False)
        assert_matches_reference(runs[0], atomic, dtype=dtype, scale="max", upcast=True, names="grad_moving")


@pytest.mark.cuda
def test_cuda_gather_gradcheck_fp64():
    for coarse_size in ((2, 2, 3), (4, 3, 5)):
        m = torch.randn(1, 2, 4, 3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
        c = (torch.randn(1, 3, *coarse_size, dtype=torch.float64, device="cuda") * 1.5).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: ck.warp(x, y, padding_mode="reflection", deterministic=True),
                                        (m, c))
