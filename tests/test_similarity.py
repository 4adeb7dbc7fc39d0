"""similarity_step (fused vs reference), dice, translation search and the D_S driver."""

import numpy as np
import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import _backend, reference
from coopseg_kernels.similarity import descent, naive, translation
from helpers import brute_force_shift, peak_cpu_bytes


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


def test_dice():
    a = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True           # |A| = |B| = 8, overlap 4 -> 0.5
    a[1, 0, 0, 0] = True          # one empty -> 0
    torch.testing.assert_close(ck.dice(a, b), torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    # uint8 and float masks are thresholded at 0.5
    torch.testing.assert_close(ck.dice(a.to(torch.uint8), b.float() * 0.9),
                               torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="bool, uint8 or floating"):
        ck.dice(a.long(), b)


_brute_force_shift = brute_force_shift


def related_pair(size, seed, shift=4):
    """Irregular, related but different masks: s2 is s1 deformed smoothly, shifted by up
    to `shift` voxels, with a ball added and one removed (never an exact shift)."""
    g = torch.Generator().manual_seed(seed)
    nd = len(size)
    s1 = blob(size, n=3, seed=seed)
    coarse = torch.randn(1, nd, *[3] * nd, generator=g) * 1.2
    coarse += (torch.randint(-shift, shift + 1, (nd,), generator=g).float()).view(1, nd, *[1] * nd)
    s2 = ck.warp(s1.float(), coarse) > 0.5
    grid = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float32) for k in size], indexing="ij"))
    for value in (True, False):
        c = torch.tensor([torch.randint(2, k - 2, (), generator=g).item() for k in size], dtype=torch.float32)
        ball = ((grid - c.view(-1, *[1] * nd)) ** 2).sum(0) <= (min(size) / 9) ** 2
        s2[0, 0][ball] = value
    return s1, s2


PAIRS = [((48, 52), seed) for seed in range(6)] + [((24, 26, 20), seed) for seed in range(3)]


@pytest.mark.parametrize("size,seed", PAIRS)
def test_translation_search_matches_brute_force(size, seed):
    s1, s2 = related_pair(size, seed, shift=6)
    bound = [6] * len(size)
    want_d, want_t = _brute_force_shift(s1, s2, bound)
    assert want_d < 1.0, "the pair must not be an exact shift"
    for method in ("direct", "fft", "auto"):
        t, d = ck.translation_search(s1, s2, bound, method=method)
        assert abs(d.item() - want_d) < 1e-12, method
        assert tuple(int(v) for v in t[0]) == want_t, method


@pytest.mark.parametrize("counter", ["cpp", "torch"])
@pytest.mark.parametrize("size,seed", PAIRS[::3])
def test_translation_search_chunks_and_counters_match_brute_force(size, seed, counter, monkeypatch):
    """The direct path in tiny chunks of shifts (one row of the last axis each, so the best
    and its ties are merged across chunks), with the C++ bit-packed counter and with the
    torch slicing fallback (devices without the extension), at a bound past the volume."""
    s1, s2 = related_pair(size, seed, shift=6)
    bound = [n - 1 for n in size] if len(size) == 2 else [5, 9, 4]
    want_d, want_t = _brute_force_shift(s1, s2, bound)
    if counter == "torch":
        monkeypatch.setattr(_backend, "HAS_CPP", False)
    elif not _backend.HAS_CPP:
        pytest.skip("C++ extension not built")
    monkeypatch.setattr(translation, "_SHIFT_BYTES", 1 << 40)
    t, d = ck.translation_search(s1, s2, bound, method="direct")
    assert abs(d.item() - want_d) < 1e-12
    assert tuple(int(v) for v in t[0]) == want_t


@pytest.mark.parametrize("size,seed", PAIRS[::2])
def test_translation_score_never_below_the_exact_shift(size, seed):
    """The exact best integer shift is a floor of D_S(translation): the sub-voxel
    refinement may only add candidates (5 of 36 such pairs scored below it before)."""
    s1, s2 = related_pair(size, seed, shift=6)
    want_d, _ = _brute_force_shift(s1, s2, [6] * len(size))
    res = ck.relative_similarity(s1, s2, omega="translation", max_translation=6)
    assert res.score.item() >= want_d - 1e-12
    # the field is the tau that scored: warping by it gives the score
    W = ck.warp(s1.float(), res.field) > 0.5
    assert abs(ck.dice(W, s2).item() - res.score.item()) < 1e-12


