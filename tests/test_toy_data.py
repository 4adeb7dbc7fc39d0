"""The toy pairs of §3.1 and build_dataset."""
import numpy as np
import pytest
import torch

from coopseg.data import build_dataset
from coopseg.data.toy import ToyPairs, make_toy_pair, save_toy_figure


def _best_translation_dice(a, b, max_shift):
    """Brute force: max over integer shifts of Dice(shift(a), b)."""
    best = 0.0
    a, b = a.numpy().astype(bool), b.numpy().astype(bool)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            m = np.roll(a, (dy, dx), (0, 1))
            best = max(best, 2 * (m & b).sum() / (m.sum() + b.sum()))
    return best


def test_pair_format_and_determinism():
    p, q, r = make_toy_pair(7, size=96, max_shift=8), make_toy_pair(7, size=96, max_shift=8), make_toy_pair(8, 96, 8)
    for k in ("x1", "x2", "s1", "s2"):
        assert p[k].shape == (1, 96, 96) and p[k].dtype == torch.float32
        assert torch.equal(p[k], q[k])
        assert not torch.equal(p[k], r[k])
    for k in ("s1", "s2"):
        assert set(p[k].unique().tolist()) == {0.0, 1.0}
    assert 0 <= p["x1"].min() and p["x1"].max() <= 1


def test_masks_are_similar_up_to_a_translation_but_not_equal():
    for seed in range(3):
        p = make_toy_pair(seed, size=96, max_shift=8)
        s1, s2 = p["s1"][0], p["s2"][0]
        plain = 2 * (s1 * s2).sum() / (s1.sum() + s2.sum())
        best = _best_translation_dice(s1, s2, 8)
        assert 0.6 < best < 1.0          # slightly different blobs...
        assert best >= plain             # ...and a translation helps (or was ~0)


def test_modalities_encode_the_foreground_differently():
    p = make_toy_pair(1)
    for x, s in ((p["x1"][0], p["s1"][0]), (p["x2"][0], p["s2"][0])):
        spec_fg = torch.fft.fft2(x * s - (x * s).sum() / s.sum() * s).abs()
        spec_bg = torch.fft.fft2(x * (1 - s) - (x * (1 - s)).sum() / (1 - s).sum() * (1 - s)).abs()
        # Stripes inside and outside peak at different spatial frequencies (angle or period).
        assert spec_fg.argmax() != spec_bg.argmax()


def test_dataset_and_errors(tmp_path):
    ds = build_dataset("toy", spatial_dims=2, seed=3, split="train", n=4, size=64)
    test = build_dataset("toy", spatial_dims=2, seed=3, split="test", n=4, size=64)
    assert len(ds) == 4 and ds[1]["x1"].shape == (1, 64, 64)
    assert not torch.equal(ds[0]["s1"], test[0]["s1"])
    assert torch.equal(ds[2]["x2"], ToyPairs(4, seed=ds.seed, size=64)[2]["x2"])
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        build_dataset("toy", spatial_dims=3, seed=0)
    with pytest.raises(ValueError, match="'toy' or the path of a .csv"):
        build_dataset("blobs", spatial_dims=2, seed=0)
    with pytest.raises(ValueError, match="max_shift"):
        make_toy_pair(0, size=64, max_shift=32)
    with pytest.raises(ValueError, match="seed must be"):
        make_toy_pair(-1)
    with pytest.raises(IndexError):
        ds[4]
    save_toy_figure(tmp_path / "toy.png", n=2, size=64)
    assert (tmp_path / "toy.png").stat().st_size > 1000


def test_controlled_shift_sweep_same_seed_same_s1_and_blobs():
    """A seed draws the same s1, x1 and blobs at every max_shift: s2 at shift m is s2 at
    shift 0 translated by the pair's shift (where its source lies in the image)."""
    from coopseg.data.toy import toy_shift, translate

    shifts_seen = set()
    for seed in range(12):
        base = make_toy_pair(seed, 240, 0)
        assert toy_shift(seed, 240, 0) == (0, 0)
        for m in (4, 16, 32):
            p = make_toy_pair(seed, 240, m)
            assert torch.equal(p["s1"], base["s1"]) and torch.equal(p["x1"], base["x1"])
            dy, dx = toy_shift(seed, 240, m)
            assert max(abs(dy), abs(dx)) <= m
            shifts_seen.add((m, dy, dx))
            moved = translate(base["s2"], (dy, dx))
            src = translate(torch.ones_like(base["s2"]), (dy, dx)).bool()  # pixels whose source is inside
            assert torch.equal(p["s2"][src], moved[src])
            assert p["s2"].sum() > 0
            # x2 changes only through s2: the same textures where the foreground agrees
            same = p["s2"] == base["s2"]
            assert same.float().mean() > 0.5
    assert len({s for s in shifts_seen if s[0] == 32}) >= 8   # the shifts themselves vary


def test_oracle_target_is_s1_translated():
    from coopseg.data.toy import toy_shift, translate

    for seed in (0, 5, 9):
        p = make_toy_pair(seed, 240, 32)
        o = make_toy_pair(seed, 240, 32, target="oracle")
        sh = toy_shift(seed, 240, 32)
        assert sh != (0, 0)
        assert torch.equal(o["s2"], translate(p["s1"], sh))
        assert torch.equal(o["x2"], p["x2"]) and torch.equal(o["s1"], p["s1"])
        # s2* and s2 are related but different (the blobs' own jitter)
        inter = (o["s2"] * p["s2"]).sum()
        dice = 2 * inter / (o["s2"].sum() + p["s2"].sum())
        assert 0.6 < dice < 0.999
    t = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(translate(t, (1, -2)), torch.tensor([[[0, 0, 0, 0], [2, 3, 0, 0], [6, 7, 0, 0.]]]))
    assert torch.equal(translate(t, (3, 0)), torch.zeros_like(t))
    with pytest.raises(ValueError, match="target must be one of s2, oracle"):
        make_toy_pair(0, 240, 32, target="s3")
    with pytest.raises(ValueError, match="target must be one of"):
        ToyPairs(2, seed=0, target="x")
