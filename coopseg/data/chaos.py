"""The CHAOS MR data (DICOM series + PNG masks) as NIfTI pairs and a manifest
(``coopseg import-chaos DIR OUT``).

Layout read (DIR, or DIR/MR)::

    <id>/T1DUAL/DICOM_anon/InPhase/*.dcm    <id>/T1DUAL/Ground/*.png
    <id>/T2SPIR/DICOM_anon/*.dcm            <id>/T2SPIR/Ground/*.png

Written: ``OUT/<id>/{t1,t2,t1_mask,t2_mask}.nii.gz`` and ``OUT/manifest.csv`` (paths
relative to it). A patient without a Ground folder (the CHAOS test set) gets no masks
and empty mask columns. A numbered folder, or one with a T1DUAL or T2SPIR folder, is a
patient and must have both; OUT may not be (inside) a patient folder or DIR[/MR] itself.

Geometry. The ``.dcm`` files of a folder (any case; macOS's ``._`` files skipped) must be
one series: one SeriesInstanceUID (of the files that carry one, unless every file has its
own, as anonymisers write), one
EchoTime, ImageOrientationPatient (orthonormal row_dir, col_dir), PixelSpacing and
Rows x Columns. The slices are sorted by their position along the slice normal
``n = row_dir x col_dir`` (``p = (IPP - IPP_0) . n``) and must form one evenly spaced stack
along ``n``: with ``s = (p_last - p_0) / (N - 1)``, every slice's ImagePositionPatient is
within ``TOL = 0.1`` voxel of ``IPP_0 + k s n`` along each axis (0.1 pixel along the rows
and the columns, 0.1 s along the normal); two slices closer than ``0.1 s`` are duplicates.
NIfTI voxel ``(i, j, k)`` is DICOM column ``i``, row ``j`` of the k-th slice in that
order, so in DICOM's LPS patient coordinates

    x_LPS = IPP_0 + i * PixelSpacing[1] * row_dir + j * PixelSpacing[0] * col_dir + k * s * n

and the NIfTI affine is that map with its x and y rows negated (LPS -> RAS): orthogonal,
so the qform holds it exactly, like the sform. A single slice takes ``s`` from
SpacingBetweenSlices, else SliceThickness. Intensities are ``RescaleSlope * stored +
RescaleIntercept`` when those tags exist.

Masks. Grey PNGs (8-bit, or 16-bit with values <= 255); liver = values in (55, 70] (the
CHAOS grey level 63; 126, 189, 252 are other organs). A series whose masks hold non-zero
values but no liver at all is refused, and so is a PNG whose non-zero values are none of
the CHAOS labels (0/1 or bilevel masks). Matching to the slices: when every PNG is named
after a DICOM file of the series (same stem, as in CHAOS: IMG-0004-00002.png for
IMG-0004-00002.dcm), by name, whatever the order of the file numbers along the normal (some
PNGs named so and others not is refused). Otherwise the PNGs are ordered by the
number their names end in and matched one-to-one, in that order, to the slices sorted by
position (the counts must agree); when those numbers are exactly the numbers the DICOM
names end in (``liver_GT_001.png`` for ``IMG-0004-00001.dcm``), that matching must pair
equal numbers, else the folder is refused naming both files. Orientation: a PNG is read as
``png[row, column]`` with the DICOM slice's rows and columns (no flip or transpose; the
CHAOS masks are drawn on the slice as displayed), so the mask voxel ``(i, j, k)`` is
``png_k[j, i]`` and the mask gets exactly the image's affine.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .volumes import VolumeError, write_manifest

LIVER_RANGE = (55, 70)  # PNG grey levels (lo, hi]: liver
LABEL_RANGES = (LIVER_RANGE, (110, 135), (175, 200), (240, 255))  # liver, right and left kidney, spleen
TOL = 0.1  # voxels: how far a slice's ImagePositionPatient may lie from where the affine puts it
ORTHO_TOL = 1e-3  # ImageOrientationPatient: unit length and orthogonality
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SERIES = ("T1DUAL", "T2SPIR")
APPLEDOUBLE = b"\x00\x05\x16\x07"  # the "._name" files macOS writes beside every file in a zip


class ChaosError(VolumeError):
    """A problem with the CHAOS folder; the message names the file or folder."""


def _pydicom():
    try:  # lazy on purpose: pydicom is an optional dependency (the "io" extra)
        import pydicom
    except ImportError:
        raise ChaosError("import-chaos needs pydicom, pillow and nibabel: pip install 'coopseg[io]'") from None
    return pydicom


def _pil_image():
    try:  # lazy on purpose: pillow is an optional dependency (the "io" extra)
        from PIL import Image
    except ImportError:
        raise ChaosError("import-chaos needs pydicom, pillow and nibabel: pip install 'coopseg[io]'") from None
    return Image


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pydicom's decoder errors span several)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _is_appledouble(path: Path) -> bool:
    if not path.name.startswith("._"):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == APPLEDOUBLE
    except OSError:
        return False


def _files(folder: Path, suffix: str) -> list[Path]:
    """The files of a folder whose name ends in ``suffix`` (any case), without macOS's ._ files."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise ChaosError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    return [p for p in entries if p.suffix.lower() == suffix and not p.is_dir() and not _is_appledouble(p)]


