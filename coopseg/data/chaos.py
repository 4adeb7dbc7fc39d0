"""The CHAOS MR data (DICOM series + PNG masks) as NIfTI pairs and a manifest
(``coopseg import-chaos DIR OUT``).

Layout read (DIR, or DIR/MR)::

    <id>/T1DUAL/DICOM_anon/InPhase/*.dcm    <id>/T1DUAL/Ground/*.png
    <id>/T2SPIR/DICOM_anon/*.dcm            <id>/T2SPIR/Ground/*.png

Written: ``OUT/<id>/{t1,t2,t1_mask,t2_mask}.nii.gz`` and ``OUT/manifest.csv`` (paths
relative to it). A patient without a Ground folder (the CHAOS test set) gets no masks
and empty mask columns.

Geometry. The slices of a series are sorted by their position along the slice normal
``n = row_dir x col_dir`` (``ImageOrientationPatient`` = row_dir, col_dir; the position
is ``ImagePositionPatient . n``); they must share orientation, pixel spacing and size
and be evenly spaced (1 % tolerance). NIfTI voxel ``(i, j, k)`` is DICOM column ``i``,
row ``j`` of the k-th slice in that order, so in DICOM's LPS patient coordinates

    x_LPS = IPP_0 + i * PixelSpacing[1] * row_dir + j * PixelSpacing[0] * col_dir + k * step,

with ``step = (IPP_last - IPP_0) / (N - 1)``; the NIfTI affine is that map with its x
and y rows negated (LPS -> RAS). Intensities are ``RescaleSlope * stored +
RescaleIntercept`` when those tags exist.

Masks. Liver = PNG values in (55, 70] (the CHAOS grey level 63). The PNGs of a series
are ordered by the number after the last ``-`` in their names and matched one-to-one,
in that order, to the slices sorted by position (the counts must agree). Orientation:
a PNG is read as ``png[row, column]`` with the DICOM slice's rows and columns (no flip
or transpose; the CHAOS masks are drawn on the slice as displayed), so the mask voxel
``(i, j, k)`` is ``png_k[j, i]`` and the mask gets exactly the image's affine.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .volumes import VolumeError, write_manifest

LIVER_RANGE = (55, 70)  # PNG grey levels (lo, hi]: liver
SPACING_RTOL = 0.01
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ChaosError(VolumeError):
    """A problem with the CHAOS folder; the message names the file or folder."""


def _pydicom():
    try:  # lazy on purpose: pydicom is an optional dependency (the "io" extra)
        import pydicom
    except ImportError:  # pragma: no cover - in the "io" extra
        raise ImportError("import-chaos needs pydicom and pillow: pip install 'coopseg[io]'") from None
    return pydicom


def read_dicom_series(folder) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 (columns, rows, slices), RAS affine) of the ``*.dcm`` files of a folder."""
    pydicom = _pydicom()
    folder = Path(folder)
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise ChaosError(f"{folder}: no .dcm files")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            spacing = tuple(float(v) for v in ds.PixelSpacing)
            pixels = ds.pixel_array.astype(np.float64)
        except AttributeError as exc:
            raise ChaosError(f"{f}: missing DICOM geometry tag ({exc})") from None
        except Exception as exc:  # pydicom raises several types for unreadable files
            raise ChaosError(f"{f}: cannot read as DICOM ({exc})") from None
        if pixels.ndim != 2:
            raise ChaosError(f"{f}: expected one 2-D slice per file, got pixel array {pixels.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        slices.append(dict(file=f, iop=iop, ipp=ipp, spacing=spacing, pixels=pixels * slope + intercept))
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s["iop"], first["iop"], atol=1e-4):
            raise ChaosError(f"{s['file']}: ImageOrientationPatient differs from {first['file']}")
        if not np.allclose(s["spacing"], first["spacing"], rtol=1e-4):
            raise ChaosError(f"{s['file']}: PixelSpacing differs from {first['file']}")
        if s["pixels"].shape != first["pixels"].shape:
            raise ChaosError(f"{s['file']}: slice size {s['pixels'].shape} differs from {first['file']}")
    row_dir, col_dir = first["iop"][:3], first["iop"][3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(s["ipp"] @ normal))
    pos = np.array([s["ipp"] @ normal for s in slices])
    if len(slices) > 1:
        gaps = np.diff(pos)
        if gaps.min() <= 1e-6:
            dup = slices[int(np.argmin(gaps)) + 1]["file"]
            raise ChaosError(f"{dup}: two slices of {folder} at the same position")
        if np.ptp(gaps) > SPACING_RTOL * gaps.mean():
            raise ChaosError(f"{folder}: slices are unevenly spaced ({gaps.min():.3f} to {gaps.max():.3f} mm)")
        step = (slices[-1]["ipp"] - slices[0]["ipp"]) / (len(slices) - 1)
    else:
        step = normal * float(getattr(pydicom.dcmread(str(first["file"]), stop_before_pixels=True),
                                      "SliceThickness", 1.0) or 1.0)
    dr, dc = first["spacing"]  # PixelSpacing = (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc   # i: column index, moves along the row direction
    lps[:3, 1] = col_dir * dr   # j: row index
    lps[:3, 2] = step
    lps[:3, 3] = slices[0]["ipp"]
    volume = np.stack([s["pixels"].T for s in slices], axis=-1).astype(np.float32)
    return volume, LPS_TO_RAS @ lps


