"""The raw C++ ops torch.ops.coopseg.{warp_fwd, warp_bwd, upsample_field_fwd,
upsample_field_bwd, blur_apply, similarity_step_fwd} are public schemas: called
directly with bad arguments they raise a RuntimeError naming the op and the
argument, and never read or write out of bounds (make sanitize runs this file
under AddressSanitizer)."""
import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels.ops.blur import axis_tables

pytestmark = pytest.mark.skipif(not ck.HAS_CPP, reason="C++ extension not built")

ops = torch.ops.coopseg
F64 = torch.float64


def _img(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


def _warp_args():
    return dict(moving=_img(2, 3, 5, 6, 7), coarse=_img(2, 3, 2, 2, 2))


# (name, callable taking valid args -> call with one bad argument, op, argument named in the error)
WARP_BAD = [
    ("moving width 1", lambda a: (_img(2, 3, 5, 6, 1), a["coarse"]), "moving"),
    ("moving height 1", lambda a: (_img(2, 3, 5, 1, 7), a["coarse"]), "moving"),
    ("moving 3-D", lambda a: (_img(3, 5, 6), a["coarse"]), "moving"),
    ("moving 6-D", lambda a: (_img(1, 1, 2, 2, 2, 2), a["coarse"]), "moving"),
    ("moving empty batch", lambda a: (_img(0, 3, 5, 6, 7), _img(0, 3, 2, 2, 2)), "moving"),
    ("moving no channels", lambda a: (_img(2, 0, 5, 6, 7), a["coarse"]), "moving"),
    ("moving int", lambda a: (a["moving"].to(torch.int32), a["coarse"]), "moving"),
    ("moving half", lambda a: (a["moving"].half(), a["coarse"].half()), "moving"),
    ("coarse dtype", lambda a: (a["moving"], a["coarse"].float()), "coarse"),
    ("coarse channels", lambda a: (a["moving"], a["coarse"][:, :2]), "coarse"),
    ("coarse batch", lambda a: (a["moving"], a["coarse"][:1]), "coarse"),
    ("coarse rank", lambda a: (a["moving"], a["coarse"][:, :, 0]), "coarse"),
    ("coarse empty axis", lambda a: (a["moving"], a["coarse"][:, :, :0]), "coarse"),
]


@pytest.mark.parametrize("make,arg", [pytest.param(m, n, id=i) for i, m, n in WARP_BAD])
def test_warp_fwd_bad_args(make, arg):
    moving, coarse = make(_warp_args())
    with pytest.raises(RuntimeError, match=rf"coopseg\.warp_fwd: {arg}\b"):
        ops.warp_fwd(moving, coarse, True, "zeros", "bilinear")


@pytest.mark.parametrize("make,arg", [pytest.param(m, n, id=i) for i, m, n in WARP_BAD])
def test_warp_bwd_bad_args(make, arg):
    moving, coarse = make(_warp_args())
    grad_out = torch.randn(moving.shape, dtype=F64) if moving.dtype.is_floating_point and not moving.is_meta \
        else torch.randn(2, 3, 5, 6, 7, dtype=F64)
    with pytest.raises(RuntimeError, match=rf"coopseg\.warp_bwd: {arg}\b"):
        ops.warp_bwd(grad_out.to(moving.dtype) if moving.dtype.is_floating_point and not moving.is_meta
                     else grad_out, moving, coarse, True, "border", "bilinear", True, True)


def test_warp_bwd_width_one_2d():
    # used to read before the buffer (pair base W - 2 = -1)
    moving, coarse = _img(1, 1, 4, 1), _img(1, 2, 2, 1)
    with pytest.raises(RuntimeError, match=r"coopseg\.warp_bwd: moving spatial sizes must be >= 2"):
        ops.warp_bwd(torch.randn_like(moving), moving, coarse, True, "zeros", "bilinear", True, True)


@pytest.mark.parametrize("grad_out,match", [
    (_img(2, 3, 5, 6, 6), "grad_out must have the shape of moving"),
    (_img(2, 3, 5, 6, 7, dtype=torch.float32), "grad_out must have the dtype of moving"),
    (_img(2, 3, 5, 6, 7).to(torch.int64), "grad_out must be float32 or float64"),
])
def test_warp_bwd_bad_grad_out(grad_out, match):
    a = _warp_args()
    with pytest.raises(RuntimeError, match=rf"coopseg\.warp_bwd: {match}"):
        ops.warp_bwd(grad_out, a["moving"], a["coarse"], True, "zeros", "bilinear", True, False)


def test_warp_bad_padding_mode_and_mode():
    a = _warp_args()
    with pytest.raises(RuntimeError, match="padding_mode must be 'zeros', 'border' or 'reflection'"):
        ops.warp_fwd(a["moving"], a["coarse"], True, "reflect", "bilinear")
    with pytest.raises(RuntimeError, match="mode must be 'bilinear' or 'nearest'"):
        ops.warp_bwd(a["moving"], a["moving"], a["coarse"], True, "zeros", "bicubic", True, True)
    # label maps: nearest only, forward only, with a float32 coarse grid
    lab = a["moving"].to(torch.int16)
    with pytest.raises(RuntimeError, match=r"coopseg\.warp_fwd: moving of dtype Short \(a label map\) needs mode="):
        ops.warp_fwd(lab, a["coarse"].float(), True, "zeros", "bilinear")
    with pytest.raises(RuntimeError, match=r"coopseg\.warp_fwd: coarse must have the dtype of moving"):
        ops.warp_fwd(lab, a["coarse"], True, "zeros", "nearest")
    assert ops.warp_fwd(lab, a["coarse"].float(), True, "zeros", "nearest").dtype == torch.int16
    with pytest.raises(RuntimeError, match=r"coopseg\.warp_bwd: moving must be float32 or float64"):
        ops.warp_bwd(a["moving"], lab, a["coarse"], True, "zeros", "nearest", True, True)


@pytest.mark.parametrize("coarse,size,match", [
    (_img(2, 3, 2, 2, 2), [4, 5], "size must have 3 entries"),
    (_img(2, 3, 2, 2, 2), [4, 0, 5], "size entries must be >= 1"),
    (_img(2, 2, 2, 2, 2), [4, 5, 6], "coarse must have 3 channels"),
    (_img(2, 3, 2, 0, 2), [4, 5, 6], "coarse spatial sizes must be >= 1"),
    (_img(0, 2, 2, 2), [4, 5], "coarse needs B >= 1"),
    (_img(2, 3, 2, 2, 2).to(torch.int32), [4, 5, 6], "coarse must be float32 or float64"),
    (_img(3, 2, 2), [4, 5], r"coarse must be \(B, C, H, W\)"),
])
def test_upsample_field_fwd_bad_args(coarse, size, match):
    with pytest.raises(RuntimeError, match=rf"coopseg\.upsample_field_fwd: {match}"):
        ops.upsample_field_fwd(coarse, size, True)


@pytest.mark.parametrize("grad,size,match", [
    (_img(2, 3, 4, 5, 6), [2, 2], "coarse_size must have 3 entries"),
    (_img(2, 3, 4, 5, 6), [2, 0, 2], "coarse_size entries must be >= 1"),
    (_img(2, 2, 4, 5, 6), [2, 2, 2], "grad_field must have 3 channels"),
    (_img(2, 3, 4, 0, 6), [2, 2, 2], "grad_field spatial sizes must be >= 1"),
    (_img(0, 3, 4, 5, 6), [2, 2, 2], "grad_field needs B >= 1"),
    (_img(2, 3, 4, 5, 6).half(), [2, 2, 2], "grad_field must be float32 or float64"),
])
def test_upsample_field_bwd_bad_args(grad, size, match):
    with pytest.raises(RuntimeError, match=rf"coopseg\.upsample_field_bwd: {match}"):
        ops.upsample_field_bwd(grad, size, False)


def _tables(x):
    return axis_tables(x.shape[2:], (1.0, 2.0, 1.0), "zeros", False, x.dtype, x.device)


def _blur_bad():
    x = _img(2, 3, 4, 5, 6)
    idx, wt = _tables(x)
    bad_idx = [t.clone() for t in idx]
    bad_idx[1][0, 0] = 5  # out of range for an axis of 5
    return [
        ("x empty channel", _img(2, 0, 4, 5, 6), idx, wt, "x needs B >= 1 and C >= 1"),
        ("x empty axis", _img(2, 3, 0, 5, 6), idx, wt, "x spatial sizes must be >= 1"),
        ("x int", x.to(torch.int32), idx, wt, "x must be float32 or float64"),
        ("x rank", x[0, 0], idx, wt, r"x must be \(B, C, H, W\)"),
        ("table count", x, idx[:2], wt[:2], "idx and wt must hold one table per spatial axis"),
        ("idx dtype", x, [idx[0].long()] + idx[1:], wt, r"idx\[0\] must be"),
        ("idx length", x, [idx[1], idx[1], idx[2]], [wt[1], wt[1], wt[2]], r"idx\[0\] must be"),
        ("idx M=0", x, [t[:, :0] for t in idx], [t[:, :0] for t in wt], r"idx\[0\] must be \(n, M\) with M >= 1"),
        ("idx 1-D", x, [idx[0][:, 0]] + idx[1:], wt, r"idx\[0\] must be \(n, M\)"),
        ("idx non-contiguous", x, [idx[0], idx[1], idx[2].t().contiguous().t()], wt, r"idx\[2\] must be"),
        ("idx range", x, bad_idx, wt, r"idx\[1\] entries must be -1"),
        ("wt dtype", x, idx, [wt[0].float()] + wt[1:], r"wt\[0\] must be"),
        ("wt shape", x, idx, [wt[0], wt[1][:, :2], wt[2]], r"wt\[1\] must be"),
    ]


@pytest.mark.parametrize("case", _blur_bad(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_blur_apply_bad_args(case):
    _, x, idx, wt, match = case
    with pytest.raises(RuntimeError, match=rf"coopseg\.blur_apply: {match}"):
        ops.blur_apply(x, idx, wt)


@pytest.mark.parametrize("make,match", [
    (lambda s1, s2, c: (s1[:, :, :, :1], s2[:, :, :, :1], c), "s1_blurred spatial sizes must be >= 2"),
    (lambda s1, s2, c: (s1, s2[:, :, :3], c), "s2_blurred must have the shape of s1_blurred"),
    (lambda s1, s2, c: (s1, s2.float(), c), "s2_blurred must have the dtype of s1_blurred"),
    (lambda s1, s2, c: (s1, s2, c.float()), "coarse must have the dtype of s1_blurred"),
    (lambda s1, s2, c: (s1, s2, c[:, :2]), r"coarse must be \(B, 3, \*s\)"),
    (lambda s1, s2, c: (s1, s2, c[:, :, :0]), "coarse sizes must be >= 1"),
    (lambda s1, s2, c: (s1.to(torch.int32), s2, c), "s1_blurred must be float32 or float64"),
])
def test_similarity_step_fwd_bad_args(make, match):
    s1, s2, c = make(_img(2, 1, 4, 5, 6), _img(2, 1, 4, 5, 6), _img(2, 3, 2, 2, 2))
    with pytest.raises(RuntimeError, match=rf"coopseg\.similarity_step_fwd: {match}"):
        ops.similarity_step_fwd(s1, s2, c, True)


def test_raw_ops_accept_non_contiguous_inputs():
    # contiguity is not required: the ops copy. Same result as contiguous inputs.
    moving = _img(2, 3, 10, 6, 7)[:, :, ::2]
    coarse = _img(2, 3, 2, 3, 2).transpose(2, 4)
    want = ops.warp_fwd(moving.contiguous(), coarse.contiguous(), True, "zeros", "bilinear")
    torch.testing.assert_close(ops.warp_fwd(moving, coarse, True, "zeros", "bilinear"), want)