def _numbers(ds, f: Path, keyword: str, count: int) -> np.ndarray:
    """The ``count`` finite numbers of a DICOM tag, or a ChaosError naming the file and tag."""
    value = ds.get(keyword)
    if value is None or (not isinstance(value, (int, float)) and len(value) == 0):
        raise ChaosError(f"{f}: no {keyword} tag (or an empty one)")
    items = [value] if isinstance(value, (int, float, str)) else list(value)
    try:
        out = np.array([float(v) for v in items])
    except (TypeError, ValueError):
        raise ChaosError(f"{f}: {keyword} {list(map(str, items))} is not {count} numbers") from None
    if out.size != count or not np.all(np.isfinite(out)):
        raise ChaosError(f"{f}: {keyword} {list(map(str, items))} is not {count} finite numbers")
    return out


def _optional_number(ds, f: Path, keyword: str):
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ChaosError(f"{f}: {keyword} {value!r} is not a number") from None
    if not np.isfinite(out):
        raise ChaosError(f"{f}: {keyword} {value!r} is not a finite number")
    return out


def _read_slice(f: Path) -> dict:
    pydicom = _pydicom()
    with warnings.catch_warnings():  # pydicom warns about odd values; the checks below name them
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as exc:  # pydicom raises several types for unreadable files
            raise ChaosError(f"{f}: cannot read as DICOM ({_one_line(exc)})") from None
        iop = _numbers(ds, f, "ImageOrientationPatient", 6)
        ipp = _numbers(ds, f, "ImagePositionPatient", 3)
        spacing = _numbers(ds, f, "PixelSpacing", 2)
        if np.any(spacing <= 0):
            raise ChaosError(f"{f}: PixelSpacing {spacing.tolist()} is not positive")
        row, col = iop[:3], iop[3:]
        if (abs(np.linalg.norm(row) - 1) > ORTHO_TOL or abs(np.linalg.norm(col) - 1) > ORTHO_TOL
                or abs(row @ col) > ORTHO_TOL):
            raise ChaosError(f"{f}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
        slope = _optional_number(ds, f, "RescaleSlope")
        intercept = _optional_number(ds, f, "RescaleIntercept")
        if slope == 0:
            raise ChaosError(f"{f}: RescaleSlope is 0")
        if "PixelData" not in ds:
            raise ChaosError(f"{f}: no pixel data")
        try:
            pixels = ds.pixel_array.astype(np.float64)
        except Exception as exc:  # no decoder for a compressed transfer syntax, truncated data, ...
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            what = f" (transfer syntax {ts.name}, {ts})" if ts is not None else ""
            raise ChaosError(f"{f}: cannot decode the pixel data{what}: {_one_line(exc)}") from None
        if pixels.ndim != 2:
            raise ChaosError(f"{f}: expected one 2-D grey slice per file, got pixel array {pixels.shape}")
        uid = ds.get("SeriesInstanceUID")
        return dict(file=f, iop=iop, ipp=ipp, spacing=spacing, uid=str(uid) if uid else None,
                    echo=_optional_number(ds, f, "EchoTime"),
                    gap=_optional_number(ds, f, "SpacingBetweenSlices") or _optional_number(ds, f, "SliceThickness"),
                    pixels=pixels * (1.0 if slope is None else slope) + (intercept or 0.0))


def _check_one_series(folder: Path, slices: list[dict]) -> None:
    """One SeriesInstanceUID, EchoTime, orientation, pixel spacing and size in the folder."""
    uids = [s["uid"] for s in slices if s["uid"]]
    if len(set(uids)) > 1 and len(set(uids)) < len(uids):  # not the one-UID-per-file of anonymisers
        common = max(dict.fromkeys(uids), key=uids.count)  # ties: the first file's
        ref = next(s for s in slices if s["uid"] == common)
        odd = next(s for s in slices if s["uid"] and s["uid"] != common)
        raise ChaosError(f"{odd['file']}: SeriesInstanceUID {odd['uid']} differs from {ref['file'].name}'s "
                         f"{common}: two series in {folder}")
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s["iop"], first["iop"], atol=1e-4):
            raise ChaosError(f"{s['file']}: ImageOrientationPatient {s['iop'].tolist()} differs from "
                             f"{first['file'].name}'s {first['iop'].tolist()}")
        if not np.allclose(s["spacing"], first["spacing"], rtol=1e-4):
            raise ChaosError(f"{s['file']}: PixelSpacing {s['spacing'].tolist()} differs from "
                             f"{first['file'].name}'s {first['spacing'].tolist()}")
        if s["pixels"].shape != first["pixels"].shape:
            raise ChaosError(f"{s['file']}: slice size {s['pixels'].shape} (rows x columns) differs from "
                             f"{first['file'].name}'s {first['pixels'].shape}")
        if s["echo"] is not None and first["echo"] is not None and not np.isclose(s["echo"], first["echo"], rtol=1e-3):
            raise ChaosError(f"{s['file']}: EchoTime {s['echo']:g} differs from {first['file'].name}'s "
                             f"{first['echo']:g}: two echoes in {folder} (in-phase and out-phase?)")


