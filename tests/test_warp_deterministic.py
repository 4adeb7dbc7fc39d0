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
# (image size, coarse size): the coarse path (S = 9 / s = 3 and S = 5 / s = 2: interpolation
# weights in quarters) and the dense path (coarse size = image size); sizes n with n - 1 a power
# of two, so that the reference's grid_sample normalisation (x * 2 / (n - 1) - 1 and back) is exact
COARSE2, COARSE3, DENSE2, DENSE3 = ((9, 5), (3, 2)), ((5, 5, 9), (2, 2, 3)), ((9, 5), (9, 5)), ((5, 5, 9), (5, 5, 9))
# every (mode, padding) on each path, split between 2-D and 3-D (the interpreter is slow)
EXACT_CASES = [(geom, mode, pad) for (a, b) in ((COARSE2, COARSE3), (DENSE2, DENSE3))
               for i, (mode, pad) in enumerate((m, p) for m in MODES for p in PADS) for geom in [(a, b)[i % 2]]]


def _image_grad(moving, coarse, g, **kw):
    m = moving.detach().clone().requires_grad_()
    return torch.autograd.grad(ck.warp(m, coarse, backend="triton", **kw), m, g)[0]


def _reference_image_grad(moving, coarse, g, **kw):
    m = moving.detach().clone().requires_grad_()
    return torch.autograd.grad(reference.warp(m, coarse, **kw), m, g)[0]


def _dyadic_inputs(size, coarse_size, dtype, scale=2.0, B=2):
    """Displacements up to about +-scale that make every position, weight and sum exact in
    fp32 (and in the halves' fp32 accumulation): a dense field in 1/4 voxels, a coarse grid in
    whole voxels (its quarter interpolation weights give positions in 1/64 voxels in 3-D);
    integer output gradients."""
    nd = len(size)
    moving = torch.randn(B, 1, *size).to(dtype)
    q = 4 if tuple(coarse_size) == tuple(size) else 1
    coarse = (torch.randn(B, nd, *coarse_size) * scale * q).round() / q
    g = torch.randint(-3, 4, (B, 1, *size)).to(dtype)
    return moving, coarse.to(reference.math_dtype(dtype)), g


@pytest.mark.parametrize("geometry,mode,padding_mode", EXACT_CASES)
def test_gather_equals_reference_exactly(geometry, mode, padding_mode):
    # exact sums: the same set of products whatever the order, so bitwise equal (the atomic
    # scatter forms the same products: test_gather_equals_atomic_scatter)
    moving, coarse, g = _dyadic_inputs(*geometry, torch.float32)
    det = _image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode, deterministic=True)
    want = _reference_image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode)
    assert torch.equal(det, want)
    assert det.abs().sum() > 0


@pytest.mark.parametrize("geometry,mode,padding_mode,dtype", [
    (COARSE2, "bilinear", "reflection", torch.float64), (DENSE3, "nearest", "border", torch.float16),
    (COARSE2, "nearest", "zeros", torch.bfloat16), (DENSE2, "bilinear", "reflection", torch.bfloat16),
    (DENSE3, "bilinear", "border", torch.float32)])
def test_gather_equals_atomic_scatter(geometry, mode, padding_mode, dtype):
    # halves accumulate in fp32 and round once, as the atomic path: exact here, so equal
    moving, coarse, g = _dyadic_inputs(*geometry, dtype, B=1)
    det = _image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode, deterministic=True)
    atomic = _image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode, deterministic=False)
    assert det.dtype == dtype and torch.equal(det, atomic)


@pytest.mark.parametrize("size,coarse_size,padding_mode", [((37, 29), (5, 3), "reflection"),
                                                           ((29, 37), (29, 37), "zeros")])
def test_large_displacements_across_tiles(size, coarse_size, padding_mode):
    # displacements of about the volume's size (several programs of 256 voxels): outputs reach
    # image voxels of other programs; two runs bitwise equal
    nd = len(size)
    moving = torch.randn(1, 1, *size)
    coarse = torch.randn(1, nd, *coarse_size) * max(size) / 2
    g = torch.randn(1, 1, *size)
    runs = [_image_grad(moving, coarse, g, padding_mode=padding_mode, deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    want = _reference_image_grad(moving, coarse, g, padding_mode=padding_mode)
    assert_matches_reference(runs[0], want, scale="max", names="grad_moving")


@pytest.mark.parametrize("size,mode", [((3, 4, 2), "nearest"), ((4, 5), "bilinear")])
def test_many_outputs_on_one_voxel(size, mode):
    # border padding far outside: every output reads the first voxel (one long run)
    moving = torch.randn(1, 1, *size)
    coarse = torch.full((1, len(size), *[2] * len(size)), -50.0)
    g = torch.randn(1, 1, *size)
    det = _image_grad(moving, coarse, g, padding_mode="border", mode=mode, deterministic=True)
    assert float(det.flatten()[0]) == pytest.approx(float(g.double().sum()), rel=1e-5)
    assert det.flatten()[1:].abs().max() == 0


@pytest.mark.parametrize("geometry,mode,padding_mode", [(COARSE3, "bilinear", "reflection"),
                                                        (DENSE3, "nearest", "zeros"), (DENSE2, "bilinear", "border")])
def test_non_finite_rules(geometry, mode, padding_mode):
    # a non-finite node / displacement: its outputs add nothing; a non-finite grad_out reaches
    # the corners inside (docs/conventions.md#non-finite-values)
    moving, coarse, g = _dyadic_inputs(*geometry, torch.float32)
    coarse[0, 1].view(-1)[3] = float("nan")
    coarse[1, 0].view(-1)[5] = float("inf")
    g[0, 0].view(-1)[::7] = float("nan")
    g[1, 0].view(-1)[::11] = float("-inf")
    det = _image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode, deterministic=True)
    want = _reference_image_grad(moving, coarse, g, padding_mode=padding_mode, mode=mode)
    torch.testing.assert_close(det, want, rtol=0, atol=0, equal_nan=True)
    assert det.isnan().any()


@pytest.mark.parametrize("geometry", [COARSE2, DENSE2])
def test_gradcheck_fp64(geometry):
    size, coarse_size = geometry
    m = torch.randn(1, 1, *size, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, len(size), *coarse_size, dtype=torch.float64) * 1.5
    assert torch.autograd.gradcheck(
        lambda x: ck.warp(x, c, padding_mode="reflection", backend="triton", deterministic=True), (m,),
        fast_mode=True)


def test_int64_offsets(monkeypatch):
    monkeypatch.setenv("COOPSEG_FORCE_INT64", "1")
    test_gather_equals_reference_exactly(COARSE2, "bilinear", "reflection")
    test_gather_equals_reference_exactly(DENSE3, "nearest", "zeros")


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
    moving = torch.randn(1, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    coarse = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    ddf = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.coopseg.warp.default,
                          (moving, coarse, True, "reflection", "bilinear", "triton", True))
    torch.library.opcheck(torch.ops.coopseg.warp_dense.default, (moving, ddf, "border", "nearest", "triton", True))


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
