"""Non-finite inputs follow docs/conventions.md#non-finite-values in both backends,
checked against the reference (F.interpolate + F.grid_sample, which never sees a
non-finite grid). Values must agree where finite, and be non-finite at the same
elements (NaN and inf are not told apart for gradients of non-finite data)."""
import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import reference
from helpers import TOL, assert_matches_reference

INF, NAN = float("inf"), float("nan")


def _run(fn, moving, coarse, grad_out):
    m, c = moving.clone().requires_grad_(), coarse.clone().requires_grad_()
    out = fn(m, c)
    gm, gc = torch.autograd.grad(out, (m, c), grad_out)
    return out.detach(), gm, gc


def _assert_same(got, want, exact_nonfinite=False):
    for name, g, w in zip(("out", "grad_moving", "grad_coarse"), got, want):
        fin = w.isfinite()
        assert torch.equal(g.isfinite(), fin), f"{name}: non-finite at {(g.isfinite() != fin).nonzero()[:5].tolist()}"
        assert_matches_reference(g[fin], w[fin], names=name)
        if exact_nonfinite and name == "out":
            torch.testing.assert_close(g, w, equal_nan=True, **TOL[torch.float64])


def _inputs(seed, nd):
    g = torch.Generator().manual_seed(seed)
    size, cs = ((5, 6, 7), (3, 2, 4)) if nd == 3 else ((6, 7), (3, 4))
    moving = torch.randn(2, 2, *size, generator=g, dtype=torch.float64)
    coarse = torch.randn(2, nd, *cs, generator=g, dtype=torch.float64) * 3
    grad_out = torch.randn(moving.shape, generator=g, dtype=torch.float64)
    return moving, coarse, grad_out


def _both(backend, moving, coarse, grad_out, padding_mode, **kw):
    got = _run(lambda m, c: ck.warp(m, c, padding_mode=padding_mode, backend=backend), moving, coarse, grad_out)
    want = _run(lambda m, c: reference.warp(m, c, padding_mode=padding_mode), moving, coarse, grad_out)
    _assert_same(got, want, **kw)
    return got


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("nd", [2, 3])
def test_nonfinite_image(backend, nd, padding_mode):
    # (a) a NaN/inf in `moving` reaches only the voxels that read it through a tap
    # inside the image (with any weight, 0 included, as grid_sample), never through
    # a tap outside the image (corners of partly outside samples).
    moving, coarse, grad_out = _inputs(1, nd)
    moving.view(-1)[0] = INF  # element 0: what outside taps used to read
    moving.view(-1)[17] = NAN
    moving[1, 1].view(-1)[-1] = -INF
    got = _both(backend, moving, coarse, grad_out, padding_mode, exact_nonfinite=True)
    assert got[0].isfinite().any() and not got[0].isfinite().all()


@pytest.mark.parametrize("nd", [2, 3])
def test_nonfinite_image_border_last_index(backend, nd):
    # (a) with zero displacement in border mode, voxels on the last index have a
    # tap outside the image of weight 0: an inf at element 0 must not reach them
    # (away from element 0 itself: the reference's grid normalisation rounds the
    # positions next to it, giving those a tiny weight on it)
    moving, coarse, grad_out = _inputs(2, nd)
    moving.view(-1)[0] = INF
    away = (slice(None), slice(None)) + (slice(2, None),) * nd
    for fn in (lambda m, c: ck.warp(m, c, padding_mode="border", backend=backend),
               lambda m, c: reference.warp(m, c, padding_mode="border")):
        out, gm, gc = _run(fn, moving, torch.zeros_like(coarse), grad_out)
        assert out[away].isfinite().all() and out.view(-1)[0] == INF
        assert_matches_reference(out[away], moving[away])


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("value", [INF, -INF, NAN])
def test_nonfinite_coarse_node(backend, value, padding_mode):
    # (b) a voxel whose interpolated displacement is NaN or infinite comes out NaN
    # (inf and NaN alike: 0 * inf = NaN spreads over the node's cells), adds
    # nothing to the image gradient and gives NaN to the nodes it interpolates from.
    # In border mode this is also the reference's guard against grid_sample's
    # backward crash on a NaN grid.
    moving, coarse, grad_out = _inputs(3, 3)
    coarse[0, 1, 1, 0, 2] = value
    out, gm, gc = _both(backend, moving, coarse, grad_out, padding_mode, exact_nonfinite=True)
    assert out[0].isnan().any() and not out[1].isnan().any()
    assert not out.isinf().any() and gm.isfinite().all()
    assert gc[0].isnan().any() and gc[1].isfinite().all()


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("nd", [2, 3])
def test_nonfinite_grad_out(backend, nd, padding_mode):
    # (c) a non-finite output gradient at a voxel reaches the image gradient at its
    # taps inside the image and the coarse nodes that interpolate the voxel, except
    # when no corner of its sample is inside the image: then the sample does not
    # depend on the position and the voxel passes 0 (as grid_sample).
    moving, coarse, grad_out = _inputs(4, nd)
    coarse = coarse * 1.5  # some samples fully outside
    flat = grad_out.view(-1)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:12]] = \
        torch.tensor([INF, -INF, NAN, INF, NAN, -INF] * 2, dtype=torch.float64)
    # The rule, as the reference with those voxels' grad_out set to 0 (torch itself
    # is not consistent there: its 2-D CPU grid_sample backward gives 0 * inf = NaN).
    field = reference.upsample_field(coarse, moving.shape[2:])
    inside = torch.ones_like(field[:, :1], dtype=torch.bool)
    for k, n in enumerate(moving.shape[2:]):
        x = torch.arange(n, dtype=field.dtype).view([-1] + [1] * (nd - 1 - k))
        p = x + field[:, k:k + 1]
        inside &= (p >= -1) & (p < n) if padding_mode == "zeros" else torch.ones_like(inside)
    assert (~inside).any() or padding_mode == "border"
    g_rule = grad_out.masked_fill(~inside & ~grad_out.isfinite(), 0.0)
    got = _run(lambda m, c: ck.warp(m, c, padding_mode=padding_mode, backend=backend), moving, coarse, grad_out)
    want = _run(lambda m, c: reference.warp(m, c, padding_mode=padding_mode), moving, coarse, g_rule)
    _assert_same(got, want)
    assert not got[1].isfinite().all() and not got[2].isfinite().all()