@pytest.mark.parametrize("size,seed,shift,kw", [
    ((48, 52), 0, 6, {}),
    ((48, 52), 1, 6, dict(grid_spacing=8)),
    ((48, 52), 2, 3, dict(grid_spacing=8)),
    ((24, 26, 20), 0, 6, {}),
    ((24, 26, 20), 1, 6, dict(grid_spacing=8)),
    ((24, 26, 20), 2, 2, dict(grid_spacing=8)),
])
def test_dice_le_translation_le_elastic(size, seed, shift, kw):
    s1, s2 = related_pair(size, seed, shift=shift)
    m = [6] * len(size)
    plain = ck.dice(s1, s2).item()
    tr = ck.relative_similarity(s1, s2, omega="translation", max_translation=m).score.item()
    el = ck.relative_similarity(s1, s2, omega="elastic", max_translation=m, **kw)
    assert plain <= tr <= el.score.item()
    assert el.iterations.shape == (1,) and el.iterations.item() > 0


def test_disjoint_blobs_elastic_finds_the_translation():
    s1 = torch.zeros(1, 1, 40, 44, dtype=torch.bool)
    s1[..., 5:15, 6:18] = True
    s2 = torch.roll(s1, (20, 18), dims=(2, 3))
    s2[..., 25:27, 24:26] = False  # not an exact shift
    assert ck.dice(s1, s2).item() == 0.0
    tr = ck.relative_similarity(s1, s2, omega="translation").score.item()
    el = ck.relative_similarity(s1, s2, max_translation=24).score.item()
    assert tr > 0.95 and el >= tr


def test_known_translation_found_exactly():
    s2 = blob((30, 34, 28), n=2, seed=1)
    s2[..., :6, :, :] = s2[..., -6:, :, :] = False  # keep the shift inside the volume
    s2[..., :, :6, :] = s2[..., :, -6:, :] = False
    s2[..., :, :, :6] = s2[..., :, :, -6:] = False
    shift = (3, -5, 2)
    s1 = torch.roll(s2, shifts=[-v for v in shift], dims=(2, 3, 4))  # s1(x) = s2(x + shift)
    assert s1.sum() == s2.sum() > 100
    t, d = ck.translation_search(s1, s2, 8)  # a plain int bounds every axis
    assert t[0].tolist() == [-3.0, 5.0, -2.0] and d.item() == 1.0
    res = ck.relative_similarity(s1, s2, omega="translation", max_translation=8)
    assert res.score.item() == 1.0 and ck.dice(s1, s2).item() < 0.6
    assert res.field.shape == (1, 3, 1, 1, 1)
    torch.testing.assert_close(res.field.flatten(), torch.tensor([-3.0, 5.0, -2.0]), atol=0.05, rtol=0)


def test_multichannel_is_pooled_per_channel():
    a1, a2 = related_pair((30, 34), 3, shift=4)
    b1, b2 = related_pair((30, 34), 4, shift=4)
    s1, s2 = torch.cat([a1, b1], 1), torch.cat([a2, b2], 1)
    want = naive.brute_force_translation(s1, s2, [4, 4])[1].item()
    t, d = ck.translation_search(s1, s2, 4)
    assert abs(d.item() - want) < 1e-12 and d.item() <= 1.0
    assert abs(ck.dice(naive.shift(s1, [int(v) for v in t[0]]), s2).item() - want) < 1e-12
    # swapped channels: pooled Dice compares channel c with channel c only
    swapped = torch.cat([b1, a1], 1)
    t, d = ck.translation_search(swapped, s2, 4)
    assert abs(d.item() - naive.brute_force_translation(swapped, s2, [4, 4])[1].item()) < 1e-12
    many = s1.repeat(1, 32, 1, 1)  # 64 channels: a Dice, never "30.0"
    _, d = ck.translation_search(many, s2.repeat(1, 32, 1, 1), 2)
    assert 0.0 <= d.item() <= 1.0
    res = ck.relative_similarity(swapped, s2, grid_spacing=8, max_translation=4)
    assert res.score.item() >= ck.dice(swapped, s2).item()
    W = ck.warp(swapped.float(), res.field) > 0.5
    assert abs(ck.dice(W, s2).item() - res.score.item()) < 1e-12


