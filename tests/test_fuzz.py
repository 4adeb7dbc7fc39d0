"""Seeded fuzz of every C++ op against the reference at several thread counts.

Random odd shapes, coarse sizes 1..6 (also longer than the image), B 1..3,
C 1..4, both paddings and align_corners, fp32/fp64, displacements up to 1e4.
The short version (threads 1, 3, 6, finite inputs, a few seconds) runs in
`make test`; COOPSEG_FUZZ_LONG=1 (what `make sanitize` sets, under
AddressSanitizer/UBSan) runs many more cases at threads 1, 2, 3, 6, 16 (more
threads than cores finds races too) with NaN/inf in some inputs. Non-finite
cases are compared as in test_nonfinite: equal where finite, non-finite at the
same elements."""
import os

import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import reference
from helpers import assert_matches_reference, magnitude

pytestmark = pytest.mark.skipif(not ck.HAS_CPP, reason="C++ extension not built")

LONG = os.environ.get("COOPSEG_FUZZ_LONG") == "1"
THREADS = (1, 2, 3, 6, 16) if LONG else (1, 3, 6)
CASES = 60 if LONG else 6
# fp32 gradients summed over whole coarse cells, displacements up to 1e4 voxels: the long run
# comes within 1.4x of the shared fp32 bound, so the fuzz allows twenty times it in fp32
FUZZ = 20


def _close(got, want, dtype, what, nonfinite):
    if nonfinite and "out" not in what.split()[-1:] and not what.endswith("upsample") and " blur" not in what:
        # gradients of non-finite data: see below; here only that nothing crashed
        # or tripped the sanitizers, and the shapes
        assert got.shape == want.shape, what
        return
    if nonfinite:
        # Compared where both are finite only. The rules themselves are tested
        # exactly in test_nonfinite, on cases without rounding ties: here a
        # sample (or an interpolation source index) that lands exactly on an
        # index in one implementation and 1e-16 off in the other (the reference
        # normalises its grid; F.interpolate rounds its source index its own
        # way) puts a weight 0 vs 1e-16 on a non-finite neighbour, or the voxel
        # in the next cell, and so changes which elements are non-finite.
        gf, wf = got.isfinite(), want.isfinite()
        fin = gf & wf
        got, want = got[fin], want[fin]
    # scale by the magnitude: fp32 sums of large displacement gradients
    assert_matches_reference(got, want, factor=FUZZ if dtype == torch.float32 else 1.0,
                             scale=max(1.0, magnitude(want)), what=what)


def _spoil(t, gen, count):
    flat = t.view(-1)
    idx = torch.randint(0, flat.numel(), (count,), generator=gen)
    vals = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=t.dtype)
    flat[idx] = vals[torch.randint(0, 3, (count,), generator=gen)]


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    nd = r(2, 3)
    size = [r(2, 9) for _ in range(nd)]
    coarse_size = [r(1, 6) for _ in range(nd)]
    B, C = r(1, 3), r(1, 4)
    dtype = (torch.float32, torch.float64)[r(0, 1)]
    scale = (0.5, 2.0, 6.0, 1e4)[r(0, 3)]
    nonfinite = LONG and r(0, 2) == 0
    return gen, nd, size, coarse_size, B, C, dtype, scale, nonfinite, bool(r(0, 1)), ("zeros", "border")[r(0, 1)]


