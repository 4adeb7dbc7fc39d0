"""CHAOS import on a tiny synthetic DICOM series with PNG masks and known geometry."""
import random

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from coopseg.cli import main
from coopseg.data.chaos import ChaosError, import_chaos, read_dicom_series
from coopseg.data.volumes import read_manifest
from test_chaos_geometry import oblique, write_slice  # one DICOM writer for both CHAOS test files

ROWS, COLS, N = 6, 5, 4
PIXEL = (0.8, 1.2)  # PixelSpacing: between rows, between columns


def pixel_value(k, r, c):
    return 100 * k + 10 * r + c + 7


def write_series(folder, row_dir, col_dir, origin, gap, prefix, seed):
    """N slices at origin + k * gap * normal; files written under shuffled names and order
    (each by test_chaos_geometry.write_slice, without SeriesInstanceUID or EchoTime)."""
    folder.mkdir(parents=True)
    normal = np.cross(row_dir, col_dir)
    order = list(range(N))
    random.Random(seed).shuffle(order)
    for n, k in enumerate(order):
        arr = np.array([[pixel_value(k, r, c) for c in range(COLS)] for r in range(ROWS)], np.uint16)
        write_slice(folder / f"{prefix}{n:03d}.dcm", origin + k * gap * normal, k, row=row_dir, col=col_dir,
                    uid=None, echo=None, pixels=arr, rows=ROWS, cols=COLS, spacing=PIXEL,
                    SliceThickness=gap, InstanceNumber=n + 1)


def png_slice(k):
    """Grey levels of the CHAOS masks: 63 liver, 126/189/252 other organs, 55 and 70 the bounds."""
    png = np.zeros((ROWS, COLS), np.uint8)
    png[1:4, 1 + (k % 2):4] = 63
    png[0, 0] = 70            # liver (upper bound included)
    png[5, 4] = 55            # not liver (lower bound excluded)
    png[4, 0:2] = 126
    png[2, 4] = 252
    png[5, k] = 63            # a pixel that tells the slices apart
    return png


def write_ground(folder, first_number):
    folder.mkdir(parents=True)
    # numbers with different widths so a string sort would be wrong: ..., 9, 10, 11
    for k in range(N):
        Image.fromarray(png_slice(k)).save(folder / f"IMG-0004-{first_number + k}.png")


@pytest.fixture
def chaos(tmp_path):
    row, col = oblique()
    p = tmp_path / "CHAOS" / "MR" / "3"
    write_series(p / "T1DUAL" / "DICOM_anon" / "InPhase", row, col, np.array([-40.0, 12.5, 80.0]), 3.0, "a", 1)
    write_ground(p / "T1DUAL" / "Ground", 8)
    # T2: axial, another origin and gap
    write_series(p / "T2SPIR" / "DICOM_anon", np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                 np.array([-30.0, 5.0, 70.0]), 4.5, "b", 2)
    write_ground(p / "T2SPIR" / "Ground", 1)
    return tmp_path


def dicom_world_ras(path, r, c):
    """World coordinate of pixel (row r, column c) of one DICOM file, from its tags, in RAS."""
    ds = pydicom.dcmread(str(path))
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.array(ds.ImagePositionPatient, float) + c * dc * iop[:3] + r * dr * iop[3:]
    return lps * [-1, -1, 1]


