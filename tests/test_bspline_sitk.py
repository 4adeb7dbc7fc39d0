"""Parity with SimpleITK: a cubic sitk.BSplineTransform resampled by sitk.Resample (linear
interpolation) equals warp(..., upsample="bspline") of the same image with the control points
of convert.bspline_from_sitk, in 2-D and 3-D, anisotropic spacing, any axis-permuting or
flipping direction (TorchIO's LPS images flip x and y) and an oblique one.

Where ITK and warp differ, and how the comparison takes it into account:
- ITK's inside test: a position outside [-0.5, S - 0.5) voxels along an axis gets ITK's default
  pixel value; inside it, its linear interpolator clamps to the voxel centres. That is
  warp(padding_mode="border") with the outside voxels set to the default (`itk_like` below).
- ITK works in physical space (mm, direction matrix) in float64: bspline_from_sitk maps the
  grid and the displacements to voxels exactly, so in float64 the two agree to ~1e-14
  (TOL[float64]); in float32 to TOL[float32] (positions rounded to float32).
- Index order: SimpleITK's sizes, spacings and parameters are x-first, the numpy array of
  sitk.GetArrayFromImage is (z, y, x), which is the spatial-axis order (d, h, w) of the result.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import coopseg_kernels as ck
from coopseg_kernels import convert, reference
from helpers import tol

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is an optional test dependency (pip install SimpleITK)")

DEFAULT = -3.0  # ITK's default pixel value in these tests, outside every image's range [0, 1)
_c, _s = np.cos(0.4), np.sin(0.4)
CASES = {
    # name: (size x-first, spacing, origin, direction or None, mesh size x-first)
    "3d-anisotropic": ((13, 11, 9), (0.7, 1.3, 2.1), (3.0, -5.0, 7.0), None, (4, 3, 2)),
    "3d-lps": ((13, 11, 9), (0.7, 1.3, 2.1), (3.0, -5.0, 7.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (4, 3, 2)),
    "3d-permuted": ((13, 11, 9), (0.7, 1.3, 2.1), (3.0, -5.0, 7.0), (0, 1, 0, 0, 0, -1, 1, 0, 0), (4, 3, 2)),
    "3d-oblique": ((13, 11, 9), (0.7, 1.3, 2.1), (3.0, -5.0, 7.0), (_c, -_s, 0, _s, _c, 0, 0, 0, 1), (4, 3, 2)),
    "2d-anisotropic": ((21, 17), (0.8, 1.7), (3.0, -5.0), None, (4, 6)),
    "2d-flipped": ((21, 17), (0.8, 1.7), (3.0, -5.0), (0, -1, 1, 0), (3, 5)),
}


def sitk_case(name: str, seed: int = 0):
    """(image as a sitk.Image, its array (z, y, x) float64, a BSplineTransform with random
    control-point displacements of up to 2 mm, sitk.Resample's linear output (z, y, x))."""
    size, spacing, origin, direction, mesh = CASES[name]
    rng = np.random.default_rng(seed)
    array = rng.random(size[::-1])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    transform = sitk.BSplineTransformInitializer(image, list(mesh))
    transform.SetParameters(rng.uniform(-2.0, 2.0, transform.GetNumberOfParameters()).tolist())
    out = sitk.Resample(image, image, transform, sitk.sitkLinear, DEFAULT, sitk.sitkFloat64)
    return image, array, transform, sitk.GetArrayFromImage(out)


def itk_like(warped: torch.Tensor, coarse, origin, spacing) -> torch.Tensor:
    """warp(padding_mode="border") output -> ITK's: DEFAULT where the position leaves
    [-0.5, S - 0.5) along some axis (the positions from reference.upsample_field, float64)."""
    size = warped.shape[2:]
    field = reference.upsample_field(coarse.double(), size, upsample="bspline", control_origin=origin,
                                     control_spacing=spacing)
    pos = convert.identity_positions(size, torch.float64).unsqueeze(0) + field
    n = torch.tensor(size, dtype=torch.float64).view(1, -1, *(1,) * len(size))
    outside = ((pos < -0.5) | (pos >= n - 0.5)).any(1, keepdim=True)
    return warped.masked_fill(outside, DEFAULT)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_sitk_resample(name):
    image, array, transform, expected = sitk_case(name)
    coarse, origin, spacing = convert.bspline_from_sitk(transform, image, dtype=torch.float64)
    assert coarse.shape[:2] == (1, array.ndim)
    assert sorted(coarse.shape[2:]) == sorted(n + 3 for n in CASES[name][4])  # permuted where the direction permutes
    moving = torch.from_numpy(array)[None, None]
    out = reference.warp(moving, coarse, padding_mode="border", upsample="bspline", control_origin=origin,
                         control_spacing=spacing)
    got = itk_like(out, coarse, origin, spacing)[0, 0]
    assert (got == DEFAULT).any() and (got != DEFAULT).any()  # both ITK regimes are exercised
    # oblique: the initializer computes the grid's direction from float32 corner points, so that grid
    # is oblique to the image's axes by ~1e-7, which bspline_from_sitk takes as aligned (tolerance
    # 1e-6 relative): positions differ by ~1e-7 voxel, samples by ~1e-7 times the image's slope
    bounds = dict(rtol=0, atol=1e-6) if "oblique" in name else tol(torch.float64)
    torch.testing.assert_close(got, torch.from_numpy(expected), **bounds)


@pytest.mark.parametrize("name", ["3d-lps", "2d-flipped"])
def test_kernels_match_sitk_resample(name, backend):
    """ck.warp (C++, interpreted Triton) of the converted grid: the same as ITK, float64."""
    image, array, transform, expected = sitk_case(name, seed=2)
    coarse, origin, spacing = convert.bspline_from_sitk(transform, image, dtype=torch.float64)
    moving = torch.from_numpy(array)[None, None]
    out = ck.warp(moving, coarse, padding_mode="border", upsample="bspline", control_origin=origin,
                  control_spacing=spacing, backend=backend)
    torch.testing.assert_close(itk_like(out, coarse, origin, spacing)[0, 0], torch.from_numpy(expected),
                               **tol(torch.float64))


@pytest.mark.parametrize("name", ["3d-lps", "2d-anisotropic"])
def test_float32_matches_sitk_resample(name):
    image, array, transform, expected = sitk_case(name, seed=1)
    coarse, origin, spacing = convert.bspline_from_sitk(transform, image)  # float32
    assert coarse.dtype == torch.float32
    moving = torch.from_numpy(array).float()[None, None]
    out = reference.warp(moving, coarse, padding_mode="border", upsample="bspline", control_origin=origin,
                         control_spacing=spacing)
    got = itk_like(out, coarse, origin, spacing)[0, 0]
    # a position within float32 rounding of ITK's inside boundary could land on the other side:
    # not the case for this seed (the comparison would show DEFAULT against a value)
    torch.testing.assert_close(got, torch.from_numpy(expected).float(), **tol(torch.float32))


@pytest.mark.parametrize("size, spacing, mesh", [((13, 11, 9), (0.7, 1.3, 2.1), (4, 3, 2)),
                                                 ((256, 256, 128), (1.0, 1.0, 1.0), (4, 4, 4)),
                                                 ((21, 17), (0.8, 1.7), (5, 1))])
def test_itk_geometry_matches_the_initializer(size, spacing, mesh):
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    transform = sitk.BSplineTransformInitializer(image, list(mesh))
    coarse, origin, spacing_v = convert.bspline_from_sitk(transform, image)
    want_origin, want_spacing = convert.itk_bspline_geometry(size[::-1], mesh[::-1])
    # the initializer computes the domain's corners in float32 (SimpleITK's point type): ~1e-7 relative
    np.testing.assert_allclose(origin, want_origin, rtol=0, atol=1e-6)
    np.testing.assert_allclose(spacing_v, want_spacing, rtol=1e-6)
    assert coarse.shape == (1, len(size), *convert.itk_num_control_points(mesh[::-1]))
    assert not coarse.any()
    # the domain [-0.625, S - 0.375]: one control point beyond each end
    for o, h, n, m in zip(want_origin, want_spacing, size[::-1], mesh[::-1]):
        assert o + h == pytest.approx(-0.625) and o + (m + 1) * h == pytest.approx(n - 0.375)


def test_mesh_size_convention():
    assert convert.itk_mesh_size((7, 7, 7)) == (4, 4, 4)  # TorchIO's default num_control_points
    assert convert.itk_num_control_points((4, 5)) == (7, 8)
    assert convert.itk_num_control_points(convert.itk_mesh_size((4, 9, 19))) == (4, 9, 19)
    with pytest.raises(ValueError, match="num_control_points must be >= 4"):
        convert.itk_mesh_size((3, 7))
    with pytest.raises(ValueError, match="mesh_size must be >= 1"):
        convert.itk_num_control_points((0, 2))
    with pytest.raises(TypeError, match="mesh_size must be a sequence of ints"):
        convert.itk_num_control_points(4)
    with pytest.raises(TypeError, match="size must be a sequence of ints"):
        convert.itk_bspline_geometry((4.5, 3), (1, 1))
    with pytest.raises(ValueError, match="mesh_size must have one entry per axis"):
        convert.itk_bspline_geometry((4, 3), (1, 1, 1))


def test_bspline_from_sitk_bad_inputs():
    image, _, transform, _ = sitk_case("3d-anisotropic")
    with pytest.raises(TypeError, match="transform must be a SimpleITK BSplineTransform, got a TranslationTransform"):
        convert.bspline_from_sitk(sitk.TranslationTransform(3), image)
    with pytest.raises(TypeError, match="transform must be a SimpleITK object"):
        convert.bspline_from_sitk("bspline", image)
    with pytest.raises(TypeError, match="image must be a SimpleITK object"):
        convert.bspline_from_sitk(transform, torch.zeros(3, 3, 3))
    image2d, _, transform2d, _ = sitk_case("2d-anisotropic")
    with pytest.raises(ValueError, match="transform is 2-D but image is 3-D"):
        convert.bspline_from_sitk(transform2d, image)
    quadratic = sitk.BSplineTransform(2, 2)
    with pytest.raises(ValueError, match="order 3"):
        convert.bspline_from_sitk(quadratic, image2d)
    # a grid rotated against the image's axes
    oblique = sitk.BSplineTransform(2, 3)
    oblique.SetTransformDomainOrigin((-20.0, -20.0))
    oblique.SetTransformDomainPhysicalDimensions((80.0, 80.0))
    oblique.SetTransformDomainMeshSize((3, 3))
    oblique.SetTransformDomainDirection((_c, -_s, _s, _c))
    with pytest.raises(ValueError, match="oblique to the image's voxel axes"):
        convert.bspline_from_sitk(oblique, image2d)
    # a domain that leaves part of the image out
    small = sitk.BSplineTransform(2, 3)
    small.SetTransformDomainOrigin((3.0, -5.0))
    small.SetTransformDomainPhysicalDimensions((4.0, 4.0))
    small.SetTransformDomainMeshSize((2, 2))
    with pytest.raises(ValueError, match="does not cover the image"):
        convert.bspline_from_sitk(small, image2d)


def test_warp_of_the_converted_grid_moves_like_itk():
    """A constant physical displacement (every control point the same vector) is a translation:
    ck.warp moves the array by that vector in voxels, mapped through the direction matrix."""
    size, spacing = (12, 10, 8), (0.5, 2.0, 1.0)
    image = sitk.Image(list(size), sitk.sitkFloat64)
    image.SetSpacing(spacing)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS
    transform = sitk.BSplineTransformInitializer(image, [2, 2, 2])
    n = transform.GetNumberOfParameters() // 3
    transform.SetParameters([1.0] * n + [-4.0] * n + [2.0] * n)  # mm along physical x, y, z
    coarse, _, _ = convert.bspline_from_sitk(transform, image, dtype=torch.float64)
    # voxel axes (z, y, x): z = +2 mm / 1.0, y = -(-4 mm) / 2.0, x = -(1 mm) / 0.5
    for k, v in enumerate((2.0, 2.0, -2.0)):
        torch.testing.assert_close(coarse[0, k], torch.full_like(coarse[0, k], v))
