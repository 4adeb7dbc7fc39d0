"""similarity_step (fused vs reference), dice, translation search and the D_S driver."""
import itertools

import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import reference


def blob(size, n=3, seed=0):
    """Union of n balls at random places: a liver-ish test mask (bool)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float32) for k in size], indexing="ij"))
    m = torch.zeros(size, dtype=torch.bool)
    for _ in range(n):
        c = torch.tensor([torch.randint(k // 4, 3 * k // 4, (), generator=g).item() for k in size], dtype=torch.float32)
        m |= ((grid - c.view(-1, *[1] * len(size))) ** 2).sum(0) <= (min(size) / 5) ** 2
    return m[None, None]


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,coarse_size", [((5, 7, 6), (2, 3, 1)), ((9, 8), (3, 2)), ((4, 5, 6), (1, 1, 1))])
def test_similarity_step_matches_reference(backend, size, coarse_size, align_corners):
    nd = len(size)
    s1 = torch.rand(2, 2, *size, dtype=torch.float64)
    s2 = torch.rand(2, 2, *size, dtype=torch.float64)
    c = torch.randn(2, nd, *coarse_size, dtype=torch.float64) * 2
    loss, grad = ck.similarity_step(s1, s2, c, align_corners=align_corners, backend=backend)
    want_loss, want_grad = reference.similarity_step(s1, s2, c, align_corners=align_corners)
    assert loss.shape == (2,) and grad.shape == c.shape
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-13)
    # float32 too
    l32, g32 = ck.similarity_step(s1.float(), s2.float(), c.float(), align_corners=align_corners, backend=backend)
    torch.testing.assert_close(l32.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g32.double(), want_grad, rtol=1e-4, atol=1e-5)


def test_similarity_step_is_deterministic(backend):
    s1, s2 = torch.rand(1, 1, 9, 10, 11), torch.rand(1, 1, 9, 10, 11)
    c = torch.randn(1, 3, 3, 3, 2)
    a = ck.similarity_step(s1, s2, c, backend=backend)
    b = ck.similarity_step(s1, s2, c, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_similarity_step_opcheck(backend):
    s1, s2 = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64), torch.rand(1, 1, 4, 5, 6, dtype=torch.float64)
    c = torch.randn(1, 3, 2, 2, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.coopseg.similarity_step.default, (s1, s2, c, True, backend),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_similarity_step_errors():
    s = torch.rand(1, 1, 5, 6, 7)
    with pytest.raises(ValueError, match="shapes must match"):
        ck.similarity_step(s, s[:, :, :4], torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="coarse must have 3 channels"):
        ck.similarity_step(s, s, torch.zeros(1, 2, 2, 2, 2))


def test_dice():
    a = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True           # |A| = |B| = 8, overlap 4 -> 0.5
    a[1, 0, 0, 0] = True          # one empty -> 0
    torch.testing.assert_close(ck.dice(a, b), torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    # uint8 and float masks are thresholded at 0.5
    torch.testing.assert_close(ck.dice(a.to(torch.uint8), b.float() * 0.9), torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="bool, uint8 or floating"):
        ck.dice(a.long(), b)


def _brute_force_shift(s1, s2, bound):
    """max over integer t of Dice(s1(x + t), s2) by explicit shifting (zero padding)."""
    nd = s1.dim() - 2
    best, best_t = -1.0, None
    for t in itertools.product(*[range(-b, b + 1) for b in bound]):
        shifted = torch.zeros_like(s1)
        src = tuple(slice(max(v, 0), n + min(v, 0)) for v, n in zip(t, s1.shape[2:]))
        dst = tuple(slice(max(-v, 0), n + min(-v, 0)) for v, n in zip(t, s1.shape[2:]))
        shifted[(..., *dst)] = s1[(..., *src)]
        d = ck.dice(shifted, s2).item()
        if d > best + 1e-12 or (abs(d - best) <= 1e-12 and sum(map(abs, t)) < sum(map(abs, best_t))):
            best, best_t = d, t
    return best, best_t


@pytest.mark.parametrize("size", [(9, 11), (7, 8, 6)])
def test_translation_search_matches_brute_force(size):
    s2 = blob(size, n=2, seed=3)
    s1 = blob(size, n=2, seed=4)  # not a shifted copy: the optimum is a genuine search
    bound = [3] * len(size)
    t, d = ck.translation_search(s1, s2, bound)
    want_d, want_t = _brute_force_shift(s1, s2, bound)
    assert abs(d.item() - want_d) < 1e-12
    assert tuple(int(v) for v in t[0]) == want_t


def test_known_translation_found_exactly():
    s2 = blob((30, 34, 28), n=2, seed=1)
    s2[..., :6, :, :] = s2[..., -6:, :, :] = False  # keep the shift inside the volume
    s2[..., :, :6, :] = s2[..., :, -6:, :] = False
    s2[..., :, :, :6] = s2[..., :, :, -6:] = False
    shift = (3, -5, 2)
    s1 = torch.roll(s2, shifts=[-v for v in shift], dims=(2, 3, 4))  # s1(x) = s2(x + shift)
    assert s1.sum() == s2.sum() > 100
    t, d = ck.translation_search(s1, s2, [8, 8, 8])
    assert t[0].tolist() == [-3.0, 5.0, -2.0] and d.item() == 1.0
    res = ck.relative_similarity(s1, s2, omega="translation", max_translation=8)
    assert res.score.item() == 1.0 and ck.dice(s1, s2).item() < 0.6
    assert res.field.shape == (1, 3, 1, 1, 1)
    torch.testing.assert_close(res.field.flatten(), torch.tensor([-3.0, 5.0, -2.0]), atol=0.05, rtol=0)


def test_identical_masks_score_one(backend):
    s = blob((12, 14, 10), seed=2)
    res = ck.relative_similarity(s, s.clone(), backend=backend, iters=5)
    assert res.score.item() == 1.0


def test_empty_masks():
    e = torch.zeros(1, 1, 8, 9, 7, dtype=torch.bool)
    assert ck.relative_similarity(e, e).score.item() == 1.0
    s = blob((8, 9, 7), seed=0)
    assert ck.relative_similarity(e, s).score.item() == 0.0
    assert ck.relative_similarity(e, e, omega="translation", max_translation=2).score.item() == 1.0


def test_elastic_recovery():
    # s1 is s2 warped by a known smooth coarse field; D_S sees through it
    size, grid = (40, 44, 36), (4, 4, 3)
    s2 = blob(size, seed=0)
    torch.manual_seed(1)
    field = torch.randn(1, 3, *grid) * size[0] / 16
    s1 = ck.warp(s2.float(), field) > 0.5
    plain = ck.dice(s1, s2).item()
    res = ck.relative_similarity(s1, s2, grid=grid)
    assert res.score.item() >= 0.97 and res.score.item() > plain + 0.1
    assert res.losses.shape[0] - 1 < 300, "the default settings should converge before the iteration cap"
    assert (res.losses[-1] < 0.1 * res.losses[0]).all()


def test_batched_pairs_are_independent():
    size = (16, 18, 14)
    a, b = blob(size, seed=5), blob(size, seed=6)
    both = ck.relative_similarity(torch.cat([a, b]), torch.cat([b, a]), grid=(3, 3, 3), iters=30)
    one = ck.relative_similarity(a, b, grid=(3, 3, 3), iters=30)
    torch.testing.assert_close(both.score[:1], one.score)
    torch.testing.assert_close(both.losses[: one.losses.shape[0], :1], one.losses)


@pytest.mark.parametrize("fused", ["cpp", "triton"])
def test_fused_loop_follows_reference_loop(fused):
    if fused == "cpp" and not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    size = (12, 14, 10) if fused == "cpp" else (6, 7, 5)
    s2 = blob(size, seed=7).double()
    s1 = ck.warp(s2, torch.randn(1, 3, 2, 2, 2, dtype=torch.float64) * 1.5) > 0.5
    # start off the identity: there every position is a whole voxel, where sampling has a
    # kink and the reference's normalise/unnormalise round trip picks either side at random
    init = torch.randn(1, 3, 2, 2, 2, dtype=torch.float64) * 0.3
    kw = dict(grid=(2, 2, 2), iters=12, step=0.7, momentum=0.3, tol=0.0, init=init)
    got = ck.relative_similarity(s1.double(), s2, backend=fused, **kw)
    want = ck.relative_similarity(s1.double(), s2, backend="reference", **kw)
    assert got.losses.shape == want.losses.shape
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.field, want.field, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got.score, want.score)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(omega="affine"), ValueError, "omega must be one of"),
    (dict(grid=(2, 2)), ValueError, "grid must be 3 coarse sizes"),
    (dict(grid=(2, 0, 2)), ValueError, "grid must be 3 coarse sizes >= 1"),
    (dict(grid_spacing=0), ValueError, "grid_spacing must be > 0"),
    (dict(omega="translation", grid=(2, 2, 2)), ValueError, "grid of ones"),
    (dict(omega="translation", max_translation=-1), ValueError, "max_translation must be >= 0"),
    (dict(max_translation=3), ValueError, "omega='translation' only"),
    (dict(iters=-1), ValueError, "iters must be"),
    (dict(step=0), ValueError, "step must be > 0"),
    (dict(grid=(2, 2, 2), init=torch.zeros(1, 3, 2, 2, 1)), ValueError, "init must have the coarse grid's shape"),
    (dict(omega="translation", init=torch.zeros(1, 3, 1, 1, 1)), ValueError, "init applies to omega='elastic'"),
])
def test_relative_similarity_argument_errors(kwargs, error, match):
    s = blob((6, 7, 8))
    with pytest.raises(error, match=match):
        ck.relative_similarity(s, s, **kwargs)


def test_relative_similarity_mask_errors():
    s = blob((6, 7, 8))
    with pytest.raises(ValueError, match="shapes must match"):
        ck.relative_similarity(s, s[:, :, :5])
    with pytest.raises(TypeError, match="bool, uint8 or floating"):
        ck.relative_similarity(s.long(), s)
