"""blur / blur_adjoint: fused C++ and (interpreted) Triton kernels against the
reference and scipy.ndimage, gradients, the adjoint identity and input errors."""
import numpy as np
import pytest
import torch
from scipy import ndimage

import coopseg_kernels as ck
from coopseg_kernels import reference

BOUNDARIES = ["zeros", "replicate", "reflect"]
KERNELS = [(1.0,), (1.0, 2.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0), (-1.0, 2.0, 3.0, 5.0, 3.0, 0.5, 1.0)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
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
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    torch.testing.assert_close(got.detach(), _scipy_blur(x, kernel, boundary), **TOL[torch.float64])
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               **TOL[torch.float64])


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_blur_float32(backend, boundary):
    x = torch.randn(1, 2, 7, 6, 9)
    torch.testing.assert_close(ck.blur(x, boundary=boundary, backend=backend),
                               reference.blur(x, boundary=boundary), **TOL[torch.float32])


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
        tol = 1e-2 if dtype == torch.float16 else 3e-2  # rounding of the output only
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        y = torch.randn_like(x)
        torch.testing.assert_close(ck.blur_adjoint(y, kernel=kernel, boundary=boundary, backend="triton").float(),
                                   reference.blur_adjoint(y.float(), kernel=kernel, boundary=boundary),
                                   rtol=tol, atol=tol)


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
    torch.testing.assert_close(aty, reference.blur_adjoint(y, kernel=kernel, boundary=boundary), **TOL[torch.float64])
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
    torch.testing.assert_close(ck.blur(x, backend=backend), reference.blur(x), **TOL[torch.float64])
    flat = torch.randn(1, 1, 1, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(ck.blur(flat, boundary="replicate", backend=backend),
                               reference.blur(flat, boundary="replicate"), **TOL[torch.float64])


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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_cuda_blur(dtype, boundary):
    x = torch.randn(2, 3, 33, 40, 37, device="cuda").to(dtype).requires_grad_()
    got = ck.blur(x, boundary=boundary)
    want = reference.blur(x.detach().float(), boundary=boundary)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g.to(dtype))[0].float(),
                               reference.blur_adjoint(g.to(dtype).float(), boundary=boundary), rtol=tol, atol=tol)
