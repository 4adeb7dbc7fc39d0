"""warp's modes: mode="bilinear" | "nearest" x padding_mode="zeros" | "border" | "reflection",
and integer/bool label maps with nearest. The reference against F.grid_sample itself, then the
C++ and (interpreted) Triton kernels against the reference."""
import pytest
import torch
import torch.nn.functional as F

import coopseg_kernels as ck
from coopseg_kernels import reference
from coopseg_kernels.convert import field_to_grid
from helpers import assert_matches_reference

PADS = ["zeros", "border", "reflection"]
MODES = ["bilinear", "nearest"]
LABELS = [torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]
# (full-resolution size, coarse size): odd sizes, a size-2 axis, coarse axes of 1 and longer than the image
CASES = [((5, 6, 7), (2, 1, 3)), ((3, 2, 5), (4, 2, 1)), ((7, 9), (3, 1)), ((6, 5), (4, 7))]


def _inputs(size, coarse_size, dtype, B=2, C=2, scale=None):
    """Random image and a coarse field whose samples leave the volume by up to ~2 sizes (reflection
    folds several times)."""
    nd = len(size)
    scale = max(size) if scale is None else scale
    moving = torch.randn(B, C, *size, dtype=dtype).requires_grad_()
    coarse = (torch.randn(B, nd, *coarse_size, dtype=dtype) * scale).requires_grad_()
    return moving, coarse


def _labels(moving, dtype):
    """Small ints (so that a float copy is exact) of moving's shape, in `dtype`."""
    lab = torch.randint(0, 2 if dtype == torch.bool else 7, moving.shape)
    return lab.to(dtype)


def _grid_sample(moving, coarse, mode, padding_mode, align_corners=True):
    """The composition the reference spells: upsample, convert, grid_sample(align_corners=True)."""
    field = reference.upsample_field(coarse, moving.shape[2:], align_corners=align_corners)
    return F.grid_sample(moving, field_to_grid(field), mode=mode, padding_mode=padding_mode, align_corners=True)


def _near_ties(coarse, size, dtype, align_corners=True):
    """(B, 1, *S) bool: voxels whose position lies within rounding of a half-integer along some axis
    (after reflection too), where nearest may legitimately differ between two roundings."""
    from coopseg_kernels.convert import identity_positions

    field = reference.upsample_field(coarse.detach(), size, align_corners=align_corners)
    pos = identity_positions(size, dtype).unsqueeze(0) + field
    eps = 1e-4 if dtype == torch.float32 else 1e-9
    near = torch.zeros_like(pos[:, :1], dtype=torch.bool)
    for k, n in enumerate(size):
        for pad in PADS:
            q = reference.pad_position(pos[:, k:k + 1], n, pad)
            near |= ((q - q.floor()) - 0.5).abs() < eps
    return near


# ----------------------------------------------------------------------------- the reference vs grid_sample


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_mode", PADS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size,coarse_size", CASES)
def test_reference_matches_grid_sample(size, coarse_size, mode, padding_mode, dtype):
    moving, coarse = _inputs(size, coarse_size, dtype)
    grad_out = torch.randn(moving.shape, dtype=dtype)
    got = reference.warp(moving, coarse, padding_mode=padding_mode, mode=mode)
    want = _grid_sample(moving, coarse, mode, padding_mode)
    assert got.dtype == dtype
    if mode == "nearest":
        ties = _near_ties(coarse, size, dtype).expand_as(got)
        assert (got[~ties] == want[~ties]).all()
        gm, gc = torch.autograd.grad(got, (moving, coarse), grad_out)
        wm, = torch.autograd.grad(want, (moving,), grad_out)
        if not ties.any():
            assert torch.equal(gm, wm)
        assert torch.equal(gc, torch.zeros_like(coarse))  # no gradient to the field
    else:
        assert_matches_reference(got, want, wrt=((moving, coarse), (moving, coarse)), grad_out=grad_out)
    if padding_mode == "reflection":
        assert not (got == 0).any()  # every sample lands inside
    # the default padding/mode are bilinear zeros, as before
    assert torch.equal(reference.warp(moving, coarse), reference.warp(moving, coarse, padding_mode="zeros",
                                                                      mode="bilinear"))


