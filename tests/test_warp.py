"""warp / upsample_field: fused C++ and (interpreted) Triton kernels against the
reference, gradients, determinism, layout, NaN semantics and input errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import coopseg_kernels as ck
from coopseg_kernels import _backend, reference
from helpers import assert_matches_reference

# (full-resolution size, coarse size): odd sizes, coarse axes of 1, a coarse axis
# longer than the fine one, and a pure translation.
CASES_3D = [((5, 6, 7), (2, 1, 3)), ((4, 7, 5), (3, 4, 6)), ((3, 5, 4), (1, 1, 1))]
CASES_2D = [((7, 9), (3, 1)), ((6, 5), (4, 7)), ((5, 8), (1, 1))]


def _inputs(size, coarse_size, dtype, B=2, C=3, scale=None):
    """Random image and a coarse field large enough that samples leave the volume."""
    nd = len(size)
    scale = max(size) / 2 if scale is None else scale
    moving = torch.randn(B, C, *size, dtype=dtype).requires_grad_()
    coarse = (torch.randn(B, nd, *coarse_size, dtype=dtype) * scale).requires_grad_()
    return moving, coarse


def _warp_and_grads(fn, moving, coarse, grad_out):
    out = fn(moving, coarse)
    gm, gc = torch.autograd.grad(out, (moving, coarse), grad_out)
    return out, gm, gc


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,coarse_size", CASES_3D + CASES_2D)
def test_warp_matches_reference(backend, size, coarse_size, align_corners, padding_mode, dtype):
    moving, coarse = _inputs(size, coarse_size, dtype)
    grad_out = torch.randn(moving.shape, dtype=dtype)
    kw = dict(align_corners=align_corners, padding_mode=padding_mode)
    got = _warp_and_grads(lambda m, c: ck.warp(m, c, backend=backend, **kw), moving, coarse, grad_out)
    want = _warp_and_grads(lambda m, c: reference.warp(m, c, **kw), moving, coarse, grad_out)
    for name, g in zip(("out", "grad_moving", "grad_coarse"), got):
        assert g.dtype == dtype, name
    assert_matches_reference(got, want, names=("out", "grad_moving", "grad_coarse"))
    # some samples really are outside the volume
    assert (got[0] == 0).any() or padding_mode == "border"


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,coarse_size", CASES_3D + CASES_2D)
def test_upsample_field_matches_reference(backend, size, coarse_size, align_corners):
    coarse = torch.randn(2, len(size), *coarse_size, dtype=torch.float64, requires_grad=True)
    got = ck.upsample_field(coarse, size, align_corners=align_corners, backend=backend)
    want = reference.upsample_field(coarse, size, align_corners=align_corners)
    assert_matches_reference(got, want, wrt=(coarse, coarse), grad_out=torch.randn_like(want))


def test_warp_equals_grid_sample_of_upsampled_field(backend):
    # The fused op is the composition of the two documented steps.
    moving, coarse = _inputs((5, 6, 7), (3, 2, 2), torch.float64)
    field = ck.upsample_field(coarse, moving.shape[2:], backend=backend)
    from coopseg_kernels.convert import field_to_grid

    want = F.grid_sample(moving, field_to_grid(field), align_corners=True)
    assert_matches_reference(ck.warp(moving, coarse, backend=backend), want)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,coarse_size", [((3, 4, 5), (2, 1, 3)), ((4, 5), (2, 3))])
def test_gradcheck(backend, size, coarse_size, align_corners, padding_mode):
    moving, coarse = _inputs(size, coarse_size, torch.float64, B=2, C=2, scale=1.5)
    fn = lambda m, c: ck.warp(m, c, align_corners=align_corners, padding_mode=padding_mode, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (moving, coarse), fast_mode=backend == "triton")
    up = lambda c: ck.upsample_field(c, size, align_corners=align_corners, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(up, (coarse,), fast_mode=backend == "triton")


def test_only_needed_gradients(backend):
    moving, coarse = _inputs((4, 5, 6), (2, 2, 2), torch.float64)
    out = ck.warp(moving.detach(), coarse, backend=backend)
    (gc,) = torch.autograd.grad(out.sum(), coarse)
    out_ref = reference.warp(moving.detach(), coarse)
    torch.testing.assert_close(gc, torch.autograd.grad(out_ref.sum(), coarse)[0])
    out = ck.warp(moving, coarse.detach(), backend=backend)
    (gm,) = torch.autograd.grad(out.sum(), moving)
    torch.testing.assert_close(gm, torch.autograd.grad(reference.warp(moving, coarse.detach()).sum(), moving)[0])


def test_coarse_gradient_is_bitwise_deterministic(backend):
    moving, coarse = _inputs((9, 10, 11), (3, 3, 3), torch.float32, B=2, C=2)
    grad_out = torch.randn(moving.shape)
    first = _warp_and_grads(lambda m, c: ck.warp(m, c, backend=backend), moving, coarse, grad_out)[2]
    second = _warp_and_grads(lambda m, c: ck.warp(m, c, backend=backend), moving, coarse, grad_out)[2]
    assert torch.equal(first, second)


def test_cpp_gradients_do_not_depend_on_thread_count(set_threads):
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    moving, coarse = _inputs((16, 9, 10), (3, 2, 2), torch.float32, B=1, C=2)
    grad_out = torch.randn(moving.shape)
    results = []
    for n in (1, 2, 3):
        set_threads(n)
        results.append(_warp_and_grads(lambda m, c: ck.warp(m, c, backend="cpp"), moving, coarse, grad_out))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("need", ["both", "moving"])
@pytest.mark.parametrize("size,coarse_size,align_corners", [
    ((2, 64, 64), (6, 2, 2), True),   # the issue-7 repro: 6 cells along d over 2 planes
    ((3, 9, 8), (5, 2, 3), False),
    ((3, 17), (7, 2), True),          # 2-D: the slab axis is h
])
def test_cpp_empty_slabs_at_many_thread_counts(size, coarse_size, align_corners, need, set_threads):
    # A coarse grid longer than the image along the slab axis makes slabs (of
    # cells, or of planes when there are more tasks than planes) that own no
    # plane. Such a slab must not scatter: it used to write into another task's
    # slab or past the buffer (lost updates from 3 threads on).
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    for n in (1, 2, 3, 4, 6, 16):
        set_threads(n)
        for trial in range(4):
            moving, coarse = _inputs(size, coarse_size, torch.float64, B=1 + trial % 2, C=2, scale=2.0)
            grad_out = torch.randn(moving.shape, dtype=torch.float64)
            inputs = (moving, coarse) if need == "both" else (moving,)
            out = ck.warp(moving, coarse if need == "both" else coarse.detach(), align_corners=align_corners,
                          backend="cpp")
            got = torch.autograd.grad(out, inputs, grad_out)
            ref = reference.warp(moving, coarse if need == "both" else coarse.detach(),
                                 align_corners=align_corners)
            want = torch.autograd.grad(ref, inputs, grad_out)
            assert_matches_reference(got, want, what=f"{n} threads")


def test_non_contiguous_inputs(backend):
    moving = torch.randn(2, 3, 12, 5, 7, dtype=torch.float64)[:, :, ::2].requires_grad_()
    coarse = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64).transpose(2, 4).mul(3).requires_grad_()
    grad_out = torch.randn(2, 3, 7, 5, 6, dtype=torch.float64).transpose(2, 4)
    assert not (moving.is_contiguous() or coarse.is_contiguous() or grad_out.is_contiguous())
    got = _warp_and_grads(lambda m, c: ck.warp(m, c, backend=backend), moving, coarse, grad_out)
    want = _warp_and_grads(lambda m, c: reference.warp(m, c), moving, coarse, grad_out)
    assert_matches_reference(got, want)


def test_nan_displacement(backend):
    # Documented outcome: voxels whose displacement is NaN come out NaN, the image
    # gradient gets nothing from them, and the coarse nodes they touch get NaN.
    moving, coarse = _inputs((6, 7, 8), (3, 3, 3), torch.float64, scale=1.0)
    c = coarse.detach().clone()
    c[0, 1, 0, 0, 0] = float("nan")
    c.requires_grad_()
    out = ck.warp(moving, c, backend=backend)
    field = reference.upsample_field(c.detach(), moving.shape[2:])
    bad = field.isnan().any(1, keepdim=True).expand_as(out)
    assert bad[0].any() and not bad[1].any()
    assert out[bad].isnan().all() and not out[~bad].isnan().any()
    gm, gc = torch.autograd.grad(out, (moving, c), torch.ones_like(out))
    assert not gm.isnan().any()
    assert gc[0, :, 0, 0, 0].isnan().all() and not gc[1].isnan().any()
    # the image gradient equals the reference with the NaN voxels' gradient removed
    ref_gm = torch.autograd.grad(reference.warp(moving, torch.nan_to_num(c.detach(), nan=0.0)), moving,
                                 (~bad).to(out.dtype))[0]
    assert_matches_reference(gm, ref_gm)


def test_huge_displacements(backend):
    moving, coarse = _inputs((4, 5, 6), (2, 2, 2), torch.float32)
    c = torch.full_like(coarse.detach(), 1e30)
    zeros = ck.warp(moving, c, backend=backend)
    assert torch.equal(zeros, torch.zeros_like(zeros))
    border = ck.warp(moving, c, padding_mode="border", backend=backend)
    # everything clamps to the far corner
    torch.testing.assert_close(border, moving[:, :, -1:, -1:, -1:].expand_as(border).detach())


def test_opcheck(backend):
    moving, coarse = _inputs((3, 4, 5), (2, 1, 2), torch.float64, B=1, C=2, scale=1.5)
    for ac in (True, False):
        torch.library.opcheck(torch.ops.coopseg.warp.default, (moving, coarse, ac, "zeros", "bilinear", backend))
        torch.library.opcheck(torch.ops.coopseg.upsample_field.default, (coarse, [3, 4, 5], ac, backend))
    g = torch.randn(moving.shape, dtype=torch.float64)
    torch.library.opcheck(torch.ops.coopseg.warp_backward.default,
                          (g, moving.detach(), coarse.detach(), True, "border", "bilinear", backend, True, False))


def test_torch_compile_fullgraph():
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    moving, coarse = _inputs((4, 5, 6), (2, 2, 2), torch.float32, B=1, C=1)

    def loss_fn(m, c):
        return (ck.warp(m, c, padding_mode="border") - m).square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    got = compiled(moving, coarse)
    torch.testing.assert_close(got, loss_fn(moving, coarse))
    gm, gc = torch.autograd.grad(got, (moving, coarse))
    wm, wc = torch.autograd.grad(loss_fn(moving, coarse), (moving, coarse))
    torch.testing.assert_close(gm, wm)
    torch.testing.assert_close(gc, wc)


# ----------------------------------------------------------------------------- errors


def _ok():
    return torch.rand(2, 1, 5, 6, 7), torch.rand(2, 3, 2, 2, 2)


@pytest.mark.parametrize("make,error,match", [
    (lambda m, c: (m[0, 0], c), ValueError, r"moving must be \(B, C, H, W\) or \(B, C, D, H, W\)"),
    (lambda m, c: (m, c[:, :2]), ValueError, "coarse must have 3 channels"),
    (lambda m, c: (m, c[0]), ValueError, r"coarse must be \(B, 3, d, h, w\)"),
    (lambda m, c: (m, c[:1]), ValueError, "batch size 1 does not match the image batch size 2"),
    (lambda m, c: (m.to(torch.int32), c), TypeError, "moving of dtype torch.int32 \\(a label map\\) can only be warped "
     "with mode='nearest'"),
    (lambda m, c: (m, c.to(torch.int64)), TypeError, "coarse must have a floating dtype"),
    (lambda m, c: (m, torch.rand(2, 3, 2, 2, 2, device="meta")), ValueError, "one device"),
    (lambda m, c: (m[:, :, :1], c), ValueError, "spatial sizes must be >= 2"),
    (lambda m, c: (m, c[:, :, :0]), ValueError, "coarse sizes >= 1"),
    (lambda m, c: ([1.0], c), TypeError, "moving must be a torch.Tensor"),
])
def test_warp_input_errors(make, error, match):
    moving, coarse = make(*_ok())
    with pytest.raises(error, match=match):
        ck.warp(moving, coarse)


def test_option_errors():
    moving, coarse = _ok()
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        ck.warp(moving, coarse, padding_mode="reflect")
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.warp(moving, coarse, backend="cuda")
    with pytest.raises(ValueError, match="size must be 3 ints"):
        ck.upsample_field(coarse, (5, 6))
    with pytest.raises(ValueError, match="size must be 3 ints, each >= 2"):
        ck.upsample_field(coarse, (5, 6, 1))


def test_env_backend(monkeypatch):
    moving, coarse = _ok()
    monkeypatch.setenv("COOPSEG_BACKEND", "reference")
    torch.testing.assert_close(ck.warp(moving, coarse), reference.warp(moving, coarse))
    monkeypatch.setenv("COOPSEG_BACKEND", "fast")
    with pytest.raises(ValueError, match="COOPSEG_BACKEND must be one of"):
        ck.warp(moving, coarse)


def test_cpp_rejects_half_on_cpu():
    if not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    moving, coarse = _ok()
    with pytest.raises(TypeError, match="float16 is not supported by backend 'cpp'"):
        ck.warp(moving.half(), coarse, backend="cpp")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    moving, coarse = _ok()
    monkeypatch.setattr(_backend, "_triton_interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ck.warp(moving, coarse, backend="triton")


def test_fallback_without_extension_warns_once(monkeypatch):
    moving, coarse = _ok()
    monkeypatch.setattr(_backend, "HAS_CPP", False)
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension is not built"):
        out = ck.warp(moving, coarse)
    torch.testing.assert_close(out, reference.warp(moving, coarse))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.warp(moving, coarse)
    with pytest.raises(RuntimeError, match="needs the C\\+\\+ extension"):
        ck.warp(moving, coarse, backend="cpp")


# ----------------------------------------------------------------------------- GPU (make gpu-check)
# The compiled Triton kernels on a CUDA device (skipped without one, tests/conftest.py): random
# odd shapes, fp32 / fp16 / bf16 inputs against the reference run in fp32 (fp64 for gradcheck)
# on the same rounded inputs; upsample_field, the D_S step and bitwise determinism of the
# coarse gradient when a coarse cell spans several programs (T > 1 tiles).

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("size,coarse_size", [((33, 40, 37), (3, 3, 3)), ((65, 47), (5, 1)), ((17, 19, 23), (1, 1, 1))])
def test_cuda_warp_matches_reference(size, coarse_size, padding_mode, dtype):
    moving, coarse = _inputs(size, coarse_size, torch.float32, scale=4.0)
    moving, coarse = moving.detach().cuda(), coarse.detach().cuda()
    m = moving.to(dtype).requires_grad_()
    c = coarse.clone().requires_grad_()
    grad_out = torch.randn(moving.shape, device="cuda").to(dtype)
    got = _warp_and_grads(lambda a, b: ck.warp(a, b, padding_mode=padding_mode), m, c, grad_out)
    # reference in fp32 on the same (rounded) inputs
    m32 = m.detach().float().requires_grad_()
    c32 = c.detach().clone().requires_grad_()
    want = _warp_and_grads(lambda a, b: reference.warp(a, b, padding_mode=padding_mode), m32, c32, grad_out.float())
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    assert_matches_reference(got[:2], want[:2], dtype=dtype, upcast=True, names=("out", "grad_moving"))
    assert_matches_reference(got[2], want[2], dtype=dtype, scale="max", names="grad_coarse")


@pytest.mark.cuda
def test_cuda_coarse_gradient_deterministic_and_gradcheck():
    moving, coarse = _inputs((9, 10, 11), (3, 3, 3), torch.float32)
    moving, coarse = moving.detach().cuda().requires_grad_(), coarse.detach().cuda().requires_grad_()
    g = torch.randn(moving.shape, device="cuda")
    a = _warp_and_grads(ck.warp, moving, coarse, g)[2]
    b = _warp_and_grads(ck.warp, moving, coarse, g)[2]
    assert torch.equal(a, b)
    m64, c64 = _inputs((3, 4, 5), (2, 1, 3), torch.float64, B=1, C=2, scale=1.5)
    assert torch.autograd.gradcheck(lambda x, y: ck.warp(x, y), (m64.detach().cuda().requires_grad_(),
                                                                c64.detach().cuda().requires_grad_()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("size,coarse_size", [((35, 29, 31), (4, 3, 5)), ((67, 45), (5, 1)), ((13, 17, 19), (1, 2, 1))])
def test_cuda_upsample_field(size, coarse_size, dtype):
    nd = len(size)
    c = (torch.randn(2, nd, *coarse_size, device="cuda") * 3).to(dtype).requires_grad_()
    got = ck.upsample_field(c, size)
    c32 = c.detach().float().requires_grad_()
    want = reference.upsample_field(c32, size)
    assert got.dtype == dtype and got.shape == want.shape
    assert_matches_reference(got, want, upcast=True)
    g = torch.randn(want.shape, device="cuda")
    assert_matches_reference(torch.autograd.grad(got, c, g.to(dtype))[0],
                             torch.autograd.grad(want, c32, g.to(dtype).float())[0],
                             dtype=dtype, scale="max", upcast=True, names="grad_coarse")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("size,coarse_size", [((33, 27, 21), (3, 2, 3)), ((71, 53), (4, 3))])
def test_cuda_similarity_step(size, coarse_size, dtype):
    nd = len(size)
    s1 = ck.blur(torch.rand(2, 1, *size, device="cuda").round()).to(dtype)
    s2 = ck.blur(torch.rand(2, 1, *size, device="cuda").round()).to(dtype)
    c = torch.randn(2, nd, *coarse_size, device="cuda") * 2
    loss, grad = ck.similarity_step(s1, s2, c)
    want_loss, want_grad = reference.similarity_step(s1.float(), s2.float(), c)
    torch.testing.assert_close(loss.float(), want_loss.float(), rtol=1e-4, atol=1e-6)
    assert_matches_reference(grad, want_grad, dtype=torch.float32, scale="max", upcast=True, names="grad")
    again = ck.similarity_step(s1, s2, c)
    assert torch.equal(loss, again[0]) and torch.equal(grad, again[1])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
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
    assert_matches_reference(runs[0][0], want[0], dtype=dtype, scale="max", upcast=True, names="grad_moving")
    assert_matches_reference(runs[0][1], want[1], dtype=dtype, scale="max", upcast=True, names="grad_coarse")