def _png_number(path: Path) -> int:
    m = re.search(r"-(\d+)$", path.stem)
    if not m:
        raise ChaosError(f"{path}: cannot order the mask slices: expected a name ending in '-<number>.png'")
    return int(m.group(1))


def read_png_masks(folder, shape) -> np.ndarray:
    """Liver mask (uint8, ``shape`` = (columns, rows, slices)) from the PNGs of a folder,
    ordered by the number after the last '-' and stacked as the sorted DICOM slices."""
    from PIL import Image  # lazy on purpose: pillow is an optional dependency (the "io" extra)

    folder = Path(folder)
    pngs = sorted(folder.glob("*.png"), key=_png_number)
    if len(pngs) != shape[2]:
        raise ChaosError(f"{folder}: {len(pngs)} PNG masks for {shape[2]} DICOM slices")
    out = np.zeros(shape, np.uint8)
    lo, hi = LIVER_RANGE
    for k, p in enumerate(pngs):
        try:
            png = np.asarray(Image.open(p))
        except Exception as exc:
            raise ChaosError(f"{p}: cannot read as PNG ({exc})") from None
        if png.ndim == 3:  # a grey image saved as RGB(A): the first channel
            png = png[..., 0]
        if png.shape != (shape[1], shape[0]):
            raise ChaosError(f"{p}: mask is {png.shape[0]}x{png.shape[1]} (rows x columns), "
                             f"the DICOM slices are {shape[1]}x{shape[0]}")
        out[..., k] = ((png > lo) & (png <= hi)).T
    return out


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib  # lazy on purpose: nibabel is an optional dependency (the "io" extra)

    if data.dtype != np.uint8 and np.all(data == np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def find_patients(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise ChaosError(f"{root}: no such folder")
    base = root / "MR" if (root / "MR").is_dir() else root
    patients = sorted((p for p in base.iterdir() if p.is_dir() and (p / "T1DUAL").is_dir()),
                      key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    if not patients:
        raise ChaosError(f"{base}: no patient folders (expected <id>/T1DUAL and <id>/T2SPIR)")
    return patients


def import_patient(patient: Path, out: Path) -> dict:
    """Convert one patient folder; returns its manifest row."""
    series = {"t1": (patient / "T1DUAL" / "DICOM_anon" / "InPhase", patient / "T1DUAL" / "Ground"),
              "t2": (patient / "T2SPIR" / "DICOM_anon", patient / "T2SPIR" / "Ground")}
    row = {"id": patient.name}
    for name, (dcm, ground) in series.items():
        if not dcm.is_dir():
            raise ChaosError(f"{dcm}: no such folder")
        volume, affine = read_dicom_series(dcm)
        row[name] = _save(out / patient.name / f"{name}.nii.gz", volume, affine)
        if ground.is_dir():
            mask = read_png_masks(ground, volume.shape)
            row[f"{name}_mask"] = _save(out / patient.name / f"{name}_mask.nii.gz", mask, affine)
        else:
            row[f"{name}_mask"] = ""
    return row


def import_chaos(root, out) -> Path:
    """Convert every patient of a CHAOS MR folder; returns the manifest path."""
    out = Path(out)
    patients = find_patients(root)
    rows = []
    with tqdm(patients, desc="import-chaos", unit="patient") as bar:  # closed before an error is printed
        for p in bar:
            rows.append(import_patient(p, out))
    return write_manifest(out / "manifest.csv", rows)