@pytest.mark.parametrize("dtype", LABELS)
@pytest.mark.parametrize("padding_mode", PADS)
@pytest.mark.parametrize("size,coarse_size", CASES[:1] + CASES[2:3])
def test_reference_labels_bit_exact(size, coarse_size, padding_mode, dtype):
    moving, coarse = _inputs(size, coarse_size, torch.float32)
    lab = _labels(moving, dtype)
    got = reference.warp(lab, coarse.detach(), padding_mode=padding_mode, mode="nearest")
    assert got.dtype == dtype and got.shape == lab.shape
    want = _grid_sample(lab.float(), coarse.detach(), "nearest", padding_mode)
    ties = _near_ties(coarse, size, torch.float32).expand_as(got)
    assert torch.equal(got[~ties].float(), want[~ties])


@pytest.mark.parametrize("padding_mode", PADS)
def test_reference_nearest_rounds_half_to_even(padding_mode):
    # constant displacements of exactly +-0.5 and 1.5: ties, rounded to the even voxel as grid_sample's nearbyint
    moving = torch.arange(2 * 9, dtype=torch.float64).view(1, 1, 2, 9)
    for u in (0.5, -0.5, 1.5, -1.5):
        coarse = torch.tensor([0.0, u], dtype=torch.float64).view(1, 2, 1, 1)
        got = reference.warp(moving, coarse, padding_mode=padding_mode, mode="nearest")
        p = reference.pad_position(torch.arange(9, dtype=torch.float64) + u, 9, padding_mode)
        idx = torch.round(p)
        want = torch.where((idx >= 0) & (idx <= 8), moving[0, 0, 0, idx.clamp(0, 8).long()], torch.zeros(()))
        assert torch.equal(got[0, 0, 0], want)
        # dyadic positions convert exactly: grid_sample rounds the same ties the same way
        assert torch.equal(got, _grid_sample(moving, coarse, "nearest", padding_mode))
        assert (idx.remainder(2) == 0).all() or padding_mode != "zeros" or u not in (0.5, -0.5)


def test_reference_nonfinite_nearest():
    # a non-finite displacement: NaN for floating images, 0 (False) for label maps, in every padding
    moving, coarse = _inputs((4, 5, 6), (2, 2, 2), torch.float32)
    coarse = coarse.detach().clone()
    coarse[0, 1, 0, 0, 0] = float("nan")
    coarse[1, 2, 1, 1, 1] = float("inf")
    bad = ~reference.upsample_field(coarse, (4, 5, 6)).isfinite().all(1, keepdim=True)
    for pad in PADS:
        out = reference.warp(moving.detach(), coarse, padding_mode=pad, mode="nearest")
        assert out.isnan().equal(bad.expand_as(out))
        lab = reference.warp(_labels(moving, torch.int16), coarse, padding_mode=pad, mode="nearest")
        assert (lab[bad.expand_as(lab)] == 0).all()