def _stack_step(folder: Path, slices: list[dict], normal: np.ndarray) -> float:
    """Sort ``slices`` along the normal in place and check they form one evenly spaced stack
    along it (TOL voxel); returns the slice spacing s (mm)."""
    ipp0 = min(slices, key=lambda s: (float(s["ipp"] @ normal), s["file"].name))["ipp"]
    for s in slices:
        s["pos"] = float((s["ipp"] - ipp0) @ normal)
    slices.sort(key=lambda s: (s["pos"], s["file"].name))
    first, n = slices[0], len(slices)
    if n == 1:
        if not first["gap"] or first["gap"] <= 0:
            raise ChaosError(f"{first['file']}: the only slice of {folder}, without a positive SpacingBetweenSlices "
                             "or SliceThickness to give the volume its slice spacing")
        return first["gap"]
    step = slices[-1]["pos"] / (n - 1)
    for a, b in zip(slices, slices[1:]):
        if b["pos"] - a["pos"] <= TOL * step:
            raise ChaosError(f"{b['file']}: at the position of {a['file'].name} along the slice normal "
                             f"({a['pos']:.3f} and {b['pos']:.3f} mm): two slices at one position in {folder}")
    row, col = first["iop"][:3], first["iop"][3:]
    dr, dc = first["spacing"]
    for k, s in enumerate(slices):
        off = s["ipp"] - (ipp0 + k * step * normal)
        along_rows, along_cols = abs(off @ row), abs(off @ col)
        if along_rows > TOL * dc or along_cols > TOL * dr:
            raise ChaosError(
                f"{s['file']}: ImagePositionPatient {s['ipp'].tolist()} is {np.hypot(along_rows, along_cols):.3g} mm "
                f"off the line through {first['file'].name}'s along the slice normal (tolerance {TOL} pixel = "
                f"{TOL * dc:.3g} x {TOL * dr:.3g} mm): the slices of {folder} are not one stack along the normal "
                "(two series in one folder?)")
        if abs(off @ normal) > TOL * step:
            gaps = np.diff([s["pos"] for s in slices])
            usual = float(np.median(gaps))
            j = int(np.argmax(np.abs(gaps - usual)))
            raise ChaosError(
                f"{slices[j + 1]['file']}: {gaps[j]:.3f} mm after {slices[j]['file'].name} along the slice normal, "
                f"where the slices of {folder} are {usual:.3f} mm apart: unevenly spaced (a missing or extra slice?; "
                f"tolerance: every slice within {TOL} slice of an even stack, here {s['file'].name} is "
                f"{off @ normal:+.3g} mm off)")
    return step


