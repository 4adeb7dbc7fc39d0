"""Manifest pairs: reading, resampling through the affines, normalisation, errors."""
import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from coopseg.data.volumes import PairDataset, VolumeError, load_pair, normalise, read_manifest, resample, write_manifest


def rotation(axis, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine(spacing, origin, rot=np.eye(3)):
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def world(shape, aff):
    """World coordinates (mm) of every voxel of a grid: (*shape, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ aff[:3, :3].T + aff[:3, 3]


# T1: 1.5 mm in plane, 3 mm slices. T2: coarser, oblique (rotated 20 degrees about z then
# 10 about x), shifted: the field of view covers the T1 one.
A1 = affine((1.5, 1.5, 3.0), (-15.0, -12.0, -20.0))
S1 = (21, 17, 13)
A2 = affine((2.0, 1.8, 4.5), (-20.0, -30.0, -32.0), rotation(2, 20) @ rotation(0, 10))
S2 = (30, 32, 15)
CENTRE, RADIUS = np.array([1.0, 0.5, -2.0]), 9.0


def ramp(w):
    """A linear function of world coordinates: trilinear interpolation reproduces it exactly."""
    return 3.0 + 0.2 * w[..., 0] - 0.1 * w[..., 1] + 0.05 * w[..., 2]


def ball(w, centre=CENTRE, radius=RADIUS):
    return (np.linalg.norm(w - centre, axis=-1) < radius).astype(np.uint8)


def save(path, data, aff):
    nib.save(nib.Nifti1Image(np.asarray(data), aff), str(path))
    return path


@pytest.fixture
def pair_files(tmp_path):
    w1, w2 = world(S1, A1), world(S2, A2)
    save(tmp_path / "t1.nii.gz", ramp(w1).astype(np.float32), A1)
    save(tmp_path / "t2.nii.gz", (10 - ramp(w2)).astype(np.float32), A2)
    save(tmp_path / "t1_mask.nii.gz", ball(w1), A1)
    save(tmp_path / "t2_mask.nii.gz", ball(w2, CENTRE + [2.0, 0, 0]), A2)
    m = write_manifest(tmp_path / "list" / "manifest.csv",
                       [dict(id="a", t1=tmp_path / "t1.nii.gz", t2=tmp_path / "t2.nii.gz",
                             t1_mask=tmp_path / "t1_mask.nii.gz", t2_mask=tmp_path / "t2_mask.nii.gz")])
    return tmp_path, m


def test_resample_is_exact_on_a_linear_function_of_world_coordinates():
    w1, w2 = world(S1, A1), world(S2, A2)
    out = resample(ramp(w2), A2, S1, A1)
    # every T1 voxel lies inside the T2 field of view (checked in T2 index space)
    idx2 = np.linalg.solve(A2[:3, :3], (w1 - A2[:3, 3]).reshape(-1, 3).T).T
    assert (idx2 >= 0).all() and (idx2 <= np.array(S2) - 1).all()
    np.testing.assert_allclose(out, ramp(w1), atol=1e-4)
    # outside the source field of view: 0
    far = affine((1.0, 1.0, 1.0), (500.0, 0, 0))
    assert not resample(ramp(w2), A2, (4, 4, 4), far).any()


def test_resample_mask_follows_the_world_ball():
    w1, w2 = world(S1, A1), world(S2, A2)
    out = resample(ball(w2), A2, S1, A1, mask=True)
    truth = ball(w1)
    assert set(np.unique(out)) <= {0.0, 1.0}
    # only voxels within one T2 voxel diagonal of the sphere surface may differ
    d = np.abs(np.linalg.norm(w1 - CENTRE, axis=-1) - RADIUS)
    diff = out != truth
    assert 2 * (out * truth).sum() / (out.sum() + truth.sum()) > 0.85
    assert (d[diff] < np.linalg.norm([2.0, 1.8, 4.5])).all()


def test_manifest_relative_paths_and_pair_on_the_t1_grid(pair_files):
    tmp, m = pair_files
    with open(m) as f:
        row = next(csv.DictReader(f))
    assert row["t1"] == "../t1.nii.gz"  # relative to the manifest's folder
    (case,) = read_manifest(m)
    assert case.t1 == (tmp / "list" / "../t1.nii.gz") and case.id == "a"
    p = load_pair(case)
    assert p.x1.shape == p.x2.shape == p.s1.shape == p.s2.shape == S1
    assert p.x1.min() == 0 and p.x1.max() == 1 and 0 <= p.x2.min() and p.x2.max() <= 1
    # T2 is 10 - ramp: normalised on its own grid, then resampled: anti-correlated with T1
    assert np.corrcoef(p.x1.ravel(), p.x2.ravel())[0, 1] < -0.95
    # the T2 ball was drawn 2 mm off along world x: on the T1 grid it is the shifted ball
    w1 = world(S1, A1)
    shifted = ball(w1, CENTRE + [2.0, 0, 0])
    assert 2 * (p.s2 * shifted).sum() / (p.s2.sum() + shifted.sum()) > 0.85
    assert 2 * (p.s2 * p.s1).sum() / (p.s2.sum() + p.s1.sum()) < 0.9  # and not the T1 ball
    assert p.s2_native.shape == S2


def test_normalise_clips_percentiles():
    x = np.linspace(0, 1, 1001).astype(np.float32)
    x[0], x[-1] = -100, 100
    y = normalise(x)
    assert y.min() == 0 and y.max() == 1
    lo, hi = np.percentile(x, (0.5, 99.5))
    np.testing.assert_allclose(y[500], (x[500] - lo) / (hi - lo), rtol=1e-6)
    assert not normalise(np.full(10, 3.0, np.float32)).any()


def test_dataset_protocol_3d_and_2d(pair_files):
    _, m = pair_files
    ds = PairDataset(m)
    assert len(ds) == 1
    item = ds[0]
    assert set(item) == {"x1", "x2", "s1", "s2"}
    for t in item.values():
        assert t.dtype == torch.float32 and t.shape == (1,) + S1
    ds2 = PairDataset(m, spatial_dims=2)
    assert len(ds2) == S1[2]
    torch.testing.assert_close(ds2[4]["x2"], item["x2"][..., 4])
    with pytest.raises(IndexError):
        ds[1]


def test_errors_name_the_file(pair_files, tmp_path):
    tmp, m = pair_files
    (case,) = read_manifest(m)

    def with_(**kw):
        c = read_manifest(m)[0]
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    with pytest.raises(VolumeError, match="nope.nii.gz: no such image file"):
        load_pair(with_(t2=tmp / "nope.nii.gz"))
    save(tmp / "four.nii.gz", np.zeros(S1 + (2,), np.float32), A1)
    with pytest.raises(VolumeError, match="four.nii.gz: expected a 3-D image.*4-D"):
        load_pair(with_(t1=tmp / "four.nii.gz"))
    save(tmp / "small.nii.gz", np.zeros((3, 3, 3), np.uint8), A1)
    with pytest.raises(VolumeError, match="small.nii.gz: mask shape .* does not match its image .*t1.nii.gz"):
        load_pair(with_(t1_mask=tmp / "small.nii.gz"))
    save(tmp / "moved.nii.gz", ball(world(S2, A2)), A2 + np.diag([0, 0, 0.01, 0]))
    with pytest.raises(VolumeError, match="moved.nii.gz: mask affine does not match its image .*t2.nii.gz"):
        load_pair(with_(t2_mask=tmp / "moved.nii.gz"))
    save(tmp / "empty.nii.gz", np.zeros(S2, np.uint8), A2)
    with pytest.raises(VolumeError, match="empty.nii.gz: mask is empty"):
        load_pair(with_(t2_mask=tmp / "empty.nii.gz"), nonempty_masks=True)
    assert not load_pair(with_(t2_mask=tmp / "empty.nii.gz")).s2.any()  # fine outside training
    with pytest.raises(VolumeError, match="no mask given"):
        load_pair(with_(t1_mask=None))
    with pytest.raises(VolumeError, match="no such manifest"):
        read_manifest(tmp / "none.csv")
    (tmp / "bad.csv").write_text("a,b\nx,y\n")
    with pytest.raises(VolumeError, match="bad.csv: manifest needs the columns"):
        read_manifest(tmp / "bad.csv")
    (tmp / "rows.csv").write_text("t1,t2,t1_mask,t2_mask\n")
    with pytest.raises(VolumeError, match="rows.csv: manifest has no rows"):
        read_manifest(tmp / "rows.csv")
    # an empty training mask surfaces through the dataset too
    bad = write_manifest(tmp / "e.csv", [dict(t1=case.t1, t2=case.t2, t1_mask=case.t1_mask,
                                               t2_mask=tmp / "empty.nii.gz")])
    with pytest.raises(VolumeError, match="empty.nii.gz: mask is empty"):
        PairDataset(bad)[0]
    assert not PairDataset(bad, split="test")[0]["s2"].any()
