"""Paired T1/T2 volumes from a manifest CSV, on one voxel grid.

Manifest: a CSV with the columns ``t1, t2, t1_mask, t2_mask`` (optional ``id``), one pair
per row, NIfTI paths relative to the CSV (or absolute). The masks may be left empty in
a row for prediction-only use (``require_masks=False``).

The network needs both images on one voxel grid. The T1 grid is the reference: the T2
image and mask are resampled into it *through the affines* (world coordinates in mm),
so anatomy sits where the scanner put it. The pair therefore shares a grid but stays
unregistered (breathing, patient motion: exactly what the registor models).

Resampling rule (:func:`resample`): for every target voxel index ``j`` the source is
read at ``inv(A_src) @ A_dst @ j`` with trilinear interpolation (``order=1``) and 0
outside the source field of view. Images are interpolated linearly; masks are
interpolated linearly and thresholded at 0.5 ("linear-then-0.5"), which follows the
boundary better than nearest neighbour when the grids differ in resolution (a 3 mm T2
slice on a 1.5 mm T1 grid) and never shifts it by half a voxel.

Normalisation (:func:`normalise`): per volume, on its own original grid (before
resampling, so the zeros outside the other field of view do not weigh in), intensities
are clipped to their [0.5, 99.5] percentiles and mapped linearly onto [0, 1].

Tensor axes are the NIfTI array axes ``(i, j, k)`` of the T1 file, as stored.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import VolumeError
from .tables import read_table, resolve_path

COLUMNS = ("t1", "t2", "t1_mask", "t2_mask")
PERCENTILES = (0.5, 99.5)
AFFINE_ATOL = 1e-3  # mm: a mask's affine must equal its image's to this tolerance


@dataclass
class Case:
    """One row of a manifest: absolute paths (masks may be None)."""
    id: str
    t1: Path
    t2: Path
    t1_mask: Optional[Path] = None
    t2_mask: Optional[Path] = None


@dataclass
class Pair:
    """A loaded pair on the T1 grid.

    x1, x2: float32 (I, J, K) images in [0, 1]; s1, s2: float32 masks in {0, 1} or None.
    x2 / s2 are the T2 data resampled into the T1 grid. t1_img / t2_img are the nibabel
    images of the inputs (affine, header, original shape) for writing results back.
    """
    case: Case
    x1: np.ndarray
    x2: np.ndarray
    s1: Optional[np.ndarray]
    s2: Optional[np.ndarray]
    t1_img: object
    t2_img: object
    s2_native: Optional[np.ndarray] = None  # the T2 annotation on its own grid


def _nib():
    try:  # lazy on purpose: nibabel is an optional dependency (the "io" extra)
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel is in the "io" extra
        raise ImportError("reading volumes needs nibabel: pip install 'coopseg[io]'") from None
    return nib


def _one_line(exc: Exception) -> str:
    """An exception's message on one line (nibabel's may hold newlines)."""
    return " ".join(str(exc).split())


def read_manifest(path) -> list[Case]:
    """Rows of a manifest CSV as :class:`Case` objects with absolute paths.

    Read by :func:`coopseg.data.tables.read_table` (UTF-8 with or without a byte-order mark,
    blank rows skipped). Raises VolumeError naming the file (and line) for a missing or
    unreadable CSV, missing columns, a header without rows, a row without t1 or t2, and
    two rows of one pair (the same t1 and t2 files) or of one id; the volumes themselves
    are checked when loaded."""
    path = Path(path)
    table = read_table(path, "manifest", required=("t1", "t2"), expected=", ".join(COLUMNS), error=VolumeError)
    base = path.parent
    cols = {c: table.header.index(c) for c in ("id",) + COLUMNS if c in table.header}

    def cell(r, c):
        return r[cols[c]] if c in cols else ""

    cases, ids, pairs = [], {}, {}
    for k, r in enumerate(table.rows):
        where = table.where(k)
        if not cell(r, "t1") or not cell(r, "t2"):
            raise VolumeError(f"{where}: a manifest row needs both t1 and t2 paths")
        paths = {c: resolve_path(cell(r, c), base) if cell(r, c) else None for c in COLUMNS}
        case = Case(id=cell(r, "id") or Path(cell(r, "t1")).name.split(".")[0] + f"_{k + 1}", **paths)
        key = (os.path.realpath(case.t1), os.path.realpath(case.t2))
        if key in pairs:
            raise VolumeError(f"{where}: the same pair (t1 {case.t1}, t2 {case.t2}) as line {pairs[key]}; "
                              "each pair may appear once")
        if case.id in ids:
            raise VolumeError(f"{where}: id {case.id!r} already used on line {ids[case.id]}; ids must be unique")
        pairs[key] = ids[case.id] = table.lines[k]
        cases.append(case)
    return cases


def write_manifest(path, rows) -> Path:
    """Write a manifest; ``rows`` are dicts with the COLUMNS (+ id); paths are written relative
    to the manifest's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("id",) + COLUMNS)
        w.writeheader()
        for r in rows:
            out = {"id": r.get("id", "")}
            for c in COLUMNS:
                out[c] = os.path.relpath(Path(r[c]).resolve(), base) if r.get(c) else ""
            w.writerow(out)
    return path