def test_identical_masks_score_one(backend):
    s = blob((12, 14, 10) if backend == "cpp" else (7, 8, 6), seed=2)  # the interpreter is slow
    res = ck.relative_similarity(s, s.clone(), backend=backend, iters=5)
    assert res.score.item() == 1.0


@pytest.mark.parametrize("omega", ["elastic", "translation"])
def test_empty_masks(omega):
    e = torch.zeros(1, 1, 8, 9, 7, dtype=torch.bool)
    s = blob((8, 9, 7), seed=0)
    kw = dict(omega=omega, max_translation=8)
    assert ck.relative_similarity(e, e, **kw).score.item() == 1.0
    assert ck.relative_similarity(e, s, **kw).score.item() == 0.0
    # s1 can be moved out of the volume, which would leave "two empty masks": no candidate
    assert ck.relative_similarity(s, e, **kw).score.item() == 0.0
    both = ck.relative_similarity(torch.cat([s, e, e]), torch.cat([e, e, s]), **kw).score
    assert both.tolist() == [0.0, 1.0, 0.0]
    assert ck.translation_search(s, e, 8)[1].item() == 0.0
    assert ck.translation_search(e, e, 8)[1].item() == 1.0


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
    assert (res.losses[-1] < 0.1 * res.losses[0]).all()


def test_coarse_to_fine_matches_single_level_score():
    s1, s2 = related_pair((64, 60, 56), 5, shift=5)
    fine = ck.relative_similarity(s1, s2, grid_spacing=16, levels=1)
    c2f = ck.relative_similarity(s1, s2, grid_spacing=16)
    assert c2f.score.item() >= fine.score.item() - 0.01
    assert c2f.score.item() >= ck.relative_similarity(s1, s2, omega="translation", max_translation=16).score.item()


def test_batched_pairs_are_independent():
    size = (16, 18, 14)
    a, b = blob(size, seed=5), blob(size, seed=6)
    both = ck.relative_similarity(torch.cat([a, b]), torch.cat([b, a]), grid=(3, 3, 3), iters=30)
    one = ck.relative_similarity(a, b, grid=(3, 3, 3), iters=30)
    torch.testing.assert_close(both.score[:1], one.score)
    torch.testing.assert_close(both.iterations[:1], one.iterations)
    torch.testing.assert_close(both.losses[: one.losses.shape[0], :1], one.losses)


def test_stopping_rule_ignores_a_small_gain_right_after_rejections(monkeypatch):
    """Scripted losses: accept, reject, reject, tiny accepted gain (< tol), then real
    gains. The old rule stopped at the tiny gain (4 iterations)."""
    script = [1.0, 0.5, 0.9, 0.9, 0.4999, 0.3, 0.2, 0.1999, 0.19985, 0.15]
    calls = []

    def fake_step(s1b, s2b, c, backend="auto"):
        calls.append(1)
        value = script[min(len(calls) - 1, len(script) - 1)]
        return torch.full((c.shape[0],), value, dtype=c.dtype), torch.ones_like(c)

    monkeypatch.setattr(descent, "similarity_step", fake_step)
    c = torch.zeros(1, 2, 1, 1)
    h = torch.ones_like(c)
    x = torch.zeros(1, 1, 4, 4)
    _, losses, steps = descent._descend(x, x, c, h, iters=50, step=1.0, momentum=0.0, tol=1e-2, lim=None,
                                        backend="reference")
    # stops only after two consecutive small accepted gains (0.2 -> 0.1999 -> 0.19985)
    assert steps.item() == 8
    assert torch.stack(losses)[-1].item() == pytest.approx(0.19985)


