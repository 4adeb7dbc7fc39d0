"""The C++ warp's AVX-512 rows (csrc/cpu/warp_avx512.h: float32, 32-bit
offsets, 3-D) against the reference. They work on 16 voxels at a time, so these
cases have rows that are not a multiple of 16 long, rows of 2 and 3 voxels, more
than 16 coarse nodes along w (the nodes are then gathered, not permuted), rows
partly outside the image, one and several channels (one channel folds the
output gradient into the scatter weights), both paddings and align_corners,
both gradients or one, several thread counts, and non-finite data (the rows
fall back to the generic exact path). On a build without AVX-512 they test the
generic path on the same cases."""
import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import reference
from helpers import assert_matches_reference

pytestmark = pytest.mark.skipif(not ck.HAS_CPP, reason="C++ extension not built")

INF, NAN = float("inf"), float("nan")

# (full-resolution size, coarse size)
CASES = [
    ((3, 4, 37), (2, 2, 3)),    # 37 = 2 * 16 + 5: a partial last block
    ((2, 5, 2), (2, 3, 2)),     # W = 2: one pair per row
    ((4, 3, 3), (2, 2, 2)),     # W = 3
    ((3, 3, 50), (2, 2, 20)),   # 20 coarse nodes along w: gathered
    ((2, 3, 16), (1, 2, 1)),    # one full block, a translation along w
]


def _inputs(seed, size, coarse_size, C, B=2, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 if scale is None else scale  # voxels: samples near the faces leave the image
    moving = torch.randn(B, C, *size, generator=g)
    coarse = torch.randn(B, 3, *coarse_size, generator=g) * scale
    grad_out = torch.randn(B, C, *size, generator=g)
    return moving, coarse, grad_out


def _run(fn, moving, coarse, grad_out, need=("moving", "coarse")):
    m = moving.clone().requires_grad_("moving" in need)
    c = coarse.clone().requires_grad_("coarse" in need)
    out = fn(m, c)
    inputs = [t for t in (m, c) if t.requires_grad]
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))


def _assert_same(got, want, names):
    for name, g, w in zip(names, got, want):
        fin = w.isfinite()
        assert torch.equal(g.isfinite(), fin), f"{name}: non-finite at {(g.isfinite() != fin).nonzero()[:5].tolist()}"
        assert_matches_reference(g[fin], w[fin], names=name)


@pytest.mark.parametrize("need", [("moving", "coarse"), ("moving",), ("coarse",)])
@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,coarse_size", CASES)
def test_rows_match_reference(size, coarse_size, align_corners, padding_mode, C, need):
    moving, coarse, grad_out = _inputs(len(size) * 7 + size[-1], size, coarse_size, C)
    kw = dict(align_corners=align_corners, padding_mode=padding_mode)
    got = _run(lambda m, c: ck.warp(m, c, backend="cpp", **kw), moving, coarse, grad_out, need)
    want = _run(lambda m, c: reference.warp(m, c, **kw), moving, coarse, grad_out, need)
    _assert_same(got, want, ("out",) + need)
    if padding_mode == "zeros":
        assert (got[0] == 0).any() and (got[0] != 0).any()  # rows partly outside the image


@pytest.mark.parametrize("size,coarse_size", [((9, 5, 37), (3, 2, 3)), ((6, 4, 50), (4, 2, 20))])
def test_rows_do_not_depend_on_thread_count(size, coarse_size, set_threads):
    moving, coarse, grad_out = _inputs(3, size, coarse_size, C=1, B=1)
    results = []
    for n in (1, 2, 3, 5):
        set_threads(n)
        results.append(_run(lambda m, c: ck.warp(m, c, backend="cpp"), moving, coarse, grad_out))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("C", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("where", ["image", "grad_out", "coarse"])
def test_rows_nonfinite(where, padding_mode, C):
    # the non-finite rules (docs/conventions.md#non-finite-values; tests/test_nonfinite.py) on float32 rows
    # long enough for the AVX-512 path: a NaN/inf reaches only what reads it
    # through a tap inside the image; a NaN node gives NaN voxels and gradients
    moving, coarse, grad_out = _inputs(11, (3, 4, 37), (2, 2, 3), C)
    if where == "image":
        moving.view(-1)[0] = INF
        moving[0, 0, 1, 2, 20] = NAN
        moving[1, C - 1, 2, 3, 36] = -INF
    elif where == "grad_out":
        grad_out[0, 0, 1, 1, 17] = INF
        grad_out[1, C - 1, 2, 0, 3] = NAN
    else:
        coarse[0, 1, 1, 0, 2] = NAN
    got = _run(lambda m, c: ck.warp(m, c, padding_mode=padding_mode, backend="cpp"), moving, coarse, grad_out)
    want = _run(lambda m, c: reference.warp(m, c, padding_mode=padding_mode), moving, coarse, grad_out)
    _assert_same(got, want, ("out", "moving", "coarse"))
    assert not all(t.isfinite().all() for t in got)
