"""blur / blur_adjoint: fused C++ and (interpreted) Triton kernels against the
reference and scipy.ndimage, gradients, the adjoint identity and input errors."""
import numpy as np
import pytest
import torch
from scipy import ndimage

import coopseg_kernels as ck
from coopseg_kernels import reference
from helpers import assert_matches_reference

BOUNDARIES = ["zeros", "replicate", "reflect"]
KERNELS = [(1.0,), (1.0, 2.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0), (-1.0, 2.0, 3.0, 5.0, 3.0, 0.5, 1.0)]
# A blur rounds only its output (a correlation of a few taps, summed in fp32 / fp64): its own
# results are held five times tighter than the shared bound (the warp's).
ROUNDING_ONLY = 0.2
SCIPY_MODE = {"zeros": "constant", "replicate": "nearest", "reflect": "mirror"}


def _shape(nd, kernel, backend):
    return (2, 3, 9, 8) if nd == 2 else (2, 3, 9, 8, 11)


def _scipy_blur(x: torch.Tensor, kernel, boundary) -> torch.Tensor:
    """Independent oracle: scipy.ndimage.correlate1d along every spatial axis."""
    k = np.asarray(kernel, dtype=np.float64)
    k = k / k.sum()
    out = x.detach().double().numpy()
    for axis in range(2, x.dim()):
        out = ndimage.correlate1d(out, k, axis=axis, mode=SCIPY_MODE[boundary], cval=0.0)
    return torch.from_numpy(out)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"k{len(k)}")
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("nd", [2, 3])
def test_blur_matches_reference_and_scipy(backend, nd, boundary, kernel):
    x = torch.randn(*_shape(nd, kernel, backend), dtype=torch.float64, requires_grad=True)
    got = ck.blur(x, kernel=kernel, boundary=boundary, backend=backend)
    want = reference.blur(x, kernel=kernel, boundary=boundary)
    assert_matches_reference(got, want, wrt=(x, x), grad_out=torch.randn_like(got))
    assert_matches_reference(got.detach(), _scipy_blur(x, kernel, boundary), names="scipy")


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_blur_float32(backend, boundary):
    x = torch.randn(1, 2, 7, 6, 9)
    assert_matches_reference(ck.blur(x, boundary=boundary, backend=backend), reference.blur(x, boundary=boundary),
                             factor=ROUNDING_ONLY)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nd", [2, 3])
def test_triton_blur_half(nd, dtype):
    # half inputs keep their per-axis intermediates in fp32 (two temporaries in 3-D)
    pytest.importorskip("triton")
    x = torch.randn((2, 3, 9, 8, 11)[: nd + 2]).to(dtype)
    for boundary, kernel in [("reflect", (1.0, 2.0, 1.0)), ("replicate", (1.0, 4.0, 6.0, 4.0, 1.0))]:
        got = ck.blur(x, kernel=kernel, boundary=boundary, backend="triton")
        assert got.dtype == dtype
        want = reference.blur(x.float(), kernel=kernel, boundary=boundary)
        assert_matches_reference(got, want, factor=ROUNDING_ONLY, upcast=True)
        y = torch.randn_like(x)
        assert_matches_reference(ck.blur_adjoint(y, kernel=kernel, boundary=boundary, backend="triton"),
                                 reference.blur_adjoint(y.float(), kernel=kernel, boundary=boundary),
                                 factor=ROUNDING_ONLY, upcast=True, names="adjoint")


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("nd", [2, 3])
def test_adjoint_dot_product(backend, nd, boundary):
    # <A x, y> = <x, A^T y>, and for replicate / reflect A^T is not A
    kernel = (1.0, 3.0, 2.0)
    shape = (2, 2, 6, 7, 5)[: nd + 2]
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(shape, dtype=torch.float64)
    ax = ck.blur(x, kernel=kernel, boundary=boundary, backend=backend)
    aty = ck.blur_adjoint(y, kernel=kernel, boundary=boundary, backend=backend)
    torch.testing.assert_close((ax * y).sum(), (x * aty).sum(), rtol=1e-12, atol=1e-12)
    assert_matches_reference(aty, reference.blur_adjoint(y, kernel=kernel, boundary=boundary))
    if boundary != "zeros":
        flipped = ck.blur(y, kernel=kernel[::-1], boundary=boundary, backend=backend)
        assert not torch.allclose(aty, flipped), "the adjoint should differ from the flipped blur at the boundary"


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gradcheck(backend, boundary):
    x = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda t: ck.blur(t, kernel=(1.0, 2.0, 0.5), boundary=boundary, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=backend == "triton")
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=backend == "triton")