@pytest.mark.parametrize("fused", ["cpp", "triton"])
def test_fused_descent_follows_reference_descent(fused):
    if fused == "cpp" and not ck.HAS_CPP:
        pytest.skip("C++ extension not built")
    size = (12, 14, 10) if fused == "cpp" else (6, 7, 5)
    s2 = ck.blur(blob(size, seed=7).double())
    s1 = ck.blur((ck.warp(s2, torch.randn(1, 3, 2, 2, 2, dtype=torch.float64) * 1.5) > 0.3).double())
    # start off the identity: there every position is a whole voxel, where sampling has a
    # kink and the reference's normalise/unnormalise round trip picks either side at random
    init = torch.randn(1, 3, 2, 2, 2, dtype=torch.float64) * 0.3
    h = descent._preconditioner(s1, (2, 2, 2), "reference")
    kw = dict(iters=12, step=0.7, momentum=0.3, tol=0.0, lim=None)
    got = descent._descend(s1, s2, init, h, backend=fused, **kw)
    want = descent._descend(s1, s2, init, h, backend="reference", **kw)
    assert len(got[1]) == len(want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(torch.stack(got[1]), torch.stack(want[1]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-10)


S6 = blob((6, 7, 8))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(omega="affine"), ValueError, "omega must be one of"),
    (dict(grid=(2, 2)), ValueError, "grid must be 3 coarse sizes"),
    (dict(grid=(2, 0, 2)), ValueError, r"grid must be 3 coarse sizes \(ints >= 1\)"),
    (dict(grid=(2, 2.5, 2)), TypeError, "grid must be 3 coarse sizes"),
    (dict(grid=5), TypeError, "grid must be a sequence of 3"),
    (dict(grid_spacing=0), ValueError, "grid_spacing must be a finite number > 0"),
    (dict(grid_spacing=-3), ValueError, "grid_spacing must be a finite number > 0"),
    (dict(grid_spacing=float("nan")), ValueError, "grid_spacing must be a finite number > 0"),
    (dict(grid_spacing="16"), TypeError, "grid_spacing must be a finite number"),
    (dict(omega="translation", grid=(2, 2, 2)), ValueError, "grid of ones"),
    (dict(omega="translation", max_translation=-1), ValueError, "max_translation must be an int >= 0"),
    (dict(max_translation=[-1, -1, -1]), ValueError, "max_translation must be 3 ints >= 0"),
    (dict(max_translation=[8]), ValueError, "max_translation must be 3 ints >= 0"),
    (dict(max_translation=2.5), TypeError, "max_translation must be an int >= 0 or 3 of them"),
    (dict(max_translation=True), TypeError, "max_translation must be an int >= 0"),
    (dict(iters=-1), ValueError, "iters must be an int >= 0"),
    (dict(iters=True), TypeError, "iters must be an int >= 0"),
    (dict(iters=3.0), TypeError, "iters must be an int >= 0"),
    (dict(step=0), ValueError, "step must be a finite number > 0"),
    (dict(step=float("inf")), ValueError, "step must be a finite number > 0"),
    (dict(tol=float("nan")), ValueError, "tol must be a finite number >= 0"),
    (dict(tol=-1), ValueError, "tol must be a finite number >= 0"),
    (dict(momentum=1.0), ValueError, r"momentum must be a finite number in \[0, 1\)"),
    (dict(kernel="121"), TypeError, "kernel must be a sequence of numbers"),
    (dict(kernel=(1, 2)), ValueError, "odd length"),
    (dict(levels=0), ValueError, "levels must be an int >= 1"),
    (dict(levels=4), ValueError, "levels=4 halves every axis 3 times"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(grid=(2, 2, 2), init=torch.zeros(1, 3, 2, 2, 1)), ValueError, "init must have the coarse grid's shape"),
    (dict(grid=(2, 2, 2), init=torch.full((1, 3, 2, 2, 2), float("nan"))), ValueError, "init must be finite"),
    (dict(grid=(2, 2, 2), init=torch.zeros(1, 3, 2, 2, 2, dtype=torch.int64)), TypeError, "init must have a floating"),
    (dict(omega="translation", init=torch.zeros(1, 3, 1, 1, 1)), ValueError, "init applies to omega='elastic'"),
])
def test_relative_similarity_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ck.relative_similarity(S6, S6, **kwargs)


@pytest.mark.parametrize("make,error,match", [
    (lambda s: (s, s[:, :, :5]), ValueError, "shapes must match"),
    (lambda s: (s, torch.cat([s, s])), ValueError, "shapes must match"),  # batch 1 vs 2: no broadcast
    (lambda s: (s.long(), s), TypeError, "s1 must be bool, uint8 or floating"),
    (lambda s: (s.numpy(), s), TypeError, "s1 must be a torch.Tensor, got ndarray"),
    (lambda s: (s, s.to("meta")), ValueError, "one device"),
    (lambda s: (s.to("meta"), s.to("meta")), ValueError, "s1 is a meta tensor"),
    (lambda s: (s[0, 0], s[0, 0]), ValueError, r"s1 must be \(B, C, H, W\)"),
])
@pytest.mark.parametrize("fn", ["relative_similarity", "translation_search"])
def test_mask_errors(fn, make, error, match):
    a, b = make(S6)
    with pytest.raises(error, match=match):
        getattr(ck, fn)(a, b)