def test_checks_modes_and_dtypes():
    moving, coarse = _inputs((4, 5), (2, 2), torch.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        ck.warp(moving, coarse, mode="bicubic")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        ck.warp(moving, coarse, padding_mode="reflect")
    lab = _labels(moving, torch.uint8)
    with pytest.raises(TypeError, match="mode='nearest'"):
        ck.warp(lab, coarse)
    with pytest.raises(TypeError, match="label map"):
        ck.warp(lab.to(torch.int8), coarse, mode="nearest")
    with pytest.raises(TypeError, match="coarse must have a floating dtype"):
        ck.warp(lab, coarse.to(torch.int32), mode="nearest")


# ----------------------------------------------------------------------------- the kernels vs the reference

KERNEL_CASES = [((5, 6, 7), (2, 1, 3)), ((3, 4, 5), (1, 1, 1)), ((7, 9), (3, 1)), ((6, 5), (4, 7))]


@pytest.mark.parametrize("align_corners,dtype", [(True, torch.float64), (False, torch.float64), (True, torch.float32)])
@pytest.mark.parametrize("padding_mode,mode", [(p, "nearest") for p in PADS] + [("reflection", "bilinear")])
@pytest.mark.parametrize("size,coarse_size", KERNEL_CASES)
def test_kernel_modes_match_reference(backend, size, coarse_size, align_corners, padding_mode, mode, dtype):
    if backend == "triton" and (not align_corners or dtype == torch.float32) and size != KERNEL_CASES[0][0]:
        pytest.skip("interpreted Triton: align_corners=False and fp32 on the first case only (test time)")
    moving, coarse = _inputs(size, coarse_size, dtype)
    grad_out = torch.randn(moving.shape, dtype=dtype)
    kw = dict(align_corners=align_corners, padding_mode=padding_mode, mode=mode)
    got = ck.warp(moving, coarse, backend=backend, **kw)
    want = reference.warp(moving, coarse, **kw)
    assert got.dtype == dtype
    g_got = torch.autograd.grad(got, (moving, coarse), grad_out)
    g_want = torch.autograd.grad(want, (moving, coarse), grad_out)
    if mode == "nearest":
        # the same voxels read: equal values, the same scatter (up to the summation order), zero field gradient
        ties = _near_ties(coarse, size, dtype, align_corners).expand_as(got)
        assert torch.equal(got[~ties], want[~ties])
        if not ties.any():
            assert_matches_reference(g_got[0], g_want[0])
        assert torch.equal(g_got[1], torch.zeros_like(coarse))
    else:
        assert_matches_reference([got, *g_got], [want, *g_want], names=("out", "grad_moving", "grad_coarse"))


@pytest.mark.parametrize("dtype", LABELS)
@pytest.mark.parametrize("padding_mode", PADS)
@pytest.mark.parametrize("size,coarse_size", [KERNEL_CASES[0], KERNEL_CASES[3]])
def test_kernel_labels_bit_exact(backend, size, coarse_size, padding_mode, dtype):
    moving, coarse = _inputs(size, coarse_size, torch.float32)
    lab = _labels(moving, dtype)
    got = ck.warp(lab, coarse.detach(), padding_mode=padding_mode, mode="nearest", backend=backend)
    want = reference.warp(lab, coarse.detach(), padding_mode=padding_mode, mode="nearest")
    assert got.dtype == dtype
    ties = _near_ties(coarse, size, torch.float32).expand_as(got)
    assert torch.equal(got[~ties], want[~ties])


@pytest.mark.parametrize("size,coarse_size", [((3, 4, 5), (2, 1, 3)), ((4, 5), (2, 3))])
def test_gradcheck_reflection(backend, size, coarse_size):
    if backend == "triton" and len(size) == 3:
        pytest.skip("interpreted Triton: the 2-D case only (test time; 3-D is compared with the reference)")
    moving, coarse = _inputs(size, coarse_size, torch.float64, C=2, scale=4.0)
    fn = lambda m, c: ck.warp(m, c, padding_mode="reflection", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (moving, coarse), fast_mode=backend == "triton")


@pytest.mark.parametrize("padding_mode", PADS)
def test_kernel_nonfinite_nearest(backend, padding_mode):
    moving, coarse = _inputs((4, 5, 6), (2, 2, 2), torch.float32)
    coarse = coarse.detach().clone()
    coarse[0, 1, 0, 0, 0] = float("nan")
    coarse[1, 2, 1, 1, 1] = float("inf")
    for m in (moving.detach(), _labels(moving, torch.int32), _labels(moving, torch.bool)):
        got = ck.warp(m, coarse, padding_mode=padding_mode, mode="nearest", backend=backend)
        want = reference.warp(m, coarse, padding_mode=padding_mode, mode="nearest")
        assert torch.equal(got.isnan(), want.isnan()) if m.dtype.is_floating_point else True
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) if m.dtype.is_floating_point else torch.equal(got, want)
    # the image gradient ignores those voxels, the field gets zeros
    m = moving.detach().requires_grad_()
    c = coarse.requires_grad_()
    g = torch.randn(m.shape)
    got = torch.autograd.grad(ck.warp(m, c, padding_mode=padding_mode, mode="nearest", backend=backend), (m, c), g)
    want = torch.autograd.grad(reference.warp(m, c, padding_mode=padding_mode, mode="nearest"), (m, c), g)
    assert_matches_reference(list(got), list(want))