def read_dicom_slices(folder) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(volume float32 (columns, rows, slices), RAS affine, the files in slice order) of the
    ``*.dcm`` files of a folder; ChaosError naming the file when they are not one series
    stacked evenly along the slice normal (see the module docstring)."""
    folder = Path(folder)
    files = _files(folder, ".dcm")
    if not files:
        raise ChaosError(f"{folder}: no .dcm files")
    slices = [_read_slice(f) for f in files]
    _check_one_series(folder, slices)
    row_dir, col_dir = slices[0]["iop"][:3], slices[0]["iop"][3:]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    step = _stack_step(folder, slices, normal)
    dr, dc = slices[0]["spacing"]  # PixelSpacing = (between rows, between columns)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc   # i: column index, moves along the row direction
    lps[:3, 1] = col_dir * dr   # j: row index
    lps[:3, 2] = normal * step
    lps[:3, 3] = slices[0]["ipp"]
    volume = np.stack([s["pixels"].T for s in slices], axis=-1).astype(np.float32)
    return volume, LPS_TO_RAS @ lps, [s["file"] for s in slices]


def read_dicom_series(folder) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 (columns, rows, slices), RAS affine) of the ``*.dcm`` files of a folder."""
    volume, affine, _ = read_dicom_slices(folder)
    return volume, affine


def _trailing_number(path: Path):
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def _match_masks(folder: Path, pngs: list[Path], dicoms: list[Path] | None, n: int) -> list[Path]:
    """The PNGs in slice order (``dicoms``: the DICOM files in slice order, when known; ``n``
    slices): by name when every PNG is named after a slice, else by rank (module docstring)."""
    if dicoms is not None:
        stems = {d.stem for d in dicoms}
        named = [p for p in pngs if p.stem in stems]
        if named and len(named) == len(pngs):
            if len(pngs) != n:
                raise ChaosError(f"{folder}: {len(pngs)} PNG masks for {n} DICOM slices")
            by_stem = {p.stem: p for p in pngs}
            return [by_stem[d.stem] for d in dicoms]
        if named:
            odd = next(p for p in pngs if p not in named)
            raise ChaosError(f"{odd}: no DICOM slice named {odd.stem}.dcm in {dicoms[0].parent}, while "
                             f"{named[0].name} is named after one: cannot tell which slice each mask belongs to")
    numbers = [_trailing_number(p) for p in pngs]
    for p, num in zip(pngs, numbers):
        if num is None:
            raise ChaosError(f"{p}: cannot order the mask slices: expected a name ending in a number "
                             "(IMG-0004-00002.png) or the name of its DICOM file")
    order = sorted(range(len(pngs)), key=numbers.__getitem__)
    for a, b in zip(order, order[1:]):
        if numbers[a] == numbers[b]:
            raise ChaosError(f"{pngs[b]}: numbered {numbers[b]} like {pngs[a].name}: cannot order the mask slices")
    ranked = [pngs[i] for i in order]
    if len(ranked) != n:
        raise ChaosError(f"{folder}: {len(ranked)} PNG masks for {n} DICOM slices")
    if dicoms is not None:
        dicom_numbers = [_trailing_number(d) for d in dicoms]
        if None not in dicom_numbers and sorted(numbers) == sorted(dicom_numbers):  # the names follow the DICOMs' names
            for p, d, num in zip(ranked, dicoms, dicom_numbers):
                if _trailing_number(p) != num:
                    twin = dicoms[dicom_numbers.index(_trailing_number(p))]
                    raise ChaosError(f"{p}: matched by rank (k-th by number = k-th slice along the normal) to {d}, "
                                     f"but its number is that of {twin.name}: the mask and slice orders disagree")
    return ranked