@pytest.mark.parametrize("bound,error,match", [
    (-1, ValueError, "max_translation must be an int >= 0"),
    ([8], ValueError, "max_translation must be 3 ints >= 0"),
    ([1, -1, 1], ValueError, "max_translation must be 3 ints >= 0"),
    ([1, 1.5, 1], TypeError, "max_translation must be 3 ints >= 0"),
    ("8", TypeError, "max_translation must be a sequence of 3"),
    (float("inf"), TypeError, "max_translation must be an int >= 0 or 3 of them"),
    (torch.tensor(2.0), TypeError, "max_translation must be an int >= 0 or 3 of them"),
    ({1, 2, 3}, TypeError, "max_translation must be a sequence of 3"),
    (torch.ones(1, 3, dtype=torch.int64), TypeError, "max_translation must be a sequence of 3"),
])
def test_translation_search_bound_errors(bound, error, match):
    with pytest.raises(error, match=match):
        ck.translation_search(S6, S6, bound)
    with pytest.raises(ValueError, match="method must be one of"):
        ck.translation_search(S6, S6, 2, method="slow")


def test_max_translation_forms_agree():
    s1, s2 = related_pair((24, 26, 20), 1, shift=3)
    a = ck.translation_search(s1, s2, 3)
    b = ck.translation_search(s1, s2, [3, 3, 3])
    c = ck.translation_search(s1, s2, torch.tensor([3, 3, 3]))
    d = ck.translation_search(s1, s2, torch.tensor(3))   # 0-d tensors and arrays: their scalar
    e = ck.translation_search(s1, s2, np.array(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0], d[0]) and torch.equal(a[0], e[0])


def test_dice_errors():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="one device"):
        ck.dice(a, a.to("meta"))
    with pytest.raises(ValueError, match="shapes must match"):
        ck.dice(a, torch.cat([a, a]))
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        ck.dice(a, a, threshold=float("nan"))
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        ck.dice(a.numpy(), a)


