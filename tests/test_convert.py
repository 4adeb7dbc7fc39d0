import pytest
import torch
import torch.nn.functional as F

from coopseg_kernels import convert


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(5, 7), (4, 6, 9)])
def test_round_trip(size, align_corners):
    field = torch.randn(2, len(size), *size, dtype=torch.float64) * 3
    grid = convert.field_to_grid(field, align_corners=align_corners)
    assert grid.shape == (2, *size, len(size))
    back = convert.grid_to_field(grid, align_corners=align_corners)
    torch.testing.assert_close(back, field, rtol=0, atol=1e-12)


@pytest.mark.parametrize("align_corners", [True, False])
def test_formula_written_out(align_corners):
    # voxel (d, h, w) displaced by u samples grid_sample's normalised (x, y, z)
    size = (3, 4, 5)
    field = torch.randn(1, 3, *size, dtype=torch.float64)
    grid = convert.field_to_grid(field, align_corners=align_corners)
    d, h, w = 2, 1, 3
    p = torch.tensor([d, h, w], dtype=torch.float64) + field[0, :, d, h, w]
    n = torch.tensor(size, dtype=torch.float64)
    g = 2 * p / (n - 1) - 1 if align_corners else (2 * p + 1) / n - 1
    torch.testing.assert_close(grid[0, d, h, w], g.flip(0))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("nd", [2, 3])
def test_integer_shift_against_grid_sample(nd, align_corners):
    # A constant integer displacement samples the image shifted by that many voxels.
    size = (6, 7, 8)[-nd:]
    img = torch.rand(2, 3, *size, dtype=torch.float64)
    shift = (1, -2, 3)[-nd:]
    field = torch.empty(2, nd, *size, dtype=torch.float64)
    for k, s in enumerate(shift):
        field[:, k] = s
    grid = convert.field_to_grid(field, align_corners=align_corners)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    expected = torch.zeros_like(img)
    src = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, size))
    dst = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(shift, size))
    expected[(..., *dst)] = img[(..., *src)]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="field must have 3 channels"):
        convert.field_to_grid(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="grid must be"):
        convert.grid_to_field(torch.zeros(1, 4, 4, 3))
    with pytest.raises(TypeError, match="floating"):
        convert.field_to_grid(torch.zeros(1, 2, 4, 4, dtype=torch.int64))
