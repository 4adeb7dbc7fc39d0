"""demo-data: pairs from the MNI152 templates (skipped without nilearn, an optional extra)."""
import numpy as np
import pytest

from coopseg.data import build_dataset
from coopseg.data.demo import T1_SHAPE, T2_SHAPE, make_demo_data
from coopseg.data.volumes import load_pair, read_manifest

pytest.importorskip("nilearn")


def test_demo_pairs_are_misaligned_two_grid_pairs(tmp_path):
    train, test = make_demo_data(tmp_path, pairs=3, test=1, seed=5, progress=False)
    cases = read_manifest(train)
    assert len(cases) == 2 and len(read_manifest(test)) == 1
    import nibabel as nib

    t1, t2 = nib.load(str(cases[0].t1)), nib.load(str(cases[0].t2))
    assert t1.shape == T1_SHAPE and t2.shape == T2_SHAPE
    assert np.allclose(np.linalg.norm(t2.affine[:3, :3], axis=0), (3, 3, 6))  # 6 mm slices
    pairs = [load_pair(c, nonempty_masks=True) for c in cases]
    for p in pairs:
        d = 2 * (p.s1 * p.s2).sum() / (p.s1.sum() + p.s2.sum())
        assert 0.75 < d < 0.97                  # same brain, misaligned and annotated differently
        assert 0.1 < p.s1.mean() < 0.4
        inside, outside = p.x1[p.s1 > 0].mean(), p.x1[p.s1 == 0].mean()
        assert inside > outside + 0.2           # the annotation is where the brain is
        assert np.corrcoef(p.x1.ravel(), p.x2.ravel())[0, 1] < 0.9  # another contrast
    assert not np.array_equal(pairs[0].s1, pairs[1].s1)  # two different subjects
    ds = build_dataset(str(train), spatial_dims=3, seed=0)   # `data: train.csv` in a training config
    assert len(ds) == 2 and ds[1]["x2"].shape == (1,) + T1_SHAPE