def _open_nifti(path: Path, what: str):
    """The nibabel image of a NIfTI file (its header; the voxels are read on access), or
    VolumeError naming the file when it is missing, a folder or not NIfTI."""
    nib = _nib()
    if path.is_dir():
        raise VolumeError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise VolumeError(f"{path}: no such {what} file")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise VolumeError(f"{path}: cannot read as NIfTI ({_one_line(exc)})") from None


def load_nifti(path, what: str = "image", ndims: tuple[int, ...] = (3,)):
    """(data float32 array, nibabel image). Trailing axes of length 1 are dropped
    down to the fewest axes in `ndims`; a result whose number of axes
    is not in `ndims`, or that holds NaN or infinite voxels, raises VolumeError
    naming the file."""
    path = Path(path)
    img = _open_nifti(path, what)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # a truncated file: nibabel reads the voxels only now
        raise VolumeError(f"{path}: cannot read as NIfTI ({_one_line(exc)})") from None
    while data.ndim > min(ndims) and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise VolumeError(f"{path}: expected a {want} {what}, got shape {tuple(data.shape)}"
                          + (" (a 4-D series: pick one volume)" if data.ndim == 4 else ""))
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise VolumeError(f"{path}: {what} has NaN or infinite voxels")
    return data, img