def test_non_contiguous_and_size_one_axes(backend):
    x = torch.randn(2, 3, 12, 5, 7, dtype=torch.float64)[:, :, ::2].transpose(3, 4)
    assert_matches_reference(ck.blur(x, backend=backend), reference.blur(x))
    flat = torch.randn(1, 1, 1, 6, 5, dtype=torch.float64)
    assert_matches_reference(ck.blur(flat, boundary="replicate", backend=backend),
                             reference.blur(flat, boundary="replicate"))


def test_opcheck(backend):
    x = torch.randn(1, 2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    for op in (torch.ops.coopseg.blur.default, torch.ops.coopseg.blur_adjoint.default):
        torch.library.opcheck(op, (x, [0.25, 0.5, 0.25], "reflect", backend))


@pytest.mark.parametrize("kernel,error,match", [
    ((), ValueError, "odd length"),
    ((1.0, 1.0), ValueError, "odd length"),
    ((1.0, -2.0, 1.0), ValueError, "must not sum to 0"),
    ((1.0, float("nan"), 1.0), ValueError, "finite"),
    ("abc", TypeError, "sequence of numbers"),
])
def test_kernel_errors(kernel, error, match):
    with pytest.raises(error, match=match):
        ck.blur(torch.rand(1, 1, 4, 4), kernel=kernel)


def test_input_errors():
    x = torch.rand(1, 1, 4, 5, 6)
    with pytest.raises(ValueError, match="boundary must be one of"):
        ck.blur(x, boundary="circular")
    with pytest.raises(ValueError, match="needs every spatial size > kernel radius 2"):
        ck.blur(torch.rand(1, 1, 2, 5, 6), kernel=(1, 1, 1, 1, 1), boundary="reflect")
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\) or \(B, C, D, H, W\)"):
        ck.blur(torch.rand(4, 5, 6))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ck.blur(torch.ones(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.blur(x, backend="fast")


# ----------------------------------------------------------------------------- GPU (make gpu-check)
# The compiled Triton kernels on a CUDA device (skipped without one, tests/conftest.py): fp32 /
# fp16 / bf16 inputs against the reference run in fp32 (fp64 for gradcheck) on the same rounded
# inputs; also in 2-D and with wider kernels.

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_cuda_blur(dtype, boundary):
    x = torch.randn(2, 3, 33, 40, 37, device="cuda").to(dtype).requires_grad_()
    got = ck.blur(x, boundary=boundary)
    want = reference.blur(x.detach().float(), boundary=boundary)
    assert got.dtype == dtype
    assert_matches_reference(got, want, factor=ROUNDING_ONLY, upcast=True)
    g = torch.randn_like(want)
    assert_matches_reference(torch.autograd.grad(got, x, g.to(dtype))[0],
                             reference.blur_adjoint(g.to(dtype).float(), boundary=boundary),
                             factor=ROUNDING_ONLY, upcast=True, names="grad")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("kernel", [(1.0, 2.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0)], ids=["k3", "k5"])
@pytest.mark.parametrize("boundary", ["zeros", "replicate", "reflect"])
@pytest.mark.parametrize("size", [(37, 29, 23), (61, 43)], ids=["3d", "2d"])
def test_cuda_blur_kernels_and_2d(size, boundary, kernel, dtype):
    x = torch.randn(2, 3, *size, device="cuda").to(dtype).requires_grad_()
    got = ck.blur(x, kernel=kernel, boundary=boundary)
    want = reference.blur(x.detach().float(), kernel=kernel, boundary=boundary)
    assert got.dtype == dtype
    assert_matches_reference(got, want, upcast=True)
    g = torch.randn(want.shape, device="cuda").to(dtype)
    assert_matches_reference(torch.autograd.grad(got, x, g)[0],
                             reference.blur_adjoint(g.float(), kernel=kernel, boundary=boundary),
                             upcast=True, names="grad")


@pytest.mark.cuda
def test_cuda_fp64_gradcheck_blur_upsample():
    x = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ck.blur(t, kernel=(1.0, 3.0, 0.5), boundary="reflect"), (x,))
    c = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ck.upsample_field(t, (5, 7, 4)), (c,))