def test_cpp_modes_deterministic(set_threads):
    # the slab-owned scatter of the new modes does not depend on the thread count
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    moving, coarse = _inputs((6, 7, 8), (2, 2, 3), torch.float32)
    g = torch.randn(moving.shape)
    res = []
    for threads in (1, 2, 3):
        set_threads(threads)
        for mode, pad in (("nearest", "zeros"), ("bilinear", "reflection")):
            out = ck.warp(moving, coarse, mode=mode, padding_mode=pad, backend="cpp")
            res.append((threads, mode, torch.autograd.grad(out, (moving, coarse), g)))
    for t, mode, grads in res[2:]:
        ref = res[0 if mode == "nearest" else 1][2]
        assert all(torch.equal(a, b) for a, b in zip(grads, ref)), (t, mode)


@pytest.mark.parametrize("mode,padding_mode", [("nearest", "reflection"), ("bilinear", "reflection")])
def test_opcheck_modes(backend, mode, padding_mode):
    moving, coarse = _inputs((3, 4, 5), (2, 1, 2), torch.float64, B=1, C=2, scale=3.0)
    torch.library.opcheck(torch.ops.coopseg.warp.default, (moving, coarse, True, padding_mode, mode, backend))
    g = torch.randn(moving.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.coopseg.warp_backward.default,
                          (g, moving.detach(), coarse.detach(), True, padding_mode, mode, backend, True, True))
    lab = _labels(moving, torch.uint8)
    torch.library.opcheck(torch.ops.coopseg.warp.default, (lab, coarse.detach().float(), True, padding_mode,
                                                           "nearest", backend))


# ----------------------------------------------------------------------------- CUDA (make gpu-check)


@pytest.mark.cuda
@pytest.mark.parametrize("padding_mode,mode", [(p, "nearest") for p in PADS] + [("reflection", "bilinear")])
@pytest.mark.parametrize("size,coarse_size", [((33, 27, 21), (3, 2, 3)), ((71, 53), (4, 3))])
def test_cuda_modes(size, coarse_size, padding_mode, mode):
    nd = len(size)
    moving = torch.randn(2, 2, *size, device="cuda").requires_grad_()
    coarse = (torch.randn(2, nd, *coarse_size, device="cuda") * max(size)).requires_grad_()
    g = torch.randn(moving.shape, device="cuda")
    kw = dict(padding_mode=padding_mode, mode=mode)
    got = ck.warp(moving, coarse, **kw)
    want = reference.warp(moving, coarse, **kw)
    g_got = torch.autograd.grad(got, (moving, coarse), g)
    g_want = torch.autograd.grad(want, (moving, coarse), g)
    if mode == "nearest":
        ties = _near_ties(coarse.cpu(), size, torch.float32).cuda().expand_as(got)
        assert torch.equal(got[~ties], want[~ties])
        assert torch.equal(g_got[1], torch.zeros_like(coarse))
        if not ties.any():
            assert_matches_reference(g_got[0], g_want[0])
    else:
        assert_matches_reference([got, *g_got], [want, *g_want], scale="max",
                                 names=("out", "grad_moving", "grad_coarse"))
    for dtype in LABELS:  # label maps, in their dtype
        lab = _labels(moving, dtype).cuda()
        got = ck.warp(lab, coarse.detach(), padding_mode=padding_mode, mode="nearest")
        want = reference.warp(lab, coarse.detach(), padding_mode=padding_mode, mode="nearest")
        assert got.dtype == dtype
        ties = _near_ties(coarse.cpu(), size, torch.float32).cuda().expand_as(got)
        assert torch.equal(got[~ties], want[~ties])


@pytest.mark.parametrize("padding_mode,mode", [("reflection", "nearest"), ("reflection", "bilinear")])
def test_modes_int64(backend, monkeypatch, padding_mode, mode):
    # the 64-bit index specialisations (COOPSEG_FORCE_INT64: Triton INT64; C++'s modes path is 64-bit anyway)
    monkeypatch.setenv("COOPSEG_FORCE_INT64", "1")
    test_kernel_modes_match_reference(backend, (3, 4, 5), (2, 1, 3), True, padding_mode, mode, torch.float64)
    test_kernel_labels_bit_exact(backend, (7, 9), (3, 1), padding_mode, torch.int16)
