"""CUDA-only checks of the compiled Triton kernels against the reference (make
gpu-check), beyond the ones next to each op's CPU tests: upsample_field, the D_S
step, the blur in 2-D and with wider kernels, and bitwise determinism of the
coarse gradient when a coarse cell spans several programs (T > 1 tiles).

Random odd shapes; the reference runs in fp32 (fp64 for gradcheck) on the same
rounded inputs. Skipped without a CUDA device (tests/conftest.py).
"""
import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import reference

pytestmark = pytest.mark.cuda

HALF_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close_scaled(got, want, tol):
    """Compare relative to the largest magnitude (sums of many terms in half inputs)."""
    scale = want.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,coarse_size", [((35, 29, 31), (4, 3, 5)), ((67, 45), (5, 1)), ((13, 17, 19), (1, 2, 1))])
def test_cuda_upsample_field(size, coarse_size, dtype):
    nd = len(size)
    c = (torch.randn(2, nd, *coarse_size, device="cuda") * 3).to(dtype).requires_grad_()
    got = ck.upsample_field(c, size)
    c32 = c.detach().float().requires_grad_()
    want = reference.upsample_field(c32, size)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **HALF_TOL[dtype])
    g = torch.randn(want.shape, device="cuda")
    _close_scaled(torch.autograd.grad(got, c, g.to(dtype))[0], torch.autograd.grad(want, c32, g.to(dtype).float())[0],
                  HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,coarse_size", [((33, 27, 21), (3, 2, 3)), ((71, 53), (4, 3))])
def test_cuda_similarity_step(size, coarse_size, dtype):
    nd = len(size)
    s1 = ck.blur(torch.rand(2, 1, *size, device="cuda").round()).to(dtype)
    s2 = ck.blur(torch.rand(2, 1, *size, device="cuda").round()).to(dtype)
    c = torch.randn(2, nd, *coarse_size, device="cuda") * 2
    loss, grad = ck.similarity_step(s1, s2, c)
    want_loss, want_grad = reference.similarity_step(s1.float(), s2.float(), c)
    torch.testing.assert_close(loss.float(), want_loss.float(), rtol=1e-4, atol=1e-6)
    _close_scaled(grad, want_grad, HALF_TOL[torch.float32])
    again = ck.similarity_step(s1, s2, c)
    assert torch.equal(loss, again[0]) and torch.equal(grad, again[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,coarse_size", [((41, 37, 35), (2, 3, 2)), ((257, 129), (3, 2))])
def test_cuda_coarse_gradient_deterministic_with_multi_tile_cells(size, coarse_size, dtype):
    # cells of ~4000 voxels: each is reduced by many programs whose partials the host folds
    nd = len(size)
    moving = torch.randn(1, 2, *size, device="cuda").to(dtype).requires_grad_()
    coarse = (torch.randn(1, nd, *coarse_size, device="cuda") * 4).requires_grad_()
    g = torch.randn(moving.shape, device="cuda").to(dtype)
    runs = [torch.autograd.grad(ck.warp(moving, coarse), (moving, coarse), g) for _ in range(3)]
    for gm, gc in runs[1:]:
        assert torch.equal(gc, runs[0][1])  # bitwise: fixed-order partial sums, no atomics
    m32 = moving.detach().float().requires_grad_()
    c32 = coarse.detach().clone().requires_grad_()
    want = torch.autograd.grad(reference.warp(m32, c32), (m32, c32), g.float())
    _close_scaled(runs[0][0], want[0], HALF_TOL[dtype])
    _close_scaled(runs[0][1], want[1], HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [(1.0, 2.0, 1.0), (1.0, 4.0, 6.0, 4.0, 1.0)], ids=["k3", "k5"])
@pytest.mark.parametrize("boundary", ["zeros", "replicate", "reflect"])
@pytest.mark.parametrize("size", [(37, 29, 23), (61, 43)], ids=["3d", "2d"])
def test_cuda_blur_kernels_and_2d(size, boundary, kernel, dtype):
    x = torch.randn(2, 3, *size, device="cuda").to(dtype).requires_grad_()
    got = ck.blur(x, kernel=kernel, boundary=boundary)
    want = reference.blur(x.detach().float(), kernel=kernel, boundary=boundary)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **HALF_TOL[dtype])
    g = torch.randn(want.shape, device="cuda").to(dtype)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0].float(),
                               reference.blur_adjoint(g.float(), kernel=kernel, boundary=boundary), **HALF_TOL[dtype])


def test_cuda_fp64_gradcheck_blur_upsample():
    x = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ck.blur(t, kernel=(1.0, 3.0, 0.5), boundary="reflect"), (x,))
    c = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ck.upsample_field(t, (5, 7, 4)), (c,))