def _grey(p: Path, img) -> np.ndarray:
    """The grey levels of a mask PNG (ChaosError naming it for colour, 16-bit > 255, float)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    png = np.asarray(img)
    if mode in ("RGB", "RGBA", "LA"):
        channels = png[..., :-1] if mode in ("LA", "RGBA") else png
        if mode != "LA" and not (np.array_equal(channels[..., 0], channels[..., 1])
                                 and np.array_equal(channels[..., 0], channels[..., 2])):
            raise ChaosError(f"{p}: a colour PNG ({mode}); expected grey levels (the CHAOS masks: 63 liver)")
        return channels[..., 0]
    if mode == "1":
        return png.astype(np.uint8)
    if mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        if png.size and (png.min() < 0 or png.max() > 255):
            raise ChaosError(f"{p}: {mode} PNG with grey levels {int(png.min())}..{int(png.max())}; expected the "
                             "CHAOS 8-bit levels (0..255, 63 liver)")
        return png
    raise ChaosError(f"{p}: PNG mode {mode}; expected an 8-bit grey mask (the CHAOS masks: 63 liver)")


def read_png_masks(folder, shape, dicoms=None) -> np.ndarray:
    """Liver mask (uint8, ``shape`` = (columns, rows, slices)) from the PNGs of a folder,
    matched to the DICOM slices (``dicoms``, the files in slice order, when known) as the
    module docstring says."""
    Image = _pil_image()
    folder = Path(folder)
    pngs = _match_masks(folder, _files(folder, ".png"), None if dicoms is None else list(dicoms), shape[2])
    out = np.zeros(shape, np.uint8)
    lo, hi = LIVER_RANGE
    stray = None
    for k, p in enumerate(pngs):
        try:
            with Image.open(p) as img:
                img.load()
                png = _grey(p, img)
        except ChaosError:
            raise
        except Exception as exc:
            raise ChaosError(f"{p}: cannot read as PNG ({_one_line(exc)})") from None
        if png.shape != (shape[1], shape[0]):
            raise ChaosError(f"{p}: mask is {png.shape[0]}x{png.shape[1]} (rows x columns), "
                             f"the DICOM slices are {shape[1]}x{shape[0]}")
        out[..., k] = ((png > lo) & (png <= hi)).T
        if np.any(png):
            values = np.unique(png[png != 0])
            if not any(np.any((values > a) & (values <= b)) for a, b in LABEL_RANGES):
                raise ChaosError(f"{p}: grey levels {values[:6].tolist()}, none a CHAOS label (63 liver, 126, 189, "
                                 "252 other organs): not a CHAOS mask")
            stray = stray or (p, values[:6].tolist())
    if stray is not None and not out.any():
        raise ChaosError(f"{folder}: no liver (grey levels in ({lo}, {hi}]) in any mask, but {stray[0].name} holds "
                         f"{stray[1]}: not the CHAOS labels (63 liver, 126, 189, 252 other organs)")
    return out


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    try:  # lazy on purpose: nibabel is an optional dependency (the "io" extra)
        import nibabel as nib
    except ImportError:
        raise ChaosError("import-chaos needs pydicom, pillow and nibabel: pip install 'coopseg[io]'") from None
    if data.dtype != np.uint8 and np.all(data == np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    except OSError as exc:
        raise ChaosError(f"{path}: cannot write ({exc.strerror or _one_line(exc)})") from None
    return path


def _base(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ChaosError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
    base = root / "MR" if (root / "MR").is_dir() else root
    if any((base / s).is_dir() for s in SERIES):
        raise ChaosError(f"{base}: one patient's folder; give the folder that holds the patient folders "
                         f"({base.parent})")
    return base


def find_patients(root) -> list[Path]:
    """The patient folders of DIR[/MR]: numbered folders and folders with T1DUAL or T2SPIR;
    each must have both (ChaosError naming it otherwise)."""
    base = _base(root)
    try:
        entries = list(base.iterdir())
    except OSError as exc:
        raise ChaosError(f"{base}: cannot list the folder ({exc.strerror or exc})") from None
    patients = []
    for p in sorted(entries, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        if not p.is_dir():
            if p.name.isdigit():
                raise ChaosError(f"{p}: a numbered entry that is not a folder (a broken link?)")
            continue
        have = [s for s in SERIES if (p / s).is_dir()]
        if not have and not p.name.isdigit():
            continue  # not a patient (notes/, __MACOSX/, ...)
        missing = [s for s in SERIES if s not in have]
        if missing:
            raise ChaosError(f"{p}: no {' or '.join(missing)} folder (a CHAOS MR patient has T1DUAL and T2SPIR)")
        patients.append(p)
    if not patients:
        below = sorted(d for d in (*base.glob("*/MR"), *base.glob("*/*/MR")) if d.is_dir())
        hint = f"; give {below[0].parent}?" if below else ""
        raise ChaosError(f"{base}: no patient folders (expected <id>/T1DUAL and <id>/T2SPIR){hint}")
    seen = {}
    for p in patients:
        real = p.resolve()
        if real in seen:
            raise ChaosError(f"{p}: the same folder as {seen[real]} (a link): one patient twice")
        seen[real] = p
    return patients


def _check_out(out: Path, base: Path, patients: list[Path]) -> None:
    """Before any work: OUT outside the input's patient folders and not DIR[/MR] itself, and
    no file where a folder will be written (or a folder where a file will)."""
    try:
        real = out.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ChaosError(f"{out}: cannot resolve OUT ({_one_line(exc)})") from None
    if real == base.resolve():
        raise ChaosError(f"{out}: OUT is the folder of the patient folders ({base}): OUT/<id> would be the input "
                         "folders; write elsewhere")
    for p in patients:
        if real == p.resolve() or p.resolve() in real.parents:
            raise ChaosError(f"{out}: OUT is inside the input patient folder {p}; write elsewhere")
    for q in (out, *out.parents):
        if q.exists():
            if not q.is_dir():
                raise ChaosError(f"{q}: exists and is not a folder (OUT {out})")
            break
    for q in [out / p.name for p in patients]:
        if q.exists() and not q.is_dir():
            raise ChaosError(f"{q}: exists and is not a folder; cannot write patient {q.name} there")
    if (out / "manifest.csv").is_dir():
        raise ChaosError(f"{out / 'manifest.csv'}: is a folder; cannot write the manifest there")


def import_patient(patient: Path, out: Path) -> dict:
    """Convert one patient folder; returns its manifest row."""
    series = {"t1": (patient / "T1DUAL" / "DICOM_anon" / "InPhase", patient / "T1DUAL" / "Ground"),
              "t2": (patient / "T2SPIR" / "DICOM_anon", patient / "T2SPIR" / "Ground")}
    row = {"id": patient.name}
    for name, (dcm, ground) in series.items():
        for folder in (dcm, ground):
            if folder.exists() and not folder.is_dir():
                raise ChaosError(f"{folder}: not a folder")
        if not dcm.is_dir():
            raise ChaosError(f"{dcm}: no such folder")
        volume, affine, files = read_dicom_slices(dcm)
        mask = read_png_masks(ground, volume.shape, files) if ground.is_dir() else None
        row[name] = _save(out / patient.name / f"{name}.nii.gz", volume, affine)
        row[f"{name}_mask"] = "" if mask is None else _save(out / patient.name / f"{name}_mask.nii.gz", mask, affine)
    return row


def import_chaos(root, out) -> Path:
    """Convert every patient of a CHAOS MR folder; returns the manifest path."""
    out = Path(out)
    patients = find_patients(root)
    _check_out(out, _base(root), patients)
    rows = []
    with tqdm(patients, desc="import-chaos", unit="patient") as bar:  # closed before an error is printed
        for p in bar:
            rows.append(import_patient(p, out))
    return write_manifest(out / "manifest.csv", rows)