def test_similarity_step_errors():
    s = torch.rand(1, 1, 5, 6, 7)
    c = torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="shapes must match"):
        ck.similarity_step(s, s[:, :, :4], c)
    with pytest.raises(ValueError, match="coarse must have 3 channels"):
        ck.similarity_step(s, s, torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(TypeError, match="dtypes must match"):
        ck.similarity_step(s, s.double(), c)
    with pytest.raises(TypeError, match="align_corners must be True or False"):
        ck.similarity_step(s, s, c, align_corners="no")
    with pytest.raises(ValueError, match="s1_blurred is a meta tensor"):
        ck.similarity_step(s.to("meta"), s.to("meta"), c.to("meta"))
    if ck.HAS_CPP:
        with pytest.raises(TypeError, match="float16 is not supported by backend 'cpp'"):
            ck.similarity_step(s.half(), s.half(), c, backend="cpp")


def test_other_op_argument_errors():
    m, c = torch.rand(1, 1, 5, 6, 7), torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(TypeError, match="align_corners must be True or False"):
        ck.warp(m, c, align_corners="no")
    with pytest.raises(TypeError, match="align_corners must be True or False"):
        ck.upsample_field(c, (5, 6, 7), align_corners="no")
    with pytest.raises(TypeError, match="size must be 3 ints, each >= 2"):
        ck.upsample_field(c, (5, 6, 10.7))
    with pytest.raises(ValueError, match="moving is a meta tensor"):
        ck.warp(m.to("meta"), c.to("meta"))
    with pytest.raises(TypeError, match="kernel must be a sequence of numbers"):
        ck.blur(m, kernel="121")
    with pytest.raises(ValueError, match="x is a meta tensor"):
        ck.blur(m.to("meta"))


_peak = peak_cpu_bytes


def _noise_pair(size, seed):
    """Related masks whose bounding boxes are the whole volume (the worst case for memory:
    every crop is the volume), s2 = s1 with 10 % of the voxels flipped."""
    g = torch.Generator().manual_seed(seed)
    s1 = torch.rand(1, 1, *size, generator=g) < 0.4
    return s1, s1 ^ (torch.rand(1, 1, *size, generator=g) < 0.1)


@pytest.mark.parametrize("pair", ["blobs", "noise"])
@pytest.mark.parametrize("size,bound", [((20, 22, 18), None), ((20, 22, 18), 9), ((40, 44), None)])
def test_translation_search_peak_memory_within_4_volumes(size, bound, pair):
    """Issue 11 point 2: the search's peak (benchmarks/memory.py, storages allocated above the
    inputs) stays <= 4 input volumes (one bool mask: numel bytes) at any bound, for masks
    whose crops are the whole volume too; the C++ counter's result equals the FFT's."""
    if not _backend.HAS_CPP:
        pytest.skip("C++ extension not built")
    s1, s2 = related_pair(size, 1, shift=4) if pair == "blobs" else _noise_pair(size, 1)
    peak = _peak(lambda: ck.translation_search(s1, s2, bound))
    assert 0 < peak <= 4 * s1.numel(), peak / s1.numel()
    t, d = ck.translation_search(s1, s2, bound)
    t_f, d_f = ck.translation_search(s1, s2, bound, method="fft")
    assert torch.equal(t, t_f) and d.item() == d_f.item()
    # the FFT itself would need far more than 4 volumes here: the reason it is not taken
    assert _peak(lambda: ck.translation_search(s1, s2, bound, method="fft")) > 4 * s1.numel()


@pytest.mark.parametrize("counter", ["cpp", "torch"])
@pytest.mark.parametrize("size,bound", [((600, 16), None), ((600, 16), 2), ((16, 300), None), ((96, 100, 2), None),
                                        ((3, 40, 50), 2)])
def test_translation_search_thin_volumes(size, bound, counter, monkeypatch):
    """A short axis is not packed (a row of 2 voxels would take a 64-bit word: 4 volumes a
    copy), and the shifts along the packed axis are chunked too: the peak stays <= 4 input
    volumes and the result is the FFT's (exact) and the brute force's. (At least 16 rows:
    the counters keep a histogram of one packed row's length.)"""
    if counter == "torch":
        monkeypatch.setattr(_backend, "HAS_CPP", False)
    elif not _backend.HAS_CPP:
        pytest.skip("C++ extension not built")
    s1, s2 = _noise_pair(size, 5)
    peak = _peak(lambda: ck.translation_search(s1, s2, bound, method="direct"))
    assert 0 < peak <= 4 * s1.numel(), peak / s1.numel()
    t, d = ck.translation_search(s1, s2, bound, method="direct")
    t_f, d_f = ck.translation_search(s1, s2, bound, method="fft")
    assert torch.equal(t, t_f) and d.item() == d_f.item()
    if bound is not None:
        want_d, want_t = _brute_force_shift(s1, s2, [bound] * len(size))
        assert tuple(int(v) for v in t[0]) == want_t and abs(d.item() - want_d) < 1e-12


def test_translation_search_torch_counter_peak_memory(monkeypatch):
    """The slicing fallback (devices without the C++ counter) keeps the same bound (the
    volume not tiny: a chunk holds at least one row of shifts, 48 bytes each)."""
    monkeypatch.setattr(_backend, "HAS_CPP", False)
    s1, s2 = _noise_pair((64, 72), 2)
    assert _peak(lambda: ck.translation_search(s1, s2, None)) <= 4 * s1.numel()


def test_auto_takes_fft_only_where_it_fits(monkeypatch):
    """With the direct count made expensive in the cost model, auto takes the FFT for a small
    mask in a large volume (it fits the budget: exact, <= 4 volumes) but still not for masks
    filling the volume (it would not fit)."""
    calls = []
    real = translation._overlap_fft
    monkeypatch.setattr(translation, "_overlap_fft", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(translation, "_WORD_COST", 1.0)
    monkeypatch.setattr(translation, "_SLICE_COST", 1.0)
    small, _ = related_pair((12, 13, 10), 2, shift=2)
    s1 = torch.zeros(1, 1, 40, 44, 36, dtype=torch.bool)
    s2 = torch.zeros_like(s1)
    s1[..., 10:22, 12:25, 8:18] = small[0, 0]
    s2[..., 12:24, 11:24, 9:19] = related_pair((12, 13, 10), 2, shift=2)[1][0, 0]
    want_t, want_d = ck.translation_search(s1, s2, 3, method="direct")  # exact (tests above)
    assert not calls and 0.5 < want_d.item() < 1.0
    t, d = ck.translation_search(s1, s2, 3)
    assert calls and torch.equal(t, want_t) and d.item() == want_d.item()
    assert _peak(lambda: ck.translation_search(s1, s2, 3)) <= 4 * s1.numel()
    calls.clear()
    f1, f2 = _noise_pair((16, 18, 14), 3)
    assert _peak(lambda: ck.translation_search(f1, f2, None)) <= 4 * f1.numel()
    assert not calls


@pytest.mark.skipif(not _backend.HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("call,match", [
    (lambda o, m, p: o.pack_bits(m.float()), "bool CPU tensor"),
    (lambda o, m, p: o.pack_bits(m[0]), r"\(C, D0, D1, D2\)"),
    (lambda o, m, p: o.overlap_counts(p.float(), p, 5, 5, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]), "packed_a"),
    (lambda o, m, p: o.overlap_counts(p, p[:, :, :, :0], 5, 5, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]),
     "packed_b"),
    (lambda o, m, p: o.overlap_counts(p, p, 65, 5, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]), "a_bits"),
    (lambda o, m, p: o.overlap_counts(p, p, 5, 0, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]), "b_bits"),
    (lambda o, m, p: o.overlap_counts(p, p, 5, 5, [0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]), "d_lo"),
    (lambda o, m, p: o.overlap_counts(p, p, 5, 5, [0, 0, 0], [1, 0, 1], [0, 0, 0], [5, 5, 5]), "d_n"),
    (lambda o, m, p: o.overlap_counts(p, p, 5, 5, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, -1, 5]), "box_len"),
    (lambda o, m, p: o.overlap_counts(p, p, 5, 5, [0, 0, 0], [2 ** 20, 2 ** 20, 1], [0, 0, 0], [5, 5, 5]),
     "at most 2\\^32"),
    (lambda o, m, p: o.overlap_counts(p, p, 4, 5, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]),
     "packed_a has bits set past a_bits = 4"),
    (lambda o, m, p: o.overlap_counts(p, p, 5, 3, [0, 0, 0], [1, 1, 1], [0, 0, 0], [5, 5, 5]),
     "packed_b has bits set past b_bits = 3"),
])
def test_overlap_counter_raw_op_bad_args(call, match):
    m = torch.ones(1, 4, 3, 5, dtype=torch.bool)
    p = torch.ops.coopseg.pack_bits(m)
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.coopseg, m, p)


