"""warp / upsample_field with upsample="bspline" (cubic B-spline FFD): the spec in the reference
(partition of unity, linear precision, the weights against a per-voxel formula, the geometry),
the input checks, and the fused kernels against the reference."""
import math

import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import reference
from helpers import assert_matches_reference


def _beta3(x: float) -> float:
    """The centred cubic B-spline (the oracle's own formula, not the kernels' piecewise weights)."""
    a = abs(x)
    if a < 1:
        return 2.0 / 3.0 - a * a + a ** 3 / 2.0
    if a < 2:
        return (2.0 - a) ** 3 / 6.0
    return 0.0


def _brute_force_field(coarse, size, origin, spacing):
    """u(x) = sum over every control point j in the array of prod_k beta3(u_k - j_k) coarse[j], per voxel."""
    B, nd = coarse.shape[:2]
    out = torch.zeros(B, nd, *size, dtype=torch.float64)
    for x in torch.cartesian_prod(*[torch.arange(n) for n in size]).view(-1, nd).tolist():
        u = [(xk - o) / h for xk, o, h in zip(x, origin, spacing)]
        for j in torch.cartesian_prod(*[torch.arange(n) for n in coarse.shape[2:]]).view(-1, nd).tolist():
            w = math.prod(_beta3(uk - jk) for uk, jk in zip(u, j))
            if w:
                out[(slice(None), slice(None), *x)] += w * coarse[(slice(None), slice(None), *j)].double()
    return out


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,coarse_size", [((5, 7, 6), (4, 5, 6)), ((9, 8), (6, 4))])
def test_reference_reproduces_constant_and_linear_fields(size, coarse_size, align_corners):
    nd = len(size)
    const = torch.randn(2, nd, *[1] * nd, dtype=torch.float64).expand(2, nd, *coarse_size)
    field = reference.upsample_field(const, size, upsample="bspline", align_corners=align_corners)
    torch.testing.assert_close(field, const[(...,) + (slice(0, 1),) * nd].expand_as(field), rtol=1e-12, atol=1e-12)
    # linear precision: control point j displaced by A p_j + b gives the displacement A x + b at voxel x
    origin, spacing = reference.bspline_geometry(size, coarse_size, align_corners=align_corners)
    A, b = torch.randn(nd, nd, dtype=torch.float64), torch.randn(nd, dtype=torch.float64)
    p = torch.stack(torch.meshgrid(*[o + h * torch.arange(n, dtype=torch.float64)
                                     for o, h, n in zip(origin, spacing, coarse_size)], indexing="ij"))
    coarse = (torch.einsum("ij,j...->i...", A, p) + b.view(nd, *[1] * nd)).unsqueeze(0)
    x = ck.convert.identity_positions(size, torch.float64)
    want = (torch.einsum("ij,j...->i...", A, x) + b.view(nd, *[1] * nd)).unsqueeze(0)
    got = reference.upsample_field(coarse, size, upsample="bspline", align_corners=align_corners)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size,coarse_size,geometry", [
    ((5, 4, 6), (4, 5, 4), {}),
    ((7, 5), (5, 4), {"align_corners": False}),
    # an explicit grid that does not cover the image: points beyond the array contribute 0
    ((6, 7), (4, 5), {"control_origin": (1.25, -2.0), "control_spacing": (1.5, 0.75)}),
])
def test_reference_weights_equal_the_per_voxel_formula(size, coarse_size, geometry):
    coarse = torch.randn(2, len(size), *coarse_size, dtype=torch.float64)
    got = reference.upsample_field(coarse, size, upsample="bspline", **geometry)
    origin, spacing = reference.bspline_geometry(size, coarse_size, **geometry)
    torch.testing.assert_close(got, _brute_force_field(coarse, size, origin, spacing), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align_corners", [True, False])
def test_four_points_span_the_domain_with_one_point_margin(align_corners):
    S = 9
    origin, spacing = reference.bspline_geometry((S, S), (4, 7), align_corners=align_corners)
    start, end = (0.0, S - 1.0) if align_corners else (-0.5, S - 0.5)
    assert spacing == (end - start, (end - start) / 4)
    assert origin == (start - spacing[0], start - spacing[1])
    # s = 4: the first and last domain ends sit on control points 1 and 2 (t = 0)
    c = torch.randn(1, 1, 4, dtype=torch.float64).expand(1, 2, 4).reshape(1, 2, 4, 1).expand(1, 2, 4, 4).clone()
    field = reference.upsample_field(c, (S, S), upsample="bspline", align_corners=align_corners)
    col = c[0, 0, :, 0]
    if align_corners:
        torch.testing.assert_close(field[0, 0, 0, 0], (col[0] + 4 * col[1] + col[2]) / 6)
        torch.testing.assert_close(field[0, 0, -1, 0], (col[1] + 4 * col[2] + col[3]) / 6)
    # explicit values override the defaults; a spacing alone keeps the one-point margin
    assert reference.bspline_geometry((S, S), (4, 4), control_spacing=2.0) == ((-2.0, -2.0), (2.0, 2.0))
    assert reference.bspline_geometry((S, S), (4, 4), control_origin=(1, 2), control_spacing=(3, 4)) == \
        ((1.0, 2.0), (3.0, 4.0))


def test_public_op_takes_the_geometry_and_skips_the_dense_path():
    moving = torch.randn(1, 2, 6, 5, 7, dtype=torch.float64)
    coarse = torch.randn(1, 3, 6, 5, 7, dtype=torch.float64)  # the image's size: still a B-spline grid
    kw = dict(upsample="bspline", control_origin=(-1.0, -0.5, -2.0), control_spacing=[1.0, 1.5, 2.0])
    assert_matches_reference(ck.warp(moving, coarse, **kw), reference.warp(moving, coarse, **kw))
    assert_matches_reference(ck.upsample_field(coarse, (6, 5, 7), **kw),
                             reference.upsample_field(coarse, (6, 5, 7), **kw))
    assert not torch.allclose(ck.warp(moving, coarse, upsample="bspline"), ck.warp(moving, coarse))


BAD = [
    (dict(upsample="cubic"), ValueError, "upsample must be one of"),
    (dict(upsample="bspline", coarse_size=(4, 3)), ValueError, ">= 4 control points"),
    (dict(control_origin=0.0), ValueError, "only used with upsample='bspline'"),
    (dict(upsample="bspline", control_origin=float("nan")), ValueError, "control_origin must be a finite"),
    (dict(upsample="bspline", control_origin=(1.0, 2.0, 3.0)), ValueError, "control_origin must be"),
    (dict(upsample="bspline", control_origin="0"), TypeError, "control_origin must be"),
    (dict(upsample="bspline", control_origin=True), TypeError, "control_origin must be"),
    (dict(upsample="bspline", control_spacing=(1.0, 0.0)), ValueError, "control_spacing must be a finite number > 0"),
    (dict(upsample="bspline", control_spacing=-1), ValueError, "control_spacing must be"),
    (dict(upsample="bspline", control_spacing=[1.0, float("inf")]), ValueError, "control_spacing must be"),
    (dict(upsample="bspline", control_spacing=torch.ones(2, 2)), TypeError, "control_spacing must be"),
]


@pytest.mark.parametrize("kw,exc,match", BAD)
def test_bad_bspline_arguments(kw, exc, match):
    kw = dict(kw)
    coarse = torch.zeros(1, 2, *kw.pop("coarse_size", (4, 5)))
    with pytest.raises(exc, match=match):
        ck.warp(torch.zeros(1, 1, 6, 7), coarse, **kw)
    with pytest.raises(exc, match=match):
        ck.upsample_field(coarse, (6, 7), **kw)


def _support_mask(size, coarse_size, origin, spacing, node):
    """(S) bool: voxels whose 4^nd support {floor(u_k) - 1, ..., floor(u_k) + 2} holds the point `node`."""
    masks = []
    for S, o, h, j in zip(size, origin, spacing, node):
        i = torch.floor((torch.arange(S, dtype=torch.float64) - o) / h)
        masks.append((i - 1 <= j) & (j <= i + 2))
    out = masks[0]
    for m in masks[1:]:
        out = out.unsqueeze(-1) & m
    return out


def test_reference_nonfinite_point_spreads_over_its_support():
    size, coarse_size, node = (9, 7, 8), (5, 4, 6), (1, 2, 4)
    moving = torch.randn(1, 2, *size, dtype=torch.float64, requires_grad=True)
    coarse = torch.randn(1, 3, *coarse_size, dtype=torch.float64)
    coarse[(0, 1, *node)] = float("nan")
    coarse.requires_grad_()
    out = reference.warp(moving, coarse, upsample="bspline", padding_mode="border")
    origin, spacing = reference.bspline_geometry(size, coarse_size)
    bad = _support_mask(size, coarse_size, origin, spacing, node)
    assert 0 < bad.sum() < bad.numel()
    assert torch.equal(out[0, 0].isnan(), bad) and torch.equal(out[0, 1].isnan(), bad)
    gm, gc = torch.autograd.grad(out, (moving, coarse), torch.ones_like(out))
    assert gm.isfinite().all()  # the NaN voxels add nothing to the image gradient
    assert gc[(0, slice(None), *node)].isnan().all()
    labels = (moving.detach() > 0).to(torch.uint8)
    lab = reference.warp(labels, coarse.detach(), upsample="bspline", mode="nearest")
    assert lab.dtype == torch.uint8 and (lab[0, 0][bad] == 0).all()
    want = reference.warp(labels.double(), coarse.detach(), upsample="bspline", mode="nearest")
    assert torch.equal(lab[0][:, ~bad], want[0][:, ~bad].to(torch.uint8))


# ----------------------------------------------------------------------------- the fused kernels

# (image size, control grid, geometry): 3-D and 2-D, odd sizes, both align_corners defaults, and an
# explicit grid that leaves part of the image without control points (taps beyond the array read 0)
KCASES = [
    ((5, 6, 7), (4, 5, 4), {}),
    ((7, 9), (5, 4), {"align_corners": False}),
    ((6, 7), (4, 5), {"control_origin": (1.25, -2.0), "control_spacing": (1.5, 0.75)}),
]
# The interpreter runs the Triton kernels' 4^nd taps per voxel through numpy, slowly: Triton gets the
# 2-D problems and, in 3-D, these (padding_mode, mode) pairs only.
TRITON_3D = (("zeros", "bilinear"), ("reflection", "nearest"))


def _slow_for_triton(backend, size, padding_mode="zeros", mode="bilinear"):
    if backend == "triton" and len(size) == 3 and (padding_mode, mode) not in TRITON_3D:
        pytest.skip("interpreted Triton: 3-D runs only " + str(TRITON_3D))


def _kinputs(size, coarse_size, dtype, B=2, C=2, scale=None):
    nd = len(size)
    scale = max(size) / 3 if scale is None else scale
    moving = torch.randn(B, C, *size, dtype=dtype).requires_grad_()
    coarse = (torch.randn(B, nd, *coarse_size, dtype=dtype) * scale).requires_grad_()
    return moving, coarse


def _out_and_grads(fn, moving, coarse, grad_out):
    out = fn(moving, coarse)
    return (out, *torch.autograd.grad(out, (moving, coarse), grad_out))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("size,coarse_size,geometry", KCASES)
def test_kernels_match_reference(backend, size, coarse_size, geometry, padding_mode, mode):
    _slow_for_triton(backend, size, padding_mode, mode)
    if backend == "triton" and len(size) == 3:
        size, coarse_size = (4, 5, 3), (4, 4, 5)  # fewer knot cells: fewer interpreted programs
    moving, coarse = _kinputs(size, coarse_size, torch.float64, B=1 if backend == "triton" else 2)
    grad_out = torch.randn(moving.shape, dtype=torch.float64)
    kw = dict(padding_mode=padding_mode, mode=mode, upsample="bspline", **geometry)
    got = _out_and_grads(lambda m, c: ck.warp(m, c, backend=backend, **kw), moving, coarse, grad_out)
    want = _out_and_grads(lambda m, c: reference.warp(m, c, **kw), moving, coarse, grad_out)
    assert_matches_reference(got, want, names=("out", "grad_moving", "grad_coarse"))
    assert "warp_bspline" in got[0].grad_fn.name()


@pytest.mark.parametrize("size,coarse_size,geometry", KCASES[:2])
def test_kernels_match_reference_fp32(backend, size, coarse_size, geometry):
    _slow_for_triton(backend, size, mode="3-D fp32")
    moving, coarse = _kinputs(size, coarse_size, torch.float32)
    grad_out = torch.randn(moving.shape)
    for padding_mode in ("zeros", "reflection"):
        kw = dict(padding_mode=padding_mode, upsample="bspline", **geometry)
        got = _out_and_grads(lambda m, c: ck.warp(m, c, backend=backend, **kw), moving, coarse, grad_out)
        want = _out_and_grads(lambda m, c: reference.warp(m, c, **kw), moving, coarse, grad_out)
        # the control-point gradient sums over every voxel of a support: relative to its largest element
        assert_matches_reference(got[:2], want[:2], names=("out", "grad_moving"), what=padding_mode)
        assert_matches_reference(got[2], want[2], scale="max", what=f"{padding_mode}: grad_coarse")


@pytest.mark.parametrize("size,coarse_size,geometry", KCASES)
def test_upsample_kernels_match_reference(backend, size, coarse_size, geometry):
    if backend == "triton" and len(size) == 3:
        size, coarse_size = (4, 5, 3), (4, 4, 5)  # fewer knot cells: fewer interpreted programs
    coarse = torch.randn(2, len(size), *coarse_size, dtype=torch.float64, requires_grad=True)
    got = ck.upsample_field(coarse, size, upsample="bspline", backend=backend, **geometry)
    want = reference.upsample_field(coarse, size, upsample="bspline", **geometry)
    assert_matches_reference(got, want, wrt=(coarse, coarse), grad_out=torch.randn_like(want))


@pytest.mark.parametrize("size,coarse_size", [((3, 4, 5), (4, 4, 5)), ((5, 4), (4, 6))])
def test_gradcheck(backend, size, coarse_size):
    _slow_for_triton(backend, size, mode="3-D gradcheck")
    moving, coarse = _kinputs(size, coarse_size, torch.float64, B=1, C=1, scale=1.0)
    fast = backend == "triton"
    for padding_mode in ("zeros",) if len(size) == 3 else ("reflection",) if fast else ("border", "reflection"):
        fn = lambda m, c: ck.warp(m, c, padding_mode=padding_mode, upsample="bspline", backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (moving, coarse), fast_mode=fast)
    if not fast:  # the interpreted Triton upsample is checked against the reference's gradient above
        up = lambda c: ck.upsample_field(c, size, upsample="bspline", backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(up, (coarse,))


def test_opcheck(backend):
    size = (4, 5) if backend == "triton" else (3, 4, 5)
    moving, coarse = _kinputs(size, (4, 5, 4)[:len(size)], torch.float64, B=1)
    geometry = ([-1.5, -1.0, -2.0][:len(size)], [1.5, 1.0, 2.0][:len(size)])
    torch.library.opcheck(torch.ops.coopseg.upsample_bspline.default, (coarse, list(size), *geometry, backend),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    if backend == "triton":  # the registrations are the same for both backends: the slow interpreter runs one op
        torch.library.opcheck(torch.ops.coopseg.warp_bspline.default,
                              (moving, coarse, *geometry, "reflection", "bilinear", backend),
                              test_utils=("test_schema", "test_faketensor"))
        return
    for mode in ("bilinear", "nearest"):
        torch.library.opcheck(torch.ops.coopseg.warp_bspline.default,
                              (moving, coarse, *geometry, "reflection", mode, backend))
    g = torch.randn(moving.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.coopseg.warp_bspline_backward.default,
                          (g, moving.detach(), coarse.detach(), *geometry, "border", "bilinear", backend, True, True))
    labels = (moving.detach() > 0).to(torch.uint8)
    torch.library.opcheck(torch.ops.coopseg.warp_bspline.default,
                          (labels, coarse.detach().float(), *geometry, "zeros", "nearest", backend))


def test_control_point_gradient_is_deterministic(backend, set_threads):
    size, coarse_size = ((9, 8), (5, 4)) if backend == "triton" else ((9, 8, 7), (5, 4, 6))
    moving, coarse = _kinputs(size, coarse_size, torch.float32, B=1)
    grad_out = torch.randn(moving.shape)
    fn = lambda m, c: ck.warp(m, c, upsample="bspline", backend=backend)  # noqa: E731
    first = _out_and_grads(fn, moving, coarse, grad_out)
    again = _out_and_grads(fn, moving, coarse, grad_out)
    assert torch.equal(first[2], again[2]) and torch.equal(first[0], again[0])
    if backend == "cpp":  # C++: bitwise the same for any thread count, the image gradient too
        set_threads(1)
        one = _out_and_grads(fn, moving, coarse, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(first, one))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the Triton interpreter's numpy, on NaN
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("size,coarse_size,nan_at,inf_at", [
    ((7, 6, 5), (5, 4, 4), (2, 1, 2, 3), (0, 3, 0, 0)),
    ((9, 7), (5, 6), (1, 1, 4), (0, 3, 0)),
])
def test_kernels_nonfinite_control_point(backend, size, coarse_size, nan_at, inf_at, padding_mode):
    _slow_for_triton(backend, size, padding_mode, "non-finite 3-D")
    moving, coarse = _kinputs(size, coarse_size, torch.float64, B=1)
    with torch.no_grad():
        coarse[(0, *nan_at)] = float("nan")
        coarse[(0, *inf_at)] = float("inf")
    grad_out = torch.randn(moving.shape, dtype=torch.float64)
    kw = dict(padding_mode=padding_mode, upsample="bspline")
    got = _out_and_grads(lambda m, c: ck.warp(m, c, backend=backend, **kw), moving, coarse, grad_out)
    want = _out_and_grads(lambda m, c: reference.warp(m, c, **kw), moving, coarse, grad_out)
    assert got[0].isnan().any() and not got[0].isnan().all()
    for name, g, w in zip(("out", "grad_moving", "grad_coarse"), got, want):
        assert torch.equal(g.isnan(), w.isnan()), name
        assert_matches_reference(g.nan_to_num(), w.nan_to_num(), what=name)
    assert got[1].isfinite().all()
    # label maps: 0 at those voxels, the rest as the floating image
    labels = (moving.detach() > 0).to(torch.uint8)
    lab = ck.warp(labels, coarse.detach(), mode="nearest", backend=backend, **kw)
    assert torch.equal(lab, reference.warp(labels, coarse.detach(), mode="nearest", **kw))


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_fp32_rows_with_nonfinite_control_points(backend, padding_mode):
    """float 3-D zeros/border rows take the C++ AVX-512 rows when finite; rows with a NaN take the exact path."""
    _slow_for_triton(backend, (1, 1, 1), padding_mode, "fp32 3-D")
    moving, coarse = _kinputs((6, 5, 33), (4, 5, 6), torch.float32, B=1)
    with torch.no_grad():
        coarse[0, 1, 2, 1, 3] = float("nan")
    kw = dict(padding_mode=padding_mode, upsample="bspline")
    got = ck.warp(moving.detach(), coarse.detach(), backend=backend, **kw)
    want = reference.warp(moving.detach(), coarse.detach(), **kw)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any() and not got.isnan().all()
    assert_matches_reference(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.bool])
def test_label_maps_with_nearest(backend, dtype):
    size, coarse_size = ((6, 7), (4, 5)) if backend == "triton" else ((5, 7, 6), (4, 4, 5))
    moving, coarse = _kinputs(size, coarse_size, torch.float32, B=2, C=1)
    labels = (moving.detach() * 3).round().clamp(0, 5).to(dtype)
    for padding_mode in ("zeros", "reflection"):
        kw = dict(mode="nearest", padding_mode=padding_mode, upsample="bspline")
        got = ck.warp(labels, coarse.detach(), backend=backend, **kw)
        assert got.dtype == dtype
        assert torch.equal(got, reference.warp(labels, coarse.detach(), **kw))


def test_raw_op_errors():
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    m, c = torch.zeros(1, 1, 6, 7), torch.zeros(1, 2, 4, 5)
    op = torch.ops.coopseg.warp_bspline_fwd
    with pytest.raises(RuntimeError, match="coarse sizes must be >= 4"):
        op(m, torch.zeros(1, 2, 3, 5), [0.0, 0.0], [1.0, 1.0], "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="spacing entries must be finite and > 0"):
        op(m, c, [0.0, 0.0], [1.0, 0.0], "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="origin must have 2 entries"):
        op(m, c, [0.0], [1.0, 1.0], "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="padding_mode"):
        op(m, c, [0.0, 0.0], [1.0, 1.0], "wrap", "bilinear")
    with pytest.raises(RuntimeError, match="moving must be float32 or float64 \\(label maps need mode='nearest'\\)"):
        op(m.to(torch.uint8), c, [0.0, 0.0], [1.0, 1.0], "zeros", "bilinear")
    with pytest.raises(RuntimeError, match="warp_bspline_bwd: grad_out must have the shape of moving"):
        torch.ops.coopseg.warp_bspline_bwd(m[..., :3], m, c, [0.0, 0.0], [1.0, 1.0], "zeros", "bilinear", True, True)
    with pytest.raises(RuntimeError, match="upsample_bspline_fwd: coarse sizes must be >= 4"):
        torch.ops.coopseg.upsample_bspline_fwd(torch.zeros(1, 2, 4, 2), [6, 7], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="upsample_bspline_bwd: coarse_size entries must be >= 4"):
        torch.ops.coopseg.upsample_bspline_bwd(torch.zeros(1, 2, 6, 7), [4, 3], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(RuntimeError, match="origin entries must be finite"):
        torch.ops.coopseg.upsample_bspline_fwd(c, [6, 7], [float("nan"), 0.0], [1.0, 1.0])


def test_deterministic_image_gradient_is_refused_on_triton():
    """The B-spline Triton backward scatters the image gradient atomically: deterministic=True (or
    PyTorch's switch) with a moving image that needs a gradient is refused, not silently atomic."""
    pytest.importorskip("triton")
    moving, coarse = _kinputs((9, 8), (5, 4), torch.float32, B=1)
    with pytest.raises(ValueError, match="deterministic=True .* upsample='bspline'"):
        ck.warp(moving, coarse, upsample="bspline", backend="triton", deterministic=True)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ValueError, match="upsample='bspline' on the Triton backend"):
            ck.warp(moving, coarse, upsample="bspline", backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    # without an image gradient (augmentation) and on CPU (always deterministic) it runs
    out = ck.warp(moving.detach(), coarse, upsample="bspline", backend="triton", deterministic=True)
    ref = ck.warp(moving.detach(), coarse, upsample="bspline", backend="cpp", deterministic=True)
    torch.testing.assert_close(out, ref)