def nifti_shape(path, what: str = "image") -> tuple[int, ...]:
    """The 3-D shape of a NIfTI file from its header alone (no voxel data read; trailing
    axes of length 1 dropped); VolumeError naming the file when it is missing, a folder,
    not NIfTI or not 3-D."""
    path = Path(path)
    shape = tuple(int(s) for s in _open_nifti(path, what).shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(f"{path}: expected a 3-D {what}, got shape {shape}")
    return shape


def check_mask_matches(mask_path, mask_img, mask, image_path, image_img, image) -> None:
    if mask.shape != image.shape:
        raise VolumeError(f"{mask_path}: mask shape {mask.shape} does not match its image {image_path} {image.shape}")
    if not np.allclose(mask_img.affine, image_img.affine, atol=AFFINE_ATOL):
        raise VolumeError(f"{mask_path}: mask affine does not match its image {image_path} "
                          f"(max difference {np.abs(mask_img.affine - image_img.affine).max():.4g} mm)")


def normalise(x: np.ndarray, percentiles=PERCENTILES) -> np.ndarray:
    """Clip to the given percentiles of the volume and map linearly onto [0, 1]
    (a constant volume maps to 0)."""
    lo, hi = np.percentile(x, percentiles)
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resample(data: np.ndarray, src_affine, dst_shape, dst_affine, *, mask: bool = False) -> np.ndarray:
    """Resample ``data`` (on the grid of ``src_affine``) onto the grid ``dst_shape`` /
    ``dst_affine`` through world coordinates: target voxel j reads the source at
    ``inv(src_affine) @ dst_affine @ j``, trilinear, 0 outside. ``mask=True``
    thresholds the interpolated values at 0.5 (returns float32 {0, 1})."""
    from scipy import ndimage  # lazy on purpose: scipy is an optional dependency (the "io" extra)

    m = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    out = ndimage.affine_transform(np.asarray(data, np.float32), m[:3, :3], offset=m[:3, 3],
                                   output_shape=tuple(int(s) for s in dst_shape), order=1,
                                   mode="constant", cval=0.0, prefilter=False)
    if mask:
        return (out > 0.5).astype(np.float32)
    return out.astype(np.float32)


def load_pair(case: Case, *, require_masks: bool = True, nonempty_masks: bool = False) -> Pair:
    """Load a case: both images normalised, T2 image and mask resampled into the T1 grid.

    require_masks: a missing mask column raises VolumeError. nonempty_masks (training):
    a mask with no voxel > 0.5 raises VolumeError naming it."""
    x1, img1 = load_nifti(case.t1, "image")
    x2n, img2 = load_nifti(case.t2, "image")
    masks = []
    for mpath, ipath, iimg, idata in ((case.t1_mask, case.t1, img1, x1), (case.t2_mask, case.t2, img2, x2n)):
        if mpath is None:
            if require_masks:
                raise VolumeError(f"{case.id}: no mask given for {ipath}")
            masks.append(None)
            continue
        m, mimg = load_nifti(mpath, "mask")
        check_mask_matches(mpath, mimg, m, ipath, iimg, idata)
        m = (m > 0.5).astype(np.float32)
        if nonempty_masks and not m.any():
            raise VolumeError(f"{mpath}: mask is empty (no voxel > 0.5); training needs a non-empty annotation")
        masks.append(m)
    x1 = normalise(x1)
    x2 = resample(normalise(x2n), img2.affine, x1.shape, img1.affine)
    s2 = None if masks[1] is None else resample(masks[1], img2.affine, x1.shape, img1.affine, mask=True)
    return Pair(case=case, x1=x1, x2=x2, s1=masks[0], s2=s2, t1_img=img1, t2_img=img2, s2_native=masks[1])


class PairDataset(torch.utils.data.Dataset):
    """The pairs of a manifest, following the training-layer dataset protocol:
    ``ds[i] -> dict(x1, x2, s1, s2)`` float32 tensors ``(1, *S)`` on the T1 grid
    (images in [0, 1], masks in {0, 1}); the training loop takes the crops.

    spatial_dims=3: one item per pair (whole volumes). spatial_dims=2: one item per
    slice along the last array axis (k) of every pair.
    split="train" requires non-empty masks; other splits accept empty ones.
    Loaded pairs are cached in memory (cache=False reloads every time).
    """

    def __init__(self, manifest, *, spatial_dims: int = 3, split: str = "train", cache: bool = True, seed: int = 0):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.manifest = Path(manifest)
        self.cases = read_manifest(self.manifest)
        self.spatial_dims = spatial_dims
        self.split = split
        self.cache = cache
        self._pairs: dict[int, dict] = {}
        self._index = list(range(len(self.cases)))
        if spatial_dims == 2:
            # slice counts come from the T1 headers (no voxel data read)
            self._index = []
            for c, case in enumerate(self.cases):
                shape = self._header_shape(case.t1)
                self._index += [(c, k) for k in range(shape[-1])]

    @staticmethod
    def _header_shape(path):
        return nifti_shape(path, "image")

    def __len__(self) -> int:
        return len(self._index)

    def load(self, c: int) -> dict:
        if c in self._pairs:
            return self._pairs[c]
        p = load_pair(self.cases[c], require_masks=True, nonempty_masks=self.split == "train")
        item = {k: torch.from_numpy(np.ascontiguousarray(getattr(p, k)))[None] for k in ("x1", "x2", "s1", "s2")}
        if self.cache:
            self._pairs[c] = item
        return item

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        if self.spatial_dims == 3:
            return dict(self.load(self._index[i]))
        c, k = self._index[i]
        return {n: t[..., k].contiguous() for n, t in self.load(c).items()}
