"""coopseg_kernels.nn against MONAI's Warp and VoxelMorph's SpatialTransformer themselves, and the
dense (full-resolution field) kernels behind them against F.grid_sample and the reference.

MONAI and VoxelMorph are optional test dependencies (setup.py's "test" extras install them);
their tests are skipped with the reason when they are absent. Random odd shapes, every mode
and padding the libraries support, 2-D and 3-D, forward and both gradients, fp32 and fp64 with
tests/helpers.py's tolerances; nearest label maps bit-exact.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import coopseg_kernels as ck
from coopseg_kernels import reference
from coopseg_kernels.convert import field_to_grid
from coopseg_kernels.ops.warp_dense import warp_dense
from helpers import tol

SIZES = {2: (7, 9), 3: (5, 6, 7)}
PADS = ("zeros", "border", "reflection")
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)


def _monai_warp():
    blocks = pytest.importorskip("monai.networks.blocks",
                                 reason="MONAI is not installed (pip install monai, or the package's 'test' extras)")
    return blocks.Warp


def _vxm_transformer():
    modules = pytest.importorskip("voxelmorph.nn.modules",
                                  reason="VoxelMorph 0.3.4 is not installed (pip install voxelmorph==0.3.4, "
                                         "or the package's 'test' extras)")
    return modules.SpatialTransformer


def _inputs(nd, dtype, B=2, C=3, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = SIZES[nd]
    moving = torch.randn(B, C, *size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ddf = (scale * torch.randn(B, nd, *size, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return moving, ddf


def _labels(nd, dtype, B=2, C=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2 if dtype == torch.bool else 7, (B, C, *SIZES[nd]), generator=g)
    return x.to(dtype)


def _grads(out, inputs, seed=2):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(device=out.device, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _assert_same(got, want, dtype, nearest):
    out_g, out_w = got[0], want[0]
    if nearest:
        assert torch.equal(out_g, out_w), (out_g - out_w).abs().max()
    else:
        torch.testing.assert_close(out_g, out_w, **tol(dtype))
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, **tol(dtype))


def _oracle(moving, ddf, padding_mode, mode):
    """F.grid_sample(align_corners=True) at voxel + ddf, in the math dtype."""
    dt = reference.math_dtype(moving.dtype)
    grid = field_to_grid(ddf.to(dt), align_corners=True)
    return F.grid_sample(moving.to(dt), grid, mode=mode, padding_mode=padding_mode, align_corners=True)


# ---------------------------------------------------------------------------------------- MONAI


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", PADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_matches_monai(nd, mode, padding_mode, dtype):
    MonaiWarp = _monai_warp()
    if mode == "bicubic" and nd == 3:
        pytest.skip("grid_sample has no 3-D bicubic mode (MONAI's Warp neither)")
    moving, ddf = _inputs(nd, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI: "Using PyTorch native grid_sample"
        theirs = MonaiWarp(mode=mode, padding_mode=padding_mode)
    ours = ck.nn.Warp(mode=mode, padding_mode=padding_mode)
    want = theirs(moving, ddf)
    got = ours(moving, ddf)
    _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), dtype, mode == "nearest")


def test_warp_defaults_and_jitter_match_monai():
    MonaiWarp = _monai_warp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = MonaiWarp(jitter=True)
        plain = MonaiWarp()
    ours = ck.nn.Warp(jitter=True)
    assert (ck.nn.Warp().mode, ck.nn.Warp().padding_mode) == (plain._interp_mode_native, plain._padding_mode_native)
    moving, ddf = _inputs(3, torch.float64)
    want, got = theirs(moving, ddf), ours(moving, ddf)
    _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), torch.float64, False)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("padding_mode", PADS)
def test_warp_label_map_bit_exact_with_monai(nd, padding_mode):
    """A label map warped in its own dtype equals MONAI's nearest warp of it as float (MONAI
    itself needs a float image)."""
    MonaiWarp = _monai_warp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = MonaiWarp(mode="nearest", padding_mode=padding_mode)
    _, ddf = _inputs(nd, torch.float32)
    ddf = ddf.detach()
    for dtype in LABEL_DTYPES:
        labels = _labels(nd, dtype)
        got = ck.nn.Warp(mode="nearest", padding_mode=padding_mode)(labels, ddf)
        assert got.dtype == dtype
        assert torch.equal(got, theirs(labels.float(), ddf).to(dtype))


def test_warp_errors_like_monai():
    ours = ck.nn.Warp()
    moving, ddf = _inputs(3, torch.float32)
    with pytest.raises(ValueError, match="the input DDF shape must be"):
        ours(moving, ddf[:, :2])
    with pytest.raises(NotImplementedError, match="spatial_dims"):
        ours(moving[0, 0], ddf[0, :1])
    with pytest.raises(ValueError, match="mode must be one of"):
        ck.nn.Warp(mode="trilinearish")
    with pytest.raises(TypeError, match="mode='nearest'"):
        ours(_labels(3, torch.uint8), ddf)


# ----------------------------------------------------------------------------------- VoxelMorph


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spatial_transformer_matches_voxelmorph(nd, mode, align_corners, dtype):
    VxmTransformer = _vxm_transformer()
    moving, ddf = _inputs(nd, dtype)
    want = VxmTransformer(mode, align_corners)(moving, ddf)
    got = ck.nn.SpatialTransformer(mode, align_corners)(moving, ddf)
    _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), dtype, mode == "nearest")


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("align_corners", [True, False])
def test_spatial_transformer_label_maps_match_voxelmorph(nd, align_corners):
    VxmTransformer = _vxm_transformer()
    _, ddf = _inputs(nd, torch.float32)
    ddf = ddf.detach()
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):  # VoxelMorph casts back; bool it cannot
        labels = _labels(nd, dtype)
        want = VxmTransformer("nearest", align_corners)(labels, ddf)
        got = ck.nn.SpatialTransformer("nearest", align_corners)(labels, ddf)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want)
    # "linear" on a label map: VoxelMorph's float32 result
    want = VxmTransformer("linear", align_corners)(labels, ddf)
    got = ck.nn.SpatialTransformer("linear", align_corners)(labels, ddf)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **tol(torch.float32))


# ------------------------------------------------------------------- the dense kernels themselves


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADS)
def test_dense_matches_grid_sample(backend, nd, mode, padding_mode):
    for dtype in (torch.float64, torch.float32):
        moving, ddf = _inputs(nd, dtype, scale=3.0)
        want = _oracle(moving, ddf, padding_mode, mode).to(dtype)
        got = warp_dense(moving, ddf, padding_mode=padding_mode, mode=mode, backend=backend)
        _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), dtype,
                     mode == "nearest")


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADS)
def test_dense_matches_reference(backend, nd, mode, padding_mode):
    moving, ddf = _inputs(nd, torch.float64, scale=3.0)
    want = reference.warp(moving, ddf, padding_mode=padding_mode, mode=mode)
    got = ck.warp(moving, ddf, padding_mode=padding_mode, mode=mode, backend=backend)
    _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), torch.float64,
                 mode == "nearest")


@pytest.mark.parametrize("nd", [2, 3])
def test_dense_label_maps_bit_exact(backend, nd):
    _, ddf = _inputs(nd, torch.float32, scale=3.0)
    ddf = ddf.detach()
    for padding_mode in PADS:
        for dtype in LABEL_DTYPES:
            labels = _labels(nd, dtype, C=2)
            got = warp_dense(labels, ddf, padding_mode=padding_mode, mode="nearest", backend=backend)
            assert got.dtype == dtype
            assert torch.equal(got, _oracle(labels.float(), ddf, padding_mode, "nearest").to(dtype))


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("padding_mode", PADS)
def test_dense_gradcheck(backend, nd, padding_mode):
    size = (3, 4) if nd == 2 else (3, 4, 5)
    g = torch.Generator().manual_seed(3)
    moving = torch.randn(1, 2, *size, generator=g, dtype=torch.float64, requires_grad=True)
    ddf = (1.3 * torch.randn(1, nd, *size, generator=g, dtype=torch.float64)).requires_grad_()
    fn = lambda m, u: warp_dense(m, u, padding_mode=padding_mode, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (moving, ddf), fast_mode=backend == "triton")
    # nearest is linear in the image; its field gradient is zero
    near = lambda m: warp_dense(m, ddf.detach(), padding_mode=padding_mode, mode="nearest", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(near, (moving,), fast_mode=backend == "triton")
    (gu,) = torch.autograd.grad(warp_dense(moving, ddf, mode="nearest", backend=backend).sum(), ddf)
    assert torch.equal(gu, torch.zeros_like(gu))


def test_dense_opcheck(backend):
    moving, ddf = _inputs(3, torch.float64, B=1, C=2)
    moving, ddf = moving.detach().requires_grad_(), ddf.detach().requires_grad_()
    for mode in ("bilinear", "nearest"):
        torch.library.opcheck(torch.ops.coopseg.warp_dense.default, (moving, ddf, "reflection", mode, backend))
    g = torch.randn(moving.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.coopseg.warp_dense_backward.default,
                          (g, moving.detach(), ddf.detach(), "border", "bilinear", backend, True, True))
    labels = _labels(3, torch.uint8, B=1)
    torch.library.opcheck(torch.ops.coopseg.warp_dense.default, (labels, ddf.detach().float(), "zeros", "nearest",
                                                                 backend))


def test_warp_routes_full_resolution_fields(backend):
    """ck.warp with a grid of the image's size is the dense op; it agrees with the reference."""
    moving, ddf = _inputs(3, torch.float64)
    for padding_mode in ("zeros", "border"):
        got = ck.warp(moving, ddf, padding_mode=padding_mode, backend=backend)
        assert "warp_dense" in got.grad_fn.name()
        want = reference.warp(moving, ddf, padding_mode=padding_mode)
        _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), torch.float64, False)
    assert torch.equal(ck.nn.CoarseWarp(padding_mode="border", backend=backend)(moving, ddf),
                       ck.warp(moving, ddf, padding_mode="border", backend=backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_nonfinite_follows_the_cell_rule(backend, dtype):
    """A non-finite displacement makes the voxels of the cells that have it as a node NaN, with a
    NaN field gradient there and nothing to the image gradient (reference.warp's rule); an inf in
    the image or a NaN output gradient take the exact paths (fp32: past the AVX-512 rows)."""
    moving, ddf = _inputs(3, dtype)
    ddf = ddf.detach().clone()
    ddf[0, 1, 2, 3, 4] = float("nan")
    ddf[1, 0, 4, 5, 6] = float("inf")
    ddf.requires_grad_()
    for padding_mode in ("zeros", "border"):
        got = ck.warp(moving, ddf, padding_mode=padding_mode, backend=backend)
        want = reference.warp(moving, ddf, padding_mode=padding_mode)
        torch.testing.assert_close(got, want, equal_nan=True, **tol(dtype))
        # 8 voxels each (C = 3): (1..2, 2..3, 3..4) around the NaN; (3..4, 4..5, 5..6) for the last node,
        # whose own voxel's cell is clamped onto it
        assert int(got.isnan().sum()) == 3 * 8 * 2
        for a, b in zip(_grads(got, (moving, ddf)), _grads(want, (moving, ddf))):
            torch.testing.assert_close(a, b, equal_nan=True, **tol(dtype))
    moving2 = moving.detach().clone()
    moving2[0, 1, 2, 2, 2] = float("inf")
    moving2.requires_grad_()
    _, ddf2 = _inputs(3, dtype, seed=5)
    g = torch.randn(moving2.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    g[1, 2, 3, 3, 3] = float("nan")
    got = ck.warp(moving2, ddf2, backend=backend)
    want = reference.warp(moving2, ddf2)
    torch.testing.assert_close(got, want, equal_nan=True, **tol(dtype))
    for a, b in zip(torch.autograd.grad(got, (moving2, ddf2), g), torch.autograd.grad(want, (moving2, ddf2), g)):
        # NaN and inf are not told apart in gradients of non-finite data (docs/conventions.md#non-finite-values)
        assert torch.equal(a.isfinite(), b.isfinite())
        torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), **tol(dtype))
    labels = _labels(3, torch.int32)
    out = warp_dense(labels, ddf.detach().float(), mode="nearest", backend=backend)
    assert (out[got[:, :1].isnan()] == 0).all()


def test_dense_image_gradient_deterministic(set_threads):
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(4)
    moving = torch.randn(1, 2, 9, 10, 11, generator=g, requires_grad=True)
    ddf = 2.5 * torch.randn(1, 3, 9, 10, 11, generator=g)
    grads = []
    for threads in (1, 2, 3):
        set_threads(threads)
        for mode in ("bilinear", "nearest"):
            out = warp_dense(moving, ddf, padding_mode="reflection", mode=mode, backend="cpp")
            grads.append(torch.autograd.grad(out.square().sum(), moving)[0])
    for a, b in zip(grads[2:], grads):
        assert torch.equal(a, b)


def test_dense_input_errors():
    moving, ddf = _inputs(2, torch.float32)
    with pytest.raises(ValueError, match="spatial size of moving"):
        warp_dense(moving, ddf[..., :-1])
    with pytest.raises(TypeError, match="mode='nearest'"):
        warp_dense(_labels(2, torch.int16), ddf)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        warp_dense(moving, ddf, padding_mode="wrap")
    with pytest.raises(TypeError, match="label map"):
        warp_dense(moving.detach().to(torch.int8), ddf, mode="nearest")


def test_dense_raw_op_errors():
    """The raw C++ ops are public schemas: they check what their kernels rely on themselves."""
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    moving, ddf = _inputs(3, torch.float32)
    moving, ddf = moving.detach(), ddf.detach()
    fwd, bwd = torch.ops.coopseg.warp_dense_fwd, torch.ops.coopseg.warp_dense_bwd
    with pytest.raises(RuntimeError, match="warp_dense_fwd: ddf must have the spatial size of moving"):
        fwd(moving, ddf[..., :-1].contiguous(), "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="warp_dense_fwd: ddf must be Float"):
        fwd(moving, ddf.double(), "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="label maps need mode='nearest'"):
        fwd(_labels(3, torch.uint8), ddf, "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="padding_mode must be"):
        fwd(moving, ddf, "wrap", "bilinear")
    with pytest.raises(RuntimeError, match="warp_dense_bwd: mode must be"):
        bwd(moving, moving, ddf, "zeros", "cubic", True, True)
    with pytest.raises(RuntimeError, match="warp_dense_bwd: grad_out must have the shape of moving"):
        bwd(moving[:1], moving, ddf, "zeros", "bilinear", True, True)


def test_dense_int64_offsets(backend, monkeypatch):
    """The 64-bit offset instantiations (a volume of 2^31 voxels or more), run on a small volume
    through the test-only switch COOPSEG_FORCE_INT64=1."""
    monkeypatch.setenv("COOPSEG_FORCE_INT64", "1")
    for mode in ("bilinear", "nearest"):
        moving, ddf = _inputs(3, torch.float32, scale=3.0)
        want = _oracle(moving, ddf, "reflection", mode)
        got = warp_dense(moving, ddf, padding_mode="reflection", mode=mode, backend=backend)
        _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), torch.float32,
                     mode == "nearest")
    labels = _labels(3, torch.int16)
    got = warp_dense(labels, ddf.detach(), mode="nearest", backend=backend)
    assert torch.equal(got, _oracle(labels.float(), ddf.detach(), "zeros", "nearest").to(torch.int16))


# ------------------------------------------------------------------------- CUDA (make gpu-check)
# The compiled Triton dense kernels on a CUDA device (skipped without one): odd shapes, every mode
# and padding, fp32 / fp16 / bf16 images against grid_sample in fp32 on the same rounded inputs,
# label maps bit-exact, and MONAI's Warp on the GPU.


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADS)
@pytest.mark.parametrize("size", [(17, 19, 23), (33, 47)])
def test_cuda_dense_matches_grid_sample(size, mode, padding_mode, dtype):
    g = torch.Generator().manual_seed(7)
    nd = len(size)
    moving = torch.randn(2, 2, *size, generator=g).cuda().to(dtype).requires_grad_()
    ddf = (3.0 * torch.randn(2, nd, *size, generator=g)).cuda().requires_grad_()
    got = warp_dense(moving, ddf, padding_mode=padding_mode, mode=mode)
    m32 = moving.detach().float().requires_grad_()
    u32 = ddf.detach().clone().requires_grad_()
    want = _oracle(m32, u32, padding_mode, mode)
    assert got.dtype == dtype
    gout = torch.randn(got.shape, generator=g).cuda().to(dtype)
    gm, gu = torch.autograd.grad(got, (moving, ddf), gout)
    wm, wu = torch.autograd.grad(want, (m32, u32), gout.float())
    if mode == "nearest":
        assert torch.equal(got.float(), want.to(dtype).float())
    else:
        torch.testing.assert_close(got.float(), want, **tol(dtype))
    torch.testing.assert_close(gm.float(), wm, **tol(dtype))
    scale = max(float(wu.abs().max()), 1.0)
    torch.testing.assert_close(gu / scale, wu / scale, **tol(dtype))
    labels = torch.randint(0, 7, (2, 1, *size), generator=g).to(torch.uint8).cuda()
    out = warp_dense(labels, ddf.detach(), padding_mode=padding_mode, mode="nearest")
    assert out.dtype == torch.uint8
    assert torch.equal(out, _oracle(labels.float(), ddf.detach(), padding_mode, "nearest").to(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_cuda_warp_matches_monai(mode):
    MonaiWarp = _monai_warp()
    g = torch.Generator().manual_seed(8)
    moving = torch.randn(1, 2, 21, 22, 23, generator=g).cuda().requires_grad_()
    ddf = (2.0 * torch.randn(1, 3, 21, 22, 23, generator=g)).cuda().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = MonaiWarp(mode=mode)(moving, ddf)
    got = ck.nn.Warp(mode=mode)(moving, ddf)
    _assert_same((got, *_grads(got, (moving, ddf))), (want, *_grads(want, (moving, ddf))), torch.float32,
                 mode == "nearest")
