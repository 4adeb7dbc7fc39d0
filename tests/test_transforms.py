"""coopseg.transforms against TorchIO's own elastic deformation: same control points, same
output (images linear, label maps nearest, each image's own affine, 2-D images, TorchIO's
default pixel value outside); the random transform draws what TorchIO draws; bad arguments."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

tio = pytest.importorskip("torchio", reason="torchio is an optional dependency (pip install torchio)")

from coopseg import transforms as T  # noqa: E402

# images in [0, 1): float32 rounding of the positions moves a linear sample by < 1e-5
IMAGE_TOL = dict(rtol=0, atol=2e-5)


def subject(shape=(13, 11, 9), seed=0, spacing=(0.7, 1.3, 2.1), affine=None):
    g = torch.Generator().manual_seed(seed)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = (4.0, -6.0, 3.0)
    image = tio.ScalarImage(tensor=torch.rand(2, *shape, generator=g) + 0.25, affine=affine)
    labels = tio.LabelMap(tensor=torch.randint(0, 5, (1, *shape), generator=g), affine=affine)
    # a second image with its own spacing (TorchIO deforms each image in its own mm)
    other = np.diag([1.1, 0.9, 1.6, 1.0])
    ct = tio.ScalarImage(tensor=torch.rand(1, *shape, generator=g, dtype=torch.float64), affine=other)
    return tio.Subject(t1=image, seg=labels, ct=ct)


def control_points(n=(7, 6, 5), scale=3.0, seed=1):
    return np.random.default_rng(seed).uniform(-scale, scale, (*n, 3))


def assert_same(got: tio.Subject, want: tio.Subject, nearest_labels: bool = True):
    """Images to IMAGE_TOL; label maps (nearest) equal: a position within float32 rounding of a
    half voxel could round the other way, which these seeds do not hit."""
    for name, image in want.get_images_dict(intensity_only=False).items():
        ours = got[name].data
        assert ours.dtype == image.data.dtype == torch.float32, name
        assert ours.shape == image.data.shape, name
        if isinstance(image, tio.LabelMap) and nearest_labels:
            assert torch.equal(ours, image.data), f"{name}: {int((ours != image.data).sum())} voxels differ"
        else:
            torch.testing.assert_close(ours, image.data, **IMAGE_TOL, msg=name)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_elastic_deformation_matches_torchio(backend):
    s = subject()
    cp = control_points()
    want = tio.ElasticDeformation(control_points=cp, max_displacement=(3, 3, 3))(s)
    got = T.ElasticDeformation(control_points=cp, max_displacement=(3, 3, 3), backend=backend)(s)
    # both of TorchIO's regimes occur: positions outside the image (the channel's minimum) and inside
    t1 = want.t1.data
    assert (t1 == s.t1.data.flatten(1).min(1).values.view(2, 1, 1, 1)).any() and (t1 > 0.25).any()
    assert_same(got, want)
    assert not torch.equal(got.t1.data, s.t1.data)  # copy=True: the input is untouched, the output moved


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_interpolations_and_inverse(interpolation):
    s = subject(seed=2)
    cp = control_points(seed=3)
    kw = dict(control_points=cp, max_displacement=(3, 3, 3), image_interpolation=interpolation,
              label_interpolation=interpolation)
    want = tio.ElasticDeformation(**kw)
    got = T.ElasticDeformation(**kw)
    assert_same(got(s), want(s), nearest_labels=interpolation == "nearest")
    # TorchIO's inverse: the control points negated
    assert_same(got.inverse()(s), want.inverse()(s), nearest_labels=interpolation == "nearest")


@pytest.mark.parametrize("affine", [
    np.array([[0, 1.2, 0, 1], [-0.8, 0, 0, 2], [0, 0, 1.5, 3], [0, 0, 0, 1]]),  # permuted, flipped axes
    np.array([[np.cos(0.3), -np.sin(0.3), 0, 0], [np.sin(0.3), np.cos(0.3), 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]),
], ids=["permuted", "oblique"])
def test_orientations_match_torchio(affine):
    s = subject(affine=affine, seed=4)
    cp = control_points(n=(6, 7, 5), seed=5)
    want = tio.ElasticDeformation(control_points=cp, max_displacement=(3, 3, 3))(s)
    assert_same(T.ElasticDeformation(control_points=cp, max_displacement=(3, 3, 3))(s), want)


def test_2d_image_matches_torchio():
    g = torch.Generator().manual_seed(6)
    s = tio.Subject(img=tio.ScalarImage(tensor=torch.rand(1, 31, 23, 1, generator=g), affine=np.diag([0.8, 1.4, 1, 1])),
                    seg=tio.LabelMap(tensor=torch.randint(0, 3, (1, 31, 23, 1), generator=g),
                                     affine=np.diag([0.8, 1.4, 1, 1])))
    cp = control_points(n=(7, 8, 4), seed=7)
    want = tio.ElasticDeformation(control_points=cp, max_displacement=(3, 3, 3))(s)
    assert_same(T.ElasticDeformation(control_points=cp, max_displacement=(3, 3, 3))(s), want)


def test_random_elastic_deformation_draws_like_torchio():
    s = subject(seed=8)
    kw = dict(num_control_points=(7, 6, 5), max_displacement=(2.0, 3.0, 1.5), locked_borders=1)
    torch.manual_seed(42)
    want = tio.RandomElasticDeformation(**kw)(s)
    torch.manual_seed(42)
    got = T.RandomElasticDeformation(**kw)(s)
    assert_same(got, want)
    torch.manual_seed(42)
    again = T.RandomElasticDeformation(**kw)(s)
    assert all(torch.equal(again[k].data, got[k].data) for k in ("t1", "seg", "ct"))  # reproducible with a seed
    # TorchIO's draws, as they are: U(-max, max) per axis, borders locked on the grid's first two axes
    assert T.RandomElasticDeformation.get_params is tio.RandomElasticDeformation.get_params
    torch.manual_seed(0)
    cp = T.RandomElasticDeformation.get_params((7, 6, 5), (2.0, 3.0, 1.5), 2)
    assert cp.shape == (7, 6, 5, 3) and (np.abs(cp) <= [2.0, 3.0, 1.5]).all()
    assert not cp[:2].any() and not cp[-2:].any() and not cp[:, :2].any() and not cp[:, -2:].any()


def test_composes_in_torchio():
    s = subject(seed=9)
    pipeline = tio.Compose([T.RandomElasticDeformation(max_displacement=2.0), tio.RandomFlip(axes=(0,), p=1.0)])
    out = pipeline(s)
    assert [t.name for t in out.history] == ["ElasticDeformation", "Flip"]
    assert out.t1.data.shape == s.t1.data.shape
    skipped = T.RandomElasticDeformation(p=0.0)(s)  # TorchIO's p, include/exclude, copy
    assert torch.equal(skipped.t1.data, s.t1.data)
    only_seg = T.ElasticDeformation(control_points=control_points(), max_displacement=3, include=["seg"])(s)
    assert torch.equal(only_seg.t1.data, s.t1.data) and not torch.equal(only_seg.seg.data, s.seg.data.float())
    unchanged = T.ElasticDeformation(control_points=control_points(), max_displacement=0)(copy.deepcopy(s))
    assert torch.equal(unchanged.t1.data, s.t1.data)  # max_displacement 0: TorchIO returns the subject


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_control_points=3), ValueError, "num_control_points must be >= 4"),
    (dict(num_control_points=(7, 7)), TypeError, "num_control_points must be an int or 3 ints"),
    (dict(num_control_points=7.5), TypeError, "num_control_points must be an int or 3 ints"),
    (dict(max_displacement=-1), ValueError, "max_displacement must be finite and >= 0"),
    (dict(max_displacement=(1, 2)), TypeError, "max_displacement must be a number or 3 numbers"),
    (dict(max_displacement=float("nan")), ValueError, "max_displacement must be finite"),
    (dict(locked_borders=3), ValueError, "locked_borders must be 0, 1 or 2"),
    (dict(locked_borders=2, num_control_points=(4, 7, 7)), ValueError, "locked_borders=2 with 4 control points"),
    (dict(image_interpolation="bspline"), ValueError, "image_interpolation must be one of"),
    (dict(label_interpolation="label_gaussian"), ValueError, "label_interpolation must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_random_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        T.RandomElasticDeformation(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(control_points=[[1.0]]), TypeError, "control_points must be a numpy array"),
    (dict(control_points=np.zeros((7, 7, 7, 2))), ValueError, r"control_points must have shape \(n_x, n_y, n_z, 3\)"),
    (dict(control_points=np.zeros((7, 3, 7, 3))), ValueError, "every n >= 4"),
    (dict(control_points=np.full((5, 5, 5, 3), np.nan)), ValueError, "control_points must be finite"),
    (dict(max_displacement="3"), TypeError, "max_displacement must be a number or 3 numbers"),
    (dict(image_interpolation="cosine"), ValueError, "image_interpolation must be one of"),
])
def test_elastic_bad_arguments(kwargs, error, match):
    args = dict(control_points=np.zeros((5, 5, 5, 3)), max_displacement=1.0) | kwargs
    with pytest.raises(error, match=match):
        T.ElasticDeformation(**args)


def test_flat_image_is_rejected():
    s = tio.Subject(img=tio.ScalarImage(tensor=torch.rand(1, 9, 1, 1)))
    with pytest.raises(ValueError, match="2 or 3 axes of size > 1"):
        T.ElasticDeformation(control_points=control_points(), max_displacement=3)(s)