def _fuzz_one(seed):
    gen, nd, size, coarse_size, B, C, dtype, scale, nonfinite, ac, pad = _case(seed)
    what = f"seed {seed}: {nd}-D {size} coarse {coarse_size} B{B} C{C} {dtype} scale {scale} {pad} ac={ac}"
    moving = torch.randn(B, C, *size, generator=gen, dtype=torch.float64).to(dtype)
    coarse = (torch.randn(B, nd, *coarse_size, generator=gen, dtype=torch.float64) * scale).to(dtype)
    grad_out = torch.randn(B, C, *size, generator=gen, dtype=torch.float64).to(dtype)
    if nonfinite:
        which = int(torch.randint(0, 3, (), generator=gen))
        _spoil((moving, coarse, grad_out)[which], gen, 2)
        if which == 2:  # grad_out: the rule needs the samples with a corner inside
            return _fuzz_warp_finite_grad_rule(moving, coarse, grad_out, ac, pad, dtype, what)
    # warp forward and both gradients
    m, c = moving.clone().requires_grad_(), coarse.clone().requires_grad_()
    out = ck.warp(m, c, align_corners=ac, padding_mode=pad, backend="cpp")
    gm, gc = torch.autograd.grad(out, (m, c), grad_out)
    m2, c2 = moving.clone().requires_grad_(), coarse.clone().requires_grad_()
    out2 = reference.warp(m2, c2, align_corners=ac, padding_mode=pad)
    wm, wc = torch.autograd.grad(out2, (m2, c2), grad_out)
    _close(out, out2, dtype, what + " out", nonfinite)
    _close(gm, wm, dtype, what + " grad_moving", nonfinite)
    if not (nonfinite and scale > 100 and dtype == torch.float32):
        _close(gc, wc, dtype, what + " grad_coarse", nonfinite)
    # only one gradient at a time (the other code paths)
    (gm1,) = torch.autograd.grad(ck.warp(m, coarse, align_corners=ac, padding_mode=pad, backend="cpp"), m, grad_out)
    _close(gm1, wm, dtype, what + " grad_moving alone", nonfinite)
    # upsample_field and its adjoint
    cc = coarse.clone().requires_grad_()
    f = ck.upsample_field(cc, size, align_corners=ac, backend="cpp")
    cr = coarse.clone().requires_grad_()
    fr = reference.upsample_field(cr, size, align_corners=ac)
    _close(f, fr, dtype, what + " upsample", nonfinite)
    gf = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(dtype)
    _close(torch.autograd.grad(f, cc, gf)[0], torch.autograd.grad(fr, cr, gf)[0], dtype, what + " upsample bwd",
           nonfinite)
    # blur and its adjoint
    radius = min(min(size) // 2, 2)
    kernel = [1.0 + float(v) for v in torch.rand(2 * radius + 1, generator=gen)]
    for boundary in ("zeros", "replicate", "reflect"):
        if boundary == "reflect" and min(size) <= len(kernel) // 2:
            continue
        _close(ck.blur(moving, kernel=kernel, boundary=boundary, backend="cpp"),
               reference.blur(moving, kernel=kernel, boundary=boundary), dtype, what + f" blur {boundary}", nonfinite)
        _close(ck.blur_adjoint(moving, kernel=kernel, boundary=boundary, backend="cpp"),
               reference.blur_adjoint(moving, kernel=kernel, boundary=boundary), dtype,
               what + f" blur_adjoint {boundary}", nonfinite)
    # one D_S step (zeros padding)
    s1, s2 = moving.abs(), grad_out.abs()
    loss, grad = ck.similarity_step(s1, s2, coarse, align_corners=ac, backend="cpp")
    wl, wg = reference.similarity_step(s1, s2, coarse, align_corners=ac)
    _close(loss, wl, dtype, what + " D_S loss", nonfinite)
    if not nonfinite:  # a non-finite loss makes the whole item's gradient ill-defined
        _close(grad, wg, dtype, what + " D_S grad", nonfinite)


def _fuzz_warp_finite_grad_rule(moving, coarse, grad_out, ac, pad, dtype, what):
    # docs/conventions.md#non-finite-values rule (c): as the reference with grad_out set to 0 at non-finite
    # entries whose sample has no corner inside the image
    nd = moving.dim() - 2
    field = reference.upsample_field(coarse.double(), moving.shape[2:], align_corners=ac)
    inside = torch.ones_like(field[:, :1], dtype=torch.bool)
    if pad == "zeros":
        for k, n in enumerate(moving.shape[2:]):
            x = torch.arange(n, dtype=field.dtype).view([-1] + [1] * (nd - 1 - k))
            p = x + field[:, k:k + 1]
            inside &= (p >= -1) & (p < n)
    g_rule = grad_out.masked_fill(~inside & ~grad_out.isfinite(), 0.0)
    m, c = moving.clone().requires_grad_(), coarse.clone().requires_grad_()
    gm, gc = torch.autograd.grad(ck.warp(m, c, align_corners=ac, padding_mode=pad, backend="cpp"), (m, c), grad_out)
    m2, c2 = moving.clone().requires_grad_(), coarse.clone().requires_grad_()
    wm, wc = torch.autograd.grad(reference.warp(m2, c2, align_corners=ac, padding_mode=pad), (m2, c2), g_rule)
    _close(gm, wm, dtype, what + " grad_moving (non-finite grad_out)", True)
    if nd == 3:  # torch's 2-D grid_sample backward turns 0 * inf into NaN at outside corners
        _close(gc, wc, dtype, what + " grad_coarse (non-finite grad_out)", True)


@pytest.mark.parametrize("threads", THREADS)
def test_fuzz_cpp_against_reference(threads, set_threads):
    set_threads(threads)
    for case in range(CASES):
        _fuzz_one(1000 * threads + case)