@pytest.mark.skipif(not _backend.HAS_CPP, reason="C++ extension not built")
def test_overlap_counter_raw_op_matches_slicing():
    """The raw counter on a box of offsets past both crops (empty overlaps and boxes
    included), rows of 70 voxels (two words) and of 5, against the slicing counter."""
    g = torch.Generator().manual_seed(4)
    for sa, sb in [((2, 5, 4, 70), (2, 6, 3, 66)), ((1, 4, 6, 5), (1, 5, 4, 3))]:
        a = torch.rand(*sa, generator=g) < 0.5
        b = torch.rand(*sb, generator=g) < 0.5
        d_lo = [-sb[1] - 1, -sb[2], -sb[3] - 2]
        d_n = [sa[1] + sb[1] + 2, sa[2] + sb[2], sa[3] + sb[3] + 3]
        box_lo, box_len = [-2, 1, -3], [sa[1] + 1, sa[2] - 2, sa[3]]
        pa, pb = torch.ops.coopseg.pack_bits(a.transpose(1, 2).contiguous().transpose(1, 2)), \
            torch.ops.coopseg.pack_bits(b)
        got = torch.ops.coopseg.overlap_counts(pa, pb, sa[3], sb[3], d_lo, d_n, box_lo, box_len)
        want = translation._counts_direct_torch(a, b, d_lo, d_n, box_lo, box_len)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert want[0].sum() > 0 and want[1].min() == 0 and want[1].max() > 0