@pytest.mark.parametrize("series", ["T1DUAL/DICOM_anon/InPhase", "T2SPIR/DICOM_anon"])
def test_affine_maps_indices_to_the_dicom_world(chaos, series):
    folder = chaos / "CHAOS" / "MR" / "3" / series
    volume, affine = read_dicom_series(folder)
    assert volume.shape == (COLS, ROWS, N)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(str(f))
        stored = ds.pixel_array
        k = int((stored[0, 0] - 7) // 100)  # which slice of the synthetic stack this file is
        for r in range(ROWS):
            for c in range(COLS):
                # the voxel's world coordinate from the DICOM tags = the affine applied to its index
                np.testing.assert_allclose(affine @ [c, r, k, 1], np.append(dicom_world_ras(f, r, c), 1), atol=1e-4)
                assert volume[c, r, k] == 2.0 * pixel_value(k, r, c) - 5.0  # rescaled


def test_import_writes_nifti_masks_and_manifest(chaos, capsys):
    assert main(["import-chaos", str(chaos / "CHAOS"), str(chaos / "out")]) == 0
    assert "manifest.csv" in capsys.readouterr().out
    (case,) = read_manifest(chaos / "out" / "manifest.csv")
    assert case.id == "3" and case.t1 == chaos / "out" / "3" / "t1.nii.gz"
    for img, mask, series in ((case.t1, case.t1_mask, "T1DUAL/DICOM_anon/InPhase"),
                              (case.t2, case.t2_mask, "T2SPIR/DICOM_anon")):
        i, m = nib.load(str(img)), nib.load(str(mask))
        np.testing.assert_allclose(i.affine, m.affine)
        np.testing.assert_allclose(i.affine, read_dicom_series(chaos / "CHAOS" / "MR" / "3" / series)[1], atol=1e-5)
        assert int(i.header["sform_code"]) == 1
        data, md = np.asarray(i.dataobj), np.asarray(m.dataobj)
        assert data.shape == md.shape == (COLS, ROWS, N)
        for k in range(N):
            # the k-th PNG by number goes with the k-th slice along the normal
            expected = (png_slice(k) > 55) & (png_slice(k) <= 70)
            np.testing.assert_array_equal(md[..., k], expected.T)
            assert data[2, 3, k] == 2 * pixel_value(k, 3, 2) - 5


def test_errors(chaos, capsys):
    g = chaos / "CHAOS" / "MR" / "3" / "T2SPIR" / "Ground"
    next(iter(sorted(g.glob("*.png")))).unlink()
    with pytest.raises(ChaosError, match=r"T2SPIR/Ground: 3 PNG masks for 4 DICOM slices"):
        import_chaos(chaos / "CHAOS", chaos / "out")
    assert main(["import-chaos", str(chaos / "CHAOS"), str(chaos / "out")]) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "error" in ln]  # tqdm's bar shares stderr
    assert line.startswith("coopseg: error: ") and "3 PNG masks for 4" in line and "Traceback" not in err
    Image.fromarray(np.zeros((ROWS, COLS), np.uint8)).save(g / "mask.png")
    with pytest.raises(ChaosError, match="mask.png: cannot order the mask slices"):
        import_chaos(chaos / "CHAOS", chaos / "out")
    (g / "mask.png").unlink()
    Image.fromarray(np.zeros((COLS, ROWS), np.uint8)).save(g / "IMG-0004-1.png")
    with pytest.raises(ChaosError, match="IMG-0004-1.png: mask is 5x6"):
        import_chaos(chaos / "CHAOS", chaos / "out")
    with pytest.raises(ChaosError, match="nowhere: no such folder"):
        import_chaos(chaos / "nowhere", chaos / "out")
    with pytest.raises(ChaosError, match="MR/3: one patient's folder; give the folder that holds the patient"):
        import_chaos(chaos / "CHAOS" / "MR" / "3", chaos / "out")
    # uneven slice spacing
    t1 = chaos / "CHAOS" / "MR" / "3" / "T1DUAL" / "DICOM_anon" / "InPhase"
    f = sorted(t1.glob("*.dcm"))[0]
    ds = pydicom.dcmread(str(f))
    ds.ImagePositionPatient = [float(v) + 0.7 for v in ds.ImagePositionPatient]
    ds.save_as(str(f))
    with pytest.raises(ChaosError, match="unevenly spaced"):
        read_dicom_series(t1)
    for f in t1.glob("*.dcm"):
        f.unlink()
    with pytest.raises(ChaosError, match="InPhase: no .dcm files"):
        read_dicom_series(t1)
